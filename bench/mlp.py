"""B8's numpy MLP against the same network and loop in PyTorch (CPU), in one run.

Same data, same widths, same batch order, same SGD with momentum, same per-batch
bookkeeping (loss, accuracy); numpy runs the body of `models.mlp.train`
(B8's own forward, loss, backward and SGD), torch runs nn.Linear/ReLU,
cross-entropy, autograd and torch.optim.SGD. The two
alternate, one epoch each in turn, so a busy moment on a shared machine hurts
both alike. The best epoch of each is compared (as in B5's roofline: on a shared
machine the slow repeats measure the neighbours, not the code); the medians are
reported beside it. Target: numpy/torch <= 1.2x per epoch. Then each one's achieved FLOP/s (6 FLOPs per weight per
sample) over this machine's numpy float32 matmul peak on all cores, measured in
the same run with `inventory.bench.cpu_matmul` (the better of two probes).

Data: MNIST through the dataset registry ($TIERKIT_DATA or the cache; the 10k
test split alone gives 8,000 training images), else scikit-learn's digits.

    python bench/mlp.py [--widths 784 128 10] [--epochs 10] [--batch 64] [--threads N] [--out bench/results/mlp.json]
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import numpy as np

TARGET = 1.2


def torch_epoch(model: Any, opt: Any, x: Any, y: Any, order: np.ndarray, batch: int) -> tuple[float, float, float]:
    """One epoch of the same loop in torch: (seconds, mean loss, accuracy)."""
    import torch
    import torch.nn.functional as F

    t0 = time.perf_counter()
    seen_loss, correct = 0.0, 0
    idx_all = torch.from_numpy(order)
    for i in range(0, len(order), batch):
        idx = idx_all[i:i + batch]
        xb, yb = x[idx], y[idx]
        logits = model(xb)
        loss = F.cross_entropy(logits, yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        seen_loss += loss.item() * len(idx)
        correct += int((logits.argmax(dim=1) == yb).sum())
    return time.perf_counter() - t0, seen_loss / len(order), correct / len(order)


def numpy_epoch(params: Any, sgd: Any, x: np.ndarray, y: np.ndarray, order: np.ndarray,
                batch: int) -> tuple[float, float, float]:
    """One epoch of B8's loop (models/mlp.py's forward, loss, backward and SGD): (seconds, mean loss, accuracy)."""
    from models import mlp

    t0 = time.perf_counter()
    seen_loss, correct = 0.0, 0
    for i in range(0, len(order), batch):
        idx = order[i:i + batch]
        xb, yb = x[idx], y[idx]
        logits, acts = mlp.forward(params, xb)
        loss, dlogits = mlp.softmax_cross_entropy(logits, yb)
        sgd.step(params, mlp.backward(params, acts, dlogits))
        seen_loss += loss * len(idx)
        correct += int((logits.argmax(axis=1) == yb).sum())
    return time.perf_counter() - t0, seen_loss / len(order), correct / len(order)


def torch_twin(params: Any, lr: float, momentum: float) -> tuple[Any, Any]:
    """The same network in torch with the same starting weights, and its SGD."""
    import torch

    layers: list[Any] = []
    for i, (W, b) in enumerate(params):
        lin = torch.nn.Linear(W.shape[0], W.shape[1])
        with torch.no_grad():
            lin.weight.copy_(torch.from_numpy(W.T.copy()))
            lin.bias.copy_(torch.from_numpy(b))
        layers += [lin] + ([torch.nn.ReLU()] if i < len(params) - 1 else [])
    model = torch.nn.Sequential(*layers)
    return model, torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)


def show(doc: dict[str, Any]) -> None:
    t_np, t_th, ratio = doc["numpy_best_epoch_s"], doc["torch_best_epoch_s"], doc["ratio_numpy_over_torch"]
    print(f"{'-'.join(map(str, doc['widths']))}, batch {doc['batch']}, {doc['n_train']:,} samples, "
          f"best of {doc['epochs_timed']} epochs")
    print(f"numpy: {t_np * 1e3:.1f} ms/epoch, {doc['numpy_gflops']:g} GFLOP/s "
          f"({doc['numpy_fraction_of_peak']:.1%} of the {doc['matmul_peak_gflops']:g} GFLOP/s matmul peak); "
          f"test acc {doc['test_accuracy']['numpy']:.2%}")
    print(f"torch: {t_th * 1e3:.1f} ms/epoch, {doc['torch_gflops']:g} GFLOP/s "
          f"({doc['torch_fraction_of_peak']:.1%} of peak); test acc {doc['test_accuracy']['torch']:.2%}")
    print(f"ratio numpy/torch: {ratio:.2f}x best epochs, {doc['ratio_of_medians']:.2f}x medians  "
          f"(target <= {TARGET}x: {'PASS' if doc['pass'] else 'MISS'})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--widths", type=int, nargs="+", default=[784, 128, 10])
    ap.add_argument("--epochs", type=int, default=10, help="Epochs each (the first is a warm-up, not timed).")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--threads", type=int, default=0,
                    help="Limit numpy's BLAS (threadpoolctl) and torch to this many threads [default: theirs].")
    ap.add_argument("--out", type=Path, default=REPO / "bench/results/mlp.json")
    args = ap.parse_args()

    import torch

    from inventory import bench
    from inventory.files import atomic_write
    from models import mlp
    from tiers.data import load_images
    from tiers.tier1.b08_mlp import Config

    # The machine's peak first, on every core, before any thread limit: what "fraction of peak" divides by.
    peak = max((bench.cpu_matmul("float32") for _ in range(2)), key=lambda f: f.value)
    if args.threads:  # on a shared machine one thread each avoids stalls on a descheduled BLAS worker
        from threadpoolctl import threadpool_limits

        threadpool_limits(args.threads)
        torch.set_num_threads(args.threads)

    cfg = Config()  # B8's data and momentum; the learning rate stays constant, so both see the same schedule
    d = load_images(cfg.data, cfg.samples, cfg.seed, cfg.data_path, lambda line: print(line, file=sys.stderr))
    widths = [d.x_train.shape[1], *args.widths[1:]]
    print(f"data: {d.source}", file=sys.stderr)

    params = mlp.init(widths, np.random.default_rng(0))   # numpy: B8's own parameters and training loop
    model, opt = torch_twin(params, args.lr, cfg.momentum)
    xt, yt = torch.from_numpy(d.x_train), torch.from_numpy(d.y_train)

    # The numpy loop keeps its momentum across calls: one SGD object, reused epoch after epoch.
    sgd = mlp.SGD(args.lr, cfg.momentum)
    rng = np.random.default_rng(1)
    np_times, th_times, np_acc, th_acc = [], [], [], []
    for epoch in range(args.epochs):
        order = rng.permutation(len(d.x_train))
        np_t, _, np_a = numpy_epoch(params, sgd, d.x_train, d.y_train, order, args.batch)
        th_t, _, th_a = torch_epoch(model, opt, xt, yt, order, args.batch)
        if epoch > 0:  # the first epoch warms caches, thread pools and torch's allocator
            np_times.append(np_t)
            th_times.append(th_t)
        np_acc.append(np_a)
        th_acc.append(th_a)
        print(f"epoch {epoch + 1}: numpy {np_t * 1e3:.1f} ms, torch {th_t * 1e3:.1f} ms", file=sys.stderr)

    np_test = mlp.accuracy(params, d.x_test, d.y_test)[1]
    with torch.no_grad():
        th_test = float((model(torch.from_numpy(d.x_test)).argmax(dim=1) == torch.from_numpy(d.y_test)).float().mean())
    t_np, t_th = min(np_times), min(th_times)
    med_ratio = statistics.median(np_times) / statistics.median(th_times)
    flop = 6 * sum(W.size for W, _ in params) * len(d.x_train)
    ratio = t_np / t_th
    doc = {
        "when": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "data": d.source, "n_train": len(d.x_train), "widths": widths, "batch": args.batch,
        "epochs_timed": len(np_times), "torch_version": torch.__version__, "torch_threads": torch.get_num_threads(),
        "threads_limit": args.threads or None,
        "cpu_count": os.cpu_count(),
        "numpy_epoch_s": np_times, "torch_epoch_s": th_times,
        "numpy_best_epoch_s": t_np, "torch_best_epoch_s": t_th,
        "numpy_median_epoch_s": statistics.median(np_times), "torch_median_epoch_s": statistics.median(th_times),
        "ratio_numpy_over_torch": round(ratio, 3), "ratio_of_medians": round(med_ratio, 3),
        "target": TARGET, "pass": ratio <= TARGET,
        "flop_per_epoch": flop, "numpy_gflops": round(flop / t_np / 1e9, 2), "torch_gflops": round(flop / t_th / 1e9, 2),
        "matmul_peak_gflops": peak.value, "matmul_peak_method": peak.method,
        "numpy_fraction_of_peak": round(flop / t_np / 1e9 / peak.value, 3),
        "torch_fraction_of_peak": round(flop / t_th / 1e9 / peak.value, 3),
        "train_accuracy_last_epoch": {"numpy": np_acc[-1], "torch": th_acc[-1]},
        "test_accuracy": {"numpy": np_test, "torch": th_test},
    }
    show(doc)
    atomic_write(args.out, json.dumps(doc, indent=2) + "\n")
    print(f"results: {args.out}")


if __name__ == "__main__":
    main()

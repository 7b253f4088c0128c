"""B12's training step: tokens/s and model FLOP utilisation, eager vs torch.compile, two sizes, one run.

For each size (a rung of B12's ladder), the same model (same seed), the same batches
and the same AdamW step run eagerly and then under `torch.compile`; each is timed
over `--steps` steps after warm-up (the compile itself is timed apart), best of
`--repeats` (on a shared machine the slow repeats measure the neighbours).

MFU = model FLOPs per second / the device's measured matmul peak, where model
FLOPs per token = 6 x (matmul weights, counted on the model) + 6 x layers x context x width (the
attention scores, as in `models.costs.gpt_train`, the planner's formula). The peak is
measured in the same run: numpy's float32 matmul on all cores (`inventory.bench.cpu_matmul`,
what `tierkit probe` records), or a torch matmul in the training precision on a GPU.

    python bench/pretrain.py [--quick] [--sizes 0.2M 0.8M] [--steps 30] [--device cpu|cuda] [--out bench/results/pretrain.json]
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from inventory.files import atomic_write


def peak_flops(device: Any, precision: str) -> tuple[float, str]:
    if device.type == "cpu":
        from inventory import bench

        f = max((bench.cpu_matmul("float32") for _ in range(2)), key=lambda x: x.value)
        return f.value * 1e9, f"numpy float32 matmul, all cores: {f.value:.1f} GFLOP/s (measured now)"
    import torch

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    n = 8192
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize(device)
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(10):
            a @ b
        torch.cuda.synchronize(device)
        best = min(best, (time.perf_counter() - t) / 10)
    rate = 2 * n ** 3 / best
    return rate, f"torch {precision} {n}x{n} matmul: {rate / 1e12:.1f} TFLOP/s (measured now)"


def b12_model(rung: dict[str, Any]) -> Any:
    """The GPTConfig `tierkit run B12` builds at this rung (its arch, bias and dropout), on the 65 characters
    of Tiny Shakespeare."""
    from tiers.config import build
    from tiers.tier2 import b12_pretrain as b12

    return b12.model_config(build(b12.Config, rung), "char", 65)


def matmul_params(rung: dict[str, Any]) -> int:
    """Weights that take part in a matmul per token: every Linear of B12's model, the output head included
    (the embedding lookup is not a matmul). Counted on the model itself, so either flavour is right."""
    from torch import nn

    from models.gpt import GPT

    return sum(m.weight.numel() for m in GPT(b12_model(rung)).modules() if isinstance(m, nn.Linear))


def measure(rung: dict[str, Any], compiled: bool, device: Any, precision: str, ids: Any, steps: int, warmup: int,
            repeats: int) -> dict[str, Any]:
    import torch

    from models.gpt import GPT
    from tiers.tier2 import common as c

    cfg = b12_model(rung)
    model = GPT(cfg, seed=0).to(device).train()
    opt = c.make_optimizer(model, c.TrainConfig(), device)
    fwd = torch.compile(model) if compiled else model
    gen = torch.Generator().manual_seed(0)
    B, T = rung["batch_size"], cfg.block_size
    batches = [c.random_batch(ids, T, B, gen, device) for _ in range(steps)]

    def step(x: Any, y: Any) -> float:
        with c.autocast(device, precision):
            loss = fwd(x, y)[1]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return float(loss.detach())

    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    t0 = time.perf_counter()
    for i in range(warmup):
        step(*batches[i % steps])
    sync()
    warm_s = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        for x, y in batches:
            step(x, y)
        sync()
        times.append(time.perf_counter() - t)
    best = min(times)
    return {"params": model.num_params(), "tokens_per_s": B * T * steps / best, "step_ms": best / steps * 1e3,
            "warmup_seconds": warm_s, "repeats_seconds": times}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="28K and 0.2M, 10 steps, 1 repeat (a smoke run).")
    ap.add_argument("--sizes", nargs=2, default=None, help="Two sizes of B12's ladder [default 0.2M 0.8M].")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--device", default=None, help="cpu or cuda[:i] [default: cuda if there is one].")
    ap.add_argument("--out", type=Path, default=REPO / "bench/results/pretrain.json")
    args = ap.parse_args()

    import torch

    from models.tokenizers import CharTokenizer
    from tiers import catalog
    from tiers.tier2 import common as c

    sizes = args.sizes or (["28K", "0.2M"] if args.quick else ["0.2M", "0.8M"])
    steps = args.steps or (10 if args.quick else 30)
    repeats = args.repeats or (1 if args.quick else 3)
    device, precision = c.device_and_precision(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    from tiers.data import DataError

    try:
        text = c.shakespeare()
    except DataError as exc:
        sys.exit(f"bench/pretrain.py: {exc} (or point TIERKIT_DATA at a folder holding tinyshakespeare.txt)")
    tok = CharTokenizer(text)
    ids = torch.tensor(tok.encode(text), dtype=torch.long)
    peak, peak_basis = peak_flops(device, precision)
    print(f"device {device} ({precision}); peak: {peak_basis}")
    m = catalog.get("B12")
    rows = []
    for size in sizes:
        rung = m.rung(size).params()
        flops_tok = 6 * matmul_params(rung) + 6 * rung["n_layer"] * rung["block_size"] * rung["n_embd"]
        row: dict[str, Any] = {"size": size, "model_flops_per_token": flops_tok}
        for mode in ("eager", "compile"):
            try:
                r = measure(rung, mode == "compile", device, precision, ids, steps, 3, repeats)
            except Exception as e:  # noqa: BLE001 - inductor needs a C++ compiler; say why and go on
                row[mode] = {"error": f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200] if str(e).strip() else ''}"}
                print(f"{size} {mode}: failed ({row[mode]['error']})")
                continue
            r["mfu"] = flops_tok * r["tokens_per_s"] / peak
            row[mode] = r
            print(f"{size} {mode:8s}: {r['params']:,} params, {r['tokens_per_s']:,.0f} tokens/s, "
                  f"{r['step_ms']:.1f} ms/step, MFU {r['mfu']:.1%} (warm-up {r['warmup_seconds']:.1f} s)")
        if "tokens_per_s" in row.get("eager", {}) and "tokens_per_s" in row.get("compile", {}):
            row["compile_over_eager"] = row["compile"]["tokens_per_s"] / row["eager"]["tokens_per_s"]
            print(f"{size}: torch.compile / eager = {row['compile_over_eager']:.2f}x tokens/s")
        rows.append(row)
    doc = {"benchmark": "pretrain", "when": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
           "host": platform.node(), "device": str(device), "precision": precision, "torch": torch.__version__,
           "threads": torch.get_num_threads(), "peak_flops": peak, "peak_basis": peak_basis, "steps": steps,
           "repeats": repeats, "quick": args.quick, "results": rows}
    atomic_write(args.out, json.dumps(doc, indent=2) + "\n")
    print(f"results: {args.out}")


if __name__ == "__main__":
    main()

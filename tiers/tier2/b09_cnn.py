"""B9: a small convolutional network in torch, side by side with B8's MLP on the same digits.

    image (1 x 28 x 28) ─► [conv 3x3 "same" ─► ReLU] x convs_per_stage ─► max-pool 2x2   (per stage)
                       ─► flatten ─► dense ─► ReLU ─► ... ─► dense (10 logits)

Why it beats the MLP with fewer weights: a 3x3 filter is shared across every
position (a stroke is a stroke wherever it is), and pooling makes the next stage
see a wider patch at lower resolution. The MLP must learn each position apart.

Data: MNIST through the registry, exactly as B8 loads it (with only the 10,000-
image test split here, 8,000 to train and 2,000 to test); CIFAR-10 from a local
folder holding the python version (`data_batch_1..5`, `test_batch`), named by
`TIERKIT_CIFAR10=folder` or the config's data_path. The comparison row for the
MLP comes from B8's build folder when there is one, else B8's numpy MLP is trained
here on the same split for the same number of epochs.
"""
from __future__ import annotations

import json
import os
import pickle
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from models import costs
from tiers.tier2 import common as c

if TYPE_CHECKING:
    from tiers.runner import Context, Output

DEFAULTS: dict[str, Any] = {"lr": 2e-3, "weight_decay": 0.0, "seed": 0, "convs_per_stage": 1, "classes": 10,
                            "mlp_widths": [784, 128, 10], "data": "MNIST"}


class CNN(nn.Module):
    """Stages of 3x3 convs + ReLU, each ending in a 2x2 max-pool; then dense layers (models.costs.CNNShape)."""

    def __init__(self, in_ch: int, side: int, widths: list[int], convs_per_stage: int, fc: list[int], classes: int):
        super().__init__()
        layers: list[nn.Module] = []
        ch = in_ch
        for w in widths:
            for _ in range(convs_per_stage):
                layers += [nn.Conv2d(ch, w, 3, padding=1), nn.ReLU()]
                ch = w
            layers.append(nn.MaxPool2d(2))
            side //= 2
        self.features = nn.Sequential(*layers)
        dims = [ch * side * side, *fc, classes]
        dense: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(dims, dims[1:])):
            dense.append(nn.Linear(a, b))
            if i < len(dims) - 2:
                dense.append(nn.ReLU())
        self.classifier = nn.Sequential(nn.Flatten(), *dense)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def load_cifar10(folder: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The python version of CIFAR-10: pickled dicts with b"data" (n x 3072 uint8, RGB planes) and b"labels"."""
    def read(name: str) -> tuple[np.ndarray, np.ndarray]:
        p = folder / name
        if not p.is_file():
            raise FileNotFoundError(f"CIFAR-10: {p} is missing; point TIERKIT_CIFAR10 at the cifar-10-batches-py folder")
        with open(p, "rb") as f:
            d = pickle.load(f, encoding="bytes")
        return np.asarray(d[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32), np.asarray(d[b"labels"], dtype=np.int64)

    train = [read(f"data_batch_{i}") for i in range(1, 6) if (folder / f"data_batch_{i}").is_file()]
    if not train:
        read("data_batch_1")  # raises the one-line error
    te_x, te_y = read("test_batch")
    return np.concatenate([x for x, _ in train]), np.concatenate([y for _, y in train]), te_x, te_y


def load(cfg: dict[str, Any], log: Any) -> dict[str, Any]:
    """{x_train, y_train, x_test, y_test (images N x C x H x W float32), source, note, b8: B8's Data or None}."""
    if "cifar" in str(cfg["data"]).lower():
        folder = cfg.get("data_path") or os.environ.get("TIERKIT_CIFAR10")
        if not folder:
            raise FileNotFoundError("CIFAR-10 is not in the data registry: set TIERKIT_CIFAR10 to a local "
                                    "cifar-10-batches-py folder, or run an MNIST size")
        xtr, ytr, xte, yte = load_cifar10(Path(folder).expanduser())
        n = int(cfg["samples"])
        to = lambda x: x.astype(np.float32) / 255
        return {"x_train": to(xtr[:n]), "y_train": ytr[:n], "x_test": to(xte), "y_test": yte, "b8": None,
                "source": f"CIFAR-10 ({folder}): {min(n, len(xtr)):,} training and {len(xte):,} test images", "note": ""}
    from tiers.tier1 import b08_mlp as b8

    d = b8.load_data({**b8.DEFAULTS, "data": cfg["data"], "samples": cfg["samples"], "seed": cfg["seed"],
                      "data_path": cfg.get("data_path")}, log)
    img = lambda x: x.reshape(len(x), 1, d.side, d.side)
    return {"x_train": img(d.x_train), "y_train": d.y_train, "x_test": img(d.x_test), "y_test": d.y_test,
            "source": d.source, "note": d.note, "b8": d}


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 1000) -> tuple[float, float]:
    model.eval()
    loss, correct = 0.0, 0
    for i in range(0, len(x), batch):
        logits = model(x[i:i + batch])
        loss += float(F.cross_entropy(logits, y[i:i + batch], reduction="sum"))
        correct += int((logits.argmax(1) == y[i:i + batch]).sum())
    model.train()
    return loss / len(x), correct / len(x)


def train_cnn(model: nn.Module, data: dict[str, Any], cfg: dict[str, Any], device: torch.device, precision: str,
              on_epoch: Any = None) -> dict[str, list[float]]:
    """Adam over shuffled minibatches; loss and accuracy on the test split after every epoch."""
    g = torch.Generator().manual_seed(int(cfg["seed"]))
    xtr, ytr = torch.from_numpy(data["x_train"]).to(device), torch.from_numpy(data["y_train"]).to(device)
    xte, yte = torch.from_numpy(data["x_test"]).to(device), torch.from_numpy(data["y_test"]).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=float(cfg["lr"]), weight_decay=float(cfg["weight_decay"]))
    scaler = c.grad_scaler(device, precision)
    hist: dict[str, list[float]] = {k: [] for k in ("train_loss", "train_acc", "test_loss", "test_acc", "epoch_seconds")}
    batch = int(cfg["batch"])
    for epoch in range(int(cfg["epochs"])):
        t0 = time.perf_counter()
        order = torch.randperm(len(xtr), generator=g).to(device)
        seen, correct = 0.0, 0
        for i in range(0, len(order), batch):
            idx = order[i:i + batch]
            with c.autocast(device, precision):
                logits = model(xtr[idx])
                loss = F.cross_entropy(logits.float(), ytr[idx])
            opt.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
            else:
                loss.backward()
                opt.step()
            seen += float(loss) * len(idx)
            correct += int((logits.argmax(1) == ytr[idx]).sum())
        hist["epoch_seconds"].append(time.perf_counter() - t0)
        hist["train_loss"].append(seen / len(xtr))
        hist["train_acc"].append(correct / len(xtr))
        tl, ta = evaluate(model, xte, yte)
        hist["test_loss"].append(tl)
        hist["test_acc"].append(ta)
        if on_epoch:
            on_epoch(epoch, hist)
    return hist


def mlp_row(ctx: Context, data: dict[str, Any], cfg: dict[str, Any]) -> dict[str, Any] | None:
    """B8's MLP on these digits: its build's metrics when they are there, else trained here (numpy, same split)."""
    b8_metrics = Path(ctx.out_dir).parent / "B08-numpy-mlp" / "metrics.json"
    if b8_metrics.is_file():
        try:
            m = json.loads(b8_metrics.read_text())["metrics"]
            return {"model": f"B8 MLP {'-'.join(map(str, m['widths']))} (numpy, from {b8_metrics.parent.name}/)",
                    "params": m["params"], "macs": sum(a * b for a, b in zip(m["widths"], m["widths"][1:])),
                    "test_accuracy": m["test_accuracy"], "epochs": m["epochs"],
                    "seconds_per_epoch": m["seconds_per_epoch"], "n_train": m["n_train"], "source": "build"}
        except (KeyError, ValueError, TypeError):
            ctx.log(f"{b8_metrics} is not a B8 metrics file; training B8's MLP here instead")
    d = data["b8"]
    if d is None:
        return None
    from tiers.tier1 import b08_mlp as b8

    widths = [d.x_train.shape[1], *cfg["mlp_widths"][1:]]
    params = b8.init(widths, np.random.default_rng(int(cfg["seed"])))
    hist = b8.train(params, d, {**b8.DEFAULTS, "epochs": cfg["epochs"], "batch": cfg["batch"], "seed": cfg["seed"]})
    return {"model": f"B8 MLP {'-'.join(map(str, widths))} (numpy, trained here)",
            "params": sum(W.size + b.size for W, b in params), "macs": sum(W.size for W, _ in params),
            "test_accuracy": hist["test_acc"][-1], "epochs": cfg["epochs"],
            "seconds_per_epoch": float(np.median(hist["epoch_seconds"])), "n_train": len(d.x_train),
            "source": "here", "history": hist}


def run(ctx: Context) -> Output:
    from tiers.runner import Output

    cfg = {**DEFAULTS, **ctx.config}
    device, precision = c.device_and_precision(ctx)
    torch.manual_seed(int(cfg["seed"]))
    data = load(cfg, ctx.log)
    _, ch, side, _ = data["x_train"].shape
    ctx.log(f"data: {data['source']}")
    widths, fc = list(cfg["widths"]), list(cfg["fc"])
    model = CNN(ch, side, widths, int(cfg["convs_per_stage"]), fc, int(cfg["classes"])).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    shape = costs.CNNShape((side, side), ch, tuple(widths), int(cfg["convs_per_stage"]), tuple(fc), int(cfg["classes"]))
    pred_params, macs, _ = costs.cnn_counts(shape)
    with ctx.progress(f"training CNN {widths} + {fc}", cfg["epochs"]) as bar:
        def on_epoch(e: int, h: dict[str, list[float]]) -> None:
            ctx.log(f"epoch {e + 1}: train loss {h['train_loss'][-1]:.4f}, test accuracy {h['test_acc'][-1]:.2%} "
                    f"({h['epoch_seconds'][-1]:.2f} s)")
            bar.advance()

        hist = train_cnn(model, data, cfg, device, precision, on_epoch)
    with ctx.progress("B8's MLP for comparison", None):
        mlp = mlp_row(ctx, data, cfg)
    cnn = {"model": f"B9 CNN {widths} x{cfg['convs_per_stage']} + fc {fc} (torch)", "params": n_params, "macs": macs,
           "test_accuracy": hist["test_acc"][-1], "epochs": cfg["epochs"],
           "seconds_per_epoch": float(np.median(hist["epoch_seconds"])), "n_train": len(data["x_train"])}
    metrics = {"data": data["source"], "data_note": data["note"], "n_train": len(data["x_train"]),
               "n_test": len(data["x_test"]), "params": n_params, "params_predicted": pred_params,
               "macs_per_sample": macs, "device": str(device), "precision": precision,
               "test_accuracy": hist["test_acc"][-1], "best_test_accuracy": max(hist["test_acc"]),
               "train_accuracy": hist["train_acc"][-1], "seconds_per_epoch": cnn["seconds_per_epoch"],
               "achieved_gflops": 6 * macs * len(data["x_train"]) / cnn["seconds_per_epoch"] / 1e9,
               "history": hist, "comparison": [cnn] + ([{k: v for k, v in mlp.items() if k != "history"}] if mlp else [])}
    plt = _pyplot()
    plots = [curves_plot(plt, Path(ctx.out_dir) / "accuracy.png", hist, mlp),
             filters_plot(plt, Path(ctx.out_dir) / "filters.png", model)]
    vs = (f"; B8's MLP ({mlp['params']:,} parameters) reached {mlp['test_accuracy']:.2%} on "
          f"{'the same split' if mlp['source'] == 'here' else 'its own run'}") if mlp else ""
    summary = (f"A CNN with {len(widths)} conv stages ({n_params:,} parameters, {macs / 1e6:.2f}M MACs per image) "
               f"reached **{hist['test_acc'][-1]:.2%} test accuracy** after {cfg['epochs']:g} epochs on "
               f"{data['source'].split(':')[0]}{vs}.")
    return Output(metrics=metrics, summary=summary, report=report(metrics), plots=plots)


def _pyplot() -> Any:
    from tiers.report import pyplot

    return pyplot()


def curves_plot(plt: Any, path: Path, h: dict[str, list[float]], mlp: dict[str, Any] | None) -> str:
    from tiers.report import save

    fig, ax = plt.subplots(figsize=(7, 4.5))
    ep = np.arange(1, len(h["test_acc"]) + 1)
    ax.plot(ep, np.asarray(h["test_acc"]) * 100, "s-", label="CNN test")
    ax.plot(ep, np.asarray(h["train_acc"]) * 100, "o--", alpha=0.6, label="CNN train (during the epoch)")
    if mlp and "history" in mlp:
        ax.plot(ep, np.asarray(mlp["history"]["test_acc"]) * 100, "^-", label="B8 MLP test (same split)")
    elif mlp:
        ax.axhline(mlp["test_accuracy"] * 100, ls="--", color="grey", label="B8 MLP test (its build)")
    ax.set_xlabel("epoch")
    ax.set_ylabel("accuracy (%)")
    ax.set_title("B9: CNN vs B8's MLP", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    save(fig, path)
    return f"{path.name}: test accuracy per epoch, CNN and MLP"


def filters_plot(plt: Any, path: Path, model: CNN) -> str:
    from tiers.report import save

    w = model.features[0].weight.detach().cpu().float().numpy()   # (out, in, 3, 3)
    n = min(16, w.shape[0])
    fig, axes = plt.subplots(2, 8, figsize=(9, 3.2))
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i < n:
            f = w[i].mean(0)
            lim = np.abs(f).max() or 1
            ax.imshow(f, cmap="RdBu_r", vmin=-lim, vmax=lim)
    fig.suptitle("first-layer 3x3 filters (red: weight > 0, blue: < 0)", fontsize=9)
    save(fig, path)
    return f"{path.name}: the first conv layer's filters"


def report(m: dict[str, Any]) -> str:
    from tiers.report import md_table

    rows = [[r["model"], f"{r['params']:,}", f"{r['macs'] / 1e6:.3f}M", f"{r['test_accuracy']:.2%}", f"{r['epochs']:g}",
             f"{r['n_train']:,}", f"{r['seconds_per_epoch']:.2f}"] for r in m["comparison"]]
    out = ["## Data", "", m["data"] + (f". Note: {m['data_note']}." if m["data_note"] else ""), "",
           "## CNN vs MLP", "",
           md_table(["model", "parameters", "MACs / image", "test accuracy", "epochs", "trained on", "s / epoch"], rows),
           "", f"The CNN's parameter count matches `models.costs.cnn_counts`: {m['params_predicted']:,} "
           f"({'equal' if m['params_predicted'] == m['params'] else 'DIFFERENT'}). Trained with Adam on "
           f"{m['device']} ({m['precision']}); {m['achieved_gflops']:.2f} GFLOP/s achieved (6 FLOPs per MAC per sample).",
           "", "| epoch | train loss | train acc | test loss | test acc | seconds |", "|---|---|---|---|---|---|"]
    h = m["history"]
    out += [f"| {i + 1} | {h['train_loss'][i]:.4f} | {h['train_acc'][i]:.2%} | {h['test_loss'][i]:.4f} | "
            f"{h['test_acc'][i]:.2%} | {h['epoch_seconds'][i]:.2f} |" for i in range(len(h["test_acc"]))]
    return "\n".join(out)

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

import itertools
import json
import os
import pickle
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import numpy as np
import torch
from annotated_types import Ge, Gt, MinLen
from torch import nn
from torch.nn import functional as F

from models import costs, mlp
from tiers.data import load_images
from tiers.report import md_table, pyplot, save
from tiers.tier2 import common as c

if TYPE_CHECKING:
    from tiers.runner import Context, Output

# B8's MLP as B8 trains it by default (minibatch SGD with momentum, lr decaying linearly to a tenth)
MLP_SGD = {"lr": 0.05, "momentum": 0.9, "lr_final": 0.1, "optimizer": "momentum"}


@dataclass
class Config:
    # the size: every rung of the ladder names these (tiers/milestones.yaml)
    widths: Annotated[list[Annotated[int, Gt(0)]], MinLen(1)]   # channels of each stage's convs
    samples: Annotated[int, Gt(0)]            # training images used
    epochs: Annotated[int, Gt(0)]
    batch: Annotated[int, Gt(0)]
    fc: list[Annotated[int, Gt(0)]] = field(default_factory=lambda: [128])   # dense layers after the last stage
    convs_per_stage: Annotated[int, Gt(0)] = 1
    classes: Annotated[int, Gt(1)] = 10
    data: str = "MNIST"                       # MNIST | Fashion-MNIST | digits | CIFAR-10 (a local folder)
    data_path: str | None = None              # a folder with the IDX files, or cifar-10-batches-py for CIFAR-10
    lr: Annotated[float, Gt(0)] = 2e-3        # Adam
    weight_decay: Annotated[float, Ge(0)] = 0.0
    seed: int = 0
    mlp_widths: Annotated[list[Annotated[int, Gt(0)]], MinLen(2)] = field(default_factory=lambda: [784, 128, 10])
    # B8's MLP for the comparison row (the first width is replaced by the data's pixels)


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
        for i, (a, b) in enumerate(itertools.pairwise(dims)):
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


def load(cfg: Config, log: Any) -> dict[str, Any]:
    """{x_train, y_train, x_test, y_test (images N x C x H x W float32), source, note, images: the digits as
    rows for B8's MLP, or None for CIFAR-10}."""
    if "cifar" in cfg.data.lower():
        folder = cfg.data_path or os.environ.get("TIERKIT_CIFAR10")
        if not folder:
            raise FileNotFoundError("CIFAR-10 is not in the data registry: set TIERKIT_CIFAR10 to a local "
                                    "cifar-10-batches-py folder, or run an MNIST size")
        xtr, ytr, xte, yte = load_cifar10(Path(folder).expanduser())
        n = cfg.samples
        to = lambda x: x.astype(np.float32) / 255
        return {"x_train": to(xtr[:n]), "y_train": ytr[:n], "x_test": to(xte), "y_test": yte, "images": None,
                "source": f"CIFAR-10 ({folder}): {min(n, len(xtr)):,} training and {len(xte):,} test images", "note": ""}
    d = load_images(cfg.data, cfg.samples, cfg.seed, cfg.data_path, log)
    img = lambda x: x.reshape(len(x), 1, d.side, d.side)
    return {"x_train": img(d.x_train), "y_train": d.y_train, "x_test": img(d.x_test), "y_test": d.y_test,
            "source": d.source, "note": d.note, "images": d}


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


def train_cnn(model: nn.Module, data: dict[str, Any], cfg: Config, device: torch.device, precision: str,
              on_epoch: Any = None) -> dict[str, list[float]]:
    """Adam over shuffled minibatches; loss and accuracy on the test split after every epoch."""
    g = torch.Generator().manual_seed(cfg.seed)
    xtr, ytr = torch.from_numpy(data["x_train"]).to(device), torch.from_numpy(data["y_train"]).to(device)
    xte, yte = torch.from_numpy(data["x_test"]).to(device), torch.from_numpy(data["y_test"]).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scaler = c.grad_scaler(device, precision)
    hist: dict[str, list[float]] = {k: [] for k in ("train_loss", "train_acc", "test_loss", "test_acc", "epoch_seconds")}
    batch = cfg.batch
    for epoch in range(cfg.epochs):
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


def mlp_row(ctx: Context, data: dict[str, Any], cfg: Config) -> dict[str, Any] | None:
    """B8's MLP on these digits: its build's metrics when they are there, else trained here (numpy, same split)."""
    b8_metrics = Path(ctx.out_dir).parent / "B08-numpy-mlp" / "metrics.json"
    if b8_metrics.is_file():
        try:
            m = json.loads(b8_metrics.read_text())["metrics"]
            return {"model": f"B8 MLP {'-'.join(map(str, m['widths']))} (numpy, from {b8_metrics.parent.name}/)",
                    "params": m["params"], "macs": sum(a * b for a, b in itertools.pairwise(m["widths"])),
                    "test_accuracy": m["test_accuracy"], "epochs": m["epochs"],
                    "seconds_per_epoch": m["seconds_per_epoch"], "n_train": m["n_train"], "source": "build"}
        except (KeyError, ValueError, TypeError):
            ctx.log(f"{b8_metrics} is not a B8 metrics file; training B8's MLP here instead")
    d = data["images"]
    if d is None:
        return None
    widths = [d.x_train.shape[1], *cfg.mlp_widths[1:]]
    params = mlp.init(widths, np.random.default_rng(cfg.seed))
    hist = mlp.train(params, d, epochs=cfg.epochs, batch=cfg.batch, seed=cfg.seed, **MLP_SGD)
    return {"model": f"B8 MLP {'-'.join(map(str, widths))} (numpy, trained here)",
            "params": sum(W.size + b.size for W, b in params), "macs": sum(W.size for W, _ in params),
            "test_accuracy": hist["test_acc"][-1], "epochs": cfg.epochs,
            "seconds_per_epoch": float(np.median(hist["epoch_seconds"])), "n_train": len(d.x_train),
            "source": "here", "history": hist}


def run(ctx: Context) -> Output:
    from tiers.runner import Output

    cfg: Config = ctx.config
    device, precision = c.device_and_precision(ctx)
    torch.manual_seed(cfg.seed)
    data = load(cfg, ctx.log)
    _, ch, side, _ = data["x_train"].shape
    ctx.log(f"data: {data['source']}")
    model = CNN(ch, side, cfg.widths, cfg.convs_per_stage, cfg.fc, cfg.classes).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    shape = costs.CNNShape((side, side), ch, tuple(cfg.widths), cfg.convs_per_stage, tuple(cfg.fc), cfg.classes)
    pred_params, macs, _ = costs.cnn_counts(shape)
    with ctx.progress(f"training CNN {cfg.widths} + {cfg.fc}", cfg.epochs) as bar:
        def on_epoch(e: int, h: dict[str, list[float]]) -> None:
            ctx.log(f"epoch {e + 1}: train loss {h['train_loss'][-1]:.4f}, test accuracy {h['test_acc'][-1]:.2%} "
                    f"({h['epoch_seconds'][-1]:.2f} s)")
            bar.advance()

        hist = train_cnn(model, data, cfg, device, precision, on_epoch)
    with ctx.progress("B8's MLP for comparison", None):
        baseline = mlp_row(ctx, data, cfg)
    cnn = {"model": f"B9 CNN {cfg.widths} x{cfg.convs_per_stage} + fc {cfg.fc} (torch)", "params": n_params,
           "macs": macs, "test_accuracy": hist["test_acc"][-1], "epochs": cfg.epochs,
           "seconds_per_epoch": float(np.median(hist["epoch_seconds"])), "n_train": len(data["x_train"])}
    metrics = {"data": data["source"], "data_note": data["note"], "n_train": len(data["x_train"]),
               "n_test": len(data["x_test"]), "params": n_params, "params_predicted": pred_params,
               "macs_per_sample": macs, "device": str(device), "precision": precision,
               "test_accuracy": hist["test_acc"][-1], "best_test_accuracy": max(hist["test_acc"]),
               "train_accuracy": hist["train_acc"][-1], "seconds_per_epoch": cnn["seconds_per_epoch"],
               "achieved_gflops": 6 * macs * len(data["x_train"]) / cnn["seconds_per_epoch"] / 1e9, "history": hist,
               "comparison": [cnn] + ([{k: v for k, v in baseline.items() if k != "history"}] if baseline else [])}
    plt = pyplot()
    plots = [curves_plot(plt, Path(ctx.out_dir) / "accuracy.png", hist, baseline),
             filters_plot(plt, Path(ctx.out_dir) / "filters.png", model)]
    vs = (f"; B8's MLP ({baseline['params']:,} parameters) reached {baseline['test_accuracy']:.2%} on "
          f"{'the same split' if baseline['source'] == 'here' else 'its own run'}") if baseline else ""
    summary = (f"A CNN with {len(cfg.widths)} conv stages ({n_params:,} parameters, {macs / 1e6:.2f}M MACs per "
               f"image) reached **{hist['test_acc'][-1]:.2%} test accuracy** after {cfg.epochs:g} epochs on "
               f"{data['source'].split(':')[0]}{vs}.")
    return Output(metrics=metrics, summary=summary, report=report(metrics), plots=plots)


# ---------------------------------------------------------------- plots and the report

def curves_plot(plt: Any, path: Path, h: dict[str, list[float]], baseline: dict[str, Any] | None) -> str:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ep = np.arange(1, len(h["test_acc"]) + 1)
    ax.plot(ep, np.asarray(h["test_acc"]) * 100, "s-", label="CNN test")
    ax.plot(ep, np.asarray(h["train_acc"]) * 100, "o--", alpha=0.6, label="CNN train (during the epoch)")
    if baseline and "history" in baseline:
        ax.plot(ep, np.asarray(baseline["history"]["test_acc"]) * 100, "^-", label="B8 MLP test (same split)")
    elif baseline:
        ax.axhline(baseline["test_accuracy"] * 100, ls="--", color="grey", label="B8 MLP test (its build)")
    c.finish_plot(fig, ax, path, "epoch", "accuracy (%)", "B9: CNN vs B8's MLP")
    return f"{path.name}: test accuracy per epoch, CNN and MLP"


def filters_plot(plt: Any, path: Path, model: CNN) -> str:
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
    rows = [[r["model"], f"{r['params']:,}", f"{r['macs'] / 1e6:.3f}M", f"{r['test_accuracy']:.2%}", f"{r['epochs']:g}",
             f"{r['n_train']:,}", f"{r['seconds_per_epoch']:.2f}"] for r in m["comparison"]]
    out = ["## Data", "", m["data"] + (f". Note: {m['data_note']}." if m["data_note"] else ""), "",
           "## CNN vs MLP", "",
           md_table(["model", "parameters", "MACs / image", "test accuracy", "epochs", "trained on", "s / epoch"], rows),
           "", (f"The CNN's parameter count matches `models.costs.cnn_counts`: {m['params_predicted']:,} "
           f"({'equal' if m['params_predicted'] == m['params'] else 'DIFFERENT'}). Trained with Adam on "
           f"{m['device']} ({m['precision']}); {m['achieved_gflops']:.2f} GFLOP/s achieved (6 FLOPs per MAC per sample)."),
           "", "| epoch | train loss | train acc | test loss | test acc | seconds |", "|---|---|---|---|---|---|"]
    h = m["history"]
    out += [f"| {i + 1} | {h['train_loss'][i]:.4f} | {h['train_acc'][i]:.2%} | {h['test_loss'][i]:.4f} | "
            f"{h['test_acc'][i]:.2%} | {h['epoch_seconds'][i]:.2f} |" for i in range(len(h["test_acc"]))]
    return "\n".join(out)

"""B9: a small convolutional network in torch, side by side with B8's MLP on the same images.

    image (C x H x W) ─► [conv 3x3 "same" ─► ReLU] x convs_per_stage ─► max-pool 2x2   (per stage)
                     ─► flatten ─► dense ─► ReLU ─► ... ─► dense (10 logits)

Why it beats the MLP with fewer weights: a 3x3 filter is shared across every
position (a stroke is a stroke wherever it is), and pooling makes the next stage
see a wider patch at lower resolution. The MLP must learn each position apart.

Data (the rung's `dataset`, a registry name):
- `mnist` (or `fashion-mnist`): through the registry, exactly as B8 loads it (with only
  the 10,000-image test split here, 8,000 to train and 2,000 to test).
- `cifar-10`: the registry's cifar-10-batches-py folder (`tierkit data fetch cifar-10`,
  170 MB; tiers/data/cifar.py reads its pickled batches), or your own copy named by
  `--set data_path=FOLDER`. Each colour channel is standardised with the
  training images' mean and spread, and the CNN trains on random crops (4-pixel
  padding) and horizontal flips: a cat facing left is still a cat.
The comparison row is B8's numpy MLP: from B8's build folder when B8 ran on images of
this shape, else trained here on the same split (flattened pixels, no augmentation)
for the same number of epochs.
"""
from __future__ import annotations

import itertools
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import numpy as np
import torch
from annotated_types import Ge, Gt, MinLen
from torch import nn
from torch.nn import functional as F

from models import costs, mlp
from tiers.data import DataError, Images, load_images
from tiers.data.cifar import cifar10_folder, class_names, load_cifar10
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
    data: str = "MNIST"                       # the rung's label; names the data set when `dataset` is not given
    dataset: Literal["mnist", "fashion-mnist", "cifar-10", "digits"] | None = None   # None: from `data`
    data_path: str | None = None              # a folder with the IDX files, or cifar-10-batches-py for CIFAR-10
    augment: bool | None = None               # random crops and flips while training; None: on for CIFAR-10
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


def dataset_name(cfg: Config) -> str:
    """The registry name of the images: `dataset`, else read from the rung's `data` label."""
    if cfg.dataset:
        return cfg.dataset
    label = cfg.data.lower()
    return next((n for n in ("cifar-10", "fashion-mnist", "digits") if n.replace("-", "") in label.replace("-", "")),
                "mnist")


def load(cfg: Config, log: Any) -> dict[str, Any]:
    """{x_train, y_train, x_test, y_test (images N x C x H x W float32), source, note, classes,
    images: the same pixels as rows, for B8's MLP}."""
    name = dataset_name(cfg)
    if name == "cifar-10":
        return load_cifar(cfg)
    d = load_images(name, cfg.samples, cfg.seed, cfg.data_path, log)
    img = lambda x: x.reshape(len(x), 1, d.side, d.side)
    return {"x_train": img(d.x_train), "y_train": d.y_train, "x_test": img(d.x_test), "y_test": d.y_test,
            "source": d.source, "note": d.note, "images": d, "classes": [str(i) for i in range(10)]}


def load_cifar(cfg: Config) -> dict[str, Any]:
    """The first `samples` training images and all 10,000 test images, each channel standardised with the
    training images' mean and standard deviation (so a pixel's scale is the same in R, G and B)."""
    folder = cifar10_folder(cfg.data_path)
    xtr, ytr, xte, yte = load_cifar10(folder)
    xtr, ytr = xtr[:cfg.samples], ytr[:cfg.samples]
    scaled = xtr.astype(np.float32) / 255
    mean = scaled.mean(axis=(0, 2, 3), keepdims=True)
    std = scaled.std(axis=(0, 2, 3), keepdims=True) + 1e-6
    x_train = (scaled - mean) / std
    x_test = (xte.astype(np.float32) / 255 - mean) / std
    source = f"CIFAR-10 ({folder}): {len(xtr):,} training and {len(xte):,} test images, 32x32 RGB"
    rows = Images(x_train.reshape(len(x_train), -1), ytr, x_test.reshape(len(x_test), -1), yte, source, 32)
    return {"x_train": x_train, "y_train": ytr, "x_test": x_test, "y_test": yte, "source": source, "note": "",
            "images": rows, "classes": class_names(folder)}


def augment(x: torch.Tensor, gen: torch.Generator, pad: int = 4) -> torch.Tensor:
    """Each image flipped left-right with probability 1/2, then cut at a random offset out of a copy
    zero-padded by `pad` pixels on every side (zero is the mean after standardising)."""
    n, _, h, w = x.shape
    flip = (torch.rand(n, generator=gen) < 0.5).to(x.device)
    x = torch.where(flip[:, None, None, None], x.flip(3), x)
    padded = F.pad(x, (pad, pad, pad, pad))
    dy, dx = (torch.randint(0, 2 * pad + 1, (2, n), generator=gen)).to(x.device)
    rows = (dy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]       # (n, 1, h, 1)
    cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, None, :]       # (n, 1, 1, w)
    chans = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
    return padded[torch.arange(n, device=x.device)[:, None, None, None], chans, rows, cols]


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
              on_epoch: Any = None, augmented: bool = False) -> dict[str, list[float]]:
    """Adam over shuffled minibatches (each augmented when `augmented`); loss and accuracy on the test split
    after every epoch."""
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
            x = augment(xtr[idx], g) if augmented else xtr[idx]
            with c.autocast(device, precision):
                logits = model(x)
                loss = F.cross_entropy(logits.float(), ytr[idx])
            opt.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
            else:
                loss.backward()
                opt.step()
            seen += float(loss.detach()) * len(idx)
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


def mlp_row(ctx: Context, data: dict[str, Any], cfg: Config) -> dict[str, Any]:
    """B8's MLP on these images: its build's metrics when B8 ran on images of this size, else trained here
    (numpy, the same split, the pixels as one row per image)."""
    b8_metrics = Path(ctx.out_dir).parent / "B08-numpy-mlp" / "metrics.json"
    d = data["images"]
    if b8_metrics.is_file():
        try:
            m = json.loads(b8_metrics.read_text())["metrics"]
            if m["widths"][0] != d.x_train.shape[1]:
                raise ValueError("B8 ran on images of another size")
            return {"model": f"B8 MLP {'-'.join(map(str, m['widths']))} (numpy, from {b8_metrics.parent.name}/)",
                    "params": m["params"], "macs": sum(a * b for a, b in itertools.pairwise(m["widths"])),
                    "test_accuracy": m["test_accuracy"], "epochs": m["epochs"],
                    "seconds_per_epoch": m["seconds_per_epoch"], "n_train": m["n_train"], "source": "build"}
        except (KeyError, ValueError, TypeError) as e:
            ctx.log(f"{b8_metrics} does not fit these images ({e}); training B8's MLP here instead")
    widths = [d.x_train.shape[1], *cfg.mlp_widths[1:]]
    params = mlp.init(widths, np.random.default_rng(cfg.seed))
    hist = mlp.train(params, d, epochs=cfg.epochs, batch=cfg.batch, seed=cfg.seed, **MLP_SGD)
    return {"model": f"B8 MLP {'-'.join(map(str, widths))} (numpy, trained here)",
            "params": sum(W.size + b.size for W, b in params), "macs": sum(W.size for W, _ in params),
            "test_accuracy": hist["test_acc"][-1], "epochs": cfg.epochs,
            "seconds_per_epoch": float(np.median(hist["epoch_seconds"])), "n_train": len(d.x_train),
            "source": "here", "history": hist}


def run(ctx: Context) -> Output:
    from tiers.runner import Output, RunError

    cfg: Config = ctx.config
    device, precision = c.device_and_precision(ctx)
    torch.manual_seed(cfg.seed)
    try:
        data = load(cfg, ctx.log)
    except (DataError, FileNotFoundError) as e:
        raise RunError(f"B9: {e}") from None
    _, ch, side, _ = data["x_train"].shape
    augmented = cfg.augment if cfg.augment is not None else dataset_name(cfg) == "cifar-10"
    ctx.log(f"data: {data['source']}" + ("; training on random crops and flips" if augmented else ""))
    model = CNN(ch, side, cfg.widths, cfg.convs_per_stage, cfg.fc, cfg.classes).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    shape = costs.CNNShape((side, side), ch, tuple(cfg.widths), cfg.convs_per_stage, tuple(cfg.fc), cfg.classes)
    pred_params, macs, _ = costs.cnn_counts(shape)
    with ctx.progress(f"training CNN {cfg.widths} + {cfg.fc}", cfg.epochs) as bar:
        def on_epoch(e: int, h: dict[str, list[float]]) -> None:
            ctx.log(f"epoch {e + 1}: train loss {h['train_loss'][-1]:.4f}, test accuracy {h['test_acc'][-1]:.2%} "
                    f"({h['epoch_seconds'][-1]:.2f} s)")
            bar.advance()

        hist = train_cnn(model, data, cfg, device, precision, on_epoch, augmented)
    with ctx.progress("B8's MLP for comparison", None):
        baseline = mlp_row(ctx, data, cfg)
    cnn = {"model": f"B9 CNN {cfg.widths} x{cfg.convs_per_stage} + fc {cfg.fc} (torch)", "params": n_params,
           "macs": macs, "test_accuracy": hist["test_acc"][-1], "epochs": cfg.epochs,
           "seconds_per_epoch": float(np.median(hist["epoch_seconds"])), "n_train": len(data["x_train"])}
    metrics = {"data": data["source"], "dataset": dataset_name(cfg), "data_note": data["note"],
               "n_train": len(data["x_train"]), "n_test": len(data["x_test"]), "augmented": augmented,
               "params": n_params, "params_predicted": pred_params,
               "macs_per_sample": macs, "device": str(device), "precision": precision,
               "test_accuracy": hist["test_acc"][-1], "best_test_accuracy": max(hist["test_acc"]),
               "train_accuracy": hist["train_acc"][-1], "seconds_per_epoch": cnn["seconds_per_epoch"],
               "achieved_gflops": 6 * macs * len(data["x_train"]) / cnn["seconds_per_epoch"] / 1e9, "history": hist,
               "per_class_accuracy": per_class(model, data, device),
               "comparison": [cnn, {k: v for k, v in baseline.items() if k != "history"}]}
    plt = pyplot()
    plots = [curves_plot(plt, Path(ctx.out_dir) / "accuracy.png", hist, baseline),
             filters_plot(plt, Path(ctx.out_dir) / "filters.png", model)]
    vs = (f"; B8's MLP ({baseline['params']:,} parameters) reached {baseline['test_accuracy']:.2%} on "
          f"{'the same split' if baseline['source'] == 'here' else 'its own run'}")
    summary = (f"A CNN with {len(cfg.widths)} conv stages ({n_params:,} parameters, {macs / 1e6:.2f}M MACs per "
               f"image) reached **{hist['test_acc'][-1]:.2%} test accuracy** after {cfg.epochs:g} epochs on "
               f"{data['source'].split(' (')[0].split(':')[0]}{vs}.")
    return Output(metrics=metrics, summary=summary, report=report(metrics), plots=plots)


@torch.no_grad()
def per_class(model: nn.Module, data: dict[str, Any], device: torch.device) -> dict[str, float]:
    """Test accuracy of each class, by name (where a CNN confuses cats with dogs, it shows here)."""
    model.eval()
    x, y = torch.from_numpy(data["x_test"]), torch.from_numpy(data["y_test"])
    pred = torch.cat([model(x[i:i + 1000].to(device)).argmax(1).cpu() for i in range(0, len(x), 1000)])
    model.train()
    names = data["classes"]
    return {names[k] if k < len(names) else str(k): float((pred[y == k] == k).float().mean())
            for k in range(int(y.max()) + 1) if (y == k).any()}


# ---------------------------------------------------------------- plots and the report

def curves_plot(plt: Any, path: Path, h: dict[str, list[float]], baseline: dict[str, Any]) -> str:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ep = np.arange(1, len(h["test_acc"]) + 1)
    ax.plot(ep, np.asarray(h["test_acc"]) * 100, "s-", label="CNN test")
    ax.plot(ep, np.asarray(h["train_acc"]) * 100, "o--", alpha=0.6, label="CNN train (during the epoch)")
    if "history" in baseline:
        ax.plot(ep, np.asarray(baseline["history"]["test_acc"]) * 100, "^-", label="B8 MLP test (same split)")
    else:
        ax.axhline(baseline["test_accuracy"] * 100, ls="--", color="grey", label="B8 MLP test (its build)")
    c.finish_plot(fig, ax, path, "epoch", "accuracy (%)", "B9: CNN vs B8's MLP")
    return f"{path.name}: test accuracy per epoch, CNN and MLP"


def filters_plot(plt: Any, path: Path, model: CNN) -> str:
    w = model.features[0].weight.detach().cpu().float().numpy()   # (out, in, 3, 3)
    n = min(16, w.shape[0])
    fig, axes = plt.subplots(2, 8, figsize=(9, 3.2))
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i < n and w.shape[1] == 3:      # colour images: each filter as the colour it responds to most
            f = w[i].transpose(1, 2, 0)
            ax.imshow((f - f.min()) / (np.ptp(f) or 1))
        elif i < n:
            f = w[i].mean(0)
            lim = np.abs(f).max() or 1
            ax.imshow(f, cmap="RdBu_r", vmin=-lim, vmax=lim)
    fig.suptitle("first-layer 3x3 filters " + ("(as colours, scaled to the full range)" if w.shape[1] == 3 else
                                               "(red: weight > 0, blue: < 0)"), fontsize=9)
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
           f"{m['device']} ({m['precision']})" + (" on random crops and horizontal flips of the training images "
                                                  "(the MLP on the images as they are)" if m["augmented"] else "")
           + f"; {m['achieved_gflops']:.2f} GFLOP/s achieved (6 FLOPs per MAC per sample)."),
           "", "Test accuracy per class: " + ", ".join(f"{k} {v:.0%}" for k, v in m["per_class_accuracy"].items()) + ".",
           "", "| epoch | train loss | train acc | test loss | test acc | seconds |", "|---|---|---|---|---|---|"]
    h = m["history"]
    out += [f"| {i + 1} | {h['train_loss'][i]:.4f} | {h['train_acc'][i]:.2%} | {h['test_loss'][i]:.4f} | "
            f"{h['test_acc'][i]:.2%} | {h['epoch_seconds'][i]:.2f} |" for i in range(len(h["test_acc"]))]
    return "\n".join(out)

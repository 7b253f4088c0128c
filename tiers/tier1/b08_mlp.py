"""B8: a multilayer perceptron in numpy, with backpropagation written by hand.

    x (B, 784) ─► z1 = x W1 + b1 ─► a1 = relu(z1) ─► ... ─► logits = a_L-1 W_L + b_L (B, 10)
    loss = mean over the batch of -log softmax(logits)[label]

    1. check the backward pass against finite differences (mlp.gradient_check)
    2. train: minibatch SGD with momentum, lr decaying linearly (mlp.train)
    3. plot the loss, the accuracy and what the first layer's units look for; report

The network itself, forward, backward, loss and optimiser, is `models/mlp.py`:
about 150 lines with nothing hidden (B9 trains the same MLP as its baseline).

Data: MNIST through the dataset registry (`tierkit data fetch mnist`). With only
MNIST's 10,000-digit test split at hand, it trains on 8,000 of them and tests on
the other 2,000; with no MNIST at all it falls back to scikit-learn's bundled
8x8 digits (1,797 images) and says so. The README names what it used.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated, Any, Literal

import numpy as np
from annotated_types import Ge, Gt

from models import mlp
from tiers.data import load_images
from tiers.report import pyplot, save

if TYPE_CHECKING:
    from tiers.runner import Context, Output


@dataclass
class Config:
    widths: list[int] = field(default_factory=lambda: [784, 128, 10])  # the first is replaced by the data's pixels
    epochs: Annotated[int, Gt(0)] = 10
    batch: Annotated[int, Gt(0)] = 64
    samples: Annotated[int, Gt(0)] = 60000          # training images used (MNIST has 60,000)
    data: str = "MNIST"                              # MNIST | Fashion-MNIST | digits (scikit-learn's 8x8)
    data_path: str | None = None                     # a folder with the IDX files, before the registry's places
    optimizer: Literal["sgd", "momentum"] = "momentum"
    lr: Annotated[float, Gt(0)] = 0.05
    momentum: Annotated[float, Ge(0)] = 0.9
    lr_final: Annotated[float, Ge(0)] = 0.1          # lr decays linearly to lr x lr_final
    seed: int = 0
    gradcheck_samples: Annotated[int, Gt(0)] = 8     # float64 finite differences: a few samples are plenty
    gradcheck_entries: Annotated[int, Gt(0)] = 20    # entries checked per tensor


def run(ctx: Context) -> Output:
    from tiers.runner import Output

    cfg: Config = ctx.config
    d = load_images(cfg.data, cfg.samples, cfg.seed, cfg.data_path, ctx.log)
    widths = [d.x_train.shape[1], *cfg.widths[1:-1], cfg.widths[-1]]  # 64 inputs for 8x8 digits
    ctx.log(f"data: {d.source}")

    # 1. is the backward pass right? (float64, random entries of every tensor)
    n = cfg.gradcheck_samples
    gc = mlp.gradient_check(widths, d.x_train[:n], d.y_train[:n], cfg.gradcheck_entries, seed=cfg.seed)
    ctx.log(f"gradient check: max relative error {gc['max_rel_error']:.2e} over "
            f"{sum(r['checked'] for r in gc['per_tensor'])} entries (backprop vs finite differences)")

    # 2. train
    params = mlp.init(widths, np.random.default_rng(cfg.seed))
    n_params = sum(W.size + b.size for W, b in params)
    with ctx.progress(f"training {'-'.join(map(str, widths))}", cfg.epochs) as bar:
        def on_epoch(e: int, h: dict[str, list[float]]) -> None:
            ctx.log(f"epoch {e + 1}: train loss {h['train_loss'][-1]:.4f}, test accuracy {h['test_acc'][-1]:.2%} "
                    f"({h['epoch_seconds'][-1]:.2f} s)")
            bar.advance()

        hist = mlp.train(params, d, epochs=cfg.epochs, batch=cfg.batch, lr=cfg.lr, momentum=cfg.momentum,
                         lr_final=cfg.lr_final, optimizer=cfg.optimizer, seed=cfg.seed, on_epoch=on_epoch)

    n_train, n_test, source, side, note = len(d.x_train), len(d.x_test), d.source, d.side, d.note
    del d  # the plots need only the history and the weights: no reason to hold the data while drawing
    sec_epoch = float(np.median(hist["epoch_seconds"]))
    flop_epoch = 6 * sum(W.size for W, _ in params) * n_train  # 2 forward + 4 backward per weight per sample
    metrics = {
        "data": source, "data_note": note, "n_train": n_train, "n_test": n_test, "widths": widths,
        "params": n_params, "epochs": cfg.epochs, "batch": cfg.batch, "optimizer": cfg.optimizer,
        "lr": cfg.lr, "momentum": cfg.momentum,
        "test_accuracy": hist["test_acc"][-1], "best_test_accuracy": max(hist["test_acc"]),
        "train_accuracy": hist["train_acc"][-1], "test_loss": hist["test_loss"][-1],
        "gradient_check": gc, "seconds_per_epoch": sec_epoch,
        "achieved_gflops": flop_epoch / sec_epoch / 1e9,
        "history": {k: v for k, v in hist.items() if k != "step_loss"},
    }

    # 3. plots and the report
    plt = pyplot()
    plots = [curves_plot(plt, ctx.out_dir / "loss.png", hist, "loss"),
             curves_plot(plt, ctx.out_dir / "accuracy.png", hist, "accuracy")]
    plots.append(weights_plot(plt, ctx.out_dir / "first_layer.png", params[0][0], side))
    summary = (f"A {'-'.join(map(str, widths))} MLP ({n_params:,} parameters), trained in numpy with backprop "
               f"written by hand, reached **{hist['test_acc'][-1]:.2%} test accuracy** after {cfg.epochs:g} epochs "
               f"on {source.split(':')[0]}. The gradient check agrees with finite differences to a relative error "
               f"of {gc['max_rel_error']:.1e}.")
    # trained on fewer samples than planned (the offline 10k split, or the 8x8 fallback): no calibration
    return Output(metrics=metrics, summary=summary, report=report(metrics), plots=plots,
                  calibrate=n_train >= 0.9 * cfg.samples)


def curves_plot(plt: Any, path: Any, h: dict[str, list[float]], what: str) -> str:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    epochs = np.arange(1, len(h["test_acc"]) + 1)
    if what == "loss":
        steps = np.asarray(h["step_loss"])
        per = len(steps) / len(epochs)
        k = max(1, len(steps) // 200)  # a running mean over ~1/200 of training, so the trend shows
        smooth = np.convolve(steps, np.ones(k) / k, mode="valid")
        ax.plot((np.arange(len(smooth)) + k) / per, smooth, lw=1, alpha=0.7, label="training batches (running mean)")
        ax.plot(epochs, h["train_loss"], "o-", label="train (mean over the epoch)")
        ax.plot(epochs, h["test_loss"], "s-", label="test (end of epoch)")
        ax.set_yscale("log")
        ax.set_ylabel("cross-entropy loss")
    else:
        ax.plot(epochs, np.asarray(h["train_acc"]) * 100, "o-", label="train (during the epoch)")
        ax.plot(epochs, np.asarray(h["test_acc"]) * 100, "s-", label="test")
        ax.set_ylabel("accuracy (%)")
        ax.set_ylim(max(0, 100 * min(h["test_acc"] + h["train_acc"]) - 5), 100)
    ax.set_xlabel("epoch")
    ax.set_title(f"numpy MLP: {what}", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    save(fig, path)
    return f"{path.name}: {what} per epoch, train and test"


def weights_plot(plt: Any, path: Any, W1: np.ndarray, side: int) -> str:
    """The first layer's weights into 16 hidden units, drawn as images: the strokes each unit looks for."""
    n = min(16, W1.shape[1])
    fig, axes = plt.subplots(2, 8, figsize=(9, 3.2))
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i < n:
            w = W1[:, i].reshape(side, side)
            lim = np.abs(w).max()
            ax.imshow(w, cmap="RdBu_r", vmin=-lim, vmax=lim)
    fig.suptitle("first-layer weights of 16 hidden units (red: pixel excites, blue: inhibits)", fontsize=9)
    save(fig, path)
    return f"{path.name}: what 16 hidden units respond to"


def report(m: dict[str, Any]) -> str:
    gc = m["gradient_check"]
    out = ["## Data", "", m["data"] + (f". Note: {m['data_note']}." if m["data_note"] else ""), "",
           "## Result", "",
           f"- network: {'-'.join(map(str, m['widths']))}, {m['params']:,} parameters, ReLU, softmax cross-entropy",
           (f"- training: {m['epochs']:g} epochs, batch {m['batch']}, {m['optimizer']} (lr {m['lr']:g}, "
           f"momentum {m['momentum']:g}), lr decaying linearly"),
           (f"- test accuracy: **{m['test_accuracy']:.2%}** (best epoch {m['best_test_accuracy']:.2%}); "
           f"train accuracy {m['train_accuracy']:.2%}"),
           (f"- speed: {m['seconds_per_epoch']:.3g} s per epoch, {m['achieved_gflops']:.3g} GFLOP/s achieved "
           "(6 FLOPs per weight per sample)"), "",
           "| epoch | train loss | train acc | test loss | test acc | seconds |", "|---|---|---|---|---|---|"]
    h = m["history"]
    for i in range(len(h["test_acc"])):
        out.append(f"| {i + 1} | {h['train_loss'][i]:.4f} | {h['train_acc'][i]:.2%} | {h['test_loss'][i]:.4f} | "
                   f"{h['test_acc'][i]:.2%} | {h['epoch_seconds'][i]:.2f} |")
    out += ["", "## Gradient check", "",
            (f"Backprop's gradients against central differences (eps {gc['eps']:g}, float64, {gc['samples']} "
             f"samples), on randomly chosen entries of every tensor. Worst relative error: "
             f"**{gc['max_rel_error']:.1e}** (right: below ~1e-6; a bug shows as ~1)."), "",
            "| tensor | shape | entries | max relative error |", "|---|---|---|---|"]
    out += [f"| {r['tensor']} | {r['shape']} | {r['checked']} | {r['max_rel_error']:.1e} |" for r in gc["per_tensor"]]
    return "\n".join(out)

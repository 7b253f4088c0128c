"""B8: a multilayer perceptron in numpy, with backpropagation written by hand.

    x (B, 784) ─► z1 = x W1 + b1 ─► a1 = relu(z1) ─► ... ─► logits = a_L-1 W_L + b_L (B, 10)
    loss = mean over the batch of -log softmax(logits)[label]

Everything a framework would hide is below: the forward pass, the loss, the
backward pass (the chain rule, one layer at a time, in reverse), the update
(SGD or SGD with momentum), and a gradient check that compares the backward
pass with finite differences, which is how you know it is right.

Data: MNIST through the dataset registry (`tierkit data fetch mnist`). With only
MNIST's 10,000-digit test split at hand, it trains on 8,000 of them and tests on
the other 2,000; with no MNIST at all it falls back to scikit-learn's bundled
8x8 digits (1,797 images) and says so. The README names what it used.
"""
from __future__ import annotations

import itertools
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from tiers.tier1.common import save

if TYPE_CHECKING:
    from tiers.runner import Context, Output

DEFAULTS: dict[str, Any] = {
    "widths": [784, 128, 10], "epochs": 10, "batch": 64, "samples": 60000, "data": "MNIST",
    "optimizer": "momentum", "lr": 0.05, "momentum": 0.9, "lr_final": 0.1,  # lr decays linearly to lr x lr_final
    "seed": 0, "gradcheck_samples": 8, "gradcheck_entries": 20,
}

# ---------------------------------------------------------------- the model: a list of (W, b)

Params = list[tuple[np.ndarray, np.ndarray]]


def init(widths: list[int], rng: np.random.Generator, dtype: Any = np.float32) -> Params:
    """He initialisation: W ~ N(0, 2/fan_in) keeps the variance of ReLU activations constant with depth."""
    return [((rng.standard_normal((n_in, n_out)) * np.sqrt(2.0 / n_in)).astype(dtype), np.zeros(n_out, dtype))
            for n_in, n_out in itertools.pairwise(widths)]


def forward(params: Params, x: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
    """The logits, and every layer's input (the backward pass needs them)."""
    acts = [x]
    for i, (W, b) in enumerate(params):
        z = acts[-1] @ W + b
        acts.append(np.maximum(z, 0) if i < len(params) - 1 else z)  # ReLU on hidden layers only
    return acts[-1], acts[:-1]


def softmax_cross_entropy(logits: np.ndarray, y: np.ndarray) -> tuple[float, np.ndarray]:
    """Mean -log p[y] and its gradient with respect to the logits: (softmax - onehot) / B.

    Subtracting the row max before exp changes nothing mathematically (it cancels in
    the ratio) but keeps exp from overflowing. The gradient is this simple because
    the softmax's Jacobian and the log's derivative cancel: the reason the pair is
    always used together.
    """
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_p = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    n = len(y)
    loss = -log_p[np.arange(n), y].mean()
    grad = np.exp(log_p)
    grad[np.arange(n), y] -= 1
    return float(loss), grad / n


def backward(params: Params, acts: list[np.ndarray], dlogits: np.ndarray) -> Params:
    """The chain rule, last layer first. For z = a W + b:  dW = a^T dz,  db = sum dz,  da = dz W^T."""
    grads = []
    d = dlogits
    for i in range(len(params) - 1, -1, -1):
        W, _ = params[i]
        a = acts[i]
        grads.append((a.T @ d, d.sum(axis=0)))
        if i > 0:
            d = (d @ W.T) * (a > 0)  # through ReLU: the gradient passes where the unit was active
    return grads[::-1]


def loss_and_grads(params: Params, x: np.ndarray, y: np.ndarray) -> tuple[float, Params]:
    logits, acts = forward(params, x)
    loss, dlogits = softmax_cross_entropy(logits, y)
    return loss, backward(params, acts, dlogits)


@dataclass
class SGD:
    """v = momentum * v - lr * g;  p += v.  momentum=0 is plain SGD."""

    lr: float
    momentum: float = 0.0

    def __post_init__(self) -> None:
        self.velocity: list[np.ndarray] | None = None

    def step(self, params: Params, grads: Params) -> None:
        flat_p = [t for pair in params for t in pair]
        flat_g = [t for pair in grads for t in pair]
        if self.velocity is None:
            self.velocity = [np.zeros_like(p) for p in flat_p]
        for p, g, v in zip(flat_p, flat_g, self.velocity):
            v *= self.momentum
            v -= self.lr * g
            p += v  # in place: the arrays in `params` are updated


def accuracy(params: Params, x: np.ndarray, y: np.ndarray, batch: int = 2000) -> tuple[float, float]:
    """(mean loss, accuracy) over a data set, in batches so a big test set does not hold every activation."""
    losses, correct = 0.0, 0
    for i in range(0, len(x), batch):
        logits, _ = forward(params, x[i:i + batch])
        loss, _ = softmax_cross_entropy(logits, y[i:i + batch])
        losses += loss * len(logits)
        correct += int((logits.argmax(axis=1) == y[i:i + batch]).sum())
    return losses / len(x), correct / len(x)


# ---------------------------------------------------------------- is the backward pass right?

def gradient_check(widths: list[int], x: np.ndarray, y: np.ndarray, entries: int = 20, eps: float = 1e-5,
                   seed: int = 0) -> dict[str, Any]:
    """Compare backprop with central differences (L(p+eps) - L(p-eps)) / 2 eps, in float64.

    Every parameter tensor gets `entries` randomly chosen entries checked. The
    relative error |a - n| / max(|a| + |n|, tiny) is ~1e-7 or smaller when the
    backward pass is right, and ~1 where it is wrong.
    """
    rng = np.random.default_rng(seed)
    params = init(widths, rng, np.float64)
    for _, b in params:
        b[:] = rng.standard_normal(b.shape) * 0.1  # non-zero biases, so their gradients are checked too
    x = x.astype(np.float64)
    _, grads = loss_and_grads(params, x, y)
    worst, rows = 0.0, []
    for li, (pair, gpair) in enumerate(zip(params, grads)):
        for name, p, g in (("W", pair[0], gpair[0]), ("b", pair[1], gpair[1])):
            idx = rng.choice(p.size, size=min(entries, p.size), replace=False)
            errs = []
            for k in idx:
                old = p.flat[k]
                p.flat[k] = old + eps
                up, _ = loss_and_grads(params, x, y)
                p.flat[k] = old - eps
                down, _ = loss_and_grads(params, x, y)
                p.flat[k] = old
                numeric, analytic = (up - down) / (2 * eps), g.flat[k]
                errs.append(abs(analytic - numeric) / max(abs(analytic) + abs(numeric), 1e-12))
            rows.append({"tensor": f"{name}{li + 1}", "shape": list(p.shape), "checked": len(idx),
                         "max_rel_error": float(max(errs))})
            worst = max(worst, max(errs))
    return {"max_rel_error": worst, "per_tensor": rows, "eps": eps, "samples": len(x)}


# ---------------------------------------------------------------- data

@dataclass
class Data:
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    source: str              # what it is, for the README
    side: int                # images are side x side
    note: str = ""           # how to get more, when this is not the full data set


def pixels(x: np.ndarray) -> np.ndarray:
    """uint8 images (n, 28, 28) -> float32 rows (n, 784) in [0, 1], with one copy."""
    out = x.reshape(len(x), -1).astype(np.float32)
    out /= 255
    return out


def load_data(cfg: dict[str, Any], log: Any = print) -> Data:
    """MNIST (or Fashion-MNIST) from the registry; the 10k test split alone; else scikit-learn's digits."""
    from tiers import data

    rng = np.random.default_rng(cfg["seed"])
    name = "fashion-mnist" if "fashion" in str(cfg["data"]).lower() else "mnist"
    splits = data.load_idx_splits(name, cfg.get("data_path")) if str(cfg["data"]).lower() != "digits" else {}
    n = int(cfg["samples"])
    if "train" in splits and "test" in splits:
        tr, te = splits["train"], splits["test"]
        return Data(pixels(tr.x[:n]), tr.y[:n].astype(np.int64), pixels(te.x), te.y.astype(np.int64),
                    f"{data.get(name).title}: {min(n, len(tr.x)):,} training and {len(te.x):,} test images "
                    f"({tr.files[0]})", 28)
    if "test" in splits:
        te = splits["test"]
        order = rng.permutation(len(te.x))
        cut = int(0.8 * len(order))
        tr_idx, te_idx = order[:cut][:n], order[cut:]
        note = (f"only the 10,000-image test split is here; run `tierkit data fetch {name}` for the 60,000 "
                "training images")
        log(f"{name}: {note}")
        return Data(pixels(te.x[tr_idx]), te.y[tr_idx].astype(np.int64), pixels(te.x[te_idx]),
                    te.y[te_idx].astype(np.int64),
                    f"{data.get(name).title}, test split only ({te.files[0]}): {len(tr_idx):,} images to train, "
                    f"{len(te_idx):,} held out to test", 28, note)
    x, y = sklearn_digits()
    if x is None:
        raise data.DataError(data.missing_message(name, cfg.get("data_path"))
                             + " (or pip install scikit-learn for the embedded 8x8 digits)")
    note = ""
    if str(cfg["data"]).lower() != "digits":
        note = f"{data.missing_message(name, cfg.get('data_path'))}; trained on scikit-learn's bundled 8x8 digits"
        log(note)
    order = rng.permutation(len(x))
    cut = int(0.8 * len(x))
    return Data(x[order[:cut]], y[order[:cut]], x[order[cut:]], y[order[cut:]],
                f"scikit-learn's bundled digits (8x8, 1,797 images; the embedded fallback): {cut:,} to train, "
                f"{len(x) - cut:,} to test", 8, note)


def sklearn_digits() -> tuple[np.ndarray, np.ndarray] | tuple[None, None]:
    """scikit-learn's bundled 8x8 digits (pixels 0..16), read from its CSV without importing scikit-learn
    (which would load scipy: ~70 MB for a 0.5 MB file)."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("sklearn")
    if spec is None or spec.origin is None:
        return None, None
    csv = Path(spec.origin).parent / "datasets" / "data" / "digits.csv.gz"
    if csv.is_file():
        table = np.loadtxt(csv, delimiter=",", dtype=np.float32)
        return table[:, :-1] / np.float32(16), table[:, -1].astype(np.int64)
    from sklearn.datasets import load_digits

    digits = load_digits()
    return (digits.data / 16.0).astype(np.float32), digits.target.astype(np.int64)


# ---------------------------------------------------------------- training

def train(params: Params, d: Data, cfg: dict[str, Any], on_epoch: Any = None) -> dict[str, Any]:
    """Minibatch SGD over shuffled epochs; the learning rate decays linearly to lr x lr_final."""
    if cfg["optimizer"] not in ("sgd", "momentum"):
        raise ValueError(f"B8 writes SGD and momentum by hand; optimizer {cfg['optimizer']!r} is not one of them")
    opt = SGD(cfg["lr"], cfg["momentum"] if cfg["optimizer"] == "momentum" else 0.0)
    rng = np.random.default_rng(cfg["seed"] + 1)
    epochs, batch = int(cfg["epochs"]), int(cfg["batch"])
    steps_per_epoch = -(-len(d.x_train) // batch)
    total, step = epochs * steps_per_epoch, 0
    hist: dict[str, list[float]] = {"step_loss": [], "train_loss": [], "train_acc": [], "test_loss": [],
                                    "test_acc": [], "epoch_seconds": [], "lr": []}
    for epoch in range(epochs):
        t0 = time.perf_counter()
        order = rng.permutation(len(d.x_train))
        seen_loss, seen_correct = 0.0, 0
        for i in range(0, len(order), batch):
            idx = order[i:i + batch]
            xb, yb = d.x_train[idx], d.y_train[idx]
            logits, acts = forward(params, xb)
            loss, dlogits = softmax_cross_entropy(logits, yb)
            grads = backward(params, acts, dlogits)
            opt.lr = cfg["lr"] * (1 - (1 - cfg["lr_final"]) * step / total)
            opt.step(params, grads)
            step += 1
            seen_loss += loss * len(idx)
            seen_correct += int((logits.argmax(axis=1) == yb).sum())
            hist["step_loss"].append(loss)
        hist["epoch_seconds"].append(time.perf_counter() - t0)
        hist["train_loss"].append(seen_loss / len(order))
        hist["train_acc"].append(seen_correct / len(order))
        test_loss, test_acc = accuracy(params, d.x_test, d.y_test)
        hist["test_loss"].append(test_loss)
        hist["test_acc"].append(test_acc)
        hist["lr"].append(opt.lr)
        if on_epoch:
            on_epoch(epoch, hist)
    return hist


# ---------------------------------------------------------------- the milestone

def run(ctx: Context) -> Output:
    from tiers.runner import Output

    cfg = {**DEFAULTS, **ctx.config}
    d = load_data(cfg, ctx.log)
    widths = [d.x_train.shape[1], *cfg["widths"][1:-1], cfg["widths"][-1]]  # 64 inputs for 8x8 digits
    ctx.log(f"data: {d.source}")

    gc = gradient_check(widths, d.x_train[:cfg["gradcheck_samples"]], d.y_train[:cfg["gradcheck_samples"]],
                        cfg["gradcheck_entries"], seed=cfg["seed"])
    ctx.log(f"gradient check: max relative error {gc['max_rel_error']:.2e} over "
            f"{sum(r['checked'] for r in gc['per_tensor'])} entries (backprop vs finite differences)")

    params = init(widths, np.random.default_rng(cfg["seed"]))
    n_params = sum(W.size + b.size for W, b in params)
    with ctx.progress(f"training {'-'.join(map(str, widths))}", cfg["epochs"]) as bar:
        def on_epoch(e: int, h: dict[str, list[float]]) -> None:
            ctx.log(f"epoch {e + 1}: train loss {h['train_loss'][-1]:.4f}, test accuracy {h['test_acc'][-1]:.2%} "
                    f"({h['epoch_seconds'][-1]:.2f} s)")
            bar.advance()

        hist = train(params, d, cfg, on_epoch)

    n_train, n_test, source, side, note = len(d.x_train), len(d.x_test), d.source, d.side, d.note
    del d  # the plots need only the history and the weights: no reason to hold the data while drawing
    sec_epoch = float(np.median(hist["epoch_seconds"]))
    flop_epoch = 6 * sum(W.size for W, _ in params) * n_train  # 2 forward + 4 backward per weight per sample
    metrics = {
        "data": source, "data_note": note, "n_train": n_train, "n_test": n_test, "widths": widths,
        "params": n_params, "epochs": cfg["epochs"], "batch": cfg["batch"], "optimizer": cfg["optimizer"],
        "lr": cfg["lr"], "momentum": cfg["momentum"],
        "test_accuracy": hist["test_acc"][-1], "best_test_accuracy": max(hist["test_acc"]),
        "train_accuracy": hist["train_acc"][-1], "test_loss": hist["test_loss"][-1],
        "gradient_check": gc, "seconds_per_epoch": sec_epoch,
        "achieved_gflops": flop_epoch / sec_epoch / 1e9,
        "history": {k: v for k, v in hist.items() if k != "step_loss"},
    }

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots = [curves_plot(plt, ctx.out_dir / "loss.png", hist, "loss"),
             curves_plot(plt, ctx.out_dir / "accuracy.png", hist, "accuracy")]
    plots.append(weights_plot(plt, ctx.out_dir / "first_layer.png", params[0][0], side))
    summary = (f"A {'-'.join(map(str, widths))} MLP ({n_params:,} parameters), trained in numpy with backprop "
               f"written by hand, reached **{hist['test_acc'][-1]:.2%} test accuracy** after {cfg['epochs']:g} epochs "
               f"on {source.split(':')[0]}. The gradient check agrees with finite differences to a relative error "
               f"of {gc['max_rel_error']:.1e}.")
    # trained on fewer samples than planned (the offline 10k split, or the 8x8 fallback): no calibration
    planned = int(ctx.config.get("samples") or 0)
    return Output(metrics=metrics, summary=summary, report=report(metrics), plots=plots,
                  calibrate=not planned or n_train >= 0.9 * planned)


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

"""A multilayer perceptron in numpy, with backpropagation written by hand (B8 trains it; B9 compares with it).

    x (B, 784) ─► z1 = x W1 + b1 ─► a1 = relu(z1) ─► ... ─► logits = a_L-1 W_L + b_L (B, 10)
    loss = mean over the batch of -log softmax(logits)[label]
    backward: for z = a W + b, dW = a^T dz, db = sum dz, da = dz W^T, layer by layer in reverse

Everything a framework would hide is here: the forward pass, the loss, the
backward pass (the chain rule, one layer at a time), the update (SGD or SGD with
momentum), and a gradient check against finite differences, which is how you
know the backward pass is right.
"""
from __future__ import annotations

import itertools
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

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


# ---------------------------------------------------------------- training

def train(params: Params, d: Any, *, epochs: int, batch: int, lr: float, momentum: float = 0.9,
          lr_final: float = 0.1, optimizer: str = "momentum", seed: int = 0, on_epoch: Any = None) -> dict[str, Any]:
    """Minibatch SGD over shuffled epochs on d.x_train/d.y_train, tested on d.x_test/d.y_test after each.

    The learning rate decays linearly from lr to lr x lr_final. Returns the history:
    per-step loss, per-epoch train/test loss and accuracy, seconds and lr.
    """
    if optimizer not in ("sgd", "momentum"):
        raise ValueError(f"the MLP's optimisers are written by hand: sgd or momentum, not {optimizer!r}")
    opt = SGD(lr, momentum if optimizer == "momentum" else 0.0)
    rng = np.random.default_rng(seed + 1)
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
            opt.lr = lr * (1 - (1 - lr_final) * step / total)
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

"""B10: attention in numpy. One head, forward and backward by hand, nothing hidden.

    x ──► Q = x Wq, K = x Wk, V = x Wv ──► scores = Q Kᵀ / √d ──► (causal mask) ──► softmax ──► A
                                                                                    out = A V

1. The head on a toy sentence, its attention matrix as a heatmap: with and
   without the causal mask (a token may look only at itself and the past).
2. The same head *learns*: token + position embeddings, one head, a linear
   read-out, trained with Adam on a toy task (reverse the sequence). Reversing
   needs position i to fetch the token at position T-1-i, so the learned
   attention matrix becomes an anti-diagonal: you can watch what it learned.
3. The hand-written backward pass is checked against finite differences.

The test (tests/test_tier1_b2_b3_b10_b15.py) checks `attention` against
torch.nn.functional.scaled_dot_product_attention, with and without the mask,
and the gradients against torch's autograd.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any

import numpy as np
from annotated_types import Gt

from tiers.report import md_table, pyplot, save

if TYPE_CHECKING:
    from tiers.runner import Context, Output


@dataclass
class Config:
    vocab_size: Annotated[int, Gt(0)] = 16   # tokens the toy sequences are drawn from
    block_size: Annotated[int, Gt(0)] = 8    # sequence length T: the head learns to reverse T tokens
    n_embd: Annotated[int, Gt(0)] = 32       # d: the width of embeddings, queries, keys and values
    batch_size: Annotated[int, Gt(0)] = 32
    steps: Annotated[int, Gt(0)] = 1500
    lr: Annotated[float, Gt(0)] = 1e-2       # Adam's
    seed: int = 0


TOY_SENTENCE = "the cat sat on the mat because the cat was tired"


# ---------------------------------------------------------------- the head

def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    x = x - x.max(axis=axis, keepdims=True)   # exp of a large score overflows; shifting changes nothing
    e = np.exp(x)
    return e / e.sum(axis=axis, keepdims=True)


def causal_mask(T: int) -> np.ndarray:
    """True where query i may look at key j: j <= i."""
    return np.tril(np.ones((T, T), dtype=bool))


def scaled_dot_product(q: np.ndarray, k: np.ndarray, v: np.ndarray,
                       causal: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """softmax(Q Kᵀ / √d) V over the last two axes; returns (output, attention weights).

    Dividing by √d keeps the scores' spread independent of d: without it, dot
    products of d-dimensional vectors grow like √d and the softmax saturates.
    """
    d = q.shape[-1]
    scores = q @ np.swapaxes(k, -1, -2) / np.sqrt(d)          # (..., T, T)
    if causal:
        scores = np.where(causal_mask(scores.shape[-1]), scores, -np.inf)  # exp(-inf) = 0: no weight
    weights = softmax(scores)
    return weights @ v, weights


def attention(x: np.ndarray, wq: np.ndarray, wk: np.ndarray, wv: np.ndarray,
              causal: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """One head: project x (..., T, d_model) to queries, keys and values, then scaled dot product."""
    return scaled_dot_product(x @ wq, x @ wk, x @ wv, causal)


# ---------------------------------------------------------------- the head, learning

@dataclass
class Head:
    """Embeddings -> one attention head -> read-out to the vocabulary."""

    E: np.ndarray    # (V, d) token embeddings
    P: np.ndarray    # (T, d) position embeddings
    Wq: np.ndarray   # (d, d)
    Wk: np.ndarray
    Wv: np.ndarray
    Wo: np.ndarray   # (d, V) read-out

    @classmethod
    def init(cls, vocab: int, T: int, d: int, rng: np.random.Generator) -> Head:
        s = 1 / np.sqrt(d)
        return cls(rng.normal(0, 1, (vocab, d)), rng.normal(0, 1, (T, d)), rng.normal(0, s, (d, d)),
                   rng.normal(0, s, (d, d)), rng.normal(0, s, (d, d)), rng.normal(0, s, (d, vocab)))

    def params(self) -> dict[str, np.ndarray]:
        return {"E": self.E, "P": self.P, "Wq": self.Wq, "Wk": self.Wk, "Wv": self.Wv, "Wo": self.Wo}

    def forward(self, tokens: np.ndarray, causal: bool = False) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """tokens (B, T) -> logits (B, T, V), and what the backward pass needs."""
        x = self.E[tokens] + self.P[: tokens.shape[1]]
        q, k, v = x @ self.Wq, x @ self.Wk, x @ self.Wv
        h, a = scaled_dot_product(q, k, v, causal)
        return h @ self.Wo, {"tokens": tokens, "x": x, "q": q, "k": k, "v": v, "a": a, "h": h}


def cross_entropy(logits: np.ndarray, targets: np.ndarray) -> tuple[float, np.ndarray]:
    """Mean loss over every position, and d loss / d logits."""
    p = softmax(logits)
    n = targets.size
    flat = p.reshape(n, -1)
    loss = -np.log(flat[np.arange(n), targets.ravel()] + 1e-12).mean()
    grad = flat.copy()
    grad[np.arange(n), targets.ravel()] -= 1
    return float(loss), (grad / n).reshape(p.shape)


def backward(head: Head, cache: dict[str, np.ndarray], dlogits: np.ndarray) -> dict[str, np.ndarray]:
    """Gradients of the loss for every parameter, by the chain rule, step by step back through forward."""
    x, q, k, v, a, h = (cache[n] for n in ("x", "q", "k", "v", "a", "h"))
    d = q.shape[-1]
    g: dict[str, np.ndarray] = {}
    g["Wo"] = np.einsum("btd,btv->dv", h, dlogits)        # logits = h Wo
    dh = dlogits @ head.Wo.T
    da = dh @ np.swapaxes(v, -1, -2)                       # h = a v
    dv = np.swapaxes(a, -1, -2) @ dh
    # softmax: ds_j = a_j (da_j - sum_k a_k da_k); masked entries have a = 0, so they get no gradient
    ds = a * (da - (da * a).sum(-1, keepdims=True)) / np.sqrt(d)
    dq = ds @ k                                            # scores = q kᵀ / √d
    dk = np.swapaxes(ds, -1, -2) @ q
    g["Wq"] = np.einsum("btd,bte->de", x, dq)
    g["Wk"] = np.einsum("btd,bte->de", x, dk)
    g["Wv"] = np.einsum("btd,bte->de", x, dv)
    dx = dq @ head.Wq.T + dk @ head.Wk.T + dv @ head.Wv.T
    g["P"] = np.zeros_like(head.P)
    g["P"][: x.shape[1]] = dx.sum(0)                       # x = E[tokens] + P
    g["E"] = np.zeros_like(head.E)
    np.add.at(g["E"], cache["tokens"], dx)                 # a token used twice gets both gradients
    return g


class Adam:
    def __init__(self, params: dict[str, np.ndarray], lr: float, betas: tuple[float, float] = (0.9, 0.99)):
        self.lr, self.b1, self.b2, self.t = lr, betas[0], betas[1], 0
        self.m = {n: np.zeros_like(p) for n, p in params.items()}
        self.v = {n: np.zeros_like(p) for n, p in params.items()}

    def step(self, params: dict[str, np.ndarray], grads: dict[str, np.ndarray]) -> None:
        self.t += 1
        for n, p in params.items():
            self.m[n] = self.b1 * self.m[n] + (1 - self.b1) * grads[n]
            self.v[n] = self.b2 * self.v[n] + (1 - self.b2) * grads[n] ** 2
            m_hat = self.m[n] / (1 - self.b1 ** self.t)
            v_hat = self.v[n] / (1 - self.b2 ** self.t)
            p -= self.lr * m_hat / (np.sqrt(v_hat) + 1e-8)     # in place: the Head sees the update


def reverse_batch(rng: np.random.Generator, batch: int, T: int, vocab: int) -> tuple[np.ndarray, np.ndarray]:
    """Random sequences and their reversals: the target at i is the input at T-1-i."""
    x = rng.integers(0, vocab, (batch, T))
    return x, x[:, ::-1].copy()


def gradient_check(rng: np.random.Generator, vocab: int = 5, T: int = 4, d: int = 6,
                   causal: bool = False) -> float:
    """Largest relative error between backward() and central finite differences, float64."""
    head = Head.init(vocab, T, d, rng)
    x, y = reverse_batch(rng, 3, T, vocab)
    logits, cache = head.forward(x, causal)
    _, dlogits = cross_entropy(logits, y)
    grads = backward(head, cache, dlogits)
    worst, eps = 0.0, 1e-6
    for name, p in head.params().items():
        for idx in zip(*(rng.integers(0, s, 4) for s in p.shape)):  # 4 entries of each parameter
            old = p[idx]
            p[idx] = old + eps
            up = cross_entropy(head.forward(x, causal)[0], y)[0]
            p[idx] = old - eps
            down = cross_entropy(head.forward(x, causal)[0], y)[0]
            p[idx] = old
            num = (up - down) / (2 * eps)
            worst = max(worst, abs(num - grads[name][idx]) / max(1e-8, abs(num) + abs(grads[name][idx])))
    return worst


# ---------------------------------------------------------------- the milestone

def toy_sentence_attention(rng: np.random.Generator, d: int = 16) -> tuple[list[str], np.ndarray, np.ndarray]:
    """The toy sentence through a head whose queries and keys are the words themselves.

    Each distinct word gets a random unit vector, and Wq = Wk = 3·I, Wv = I: so a
    word's query best matches its own key and those of its repeats ("the" with
    every "the"). That makes the heatmap readable before anything is learned.
    """
    words = TOY_SENTENCE.split()
    vocab = sorted(set(words))
    vecs = rng.normal(size=(len(vocab), d))
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    x = vecs[[vocab.index(w) for w in words]]
    eye = np.eye(d)
    _, full = attention(x, 3 * eye, 3 * eye, eye)
    _, causal = attention(x, 3 * eye, 3 * eye, eye, causal=True)
    return words, full, causal


def run(ctx: Context) -> Output:
    from tiers.runner import Output

    cfg: Config = ctx.config
    V, T, d, B, steps = cfg.vocab_size, cfg.block_size, cfg.n_embd, cfg.batch_size, cfg.steps
    rng = np.random.default_rng(cfg.seed)
    plt = pyplot()

    # 1. the toy sentence, with and without the causal mask
    words, full, causal = toy_sentence_attention(rng)
    plots = [toy_plot(plt, ctx.out_dir / "toy_sentence_attention.png", words, full, causal)]

    # 2. the backward pass, checked against finite differences (float64, tiny sizes)
    grad_err = max(gradient_check(np.random.default_rng(1)), gradient_check(np.random.default_rng(2), causal=True))
    ctx.log(f"gradient check: largest relative error {grad_err:.2e}")

    # 3. learn to reverse
    head = Head.init(V, T, d, rng)
    opt = Adam(head.params(), cfg.lr)
    losses, accs, every = [], [], max(1, steps // 100)
    with ctx.progress(f"training one head to reverse {T}-token sequences", steps) as bar:
        for step in range(steps):
            x, y = reverse_batch(rng, B, T, V)
            logits, cache = head.forward(x)
            loss, dlogits = cross_entropy(logits, y)
            opt.step(head.params(), backward(head, cache, dlogits))
            if step % every == 0 or step == steps - 1:
                losses.append((step, loss))
                accs.append((step, float((logits.argmax(-1) == y).mean())))
            bar.advance()
    test_acc, seq_acc, anti, sample = held_out(head, T, V, B)
    ctx.log(f"after {steps} steps: loss {losses[-1][1]:.3f}, held-out token accuracy {test_acc:.1%}, "
            f"mean attention on the mirrored position {anti:.2f}")
    plots.append(learned_plot(plt, ctx.out_dir / "learned_attention.png", head, sample, losses, accs))

    n_params = sum(p.size for p in head.params().values())
    metrics: dict[str, Any] = {
        "task": "reverse", "vocab_size": V, "block_size": T, "n_embd": d, "batch_size": B, "steps": steps,
        "params": int(n_params), "final_loss": round(losses[-1][1], 4), "test_token_accuracy": round(test_acc, 4),
        "test_sequence_accuracy": round(seq_acc, 4), "mirrored_attention": round(anti, 4),
        "gradient_check_max_rel_error": grad_err, "toy_sentence": TOY_SENTENCE,
        "toy_causal_upper_triangle_weight": float(np.triu(causal, 1).sum()),
        "loss_curve": [(s, round(v, 4)) for s, v in losses],
    }
    summary = (f"One attention head ({n_params:,} parameters, numpy, backward by hand) learned to reverse "
               f"{T}-token sequences: {test_acc:.1%} of held-out tokens right, and on average "
               f"{anti:.0%} of each position's attention sits on the mirrored position, the anti-diagonal "
               f"in the heatmap.")
    return Output(metrics=metrics, summary=summary, report=report(metrics, cfg.lr), plots=plots)


def held_out(head: Head, T: int, V: int, B: int) -> tuple[float, float, float, np.ndarray]:
    """On 1,024 new sequences, B at a time: token accuracy, whole-sequence accuracy, and the mean attention
    weight on the mirrored position (T-1-i for output i); and one sequence to draw."""
    x, y = reverse_batch(np.random.default_rng(123), 1024, T, V)
    right, anti_sum = np.zeros((len(x), T), dtype=bool), 0.0
    for s in range(0, len(x), B):
        logits, cache = head.forward(x[s:s + B])
        right[s:s + B] = logits.argmax(-1) == y[s:s + B]
        anti_sum += float(cache["a"][:, np.arange(T), T - 1 - np.arange(T)].sum())
    return float(right.mean()), float(right.all(-1).mean()), anti_sum / (len(x) * T), x[0]


# ---------------------------------------------------------------- plots

def toy_plot(plt: Any, path: Any, words: list[str], full: np.ndarray, causal: np.ndarray) -> str:
    fig, axes = plt.subplots(1, 2, figsize=(12, 5.5))
    for ax, mat, title in ((axes[0], full, "no mask: every word sees every word"),
                           (axes[1], causal, "causal mask: a word sees only itself and the past")):
        heatmap(ax, mat, words, words, title)
    save(fig, path)
    return f"{path.name}: one head over a toy sentence, without and with the causal mask"


def learned_plot(plt: Any, path: Any, head: Head, sample: np.ndarray, losses: list[tuple[int, float]],
                 accs: list[tuple[int, float]]) -> str:
    T, (V, d) = len(sample), head.E.shape
    fig, axes = plt.subplots(1, 2, figsize=(12, 5))
    labels = [str(t) for t in sample]
    heatmap(axes[0], head.forward(sample[None])[1]["a"][0], labels, labels,
            "learned attention on one sequence (rows: output position)", annotate=T <= 12)
    axes[1].plot(*zip(*losses), label="loss (cross-entropy)")
    ax2 = axes[1].twinx()
    ax2.plot(*zip(*accs), color="tab:orange", label="token accuracy (batch)")
    ax2.set_ylim(0, 1.02)
    axes[1].set_yscale("log")                  # the loss falls by orders of magnitude once the pattern is found
    axes[1].set_xlabel("step")
    axes[1].set_ylabel("loss (log scale)")
    ax2.set_ylabel("accuracy")
    axes[1].set_title(f"training: reverse {T} tokens, vocab {V}, d={d}", fontsize=10)
    axes[1].legend(loc="center right", fontsize=8)
    ax2.legend(loc="right", bbox_to_anchor=(1, 0.4), fontsize=8)
    save(fig, path)
    return f"{path.name}: the learned attention on a held-out sequence, and the training curve"


def heatmap(ax: Any, mat: np.ndarray, rows: list[str], cols: list[str], title: str, annotate: bool = True) -> None:
    im = ax.imshow(mat, cmap="viridis", vmin=0, vmax=max(1e-9, float(mat.max())))
    ax.set_xticks(range(len(cols)), cols, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(len(rows)), rows, fontsize=8)
    ax.set_xlabel("key (attended to)")
    ax.set_ylabel("query")
    ax.set_title(title, fontsize=10)
    if annotate:
        for i in range(mat.shape[0]):
            for j in range(mat.shape[1]):
                if mat[i, j] >= 0.1:
                    ax.text(j, i, f"{mat[i, j]:.1f}", ha="center", va="center", fontsize=6,
                            color="black" if mat[i, j] > 0.6 * mat.max() else "white")
    ax.figure.colorbar(im, ax=ax, fraction=0.046, pad=0.04)


# ---------------------------------------------------------------- the report

def report(m: dict[str, Any], lr: float) -> str:
    T, V, d, steps, B = m["block_size"], m["vocab_size"], m["n_embd"], m["steps"], m["batch_size"]
    return "\n".join([
        "## The head", "",
        ("`scores = Q Kᵀ / √d`, masked (causal: `-inf` above the diagonal), `softmax` by row, `out = weights V`. "
        "Each row of a heatmap is one query's weights over the keys; it sums to 1."), "",
        (f"Toy sentence: *{TOY_SENTENCE}*. With Wq = Wk = 3·I the words match themselves and their repeats; the "
        f"causal mask leaves {m['toy_causal_upper_triangle_weight']:g} weight above the diagonal."), "",
        "## Learning to reverse", "",
        md_table(["", "value"], [
            ["sequence length, vocabulary, width", f"{T}, {V}, {d}"],
            ["steps x batch", f"{steps} x {B} (Adam, lr {lr})"],
            ["final training loss", f"{m['final_loss']:.4f}"],
            ["held-out token accuracy", f"{m['test_token_accuracy']:.1%}"],
            ["held-out whole-sequence accuracy", f"{m['test_sequence_accuracy']:.1%}"],
            ["attention on the mirrored position", f"{m['mirrored_attention']:.1%}"],
            ["gradient check (max relative error vs finite differences)", f"{m['gradient_check_max_rel_error']:.1e}"],
        ]), "",
        ("Reversal needs position i to fetch position T-1-i: the queries and keys learn it from the position "
        "embeddings, and the values carry the token. No mask here: the output at i needs tokens that come later.")])

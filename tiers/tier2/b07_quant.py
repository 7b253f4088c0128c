"""B7: a quantisation lab. A pretrained GPT-2's weights rounded by hand to int8 and int4, and what it costs.

    w (fp32) ─► scale = max|w| / qmax ─► q = round(w / scale) ∈ [-qmax, qmax] ─► w' = q * scale
                 (per tensor: one scale;   per channel: one scale per output channel)

    model = data.require("gpt2") ─► for each scheme: w' into the model ─► perplexity on held-out text
                                    for each block:  that block alone at int4 ─► the rise in perplexity

Symmetric round-to-nearest, the simplest scheme there is: int8 keeps 255 levels
(qmax 127), int4 keeps 15 (qmax 7). Because |w| / scale <= qmax nothing is ever
clipped, so every weight moves by at most half a step: |w - w'| <= scale / 2.
One scale per output channel fits each channel's own range; one scale per
tensor lets a single large weight coarsen the grid for the whole matrix, which
is why per-channel int4 survives where per-tensor int4 falls apart.

The lab quantises in numpy (not torch.ao, not bitsandbytes: the point is to see
the arithmetic), dequantises into the model in place (the fp32 originals are put
back afterwards, bit for bit), and measures:
- perplexity on held-out text (the last 10% of Tiny Shakespeare, in the model's
  own tokens) at fp32, int8 and int4, per tensor and per channel;
- each transformer block's sensitivity: only that block at int4 (per channel),
  the rest fp32, and the rise in perplexity, plotted (the embeddings likewise);
- the model's size in bytes per scheme, with int4 really packed two to a byte.

Perplexity is computed here from the logits: windows of the model's context,
each input window's targets are the same tokens shifted by one, cross-entropy
summed over the targets not scored by an earlier window. Windows overlap by half
(`stride`), so every scored token but the first window's sees at least half a
context of text before it.

Norms and biases stay fp32 (they are tiny and sensitive); every 2-D weight
(Linear or GPT-2's Conv1D, token and position embeddings) is quantised. What is
quantised is the rung's `model` (tiers/tier2/quant_models.py): a Hugging Face
GPT-2 from the local cache (`tierkit data fetch gpt2`), your B12 model (`b12`),
or the stand-in char model trained in seconds (`standin`), always named as such.
"""
from __future__ import annotations

import contextlib
import math
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, Literal

import numpy as np
from annotated_types import Gt

from tiers.report import md_table, pyplot, save

if TYPE_CHECKING:
    import torch

    from tiers.runner import Context, Output
    from tiers.tier2.quant_models import Subject

QMAX = {8: 127, 4: 7}
SCHEMES = [(8, False), (8, True), (4, False), (4, True)]  # (bits, per_channel)


@dataclass
class Config:
    # the rung's model: a registry name (gpt2, gpt2-medium, gpt2-large, gpt2-xl), b12 (your B12 model) or
    # standin (a char model trained in seconds); --set also takes a snapshot folder or a tierkit checkpoint (*.pt)
    model: str = "gpt2"
    dataset: Literal["tinyshakespeare"] = "tinyshakespeare"  # held-out text: its last 10%
    eval_tokens: Annotated[int, Gt(0)] = 200_000    # held-out tokens each scheme's perplexity is measured on
    batch_size: Annotated[int, Gt(0)] = 8           # windows per forward pass while scoring
    context: Annotated[int, Gt(1)] | None = None    # window length; None: the model's own (GPT-2: 1024)
    stride: Annotated[int, Gt(0)] | None = None     # window step; None: half a window
    # per-block runs are many (one per block); the same tokens for each, so their differences rank the blocks
    sensitivity_tokens: Annotated[int, Gt(0)] | None = None   # None: min(held-out, 20,000)
    seed: int = 0


# ---------------------------------------------------------------- the quantiser (numpy)

@dataclass
class QTensor:
    """A quantised weight: integer codes, their scale(s), and what they came from."""

    q: np.ndarray          # int8 codes in [-qmax, qmax] (int4 codes too, before packing)
    scale: np.ndarray      # float32: shape () per tensor, (rows, 1) per channel
    bits: int
    shape: tuple[int, ...]

    @property
    def per_channel(self) -> bool:
        return self.scale.ndim > 0

    def nbytes(self) -> int:
        """Bytes to store it: the codes (int4 packed two to a byte) plus one fp32 per scale."""
        codes = self.q.size if self.bits == 8 else (self.q.size + 1) // 2
        return codes + 4 * self.scale.size


def scheme_name(bits: int, per_channel: bool) -> str:
    return f"int{bits} per-{'channel' if per_channel else 'tensor'}"


def quantise(w: np.ndarray, bits: int, per_channel: bool) -> QTensor:
    """Symmetric round-to-nearest: scale = max|w| / qmax (per row when per_channel), q = round(w / scale)."""
    if bits not in QMAX:
        raise ValueError(f"bits must be one of {sorted(QMAX)}, not {bits}")
    qmax = QMAX[bits]
    w = np.asarray(w, dtype=np.float32)
    if per_channel:
        if w.ndim < 2:
            raise ValueError(f"per-channel quantisation needs a matrix, not shape {w.shape}")
        w2 = w.reshape(w.shape[0], -1)
        amax = np.abs(w2).max(axis=1, keepdims=True)
    else:
        w2 = w.reshape(1, -1) if w.ndim else w.reshape(1, 1)
        amax = np.abs(w2).max(keepdims=True).reshape(())
    # an all-zero row has nothing to scale: any scale gives q = 0; 1 avoids dividing by zero
    scale = np.where(amax > 0, amax / qmax, 1.0).astype(np.float32)
    q = np.clip(np.rint(w2 / scale), -qmax, qmax).astype(np.int8)  # the clip never bites; it documents the range
    return QTensor(q.reshape(w.shape), scale, bits, tuple(w.shape))


def dequantise(t: QTensor) -> np.ndarray:
    """w' = q * scale, in float32, in the original shape."""
    if t.per_channel:
        return (t.q.reshape(t.shape[0], -1).astype(np.float32) * t.scale).reshape(t.shape)
    return t.q.astype(np.float32) * t.scale


def pack_int4(q: np.ndarray) -> np.ndarray:
    """Two signed 4-bit codes per byte (low nibble first): how int4 weights really sit in memory."""
    flat = np.asarray(q, dtype=np.int8).ravel()
    if flat.size and (flat.min() < -8 or flat.max() > 7):
        raise ValueError("int4 codes must lie in [-8, 7]")
    if flat.size % 2:
        flat = np.append(flat, np.int8(0))
    u = (flat.astype(np.int16) & 0xF).astype(np.uint8)  # two's complement nibble
    return (u[0::2] | (u[1::2] << 4)).astype(np.uint8)


def unpack_int4(packed: np.ndarray, n: int) -> np.ndarray:
    """The inverse of pack_int4: the first n signed codes, int8."""
    p = np.asarray(packed, dtype=np.uint8)
    nib = np.empty(p.size * 2, dtype=np.int16)
    nib[0::2], nib[1::2] = p & 0xF, p >> 4
    nib = np.where(nib >= 8, nib - 16, nib)   # sign-extend the nibble
    return nib[:n].astype(np.int8)


def roundtrip(w: np.ndarray, bits: int, per_channel: bool) -> tuple[np.ndarray, QTensor]:
    """w through the quantiser and back; int4 codes go through the byte packing too, so it is tested."""
    t = quantise(w, bits, per_channel)
    if bits == 4:
        t = QTensor(unpack_int4(pack_int4(t.q), t.q.size).reshape(t.shape), t.scale, bits, t.shape)
    return dequantise(t), t


# ---------------------------------------------------------------- applied to a model (torch)

def quantisable(model: Any) -> list[str]:
    """Names of the weights the lab quantises: every 2-D parameter (Linear/Conv1D and embedding weights).
    A tied embedding/output matrix is one parameter, so it appears (and is quantised) once."""
    return [n for n, p in model.named_parameters() if p.ndim == 2]


def channel_axes(model: Any) -> dict[str, int]:
    """The axis of each weight that indexes its output channels, where it is not 0.

    nn.Linear stores (out, in) and an embedding one row per token (for a tied head, one per output
    logit): per channel means per row. GPT-2's Conv1D (transformers.pytorch_utils.Conv1D, y = x @ W + b)
    stores W transposed, (in, out): per channel means per column, so its weights are quantised as W.T.
    Matched by class name, so a tierkit GPT never imports transformers.
    """
    return {f"{name}.weight": 1 for name, m in model.named_modules() if type(m).__name__ == "Conv1D"}


def weight_groups(names: list[str]) -> dict[str, list[str]]:
    """The units of the sensitivity sweep: each transformer block's matrices together ("block 3"), and each
    matrix outside the blocks (token and position embeddings, an untied head) alone."""
    out: dict[str, list[str]] = {}
    for n in names:
        m = re.search(r"\.(?:h|layers)\.(\d+)\.", n)
        key = f"block {m.group(1)}" if m else n.removeprefix("transformer.").removeprefix("model.").removesuffix(".weight")
        out.setdefault(key, []).append(n)
    return out


@contextlib.contextmanager
def quantised(model: Any, bits: int, per_channel: bool,
              only: list[str] | None = None) -> Iterator[tuple[dict[str, QTensor], float]]:
    """Inside the block the chosen weights hold their dequantised int8/int4 values; on leaving, the fp32
    originals are back, bit for bit. Yields ({name: QTensor}, the worst |w - w'| / (scale/2) of any weight).

    In place, with the originals kept on the CPU: a second copy of the model never sits on the GPU.
    Computation stays fp32: this measures what the rounding does to accuracy, not int arithmetic speed.
    """
    import torch

    params = dict(model.named_parameters())
    axes = channel_axes(model)
    saved: dict[str, torch.Tensor] = {}
    out: dict[str, QTensor] = {}
    worst = 0.0
    try:
        with torch.no_grad():
            for n in quantisable(model) if only is None else only:
                p = params[n]
                saved[n] = p.detach().to("cpu", copy=True)
                w = saved[n].float().numpy()
                rows = np.ascontiguousarray(w.T) if axes.get(n) == 1 else w   # output channels as rows
                wq, t = roundtrip(rows, bits, per_channel)
                worst = max(worst, error_stats(rows, t)["max_over_bound"])
                p.copy_(torch.from_numpy(wq.T if axes.get(n) == 1 else wq).to(p.device, p.dtype))
                out[n] = t
        yield out, worst
    finally:
        with torch.no_grad():
            for n, w in saved.items():
                params[n].copy_(w)


def model_bytes(model: Any, qt: dict[str, QTensor] | None = None) -> int:
    """Bytes to store the model: quantised weights as their codes + scales, everything else fp32."""
    qt = qt or {}
    return sum(qt[n].nbytes() if n in qt else 4 * p.numel() for n, p in model.named_parameters())


def error_stats(w: np.ndarray, t: QTensor) -> dict[str, float]:
    """How far the weights moved, against the bound scale/2."""
    err = np.abs(w - dequantise(t))
    bound = np.broadcast_to(t.scale, (t.shape[0], 1) if t.per_channel else ()).astype(np.float32) / 2
    rel = err.reshape(t.shape[0], -1) / bound.reshape(-1, 1) if t.per_channel else err / bound
    return {"max_abs": float(err.max()), "rms": float(np.sqrt((err ** 2).mean())),
            "max_over_bound": float(rel.max()), "weight_rms": float(np.sqrt((w ** 2).mean()))}


# ---------------------------------------------------------------- perplexity, from the logits

def windows(n: int, context: int, stride: int) -> list[tuple[int, int]]:
    """(start, first) per window over n tokens: the input is ids[start:start+L], its targets ids[start+1:start+L+1]
    (L = min(context, n-1)), and targets from index `first` on are scored: the ones before were scored by an
    earlier window. Every token but the first is scored exactly once; the last window ends at the text's end."""
    if n < 2:
        raise ValueError(f"{n} tokens are too few to score")
    L, stride = min(context, n - 1), max(1, min(stride, context, n - 1))
    out: list[tuple[int, int]] = []
    done, start = 0, 0                         # done: targets ids[1..done] are scored
    while done < n - 1:
        start = min(start, n - 1 - L)
        out.append((start, done - start))
        done, start = start + L, start + stride
    return out


def perplexity(subject: Subject, ids: torch.Tensor, context: int, stride: int, batch_size: int = 8) -> float:
    """exp(mean cross-entropy of each next token), over sliding windows (see `windows`)."""
    import torch
    from torch.nn import functional as F

    ids = torch.as_tensor(ids, dtype=torch.long).flatten()
    wins = windows(len(ids), context, stride)
    L = min(context, len(ids) - 1)
    device = next(subject.model.parameters()).device
    nll, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(wins), batch_size):
            chunk = wins[i:i + batch_size]
            x = torch.stack([ids[s:s + L] for s, _ in chunk]).to(device)
            y = torch.stack([ids[s + 1:s + L + 1] for s, _ in chunk]).to(device)   # the shift: the next token
            logits = subject.logits(x)
            for row, (_, first) in enumerate(chunk):     # row by row: no second (B, L, vocab) buffer
                nll += float(F.cross_entropy(logits[row, first:].float(), y[row, first:], reduction="sum"))
                count += L - first
    return math.exp(nll / count)


# ---------------------------------------------------------------- the milestone

def run(ctx: Context) -> Output:
    import torch

    from tiers import data
    from tiers.runner import Output, RunError
    from tiers.tier2 import common, quant_models

    cfg: Config = ctx.config
    torch.manual_seed(cfg.seed)
    subject = quant_models.load(ctx, cfg.model)      # one line, and nothing written, when it is not here
    try:
        text = data.require(cfg.dataset).read_text(encoding="utf-8")
    except data.DataError as exc:
        raise RunError(str(exc)) from None
    ctx.log(f"model: {subject.name} ({subject.source}), {subject.params:,} parameters; tokenizer: {subject.tokenizer}")
    _, held = common.split_ids(torch.tensor(subject.encode(text), dtype=torch.long))   # the last 10%
    held = held[:cfg.eval_tokens + 1]
    L = min(cfg.context or subject.context, subject.context)
    stride = min(cfg.stride or max(1, L // 2), L)
    sens_n = min(cfg.sensitivity_tokens or 20_000, len(held) - 1)
    ctx.log(f"held-out text: {len(held) - 1:,} tokens of {cfg.dataset} (sensitivity on {sens_n:,}); "
            f"windows of {L} tokens every {stride}")

    def ppl(ids: torch.Tensor) -> float:
        return perplexity(subject, ids, L, stride, cfg.batch_size)

    rows, errors = measure_schemes(ctx, subject.model, ppl, held)
    sens_base, sensitivity = measure_sensitivity(ctx, subject.model, ppl, held[:sens_n + 1])
    by = {r["scheme"]: r["perplexity"] for r in rows}
    metrics = {
        "model": subject.name, "model_source": subject.source, "params": subject.params,
        "model_config": subject.config, "tokenizer": subject.tokenizer, "dataset": cfg.dataset,
        "context": L, "stride": stride, "eval_tokens": len(held) - 1, "sensitivity_tokens": sens_n,
        "schemes": rows, "roundtrip": errors, "sensitivity": sensitivity, "sensitivity_base_perplexity": sens_base,
        "fp32_le_int8_le_int4_per_channel": by["fp32"] <= by["int8 per-channel"] * (1 + 1e-3)
        and by["int8 per-channel"] <= by["int4 per-channel"],
    }
    worst = max(sensitivity, key=lambda r: r["delta"])
    plt = pyplot()
    plots = [scheme_plot(plt, ctx.out_dir / "perplexity.png", rows),
             sensitivity_plot(plt, ctx.out_dir / "sensitivity.png", sensitivity, sens_base),
             grid_plot(plt, ctx.out_dir / "int4_grid.png", subject.model)]
    i8, i4 = by["int8 per-channel"], by["int4 per-channel"]
    where = "" if subject.source == subject.name else f"; {subject.source}"
    summary = (f"`{subject.name}` ({subject.params:,} parameters{where}): perplexity **{by['fp32']:.3f}** "
               f"at fp32, **{i8:.3f}** at int8 and **{i4:.3f}** at int4 (per-channel, symmetric, round-to-nearest), "
               f"on {len(held) - 1:,} held-out tokens of {cfg.dataset}; the int4 model is "
               f"{rows[0]['bytes'] / rows[-1]['bytes']:.1f}x smaller. Most sensitive at int4: {worst['group']}.")
    return Output(metrics=metrics, summary=summary, report=report(metrics), plots=plots)


def measure_schemes(ctx: Context, model: Any, ppl: Callable[[Any], float],
                    held: torch.Tensor) -> tuple[list[dict[str, Any]], dict[str, dict[str, float]]]:
    """Perplexity and size at fp32, then at each (bits, per_channel) scheme."""
    t0 = time.perf_counter()
    base = ppl(held)
    rows: list[dict[str, Any]] = [{"scheme": "fp32", "bits": 32, "per_channel": None, "perplexity": base,
                                   "bytes": model_bytes(model), "seconds": time.perf_counter() - t0}]
    errors: dict[str, dict[str, float]] = {}
    with ctx.progress("perplexity per scheme", len(SCHEMES)) as bar:
        for bits, pc in SCHEMES:
            t0 = time.perf_counter()
            name = scheme_name(bits, pc)
            with quantised(model, bits, pc) as (qt, worst):
                p = ppl(held)
                size = model_bytes(model, qt)
            errors[name] = {"max_error_over_half_step": worst}
            rows.append({"scheme": name, "bits": bits, "per_channel": pc, "perplexity": p, "bytes": size,
                         "seconds": time.perf_counter() - t0})
            ctx.log(f"{name}: perplexity {p:.4f} ({p / base - 1:+.3%}), {size:,} bytes")
            bar.advance()
    return rows, errors


def measure_sensitivity(ctx: Context, model: Any, ppl: Callable[[Any], float],
                        ids: torch.Tensor) -> tuple[float, list[dict[str, Any]]]:
    """One block (or one matrix outside the blocks) at int4 per channel, the rest fp32: the rise in perplexity."""
    params = dict(model.named_parameters())
    base = ppl(ids)
    out = []
    groups = weight_groups(quantisable(model))
    with ctx.progress("per-block sensitivity (int4 per-channel)", len(groups)) as bar:
        for label, names in groups.items():
            with quantised(model, 4, True, only=names):
                p = ppl(ids)
            out.append({"group": label, "weights": names, "params": sum(int(params[n].numel()) for n in names),
                        "perplexity": p, "delta": p - base})
            bar.advance()
    worst = max(out, key=lambda r: r["delta"])
    ctx.log(f"most sensitive at int4: {worst['group']} ({worst['delta']:+.4f} perplexity)")
    return base, out


# ---------------------------------------------------------------- plots and the report

def scheme_plot(plt: Any, path: Any, rows: list[dict[str, Any]]) -> str:
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    names = [r["scheme"].replace(" per-", "\nper-") for r in rows]
    colors = ["#555555", "#4c72b0", "#4c72b0", "#dd8452", "#dd8452"]
    a.bar(names, [r["perplexity"] for r in rows], color=colors)
    lo = min(r["perplexity"] for r in rows)
    a.set_ylim(lo * 0.97, max(r["perplexity"] for r in rows) * 1.01)
    a.set_ylabel("held-out perplexity")
    a.set_title("perplexity (lower is better)", fontsize=10)
    b.bar(names, [r["bytes"] / 2**20 for r in rows], color=colors)
    b.set_ylabel("MiB")
    b.set_title("model size", fontsize=10)
    for ax in (a, b):
        ax.tick_params(axis="x", labelsize=8)
        ax.grid(True, axis="y", alpha=0.3)
    save(fig, path)
    return f"{path.name}: perplexity and size at fp32, int8 and int4, per tensor and per channel"


def sensitivity_plot(plt: Any, path: Any, sens: list[dict[str, Any]], base: float) -> str:
    fig, ax = plt.subplots(figsize=(8, max(3.5, 0.3 * len(sens) + 1.5)))
    ax.barh([r["group"] for r in sens], [r["delta"] for r in sens], color="#dd8452")
    ax.invert_yaxis()
    ax.axvline(0, color="k", lw=0.8)
    ax.set_xlabel(f"perplexity increase over fp32 ({base:.3f})")
    ax.set_title("one block (or embedding) at int4 per-channel, the rest fp32", fontsize=10)
    ax.tick_params(axis="y", labelsize=7)
    ax.grid(True, axis="x", alpha=0.3)
    save(fig, path)
    return f"{path.name}: per-block sensitivity, int4 per-channel, one block at a time"


def grid_plot(plt: Any, path: Any, model: Any) -> str:
    """The matrix whose largest weight stands furthest above its typical one, against the int4 grid its
    per-tensor scale allows."""
    mats = {n: p.detach().float().cpu().numpy() for n, p in model.named_parameters() if p.ndim == 2}
    name = max(mats, key=lambda n: np.abs(mats[n]).max() / (np.sqrt((mats[n] ** 2).mean()) + 1e-12))
    w = mats[name]
    t = quantise(w, 4, False)
    fig, ax = plt.subplots(figsize=(8, 3.8))
    ax.hist(w.ravel(), bins=200, color="#4c72b0", alpha=0.8)
    for k in range(-QMAX[4], QMAX[4] + 1):
        ax.axvline(float(k * t.scale), color="#dd8452", lw=0.7, alpha=0.8)
    ax.set_yscale("log")
    ax.set_xlabel("weight value")
    ax.set_title(f"{name}: weights and the 15 int4 levels (per-tensor scale {float(t.scale):.3g})", fontsize=9)
    save(fig, path)
    return f"{path.name}: why per-tensor int4 hurts: one outlier sets the step, most weights share a few levels"


def report(m: dict[str, Any]) -> str:
    base = m["schemes"][0]
    out = ["## What was quantised", "",
           md_table(["", ""], [["model", f"`{m['model']}`"], ["from", m["model_source"]],
                               ["parameters", f"{m['params']:,}"], ["tokenizer", m["tokenizer"]],
                               ["held-out text", f"{m['eval_tokens']:,} tokens: the last 10% of {m['dataset']}"],
                               ["windows", f"{m['context']} tokens, one every {m['stride']}"]]), "",
           "## Perplexity and size per scheme", "",
           ("Every held-out token is predicted once, from the windows above (each scored token but the first "
            "window's sees at least a window minus the stride of text). Quantised weights are dequantised into "
            "the model (fp32 arithmetic), so the numbers are the rounding's effect alone. Size: int8 codes 1 "
            "byte, int4 codes packed two to a byte, each scale an fp32, norms and biases fp32."), "",
           md_table(["scheme", "perplexity", "vs fp32", "bytes", "vs fp32 size", "max |w - w'| / (scale/2)"],
                    [[r["scheme"], f"{r['perplexity']:.4f}", f"{r['perplexity'] / base['perplexity'] - 1:+.3%}",
                      f"{r['bytes']:,}", f"{r['bytes'] / base['bytes']:.3f}",
                      f"{m['roundtrip'][r['scheme']]['max_error_over_half_step']:.4f}" if r["scheme"] in m["roundtrip"]
                      else "-"] for r in m["schemes"]]), "",
           "The last column checks the quantiser: no weight moved by more than half a step (1.0 is the bound).",
           "", ("Rounding adds noise to every weight, so on average it hurts; int8's steps are so fine, though, "
                "that on a small or undertrained model its change is a tiny random nudge of either sign (a "
                "hundredth of a percent), and a nudge can land downhill."), "",
           "## Sensitivity: one block at int4, the rest fp32", "",
           (f"Perplexity with only that block's matrices (or that embedding) at int4 per-channel, on "
            f"{m['sensitivity_tokens']:,} tokens (fp32: {m['sensitivity_base_perplexity']:.4f})."), "",
           md_table(["block", "matrices", "parameters", "perplexity", "increase"],
                    [[r["group"], len(r["weights"]), f"{r['params']:,}", f"{r['perplexity']:.4f}", f"{r['delta']:+.4f}"]
                     for r in sorted(m["sensitivity"], key=lambda r: -r["delta"])])]
    return "\n".join(out)

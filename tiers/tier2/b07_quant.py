"""B7: a quantisation lab. Weights rounded by hand to int8 and int4, and what it costs in perplexity.

    w (fp32) ─► scale = max|w| / qmax ─► q = round(w / scale) ∈ [-qmax, qmax] ─► w' = q * scale
                 (per tensor: one scale;   per channel: one scale per output row)

Symmetric round-to-nearest, the simplest scheme there is: int8 keeps 255 levels
(qmax 127), int4 keeps 15 (qmax 7). Because |w| / scale <= qmax nothing is ever
clipped, so every weight moves by at most half a step: |w - w'| <= scale / 2.
One scale per output channel (a row of a Linear's weight, a row of an
embedding) fits each row's own range; one scale per tensor lets a single large
weight coarsen the grid for the whole matrix, which is why per-channel int4
survives where per-tensor int4 falls apart.

The lab quantises in numpy (not torch.ao: the point is to see the arithmetic),
dequantises into a copy of the model, and measures:
- perplexity on held-out text at fp32, int8 and int4, per tensor and per channel;
- each weight matrix's sensitivity: only that one matrix at int4 (per channel),
  the rest fp32, and the rise in perplexity, plotted;
- the model's size in bytes per scheme, with int4 really packed two to a byte.

Norms and biases stay fp32 (they are tiny and sensitive); every 2-D weight
(Linear, token and position embeddings) is quantised. The model is the B12
model through `b12_pretrain.base_model` (your checkpoint, or a small char model
trained in seconds when there is none).
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any

import numpy as np
from annotated_types import Gt

from tiers.report import md_table, pyplot, save

if TYPE_CHECKING:
    import torch

    from tiers.runner import Context, Output

QMAX = {8: 127, 4: 7}
SCHEMES = [(8, False), (8, True), (4, False), (4, True)]  # (bits, per_channel)



@dataclass
class Config:
    eval_tokens: Annotated[int, Gt(0)] = 200_000    # held-out tokens each scheme's perplexity is measured on
    batch_size: Annotated[int, Gt(0)] = 8           # windows per forward pass while scoring
    sensitivity_tokens: Annotated[int, Gt(0)] | None = None   # per-matrix runs are many: None is min(held-out, 50,000)
    seed: int = 0
    init: str | None = None      # a GPT checkpoint (a path or *.pt); None: B12's build, else a stand-in trained here


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
    """Names of the weights the lab quantises: every 2-D parameter (Linear and embedding weights).
    A tied embedding/output matrix is one parameter, so it appears (and is quantised) once."""
    return [n for n, p in model.named_parameters() if p.ndim == 2]


def quantise_model(model: Any, bits: int, per_channel: bool, only: list[str] | None = None) -> tuple[Any, dict]:
    """A copy of `model` whose chosen weights are replaced by their dequantised int8/int4 version.

    Returns (the copy, {name: QTensor}). The original is untouched. Computation stays
    fp32: this measures what the rounding does to accuracy, not int arithmetic speed.
    """
    import torch

    names = quantisable(model) if only is None else only
    qmodel = copy.deepcopy(model)
    params = dict(qmodel.named_parameters())
    out: dict[str, QTensor] = {}
    with torch.no_grad():
        for n in names:
            p = params[n]
            w = p.detach().float().cpu().numpy()
            wq, t = roundtrip(w, bits, per_channel)
            p.copy_(torch.from_numpy(wq).to(p.device, p.dtype))
            out[n] = t
    return qmodel, out


def model_bytes(model: Any, qt: dict[str, QTensor] | None = None) -> int:
    """Bytes to store the model: quantised weights as their codes + scales, everything else fp32."""
    qt = qt or {}
    total = 0
    for n, p in model.named_parameters():
        total += qt[n].nbytes() if n in qt else 4 * p.numel()
    return total


def error_stats(w: np.ndarray, t: QTensor) -> dict[str, float]:
    """How far the weights moved, against the bound scale/2."""
    err = np.abs(w - dequantise(t))
    bound = np.broadcast_to(t.scale, (t.shape[0], 1) if t.per_channel else ()).astype(np.float32) / 2
    rel = err.reshape(t.shape[0], -1) / bound.reshape(-1, 1) if t.per_channel else err / bound
    return {"max_abs": float(err.max()), "rms": float(np.sqrt((err ** 2).mean())),
            "max_over_bound": float(rel.max()), "weight_rms": float(np.sqrt((w ** 2).mean()))}


# ---------------------------------------------------------------- the milestone

def run(ctx: Context) -> Output:
    import torch

    from tiers.runner import Output
    from tiers.tier2 import b12_pretrain as b12
    from tiers.tier2 import common

    cfg: Config = ctx.config
    torch.manual_seed(cfg.seed)
    model, tok, path = b12.base_model(ctx, cfg.init)
    model.eval()
    device = next(model.parameters()).device
    block = model.config.block_size
    ids = torch.tensor(tok.encode(common.shakespeare(), errors="drop"), dtype=torch.long)
    _, held = common.split_ids(ids)                 # the text B12 never trained on
    held = held[:cfg.eval_tokens + 1]
    sens_n = cfg.sensitivity_tokens or min(len(held) - 1, 50_000)
    sens = held[:sens_n + 1]
    ctx.log(f"held-out text: {len(held) - 1:,} tokens (sensitivity on {sens_n:,}); block {block}")

    def ppl(m: Any, t: torch.Tensor) -> float:
        return common.perplexity(m, t, block, cfg.batch_size, device)

    rows: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    base_ppl = ppl(model, held)
    rows.append({"scheme": "fp32", "bits": 32, "per_channel": None, "perplexity": base_ppl,
                 "bytes": model_bytes(model), "seconds": time.perf_counter() - t0})
    errors: dict[str, dict[str, float]] = {}
    with ctx.progress("perplexity per scheme", len(SCHEMES)) as bar:
        for bits, pc in SCHEMES:
            t0 = time.perf_counter()
            qmodel, qt = quantise_model(model, bits, pc)
            p = ppl(qmodel, held)
            params = dict(model.named_parameters())
            worst = max(error_stats(params[n].detach().float().cpu().numpy(), t)["max_over_bound"]
                        for n, t in qt.items())
            name = scheme_name(bits, pc)
            errors[name] = {"max_error_over_half_step": worst}
            rows.append({"scheme": name, "bits": bits, "per_channel": pc, "perplexity": p,
                         "bytes": model_bytes(model, qt), "seconds": time.perf_counter() - t0})
            ctx.log(f"{name}: perplexity {p:.4f} ({p / base_ppl - 1:+.3%}), {rows[-1]['bytes']:,} bytes")
            del qmodel
            bar.advance()

    names = quantisable(model)
    sens_base = ppl(model, sens)
    sensitivity = []
    with ctx.progress("per-layer sensitivity (int4 per-channel)", len(names)) as bar:
        for n in names:
            qmodel, _ = quantise_model(model, 4, True, only=[n])
            p = ppl(qmodel, sens)
            sensitivity.append({"weight": n, "params": int(dict(model.named_parameters())[n].numel()),
                                "perplexity": p, "delta": p - sens_base})
            del qmodel
            bar.advance()
    worst = max(sensitivity, key=lambda r: r["delta"])
    ctx.log(f"most sensitive at int4: {worst['weight']} (+{worst['delta']:.4f} perplexity)")

    by = {r["scheme"]: r["perplexity"] for r in rows}
    order_ok = by["fp32"] <= by["int8 per-channel"] * (1 + 1e-3) and by["int8 per-channel"] <= by["int4 per-channel"]
    metrics = {
        "model": str(path) if path else "stand-in char model (no B12 checkpoint)",
        "params": model.num_params(), "config": model.config.to_dict(), "tokenizer": tok.meta()["kind"],
        "eval_tokens": len(held) - 1, "sensitivity_tokens": sens_n, "schemes": rows,
        "roundtrip": errors, "sensitivity": sensitivity, "sensitivity_base_perplexity": sens_base,
        "fp32_le_int8_le_int4_per_channel": order_ok,
    }
    plt = pyplot()
    plots = [scheme_plot(plt, ctx.out_dir / "perplexity.png", rows),
             sensitivity_plot(plt, ctx.out_dir / "sensitivity.png", sensitivity, sens_base),
             grid_plot(plt, ctx.out_dir / "int4_grid.png", model, worst["weight"])]
    i8, i4 = by["int8 per-channel"], by["int4 per-channel"]
    summary = (f"{model.num_params():,}-parameter GPT ({metrics['model']}): perplexity **{by['fp32']:.3f}** at fp32, "
               f"**{i8:.3f}** at int8 and **{i4:.3f}** at int4 (per-channel, symmetric, round-to-nearest), on "
               f"{len(held) - 1:,} held-out tokens; the int4 model is {rows[0]['bytes'] / rows[-1]['bytes']:.1f}x "
               f"smaller. Most sensitive weight at int4: `{worst['weight']}`.")
    return Output(metrics=metrics, summary=summary, report=report(metrics), plots=plots)


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
    fig, ax = plt.subplots(figsize=(8, 0.28 * len(sens) + 1.5))
    labels = [r["weight"].removeprefix("transformer.").removesuffix(".weight") for r in sens]
    ax.barh(labels, [r["delta"] for r in sens], color="#dd8452")
    ax.invert_yaxis()
    ax.axvline(0, color="k", lw=0.8)
    ax.set_xlabel(f"perplexity increase over fp32 ({base:.3f})")
    ax.set_title("one weight matrix at int4 per-channel, the rest fp32", fontsize=10)
    ax.tick_params(axis="y", labelsize=7)
    ax.grid(True, axis="x", alpha=0.3)
    save(fig, path)
    return f"{path.name}: per-layer sensitivity, int4 per-channel, one matrix at a time"


def grid_plot(plt: Any, path: Any, model: Any, name: str) -> str:
    """The weights of the most sensitive matrix against the int4 grid its per-tensor scale allows."""
    w = dict(model.named_parameters())[name].detach().float().cpu().numpy()
    t = quantise(w, 4, False)
    fig, ax = plt.subplots(figsize=(8, 3.8))
    ax.hist(w.ravel(), bins=200, color="#4c72b0", alpha=0.8)
    for k in range(-QMAX[4], QMAX[4] + 1):
        ax.axvline(float(k * t.scale), color="#dd8452", lw=0.7, alpha=0.8)
    ax.set_yscale("log")
    ax.set_xlabel("weight value")
    ax.set_title(f"{name}: weights and the 15 int4 levels (per-tensor scale {float(t.scale):.3g})", fontsize=9)
    save(fig, path)
    return f"{path.name}: why per-tensor int4 hurts: most weights share a few levels near zero"


def report(m: dict[str, Any]) -> str:
    base = m["schemes"][0]
    out = ["## Perplexity and size per scheme", "",
           (f"Held-out text: the last 10% of Tiny Shakespeare ({m['eval_tokens']:,} tokens), every token "
           "predicted once. Quantised weights are dequantised into a copy of the model (fp32 arithmetic), "
           "so the numbers are the rounding's effect alone. Size: int8 codes 1 byte, int4 codes packed two "
           "to a byte, each scale an fp32, norms and biases fp32."), "",
           md_table(["scheme", "perplexity", "vs fp32", "bytes", "vs fp32 size", "max |w - w'| / (scale/2)"],
                    [[r["scheme"], f"{r['perplexity']:.4f}", f"{r['perplexity'] / base['perplexity'] - 1:+.3%}",
                      f"{r['bytes']:,}", f"{r['bytes'] / base['bytes']:.3f}",
                      f"{m['roundtrip'][r['scheme']]['max_error_over_half_step']:.4f}" if r["scheme"] in m["roundtrip"]
                      else "-"] for r in m["schemes"]]), "",
           "The last column checks the quantiser: no weight moved by more than half a step (1.0 is the bound).",
           "", ("On a well-trained model rounding only hurts. On an undertrained one (the stand-in base), int8 "
           "can move perplexity by a hundredth of a percent either way: its steps are so fine that the change "
           "is a tiny random nudge, and a nudge can land downhill."), "",
           "## Sensitivity: one weight matrix at int4, the rest fp32", "",
           (f"Perplexity with only that matrix at int4 per-channel, on {m['sensitivity_tokens']:,} tokens "
           f"(fp32: {m['sensitivity_base_perplexity']:.4f})."), "",
           md_table(["weight", "parameters", "perplexity", "increase"],
                    [[r["weight"], f"{r['params']:,}", f"{r['perplexity']:.4f}", f"{r['delta']:+.4f}"]
                     for r in sorted(m["sensitivity"], key=lambda r: -r["delta"])])]
    return "\n".join(out)

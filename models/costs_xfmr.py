"""Analytic cost models for encoder transformers, Whisper, mixture-of-experts GPTs and speculative decoding.

    encoder towers (ViT, BERT-mini, CLIP = both):  block = 12h^2 + 13h params
        ViT: patch embedding c*p^2*h, (patches + 1) positions;  BERT: V*h + ctx*h (+ an MLM head, tied)
        training FLOPs = (6*N_blocks + 6*L*s*h) per token x tokens  (Kaplan et al. 2020)
        activations  = L*s*b*(34h + 5*a*s) x 2 bytes per value in fp32 (Korthikanti et al. 2022, no flash)
    whisper:  encoder over 1500 frames (30 s of audio), decoder per token: weights read once (memory-bound)
    moe GPT:  every expert is resident (16 B/param); a token computes only top_k experts
    speculative decoding (Leviathan et al. 2023): a draft proposes k tokens, the target checks
        them in one pass; accepted tokens per round = (1 - a^(k+1)) / (1 - a)

Pure arithmetic, as models/costs.py; kept apart so that module stays under the size limit.
"""
from __future__ import annotations

from dataclasses import dataclass

from inventory.units import fmt_bytes
from models.costs import BYTES, Cost, GPTShape, fmt_count, fmt_flops, gpt_infer, gpt_matmul_params, gpt_train

ADAM_BYTES = 16


def block_params(h: int) -> int:
    """A pre-norm encoder block with biases: attention 4h^2 + 4h, MLP 8h^2 + 5h, two LayerNorms 4h."""
    return 12 * h * h + 13 * h


@dataclass(frozen=True)
class Tower:
    """One transformer encoder: `seq` tokens of width h through `layers` blocks."""

    name: str
    layers: int
    hidden: int
    heads: int
    seq: int
    embed_params: int        # patch or token embedding + positions (+ a head)
    out_classes: int = 0     # a head over this many outputs per token (BERT's MLM: the vocabulary)

    @property
    def params(self) -> int:
        return self.layers * block_params(self.hidden) + self.embed_params + 2 * self.hidden


def vit_tower(image: int, patch: int, in_ch: int, layers: int, hidden: int, heads: int, classes: int) -> Tower:
    n = (image // patch) ** 2 + 1
    return Tower("ViT", layers, hidden, heads, n, in_ch * patch * patch * hidden + hidden + n * hidden
                 + hidden * classes + classes)


def text_tower(vocab: int, ctx: int, layers: int, hidden: int, heads: int, mlm: bool) -> Tower:
    return Tower("text", layers, hidden, heads, ctx, vocab * hidden + ctx * hidden, vocab if mlm else 0)


def encoder_train(towers: list[Tower], samples: int, epochs: float, batch: int, proj: int = 0) -> Cost:
    """Training one or two encoder towers with AdamW in fp32 (CLIP: two, and a contrastive loss over b x b)."""
    n = sum(t.params for t in towers) + proj * sum(t.hidden for t in towers)
    flops = acts = logits = 0.0
    lines = []
    for t in towers:
        per_token = 6 * t.layers * block_params(t.hidden) + 6 * t.layers * t.seq * t.hidden
        flops += per_token * t.seq * samples * epochs + 6 * t.out_classes * t.hidden * t.seq * samples * epochs
        a = t.layers * t.seq * batch * (34 * t.hidden + 5 * t.heads * t.seq) * 2
        acts += a
        logits += 2 * batch * t.seq * t.out_classes * 4
        lines.append(f"{t.name}: L{t.layers} h{t.hidden} s{t.seq}: {fmt_count(t.params)} params; activations "
                     f"L*s*b*(34h + 5*a*s) x 2 (fp32) = {fmt_bytes(a)}")
    basis = [*lines, f"weights + grads + AdamW: 16 B x {fmt_count(n)} = {fmt_bytes(ADAM_BYTES * n)}",
             f"MLM logits b*s*V*4*2 = {fmt_bytes(logits)}" if logits else "no per-token output head",
             f"FLOPs = (6*N_blocks + 6*L*s*h) per token x tokens (+ head) = {fmt_flops(flops)}"]
    mem = {"weights+grads+AdamW": ADAM_BYTES * n, "activations": acts, "logits": logits}
    return Cost(params=n, flops=flops, memory=mem, basis=basis,
                extra={"width": max(t.hidden for t in towers), "layers": sum(t.layers for t in towers)})


@dataclass(frozen=True)
class WhisperShape:
    """Whisper (Radford et al. 2022): tiny is d=384, 4+4 layers, 6 heads; 80 mel bins, 1500 encoder frames."""

    hidden: int = 384
    enc_layers: int = 4
    dec_layers: int = 4
    heads: int = 6
    vocab: int = 51865
    frames: int = 1500
    text_ctx: int = 448
    mels: int = 80


def whisper_params(s: WhisperShape) -> tuple[int, int]:
    """(encoder, decoder) params: two conv stems 3*80*d + 3*d*d; decoder blocks add cross-attention 4h^2."""
    h = s.hidden
    enc = 3 * s.mels * h + 3 * h * h + 2 * h + s.enc_layers * block_params(h) + 2 * h
    dec = s.vocab * h + s.text_ctx * h + s.dec_layers * (block_params(h) + 4 * h * h + 6 * h) + 2 * h
    return enc, dec


def whisper_infer(s: WhisperShape, dtype: str, clips: int, new_tokens: int) -> Cost:
    """Transcribing `clips` 30 s clips: the encoder once per clip (compute-bound, 2*N_enc*frames FLOPs plus
    attention 4*L*frames^2*h), then greedy decoding: each token reads the decoder and the cross-attention K/V."""
    enc, dec = whisper_params(s)
    b = BYTES[dtype]
    h = s.hidden
    cross_kv = 2 * s.dec_layers * s.frames * h * b
    self_kv = 2 * s.dec_layers * s.text_ctx * h * b
    enc_flops = (2 * (enc - 3 * s.mels * h) * s.frames + 4 * s.enc_layers * s.frames ** 2 * h) * clips
    dec_flops = 2 * dec * new_tokens * clips          # the tied embedding is also the output projection
    enc_acts = s.frames * (4 * h + s.heads * s.frames) * b
    per_token = dec * b + cross_kv + self_kv / 2
    basis = [(f"Whisper d{h} {s.enc_layers}+{s.dec_layers} layers: encoder {fmt_count(enc)} + decoder {fmt_count(dec)} "
             f"params, {dtype}"),
             (f"cross-attention K/V 2*L*1500*h*{b} = {fmt_bytes(cross_kv)}; self K/V {fmt_bytes(self_kv)}; "
             f"encoder activations (one layer, attention scores) {fmt_bytes(enc_acts)}"),
             f"encoder: (2*N_enc*frames + 4*L*frames^2*h) x {clips} clips = {fmt_flops(enc_flops)}",
             f"decode reads decoder + K/V per token = {fmt_bytes(per_token)}"]
    mem = {"weights": (enc + dec) * b, "K/V": cross_kv + self_kv, "activations": enc_acts}
    return Cost(params=enc + dec, flops=enc_flops + dec_flops, memory=mem, basis=basis,
                extra={"enc_flops": enc_flops, "bytes_per_token": per_token, "decode_tokens": new_tokens * clips})


def moe_extra_params(s: GPTShape, experts: int) -> int:
    """The experts beyond the dense model's one MLP (8h^2 + 5h each), plus a router h*E per layer."""
    h = s.n_embd
    return s.n_layer * ((experts - 1) * (8 * h * h + 5 * h) + h * experts)


def moe_train(s: GPTShape, experts: int, top_k: int, batch: int, tokens: float, dtype: str, flash: bool) -> Cost:
    """A GPT whose MLPs are `experts` experts, `top_k` per token (Switch / Mixtral style, no capacity drop)."""
    dense = gpt_train(s, batch, tokens, dtype, flash)
    extra = moe_extra_params(s, experts)
    h = s.n_embd
    active_extra = s.n_layer * (top_k - 1) * 8 * h * h
    flops = dense.flops + 6 * active_extra * tokens
    mlp_acts = (top_k - 1) * s.n_layer * batch * s.block_size * 19 * h * (2 if dtype == "fp32" else 1)
    mem = {**dense.memory, "experts+grads+AdamW": ADAM_BYTES * extra}
    mem["activations"] += mlp_acts
    basis = [*dense.basis,
             (f"{experts} experts, top {top_k}: {fmt_count(extra)} more params x 16 B = {fmt_bytes(ADAM_BYTES * extra)}; "
             f"{top_k - 1} more expert MLP(s) per token: + 6*{fmt_count(active_extra)} FLOP/token, "
             f"+ {fmt_bytes(mlp_acts)} activations"),
             f"total FLOPs = {fmt_flops(flops)}"]
    return Cost(params=dense.params + extra, flops=flops, memory=mem, basis=basis,
                extra={**dense.extra, "active": gpt_matmul_params(s) + active_extra})


def accepted_per_round(accept: float, k: int) -> float:
    """Expected tokens per draft-and-verify round: (1 - a^(k+1)) / (1 - a) (Leviathan et al. 2023)."""
    return k + 1.0 if accept >= 1 else (1 - accept ** (k + 1)) / (1 - accept)


def speculative(target: GPTShape, draft: GPTShape, dtype: str, ctx: int, new_tokens: int, prompt_tokens: int,
                k: int, accept: float) -> Cost:
    """Both models resident with their KV caches; a round reads the draft k times and the target once."""
    t = gpt_infer(target, dtype, ctx, new_tokens, prompt_tokens)
    d = gpt_infer(draft, dtype, ctx, new_tokens, prompt_tokens)
    per_round = accepted_per_round(accept, k)
    rounds = new_tokens / per_round
    read = k * d.extra["bytes_per_token"] + t.extra["bytes_per_token"]
    flops = t.flops + d.flops + 2 * gpt_matmul_params(target) * (k + 1) * rounds
    basis = [*t.basis, f"draft: {d.basis[0]}", f"draft weights + KV {fmt_bytes(d.peak_bytes)}",
             (f"round: draft k={k} tokens, target verifies k+1 in one pass; acceptance {accept:g}: "
             f"(1 - a^(k+1))/(1 - a) = {per_round:.3g} tokens a round, {rounds:,.0f} rounds for {new_tokens} tokens"),
             f"bytes a round: k x draft + target = {fmt_bytes(read)}"]
    mem = {"target weights": t.memory["weights"], "target KV": t.memory["KV cache"],
           "draft weights": d.memory["weights"], "draft KV": d.memory["KV cache"]}
    return Cost(params=t.params + d.params, flops=flops, memory=mem, basis=basis,
                extra={"rounds": rounds, "bytes_per_round": read, "per_round": per_round,
                       "target_bytes_per_token": t.extra["bytes_per_token"],
                       "prefill_tokens": float(prompt_tokens)})

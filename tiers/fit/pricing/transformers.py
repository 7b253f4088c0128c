"""Pricing encoder transformers (ViT, BERT-mini, CLIP), Whisper inference, MoE GPTs and speculative decoding.

    encoder-train  FLOPs (models/costs_xfmr.py) / (matmul FLOP/s x efficiency x width utilisation) + steps
    moe-train      as a GPT (training.py), with every expert resident and top_k of them computed
    whisper-infer  encoder: FLOPs / (FLOP/s x 0.5); decode: bytes per token / (bandwidth x 0.8)
    spec-decode    rounds x (k draft tokens + one target pass), each memory-bound like inference.py's decode

Speculative decoding trades FLOPs for bandwidth: a round reads the target's weights
once for up to k+1 tokens, so it only pays when decoding is memory-bound and the
draft is much smaller than the target.
"""
from __future__ import annotations

from math import ceil

from inventory.profile import Profile
from inventory.units import fmt_bytes
from models import costs_xfmr
from models.costs import GPTShape, fmt_count
from tiers import catalog
from tiers.catalog import Milestone
from tiers.fit.pricing.common import Priced, runtime_bytes, startup_time
from tiers.fit.pricing.inference import EFF_DECODE, EFF_INFER, TOKEN_OVERHEAD_S, TORCH_DECODE_LAYER_S
from tiers.fit.pricing.training import _steps_overhead, _train_time
from tiers.fit.rules import fmt_seconds, limit_check, pool_check
from tiers.fit.targets import Target, bandwidth, flops, mixed_dtype


def _towers(r: catalog.EncoderTrain) -> list[costs_xfmr.Tower]:
    out = []
    if r.image is not None:
        out.append(costs_xfmr.vit_tower(r.image, r.patch, r.in_ch, r.layers, r.hidden, r.heads, r.classes))
    if r.text_vocab is not None:
        out.append(costs_xfmr.text_tower(r.text_vocab, r.text_ctx, r.layers, r.hidden, r.heads, r.mlm))
    return out


def price_encoder_train(r: catalog.EncoderTrain, t: Target, p: Profile, m: Milestone) -> Priced:
    """ViT, BERT-mini or CLIP trained from scratch in fp32 (the small sizes a course trains)."""
    cost = costs_xfmr.encoder_train(_towers(r), r.samples, r.epochs, r.batch, r.proj)
    runtime, rt_lines = runtime_bytes("torch", t, m)
    need = cost.peak_bytes + sum(runtime.values())
    run, lines = _train_time(p, t, cost.flops, r.hidden, "fp32", "torch")
    over, oline = _steps_overhead(ceil(r.samples / r.batch) * r.epochs, int(cost.extra["layers"]), t, "torch")
    start, start_line = startup_time("torch", t, True)
    basis = [*cost.basis, *rt_lines, f"peak memory = {fmt_bytes(need)}", *lines, oline, start_line]
    kind = "CLIP" if len(_towers(r)) == 2 else ("ViT" if r.image else "BERT")
    return Priced(need, run + over + start, basis, [pool_check(t, need)], {"params": cost.params},
                  f"{kind} {fmt_count(cost.params)} params, L{r.layers} h{r.hidden}, {r.epochs:g} epochs")


def price_moe_train(r: catalog.MoETrain, t: Target, p: Profile, m: Milestone) -> Priced:
    shape = r.shape()
    dtype = "fp32" if r.framework == "numpy" else mixed_dtype(t)
    tokens = r.steps * r.grad_accum * r.batch_size * r.block_size
    cost = costs_xfmr.moe_train(shape, r.experts, r.top_k, r.batch_size, tokens, dtype, t.kind != "mps")
    runtime, rt_lines = runtime_bytes("torch", t, m)
    need = cost.peak_bytes + sum(runtime.values())
    run, lines = _train_time(p, t, cost.flops, r.n_embd, dtype, "torch")
    # routing launches a gather/scatter per expert per layer: count experts as layers of fixed cost
    over, oline = _steps_overhead(r.steps * r.grad_accum, r.n_layer * (1 + r.experts // 2), t, "torch")
    start, start_line = startup_time("torch", t, True)
    basis = [*cost.basis, *rt_lines, f"peak memory = {fmt_bytes(need)}", *lines, oline, start_line]
    return Priced(need, run + over + start, basis, [pool_check(t, need)],
                  {"params": cost.params, "tokens": tokens, "dtype": dtype},
                  f"{fmt_count(cost.params)} params ({fmt_count(cost.extra['active'])} active), "
                  f"{r.experts} experts top-{r.top_k}, {fmt_count(tokens)} tokens")


def _per_token(p: Profile, t: Target, per_token_bytes: float, layers: int) -> tuple[float, str]:
    bw, line = bandwidth(p, t)
    s = per_token_bytes / (bw * EFF_DECODE) + TOKEN_OVERHEAD_S["torch"] + layers * TORCH_DECODE_LAYER_S
    return s, (f"{line}; {fmt_bytes(per_token_bytes)} / ({bw / 1e9:.3g} GB/s x {EFF_DECODE}) + fixed "
               f"= {s * 1e3:.3g} ms")


def price_whisper_infer(r: catalog.WhisperInfer, t: Target, p: Profile, m: Milestone) -> Priced:
    shape = costs_xfmr.WhisperShape(r.hidden, r.enc_layers, r.dec_layers, r.heads)
    dtype = r.dtype if r.dtype != "auto" else ("fp16" if t.gpu else "fp32")
    cost = costs_xfmr.whisper_infer(shape, dtype, r.clips, r.new_tokens)
    runtime, rt_lines = runtime_bytes("torch", t, m)
    need = cost.peak_bytes + sum(runtime.values())
    rate, fline = flops(p, t, dtype)
    enc = cost.extra["enc_flops"] / (rate * EFF_INFER)
    per_tok, dline = _per_token(p, t, cost.extra["bytes_per_token"], r.dec_layers)
    decode = per_tok * cost.extra["decode_tokens"]
    start, start_line = startup_time("torch", t, False)
    basis = [*cost.basis, *rt_lines, f"peak memory = {fmt_bytes(need)}", fline,
             f"encoder at efficiency {EFF_INFER}: {fmt_seconds(enc)}", f"decode per token: {dline}",
             f"decode {cost.extra['decode_tokens']:,.0f} tokens: {fmt_seconds(decode)}", start_line]
    return Priced(need, enc + decode + start, basis, [pool_check(t, need)], {"params": cost.params, "dtype": dtype},
                  f"Whisper {fmt_count(cost.params)} params {dtype}, {r.clips} clips of 30 s", bound="memory")


def price_spec_decode(r: catalog.SpecDecode, t: Target, p: Profile, m: Milestone) -> Priced:
    target = r.shape()
    draft = GPTShape(r.vocab_size, r.block_size, r.draft_layer, r.draft_head, r.draft_embd, r.bias,
                     r.tied is not False, r.arch or "gpt2", None, None)
    dtype = r.dtype if r.dtype != "auto" else mixed_dtype(t)
    cost = costs_xfmr.speculative(target, draft, dtype, r.ctx, r.new_tokens, r.prompt_tokens, r.k, r.accept)
    runtime, rt_lines = runtime_bytes("torch", t, m)
    need = cost.peak_bytes + sum(runtime.values())
    per_round, rline = _per_token(p, t, cost.extra["bytes_per_round"], r.k * r.draft_layer + r.n_layer)
    plain, _ = _per_token(p, t, cost.extra["target_bytes_per_token"], r.n_layer)
    rate, fline = flops(p, t, dtype)
    prefill = 2 * cost.params * cost.extra["prefill_tokens"] * r.requests / (rate * EFF_INFER)
    decode = per_round * cost.extra["rounds"] * r.requests
    tok_s = r.new_tokens * r.requests / decode
    start, start_line = startup_time("torch", t, False)
    basis = [*cost.basis, *rt_lines, f"peak memory = {fmt_bytes(need)}", fline, f"a round: {rline}",
             (f"decode {r.new_tokens * r.requests:,} tokens in {cost.extra['rounds'] * r.requests:,.0f} rounds: "
              f"{fmt_seconds(decode)} ({tok_s:.3g} tokens/s; the target alone {1 / plain:.3g} tokens/s)"),
             f"prefill: {fmt_seconds(prefill)}", start_line]
    checks = [pool_check(t, need)]
    if r.min_tokens_per_s:
        checks.append(limit_check("decode speed", tok_s, r.min_tokens_per_s, True, "tokens/s"))
    return Priced(need, prefill + decode + start, basis, checks,
                  {"params": cost.params, "dtype": dtype, "tokens_per_s": round(tok_s, 2),
                   "speedup": round(tok_s * plain, 2)},
                  f"target + draft {fmt_count(cost.params)} params, k={r.k}, {tok_s:.3g} tokens/s "
                  f"(x{tok_s * plain:.2g} vs plain)", bound="memory")

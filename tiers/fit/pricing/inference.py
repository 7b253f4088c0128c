"""Pricing inference: evaluation passes, decoding a GPT, llama.cpp on one machine or split over several.

    prefill = 2*N FLOPs per prompt token / (measured FLOP/s x efficiency)     compute-bound
    decode  = bytes read per token (weights + KV so far) / (bandwidth x 0.8)  memory-bound
              + a fixed cost per token (sampling, graph, Python)
    split   = each node decodes its share of the layers; every token then crosses
              each boundary: round trip + hidden state over the link + RPC overhead

Decoding one token reads every weight once, so its speed is set by memory
bandwidth, not FLOP/s (the plans say `bound: memory`); a split over a home LAN
adds a hop per boundary per token, which is what makes it slower than one node
when the model fits on one.
"""
from __future__ import annotations

from typing import Any

from inventory.profile import Profile
from inventory.units import fmt_bytes
from models import costs
from models.costs import fmt_count
from tiers import catalog
from tiers.catalog import Milestone
from tiers.fit.pricing.common import STARTUP_S, Priced, runtime_bytes, startup_time
from tiers.fit.pricing.training import standin_time
from tiers.fit.rules import fmt_seconds, limit_check, memory_check, pool_check
from tiers.fit.targets import Target, bandwidth, flops, mixed_dtype

EFF_INFER = 0.50                  # forward passes at batch size ~8 (evaluation, prefill)
# LLM decode reaches 50-70% of the bandwidth bound (REFERENCE.md); the profile's bandwidth is
# already a STREAM figure (70-85% of spec), so ~0.8 of it.
EFF_DECODE = 0.80
EFF_PREFILL_LLAMA = 0.50          # llama.cpp prompt processing vs the matmul rate (estimate)
TOKEN_OVERHEAD_S = {"llama.cpp": 0.5e-3, "torch": 1e-3}   # per decoded token: sampling, graph, Python
TORCH_DECODE_LAYER_S = 0.15e-3    # eager torch decode: ~20 kernel launches per layer per token
DISK_BPS = 1.5e9                  # reading a model file: an NVMe SSD (a page-cached file loads faster)
RPC_TOKEN_S = 1e-3                # llama.cpp RPC: ~1 ms fixed per token per remote hop (REFERENCE.md)


# B7 scores held-out text: the last 10% of Tiny Shakespeare, 111,540 characters. A char model reads
# one token per character; GPT-2's BPE about 0.3.
HELD_OUT_CHARS = 111_540
BPE_TOKENS_PER_CHAR = 0.3
QUANT_SCHEMES = 5                 # fp32, int8 and int4, each per tensor and per channel (int8 per tensor too)
SENSITIVITY_TOKENS = 20_000


def price_quant_lab(r: catalog.QuantLab, t: Target, p: Profile, m: Milestone) -> Priced:
    """Quantise a GPT by hand, dequantise into the model, score held-out text at each scheme, then one
    block at a time at int4. Every pass runs in fp32; windows overlap by half, so each token is read twice."""
    shape = r.shape()
    n = costs.gpt_params(shape)
    q = costs.int8_copy(shape)
    fp32 = 4 * n
    acts = r.batch_size * r.block_size * (4 * r.n_embd) * 4 * 2 + costs.logits_bytes(r.batch_size, r.block_size,
                                                                                    r.vocab_size) / 2
    runtime, rt_lines = runtime_bytes("torch", t, m)
    need = 2 * fp32 + q.peak_bytes + acts + sum(runtime.values())   # the model, and its originals kept aside
    held_out = int(HELD_OUT_CHARS * (1.0 if r.vocab_size <= 256 else BPE_TOKENS_PER_CHAR))
    tokens = min(r.eval_tokens, held_out)
    sens = min(tokens, SENSITIVITY_TOKENS)
    read = 2 * (QUANT_SCHEMES * tokens + (r.n_layer + 3) * sens)
    flop = 2 * costs.gpt_matmul_params(shape) * read
    rate, line = flops(p, t, "fp32")
    secs = flop / (rate * EFF_INFER)
    base, base_line = standin_time(r, p, t)
    start, start_line = startup_time("torch", t, True)
    basis = [costs.gpt_params_basis(shape), f"fp32 weights {fmt_bytes(fp32)}, and a copy of the originals",
             *q.basis, f"activations of one batch + logits {fmt_bytes(acts)}", *rt_lines,
             f"peak memory = {fmt_bytes(need)}", line,
             (f"held-out text: {tokens:,} tokens ({held_out:,} available); {QUANT_SCHEMES} schemes, then "
              f"{r.n_layer} blocks + embeddings + fp32 at int4 on {sens:,} tokens, each read twice "
              f"(windows overlap by half): {read:,} tokens"),
             f"2*N*tokens = {flop:.3g} FLOP at efficiency {EFF_INFER}: {fmt_seconds(secs)}", *base_line, start_line]
    return Priced(need, secs + base + start, basis, [pool_check(t, need)], {"params": n},
                  f"{fmt_count(n)} params, {QUANT_SCHEMES} schemes + per-block sensitivity on {fmt_count(tokens)} tokens")


def _decode(p: Profile, t: Target, per_token_bytes: float, framework: str, layers: int) -> tuple[float, str]:
    """Seconds per decoded token: the bytes each token reads over the bandwidth, plus fixed costs."""
    bw, line = bandwidth(p, t)
    s = per_token_bytes / (bw * EFF_DECODE) + TOKEN_OVERHEAD_S[framework]
    if framework == "torch":
        s += layers * TORCH_DECODE_LAYER_S
    return s, (f"{line}; decode: {fmt_bytes(per_token_bytes)} per token / ({bw / 1e9:.3g} GB/s x {EFF_DECODE}) "
               f"+ fixed = {s * 1e3:.3g} ms per token ({1 / s:.3g} tokens/s)")


def price_gpt_infer(r: catalog.GPTInfer, t: Target, p: Profile, m: Milestone) -> Priced:
    shape = r.shape()
    dtype = r.dtype if r.dtype != "auto" else mixed_dtype(t)
    cost = costs.gpt_infer(shape, dtype, r.ctx, r.new_tokens, r.prompt_tokens, 1, r.requests)
    runtime, rt_lines = runtime_bytes("torch", t, m)
    need = cost.peak_bytes + sum(runtime.values())
    per_tok, dline = _decode(p, t, cost.extra["bytes_per_token"], "torch", r.n_layer)
    rate, fline = flops(p, t, dtype)
    prefill = 2 * costs.gpt_matmul_params(shape) * cost.extra["prefill_tokens"] / (rate * EFF_INFER)
    decode = per_tok * cost.extra["decode_tokens"]
    start, start_line = startup_time("torch", t, False)
    basis = [*cost.basis, *rt_lines, f"peak memory = {fmt_bytes(need)}", fline,
             f"prefill {fmt_count(cost.extra['prefill_tokens'])} tokens: {fmt_seconds(prefill)}", dline,
             f"decode {fmt_count(cost.extra['decode_tokens'])} tokens: {fmt_seconds(decode)}", start_line]
    checks = [pool_check(t, need)]
    if r.min_tokens_per_s:
        checks.append(limit_check("decode speed", 1 / per_tok, r.min_tokens_per_s, True, "tokens/s"))
    return Priced(need, prefill + decode + start, basis, checks,
                  {"params": cost.params, "dtype": dtype, "tokens_per_s": round(1 / per_tok, 2)},
                  f"{fmt_count(cost.params)} params {dtype}, {1 / per_tok:.3g} tokens/s", bound="memory")


def _file_bytes(r: catalog.GGUF) -> float | None:
    """The registry's size of the GGUF file, when the rung names one and its size is known."""
    from tiers import data

    return data.get(r.model).size if r.model in data.REGISTRY else None


def price_gguf_decode(r: catalog.GGUF, t: Target, p: Profile, m: Milestone) -> Priced:
    cost = costs.gguf(r.family, str(r.quant), r.ctx, r.prompt_tokens, r.new_tokens, r.requests,
                      file_bytes=_file_bytes(r))
    runtime, rt_lines = runtime_bytes("llama.cpp", t)
    need = cost.peak_bytes + sum(runtime.values())
    per_tok, dline = _decode(p, t, cost.extra["bytes_per_token"], "llama.cpp", 0)
    rate, fline = flops(p, t, "fp16" if t.gpu else "fp32")
    prefill = cost.flops * cost.extra["prefill_tokens"] / (cost.extra["prefill_tokens"] + cost.extra["decode_tokens"]) \
        / (rate * EFF_PREFILL_LLAMA)
    load = cost.memory["weights"] / DISK_BPS
    decode = per_tok * cost.extra["decode_tokens"]
    start, start_line = startup_time("llama.cpp", t, False)
    basis = [*cost.basis, *rt_lines, f"peak memory = {fmt_bytes(need)}",
             f"load: {fmt_bytes(cost.memory['weights'])} from disk at {DISK_BPS / 1e9:g} GB/s = {fmt_seconds(load)}",
             fline, (f"prefill {fmt_count(cost.extra['prefill_tokens'])} tokens at efficiency {EFF_PREFILL_LLAMA}: "
                    f"{fmt_seconds(prefill)}"), dline, (f"decode {fmt_count(cost.extra['decode_tokens'])} tokens: "
                                                      f"{fmt_seconds(decode)}"), start_line]
    checks = [pool_check(t, need)]
    if r.min_tokens_per_s:
        checks.append(limit_check("decode speed", 1 / per_tok, r.min_tokens_per_s, True, "tokens/s"))
    return Priced(need, load + prefill + decode + start, basis, checks,
                  {"params": cost.params, "tokens_per_s": round(1 / per_tok, 2)},
                  f"{r.model}, {1 / per_tok:.3g} tokens/s", bound="memory")


def _split_shares(r: catalog.GGUF, cost: Any, nodes: list[Any]) -> list[float]:
    """Each node's fraction of the layers as `tierkit serve --layout pipeline` places them (the same function);
    in proportion to free memory when placement refuses (the memory checks then say why)."""
    from tiers.placement import ModelLayout, Node, PlacementError, choose_layout

    n = int(cost.extra["n_layer"])
    per_layer = int((cost.memory["weights"] + cost.memory["KV cache"]) / n)
    layout = ModelLayout(str(r.model), [per_layer] * n, n_embd=int(cost.extra["hidden"]))
    hosts = [Node(x.name, x.name, 0, int(x.memory_free)) for x in nodes]
    try:
        plan = choose_layout(layout, hosts[0], hosts[1:], "pipeline")
        return [(s.layers[1] - s.layers[0]) / n for s in plan.stages]
    except PlacementError:
        total = sum(x.memory_free for x in nodes) or 1
        return [x.memory_free / total for x in nodes]


def price_gguf_split(r: catalog.GGUF, t: Target, p: Profile, m: Milestone) -> Priced:
    """llama.cpp over RPC: layers split in proportion to free memory; each token crosses every boundary."""
    cost = costs.gguf(r.family, str(r.quant), r.ctx, r.prompt_tokens, r.new_tokens, r.requests,
                      file_bytes=_file_bytes(r))
    nodes = t.nodes
    model_bytes = cost.memory["weights"] + cost.memory["KV cache"]
    rtt, link = t.link
    checks, basis, per_node = [], [*cost.basis], []
    per_tok = 0.0
    shares = _split_shares(r, cost, nodes)
    for i, n in enumerate(nodes):
        share = shares[i]
        need = share * model_bytes + (cost.memory["compute buffers"] + costs.LLAMA_CPP_BYTES if i == 0
                                      else costs.PYTHON_NUMPY_BYTES)
        checks.append(memory_check(f"memory on {n.name}", need, n.memory_free))
        per_node.append(need)
        s = share * cost.extra["bytes_per_token"] / (n.bandwidth * EFF_DECODE)
        per_tok += s
        basis.append(f"{n.name}: {share:.0%} of the layers, {fmt_bytes(need)} resident, "
                     f"{s * 1e3:.3g} ms per token at {n.bandwidth / 1e9:.3g} GB/s x {EFF_DECODE}")
        basis.extend(n.notes)
    hops = len(nodes) - 1
    hidden_bytes = cost.extra["hidden"] * 4
    hop_s = hops * (rtt + 2 * hidden_bytes / link + RPC_TOKEN_S)
    per_tok += hop_s + TOKEN_OVERHEAD_S["llama.cpp"]
    remote = (1 - shares[0]) * cost.memory["weights"]
    load = cost.memory["weights"] / DISK_BPS + remote / link
    flop_rate = sum(n.flops for n in nodes)
    prefill = 2 * cost.params * cost.extra["prefill_tokens"] / (flop_rate * EFF_PREFILL_LLAMA) \
        + hops * cost.extra["prefill_tokens"] * hidden_bytes / link
    decode = per_tok * cost.extra["decode_tokens"]
    basis += [(f"per token: {hops} hop(s) x (round trip {rtt * 1e3:.2g} ms + 2 x {fmt_bytes(hidden_bytes)} over "
              f"{link * 8 / 1e6:g} Mbit/s + RPC {RPC_TOKEN_S * 1e3:g} ms) = {hop_s * 1e3:.3g} ms; "
              f"{per_tok * 1e3:.3g} ms per token in all ({1 / per_tok:.3g} tokens/s)"),
              (f"load: read {fmt_bytes(cost.memory['weights'])} + send {fmt_bytes(remote)} to the peers = "
              f"{fmt_seconds(load)}"), f"prefill {fmt_seconds(prefill)}, decode {fmt_seconds(decode)}"]
    if r.min_tokens_per_s:
        checks.append(limit_check("decode speed", 1 / per_tok, r.min_tokens_per_s, True, "tokens/s"))
    split = {n.name: round(x, 3) for n, x in zip(nodes, shares)}
    return Priced(max(per_node), load + prefill + decode + STARTUP_S["llama.cpp"], basis, checks,
                  {"params": cost.params, "split": split, "node_bytes": [round(x) for x in per_node],
                   "tokens_per_s": round(1 / per_tok, 2)},
                  f"{r.model} over {len(nodes)} nodes, {1 / per_tok:.3g} tokens/s", bound="memory")

"""Pricing the classic workloads: the probe, numpy matmuls, tabular Q-learning, BPE, word2vec, vector search.

    numpy work     FLOPs / (measured FLOP/s x efficiency), or bytes / measured bandwidth
    Python loops   steps x seconds per step, scaled by the core's clock (python_speed)
    fixed costs    a numpy call, filling arrays with random numbers, loading a tokenizer

These milestones are small: most of their time is fixed costs and Python, which
a FLOP count alone would miss by orders of magnitude, so each per-step figure
below was measured on a real run (or says it is an estimate).
"""
from __future__ import annotations

from math import ceil, log2

from inventory.profile import Profile
from inventory.units import fmt_bytes
from models import costs
from models.costs import fmt_count
from tiers import catalog
from tiers.catalog import Milestone
from tiers.fit.pricing.common import CUDA_INIT_S, NUMPY_CALL_S, PLOTS_S, STARTUP_S, Priced
from tiers.fit.rules import fmt_seconds, memory_check, pool_check
from tiers.fit.targets import (Target, cpu_bandwidth, cpu_flops, free_memory, gpu_bandwidth, gpu_flops, python_speed,
                               usable_cpus)

# Python-bound work at a 3.5 GHz reference core (scaled by the profile's clock):
PY_Q_STEP_S = 2e-6               # one Q-learning step: env step, argmax over a numpy row, update (2.3 us measured at 2.3 GHz)
Q_EPISODE_FILL = 0.2              # episodes end early at the goal: 0.11-0.31 of max_steps measured
PY_BPE_ELEM_S = 1.25e-7           # one list element per pass of a naive (minbpe-style) BPE merge
NUMPY_BPE_ELEM_S = 12e-9          # one distinct-chunk byte per merge of B2's numpy trainer (np.unique's sort)
TIKTOKEN_LOAD_S = 0.3             # parse gpt2 + cl100k .tiktoken files, build both encoders
SPM_BYTE_S = 0.1e-6               # SentencePiece BPE training per corpus byte (0.14 s for 900 KB here)
NATIVE_ELEM_S = 1e-8              # a Rust tokenizer trainer, per element step
RNG_ELEM_S = 16e-9                # rng.standard_normal + astype, per element (0.26 s for 4096^2 here)
EFF_GATHER = 0.05                 # word2vec: row gathers and scatter-adds, not GEMMs (estimate)
# Vector search (B3, B15):
EFF_SEARCH_GEMM = 0.45            # vector search scores: a skinny (64 x d) @ (d x n) GEMM; 0.42 measured here
EFF_GEMV = 0.5                    # one query: a matrix-vector product streams the index (0.39 of STREAM, 1 thread)
TOPK_ELEM_S = 2.5e-9              # np.argpartition per score (2.5 ns on a 1M-float row here)
SEARCH_SINGLES = 50               # B15 times this many queries one at a time (latency) ...
SEARCH_SWEEP = 1.11               # ... and everything at n, n/10 and n/100 vectors
EFF_ENCODER = 0.25                # MiniLM's forward pass in numpy: GEMMs of ~2K rows, softmax, GELU (estimate)
ENCODER_LOAD_S = 0.3              # read 91 MB of safetensors, transpose, load the tokenizer
TSNE_S = 2.23e-4                  # scikit-learn t-SNE (Barnes-Hut, 1000 iterations) per n*log2(n), one core
TSNE_PARALLEL = 0.75              # ... the part its OpenMP threads share (5,000 points: 18.5 s on 1 core, 11.6 s on 2)
TSNE_BYTES_PER_POINT = 2_000      # its sparse affinities (3 x perplexity neighbours) and 50-d input


def price_probe(r: catalog.Probe, t: Target, p: Profile, m: Milestone) -> Priced:
    """B0: the probe with its micro-benchmarks (inventory/probe.py, inventory/bench.py)."""
    from inventory.bench import bandwidth_array_bytes

    arr = bandwidth_array_bytes(p.cpu.caches.l3 if p.cpu else None, p.memory.available_bytes if p.memory else None)
    cost = costs.probe_workload(2048, arr)
    f32, l32 = cpu_flops(p, "fp32")
    f64, l64 = cpu_flops(p, "fp64")
    bw, bline = cpu_bandwidth(p)
    s = 0.6 + (r.mdns_wait if r.discover else 0)          # the detectors, in parallel: ~0.6 s measured
    basis = [*cost.basis]
    if r.bench:
        s += cost.extra["flops_fp32"] / f32 + cost.extra["flops_fp64"] / f64 + cost.bytes_moved / bw \
             + 4 * 2048**2 * RNG_ELEM_S
        basis += [l32, l64, bline]
    need = costs.PYTHON_NUMPY_BYTES + (cost.peak_bytes if r.bench else 0)
    gpus = [g for g in p.gpus if g.backend in ("cuda", "mps")]
    if r.bench and gpus:
        g = gpus[0]
        gs = STARTUP_S["torch"] + CUDA_INIT_S
        for key in ("fp32", "fp16", "bf16"):
            gs += 11 * 2 * 4096**3 / gpu_flops(g, key)[0]
        gs += 11 * 2 * 2**30 / gpu_bandwidth(g)[0]
        s += gs
        need += costs.TORCH_BYTES - costs.PYTHON_NUMPY_BYTES
        basis.append(f"GPU benchmark with torch on {g.model}: {fmt_seconds(gs)}")
    s += PLOTS_S
    basis += [f"detectors ~0.6 s + mDNS {r.mdns_wait:g} s + benchmarks + chart = {fmt_seconds(s)}",
              f"peak memory: Python + numpy + benchmark arrays = {fmt_bytes(need)}"]
    return Priced(need, s, basis, [pool_check(t, need)], {}, "probe + benchmarks" if r.bench else "probe")


def price_matmul(r: catalog.Matmul, t: Target, p: Profile, m: Milestone) -> Priced:
    """B5 as tiers/tier1/b05_roofline.py runs it: a STREAM triad, then each size for >= min_seconds."""
    from inventory.bench import bandwidth_array_bytes

    sizes = []
    n = r.n_min
    while n <= r.n_max:
        sizes.append(n)
        n *= 2
    b = 8 if r.dtype == "float64" else 4
    key = "fp64" if b == 8 else "fp32"
    sweep = costs.matmul_sweep(sizes, key)
    rate, fline = cpu_flops(p, key)
    bw, bline = cpu_bandwidth(p)
    arr = bandwidth_array_bytes(p.cpu.caches.l3 if p.cpu else None, p.memory.available_bytes if p.memory else None)
    triad = (2 + 4 * 5) * arr / bw            # two arrays filled, then a warm-up and 3 timed rounds of 5 transfers
    total = triad

    def one(n: int, rate: float, bw: float) -> float:
        small = 1 / (1 + (128 / n) ** 2)       # small matmuls pay call and threading overhead
        return max(2 * n**3 / (rate * small), 3 * n * n * b / bw) + NUMPY_CALL_S

    for n in sizes:
        t1 = one(n, rate, bw)
        reps = min(200, max(2, ceil(r.min_seconds / t1)))
        total += reps * t1 + (t1 if n < 2048 else 0) + 2 * n * n * RNG_ELEM_S
    host_peak = costs.PYTHON_NUMPY_BYTES + max(3 * arr, r.n_max**2 * (2 * b + 8), 3 * r.n_max**2 * b)
    basis = [*sweep.basis, fline, bline, f"STREAM arrays 3 x {fmt_bytes(arr)}: {fmt_seconds(triad)}",
             f"each size timed for >= {r.min_seconds:g} s (and >= 2 repeats): sweep + triad = {fmt_seconds(total)}"]
    checks = []
    if t.kind == "cuda":
        grate, gline = gpu_flops(t.gpu, "fp32")
        gbw, gbline = gpu_bandwidth(t.gpu)
        copy = 512 * 2**20
        gpu_s = STARTUP_S["torch"] + CUDA_INIT_S + max(0.1, 4 * copy / gbw)
        for n in sizes:
            t1 = one(n, grate, gbw) + 10e-6   # + a kernel launch
            gpu_s += min(200, max(2, ceil(r.min_seconds / t1))) * t1 + t1
        gpu_peak = costs.CUDA_CONTEXT_BYTES + 2 * copy + 3 * r.n_max**2 * 4
        total += gpu_s
        basis += [gline, gbline, f"GPU sweep (torch import, CUDA init, copy roof, sizes): {fmt_seconds(gpu_s)}",
                  (f"GPU memory: CUDA context + 2 x 512 MiB copy buffers (kept in torch's cache) + 3 n^2 x 4 = "
                  f"{fmt_bytes(gpu_peak)}")]
        peak = gpu_peak
        checks.append(memory_check("memory on host", host_peak + costs.TORCH_BYTES, free_memory(p)[0]))
    else:
        peak = host_peak
    total += PLOTS_S + STARTUP_S["numpy"]
    basis.append(f"peak memory: Python + numpy + max(triad arrays, largest size's matrices with the float64 "
                 f"randoms) = {fmt_bytes(host_peak)}" + (" on the host" if t.kind == "cuda" else ""))
    checks.insert(0, pool_check(t, peak))
    return Priced(peak, total, basis, checks, {},
                  f"n = {r.n_min}..{r.n_max} {r.dtype}" + (" + torch on the GPU" if t.kind == "cuda" else ""))


def price_tabular_q(r: catalog.TabularQ, t: Target, p: Profile, m: Milestone) -> Priced:
    cost = costs.tabular_q(r.states, r.actions, r.episodes, r.max_steps)
    scale, sline = python_speed(p)
    run = cost.extra["python_steps"] * Q_EPISODE_FILL * PY_Q_STEP_S * scale
    need = costs.PYTHON_NUMPY_BYTES + costs.MATPLOTLIB_BYTES + cost.peak_bytes
    s = run + STARTUP_S["numpy"] + PLOTS_S
    basis = [*cost.basis, sline, f"{Q_EPISODE_FILL:g} x steps x {PY_Q_STEP_S * 1e6:g} us = {fmt_seconds(run)}",
             f"peak memory: Python + numpy + matplotlib + Q table = {fmt_bytes(need)}"]
    return Priced(need, s, basis, [pool_check(t, need)], {}, f"{r.env}: {r.states} states, {r.episodes:,} episodes")


def price_bpe(r: catalog.BPE, t: Target, p: Profile, m: Milestone) -> Priced:
    cost = costs.bpe(r.corpus_bytes, r.vocab_size, r.impl)
    scale, sline = python_speed(p)
    run = (cost.extra["python_steps"] * PY_BPE_ELEM_S + cost.extra["native_steps"] * NATIVE_ELEM_S
           + cost.extra.get("numpy_steps", 0) * NUMPY_BPE_ELEM_S) * scale
    need = costs.PYTHON_NUMPY_BYTES + costs.MATPLOTLIB_BYTES + cost.peak_bytes
    basis = [*cost.basis, sline, (f"{PY_BPE_ELEM_S * 1e9:g} ns per Python element step, {NATIVE_ELEM_S * 1e9:g} ns "
                                 f"native, {NUMPY_BPE_ELEM_S * 1e9:g} ns numpy: {fmt_seconds(run)}")]
    if "tiktoken" in m.needs.packages:      # B2 compares with GPT-2's and GPT-4's tokenizers
        need += costs.TIKTOKEN_BYTES
        run += TIKTOKEN_LOAD_S
        basis.append(f"tiktoken gpt2 + cl100k ranks: {fmt_bytes(costs.TIKTOKEN_BYTES)}, {TIKTOKEN_LOAD_S:g} s to load")
    if "sentencepiece" in m.needs.packages:  # ... and trains a SentencePiece model on the same text
        spm = SPM_BYTE_S * r.corpus_bytes * scale
        need += costs.SPM_BYTES_PER_BYTE * r.corpus_bytes
        run += spm
        basis.append(f"SentencePiece training: {SPM_BYTE_S * 1e9:g} ns per corpus byte = {fmt_seconds(spm)}, "
                     f"{costs.SPM_BYTES_PER_BYTE:g} B per corpus byte")
    basis.append(f"peak memory {fmt_bytes(need)}")
    return Priced(need, run + STARTUP_S["numpy"] + PLOTS_S, basis, [pool_check(t, need)], {},
                  f"{fmt_bytes(r.corpus_bytes)} corpus, vocab {r.vocab_size:,} ({r.impl})")


def price_skipgram(r: catalog.SkipGram, t: Target, p: Profile, m: Milestone) -> Priced:
    cost = costs.skipgram(r.vocab, r.dim, r.corpus_tokens, r.window, r.negatives, r.epochs)
    rate, fline = cpu_flops(p)
    run = cost.flops / (rate * EFF_GATHER)
    need = costs.PYTHON_NUMPY_BYTES + costs.MATPLOTLIB_BYTES + cost.peak_bytes
    basis = [*cost.basis, fline, f"gather/scatter at efficiency {EFF_GATHER}: {fmt_seconds(run)}",
             f"peak memory {fmt_bytes(need)}"]
    return Priced(need, run + STARTUP_S["numpy"] + PLOTS_S, basis, [pool_check(t, need)], {"params": cost.params},
                  f"V={r.vocab:,} d={r.dim}, {fmt_count(r.corpus_tokens)} tokens x {r.epochs:g}")


def price_vector_search(r: catalog.VectorSearch, t: Target, p: Profile, m: Milestone) -> Priced:
    """B3, B15: embed texts with a sentence encoder (if any), then brute-force search a flat index of n vectors.

    The search protocol is B15's: `queries` in batches plus SEARCH_SINGLES one at a time, at n, n/10
    and n/100 vectors (a latency-against-size sweep); the index is padded with random unit vectors.
    """
    key = "fp16" if r.dtype == "float16" else "fp32"
    singles = min(SEARCH_SINGLES, r.queries)
    cost = costs.vector_search(r.n, r.dim, r.queries, key, singles=singles)
    rate, fline = cpu_flops(p)
    bw, bline = cpu_bandwidth(p)
    build = r.n * r.dim * RNG_ELEM_S                           # random unit vectors fill the index
    index_bytes = cost.memory["index"]
    batched_flops = 2 * r.n * r.dim * r.queries
    batched = max(batched_flops / (rate * EFF_SEARCH_GEMM), (cost.bytes_moved - singles * index_bytes) / bw)
    one_by_one = singles * index_bytes / (bw * EFF_GEMV)       # a matrix-vector product is memory-bound
    search = SEARCH_SWEEP * (batched + one_by_one)
    topk = SEARCH_SWEEP * r.n * (r.queries + singles) * TOPK_ELEM_S
    need = costs.PYTHON_NUMPY_BYTES + costs.MATPLOTLIB_BYTES + cost.peak_bytes
    s = build + search + topk + STARTUP_S["numpy"] + PLOTS_S
    basis = [*cost.basis, fline, bline,
             (f"index fill {fmt_seconds(build)}; batched scores max(compute at efficiency {EFF_SEARCH_GEMM}, memory) "
             f"{fmt_seconds(batched)}; {singles} single queries at {EFF_GEMV} of the bandwidth {fmt_seconds(one_by_one)}; "
             f"all x {SEARCH_SWEEP} (n, n/10, n/100) = {fmt_seconds(search)}; top-k {fmt_seconds(topk)}")]
    if r.embed_texts:
        enc = costs.sentence_encoder(costs.MINILM, r.embed_texts, r.embed_tokens)
        enc_s = ENCODER_LOAD_S + enc.flops / (rate * EFF_ENCODER)
        # the encoder's weights stay; its activations are gone before the index fills: the larger phase counts
        acts = enc.memory["encoder activations"]
        need += enc.peak_bytes - acts + max(0.0, acts - cost.peak_bytes)
        s += enc_s
        basis += [*enc.basis, (f"encoding at efficiency {EFF_ENCODER} (numpy forward pass) + load "
                              f"{ENCODER_LOAD_S:g} s = {fmt_seconds(enc_s)}; its activations are freed before the "
                              f"index fills (the larger of the two counts)")]
    if r.tsne:
        scale, sline = python_speed(p)
        cores = usable_cpus(p)
        share = 1 - TSNE_PARALLEL + TSNE_PARALLEL / cores
        tsne_s = TSNE_S * r.tsne * max(1.0, log2(r.tsne)) * scale * share
        tsne_bytes = costs.SKLEARN_BYTES + r.tsne * TSNE_BYTES_PER_POINT
        need += tsne_bytes
        s += tsne_s + PLOTS_S
        basis += [sline, (f"t-SNE of {r.tsne:,} points (scikit-learn, Barnes-Hut): {TSNE_S * 1e6:g} us x n log2 n "
                          f"x {share:.2g} ({TSNE_PARALLEL:.0%} of it shared by {cores} CPUs) = {fmt_seconds(tsne_s)}; "
                          f"scikit-learn + its arrays {fmt_bytes(tsne_bytes)}; more plots")]
    basis.append(f"peak memory {fmt_bytes(need)}")
    what = f"{fmt_count(r.n)} x {r.dim} vectors, {r.queries:,} queries"
    if r.embed_texts:
        what = f"{r.embed_texts:,} texts embedded, " + what
    return Priced(need, s, basis, [pool_check(t, need)], {}, what,
                  bound="compute" if batched_flops / (rate * EFF_SEARCH_GEMM) > one_by_one else "memory")

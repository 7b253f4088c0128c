"""The planner: which milestones fit this kit, at what size, and how long they take.

    fit(profile, milestone) -> Plan        fit_all(profile, track) -> list[Plan]

For a milestone the planner lists the devices its tiers could use on this kit
(a board, the CPU, a GPU, this machine plus its peers), prices every size on the
milestone's ladder on each (models/costs.py gives parameters, FLOPs, bytes;
this module divides them by the profile's *measured* throughput, times an
efficiency per workload, then corrects by the profile's calibration records),
and picks the largest size whose peak memory fits with headroom and whose time
fits the time box. When nothing fits it says what does not and what would.
Every number comes with its basis, for `tierkit fit --explain`.

Plain arithmetic over plain data: no framework is imported here, and packages
are looked up with importlib.util.find_spec, never imported.
"""
from __future__ import annotations

import functools
import re
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from math import ceil, log2
from pathlib import Path
from typing import Any

from inventory.profile import GPU, BoardSpec, Profile, ProfileError
from models import costs
from models.costs import fmt_bytes, fmt_count
from tiers import catalog
from tiers.catalog import Milestone, Rung
from tiers.plan import Plan, Prediction

# ---------------------------------------------------------------- fit rules

HEADROOM = 0.10          # keep >= 10% of a device's free memory unused (REFERENCE.md)
TIGHT_HEADROOM = 0.20    # under 20% left: the plan fits, but tightly
TIGHT_TIME = 0.70        # over 70% of the time box: tight
TIGHT_LIMIT = 0.70       # within 70% of a latency / speed limit: tight
CALIBRATION_CLAMP = (0.25, 4.0)   # one odd run must not swing a prediction more than 4x

# ---------------------------------------------------------------- efficiency: achieved / measured
# The profile's figures are what a large matmul (FLOP/s) and a STREAM triad (bandwidth)
# reach on the machine. Real workloads reach a fraction of that; these are the fractions.

# GPT training on a GPU (torch, mixed precision): nanoGPT and llm.c report ~35-50% MFU
# against the datasheet peak for GPT-2 124M on A100/H100, and a large bf16 matmul reaches
# ~80% of peak (REFERENCE.md), so ~0.55 of the measured matmul at full width.
EFF_GPU_TRAIN = 0.55
# ... and narrow models leave a GPU idle: utilisation h / (h + 256) (h=768: 0.75, h=128: 0.33).
GPU_HALF_WIDTH = 256
# torch training on a CPU (fp32, oneDNN/MKL): the GEMMs run near the matmul benchmark, the
# rest (layer norm, softmax, GELU, AdamW) is memory-bound; Karpathy's CPU recipe (0.8M params,
# 2000 steps of 12x64 tokens in ~3 min on a MacBook) works out at ~0.3-0.4 of numpy's matmul.
EFF_CPU_TRAIN = 0.40
CPU_HALF_WIDTH = 32
# numpy code written by a learner (B8, B10): no fused kernels, a temporary per operation.
EFF_NUMPY_TRAIN = 0.30
# Eager PyTorch pays fixed time per optimizer micro-step (Python, optimizer, loss sync) and per
# layer (~100-150 eager ops forward + backward at 5-8 us each): what keeps tiny models from
# using a GPU, and why a small model is only 10-50x faster there than on a laptop CPU (REFERENCE.md).
STEP_OVERHEAD_S = 2e-3
LAYER_OVERHEAD_S = 0.8e-3
NUMPY_LAYER_OVERHEAD_S = 0.3e-3   # ~60 numpy calls per layer per step at ~5 us each
# Convolutions (cuDNN / oneDNN) on small images reach less of the matmul rate than GEMMs.
EFF_GPU_CONV = 0.35
EFF_CPU_CONV = 0.30
EFF_TF_CPU_CONV = 0.10            # Keras on a CPU, depthwise convs on 25x5 feature maps (estimate)
EFF_LSTM = 0.30                   # an LSTM steps through time: small matmuls, one per step
EFF_GATHER = 0.05                 # word2vec: row gathers and scatter-adds, not GEMMs (estimate)
EFF_BLAS = 0.70                   # a big GEMM inside a larger program
EFF_SEARCH_GEMM = 0.45            # vector search scores: a skinny (64 x d) @ (d x n) GEMM; 0.42 measured here
EFF_GEMV = 0.5                    # one query: a matrix-vector product streams the index (0.39 of STREAM, 1 thread)
EFF_INFER = 0.50                  # forward passes at batch size ~8 (evaluation, prefill)
INT8_SPEEDUP = 1.5                # torch dynamic int8 GEMM vs fp32 on AVX2/VNNI CPUs (estimate)
# LLM decode reaches 50-70% of the bandwidth bound (REFERENCE.md); the profile's bandwidth is
# already a STREAM figure (70-85% of spec), so ~0.8 of it.
EFF_DECODE = 0.80
EFF_PREFILL_LLAMA = 0.50          # llama.cpp prompt processing vs the matmul rate (estimate)
TOKEN_OVERHEAD_S = {"llama.cpp": 0.5e-3, "torch": 1e-3}   # per decoded token: sampling, graph, Python
TORCH_DECODE_LAYER_S = 0.15e-3    # eager torch decode: ~20 kernel launches per layer per token
# Python-bound work at a 3.5 GHz reference core (scaled by the profile's clock):
REF_CLOCK_MHZ = 3500
PY_Q_STEP_S = 2e-6               # one Q-learning step: env step, argmax over a numpy row, update (2.3 us measured at 2.3 GHz)
Q_EPISODE_FILL = 0.2              # episodes end early at the goal: 0.11-0.31 of max_steps measured
PY_BPE_ELEM_S = 1.25e-7           # one list element per pass of a naive (minbpe-style) BPE merge
NUMPY_BPE_ELEM_S = 17e-9          # one distinct-chunk byte per merge of B2's numpy trainer (np.unique's sort)
TIKTOKEN_LOAD_S = 0.3             # parse gpt2 + cl100k .tiktoken files, build both encoders
SPM_BYTE_S = 0.1e-6               # SentencePiece BPE training per corpus byte (0.14 s for 900 KB here)
NATIVE_ELEM_S = 1e-8              # a Rust tokenizer trainer, per element step
PY_SCALAR_OP_S = 1e-6             # micrograd: one Python Value object per scalar operation
RNG_ELEM_S = 16e-9                # rng.standard_normal + astype, per element (0.26 s for 4096^2 here)
NUMPY_CALL_S = 5e-6               # one numpy call's fixed cost
TOPK_ELEM_S = 2.5e-9              # np.argpartition per score (2.5 ns on a 1M-float row here)
SEARCH_SINGLES = 50               # B15 times this many queries one at a time (latency) ...
SEARCH_SWEEP = 1.11               # ... and everything at n, n/10 and n/100 vectors
EFF_ENCODER = 0.25                # MiniLM's forward pass in numpy: GEMMs of ~2K rows, softmax, GELU (estimate)
ENCODER_LOAD_S = 0.3              # read 91 MB of safetensors, transpose, load the tokenizer
TSNE_S = 2.8e-4                   # scikit-learn t-SNE (Barnes-Hut, 1000 iterations) per n*log2(n) (16 s for 5,000 here)
TSNE_BYTES_PER_POINT = 2_000      # its sparse affinities (3 x perplexity neighbours) and 50-d input
DISK_BPS = 1.5e9                  # reading a model file: an NVMe SSD (a page-cached file loads faster)
# Microcontrollers: int8 MACs per clock cycle with CMSIS-NN-style kernels. MLPerf Tiny's DS-CNN
# (2.66M MACs) takes 182 ms on a 120 MHz Cortex-M4 with TFLite Micro (0.12/cycle) and 72-100 ms
# with vendor stacks (0.22-0.31): 0.15 for a Cortex-M4. M0+ has no DSP/SIMD; ESP32-S3 has ESP-NN's
# 128-bit SIMD (estimates).
MACS_PER_CYCLE = {"cortex-m0": 0.05, "cortex-m3": 0.08, "cortex-m4": 0.15, "cortex-m7": 0.30,
                  "cortex-m33": 0.15, "cortex-m55": 0.50, "xtensa lx6": 0.10, "xtensa lx7": 0.30}
FIRMWARE_SRAM_BYTES = 80_000      # our QEMU image outside the arena: 32 KB test-mode clip buffer, 16 KB audio ring, 8 KB stack
FIRMWARE_FLASH_BYTES = 200_000    # board core/RTOS, feature front-end, int8 kernels (estimate)
FEATURE_S_PER_CLIP = 2e-3         # MFCC of a 1-s clip in numpy (estimate)
TOOLCHAIN_S = 180.0               # convert, verify on TFLM, export C, build, flash (estimate)
# Startup of the process and its framework (import, device init), and the plots.
STARTUP_S = {"python": 0.3, "numpy": 0.3, "torch": 3.0, "tensorflow": 8.0, "llama.cpp": 1.0}
CUDA_INIT_S = 2.0
PLOTS_S = 1.5
RPC_TOKEN_S = 1e-3                # llama.cpp RPC: ~1 ms fixed per token per remote hop (REFERENCE.md)
DEFAULT_CPU_GFLOPS = 50.0         # when a profile has no CPU figures at all
DEFAULT_BANDWIDTH_GBS = 10.0


class FitError(Exception):
    """A request the planner cannot answer (unknown size, a tier the milestone lacks); one line."""


# ---------------------------------------------------------------- where a plan can run

@dataclass(frozen=True)
class Node:
    """One machine of a tier-3 cluster."""

    name: str
    memory_free: float
    bandwidth: float          # bytes/s
    flops: float              # FLOP/s (fp32 matmul)
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class Target:
    """A device a milestone could run on, with what the planner needs to know about it."""

    tier: int
    device: str               # Plan.device: cpu, cuda:0, mps, board:/dev/ttyACM0, cluster:2
    kind: str                 # cpu | cuda | mps | board | cluster
    label: str
    memory_free: float        # bytes free in the pool the run allocates from
    memory_basis: str
    unified: bool = False     # GPU and CPU share one memory: it is counted once
    gpu: GPU | None = None
    board: BoardSpec | None = None
    nodes: tuple[Node, ...] = ()
    link: tuple[float, float] = (0.0, 0.0)   # cluster: (round trip s, bytes/s)


def _source(fig: Any) -> str:
    return "measured" if fig.source == "measured" else \
        f"{fig.source} figure, not measured: run `tierkit probe` on the machine for a measured one"


def cpu_flops(p: Profile, dtype: str = "fp32") -> tuple[float, str]:
    """The CPU's matmul FLOP/s for a dtype (16-bit work on a CPU runs at the fp32 rate)."""
    key = "fp64" if dtype in ("fp64", "float64") else "fp32"
    c = p.cpu
    if c and key in c.matmul_gflops:
        f = c.matmul_gflops[key]
        return f.value * 1e9, f"CPU {key} matmul {f.value:g} GFLOP/s ({_source(f)})"
    peak = c and (c.peak_fp64_gflops if key == "fp64" else c.peak_fp32_gflops)
    if peak:
        return peak.value * 0.5e9, f"CPU {key}: half the {peak.value:g} GFLOP/s peak (no matmul figure; run `tierkit probe`)"
    return DEFAULT_CPU_GFLOPS * 1e9, f"CPU: no throughput in the profile, assumed {DEFAULT_CPU_GFLOPS:g} GFLOP/s; run `tierkit probe`"


def cpu_bandwidth(p: Profile) -> tuple[float, str]:
    c = p.cpu
    if c and c.memory_bandwidth_gbs:
        f = c.memory_bandwidth_gbs
        return f.value * 1e9, f"CPU memory bandwidth {f.value:g} GB/s ({_source(f)})"
    return DEFAULT_BANDWIDTH_GBS * 1e9, f"CPU: no bandwidth in the profile, assumed {DEFAULT_BANDWIDTH_GBS:g} GB/s"


def gpu_flops(g: GPU, dtype: str) -> tuple[float, str]:
    order = {"bf16": ("bf16", "fp16", "fp32"), "fp16": ("fp16", "bf16", "fp32")}.get(dtype, ("fp32",))
    for key in order:
        if key in g.matmul_tflops:
            f = g.matmul_tflops[key]
            alt = "" if key == dtype else f" (no {dtype} figure)"
            return f.value * 1e12, f"{g.model} {key} matmul {f.value:g} TFLOP/s{alt} ({_source(f)})"
    return 5e12, f"{g.model}: no FLOP/s in the profile, assumed 5 TFLOP/s; run `tierkit probe`"


def gpu_bandwidth(g: GPU) -> tuple[float, str]:
    if g.memory_bandwidth_gbs:
        f = g.memory_bandwidth_gbs
        return f.value * 1e9, f"{g.model} memory bandwidth {f.value:g} GB/s ({_source(f)})"
    return 200e9, f"{g.model}: no bandwidth in the profile, assumed 200 GB/s"


def flops(p: Profile, t: Target, dtype: str) -> tuple[float, str]:
    return gpu_flops(t.gpu, dtype) if t.gpu else cpu_flops(p, dtype)


def bandwidth(p: Profile, t: Target) -> tuple[float, str]:
    return gpu_bandwidth(t.gpu) if t.gpu else cpu_bandwidth(p)


def mixed_dtype(t: Target) -> str:
    """What a torch run computes in: bf16 autocast on Ampere+ CUDA, fp16 on older GPUs and MPS, fp32 on a CPU."""
    g = t.gpu
    if g is None:
        return "fp32"
    if g.backend in ("cuda", "rocm"):
        cc = g.compute_capability
        ampere = float(cc.split(".")[0]) >= 8 if cc else "bf16" in g.matmul_tflops
        return "bf16" if ampere else "fp16"
    return "fp16"


def python_speed(p: Profile) -> tuple[float, str]:
    """Python-bound work scales with the core clock (relative to a 3.5 GHz reference core)."""
    mhz = p.cpu.clock_mhz if p.cpu and p.cpu.clock_mhz else REF_CLOCK_MHZ
    scale = min(3.0, max(0.5, REF_CLOCK_MHZ / mhz))
    return scale, f"Python-bound work x {scale:.2g} (clock {mhz:g} MHz vs a {REF_CLOCK_MHZ} MHz reference)"


def _free_memory(p: Profile) -> tuple[float, str]:
    if p.memory:
        return float(p.memory.available_bytes), f"{fmt_bytes(p.memory.available_bytes)} available RAM"
    return 2e9, "no memory figure in the profile: assumed 2 GB free; run `tierkit probe`"


def cpu_target(p: Profile) -> Target:
    free, basis = _free_memory(p)
    name = p.cpu.model if p.cpu else "CPU"
    return Target(1, "cpu", "cpu", f"cpu ({name})", free, basis)


def gpu_targets(p: Profile, backends: list[str]) -> list[Target]:
    out, n = [], 0
    for g in p.gpus:
        if g.backend not in ("cuda", "rocm", "mps"):
            continue
        index = g.index if g.index is not None else n
        n += 1
        if g.backend not in backends:
            continue
        device = "mps" if g.backend == "mps" else f"cuda:{index}"
        if g.unified_memory:
            # one pool: what the GPU may allocate is what the system has free
            ram, _ = _free_memory(p)
            free = min(x for x in (g.memory_free_bytes, ram) if x is not None)
            basis = f"{fmt_bytes(free)} free of unified memory (counted once for CPU and GPU)"
        else:
            free = g.memory_free_bytes or (g.memory_bytes or 0) * 0.95
            basis = f"{fmt_bytes(free)} free GPU memory"
        out.append(Target(2, device, "mps" if g.backend == "mps" else "cuda", f"{device} ({g.model})", free,
                          basis, unified=g.unified_memory, gpu=g))
    return out


def boards(p: Profile) -> list[tuple[str, BoardSpec]]:
    """(port, spec) of every attached board whose spec is known; a bridge chip counts as its smallest candidate."""
    out = []
    for b in p.boards:
        spec = b.board or (min(b.candidates, key=lambda c: c.sram_bytes) if b.candidates else None)
        if spec is not None and b.access != "denied":
            out.append((b.port or "?", spec))
    return out


def board_target(p: Profile, need: catalog.BoardNeed) -> tuple[Target | None, str | None]:
    """The board with the most SRAM among those big enough; else why none will do."""
    found = boards(p)
    big = [(port, s) for port, s in found
           if s.sram_bytes >= need.min_sram_kb * 1024 and s.flash_bytes >= need.min_flash_kb * 1024]
    if not big:
        what = f"a microcontroller board (>= {need.min_sram_kb} KB SRAM, >= {need.min_flash_kb} KB flash)"
        if found:
            have = ", ".join(f"{s.name} ({s.sram_bytes // 1024} KB SRAM, {s.flash_bytes // 1024} KB flash)"
                             for _, s in found)
            return None, f"needs {what}; attached: {have}"
        denied = [b.port for b in p.boards if b.access == "denied"]
        if denied:
            return None, (f"needs {what}; no permission on {', '.join(str(d) for d in denied)}: "
                          "add yourself to the dialout group and re-run `tierkit probe`")
        return None, f"needs {what}: attach one and re-run `tierkit probe`"
    port, spec = max(big, key=lambda ps: ps[1].sram_bytes)
    return Target(0, f"board:{port}", "board", f"{spec.name} on {port}", float(spec.sram_bytes),
                  f"{spec.name}: {spec.sram_bytes // 1024} KB SRAM, {spec.flash_bytes // 1024} KB flash",
                  board=spec), None


def cluster_nodes(p: Profile) -> list[Node]:
    """This machine, then every peer without a problem, with what each can give a model split."""
    free, _ = _free_memory(p)
    bw, _ = cpu_bandwidth(p)
    fl, _ = cpu_flops(p)
    nodes = [Node(p.name or "this machine", free, bw, fl)]
    for q in p.peers:
        if q.problem:
            continue
        s, notes = q.summary or {}, []
        mem = s.get("memory_available_bytes")
        if mem is None and (total := s.get("memory_bytes") or s.get("memory_total_bytes")):
            mem = 0.75 * total
            notes.append(f"{q.name or q.address}: free memory taken as 75% of {fmt_bytes(total)}")
        if mem is None:
            notes.append(f"{q.name or q.address}: reports no memory; assumed like this machine")
            mem = free
        peer_bw = (s.get("memory_bandwidth_gbs") or 0) * 1e9
        if not peer_bw:
            peer_bw = bw
            notes.append(f"{q.name or q.address}: no bandwidth reported, assumed as this machine's")
        peer_fl = (s.get("cpu_matmul_gflops_fp32") or 0) * 1e9 or fl
        nodes.append(Node(q.name or q.address, float(mem), peer_bw, peer_fl, tuple(notes)))
    return nodes


def cluster_target(p: Profile, nodes_needed: int) -> tuple[Target | None, str | None]:
    nodes = cluster_nodes(p)
    if len(nodes) < nodes_needed:
        return None, (f"needs {nodes_needed} nodes: this profile has {len(nodes)}; run `tierkit agent` on a "
                      "second machine on the LAN and re-run `tierkit probe` here to find it")
    peers = [q for q in p.peers if not q.problem]
    rtt = max((q.rtt_ms.value / 1e3 for q in peers if q.rtt_ms), default=0.5e-3)
    link = min((q.bandwidth_mbps.value * 1e6 / 8 for q in peers if q.bandwidth_mbps), default=100e6 / 8)
    free = sum(n.memory_free for n in nodes)
    return Target(3, f"cluster:{len(nodes)}", "cluster", " + ".join(n.name for n in nodes), free,
                  f"{fmt_bytes(free)} free across {len(nodes)} nodes", nodes=tuple(nodes),
                  link=(rtt, link)), None


def targets(p: Profile, m: Milestone) -> tuple[list[Target], list[str]]:
    """The devices the milestone's tiers could use here, in preference order; and why others cannot."""
    found: list[Target] = []
    why: list[str] = []
    for tier in m.tiers:
        if tier == 0:
            t, reason = board_target(p, m.needs.board)  # the catalog guarantees a board need on tier 0
        elif tier == 1:
            t, reason = cpu_target(p), None
        elif tier == 2:
            gpus = gpu_targets(p, m.needs.gpu_backends)
            found += gpus
            if not gpus and m.needs.gpu == "required":
                why.append(f"needs a {' or '.join(b.upper() for b in m.needs.gpu_backends)} GPU: this profile has "
                           + ("none" if not p.gpus else ", ".join(f"{g.model} ({g.backend})" for g in p.gpus)))
            continue
        else:
            t, reason = cluster_target(p, m.needs.nodes)
        if t:
            found.append(t)
        if reason:
            why.append(reason)
    return found, why


# ---------------------------------------------------------------- checks

@dataclass
class Check:
    """One constraint on a sized plan: memory on a device, the time box, a latency or speed limit."""

    what: str
    ok: bool
    tight: bool
    text: str


def memory_check(what: str, need: float, free: float) -> Check:
    ok = need <= free * (1 - HEADROOM)
    tight = ok and need > free * (1 - TIGHT_HEADROOM)
    share = need / free if free else float("inf")
    if not ok:
        text = (f"{what}: needs {fmt_bytes(need)}, over the {fmt_bytes(free * (1 - HEADROOM))} usable "
                f"(90% of {fmt_bytes(free)} free)")
    else:
        text = f"{what}: {fmt_bytes(need)} of {fmt_bytes(free)} free ({share:.0%}" + \
               (", under 20% headroom)" if tight else ")")
    return Check(what, ok, tight, text)


def time_check(seconds: float, m: Milestone) -> Check:
    box = m.time_box.budget_seconds
    ok = seconds <= box
    tight = ok and seconds > TIGHT_TIME * box
    text = f"time: {fmt_seconds(seconds)} of the {fmt_seconds(box)} box ({seconds / box:.0%})"
    return Check("time", ok, tight, text + (", over it" if not ok else ", over 70%" if tight else ""))


def limit_check(what: str, value: float, limit: float, at_least: bool, unit: str) -> Check:
    """A value that must stay under (latency) or over (tokens/s) a limit."""
    used = limit / value if at_least else value / limit     # 1.0 = exactly at the limit
    ok, tight = used <= 1, TIGHT_LIMIT < used <= 1
    rel = ">=" if at_least else "<="
    text = f"{what}: {value:.3g} {unit} (needs {rel} {limit:g} {unit})"
    return Check(what, ok, tight, text + (", close to the limit" if tight else ""))


def fmt_seconds(s: float) -> str:
    if s < 1:
        return f"{s * 1e3:.0f} ms"
    if s < 120:
        return f"{s:.3g} s"
    if s < 2 * 3600:
        return f"{s / 60:.3g} min"
    return f"{s / 3600:.3g} h"


# ---------------------------------------------------------------- pricing: one function per cost model

@dataclass
class Priced:
    """A size priced on a device."""

    peak_bytes: float                 # on the target's memory (a board: its SRAM; a cluster: the fullest node)
    seconds: float
    basis: list[str]
    checks: list[Check]               # memory and limits (the time check is added after calibration)
    config: dict[str, Any] = field(default_factory=dict)   # derived numbers the runner may use
    summary: str = ""                 # one phrase for the table
    bound: str = "compute"


def _pool(t: Target, need: float) -> Check:
    return memory_check(f"memory on {t.device}", need, t.memory_free)


def _runtime(framework: str, t: Target) -> tuple[dict[str, float], list[str]]:
    """Bytes in the target's pool before the workload allocates: the process, the CUDA context.

    A discrete GPU holds the CUDA context (the process lives in host RAM); a unified
    pool holds both, counted once.
    """
    if t.kind == "cuda" and not t.unified:
        parts, line = costs.runtime_overhead(framework, on_gpu=True)
        return parts, [line]
    parts, line = costs.runtime_overhead(framework)
    lines = [line]
    if t.kind == "cuda":  # unified memory with CUDA (Jetson): the context is in the same pool
        ctx, ctx_line = costs.runtime_overhead(framework, on_gpu=True)
        parts.update(ctx)
        lines.append(ctx_line + " (same pool)")
    return parts, lines


def _steps_overhead(micro_steps: float, layers: int, t: Target, framework: str) -> tuple[float, str]:
    if framework == "numpy":
        per = layers * NUMPY_LAYER_OVERHEAD_S
    else:
        per = STEP_OVERHEAD_S + layers * LAYER_OVERHEAD_S
    s = micro_steps * per
    return s, f"fixed cost per step: {micro_steps:,.0f} steps x {per * 1e3:.2g} ms = {fmt_seconds(s)}"


def _width_util(width: int, t: Target) -> float:
    half = GPU_HALF_WIDTH if t.gpu else CPU_HALF_WIDTH
    return width / (width + half)


def _train_time(p: Profile, t: Target, flop: float, width: int, dtype: str, framework: str,
                eff_gpu: float = EFF_GPU_TRAIN, eff_cpu: float = EFF_CPU_TRAIN) -> tuple[float, list[str]]:
    """FLOPs over (measured FLOP/s x efficiency x width utilisation)."""
    rate, line = flops(p, t, dtype)
    eff = EFF_NUMPY_TRAIN if framework == "numpy" else (eff_gpu if t.gpu else eff_cpu)
    util = _width_util(width, t)
    s = flop / (rate * eff * util)
    return s, [line, f"compute: {flop:.3g} FLOP / ({rate / 1e12:.3g} TFLOP/s x efficiency {eff:g} x width "
                     f"utilisation {util:.2f}) = {fmt_seconds(s)}"]


def _startup(framework: str, t: Target, plots: bool) -> tuple[float, str]:
    s = STARTUP_S[framework] + (CUDA_INIT_S if t.kind == "cuda" else 0) + (PLOTS_S if plots else 0)
    return s, f"startup ({framework}{', CUDA init' if t.kind == 'cuda' else ''}{', plots' if plots else ''}): {s:g} s"


def price_gpt_train(r: catalog.GPTTrain, t: Target, p: Profile, m: Milestone) -> Priced:
    shape = costs.GPTShape(r.vocab_size, r.block_size, r.n_layer, r.n_head, r.n_embd, r.bias)
    numpy = r.framework == "numpy"
    dtype = "fp32" if numpy else mixed_dtype(t)
    flash = not numpy and t.kind != "mps"
    tokens = r.steps * r.grad_accum * r.batch_size * r.block_size
    cost = costs.gpt_train(shape, r.batch_size, tokens, dtype, flash)
    runtime, rt_lines = _runtime(r.framework, t)
    if numpy and "matplotlib" in m.needs.packages:   # a numpy milestone plots in the same process (B10)
        runtime["matplotlib"] = costs.MATPLOTLIB_BYTES
        rt_lines.append(f"matplotlib {fmt_bytes(costs.MATPLOTLIB_BYTES)}")
    need = cost.peak_bytes + sum(runtime.values())
    compute, lines = _train_time(p, t, cost.flops, r.n_embd, dtype, r.framework)
    over, over_line = _steps_overhead(r.steps * r.grad_accum, r.n_layer, t, r.framework)
    start, start_line = _startup(r.framework, t, "matplotlib" in m.needs.packages)
    basis = [*cost.basis, *rt_lines, f"peak memory = {fmt_bytes(need)}", *lines, over_line, start_line]
    summary = (f"{fmt_count(cost.params)} params, L{r.n_layer} h{r.n_embd} ctx{r.block_size}, "
               f"{fmt_count(tokens)} tokens, {dtype}")
    return Priced(need, compute + over + start, basis, [_pool(t, need)],
                  {"params": cost.params, "tokens": tokens, "dtype": dtype}, summary)


def price_dpo(r: catalog.DPO, t: Target, p: Profile, m: Milestone) -> Priced:
    """DPO: the policy trains on chosen and rejected (2 sequences a pair); a frozen reference scores both."""
    shape = costs.GPTShape(r.vocab_size, r.block_size, r.n_layer, r.n_head, r.n_embd, r.bias)
    dtype = mixed_dtype(t)
    seq_tokens = r.pairs * 2 * r.seq * r.epochs
    cost = costs.gpt_train(shape, 2 * r.batch_size, seq_tokens, dtype, t.kind != "mps", seq=r.seq)
    ref_bytes = cost.params * (2 if dtype != "fp32" else 4)
    ref_flops = 2 * cost.extra["matmul_params"] * seq_tokens
    runtime, rt_lines = _runtime("torch", t)
    need = cost.peak_bytes + ref_bytes + sum(runtime.values())
    compute, lines = _train_time(p, t, cost.flops + ref_flops, r.n_embd, dtype, "torch")
    over, over_line = _steps_overhead(ceil(r.pairs * r.epochs / r.batch_size) * 2, r.n_layer, t, "torch")
    start, start_line = _startup("torch", t, True)
    basis = [*cost.basis, f"reference model ({dtype}) {fmt_bytes(ref_bytes)}; its forward passes "
                          f"2*N per token = {ref_flops:.3g} FLOP", *rt_lines, f"peak memory = {fmt_bytes(need)}",
             *lines, over_line, start_line]
    summary = f"{fmt_count(cost.params)} params, {r.pairs:,} pairs x {r.seq} tokens, {dtype}"
    return Priced(need, compute + over + start, basis, [_pool(t, need)],
                  {"params": cost.params, "dtype": dtype}, summary)


def price_quant_lab(r: catalog.QuantLab, t: Target, p: Profile, m: Milestone) -> Priced:
    """Quantise a GPT to int8 and evaluate both: fp32 weights + int8 copy; two evaluation passes."""
    shape = costs.GPTShape(r.vocab_size, r.block_size, r.n_layer, r.n_head, r.n_embd, r.bias)
    n = costs.gpt_params(shape)
    q = costs.int8_copy(shape)
    fp32 = 4 * n
    acts = r.batch_size * r.block_size * (4 * r.n_embd) * 4 * 2 + costs.logits_bytes(r.batch_size, r.block_size,
                                                                                    r.vocab_size) / 2
    runtime, rt_lines = _runtime("torch", t)
    need = fp32 + q.peak_bytes + acts + sum(runtime.values())
    flop = 2 * costs.gpt_matmul_params(shape) * r.eval_tokens
    rate, line = flops(p, t, "fp32")
    s_fp32 = flop / (rate * EFF_INFER)
    s_int8 = flop / (rate * EFF_INFER * INT8_SPEEDUP)
    start, start_line = _startup("torch", t, True)
    basis = [costs.gpt_params_basis(shape), f"fp32 weights {fmt_bytes(fp32)}", *q.basis,
             f"activations of one batch + logits {fmt_bytes(acts)}", *rt_lines, f"peak memory = {fmt_bytes(need)}",
             line, f"evaluation: 2*N*{r.eval_tokens:,} tokens = {flop:.3g} FLOP, fp32 at efficiency {EFF_INFER} "
                   f"({fmt_seconds(s_fp32)}), int8 {INT8_SPEEDUP}x faster ({fmt_seconds(s_int8)})", start_line]
    return Priced(need, s_fp32 + s_int8 + start, basis, [_pool(t, need)], {"params": n},
                  f"{fmt_count(n)} params, fp32 vs int8 on {fmt_count(r.eval_tokens)} tokens")


def _decode(p: Profile, t: Target, per_token_bytes: float, framework: str, layers: int) -> tuple[float, str]:
    """Seconds per decoded token: the bytes each token reads over the bandwidth, plus fixed costs."""
    bw, line = bandwidth(p, t)
    s = per_token_bytes / (bw * EFF_DECODE) + TOKEN_OVERHEAD_S[framework]
    if framework == "torch":
        s += layers * TORCH_DECODE_LAYER_S
    return s, f"{line}; decode: {fmt_bytes(per_token_bytes)} per token / ({bw / 1e9:.3g} GB/s x {EFF_DECODE}) " \
              f"+ fixed = {s * 1e3:.3g} ms per token ({1 / s:.3g} tokens/s)"


def price_gpt_infer(r: catalog.GPTInfer, t: Target, p: Profile, m: Milestone) -> Priced:
    shape = costs.GPTShape(r.vocab_size, r.block_size, r.n_layer, r.n_head, r.n_embd, r.bias)
    dtype = r.dtype if r.dtype != "auto" else mixed_dtype(t)
    cost = costs.gpt_infer(shape, dtype, r.ctx, r.new_tokens, r.prompt_tokens, 1, r.requests)
    runtime, rt_lines = _runtime("torch", t)
    need = cost.peak_bytes + sum(runtime.values())
    per_tok, dline = _decode(p, t, cost.extra["bytes_per_token"], "torch", r.n_layer)
    rate, fline = flops(p, t, dtype)
    prefill = 2 * costs.gpt_matmul_params(shape) * cost.extra["prefill_tokens"] / (rate * EFF_INFER)
    decode = per_tok * cost.extra["decode_tokens"]
    start, start_line = _startup("torch", t, False)
    basis = [*cost.basis, *rt_lines, f"peak memory = {fmt_bytes(need)}", fline,
             f"prefill {fmt_count(cost.extra['prefill_tokens'])} tokens: {fmt_seconds(prefill)}", dline,
             f"decode {fmt_count(cost.extra['decode_tokens'])} tokens: {fmt_seconds(decode)}", start_line]
    checks = [_pool(t, need)]
    if r.min_tokens_per_s:
        checks.append(limit_check("decode speed", 1 / per_tok, r.min_tokens_per_s, True, "tokens/s"))
    return Priced(need, prefill + decode + start, basis, checks,
                  {"params": cost.params, "dtype": dtype, "tokens_per_s": round(1 / per_tok, 2)},
                  f"{fmt_count(cost.params)} params {dtype}, {1 / per_tok:.3g} tokens/s", bound="memory")


def price_gguf_decode(r: catalog.GGUF, t: Target, p: Profile, m: Milestone) -> Priced:
    cost = costs.gguf(r.model, r.quant, r.ctx, r.prompt_tokens, r.new_tokens, r.requests)
    runtime, rt_lines = _runtime("llama.cpp", t)
    need = cost.peak_bytes + sum(runtime.values())
    per_tok, dline = _decode(p, t, cost.extra["bytes_per_token"], "llama.cpp", 0)
    rate, fline = flops(p, t, "fp16" if t.gpu else "fp32")
    prefill = cost.flops * cost.extra["prefill_tokens"] / (cost.extra["prefill_tokens"] + cost.extra["decode_tokens"]) \
        / (rate * EFF_PREFILL_LLAMA)
    load = cost.memory["weights"] / DISK_BPS
    decode = per_tok * cost.extra["decode_tokens"]
    start, start_line = _startup("llama.cpp", t, False)
    basis = [*cost.basis, *rt_lines, f"peak memory = {fmt_bytes(need)}",
             f"load: {fmt_bytes(cost.memory['weights'])} from disk at {DISK_BPS / 1e9:g} GB/s = {fmt_seconds(load)}",
             fline, f"prefill {fmt_count(cost.extra['prefill_tokens'])} tokens at efficiency {EFF_PREFILL_LLAMA}: "
                    f"{fmt_seconds(prefill)}", dline, f"decode {fmt_count(cost.extra['decode_tokens'])} tokens: "
                                                      f"{fmt_seconds(decode)}", start_line]
    checks = [_pool(t, need)]
    if r.min_tokens_per_s:
        checks.append(limit_check("decode speed", 1 / per_tok, r.min_tokens_per_s, True, "tokens/s"))
    return Priced(need, load + prefill + decode + start, basis, checks,
                  {"params": cost.params, "tokens_per_s": round(1 / per_tok, 2)},
                  f"{r.model} {r.quant}, {1 / per_tok:.3g} tokens/s", bound="memory")


def price_gguf_split(r: catalog.GGUF, t: Target, p: Profile, m: Milestone) -> Priced:
    """llama.cpp over RPC: layers split in proportion to free memory; each token crosses every boundary."""
    cost = costs.gguf(r.model, r.quant, r.ctx, r.prompt_tokens, r.new_tokens, r.requests)
    nodes = t.nodes
    total_free = sum(n.memory_free for n in nodes)
    model_bytes = cost.memory["weights"] + cost.memory["KV cache"]
    rtt, link = t.link
    checks, basis, per_node = [], [*cost.basis], []
    per_tok = 0.0
    for i, n in enumerate(nodes):
        share = n.memory_free / total_free
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
    remote = (1 - nodes[0].memory_free / total_free) * cost.memory["weights"]
    load = cost.memory["weights"] / DISK_BPS + remote / link
    flop_rate = sum(n.flops for n in nodes)
    prefill = 2 * cost.params * cost.extra["prefill_tokens"] / (flop_rate * EFF_PREFILL_LLAMA) \
        + hops * cost.extra["prefill_tokens"] * hidden_bytes / link
    decode = per_tok * cost.extra["decode_tokens"]
    basis += [f"per token: {hops} hop(s) x (round trip {rtt * 1e3:.2g} ms + 2 x {fmt_bytes(hidden_bytes)} over "
              f"{link * 8 / 1e6:g} Mbit/s + RPC {RPC_TOKEN_S * 1e3:g} ms) = {hop_s * 1e3:.3g} ms; "
              f"{per_tok * 1e3:.3g} ms per token in all ({1 / per_tok:.3g} tokens/s)",
              f"load: read {fmt_bytes(cost.memory['weights'])} + send {fmt_bytes(remote)} to the peers = "
              f"{fmt_seconds(load)}", f"prefill {fmt_seconds(prefill)}, decode {fmt_seconds(decode)}"]
    if r.min_tokens_per_s:
        checks.append(limit_check("decode speed", 1 / per_tok, r.min_tokens_per_s, True, "tokens/s"))
    split = {n.name: round(n.memory_free / total_free, 3) for n in nodes}
    return Priced(max(per_node), load + prefill + decode + STARTUP_S["llama.cpp"], basis, checks,
                  {"params": cost.params, "split": split, "node_bytes": [round(x) for x in per_node],
                   "tokens_per_s": round(1 / per_tok, 2)},
                  f"{r.model} {r.quant} over {len(nodes)} nodes, {1 / per_tok:.3g} tokens/s", bound="memory")


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
                  f"GPU memory: CUDA context + 2 x 512 MiB copy buffers (kept in torch's cache) + 3 n^2 x 4 = "
                  f"{fmt_bytes(gpu_peak)}"]
        peak = gpu_peak
        checks.append(memory_check("memory on host", host_peak + costs.TORCH_BYTES, _free_memory(p)[0]))
    else:
        peak = host_peak
    total += PLOTS_S + STARTUP_S["numpy"]
    basis.append(f"peak memory: Python + numpy + max(triad arrays, largest size's matrices with the float64 "
                 f"randoms) = {fmt_bytes(host_peak)}" + (" on the host" if t.kind == "cuda" else ""))
    checks.insert(0, _pool(t, peak))
    return Priced(peak, total, basis, checks, {},
                  f"n = {r.n_min}..{r.n_max} {r.dtype}" + (" + torch on the GPU" if t.kind == "cuda" else ""))


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
    return Priced(need, s, basis, [_pool(t, need)], {}, "probe + benchmarks" if r.bench else "probe")


def price_tabular_q(r: catalog.TabularQ, t: Target, p: Profile, m: Milestone) -> Priced:
    cost = costs.tabular_q(r.states, r.actions, r.episodes, r.max_steps)
    scale, sline = python_speed(p)
    run = cost.extra["python_steps"] * Q_EPISODE_FILL * PY_Q_STEP_S * scale
    need = costs.PYTHON_NUMPY_BYTES + costs.MATPLOTLIB_BYTES + cost.peak_bytes
    s = run + STARTUP_S["numpy"] + PLOTS_S
    basis = [*cost.basis, sline, f"{Q_EPISODE_FILL:g} x steps x {PY_Q_STEP_S * 1e6:g} us = {fmt_seconds(run)}",
             f"peak memory: Python + numpy + matplotlib + Q table = {fmt_bytes(need)}"]
    return Priced(need, s, basis, [_pool(t, need)], {}, f"{r.env}: {r.states} states, {r.episodes:,} episodes")


def price_bpe(r: catalog.BPE, t: Target, p: Profile, m: Milestone) -> Priced:
    cost = costs.bpe(r.corpus_bytes, r.vocab_size, r.impl)
    scale, sline = python_speed(p)
    run = (cost.extra["python_steps"] * PY_BPE_ELEM_S + cost.extra["native_steps"] * NATIVE_ELEM_S
           + cost.extra.get("numpy_steps", 0) * NUMPY_BPE_ELEM_S) * scale
    need = costs.PYTHON_NUMPY_BYTES + costs.MATPLOTLIB_BYTES + cost.peak_bytes
    basis = [*cost.basis, sline, f"{PY_BPE_ELEM_S * 1e9:g} ns per Python element step, {NATIVE_ELEM_S * 1e9:g} ns "
                                 f"native, {NUMPY_BPE_ELEM_S * 1e9:g} ns numpy: {fmt_seconds(run)}"]
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
    return Priced(need, run + STARTUP_S["numpy"] + PLOTS_S, basis, [_pool(t, need)], {},
                  f"{fmt_bytes(r.corpus_bytes)} corpus, vocab {r.vocab_size:,} ({r.impl})")


def price_skipgram(r: catalog.SkipGram, t: Target, p: Profile, m: Milestone) -> Priced:
    cost = costs.skipgram(r.vocab, r.dim, r.corpus_tokens, r.window, r.negatives, r.epochs)
    rate, fline = cpu_flops(p)
    run = cost.flops / (rate * EFF_GATHER)
    need = costs.PYTHON_NUMPY_BYTES + costs.MATPLOTLIB_BYTES + cost.peak_bytes
    basis = [*cost.basis, fline, f"gather/scatter at efficiency {EFF_GATHER}: {fmt_seconds(run)}",
             f"peak memory {fmt_bytes(need)}"]
    return Priced(need, run + STARTUP_S["numpy"] + PLOTS_S, basis, [_pool(t, need)], {"params": cost.params},
                  f"V={r.vocab:,} d={r.dim}, {fmt_count(r.corpus_tokens)} tokens x {r.epochs:g}")


_OPT_BYTES = {"sgd": 0, "momentum": 4, "adam": 8}


def price_mlp_train(r: catalog.MLPTrain, t: Target, p: Profile, m: Milestone) -> Priced:
    data = r.samples * r.widths[0] * 4
    cost = costs.mlp_train(r.widths, r.samples, r.epochs, r.batch, "fp32", _OPT_BYTES[r.optimizer],
                           0 if (t.gpu and not t.unified) else data)
    framework = "python" if r.framework == "python" else r.framework
    runtime, rt_lines = _runtime("torch" if framework == "torch" else "numpy", t)
    need = cost.peak_bytes + sum(runtime.values()) + (costs.MATPLOTLIB_BYTES if not t.gpu else 0)
    layers = len(r.widths) - 1
    steps = ceil(r.samples / r.batch) * r.epochs
    if framework == "python":           # micrograd: every scalar operation is a Python object
        scale, sline = python_speed(p)
        run = cost.flops * PY_SCALAR_OP_S * scale
        lines = [sline, f"scalar autograd: {cost.flops:.3g} operations x {PY_SCALAR_OP_S * 1e6:g} us = "
                        f"{fmt_seconds(run)}"]
    else:
        run, lines = _train_time(p, t, cost.flops, int(cost.extra["width"]), "fp32", framework)
        over, oline = _steps_overhead(steps, layers, t, framework)
        if framework == "numpy":        # ~10 numpy calls per layer per batch, forward and backward
            over = steps * layers * 10 * NUMPY_CALL_S
            oline = f"fixed cost: {steps:,.0f} batches x {layers} layers x 10 numpy calls = {fmt_seconds(over)}"
        run += over
        lines.append(oline)
    start, start_line = _startup(framework, t, True)
    basis = [*cost.basis, *rt_lines, f"peak memory = {fmt_bytes(need)}", *lines, start_line]
    return Priced(need, run + start, basis, [_pool(t, need)], {"params": cost.params},
                  f"{'-'.join(map(str, r.widths))}, {cost.params:,} params, {r.epochs:g} epochs ({r.framework})")


def price_cnn_train(r: catalog.CNNTrain, t: Target, p: Profile, m: Milestone) -> Priced:
    shape = costs.CNNShape(tuple(r.in_hw), r.in_ch, tuple(r.widths), r.convs_per_stage, tuple(r.fc), r.classes)
    data = r.samples * r.in_hw[0] * r.in_hw[1] * r.in_ch        # uint8 images, as torchvision holds them
    cost = costs.cnn_train(shape, r.samples, r.epochs, r.batch, "fp32", 0 if (t.gpu and not t.unified) else data)
    runtime, rt_lines = _runtime("torch", t)
    need = cost.peak_bytes + sum(runtime.values())
    run, lines = _train_time(p, t, cost.flops, int(cost.extra["width"]), "fp32", "torch", EFF_GPU_CONV, EFF_CPU_CONV)
    layers = len(r.widths) * r.convs_per_stage + len(r.fc) + 1
    over, oline = _steps_overhead(ceil(r.samples / r.batch) * r.epochs, layers, t, "torch")
    start, start_line = _startup("torch", t, True)
    basis = [*cost.basis, *rt_lines, f"peak memory = {fmt_bytes(need)}", *lines, oline, start_line]
    return Priced(need, run + over + start, basis, [_pool(t, need)], {"params": cost.params},
                  f"{fmt_count(cost.params)} params, {fmt_count(cost.extra['macs'])} MACs/sample, {r.epochs:g} epochs")


def price_lstm_train(r: catalog.LSTMTrain, t: Target, p: Profile, m: Milestone) -> Priced:
    tokens = r.steps * r.batch * r.seq
    cost = costs.lstm_train(r.vocab, r.embed, r.hidden, r.layers, r.batch, r.seq, tokens)
    runtime, rt_lines = _runtime("torch", t)
    need = cost.peak_bytes + sum(runtime.values())
    run, lines = _train_time(p, t, cost.flops, r.hidden, "fp32", "torch", EFF_GPU_TRAIN * EFF_LSTM,
                             EFF_CPU_TRAIN * EFF_LSTM)
    over, oline = _steps_overhead(r.steps, r.layers, t, "torch")
    start, start_line = _startup("torch", t, True)
    basis = [*cost.basis, *rt_lines, f"peak memory = {fmt_bytes(need)}", *lines, oline, start_line]
    return Priced(need, run + over + start, basis, [_pool(t, need)], {"params": cost.params, "tokens": tokens},
                  f"{fmt_count(cost.params)} params, {r.layers}x{r.hidden}, {fmt_count(tokens)} tokens")


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
             f"index fill {fmt_seconds(build)}; batched scores max(compute at efficiency {EFF_SEARCH_GEMM}, memory) "
             f"{fmt_seconds(batched)}; {singles} single queries at {EFF_GEMV} of the bandwidth {fmt_seconds(one_by_one)}; "
             f"all x {SEARCH_SWEEP} (n, n/10, n/100) = {fmt_seconds(search)}; top-k {fmt_seconds(topk)}"]
    if r.embed_texts:
        enc = costs.sentence_encoder(costs.MINILM, r.embed_texts, r.embed_tokens)
        enc_s = ENCODER_LOAD_S + enc.flops / (rate * EFF_ENCODER)
        need += enc.peak_bytes
        s += enc_s
        basis += [*enc.basis, f"encoding at efficiency {EFF_ENCODER} (numpy forward pass) + load "
                              f"{ENCODER_LOAD_S:g} s = {fmt_seconds(enc_s)}"]
    if r.tsne:
        scale, sline = python_speed(p)
        tsne_s = TSNE_S * r.tsne * max(1.0, log2(r.tsne)) * scale
        tsne_bytes = costs.SKLEARN_BYTES + r.tsne * TSNE_BYTES_PER_POINT
        need += tsne_bytes
        s += tsne_s + PLOTS_S
        basis += [sline, f"t-SNE of {r.tsne:,} points (scikit-learn, Barnes-Hut): {TSNE_S * 1e6:g} us x n log2 n = "
                         f"{fmt_seconds(tsne_s)}; scikit-learn + its arrays {fmt_bytes(tsne_bytes)}; more plots"]
    basis.append(f"peak memory {fmt_bytes(need)}")
    what = f"{fmt_count(r.n)} x {r.dim} vectors, {r.queries:,} queries"
    if r.embed_texts:
        what = f"{r.embed_texts:,} texts embedded, " + what
    return Priced(need, s, basis, [_pool(t, need)], {}, what,
                  bound="compute" if batched_flops / (rate * EFF_SEARCH_GEMM) > one_by_one else "memory")


def _macs_per_cycle(core: str) -> tuple[float, str]:
    """'Cortex-M4F' -> cortex-m4, '2x Cortex-M0+' -> cortex-m0, '2x Xtensa LX7' -> xtensa lx7."""
    c = core.lower()
    arm = re.search(r"cortex-m(\d+)", c)
    key = f"cortex-m{arm.group(1)}" if arm else next((k for k in MACS_PER_CYCLE if k in c), None)
    if key in MACS_PER_CYCLE:
        v = MACS_PER_CYCLE[key]
        return v, f"{core}: ~{v:g} int8 MACs per cycle"
    return 0.05, f"{core}: unknown core, assumed 0.05 int8 MACs per cycle"


def price_dscnn(r: catalog.DSCNN, t: Target, p: Profile, m: Milestone) -> Priced:
    """B6: train on the host (Keras, CPU), quantise, flash; on the board: arena + firmware in SRAM."""
    b = t.board
    cost = costs.dscnn(costs.DSCNNShape(r.channels, r.blocks, r.classes))
    sram = cost.extra["arena_bytes"] + FIRMWARE_SRAM_BYTES
    flash = cost.extra["model_bytes"] + FIRMWARE_FLASH_BYTES
    mpc, mline = _macs_per_cycle(b.core)
    latency_ms = cost.extra["macs"] / (b.clock_mhz * 1e6 * mpc) * 1e3
    rate, fline = cpu_flops(p)
    train_flop = 6 * cost.extra["macs"] * r.train_samples * r.epochs
    train = train_flop / (rate * EFF_TF_CPU_CONV)
    feats = r.train_samples * FEATURE_S_PER_CLIP
    host_need = costs.TENSORFLOW_BYTES + r.train_samples * 49 * 10 * 4 + 16 * cost.params
    s = STARTUP_S["tensorflow"] + feats + train + TOOLCHAIN_S
    basis = [*cost.basis,
             f"SRAM: arena {cost.extra['arena_bytes']:,} B + firmware {FIRMWARE_SRAM_BYTES:,} B = {sram:,} B",
             f"flash: model {cost.extra['model_bytes']:,} B + firmware {FIRMWARE_FLASH_BYTES:,} B = {flash:,} B",
             f"latency: {cost.extra['macs']:,} MACs / ({b.clock_mhz:g} MHz x {mpc:g}) = {latency_ms:.3g} ms "
             f"({mline})", fline,
             f"host training (Keras, CPU): 6*MACs*{r.train_samples:,} clips*{r.epochs:g} epochs = {train_flop:.3g} FLOP "
             f"at efficiency {EFF_TF_CPU_CONV} = {fmt_seconds(train)}; features {fmt_seconds(feats)}; "
             f"convert, verify, build, flash {TOOLCHAIN_S:g} s; TensorFlow startup {STARTUP_S['tensorflow']:g} s",
             f"host memory: TensorFlow + features = {fmt_bytes(host_need)}"]
    checks = [memory_check(f"SRAM on {b.name}", sram, b.sram_bytes),
              memory_check(f"flash on {b.name}", flash, b.flash_bytes),
              limit_check("latency per inference", latency_ms, r.max_latency_ms, False, "ms"),
              memory_check("host memory", host_need, _free_memory(p)[0])]
    return Priced(sram, s, basis, checks,
                  {"params": cost.params, "macs": cost.extra["macs"], "model_bytes": cost.extra["model_bytes"],
                   "arena_bytes": cost.extra["arena_bytes"], "sram_bytes": sram, "flash_bytes": flash,
                   "latency_ms": round(latency_ms, 1)},
                  f"{cost.params / 1e3:.3g}K params, {cost.extra['model_bytes'] / 1e3:.3g} KB int8, "
                  f"{latency_ms:.0f} ms/inference")


PRICERS: dict[str, Callable[..., Priced]] = {
    "probe": price_probe, "tabular-q": price_tabular_q, "bpe": price_bpe, "skipgram": price_skipgram,
    "mlp-train": price_mlp_train, "matmul": price_matmul, "dscnn": price_dscnn, "cnn-train": price_cnn_train,
    "lstm-train": price_lstm_train, "gpt-train": price_gpt_train, "dpo": price_dpo, "quant-lab": price_quant_lab,
    "gpt-infer": price_gpt_infer, "vector-search": price_vector_search, "embeddings": price_vector_search, "gguf-decode": price_gguf_decode,
    "gguf-split": price_gguf_split,
}


# ---------------------------------------------------------------- calibration

def calibration(p: Profile, workload: str, device: str) -> tuple[float, float, list[str]]:
    """(time factor, memory factor, basis) from earlier runs of this workload on this device.

    Each record holds the prediction the planner made then, which was itself
    corrected by the records before it. So the records are replayed in order:
    the uncorrected prediction of record i is its prediction over the factor in
    force then, and the factor is the median of actual / uncorrected so far,
    clamped. (Using actual / predicted directly would drift back to 1 as the
    corrected predictions got better.)
    """
    recs = sorted((c for c in p.calibration if c.workload == workload and c.device in (None, device)),
                  key=lambda c: c.when)

    def factor(pairs: list[tuple[float | None, float | None]]) -> tuple[float, int]:
        ratios: list[float] = []
        f = 1.0
        for predicted, actual in pairs:
            if predicted and actual and predicted > 0 and actual > 0:
                ratios.append(actual / (predicted / f))
                f = min(CALIBRATION_CLAMP[1], max(CALIBRATION_CLAMP[0], statistics.median(ratios)))
        return f, len(ratios)

    ft, nt = factor([(c.predicted_seconds, c.actual_seconds) for c in recs])
    fm, nm = factor([(c.predicted_peak_bytes, c.actual_peak_bytes) for c in recs])
    lines = []
    if nt:
        lines.append(f"calibration: {nt} earlier run(s) of {workload} on {device}: median actual/model time "
                     f"x{ft:.3g} (clamped to {CALIBRATION_CLAMP[0]:g}-{CALIBRATION_CLAMP[1]:g})")
    if nm:
        lines.append(f"calibration: {nm} earlier run(s) of {workload} on {device}: median actual/model memory "
                     f"x{fm:.3g}")
    return ft, fm, lines


# ---------------------------------------------------------------- sizing

@dataclass
class Sized:
    rung: Rung
    priced: Priced
    checks: list[Check]

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    @property
    def tight(self) -> bool:
        return self.ok and any(c.tight for c in self.checks)

    def failing(self) -> list[Check]:
        return [c for c in self.checks if not c.ok]


def size_on(p: Profile, m: Milestone, t: Target, rung: Rung) -> Sized:
    """Price one rung on one device, correct it by calibration, and check every limit."""
    priced = PRICERS[m.cost](rung, t, p, m)
    ft, fm, lines = calibration(p, m.cost, t.device)
    if fm != 1.0:
        priced.peak_bytes *= fm
        for c in priced.checks:   # re-check the device pool at the corrected figure
            if c.what == f"memory on {t.device}":
                new = memory_check(c.what, priced.peak_bytes, t.memory_free)
                c.ok, c.tight, c.text = new.ok, new.tight, new.text
    priced.seconds *= ft
    priced.basis += lines
    checks = [*priced.checks, time_check(priced.seconds, m)]
    return Sized(rung, priced, checks)


@dataclass
class _Option:
    target: Target
    missing: list[str]
    sized: list[Sized]

    @property
    def best(self) -> int:
        """Index of the largest rung that fits, -1 if none."""
        return max((i for i, s in enumerate(self.sized) if s.ok), default=-1)


def _milestone(milestone: Milestone | str, track: str) -> Milestone:
    if isinstance(milestone, Milestone):
        return milestone
    try:
        return catalog.get(milestone, track)
    except catalog.CatalogError as exc:
        raise FitError(str(exc)) from None


def _packaged(m: Milestone) -> bool:
    """Whether m is the packaged catalog's own (so reference kits can be asked about it by id)."""
    try:
        return catalog.get(m.id, m.track) == m
    except catalog.CatalogError:
        return False


def fit(profile: Profile, milestone: Milestone | str, *, track: str = catalog.DEFAULT_TRACK,
        check_packages: bool = True, size: str | None = None, tier: int | None = None,
        suggest: bool = True) -> Plan:
    """Plan one milestone on one profile.

    check_packages: judge the milestone's Python packages by this machine (True for
    the live, probed profile; False for a reference kit, which is not this machine).
    size / tier: force a rung of the ladder / a tier (FitError if the milestone has none such).
    suggest: when nothing fits, name the reference kits on which it would.
    """
    m = _milestone(milestone, track)
    if tier is not None and tier not in m.tiers:
        raise FitError(f"{m.id} runs on tier(s) {', '.join(map(str, m.tiers))}, not tier {tier}")
    if size is not None:
        try:
            rungs: tuple[Rung, ...] = (m.rung(size),)
        except catalog.CatalogError as exc:
            raise FitError(str(exc)) from None
    else:
        rungs = m.ladder
    found, blocked = targets(profile, m)
    if tier is not None:
        found = [t for t in found if t.tier == tier]
    options = [_Option(t, m.missing(t.gpu) if check_packages else [], [size_on(profile, m, t, r) for r in rungs])
               for t in found]

    def plan(t: Target | None, s: Sized | None, verdict: str, reasons: list[str], sized: bool) -> Plan:
        """sized: s is the chosen size (its config goes to the runner); else s only shows what was tried."""
        box = f"time box: {m.time_box.label()}" + (" (our estimate)" if m.time_box.estimate else "") \
            + (f"; {m.time_box.note}" if m.time_box.note else "")
        pred = None if s is None else Prediction(s.priced.peak_bytes, s.priced.seconds,
                                                 [f"device: {t.label}; {t.memory_basis}", box, *s.priced.basis],
                                                 s.priced.bound)  # type: ignore[arg-type]
        config = {"workload": m.cost, **s.rung.params(), **s.priced.config,
                  "summary": s.priced.summary} if s is not None and sized else {}
        return Plan(milestone=m.id, slug=m.slug, title=m.title, tier=t.tier if t else m.tiers[0],
                    device=t.device if t else "-", size=s.rung.size if s is not None and sized else None,
                    config=config, prediction=pred, verdict=verdict,  # type: ignore[arg-type]
                    reasons=reasons, profile=profile.name)

    # Prefer a device where something fits, then one whose packages are installed, then the
    # largest size, then the tiers' order of preference.
    ranked = sorted(enumerate(options), key=lambda io: (io[1].best >= 0, not io[1].missing, io[1].best, -io[0]),
                    reverse=True)
    if ranked and ranked[0][1].best >= 0:
        opt = ranked[0][1]
        chosen = opt.sized[opt.best]
        reasons = [c.text for c in chosen.checks if c.tight]
        if opt.best + 1 < len(opt.sized):
            nxt = opt.sized[opt.best + 1]
            reasons.append(f"next size up ({nxt.rung.size}) does not fit: "
                           + "; ".join(c.text for c in nxt.failing()))
        if opt.missing:
            hints = catalog.load().install_hints(opt.missing)
            return plan(opt.target, chosen, "no",
                        [f"needs {', '.join(opt.missing)} (not installed here): {hints}", *reasons], True)
        return plan(opt.target, chosen, "tight" if chosen.tight else "fits", reasons, True)

    # Nothing fits: say what does not, and what hardware would.
    reasons = [f"{m.id} {r}" for r in blocked]
    if tier is not None and not found:
        kind = {0: "microcontroller board", 1: "CPU", 2: "GPU", 3: "cluster of nodes"}[tier]
        reasons.insert(0, f"{m.id}: this profile has no {kind} for tier {tier}")
    first = options[0].sized[0] if options else None
    if options:
        t = options[0].target
        what = "at size " + first.rung.size if size else f"even at its smallest size ({first.rung.size})"
        reasons.append(f"{m.id} does not fit {t.device} {what}: " + "; ".join(c.text for c in first.failing()))
    if suggest and _packaged(m):
        kits = [k for k in fitting_reference_kits(m.track, m.id, size, tier) if k != profile.name]
        if kits:
            hint = f"try `--profile {kits[0]}`" + (f" (also fits: {', '.join(kits[1:4])})" if len(kits) > 1 else "")
            if reasons:
                reasons[0] += f", or {hint}"
            else:
                reasons.append(hint)
        elif not blocked:
            reasons.append(f"no reference kit fits {m.id} either")
    if not reasons:
        reasons.append(f"{m.id}: no device on this profile can run tier(s) {', '.join(map(str, m.tiers))}")
    return plan(options[0].target if options else None, first, "no", reasons, False)


def fit_all(profile: Profile, track: str = catalog.DEFAULT_TRACK, *, check_packages: bool = True,
            suggest: bool = True) -> list[Plan]:
    """Plan every milestone of a track on one profile."""
    try:
        milestones = catalog.track(track)
    except catalog.CatalogError as exc:
        raise FitError(str(exc)) from None
    return [fit(profile, m, check_packages=check_packages, suggest=suggest) for m in milestones]


# ---------------------------------------------------------------- reference kits

PROFILES_DIR = Path(__file__).resolve().parent.parent / "profiles"


def reference_names() -> list[str]:
    return sorted(f.stem for f in PROFILES_DIR.glob("*.yaml"))


def _read_profile(path: Path) -> Profile:
    """inventory.profile.load, with libyaml's parser when present (5-10x faster than pure Python)."""
    import yaml

    from inventory import profile as prof

    try:
        text = path.read_text(encoding="utf-8")
    except OSError:
        return prof.load(path)          # its one-line errors for missing, unreadable, ...
    loader = getattr(yaml, "CSafeLoader", None)
    if loader is None:
        return prof.loads(text, str(path))
    try:
        data = yaml.load(text, Loader=loader)
    except yaml.YAMLError:
        return prof.loads(text, str(path))  # the pure-Python parser words the error
    return prof.parse(data, str(path))


@functools.cache
def reference_profile(name: str) -> Profile:
    return _read_profile(PROFILES_DIR / f"{name}.yaml")


def resolve_profile(name_or_path: str | Path) -> tuple[Profile, bool]:
    """(profile, is_reference_kit) for a file path or a reference kit's name; ProfileError otherwise."""
    text = str(name_or_path)
    path = Path(text).expanduser()
    if path.is_file():
        is_ref = path.resolve().parent == PROFILES_DIR
        return (reference_profile(path.stem) if is_ref else _read_profile(path)), is_ref
    name = text.removesuffix(".yaml")
    if name in reference_names():
        return reference_profile(name), True
    if path.suffix in (".yaml", ".yml") or "/" in text:
        return _read_profile(path), False       # a missing file: its own one-line error
    raise ProfileError(f"unknown profile {text!r}: pass a profile file or one of the reference kits: "
                       + ", ".join(reference_names()))


@functools.cache
def fitting_reference_kits(track: str, milestone: str, size: str | None = None,
                           tier: int | None = None) -> tuple[str, ...]:
    """Reference kits on which a milestone fits (to say what hardware would): roomy ones first."""
    verdicts = {}
    for name in reference_names():
        plan = fit(reference_profile(name), milestone, track=track, check_packages=False, size=size, tier=tier,
                   suggest=False)
        verdicts[name] = plan.verdict
    return tuple(sorted((n for n, v in verdicts.items() if v != "no"), key=lambda n: verdicts[n] == "tight"))

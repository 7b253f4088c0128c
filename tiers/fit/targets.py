"""Targets: the devices a plan can land on, and what the profile says each can do.

    targets(profile, milestone) -> ([Target, ...], [why another tier cannot run here])

    tier 0  board_target    the attached microcontroller with the most SRAM that is big enough
    tier 1  cpu_target      this machine's CPU and the RAM it may use
    tier 2  gpu_targets     each CUDA / ROCm / MPS GPU (unified memory counted once)
    tier 3  cluster_target  this machine plus its peers, with the link between them

    cpu_flops / gpu_flops / bandwidth ...  -> (the profile's *measured* figure, its basis)

The pricers divide a workload's FLOPs and bytes by these figures. Each figure
says where it came from: a measured one is trusted, a datasheet one is flagged
so the reader knows to run `tierkit probe`, and a missing one falls back to a
modest default that says so.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from inventory.profile import GPU, BoardSpec, Profile
from inventory.units import fmt_bytes
from tiers import catalog
from tiers.catalog import Milestone

REF_CLOCK_MHZ = 3500              # Python-bound work is priced at a 3.5 GHz reference core
DEFAULT_CPU_GFLOPS = 50.0         # when a profile has no CPU figures at all
DEFAULT_BANDWIDTH_GBS = 10.0


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


def usable_cpus(p: Profile) -> int:
    """CPUs the process may use: the affinity mask or cgroup quota the probe found, else every thread."""
    return (p.cpu.usable_cpus or p.cpu.threads) if p.cpu else 1


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


def free_memory(p: Profile) -> tuple[float, str]:
    if p.memory:
        return float(p.memory.available_bytes), f"{fmt_bytes(p.memory.available_bytes)} available RAM"
    return 2e9, "no memory figure in the profile: assumed 2 GB free; run `tierkit probe`"


def cpu_target(p: Profile) -> Target:
    free, basis = free_memory(p)
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
            ram, _ = free_memory(p)
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
    free, _ = free_memory(p)
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


def with_loopback_node(p: Profile) -> Profile:
    """The profile with a second node on loopback (`--set peers=local`): a local agent for learning.

    Both nodes share this machine, so each is given half of its free memory; the link is
    loopback's (no real network). The profile's own peers are left out: they are not used.
    """
    free, _ = free_memory(p)
    s = p.model_dump(mode="python")
    s["peers"] = [{"name": "local agent (loopback)", "address": "127.0.0.1", "port": 50052, "found_by": "manual",
                   "summary": {"memory_available_bytes": free // 2}}]
    if s.get("memory"):
        s["memory"]["available_bytes"] = int(free // 2)
    return Profile.model_validate(s)


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


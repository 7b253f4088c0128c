"""The B0 deliverable and the terminal summary: the kit, read by a person."""
from __future__ import annotations

from pathlib import Path

from inventory.files import atomic_write
from inventory.profile import Figure, Memory, Profile, dumps
from inventory.units import fmt_bytes


def _gib(n: float | None) -> str:
    return fmt_bytes(n, binary=True)


def fig(f: Figure | None) -> str:
    return "not measured" if f is None else f"{f.value:g} {f.unit} ({f.source})"


def confined(m: Memory) -> str:
    """' (limited by cgroup to 4 GiB; the host has 24 GiB, see ...)' when a cgroup limit is lower than the RAM."""
    if not m.host_total_bytes:
        return ""
    def short(n: int) -> str:
        return f"{n / 2**30:.3g} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"

    return (f" (limited by cgroup to {short(m.total_bytes)}; the host has {short(m.host_total_bytes)}, "
            f"limit from {m.limit_source})")


def tier_lines(p: Profile) -> list[tuple[str, str, str]]:
    """(tier, what it is, what this kit offers it)."""
    rows = []
    if p.boards:
        named = [b.board.name for b in p.boards if b.board] + \
                [f"{b.port}: one of {', '.join(c.name for c in b.candidates)}" for b in p.boards if b.candidates]
        denied = [b for b in p.boards if b.access == "denied"]
        text = "; ".join(named) or f"{len(p.boards)} serial port(s), no known board"
        if denied:
            text += f" (no permission on {', '.join(b.port or '?' for b in denied)}: see Boards)"
    else:
        text = "no board attached: B6 (keyword spotter) needs one; it can still be built for the emulated Cortex-M4"
    rows.append(("0", "microcontroller", text))
    c, m = p.cpu, p.memory
    if c:
        text = f"{c.model}, {c.physical_cores} cores / {c.threads} threads, {', '.join(c.simd) or 'no SIMD flags'}"
        if c.matmul_gflops.get("fp32"):
            text += f"; fp32 matmul {c.matmul_gflops['fp32'].value:g} GFLOP/s"
            if c.peak_fp32_gflops:
                text += f" ({c.matmul_gflops['fp32'].value / c.peak_fp32_gflops.value:.0%} of peak)"
        if c.memory_bandwidth_gbs:
            text += f", {c.memory_bandwidth_gbs.value:g} GB/s"
    else:
        text = "CPU not detected (see How this was measured)"
    if c and c.usable_cpus and c.usable_cpus < c.threads:
        text += f"; this process may use {c.usable_cpus} of them ({c.usable_source})"
    if m:
        text += f"; {_gib(m.total_bytes)} RAM, {_gib(m.available_bytes)} free" + confined(m)
    rows.append(("1", "CPU", text))
    if p.gpus:
        text = "; ".join(f"{g.model} ({g.backend}, {_gib(g.memory_bytes)}"
                         + (f", bf16 {g.matmul_tflops['bf16'].value:g} TFLOP/s" if 'bf16' in g.matmul_tflops else "")
                         + ")" for g in p.gpus)
    else:
        text = "no GPU: the torch milestones (B7, B9, B11-B14) run on the CPU at smaller sizes"
    rows.append(("2", "GPU", text))
    ok = [q for q in p.peers if not q.problem]
    if ok:
        text = "; ".join(f"{q.name or q.address} at {q.address}:{q.port}"
                         + (f", {q.rtt_ms.value:g} ms" if q.rtt_ms else "")
                         + (f", {q.bandwidth_mbps.value:g} Mbit/s" if q.bandwidth_mbps else "") for q in ok)
    elif p.peers:
        text = (f"no peer reachable: {', '.join(f'{q.address}:{q.port}' for q in p.peers)} "
                "with a problem (see each peer's `problem` in the profile)")
    else:
        text = "no peers found: run `tierkit agent` on a second machine on the LAN for B17"
    rows.append(("3", "several machines", text))
    return rows


def b0_readme(p: Profile) -> str:
    when = p.probe.when.strftime("%Y-%m-%d %H:%M UTC") if p.probe else "?"
    out = [f"# B0: inventory of {p.name or 'this kit'}", "",
           f"Probed {when} in {p.probe.seconds if p.probe else '?'} s by tierkit "
           f"{p.host.tierkit if p.host else ''} on {p.host.os if p.host else '?'}.",
           "The full profile is `profile.yaml` beside this file; `tierkit fit` reads it.", "",
           "## What each tier can use", "", "| tier | | on this kit |", "|---|---|---|"]
    out += [f"| {t} | {what} | {text} |" for t, what, text in tier_lines(p)]
    if p.cpu:
        c = p.cpu
        out += ["", "## CPU", "", f"- model: {c.model} ({c.architecture}, {c.vendor or 'vendor ?'})",
                f"- cores: {c.physical_cores} physical, {c.threads} threads, {c.sockets} socket(s)"
                + (f"; usable by this process: {c.usable_cpus} ({c.usable_source})" if c.usable_cpus else ""),
                f"- clock: {c.clock_mhz:g} MHz" if c.clock_mhz else "- clock: unknown",
                f"- SIMD: {', '.join(c.simd) or 'none found'}",
                "- caches: " + ", ".join(f"{k.upper()} {v >> 10} KiB" for k, v in c.caches.model_dump().items() if v),
                f"- theoretical peak: fp32 {fig(c.peak_fp32_gflops)}, fp64 {fig(c.peak_fp64_gflops)}"
                + (f"; basis: {c.peak_fp32_gflops.method}" if c.peak_fp32_gflops else "")]
        for dtype, f in c.matmul_gflops.items():
            out.append(f"- measured {dtype} matmul: {fig(f)}; {f.method}")
        if c.memory_bandwidth_gbs:
            out.append(f"- measured memory bandwidth: {fig(c.memory_bandwidth_gbs)}; {c.memory_bandwidth_gbs.method}")
    if p.memory:
        out += ["", "## Memory", "", f"- total {_gib(p.memory.total_bytes)}, available {_gib(p.memory.available_bytes)}"
                + (f", swap {_gib(p.memory.swap_bytes)}" if p.memory.swap_bytes is not None else "") + confined(p.memory)]
    if p.gpus:
        out += ["", "## GPUs", "", "| # | model | backend | memory | driver | compute cap. | measured |", "|---|---|---|---|---|---|---|"]
        for i, g in enumerate(p.gpus):
            meas = ", ".join(f"{k} {v.value:g} TFLOP/s" for k, v in g.matmul_tflops.items())
            if g.memory_bandwidth_gbs:
                meas += f", copy {g.memory_bandwidth_gbs.value:g} GB/s"
            out.append(f"| {i} | {g.model} | {g.backend} | {_gib(g.memory_bytes)}{' unified' if g.unified_memory else ''}"
                       f" | {g.driver or ''} | {g.compute_capability or ''} | {meas or 'not measured'} |")
    if p.boards:
        out += ["", "## Boards", "", "| port | VID:PID | match | MCU / core | flash | SRAM | access |", "|---|---|---|---|---|---|---|"]
        for b in p.boards:
            spec = b.board
            what = (f"{spec.name}: {spec.mcu}, {spec.core} @ {spec.clock_mhz:g} MHz" if spec else
                    "one of: " + ", ".join(c.name for c in b.candidates) if b.candidates else b.product or "unknown")
            flash, sram = (f"{spec.flash_bytes >> 10} KiB", f"{spec.sram_bytes >> 10} KiB") if spec else ("", "")
            out.append(f"| {b.port} | {b.vid_pid or ''} | {b.match} | {what} | {flash} | {sram} | "
                       f"{b.access}{': ' + b.problem if b.problem else ''} |")
    if p.sbc:
        out += ["", "## Single-board computer", "", f"- {p.sbc.model} ({p.sbc.family}, SoC {p.sbc.soc or '?'})"]
    if p.peers:
        out += ["", "## Peers", "", "| peer | address | found by | RTT | bandwidth | note |", "|---|---|---|---|---|---|"]
        for q in p.peers:
            out.append(f"| {q.name or ''} | {q.address}:{q.port} | {q.found_by} | "
                       f"{fig(q.rtt_ms) if q.rtt_ms else ''} | {fig(q.bandwidth_mbps) if q.bandwidth_mbps else ''} | "
                       f"{q.problem or ''} |")
    if p.probe:
        out += ["", "## How this was measured", "", "| detector | status | seconds | note |", "|---|---|---|---|"]
        for name, s in p.probe.detectors.items():
            out.append(f"| {name} | {s.status} | {s.seconds:.3f} | {(s.reason or '').replace('|', '/')} |")
    return "\n".join(out) + "\n"


def write_b0(p: Profile, builds: Path) -> Path:
    folder = Path(builds) / "B00-inventory"
    atomic_write(folder / "profile.yaml", dumps(p))
    return atomic_write(folder / "README.md", b0_readme(p))

"""B0: inventory the kit. The probe, with its micro-benchmarks, as a milestone.

    probe(bench, discover) ─► Profile ─► profile.yaml        (the figures every later plan divides by)
                                      ─► README body         (inventory.report.b0_readme, as `tierkit probe`)
                                      ─► inventory.png       (measured vs datasheet; time per detector)

Same report as `tierkit probe` writes (inventory.report.b0_readme), plus the
fresh profile beside it and a chart of what was measured against the datasheet.
The runner makes the fresh profile the live one when the run started from the
user's own profile (a reference kit is left alone), keeping earlier calibration.
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any

from annotated_types import Ge

from inventory.files import atomic_write
from inventory.probe import probe
from inventory.profile import Profile, dumps
from inventory.report import b0_readme
from tiers.report import pyplot, save

if TYPE_CHECKING:
    from tiers.runner import Context, Output


@dataclass
class Config:
    bench: bool = True                          # the micro-benchmarks (matmul, bandwidth) the planner divides by
    discover: bool = True                       # look for tierkit agents on the network (mDNS)
    mdns_wait: Annotated[float, Ge(0)] = 0.25   # seconds to listen for their answers


def run(ctx: Context) -> Output:
    from tiers.runner import Output

    cfg: Config = ctx.config

    # 1. the probe: every detector in parallel, then the benchmarks one at a time
    with ctx.progress("probing the kit" + (" and benchmarking" if cfg.bench else ""), None):
        prof = probe(bench=cfg.bench, discover=cfg.discover, mdns_wait=cfg.mdns_wait,
                     on_done=lambda name, s: ctx.log(f"{name}: {s.status} in {s.seconds:.2f} s"))
    if ctx.profile.name and ctx.profile.name != prof.name:
        ctx.log(f"planned for profile {ctx.profile.name}; probed {prof.name}")

    # 2. the report: the probe's own README body, and the profile it describes
    atomic_write(ctx.out_dir / "profile.yaml", dumps(prof))
    body = "## The inventory\n" + b0_readme(prof).split("\n", 1)[1]  # its title replaced: the runner writes one
    body = body.replace("The full profile is `profile.yaml` beside this file",
                        "The fresh profile is `profile.yaml` beside this file")

    # 3. a chart, when matplotlib is installed (B0 works on the base install without it)
    plots = []
    if importlib.util.find_spec("matplotlib") is not None:
        chart(prof, ctx.out_dir / "inventory.png")
        plots.append("inventory.png: what the probe measured, and how long each detector took")

    metrics = figures(prof)
    return Output(metrics=metrics, summary=summary(prof), report=body, plots=plots, profile=prof)


def chart(p: Profile, path: Any) -> None:
    """Measured matmul rates against the datasheet peak; how long each detector took."""
    fig, (left, right) = pyplot().subplots(1, 2, figsize=(10, 4))
    # measured vs theoretical: how much of the datasheet numpy reaches
    c = p.cpu
    if c and c.matmul_gflops:
        names = [f"{d} matmul" for d in c.matmul_gflops]
        vals = [f.value for f in c.matmul_gflops.values()]
        left.barh(names, vals, color="tab:blue", label="measured")
        peaks = {"fp32": c.peak_fp32_gflops, "fp64": c.peak_fp64_gflops}
        for i, d in enumerate(c.matmul_gflops):
            if peaks.get(d):
                left.plot([peaks[d].value] * 2, [i - 0.4, i + 0.4], color="black", ls="--")
        left.set_xlabel("GFLOP/s (dashed: theoretical peak)")
        title = "CPU matmul" + (f"; bandwidth {c.memory_bandwidth_gbs.value:g} GB/s" if c.memory_bandwidth_gbs else "")
        left.set_title(title, fontsize=9)
    else:
        left.text(0.5, 0.5, "no CPU benchmark", ha="center")
        left.set_axis_off()
    # how long each detector took: the probe's own cost
    det = p.probe.detectors if p.probe else {}
    colors = {"ok": "tab:green", "empty": "tab:gray", "skipped": "tab:gray", "error": "tab:red", "timeout": "tab:orange"}
    right.barh(list(det), [s.seconds for s in det.values()], color=[colors[s.status] for s in det.values()])
    right.set_xlabel("seconds (green ok, grey empty, red error, orange timeout)")
    right.set_title("probe: time per detector", fontsize=9)
    fig.suptitle(f"B0: {p.name}", fontsize=10)
    save(fig, path)


def summary(p: Profile) -> str:
    """One sentence: the figures the planner will divide by."""
    parts = []
    c = p.cpu
    if c:
        parts.append(f"{c.model}, {c.physical_cores} cores")
        if "fp32" in c.matmul_gflops:
            f32 = c.matmul_gflops["fp32"].value
            parts.append(f"fp32 matmul {f32:g} GFLOP/s"
                         + (f" ({f32 / c.peak_fp32_gflops.value:.0%} of its {c.peak_fp32_gflops.value:g} GFLOP/s peak)"
                            if c.peak_fp32_gflops else ""))
        if c.memory_bandwidth_gbs:
            parts.append(f"memory bandwidth {c.memory_bandwidth_gbs.value:g} GB/s")
    if p.memory:
        parts.append(f"{p.memory.total_bytes / 2**30:.1f} GiB RAM")
    parts.append(", ".join(g.model for g in p.gpus) if p.gpus else "no GPU")
    if p.boards:
        parts.append(f"{len(p.boards)} serial device(s)")
    if p.peers:
        parts.append(f"{len(p.peers)} peer(s)")
    took = f" in {p.probe.seconds:g} s" if p.probe else ""
    return f"Probed {p.name}{took}: " + "; ".join(parts) + "."


def figures(p: Profile) -> dict[str, Any]:
    """The numbers the planner divides by, flat."""
    out: dict[str, Any] = {"probe_seconds": p.probe.seconds if p.probe else None}
    if p.cpu:
        out["cpu_cores"] = p.cpu.physical_cores
        for dtype, f in p.cpu.matmul_gflops.items():
            out[f"cpu_{dtype}_matmul_gflops"] = f.value
        if p.cpu.peak_fp32_gflops:
            out["cpu_fp32_peak_gflops"] = p.cpu.peak_fp32_gflops.value
        if p.cpu.memory_bandwidth_gbs:
            out["cpu_bandwidth_gbs"] = p.cpu.memory_bandwidth_gbs.value
    if p.memory:
        out["memory_gib"] = round(p.memory.total_bytes / 2**30, 1)
    out["gpus"] = [g.model for g in p.gpus]
    out["boards"] = [b.board.name if b.board else (b.product or b.port) for b in p.boards]
    out["peers"] = [q.address for q in p.peers]
    out["detectors"] = {k: s.status for k, s in (p.probe.detectors.items() if p.probe else [])}
    return out

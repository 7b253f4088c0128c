"""What every pricer returns, and the costs every process pays whatever its workload.

    price_<workload>(rung, target, profile, milestone) -> Priced(peak_bytes, seconds, basis, checks, ...)

    peak = workload bytes (models/costs.py) + runtime_bytes(framework, target, milestone)
    time = workload time (its pricer)      + startup_time(framework, target, plots)

The process and its framework occupy memory before the workload allocates a
byte, and take seconds to start; a tiny milestone is mostly these, so they are
priced, not ignored.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from inventory.units import fmt_bytes
from models import costs
from tiers.catalog import Milestone
from tiers.fit.rules import Check
from tiers.fit.targets import Target

# Startup of the process and its framework (import, device init), and the plots.
STARTUP_S = {"python": 0.3, "numpy": 0.3, "torch": 1.5, "tensorflow": 8.0, "llama.cpp": 1.0}
CUDA_INIT_S = 2.0
PLOTS_S = 0.8                     # import matplotlib 0.46 s + ~0.1 s a figure, measured
NUMPY_CALL_S = 5e-6               # one numpy call's fixed cost


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


# (rung, target, profile, milestone) -> Priced; the rung is of the class catalog.COST_MODELS names for the
# pricer's cost model, so each pricer is typed on its own rung class (hence the ... here).
Pricer = Callable[..., Priced]


def runtime_bytes(framework: str, t: Target, m: Milestone | None = None) -> tuple[dict[str, float], list[str]]:
    """Bytes in the target's pool before the workload allocates: the process, the CUDA context, and
    matplotlib when the milestone `m` plots (it draws in the same process, after the workload).

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
    if m is not None and "matplotlib" in m.needs.packages:
        parts["matplotlib"] = costs.MATPLOTLIB_BYTES
        lines.append(f"matplotlib {fmt_bytes(costs.MATPLOTLIB_BYTES)}")
    return parts, lines


def startup_time(framework: str, t: Target, plots: bool) -> tuple[float, str]:
    s = STARTUP_S[framework] + (CUDA_INIT_S if t.kind == "cuda" else 0) + (PLOTS_S if plots else 0)
    return s, f"startup ({framework}{', CUDA init' if t.kind == 'cuda' else ''}{', plots' if plots else ''}): {s:g} s"

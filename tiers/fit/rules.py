"""The fit rules: the checks a sized plan must pass, and when a pass is tight.

    memory_check("memory on cuda:0", need, free)   need <= free x (1 - HEADROOM)?   kind "memory"
    pool_check(target, need)                       the same, on the target's own pool: kind "pool"
    limit_check("decode speed", 12, 5, True, ...)  a latency under / a speed over a limit
    time_check(seconds, milestone)                 within the milestone's time box?
    install_note(["torch"], extras)                "install first: make setup-dev (or ...)"

A check passes or fails; a pass is *tight* when it leaves little room (under 20%
of the memory free, over 70% of the time box or of a limit), which the table
shows with a `~`. Each check carries its kind, so the planner can find the one it
must redo (the pool check, after calibration corrects the memory figure) without
matching label text.

Missing Python packages are not a check: a plan that fits the hardware fits, and
its note names the one command that installs what it lacks (a newcomer after the
base install must read "fits, install first", not "nothing fits this machine").
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from inventory.units import fmt_bytes
from models.costs import HEADROOM
from tiers.catalog import Milestone
from tiers.fit.targets import Target

TIGHT_HEADROOM = 0.20    # under 20% left: the plan fits, but tightly
TIGHT_TIME = 0.70        # over 70% of the time box: tight
TIGHT_LIMIT = 0.70       # within 70% of a latency / speed limit: tight
TORCH_PIN = "torch==2.13.0"  # the CPU build the Makefile's setup-dev installs before the tier-2 extra

CheckKind = Literal["pool", "memory", "limit", "time"]


@dataclass
class Check:
    """One constraint on a sized plan: memory on a device, the time box, a latency or speed limit.

    kind: "pool" is the memory of the device the plan runs on (the figure calibration
    corrects); "memory" any other memory (a board's flash, the host beside a GPU, one
    node of a cluster); "limit" a latency or speed; "time" the time box.
    """

    what: str
    ok: bool
    tight: bool
    text: str
    kind: CheckKind


def memory_check(what: str, need: float, free: float, kind: CheckKind = "memory") -> Check:
    ok = need <= free * (1 - HEADROOM)
    tight = ok and need > free * (1 - TIGHT_HEADROOM)
    share = need / free if free else float("inf")
    if not ok:
        text = (f"{what}: needs {fmt_bytes(need)}, over the {fmt_bytes(free * (1 - HEADROOM))} usable "
                f"({1 - HEADROOM:.0%} of {fmt_bytes(free)} free)")
    else:
        text = f"{what}: {fmt_bytes(need)} of {fmt_bytes(free)} free ({share:.0%}" + \
               (f", under {TIGHT_HEADROOM:.0%} headroom)" if tight else ")")
    return Check(what, ok, tight, text, kind)


def pool_check(t: Target, need: float) -> Check:
    """Memory on the device the plan runs on: the check that calibration redoes."""
    return memory_check(f"memory on {t.device}", need, t.memory_free, "pool")


def time_check(seconds: float, m: Milestone) -> Check:
    box = m.time_box.budget_seconds
    ok = seconds <= box
    tight = ok and seconds > TIGHT_TIME * box
    if not ok:      # by how much: rounding can make a plan just over the box read as equal to it
        return Check("time", ok, tight, f"time: {fmt_seconds(seconds)}, over the {fmt_seconds(box)} box by "
                     f"{fmt_seconds(seconds - box)}", "time")
    text = f"time: {fmt_seconds(seconds)} of the {fmt_seconds(box)} box ({seconds / box:.0%})"
    return Check("time", ok, tight, text + (f", over {TIGHT_TIME:.0%}" if tight else ""), "time")


def limit_check(what: str, value: float, limit: float, at_least: bool, unit: str) -> Check:
    """A value that must stay under (latency) or over (tokens/s) a limit."""
    used = limit / value if at_least else value / limit     # 1.0 = exactly at the limit
    ok, tight = used <= 1, TIGHT_LIMIT < used <= 1
    rel = ">=" if at_least else "<="
    text = f"{what}: {value:.3g} {unit} (needs {rel} {limit:g} {unit})"
    return Check(what, ok, tight, text + (", close to the limit" if tight else ""), "limit")


def fmt_seconds(s: float) -> str:
    if s < 1:
        return f"{s * 1e3:.0f} ms"
    if s < 120:
        return f"{s:.3g} s"
    if s < 2 * 3600:
        return f"{s / 60:.3g} min"
    return f"{s / 3600:.3g} h"


def install_note(missing: list[str], extras: dict[str, str]) -> str:
    """The note on a plan that fits but lacks packages: `make setup-dev`, or the pip line for just these.

    extras maps an import name to the pip extra that installs it (the catalog's); a
    package with none is installed by its own name. Torch goes first, pinned: an
    unpinned torch pulls gigabytes of CUDA wheels.
    """
    wanted = sorted({extras[p] for p in missing if extras.get(p) not in (None, "base")})
    own = [p for p in missing if p not in extras]
    parts = ([TORCH_PIN] if "tier2" in wanted else []) + own
    pip = " && ".join(filter(None, [f"pip install {' '.join(parts)}" if parts else "",
                                    "pip install -e " + (f"'.[{','.join(wanted)}]'" if wanted else ".")]))
    return f"install first ({', '.join(missing)} missing): make setup-dev, or {pip}"

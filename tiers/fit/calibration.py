"""Calibration: correcting the formulas by what earlier runs on this device actually took.

    runs of this workload on this device, oldest first:
        uncorrected_i = predicted_i / factor in force then
        factor        = median(actual / uncorrected) so far, clamped to 0.25-4x
    prediction = formula x factor          (time and peak memory, each its own factor)

Every run records its prediction and what it measured (tiers/runner.py writes
them into the profile), so the planner's error on this machine shrinks run by
run, and `--explain` shows the factor in force and how many runs it rests on.

A record is only as good as its workload: a run that trained on other data, or
timed another model, than the plan priced would poison the factor, so
`mismatch(plan config, what the run reports)` names the difference and the
runner records nothing for it.
"""
from __future__ import annotations

import statistics
from typing import Any

from inventory.profile import Profile

CALIBRATION_CLAMP = (0.25, 4.0)   # one odd run must not swing a prediction more than 4x


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


PARAMS_SLACK = 1.5    # a model's parameter count against the plan's: formulas are close, other models are not
SAMPLES_SLACK = 0.9   # at least 90% of the planned training examples (a ragged last batch is the same workload)


def mismatch(planned: dict[str, Any], ran: dict[str, Any]) -> str | None:
    """Why what ran is not the planned workload (data set, amount of data, model), or None.

    `planned` is the plan's config; `ran` the milestone's metrics. Only what both
    sides state is compared: a milestone that reports nothing is taken at its word
    (it refuses calibration itself, through `Output.calibrate`, when it knows better).
    """
    want, got = planned.get("dataset"), ran.get("dataset")
    if isinstance(want, str) and isinstance(got, str) and want.lower() != got.lower():
        return f"it ran on {got} while the plan priced {want}"
    want, got = planned.get("samples"), ran.get("n_train")
    if isinstance(want, (int, float)) and isinstance(got, (int, float)) and want > 0 \
            and not SAMPLES_SLACK * want <= got <= want / SAMPLES_SLACK:
        return f"it trained on {int(got):,} examples while the plan priced {int(want):,}"
    want = planned.get("params")
    gguf = ran.get("gguf")
    got = gguf.get("params") if isinstance(gguf, dict) and gguf.get("params") else ran.get("params")
    if isinstance(want, (int, float)) and isinstance(got, (int, float)) and want > 0 and got > 0 \
            and not 1 / PARAMS_SLACK <= got / want <= PARAMS_SLACK:
        what = f" ({ran['model']})" if isinstance(ran.get("model"), str) else ""
        return f"its model{what} has {_count(got)} parameters while the plan priced {_count(want)}"
    return None


def _count(n: float) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g}{unit}"
    return f"{n:.0f}"

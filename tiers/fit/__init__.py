"""The planner: which milestones fit this kit, at what size, and how long they take.

    fit(profile, milestone) -> Plan        fit_all(profile, track) -> list[Plan]

    profile ──► targets.py ──► pricing/ ──► calibration.py ──► rules.py ──► planner.py ──► Plan
                devices the    memory and    corrected by      memory with    the largest size
                tiers could    time of each  earlier runs      headroom,      that fits, or why
                use here       size, each    on this device    limits, the    none does
                (measured      with its                        time box
                throughput)    basis

For a milestone the planner lists the devices its tiers could use on this kit
(a board, the CPU, a GPU, this machine plus its peers), prices every size on the
milestone's ladder on each (models/costs.py gives parameters, FLOPs, bytes; the
pricers divide them by the profile's *measured* throughput, times an efficiency
per workload, then correct by the profile's calibration records), and picks the
largest size whose peak memory fits with headroom and whose time fits the time
box. When nothing fits it says what does not and what would. Every number comes
with its basis, for `tierkit fit --explain`.

The reference kits it can plan for (profiles/) are loaded by inventory/kits.py.
"""
from __future__ import annotations

from inventory.kits import PROFILES_DIR, reference_names, reference_profile, resolve_profile
from tiers.fit.calibration import CALIBRATION_CLAMP, calibration
from tiers.fit.planner import FitError, Sized, fit, fit_all, fitting_reference_kits, size_on
from tiers.fit.pricing import PRICERS, Priced
from tiers.fit.rules import Check, fmt_seconds
from tiers.fit.targets import Target, targets

__all__ = [
    "CALIBRATION_CLAMP", "PRICERS", "PROFILES_DIR", "Check", "FitError", "Priced", "Sized", "Target",
    "calibration", "fit", "fit_all", "fitting_reference_kits", "fmt_seconds", "reference_names",
    "reference_profile", "resolve_profile", "size_on", "targets",
]

"""Tier 1: the CPU milestones (numpy first), one readable file each.

Each milestone module declares a `Config` dataclass and `run(ctx) -> Output`, and
is registered by its entry in tiers/milestones.yaml (`module:`). A tier package
imports `inventory/`, `models/` and the shared `tiers` modules, never another tier
package; matplotlib is loaded only when a plot is drawn (tiers.report.pyplot).
"""

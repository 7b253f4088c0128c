"""Tier 1: the CPU milestones (numpy first), one readable file each.

Each milestone module has `run(ctx) -> Output`, registered by id in
`tiers.runner.REGISTRY`. A tier package imports `inventory/` and `models/`,
never another tier package; heavy imports (matplotlib) stay inside `run`.
"""

"""Placement as tier 3 uses it: the one implementation lives in tiers/placement.py.

    tiers/placement.py  (place, choose_layout, layouts from a GGUF or a GPTConfig)
        <- tiers.tier3.serve, the engines      (through this module)
        <- tiers.fit.pricing.inference         (B17's price: the same split `tierkit serve` runs)

It sits outside the tier packages because `tierkit fit` prices with it and tier
packages never import each other; this module keeps tier 3's imports short.
"""
from __future__ import annotations

from tiers.placement import (
    DECODE_FLOPS_SHARE,
    HEADROOM,
    LAYOUTS,
    ModelLayout,
    Node,
    PlacementError,
    Plan,
    Stage,
    choose_layout,
    engine_stage,
    hop_seconds,
    layout_from_config,
    layout_from_gguf,
    place,
    render,
    stages_for_engine,
)

__all__ = ["DECODE_FLOPS_SHARE", "HEADROOM", "LAYOUTS", "ModelLayout", "Node", "PlacementError", "Plan", "Stage", "choose_layout",
           "engine_stage", "hop_seconds", "layout_from_config", "layout_from_gguf", "place", "render",
           "stages_for_engine"]

"""Tier 3: one model across several machines (agent launching, placement, engines, the OpenAI-compatible server)."""

"""Tier 2: the torch milestones (B7, B9, B11-B14) and the local llama.cpp rig (B16)."""

"""Architectures shared by several tiers and their analytic cost models."""

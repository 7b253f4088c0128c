"""A milestone file that takes 0.3 s to import, as one with torch at its top does (tests/test_pricing_parts.py)."""
from __future__ import annotations

import dataclasses
import time

time.sleep(0.3)


@dataclasses.dataclass
class Config:
    steps: int = 1


def run(ctx):  # never called: the test only imports it
    raise NotImplementedError

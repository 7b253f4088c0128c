"""Bytes as people write them, both ways: one formatter, one parser.

    fmt_bytes(1.5e9) -> '1.5 GB'        decimal, as datasheets and `free -h --si` print them
    fmt_bytes(3 * 2**30, binary=True) -> '3.00 GiB'   binary, as memory budgets are given
    parse_bytes('8GiB') -> 8589934592   binary units (K = KiB), '1.5G', or plain bytes
"""
from __future__ import annotations

import re

KB, MB, GB = 1e3, 1e6, 1e9

_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?\s*", re.IGNORECASE)


def fmt_bytes(n: float | None, binary: bool = False) -> str:
    """Human bytes: decimal units with 3 significant digits, or binary units with 2 decimals; None is '?'."""
    if n is None:
        return "?"
    if binary:
        for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
            if abs(n) >= size:
                return f"{n / size:.2f} {unit}"
        return f"{int(n)} B"
    for unit, scale in (("GB", GB), ("MB", MB), ("KB", KB)):
        if abs(n) >= scale:
            return f"{n / scale:.3g} {unit}" if n / scale < 100 else f"{n / scale:,.0f} {unit}"
    return f"{n:,.0f} B"


def parse_bytes(text: str | int) -> int:
    """'8GiB', '512M', '1.5G', '1000000' -> bytes (binary units: K=KiB). One-line ValueError otherwise."""
    if isinstance(text, int):
        if text <= 0:
            raise ValueError(f"a size must be positive, got {text}")
        return text
    m = _SIZE.fullmatch(str(text))
    if not m:
        raise ValueError(f"cannot read {text!r} as a size: write e.g. 8GiB, 512MiB or a number of bytes")
    n = float(m.group(1)) * 1024 ** " KMGT".index((m.group(2) or " ").upper())
    if n < 1:
        raise ValueError(f"a size must be positive, got {text!r}")
    return int(n)

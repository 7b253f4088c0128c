"""Argument checks for what crosses the network: a launch request's args, a stage list.

    whole(v, "port", 1024, 65535)   ->  v, or EngineError("port must be a whole number 1024-65535, not 'x'")

An agent turns a head's JSON into a worker's argv, so every value is checked
for its type and range before it gets near a command line: no shell, no
free-form strings, nothing argv could mistake for an option. Each refusal is
one line (an EngineError) that names the setting and what it got.
"""
from __future__ import annotations

import ipaddress
import re
from typing import Any

from tiers.tier3.engine import EngineError

_HOSTNAME = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9.-]{0,251}[A-Za-z0-9])?")


def whole(v: Any, what: str, lo: int, hi: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise EngineError(f"{what} must be a whole number {lo}-{hi}, not {v!r}")
    return v


def number(v: Any, what: str, lo: float, hi: float) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not lo <= v <= hi:
        raise EngineError(f"{what} must be a number {lo:g}-{hi:g}, not {v!r}")
    return float(v)


def ipv4(v: Any, what: str) -> str:
    try:
        return str(ipaddress.IPv4Address(str(v)))
    except ValueError:
        raise EngineError(f"{what} must be an IPv4 address, not {v!r}") from None


def host(v: Any, what: str) -> str:
    """An IP address or a plain hostname (never something argv could mistake for an option)."""
    s = str(v) if isinstance(v, str) else ""
    try:
        return str(ipaddress.ip_address(s))
    except ValueError:
        if _HOSTNAME.fullmatch(s):
            return s
    raise EngineError(f"{what} must be an IP address or a hostname, not {v!r}")


def hostport(v: Any, what: str) -> tuple[str, int]:
    """HOST:PORT or [IPv6]:PORT -> (host, port)."""
    m = re.fullmatch(r"\[?([^\]]+?)\]?:(\d{1,5})", v) if isinstance(v, str) else None
    if not m:
        raise EngineError(f"{what} must be HOST:PORT, not {v!r}")
    return host(m.group(1), f"{what} host"), whole(int(m.group(2)), f"{what} port", 1, 65535)


def layers(v: Any, what: str = "layers") -> tuple[int, int]:
    """[a, b] or "a:b" with 0 <= a < b: blocks a..b-1."""
    if isinstance(v, str) and re.fullmatch(r"\d+:\d+", v):
        v = [int(x) for x in v.split(":")]
    if not (isinstance(v, (list, tuple)) and len(v) == 2 and all(isinstance(x, int) and not isinstance(x, bool)
                                                                 for x in v)) or not 0 <= v[0] < v[1]:
        raise EngineError(f"{what} must be [a, b] with 0 <= a < b (blocks a..b-1), not {v!r}")
    return int(v[0]), int(v[1])


def known_keys(args: Any, allowed: set[str], engine: str) -> dict[str, Any]:
    """`args` as a dict when it is a JSON object with only `allowed` keys; EngineError naming the others."""
    if not isinstance(args, dict):
        raise EngineError("args must be a JSON object")
    unknown = sorted(set(args) - allowed)
    if unknown:
        raise EngineError(f"unknown {engine} argument(s): {', '.join(unknown)} (allowed: {', '.join(sorted(allowed))})")
    return args

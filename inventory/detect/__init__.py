"""Detectors: one module per concept, each a `detect(...)` function.

A detector returns its section of the profile (a model, a list, or None), or a
`Found(value, note)` when the answer comes with a remark ("no GPU: NVML library
not found" is an answer, not an error). It raises `Unavailable(reason)` when its
source is not there. The probe turns anything else it raises, and a detector
that hangs past its timeout, into an empty field with the reason; nothing a
detector does can stop the probe.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any


# Seconds the probe listens for agents over mDNS. Agents answer our one-shot
# unicast-response query within a few ms on a LAN (0.9 ms on loopback, 0.3 ms
# RTT across a veth pair here); 0.15 s leaves room for Wi-Fi, and --mdns-wait
# raises it where a network is slower.
MDNS_WAIT = 0.15


class Unavailable(Exception):
    """The detector's source is missing; the field stays empty with this reason."""


@dataclass
class Found:
    value: Any
    note: str | None = None


def read_text(path: Path) -> str | None:
    """A sysfs/procfs file's text, or None when it is absent or unreadable."""
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except (FileNotFoundError, NotADirectoryError, PermissionError, IsADirectoryError, OSError):
        return None

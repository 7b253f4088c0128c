"""Single-board computers, from the Linux device tree.

A Raspberry Pi or a Jetson says what it is in `/proc/device-tree/model` (one
NUL-terminated string) and `compatible` (a NUL-separated list, most specific
first, the SoC last). PCs and most VMs have no device tree: that is an answer
("not a single-board computer"), not an error. A device tree we cannot read
raises `Unavailable` with the path and what is wrong, and nothing else, so that
junk in a file never shows up as a traceback.
"""
from __future__ import annotations

import errno
from pathlib import Path

from ..profile import SBC
from . import Found, Unavailable

# /proc/device-tree is a symlink to the second; some containers mount only one.
DT_DIRS = ("proc/device-tree", "sys/firmware/devicetree/base")
MAX_BYTES = 4096  # a model or compatible string is tens of bytes; more is junk

# Jetson SoCs by their device-tree name.
TEGRA = {"tegra234": "Orin", "tegra194": "Xavier", "tegra186": "TX2", "tegra210": "X1"}


def _read_strings(path: Path) -> list[str] | None:
    """The NUL-separated strings in a device-tree property; None when it is absent.

    Reads bytes, not text: `read_text` would paper over bad bytes with U+FFFD,
    and a model full of replacement characters must be reported, not stored.
    """
    try:
        with path.open("rb") as f:
            data = f.read(MAX_BYTES + 1)
    except FileNotFoundError:
        return None
    except IsADirectoryError:
        raise Unavailable(f"malformed device tree at {path}: a directory where a file should be") from None
    except OSError as exc:  # permission, a symlink loop, an I/O error
        what = exc.strerror or errno.errorcode.get(exc.errno or 0, "unreadable")
        raise Unavailable(f"malformed device tree at {path}: cannot read it ({what})") from None
    if len(data) > MAX_BYTES:
        raise Unavailable(f"malformed device tree at {path}: longer than {MAX_BYTES} bytes")
    if not data.strip(b"\0"):
        raise Unavailable(f"malformed device tree at {path}: empty")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise Unavailable(f"malformed device tree at {path}: not UTF-8 (byte {exc.start})") from None
    strings = text.rstrip("\0").split("\0")
    if not all(s and s.isprintable() for s in strings):
        raise Unavailable(f"malformed device tree at {path}: empty strings or control characters")
    return strings


def _soc(family: str, compatible: list[str]) -> str | None:
    """The SoC's name from `compatible`, where by convention the SoC entry comes last."""
    for entry in compatible:
        vendor, _, chip = entry.partition(",")
        if family == "raspberry-pi" and vendor == "brcm" and chip.startswith("bcm"):
            return chip.upper()  # brcm,bcm2712 -> BCM2712
        if family == "jetson" and vendor == "nvidia" and chip.startswith("tegra"):
            nick = TEGRA.get(chip)
            return f"Tegra{chip[5:]} ({nick})" if nick else chip  # nvidia,tegra234 -> Tegra234 (Orin)
    return compatible[-1] if family == "other" and compatible else None


def detect(root: Path = Path("/")) -> SBC | Found:
    """The single-board computer this runs on, or Found(None, why not)."""
    for rel in DT_DIRS:
        base = root / rel
        model = _read_strings(base / "model")
        compatible = _read_strings(base / "compatible")
        if model is not None or compatible is not None:
            break
    else:
        return Found(None, "no device tree: not a single-board computer")

    if model is not None and len(model) != 1:
        raise Unavailable(f"malformed device tree at {base / 'model'}: {len(model)} strings where one belongs")
    compatible = compatible or []
    name = model[0] if model else compatible[0]  # the spec requires model; fall back if absent
    if name.startswith("Raspberry Pi") or any(c.startswith("raspberrypi,") for c in compatible):
        family = "raspberry-pi"
    elif any(c.startswith("nvidia,tegra") for c in compatible):
        family = "jetson"
    else:
        family = "other"
    return SBC(model=name, family=family, compatible=compatible, soc=_soc(family, compatible))

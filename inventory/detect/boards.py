"""Serial ports and the dev boards behind them.

Every serial port is reported, because a learner with a board that tierkit does
not know still needs to see its port. A USB VID:PID either names a board
exactly (a native-USB board such as the Nano 33 BLE), names only a USB-to-UART
bridge chip (then we list the boards it could be and never guess), or is
unknown. The catalog lives in `inventory/board_catalog.yaml`, as data.

Ports are never opened here: opening a port asserts DTR, which resets an
Arduino. Whether we could open it is asked of the kernel with `os.access`, and
a refusal becomes one line that names the group to join.
"""
from __future__ import annotations

import functools
import os
import stat
import sys
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Iterable, Literal, Mapping

import yaml

from ..profile import Board, BoardSpec
from . import Found, Unavailable

if TYPE_CHECKING:
    from serial.tools.list_ports_common import ListPortInfo

CATALOG_PATH = Path(__file__).parent.parent / "board_catalog.yaml"
Match = Literal["board", "bridge", "unknown"]
Access = Literal["ok", "denied", "busy", "unknown"]


# ---------------------------------------------------------------- catalog

@dataclass(frozen=True)
class Bridge:
    """A USB-to-UART chip: its VID:PID names the chip, not the board behind it."""
    vid_pid: str
    chip: str
    candidates: tuple[str, ...]  # board ids, most likely first


@dataclass(frozen=True)
class Catalog:
    """The board catalog, read-only: the planner lists `boards`, the probe looks up VID:PIDs."""
    boards: Mapping[str, BoardSpec]   # board id -> spec
    by_vid_pid: Mapping[str, str]     # VID:PID that names a board exactly -> board id
    bridges: Mapping[str, Bridge]     # VID:PID of a bridge chip -> bridge


def normalise_vid_pid(vid_pid: str) -> str:
    """'2341:805a' or '0x2341:0x805A' -> '2341:805A'; ValueError for anything else."""
    try:
        vid, pid = (int(part, 16) for part in vid_pid.strip().split(":"))
        if not (0 <= vid <= 0xFFFF and 0 <= pid <= 0xFFFF):
            raise ValueError
    except ValueError:
        raise ValueError(f"not a USB VID:PID: {vid_pid!r} (expected hex like 2341:805A)") from None
    return f"{vid:04X}:{pid:04X}"


@functools.cache
def catalog() -> Catalog:
    """Load and check the catalog once; a broken catalog is a packaging bug, said in one line."""
    raw = yaml.safe_load(CATALOG_PATH.read_text(encoding="utf-8"))
    boards: dict[str, BoardSpec] = {}
    by_vid_pid: dict[str, str] = {}
    bridges: dict[str, Bridge] = {}

    def claim(vid_pid: str, owner: str) -> str:
        key = normalise_vid_pid(vid_pid)
        if key != vid_pid or key in by_vid_pid or key in bridges:
            raise ValueError(f"{CATALOG_PATH}: {owner}: VID:PID {vid_pid!r} is duplicated or not uppercase XXXX:XXXX")
        return key

    for board_id, entry in raw["boards"].items():
        entry = dict(entry)
        usb = entry.pop("usb", [])
        boards[board_id] = BoardSpec(**entry)  # extra="forbid" catches a misspelt key
        for vid_pid in usb:
            by_vid_pid[claim(vid_pid, board_id)] = board_id
    for vid_pid, entry in raw["bridges"].items():
        missing = [c for c in entry["candidates"] if c not in boards]
        if missing:
            raise ValueError(f"{CATALOG_PATH}: bridge {vid_pid}: unknown candidate boards {missing}")
        key = claim(vid_pid, f"bridge {vid_pid}")
        bridges[key] = Bridge(key, entry["chip"], tuple(entry["candidates"]))
    return Catalog(MappingProxyType(boards), MappingProxyType(by_vid_pid), MappingProxyType(bridges))


def lookup(vid_pid: str) -> tuple[Match, BoardSpec | None, list[BoardSpec]]:
    """(match, board, candidates) for a VID:PID. Specs are copies, safe to change."""
    key = normalise_vid_pid(vid_pid)
    cat = catalog()
    if key in cat.by_vid_pid:
        return "board", cat.boards[cat.by_vid_pid[key]].model_copy(), []
    if key in cat.bridges:
        return "bridge", None, [cat.boards[b].model_copy() for b in cat.bridges[key].candidates]
    return "unknown", None, []


# ---------------------------------------------------------------- access

def check_access(device: str) -> tuple[Access, str | None]:
    """Could this user open the port? Asked without opening it (that would reset the board)."""
    if sys.platform == "win32":
        return "unknown", None  # COM ports are not files: only opening one would tell
    if os.access(device, os.R_OK | os.W_OK):
        return "ok", None
    try:  # stat after access, so a node that vanished in between is not called "denied"
        st = os.stat(device)
    except FileNotFoundError:
        return "unknown", (f"{device}: the device node has vanished (board unplugged or reset "
                           "during the probe); reconnect it and probe again")
    except OSError as exc:
        return "unknown", f"{device}: cannot be examined ({exc.strerror}); reconnect the board and probe again"
    return "denied", _denied_fix(device, st)


def _denied_fix(device: str, st: os.stat_result) -> str:
    """One line: who owns the port, and the command that lets this user open it."""
    import grp  # POSIX only; imported here so the module loads everywhere

    try:
        group = grp.getgrgid(st.st_gid).gr_name
        members = grp.getgrgid(st.st_gid).gr_mem
    except KeyError:
        group, members = str(st.st_gid), []
    mode = f"{stat.S_IMODE(st.st_mode):04o}"
    group_rw = st.st_mode & (stat.S_IRGRP | stat.S_IWGRP) == (stat.S_IRGRP | stat.S_IWGRP)
    if group_rw and st.st_gid != 0:
        if _user_name() in members and st.st_gid not in os.getgroups():
            return (f"{device}: permission denied: you are in group '{group}' but this login "
                    f"session is not yet; log out and back in (or run `newgrp {group}`)")
        return (f"{device}: permission denied (owned by group '{group}', mode {mode}); "
                f"fix: `sudo usermod -aG {group} $USER`, then log out and back in")
    # Joining this group would not help (no group rw) or would be unsafe (root):
    # give the port to dialout first.
    return (f"{device}: permission denied (group '{group}', mode {mode}); fix: a udev rule "
            "giving serial ports to group dialout (SUBSYSTEM==\"tty\", GROUP=\"dialout\", MODE=\"0660\"), "
            "then `sudo usermod -aG dialout $USER` and log out and back in")


def _user_name() -> str | None:
    import pwd

    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except KeyError:  # a uid with no passwd entry, as in some containers
        return None


# ---------------------------------------------------------------- detect

def _vid_pid(port: ListPortInfo) -> str | None:
    if port.vid is None or port.pid is None:
        return None  # not a USB device: a built-in UART, a Bluetooth port, a pty
    return f"{port.vid:04X}:{port.pid:04X}"


def describe(port: ListPortInfo) -> Board:
    """One port as the profile's `Board`."""
    vid_pid = _vid_pid(port)
    match, spec, candidates = lookup(vid_pid) if vid_pid else ("unknown", None, [])
    access, problem = check_access(port.device)
    return Board(port=port.device, vid_pid=vid_pid, product=port.product,
                 serial_number=port.serial_number, match=match, board=spec,
                 candidates=candidates, access=access, problem=problem)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def detect(ports: Iterable[ListPortInfo] | None = None) -> Found:
    """Every serial port, with the board behind it when its VID:PID says so."""
    if ports is None:
        try:
            from serial.tools import list_ports
        except ImportError:
            raise Unavailable("pyserial is not installed; `pip install pyserial`") from None
        ports = list_ports.comports()
    boards = [describe(p) for p in ports]
    if not boards:
        return Found([], "no serial ports")
    parts = [_plural(len(boards), "serial port"),
             _plural(sum(b.match == "board" for b in boards), "board")]
    bridged = sum(b.match == "bridge" for b in boards)
    if bridged:
        parts.append(_plural(bridged, "bridge chip") + " (board not known)")
    troubled = sum(b.problem is not None for b in boards)
    if troubled:
        parts.append(f"{troubled} not accessible")
    return Found(boards, ", ".join(parts))

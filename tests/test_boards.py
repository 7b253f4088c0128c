"""inventory.detect.boards with real pyserial port objects on real pseudo-terminals.

Permission checks are real too: the suite runs as root, which bypasses them,
so the "denied" case runs the detector in a subprocess as user nobody.
"""
from __future__ import annotations

import grp
import json
import os
import shutil
import site
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from serial.tools import list_ports
from serial.tools.list_ports_common import ListPortInfo

from inventory.detect import Found
from inventory.detect import boards
from inventory.profile import Board, Profile, dumps, loads

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def pty() -> Iterator[str]:
    """A real tty device node (/dev/pts/N) that lives for the test."""
    master, slave = os.openpty()
    try:
        yield os.ttyname(slave)
    finally:
        os.close(slave)
        os.close(master)


def port(device: str, vid: int | None = None, pid: int | None = None,
         product: str | None = None, serial_number: str | None = None) -> ListPortInfo:
    info = ListPortInfo(device)
    info.vid, info.pid, info.product, info.serial_number = vid, pid, product, serial_number
    if vid is not None:
        info.apply_usb_info()
    return info


def only(found: Found) -> Board:
    assert isinstance(found, Found)
    assert len(found.value) == 1
    return found.value[0]


# ---------------------------------------------------------------- matches

def test_nano_33_ble_sense_is_named_exactly(pty: str) -> None:
    found = boards.detect([port(pty, 0x2341, 0x805A, "Nano 33 BLE", "A1B2C3D4E5F60718")])
    b = only(found)
    assert (b.port, b.vid_pid, b.match) == (pty, "2341:805A", "board")
    assert b.product == "Nano 33 BLE" and b.serial_number == "A1B2C3D4E5F60718"
    assert b.board is not None and "Nano 33 BLE" in b.board.name
    assert b.board.mcu == "nRF52840" and b.board.core == "Cortex-M4F"
    assert b.board.flash_bytes == 1024 * 1024 and b.board.sram_bytes == 256 * 1024
    assert b.board.fpu and b.board.dsp and b.board.source == "datasheet"
    assert b.candidates == []
    assert (b.access, b.problem) == ("ok", None)  # root may open anything
    assert found.note == "1 serial port, 1 board"


@pytest.mark.parametrize("vid_pid, mcu", [
    ("2341:0043", "ATmega328P"), ("2341:0001", "ATmega328P"), ("2A03:0043", "ATmega328P"),
    ("2341:0243", "ATmega328P"),
    ("2341:005A", "nRF52840"), ("2341:805A", "nRF52840"), ("2341:015A", "nRF52840"),
    ("2341:025A", "nRF52840"),
    ("2341:005E", "RP2040"), ("2341:805E", "RP2040"), ("2341:015E", "RP2040"), ("2341:025E", "RP2040"),
    ("303A:1001", "ESP32-S3"),
    ("2E8A:0005", "RP2040"), ("2E8A:000A", "RP2040"), ("2E8A:000B", "RP2040"),
])
def test_every_exact_vid_pid_in_the_reference_table(vid_pid: str, mcu: str) -> None:
    match, spec, candidates = boards.lookup(vid_pid)
    assert match == "board" and spec is not None and spec.mcu == mcu and candidates == []


@pytest.mark.parametrize("vid_pid, expect", [
    ("10C4:EA60", "ESP32"), ("1A86:55D4", "ESP32"), ("1A86:7523", "ESP32"),
    ("0403:6001", "ATmega328P"), ("0403:6010", "ESP32"), ("0403:6014", "ESP32"),
    ("0483:374B", "STM32F401RE"), ("0483:374E", "STM32F401RE"), ("0483:374F", "STM32F401RE"),
    ("0483:3753", "STM32F401RE"),
])
def test_every_bridge_in_the_reference_table(vid_pid: str, expect: str) -> None:
    match, spec, candidates = boards.lookup(vid_pid)
    assert match == "bridge" and spec is None
    assert expect in [c.mcu for c in candidates]


def test_ch340_bridge_lists_candidates_and_never_guesses(pty: str) -> None:
    found = boards.detect([port(pty, 0x1A86, 0x7523, "USB2.0-Serial")])
    b = only(found)
    assert (b.match, b.vid_pid, b.board) == ("bridge", "1A86:7523", None)
    names = [c.name for c in b.candidates]
    assert len(names) >= 3
    assert any("Uno" in n for n in names) and any("Nano" in n for n in names)
    assert any(n.startswith("ESP32 ") for n in names) and any("ESP32-S3" in n for n in names)
    assert "bridge chip" in found.note


def test_unknown_usb_device_and_plain_uart(pty: str) -> None:
    found = boards.detect([port(pty, 0x1234, 0x5678, "Mystery"), port(pty)])
    usb, uart = found.value
    assert (usb.match, usb.vid_pid, usb.board, usb.candidates) == ("unknown", "1234:5678", None, [])
    assert (uart.match, uart.vid_pid, uart.product) == ("unknown", None, None)
    assert found.note == "2 serial ports, 0 boards"


def test_every_port_is_reported_in_order(pty: str) -> None:
    ports = [port(pty, 0x2E8A, 0x0005), port(pty, 0x10C4, 0xEA60), port(pty, 0x0BDA, 0x8153)]
    found = boards.detect(ports)
    assert [b.match for b in found.value] == ["board", "bridge", "unknown"]
    assert found.note.startswith("3 serial ports, 1 board, 1 bridge chip")


def test_no_ports() -> None:
    found = boards.detect([])
    assert isinstance(found, Found)
    assert (found.value, found.note) == ([], "no serial ports")


def test_vanished_device_node() -> None:
    master, slave = os.openpty()
    device = os.ttyname(slave)
    os.close(slave)
    os.close(master)  # the kernel removes /dev/pts/N: like a board unplugged mid-probe
    assert not os.path.exists(device)
    found = boards.detect([port(device, 0x2341, 0x0043)])
    b = only(found)
    assert b.match == "board" and b.access == "unknown"
    assert b.problem is not None and device in b.problem and "vanished" in b.problem
    assert "\n" not in b.problem
    assert "1 not accessible" in found.note


def test_this_machine_default_ports() -> None:
    """With no argument it lists the real ports pyserial sees here (maybe none)."""
    found = boards.detect()
    assert isinstance(found, Found)
    assert [b.port for b in found.value] == [p.device for p in list_ports.comports()]


def test_boards_fit_the_profile_schema(pty: str) -> None:
    found = boards.detect([port(pty, 0x2341, 0x805A), port(pty, 0x1A86, 0x55D4), port(pty)])
    profile = Profile(boards=found.value)
    assert loads(dumps(profile)).boards == found.value


# ---------------------------------------------------------------- catalog

def test_catalog_is_loaded_once_and_read_only() -> None:
    cat = boards.catalog()
    assert cat is boards.catalog()
    with pytest.raises(TypeError):
        cat.boards["x"] = cat.boards["pico"]  # type: ignore[index]


def test_lookup_returns_copies() -> None:
    _, spec, _ = boards.lookup("2E8A:0005")
    spec.flash_bytes = 1
    assert boards.lookup("2E8A:0005")[1].flash_bytes == 2 * 1024 * 1024


def test_catalog_is_consistent() -> None:
    cat = boards.catalog()
    for vid_pid in [*cat.by_vid_pid, *cat.bridges]:
        assert boards.normalise_vid_pid(vid_pid) == vid_pid
    assert not set(cat.by_vid_pid) & set(cat.bridges)
    for bridge in cat.bridges.values():
        assert bridge.candidates and all(c in cat.boards for c in bridge.candidates)
    for spec in cat.boards.values():
        assert spec.flash_bytes > 0 and spec.sram_bytes > 0 and spec.clock_mhz > 0
        if spec.core == "Cortex-M4F":
            assert spec.fpu and spec.dsp
        if "M0+" in spec.core or spec.core == "AVR":
            assert not spec.fpu and not spec.dsp


def test_lookup_normalises_and_rejects() -> None:
    assert boards.lookup("2341:805a")[0] == "board"
    assert boards.lookup("0x2341:0x805A")[0] == "board"
    assert boards.lookup("FFFF:FFFF") == ("unknown", None, [])
    for bad in ["", "2341", "2341:805A:1", "zzzz:0001", "12345:0001"]:
        with pytest.raises(ValueError, match="not a USB VID:PID"):
            boards.lookup(bad)


# ---------------------------------------------------------------- permission denied, for real

SETPRIV = shutil.which("setpriv")
NOBODY = ["--reuid=65534", "--regid=65534", "--clear-groups"]
CHILD = """
import json, sys
from serial.tools.list_ports_common import ListPortInfo
from inventory.detect.boards import detect
p = ListPortInfo(sys.argv[1])
p.vid, p.pid = 0x2341, 0x805A
found = detect([p])
print(json.dumps({"board": found.value[0].model_dump(mode="json"), "note": found.note}))
"""


def _nobody_env() -> dict[str, str]:
    # The repo for `inventory`, and this interpreter's site-packages for pyserial,
    # pydantic and yaml (needed when the fallback /usr/bin/python3 runs the child).
    paths = [str(REPO), *site.getsitepackages()]
    return {"PATH": "/usr/bin:/bin", "PYTHONPATH": os.pathsep.join(paths),
            "PYTHONDONTWRITEBYTECODE": "1", "HOME": "/nonexistent", "LC_ALL": "C.UTF-8"}


def _nobody_python() -> str | None:
    """An interpreter that user nobody can run and that imports the detector.

    The venv's python links into /root/.pyenv, which nobody cannot read; try it
    first anyway, then the system python with our site-packages on PYTHONPATH.
    """
    for exe in (sys.executable, "/usr/bin/python3"):
        probe = subprocess.run([SETPRIV, *NOBODY, exe, "-c", "import inventory.detect.boards"],
                               env=_nobody_env(), cwd="/", capture_output=True, timeout=60)
        if probe.returncode == 0:
            return exe
    return None


def _nobody_or_skip() -> str:
    """The interpreter to run as nobody, or a skip that says what is missing."""
    if os.geteuid() != 0:
        pytest.skip("needs root to create a port that an unprivileged user may not open")
    if SETPRIV is None:
        pytest.skip("needs setpriv (util-linux) to run the detector as an unprivileged user")
    exe = _nobody_python()
    if exe is None:
        pytest.skip("no python that user nobody can run imports the repo and its dependencies")
    return exe


def _run_as_nobody(exe: str, device: str) -> dict:
    out = subprocess.run([SETPRIV, *NOBODY, exe, "-c", CHILD, device], env=_nobody_env(),
                         cwd="/", capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_permission_denied_names_dialout_and_the_fix(pty: str) -> None:
    exe = _nobody_or_skip()
    try:
        dialout = grp.getgrnam("dialout").gr_gid
    except KeyError:
        pytest.skip("this machine has no dialout group")
    os.chown(pty, 0, dialout)
    os.chmod(pty, 0o660)
    got = _run_as_nobody(exe, pty)
    b = got["board"]
    assert b["access"] == "denied" and b["match"] == "board"
    problem = b["problem"]
    assert pty in problem and "permission denied" in problem and "'dialout'" in problem
    assert "sudo usermod -aG dialout $USER" in problem and "log out and back in" in problem
    assert "\n" not in problem
    assert "1 not accessible" in got["note"]


def test_permission_denied_on_a_root_owned_port(pty: str) -> None:
    exe = _nobody_or_skip()
    os.chown(pty, 0, 0)
    os.chmod(pty, 0o660)
    b = _run_as_nobody(exe, pty)["board"]
    assert b["access"] == "denied"
    problem = b["problem"]
    # Joining group root is no fix: it names the group, then dialout via udev.
    assert pty in problem and "'root'" in problem and "udev" in problem
    assert "usermod -aG dialout $USER" in problem and "usermod -aG root" not in problem

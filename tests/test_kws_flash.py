"""`tierkit kws flash` and `monitor`: size checks before any upload, one-line errors, PlatformIO
as it behaves here (no registry: every build fails at "Installing <platform>"), and a monitor
that survives the board resetting, on pseudo-terminals.

The image checked is a real ELF built here: the firmware for the emulated Cortex-M4 with the
MLPerf Tiny-size DS-CNN (random int8 weights, from tests/test_kws_export.py: no TensorFlow).
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import struct
import subprocess
import threading
import time
import zlib
from pathlib import Path

import pytest

from tests.conftest import assert_one_line_error, run_cli
from tiers.tier0 import flash as fl
from tiers.tier0 import monitor as mon

FW = Path(__file__).resolve().parent.parent / "firmware"


@pytest.fixture(scope="module")
def elf(tmp_path_factory) -> Path:
    if shutil.which("arm-none-eabi-gcc") is None:
        pytest.skip("arm-none-eabi-gcc not installed (sudo apt-get install gcc-arm-none-eabi libnewlib-arm-none-eabi)")
    from tests.test_kws_export import dscnn_model
    from tiers.tier0 import export, firmware

    d = tmp_path_factory.mktemp("dscnn")
    export.export_c(dscnn_model(0, channels=64, blocks=4), d / "model")
    return firmware.build_qemu(d / "model", cache_dir=d / "cache").elf


@pytest.fixture
def pty():
    """A pseudo-terminal: (master fd, slave path), standing in for a board's serial port."""
    master, slave = os.openpty()
    path = os.ttyname(slave)
    os.close(slave)
    yield master, path
    try:
        os.close(master)
    except OSError:
        pass


def profile_with(port: str, board_key: str | None, *, flash_bytes: int | None = None, sram_bytes: int | None = None):
    """The Nano reference kit with one attached board at `port` (None: no board at all)."""
    from inventory.profile import Board
    from tiers.fit import reference_profile

    p = reference_profile("arduino-nano-33-ble-sense").model_copy(deep=True)  # the cached kit stays as it is
    if board_key is None:
        p.boards = []
        return p
    from inventory.detect.boards import catalog

    spec = catalog().boards[board_key].model_copy()
    if flash_bytes is not None:
        spec.flash_bytes = flash_bytes
    if sram_bytes is not None:
        spec.sram_bytes = sram_bytes
    p.boards = [Board(port=port, vid_pid=None, match="board", board=spec, access="ok")]
    return p


def save_profile(p, path: Path) -> Path:
    from inventory.profile import save

    return save(p, path)


# ====================================================================== image size

def test_image_size_equals_binutils(elf):
    size = fl.image_size(elf)
    out = subprocess.run(["arm-none-eabi-size", str(elf)], capture_output=True, text=True, check=True).stdout
    text, data, bss = (int(v) for v in out.splitlines()[1].split()[:3])
    assert (size.text, size.data, size.bss) == (text, data, bss)
    print(f"QEMU image, DS-CNN 64x4 (MLPerf size): flash {size.flash:,} B, RAM {size.ram:,} B")
    with pytest.raises(fl.FlashError, match="not an ELF"):
        fl.image_size(Path(__file__))


def test_oversized_image_is_refused_before_any_upload(elf, pty):
    _, port = pty
    uploads: list[tuple] = []
    size = fl.image_size(elf)
    tiny = profile_with(port, "pico", flash_bytes=size.flash - 1, sram_bytes=2048)
    with pytest.raises(fl.ImageTooLarge) as e:
        fl.flash(tiny, builder=lambda env, on_line=None: elf, uploader=lambda *a, **k: uploads.append(a))
    msg = str(e.value)
    assert not uploads
    assert "\n" not in msg and f"flash {size.flash:,} B > {size.flash - 1:,} B" in msg and "RAM" in msg
    assert "nothing was uploaded" in msg

    uno = fl.Budget("Arduino Uno R3", 32_768, 2_048, "datasheet")      # the real Uno: too small for either
    with pytest.raises(fl.ImageTooLarge, match="flash .* and RAM"):
        fl.check_image(size, uno)

    ok = profile_with(port, "pico")                                     # a real Pico's budget: it fits
    r = fl.flash(ok, builder=lambda env, on_line=None: elf, uploader=lambda *a, **k: uploads.append(a))
    assert r.uploaded and uploads == [("pico", port, None)] and r.target.env == "pico"
    assert "RAM" in r.line() and r.budget.source == "profile"


# ====================================================================== one-line errors

def test_no_board_and_wrong_board(home, tmp_path, pty):
    _, port = pty
    assert_one_line_error(run_cli("kws", "flash", "--profile", "laptop-8gb-cpu", home=home), "no board")
    uno = save_profile(profile_with("/dev/ttyACM7", "uno-r3"), tmp_path / "uno.yaml")
    assert_one_line_error(run_cli("kws", "flash", "--profile", str(uno), home=home), "wrong board", "Arduino Uno R3")
    nano = save_profile(profile_with(port, "nano-33-ble"), tmp_path / "nano.yaml")
    assert_one_line_error(run_cli("kws", "flash", "--profile", str(nano), "--board", "esp32s3", "--port", port,
                                  home=home), "wrong board", "not ESP32-S3")
    assert_one_line_error(run_cli("kws", "flash", "--board", "uno", home=home), "unknown board 'uno'")
    assert_one_line_error(run_cli("kws", "flash", "--board", "pico", "--port", "/dev/ttyNOPE9", home=home),
                          "no such port /dev/ttyNOPE9")


def test_platformio_missing(monkeypatch):
    import builtins
    import sys

    monkeypatch.setattr(fl.shutil, "which", lambda name: None)
    monkeypatch.setattr(fl.sys, "executable", "/nonexistent/python")
    real_import = builtins.__import__

    def no_platformio(name, *a, **k):
        if name == "platformio":
            raise ImportError(name)
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_platformio)
    monkeypatch.delitem(sys.modules, "platformio", raising=False)
    with pytest.raises(fl.FlashError, match=r"PlatformIO is not installed: pip install platformio"):
        fl.pio_command()


def test_port_busy_and_permission(pty):
    import serial

    _, port = pty
    fl.check_port(port)                                                  # free: fine
    held = serial.Serial(port, exclusive=True)
    try:
        with pytest.raises(fl.FlashError, match="is busy: another program has it open"):
            fl.check_port(port)
    finally:
        held.close()
    # Tests run as root here, where every port opens; the message for EACCES, from the real errno:
    msg = mon._port_problem("/dev/ttyACM0", OSError(errno.EACCES, "Permission denied"))
    assert "permission denied" in msg.lower() and "\n" not in msg


def test_platformio_build_failure_is_one_line_with_its_last_lines(monkeypatch, tmp_path):
    """The real `pio run` here: it cannot download the nordicnrf52 platform. A fresh PlatformIO home
    and a proxy that refuses make that so on any machine; it gives up after ~60 s of retries."""
    try:
        fl.pio_command()
    except fl.FlashError as exc:
        pytest.skip(str(exc))
    monkeypatch.setenv("PLATFORMIO_CORE_DIR", str(tmp_path / "pio-core"))
    monkeypatch.setenv("TIERKIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")
    model = tmp_path / "model"          # PlatformIO stops at the download, before compiling it
    model.mkdir()
    (model / "model.c").write_text("")
    (model / "model.h").write_text("")
    assert fl.prepare_project(model) == tmp_path / "cache" / "firmware" / "project"
    lines: list[str] = []
    with pytest.raises(fl.BuildFailed) as e:
        fl.pio_build("nano33ble", on_line=lines.append, timeout=300)
    msg = str(e.value)
    print(msg)
    assert "\n" not in msg and msg.startswith("PlatformIO build of nano33ble failed (exit 1); last lines: ")
    assert "Installing nordicnrf52" in msg and lines                     # progress was streamed line by line
    assert not (FW / ".pio").exists()                                    # the build folder is the cache's


def test_platformio_project_parses_offline(tmp_path):
    try:
        pio = fl.pio_command()
    except fl.FlashError as exc:
        pytest.skip(str(exc))
    env = {**os.environ, "PLATFORMIO_CORE_DIR": str(tmp_path / "pio-core")}
    proc = subprocess.run([*pio, "project", "config", "--json-output"], cwd=FW, capture_output=True, text=True,
                          env=env, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    sections = {name: dict(opts) for name, opts in json.loads(proc.stdout)}
    assert {"env:nano33ble", "env:esp32s3", "env:pico"} <= set(sections)
    for key, t in fl.TARGETS.items():
        env_opts = sections[f"env:{t.env}"]
        assert f"+<../boards/{key}/>" in " ".join(env_opts["build_src_filter"])
        assert (FW / "boards" / key).is_dir()
    assert sections["env:nano33ble"]["platform"] == "nordicnrf52"
    assert sections["env:esp32s3"]["board"] == "esp32-s3-devkitc-1" and sections["env:pico"]["platform"] == "raspberrypi"
    assert "-ffp-contract=off" in " ".join(sections["env"]["build_flags"])


# ====================================================================== monitor

def _send_until(master: int, data: bytes, done, timeout: float = 15.0) -> None:
    """Write `data` every 0.2 s until `done()`: pyserial flushes whatever arrived before it opened the port."""
    deadline = time.monotonic() + timeout
    while not done() and time.monotonic() < deadline:
        os.write(master, data)
        time.sleep(0.2)
    assert done(), f"nothing read within {timeout:g} s"


def test_monitor_survives_the_board_resetting(tmp_path):
    """The port (a symlink, like /dev/ttyACM0) vanishes when the board resets and comes back
    on another pseudo-terminal; the monitor keeps reading."""
    link = tmp_path / "ttyKWS0"
    master, slave = os.openpty()
    link.symlink_to(os.ttyname(slave))
    os.close(slave)
    lines, dets, notes = [], [], []
    stats: list[mon.MonitorStats] = []
    stop = threading.Event()
    t = threading.Thread(target=lambda: stats.append(mon.monitor(
        str(link), on_line=lines.append, on_detection=dets.append, on_status=notes.append,
        stop=stop.is_set, reconnect_timeout=20, poll=0.05)), daemon=True)
    t.start()
    _send_until(master, b"# tierkit kws firmware 0.1.0 board=nano33ble\nDET yes 0.91 1234\n", lambda: dets)
    os.close(master)                                  # the board resets: its port goes away
    link.unlink()
    time.sleep(0.5)
    master, slave = os.openpty()                      # ... and comes back
    link.symlink_to(os.ttyname(slave))
    os.close(slave)
    _send_until(master, b"DET stop 0.88 5600\n", lambda: any(d.label == "stop" for d in dets))
    stop.set()
    t.join(5)
    os.close(master)
    assert (dets[0].label, dets[0].score, dets[0].time_ms) == ("yes", 0.91, 1234)
    assert (dets[-1].label, dets[-1].score, dets[-1].time_ms) == ("stop", 0.88, 5600)
    assert any(x.startswith("# tierkit kws firmware") for x in lines) and stats[0].reconnects == 1
    assert any("went away" in n for n in notes) and any("reconnected" in n for n in notes)


def test_monitor_cli_and_missing_port(home, pty):
    master, port = pty
    stop = threading.Event()

    def talk() -> None:
        while not stop.is_set():
            try:
                os.write(master, b"DET go 0.80 2000\n")
            except OSError:
                return
            time.sleep(0.3)

    threading.Thread(target=talk, daemon=True).start()
    try:
        proc = run_cli("kws", "monitor", "--port", port, "--seconds", "4", home=home, timeout=60)
    finally:
        stop.set()
    assert proc.returncode == 0, proc.stderr
    assert "DET go 0.80 2000" in proc.stdout and " detections" in proc.stderr
    assert_one_line_error(run_cli("kws", "monitor", "--port", "/dev/ttyNOPE3", "--seconds", "1", home=home),
                          "no such port /dev/ttyNOPE3")


class _FakePort:
    def __init__(self, data: bytes):
        self.data = bytearray(data)
        self.written = bytearray()

    @property
    def in_waiting(self) -> int:
        return len(self.data)

    def read(self, n: int) -> bytes:
        out = bytes(self.data[:n])
        del self.data[:n]
        return out

    def write(self, b: bytes) -> int:
        self.written += b
        return len(b)


def test_link_takes_lines_and_frames_apart():
    body = b"i\x00" + struct.pack("<I", 5) + b"a=1\n\n"
    frame = b"\xa5\x5a" + body + struct.pack("<I", zlib.crc32(body))
    port = _FakePort(b"# hello\nDET left 0.79 40\npartial" + frame + b" line\n")
    link = mon.Link(port, timeout=1)
    r = link.read_reply()
    assert (r.type, r.payload) == ("i", b"a=1\n\n")
    assert link.lines == ["# hello", "DET left 0.79 40"] and link.detections[0].label == "left"
    with pytest.raises(mon.DeviceError, match="no reply"):
        link.read_reply()
    assert link.lines[-1] == "partial line"
    assert mon.encode_frame("I") == b"\xa5\x5aI\x00\x00\x00\x00\x00" + struct.pack("<I", zlib.crc32(b"I\x00\x00\x00\x00\x00"))
    with pytest.raises(ValueError, match="int16 PCM"):
        link.classify(__import__("numpy").zeros(16000, "float32"))

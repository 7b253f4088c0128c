"""The keyword-spotter sequence as the README writes it, in a user's own folder, offline.

    kws export kws/model.tflite --out kws/c     remembered as the last export (next to the profile)
    kws flash --board nano33ble --no-upload     builds in the cache's copy of firmware/, sizes checked offline
    kws flash --board nano33ble --port P        offline, PlatformIO not fetched: one line within seconds
    kws eval --tflite kws/model.tflite          the last export, on the emulated Cortex-M4

The source tree (firmware/, ignored folders included) must be byte-for-byte what it was.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, assert_one_line_error

FW = REPO / "firmware"
NEEDS = [t for t in ("arm-none-eabi-gcc", "qemu-system-arm", "espeak-ng", "unshare") if shutil.which(t) is None]
pytestmark = pytest.mark.skipif(bool(NEEDS), reason=f"needs {', '.join(NEEDS)} (the tier-0 toolchain, no network)")


def _tree(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}


def _git_status() -> str:
    return subprocess.run(["git", "status", "--porcelain", "--ignored", "firmware"], cwd=REPO, capture_output=True,
                          text=True, check=False).stdout


def _kws(home: Path, *args: str, offline: bool = False, timeout: float = 300) -> subprocess.CompletedProcess:
    """`tierkit kws ARGS` from the user's folder; offline: in a network namespace of its own (no network)."""
    env = {**os.environ, "TIERKIT_HOME": str(home / "config"), "TIERKIT_CACHE": str(home / "cache"),
           "TIERKIT_DATA": str(home / "data"), "PLATFORMIO_CORE_DIR": str(home / "pio-core"), "PYTHONPATH": str(REPO)}
    cmd = [*(["unshare", "-n"] if offline else []), sys.executable, "-m", "tiers.cli", "kws", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=home, check=False)


def test_export_flash_eval_as_the_readme_writes_it(home):
    from tests.test_kws_export import dscnn_model

    before, status = _tree(FW), _git_status()
    (home / "kws").mkdir()
    (home / "kws" / "model.tflite").write_bytes(dscnn_model(0, channels=64, blocks=4))

    proc = _kws(home, "flash", "--board", "nano33ble", "--no-upload", offline=True)
    assert_one_line_error(proc, "no exported model", "kws export")             # nothing exported yet

    proc = _kws(home, "export", "kws/model.tflite", "--out", "kws/c")
    assert proc.returncode == 0 and (home / "kws" / "c" / "model.c").is_file(), proc.stderr

    proc = _kws(home, "flash", "--board", "nano33ble", "--no-upload", offline=True)
    assert proc.returncode == 0, proc.stderr
    assert "Arduino Nano 33 BLE Sense" in proc.stdout and "not uploaded" in proc.stdout and "flash " in proc.stdout
    assert (home / "cache" / "firmware" / "project" / "lib" / "model" / "model.c").read_bytes() == \
        (home / "kws" / "c" / "model.c").read_bytes()                       # the export, in the work folder

    master, port = os.openpty()
    try:
        t0 = time.monotonic()
        proc = _kws(home, "flash", "--board", "nano33ble", "--port", os.ttyname(port), offline=True, timeout=60)
        took = time.monotonic() - t0
    finally:
        os.close(master)
        os.close(port)
    assert_one_line_error(proc, "nordicnrf52", "internet", "--no-upload")
    assert took < 20, f"offline PlatformIO took {took:.0f} s to fail"

    proc = _kws(home, "eval", "--tflite", "kws/model.tflite", "--limit", "2", "--synth-speakers", "2")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "QEMU" in proc.stdout and "scores equal TFLite Micro's" in proc.stdout and "2/2" in proc.stdout

    assert _tree(FW) == before and _git_status() == status                 # the source tree is untouched

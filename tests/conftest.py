"""Shared test helpers: run the real `tierkit` CLI in a subprocess, isolated."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared"


def run_cli(*args: str, home: Path, timeout: float = 120, env: dict | None = None,
            cwd: Path | None = None) -> subprocess.CompletedProcess:
    """`tierkit ARGS` as a user runs it, with its profile home under `home`."""
    full_env = {**os.environ, "TIERKIT_HOME": str(home), "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.run([sys.executable, "-m", "tiers.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=full_env, cwd=cwd or home)


@pytest.fixture
def home(tmp_path: Path) -> Path:
    h = tmp_path / "home"
    h.mkdir()
    return h


def assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str, code: int = 2) -> None:
    assert proc.returncode == code, (proc.returncode, proc.stdout, proc.stderr)
    err = proc.stderr.strip()
    assert "Traceback" not in err, err
    assert len(err.splitlines()) == 1, err
    for n in needles:
        assert n in err, (n, err)


def wait_for_line(proc: subprocess.Popen, log: Path, needle: str, timeout: float = 90) -> str:
    """The process's log once it holds `needle`; fails (with the log) if the process exits or time runs out."""
    import time

    deadline = time.monotonic() + timeout
    while needle not in (text := log.read_text()):
        assert proc.poll() is None, f"exited {proc.returncode}: {text}"
        assert time.monotonic() < deadline, f"no {needle!r} within {timeout} s: {text}"
        time.sleep(0.05)
    return text


def stop_process(proc: subprocess.Popen, timeout: float = 15) -> None:
    """SIGTERM, then SIGKILL after `timeout` s; reaped either way."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def run_clients(one, n: int, timeout: float = 180) -> dict[int, dict]:
    """`one(i)` for i in 0..n-1, each in its own thread, all at once; {i: its result, or {"error": repr}}.
    A client still running after `timeout` s is simply missing from the answer."""
    import threading

    results: dict[int, dict] = {}

    def guarded(i: int) -> None:
        try:
            results[i] = one(i)
        except BaseException as exc:  # noqa: BLE001 - reported by the caller, with the others
            results[i] = {"error": repr(exc)}

    threads = [threading.Thread(target=guarded, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=timeout)
    return results

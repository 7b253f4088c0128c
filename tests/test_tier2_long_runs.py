"""Long B12 runs left alone: step lines in a log file as they happen, Ctrl-C saves a checkpoint, --resume.

    tierkit run B12 ... > log.txt      step lines appear while it runs (no terminal: no bar)
    SIGINT                             checkpoint at a step boundary, one line naming `--resume`, exit 130
    tierkit run B12 --resume           the checkpoint's settings, continued from its step
    --resume --set lr=...              a real conflict names both values (more steps is none)
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO, SHARED, assert_one_line_error, run_cli

DATA = SHARED / "data"
KIT = "laptop-8gb-cpu"
ENV = {"TIERKIT_DATA": str(DATA), "OMP_NUM_THREADS": "1", "TIERKIT_PROGRESS_SECONDS": "0"}
pytestmark = pytest.mark.skipif(not (DATA / "tinyshakespeare.txt").exists(),
                                reason=f"Tiny Shakespeare is not at {DATA}/tinyshakespeare.txt")
# settings the resumed run must take from the checkpoint (the planned defaults would differ)
FIRST = ["--size", "28K", "--set", "steps=400", "--set", "eval_iters=5", "--set", "eval_interval=0",
         "--set", "sample_interval=0", "--set", "sample_tokens=20", "--set", "ckpt_interval=0",
         "--set", "heldout_tokens=20000"]


def _wait_for(log: Path, proc: subprocess.Popen, needle: str, timeout: float = 120) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = log.read_text() if log.exists() else ""
        if needle in text:
            return text
        assert proc.poll() is None, f"the run ended before {needle!r}: {text[-2000:]}"
        time.sleep(0.05)
    raise AssertionError(f"no {needle!r} in the log after {timeout} s")


def test_log_lines_ctrl_c_checkpoint_and_resume(home):
    out = home / "overnight"      # not the default builds/: the resume command must name it
    log, err = home / "log.txt", home / "err.txt"
    env = {**os.environ, **ENV, "TIERKIT_HOME": str(home), "PYTHONPATH": str(REPO)}
    with log.open("w") as fo, err.open("w") as fe:
        proc = subprocess.Popen([sys.executable, "-m", "tiers.cli", "run", "B12", *FIRST, "--profile", KIT,
                                 "--out", str(out)], cwd=home, env=env, stdout=fo, stderr=fe)
        try:
            text = _wait_for(log, proc, "step 50/400")   # the log fills while the run goes on
            assert "loss" in text and "tokens/s" in text and "ETA" in text
            proc.send_signal(signal.SIGINT)
            proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
    stderr = err.read_text().strip()
    assert proc.returncode == 130, stderr
    assert len(stderr.splitlines()) == 1 and "Traceback" not in stderr, stderr
    assert "interrupted at step" in stderr and "checkpoint saved" in stderr, stderr
    assert f"tierkit run B12 --resume --out {out}" in stderr, stderr
    ckpt = out / ".B12-pretraining.resume.pt"
    step = torch.load(ckpt, weights_only=True)["step"]
    assert 50 <= step < 400 and f"step {step} of" in stderr
    assert not (out / "B12-pretraining").exists()

    # a setting that differs from the checkpoint's: both values named, nothing changed
    proc = run_cli("run", "B12", "--resume", "--profile", KIT, "--out", str(out), "--set", f"steps={step + 20}",
                   "--set", "lr=0.01", home=home, env=ENV)
    assert_one_line_error(proc, "lr 0.001 in the checkpoint, 0.01 given")
    assert ckpt.exists()

    # the bare command: every setting (steps, eval_iters, intervals...) comes from the checkpoint
    proc = run_cli("run", "B12", "--resume", "--profile", KIT, "--out", str(out), home=home, env=ENV, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    m = json.loads((out / "B12-pretraining" / "metrics.json").read_text())["metrics"]
    assert m["resumed_at"] == [step]
    assert len(m["history"]["loss"]) == 400
    assert f"step {step + 1}/400" in proc.stdout and "step 400/400" in proc.stdout

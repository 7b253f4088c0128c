"""The milestone runner, for real: real probes, real matmuls, real PNGs, real folders.

In-process tests drive `tiers.runner.run` with Plans built by hand (verdicts,
failures, missing packages); CLI tests run `tierkit run` as a user does, with
the planner choosing the plan.
"""
from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from inventory.probe import probe
from inventory.profile import Profile, load, save
from tests.conftest import REPO, assert_one_line_error, run_cli
from tiers import catalog, runner
from tiers.plan import Plan, Prediction

SMALL_B5 = {"sizes": [64, 128, 256], "min_seconds": 0.02, "bandwidth_bytes": 8 << 20}


@pytest.fixture(scope="session")
def probed(tmp_path_factory) -> Path:
    """This machine's profile with its benchmarks, probed once for the session."""
    path = tmp_path_factory.mktemp("probed") / "profile.yaml"
    save(probe(bench=True, discover=False), path)
    return path


@pytest.fixture
def live(home: Path, probed: Path) -> Path:
    """A live profile in the test's TIERKIT_HOME."""
    dst = home / "profile.yaml"
    shutil.copy(probed, dst)
    return dst


def b5_plan(profile: Profile, verdict: str = "fits", milestone: str = "B5", slug: str = "roofline",
            **config) -> Plan:
    return Plan(milestone=milestone, slug=slug, title="Roofline", tier=1, device="cpu", size="test",
                config={**SMALL_B5, **config}, verdict=verdict, profile=profile.name,
                prediction=Prediction(peak_bytes=200e6, seconds=2.0, basis=["hand-made plan for a test"]),
                reasons=["needs two nodes; this profile has one"] if verdict == "no" else [])


def assert_png(path: Path, min_bytes: int = 5_000, min_px: int = 300) -> None:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", path
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    assert width >= min_px and height >= min_px, (path, width, height)
    assert len(data) >= min_bytes, (path, len(data))


def leftovers(out_root: Path) -> list[str]:
    return [p.name for p in out_root.iterdir() if p.name.startswith(".")] if out_root.exists() else []


# ---------------------------------------------------------------- in process

def test_b5_in_process_writes_the_build_and_calibrates(tmp_path, live):
    prof = load(live)
    result = runner.run(b5_plan(prof), prof, tmp_path / "builds", profile_path=live)
    folder = tmp_path / "builds" / "B05-roofline"
    assert result.out_dir == folder
    assert {p.name for p in folder.iterdir()} >= {"README.md", "metrics.json", "roofline.png", "gflops_vs_n.png"}
    for png in ("roofline.png", "gflops_vs_n.png"):
        assert_png(folder / png)
    m = json.loads((folder / "metrics.json").read_text())
    assert [r["n"] for r in m["metrics"]["per_size"]] == [64, 128, 256]
    assert all(r["gflops"] > 0 for r in m["metrics"]["per_size"])
    assert m["metrics"]["per_size"][0]["intensity"] == pytest.approx(64 / 6, abs=0.01)  # 2n^3 / (3 n^2 4)
    assert m["metrics"]["ridge_flop_per_byte"] == pytest.approx(
        m["metrics"]["compute_roof_gflops"] / m["metrics"]["bandwidth_gbs"], rel=0.01)
    # the peak is the whole process's RSS (numpy is loaded): never below the baseline, never tiny
    act = m["actual"]
    assert act["peak_bytes"] >= act["rss_baseline_bytes"] > 20 << 20
    assert m["ratios"]["memory"] == pytest.approx(act["peak_bytes"] / 200e6, rel=1e-3)
    assert not leftovers(tmp_path / "builds")
    cal = load(live).calibration
    assert len(cal) == 1 and cal[0].milestone == "B5" and cal[0].predicted_seconds == 2.0
    assert cal[0].actual_peak_bytes == result.actual_peak_bytes


def test_memory_monitor_samples_an_allocation():
    import gc
    import time

    import numpy as np

    gc.collect()   # earlier tests' garbage, freed inside the block, would hide the allocation
    with runner.MemoryMonitor() as mon:
        a = np.ones(50 << 20, dtype=np.uint8)  # 50 MiB, touched, held for a few samples
        time.sleep(0.1)
        del a
    assert mon.rss_peak - mon.baseline_rss >= 45 << 20
    assert mon.samples >= 2


def test_memory_monitor_catches_a_spike_between_samples_by_ru_maxrss(tmp_path):
    """A spike shorter than the sampling interval that sets a new lifetime maximum is still seen."""
    # A child's ru_maxrss starts at its parent's size (Linux carries the pre-exec maximum over
    # exec), so the spike must exceed that to set a new lifetime maximum.
    code = (
        "import numpy as np, psutil\n"
        "from tiers.runner import MemoryMonitor, _maxrss_bytes\n"
        "spike = max(0, _maxrss_bytes() - psutil.Process().memory_info().rss) + (200 << 20)\n"
        "with MemoryMonitor(interval=30) as mon:\n"  # the sampler never wakes up
        "    a = np.ones(spike, dtype=np.uint8); del a\n"
        "print(mon.samples, mon.rss_peak - mon.baseline_rss, spike, mon.rss_peak_method)\n")
    import subprocess

    proc = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, cwd=REPO, timeout=60)
    samples, increase, spike, method = proc.stdout.split(" ", 3)
    assert int(samples) == 0 and int(increase) >= int(spike) - (10 << 20), proc.stdout
    assert method.startswith("ru_maxrss"), proc.stdout


def test_verdict_no_is_refused_before_anything(tmp_path, live):
    prof = load(live)
    before = live.read_bytes()
    with pytest.raises(runner.RunError) as err:
        runner.run(b5_plan(prof, verdict="no"), prof, tmp_path / "builds", profile_path=live)
    msg = str(err.value)
    assert "B5 does not fit" in msg and "needs two nodes" in msg and "\n" not in msg
    assert not (tmp_path / "builds").exists()
    assert live.read_bytes() == before


def test_unimplemented_milestone_says_what_runs(tmp_path, live, monkeypatch):
    # every catalog milestone has its code now: take one out of the registry, as a milestone still planned
    monkeypatch.delitem(runner.REGISTRY, "B12")
    prof = load(live)
    with pytest.raises(runner.RunError, match=r"^B12 is not implemented yet; runnable now: B0, B1, "):
        runner.run(b5_plan(prof, milestone="B12", slug="pretrain"), prof, tmp_path / "builds")
    assert not (tmp_path / "builds").exists()


def test_missing_package_names_the_extra(tmp_path, live, monkeypatch):
    prof = load(live)
    monkeypatch.setattr(catalog.Milestone, "packages", lambda self, gpu: ["matplotlib", "no_such_package_tierkit"])
    with pytest.raises(runner.RunError) as err:
        runner.run(b5_plan(prof), prof, tmp_path / "builds")
    assert "no_such_package_tierkit" in str(err.value) and "pip install 'tierkit[tier1]'" in str(err.value)
    assert not (tmp_path / "builds").exists()


@dataclass
class Config:
    """The stand-in milestones below (`_boom`, `_standin`) take no settings."""


def _boom(ctx: runner.Context) -> runner.Output:
    (ctx.out_dir / "half.png").write_bytes(b"\x89PNG half")
    raise ValueError("simulated failure halfway through")


def test_failed_run_keeps_the_previous_build(tmp_path, live, monkeypatch):
    monkeypatch.delenv("TIERKIT_DEBUG", raising=False)
    prof = load(live)
    out = tmp_path / "builds"
    previous = out / "B05-roofline"
    previous.mkdir(parents=True)
    (previous / "README.md").write_text("the previous build\n")
    monkeypatch.setitem(runner.REGISTRY, "B5", "tests.test_runner:_boom")
    with pytest.raises(runner.RunError) as err:
        runner.run(b5_plan(prof), prof, out, profile_path=live)
    msg = str(err.value)
    assert msg.startswith("B5 failed: ValueError: simulated failure") and "previous build folder is unchanged" in msg
    assert (previous / "README.md").read_text() == "the previous build\n"
    assert sorted(p.name for p in out.iterdir()) == ["B05-roofline"]  # no temp folder left
    assert load(live).calibration == []  # a failed run records nothing


def test_a_successful_rerun_replaces_the_folder(tmp_path, live):
    prof = load(live)
    out = tmp_path / "builds"
    (out / "B05-roofline").mkdir(parents=True)
    (out / "B05-roofline" / "stale.txt").write_text("old")
    runner.run(b5_plan(prof), prof, out)
    assert not (out / "B05-roofline" / "stale.txt").exists()
    assert (out / "B05-roofline" / "README.md").exists()
    assert sorted(p.name for p in out.iterdir()) == ["B05-roofline"]


def test_reference_profile_is_not_modified(tmp_path):
    kit = REPO / "profiles" / "laptop-8gb-cpu.yaml"
    before = kit.read_bytes()
    prof = load(kit)
    result = runner.run(b5_plan(prof), prof, tmp_path / "builds", profile_path=None)
    assert kit.read_bytes() == before
    assert "not modified" in (result.out_dir / "README.md").read_text()


# ---------------------------------------------------------------- the CLI, as a user runs it

def calibration_records(path: Path) -> list:
    return load(path).calibration


def test_a_killed_runs_leftovers_are_swept_by_the_next_run(home, live):
    """SIGKILL (an OOM kill) leaves the run's private .tmp folder behind; the next run of that milestone
    removes it, and leaves alone the folder of a run that is still going."""
    builds = home / "builds"
    dead = subprocess.Popen(["sleep", "0"])
    dead.wait()
    stale = builds / f".B05-roofline.tmp-{dead.pid}-x1y2z3"
    live_one = builds / f".B05-roofline.tmp-{os.getpid()}-a1b2c3"
    for d in (stale, live_one):
        d.mkdir(parents=True)
        (d / "metrics.json").write_text("{")
    proc = run_cli("run", "B5", "--size", "n256", home=home)
    assert proc.returncode == 0, proc.stderr
    assert not stale.exists() and live_one.exists()
    assert sorted(p.name for p in builds.iterdir()) == sorted(["B05-roofline", live_one.name])


def test_cli_run_b5_end_to_end_and_a_second_run_calibrates(home, live):
    proc = run_cli("run", "B5", "--size", "n256", home=home)
    assert proc.returncode == 0, proc.stderr
    folder = home / "builds" / "B05-roofline"
    assert "B05-roofline/README.md" in proc.stdout and "calibration recorded" in proc.stdout
    for png in ("roofline.png", "gflops_vs_n.png"):
        assert_png(folder / png)
    readme = (folder / "README.md").read_text()
    prof = load(live)
    for needle in ("# B5: Roofline", "## Predicted vs actual", "| peak memory |", "| wall time |",
                   "actual / predicted", "size `n256`", prof.cpu.model, "![", "(roofline.png)", "(gflops_vs_n.png)",
                   "whole process", "## Matmul sweep", "ridge point"):
        assert needle in readme, needle
    m = json.loads((folder / "metrics.json").read_text())
    assert m["plan"]["size"] == "n256" and m["plan"]["config"]["n_max"] == 256
    assert [r["n"] for r in m["metrics"]["per_size"]] == [64, 128, 256]
    assert m["prediction"]["peak_bytes"] > 0 and m["prediction"]["basis"]
    assert m["actual"]["peak_bytes"] > 0 and m["actual"]["seconds"] > 0
    assert m["ratios"]["memory"] > 0 and m["ratios"]["time"] > 0
    recs = calibration_records(live)
    assert len(recs) == 1 and recs[0].workload == "matmul" and recs[0].size == "n256"
    assert recs[0].predicted_peak_bytes == m["prediction"]["peak_bytes"]

    proc = run_cli("run", "b5", "--size", "n256", home=home)
    assert proc.returncode == 0, proc.stderr
    recs = calibration_records(live)
    assert len(recs) == 2 and recs[1].when > recs[0].when
    assert not leftovers(home / "builds")


def test_cli_run_b0_from_nothing_then_again(home):
    """B0 works before any profile exists; it writes the inventory and the live profile, then calibrates."""
    proc = run_cli("run", "B0", home=home)
    assert proc.returncode == 0, proc.stderr
    folder = home / "builds" / "B00-inventory"
    assert {"README.md", "metrics.json", "profile.yaml", "inventory.png"} <= {p.name for p in folder.iterdir()}
    assert_png(folder / "inventory.png")
    readme = (folder / "README.md").read_text()
    for needle in ("# B0: Inventory your kit", "## Predicted vs actual", "## What each tier can use",
                   "## How this was measured", "![", "(inventory.png)"):
        assert needle in readme, needle
    live = home / "profile.yaml"
    prof = load(live)
    assert prof.cpu and prof.cpu.matmul_gflops.get("fp32"), "B0 measures, and its profile becomes the live one"
    assert load(folder / "profile.yaml").cpu.model == prof.cpu.model
    assert len(prof.calibration) == 1 and prof.calibration[0].workload == "probe"

    proc = run_cli("run", "B0", home=home)
    assert proc.returncode == 0, proc.stderr
    assert len(calibration_records(live)) == 2  # the fresh probe keeps the earlier record


def test_cli_verdict_no_is_one_line_and_writes_nothing(home, live, tmp_path):
    small = tmp_path / "small.yaml"
    prof = load(live)
    prof.memory.available_bytes = 50 << 20  # less than Python and numpy alone
    save(prof, small)
    before = small.read_bytes()
    proc = run_cli("run", "B5", "--profile", str(small), home=home)
    assert_one_line_error(proc, "B5 does not fit", "memory")
    assert not (home / "builds").exists()
    assert small.read_bytes() == before


def test_cli_bad_input_is_one_line(home, live):
    assert_one_line_error(run_cli("run", "B5", "--size", "huge", home=home), "B5 has no size 'huge'", "n256")
    assert_one_line_error(run_cli("run", "X9", home=home), "not a milestone")
    assert_one_line_error(run_cli("run", "B5", "--profile", "no-such-kit", home=home), "no-such-kit")
    assert not (home / "builds").exists()


def test_cli_bad_settings_stop_before_anything_runs(home, live):
    """--set is checked against the milestone's Config: an unknown key, a wrong type or a value out of range
    is one line naming the key, and nothing runs (no build folder, no calibration)."""
    before = live.read_bytes()
    cases = [(("--set", "nonsense=1"), ("--set nonsense", "no such setting", "n_max")),
             (("--set", "n_mx=512"), ("--set n_mx", "did you mean 'n_max'")),
             (("--set", "n_max=abc"), ("--set n_max='abc'", "valid integer")),
             (("--set", "n_max=0"), ("--set n_max=0", "greater than 0")),
             (("--set", "dtype=float8"), ("--set dtype='float8'", "float32"))]
    for args, needles in cases:
        assert_one_line_error(run_cli("run", "B5", "--size", "n256", *args, home=home), *needles)
    assert not (home / "builds").exists()
    assert live.read_bytes() == before


def test_cli_cuda_plan_on_a_machine_without_cuda(home, live):
    pytest.importorskip("torch")
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the refusal under test cannot happen here")
    proc = run_cli("run", "B5", "--size", "n256", "--profile", "rtx4090-laptop-16gb", home=home)
    assert_one_line_error(proc, "planned on cuda:0", "--tier 1")
    assert not (home / "builds").exists()


def test_cli_reference_kit_runs_here_and_is_not_modified(home):
    kit = REPO / "profiles" / "laptop-8gb-cpu.yaml"
    before = kit.read_bytes()
    proc = run_cli("run", "B5", "--size", "n256", "--tier", "1", "--profile", "laptop-8gb-cpu", home=home)
    assert proc.returncode == 0, proc.stderr
    assert kit.read_bytes() == before
    assert "reference kit" in proc.stdout
    assert "not modified" in (home / "builds" / "B05-roofline" / "README.md").read_text()
    assert not (home / "profile.yaml").exists()


def _standin(ctx: runner.Context) -> runner.Output:
    (ctx.out_dir / "x.txt").write_text("ran something other than the plan\n")
    return runner.Output(metrics={"ok": True}, calibrate=False)


def test_a_changed_workload_records_no_calibration(tmp_path, live, monkeypatch):
    """--set overrides (calibrate=False) and a milestone that ran a stand-in (Output.calibrate False) leave the
    profile's calibration alone; a plain run records one."""
    prof = load(live)
    before = len(prof.calibration)
    runner.run(b5_plan(prof), prof, tmp_path / "a", profile_path=live, calibrate=False)
    assert len(load(live).calibration) == before
    monkeypatch.setitem(runner.REGISTRY, "B5", "tests.test_runner:_standin")
    runner.run(b5_plan(prof), prof, tmp_path / "b", profile_path=live)
    assert len(load(live).calibration) == before
    monkeypatch.undo()
    runner.run(b5_plan(prof), prof, tmp_path / "c", profile_path=live)
    assert len(load(live).calibration) == before + 1

"""Calibration that lasts and is never poisoned.

    re-probe (probe, probe --no-bench, probe --json)  -> the calibration history stays;
                                                         --no-bench keeps the measured figures, dated
    a run whose workload is not the plan's            -> nothing recorded; the result, the CLI line
                                                         and the build README say why
    the planned workload, exactly                     -> one record

The runs go through the real runner and a real profile file. The milestones
under test are small stand-ins registered for the test that report what the
real ones report when they ran something else than planned: B9's `dataset` and
`n_train` (the 8,000 test-split images for a 60,000-image plan), B16's GGUF
`params` (stories260K for a TinyLlama plan), B7's `model` and `params` (a 3.4M
checkpoint for a 0.1M plan).
"""
from __future__ import annotations

import datetime as dt
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

from inventory.probe import probe
from inventory.profile import Calibration, Figure, load, save
from tests.conftest import run_cli
from tiers import runner
from tiers.fit import fit
from tiers.fit.calibration import mismatch

EARLY = dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.UTC)


@pytest.fixture(scope="module")
def probed(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("probed") / "profile.yaml"
    prof = probe(bench=False, discover=False)
    assert prof.cpu is not None
    prof.cpu.matmul_gflops["fp32"] = Figure(value=123.0, unit="GFLOP/s", source="measured", method="numpy")
    prof.cpu.memory_bandwidth_gbs = Figure(value=9.5, unit="GB/s", source="measured", method="copy")
    prof.calibration = [Calibration(workload="roofline", milestone="B5", size="n256", device="cpu",
                                    predicted_seconds=2.0, actual_seconds=3.0, when=EARLY)]
    assert prof.probe is not None
    prof.probe.when = EARLY
    save(prof, path)
    return path


@pytest.fixture
def live(home: Path, probed: Path) -> Path:
    """The dated profile above as the test's live one: two earlier figures and one calibration record."""
    return Path(shutil.copy(probed, home / "profile.yaml"))


# ---------------------------------------------------------------- re-probing keeps what runs taught

@pytest.mark.parametrize("args", [("--no-bench",), ("--no-bench", "--json")])
def test_reprobe_without_bench_keeps_calibration_and_dated_figures(home, live, args):
    proc = run_cli("probe", *args, "--no-discover", "--no-report", home=home)
    assert proc.returncode == 0, proc.stderr
    prof = load(live)
    assert [c.workload for c in prof.calibration] == ["roofline"]
    fig = prof.cpu.matmul_gflops["fp32"]
    assert fig.value == 123.0 and fig.when == EARLY
    assert prof.cpu.memory_bandwidth_gbs.value == 9.5 and prof.cpu.memory_bandwidth_gbs.when == EARLY
    assert prof.probe.when > EARLY  # the rest is this probe's
    if "--json" in args:
        doc = json.loads(proc.stdout)
        assert doc["calibration"][0]["workload"] == "roofline"
        assert doc["cpu"]["matmul_gflops"]["fp32"]["value"] == 123.0


def test_reprobe_with_bench_keeps_calibration_and_measures_afresh(home, live):
    proc = run_cli("probe", "--no-discover", "--no-report", home=home)
    assert proc.returncode == 0, proc.stderr
    prof = load(live)
    assert [c.workload for c in prof.calibration] == ["roofline"]
    fig = prof.cpu.matmul_gflops["fp32"]
    assert fig.value != 123.0 and fig.when is None  # measured now, not carried over


# ---------------------------------------------------------------- only the planned workload records

@dataclass
class Config:
    """The stand-in's one setting, for `--set seed=3`."""

    seed: int = 0


def _reports(ctx: runner.Context) -> runner.Output:
    """Reports what $TIERKIT_TEST_RAN says ran (the runner imports this module afresh, so not a global)."""
    ran = json.loads(os.environ["TIERKIT_TEST_RAN"])
    (ctx.out_dir / "ran.txt").write_text(json.dumps(ran))
    return runner.Output(metrics=ran)


def _plan(live: Path, milestone: str, size: str):
    plan = fit(load(live), milestone, size=size, check_packages=False)
    plan.verdict = "fits"   # the stand-in runs whatever the planner thought of this machine
    plan.artifacts = []
    return plan


def _run(monkeypatch, tmp_path, live, milestone, size, ran, overrides=None):
    monkeypatch.setenv("TIERKIT_TEST_RAN", json.dumps(ran))
    monkeypatch.setitem(runner.REGISTRY, milestone, "tests.test_calibration:_reports")
    monkeypatch.setattr(runner, "check_artifacts", lambda *a, **k: None)  # the stand-in reads no data
    before = len(load(live).calibration)
    result = runner.run(_plan(live, milestone, size), load(live), tmp_path / "builds", profile_path=live,
                        overrides=overrides)
    recorded = len(load(live).calibration) - before
    return result, recorded, (result.out_dir / "README.md").read_text()


def test_b9_on_the_test_split_records_nothing(monkeypatch, tmp_path, live):
    plan = _plan(live, "B9", "mnist-m")
    assert plan.config["samples"] == 60000
    result, recorded, readme = _run(monkeypatch, tmp_path, live, "B9", "mnist-m",
                                    {"dataset": "mnist", "n_train": 8000, "params": plan.config["params"]})
    assert recorded == 0 and result.calibrated_in is None
    assert "8,000 examples" in result.not_calibrated and "60,000" in result.not_calibrated
    assert "not recorded in any calibration: it trained on 8,000 examples" in readme


def test_b9_on_another_dataset_records_nothing(monkeypatch, tmp_path, live):
    plan = _plan(live, "B9", "mnist-m")
    result, recorded, _ = _run(monkeypatch, tmp_path, live, "B9", "mnist-m",
                               {"dataset": "cifar-10", "n_train": 60000, "params": plan.config["params"]})
    assert recorded == 0 and "cifar-10" in result.not_calibrated


def test_b16_with_another_gguf_records_nothing(monkeypatch, tmp_path, live):
    plan = _plan(live, "B16", "tinyllama-1.1b-Q4_K_M")
    assert plan.config["params"] > 1e9
    result, recorded, readme = _run(monkeypatch, tmp_path, live, "B16", "tinyllama-1.1b-Q4_K_M",
                                    {"model": "your GGUF", "gguf": {"params": 292_000, "path": "stories260K.gguf"}})
    assert recorded == 0
    assert "292K parameters" in result.not_calibrated and "1.1B" in result.not_calibrated
    assert "292K parameters" in readme


def test_b7_on_another_model_records_nothing(monkeypatch, tmp_path, live):
    result, recorded, _ = _run(monkeypatch, tmp_path, live, "B7", "char-0.1M",
                               {"model": "b12 checkpoint", "params": 3_400_000})
    assert recorded == 0 and "3.4M parameters" in result.not_calibrated


def test_a_set_run_records_nothing_and_says_so(monkeypatch, tmp_path, live):
    plan = _plan(live, "B9", "mnist-m")
    result, recorded, readme = _run(monkeypatch, tmp_path, live, "B9", "mnist-m",
                                    {"dataset": "mnist", "n_train": 60000, "params": plan.config["params"]},
                                    overrides={"seed": 3})
    assert recorded == 0 and "--set changed the workload (seed=3)" in result.not_calibrated
    assert "This run was appended" not in readme and "--set changed the workload" in readme


def test_the_planned_workload_records_one(monkeypatch, tmp_path, live):
    plan = _plan(live, "B9", "mnist-m")
    result, recorded, readme = _run(monkeypatch, tmp_path, live, "B9", "mnist-m",
                                    {"dataset": "mnist", "n_train": 60000, "params": plan.config["params"]})
    assert recorded == 1 and result.calibrated_in == live and result.not_calibrated is None
    assert "This run was appended to the profile's calibration" in readme
    assert load(live).calibration[-1].workload == "cnn-train"


def test_mismatch_compares_only_what_both_sides_state():
    assert mismatch({"samples": 100}, {}) is None
    assert mismatch({"params": 1e6}, {"params": 1.2e6}) is None   # a formula's slack
    assert mismatch({"samples": 1000}, {"n_train": 950}) is None  # a ragged last batch
    assert mismatch({"samples": 1000}, {"n_train": 500}) is not None


def test_cli_says_why_nothing_was_recorded(home, live):
    proc = run_cli("run", "B5", "--size", "n256", "--set", "min_seconds=0.02", home=home)
    assert proc.returncode == 0, proc.stderr
    assert "no calibration recorded: --set changed the workload (min_seconds=0.02)" in proc.stdout
    assert [c.workload for c in load(live).calibration] == ["roofline"]

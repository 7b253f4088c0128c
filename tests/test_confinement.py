"""The probe sees what the process may use, not only what the host has.

    taskset -c 0 tierkit probe             -> cpu.usable_cpus == 1 (the affinity mask)
    (in a cgroup v1, 1 GiB) tierkit probe  -> memory.total_bytes == 1 GiB, host_total_bytes == the RAM,
                                              the B0 report says "limited by cgroup to 1 GiB",
                                              and the planner refuses on that figure
    (in a cgroup v1, 2 GiB) tierkit run    -> a milestone the planner approved there completes

Real processes in real cgroups (as root; skipped with the reason otherwise).
The v2 files are read from a folder laid out like /proc and /sys/fs/cgroup,
since a host with a v1 memory hierarchy cannot also create v2 limits.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from inventory.detect import confine
from inventory.profile import load
from tests.conftest import REPO

V1 = Path("/sys/fs/cgroup/memory")


def _env(home: Path) -> dict[str, str]:
    return {**os.environ, "TIERKIT_HOME": str(home), "PYTHONPATH": str(REPO), "COLUMNS": "200"}


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "tiers.cli", *args]


def _need_v1() -> None:
    if os.geteuid() != 0:
        pytest.skip("creating a cgroup memory limit needs root")
    if not (V1 / "memory.limit_in_bytes").exists():
        pytest.skip(f"no cgroup v1 memory hierarchy at {V1} (a cgroup v2-only host)")


@pytest.fixture
def cgroup(request):
    """A fresh cgroup v1 memory group; yields (folder, a preexec_fn that moves the child into it)."""
    _need_v1()
    g = V1 / f"tierkit-test-{os.getpid()}-{request.node.name[:40]}"
    g.mkdir()
    yield g, lambda: (g / "cgroup.procs").write_text(str(os.getpid()))
    for _ in range(50):
        try:
            g.rmdir()
            break
        except OSError:
            time.sleep(0.1)


def test_probe_under_taskset_reports_one_usable_cpu(tmp_path):
    if not shutil.which("taskset"):
        pytest.skip("no taskset on this host (util-linux)")
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("this process already runs on one CPU: the mask could not be told from the host")
    proc = subprocess.run(["taskset", "-c", "0", *_cli("probe", "--no-bench", "--no-discover", "--no-report",
                                                       "--json")],
                          capture_output=True, text=True, env=_env(tmp_path), check=False, timeout=120)
    assert proc.returncode == 0, proc.stderr
    cpu = json.loads(proc.stdout)["cpu"]
    assert cpu["usable_cpus"] == 1 and "affinity" in cpu["usable_source"]
    assert cpu["threads"] >= 2  # the host's figure is kept beside it


def test_probe_in_a_cgroup_reports_the_limit_and_the_planner_uses_it(tmp_path, cgroup):
    g, enter = cgroup
    (g / "memory.limit_in_bytes").write_text(str(1 << 30))
    builds = tmp_path / "builds"
    proc = subprocess.run(_cli("probe", "--no-bench", "--no-discover", "--builds", str(builds)),
                          capture_output=True, text=True, env=_env(tmp_path), check=False, timeout=120,
                          preexec_fn=enter)
    assert proc.returncode == 0, proc.stderr
    prof = load(tmp_path / "profile.yaml")
    assert prof.memory.total_bytes == 1 << 30
    assert prof.memory.available_bytes <= 1 << 30
    assert prof.memory.host_total_bytes == psutil.virtual_memory().total
    assert str(g) in prof.memory.limit_source
    assert "limited by cgroup to 1 GiB" in (builds / "B00-inventory" / "README.md").read_text()

    from tiers.fit import fit

    plan = fit(prof, "B15", size="1M", check_packages=False, suggest=False)
    assert plan.verdict == "no" and any("memory" in r for r in plan.reasons), plan.reasons


def test_a_milestone_approved_under_2g_completes_under_that_limit(tmp_path, cgroup):
    g, enter = cgroup
    (g / "memory.limit_in_bytes").write_text(str(2 << 30))
    env = _env(tmp_path)
    probe = subprocess.run(_cli("probe", "--no-bench", "--no-discover", "--no-report"), capture_output=True,
                           text=True, env=env, check=False, timeout=120, preexec_fn=enter)
    assert probe.returncode == 0, probe.stderr
    from tiers.fit import fit

    plan = fit(load(tmp_path / "profile.yaml"), "B4", size="linreg-10K")
    assert plan.verdict in ("fits", "tight"), plan.reasons
    run = subprocess.run(_cli("run", "B4", "--size", "linreg-10K", "--out", str(tmp_path / "builds")),
                         capture_output=True, text=True, env=env, check=False, timeout=300, preexec_fn=enter)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "calibration recorded" in run.stdout
    oom = (g / "memory.oom_control").read_text()
    assert "oom_kill 0" in oom or "oom_kill" not in oom


def test_cgroup_v2_limits_are_read(tmp_path):
    """A v2 host: memory.max and cpu.max on the way from the process's group to the root; the tightest counts."""
    proc, root = tmp_path / "proc", tmp_path / "cg"
    proc.mkdir()
    (proc / "cgroup").write_text("0::/box/inner\n")
    (proc / "mountinfo").write_text(f"30 23 0:26 / {root} rw,nosuid - cgroup2 cgroup2 rw\n")
    inner = root / "box" / "inner"
    inner.mkdir(parents=True)
    (root / "box" / "memory.max").write_text(f"{3 << 30}\n")
    (inner / "memory.max").write_text("max\n")
    (inner / "cpu.max").write_text("150000 100000\n")
    (root / "box" / "cpu.max").write_text("max 100000\n")
    groups = confine.cgroups(proc)
    assert [(g.version, g.path) for g in groups] == [(2, "/box/inner")]
    assert confine.memory_limit(groups) == (3 << 30, f"cgroup v2 {root / 'box' / 'memory.max'}")
    assert confine.cpu_quota(groups) == (1.5, f"cgroup v2 {inner / 'cpu.max'}")

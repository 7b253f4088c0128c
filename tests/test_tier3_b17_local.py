"""B17 on one machine: `--set peers=local` plans and runs from the user's own one-node profile."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from inventory.profile import load
from tests.conftest import REPO, run_cli
from tiers.fit import fit
from tiers.fit.targets import cluster_nodes, with_loopback_node

MODEL = Path(os.environ.get("TIERKIT_DATA", "/work/shared/data")) / "stories260K.gguf"
SMALL = ["--set", f"gguf={MODEL}", "--set", "new_tokens=8", "--set", "requests=2", "--set", "prompt_tokens=8",
         "--set", "ctx=256", "--set", "concurrent=1"]


def test_loopback_node_makes_a_one_node_profile_a_two_node_cluster():
    one = load(REPO / "profiles" / "laptop-8gb-cpu.yaml")
    assert fit(one, "B17", check_packages=False, suggest=False).verdict == "no"
    two = with_loopback_node(one)
    plan = fit(two, "B17", check_packages=False, suggest=False)
    assert plan.device.startswith("cluster") and plan.verdict in ("fits", "tight"), plan
    # both nodes live on this machine: together they hold what it has free, not twice that
    assert sum(n.memory_free for n in cluster_nodes(two)) <= one.memory.available_bytes


@pytest.mark.skipif(not MODEL.exists(), reason=f"{MODEL} is missing (the shared data folder)")
def test_run_b17_peers_local_from_the_users_own_profile(home, tmp_path):
    mine = home / "profile.yaml"          # the user's own file (one node, no peers), not a reference kit
    shutil.copy(REPO / "profiles" / "laptop-8gb-cpu.yaml", mine)
    proc = run_cli("run", "B17", "--profile", str(mine), "--set", "peers=local", *SMALL, "--out", str(tmp_path),
                   home=home, timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "needs 2 nodes" not in proc.stderr
    assert "local agent on loopback" in (tmp_path / "B17-two-machines" / "README.md").read_text()
    # The terminal is tierkit's: no llama.cpp log, no agent lines; the agent's lines are in the run's log.
    assert proc.stderr.strip() == "", proc.stderr
    log = json.loads((tmp_path / "B17-two-machines" / "metrics.json").read_text())["log"]
    assert any(line.startswith("local agent: launched worker") for line in log), log


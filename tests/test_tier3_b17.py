"""B17 through the runner: `tierkit run B17` with a real agent as the profile's peer (loopback)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, assert_one_line_error, run_cli
from tests.hf_fixtures import hub_env
from tiers.tier3.net import free_port

MODEL = Path(os.environ.get("TIERKIT_DATA", "/work/shared/data")) / "stories260K.gguf"
pytestmark = pytest.mark.skipif(not MODEL.exists(), reason=f"{MODEL} is missing (the shared data folder)")
REGISTRY_NAME = "llama-3.2-1b-instruct-q8_0"
SMALL = ["--set", f"gguf={MODEL}", "--set", "new_tokens=24", "--set", "requests=3", "--set", "prompt_tokens=24",
         "--set", "ctx=512", "--set", "concurrent=2"]


@pytest.fixture
def peer_profile(home):
    """An agent on loopback, found by `tierkit probe --peer`: the profile now has two nodes."""
    port = free_port()
    env = {**os.environ, "TIERKIT_HOME": str(home), "PYTHONPATH": str(REPO)}
    env.pop("TIERKIT_AGENT_TOKEN", None)
    log = home / "agent.log"
    agent = subprocess.Popen([sys.executable, "-m", "tiers.cli", "agent", "--host", "127.0.0.1", "--port", str(port),
                              "--no-mdns", "--name", "peer17"], stdout=log.open("w"), stderr=subprocess.STDOUT,
                             cwd=REPO, env=env)
    try:
        deadline = time.monotonic() + 60
        while "listening on" not in log.read_text():
            assert agent.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        probe = run_cli("probe", "--no-bench", "--peer", f"127.0.0.1:{port}", "--mdns-wait", "0", home=home)
        assert probe.returncode == 0, probe.stderr
        yield port
    finally:
        agent.terminate()
        agent.wait(timeout=20)


def test_b17_two_node_session_through_the_runner(home, peer_profile):
    proc = run_cli("run", "B17", "--out", str(home / "builds"), *SMALL, home=home, timeout=300)
    assert proc.returncode == 0, proc.stderr
    build = home / "builds" / "B17-two-machines"
    m = json.loads((build / "metrics.json").read_text())["metrics"]
    assert m["greedy_tokens_identical"] is True
    assert m["second_node"].startswith("the profile's peer peer17")
    assert [s["layers"] for s in m["plan"]] == [[0, 2], [2, 5]]
    for side in ("one_node", "two_nodes"):
        assert m[side]["ms_per_token"] > 0 and m[side]["tokens_per_s_concurrent"] > 0
    assert m["bytes_per_token"] > 64 * 4 and m["agent_rtt_ms"] > 0
    t = m["time_per_token_ms"]
    assert len(t["compute_per_stage"]) == 2 and t["network_and_rpc"] >= 0
    assert (build / "time_per_token.png").stat().st_size > 5000
    readme = (build / "README.md").read_text()
    assert "Where the time goes" in readme and "placement of stories260K.gguf" in readme
    # The worker was stopped through the agent when the session ended.
    assert "stopped worker" in (home / "agent.log").read_text()


def test_b17_without_a_model_is_one_line(home, peer_profile, tmp_path, monkeypatch):
    hub_env(monkeypatch, tmp_path / "empty-hf")
    proc = run_cli("run", "B17", "--out", str(home / "builds"), home=home)
    assert_one_line_error(proc, "not here: run tierkit data fetch llama-", "--fetch")   # the rung's model
    proc = run_cli("run", "B17", "--out", str(home / "builds"), "--set", f"gguf={REGISTRY_NAME}", home=home)
    assert_one_line_error(proc, "B17 needs a GGUF model file", "--set gguf=PATH", f"tierkit data fetch {REGISTRY_NAME}")
    proc = run_cli("run", "B17", "--out", str(home / "builds"), "--set", "gguf=no-such-model", home=home)
    assert_one_line_error(proc, "B17 needs a GGUF model file", "--set gguf=PATH", "no-such-model is neither a file nor a registry name")
    assert not (home / "builds" / "B17-two-machines").exists()


def test_b17_serves_a_registry_name(home, peer_profile, tmp_path, monkeypatch):
    """The rung's model by registry name, resolved from the Hugging Face cache (stories260K as its file)."""
    from tests.gguf_fixtures import registry_gguf

    [placed] = registry_gguf(tmp_path / "hf", {REGISTRY_NAME: MODEL}).values()
    hub_env(monkeypatch, tmp_path / "hf")
    proc = run_cli("run", "B17", "--out", str(home / "builds"), *SMALL[2:], "--set", f"gguf={REGISTRY_NAME}",
                   home=home, timeout=300)
    assert proc.returncode == 0, proc.stderr
    m = json.loads((home / "builds" / "B17-two-machines" / "metrics.json").read_text())["metrics"]
    assert m["registry_model"] == REGISTRY_NAME and m["model_path"] == str(placed)
    assert m["model"] == placed.name and m["greedy_tokens_identical"] is True


def test_b17_needs_two_nodes(home):
    proc = run_cli("run", "B17", "--profile", "laptop-8gb-cpu", *SMALL, home=home)
    assert proc.returncode != 0 and "2 nodes" in proc.stderr and "Traceback" not in proc.stderr

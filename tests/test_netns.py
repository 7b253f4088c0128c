"""Two real hosts on one machine: an agent in namespace A, discovery over mDNS from namespace B.

The namespaces are joined by a veth pair capped with `tc qdisc tbf` at
100 Mbit/s (a home LAN); each side runs as its own process pinned to its own
core. Needs root and iproute2; the skip reason says which step failed.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from inventory.profile import load
from tests.conftest import REPO

PY = sys.executable
TIERKIT = Path(PY).parent / "tierkit"
RATE_MBIT = 100
PORT = 8477


def _run(*cmd: str, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=timeout)


def _must(step: str, *cmd: str) -> None:
    """Run a set-up step; skip the test with the exact command and error when it fails."""
    proc = _run(*cmd)
    if proc.returncode != 0:
        pytest.skip(f"{step} failed: `{' '.join(cmd)}` -> {proc.stderr.strip() or proc.returncode}")


def _cores() -> tuple[int, int]:
    """Two distinct cores when we have them (one per host), else the same one twice."""
    cores = sorted(os.sched_getaffinity(0))
    return cores[0], cores[1] if len(cores) > 1 else cores[0]


class Pair:
    """Two namespaces joined by a rate-capped veth pair, torn down on close() whatever happened."""

    def __init__(self) -> None:
        pid = os.getpid()
        self.x = pid % 250 + 1  # 10.77.X.0/24: per-run, so parallel runs are easy to tell apart
        self.a, self.b = f"tkA{pid}", f"tkB{pid}"
        self.va, self.vb = f"tka{pid}", f"tkb{pid}"  # interface names: at most 15 characters
        self.addr_a, self.addr_b = f"10.77.{self.x}.1", f"10.77.{self.x}.2"
        self.made: list[str] = []
        self.veth = False

    def up(self) -> None:
        for ns in (self.a, self.b):
            _must("creating a network namespace", "ip", "netns", "add", ns)
            self.made.append(ns)
        _must("creating a veth pair", "ip", "link", "add", self.va, "type", "veth", "peer", "name", self.vb)
        self.veth = True
        _must("moving the veth into namespace A", "ip", "link", "set", self.va, "netns", self.a)
        _must("moving the veth into namespace B", "ip", "link", "set", self.vb, "netns", self.b)
        self.veth = False  # deleting the namespaces now deletes the pair
        for ns, dev, addr in ((self.a, self.va, self.addr_a), (self.b, self.vb, self.addr_b)):
            _must("adding an address", "ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
            _must("bringing the link up", "ip", "-n", ns, "link", "set", dev, "up")
            _must("bringing lo up", "ip", "-n", ns, "link", "set", "lo", "up")
            _must("capping the link with tc tbf", "ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", dev,
                  "root", "tbf", "rate", f"{RATE_MBIT}mbit", "burst", "32kbit", "latency", "50ms")

    def close(self) -> None:
        if self.veth:
            _run("ip", "link", "del", self.va)
        for ns in self.made:
            _run("ip", "netns", "del", ns)


@pytest.fixture
def pair():
    if os.geteuid() != 0:
        pytest.skip("needs root to create network namespaces (run the tests as root, as CI does)")
    if shutil.which("ip") is None:
        pytest.skip("`ip` (iproute2) is not installed: apt-get install iproute2")
    if shutil.which("taskset") is None:
        pytest.skip("`taskset` (util-linux) is not installed")
    p = Pair()
    try:
        p.up()
        yield p
    finally:
        p.close()


@pytest.fixture
def agent_a(pair, tmp_path):
    """`tierkit agent` in namespace A, pinned to one core; waits until it is advertised."""
    core_a, _ = _cores()
    log = (tmp_path / "agent.log").open("w+")
    env = {**os.environ, "TIERKIT_HOME": str(tmp_path / "home-a"), "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(["ip", "netns", "exec", pair.a, "taskset", "-c", str(core_a), PY, "-m",
                             "tiers.cli", "agent", "--host", pair.addr_a, "--port", str(PORT), "--name", "nodeA"],
                            stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=env)
    try:
        deadline = time.monotonic() + 60
        while "advertised nodeA" not in (text := log_text(log)):
            assert proc.poll() is None, f"agent exited {proc.returncode}: {text}"
            assert time.monotonic() < deadline, f"agent not advertised within 60 s: {text}"
            time.sleep(0.05)
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def log_text(log) -> str:
    log.flush()
    log.seek(0)
    return log.read()


DISCOVER = """
import json, time
from inventory.detect import peers
t = time.perf_counter()
found = peers.detect(mdns_wait=2.0)
print(json.dumps({"seconds": time.perf_counter() - t, "note": found.note,
                  "peers": [p.model_dump(mode="json") for p in found.value]}))
"""


def test_agent_found_over_mdns_across_namespaces(pair, agent_a, tmp_path):
    _, core_b = _cores()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(["ip", "netns", "exec", pair.b, "taskset", "-c", str(core_b), PY, "-c", DISCOVER],
                          check=False, capture_output=True, text=True, timeout=60, cwd=REPO, env=env)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    peers = [p for p in out["peers"] if p["name"] == "nodeA"]
    assert len(peers) == 1, out
    p = peers[0]
    assert (p["found_by"], p["address"], p["port"]) == ("mdns", pair.addr_a, PORT), p
    assert p["problem"] is None, p
    assert p["summary"]["threads"] >= 1 and p["summary"]["memory_total_bytes"] > 0
    rtt, bw = p["rtt_ms"], p["bandwidth_mbps"]
    assert rtt["source"] == "measured" and rtt["value"] > 0
    # tbf lets a burst through above the rate; 8 MiB is long enough that it barely shows.
    assert bw["source"] == "measured" and 20 < bw["value"] < RATE_MBIT * 1.05, bw
    print(f"\nnetns: nodeA found by mDNS in a {out['seconds']:.2f} s window; "
          f"RTT {rtt['value']:.3f} ms, bandwidth {bw['value']:.1f} Mbit/s (cap {RATE_MBIT})")

    if not TIERKIT.exists():
        pytest.skip(f"{TIERKIT} is not installed (pip install -e .), so `tierkit probe` was not run")
    out_file = tmp_path / "p.yaml"
    cli = subprocess.run(["ip", "netns", "exec", pair.b, "taskset", "-c", str(core_b), str(TIERKIT), "probe",
                          "--no-bench", "--json", "--out", str(out_file), "--mdns-wait", "2"],
                         check=False, capture_output=True, text=True, timeout=120, cwd=tmp_path,
                         env={**env, "TIERKIT_HOME": str(tmp_path / "home-b")})
    assert cli.returncode == 0, cli.stderr
    written = [q for q in load(out_file).peers if q.name == "nodeA"]
    assert len(written) == 1 and written[0].found_by == "mdns" and written[0].address == pair.addr_a
    assert written[0].bandwidth_mbps is not None and written[0].bandwidth_mbps.value < RATE_MBIT * 1.05

"""The agent's launching side, over real sockets on loopback: the token, 401s, validation, supervision.

Workers are real processes (the llama.cpp RPC server from llama-cpp-python's
libggml-rpc); the vLLM worker is checked as a command line only (no Ray, no GPU here).
"""
from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import stat
import time

import pytest

from inventory.profile import Profile
from tiers.tier3 import agent as agent_mod
from tiers.tier3 import vllm
from tiers.tier3.agent import AgentError, load_or_create_token, read_token_file, start_in_thread, txt_properties
from tiers.tier3.engine import EngineError
from tiers.tier3.net import free_port

TOKEN = "t0k3n-for-tests-0123456789abcdef"


@pytest.fixture
def agent():
    a = start_in_thread("127.0.0.1", 0, Profile(name="w"), "w", advertise=False, token=TOKEN,
                        memory_budget=3 << 20)
    try:
        yield a
    finally:
        a.stop()


def call(agent, method: str, path: str, body=None, token: str | None = TOKEN, raw: bytes | None = None):
    c = http.client.HTTPConnection("127.0.0.1", agent.port, timeout=20)
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    c.request(method, path, body=data, headers=headers)
    r = c.getresponse()
    out = r.status, json.loads(r.read())
    c.close()
    return out


def _wait(pred, timeout=30.0, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(0.1)
    raise AssertionError(f"{what} not reached within {timeout} s")


# ---------------------------------------------------------------- the token

def test_token_created_once_0600_then_reused(tmp_path, monkeypatch):
    monkeypatch.delenv(agent_mod.TOKEN_ENV, raising=False)
    path = tmp_path / "sub" / "agent.token"
    token, created = load_or_create_token(path)
    assert created and len(token) >= 32
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    again, created2 = load_or_create_token(path)
    assert (again, created2) == (token, False)


def test_token_from_env_wins(tmp_path, monkeypatch):
    monkeypatch.setenv(agent_mod.TOKEN_ENV, TOKEN)
    assert load_or_create_token(tmp_path / "x") == (TOKEN, False)
    assert not (tmp_path / "x").exists()
    monkeypatch.setenv(agent_mod.TOKEN_ENV, "short")
    with pytest.raises(AgentError, match="too short"):
        load_or_create_token(tmp_path / "x")


def test_token_file_readable_by_others_is_refused(tmp_path):
    path = tmp_path / "agent.token"
    path.write_text(TOKEN)
    path.chmod(0o644)
    with pytest.raises(AgentError, match="chmod 600"):
        read_token_file(path)
    path.chmod(0o600)
    assert read_token_file(path) == TOKEN


def test_agent_process_prints_new_token_once(tmp_path):
    import subprocess
    import sys

    from tests.conftest import REPO

    env = {"TIERKIT_HOME": str(tmp_path), "PATH": "/usr/bin:/bin"}
    outs = []
    for _ in range(2):
        proc = subprocess.Popen([sys.executable, "-m", "tiers.cli", "agent", "--host", "127.0.0.1", "--port",
                                 str(free_port()), "--no-mdns", "--memory-budget", "64MiB"],
                                stderr=subprocess.PIPE, text=True, cwd=REPO, env=env)
        line = ""
        while "listening on" not in line:  # the new-token line, if any, comes before this one
            nxt = proc.stderr.readline()
            assert nxt, f"agent exited early: {line}"
            line += nxt
        proc.terminate()
        proc.wait(timeout=20)
        outs.append(line)
    token = (tmp_path / "agent.token").read_text().strip()
    assert "new launch token" in outs[0] and token in outs[0]
    assert "token" not in outs[1] and token not in outs[1]


def test_bad_memory_budget_is_one_line(tmp_path):
    from tests.conftest import assert_one_line_error, run_cli

    assert_one_line_error(run_cli("agent", "--memory-budget", "lots", home=tmp_path), "--memory-budget 'lots'")


# ---------------------------------------------------------------- 401

@pytest.mark.parametrize("token", [None, "", "wrong-token-wrong-token", TOKEN + "x", TOKEN[:-1]])
@pytest.mark.parametrize("method, path", [("GET", "/v1/workers"), ("POST", "/v1/workers"),
                                          ("GET", "/v1/workers/0123abcd"), ("DELETE", "/v1/workers/0123abcd")])
def test_unauthenticated_gets_401_and_nothing_runs(agent, token, method, path):
    body = {"engine": "llama-rpc", "args": {"port": 0}} if method == "POST" else None
    c = http.client.HTTPConnection("127.0.0.1", agent.port, timeout=10)
    headers = {} if token is None else {"Authorization": f"Bearer {token}"}
    c.request(method, path, body=json.dumps(body) if body else None, headers=headers)
    r = c.getresponse()
    data = json.loads(r.read())
    assert r.status == 401 and r.getheader("WWW-Authenticate") == "Bearer"
    assert "token" in data["error"] and data["ok"] is False
    assert agent.supervisor.workers == {}


def test_other_schemes_are_401(agent):
    c = http.client.HTTPConnection("127.0.0.1", agent.port, timeout=10)
    c.request("GET", "/v1/workers", headers={"Authorization": f"Basic {TOKEN}"})
    assert c.getresponse().status == 401


def test_profile_stays_open_and_shows_the_budget(agent):
    status, body = call(agent, "GET", "/v1/profile", token=None)
    assert status == 200 and body["summary"]["memory_budget_bytes"] == 3 << 20
    txt = txt_properties(body["summary"])
    assert txt["budget_gb"] == "0.003" and "llama-rpc" in txt["engines"]


# ---------------------------------------------------------------- validation: only known engines, checked args

@pytest.mark.parametrize("body, needle", [
    ({"engine": "bash", "args": {}}, "unknown engine"),
    ({"engine": "llama-rpc", "args": {"port": "8080; rm -rf /"}}, "port must be a whole number"),
    ({"engine": "llama-rpc", "args": {"port": 80}}, "port must be a whole number 1024-65535"),
    ({"engine": "llama-rpc", "args": {"port": 70000}}, "port"),
    ({"engine": "llama-rpc", "args": {"port": True}}, "port"),
    ({"engine": "llama-rpc", "args": {"port": 20000, "host": "$(id)"}}, "IPv4"),
    ({"engine": "llama-rpc", "args": {"port": 20000, "argv": ["sh"]}}, "unknown llama-rpc argument"),
    ({"engine": "llama-rpc", "args": {"port": 20000, "threads": 0}}, "threads"),
    ({"engine": "llama-rpc", "args": []}, "args must be a JSON object"),
    ({"engine": "llama-rpc", "command": "sh"}, "unknown field"),
    ({"engine": "llama-rpc", "restart": "yes"}, "restart must be"),
    ({"engine": "vllm", "args": {"head": "10.0.0.1:6379", "node_ip": "10.0.0.2"}}, "Ray is not installed"),
    ({"engine": "vllm", "args": {"head": "10.0.0.1", "node_ip": "10.0.0.2"}}, "IPv4:PORT"),
    ([1, 2], "JSON object"),
])
def test_bad_launches_are_400(agent, body, needle):
    status, reply = call(agent, "POST", "/v1/workers", body)
    assert status == 400 and needle in reply["error"] and "\n" not in reply["error"], reply
    assert agent.supervisor.workers == {}


def test_pipeline_args_are_validated_by_the_pipeline_engine(agent):
    status, reply = call(agent, "POST", "/v1/workers", {"engine": "pipeline", "args": {"model": "random:nope"}})
    assert status == 400 and reply["error"].startswith("pipeline: ")
    assert agent.supervisor.workers == {}


@pytest.mark.parametrize("raw, code", [(b"{not json", 400), (b"\xff\xfe", 400), (b"x" * (70 << 10), 413)])
def test_malformed_bodies(agent, raw, code):
    status, reply = call(agent, "POST", "/v1/workers", raw=raw)
    assert status == code and reply["ok"] is False


def test_unknown_worker_is_404(agent):
    assert call(agent, "GET", "/v1/workers/deadbeef")[0] == 404
    assert call(agent, "DELETE", "/v1/workers/deadbeef")[0] == 404


# ---------------------------------------------------------------- a real worker: start, watch, restart, stop

def test_llama_rpc_worker_lifecycle(agent):
    status, reply = call(agent, "POST", "/v1/workers", {"engine": "llama-rpc", "args": {"port": 0, "threads": 1}})
    assert status == 201, reply
    w = reply["worker"]
    wid, port = w["id"], w["args"]["port"]
    assert w["args"]["host"] == "127.0.0.1" and 1024 <= port <= 65535
    assert w["argv"][1:4] == ["-m", "tiers.tier3.llama_rpc", "worker"]
    w = _wait(lambda: (x := call(agent, "GET", f"/v1/workers/{wid}")[1]["worker"])["ready"] and x, what="ready")
    assert w["state"] == "running" and w["starts"] == 1
    assert any("llama-rpc worker: serving CPU on 127.0.0.1" in line for line in w["log"]), w["log"]
    socket.create_connection(("127.0.0.1", port), timeout=5).close()
    # The same port twice is refused before anything starts.
    status, reply = call(agent, "POST", "/v1/workers", {"engine": "llama-rpc", "args": {"port": port}})
    assert status == 400 and "already used" in reply["error"]

    # Killed: the agent restarts it on the same port.
    os.kill(w["pid"], signal.SIGKILL)
    w2 = _wait(lambda: (x := call(agent, "GET", f"/v1/workers/{wid}")[1]["worker"])["starts"] == 2
               and x["ready"] and x, what="restart")
    assert w2["pid"] != w["pid"] and w2["restarts"] == 1
    assert any("exited with -9" in line for line in w2["log"])
    listed = call(agent, "GET", "/v1/workers")[1]["workers"]
    assert [x["id"] for x in listed] == [wid] and listed[0]["log"] == []

    status, reply = call(agent, "DELETE", f"/v1/workers/{wid}")
    assert status == 200 and reply["worker"]["state"] == "stopped"
    with pytest.raises(ProcessLookupError):
        _wait(lambda: os.kill(w2["pid"], 0) and False, timeout=5, what="exit")
    time.sleep(2.5)  # longer than the restart back-off: a stopped worker stays stopped
    assert call(agent, "GET", f"/v1/workers/{wid}")[1]["worker"]["starts"] == 2


def test_worker_that_cannot_listen_says_why(agent):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        status, reply = call(agent, "POST", "/v1/workers",
                             {"engine": "llama-rpc", "args": {"port": port}, "restart": False})
        assert status == 201
        wid = reply["worker"]["id"]
        w = _wait(lambda: (x := call(agent, "GET", f"/v1/workers/{wid}")[1]["worker"])["state"] == "exited" and x,
                  what="exit")
    assert w["exit_code"] == 2 and any(f"cannot listen on 127.0.0.1:{port}" in line for line in w["log"]), w


def test_agent_stop_stops_workers():
    a = start_in_thread("127.0.0.1", 0, Profile(name="s"), "s", advertise=False, token=TOKEN)
    status, reply = call(a, "POST", "/v1/workers", {"engine": "llama-rpc", "args": {"port": 0, "threads": 1}})
    pid = reply["worker"]["pid"]
    a.stop()
    with pytest.raises(ProcessLookupError):
        _wait(lambda: os.kill(pid, 0) and False, timeout=10, what="exit")


# ---------------------------------------------------------------- vLLM command lines (not run here: no GPU, no Ray)

def test_vllm_command_lines():
    assert vllm.ray_worker_argv({"head": "10.0.0.1:6379", "node_ip": "10.0.0.2", "num_gpus": 2}) == [
        "ray", "start", "--address", "10.0.0.1:6379", "--node-ip-address", "10.0.0.2", "--block", "--num-gpus", "2"]
    assert vllm.ray_head_argv("10.0.0.1") == ["ray", "start", "--head", "--port", "6379",
                                              "--node-ip-address", "10.0.0.1"]
    assert vllm.serve_argv("/models/llama", 2, 4, port=8001, max_model_len=4096) == [
        "vllm", "serve", "/models/llama", "--pipeline-parallel-size", "2", "--tensor-parallel-size", "4",
        "--distributed-executor-backend", "ray", "--host", "127.0.0.1", "--port", "8001", "--max-model-len", "4096"]
    eng = vllm.VllmEngine("/models/llama", [{"host": "10.0.0.1", "layers": [0, 16], "gpus": 2},
                                            {"host": "10.0.0.2", "layers": [16, 32], "gpus": 2}], port=8001)
    head, serve = eng.commands()
    assert head[:3] == ["ray", "start", "--head"] and serve[serve.index("--pipeline-parallel-size") + 1] == "2"
    assert serve[serve.index("--tensor-parallel-size") + 1] == "2"
    for bad in ({"head": "10.0.0.1:6379"}, {"head": "x:1", "node_ip": "10.0.0.2"},
                {"head": "10.0.0.1:6379", "node_ip": "10.0.0.2", "num_gpus": -1},
                {"head": "10.0.0.1:6379", "node_ip": "10.0.0.2", "shell": "sh"}):
        with pytest.raises(EngineError):
            vllm.ray_worker_argv(bad)

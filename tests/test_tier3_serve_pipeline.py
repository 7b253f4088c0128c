"""`tierkit serve --engine pipeline --layout pipeline` over loopback: a real agent, a real worker
process it starts, the real CLI and HTTP. 64 streaming clients at once, each with its own seeded
sample: every response complete, each equal to `GPT.generate` alone (equal samples mean equal
logits all along), none crossed, and the engine's statistics show they were batched across two
micro-batches in flight.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import httpx
import pytest
import torch

from models.gpt import GPT, GPTConfig
from tests.conftest import REPO, run_clients, stop_process, wait_for_line
from tiers.tier3.net import free_port
from tiers.tier3.pipeline import PRESETS

CLIENTS = 64


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve-pipeline")
    home = tmp / "home"
    home.mkdir()
    agent_port, port = free_port(), free_port()
    env = {**os.environ, "TIERKIT_HOME": str(home), "PYTHONPATH": str(REPO)}
    env.pop("TIERKIT_AGENT_TOKEN", None)
    agent = subprocess.Popen([sys.executable, "-m", "tiers.cli", "agent", "--host", "127.0.0.1", "--port",
                              str(agent_port), "--no-mdns", "--name", "nodeB", "--memory-budget", "1GiB"],
                             stdout=(tmp / "agent.log").open("w"), stderr=subprocess.STDOUT, cwd=REPO, env=env)
    serve = None
    try:
        wait_for_line(agent, tmp / "agent.log", "listening on")
        serve = subprocess.Popen([sys.executable, "-m", "tiers.cli", "serve", "random:gpt-tiny", "--engine", "pipeline",
                                  "--layout", "pipeline", "--peers", f"127.0.0.1:{agent_port}", "--memory-budget",
                                  "1GiB", "--port", str(port), "--token-file", str(home / "agent.token"),
                                  "--threads", "1"],
                                 stdout=(tmp / "serve.log").open("w"), stderr=subprocess.STDOUT, cwd=REPO, env=env)
        wait_for_line(serve, tmp / "serve.log", "serving random:gpt-tiny", timeout=150)
        yield f"http://127.0.0.1:{port}", tmp
    finally:
        if serve is not None:
            stop_process(serve)
        stop_process(agent)


def _reference(model: GPT, prompt: bytes, n: int, seed: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([list(prompt)]), n, temperature=1.0,
                             generator=torch.Generator().manual_seed(seed))
    return out[0, len(prompt):].tolist()


def _stream(url: str, prompt: bytes, n: int, seed: int) -> dict:
    toks, finish, done = [], None, False
    with httpx.stream("POST", f"{url}/v1/completions", timeout=180,
                      json={"prompt": prompt.decode(), "max_tokens": n, "temperature": 1.0, "seed": seed,
                            "stream": True, "return_token_ids": True}) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if line == "data: [DONE]":
                done = True
            elif line.startswith("data: "):
                ch = json.loads(line[6:])["choices"][0]
                toks += ch.get("token_ids", [])
                finish = ch["finish_reason"] or finish
    return {"tokens": toks, "finish": finish, "done": done}


def test_sixty_four_streaming_clients_batched_across_two_stages(served):
    url, tmp = served
    plan = httpx.get(f"{url}/metrics").json()["plan"]
    assert plan["layout"]["choice"] == "pipeline" and len(plan["stages"]) == 2, plan
    jobs = [(f"client {i} says".encode(), 6 + i % 11, 1000 + i) for i in range(CLIENTS)]
    results = run_clients(lambda i: _stream(url, *jobs[i]), CLIENTS, timeout=240)
    errors = {i: r["error"] for i, r in results.items() if "error" in r}
    assert len(results) == CLIENTS and not errors, errors
    model = GPT(GPTConfig(**PRESETS["gpt-tiny"]), seed=0).eval()
    for i, (prompt, n, seed) in enumerate(jobs):
        r = results[i]
        assert r["done"] and r["finish"] == "length", (i, r)
        assert r["tokens"] == _reference(model, prompt, n, seed), i   # its own sample: complete and not crossed
    b = httpx.get(f"{url}/metrics").json()["engine"]["batching"]
    assert b["max_batch"] > 1 and b["steps"] < sum(n for _, n, _ in jobs), b
    assert b["max_micro_batches_in_flight"] >= 2, b
    assert "Traceback" not in (tmp / "serve.log").read_text()

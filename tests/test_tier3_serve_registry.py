"""`tierkit serve NAME`: a registry name works wherever a GGUF path does.

The registry's `llama-3.2-1b-instruct-q8_0` is stood in for by stories260K.gguf, placed in a
temporary Hugging Face cache as that entry's file; the real CLI serves it on one node and its
greedy tokens must be the file's own (single-node llama.cpp). A name that is not
here, or names a data set, is one line.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.conftest import REPO, SHARED, assert_one_line_error, run_cli, stop_process, wait_for_line
from tests.hf_fixtures import hub_env
from tiers.tier3.net import free_port

MODEL = SHARED / "data" / "stories260K.gguf"
NAME = "llama-3.2-1b-instruct-q8_0"
pytestmark = pytest.mark.skipif(not MODEL.exists(), reason=f"{MODEL} is missing (the shared data folder)")


def greedy(prompt: str, n: int) -> list[int]:
    """The file's own greedy tokens, from llama.cpp in this process (B16's engine: argmax of the logits)."""
    from tiers.tier2 import b16_llamacpp as b16

    settings = b16.Settings(n_threads=1, n_threads_batch=1, n_ctx=256, n_batch=64, n_ubatch=64, n_gpu_layers=0)
    with b16.Engine(MODEL, settings) as eng:
        return eng.greedy(eng.tokenize(prompt), n)


def test_serve_a_registry_gguf_by_name(home, tmp_path, monkeypatch):
    from tests.gguf_fixtures import registry_gguf

    [placed] = registry_gguf(tmp_path / "hf", {NAME: MODEL}).values()
    hub_env(monkeypatch, tmp_path / "hf")
    port = free_port()
    log = tmp_path / "serve.log"
    env = {**os.environ, "TIERKIT_HOME": str(home), "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "tiers.cli", "serve", NAME, "--peers", "none", "--port", str(port),
                             "--threads", "1", "--ctx", "256"], stdout=log.open("w"), stderr=subprocess.STDOUT,
                            cwd=home, env=env)
    try:
        text = wait_for_line(proc, log, f"serving {placed.stem}", timeout=120)
        assert f"model {NAME}: {placed}" in text
        r = httpx.post(f"http://127.0.0.1:{port}/v1/completions", timeout=60,
                       json={"prompt": "Once upon a time", "max_tokens": 16, "temperature": 0,
                             "return_token_ids": True})
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["token_ids"] == greedy("Once upon a time", 16)
    finally:
        stop_process(proc)


def test_serve_a_missing_or_wrong_name_is_one_line(home, tmp_path, monkeypatch):
    hub_env(monkeypatch, tmp_path / "empty-hf")
    proc = run_cli("serve", NAME, "--peers", "none", home=home)
    assert_one_line_error(proc, f"tierkit data fetch {NAME}", code=1)
    proc = run_cli("serve", "tinystories", "--peers", "none", home=home)
    assert_one_line_error(proc, "tinystories is a data set, not a model", code=1)


def test_resolve_model_leaves_paths_and_presets_alone(tmp_path, monkeypatch):
    from tiers.tier3.serve import resolve_model

    hub_env(monkeypatch, tmp_path / "empty-hf")
    assert resolve_model(str(MODEL)) == str(MODEL)
    assert resolve_model("random:gpt-tiny") == "random:gpt-tiny"
    assert resolve_model("no-such-thing") == "no-such-thing"          # the engine says what it takes
    Path(tmp_path / "gpt2").mkdir()
    monkeypatch.chdir(tmp_path)
    assert resolve_model("gpt2") == "gpt2"                             # a folder here wins over the registry

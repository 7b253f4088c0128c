"""Hugging Face entries of the registry, fetched through huggingface_hub from a loopback hub (tests/hub_server.py).

    hub = Hub(); hub.add_folder("openai-community/gpt2", tiny_gpt2)      what the server answers
    HF_ENDPOINT=<loopback> HF_HUB_CACHE=<tmp> tierkit data fetch gpt2   the real CLI, the real huggingface_hub
    data.locate("gpt2") -> snapshot folder -> transformers loads it

Nothing leaves the machine: the checkpoints are tiny models built with transformers' own classes
(tests/hf_fixtures.py) and the GGUF is stories260K from ../shared/data.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import socket
from pathlib import Path

import pytest

from tests.conftest import SHARED, assert_one_line_error, run_cli
from tests.hf_fixtures import hub_env, put_in_cache, tiny_checkpoint, tiny_model, train_tokenizer
from tests.hub_server import Hub, serve
from tiers import data

GGUF = SHARED / "data" / "stories260K.gguf"
QWEN_Q4 = "qwen2.5-0.5b-instruct-q4_k_m"
pytestmark = pytest.mark.skipif(not GGUF.exists(), reason=f"reference data not at {GGUF.parent}")


@pytest.fixture(scope="module")
def tiny_gpt2(tmp_path_factory) -> Path:
    """A tiny GPT-2 and its tokenizer, saved as a repository folder (what the loopback hub serves)."""
    folder = tmp_path_factory.mktemp("gpt2-repo")
    tok = train_tokenizer(chat=False)
    tiny_model("gpt2", len(tok)).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture
def hub(tmp_path, tiny_gpt2):
    """The loopback hub with gpt2 (a model repo) and the Qwen GGUF repo (stories260K under the Q4_K_M name)."""
    gguf = tmp_path / "gguf-repo"
    gguf.mkdir()
    shutil.copy(GGUF, gguf / data.get(QWEN_Q4).target)
    (gguf / "README.md").write_text("a GGUF repository\n")
    h = Hub()
    h.add_folder("openai-community/gpt2", tiny_gpt2)
    h.add_folder(data.get(QWEN_Q4).repo_id, gguf)
    with serve(h):
        yield h


@pytest.fixture
def env(tmp_path, hub) -> dict:
    """The environment a user would set: the hub's address and an empty HF cache."""
    return {"HF_ENDPOINT": hub.url, "HF_HUB_CACHE": str(tmp_path / "hf" / "hub"), "HF_HOME": str(tmp_path / "hf"),
            "HF_HUB_OFFLINE": "", "HF_TOKEN": "", "HF_HUB_DISABLE_XET": "1"}


def files_under(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()) if root.exists() else []


def gets(hub: Hub) -> list[tuple[str, str, str | None]]:
    """The file downloads the hub served (GET on resolve URLs)."""
    return [r for r in hub.requests if r[0] == "GET" and "/resolve/" in r[1]]


# ---------------------------------------------------------------- the CLI, as a user runs it

def test_fetch_a_model_then_locate_and_load_it(hub, env, home, monkeypatch):
    proc = run_cli("data", "fetch", "gpt2", home=home, env=env)
    assert proc.returncode == 0, proc.stderr
    cache = Path(env["HF_HUB_CACHE"])
    repo = cache / "models--openai-community--gpt2"
    commit = hub.repos[("model", "openai-community/gpt2")].commit
    snap = repo / "snapshots" / commit
    assert (repo / "refs" / "main").read_text() == commit
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in snap.iterdir()}
    assert (snap / "model.safetensors").is_symlink()  # the hub's own layout: snapshot links into blobs/
    assert f"gpt2: {snap}" in proc.stdout and "verified" in proc.stdout
    assert not list(repo.glob("blobs/*.part"))

    hub_env(monkeypatch, cache)
    assert data.locate("gpt2") == snap == data.require("gpt2")
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(data.require("gpt2"))
    tok = transformers.AutoTokenizer.from_pretrained(data.require("gpt2"))
    assert type(model).__name__ == "GPT2LMHeadModel" and tok("To be").input_ids
    # what tierkit fetched, huggingface_hub (and so transformers, llama.cpp) finds by repo id in the same cache
    from huggingface_hub import try_to_load_from_cache

    assert try_to_load_from_cache("openai-community/gpt2", "model.safetensors", cache_dir=str(cache)) == \
        str(snap / "model.safetensors")

    hub.requests.clear()  # a second fetch finds it and asks the hub nothing
    proc = run_cli("data", "fetch", "gpt2", home=home, env=env)
    assert proc.returncode == 0 and hub.requests == []
    path = run_cli("data", "path", "gpt2", home=home, env=env)
    assert path.returncode == 0 and path.stdout.strip() == str(snap)


def test_a_gguf_fetched_by_huggingface_hub_itself_is_found(hub, env, home, monkeypatch):
    """The user's cache already holds the file (as llama.cpp's or transformers' downloads leave it): no fetch."""
    from huggingface_hub import hf_hub_download

    entry = data.get(QWEN_Q4)
    got = hf_hub_download(entry.repo_id, entry.target, cache_dir=env["HF_HUB_CACHE"], endpoint=hub.url)
    hub.requests.clear()
    proc = run_cli("data", "fetch", QWEN_Q4, home=home, env=env)
    assert proc.returncode == 0, proc.stderr
    assert hub.requests == [] and str(Path(got)) in proc.stdout
    hub_env(monkeypatch, Path(env["HF_HUB_CACHE"]))
    assert data.require(QWEN_Q4) == Path(got) and data.require(QWEN_Q4).read_bytes()[:4] == b"GGUF"
    assert data.locate("qwen2.5-0.5b-instruct-q8_0") is None  # the other file of the same repo is not here


def test_a_gguf_llama_cpp_downloaded_is_found(tmp_path, monkeypatch, home):
    """llama.cpp's `-hf bartowski/Llama-3.2-3B-Instruct-GGUF:Q8_0` leaves <org>_<repo>_<file> in $LLAMA_CACHE."""
    entry = data.get("llama-3.2-3b-instruct-q8_0")
    got = tmp_path / "llama.cpp" / "bartowski_Llama-3.2-3B-Instruct-GGUF_Llama-3.2-3B-Instruct-Q8_0.gguf"
    got.parent.mkdir()
    shutil.copy(GGUF, got)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    monkeypatch.setenv("LLAMA_CACHE", str(got.parent))
    assert data.locate(entry.name) == got
    proc = run_cli("data", "fetch", entry.name, home=home, env={"HF_ENDPOINT": "http://127.0.0.1:9"})
    assert proc.returncode == 0 and str(got) in proc.stdout  # found: no hub asked (port 9 would refuse)


def test_interrupted_download_resumes_on_the_next_fetch(hub, env, home):
    name = data.get(QWEN_Q4).target
    size = GGUF.stat().st_size
    hub.cut[name] = 300_000
    proc = run_cli("data", "fetch", QWEN_Q4, home=home, env=env)
    assert_one_line_error(proc, f"interrupted at 300,000 of {size:,} bytes", f"tierkit data fetch {QWEN_Q4}",
                          "again to resume")
    repo = Path(env["HF_HUB_CACHE"]) / data.get(QWEN_Q4).folder
    parts = list(repo.glob("blobs/*.part"))
    assert len(parts) == 1 and parts[0].stat().st_size == 300_000
    assert not list(repo.glob("snapshots/*/*.gguf"))  # nothing under the real name

    hub.clear_faults()
    hub.requests.clear()
    proc = run_cli("data", "fetch", QWEN_Q4, home=home, env=env)
    assert proc.returncode == 0, proc.stderr
    assert [r[2] for r in gets(hub)] == ["bytes=300000-"]  # only the rest was asked for
    (got,) = repo.glob("snapshots/*/*.gguf")
    assert hashlib.sha256(got.read_bytes()).hexdigest() == hashlib.sha256(GGUF.read_bytes()).hexdigest()
    assert not list(repo.glob("blobs/*.part"))


@pytest.mark.parametrize("fault,needles", [("corrupt", ("does not match", "discarded")),
                                           ("short", ("bytes, expected", "discarded"))])
def test_a_wrong_checksum_or_size_leaves_nothing_valid_looking(hub, env, home, fault, needles):
    name = data.get(QWEN_Q4).target
    getattr(hub, fault).add(name)
    proc = run_cli("data", "fetch", QWEN_Q4, home=home, env=env)
    assert_one_line_error(proc, name, *needles)
    repo = Path(env["HF_HUB_CACHE"]) / data.get(QWEN_Q4).folder
    assert [f for f in files_under(repo) if not f.startswith("refs/")] == []  # no blob, no .part, no snapshot
    assert run_cli("data", "path", QWEN_Q4, home=home, env=env).returncode == 2


def test_gated_repo_without_a_token_is_one_line_naming_the_licence_and_hf_token(hub, env, home):
    hub.repos[("model", data.get(QWEN_Q4).repo_id)].gated = True
    proc = run_cli("data", "fetch", QWEN_Q4, home=home, env=env)
    assert_one_line_error(proc, "gated", "HF_TOKEN", data.get(QWEN_Q4).homepage, f"tierkit data fetch {QWEN_Q4}")
    assert files_under(Path(env["HF_HUB_CACHE"]) / data.get(QWEN_Q4).folder / "blobs") == []
    # with the token the hub accepts, the same fetch goes through
    proc = run_cli("data", "fetch", QWEN_Q4, home=home, env={**env, "HF_TOKEN": hub.token})
    assert proc.returncode == 0, proc.stderr


def test_offline_with_nothing_cached_is_one_line_and_asks_nothing(hub, env, home):
    proc = run_cli("data", "fetch", "gpt2", home=home, env={**env, "HF_HUB_OFFLINE": "1"})
    assert_one_line_error(proc, "not in the Hugging Face cache", "HF_HUB_OFFLINE")
    assert hub.requests == []


def test_no_network_and_unknown_repo_are_one_line(hub, env, home, monkeypatch):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = run_cli("data", "fetch", "gpt2", home=home, env={**env, "HF_ENDPOINT": f"http://127.0.0.1:{port}"})
    assert_one_line_error(proc, "cannot reach", "connection refused", "tierkit data fetch gpt2")
    proc = run_cli("data", "fetch", "smollm2-135m-instruct", home=home, env=env)  # not on this hub
    assert_one_line_error(proc, "HuggingFaceTB/SmolLM2-135M-Instruct", "HTTP 401")


def test_missing_model_names_the_fetch_and_its_size(home, tmp_path):
    proc = run_cli("data", "path", "llama-3.2-3b-instruct-q8_0", home=home,
                   env={"HF_HUB_CACHE": str(tmp_path / "empty"), "HF_HOME": str(tmp_path / "hf")})
    assert_one_line_error(proc, "not in the Hugging Face cache", "tierkit data fetch llama-3.2-3b-instruct-q8_0",
                          "(3.42 GB)")


def test_data_list_json_lists_models_and_data_sets(home, tmp_path, tiny_gpt2):
    cache = tmp_path / "hub"
    snap = put_in_cache(cache, "openai-community/gpt2", tiny_gpt2)
    proc = run_cli("data", "list", "--json", home=home, env={"HF_HUB_CACHE": str(cache), "HF_HOME": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr
    rows = {r["name"]: r for r in json.loads(proc.stdout)}
    brief = ["gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl", "smollm2-135m-instruct", "smollm2-360m-instruct",
             "qwen2.5-0.5b-instruct", "tinyllama-1.1b-chat", "pythia-1b", "qwen2.5-0.5b-instruct-q4_k_m",
             "qwen2.5-0.5b-instruct-q8_0", "tinyllama-1.1b-chat-q4_k_m", "tinyllama-1.1b-chat-q5_k_m",
             "tinyllama-1.1b-chat-q8_0", "llama-3.2-1b-instruct-q4_k_m", "llama-3.2-1b-instruct-q8_0",
             "llama-3.2-3b-instruct-q4_k_m", "llama-3.2-3b-instruct-q5_k_m", "llama-3.2-3b-instruct-q8_0",
             "llama-3.1-8b-instruct-q4_k_m", "llama-3.1-8b-instruct-q5_k_m", "llama-3.1-8b-instruct-q8_0",
             "llama-2-13b-chat-q4_k_m", "llama-2-13b-chat-q8_0", "qwen2.5-32b-instruct-q4_k_m",
             "llama-3.1-70b-instruct-q4_k_m", "mnist", "fashion-mnist", "tinyshakespeare", "speech-commands",
             "speech-commands-test", "hh-rlhf", "cifar-10", "tinystories", "openwebtext-sample", "alpaca-cleaned",
             "dolly-15k"]
    assert set(brief) <= set(rows)
    assert rows["gpt2"]["kind"] == "model" and rows["gpt2"]["here"] and rows["gpt2"]["path"] == str(snap)
    assert rows["gpt2"]["source"]["hub"] == "openai-community/gpt2"
    assert rows[QWEN_Q4]["kind"] == "gguf" and not rows[QWEN_Q4]["here"] and rows[QWEN_Q4]["size"] > 300e6
    assert rows["mnist"]["kind"] == "data" and rows["mnist"]["source"]["urls"]
    assert all(r["licence"] and r["title"] and r["size"] for n, r in rows.items() if n != "hh-rlhf")
    table = run_cli("data", "list", home=home, env={"HF_HUB_CACHE": str(cache), "HF_HOME": str(tmp_path)})
    assert table.returncode == 0, table.stderr
    for needle in ("GPT-2 small (124M)", "gguf", "Llama 3.2 Community License", "CIFAR-10", "not here"):
        assert needle in table.stdout, needle


# ---------------------------------------------------------------- in process

def test_not_enough_disk_refuses_before_downloading(hub, env, monkeypatch):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(shutil, "disk_usage", lambda _: shutil._ntuple_diskusage(10**12, 10**12 - 10**8, 10**8))
    with pytest.raises(data.DataError) as err:
        data.fetch("gpt2-xl")
    msg = str(err.value)
    assert "need 6.4 GB free in" in msg and "have 0.1 GB" in msg and "HF_HUB_CACHE" in msg and "\n" not in msg
    assert hub.requests == []


def test_a_replaced_file_is_refused_before_downloading(hub, env, monkeypatch):
    """The registry records a sha256 the hub no longer lists: one line, and not a byte fetched."""
    from dataclasses import replace

    for k, v in env.items():
        monkeypatch.setenv(k, v)
    entry = data.get(QWEN_Q4)
    monkeypatch.setitem(data.REGISTRY, QWEN_Q4, replace(entry, sha256=((entry.target, "0" * 64),)))
    with pytest.raises(data.DataError, match=r"the file was replaced\); nothing was downloaded"):
        data.fetch(QWEN_Q4)
    assert gets(hub) == []


def test_locate_reads_the_cache_from_the_environment_at_call_time(tmp_path, monkeypatch):
    cache = tmp_path / "a" / "hub"
    snap = tiny_checkpoint(cache, "HuggingFaceTB/SmolLM2-135M-Instruct", "llama")
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "a"))  # HF_HOME/hub
    assert data.locate("smollm2-135m-instruct") == snap
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "elsewhere"))  # HF_HUB_CACHE wins
    assert data.locate("smollm2-135m-instruct") is None
    with pytest.raises(data.DataError, match=r"tierkit data fetch smollm2-135m-instruct` \(272 MB\)"):
        data.require("smollm2-135m-instruct")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    (snap / "model.safetensors").unlink()  # a snapshot without weights is not the model
    assert data.locate("smollm2-135m-instruct") is None
    assert data.get("SmolLM2_135M_Instruct").name == "smollm2-135m-instruct"

"""Every plan names its artifacts, and a run never starts without them.

The catalog's rungs against the registry (every model and data set a ladder names is a
registry name, or the learner's own b12 / b13, or the stand-in); `tierkit fit --json` on
every reference kit and track (each planned size's artifacts, their size, whether they are
here, and the `fetch first` note); `tierkit run` at a size whose artifact is missing (exit 2,
one line naming the fetch, no build folder), at a size on the learner's own model with no
such build, and with `--fetch` from a loopback server. Nothing is downloaded from the
internet: tiny checkpoints go into a test Hugging Face cache (tests/hf_fixtures.py), data
comes from ../shared/data.
"""
from __future__ import annotations

import functools
import http.server
import json
import threading
from pathlib import Path

import pytest

from inventory import kits
from tests.conftest import SHARED, assert_one_line_error, run_cli
from tiers import catalog, data
from tiers import fit as F

DATA = SHARED / "data"
KIT = "laptop-8gb-cpu"


@pytest.fixture
def bare(tmp_path: Path) -> dict[str, str]:
    """An environment with nothing fetched: an empty HF cache, an empty data root, a home of its own."""
    for d in ("hf", "data", "user"):
        (tmp_path / d).mkdir()
    return {"HF_HUB_CACHE": str(tmp_path / "hf"), "HF_HOME": str(tmp_path / "hf-home"), "HF_HUB_OFFLINE": "1",
            "TIERKIT_DATA": str(tmp_path / "data"), "HOME": str(tmp_path / "user"),
            "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _every_rung():
    for track in catalog.tracks():
        for m in catalog.track(track):
            for r in m.ladder:
                yield m, r


# ---------------------------------------------------------------- the catalog against the registry

def test_every_ladder_rung_names_registry_artifacts():
    named = 0
    for m, r in _every_rung():
        where = f"{m.track} {m.id} {r.size}"
        assert r.model is None or r.model in data.REGISTRY or r.model in catalog.OWN_MODELS, where
        assert r.base is None or r.base in data.REGISTRY, where
        assert r.dataset is None or r.dataset in data.REGISTRY, where
        assert set(r.artifacts) <= set(data.REGISTRY) and not set(r.artifacts) & set(catalog.OWN_MODELS), where
        if r.model in data.REGISTRY:
            kind = data.get(r.model).kind
            assert kind == ("gguf" if isinstance(r, catalog.GGUF) else "model"), where
        if r.own_model:
            assert r.own_model in ("B12", "B13") and r.model not in r.artifacts, where
        for f in r.dataset_files or []:
            assert f in {x.name for x in data.get(r.dataset).files}, where
        named += bool(r.artifacts)
    assert named > 60


def test_the_ladders_name_the_planned_models():
    b = {m.id: m for m in catalog.track("build")}
    assert [r.model for r in b["B7"].ladder] == ["standin", "b12", "gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl"]
    assert {r.dataset for r in b["B7"].ladder} == {"tinyshakespeare"}
    assert {r.dataset for r in b["B9"].ladder} == {"mnist", "cifar-10"}
    assert [r.dataset for r in b["B12"].ladder][-5:] == ["tinystories"] * 2 + ["openwebtext-sample"] * 3
    assert all(r.vocab_size == 50304 for r in b["B12"].ladder if r.dataset != "tinyshakespeare")
    b13 = {r.size: r for r in b["B13"].ladder}
    assert b13["smollm2-135m"].model == "smollm2-135m-instruct" and b13["smollm2-135m"].lora_rank == 0
    assert b13["tinyllama-1.1b"].lora_rank and b13["qwen2.5-0.5b"].lora_rank
    # B14's Hugging Face sizes are B13's: the policy starts from your B13 model of that size
    for r in b["B14"].ladder:
        if r.base:
            assert r.model == "b13" and r.base == b13[r.size].model and r.lora_rank == b13[r.size].lora_rank
            assert r.pairs == 500
    assert b["B16"].ladder[1].model == "qwen2.5-0.5b-instruct-q4_k_m" and b["B16"].ladder[1].quant == "Q4_K_M"
    assert {r.model for r in b["B17"].ladder} <= set(data.REGISTRY)


def test_a_name_not_in_the_registry_is_refused_in_one_line():
    import yaml

    doc = yaml.safe_load(catalog.DEFAULT_PATH.read_text())
    b7 = next(m for m in doc["tracks"]["build"]["milestones"] if m["id"] == "B7")
    b7["ladder"][2]["model"] = "gpt-3"
    with pytest.raises(catalog.CatalogError) as e:
        catalog.parse(doc)
    assert "model 'gpt-3' is not in the registry" in str(e.value) and "\n" not in str(e.value)
    b7["ladder"][2]["model"] = "gpt2"
    b7["ladder"][2]["dataset"] = "tiny-shakespeare"
    with pytest.raises(catalog.CatalogError, match="dataset 'tiny-shakespeare' is not in the registry"):
        catalog.parse(doc)


# ---------------------------------------------------------------- tierkit fit

@pytest.mark.parametrize("track", catalog.tracks())
def test_fit_all_profiles_json_names_registry_artifacts(track, home, bare):
    proc = run_cli("fit", "--all-profiles", "--json", "--track", track, home=home, env=bare)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert set(doc["profiles"]) == set(kits.reference_names())
    seen = 0
    for plans in doc["profiles"].values():
        for p in plans:
            if p["size"] is None:
                assert p["artifacts"] == []
                continue
            rung = catalog.get(p["milestone"], track).rung(p["size"])
            assert [a["name"] for a in p["artifacts"]] == list(rung.artifacts)
            for a in p["artifacts"]:
                entry = data.get(a["name"])
                assert (a["kind"], a["size"]) == (entry.kind, entry.size) and isinstance(a["here"], bool)
                fetch = f"tierkit data fetch {a['name']} ("      # the note names each missing one, with its size
                if a["here"]:     # nothing is fetched in this environment: only an OS package's copy is here
                    assert a["name"] == "fashion-mnist" and not any(fetch in r for r in p["reasons"])
                else:
                    assert p["reasons"][0].startswith("fetch first: ") and fetch in p["reasons"][0], p["reasons"]
                    seen += 1
    assert seen > 0


def test_fit_json_shows_a_model_here_once_it_is_in_the_hf_cache(home, bare, tmp_path):
    from tests.hf_fixtures import tiny_checkpoint

    env = {**bare, "TIERKIT_DATA": str(DATA)}     # Tiny Shakespeare is here, GPT-2 is not
    args = ("fit", "--profile", "laptop-8gb-cpu", "--milestone", "B7", "--json")

    def b7() -> dict:
        proc = run_cli(*args, home=home, env=env)
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout)["plans"][0]

    before = b7()
    assert before["size"] == "gpt2-124M" and before["verdict"] in ("fits", "tight")
    assert before["artifacts"] == [{"name": "gpt2", "kind": "model", "size": data.get("gpt2").size, "here": False},
                                   {"name": "tinyshakespeare", "kind": "data", "size": 1_115_394, "here": True}]
    assert before["reasons"][0] == "fetch first: tierkit data fetch gpt2 (551 MB)"
    tiny_checkpoint(Path(bare["HF_HUB_CACHE"]), "openai-community/gpt2", "gpt2", chat=False)
    after = b7()
    assert after["artifacts"][0] == {**before["artifacts"][0], "here": True}
    assert after["verdict"] == before["verdict"] and not any("fetch first" in r for r in after["reasons"])
    explain = run_cli(*args[:-1], "--explain", home=home, env=env)
    assert "needs from the registry: gpt2 551 MB (here), tinyshakespeare 1.12 MB (here)" in explain.stdout


def test_a_size_reading_part_of_a_data_set_is_here_with_that_part(monkeypatch):
    """B9's smallest size trains on MNIST's test split: with only that split here, it is here."""
    monkeypatch.setenv("TIERKIT_DATA", str(DATA))
    monkeypatch.setenv("HOME", str(DATA / "no-such-home"))
    assert data.locate("mnist") is None                 # the train images are not in ../shared/data
    small, full = (F.fit(kits.reference_profile(KIT), "B9", size=s, check_packages=False)
                   for s in ("mnist-xs-8k", "mnist-s"))
    assert [(a.name, a.here) for a in small.artifacts] == [("mnist", True)]
    assert [(a.name, a.here) for a in full.artifacts] == [("mnist", False)]
    assert "fetch first: tierkit data fetch mnist (11.6 MB)" in full.reasons


# ---------------------------------------------------------------- tierkit run

def test_run_with_the_model_missing_stops_before_anything(home, bare):
    proc = run_cli("run", "B7", "--size", "gpt2-124M", "--profile", KIT, home=home, env=bare, timeout=120)
    assert_one_line_error(proc, "gpt2", "not here", "tierkit data fetch gpt2 (551 MB)",
                          "tierkit data fetch tinyshakespeare (1.12 MB)", "or pass --fetch")
    assert not (home / "builds").exists()
    assert [p.name for p in Path(bare["TIERKIT_DATA"]).iterdir()] == []
    assert [p.name for p in Path(bare["HF_HUB_CACHE"]).iterdir()] == []


def test_run_on_your_b12_model_without_a_b12_checkpoint_stops(home, bare):
    proc = run_cli("run", "B7", "--size", "char-10.7M", "--profile", KIT, home=home,
                   env={**bare, "TIERKIT_DATA": str(DATA)}, timeout=120)
    assert_one_line_error(proc, "no B12 checkpoint at", "B12-pretraining/ckpt.pt", "run `tierkit run B12` first",
                          "or pick --size char-0.1M (a stand-in trained in seconds)")
    assert not (home / "builds").exists()


def test_run_on_your_b13_model_needs_b13_at_the_same_size(home, bare, tmp_path):
    out = tmp_path / "builds"
    args = ("run", "B14", "--size", "smollm2-135m", "--profile", KIT, "--out", str(out))
    proc = run_cli(*args, home=home, env=bare, timeout=120)
    assert_one_line_error(proc, "no B13 model at", "B13-sft", "run `tierkit run B13 --size smollm2-135m` first",
                          "--size char-0.1M")
    assert not out.exists()
    (out / "B13-sft").mkdir(parents=True)     # a B13 build at another size
    (out / "B13-sft" / "metrics.json").write_text(json.dumps({"plan": {"size": "char-0.1M"}}))
    proc = run_cli(*args, home=home, env=bare, timeout=120)
    assert_one_line_error(proc, "is size char-0.1M, not smollm2-135m", "tierkit run B13 --size smollm2-135m")
    assert sorted(p.name for p in out.iterdir()) == ["B13-sft"]


def test_a_local_file_stands_in_for_the_registry_model(home, bare):
    """--set gguf=FILE: B16 runs that file, so the registry's GGUF is not needed (nor fetched)."""
    proc = run_cli("run", "B16", "--size", "llama-3.1-8b-Q4_K_M", "--profile", "apple-m2-16gb", "--set",
                   f"gguf={home / 'missing.gguf'}", home=home, env=bare, timeout=120)
    assert proc.returncode != 0
    assert "tierkit data fetch" not in proc.stderr and "missing.gguf" in proc.stderr, proc.stderr


@pytest.fixture
def shared_data_server():
    """A loopback HTTP server serving ../shared/data: where TIERKIT_DATA_URL points `fetch`."""
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(DATA))
    handler.log_message = lambda *a: None  # type: ignore[method-assign]
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def test_run_fetch_gets_what_is_missing_then_runs(home, bare, shared_data_server):
    pytest.importorskip("torch", reason="B11 runs on torch: pip install 'tierkit[tier2]'")
    env = {**bare, "TIERKIT_DATA_URL": shared_data_server}
    args = ("run", "B11", "--size", "28K", "--profile", KIT, "--set", "steps=20")
    proc = run_cli(*args, home=home, env=env, timeout=120)
    assert_one_line_error(proc, "B11 28K: tinyshakespeare not here",
                          "run tierkit data fetch tinyshakespeare (1.12 MB), or pass --fetch")
    assert not (home / "builds").exists()
    proc = run_cli(*args, "--fetch", home=home, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    fetched = Path(bare["TIERKIT_DATA"]) / "tinyshakespeare.txt"
    assert fetched.read_bytes() == (DATA / "tinyshakespeare.txt").read_bytes()
    build = home / "builds" / "B11-transformer"
    metrics = json.loads((build / "metrics.json").read_text())
    assert metrics["plan"]["artifacts"] == [{"name": "tinyshakespeare", "kind": "data", "size": 1_115_394,
                                             "here": True}]
    assert f"- data: tinyshakespeare (1.12 MB), `{fetched}`" in (build / "README.md").read_text()
    plan = run_cli("fit", "--profile", KIT, "--milestone", "B11", "--json", home=home, env=env)
    assert json.loads(plan.stdout)["plans"][0]["artifacts"][0]["here"] is True     # fetched for good

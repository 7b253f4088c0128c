"""B16 on the registry's GGUF files, and a Hugging Face Llama converted to GGUF and run by llama.cpp.

The registry's GGUFs are stood in for by real files: stories260K (a llama2.c model from
../shared/data) quantised here to Q8_0 and Q4_K_M by B16's own quantiser, placed in a
temporary Hugging Face cache as the files of `tinyllama-1.1b-chat-q8_0` and `-q4_k_m`
(the repository and file names the registry expects). `-q5_k_m` is left out, so the
run must name its fetch. The second GGUF is a tiny Hugging Face Llama (transformers'
own class, tests/hf_fixtures.py) converted with the gguf package (tests/gguf_fixtures.py):
llama.cpp must give transformers' logits.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("llama_cpp")
pytest.importorskip("gguf")

from tests.conftest import SHARED, assert_one_line_error, run_cli
from tests.gguf_fixtures import hf_llama_to_gguf, registry_gguf
from tests.hf_fixtures import hub_env, tiny_checkpoint
from tiers.tier2 import b16_llamacpp as b16

DATA = SHARED / "data"
STORIES = DATA / "stories260K.gguf"
KIT = "laptop-8gb-cpu"
ENV = {"TIERKIT_DATA": str(DATA), "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "TIERKIT_B16_THREADS": "1"}
SMALL = ["--set", "prompt_tokens=32", "--set", "new_tokens=8", "--set", "requests=2", "--set", "ppl_tokens=1024"]
EXACT = b16.Settings(n_threads=1, n_threads_batch=1, n_ctx=256, n_batch=64, n_ubatch=64, n_gpu_layers=0,
                     kv_type="f32")
PLANNED, SIBLING, ABSENT = "tinyllama-1.1b-chat-q8_0", "tinyllama-1.1b-chat-q4_k_m", "tinyllama-1.1b-chat-q5_k_m"

pytestmark = pytest.mark.skipif(not (STORIES.exists() and (DATA / "tinyshakespeare.txt").exists()),
                                reason=f"stories260K.gguf or tinyshakespeare.txt missing from {DATA}")


@pytest.fixture(scope="module")
def quantised(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("quants")
    return {name: b16.quantize(STORIES, d / f"{name}.gguf", b16.quant_label(name), threads=1)
            for name in (PLANNED, SIBLING)}


@pytest.fixture
def cache(tmp_path, monkeypatch, quantised) -> dict[str, Path]:
    placed = registry_gguf(tmp_path / "hf", quantised)
    hub_env(monkeypatch, tmp_path / "hf")
    return placed


def _run(home: Path, *args: str):
    return run_cli("run", "B16", "--profile", KIT, *SMALL, *args, home=home, env=ENV, timeout=300)


def test_registry_gguf_is_timed_with_its_siblings_and_the_missing_one_named(home, cache):
    proc = _run(home, "--size", "tinyllama-1.1b-Q8_0")
    assert proc.returncode == 0, proc.stderr
    folder = home / "builds" / "B16-llama-cpp"
    m = json.loads((folder / "metrics.json").read_text())["metrics"]
    assert m["model"] == PLANNED and m["model_path"] == str(cache[PLANNED])
    assert "from the registry" in m["source"] and m["torch_perplexity"] is None
    rows = {r["quant"]: r for r in m["rows"]}
    assert list(rows) == ["Q8_0", "Q4_K_M"]                      # most bits first
    assert rows["Q4_K_M"]["bytes"] < rows["Q8_0"]["bytes"]
    assert "Q8_0" in rows["Q8_0"]["tensor_types"] and rows["Q4_K_M"]["tensor_types"] != rows["Q8_0"]["tensor_types"]
    assert all(r["prompt_tokens_per_s"] > 0 and r["gen_tokens_per_s"] > 0 for r in rows.values())
    # The same text, the same tokens: both files are the same model, 4 bits off 8 by a few percent at most.
    assert rows["Q8_0"]["perplexity"] > 1 and abs(rows["Q4_K_M"]["perplexity_vs_first"]) < 0.1
    [absent] = m["not_here"]
    assert absent["name"] == ABSENT and absent["fetch"].startswith(f"tierkit data fetch {ABSENT} (")
    readme = (folder / "README.md").read_text()
    assert f"`tierkit data fetch {ABSENT} (" in readme and "| Q4_K_M |" in readme and PLANNED in readme


def test_a_registry_name_where_a_gguf_path_goes(home, cache):
    proc = _run(home, "--size", "char-10.7M", "--set", f"gguf={SIBLING}", "--set", "siblings=false")
    assert proc.returncode == 0, proc.stderr
    m = json.loads((home / "builds" / "B16-llama-cpp" / "metrics.json").read_text())["metrics"]
    assert m["model"] == SIBLING and m["model_path"] == str(cache[SIBLING])
    assert [r["quant"] for r in m["rows"]] == ["Q4_K_M"] and m["not_here"] == []


def test_missing_registry_gguf_is_one_line_naming_the_fetch(home, tmp_path, monkeypatch):
    hub_env(monkeypatch, tmp_path / "empty-hf")
    proc = _run(home, "--size", "tinyllama-1.1b-Q8_0")
    assert_one_line_error(proc, f"tierkit data fetch {PLANNED}")
    proc = _run(home, "--size", "char-10.7M", "--set", f"gguf={PLANNED}")
    assert_one_line_error(proc, f"tierkit data fetch {PLANNED}")
    proc = _run(home, "--size", "char-10.7M", "--set", "gguf=gpt2")
    assert_one_line_error(proc, "gpt2 is a registry model, not a GGUF file")
    assert not (home / "builds" / "B16-llama-cpp").exists()


# ---------------------------------------------------------------- a Hugging Face Llama, converted

@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> tuple[Path, Path]:
    """(the tiny Llama's folder, its GGUF): weights scaled up so that greedy choices are clear-cut."""
    from tests.hf_fixtures import tiny_model, train_tokenizer

    tmp = tmp_path_factory.mktemp("hfllama")
    tok = train_tokenizer(chat=True)
    model = tiny_model("llama", len(tok), seed=3)
    with torch.no_grad():
        model.lm_head.weight.mul_(8)
    snap = tiny_checkpoint(tmp / "hf", "tests/tiny-llama", "llama", model=model, tokenizer=tok)
    return snap, hf_llama_to_gguf(snap, tmp / "tiny-llama-f32.gguf")


def test_converted_hf_llama_gives_transformers_logits_in_llamacpp(converted):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    snap, path = converted
    tok = AutoTokenizer.from_pretrained(snap)
    model = AutoModelForCausalLM.from_pretrained(snap).eval()
    text = "ROMEO:\nWhat say you, my lord?"
    ids = tok(text)["input_ids"]
    with b16.Engine(path, EXACT) as eng:
        assert eng.tokenize(text) == ids                        # the same BPE, merges and pre-tokenizer
        assert eng.detokenize(ids) == text
        logits = eng.decode(ids, all_logits=True)
        got = eng.greedy(ids, 16)
        assert eng.describe()["params"] == sum(p.numel() for p in model.parameters())
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0].numpy()
        want = model.generate(torch.tensor([ids]), max_new_tokens=16, min_new_tokens=16, do_sample=False,
                              pad_token_id=0)[0, len(ids):].tolist()
    assert np.abs(logits - ref).max() < 1e-3 * max(1.0, np.abs(ref).max())
    assert got == want


def test_converted_hf_llama_through_b16_quantised_and_scored(home, converted):
    _, path = converted
    proc = _run(home, "--size", "char-10.7M", "--set", f"gguf={path}")
    assert proc.returncode == 0, proc.stderr
    m = json.loads((home / "builds" / "B16-llama-cpp" / "metrics.json").read_text())["metrics"]
    assert m["source"] == f"your GGUF {path} (--set gguf)" and m["gguf"]["architecture"] == "llama"
    rows = {r["quant"]: r for r in m["rows"]}
    assert list(rows) == ["F32", "Q8_0", "Q4_0"]
    assert abs(rows["Q8_0"]["perplexity"] / rows["F32"]["perplexity"] - 1) < 0.01

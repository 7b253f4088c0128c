"""B16: our llama-flavour GPT exported to GGUF runs in llama.cpp exactly as in torch; quantised, timed, scored.

A tiny llama-flavour model (2 layers, 64 wide, GQA 4 query / 2 key-value heads) is
trained for a few seconds on Tiny Shakespeare, so its greedy continuations are not
degenerate, then exported with models.gguf_export. Checked: llama.cpp's greedy tokens
equal torch's; its F32 perplexity equals torch's; Q8_0 stays within 1% of F32; the
char vocabulary round-trips through llama.cpp's own tokenizer (non-ASCII included);
stories260K (a real llama2.c GGUF) loads and generates; bad files give one clear line;
and B16 runs through `tierkit run` on a user GGUF and on a B12 checkpoint.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("llama_cpp")
pytest.importorskip("gguf")

from models.gguf_export import ExportError, byte_level, export_gguf, gguf_summary
from models.gpt import GPT, GPTConfig, save_checkpoint
from tests.conftest import SHARED, assert_one_line_error, run_cli
from tiers.tier2 import b16_llamacpp as b16

DATA = SHARED / "data"
SHAKESPEARE = DATA / "tinyshakespeare.txt"
STORIES = DATA / "stories260K.gguf"
KIT = "laptop-8gb-cpu"
SIZE = "tinyllama-1.1b-Q4_K_M"
OWN_SIZE = "char-10.7M"     # model: b12, your B12 model exported to GGUF
# One llama.cpp thread: on a shared machine its threads spin-wait for each other and a run takes minutes.
ENV = {"TIERKIT_DATA": str(DATA), "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "TIERKIT_B16_THREADS": "1"}
EXACT = b16.Settings(n_threads=1, n_threads_batch=1, n_ctx=256, n_batch=64, n_ubatch=64, n_gpu_layers=0,
                     kv_type="f32")

needs_text = pytest.mark.skipif(not SHAKESPEARE.exists(), reason=f"{SHAKESPEARE} missing (the shared test data)")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(model, tokenizer, F32 GGUF path, held-out ids): trained ~150 steps, exported once for the module."""
    if not SHAKESPEARE.exists():
        pytest.skip(f"{SHAKESPEARE} missing (the shared test data)")
    from models.tokenizers import CharTokenizer
    from tiers.tier2 import b12_pretrain as b12
    from tiers.tier2 import common

    torch.set_num_threads(1)
    text = SHAKESPEARE.read_text(encoding="utf-8")
    tok = CharTokenizer(text)
    train_ids, val_ids = common.split_ids(tok.encode(text))
    cfg = GPTConfig(vocab_size=tok.vocab_size, block_size=64, n_layer=2, n_head=4, n_kv_head=2, n_embd=64,
                    arch="llama", dropout=0.0, tie_weights=True)
    model = GPT(cfg, seed=0)
    tc = common.TrainConfig(steps=150, lr=3e-3, min_lr=3e-4, warmup=10, eval_interval=0, seed=0)
    b12.train(model, tc, lambda g: common.random_batch(train_ids, 64, 16, g), device=torch.device("cpu"),
              log=lambda *a: None)
    model.eval()
    path = export_gguf(model, tok, tmp_path_factory.mktemp("gguf") / "tiny-f32.gguf")
    return model, tok, path, val_ids[:2049]


# ---------------------------------------------------------------- the export is exact

def test_greedy_tokens_match_torch(trained):
    model, tok, path, _ = trained
    prompt = tok.encode("ROMEO:\nWhat say")
    with torch.no_grad():
        want = model.generate(torch.tensor([prompt]), 32, temperature=0)[0, len(prompt):].tolist()
    with b16.Engine(path, EXACT) as eng:
        got = eng.greedy(prompt, 32)
        eng.clear()
        logits = eng.decode(prompt, all_logits=True)
    assert got == want, (tok.decode(got), tok.decode(want))
    assert len(set(want)) > 3, f"degenerate continuation {tok.decode(want)!r}: the test model did not train"
    with torch.no_grad():
        ref = model(torch.tensor([prompt]), torch.tensor([prompt]))[0][0].numpy()
    assert np.abs(logits - ref).max() < 1e-4


def test_perplexity_f32_equals_torch_and_q8_within_1pct(trained, tmp_path):
    from tiers.tier2 import common

    model, _, path, val = trained
    torch_ppl = common.perplexity(model, val, 64)
    ppl = {}
    for q in ("F32", "Q8_0", "Q4_0"):
        p = path if q == "F32" else b16.quantize(path, tmp_path / f"m-{q}.gguf", q, threads=1)
        with b16.Engine(p, EXACT) as eng:
            ppl[q] = b16.perplexity(eng, val.tolist(), 64)
    assert abs(ppl["F32"] / torch_ppl - 1) < 1e-4, (ppl, torch_ppl)
    assert abs(ppl["Q8_0"] / ppl["F32"] - 1) < 0.01, ppl
    assert ppl["Q4_0"] > ppl["F32"] * 0.99 and ppl["Q4_0"] < ppl["F32"] * 1.5, ppl   # 4 bits cost something, not all
    assert ppl["F32"] < tok_unigram_ppl(val), ppl


def tok_unigram_ppl(ids) -> float:
    from tiers.tier2 import common

    return float(np.exp(common.unigram_entropy(torch.as_tensor(ids))))


def test_quantised_files_hold_the_quantised_types(trained, tmp_path):
    _, _, path, _ = trained
    s8 = gguf_summary(b16.quantize(path, tmp_path / "q8.gguf", "Q8_0", threads=1))
    s4 = gguf_summary(b16.quantize(path, tmp_path / "q4.gguf", "Q4_0", threads=1))
    f32 = gguf_summary(path)
    assert f32["tensor_types"] == {"F32": f32["tensor_types"]["F32"]}
    assert s8["tensor_types"].get("Q8_0", 0) >= 14 and s4["tensor_types"].get("Q4_0", 0) >= 13
    assert s4["bytes"] < s8["bytes"] < f32["bytes"] / 3
    assert not list(tmp_path.glob(".*tmp"))


def test_vocabulary_round_trips_through_llamacpp_tokenizer(trained):
    _, tok, path, _ = trained
    text = "First Citizen:\nBefore we proceed any further, hear me speak."
    with b16.Engine(path, EXACT) as eng:
        assert eng.tokenize(text) == tok.encode(text)          # no BOS: add_bos_token is false
        assert eng.detokenize(tok.encode(text)) == text


def test_non_ascii_characters_get_merges(tmp_path):
    """'é' (2 UTF-8 bytes) and '€' (3) are single tokens; llama.cpp's tokenizer finds them through the merges."""
    chars = list("\n abé€z")
    tokens, merges = byte_level(chars)
    assert tokens[0] == "Ċ" and tokens[1] == "Ġ" and len(merges) == 3   # é: 1 merge, €: 2
    cfg = GPTConfig(vocab_size=len(chars), block_size=32, n_layer=1, n_head=2, n_embd=32, arch="llama")
    path = export_gguf(GPT(cfg, seed=1), chars, tmp_path / "u.gguf")
    with b16.Engine(path, EXACT) as eng:
        ids = eng.tokenize("a é€\nz")
        assert ids == [chars.index(c) for c in "a é€\nz"]
        assert eng.detokenize(ids) == "a é€\nz"


def test_ascii_vocabulary_gets_a_placeholder_merge():
    tokens, merges = byte_level(list("ab c"))
    assert tokens == ["a", "b", "Ġ", "c"] and merges == ["<no-merges>"]


def test_vocab_size_mismatch_is_refused(tmp_path):
    m = GPT(GPTConfig(vocab_size=12, block_size=16, n_layer=1, n_head=2, n_embd=16, arch="llama"), seed=0)
    with pytest.raises(ExportError, match="12"):
        export_gguf(m, {"kind": "char", "chars": "abcdefghij"}, tmp_path / "x.gguf")
    assert not list(tmp_path.iterdir())


# ---------------------------------------------------------------- any GGUF

@pytest.mark.skipif(not STORIES.exists(), reason=f"{STORIES} missing (the shared test data)")
def test_stories260k_loads_and_generates():
    info = gguf_summary(STORIES)
    assert info["architecture"] == "llama" and info["n_vocab"] == 512 and info["params"] == 292_800
    with b16.Engine(STORIES, EXACT) as eng:
        ids = eng.tokenize("Once upon a time")
        assert ids[0] == 1                                        # SentencePiece model: BOS first
        out = eng.greedy(ids, 24)
        text = eng.detokenize(out)
        sp = b16.time_speed(eng, ids * 4, 8, 2)
    assert len(set(out)) > 5 and sum(c.isalpha() for c in text) > 20, text
    assert sp["prompt_tokens_per_s"] > 0 and sp["gen_tokens_per_s"] > 0 and len(sp["gen_tokens_per_s_all"]) == 2


def test_missing_and_corrupt_gguf_give_one_line(tmp_path):
    with pytest.raises(ValueError, match="does not exist; set TIERKIT_B16_GGUF"):
        b16.check_gguf(tmp_path / "nope.gguf")
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"PK\x03\x04" + b"\0" * 100)
    with pytest.raises(ValueError, match="not a GGUF file"):
        b16.Engine(junk, EXACT)
    if STORIES.exists():
        cut = tmp_path / "cut.gguf"
        cut.write_bytes(STORIES.read_bytes()[:4096])             # the header survives, the tensors do not
        with pytest.raises(ValueError) as e:
            b16.Engine(cut, EXACT)
        assert "llama.cpp cannot load" in str(e.value) and "\n" not in str(e.value)
        with pytest.raises(ValueError) as e:
            gguf_summary(cut)
        assert "not a readable GGUF" in str(e.value) and "\n" not in str(e.value)


# ---------------------------------------------------------------- through the runner

def _run_b16(home: Path, size: str = SIZE, **env: str) -> tuple[Path, dict]:
    proc = run_cli("run", "B16", "--size", size, "--profile", KIT, home=home, env={**ENV, **env}, timeout=300)
    assert proc.returncode == 0, proc.stderr
    folder = home / "builds" / "B16-llama-cpp"
    return folder, json.loads((folder / "metrics.json").read_text())


def _check_build(folder: Path, m: dict) -> None:
    from tests.test_runner import assert_png

    names = {p.name for p in folder.iterdir()}
    assert {"README.md", "metrics.json", "tokens_per_s.png"} <= names
    assert_png(folder / "tokens_per_s.png")
    readme = (folder / "README.md").read_text()
    for needle in ("## Speed and perplexity per quantisation", "| Q8_0 |", "| Q4_0 |", "n_gpu_layers 0",
                   "threads", "(tokens_per_s.png)"):
        assert needle in readme, needle
    rows = m["metrics"]["rows"]
    assert [r["quant"] for r in rows] == ["F32", "Q8_0", "Q4_0"]
    assert all(r["prompt_tokens_per_s"] > 0 and r["gen_tokens_per_s"] > 0 for r in rows)
    assert abs(rows[1]["perplexity"] / rows[0]["perplexity"] - 1) < 0.01
    s = m["metrics"]["settings"]
    assert s["n_gpu_layers"] == 0 and s["n_threads"] == 1 and s["n_batch"] == 512


def test_b16_cli_on_a_user_gguf(trained, home):
    _, _, path, _ = trained
    folder, m = _run_b16(home, TIERKIT_B16_GGUF=str(path))
    _check_build(folder, m)
    assert "TIERKIT_B16_GGUF" in m["metrics"]["source"] and m["metrics"]["torch_perplexity"] is None


def test_b16_cli_exports_the_b12_checkpoint(trained, home):
    model, tok, _, _ = trained
    save_checkpoint(home / "builds" / "B12-pretraining" / "ckpt.pt", model, meta={"tokenizer": tok.meta()})
    folder, m = _run_b16(home, OWN_SIZE)
    _check_build(folder, m)
    met = m["metrics"]
    assert met["source"].startswith("B12 checkpoint") and (folder / "model-f32.gguf").is_file()
    assert abs(met["rows"][0]["perplexity"] / met["torch_perplexity"] - 1) < 1e-3   # F32 in llama.cpp == torch


def test_b16_cli_missing_gguf_is_one_line(home):
    proc = run_cli("run", "B16", "--size", SIZE, "--profile", KIT, home=home,
                   env={**ENV, "TIERKIT_B16_GGUF": str(home / "missing.gguf")}, timeout=120)
    assert_one_line_error(proc, "missing.gguf", "TIERKIT_B16_GGUF")
    assert not (home / "builds" / "B16-llama-cpp").exists()

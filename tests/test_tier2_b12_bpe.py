"""B12's GPT-2 BPE rungs: the registry's TinyStories, tokenised once into uint16 files, batches read from them.

The text is TinyStories' own format (stories ended by <|endoftext|>), generated here
from templates and placed in a temporary Hugging Face cache as the `tinystories`
entry's file, so `data.require("tinystories")` finds it as it finds a real download.
GPT-2's BPE comes from the local gpt2.tiktoken in ../shared/data. The rung is the
smallest BPE one (30M, vocabulary 50,304) with its model and steps shrunk by --set,
run on a profile with room for the rung's planned size (the plan prices 30M; --set
makes it small enough for a test).
"""
from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import yaml

pytest.importorskip("torch")
pytest.importorskip("tiktoken")

from tests.conftest import REPO, SHARED, assert_one_line_error, run_cli
from tests.hf_fixtures import hub_env, put_in_cache

TOKENIZERS = SHARED / "data" / "tokenizers"
pytestmark = pytest.mark.skipif(not (TOKENIZERS / "gpt2.tiktoken").exists(),
                                reason=f"gpt2.tiktoken is not in {TOKENIZERS} (the shared test data)")
ENV = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
       "TIERKIT_TIKTOKEN_DIR": str(TOKENIZERS)}
SMALL = ["--size", "30M", "--set", "n_layer=1", "--set", "n_head=2", "--set", "n_embd=32", "--set", "block_size=32",
         "--set", "batch_size=4", "--set", "steps=60", "--set", "lr=1e-2", "--set", "min_lr=1e-3", "--set", "warmup=10",
         "--set", "eval_iters=5", "--set", "eval_interval=30", "--set", "sample_interval=0", "--set", "sample_tokens=12",
         "--set", "heldout_tokens=2048"]


def stories(n: int, seed: int = 0) -> str:
    """n short stories from templates, each ended by <|endoftext|> on its own line, as TinyStories writes them."""
    r = random.Random(seed)
    names, pets = ["Lily", "Tom", "Sue", "Max", "Anna", "Ben", "Mia", "Sam"], ["dog", "cat", "bird", "fish", "bunny"]
    places, feel = ["park", "garden", "beach", "forest", "school"], ["happy", "sad", "tired", "excited", "scared"]
    things = ["ball", "kite", "book", "hat", "cake"]
    out = []
    for _ in range(n):
        a, b = r.sample(names, 2)
        p, pl, f, t = r.choice(pets), r.choice(places), r.choice(feel), r.choice(things)
        out.append(f"Once upon a time, there was a little girl named {a}. {a} had a {p}. One day, {a} and the {p} "
                   f"went to the {pl}. They found a big {t}. {a} was very {f}. {b} came to the {pl} too. "
                   f"\"Can I play with the {t}?\" asked {b}. \"Yes!\" said {a}. They played with the {t} all day. "
                   f"The {p} was {f} too. The end.")
    return "".join(s + "\n<|endoftext|>\n" for s in out)


def gpt2():
    from models.tokenizers import tiktoken_encoding

    return tiktoken_encoding("gpt2", TOKENIZERS / "gpt2.tiktoken")


# ---------------------------------------------------------------- tokenised once, on disk

def test_token_files_hold_each_story_then_eot_and_are_reused(tmp_path, monkeypatch):
    import torch

    from tiers.tier2 import common, tokenised

    text = tmp_path / "stories.txt"
    text.write_text(stories(40))
    enc = gpt2()
    want = [t for s in stories(40).split("\n<|endoftext|>\n")[:-1] for t in [*enc.encode_ordinary(s), 50256]]
    monkeypatch.setenv("TIERKIT_TIKTOKEN_DIR", str(TOKENIZERS))
    first = tokenised.prepare(text, tmp_path / "root", val_frac=0.1, log=lambda s: None)
    assert not first.reused and first.tokens == len(want)
    got = np.concatenate([np.asarray(first.train.ids), np.asarray(first.val.ids)]).tolist()
    assert got == want
    assert len(first.val) == -(-len(want) // 10) and first.train[0:5].tolist() == want[:5]
    assert first.train[0:5].dtype == torch.long and first.train.ids.dtype == np.uint16
    stamp = (first.folder / "train.bin").stat().st_mtime_ns
    again = tokenised.prepare(text, tmp_path / "root", log=lambda s: None)
    assert again.reused and again.folder == first.folder and (again.folder / "train.bin").stat().st_mtime_ns == stamp
    # An interrupted tokenisation leaves no meta.json: it is done again.
    (first.folder / "meta.json").unlink()
    assert not tokenised.prepare(text, tmp_path / "root", log=lambda s: None).reused
    # A changed text is a new key, so new files.
    text.write_text(stories(41))
    changed = tokenised.prepare(text, tmp_path / "root", log=lambda s: None)
    assert not changed.reused and changed.folder != first.folder
    assert not list(first.folder.glob(".*.tmp"))
    # The unigram baseline read from the file equals common's, computed in memory.
    ids = torch.tensor(np.asarray(first.train.ids), dtype=torch.long)
    assert first.train.unigram_entropy() == pytest.approx(common.unigram_entropy(ids), rel=1e-9)


def test_random_batches_read_windows_of_the_file(tmp_path):
    import torch

    from tiers.tier2 import common, tokenised

    path = tmp_path / "ids.bin"
    np.arange(1000, dtype=np.uint16).tofile(path)
    x, y = common.random_batch(tokenised.TokenFile(path), 16, 5, torch.Generator().manual_seed(0))
    assert x.shape == (5, 16) and x.dtype == torch.long
    assert torch.equal(y, x + 1) and torch.equal(x[:, 1:] - x[:, :-1], torch.ones(5, 15, dtype=torch.long))


def test_json_lines_are_one_document_each(tmp_path, monkeypatch):
    monkeypatch.setenv("TIERKIT_TIKTOKEN_DIR", str(TOKENIZERS))
    from tiers.tier2 import tokenised

    (tmp_path / "web").mkdir()
    (tmp_path / "web" / "a.jsonl").write_text("".join(json.dumps({"text": f"Page {i}: some web text."}) + "\n"
                                                      for i in range(30)))
    t = tokenised.prepare(tmp_path / "web", tmp_path / "root", log=lambda s: None)
    ids = np.concatenate([np.asarray(t.train.ids), np.asarray(t.val.ids)])
    want = [t for i in range(30) for t in [*gpt2().encode_ordinary(f"Page {i}: some web text."), 50256]]
    assert ids.tolist() == want
    # A folder of plain-text pages (OpenWebText's layout): each file is one document, EOT after each.
    for i in range(3):
        (tmp_path / "pages" / "sub").mkdir(parents=True, exist_ok=True)
        (tmp_path / "pages" / "sub" / f"{i:04d}.txt").write_text(f"Web page number {i}.\nIts last line.\n")
    t = tokenised.prepare(tmp_path / "pages", tmp_path / "root", log=lambda s: None)
    ids = np.concatenate([np.asarray(t.train.ids), np.asarray(t.val.ids)]).tolist()
    assert ids == [t for i in range(3) for t in [*gpt2().encode_ordinary(f"Web page number {i}.\nIts last line.\n"),
                                                 50256]]


# ---------------------------------------------------------------- B12 through the CLI

@pytest.fixture
def roomy_profile(tmp_path) -> Path:
    """The 8 GB laptop kit with room for the 30M rung's planned size (the run itself is shrunk by --set)."""
    d = yaml.safe_load((REPO / "profiles" / "laptop-8gb-cpu.yaml").read_text())
    d["name"] = "roomy-cpu"
    d["memory"].update(total_bytes=256 << 30, available_bytes=200 << 30)
    d["cpu"]["matmul_gflops"]["fp32"]["value"] = 100_000.0
    path = tmp_path / "roomy.yaml"
    path.write_text(yaml.safe_dump(d))
    return path


@pytest.fixture
def tinystories_cache(tmp_path, monkeypatch) -> Path:
    """A Hugging Face cache holding the `tinystories` entry's file (generated stories, the same format)."""
    from tiers import data

    entry = data.get("tinystories")
    src = tmp_path / "src"
    src.mkdir()
    (src / entry.target).write_text(stories(2500))
    cache = tmp_path / "hf"
    put_in_cache(cache, entry.repo_id, src, kind=f"{entry.repo_type}s")
    hub_env(monkeypatch, cache)
    monkeypatch.setenv("TIERKIT_DATA", str(tmp_path / "data"))
    return cache


def _b12(home: Path, profile: Path, *args: str):
    return run_cli("run", "B12", *SMALL, *args, "--profile", str(profile), "--out", str(home / "builds"), home=home,
                   env=ENV, timeout=300)


def test_b12_gpt2_bpe_on_tinystories_beats_the_unigram_baseline(home, roomy_profile, tinystories_cache, tmp_path):
    proc = _b12(home, roomy_profile)
    assert proc.returncode == 0, proc.stderr
    build = home / "builds" / "B12-pretraining"
    m = json.loads((build / "metrics.json").read_text())["metrics"]
    assert m["dataset"] == "tinystories" and m["tokenizer"] == "gpt2" and m["model_vocab"] == 50304
    assert m["vocab_size"] == 50257 and m["data"].startswith("TinyStories")
    assert m["final_val_loss"] < m["unigram_baseline"] < m["uniform_baseline"]
    assert m["val_loss_full"] < m["unigram_baseline"] and m["val_tokens_scored"] == 2048
    t = m["tokenised"]
    assert t["reused"] is False and Path(t["folder"]).parent == tmp_path / "data" / "tokenised"
    assert "TinyStories" in (build / "README.md").read_text()
    train_bin = Path(t["folder"]) / "train.bin"
    stamp = train_bin.stat().st_mtime_ns
    assert train_bin.stat().st_size == 2 * m["train_tokens"]
    # A second run reads the same files: nothing is tokenised again.
    proc = _b12(home, roomy_profile, "--set", "steps=2")
    assert proc.returncode == 0, proc.stderr
    m2 = json.loads((build / "metrics.json").read_text())["metrics"]
    assert m2["tokenised"]["reused"] is True and m2["tokenised"]["folder"] == t["folder"]
    assert m2["tokenize_seconds"] == 0.0 and train_bin.stat().st_mtime_ns == stamp


def test_b12_without_tinystories_names_the_fetch(home, roomy_profile, tmp_path, monkeypatch):
    hub_env(monkeypatch, tmp_path / "empty-hf")
    monkeypatch.setenv("TIERKIT_DATA", str(tmp_path / "data"))
    proc = _b12(home, roomy_profile)
    assert_one_line_error(proc, "tierkit data fetch tinystories")
    assert not (home / "builds" / "B12-pretraining").exists() and not (tmp_path / "data" / "tokenised").exists()


def test_b12_on_the_web_text_sample_reads_one_page_per_file(home, roomy_profile, tmp_path, monkeypatch):
    """openwebtext-sample unpacks to a folder of .txt pages: each page is a document, EOT after it."""
    from tiers import data

    pages = tmp_path / "data" / data.get("openwebtext-sample").extract / "pages"
    pages.mkdir(parents=True)
    for i, story in enumerate(stories(300, seed=2).split("\n<|endoftext|>\n")[:-1]):
        (pages / f"{i:05d}.txt").write_text(f"Page {i}.\n{story}\n")
    monkeypatch.setenv("TIERKIT_DATA", str(tmp_path / "data"))
    proc = _b12(home, roomy_profile, "--size", "124M", "--set", "steps=4")
    assert proc.returncode == 0, proc.stderr
    m = json.loads((home / "builds" / "B12-pretraining" / "metrics.json").read_text())["metrics"]
    assert m["dataset"] == "openwebtext-sample" and m["data"].startswith("OpenWebText")
    assert m["train_config"]["grad_accum"] == 8                  # the 124M size's, shrunk by --set
    folder = Path(m["tokenised"]["folder"])
    ids = np.concatenate([np.fromfile(folder / "train.bin", np.uint16), np.fromfile(folder / "val.bin", np.uint16)])
    assert (ids == 50256).sum() == 300 and ids[-1] == 50256 and m["tokens"] == len(ids)


def test_gpt2_tokens_on_the_char_rung_report_the_model_that_ran(home, tmp_path):
    """`--set tokenizer=gpt2` on a character rung: the model's vocabulary is GPT-2's (padded to 50,304),
    its samples never hold a padding id that the tokenizer cannot decode, and the build README's config
    says what ran while its prediction says which planned setting it was made for."""
    proc = run_cli("run", "B12", "--size", "28K", "--set", "tokenizer=gpt2", "--set", "steps=3",
                   "--set", "eval_iters=2", "--set", "sample_tokens=400", "--set", "temperature=1.0",
                   "--set", "top_k=null", "--profile", "laptop-8gb-cpu", "--out", str(home / "builds"),
                   home=home, env={**ENV, "TIERKIT_DATA": str(SHARED / "data")}, timeout=300)
    assert proc.returncode == 0, proc.stderr
    build = home / "builds" / "B12-pretraining"
    doc = json.loads((build / "metrics.json").read_text())
    assert doc["metrics"]["model_vocab"] == 50304 and doc["config"]["vocab_size"] == 50304
    readme = (build / "README.md").read_text()
    assert '"vocab_size": 50304' in readme
    assert "The prediction is for the planned vocab_size 65 (this run: 50,304)" in readme


def test_generate_samples_only_ids_the_tokenizer_has():
    import torch

    from models.gpt import GPT, GPTConfig

    model = GPT(GPTConfig(vocab_size=64, block_size=64, n_layer=1, n_head=2, n_embd=16), seed=0).eval()
    idx = torch.zeros((2, 1), dtype=torch.long)
    out = model.generate(idx, 40, temperature=1.0, n_tokens=10, generator=torch.Generator().manual_seed(0))
    assert int(out[:, 1:].max()) < 10
    # without the limit, 54 of 64 near-uniform ids are beyond it: drawn at once
    out = model.generate(idx, 40, temperature=1.0, generator=torch.Generator().manual_seed(0))
    assert int(out[:, 1:].max()) >= 10

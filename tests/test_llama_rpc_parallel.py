"""llama-rpc's parallel sequences: several requests decoded in one llama.cpp context, one llama_batch a step.

    LlamaRpcEngine(stories260K.gguf, one stage, parallel=P).generate() from several threads
        -> each request's greedy tokens == llama-cpp-python's Llama.generate on the same prompt, alone
        -> more requests than P all complete (first come, first served); a closed stream frees its sequence
"""
from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import SHARED, assert_one_line_error, run_cli
from tests.gguf_fixtures import greedy_tokens
from tiers.tier3.engine import EngineError, Sampling

MODEL = Path(os.environ.get("TIERKIT_DATA", SHARED / "data")) / "stories260K.gguf"
PROMPTS = ["Once upon a time", "The dog", "Tom and Sue went to the park and saw a big red ball on the grass", "One day",
           "Lily wanted to play with her friend Ben, but he was sad because his toy was broken", "Mom said"]

pytestmark = pytest.mark.skipif(not MODEL.exists(), reason=f"{MODEL} is missing (the shared data folder)")

_REF: dict[tuple[str, int], list[int]] = {}


@pytest.fixture(scope="module")
def ref_llm():
    import llama_cpp

    llm = llama_cpp.Llama(str(MODEL), n_ctx=512, n_threads=1, verbose=False)
    yield llm
    llm.close()


EXACT = 40   # tokens every batched request must share with its single-request run


def same_greedy(got: dict[int, list[int]], refs: list[list[int]]) -> None:
    """Batched greedy == alone: the first EXACT tokens of every request exactly, and all tokens of most.

    llama.cpp computes a batch with other kernels than one token (a matrix-matrix product that sums
    in another order), so late in a long greedy run a near-tie between two tokens can flip, as it
    can in llama.cpp's own server with -np; the tokens before it are identical."""
    for i, ref in enumerate(refs):
        assert got[i][:EXACT] == ref[:EXACT], (i, got[i][:EXACT], ref[:EXACT])
    whole = sum(got[i] == ref for i, ref in enumerate(refs))
    assert whole >= len(refs) - 1, f"only {whole} of {len(refs)} requests equal to their single run throughout"


def reference(llm, prompt: str, n: int) -> list[int]:
    """Greedy tokens from llama-cpp-python alone (one sequence, its own context)."""
    if (prompt, n) not in _REF:
        _REF[(prompt, n)] = greedy_tokens(llm, prompt, n)
    return _REF[(prompt, n)]


def engine(parallel: int, n_ctx: int = 2048):
    from tiers.tier3.llama_rpc import LlamaRpcEngine

    e = LlamaRpcEngine(str(MODEL), [{"host": "127.0.0.1", "port": 0, "layers": [0, 5]}], n_ctx=n_ctx, threads=1,
                       parallel=parallel)
    e.start()
    return e


def run_all(e, jobs: list[tuple[str, int, float]]) -> dict[int, list[int]]:
    """Each (prompt, max_tokens, start delay) from its own thread; {index: token ids} (or the error)."""
    got: dict[int, object] = {}

    def one(i: int, prompt: str, n: int, delay: float) -> None:
        time.sleep(delay)
        try:
            got[i] = [t for p in e.generate(e.tokenize(prompt), Sampling(max_tokens=n, temperature=0))
                      for t in p.token_ids]
        except BaseException as exc:  # noqa: BLE001 - reported below, with the others
            got[i] = repr(exc)

    threads = [threading.Thread(target=one, args=(i, *job)) for i, job in enumerate(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    return got


def test_staggered_concurrent_greedy_requests_equal_each_served_alone(ref_llm):
    e = engine(parallel=4)
    try:
        jobs = [(p, 60 + 20 * i, 0.003 * i) for i, p in enumerate(PROMPTS)]
        got = run_all(e, jobs)
        same_greedy(got, [reference(ref_llm, p, n) for p, n, _ in jobs])
        b = e.stats()["batching"]
        assert b["max_batch"] >= 2 and b["mean_batch"] > 1, b   # they did share steps
        assert b["mixed_steps"] >= 1, b                          # a prompt rode along with decoding tokens
        assert e.stats()["parallel"] == {"slots": 4, "in_use": 0, "waiting": 0, "context_tokens": 2048,
                                         "context_reserved": 0}
    finally:
        e.close()


def test_more_requests_than_sequences_all_complete_in_arrival_order(ref_llm):
    e = engine(parallel=2)
    try:
        jobs = [(PROMPTS[i % len(PROMPTS)], 40, 0.0) for i in range(10)]
        got = run_all(e, jobs)
        same_greedy(got, [reference(ref_llm, p, n) for p, n, _ in jobs])
        s = e.stats()
        assert s["batching"]["max_batch"] == 2 and s["requests"] == 10 and s["parallel"]["in_use"] == 0
    finally:
        e.close()


def test_the_context_is_shared_one_request_may_use_all_of_it(ref_llm):
    e = engine(parallel=4, n_ctx=256)
    try:
        # Each needs ~205 of the 256 cells: they are served one after the other, never together.
        got = run_all(e, [(p, 200, 0.0) for p in PROMPTS[:2]])
        assert [got[0], got[1]] == [reference(ref_llm, p, 200) for p in PROMPTS[:2]]
        assert e.stats()["batching"]["max_batch"] == 1
        with pytest.raises(EngineError, match="exceeds the context of 256 tokens"):
            e.generate(e.tokenize("Once"), Sampling(max_tokens=256, temperature=0))
    finally:
        e.close()


def test_a_cancelled_stream_frees_its_sequence(ref_llm):
    e = engine(parallel=1)
    try:
        gen = e.generate(e.tokenize("Tom and Sue"), Sampling(max_tokens=400, temperature=0))
        for i, _ in enumerate(gen):
            if i == 3:
                break
        gen.close()     # what the server does when the client hangs up
        got = run_all(e, [("The dog", 12, 0.0)])
        assert got[0] == reference(ref_llm, "The dog", 12)
        deadline = time.monotonic() + 5
        while e.stats()["parallel"]["in_use"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert e.stats()["parallel"]["in_use"] == 0
    finally:
        e.close()


def test_sampled_requests_follow_their_seed(ref_llm):
    e = engine(parallel=4)
    try:
        def draw(seed: int) -> list[int]:
            s = Sampling(max_tokens=30, temperature=1.0, seed=seed)
            return [t for p in e.generate(e.tokenize("Once upon a time"), s) for t in p.token_ids]

        assert draw(7) == draw(7)
        assert draw(7) != draw(8)
    finally:
        e.close()


def test_bad_parallel_is_one_line(home):
    from tiers.tier3.llama_rpc import LlamaRpcEngine
    from tiers.tier3.serve import ServeError, parse_parallel

    with pytest.raises(EngineError, match="parallel must be a whole number 1-256, not 0"):
        LlamaRpcEngine(str(MODEL), [{"host": "127.0.0.1", "port": 0, "layers": [0, 5]}], parallel=0)
    assert parse_parallel(None) is None and parse_parallel("8") == 8
    for bad in ("0", "two", "1.5", "999"):
        with pytest.raises(ServeError) as err:
            parse_parallel(bad)
        assert err.value.code == 2 and "--parallel 4" in str(err.value)
    for bad in ("0", "two"):
        assert_one_line_error(run_cli("serve", str(MODEL), "--parallel", bad, "--peers", "none", home=home),
                              "--parallel must be a whole number 1-256", f"not '{bad}'")

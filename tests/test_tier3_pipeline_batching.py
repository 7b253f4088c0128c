"""Continuous batching in the `pipeline` engine: real worker processes, real gloo groups, loopback.

    16 staggered requests, 2 stages  -> each equal to GPT.generate alone; micro-batches > 1 request,
                                        two of them in flight at once, fewer steps than tokens
    8 concurrent requests, 1 node     -> batched (steps < tokens), each equal to GPT.generate alone
    a packed stage                    -> the plain model's logits, no second copy of a matrix
    a long prompt while one decodes   -> the prompt goes in chunks; the short request keeps streaming

The engine's own statistics (``stats()["batching"]``) show the batching; timings
are the benchmark's business (bench/), not these tests'.
"""
from __future__ import annotations

import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from models.gpt import GPT
from tests.test_tier3_pipeline import Cluster, reference, tokens
from tiers.tier3.engine import EngineError, Sampling
from tiers.tier3.pipeline import PipelineEngine, resolve


def _requests(n: int, seed: int) -> list[tuple[list[int], int]]:
    """n (prompt, max_tokens) of different lengths: byte ids, prompts 1-60 long, 1-30 new tokens."""
    rng = random.Random(seed)
    return [([rng.randrange(256) for _ in range(rng.randint(1, 60))], rng.randint(1, 30)) for _ in range(n)]


def _run_all(eng: PipelineEngine, reqs: list[tuple[list[int], int]], stagger: float) -> dict[int, list[int]]:
    """Every request in its own thread, the i-th starting i * stagger seconds in; their token ids."""
    def run(i: int) -> list[int]:
        time.sleep(i * stagger)
        return tokens(eng, reqs[i][0], max_tokens=reqs[i][1], temperature=0)

    with ThreadPoolExecutor(len(reqs)) as pool:
        futures = [pool.submit(run, i) for i in range(len(reqs))]
        return {i: f.result(timeout=120) for i, f in enumerate(futures)}   # a request that never finishes fails


@pytest.fixture(scope="module")
def two_stages(tmp_path_factory):
    c = Cluster("random:llama-tiny", [(0, 2), (2, 4)], tmp_path_factory.mktemp("batching"), seed=7,
                prefill_chunk=16)
    try:
        c.start()
        yield c, GPT(resolve("random:llama-tiny").cfg, seed=7).eval()
    except Exception as e:  # noqa: BLE001 - a start failure: show the workers' logs
        raise AssertionError(f"{e}; worker log:\n{c.logs()}") from None
    finally:
        c.close()


def test_sixteen_staggered_requests_through_two_stages_equal_generate_alone(two_stages):
    c, full = two_stages
    eng = c.engine
    reqs = _requests(16, seed=1)
    want = [reference(full, p, n) for p, n in reqs]
    got = _run_all(eng, reqs, stagger=0.01)
    assert [got[i] for i in range(16)] == want   # every response complete, none crossed
    b = eng.stats()["batching"]
    assert b["max_batch"] > 1, b                           # several requests' tokens in one step
    assert b["steps"] < sum(n for _, n in reqs), b         # fewer steps than tokens: they were shared
    assert b["max_micro_batches_in_flight"] >= 2, b        # stage 1 computed one while the head did another
    assert b["prompt_chunks"] > 0


@pytest.fixture()
def one_node():
    def make(**opts) -> PipelineEngine:
        eng = PipelineEngine("random:gpt-tiny", [{"host": "127.0.0.1", "port": 0, "layers": [0, 4]}], seed=3,
                             **opts)
        engines.append(eng)
        eng.start()
        return eng

    engines: list[PipelineEngine] = []
    yield make
    for e in engines:
        e.close()


def test_one_node_batches_concurrent_requests(one_node):
    eng = one_node()
    full = GPT(resolve("random:gpt-tiny").cfg, seed=3).eval()
    reqs = _requests(8, seed=2)
    reqs = [(p, n + 20) for p, n in reqs]   # long enough to overlap
    got = _run_all(eng, reqs, stagger=0.0)
    assert [got[i] for i in range(8)] == [reference(full, p, n) for p, n in reqs]
    b = eng.stats()["batching"]
    assert b["max_batch"] > 1 and b["mean_batch"] > 1, b
    assert b["steps"] < sum(n for _, n in reqs), b


def test_unbatched_is_one_request_per_step(one_node):
    eng = one_node(max_batch=1)
    _run_all(eng, _requests(3, seed=3), stagger=0.0)
    assert eng.stats()["batching"]["max_batch"] == 1


def test_a_burst_of_requests_starts_in_one_step(one_node, monkeypatch):
    """Requests that reach an idle engine together are prefilled together, whole (no one is decoding
    yet, so no prompt is chunked), and then decode in step: every step holds all of them."""
    import tiers.tier3.pipeline.head as head

    monkeypatch.setattr(head, "ARRIVAL_GAP", 0.05)    # a wide window, so a busy CI machine cannot split the burst
    monkeypatch.setattr(head, "ARRIVAL_WAIT", 1.0)
    eng = one_node(prefill_chunk=64)     # 4 x 64 positions while nobody decodes: the six prompts (<= 60 each) fit
    full = GPT(resolve("random:gpt-tiny").cfg, seed=3).eval()
    reqs = [(p, 10) for p, _ in _requests(6, seed=5)]
    streams = [eng.generate(p, Sampling(max_tokens=n, temperature=0)) for p, n in reqs]
    got = [[t for piece in s for t in piece.token_ids] for s in streams]
    assert got == [reference(full, p, n) for p, n in reqs]
    b = eng.stats()["batching"]
    assert b["sizes"] == {"6": 10}, b                  # 1 prefill step + 9 decode steps, all six in each
    assert b["prompt_chunks"] == 6 and b["mixed_steps"] == 0, b


def test_long_prompt_is_chunked_and_does_not_stall_a_decoding_request(one_node):
    eng = one_node(prefill_chunk=8)
    full = GPT(resolve("random:gpt-tiny").cfg, seed=3).eval()
    short, long_prompt = [5, 6, 7], [random.Random(4).randrange(256) for _ in range(200)]
    stream = eng.generate(short, Sampling(max_tokens=150, temperature=0))
    ids = list(next(stream).token_ids)   # the short request is decoding
    long_stream = eng.generate(long_prompt, Sampling(max_tokens=5, temperature=0))   # queued from here on
    queued = time.perf_counter()
    long_first: list[float] = []
    long_ids: list[int] = []

    def read_long() -> None:
        for p in long_stream:
            long_first.append(time.perf_counter())
            long_ids.extend(p.token_ids)

    th = threading.Thread(target=read_long)
    th.start()
    times: list[float] = []
    for p in stream:
        ids += p.token_ids
        times.append(time.perf_counter())
    th.join(timeout=60)
    assert ids == reference(full, short, 150) and long_ids == reference(full, long_prompt, 5)
    b = eng.stats()["batching"]
    assert b["prompt_chunks"] >= 200 // 8 and b["mixed_steps"] > 0, b   # chunks rode along with decode tokens
    # while the long prompt's 25 chunks went in, the short request kept getting tokens (unchunked: one or two)
    assert sum(queued < t < long_first[0] for t in times) >= 12, (len(times), b)


@pytest.mark.parametrize("opt", [{"max_batch": 0}, {"prefill_chunk": "8"}, {"max_inflight": -1}])
def test_bad_batching_options_are_one_line(opt):
    with pytest.raises(EngineError, match=next(iter(opt))):
        PipelineEngine("random:gpt-tiny", [{"host": "127.0.0.1", "port": 0, "layers": [0, 4]}], **opt)


def test_stage_matrices_are_packed_in_place_and_compute_the_same():
    """pack_linears swaps every matrix for one laid out for batched decode, without a second copy:
    the logits of 1, 4 and 12 positions equal the plain model's to float32 rounding."""
    import torch

    from tiers.tier3.pipeline.stage import pack_linears

    cfg = resolve("random:gpt-tiny").cfg
    plain = GPT(cfg, seed=3).eval()
    packed = pack_linears(GPT(cfg, seed=3).eval())
    assert not any(isinstance(m, torch.nn.Linear) for m in packed.modules())
    # the output projection is tied to the embedding: still one matrix, used in place
    assert packed.lm_head.weight.data_ptr() == packed.transformer.wte.weight.data_ptr()
    ids = torch.randint(0, cfg.vocab_size, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for n in (1, 4, 12):
            want = plain.head(plain.blocks(plain.embed(ids[:, :n])))
            got = packed.head(packed.blocks(packed.embed(ids[:, :n])))
            assert got.shape == want.shape and torch.allclose(got, want, rtol=1e-4, atol=1e-4), n
    # a last stage has no embedding: its output projection is packed too
    last = pack_linears(GPT(cfg, layers=range(2, 4), seed=3).eval())
    assert not isinstance(last.lm_head, torch.nn.Linear)
    # not float32 on a CPU: left as it is
    half = pack_linears(GPT(cfg, seed=3).to(torch.bfloat16).eval())
    assert isinstance(half.lm_head, torch.nn.Linear)

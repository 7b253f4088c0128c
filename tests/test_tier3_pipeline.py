"""The `pipeline` engine on loopback: real worker processes, real gloo process groups, real sockets.

Two stages of a small GPT (gpt2 flavour from a tierkit checkpoint, llama flavour from
seeded random weights) must generate exactly what one process generates with
``GPT.generate``; concurrent requests must not cross; a killed worker must turn into
EngineUnavailable quickly (not a hang) and the engine must serve again once the worker
is back. A Hugging Face Llama folder written here by transformers must load by layer
range and give transformers' logits. (Network namespaces, mDNS and the OpenAI client
are tested with the server, in the control-plane tests.)
"""
from __future__ import annotations

import os
import subprocess
import threading
import time
from pathlib import Path

import pytest
import torch

from models.gpt import GPT, GPTConfig, save_checkpoint
from tests.conftest import REPO
from tiers.tier3.engine import EngineError, EngineUnavailable, Sampling
from tiers.tier3.net import free_port
from tiers.tier3.pipeline import PipelineEngine, resolve, worker_args, worker_command, worker_status

TIMEOUT = 10.0   # seconds any wait on a peer may take; a loaded CI machine needs headroom


class Cluster:
    """A head engine in this process and its workers as child processes (as an agent would start them)."""

    def __init__(self, spec: str, bounds: list[tuple[int, int]], log_dir: Path, **opts):
        self.spec, self.opts, self.log_dir = spec, opts, log_dir
        self.stages = [{"host": "127.0.0.1", "port": free_port(), "layers": list(b)} for b in bounds]
        self.procs: dict[int, subprocess.Popen] = {}
        self.engine = PipelineEngine(spec, self.stages, timeout=TIMEOUT, connect_timeout=120, **opts)

    def start_worker(self, rank: int) -> None:
        argv = worker_command(worker_args(self.spec, self.stages, rank, timeout=TIMEOUT, threads=1,
                                          seed=self.opts.get("seed", 0)))
        log = open(self.log_dir / f"worker{rank}.log", "a")  # noqa: SIM115 - the child keeps writing to it
        self.procs[rank] = subprocess.Popen(argv, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                            env={**os.environ, "PYTHONPATH": str(REPO)})

    def start(self) -> PipelineEngine:
        for r in range(1, len(self.stages)):
            self.start_worker(r)
        self.engine.start()
        return self.engine

    def close(self) -> None:
        self.engine.close()
        for p in self.procs.values():
            p.kill()
            p.wait()

    def logs(self) -> str:
        return "\n".join(p.read_text()[-2000:] for p in sorted(self.log_dir.glob("worker*.log")))


def tokens(engine: PipelineEngine, prompt: list[int], **kw) -> list[int]:
    pieces = list(engine.generate(prompt, Sampling(**kw)))
    assert pieces[-1].finish_reason in ("length", "stop")
    assert all(p.finish_reason is None for p in pieces[:-1])
    return [t for p in pieces for t in p.token_ids]


def reference(model: GPT, prompt: list[int], n: int, temperature: float = 0.0, seed: int | None = None) -> list[int]:
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    out = model.generate(torch.tensor([prompt]), n, temperature=temperature, generator=gen)
    return out[0, len(prompt):].tolist()


# ---------------------------------------------------------------- gpt2 flavour, from a tierkit checkpoint

@pytest.fixture(scope="module")
def gpt2_cluster(tmp_path_factory):
    d = tmp_path_factory.mktemp("gpt2")
    chars = " abcdefghijklmnopqrstuvwxyz.,!?\n"
    cfg = GPTConfig(arch="gpt2", n_layer=4, n_head=4, n_embd=64, vocab_size=len(chars), block_size=128)
    full = GPT(cfg, seed=11).eval()
    ckpt = save_checkpoint(d / "tiny.pt", full, meta={"tokenizer": {"kind": "char", "chars": chars}})
    c = Cluster(str(ckpt), [(0, 2), (2, 4)], d)
    try:
        c.start()
    except Exception:  # noqa: BLE001 - any start failure: show the worker's log
        c.close()
        raise AssertionError(f"cluster did not start; worker log:\n{c.logs()}") from None
    yield c, full
    c.close()


def test_gpt2_two_stages_greedy_and_seeded_sampling_equal_single_node(gpt2_cluster):
    c, full = gpt2_cluster
    eng = c.engine
    prompt = eng.tokenize("to be, or not to be")
    assert tokens(eng, prompt, max_tokens=24, temperature=0) == reference(full, prompt, 24)
    # sampling runs on the last stage from a generator seeded per request: still the same tokens
    assert tokens(eng, prompt, max_tokens=16, temperature=0.9, seed=1234) == reference(full, prompt, 16, 0.9, 1234)
    st = eng.stats()
    assert [s["layers"] for s in st["stages"]] == [[0, 2], [2, 4]]
    assert all(s["compute_ms_total"] > 0 for s in st["stages"])
    # a decode step carries one float32 hidden state forward (plus the header) and one token back
    fwd, back = st["hops"]
    assert fwd["decode_bytes_per_token"] >= 64 * 4 and 0 < back["decode_bytes_per_token"] < 100
    assert st["decode_round_trip_ms"] > 0
    assert eng.health()["ok"]


def test_text_pieces_and_bad_requests(gpt2_cluster):
    c, _ = gpt2_cluster
    eng = c.engine
    prompt = eng.tokenize("hello")
    pieces = list(eng.generate(prompt, Sampling(max_tokens=5, temperature=0)))
    assert len(pieces) == 5 and pieces[-1].finish_reason == "length"
    assert "".join(p.text for p in pieces) == eng.tokenizer.decode([p.token_ids[0] for p in pieces])
    with pytest.raises(EngineError, match="not in this model's"):
        eng.tokenize("HELLO")   # the char vocabulary is lower-case
    for bad, needle in (([], "empty"), ([999], "0..31"), (prompt * 40, "context is 128")):
        with pytest.raises(EngineError, match=needle) as e:
            eng.generate(bad, Sampling(max_tokens=3))
        assert "\n" not in str(e.value)
    with pytest.raises(EngineError, match="max_tokens"):
        eng.generate(prompt, Sampling(max_tokens=0))
    # a request that ends early through a stop string frees its caches on every stage
    first = eng.tokenizer.decode(tokens(eng, prompt, max_tokens=4, temperature=0))
    stop = first[2:4]
    pieces = list(eng.generate(prompt, Sampling(max_tokens=20, temperature=0, stop=[stop])))
    assert pieces[-1].finish_reason == "stop" and "".join(p.text for p in pieces) == first[:first.find(stop)]
    assert tokens(eng, prompt, max_tokens=4, temperature=0) == [eng.tokenizer.stoi[ch] for ch in first]


# ---------------------------------------------------------------- llama flavour, random weights; faults

@pytest.fixture(scope="module")
def llama_cluster(tmp_path_factory):
    d = tmp_path_factory.mktemp("llama")
    c = Cluster("random:llama-tiny", [(0, 2), (2, 4)], d, seed=5)
    try:
        c.start()
    except Exception:  # noqa: BLE001 - any start failure: show the worker's log
        c.close()
        raise AssertionError(f"cluster did not start; worker log:\n{c.logs()}") from None
    yield c, GPT(resolve("random:llama-tiny").cfg, seed=5).eval()
    c.close()


def test_llama_concurrent_requests_equal_sequential(llama_cluster):
    c, full = llama_cluster
    eng = c.engine
    prompts = [eng.tokenize(f"request number {i}: " + "abc" * i) for i in range(6)]
    want = [reference(full, p, 12 + i) for i, p in enumerate(prompts)]
    assert tokens(eng, prompts[0], max_tokens=12, temperature=0) == want[0]
    got: dict[int, list[int]] = {}
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            got[i] = tokens(eng, prompts[i], max_tokens=12 + i, temperature=0)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    assert [got[i] for i in range(len(prompts))] == want   # every response complete, none crossed
    # the worker's status port says what it hosts (what an agent or a person can probe)
    st = worker_status("127.0.0.1", c.stages[1]["port"])
    assert st is not None and (st["rank"], st["layers"], st["state"]) == (1, [2, 4], "serving"), st


def test_killed_worker_is_unavailable_then_served_again(llama_cluster):
    c, full = llama_cluster
    eng = c.engine
    prompt = eng.tokenize("once upon a time")
    stream = eng.generate(prompt, Sampling(max_tokens=200, temperature=0))
    next(stream)
    c.procs[1].kill()
    t0 = time.monotonic()
    with pytest.raises(EngineUnavailable) as e:
        for _ in stream:
            pass
    assert time.monotonic() - t0 < TIMEOUT + 5, "a lost worker must fail the request within the timeout"
    assert "\n" not in str(e.value) and "stage" in str(e.value)
    # new requests are refused at once while the worker is gone, and health says so
    deadline = time.monotonic() + 5
    while eng.health()["ok"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not eng.health()["ok"]
    with pytest.raises(EngineUnavailable):
        list(eng.generate(prompt, Sampling(max_tokens=3, temperature=0)))
    c.start_worker(1)   # what the agent does when it restarts the worker
    deadline = time.monotonic() + 120
    while not eng.health()["ok"]:
        assert time.monotonic() < deadline, f"not back within 120 s: {eng.health()}\n{c.logs()}"
        time.sleep(0.1)
    assert eng.health()["epoch"] >= 2
    assert tokens(eng, prompt, max_tokens=10, temperature=0) == reference(full, prompt, 10)


# ---------------------------------------------------------------- worker arguments

GOOD = {"model": "random:gpt-tiny", "layers": [2, 4], "rank": 1, "world_size": 2, "master": "127.0.0.1:29500",
        "host": "127.0.0.1", "port": 29501}


@pytest.mark.parametrize("change, needle", [
    ({"model": "/no/such/model.pt"}, "no such file"),
    ({"model": "random:gpt-huge"}, "unknown random preset"),
    ({"layers": [3, 2]}, "0 <= a < b"),
    ({"layers": [2, 9]}, "past the model's 4 layers"),
    ({"layers": "2-4"}, "layers must be"),
    ({"rank": 0}, "rank must be"),
    ({"rank": 2}, "rank must be"),
    ({"world_size": 1}, "world_size must be"),
    ({"master": "127.0.0.1"}, "HOST:PORT"),
    ({"master": "127.0.0.1:70000"}, "master port"),
    ({"host": "--evil"}, "host must be"),
    ({"port": -1}, "port must be"),
    ({"dtype": "int3"}, "dtype"),
    ({"backend": "nccl"}, "backend"),
    ({"shell": "rm -rf /"}, "unknown pipeline worker argument"),
])
def test_bad_worker_args_give_one_line(change, needle):
    with pytest.raises(EngineError, match=needle) as e:
        worker_command({**GOOD, **change})
    assert "\n" not in str(e.value)


def test_worker_command_is_this_module_and_a_bad_checkpoint_exits_with_one_line(tmp_path):
    argv = worker_command(GOOD)
    assert argv[1:4] == ["-m", "tiers.tier3.pipeline", "worker"] and "--layers" in argv
    bad = tmp_path / "broken.pt"
    bad.write_bytes(b"not a checkpoint")
    argv = worker_command({**GOOD, "model": str(bad), "layers": [1, 2]})
    proc = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=120, check=False,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "broken.pt" in lines[0] and "not a readable torch checkpoint" in lines[0], proc.stderr


def test_engine_refuses_bad_stages():
    with pytest.raises(EngineError, match="contiguous"):
        PipelineEngine("random:gpt-tiny", [{"host": "127.0.0.1", "port": 1, "layers": [0, 2]},
                                           {"host": "127.0.0.1", "port": 2, "layers": [3, 4]}])
    with pytest.raises(EngineError, match="cover layers 0:3"):
        PipelineEngine("random:gpt-tiny", [{"host": "127.0.0.1", "port": 1, "layers": [0, 3]}])


def test_start_without_workers_is_unavailable_fast():
    eng = PipelineEngine("random:gpt-tiny", [{"host": "127.0.0.1", "port": free_port(), "layers": [0, 2]},
                                             {"host": "127.0.0.1", "port": 0, "layers": [2, 4]}],
                         timeout=TIMEOUT, connect_timeout=1.0)
    try:
        with pytest.raises(EngineUnavailable, match="waiting for worker 1"):
            eng.start()
        assert eng.health()["ok"] is False
    finally:
        eng.close()


# ---------------------------------------------------------------- a Hugging Face Llama folder

@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models, pre_tokenizers

    d = tmp_path_factory.mktemp("hf")
    words = ["<unk>", "<s>", "</s>"] + ["the", "a", "cat", "dog", "sat", "on", "mat", "ran", "far", "and", "then", "slept", "by"]
    cfg = transformers.LlamaConfig(vocab_size=16, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                   rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    model.save_pretrained(d, safe_serialization=True)
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(d / "tokenizer.json"))
    return d, model


def test_hf_llama_by_layer_range_gives_transformers_logits(hf_folder):
    from models.hf_llama import HFCheckpointError, load_llama_stage

    d, ref = hf_folder
    ids = torch.tensor([[1, 5, 6, 7, 8, 3, 9, 10, 4]])
    with torch.no_grad():
        want = ref(ids).logits[:, -1, :]
    stages = [load_llama_stage(d, r) for r in (range(1), range(1, 3))]
    assert not stages[0].has_head and stages[1].has_head
    assert "transformer.wte.weight" not in stages[1].state_dict()   # the last stage read no embedding
    assert not any(k.startswith("transformer.h.0.") for k in stages[1].state_dict())
    with torch.no_grad():
        got = stages[1].forward_stage(stages[0].forward_stage(ids))[:, -1, :]
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    with pytest.raises(HFCheckpointError, match="not inside 0:3"):
        load_llama_stage(d, range(2, 4))


def test_hf_llama_two_stages_greedy_equals_transformers(hf_folder, tmp_path):
    d, ref = hf_folder
    c = Cluster(str(d), [(0, 2), (2, 3)], tmp_path)
    try:
        eng = c.start()
        prompt = eng.tokenize("the cat sat on the mat")
        with torch.no_grad():
            out = ref.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, eos_token_id=None,
                               pad_token_id=0)
        want = out[0, len(prompt):].tolist()
        got = tokens(eng, prompt, max_tokens=12, temperature=0)
        assert got == want[:len(got)]
        if len(got) < 12:   # the engine stops at config.json's end-of-sequence token; transformers was told not to
            assert got[-1] == 2
    finally:
        c.close()


def test_hf_folder_refused_with_one_line(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "gpt2", "hidden_size": 8}')
    with pytest.raises(EngineError, match="not a Llama-family model") as e:
        worker_command({**GOOD, "model": str(tmp_path)})
    assert "\n" not in str(e.value)


def test_one_stage_is_the_whole_model_here_and_close_ends_open_streams():
    """The 1-node case (the benchmarks' baseline) runs the same scheduler with no workers."""
    eng = PipelineEngine("random:gpt-tiny", [{"host": "127.0.0.1", "port": 0, "layers": [0, 4]}], seed=2)
    eng.start()
    try:
        full = GPT(resolve("random:gpt-tiny").cfg, seed=2).eval()
        prompt = eng.tokenize("héllo")   # bytes: é is two of them
        assert tokens(eng, prompt, max_tokens=20, temperature=0) == reference(full, prompt, 20)
        assert eng.stats()["hops"] == [] and eng.stats()["stages"][0]["compute_ms_total"] > 0
        stream = eng.generate(prompt, Sampling(max_tokens=200, temperature=0))
        next(stream)
    finally:
        eng.close()
    with pytest.raises(EngineUnavailable, match="closed"):
        for _ in stream:
            pass
    with pytest.raises(EngineUnavailable):
        eng.generate(prompt, Sampling(max_tokens=2))

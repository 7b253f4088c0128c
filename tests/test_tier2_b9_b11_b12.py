"""B9 CNN, B11 transformer, B12 pretraining and its loop, and the tier-2 foundation (tiers/tier2/common.py).

The milestones run through `tierkit run` at their smallest sizes (on a reference
kit: no probe, no profile touched), on the real Tiny Shakespeare and MNIST files
in ../shared/data. What is checked is what each claims: B12's loss falls below
the unigram baseline; a B12 run killed with SIGKILL after a checkpoint and
resumed gives the same loss sequence, bit for bit, as an uninterrupted run; B11's
parameter count matches models.costs and its KV-cache decoding matches decoding
without the cache; B9's CNN beats chance by far and sits in one table with B8's MLP.
"""
from __future__ import annotations

import itertools
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from models.tokenizers import CharTokenizer, make_tokenizer, tokenizer_from_meta
from tests.conftest import REPO, SHARED, assert_one_line_error, run_cli
from tests.test_runner import assert_png
from tiers.tier2 import b12_pretrain as b12
from tiers.tier2 import common as c

DATA = SHARED / "data"
HAS_TEXT = (DATA / "tinyshakespeare.txt").exists()
HAS_MNIST = (DATA / "mnist" / "t10k-images-idx3-ubyte.gz").exists()
KIT = "laptop-8gb-cpu"
# One thread: the same reduction order in every process (bit-exact comparisons), and no stalls on a busy machine.
ENV = {"TIERKIT_DATA": str(DATA), "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
needs_text = pytest.mark.skipif(not HAS_TEXT, reason=f"Tiny Shakespeare is not at {DATA}/tinyshakespeare.txt")
needs_mnist = pytest.mark.skipif(not HAS_MNIST, reason=f"the MNIST test split is not under {DATA}/mnist")
# B12 at its smallest size, with evaluations and checkpoints often enough to be seen in a short run
B12_TINY = ["--size", "28K", "--set", "eval_iters=10", "--set", "eval_interval=50", "--set", "sample_interval=100",
            "--set", "sample_tokens=60"]


@pytest.fixture(autouse=True)
def _data_env(monkeypatch):
    monkeypatch.setenv("TIERKIT_DATA", str(DATA))


def cli(home: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return run_cli("run", *args, "--profile", KIT, "--out", str(home / "builds"), home=home, env=ENV, timeout=timeout)


def build(home: Path, mid: str) -> tuple[Path, dict]:
    folder = next((home / "builds").glob(f"B{int(mid[1:]):02d}-*"))
    return folder, json.loads((folder / "metrics.json").read_text())


def run_ok(home: Path, mid: str, *args: str, pngs: tuple[str, ...] = ()) -> tuple[Path, dict]:
    """`tierkit run` that must succeed: its build folder and metrics.json, each of `pngs` a real PNG."""
    proc = cli(home, mid, *args)
    assert proc.returncode == 0, proc.stderr
    folder, m = build(home, mid)
    for png in pngs:
        assert_png(folder / png)
    return folder, m


# ---------------------------------------------------------------- common.py

def test_device_and_precision_on_this_machine():
    dev, prec = c.device_and_precision("cpu")
    assert dev.type == "cpu" and prec == "fp32"
    with c.autocast(dev, prec):   # fp32: a no-op context, matmuls stay fp32
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32
    assert c.grad_scaler(dev, prec) is None and c.grad_scaler(dev, "bf16") is None
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="no CUDA device"):
            c.device_and_precision("cuda:0")


def test_lr_schedule_warmup_then_cosine():
    tc = c.TrainConfig(steps=1000, lr=1e-3, min_lr=1e-4, warmup=100)
    lrs = [c.lr_at(s, tc) for s in range(1000)]
    assert lrs[0] == pytest.approx(1e-3 / 101) and lrs[99] == pytest.approx(1e-3 * 100 / 101)
    assert all(a < b for a, b in itertools.pairwise(lrs[:101]))                  # rises through warmup
    assert all(a >= b for a, b in itertools.pairwise(lrs[100:]))                  # then only falls
    assert lrs[100] == pytest.approx(1e-3) and lrs[550] == pytest.approx(5.5e-4)  # cosine midpoint
    assert c.lr_at(1000, tc) == 1e-4 and lrs[-1] == pytest.approx(1e-4, rel=1e-3)


def test_weight_decay_only_on_matrices():
    from models.gpt import GPT, GPTConfig

    model = GPT(GPTConfig(vocab_size=11, block_size=8, n_layer=1, n_head=2, n_embd=8), seed=0)
    opt = c.make_optimizer(model, c.TrainConfig(weight_decay=0.1), torch.device("cpu"))
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() == 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    assert sum(p.numel() for g in opt.param_groups for p in g["params"]) == model.num_params()


def test_tokenizers_round_trip_through_their_meta():
    text = "First Citizen:\nBefore we proceed any further, hear me speak.\n" * 20
    char = CharTokenizer(text)
    assert char.decode(char.encode("hear me")) == "hear me"
    with pytest.raises(ValueError, match="'Z' is not in this"):
        char.encode("Zed")
    assert char.decode(char.encode("Zed", errors="drop")) == "ed"
    bpe = make_tokenizer("bpe", text, 300)
    assert bpe.vocab_size > 256 and len(bpe.encode(text)) < len(text.encode())   # merges shorten the text
    for tok in (char, bpe):
        again = tokenizer_from_meta(json.loads(json.dumps(tok.meta())))      # meta survives JSON (and torch.save)
        assert again.encode(text) == tok.encode(text) and again.decode(tok.encode(text)) == text
    if (DATA / "tokenizers" / "gpt2.tiktoken").exists():
        g = make_tokenizer("gpt2", text)
        assert g.vocab_size == 50257 and g.encode("hello world") == [31373, 995]   # GPT-2's published ids
        assert tokenizer_from_meta(g.meta()).decode(g.encode(text)) == text
    with pytest.raises(ValueError, match="unknown tokenizer kind"):
        tokenizer_from_meta({"kind": "sentencepiece"})


def test_perplexity_is_exp_of_the_mean_window_loss():
    from models.gpt import GPT, GPTConfig

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=13, block_size=16, n_layer=1, n_head=2, n_embd=16), seed=1)
    ids = torch.randint(0, 13, (16 * 5 + 1,))
    with torch.no_grad():
        losses = [float(model(ids[i:i + 16][None], ids[i + 1:i + 17][None])[1]) for i in range(0, 80, 16)]
    assert c.perplexity(model, ids, 16, batch_size=2) == pytest.approx(math.exp(sum(losses) / 5), rel=1e-5)
    with pytest.raises(ValueError, match="too few"):
        c.perplexity(model, ids[:10], 16)


def test_unigram_entropy_of_a_known_distribution():
    assert c.unigram_entropy(torch.tensor([0, 1, 2, 3])) == pytest.approx(math.log(4))
    assert c.unigram_entropy(torch.tensor([5, 5, 5])) == pytest.approx(0.0)


def _toy_run(steps: int, path: Path | None, resume: bool = False, stop_at: int | None = None) -> dict:
    """A 2-layer model on a synthetic pattern; stop_at raises after that step (a crash without cleanup)."""
    from models.gpt import GPT, GPTConfig

    ids = torch.arange(3000) % 17
    model = GPT(GPTConfig(vocab_size=17, block_size=16, n_layer=2, n_head=2, n_embd=16, dropout=0.1), seed=0)
    tc = c.TrainConfig(steps=steps, lr=3e-3, warmup=5, eval_interval=10, ckpt_interval=10)

    class Crash(Exception):
        pass

    def on_step(step: int, rec: dict) -> None:
        if step == stop_at:
            raise Crash

    try:
        resume_from = c.read_resume(path, tc, model.config) if resume else None
        return b12.train(model, tc, lambda g: c.random_batch(ids, 16, 4, g), device=torch.device("cpu"),
                         evaluate=lambda m: c.estimate_loss(m, {"val": ids}, 16, 4, 2, 0, torch.device("cpu")),
                         ckpt_path=path, resume_from=resume_from, on_step=on_step, log=lambda *a: None)
    except Crash:
        return {}


def test_train_resume_is_bit_exact_with_dropout(tmp_path):
    """In-process version of the SIGKILL test below: dropout on, so the global RNG state must be restored too."""
    full = _toy_run(40, tmp_path / "a.pt")
    assert full["loss"][-1] < full["loss"][0]
    assert _toy_run(40, tmp_path / "b.pt", stop_at=25) == {}
    assert torch.load(tmp_path / "b.pt", weights_only=True)["step"] == 20
    resumed = _toy_run(40, tmp_path / "b.pt", resume=True)
    assert resumed["resumed_at"] == [20]
    assert resumed["loss"] == full["loss"] and resumed["grad_norm"] == full["grad_norm"]
    assert resumed["evals"] == full["evals"]
    with pytest.raises(c.ResumeError, match="nothing to resume"):
        _toy_run(40, tmp_path / "none.pt", resume=True)
    longer = _toy_run(50, tmp_path / "b.pt", resume=True)   # more steps: the run goes on, no conflict
    assert len(longer["loss"]) == 50 and longer["resumed_at"][-1] == 40


# ---------------------------------------------------------------- B12 through the CLI

@needs_text
def test_b12_tiny_run_beats_the_unigram_baseline(home):
    folder, m = run_ok(home, "B12", *B12_TINY, pngs=("loss.png", "lr.png", "grad_norm.png"))
    readme = (folder / "README.md").read_text()
    assert "## Samples" in readme and "unigram" in readme and "(loss.png)" in readme
    r = m["metrics"]
    assert r["tokenizer"] == "char" and r["vocab_size"] == 65
    assert r["params"] == r["params_predicted"] == 28_864  # llama flavour, the default
    assert len(r["history"]["loss"]) == 200 and r["history"]["evals"][-1]["step"] == 200
    # the property: it learned more than character frequencies (unigram ~3.31 nats; uniform ln 65 = 4.17)
    assert r["final_val_loss"] < r["unigram_baseline"] < r["uniform_baseline"]
    assert r["val_loss_full"] < r["unigram_baseline"]
    assert r["history"]["lr"][0] < r["history"]["lr"][99] and r["history"]["lr"][-1] < r["history"]["lr"][100]
    assert len(r["samples"]) == 4 and all(s["text"] for s in r["samples"][1:])
    # the checkpoint is a real model: it loads, and the tokenizer comes back from its meta
    from models.gpt import load_checkpoint

    model, ckpt = load_checkpoint(folder / "ckpt.pt")
    tok = tokenizer_from_meta(ckpt["meta"]["tokenizer"])
    assert model.num_params() == 28_864 and ckpt["step"] == 200 and tok.vocab_size == 65
    assert not (home / "builds" / ".B12-pretraining.resume.pt").exists()   # moved into the build


def _losses(home: Path) -> list[float]:
    return build(home, "B12")[1]["metrics"]["history"]["loss"]


@needs_text
def test_b12_resume_after_sigkill_equals_an_uninterrupted_run(tmp_path):
    """Start B12, SIGKILL it right after its first checkpoint, `--resume`, compare with a clean run."""
    args = [*B12_TINY, "--set", "ckpt_interval=20", "--set", "steps=300"]
    clean, killed = tmp_path / "clean", tmp_path / "killed"
    clean.mkdir()
    killed.mkdir()
    ckpt = killed / "builds" / ".B12-pretraining.resume.pt"
    env = {**os.environ, **ENV, "TIERKIT_HOME": str(killed), "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "tiers.cli", "run", "B12", *args, "--profile", KIT,
                             "--out", str(killed / "builds")], cwd=killed, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    while not ckpt.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed mid-way"
    step = torch.load(ckpt, weights_only=True)["step"]
    assert 0 < step < 300 and not (killed / "builds" / "B12-pretraining").exists()

    resumed = cli(killed, "B12", *args, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert build(killed, "B12")[1]["metrics"]["resumed_at"] == [step]
    full = cli(clean, "B12", *args)
    assert full.returncode == 0, full.stderr
    a, b = _losses(clean), _losses(killed)
    assert len(a) == len(b) == 300
    assert a == b   # exact float equality: the same computation, not merely a similar one
    ma, mb = build(clean, "B12")[1]["metrics"], build(killed, "B12")[1]["metrics"]
    assert ma["history"]["evals"] == mb["history"]["evals"] and ma["history"]["grad_norm"] == mb["history"]["grad_norm"]


@needs_text
def test_b12_resume_errors_are_one_line(home):
    proc = cli(home, "B12", *B12_TINY, "--resume")
    assert_one_line_error(proc, "nothing to resume", "without --resume")
    assert not (home / "builds" / "B12-pretraining").exists()
    # a checkpoint from other settings is refused, not silently mixed in
    (home / "builds").mkdir(exist_ok=True)
    from models.gpt import GPT, GPTConfig, save_checkpoint

    m = GPT(GPTConfig(vocab_size=65, block_size=32, n_layer=2, n_head=2, n_embd=32))
    save_checkpoint(home / "builds" / ".B12-pretraining.resume.pt", m, optimizer={}, step=5, rng={}, history={},
                    train_config={**c.TrainConfig().__dict__, "lr": 0.5})
    proc = cli(home, "B12", *B12_TINY, "--resume")
    assert_one_line_error(proc, "other settings", "lr 0.5 in the checkpoint")
    proc = cli(home, "B12", "--size", "28K", "--set", "lr")
    assert_one_line_error(proc, "--set 'lr'", "KEY=VALUE")


@needs_text
def test_b12_bpe_tokens(home):
    _, m = run_ok(home, "B12", *B12_TINY, "--set", "tokenizer=bpe", "--set", "vocab_size=320", "--set", "steps=60")
    r = m["metrics"]
    assert r["tokenizer"] == "bpe" and r["vocab_size"] == 320 and r["model_vocab"] == 320
    assert r["tokens"] < 0.8 * 1_115_394                       # merges: fewer tokens than characters
    assert r["final_val_loss"] < r["uniform_baseline"]          # it learned something in 60 steps


# ---------------------------------------------------------------- B11

@needs_text
def test_b11_parameters_kv_cache_and_stages(home):
    folder, m = run_ok(home, "B11", "--size", "28K", pngs=("kv_cache.png", "loss.png"))
    assert "| transformer.h.0.attn.c_attn.weight | 96 x 32 | 3,072 |" in (folder / "README.md").read_text()
    assert "transformer.wte.weight" in (folder / "params.md").read_text()
    r = m["metrics"]
    assert r["params"] == r["params_predicted"] == sum(row[2] for row in r["params_table"]) == 28_576
    assert "lm_head.weight" not in {row[0] for row in r["params_table"]}          # tied: counted once
    tr = r["training"]
    assert tr["final_val_loss"] < tr["first_loss"] - 0.5                          # it learns
    kv = r["kv_cache"]
    assert kv["tokens_equal"] and kv["generate_equal"] and kv["llama_tokens_equal"]
    assert kv["max_logit_diff"] < 1e-4 and kv["llama_max_logit_diff"] < 1e-4
    assert kv["new_tokens"] == 24 and len(kv["cache_seconds"]) == 24
    assert r["stages"]["max_abs_diff"]["gpt2"] < 1e-5 and r["stages"]["max_abs_diff"]["llama"] < 1e-5


def test_decoding_with_and_without_cache_agree_in_process():
    from models.gpt import GPT, GPTConfig
    from tiers.tier2 import b11_transformer as b11

    model = GPT(GPTConfig(vocab_size=20, block_size=24, n_layer=2, n_head=2, n_embd=16, arch="llama", n_kv_head=1),
                seed=3)
    d = b11.decode_both_ways(model, torch.tensor([[1, 2, 3]]), 12)
    assert d["tokens_equal"] and d["generate_equal"] and d["max_logit_diff"] < 1e-5 and len(d["tokens"]) == 15
    assert b11.stages_match(model, torch.tensor([[1, 2, 3, 4]]), 1) < 1e-6


# ---------------------------------------------------------------- B9

def test_cnn_matches_the_cost_model():
    from models import costs
    from tiers.tier2.b09_cnn import CNN

    for in_ch, side, widths, per, fc in ((1, 28, [4, 8], 1, [32]), (3, 32, [8, 16, 32], 2, [64, 32])):
        model = CNN(in_ch, side, widths, per, fc, 10)
        assert model(torch.zeros(2, in_ch, side, side)).shape == (2, 10)
        n = sum(p.numel() for p in model.parameters())
        assert n == costs.cnn_counts(costs.CNNShape((side, side), in_ch, tuple(widths), per, tuple(fc), 10))[0]


def test_cifar10_folder_in_its_published_format(tmp_path):
    """The loader reads the python pickles CIFAR-10 ships (written here in that format), and names what is missing."""
    import pickle

    import numpy as np

    from tiers.tier2.b09_cnn import load_cifar10

    rng = np.random.default_rng(0)
    for name, n in (("data_batch_1", 6), ("test_batch", 4)):
        with open(tmp_path / name, "wb") as f:
            pickle.dump({b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                         b"labels": list(rng.integers(0, 10, n))}, f)
    xtr, ytr, xte, _ = load_cifar10(tmp_path)
    assert xtr.shape == (6, 3, 32, 32) and xte.shape == (4, 3, 32, 32) and ytr.dtype == np.int64
    (tmp_path / "test_batch").unlink()
    with pytest.raises(FileNotFoundError, match="test_batch is missing; point data_path"):
        load_cifar10(tmp_path)


@needs_mnist
def test_b9_cnn_learns_mnist_and_is_compared_with_b8(home):
    folder, m = run_ok(home, "B9", "--size", "mnist-xs-8k", pngs=("accuracy.png", "filters.png"))
    assert "## CNN vs MLP" in (folder / "README.md").read_text()
    r = m["metrics"]
    assert r["n_train"] == 8000 and r["n_test"] == 2000 and "test split only" in r["data"]
    assert r["params"] == r["params_predicted"]
    assert r["test_accuracy"] > 0.85                      # chance is 10%
    cnn, mlp = r["comparison"]
    assert mlp["model"].startswith("B8 MLP") and mlp["source"] == "here" and mlp["n_train"] == cnn["n_train"]
    assert mlp["test_accuracy"] > 0.85 and cnn["params"] < mlp["params"]


@needs_mnist
def test_b9_cifar_without_a_folder_is_one_line(home):
    proc = run_cli("run", "B9", "--size", "cifar-s", "--profile", KIT, "--out", str(home / "builds"), home=home,
                   env=ENV)
    assert_one_line_error(proc, "tierkit data fetch cifar-10", "--fetch")
    assert not (home / "builds" / "B09-cnn").exists()

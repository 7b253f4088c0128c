"""The analytic cost models against numbers worked out by hand, the torch modules they
describe, and published reference figures (nanoGPT's GPT-2, MLPerf Tiny's DS-CNN)."""
from __future__ import annotations

import pytest

from inventory.units import fmt_bytes
from models import costs
from models.costs import GPTShape

TINY = GPTShape(vocab_size=10, block_size=8, n_layer=1, n_head=2, n_embd=4)


# ---------------------------------------------------------------- GPT

def test_gpt_params_by_hand():
    # wte 10*4 + wpe 8*4 + block (12*16 + 2*4 + 11*4) + ln_f 4 + 4
    assert costs.gpt_params(TINY) == 40 + 32 + (192 + 8 + 44) + 8 == 324
    no_bias = GPTShape(10, 8, 1, 2, 4, bias=False)
    assert costs.gpt_params(no_bias) == 40 + 32 + (192 + 8) + 4 == 276
    untied = GPTShape(10, 8, 1, 2, 4, tied=False)
    assert costs.gpt_params(untied) == 324 + 40
    # the matmul parameters leave out the position-embedding lookup (and the token one when untied)
    assert costs.gpt_matmul_params(TINY) == 324 - 32
    assert costs.gpt_matmul_params(untied) == 364 - 32 - 40


def test_gpt2_small_matches_nanogpt():
    """nanoGPT prints 123.69M for GPT-2 124M with vocab 50304: all parameters but wpe."""
    s = GPTShape(50304, 1024, 12, 12, 768)
    assert costs.gpt_params(s) == 124_475_904
    assert costs.gpt_params(s) - 1024 * 768 == 123_689_472


@pytest.mark.parametrize("bias", [True, False])
def test_two_layer_gpt_counts_like_torch(bias):
    torch = pytest.importorskip("torch", reason="torch not installed: pip install 'tierkit[tier2]'")
    from models.gpt import GPT, GPTConfig

    cfg = GPTConfig(vocab_size=65, block_size=32, n_layer=2, n_head=4, n_embd=64, bias=bias)
    model = GPT(cfg)
    assert sum(p.numel() for p in model.parameters()) == costs.gpt_params(
        GPTShape(65, 32, 2, 4, 64, bias=bias))
    idx = torch.randint(0, 65, (2, 16))
    logits, loss = model(idx, idx)
    assert logits.shape == (2, 16, 65) and loss.item() > 0


def test_gpt_train_memory_and_flops_by_hand():
    s = GPTShape(vocab_size=10, block_size=8, n_layer=2, n_head=2, n_embd=4)
    n, nm = costs.gpt_params(s), costs.gpt_matmul_params(s)
    # no flash: per layer s*b*h*(34 + 5*a*s/h) = 8*2*4*(34 + 20) = 3456 bytes in 16-bit,
    # times what eager PyTorch holds beyond that count (measured)
    e = costs.EAGER_ACTIVATIONS["gpt2"]
    c16 = costs.gpt_train(s, batch=2, tokens=1000, dtype="bf16", flash=False)
    assert c16.memory["weights+grads+Adam"] == 16 * n
    assert c16.memory["activations"] == pytest.approx(2 * 3456 * e)
    assert c16.memory["logits"] == 2 * 8 * 10 * 4 * 2
    assert c16.flops == (6 * nm + 6 * 2 * 8 * 4) * 1000
    # fp32 doubles the activations; flash attention drops the 5*a*s/h term
    c32 = costs.gpt_train(s, batch=2, tokens=1000, dtype="fp32", flash=False)
    assert c32.memory["activations"] == pytest.approx(2 * 2 * 3456 * e)
    flash = costs.gpt_train(s, batch=2, tokens=1000, dtype="bf16", flash=True)
    assert flash.memory["activations"] == pytest.approx(2 * 8 * 2 * 4 * 34 * e)
    assert c16.peak_bytes == sum(c16.memory.values())
    assert any("Korthikanti" in line for line in c16.basis)


def test_kv_cache_llama_8b():
    # 2 x 32 layers x 8 kv heads x 128 x 4096 tokens x 2 bytes = 512 MiB
    assert costs.kv_cache_bytes(32, 8, 128, 4096, 1, 2) == 2 * 32 * 8 * 128 * 4096 * 2 == 512 * 2**20


def test_gpt_infer_reads_weights_per_token():
    c = costs.gpt_infer(TINY, "fp16", ctx=8, new_tokens=10, prompt_tokens=4)
    assert c.memory["weights"] == 324 * 2
    assert c.memory["KV cache"] == 2 * 1 * 2 * 2 * 8 * 1 * 2
    assert c.extra["bytes_per_token"] == 324 * 2 + c.memory["KV cache"] / 2
    assert c.flops == 2 * costs.gpt_matmul_params(TINY) * 14


# ---------------------------------------------------------------- MLP, CNN, LSTM

def test_mlp_by_hand():
    assert costs.mlp_params([784, 128, 10]) == 784 * 128 + 128 + 128 * 10 + 10 == 101_770
    c = costs.mlp_train([2, 3, 1], samples=10, epochs=2, batch=5, dtype="fp32", optimizer_bytes_per_param=4)
    n = 2 * 3 + 3 + 3 * 1 + 1
    assert c.params == n == 13
    assert c.flops == 6 * 13 * 10 * 2
    assert c.memory["weights+grads+optimizer"] == 13 * (4 + 4 + 4)
    assert c.memory["activations"] == 2 * 5 * (2 + 3 + 1) * 4


def test_cnn_by_hand():
    s = costs.CNNShape(in_hw=(4, 4), in_ch=1, widths=(2,), fc=(), classes=3)
    params, macs, acts = costs.cnn_counts(s)
    # conv 3x3x1x2 + 2 = 20; pool -> 2x2x2 = 8 -> fc 8*3 + 3 = 27
    assert params == 20 + 27
    assert macs == 4 * 4 * 9 * 1 * 2 + 8 * 3
    assert acts == 4 * 4 * 2 + 2 * 2 * 2 + 3
    c = costs.cnn_train(s, samples=100, epochs=1, batch=4)
    assert c.flops == 6 * macs * 100
    assert c.memory["weights+grads+Adam"] == 16 * params


def test_cnn_counts_like_torch():
    torch = pytest.importorskip("torch", reason="torch not installed: pip install 'tierkit[tier2]'")
    nn = torch.nn
    s = costs.CNNShape(in_hw=(28, 28), in_ch=1, widths=(8, 16), convs_per_stage=2, fc=(64,), classes=10)
    layers, c_in = [], 1
    for c in s.widths:
        for _ in range(s.convs_per_stage):
            layers += [nn.Conv2d(c_in, c, 3, padding=1), nn.ReLU()]
            c_in = c
        layers.append(nn.MaxPool2d(2))
    layers += [nn.Flatten(), nn.Linear(7 * 7 * 16, 64), nn.ReLU(), nn.Linear(64, 10)]
    model = nn.Sequential(*layers)
    assert sum(p.numel() for p in model.parameters()) == costs.cnn_counts(s)[0]


def test_lstm_counts_like_torch():
    torch = pytest.importorskip("torch", reason="torch not installed: pip install 'tierkit[tier2]'")
    nn = torch.nn
    emb, lstm, head = nn.Embedding(65, 32), nn.LSTM(32, 48, num_layers=2), nn.Linear(48, 65)
    n = sum(p.numel() for m in (emb, lstm, head) for p in m.parameters())
    assert costs.lstm_params(65, 32, 48, 2) == n


# ---------------------------------------------------------------- DS-CNN (MLPerf Tiny KWS)

def test_dscnn_matches_mlperf_reference():
    c = costs.dscnn(costs.DSCNNShape())           # 64 channels, 4 blocks, 12 classes, 49x10 input
    assert c.params == 22_604                     # "~22.6K parameters after folding BN"
    assert c.extra["macs"] == 2_656_768           # "~2.66M MACs"
    assert abs(c.extra["model_bytes"] / 53_936 - 1) < 0.05    # int8 .tflite 53,936 B
    assert abs(c.extra["arena_bytes"] / 24_272 - 1) < 0.10    # TFLite Micro arena 24,272 B
    assert len(c.basis) >= 4


def test_dscnn_grows_with_width():
    small, big = costs.dscnn(costs.DSCNNShape(channels=32)), costs.dscnn(costs.DSCNNShape(channels=172))
    assert small.params < 22_604 < big.params
    assert small.extra["macs"] < big.extra["macs"] and small.extra["arena_bytes"] < big.extra["arena_bytes"]


# ---------------------------------------------------------------- GGUF, matmul, the rest

def test_gguf_by_hand():
    c = costs.gguf("llama-3.1-8b", "Q4_K_M", ctx=4096, prompt_tokens=0, new_tokens=100)
    assert c.memory["weights"] == pytest.approx(8.03e9 * 0.58)
    assert c.memory["KV cache"] == 512 * 2**20
    assert c.bytes_moved == pytest.approx(100 * c.extra["bytes_per_token"])
    assert costs.GGUF_BYTES_PER_PARAM["F16"] == 2 and costs.GGUF_BYTES_PER_PARAM["Q8_0"] == pytest.approx(1.06, abs=0.01)
    assert costs.GGUF_BYTES_PER_PARAM["Q4_0"] == pytest.approx(0.56, abs=0.01)


def test_matmul_by_hand():
    c = costs.matmul(64, "fp32")
    assert c.flops == 2 * 64**3 == 524_288
    assert c.bytes_moved == 3 * 64 * 64 * 4 == 49_152
    sweep = costs.matmul_sweep([64, 128], "fp64")
    assert sweep.flops == 2 * 64**3 + 2 * 128**3
    assert sweep.peak_bytes == 3 * 128 * 128 * 8    # one size at a time


def test_small_workloads_by_hand():
    q = costs.tabular_q(16, 4, episodes=10, max_steps=100)
    assert q.memory["Q table"] == 16 * 4 * 8 and q.extra["python_steps"] == 1000
    b = costs.bpe(1000, 512, "python")
    assert b.extra["python_steps"] == 256 * 1000 * 2
    v = costs.vector_search(1000, 8, queries=10, batch=5)
    assert v.memory["index"] == 1000 * 8 * 4 and v.flops == 2 * 1000 * 8 * 10 and v.bytes_moved == 2 * 32_000
    w = costs.skipgram(100, 10, corpus_tokens=50, window=2, negatives=5, epochs=1)
    assert w.params == 2 * 100 * 10 and w.flops == 50 * 4 * 6 * 10 * 6


def test_every_cost_explains_itself():
    cases = [costs.gpt_train(TINY, 1, 10), costs.gpt_infer(TINY, "fp32", 8, 4), costs.mlp_train([4, 2], 1, 1, 1),
             costs.dscnn(), costs.lstm_train(10, 4, 8, 1, 2, 4, 100), costs.gguf("tinyllama-1.1b", "Q8_0", 512, 8, 8),
             costs.matmul(128), costs.probe_workload(), costs.bpe(100, 300), costs.vector_search(10, 4, 2)]
    for c in cases:
        assert c.basis and all(isinstance(line, str) and line for line in c.basis)


def test_formatting():
    assert fmt_bytes(53_936) == "53.9 KB"
    assert fmt_bytes(8.26e9) == "8.26 GB"
    assert costs.fmt_count(124_475_904) == "124M"
    assert costs.fmt_count(2_706_624) == "2.71M"


@pytest.mark.parametrize("kw", [{}, {"n_kv_head": 2}, {"tie_weights": False, "ffn_hidden": 50}])
def test_llama_param_count_matches_torch(kw):
    pytest.importorskip("torch", reason="torch is in the tier2 extra; `make test` installs it")
    from models.gpt import GPT, GPTConfig

    cfg = GPTConfig(vocab_size=65, block_size=32, n_layer=3, n_head=4, n_embd=64, arch="llama", **kw)
    assert costs.llama_params(65, 3, 64, 4, cfg.n_kv_head, cfg.ffn_hidden, cfg.tie_weights) == GPT(cfg).num_params()

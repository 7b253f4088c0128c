"""models/gpt.py: both flavours, KV cache, layer-range stages, seeded init, checkpoints."""
from __future__ import annotations

import pytest

torch = pytest.importorskip("torch", reason="torch is in the tier2 extra; `make test` installs it")

from models.gpt import GPT, GPTConfig, KVCache, load_checkpoint, sample_next, save_checkpoint

FLAVOURS = [("gpt2", {}), ("llama", {"n_kv_head": 2})]


def _cfg(arch: str, **kw) -> GPTConfig:
    return GPTConfig(vocab_size=97, block_size=64, n_layer=4, n_head=4, n_embd=32, arch=arch, **kw)


@pytest.mark.parametrize(("arch", "kw"), FLAVOURS)
def test_two_stages_equal_the_whole_model(arch, kw):
    cfg = _cfg(arch, **kw)
    full = GPT(cfg, seed=3).eval()
    first, last = GPT(cfg, layers=range(1), seed=3).eval(), GPT(cfg, layers=range(1, 4), seed=3).eval()
    assert not hasattr(first, "lm_head") and "wte" not in last.transformer
    idx = torch.randint(0, cfg.vocab_size, (2, 10))
    ref, _ = full(idx)
    assert torch.equal(last.forward_stage(first.forward_stage(idx)), ref)
    assert first.num_params() + last.num_params() > full.num_params()  # the tied matrix lives on both ends


@pytest.mark.parametrize(("arch", "kw"), FLAVOURS)
def test_kv_cache_gives_the_same_tokens_and_logits(arch, kw):
    cfg = _cfg(arch, **kw)
    model = GPT(cfg, seed=1).eval()
    idx = torch.randint(0, cfg.vocab_size, (1, 7))
    assert torch.equal(model.generate(idx, 25, temperature=0), model.generate(idx, 25, temperature=0, use_cache=False))
    ref, _ = model(idx)
    cache = KVCache(model, max_len=20)
    model(idx[:, :3], cache=cache)             # a prefix, then a chunk after it (masked attention)
    out, _ = model(idx[:, 3:], cache=cache)
    assert cache.pos == 7
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="KV cache holds 20"):
        model(torch.zeros(1, 14, dtype=torch.long), cache=cache)


@pytest.mark.parametrize(("arch", "kw"), FLAVOURS)
def test_stage_loads_only_its_layers_from_a_checkpoint(tmp_path, arch, kw):
    cfg = _cfg(arch, **kw)
    full = GPT(cfg, seed=5)
    path = save_checkpoint(tmp_path / "m.pt", full, meta={"tokenizer": "char"})
    stage, ckpt = load_checkpoint(path, layers=(2, 4))
    assert ckpt["meta"] == {"tokenizer": "char"}
    assert sorted({k.split(".")[2] for k in stage.state_dict() if k.startswith("transformer.h.")}) == ["2", "3"]
    ref = GPT(cfg, layers=(2, 4), seed=5).state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in stage.state_dict().items())
    assert not list(tmp_path.glob(".*tmp"))


def test_bad_checkpoint_and_config_are_one_line_errors(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a readable torch checkpoint"):
        load_checkpoint(bad)
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "nope.pt")
    with pytest.raises(ValueError, match="arch must be one of"):
        GPTConfig(arch="rwkv")
    with pytest.raises(ValueError, match="not inside"):
        GPT(_cfg("gpt2"), layers=(3, 9))


def test_sampling_filters():
    logits = torch.tensor([[0.0, 5.0, 4.9, -3.0]])
    assert sample_next(logits, 0).item() == 1
    g = torch.Generator().manual_seed(0)
    picks = {sample_next(logits, 1.0, top_k=2, generator=g).item() for _ in range(200)}
    assert picks == {1, 2}
    picks = {sample_next(logits, 1.0, top_p=0.4, generator=g).item() for _ in range(100)}
    assert picks == {1}

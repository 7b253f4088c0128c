"""Placement: proportional to free memory, never beyond it (with headroom), refused with the numbers."""
from __future__ import annotations

from pathlib import Path

import pytest

from inventory.units import parse_bytes
from tiers.tier3.placement import (
    ModelLayout,
    Node,
    PlacementError,
    layout_from_config,
    layout_from_gguf,
    place,
    render,
    stages_for_engine,
)

GGUF = Path("/work/shared/data/stories260K.gguf")
MiB = 1 << 20


def _model(n=10, per=10 * MiB, first=5 * MiB, last=5 * MiB) -> ModelLayout:
    return ModelLayout("m", [per] * n, first, last)


def _fits(plan) -> None:
    """Every stage within its usable memory; layers contiguous and complete."""
    a = 0
    for s in plan.stages:
        assert s.layers[0] == a and s.bytes <= s.usable_bytes, s
        a = s.layers[1]
    assert a == plan.model.n_layer


def test_split_follows_free_memory():
    plan = place(_model(), [Node("a", "h1", 0, 300 * MiB), Node("b", "h2", 1, 100 * MiB)], headroom=0.0)
    _fits(plan)
    counts = [s.layers[1] - s.layers[0] for s in plan.stages]
    # Room after the fixed embeddings/output: a 290 MiB, b 100 MiB -> 7.4 : 2.6 of 10 layers.
    assert counts == [7, 3]
    assert plan.stages[0].holds_first and plan.stages[0].holds_last  # llama.cpp keeps the output on the head


def test_equal_nodes_split_evenly_and_last_stage_holds_output():
    plan = place(_model(n=8), [Node("a", "h", 0, 200 * MiB), Node("b", "h", 1, 200 * MiB)], headroom=0.0,
                 last_on="last")
    _fits(plan)
    assert [s.layers for s in plan.stages] == [(0, 4), (4, 8)]
    assert plan.stages[1].holds_last and not plan.stages[0].holds_last


def test_headroom_is_respected_and_repair_moves_layers_off_a_full_node():
    # Proportionally b would get 5 layers (room 50 MiB each), but the first node also carries 10 MiB of
    # embeddings: the repair moves a layer so that nothing exceeds its usable memory.
    m = _model(n=9, per=10 * MiB)
    plan = place(m, [Node("a", "h", 0, 70 * MiB), Node("b", "h", 1, 50 * MiB)], headroom=0.0)
    _fits(plan)
    plan = place(m, [Node("a", "h", 0, 80 * MiB), Node("b", "h", 1, 56 * MiB)], headroom=0.1)
    _fits(plan)
    assert plan.stages[1].usable_bytes == int(56 * MiB * 0.9)


def test_uneven_layers_from_mixed_quantisation():
    m = ModelLayout("mixed", [30 * MiB, 5 * MiB, 5 * MiB, 30 * MiB], 0, 0)
    plan = place(m, [Node("a", "h", 0, 40 * MiB), Node("b", "h", 1, 40 * MiB)], headroom=0.0)
    _fits(plan)


def test_too_big_is_refused_with_numbers():
    with pytest.raises(PlacementError) as err:
        place(_model(), [Node("a", "h", 0, 50 * MiB)], headroom=0.1)
    msg = str(err.value)
    assert "needs 110.00 MiB" in msg and "45.00 MiB usable after 10% headroom" in msg and "\n" not in msg
    assert "add a node" in msg


def test_fits_on_two_not_on_one():
    m = _model(n=10, per=10 * MiB, first=0, last=0)
    with pytest.raises(PlacementError):
        place(m, [Node("a", "h", 0, 80 * MiB)])
    _fits(place(m, [Node("a", "h", 0, 80 * MiB), Node("b", "h", 1, 80 * MiB)]))


def test_node_too_small_for_embeddings_is_refused():
    with pytest.raises(PlacementError, match="cannot even hold the embeddings"):
        place(_model(first=100 * MiB), [Node("a", "h", 0, 50 * MiB), Node("b", "h", 1, 500 * MiB)], headroom=0.0)


@pytest.mark.parametrize("bad", [dict(nodes=[]), dict(headroom=1.0), dict(headroom=-0.1)])
def test_bad_inputs(bad):
    args = dict(nodes=[Node("a", "h", 0, MiB)], headroom=0.1) | bad
    with pytest.raises(PlacementError):
        place(_model(), **args)


def test_render_and_stages():
    plan = place(_model(), [Node("head", "10.0.0.1", 0, 300 * MiB, basis="memory budget"),
                            Node("b", "10.0.0.2", 8477, 100 * MiB)])
    text = render(plan)
    assert "placement of m: 10 layers" in text and "10.0.0.2:8477" in text and "memory budget" in text
    assert "0-6+emb+out" in text
    assert stages_for_engine(plan) == [{"name": "head", "host": "10.0.0.1", "port": 0, "layers": [0, 7]},
                                       {"name": "b", "host": "10.0.0.2", "port": 8477, "layers": [7, 10]}]


@pytest.mark.skipif(not GGUF.exists(), reason=f"{GGUF} missing (the shared data folder)")
def test_layout_from_gguf_matches_the_tensor_table():
    from gguf import GGUFReader

    m = layout_from_gguf(GGUF, n_ctx=256)
    r = GGUFReader(str(GGUF))
    total = sum(int(t.n_bytes) for t in r.tensors)
    assert m.n_layer == 5 and m.n_embd == 64
    kv = m.layer_bytes[0] - sum(int(t.n_bytes) for t in r.tensors if t.name.startswith("blk.0."))
    assert kv > 0 and m.total_bytes == total + 5 * kv


def test_layout_from_gguf_bad_file(tmp_path):
    bad = tmp_path / "x.gguf"
    bad.write_bytes(b"not a gguf")
    with pytest.raises(PlacementError, match="not a readable GGUF"):
        layout_from_gguf(bad)


def test_layout_from_config_counts_parameters_exactly():
    from models.gpt import GPT, GPTConfig

    cfg = GPTConfig(n_layer=3, n_head=2, n_embd=32, vocab_size=64, block_size=16, arch="llama", n_kv_head=1)
    m = layout_from_config(cfg, dtype_bytes=4, n_ctx=16, kv_bytes=2)
    one_block = sum(p.numel() for p in GPT(cfg, layers=(1, 2)).parameters())  # a middle stage: one block only
    kv = 2 * 16 * 1 * 16 * 2  # K and V x ctx x kv heads x head_dim x 2 bytes
    assert m.layer_bytes == [one_block * 4 + kv] * 3
    assert m.first_bytes == cfg.vocab_size * 32 * 4


@pytest.mark.parametrize("text, n", [("8GiB", 8 << 30), ("512M", 512 << 20), ("1.5g", int(1.5 * 2**30)),
                                     ("1000", 1000), ("2 MiB", 2 << 20)])
def test_parse_bytes(text, n):
    assert parse_bytes(text) == n


@pytest.mark.parametrize("text", ["", "lots", "-1G", "0", "1X"])
def test_parse_bytes_bad(text):
    with pytest.raises(ValueError):
        parse_bytes(text)

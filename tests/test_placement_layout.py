"""--layout: auto picks one node when the model fits and pipelining does not pay, splits otherwise;
pipeline gives every node >= 1 layer in proportion to what it may use, or refuses with the numbers."""
from __future__ import annotations

import pytest

from tiers.tier3.placement import (
    ModelLayout,
    Node,
    PlacementError,
    choose_layout,
    hop_seconds,
    place,
    render,
)

MiB = 1 << 20


def _model(n=8, per=10 * MiB, first=4 * MiB, last=4 * MiB, d=1024) -> ModelLayout:
    return ModelLayout("m", [per] * n, first, last, n_embd=d)


def _counts(plan) -> list[int]:
    return [s.layers[1] - s.layers[0] for s in plan.stages]


HEAD_BIG, PEER_SMALL = Node("head", "h", 0, 24 << 30, basis="available RAM"), Node("b", "p", 1, 2 << 30)


def test_auto_serves_a_model_that_fits_on_one_node_with_the_reason():
    plan = choose_layout(_model(), HEAD_BIG, [PEER_SMALL], hop_s=0.5e-3, decode_bps=10e9, expected_load=1)
    assert len(plan.stages) == 1 and _counts(plan) == [8]
    lay = plan.layout
    assert lay["choice"] == "single" and lay["requested"] == "auto" and lay["hop_s"] == 0.0005
    assert "fits the head" in lay["reason"] and "single request" in lay["reason"] and "hop 0.5 ms" in lay["reason"]
    assert "layout: single (" in render(plan)
    # unmeasured link: still one node, and it says so
    assert "not measured" in choose_layout(_model(), HEAD_BIG, [PEER_SMALL]).layout["reason"]


def test_auto_splits_a_model_that_does_not_fit_one_node():
    head = Node("head", "h", 0, 50 * MiB)
    plan = choose_layout(_model(), head, [Node("b", "p", 1, 100 * MiB)], hop_s=1e-3)
    assert plan.layout["choice"] == "pipeline" and "does not fit the head" in plan.layout["reason"]
    assert len(plan.stages) == 2 and all(c >= 1 for c in _counts(plan)) and sum(_counts(plan)) == 8


def test_auto_keeps_the_peer_only_when_batches_are_compute_bound_and_the_hop_is_cheap():
    """A batching engine reads the weights once a step for every request in it, so two stages (each
    reading its half once per micro-batch) win only what the compute of a step adds: the figures of
    bench/serve_two_node.py's model (355M float32: 1.42 GB, 16 GB/s, about 115 GFLOP/s a core)."""
    gpt = ModelLayout("gpt-300m", [int(1.42e9 / 24)] * 24, n_embd=1024, params=355_000_000)
    peer = [Node("b", "p", 1, 20 << 30)]
    rates = {"decode_bps": 16e9, "decode_flops": 115e9, "hop_s": 1e-3}
    four = choose_layout(gpt, HEAD_BIG, peer, expected_load=4, **rates)      # memory-bound: measured 1.03x
    assert four.layout["choice"] == "single" and four.layout["gain"] < 1.15, four.layout
    assert "4 requests in flight" in four.layout["reason"] and "under the 1.15x" in four.layout["reason"]
    sixteen = choose_layout(gpt, HEAD_BIG, peer, expected_load=16, **rates)  # measured 1.15x, 1.25x projected
    assert sixteen.layout["choice"] == "pipeline" and sixteen.layout["gain"] >= 1.15, sixteen.layout
    assert "pipelining pays" in sixteen.layout["reason"] and len(sixteen.stages) == 2
    # a slow link eats the gain; a model whose compute is unknown is never split for speed
    assert choose_layout(gpt, HEAD_BIG, peer, expected_load=16, **{**rates, "hop_s": 0.05}).layout["choice"] == "single"
    unknown = ModelLayout("m", gpt.layer_bytes, n_embd=1024)
    assert choose_layout(unknown, HEAD_BIG, peer, expected_load=64, **rates).layout["choice"] == "single"


def test_pipeline_gives_a_small_peer_a_layer_instead_of_none():
    # proportional alone gives the 2 GiB peer 4 * 2/26 -> 0 layers: "2 nodes" served on one
    assert _counts(place(_model(n=4), [HEAD_BIG, PEER_SMALL])) == [4, 0]
    plan = choose_layout(_model(n=4), HEAD_BIG, [PEER_SMALL], "pipeline")
    assert _counts(plan) == [3, 1] and plan.layout["choice"] == "pipeline"


def test_pipeline_gives_a_small_head_a_layer_or_refuses_with_the_numbers():
    peer = Node("b", "p", 1, 1 << 30)
    plan = choose_layout(_model(), Node("head", "h", 0, 20 * MiB), [peer], "pipeline", headroom=0.0,
                         last_on="last")
    assert _counts(plan)[0] >= 1 and plan.stages[0].bytes <= plan.stages[0].usable_bytes
    with pytest.raises(PlacementError) as e:   # 6 MiB: the embeddings (4 MiB) and no room for a 10 MiB layer
        choose_layout(_model(), Node("head", "h", 0, 6 * MiB, basis="memory budget"), [peer], "pipeline",
                      headroom=0.0, last_on="last")
    msg = str(e.value)
    assert "head can hold no layer of m" in msg and "2.00 MiB usable" in msg and "10.00 MiB" in msg, msg
    assert "--layout single" in msg and "\n" not in msg
    with pytest.raises(PlacementError, match="2 layers, too few to give each of 3 nodes"):
        choose_layout(_model(n=2), HEAD_BIG, [PEER_SMALL, PEER_SMALL], "pipeline")
    with pytest.raises(PlacementError, match="needs at least one peer"):
        choose_layout(_model(), HEAD_BIG, [], "pipeline")


def test_single_refuses_what_one_node_cannot_hold_and_names_bad_layouts():
    with pytest.raises(PlacementError, match="needs .* but the node has"):
        choose_layout(_model(), Node("head", "h", 0, 50 * MiB), [PEER_SMALL], "single")
    with pytest.raises(PlacementError, match="--layout must be one of auto, single, pipeline"):
        choose_layout(_model(), HEAD_BIG, [], "spread")


def test_hop_cost_is_a_round_trip_plus_the_hidden_state_both_ways():
    assert hop_seconds(_model(d=1024), None, 1e9) is None
    assert hop_seconds(_model(d=1024), 1e-3, 125e6) == pytest.approx(1e-3 + 2 * 4 * 1024 / 125e6)

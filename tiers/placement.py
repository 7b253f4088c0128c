"""Placement: which node runs which layers, in proportion to each node's free memory.

    ModelLayout (bytes per block, embeddings, output)   +   [Node(free bytes), ...]   (the head first)
      -> place(): usable = free x (1 - HEADROOM); layers in proportion to usable, repaired to fit
      -> Plan: one contiguous layer range per node, printed by render() before any worker starts

The users' complaint this answers (REFERENCE.md): "memory estimates that were
wrong". So the plan is computed from the model's own tensor sizes (per block,
read from the GGUF, or from the GPTConfig), every node keeps a headroom
fraction free, no node is given more than fits, and a model that does not fit
the cluster is refused with the numbers, before anything is launched.

Pure functions over plain data; `tierkit serve` prints `render(plan)` before
starting any worker, and `tierkit fit` prices B17's split with choose_layout,
the function serve runs (which is why this lives outside the tier packages;
tiers/tier3/placement.py re-exports it).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from inventory.units import fmt_bytes
from models.costs import HEADROOM  # the fraction of each node's free memory never planned for


class PlacementError(Exception):
    """The model does not fit, or the inputs make no sense; str() is one line with the numbers."""


@dataclass(frozen=True)
class ModelLayout:
    """Bytes the model needs, split the way placement moves it.

    `layer_bytes[i]` is block i's weights plus its KV cache at the serving
    context; `first_bytes` (token embedding) sits with the first stage,
    `last_bytes` (final norm + output projection) with the stage that makes logits.
    """

    name: str
    layer_bytes: list[int]
    first_bytes: int = 0
    last_bytes: int = 0
    n_embd: int = 0
    source: str = ""
    params: int = 0    # weights a decode step multiplies with (not the embedding lookup); 0 when not known

    @property
    def n_layer(self) -> int:
        return len(self.layer_bytes)

    @property
    def total_bytes(self) -> int:
        return sum(self.layer_bytes) + self.first_bytes + self.last_bytes


@dataclass(frozen=True)
class Node:
    """A machine that can hold layers. `free_bytes` is what placement may use before headroom."""

    name: str
    host: str
    port: int = 0                  # its agent's port (0 for the head itself)
    free_bytes: int = 0
    memory: str = "ram"            # "ram" | "gpu"
    basis: str = ""                # where free_bytes came from, for the printed plan


@dataclass
class Stage:
    node: Node
    layers: tuple[int, int]        # [a, b)
    bytes: int
    usable_bytes: int
    holds_first: bool = False
    holds_last: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.node.name, "host": self.node.host, "port": self.node.port,
                "layers": list(self.layers), "bytes": self.bytes, "usable_bytes": self.usable_bytes,
                "memory": self.node.memory}


@dataclass
class Plan:
    model: ModelLayout
    stages: list[Stage]
    headroom: float = HEADROOM
    notes: list[str] = field(default_factory=list)
    layout: dict[str, Any] = field(default_factory=dict)   # {"choice", "reason", numbers}: choose_layout's

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model.name, "n_layer": self.model.n_layer, "total_bytes": self.model.total_bytes,
                "headroom": self.headroom, "stages": [s.to_dict() for s in self.stages], "layout": self.layout}


# ---------------------------------------------------------------- reading sizes

def layout_from_gguf(path: str | Path, n_ctx: int = 512, kv_bytes: int = 2) -> ModelLayout:
    """Per-block bytes straight from the GGUF's tensor table (`blk.N.*`), plus an f16 KV cache at n_ctx.

    Tensors outside the blocks split into the embedding (first stage) and the
    rest (output norm and projection: the stage that makes logits).
    """
    from gguf import GGUFReader

    path = Path(path)
    try:
        reader = GGUFReader(str(path))
    except Exception as exc:  # noqa: BLE001 - the reader raises many kinds on a bad file; each is one answer
        raise PlacementError(f"{path} is not a readable GGUF file ({type(exc).__name__}): check the path") from None
    blocks: dict[int, int] = {}
    first = last = params = 0
    for t in reader.tensors:
        params += int(t.n_elements) if not t.name.startswith("token_embd") else 0
        m = re.match(r"blk\.(\d+)\.", t.name)
        if m:
            blocks[int(m.group(1))] = blocks.get(int(m.group(1)), 0) + int(t.n_bytes)
        elif t.name.startswith("token_embd"):
            first += int(t.n_bytes)
        else:
            last += int(t.n_bytes)
    if not blocks:
        raise PlacementError(f"{path} has no blk.N tensors: not a decoder GGUF that can be split by layer")
    arch = _field(reader, "general.architecture") or "llama"
    n_embd = int(_field(reader, f"{arch}.embedding_length") or 0)
    n_head = int(_field(reader, f"{arch}.attention.head_count") or 1)
    n_kv = int(_field(reader, f"{arch}.attention.head_count_kv") or n_head)
    kv_per_layer = 2 * n_ctx * (n_embd // max(n_head, 1)) * n_kv * kv_bytes
    n = max(blocks) + 1
    return ModelLayout(name=path.name, layer_bytes=[blocks.get(i, 0) + kv_per_layer for i in range(n)],
                       first_bytes=first, last_bytes=last, n_embd=n_embd, params=params,
                       source=f"GGUF tensor table + f16 KV cache at ctx {n_ctx}")


def _field(reader: Any, key: str) -> Any:
    f = reader.fields.get(key)
    if f is None:
        return None
    value = f.parts[f.data[0]]
    if getattr(value, "dtype", None) is not None and value.dtype.kind == "u" and value.dtype.itemsize == 1:
        return bytes(value).decode("utf-8", "replace")
    return value[0] if len(value) == 1 else value


def layout_from_config(cfg: Any, name: str = "gpt", dtype_bytes: int = 4, n_ctx: int | None = None,
                       kv_bytes: int | None = None) -> ModelLayout:
    """Per-block bytes of models/gpt.py's GPT: one Block built on the meta device, so the count is exact."""
    import torch

    from models.gpt import Block

    with torch.device("meta"):
        block = Block(cfg, 0)
    block_params = sum(p.numel() for p in block.parameters())
    per_block = block_params * dtype_bytes
    ctx = n_ctx or cfg.block_size
    kv = 2 * ctx * cfg.kv_heads * cfg.head_dim * (kv_bytes or dtype_bytes)
    d = cfg.n_embd
    first = cfg.vocab_size * d + (cfg.block_size * d if cfg.arch == "gpt2" else 0)
    last = d * (2 if cfg.has_bias else 1) + cfg.vocab_size * d  # final norm + output (a copy when tied)
    return ModelLayout(name=name, layer_bytes=[per_block + kv] * cfg.n_layer, first_bytes=first * dtype_bytes,
                       last_bytes=last * dtype_bytes, n_embd=d, params=block_params * cfg.n_layer + last,
                       source=f"GPTConfig ({dtype_bytes}-byte weights) + KV cache at ctx {ctx}")


# ---------------------------------------------------------------- the split

def place(model: ModelLayout, nodes: list[Node], headroom: float = HEADROOM, overhead_bytes: int = 0,
          last_on: str = "first", min_layers: int = 0) -> Plan:
    """Contiguous layer ranges, node order kept (the first node is the head), sized by free memory.

    Each node may use `free * (1 - headroom) - overhead_bytes`. Layers go out in
    proportion to that usable memory (largest remainders), then any node whose
    layers do not fit gives its excess to the nodes after/before it that have
    room. `last_on` says who holds the output projection: "first" (llama.cpp
    keeps it on the head's CPU) or "last" (a pipeline's final stage).
    `min_layers` (1 for a pipeline layout) is what every node must get.
    Raises PlacementError with the numbers when the cluster is too small.
    """
    if not nodes:
        raise PlacementError("no nodes to place the model on")
    if not 0 <= headroom < 1:
        raise PlacementError(f"headroom must be in [0, 1), got {headroom}")
    if model.n_layer < 1:
        raise PlacementError(f"{model.name} has no layers to place")
    k = len(nodes)
    last_idx = 0 if last_on == "first" else k - 1
    usable = [max(0, int(n.free_bytes * (1 - headroom)) - overhead_bytes) for n in nodes]
    fixed = [0] * k
    fixed[0] += model.first_bytes
    fixed[last_idx] += model.last_bytes
    room = [u - f for u, f in zip(usable, fixed)]

    def refuse(extra: str = "") -> PlacementError:
        return _refusal(model, nodes, usable, headroom, extra)

    if any(r < 0 for r in room):
        bad = nodes[next(i for i, r in enumerate(room) if r < 0)].name
        raise refuse(f"; {bad} cannot even hold the embeddings/output")
    if sum(model.layer_bytes) > sum(room):
        raise refuse()
    if min_layers:
        _check_floor(model, nodes, room, min_layers)
    # Proportional counts by largest remainder, then repair against each node's real capacity.
    total_room = sum(room) or 1
    exact = [model.n_layer * r / total_room for r in room]
    counts = [math.floor(e) for e in exact]
    for i in sorted(range(k), key=lambda i: exact[i] - counts[i], reverse=True)[: model.n_layer - sum(counts)]:
        counts[i] += 1
    for i in range(k):          # the floor, taken from whoever has the most layers above it
        while counts[i] < min_layers:
            counts[max(range(k), key=lambda j: counts[j])] -= 1
            counts[i] += 1
    counts = _repair(counts, room, model.layer_bytes, min_layers)
    if counts is None:
        raise refuse("; no contiguous split fits every node")
    stages, a = [], 0
    for i, (node, c) in enumerate(zip(nodes, counts)):
        b = a + c
        stages.append(Stage(node=node, layers=(a, b), bytes=fixed[i] + sum(model.layer_bytes[a:b]),
                            usable_bytes=usable[i], holds_first=i == 0, holds_last=i == last_idx))
        a = b
    return Plan(model=model, stages=stages, headroom=headroom)


def _refusal(model: ModelLayout, nodes: list[Node], usable: list[int], headroom: float,
             extra: str = "") -> PlacementError:
    """One line with the numbers: what the model needs, what each node can give, what to do."""
    def size(n: float) -> str:
        return fmt_bytes(n, binary=True)

    have = ", ".join(f"{n.name} {size(u)} of {size(n.free_bytes)} free" for n, u in zip(nodes, usable))
    return PlacementError(
        f"{model.name} needs {size(model.total_bytes)} ({model.n_layer} layers x ~{size(max(model.layer_bytes))}"
        f" + {size(model.first_bytes + model.last_bytes)} embeddings/output) but the "
        f"{'cluster' if len(nodes) > 1 else 'node'} has {size(sum(usable))} usable after {headroom:.0%} headroom "
        f"({have}){extra}: add a node, free memory, or use a smaller/quantised model")


def _check_floor(model: ModelLayout, nodes: list[Node], room: list[int], min_layers: int) -> None:
    """Every node can hold `min_layers` layers and there are enough to go round, or PlacementError with the numbers."""
    k = len(nodes)
    if model.n_layer < k * min_layers:
        raise PlacementError(f"{model.name} has {model.n_layer} layers, too few to give each of {k} nodes "
                             f"{min_layers}: use fewer nodes or --layout single")
    need = min(model.layer_bytes) * min_layers
    for n, r in zip(nodes, room):
        if r < need:
            raise PlacementError(
                f"{n.name} can hold no layer of {model.name}: {fmt_bytes(max(r, 0), binary=True)} usable after "
                f"headroom and embeddings/output "
                f"(of {fmt_bytes(n.free_bytes, binary=True)} {n.basis or 'free'}), one layer needs "
                f"{fmt_bytes(need, binary=True)}: raise its memory budget, or serve on one node (--layout single)")


def _repair(counts: list[int], room: list[int], layer_bytes: list[int], floor: int = 0) -> list[int] | None:
    """Move layers off any node whose contiguous range overflows it, toward nodes with room.

    Layers may differ in size (a GGUF with mixed quantisation), so check real
    byte sums, not counts. Bounded: each pass moves one layer; n_layer*k passes.
    """
    k, n = len(counts), len(layer_bytes)

    def load(c: list[int]) -> list[int]:
        out, a = [], 0
        for x in c:
            out.append(sum(layer_bytes[a:a + x]))
            a += x
        return out

    for _ in range(n * k + 1):
        used = load(counts)
        over = [i for i in range(k) if used[i] > room[i]]
        if not over:
            return counts
        i = over[0]
        spare = [(room[j] - used[j], j) for j in range(k) if j != i and room[j] - used[j] >= max(layer_bytes)]
        if not spare or counts[i] <= floor:
            return None
        _, j = max(spare)
        counts[i] -= 1
        counts[j] += 1
    return None


# ---------------------------------------------------------------- the layout

LAYOUTS = ("auto", "single", "pipeline")


def hop_seconds(model: ModelLayout, rtt_s: float | None, link_bps: float | None) -> float | None:
    """Network cost per token per hop: a round trip plus the hidden state (float32) there and back; None unmeasured."""
    if rtt_s is None:
        return None
    wire = 2 * 4 * model.n_embd / link_bps if link_bps else 0.0
    return rtt_s + wire


# Decode steps of a batching engine: one step of B requests reads every weight once and computes
# 2 x params FLOPs per request, and on a CPU the two barely overlap: step(B) = bytes / bandwidth
# + 2 params B / flops. Measured here (355M float32 GPT, one core, oneDNN-packed matrices): 117, 144,
# 171 and 216 ms for 1, 4, 8 and 16 requests, i.e. 6.2 ms a request on top of the weights' stream,
# about 0.7 of one core's share of numpy's large-matmul rate (314 GFLOP/s on 2 cores).
DECODE_FLOPS_SHARE = 0.7
PIPELINE_PAYS = 1.15     # two stages must beat one node by this much to be worth a hop and a second machine


def decode_step_s(model: ModelLayout, rows: float, decode_bps: float, decode_flops: float) -> float:
    """Seconds of one batched decode step of ``rows`` requests on one node (see DECODE_FLOPS_SHARE)."""
    return model.total_bytes / decode_bps + 2 * model.params * rows / decode_flops


def choose_layout(model: ModelLayout, head: Node, others: list[Node], requested: str = "auto", *,
                  headroom: float = HEADROOM, last_on: str = "first", hop_s: float | None = None,
                  decode_bps: float = 10e9, decode_flops: float = 50e9, expected_load: int = 1) -> Plan:
    """The plan `tierkit serve` runs and `tierkit fit` prices, with plan.layout = {"choice", "reason", numbers}.

        single    the head alone (refused with the numbers when the model does not fit it)
        pipeline  every node, each with >= 1 layer in proportion to what it may use (or refused)
        auto      the head alone when the model fits it, unless pipelining pays. A batching engine
                  steps all B requests in flight at once in step(B) (decode_step_s); two stages
                  each hold half the weights and take turns with two micro-batches of B/2, so B
                  tokens take step(B/2) + a hop each way. Reading the weights once per micro-batch
                  means pipelining pays only once the compute of a step outweighs its weights'
                  stream: when step(B) / (step(B/2) + 2 hops) >= PIPELINE_PAYS. One request cannot
                  overlap stages; a model too big for the head is split.
    """
    if requested not in LAYOUTS:
        raise PlacementError(f"--layout must be one of {', '.join(LAYOUTS)}, not {requested!r}")
    step_s = decode_step_s(model, 1, decode_bps, decode_flops)
    numbers = {"model_bytes": model.total_bytes, "params": model.params, "step_s": round(step_s, 6),
               "decode_bps": decode_bps, "decode_flops": decode_flops,
               "hop_s": None if hop_s is None else round(hop_s, 6), "expected_load": expected_load,
               "nodes": 1 + len(others)}

    def done(plan: Plan, choice: str, reason: str) -> Plan:
        plan.layout = {"requested": requested, "choice": choice, "reason": reason, **numbers}
        return plan

    if requested == "pipeline" and not others:
        raise PlacementError("--layout pipeline needs at least one peer and none was found: start `tierkit agent` "
                             "on another machine, name it with --peers HOST:PORT, or use --layout single")
    if requested == "single" or not others:
        why = "--layout single" if requested == "single" else "no peers"
        return done(place(model, [head], headroom, last_on=last_on), "single", why)
    if requested == "pipeline":
        return done(place(model, [head, *others], headroom, last_on=last_on, min_layers=1), "pipeline",
                    "--layout pipeline")
    try:
        alone = place(model, [head], headroom, last_on=last_on)
    except PlacementError:
        alone = None
    if alone is None:
        usable = int(head.free_bytes * (1 - headroom))
        return done(place(model, [head, *others], headroom, last_on=last_on, min_layers=1), "pipeline",
                    f"{model.name} ({fmt_bytes(model.total_bytes, binary=True)}) does not fit the head "
                    f"({fmt_bytes(usable, binary=True)} usable)")
    fits = f"{model.name} ({fmt_bytes(model.total_bytes, binary=True)}) fits the head"
    if hop_s is None:
        return done(alone, "single", f"{fits}; the network cost per token is not measured")
    if expected_load < 2:
        return done(alone, "single", f"{fits}; a single request cannot overlap stages, so every hop only adds "
                    f"(step {step_s * 1e3:.3g} ms, hop {hop_s * 1e3:.3g} ms)")
    one = decode_step_s(model, expected_load, decode_bps, decode_flops)
    two = decode_step_s(model, expected_load / 2, decode_bps, decode_flops) + 2 * hop_s
    numbers["gain"] = round(one / two, 3)
    why = (f"{expected_load} requests in flight: one node steps them in {one * 1e3:.3g} ms, two stages in "
           f"{two * 1e3:.3g} ms (two micro-batches of {expected_load / 2:g}, hops {hop_s * 1e3:.3g} ms): "
           f"{one / two:.2f}x")
    if one / two >= PIPELINE_PAYS:
        try:
            split = place(model, [head, *others], headroom, last_on=last_on, min_layers=1)
        except PlacementError:
            split = None
        if split is not None:
            return done(split, "pipeline", f"{fits}, but pipelining pays: {why}")
    return done(alone, "single", f"{fits}; {why}, under the {PIPELINE_PAYS}x that pays for a hop")


def render(plan: Plan) -> str:
    """The plan as a plain table, printed before any worker starts."""
    m = plan.model
    rows = [("node", "address", "layers", "count", "needs", "usable", "free (basis)")]
    for s in plan.stages:
        a, b = s.layers
        extra = "+emb" if s.holds_first else ""
        extra += "+out" if s.holds_last else ""
        addr = s.node.host + (f":{s.node.port}" if s.node.port else "")
        rows.append((s.node.name, addr, f"{a}-{b - 1}{extra}" if b > a else f"-{extra}", str(b - a),
                     fmt_bytes(s.bytes, binary=True), fmt_bytes(s.usable_bytes, binary=True),
                     f"{fmt_bytes(s.node.free_bytes, binary=True)} ({s.node.basis or s.node.memory})"))
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    lines = [(f"placement of {m.name}: {m.n_layer} layers, {fmt_bytes(m.total_bytes, binary=True)} ({m.source}); "
              f"headroom {plan.headroom:.0%}")]
    for i, r in enumerate(rows):
        lines.append("  ".join(x.ljust(w) for x, w in zip(r, widths)).rstrip())
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    lines += plan.notes
    if plan.layout:
        lines.append(f"layout: {plan.layout['choice']} ({plan.layout['reason']})")
    return "\n".join(lines)


def engine_stage(stage: Stage, port: int = 0, **extra: Any) -> dict[str, Any]:
    """One stage as engines take it: {"name", "host", "port", "layers": [a, b], **extra}.

    `port` is the engine's own (a worker's RPC port, the head's rendezvous), not the agent's."""
    return {"name": stage.node.name, "host": stage.node.host, "port": port, "layers": list(stage.layers), **extra}


def stages_for_engine(plan: Plan) -> list[dict[str, Any]]:
    """The per-node assignments engines take, each with its node's own port: [{"host", "port", "layers", "name"}]."""
    return [engine_stage(s, s.node.port) for s in plan.stages]

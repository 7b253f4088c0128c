"""What the pipeline measures, per stage and per hop: where a token's time goes, and what crosses the wire.

    every reply carries each stage's compute time for that step (the header's ms slots)
    round trip (head send -> reply) - the workers' compute = the network and messaging
    bytes per hop: the header + hidden state forward, the reply back

A step is one micro-batch: B requests' rows through every stage at once. Steps
where every entry decodes (one position each) are counted apart from steps
with prompt chunks: per decode token they are what a token costs once the
prompt is in the caches (a batch's compute divided among its tokens).
Batch sizes, prompt chunks, steps that mix a chunk with decoding tokens and the
most micro-batches ever in flight show the batching itself.
"""
from __future__ import annotations

import time
from collections import deque
from typing import Any

from tiers.tier3.pipeline.source import NAME


class PipelineStats:
    """Per-stage compute, bytes per hop, round trips and tokens/s; read and written under the engine's lock."""

    def __init__(self, W: int):
        self.W = W
        self.compute_ms = [0.0] * W          # every step
        self.decode_ms = [0.0] * W           # one-token (decode) steps only
        self.decode_steps = 0
        self.hop_bytes = [0] * W             # hop i: stage i -> i+1; hop W-1: last stage -> head
        self.decode_hop_bytes = [0] * W
        self.rtt_ms = self.net_ms = 0.0      # decode steps: head send -> reply; that minus the workers' compute
        self.rtt_n = 0
        self.tokens = 0
        self.steps = self.chunks = self.mixed = self.max_in_flight = 0
        self.sizes: dict[int, int] = {}      # entries per micro-batch -> how many steps had that many
        self.recent: deque[float] = deque()

    def batch(self, sizes: list[int], decoding: int, ms: list[float], fwd_bytes: int = 0, reply_bytes: int = 0,
              rtt: float | None = None) -> None:
        """A finished micro-batch: positions per entry, how many entries decoded, each stage's compute,
        the bytes it put on every hop, its round trip (head send -> reply)."""
        B = len(sizes)
        self.steps += 1
        self.sizes[B] = self.sizes.get(B, 0) + 1
        self.chunks += B - decoding
        self.mixed += 0 < decoding < B
        for i, m in enumerate(ms[: self.W]):
            self.compute_ms[i] += m
        hops = [fwd_bytes] * (self.W - 1) + [reply_bytes] if self.W > 1 else [0]
        for i, b in enumerate(hops):
            self.hop_bytes[i] += b
        if decoding != B:
            return
        self.decode_steps += B          # decode tokens: a batch's costs are shared by its B tokens
        for i, m in enumerate(ms[: self.W]):
            self.decode_ms[i] += m
        for i, b in enumerate(hops):
            self.decode_hop_bytes[i] += b
        if rtt is not None:
            self.rtt_ms += rtt
            self.net_ms += rtt - sum(ms[1:self.W])
            self.rtt_n += 1

    def in_flight(self, n: int) -> None:
        self.max_in_flight = max(self.max_in_flight, n)

    def token(self) -> None:
        self.tokens += 1
        now = time.monotonic()
        self.recent.append(now)
        while self.recent and now - self.recent[0] > 10.0:
            self.recent.popleft()

    def report(self, stages: list[dict[str, Any]], state: str, epoch: int) -> dict[str, Any]:
        d = max(self.decode_steps, 1)
        span = (self.recent[-1] - self.recent[0]) if len(self.recent) > 1 else 0.0
        return {
            "engine": NAME, "state": state, "epoch": epoch, "tokens": self.tokens,
            "tokens_per_s": round((len(self.recent) - 1) / span, 3) if span > 0 else 0.0,
            "decode_steps": self.decode_steps,
            "batching": {"steps": self.steps, "sizes": {str(k): v for k, v in sorted(self.sizes.items())},
                         "max_batch": max(self.sizes, default=0),
                         "mean_batch": round(sum(k * v for k, v in self.sizes.items()) / max(self.steps, 1), 3),
                         "prompt_chunks": self.chunks, "mixed_steps": self.mixed,
                         "max_micro_batches_in_flight": self.max_in_flight},
            "stages": [{"rank": i, "host": s["host"], "layers": s["layers"],
                        "compute_ms_total": round(self.compute_ms[i], 3),
                        "decode_compute_ms_total": round(self.decode_ms[i], 3),
                        "decode_compute_ms_per_token": round(self.decode_ms[i] / d, 3)}
                       for i, s in enumerate(stages)],
            "hops": [{"from": i, "to": (i + 1) % self.W, "bytes": self.hop_bytes[i],
                      "decode_bytes": self.decode_hop_bytes[i],
                      "decode_bytes_per_token": round(self.decode_hop_bytes[i] / d, 1)}
                     for i in range(self.W)] if self.W > 1 else [],
            "decode_round_trip_ms": round(self.rtt_ms / self.rtt_n, 3) if self.rtt_n else None,
            "decode_network_ms": round(self.net_ms / self.rtt_n, 3) if self.rtt_n else None,
            "round_trips": {"n": self.rtt_n, "ms_total": round(self.rtt_ms, 3),
                            "network_ms_total": round(self.net_ms, 3)},
        }

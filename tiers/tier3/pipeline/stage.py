"""One stage's computation: a slice of the GPT's blocks serving many requests, and how to cut the model.

    StageRunner(model).step(rid, x, start, max_len)   one request's positions through this stage's blocks,
                                                      each request with its own KV cache (models.gpt.KVCache)
    StageRunner.sample(rid, logits, ...)              the last stage samples: one token goes back, not the logits
    split_layers(cfg, n)                              contiguous ranges that balance decode compute
"""
from __future__ import annotations

import time
from typing import Any


class StageRunner:
    """A GPT stage serving many requests: one KV cache per request id (and one sampler, on the last stage)."""

    def __init__(self, model: Any):
        self.model = model
        self.caches: dict[int, Any] = {}
        self.gens: dict[int, Any] = {}

    def step(self, rid: int, inp: Any, start: int, max_len: int) -> Any:
        """Run this stage for one request; hidden states out, or the last position's logits on the last stage."""
        import torch

        from models.gpt import KVCache

        if start == 0:
            self.caches[rid] = KVCache(self.model, batch_size=1, max_len=max_len)
        cache = self.caches.get(rid)
        if cache is None or cache.pos != start:
            raise RuntimeError(f"request {rid}: stage has position {None if cache is None else cache.pos}, "
                               f"message says {start}")
        with torch.no_grad():
            return self.model.forward_stage(inp, cache)

    def sample(self, rid: int, logits: Any, temperature: float, top_k: int, top_p: float, seed: int) -> int:
        import torch

        from models.gpt import sample_next

        gen = self.gens.get(rid)
        if gen is None and temperature > 0:
            gen = self.gens[rid] = torch.Generator(device=logits.device).manual_seed(seed)
        return int(sample_next(logits[:, -1, :], temperature, top_k or None, top_p, gen)[0, 0])

    def free(self, rid: int) -> None:
        self.caches.pop(rid, None)
        self.gens.pop(rid, None)

    def clear(self) -> None:
        self.caches.clear()
        self.gens.clear()


def split_layers(cfg: Any, n_stages: int, head_blocks: float | None = None) -> list[tuple[int, int]]:
    """Contiguous ranges that balance decode compute. The last stage also runs the output
    projection, worth ``head_blocks`` blocks (default: its weights over a block's, as decode
    reads every weight once per token; ``measure_head_blocks`` times it on this machine);
    the first stage's embedding is a lookup and costs nothing."""
    if head_blocks is None:
        per_block = 12 * cfg.n_embd ** 2 if cfg.arch == "gpt2" else (
            2 * cfg.n_embd ** 2 + 2 * cfg.n_embd * cfg.kv_heads * cfg.head_dim + 3 * cfg.n_embd * cfg.hidden)
        head_blocks = cfg.vocab_size * cfg.n_embd / per_block
    total = cfg.n_layer + head_blocks
    bounds = [0]
    for k in range(1, n_stages):
        bounds.append(min(cfg.n_layer - (n_stages - k), max(bounds[-1] + 1, round(total * k / n_stages))))
    bounds.append(cfg.n_layer)
    return [(bounds[i], bounds[i + 1]) for i in range(n_stages)]


def measure_head_blocks(cfg: Any, reps: int = 20, ctx: int = 64) -> float:
    """The output projection's decode time in blocks' decode time, timed here (best of ``reps``):
    the analytic ratio misses how well each matrix shape runs on this CPU."""
    import torch

    from models.gpt import GPT, KVCache

    torch.manual_seed(0)
    small = GPT(type(cfg)(**{**cfg.to_dict(), "n_layer": 2}), layers=range(1, 2))   # one block + norm + head
    cache = KVCache(small, 1, ctx)
    x = torch.randn(1, 1, cfg.n_embd)
    best_block = best_head = float("inf")
    with torch.no_grad():
        for i in range(reps):
            cache.pos = i % (ctx - 1)
            t = time.perf_counter()
            h = small.blocks(x, cache, cache.pos)
            t1 = time.perf_counter()
            small.head(h)
            t2 = time.perf_counter()
            best_block, best_head = min(best_block, t1 - t), min(best_head, t2 - t1)
    return best_head / best_block

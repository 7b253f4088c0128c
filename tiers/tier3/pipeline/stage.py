"""One stage's computation: a slice of the GPT's blocks serving many requests, and how to cut the model.

    StageRunner(model).step(rid, x, start, max_len)   one request's positions through this stage's blocks,
                                                      each request with its own KV cache (models.gpt.KVCache)
    StageRunner.step_batch([(rid, T, start, max_len), ...], x)
                                                      several requests' positions as one ragged batch:
        x (1, N = sum T, C) -- norms, q/k/v, projections, MLP: one matmul over all N rows (weights read once)
                            -- attention: per request, its T rows against its own cache (0 .. start+T)
    StageRunner.sample(rid, logits, ...)              the last stage samples: one token goes back, not the logits
    pack_linears(model)                               float32 on a CPU: every matrix laid out once for oneDNN
    split_layers(cfg, n)                              contiguous ranges that balance decode compute
"""
from __future__ import annotations

import time
from typing import Any


class StageRunner:
    """A GPT stage serving many requests: one KV cache per request id (and one sampler, on the last stage)."""

    def __init__(self, model: Any):
        self.model = pack_linears(model)
        self.caches: dict[int, Any] = {}
        self.gens: dict[int, Any] = {}

    def step(self, rid: int, inp: Any, start: int, max_len: int) -> Any:
        """Run this stage for one request; hidden states out, or the last position's logits on the last stage."""
        import torch

        cache = self._cache(rid, start, max_len)
        with torch.no_grad():
            return self.model.forward_stage(inp, cache)

    def step_batch(self, entries: list[tuple[int, int, int, int]], x: Any) -> Any:
        """Run this stage for several requests at once: ``entries`` are (rid, T, start, max_len) in the
        order of their rows in ``x`` (token ids (1, N) on the first stage, hidden states (1, N, C) after).
        Hidden states (1, N, C) out, or on the last stage each entry's last-position logits (B, vocab).

        Ragged, not padded: the rows of all requests go through every matmul together, and only
        attention is split per request, so no position is computed twice and no mask hides padding."""
        import torch

        from models.gpt import rope_cos_sin

        m, cfg = self.model, self.model.config
        caches = [self._cache(rid, start, max_len) for rid, _, start, max_len in entries]
        sizes = [e[1] for e in entries]
        with torch.no_grad():
            if m.has_embed:
                h = torch.cat([m.embed(ids, e[2]) for ids, e in zip(torch.split(x, sizes, dim=1), entries)], dim=1)
            else:
                h = x
            rope = None
            if cfg.arch == "llama":
                where = torch.cat([torch.arange(s, s + T) for _, T, s, _ in entries]).to(h.device)
                rope = rope_cos_sin(cfg, where, h.dtype)
            for block in m.transformer.h.values():
                h = h + _ragged_attention(block.attn, block.ln_1(h), entries, caches, rope)
                h = h + block.mlp(block.ln_2(h))
            for cache, (_, T, start, _) in zip(caches, entries):
                cache.pos = start + T
            if not m.has_head:
                return h
            last = torch.tensor(sizes, device=h.device).cumsum(0) - 1
            return m.head(h[0, last, :])

    def _cache(self, rid: int, start: int, max_len: int) -> Any:
        from models.gpt import KVCache

        if start == 0:
            self.caches[rid] = KVCache(self.model, batch_size=1, max_len=max_len)
        cache = self.caches.get(rid)
        if cache is None or cache.pos != start:
            raise RuntimeError(f"request {rid}: stage has position {None if cache is None else cache.pos}, "
                               f"message says {start}")
        return cache

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


class _PackedLinear:
    """A linear layer whose weight oneDNN has laid out for itself, once, at load: the same numbers
    (to float32 rounding) in the same memory. The plain layout goes through MKL's GEMM, which
    repacks the weight on every call. Measured here on one core, a 355M GPT's decode step, plain vs
    packed: 1 request 106 vs 117 ms, 4 requests 212 vs 144, 8 requests 293 vs 171, 16: 319 vs 216."""

    def __init__(self, lin: Any):
        import torch

        self.weight = torch.ops.mkldnn._reorder_linear_weight(lin.weight.detach(), None)
        self.bias = None if lin.bias is None else lin.bias.detach()

    def __call__(self, x: Any) -> Any:
        import torch

        return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")


class _SharedLinear:
    """A linear layer whose weight is also the embedding's, so it keeps its plain layout; from 4 rows
    on it runs as weight @ x^T, which reads the matrix once: the 50304-row output projection of a
    355M GPT, 16 rows, 45 ms as x @ weight^T and 28 ms so (both 15 ms for one row)."""

    def __init__(self, lin: Any):
        self.weight = lin.weight.detach()
        self.bias = None if lin.bias is None else lin.bias.detach()

    def __call__(self, x: Any) -> Any:
        import torch
        import torch.nn.functional as F

        rows = x.reshape(-1, x.shape[-1])
        if rows.shape[0] < 4:
            return F.linear(x, self.weight, self.bias)
        y = torch.mm(self.weight, rows.t()) if self.bias is None else torch.addmm(self.bias[:, None], self.weight,
                                                                                   rows.t())
        return y.t().reshape(*x.shape[:-1], -1)


def pack_linears(model: Any) -> Any:
    """Swap each ``nn.Linear`` of a float32 CPU ``model`` for one laid out for batched decode, in place,
    in the same memory: oneDNN-packed, or for a weight tied to the embedding (whose lookup needs the
    plain rows) the plain one run as weight @ x^T. A model on a GPU, not float32, or on a torch
    without oneDNN is left as it is."""
    import torch

    p = next(model.parameters(), None)
    if p is None or p.device.type != "cpu" or p.dtype != torch.float32 or not torch.backends.mkldnn.is_available():
        return model
    embedded = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    slots = [(parent, name) for parent in model.modules() for name, child in parent.named_children()
             if isinstance(child, torch.nn.Linear)]
    for parent, name in slots:   # one matrix at a time: each plain one is freed before the next is packed
        child = getattr(parent, name)
        fast = _SharedLinear(child) if id(child.weight) in embedded else _PackedLinear(child)
        delattr(parent, name)
        object.__setattr__(parent, name, fast)
        del child
    return model


def _ragged_attention(attn: Any, x: Any, entries: list[tuple[int, int, int, int]], caches: list[Any],
                      rope: tuple[Any, Any] | None) -> Any:
    """One attention layer over the ragged rows of several requests: q/k/v and the output projection
    for all rows at once; each request's rows attend to its own cache (what models.gpt's layer does
    for one request, so each request's numbers are those of a single-request step)."""
    import torch
    import torch.nn.functional as F

    from models.gpt import apply_rope

    cfg, layer = attn.cfg, attn.layer
    hd, nh, nkv = cfg.head_dim, cfg.n_head, cfg.kv_heads
    q_all, k_all, v_all = attn.c_attn(x)[0].split((nh * hd, nkv * hd, nkv * hd), dim=1)
    outs, row = [], 0
    for (_, T, start, _), cache in zip(entries, caches):
        rows = slice(row, row + T)
        q = q_all[rows].view(1, T, nh, hd).transpose(1, 2)
        k = k_all[rows].view(1, T, nkv, hd).transpose(1, 2)
        v = v_all[rows].view(1, T, nkv, hd).transpose(1, 2)
        if rope is not None:
            cos, sin = rope[0][rows], rope[1][rows]
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        end = start + T
        if end > cache.max_len:
            raise ValueError(f"KV cache holds {cache.max_len} positions; {end} asked")
        cache.k[layer][:, :, start:end] = k
        cache.v[layer][:, :, start:end] = v
        keys, vals = cache.k[layer][:, :, :end], cache.v[layer][:, :, :end]
        if nkv != nh:
            keys, vals = keys.repeat_interleave(nh // nkv, dim=1), vals.repeat_interleave(nh // nkv, dim=1)
        if T == 1:
            y = F.scaled_dot_product_attention(q, keys, vals)
        elif start == 0:
            y = F.scaled_dot_product_attention(q, keys, vals, is_causal=True)
        else:   # a prompt chunk after cached positions: row i sees 0 .. start + i
            seen = torch.arange(end, device=x.device)[None, :] <= (start + torch.arange(T, device=x.device))[:, None]
            y = F.scaled_dot_product_attention(q, keys, vals, attn_mask=seen)
        outs.append(y.transpose(1, 2).reshape(T, cfg.n_embd))
        row += T
    return attn.c_proj(torch.cat(outs)[None])


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
    small = pack_linears(GPT(type(cfg)(**{**cfg.to_dict(), "n_layer": 2}), layers=range(1, 2)))  # block + norm + head
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

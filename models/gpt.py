"""A small decoder-only transformer in torch, shared by B11-B14, B16 and tier-3 serving.

Two flavours behind one config:

- ``arch="gpt2"`` (nanoGPT): LayerNorm, learned positions, GELU MLP, optional biases.
- ``arch="llama"``: RMSNorm, rotary positions (Hugging Face's half-split layout),
  SwiGLU MLP, no biases, grouped-query attention (``n_kv_head``). This is the
  flavour that exports to a llama-architecture GGUF (B16) and that a Hugging
  Face Llama checkpoint maps onto.

What serving needs:

- ``KVCache``: keys and values of one batch of sequences, per layer, preallocated;
  decoding one token costs one position of attention, not a re-run of the prefix.
- Layer ranges: ``GPT(cfg, layers=range(a, b))`` builds only blocks a..b-1 (plus
  the embedding when a == 0, the final norm and head when b == n_layer), with the
  same parameter names as the full model, so a pipeline stage loads exactly its
  slice of a full state dict (``load_checkpoint(path, layers=...)``).
- ``seed=``: every layer is initialised from its own generator, so a stage built
  with a seed holds exactly the weights of the same layers of a full model built
  with that seed (random-weight benchmarks need no weight files).

The analytic twin is ``models.costs.gpt_params`` (a test checks both count the same
parameters for the gpt2 flavour). torch is imported here and nowhere on the
probe/fit path.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from inventory.files import atomic_path

ARCHES = ("gpt2", "llama")


@dataclass
class GPTConfig:
    vocab_size: int = 50304      # GPT-2's 50257 padded up to a multiple of 64 (faster matmuls)
    block_size: int = 1024       # context length
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True            # biases in Linear and LayerNorm (gpt2 only); False is a bit faster and as good
    arch: str = "gpt2"           # "gpt2" or "llama" (see the module docstring)
    n_kv_head: int | None = None  # grouped-query attention: heads that share keys/values (None: n_head)
    ffn_hidden: int | None = None  # MLP width (None: 4*n_embd for gpt2, 8/3*n_embd rounded up to 32 for llama)
    tie_weights: bool = True     # the output projection is the token embedding matrix
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0

    def __post_init__(self) -> None:
        if self.arch not in ARCHES:
            raise ValueError(f"arch must be one of {ARCHES}, not {self.arch!r}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd {self.n_embd} is not a multiple of n_head {self.n_head}")
        if self.kv_heads < 1 or self.n_head % self.kv_heads:
            raise ValueError(f"n_head {self.n_head} is not a multiple of n_kv_head {self.n_kv_head}")
        if self.arch == "llama" and (self.head_dim % 2):
            raise ValueError(f"rotary positions need an even head size, not {self.head_dim}")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head or self.n_head

    @property
    def hidden(self) -> int:
        if self.ffn_hidden:
            return self.ffn_hidden
        return 4 * self.n_embd if self.arch == "gpt2" else 32 * math.ceil(8 * self.n_embd / 3 / 32)

    @property
    def has_bias(self) -> bool:
        return self.bias and self.arch == "gpt2"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GPTConfig:
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown GPTConfig field(s): {', '.join(unknown)}")
        return cls(**d)


# ---------------------------------------------------------------- building blocks

def _norm(cfg: GPTConfig) -> nn.Module:
    if cfg.arch == "llama":
        return nn.RMSNorm(cfg.n_embd, eps=cfg.norm_eps)
    return nn.LayerNorm(cfg.n_embd, eps=cfg.norm_eps, bias=cfg.bias)


def rope_cos_sin(cfg: GPTConfig, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of shape (T, head_dim) for the given positions (Hugging Face's half-split layout)."""
    hd = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, hd, 2, device=positions.device, dtype=torch.float32) / hd))
    angles = positions.to(torch.float32)[:, None] * inv_freq[None, :]
    emb = torch.cat((angles, angles), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (B, heads, T, head_dim) by position: pairs (i, i + head_dim/2) turn by angle pos * theta^(-2i/d)."""
    return x * cos + _rotate_half(x) * sin


class KVCache:
    """Keys and values of one batch of sequences for the layers of one model or stage.

    Preallocated to ``max_len`` positions; ``pos`` is how many are filled. The
    model writes each step's keys/values at ``pos`` and advances it once all its
    layers have run, so a stage and its cache always agree on the position.
    """

    def __init__(self, model: GPT, batch_size: int = 1, max_len: int | None = None,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        cfg = model.config
        self.max_len = max_len or cfg.block_size
        p = next(model.parameters())
        device, dtype = device or p.device, dtype or p.dtype
        shape = (batch_size, cfg.kv_heads, self.max_len, cfg.head_dim)
        self.k = {i: torch.zeros(shape, device=device, dtype=dtype) for i in model.layer_ids}
        self.v = {i: torch.zeros(shape, device=device, dtype=dtype) for i in model.layer_ids}
        self.pos = 0

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.k.values(), *self.v.values()))


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig, layer: int):
        super().__init__()
        self.cfg, self.layer = cfg, layer
        hd, nkv = cfg.head_dim, cfg.kv_heads
        # q, k, v in one matmul: n_head query heads, then n_kv_head key heads and value heads
        self.c_attn = nn.Linear(cfg.n_embd, (cfg.n_head + 2 * nkv) * hd, bias=cfg.has_bias)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.has_bias)
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None,
                cache: KVCache | None, start: int) -> torch.Tensor:
        cfg = self.cfg
        B, T, C = x.shape
        hd, nh, nkv = cfg.head_dim, cfg.n_head, cfg.kv_heads
        q, k, v = self.c_attn(x).split((nh * hd, nkv * hd, nkv * hd), dim=2)
        # (B, T, heads*hd) -> (B, heads, T, hd): each head attends on its own slice
        q = q.view(B, T, nh, hd).transpose(1, 2)
        k = k.view(B, T, nkv, hd).transpose(1, 2)
        v = v.view(B, T, nkv, hd).transpose(1, 2)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is not None:
            if start + T > cache.max_len:
                raise ValueError(f"KV cache holds {cache.max_len} positions; {start + T} asked")
            cache.k[self.layer][:, :, start:start + T] = k
            cache.v[self.layer][:, :, start:start + T] = v
            k = cache.k[self.layer][:, :, :start + T]
            v = cache.v[self.layer][:, :, :start + T]
        if nkv != nh:  # grouped-query attention: each key/value head serves n_head/n_kv_head query heads
            k = k.repeat_interleave(nh // nkv, dim=1)
            v = v.repeat_interleave(nh // nkv, dim=1)
        drop = cfg.dropout if self.training else 0.0
        if T == 1:        # one new token sees every cached position: no mask
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=drop)
        elif start == 0:  # the fused kernel never stores the T x T score matrix
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=drop)
        else:             # a chunk after a cached prefix: position start+i sees 0..start+i
            mask = (torch.arange(start + T, device=x.device)[None, :]
                    <= (start + torch.arange(T, device=x.device))[:, None])
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=drop)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    """gpt2: c_proj(gelu(c_fc x)); llama (SwiGLU): c_proj(silu(gate x) * up x)."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.llama = cfg.arch == "llama"
        if self.llama:
            self.gate = nn.Linear(cfg.n_embd, cfg.hidden, bias=False)
            self.up = nn.Linear(cfg.n_embd, cfg.hidden, bias=False)
        else:
            self.c_fc = nn.Linear(cfg.n_embd, cfg.hidden, bias=cfg.has_bias)
        self.c_proj = nn.Linear(cfg.hidden, cfg.n_embd, bias=cfg.has_bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.silu(self.gate(x)) * self.up(x) if self.llama else F.gelu(self.c_fc(x))
        return self.dropout(self.c_proj(h))


class Block(nn.Module):
    """Pre-norm: x + attn(norm(x)), then x + mlp(norm(x)); the residual stream is never normalised in place."""

    def __init__(self, cfg: GPTConfig, layer: int):
        super().__init__()
        self.ln_1 = _norm(cfg)
        self.attn = CausalSelfAttention(cfg, layer)
        self.ln_2 = _norm(cfg)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, rope=None, cache: KVCache | None = None, start: int = 0) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), rope, cache, start)
        return x + self.mlp(self.ln_2(x))


# ---------------------------------------------------------------- the model

class GPT(nn.Module):
    """The whole decoder, or the slice ``layers`` of it (a pipeline stage)."""

    def __init__(self, cfg: GPTConfig, layers: range | tuple[int, int] | None = None, seed: int | None = None):
        super().__init__()
        self.config = cfg
        lo, hi = (0, cfg.n_layer) if layers is None else (layers.start, layers.stop) if isinstance(layers, range) \
            else tuple(layers)
        if not 0 <= lo < hi <= cfg.n_layer:
            raise ValueError(f"layer range {lo}:{hi} is not inside 0:{cfg.n_layer}")
        self.layer_ids = list(range(lo, hi))
        self.has_embed, self.has_head = lo == 0, hi == cfg.n_layer
        t: dict[str, nn.Module] = {}
        if self.has_embed:
            t["wte"] = nn.Embedding(cfg.vocab_size, cfg.n_embd)      # token embedding
            if cfg.arch == "gpt2":
                t["wpe"] = nn.Embedding(cfg.block_size, cfg.n_embd)  # learned position embedding
            t["drop"] = nn.Dropout(cfg.dropout)
        # keyed by the layer's index in the full model, so names match a full state dict
        t["h"] = nn.ModuleDict({str(i): Block(cfg, i) for i in self.layer_ids})
        if self.has_head:
            t["ln_f"] = _norm(cfg)
        self.transformer = nn.ModuleDict(t)
        if self.has_head:
            self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
            # weight tying: the input embedding and the output projection are one matrix
            # (fewer parameters, and it trains as well or better: Press & Wolf 2017)
            if cfg.tie_weights and self.has_embed:
                self.transformer.wte.weight = self.lm_head.weight
        self.init_weights(seed)

    # -- initialisation: per part, from its own generator when seeded

    def init_weights(self, seed: int | None = None) -> None:
        cfg = self.config

        def gen(part: int) -> torch.Generator | None:
            return None if seed is None else torch.Generator().manual_seed(seed * 1_000_003 + part)

        def init_module(m: nn.Module, g: torch.Generator | None) -> None:
            for name, sub in m.named_modules():
                if isinstance(sub, (nn.Linear, nn.Embedding)):
                    # GPT-2: scale the residual projections by 1/sqrt(2 * n_layer) so the stream's variance stays put
                    std = 0.02 / math.sqrt(2 * cfg.n_layer) if name.endswith("c_proj") else 0.02
                    nn.init.normal_(sub.weight, mean=0.0, std=std, generator=g)
                    if getattr(sub, "bias", None) is not None:
                        nn.init.zeros_(sub.bias)
                elif isinstance(sub, (nn.LayerNorm, nn.RMSNorm)):
                    if sub.weight is not None:
                        nn.init.ones_(sub.weight)
                    if getattr(sub, "bias", None) is not None:
                        nn.init.zeros_(sub.bias)

        with torch.no_grad():
            tr = self.transformer
            if self.has_embed or (self.has_head and cfg.tie_weights):
                # the token embedding, drawn once so a first and a last stage agree when tied
                w = torch.empty(cfg.vocab_size, cfg.n_embd)
                nn.init.normal_(w, mean=0.0, std=0.02, generator=gen(0))
                if self.has_embed:
                    tr.wte.weight.copy_(w)
                if self.has_head and cfg.tie_weights:
                    self.lm_head.weight.copy_(w)
            if self.has_embed and "wpe" in tr:
                init_module(tr.wpe, gen(1))
            for i in self.layer_ids:
                init_module(tr.h[str(i)], gen(10 + i))
            if self.has_head:
                init_module(tr.ln_f, gen(2))
                if not cfg.tie_weights:
                    init_module(self.lm_head, gen(3))

    def num_params(self) -> int:
        """All parameters, the tied matrix counted once (what models.costs.gpt_params predicts)."""
        return sum(p.numel() for p in self.parameters())

    # -- the three parts of a forward pass; a pipeline stage runs the ones it holds

    def embed(self, idx: torch.Tensor, start: int = 0) -> torch.Tensor:
        T = idx.shape[1]
        if start + T > self.config.block_size:
            raise ValueError(f"position {start + T} is past block_size {self.config.block_size}")
        x = self.transformer.wte(idx)
        if "wpe" in self.transformer:
            x = x + self.transformer.wpe(torch.arange(start, start + T, device=idx.device))
        return self.transformer.drop(x)

    def blocks(self, x: torch.Tensor, cache: KVCache | None = None, start: int = 0) -> torch.Tensor:
        rope = None
        if self.config.arch == "llama":
            rope = rope_cos_sin(self.config, torch.arange(start, start + x.shape[1], device=x.device), x.dtype)
        for block in self.transformer.h.values():
            x = block(x, rope, cache, start)
        return x

    def head(self, x: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.transformer.ln_f(x))

    def forward_stage(self, inp: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """One pipeline step: token ids in on the first stage, hidden states in on the others;
        hidden states out, or the last position's logits on the last stage. Advances ``cache.pos``."""
        start = cache.pos if cache is not None else 0
        x = self.embed(inp, start) if self.has_embed else inp
        x = self.blocks(x, cache, start)
        if cache is not None:
            cache.pos = start + x.shape[1]
        return self.head(x[:, -1:, :]) if self.has_head else x

    def logits(self, idx: torch.Tensor) -> torch.Tensor:
        """(B, T, vocab): the prediction at every position, what a training loss reads (B12-B14)."""
        return self.head(self.blocks(self.embed(idx)))

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None,
                cache: KVCache | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        if not (self.has_embed and self.has_head):
            raise RuntimeError("forward() needs the whole model; a stage uses forward_stage()")
        start = cache.pos if cache is not None else 0
        x = self.blocks(self.embed(idx, start), cache, start)
        if cache is not None:
            cache.pos = start + idx.shape[1]
        if targets is None:  # generation: only the last position's logits are needed
            return self.head(x[:, [-1], :]), None
        logits = self.head(x)
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)
        return logits, loss

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int | None = None, top_p: float | None = None, use_cache: bool = True,
                 generator: torch.Generator | None = None, n_tokens: int | None = None) -> torch.Tensor:
        """Append ``max_new_tokens`` tokens; temperature 0 is greedy. With the KV cache each new
        token costs one position; without it (or past block_size) the cropped sequence is re-run.
        n_tokens: sample only ids below it (a vocabulary padded to a multiple of 64 has rows no
        tokenizer can decode)."""
        cache = None
        if use_cache and idx.shape[1] + max_new_tokens <= self.config.block_size:
            cache = KVCache(self, batch_size=idx.shape[0], max_len=idx.shape[1] + max_new_tokens)
        inp = idx
        for _ in range(max_new_tokens):
            if cache is None:
                inp = idx[:, -self.config.block_size:]
            logits, _ = self(inp, cache=cache)
            nxt = sample_next(logits[:, -1, :n_tokens], temperature, top_k, top_p, generator)
            idx = torch.cat((idx, nxt), dim=1)
            inp = nxt
        return idx


def sample_next(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, vocab) logits -> (B, 1) token ids. temperature 0: argmax; top_k keeps the k best;
    top_p keeps the smallest set whose probability reaches p (nucleus sampling)."""
    if temperature <= 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits.float() / temperature
    if top_k is not None and top_k > 0:
        v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
        logits = logits.masked_fill(logits < v[:, [-1]], -float("inf"))
    if top_p is not None and 0 < top_p < 1:
        sorted_logits, order = torch.sort(logits, descending=True)
        cum = F.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        drop = cum - F.softmax(sorted_logits, dim=-1) >= top_p  # mass before this token already reaches p
        sorted_logits = sorted_logits.masked_fill(drop, -float("inf"))
        logits = torch.full_like(logits, -float("inf")).scatter(1, order, sorted_logits)
    return torch.multinomial(F.softmax(logits, dim=-1), num_samples=1, generator=generator)


# ---------------------------------------------------------------- checkpoints

def save_checkpoint(path: str | Path, model: GPT, meta: dict[str, Any] | None = None, **extra: Any) -> Path:
    """Write {config, model state dict, meta, extra...} atomically (inventory.files.atomic_path: a
    temporary file beside it, fsync, rename). A crash leaves the previous checkpoint, never half of a new one."""
    state = {"config": model.config.to_dict(), "model": model.state_dict(), "meta": meta or {}, **extra}
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
    return Path(path)


def load_checkpoint(path: str | Path, layers: range | tuple[int, int] | None = None,
                    map_location: str | torch.device = "cpu") -> tuple[GPT, dict[str, Any]]:
    """The model (or the stage ``layers`` of it, holding only its own weights) and the whole
    checkpoint dict. Raises ValueError with one line when the file is not a tierkit checkpoint."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True, mmap=True)  # a stage reads only its tensors
    except Exception as e:  # noqa: BLE001 - torch raises many kinds for a bad file
        raise ValueError(f"{path}: not a readable torch checkpoint ({type(e).__name__}: {str(e)[:120]})") from None
    if not isinstance(ckpt, dict) or "config" not in ckpt or "model" not in ckpt:
        raise ValueError(f"{path}: not a tierkit GPT checkpoint (no 'config' and 'model' keys)")
    model = GPT(GPTConfig.from_dict(ckpt["config"]), layers=layers)
    own = model.state_dict()
    missing = [k for k in own if k not in ckpt["model"]]
    if missing:
        raise ValueError(f"{path}: checkpoint lacks {len(missing)} tensor(s) for this model, e.g. {missing[0]}")
    model.load_state_dict({k: ckpt["model"][k] for k in own})
    return model, ckpt

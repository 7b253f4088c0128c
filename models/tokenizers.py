"""Tokenizers every tier shares: characters, our own byte-level BPE, GPT-2's BPE through tiktoken.

    text ─► regex chunks (GPT2_SPLIT) ─► UTF-8 bytes ─► merges replayed in learned order ─► ids
                                         BytePairTokenizer.train(text, vocab_size): the merges

    CharTokenizer(text)             one id per distinct character (nanoGPT's shakespeare_char)
    BPETokenizer.train(text, n)     BytePairTokenizer behind the same interface
    TiktokenTokenizer("gpt2")       r50k from a local .tiktoken file (sha256-checked; nothing downloads)
    tokenizer_from_meta(meta)       rebuild the one a checkpoint was trained with
    make_tokenizer(kind, text, n)   "char" | "bpe" | "gpt2"

B2 trains and compares them; B12 trains a model on them; B13, B14, B16 and the
tier-3 pipeline read them back from a checkpoint's meta.
"""
from __future__ import annotations

import base64
import hashlib
import os
import tempfile
from collections import Counter
from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np

# GPT-2's split: contractions, runs of letters, of digits, of other symbols, each with one leading
# space, and whitespace. BPE never merges across these chunks, so " the" and "the," stay apart.
GPT2_SPLIT = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
CL100K_SPLIT = (r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+|"""
                r"""\s++$|\s*[\r\n]|\s+(?!\S)|\s""")



# ---------------------------------------------------------------- our byte-level BPE

class BytePairTokenizer:
    """Byte-level BPE, as GPT-2 does it (after Karpathy's minbpe).

    Text -> regex chunks -> UTF-8 bytes (ids 0-255). Training repeatedly finds the
    most frequent adjacent pair of ids and gives it a new id (256, 257, ...); a
    merge is a pair -> id rule. Encoding replays the merges in the order they
    were learned; decoding joins each id's bytes. Any string round-trips: every
    string is some bytes, and every byte is a token.
    """

    def __init__(self, merges: dict[tuple[int, int], int] | None = None, pattern: str = GPT2_SPLIT):
        import regex

        self.merges = dict(merges or {})
        self.pattern = pattern
        self._split = regex.compile(pattern)
        self.vocab = {i: bytes([i]) for i in range(256)}
        for (a, b), new in sorted(self.merges.items(), key=lambda kv: kv[1]):
            self.vocab[new] = self.vocab[a] + self.vocab[b]
        self._cache: dict[str, list[int]] = {}

    @classmethod
    def train(cls, text: str, vocab_size: int, pattern: str = GPT2_SPLIT,
              on_merge: Any = None) -> BytePairTokenizer:
        """Learn vocab_size - 256 merges from `text`.

        Every chunk is counted once with its frequency, and the chunks' bytes sit
        in one numpy array with -1 between chunks, so one merge is a handful of
        whole-array operations instead of a Python loop over the corpus.
        `on_merge(i, pair, count, tokens_left)` is called after each merge.
        """
        import regex

        if vocab_size < 256:
            raise ValueError(f"vocab_size {vocab_size} is below 256: every byte needs a token")
        chunks = Counter(regex.findall(pattern, text))
        ids_list: list[int] = []
        weight_list: list[int] = []
        for chunk, n in chunks.items():
            b = chunk.encode("utf-8")
            ids_list += [*b, -1]                 # -1 separates chunks: no pair spans two of them
            weight_list += [n] * (len(b) + 1)
        ids = np.array(ids_list, dtype=np.int64)
        weights = np.array(weight_list, dtype=np.int64)
        tokens_left = int(weights[ids >= 0].sum())
        merges: dict[tuple[int, int], int] = {}
        for new in range(256, vocab_size):
            left, right = ids[:-1], ids[1:]
            valid = (left >= 0) & (right >= 0)
            if not valid.any():
                break                            # every chunk is a single token: nothing left to merge
            keys = left[valid] * vocab_size + right[valid]          # one int per pair
            uniq, inverse = np.unique(keys, return_inverse=True)
            counts = np.bincount(inverse, weights=weights[:-1][valid])
            best = int(uniq[np.argmax(counts)])                    # ties: the smallest pair wins
            a, b = divmod(best, vocab_size)
            pos = np.flatnonzero(valid)[keys == best]
            pos = _non_overlapping(pos)          # "aaa" merges (a, a) once, from the left, as minbpe does
            merged = int(weights[pos].sum())     # each merge in a chunk saves one token per occurrence
            ids[pos] = new
            keep = np.ones(len(ids), dtype=bool)
            keep[pos + 1] = False                # the right half of each merged pair goes
            ids, weights = ids[keep], weights[keep]
            merges[(a, b)] = new
            tokens_left -= merged
            if on_merge is not None:
                on_merge(new - 256, (a, b), merged, tokens_left)
        return cls(merges, pattern)

    def _encode_chunk(self, chunk: str) -> list[int]:
        ids = list(chunk.encode("utf-8"))
        while len(ids) >= 2:
            # the pair that was learned first (lowest new id) is merged first, as in training
            pair = min(pairwise(ids), key=lambda p: self.merges.get(p, 1 << 62))
            if pair not in self.merges:
                break
            new, out, i = self.merges[pair], [], 0
            while i < len(ids):
                if i + 1 < len(ids) and (ids[i], ids[i + 1]) == pair:
                    out.append(new)
                    i += 2
                else:
                    out.append(ids[i])
                    i += 1
            ids = out
        return ids

    def encode(self, text: str) -> list[int]:
        out: list[int] = []
        for chunk in self._split.findall(text):
            if chunk not in self._cache:         # words repeat: encode each distinct chunk once
                self._cache[chunk] = self._encode_chunk(chunk)
            out += self._cache[chunk]
        return out

    def decode(self, ids: list[int]) -> str:
        # a token may hold part of a UTF-8 character; only the whole byte string must be valid
        return b"".join(self.vocab[i] for i in ids).decode("utf-8", errors="replace")

    def piece(self, i: int) -> str:
        return self.vocab[i].decode("utf-8", errors="backslashreplace")


def _non_overlapping(pos: np.ndarray) -> np.ndarray:
    """Of consecutive match positions (only possible when the pair is (a, a)), keep every other one."""
    if len(pos) < 2:
        return pos
    run_start = np.r_[True, np.diff(pos) != 1]
    start_of = np.maximum.accumulate(np.where(run_start, np.arange(len(pos)), 0))
    return pos[(np.arange(len(pos)) - start_of) % 2 == 0]


# ---------------------------------------------------------------- tiktoken from local files

# name -> (file, sha256 as published in tiktoken_ext/openai_public.py, split pattern, special tokens, URL
# tiktoken itself would fetch it from: its cache keys files by that URL, so an earlier download is found)
TIKTOKEN = {
    "gpt2": ("gpt2.tiktoken", "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930", GPT2_SPLIT,
             {"<|endoftext|>": 50256}, "https://openaipublic.blob.core.windows.net/encodings/r50k_base.tiktoken"),
    "cl100k_base": ("cl100k_base.tiktoken", "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7",
                    CL100K_SPLIT, {"<|endoftext|>": 100257, "<|fim_prefix|>": 100258, "<|fim_middle|>": 100259,
                                   "<|fim_suffix|>": 100260, "<|endofprompt|>": 100276},
                    "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken"),
}


def tiktoken_dirs() -> list[Path]:
    """Where .tiktoken files are looked for, in order."""
    out = []
    if os.environ.get("TIERKIT_TIKTOKEN_DIR"):
        out.append(Path(os.environ["TIERKIT_TIKTOKEN_DIR"]).expanduser())
    if os.environ.get("TIERKIT_DATA"):
        out.append(Path(os.environ["TIERKIT_DATA"]).expanduser() / "tokenizers")
    out.append(Path.home() / ".cache" / "tierkit" / "tokenizers")
    return out


def find_tiktoken(name: str) -> Path | None:
    """The ranks file for `name` in our places, else in tiktoken's own download cache; sha256-checked."""
    fname, sha, _, _, url = TIKTOKEN[name]
    cache = os.environ.get("TIKTOKEN_CACHE_DIR") or os.environ.get("DATA_GYM_CACHE_DIR") or \
        str(Path(tempfile.gettempdir()) / "data-gym-cache")
    candidates = [d / fname for d in tiktoken_dirs()] + [Path(cache) / hashlib.sha1(url.encode()).hexdigest()]
    for p in candidates:
        if p.is_file() and hashlib.sha256(p.read_bytes()).hexdigest() == sha:
            return p
    return None


def load_ranks(path: Path) -> dict[bytes, int]:
    """A .tiktoken file is one `base64(token bytes) rank` per line: the merge order of a byte-level BPE."""
    ranks = {}
    for line in path.read_bytes().splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


def tiktoken_encoding(name: str, path: Path | None = None) -> Any:
    """A tiktoken Encoding built from a local ranks file: no network, no cache writes."""
    import tiktoken

    fname, _, pattern, special, _ = TIKTOKEN[name]
    path = path or find_tiktoken(name)
    if path is None:
        raise FileNotFoundError(f"{fname} not found in {', '.join(map(str, tiktoken_dirs()))}")
    return tiktoken.Encoding(name=name, pat_str=pattern, mergeable_ranks=load_ranks(path), special_tokens=special)


# ---------------------------------------------------------------- one interface for the models

class CharTokenizer:
    """One token per distinct character of the training text (nanoGPT's shakespeare_char: 65)."""

    kind = "char"

    def __init__(self, text_or_chars: str):
        self.chars = "".join(sorted(set(text_or_chars)))
        self.stoi = {c: i for i, c in enumerate(self.chars)}

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def encode(self, s: str, errors: str = "strict") -> list[int]:
        """errors="strict" raises on a character the vocabulary lacks; "drop" leaves it out."""
        if errors == "drop":
            return [self.stoi[c] for c in s if c in self.stoi]
        try:
            return [self.stoi[c] for c in s]
        except KeyError as e:
            raise ValueError(f"character {e.args[0]!r} is not in this {self.vocab_size}-character vocabulary") from None

    def decode(self, ids: list[int]) -> str:
        return "".join(self.chars[int(i)] for i in ids)

    def meta(self) -> dict[str, Any]:
        return {"kind": "char", "chars": self.chars}


class BPETokenizer:
    """The project's own byte-level BPE (BytePairTokenizer, trained on the text): any string encodes."""

    kind = "bpe"

    def __init__(self, bpe: Any):
        self.bpe = bpe

    @classmethod
    def train(cls, text: str, vocab_size: int) -> BPETokenizer:
        return cls(BytePairTokenizer.train(text, vocab_size))

    @property
    def vocab_size(self) -> int:
        return 256 + len(self.bpe.merges)

    def encode(self, s: str, errors: str = "strict") -> list[int]:
        return self.bpe.encode(s)

    def decode(self, ids: list[int]) -> str:
        return self.bpe.decode([int(i) for i in ids])

    def meta(self) -> dict[str, Any]:
        return {"kind": "bpe", "pattern": self.bpe.pattern,
                "merges": [[a, b, n] for (a, b), n in sorted(self.bpe.merges.items(), key=lambda kv: kv[1])]}


class TiktokenTokenizer:
    """GPT-2's r50k BPE (50,257 tokens) from the local gpt2.tiktoken ranks file, via tiktoken."""

    kind = "tiktoken"

    def __init__(self, name: str = "gpt2"):
        if find_tiktoken(name) is None:
            raise FileNotFoundError(f"{TIKTOKEN[name][0]} not found in {', '.join(map(str, tiktoken_dirs()))}; "
                                    f"put it under $TIERKIT_DATA/tokenizers/ (or set TIERKIT_TIKTOKEN_DIR)")
        self.name = name
        self.enc = tiktoken_encoding(name)

    @property
    def vocab_size(self) -> int:
        return int(self.enc.n_vocab)

    def encode(self, s: str, errors: str = "strict") -> list[int]:
        return self.enc.encode_ordinary(s)

    def decode(self, ids: list[int]) -> str:
        return self.enc.decode([int(i) for i in ids])

    def meta(self) -> dict[str, Any]:
        return {"kind": "tiktoken", "name": self.name}


Tokenizer = CharTokenizer | BPETokenizer | TiktokenTokenizer


def tokenizer_from_meta(meta: dict[str, Any]) -> Tokenizer:
    """Rebuild the tokenizer a checkpoint was trained with (its meta["tokenizer"])."""
    kind = (meta or {}).get("kind")
    if kind == "char":
        return CharTokenizer(meta["chars"])
    if kind == "bpe":
        return BPETokenizer(BytePairTokenizer({(a, b): n for a, b, n in meta["merges"]}, meta.get("pattern", GPT2_SPLIT)))
    if kind == "tiktoken":
        return TiktokenTokenizer(meta.get("name", "gpt2"))
    raise ValueError(f"unknown tokenizer kind {kind!r} in checkpoint meta (expected char, bpe or tiktoken)")


def make_tokenizer(kind: str, text: str, vocab_size: int = 512) -> Tokenizer:
    """kind: "char" | "bpe" (ours, trained on `text` to vocab_size) | "gpt2" (tiktoken r50k)."""
    if kind == "char":
        return CharTokenizer(text)
    if kind == "bpe":
        return BPETokenizer.train(text, vocab_size)
    if kind in ("gpt2", "tiktoken"):
        return TiktokenTokenizer("gpt2")
    raise ValueError(f"tokenizer {kind!r}: use char, bpe or gpt2")

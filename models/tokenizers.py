"""Tokenizers every tier shares: characters, our own byte-level BPE, GPT-2's BPE through tiktoken.

    text ─► regex chunks (GPT2_SPLIT) ─► UTF-8 bytes ─► merges replayed in learned order ─► ids
                                         BytePairTokenizer.train(text, vocab_size): the merges

    CharTokenizer(text)             one id per distinct character (nanoGPT's shakespeare_char)
    BPETokenizer.train(text, n)     BytePairTokenizer behind the same interface
    TiktokenTokenizer("gpt2")       r50k from a local .tiktoken file (sha256-checked; nothing downloads)
    tokenizer_from_meta(meta)       rebuild the one a checkpoint was trained with
    make_tokenizer(kind, text, n)   "char" | "bpe" | "gpt2"
    ByteTokenizer(), HFTokenizer(folder), plain_chat(messages)   what the tier-3 pipeline serves with

B2 trains and compares them; B12 trains a model on them; B13, B14, B16 and the
tier-3 pipeline read them back from a checkpoint's meta.
"""
from __future__ import annotations

import base64
import hashlib
import json
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

    @classmethod
    def from_chars(cls, chars: str) -> CharTokenizer:
        """The vocabulary exactly as saved (a checkpoint's meta): id i is chars[i], in that order."""
        tok = cls("")
        tok.chars, tok.stoi = chars, {c: i for i, c in enumerate(chars)}
        return tok

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
            raise ValueError(f"character {e.args[0]!r} is not in this model's {self.vocab_size}-character "
                             "vocabulary") from None

    def decode(self, ids: list[int]) -> str:
        """Ids past the vocabulary (a model's padded rows, which only an untrained model picks) show as <id>."""
        return "".join(self.chars[int(i)] if 0 <= int(i) < len(self.chars) else f"<{int(i)}>" for i in ids)

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


# ---------------------------------------------------------------- for serving: bytes, a Hugging Face folder, chat

def plain_chat(messages: list[dict[str, str]]) -> str:
    """A chat prompt for a model without a template: one "role: content" line each, then "assistant:"."""
    return "".join(f"{m.get('role', 'user')}: {m.get('content', '')}\n" for m in messages) + "assistant:"


class ByteTokenizer:
    """UTF-8 bytes are ids 0-255 (what a random-weight model is given). Larger ids, which only random
    weights produce, show as <id>, so nothing is silently dropped."""

    kind = "byte"
    vocab_size = 256
    eos_ids: frozenset[int] = frozenset()

    def encode(self, s: str, errors: str = "strict") -> list[int]:
        return list(s.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        out, run = [], bytearray()
        for i in ids:
            if 0 <= i < 256:
                run.append(i)
            else:
                out.append(run.decode("utf-8", errors="replace"))
                run = bytearray()
                out.append(f"<{i}>")
        out.append(run.decode("utf-8", errors="replace"))
        return "".join(out)

    def meta(self) -> dict[str, Any]:
        return {"kind": "byte"}


class HFTokenizer:
    """A Hugging Face model folder's own tokenizer: tokenizer.json through `tokenizers`, the chat template
    of tokenizer_config.json (rendered in a sandboxed Jinja), its end-of-sequence ids from the configs.

    ValueError (one line) when the folder has no tokenizer.json or its template fails on the messages.
    """

    kind = "hf"

    def __init__(self, folder: Path):
        from tokenizers import Tokenizer

        path = Path(folder) / "tokenizer.json"
        if not path.is_file():
            raise ValueError(f"{folder}: no tokenizer.json (save the tokenizer with the model: "
                             f"tokenizer.save_pretrained(folder))")
        self.tok = Tokenizer.from_file(str(path))
        tc = _json_or_empty(Path(folder) / "tokenizer_config.json")
        self.template = tc.get("chat_template")
        self.bos = _token_text(tc.get("bos_token"))
        self.eos = _token_text(tc.get("eos_token"))
        eos: set[int] = set()
        for name in ("config.json", "generation_config.json"):
            e = _json_or_empty(Path(folder) / name).get("eos_token_id")
            eos.update([e] if isinstance(e, int) else [x for x in e or [] if isinstance(x, int)])
        if self.eos and self.tok.token_to_id(self.eos) is not None:
            eos.add(self.tok.token_to_id(self.eos))
        self.eos_ids = frozenset(eos)

    @property
    def vocab_size(self) -> int:
        return int(self.tok.get_vocab_size())

    def encode(self, s: str, errors: str = "strict") -> list[int]:
        # a rendered chat template already starts with BOS: do not add a second one
        special = not (self.bos and s.startswith(self.bos))
        return self.tok.encode(s, add_special_tokens=special).ids

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)

    def chat(self, messages: list[dict[str, str]]) -> str:
        """The folder's chat template applied to OpenAI-style messages, ending where the assistant speaks."""
        if not self.template:
            return plain_chat(messages)
        from jinja2 import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def fail(msg: str) -> None:
            raise ValueError(f"chat template: {msg}")

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = fail
        try:
            return env.from_string(self.template).render(messages=messages, add_generation_prompt=True,
                                                         bos_token=self.bos or "", eos_token=self.eos or "")
        except TemplateError as e:
            raise ValueError(f"chat template failed: {e}") from None


def _json_or_empty(path: Path) -> dict[str, Any]:
    try:
        d = json.loads(path.read_text())
        return d if isinstance(d, dict) else {}
    except (OSError, json.JSONDecodeError):
        return {}


def _token_text(t: Any) -> str | None:
    return t.get("content") if isinstance(t, dict) else t if isinstance(t, str) else None

"""Text tokenised once with GPT-2's BPE into uint16 files on disk, as nanoGPT's prepare.py does; B12 reads them.

    text (a file, or a folder of .txt / .jsonl)
      ─► documents: split at <|endoftext|> (TinyStories' separator), one per file (a folder of web
         pages), or one "text" per JSON line
      ─► GPT-2 BPE (tiktoken over the local gpt2.tiktoken, every core), 50256 after each document
      ─► tokens.bin, streamed (uint16) ─► train.bin: the first 90%   val.bin: the last 10%
    <data root>/tokenised/<text name>-gpt2-<key>/{train.bin, val.bin, meta.json}
          key: the text's path, size and modification time: a changed file is tokenised again

    TokenFile(train.bin): len(t), t[i:j] -> torch.long   ──►   common.random_batch(t, T, B, gen):
        B windows at random offsets, each read from the file when it is drawn

Why on disk: 100 MB of web text is ~25M tokens and TinyStories ~550M; as int64
tensors that is 0.2-4.4 GB of memory, as uint16 files 50 MB-1.1 GB that the
operating system pages in as windows are read. GPT-2's 50,257 ids fit 16 bits.
Why once: tokenising 2 GB of text takes minutes; every later run (another size,
a resume) opens the files. meta.json is written last: a folder without it (an
interrupted tokenisation) is done again; each file is renamed into place whole
(inventory.files), so a reader never sees half of one.
"""
from __future__ import annotations

import codecs
import gzip
import hashlib
import json
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from inventory.files import atomic_path, atomic_write

SEPARATOR = "<|endoftext|>"
CHUNK_CHARS = 8 << 20          # bytes of text tokenised per batch of documents: bounded memory for any file size
TEXT_SUFFIXES = (".txt", ".jsonl", ".jsonl.gz", ".json")


class TokenFile:
    """A uint16 token file, indexed like a 1-D tensor of ids: len(t), and t[i:j] read as torch.long."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.ids = np.memmap(self.path, dtype=np.uint16, mode="r")

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, s: slice) -> torch.Tensor:
        return torch.from_numpy(self.ids[s].astype(np.int64))

    def unigram_entropy(self, vocab: int = 1 << 16) -> float:
        """common.unigram_entropy over the whole file, counted a chunk at a time."""
        counts = np.zeros(vocab, dtype=np.int64)
        for i in range(0, len(self.ids), 1 << 24):
            counts += np.bincount(self.ids[i:i + (1 << 24)], minlength=vocab)
        p = counts[counts > 0] / counts.sum()
        return float(-(p * np.log(p)).sum())


@dataclass
class Tokenised:
    train: TokenFile
    val: TokenFile
    folder: Path
    meta: dict[str, Any]
    reused: bool               # True: read from an earlier run's files, nothing tokenised now

    @property
    def tokens(self) -> int:
        return len(self.train) + len(self.val)


# ---------------------------------------------------------------- the text, as documents

def text_files(path: Path) -> list[Path]:
    """The file, or a folder's text files (.txt, .jsonl, .jsonl.gz, .json lines) in name order."""
    path = Path(path)
    if path.is_file():
        return [path]
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.name.endswith(TEXT_SUFFIXES))
    if not files:
        raise FileNotFoundError(f"{path}: no text files in it ({', '.join(TEXT_SUFFIXES)})")
    return files


def documents(path: Path) -> Iterator[tuple[list[str], int]]:
    """(documents, bytes read) a chunk at a time; a document that is complete ends with <|endoftext|>.
    Plain text splits at <|endoftext|> (TinyStories), and the end of the file ends a document (one web
    page per file); a text without separators is cut at line ends every CHUNK_CHARS. A JSON-lines file is
    one document per line's "text"."""
    if path.name.endswith((".jsonl", ".jsonl.gz", ".json")):
        opener: Any = gzip.open if path.name.endswith(".gz") else open
        with opener(path, "rt", encoding="utf-8") as f:
            batch, size = [], 0
            for line in f:
                size += len(line)
                if line.strip():
                    batch.append(str(json.loads(line).get("text", "")) + SEPARATOR)
                if size >= CHUNK_CHARS:
                    yield batch, size
                    batch, size = [], 0
            yield batch, size
        return
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")   # a character may straddle two reads
    pending: list[str] = []
    size, rest = 0, ""
    with open(path, "rb") as f:
        while raw := f.read(CHUNK_CHARS):
            if pending:
                yield pending, size
            text = rest + decoder.decode(raw)
            cut = text.rfind(SEPARATOR)
            cut = cut + len(SEPARATOR) if cut >= 0 else text.rfind("\n") + 1
            rest = text[cut:] if cut > 0 else ""
            pending, size = _split(text[:cut] if cut > 0 else text), len(raw)
    pending += _split(rest + decoder.decode(b"", final=True))
    if pending and not pending[-1].endswith(SEPARATOR):
        pending[-1] += SEPARATOR          # the end of the file ends its last document
    yield pending, size


def batches(files: list[Path]) -> Iterator[tuple[list[str], int]]:
    """Documents of every file, in batches of about CHUNK_CHARS bytes (many small files tokenise together)."""
    buf: list[str] = []
    size = 0
    for f in files:
        for docs, n in documents(f):
            buf += docs
            size += n
            if size >= CHUNK_CHARS:
                yield buf, size
                buf, size = [], 0
    if buf:
        yield buf, size


def _split(text: str) -> list[str]:
    """Documents of a piece of text; every document but a trailing one ends at a separator (the EOT token,
    once tokenised: see `encode`)."""
    parts = text.split(SEPARATOR)
    out = [p.strip("\n") + SEPARATOR for p in parts[:-1]]
    return out + ([parts[-1]] if parts[-1].strip() else [])


def encode(enc: Any, docs: list[str], threads: int) -> np.ndarray:
    """The documents as one uint16 array: each document's ids, then EOT (50256) where it ended at a separator."""
    eot = enc.eot_token
    bodies = [d.removesuffix(SEPARATOR) for d in docs]
    ids = enc.encode_ordinary_batch(bodies, num_threads=threads)
    out = []
    for d, x in zip(docs, ids):
        out.append(np.asarray(x, dtype=np.uint16))
        if d.endswith(SEPARATOR):
            out.append(np.asarray([eot], dtype=np.uint16))
    return np.concatenate(out) if out else np.zeros(0, dtype=np.uint16)


# ---------------------------------------------------------------- tokenising once

def cache_folder(path: Path, root: Path, encoding: str = "gpt2", val_frac: float = 0.1) -> Path:
    """Where the tokens of `path` live: keyed by its files' paths, sizes and modification times."""
    h = hashlib.sha256(f"{encoding} {val_frac}".encode())
    for f in text_files(path):
        st = f.stat()
        h.update(f"{f.resolve()} {st.st_size} {st.st_mtime_ns}\n".encode())
    stem = Path(path).name.split(".")[0] or "text"
    return Path(root) / "tokenised" / f"{stem}-{encoding}-{h.hexdigest()[:12]}"


def _cached(folder: Path) -> Tokenised | None:
    try:
        meta = json.loads((folder / "meta.json").read_text())
        train, val = TokenFile(folder / "train.bin"), TokenFile(folder / "val.bin")
    except (OSError, ValueError):
        return None
    if (len(train), len(val)) != (meta.get("train_tokens"), meta.get("val_tokens")):
        return None
    return Tokenised(train, val, folder, meta, reused=True)


def prepare(path: Path, root: Path, *, val_frac: float = 0.1, on_bytes: Callable[[int], None] = lambda n: None,
            log: Callable[[str], None] = print) -> Tokenised:
    """The text's GPT-2 tokens as train.bin / val.bin: read from an earlier run when the text is unchanged,
    else tokenised now (FileNotFoundError, one line, when the local gpt2.tiktoken is missing)."""
    from models.tokenizers import tiktoken_encoding

    folder = cache_folder(path, root, "gpt2", val_frac)
    if (done := _cached(folder)) is not None:
        return done
    enc = tiktoken_encoding("gpt2")
    threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    files, t0 = text_files(path), time.perf_counter()
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_path(folder / "train.bin") as tmp:
        with open(tmp, "wb") as out:
            for docs, n_bytes in batches(files):
                out.write(encode(enc, docs, threads).tobytes())
                on_bytes(n_bytes)
        n = tmp.stat().st_size // 2
        cut = n - max(1, math.ceil(n * val_frac))
        if cut < 2:
            raise ValueError(f"{path}: {n} tokens are too few to split into train and held-out parts")
        with atomic_path(folder / "val.bin") as vtmp:
            vtmp.write_bytes(np.memmap(tmp, dtype=np.uint16, mode="r")[cut:].tobytes())
        os.truncate(tmp, cut * 2)        # train.bin: the tokens before the held-out part
    meta = {"source": [str(f) for f in files], "bytes": sum(f.stat().st_size for f in files), "encoding": "gpt2",
            "eot": enc.eot_token, "train_tokens": cut, "val_tokens": n - cut, "val_frac": val_frac,
            "seconds": round(time.perf_counter() - t0, 3), "threads": threads}
    atomic_write(folder / "meta.json", json.dumps(meta, indent=2) + "\n")
    log(f"tokenised {meta['bytes']:,} bytes into {n:,} GPT-2 tokens in {meta['seconds']:.1f} s "
        f"({threads} threads): {folder}")
    done = _cached(folder)
    assert done is not None
    done.reused = False
    return done

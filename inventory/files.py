"""Atomic writes: a reader sees the old file or the new one, never half of either.

    write to .NAME.XXXX.tmp in the same folder -> fsync -> os.replace(tmp, NAME)

The temporary file lives beside the target so the rename stays on one file
system (and so is atomic). On any failure, a full disk included, the temporary
file is removed and the old file is left as it was. Every tierkit module that
writes a file a user or another command reads goes through here.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path beside `path`; renamed over `path` when the block ends without an error.

    For writers that want a file name (torch.save, a GGUF writer, a compiler):
        with atomic_path(out) as tmp:
            torch.save(state, tmp)
    """
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        mask = os.umask(0)
        os.umask(mask)
        tmp.chmod(0o666 & ~mask)      # mkstemp makes 0600; the file is as public as any other the user writes
        os.replace(tmp, p)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write(path: str | os.PathLike, data: str | bytes) -> Path:
    """Write text (UTF-8) or bytes to `path` atomically; returns the path."""
    with atomic_path(path) as tmp:
        if isinstance(data, bytes):
            tmp.write_bytes(data)
        else:
            tmp.write_text(data, encoding="utf-8")
    return Path(path)

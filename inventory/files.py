"""Atomic writes: a reader sees the old file or the new one, never half of either.

    write to .NAME.XXXX.tmp in the same folder -> fsync -> os.replace(tmp, NAME)
    a folder: build in private_folder() -> swap_in(): the old folder aside, the new one in, the old removed

The temporary file lives beside the target so the rename stays on one file
system (and so is atomic). On any failure, a full disk included, the temporary
file is removed and the old file is left as it was. Every tierkit module that
writes a file a user or another command reads goes through here.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
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


# ---------------------------------------------------------------- a folder swapped in whole

def private_folder(parent: Path, name: str) -> Path:
    """A new private folder `.NAME.tmp-PID-xxxx` in `parent` to build NAME in; first removes the ones
    a killed build of NAME left behind (OOM, SIGKILL: no process can clean up after those). A folder
    whose process is still running stays."""
    for leftover in [*parent.glob(f".{name}.tmp-*"), *parent.glob(f".{name}.old-*")]:
        pid = leftover.name.rsplit(".", 1)[-1].split("-")[1]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(leftover, ignore_errors=True)
    return Path(tempfile.mkdtemp(prefix=f".{name}.tmp-{os.getpid()}-", dir=parent))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def swap_in(tmp: Path, final: Path, private: tuple[str, ...] = ()) -> None:
    """Replace `final` with `tmp`: two renames, so no reader ever sees half a folder. The files become
    as public as the umask allows (mkdtemp made them private), except names starting with `private`."""
    mask = os.umask(0)
    os.umask(mask)
    tmp.chmod(0o777 & ~mask)
    for f in tmp.rglob("*"):
        if f.is_file() and not f.name.startswith(private):
            f.chmod(0o666 & ~mask)
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}-{time.monotonic_ns()}")
        os.replace(final, old)
    try:
        os.replace(tmp, final)
    except BaseException:
        if old is not None:
            os.replace(old, final)  # put the previous build back
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)

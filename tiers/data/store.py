"""Where data lives here, and fetching it: look-up order, resumable verified downloads, atomic unpacking.

    locate(name) -> the first place holding every file (explicit path, $TIERKIT_DATA, the cache, an OS package)
    fetch(name)  -> <file>.part  --Range resume-->  size + sha256 checked  --os.replace-->  <file>

Hugging Face entries (models, GGUF files, hub data sets) go to tiers.data.hub
instead: the same four calls, answered from the user's HF cache.
"""
from __future__ import annotations

import http.client
import os
import shutil
import socket
import tarfile
import tempfile
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

from tiers.data import hub
from tiers.data.artifacts import DataError, Dataset, HubArtifact, Remote
from tiers.data.hub import sha256_file
from tiers.data.registry import get

CHUNK = 1 << 16
TIMEOUT_S = 30


def cache_dir() -> Path:
    return Path.home() / ".cache" / "tierkit"


def data_root() -> Path:
    """Where `fetch` writes: $TIERKIT_DATA, else the cache."""
    env = os.environ.get("TIERKIT_DATA")
    return Path(env).expanduser() if env else cache_dir()


def roots(explicit: Path | str | None = None) -> list[Path]:
    """The places looked in, in order: explicit path, $TIERKIT_DATA, the cache."""
    out = [Path(explicit).expanduser()] if explicit else []
    if os.environ.get("TIERKIT_DATA"):
        out.append(Path(os.environ["TIERKIT_DATA"]).expanduser())
    out.append(cache_dir())
    return list(dict.fromkeys(out))


def _places(ds: Dataset, explicit: Path | None) -> list[tuple[Path, str]]:
    """(place, kind) in look-up order; kind: explicit | root | system (an OS package's copy, taken as it is)."""
    out = [(r, "explicit" if r == explicit else "root") for r in roots(explicit)]
    return out + [(Path(d), "system") for d in ds.system_dirs]


def _at(ds: Dataset, f: Remote, place: Path, kind: str) -> Path | None:
    """This file at this place, if it is there with the right size."""
    if kind == "system":
        paths = [place / f.name]
    else:
        paths = [place / f.path]
        if kind == "explicit":  # an explicit path may also be the data set's own folder, or the file itself
            paths += [place / f.name] + ([place] if len(ds.files) == 1 else [])
    for p in paths:
        if p.is_file() and (kind == "system" or f.size is None or p.stat().st_size == f.size):
            return p
    return None


def find_file(name: str, filename: str, explicit: Path | str | None = None) -> Path | None:
    """The first good copy of one of a data set's files (by file name); None if there is none."""
    ds = get(name)
    if isinstance(ds, HubArtifact):
        folder = hub.locate(ds, explicit)
        folder = folder.parent if folder and folder.is_file() else folder
        return folder / filename if folder and (folder / filename).is_file() else None
    f = next((x for x in ds.files if filename in (x.name, x.path)), None)
    if f is None:
        raise DataError(f"{ds.name} has no file {filename!r}; its files: {', '.join(x.name for x in ds.files)}")
    exp = Path(explicit).expanduser() if explicit else None
    return next((p for place, kind in _places(ds, exp) if (p := _at(ds, f, place, kind))), None)


def locate(name: str, explicit: Path | str | None = None) -> Path | None:
    """Where the whole data set is: the first place holding all its files (or its unpacked folder); None if not.

    A Hugging Face entry: its snapshot folder (a model), its .gguf file, or its file (a hub data set)."""
    ds = get(name)
    if isinstance(ds, HubArtifact):
        return hub.locate(ds, explicit)
    exp = Path(explicit).expanduser() if explicit else None
    for place, kind in _places(ds, exp):
        if ds.extract:
            for p in [place / ds.extract] + ([place] if kind == "explicit" else []):
                if p.is_dir() and any(p.iterdir()):
                    return p
            continue
        found = [_at(ds, f, place, kind) for f in ds.files]
        if all(found):
            return found[0].parent if ds.folder else found[0]  # type: ignore[union-attr]
    return None


def missing_message(name: str, explicit: Path | str | None = None) -> str:
    """One line: what is missing, where it was looked for, and the fetch (with its size) that brings it."""
    from inventory.units import fmt_bytes

    ds = get(name)
    if isinstance(ds, HubArtifact):
        return hub.missing_message(ds)
    where = ", ".join(str(r) for r in roots(explicit))
    size = f" ({fmt_bytes(ds.size)})" if ds.size else ""
    have = {} if ds.extract else {f.name: find_file(name, f.name, explicit) for f in ds.files}
    if any(have.values()):      # part of it is here: say which part, as `tierkit data list` counts it
        here = [n for n, p in have.items() if p]
        gone = [n for n, p in have.items() if not p]
        folder = have[here[0]].parent  # type: ignore[union-attr]
        return (f"{ds.title}: {len(here)} of {len(have)} files in {folder} ({', '.join(here)}); missing "
                f"{', '.join(gone)}; run `tierkit data fetch {ds.name}` to fetch the rest")
    return f"{ds.title} not found (looked in {where}); run `tierkit data fetch {ds.name}`{size}"


def require(name: str, explicit: Path | str | None = None) -> Path:
    """The data set's path, or DataError naming the `tierkit data fetch` to run."""
    p = locate(name, explicit)
    if p is None:
        raise DataError(missing_message(name, explicit))
    return p


# ---------------------------------------------------------------- fetching

def _why(exc: BaseException) -> str:
    """A network error as a few words: 'connection refused', 'HTTP 404 Not Found', 'timed out'."""
    if isinstance(exc, urllib.error.HTTPError):
        return f"HTTP {exc.code} {exc.reason}"
    reason = getattr(exc, "reason", exc)
    if isinstance(reason, ConnectionRefusedError):
        return "connection refused"
    if isinstance(reason, (socket.timeout, TimeoutError)):
        return "timed out"
    if isinstance(reason, socket.gaierror):
        return "host not found (offline?)"
    if isinstance(reason, http.client.IncompleteRead):
        return "the connection closed early"
    return str(getattr(reason, "strerror", None) or reason).strip() or type(reason).__name__


Progress = Callable[[str, int, int | None], None]  # (file, bytes so far, total or None)


def _download(url: str, part: Path, size: int | None, on_bytes: Progress, label: str) -> None:
    """Stream `url` into `part`, resuming from its current length with a Range request."""
    have = part.stat().st_size if part.exists() else 0
    if size is not None and have > size:  # longer than the real file: not a prefix of it
        part.unlink()
        have = 0
    req = urllib.request.Request(url, headers={"User-Agent": "tierkit", "Accept-Encoding": "identity"})
    if have:
        req.add_header("Range", f"bytes={have}-")
    try:
        resp = urllib.request.urlopen(req, timeout=TIMEOUT_S)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and have and (size is None or have == size):
            return  # the .part is already whole; the checksum decides
        if exc.code == 416:
            part.unlink(missing_ok=True)
        raise
    with resp:
        if have and resp.status != 206:  # the server ignored the Range: start again
            have = 0
        total = size or (int(resp.headers["Content-Length"]) + have if resp.headers.get("Content-Length") else None)
        with part.open("ab" if have else "wb") as fh:
            done = have
            on_bytes(label, done, total)
            while chunk := resp.read(CHUNK):
                fh.write(chunk)
                done += len(chunk)
                on_bytes(label, done, total)
            fh.flush()
            os.fsync(fh.fileno())
        expected = resp.headers.get("Content-Length")
        if expected is not None and done - have < int(expected):
            raise http.client.IncompleteRead(b"", int(expected) - (done - have))


def fetch_file(ds: Dataset, f: Remote, root: Path, base_url: str | None = None,
               on_bytes: Progress = lambda *_: None) -> Path:
    """One file into root/f.path, verified; returns its path. A good copy already there is kept."""
    final = root / f.path
    if final.is_file() and (f.size is None or final.stat().st_size == f.size) and \
            (f.sha256 is None or sha256_file(final) == f.sha256):
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    part = final.with_name(final.name + ".part")
    urls = (f"{base_url.rstrip('/')}/{f.path}",) if base_url else f.urls
    problems: list[str] = []

    def size_now() -> int:
        return part.stat().st_size if part.exists() else 0

    for url in urls:
        before = size_now()
        try:
            _download(url, part, f.size, on_bytes, f.path)
            break
        except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
            if size_now() > before:  # bytes arrived, then the transfer broke: keep them for a resume
                raise DataError(f"download of {f.path} from {url} was interrupted at {size_now():,}"
                                + (f" of {f.size:,}" if f.size else "") + f" bytes ({_why(exc)}); "
                                f"run `tierkit data fetch {ds.name}` again to resume") from None
            problems.append(f"{url}: {_why(exc)}")  # nothing arrived: try the next mirror
    else:
        raise DataError(f"cannot download {ds.name} ({f.path}): {'; '.join(problems)}; check the network, or "
                        f"put the file at {final} by hand")
    got = part.stat().st_size
    if f.size is not None and got != f.size:
        part.unlink()
        raise DataError(f"{f.path}: got {got:,} bytes, expected {f.size:,}; the download was discarded, "
                        f"run `tierkit data fetch {ds.name}` again")
    if f.sha256 is not None:
        digest = sha256_file(part)
        if digest != f.sha256:
            part.unlink()
            raise DataError(f"{f.path}: sha256 {digest[:16]}... does not match the published "
                            f"{f.sha256[:16]}...; the download was discarded (a changed or corrupted file)")
    os.replace(part, final)
    return final


def _extract(ds: Dataset, archive: Path, root: Path) -> Path:
    """Unpack into a temporary folder beside the target, then rename: never half a folder."""
    dest = root / str(ds.extract)
    if dest.is_dir() and any(dest.iterdir()):
        return dest
    tmp = Path(tempfile.mkdtemp(prefix=f".{ds.extract}.part-", dir=root))
    try:
        with tarfile.open(archive) as tar:
            tar.extractall(tmp, filter="data")
        inside = list(tmp.iterdir())
        # an archive holding one folder (cifar-10-batches-py/...) becomes that folder, not a folder in a folder
        os.replace(inside[0] if len(inside) == 1 and inside[0].is_dir() else tmp, dest)
        shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def fetch(name: str, root: Path | None = None, base_url: str | None = None,
          on_bytes: Progress = lambda *_: None, keep_archive: bool = False) -> Path:
    """Download every file of a data set into `root` (default: $TIERKIT_DATA or the cache); return its path.

    A Hugging Face entry is fetched into the HF cache instead (root and base_url do not apply: HF_ENDPOINT does)."""
    ds = get(name)
    if isinstance(ds, HubArtifact):
        return hub.fetch(ds, on_bytes)
    root = Path(root).expanduser() if root else data_root()
    base_url = base_url or os.environ.get("TIERKIT_DATA_URL") or None
    if ds.extract and (root / ds.extract).is_dir() and any((root / ds.extract).iterdir()):
        return root / ds.extract
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(f"cannot write to {root}: {exc.strerror}; set TIERKIT_DATA to a writable folder") from None
    paths = [fetch_file(ds, f, root, base_url, on_bytes) for f in ds.files]
    if ds.extract:
        out = _extract(ds, paths[0], root)
        if not keep_archive:
            paths[0].unlink()
        return out
    return ds.target(root)

"""Hugging Face artifacts in the user's hub cache: finding them (no network), and fetching them (huggingface_hub).

    locate(a):  <cache>/models--org--name/refs/<revision> -> <sha>           (or the pinned <sha> itself)
                <cache>/models--org--name/snapshots/<sha>/ holds every needed file?  -> the folder / the file
                (a GGUF) $LLAMA_CACHE/org_name_<file>, where llama.cpp's `-hf` puts it
    fetch(a):   here already? -> done, no network
                HF_HUB_OFFLINE=1 -> one line;  free disk < size -> one line (before any request)
                repo_info(revision, blobs) -> the files to take and their sizes/sha256
                each file: HEAD resolve -> etag, size, location
                           blobs/<etag>.part --GET Range: resume--> size + sha256 checked --> blobs/<etag>
                           hf_hub_download links snapshots/<sha>/<file> -> blobs/<etag> and writes refs/<revision>

Why the blob is fetched here and not inside hf_hub_download: huggingface_hub
deletes a partial download when its process stops, and a 40 GB GGUF cut off at
39 GB must resume on the next `tierkit data fetch`. The cache layout itself is
written by huggingface_hub, so transformers (and llama-cpp-python's
from_pretrained) find what tierkit fetched, and tierkit finds what they fetched. Locating reads the layout directly:
fast, no import of huggingface_hub, no network.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections.abc import Callable
from contextlib import contextmanager
from glob import has_magic
from pathlib import Path
from typing import Self

from tiers.data.artifacts import DataError, HubArtifact, hub_cache

COMMIT = re.compile(r"[0-9a-f]{40}")
SHA256 = re.compile(r"[0-9a-f]{64}")
Progress = Callable[[str, int, "int | None"], None]
RETRIES = 3            # immediate resumes within one fetch while each attempt brings bytes
TIMEOUT_S = 60.0


# ---------------------------------------------------------------- finding (no network, no huggingface_hub)

def repo_dir(a: HubArtifact) -> Path:
    return hub_cache() / a.folder


def snapshots(a: HubArtifact) -> list[Path]:
    """Candidate snapshot folders in order: the pinned commit, refs/<revision>, refs/main."""
    repo = repo_dir(a)
    shas = [a.revision] if COMMIT.fullmatch(a.revision) else []
    for ref in dict.fromkeys([a.revision, "main"]):
        f = repo / "refs" / ref
        if f.is_file():
            shas.append(f.read_text().strip())
    return [repo / "snapshots" / s for s in dict.fromkeys(shas) if s]


def _has(folder: Path, need: str) -> bool:
    """Whether `folder` holds a file matching `need` ("a|b": either; globs allowed); broken links do not count."""
    for alt in need.split("|"):
        found = folder.glob(alt) if has_magic(alt) else [folder / alt]
        if any(p.is_file() for p in found):
            return True
    return False


def complete(a: HubArtifact, folder: Path) -> bool:
    """Every needed file is there; a sharded checkpoint's index finds every shard."""
    if not folder.is_dir() or not all(_has(folder, n) for n in a.required):
        return False
    index = folder / "model.safetensors.index.json"
    if a.kind == "model" and index.is_file():
        try:
            shards = set(json.loads(index.read_text())["weight_map"].values())
        except (OSError, ValueError, KeyError, AttributeError):
            return False
        return all((folder / s).is_file() for s in shards)
    return True


def _explicit(a: HubArtifact, p: Path) -> Path | None:
    """A path the caller gave: the file itself, a folder holding the target, or a complete model folder."""
    if a.target and p.is_file():
        return p
    if a.target and (p / a.target).is_file():
        return p / a.target
    return p if a.kind == "model" and complete(a, p) else None


def llama_cpp_cache() -> Path:
    """Where llama.cpp's `-hf REPO` downloads go: $LLAMA_CACHE, else the platform's cache folder + llama.cpp."""
    import sys

    if os.environ.get("LLAMA_CACHE"):
        return Path(os.environ["LLAMA_CACHE"]).expanduser()
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Caches" / "llama.cpp"
    if sys.platform == "win32" and os.environ.get("LOCALAPPDATA"):
        return Path(os.environ["LOCALAPPDATA"]) / "llama.cpp"
    base = Path(os.environ["XDG_CACHE_HOME"]) if os.environ.get("XDG_CACHE_HOME") else Path.home() / ".cache"
    return base / "llama.cpp"


def locate(a: HubArtifact, explicit: Path | str | None = None) -> Path | None:
    """An explicit path, else the HF cache's snapshot, else (a GGUF) the copy llama.cpp's `-hf` downloaded."""
    if explicit and (p := _explicit(a, Path(explicit).expanduser())):
        return p
    for snap in snapshots(a):
        if complete(a, snap):
            return snap / a.target if a.target else snap
    if a.kind == "gguf" and a.target:  # llama.cpp names it <org>_<repo>_<file>
        p = llama_cpp_cache() / f"{a.repo_id}_{a.target}".replace("/", "_")
        return p if p.is_file() else None
    return None


def missing_message(a: HubArtifact) -> str:
    from inventory.units import fmt_bytes

    size = f" ({fmt_bytes(a.size)})" if a.size else ""
    gated = f"; gated: accept the licence at {a.homepage} and set HF_TOKEN" if a.gated else ""
    return (f"{a.title} is not in the Hugging Face cache ({hub_cache()}); run `tierkit data fetch {a.name}`{size}"
            f"{gated}")


# ---------------------------------------------------------------- fetching (huggingface_hub)

def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", os.environ.get("TRANSFORMERS_OFFLINE", "")).strip().upper() in \
        {"1", "ON", "YES", "TRUE"}


def _free_dir(path: Path) -> Path:
    """The nearest existing folder at or above `path` (where disk_usage can be asked)."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_disk(need: int | None, where: Path) -> None:
    """Refuse before downloading when `where` has less than `need` bytes free."""
    if not need:
        return
    free = shutil.disk_usage(_free_dir(where)).free
    if free < need:
        raise DataError(f"need {need / 1e9:.1f} GB free in {where}, have {free / 1e9:.1f} GB; free space or set "
                        f"HF_HUB_CACHE to a bigger disk")


def _wanted(path: str, patterns: tuple[str, ...]) -> bool:
    """A repo file matches an allow-pattern; patterns without "/" match top-level files only."""
    from fnmatch import fnmatchcase

    return any(fnmatchcase(path, p) and ("/" in p or "/" not in path) for p in patterns)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _bar_class(on_bytes: Progress, label: str) -> type:
    """A stand-in for tqdm that huggingface_hub's download loop reports to: forwards bytes to `on_bytes`."""

    class Bar:
        def __init__(self, *, total: int | None = None, initial: int = 0, **_: object) -> None:
            self.n, self.total = initial, total
            on_bytes(label, self.n, self.total)

        def __enter__(self) -> Self:
            return self

        def __exit__(self, *exc: object) -> bool:
            return False

        def update(self, n: int) -> None:
            self.n += n
            on_bytes(label, self.n, self.total)

        def close(self) -> None:
            pass

    return Bar


class Session:
    """One fetch's connection facts: the endpoint, the token, the cache; read from the environment now."""

    def __init__(self, a: HubArtifact, on_bytes: Progress) -> None:
        self.a, self.on_bytes = a, on_bytes
        self.endpoint = (os.environ.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/")
        self.token = os.environ.get("HF_TOKEN") or None  # None: huggingface_hub's own login, if any
        self.cache = hub_cache()
        self.repo = self.cache / a.folder

    def listing(self) -> tuple[str, list[tuple[str, int | None, str | None]]]:
        """(commit, [(file, size, sha256 or None)]) for the files this entry takes from the repo."""
        from huggingface_hub import HfApi

        api = HfApi(endpoint=self.endpoint, token=self.token)
        info = api.repo_info(self.a.repo_id, repo_type=self.a.repo_type, revision=self.a.revision,
                             files_metadata=True)
        files = [(s.rfilename, s.size, s.lfs.sha256 if s.lfs else None)
                 for s in info.siblings or [] if _wanted(s.rfilename, self.a.files)]
        for f, _, sha in files:
            mine = dict(self.a.sha256).get(f)
            if mine and sha and mine != sha:  # before downloading gigabytes that would fail the check
                raise DataError(f"{self.a.repo_id}@{self.a.revision}: {f} has sha256 {sha[:16]}..., the registry "
                                f"records {mine[:16]}... (the file was replaced); nothing was downloaded")
        lacking = [n for n in self.a.required if not any(_wanted(f, tuple(n.split("|"))) for f, _, _ in files)]
        if lacking:
            raise DataError(f"{self.a.repo_id}@{self.a.revision} has no {', '.join(lacking)}: the registry entry "
                            f"{self.a.name} is out of date with the hub (see {self.a.url})")
        return str(info.sha), files

    def blob(self, name: str, commit: str, sha: str | None) -> None:
        """Download one file's blob into the cache (resuming a .part), verified, unless it is there already."""
        from huggingface_hub import get_hf_file_metadata, hf_hub_url
        from huggingface_hub.utils import build_hf_headers

        url = hf_hub_url(self.a.repo_id, name, repo_type=self.a.repo_type, revision=commit, endpoint=self.endpoint)
        meta = get_hf_file_metadata(url, token=self.token)
        if not meta.etag:
            raise DataError(f"{url} gave no ETag: HF_ENDPOINT={self.endpoint} does not look like a Hugging Face hub")
        final = self.repo / "blobs" / meta.etag
        if final.exists():
            return
        part = final.with_name(meta.etag + ".part")
        final.parent.mkdir(parents=True, exist_ok=True)
        if part.exists() and meta.size is not None and part.stat().st_size > meta.size:
            part.unlink()  # longer than the file: not a prefix of it
        headers = {**build_hf_headers(token=self.token), "Accept-Encoding": "identity"}
        if _host(meta.location) != _host(url):
            headers.pop("authorization", None)  # a signed CDN link carries its own authorisation
        self.download(meta.location, part, meta.size, name, headers)
        self.verify(part, name, meta.size, [s for s in (sha, dict(self.a.sha256).get(name)) if s] +
                    ([meta.etag] if SHA256.fullmatch(meta.etag) else []))
        os.replace(part, final)

    def download(self, url: str, part: Path, size: int | None, name: str, headers: dict[str, str]) -> None:
        """Stream `url` onto the end of `part` (Range from its length); a few retries while bytes keep coming."""
        from huggingface_hub.utils import get_session, hf_raise_for_status

        first = part.stat().st_size if part.exists() else 0
        for attempt in range(RETRIES + 1):
            have = part.stat().st_size if part.exists() else 0
            if size is not None and have == size:
                return  # whole already: the checksum decides
            try:
                with get_session().stream("GET", url, headers={**headers, **({"Range": f"bytes={have}-"} if have
                                                                              else {})}, timeout=TIMEOUT_S) as r:
                    hf_raise_for_status(r)
                    done = have if have and r.status_code == 206 else 0  # a 200 ignores the Range: start again
                    with part.open("ab" if done else "wb") as fh:
                        self.on_bytes(name, done, size)
                        for chunk in r.iter_bytes():
                            fh.write(chunk)
                            done += len(chunk)
                            self.on_bytes(name, done, size)
                return
            except Exception as exc:
                got = part.stat().st_size if part.exists() else 0
                if got > have and attempt < RETRIES and _transient(exc):
                    continue  # bytes arrived, then the connection broke: resume at once
                if got > first:
                    raise Interrupted(name, got, size) from exc
                if not got:
                    part.unlink(missing_ok=True)
                raise

    def verify(self, part: Path, name: str, size: int | None, sums: list[str]) -> None:
        got = part.stat().st_size
        if size is not None and got != size:
            part.unlink()
            raise DataError(f"{name}: got {got:,} bytes, expected {size:,}; the download was discarded, run "
                            f"`tierkit data fetch {self.a.name}` again")
        if sums:
            digest = sha256_file(part)
            bad = next((s for s in sums if s != digest), None)
            if bad:
                part.unlink()
                raise DataError(f"{name}: sha256 {digest[:16]}... does not match the published {bad[:16]}...; the "
                                f"download was discarded (a changed or corrupted file)")

    def link(self, name: str) -> None:
        """Let huggingface_hub place the verified blob: snapshots/<sha>/<name> and refs/<revision>."""
        from huggingface_hub import hf_hub_download

        hf_hub_download(self.a.repo_id, name, repo_type=self.a.repo_type, revision=self.a.revision,
                        cache_dir=str(self.cache), endpoint=self.endpoint, token=self.token,
                        tqdm_class=_bar_class(self.on_bytes, name))


def _transient(exc: BaseException) -> bool:
    """A broken or stalled connection (worth resuming at once), not an HTTP answer."""
    import httpx2

    return isinstance(exc, (httpx2.TransportError, OSError)) and not hasattr(exc, "response")


class Interrupted(Exception):
    def __init__(self, name: str, got: int, size: int | None) -> None:
        super().__init__(name)
        self.name, self.got, self.size = name, got, size


def _host(url: str) -> str:
    from urllib.parse import urlsplit

    return urlsplit(url).netloc


def fetch(a: HubArtifact, on_bytes: Progress = lambda *_: None) -> Path:
    """The artifact in the HF cache, downloading what is missing; DataError (one line) on any failure."""
    if (here := locate(a)) is not None:
        return here
    if offline():
        raise DataError(f"{a.name} is not in the Hugging Face cache ({hub_cache()}) and HF_HUB_OFFLINE=1 forbids "
                        f"downloading it; unset HF_HUB_OFFLINE (or copy the cache from a machine that has it)")
    s = Session(a, on_bytes)
    check_disk((a.size or 0) - _partial_bytes(s.repo), s.cache)
    try:
        with _quiet():
            commit, files = s.listing()
            pending = [size or 0 for f, size, _ in files if not _cached(s.repo, commit, f)]
            check_disk(sum(pending) - _partial_bytes(s.repo), s.cache)
            for name, _, sha in files:
                if not _cached(s.repo, commit, name):
                    s.blob(name, commit, sha)
                s.link(name)
    except DataError:
        raise
    except Interrupted as exc:
        of = f" of {exc.size:,}" if exc.size else ""
        raise DataError(f"download of {exc.name} ({a.repo_id}) was interrupted at {exc.got:,}{of} bytes; run "
                        f"`tierkit data fetch {a.name}` again to resume") from None
    except Exception as exc:  # noqa: BLE001 - huggingface_hub's and the network's errors, as one line each
        raise DataError(explain(a, exc, s.endpoint)) from None
    if (here := locate(a)) is None:
        raise DataError(f"{a.name}: fetched {a.repo_id}, but the snapshot lacks {', '.join(a.required)}; "
                        f"see {a.url}")
    return here


@contextmanager
def _quiet():
    """huggingface_hub's own warnings (retries, symlinks) stay out of the one-line output."""
    import logging

    import huggingface_hub  # noqa: F401 - its import configures this logger; quieten it after

    log = logging.getLogger("huggingface_hub")
    old = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(old)


def _cached(repo: Path, commit: str, name: str) -> bool:
    return (repo / "snapshots" / commit / name).is_file()


def _partial_bytes(repo: Path) -> int:
    blobs = repo / "blobs"
    return sum(p.stat().st_size for p in blobs.glob("*.part")) if blobs.is_dir() else 0


def explain(a: HubArtifact, exc: BaseException, endpoint: str) -> str:
    """A huggingface_hub / network error as one line naming the fix."""
    from huggingface_hub import errors

    status = getattr(getattr(exc, "response", None), "status_code", None)
    token = "HF_TOKEN is set, but its account has no access" if os.environ.get("HF_TOKEN") else "no HF_TOKEN is set"
    if isinstance(exc, errors.GatedRepoError) or (status in (401, 403) and a.gated):
        return (f"{a.repo_id} is gated ({token}): accept its licence at {a.homepage} while logged in, then set "
                f"HF_TOKEN to a read token from https://huggingface.co/settings/tokens and run "
                f"`tierkit data fetch {a.name}` again")
    if status in (401, 403):
        return (f"{endpoint} refused {a.repo_id} (HTTP {status}: private, missing, or {token}); set HF_TOKEN to a "
                f"token that can read it (see {a.homepage})")
    if isinstance(exc, errors.RevisionNotFoundError):
        return f"{a.repo_id} has no revision {a.revision!r} (HTTP 404); the registry entry {a.name} is out of date"
    if isinstance(exc, (errors.RepositoryNotFoundError, errors.RemoteEntryNotFoundError)) or status == 404:
        return f"{a.repo_id} or one of its files is not on {endpoint} (HTTP 404); see {a.url}"
    if isinstance(exc, errors.HfHubHTTPError) and status:
        return f"{endpoint} answered HTTP {status} for {a.repo_id}; try `tierkit data fetch {a.name}` again later"
    why = _network_why(exc)
    return (f"cannot reach {endpoint} to fetch {a.name} ({why}); check the network (or HF_ENDPOINT), "
            f"then run `tierkit data fetch {a.name}` again")


def _network_why(exc: BaseException) -> str:
    chain: list[BaseException] = []
    e: BaseException | None = exc
    while e is not None and len(chain) < 6:
        chain.append(e)
        e = e.__cause__ or e.__context__
    text = " ".join(str(x) for x in chain).lower()
    for needle, words in (("refused", "connection refused"), ("timed out", "timed out"), ("timeout", "timed out"),
                          ("name or service", "host not found (offline?)"), ("getaddrinfo", "host not found (offline?)"),
                          ("temporary failure", "host not found (offline?)")):
        if needle in text:
            return words
    first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return first[:160]

"""The dataset registry: where each data set comes from, where it lives here, how to fetch it.

    tierkit data list                  what the registry knows, and what is here already
    tierkit data fetch NAME [--url U]  download, verify the sha256, write atomically, resume
    tierkit data path NAME             where a data set is (one line naming the fetch if it is not)

Look-up order for a data set: an explicit path (a function argument), then
`$TIERKIT_DATA`, then the cache `~/.cache/tierkit`, then where a system package
installs it (Debian's `dataset-fashion-mnist`). `fetch` writes to `$TIERKIT_DATA`
when it is set, else to the cache. Nothing else in tierkit downloads: a command
that lacks data says which `tierkit data fetch` to run, or uses its embedded
fallback and says so.

Downloads stream into `<file>.part`; only a file whose size and sha256 match is
renamed to its real name, so a wrong checksum or an interruption never leaves a
file that looks valid. An interrupted `.part` is resumed with an HTTP Range
request; a checksum mismatch deletes it. `TIERKIT_DATA_URL` (or `--url`) replaces
the origin: each file is then fetched from `<url>/<its local path>`, which is how
the tests point the registry at a loopback server.

Errors are `DataError`; str() is one line naming the data set and what to do.
"""
from __future__ import annotations

import gzip
import hashlib
import http.client
import os
import shutil
import socket
import struct
import tarfile
import tempfile
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

CHUNK = 1 << 16
TIMEOUT_S = 30


class DataError(Exception):
    """A data set is missing or could not be fetched; str() is one line saying what to do."""


@dataclass(frozen=True)
class Remote:
    """One file of a data set: its path under the data root, where to get it, how to check it."""

    path: str                      # relative to the data root, e.g. "mnist/t10k-images-idx3-ubyte.gz"
    urls: tuple[str, ...]          # tried in order
    size: int | None               # bytes, when published
    sha256: str | None             # None: verified by size only (no published checksum found)

    @property
    def name(self) -> str:
        return Path(self.path).name


@dataclass(frozen=True)
class Dataset:
    name: str
    title: str
    licence: str
    homepage: str
    files: tuple[Remote, ...]
    folder: str | None = None              # the data set's folder under the root (None: a single file)
    extract: str | None = None             # archives unpack into this folder under the root
    system_dirs: tuple[str, ...] = ()      # where an OS package installs the same files (names only matter)
    note: str = ""

    @property
    def size(self) -> int | None:
        sizes = [f.size for f in self.files]
        return None if None in sizes else sum(sizes)  # type: ignore[arg-type]

    @property
    def checksum(self) -> str:
        known = sum(f.sha256 is not None for f in self.files)
        return "sha256" if known == len(self.files) else "size only" if known == 0 else "sha256 (some files: size only)"

    def target(self, root: Path) -> Path:
        """What `tierkit data path` prints for this root: the folder, the extracted folder, or the one file."""
        if self.extract:
            return root / self.extract
        return root / self.folder if self.folder else root / self.files[0].path


_MNIST = "https://ossci-datasets.s3.amazonaws.com/mnist/", "https://storage.googleapis.com/cvdf-datasets/mnist/"
_FASHION = ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
            "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/")
_HH = ("https://huggingface.co/datasets/Anthropic/hh-rlhf/resolve/main/harmless-base/",
       "https://media.githubusercontent.com/media/anthropics/hh-rlhf/master/harmless-base/")
_SC = "https://storage.googleapis.com/download.tensorflow.org/data/", "http://download.tensorflow.org/data/"


def _files(folder: str, mirrors: tuple[str, ...], table: list[tuple[str, int | None, str | None]],
           remote_names: dict[str, str] | None = None) -> tuple[Remote, ...]:
    names = remote_names or {}
    return tuple(Remote(f"{folder}/{n}" if folder else n, tuple(m + names.get(n, n) for m in mirrors), size, sha)
                 for n, size, sha in table)


# Sizes and sha256 as published: MNIST and Fashion-MNIST by TensorFlow Datasets and many
# loaders (the MNIST test files in ../shared/data match the official md5 and these sha256);
# Speech Commands by TFDS/ESPnet; Tiny Shakespeare and hh-rlhf's test split match the
# reference copies; hh-rlhf's train split sha256 is as recorded by users of the repository,
# its size is not published (the file is ~13 MB in Git LFS), so it is checked by sha256 alone.
REGISTRY: dict[str, Dataset] = {d.name: d for d in (
    Dataset("mnist", "MNIST handwritten digits (IDX)", "CC BY-SA 3.0 (LeCun, Cortes, Burges)",
            "http://yann.lecun.com/exdb/mnist/", _files("mnist", _MNIST, [
                ("train-images-idx3-ubyte.gz", 9_912_422, "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609"),
                ("train-labels-idx1-ubyte.gz", 28_881, "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c"),
                ("t10k-images-idx3-ubyte.gz", 1_648_877, "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6"),
                ("t10k-labels-idx1-ubyte.gz", 4_542, "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6")]),
            folder="mnist", note="60,000 train + 10,000 test 28x28 digits; the LeCun site itself now refuses "
                                 "downloads, so the files come from the torchvision and TensorFlow mirrors"),
    Dataset("fashion-mnist", "Fashion-MNIST (Zalando, IDX)", "MIT", "https://github.com/zalandoresearch/fashion-mnist",
            _files("fashion-mnist", _FASHION, [
                ("train-images-idx3-ubyte.gz", 26_421_880, "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84"),
                ("train-labels-idx1-ubyte.gz", 29_515, "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845"),
                ("t10k-images-idx3-ubyte.gz", 4_422_102, "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073"),
                ("t10k-labels-idx1-ubyte.gz", 5_148, "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5")]),
            folder="fashion-mnist", system_dirs=("/usr/share/datasets/fashion-mnist",),
            note="drop-in MNIST replacement, 10 clothing classes; Debian's dataset-fashion-mnist installs it "
                 "(recompressed, so its files are taken as they are, not checksummed)"),
    Dataset("tinyshakespeare", "Tiny Shakespeare (char-rnn)", "public domain text",
            "https://github.com/karpathy/char-rnn", (Remote(
                "tinyshakespeare.txt", ("https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt",),
                1_115_394, "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"),),
            note="1.1 MB of Shakespeare's plays, 65 distinct characters"),
    Dataset("speech-commands", "Speech Commands v0.02 (full, 35 words)", "CC BY 4.0 (Warden 2018)",
            "https://arxiv.org/abs/1804.03209", _files("", _SC, [
                ("speech_commands_v0.02.tar.gz", 2_428_923_189, "af14739ee7dc311471de98f5f9d2c9191b18aedfe957f4a6ff791c709868ff58")]),
            extract="speech_commands_v0.02", note="105,829 one-second 16 kHz clips; unpacked to speech_commands_v0.02/"),
    Dataset("speech-commands-test", "Speech Commands v0.02 official test set (12 classes)", "CC BY 4.0 (Warden 2018)",
            "https://arxiv.org/abs/1804.03209", _files("", _SC, [
                ("speech_commands_test_set_v0.02.tar.gz", 112_563_277, "cc2a00c1147c2254e9be3fa0f779d8c17421dc349b86366567a8edfa9acd51df")]),
            extract="speech_commands_test_set_v0.02", note="4,890 clips in the 12-class layout"),
    Dataset("hh-rlhf", "Anthropic hh-rlhf, harmless-base preference pairs", "MIT",
            "https://github.com/anthropics/hh-rlhf", _files("hh-rlhf", _HH, [
                ("harmless-base-train.jsonl.gz", None, "bf3e1ecd3db61bf21d190f69351d26670c67aababa0fd282fa008c17a7202217"),
                ("harmless-base-test.jsonl.gz", 742_801, "ebfaaed21162a4de120ae85366075b34425e2a6303fac59b99555002f7016f03")],
                {"harmless-base-train.jsonl.gz": "train.jsonl.gz", "harmless-base-test.jsonl.gz": "test.jsonl.gz"}),
            folder="hh-rlhf", note="42,537 train + 2,312 test {chosen, rejected} dialogue pairs"),
)}


def get(name: str) -> Dataset:
    key = name.strip().lower().replace("_", "-")
    if key not in REGISTRY:
        raise DataError(f"no data set named {name!r}; known: {', '.join(REGISTRY)} (see `tierkit data list`)")
    return REGISTRY[key]


# ---------------------------------------------------------------- where data lives

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
    f = next((x for x in ds.files if filename in (x.name, x.path)), None)
    if f is None:
        raise DataError(f"{ds.name} has no file {filename!r}; its files: {', '.join(x.name for x in ds.files)}")
    exp = Path(explicit).expanduser() if explicit else None
    return next((p for place, kind in _places(ds, exp) if (p := _at(ds, f, place, kind))), None)


def locate(name: str, explicit: Path | str | None = None) -> Path | None:
    """Where the whole data set is: the first place holding all its files (or its unpacked folder); None if not."""
    ds = get(name)
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
    ds = get(name)
    where = ", ".join(str(r) for r in roots(explicit))
    return f"{ds.title} not found (looked in {where}); run `tierkit data fetch {ds.name}`"


def require(name: str, explicit: Path | str | None = None) -> Path:
    """The data set's path, or DataError naming the `tierkit data fetch` to run."""
    p = locate(name, explicit)
    if p is None:
        raise DataError(missing_message(name, explicit))
    return p


# ---------------------------------------------------------------- fetching

def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


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
            (f.sha256 is None or _sha256(final) == f.sha256):
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
        digest = _sha256(part)
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
        os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def fetch(name: str, root: Path | None = None, base_url: str | None = None,
          on_bytes: Progress = lambda *_: None, keep_archive: bool = False) -> Path:
    """Download every file of a data set into `root` (default: $TIERKIT_DATA or the cache); return its path."""
    ds = get(name)
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


# ---------------------------------------------------------------- readers shared by the milestones

def read_idx(path: Path) -> np.ndarray:
    """An IDX file (MNIST's format, gzipped or not): magic 0 0 dtype ndim, ndim big-endian sizes, the data."""
    opener: Any = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as fh:
        raw = fh.read()
    zero, dtype_code, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype_code != 0x08:  # 0x08: unsigned bytes, all MNIST-style files use it
        raise DataError(f"{path} is not an unsigned-byte IDX file (magic {raw[:4].hex()})")
    shape = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim])
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise DataError(f"{path}: {data.size:,} values for shape {shape}; the file is truncated")
    return data.reshape(shape)


@dataclass
class Split:
    x: np.ndarray          # (n, 28, 28) uint8
    y: np.ndarray          # (n,) uint8
    files: list[str] = field(default_factory=list)


def load_idx_splits(name: str = "mnist", explicit: Path | str | None = None) -> dict[str, Split]:
    """MNIST-layout data: {'train': Split, 'test': Split}, with whichever splits are present (maybe none)."""
    out: dict[str, Split] = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        xs = find_file(name, f"{prefix}-images-idx3-ubyte.gz", explicit)
        ys = find_file(name, f"{prefix}-labels-idx1-ubyte.gz", explicit)
        if xs and ys:
            x, y = read_idx(xs), read_idx(ys)
            if len(x) != len(y):
                raise DataError(f"{xs}: {len(x)} images but {len(y)} labels in {ys}")
            out[split] = Split(x, y, [str(xs), str(ys)])
    return out


@dataclass
class Images:
    """Labelled images split into train and test, as float32 rows in [0, 1] (B8's MLP, B9's CNN)."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    source: str              # what it is, for the README
    side: int                # images are side x side
    note: str = ""           # how to get more, when this is not the full data set


def pixels(x: np.ndarray) -> np.ndarray:
    """uint8 images (n, 28, 28) -> float32 rows (n, 784) in [0, 1], with one copy."""
    out = x.reshape(len(x), -1).astype(np.float32)
    out /= 255
    return out


def load_images(which: str, samples: int, seed: int = 0, data_path: str | Path | None = None,
                log: Any = print) -> Images:
    """MNIST (or Fashion-MNIST: `which` names it) from the registry; the 10k test split alone when that is
    all there is; else scikit-learn's bundled 8x8 digits (also `which="digits"`), saying so through `log`."""
    rng = np.random.default_rng(seed)
    name = "fashion-mnist" if "fashion" in which.lower() else "mnist"
    splits = load_idx_splits(name, data_path) if which.lower() != "digits" else {}
    n = samples
    if "train" in splits and "test" in splits:
        tr, te = splits["train"], splits["test"]
        return Images(pixels(tr.x[:n]), tr.y[:n].astype(np.int64), pixels(te.x), te.y.astype(np.int64),
                    f"{get(name).title}: {min(n, len(tr.x)):,} training and {len(te.x):,} test images "
                    f"({tr.files[0]})", 28)
    if "test" in splits:
        te = splits["test"]
        order = rng.permutation(len(te.x))
        cut = int(0.8 * len(order))
        tr_idx, te_idx = order[:cut][:n], order[cut:]
        note = (f"only the 10,000-image test split is here; run `tierkit data fetch {name}` for the 60,000 "
                "training images")
        log(f"{name}: {note}")
        return Images(pixels(te.x[tr_idx]), te.y[tr_idx].astype(np.int64), pixels(te.x[te_idx]),
                    te.y[te_idx].astype(np.int64),
                    f"{get(name).title}, test split only ({te.files[0]}): {len(tr_idx):,} images to train, "
                    f"{len(te_idx):,} held out to test", 28, note)
    x, y = sklearn_digits()
    if x is None:
        raise DataError(missing_message(name, data_path)
                             + " (or pip install scikit-learn for the embedded 8x8 digits)")
    note = ""
    if which.lower() != "digits":
        note = f"{missing_message(name, data_path)}; trained on scikit-learn's bundled 8x8 digits"
        log(note)
    order = rng.permutation(len(x))
    cut = int(0.8 * len(x))
    return Images(x[order[:cut]], y[order[:cut]], x[order[cut:]], y[order[cut:]],
                f"scikit-learn's bundled digits (8x8, 1,797 images; the embedded fallback): {cut:,} to train, "
                f"{len(x) - cut:,} to test", 8, note)


def sklearn_digits() -> tuple[np.ndarray, np.ndarray] | tuple[None, None]:
    """scikit-learn's bundled 8x8 digits (pixels 0..16), read from its CSV without importing scikit-learn
    (which would load scipy: ~70 MB for a 0.5 MB file)."""
    import importlib.util

    spec = importlib.util.find_spec("sklearn")
    if spec is None or spec.origin is None:
        return None, None
    csv = Path(spec.origin).parent / "datasets" / "data" / "digits.csv.gz"
    if csv.is_file():
        table = np.loadtxt(csv, delimiter=",", dtype=np.float32)
        return table[:, :-1] / np.float32(16), table[:, -1].astype(np.int64)
    from sklearn.datasets import load_digits

    digits = load_digits()
    return (digits.data / 16.0).astype(np.float32), digits.target.astype(np.int64)

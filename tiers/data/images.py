"""Readers the milestones share: IDX files (MNIST's format), labelled image splits, the bundled digits."""
from __future__ import annotations

import gzip
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tiers.data.registry import DataError, get
from tiers.data.store import find_file, missing_message


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

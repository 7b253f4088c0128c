"""CIFAR-10 as the Toronto "python version" ships it: pickled batches of 32x32 colour images.

    cifar-10-batches-py/                       (the registry's `cifar-10`, unpacked by `tierkit data fetch`)
        data_batch_1 .. data_batch_5           {b"data": uint8 (10000, 3072), b"labels": [int] * 10000, ...}
        test_batch                             the same layout: the 10,000 test images
        batches.meta                           {b"label_names": [b"airplane", b"automobile", ...]}

    one row of 3072 bytes = 1024 red | 1024 green | 1024 blue, each plane a row-major 32 x 32 image
        -> rows.reshape(n, 3, 32, 32): channels first, the layout torch's Conv2d takes

The batches were pickled by Python 2, so their keys are byte strings: they load with
`pickle.load(f, encoding="bytes")`, as the data set's own page shows. Unpickling runs
whatever the file asks, so only a folder the user trusts is read: the registry's copy is
sha256-checked when it is fetched; an explicit folder (B9's `--set data_path=FOLDER`) is
one of the user's own.
"""
from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np

from tiers.data.registry import DataError
from tiers.data.store import require

NAME = "cifar-10"
TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
ROW = 3 * 32 * 32


def cifar10_folder(explicit: str | Path | None = None) -> Path:
    """The cifar-10-batches-py folder: `explicit` (the user's own copy), else the registry's (DataError naming
    `tierkit data fetch cifar-10` when it is not here)."""
    if explicit:
        folder = Path(explicit).expanduser()
        if not folder.is_dir():
            raise DataError(f"CIFAR-10: {folder} is not a folder; point data_path at a cifar-10-batches-py "
                            f"folder, or leave it unset and run `tierkit data fetch {NAME}`")
        return folder
    return require(NAME)


def read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One pickled batch -> (images (n, 3, 32, 32) uint8, labels (n,) int64)."""
    if not path.is_file():
        raise FileNotFoundError(f"CIFAR-10: {path} is missing; point data_path at a complete "
                                f"cifar-10-batches-py folder, or run `tierkit data fetch {NAME}`")
    with open(path, "rb") as f:
        try:
            d = pickle.load(f, encoding="bytes")
        except (pickle.UnpicklingError, EOFError, ValueError) as e:
            raise DataError(f"CIFAR-10: {path} is not a readable batch ({type(e).__name__}); "
                            f"fetch the data set again with `tierkit data fetch {NAME}`") from None
    rows = np.asarray(d.get(b"data", ()), dtype=np.uint8)
    labels = np.asarray(d.get(b"labels", ()), dtype=np.int64)
    if rows.ndim != 2 or rows.shape[1] != ROW or len(rows) != len(labels):
        raise DataError(f"CIFAR-10: {path} holds data {rows.shape} and {len(labels)} labels, not n rows of "
                        f"{ROW} bytes with one label each")
    return rows.reshape(-1, 3, 32, 32), labels


def load_cifar10(folder: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(train images, train labels, test images, test labels): the five training batches that are there
    (at least data_batch_1), then test_batch."""
    folder = Path(folder)
    present = [b for b in TRAIN_BATCHES if (folder / b).is_file()] or [TRAIN_BATCHES[0]]
    train = [read_batch(folder / b) for b in present]
    te_x, te_y = read_batch(folder / "test_batch")
    return np.concatenate([x for x, _ in train]), np.concatenate([y for _, y in train]), te_x, te_y


def class_names(folder: Path) -> list[str]:
    """The ten class names from batches.meta; numbers as names when the file is not there."""
    path = Path(folder) / "batches.meta"
    if path.is_file():
        with open(path, "rb") as f:
            meta = pickle.load(f, encoding="bytes")
        names = [n.decode() if isinstance(n, bytes) else str(n) for n in meta.get(b"label_names", [])]
        if names:
            return names
    return [str(i) for i in range(10)]

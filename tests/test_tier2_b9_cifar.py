"""B9 on CIFAR-10: the registry's cifar-10-batches-py folder, read as the python pickles it ships.

The folder is written here in CIFAR-10's own format (pickled dicts with byte-string keys,
3072-byte rows of R, G and B planes, batches.meta with the class names): 600 training
and 200 test images of ten patterned classes (a colour and a stripe direction each, under
noise), so a small CNN learns them in two epochs and B8's MLP trains on the same split.
"""
from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")

from tests.conftest import assert_one_line_error, run_cli

KIT = "laptop-8gb-cpu"
ENV = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
# Small enough for a few seconds on one core: the rung's shape with fewer channels and images.
SMALL = ["--set", "samples=600", "--set", "epochs=2", "--set", "widths=[8, 16]", "--set", "convs_per_stage=1",
         "--set", "fc=[32]", "--set", "batch=32", "--set", "mlp_widths=[3072, 32, 10]"]


def patterned(n: int, rng: np.random.Generator) -> tuple[np.ndarray, list[int]]:
    """n images as CIFAR rows: class k is colour k % 3 brightened, with texture k // 3 (horizontal stripes,
    vertical stripes, a checkerboard or none: what survives crops and flips), plus noise."""
    labels = rng.integers(0, 10, n)
    yy, xx = np.mgrid[0:32, 0:32]
    textures = [(yy // 2) % 2, (xx // 2) % 2, (yy // 2 + xx // 2) % 2, np.zeros((32, 32))]
    img = rng.normal(100, 30, (n, 3, 32, 32))
    for i, k in enumerate(labels):
        img[i, k % 3] += 60
        img[i] += 60 * textures[k // 3][None]
    return np.clip(img, 0, 255).astype(np.uint8).reshape(n, 3072), [int(k) for k in labels]


def write_cifar(folder: Path, n_train: int = 600, n_test: int = 200, batches: int = 2) -> Path:
    """A cifar-10-batches-py folder in the published format (dict keys are bytes, as Python 2 pickled them)."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    per = n_train // batches
    for i in range(1, batches + 1):
        data, labels = patterned(per, rng)
        with open(folder / f"data_batch_{i}", "wb") as f:
            pickle.dump({b"batch_label": f"training batch {i} of 5".encode(), b"labels": labels, b"data": data,
                         b"filenames": [b"x.png"] * per}, f, protocol=2)
    data, labels = patterned(n_test, rng)
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({b"batch_label": b"testing batch 1 of 1", b"labels": labels, b"data": data}, f, protocol=2)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [n.encode() for n in NAMES], b"num_vis": 3072}, f, protocol=2)
    return folder


def test_reader_shapes_labels_and_class_names(tmp_path):
    from tiers.data.cifar import class_names, load_cifar10, read_batch

    folder = write_cifar(tmp_path / "cifar-10-batches-py")
    xtr, ytr, xte, yte = load_cifar10(folder)
    assert xtr.shape == (600, 3, 32, 32) and xte.shape == (200, 3, 32, 32) and xtr.dtype == np.uint8
    assert ytr.dtype == np.int64 and set(ytr.tolist()) <= set(range(10)) and len(yte) == 200
    # Row layout: the first 1024 bytes are the red plane, row-major.
    with open(folder / "test_batch", "rb") as f:
        rows = pickle.load(f, encoding="bytes")[b"data"]
    assert np.array_equal(xte[5, 0, 1], rows[5, 32:64]) and np.array_equal(xte[5, 2, 0], rows[5, 2048:2080])
    assert class_names(folder) == NAMES
    with open(folder / "data_batch_2", "wb") as f:
        pickle.dump({b"data": np.zeros((4, 100), np.uint8), b"labels": [0] * 4}, f)
    from tiers.data import DataError

    with pytest.raises(DataError, match="not n rows of 3072 bytes"):
        read_batch(folder / "data_batch_2")


def _run(home: Path, env: dict[str, str], *args: str):
    return run_cli("run", "B9", "--size", "cifar-s", "--profile", KIT, "--out", str(home / "builds"), *args,
                   home=home, env={**ENV, **env}, timeout=300)


def test_b9_on_cifar10_learns_and_is_compared_with_the_mlp(home, tmp_path):
    data_root = tmp_path / "data"
    write_cifar(data_root / "cifar-10-batches-py")
    proc = _run(home, {"TIERKIT_DATA": str(data_root)}, *SMALL)
    assert proc.returncode == 0, proc.stderr
    build = home / "builds" / "B09-cnn"
    m = json.loads((build / "metrics.json").read_text())["metrics"]
    assert m["dataset"] == "cifar-10" and m["data"].startswith("CIFAR-10 (") and "cifar-10-batches-py" in m["data"]
    assert m["n_train"] == 600 and m["n_test"] == 200 and m["augmented"] is True
    assert m["params"] == m["params_predicted"]
    assert m["test_accuracy"] > 0.5                        # chance is 10%
    _, mlp = m["comparison"]
    assert mlp["model"].startswith("B8 MLP 3072-32-10") and mlp["source"] == "here" and mlp["n_train"] == 600
    assert set(m["per_class_accuracy"]) == set(NAMES)
    readme = (build / "README.md").read_text()
    assert "## CNN vs MLP" in readme and "random crops and horizontal flips" in readme and "cat " in readme


def test_b9_cifar_missing_names_the_fetch(home, tmp_path):
    proc = _run(home, {"TIERKIT_DATA": str(tmp_path / "empty")}, *SMALL)
    assert_one_line_error(proc, "tierkit data fetch cifar-10")
    assert not (home / "builds" / "B09-cnn").exists()
    proc = _run(home, {"TIERKIT_DATA": str(tmp_path / "empty")}, *SMALL, "--set", f"data_path={tmp_path / 'nowhere'}")
    assert_one_line_error(proc, "nowhere is not a folder", "data_path")
    # The user's own copy, named by data_path, needs nothing from the registry.
    write_cifar(tmp_path / "mine")
    proc = _run(home, {"TIERKIT_DATA": str(tmp_path / "empty")}, *SMALL, "--set", f"data_path={tmp_path / 'mine'}")
    assert proc.returncode == 0, proc.stderr

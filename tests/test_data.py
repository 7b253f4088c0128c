"""The dataset registry and `tierkit data`, against a real loopback HTTP server.

The server (http.server in a thread) serves the real files in ../shared/data,
honours HTTP Range requests, and can be told to cut a response short: that is
how an interrupted download, and its resume, are tested.
"""
from __future__ import annotations

import hashlib
import http.server
import shutil
import socket
import tarfile
import threading
from dataclasses import replace
from pathlib import Path
from typing import ClassVar

import pytest

from tests.conftest import SHARED, assert_one_line_error, run_cli
from tests.hub_server import send_body
from tiers import data

DATA = SHARED / "data"
SHAKESPEARE = DATA / "tinyshakespeare.txt"
pytestmark = pytest.mark.skipif(not SHAKESPEARE.exists(), reason=f"reference data not at {DATA}")


class Handler(http.server.BaseHTTPRequestHandler):
    root: ClassVar[Path] = DATA
    cut_after: ClassVar[dict[str, int]] = {}     # path -> bytes to send before dropping the connection (once)
    requests: ClassVar[list[tuple[str, str | None]]] = []

    def log_message(self, *args: object) -> None:  # quiet
        pass

    def do_GET(self) -> None:
        rel = self.path.lstrip("/")
        self.requests.append((rel, self.headers.get("Range")))
        f = (self.root / rel).resolve()
        if not f.is_file() or self.root.resolve() not in f.parents:
            self.send_error(404, "Not Found")
            return
        body = f.read_bytes()
        start = 0
        rng = self.headers.get("Range")
        if rng and rng.startswith("bytes="):
            start = int(rng[6:].split("-")[0])
            if start >= len(body):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(body)}")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(body) - start))
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        send_body(self, body[start:], self.cut_after.pop(rel, None))  # a cut: part of the body, then drop


@pytest.fixture
def server():
    Handler.cut_after, Handler.requests = {}, []
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    t = threading.Thread(target=httpd.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", Handler
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def store(tmp_path, monkeypatch) -> Path:
    """An empty TIERKIT_DATA, and a HOME whose cache is empty too."""
    root = tmp_path / "data"
    monkeypatch.setenv("TIERKIT_DATA", str(root))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("TIERKIT_DATA_URL", raising=False)
    return root


def sha256(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def files_under(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()) if root.exists() else []


# ---------------------------------------------------------------- the CLI, as a user runs it

def test_fetch_verifies_and_writes_atomically(server, store, home):
    url, handler = server
    proc = run_cli("data", "fetch", "tinyshakespeare", "--url", url, home=home, env={"TIERKIT_DATA": str(store)})
    assert proc.returncode == 0, proc.stderr
    out = store / "tinyshakespeare.txt"
    assert sha256(out) == data.get("tinyshakespeare").files[0].sha256 == sha256(SHAKESPEARE)
    assert files_under(store) == ["tinyshakespeare.txt"]  # no .part left
    assert str(out) in proc.stdout and "sha256 verified" in proc.stdout
    # `path` finds it in TIERKIT_DATA; a second fetch keeps the good copy and downloads nothing
    path = run_cli("data", "path", "tinyshakespeare", home=home, env={"TIERKIT_DATA": str(store)})
    assert path.returncode == 0 and path.stdout.strip() == str(out)
    handler.requests.clear()
    again = run_cli("data", "fetch", "tinyshakespeare", "--url", url, home=home, env={"TIERKIT_DATA": str(store)})
    assert again.returncode == 0 and handler.requests == []


def test_fetch_several_files_through_the_env_url(server, store, home):
    """hh-rlhf has two files; the loopback serves only the test split: a 404 names the file, keeps the good one."""
    url, _ = server
    proc = run_cli("data", "fetch", "hh-rlhf", home=home, env={"TIERKIT_DATA": str(store), "TIERKIT_DATA_URL": url})
    assert_one_line_error(proc, "cannot download hh-rlhf", "harmless-base-train.jsonl.gz", "HTTP 404")
    assert files_under(store) == []  # nothing that looks like a data file


def test_404_is_one_line_and_leaves_nothing(server, store, home):
    url, _ = server
    proc = run_cli("data", "fetch", "mnist", "--url", url, home=home, env={"TIERKIT_DATA": str(store)})
    assert_one_line_error(proc, "cannot download mnist", "train-images-idx3-ubyte.gz", "HTTP 404")
    assert files_under(store) == []


def test_connection_refused_is_one_line(store, home):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = run_cli("data", "fetch", "tinyshakespeare", "--url", f"http://127.0.0.1:{port}", home=home,
                   env={"TIERKIT_DATA": str(store)})
    assert_one_line_error(proc, "cannot download tinyshakespeare", "connection refused")
    assert files_under(store) == []


def test_interrupted_download_resumes_with_a_range_request(server, store, home):
    url, handler = server
    size = SHAKESPEARE.stat().st_size
    handler.cut_after["tinyshakespeare.txt"] = 300_000
    env = {"TIERKIT_DATA": str(store)}
    proc = run_cli("data", "fetch", "tinyshakespeare", "--url", url, home=home, env=env)
    assert_one_line_error(proc, "interrupted at 300,000", "again to resume")
    assert files_under(store) == ["tinyshakespeare.txt.part"]  # never the real name
    assert (store / "tinyshakespeare.txt.part").stat().st_size == 300_000

    proc = run_cli("data", "fetch", "tinyshakespeare", "--url", url, home=home, env=env)
    assert proc.returncode == 0, proc.stderr
    assert handler.requests[-1] == ("tinyshakespeare.txt", "bytes=300000-")
    assert files_under(store) == ["tinyshakespeare.txt"]
    assert (store / "tinyshakespeare.txt").stat().st_size == size and sha256(store / "tinyshakespeare.txt") == \
        sha256(SHAKESPEARE)


def test_unknown_and_missing_data_sets_are_one_line(store, home):
    assert_one_line_error(run_cli("data", "fetch", "imagenet", home=home), "no data set named 'imagenet'", "mnist")
    proc = run_cli("data", "path", "tinyshakespeare", home=home, env={"TIERKIT_DATA": str(store)})
    assert_one_line_error(proc, "not found", "tierkit data fetch tinyshakespeare")


def test_data_list_shows_sources_and_what_is_here(home):
    proc = run_cli("data", "list", home=home, env={"TIERKIT_DATA": str(DATA)})
    assert proc.returncode == 0, proc.stderr
    for needle in ("mnist", "fashion-mnist", "tinyshakespeare", "speech-commands", "hh-rlhf", "CC BY 4.0",
                   str(DATA / "tinyshakespeare.txt"), "3 of 4 files"):
        assert needle in proc.stdout, needle


# ---------------------------------------------------------------- in process

def test_checksum_mismatch_discards_the_download(server, store, monkeypatch):
    """The right size, the wrong bytes: nothing that looks valid is left, not even the .part."""
    url, _ = server
    ds = data.get("tinyshakespeare")
    bad = replace(ds, files=(replace(ds.files[0], sha256="0" * 64),))
    monkeypatch.setitem(data.REGISTRY, "tinyshakespeare", bad)
    with pytest.raises(data.DataError) as err:
        data.fetch("tinyshakespeare", base_url=url)
    assert "does not match" in str(err.value) and "discarded" in str(err.value) and "\n" not in str(err.value)
    assert files_under(store) == []


def test_wrong_size_discards_the_download(server, store, monkeypatch):
    url, _ = server
    ds = data.get("tinyshakespeare")
    monkeypatch.setitem(data.REGISTRY, "tinyshakespeare",
                        replace(ds, files=(replace(ds.files[0], size=1_000_000, sha256=None),)))
    with pytest.raises(data.DataError, match="got 1,000,000 bytes|expected 1,000,000"):
        data.fetch("tinyshakespeare", base_url=url)
    assert files_under(store) == []


def test_size_only_entry_and_multi_file_fetch(server, store, monkeypatch):
    """A data set checked by size only (sha256 null) still lands whole; every file of a folder lands."""
    url, _ = server
    files = tuple(data.Remote(f"mnist/{n}", ("http://unused",), (DATA / "mnist" / n).stat().st_size, None)
                  for n in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"))
    monkeypatch.setitem(data.REGISTRY, "mnist-test", data.Dataset("mnist-test", "MNIST test split", "CC BY-SA 3.0",
                                                                  "", files, folder="mnist"))
    path = data.fetch("mnist-test", base_url=url)
    assert path == store / "mnist" and data.get("mnist-test").checksum == "size only"
    assert files_under(store) == ["mnist/t10k-images-idx3-ubyte.gz", "mnist/t10k-labels-idx1-ubyte.gz"]
    splits = data.load_idx_splits("mnist", store)
    assert list(splits) == ["test"] and splits["test"].x.shape == (10_000, 28, 28)


@pytest.mark.parametrize("name,mode,folder", [("cifar-10", "w:gz", "cifar-10-batches-py"),
                                               ("openwebtext-sample", "w:xz", "openwebtext-10k")])
def test_an_archive_holding_one_folder_unpacks_to_that_folder(server, store, monkeypatch, tmp_path, name, mode,
                                                              folder):
    """CIFAR-10's tarball holds cifar-10-batches-py/...: it lands as <root>/cifar-10-batches-py/, not nested."""
    url, handler = server
    src = tmp_path / "src" / folder
    src.mkdir(parents=True)
    for n in ("data_batch_1", "test_batch", "batches.meta"):
        (src / n).write_bytes(n.encode() * 100)
    served = tmp_path / "served"
    served.mkdir()
    ds = data.get(name)
    archive = served / ds.files[0].path
    with tarfile.open(archive, mode) as tar:
        tar.add(src, arcname=folder)
    monkeypatch.setattr(handler, "root", served)
    monkeypatch.setitem(data.REGISTRY, name, replace(ds, files=(replace(ds.files[0], size=archive.stat().st_size,
                                                                        sha256=sha256(archive)),)))
    path = data.fetch(name, base_url=url)
    assert path == store / folder == data.require(name)
    assert files_under(store) == [f"{folder}/batches.meta", f"{folder}/data_batch_1", f"{folder}/test_batch"]


def test_lookup_order_explicit_then_env_then_cache(tmp_path, monkeypatch):
    cache = tmp_path / "home" / ".cache" / "tierkit"
    env_root = tmp_path / "env"
    explicit = tmp_path / "mine"
    for root in (cache, env_root, explicit):
        root.mkdir(parents=True)
        shutil.copy(SHAKESPEARE, root / "tinyshakespeare.txt")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("TIERKIT_DATA", str(env_root))
    assert data.locate("tinyshakespeare", explicit) == explicit / "tinyshakespeare.txt"
    assert data.locate("tinyshakespeare", explicit / "tinyshakespeare.txt") == explicit / "tinyshakespeare.txt"
    assert data.locate("tinyshakespeare") == env_root / "tinyshakespeare.txt"
    monkeypatch.delenv("TIERKIT_DATA")
    assert data.locate("tinyshakespeare") == cache / "tinyshakespeare.txt"
    (cache / "tinyshakespeare.txt").write_text("truncated")  # a wrong size does not count as found
    assert data.locate("tinyshakespeare") is None
    assert "tierkit data fetch tinyshakespeare" in data.missing_message("tinyshakespeare")


def test_mnist_test_split_reads_as_idx():
    splits = data.load_idx_splits("mnist", DATA)
    assert "train" not in splits  # the reference copy has train labels but no train images
    x, y = splits["test"].x, splits["test"].y
    assert x.shape == (10_000, 28, 28) and x.dtype.name == "uint8" and y.shape == (10_000,)
    assert sorted(set(y.tolist())) == list(range(10)) and int(y[0]) == 7  # the first test digit is a 7


def test_fashion_mnist_from_the_debian_package():
    folder = Path("/usr/share/datasets/fashion-mnist")
    if not (folder / "t10k-images-idx3-ubyte.gz").exists():
        pytest.skip("Debian's dataset-fashion-mnist is not installed (apt-get install dataset-fashion-mnist)")
    assert data.locate("fashion-mnist", Path("/nonexistent")) == folder
    splits = data.load_idx_splits("fashion-mnist", Path("/nonexistent"))
    assert splits["train"].x.shape == (60_000, 28, 28) and splits["test"].y.shape == (10_000,)

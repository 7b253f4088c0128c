"""Bad input gets one line: what is wrong and what to do, exit 2, no traceback, nothing written.

    each case:  tierkit ARGS  (real CLI, fresh TIERKIT_HOME)  ->  exit 2, one stderr line naming the problem
                                                              ->  the folder it would have written: absent

Besides the failures: peers that cannot be reached are warnings with their reason, markdown is
rendered rather than shown as asterisks, and the wording of the checks a user reads.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, assert_one_line_error, run_cli


@pytest.fixture
def binary_yaml(tmp_path: Path) -> Path:
    p = tmp_path / "binary.yaml"
    p.write_bytes(bytes(range(128, 256)) * 4)       # not UTF-8 from the first byte
    return p


@pytest.mark.parametrize("cmd", [["fit"], ["run", "B1"]])
def test_profile_that_is_not_text_is_one_line(home, binary_yaml, cmd):
    p = run_cli(*cmd, "--profile", str(binary_yaml), home=home)
    assert_one_line_error(p, "binary.yaml", "not a text file")
    assert "internal error" not in p.stderr
    assert not (home / "builds").exists()


def _tflite(tmp_path: Path) -> bytes:
    """A real one-layer int8 .tflite, written with the TFLite schema (as tests/test_kws_export.py does)."""
    pytest.importorskip("tflite_micro.tensorflow.lite.micro.python.schema_py_generated",
                        reason="writing a .tflite needs tflite-micro's schema (the tier0 extra)")
    sys.path.insert(0, str(Path(__file__).parent))
    from test_kws_export import single_op_model

    return single_op_model("FULLY_CONNECTED", 1)


def test_kws_export_out_is_a_file(home, tmp_path):
    model = tmp_path / "m.tflite"
    model.write_bytes(_tflite(tmp_path))
    afile = tmp_path / "afile.txt"
    afile.write_text("mine\n")
    p = run_cli("kws", "export", str(model), "--out", str(afile), home=home)
    assert_one_line_error(p, "afile.txt", "not a folder", "--out")
    assert afile.read_text() == "mine\n"


@pytest.mark.parametrize("cmd", [["kws", "export", "MODEL", "--out", "/proc/x"],
                                 ["kws", "train", "--out", "/proc/kws"]])
def test_kws_out_where_nothing_can_be_written(home, tmp_path, cmd):
    model = tmp_path / "m.tflite"
    if "export" in cmd:
        model.write_bytes(_tflite(tmp_path))
    p = run_cli(*[str(model) if a == "MODEL" else a for a in cmd], home=home, timeout=60)
    assert_one_line_error(p, cmd[-1], "cannot write", "--out")
    assert not Path(cmd[-1]).exists()


def test_truncated_tflite_is_one_line_and_writes_nothing(home, tmp_path):
    blob = _tflite(tmp_path)
    cut = tmp_path / "cut.tflite"
    cut.write_bytes(blob[: len(blob) // 2])
    out = tmp_path / "c"
    p = run_cli("kws", "export", str(cut), "--out", str(out), home=home)
    assert_one_line_error(p, "cut.tflite", "truncated", "export the .tflite again")
    assert "unpack" not in p.stderr and not out.exists()


def test_probe_out_an_existing_folder(home, tmp_path):
    folder = tmp_path / "existing"
    folder.mkdir()
    p = run_cli("probe", "--no-bench", "--no-discover", "--no-report", "--out", str(folder), home=home)
    assert_one_line_error(p, str(folder), "is a folder", "profile.yaml")
    assert ".tmp" not in p.stderr
    assert list(folder.iterdir()) == [] and sorted(q.name for q in tmp_path.iterdir()) == ["existing", "home"]


@pytest.mark.parametrize("sub", ["show", "validate"])
def test_profile_show_and_validate_take_a_reference_kit(home, sub):
    p = run_cli("profile", sub, "laptop-8gb-cpu", home=home)
    assert p.returncode == 0, p.stderr
    assert "laptop-8gb-cpu" in p.stdout


def test_missing_profile_file_names_no_flag_the_command_lacks(home, tmp_path):
    p = run_cli("profile", "show", str(tmp_path / "nope.yaml"), home=home)
    assert_one_line_error(p, "nope.yaml", "no such profile")
    assert "--profile" not in p.stderr


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]       # closed once the socket is: nothing listens there


def test_unreachable_peers_are_warnings_with_their_reason(home, tmp_path):
    port = _closed_port()
    p = run_cli("probe", "--no-bench", "--no-discover", "--no-report", "--out", str(tmp_path / "p.yaml"),
                "--peer", "garbage.invalid", "--peer", f"127.0.0.1:{port}", home=home)
    assert p.returncode == 0, p.stderr
    warnings = [line for line in p.stderr.splitlines() if line.startswith("warning: peer")]
    assert len(warnings) == 2, p.stderr
    assert "garbage.invalid" in warnings[0] and "cannot resolve" in warnings[0]
    assert f"127.0.0.1:{port}" in warnings[1] and "connection refused" in warnings[1]
    assert "no peers found" not in p.stdout and "no peer reachable" in p.stdout


def test_data_path_names_the_files_here_and_missing(home, tmp_path):
    from tiers.data.registry import get

    folder = tmp_path / "digits"
    folder.mkdir()
    files = get("mnist").files
    for f in files[:3]:                     # the right sizes: a copy cut short at the last file
        with open(folder / f.name, "wb") as fh:
            fh.truncate(f.size)
    env = {"HOME": str(tmp_path / "user"), "TIERKIT_DATA": str(tmp_path / "data")}
    listed = run_cli("data", "list", "--path", str(folder), home=home, env=env)
    assert "3 of 4 files" in listed.stdout, listed.stdout
    p = run_cli("data", "path", "mnist", "--path", str(folder), home=home, env=env)
    assert_one_line_error(p, "3 of 4 files", str(folder), files[3].name, "tierkit data fetch mnist")
    assert "not found" not in p.stderr


def test_time_over_the_box_says_by_how_much():
    from tiers.catalog import get
    from tiers.fit.rules import time_check

    m = get("B12")
    box = m.time_box.budget_seconds
    over = time_check(box + 1.0, m)
    assert not over.ok
    assert "(100%)" not in over.text and "over it" not in over.text and "by 1 s" in over.text, over.text
    assert "(50%)" in time_check(box / 2, m).text


def test_run_renders_markdown_in_the_terminal(home, tmp_path):
    p = run_cli("run", "B8", "--size", "784-32-10-8k", "--profile", "laptop-8gb-cpu", "--out", str(tmp_path / "b"),
                home=home, timeout=180)
    assert p.returncode == 0, p.stderr
    readme = next((tmp_path / "b").glob("B08-*/README.md")).read_text()
    assert "test accuracy**" in readme      # the build README keeps its markdown ...
    assert "test accuracy" in p.stdout and "**" not in p.stdout, p.stdout   # ... the terminal renders it
    assert p.stderr.strip() == "", p.stderr  # and no library spoke on stderr


def test_library_noise_is_kept_off_stderr(tmp_path):
    """What main() sets up before a command: torch's and transformers' warnings and logs are kept, not printed;
    tierkit's own warnings still print; with TIERKIT_VERBOSE=1 nothing is held back."""
    pytest.importorskip("transformers", reason="the tier2 extra")
    code = ("from tiers.cli import quiet; quiet.quiet(quiet.wanted()); import warnings, torch\n"
            "from transformers.utils import logging\n"
            "logging.get_logger('transformers.modeling_utils').warning('Some weights were not initialized')\n"
            "torch.nn.functional.softmax(torch.ones(2))\n"            # UserWarning: implicit dim, from torch
            "import tiers.cli.common as c, tiers.cli.quiet as q; exec(compile('import warnings; warnings.warn(\"own\")', c.__file__, 'exec'))\n"
            "print(list(q.NOISE))")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("TIERKIT_VERBOSE", None)
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120,
                       check=False)
    assert p.returncode == 0, p.stderr
    assert "Some weights" not in p.stderr and "implicit" not in p.stderr, p.stderr
    assert "own" in p.stderr and "Implicit dimension" in p.stdout
    loud = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False,
                          env={**env, "TIERKIT_VERBOSE": "1"}, timeout=120)
    assert "Some weights" in loud.stderr and "Implicit dimension" in loud.stderr, loud.stderr

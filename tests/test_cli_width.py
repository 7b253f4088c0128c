"""The first answer, readable: every table fits the terminal it is in (COLUMNS, 80 upwards) with the
names the user types whole, and a milestone that fits the hardware but lacks packages says "fits,
install first" rather than ✗."""
from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from inventory import kits
from inventory.profile import Host, save
from tests.conftest import REPO, run_cli
from tiers import catalog, data
from tiers.fit.rules import TORCH_PIN, install_note

WIDTHS = (80, 100, 160)
RTX = "rtx4090-laptop-16gb"


def _render(home: Path, width: int, *args: str, env: dict | None = None) -> str:
    proc = run_cli(*args, home=home, env={"COLUMNS": str(width), **(env or {})})
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def _fits(text: str, width: int) -> None:
    long = [line for line in text.splitlines() if len(line) > width]
    assert not long, f"{len(long)} lines over {width} columns, e.g. {long[0]!r}"


def _whole(text: str, names) -> None:
    """Each name appears whole on one line (not cut with … nor split across lines)."""
    lines = text.splitlines()
    cut = [n for n in names if not any(n in line for line in lines)]
    assert not cut, f"cut or missing: {cut}"


@pytest.mark.parametrize("width", WIDTHS)
def test_fit_table_fits_the_terminal_with_every_id_and_size_whole(home, width):
    text = _render(home, width, "fit", "--profile", RTX)
    _fits(text, width)
    plans = json.loads(run_cli("fit", "--profile", RTX, "--json", home=home).stdout)["plans"]
    _whole(text, [p["milestone"] for p in plans] + [p["size"] for p in plans if p["size"]])
    # the registry names the notes tell the user to fetch
    _whole(text, [a["name"] for p in plans for a in p["artifacts"] if not a["here"]])
    wide = _render(home, width, "fit", "--profile", RTX, "--wide")
    _fits(wide, width)
    _whole(wide, [p["milestone"] for p in plans])


@pytest.mark.parametrize("width", WIDTHS)
def test_all_profiles_matrix_fits_with_kits_and_sizes_whole(home, width):
    text = _render(home, width, "fit", "--all-profiles")
    _fits(text, width)
    doc = json.loads(run_cli("fit", "--all-profiles", "--json", home=home).stdout)
    sizes = {p["size"] for ps in doc["profiles"].values() for p in ps if p["size"]}
    _whole(text, [*doc["profiles"], *sizes])


@pytest.mark.parametrize("width", WIDTHS)
def test_data_list_and_profile_show_fit(home, width):
    text = _render(home, width, "data", "list")
    _fits(text, width)
    _whole(text, list(data.REGISTRY))
    for kit in (RTX, "two-node-lan", "laptop-8gb-cpu"):
        _fits(_render(home, width, "profile", "show", kit), width)


@pytest.mark.parametrize("width", (80, 120))
def test_explain_reads_at_80_and_120(home, width):
    text = _render(home, width, "fit", "--profile", RTX, "--milestone", "B12", "--explain")
    _fits(text, width)
    for needle in ("params = V*h", "Korthikanti", "peak memory = "):
        assert needle in text, needle


def test_install_note_names_one_command():
    extras = catalog.load().extras
    note = install_note(["matplotlib"], extras)
    assert "make setup-dev" in note and "pip install -e '.[tier1]'" in note and "torch" not in note
    note = install_note(["torch", "matplotlib"], extras)
    assert f"pip install {TORCH_PIN} && pip install -e '.[tier1,tier2]'" in note
    assert "pip install some_pkg" in install_note(["some_pkg"], extras)
    # the pin is the one the Makefile installs
    assert f"install -q {TORCH_PIN}" in (REPO / "Makefile").read_text()


# A base install, without uninstalling anything: a sitecustomize on PYTHONPATH puts a finder first on
# sys.meta_path that raises ImportError for the hidden packages, so importlib.util.find_spec (the
# planner's package check) sees them missing, as after `pip install -e .` alone.
HIDE = """import sys
HIDDEN = set({hidden!r})
class _Hide:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in HIDDEN:
            raise ModuleNotFoundError(name)
        return None
sys.meta_path.insert(0, _Hide())
"""


def test_base_install_first_answer(home, tmp_path):
    hidden = sorted(p for p, extra in catalog.load().extras.items() if extra != "base")
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(HIDE.format(hidden=hidden))
    check = subprocess.run([sys.executable, "-c", "import importlib.util as u; print(u.find_spec('matplotlib'))"],
                           capture_output=True, text=True, env={"PYTHONPATH": str(site)}, timeout=60)
    assert "ModuleNotFoundError" in check.stderr  # the trick hides it
    prof = kits.reference_profile("laptop-8gb-cpu").model_copy(deep=True)
    prof.host = Host(hostname=socket.gethostname(), os="Linux")  # probed here: packages count
    save(prof, tmp_path / "here.yaml")
    env = {"PYTHONPATH": f"{site}:{REPO}", "COLUMNS": "80"}
    plans = {p["milestone"]: p for p in json.loads(run_cli("fit", "--profile", str(tmp_path / "here.yaml"),
                                                           "--json", home=home, env=env).stdout)["plans"]}
    for mid in ("B1", "B2", "B3", "B4", "B5", "B8", "B10", "B15"):
        p = plans[mid]
        assert p["verdict"] in ("fits", "tight"), (mid, p["reasons"])
        assert any("install first" in r and "make setup-dev" in r for r in p["reasons"]), (mid, p["reasons"])
    assert plans["B6"]["verdict"] == "no" and "board" in plans["B6"]["reasons"][0]
    assert plans["B17"]["verdict"] == "no" and "2 nodes" in plans["B17"]["reasons"][0]
    text = _render(home, 80, "fit", "--profile", str(tmp_path / "here.yaml"), env=env)
    _fits(text, 80)
    assert "✗" in text and text.count("make setup-dev") >= 8


def test_make_run_ends_with_the_next_three_commands():
    """`make -n run` (nothing executed): after `tierkit fit`, three next commands, each one that exists."""
    proc = subprocess.run(["make", "-n", "run", "VENV=/nonexistent-venv-for-dry-run"], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    after = lines[max(i for i, line in enumerate(lines) if line.endswith("tierkit fit")) + 1:]
    nexts = [line for line in after if "#" in line and ("tierkit " in line or "make " in line)]
    assert len(nexts) == 3, after
    assert any("--explain" in n for n in nexts) and any("setup-dev" in n for n in nexts)
    assert any("tierkit run" in n for n in nexts)


def test_probe_logs_each_detector_only_with_verbose(home, tmp_path):
    args = ("probe", "--no-bench", "--no-discover", "--no-report", "--out", str(tmp_path / "p.yaml"))
    quiet = run_cli(*args, home=home, env={"COLUMNS": "80"})
    assert quiet.returncode == 0 and "cpu: ok" not in quiet.stderr + quiet.stdout
    loud = run_cli(*args, "--verbose", home=home, env={"COLUMNS": "80"})
    assert loud.returncode == 0 and "cpu: ok in" in loud.stderr
    _fits(loud.stdout, 80)

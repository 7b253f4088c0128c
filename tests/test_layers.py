"""The layering rule, as import-linter contracts (pyproject.toml), kept by the test suite.

    tiers.tier0 | tiers.tier1 | tiers.tier2 | tiers.tier3     independent of each other
    tiers  ─►  models  ─►  inventory                          never upwards
    no import cycles between the modules of any package

The second test shows the contracts can fail: a copy of the contracts over a
small tree in which one tier imports another must be reported as broken.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
LINT = shutil.which("lint-imports", path=str(Path(sys.executable).parent)) or shutil.which("lint-imports")

pytestmark = pytest.mark.skipif(LINT is None, reason="import-linter is not installed: pip install -e '.[dev]'")


def _lint(cwd: Path, env_path: Path) -> subprocess.CompletedProcess:
    import os

    env = {**os.environ, "PYTHONPATH": str(env_path)}
    return subprocess.run([LINT, "--no-cache"], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_the_contracts_hold():
    out = _lint(REPO, REPO)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    assert "3 kept, 0 broken" in out.stdout


def _tree(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)


@pytest.mark.parametrize("bad", [
    {"tiers/tier2/b.py": "from tiers.tier1 import a\n"},            # one tier imports another
    {"inventory/probe.py": "def f():\n    import tiers.runner\n"},  # inventory reaches up, inside a function
    {"models/m.py": "import tiers.tier1.a\n"},                       # models reaches up
    {"tiers/tier0/x.py": "from tiers.tier0 import y\n",               # a cycle inside a tier
     "tiers/tier0/y.py": "from tiers.tier0 import x\n"},
])
def test_a_broken_contract_is_reported(tmp_path, bad):
    base = {"inventory/__init__.py": "", "inventory/probe.py": "", "models/__init__.py": "", "models/m.py": "",
            "tiers/__init__.py": "", "tiers/runner.py": "import models.m\nimport inventory.probe\n",
            **{f"tiers/tier{i}/__init__.py": "" for i in range(4)},
            "tiers/tier1/a.py": "import tiers.runner\n", "tiers/tier2/b.py": "", "tiers/tier0/x.py": "",
            "tiers/tier0/y.py": ""}
    _tree(tmp_path, base)
    start = (REPO / "pyproject.toml").read_text()
    (tmp_path / "pyproject.toml").write_text(start[start.index("[tool.importlinter]"):start.index("[tool.ruff]")])
    assert _lint(tmp_path, tmp_path).returncode == 0, "the clean tree must pass"
    _tree(tmp_path, bad)
    out = _lint(tmp_path, tmp_path)
    assert out.returncode != 0 and "BROKEN" in out.stdout, out.stdout


# ---------------------------------------------------------------- one idea per module

# Functions allowed past 80 lines: each is one documented algorithm, read best in one piece.
LONG_FUNCTIONS: dict[str, str] = {}


def _python_files():
    for folder in ("inventory", "models", "tiers"):
        yield from sorted((REPO / folder).rglob("*.py"))


def test_no_module_holds_several_ideas():
    """No module past 700 lines, no function past 80 (but the documented algorithms above)."""
    import ast

    big, long = [], []
    for f in _python_files():
        src = f.read_text(encoding="utf-8")
        rel = f.relative_to(REPO).as_posix()
        if src.count("\n") > 700:
            big.append(f"{rel}: {src.count(chr(10))} lines")
        for node in ast.walk(ast.parse(src)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > 80 and f"{rel}:{node.name}" not in LONG_FUNCTIONS:
                    long.append(f"{rel}:{node.name} ({n} lines)")
    assert not big, big
    assert not long, long

"""The README's commands are the user's contract: each cheap one runs here, as written, in order.

    README.md (or $TIERKIT_README) --```sh blocks--> one command per line (comments dropped, `a && b` kept whole)
        SKIP[cmd]    -> not run; the reason is the skip message (network, hardware, a server, minutes of work)
        SHRINK[cmd]  -> run as the smaller command given (the smallest rung, a few steps), and why
        SLOW[cmd]    -> run shrunk (seconds to tens of seconds of torch or TensorFlow each, fewer steps and evals)
        otherwise    -> run exactly as written
    every run: bash -c CMD in a fresh working folder, fresh TIERKIT_HOME and HOME, tierkit on PATH,
               no network (HF_HUB_OFFLINE); the data sets a `tierkit data fetch` would bring come from
               ../shared/data ($TIERKIT_DATA) when it is there
    passes when: exit 0 (or EXPECT's code and line), no traceback, no "internal error", within its time

A README edit that changes a command makes it unlisted, so it runs as written: a command that
no longer works, or now costs minutes, fails here. ARCHITECTURE.md is read the same way (it has no
sh blocks today: the test says so rather than passing on nothing).
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import REPO, SHARED

README = Path(os.environ.get("TIERKIT_README") or REPO / "README.md")
DOCS = [README, REPO / "ARCHITECTURE.md"]
VENV_BIN = REPO / ".venv" / "bin"
TIMEOUT = 120

NETWORK = "downloads from the internet (tests run offline; tests/test_data.py fetches from a local server)"
SKIP = {
    "make run": "creates .venv and pip-installs (network, minutes); its steps, `tierkit probe` and "
                "`tierkit fit`, run below as the README's next block writes them",
    "make test": "the whole suite, which holds this test",
    "tierkit run B7 --fetch": NETWORK,
    "tierkit data fetch tinystories && tierkit run B12 --size 30M": NETWORK + "; then hours of training",
    "tierkit data fetch openwebtext-sample && tierkit run B12 --size 124M": NETWORK + "; then hours of training",
    "tierkit data fetch cifar-10 && tierkit run B9 --size cifar-s": NETWORK,
    "tierkit data fetch smollm2-135m-instruct": NETWORK,
    "tierkit data fetch alpaca-cleaned": NETWORK,
    "tierkit run B13 --size smollm2-135m": "needs SmolLM2-135M-Instruct from the hub: " + NETWORK,
    "tierkit run B14 --size smollm2-135m": "needs the B13 model above: " + NETWORK,
    "tierkit run B13 --size qwen2.5-0.5b --fetch": NETWORK,
    "tierkit run B14 --size qwen2.5-0.5b": "needs Qwen2.5-0.5B-Instruct: " + NETWORK,
    "tierkit data fetch gpt2": NETWORK,
    "tierkit data fetch llama-3.2-3b-instruct-q8_0": NETWORK,
    "tierkit data fetch cifar-10": NETWORK,
    "tierkit data fetch llama-3.1-8b-instruct-q4_k_m": NETWORK,
    "tierkit kws flash --board nano33ble --port /dev/ttyACM0": "needs a board on a serial port, and "
                                                                "PlatformIO's toolchain (network once)",
    "tierkit kws monitor": "needs a board on a serial port",
    "tierkit kws flash --board nano33ble --no-upload": "PlatformIO fetches its toolchain once (network); "
                                                        "tests/test_kws_flash.py builds offline",
    "tierkit run B6": "trains, exports and flashes (or emulates) the keyword spotter: minutes; the kws "
                      "commands above are its steps",
    "python bench/kws.py --quick": "a benchmark: bench/ is run by `make bench`, not by tests",
    "tierkit agent --host 0.0.0.0 --port 8477": "a server that runs until stopped; tests/test_tier3_agent.py "
                                                 "starts and stops one",
    "tierkit agent --host 192.168.1.20 --memory-budget 8GiB": "a server on a second machine's address",
    "scp worker:~/.config/tierkit/agent.token ~/agent.token": "needs a second machine",
    "tierkit serve model.gguf --peers auto --token-file ~/agent.token --port 8000":
        "needs worker agents and a GGUF file; tests/test_tier3_serve*.py serve across network namespaces",
    "tierkit serve llama-3.1-8b-instruct-q4_k_m --peers auto --token-file ~/agent.token":
        "needs worker agents and a 4.92 GB model",
    "tierkit serve random:gpt-300m --engine pipeline --peers 192.168.1.20:8477 ...":
        "an example with elided arguments (...) and a second machine",
    "pip install -e .": "installs into the environment (network)",
    "pip install -e '.[tier0]'": "installs into the environment (network)",
    "pip install -e '.[tier1]'": "installs into the environment (network)",
    "pip install torch==2.13.0": "installs into the environment (network)",
    "pip install -e '.[tier2]'": "installs into the environment (network)",
    "pip install -e '.[tier3]'": "installs into the environment (network)",
    "pip install -e '.[all,dev]'": "installs into the environment (network)",
    ".venv/bin/python -m pytest tests/test_probe.py -q": "runs part of the suite this test belongs to",
    ".venv/bin/python bench/probe_speed.py": "a benchmark: bench/ is run by `make bench`, not by tests",
}
# what runs instead, and why
SHRINK = {
    ".venv/bin/tierkit run B5": ("tierkit run B5 --size n256", "the smallest rung of the ladder"),
    "tierkit run B5": ("tierkit run B5 --size n256", "the smallest rung of the ladder"),
    "tierkit run B5 --size n1024": ("tierkit run B5 --size n256", "the smallest rung of the ladder"),
    "tierkit profile validate FILE": ("tierkit profile validate laptop-8gb-cpu", "FILE: a reference kit's name"),
    "tierkit profile show [FILE]": ("tierkit profile show", "[FILE] left out: the probed profile"),
    "tierkit probe --peer 192.168.1.20:8477": ("tierkit probe --no-bench --peer 127.0.0.1:1",
                                               "no second machine: a peer that refuses, which warns"),
}
SLOW = {
    "tierkit run B12 --size 0.8M": "tierkit run B12 --size 28K --set steps=5 --set eval_iters=5",
    "tierkit run B12 --size 0.8M --set arch=gpt2": "tierkit run B12 --size 28K --set steps=5 --set eval_iters=5 "
                                                   "--set arch=gpt2",
    "tierkit run B12 --resume": "tierkit run B12 --resume --size 28K --set steps=5",
    "tierkit run B12 --set tokenizer=gpt2": "tierkit run B12 --size 28K --set steps=5 --set eval_iters=5 "
                                            "--set tokenizer=gpt2",
    "tierkit run B11 --size 0.2M": "tierkit run B11 --size 28K",
    "tierkit run B9 --size mnist-s": "tierkit run B9 --size mnist-xs-8k",
    "tierkit kws train --out kws/": "tierkit kws train --out kws/ --size xs --epochs 1 --train-samples 64 "
                                    "--synth-speakers 2 --limit-per-class 4",
    "tierkit kws export kws/model.tflite --out kws/c": "tierkit kws export kws/model.tflite --out kws/c",
    "tierkit kws eval --tflite kws/model.tflite": "tierkit kws eval --tflite kws/model.tflite --limit 4 "
                                                  "--synth-speakers 2",
}
# commands whose documented answer is a failure: (exit code, text the one line must hold)
EXPECT = {"tierkit data path gpt2": (2, "tierkit data fetch gpt2"),
          # nothing was interrupted in this session, so the answer is the one line that says so;
          # tests/test_tier2_long_runs.py interrupts a run and resumes it
          "tierkit run B12 --resume": (2, "nothing to resume")}


def commands(path: Path) -> list[str]:
    """Every command line of the ```sh / ```bash blocks in `path`, comments and blank lines dropped."""
    out, inside = [], False
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("```"):
            inside = not inside and line[3:].strip() in ("sh", "bash", "shell", "console")
            continue
        cmd = re.sub(r"\s+#.*$", "", line).strip() if inside else ""
        if cmd and not cmd.startswith("#"):
            out.append(cmd)
    return out


def plan(cmd: str) -> tuple[str | None, str]:
    """(the command to run, or None; why it differs from the README's, or why it is skipped)."""
    if cmd in SKIP:
        return None, SKIP[cmd]
    if cmd in SHRINK:
        return SHRINK[cmd]
    if cmd in SLOW:
        return SLOW[cmd], "a few steps of the smallest rung"
    return cmd, ""


class Session:
    """One user's session: a working folder, a profile home and a home folder, shared by the commands in order."""

    def __init__(self, root: Path):
        self.cwd, self.home, self.user = root / "work", root / "tierkit-home", root / "user"
        for d in (self.cwd, self.home, self.user):
            d.mkdir(parents=True, exist_ok=True)
        self.env = {**os.environ, "TIERKIT_HOME": str(self.home), "HOME": str(self.user),
                    "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}", "HF_HUB_OFFLINE": "1",
                    "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "2"}
        for key in ("TIERKIT_DATA", "HF_HOME", "HF_HUB_CACHE", "XDG_CONFIG_HOME", "TIERKIT_VERBOSE"):
            self.env.pop(key, None)
        if (SHARED / "data").is_dir():
            self.env["TIERKIT_DATA"] = str(SHARED / "data")

    def check(self, readme_cmd: str) -> str | None:
        """None when the command did what the README says; else one line of what went wrong."""
        cmd, _ = plan(readme_cmd)
        assert cmd is not None
        cmd = cmd.replace(".venv/bin/", f"{VENV_BIN}/").replace("/tmp/b", str(self.cwd / "tmp-b"))
        try:
            p = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, cwd=self.cwd, env=self.env,
                               timeout=TIMEOUT, check=False)
        except subprocess.TimeoutExpired:
            return f"`{readme_cmd}` ran past {TIMEOUT} s: shrink it (SHRINK/SLOW in tests/test_readme.py)"
        code, needle = EXPECT.get(readme_cmd, (0, ""))
        tail = next((ln.strip(" │") for ln in reversed(p.stderr.splitlines()) if re.search(r"\w", ln)), "")
        if p.returncode != code or needle not in p.stderr:
            return f"`{readme_cmd}` exited {p.returncode} (README: {code}): {tail or p.stdout[-300:]}"
        if "Traceback" in p.stderr or "internal error" in p.stderr:
            return f"`{readme_cmd}`: {tail}"
        return None


def _cases(path: Path) -> list:
    return [pytest.param(c, id=f"{path.name}:{i}:{c[:60]}") for i, c in enumerate(commands(path))]


@pytest.fixture(scope="module")
def session(tmp_path_factory) -> Session:
    return Session(tmp_path_factory.mktemp("readme"))


@pytest.mark.parametrize("cmd", _cases(README))
def test_readme_command(session, cmd):
    run, why = plan(cmd)
    if run is None:
        pytest.skip(why)
    problem = session.check(cmd)
    assert problem is None, problem


def test_every_listed_command_is_still_in_the_readme():
    """An entry for a command the README no longer has would hide nothing, but says the list is stale."""
    if README != REPO / "README.md":
        pytest.skip("TIERKIT_README points elsewhere")
    written = set(commands(README))
    stale = [c for c in (*SKIP, *SHRINK, *SLOW, *EXPECT) if c not in written]
    assert stale == [], f"no longer in the README: {stale}"


def test_architecture_has_no_commands_to_run():
    assert commands(REPO / "ARCHITECTURE.md") == [], "ARCHITECTURE.md has sh blocks now: add it to _cases"
    assert len(commands(README)) > 40


def test_a_broken_readme_command_fails(tmp_path):
    """Edit one command the way a careless README change would: the check names it and fails."""
    broken = tmp_path / "README.md"
    text = README.read_text(encoding="utf-8")
    good = "tierkit fit --profile laptop-8gb-cpu"
    assert good in commands(README)
    broken.write_text(text.replace(good, "tierkit fit --profile laptop-8gb-cpu --no-such-option"), encoding="utf-8")
    bad = [c for c in commands(broken) if "--no-such-option" in c]
    assert bad == ["tierkit fit --profile laptop-8gb-cpu --no-such-option"]
    s = Session(tmp_path / "s")
    problem = s.check(bad[0])
    assert problem is not None and "--no-such-option" in problem and "exited 2" in problem, problem
    assert s.check(good) is None
    shutil.rmtree(tmp_path / "s")

"""How right is the planner? Predicted vs actual peak memory and wall time, per milestone.

Runs every milestone that is both implemented (`tiers.runner.REGISTRY`) and
planned to fit this machine (`tiers.fit.fit`), each at its planned size, each
as a user runs it (`tierkit run B<n>` in its own process, so the interpreter's
baseline memory is the real one). Targets: peak memory within +-15% of the
prediction, wall time within 0.67-1.5x. A new milestone joins by being registered;
nothing here changes. `--size B8=784-32-10-8k` runs a milestone at another
size of its ladder (a small one, where the planned size would take long or needs
data that is not here); `--set B8:data=fashion-mnist` runs it on other data of the
same shape (Debian's dataset-fashion-mnist: the full 60,000 training images, where
MNIST's are not here). Milestones that read data find it through the dataset
registry: set TIERKIT_DATA (e.g. to ../shared/data) before running this.
The torch milestones join the same way: B9 (`--size B9=mnist-xs-8k` with only
MNIST's test split here) and B12 (`--size B12=0.8M`, nanoGPT's CPU recipe).

The live profile is copied into a temporary TIERKIT_HOME (probed there first
when there is none), so this benchmark never adds calibration records to the
user's profile. Its own calibration records are stripped from the copy unless
--calibrated is given: by default the table measures the planner's formulas.

    python bench/fit_accuracy.py [--only B5] [--size B8=784-32-10-8k] [--set B8:data=fashion-mnist] [--out ...json]
                                 [--calibrated] [--kit one-core|mem-4g|mem-2g]

`--kit NAME` runs this machine as a weaker kit: every process (the probe first,
then each milestone) starts confined, `taskset -c 0` for one-core, a fresh cgroup
v1 memory limit for mem-4g / mem-2g (as root). The profile is probed under that
confinement, so the plans are the ones that kit's user would get; a run the
kernel OOM-kills is counted. On a memory kit the converse is shown too: the
cheapest rung the planner refuses for memory, run anyway under the limit, is killed.

    kit process  = [taskset -c 0] python -m tiers.cli run B<n>   (child of a cgroup with memory.limit_in_bytes)
    OOM kill     = the child died of SIGKILL and the cgroup's oom_kill count rose
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

MEMORY_TARGET = (0.85, 1.15)
TIME_TARGET = (0.67, 1.5)
KITS = {"one-core": {"cpus": "0"}, "mem-4g": {"memory": 4 * 2**30}, "mem-2g": {"memory": 2 * 2**30}}
CGROUP_V1 = Path("/sys/fs/cgroup/memory")


class Kit:
    """Start processes confined as the named kit: a CPU mask and/or a cgroup v1 memory limit."""

    def __init__(self, name: str | None):
        self.name, self.spec, self.groups = name, KITS.get(name or "", {}), []
        if "memory" in self.spec and not (os.geteuid() == 0 and (CGROUP_V1 / "memory.limit_in_bytes").exists()):
            raise SystemExit(f"--kit {name} needs root and a cgroup v1 memory hierarchy at {CGROUP_V1}")

    def prefix(self) -> list[str]:
        return ["taskset", "-c", self.spec["cpus"]] if "cpus" in self.spec else []

    def group(self) -> Path | None:
        """A fresh cgroup with the kit's memory limit (no swap to spill into), or None."""
        if "memory" not in self.spec:
            return None
        g = CGROUP_V1 / f"tierkit-kit-{os.getpid()}-{len(self.groups)}"
        g.mkdir()
        (g / "memory.limit_in_bytes").write_text(str(self.spec["memory"]))
        swap = g / "memory.memsw.limit_in_bytes"
        if swap.exists():
            swap.write_text(str(self.spec["memory"]))
        self.groups.append(g)
        return g

    def run(self, argv: list[str], **kw: Any) -> tuple[subprocess.CompletedProcess | None, bool, str | None]:
        """(the finished process or None on timeout, OOM-killed?, the timeout message)."""
        g = self.group()
        enter = (lambda: (g / "cgroup.procs").write_text(str(os.getpid()))) if g else None
        try:
            proc = subprocess.run([*self.prefix(), *argv], check=False, preexec_fn=enter, **kw)
        except subprocess.TimeoutExpired as exc:
            return None, False, f"still running after {exc.timeout:.0f} s (--timeout)"
        return proc, bool(g and proc.returncode == -9 and oom_kills(g) > 0), None

    def close(self) -> None:
        for g in self.groups:
            for _ in range(20):  # rmdir works once the last task has left
                try:
                    g.rmdir()
                    break
                except OSError:
                    time.sleep(0.1)


def oom_kills(g: Path) -> int:
    """How many processes the kernel OOM-killed in this cgroup (v1 memory.oom_control, else failcnt > 0)."""
    try:
        for line in (g / "memory.oom_control").read_text().splitlines():
            if line.startswith("oom_kill "):
                return int(line.split()[1])
        return int((g / "memory.failcnt").read_text().strip() != "0")
    except OSError:
        return 0

# Milestones whose plan prices a file the user supplies: without it the run would time a different
# model from the one predicted, so it is skipped with the variable to set.
NEEDS_ENV = {
    "B16": ("TIERKIT_B16_GGUF", "its plan prices a downloaded GGUF (the size's model and quantisation); set "
                                "TIERKIT_B16_GGUF to that file, e.g. --size B16=tinyllama-1.1b-Q4_K_M with a TinyLlama "
                                "Q4_K_M .gguf"),
}


def kit_profile(home: Path, kit: Kit) -> tuple[Any, str]:
    """A fresh probe (with benchmarks) under the kit's confinement, as that kit's user would make."""
    from inventory.profile import load

    env = {**os.environ, "TIERKIT_HOME": str(home), "PYTHONPATH": str(REPO)}
    proc, _oom, late = kit.run([sys.executable, "-m", "tiers.cli", "probe", "--no-discover", "--no-report",
                               "--out", str(home / "profile.yaml")], capture_output=True, text=True, env=env,
                              timeout=300)
    if proc is None or proc.returncode != 0:
        raise SystemExit(f"the probe under --kit {kit.name} failed: {late or proc.stderr.strip()[-300:]}")
    return load(home / "profile.yaml"), f"probed as kit {kit.name}"


def live_profile(home: Path, calibrated: bool) -> tuple[Any, str]:
    """The user's profile copied into `home` (or a fresh probe there); and where it came from."""
    from inventory.probe import probe
    from inventory.profile import default_path, load, save

    src = default_path()  # honours the caller's TIERKIT_HOME
    if src.exists():
        prof, origin = load(src), str(src)
        if not calibrated:
            prof.calibration = []
    else:
        print(f"no profile at {src}: probing this machine (with benchmarks) into {home}", file=sys.stderr)
        prof, origin = probe(bench=True, discover=False), "fresh probe"
    save(prof, home / "profile.yaml")
    return prof, origin


def runnable(prof: Any, sizes: dict[str, str] | None = None) -> tuple[list[tuple[str, Any]], list[dict[str, Any]]]:
    """(milestone, plan) for the registry's milestones that fit; and the ones skipped, with why."""
    from tiers.fit import fit
    from tiers.runner import REGISTRY

    todo, skipped = [], []
    for mid in sorted(REGISTRY, key=lambda m: int(m[1:])):
        if mid in NEEDS_ENV and not os.environ.get(NEEDS_ENV[mid][0]):
            skipped.append({"milestone": mid, "why": NEEDS_ENV[mid][1]})
            continue
        plan = fit(prof, mid, size=(sizes or {}).get(mid))
        if plan.verdict == "no":
            skipped.append({"milestone": mid, "why": "; ".join(plan.reasons) or "does not fit"})
        else:
            todo.append((mid, plan))
    return todo, skipped


def run_one(mid: str, home: Path, builds: Path, timeout: float, size: str | None = None,
            kit: Kit | None = None, settings: list[str] | None = None) -> dict[str, Any]:
    env = {**os.environ, "TIERKIT_HOME": str(home), "PYTHONPATH": str(REPO)}
    t = time.perf_counter()
    proc, oom, late = (kit or Kit(None)).run(
        [sys.executable, "-m", "tiers.cli", "run", mid, "--out", str(builds), *(["--size", size] if size else []),
         *(settings or [])],
        capture_output=True, text=True, env=env, cwd=home, timeout=timeout)
    if proc is None:
        return {"milestone": mid, "error": late}
    wall = time.perf_counter() - t
    if oom:
        return {"milestone": mid, "error": "OOM-killed under the kit's memory limit", "oom_killed": True}
    if proc.returncode != 0:
        return {"milestone": mid, "error": (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]}
    folder = next(builds.glob(f"B{int(mid[1:]):02d}-*"))
    m = json.loads((folder / "metrics.json").read_text())
    pred, act = m["prediction"] or {}, m["actual"]
    row: dict[str, Any] = {
        "milestone": mid, "size": m["plan"]["size"], "device": m["plan"]["device"],
        "predicted_peak_bytes": pred.get("peak_bytes"), "actual_peak_bytes": act["peak_bytes"],
        "rss_baseline_bytes": act["rss_baseline_bytes"], "rss_increase_bytes": act["rss_increase_bytes"],
        "predicted_seconds": pred.get("seconds"), "actual_seconds": act["seconds"],
        "process_wall_seconds": round(wall, 3), "basis": pred.get("basis", []),
        **({"settings": settings[1::2]} if settings else {}),
    }
    row["memory_ratio"] = _ratio(row["actual_peak_bytes"], row["predicted_peak_bytes"])
    row["time_ratio"] = _ratio(row["actual_seconds"], row["predicted_seconds"])
    row["memory_ok"] = _within(row["memory_ratio"], MEMORY_TARGET)
    row["time_ok"] = _within(row["time_ratio"], TIME_TARGET)
    return row


def _ratio(actual: float | None, predicted: float | None) -> float | None:
    return round(actual / predicted, 3) if actual and predicted else None


def _within(r: float | None, target: tuple[float, float]) -> bool:
    return r is not None and target[0] <= r <= target[1]


def print_table(rows: list[dict[str, Any]], skipped: list[dict[str, Any]], origin: str) -> None:
    from rich.console import Console
    from rich.table import Table

    mb = lambda b: "?" if b is None else f"{b / 2**20:.0f} MiB"
    s = lambda x: "?" if x is None else f"{x:.2f} s"
    mark = lambda ok: "[green]PASS[/]" if ok else "[red]MISS[/]"
    t = Table(title=f"planner vs actual ({origin}); targets: memory x{MEMORY_TARGET[0]}-{MEMORY_TARGET[1]}, "
                    f"time x{TIME_TARGET[0]}-{TIME_TARGET[1]}")
    for col in ("milestone", "size", "device", "mem predicted", "mem actual", "ratio", "",
                "time predicted", "time actual", "ratio", ""):
        t.add_column(col)
    for r in rows:
        if "error" in r:
            t.add_row(r["milestone"], "", "", f"[red]failed: {r['error']}[/]", *[""] * 7)
            continue
        t.add_row(r["milestone"], str(r["size"]) + "".join(f" {x}" for x in r.get("settings", [])), r["device"], mb(r["predicted_peak_bytes"]),
                  mb(r["actual_peak_bytes"]), f"{r['memory_ratio']}", mark(r["memory_ok"]),
                  s(r["predicted_seconds"]), s(r["actual_seconds"]), f"{r['time_ratio']}", mark(r["time_ok"]))
    con = Console(highlight=False)
    if not con.is_terminal:
        con = Console(highlight=False, width=160)  # a log file gets the whole table
    con.print(t)
    for r in rows:
        if "error" not in r:
            con.print(f"{r['milestone']}: RSS before the run {mb(r['rss_baseline_bytes'])}, "
                      f"increase {mb(r['rss_increase_bytes'])}")
    for sk in skipped:
        con.print(f"skipped {sk['milestone']}: {sk['why']}")


def refused_for_memory(prof: Any) -> list[tuple[float, str, str]]:
    """(predicted peak, milestone, size) for the rungs refused on memory alone that this host could hold."""
    from tiers.catalog import CatalogError, get
    from tiers.fit import fit
    from tiers.fit.artifacts import needs
    from tiers.runner import REGISTRY

    host = (prof.memory.host_total_bytes or prof.memory.total_bytes) if prof.memory else 0
    found = []
    for mid in REGISTRY:
        if mid in NEEDS_ENV:  # without the user's file it would run a stand-in, not the refused model
            continue
        try:
            ladder = get(mid).ladder
        except CatalogError:  # a milestone outside the default track
            continue
        for rung in ladder:
            plan = fit(prof, mid, size=rung.size, suggest=False)
            pred = plan.prediction
            if rung.model in ("b12", "b13") or any(not a.here for a in needs(rung)):
                continue   # it would stop at its missing model or data before allocating anything
            # well over the limit (no doubt it cannot fit), well under the host (the limit, not the host, kills it);
            # the time does not matter: the model and optimiser state are allocated in the first seconds
            if plan.verdict == "no" and pred and prof.memory and 1.25 * prof.memory.total_bytes < pred.peak_bytes \
                    < 0.6 * host and any("memory" in r for r in plan.reasons):
                found.append((pred.peak_bytes, mid, rung.size))
    return sorted(found)


# A forced rung only has to reach its first training step: the memory it is refused for is allocated
# there. These settings get it there at once (B12's first evaluation alone is 200 batches).
FIRST_STEP = {"B11": ["--set", "eval_iters=1", "--set", "steps=3"],
              "B12": ["--set", "eval_iters=1", "--set", "steps=3"]}


def forced_refusal(prof: Any, home: Path, kit: Kit, timeout: float) -> dict[str, Any]:
    """Run the cheapest memory-refused rung anyway under the kit's limit: it should be OOM-killed."""
    cands = refused_for_memory(prof)
    if not cands:
        return {"why": "no rung here is refused for memory alone and small enough for this host"}
    tried = []
    env = {**os.environ, "TIERKIT_HOME": str(home), "PYTHONPATH": str(REPO)}
    for peak, mid, size in cands[:4]:
        # as a user forces it: past the memory refusal (and the time box: the model and optimiser
        # state are allocated in the first seconds, so only the memory is under test)
        proc, oom, late = kit.run([sys.executable, "-m", "tiers.cli", "run", mid, "--size", size, "--force",
                                   "--force-memory", *FIRST_STEP.get(mid, []), "--profile", str(home / "profile.yaml"), "--out",
                                   str(home / "forced")], capture_output=True, text=True, env=env, cwd=home,
                                  timeout=timeout)
        row = {"milestone": mid, "size": size, "predicted_peak_bytes": peak, "oom_killed": oom,
               "exit": None if proc is None else proc.returncode,
               "error": late or ("" if proc is None or oom else (proc.stderr.strip().splitlines() or [""])[-1])}
        tried.append(row)
        if oom:
            break
    return {"tried": tried, "killed": any(r["oom_killed"] for r in tried)}


from inventory.files import atomic_write


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=REPO / "bench/results/fit_accuracy.json")
    ap.add_argument("--only", action="append", default=[], help="Run just these milestones (repeatable).")
    ap.add_argument("--size", action="append", default=[], metavar="B8=SIZE",
                    help="Run a milestone at this size of its ladder instead of the planned one (repeatable).")
    ap.add_argument("--set", action="append", default=[], metavar="B8:data=fashion-mnist", dest="settings",
                    help="Pass `--set KEY=VALUE` to one milestone's run: other data of the planned shape (repeatable).")
    ap.add_argument("--calibrated", action="store_true", help="Keep the profile's calibration records.")
    ap.add_argument("--timeout", type=float, default=600.0, help="Seconds allowed per milestone.")
    ap.add_argument("--kit", choices=sorted(KITS), help="Run as this emulated kit (probed under it first).")
    ap.add_argument("--no-converse", action="store_true", help="On a memory kit, skip the forced refused rung.")
    args = ap.parse_args()

    home = Path(tempfile.mkdtemp(prefix="tierkit-fit-accuracy-"))
    kit = Kit(args.kit)
    converse = None
    try:
        prof, origin = kit_profile(home, kit) if args.kit else live_profile(home, args.calibrated)
        sizes = {f"B{int(k.strip().upper().lstrip('B'))}": v.strip()
                 for k, _, v in (x.partition("=") for x in args.size)}
        settings: dict[str, list[str]] = {}
        for x in args.settings:
            mid, _, kv = x.partition(":")
            settings.setdefault(f"B{int(mid.strip().upper().lstrip('B'))}", []).extend(["--set", kv.strip()])
        todo, skipped = runnable(prof, sizes)
        if args.only:
            wanted = {f"B{int(m.upper().lstrip('B'))}" for m in args.only}
            todo = [(m, p) for m, p in todo if m in wanted]
        rows = []
        planned = (home / "profile.yaml").read_bytes()
        for mid, plan in todo:
            print(f"running {mid} at size {plan.size} on {plan.device} ...", file=sys.stderr)
            if not args.calibrated:   # each run is judged by the formulas, not by what the runs before it recorded
                (home / "profile.yaml").write_bytes(planned)
            rows.append(run_one(mid, home, home / "builds", args.timeout, sizes.get(mid), kit, settings.get(mid, [])))
        print_table(rows, skipped, origin)
        if "memory" in kit.spec and not args.no_converse:
            converse = forced_refusal(prof, home, kit, args.timeout)
            print(f"converse: {converse}")
        print(f"OOM kills among the runs the planner approved: {sum(bool(r.get('oom_killed')) for r in rows)}")
    finally:
        kit.close()
        shutil.rmtree(home, ignore_errors=True)

    ok = [r for r in rows if "error" not in r]
    doc = {
        "when": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "profile": prof.name, "profile_origin": origin, "calibrated": args.calibrated, "kit": args.kit,
        "memory_total_bytes": prof.memory.total_bytes if prof.memory else None,
        "memory_limit_source": prof.memory.limit_source if prof.memory else None,
        "usable_cpus": prof.cpu.usable_cpus if prof.cpu else None,
        "oom_kills_approved": sum(bool(r.get("oom_killed")) for r in rows), "converse": converse,
        "cpu": prof.cpu.model if prof.cpu else None, "gpus": [g.model for g in prof.gpus],
        "targets": {"memory_ratio": MEMORY_TARGET, "time_ratio": TIME_TARGET},
        "rows": rows, "skipped": skipped,
        "all_pass": bool(ok) and len(ok) == len(rows) and all(r["memory_ok"] and r["time_ok"] for r in ok),
    }
    atomic_write(args.out, json.dumps(doc, indent=2) + "\n")
    print(f"results: {args.out}")


if __name__ == "__main__":
    main()

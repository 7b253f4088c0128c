"""How right is the planner? Predicted vs actual peak memory and wall time, per milestone.

Runs every milestone that is both implemented (`tiers.runner.REGISTRY`) and
planned to fit this machine (`tiers.fit.fit`), each at its planned size, each
as a user runs it (`tierkit run B<n>` in its own process, so the interpreter's
baseline memory is the real one). Targets: peak memory within +-25% of the
prediction, wall time within 0.5-2x. A new milestone joins by being registered;
nothing here changes. `--size B8=784-32-10-8k` runs a milestone at another
size of its ladder (a small one, where the planned size would take long or needs
data that is not here). Milestones that read data find it through the dataset
registry: set TIERKIT_DATA (e.g. to ../shared/data) before running this.
The torch milestones join the same way: B9 (`--size B9=mnist-xs-8k` with only
MNIST's test split here) and B12 (`--size B12=0.8M`, nanoGPT's CPU recipe).

The live profile is copied into a temporary TIERKIT_HOME (probed there first
when there is none), so this benchmark never adds calibration records to the
user's profile. Its own calibration records are stripped from the copy unless
--calibrated is given: by default the table measures the planner's formulas.

    python bench/fit_accuracy.py [--only B5] [--size B8=784-32-10-8k] [--out bench/results/fit_accuracy.json]
                                 [--calibrated]
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

MEMORY_TARGET = (0.75, 1.25)
TIME_TARGET = (0.5, 2.0)

# Milestones whose plan prices a file the user supplies: without it the run would time a different
# model from the one predicted, so it is skipped with the variable to set.
NEEDS_ENV = {
    "B16": ("TIERKIT_B16_GGUF", "its plan prices a downloaded GGUF (the size's model and quantisation); set "
                                "TIERKIT_B16_GGUF to that file, e.g. --size B16=tinyllama-1.1b-Q4_K_M with a TinyLlama "
                                "Q4_K_M .gguf"),
}


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


def run_one(mid: str, home: Path, builds: Path, timeout: float, size: str | None = None) -> dict[str, Any]:
    env = {**os.environ, "TIERKIT_HOME": str(home), "PYTHONPATH": str(REPO)}
    t = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, "-m", "tiers.cli", "run", mid, "--out", str(builds),
                               *(["--size", size] if size else [])],
                              check=False, capture_output=True, text=True, env=env, cwd=home,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"milestone": mid, "error": f"still running after {timeout:.0f} s (--timeout)"}
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        return {"milestone": mid, "error": (proc.stderr.strip().splitlines() or ["?"])[-1]}
    folder = next(builds.glob(f"B{int(mid[1:]):02d}-*"))
    m = json.loads((folder / "metrics.json").read_text())
    pred, act = m["prediction"] or {}, m["actual"]
    row: dict[str, Any] = {
        "milestone": mid, "size": m["plan"]["size"], "device": m["plan"]["device"],
        "predicted_peak_bytes": pred.get("peak_bytes"), "actual_peak_bytes": act["peak_bytes"],
        "rss_baseline_bytes": act["rss_baseline_bytes"], "rss_increase_bytes": act["rss_increase_bytes"],
        "predicted_seconds": pred.get("seconds"), "actual_seconds": act["seconds"],
        "process_wall_seconds": round(wall, 3), "basis": pred.get("basis", []),
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
        t.add_row(r["milestone"], str(r["size"]), r["device"], mb(r["predicted_peak_bytes"]),
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


from inventory.files import atomic_write  # noqa: E402  (after the sys.path set-up)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=REPO / "bench/results/fit_accuracy.json")
    ap.add_argument("--only", action="append", default=[], help="Run just these milestones (repeatable).")
    ap.add_argument("--size", action="append", default=[], metavar="B8=SIZE",
                    help="Run a milestone at this size of its ladder instead of the planned one (repeatable).")
    ap.add_argument("--calibrated", action="store_true", help="Keep the profile's calibration records.")
    ap.add_argument("--timeout", type=float, default=600.0, help="Seconds allowed per milestone.")
    args = ap.parse_args()

    home = Path(tempfile.mkdtemp(prefix="tierkit-fit-accuracy-"))
    try:
        prof, origin = live_profile(home, args.calibrated)
        sizes = {f"B{int(k.strip().upper().lstrip('B'))}": v.strip()
                 for k, _, v in (x.partition("=") for x in args.size)}
        todo, skipped = runnable(prof, sizes)
        if args.only:
            wanted = {f"B{int(m.upper().lstrip('B'))}" for m in args.only}
            todo = [(m, p) for m, p in todo if m in wanted]
        rows = []
        for mid, plan in todo:
            print(f"running {mid} at size {plan.size} on {plan.device} ...", file=sys.stderr)
            rows.append(run_one(mid, home, home / "builds", args.timeout, sizes.get(mid)))
        print_table(rows, skipped, origin)
    finally:
        shutil.rmtree(home, ignore_errors=True)

    ok = [r for r in rows if "error" not in r]
    doc = {
        "when": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "profile": prof.name, "profile_origin": origin, "calibrated": args.calibrated,
        "cpu": prof.cpu.model if prof.cpu else None, "gpus": [g.model for g in prof.gpus],
        "targets": {"memory_ratio": MEMORY_TARGET, "time_ratio": TIME_TARGET},
        "rows": rows, "skipped": skipped,
        "all_pass": bool(ok) and len(ok) == len(rows) and all(r["memory_ok"] and r["time_ok"] for r in ok),
    }
    atomic_write(args.out, json.dumps(doc, indent=2) + "\n")
    print(f"results: {args.out}")


if __name__ == "__main__":
    main()

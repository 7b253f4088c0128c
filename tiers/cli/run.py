"""`tierkit run`: one milestone at its planned size, predicted vs actual recorded."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from tiers.cli.common import Fail, app, console, load_profile


def _profile(arg: Optional[str], milestone: str):
    """(profile, the file to record calibration in or None) for `--profile FILE|NAME`.

    The user's own file (the probed one by default) gets calibration records; a
    reference kit from profiles/ is never modified. B0 may start with no profile:
    a quick probe without benchmarks plans it, and the run writes the real one.
    """
    from inventory.profile import default_path

    if arg is None:
        path = default_path()
        if not path.exists() and milestone == "B0":
            from inventory.probe import probe as quick_probe

            return quick_probe(bench=False, discover=False), path
        return load_profile(path), path
    from inventory.kits import resolve_profile
    from inventory.profile import ProfileError

    try:
        prof, is_reference = resolve_profile(arg)
    except ProfileError as exc:
        raise Fail(str(exc)) from None
    return prof, (None if is_reference else Path(arg).expanduser())


def _milestone_id(text: str) -> str:
    t = text.strip().upper().lstrip("B")
    if not t.isdigit():
        raise Fail(f"{text!r} is not a milestone; give one like B5 (see `tierkit fit`)")
    return f"B{int(t)}"


def _settings(items: list[str]) -> dict:
    """`--set KEY=VALUE` pairs -> {key: value}, each value read as YAML (numbers, booleans, lists)."""
    import yaml

    out = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq or not key.strip().isidentifier():
            raise Fail(f"--set {item!r}: give KEY=VALUE, e.g. --set lr=3e-4")
        try:
            out[key.strip()] = yaml.safe_load(value) if value.strip() else None
        except yaml.YAMLError:
            raise Fail(f"--set {item!r}: the value is not valid YAML; quote strings, e.g. --set prompt='ROMEO:'") from None
    return out


@app.command("run")
def run_milestone(
    milestone: str = typer.Argument(..., help="The milestone: B0, B5, ..."),
    size: Optional[str] = typer.Option(None, "--size", help="A size from the milestone's ladder (default: the largest that fits)."),
    tier: Optional[int] = typer.Option(None, "--tier", min=0, max=3, help="Run on this tier (default: the planner's choice)."),
    out: Path = typer.Option(Path("builds"), "--out", help="Where the build folder B<nn>-<slug>/ goes."),
    profile: Optional[str] = typer.Option(None, "--profile", help="Profile FILE or reference kit NAME (default: the probed one)."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted run from its checkpoint (milestones that train: B12)."),
    settings: list[str] = typer.Option([], "--set", help="Override one setting of the sized config, KEY=VALUE (repeatable; VALUE is YAML: 3e-4, true, [1, 2])."),
    fetch: bool = typer.Option(False, "--fetch", help="Download the models and data sets this size needs that are not here yet (as `tierkit data fetch`), then run."),
    force: bool = typer.Option(False, "--force", help="Run a size the planner refuses for time (or a latency/speed limit), after showing its prediction."),
    force_memory: bool = typer.Option(False, "--force-memory", help="With --force: also a size refused for memory (it may be killed for want of it)."),
) -> None:
    """Run one milestone at its planned size; write builds/B<nn>-<slug>/ with predicted vs actual.

    A size needs its models and data sets here (`tierkit fit` lists them): without --fetch a missing
    one stops the run before it starts, naming the `tierkit data fetch` that brings it."""
    from tiers import runner
    from tiers.cli.common import fetch_with_progress

    mid = _milestone_id(milestone)
    overrides = _settings(settings)
    prof, prof_path = _profile(profile, mid)
    if overrides.get("peers") == "local":  # B17 for learning: a second node of its own on loopback
        from tiers.fit.targets import with_loopback_node

        prof = with_loopback_node(prof)
    if force_memory and not force:
        raise Fail("--force-memory goes with --force: add --force to run a size refused for memory")
    plan = _judged(prof, mid, size, tier, overrides, force, force_memory)
    if resume:
        plan.config["resume"] = True
        plan.config["resume_given"] = sorted(overrides)   # the settings the user gives; the rest: the checkpoint's
    err = console(stderr=True)
    try:
        if fetch:  # before the run's own progress display: the downloads draw theirs
            runner.prepare(plan, out, overrides, fetch=fetch_with_progress)
        if err.is_terminal:
            from rich import progress as rp

            with rp.Progress(rp.SpinnerColumn(), rp.TextColumn("{task.description}"), rp.BarColumn(),
                             rp.MofNCompleteColumn(), rp.TimeElapsedColumn(), console=err, transient=True) as bar:
                result = runner.run(plan, prof, out, bar, profile_path=prof_path, overrides=overrides)
        else:
            result = runner.run(plan, prof, out, profile_path=prof_path, overrides=overrides)
    except runner.RunError as exc:
        raise Fail(str(exc), exc.code) from None
    _print_result(result, prof_path)


_TIME = frozenset({"time", "limit"})            # what --force waives
_MEMORY = _TIME | {"pool", "memory"}            # and --force --force-memory


def _judged(prof, mid: str, size: Optional[str], tier: Optional[int], overrides: dict, force: bool,
            force_memory: bool):
    """The plan to run, priced with the --set overrides; forced past time (and memory) when asked.

        plan = fit(..., overrides)              refused?  --force waives time and limits,
        forced: the prediction goes to stderr   --force-memory memory too; without them the
        first, then the run                     refusal names the flag that would run it
    """
    from tiers.fit import FitError, fit

    def judge(waive=frozenset()):
        # packages are judged on this machine, where the run happens, whatever the profile
        return fit(prof, mid, size=size, tier=tier, check_packages=True, overrides=overrides, waive=waive,
                   suggest=not waive)

    try:
        plan = judge()
        if plan.verdict != "no":
            return plan
        forced = judge(_MEMORY if force_memory else _TIME) if force else None
        if forced is None or forced.verdict == "no":
            hint = ""
            if not force and (past_time := judge(_TIME)).verdict != "no":
                hint = f"; --force runs it anyway (predicted {_predicted(past_time)})"
            elif not force_memory and judge(_MEMORY).verdict != "no":
                hint = "; --force --force-memory runs it anyway (it may be killed for want of memory)"
            why = "; ".join(plan.reasons) or "the planner found no size that fits"
            raise Fail(f"{mid} does not fit this profile ({plan.profile or 'unnamed'}): {why}{hint}")
    except FitError as exc:
        raise Fail(str(exc)) from None
    console(stderr=True).print(f"forced: {mid} size {forced.size} on {forced.device}, predicted "
                               f"{_predicted(forced)}; " + "; ".join(r for r in forced.reasons if "forced" in r),
                               markup=False, highlight=False)
    return forced


def _predicted(plan) -> str:
    from inventory.units import fmt_bytes
    from tiers.fit import fmt_seconds

    pred = plan.prediction
    return "?" if pred is None else f"{fmt_bytes(pred.peak_bytes)} peak, {fmt_seconds(pred.seconds)}"


def _print_result(result, prof_path: Optional[Path]) -> None:
    from rich.table import Table

    from inventory.units import fmt_bytes
    from tiers.runner import secs

    plan, pred = result.plan, result.plan.prediction
    con = console()
    ran = ", ".join(n for n in (plan.config.get("model"), plan.config.get("dataset")) if n)
    table = Table(title=f"{plan.milestone} {plan.title}: size {plan.size}" + (f" ({ran})" if ran else "")
                  + f" on {plan.device}")
    for col in ("", "predicted", "actual", "actual / predicted"):
        table.add_column(col)
    if pred is not None:
        table.add_row("peak memory", fmt_bytes(pred.peak_bytes, binary=True),
                      fmt_bytes(result.actual_peak_bytes, binary=True),
                      f"{result.actual_peak_bytes / pred.peak_bytes:.2f}" if pred.peak_bytes else "?")
        table.add_row("wall time", secs(pred.seconds), secs(result.actual_seconds),
                      f"{result.actual_seconds / pred.seconds:.2f}" if pred.seconds else "?")
    con.print(table)
    if result.summary:          # markdown, as in the build's README: rendered, never shown as **asterisks**
        from rich.markdown import Markdown

        con.print(Markdown(result.summary))
    con.print(f"build: {result.out_dir}/README.md"
              + (f"\ncalibration recorded in {result.calibrated_in}" if result.calibrated_in else
                 f"\nno calibration recorded: {result.not_calibrated or 'not the planned workload'}"))

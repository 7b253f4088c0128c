"""The `tierkit` command: thin glue over plain functions (probe, profile IO, agent).

Heavy frameworks are imported inside the commands that need them, so `probe`
and `fit` start fast on the base install.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Optional

import typer

from inventory.detect import MDNS_WAIT

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Probe your kit, see which build-track milestones fit it, run them on the right tier.")
profile_app = typer.Typer(no_args_is_help=True, help="Read, check and describe hardware profiles.")
app.add_typer(profile_app, name="profile")


class Fail(Exception):
    """One line for the user, and an exit code: raised by commands, printed by main()."""

    def __init__(self, message: str, code: int = 2):
        super().__init__(message)
        self.code = code


def _console(stderr: bool = False):
    from rich.console import Console

    return Console(stderr=stderr, highlight=False)


@app.command()
def probe(
    bench: bool = typer.Option(True, "--bench/--no-bench", help="Measure FLOP/s and bandwidth (about 5 s)."),
    as_json: bool = typer.Option(False, "--json", help="Print the profile as JSON on stdout, nothing else."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Where to write the profile [default: ~/.config/tierkit/profile.yaml or $TIERKIT_HOME]."),
    peer: list[str] = typer.Option([], "--peer", help="A peer's agent as HOST:PORT (repeatable), besides mDNS discovery."),
    mdns_wait: float = typer.Option(MDNS_WAIT, "--mdns-wait", min=0.0, max=30.0, help="Seconds to listen for agents over mDNS."),
    discover: bool = typer.Option(True, "--discover/--no-discover", help="Look for peers over mDNS."),
    builds: Path = typer.Option(Path("builds"), "--builds", help="Where the B0 inventory report goes."),
    report: bool = typer.Option(True, "--report/--no-report", help="Write builds/B00-inventory/README.md."),
) -> None:
    """Inventory this machine and its kit; write the hardware profile."""
    from inventory.detect import peers as peers_mod

    # Start listening for agents first: the mDNS window overlaps the imports below.
    early = {"peers": peers_mod.start(peer, mdns_wait if discover else 0.0)} if discover or peer else {}
    from inventory import probe as probe_mod
    from inventory.profile import default_path, save

    err = _console(stderr=True)
    target = out or default_path()
    quiet = as_json or not err.is_terminal
    with err.status("probing...", spinner="dots") if not quiet else _null():
        def done(name, status):
            if not quiet:
                err.log(f"{name}: {status.status} in {status.seconds:.2f} s" + (f" ({status.reason})" if status.reason and status.status != "ok" else ""))
        prof = probe_mod.probe(bench=bench, peers=peer, mdns_wait=mdns_wait, discover=discover,
                               detectors=early, on_done=done)
    try:
        save(prof, target)
        if report:
            from inventory.report import write_b0
            readme = write_b0(prof, builds)
    except OSError as exc:
        raise Fail(f"cannot write {exc.filename or target}: {exc.strerror}; pass --out/--builds to a writable place") from None
    if as_json:
        print(json.dumps(prof.to_dict(), indent=2))
        return
    from rich.table import Table

    from inventory.report import tier_lines

    con = _console()
    table = Table(title=f"{prof.name}: what each tier can use", show_lines=False)
    table.add_column("tier")
    table.add_column("")
    table.add_column("on this kit", overflow="fold")
    for row in tier_lines(prof):
        table.add_row(*row)
    con.print(table)
    empty = {k: s for k, s in prof.probe.detectors.items() if s.status in ("error", "timeout")}
    for k, s in empty.items():
        con.print(f"[yellow]{k}: {s.status}[/]: {s.reason}")
    con.print(f"profile: {target}" + (f"\ninventory: {readme}" if report else "")
              + f"\nprobed in {prof.probe.seconds:.2f} s")


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def load_profile(path: Optional[Path]):
    """A profile file, or the one `tierkit probe` wrote; a one-line Fail otherwise."""
    from inventory.profile import ProfileError, default_path, load

    try:
        return load(path or default_path())
    except ProfileError as exc:
        raise Fail(str(exc)) from None


@profile_app.command("validate")
def profile_validate(file: Path = typer.Argument(..., help="A profile YAML file.")) -> None:
    """Check a profile file against the schema; one line either way."""
    p = load_profile(file)
    parts = [f"cpu {p.cpu.model}" if p.cpu else "no cpu", f"{len(p.gpus)} GPU(s)", f"{len(p.boards)} board(s)",
             f"{len(p.peers)} peer(s)"]
    print(f"{file}: valid {p.schema_} ({', '.join(parts)})")


@profile_app.command("schema")
def profile_schema() -> None:
    """Print the profile's JSON Schema."""
    from inventory.profile import json_schema

    print(json_schema())


@profile_app.command("show")
def profile_show(file: Optional[Path] = typer.Argument(None, help="Profile file [default: the probed one].")) -> None:
    """Print a profile as YAML."""
    from inventory.profile import dumps

    print(dumps(load_profile(file)), end="")


@app.command()
def agent(
    host: str = typer.Option("0.0.0.0", "--host", help="Address to bind and advertise (0.0.0.0: every interface)."),
    port: int = typer.Option(8477, "--port", min=1, max=65535),
    name: Optional[str] = typer.Option(None, "--name", help="Name to advertise [default: host name]."),
    profile: Optional[Path] = typer.Option(None, "--profile", help="Profile to serve [default: the probed one, else a quick probe]."),
    verbose: bool = typer.Option(False, "--verbose", help="Log each request to stderr."),
) -> None:
    """Run on every machine: advertise over mDNS, serve this profile and a bandwidth endpoint."""
    from inventory import agent as agent_mod
    from inventory.profile import default_path

    if profile is not None or default_path().exists():
        prof = load_profile(profile)
    else:
        from inventory.probe import probe as run_probe

        prof = run_probe(bench=False, discover=False)
    try:
        agent_mod.serve(host, port, prof, name, verbose=verbose)
    except agent_mod.AgentError as exc:
        raise Fail(str(exc), 1) from None


# --- fit command (P2) ---


# --- run command (P2) ---


def _run_profile(arg: Optional[str], milestone: str):
    """(profile, the file to record calibration in or None) for `--profile FILE|NAME`.

    The user's own file (the probed one by default) gets calibration records; a
    reference kit from profiles/ is never modified. B0 may start with no profile:
    a quick probe without benchmarks plans it, and the run writes the real one.
    """
    from inventory.profile import default_path

    kits = Path(__file__).resolve().parent.parent / "profiles"
    if arg is None:
        path = default_path()
        if not path.exists() and milestone == "B0":
            from inventory.probe import probe as quick_probe

            return quick_probe(bench=False, discover=False), path
        return load_profile(path), path
    file = Path(arg).expanduser()
    if not file.is_file() and (kits / f"{arg}.yaml").is_file():
        file = kits / f"{arg}.yaml"
    elif not file.is_file():
        names = ", ".join(sorted(p.stem for p in kits.glob("*.yaml")))
        raise Fail(f"--profile {arg}: no such file or reference kit; kits: {names}")
    prof = load_profile(file)
    return prof, (None if file.resolve().parent == kits else file)


def _run_milestone_id(text: str) -> str:
    t = text.strip().upper().lstrip("B")
    if not t.isdigit():
        raise Fail(f"{text!r} is not a milestone; give one like B5 (see `tierkit fit`)")
    return f"B{int(t)}"


@app.command("run")
def run_milestone(
    milestone: str = typer.Argument(..., help="The milestone: B0, B5, ..."),
    size: Optional[str] = typer.Option(None, "--size", help="A size from the milestone's ladder (default: the largest that fits)."),
    tier: Optional[int] = typer.Option(None, "--tier", min=0, max=3, help="Run on this tier (default: the planner's choice)."),
    out: Path = typer.Option(Path("builds"), "--out", help="Where the build folder B<nn>-<slug>/ goes."),
    profile: Optional[str] = typer.Option(None, "--profile", help="Profile FILE or reference kit NAME (default: the probed one)."),
) -> None:
    """Run one milestone at its planned size; write builds/B<nn>-<slug>/ with predicted vs actual."""
    from tiers import runner

    mid = _run_milestone_id(milestone)
    prof, prof_path = _run_profile(profile, mid)
    try:
        from tiers.fit import fit
    except ImportError:
        raise Fail("the planner (tiers/fit.py) is not installed; update tierkit") from None
    try:
        plan = fit(prof, mid, size=size, tier=tier)
    except Exception as exc:  # the planner's own errors are one line already
        raise Fail(str(exc).splitlines()[0] if str(exc) else type(exc).__name__) from None
    err = _console(stderr=True)
    try:
        if err.is_terminal:
            from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

            with Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                          TextColumn("{task.completed:.0f}/{task.total:.0f}"), TimeElapsedColumn(),
                          console=err, transient=True) as bar:
                result = runner.run(plan, prof, out, bar, profile_path=prof_path)
        else:
            result = runner.run(plan, prof, out, profile_path=prof_path)
    except runner.RunError as exc:
        raise Fail(str(exc), exc.code) from None
    _print_run_result(result, prof_path)


def _print_run_result(result, prof_path: Optional[Path]) -> None:
    from rich.table import Table

    from tiers.runner import mib, secs

    plan, pred = result.plan, result.plan.prediction
    con = _console()
    table = Table(title=f"{plan.milestone} {plan.title}: size {plan.size} on {plan.device}")
    for col in ("", "predicted", "actual", "actual / predicted"):
        table.add_column(col)
    if pred is not None:
        table.add_row("peak memory", mib(pred.peak_bytes), mib(result.actual_peak_bytes),
                      f"{result.actual_peak_bytes / pred.peak_bytes:.2f}" if pred.peak_bytes else "?")
        table.add_row("wall time", secs(pred.seconds), secs(result.actual_seconds),
                      f"{result.actual_seconds / pred.seconds:.2f}" if pred.seconds else "?")
    con.print(table)
    if result.summary:
        con.print(result.summary)
    con.print(f"build: {result.out_dir}/README.md"
              + (f"\ncalibration recorded in {prof_path}" if prof_path else "\nreference kit: calibration not recorded"))


def main() -> None:
    try:
        app()
    except Fail as exc:
        print(f"tierkit: {exc}", file=sys.stderr)
        sys.exit(exc.code)
    except KeyboardInterrupt:
        print("tierkit: interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as exc:  # last resort: one line, not a traceback
        if os.environ.get("TIERKIT_DEBUG"):
            raise
        print(f"tierkit: internal error: {type(exc).__name__}: {exc} (set TIERKIT_DEBUG=1 for the traceback)",
              file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()

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

_FIT_MARK = {"fits": "[green]✓[/]", "tight": "[yellow]~[/]", "no": "[red]✗[/]"}


def _fit_profile(arg: Optional[str]):
    """(profile, label, live) for `--profile FILE|NAME`, or the probed profile.

    live: the profile describes this machine (the probed one, or a file probed
    here), so the milestones' packages are judged by what is installed here; a
    reference kit's never are.
    """
    import socket

    from inventory.profile import ProfileError, default_path
    from tiers.fit import reference_names, resolve_profile

    if arg is None:
        path = default_path()
        if not path.exists():
            raise Fail(f"no probed profile at {path}: run `tierkit probe` first, or pass --profile NAME "
                       f"(one of: {', '.join(reference_names())})")
        prof = load_profile(path)
        return prof, prof.name or str(path), True
    try:
        prof, is_reference = resolve_profile(arg)
    except ProfileError as exc:
        raise Fail(str(exc)) from None
    live = not is_reference and prof.host is not None and prof.host.hostname == socket.gethostname()
    return prof, prof.name or arg, live


def _fit_console():
    from rich.console import Console

    con = Console(highlight=False)
    if not con.is_terminal:  # piped: wide enough that the table does not fold every cell
        con = Console(highlight=False, width=200)
    return con


def _fit_memory(plan) -> str:
    from models.costs import fmt_bytes

    c, pred = plan.config, plan.prediction
    if "sram_bytes" in c:
        return f"SRAM {fmt_bytes(c['sram_bytes'])}, flash {fmt_bytes(c['flash_bytes'])}"
    if "node_bytes" in c:
        return " + ".join(fmt_bytes(b) for b in c["node_bytes"])
    return "" if pred is None else fmt_bytes(pred.peak_bytes) if plan.size else f"[dim]{fmt_bytes(pred.peak_bytes)}[/]"


def _fit_table(plans, title: str):
    from rich.markup import escape
    from rich.table import Table

    from tiers.fit import fmt_seconds

    table = Table(title=title, show_lines=True)
    for col, kw in (("milestone", {"max_width": 34}), ("fits", {"justify": "center"}), ("tier / device", {}),
                    ("sized config", {"max_width": 48}), ("peak memory", {"justify": "right"}),
                    ("time", {"justify": "right"}), ("why not / notes", {"overflow": "fold"})):
        table.add_column(col, **kw)
    for p in plans:
        pred = p.prediction
        size = f"[b]{escape(p.size)}[/]: {escape(str(p.config.get('summary', '')))}" if p.size else "[dim]-[/]"
        time = "" if pred is None else fmt_seconds(pred.seconds) if p.size else f"[dim]{fmt_seconds(pred.seconds)}[/]"
        table.add_row(f"{p.milestone} {escape(p.title)}", _FIT_MARK[p.verdict] + ("" if p.verdict != "tight" else " tight"),
                      f"{p.tier} {escape(p.device)}", size, _fit_memory(p), time, escape("; ".join(p.reasons)))
    return table


def _fit_explain(con, plans) -> None:
    from rich.markup import escape

    for p in plans:
        what = f"size {p.size}" if p.size else "nothing fits"
        con.print(f"\n[b]{p.milestone} {escape(p.title)}[/]: {p.verdict}, {escape(what)} on {escape(p.device)}"
                  + (f" ({escape(p.profile)})" if p.profile else ""))
        for line in (p.prediction.basis if p.prediction else []):
            con.print(f"  {escape(line)}")
        for r in p.reasons:
            con.print(f"  [yellow]->[/] {escape(r)}")


@app.command("fit")
def fit_cmd(
    profile: Optional[str] = typer.Option(None, "--profile", help="Profile FILE, or a reference kit NAME from profiles/ [default: the probed one]."),
    all_profiles: bool = typer.Option(False, "--all-profiles", help="A matrix: every milestone on every reference kit."),
    track: str = typer.Option("build", "--track", help="build | g2c | mentor100m."),
    milestone: Optional[str] = typer.Option(None, "--milestone", "-m", help="Only this milestone, e.g. B12."),
    as_json: bool = typer.Option(False, "--json", help="Print the plans as JSON on stdout, nothing else."),
    explain: bool = typer.Option(False, "--explain", help="Show each plan's basis: the arithmetic behind every number."),
) -> None:
    """Which milestones fit this hardware, at what size, and how long they take."""
    from tiers import catalog
    from tiers.fit import FitError, fit, reference_names, reference_profile

    try:
        milestones = catalog.track(track)
        if milestone:
            milestones = [catalog.get(milestone, track)]
    except catalog.CatalogError as exc:
        raise Fail(str(exc)) from None
    if all_profiles and profile:
        raise Fail("--all-profiles plans every reference kit: leave out --profile")
    try:
        if all_profiles:
            names = reference_names()
            grid = {n: [fit(reference_profile(n), m, check_packages=False) for m in milestones] for n in names}
        else:
            prof, label, live = _fit_profile(profile)
            plans = [fit(prof, m, check_packages=live) for m in milestones]
    except FitError as exc:
        raise Fail(str(exc)) from None

    if as_json:
        doc = ({"track": track, "profiles": {n: [p.to_dict() for p in ps] for n, ps in grid.items()}}
               if all_profiles else {"track": track, "profile": label, "plans": [p.to_dict() for p in plans]})
        print(json.dumps(doc, indent=2, default=str))
        return
    con = _fit_console()
    if not all_profiles:
        con.print(_fit_table(plans, f"{label}: {catalog.load().track(track).title}"))
        if explain:
            _fit_explain(con, plans)
        return
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=f"{catalog.load().track(track).title}, on every reference kit "
                        "(✓ fits, ~ tight, ✗ no; with the size)", show_lines=True)
    table.add_column("milestone", max_width=28)
    for n in names:
        table.add_column(n, overflow="fold", max_width=16)
    for i, m in enumerate(milestones):
        cells = []
        for n in names:
            p = grid[n][i]
            cells.append(_FIT_MARK[p.verdict] + (f" {escape(p.size)}" if p.size else ""))
        table.add_row(f"{m.id} {escape(m.title)}", *cells)
    con.print(table)
    if explain:
        for n in names:
            con.print(f"\n[b u]{n}[/]")
            _fit_explain(con, grid[n])



# --- run command (P2) ---


def _run_profile(arg: Optional[str], milestone: str):
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
    from inventory.profile import ProfileError
    from tiers.fit import resolve_profile

    try:
        prof, is_reference = resolve_profile(arg)
    except ProfileError as exc:
        raise Fail(str(exc)) from None
    return prof, (None if is_reference else Path(arg).expanduser())


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
    from tiers.fit import FitError, fit

    mid = _run_milestone_id(milestone)
    prof, prof_path = _run_profile(profile, mid)
    try:  # packages are judged on this machine, where the run happens, whatever the profile
        plan = fit(prof, mid, size=size, tier=tier, check_packages=True)
    except FitError as exc:
        raise Fail(str(exc)) from None
    err = _console(stderr=True)
    try:
        if err.is_terminal:
            from rich import progress as rp

            with rp.Progress(rp.SpinnerColumn(), rp.TextColumn("{task.description}"), rp.BarColumn(),
                             rp.MofNCompleteColumn(), rp.TimeElapsedColumn(), console=err, transient=True) as bar:
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

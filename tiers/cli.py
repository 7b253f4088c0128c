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

from inventory.profile import ProfileError

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
    mdns_wait: float = typer.Option(0.25, "--mdns-wait", min=0.0, max=30.0, help="Seconds to listen for agents over mDNS."),
    discover: bool = typer.Option(True, "--discover/--no-discover", help="Look for peers over mDNS."),
    builds: Path = typer.Option(Path("builds"), "--builds", help="Where the B0 inventory report goes."),
    report: bool = typer.Option(True, "--report/--no-report", help="Write builds/B00-inventory/README.md."),
) -> None:
    """Inventory this machine and its kit; write the hardware profile."""
    from inventory import probe as probe_mod
    from inventory.profile import default_path, save

    err = _console(stderr=True)
    target = out or default_path()
    quiet = as_json or not err.is_terminal
    with err.status("probing...", spinner="dots") if not quiet else _null():
        def done(name, status):
            if not quiet:
                err.log(f"{name}: {status.status} in {status.seconds:.2f} s" + (f" ({status.reason})" if status.reason and status.status != "ok" else ""))
        prof = probe_mod.probe(bench=bench, peers=peer, mdns_wait=mdns_wait, discover=discover, on_done=done)
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
    from inventory.profile import default_path, load

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

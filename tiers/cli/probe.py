"""`tierkit probe` and `tierkit profile`: inventory this kit, read and check hardware profiles."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from inventory.detect import MDNS_WAIT
from tiers.cli.common import Fail, app, console, load_profile, null

profile_app = typer.Typer(no_args_is_help=True, help="Read, check and describe hardware profiles.")
app.add_typer(profile_app, name="profile")


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
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log each probe as it finishes (on stderr)."),
) -> None:
    """Inventory this machine and its kit; write the hardware profile."""
    from inventory.detect import peers as peers_mod

    # Start listening for agents first: the mDNS window overlaps the imports below.
    early = {"peers": peers_mod.start(peer, mdns_wait if discover else 0.0)} if discover or peer else {}
    from inventory import probe as probe_mod
    from inventory.profile import default_path, save

    err = console(stderr=True)
    target = out or default_path()
    if target.is_dir():
        raise Fail(f"--out {target}: is a folder; pass --out a file path such as {target / 'profile.yaml'}")
    quiet = as_json or not err.is_terminal
    with err.status("probing...", spinner="dots") if not quiet else null():
        def done(name, status):
            if verbose and not as_json:
                err.print(f"{name}: {status.status} in {status.seconds:.2f} s" + (f" ({status.reason})" if status.reason and status.status != "ok" else ""))
        prof = probe_mod.probe(bench=bench, peers=peer, mdns_wait=mdns_wait, discover=discover,
                               detectors=early, on_done=done)
    for q in prof.peers:                # on stderr, even with --json: the cause, not "no peers"
        if q.problem:
            err.print(f"[yellow]warning:[/] peer {q.address}:{q.port}: {q.problem}", soft_wrap=True)
    probe_mod.keep_earlier(prof, target, measured=bench)  # calibration history; without --bench, the figures
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

    con = console()
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



@profile_app.command("validate")
def profile_validate(file: str = typer.Argument(..., help="A profile YAML file, or a reference kit's name.")) -> None:
    """Check a profile file against the schema; one line either way."""
    p = _file_or_kit(file)
    parts = [f"cpu {p.cpu.model}" if p.cpu else "no cpu", f"{len(p.gpus)} GPU(s)", f"{len(p.boards)} board(s)",
             f"{len(p.peers)} peer(s)"]
    print(f"{file}: valid {p.schema_} ({', '.join(parts)})")


@profile_app.command("schema")
def profile_schema() -> None:
    """Print the profile's JSON Schema."""
    from inventory.profile import json_schema

    print(json_schema())


@profile_app.command("show")
def profile_show(file: Optional[str] = typer.Argument(None, help="Profile file or reference kit name [default: the probed one].")) -> None:
    """Print a profile as YAML, its long strings folded to the terminal's width (the same YAML)."""
    import yaml

    prof = _file_or_kit(file) if file else load_profile(None)
    # the terminal's width, or COLUMNS (80 when piped without it); PyYAML breaks at the first space past
    # its width, so it is given some room
    width = max(console().width - 20, 40)
    print(yaml.safe_dump(prof.to_dict(), sort_keys=False, allow_unicode=True, width=width), end="")


def _file_or_kit(arg: str):
    """The profile in file `arg`, or the reference kit named `arg`; a one-line Fail otherwise."""
    from inventory.kits import resolve_profile
    from inventory.profile import ProfileError

    try:
        return resolve_profile(arg)[0]
    except ProfileError as exc:
        raise Fail(str(exc)) from None

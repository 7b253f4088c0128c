"""What every `tierkit` command shares: the app, the one-line failure, consoles, profile arguments."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Probe your kit, see which build-track milestones fit it, run them on the right tier.")


class Fail(Exception):
    """One line for the user, and an exit code: raised by commands, printed by main()."""

    def __init__(self, message: str, code: int = 2):
        super().__init__(message)
        self.code = code


def console(stderr: bool = False):
    from rich.console import Console

    return Console(stderr=stderr, highlight=False)


def wide_console():
    """A console for tables: the terminal's width, or COLUMNS when set; piped without it, 200."""
    import os

    from rich.console import Console

    con = Console(highlight=False)
    if not con.is_terminal and not os.environ.get("COLUMNS", "").strip().isdigit():
        con = Console(highlight=False, width=200)
    return con


class null:
    """A context that does nothing: stands in for a spinner or bar when output is not a terminal."""

    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def fetch_with_progress(name: str, to: Path | None = None, url: str | None = None) -> Path:
    """`tiers.data.fetch(name)`, with a download bar per file on stderr when it is a terminal."""
    from tiers import data

    err = console(stderr=True)
    if not err.is_terminal:
        return data.fetch(name, to, url)
    from rich import progress as rp

    with rp.Progress(rp.TextColumn("{task.description}"), rp.BarColumn(), rp.DownloadColumn(),
                     rp.TransferSpeedColumn(), rp.TimeRemainingColumn(), console=err, transient=True) as bar:
        tasks: dict[str, rp.TaskID] = {}

        def on_bytes(label: str, done: int, total: int | None) -> None:
            if label not in tasks:
                tasks[label] = bar.add_task(label, total=total)
            bar.update(tasks[label], completed=done, total=total)

        return data.fetch(name, to, url, on_bytes)


def load_profile(path: Optional[Path]):
    """A profile file, or the one `tierkit probe` wrote; a one-line Fail otherwise."""
    from inventory.profile import ProfileError, default_path, load

    try:
        return load(path or default_path())
    except ProfileError as exc:
        raise Fail(str(exc)) from None


def profile_arg(arg: Optional[str]):
    """(profile, label, live) for `--profile FILE|NAME`, or the probed profile.

    live: the profile describes this machine (the probed one, or a file probed
    here), so the milestones' packages are judged by what is installed here; a
    reference kit's never are.
    """
    import socket

    from inventory.kits import reference_names, resolve_profile
    from inventory.profile import ProfileError, default_path

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


def parse_budget(text: Optional[str]) -> Optional[int]:
    """`--memory-budget 8GiB` -> bytes; None when not given."""
    from inventory.units import parse_bytes

    try:
        return parse_bytes(text) if text is not None else None
    except ValueError:
        raise Fail(f"--memory-budget {text!r}: write a size such as 8GiB, 512MiB or a number of bytes") from None

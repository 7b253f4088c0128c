"""`tierkit data`: the dataset registry (list, fetch sha256-checked, path)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from tiers.cli.common import Fail, app, console, wide_console

data_app = typer.Typer(no_args_is_help=True, help="The dataset registry: list, fetch (sha256-checked), path.")
app.add_typer(data_app, name="data")


@data_app.command("list")
def data_list(path: Optional[Path] = typer.Option(None, "--path", help="Also look here first.")) -> None:
    """Every data set the registry knows: source, size, licence, checksum, and where it is here."""
    from rich.table import Table

    from inventory.units import fmt_bytes
    from tiers import data

    table = Table(title=f"data sets (fetch writes to {data.data_root()})", show_lines=True)
    for col in ("name", "what", "size", "licence", "checked by", "here"):
        table.add_column(col, overflow="fold")
    for ds in data.REGISTRY.values():
        where = data.locate(ds.name, path)
        some = [] if where or ds.extract else [p for f in ds.files if (p := data.find_file(ds.name, f.name, path))]
        here = str(where) if where else \
            f"[yellow]{len(some)} of {len(ds.files)} files[/] in {some[0].parent}" if some else "[dim]not here[/]"
        known = sum(f.size or 0 for f in ds.files)
        size = fmt_bytes(ds.size) if ds.size else f"{fmt_bytes(known)} + ?" if known else "?"
        table.add_row(ds.name, f"{ds.title}\n[dim]{ds.homepage}[/]", size, ds.licence, ds.checksum, here)
    wide_console().print(table)


@data_app.command("fetch")
def data_fetch(
    name: str = typer.Argument(..., help="A data set from `tierkit data list`."),
    url: Optional[str] = typer.Option(None, "--url", help="Fetch from this base URL instead (or $TIERKIT_DATA_URL): "
                                                          "each file from URL/<its local path>."),
    to: Optional[Path] = typer.Option(None, "--to", help="Write here [default: $TIERKIT_DATA or ~/.cache/tierkit]."),
) -> None:
    """Download a data set, verify its sha256, write it atomically (an interrupted download resumes)."""
    from tiers import data

    err = console(stderr=True)
    try:
        ds = data.get(name)
        if not err.is_terminal:
            out = data.fetch(ds.name, to, url)
        else:
            from rich import progress as rp

            with rp.Progress(rp.TextColumn("{task.description}"), rp.BarColumn(), rp.DownloadColumn(),
                             rp.TransferSpeedColumn(), rp.TimeRemainingColumn(), console=err, transient=True) as bar:
                tasks: dict[str, rp.TaskID] = {}

                def on_bytes(label: str, done: int, total: Optional[int]) -> None:
                    if label not in tasks:
                        tasks[label] = bar.add_task(label, total=total)
                    bar.update(tasks[label], completed=done, total=total)

                out = data.fetch(ds.name, to, url, on_bytes)
    except data.DataError as exc:
        raise Fail(str(exc)) from None
    print(f"{ds.name}: {out} ({ds.checksum} verified)")


@data_app.command("path")
def data_path(
    name: str = typer.Argument(..., help="A data set from `tierkit data list`."),
    path: Optional[Path] = typer.Option(None, "--path", help="Look here first."),
) -> None:
    """Print where a data set is; one line naming the fetch to run when it is not here."""
    from tiers import data

    try:
        print(data.require(name, path))
    except data.DataError as exc:
        raise Fail(str(exc)) from None

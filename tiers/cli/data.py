"""`tierkit data`: the registry of models and data sets (list, fetch sha256-checked, path)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from tiers.cli.common import Fail, app, fetch_with_progress, wide_console

data_app = typer.Typer(no_args_is_help=True, help="The registry of models and data sets: list, fetch "
                                                  "(sha256-checked), path.")
app.add_typer(data_app, name="data")


@data_app.command("list")
def data_list(path: Optional[Path] = typer.Option(None, "--path", help="Also look here first."),
              as_json: bool = typer.Option(False, "--json", help="One JSON array: every entry, its source, size, "
                                                                "licence, and where it is here."),
              wide: bool = typer.Option(False, "--wide", help="Also the source address and the checksum.")) -> None:
    """Every model and data set the registry knows: kind, source, size, licence, checksum, and where it is here."""
    from tiers import data

    if as_json:
        import json

        print(json.dumps([_row(e, path) for e in data.REGISTRY.values()], indent=1))
        return
    from rich import box
    from rich.table import Table

    table = Table(title=f"models and data sets (Hugging Face cache: {data.hub_cache()}; other data: "
                        f"{data.data_root()})", show_lines=True, box=box.SQUARE if wide else box.HORIZONTALS)
    # the name is what `data fetch` takes: never wrapped; the rest wraps, and --wide adds the long ones
    table.add_column("name", no_wrap=True)
    table.add_column("kind, size", no_wrap=True)
    table.add_column("what, licence", ratio=3, min_width=16)
    if wide:
        table.add_column("checked by", overflow="fold", ratio=2)
    table.add_column("here", overflow="fold", ratio=2, min_width=10)
    for e in data.REGISTRY.values():
        row = _row(e, path)
        source = f"{e.url}{' [yellow](gated)[/]' if e.gated else ''}" if isinstance(e, data.HubArtifact) \
            else e.homepage
        table.add_row(e.name, f"{e.kind}\n{_size(e)}", f"{e.title}\n[dim]{e.licence}[/]"
                      + (f"\n[dim]{source}[/]" if wide else ""), *((e.checksum,) if wide else ()),
                      row["path"] or _partly(e, path))
    wide_console().print(table)


def _row(e, path: Optional[Path]) -> dict:
    """One entry as plain data: what `data list --json` prints."""
    from tiers import data

    where = data.locate(e.name, path)
    row = {"name": e.name, "kind": e.kind, "title": e.title, "size": e.size, "licence": e.licence,
           "homepage": e.homepage, "here": where is not None, "path": str(where) if where else None,
           "checksum": e.checksum}
    if isinstance(e, data.HubArtifact):
        row["source"] = {"hub": e.repo_id, "repo_type": e.repo_type, "revision": e.revision, "files": list(e.files)}
        row["gated"] = e.gated
    else:
        row["source"] = {"urls": [f.urls[0] for f in e.files]}
    return row


def _size(e) -> str:
    from inventory.units import fmt_bytes

    if e.size:
        return fmt_bytes(e.size)
    known = sum(f.size or 0 for f in getattr(e, "files", ()) if not isinstance(f, str))
    return f"{fmt_bytes(known)} + ?" if known else "?"


def _partly(e, path: Optional[Path]) -> str:
    """For a data set not wholly here: how many of its files are (or "not here")."""
    from tiers import data

    if isinstance(e, data.HubArtifact) or e.extract:
        return "[dim]not here[/]"
    some = [p for f in e.files if (p := data.find_file(e.name, f.name, path))]
    return f"[yellow]{len(some)} of {len(e.files)} files[/] in {some[0].parent}" if some else "[dim]not here[/]"


@data_app.command("fetch")
def data_fetch(
    name: str = typer.Argument(..., help="A model or data set from `tierkit data list`."),
    url: Optional[str] = typer.Option(None, "--url", help="Fetch from this base URL instead (or $TIERKIT_DATA_URL): "
                                                          "each file from URL/<its local path>. Hugging Face "
                                                          "entries: set HF_ENDPOINT instead."),
    to: Optional[Path] = typer.Option(None, "--to", help="Write here [default: $TIERKIT_DATA or ~/.cache/tierkit]. "
                                                        "Hugging Face entries: set HF_HUB_CACHE instead."),
) -> None:
    """Download a model or data set, verify it, write it atomically (an interrupted download resumes).

    Hugging Face entries go into the Hugging Face cache through huggingface_hub (HF_TOKEN for gated
    models, HF_ENDPOINT, HF_HUB_OFFLINE and HF_HUB_CACHE are honoured); what is already there is not
    downloaded again."""
    from tiers import data

    try:
        e = data.get(name)
        if isinstance(e, data.HubArtifact) and (url or to):
            raise Fail(f"{e.name} comes from the Hugging Face hub ({e.repo_id}): --url and --to do not apply; set "
                       f"HF_ENDPOINT for another hub, HF_HUB_CACHE for another cache")
        out = fetch_with_progress(e.name, to, url)
    except data.DataError as exc:
        raise Fail(str(exc)) from None
    source = f"from {e.repo_id}, " if isinstance(e, data.HubArtifact) else ""
    print(f"{e.name}: {out} ({source}{e.checksum} verified)")


@data_app.command("path")
def data_path(
    name: str = typer.Argument(..., help="A model or data set from `tierkit data list`."),
    path: Optional[Path] = typer.Option(None, "--path", help="Look here first."),
) -> None:
    """Print where a model or data set is; one line naming the fetch to run when it is not here."""
    from tiers import data

    try:
        print(data.require(name, path))
    except data.DataError as exc:
        raise Fail(str(exc)) from None

"""`tierkit fit`: which milestones fit this hardware, at what size, and how long they take."""
from __future__ import annotations

import json
from typing import Optional

import typer

from tiers.cli.common import Fail, app, profile_arg, wide_console

_MARK = {"fits": "[green]✓[/]", "tight": "[yellow]~[/]", "no": "[red]✗[/]"}


def _memory(plan) -> str:
    from inventory.units import fmt_bytes

    c, pred = plan.config, plan.prediction
    if "sram_bytes" in c:
        return f"SRAM {fmt_bytes(c['sram_bytes'])}, flash {fmt_bytes(c['flash_bytes'])}"
    if "node_bytes" in c:
        return " + ".join(fmt_bytes(b) for b in c["node_bytes"])
    return "" if pred is None else fmt_bytes(pred.peak_bytes) if plan.size else f"[dim]{fmt_bytes(pred.peak_bytes)}[/]"


def _table(plans, title: str, wide: bool):
    """The plans as a table that fits the console.

    default: milestone | fits | size (device under it) | memory | time, then the notes
             below the table, one paragraph per milestone, wrapped at words
    --wide:  the sized config, the registry artifacts and the notes in the table's own columns
    """
    from rich import box
    from rich.markup import escape
    from rich.table import Table

    from tiers.fit import fmt_seconds
    from tiers.fit.artifacts import describe

    sizes = max((len(p.size or "-") for p in plans), default=4)
    table = Table(title=title, show_lines=wide, box=box.SQUARE if wide else box.SIMPLE_HEAD, pad_edge=wide)
    table.add_column("milestone", min_width=14, ratio=2)
    table.add_column("fits", no_wrap=True)
    table.add_column("size / device" if not wide else "tier / device", no_wrap=not wide,
                     min_width=None if wide else min(sizes, 22))
    if wide:
        table.add_column("sized config", min_width=24, ratio=3)
    table.add_column("memory", justify="right", no_wrap=True)
    table.add_column("time", justify="right", no_wrap=True)
    if wide:
        table.add_column("why not / notes", min_width=28, ratio=3)
    for p in plans:
        pred = p.prediction
        time = "" if pred is None else fmt_seconds(pred.seconds) if p.size else f"[dim]{fmt_seconds(pred.seconds)}[/]"
        row = [f"[b]{p.milestone}[/] {escape(p.title)}", _MARK[p.verdict] + ("" if p.verdict != "tight" else " tight")]
        if wide:
            size = f"[b]{escape(p.size)}[/]: {escape(str(p.config.get('summary', '')))}" if p.size else "[dim]-[/]"
            if p.artifacts:
                size += f"\n[dim]needs {escape(describe(p.artifacts))}[/]"
            row += [f"{p.tier} {escape(p.device)}", size, _memory(p), time, escape("; ".join(p.reasons))]
        else:
            where = f"{p.tier} {escape(p.device)}" if p.device != "-" else f"tier {p.tier}"
            row += [f"[b]{escape(p.size or '-')}[/]\n[dim]{where}[/]", _memory(p), time]
        table.add_row(*row)
    return table


def _matrix(con, title: str, milestones, names: list[str], grid: dict) -> None:
    """Every milestone on every kit, as many tables as the console's width needs.

        kits packed greedily, left to right: each table is the milestone ids and the
        kits that fit beside them whole (a kit's column is as wide as its name or its
        longest size, never cut: the names are what `--profile` and `--size` take)
    """
    from rich import box
    from rich.markup import escape
    from rich.table import Table

    ids = max(len(m.id) for m in milestones)
    need = {n: max(len(n), *(len(p.size or "") + 2 for p in grid[n])) for n in names}
    groups: list[list[str]] = [[]]
    for n in names:
        if groups[-1] and ids + 2 + sum(need[k] + 3 for k in [*groups[-1], n]) > con.width:
            groups.append([])
        groups[-1].append(n)
    for g, kits in enumerate(groups):
        table = Table(title=title if g == 0 else None, box=box.SIMPLE_HEAD, pad_edge=False)
        table.add_column("", no_wrap=True)
        for n in kits:
            table.add_column(n, no_wrap=True, min_width=need[n])
        for i, m in enumerate(milestones):
            table.add_row(f"[b]{m.id}[/]", *(_MARK[grid[n][i].verdict] + (f" {escape(grid[n][i].size)}"
                                                                           if grid[n][i].size else "")
                                             for n in kits))
        con.print(table)
    con.print("milestones: " + "; ".join(f"{m.id} {escape(m.title)}" for m in milestones))


def _notes(con, plans) -> None:
    """The notes the narrow table leaves out: one wrapped paragraph per milestone that has any."""
    from rich.markup import escape

    noted = [p for p in plans if p.reasons]
    if noted:
        con.print("[b]notes[/] (--wide puts them in the table; --explain shows the arithmetic)")
    for p in noted:
        # the pip line for just this milestone's packages is for --wide / --explain: here, the one command
        said = [r.removeprefix(f"{p.milestone} ").split(", or pip install ")[0] for r in p.reasons]
        con.print(f"[b]{p.milestone}[/] " + escape("; ".join(said)))


def _explain(con, plans) -> None:
    from rich.markup import escape

    for p in plans:
        what = f"size {p.size}" if p.size else "nothing fits"
        con.print(f"\n[b]{p.milestone} {escape(p.title)}[/]: {p.verdict}, {escape(what)} on {escape(p.device)}"
                  + (f" ({escape(p.profile)})" if p.profile else ""))
        for line in (p.prediction.basis if p.prediction else []):
            con.print(f"  {escape(line)}")
        if p.artifacts:
            from tiers.fit.artifacts import describe

            con.print(f"  needs from the registry: {escape(describe(p.artifacts))}")
        for r in p.reasons:
            con.print(f"  [yellow]->[/] {escape(r)}")


@app.command("fit")
def fit_cmd(
    profile: Optional[str] = typer.Option(None, "--profile", help="Profile FILE, or a reference kit NAME from profiles/ [default: the probed one]."),
    all_profiles: bool = typer.Option(False, "--all-profiles", help="A matrix: every milestone on every reference kit."),
    track: str = typer.Option("build", "--track", help="build | g2c | mentor100m | checklist | scratchtoprod."),
    milestone: Optional[str] = typer.Option(None, "--milestone", "-m", help="Only this milestone, e.g. B12."),
    as_json: bool = typer.Option(False, "--json", help="Print the plans as JSON on stdout, nothing else."),
    explain: bool = typer.Option(False, "--explain", help="Show each plan's basis: the arithmetic behind every number."),
    wide: bool = typer.Option(False, "--wide", help="Every detail in the table: the sized config, what it needs from the registry, the notes."),
) -> None:
    """Which milestones fit this hardware, at what size, and how long they take."""
    from inventory.kits import reference_names, reference_profile
    from tiers import catalog
    from tiers.fit import FitError, fit

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
            prof, label, live = profile_arg(profile)
            plans = [fit(prof, m, check_packages=live) for m in milestones]
    except FitError as exc:
        raise Fail(str(exc)) from None

    if as_json:
        doc = ({"track": track, "profiles": {n: [p.to_dict() for p in ps] for n, ps in grid.items()}}
               if all_profiles else {"track": track, "profile": label, "plans": [p.to_dict() for p in plans]})
        print(json.dumps(doc, indent=2, default=str))
        return
    con = wide_console()
    if not all_profiles:
        con.print(_table(plans, f"{label}: {catalog.load().track(track).title}", wide))
        if not wide:
            _notes(con, plans)
        if explain:
            _explain(con, plans)
        return
    _matrix(con, f"{catalog.load().track(track).title}, on every reference kit (✓ fits, ~ tight, ✗ no; with the size)",
            milestones, names, grid)
    if explain:
        for n in names:
            con.print(f"\n[b u]{n}[/]")
            _explain(con, grid[n])



# --- run command ---

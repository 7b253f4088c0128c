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


def _table(plans, title: str):
    from rich.markup import escape
    from rich.table import Table

    from tiers.fit import fmt_seconds
    from tiers.fit.artifacts import describe

    table = Table(title=title, show_lines=True)
    for col, kw in (("milestone", {"max_width": 34}), ("fits", {"justify": "center"}), ("tier / device", {}),
                    ("sized config", {"max_width": 48}), ("peak memory", {"justify": "right"}),
                    ("time", {"justify": "right"}), ("why not / notes", {"overflow": "fold"})):
        table.add_column(col, **kw)
    for p in plans:
        pred = p.prediction
        size = f"[b]{escape(p.size)}[/]: {escape(str(p.config.get('summary', '')))}" if p.size else "[dim]-[/]"
        if p.artifacts:
            size += f"\n[dim]needs {escape(describe(p.artifacts))}[/]"
        time = "" if pred is None else fmt_seconds(pred.seconds) if p.size else f"[dim]{fmt_seconds(pred.seconds)}[/]"
        table.add_row(f"{p.milestone} {escape(p.title)}", _MARK[p.verdict] + ("" if p.verdict != "tight" else " tight"),
                      f"{p.tier} {escape(p.device)}", size, _memory(p), time, escape("; ".join(p.reasons)))
    return table


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
    track: str = typer.Option("build", "--track", help="build | g2c | mentor100m."),
    milestone: Optional[str] = typer.Option(None, "--milestone", "-m", help="Only this milestone, e.g. B12."),
    as_json: bool = typer.Option(False, "--json", help="Print the plans as JSON on stdout, nothing else."),
    explain: bool = typer.Option(False, "--explain", help="Show each plan's basis: the arithmetic behind every number."),
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
        con.print(_table(plans, f"{label}: {catalog.load().track(track).title}"))
        if explain:
            _explain(con, plans)
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
            cells.append(_MARK[p.verdict] + (f" {escape(p.size)}" if p.size else ""))
        table.add_row(f"{m.id} {escape(m.title)}", *cells)
    con.print(table)
    if explain:
        for n in names:
            con.print(f"\n[b u]{n}[/]")
            _explain(con, grid[n])



# --- run command ---

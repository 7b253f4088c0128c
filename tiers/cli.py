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
    token_file: Optional[Path] = typer.Option(None, "--token-file", help="Launch token [default: agent.token next to the profile; or $TIERKIT_AGENT_TOKEN]; created 0600 on first run."),
    memory_budget: Optional[str] = typer.Option(None, "--memory-budget", help="Memory placement may use on this node, e.g. 8GiB (default: what is free)."),
    mdns: bool = typer.Option(True, "--mdns/--no-mdns", help="Advertise over mDNS."),
) -> None:
    """Run on every machine: advertise over mDNS, serve this profile, start engine workers for an authenticated head."""
    from inventory.profile import default_path
    from inventory.units import parse_bytes
    from tiers.tier3 import agent as agent_mod

    try:
        budget = parse_bytes(memory_budget) if memory_budget is not None else None
    except ValueError:
        raise Fail(f"--memory-budget {memory_budget!r}: write a size such as 8GiB, 512MiB or a number of bytes") from None
    if profile is not None or default_path().exists():
        prof = load_profile(profile)
    else:
        from inventory.probe import probe as run_probe

        prof = run_probe(bench=False, discover=False)
    try:
        agent_mod.serve(host, port, prof, name, verbose=verbose, advertise=mdns, token_file=token_file,
                        memory_budget=budget)
    except agent_mod.AgentError as exc:
        agent_mod.log(str(exc))   # in the agent's own voice, like every line it prints
        raise typer.Exit(1) from None


@app.command()
def serve(
    model: str = typer.Argument(..., help="The model: a .gguf file (llama-rpc), random:<preset>, a tierkit checkpoint or an HF folder (pipeline)."),
    peers: str = typer.Option("auto", "--peers", help="auto (mDNS), none, or HOST:PORT,... of the agents."),
    engine: str = typer.Option("llama-rpc", "--engine", help="llama-rpc | pipeline | vllm"),
    host: str = typer.Option("127.0.0.1", "--host", help="Address the API listens on."),
    port: int = typer.Option(8000, "--port", min=1, max=65535),
    token_file: Optional[Path] = typer.Option(None, "--token-file", help="The agents' launch token [default: $TIERKIT_AGENT_TOKEN, else agent.token next to the profile]."),
    memory_budget: Optional[str] = typer.Option(None, "--memory-budget", help="Memory the head may use, e.g. 4GiB (default: what is free)."),
    ctx: int = typer.Option(512, "--ctx", min=16, max=1 << 20, help="Context length (tokens) to plan and serve."),
    mdns_wait: float = typer.Option(2.0, "--mdns-wait", min=0.0, max=30.0, help="Seconds to listen for agents with --peers auto."),
    head_address: Optional[str] = typer.Option(None, "--head-address", help="This machine's address as the workers see it [default: the route to the first peer]."),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, max=1024, help="Compute threads on the head and on each llama-rpc worker [default: llama.cpp's]."),
) -> None:
    """Serve one model across this machine and its peers: plan, launch workers, OpenAI-compatible API."""
    from inventory.units import parse_bytes
    from tiers.tier3 import serve as serve_mod

    try:
        budget = parse_bytes(memory_budget) if memory_budget is not None else None
    except ValueError:
        raise Fail(f"--memory-budget {memory_budget!r}: write a size such as 8GiB, 512MiB or a number of bytes") from None
    try:
        serve_mod.serve(model, engine=engine, peers=peers, host=host, port=port, token_file=token_file,
                        memory_budget=budget, n_ctx=ctx, mdns_wait=mdns_wait, head_address=head_address,
                        threads=threads)
    except serve_mod.ServeError as exc:
        raise Fail(str(exc), 1) from None


# --- fit command ---

_FIT_MARK = {"fits": "[green]✓[/]", "tight": "[yellow]~[/]", "no": "[red]✗[/]"}


def _fit_profile(arg: Optional[str]):
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


def _fit_console():
    from rich.console import Console

    con = Console(highlight=False)
    if not con.is_terminal:  # piped: wide enough that the table does not fold every cell
        con = Console(highlight=False, width=200)
    return con


def _fit_memory(plan) -> str:
    from inventory.units import fmt_bytes

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



# --- run command ---


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
    from inventory.kits import resolve_profile
    from inventory.profile import ProfileError

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


def _run_settings(items: list[str]) -> dict:
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
) -> None:
    """Run one milestone at its planned size; write builds/B<nn>-<slug>/ with predicted vs actual."""
    from tiers import runner
    from tiers.fit import FitError, fit

    mid = _run_milestone_id(milestone)
    overrides = _run_settings(settings)
    prof, prof_path = _run_profile(profile, mid)
    try:  # packages are judged on this machine, where the run happens, whatever the profile
        plan = fit(prof, mid, size=size, tier=tier, check_packages=True)
    except FitError as exc:
        raise Fail(str(exc)) from None
    if resume:
        plan.config["resume"] = True
    err = _console(stderr=True)
    try:
        if err.is_terminal:
            from rich import progress as rp

            with rp.Progress(rp.SpinnerColumn(), rp.TextColumn("{task.description}"), rp.BarColumn(),
                             rp.MofNCompleteColumn(), rp.TimeElapsedColumn(), console=err, transient=True) as bar:
                result = runner.run(plan, prof, out, bar, profile_path=prof_path, overrides=overrides)
        else:
            result = runner.run(plan, prof, out, profile_path=prof_path, overrides=overrides)
    except runner.RunError as exc:
        raise Fail(str(exc), exc.code) from None
    _print_run_result(result, prof_path)


def _print_run_result(result, prof_path: Optional[Path]) -> None:
    from rich.table import Table

    from inventory.units import fmt_bytes
    from tiers.runner import secs

    plan, pred = result.plan, result.plan.prediction
    con = _console()
    table = Table(title=f"{plan.milestone} {plan.title}: size {plan.size} on {plan.device}")
    for col in ("", "predicted", "actual", "actual / predicted"):
        table.add_column(col)
    if pred is not None:
        table.add_row("peak memory", fmt_bytes(pred.peak_bytes, binary=True),
                      fmt_bytes(result.actual_peak_bytes, binary=True),
                      f"{result.actual_peak_bytes / pred.peak_bytes:.2f}" if pred.peak_bytes else "?")
        table.add_row("wall time", secs(pred.seconds), secs(result.actual_seconds),
                      f"{result.actual_seconds / pred.seconds:.2f}" if pred.seconds else "?")
    con.print(table)
    if result.summary:
        con.print(result.summary)
    con.print(f"build: {result.out_dir}/README.md"
              + (f"\ncalibration recorded in {prof_path}" if prof_path else "\nreference kit: calibration not recorded"))


# --- data sub-app: the dataset registry, tiers/data.py ---

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
    _fit_console().print(table)


@data_app.command("fetch")
def data_fetch(
    name: str = typer.Argument(..., help="A data set from `tierkit data list`."),
    url: Optional[str] = typer.Option(None, "--url", help="Fetch from this base URL instead (or $TIERKIT_DATA_URL): "
                                                          "each file from URL/<its local path>."),
    to: Optional[Path] = typer.Option(None, "--to", help="Write here [default: $TIERKIT_DATA or ~/.cache/tierkit]."),
) -> None:
    """Download a data set, verify its sha256, write it atomically (an interrupted download resumes)."""
    from tiers import data

    err = _console(stderr=True)
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


# --- kws sub-app: the keyword spotter, tiers/tier0/ ---

kws_app = typer.Typer(no_args_is_help=True, help="Keyword spotter on a microcontroller: train, export, flash, monitor, eval.")
app.add_typer(kws_app, name="kws")


def _kws_progress():
    """(rich Progress or a null context, callback(stage, done, total)) for the kws steps."""
    err = _console(stderr=True)
    if not err.is_terminal:
        return _null(), lambda stage, done, total: None
    from rich import progress as rp

    bar = rp.Progress(rp.TextColumn("{task.description}"), rp.BarColumn(), rp.MofNCompleteColumn(),
                      rp.TimeElapsedColumn(), console=err, transient=True)
    tasks: dict[str, object] = {}

    def cb(stage: str, done: int, total: int) -> None:
        if stage not in tasks:
            tasks[stage] = bar.add_task(stage, total=total or None)
        bar.update(tasks[stage], completed=done, total=total or None)

    return bar, cb


def _kws_profile(arg: Optional[str]):
    """The profile for board defaults: --profile FILE|NAME, else the probed one, else None."""
    from inventory.profile import default_path

    if arg is None and not default_path().exists():
        return None
    return _fit_profile(arg)[0]


def _kws_errors():
    from tiers.tier0.data import DataError
    from tiers.tier0.export import ExportError
    from tiers.tier0.firmware import FirmwareError
    from tiers.tier0.flash import FlashError
    from tiers.tier0.monitor import DeviceError

    return (DataError, ExportError, FirmwareError, FlashError, DeviceError)


@kws_app.command("train")
def kws_train(
    data: Optional[Path] = typer.Option(None, "--data", help="A Speech Commands-style folder [default: synthetic keywords, made with espeak-ng]."),
    size: Optional[str] = typer.Option(None, "--size", help="xs | s | m | l [default: the planner's size for your board]."),
    epochs: int = typer.Option(30, "--epochs", min=1),
    train_samples: int = typer.Option(85_000, "--train-samples", min=1, help="Training examples per epoch (augmented copies fill up)."),
    synth_speakers: Optional[int] = typer.Option(None, "--synth-speakers", min=1, help="Use only this many synthetic speakers (quick runs)."),
    limit_per_class: Optional[int] = typer.Option(None, "--limit-per-class", min=1, help="Cap clips per class and split."),
    out: Path = typer.Option(Path("kws-model"), "--out", help="Where model.keras, model.tflite and model/ go."),
    profile: Optional[str] = typer.Option(None, "--profile", help="Profile FILE or NAME whose board sizes the model."),
) -> None:
    """Train the DS-CNN, quantise it to int8, check it on TFLite Micro, export C."""
    from tiers.tier0 import b06_kws

    chosen = size or b06_kws.planned_size(_kws_profile(profile))
    bar, cb = _kws_progress()
    try:
        with bar:
            t = b06_kws.train_to(out, size=chosen, data=data, epochs=epochs, train_samples=train_samples,
                                 synth_speakers=synth_speakers, limit_per_class=limit_per_class, progress=cb)
    except (*_kws_errors(), ValueError) as exc:
        raise Fail(str(exc).splitlines()[0]) from None
    print(f"{chosen}: {t.line()}\ndata: {t.source}\nnext: tierkit kws export {out / 'model.tflite'}")


@kws_app.command("export")
def kws_export(
    model: Path = typer.Argument(..., help="An int8 .tflite file."),
    out: Optional[Path] = typer.Option(None, "--out", help="Folder for model.c / model.h [default: firmware/lib/model]."),
) -> None:
    """Compile an int8 .tflite into C (model.c, model.h) calling the project's int8 kernels."""
    from tiers.tier0 import export
    from tiers.tier0.firmware import DEFAULT_MODEL_DIR

    try:
        blob = model.read_bytes()
    except OSError as exc:
        raise Fail(f"cannot read {model}: {exc.strerror}") from None
    try:
        r = export.export_c(blob, out or DEFAULT_MODEL_DIR, source_name=model.name)
    except export.ExportError as exc:
        raise Fail(f"{model.name}: {exc}") from None
    print(f"{r.summary()}\nwrote {r.c_path} and {r.h_path}")


@kws_app.command("flash")
def kws_flash(
    board: Optional[str] = typer.Option(None, "--board", help="nano33ble | esp32s3 | pico [default: from the profile]."),
    port: Optional[str] = typer.Option(None, "--port", help="Serial port [default: the board's, from the profile]."),
    model_dir: Optional[Path] = typer.Option(None, "--model-dir", help="Exported model (model.c/.h) [default: firmware/lib/model]."),
    profile: Optional[str] = typer.Option(None, "--profile", help="Profile FILE or NAME [default: the probed one]."),
    upload: bool = typer.Option(True, "--upload/--no-upload", help="--no-upload: build and check the size only."),
    verbose: bool = typer.Option(False, "--verbose", help="Show every PlatformIO line."),
) -> None:
    """Build with PlatformIO, check flash and RAM against the board, then upload."""
    from tiers.tier0 import flash as fl

    from rich.markup import escape

    err = _console(stderr=True)
    now = {"step": "flash"}

    try:
        with err.status("flash", spinner="dots") if err.is_terminal else _null() as status:
            live = hasattr(status, "update")

            def on_line(line: str) -> None:  # PlatformIO's progress, under the current step
                if verbose:
                    err.print(f"[dim]{escape(line)}[/]", highlight=False)
                if live:
                    status.update(f"{escape(now['step'])} [dim]{escape(line[:70])}[/]")

            def on_step(text: str) -> None:
                now["step"] = text
                if live:
                    status.update(escape(text))
                else:
                    print(text, flush=True)

            r = fl.flash(_kws_profile(profile), board, port, model_dir=model_dir, upload=upload,
                         on_line=on_line, on_step=on_step)
    except (*_kws_errors(),) as exc:
        raise Fail(str(exc)) from None
    print(r.line())


@kws_app.command("monitor")
def kws_monitor(
    port: Optional[str] = typer.Option(None, "--port", help="Serial port [default: the board's, from the profile]."),
    baud: int = typer.Option(115200, "--baud"),
    profile: Optional[str] = typer.Option(None, "--profile", help="Profile FILE or NAME [default: the probed one]."),
    seconds: Optional[float] = typer.Option(None, "--seconds", min=0.0, help="Stop after this long [default: until Ctrl-C]."),
    reconnect: bool = typer.Option(True, "--reconnect/--no-reconnect", help="Wait for the board to come back after a reset."),
) -> None:
    """Print the firmware's detections (DET <label> <score> <ms>) and notes; survives board resets."""
    import time as _time

    from tiers.tier0 import flash as fl
    from tiers.tier0 import monitor as mon

    try:
        if port is None:
            port = fl.resolve_target(_kws_profile(profile), None, None).port
        if port is None:
            raise Fail("no board: pass --port, or plug the board in and run `tierkit probe`")
        end = None if seconds is None else _time.monotonic() + seconds
        err = _console(stderr=True)
        stats = mon.monitor(port, baud=baud, on_line=lambda s: print(s, flush=True),
                            on_status=lambda s: err.print(f"[yellow]{s}[/]", highlight=False),
                            stop=lambda: end is not None and _time.monotonic() > end, reconnect=reconnect)
    except (*_kws_errors(),) as exc:
        raise Fail(str(exc)) from None
    _console(stderr=True).print(f"{stats.lines} lines, {stats.detections} detections, {stats.reconnects} reconnects",
                                highlight=False)


@kws_app.command("eval")
def kws_eval(
    port: Optional[str] = typer.Option(None, "--port", help="A flashed board's serial port [default: the emulated Cortex-M4 under QEMU]."),
    model_dir: Optional[Path] = typer.Option(None, "--model-dir", help="Exported model for the QEMU build [default: firmware/lib/model]."),
    tflite: Optional[Path] = typer.Option(None, "--tflite", help="The .tflite it came from: scores are compared with TFLite Micro's."),
    data: Optional[Path] = typer.Option(None, "--data", help="Speech Commands-style folder [default: the synthetic keywords]."),
    limit: int = typer.Option(100, "--limit", min=1, help="Held-out clips to stream to the device."),
    synth_speakers: Optional[int] = typer.Option(None, "--synth-speakers", min=1, help="As given to `kws train` (synthetic data only)."),
    as_json: bool = typer.Option(False, "--json", help="Print the numbers as JSON."),
) -> None:
    """Accuracy measured on the device itself: held-out clips streamed over serial, scores read back."""
    from tiers.tier0 import b06_kws
    from tiers.tier0.firmware import DEFAULT_MODEL_DIR

    try:
        ref = tflite.read_bytes() if tflite else None
    except OSError as exc:
        raise Fail(f"cannot read {tflite}: {exc.strerror}") from None
    bar, cb = _kws_progress()
    try:
        audio, labels, source = b06_kws.held_out_clips(data, limit, synth_speakers=synth_speakers)
        with bar:
            ev = b06_kws.evaluate(model_dir or DEFAULT_MODEL_DIR, audio, labels, port=port, tflite=ref, progress=cb)
    except (*_kws_errors(),) as exc:
        raise Fail(str(exc)) from None
    if as_json:
        print(json.dumps({"where": ev.where, "data": source, "clips": ev.n, "accuracy": ev.accuracy,
                          "scores_equal_tflm": ev.exact, "model_per_inference": ev.model_count,
                          "features_per_inference": ev.feature_count, "unit": ev.unit,
                          "confusion_matrix": ev.confusion.tolist()}, indent=2))
        return
    print("\n".join([f"data: {source}", *ev.lines()]))


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

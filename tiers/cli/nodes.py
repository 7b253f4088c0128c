"""`tierkit agent` and `tierkit serve`: one model served across this machine and its peers."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from tiers.cli.common import Fail, app, load_profile, parse_budget


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
    from tiers.tier3 import agent as agent_mod

    budget = parse_budget(memory_budget)
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
    model: str = typer.Argument(..., help="The model: a .gguf file or a registry name from `tierkit data list` (llama-rpc), random:<preset>, a tierkit checkpoint or an HF folder (pipeline)."),
    peers: str = typer.Option("auto", "--peers", help="auto (mDNS), none, or HOST:PORT,... of the agents."),
    engine: str = typer.Option("llama-rpc", "--engine", help="llama-rpc | pipeline | vllm"),
    host: str = typer.Option("127.0.0.1", "--host", help="Address the API listens on."),
    port: int = typer.Option(8000, "--port", min=1, max=65535),
    token_file: Optional[Path] = typer.Option(None, "--token-file", help="The agents' launch token [default: $TIERKIT_AGENT_TOKEN, else agent.token next to the profile]."),
    memory_budget: Optional[str] = typer.Option(None, "--memory-budget", help="Memory the head may use, e.g. 4GiB (default: what is free)."),
    ctx: int = typer.Option(512, "--ctx", min=16, max=1 << 20, help="Context length (tokens) to plan and serve; llama-rpc: the total its --parallel requests share."),
    mdns_wait: float = typer.Option(2.0, "--mdns-wait", min=0.0, max=30.0, help="Seconds to listen for agents with --peers auto."),
    head_address: Optional[str] = typer.Option(None, "--head-address", help="This machine's address as the workers see it [default: the route to the first peer]."),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, max=1024, help="Compute threads on the head and on each llama-rpc worker [default: llama.cpp's]."),
    layout: str = typer.Option("auto", "--layout", help="auto (one node when the model fits it and pipelining does not pay), single, or pipeline (every node >= 1 layer)."),
    expected_load: int = typer.Option(1, "--expected-load", min=1, max=4096, help="Requests you expect in flight at once: what --layout auto weighs against the network cost."),
    parallel: Optional[str] = typer.Option(None, "--parallel", help="llama-rpc: requests decoded together in one llama.cpp context (llama.cpp's -np) [default: 4]. --ctx is the total they share: one request alone may use all of it."),
) -> None:
    """Serve one model across this machine and its peers: plan, launch workers, OpenAI-compatible API."""
    from tiers.tier3 import serve as serve_mod

    budget = parse_budget(memory_budget)
    try:
        serve_mod.serve(model, engine=engine, peers=peers, host=host, port=port, token_file=token_file,
                        memory_budget=budget, n_ctx=ctx, mdns_wait=mdns_wait, head_address=head_address,
                        threads=threads, layout=layout, expected_load=expected_load,
                        parallel=parallel)
    except serve_mod.ServeError as exc:
        raise Fail(str(exc), exc.code) from None


# --- fit command ---

_FIT_MARK = {"fits": "[green]✓[/]", "tight": "[yellow]~[/]", "no": "[red]✗[/]"}

"""B17: one model served across two machines, and where the time goes.

    1. the model alone on this machine (the llama-rpc engine with one stage): the baseline
    2. the same model split by placement across this machine and a peer, through the peer's
       agent (token-authenticated launch of the llama.cpp RPC worker): the two-node session
    3. the same requests on both: greedy tokens must be identical; latency (time to first
       token, time per token) one request at a time, and throughput with several in flight
    4. where a token's time goes: compute on each stage (the one-node time per token,
       shared by each stage's bytes of layers) and the network + RPC (what two nodes add)

The peer is the profile's first reachable agent. With none (or `--set peers=local`) the
milestone starts an agent of its own on loopback as the second node, which measures
the protocol's cost but not a real link: the README says which it was.

The model: the rung's `model`, a registry GGUF (`tierkit data fetch NAME` brings it), or
`--set gguf=PATH|NAME`: any GGUF file or registry GGUF name (e.g. stories260K.gguf from
the shared data for a quick run).
"""
from __future__ import annotations

import statistics
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

from annotated_types import Ge, Gt

from tiers.report import md_table, pyplot, save

if TYPE_CHECKING:
    from tiers.runner import Context, Output


@dataclass
class Config:
    gguf: str | None = None                       # any GGUF file llama.cpp loads, or a registry GGUF name
    model: str = "any"                            # the rung's registry GGUF (what the planner sized), used
    quant: str = ""                               # when no gguf is given
    peers: Literal["profile", "local"] = "profile"  # local: an agent of B17's own on loopback as the second node
    requests: Annotated[int, Gt(0)] = 8           # prompts, each served on one node and on two
    new_tokens: Annotated[int, Gt(0)] = 256
    prompt_tokens: Annotated[int, Gt(0)] = 512    # at most half the context
    ctx: Annotated[int, Gt(0)] = 4096
    threads: Annotated[int, Ge(0)] = 1            # llama.cpp threads on each node; 0: llama.cpp's default
    concurrent: Annotated[int, Gt(0)] = 4         # requests in flight for the throughput measurement
    memory_budget: Annotated[int, Gt(0)] | None = None  # bytes the head may hold: caps its share of the split


# ---------------------------------------------------------------- the experiment

def run(ctx: Context) -> Output:
    from tiers.runner import Output
    from tiers.tier3.placement import layout_from_gguf

    cfg: Config = ctx.config
    gguf = _model_file(cfg)
    layout = layout_from_gguf(gguf, n_ctx=cfg.ctx)
    one, prompts, new_tokens = _one_node(ctx, cfg, gguf, layout.n_layer)
    two = _two_nodes(ctx, cfg, gguf, prompts, new_tokens)

    same = one["tokens"] == two["tokens"]
    # -- where a token's time goes: compute shared by each stage's bytes of layers, the rest is the link
    layer_bytes = [s["bytes"] for s in two["plan"]]
    compute = [one["ms_per_token"] * b / sum(layer_bytes) for b in layer_bytes]
    network = max(0.0, two["ms_per_token"] - one["ms_per_token"])
    bytes_tok = two["stats"]["bytes_per_token_head_workers"]
    metrics = {
        "model": Path(gguf).name, "model_path": gguf, "registry_model": _registry_name(cfg),
        "layers": layout.n_layer, "model_bytes": layout.total_bytes,
        "second_node": two["where"], "plan": two["plan"], "plan_table": two["plan_table"],
        "prompt_tokens": len(prompts[0]), "new_tokens": new_tokens, "requests": len(prompts),
        "greedy_tokens_identical": same,
        "one_node": _measured(one), "two_nodes": _measured(two),
        "ratio_single_request": one["ms_per_token"] / two["ms_per_token"],
        "ratio_concurrent": two["tokens_per_s_concurrent"] / one["tokens_per_s_concurrent"],
        "time_per_token_ms": {"compute_per_stage": compute, "network_and_rpc": network},
        "bytes_per_token": bytes_tok, "agent_rtt_ms": two["rtt_ms"],
    }
    if not same:
        ctx.log("WARNING: greedy tokens differ between one and two nodes")
    plots = [_plot(ctx.out_dir / "time_per_token.png", one["ms_per_token"], compute, network,
                   [s["name"] for s in two["plan"]])]
    summary = (f"{Path(gguf).name} ({layout.n_layer} layers) served by this machine alone and split across two nodes "
               f"({two['where']}). Greedy tokens {'identical' if same else 'DIFFER'} on both. One request: "
               f"{one['tokens_per_s_single']:.3g} tokens/s on one node vs {two['tokens_per_s_single']:.3g} on two "
               f"(x{metrics['ratio_single_request']:.2f}); per token the split adds {network:.3g} ms of network and "
               f"RPC and {bytes_tok / 1e3:.3g} kB on the wire.")
    return Output(metrics=metrics, summary=summary, report=_report(metrics), plots=plots)


QUICK = "for a quick run: tierkit data fetch qwen2.5-0.5b-instruct-q4_k_m, then --set gguf=qwen2.5-0.5b-instruct-q4_k_m"


def _model_file(cfg: Config) -> str:
    """The GGUF to serve: `gguf` (a file or a registry name), else the rung's registry model; one line if none."""
    from tiers.runner import RunError
    from tiers.tier3 import serve as serve_mod

    spec = cfg.gguf or (cfg.model if cfg.model != "any" else None)
    need = f"B17 needs a GGUF model file ({cfg.model} sized by the planner)"
    if not spec:
        raise RunError(f"{need}: pass --set gguf=PATH or a registry name ({QUICK})")
    try:
        path = Path(serve_mod.resolve_model(spec)).expanduser()
    except serve_mod.ServeError as exc:
        raise RunError(f"{need}: {exc}, or pass --set gguf=PATH") from None
    if not path.is_file():
        raise RunError(f"{need}: {spec} is neither a file nor a registry name; pass --set gguf=PATH ({QUICK})")
    return str(path.absolute())   # not resolved: a cached download is a link whose name is the model's


def _registry_name(cfg: Config) -> str | None:
    """The registry name the model came from, if it came from the registry."""
    from tiers import data

    spec = cfg.gguf or cfg.model
    if Path(spec).expanduser().exists():
        return None
    try:
        return data.get(spec).name
    except data.DataError:
        return None


def _one_node(ctx: Context, cfg: Config, gguf: str, n_layer: int) -> tuple[dict[str, Any], list[list[int]], int]:
    """The baseline: the whole model on this machine. Also fixes the prompts and lengths both runs use."""
    from tiers.tier3.llama_rpc import LlamaRpcEngine

    ctx.log(f"one node: {Path(gguf).name}, {n_layer} layers")
    single = LlamaRpcEngine(gguf, [{"host": "127.0.0.1", "port": 0, "layers": [0, n_layer]}], n_ctx=cfg.ctx,
                            threads=cfg.threads or None)
    single.start()
    try:
        n_ctx = single.n_ctx
        prompt_len = min(cfg.prompt_tokens, n_ctx // 2)
        new_tokens = min(cfg.new_tokens, n_ctx - prompt_len)
        prompts = [_prompt(single, prompt_len, i) for i in range(cfg.requests)]
        with ctx.progress("one node", 1) as bar:
            one = _measure(single, prompts, new_tokens, cfg.concurrent)
            bar.advance()
    finally:
        single.close()
    return one, prompts, new_tokens


def _two_nodes(ctx: Context, cfg: Config, gguf: str, prompts: list[list[int]], new_tokens: int) -> dict[str, Any]:
    """The same requests with the model split across this machine and the peer, as `tierkit serve` does it."""
    from tiers.runner import RunError
    from tiers.tier3 import serve as serve_mod
    from tiers.tier3.client import AgentClient

    agent, token = None, None   # with the profile's peer: the agents' token ($TIERKIT_AGENT_TOKEN or the file)
    reachable = [p for p in ctx.profile.peers if not p.problem]
    if cfg.peers == "profile" and reachable:
        p = reachable[0]
        peers_spec, where = f"{p.address}:{p.port}", f"the profile's peer {p.name or p.address} ({p.address})"
    else:
        agent, token = _local_agent(ctx)
        peers_spec, where = f"127.0.0.1:{agent.port}", "a local agent on loopback (no real peer: no real link)"
    ctx.log(f"two nodes: this machine + {where}")
    plan_lines: list[str] = []
    try:
        # Split in proportion to free memory, as `tierkit serve` does (memory_budget caps the head).
        session = serve_mod.start_session(gguf, "llama-rpc", peers_spec, token=token, memory_budget=cfg.memory_budget,
                                          n_ctx=cfg.ctx, mdns_wait=0, log=plan_lines.append,
                                          threads=cfg.threads or None)
        try:
            with ctx.progress("two nodes", 1) as bar:
                two = _measure(session.engine, prompts, new_tokens, cfg.concurrent)
                bar.advance()
            peer = session.plan.stages[1].node if len(session.plan.stages) > 1 else None
            rtt = AgentClient(peer.host, peer.port, None).rtt_ms() if peer else None
            stages = session.plan.to_dict()["stages"]
        finally:
            session.close()
    except serve_mod.ServeError as exc:
        raise RunError(f"B17 two-node session: {exc}") from None
    finally:
        if agent is not None:
            agent.stop()
    for line in plan_lines:
        ctx.log(line)
    return {**two, "where": where, "plan": stages, "plan_table": plan_lines, "rtt_ms": rtt}


def _local_agent(ctx: Context) -> tuple[Any, str]:
    """An agent of B17's own on loopback, with a fresh token: the second node when the profile has none.
    Its lines go to the run's log (metrics.json), not the terminal."""
    import secrets

    from inventory.profile import Profile
    from tiers.tier3.agent import start_in_thread

    token = secrets.token_urlsafe(32)
    agent = start_in_thread("127.0.0.1", 0, Profile(name="b17-local"), "b17-local", advertise=False, token=token,
                            say=lambda line: ctx.lines.append(f"local agent: {line}"))
    return agent, token


def _prompt(engine: Any, n_tokens: int, i: int) -> list[int]:
    """A prompt of n_tokens tokens (a story opening, repeated), different from the start for each i,
    so that no request reuses another's KV cache (llama.cpp keeps a common prefix)."""
    names = ["Lily", "Tom", "Sue", "Max", "Anna", "Ben", "Mia", "Sam"]
    text = f"{names[i % 8]} {i}. Once upon a time, there was a little girl named Lily. She loved to play outside. "
    ids = engine.tokenize(text)
    while len(ids) < n_tokens:
        text += text
        ids = engine.tokenize(text)
    return ids[:n_tokens]


def _measure(engine: Any, prompts: list[list[int]], new_tokens: int, concurrent: int) -> dict[str, Any]:
    """Sequential requests (latency) then `concurrent` at once (throughput); tokens kept for comparison."""
    from tiers.tier3.engine import Sampling

    greedy = Sampling(max_tokens=new_tokens, temperature=0.0)
    ttft, outs = [], []
    decode_s, decode_n = 0.0, 0
    t_all = time.perf_counter()
    for ids in prompts:
        t0 = time.perf_counter()
        toks, first = [], None
        for piece in engine.generate(ids, greedy):
            if piece.token_ids and first is None:
                first = time.perf_counter() - t0
            toks += piece.token_ids
        total = time.perf_counter() - t0
        ttft.append(first or total)
        if len(toks) > 1:  # decode: every token after the first (which also carries the prompt)
            decode_s += total - (first or 0)
            decode_n += len(toks) - 1
        outs.append(toks)
    seq_s = time.perf_counter() - t_all
    done: list[int] = []
    lock = threading.Lock()

    def one(ids: list[int]) -> None:
        n = sum(len(p.token_ids) for p in engine.generate(ids, greedy))
        with lock:
            done.append(n)

    threads = [threading.Thread(target=one, args=(prompts[i % len(prompts)],)) for i in range(concurrent)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    conc_s = time.perf_counter() - t0
    per_tok = decode_s / max(decode_n, 1)
    return {"ttft_ms": 1e3 * statistics.median(ttft), "ms_per_token": 1e3 * per_tok,
            "tokens_per_s_single": 1 / per_tok,
            "tokens_per_s_sequential": sum(map(len, outs)) / seq_s,
            "tokens_per_s_concurrent": sum(done) / conc_s, "concurrent": concurrent, "tokens": outs,
            "stats": engine.stats()}


def _measured(run: dict[str, Any]) -> dict[str, Any]:
    """A measurement's numbers, for metrics.json (not its tokens, not the engine's raw stats)."""
    keep = ("ttft_ms", "ms_per_token", "tokens_per_s_single", "tokens_per_s_sequential", "tokens_per_s_concurrent",
            "concurrent")
    return {k: run[k] for k in keep}


# ---------------------------------------------------------------- plots and the report

def _plot(path: Path, one_ms: float, compute: list[float], network: float, names: list[str]) -> str:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.barh(["1 node"], [one_ms], color="#4c72b0", label="compute (all layers)")
    left = 0.0
    colors = ["#55a868", "#8172b2", "#64b5cd", "#ccb974"]
    for i, (c, n) in enumerate(zip(compute, names)):
        ax.barh(["2 nodes"], [c], left=left, color=colors[i % len(colors)], label=f"compute on {n}")
        left += c
    ax.barh(["2 nodes"], [network], left=left, color="#c44e52", label="network + RPC")
    ax.set_xlabel("milliseconds per generated token (decode)")
    ax.set_title("Where a token's time goes")
    ax.legend(loc="lower right", fontsize=8)
    save(fig, path)
    return f"{path.name}: time per token on one node vs split across two, compute per stage vs network"


def _report(m: dict[str, Any]) -> str:
    one, two = m["one_node"], m["two_nodes"]
    rows = [("time to first token (ms)", f"{one['ttft_ms']:.3g}", f"{two['ttft_ms']:.3g}"),
            ("time per token (ms)", f"{one['ms_per_token']:.3g}", f"{two['ms_per_token']:.3g}"),
            ("tokens/s, one request", f"{one['tokens_per_s_single']:.3g}", f"{two['tokens_per_s_single']:.3g}"),
            (f"tokens/s, {one['concurrent']} in flight", f"{one['tokens_per_s_concurrent']:.3g}",
             f"{two['tokens_per_s_concurrent']:.3g}")]
    t = m["time_per_token_ms"]
    return "\n".join([
        "## The plan", "", "```", *m["plan_table"], "```", "",
        f"Second node: {m['second_node']}. Round trip to its agent: "
        + (f"{m['agent_rtt_ms']:.3g} ms." if m["agent_rtt_ms"] is not None else "not measured."), "",
        "## One node vs two", "", md_table(["", "one node", "two nodes"], rows), "",
        (f"Greedy tokens identical on one and two nodes: **{m['greedy_tokens_identical']}** "
        f"({m['requests']} requests, {m['prompt_tokens']}-token prompts, {m['new_tokens']} new tokens each)."), "",
        "## Where the time goes", "",
        "Compute per stage is the one-node time per token shared by each stage's bytes of layers: "
        + ", ".join(f"{c:.3g} ms" for c in t["compute_per_stage"])
        + f"; the network and RPC add {t['network_and_rpc']:.3g} ms per token (two-node minus one-node), "
        f"with {m['bytes_per_token'] / 1e3:.3g} kB per token on the head's sockets to the worker (TCP_INFO; "
        "llama.cpp sends the compute graph with every token, not only the hidden state).", "",
        ("llama.cpp serves one request at a time, so requests in flight queue rather than fill the pipeline: "
        "two nodes buy memory (a model that does not fit one node), not speed. The `pipeline` engine fills "
        "the pipeline with several requests."),
    ])

"""`tierkit serve`: find the peers, plan, launch the workers through their agents, serve the API.

    --port free? (else exit 2, nothing loaded)  ->  a registry name -> its file (data.require)
        ->  the engine's layout(model)  ->  peers (mDNS or --peers)  ->  nodes with free memory
        ->  choose_layout (auto | single | pipeline; the choice and its numbers printed and in /metrics)
        ->  placement plan (printed)  ->  the engine's launch(): authenticated launches on each agent
        ->  ENGINE(model, stages).start()  ->  HTTP API (server.py)  ->  every worker stopped

Each step is a plain function, so B17 and the tests drive the same code as the
command. What differs between engines is theirs (engines.py): this file
names none of them.
"""
from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from models.costs import HEADROOM
from tiers.tier3 import engines, net
from tiers.tier3.client import AgentClientError, Workers, read_token
from tiers.tier3.engine import Engine, EngineError
from tiers.tier3.engines import EngineKind
from tiers.tier3.placement import (
    DECODE_FLOPS_SHARE,
    ModelLayout,
    Node,
    PlacementError,
    Plan,
    choose_layout,
    hop_seconds,
    render,
)


class ServeError(Exception):
    """`tierkit serve` cannot go on; str() is one line naming the fix; `code` the exit status (2: bad input)."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


def check_port(host: str, port: int) -> None:
    """ServeError (exit 2) when host:port cannot be bound, before any model loads or worker starts."""
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)   # as the server binds it
        try:
            s.bind((host, port))
        except OSError as exc:
            what = "already in use" if exc.errno == 98 else (exc.strerror or str(exc)).lower()
            raise ServeError(f"port {port} on {host} is {what}: choose another with --port", 2) from None


def parse_parallel(text: str | int | None) -> int | None:
    """--parallel as given (None: the engine's default); ServeError (exit 2) unless a whole number the
    llama-rpc engine takes (1 to llama.cpp's limit on sequences)."""
    from tiers.tier3.llama_rpc import MAX_PARALLEL

    if text is None:
        return None
    try:
        n = int(str(text).strip())
    except ValueError:
        n = 0
    if not 1 <= n <= MAX_PARALLEL or str(text).strip() != str(n):
        raise ServeError(f"--parallel must be a whole number 1-{MAX_PARALLEL} (requests decoded together), "
                         f"not {text!r}: e.g. --parallel 4", 2)
    return n


# ---------------------------------------------------------------- nodes and the plan

def local_addresses() -> set[str]:
    return {"127.0.0.1", "0.0.0.0", *net.ipv4_addresses(up_only=False)}


def find_peers(spec: str, mdns_wait: float = 2.0) -> tuple[list[Any], str | None]:
    """--peers: "auto" (mDNS; this machine's own agent is skipped), "none", or HOST:PORT,... (all must answer)."""
    from inventory.detect import Unavailable, peers

    spec = (spec or "auto").strip()
    if spec == "none":
        return [], "single node (--peers none)"
    manual = [] if spec == "auto" else [s for s in spec.split(",") if s.strip()]
    for s in manual:
        try:
            peers.parse_spec(s)
        except ValueError as exc:
            raise ServeError(f"--peers: {exc}") from None
    try:
        found = peers.detect(manual=manual, mdns_wait=mdns_wait if spec == "auto" else 0, measure_bytes=1 << 20)
    except Unavailable as exc:
        raise ServeError(str(exc)) from None
    got = list(found.value)
    if manual:
        bad = [p for p in got if p.problem]
        if bad:
            raise ServeError(f"peer {bad[0].address}:{bad[0].port}: {bad[0].problem}")
        return got, found.note
    mine = local_addresses()
    return [p for p in got if not p.problem and p.address not in mine], found.note


def free_memory(summary: dict[str, Any], on_gpu: bool) -> tuple[int, str]:
    """(bytes placement may use, basis): the agent's --memory-budget, else free GPU memory, else free RAM."""
    if summary.get("memory_budget_bytes"):
        return int(summary["memory_budget_bytes"]), "memory budget"
    gpus = summary.get("gpus") or []
    if on_gpu and gpus:
        free = sum(int(g.get("memory_free_bytes") or g.get("memory_bytes") or 0) for g in gpus)
        return free, "free GPU memory"
    return int(summary.get("memory_available_bytes") or 0), "available RAM"


def head_node(memory_budget: int | None, address: str, on_gpu: bool = False) -> Node:
    if memory_budget:
        return Node("head", address, 0, memory_budget, "ram", "memory budget")
    import psutil

    summary: dict[str, Any] = {"memory_available_bytes": psutil.virtual_memory().available}
    if on_gpu:
        from inventory.detect import gpu

        try:
            summary["gpus"] = [g.model_dump() for g in gpu.detect().value]
        except Exception:
            pass
    free, basis = free_memory(summary, on_gpu)
    return Node("head", address, 0, free, "gpu" if on_gpu and summary.get("gpus") else "ram", basis)


def peer_nodes(found: list[Any], on_gpu: bool) -> list[Node]:
    nodes = []
    for p in found:
        free, basis = free_memory(p.summary, on_gpu)
        nodes.append(Node(p.name or p.address, p.address, p.port, free, "gpu" if on_gpu else "ram", basis))
    return nodes


def resolve_model(model: str) -> str:
    """A registry name (`tierkit data list`: a GGUF, or a Hugging Face model) -> its file or snapshot folder
    here; a path, random:<preset> or any other name as given (the engine says what it takes).
    ServeError (one line naming the fetch) when the registry's model is not here."""
    from tiers import data

    if model.startswith("random:") or Path(model).expanduser().exists():
        return model
    try:
        entry = data.get(model)
    except data.DataError:
        return model
    if entry.kind == "data":
        raise ServeError(f"{model} is a data set, not a model: give a GGUF or a model (`tierkit data list`)")
    try:
        return str(data.require(entry.name))
    except data.DataError as exc:
        raise ServeError(str(exc)) from None


def model_layout(kind: EngineKind, model: str, n_ctx: int) -> ModelLayout:
    """The bytes placement divides, as the engine that serves `model` lays them out; ServeError if it cannot."""
    try:
        return kind.load().layout(model, n_ctx)
    except (EngineError, PlacementError) as exc:
        raise ServeError(str(exc)) from None


def link_cost(layout: ModelLayout, found: list[Any]) -> float | None:
    """Seconds per token per hop over the slowest measured peer link; None when no link was measured."""
    costs = []
    for p in found:
        rtt = getattr(p, "rtt_ms", None)
        bw = getattr(p, "bandwidth_mbps", None)
        h = hop_seconds(layout, rtt.value / 1e3 if rtt else None, bw.value * 1e6 / 8 if bw else None)
        if h is not None:
            costs.append(h)
    return max(costs) if costs else None


def decode_rates(threads: int | None = None) -> tuple[float, float]:
    """(bytes/s, FLOP/s) of a decode step on the head: the probed memory bandwidth and DECODE_FLOPS_SHARE
    of the probed float32 matmul rate for the threads it computes with (the planner's figures and defaults)."""
    from inventory.profile import ProfileError, default_path, load
    from tiers.fit.targets import DEFAULT_BANDWIDTH_GBS, DEFAULT_CPU_GFLOPS, cpu_bandwidth, cpu_flops, usable_cpus

    try:
        prof = load(default_path())
    except (ProfileError, OSError):
        return DEFAULT_BANDWIDTH_GBS * 1e9, DEFAULT_CPU_GFLOPS * 1e9
    cores = usable_cpus(prof)
    share = min(threads, cores) / cores if threads else 1.0
    return cpu_bandwidth(prof)[0], cpu_flops(prof)[0] * DECODE_FLOPS_SHARE * share


def plan_for(layout: ModelLayout, kind: EngineKind, head: Node, others: list[Node],
             headroom: float = HEADROOM, requested: str = "auto", hop_s: float | None = None,
             expected_load: int = 1, threads: int | None = None) -> Plan:
    """The placement (choose_layout: the one function `tierkit fit` prices with too); ServeError with the numbers."""
    bps, flops = decode_rates(threads)
    try:
        plan = choose_layout(layout, head, others, requested, headroom=headroom, last_on=kind.output_on,
                             hop_s=hop_s, expected_load=expected_load, decode_bps=bps, decode_flops=flops)
    except PlacementError as exc:
        raise ServeError(str(exc), 2 if requested != "auto" else 1) from None
    if kind.output_on == "first" and plan.stages[0].layers[1] == 0 and len(plan.stages) > 1:
        plan.notes.append("note: the head keeps the embeddings and output on its CPU; all blocks are remote")
    return plan


# ---------------------------------------------------------------- a session

@dataclass
class Session:
    engine: Engine
    plan: Plan
    workers: Workers
    stages: list[dict[str, Any]]

    def close(self) -> None:
        try:
            self.engine.close()
        finally:
            self.workers.stop_all()


def start_session(model: str, engine: str = "llama-rpc", peers_spec: str = "auto", *,
                  token_file: Path | None = None, memory_budget: int | None = None, n_ctx: int = 512,
                  mdns_wait: float = 2.0, head_address: str | None = None, headroom: float = HEADROOM,
                  log: Callable[[str], None] = lambda s: print(s, file=sys.stderr, flush=True),
                  engine_opts: dict[str, Any] | None = None, threads: int | None = None,
                  token: str | None = None, layout: str = "pipeline", expected_load: int = 1,
                  parallel: int | None = None) -> Session:
    """Plan (printed through `log`), launch the workers, start the engine; ServeError (one line) when it cannot.

    `layout` (placement.choose_layout) is "pipeline" here, for callers that name their peers to measure a
    split; `tierkit serve` passes its --layout (auto by default).
    A refusal before the launch starts nothing; after it, every worker launched is stopped again.
    """
    try:
        kind = engines.kind(engine)
    except EngineError as exc:
        raise ServeError(str(exc)) from None
    path = resolve_model(model)
    if path != model:
        log(f"model {model}: {path}")
    model = path
    sizes = model_layout(kind, model, n_ctx)
    found, note = find_peers(peers_spec, mdns_wait)
    others = peer_nodes(found, on_gpu=kind.memory == "gpu")
    head = head_node(memory_budget, head_address or net.route_to(others[0].host if others else "127.0.0.1"),
                     on_gpu=kind.memory == "gpu")
    plan = plan_for(sizes, kind, head, others, headroom, layout, link_cost(sizes, found), expected_load, threads)
    if note:
        log(f"peers: {note}")
    log(render(plan))
    found = found[: len(plan.stages) - 1]     # the peers the plan uses (node order is kept)
    try:
        token = token or (read_token(token_file) if found else None)
    except AgentClientError as exc:
        raise ServeError(str(exc)) from None
    if found and not token:
        raise ServeError("no launch token: pass --token-file (the agents' token file) or set $TIERKIT_AGENT_TOKEN")
    workers = Workers(token, log)
    try:
        stages = kind.load().launch(model, plan, workers, threads, dict(engine_opts or {}))
        eng = _started(kind, model, stages, {"n_ctx": n_ctx, "threads": threads, "parallel": parallel},
                       engine_opts or {})
        return Session(eng, plan, workers, stages)
    except AgentClientError as exc:
        workers.stop_all()
        raise ServeError(str(exc)) from None
    except BaseException:
        workers.stop_all()
        raise


def _started(kind: EngineKind, model: str, stages: list[dict[str, Any]], given: dict[str, Any],
             engine_opts: dict[str, Any]) -> Engine:
    """The head side of the engine over `stages`, started (connected to its workers, the model loaded).
    `given`: the serve settings (n_ctx, threads, parallel); the engine gets those it lists in serve_options."""
    cls = kind.load().ENGINE
    opts = {**{k: given[k] for k in cls.serve_options}, **engine_opts}
    try:
        eng = cls(model, stages, **opts)
    except EngineError as exc:
        raise ServeError(f"{kind.name}: {exc}") from None
    try:
        eng.start()
    except EngineError as exc:
        eng.close()
        raise ServeError(f"{kind.name}: {exc}") from None
    return eng


# ---------------------------------------------------------------- the command

def serve(model: str, *, engine: str = "llama-rpc", peers: str = "auto", host: str = "127.0.0.1", port: int = 8000,
          token_file: Path | None = None, memory_budget: int | None = None, n_ctx: int = 512,
          mdns_wait: float = 2.0, head_address: str | None = None, threads: int | None = None,
          layout: str = "auto", expected_load: int = 1, parallel: str | int | None = None) -> None:
    """Run until SIGINT/SIGTERM; raises ServeError (one line) when it cannot start."""
    from tiers.tier3 import server
    from tiers.tier3.placement import LAYOUTS

    n_parallel = parse_parallel(parallel)
    if layout not in LAYOUTS:
        raise ServeError(f"--layout must be one of {', '.join(LAYOUTS)}, not {layout!r}", 2)
    check_port(host, port)
    session = start_session(model, engine, peers, token_file=token_file, memory_budget=memory_budget, n_ctx=n_ctx,
                            mdns_wait=mdns_wait, head_address=head_address, threads=threads, layout=layout,
                            expected_load=expected_load, parallel=n_parallel)
    try:
        app = server.create_app(session.engine, plan=session.plan.to_dict())
        where = f"http://{host}:{port}/v1"
        server.run(app, host, port, on_ready=lambda: print(
            f"serving {session.engine.model_id} ({engine}, {len(session.stages)} node(s)) at {where}",
            file=sys.stderr, flush=True))
    except OSError as exc:
        raise ServeError(str(exc)) from None
    finally:
        session.close()

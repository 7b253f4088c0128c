"""`tierkit serve`: find the peers, plan, launch the workers through their agents, serve the API.

    peers (mDNS or --peers)  ->  nodes with free memory  ->  placement plan (printed)
        ->  authenticated launches on each agent  ->  engine.start()  ->  HTTP API  ->  stop workers

Each step is a plain function, so B17 and the tests drive the same code as the
command. Engines are built by `make_engine(name, model, stages, **opts)`: one
line per engine in ENGINES.
"""
from __future__ import annotations

import http.client
import importlib
import json
import os
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from tiers.tier3.engine import Engine, EngineError
from tiers.tier3.placement import (HEADROOM, ModelLayout, Node, Plan, PlacementError, layout_from_config,
                                   layout_from_gguf, place, render)

ENGINES: dict[str, tuple[str, str]] = {
    "llama-rpc": ("tiers.tier3.llama_rpc", "LlamaRpcEngine"),
    "pipeline": ("tiers.tier3.pipeline", "PipelineEngine"),
    "vllm": ("tiers.tier3.vllm", "VllmEngine"),
}


class ServeError(Exception):
    """`tierkit serve` cannot go on; str() is one line naming the fix."""


def make_engine(name: str, model_spec: str, stages: list[dict[str, Any]], **opts: Any) -> Engine:
    if name not in ENGINES:
        raise ServeError(f"unknown engine {name!r}: choose one of {', '.join(ENGINES)}")
    module, cls = ENGINES[name]
    try:
        return getattr(importlib.import_module(module), cls)(model_spec, stages, **opts)
    except EngineError as exc:
        raise ServeError(f"{name}: {exc}") from None


# ---------------------------------------------------------------- talking to agents

class AgentClient:
    """The head's side of an agent's /v1/workers API (stdlib http.client; one connection per call)."""

    def __init__(self, host: str, port: int, token: str | None, timeout: float = 10.0, name: str | None = None):
        self.host, self.port, self.token, self.timeout = host, port, token, timeout
        self.name = name or f"{host}:{port}"

    def request(self, method: str, path: str, body: Any = None) -> tuple[int, dict[str, Any]]:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
        headers = {"Content-Type": "application/json"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        try:
            data = json.dumps(body).encode() if body is not None else None
            conn.request(method, path, body=data, headers=headers)
            r = conn.getresponse()
            raw = r.read()
        except OSError as exc:
            raise ServeError(f"agent {self.name} unreachable ({exc.strerror or exc}): is `tierkit agent` running "
                             "there?") from None
        finally:
            conn.close()
        try:
            return r.status, json.loads(raw)
        except ValueError:
            raise ServeError(f"{self.name} answered {r.status} with something that is not JSON: is it a tierkit "
                             "agent?") from None

    def _check(self, status: int, reply: dict[str, Any], what: str) -> dict[str, Any]:
        if status == 401:
            raise ServeError(f"agent {self.name} refused the token ({what}): pass --token-file with that agent's "
                             "token file, or set $TIERKIT_AGENT_TOKEN")
        if status >= 300:
            raise ServeError(f"agent {self.name} refused to {what}: {reply.get('error', status)}")
        return reply

    def launch(self, engine: str, args: dict[str, Any], restart: bool = True) -> dict[str, Any]:
        status, reply = self.request("POST", "/v1/workers", {"engine": engine, "args": args, "restart": restart})
        return self._check(status, reply, f"launch a {engine} worker")["worker"]

    def status(self, wid: str, lines: int = 20) -> dict[str, Any]:
        status, reply = self.request("GET", f"/v1/workers/{wid}?lines={lines}")
        return self._check(status, reply, "report on a worker")["worker"]

    def stop(self, wid: str) -> None:
        try:
            self.request("DELETE", f"/v1/workers/{wid}")
        except ServeError:
            pass  # the node is gone: nothing left to stop

    def wait_ready(self, wid: str, timeout: float = 30.0) -> dict[str, Any]:
        """Until a llama-rpc worker's port accepts; ServeError with its last log lines if it dies first."""
        deadline = time.monotonic() + timeout
        while True:
            w = self.status(wid)
            if w.get("ready"):
                return w
            if w["state"] in ("exited", "stopped") or (w["starts"] > 1 and time.monotonic() > deadline):
                tail = " | ".join(w.get("log", [])[-3:])
                raise ServeError(f"the {w['engine']} worker on {self.name} did not start: {tail}")
            if time.monotonic() > deadline:
                raise ServeError(f"the {w['engine']} worker on {self.name} was not ready within {timeout:g} s")
            time.sleep(0.1)


def read_token(token_file: Path | None) -> str | None:
    """$TIERKIT_AGENT_TOKEN, else --token-file, else the default token file if there is one."""
    from inventory.agent import TOKEN_ENV, AgentError, read_token_file, token_path

    env = os.environ.get(TOKEN_ENV, "").strip()
    if env:
        return env
    path = Path(token_file) if token_file else token_path()
    if token_file is None and not path.exists():
        return None
    try:
        return read_token_file(path)
    except AgentError as exc:
        raise ServeError(str(exc)) from None


# ---------------------------------------------------------------- nodes and the plan

def local_addresses() -> set[str]:
    found = {"127.0.0.1", "0.0.0.0"}
    try:
        import psutil

        for addrs in psutil.net_if_addrs().values():
            found |= {a.address for a in addrs if a.family == socket.AF_INET}
    except Exception:
        pass
    return found


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


def model_layout(engine: str, model: str, n_ctx: int, dtype: str = "float32") -> ModelLayout:
    if engine == "llama-rpc" or model.endswith(".gguf"):
        path = Path(model)
        if not path.is_file():
            raise ServeError(f"{model}: no such GGUF file; pass the path of a .gguf model")
        return layout_from_gguf(path, n_ctx=n_ctx)
    if engine == "pipeline":
        from tiers.tier3 import pipeline

        try:
            src = pipeline.resolve(model)
        except EngineError as exc:
            raise ServeError(str(exc)) from None
        cfg = src.cfg
        if cfg is None:  # a tierkit checkpoint: its config is inside
            import torch

            from models.gpt import GPTConfig

            ckpt = torch.load(src.path, map_location="meta", weights_only=False, mmap=True)
            cfg = GPTConfig(**ckpt["config"]) if isinstance(ckpt.get("config"), dict) else ckpt["config"]
        size = {"float32": 4, "bfloat16": 2, "float16": 2}.get(dtype, 4)
        return layout_from_config(cfg, name=model, dtype_bytes=size, n_ctx=min(n_ctx, cfg.block_size))
    from tiers.tier3 import vllm

    return vllm.model_layout(model, n_ctx)


def plan_for(model: str, engine: str, head: Node, peer_nodes: list[Node], n_ctx: int,
             headroom: float = HEADROOM) -> Plan:
    try:
        layout = model_layout(engine, model, n_ctx)
        plan = place(layout, [head, *peer_nodes], headroom=headroom,
                     last_on="first" if engine == "llama-rpc" else "last")
    except PlacementError as exc:
        raise ServeError(str(exc)) from None
    if engine == "llama-rpc" and plan.stages[0].layers[1] == 0 and len(plan.stages) > 1:
        plan.notes.append("note: the head keeps the embeddings and output on its CPU; all blocks are remote")
    return plan


# ---------------------------------------------------------------- a session

@dataclass
class Session:
    engine: Engine
    plan: Plan
    workers: list[tuple[AgentClient, str]] = field(default_factory=list)
    stages: list[dict[str, Any]] = field(default_factory=list)

    def close(self) -> None:
        try:
            self.engine.close()
        finally:
            for client, wid in self.workers:
                client.stop(wid)


def start_session(model: str, engine: str = "llama-rpc", peers_spec: str = "auto", *,
                  token_file: Path | None = None, memory_budget: int | None = None, n_ctx: int = 512,
                  mdns_wait: float = 2.0, head_address: str | None = None, headroom: float = HEADROOM,
                  log: Callable[[str], None] = lambda s: print(s, file=sys.stderr, flush=True),
                  engine_opts: dict[str, Any] | None = None, threads: int | None = None,
                  token: str | None = None) -> Session:
    """Discover, plan (printed through `log`), launch workers, start the engine. Cleans up on failure."""
    if engine not in ENGINES:
        raise ServeError(f"unknown engine {engine!r}: choose one of {', '.join(ENGINES)}")
    if engine == "llama-rpc" and not Path(model).is_file():
        raise ServeError(f"{model}: no such GGUF file; pass the path of a .gguf model")
    found, note = find_peers(peers_spec, mdns_wait)
    on_gpu = engine == "vllm"
    peer_nodes = []
    for p in found:
        free, basis = free_memory(p.summary, on_gpu)
        peer_nodes.append(Node(p.name or p.address, p.address, p.port, free, "gpu" if on_gpu else "ram", basis))
    head_addr = head_address or _route_to(peer_nodes[0].host if peer_nodes else "127.0.0.1")
    head = head_node(memory_budget, head_addr, on_gpu)
    plan = plan_for(model, engine, head, peer_nodes, n_ctx, headroom)  # a refusal is one line, nothing started
    if note:
        log(f"peers: {note}")
    log(render(plan))
    token = token or (read_token(token_file) if found else None)
    if found and not token:
        raise ServeError("no launch token: pass --token-file (the agents' token file) or set $TIERKIT_AGENT_TOKEN")
    session_workers: list[tuple[AgentClient, str]] = []
    try:
        stages = _launch(engine, model, plan, token, session_workers, log, engine_opts or {}, threads)
        opts = dict(engine_opts or {})
        if engine == "llama-rpc":
            opts.setdefault("n_ctx", n_ctx)
            opts.setdefault("threads", threads)
        eng = make_engine(engine, model, stages, **opts)
        try:
            eng.start()
        except EngineError as exc:
            eng.close()
            raise ServeError(f"{engine}: {exc}") from None
    except BaseException:
        for client, wid in session_workers:
            client.stop(wid)
        raise
    return Session(eng, plan, session_workers, stages)


def _route_to(host: str) -> str:
    """This machine's address on the route to `host` (what the workers should dial back)."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((host, 9))
            return s.getsockname()[0]
    except OSError:
        return "127.0.0.1"


def _launch(engine: str, model: str, plan: Plan, token: str | None, launched: list[tuple[AgentClient, str]],
            log: Callable[[str], None], opts: dict[str, Any], threads: int | None = None) -> list[dict[str, Any]]:
    """Start each peer's worker; return the engine's stages (stage 0 is the head)."""
    head = plan.stages[0]
    stages = [{"name": head.node.name, "host": head.node.host, "port": 0, "layers": list(head.layers)}]
    remote = [s for s in plan.stages[1:] if s.layers[1] > s.layers[0]]
    if engine == "llama-rpc":
        for s in remote:
            client = AgentClient(s.node.host, s.node.port, token, name=s.node.name)
            w = client.launch("llama-rpc", {"host": s.node.host, "port": 0,
                                            **({"threads": threads} if threads else {})})
            launched.append((client, w["id"]))
            w = client.wait_ready(w["id"])
            log(f"worker {w['id']} on {s.node.name}: llama.cpp RPC at {s.node.host}:{w['args']['port']} "
                f"(layers {s.layers[0]}-{s.layers[1] - 1})")
            stages.append({"name": s.node.name, "host": s.node.host, "port": w["args"]["port"],
                           "layers": list(s.layers)})
        return stages
    if engine == "pipeline":
        from tiers.tier3 import pipeline

        if remote:
            stages[0]["port"] = _free_port(head.node.host)
        stages += [{"name": s.node.name, "host": s.node.host, "port": 0, "layers": list(s.layers)} for s in remote]
        for r, s in enumerate(remote, start=1):
            client = AgentClient(s.node.host, s.node.port, token, name=s.node.name)
            extra = {"threads": threads, **opts} if threads else opts
            w = client.launch("pipeline", pipeline.worker_args(model, stages, r, **extra))
            launched.append((client, w["id"]))
            log(f"worker {w['id']} on {s.node.name}: pipeline stage {r} (layers {s.layers[0]}-{s.layers[1] - 1})")
        return stages
    from tiers.tier3 import vllm

    return vllm.launch(plan, token, launched, log, AgentClient)


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------- the command

def serve(model: str, *, engine: str = "llama-rpc", peers: str = "auto", host: str = "127.0.0.1", port: int = 8000,
          token_file: Path | None = None, memory_budget: int | None = None, n_ctx: int = 512,
          mdns_wait: float = 2.0, head_address: str | None = None, threads: int | None = None) -> None:
    """Run until SIGINT/SIGTERM; raises ServeError (one line) when it cannot start."""
    from tiers.tier3 import server

    session = start_session(model, engine, peers, token_file=token_file, memory_budget=memory_budget, n_ctx=n_ctx,
                            mdns_wait=mdns_wait, head_address=head_address, threads=threads)
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

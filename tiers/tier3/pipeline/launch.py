"""Starting pipeline workers: their launch arguments, checked into an argv, and the launch through agents.

    head:   launch(model, plan, workers, ...)   a rendezvous port for stage 0, then for each peer r:
              worker_args(model, stages, r)  -> {"model", "layers", "rank", "world_size", "master", ...}
              -> POST to its agent
    agent:  worker_command(args) -> [python, -m, tiers.tier3.pipeline, worker, --model, ..., --layers, a:b, ...]

The same checks run where the arguments arrive (the agent, before it starts
anything) and where they are used (the worker, on its command line): each
refusal is one line naming the argument.
"""
from __future__ import annotations

import re
import sys
from typing import TYPE_CHECKING, Any

from tiers.tier3 import checks, net
from tiers.tier3.engine import EngineError
from tiers.tier3.pipeline.source import DTYPES, NAME, resolve
from tiers.tier3.placement import Plan, engine_stage

if TYPE_CHECKING:
    from tiers.tier3.client import Workers

WORKER_KEYS = {"model", "layers", "rank", "world_size", "master", "host", "port", "seed", "dtype", "device",
               "timeout", "threads", "backend"}


def check_backend(backend: Any, device: Any) -> None:
    """gloo anywhere; NCCL only between CUDA devices."""
    if backend not in ("gloo", "nccl") or (backend == "nccl" and not str(device).startswith("cuda")):
        raise EngineError(f"backend must be gloo, or nccl with a cuda device, not {backend!r} on {device}")


def check_worker_args(args: Any) -> dict[str, Any]:
    """The launch arguments of one worker, validated and normalised; EngineError (one line) otherwise."""
    checks.known_keys(args, WORKER_KEYS, f"{NAME} worker")
    for key in ("model", "layers", "rank", "world_size", "master"):
        if key not in args:
            raise EngineError(f"pipeline worker args lack {key!r}")
    src = resolve(args["model"])
    a, b = checks.layers(args["layers"])
    if src.cfg is not None and b > src.cfg.n_layer:
        raise EngineError(f"layers {a}:{b} are past the model's {src.cfg.n_layer} layers")
    world = checks.whole(args["world_size"], "world_size", 2, 64)
    rank = checks.whole(args["rank"], "rank", 1, world - 1)   # rank 0 is the head, in the serving process
    mhost, mport = checks.hostport(args["master"], "master")
    out = {"model": args["model"], "layers": [a, b], "rank": rank, "world_size": world,
           "master": f"{mhost}:{mport}" if ":" not in mhost else f"[{mhost}]:{mport}",
           "host": checks.host(args.get("host", "127.0.0.1"), "host"),
           "port": checks.whole(args.get("port", 0), "port", 0, 65535),
           "seed": checks.whole(args.get("seed", 0), "seed", 0, 2**53),
           "dtype": args.get("dtype", "float32"),
           "device": args.get("device", "cpu"),
           "timeout": checks.number(args.get("timeout", 30.0), "timeout", 0.5, 3600),
           "threads": checks.whole(args.get("threads", 0), "threads", 0, 1024),
           "backend": args.get("backend", "gloo")}
    if out["dtype"] not in DTYPES:
        raise EngineError(f"dtype must be one of {', '.join(DTYPES)}, not {out['dtype']!r}")
    if not (isinstance(out["device"], str) and re.fullmatch(r"cpu|cuda(:\d+)?", out["device"])):
        raise EngineError(f"device must be cpu or cuda[:N], not {out['device']!r}")
    check_backend(out["backend"], out["device"])
    return out


def worker_command(args: dict[str, Any]) -> list[str]:
    """The argv an agent runs to host one stage, from validated launch arguments (no shell, this module only).

    args: {"model": spec, "layers": [a, b], "rank": r >= 1, "world_size": W, "master": "HOST:PORT"
    (the head's rendezvous = stage 0's host:port), "host": this worker's address (its interface),
    "port": a status port answering one JSON line (0: none), "seed"?, "dtype"?, "device"?,
    "timeout"? (seconds for any wait on a peer), "threads"? (torch threads; 0: torch's default),
    "backend"? ("gloo" | "nccl")}.
    """
    a = check_worker_args(args)
    return [sys.executable, "-m", "tiers.tier3.pipeline", "worker", "--model", a["model"],
            "--layers", f"{a['layers'][0]}:{a['layers'][1]}", "--rank", str(a["rank"]),
            "--world-size", str(a["world_size"]), "--master", a["master"], "--host", a["host"],
            "--port", str(a["port"]), "--seed", str(a["seed"]), "--dtype", a["dtype"], "--device", a["device"],
            "--timeout", repr(a["timeout"]), "--threads", str(a["threads"]), "--backend", a["backend"]]


def worker_args(model_spec: str, stages: list[dict[str, Any]], rank: int, **opts: Any) -> dict[str, Any]:
    """The launch arguments of worker ``rank`` for the same (model_spec, stages) a PipelineEngine takes."""
    s0, s = stages[0], stages[rank]
    host0 = s0["host"] if ":" not in s0["host"] else f"[{s0['host']}]"
    args = {"model": model_spec, "layers": list(s["layers"]), "rank": rank, "world_size": len(stages),
            "master": f"{host0}:{s0['port']}", "host": s["host"], "port": s.get("port", 0)}
    args.update({k: v for k, v in opts.items() if k in WORKER_KEYS and v is not None})
    return args


def launch(model: str, plan: Plan, workers: Workers, threads: int | None, opts: dict[str, Any]) -> list[dict[str, Any]]:
    """Stage r's worker on each peer that holds layers; stage 0 (the head) listens for their rendezvous."""
    head = plan.stages[0]
    remote = [s for s in plan.stages[1:] if s.layers[1] > s.layers[0]]
    stages = [engine_stage(head, net.free_port(head.node.host) if remote else 0)]
    stages += [engine_stage(s) for s in remote]
    extra = {"threads": threads, **opts} if threads else opts
    for r, s in enumerate(remote, start=1):
        _, w = workers.launch(s.node, NAME, worker_args(model, stages, r, **extra))
        workers.log(f"worker {w['id']} on {s.node.name}: pipeline stage {r} (layers {s.layers[0]}-{s.layers[1] - 1})")
    return stages

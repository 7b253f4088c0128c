"""The engines, listed once: a name, the module that implements it, and what placement must know of it.

    ENGINES["pipeline"].load()  ->  tiers.tier3.pipeline, which provides
        ENGINE                                           the Engine class (head side, in the serving process)
        worker_command(args) -> argv                     what an agent runs for a launch request (args checked)
        layout(model, n_ctx) -> ModelLayout              the bytes placement divides among the nodes
        launch(model, plan, workers, threads, opts)      the peers' workers started through their agents
            -> stages                                    (what ENGINE(model, stages, **opts) is built with)

The agent, `tierkit serve` and the benchmarks all look engines up here.
Modules are imported when used: each pulls in its own framework (llama.cpp,
torch, an HTTP client for vLLM), and a node without one still runs the others.
Adding an engine: one module with those four names, one line in ENGINES.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from tiers.tier3.engine import Engine, EngineError


@dataclass(frozen=True)
class EngineKind:
    name: str
    module: str
    memory: str = "ram"       # what placement divides: "ram" (available RAM) | "gpu" (free GPU memory)
    output_on: str = "last"   # the stage holding the output projection: "first" (the head) | "last"
    # Its worker serves an unauthenticated protocol on args host:port: the agent binds it where the agent
    # itself is bound unless told otherwise, picks a free port for port 0, and calls it ready once it accepts.
    listens: bool = False

    def load(self) -> ModuleType:
        """The engine's module; ImportError when this node lacks what it needs."""
        return importlib.import_module(self.module)


ENGINES: dict[str, EngineKind] = {k.name: k for k in (
    # llama.cpp keeps the embeddings and the output on the head's CPU and offloads the last layers.
    EngineKind("llama-rpc", "tiers.tier3.llama_rpc", output_on="first", listens=True),
    EngineKind("pipeline", "tiers.tier3.pipeline"),
    EngineKind("vllm", "tiers.tier3.vllm", memory="gpu"),
)}


def kind(name: str) -> EngineKind:
    """The engine called `name`; EngineError (one line) listing the known ones otherwise."""
    if name not in ENGINES:
        raise EngineError(f"unknown engine {name!r}: choose one of {', '.join(ENGINES)}")
    return ENGINES[name]


def make(name: str, model: str, stages: list[dict[str, Any]], **opts: Any) -> Engine:
    """The head side of engine `name` over `stages` (not started); EngineError when it refuses them."""
    return kind(name).load().ENGINE(model, stages, **opts)

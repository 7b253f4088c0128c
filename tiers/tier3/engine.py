"""The one interface every tier-3 engine implements, so the server needs to know none of them.

    head side:  engine = engines.make(name, model, stages); engine.start();
                engine.generate(ids, sampling) -> iterator of Piece; engine.close()
    worker side: an agent starts `worker_command(args)` of the engine named in an authenticated
                 launch request; the engine validates the arguments (the agent never runs anything else)

The engines themselves (llama.cpp RPC, the torch pipeline, vLLM) are listed once, in engines.py.

Errors the server turns into HTTP answers:
- ``EngineUnavailable``: a peer was lost or is not up yet -> 503; the server stays up.
- ``EngineError``: anything else the engine refuses (a prompt longer than the context, ...) -> 400.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any


class EngineError(Exception):
    """A request the engine refuses; str() is one line for the client (HTTP 400)."""


class EngineUnavailable(EngineError):
    """A worker is gone or not ready; str() names which and what to do (HTTP 503)."""


@dataclass
class Sampling:
    max_tokens: int = 16
    temperature: float = 1.0     # 0: greedy
    top_p: float = 1.0
    top_k: int | None = None
    seed: int | None = None
    stop: list[str] = field(default_factory=list)


@dataclass
class Piece:
    """One step of a generation: the text it adds and the token id(s) it came from."""

    text: str
    token_ids: list[int]
    finish_reason: str | None = None   # set on the last piece: "stop" | "length"


class StopScanner:
    """Feeds text through, cutting at the first stop string and holding back a tail that may start one.

        scan = StopScanner(["\n\n"]); scan.feed("a\n") -> "a" (the "\n" may begin a stop);
        scan.feed("\nb") -> "" and scan.hit; at the end, scan.flush() gives what is still held
    """

    def __init__(self, stops: list[str]) -> None:
        self.stops = [s for s in stops if s]
        self.held = ""
        self.hit = False

    def feed(self, text: str) -> str:
        if not self.stops:
            return text
        buf = self.held + text
        cut = min((i for i in (buf.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.hit, self.held = True, ""
            return buf[:cut]
        keep = max((k for s in self.stops for k in range(1, len(s)) if buf.endswith(s[:k])), default=0)
        self.held = buf[len(buf) - keep:] if keep else ""
        return buf[:len(buf) - keep]

    def flush(self) -> str:
        out, self.held = self.held, ""
        return out


class Engine(ABC):
    """A model served by one or more nodes. Thread-safe: the server calls generate() from many threads."""

    name: str = ""        # "llama-rpc" | "pipeline" | "vllm"
    model_id: str = ""    # what /v1/models lists
    # `tierkit serve` settings the engine takes as keyword options (n_ctx, threads), when given.
    serve_options: tuple[str, ...] = ()

    @abstractmethod
    def start(self) -> None:
        """Connect to the workers (already launched through the agents) and load the model."""

    @abstractmethod
    def tokenize(self, text: str) -> list[int]: ...

    @abstractmethod
    def chat_prompt(self, messages: list[dict[str, str]]) -> str:
        """The model's chat template applied to OpenAI-style messages, ending where the assistant speaks."""

    @abstractmethod
    def generate(self, prompt_ids: list[int], sampling: Sampling) -> Iterator[Piece]:
        """Yield pieces as they are produced. Raises EngineUnavailable if a worker is lost mid-way."""

    @abstractmethod
    def stats(self) -> dict[str, Any]:
        """For /metrics: tokens/s, per-stage latency, bytes per hop, ... (JSON-able)."""

    def health(self) -> dict[str, Any]:
        """For /health: {"ok": bool, "workers": [...]}; ok False turns /health into a 503."""
        return {"ok": True}

    def close(self) -> None:
        """Release the workers' connections; safe to call twice."""

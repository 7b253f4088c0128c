"""The OpenAI-compatible HTTP API on the head node, over any Engine.

    GET  /v1/models                 the one model served
    POST /v1/completions            prompt -> text           ("stream": true -> server-sent events)
    POST /v1/chat/completions       messages -> message      (the model's chat template)
    GET  /health                    200 when every worker is up, else 503
    GET  /metrics                   tokens/s, latency per token and per stage, bytes per hop (JSON)
    POST /tokenize                  as vLLM's: {"prompt"} -> {"tokens", "count"}

Requests are validated by hand rather than by pydantic models, so that every
refusal is one line in OpenAI's error shape, {"error": {"message", "type",
"param", "code"}}: malformed -> 400, a lost peer -> 503 (the server stays up
and the next request tries again). A streamed response that loses its peer
half-way ends with an error event instead of `data: [DONE]`, which the
official client raises as an APIError.

Stop strings are applied here, for every engine, holding back any tail of the
text that could still become a stop string.
"""
# No `from __future__ import annotations`: FastAPI reads the handlers' annotations at runtime.
import json
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

from tiers.tier3.engine import Engine, EngineError, EngineUnavailable, Piece, Sampling, StopScanner

MAX_TOKENS_DEFAULT = 16
MAX_BODY = 1 << 20
ADMIT_THREADS = 256   # requests waiting for the engine at once; more wait without a thread


class BadRequest(Exception):
    def __init__(self, message: str, param: str | None = None, status: int = 400, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.param, self.status, self.kind = param, status, kind


def error_body(message: str, kind: str, param: str | None = None, code: Any = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


# ---------------------------------------------------------------- request validation

def _number(body: dict, key: str, default: float, lo: float, hi: float) -> float:
    v = body.get(key, default)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not lo <= v <= hi:
        raise BadRequest(f"{key} must be a number in [{lo:g}, {hi:g}], got {v!r}", key)
    return float(v)


def _int(body: dict, key: str, default: int | None, lo: int, hi: int) -> int | None:
    v = body.get(key, default)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise BadRequest(f"{key} must be a whole number in [{lo}, {hi}], got {v!r}", key)
    return v


def sampling_from(body: dict[str, Any], max_tokens_key: str = "max_tokens") -> Sampling:
    if body.get("n", 1) != 1:
        raise BadRequest("only n=1 is supported", "n")
    max_tokens = body.get(max_tokens_key)
    if max_tokens is None and max_tokens_key != "max_tokens":
        max_tokens = body.get("max_tokens")
    if max_tokens is None:
        max_tokens = MAX_TOKENS_DEFAULT
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or not 1 <= max_tokens <= 1 << 20:
        raise BadRequest(f"max_tokens must be a whole number >= 1, got {max_tokens!r}", "max_tokens")
    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
        raise BadRequest("stop must be a non-empty string or a list of up to 4 of them", "stop")
    return Sampling(max_tokens=max_tokens, temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
                    top_p=_number(body, "top_p", 1.0, 0.0, 1.0) or 1.0,
                    top_k=_int(body, "top_k", None, 0, 1 << 20) or None,
                    seed=_int(body, "seed", None, -(1 << 63), (1 << 64) - 1), stop=stop)


def _bool(body: dict, key: str) -> bool:
    v = body.get(key, False)
    if v is None:
        return False
    if not isinstance(v, bool):
        raise BadRequest(f"{key} must be true or false, got {v!r}", key)
    return v


def _include_usage(body: dict) -> bool:
    """stream_options.include_usage: a last streamed chunk with no choices and the token counts."""
    opts = body.get("stream_options")
    if opts is None:
        return False
    if not isinstance(opts, dict):
        raise BadRequest(f"stream_options must be an object, got {opts!r}", "stream_options")
    if not _bool(body, "stream"):
        raise BadRequest("stream_options is only allowed with stream: true", "stream_options")
    return _bool(opts, "include_usage")


def prompt_ids(engine: Engine, body: dict[str, Any]) -> list[int]:
    """prompt: a string, a list of token ids, or a one-element list of either."""
    p = body.get("prompt")
    if isinstance(p, list) and len(p) == 1 and isinstance(p[0], (str, list)):
        p = p[0]
    if isinstance(p, str):
        if not p:
            raise BadRequest("prompt is empty", "prompt")
        return engine.tokenize(p)
    if isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in p):
        return list(p)
    raise BadRequest("prompt must be a non-empty string or a list of token ids (one prompt per request)", "prompt")


def chat_messages(body: dict[str, Any]) -> list[dict[str, str]]:
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise BadRequest("messages must be a non-empty list of {role, content}", "messages")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant", "developer", "tool"):
            raise BadRequest(f"messages[{i}] needs a role of system, user, assistant, developer or tool", "messages")
        content = m.get("content")
        if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
            if not all(isinstance(c, dict) and c.get("type") == "text" and isinstance(c.get("text"), str)
                       for c in content):
                raise BadRequest(f"messages[{i}].content: only text parts are supported", "messages")
            content = "".join(c["text"] for c in content)
        if not isinstance(content, str):
            raise BadRequest(f"messages[{i}].content must be a string", "messages")
        out.append({"role": "system" if m["role"] == "developer" else m["role"], "content": content})
    return out


# ---------------------------------------------------------------- the app

class Counters:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.requests: dict[str, int] = {}
        self.completion_tokens = 0
        self.prompt_tokens = 0
        self.in_flight = 0
        self.started = time.time()
        self.busy_s = 0.0

    def count(self, key: str) -> None:
        with self.lock:
            self.requests[key] = self.requests.get(key, 0) + 1


def _refusal(exc: Exception) -> tuple[int, str, str | None]:
    """(HTTP status, OpenAI error type, param) for what a request or the engine refused."""
    if isinstance(exc, BadRequest):
        return exc.status, exc.kind, exc.param
    if isinstance(exc, EngineUnavailable):
        return 503, "service_unavailable", None
    return 400, "invalid_request_error", None


def create_app(engine: Engine, *, title: str = "tierkit serve", plan: dict[str, Any] | None = None):
    """A FastAPI app serving `engine` (already started)."""
    from fastapi import FastAPI, Request
    from starlette.exceptions import HTTPException as StarletteHTTPException

    app = FastAPI(title=title, docs_url=None, redoc_url=None, openapi_url=None)
    api = _Api(engine, plan)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        msg = (f"no such endpoint: {request.url.path} (try /v1/models, /v1/completions, /v1/chat/completions, "
               "/health, /metrics)") if exc.status_code == 404 else str(exc.detail)
        return api.err(exc.status_code, msg, kind)

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception):
        return api.err(500, f"internal error: {type(exc).__name__}", "server_error")

    app.get("/v1/models")(api.models)
    app.get("/health")(api.health)
    app.get("/metrics")(api.metrics)

    @app.post("/tokenize")
    async def tokenize(request: Request):
        """vLLM's extra endpoint: {"prompt"} -> {"tokens", "count"} (a VllmEngine can front this server)."""
        return await api.tokenize(request)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await api.complete(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await api.complete(request, chat=True)

    return app


class _Api:
    """What the routes do, over one engine: each request validated, run on a worker thread, counted."""

    def __init__(self, engine: Engine, plan: dict[str, Any] | None) -> None:
        import anyio
        from fastapi.responses import JSONResponse, StreamingResponse

        self.engine, self.plan = engine, plan
        self.anyio, self.JSONResponse, self.StreamingResponse = anyio, JSONResponse, StreamingResponse
        self.counters = Counters()
        self.created = int(time.time())
        self.admit: Any = None   # the admission limiter, made inside the event loop on first use

    def err(self, status: int, message: str, kind: str, param: str | None = None) -> Any:
        self.counters.count(str(status))
        return self.JSONResponse(error_body(message, kind, param, status), status_code=status)

    def refuse(self, exc: Exception) -> Any:
        status, kind, param = _refusal(exc)
        return self.err(status, str(exc), kind, param)

    async def body_of(self, request: Any) -> dict[str, Any]:
        raw = await request.body()
        if len(raw) > MAX_BODY:
            raise BadRequest(f"body over {MAX_BODY} bytes", status=413)
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            raise BadRequest("the body is not valid JSON") from None
        if not isinstance(body, dict):
            raise BadRequest("the body must be a JSON object")
        model = body.get("model")
        if model is not None and not isinstance(model, str):
            raise BadRequest("model must be a string", "model")
        if model and model != self.engine.model_id:
            raise BadRequest(f"model {model!r} is not served here; this server has {self.engine.model_id!r}",
                             "model", status=404, kind="not_found_error")
        return body

    async def models(self):
        self.counters.count("models")
        return {"object": "list", "data": [{"id": self.engine.model_id, "object": "model", "created": self.created,
                                            "owned_by": f"tierkit/{self.engine.name}"}]}

    async def health(self):
        h = await self.anyio.to_thread.run_sync(self.engine.health)
        return self.JSONResponse({"engine": self.engine.name, "model": self.engine.model_id, **h},
                                 status_code=200 if h.get("ok") else 503)

    async def metrics(self):
        c = self.counters
        with c.lock:
            own = {"uptime_s": time.time() - c.started, "requests": dict(c.requests), "in_flight": c.in_flight,
                   "prompt_tokens": c.prompt_tokens, "completion_tokens": c.completion_tokens,
                   "completion_tokens_per_s_busy": c.completion_tokens / c.busy_s if c.busy_s else None}
        return {"server": own, "engine": await self.anyio.to_thread.run_sync(self.engine.stats), "plan": self.plan}

    async def tokenize(self, request: Any):
        try:
            body = await self.body_of(request)
            ids = await self.anyio.to_thread.run_sync(prompt_ids, self.engine, body)
        except (BadRequest, EngineError) as exc:
            return self.refuse(exc)
        return {"tokens": ids, "count": len(ids)}

    async def complete(self, request: Any, chat: bool):
        to_thread = self.anyio.to_thread.run_sync
        try:
            body = await self.body_of(request)
            sampling = sampling_from(body, "max_completion_tokens" if chat else "max_tokens")
            stream = _bool(body, "stream")
            want_ids = _bool(body, "return_token_ids")
            include_usage = _include_usage(body)
            if chat:
                prompt = await to_thread(self.engine.chat_prompt, chat_messages(body))
                ids = await to_thread(self.engine.tokenize, prompt)
            else:
                ids = await to_thread(prompt_ids, self.engine, body)
            gen = await to_thread(self.engine.generate, ids, sampling)
            # The first piece may wait for the engine (llama.cpp runs one request at a time): those waits
            # get threads of their own, so they never starve the steps of the request being served.
            if self.admit is None:
                self.admit = self.anyio.CapacityLimiter(ADMIT_THREADS)
            first = await to_thread(_next, gen, limiter=self.admit)  # a 503/400 before any byte
        except (BadRequest, EngineError) as exc:
            return self.refuse(exc)
        self.counters.count("chat" if chat else "completions")
        reply = _Reply(self, _Pieces(gen, first, sampling.stop), chat, ids, want_ids)
        reply.include_usage = include_usage
        if not stream:
            return await reply.whole()
        return self.StreamingResponse(reply.events(), media_type="text/event-stream",
                                      headers={"Cache-Control": "no-cache"})


_END = object()


def _next(it: Iterator[Piece]) -> Any:
    return next(it, _END)


class _Pieces:
    """The engine's pieces with the stop strings applied; close() releases the engine at once."""

    def __init__(self, gen: Iterator[Piece], first: Any, stops: list[str]) -> None:
        self.gen, self.pending, self.scan = gen, first, StopScanner(stops)
        self.tokens: list[int] = []
        self.finish: str | None = None
        self.t0 = time.perf_counter()

    def step(self) -> tuple[str, bool]:
        """(text, done). Runs in a worker thread: next() on the engine blocks."""
        piece = self.pending if self.pending is not None else _next(self.gen)
        self.pending = None
        if piece is _END:
            self.finish = self.finish or "length"
            return self.scan.flush(), True
        self.tokens += piece.token_ids
        text = self.scan.feed(piece.text)
        if self.scan.hit:
            self.finish = "stop"
            self.close()
            return text, True
        if piece.finish_reason:
            self.finish = piece.finish_reason
            return text + self.scan.flush(), True
        return text, False

    def close(self) -> None:
        close = getattr(self.gen, "close", None)
        if close:
            close()


class _Reply:
    """One completion's answer, whole (JSON) or streamed (server-sent events); the engine released either way."""

    def __init__(self, api: _Api, pieces: _Pieces, chat: bool, ids: list[int], want_ids: bool) -> None:
        self.api, self.pieces, self.chat, self.ids, self.want_ids = api, pieces, chat, ids, want_ids
        self.rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        self.model = api.engine.model_id
        self.include_usage = False

    def _begin(self) -> None:
        with self.api.counters.lock:
            self.api.counters.in_flight += 1

    async def _release(self) -> None:
        """End of a request, however it ended. Shielded: when the client hangs up, the request's task is
        cancelled, and the engine must still be told to stop (it holds the model until the generator closes)."""
        anyio, c, pieces = self.api.anyio, self.api.counters, self.pieces
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(pieces.close)
        with c.lock:
            c.in_flight -= 1
            c.prompt_tokens += len(self.ids)
            c.completion_tokens += len(pieces.tokens)
            c.busy_s += time.perf_counter() - pieces.t0

    def _usage(self) -> dict[str, int]:
        n, m = len(self.ids), len(self.pieces.tokens)
        return {"prompt_tokens": n, "completion_tokens": m, "total_tokens": n + m}

    async def whole(self) -> Any:
        text = []
        self._begin()
        try:
            while True:
                t, done = await self.api.anyio.to_thread.run_sync(self.pieces.step)
                text.append(t)
                if done:
                    break
        except EngineError as exc:
            return self.api.refuse(exc)
        finally:
            await self._release()
        out, finish = "".join(text), self.pieces.finish
        choice: dict[str, Any] = ({"index": 0, "message": {"role": "assistant", "content": out},
                                   "finish_reason": finish, "logprobs": None} if self.chat else
                                  {"index": 0, "text": out, "finish_reason": finish, "logprobs": None})
        if self.want_ids:
            choice["token_ids"] = self.pieces.tokens
        return self.api.JSONResponse({"id": self.rid, "object": "chat.completion" if self.chat else "text_completion",
                                      "created": int(time.time()), "model": self.model, "choices": [choice],
                                      "usage": self._usage()})

    def _chunk(self, created: int, text: str | None, finish: str | None, first: bool = False,
               tokens: list[int] | None = None) -> bytes:
        if self.chat:
            delta: dict[str, Any] = {"role": "assistant"} if first else {}
            if text is not None:
                delta["content"] = text
            choice: dict[str, Any] = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
        else:
            choice = {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}
        if self.want_ids and tokens is not None:
            choice["token_ids"] = tokens
        return _event({"id": self.rid, "object": "chat.completion.chunk" if self.chat else "text_completion",
                       "created": created, "model": self.model, "choices": [choice]})

    async def events(self) -> AsyncIterator[bytes]:
        created, pieces = int(time.time()), self.pieces
        self._begin()
        try:
            if self.chat:
                yield self._chunk(created, "", None, first=True)
            seen = 0
            while True:
                try:
                    text, done = await self.api.anyio.to_thread.run_sync(pieces.step)
                except EngineError as exc:
                    status, kind, _ = _refusal(exc)
                    self.api.counters.count(str(status))
                    yield _event(error_body(str(exc), kind, None, status))
                    return
                new = pieces.tokens[seen:]
                seen = len(pieces.tokens)
                if text or (self.want_ids and new):
                    yield self._chunk(created, text, None, tokens=new)
                if done:
                    yield self._chunk(created, None if self.chat else "", pieces.finish)
                    if self.include_usage:
                        yield _event({"id": self.rid, "created": created, "model": self.model, "choices": [],
                                      "object": "chat.completion.chunk" if self.chat else "text_completion",
                                      "usage": self._usage()})
                    yield b"data: [DONE]\n\n"
                    return
        finally:
            await self._release()


def _event(payload: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


def run(app: Any, host: str, port: int, *, on_ready: Any = None, log_level: str = "warning") -> None:
    """Serve until SIGINT/SIGTERM (uvicorn's handlers); on_ready() once the socket listens."""
    import uvicorn

    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=False,
                            timeout_keep_alive=30, lifespan="off")
    class _Server(uvicorn.Server):
        # uvicorn re-raises a captured SIGTERM/SIGINT after shutting down, which would kill the
        # process before the caller stops its workers; forget it, the caller exits normally.
        def handle_exit(self, sig: int, frame: Any) -> None:
            super().handle_exit(sig, frame)
            self._captured_signals.clear()

    server = _Server(config)
    if on_ready is not None:
        def watch() -> None:
            while not server.started and not server.should_exit:
                time.sleep(0.05)
            if server.started:
                on_ready()
        threading.Thread(target=watch, daemon=True).start()
    server.run()
    if not server.started:
        raise OSError(f"could not listen on {host}:{port}: is the port in use? pass --port")

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

from tiers.tier3.engine import Engine, EngineError, EngineUnavailable, Piece, Sampling

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
                    top_p=_number(body, "top_p", 1.0, 0.0, 1.0) or 1.0, top_k=_int(body, "top_k", None, 0, 1 << 20) or None,
                    seed=_int(body, "seed", None, -(1 << 63), (1 << 64) - 1), stop=stop)


def _bool(body: dict, key: str) -> bool:
    v = body.get(key, False)
    if v is None:
        return False
    if not isinstance(v, bool):
        raise BadRequest(f"{key} must be true or false, got {v!r}", key)
    return v


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


# ---------------------------------------------------------------- stop strings

class StopScanner:
    """Feeds text through, cutting at the first stop string and holding back a tail that may start one."""

    def __init__(self, stops: list[str]) -> None:
        self.stops = stops
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


def create_app(engine: Engine, *, title: str = "tierkit serve", plan: dict[str, Any] | None = None):
    """A FastAPI app serving `engine` (already started)."""
    import anyio
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    app = FastAPI(title=title, docs_url=None, redoc_url=None, openapi_url=None)
    counters = Counters()
    created = int(time.time())
    admit: list[Any] = [None]   # the admission limiter, made inside the event loop on first use

    def err(status: int, message: str, kind: str, param: str | None = None) -> JSONResponse:
        counters.count(str(status))
        return JSONResponse(error_body(message, kind, param, status), status_code=status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        msg = (f"no such endpoint: {request.url.path} (try /v1/models, /v1/completions, /v1/chat/completions, "
               "/health, /metrics)") if exc.status_code == 404 else str(exc.detail)
        return err(exc.status_code, msg, kind)

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception):
        return err(500, f"internal error: {type(exc).__name__}", "server_error")

    async def body_of(request: Request) -> dict[str, Any]:
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
        if model and model != engine.model_id:
            raise BadRequest(f"model {model!r} is not served here; this server has {engine.model_id!r}",
                             "model", status=404, kind="not_found_error")
        return body

    @app.get("/v1/models")
    async def models():
        counters.count("models")
        return {"object": "list", "data": [{"id": engine.model_id, "object": "model", "created": created,
                                            "owned_by": f"tierkit/{engine.name}"}]}

    @app.get("/health")
    async def health():
        h = await anyio.to_thread.run_sync(engine.health)
        return JSONResponse({"engine": engine.name, "model": engine.model_id, **h}, status_code=200 if h.get("ok") else 503)

    @app.get("/metrics")
    async def metrics():
        with counters.lock:
            up = time.time() - counters.started
            own = {"uptime_s": up, "requests": dict(counters.requests), "in_flight": counters.in_flight,
                   "prompt_tokens": counters.prompt_tokens, "completion_tokens": counters.completion_tokens,
                   "completion_tokens_per_s_busy": counters.completion_tokens / counters.busy_s if counters.busy_s else None}
        return {"server": own, "engine": await anyio.to_thread.run_sync(engine.stats), "plan": plan}

    async def complete(request: Request, chat: bool):
        try:
            body = await body_of(request)
            sampling = sampling_from(body, "max_completion_tokens" if chat else "max_tokens")
            stream = _bool(body, "stream")
            want_ids = _bool(body, "return_token_ids")
            if chat:
                msgs = chat_messages(body)
                prompt = await anyio.to_thread.run_sync(engine.chat_prompt, msgs)
                ids = await anyio.to_thread.run_sync(engine.tokenize, prompt)
            else:
                ids = await anyio.to_thread.run_sync(prompt_ids, engine, body)
            gen = await anyio.to_thread.run_sync(engine.generate, ids, sampling)
            # The first piece may wait for the engine (llama.cpp runs one request at a time): those waits
            # get threads of their own, so they never starve the steps of the request being served.
            if admit[0] is None:
                admit[0] = anyio.CapacityLimiter(ADMIT_THREADS)
            first = await anyio.to_thread.run_sync(_next, gen, limiter=admit[0])  # a 503/400 before any byte
        except BadRequest as exc:
            return err(exc.status, str(exc), exc.kind, exc.param)
        except EngineUnavailable as exc:
            return err(503, str(exc), "service_unavailable")
        except EngineError as exc:
            return err(400, str(exc), "invalid_request_error")
        counters.count("chat" if chat else "completions")
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        pieces = _Pieces(gen, first, sampling.stop)
        if not stream:
            return await _whole(anyio, JSONResponse, pieces, rid, chat, ids, want_ids, counters, engine, err)
        return StreamingResponse(_sse(anyio, pieces, rid, chat, ids, want_ids, counters, engine),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    @app.post("/tokenize")
    async def tokenize(request: Request):
        """vLLM's extra endpoint: {"prompt"} -> {"tokens", "count"} (a VllmEngine can front this server)."""
        try:
            body = await body_of(request)
            ids = await anyio.to_thread.run_sync(prompt_ids, engine, body)
        except BadRequest as exc:
            return err(exc.status, str(exc), exc.kind, exc.param)
        except EngineError as exc:
            return err(400, str(exc), "invalid_request_error")
        return {"tokens": ids, "count": len(ids)}

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await complete(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await complete(request, chat=True)

    app.state.counters = counters
    return app


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


def _usage(ids: list[int], pieces: _Pieces) -> dict[str, int]:
    return {"prompt_tokens": len(ids), "completion_tokens": len(pieces.tokens),
            "total_tokens": len(ids) + len(pieces.tokens)}


def _account(counters: Counters, ids: list[int], pieces: _Pieces) -> None:
    with counters.lock:
        counters.prompt_tokens += len(ids)
        counters.completion_tokens += len(pieces.tokens)
        counters.busy_s += time.perf_counter() - pieces.t0


async def _release(anyio, pieces: _Pieces, counters: Counters, ids: list[int]) -> None:
    """End of a request, however it ended. Shielded: when the client hangs up, the request's task is
    cancelled, and the engine must still be told to stop (it holds the model until the generator closes)."""
    with anyio.CancelScope(shield=True):
        await anyio.to_thread.run_sync(pieces.close)
    with counters.lock:
        counters.in_flight -= 1
    _account(counters, ids, pieces)


async def _whole(anyio, JSONResponse, pieces: _Pieces, rid: str, chat: bool, ids: list[int], want_ids: bool,
                 counters: Counters, engine: Engine, err):
    text = []
    with counters.lock:
        counters.in_flight += 1
    try:
        while True:
            t, done = await anyio.to_thread.run_sync(pieces.step)
            text.append(t)
            if done:
                break
    except EngineUnavailable as exc:
        return err(503, str(exc), "service_unavailable")
    except EngineError as exc:
        return err(400, str(exc), "invalid_request_error")
    finally:
        await _release(anyio, pieces, counters, ids)
    out = "".join(text)
    choice: dict[str, Any] = ({"index": 0, "message": {"role": "assistant", "content": out},
                               "finish_reason": pieces.finish, "logprobs": None} if chat else
                              {"index": 0, "text": out, "finish_reason": pieces.finish, "logprobs": None})
    if want_ids:
        choice["token_ids"] = pieces.tokens
    return JSONResponse({"id": rid, "object": "chat.completion" if chat else "text_completion",
                         "created": int(time.time()), "model": engine.model_id, "choices": [choice],
                         "usage": _usage(ids, pieces)})


async def _sse(anyio, pieces: _Pieces, rid: str, chat: bool, ids: list[int], want_ids: bool,
               counters: Counters, engine: Engine) -> AsyncIterator[bytes]:
    created = int(time.time())
    obj = "chat.completion.chunk" if chat else "text_completion"

    def event(payload: dict[str, Any]) -> bytes:
        return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"

    def chunk(text: str | None, finish: str | None, first: bool = False, tokens: list[int] | None = None) -> bytes:
        if chat:
            delta: dict[str, Any] = {}
            if first:
                delta["role"] = "assistant"
            if text is not None:
                delta["content"] = text
            choice: dict[str, Any] = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
        else:
            choice = {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}
        if want_ids and tokens is not None:
            choice["token_ids"] = tokens
        return event({"id": rid, "object": obj, "created": created, "model": engine.model_id, "choices": [choice]})

    with counters.lock:
        counters.in_flight += 1
    try:
        if chat:
            yield chunk("", None, first=True)
        seen = 0
        while True:
            try:
                text, done = await anyio.to_thread.run_sync(pieces.step)
            except EngineError as exc:
                kind = "service_unavailable" if isinstance(exc, EngineUnavailable) else "invalid_request_error"
                code = 503 if isinstance(exc, EngineUnavailable) else 400
                counters.count(str(code))
                yield event(error_body(str(exc), kind, None, code))
                return
            new = pieces.tokens[seen:]
            seen = len(pieces.tokens)
            if text or (want_ids and new):
                yield chunk(text, None, tokens=new)
            if done:
                yield chunk(None if chat else "", pieces.finish)
                yield b"data: [DONE]\n\n"
                return
    finally:
        await _release(anyio, pieces, counters, ids)


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

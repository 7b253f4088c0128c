"""The head of a pipeline: stage 0 in the serving process, and the scheduler that keeps the pipe full.

    generate(ids) -> a request in the inbox -> _Stream (pieces as its tokens arrive)
    the scheduler thread, one epoch at a time:
        connect: every worker idle at the rendezvous -> a fresh process group (epoch N)
        serve:   admit new requests (between steps; an idle engine lets a burst finish arriving first)
                 -> take a micro-batch from the ready ones: each decoding request's next token,
                    prompt chunks up to `prefill_chunk` positions (4x while none decodes),
                    at most 1/W of the active requests
                 -> stage 0 on it, send it on (up to `depth` micro-batches in the pipe)
                 -> the oldest reply (first in, first out) -> its tokens delivered -> ready again or finished
        a lost stage ends the epoch: every request in flight gets EngineUnavailable (HTTP 503),
        and connect waits for every worker to be back (their agents restart them)

Continuous batching: a decode step reads every weight once for all the requests in
it, which is what CPU decode is bound by. Each request keeps its own KV cache on
every stage (stage.py's ragged batch), so requests join and leave between steps.
With W stages the active requests are cut into W or more micro-batches: stage 1
computes one while the head computes the next. A long prompt goes in chunks, each
riding along with the other requests' decode tokens, so they keep streaming.
"""
from __future__ import annotations

import queue
import secrets
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tiers.tier3 import checks
from tiers.tier3.engine import Engine, EngineError, EngineUnavailable, Piece, Sampling, StopScanner
from tiers.tier3.pipeline.launch import check_backend
from tiers.tier3.pipeline.source import NAME, load_stage, resolve, torch_dtype, vocabulary
from tiers.tier3.pipeline.stage import StageRunner
from tiers.tier3.pipeline.stats import PipelineStats
from tiers.tier3.pipeline.wire import (
    H_OP,
    H_RID,
    H_T,
    HDR,
    OP_CLOSE,
    OP_FREE,
    OP_PING,
    REPLY,
    Link,
    LinkDown,
    Wire,
    make_group,
    serve_store,
    short_error,
)


@dataclass
class _Request:
    rid: int
    prompt: list[int]
    sampling: Sampling
    max_new: int
    max_len: int
    seed: int
    out: queue.Queue = field(default_factory=queue.Queue)
    pos: int = 0               # positions already in the caches
    last: int = -1             # the token to feed next
    produced: int = 0
    cancelled: bool = False
    finished: bool = False


@dataclass
class _Flight:
    """A message in the pipe: the micro-batch it steps (None for FREE/PING/CLOSE) and its posted reply."""

    batch: list[tuple[_Request, list[int]]] | None
    work: Any
    reply: Any
    t: float
    shape: Any       # (positions per entry, decoding entries): what the stats count
    sent: int


class _Stream:
    """What generate() returns: pieces as the tokens arrive; closing it (or dropping it) cancels the request."""

    def __init__(self, engine: PipelineEngine, req: _Request):
        self.engine, self.req = engine, req
        self.ids: list[int] = []
        self.decoded = ""
        self.scan = StopScanner(req.sampling.stop or [])
        self.done = False

    def __iter__(self) -> _Stream:
        return self

    def __next__(self) -> Piece:
        if self.done:
            raise StopIteration
        try:
            kind, value, reason = self.req.out.get()
        except BaseException:
            self.close()
            raise
        if kind == "err":
            self.done = True
            raise value
        tok = int(value)
        eos = tok in self.engine.eos_ids
        if not eos:
            self.ids.append(tok)
        # Decoding all the ids again keeps multi-byte characters whole; an incomplete one is held back.
        text = self.engine.tokenizer.decode(self.ids)
        if reason is None and not eos:
            text = text.removesuffix("\ufffd")
        new = text[len(self.decoded):] if len(text) > len(self.decoded) else ""
        self.decoded = text if len(text) > len(self.decoded) else self.decoded
        out = self.scan.feed(new)
        if self.scan.hit or eos:
            reason = "stop"
        if reason is not None:
            out += "" if self.scan.hit else self.scan.flush()
            self.done = True
            if not self.req.finished:
                self.req.cancelled = True
        return Piece(text=out, token_ids=[tok], finish_reason=reason)

    def close(self) -> None:
        self.done = True
        self.req.cancelled = True

    def __del__(self) -> None:
        self.req.cancelled = True


def _check_stages(stages: Any) -> list[dict[str, Any]]:
    """[{"host", "port", "layers": [a, b]}, ...], contiguous from layer 0; EngineError naming the bad stage."""
    if not isinstance(stages, list) or not stages:
        raise EngineError("stages must be a non-empty list of {host, port, layers}")
    out, prev = [], 0
    for i, s in enumerate(stages):
        if not isinstance(s, dict):
            raise EngineError(f"stage {i} must be an object with host, port and layers")
        a, b = checks.layers(s.get("layers"), f"stage {i} layers")
        if a != prev:
            raise EngineError(f"stage {i} starts at layer {a}, but the previous stage ended at {prev}: "
                              f"ranges must be contiguous from 0")
        prev = b
        out.append({"host": checks.host(s.get("host", "127.0.0.1"), f"stage {i} host"),
                    "port": checks.whole(s.get("port", 0), f"stage {i} port", 0, 65535), "layers": [a, b],
                    **({"name": s["name"]} if "name" in s else {})})
    return out


def _check_request(cfg: Any, prompt_ids: list[int], sampling: Sampling) -> None:
    if not prompt_ids:
        raise EngineError("the prompt is empty: give at least one token")
    if any(not isinstance(t, int) or not 0 <= t < cfg.vocab_size for t in prompt_ids):
        raise EngineError(f"prompt token ids must be integers in 0..{cfg.vocab_size - 1}")
    if len(prompt_ids) > cfg.block_size:
        raise EngineError(f"the prompt has {len(prompt_ids)} tokens; this model's context is {cfg.block_size}")
    if not isinstance(sampling.max_tokens, int) or sampling.max_tokens < 1:
        raise EngineError(f"max_tokens must be at least 1, not {sampling.max_tokens!r}")
    if sampling.temperature is None or sampling.temperature < 0:
        raise EngineError(f"temperature must be >= 0, not {sampling.temperature!r}")
    if sampling.top_p is None or not 0 < sampling.top_p <= 1:
        raise EngineError(f"top_p must be in (0, 1], not {sampling.top_p!r}")
    if sampling.top_k is not None and sampling.top_k < 0:
        raise EngineError(f"top_k must be >= 0, not {sampling.top_k!r}")


# Prompt positions a step may carry beside the decoding requests (vLLM's chunked prefill has such a
# token budget). 512 rows cost a few decode steps of 16 requests; with 64, sixteen requests arriving
# together took ~13 steps to all start decoding (bench/serve_two_node.py --quick, 124M, 16 requests:
# 79 tok/s and p95 per token 4.7x alone with 64; 98 tok/s and 4.2x with 512).
PREFILL_CHUNK = 512
IDLE_PREFILL = 4     # prompt chunks a step may take while no request is decoding (a burst's prompts at once)

# A burst of requests (clients started together) is taken in together: an idle engine that gets a
# request waits until none has come for ARRIVAL_GAP s (ARRIVAL_WAIT s at most), as a dynamic
# batcher's queue delay does, so one prefill step starts them all and they decode in step. Sixteen
# threads started at once reach the inbox within about 1.5 ms here; a lone request pays 2 ms.
ARRIVAL_GAP, ARRIVAL_WAIT = 0.002, 0.010


class PipelineEngine(Engine):
    """A model split across ``stages``: stage 0 runs here, stage r on the worker an agent started.

    stages: [{"host", "port", "layers": [a, b]}, ...] in layer order. Stage 0's host:port is where
    this head listens for the rendezvous (the workers' ``master``); a worker's host:port is its
    own address and status port. With one stage the head runs the whole model (the 1-node case).
    opts: seed (random:<preset> weights), dtype, device, backend ("gloo" | "nccl"), timeout
    (seconds for any wait on a peer), connect_timeout (how long start() waits for the workers),
    ping_interval (idle heartbeat), max_inflight (micro-batches in the pipeline; default 2 per stage),
    max_batch (requests in one micro-batch; 1 serves them one at a time, unbatched), prefill_chunk
    (prompt positions per micro-batch while other requests are active, so a long prompt does not
    stall their decoding; default PREFILL_CHUNK).
    """

    name = NAME

    def __init__(self, model_spec: str, stages: list[dict[str, Any]], *, seed: int = 0, dtype: str = "float32",
                 device: str = "cpu", backend: str = "gloo", timeout: float = 30.0, connect_timeout: float = 60.0,
                 ping_interval: float = 1.0, max_inflight: int | None = None, max_batch: int = 32,
                 prefill_chunk: int = PREFILL_CHUNK, **_ignored: Any):
        self.stages = _check_stages(stages)
        self.src = resolve(model_spec)
        self.model_spec, self.model_id = model_spec, Path(model_spec).name if self.src.kind != "random" else model_spec
        covered = self.stages[-1]["layers"][1]
        if self.src.cfg is not None and covered != self.src.cfg.n_layer:
            raise EngineError(f"the stages cover layers 0:{covered}, the model has {self.src.cfg.n_layer}")
        self.W = len(self.stages)
        if self.W > 1 and not self.stages[0]["port"]:
            raise EngineError("stage 0 needs a port: the head listens there for the workers' rendezvous")
        check_backend(backend, device)
        torch_dtype(dtype)
        self.seed, self.dtype, self.device, self.backend = seed, dtype, device, backend
        self.timeout, self.connect_timeout, self.ping_interval = float(timeout), float(connect_timeout), ping_interval
        self.depth = checks.whole(max_inflight or 2 * self.W, "max_inflight", 1, 1024)
        self.max_batch = checks.whole(max_batch, "max_batch", 1, 4096)
        self.prefill_chunk = checks.whole(prefill_chunk, "prefill_chunk", 1, 1 << 20)
        self.tokenizer: Any = None
        self.eos_ids: frozenset[int] = frozenset()
        self.runner: StageRunner | None = None
        self._inbox: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self._up = threading.Event()
        self._thread: threading.Thread | None = None
        self._store: Any = None
        self._link: Link | None = None
        self._rid = 0
        self._epoch = 0
        self._nonce = secrets.token_hex(4)
        self.state = "not started"
        self.last_error = ""
        self._stats = PipelineStats(self.W)
        self._active: dict[int, _Request] = {}

    # -- life cycle

    def start(self) -> None:
        if self._thread is not None:
            return
        import torch

        a, b = self.stages[0]["layers"]
        model, meta = load_stage(self.src, (a, b), self.seed, self.dtype, self.device)
        if self.stages[-1]["layers"][1] != self.src.cfg.n_layer:   # a tierkit checkpoint's config is known now
            raise EngineError(f"the stages cover layers 0:{self.stages[-1]['layers'][1]}, "
                              f"the model has {self.src.cfg.n_layer}")
        self.runner = StageRunner(model)
        self.tokenizer = vocabulary(self.src, meta)
        self.eos_ids = frozenset(getattr(self.tokenizer, "eos_ids", ()))
        self._dev = torch.device(self.device)
        if self._dev.type == "cuda":
            torch.cuda.set_device(self._dev)
        self._cdev = self.device if self.backend == "nccl" else "cpu"
        self._wire = Wire(self.W, self.src.cfg.n_embd, next(model.parameters()).dtype, self._cdev)
        if self.W > 1:
            h = self.stages[0]
            self._store = serve_store(h["host"], h["port"], self.timeout)
        self._thread = threading.Thread(target=self._main, name="pipeline-head", daemon=True)
        self._thread.start()
        if not self._up.wait(self.connect_timeout):
            raise EngineUnavailable(f"pipeline: {self.state} after {self.connect_timeout:g} s; start the worker(s) "
                                    f"(the engine keeps waiting for them)")

    def close(self) -> None:
        if self._closing.is_set():
            return
        self._closing.set()
        self._inbox.put(None)
        if self._thread is not None:
            self._thread.join(timeout=self.timeout + 5)
        self._store = None   # TCPStore closes its listening socket when it goes

    # -- the Engine interface

    def tokenize(self, text: str) -> list[int]:
        self._need_started()
        try:
            return self.tokenizer.encode(text)
        except ValueError as e:   # a character the model's vocabulary lacks
            raise EngineError(str(e)) from None

    def chat_prompt(self, messages: list[dict[str, str]]) -> str:
        from models.tokenizers import plain_chat

        self._need_started()
        chat = getattr(self.tokenizer, "chat", None) or plain_chat
        try:
            return chat(messages)
        except ValueError as e:   # the model's chat template refused the messages
            raise EngineError(str(e)) from None

    def generate(self, prompt_ids: list[int], sampling: Sampling) -> Iterator[Piece]:
        self._need_started()
        cfg = self.src.cfg
        _check_request(cfg, prompt_ids, sampling)
        if not self._up.is_set():
            raise EngineUnavailable(f"pipeline: {self.state}; retry when /health is ok")
        n = min(sampling.max_tokens, cfg.block_size - len(prompt_ids) + 1)
        seed = sampling.seed if sampling.seed is not None else secrets.randbits(52)
        with self._lock:
            self._rid += 1
            req = _Request(self._rid, list(prompt_ids), sampling, n, len(prompt_ids) + n - 1, int(seed) % 2**53)
        self._inbox.put(req)
        return _Stream(self, req)

    def health(self) -> dict[str, Any]:
        return {"ok": self._up.is_set(), "engine": NAME, "state": self.state, "epoch": self._epoch,
                "last_error": self.last_error or None,
                "workers": [{"rank": i, "host": s["host"], "port": s["port"], "layers": s["layers"],
                             "joined": self._up.is_set()} for i, s in enumerate(self.stages) if i > 0]}

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return self._stats.report(self.stages, self.state, self._epoch)

    def _need_started(self) -> None:
        if self.runner is None:
            raise EngineUnavailable("pipeline engine not started: call start() first")

    # -- the scheduler thread: connect, serve, and on failure fail everything and reconnect

    def _main(self) -> None:
        while not self._closing.is_set():
            if self.W > 1:
                link = self._connect()
                if link is None:
                    break
                self._link = link
            self.state, self.last_error = "serving", ""
            self._up.set()
            try:
                self._serve()
            except LinkDown as e:
                self.last_error = str(e)
                self._down(f"pipeline: lost a stage ({e}); the engine reconnects when every worker is back")
            except Exception as e:  # noqa: BLE001 - a bug must not leave clients hanging
                self.last_error = f"{type(e).__name__}: {e}"
                self._down(f"pipeline: internal error ({type(e).__name__}: {str(e)[:200]})")
            finally:
                if self._link is not None:
                    self._link.close()
                    self._link = None
        self._up.clear()
        self.state = "closed"
        self._fail_all(EngineUnavailable("pipeline engine closed"))

    def _connect(self) -> Link | None:
        """Wait until every worker is idle at the rendezvous, then start the next epoch with all of them."""
        store = self._store
        ranks = range(1, self.W)
        while not self._closing.is_set():
            self._fail_waiting(None)
            missing = [r for r in ranks if not store.check([f"idle/{r}"])]
            if missing:
                self.state = "waiting for " + ", ".join(
                    f"worker {r} ({self.stages[r]['host']}, layers {self.stages[r]['layers'][0]}:"
                    f"{self.stages[r]['layers'][1]})" for r in missing)
                time.sleep(0.05)
                continue
            for r in ranks:
                store.delete_key(f"idle/{r}")
            self._epoch += 1
            name = f"{self._nonce}.{self._epoch}"
            self.state = f"joining epoch {self._epoch}"
            store.set("epoch", name)
            try:
                pg = make_group(store, f"epoch/{name}", 0, self.W, self.stages[0]["host"], self.timeout,
                                self.backend)
            except Exception as e:  # noqa: BLE001 - a worker died between announcing and joining
                self.last_error = short_error(e, f"epoch {self._epoch} rendezvous")
                continue
            return Link(pg, 0, self.W, self.timeout, self._cdev)
        return None

    def _fail_waiting(self, err: Exception | None) -> None:
        """Answer every request in the inbox with ``err`` (or the current state) while not serving."""
        while True:
            try:
                req = self._inbox.get_nowait()
            except queue.Empty:
                return
            if req is not None:
                req.out.put(("err", err or EngineUnavailable(f"pipeline: {self.state}"), None))

    def _fail_all(self, err: Exception) -> None:
        """Every request in flight and every one waiting gets ``err``."""
        for req in list(self._active.values()):
            req.out.put(("err", err, None))
        self._active.clear()
        self._fail_waiting(err)

    def _down(self, msg: str) -> None:
        self._up.clear()
        self.state = "reconnecting"
        self.runner.clear()
        self._fail_all(EngineUnavailable(msg))

    def _serve(self) -> None:
        """One epoch: admit requests, keep up to ``depth`` steps in the pipe, match replies first-in first-out."""
        W, link = self.W, self._link
        ready: deque[_Request] = deque()
        inflight: deque[_Flight] = deque()
        last_msg = time.monotonic()
        while not self._closing.is_set():
            if self._admit(ready):
                break
            if self._fill(ready, inflight):
                last_msg = time.monotonic()
            if inflight:
                f = inflight.popleft()
                link.wait(f.work, f"reply from stage {W - 1} ({self.stages[W - 1]['host']})")
                if f.batch is not None:
                    self._reply(f, ready, inflight)
                continue
            if ready:
                continue
            # idle: wait for a request; ping the workers now and then so a dead one is noticed
            wait = None if W == 1 else max(0.0, self.ping_interval - (time.monotonic() - last_msg))
            try:
                req = self._inbox.get(timeout=wait)
            except queue.Empty:
                self._send_op(OP_PING, 0, inflight)
                last_msg = time.monotonic()
                continue
            self._inbox.put(req)   # admitted at the top of the loop
            self._settle()
        if W > 1:   # orderly close: drain, then tell the workers the epoch is over
            try:
                while inflight:
                    link.wait(inflight.popleft().work, "draining", timeout=min(self.timeout, 5.0))
                self._send_op(OP_CLOSE, 0, inflight)
                link.wait(inflight.popleft().work, "close", timeout=min(self.timeout, 5.0))
            except LinkDown:
                pass

    def _settle(self) -> None:
        """Let a burst finish arriving (see ARRIVAL_GAP) before an idle engine starts on it."""
        end, n = time.monotonic() + ARRIVAL_WAIT, self._inbox.qsize()
        while time.monotonic() < end:
            time.sleep(ARRIVAL_GAP)
            if self._inbox.qsize() == n:
                return
            n = self._inbox.qsize()

    def _admit(self, ready: deque) -> bool:
        """Move new requests into the active set; True when close() asked us to stop."""
        while True:
            try:
                req = self._inbox.get_nowait()
            except queue.Empty:
                return False
            if req is None:
                return True
            self._active[req.rid] = req
            ready.append(req)

    def _fill(self, ready: deque, inflight: deque) -> bool:
        """Form micro-batches from the ready requests, run stage 0 on each and pass it on, while the
        pipe has room; True if anything was sent. One stage: one batch, computed and delivered here."""
        sent_any = False
        while ready and len(inflight) < self.depth:
            batch = self._take(ready, inflight)
            if not batch:
                break
            self._run(batch, ready, inflight)
            sent_any = True
            if self.W == 1:
                break
        n = sum(f.batch is not None for f in inflight)
        if n:
            with self._lock:
                self._stats.in_flight(n)
        return sent_any

    def _take(self, ready: deque, inflight: deque) -> list[tuple[_Request, list[int]]]:
        """The next micro-batch: every decoding request's next token, and prompt chunks of at most
        ``prefill_chunk`` positions in all; while no request is decoding there is nobody to stall, and
        the prompts go in up to ``IDLE_PREFILL`` chunks' worth at once. With W stages a batch holds at
        most 1/W of the active requests, so W micro-batches keep every stage busy."""
        cap = self.max_batch
        if self.W > 1:
            cap = min(cap, max(1, -(-len(self._active) // self.W)))
        decoding = any(r.pos >= len(r.prompt) for r in self._active.values())
        budget = self.prefill_chunk * (1 if decoding else IDLE_PREFILL)
        batch: list[tuple[_Request, list[int]]] = []
        waiting: list[_Request] = []
        while ready and len(batch) < cap:
            req = ready.popleft()
            if req.cancelled:
                self._finish(req, inflight)
                continue
            left = len(req.prompt) - req.pos
            if left <= 0:
                batch.append((req, [req.last]))
            elif budget > 0:
                take = min(left, budget)
                budget -= take
                batch.append((req, req.prompt[req.pos:req.pos + take]))
            else:
                waiting.append(req)
        ready.extendleft(reversed(waiting))   # first in line for the next batch's prompt budget
        return batch

    def _run(self, batch: list[tuple[_Request, list[int]]], ready: deque, inflight: deque) -> None:
        """Stage 0 on one micro-batch; with one stage sample here, else send it down the pipe."""
        import torch

        from tiers.tier3.pipeline.wire import OP_BATCH, pack_batch

        W = self.W
        starts = [req.pos for req, _ in batch]
        entries = [(req.rid, len(ids), req.pos, req.max_len) for req, ids in batch]
        inp = torch.tensor([[t for _, ids in batch for t in ids]], device=self._dev)
        t = time.perf_counter()
        y = self.runner.step_batch(entries, inp)
        ms0 = (time.perf_counter() - t) * 1e3
        for req, ids in batch:
            req.pos += len(ids)
        final = [req.pos >= len(req.prompt) for req, _ in batch]
        shape = ([T for _, T, _, _ in entries], sum(s >= len(r.prompt) for s, (r, _) in zip(starts, batch)))
        if W == 1:
            toks = [self.runner.sample(req.rid, y[i:i + 1, None, :], req.sampling.temperature,
                                       req.sampling.top_k or 0, req.sampling.top_p, req.seed) if final[i] else -1
                    for i, (req, _) in enumerate(batch)]
            with self._lock:
                self._stats.batch(*shape, [ms0])
            self._land(batch, toks, ready, inflight)
            return
        hdr = torch.zeros(HDR + W, dtype=torch.float64)
        hdr[H_OP], hdr[H_RID], hdr[H_T], hdr[HDR] = OP_BATCH, len(batch), inp.shape[1], ms0
        table = torch.tensor([[req.rid, len(ids), s, req.max_len, req.sampling.temperature, req.sampling.top_k or 0,
                               req.sampling.top_p, req.seed, f] for (req, ids), s, f in zip(batch, starts, final)],
                             dtype=torch.float64)
        sent = self._link.send(1, self._wire.pack(hdr.to(self._cdev), None))
        sent += self._link.send(1, pack_batch(table.to(self._cdev), y.to(self._cdev)))
        reply = torch.zeros(REPLY + W + len(batch), dtype=torch.float64, device=self._cdev)
        inflight.append(_Flight(batch, self._link.post_recv(W - 1, reply), reply, time.perf_counter(), shape, sent))

    def _reply(self, f: _Flight, ready: deque, inflight: deque) -> None:
        """The last stage's answer to a micro-batch: its stages' compute times, and the tokens it sampled."""
        from tiers.tier3.pipeline.wire import OP_BATCH

        r, W, B = f.reply.tolist(), self.W, len(f.batch)
        if r[0] != OP_BATCH or int(r[1]) != B:
            raise LinkDown(f"protocol: a reply for a batch of {int(r[1])}, expected {B}")
        with self._lock:
            self._stats.batch(*f.shape, r[REPLY:REPLY + W], f.sent, (REPLY + W + B) * 8,
                              (time.perf_counter() - f.t) * 1e3)
        self._land(f.batch, [int(x) for x in r[REPLY + W:]], ready, inflight)

    def _land(self, batch: list[tuple[_Request, list[int]]], toks: list[int], ready: deque, inflight: deque) -> None:
        """A micro-batch is back: deliver each sampled token; a request still in its prompt is ready again."""
        for (req, _), tok in zip(batch, toks):
            if tok >= 0:
                self._deliver(req, tok, ready, inflight)
            elif req.cancelled:
                self._finish(req, inflight)
            else:
                ready.append(req)

    def _send_op(self, op: float, rid: int, inflight: deque) -> None:
        import torch

        W, link = self.W, self._link
        hdr = torch.zeros(HDR + W, dtype=torch.float64, device=self._cdev)
        hdr[H_OP], hdr[H_RID] = op, rid
        link.send(1, self._wire.pack(hdr, None))
        reply = torch.zeros(REPLY + W, dtype=torch.float64, device=self._cdev)
        inflight.append(_Flight(None, link.post_recv(W - 1, reply), reply, time.perf_counter(), None, 0))

    def _deliver(self, req: _Request, tok: int, ready: deque, inflight: deque) -> None:
        req.produced += 1
        req.last = tok
        eos = tok in self.eos_ids
        done = req.produced >= req.max_new or eos
        reason = ("stop" if eos else "length") if done else None
        with self._lock:
            self._stats.token()
        req.out.put(("tok", tok, reason))
        if done or req.cancelled:
            self._finish(req, inflight)
        else:
            ready.append(req)

    def _finish(self, req: _Request, inflight: deque) -> None:
        req.finished = True
        self._active.pop(req.rid, None)
        self.runner.free(req.rid)
        if self.W > 1:
            self._send_op(OP_FREE, req.rid, inflight)

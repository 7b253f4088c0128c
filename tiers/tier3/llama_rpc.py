"""The `llama-rpc` engine: GGUF models split across machines by llama.cpp's RPC backend.

    tierkit serve: layout() from the GGUF's tensor table; launch() asks each peer's agent for a worker
    worker node:  python -m tiers.tier3.llama_rpc worker --host H --port P     (started by the agent)
                  = ggml_backend_rpc_start_server() from llama-cpp-python's own libggml-rpc, via ctypes
    head node:    LlamaRpcEngine -> a child process `python -m tiers.tier3.llama_rpc head`
                  that registers each worker as a ggml device and loads the model with the last
                  layers offloaded to them (llama.cpp offloads the *last* n_gpu_layers), then decodes
                  up to `parallel` requests together in one context (llama_head.py)
    generate() -> wait, first come first served, for a free sequence and the context cells it needs
               -> {"op": "generate", "rid"} to the child -> its tokens arrive on its own queue
                  (one reader thread per child hands each request its messages)

Why a child process on the head: any failed send or receive inside the RPC
client calls abort(), which would take the HTTP server down with it
(REFERENCE.md). The child is the only process that links the RPC client; the
server talks to it over a pipe, one JSON line per message (each naming its
request), and a dead child becomes EngineUnavailable for every request it held. Before (re)starting it, the
engine probes every worker port, so a worker that is not back yet is a clear
503, not another abort.

Tokenizing, the chat template and detokenizing run in the server process on a
vocab-only copy of the model (no weights, no RPC): they need no lock on the
generating child.

Never expose the RPC port on an open network: the protocol has no
authentication. The agent binds it to the address the head asked for.
"""
from __future__ import annotations

import argparse
import codecs
import ctypes
import itertools
import json
import os
import queue
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tiers.llama_log import last_error, quiet
from tiers.tier3 import checks, net
from tiers.tier3.engine import Engine, EngineError, EngineUnavailable, Piece, Sampling
from tiers.tier3.llama_head import ggml_libs
from tiers.tier3.placement import ModelLayout, Plan, engine_stage, layout_from_gguf

if TYPE_CHECKING:
    from tiers.tier3.client import Workers

NAME = "llama-rpc"


# ---------------------------------------------------------------- worker side

def worker_command(args: dict[str, Any]) -> list[str]:
    """The worker's argv from a launch request's args: {"host", "port", "threads"?}; EngineError if any is bad.

    No shell, no free-form strings: the host is parsed as an IPv4 address, the
    numbers are range-checked, and the program is this module.
    """
    checks.known_keys(args, {"host", "port", "threads"}, NAME)
    host = checks.ipv4(args.get("host", "127.0.0.1"), "host")
    port = checks.whole(args.get("port"), "port", 1024, 65535)
    threads = checks.whole(args.get("threads", os.cpu_count() or 1), "threads", 1, 1024)
    return [sys.executable, "-m", "tiers.tier3.llama_rpc", "worker", "--host", host, "--port", str(port),
            "--threads", str(threads)]


def run_worker(host: str, port: int, threads: int) -> None:
    """Serve this machine's GPU (else its CPU) as a ggml RPC device until killed (the call never returns)."""
    g, rpc = ggml_libs()
    # A GPU when this llama-cpp-python build has one (CUDA, Metal, ...), else the CPU.
    g.ggml_backend_dev_name.restype = ctypes.c_char_p
    g.ggml_backend_dev_name.argtypes = [ctypes.c_void_p]
    dev = g.ggml_backend_dev_by_type(1) or g.ggml_backend_dev_by_type(0)  # GGML_BACKEND_DEVICE_TYPE_GPU, _CPU
    if not dev:
        raise EngineError("no ggml device in this llama-cpp-python build")
    name = (g.ggml_backend_dev_name(dev) or b"?").decode()
    # ggml prints "Failed to create server socket" and returns when the port is taken: check first,
    # so the agent's log says which port and what to do.
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            raise EngineError(f"cannot listen on {host}:{port} ({exc.strerror or exc}): pick another port") from None
    print(f"llama-rpc worker: serving {name} on {host}:{port} with {threads} thread(s)", flush=True)
    devs = (ctypes.c_void_p * 1)(dev)
    rpc.ggml_backend_rpc_start_server(f"{host}:{port}".encode(), None, threads, 1, devs)
    raise EngineError(f"the ggml RPC server on {host}:{port} stopped (could not listen?)")


# ---------------------------------------------------------------- head side (in the server)

DEFAULT_PARALLEL = 4
MAX_PARALLEL = 256      # llama.cpp's LLAMA_MAX_SEQ


@dataclass
class _Live:
    """A request that holds a sequence in the child: the context it reserved, the queue its messages arrive on."""

    rid: int
    need: int
    proc: subprocess.Popen
    out: queue.Queue = field(default_factory=queue.Queue)


class LlamaRpcEngine(Engine):
    """A GGUF model, the first stage on this machine's CPU, the other stages on RPC workers.

    stages: [{"host", "port", "layers": [a, b]}, ...] in layer order; stage 0 is
    this machine (its host/port unused), the others are the workers' RPC endpoints.
    parallel: sequences decoded together in one llama.cpp context (llama.cpp's -np);
    n_ctx: the context's cells, shared by them (a request alone may use all of them).
    A request waits, first come first served, until a sequence is free and its
    prompt + max_tokens fits the cells the others left.
    """

    name = NAME
    serve_options = ("n_ctx", "threads", "parallel")

    def __init__(self, model_spec: str, stages: list[dict[str, Any]], *, n_ctx: int = 512,
                 threads: int | None = None, parallel: int | None = None, token_timeout: float = 30.0,
                 load_timeout: float = 120.0, verbose: bool = False, **_: Any) -> None:
        self.model_path = Path(model_spec)
        if not self.model_path.is_file():
            raise EngineError(f"{model_spec}: no such GGUF file; pass the path of a .gguf model")
        self.model_id = self.model_path.stem
        if not stages:
            raise EngineError("llama-rpc needs at least one stage (the head)")
        self.stages = [dict(s) for s in stages]
        for s in self.stages[1:]:
            checks.whole(s.get("port"), "worker port", 1, 65535)
        self.parallel = checks.whole(DEFAULT_PARALLEL if parallel is None else parallel, "parallel", 1, MAX_PARALLEL)
        self.n_ctx, self.threads, self.verbose = n_ctx, threads, verbose
        self.token_timeout, self.load_timeout = token_timeout, load_timeout
        self._cv = threading.Condition()    # admission: the queue, the live requests, the child's life
        self._waiting: deque[object] = deque()
        self._live: dict[int, _Live] = {}
        self._used = 0                      # context cells reserved by the live requests
        self._rids = itertools.count(1)
        self._send_lock = threading.Lock()
        self._st_lock = threading.Lock()
        self._tok_lock = threading.Lock()
        self._proc: subprocess.Popen | None = None
        self._stderr: deque[str] = deque(maxlen=40)
        self._vocab: Any = None
        self.restarts = -1
        self._stats = {"requests": 0, "tokens": 0, "decode_s": 0.0, "first_token_s": 0.0, "errors": 0,
                       "worker_bytes": 0, "last_error": None}
        self._batching = {"steps": 0, "sizes": {}, "tokens": 0, "prompt_tokens": 0, "mixed_steps": 0,
                          "decode_ms": 0.0, "max_tokens_per_step": 0}
        self._lat: deque[float] = deque(maxlen=512)
        self._recent: deque[float] = deque()
        self._net_seen = [0, 0]
        self._ctl: queue.Queue = queue.Queue()

    # -- endpoints

    @property
    def workers(self) -> list[str]:
        return [f"{s['host']}:{s['port']}" for s in self.stages[1:]]

    def _down(self, timeout: float) -> dict[str, str]:
        """{endpoint: what happened} for each worker whose RPC port does not accept now."""
        problems = {ep: net.refused(s["host"], int(s["port"]), timeout) for ep, s in zip(self.workers, self.stages[1:])}
        return {ep: p for ep, p in problems.items() if p}

    def _n_gpu_layers_and_split(self) -> tuple[int, list[float] | None]:
        counts = [s["layers"][1] - s["layers"][0] for s in self.stages[1:]]
        if not counts:
            return 0, None
        return sum(counts), ([float(c) for c in counts] if len(counts) > 1 else None)

    # -- lifecycle

    def start(self) -> None:
        import llama_cpp

        quiet()   # the tokenizer's load logs like a model's: kept off the server's terminal
        try:
            self._vocab = llama_cpp.Llama(str(self.model_path), vocab_only=True, verbose=False)
        except Exception as exc:  # noqa: BLE001 - llama-cpp-python raises ValueError or OSError alike
            raise EngineError(f"{self.model_path} cannot be loaded by llama.cpp ({last_error() or exc}): "
                              "is it a GGUF model?") from None
        with self._cv:
            self._spawn()

    def _alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def _spawn(self) -> None:
        """Probe the workers, then start the child and wait until the model is loaded across them (under _cv)."""
        for ep, problem in self._down(timeout=2.0).items():
            raise EngineUnavailable(f"llama-rpc worker {ep} is down ({problem}): the agent restarts it; "
                                    "retry in a few seconds")
        ngl, split = self._n_gpu_layers_and_split()
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        proc = subprocess.Popen([sys.executable, "-m", "tiers.tier3.llama_rpc", "head"], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True, bufsize=1,
                                cwd=str(Path(__file__).resolve().parents[2]))
        threading.Thread(target=self._drain, args=(proc,), daemon=True).start()
        # One reader per child: it hands each request its own messages (queues, not select(): a buffered
        # pipe may hold several lines at once).
        self._ctl = ctl = queue.Queue()
        threading.Thread(target=self._reader, args=(proc, ctl), daemon=True).start()
        proc.stdin.write(json.dumps({"model": str(self.model_path), "servers": self.workers, "n_gpu_layers": ngl,
                                     "tensor_split": split, "n_ctx": self.n_ctx, "threads": self.threads,
                                     "parallel": self.parallel, "verbose": self.verbose}) + "\n")
        proc.stdin.flush()
        self._proc = proc
        try:
            reply = ctl.get(timeout=self.load_timeout)
        except queue.Empty:
            reply = None
        if reply is None:
            raise self._lost("loading the model", proc)
        if not reply.get("ok"):
            self._kill(proc)
            raise EngineError(f"llama.cpp could not load {self.model_path.name}: {reply.get('error')}")
        self.n_ctx = reply["n_ctx"]
        self.restarts += 1
        self._net_seen = list(reply.get("net") or [0, 0])  # the weights' upload is not per-token traffic

    def _reader(self, proc: subprocess.Popen, ctl: queue.Queue) -> None:
        """The child's messages: a step's tokens to each request, a "done" frees its sequence, the rest to ctl."""
        for line in proc.stdout:
            try:
                msg = json.loads(line)
            except ValueError:
                continue
            if "toks" in msg:
                self._on_step(msg)
            elif "rid" in msg:
                self._on_done(msg)
            else:
                ctl.put(msg)
        ctl.put(None)
        self._on_eof(proc)

    def _on_step(self, msg: dict[str, Any]) -> None:
        n, decoding, seqs = msg["batch"]
        now = time.monotonic()
        with self._st_lock:
            b = self._batching
            b["steps"] += 1
            b["sizes"][seqs] = b["sizes"].get(seqs, 0) + 1
            b["tokens"] += n
            b["prompt_tokens"] += n - decoding
            b["mixed_steps"] += 0 < decoding < n
            b["decode_ms"] += msg.get("ms", 0.0)
            b["max_tokens_per_step"] = max(b["max_tokens_per_step"], n)
            for _ in msg["toks"]:
                self._recent.append(now)
            while self._recent and now - self._recent[0] > 10.0:
                self._recent.popleft()
        for rid, tok in msg["toks"]:
            live = self._live.get(rid)
            if live is not None:
                live.out.put(("tok", tok))

    def _on_done(self, msg: dict[str, Any]) -> None:
        with self._cv:
            live = self._live.pop(msg["rid"], None)
            if live is not None:
                self._used -= live.need
            self._cv.notify_all()
        self._count_net(msg.get("net"))
        if live is not None:
            live.out.put(("done", msg))

    def _on_eof(self, proc: subprocess.Popen) -> None:
        """The child is gone: every request it held gets EngineUnavailable (HTTP 503), naming what is down."""
        with self._cv:
            lost = [lv for lv in self._live.values() if lv.proc is proc]
            if self._proc is proc or lost:
                err = self._lost("generating", proc)
                for lv in lost:
                    del self._live[lv.rid]
                    self._used -= lv.need
                    lv.out.put(("err", err))
            self._cv.notify_all()

    def _drain(self, proc: subprocess.Popen) -> None:
        for line in proc.stderr:
            line = line.rstrip()
            if line:
                self._stderr.append(line)

    def _kill(self, proc: subprocess.Popen | None) -> None:
        if proc is not None and proc is self._proc:
            self._proc = None
        if proc is not None and proc.poll() is None:
            proc.kill()
        if proc is not None:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass

    def _lost(self, what: str, proc: subprocess.Popen | None) -> EngineUnavailable:
        """The child died or hung: name the worker(s) that are down, if we can tell."""
        code = proc.poll() if proc else None
        self._kill(proc)
        down = [f"{ep} ({p})" for ep, p in self._down(timeout=1.0).items()]
        tail = next((l for l in reversed(self._stderr) if "rpc" in l.lower() or "abort" in l.lower()), "")
        who = f"worker {', '.join(down)} is down" if down else "a worker connection failed"
        msg = f"lost a llama-rpc peer while {what}: {who}" + (f" [{tail[:160]}]" if tail else "") \
              + (f" (the head's llama.cpp process exited with code {code})" if code is not None else "") \
              + "; the agent restarts workers: retry shortly"
        with self._st_lock:
            self._stats["errors"] += 1
            self._stats["last_error"] = msg
        return EngineUnavailable(msg)

    def _send(self, live: _Live, msg: dict[str, Any], quiet: bool = False) -> None:
        """To the child; if the pipe is broken the child is killed, and the reader fails every request it held."""
        try:
            with self._send_lock:
                live.proc.stdin.write(json.dumps(msg) + "\n")
                live.proc.stdin.flush()
        except (BrokenPipeError, OSError, ValueError, AttributeError):
            if not quiet and live.proc.poll() is None:
                live.proc.kill()

    def _count_net(self, net: list[int] | None) -> None:
        """The child reports cumulative socket bytes; add what moved since the last report."""
        if not net:
            return
        with self._st_lock:
            prev = self._net_seen
            self._net_seen = list(net)
            self._stats["worker_bytes"] += max(0, net[0] - prev[0]) + max(0, net[1] - prev[1])

    # -- admission

    def _admit(self, need: int) -> _Live:
        """Wait (first come, first served) for a free sequence and `need` context cells; (re)start a dead child."""
        ticket = object()
        with self._cv:
            self._waiting.append(ticket)
            try:
                while True:
                    first = self._waiting[0] is ticket
                    if first and not self._alive() and not self._live:
                        self._kill(self._proc)
                        self._spawn()          # EngineUnavailable when a worker is not back yet
                    if first and self._alive() and len(self._live) < self.parallel \
                            and self._used + need <= self.n_ctx:
                        break
                    self._cv.wait(timeout=1.0)
            finally:
                if self._waiting[0] is ticket:
                    self._waiting.popleft()
                else:
                    self._waiting.remove(ticket)
                self._cv.notify_all()
            live = _Live(next(self._rids), need, self._proc)
            self._live[live.rid] = live
            self._used += need
        with self._st_lock:
            self._stats["requests"] += 1
        return live

    def _next(self, live: _Live) -> tuple[str, Any]:
        try:
            return live.out.get(timeout=self.token_timeout)
        except queue.Empty:
            pass
        if live.proc.poll() is None:
            live.proc.kill()        # hung: the reader sees the end and fails every request it held
        try:
            return live.out.get(timeout=15.0)
        except queue.Empty:
            return "err", EngineUnavailable("the llama-rpc head process stopped answering: retry shortly")

    # -- the Engine interface

    def tokenize(self, text: str) -> list[int]:
        with self._tok_lock:
            return self._vocab.tokenize(text.encode("utf-8"), add_bos=True, special=True)

    def detokenize(self, ids: list[int], prev: list[int] | None = None) -> bytes:
        with self._tok_lock:
            return self._vocab.detokenize(ids, prev_tokens=prev)

    def chat_prompt(self, messages: list[dict[str, str]]) -> str:
        template = (self._vocab.metadata or {}).get("tokenizer.chat_template")
        if template:
            from llama_cpp.llama_chat_format import Jinja2ChatFormatter

            eos = self.detokenize([self._vocab.token_eos()]).decode("utf-8", "replace")
            bos = self.detokenize([self._vocab.token_bos()]).decode("utf-8", "replace")
            try:
                return Jinja2ChatFormatter(template, eos, bos)(messages=messages).prompt
            except Exception as exc:  # noqa: BLE001 - a Jinja template can raise anything
                raise EngineError(f"the model's chat template failed on these messages: {exc}") from None
        # No template in the GGUF (a base model): a plain transcript the model can continue.
        return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"

    def generate(self, prompt_ids: list[int], sampling: Sampling) -> Iterator[Piece]:
        if len(prompt_ids) + sampling.max_tokens > self.n_ctx:
            raise EngineError(f"prompt ({len(prompt_ids)} tokens) + max_tokens ({sampling.max_tokens}) exceeds the "
                              f"context of {self.n_ctx} tokens: shorten the prompt or lower max_tokens")
        return self._generate(list(prompt_ids), sampling)

    def _generate(self, prompt_ids: list[int], sampling: Sampling) -> Iterator[Piece]:
        live = self._admit(len(prompt_ids) + sampling.max_tokens)
        t0 = last = time.perf_counter()
        self._send(live, {"op": "generate", "rid": live.rid, "ids": prompt_ids, "max_tokens": sampling.max_tokens,
                          "temperature": float(sampling.temperature), "top_p": float(sampling.top_p),
                          "top_k": sampling.top_k or 0, "seed": sampling.seed})
        decoder = codecs.getincrementaldecoder("utf-8")("replace")
        done_ids: list[int] = []
        finished = False
        try:
            while True:
                kind, msg = self._next(live)
                if kind == "err":
                    finished = True
                    raise msg
                if kind == "done":
                    finished = True
                    if msg["done"] == "error":
                        raise EngineUnavailable(f"llama.cpp failed on this request: {msg.get('error')}")
                    reason = "stop" if msg["done"] == "stop" else "length"
                    yield Piece(text=decoder.decode(b"", final=True), token_ids=[], finish_reason=reason)
                    return
                now = time.perf_counter()
                with self._st_lock:
                    self._stats["tokens"] += 1
                    if not done_ids:
                        self._stats["first_token_s"] += now - t0
                    else:
                        self._lat.append(now - last)
                last = now
                # the context decides the token's text (SentencePiece's leading space)
                text = decoder.decode(self.detokenize([msg], prompt_ids + done_ids))
                done_ids.append(msg)
                yield Piece(text=text, token_ids=[msg])
        finally:
            with self._st_lock:
                self._stats["decode_s"] += time.perf_counter() - t0
            if not finished:
                # The client went away mid-way: the child frees the sequence and answers "done".
                self._send(live, {"op": "stop", "rid": live.rid}, quiet=True)

    def stats(self) -> dict[str, Any]:
        with self._st_lock:
            s, b = dict(self._stats), {**self._batching, "sizes": dict(self._batching["sizes"])}
            lat = sorted(self._lat)
            span = (self._recent[-1] - self._recent[0]) if len(self._recent) > 1 else 0.0
            recent = len(self._recent)
        toks, steps = s["tokens"], max(b["steps"], 1)
        return {
            "engine": self.name, "model": self.model_id,
            "stages": [{"host": st.get("host"), "port": st.get("port"), "layers": st["layers"],
                        "role": "head (CPU)" if i == 0 else "llama.cpp RPC worker"}
                       for i, st in enumerate(self.stages)],
            "requests": s["requests"], "tokens": toks, "errors": s["errors"], "last_error": s["last_error"],
            "tokens_per_s": toks / s["decode_s"] if s["decode_s"] else None,   # per request, while it ran
            "aggregate_tokens_per_s": round((recent - 1) / span, 3) if span > 0 else 0.0,   # last 10 s, all
            "time_to_first_token_ms": 1e3 * s["first_token_s"] / s["requests"] if s["requests"] else None,
            "token_latency_ms_p50": 1e3 * lat[len(lat) // 2] if lat else None,
            "token_latency_ms_p90": 1e3 * lat[int(len(lat) * 0.9)] if lat else None,
            "parallel": {"slots": self.parallel, "in_use": len(self._live), "waiting": len(self._waiting),
                         "context_tokens": self.n_ctx, "context_reserved": self._used},
            "batching": {"steps": b["steps"], "sizes": {str(k): v for k, v in sorted(b["sizes"].items())},
                         "max_batch": max(b["sizes"], default=0),
                         "mean_batch": round(sum(k * v for k, v in b["sizes"].items()) / steps, 3),
                         "tokens_per_step_mean": round(b["tokens"] / steps, 3),
                         "max_tokens_per_step": b["max_tokens_per_step"], "prompt_tokens": b["prompt_tokens"],
                         "mixed_steps": b["mixed_steps"], "decode_ms_per_step": round(b["decode_ms"] / steps, 3)},
            # llama.cpp does not split its timings by device; what we can measure is the traffic.
            "bytes_per_token_head_workers": s["worker_bytes"] / toks if toks and len(self.stages) > 1 else 0,
            "bytes_basis": "TCP_INFO bytes sent+received on the head's sockets to the workers, per generated token "
                           "(includes prompt processing and llama.cpp's serialized compute graph)",
            "head_restarts": max(self.restarts, 0),
        }

    def health(self) -> dict[str, Any]:
        alive = self._alive()
        down = {} if alive else self._down(timeout=0.5)
        workers = [{"endpoint": ep, "up": ep not in down} for ep in self.workers]
        return {"ok": alive and all(w["up"] for w in workers), "head_process": alive, "workers": workers}

    def close(self) -> None:
        with self._cv:
            proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            try:
                proc.stdin.close()
            except OSError:
                pass
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        self._kill(proc)


# ---------------------------------------------------------------- what `tierkit serve` asks of this engine

ENGINE = LlamaRpcEngine


def layout(model: str, n_ctx: int) -> ModelLayout:
    """Per-block bytes from the GGUF's tensor table, with the KV cache at n_ctx."""
    path = Path(model)
    if not path.is_file():
        raise EngineError(f"{model}: no such GGUF file; pass the path of a .gguf model")
    return layout_from_gguf(path, n_ctx=n_ctx)


def launch(model: str, plan: Plan, workers: Workers, threads: int | None, opts: dict[str, Any]) -> list[dict[str, Any]]:
    """An RPC worker on each peer that holds layers, on a port its agent picks; each waited for until it accepts."""
    stages = [engine_stage(plan.stages[0])]
    for s in plan.stages[1:]:
        if s.layers[1] <= s.layers[0]:
            continue
        client, w = workers.launch(s.node, NAME, {"host": s.node.host, "port": 0,
                                                  **({"threads": threads} if threads else {})})
        w = client.wait_ready(w["id"])
        workers.log(f"worker {w['id']} on {s.node.name}: llama.cpp RPC at {s.node.host}:{w['args']['port']} "
                    f"(layers {s.layers[0]}-{s.layers[1] - 1})")
        stages.append(engine_stage(s, w["args"]["port"]))
    return stages


# ---------------------------------------------------------------- python -m tiers.tier3.llama_rpc

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tiers.tier3.llama_rpc")
    sub = ap.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("worker", help="serve this machine's CPU as a ggml RPC device")
    w.add_argument("--host", required=True)
    w.add_argument("--port", type=int, required=True)
    w.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    sub.add_parser("head", help="(internal) the head's model process, driven over a pipe")
    args = ap.parse_args(argv)
    try:
        if args.cmd == "worker":
            worker_command({"host": args.host, "port": args.port, "threads": args.threads})  # same checks
            run_worker(args.host, args.port, args.threads)
        else:
            from tiers.tier3.llama_head import run_head

            run_head()
    except EngineError as exc:
        print(f"llama-rpc: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

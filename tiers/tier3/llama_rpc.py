"""The `llama-rpc` engine: GGUF models split across machines by llama.cpp's RPC backend.

    tierkit serve: layout() from the GGUF's tensor table; launch() asks each peer's agent for a worker
    worker node:  python -m tiers.tier3.llama_rpc worker --host H --port P     (started by the agent)
                  = ggml_backend_rpc_start_server() from llama-cpp-python's own libggml-rpc, via ctypes
    head node:    LlamaRpcEngine -> a child process `python -m tiers.tier3.llama_rpc head`
                  that registers each worker as a ggml device and loads the model with the last
                  layers offloaded to them (llama.cpp offloads the *last* n_gpu_layers)

Why a child process on the head: any failed send or receive inside the RPC
client calls abort(), which would take the HTTP server down with it
(REFERENCE.md). The child is the only process that links the RPC client; the
server talks to it over a pipe, one JSON line per message, and a dead child
becomes EngineUnavailable for that request. Before (re)starting it, the
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
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tiers.tier3 import checks, net
from tiers.tier3.engine import Engine, EngineError, EngineUnavailable, Piece, Sampling
from tiers.tier3.placement import ModelLayout, Plan, engine_stage, layout_from_gguf

if TYPE_CHECKING:
    from tiers.tier3.client import Workers

NAME = "llama-rpc"


# ---------------------------------------------------------------- the bundled ggml libraries

def _lib_dir() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or not spec.origin:
        raise EngineError("llama-cpp-python is not installed: pip install llama-cpp-python (built with GGML_RPC=on)")
    return Path(spec.origin).parent / "lib"


def _ggml() -> tuple[ctypes.CDLL, ctypes.CDLL]:
    """libggml and libggml-rpc as llama_cpp loaded them (the .so.0 names: one registry, not two)."""
    lib = _lib_dir()
    rpc_path = lib / "libggml-rpc.so.0"
    if not rpc_path.exists():
        raise EngineError(f"{rpc_path} is missing: reinstall llama-cpp-python with "
                          "CMAKE_ARGS='-DGGML_RPC=on' pip install --force-reinstall --no-binary :all: llama-cpp-python")
    import llama_cpp  # noqa: F401  (loads libllama and its ggml first)

    g = ctypes.CDLL(str(lib / "libggml.so.0"), mode=ctypes.RTLD_GLOBAL)
    rpc = ctypes.CDLL(str(rpc_path), mode=ctypes.RTLD_GLOBAL)
    g.ggml_backend_dev_by_type.restype = ctypes.c_void_p
    g.ggml_backend_dev_by_type.argtypes = [ctypes.c_int]
    g.ggml_backend_register.argtypes = [ctypes.c_void_p]
    g.ggml_backend_register.restype = None
    rpc.ggml_backend_rpc_add_server.restype = ctypes.c_void_p
    rpc.ggml_backend_rpc_add_server.argtypes = [ctypes.c_char_p]
    rpc.ggml_backend_rpc_start_server.restype = None
    rpc.ggml_backend_rpc_start_server.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_size_t,
                                                  ctypes.c_size_t, ctypes.POINTER(ctypes.c_void_p)]
    return g, rpc


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
    g, rpc = _ggml()
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


# ---------------------------------------------------------------- head child (the only process with RPC)

def socket_bytes(endpoints: list[str]) -> list[int]:
    """[sent, received] bytes over this process's TCP connections to the given endpoints, from TCP_INFO.

    /proc/PID/io does not count send()/recv(), so ask the kernel per socket:
    struct tcp_info has tcpi_bytes_acked at offset 120 and tcpi_bytes_received
    at 128 (Linux >= 4.2).
    """
    import struct

    want = {tuple(ep.rsplit(":", 1)) for ep in endpoints}
    sent = recv = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            if not os.readlink(f"/proc/self/fd/{fd}").startswith("socket:"):
                continue
            s = socket.socket(fileno=os.dup(int(fd)))
        except OSError:
            continue
        try:
            if s.type != socket.SOCK_STREAM or s.family != socket.AF_INET:
                continue
            host, port = s.getpeername()
            if (host, str(port)) not in want:
                continue
            info = s.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 232)
            if len(info) >= 136:
                a, r = struct.unpack_from("QQ", info, 120)
                sent, recv = sent + a, recv + r
        except OSError:
            pass
        finally:
            s.close()
    return [sent, recv]


def run_head() -> None:
    """JSON lines in on stdin, out on fd 3 (stdout is pointed at stderr: llama.cpp may print)."""
    out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    inp = sys.stdin

    def say(msg: dict[str, Any]) -> None:
        out.write(json.dumps(msg) + "\n")

    first = json.loads(inp.readline())
    try:
        import llama_cpp

        g, rpc = _ggml()
        for ep in first["servers"]:
            reg = rpc.ggml_backend_rpc_add_server(ep.encode())
            if not reg:
                raise EngineError(f"cannot register RPC server {ep}")
            g.ggml_backend_register(reg)
        llm = llama_cpp.Llama(first["model"], n_gpu_layers=first["n_gpu_layers"],
                              tensor_split=first.get("tensor_split") or None, n_ctx=first["n_ctx"],
                              n_threads=first.get("threads"), verbose=bool(first.get("verbose")), seed=0)
    except Exception as exc:
        say({"ok": False, "error": f"{type(exc).__name__}: {exc}"})
        return
    say({"ok": True, "n_ctx": llm.n_ctx(), "net": socket_bytes(first["servers"])})
    for line in inp:
        req = json.loads(line)
        if req.get("op") != "generate":
            continue
        if req.get("seed") is not None:
            llm.set_seed(int(req["seed"]))
        gen = llm.generate(req["ids"], top_k=req.get("top_k") or 0, top_p=req["top_p"], min_p=0.0,
                           temp=req["temperature"], repeat_penalty=1.0, reset=True)
        n, reason = 0, "length"
        for tok in gen:
            if tok == llm.token_eos() or llama_cpp.llama_vocab_is_eog(llm._model.vocab, tok):
                reason = "stop"
                break
            n += 1
            say({"tok": tok})
            if n >= req["max_tokens"]:
                break
            if json.loads(inp.readline()).get("op") != "more":
                reason = "cancelled"
                break
        gen.close()
        say({"done": reason, "net": socket_bytes(first["servers"])})


# ---------------------------------------------------------------- head side (in the server)

class LlamaRpcEngine(Engine):
    """A GGUF model, the first stage on this machine's CPU, the other stages on RPC workers.

    stages: [{"host", "port", "layers": [a, b]}, ...] in layer order; stage 0 is
    this machine (its host/port unused), the others are the workers' RPC endpoints.
    """

    name = NAME
    serve_options = ("n_ctx", "threads")

    def __init__(self, model_spec: str, stages: list[dict[str, Any]], *, n_ctx: int = 512,
                 threads: int | None = None, token_timeout: float = 30.0, load_timeout: float = 120.0,
                 verbose: bool = False, **_: Any) -> None:
        self.model_path = Path(model_spec)
        if not self.model_path.is_file():
            raise EngineError(f"{model_spec}: no such GGUF file; pass the path of a .gguf model")
        self.model_id = self.model_path.stem
        if not stages:
            raise EngineError("llama-rpc needs at least one stage (the head)")
        self.stages = [dict(s) for s in stages]
        for s in self.stages[1:]:
            checks.whole(s.get("port"), "worker port", 1, 65535)
        self.n_ctx, self.threads, self.verbose = n_ctx, threads, verbose
        self.token_timeout, self.load_timeout = token_timeout, load_timeout
        self._lock = threading.Lock()       # one generation at a time through the child
        self._tok_lock = threading.Lock()
        self._proc: subprocess.Popen | None = None
        self._stderr: deque[str] = deque(maxlen=40)
        self._vocab: Any = None
        self.restarts = -1
        self._stats = {"requests": 0, "tokens": 0, "decode_s": 0.0, "first_token_s": 0.0, "errors": 0,
                       "worker_bytes": 0, "last_error": None}
        self._lat: deque[float] = deque(maxlen=512)
        self._net_seen = [0, 0]
        self._q: queue.Queue = queue.Queue()

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

        try:
            self._vocab = llama_cpp.Llama(str(self.model_path), vocab_only=True, verbose=False)
        except Exception as exc:
            raise EngineError(f"{self.model_path} cannot be loaded by llama.cpp ({exc}): is it a GGUF model?") from None
        with self._lock:
            self._spawn()

    def _spawn(self) -> None:
        """Probe the workers, then start the child and wait until the model is loaded across them."""
        for ep, problem in self._down(timeout=2.0).items():
            raise EngineUnavailable(f"llama-rpc worker {ep} is down ({problem}): the agent restarts it; "
                                    "retry in a few seconds")
        ngl, split = self._n_gpu_layers_and_split()
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        proc = subprocess.Popen([sys.executable, "-m", "tiers.tier3.llama_rpc", "head"], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True, bufsize=1,
                                cwd=str(Path(__file__).resolve().parents[2]))
        threading.Thread(target=self._drain, args=(proc,), daemon=True).start()
        # Lines are read by a thread into a queue: select() on a buffered pipe would miss a second
        # line already read into the buffer with the first.
        self._q = queue.Queue()
        threading.Thread(target=self._pump, args=(proc, self._q), daemon=True).start()
        proc.stdin.write(json.dumps({"model": str(self.model_path), "servers": self.workers, "n_gpu_layers": ngl,
                                     "tensor_split": split, "n_ctx": self.n_ctx, "threads": self.threads,
                                     "verbose": self.verbose}) + "\n")
        proc.stdin.flush()
        self._proc = proc
        reply = self._read(self.load_timeout, "loading the model")
        if not reply.get("ok"):
            self._kill()
            raise EngineError(f"llama.cpp could not load {self.model_path.name}: {reply.get('error')}")
        self.n_ctx = reply["n_ctx"]
        self.restarts += 1
        self._net_seen = list(reply.get("net") or [0, 0])  # the weights' upload is not per-token traffic

    @staticmethod
    def _pump(proc: subprocess.Popen, q: queue.Queue) -> None:
        for line in proc.stdout:
            q.put(line)
        q.put("")

    def _drain(self, proc: subprocess.Popen) -> None:
        for line in proc.stderr:
            line = line.rstrip()
            if line:
                self._stderr.append(line)

    def _kill(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.kill()
        if proc is not None:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass

    def _lost(self, what: str) -> EngineUnavailable:
        """The child died or hung: name the worker(s) that are down, if we can tell."""
        code = self._proc.poll() if self._proc else None
        self._kill()
        down = [f"{ep} ({p})" for ep, p in self._down(timeout=1.0).items()]
        tail = next((l for l in reversed(self._stderr) if "rpc" in l.lower() or "abort" in l.lower()), "")
        who = f"worker {', '.join(down)} is down" if down else "a worker connection failed"
        msg = f"lost a llama-rpc peer while {what}: {who}" + (f" [{tail[:160]}]" if tail else "") \
              + (f" (the head's llama.cpp process exited with code {code})" if code is not None else "") \
              + "; the agent restarts workers: retry shortly"
        self._stats["errors"] += 1
        self._stats["last_error"] = msg
        return EngineUnavailable(msg)

    def _read(self, timeout: float, what: str) -> dict[str, Any]:
        if self._proc is None:
            raise self._lost(what)
        try:
            line = self._q.get(timeout=timeout)
        except queue.Empty:
            line = ""
        if not line:
            raise self._lost(what)
        return json.loads(line)

    def _send(self, msg: dict[str, Any]) -> None:
        try:
            self._proc.stdin.write(json.dumps(msg) + "\n")
            self._proc.stdin.flush()
        except (BrokenPipeError, OSError, AttributeError):
            raise self._lost("sending a request") from None

    def _count_net(self, net: list[int] | None) -> None:
        """The child reports cumulative socket bytes; add what this generation moved."""
        if not net:
            return
        prev = self._net_seen
        self._net_seen = list(net)
        self._stats["worker_bytes"] += max(0, net[0] - prev[0]) + max(0, net[1] - prev[1])

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
            except Exception as exc:
                raise EngineError(f"the model's chat template failed on these messages: {exc}") from None
        # No template in the GGUF (a base model): a plain transcript the model can continue.
        return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"

    def generate(self, prompt_ids: list[int], sampling: Sampling) -> Iterator[Piece]:
        if len(prompt_ids) + sampling.max_tokens > self.n_ctx:
            raise EngineError(f"prompt ({len(prompt_ids)} tokens) + max_tokens ({sampling.max_tokens}) exceeds the "
                              f"context of {self.n_ctx} tokens: shorten the prompt or lower max_tokens")
        return self._generate(list(prompt_ids), sampling)

    def _generate(self, prompt_ids: list[int], sampling: Sampling) -> Iterator[Piece]:
        with self._lock:
            if self._proc is None or self._proc.poll() is not None:
                self._kill()
                self._spawn()
            self._stats["requests"] += 1
            t0 = time.perf_counter()
            req = {"op": "generate", "ids": prompt_ids, "max_tokens": sampling.max_tokens,
                   "temperature": float(sampling.temperature), "top_p": float(sampling.top_p),
                   "top_k": sampling.top_k or 0, "seed": sampling.seed}
            self._send(req)
            decoder = codecs.getincrementaldecoder("utf-8")("replace")
            done_ids: list[int] = []
            finished = False
            last = t0
            try:
                while True:
                    msg = self._read(self.token_timeout, "generating")
                    if "done" in msg:
                        finished = True
                        self._count_net(msg.get("net"))
                        reason = "stop" if msg["done"] == "stop" else "length"
                        tail = decoder.decode(b"", final=True)
                        yield Piece(text=tail, token_ids=[], finish_reason=reason)
                        return
                    tok = msg["tok"]
                    now = time.perf_counter()
                    if not done_ids:
                        self._stats["first_token_s"] += now - t0
                    else:
                        self._lat.append(now - last)
                    last = now
                    # the context decides the token's text (SentencePiece's leading space)
                    text = decoder.decode(self.detokenize([tok], prompt_ids + done_ids))
                    done_ids.append(tok)
                    self._stats["tokens"] += 1
                    yield Piece(text=text, token_ids=[tok])
                    if len(done_ids) < sampling.max_tokens:
                        self._send({"op": "more"})
            finally:
                self._stats["decode_s"] += time.perf_counter() - t0
                if not finished and self._proc is not None and self._proc.poll() is None:
                    # The client went away mid-way: tell the child to stop, wait for its "done".
                    try:
                        self._send({"op": "stop"})
                        while "done" not in (msg := self._read(self.token_timeout, "stopping")):
                            pass
                        self._count_net(msg.get("net"))
                    except EngineUnavailable:
                        pass

    def stats(self) -> dict[str, Any]:
        s = dict(self._stats)
        lat = sorted(self._lat)
        toks = s["tokens"]
        return {
            "engine": self.name, "model": self.model_id,
            "stages": [{"host": st.get("host"), "port": st.get("port"), "layers": st["layers"],
                        "role": "head (CPU)" if i == 0 else "llama.cpp RPC worker"}
                       for i, st in enumerate(self.stages)],
            "requests": s["requests"], "tokens": toks, "errors": s["errors"], "last_error": s["last_error"],
            "tokens_per_s": toks / s["decode_s"] if s["decode_s"] else None,
            "time_to_first_token_ms": 1e3 * s["first_token_s"] / s["requests"] if s["requests"] else None,
            "token_latency_ms_p50": 1e3 * lat[len(lat) // 2] if lat else None,
            "token_latency_ms_p90": 1e3 * lat[int(len(lat) * 0.9)] if lat else None,
            # llama.cpp does not split its timings by device; what we can measure is the traffic.
            "bytes_per_token_head_workers": s["worker_bytes"] / toks if toks and len(self.stages) > 1 else 0,
            "bytes_basis": "TCP_INFO bytes sent+received on the head's sockets to the workers, per generated token "
                           "(includes prompt processing and llama.cpp's serialized compute graph)",
            "head_restarts": max(self.restarts, 0),
        }

    def health(self) -> dict[str, Any]:
        alive = self._proc is not None and self._proc.poll() is None
        down = {} if alive else self._down(timeout=0.5)
        workers = [{"endpoint": ep, "up": ep not in down} for ep in self.workers]
        return {"ok": alive and all(w["up"] for w in workers), "head_process": alive, "workers": workers}

    def close(self) -> None:
        proc = self._proc
        if proc is not None and proc.poll() is None:
            try:
                proc.stdin.close()
            except OSError:
                pass
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        self._kill()


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
            run_head()
    except EngineError as exc:
        print(f"llama-rpc: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

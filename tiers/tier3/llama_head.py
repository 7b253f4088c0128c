"""The head's llama.cpp process: one context, up to `parallel` sequences decoded together.

    server (LlamaRpcEngine)                          this process (python -m tiers.tier3.llama_rpc head)
      {"op": "generate", "rid": 7, "ids": [...]} --> a free sequence id; its prompt fed in chunks
      {"op": "stop", "rid": 7}                   --> its KV cells removed, the id freed
                                                 <-- {"toks": [[rid, tok], ...], "batch": [...]}  every step
                                                 <-- {"rid": 7, "done": "stop" | "length" | "cancelled"}
    every step: ONE llama_batch = the next token of each decoding sequence
                                + prompt tokens of newly admitted ones (a chunk while others decode),
                each token with its own pos and seq_id, logits only where a token is sampled
                -> one llama_decode -> per-sequence sampling (argmax when greedy, else its seeded sampler)

Why one batch: CPU decode is bound by reading the weights, and one llama_decode
over every sequence's next token reads them once; with RPC workers one round
trip per step carries every sequence's hidden states. A long prompt goes in
chunks so the sequences already decoding keep streaming.

The KV cache is unified (llama.cpp's `--kv-unified`): n_ctx cells shared by all
sequences, so one request alone may use the whole context. The server admits a
request only when its prompt + max_tokens fits what the others left.

Why a separate process: any failed send or receive inside ggml's RPC client
calls abort(); this process is the only one that links it (llama_rpc.py).
Its stdout is pointed at stderr (llama.cpp may print); the messages go out on
a duplicate of the original stdout.
"""
from __future__ import annotations

import ctypes
import json
import os
import queue
import socket
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tiers.tier3.engine import EngineError

PREFILL_CHUNK = 64     # prompt tokens per step while other sequences decode


# ---------------------------------------------------------------- the bundled ggml libraries

def _lib_dir() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or not spec.origin:
        raise EngineError("llama-cpp-python is not installed: pip install llama-cpp-python (built with GGML_RPC=on)")
    return Path(spec.origin).parent / "lib"


def ggml_libs() -> tuple[ctypes.CDLL, ctypes.CDLL]:
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


# ---------------------------------------------------------------- the model and its context

@dataclass
class _Model:
    model: Any
    ctx: Any
    vocab: Any
    n_vocab: int
    n_batch: int
    parallel: int
    keep: Any = None      # ctypes arrays the model params point at


def load(first: dict[str, Any]) -> _Model:
    """Register the RPC workers as ggml devices, load the model (its last layers on them), make the context."""
    import llama_cpp
    from llama_cpp._logger import set_verbose

    set_verbose(bool(first.get("verbose")))
    g, rpc = ggml_libs()
    for ep in first["servers"]:
        reg = rpc.ggml_backend_rpc_add_server(ep.encode())
        if not reg:
            raise EngineError(f"cannot register RPC server {ep}")
        g.ggml_backend_register(reg)
    llama_cpp.llama_backend_init()
    mp = llama_cpp.llama_model_default_params()
    mp.n_gpu_layers = int(first["n_gpu_layers"])
    split = None
    if first.get("tensor_split"):
        split = (ctypes.c_float * llama_cpp.LLAMA_MAX_DEVICES)(*first["tensor_split"])
        mp.tensor_split = split
    model = llama_cpp.llama_model_load_from_file(first["model"].encode(), mp)
    if not model:
        raise EngineError(f"llama.cpp could not load {first['model']}")
    parallel = int(first.get("parallel") or 1)
    threads = int(first.get("threads") or max((os.cpu_count() or 2) // 2, 1))
    cp = llama_cpp.llama_context_default_params()
    cp.n_ctx = int(first["n_ctx"])
    cp.n_batch = cp.n_ubatch = min(512, int(first["n_ctx"]))
    cp.n_seq_max = parallel
    cp.kv_unified = True     # n_ctx cells shared: one request alone may use all of them
    cp.n_threads = cp.n_threads_batch = threads
    ctx = llama_cpp.llama_init_from_model(model, cp)
    if not ctx:
        llama_cpp.llama_model_free(model)
        raise EngineError(f"llama.cpp could not make a context of {cp.n_ctx} tokens x {parallel} sequences")
    vocab = llama_cpp.llama_model_get_vocab(model)
    return _Model(model, ctx, vocab, llama_cpp.llama_vocab_n_tokens(vocab), llama_cpp.llama_n_batch(ctx),
                  parallel, split)


# ---------------------------------------------------------------- one sequence

@dataclass
class _Seq:
    rid: int
    seq: int
    prompt: list[int]
    max_tokens: int
    sampler: Any = None      # None: greedy (argmax)
    fed: int = 0             # prompt tokens in the KV cache
    pos: int = 0             # positions in the KV cache
    last: int = -1           # the token to feed next
    produced: int = 0

    @property
    def decoding(self) -> bool:
        return self.fed == len(self.prompt)


def _sampler(req: dict[str, Any]) -> Any:
    """None for greedy; else a chain top-k -> top-p -> temperature -> a draw seeded from the request."""
    import llama_cpp as L

    temp = float(req.get("temperature") or 0.0)
    if temp <= 0:
        return None
    chain = L.llama_sampler_chain_init(L.llama_sampler_chain_default_params())
    if req.get("top_k"):
        L.llama_sampler_chain_add(chain, L.llama_sampler_init_top_k(int(req["top_k"])))
    if float(req.get("top_p") or 1.0) < 1.0:
        L.llama_sampler_chain_add(chain, L.llama_sampler_init_top_p(float(req["top_p"]), 1))
    L.llama_sampler_chain_add(chain, L.llama_sampler_init_temp(temp))
    seed = req.get("seed")
    L.llama_sampler_chain_add(chain, L.llama_sampler_init_dist(L.LLAMA_DEFAULT_SEED if seed is None
                                                               else int(seed) & 0xFFFFFFFF))
    return chain


# ---------------------------------------------------------------- the loop

class _Loop:
    """Admitted sequences, the shared batch, one step at a time."""

    def __init__(self, m: _Model, say: Any, servers: list[str]):
        import llama_cpp

        self.L, self.m, self.say, self.servers = llama_cpp, m, say, servers
        self.free = list(range(m.parallel))
        self.active: dict[int, _Seq] = {}            # admission order
        self.batch = llama_cpp.llama_batch_init(m.n_batch, 0, 1)
        self.mem = llama_cpp.llama_get_memory(m.ctx)

    def admit(self, req: dict[str, Any]) -> None:
        rid = int(req["rid"])
        if not self.free:
            self.say({"rid": rid, "done": "error", "error": f"all {self.m.parallel} sequences are busy"})
            return
        ids = [int(t) for t in req["ids"]]
        self.active[rid] = _Seq(rid, self.free.pop(0), ids, int(req["max_tokens"]), _sampler(req))

    def finish(self, rid: int, reason: str, error: str | None = None) -> None:
        s = self.active.pop(rid, None)
        if s is None:
            return       # already finished: a stop that crossed its "done"
        self.L.llama_memory_seq_rm(self.mem, s.seq, -1, -1)
        if s.sampler is not None:
            self.L.llama_sampler_free(s.sampler)
        self.free.append(s.seq)
        self.say({"rid": rid, "done": reason, **({"error": error} if error else {}),
                  "net": socket_bytes(self.servers)})

    def _fill(self) -> tuple[list[tuple[_Seq, int]], int, int]:
        """The step's batch: (sequence, batch index) for each logit wanted, tokens, decoding sequences."""
        b, n, out = self.batch, 0, []

        def add(tok: int, pos: int, seq: int, logits: bool) -> None:
            nonlocal n
            b.token[n], b.pos[n], b.n_seq_id[n], b.logits[n] = tok, pos, 1, int(logits)
            b.seq_id[n][0] = seq
            n += 1

        decoding = [s for s in self.active.values() if s.decoding]
        for s in decoding:
            out.append((s, n))
            add(s.last, s.pos, s.seq, True)
            s.pos += 1
        room = self.m.n_batch - n
        if decoding:
            room = min(room, PREFILL_CHUNK)
        for s in self.active.values():
            if s.decoding or room <= 0:
                continue
            take = min(room, len(s.prompt) - s.fed)
            for j in range(take):
                last = s.fed + j == len(s.prompt) - 1
                if last:
                    out.append((s, n))
                add(s.prompt[s.fed + j], s.pos + j, s.seq, last)
            s.fed, s.pos, room = s.fed + take, s.pos + take, room - take
        b.n_tokens = n
        return out, n, len(decoding)

    def step(self) -> None:
        import numpy as np

        L, m = self.L, self.m
        want, n, decoding = self._fill()
        t0 = time.perf_counter()
        rc = L.llama_decode(m.ctx, self.batch)
        ms = 1e3 * (time.perf_counter() - t0)
        if rc != 0:
            for rid in list(self.active):   # their positions are unknown now: end every sequence
                self.finish(rid, "error", f"llama_decode returned {rc} for a batch of {n} tokens")
            return
        toks, ended = [], []
        for s, i in want:
            if s.sampler is None:
                tok = int(np.ctypeslib.as_array(L.llama_get_logits_ith(m.ctx, i), shape=(m.n_vocab,)).argmax())
            else:
                tok = int(L.llama_sampler_sample(s.sampler, m.ctx, i))
            if L.llama_vocab_is_eog(m.vocab, tok):
                ended.append((s.rid, "stop"))
                continue
            toks.append([s.rid, tok])
            s.last, s.produced = tok, s.produced + 1
            if s.produced >= s.max_tokens:
                ended.append((s.rid, "length"))
        self.say({"toks": toks, "batch": [n, decoding, len(self.active)], "ms": round(ms, 3)})
        for rid, reason in ended:
            self.finish(rid, reason)

    def close(self) -> None:
        for rid in list(self.active):
            self.finish(rid, "cancelled")
        self.L.llama_batch_free(self.batch)


def _read_lines(inp: Any, inbox: queue.Queue) -> None:
    for line in inp:
        if line.strip():
            inbox.put(json.loads(line))
    inbox.put(None)


def run_head() -> None:
    """JSON lines in on stdin, out on fd 3 (stdout is pointed at stderr: llama.cpp may print)."""
    out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    lock = threading.Lock()

    def say(msg: dict[str, Any]) -> None:
        with lock:
            out.write(json.dumps(msg) + "\n")

    first = json.loads(sys.stdin.readline())
    try:
        m = load(first)
    except Exception as exc:  # noqa: BLE001 - whatever llama.cpp raised goes back to the server as one line
        say({"ok": False, "error": f"{type(exc).__name__}: {exc}"})
        return
    import llama_cpp

    say({"ok": True, "n_ctx": llama_cpp.llama_n_ctx(m.ctx), "parallel": m.parallel, "n_batch": m.n_batch,
         "net": socket_bytes(first["servers"])})
    inbox: queue.Queue = queue.Queue()
    threading.Thread(target=_read_lines, args=(sys.stdin, inbox), daemon=True).start()
    loop = _Loop(m, say, first["servers"])
    try:
        while True:
            msgs = [] if loop.active else [inbox.get()]
            while True:
                try:
                    msgs.append(inbox.get_nowait())
                except queue.Empty:
                    break
            for msg in msgs:
                if msg is None:
                    return
                if msg.get("op") == "generate":
                    loop.admit(msg)
                elif msg.get("op") == "stop":
                    loop.finish(int(msg["rid"]), "cancelled")
            if loop.active:
                loop.step()
    finally:
        loop.close()
        llama_cpp.llama_free(m.ctx)
        llama_cpp.llama_model_free(m.model)

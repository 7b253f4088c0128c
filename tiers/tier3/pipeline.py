"""The `pipeline` engine: the project's own GPT (or a Hugging Face Llama folder) split by layer range.

    head (stage 0, in the serving process)      worker r (stage r, started by an agent)
    PipelineEngine(spec, stages)                python -m tiers.tier3.pipeline worker --rank r ...
      embedding + blocks [0, b0)                  blocks [a_r, b_r) (+ final norm, output, sampling if last)
         | hidden state (1, T, n_embd) --gloo-->  ... --> last stage --(sampled token)--> head

Why it is built this way:

- One request is one sequence with its own KV cache on every stage (models.gpt.KVCache
  has one position per cache, so requests are not batched together). Several requests
  fill the pipeline instead: while stage 1 computes request A's token, the head computes
  request B's. Stages process messages in order, so the head matches replies to the
  requests it sent first-in, first-out.
- The last stage samples (per request, from a generator seeded by the head) and sends
  back one token, not 200 KB of logits. Greedy and seeded sampling give exactly the
  tokens of single-node ``GPT.generate``.
- Every message carries each stage's compute time for that step, so the head reports
  per-stage compute and, by subtraction from the round trip, the time on the network.
- Transport is torch.distributed point-to-point (gloo; NCCL with ``backend="nccl"`` on
  CUDA nodes) with explicit timeouts on every wait, never the 30-minute default.
- A lost peer breaks the process group for good; torch.distributed needs every rank to
  re-initialise. So sessions have epochs: the head owns a TCPStore (the rendezvous at
  stage 0's host:port); idle workers announce themselves there; when all are present the
  head starts epoch N (a fresh PrefixStore, a fresh process group) and they all join.
  A failure anywhere ends the epoch: in-flight and new requests get EngineUnavailable
  (HTTP 503), workers go back to idle, and the head starts the next epoch as soon as
  every worker is back (e.g. restarted by its agent).

The worker protocol is unauthenticated (like every torch.distributed backend): the
agent's token gates who can start a worker, and addresses should be on the LAN only.
"""
from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import json
import os
import queue
import re
import secrets
import socket
import socketserver
import sys
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tiers.tier3.engine import Engine, EngineError, EngineUnavailable, Piece, Sampling

NAME = "pipeline"

# Random-weight models every node builds identically from a seed (models.gpt's per-layer init).
PRESETS: dict[str, dict[str, Any]] = {
    "gpt-tiny": {"arch": "gpt2", "n_layer": 4, "n_head": 4, "n_embd": 64, "vocab_size": 256, "block_size": 256},
    "llama-tiny": {"arch": "llama", "n_layer": 4, "n_head": 4, "n_kv_head": 2, "n_embd": 64, "vocab_size": 256,
                   "block_size": 256},
    "gpt-124m": {"arch": "gpt2", "n_layer": 12, "n_head": 12, "n_embd": 768, "vocab_size": 50304,
                 "block_size": 1024},
    "gpt-300m": {"arch": "gpt2", "n_layer": 24, "n_head": 16, "n_embd": 1024, "vocab_size": 50304,
                 "block_size": 1024},
    "llama-300m": {"arch": "llama", "n_layer": 24, "n_head": 16, "n_kv_head": 4, "n_embd": 1024,
                   "vocab_size": 32000, "block_size": 2048, "tie_weights": False},
}
DTYPES = ("float32", "bfloat16", "float16")

# Message layout (float64 so ids and seeds up to 2**53 travel exactly).
OP_STEP, OP_FREE, OP_PING, OP_CLOSE = 1.0, 2.0, 3.0, 4.0
H_OP, H_RID, H_T, H_START, H_MAXLEN, H_TEMP, H_TOPK, H_TOPP, H_SEED = range(9)
HDR = 10        # header: the fields above + one spare, then one compute-ms slot per stage
REPLY = 4       # reply: op, rid, token, spare, then one compute-ms slot per stage


# ---------------------------------------------------------------- tokenizers

class ByteTokenizer:
    """UTF-8 bytes are ids 0-255 (random-weight models); larger ids, which only random weights
    produce, are shown as <id> so nothing is silently dropped."""

    eos_ids: frozenset[int] = frozenset()

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        out, run = [], bytearray()
        for i in ids:
            if 0 <= i < 256:
                run.append(i)
            else:
                out.append(run.decode("utf-8", errors="replace"))
                run = bytearray()
                out.append(f"<{i}>")
        out.append(run.decode("utf-8", errors="replace"))
        return "".join(out)

    def chat(self, messages: list[dict[str, str]]) -> str:
        return plain_chat(messages)


class CharTokenizer:
    """One id per character (a tierkit checkpoint's meta {"tokenizer": {"kind": "char", "chars": ...}})."""

    eos_ids: frozenset[int] = frozenset()

    def __init__(self, chars: str):
        self.chars = chars
        self.stoi = {c: i for i, c in enumerate(chars)}

    def encode(self, text: str) -> list[int]:
        bad = next((c for c in text if c not in self.stoi), None)
        if bad is not None:
            raise EngineError(f"character {bad!r} is not in this model's {len(self.chars)}-character vocabulary")
        return [self.stoi[c] for c in text]

    def decode(self, ids: list[int]) -> str:
        return "".join(self.chars[i] if 0 <= i < len(self.chars) else f"<{i}>" for i in ids)

    def chat(self, messages: list[dict[str, str]]) -> str:
        return plain_chat(messages)


class HFTokenizer:
    """tokenizer.json through `tokenizers`, the chat template of tokenizer_config.json (sandboxed Jinja)."""

    def __init__(self, folder: Path):
        from tokenizers import Tokenizer

        path = folder / "tokenizer.json"
        if not path.is_file():
            raise EngineError(f"{folder}: no tokenizer.json (save the tokenizer with the model: "
                              f"tokenizer.save_pretrained(folder))")
        self.tok = Tokenizer.from_file(str(path))
        tc = _json_or_empty(folder / "tokenizer_config.json")
        self.template = tc.get("chat_template")
        self.bos = _token_text(tc.get("bos_token"))
        self.eos = _token_text(tc.get("eos_token"))
        eos: set[int] = set()
        for src in (_json_or_empty(folder / "config.json"), _json_or_empty(folder / "generation_config.json")):
            e = src.get("eos_token_id")
            eos.update([e] if isinstance(e, int) else [x for x in e or [] if isinstance(x, int)])
        if self.eos and self.tok.token_to_id(self.eos) is not None:
            eos.add(self.tok.token_to_id(self.eos))
        self.eos_ids = frozenset(eos)

    def encode(self, text: str) -> list[int]:
        # a rendered chat template already starts with BOS: do not add a second one
        special = not (self.bos and text.startswith(self.bos))
        return self.tok.encode(text, add_special_tokens=special).ids

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)

    def chat(self, messages: list[dict[str, str]]) -> str:
        if not self.template:
            return plain_chat(messages)
        from jinja2 import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def fail(msg: str) -> None:
            raise EngineError(f"chat template: {msg}")

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = fail
        try:
            return env.from_string(self.template).render(messages=messages, add_generation_prompt=True,
                                                         bos_token=self.bos or "", eos_token=self.eos or "")
        except TemplateError as e:
            raise EngineError(f"chat template failed: {e}") from None


def plain_chat(messages: list[dict[str, str]]) -> str:
    """For models without a template: one "role: content" line each, then "assistant:"."""
    return "".join(f"{m.get('role', 'user')}: {m.get('content', '')}\n" for m in messages) + "assistant:"


def _json_or_empty(path: Path) -> dict[str, Any]:
    try:
        d = json.loads(path.read_text())
        return d if isinstance(d, dict) else {}
    except (OSError, json.JSONDecodeError):
        return {}


def _token_text(t: Any) -> str | None:
    return t.get("content") if isinstance(t, dict) else t if isinstance(t, str) else None


# ---------------------------------------------------------------- what a model spec names

@dataclass
class ModelSource:
    """A model spec resolved: its config and how to build a stage of it and its tokenizer."""

    spec: str
    kind: str          # "random" | "tierkit" | "hf"
    cfg: Any           # models.gpt.GPTConfig (None for a tierkit checkpoint until loaded)
    path: Path | None = None
    preset: str = ""


def resolve(spec: str) -> ModelSource:
    """Classify a model spec without loading weights; EngineError (one line) when it names nothing usable."""
    if not isinstance(spec, str) or not spec:
        raise EngineError("model must be a non-empty string: random:<preset>, a tierkit checkpoint or an HF folder")
    if spec.startswith("random:"):
        preset = spec.split(":", 1)[1]
        if preset not in PRESETS:
            raise EngineError(f"unknown random preset {preset!r}; choose one of {', '.join(PRESETS)}")
        from models.gpt import GPTConfig

        return ModelSource(spec, "random", GPTConfig(**PRESETS[preset]), preset=preset)
    path = Path(spec).expanduser()
    if path.is_dir():
        from models.hf_llama import HFCheckpointError, config_from_hf

        try:
            cfg = config_from_hf(path)
        except HFCheckpointError as e:
            raise EngineError(str(e)) from None
        return ModelSource(spec, "hf", cfg, path=path)
    if path.is_file():
        return ModelSource(spec, "tierkit", None, path=path)
    raise EngineError(f"model {spec!r}: no such file or folder (give a tierkit checkpoint, a Hugging Face "
                      f"Llama folder, or random:<preset>)")


def torch_dtype(name: str) -> Any:
    import torch

    if name not in DTYPES:
        raise EngineError(f"dtype must be one of {', '.join(DTYPES)}, not {name!r}")
    return getattr(torch, name)


def load_stage(src: ModelSource, layers: tuple[int, int], seed: int = 0, dtype: str = "float32",
               device: str = "cpu") -> tuple[Any, dict[str, Any]]:
    """(the GPT stage holding only ``layers``, the checkpoint meta); EngineError with one line if it cannot."""

    from models.gpt import GPT, load_checkpoint

    td = torch_dtype(dtype)
    a, b = layers
    try:
        if src.kind == "random":
            model, meta = GPT(src.cfg, layers=range(a, b), seed=seed), {}
        elif src.kind == "hf":
            from models.hf_llama import load_llama_stage

            model, meta = load_llama_stage(src.path, range(a, b), dtype=td), {}
        else:
            model, ckpt = load_checkpoint(src.path, layers=range(a, b))
            src.cfg, meta = model.config, ckpt.get("meta") or {}
    except (ValueError, FileNotFoundError, OSError) as e:
        raise EngineError(f"cannot load layers {a}:{b} of {src.spec}: {str(e).splitlines()[0]}") from None
    return model.to(device=device, dtype=td).eval(), meta


def make_tokenizer(src: ModelSource, meta: dict[str, Any]) -> Any:
    if src.kind == "hf":
        return HFTokenizer(src.path)
    tok = meta.get("tokenizer") if isinstance(meta, dict) else None
    if isinstance(tok, dict) and tok.get("kind") == "char" and isinstance(tok.get("chars"), str):
        return CharTokenizer(tok["chars"])
    if tok not in (None, "byte") and not (isinstance(tok, dict) and tok.get("kind") == "byte"):
        kind = tok.get("kind") if isinstance(tok, dict) else tok
        raise EngineError(f"{src.spec}: tokenizer {kind!r} in the checkpoint meta is not supported by the pipeline "
                          f"engine (char or byte)")
    if src.cfg.vocab_size < 256:
        raise EngineError(f"{src.spec}: no tokenizer in the checkpoint meta and a vocabulary of "
                          f"{src.cfg.vocab_size} < 256 bytes; save it with meta={{'tokenizer': ...}}")
    return ByteTokenizer()


# ---------------------------------------------------------------- one stage's computation

class StageRunner:
    """A GPT stage serving many requests: one KV cache per request id (and one sampler, on the last stage)."""

    def __init__(self, model: Any):
        self.model = model
        self.caches: dict[int, Any] = {}
        self.gens: dict[int, Any] = {}

    @property
    def is_last(self) -> bool:
        return self.model.has_head

    def step(self, rid: int, inp: Any, start: int, max_len: int) -> Any:
        """Run this stage for one request; hidden states out, or the last position's logits on the last stage."""
        import torch

        from models.gpt import KVCache

        if start == 0:
            self.caches[rid] = KVCache(self.model, batch_size=1, max_len=max_len)
        cache = self.caches.get(rid)
        if cache is None or cache.pos != start:
            raise RuntimeError(f"request {rid}: stage has position {None if cache is None else cache.pos}, "
                               f"message says {start}")
        with torch.no_grad():
            return self.model.forward_stage(inp, cache)

    def sample(self, rid: int, logits: Any, temperature: float, top_k: int, top_p: float, seed: int) -> int:
        import torch

        from models.gpt import sample_next

        gen = self.gens.get(rid)
        if gen is None and temperature > 0:
            gen = self.gens[rid] = torch.Generator(device=logits.device).manual_seed(seed)
        return int(sample_next(logits[:, -1, :], temperature, top_k or None, top_p, gen)[0, 0])

    def free(self, rid: int) -> None:
        self.caches.pop(rid, None)
        self.gens.pop(rid, None)

    def clear(self) -> None:
        self.caches.clear()
        self.gens.clear()


# ---------------------------------------------------------------- the wire

class LinkDown(Exception):
    """The process group of this epoch failed (peer gone, timeout); the epoch is over."""


class Link:
    """Point-to-point messages of one epoch: async sends kept alive until done, waits with a timeout."""

    def __init__(self, pg: Any, rank: int, world: int, timeout: float, comm_device: str = "cpu"):
        self.pg, self.rank, self.world, self.timeout = pg, rank, world, timeout
        self.comm_device = comm_device
        self.sends: deque[tuple[Any, Any]] = deque()

    def send(self, dst: int, t: Any) -> int:
        t = t.contiguous()
        try:
            self.sends.append((self.pg.send([t], dst, 0), t))
        except Exception as e:  # noqa: BLE001 - gloo raises RuntimeError with the transport's message
            raise LinkDown(_short(e, f"send to rank {dst}")) from None
        self.reap()
        return t.numel() * t.element_size()

    def reap(self, block: bool = False) -> None:
        """Retire finished sends (re-raising their errors); with block, wait for all of them."""
        while self.sends and (block or self.sends[0][0].is_completed()):
            w, _ = self.sends.popleft()
            self.wait(w, f"send from rank {self.rank}")

    def post_recv(self, src: int, t: Any) -> Any:
        try:
            return self.pg.recv([t], src, 0)
        except Exception as e:  # noqa: BLE001
            raise LinkDown(_short(e, f"recv from rank {src}")) from None

    def wait(self, work: Any, what: str, timeout: float | None = None) -> None:
        try:
            work.wait(dt.timedelta(seconds=timeout or self.timeout))
        except Exception as e:  # noqa: BLE001
            raise LinkDown(_short(e, what)) from None

    def recv(self, src: int, t: Any, what: str, timeout: float | None = None) -> Any:
        self.wait(self.post_recv(src, t), what, timeout)
        return t

    def close(self) -> None:
        self.sends.clear()
        pg, self.pg = self.pg, None
        if pg is not None:
            try:
                if hasattr(pg, "abort"):
                    pg.abort()   # wake any wait still pending on this group
            except Exception:  # noqa: BLE001, S110 - best effort: the group is being thrown away
                pass
            del pg


def _short(e: BaseException, what: str) -> str:
    msg = str(e).splitlines()[0] if str(e) else type(e).__name__
    msg = re.sub(r"^\[[^\]]*\]\s*", "", msg)   # drop gloo's "[/path/pair.cc:537]" prefix
    if "timed out" in msg.lower() or "timeout" in msg.lower():
        return f"{what}: timed out ({msg[:160]})"
    return f"{what}: {msg[:160]}"


class Wire:
    """The message format of a hop: one fixed-size byte message = header + one position's hidden state.

    A decode step (T == 1) is one message per hop, so one wake-up of the receiver; a prompt
    (T > 1) sends its (1, T, n_embd) hidden states as a second message the header announces.
    FREE, PING and CLOSE use the same message with the hidden-state part unused."""

    def __init__(self, world: int, n_embd: int, dtype: Any, device: Any):
        import torch

        self.world, self.C, self.dtype, self.device = world, n_embd, dtype, device
        self.hb = 8 * (HDR + world)
        self.size = self.hb + n_embd * torch.empty(0, dtype=dtype).element_size()

    def empty(self) -> Any:
        import torch

        return torch.zeros(self.size, dtype=torch.uint8, device=self.device)

    def header(self, buf: Any) -> Any:
        import torch

        return buf[:self.hb].view(torch.float64)

    def inline(self, buf: Any) -> Any:
        return buf[self.hb:].view(self.dtype).view(1, 1, self.C)

    def pack(self, header: Any, y: Any | None) -> Any:
        """A new message: ``header`` (float64, HDR + world) and, for one position, its hidden state."""
        buf = self.empty()
        self.header(buf).copy_(header)
        if y is not None and y.shape[1] == 1:
            self.inline(buf).copy_(y)
        return buf


def make_group(store: Any, prefix: str, rank: int, world: int, host: str, timeout: float,
               backend: str = "gloo") -> Any:
    """A fresh process group under ``prefix`` of the rendezvous store, bound to ``host``'s interface."""
    import torch.distributed as dist

    sub = dist.PrefixStore(prefix, store)
    if backend == "nccl":
        opts = dist.ProcessGroupNCCL.Options()
        opts._timeout = dt.timedelta(seconds=timeout)
        return dist.ProcessGroupNCCL(sub, rank, world, opts)
    opts = dist.ProcessGroupGloo._Options()
    opts._timeout = dt.timedelta(seconds=timeout)
    opts._devices = [dist.ProcessGroupGloo.create_device(hostname=host)]
    return dist.ProcessGroupGloo(sub, rank, world, opts)


def connect_store(host: str, port: int, timeout: float) -> Any:
    import torch.distributed as dist

    return dist.TCPStore(host, port, None, False, timeout=dt.timedelta(seconds=timeout), wait_for_workers=False)


def serve_store(host: str, port: int, timeout: float) -> Any:
    """The rendezvous store, listening on ``host`` only: we bind the socket and hand its descriptor to
    TCPStore, which owns (and closes) it from then on."""
    import torch.distributed as dist

    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(64)
    except OSError as e:
        sock.close()
        raise EngineError(f"cannot listen on {host}:{port} for the pipeline rendezvous ({e.strerror}); "
                          f"pick a free port or an address of this machine") from None
    return dist.TCPStore(host, port, None, True, timeout=dt.timedelta(seconds=timeout), wait_for_workers=False,
                         master_listen_fd=sock.detach(), use_libuv=False)


# ---------------------------------------------------------------- argument checks (shared by head and worker)

def _int(v: Any, what: str, lo: int, hi: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise EngineError(f"{what} must be a whole number {lo}-{hi}, not {v!r}")
    return v


def _num(v: Any, what: str, lo: float, hi: float) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not lo <= v <= hi:
        raise EngineError(f"{what} must be a number {lo:g}-{hi:g}, not {v!r}")
    return float(v)


def _host(v: Any, what: str) -> str:
    """An IP address or a plain hostname (never something argv could mistake for an option)."""
    s = str(v) if isinstance(v, str) else ""
    try:
        return str(ipaddress.ip_address(s))
    except ValueError:
        if re.fullmatch(r"[A-Za-z0-9](?:[A-Za-z0-9.-]{0,251}[A-Za-z0-9])?", s):
            return s
    raise EngineError(f"{what} must be an IP address or a hostname, not {v!r}")


def _hostport(v: Any, what: str) -> tuple[str, int]:
    m = re.fullmatch(r"\[?([^\]]+?)\]?:(\d{1,5})", v) if isinstance(v, str) else None
    if not m:
        raise EngineError(f"{what} must be HOST:PORT, not {v!r}")
    return _host(m.group(1), f"{what} host"), _int(int(m.group(2)), f"{what} port", 1, 65535)


def _layers(v: Any, what: str = "layers") -> tuple[int, int]:
    if isinstance(v, str) and re.fullmatch(r"\d+:\d+", v):
        v = [int(x) for x in v.split(":")]
    if not (isinstance(v, (list, tuple)) and len(v) == 2 and all(isinstance(x, int) and not isinstance(x, bool)
                                                                 for x in v)) or not 0 <= v[0] < v[1]:
        raise EngineError(f"{what} must be [a, b] with 0 <= a < b (blocks a..b-1), not {v!r}")
    return int(v[0]), int(v[1])


WORKER_KEYS = {"model", "layers", "rank", "world_size", "master", "host", "port", "seed", "dtype", "device",
               "timeout", "threads", "backend"}


def check_worker_args(args: Any) -> dict[str, Any]:
    """The launch arguments of one worker, validated and normalised; EngineError (one line) otherwise."""
    if not isinstance(args, dict):
        raise EngineError("pipeline worker args must be a JSON object")
    unknown = sorted(set(args) - WORKER_KEYS)
    if unknown:
        raise EngineError(f"unknown pipeline worker argument(s): {', '.join(unknown)} "
                          f"(allowed: {', '.join(sorted(WORKER_KEYS))})")
    for key in ("model", "layers", "rank", "world_size", "master"):
        if key not in args:
            raise EngineError(f"pipeline worker args lack {key!r}")
    src = resolve(args["model"])
    a, b = _layers(args["layers"])
    if src.cfg is not None and b > src.cfg.n_layer:
        raise EngineError(f"layers {a}:{b} are past the model's {src.cfg.n_layer} layers")
    world = _int(args["world_size"], "world_size", 2, 64)
    rank = _int(args["rank"], "rank", 1, world - 1)   # rank 0 is the head, in the serving process
    mhost, mport = _hostport(args["master"], "master")
    out = {"model": args["model"], "layers": [a, b], "rank": rank, "world_size": world,
           "master": f"{mhost}:{mport}" if ":" not in mhost else f"[{mhost}]:{mport}",
           "host": _host(args.get("host", "127.0.0.1"), "host"),
           "port": _int(args.get("port", 0), "port", 0, 65535),
           "seed": _int(args.get("seed", 0), "seed", 0, 2**53),
           "dtype": args.get("dtype", "float32"),
           "device": args.get("device", "cpu"),
           "timeout": _num(args.get("timeout", 30.0), "timeout", 0.5, 3600),
           "threads": _int(args.get("threads", 0), "threads", 0, 1024),
           "backend": args.get("backend", "gloo")}
    if out["dtype"] not in DTYPES:
        raise EngineError(f"dtype must be one of {', '.join(DTYPES)}, not {out['dtype']!r}")
    if not (isinstance(out["device"], str) and re.fullmatch(r"cpu|cuda(:\d+)?", out["device"])):
        raise EngineError(f"device must be cpu or cuda[:N], not {out['device']!r}")
    if out["backend"] not in ("gloo", "nccl") or (out["backend"] == "nccl" and not out["device"].startswith("cuda")):
        raise EngineError(f"backend must be gloo, or nccl with a cuda device, not {out['backend']!r} "
                          f"on {out['device']}")
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


def split_layers(cfg: Any, n_stages: int, head_blocks: float | None = None) -> list[tuple[int, int]]:
    """Contiguous ranges that balance decode compute. The last stage also runs the output
    projection, worth ``head_blocks`` blocks (default: its weights over a block's, as decode
    reads every weight once per token; ``measure_head_blocks`` times it on this machine);
    the first stage's embedding is a lookup and costs nothing."""
    if head_blocks is None:
        per_block = 12 * cfg.n_embd ** 2 if cfg.arch == "gpt2" else (
            2 * cfg.n_embd ** 2 + 2 * cfg.n_embd * cfg.kv_heads * cfg.head_dim + 3 * cfg.n_embd * cfg.hidden)
        head_blocks = cfg.vocab_size * cfg.n_embd / per_block
    total = cfg.n_layer + head_blocks
    bounds = [0]
    for k in range(1, n_stages):
        bounds.append(min(cfg.n_layer - (n_stages - k), max(bounds[-1] + 1, round(total * k / n_stages))))
    bounds.append(cfg.n_layer)
    return [(bounds[i], bounds[i + 1]) for i in range(n_stages)]


def measure_head_blocks(cfg: Any, reps: int = 20, ctx: int = 64) -> float:
    """The output projection's decode time in blocks' decode time, timed here (best of ``reps``):
    the analytic ratio misses how well each matrix shape runs on this CPU."""
    import torch

    from models.gpt import GPT, KVCache

    torch.manual_seed(0)
    small = GPT(type(cfg)(**{**cfg.to_dict(), "n_layer": 2}), layers=range(1, 2))   # one block + norm + head
    cache = KVCache(small, 1, ctx)
    x = torch.randn(1, 1, cfg.n_embd)
    best_block = best_head = float("inf")
    with torch.no_grad():
        for i in range(reps):
            cache.pos = i % (ctx - 1)
            t = time.perf_counter()
            h = small.blocks(x, cache, cache.pos)
            t1 = time.perf_counter()
            small.head(h)
            t2 = time.perf_counter()
            best_block, best_head = min(best_block, t1 - t), min(best_head, t2 - t1)
    return best_head / best_block


# ---------------------------------------------------------------- the worker process

class _Status(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True


def _status_server(host: str, port: int, info: dict[str, Any]) -> _Status:
    class H(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            self.request.sendall((json.dumps(info) + "\n").encode())

    srv = _Status((host, port), H)
    threading.Thread(target=srv.serve_forever, daemon=True, name="pipeline-status").start()
    return srv


def worker_status(host: str, port: int, timeout: float = 2.0) -> dict[str, Any] | None:
    """A worker's status line from its status port, or None if nothing answers."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as s:
            s.settimeout(timeout)
            data = b""
            while not data.endswith(b"\n"):
                chunk = s.recv(4096)
                if not chunk:
                    break
                data += chunk
        return json.loads(data)
    except (OSError, ValueError):
        return None


def run_worker(a: dict[str, Any], log: Any = None) -> None:
    """Host stage ``a["rank"]`` until killed: load the layers, then serve epoch after epoch."""
    import torch

    log = log or (lambda msg: print(f"pipeline worker {a['rank']}: {msg}", flush=True))
    if a["threads"]:
        torch.set_num_threads(a["threads"])
    if a["device"].startswith("cuda"):
        torch.cuda.set_device(torch.device(a["device"]))   # NCCL's point-to-point uses the current device
    src = resolve(a["model"])
    lo, hi = a["layers"]
    t0 = time.perf_counter()
    model, _ = load_stage(src, (lo, hi), a["seed"], a["dtype"], a["device"])
    if model.has_head != (a["rank"] == a["world_size"] - 1):
        raise EngineError(f"rank {a['rank']} of {a['world_size']} holds layers {lo}:{hi}, but the last rank must "
                          f"hold the last layer ({model.config.n_layer - 1}) and only the last rank")
    runner = StageRunner(model)
    info = {"engine": NAME, "model": a["model"], "rank": a["rank"], "layers": [lo, hi], "state": "loaded",
            "epoch": None, "pid": os.getpid()}
    if a["port"]:
        try:
            _status_server(a["host"], a["port"], info)
        except OSError as e:
            raise EngineError(f"cannot listen on {a['host']}:{a['port']} for status ({e.strerror})") from None
    log(f"layers {lo}:{hi} of {a['model']} loaded in {time.perf_counter() - t0:.1f} s; "
        f"rendezvous at {a['master']}")
    mhost, mport = _hostport(a["master"], "master")
    me = f"{os.getpid()}-{secrets.token_hex(4)}"
    while True:
        try:
            store = connect_store(mhost, mport, a["timeout"])
        except Exception as e:  # noqa: BLE001 - head not up (yet): keep trying, the agent stops us
            info["state"] = "waiting for the head"
            log(f"head rendezvous {a['master']} not reachable ({_short(e, 'connect')}); retrying")
            time.sleep(1.0)
            continue
        try:
            seen = store.get("epoch").decode() if store.check(["epoch"]) else ""
            while True:
                info["state"] = "idle"
                store.set(f"idle/{a['rank']}", me)
                while (cur := store.get("epoch").decode() if store.check(["epoch"]) else "") == seen:
                    time.sleep(0.05)
                seen = cur
                try:
                    pg = make_group(store, f"epoch/{cur}", a["rank"], a["world_size"], a["host"], a["timeout"],
                                    a["backend"])
                except Exception as e:  # noqa: BLE001 - the head gave up on that epoch; wait for the next
                    log(f"could not join epoch {cur}: {_short(e, 'rendezvous')}")
                    continue
                info.update(state="serving", epoch=cur)
                log(f"joined epoch {cur}")
                link = Link(pg, a["rank"], a["world_size"], a["timeout"],
                            a["device"] if a["backend"] == "nccl" else "cpu")
                try:
                    _serve_epoch(link, runner, a)
                    log(f"epoch {cur} closed by the head")
                except LinkDown as e:
                    log(f"epoch {cur} ended: {e}")
                finally:
                    runner.clear()
                    link.close()
        except Exception as e:  # noqa: BLE001 - the store went away (head restarted or gone): reconnect
            log(f"lost the rendezvous store ({_short(e, 'store')}); reconnecting")
            time.sleep(0.5)


def _serve_epoch(link: Link, runner: StageRunner, a: dict[str, Any]) -> None:
    """Receive from the previous rank, compute, pass on (or reply to the head from the last stage)."""
    import torch

    rank, world = a["rank"], a["world_size"]
    dev = torch.device(a["device"])
    dtype = next(runner.model.parameters()).dtype
    wire = Wire(world, runner.model.config.n_embd, dtype, link.comm_device)
    last = rank == world - 1
    bufs = [wire.empty(), wire.empty()]
    cur = 0
    pending = link.post_recv(rank - 1, bufs[cur])
    while True:
        link.wait(pending, f"waiting for rank {rank - 1}")
        buf = bufs[cur]
        hdr = wire.header(buf).clone()
        h = hdr.tolist()
        op, rid, T = h[H_OP], int(h[H_RID]), int(h[H_T])
        x = None
        if op == OP_STEP:
            x = wire.inline(buf).clone() if T == 1 else link.recv(
                rank - 1, torch.empty(1, T, wire.C, dtype=dtype, device=wire.device), f"hidden states from rank {rank - 1}")
        cur ^= 1
        pending = link.post_recv(rank - 1, bufs[cur])   # the next message may arrive while we compute
        y = None
        if op == OP_STEP:
            t = time.perf_counter()
            y = runner.step(rid, x.to(dev), int(h[H_START]), int(h[H_MAXLEN]))
            if last:
                token = runner.sample(rid, y, h[H_TEMP], int(h[H_TOPK]), h[H_TOPP], int(h[H_SEED]))
            else:
                y = y.to(wire.device)
            hdr[HDR + rank] = (time.perf_counter() - t) * 1e3
        elif op == OP_FREE:
            runner.free(rid)
        if last:
            reply = torch.zeros(REPLY + world, dtype=torch.float64, device=wire.device)
            reply[0], reply[1] = op, rid
            reply[2] = token if op == OP_STEP else -1
            reply[REPLY:] = hdr[HDR:]
            link.send(0, reply)
        else:
            link.send(rank + 1, wire.pack(hdr, y))
            if y is not None and T > 1:
                link.send(rank + 1, y)
        if op == OP_CLOSE:
            link.reap(block=True)
            return


def worker_main(argv: list[str]) -> int:
    # c10d logs every retry of a rendezvous with a C++ stack trace; this loop reports its own, in one line
    os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "FATAL")
    ap = argparse.ArgumentParser(prog="python -m tiers.tier3.pipeline worker",
                                 description="Host one stage of a pipeline-parallel model.")
    ap.add_argument("--model", required=True)
    ap.add_argument("--layers", required=True)
    ap.add_argument("--rank", type=int, required=True)
    ap.add_argument("--world-size", type=int, required=True)
    ap.add_argument("--master", required=True)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--timeout", type=float, default=30.0)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--backend", default="gloo")
    ns = ap.parse_args(argv)
    try:
        a = check_worker_args({"model": ns.model, "layers": ns.layers, "rank": ns.rank, "world_size": ns.world_size,
                               "master": ns.master, "host": ns.host, "port": ns.port, "seed": ns.seed,
                               "dtype": ns.dtype, "device": ns.device, "timeout": ns.timeout,
                               "threads": ns.threads, "backend": ns.backend})
        run_worker(a)
    except EngineError as e:
        print(f"pipeline worker: {e}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        return 0
    return 0


# ---------------------------------------------------------------- the head: the engine

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
    """A message in the pipe: the request it steps (None for FREE/PING/CLOSE) and its posted reply."""

    req: _Request | None
    work: Any
    reply: Any
    t: float
    T: int
    sent: int


class _Stream:
    """What generate() returns: pieces as the tokens arrive; closing it (or dropping it) cancels the request."""

    def __init__(self, engine: PipelineEngine, req: _Request):
        self.engine, self.req = engine, req
        self.ids: list[int] = []
        self.emitted = ""
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
        eos = tok in self.engine.tokenizer.eos_ids
        if not eos:
            self.ids.append(tok)
        text = self.engine.tokenizer.decode(self.ids)
        stops = [x for x in self.req.sampling.stop or [] if x]
        hit = min((i for i in (text.find(x) for x in stops) if i >= 0), default=-1)
        if hit >= 0:
            reason, text = "stop", text[:hit]
        elif eos:
            reason = "stop"
        elif reason is None:
            # hold back an incomplete UTF-8 sequence, and any tail that may be the start of a stop string
            keep = max((n for x in stops for n in range(min(len(x) - 1, len(text)), 0, -1)
                        if text.endswith(x[:n])), default=0)
            text = text[:len(text) - keep]
            text = text.removesuffix("\ufffd")
            text = text if len(text) >= len(self.emitted) else self.emitted
        new, self.emitted = text[len(self.emitted):], text
        if reason is not None:
            self.done = True
            if not self.req.finished:
                self.req.cancelled = True
        return Piece(text=new, token_ids=[tok], finish_reason=reason)

    def close(self) -> None:
        self.done = True
        self.req.cancelled = True

    def __del__(self) -> None:
        self.req.cancelled = True


class PipelineEngine(Engine):
    """A model split across ``stages``: stage 0 runs here, stage r on the worker an agent started.

    stages: [{"host", "port", "layers": [a, b]}, ...] in layer order. Stage 0's host:port is where
    this head listens for the rendezvous (the workers' ``master``); a worker's host:port is its
    own address and status port. With one stage the head runs the whole model (the 1-node case).
    opts: seed (random:<preset> weights), dtype, device, backend ("gloo" | "nccl"), timeout
    (seconds for any wait on a peer), connect_timeout (how long start() waits for the workers),
    ping_interval (idle heartbeat), max_inflight (steps in the pipeline; default 2 per stage).
    """

    name = NAME

    def __init__(self, model_spec: str, stages: list[dict[str, Any]], *, seed: int = 0, dtype: str = "float32",
                 device: str = "cpu", backend: str = "gloo", timeout: float = 30.0, connect_timeout: float = 60.0,
                 ping_interval: float = 1.0, max_inflight: int | None = None, **_ignored: Any):
        if not isinstance(stages, list) or not stages:
            raise EngineError("stages must be a non-empty list of {host, port, layers}")
        self.src = resolve(model_spec)
        self.model_spec, self.model_id = model_spec, Path(model_spec).name if self.src.kind != "random" else model_spec
        self.stages: list[dict[str, Any]] = []
        prev = 0
        for i, s in enumerate(stages):
            if not isinstance(s, dict):
                raise EngineError(f"stage {i} must be an object with host, port and layers")
            a, b = _layers(s.get("layers"), f"stage {i} layers")
            if a != prev:
                raise EngineError(f"stage {i} starts at layer {a}, but the previous stage ended at {prev}: "
                                  f"ranges must be contiguous from 0")
            prev = b
            self.stages.append({"host": _host(s.get("host", "127.0.0.1"), f"stage {i} host"),
                                "port": _int(s.get("port", 0), f"stage {i} port", 0, 65535), "layers": [a, b],
                                **({"name": s["name"]} if "name" in s else {})})
        if self.src.cfg is not None and prev != self.src.cfg.n_layer:
            raise EngineError(f"the stages cover layers 0:{prev}, the model has {self.src.cfg.n_layer}")
        self.W = len(self.stages)
        if self.W > 1 and not self.stages[0]["port"]:
            raise EngineError("stage 0 needs a port: the head listens there for the workers' rendezvous")
        self.seed, self.dtype, self.device = seed, dtype, device
        self.backend = backend
        if backend not in ("gloo", "nccl") or (backend == "nccl" and not str(device).startswith("cuda")):
            raise EngineError(f"backend must be gloo, or nccl with a cuda device, not {backend!r} on {device}")
        torch_dtype(dtype)
        self.timeout, self.connect_timeout, self.ping_interval = float(timeout), float(connect_timeout), ping_interval
        self.depth = max_inflight or 2 * self.W
        self.tokenizer: Any = None
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
        self._stats = _Stats(self.W)
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
        self.tokenizer = make_tokenizer(self.src, meta)
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
        return self.tokenizer.encode(text)

    def chat_prompt(self, messages: list[dict[str, str]]) -> str:
        self._need_started()
        return self.tokenizer.chat(messages)

    def generate(self, prompt_ids: list[int], sampling: Sampling) -> Iterator[Piece]:
        self._need_started()
        cfg = self.src.cfg
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
        closed = EngineUnavailable("pipeline engine closed")
        for req in list(self._active.values()):
            req.out.put(("err", closed, None))
        self._active.clear()
        self._fail_waiting(closed)

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
                self.last_error = _short(e, f"epoch {self._epoch} rendezvous")
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

    def _down(self, msg: str) -> None:
        self._up.clear()
        self.state = "reconnecting"
        err = EngineUnavailable(msg)
        for req in list(self._active.values()):
            req.out.put(("err", err, None))
        self._active.clear()
        self.runner.clear()
        self._fail_waiting(err)

    def _serve(self) -> None:
        """One epoch: admit requests, keep up to ``depth`` steps in the pipe, match replies first-in first-out."""
        import torch

        W, link = self.W, self._link
        ready: deque[_Request] = deque()
        inflight: deque[_Flight] = deque()
        last_msg = time.monotonic()
        while not self._closing.is_set():
            if self._admit(ready):
                break
            # fill: run stage 0 for ready requests (one round of them) and pass them on
            for _ in range(len(ready)):
                if len(inflight) >= self.depth:
                    break
                req = ready.popleft()
                if req.cancelled:
                    self._finish(req, inflight)
                    continue
                inp = torch.tensor([req.prompt if req.pos == 0 else [req.last]], device=self._dev)
                T, start = inp.shape[1], req.pos
                t = time.perf_counter()
                y = self.runner.step(req.rid, inp, start, req.max_len)
                ms0 = (time.perf_counter() - t) * 1e3
                req.pos += T
                s = req.sampling
                if W == 1:
                    tok = self.runner.sample(req.rid, y, s.temperature, s.top_k or 0, s.top_p, req.seed)
                    with self._lock:
                        self._stats.step(T, [ms0])
                    self._deliver(req, tok, ready, inflight)
                    continue
                hdr = torch.zeros(HDR + W, dtype=torch.float64)
                hdr[:HDR - 1] = torch.tensor([OP_STEP, req.rid, T, start, req.max_len, s.temperature,
                                              s.top_k or 0, s.top_p, req.seed], dtype=torch.float64)
                hdr[HDR] = ms0
                y = y.to(self._cdev)
                sent = link.send(1, self._wire.pack(hdr.to(self._cdev), y))
                if T > 1:
                    sent += link.send(1, y)
                reply = torch.zeros(REPLY + W, dtype=torch.float64, device=self._cdev)
                inflight.append(_Flight(req, link.post_recv(W - 1, reply), reply, time.perf_counter(), T, sent))
                last_msg = time.monotonic()
            if inflight:
                f = inflight.popleft()
                link.wait(f.work, f"reply from stage {W - 1} ({self.stages[W - 1]['host']})")
                if f.req is None:
                    continue
                r = f.reply.tolist()
                if int(r[1]) != f.req.rid:
                    raise LinkDown(f"protocol: a reply for request {int(r[1])}, expected {f.req.rid}")
                with self._lock:
                    self._stats.step(f.T, r[REPLY:], f.sent, (REPLY + W) * 8, (time.perf_counter() - f.t) * 1e3)
                self._deliver(f.req, int(r[2]), ready, inflight)
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
        if W > 1:   # orderly close: drain, then tell the workers the epoch is over
            try:
                while inflight:
                    link.wait(inflight.popleft().work, "draining", timeout=min(self.timeout, 5.0))
                self._send_op(OP_CLOSE, 0, inflight)
                link.wait(inflight.popleft().work, "close", timeout=min(self.timeout, 5.0))
            except LinkDown:
                pass

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

    def _send_op(self, op: float, rid: int, inflight: deque) -> None:
        import torch

        W, link = self.W, self._link
        hdr = torch.zeros(HDR + W, dtype=torch.float64, device=self._cdev)
        hdr[H_OP], hdr[H_RID] = op, rid
        link.send(1, self._wire.pack(hdr, None))
        reply = torch.zeros(REPLY + W, dtype=torch.float64, device=self._cdev)
        inflight.append(_Flight(None, link.post_recv(W - 1, reply), reply, time.perf_counter(), 0, 0))

    def _deliver(self, req: _Request, tok: int, ready: deque, inflight: deque) -> None:
        req.produced += 1
        req.last = tok
        eos = tok in self.tokenizer.eos_ids
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


class _Stats:
    """Per-stage compute, bytes per hop, round trips and tokens/s; read and written under the engine's lock."""

    def __init__(self, W: int):
        self.W = W
        self.compute_ms = [0.0] * W          # every step
        self.decode_ms = [0.0] * W           # one-token (decode) steps only
        self.decode_steps = 0
        self.hop_bytes = [0] * W             # hop i: stage i -> i+1; hop W-1: last stage -> head
        self.decode_hop_bytes = [0] * W
        self.rtt_ms = self.net_ms = 0.0      # decode steps: head send -> reply; that minus the workers' compute
        self.rtt_n = 0
        self.tokens = 0
        self.recent: deque[float] = deque()

    def step(self, T: int, ms: list[float], fwd_bytes: int = 0, reply_bytes: int = 0,
             rtt: float | None = None) -> None:
        """A finished step of T positions: each stage's compute, the bytes it put on every hop."""
        for i, m in enumerate(ms[: self.W]):
            self.compute_ms[i] += m
        hops = [fwd_bytes] * (self.W - 1) + [reply_bytes] if self.W > 1 else [0]
        for i, b in enumerate(hops):
            self.hop_bytes[i] += b
        if T != 1:
            return
        self.decode_steps += 1
        for i, m in enumerate(ms[: self.W]):
            self.decode_ms[i] += m
        for i, b in enumerate(hops):
            self.decode_hop_bytes[i] += b
        if rtt is not None:
            self.rtt_ms += rtt
            self.net_ms += rtt - sum(ms[1:self.W])
            self.rtt_n += 1

    def token(self) -> None:
        self.tokens += 1
        now = time.monotonic()
        self.recent.append(now)
        while self.recent and now - self.recent[0] > 10.0:
            self.recent.popleft()

    def report(self, stages: list[dict[str, Any]], state: str, epoch: int) -> dict[str, Any]:
        d = max(self.decode_steps, 1)
        span = (self.recent[-1] - self.recent[0]) if len(self.recent) > 1 else 0.0
        return {
            "engine": NAME, "state": state, "epoch": epoch, "tokens": self.tokens,
            "tokens_per_s": round((len(self.recent) - 1) / span, 3) if span > 0 else 0.0,
            "decode_steps": self.decode_steps,
            "stages": [{"rank": i, "host": s["host"], "layers": s["layers"],
                        "compute_ms_total": round(self.compute_ms[i], 3),
                        "decode_compute_ms_total": round(self.decode_ms[i], 3),
                        "decode_compute_ms_per_token": round(self.decode_ms[i] / d, 3)}
                       for i, s in enumerate(stages)],
            "hops": [{"from": i, "to": (i + 1) % self.W, "bytes": self.hop_bytes[i],
                      "decode_bytes": self.decode_hop_bytes[i],
                      "decode_bytes_per_token": round(self.decode_hop_bytes[i] / d, 1)}
                     for i in range(self.W)] if self.W > 1 else [],
            "decode_round_trip_ms": round(self.rtt_ms / self.rtt_n, 3) if self.rtt_n else None,
            "decode_network_ms": round(self.net_ms / self.rtt_n, 3) if self.rtt_n else None,
            "round_trips": {"n": self.rtt_n, "ms_total": round(self.rtt_ms, 3), "network_ms_total": round(self.net_ms, 3)},
        }


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] != "worker":
        print("usage: python -m tiers.tier3.pipeline worker --model SPEC --layers A:B --rank R --world-size W "
              "--master HOST:PORT [--host H] [--port P] ...", file=sys.stderr)
        return 2
    return worker_main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())

"""B16: the local inference rig. A real GGUF (or your own model) in llama.cpp, quantised, timed and scored.

    GGUF ─► Engine (llama-cpp-python) ─► prompt tokens/s, generation tokens/s, perplexity
      ▲                                         per quantisation: Q8_0 / Q5_K_M / Q4_K_M as downloaded,
      │                                         or F32 (as exported), then Q8_0 and Q4_0 made here
      ├─ the registry: the rung's `model` (e.g. llama-3.2-3b-instruct-q8_0) -> data.require -> its .gguf,
      │  and its sibling quantisations that are here (the others named, with their fetch line)
      └─ models.gguf_export: your B12 model (llama flavour) as a llama-architecture GGUF

Which model:
- `--set gguf=PATH` (or `TIERKIT_B16_GGUF=PATH`): any local GGUF, or a registry GGUF name.
  It is timed as it is; when its weights are F32/F16/BF16 it is also quantised to Q8_0
  and Q4_0 (quantising an already-quantised file would stack errors).
- otherwise the rung's `model`: a registry GGUF (`tierkit data fetch NAME` brings it; a
  missing one stops the run with that line). The same model's other quantisations in the
  registry (Q4_K_M, Q5_K_M, Q8_0, ...) that are here are timed and scored on the same text,
  most bits first; those not here are listed with the fetch that brings them.
- `model: b12`: the learner's B12 checkpoint (`tiers.tier2.b12_pretrain.base_model`),
  exported with models.gguf_export; `model: standin`: a small llama-flavour char model
  trained here in seconds (said so in the README). Nothing is substituted for another.

`TIERKIT_B16_THREADS=N` sets llama.cpp's thread count (default: the physical cores).

How it is timed (what `llama-bench` calls pp and tg): the prompt is decoded in batches of
n_batch tokens after the cache is cleared (prompt processing: matmuls over many tokens,
compute-bound); then new tokens are decoded one at a time, each the argmax of the last
logits (generation: every weight read once per token, memory-bound). `requests`
repetitions, the median reported. Perplexity: the held-out text in non-overlapping windows
of the model's training context, every token scored from llama.cpp's own logits (the same
definition as tiers.tier2.common.perplexity, so the F32 export and torch agree to rounding).
"""
from __future__ import annotations

import ctypes
import math
import os
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, Self

import numpy as np
from annotated_types import Gt

from inventory.files import atomic_path
from tiers.llama_log import LOG, last_error, quiet
from tiers.report import md_table, pyplot, save

if TYPE_CHECKING:
    from tiers.runner import Context, Output

QUANT_FTYPES = {"F32": 0, "F16": 1, "Q4_0": 2, "Q8_0": 7,     # llama_ftype values (llama.h)
                "Q4_K_M": 15, "Q5_K_M": 17, "Q6_K": 18}
# a registry GGUF's name ends in its quantisation; its siblings differ only there (most bits first)
REGISTRY_QUANTS = ("f16", "q8_0", "q6_k", "q5_k_m", "q5_k_s", "q5_0", "q4_k_m", "q4_k_s", "q4_0", "q3_k_m", "q2_k")
OWN_MODELS = ("b12", "standin")
KV_TYPES = {"f32": 0, "f16": 1}                                # ggml_type values for the KV cache
UNQUANTISED = {"F32", "F16", "BF16"}                           # tensor types that quantising does not stack on


@dataclass
class Config:
    prompt_tokens: Annotated[int, Gt(0)] = 512     # the prompt whose processing is timed (llama-bench's pp)
    new_tokens: Annotated[int, Gt(0)] = 256        # then tokens generated one at a time (tg)
    requests: Annotated[int, Gt(0)] = 8            # repetitions of both; the median is reported
    threads: Annotated[int, Gt(0)] | None = None   # None: $TIERKIT_B16_THREADS, else the physical cores
    n_batch: Annotated[int, Gt(0)] = 512           # prompt tokens per llama_decode call
    n_gpu_layers: int | None = None                # None: all (-1) on a GPU plan when llama.cpp can offload, else 0
    kv_type: Literal["f16", "f32"] = "f16"         # the KV cache's element type
    quants: list[Literal["F32", "F16", "Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q4_0"]] = field(
        default_factory=lambda: ["Q8_0", "Q4_0"])                 # made here from an unquantised GGUF
    ppl_tokens: Annotated[int, Gt(0)] = 8192       # held-out tokens the perplexity is measured on
    ppl_window: Annotated[int, Gt(0)] | None = None  # None: the model's context, at most 256
    standin_steps: Annotated[int, Gt(0)] = 300     # training steps of the stand-in, when there is no B12 model
    seed: int = 0                                  # the timed prompt's tokens and the stand-in
    # a local GGUF or a registry GGUF name, instead of the rung's model; default $TIERKIT_B16_GGUF
    gguf: str | None = field(default_factory=lambda: os.environ.get("TIERKIT_B16_GGUF") or None)
    init: str | None = None                        # a B12 checkpoint (a path or *.pt); None: B12's build
    model: str | None = None                       # the rung's: a registry GGUF name, b12 or standin
    quant: str | None = None                       # (None: b12's build if there is one, else the stand-in)
    siblings: bool = True                          # a registry GGUF: also its other quantisations that are here


# ---------------------------------------------------------------- loading a GGUF

def check_gguf(path: str | Path) -> Path:
    """The path, if it is a file that starts like a GGUF; ValueError (one line, with the fix) otherwise."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise ValueError(f"GGUF file {p} does not exist; set TIERKIT_B16_GGUF to a local .gguf model "
                         "(or unset it to export your B12 model)")
    with open(p, "rb") as f:
        head = f.read(4)
    if head != b"GGUF":
        raise ValueError(f"{p} is not a GGUF file (it starts with {head!r}, not b'GGUF'); "
                         "convert the model with llama.cpp's convert_hf_to_gguf.py or re-download it")
    return p


@dataclass
class Settings:
    """Everything a tokens/s figure depends on, recorded beside it."""

    n_threads: int
    n_threads_batch: int
    n_ctx: int
    n_batch: int
    n_ubatch: int
    n_gpu_layers: int
    kv_type: str = "f16"
    flash_attn: bool = False
    use_mmap: bool = True


def default_settings(cfg: Config, device: str, n_ctx: int) -> Settings:
    """Threads: `threads` in the config, else $TIERKIT_B16_THREADS, else the physical cores (llama.cpp's
    advice: hyper-threads slow the matmuls down; on a machine busy with other work, fewer threads than
    cores is faster, because llama.cpp's threads spin-wait for each other at every operation).
    GPU layers: all (-1) when the plan is on a GPU and this llama.cpp build can offload, else 0."""
    threads = cfg.threads or os.environ.get("TIERKIT_B16_THREADS")
    if not threads:
        try:
            import psutil

            threads = psutil.cpu_count(logical=False) or os.cpu_count() or 1
        except ImportError:
            threads = os.cpu_count() or 1
    gpu_layers = cfg.n_gpu_layers
    if gpu_layers is None:
        import llama_cpp

        gpu_layers = -1 if device.startswith(("cuda", "mps", "rocm")) and llama_cpp.llama_supports_gpu_offload() else 0
    return Settings(n_threads=int(threads), n_threads_batch=int(threads), n_ctx=int(n_ctx), n_batch=cfg.n_batch,
                    n_ubatch=cfg.n_batch, n_gpu_layers=int(gpu_layers), kv_type=cfg.kv_type)


class Engine:
    """One GGUF loaded in llama.cpp, decoding through a reusable llama_batch.

    llama-cpp-python's `Llama` loads the model and makes the context; decoding goes
    straight to `llama_decode` with a batch allocated once and filled through numpy views
    (Llama.eval fills it in a Python loop and copies every logit row, which costs more
    than the decode itself for a small model).
    """

    def __init__(self, path: str | Path, settings: Settings):
        import llama_cpp

        quiet()
        self.path = check_gguf(path)
        self.settings = settings
        if settings.kv_type not in KV_TYPES:
            raise ValueError(f"kv_type {settings.kv_type!r}: use one of {', '.join(KV_TYPES)}")
        LOG.clear()
        try:
            self.llm = llama_cpp.Llama(
                str(self.path), n_ctx=settings.n_ctx, n_batch=settings.n_batch, n_ubatch=settings.n_ubatch,
                n_threads=settings.n_threads, n_threads_batch=settings.n_threads_batch,
                n_gpu_layers=settings.n_gpu_layers, type_k=KV_TYPES[settings.kv_type],
                type_v=KV_TYPES[settings.kv_type], flash_attn=settings.flash_attn, use_mmap=settings.use_mmap,
                logits_all=False, verbose=False)
        except (ValueError, RuntimeError, OSError) as e:
            why = last_error() or str(e)
            raise ValueError(f"llama.cpp cannot load {self.path}: {why}; the file is damaged or from a newer "
                             "llama.cpp (re-export or re-download it)") from None
        self.n_vocab = int(self.llm.n_vocab())
        self.n_ctx = int(self.llm.n_ctx())
        self.n_ctx_train = int(llama_cpp.llama_model_n_ctx_train(self.llm.model))
        self.ctx = self.llm.ctx
        self.mem = llama_cpp.llama_get_memory(self.ctx)
        self._lib = llama_cpp
        nb = settings.n_batch
        self.batch = llama_cpp.llama_batch_init(nb, 0, 1)
        b = self.batch
        self._tok = np.ctypeslib.as_array(b.token, shape=(nb,))
        self._pos = np.ctypeslib.as_array(b.pos, shape=(nb,))
        self._out = np.ctypeslib.as_array(b.logits, shape=(nb,))
        np.ctypeslib.as_array(b.n_seq_id, shape=(nb,))[:] = 1
        for i in range(nb):
            b.seq_id[i][0] = 0
        self.pos = 0
        self._logits_addr: int | None = None
        self._logits_view: np.ndarray | None = None

    def close(self) -> None:
        if getattr(self, "batch", None) is not None:
            self._lib.llama_batch_free(self.batch)
            self.batch = None
        if getattr(self, "llm", None) is not None:
            self.llm.close()
            self.llm = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def describe(self) -> dict[str, Any]:
        lib, m = self._lib, self.llm.model
        buf = ctypes.create_string_buffer(256)
        lib.llama_model_desc(m, buf, 256)
        return {"desc": buf.value.decode(errors="replace"), "params": int(lib.llama_model_n_params(m)),
                "bytes": int(lib.llama_model_size(m)), "n_vocab": self.n_vocab, "n_ctx_train": self.n_ctx_train}

    def clear(self) -> None:
        """Forget every cached position (a new sequence)."""
        self._lib.llama_memory_clear(self.mem, True)
        self.pos = 0

    def step(self, token: int) -> np.ndarray:
        """One generated token in, the next logits (vocab,) out: the generation loop's hot path, kept to
        a few scalar writes into the batch and one call, so timing it times llama.cpp, not Python."""
        if self.pos >= self.n_ctx:
            raise ValueError(f"{self.pos + 1} positions asked; the context holds {self.n_ctx}")
        self._tok[0] = token
        self._pos[0] = self.pos
        self._out[0] = 1
        self.batch.n_tokens = 1
        rc = self._lib.llama_decode(self.ctx, self.batch)
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc} at position {self.pos} ({last_error() or 'no detail'})")
        self.pos += 1
        return self._last_logits()

    def _last_logits(self) -> np.ndarray:
        """A numpy view of the last row of logits; the view is rebuilt only when llama.cpp moves its buffer."""
        ptr = self._lib.llama_get_logits_ith(self.ctx, -1)
        addr = ctypes.cast(ptr, ctypes.c_void_p).value
        if addr != self._logits_addr:
            self._logits_addr = addr
            self._logits_view = np.ctypeslib.as_array(ptr, shape=(self.n_vocab,))
        return self._logits_view

    def decode(self, ids: Any, all_logits: bool = False) -> np.ndarray:
        """Feed token ids after the cached ones; logits (n, vocab) for every id (a copy), or (vocab,) for the
        last (a view into llama.cpp's buffer, valid until the next decode)."""
        ids = np.asarray(ids, dtype=np.int32)
        n, nb = len(ids), self.settings.n_batch
        if n == 0:
            raise ValueError("nothing to decode")
        if self.pos + n > self.n_ctx:
            raise ValueError(f"{self.pos + n} positions asked; the context holds {self.n_ctx}")
        rows = []
        for s in range(0, n, nb):
            chunk = ids[s:s + nb]
            k = len(chunk)
            self._tok[:k] = chunk
            self._pos[:k] = np.arange(self.pos, self.pos + k, dtype=np.int32)
            self._out[:k] = 1 if all_logits else 0
            self._out[k - 1] = 1
            self.batch.n_tokens = k
            rc = self._lib.llama_decode(self.ctx, self.batch)
            if rc != 0:
                raise RuntimeError(f"llama_decode returned {rc} at position {self.pos} ({last_error() or 'no detail'})")
            self.pos += k
            if all_logits:
                ptr = self._lib.llama_get_logits(self.ctx)
                rows.append(np.ctypeslib.as_array(ptr, shape=(k, self.n_vocab)).copy())
        if all_logits:
            return np.concatenate(rows)
        return self._last_logits()

    def greedy(self, prompt: list[int], n: int) -> list[int]:
        """n tokens after `prompt`, each the argmax of the logits (no sampler, no penalties)."""
        self.clear()
        logits = self.decode(prompt)
        out = []
        for _ in range(n):
            t = int(logits.argmax())
            out.append(t)
            logits = self.step(t)
        return out

    def tokenize(self, text: str) -> list[int]:
        """llama.cpp's own tokenizer, as llama-cli would run it (BOS when the model asks for one)."""
        return self.llm.tokenize(text.encode("utf-8"), add_bos=True, special=False)

    def detokenize(self, ids: list[int]) -> str:
        return self.llm.detokenize(ids).decode("utf-8", errors="replace")

    def nll(self, ids: list[int] | np.ndarray, window: int) -> tuple[float, int]:
        """Sum of -log p(next token) and the count, over non-overlapping windows of `window` inputs
        (inputs ids[k*W:(k+1)*W] predict ids[k*W+1:(k+1)*W+1]), from llama.cpp's logits."""
        ids = np.asarray(ids, dtype=np.int64)
        n = (len(ids) - 1) // window
        if n < 1:
            raise ValueError(f"{len(ids)} tokens are too few for one window of {window}")
        total = 0.0
        for k in range(n):
            x, y = ids[k * window:(k + 1) * window], ids[k * window + 1:(k + 1) * window + 1]
            self.clear()
            logits = self.decode(x, all_logits=True).astype(np.float64)
            m = logits.max(axis=1, keepdims=True)
            logz = m[:, 0] + np.log(np.exp(logits - m).sum(axis=1))
            total += float((logz - logits[np.arange(len(y)), y]).sum())
        return total, n * window


def perplexity(engine: Engine, ids: list[int] | np.ndarray, window: int) -> float:
    total, count = engine.nll(ids, window)
    return math.exp(total / count)


# ---------------------------------------------------------------- timing

def time_speed(engine: Engine, prompt: list[int], new_tokens: int, reps: int,
               on_rep: Any = None) -> dict[str, Any]:
    """Prompt processing and generation tokens/s: `reps` repetitions of (clear, prompt, n greedy tokens)."""
    pp, tg = [], []
    for _ in range(reps):
        engine.clear()
        t0 = time.perf_counter()
        logits = engine.decode(prompt)
        t1 = time.perf_counter()
        for _ in range(new_tokens):
            logits = engine.step(int(logits.argmax()))
        t2 = time.perf_counter()
        pp.append(len(prompt) / (t1 - t0))
        tg.append(new_tokens / (t2 - t1))
        if on_rep is not None:
            on_rep()
    return {"prompt_tokens_per_s": statistics.median(pp), "gen_tokens_per_s": statistics.median(tg),
            "prompt_tokens_per_s_all": pp, "gen_tokens_per_s_all": tg, "prompt_tokens": len(prompt),
            "new_tokens": new_tokens, "repetitions": reps}


# ---------------------------------------------------------------- quantisation

def quantize(src: str | Path, dst: str | Path, quant: str, threads: int = 0) -> Path:
    """llama.cpp's own quantiser (llama_model_quantize, what the llama-quantize tool calls), written to a
    temporary name beside `dst` and renamed (inventory.files.atomic_path). llama.cpp keeps 1-D tensors (norms)
    in F32 and picks its own type for tensors whose rows are not a multiple of the block size; the
    tensor-type counts show what it did."""
    import llama_cpp

    quiet()
    if quant not in QUANT_FTYPES:
        raise ValueError(f"quantisation {quant!r}: use one of {', '.join(QUANT_FTYPES)}")
    src, dst = check_gguf(src), Path(dst)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = QUANT_FTYPES[quant]
    params.nthread = threads
    LOG.clear()
    with atomic_path(dst) as tmp:
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params))
        if rc != 0 or not tmp.stat().st_size:
            raise ValueError(f"llama.cpp could not quantise {src} to {quant} ({last_error() or f'code {rc}'})")
    return dst


# ---------------------------------------------------------------- which model

@dataclass
class Source:
    """The GGUF to time and what it is: a registry name, your file, or our model exported (with its tokenizer)."""

    path: Path
    what: str                  # for the README: which model, from where
    name: str | None = None    # the registry name, when it came from the registry
    model: Any = None          # our torch model (b12 / standin), for its torch perplexity
    tok: Any = None


def resolve_gguf(spec: str) -> tuple[Path, str | None]:
    """(a GGUF file, its registry name or None) for a path or a registry GGUF name; one-line errors."""
    from tiers import data

    p = Path(spec).expanduser()
    if p.exists() or "/" in spec or spec.endswith(".gguf"):
        return check_gguf(p), None
    try:
        entry = data.get(spec)
    except data.DataError:
        return check_gguf(p), None         # neither a file nor a registry name: the file's message
    if entry.kind != "gguf":
        raise ValueError(f"{spec} is a registry {entry.kind}, not a GGUF file: pick a GGUF name "
                         "(`tierkit data list`) or a .gguf path")
    return check_gguf(data.require(entry.name)), entry.name


def own_model(ctx: Context, cfg: Config) -> tuple[Any, Any, str]:
    """(model, tokenizer, where from): B12's checkpoint (or config init), else a llama-flavour stand-in.

    B12's stand-in for the other milestones is gpt2-flavour, which llama.cpp's llama architecture
    cannot run; this one is the same size and loop with arch="llama" (RMSNorm, RoPE, SwiGLU)."""
    from tiers.runner import RunError
    from tiers.tier2 import b12_pretrain as b12

    have_b12 = bool(cfg.init) or b12.checkpoint_path(ctx).is_file()
    if cfg.model == "b12" and not have_b12:
        raise RunError(f"no B12 checkpoint at {b12.checkpoint_path(ctx)}: run `tierkit run B12` first")
    if have_b12 and cfg.model != "standin":
        model, tok, path = b12.base_model(ctx, cfg.init)
        return model.cpu().eval(), tok, f"B12 checkpoint {path} (your B12 model)"
    ctx.log(f"a small llama-flavour char model is trained here as a stand-in (no B12 checkpoint at "
            f"{b12.checkpoint_path(ctx)}, or model: standin); run `tierkit run B12` (arch llama) for your own")
    with ctx.progress("training a llama-flavour stand-in", cfg.standin_steps) as bar:
        model, tok = b12.standin("cpu", arch="llama", steps=cfg.standin_steps, seed=cfg.seed,
                                 on_step=lambda s, r: bar.advance())
    return model, tok, "stand-in: 2-layer llama-flavour char model trained here on Tiny Shakespeare"


def held_out_text(max_chars: int) -> tuple[str, str]:
    """The last 10% of Tiny Shakespeare (B12's validation split), the first max_chars of it."""
    from tiers import data

    text = data.require("tinyshakespeare").read_text(encoding="utf-8")
    cut = int(len(text) * 0.9)
    return text[cut:cut + max_chars], "Tiny Shakespeare, held-out last 10%"


def gguf_to_time(ctx: Context, cfg: Config) -> Source:
    """Your GGUF (`gguf`) as it is; else the rung's registry GGUF; else our model exported by models.gguf_export."""
    from models.gguf_export import export_gguf
    from tiers import data

    if cfg.gguf:
        path, name = resolve_gguf(cfg.gguf)
        how = "TIERKIT_B16_GGUF" if os.environ.get("TIERKIT_B16_GGUF") == cfg.gguf else "--set gguf"
        return Source(path, f"your GGUF {path} ({how})", name)
    if cfg.model and cfg.model not in OWN_MODELS:
        path, name = resolve_gguf(cfg.model)
        return Source(path, f"{data.get(cfg.model).title} (`{name}` from the registry: {path})", name)
    model, tok, source = own_model(ctx, cfg)
    path = export_gguf(model, tok, Path(ctx.out_dir) / "model-f32.gguf", name="tierkit-b12")
    ctx.log(f"exported {source} to {path.name} ({path.stat().st_size:,} bytes)")
    return Source(path, source, None, model, tok)


def quant_label(name: str) -> str:
    """'tinyllama-1.1b-chat-q4_k_m' -> 'Q4_K_M'."""
    return name.rpartition("-")[2].upper()


def registry_variants(name: str) -> tuple[list[tuple[str, Path]], list[dict[str, Any]]]:
    """The registry's quantisations of the model `name` is one of: ([(quantisation, file)] here, most bits
    first; [{name, size, fetch}] not here)."""
    from inventory.units import fmt_bytes
    from tiers import data

    stem = name.rpartition("-")[0]
    here, missing = [], []
    for q in REGISTRY_QUANTS:
        try:
            entry = data.get(f"{stem}-{q}")
        except data.DataError:
            continue
        path = data.locate(entry.name)
        if path is not None:
            here.append((quant_label(entry.name), check_gguf(path)))
        else:
            size = f" ({fmt_bytes(entry.size)})" if entry.size else ""
            missing.append({"name": entry.name, "size": entry.size,
                            "fetch": f"tierkit data fetch {entry.name}{size}"})
    return here, missing


def variants(ctx: Context, cfg: Config, src: Source, info: dict[str, Any],
             threads: int) -> tuple[list[tuple[str, Path]], list[dict[str, Any]]]:
    """What is timed: a registry GGUF and its siblings that are here; else the file as it is, then each
    quantisation made from it when its weights are unquantised. Also the siblings not here."""
    if src.name and cfg.siblings:
        here, missing = registry_variants(src.name)
        if missing:
            ctx.log(f"other quantisations of this model in the registry, not here: "
                    f"{'; '.join(m['fetch'] for m in missing)}")
        return here, missing
    kinds = set(info["tensor_types"])
    if not kinds <= UNQUANTISED:
        ctx.log(f"{src.path.name} is already quantised ({', '.join(sorted(kinds))}): timed as it is, not requantised")
        label = quant_label(src.name) if src.name else f"as given ({', '.join(sorted(kinds))})"
        return [(label, src.path)], []
    out = [("/".join(sorted(kinds)), src.path)]
    for q in cfg.quants:
        with ctx.progress(f"quantising to {q}", None):
            out.append((q, quantize(src.path, Path(ctx.out_dir) / f"model-{q.lower()}.gguf", q, threads)))
    return out, []


# ---------------------------------------------------------------- the milestone

def run(ctx: Context) -> Output:
    from models.gguf_export import gguf_summary
    from tiers import data
    from tiers.runner import Output, RunError

    cfg: Config = ctx.config
    try:
        src = gguf_to_time(ctx, cfg)
        info = gguf_summary(src.path)
        window = cfg.ppl_window or min(int(info["context_length"] or 256), 256)
        text, text_source = held_out_text(cfg.ppl_tokens * 8)
    except data.DataError as e:
        raise RunError(f"B16: {e}") from None
    if info["architecture"] is None:
        raise ValueError(f"{src.path}: a GGUF without general.architecture; it is not a model file")
    ctx.log(f"model: {src.what}")

    # the held-out tokens: our tokenizer for our model; llama.cpp's own for a GGUF (the same for its siblings)
    settings = default_settings(cfg, ctx.device, max(window, cfg.prompt_tokens + cfg.new_tokens))
    torch_ppl = None
    if src.tok is not None:
        import torch

        from tiers.tier2 import common

        ids = src.tok.encode(text, errors="drop")[:cfg.ppl_tokens + 1]
        torch_ppl = common.perplexity(src.model, torch.tensor(ids), window)
    else:
        with Engine(src.path, settings) as eng:
            ids = eng.tokenize(text)[:cfg.ppl_tokens + 1]

    timed, missing = variants(ctx, cfg, src, info, settings.n_threads)
    rng = np.random.default_rng(cfg.seed)
    prompt = [int(t) for t in rng.choice(np.asarray(ids), size=cfg.prompt_tokens)] if len(ids) else [0]
    rows = []
    for name, path in timed:
        with ctx.progress(f"{name}: timing", cfg.requests) as bar:
            rows.append(measure(path, name, settings, prompt, ids, window, cfg, bar.advance))
        ctx.log(f"{name}: {rows[-1]['prompt_tokens_per_s']:,.0f} prompt tok/s, "
                f"{rows[-1]['gen_tokens_per_s']:,.0f} gen tok/s, perplexity {rows[-1]['perplexity']:.4f}")
    for r in rows:
        r["perplexity_vs_first"] = r["perplexity"] / rows[0]["perplexity"] - 1

    speed_plot(Path(ctx.out_dir) / "tokens_per_s.png", rows, cfg.requests)
    model_name = src.name or ("your GGUF" if cfg.gguf else cfg.model or "b12 or standin (see source)")
    metrics = {"source": src.what, "model": model_name, "model_path": str(src.path),
               "gguf": info, "settings": asdict(settings), "window": window,
               "heldout": {"text": text_source, "tokens": len(ids)}, "torch_perplexity": torch_ppl,
               "rows": rows, "not_here": missing, "planned_model": cfg.model, "planned_quant": cfg.quant}
    best = max(rows, key=lambda r: r["gen_tokens_per_s"])
    summary = (f"{src.what}: {len(rows)} variant(s) in llama.cpp. Fastest generation: {best['quant']} at "
               f"{best['gen_tokens_per_s']:,.0f} tokens/s; perplexity " +
               ", ".join(f"{r['quant']} {r['perplexity']:.3f}" for r in rows) + ".")
    # the plan prices the size's downloaded model: only a GGUF (taken to be that file) calibrates it
    return Output(metrics=metrics, summary=summary,
                  report=report(metrics, cfg, settings, char_model=src.tok is not None),
                  plots=["tokens_per_s.png: prompt and generation tokens/s per quantisation"],
                  calibrate=src.model is None)


def measure(path: Path, name: str, settings: Settings, prompt: list[int], ids: list[int], window: int,
            cfg: Config, on_rep: Any) -> dict[str, Any]:
    """One variant in llama.cpp: its speed (time_speed), its perplexity, a greedy sample."""
    from models.gguf_export import gguf_summary

    with Engine(path, settings) as eng:
        desc = eng.describe()
        sp = time_speed(eng, prompt, cfg.new_tokens, cfg.requests, on_rep)
        ppl = perplexity(eng, ids, window)
        sample_prompt = ids[:32]
        sample = eng.detokenize(sample_prompt) + "|" + eng.detokenize(eng.greedy(sample_prompt, 48))
    s = gguf_summary(path)
    return {"quant": name, "file": path.name, "bytes": s["bytes"], "tensor_types": s["tensor_types"],
            "params": desc["params"], "perplexity": ppl, "sample": sample, **sp}


# ---------------------------------------------------------------- the plot and the report

def speed_plot(path: Path, rows: list[dict[str, Any]], requests: int) -> None:
    fig, axes = pyplot().subplots(1, 2, figsize=(9, 3.6))
    names = [r["quant"] for r in rows]
    for ax, key, title in ((axes[0], "prompt_tokens_per_s", "prompt processing"),
                           (axes[1], "gen_tokens_per_s", "generation")):
        vals = [r[key] for r in rows]
        ax.bar(names, vals, color=["#4c72b0", "#55a868", "#c44e52", "#8172b2"][:len(vals)])
        for i, v in enumerate(vals):
            ax.text(i, v, f"{v:,.0f}", ha="center", va="bottom", fontsize=8)
        ax.set_title(f"{title} (tokens/s, median of {requests})")
    save(fig, path)


def report(m: dict[str, Any], cfg: Config, st: Settings, char_model: bool) -> str:
    rows, torch_ppl, held = m["rows"], m["torch_perplexity"], m["heldout"]
    table = md_table(["quantisation", "file MiB", "tensor types", "prompt tok/s", "gen tok/s", "perplexity",
                      "vs " + rows[0]["quant"]],
                     [[r["quant"], f"{r['bytes'] / 2**20:.2f}", ", ".join(f"{k} {v}" for k, v in r["tensor_types"].items()),
                       f"{r['prompt_tokens_per_s']:,.0f}", f"{r['gen_tokens_per_s']:,.0f}", f"{r['perplexity']:.4f}",
                       f"{r['perplexity_vs_first']:+.2%}"] for r in rows])
    fetch = [f"`{x['fetch']}`" for x in m["not_here"]]
    return "\n".join([
        "## Speed and perplexity per quantisation", "", f"Model: {m['source']}.", "", table, "",
        *([(f"Other quantisations of this model in the registry, not here (fetch them and run again to compare "
           f"them too): {', '.join(fetch)}."), ""] if fetch else []),
        (f"Settings: {st.n_threads} threads (batch {st.n_threads_batch}), n_ctx {st.n_ctx}, n_batch {st.n_batch}, "
         f"n_ubatch {st.n_ubatch}, n_gpu_layers {st.n_gpu_layers}, KV cache {st.kv_type}, flash attention "
         f"{'on' if st.flash_attn else 'off'}. Prompt: {cfg.prompt_tokens} tokens; then {cfg.new_tokens} "
         f"generated greedily; {cfg.requests} repetitions, median shown."),
        "",
        (f"Perplexity: {held['tokens'] - 1:,} held-out tokens ({held['text']}) in windows of {m['window']}, from "
         "llama.cpp's logits." + (f" The same text through the torch model: **{torch_ppl:.4f}** (the F32 export "
                                  "should agree to rounding)." if torch_ppl is not None else "")),
        "", "## Greedy samples (prompt|continuation)", "",
        *[f"- {r['quant']}: `{r['sample'][-120:]!r}`" for r in rows], "",
        "## Run it yourself", "",
        (f"`llama-cli -m {rows[-1]['file']} -p \"ROMEO:\" -n 200`"
         + (" (a char model stops at a newline: its end-of-text is the newline; add `--ignore-eos` to run on)."
            if char_model else ".")),
    ])

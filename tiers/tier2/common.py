"""What the torch milestones share: the device, the text, the optimiser's settings, checkpoints to resume.

    device_and_precision(ctx | "cuda:0")  -> (torch.device, "bf16" | "fp16" | "fp32")
    autocast(device, precision)           mixed precision where the device has it; nothing on a CPU
    grad_scaler(device, precision)        loss scaling for fp16 (bf16 and fp32 need none)
    shakespeare(), split_ids(ids)         Tiny Shakespeare through the data registry; 90% train / 10% held out
    random_batch(ids, T, B, gen)          B windows of T tokens and their next tokens
    TrainConfig, lr_at, make_optimizer    the loop's settings, warmup + cosine, AdamW (decay on matrices)
    save_state / read_resume / restore_state   a checkpoint that continues a run bit-exactly
    estimate_loss, sample_text, perplexity, unigram_entropy   how a language model is measured
    finish_plot(fig, ax, path, ...)       labels, grid, legend, PNG: the tail of every plot here

The training loop itself is written out in B12 (tiers/tier2/b12_pretrain.py), where a
learner looks for it; B11, B13 and B14 train with it, each with its own loss. What
is here is what every one of them needs the same way.

A checkpoint written by `save_state` holds everything the loop's result depends on:
weights, AdamW's moments, the step, every random generator's state (the batches'
and dropout's) and the history so far. A run killed after a checkpoint and resumed
produces the same loss sequence as one that was never interrupted.

CUDA (bf16/fp16) and MPS paths are written by the documented torch APIs but were
not run on this project's CPU-only build machine.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch.nn import functional as F

from models.gpt import GPT, GPTConfig, save_checkpoint

if TYPE_CHECKING:
    from models.tokenizers import Tokenizer


# ---------------------------------------------------------------- device and precision

def device_and_precision(ctx_or_device: Any) -> tuple[torch.device, str]:
    """The plan's device string (or a Context) -> (torch device, the precision to compute in).

    bf16 on CUDA GPUs that have it (Ampere and later): same exponent range as fp32, so
    no loss scaling. fp16 on MPS and older CUDA GPUs (needs a GradScaler). fp32 on a CPU:
    CPU autocast to bf16 is slower than fp32 on most CPUs without AMX.
    """
    name = ctx_or_device if isinstance(ctx_or_device, str) else str(getattr(ctx_or_device, "device", "cpu"))
    name = (name or "cpu").strip().lower()
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise RuntimeError(f"device {name} asked for, but torch sees no CUDA device; run with --tier 1 for the CPU")
        dev = torch.device(name)
        return dev, "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if name.startswith("mps"):
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise RuntimeError("device mps asked for, but torch's MPS backend is not available here")
        return torch.device("mps"), "fp16"
    return torch.device("cpu"), "fp32"


_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(device: torch.device | str, precision: str) -> contextlib.AbstractContextManager:
    """Matmuls in 16 bits, reductions and the loss in fp32 (torch's autocast lists); nullcontext for fp32."""
    if precision not in _DTYPES:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=_DTYPES[precision])


def grad_scaler(device: torch.device | str, precision: str) -> Any:
    """fp16 gradients underflow: scale the loss up, unscale before clipping (None where not needed)."""
    if precision != "fp16":
        return None
    return torch.amp.GradScaler(torch.device(device).type)


# ---------------------------------------------------------------- the text

def shakespeare() -> str:
    """Tiny Shakespeare from the data registry; DataError naming `tierkit data fetch tinyshakespeare`."""
    from tiers import data

    return data.require("tinyshakespeare").read_text(encoding="utf-8")


def split_ids(ids: list[int] | torch.Tensor, val_frac: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """First 90% to train, last 10% held out (nanoGPT's split: contiguous, so no leakage across it)."""
    t = ids if isinstance(ids, torch.Tensor) else torch.tensor(ids, dtype=torch.long)
    cut = int(len(t) * (1 - val_frac))
    return t[:cut], t[cut:]


def random_batch(ids: torch.Tensor, block_size: int, batch_size: int, gen: torch.Generator,
                 device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """batch_size windows at random offsets: x = ids[i:i+T], y = ids[i+1:i+T+1] (the next token)."""
    if len(ids) <= block_size + 1:
        raise ValueError(f"{len(ids)} tokens are too few for a context of {block_size}")
    ix = torch.randint(len(ids) - block_size - 1, (batch_size,), generator=gen)
    x = torch.stack([ids[i:i + block_size] for i in ix.tolist()])
    y = torch.stack([ids[i + 1:i + 1 + block_size] for i in ix.tolist()])
    return x.to(device), y.to(device)


def unigram_entropy(ids: torch.Tensor) -> float:
    """Cross-entropy (nats/token) of the best context-free model: predict every token from its frequency."""
    counts = torch.bincount(ids.flatten()).double()
    p = counts[counts > 0] / counts.sum()
    return float(-(p * p.log()).sum())


# ---------------------------------------------------------------- the optimiser and its schedule

@dataclass
class TrainConfig:
    """Everything the loop's result depends on (a resume refuses a checkpoint written under another)."""

    steps: int = 2000
    lr: float = 1e-3
    min_lr: float = 1e-4          # cosine decays to this
    warmup: int = 100             # linear warmup steps
    lr_decay_steps: int | None = None  # cosine length (None: steps)
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0        # 0: no clipping (the norm is still recorded)
    grad_accum: int = 1
    eval_interval: int = 250      # 0: only at the end
    sample_interval: int = 0      # 0: only at the end
    ckpt_interval: int = 0        # 0: only at the end (when a checkpoint path is given)
    seed: int = 1337

    @classmethod
    def pick(cls, config: Any, **changes: Any) -> TrainConfig:
        """The loop's settings from a milestone's Config (the fields both declare), then `changes`."""
        own = {f.name: getattr(config, f.name) for f in fields(cls) if hasattr(config, f.name)}
        return cls(**(own | changes))


def lr_at(step: int, c: TrainConfig) -> float:
    """Linear warmup to lr over `warmup` steps, then cosine from lr down to min_lr."""
    if step < c.warmup:
        return c.lr * (step + 1) / (c.warmup + 1)
    total = c.lr_decay_steps or c.steps
    if step >= total:
        return c.min_lr
    ratio = (step - c.warmup) / max(1, total - c.warmup)
    return c.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (c.lr - c.min_lr)


def make_optimizer(model: torch.nn.Module, c: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices (linear weights, embeddings) only.

    Decaying biases and norm gains pulls them to 0, which only hurts: they are few
    and do not overfit. The fused kernel is used on CUDA.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": c.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    extra = {"fused": True} if device.type == "cuda" else {}
    return torch.optim.AdamW(groups, lr=c.lr, betas=(c.beta1, c.beta2), **extra)


# ---------------------------------------------------------------- checkpoints that resume bit-exactly

class ResumeError(Exception):
    """A checkpoint cannot be resumed; str() is one line saying why and what to do."""


def save_state(path: Path, model: GPT, opt: torch.optim.Optimizer, scaler: Any, step: int,
               data_gen: torch.Generator, hist: dict[str, Any], tc: TrainConfig,
               meta: dict[str, Any] | None = None) -> None:
    """A checkpoint of the run as it stands before `step`: weights, optimiser, the generators, the history."""
    device = next(model.parameters()).device
    rng = {"torch": torch.get_rng_state(), "data": data_gen.get_state()}
    if device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(device)
    save_checkpoint(path, model, meta=meta, optimizer=opt.state_dict(), step=step, rng=rng, history=hist,
                    train_config=asdict(tc), scaler=scaler.state_dict() if scaler is not None else {})


def read_resume(path: Path, cfg: TrainConfig, model_config: GPTConfig) -> dict[str, Any]:
    """The checkpoint to continue from, checked against this run's configuration."""
    if not path.is_file():
        raise ResumeError(f"nothing to resume: no checkpoint at {path}; run without --resume to start afresh")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many kinds for a bad file
        raise ResumeError(f"{path}: not a readable checkpoint ({type(e).__name__}); delete it and start afresh") from None
    if not isinstance(ckpt, dict) or not {"optimizer", "step", "rng", "train_config"} <= set(ckpt):
        raise ResumeError(f"{path}: a model checkpoint without training state; it cannot be resumed")
    theirs = ckpt["train_config"]
    diff = [f"{k} {theirs.get(k)!r} in the checkpoint, {v!r} now" for k, v in asdict(cfg).items()
            if k not in FREE_ON_RESUME and theirs.get(k) != v]
    diff += [f"model.{k} {ckpt['config'].get(k)!r} in the checkpoint, {v!r} now"
             for k, v in model_config.to_dict().items() if ckpt["config"].get(k) != v]
    if diff:
        raise ResumeError(f"{path} was written with other settings ({'; '.join(diff[:4])}); "
                          "resume with the same size and settings, or start afresh without --resume")
    return ckpt


# the settings a resumed run may change: how long it goes on, and what it observes on the way
FREE_ON_RESUME = frozenset({"steps", "resume", "ckpt_interval", "eval_interval", "eval_iters", "sample_interval",
                            "sample_tokens", "prompt", "temperature", "top_k", "top_p", "heldout_tokens"})


def resume_settings(path: Path, cfg: Any, given: set[str]) -> Any:
    """The Config to resume with: the checkpoint's settings, except those the user set (`given`: --set keys).

    A given value that differs from the checkpoint's is a conflict (ResumeError naming both),
    unless it is one of FREE_ON_RESUME (more steps, other sampling).
    """
    if not path.is_file():
        raise ResumeError(f"nothing to resume: no checkpoint at {path}; run without --resume to start afresh")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # noqa: BLE001 - torch raises many kinds for a bad file
        raise ResumeError(f"{path}: not a readable checkpoint ({type(e).__name__}); delete it and start afresh") from None
    saved = (ckpt.get("meta") or {}).get("config") if isinstance(ckpt, dict) else None
    if not isinstance(saved, dict):   # no settings recorded: read_resume compares what it can
        return cfg
    names = {f.name for f in fields(cfg)}
    clash = [f"{k} {saved[k]!r} in the checkpoint, {getattr(cfg, k)!r} given" for k in sorted(given)
             if k in saved and k not in FREE_ON_RESUME and saved[k] != getattr(cfg, k)]
    if clash:
        raise ResumeError(f"{path} was written with other settings ({'; '.join(clash)}); drop those --set values "
                          "to resume with the checkpoint's, or start afresh without --resume")
    return replace(cfg, **{k: v for k, v in saved.items() if k in names and k not in given and k != "resume"})


class Interrupted(Exception):
    """Ctrl-C during training: the loop stopped at a step boundary and saved a checkpoint there."""

    def __init__(self, step: int, steps: int, path: Path | None):
        super().__init__(f"interrupted at step {step} of {steps}")
        self.step, self.steps, self.path = step, steps, path


@contextlib.contextmanager
def stop_on_sigint():
    """`with stop_on_sigint() as stop:` ... `if stop: save, raise Interrupted`: Ctrl-C ends the step first.

    A second Ctrl-C stops at once, as usual. Outside the main thread it changes nothing.
    """
    import signal
    import threading

    flag = _Flag()
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handler(signum: int, frame: Any) -> None:
        flag.set = True
        signal.signal(signal.SIGINT, signal.default_int_handler)   # the next one interrupts at once

    before = signal.signal(signal.SIGINT, handler)
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, before)


class _Flag:
    set = False

    def __bool__(self) -> bool:
        return self.set


class StepLines:
    """Plain progress lines for a log file (no terminal): step, loss, tokens/s, ETA, every `every` seconds.

        StepLines(print, steps=3000, tokens_per_step=B*T*accum, start=resumed_step)(step, loss, seconds)
    """

    def __init__(self, out: Any, steps: int, tokens_per_step: int, start: int = 0, every: float | None = None):
        import os
        import time

        self.out, self.steps, self.tps, self.start = out, steps, tokens_per_step, start
        self.every = float(os.environ.get("TIERKIT_PROGRESS_SECONDS", "10")) if every is None else every
        self.t0 = self.last = time.perf_counter()
        self._time = time.perf_counter

    def __call__(self, step: int, loss: float, seconds: float) -> None:
        now, done = self._time(), step + 1
        if now - self.last < self.every and done not in (self.start + 1, self.steps):
            return
        self.last = now
        rate = (done - self.start) / max(now - self.t0, 1e-9)
        eta = (self.steps - done) / rate if rate else 0.0
        self.out(f"step {done}/{self.steps}  loss {loss:.4f}  {self.tps / max(seconds, 1e-9):,.0f} tokens/s  "
                 f"ETA {_hms(eta)}")


def _hms(s: float) -> str:
    s = round(s)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def restore_state(ckpt: dict[str, Any], model: GPT, opt: torch.optim.Optimizer, scaler: Any,
                  data_gen: torch.Generator) -> tuple[int, dict[str, Any]]:
    """Put a checkpoint from `read_resume` back into the run: (the step to continue at, the history so far)."""
    device = next(model.parameters()).device
    model.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["optimizer"])
    if scaler is not None and ckpt.get("scaler"):
        scaler.load_state_dict(ckpt["scaler"])
    torch.set_rng_state(ckpt["rng"]["torch"])
    data_gen.set_state(ckpt["rng"]["data"])
    if device.type == "cuda" and "cuda" in ckpt["rng"]:
        torch.cuda.set_rng_state(ckpt["rng"]["cuda"], device)
    hist, start = ckpt["history"], int(ckpt["step"])
    hist["resumed_at"].append(start)
    return start, hist


# ---------------------------------------------------------------- measuring a language model

@torch.no_grad()
def estimate_loss(model: GPT, splits: dict[str, torch.Tensor], block_size: int, batch_size: int, iters: int,
                  seed: int, device: torch.device, precision: str = "fp32") -> dict[str, float]:
    """Mean loss on `iters` random batches per split, from a generator seeded afresh every call: the
    same batches every time, and the training run's random state is not touched."""
    was = model.training
    model.eval()
    out = {}
    for name, ids in splits.items():
        gen = torch.Generator().manual_seed(seed)
        total = 0.0
        for _ in range(iters):
            x, y = random_batch(ids, block_size, batch_size, gen, device)
            with autocast(device, precision):
                total += float(model(x, y)[1])
        out[name] = total / iters
    model.train(was)
    return out


@torch.no_grad()
def sample_text(model: GPT, tok: Tokenizer, prompt: str = "\n", n: int = 200, temperature: float = 0.8,
                top_k: int | None = 200, top_p: float | None = None, seed: int = 0,
                device: torch.device | str = "cpu") -> str:
    """A sample from the model (its own seeded generator: reproducible, leaves the training RNG alone)."""
    was = model.training
    model.eval()
    ids = tok.encode(prompt, errors="drop") or [0]
    idx = torch.tensor([ids], dtype=torch.long, device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    out = model.generate(idx, n, temperature=temperature, top_k=top_k, top_p=top_p, generator=gen,
                         n_tokens=tok.vocab_size)
    model.train(was)
    return tok.decode(out[0, len(ids):].tolist())


@torch.no_grad()
def perplexity(model: GPT, ids: torch.Tensor, block_size: int, batch_size: int = 8,
               device: torch.device | str | None = None) -> float:
    """exp(mean next-token cross-entropy) over non-overlapping windows of `block_size` (every held-out
    token predicted once, each with 0..block_size-1 tokens of context)."""
    device = device or next(model.parameters()).device
    ids = torch.as_tensor(ids, dtype=torch.long).flatten()
    n = (len(ids) - 1) // block_size
    if n < 1:
        raise ValueError(f"{len(ids)} tokens are too few for one window of {block_size}")
    xs = ids[:n * block_size].view(n, block_size)
    ys = ids[1:n * block_size + 1].view(n, block_size)
    was = model.training
    model.eval()
    nll, count = 0.0, 0
    for i in range(0, n, batch_size):
        x, y = xs[i:i + batch_size].to(device), ys[i:i + batch_size].to(device)
        logits, _ = model(x, y)
        nll += float(F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.reshape(-1), reduction="sum"))
        count += y.numel()
    model.train(was)
    return math.exp(nll / count)


# ---------------------------------------------------------------- plots

def finish_plot(fig: Any, ax: Any, path: Path, xlabel: str, ylabel: str, title: str, legend: bool = True) -> None:
    """The tail every tier-2 plot shares: axis labels, a title, a light grid, the legend; then the PNG."""
    from tiers.report import save

    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3)
    if legend:
        ax.legend(fontsize=8)
    save(fig, path)

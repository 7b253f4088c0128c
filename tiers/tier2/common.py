"""What the torch milestones share: device and precision, tokenizers, the text, the training loop.

    device_and_precision(ctx | "cuda:0")  -> (torch.device, "bf16" | "fp16" | "fp32")
    autocast(device, precision)           mixed precision where the device has it; nothing on a CPU
    grad_scaler(device, precision)        loss scaling for fp16 (bf16 and fp32 need none)
    CharTokenizer, BPETokenizer, TiktokenTokenizer, tokenizer_from_meta(meta)
    shakespeare()                         Tiny Shakespeare through the data registry
    TrainConfig, train_lm(...)            the hand-written loop B12 uses and B13/B14 reuse
    base_model(ctx)                       the B12 checkpoint, else a small char model trained in seconds
    perplexity(model, ids, block_size)    on held-out ids, non-overlapping windows
    param_table(model)                    per-parameter shapes and counts (B11's table)

The loop is written out (no Trainer) so a learner sees every piece: AdamW with
weight decay on matrices only, warmup then cosine decay, gradient clipping,
validation loss and samples every N steps, and checkpoints that hold everything
needed to continue *bit-exactly*: weights, optimizer moments, the step, every
random generator's state and the history so far. A run killed after a checkpoint
and resumed produces the same loss sequence as one that was never interrupted.

CUDA (bf16/fp16) and MPS paths are written by the documented torch APIs but were
not run on this project's CPU-only build machine.
"""
from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch.nn import functional as F

from models.gpt import GPT, GPTConfig, load_checkpoint, save_checkpoint
from models.tokenizers import (BPETokenizer, CharTokenizer, TiktokenTokenizer, Tokenizer,  # noqa: F401
                               make_tokenizer, tokenizer_from_meta)

if TYPE_CHECKING:
    from tiers.runner import Context

B12_FOLDER = "B12-pretraining"


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


# ---------------------------------------------------------------- the training loop

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
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


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


def lm_loss(model: GPT, batch: Any) -> torch.Tensor:
    """The default loss: next-token cross-entropy of (x, y); y = -1 is ignored (B13 masks prompts that way)."""
    x, y = batch
    return model(x, y)[1]


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
    out = model.generate(idx, n, temperature=temperature, top_k=top_k, top_p=top_p, generator=gen)
    model.train(was)
    return tok.decode(out[0, len(ids):].tolist())


class ResumeError(Exception):
    """A checkpoint cannot be resumed; str() is one line saying why and what to do."""


def _rng_state(data_gen: torch.Generator, device: torch.device) -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "data": data_gen.get_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, Any], data_gen: torch.Generator, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    data_gen.set_state(state["data"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


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
    diff = [k for k, v in asdict(cfg).items() if k not in ("ckpt_interval",) and theirs.get(k) != v]
    diff += [f"model.{k}" for k, v in model_config.to_dict().items() if ckpt["config"].get(k) != v]
    if diff:
        raise ResumeError(f"{path} was written with other settings ({', '.join(diff[:6])}); "
                          "resume with the same size and settings, or start afresh without --resume")
    return ckpt


def train_lm(model: GPT, cfg: TrainConfig, batch_fn: Callable[[int, torch.Generator], Any], *,
             device: torch.device, precision: str = "fp32",
             loss_fn: Callable[[GPT, Any], torch.Tensor] = lm_loss,
             eval_fn: Callable[[GPT, int], dict[str, float]] | None = None,
             sample_fn: Callable[[GPT, int], str] | None = None,
             ckpt_path: Path | None = None, resume: bool = False, meta: dict[str, Any] | None = None,
             on_step: Callable[[int, dict[str, Any]], None] | None = None,
             log: Callable[..., None] = print) -> dict[str, Any]:
    """Train `model` in place for cfg.steps optimizer steps; return the history.

    Hooks (so B13/B14 reuse the loop with their own data and loss):
      batch_fn(step, gen) -> batch     draw a (micro-)batch with `gen`, the loop's data generator
                                       (its state is checkpointed; use no other randomness)
      loss_fn(model, batch) -> loss    default: next-token cross-entropy of (x, y)
      eval_fn(model, step) -> {name: value}   every eval_interval steps and at the end (no_grad, eval mode)
      sample_fn(model, step) -> text   every sample_interval steps and at the end
      on_step(step, record)            after every step (progress bars, logs)

    History: per step "loss", "lr", "grad_norm", "seconds"; "evals": [{step, ...}]; "samples": [{step, text}].
    With ckpt_path, a checkpoint is written atomically every ckpt_interval steps and at the end;
    `resume=True` continues from it bit-exactly (ResumeError if it is missing or from other settings).
    """
    model.to(device).train()
    opt = make_optimizer(model, cfg, device)
    scaler = grad_scaler(device, precision)
    data_gen = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)  # dropout masks come from the global generator
    hist: dict[str, Any] = {"loss": [], "lr": [], "grad_norm": [], "seconds": [], "evals": [], "samples": [],
                            "resumed_at": []}
    start = 0
    if resume:
        if ckpt_path is None:
            raise ResumeError("resume asked for, but this run has no checkpoint path")
        ckpt = read_resume(Path(ckpt_path), cfg, model.config)
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        if scaler is not None and ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        _set_rng_state(ckpt["rng"], data_gen, device)
        hist = ckpt["history"]
        start = int(ckpt["step"])
        hist["resumed_at"].append(start)
        log(f"resumed from {ckpt_path} at step {start} of {cfg.steps}")
    params = [p for p in model.parameters() if p.requires_grad]

    def checkpoint(next_step: int) -> None:
        if ckpt_path is None:
            return
        save_checkpoint(ckpt_path, model, meta=meta, optimizer=opt.state_dict(), step=next_step,
                        rng=_rng_state(data_gen, device), history=hist, train_config=asdict(cfg),
                        scaler=scaler.state_dict() if scaler is not None else {})

    def evaluate(step: int) -> None:
        final = step == cfg.steps
        if eval_fn is not None and (final or (cfg.eval_interval and step % cfg.eval_interval == 0)) \
                and not any(e["step"] == step for e in hist["evals"]):
            rec = {"step": step, **eval_fn(model, step)}
            hist["evals"].append(rec)
            log(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in rec.items() if k != "step"))
        if sample_fn is not None and (final or (cfg.sample_interval and step % cfg.sample_interval == 0)) \
                and not any(s["step"] == step for s in hist["samples"]):
            hist["samples"].append({"step": step, "text": sample_fn(model, step)})

    for step in range(start, cfg.steps):
        evaluate(step)
        t0 = time.perf_counter()
        lr = lr_at(step, cfg)
        for g in opt.param_groups:
            g["lr"] = lr
        opt.zero_grad(set_to_none=True)
        total = 0.0
        for _ in range(cfg.grad_accum):
            batch = batch_fn(step, data_gen)
            with autocast(device, precision):
                loss = loss_fn(model, batch) / cfg.grad_accum
            (scaler.scale(loss) if scaler is not None else loss).backward()
            total += float(loss.detach())
        if scaler is not None:
            scaler.unscale_(opt)  # clip the true gradients, not the scaled ones
        clip = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
        norm = float(torch.nn.utils.clip_grad_norm_(params, clip))
        if scaler is not None:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        rec = {"loss": total, "lr": lr, "grad_norm": norm, "seconds": time.perf_counter() - t0}
        for k, v in rec.items():
            hist[k].append(v)
        if on_step is not None:
            on_step(step, rec)
        if cfg.ckpt_interval and (step + 1) % cfg.ckpt_interval == 0 and step + 1 < cfg.steps:
            checkpoint(step + 1)
    evaluate(cfg.steps)
    checkpoint(cfg.steps)
    return hist


# ---------------------------------------------------------------- evaluation and inspection

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


def param_table(model: torch.nn.Module) -> list[list[Any]]:
    """Rows [name, shape, parameters] per tensor (a tied matrix appears once, under its first name)."""
    return [[name, " x ".join(map(str, p.shape)), p.numel()] for name, p in model.named_parameters()]


def param_groups_by_layer(model: GPT) -> list[list[Any]]:
    """Rows [part, parameters]: embeddings, each block, final norm + head (tied head counted in wte)."""
    groups: dict[str, int] = {}
    for name, p in model.named_parameters():
        parts = name.split(".")
        key = f"block {parts[2]}" if parts[:2] == ["transformer", "h"] else parts[1] if parts[0] == "transformer" \
            else parts[0]
        groups[key] = groups.get(key, 0) + p.numel()
    return [[k, v] for k, v in groups.items()]


# ---------------------------------------------------------------- the base model for B7, B13, B14, B16

QUICK_BASE = {"n_layer": 2, "n_head": 2, "n_embd": 64, "block_size": 64, "steps": 300, "batch_size": 16}


def b12_checkpoint(ctx: Context) -> Path:
    """Where B12 leaves its model: <build root>/B12-pretraining/ckpt.pt."""
    return Path(ctx.out_dir).parent / B12_FOLDER / "ckpt.pt"


def base_model(ctx: Context) -> tuple[GPT, Tokenizer, Path | None]:
    """(model, tokenizer, checkpoint path) to fine-tune, align, quantise or export.

    ctx.config["init"] when it names a checkpoint file; else the B12 build's checkpoint;
    else a small char-level model trained here on Tiny Shakespeare in seconds (path None),
    said so in the log: a stand-in for checking the pipeline, not a good model.
    """
    init = str(ctx.config.get("init") or "")
    candidates = [Path(init).expanduser()] if init and ("/" in init or init.endswith(".pt")) else []
    if candidates and not candidates[0].is_file():
        raise FileNotFoundError(f"init checkpoint {candidates[0]} does not exist; run `tierkit run B12` "
                                "or point init at a tierkit GPT checkpoint")
    candidates.append(b12_checkpoint(ctx))
    device, _ = device_and_precision(ctx)
    for path in candidates:
        if path.is_file():
            model, ckpt = load_checkpoint(path, map_location="cpu")
            tok_meta = ckpt.get("meta", {}).get("tokenizer")
            if not tok_meta:
                raise ValueError(f"{path}: the checkpoint has no tokenizer in its meta; re-run `tierkit run B12`")
            ctx.log(f"base model: {path} ({model.num_params():,} parameters)")
            return model.to(device), tokenizer_from_meta(tok_meta), path
    q = QUICK_BASE
    ctx.log(f"base model: no B12 checkpoint at {candidates[-1]}; training a small char-level model "
            f"({q['n_layer']} layers, {q['n_embd']} wide, {q['steps']} steps) as a stand-in. "
            "Run `tierkit run B12` for a real one.")
    model, tok, _ = quick_char_model(device, log=lambda *a: None)
    return model, tok, None


def quick_char_model(device: torch.device | str = "cpu", steps: int | None = None, seed: int = 0,
                     log: Callable[..., None] = print) -> tuple[GPT, CharTokenizer, dict[str, Any]]:
    """A 2-layer char-level GPT trained briefly on Tiny Shakespeare (~100k parameters, seconds on a CPU)."""
    q = QUICK_BASE
    device = torch.device(device)
    text = shakespeare()
    tok = CharTokenizer(text)
    train_ids, _ = split_ids(tok.encode(text))
    cfg = GPTConfig(vocab_size=tok.vocab_size, block_size=q["block_size"], n_layer=q["n_layer"],
                    n_head=q["n_head"], n_embd=q["n_embd"], dropout=0.0)
    model = GPT(cfg, seed=seed)
    tc = TrainConfig(steps=steps or q["steps"], lr=3e-3, min_lr=3e-4, warmup=20, eval_interval=0, seed=seed)
    hist = train_lm(model, tc, lambda s, g: random_batch(train_ids, cfg.block_size, q["batch_size"], g, device),
                    device=device, log=log)
    model.eval()
    return model, tok, hist


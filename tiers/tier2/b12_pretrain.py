"""B12: pretraining a small GPT on real text, with the training loop written out in this file.

    text (the rung's `dataset`: tinyshakespeare, tinystories, openwebtext-sample)
      ─► tokens: characters or our own BPE (in memory), or GPT-2's BPE, tokenised once into
         uint16 files on disk (tiers/tier2/tokenised.py, like nanoGPT's prepare.py) ─► 90% train / 10% held out
    for step in start..steps-1:                     (start > 0 when --resume continues a checkpoint)
        every eval_interval: the loss on train and held-out windows; every sample_interval: a sample
        lr = warmup, then cosine(step)
        for each of grad_accum micro-batches:
            x, y = windows of the train ids at random offsets (y: x shifted by one token)
            loss = cross_entropy(model.logits(x), y) / grad_accum            the forward pass
            loss.backward()                                                 gradients add up
        clip the gradient norm to grad_clip; AdamW step
        every ckpt_interval: an atomic checkpoint (weights, optimiser, generators, history)

`train` below is that loop. B11 runs it for a short sanity run; B13 and B14 run it
with their own batches and losses (the masked SFT loss, the DPO loss), so there is
one loop to read. `base_model` is what B12 leaves for B7, B13, B14 and B16: its
checkpoint, or, when there is none, a small stand-in trained here in seconds.

Resuming: while it runs, the checkpoint lives at `<builds>/.B12-pretraining.resume.pt`
(outside the build folder, which only appears when the run succeeds). It holds the
weights, AdamW's moments, the step, the data and dropout generators' states and
the history so far; `tierkit run B12 --resume` continues from it and produces the
same loss sequence, bit for bit, as a run that was never interrupted (tested by
killing the process with SIGKILL). At the end the checkpoint moves into the build
folder as `ckpt.pt`, where B7, B13, B14 and B16 find it.

Defaults follow nanoGPT's shakespeare_char recipe (AdamW beta2 0.99, lr 1e-3
decaying to 1e-4, 100 warmup steps, weight decay 0.1, clip 1.0); its CPU command
(4 layers, 4 heads, 128 wide, context 64, batch 12, 2,000 steps, no dropout) is
the 0.8M rung, for which nanoGPT publishes a loss of about 1.88 nats per character.
The default architecture is the llama flavour of models/gpt.py (RoPE, RMSNorm,
SwiGLU), so the model you train here runs in llama.cpp in B16; measured here at
the 0.8M rung: held-out 1.682 (llama) vs 1.905 (`--set arch=gpt2`, nanoGPT's own
architecture without biases) over the whole held-out split.
"""
from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import numpy as np
import torch
from annotated_types import Ge, Gt, Le, Lt
from torch.nn import functional as F

from models import costs
from models.gpt import GPT, GPTConfig, load_checkpoint
from models.tokenizers import CharTokenizer, Tokenizer, make_tokenizer, tokenizer_from_meta
from tiers.report import md_table, pyplot, save
from tiers.tier2 import common as c

if TYPE_CHECKING:
    from tiers.runner import Context, Output

FOLDER = "B12-pretraining"
RESUME_NAME = ".B12-pretraining.resume.pt"


@dataclass
class Config:
    # the size: every rung of the ladder names these (tiers/milestones.yaml)
    vocab_size: Annotated[int, Gt(0)]   # char: the text's own characters instead; bpe: merged up to this
    block_size: Annotated[int, Gt(0)]   # the context, in tokens
    n_layer: Annotated[int, Gt(0)]
    n_head: Annotated[int, Gt(0)]
    n_embd: Annotated[int, Gt(0)]
    batch_size: Annotated[int, Gt(0)]
    steps: Annotated[int, Gt(0)]
    data: str = "tiny-shakespeare (characters)"   # names the tokens: "... GPT-2 BPE" -> gpt2, "... BPE" -> bpe
    tokenizer: Literal["char", "bpe", "gpt2"] | None = None   # None: from `data`
    dataset: Literal["tinyshakespeare", "tinystories", "openwebtext-sample"] | None = None  # None: from `data`
    data_path: str | None = None                  # your own text (a file, or a folder of .txt) instead
    heldout_tokens: Annotated[int, Gt(0)] = 1 << 20   # the whole-split perplexity reads at most this many
    # the model
    arch: Literal["gpt2", "llama"] = "llama"      # llama: RoPE, RMSNorm, SwiGLU; runs in llama.cpp (B16)
    dropout: Annotated[float, Ge(0), Lt(1)] = 0.0
    bias: bool = False
    # the optimiser and its schedule
    lr: Annotated[float, Gt(0)] = 1e-3
    min_lr: Annotated[float, Ge(0)] = 1e-4        # the cosine decays to this
    warmup: Annotated[int, Ge(0)] = 100           # steps of linear warmup
    weight_decay: Annotated[float, Ge(0)] = 0.1   # on matrices only (common.make_optimizer)
    beta1: Annotated[float, Ge(0), Lt(1)] = 0.9
    beta2: Annotated[float, Ge(0), Lt(1)] = 0.99  # nanoGPT's: few tokens per step, a shorter memory
    grad_clip: Annotated[float, Ge(0)] = 1.0      # 0: no clipping (the norm is still recorded)
    grad_accum: Annotated[int, Gt(0)] = 1         # micro-batches per optimiser step
    seed: int = 1337
    val_frac: Annotated[float, Gt(0), Lt(1)] = 0.1  # the last part of the text, held out
    # what it measures and keeps while it runs
    eval_interval: Annotated[int, Ge(0)] = 250    # 0: only at the end
    eval_iters: Annotated[int, Gt(0)] = 200       # batches per loss estimate
    sample_interval: Annotated[int, Ge(0)] = 500  # 0: only at the end
    ckpt_interval: Annotated[int, Ge(0)] = 250    # 0: only at the end
    resume: bool = False                          # `tierkit run B12 --resume`: continue the interrupted run
    # the samples
    prompt: str = "\n"
    sample_tokens: Annotated[int, Gt(0)] = 300
    temperature: Annotated[float, Ge(0)] = 0.8    # 0: greedy
    top_k: Annotated[int, Gt(0)] | None = 200
    top_p: Annotated[float, Gt(0), Le(1)] | None = None


def dataset_name(cfg: Config) -> str:
    """The registry name of the text: `dataset`, else read from the rung's `data` label."""
    if cfg.dataset:
        return cfg.dataset
    label = cfg.data.lower()
    if "tinystories" in label:
        return "tinystories"
    return "openwebtext-sample" if "openwebtext" in label else "tinyshakespeare"


def tokenizer_kind(cfg: Config) -> str:
    if cfg.tokenizer:
        return cfg.tokenizer
    data = cfg.data.lower()
    if "gpt-2" in data or "gpt2" in data:
        return "gpt2"
    return "bpe" if "bpe" in data else "char"


def model_config(cfg: Config, kind: str, tok_vocab: int) -> GPTConfig:
    """The GPT for this size and these tokens: one embedding row per token."""
    vocab = tok_vocab if kind == "char" else max(tok_vocab, cfg.vocab_size)
    if kind == "gpt2":
        vocab = 64 * math.ceil(tok_vocab / 64)   # 50257 -> 50304: matmuls on multiples of 64 run faster
    return GPTConfig(vocab_size=vocab, block_size=cfg.block_size, n_layer=cfg.n_layer, n_head=cfg.n_head,
                     n_embd=cfg.n_embd, dropout=cfg.dropout, bias=cfg.bias, arch=cfg.arch)


# ---------------------------------------------------------------- the training loop

def next_token_loss(model: GPT, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Pretraining's loss: at every position, the cross-entropy of the prediction against the next token."""
    x, y = batch                                   # y[:, t] = x[:, t + 1]
    logits = model.logits(x)                       # the forward pass: (B, T, vocab)
    return F.cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1))


def train(model: GPT, tc: c.TrainConfig, get_batch: Callable[[torch.Generator], Any], *, device: torch.device,
          precision: str = "fp32", loss_fn: Callable[[GPT, Any], torch.Tensor] = next_token_loss,
          evaluate: Callable[[GPT], dict[str, float]] | None = None, sample: Callable[[GPT, int], str] | None = None,
          ckpt_path: Path | None = None, resume_from: dict[str, Any] | None = None,
          meta: dict[str, Any] | None = None, on_step: Callable[[int, dict[str, Any]], None] | None = None,
          log: Callable[..., None] = print) -> dict[str, Any]:
    """Train `model` in place for tc.steps optimiser steps; return the history.

    get_batch(gen) draws a batch with `gen`, the loop's data generator (checkpointed: use no
    other randomness); loss_fn(model, batch) is the loss; evaluate(model) -> {name: value} and
    sample(model, step) -> text run every eval_interval / sample_interval steps and at the end.
    History: per step "loss", "lr", "grad_norm", "seconds"; "evals" and "samples" with their step.
    With ckpt_path, a checkpoint every ckpt_interval steps and at the end; resume_from (a checkpoint
    from common.read_resume) continues that run bit-exactly.
    """
    model.to(device).train()
    opt = c.make_optimizer(model, tc, device)            # AdamW, weight decay on matrices only
    scaler = c.grad_scaler(device, precision)            # fp16 only: the loss scaled so gradients do not underflow
    data_gen = torch.Generator().manual_seed(tc.seed)    # which windows each batch reads
    torch.manual_seed(tc.seed)                           # dropout masks come from the global generator
    hist: dict[str, Any] = {k: [] for k in ("loss", "lr", "grad_norm", "seconds", "evals", "samples", "resumed_at")}
    start = 0
    if resume_from is not None:
        start, hist = c.restore_state(resume_from, model, opt, scaler, data_gen)
        log(f"resumed from {ckpt_path} at step {start} of {tc.steps}")
    params = [p for p in model.parameters() if p.requires_grad]
    clip = tc.grad_clip if tc.grad_clip > 0 else float("inf")

    with c.stop_on_sigint() as stop:   # Ctrl-C: finish the step, checkpoint it, then stop (c.Interrupted)
        for step in range(start, tc.steps):
            if stop:
                if ckpt_path is not None:
                    c.save_state(ckpt_path, model, opt, scaler, step, data_gen, hist, tc, meta)
                raise c.Interrupted(step, tc.steps, ckpt_path)
            _step(model, opt, scaler, step, tc, hist, get_batch, data_gen, device, precision, loss_fn, params, clip,
                  evaluate, sample, log)
            if on_step is not None:
                on_step(step, {k: hist[k][-1] for k in ("loss", "lr", "grad_norm", "seconds")})
            if ckpt_path is not None and tc.ckpt_interval and (step + 1) % tc.ckpt_interval == 0 \
                    and step + 1 < tc.steps:
                c.save_state(ckpt_path, model, opt, scaler, step + 1, data_gen, hist, tc, meta)
    _observe(model, tc.steps, tc, hist, evaluate, sample, log)
    if ckpt_path is not None:
        c.save_state(ckpt_path, model, opt, scaler, tc.steps, data_gen, hist, tc, meta)
    return hist


def _step(model: GPT, opt: Any, scaler: Any, step: int, tc: c.TrainConfig, hist: dict[str, Any],
          get_batch: Callable[[torch.Generator], Any], data_gen: torch.Generator, device: torch.device,
          precision: str, loss_fn: Callable[[GPT, Any], torch.Tensor], params: list[torch.Tensor], clip: float,
          evaluate: Callable[[GPT], dict[str, float]] | None, sample: Callable[[GPT, int], str] | None,
          log: Callable[..., None]) -> None:
    """One optimiser step: observe if due, then forward, backward, clip, update; its record goes into hist."""
    _observe(model, step, tc, hist, evaluate, sample, log)
    t0 = time.perf_counter()
    lr = c.lr_at(step, tc)                           # warmup, then cosine decay
    for group in opt.param_groups:
        group["lr"] = lr
    opt.zero_grad(set_to_none=True)
    total = 0.0
    for _ in range(tc.grad_accum):
        batch = get_batch(data_gen)
        with c.autocast(device, precision):
            loss = loss_fn(model, batch) / tc.grad_accum     # forward and loss (next_token_loss, above)
        (scaler.scale(loss) if scaler is not None else loss).backward()   # backward: gradients add up
        total += float(loss.detach())
    if scaler is not None:
        scaler.unscale_(opt)                         # clip the true gradients, not the scaled ones
    norm = float(torch.nn.utils.clip_grad_norm_(params, clip))   # the global norm, scaled down to grad_clip
    if scaler is not None:
        scaler.step(opt)                             # skipped when fp16 overflowed (inf or nan gradients)
        scaler.update()
    else:
        opt.step()                                   # AdamW: the update
    if device.type == "cuda":
        torch.cuda.synchronize(device)               # so the step's time is its own
    rec = {"loss": total, "lr": lr, "grad_norm": norm, "seconds": time.perf_counter() - t0}
    for k, v in rec.items():
        hist[k].append(v)


def _observe(model: GPT, step: int, tc: c.TrainConfig, hist: dict[str, Any],
             evaluate: Callable[[GPT], dict[str, float]] | None, sample: Callable[[GPT, int], str] | None,
             log: Callable[..., None]) -> None:
    """Evaluate and sample when `step` is due (every interval, and at the end), at most once per step."""
    def due(interval: int, done: list[dict[str, Any]]) -> bool:
        return (step == tc.steps or bool(interval and step % interval == 0)) and all(d["step"] != step for d in done)

    if evaluate is not None and due(tc.eval_interval, hist["evals"]):
        rec = {"step": step, **evaluate(model)}
        hist["evals"].append(rec)
        log(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in rec.items() if k != "step"))
    if sample is not None and due(tc.sample_interval, hist["samples"]):
        hist["samples"].append({"step": step, "text": sample(model, step)})


# ---------------------------------------------------------------- what B7, B13, B14 and B16 start from

STANDIN = {"n_layer": 2, "n_head": 2, "n_embd": 64, "block_size": 64, "batch_size": 16}


def checkpoint_path(ctx: Context) -> Path:
    """Where B12 leaves its model: <build root>/B12-pretraining/ckpt.pt."""
    return Path(ctx.out_dir).parent / FOLDER / "ckpt.pt"


def base_model(ctx: Context, init: str | None = None) -> tuple[GPT, Tokenizer, Path | None]:
    """(model, tokenizer, checkpoint path) to fine-tune, align, quantise or export.

    `init` when it names a checkpoint file (a path, or a name ending .pt); else the B12 build's
    checkpoint; else a small char-level model trained here on Tiny Shakespeare in seconds (path
    None), said so in the log: a stand-in for checking the pipeline, not a good model.
    """
    init = init or ""
    candidates = [Path(init).expanduser()] if "/" in init or init.endswith(".pt") else []
    if candidates and not candidates[0].is_file():
        raise FileNotFoundError(f"init checkpoint {candidates[0]} does not exist; run `tierkit run B12` "
                                "or point init at a tierkit GPT checkpoint")
    candidates.append(checkpoint_path(ctx))
    device, _ = c.device_and_precision(ctx)
    for path in candidates:
        if path.is_file():
            model, ckpt = load_checkpoint(path, map_location="cpu")
            tok_meta = ckpt.get("meta", {}).get("tokenizer")
            if not tok_meta:
                raise ValueError(f"{path}: the checkpoint has no tokenizer in its meta; re-run `tierkit run B12`")
            ctx.log(f"base model: {path} ({model.num_params():,} parameters)")
            return model.to(device), tokenizer_from_meta(tok_meta), path
    ctx.log(f"base model: no B12 checkpoint at {candidates[-1]}; training a small char-level model "
            f"({STANDIN['n_layer']} layers, {STANDIN['n_embd']} wide, 300 steps) as a stand-in. "
            "Run `tierkit run B12` for a real one.")
    model, tok = standin(device)
    return model, tok, None


def standin(device: torch.device | str = "cpu", arch: str = "gpt2", steps: int = 300, seed: int = 0,
            on_step: Callable[[int, dict[str, Any]], None] | None = None) -> tuple[GPT, CharTokenizer]:
    """A 2-layer char-level GPT trained briefly on Tiny Shakespeare (~100k parameters, seconds on a CPU)."""
    s, device = STANDIN, torch.device(device)
    text = c.shakespeare()
    tok = CharTokenizer(text)
    train_ids, _ = c.split_ids(tok.encode(text))
    mcfg = GPTConfig(vocab_size=tok.vocab_size, block_size=s["block_size"], n_layer=s["n_layer"],
                     n_head=s["n_head"], n_embd=s["n_embd"], dropout=0.0, arch=arch)
    model = GPT(mcfg, seed=seed)
    tc = c.TrainConfig(steps=steps, lr=3e-3, min_lr=3e-4, warmup=20, eval_interval=0, seed=seed)
    train(model, tc, lambda g: c.random_batch(train_ids, mcfg.block_size, s["batch_size"], g, device),
          device=device, on_step=on_step, log=lambda *a: None)
    return model.eval(), tok


# ---------------------------------------------------------------- the text, as tokens

IN_MEMORY_MAX = 50 * 10**6   # bytes of text the char and our own BPE tokenizers take (they work in memory)


@dataclass
class Corpus:
    """The run's tokens: tensors (char, bpe) or token files on disk (gpt2), split 90 / 10."""

    name: str                 # the registry name, or "your text"
    label: str                # what the text is, for the README
    source: Path              # where it was read from
    kind: str                 # char | bpe | gpt2
    tok: Tokenizer
    train: Any                # torch.Tensor | tokenised.TokenFile: both index as t[i:j] -> ids
    val: Any
    seconds: float            # spent tokenising in this run (0 when the token files were reused)
    tokenised: dict[str, Any] | None = None   # gpt2: the token files' folder, and whether they were reused

    @property
    def tokens(self) -> int:
        return len(self.train) + len(self.val)


def load_corpus(ctx: Context, cfg: Config) -> Corpus:
    """The rung's text (data.require(dataset), or data_path) as tokens; RunError (one line) when it cannot."""
    from tiers import data
    from tiers.runner import RunError
    from tiers.tier2 import tokenised

    kind, name = tokenizer_kind(cfg), dataset_name(cfg)
    try:
        path = Path(cfg.data_path).expanduser() if cfg.data_path else data.require(name)
        files = tokenised.text_files(path)
        label = "your text" if cfg.data_path else f"{data.get(name).title} ({name})"
        size = sum(f.stat().st_size for f in files)
        if kind == "gpt2":
            tok = make_tokenizer("gpt2", "")
            with ctx.progress(f"GPT-2 tokens of {path.name} (tokenised once, then reused)", size) as bar:
                t = tokenised.prepare(path, data.data_root(), val_frac=cfg.val_frac, on_bytes=bar.advance,
                                      log=ctx.log)
            corpus = Corpus("your text" if cfg.data_path else name, label, path, kind, tok, t.train, t.val,
                            0.0 if t.reused else t.meta["seconds"],
                            {"folder": str(t.folder), "reused": t.reused, "seconds": t.meta["seconds"]})
        elif size > IN_MEMORY_MAX:
            raise RunError(f"B12: {label} is {size / 1e6:,.0f} MB; {kind} tokens are made in memory from at most "
                           f"{IN_MEMORY_MAX / 1e6:.0f} MB: use --set tokenizer=gpt2 (tokenised once to disk)")
        else:
            t0 = time.perf_counter()
            text = "".join(f.read_text(encoding="utf-8") for f in files)
            tok = make_tokenizer(kind, text, cfg.vocab_size)
            train_ids, val_ids = c.split_ids(torch.tensor(tok.encode(text), dtype=torch.long), cfg.val_frac)
            corpus = Corpus("your text" if cfg.data_path else name, label, path, kind, tok, train_ids, val_ids,
                            time.perf_counter() - t0)
    except (data.DataError, FileNotFoundError, ValueError) as e:
        raise RunError(f"B12: {e}") from None
    except OSError as e:
        raise RunError(f"B12: {e.filename}: {e.strerror} (the token files go under {data.data_root()}; "
                       "TIERKIT_DATA moves them)") from None
    reused = " (token files from an earlier run)" if corpus.tokenised and corpus.tokenised["reused"] else ""
    ctx.log(f"data: {label} ({path}), {size:,} bytes -> {corpus.tokens:,} {kind} tokens (vocabulary {tok.vocab_size:,})"
            f"{reused}; {len(corpus.train):,} to train, {len(corpus.val):,} held out")
    return corpus


# ---------------------------------------------------------------- the milestone

def run(ctx: Context) -> Output:
    from tiers.runner import Output, RunError

    cfg: Config = ctx.config
    device, precision = c.device_and_precision(ctx)
    resume_path = Path(ctx.out_dir).parent / RESUME_NAME
    if cfg.resume:  # the interrupted run's settings, unless --set gives one (a real conflict names both)
        try:
            cfg = ctx.config = c.resume_settings(resume_path, cfg, set(ctx.plan.config.get("resume_given", ())))
        except c.ResumeError as e:
            raise RunError(f"B12: {e}") from None

    # the data: the text as tokens, the first 90% to train on, the rest held out
    corpus = load_corpus(ctx, cfg)
    tok, kind, train_ids, val_ids = corpus.tok, corpus.kind, corpus.train, corpus.val

    # the model and the loop's settings
    mcfg = model_config(cfg, kind, tok.vocab_size)
    model = GPT(mcfg, seed=cfg.seed)
    tc = c.TrainConfig.pick(cfg)
    B, T = cfg.batch_size, mcfg.block_size
    ctx.log(f"model: {mcfg.arch}, {mcfg.n_layer} layers, {mcfg.n_head} heads, {mcfg.n_embd} wide, context {T}: "
            f"{model.num_params():,} parameters; {tc.steps} steps of batch {B} x {tc.grad_accum} on {device} "
            f"({precision})")

    # from the start, or from where the interrupted run's checkpoint left it (--resume)
    resume_from = None
    if cfg.resume:
        try:
            resume_from = c.read_resume(resume_path, tc, mcfg)
        except c.ResumeError as e:
            raise RunError(f"B12: {e}") from None
    elif resume_path.exists():
        ctx.log(f"an interrupted run's checkpoint {resume_path} is overwritten (pass --resume to continue it)")

    splits = {"train": train_ids, "val": val_ids}
    meta = {"tokenizer": tok.meta(), "milestone": "B12", "data": corpus.name, "config": asdict(cfg)}
    start = resume_from["step"] if resume_from else 0
    # no terminal (a log file): plain step lines every few seconds instead of the bar
    lines = c.StepLines(lambda line: print(line, flush=True), tc.steps, B * T * tc.grad_accum, start) \
        if ctx.progress_display is None else None

    def on_step(step: int, rec: dict[str, Any]) -> None:
        bar.advance()
        if lines is not None:
            lines(step, rec["loss"], rec["seconds"])

    with ctx.progress(f"pretraining {model.num_params() / 1e6:.2f}M", tc.steps) as bar:
        bar.advance(start)
        t_train = time.perf_counter()
        try:
            hist = train(model, tc, lambda g: c.random_batch(train_ids, T, B, g, device), device=device,
                         precision=precision, ckpt_path=resume_path, resume_from=resume_from, meta=meta,
                         evaluate=lambda m: c.estimate_loss(m, splits, T, B, cfg.eval_iters, tc.seed, device,
                                                            precision),
                         sample=lambda m, step: c.sample_text(m, tok, cfg.prompt, cfg.sample_tokens, cfg.temperature,
                                                              cfg.top_k, cfg.top_p, seed=step, device=device),
                         on_step=on_step, log=ctx.log)
        except c.Interrupted as e:
            raise RunError(f"{e}: checkpoint saved in {e.path}; continue with `{resume_command(ctx)}`", 130) from None
        train_seconds = time.perf_counter() - t_train

    final = Path(ctx.out_dir) / "ckpt.pt"
    resume_path.replace(final)    # the finished checkpoint goes into the build folder, where B7-B16 look
    m = measure(model, tok, kind, corpus.tokens, splits, hist, cfg, tc, device)
    m.update(data=corpus.label, dataset=corpus.name, data_source=str(corpus.source), tokenised=corpus.tokenised,
             tokenize_seconds=corpus.seconds, train_seconds=train_seconds, device=str(device), precision=precision,
             checkpoint=final.name)
    (Path(ctx.out_dir) / "samples.txt").write_text(
        "\n\n".join(f"=== {s['setting']} ===\n{s['text']}" for s in m["samples"]) + "\n", encoding="utf-8")
    summary = (f"A {m['params'] / 1e6:.2f}M-parameter {mcfg.arch} GPT pretrained on {corpus.label.split(' (')[0]} ({kind} tokens) "
               f"for {tc.steps:,} steps reached a held-out loss of **{m['final_val_loss']:.4f}** nats per token "
               f"(unigram baseline {m['unigram_baseline']:.3f}, uniform {m['uniform_baseline']:.3f}) in "
               f"{train_seconds:.1f} s on {device} ({m['tokens_per_second']:,.0f} tokens/s)"
               + (f"; resumed at step {', '.join(map(str, hist['resumed_at']))}" if hist["resumed_at"] else "") + ".")
    return Output(metrics=m, summary=summary, report=report(m), plots=plots(ctx.out_dir, hist, m, tc),
                  config=replace(cfg, vocab_size=mcfg.vocab_size))


def resume_command(ctx: Context) -> str:
    """The command that continues this run: `tierkit run B12 --resume`, with --out when not the default.

    The settings come from the checkpoint, so no --size or --set is needed."""
    out = Path(ctx.out_dir).parent
    return "tierkit run B12 --resume" + ("" if out.resolve() == Path("builds").resolve() else f" --out {out}")


def measure(model: GPT, tok: Tokenizer, kind: str, n_tokens: int, splits: dict[str, Any],
            hist: dict[str, Any], cfg: Config, tc: c.TrainConfig, device: torch.device) -> dict[str, Any]:
    """The run's numbers: held-out loss against the baselines, speed, the history, samples."""
    mcfg, train_ids, val_ids, B = model.config, splits["train"], splits["val"], cfg.batch_size
    scored = val_ids[:cfg.heldout_tokens]            # a tensor, from memory or read from the token file
    shape = costs.GPTShape(mcfg.vocab_size, mcfg.block_size, mcfg.n_layer, mcfg.n_head, mcfg.n_embd, mcfg.bias)
    predicted = (costs.gpt_params(shape) if mcfg.arch == "gpt2" else
                 costs.llama_params(mcfg.vocab_size, mcfg.n_layer, mcfg.n_embd, mcfg.n_head, mcfg.n_kv_head,
                                    mcfg.ffn_hidden, mcfg.tie_weights))
    ppl_full = c.perplexity(model, scored, mcfg.block_size, batch_size=max(B, 16), device=device)
    tokens_per_step = B * mcfg.block_size * tc.grad_accum
    step_s = sorted(hist["seconds"])[len(hist["seconds"]) // 2]
    flops_tok = 6 * costs.gpt_matmul_params(shape) + 6 * mcfg.n_layer * mcfg.block_size * mcfg.n_embd
    last = hist["evals"][-1]
    return {
        "tokenizer": kind, "vocab_size": tok.vocab_size, "model_vocab": mcfg.vocab_size, "tokens": n_tokens,
        "train_tokens": len(train_ids), "val_tokens": len(val_ids), "val_tokens_scored": len(scored),
        "model": mcfg.to_dict(), "params": model.num_params(), "params_predicted": predicted,
        "train_config": asdict(tc), "batch_size": B, "tokens_trained": tokens_per_step * tc.steps,
        "final_train_loss": last["train"], "final_val_loss": last["val"],
        "best_val_loss": min(e["val"] for e in hist["evals"]),
        "val_loss_full": math.log(ppl_full), "val_perplexity_full": ppl_full,
        "unigram_baseline": (c.unigram_entropy(train_ids) if isinstance(train_ids, torch.Tensor)
                             else train_ids.unigram_entropy()), "uniform_baseline": math.log(tok.vocab_size),
        "median_step_seconds": step_s, "tokens_per_second": tokens_per_step / step_s,
        "model_flops_per_token": flops_tok, "achieved_gflops": flops_tok * tokens_per_step / step_s / 1e9,
        "resumed_at": hist["resumed_at"], "prompt": cfg.prompt,
        "history": {k: hist[k] for k in ("loss", "lr", "grad_norm", "evals")},
        "samples_during_training": hist["samples"], "samples": final_samples(model, tok, cfg, device),
    }


def final_samples(model: GPT, tok: Tokenizer, cfg: Config, device: torch.device) -> list[dict[str, str]]:
    """The same prompt under four decoding settings: greedy, the configured one, top-p, hot."""
    settings = [("greedy (temperature 0)", 0.0, None, None),
                (f"temperature {cfg.temperature}, top-k {cfg.top_k}", cfg.temperature, cfg.top_k, cfg.top_p),
                ("temperature 1.0, top-p 0.9", 1.0, None, 0.9),
                ("temperature 1.5 (too hot)", 1.5, None, None)]
    return [{"setting": name, "text": c.sample_text(model, tok, cfg.prompt, cfg.sample_tokens, t, k, p, seed=0,
                                                    device=device)}
            for name, t, k, p in settings]


# ---------------------------------------------------------------- plots and the report

def plots(out_dir: Path, hist: dict[str, Any], m: dict[str, Any], tc: c.TrainConfig) -> list[str]:
    plt = pyplot()
    return [loss_plot(plt, Path(out_dir) / "loss.png", hist, m["unigram_baseline"]),
            series_plot(plt, Path(out_dir) / "lr.png", hist["lr"], "learning rate", "warmup, then cosine decay"),
            series_plot(plt, Path(out_dir) / "grad_norm.png", hist["grad_norm"], "gradient norm (before clipping)",
                        f"clipped at {tc.grad_clip:g}", hline=tc.grad_clip if tc.grad_clip > 0 else None, log=True)]


def loss_plot(plt: Any, path: Path, hist: dict[str, Any], unigram: float) -> str:
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    loss = np.asarray(hist["loss"])
    k = max(1, len(loss) // 100)
    ax.plot(np.arange(len(loss)), loss, lw=0.6, alpha=0.35, color="tab:blue", label="training batch")
    if k > 1:
        smooth = np.convolve(loss, np.ones(k) / k, mode="valid")
        ax.plot(np.arange(len(smooth)) + k - 1, smooth, lw=1.2, color="tab:blue", label=f"running mean ({k} steps)")
    ev = hist["evals"]
    ax.plot([e["step"] for e in ev], [e["train"] for e in ev], "o-", color="tab:green", label="train (estimate)")
    ax.plot([e["step"] for e in ev], [e["val"] for e in ev], "s-", color="tab:red", label="held out (estimate)")
    ax.axhline(unigram, ls="--", color="grey", lw=1, label=f"unigram baseline {unigram:.2f}")
    for r in hist["resumed_at"]:
        ax.axvline(r, ls=":", color="black", lw=1)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats per token)")
    ax.set_title("B12 pretraining: loss" + (" (dotted: resumed here)" if hist["resumed_at"] else ""), fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    save(fig, path)
    return f"{path.name}: training loss per step, train and held-out estimates, the unigram baseline"


def series_plot(plt: Any, path: Path, values: list[float], what: str, note: str, hline: float | None = None,
                log: bool = False) -> str:
    fig, ax = plt.subplots(figsize=(7.5, 3.5))
    ax.plot(range(len(values)), values, lw=0.9)
    if hline is not None:
        ax.axhline(hline, ls="--", color="grey", lw=1, label=note)
        ax.legend(fontsize=8)
    if log:
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel(what)
    ax.set_title(f"B12: {what}", fontsize=10)
    ax.grid(True, alpha=0.3)
    save(fig, path)
    return f"{path.name}: {what} per step ({note})"


def tokenised_note(t: dict[str, Any] | None) -> str:
    if not t:
        return ""
    how = "read from an earlier run" if t["reused"] else f"tokenised by this run in {t['seconds']:.1f} s"
    return f"; GPT-2 tokens in uint16 files under `{t['folder']}` ({how})"


def report(m: dict[str, Any]) -> str:
    tc, mc = m["train_config"], m["model"]
    ev = m["history"]["evals"]
    out = ["## Result", "",
           f"- model: {mc['arch']}, {mc['n_layer']} layers, {mc['n_head']} heads, {mc['n_embd']} wide, context "
           f"{mc['block_size']}, vocabulary {mc['vocab_size']:,} ({m['tokenizer']} tokens): **{m['params']:,} parameters**"
           + (f" (models.costs predicts {m['params_predicted']:,})" if m["params_predicted"] else ""),
           f"- data: {m['data']} (`{m['data_source']}`), {m['train_tokens']:,} tokens to train, {m['val_tokens']:,} "
           f"held out (the last {m['val_tokens'] / m['tokens']:.0%})" + tokenised_note(m.get("tokenised")),
           (f"- training: {tc['steps']:,} steps x batch {m['batch_size']} x {tc['grad_accum']} accumulation "
           f"= {m['tokens_trained']:,} tokens; AdamW (betas {tc['beta1']}, {tc['beta2']}, weight decay "
           f"{tc['weight_decay']} on matrices), lr {tc['lr']:g} -> {tc['min_lr']:g} (warmup {tc['warmup']}, cosine), "
           f"clip {tc['grad_clip']:g}; {m['device']} ({m['precision']})"),
           (f"- held-out loss: **{m['final_val_loss']:.4f}** (estimate on random windows; best {m['best_val_loss']:.4f}); "
           + ("over the whole held-out split" if m["val_tokens_scored"] == m["val_tokens"] else
              f"over the first {m['val_tokens_scored']:,} held-out tokens")
           + f" {m['val_loss_full']:.4f} (perplexity {m['val_perplexity_full']:.2f})"),
           (f"- baselines: unigram (each token from its frequency) {m['unigram_baseline']:.4f}; uniform "
           f"ln V = {m['uniform_baseline']:.4f}"),
           (f"- speed: {m['tokens_per_second']:,.0f} tokens/s (median step {m['median_step_seconds'] * 1e3:.1f} ms), "
           f"{m['achieved_gflops']:.2f} GFLOP/s of model FLOPs (6N + attention per token)"),
           f"- checkpoint: `{m['checkpoint']}` (weights, optimizer, RNG states, step: resumable)"
           + (f"; this run was resumed at step {', '.join(map(str, m['resumed_at']))}" if m["resumed_at"] else ""),
           "", "## Loss during training", "",
           md_table(["step", "train", "held out"], [[e["step"], f"{e['train']:.4f}", f"{e['val']:.4f}"] for e in ev]),
           "", "## Samples", "", "After training, from the prompt " + json.dumps(m["prompt"]) + ":", ""]
    for s in m["samples"]:
        out += [f"**{s['setting']}**", "", "```", s["text"].strip("\n"), "```", ""]
    if m["samples_during_training"]:
        out += ["During training (the configured temperature and top-k):", ""]
        for s in m["samples_during_training"]:
            out += [f"step {s['step']}:", "", "```", s["text"].strip("\n")[:300], "```", ""]
    return "\n".join(out)

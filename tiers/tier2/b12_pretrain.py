"""B12: pretraining a small GPT on Tiny Shakespeare, with the training loop written by hand.

    text ─► tokens (characters, our own BPE, or GPT-2's) ─► 90% train / 10% held out
    for step in 0..steps-1:
        lr = warmup then cosine(step)             every eval_interval: loss on train and held-out
        x, y = random windows of the train ids    every sample_interval: a sample (temperature, top-k, top-p)
        loss = cross_entropy(model(x), y)         every ckpt_interval: an atomic checkpoint
        loss.backward(); clip the gradient norm; AdamW step

The loop itself is `tiers.tier2.common.train_lm` (B13 and B14 reuse it with
their own batches and losses); this file is the pretraining around it: data,
model, the checkpoint to resume from, the plots and the report.

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
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from models import costs
from models.gpt import GPT, GPTConfig
from tiers.tier2 import common as c

if TYPE_CHECKING:
    from tiers.runner import Context, Output

DEFAULTS: dict[str, Any] = {
    "arch": "llama", "dropout": 0.0, "bias": False,  # llama: RoPE, RMSNorm, SwiGLU; runs in llama.cpp (B16)
    "lr": 1e-3, "min_lr": 1e-4, "warmup": 100, "weight_decay": 0.1, "beta1": 0.9, "beta2": 0.99,
    "grad_clip": 1.0, "grad_accum": 1, "eval_interval": 250, "eval_iters": 200, "sample_interval": 500,
    "ckpt_interval": 250, "seed": 1337, "val_frac": 0.1,
    "tokenizer": None,          # char | bpe | gpt2; None: from the rung's data ("... BPE" -> gpt2 or bpe)
    "temperature": 0.8, "top_k": 200, "top_p": None, "sample_tokens": 300, "prompt": "\n",
    "resume": False,
}
RESUME_NAME = ".B12-pretraining.resume.pt"


def tokenizer_kind(cfg: dict[str, Any]) -> str:
    if cfg.get("tokenizer"):
        return str(cfg["tokenizer"]).lower()
    data = str(cfg.get("data") or "").lower()
    if "gpt-2" in data or "gpt2" in data:
        return "gpt2"
    return "bpe" if "bpe" in data else "char"


def train_config(cfg: dict[str, Any]) -> c.TrainConfig:
    return c.TrainConfig(steps=int(cfg["steps"]), lr=float(cfg["lr"]), min_lr=float(cfg["min_lr"]),
                         warmup=int(cfg["warmup"]), weight_decay=float(cfg["weight_decay"]),
                         beta1=float(cfg["beta1"]), beta2=float(cfg["beta2"]), grad_clip=float(cfg["grad_clip"]),
                         grad_accum=int(cfg["grad_accum"]), eval_interval=int(cfg["eval_interval"]),
                         sample_interval=int(cfg["sample_interval"]), ckpt_interval=int(cfg["ckpt_interval"]),
                         seed=int(cfg["seed"]))


def run(ctx: Context) -> Output:
    from tiers.runner import Output, RunError

    cfg = {**DEFAULTS, **ctx.config}
    device, precision = c.device_and_precision(ctx)
    text = c.shakespeare()
    kind = tokenizer_kind(cfg)
    t0 = time.perf_counter()
    tok = c.make_tokenizer(kind, text, int(cfg["vocab_size"]))
    ids = torch.tensor(tok.encode(text), dtype=torch.long)
    tok_seconds = time.perf_counter() - t0
    train_ids, val_ids = c.split_ids(ids, float(cfg["val_frac"]))
    ctx.log(f"data: Tiny Shakespeare, {len(text):,} characters -> {len(ids):,} {kind} tokens "
            f"(vocabulary {tok.vocab_size:,}); {len(train_ids):,} to train, {len(val_ids):,} held out")

    vocab = tok.vocab_size if kind == "char" else max(tok.vocab_size, int(cfg["vocab_size"]))
    if kind == "gpt2":
        vocab = 64 * math.ceil(tok.vocab_size / 64)   # 50257 -> 50304: matmuls on multiples of 64 run faster
    mcfg = GPTConfig(vocab_size=vocab, block_size=int(cfg["block_size"]), n_layer=int(cfg["n_layer"]),
                     n_head=int(cfg["n_head"]), n_embd=int(cfg["n_embd"]), dropout=float(cfg["dropout"]),
                     bias=bool(cfg["bias"]), arch=str(cfg["arch"]))
    model = GPT(mcfg, seed=int(cfg["seed"]))
    n_params = model.num_params()
    shape = costs.GPTShape(mcfg.vocab_size, mcfg.block_size, mcfg.n_layer, mcfg.n_head, mcfg.n_embd, mcfg.bias)
    predicted_params = (costs.gpt_params(shape) if mcfg.arch == "gpt2" else
                        costs.llama_params(mcfg.vocab_size, mcfg.n_layer, mcfg.n_embd, mcfg.n_head, mcfg.n_kv_head,
                                           mcfg.ffn_hidden, mcfg.tie_weights))
    tc = train_config(cfg)
    B, T = int(cfg["batch_size"]), mcfg.block_size
    ctx.log(f"model: {mcfg.arch}, {mcfg.n_layer} layers, {mcfg.n_head} heads, {mcfg.n_embd} wide, context {T}: "
            f"{n_params:,} parameters; {tc.steps} steps of batch {B} x {tc.grad_accum} on {device} ({precision})")

    resume_path = Path(ctx.out_dir).parent / RESUME_NAME
    if not cfg["resume"] and resume_path.exists():
        ctx.log(f"an interrupted run's checkpoint {resume_path} is overwritten (pass --resume to continue it)")
    splits = {"train": train_ids, "val": val_ids}
    eval_iters = int(cfg["eval_iters"])

    def eval_fn(m: GPT, step: int) -> dict[str, float]:
        return c.estimate_loss(m, splits, T, B, eval_iters, tc.seed, device, precision)

    def sample_fn(m: GPT, step: int) -> str:
        return c.sample_text(m, tok, cfg["prompt"], int(cfg["sample_tokens"]), float(cfg["temperature"]),
                             cfg["top_k"], cfg["top_p"], seed=step, device=device)

    meta = {"tokenizer": tok.meta(), "milestone": "B12", "data": "tinyshakespeare", "config": dict(cfg)}
    with ctx.progress(f"pretraining {n_params / 1e6:.2f}M", tc.steps) as bar:
        def on_step(step: int, rec: dict[str, Any]) -> None:
            bar.advance()

        if cfg["resume"]:
            try:
                bar.advance(c.read_resume(resume_path, tc, mcfg)["step"])
            except c.ResumeError as e:
                raise RunError(f"B12: {e}") from None
        t_train = time.perf_counter()
        hist = c.train_lm(model, tc, lambda s, g: c.random_batch(train_ids, T, B, g, device), device=device,
                          precision=precision, eval_fn=eval_fn, sample_fn=sample_fn, ckpt_path=resume_path,
                          resume=bool(cfg["resume"]), meta=meta, on_step=on_step, log=ctx.log)
        train_seconds = time.perf_counter() - t_train

    # the finished checkpoint goes into the build folder; the resume file is no longer needed
    final = Path(ctx.out_dir) / "ckpt.pt"
    resume_path.replace(final)

    unigram = c.unigram_entropy(train_ids)
    last = hist["evals"][-1]
    ppl_full = c.perplexity(model, val_ids, T, batch_size=max(B, 16), device=device)
    tokens_per_step = B * T * tc.grad_accum
    step_s = sorted(hist["seconds"])[len(hist["seconds"]) // 2]
    flops_tok = 6 * costs.gpt_matmul_params(shape) + 6 * mcfg.n_layer * T * mcfg.n_embd
    samples = final_samples(model, tok, cfg, device)
    metrics = {
        "tokenizer": kind, "vocab_size": tok.vocab_size, "model_vocab": mcfg.vocab_size, "tokens": len(ids),
        "train_tokens": len(train_ids), "val_tokens": len(val_ids), "tokenize_seconds": tok_seconds,
        "model": mcfg.to_dict(), "params": n_params, "params_predicted": predicted_params,
        "device": str(device), "precision": precision, "train_config": vars(tc),
        "batch_size": B, "tokens_trained": tokens_per_step * tc.steps,
        "final_train_loss": last["train"], "final_val_loss": last["val"], "best_val_loss": min(e["val"] for e in hist["evals"]),
        "val_loss_full": math.log(ppl_full), "val_perplexity_full": ppl_full,
        "unigram_baseline": unigram, "uniform_baseline": math.log(tok.vocab_size),
        "train_seconds": train_seconds, "median_step_seconds": step_s,
        "tokens_per_second": tokens_per_step / step_s, "model_flops_per_token": flops_tok,
        "achieved_gflops": flops_tok * tokens_per_step / step_s / 1e9,
        "resumed_at": hist["resumed_at"], "checkpoint": str(final.name), "prompt": cfg["prompt"],
        "history": {k: hist[k] for k in ("loss", "lr", "grad_norm", "evals")},
        "samples_during_training": hist["samples"], "samples": samples,
    }
    plt = _pyplot()
    plots = [loss_plot(plt, ctx.out_dir / "loss.png", hist, unigram), series_plot(
        plt, ctx.out_dir / "lr.png", hist["lr"], "learning rate", "warmup, then cosine decay"), series_plot(
        plt, ctx.out_dir / "grad_norm.png", hist["grad_norm"], "gradient norm (before clipping)",
        f"clipped at {tc.grad_clip:g}", hline=tc.grad_clip if tc.grad_clip > 0 else None, log=True)]
    (Path(ctx.out_dir) / "samples.txt").write_text(
        "\n\n".join(f"=== {s['setting']} ===\n{s['text']}" for s in samples) + "\n", encoding="utf-8")
    summary = (f"A {n_params / 1e6:.2f}M-parameter {mcfg.arch} GPT pretrained on Tiny Shakespeare ({kind} tokens) "
               f"for {tc.steps:,} steps reached a held-out loss of **{last['val']:.4f}** nats per token "
               f"(unigram baseline {unigram:.3f}, uniform {math.log(tok.vocab_size):.3f}) in {train_seconds:.1f} s "
               f"on {device} ({metrics['tokens_per_second']:,.0f} tokens/s)"
               + (f"; resumed at step {', '.join(map(str, hist['resumed_at']))}" if hist["resumed_at"] else "") + ".")
    return Output(metrics=metrics, summary=summary, report=report(metrics), plots=plots)


def final_samples(model: GPT, tok: Any, cfg: dict[str, Any], device: torch.device) -> list[dict[str, str]]:
    """The same prompt under four decoding settings: greedy, the configured one, top-p, hot."""
    n = int(cfg["sample_tokens"])
    settings = [("greedy (temperature 0)", 0.0, None, None),
                (f"temperature {cfg['temperature']}, top-k {cfg['top_k']}", float(cfg["temperature"]), cfg["top_k"],
                 cfg["top_p"]),
                ("temperature 1.0, top-p 0.9", 1.0, None, 0.9),
                ("temperature 1.5 (too hot)", 1.5, None, None)]
    return [{"setting": name, "text": c.sample_text(model, tok, cfg["prompt"], n, t, k, p, seed=0, device=device)}
            for name, t, k, p in settings]


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> None:
    from tiers.report import save

    save(fig, path)


def loss_plot(plt: Any, path: Path, hist: dict[str, Any], unigram: float) -> str:
    import numpy as np

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
    _save(fig, path)
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
    _save(fig, path)
    return f"{path.name}: {what} per step ({note})"


def report(m: dict[str, Any]) -> str:
    from tiers.report import md_table

    tc, mc = m["train_config"], m["model"]
    ev = m["history"]["evals"]
    out = ["## Result", "",
           f"- model: {mc['arch']}, {mc['n_layer']} layers, {mc['n_head']} heads, {mc['n_embd']} wide, context "
           f"{mc['block_size']}, vocabulary {mc['vocab_size']:,} ({m['tokenizer']} tokens): **{m['params']:,} parameters**"
           + (f" (models.costs predicts {m['params_predicted']:,})" if m["params_predicted"] else ""),
           f"- data: Tiny Shakespeare, {m['train_tokens']:,} tokens to train, {m['val_tokens']:,} held out (last 10%)",
           f"- training: {tc['steps']:,} steps x batch {m['batch_size']} x {tc['grad_accum']} accumulation "
           f"= {m['tokens_trained']:,} tokens; AdamW (betas {tc['beta1']}, {tc['beta2']}, weight decay "
           f"{tc['weight_decay']} on matrices), lr {tc['lr']:g} -> {tc['min_lr']:g} (warmup {tc['warmup']}, cosine), "
           f"clip {tc['grad_clip']:g}; {m['device']} ({m['precision']})",
           f"- held-out loss: **{m['final_val_loss']:.4f}** (estimate on random windows; best {m['best_val_loss']:.4f}); "
           f"over the whole held-out split {m['val_loss_full']:.4f} (perplexity {m['val_perplexity_full']:.2f})",
           f"- baselines: unigram (each token from its frequency) {m['unigram_baseline']:.4f}; uniform "
           f"ln V = {m['uniform_baseline']:.4f}",
           f"- speed: {m['tokens_per_second']:,.0f} tokens/s (median step {m['median_step_seconds'] * 1e3:.1f} ms), "
           f"{m['achieved_gflops']:.2f} GFLOP/s of model FLOPs (6N + attention per token)",
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

"""B11: a tiny transformer, taken apart. The model is `models/gpt.py`; this milestone inspects it.

    tokens ─► token embedding (+ learned positions, gpt2; or rotary, llama)
           ─► N x [ x + attn(norm(x)),  x + mlp(norm(x)) ]     pre-norm residual blocks,
           ─► final norm ─► lm_head (= the token embedding: tied)  causal multi-head attention

What it shows, in the build folder:
1. the parameter count, per tensor and per layer, checked against the analytic
   count in `models.costs.gpt_params` (the planner prices runs with it);
2. a short training run on Tiny Shakespeare characters: the loss must fall;
3. the KV cache: decoding with it gives the same tokens (and logits to float
   rounding) as re-running the whole prefix, at a per-token cost that stays flat
   instead of growing with the position; measured both ways;
4. layer ranges: two stages built with `GPT(cfg, layers=range(a, b))` from the
   same state dict compute exactly what the whole model does (tier 3 serves
   models split this way), for both flavours, gpt2 and llama.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import torch
from annotated_types import Ge, Gt

from models import costs
from models.gpt import GPT, GPTConfig, KVCache
from models.tokenizers import CharTokenizer
from tiers.report import md_table, pyplot
from tiers.tier2 import b12_pretrain as b12
from tiers.tier2 import common as c

if TYPE_CHECKING:
    from tiers.runner import Context, Output


@dataclass
class Config:
    # the size: every rung of the ladder names these (tiers/milestones.yaml)
    block_size: Annotated[int, Gt(0)]      # the context, in characters
    n_layer: Annotated[int, Gt(0)]
    n_head: Annotated[int, Gt(0)]
    n_embd: Annotated[int, Gt(0)]
    batch_size: Annotated[int, Gt(0)]
    steps: Annotated[int, Gt(0)]           # of the short training run
    arch: Literal["gpt2", "llama"] = "gpt2"   # the one trained and decoded; layer ranges check both
    bias: bool = True
    lr: Annotated[float, Gt(0)] = 1e-3
    min_lr: Annotated[float, Ge(0)] = 1e-4
    warmup: Annotated[int, Ge(0)] = 50     # at most a fifth of the steps
    seed: int = 1337
    decode_prompt: Annotated[int, Gt(0)] = 8   # prompt tokens before decoding (at most a quarter of the context)
    eval_iters: Annotated[int, Gt(0)] = 20     # batches for the held-out loss at the end


def model_config(cfg: Config, vocab: int, arch: str) -> GPTConfig:
    return GPTConfig(vocab_size=vocab, block_size=cfg.block_size, n_layer=cfg.n_layer, n_head=cfg.n_head,
                     n_embd=cfg.n_embd, dropout=0.0, bias=cfg.bias, arch=arch)


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


@torch.no_grad()
def decode_both_ways(model: GPT, prompt: torch.Tensor, n_new: int) -> dict[str, Any]:
    """Greedy decoding with the KV cache and without it, timed per token, logits compared.

    Without the cache every step re-runs the whole prefix (cost grows with position);
    with it each step runs one position against the cached keys and values.
    """
    model.eval()
    out: dict[str, Any] = {}
    for use_cache in (True, False):
        idx, logits_seen, times = prompt.clone(), [], []
        cache = KVCache(model, batch_size=prompt.shape[0], max_len=prompt.shape[1] + n_new) if use_cache else None
        inp = idx
        for _ in range(n_new):
            t0 = time.perf_counter()
            logits, _ = model(inp if use_cache else idx, cache=cache)
            nxt = logits[:, -1, :].argmax(dim=-1, keepdim=True)
            times.append(time.perf_counter() - t0)
            logits_seen.append(logits[:, -1, :].clone())
            idx = torch.cat((idx, nxt), dim=1)
            inp = nxt
        out["cache" if use_cache else "no_cache"] = {"tokens": idx[0].tolist(), "logits": torch.stack(logits_seen),
                                                     "seconds": times}
    a, b = out["cache"], out["no_cache"]
    return {"tokens_equal": a["tokens"] == b["tokens"], "max_logit_diff": float((a["logits"] - b["logits"]).abs().max()),
            "cache_seconds": a["seconds"], "no_cache_seconds": b["seconds"], "tokens": a["tokens"],
            "generate_equal": model.generate(prompt, n_new, temperature=0, use_cache=True)[0].tolist()
            == model.generate(prompt, n_new, temperature=0, use_cache=False)[0].tolist()}


@torch.no_grad()
def stages_match(model: GPT, idx: torch.Tensor, split: int) -> float:
    """Max |difference| between the whole model's last logits and two stages' (layers :split, split:)."""
    cfg, sd = model.config, model.state_dict()
    first, second = GPT(cfg, layers=range(split)), GPT(cfg, layers=range(split, cfg.n_layer))
    for stage in (first, second):
        stage.load_state_dict({k: sd[k] for k in stage.state_dict()})
        stage.eval()
    model.eval()
    full = model(idx)[0][:, -1, :]
    staged = second.forward_stage(first.forward_stage(idx))[:, -1, :]
    return float((full - staged).abs().max())


def run(ctx: Context) -> Output:
    from tiers.runner import Output

    cfg: Config = ctx.config
    device, precision = c.device_and_precision(ctx)
    text = c.shakespeare()
    tok = CharTokenizer(text)
    train_ids, val_ids = c.split_ids(tok.encode(text))
    mcfg = model_config(cfg, tok.vocab_size, cfg.arch)
    model = GPT(mcfg, seed=cfg.seed)

    # 1. parameters: per tensor, per layer, and the analytic count
    n = model.num_params()
    shape = costs.GPTShape(mcfg.vocab_size, mcfg.block_size, mcfg.n_layer, mcfg.n_head, mcfg.n_embd, mcfg.bias)
    predicted = costs.gpt_params(shape) if cfg.arch == "gpt2" else None
    table, groups = param_table(model), param_groups_by_layer(model)
    (Path(ctx.out_dir) / "params.md").write_text(
        f"# Parameters of the B11 model ({cfg.arch}, {n:,})\n\n" + md_table(["tensor", "shape", "parameters"], table)
        + "\n\n" + md_table(["part", "parameters"], groups) + "\n", encoding="utf-8")
    ctx.log(f"model: {n:,} parameters" + (f"; models.costs.gpt_params says {predicted:,}" if predicted else ""))

    # 2. a short training run, with B12's loop
    B, T = cfg.batch_size, mcfg.block_size
    tc = c.TrainConfig(steps=cfg.steps, lr=cfg.lr, min_lr=cfg.min_lr, warmup=min(cfg.warmup, cfg.steps // 5),
                       eval_interval=0, seed=cfg.seed)
    with ctx.progress(f"training {n / 1e6:.2f}M", tc.steps) as bar:
        t0 = time.perf_counter()
        hist = b12.train(model, tc, lambda g: c.random_batch(train_ids, T, B, g, device), device=device,
                         precision=precision, on_step=lambda s, r: bar.advance(), log=ctx.log,
                         evaluate=lambda m: c.estimate_loss(m, {"val": val_ids}, T, B, cfg.eval_iters, tc.seed,
                                                            device, precision))
        train_seconds = time.perf_counter() - t0
    training = {"steps": tc.steps, "batch_size": B, "first_loss": hist["loss"][0],
                "final_val_loss": hist["evals"][-1]["val"], "unigram_baseline": c.unigram_entropy(train_ids),
                "seconds": train_seconds, "loss": hist["loss"]}
    ctx.log(f"training: loss {training['first_loss']:.3f} -> held out {training['final_val_loss']:.3f} "
            f"in {train_seconds:.1f} s")

    # 3. KV cache vs re-running the prefix, on the trained model
    p = min(cfg.decode_prompt, T // 4)
    prompt = val_ids[:p][None].to(device)
    dec = decode_both_ways(model, prompt, T - p)
    kv = kv_numbers(dec, p, T - p, tok.decode(dec["tokens"]))
    ctx.log(f"KV cache: tokens equal {dec['tokens_equal']}, max logit difference {dec['max_logit_diff']:.2e}, "
            f"{kv['tokens_per_s_cache']:,.0f} vs {kv['tokens_per_s_no_cache']:,.0f} tokens/s")

    # 4. layer ranges, both flavours (the llama one at the same size, untrained: the arithmetic is what is checked)
    split = max(1, mcfg.n_layer // 2)
    llama = GPT(model_config(cfg, tok.vocab_size, "llama"), seed=cfg.seed).to(device)
    llama_dec = decode_both_ways(llama, prompt, min(16, T - p))
    kv.update(llama_tokens_equal=llama_dec["tokens_equal"], llama_max_logit_diff=llama_dec["max_logit_diff"])
    stage_diff = {cfg.arch: stages_match(model, val_ids[:T][None].to(device), split),
                  "llama": stages_match(llama, val_ids[:T][None].to(device), split)}

    metrics = {"model": mcfg.to_dict(), "params": n, "params_predicted": predicted, "params_per_part": groups,
               "params_table": table, "llama_params": llama.num_params(), "device": str(device),
               "precision": precision, "training": training, "kv_cache": kv,
               "stages": {"split": split, "max_abs_diff": stage_diff}}
    plt = pyplot()
    plots = [decode_plot(plt, Path(ctx.out_dir) / "kv_cache.png", dec, p),
             loss_plot(plt, Path(ctx.out_dir) / "loss.png", hist["loss"], training["unigram_baseline"])]
    summary = (f"A {n:,}-parameter {cfg.arch} transformer ({mcfg.n_layer} layers, {mcfg.n_head} heads, "
               f"{mcfg.n_embd} wide{', tied embedding' if mcfg.tie_weights else ''}); the count matches models.costs"
               f"{'' if predicted == n else ' NOT'}. {tc.steps} training steps took the loss from "
               f"{training['first_loss']:.2f} to {training['final_val_loss']:.2f} (unigram baseline "
               f"{training['unigram_baseline']:.2f}). Decoding with the KV cache gave "
               f"{'the same' if dec['tokens_equal'] else 'DIFFERENT'} tokens as without it, "
               f"{kv['speedup']:.1f}x as fast over {T - p} tokens.")
    return Output(metrics=metrics, summary=summary, report=report(metrics, table, groups), plots=plots)


def kv_numbers(dec: dict[str, Any], prompt_tokens: int, new_tokens: int, sample: str) -> dict[str, Any]:
    """What decode_both_ways found, as the metrics and the report show it."""
    c_tok = new_tokens / sum(dec["cache_seconds"])
    n_tok = new_tokens / sum(dec["no_cache_seconds"])
    return {"tokens_equal": dec["tokens_equal"], "generate_equal": dec["generate_equal"],
            "max_logit_diff": dec["max_logit_diff"], "prompt_tokens": prompt_tokens, "new_tokens": new_tokens,
            "tokens_per_s_cache": c_tok, "tokens_per_s_no_cache": n_tok, "speedup": c_tok / n_tok,
            "cache_seconds": dec["cache_seconds"], "no_cache_seconds": dec["no_cache_seconds"], "sample": sample}


# ---------------------------------------------------------------- plots and the report

def decode_plot(plt: Any, path: Path, dec: dict[str, Any], p: int) -> str:
    fig, ax = plt.subplots(figsize=(7, 4))
    pos = list(range(p, p + len(dec["cache_seconds"])))
    ax.plot(pos, [s * 1e3 for s in dec["no_cache_seconds"]], ".-", label="no cache: re-run the whole prefix")
    ax.plot(pos, [s * 1e3 for s in dec["cache_seconds"]], ".-", label="KV cache: one new position")
    c.finish_plot(fig, ax, path, "position of the token being predicted", "ms per token",
                  "greedy decoding, per-token time (the first cache step holds the prompt)")
    return f"{path.name}: time per generated token with and without the KV cache"


def loss_plot(plt: Any, path: Path, loss: list[float], unigram: float) -> str:
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(loss, lw=0.8, label="training batch")
    ax.axhline(unigram, ls="--", color="grey", label=f"unigram baseline {unigram:.2f}")
    c.finish_plot(fig, ax, path, "step", "cross-entropy (nats per character)", "B11: a short training run")
    return f"{path.name}: the training loss of the short sanity run"


def report(m: dict[str, Any], table: list[list[Any]], groups: list[list[Any]]) -> str:
    mc, kv, tr = m["model"], m["kv_cache"], m["training"]
    h, L, V, T = mc["n_embd"], mc["n_layer"], mc["vocab_size"], mc["block_size"]
    out = ["## Parameters", "",
           f"**{m['params']:,}** parameters ({mc['arch']}: V={V}, T={T}, L={L}, h={h}, {mc['n_head']} heads of "
           f"{h // mc['n_head']})." + (f" `models.costs.gpt_params` predicts **{m['params_predicted']:,}**: "
                                       f"V*h + T*h + L*(12h^2 + 13h) + 2h (tied head counted once)."
                                       if m["params_predicted"] else ""),
           (f" The llama flavour at the same size (RMSNorm, RoPE instead of learned positions, SwiGLU) has "
           f"{m['llama_params']:,}."), "",
           md_table(["part", "parameters", "share"], [[g, f"{k:,}", f"{k / m['params']:.1%}"] for g, k in groups]), "",
           "Per tensor (also in `params.md`):", "",
           md_table(["tensor", "shape", "parameters"], [[a, b, f"{k:,}"] for a, b, k in table]), "",
           "## Training sanity run", "",
           (f"{tr['steps']} steps, batch {tr['batch_size']}, on Tiny Shakespeare characters: loss {tr['first_loss']:.3f} "
           f"(ln {V} = {math.log(V):.3f} is a uniform guess) -> held out {tr['final_val_loss']:.3f}; the unigram "
           f"baseline is {tr['unigram_baseline']:.3f}. {tr['seconds']:.1f} s on {m['device']} ({m['precision']})."), "",
           "## KV cache", "",
           f"Greedy decoding of {kv['new_tokens']} tokens after a {kv['prompt_tokens']}-token prompt:", "",
           md_table(["", "KV cache", "no cache"],
                    [["tokens/s", f"{kv['tokens_per_s_cache']:,.0f}", f"{kv['tokens_per_s_no_cache']:,.0f}"],
                     ["same tokens", "yes" if kv["tokens_equal"] else "NO", ""],
                     ["max logit difference", f"{kv['max_logit_diff']:.2e}", ""]]), "",
           (f"Speed-up {kv['speedup']:.2f}x (grows with the context: without the cache step t costs O(t) positions). "
           f"`GPT.generate` with and without the cache: {'identical' if kv['generate_equal'] else 'DIFFERENT'}. "
           f"llama flavour: tokens {'identical' if kv['llama_tokens_equal'] else 'DIFFERENT'}, max logit difference "
           f"{kv['llama_max_logit_diff']:.2e}."), "", "Decoded text: ", "", "```", kv["sample"], "```", "",
           "## Layer ranges", "",
           f"Two stages, layers 0-{m['stages']['split'] - 1} and {m['stages']['split']}-{L - 1}, loaded from the whole "
           "model's state dict, chained with `forward_stage`: max |difference| from the whole model's logits "
           + ", ".join(f"{a} {d:.1e}" for a, d in m["stages"]["max_abs_diff"].items()) + "."]
    return "\n".join(out)

"""B14: direct preference optimisation (DPO). Learn from (prompt, chosen, rejected) with no reward model.

    loss = -log σ( β [ (log πθ(y_w|x) - log π_ref(y_w|x)) - (log πθ(y_l|x) - log π_ref(y_l|x)) ] )

    reference = B13's model: for a Hugging Face rung (config `model`: smollm2-135m-instruct, ...) B13's
                result for that base in builds/B13-*/model/; for `b13` your char SFT model (sft.pt)
    policy    = the reference plus LoRA adapters (lora_rank > 0: the reference is the same model with its
                adapters disabled, peft's disable_adapter: no second copy in memory)
              | B13's model read again in fp32, every weight trainable (lora_rank 0: full fine-tuning; the
                frozen reference is a second model, in the run's precision: bf16 on CUDA)
    for each β: a fresh policy, B12's loop on dpo_loss; held-out margin, reward accuracy, greedy replies

πθ is the policy being trained, π_ref the frozen model it started from, y_w
the chosen and y_l the rejected response. log π(y|x) is the sum of the log-probabilities
of the *response* tokens given the prompt and the response so far: the prompt's
tokens are masked exactly as in B13's SFT. β sets how far the policy may move:
the loss is the logistic loss of a reward model whose reward is
β log(πθ/π_ref), so a small β asks for a large log-ratio before the loss is
satisfied, i.e. lets the policy drift further from the reference.

The gradient (Rafailov et al. 2023): -β σ(-z) [∇ log πθ(y_w|x) - ∇ log πθ(y_l|x)],
z the bracket above: it raises the chosen response's likelihood and lowers the
rejected one's, weighted by how wrong the implicit reward currently is.

The loss and log π(y|x) are written out below (`dpo_loss`, `sequence_logprobs`); the
loop that minimises them is B12's (`b12_pretrain.train`), with batches of pairs and
the reference's log-probs computed once up front (it is frozen).

Data: hh-rlhf (harmless-base), each pair's two dialogues share every turn but
the last Assistant reply. The prompt is the last Human turn (a small model's
context cannot hold the whole conversation), chosen/rejected the two final
replies. File order splits them: the last `held_out` fraction is never trained on.
Measured: the held-out margin log π(y_w|x) - log π(y_l|x) before (the reference)
and after, per β; the fraction of held-out pairs whose implicit reward prefers
the chosen reply; greedy replies of the reference and the policies.
"""
from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import torch
from annotated_types import Ge, Gt, Lt, MinLen
from torch.nn import functional as F

from models.gpt import GPT, load_checkpoint
from models.tokenizers import tokenizer_from_meta
from tiers.report import md_table, pyplot, save
from tiers.tier2 import b12_pretrain as b12
from tiers.tier2 import b13_sft as b13
from tiers.tier2 import common, hf
from tiers.tier2.sft_data import SFTError, hh_file, parse_dialogue, read_jsonl

if TYPE_CHECKING:
    from tiers.runner import Context, Output

Example = tuple[list[int], list[int]]     # (inputs, targets) of one templated exchange, prompt masked (B13)
Pair = tuple[Example, Example]            # (chosen, rejected)


@dataclass
class Config:
    betas: Annotated[list[Annotated[float, Gt(0)]], MinLen(1)] = field(default_factory=lambda: [0.05, 0.1, 0.5])
    steps: Annotated[int, Gt(0)] | None = None    # None: `epochs` passes over the training pairs
    epochs: Annotated[float, Gt(0)] = 1.0
    batch_size: Annotated[int, Gt(0)] = 16        # pairs per step
    # decays to a tenth; None: 5e-4 for a char GPT, for a Hugging Face model 1e-4 with LoRA, 5e-6 full
    # (a pretrained model's every weight moving at 5e-4 forgets what it knew within a few steps)
    lr: Annotated[float, Gt(0)] | None = None
    warmup: Annotated[int, Ge(0)] = 10
    held_out: Annotated[float, Gt(0), Lt(1)] = 0.1   # the last part of the pairs, never trained on
    eval_pairs: Annotated[int, Gt(0)] = 200       # held-out pairs the margins are measured on
    pairs: Annotated[int, Gt(0)] | None = None    # the first this many pairs of the file; None: all
    seq: Annotated[int, Gt(0)] | None = None      # tokens per exchange; None (or more): the model's context
    min_char_count: Annotated[int, Gt(0)] = 20    # as B13, when the reference is the base (no SFT checkpoint)
    generations: Annotated[int, Ge(0)] = 3        # held-out prompts answered by the reference and each policy
    gen_tokens: Annotated[int, Gt(0)] = 64        # Hugging Face model: new tokens per greedy reply
    seed: int = 1337
    # whose B13 model: `b13` with `base` a Hugging Face registry name: B13's result for that base (so is
    # `model` a registry name itself); `b13` alone: your char SFT model (required); `standin` / `b12`:
    # B13's char model of that base, else the base itself; None: `reference`, else B13's sft.pt, else the base
    model: str | None = None
    base: str | None = None
    dataset: str = "hh-rlhf"                      # preference pairs: hh-rlhf (the data registry's name)
    dataset_files: list[str] | None = None        # which of its files (None: the train split when it is here)
    lora_rank: Annotated[int, Ge(0)] = 0          # Hugging Face model: 0 full fine-tuning, > 0 peft LoRA
    lora_alpha: Annotated[float, Gt(0)] = 16.0
    reference: str | None = None                  # an SFT checkpoint; None: B13's build, else the base
    init: str | None = None                       # the base when there is no SFT model (as B13's init)


# ---------------------------------------------------------------- the loss, by hand

def dpo_loss(pi_w: torch.Tensor, pi_l: torch.Tensor, ref_w: torch.Tensor, ref_l: torch.Tensor,
             beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean loss, per-pair z) from summed response log-probs of policy and reference.

    -log σ(z) is computed as softplus(-z): the same number, without overflow for large |z|.
    """
    z = beta * ((pi_w - ref_w) - (pi_l - ref_l))
    return F.softplus(-z).mean(), z


def sequence_logprobs(model: GPT, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Sum over each row of log p(y_t | x_<=t) where y_t != -1 (response tokens only): shape (B,)."""
    mask = y != -1
    logp = torch.log_softmax(b13.response_logits(model, x, mask).float(), dim=-1)   # (N, vocab) at those t
    picked = logp.gather(-1, y[mask].unsqueeze(-1)).squeeze(-1)                     # log p(y_t), (N,)
    rows = mask.nonzero()[:, 0]                                                      # which sequence each is in
    return torch.zeros(len(y), device=picked.device, dtype=picked.dtype).index_add(0, rows, picked)


# ---------------------------------------------------------------- data

def preference_pairs(rows: Sequence[dict[str, Any]]) -> list[tuple[str, str, str]]:
    """(last Human turn, chosen final reply, rejected final reply) for each well-formed hh-rlhf row."""
    out = []
    for row in rows:
        c, r = parse_dialogue(str(row.get("chosen", ""))), parse_dialogue(str(row.get("rejected", "")))
        if len(c) < 2 or len(c) != len(r) or c[:-1] != r[:-1]:
            continue  # not a shared conversation with one differing final reply
        if c[-1][0] != "Assistant" or c[-2][0] != "Human" or not c[-1][1] or not r[-1][1] or c[-1][1] == r[-1][1]:
            continue
        out.append((c[-2][1], c[-1][1], r[-1][1]))
    return out


def encode_triples(tok: Any, triples: Sequence[tuple[str, str, str]], seq: int) -> list[Pair]:
    """Each triple as two masked examples (chosen, rejected), cut to seq + 1 tokens; dropped when the two
    responses become identical after cutting or a response keeps no token."""
    out = []
    for p, w, l in triples:
        ex = b13.encode_pairs(tok, [(p, w), (p, l)], seq)
        if len(ex) == 2 and ex[0] != ex[1]:
            out.append((ex[0], ex[1]))
    return out


def batch_tensors(pairs: Sequence[Pair], device: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Chosen and rejected padded to one length, stacked: (X (2B, T), Y (2B, T)); rows 0..B-1 chosen."""
    return b13.collate([w for w, _ in pairs] + [l for _, l in pairs], device)


def logprobs(model: GPT, pairs: Sequence[Pair], device: Any, batch_size: int = 32, grad: bool = False,
             precision: str = "fp32") -> tuple[torch.Tensor, torch.Tensor]:
    """Summed response log-probs (chosen, rejected) for every pair."""
    ws, ls = [], []
    with torch.set_grad_enabled(grad), common.autocast(device, precision):
        for i in range(0, len(pairs), batch_size):
            chunk = pairs[i:i + batch_size]
            X, Y = batch_tensors(chunk, device)
            lp = sequence_logprobs(model, X, Y)
            ws.append(lp[:len(chunk)])
            ls.append(lp[len(chunk):])
    return torch.cat(ws), torch.cat(ls)


@dataclass
class RefLogps:
    """The frozen reference's summed response log-probs (chosen, rejected), computed once: it never changes."""

    train: tuple[torch.Tensor, torch.Tensor]
    held: tuple[torch.Tensor, torch.Tensor]


def reference_logps(ref: Any, train: Sequence[Pair], held: Sequence[Pair], device: Any,
                    precision: str = "fp32") -> RefLogps:
    was = ref.training
    ref.eval()
    out = RefLogps(logprobs(ref, train, device, precision=precision), logprobs(ref, held, device, precision=precision))
    ref.train(was)
    return out


def margin_stats(model: GPT, ref_w: torch.Tensor, ref_l: torch.Tensor, pairs: Sequence[Pair],
                 device: Any, beta: float | None = None, precision: str = "fp32") -> dict[str, float]:
    """Held-out: the mean margin log π(y_w) - log π(y_l), the share of pairs whose implicit reward
    prefers y_w (the policy's log-ratio gained more on y_w than on y_l), and the DPO loss at beta."""
    was = model.training
    model.eval()
    w, l = logprobs(model, pairs, device, precision=precision)
    model.train(was)
    gain = (w - ref_w) - (l - ref_l)
    out = {"margin": float((w - l).mean()), "reward_accuracy": float((gain > 0).float().mean()),
           "chosen_logp": float(w.mean()), "rejected_logp": float(l.mean())}
    if beta is not None:
        out["dpo_loss"] = float(dpo_loss(w, l, ref_w, ref_l, beta)[0])
    return out


# ---------------------------------------------------------------- training

def train_dpo(policy: Any, ref: RefLogps, train: Sequence[Pair], held: Sequence[Pair], beta: float,
              tc: common.TrainConfig, batch_size: int, device: torch.device, precision: str = "fp32",
              on_step: Any = None, log: Any = print) -> dict[str, Any]:
    """Train `policy` (in place: its trainable parameters) on the DPO loss with B12's loop; the history."""
    ref_w, ref_l = ref.train

    def batch(gen: torch.Generator) -> tuple[list[Pair], torch.Tensor, torch.Tensor]:
        ix = torch.randint(len(train), (batch_size,), generator=gen)
        return [train[i] for i in ix.tolist()], ref_w[ix], ref_l[ix]

    def loss(model: GPT, batch: tuple[list[Pair], torch.Tensor, torch.Tensor]) -> torch.Tensor:
        pairs, rw, rl = batch
        lp = sequence_logprobs(model, *batch_tensors(pairs, device))   # chosen rows first, then rejected
        return dpo_loss(lp[:len(pairs)], lp[len(pairs):], rw, rl, beta)[0]

    return b12.train(policy, tc, batch, device=device, precision=precision, loss_fn=loss,
                     evaluate=lambda m: margin_stats(m, *ref.held, held, device, beta, precision), on_step=on_step,
                     log=log)


# ---------------------------------------------------------------- the reference and the policies

@dataclass
class Setup:
    """The reference and how to make a fresh policy from it, for either kind of model."""

    model: Any                                   # the reference (LoRA: the policy itself, its adapters off)
    tok: Any                                     # renders pairs: b13.ChatTokenizer or hf.ChatFormat
    what: str                                    # what the reference is, for the README
    seq: int                                     # tokens per exchange
    reply: Callable[[Any, str], str]             # (model, prompt) -> its greedy reply
    new_policy: Callable[[], contextlib.AbstractContextManager[Any]]   # a trainable policy = the reference
    as_reference: Callable[[], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext
    info: dict[str, Any] = field(default_factory=dict)   # what ran, for metrics.json


@contextlib.contextmanager
def trainable_copy(ref: Any) -> Iterator[Any]:
    """Full fine-tuning: a copy of the frozen reference whose every weight trains (freed after the β)."""
    policy = copy.deepcopy(ref)
    for p in policy.parameters():
        p.requires_grad_(True)
    yield policy


@contextlib.contextmanager
def fresh_sft(folder: Path, device: torch.device) -> Iterator[Any]:
    """Full fine-tuning of a Hugging Face model: B13's model read again in fp32, every weight trainable
    (the frozen reference may be in bf16: a copy of it would train in bf16)."""
    model, _, _ = hf.load_sft(folder, device)
    yield hf.LM(model).train()


@contextlib.contextmanager
def fresh_adapter(lm: Any, start: dict[str, torch.Tensor]) -> Iterator[Any]:
    """LoRA: the same model, its adapters set back to their initial weights (B = 0: policy = reference)."""
    with torch.no_grad():
        for n, p in lm.named_parameters():
            if n in start:
                p.copy_(start[n])
    yield lm


def freeze(model: Any) -> Any:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def sft_checkpoint(ctx: Context, cfg: Config) -> Path:
    return Path(cfg.reference or Path(ctx.out_dir).parent / b13.FOLDER / b13.CKPT).expanduser()


def char_setup(ctx: Context, cfg: Config, texts: Any) -> Setup:
    """B13's char SFT model when it is there (and made from the base `model` names), else the base
    with the chat vocabulary added (untrained markers: DPO then also teaches the template)."""
    device, _ = common.device_and_precision(ctx)
    sft = sft_checkpoint(ctx, cfg)
    if cfg.model == "b13" and not sft.is_file():
        raise SFTError(f"no B13 model at {sft}: run `tierkit run B13` first")
    found = None
    if sft.is_file():
        try:
            model, ckpt = load_checkpoint(sft)
            meta = ckpt.get("meta", {})
            tok = b13.ChatTokenizer.from_meta(tokenizer_from_meta(meta["tokenizer"]), meta["chat"])
        except (ValueError, KeyError) as e:
            raise SFTError(f"{sft}: not a B13 SFT checkpoint ({e}); re-run `tierkit run B13` or delete it") from None
        made_from = str(meta.get("base", ""))
        wanted = {"standin": made_from == "stand-in char model",
                  "b12": made_from == str(b12.checkpoint_path(ctx))}.get(str(cfg.model), True)
        found = (model, tok, f"B13 SFT model ({sft})") if wanted else None
    if found is None:
        base, base_tok, path = b13.char_base(ctx, cfg.model, cfg.init)
        extra, _ = b13.plan_chars(base_tok, texts, cfg.min_char_count)
        tok = b13.ChatTokenizer(base_tok, extra)
        ctx.log(f"reference: no B13 SFT checkpoint of this base at {sft}; using the base with the chat vocabulary")
        found = (b13.grow_vocab(base, tok.vocab_size), tok, f"base ({path or 'stand-in char model'}), no SFT")
    model, tok, what = found
    ctx.log(f"reference: {what}")
    ref = freeze(model.to(device))
    return Setup(model=ref, tok=tok, what=what, seq=min(cfg.seq or ref.config.block_size, ref.config.block_size),
                 reply=lambda m, p: b13.chat(m, tok, p), new_policy=lambda: trainable_copy(ref),
                 info={"model": cfg.model, "params": ref.num_params(), "trainable_params": ref.num_params()})


def b13_size(model: str) -> str | None:
    """The B13 rung that fine-tunes `model`, for the line saying what to run first."""
    from tiers import catalog

    try:
        return next((r.size for r in catalog.get("B13").ladder if getattr(r, "model", None) == model), None)
    except catalog.CatalogError:
        return None


def hf_base(cfg: Config) -> str | None:
    """The Hugging Face model whose B13 result is the reference; None for a char GPT."""
    if hf.is_hf(cfg.model):
        return cfg.model
    return cfg.base if cfg.model == "b13" and hf.is_hf(cfg.base) else None


def hf_setup(ctx: Context, cfg: Config, name: str) -> Setup:
    """B13's result for the Hugging Face base `name`: LoRA on it (reference: adapters off) or a frozen copy."""
    device, precision = common.device_and_precision(ctx)
    root = Path(ctx.out_dir).parent
    folder = hf.find_sft(root, name)
    if folder is None:
        size = b13_size(name)
        raise SFTError(f"no B13 model of {name} under {root}/B13-*: run `tierkit run B13 "
                       + (f"--size {size}` first" if size else f"--set model={name}` first"))
    # frozen weights (LoRA's base, full DPO's reference) in the run's precision; what trains in fp32
    model, tok, meta = hf.load_sft(folder, device, hf.weights_dtype(precision, trains=False))
    lm, fmt = hf.LM(model), hf.ChatFormat(tok)
    what = f"B13 SFT model of {name} ({folder}{', its LoRA adapter merged' if meta.get('lora_rank') else ''})"
    ctx.log(f"reference: {what}; {fmt.kind}")
    info = hf.describe(name, Path(meta.get("snapshot", folder)), model) | {"sft": str(folder), "template": fmt.kind}
    setup = Setup(model=lm, tok=fmt, what=what, seq=min(cfg.seq or 512, info["context"]),
                  reply=lambda m, p: hf.chat(m, fmt, p, cfg.gen_tokens),
                  new_policy=lambda: fresh_sft(folder, device),
                  info=info | {"trainable_params": info["params"]})
    freeze(lm)
    if cfg.lora_rank > 0:
        peft_model, _ = hf.add_lora(model, cfg.lora_rank, cfg.lora_alpha)
        start = {n: p.detach().clone() for n, p in lm.named_parameters() if p.requires_grad}
        setup.as_reference = peft_model.disable_adapter     # the reference: the same weights, adapters off
        setup.new_policy = lambda: fresh_adapter(lm, start)
        setup.info["trainable_params"] = sum(t.numel() for t in start.values())
    ctx.log(f"policy: {setup.info['trainable_params']:,} trainable of {info['params']:,} parameters"
            + (f" (LoRA r={cfg.lora_rank}; reference = adapters disabled)" if cfg.lora_rank > 0
               else " (full fine-tuning; reference = a frozen copy)"))
    return setup


# ---------------------------------------------------------------- the milestone

def run(ctx: Context) -> Output:
    from tiers import data
    from tiers.runner import Output, RunError

    cfg: Config = ctx.config
    try:
        if cfg.dataset != "hh-rlhf":
            raise SFTError(f"dataset {cfg.dataset!r}: B14 learns from hh-rlhf preference pairs (--set dataset=hh-rlhf)")
        path = hh_file(cfg.dataset_files)
        triples = preference_pairs(read_jsonl(path))
        triples = triples[:cfg.pairs] if cfg.pairs else triples
        if len(triples) < 10:
            raise SFTError(f"{path}: only {len(triples)} usable preference pairs; DPO needs at least 10")
        n_held = max(1, int(len(triples) * cfg.held_out))
        train_t, held_t = triples[:-n_held], triples[-n_held:]
        base = hf_base(cfg)
        setup = hf_setup(ctx, cfg, base) if base else char_setup(ctx, cfg, (t for tr in train_t for t in tr))
    except (SFTError, hf.HFError, data.DataError, FileNotFoundError) as e:
        raise RunError(str(e)) from None
    train = encode_triples(setup.tok, train_t, setup.seq)
    held = encode_triples(setup.tok, held_t, setup.seq)[:cfg.eval_pairs]
    if not train or not held:
        raise RunError(f"no preference pair fits in {setup.seq} tokens; raise seq (--set seq=N)")
    steps = cfg.steps or max(1, math.ceil(len(train) * cfg.epochs / cfg.batch_size))
    ctx.log(f"data: {len(triples):,} pairs from {path}; {len(train):,} train, {len(held):,} held out; "
            f"seq {setup.seq}; {steps} steps x {cfg.batch_size} pairs per β")
    lr = cfg.lr or (5e-4 if not base else 1e-4 if cfg.lora_rank > 0 else 5e-6)
    tc = common.TrainConfig(steps=steps, lr=lr, min_lr=lr / 10, warmup=cfg.warmup, weight_decay=0.0,
                            grad_clip=1.0, eval_interval=max(1, steps // 8), seed=cfg.seed)
    results, before, refs = sweep(ctx, cfg, setup, tc, train, held, [p for p, _, _ in held_t[:cfg.generations]])
    gens = [{"prompt": p, "chosen": w, "rejected": l, "reference": r}
            | {f"beta={res['beta']:g}": res["replies"][i] for res in results}
            for i, ((p, w, l), r) in enumerate(zip(held_t, refs, strict=False))]
    metrics = setup.info | {
        "data": str(path), "pairs": len(triples), "train_pairs": len(train), "held_out_pairs": len(held),
        "seq": setup.seq, "steps": steps, "batch_size": cfg.batch_size, "lr": lr, "reference": setup.what,
        "lora": {"rank": cfg.lora_rank, "alpha": cfg.lora_alpha} if cfg.lora_rank > 0 and base else None,
        "before": before,
        "betas": [{k: v for k, v in r.items() if k not in ("loss", "replies")} | {"final_train_loss": r["loss"][-1]}
                  for r in results],
        "best_beta": max(results, key=lambda r: r["after"]["margin"])["beta"],
        "margin_rose": {str(r["beta"]): r["after"]["margin"] > before["margin"] for r in results},
        "generations": gens}
    plot(ctx.out_dir / "dpo.png", results, before)
    summary = (f"DPO from {setup.what.split(' (')[0]} on {len(train):,} hh-rlhf preference pairs: the held-out "
               f"chosen-vs-rejected log-probability margin went from **{before['margin']:.3f}** to "
               + ", ".join(f"**{r['after']['margin']:.3f}** (β={r['beta']:g})" for r in results) + ".")
    return Output(metrics=metrics, summary=summary, report=report(metrics, results, cfg.betas),
                  plots=["dpo.png: DPO loss and held-out margin per β"])


def sweep(ctx: Context, cfg: Config, setup: Setup, tc: common.TrainConfig, train: list[Pair], held: list[Pair],
          prompts: list[str]) -> tuple[list[dict[str, Any]], dict[str, float], list[str]]:
    """One DPO run per β, each from a fresh policy: (results, the reference's held-out stats, its replies)."""
    device, precision = common.device_and_precision(ctx)
    with setup.as_reference():
        ref = reference_logps(setup.model, train, held, device, precision)   # frozen: computed once for every β
        before = margin_stats(setup.model, *ref.held, held, device, precision=precision)
        with common.autocast(device, precision):
            refs = [setup.reply(setup.model, p) for p in prompts]
    ctx.log(f"held-out margin before (reference): {before['margin']:.3f}")
    results = []
    for beta in cfg.betas:
        r = one_beta(ctx, cfg, setup, tc, beta, ref, train, held, prompts)
        ctx.log(f"β={beta:g}: held-out margin {before['margin']:.3f} -> {r['after']['margin']:.3f}, "
                f"reward accuracy {r['after']['reward_accuracy']:.1%}")
        results.append(r)
    return results, before, refs


def one_beta(ctx: Context, cfg: Config, setup: Setup, tc: common.TrainConfig, beta: float, ref: RefLogps,
             train: list[Pair], held: list[Pair], prompts: list[str]) -> dict[str, Any]:
    """DPO at one β from a fresh policy; the policy is gone when this returns (one at a time in memory)."""
    device, precision = common.device_and_precision(ctx)
    with setup.new_policy() as policy, ctx.progress(f"DPO β={beta:g}", tc.steps) as bar:
        hist = train_dpo(policy, ref, train, held, beta, tc, cfg.batch_size, device, precision,
                         on_step=lambda s, r: bar.advance(), log=lambda *a: None)
        after = margin_stats(policy, *ref.held, held, device, beta, precision)
        with common.autocast(device, precision):
            replies = [setup.reply(policy, p) for p in prompts]
    return {"beta": beta, "after": after, "loss": hist["loss"], "evals": hist["evals"], "replies": replies}


# ---------------------------------------------------------------- the plot and the report

def plot(path: Path, results: list[dict[str, Any]], before: dict[str, float]) -> None:
    fig, (a, b) = pyplot().subplots(1, 2, figsize=(11, 4))
    for r in results:
        k = max(1, len(r["loss"]) // 40)
        sm = b13.running_mean(r["loss"], k)
        a.plot(range(k, k + len(sm)), sm, lw=1, label=f"β={r['beta']:g}")
        b.plot([e["step"] for e in r["evals"]], [e["margin"] for e in r["evals"]], "o-", ms=3, label=f"β={r['beta']:g}")
    a.axhline(math.log(2), color="gray", ls=":", label="log 2 (start: policy = reference)")
    a.set_xlabel("step")
    a.set_ylabel("DPO loss (training batches)")
    b.axhline(before["margin"], color="gray", ls="--", label="reference")
    b.set_xlabel("step")
    b.set_ylabel("held-out mean log π(chosen) - log π(rejected)")
    for ax in (a, b):
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    save(fig, path)


def policy_line(m: dict[str, Any]) -> str:
    """What trained: the model, its parameters, what of it trains, and where the reference lives."""
    lora = m.get("lora")
    how = (f"LoRA r={lora['rank']} alpha={lora['alpha']} (peft): the reference is the same model with its adapters "
           "disabled, so one copy of the weights is in memory" if lora
           else "full fine-tuning: every weight trains, the reference is a frozen copy (two copies in memory)")
    named = f"{m['model']} ({m['architecture']}, snapshot `{m['snapshot']}`), " if m.get("architecture") else ""
    return (f"Policy: {named}{m['trainable_params']:,} trainable of {m['params']:,} parameters; {how}.")


def report(m: dict[str, Any], results: list[dict[str, Any]], betas: list[float]) -> str:
    before, held, train = m["before"], m["held_out_pairs"], m["train_pairs"]
    out = [
        "## The loss", "",
        ("`loss = softplus(-β[(log πθ(y_w|x) - log π_ref(y_w|x)) - (log πθ(y_l|x) - log π_ref(y_l|x))])` "
         "(= -log σ(...)), log π summed over the response tokens only (prompt masked as in B13). "
         f"Reference (frozen): {m['reference']}."), "",
        policy_line(m), "",
        "## β sweep: held-out preference pairs", "",
        (f"{held:,} held-out pairs (never trained on), {train:,} training pairs, {m['steps']} steps x "
         f"{m['batch_size']} pairs, lr {m['lr']}, context {m['seq']} tokens. Margin = mean log π(chosen) - "
         "log π(rejected); reward accuracy = share of pairs where the policy's log-ratio to the reference gained "
         "more on the chosen reply than on the rejected one."), "",
        md_table(["model", "held-out margin", "change", "reward accuracy", "log π(chosen)", "log π(rejected)",
                  "held-out DPO loss"],
                 [["reference", f"{before['margin']:.3f}", "", "", f"{before['chosen_logp']:.2f}",
                   f"{before['rejected_logp']:.2f}", f"{math.log(2):.4f}"]]
                 + [[f"DPO β={r['beta']:g}", f"{r['after']['margin']:.3f}",
                     f"{r['after']['margin'] - before['margin']:+.3f}", f"{r['after']['reward_accuracy']:.1%}",
                     f"{r['after']['chosen_logp']:.2f}", f"{r['after']['rejected_logp']:.2f}",
                     f"{r['after']['dpo_loss']:.4f}"] for r in results]), "",
        ("Both log-probabilities usually fall during DPO: the loss only asks that the rejected one falls "
         "faster, and the cheapest way is often to make both replies less likely."), "",
        "## Replies to held-out prompts (greedy)", ""]
    for g in m["generations"]:
        rows = [["chosen (data)", repr(g["chosen"][:160])], ["rejected (data)", repr(g["rejected"][:160])],
                ["reference", repr(g["reference"][:160])]] + [[f"DPO β={b:g}", repr(g[f'beta={b:g}'][:160])]
                                                              for b in betas]
        out += [f"**prompt:** {g['prompt'][:200]!r}", "", md_table(["", "reply"], rows), ""]
    return "\n".join(out)

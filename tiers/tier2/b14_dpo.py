"""B14: direct preference optimisation (DPO). Learn from (prompt, chosen, rejected) with no reward model.

    loss = -log σ( β [ (log πθ(y_w|x) - log π_ref(y_w|x)) - (log πθ(y_l|x) - log π_ref(y_l|x)) ] )

πθ is the policy being trained, π_ref a frozen copy of where it started (the
SFT model from B13 when its checkpoint is there, else the base), y_w the chosen
and y_l the rejected response. log π(y|x) is the sum of the log-probabilities
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

import copy
import math
from collections.abc import Sequence
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
from tiers.tier2 import common

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
    lr: Annotated[float, Gt(0)] = 5e-4            # decays to a tenth
    warmup: Annotated[int, Ge(0)] = 10
    held_out: Annotated[float, Gt(0), Lt(1)] = 0.1   # the last part of the pairs, never trained on
    eval_pairs: Annotated[int, Gt(0)] = 200       # held-out pairs the margins are measured on
    pairs: Annotated[int, Gt(0)] | None = None    # the first this many pairs of the file; None: all
    seq: Annotated[int, Gt(0)] | None = None      # tokens per exchange; None (or more): the model's context
    min_char_count: Annotated[int, Gt(0)] = 20    # as B13, when the reference is the base (no SFT checkpoint)
    generations: Annotated[int, Ge(0)] = 3        # held-out prompts answered by the reference and each policy
    seed: int = 1337
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
    logp = torch.log_softmax(model.logits(x).float(), dim=-1)       # every position's log-probabilities
    mask = y != -1
    picked = logp.gather(-1, y.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (picked * mask).sum(-1)


# ---------------------------------------------------------------- data

def preference_pairs(rows: Sequence[dict[str, Any]]) -> list[tuple[str, str, str]]:
    """(last Human turn, chosen final reply, rejected final reply) for each well-formed hh-rlhf row."""
    out = []
    for row in rows:
        c, r = b13.parse_dialogue(str(row.get("chosen", ""))), b13.parse_dialogue(str(row.get("rejected", "")))
        if len(c) < 2 or len(c) != len(r) or c[:-1] != r[:-1]:
            continue  # not a shared conversation with one differing final reply
        if c[-1][0] != "Assistant" or c[-2][0] != "Human" or not c[-1][1] or not r[-1][1] or c[-1][1] == r[-1][1]:
            continue
        out.append((c[-2][1], c[-1][1], r[-1][1]))
    return out


def encode_triples(tok: b13.ChatTokenizer, triples: Sequence[tuple[str, str, str]], seq: int) -> list[Pair]:
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


def logprobs(model: GPT, pairs: Sequence[Pair], device: Any, batch_size: int = 32,
             grad: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed response log-probs (chosen, rejected) for every pair."""
    ws, ls = [], []
    with torch.set_grad_enabled(grad):
        for i in range(0, len(pairs), batch_size):
            chunk = pairs[i:i + batch_size]
            X, Y = batch_tensors(chunk, device)
            lp = sequence_logprobs(model, X, Y)
            ws.append(lp[:len(chunk)])
            ls.append(lp[len(chunk):])
    return torch.cat(ws), torch.cat(ls)


def margin_stats(model: GPT, ref_w: torch.Tensor, ref_l: torch.Tensor, pairs: Sequence[Pair],
                 device: Any, beta: float | None = None) -> dict[str, float]:
    """Held-out: the mean margin log π(y_w) - log π(y_l), the share of pairs whose implicit reward
    prefers y_w (the policy's log-ratio gained more on y_w than on y_l), and the DPO loss at beta."""
    was = model.training
    model.eval()
    w, l = logprobs(model, pairs, device)
    model.train(was)
    gain = (w - ref_w) - (l - ref_l)
    out = {"margin": float((w - l).mean()), "reward_accuracy": float((gain > 0).float().mean()),
           "chosen_logp": float(w.mean()), "rejected_logp": float(l.mean())}
    if beta is not None:
        out["dpo_loss"] = float(dpo_loss(w, l, ref_w, ref_l, beta)[0])
    return out


# ---------------------------------------------------------------- training

def train_dpo(ref: GPT, train: Sequence[Pair], held: Sequence[Pair], beta: float, tc: common.TrainConfig,
              batch_size: int, device: torch.device, precision: str = "fp32", on_step: Any = None,
              log: Any = print) -> tuple[GPT, dict[str, Any]]:
    """A policy initialised from `ref`, trained on the DPO loss with B12's loop; (policy, history)."""
    ref.eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    # the reference is frozen: its log-probs are computed once, not at every step
    ref_w, ref_l = logprobs(ref, train, device)
    held_w, held_l = logprobs(ref, held, device)
    policy = copy.deepcopy(ref)
    for p in policy.parameters():
        p.requires_grad_(True)

    def batch(gen: torch.Generator) -> tuple[list[Pair], torch.Tensor, torch.Tensor]:
        ix = torch.randint(len(train), (batch_size,), generator=gen)
        return [train[i] for i in ix.tolist()], ref_w[ix], ref_l[ix]

    def loss(model: GPT, batch: tuple[list[Pair], torch.Tensor, torch.Tensor]) -> torch.Tensor:
        pairs, rw, rl = batch
        lp = sequence_logprobs(model, *batch_tensors(pairs, device))   # chosen rows first, then rejected
        return dpo_loss(lp[:len(pairs)], lp[len(pairs):], rw, rl, beta)[0]

    hist = b12.train(policy, tc, batch, device=device, precision=precision, loss_fn=loss,
                     evaluate=lambda m: margin_stats(m, held_w, held_l, held, device, beta), on_step=on_step, log=log)
    return policy, hist


# ---------------------------------------------------------------- the reference model

def reference(ctx: Context, cfg: Config, texts: Any) -> tuple[GPT, b13.ChatTokenizer, str]:
    """(reference model, chat tokenizer, what it is): B13's SFT checkpoint when it is there, else the
    base with the chat vocabulary added (untrained markers: DPO then also teaches the template)."""
    device, _ = common.device_and_precision(ctx)
    sft = Path(cfg.reference or Path(ctx.out_dir).parent / b13.FOLDER / b13.CKPT).expanduser()
    if sft.is_file():
        try:
            model, ckpt = load_checkpoint(sft)
            meta = ckpt.get("meta", {})
            tok = b13.ChatTokenizer.from_meta(tokenizer_from_meta(meta["tokenizer"]), meta["chat"])
        except (ValueError, KeyError) as e:
            raise ValueError(f"{sft}: not a B13 SFT checkpoint ({e}); re-run `tierkit run B13` or delete it") from None
        ctx.log(f"reference: the SFT model {sft}")
        return model.to(device), tok, f"B13 SFT model ({sft})"
    base, base_tok, path = b12.base_model(ctx, cfg.init)
    extra, _ = b13.plan_chars(base_tok, texts, cfg.min_char_count)
    tok = b13.ChatTokenizer(base_tok, extra)
    ctx.log(f"reference: no SFT checkpoint at {sft}; using the base with the chat vocabulary added")
    return b13.grow_vocab(base, tok.vocab_size).to(device), tok, f"base ({path or 'stand-in char model'}), no SFT"


# ---------------------------------------------------------------- the milestone

def run(ctx: Context) -> Output:
    from tiers.runner import Output, RunError

    cfg: Config = ctx.config
    try:
        path = b13.hh_file()
        triples = preference_pairs(b13.read_jsonl(path))
    except b13.SFTError as e:
        raise RunError(str(e)) from None
    triples = triples[:cfg.pairs] if cfg.pairs else triples
    if len(triples) < 10:
        raise RunError(f"{path}: only {len(triples)} usable preference pairs; DPO needs at least 10")
    n_held = max(1, int(len(triples) * cfg.held_out))
    train_t, held_t = triples[:-n_held], triples[-n_held:]
    ref, tok, ref_what = reference(ctx, cfg, (t for tr in train_t for t in tr))
    device, precision = common.device_and_precision(ctx)
    seq = min(cfg.seq or ref.config.block_size, ref.config.block_size)
    train = encode_triples(tok, train_t, seq)
    held = encode_triples(tok, held_t, seq)[:cfg.eval_pairs]
    steps = cfg.steps or max(1, math.ceil(len(train) * cfg.epochs / cfg.batch_size))
    ctx.log(f"data: {len(triples):,} pairs from {path}; {len(train):,} train, {len(held):,} held out; "
            f"seq {seq}; {steps} steps x {cfg.batch_size} pairs per β")

    ref.eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    held_w, held_l = logprobs(ref, held, device)
    before = margin_stats(ref, held_w, held_l, held, device)
    ctx.log(f"held-out margin before (reference): {before['margin']:.3f}")
    tc = common.TrainConfig(steps=steps, lr=cfg.lr, min_lr=cfg.lr / 10, warmup=cfg.warmup, weight_decay=0.0,
                            grad_clip=1.0, eval_interval=max(1, steps // 8), seed=cfg.seed)
    results, policies = [], {}
    for beta in cfg.betas:
        with ctx.progress(f"DPO β={beta:g}", steps) as bar:
            policy, hist = train_dpo(ref, train, held, beta, tc, cfg.batch_size, device, precision,
                                     on_step=lambda s, r: bar.advance(), log=lambda *a: None)
        after = margin_stats(policy, held_w, held_l, held, device, beta)
        ctx.log(f"β={beta:g}: held-out margin {before['margin']:.3f} -> {after['margin']:.3f}, "
                f"reward accuracy {after['reward_accuracy']:.1%}")
        results.append({"beta": beta, "after": after, "loss": hist["loss"], "evals": hist["evals"]})
        policies[beta] = policy
    gens = [{"prompt": p, "chosen": w, "rejected": l, "reference": b13.chat(ref, tok, p)}
            | {f"beta={b:g}": b13.chat(policies[b], tok, p) for b in cfg.betas}
            for p, w, l in held_t[:cfg.generations]]

    metrics = {"data": str(path), "pairs": len(triples), "train_pairs": len(train), "held_out_pairs": len(held),
               "seq": seq, "steps": steps, "batch_size": cfg.batch_size, "lr": cfg.lr, "reference": ref_what,
               "params": ref.num_params(), "before": before,
               "betas": [{k: v for k, v in r.items() if k != "loss"} | {"final_train_loss": r["loss"][-1]}
                         for r in results],
               "best_beta": max(results, key=lambda r: r["after"]["margin"])["beta"],
               "margin_rose": {str(r["beta"]): r["after"]["margin"] > before["margin"] for r in results},
               "generations": gens}
    plot(ctx.out_dir / "dpo.png", results, before)
    summary = (f"DPO from {ref_what.split(' (')[0]} on {len(train):,} hh-rlhf preference pairs: the held-out "
               f"chosen-vs-rejected log-probability margin went from **{before['margin']:.3f}** to "
               + ", ".join(f"**{r['after']['margin']:.3f}** (β={r['beta']:g})" for r in results) + ".")
    return Output(metrics=metrics, summary=summary, report=report(metrics, results, cfg.betas),
                  plots=["dpo.png: DPO loss and held-out margin per β"])


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


def report(m: dict[str, Any], results: list[dict[str, Any]], betas: list[float]) -> str:
    before, held, train = m["before"], m["held_out_pairs"], m["train_pairs"]
    out = [
        "## The loss", "",
        ("`loss = softplus(-β[(log πθ(y_w|x) - log π_ref(y_w|x)) - (log πθ(y_l|x) - log π_ref(y_l|x))])` "
         "(= -log σ(...)), log π summed over the response tokens only (prompt masked as in B13). "
         f"Reference (frozen): {m['reference']}."), "",
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

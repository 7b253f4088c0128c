"""B13: supervised fine-tuning (SFT). A pretrained base learns to answer in a chat template.

    base = a Hugging Face instruct model (config `model`: smollm2-135m-instruct, qwen2.5-0.5b-instruct,
           tinyllama-1.1b-chat, gpt2, ...; loaded from the registry's local snapshot, hf.py)
         | your own char GPT (`model`: b12, B12's checkpoint) | the stand-in (`standin`, trained in seconds)
    pairs = alpaca-cleaned | dolly-15k | hh-rlhf (config `dataset`) | your JSONL      (sft_data.py)
    each pair ──the template──► prompt tokens (targets masked) + response tokens + end-of-turn
    loop (B12's: AdamW, warmup + cosine, clipping; bf16 autocast on CUDA) minimising sft_loss
    held-out response loss and greedy replies, before and after; the result saved for B14

A Hugging Face model brings its own chat template in its tokenizer files (ChatML
for SmolLM2 and Qwen2.5, Zephyr's for TinyLlama; a plain "### Instruction /
### Response" format for GPT-2, which has none): see tiers/tier2/hf.py. The
fine-tuned model (or, with LoRA, its adapter) and the tokenizer are saved in the
build folder's `model/`, where B14 finds them by base model.

A char GPT has no template, so B13 gives it one (one exchange):

    <|user|>
    {prompt}
    <|assistant|>
    {response}<|end|>

`<|user|>`, `<|assistant|>` and `<|end|>` are three *new tokens*, one id each,
appended to the base's vocabulary (the embedding and the tied output matrix
grow by three rows, initialised to the mean of the old rows). One id per marker
means a user who types "<|end|>" in a prompt gets seven characters, not the
marker, and generation can stop on one token.

A character model knows only the characters it was pretrained on (Tiny
Shakespeare: 65 of them, no digits but 3, no '<', '|', '>' or '"'). The SFT data
has more. So, for a char-level base: typographic characters are first mapped to
ASCII (’ → ', “ → ", — → -, …); characters still unknown that occur at least
`min_char_count` times in the training data become new tokens too (they learn
their embedding during SFT); the rest (rare emoji, CJK, ...) are replaced by
`?`. The README lists what was added and what was replaced. A BPE base needs
only the three markers. The char GPT is saved as `sft.pt`.

Loss masking, for every base: the model is trained on the response only. For a
sequence s = prompt part + response part, inputs are s[:-1] and targets s[1:];
every target that is a prompt token (the template's headers and the prompt) is
set to -1, and `sft_loss` averages the cross-entropy over the other targets only:

    loss = mean over the t where y[t] != -1 of  -log softmax(model.logits(x)[t])[y[t]]

The first real target is the first response token; the last is the end-of-turn
token (`<|end|>`, `<|im_end|>`, `</s>`, ...). The loop that minimises it is B12's
(`b12_pretrain.train`), with this loss and batches of templated pairs.

LoRA (config `lora_rank` > 0): every attention and MLP Linear gets a low-rank
update W + (alpha / r) B A, B starting at zero so training starts from the
base exactly; the base weights are frozen. For a Hugging Face model this is
peft's LoRA (checked: nothing but adapter weights trains); for a char GPT it is
written out below (`LoRALinear`), and the rows of the new tokens in the
embedding must still be learnt, so they (and only they) train too: a gradient
mask keeps every old row exactly as it was.
"""
from __future__ import annotations

import copy
import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import torch
from annotated_types import Ge, Gt, Lt
from torch import nn
from torch.nn import functional as F

from models.gpt import GPT, GPTConfig, save_checkpoint
from tiers.report import md_table, pyplot
from tiers.tier2 import b12_pretrain as b12
from tiers.tier2 import common, hf
from tiers.tier2.sft_data import Pair, SFTError, load_pairs, split_pairs

if TYPE_CHECKING:
    from tiers.runner import Context, Output

FOLDER, CKPT = "B13-sft", "sft.pt"     # where B14 finds the SFT model
Example = tuple[list[int], list[int]]   # (inputs, targets) of one templated pair, prompt targets -1


@dataclass
class Config:
    steps: Annotated[int, Gt(0)] = 1000
    batch_size: Annotated[int, Gt(0)] = 32        # examples per micro-batch
    grad_accum: Annotated[int, Gt(0)] = 1         # micro-batches per optimiser step
    # None: 1e-3 for a char GPT; a Hugging Face model 2e-4 with LoRA, 2e-5 full (a pretrained model's
    # every weight moving at 1e-3 forgets what it knew within a few steps)
    lr: Annotated[float, Gt(0)] | None = None
    min_lr: Annotated[float, Ge(0)] | None = None   # the cosine's floor; None: lr / 10
    warmup: Annotated[int, Ge(0)] = 20
    weight_decay: Annotated[float, Ge(0)] = 0.0   # (with LoRA always 0: it would pull the update, not W, to 0)
    grad_clip: Annotated[float, Ge(0)] = 1.0
    eval_interval: Annotated[int, Ge(0)] = 0      # held-out loss every this many steps; 0: only at the end
    seed: int = 1337
    held_out: Annotated[float, Gt(0), Lt(1)] = 0.1   # the last part of the pairs, never trained on
    eval_pairs: Annotated[int, Gt(0)] = 200       # held-out pairs the loss is measured on
    min_char_count: Annotated[int, Gt(0)] = 20    # char base: a new character earns a token from this many uses
    lora_rank: Annotated[int, Ge(0)] = 0          # 0: full fine-tuning
    lora_alpha: Annotated[float, Gt(0)] = 16.0
    generations: Annotated[int, Ge(0)] = 4        # held-out prompts answered by base and SFT in the README
    # the base: a Hugging Face registry name (or model folder), `b12` (your B12 model), `standin` (a char
    # model trained in seconds); None: `init`, else B12's checkpoint when there is one, else the stand-in
    model: str | None = None
    init: str | None = None   # a GPT checkpoint (a path or *.pt); else (the ladder's 'pretrained'): B12's build or a stand-in
    dataset: str = "hh-rlhf"                      # alpaca-cleaned | dolly-15k | hh-rlhf (the data registry's names)
    dataset_files: list[str] | None = None        # hh-rlhf: which split (None: train when it is here, else test)
    data_file: str | None = None                  # your JSONL of {"prompt", "response"} (or $TIERKIT_B13_DATA)
    pairs: Annotated[int, Gt(0)] | None = None    # the first this many pairs of the data; None: all
    block_size: Annotated[int, Gt(0)] | None = None   # HF model: tokens per example (None: min(512, its context))
    gen_tokens: Annotated[int, Gt(0)] = 64        # HF model: new tokens per greedy reply in the README


USER, ASSISTANT, END = "<|user|>", "<|assistant|>", "<|end|>"
SPECIALS = (USER, ASSISTANT, END)
TEMPLATE = f"{USER}\n{{prompt}}\n{ASSISTANT}\n{{response}}{END}"

# typographic characters a char model pretrained on plain ASCII text will not know
NORMALISE = {"\u2019": "'", "\u2018": "'", "\u201c": '"', "\u201d": '"', "\u2014": "-", "\u2013": "-",
             "\u2026": "...", "\u00a0": " ", "\u2022": "*", "\t": " ", "\r": ""}
FALLBACK = "?"


# ---------------------------------------------------------------- the chat tokenizer

def _char_vocab(base: Any) -> dict[str, int] | None:
    """The base's char -> id table when it is character-level, else None."""
    for attr in ("stoi", "char_to_id"):
        table = getattr(base, attr, None)
        if isinstance(table, dict):
            return table
    return None


def normalise(text: str) -> str:
    return "".join(NORMALISE.get(c, c) for c in text)


def plan_chars(base: Any, texts: Iterable[str], min_count: int = 20) -> tuple[str, Counter]:
    """For a char base: (characters to add as new tokens, Counter of those that will be replaced).
    A character earns a token when the data has it at least `min_count` times."""
    vocab = _char_vocab(base)
    if vocab is None:
        return "", Counter()
    unknown = Counter(c for t in texts for c in normalise(t) if c not in vocab)
    add = "".join(sorted(c for c, n in unknown.items() if n >= min_count))
    return add, Counter({c: n for c, n in unknown.items() if n < min_count})


class ChatTokenizer:
    """The base tokenizer, plus new characters (char bases only), plus the three template markers.

    Ids: the base's own first (so the pretrained rows keep their meaning), then the added
    characters, then <|user|>, <|assistant|>, <|end|>. `encode` never produces a marker:
    markers enter a sequence only through `render`.
    """

    def __init__(self, base: Any, extra_chars: str = ""):
        self.base = base
        self.vocab = _char_vocab(base)
        if self.vocab is None and extra_chars:
            raise ValueError("extra characters only make sense for a character-level base tokenizer")
        n = int(base.vocab_size)
        self.base_size = n
        self.extra = {c: n + i for i, c in enumerate(extra_chars)}
        n += len(self.extra)
        self.special = {s: n + i for i, s in enumerate(SPECIALS)}
        self.vocab_size = n + len(SPECIALS)
        self.id_to_piece = {i: c for c, i in self.extra.items()} | {i: s for s, i in self.special.items()}
        self.fallback = None if self.vocab is None else self.vocab.get(FALLBACK, next(iter(self.vocab.values())))
        self.replaced = 0       # characters encode() had to replace by the fallback, for the README

    @property
    def user(self) -> int:
        return self.special[USER]

    @property
    def assistant(self) -> int:
        return self.special[ASSISTANT]

    @property
    def end(self) -> int:
        return self.special[END]

    def encode(self, text: str) -> list[int]:
        if self.vocab is None:
            return list(self.base.encode(text))
        out = []
        for c in normalise(text):
            i = self.vocab.get(c, self.extra.get(c))
            if i is None:
                i = self.fallback
                self.replaced += 1
            out.append(i)
        return out

    def decode(self, ids: Iterable[int]) -> str:
        out: list[str] = []
        run: list[int] = []
        for i in ids:
            i = int(i)
            if i < self.base_size:
                run.append(i)
                continue
            if run:
                out.append(self.base.decode(run))
                run = []
            out.append(self.id_to_piece.get(i, "?"))
        if run:
            out.append(self.base.decode(run))
        return "".join(out)

    def render(self, prompt: str, response: str | None = None,
               max_tokens: int | None = None) -> tuple[list[int], int, bool]:
        return render(self, prompt, response, max_tokens)

    def to_meta(self) -> dict[str, Any]:
        return {"extra_chars": "".join(self.extra), "specials": list(SPECIALS), "base_vocab_size": self.base_size}

    @classmethod
    def from_meta(cls, base: Any, meta: dict[str, Any]) -> ChatTokenizer:
        if int(meta.get("base_vocab_size", -1)) != int(base.vocab_size) or list(meta.get("specials", [])) != \
                list(SPECIALS):
            raise ValueError("the checkpoint's chat vocabulary does not extend this base tokenizer")
        return cls(base, meta.get("extra_chars", ""))


# ---------------------------------------------------------------- the template and the mask

def render(tok: ChatTokenizer, prompt: str, response: str | None = None,
           max_tokens: int | None = None) -> tuple[list[int], int, bool]:
    """Token ids of one templated exchange: (ids, n_prompt, complete).

    ids[:n_prompt] is the prompt part: <|user|> \\n prompt \\n <|assistant|> \\n. With no
    response the ids end there (what generation starts from). With `max_tokens`, the
    prompt keeps its *last* tokens (the question's end matters most) within half the
    budget, and the response its first tokens; `complete` is False when the response was
    cut, and then it does not end in <|end|> (the model is not taught to stop mid-sentence).
    """
    p_text = tok.encode(prompt)
    head, tail = [tok.user] + tok.encode("\n"), tok.encode("\n") + [tok.assistant] + tok.encode("\n")
    r = [] if response is None else tok.encode(response) + [tok.end]
    if max_tokens is not None:
        room_p = max(0, (max_tokens if response is None else max_tokens // 2) - len(head) - len(tail))
        room_p = max(room_p, max_tokens - len(head) - len(tail) - len(r))  # short responses leave more
        p_text = p_text[len(p_text) - room_p:] if len(p_text) > room_p else p_text
    ids = head + p_text + tail
    n_prompt = len(ids)
    complete = True
    if response is not None:
        if max_tokens is not None and n_prompt + len(r) > max_tokens:
            r = r[:max(0, max_tokens - n_prompt)]
            complete = False
        ids = ids + r
    return ids, n_prompt, complete


def masked_example(ids: Sequence[int], n_prompt: int) -> Example:
    """(inputs, targets) for next-token training with the prompt masked: targets[j] = ids[j+1], or -1
    where ids[j+1] is a prompt token."""
    x, y = list(ids[:-1]), list(ids[1:])
    for j in range(min(n_prompt - 1, len(y))):
        y[j] = -1
    return x, y


def encode_pairs(tok: Any, pairs: Sequence[Pair], block_size: int) -> list[Example]:
    """Every pair rendered by `tok` (a ChatTokenizer, or hf.ChatFormat for a Hugging Face model), cut to
    block_size + 1 tokens, masked; pairs left with no response target (or too long a prompt) dropped."""
    out = []
    for p, r in pairs:
        rendered = tok.render(p, r, max_tokens=block_size + 1)
        if rendered is None:
            continue
        x, y = masked_example(rendered[0], rendered[1])
        if any(t != -1 for t in y):
            out.append((x, y))
    return out


def collate(examples: Sequence[Example], device: Any = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad a batch to its longest example: inputs with 0, targets with -1 (ignored)."""
    T = max(len(x) for x, _ in examples)
    X = torch.zeros((len(examples), T), dtype=torch.long)
    Y = torch.full((len(examples), T), -1, dtype=torch.long)
    for i, (x, y) in enumerate(examples):
        X[i, :len(x)] = torch.tensor(x)
        Y[i, :len(y)] = torch.tensor(y)
    return X.to(device), Y.to(device)


# ---------------------------------------------------------------- the loss: the response only

def response_logits(model: Any, X: torch.Tensor, answer: torch.Tensor) -> torch.Tensor:
    """(N, vocab): the model's predictions at the N positions where `answer` is True.

    A Hugging Face model (hf.LM) computes its output layer only there (`logits_at`): with a
    150k-token vocabulary, logits at every position of a batch would dominate memory.
    """
    at = getattr(model, "logits_at", None)
    return at(X, answer) if at is not None else model.logits(X)[answer]


def sft_loss(model: GPT, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """The masked SFT loss: next-token cross-entropy, averaged over the response tokens only.

    Targets that are prompt tokens are -1 (masked_example), and so is the padding (collate):
    they are left out of the mean, so the model learns to answer, never to write the question.
    """
    X, Y = batch
    answer = Y != -1                               # the response tokens and the end-of-turn token
    logits = response_logits(model, X, answer)     # (N, vocab): the prediction at each of those positions
    return F.cross_entropy(logits.float(), Y[answer])


@torch.no_grad()
def response_loss(model: GPT, examples: Sequence[Example], batch_size: int = 32, precision: str = "fp32") -> float:
    """sft_loss over all of `examples`: the mean cross-entropy per response token."""
    device = next(model.parameters()).device
    was = model.training
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(examples), batch_size):
        X, Y = collate(examples[i:i + batch_size], device)
        n = int((Y != -1).sum())
        with common.autocast(device, precision):
            total += float(sft_loss(model, (X, Y))) * n
        count += n
    model.train(was)
    return total / max(count, 1)


# ---------------------------------------------------------------- a bigger vocabulary for the model

def grow_vocab(model: GPT, new_size: int) -> GPT:
    """A copy of `model` with `new_size` token rows; old rows copied, new rows = the mean of the old ones
    (a neutral start: the new tokens begin as 'an average token', not as noise)."""
    cfg = model.config
    if new_size <= cfg.vocab_size:
        return model
    new = GPT(GPTConfig.from_dict({**cfg.to_dict(), "vocab_size": new_size}))
    old_state = model.state_dict()
    state = new.state_dict()
    with torch.no_grad():
        for k, v in state.items():
            src = old_state[k]
            if src.shape == v.shape:
                v.copy_(src)
            else:  # the token embedding / output matrix: rows = tokens
                v[:src.shape[0]].copy_(src)
                v[src.shape[0]:].copy_(src.mean(dim=0, keepdim=True))
    new.load_state_dict(state)
    return new.to(next(model.parameters()).device)


# ---------------------------------------------------------------- LoRA

class LoRALinear(nn.Module):
    """y = W x + b + (alpha / r) * B (A x): the frozen base plus a rank-r update.

    A starts random (Kaiming-uniform like a Linear), B at zero, so the update is zero at
    the start and the fine-tune begins exactly at the base model. The update has
    r * (in + out) parameters instead of in * out.
    """

    def __init__(self, base: nn.Linear, r: int, alpha: float):
        super().__init__()
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        self.r, self.alpha, self.scaling = r, alpha, alpha / r
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features, device=base.weight.device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, device=base.weight.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (x @ self.lora_A.t().to(x.dtype)) @ self.lora_B.t().to(x.dtype) * self.scaling

    def merged(self) -> nn.Linear:
        """The plain Linear with the update folded in (W + scaling * B A): no cost at inference."""
        lin = nn.Linear(self.base.in_features, self.base.out_features, bias=self.base.bias is not None,
                        device=self.base.weight.device)
        with torch.no_grad():
            lin.weight.copy_(self.base.weight + self.scaling * self.lora_B @ self.lora_A)
            if self.base.bias is not None:
                lin.bias.copy_(self.base.bias)
        return lin


LORA_TARGETS = ("c_attn", "c_proj", "c_fc", "gate", "up")


def add_lora(model: GPT, r: int, alpha: float, train_rows_from: int | None = None) -> list[str]:
    """Freeze `model`, wrap its attention and MLP Linear layers in LoRA; return the trainable names.

    `train_rows_from`: when the vocabulary grew, rows >= this index of the token embedding
    (tied with the output matrix) train too; a gradient hook zeroes the rest, so the base's
    rows stay bit-identical.
    """
    for p in model.parameters():
        p.requires_grad_(False)
    for block in model.transformer.h.values():
        for parent in (block.attn, block.mlp):
            for name in LORA_TARGETS:
                lin = getattr(parent, name, None)
                if isinstance(lin, nn.Linear):
                    setattr(parent, name, LoRALinear(lin, r, alpha))
    if train_rows_from is not None and train_rows_from < model.config.vocab_size:
        w = model.transformer.wte.weight
        w.requires_grad_(True)
        keep = train_rows_from

        def only_new_rows(g: torch.Tensor) -> torch.Tensor:
            g = g.clone()
            g[:keep] = 0
            return g

        w.register_hook(only_new_rows)
    return [n for n, p in model.named_parameters() if p.requires_grad]


def merge_lora(model: GPT) -> GPT:
    """Fold every LoRA update into its Linear, in place: the model is a plain GPT again (saveable)."""
    for block in model.transformer.h.values():
        for parent in (block.attn, block.mlp):
            for name in LORA_TARGETS:
                m = getattr(parent, name, None)
                if isinstance(m, LoRALinear):
                    setattr(parent, name, m.merged())
    for p in model.parameters():
        p.requires_grad_(True)
    return model


# ---------------------------------------------------------------- generation

@torch.no_grad()
def chat(model: GPT, tok: ChatTokenizer, prompt: str, max_new_tokens: int = 120) -> str:
    """Greedy reply to one prompt in the template, stopped at <|end|> (or the context's end)."""
    block = model.config.block_size
    ids, _, _ = render(tok, prompt, None, max_tokens=max(8, block // 2))
    device = next(model.parameters()).device
    n = max(1, min(max_new_tokens, block - len(ids)))
    was = model.training
    model.eval()
    out = model.generate(torch.tensor([ids], device=device), n, temperature=0)[0, len(ids):].tolist()
    model.train(was)
    if tok.end in out:
        return tok.decode(out[:out.index(tok.end)])
    return tok.decode(out) + " [no <|end|> before the context ran out]"


# ---------------------------------------------------------------- the milestone

NO_B12 = ("no B12 checkpoint at {path}: run `tierkit run B12` first, or pick --size char-0.1M "
          "(a stand-in trained in seconds)")


def run(ctx: Context) -> Output:
    from tiers import data
    from tiers.runner import Output, RunError

    cfg: Config = ctx.config
    try:
        if cfg.model == "b13":
            raise SFTError("model b13 is what B13 makes; fine-tune standin, b12 or a Hugging Face model "
                           "(--set model=smollm2-135m-instruct)")
        if hf.is_hf(cfg.model):
            hf.resolve(str(cfg.model))       # the model before the data: a missing one is the line to read first
        pairs, source = load_pairs(cfg.dataset, cfg.data_file, cfg.dataset_files)
        pairs = pairs[:cfg.pairs] if cfg.pairs else pairs
        train_pairs, held_pairs = split_pairs(pairs, cfg.held_out)
        ctx.log(f"data: {len(pairs):,} pairs from {source}; {len(train_pairs):,} train, {len(held_pairs):,} held out")
        part = (run_hf if hf.is_hf(cfg.model) else run_char)(ctx, cfg, train_pairs, held_pairs)
    except (SFTError, hf.HFError, data.DataError) as e:
        raise RunError(str(e)) from None
    m, hist, lora = part["metrics"], part["hist"], cfg.lora_rank > 0
    m |= {"data": source, "pairs": len(pairs), "train_pairs": len(train_pairs), "held_out_pairs": len(held_pairs),
          "lora": {"rank": cfg.lora_rank, "alpha": cfg.lora_alpha} if lora else None, "steps": cfg.steps,
          "batch_size": cfg.batch_size, "lr": hist["lr_peak"], "min_lr": hist["lr_final"], "loss": hist["loss"],
          "evals": hist["evals"]}
    base_loss, after = m["held_out_loss_base"], m["held_out_loss_sft"]
    loss_plot(ctx.out_dir / "sft_loss.png", hist, base_loss, after)
    summary = (f"SFT of {m['base']} on {len(train_pairs):,} instruction pairs ({source.split(' (')[0]}): the "
               f"held-out loss per response token fell from **{base_loss:.3f}** (base) to **{after:.3f}** "
               f"after {cfg.steps} steps ({'LoRA, ' if lora else ''}{m['trainable_params']:,} trainable parameters). "
               f"The result is in `{m['checkpoint']}` (B14 starts from it).")
    return Output(metrics=m, summary=summary, report="\n".join([*part["template"], *report(m)]),
                  plots=["sft_loss.png: training and held-out loss on response tokens"])


def fine_tune(ctx: Context, cfg: Config, model: Any, train_ex: Sequence[Example], held_ex: Sequence[Example],
              device: torch.device, precision: str) -> dict[str, Any]:
    """B12's loop on sft_loss, batches drawn from the training examples; the history."""
    lr = cfg.lr or (1e-3 if not hf.is_hf(cfg.model) else 2e-4 if cfg.lora_rank else 2e-5)
    tc = common.TrainConfig.pick(cfg, lr=lr, min_lr=lr / 10 if cfg.min_lr is None else cfg.min_lr,
                                 weight_decay=0.0 if cfg.lora_rank else cfg.weight_decay)

    def batch(gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        ix = torch.randint(len(train_ex), (cfg.batch_size,), generator=gen).tolist()
        return collate([train_ex[i] for i in ix], device)

    with ctx.progress(f"SFT{f' (LoRA r={cfg.lora_rank})' if cfg.lora_rank else ''}", tc.steps) as bar:
        hist = b12.train(model, tc, batch, device=device, precision=precision, loss_fn=sft_loss,
                         evaluate=lambda m: {"held_out_loss": response_loss(m, held_ex, precision=precision)},
                         on_step=lambda s, r: bar.advance(), log=ctx.log)
    return hist | {"lr_peak": tc.lr, "lr_final": tc.min_lr}


def examples(ctx: Context, tok: Any, train_pairs: Sequence[Pair], held_pairs: Sequence[Pair], block: int,
             eval_pairs: int) -> tuple[list[Example], list[Example], int]:
    """(training examples, held-out examples, response tokens trained on), rendered by `tok`, cut to `block`."""
    train_ex, held_ex = encode_pairs(tok, train_pairs, block), encode_pairs(tok, held_pairs[:eval_pairs], block)
    if not train_ex or not held_ex:
        raise SFTError(f"no pair fits in {block} tokens with room for its reply; raise block_size "
                       "(--set block_size=N) or use a data set with shorter prompts")
    resp = sum(sum(t != -1 for t in y) for _, y in train_ex)
    ctx.log(f"{len(train_ex):,} training examples ({len(train_pairs) - len(train_ex):,} dropped: too long for "
            f"{block} tokens), "
            f"{resp:,} response tokens (prompt tokens masked)")
    return train_ex, held_ex, resp


def char_base(ctx: Context, model: str | None, init: str | None) -> tuple[GPT, Any, Path | None]:
    """The char GPT the rung names: the stand-in, your B12 model (or the one line saying to train it), or
    (model None) `init`, else B12's checkpoint when there is one, else the stand-in."""
    if model == "standin":
        device, _ = common.device_and_precision(ctx)
        ctx.log(f"base model: the stand-in char model ({b12.STANDIN['n_layer']} layers, "
                f"{b12.STANDIN['n_embd']} wide), trained here on Tiny Shakespeare in seconds")
        gpt, tok = b12.standin(device)
        return gpt, tok, None
    if model == "b12":
        path = b12.checkpoint_path(ctx)
        if not path.is_file():
            raise SFTError(NO_B12.format(path=path))
        init = str(path)
    return b12.base_model(ctx, init)


def run_char(ctx: Context, cfg: Config, train_pairs: list[Pair], held_pairs: list[Pair]) -> dict[str, Any]:
    """SFT of a char GPT in B13's own template; saved as sft.pt."""
    # the base, its vocabulary grown by the template's markers (and, for a char base, by new characters)
    base, base_tok, base_path = char_base(ctx, cfg.model, cfg.init)
    device, precision = common.device_and_precision(ctx)
    extra, replaced = plan_chars(base_tok, (t for pr in train_pairs for t in pr), cfg.min_char_count)
    tok = ChatTokenizer(base_tok, extra)
    base = grow_vocab(base, tok.vocab_size).to(device)
    ctx.log(f"vocabulary: {tok.base_size} base tokens + {len(extra)} new characters {extra!r} + 3 markers; "
            f"{sum(replaced.values()):,} rare characters ({len(replaced)} kinds) become {FALLBACK!r}")
    train_ex, held_ex, resp_tokens = examples(ctx, tok, train_pairs, held_pairs, base.config.block_size,
                                              cfg.eval_pairs)

    # a copy of the base trained on sft_loss with B12's loop (LoRA: only the updates and the new rows train)
    model = copy.deepcopy(base)
    base_loss = response_loss(base, held_ex, precision=precision)
    lora = cfg.lora_rank > 0
    trainable = add_lora(model, cfg.lora_rank, cfg.lora_alpha, tok.base_size) if lora \
        else [n for n, _ in model.named_parameters()]
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    hist = fine_tune(ctx, cfg, model, train_ex, held_ex, device, precision)
    if lora:
        merge_lora(model)
    after = response_loss(model, held_ex, precision=precision)
    ctx.log(f"held-out response loss: base {base_loss:.4f} -> SFT {after:.4f}")

    gens = [{"prompt": p, "reference": r, "base": chat(base, tok, p), "sft": chat(model, tok, p)}
            for p, r in held_pairs[:cfg.generations]]
    meta = {"tokenizer": base_tok.meta(), "chat": tok.to_meta(), "template": TEMPLATE,
            "base": str(base_path or "stand-in char model"), "lora_rank": cfg.lora_rank}
    save_checkpoint(ctx.out_dir / CKPT, model, meta=meta)
    metrics = {"train_examples": len(train_ex), "eval_examples": len(held_ex), "response_tokens": resp_tokens,
               "model": cfg.model or ("b12" if base_path else "standin"),
               "base": meta["base"], "vocab": {"base": tok.base_size, "added_chars": extra, "markers": list(SPECIALS),
                                               "replaced": dict(replaced.most_common(20)), "total": tok.vocab_size},
               "template": TEMPLATE, "trainable_params": n_train, "params": model.num_params(),
               "trainable_names": trainable[:50], "held_out_loss_base": base_loss, "held_out_loss_sft": after,
               "generations": gens, "checkpoint": CKPT}
    return {"metrics": metrics, "hist": hist,
            "template": char_template_report(tok, extra, replaced.most_common(12), cfg.min_char_count,
                                             masked_view(tok, train_ex[0]))}


def run_hf(ctx: Context, cfg: Config, train_pairs: list[Pair], held_pairs: list[Pair]) -> dict[str, Any]:
    """SFT of a Hugging Face causal LM in its own chat template; the model (or adapter) saved in model/."""
    device, precision = common.device_and_precision(ctx)
    folder = hf.resolve(str(cfg.model))
    tok, model = hf.load_tokenizer(folder), hf.load_model(folder, device, hf.weights_dtype(precision, not cfg.lora_rank))
    info = hf.describe(str(cfg.model), folder, model)
    ctx.log(f"base model: {cfg.model} from {folder} ({info['architecture']}, {info['params']:,} parameters); "
            f"device {device}, {precision}")
    fmt = hf.ChatFormat(tok)
    block = min(cfg.block_size or 512, info["context"])
    train_ex, held_ex, resp_tokens = examples(ctx, fmt, train_pairs, held_pairs, block, cfg.eval_pairs)
    lm = hf.LM(model)
    prompts = held_pairs[:cfg.generations]
    base_loss = response_loss(lm, held_ex, precision=precision)
    with common.autocast(device, precision):
        before = [hf.chat(lm, fmt, p, cfg.gen_tokens) for p, _ in prompts]   # before training: no copy kept

    peft_model, trainable = hf.add_lora(model, cfg.lora_rank, cfg.lora_alpha) if cfg.lora_rank > 0 \
        else (None, [n for n, _ in model.named_parameters()])
    n_train = sum(p.numel() for p in lm.parameters() if p.requires_grad)
    ctx.log(f"trainable: {n_train:,} parameters" + (f" (LoRA r={cfg.lora_rank} adapters on the frozen "
                                                     f"{info['params']:,})" if peft_model is not None
                                                     else f" of {info['params']:,} (full fine-tuning)"))
    hist = fine_tune(ctx, cfg, lm, train_ex, held_ex, device, precision)
    after = response_loss(lm, held_ex, precision=precision)
    ctx.log(f"held-out response loss: base {base_loss:.4f} -> SFT {after:.4f}")
    with common.autocast(device, precision):
        gens = [{"prompt": p, "reference": r, "base": b, "sft": hf.chat(lm, fmt, p, cfg.gen_tokens)}
                for (p, r), b in zip(prompts, before, strict=True)]

    meta = {"model": cfg.model, "snapshot": str(folder), "lora_rank": cfg.lora_rank, "lora_alpha": cfg.lora_alpha,
            "template": fmt.kind, "end_of_turn": fmt.end_text, "block_size": block}
    hf.save_sft(ctx.out_dir / hf.SFT_DIR, model, peft_model, tok, meta)
    metrics = info | {"train_examples": len(train_ex), "eval_examples": len(held_ex), "response_tokens": resp_tokens,
                      "base": f"{cfg.model} ({folder})", "template": fmt.kind, "end_of_turn": fmt.end_text,
                      "block_size": block, "trainable_params": n_train, "trainable_names": trainable[:50],
                      "held_out_loss_base": base_loss, "held_out_loss_sft": after, "generations": gens,
                      "checkpoint": f"{hf.SFT_DIR}/", "saved": "LoRA adapter" if peft_model is not None else "model"}
    saved = ("the LoRA adapter (peft) and the tokenizer; B14 merges it into the base" if peft_model is not None
             else "the fine-tuned model and its tokenizer (save_pretrained)")
    return {"metrics": metrics, "hist": hist,
            "template": [*fmt.describe(train_ex[0]), f"Saved in `{hf.SFT_DIR}/`: {saved}.", ""]}


def masked_view(tok: ChatTokenizer, ex: Example, limit: int = 240) -> str:
    """The example's targets as text, masked ones as `·`: shows exactly what the loss sees."""
    _, y = ex
    return "".join("·" if t == -1 else tok.decode([t]) for t in y[:limit])


# ---------------------------------------------------------------- the plot and the report

def running_mean(values: list[float], k: int) -> list[float]:
    """The mean of each k consecutive values (the values themselves when there are fewer than k)."""
    return torch.tensor(values).unfold(0, k, 1).mean(1).tolist() if len(values) >= k else values


def loss_plot(path: Path, hist: dict[str, Any], base_loss: float, after: float) -> None:
    fig, ax = pyplot().subplots(figsize=(7, 4))
    k = max(1, len(hist["loss"]) // 50)
    sm = running_mean(hist["loss"], k)
    ax.plot(range(k, k + len(sm)), sm, lw=1, label="training batches (running mean)")
    ax.axhline(base_loss, color="gray", ls="--", label=f"base, held out ({base_loss:.3f})")
    ax.plot([e["step"] for e in hist["evals"]], [e["held_out_loss"] for e in hist["evals"]], "o-",
            label=f"SFT, held out ({after:.3f})")
    common.finish_plot(fig, ax, path, "step", "cross-entropy per response token",
                       "SFT: loss on responses only (prompt tokens masked)")


def char_template_report(tok: ChatTokenizer, extra: str, replaced: list[tuple[str, int]], min_count: int,
                         example: str) -> list[str]:
    return [
        "## The chat template", "", "```", TEMPLATE, "```", "",
        (f"`{USER}`, `{ASSISTANT}` and `{END}` are new tokens (ids {tok.user}, {tok.assistant}, {tok.end}); the loss "
         "is computed on the response and `<|end|>` only. Vocabulary: "
         f"{tok.base_size} base tokens, {len(extra)} characters added for this data ({extra!r}), 3 markers "
         f"= {tok.vocab_size}. Characters replaced by {FALLBACK!r} (fewer than {min_count} uses): "
         + (", ".join(f"{ch!r} x{n}" for ch, n in replaced) or "none") + "."), "",
        "The targets of one training example (`·`: a masked target, one per prompt token):", "",
        "```", example, "```", ""]


def report(m: dict[str, Any]) -> list[str]:
    lora = m["lora"]
    rows = [["data", m["data"]], ["pairs train / held out", f"{m['train_pairs']:,} / {m['held_out_pairs']:,}"],
            ["base", m["base"]]]
    rows += [["architecture, context", f"{m['architecture']}, {m['context']:,} (examples cut to {m['block_size']})"]] \
        if "architecture" in m else []
    rows += [["fine-tuning", f"LoRA r={lora['rank']} alpha={lora['alpha']}" if lora else "full"],
             ["trainable parameters", f"{m['trainable_params']:,} of {m['params']:,}"],
             ["steps x batch", f"{m['steps']} x {m['batch_size']}"],
             ["held-out loss per response token, base", f"{m['held_out_loss_base']:.4f}"],
             ["held-out loss per response token, SFT", f"{m['held_out_loss_sft']:.4f}"]]
    return ["## Result", "", md_table(["", "value"], rows), "",
            "## Base vs SFT on held-out prompts (greedy)", "",
            md_table(["prompt", "base (before)", "SFT (after)", "the data's reply"],
                     [[repr(g["prompt"][:160]), repr(g["base"][:200]), repr(g["sft"][:200]), repr(g["reference"][:200])]
                      for g in m["generations"]]), ""]

"""B13: supervised fine-tuning (SFT). A pretrained base learns to answer in a chat template.

The chat template (one exchange):

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
only the three markers.

Loss masking: the model is trained on the response only. For a sequence
s = prompt part + response part, inputs are s[:-1] and targets s[1:]; every
target that is a prompt token (the `<|user|>` header, the prompt, and the
`<|assistant|>` header with its newline) is set to -1, and `sft_loss` averages
the cross-entropy over the other targets only:

    loss = mean over the t where y[t] != -1 of  -log softmax(model.logits(x)[t])[y[t]]

The first real target is the first response token; the last is `<|end|>`. The
loop that minimises it is B12's (`b12_pretrain.train`: AdamW, warmup and cosine,
clipping), with this loss and batches of templated pairs.

Data: the hh-rlhf "chosen" dialogues (the data registry's `hh-rlhf`), each
parsed into Human/Assistant turns; the first exchange of each dialogue is a
(prompt, response) pair (later turns depend on context a small model cannot
hold). Or your own JSONL of {"prompt": ..., "response": ...} lines: config
`data_file`, or `TIERKIT_B13_DATA=file.jsonl`.

LoRA (config `lora_rank` > 0): every attention and MLP Linear gets a low-rank
update W + (alpha / r) B A, B starting at zero so training starts from the
base exactly; the base weights are frozen. The rows of the new tokens in the
embedding must still be learnt, so they (and only they) train too: a gradient
mask keeps every old row exactly as it was.
"""
from __future__ import annotations

import copy
import gzip
import itertools
import json
import math
import os
import re
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
from tiers.tier2 import common

if TYPE_CHECKING:
    from tiers.runner import Context, Output

FOLDER, CKPT = "B13-sft", "sft.pt"     # where B14 finds the SFT model


@dataclass
class Config:
    steps: Annotated[int, Gt(0)] = 1000
    batch_size: Annotated[int, Gt(0)] = 32        # examples per micro-batch
    grad_accum: Annotated[int, Gt(0)] = 1         # micro-batches per optimiser step
    lr: Annotated[float, Gt(0)] = 1e-3
    min_lr: Annotated[float, Ge(0)] = 1e-4
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
    init: str | None = None   # a GPT checkpoint (a path or *.pt); else (the ladder's 'pretrained'): B12's build or a stand-in
    data_file: str | None = None                  # your JSONL of {"prompt", "response"} (or $TIERKIT_B13_DATA)


USER, ASSISTANT, END = "<|user|>", "<|assistant|>", "<|end|>"
SPECIALS = (USER, ASSISTANT, END)
TEMPLATE = f"{USER}\n{{prompt}}\n{ASSISTANT}\n{{response}}{END}"

# typographic characters a char model pretrained on plain ASCII text will not know
NORMALISE = {"\u2019": "'", "\u2018": "'", "\u201c": '"', "\u201d": '"', "\u2014": "-", "\u2013": "-",
             "\u2026": "...", "\u00a0": " ", "\u2022": "*", "\t": " ", "\r": ""}
FALLBACK = "?"


class SFTError(ValueError):
    """Bad SFT input (a malformed JSONL line, no usable pairs); str() is one line naming the fix."""


# ---------------------------------------------------------------- data: hh-rlhf dialogues and JSONL pairs

_TURN = re.compile(r"\n\n(Human|Assistant): ?")


def parse_dialogue(text: str) -> list[tuple[str, str]]:
    """'\\n\\nHuman: ...\\n\\nAssistant: ...' -> [("Human", ...), ("Assistant", ...), ...] (text stripped)."""
    parts = _TURN.split(text)
    # split with a capturing group: [before, role, text, role, text, ...]
    return [(parts[i], parts[i + 1].strip()) for i in range(1, len(parts) - 1, 2)]


def exchanges(turns: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
    """Every (Human turn, the Assistant turn right after it) pair, in order, both non-empty."""
    return [(a[1], b[1]) for a, b in itertools.pairwise(turns)
            if a[0] == "Human" and b[0] == "Assistant" and a[1] and b[1]]


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Lines of a .jsonl or .jsonl.gz file; SFTError naming the line when one is not a JSON object."""
    opener = gzip.open if path.suffix == ".gz" else open
    rows = []
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            for no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise SFTError(f"{path}:{no}: not JSON ({e.msg}); each line must be one JSON object") from None
                if not isinstance(row, dict):
                    raise SFTError(f"{path}:{no}: a JSON {type(row).__name__}, not an object; "
                                   "each line must be one JSON object") from None
                rows.append(row)
    except (OSError, EOFError, UnicodeDecodeError) as e:
        raise SFTError(f"{path}: cannot read it ({type(e).__name__}: {e}); give a UTF-8 .jsonl or .jsonl.gz file") \
            from None
    return rows


def hh_pairs(rows: Iterable[dict[str, Any]], key: str = "chosen") -> list[tuple[str, str]]:
    """The first exchange of each hh-rlhf dialogue (`key`: chosen or rejected) as (prompt, response)."""
    out = []
    for row in rows:
        ex = exchanges(parse_dialogue(str(row.get(key, ""))))
        if ex:
            out.append(ex[0])
    return out


def user_pairs(path: Path) -> list[tuple[str, str]]:
    """{"prompt", "response"} lines of your own file; SFTError naming the first bad line."""
    rows = read_jsonl(path)
    out = []
    for no, row in enumerate(rows, 1):
        p, r = row.get("prompt"), row.get("response")
        if not isinstance(p, str) or not isinstance(r, str) or not r.strip():
            raise SFTError(f"{path}: object {no} lacks a string 'prompt' and a non-empty string 'response'; "
                           'each line must be {"prompt": "...", "response": "..."}')
        out.append((p.strip(), r.strip()))
    if not out:
        raise SFTError(f"{path}: no pairs in it; each line must be {{\"prompt\": \"...\", \"response\": \"...\"}}")
    return out


def hh_file() -> Path:
    """hh-rlhf through the data registry: the train split when it is here, else the test split."""
    from tiers import data

    for name in ("harmless-base-train.jsonl.gz", "harmless-base-test.jsonl.gz"):
        p = data.find_file("hh-rlhf", name)
        if p is not None:
            return p
    raise SFTError(data.missing_message("hh-rlhf"))


def load_pairs(cfg: Config) -> tuple[list[tuple[str, str]], str]:
    """(pairs, where they came from): config `data_file` or TIERKIT_B13_DATA, else hh-rlhf chosen."""
    user = cfg.data_file or os.environ.get("TIERKIT_B13_DATA")
    if user:
        p = Path(user).expanduser()
        if not p.is_file():
            raise SFTError(f"{p}: no such file; point data_file / TIERKIT_B13_DATA at a JSONL of "
                           '{"prompt", "response"} lines, or unset it for the hh-rlhf default')
        return user_pairs(p), f"your file {p}"
    path = hh_file()
    return hh_pairs(read_jsonl(path)), f"hh-rlhf chosen dialogues, first exchange ({path})"


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


def masked_example(ids: Sequence[int], n_prompt: int) -> tuple[list[int], list[int]]:
    """(inputs, targets) for next-token training with the prompt masked: targets[j] = ids[j+1], or -1
    where ids[j+1] is a prompt token."""
    x, y = list(ids[:-1]), list(ids[1:])
    for j in range(min(n_prompt - 1, len(y))):
        y[j] = -1
    return x, y


def encode_pairs(tok: ChatTokenizer, pairs: Sequence[tuple[str, str]], block_size: int) -> list[tuple[list[int], list[int]]]:
    """Every pair rendered, cut to block_size + 1 tokens, masked; pairs left with no response target dropped."""
    out = []
    for p, r in pairs:
        ids, n_prompt, _ = render(tok, p, r, max_tokens=block_size + 1)
        x, y = masked_example(ids, n_prompt)
        if any(t != -1 for t in y):
            out.append((x, y))
    return out


def collate(examples: Sequence[tuple[list[int], list[int]]], device: Any = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad a batch to its longest example: inputs with 0, targets with -1 (ignored)."""
    T = max(len(x) for x, _ in examples)
    X = torch.zeros((len(examples), T), dtype=torch.long)
    Y = torch.full((len(examples), T), -1, dtype=torch.long)
    for i, (x, y) in enumerate(examples):
        X[i, :len(x)] = torch.tensor(x)
        Y[i, :len(y)] = torch.tensor(y)
    return X.to(device), Y.to(device)


# ---------------------------------------------------------------- the loss: the response only

def sft_loss(model: GPT, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """The masked SFT loss: next-token cross-entropy, averaged over the response tokens only.

    Targets that are prompt tokens are -1 (masked_example), and so is the padding (collate):
    they are left out of the mean, so the model learns to answer, never to write the question.
    """
    X, Y = batch
    logits = model.logits(X)                       # (B, T, vocab): a prediction at every position
    answer = Y != -1                               # the response tokens and <|end|>
    return F.cross_entropy(logits[answer], Y[answer])


@torch.no_grad()
def response_loss(model: GPT, examples: Sequence[tuple[list[int], list[int]]], batch_size: int = 32) -> float:
    """sft_loss over all of `examples`: the mean cross-entropy per response token."""
    device = next(model.parameters()).device
    was = model.training
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(examples), batch_size):
        X, Y = collate(examples[i:i + batch_size], device)
        n = int((Y != -1).sum())
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

def split_pairs(pairs: list[tuple[str, str]], frac: float) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """The last `frac` of the pairs (at least 1, at most all but 1) held out; file order, so no shuffling leak."""
    if len(pairs) < 2:
        raise SFTError(f"{len(pairs)} usable pair(s): SFT needs at least 2 (one to train on, one to hold out)")
    n = min(len(pairs) - 1, max(1, int(len(pairs) * frac)))
    return pairs[:-n], pairs[-n:]


def run(ctx: Context) -> Output:
    from tiers.runner import Output, RunError

    cfg: Config = ctx.config
    try:
        pairs, source = load_pairs(cfg)
    except SFTError as e:
        raise RunError(str(e)) from None
    train_pairs, held_pairs = split_pairs(pairs, cfg.held_out)
    ctx.log(f"data: {len(pairs):,} pairs from {source}; {len(train_pairs):,} train, {len(held_pairs):,} held out")

    # the base, its vocabulary grown by the template's markers (and, for a char base, by new characters)
    base, base_tok, base_path = b12.base_model(ctx, cfg.init)
    device, precision = common.device_and_precision(ctx)
    extra, replaced = plan_chars(base_tok, (t for pr in train_pairs for t in pr), cfg.min_char_count)
    tok = ChatTokenizer(base_tok, extra)
    base = grow_vocab(base, tok.vocab_size).to(device)
    ctx.log(f"vocabulary: {tok.base_size} base tokens + {len(extra)} new characters {extra!r} + 3 markers; "
            f"{sum(replaced.values()):,} rare characters ({len(replaced)} kinds) become {FALLBACK!r}")
    train_ex = encode_pairs(tok, train_pairs, base.config.block_size)
    held_ex = encode_pairs(tok, held_pairs[:cfg.eval_pairs], base.config.block_size)
    resp_tokens = sum(sum(t != -1 for t in y) for _, y in train_ex)
    ctx.log(f"{len(train_ex):,} training examples, {resp_tokens:,} response tokens (prompt tokens masked)")

    # a copy of the base trained on sft_loss with B12's loop (LoRA: only the updates and the new rows train)
    model = copy.deepcopy(base)
    base_loss = response_loss(base, held_ex)
    lora = cfg.lora_rank > 0
    trainable = add_lora(model, cfg.lora_rank, cfg.lora_alpha, tok.base_size) if lora \
        else [n for n, _ in model.named_parameters()]
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    tc = common.TrainConfig.pick(cfg, weight_decay=0.0 if lora else cfg.weight_decay)

    def batch(gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        ix = torch.randint(len(train_ex), (cfg.batch_size,), generator=gen).tolist()
        return collate([train_ex[i] for i in ix], device)

    with ctx.progress(f"SFT{f' (LoRA r={cfg.lora_rank})' if lora else ''}", tc.steps) as bar:
        hist = b12.train(model, tc, batch, device=device, precision=precision, loss_fn=sft_loss,
                         evaluate=lambda m: {"held_out_loss": response_loss(m, held_ex)},
                         on_step=lambda s, r: bar.advance(), log=ctx.log)
    if lora:
        merge_lora(model)
    after = response_loss(model, held_ex)
    ctx.log(f"held-out response loss: base {base_loss:.4f} -> SFT {after:.4f}")

    gens = [{"prompt": p, "reference": r, "base": chat(base, tok, p), "sft": chat(model, tok, p)}
            for p, r in held_pairs[:cfg.generations]]
    meta = {"tokenizer": base_tok.meta(), "chat": tok.to_meta(), "template": TEMPLATE,
            "base": str(base_path or "stand-in char model"), "lora_rank": cfg.lora_rank}
    save_checkpoint(ctx.out_dir / CKPT, model, meta=meta)
    metrics = {"data": source, "pairs": len(pairs), "train_pairs": len(train_pairs), "held_out_pairs": len(held_pairs),
               "train_examples": len(train_ex), "eval_examples": len(held_ex), "response_tokens": resp_tokens,
               "base": meta["base"], "vocab": {"base": tok.base_size, "added_chars": extra, "markers": list(SPECIALS),
                                               "replaced": dict(replaced.most_common(20)), "total": tok.vocab_size},
               "template": TEMPLATE, "lora": {"rank": cfg.lora_rank, "alpha": cfg.lora_alpha} if lora else None,
               "trainable_params": n_train, "params": model.num_params(), "trainable_names": trainable[:50],
               "steps": tc.steps, "batch_size": cfg.batch_size, "held_out_loss_base": base_loss,
               "held_out_loss_sft": after, "loss": hist["loss"], "evals": hist["evals"], "generations": gens,
               "checkpoint": CKPT}
    loss_plot(ctx.out_dir / "sft_loss.png", hist, base_loss, after)
    summary = (f"SFT of {meta['base']} on {len(train_pairs):,} instruction pairs ({source.split(' (')[0]}): the "
               f"held-out loss per response token fell from **{base_loss:.3f}** (base) to **{after:.3f}** "
               f"after {tc.steps} steps ({'LoRA, ' if lora else ''}{n_train:,} trainable parameters). "
               f"The model is in `{CKPT}` (B14 starts from it).")
    return Output(metrics=metrics, summary=summary,
                  report=report(metrics, tok, replaced.most_common(12), cfg.min_char_count,
                                masked_view(tok, train_ex[0])),
                  plots=["sft_loss.png: training and held-out loss on response tokens"])


def masked_view(tok: ChatTokenizer, ex: tuple[list[int], list[int]], limit: int = 240) -> str:
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


def report(m: dict[str, Any], tok: ChatTokenizer, replaced: list[tuple[str, int]], min_count: int,
           example: str) -> str:
    extra, lora = m["vocab"]["added_chars"], m["lora"]
    out = [
        "## The chat template", "", "```", TEMPLATE, "```", "",
        (f"`{USER}`, `{ASSISTANT}` and `{END}` are new tokens (ids {tok.user}, {tok.assistant}, {tok.end}); the loss "
         "is computed on the response and `<|end|>` only. Vocabulary: "
         f"{tok.base_size} base tokens, {len(extra)} characters added for this data ({extra!r}), 3 markers "
         f"= {tok.vocab_size}. Characters replaced by {FALLBACK!r} (fewer than {min_count} uses): "
         + (", ".join(f"{ch!r} x{n}" for ch, n in replaced) or "none") + "."), "",
        "The targets of one training example (`·`: a masked target, one per prompt token):", "",
        "```", example, "```", "",
        "## Result", "",
        md_table(["", "value"],
                 [["data", m["data"]], ["pairs train / held out", f"{m['train_pairs']:,} / {m['held_out_pairs']:,}"],
                  ["base", m["base"]],
                  ["fine-tuning", f"LoRA r={lora['rank']} alpha={lora['alpha']}" if lora else "full"],
                  ["trainable parameters", f"{m['trainable_params']:,} of {m['params']:,}"],
                  ["steps x batch", f"{m['steps']} x {m['batch_size']}"],
                  ["held-out loss per response token, base", f"{m['held_out_loss_base']:.4f}"],
                  ["held-out loss per response token, SFT", f"{m['held_out_loss_sft']:.4f}"]]), "",
        "## Base vs SFT on held-out prompts (greedy)", ""]
    for g in m["generations"]:
        out += [f"**prompt:** {g['prompt'][:200]!r}", "",
                md_table(["", "reply"], [["base", repr(g["base"][:200])], ["SFT", repr(g["sft"][:200])],
                                         ["hh-rlhf reference", repr(g["reference"][:200])]]), ""]
    return "\n".join(out)

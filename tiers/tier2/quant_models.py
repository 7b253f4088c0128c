"""What B7 quantises, found by the name the rung (or `--set model=`) gives: one shape for every kind of model.

    "gpt2" | "gpt2-medium" | ...   data.require(name) -> the snapshot folder in the Hugging Face cache
                                   -> AutoModelForCausalLM + the model's own tokenizer files, both local
    "b12"                          <builds>/B12-pretraining/ckpt.pt; none there: stop, saying how to get one
    "standin"                      a 2-layer char GPT trained here in seconds, always named as such
    a folder | a *.pt file         a snapshot folder given by path, or a tierkit GPT checkpoint
      -> Subject(model, logits(ids), encode(text), context, and what ran: name, source, tokenizer)

Why: the lab (round the weights, dequantise them into the model, measure) is the same arithmetic
whatever the model; only loading, the tokenizer and how logits come out differ, so they stay here
and b07_quant reads top to bottom. A missing model is one line (`tierkit data fetch NAME`) raised
before anything is written; a run never puts another model in its place.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tiers.runner import Context


@dataclass
class Subject:
    """A model ready to quantise and score, and the words that say what it is."""

    model: Any                              # a torch Module in eval mode, fp32, on the run's device
    logits: Callable[[Any], Any]            # token ids (B, T) -> logits (B, T, vocab)
    encode: Callable[[str], list[int]]      # text -> token ids, with the model's own tokenizer
    context: int                            # the longest window the model takes (its positions)
    name: str                               # what ran: "gpt2", "b12", "standin", or the path given
    source: str                             # where it came from: a snapshot folder, a checkpoint, "trained here"
    tokenizer: str                          # which tokenizer, and from where
    config: dict[str, Any]                  # the model's architecture, as plain data

    @property
    def params(self) -> int:
        """Parameters, a tied embedding/head counted once."""
        return sum(p.numel() for p in self.model.parameters())


def load(ctx: Context, name: str) -> Subject:
    """The Subject for `name`; RunError (one line) when it is not here, before anything is written."""
    from tiers.runner import RunError
    from tiers.tier2 import common

    device, _ = common.device_and_precision(ctx)
    if name == "standin":
        return _standin(ctx, device)
    if name == "b12":
        from tiers.tier2 import b12_pretrain as b12

        path = b12.checkpoint_path(ctx)
        if not path.is_file():
            raise RunError(f"no B12 checkpoint at {path}: run `tierkit run B12` first, or pick --size char-0.1M "
                           "(a stand-in trained in seconds)")
        return _tierkit(ctx, path, "b12")
    if "/" in name or name.endswith(".pt"):
        path = Path(name).expanduser()
        if path.is_dir():
            return load_hf(str(path), device)
        if path.is_file():
            return _tierkit(ctx, path, name)
        raise RunError(f"model {name}: no such file or folder; give a snapshot folder (config.json, tokenizer, "
                       "weights), a tierkit checkpoint (*.pt), or a registry name (`tierkit data list`)")
    return load_hf(name, device)


def load_hf(name: str, device: Any) -> Subject:
    """A Hugging Face causal LM (a registry name or a snapshot folder): weights and tokenizer from its local
    files only (tiers/tier2/hf.py loads them, as for B13 and B14); RunError (one line) when it is not here."""
    from tiers import data
    from tiers.runner import RunError
    from tiers.tier2 import hf

    try:
        folder = hf.resolve(name)
        tok = hf.load_tokenizer(folder)
        model = hf.load_model(folder, device).eval()
    except (data.DataError, hf.HFError) as exc:
        raise RunError((str(exc).strip().splitlines() or [type(exc).__name__])[0]) from None
    try:
        source = f"{data.get(name).title}, {folder}"
    except data.DataError:                     # a folder given by path
        source = str(folder)

    def logits(x: Any) -> Any:
        return model(input_ids=x, use_cache=False).logits

    def encode(text: str) -> list[int]:
        # verbose=False: the whole text is longer than one window by design; it is cut into windows later
        return list(tok(text, add_special_tokens=False, verbose=False)["input_ids"])

    return Subject(model, logits, encode, hf.context(model), name, source,
                   f"{type(tok).__name__} ({len(tok):,} tokens) from the model's own files in {folder}",
                   {k: v for k, v in model.config.to_dict().items() if isinstance(v, (int, float, str, bool))})


def _tierkit(ctx: Context, path: Path, name: str) -> Subject:
    """A tierkit GPT checkpoint (B12's, or a path), with the tokenizer its meta records."""
    from tiers.tier2 import b12_pretrain as b12

    model, tok, _ = b12.base_model(ctx, str(path))
    return _gpt_subject(model.eval(), tok, name, str(path))


def _standin(ctx: Context, device: Any) -> Subject:
    from tiers.tier2 import b12_pretrain as b12

    s = b12.STANDIN
    ctx.log(f"model: the stand-in, a small char-level GPT ({s['n_layer']} layers, {s['n_embd']} wide) trained here "
            "on Tiny Shakespeare for 300 steps; pick --size char-10.7M for your B12 model, gpt2-124M for GPT-2")
    model, tok = b12.standin(device)
    return _gpt_subject(model.eval(), tok, "standin", "trained here in seconds (300 steps on Tiny Shakespeare)")


def _gpt_subject(model: Any, tok: Any, name: str, source: str) -> Subject:
    meta = tok.meta()
    return Subject(model, model.logits, lambda text: tok.encode(text, errors="drop"), model.config.block_size,
                   name, source, f"{meta['kind']} ({tok.vocab_size:,} tokens)", model.config.to_dict())

"""What B13 and B14 share for a Hugging Face causal LM: load it, render pairs in its chat template, LoRA, replies.

    registry name ──data.require──► snapshot folder ──from_pretrained──► model (fp32 weights) + its own tokenizer
    (prompt, response) ──the tokenizer's chat template──►  prompt ids          │ response ids + end-of-turn
                                                          (targets masked: -1) │ (the loss covers these)
    LM(model).logits_at(x, where)   the output layer only where the loss looks
    add_lora(model, r, alpha)       peft LoRA on every Linear but the output layer; only the adapters train (checked)
    chat(lm, fmt, prompt)           a greedy reply, stopped at the end-of-turn token
    save_sft / find_sft / load_sft  B13's result in its build folder, where B14 finds it by base model

Why the chat template: an instruct model was post-trained on conversations in one
exact format (ChatML's `<|im_start|>user ... <|im_end|>` for SmolLM2 and Qwen2.5,
Zephyr's `<|user|> ... </s>` for TinyLlama); fine-tuning in that format keeps what
it learnt. The template ships in the checkpoint's tokenizer files, so rendering
needs no network. A tokenizer without one (GPT-2) gets a plain format, documented
here and shown in the README:

    ### Instruction:
    {prompt}

    ### Response:
    {response}<|endoftext|>

The mask: the prompt part is the template rendered up to the assistant's header
(`add_generation_prompt`), exactly what generation later starts from; the response
part is the rest of the rendered conversation up to and including the end-of-turn
token (what the template writes after the response, e.g. `<|im_end|>`; the newline
after it is dropped: the model must learn to stop, not to start another turn).

Why `logits_at`: the loss looks at response positions only, and an output layer
over a 150k-token vocabulary (Qwen2.5) computed at every position of a batch is
gigabytes; the backbone runs on the whole batch, the head only where it is needed.
Batches are right-padded, so in a causal model no real token ever attends to the
padding after it: no attention mask is needed.
"""
from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

OWN_MODELS = ("standin", "b12", "b13")   # the learner's own models (a tierkit GPT), never Hugging Face
PLAIN = "### Instruction:\n{prompt}\n\n### Response:\n"
SFT_DIR, SFT_META = "model", "tierkit-sft.json"   # B13's result inside its build folder
# architectures whose backbone's last hidden state goes straight into the output Linear (no logit scaling)
HEAD_ON_HIDDEN = ("GPT2LMHeadModel", "LlamaForCausalLM", "Qwen2ForCausalLM", "GPTNeoXForCausalLM",
                  "MistralForCausalLM")


class HFError(ValueError):
    """A model that cannot be used (not a causal LM, no tokenizer, no template); str() is one line with the fix."""


def is_hf(model: str | None) -> bool:
    """True when the rung's `model` names a Hugging Face checkpoint (a registry name or a local folder)."""
    return bool(model) and model not in OWN_MODELS


# ---------------------------------------------------------------- loading

def resolve(name: str) -> Path:
    """The snapshot folder of a registry model (data.require), or a local checkpoint folder as given.

    DataError (one line naming `tierkit data fetch NAME`) when the model is not here; HFError when
    the name is a GGUF or a data set.
    """
    p = Path(name).expanduser()
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise HFError(f"{p}: no config.json in it; give a Hugging Face model folder or a registry name")
        return p
    from tiers import data

    kind = getattr(data.get(name), "kind", "model")
    if kind != "model":
        raise HFError(f"{name} is a {'GGUF file' if kind == 'gguf' else 'data set'}, not a Hugging Face model; "
                      "pick one from `tierkit data list` (smollm2-135m-instruct, qwen2.5-0.5b-instruct, gpt2, ...)")
    return Path(data.require(name))


def load_tokenizer(folder: Path) -> PreTrainedTokenizerBase:
    """The checkpoint's own tokenizer, from its files (never the network)."""
    from transformers import AutoTokenizer

    return _loading(folder, lambda: AutoTokenizer.from_pretrained(folder, local_files_only=True))


def load_model(folder: Path, device: torch.device, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """The causal LM on `device`, its weights in `dtype` (weights_dtype says which)."""
    from transformers import AutoModelForCausalLM

    model = _loading(folder, lambda: AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, local_files_only=True))
    return model.to(device)


def weights_dtype(precision: str, trains: bool) -> torch.dtype:
    """fp32 for weights that train: the loop computes in bf16/fp16 under autocast (common.autocast)
    and AdamW's small updates are not rounded away. Frozen weights (LoRA's base, DPO's reference)
    in the run's precision: half the memory, and autocast computes in it anyway."""
    return torch.float32 if trains else {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)


def _loading(folder: Path, fn: Any) -> Any:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    try:
        return fn()
    except (OSError, ValueError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise HFError(f"{folder}: cannot load a causal LM and its tokenizer from it ({first}); "
                      "fetch it again with `tierkit data fetch`") from None


def context(model: PreTrainedModel) -> int:
    """The longest sequence the model's positions allow."""
    cfg = model.config
    return int(getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", 1024))


def describe(name: str, folder: Path, model: PreTrainedModel) -> dict[str, Any]:
    """What ran, for the log, metrics.json and the README."""
    return {"model": name, "snapshot": str(folder), "architecture": type(model).__name__,
            "params": sum(p.numel() for p in model.parameters()), "context": context(model),
            "vocab": int(model.config.vocab_size)}


# ---------------------------------------------------------------- the chat format and the mask

class ChatFormat:
    """Renders (prompt, response) into token ids in the model's own chat template (or PLAIN without one).

    `render(prompt, response, max_tokens)` -> (ids, n_prompt, complete), or None when the prompt alone
    takes more than half of `max_tokens` (such a pair is dropped, never cut mid-question). ids[:n_prompt]
    is what generation starts from; ids[n_prompt:] the response and the end-of-turn token. A response
    cut to fit loses its end token too (the model is not taught to stop mid-sentence).
    """

    def __init__(self, tok: PreTrainedTokenizerBase):
        self.tok = tok
        self.template = bool(getattr(tok, "chat_template", None))
        if self.template:
            probe_p, probe_r = "Hello?", "Hi."
            tail = self._conversation(probe_p, probe_r)[len(self.prompt_text(probe_p)):]
            tail = tail[tail.find(probe_r) + len(probe_r):] if probe_r in tail else ""
            ids = self.encode(tail)
            first = ids[0] if ids else None
            self.end_id = first if first in tok.all_special_ids else tok.eos_token_id
        else:
            self.end_id = tok.eos_token_id
        if self.end_id is None:
            raise HFError(f"{tok.name_or_path}: the tokenizer has no end-of-sequence token; the model cannot "
                          "learn where a reply ends")
        self.end_text = tok.decode([self.end_id])
        self.kind = "the tokenizer's chat template" if self.template else "plain ### Instruction / ### Response"

    def encode(self, text: str) -> list[int]:
        # the template writes every special token itself (a BOS too, where the model wants one)
        return list(self.tok(text, add_special_tokens=False)["input_ids"])

    def decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode(list(ids))

    def prompt_text(self, prompt: str) -> str:
        if not self.template:
            return PLAIN.format(prompt=prompt)
        return self.tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            tokenize=False)

    def _conversation(self, prompt: str, response: str) -> str:
        return self.tok.apply_chat_template([{"role": "user", "content": prompt},
                                             {"role": "assistant", "content": response}], tokenize=False)

    def response_text(self, prompt: str, response: str) -> str:
        """What follows the prompt part: the response, then the end-of-turn token, nothing after it."""
        if not self.template:
            return response + self.end_text
        head, full = self.prompt_text(prompt), self._conversation(prompt, response)
        at = full.find(response, len(head)) if full.startswith(head) else -1
        if at < 0:
            raise HFError(f"{self.tok.name_or_path}: its chat template does not render the prompt as the start "
                          "of the conversation, so the reply cannot be told from the prompt")
        return full[len(head):at + len(response)] + self.end_text   # whatever the template writes next: dropped

    def describe(self, example: tuple[list[int], list[int]]) -> list[str]:
        """Markdown: the format, one (inputs, targets) example as the model reads it, and what the loss sees."""
        x, y = example
        return ["## The chat template", "",
                (f"Rendered with {self.kind}; the loss covers the response and the end-of-turn token "
                 f"`{self.end_text}` (id {self.end_id}) only. One training example as the model reads it:"), "",
                "```", self.decode(x + y[-1:])[:600], "```", "",
                "Its targets (`·`: a masked target, one per prompt token):", "",
                "```", "".join("·" if t == -1 else self.decode([t]) for t in y[:240]), "```", ""]

    def render(self, prompt: str, response: str | None = None,
               max_tokens: int | None = None) -> tuple[list[int], int, bool] | None:
        head = self.prompt_text(prompt)
        p = self.encode(head)
        if response is None:
            return None if max_tokens is not None and len(p) > max_tokens // 2 else (p, len(p), True)
        tail = self.response_text(prompt, response)
        full = self.encode(head + tail)
        # the conversation tokenised whole, when its start is the prompt's tokens; else the two parts apart
        r = full[len(p):] if full[:len(p)] == p else self.encode(tail)
        if max_tokens is None or len(p) + len(r) <= max_tokens:
            return p + r, len(p), True
        if len(p) > max_tokens // 2:
            return None
        return p + r[:max_tokens - len(p)], len(p), False


# ---------------------------------------------------------------- the model as B13 and B14 see it

class LM(torch.nn.Module):
    """A transformers causal LM with the two calls the losses use: logits(x) and logits_at(x, where)."""

    def __init__(self, model: PreTrainedModel):
        super().__init__()
        self.model = model

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=x, use_cache=False).logits

    def logits_at(self, x: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
        """(N, vocab) logits at the positions where `where` (B, T) is True, in row-major order."""
        if type(self.model).__name__ not in HEAD_ON_HIDDEN:
            return self.logits(x)[where]
        hidden = self.model.base_model(input_ids=x, use_cache=False).last_hidden_state
        return self.model.get_output_embeddings()(hidden[where])


def add_lora(model: PreTrainedModel, r: int, alpha: float) -> tuple[Any, list[str]]:
    """Wrap `model` (in place) with peft LoRA adapters on every Linear but the output layer.

    Returns (the peft model, the trainable parameter names); raises HFError when anything
    but an adapter would train. The base weights stay frozen, so with the adapters disabled
    (`peft_model.disable_adapter()`) the model is exactly the one it started from.
    """
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules="all-linear", bias="none",
                     task_type="CAUSAL_LM")
    with warnings.catch_warnings():   # peft asks transformers a deprecated question; nothing for the user to do
        warnings.simplefilter("ignore", FutureWarning)
        peft_model = get_peft_model(model, cfg)
    names = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    wrong = [n for n in names if "lora_" not in n]
    if wrong or not names:
        raise HFError(f"LoRA would train {wrong[:3] or 'nothing'}, not only its adapters; "
                      "use lora_rank=0 for full fine-tuning")
    return peft_model, names


@torch.no_grad()
def chat(lm: LM, fmt: ChatFormat, prompt: str, max_new_tokens: int = 64) -> str:
    """Greedy reply to one prompt in the chat format, stopped at the end-of-turn token."""
    from transformers import GenerationConfig

    room = context(lm.model)
    rendered = fmt.render(prompt, None, max_tokens=max(8, room - max_new_tokens))
    if rendered is None:
        return "[prompt longer than the model's context]"
    device = next(lm.parameters()).device
    ids = torch.tensor([rendered[0]], device=device)
    gen = GenerationConfig(max_new_tokens=max(1, min(max_new_tokens, room - ids.shape[1])), do_sample=False,
                           eos_token_id=fmt.end_id, pad_token_id=fmt.end_id)
    was = lm.training
    lm.eval()
    out = lm.model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=gen)[0, ids.shape[1]:]
    lm.train(was)
    new = out.tolist()
    if fmt.end_id in new:
        return fmt.decode(new[:new.index(fmt.end_id)]).strip()
    return fmt.decode(new).strip() + f" [no end-of-turn within {len(new)} tokens]"


# ---------------------------------------------------------------- B13's result, for B14

def save_sft(folder: Path, model: PreTrainedModel, peft_model: Any, tok: PreTrainedTokenizerBase,
             meta: dict[str, Any]) -> None:
    """The adapter (LoRA: a few MB) or the whole fine-tuned model, the tokenizer, and what they are."""
    folder.mkdir(parents=True, exist_ok=True)
    (peft_model if peft_model is not None else model).save_pretrained(folder)
    tok.save_pretrained(folder)
    (folder / SFT_META).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")


def find_sft(build_root: Path, model: str) -> Path | None:
    """B13's result for base `model` in <build root>/B13-*/, or None."""
    for folder in sorted(Path(build_root).glob("B13-*")):
        meta = folder / SFT_DIR / SFT_META
        if meta.is_file():
            try:
                if json.loads(meta.read_text(encoding="utf-8")).get("model") == model:
                    return meta.parent
            except (OSError, json.JSONDecodeError):
                continue
    return None


def load_sft(folder: Path, device: torch.device, dtype: torch.dtype = torch.float32,
             ) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, dict[str, Any]]:
    """B13's fine-tuned model in `dtype` (an adapter is merged into its base: one plain model), its tokenizer."""
    meta = json.loads((folder / SFT_META).read_text(encoding="utf-8"))
    tok = load_tokenizer(folder)
    if int(meta.get("lora_rank", 0)) <= 0:
        return load_model(folder, device, dtype), tok, meta
    from peft import PeftModel

    base = load_model(resolve(meta["model"]), device, dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return PeftModel.from_pretrained(base, folder).merge_and_unload(), tok, meta

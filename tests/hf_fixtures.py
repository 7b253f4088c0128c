"""Tiny Hugging Face checkpoints in the hub's own cache layout, built offline for the tests.

    train_tokenizer(text)                      byte-level BPE trained with `tokenizers` (+ a ChatML template)
    tiny_model("gpt2" | "llama" | "qwen2")     transformers' own classes, a few thousand parameters
    put_in_cache(cache, "org/name", folder)    <cache>/models--org--name/{refs/main, snapshots/<sha>/...}
    tiny_checkpoint(cache, "org/name", arch)   all three: what `from_pretrained` and huggingface_hub find

Nothing is downloaded: the tokenizer is trained on Tiny Shakespeare from ../shared/data and the weights are
random (or trained by the test). Point huggingface_hub at the cache with HF_HUB_CACHE (see `hub_env`).
"""
from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def corpus(chars: int = 200_000) -> str:
    return (SHARED / "tinyshakespeare.txt").read_text()[:chars]


def train_tokenizer(text: str | None = None, vocab_size: int = 512, chat: bool = True):
    """A byte-level BPE as a PreTrainedTokenizerFast; with chat, ChatML special tokens and template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>"] + (["<|im_start|>", "<|im_end|>"] if chat else [])
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([text or corpus()], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>" if chat else "<|endoftext|>",
                                   bos_token="<|endoftext|>", pad_token="<|endoftext|>", unk_token="<|endoftext|>")
    if chat:
        fast.chat_template = CHATML
    return fast


def tiny_model(arch: str, vocab_size: int, seed: int = 0, n_embd: int = 32, n_layer: int = 2, n_head: int = 2,
               ctx: int = 256):
    """A randomly initialised causal LM of the given architecture, built with transformers' own classes."""
    import torch
    import transformers as tf

    torch.manual_seed(seed)
    if arch == "gpt2":
        cfg = tf.GPT2Config(vocab_size=vocab_size, n_positions=ctx, n_embd=n_embd, n_layer=n_layer, n_head=n_head,
                            bos_token_id=0, eos_token_id=0)
        return tf.GPT2LMHeadModel(cfg)
    common = dict(vocab_size=vocab_size, hidden_size=n_embd, intermediate_size=4 * n_embd, num_hidden_layers=n_layer,
                  num_attention_heads=n_head, num_key_value_heads=max(1, n_head // 2),
                  max_position_embeddings=ctx, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    if arch == "llama":
        return tf.LlamaForCausalLM(tf.LlamaConfig(**common))
    if arch == "qwen2":
        return tf.Qwen2ForCausalLM(tf.Qwen2Config(**common, tie_word_embeddings=True))
    raise ValueError(f"unknown architecture {arch!r}: gpt2, llama or qwen2")


def repo_folder(cache: Path, repo_id: str, kind: str = "models") -> Path:
    return Path(cache) / f"{kind}--{repo_id.replace('/', '--')}"


def put_in_cache(cache: Path, repo_id: str, folder: Path, kind: str = "models") -> Path:
    """Copy `folder`'s files into the hub cache as the `main` revision of repo_id; return the snapshot folder."""
    files = sorted(p for p in Path(folder).rglob("*") if p.is_file())
    digest = hashlib.sha1(b"".join(p.read_bytes() for p in files)).hexdigest()  # noqa: S324 (a name, not security)
    repo = repo_folder(cache, repo_id, kind)
    snap = repo / "snapshots" / digest
    for p in files:
        dst = snap / p.relative_to(folder)
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(p, dst)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(digest)
    return snap


def tiny_checkpoint(cache: Path, repo_id: str, arch: str, chat: bool = True, seed: int = 0, model=None,
                    tokenizer=None) -> Path:
    """A tiny model and tokenizer saved with save_pretrained, placed in the hub cache; the snapshot folder."""
    import tempfile

    tok = tokenizer or train_tokenizer(chat=chat)
    model = model or tiny_model(arch, len(tok), seed=seed)
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        return put_in_cache(cache, repo_id, Path(tmp))


def hub_env(monkeypatch, cache: Path, offline: bool = True) -> None:
    """Point huggingface_hub (and transformers) at `cache`; offline unless told otherwise."""
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HOME", str(Path(cache).parent / "hf-home"))
    if offline:
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    else:
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)

"""What a pipeline model spec names, and how a node builds its stage of it.

    "random:gpt-tiny"          a preset GPT with seeded weights every node builds identically
    "/path/model.pt"           a tierkit checkpoint (models.gpt.save_checkpoint); its meta names the tokenizer
    "/path/hf-llama-folder"    a Hugging Face Llama-family folder (safetensors, tokenizer.json)

    resolve(spec) -> ModelSource         classified without loading weights (cheap: the agent checks launches)
    load_stage(src, (a, b)) -> model     only blocks a..b-1 (+ embedding on the first, norm + head on the last)
    vocabulary(src, meta) -> tokenizer   models/tokenizers.py's: char, byte, or the folder's own
    layout(spec, n_ctx) -> ModelLayout   the bytes placement divides, from the config alone
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tiers.tier3.engine import EngineError
from tiers.tier3.placement import ModelLayout, layout_from_config

NAME = "pipeline"

# Random-weight models every node builds identically from a seed (models.gpt's per-layer init).
PRESETS: dict[str, dict[str, Any]] = {
    "gpt-tiny": {"arch": "gpt2", "n_layer": 4, "n_head": 4, "n_embd": 64, "vocab_size": 256, "block_size": 256},
    "llama-tiny": {"arch": "llama", "n_layer": 4, "n_head": 4, "n_kv_head": 2, "n_embd": 64, "vocab_size": 256,
                   "block_size": 256},
    "gpt-30m": {"arch": "gpt2", "n_layer": 8, "n_head": 8, "n_embd": 512, "vocab_size": 8192, "block_size": 1024},
    "gpt-124m": {"arch": "gpt2", "n_layer": 12, "n_head": 12, "n_embd": 768, "vocab_size": 50304,
                 "block_size": 1024},
    "gpt-300m": {"arch": "gpt2", "n_layer": 24, "n_head": 16, "n_embd": 1024, "vocab_size": 50304,
                 "block_size": 1024},
    "llama-300m": {"arch": "llama", "n_layer": 24, "n_head": 16, "n_kv_head": 4, "n_embd": 1024,
                   "vocab_size": 32000, "block_size": 2048, "tie_weights": False},
}
DTYPES = {"float32": 4, "bfloat16": 2, "float16": 2}   # bytes per weight


@dataclass
class ModelSource:
    """A model spec resolved: its config and how to build a stage of it and its tokenizer."""

    spec: str
    kind: str          # "random" | "tierkit" | "hf"
    cfg: Any           # models.gpt.GPTConfig (None for a tierkit checkpoint until loaded)
    path: Path | None = None


def resolve(spec: str) -> ModelSource:
    """Classify a model spec without loading weights; EngineError (one line) when it names nothing usable."""
    if not isinstance(spec, str) or not spec:
        raise EngineError("model must be a non-empty string: random:<preset>, a tierkit checkpoint or an HF folder")
    if spec.startswith("random:"):
        preset = spec.split(":", 1)[1]
        if preset not in PRESETS:
            raise EngineError(f"unknown random preset {preset!r}; choose one of {', '.join(PRESETS)}")
        from models.gpt import GPTConfig

        return ModelSource(spec, "random", GPTConfig(**PRESETS[preset]))
    path = Path(spec).expanduser()
    if path.is_dir():
        from models.hf_llama import HFCheckpointError, config_from_hf

        try:
            cfg = config_from_hf(path)
        except HFCheckpointError as e:
            raise EngineError(str(e)) from None
        return ModelSource(spec, "hf", cfg, path=path)
    if path.is_file():
        return ModelSource(spec, "tierkit", None, path=path)
    raise EngineError(f"model {spec!r}: no such file or folder (give a tierkit checkpoint, a Hugging Face "
                      f"Llama folder, or random:<preset>)")


def torch_dtype(name: str) -> Any:
    import torch

    if name not in DTYPES:
        raise EngineError(f"dtype must be one of {', '.join(DTYPES)}, not {name!r}")
    return getattr(torch, name)


def load_stage(src: ModelSource, layers: tuple[int, int], seed: int = 0, dtype: str = "float32",
               device: str = "cpu") -> tuple[Any, dict[str, Any]]:
    """(the GPT stage holding only ``layers``, the checkpoint meta); EngineError with one line if it cannot."""
    from models.gpt import GPT, load_checkpoint

    td = torch_dtype(dtype)
    a, b = layers
    try:
        if src.kind == "random":
            model, meta = GPT(src.cfg, layers=range(a, b), seed=seed), {}
        elif src.kind == "hf":
            from models.hf_llama import load_llama_stage

            model, meta = load_llama_stage(src.path, range(a, b), dtype=td), {}
        else:
            model, ckpt = load_checkpoint(src.path, layers=range(a, b))
            src.cfg, meta = model.config, ckpt.get("meta") or {}
    except (ValueError, FileNotFoundError, OSError) as e:
        raise EngineError(f"cannot load layers {a}:{b} of {src.spec}: {str(e).splitlines()[0]}") from None
    return model.to(device=device, dtype=td).eval(), meta


def vocabulary(src: ModelSource, meta: dict[str, Any]) -> Any:
    """The tokenizer the model was trained with: the HF folder's, the checkpoint meta's characters, else bytes."""
    from models.tokenizers import ByteTokenizer, CharTokenizer, HFTokenizer

    if src.kind == "hf":
        try:
            return HFTokenizer(src.path)
        except ValueError as e:
            raise EngineError(str(e)) from None
    tok = meta.get("tokenizer") if isinstance(meta, dict) else None
    if isinstance(tok, dict) and tok.get("kind") == "char" and isinstance(tok.get("chars"), str):
        return CharTokenizer.from_chars(tok["chars"])
    if tok not in (None, "byte") and not (isinstance(tok, dict) and tok.get("kind") == "byte"):
        kind = tok.get("kind") if isinstance(tok, dict) else tok
        raise EngineError(f"{src.spec}: tokenizer {kind!r} in the checkpoint meta is not supported by the pipeline "
                          f"engine (char or byte)")
    if src.cfg.vocab_size < 256:
        raise EngineError(f"{src.spec}: no tokenizer in the checkpoint meta and a vocabulary of "
                          f"{src.cfg.vocab_size} < 256 bytes; save it with meta={{'tokenizer': ...}}")
    return ByteTokenizer()


def layout(model: str, n_ctx: int, dtype: str = "float32") -> ModelLayout:
    """Per-block bytes of the model at `dtype`, with its KV cache at n_ctx (capped at its context)."""
    src = resolve(model)
    cfg = src.cfg
    if cfg is None:  # a tierkit checkpoint: its config is inside; the meta device reads no weights
        import torch

        from models.gpt import GPTConfig

        try:
            ckpt = torch.load(src.path, map_location="meta", weights_only=False, mmap=True)
            cfg = GPTConfig(**ckpt["config"]) if isinstance(ckpt.get("config"), dict) else ckpt["config"]
        except Exception as e:  # noqa: BLE001 - torch raises many kinds for a file that is not a checkpoint
            raise EngineError(f"{model}: not a readable tierkit checkpoint ({type(e).__name__}: "
                              f"{str(e).splitlines()[0][:120] if str(e) else ''})") from None
    return layout_from_config(cfg, name=model, dtype_bytes=DTYPES.get(dtype, 4), n_ctx=min(n_ctx, cfg.block_size))

"""A local Hugging Face Llama-family checkpoint as models.gpt's llama flavour, one layer range at a time.

The folder is what ``save_pretrained`` writes: ``config.json`` plus one or more
``*.safetensors`` (sharded ones listed in ``model.safetensors.index.json``).
A pipeline stage needs only its own blocks, so it opens the safetensors files
with ``safe_open`` and reads just the tensors of its layers (plus the embedding
on the first stage, the final norm and output matrix on the last): a node never
reads, let alone holds, the other nodes' weights.

The mapping is direct because models.gpt uses Hugging Face's rotary layout
(rotate_half over the two halves of a head), so q and k need no permutation:

    model.embed_tokens                         -> transformer.wte
    model.layers.i.input_layernorm             -> transformer.h.i.ln_1
    model.layers.i.self_attn.{q,k,v}_proj      -> transformer.h.i.attn.c_attn   (stacked q, k, v)
    model.layers.i.self_attn.o_proj            -> transformer.h.i.attn.c_proj
    model.layers.i.post_attention_layernorm    -> transformer.h.i.ln_2
    model.layers.i.mlp.{gate,up,down}_proj     -> transformer.h.i.mlp.{gate,up,c_proj}
    model.norm                                 -> transformer.ln_f
    lm_head (or embed_tokens when tied)        -> lm_head

What models.gpt cannot express (biases in attention or MLP, scaled rotary
positions, a head size other than hidden/heads, sliding windows) is refused with
one line naming the field, rather than loaded into a model that is quietly wrong.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from models.gpt import GPT, GPTConfig

MODEL_TYPES = ("llama", "mistral")   # same tensor layout; mistral only without a sliding window


class HFCheckpointError(ValueError):
    """The folder is not a Llama-family checkpoint this loader can map; str() is one line."""


def read_config(folder: str | Path) -> dict[str, Any]:
    folder = Path(folder)
    path = folder / "config.json"
    if not path.is_file():
        raise HFCheckpointError(f"{folder}: no config.json (expected a Hugging Face model folder from save_pretrained)")
    try:
        cfg = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise HFCheckpointError(f"{path}: not readable JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise HFCheckpointError(f"{path}: expected a JSON object")
    return cfg


def config_from_hf(folder: str | Path) -> GPTConfig:
    """The GPTConfig (arch "llama") equivalent to the folder's config.json, or one line naming what differs."""
    hf = read_config(folder)
    where = Path(folder) / "config.json"
    mt = hf.get("model_type")
    if mt not in MODEL_TYPES:
        raise HFCheckpointError(f"{where}: model_type {mt!r} is not a Llama-family model ({', '.join(MODEL_TYPES)})")
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size"):
        if not isinstance(hf.get(key), int):
            raise HFCheckpointError(f"{where}: missing integer field {key!r}")
    if hf.get("hidden_act", "silu") != "silu":
        raise HFCheckpointError(f"{where}: hidden_act {hf['hidden_act']!r} (only silu, the SwiGLU of Llama, is supported)")
    for key in ("attention_bias", "mlp_bias"):
        if hf.get(key):
            raise HFCheckpointError(f"{where}: {key} is true; models.gpt's llama flavour has no biases")
    if hf.get("sliding_window") not in (None, 0) and hf["sliding_window"] < hf.get("max_position_embeddings", 0):
        raise HFCheckpointError(f"{where}: sliding_window {hf['sliding_window']} is not supported (full attention only)")
    rope = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    rope_type = scaling.get("rope_type", scaling.get("type")) or rope.get("rope_type") or "default"
    if rope_type != "default":
        raise HFCheckpointError(f"{where}: rope scaling {rope_type!r} is not supported (plain rotary positions only)")
    theta = hf.get("rope_theta", rope.get("rope_theta", 10000.0))
    n_embd, n_head = hf["hidden_size"], hf["num_attention_heads"]
    head_dim = hf.get("head_dim")
    if head_dim not in (None, n_embd // n_head) or n_embd % n_head:
        raise HFCheckpointError(f"{where}: head_dim {head_dim} is not hidden_size/num_attention_heads "
                                f"({n_embd}/{n_head}); models.gpt cannot hold that")
    try:
        return GPTConfig(vocab_size=hf["vocab_size"], block_size=int(hf.get("max_position_embeddings", 2048)),
                         n_layer=hf["num_hidden_layers"], n_head=n_head, n_embd=n_embd, bias=False, arch="llama",
                         n_kv_head=hf.get("num_key_value_heads") or n_head, ffn_hidden=hf["intermediate_size"],
                         tie_weights=bool(hf.get("tie_word_embeddings", False)),
                         norm_eps=float(hf.get("rms_norm_eps", 1e-6)), rope_theta=float(theta))
    except ValueError as e:
        raise HFCheckpointError(f"{where}: {e}") from None


def tensor_files(folder: str | Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file holding it (the shard index when there is one, else every file's keys)."""
    from safetensors import safe_open

    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
            raise HFCheckpointError(f"{index}: not a safetensors shard index ({e})") from None
        return {name: folder / f for name, f in weight_map.items()}
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise HFCheckpointError(f"{folder}: no *.safetensors files (pytorch_model.bin is not supported: "
                                f"re-save with save_pretrained(..., safe_serialization=True))")
    out: dict[str, Path] = {}
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as st:
                out.update(dict.fromkeys(st.keys(), f))
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
            raise HFCheckpointError(f"{f}: not a readable safetensors file ({e})") from None
    return out


def stage_tensor_names(cfg: GPTConfig, layers: range) -> dict[str, list[str]]:
    """Our parameter name -> the Hugging Face tensor(s) it is made of, for the stage ``layers``."""
    m: dict[str, list[str]] = {}
    if layers.start == 0:
        m["transformer.wte.weight"] = ["model.embed_tokens.weight"]
    for i in layers:
        hf, ours = f"model.layers.{i}.", f"transformer.h.{i}."
        m[ours + "ln_1.weight"] = [hf + "input_layernorm.weight"]
        m[ours + "attn.c_attn.weight"] = [hf + f"self_attn.{p}_proj.weight" for p in "qkv"]
        m[ours + "attn.c_proj.weight"] = [hf + "self_attn.o_proj.weight"]
        m[ours + "ln_2.weight"] = [hf + "post_attention_layernorm.weight"]
        m[ours + "mlp.gate.weight"] = [hf + "mlp.gate_proj.weight"]
        m[ours + "mlp.up.weight"] = [hf + "mlp.up_proj.weight"]
        m[ours + "mlp.c_proj.weight"] = [hf + "mlp.down_proj.weight"]
    if layers.stop == cfg.n_layer:
        m["transformer.ln_f.weight"] = ["model.norm.weight"]
        m["lm_head.weight"] = ["lm_head.weight"]
    return m


def load_llama_stage(folder: str | Path, layers: range | tuple[int, int] | None = None,
                     dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> GPT:
    """The stage ``layers`` (default: all) of the checkpoint in ``folder``, reading only that stage's tensors."""
    from safetensors import safe_open

    folder = Path(folder)
    cfg = config_from_hf(folder)
    lo, hi = (0, cfg.n_layer) if layers is None else (layers.start, layers.stop) if isinstance(layers, range) \
        else tuple(layers)
    if not 0 <= lo < hi <= cfg.n_layer:
        raise HFCheckpointError(f"{folder}: layer range {lo}:{hi} is not inside 0:{cfg.n_layer}")
    where = tensor_files(folder)
    if cfg.tie_weights and "lm_head.weight" not in where:
        where["lm_head.weight"] = where.get("model.embed_tokens.weight")  # tied: the output matrix is the embedding
    wanted = stage_tensor_names(cfg, range(lo, hi))
    missing = [n for names in wanted.values() for n in names if where.get(n) is None]
    if missing:
        raise HFCheckpointError(f"{folder}: the checkpoint lacks {len(missing)} tensor(s) of layers {lo}:{hi}, "
                                f"e.g. {missing[0]}")
    with torch.device("meta"):   # no time spent drawing random weights that are overwritten next
        model = GPT(cfg, layers=range(lo, hi))
    model = model.to_empty(device=device).to(dtype)
    handles: dict[Path, Any] = {}
    try:
        state: dict[str, torch.Tensor] = {}
        for ours, names in wanted.items():
            parts = []
            for n in names:
                f = where[n]
                if f not in handles:
                    handles[f] = safe_open(str(f), framework="pt", device="cpu")
                parts.append(handles[f].get_tensor(n))
            state[ours] = torch.cat(parts, dim=0) if len(parts) > 1 else parts[0]
    finally:
        handles.clear()
    own = model.state_dict()
    for name, t in state.items():
        if tuple(t.shape) != tuple(own[name].shape):
            raise HFCheckpointError(f"{folder}: {wanted[name][0]} has shape {tuple(t.shape)}, "
                                    f"config.json implies {tuple(own[name].shape)} for {name}")
    # a tied first-and-last stage shares one matrix: loading wte also sets lm_head
    model.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False, assign=False)
    unset = [k for k in own if k not in state]
    if unset:
        raise HFCheckpointError(f"{folder}: no tensor maps to {unset[0]} (a mapping this loader lacks)")
    return model.eval()

"""GGUF files for the tests, built offline: a Hugging Face Llama converted with the `gguf` package.

    hf_llama_to_gguf(folder, out)     config.json + tokenizer.json + model.safetensors -> an F32 llama GGUF
    registry_gguf(cache, name, path)  a GGUF placed in a Hugging Face cache as registry entry `name`'s file

The conversion is what llama.cpp's convert_hf_to_gguf.py does for a Llama with a byte-level BPE
tokenizer (that script is not installed here): the hyperparameters as llama.* keys, the
tokenizer's vocabulary and merges as tokenizer.ggml.* (its tokens are already spelt in GPT-2's
byte alphabet), and the tensors renamed, with W_q and W_k rows moved from Hugging Face's
half-split rotary layout to GGML's interleaved one (models.gguf_export's permutation).
"""
from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import numpy as np

LAYER = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
         "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
         "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}


def _tensors(sd: dict[str, np.ndarray], cfg: dict) -> dict[str, np.ndarray]:
    from models.gguf_export import _permute_rotary

    nh, nkv = cfg["num_attention_heads"], cfg.get("num_key_value_heads") or cfg["num_attention_heads"]
    out = {"token_embd.weight": sd["model.embed_tokens.weight"], "output_norm.weight": sd["model.norm.weight"]}
    if "lm_head.weight" in sd and not cfg.get("tie_word_embeddings"):
        out["output.weight"] = sd["lm_head.weight"]
    for i in range(cfg["num_hidden_layers"]):
        for hf, gg in LAYER.items():
            w = sd[f"model.layers.{i}.{hf}.weight"]
            if gg in ("attn_q", "attn_k"):
                w = _permute_rotary(w, nh if gg == "attn_q" else nkv)
            out[f"blk.{i}.{gg}.weight"] = w
    return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in out.items()}


def _vocab(tok: dict) -> tuple[list[str], list[int], list[str]]:
    """(tokens by id, their GGUF token types, merges as "a b") from a tokenizer.json."""
    import gguf

    ids = dict(tok["model"]["vocab"])
    special = {a["content"] for a in tok.get("added_tokens", []) if a.get("special")}
    ids.update({a["content"]: a["id"] for a in tok.get("added_tokens", [])})
    tokens = [t for t, _ in sorted(ids.items(), key=lambda kv: kv[1])]
    types = [int(gguf.TokenType.CONTROL if t in special else gguf.TokenType.NORMAL) for t in tokens]
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]
    return tokens, types, merges


def hf_llama_to_gguf(folder: Path, out: Path, name: str = "tiny-llama") -> Path:
    """A Hugging Face LlamaForCausalLM folder (one model.safetensors) as an F32 llama-architecture GGUF."""
    import gguf
    from safetensors.numpy import load_file

    folder = Path(folder)
    cfg = json.loads((folder / "config.json").read_text())
    tok = json.loads((folder / "tokenizer.json").read_text())
    tok_cfg = json.loads((folder / "tokenizer_config.json").read_text())
    tokens, types, merges = _vocab(tok)
    w = gguf.GGUFWriter(str(out), "llama")
    w.add_name(name)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_vocab_size(len(tokens))
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg.get("num_key_value_heads") or cfg["num_attention_heads"])
    w.add_rope_dimension_count(cfg["hidden_size"] // cfg["num_attention_heads"])
    w.add_rope_freq_base(float(cfg.get("rope_theta") or (cfg.get("rope_parameters") or {}).get("rope_theta", 1e4)))
    w.add_layer_norm_rms_eps(float(cfg["rms_norm_eps"]))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_add_bos_token(False)                      # the tokenizer adds no BOS (no post-processor)
    w.add_bos_token_id(tokens.index(tok_cfg.get("bos_token") or tokens[0]))
    w.add_eos_token_id(tokens.index(tok_cfg.get("eos_token") or tokens[0]))
    if tok_cfg.get("chat_template"):
        w.add_chat_template(tok_cfg["chat_template"])
    for n, arr in _tensors(load_file(str(folder / "model.safetensors")), cfg).items():
        w.add_tensor(n, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return Path(out)


def registry_gguf(cache: Path, files: dict[str, Path]) -> dict[str, Path]:
    """Each GGUF placed in the Hugging Face cache as the file of registry entry `name` ({name: gguf});
    entries of one repository go into one snapshot. Returns {name: path in the cache}."""
    from tests.hf_fixtures import put_in_cache
    from tiers import data

    by_repo: dict[str, list[tuple[str, Path]]] = {}
    for name, path in files.items():
        by_repo.setdefault(data.get(name).repo_id, []).append((name, Path(path)))
    out = {}
    for repo, items in by_repo.items():
        with tempfile.TemporaryDirectory() as tmp:
            for name, path in items:
                shutil.copyfile(path, Path(tmp) / data.get(name).target)
            snap = put_in_cache(cache, repo, Path(tmp))
        out.update({name: snap / data.get(name).target for name, _ in items})
    return out


def greedy_tokens(llm, prompt: str, n: int) -> list[int]:
    """Greedy tokens from a llama_cpp.Llama alone (one sequence, its own context): up to n, or to EOS."""
    out: list[int] = []
    for t in llm.generate(llm.tokenize(prompt.encode(), add_bos=True, special=True), temp=0.0, top_k=0,
                          top_p=1.0, min_p=0.0):
        if t == llm.token_eos() or len(out) == n:
            break
        out.append(t)
    return out

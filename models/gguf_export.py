"""Export a models.gpt model (either flavour) to a GGUF file that llama.cpp runs (B16, tier-3 references).

    export_gguf(model, tokenizer, path)   the model as an F32 GGUF: llama flavour -> llama.cpp's "llama"
                                          architecture, gpt2 flavour -> its "gpt2" architecture
    vocab_from(tokenizer, vocab_size)     the id -> piece list of a char or byte tokenizer
    byte_level(vocab)                     the tokens and merges llama.cpp's "gpt2" tokenizer needs
    gguf_summary(path)                    what a GGUF holds (architecture, sizes, tensor types), or one-line ValueError

How our llama flavour maps onto llama.cpp's LLM_ARCH_LLAMA (what convert_hf_to_gguf.py
does for a Hugging Face Llama; our layout is Hugging Face's):

    transformer.wte              -> token_embd          (also the output matrix when tied: no output.weight)
    h.N.ln_1 / h.N.ln_2          -> blk.N.attn_norm / blk.N.ffn_norm   (RMSNorm weights, F32)
    h.N.attn.c_attn  (q|k|v)     -> blk.N.attn_q / attn_k / attn_v     (split; q and k permuted, below)
    h.N.attn.c_proj              -> blk.N.attn_output
    h.N.mlp.gate / up / c_proj   -> blk.N.ffn_gate / ffn_up / ffn_down (SwiGLU: down(silu(gate x) * up x))
    transformer.ln_f / lm_head   -> output_norm / output

How our gpt2 flavour maps onto llama.cpp's LLM_ARCH_GPT2 (every Linear and LayerNorm has
a .weight and a .bias there):

    transformer.wte / wpe        -> token_embd / position_embd   ({n_embd, n_vocab} / {n_embd, block_size})
    h.N.ln_1 / h.N.ln_2          -> blk.N.attn_norm / blk.N.ffn_norm   (LayerNorm weight and bias)
    h.N.attn.c_attn  (q|k|v)     -> blk.N.attn_qkv      (kept fused: llama.cpp splits q, k, v by rows as we do)
    h.N.attn.c_proj              -> blk.N.attn_output
    h.N.mlp.c_fc / c_proj        -> blk.N.ffn_up / ffn_down      (GELU between them)
    transformer.ln_f / lm_head   -> output_norm / output         (output.weight only when untied)

llama.cpp refuses a gpt2 file that lacks any of these biases, so a model built with
bias=False gets zero biases (the same function: a LayerNorm without bias is one plus 0).
llama.cpp's GELU is the tanh approximation, read from a half-precision table; ours is the
exact erf form: logits agree to a few parts in 10^4 of their size, not bit for bit.

Rotary layout (llama). Our RoPE (Hugging Face's) rotates the pair (i, i + d/2) of each head;
llama.cpp's LLAMA rope ("normal" mode) rotates the pair (2i, 2i + 1). Both turn pair i
by the same angle, so the fix is a fixed reordering of the rows of W_q and W_k inside
each head: new row 2i+j = old row j*d/2 + i. The attention scores q.k are unchanged
because the same permutation is applied to q and k (per kv head for k).

Dimensions. numpy arrays go in row-major as torch stores them, (out, in); GGUF lists
dimensions fastest-first, so llama.cpp sees {in, out}, which is what it expects
(token_embd is {n_embd, n_vocab}).

Tokenizer. A char-level vocabulary is written as llama.cpp's byte-level BPE ("gpt2")
tokenizer with no merges between characters: each token is one character, spelt in
GPT-2's byte-to-unicode alphabet (space is "Ġ", newline "Ċ"), so llama.cpp's
detokenizer turns ids back into the exact UTF-8 text. A character of 2-4 UTF-8 bytes
is 2-4 byte symbols in that alphabet; merges that rebuild exactly those characters are
added, so llama.cpp's own tokenizer also finds non-ASCII characters (without them it
would drop them). llama.cpp refuses a "gpt2" vocabulary without a merges list and the
gguf package refuses to write an empty one, so an ASCII-only vocabulary gets one merge
entry without a space, which llama.cpp reads as the pair ("", "") that no symbol ever
forms. Why not SentencePiece ("llama")? Its tokenizer falls back to <0xNN> byte tokens
for any character not in the vocabulary, and a char vocabulary has none: an unknown
character would abort llama.cpp. A char model has no end-of-text token; llama.cpp's
BPE loader defaults EOS to id 11 (a character), so EOS is set to the newline when
there is one: llama.cpp's own tools then stop at the end of a line (--ignore-eos runs on).

A byte vocabulary (models.tokenizers.ByteTokenizer: ids 0-255 are the UTF-8 bytes) is the
same tokenizer with one byte symbol per id and no merges, so llama.cpp tokenizes text into
exactly the bytes. A model whose vocab_size is larger (padded, as random-weight models
are) gets one placeholder per id from 256 on, "<|unused_N|>", of token type UNUSED:
llama.cpp never forms them from text (no merges build them and they are not special)
and detokenizes them to nothing; they keep the vocabulary one token per embedding row.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from inventory.files import atomic_path

NO_MERGE = "<no-merges>"   # read by llama.cpp as the pair ("", ""), which never occurs


class ExportError(ValueError):
    """Why a model cannot become a GGUF; str() is one line naming the fix."""


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table: printable Latin-1 bytes stand for
    themselves, the other 68 bytes (controls, space, ...) take the characters from U+0100 on."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def byte_level(vocab: Sequence[str | bytes | None]) -> tuple[list[str], list[str]]:
    """(token texts in byte-level spelling, merges that rebuild each multi-byte piece). A piece is
    text (spelt from its UTF-8 bytes), bytes (spelt as they are) or None (the placeholder "<|unused_N|>")."""
    table = bytes_to_unicode()
    tokens, merges, seen = [], [], set()
    for i, piece in enumerate(vocab):
        if piece is None:
            tokens.append(f"<|unused_{i}|>")
            continue
        if not isinstance(piece, (str, bytes)) or not piece:
            raise ExportError(f"token {i} is {piece!r}: a GGUF vocabulary needs a non-empty string per id")
        raw = piece.encode("utf-8") if isinstance(piece, str) else piece
        spelt = "".join(table[b] for b in raw)
        tokens.append(spelt)
        for k in range(1, len(spelt)):  # "a b", "ab c", ...: left to right, one byte at a time
            m = f"{spelt[:k]} {spelt[k]}"
            if m not in seen:
                seen.add(m)
                merges.append(m)
    if len(set(tokens)) != len(tokens):
        dup = next(t for t in tokens if tokens.count(t) > 1)
        raise ExportError(f"the vocabulary holds {dup!r} twice; llama.cpp needs every token once")
    return tokens, merges or [NO_MERGE]


def vocab_from(tokenizer: Any, vocab_size: int | None = None) -> list[str | bytes | None]:
    """The id -> piece list from a tokenizer meta dict ({"kind": "char", "chars": ...} or
    {"kind": "byte"}), an object with .meta(), or a plain sequence of strings. A byte vocabulary
    is the 256 single bytes, then None for each id up to `vocab_size` (ids no text forms)."""
    if hasattr(tokenizer, "meta") and callable(tokenizer.meta):
        tokenizer = tokenizer.meta()
    if isinstance(tokenizer, dict):
        kind = tokenizer.get("kind")
        if kind == "byte":
            n = 256 if vocab_size is None else vocab_size
            if n < 256:
                raise ExportError(f"a byte vocabulary needs 256 ids but the model's vocab_size is {n}: "
                                  "export with the tokenizer the model was trained with")
            return [bytes([b]) for b in range(256)] + [None] * (n - 256)
        if kind != "char":
            raise ExportError(f"GGUF export writes char-level and byte vocabularies; this tokenizer is "
                              f"{kind!r}: train the model with the char or byte tokenizer")
        chars = tokenizer.get("chars")
        return list(chars) if isinstance(chars, str) else list(chars or [])
    return list(tokenizer)


def _permute_rotary(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Rows of W_q or W_k from Hugging Face's half-split rotary layout to GGML's interleaved one."""
    out_dim = w.shape[0]
    hd = out_dim // n_heads
    return w.reshape(n_heads, 2, hd // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _whole_state(model: Any, arch: str, why: str) -> dict[str, np.ndarray]:
    """The float32 state dict of a whole models.gpt.GPT of flavour `arch`; ExportError otherwise."""
    cfg = model.config
    if cfg.arch != arch:
        raise ExportError(f"this is a {cfg.arch}-flavour model; {why}")
    if not (getattr(model, "has_embed", True) and getattr(model, "has_head", True)):
        raise ExportError("this is a pipeline stage (a layer range), not the whole model: load the full checkpoint")
    return {k: v.detach().float().cpu().numpy() for k, v in model.state_dict().items()}


def llama_tensors(model: Any) -> dict[str, np.ndarray]:
    """GGUF tensor name -> float32 array for a whole llama-flavour models.gpt.GPT."""
    cfg = model.config
    sd = _whole_state(model, "llama", "llama.cpp's llama architecture needs arch='llama' (RMSNorm, RoPE, SwiGLU)")
    hd, nh, nkv = cfg.head_dim, cfg.n_head, cfg.kv_heads
    t = {"token_embd.weight": sd["transformer.wte.weight"]}
    for i in range(cfg.n_layer):
        p, b = f"transformer.h.{i}.", f"blk.{i}."
        qkv = sd[p + "attn.c_attn.weight"]
        q, k, v = qkv[:nh * hd], qkv[nh * hd:(nh + nkv) * hd], qkv[(nh + nkv) * hd:]
        t[b + "attn_norm.weight"] = sd[p + "ln_1.weight"]
        t[b + "attn_q.weight"] = _permute_rotary(q, nh)
        t[b + "attn_k.weight"] = _permute_rotary(k, nkv)
        t[b + "attn_v.weight"] = v
        t[b + "attn_output.weight"] = sd[p + "attn.c_proj.weight"]
        t[b + "ffn_norm.weight"] = sd[p + "ln_2.weight"]
        t[b + "ffn_gate.weight"] = sd[p + "mlp.gate.weight"]
        t[b + "ffn_up.weight"] = sd[p + "mlp.up.weight"]
        t[b + "ffn_down.weight"] = sd[p + "mlp.c_proj.weight"]
    t["output_norm.weight"] = sd["transformer.ln_f.weight"]
    if not cfg.tie_weights:  # tied: llama.cpp reuses token_embd when output.weight is absent
        t["output.weight"] = sd["lm_head.weight"]
    return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in t.items()}


GPT2_LAYER = {"ln_1": "attn_norm", "attn.c_attn": "attn_qkv", "attn.c_proj": "attn_output",
              "ln_2": "ffn_norm", "mlp.c_fc": "ffn_up", "mlp.c_proj": "ffn_down"}


def gpt2_tensors(model: Any) -> dict[str, np.ndarray]:
    """GGUF tensor name -> float32 array for a whole gpt2-flavour models.gpt.GPT; a bias the
    model lacks (bias=False) is written as zeros, since llama.cpp's gpt2 requires every one."""
    cfg = model.config
    sd = _whole_state(model, "gpt2", "llama.cpp's gpt2 architecture needs arch='gpt2' "
                                     "(LayerNorm, learned positions, GELU)")

    def pair(ours: str, theirs: str) -> dict[str, np.ndarray]:
        w = sd[ours + ".weight"]
        return {theirs + ".weight": w, theirs + ".bias": sd.get(ours + ".bias", np.zeros(w.shape[0], np.float32))}

    t = {"token_embd.weight": sd["transformer.wte.weight"], "position_embd.weight": sd["transformer.wpe.weight"]}
    for i in range(cfg.n_layer):
        for ours, theirs in GPT2_LAYER.items():
            t.update(pair(f"transformer.h.{i}.{ours}", f"blk.{i}.{theirs}"))
    t.update(pair("transformer.ln_f", "output_norm"))
    if not cfg.tie_weights:  # tied: llama.cpp's gpt2 reuses token_embd when output.weight is absent
        t["output.weight"] = sd["lm_head.weight"]
    return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in t.items()}


def _hparams(w: Any, cfg: Any) -> None:
    """The architecture's keys: sizes for both flavours, then rotary and RMSNorm (llama) or LayerNorm (gpt2)."""
    w.add_vocab_size(cfg.vocab_size)
    w.add_context_length(cfg.block_size)
    w.add_embedding_length(cfg.n_embd)
    w.add_block_count(cfg.n_layer)
    w.add_feed_forward_length(cfg.hidden)
    w.add_head_count(cfg.n_head)
    w.add_head_count_kv(cfg.kv_heads)
    if cfg.arch == "llama":
        w.add_rope_dimension_count(cfg.head_dim)
        w.add_rope_freq_base(float(cfg.rope_theta))
        w.add_layer_norm_rms_eps(float(cfg.norm_eps))
    else:
        w.add_layer_norm_eps(float(cfg.norm_eps))


def _vocabulary(w: Any, vocab: list[str | bytes | None], eos: str | None) -> None:
    """tokenizer.ggml.*: byte-level BPE tokens and merges; placeholders (None) are UNUSED; BOS = EOS = `eos`'s id."""
    import gguf

    tokens, merges = byte_level(vocab)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list(tokens)
    w.add_token_types([gguf.TokenType.UNUSED if p is None else gguf.TokenType.NORMAL for p in vocab])
    w.add_token_merges(merges)
    w.add_add_bos_token(False)           # a char or byte model never saw a BOS token
    bytewise = any(isinstance(p, bytes) for p in vocab)
    key = eos.encode("utf-8") if bytewise and eos is not None else eos
    special = vocab.index(key) if key is not None and key in vocab else 0
    w.add_bos_token_id(special)
    w.add_eos_token_id(special)


def export_gguf(model: Any, tokenizer: Any, path: str | Path, name: str = "tierkit-gpt",
                eos: str | None = "\n") -> Path:
    """Write `model` (a whole models.gpt.GPT, either flavour) with its char or byte vocabulary to
    `path` as an F32 GGUF of llama.cpp's architecture of the same name ("llama" or "gpt2"),
    atomically (inventory.files.atomic_path: a temporary file beside it, then rename).
    `eos`: the piece llama.cpp's tools stop at (its id is also BOS; none: id 0)."""
    import gguf

    cfg = model.config
    vocab = vocab_from(tokenizer, cfg.vocab_size)
    if len(vocab) != cfg.vocab_size:
        raise ExportError(f"the tokenizer has {len(vocab)} tokens but the model's vocab_size is {cfg.vocab_size}: "
                          "llama.cpp needs one token per embedding row; export with the model's own tokenizer")
    if cfg.arch not in ("llama", "gpt2"):
        raise ExportError(f"llama.cpp export knows the llama and gpt2 flavours, not {cfg.arch!r}")
    tensors = gpt2_tensors(model) if cfg.arch == "gpt2" else llama_tensors(model)

    path = Path(path)
    with atomic_path(path) as tmp:
        w = gguf.GGUFWriter(str(tmp), cfg.arch)
        w.add_name(name)
        w.add_file_type(gguf.LlamaFileType.ALL_F32)
        _hparams(w, cfg)
        _vocabulary(w, vocab, eos)
        for n, arr in tensors.items():
            w.add_tensor(n, arr)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    return path


def gguf_summary(path: str | Path) -> dict[str, Any]:
    """What a GGUF file holds, read with the gguf package (no llama.cpp): architecture, name,
    context length, parameter count, bytes, the count of tensors per type. ValueError, one line,
    when the file is missing or not a readable GGUF."""
    import gguf

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such GGUF file; give the path of a .gguf model")
    try:
        r = gguf.GGUFReader(str(path))
    except Exception as e:  # noqa: BLE001 - the reader raises many kinds for a bad file
        raise ValueError(f"{path}: not a readable GGUF file ({type(e).__name__}: {str(e).splitlines()[0][:100] if str(e) else ''}); "
                         "re-download or re-export it") from None

    def field(key: str) -> Any:
        f = r.fields.get(key)
        if f is None:
            return None
        v = f.contents()
        return v

    arch = field("general.architecture")
    types: dict[str, int] = {}
    params = 0
    for t in r.tensors:
        types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1
        params += int(np.prod([int(x) for x in t.shape]))
    return {"path": str(path), "bytes": path.stat().st_size, "architecture": arch, "name": field("general.name"),
            "context_length": field(f"{arch}.context_length"), "n_embd": field(f"{arch}.embedding_length"),
            "n_layer": field(f"{arch}.block_count"), "n_head": field(f"{arch}.attention.head_count"),
            "n_vocab": len(r.fields["tokenizer.ggml.tokens"].data) if "tokenizer.ggml.tokens" in r.fields else None,
            "tokenizer": field("tokenizer.ggml.model"), "file_type": field("general.file_type"),
            "params": params, "tensor_types": types}

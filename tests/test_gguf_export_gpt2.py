"""models.gguf_export on the gpt2 flavour and on byte vocabularies: llama.cpp runs the file as torch does.

Tiny gpt2-flavour models (2 layers, 32 wide) are trained for a moment on a short text, so
their greedy continuations are not degenerate, then exported: with biases, without
(llama.cpp gets zero biases), with an untied output matrix, with grouped-query attention.
Checked: llama.cpp's greedy tokens equal GPT.generate's, its logits equal torch's up to
the GELU approximation, its tokenizer reads the char vocabulary. A random-weight model
with models.tokenizers.ByteTokenizer and a padded vocabulary (300 ids) loads, tokenizes
text into its bytes and generates what torch generates. gguf_summary counts the
parameters; bad input is one line and leaves no file.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
llama_cpp = pytest.importorskip("llama_cpp")
gguf = pytest.importorskip("gguf")

from models.gguf_export import ExportError, byte_level, export_gguf, gguf_summary, vocab_from
from models.gpt import GPT, GPTConfig
from models.tokenizers import ByteTokenizer

TEXT = ("the quick brown fox jumps over the lazy dog.\n"
        "a wizard's job is to vex chumps quickly in fog!\n"
        "pack my box with five dozen liquor jugs, then sing?\n") * 4
CHARS = sorted(set(TEXT))
PROMPT = "the quick b"
N_NEW = 24
VARIANTS = {
    "bias": {},
    "no-bias": {"bias": False},
    "untied": {"tie_weights": False},
    "gqa": {"n_head": 4, "n_kv_head": 2},
}


def tiny_config(**over) -> GPTConfig:
    return GPTConfig(**{"vocab_size": len(CHARS), "block_size": 64, "n_layer": 2, "n_head": 2, "n_embd": 32,
                        "arch": "gpt2", "dropout": 0.0, **over})


def encode(s: str) -> list[int]:
    return [CHARS.index(c) for c in s]


def train_briefly(model: GPT, steps: int = 60) -> GPT:
    """A few AdamW steps on TEXT (random windows of 32), so greedy decoding follows the text."""
    torch.set_num_threads(1)
    ids = torch.tensor(encode(TEXT))
    g = torch.Generator().manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(steps):
        starts = torch.randint(0, len(ids) - 33, (16,), generator=g)
        x = torch.stack([ids[s:s + 32] for s in starts])
        y = torch.stack([ids[s + 1:s + 33] for s in starts])
        _, loss = model(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@contextlib.contextmanager
def llama(path: Path, logits_all: bool = False) -> Iterator[llama_cpp.Llama]:
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, n_threads=1, n_threads_batch=1, logits_all=logits_all,
                          verbose=False)
    try:
        yield llm
    finally:
        llm.close()


def llama_greedy(llm: llama_cpp.Llama, ids: list[int], n: int) -> list[int]:
    """n greedy tokens after the prompt ids (EOS does not stop it: a char or byte EOS is a real token)."""
    out: list[int] = []
    for t in llm.generate(ids, temp=0.0, top_k=0, top_p=1.0, min_p=0.0, reset=True):
        out.append(t)
        if len(out) == n:
            break
    return out


def torch_greedy(model: GPT, ids: list[int], n: int) -> list[int]:
    with torch.no_grad():
        return model.generate(torch.tensor([ids]), n, temperature=0)[0, len(ids):].tolist()


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict[str, tuple[GPT, Path]]:
    """Each variant trained briefly and exported once: {variant: (model, F32 GGUF)}."""
    out = {}
    folder = tmp_path_factory.mktemp("gguf-gpt2")
    for name, over in VARIANTS.items():
        model = train_briefly(GPT(tiny_config(**over), seed=1))
        out[name] = model, export_gguf(model, CHARS, folder / f"{name}.gguf", name=f"tiny-{name}")
    return out


# ---------------------------------------------------------------- the gpt2 flavour runs as in torch

@pytest.mark.parametrize("variant", list(VARIANTS))
def test_gpt2_greedy_tokens_match_torch(exported, variant):
    model, path = exported[variant]
    prompt = encode(PROMPT)
    want = torch_greedy(model, prompt, N_NEW)
    with llama(path) as llm:
        assert llm.tokenize(PROMPT.encode(), add_bos=True, special=True) == prompt   # no BOS is added
        got = llama_greedy(llm, prompt, N_NEW)
    text = "".join(CHARS[i] for i in want)
    assert got == want, ("".join(CHARS[i] for i in got), text)
    assert len(set(want)) > 4, f"degenerate continuation {text!r}: the test model did not train"


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_gpt2_logits_match_torch(exported, variant):
    model, path = exported[variant]
    prompt = encode("pack my box with five")
    with llama(path, logits_all=True) as llm:
        llm.eval(prompt)
        got = np.array(llm.scores[:len(prompt)])
    with torch.no_grad():
        ref = model.logits(torch.tensor([prompt]))[0].numpy()
    # llama.cpp's GELU is the tanh approximation from a half-precision table; ours is erf
    assert np.abs(got - ref).max() < 1e-3 * np.abs(ref).max(), np.abs(got - ref).max()
    assert (got.argmax(axis=1) == ref.argmax(axis=1)).all()


def test_gpt2_file_holds_the_gpt2_tensors(exported):
    names = {v: {t.name for t in gguf.GGUFReader(str(p)).tensors} for v, (_, p) in exported.items()}
    layer = {f"blk.1.{n}.{k}" for n in ("attn_norm", "attn_qkv", "attn_output", "ffn_norm", "ffn_up", "ffn_down")
             for k in ("weight", "bias")}
    assert {"token_embd.weight", "position_embd.weight", "output_norm.weight", "output_norm.bias"} | layer \
        <= names["bias"]
    assert "output.weight" not in names["bias"] and "output.weight" in names["untied"]
    assert names["no-bias"] == names["bias"]
    r = gguf.GGUFReader(str(exported["no-bias"][1]))
    assert not next(t for t in r.tensors if t.name == "blk.0.attn_qkv.bias").data.any()
    assert r.fields["gpt2.attention.layer_norm_epsilon"].contents() == pytest.approx(1e-5)


def test_gguf_summary_of_a_gpt2_file(exported):
    for variant in ("bias", "untied", "gqa"):
        model, path = exported[variant]
        s = gguf_summary(path)
        cfg = model.config
        assert s["architecture"] == "gpt2" and s["name"] == f"tiny-{variant}"
        assert s["params"] == model.num_params(), variant
        assert (s["n_vocab"], s["context_length"], s["n_embd"], s["n_layer"], s["n_head"]) == \
            (len(CHARS), 64, 32, 2, cfg.n_head)
        assert s["tensor_types"] == {"F32": 2 + 12 * cfg.n_layer + 2 + (not cfg.tie_weights)}
    model, path = exported["no-bias"]
    c = model.config
    zeros = c.n_layer * (2 * c.n_embd + 3 * c.n_embd + c.n_embd + c.hidden + c.n_embd) + c.n_embd
    assert gguf_summary(path)["params"] == model.num_params() + zeros   # the zero biases llama.cpp requires


# ---------------------------------------------------------------- byte vocabularies

def test_byte_vocabulary_pieces():
    v = vocab_from(ByteTokenizer(), 300)
    assert len(v) == 300 and v[65] == b"A" and v[255] == b"\xff" and v[256] is None and v[299] is None
    assert vocab_from({"kind": "byte"}) == [bytes([b]) for b in range(256)]
    tokens, merges = byte_level(v)
    assert tokens[32] == "Ġ" and tokens[10] == "Ċ" and tokens[65] == "A" and tokens[299] == "<|unused_299|>"
    assert len(set(tokens)) == 300 and merges == ["<no-merges>"]


@pytest.fixture(scope="module")
def byte_model(tmp_path_factory) -> tuple[GPT, Path]:
    """A random-weight gpt2-flavour model over bytes, its vocabulary padded to 300 ids."""
    model = GPT(tiny_config(vocab_size=300), seed=7).eval()
    return model, export_gguf(model, ByteTokenizer(), tmp_path_factory.mktemp("gguf-byte") / "byte.gguf")


def test_byte_model_greedy_tokens_match_torch(byte_model):
    model, path = byte_model
    prompt = [*b"Hello, w", 299, 256, *"ö".encode()]       # placeholders are embedding rows like any other
    want = torch_greedy(model, prompt, N_NEW)
    with llama(path, logits_all=True) as llm:
        assert llm.n_vocab() == 300
        got = llama_greedy(llm, prompt, N_NEW)
        llm.reset()
        llm.eval(prompt)
        logits = np.array(llm.scores[:len(prompt)])
    assert got == want
    with torch.no_grad():   # random weights decode one token over and over: the logits say more
        ref = model.logits(torch.tensor([prompt]))[0].numpy()
    assert np.abs(logits - ref).max() < 1e-3 * np.abs(ref).max(), np.abs(logits - ref).max()


def test_byte_model_tokenizes_text_into_its_bytes(byte_model):
    model, path = byte_model
    text = "Grüße, 世界!\n<|unused_299|> ok"
    s = gguf_summary(path)
    assert s["n_vocab"] == 300 and s["architecture"] == "gpt2" and s["params"] == model.num_params()
    with llama(path) as llm:
        assert llm.tokenize(text.encode(), add_bos=True, special=True) == list(text.encode())   # no placeholder
        assert llm.detokenize(list(text.encode())) == text.encode()
        assert llm.detokenize([104, 299, 105]) == b"hi"                # a placeholder reads as nothing
        assert llm.token_eos() == 10                                   # the newline, as for a char vocabulary
    r = gguf.GGUFReader(str(path))
    types = r.fields["tokenizer.ggml.token_type"].contents()
    assert set(types[:256]) == {int(gguf.TokenType.NORMAL)} and set(types[256:]) == {int(gguf.TokenType.UNUSED)}


# ---------------------------------------------------------------- bad input: one line, no file

def _refused(tmp_path: Path, model: GPT, tokenizer, *needles: str) -> None:
    with pytest.raises(ExportError) as e:
        export_gguf(model, tokenizer, tmp_path / "x.gguf")
    msg = str(e.value)
    assert "\n" not in msg and all(n in msg for n in needles), msg
    assert not list(tmp_path.iterdir())


def test_a_pipeline_stage_is_refused(tmp_path):
    _refused(tmp_path, GPT(tiny_config(), layers=range(1), seed=0), CHARS, "pipeline stage")    # no head
    _refused(tmp_path, GPT(tiny_config(), layers=range(1, 2), seed=0), CHARS, "pipeline stage")   # no embedding


def test_a_tokenizer_of_another_size_is_refused(tmp_path):
    model = GPT(tiny_config(vocab_size=len(CHARS) + 2), seed=0)
    _refused(tmp_path, model, CHARS, str(len(CHARS)), str(len(CHARS) + 2))
    _refused(tmp_path, model, {"kind": "char", "chars": "".join(CHARS)}, "vocab_size")
    _refused(tmp_path, GPT(tiny_config(vocab_size=200), seed=0), ByteTokenizer(), "256", "200")


def test_an_unknown_tokenizer_kind_is_refused(tmp_path):
    _refused(tmp_path, GPT(tiny_config(), seed=0), {"kind": "tiktoken"}, "'tiktoken'", "char or byte")

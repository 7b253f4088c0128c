"""B2: tokenizers. The same text through five of them, side by side.

    text ──► GPT-2 and cl100k (tiktoken, from local .tiktoken files)
         ──► a Llama-style SentencePiece model, trained here on the corpus (or your own .model)
         ──► characters
         ──► our own byte-level BPE: trained, encoded and decoded below, in ~100 lines

For each: token ids side by side on one sentence, tokens and characters per
token on held-out text, how much of its vocabulary the text uses, what it cannot
represent, and the *penalty for non-English text*: how many more tokens the same
sentence costs in other languages and scripts.

Inputs (nothing is downloaded):
- corpus: Tiny Shakespeare from the data registry (`tierkit data fetch tinyshakespeare`),
  else this project's docs, shipped with it; `TIERKIT_B2_TEXT=file.txt` uses your own text.
- tiktoken ranks: `gpt2.tiktoken` (r50k) and `cl100k_base.tiktoken` under `<data dir>/tokenizers/`
  (`$TIERKIT_DATA` or ~/.cache/tierkit), or `TIERKIT_TIKTOKEN_DIR`, or tiktoken's own cache;
  each file is checked against its published sha256.
- `TIERKIT_B2_SPM=your.model` adds your own SentencePiece model to the comparison.
"""
from __future__ import annotations

import io
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from models.tokenizers import (CL100K_SPLIT, GPT2_SPLIT, TIKTOKEN, BytePairTokenizer, find_tiktoken,  # noqa: F401
                               load_ranks, tiktoken_dirs, tiktoken_encoding)
from tiers.tier1 import common
from tiers.report import md_table

if TYPE_CHECKING:
    from tiers.runner import Context, Output

# ---------------------------------------------------------------- the other tokenizers, one interface

class Tokenizer(Protocol):
    name: str
    vocab_size: int

    def encode(self, text: str) -> list[int]: ...
    def decode(self, ids: list[int]) -> str: ...
    def piece(self, i: int) -> str: ...
    def unknown(self, ids: list[int]) -> int: ...


@dataclass
class Ours:
    bpe: BytePairTokenizer
    name: str = "ours (byte BPE)"

    @property
    def vocab_size(self) -> int:
        return len(self.bpe.vocab)

    def encode(self, text: str) -> list[int]:
        return self.bpe.encode(text)

    def decode(self, ids: list[int]) -> str:
        return self.bpe.decode(ids)

    def piece(self, i: int) -> str:
        return self.bpe.piece(i)

    def unknown(self, ids: list[int]) -> int:
        return 0                 # bytes cover everything


@dataclass
class Chars:
    """One token per character seen in training; anything else is <unk> (id 0)."""

    chars: list[str]
    name: str = "characters"
    index: dict[str, int] = field(init=False)

    def __post_init__(self) -> None:
        self.index = {c: i + 1 for i, c in enumerate(self.chars)}

    @property
    def vocab_size(self) -> int:
        return len(self.chars) + 1

    def encode(self, text: str) -> list[int]:
        return [self.index.get(c, 0) for c in text]

    def decode(self, ids: list[int]) -> str:
        return "".join(self.chars[i - 1] if i else "\ufffd" for i in ids)

    def piece(self, i: int) -> str:
        return self.chars[i - 1] if i else "<unk>"

    def unknown(self, ids: list[int]) -> int:
        return sum(1 for i in ids if i == 0)


@dataclass
class TikToken:
    enc: Any
    name: str

    @property
    def vocab_size(self) -> int:
        return int(self.enc.n_vocab)

    def encode(self, text: str) -> list[int]:
        return self.enc.encode_ordinary(text)

    def decode(self, ids: list[int]) -> str:
        return self.enc.decode(ids)

    def piece(self, i: int) -> str:
        return self.enc.decode_single_token_bytes(i).decode("utf-8", errors="backslashreplace")

    def unknown(self, ids: list[int]) -> int:
        return 0


@dataclass
class SentencePiece:
    sp: Any
    name: str

    @property
    def vocab_size(self) -> int:
        return int(self.sp.get_piece_size())

    def encode(self, text: str) -> list[int]:
        return list(self.sp.encode(text))

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode(ids)

    def piece(self, i: int) -> str:
        return self.sp.id_to_piece(i)

    def unknown(self, ids: list[int]) -> int:
        """Tokens that are not pieces of the vocabulary: <unk>, or single bytes (byte fallback)."""
        return sum(1 for i in ids if self.sp.is_unknown(i) or self.sp.is_byte(i))


# ---------------------------------------------------------------- SentencePiece, Llama-style

def train_sentencepiece(text: str, vocab_size: int) -> tuple[Any, int]:
    """A BPE SentencePiece model with Llama's choices: byte fallback, digits split, no normalisation.

    SentencePiece wants a vocabulary the corpus can fill; when it cannot, the size is
    taken as a limit rather than a target (hard_vocab_limit=False). Returns (processor, size asked).
    """
    import sentencepiece as spm

    lines = [ln for ln in text.splitlines() if ln.strip()]
    # byte fallback needs 256 byte pieces + 3 specials + the characters before any merge
    size = max(vocab_size, 259 + len(set(text)) + 8)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, vocab_size=size, model_type="bpe",
        byte_fallback=True, split_digits=True, normalization_rule_name="identity",
        remove_extra_whitespaces=False, allow_whitespace_only_pieces=True, character_coverage=0.99995,
        max_sentence_length=1 << 16, hard_vocab_limit=False, num_threads=os.cpu_count() or 1,
        minloglevel=2)
    return spm.SentencePieceProcessor(model_proto=model.getvalue()), size


# ---------------------------------------------------------------- the same sentence in other languages

# One sentence, translated by hand; the penalty is tokens(language) / tokens(English).
SAMPLES = {
    "English": "The weather is nice today, so we are going for a walk in the park.",
    "French": "Il fait beau aujourd'hui, alors nous allons nous promener dans le parc.",
    "German": "Das Wetter ist heute schön, also gehen wir im Park spazieren.",
    "Spanish": "Hoy hace buen tiempo, así que vamos a dar un paseo por el parque.",
    "Russian": "Сегодня хорошая погода, поэтому мы идём гулять в парк.",
    "Greek": "Ο καιρός είναι ωραίος σήμερα, οπότε θα πάμε βόλτα στο πάρκο.",
    "Arabic": "الطقس جميل اليوم، لذلك سنذهب في نزهة في الحديقة.",
    "Hindi": "आज मौसम अच्छा है, इसलिए हम पार्क में टहलने जा रहे हैं।",
    "Chinese": "今天天气很好，所以我们去公园散步。",
    "Japanese": "今日は天気がいいので、公園を散歩します。",
    "Korean": "오늘 날씨가 좋아서 우리는 공원에 산책하러 갑니다.",
}
SIDE_BY_SIDE = "Tokenizers don't read words: they read 1,234 pieces, e.g. naïve café, ünïcödé and 🙂."


# ---------------------------------------------------------------- the milestone

def stats(tok: Tokenizer, text: str) -> dict[str, Any]:
    """Counts on `text`, and whether decode(encode(text)) gives it back."""
    t = time.perf_counter()
    ids = tok.encode(text)
    sec = time.perf_counter() - t
    return {"tokenizer": tok.name, "vocab_size": tok.vocab_size, "tokens": len(ids),
            "chars_per_token": round(len(text) / max(1, len(ids)), 3),
            "bytes_per_token": round(len(text.encode("utf-8")) / max(1, len(ids)), 3),
            "vocab_used": round(len(set(ids)) / tok.vocab_size, 4), "distinct_tokens": len(set(ids)),
            "unknown_tokens": tok.unknown(ids), "round_trip": tok.decode(ids) == text,
            "encode_mb_per_s": round(len(text.encode("utf-8")) / 1e6 / max(sec, 1e-9), 2)}


def run(ctx: Context) -> Output:
    from tiers.runner import Output

    cfg = {"corpus_bytes": 100_000, "vocab_size": 512, **ctx.config}
    corpus_bytes, vocab_size = int(cfg["corpus_bytes"]), int(cfg["vocab_size"])
    notes: list[str] = []

    # 1. the text: train on the first 90%, measure on the last 10% (text no tokenizer trained on)
    own = common.user_path("TIERKIT_B2_TEXT")
    if own is not None:
        src = common.Text(common.truncate_utf8(own.read_text(encoding="utf-8"), corpus_bytes), f"your text ({own})")
    else:
        src = common.corpus(corpus_bytes)
    if src.note:
        notes.append(src.note)
    cut = int(len(src.text) * 0.9)
    train_text, held_out = src.text[:cut], src.text[cut:]
    ctx.log(f"corpus: {src.source}, {len(src.text.encode('utf-8')):,} bytes; held out {len(held_out):,} characters")

    # 2. our BPE
    curve: list[tuple[int, int]] = []
    with ctx.progress(f"training our byte-level BPE to {vocab_size} tokens", vocab_size - 256) as bar:
        def on_merge(i: int, pair: tuple[int, int], count: int, left: int) -> None:
            curve.append((257 + i, left))
            bar.advance()

        t0 = time.perf_counter()
        bpe = BytePairTokenizer.train(train_text, vocab_size, on_merge=on_merge)
        train_s = time.perf_counter() - t0
    ours = Ours(bpe)
    first = [f"{bpe.piece(a)!r}+{bpe.piece(b)!r}" for (a, b), _ in sorted(bpe.merges.items(), key=lambda kv: kv[1])[:8]]
    ctx.log(f"our BPE: {len(bpe.merges)} merges in {train_s:.2f} s; first merges {', '.join(first)}")

    tokenizers: list[Tokenizer] = []
    # 3. GPT-2 and GPT-4's tokenizers, from local ranks files
    for name, label in (("gpt2", "GPT-2 (tiktoken r50k)"), ("cl100k_base", "cl100k (tiktoken, GPT-4)")):
        path = find_tiktoken(name)
        if path is None:
            notes.append(f"{label}: {TIKTOKEN[name][0]} not found (looked in "
                         f"{', '.join(map(str, tiktoken_dirs()))} and tiktoken's cache): copy it there to compare")
            continue
        tokenizers.append(TikToken(tiktoken_encoding(name, path), label))
    # 4. SentencePiece: trained here, and the user's own model if given
    import sentencepiece as spm

    with ctx.progress("training a SentencePiece BPE model", None):
        t0 = time.perf_counter()
        sp, sp_size = train_sentencepiece(train_text, vocab_size)
        sp_s = time.perf_counter() - t0
    tokenizers.append(SentencePiece(sp, "SentencePiece BPE (trained here)"))
    ctx.log(f"SentencePiece: {sp.get_piece_size()} pieces in {sp_s:.2f} s")
    if sp_size != vocab_size:
        notes.append(f"SentencePiece was asked for {sp_size} pieces (byte fallback needs 259 + the characters)")
    if (user_spm := common.user_path("TIERKIT_B2_SPM")) is not None:
        tokenizers.append(SentencePiece(spm.SentencePieceProcessor(model_file=str(user_spm)),
                                        f"your SentencePiece ({user_spm.name})"))
    tokenizers += [Chars(sorted(set(train_text))), ours]

    # 5. measure every tokenizer on the held-out text, and the same sentence in other languages
    rows = [stats(t, held_out) for t in tokenizers]
    for r in rows:
        ctx.log(f"{r['tokenizer']}: {r['tokens']:,} tokens, {r['chars_per_token']} chars/token, "
                f"round trip {'ok' if r['round_trip'] else 'LOSSY'}")
    penalty: dict[str, dict[str, float]] = {}
    counts: dict[str, dict[str, int]] = {}
    unknown: dict[str, dict[str, int]] = {}
    for t in tokenizers:
        ids = {lang: t.encode(s) for lang, s in SAMPLES.items()}
        counts[t.name] = {lang: len(x) for lang, x in ids.items()}
        unknown[t.name] = {lang: t.unknown(x) for lang, x in ids.items()}
        penalty[t.name] = {lang: round(c / counts[t.name]["English"], 2) for lang, c in counts[t.name].items()}

    # 6. plots
    plt = common.pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    names = [r["tokenizer"] for r in rows]
    ax.barh(names, [r["chars_per_token"] for r in rows], color="tab:blue")
    for i, r in enumerate(rows):
        ax.text(r["chars_per_token"], i, f" {r['chars_per_token']:.2f} (vocab {r['vocab_size']:,})", va="center",
                fontsize=8)
    ax.set_xlabel("characters per token on held-out text (higher: fewer tokens for the same text)")
    ax.set_title(f"Compression on {src.source.split(' (')[0]}", fontsize=10)
    ax.set_xlim(0, max(r["chars_per_token"] for r in rows) * 1.45)
    common.save(fig, ctx.out_dir / "chars_per_token.png")

    fig, ax = plt.subplots(figsize=(11, 5))
    langs = list(SAMPLES)
    shown = [t for t in tokenizers if not isinstance(t, Chars)]   # characters: other scripts are all <unk>
    width = 0.8 / len(shown)
    for j, t in enumerate(shown):
        ax.bar(np.arange(len(langs)) + j * width, [penalty[t.name][lang] for lang in langs], width, label=t.name)
    ax.axhline(1, color="black", lw=0.8)
    ax.set_xticks(np.arange(len(langs)) + 0.4 - width / 2, langs, rotation=30)
    ax.set_ylabel("tokens / tokens for the English sentence")
    ax.set_title("The same sentence in other languages: how many times the English token count", fontsize=10)
    ax.legend(fontsize=8)
    common.save(fig, ctx.out_dir / "non_english_penalty.png")

    fig, ax = plt.subplots(figsize=(7, 4.5))
    total = len(train_text.encode("utf-8"))
    ax.plot([256, *(v for v, _ in curve)], [total, *(n for _, n in curve)])
    ax.set_xlabel("vocabulary size (256 bytes + merges)")
    ax.set_ylabel("tokens in the training text")
    ax.set_title("Our BPE: each merge shortens the text by that pair's count", fontsize=10)
    ax.grid(alpha=0.3)
    common.save(fig, ctx.out_dir / "bpe_training.png")

    # 7. the README
    side = [[t.name, len(t.encode(SIDE_BY_SIDE)),
             " · ".join(t.piece(i) for i in t.encode(SIDE_BY_SIDE)),
             " ".join(map(str, t.encode(SIDE_BY_SIDE)))] for t in tokenizers]
    table = md_table(["tokenizer", "vocab", "tokens", "chars/token", "bytes/token", "vocab used", "unknown/byte tokens",
                      "round trip"],
                     [[r["tokenizer"], f"{r['vocab_size']:,}", f"{r['tokens']:,}", r["chars_per_token"],
                       r["bytes_per_token"], f"{r['vocab_used']:.1%}", r["unknown_tokens"],
                       "lossless" if r["round_trip"] else "lossy"] for r in rows])
    def cell(t: Tokenizer, lang: str) -> str:
        unk = unknown[t.name][lang]
        return f"{counts[t.name][lang]} ({penalty[t.name][lang]:.1f}x" + (f", {unk} unknown/byte)" if unk else ")")

    pen = md_table(["language", *(t.name for t in tokenizers)],
                   [[lang, *(cell(t, lang) for t in tokenizers)] for lang in langs])
    worst = {t.name: max((penalty[t.name][lang], lang) for lang in langs) for t in tokenizers}
    report = "\n".join([
        f"## Held-out text ({len(held_out):,} characters of {src.source})", "", table, "",
        "*vocab used*: the share of the vocabulary that appears in the held-out text. *unknown/byte tokens*: "
        "tokens that are not pieces of the vocabulary (<unk> for characters never seen in training; single "
        "bytes for SentencePiece's byte fallback).", "",
        "## One sentence, side by side", "", f"`{SIDE_BY_SIDE}`", "",
        md_table(["tokenizer", "tokens", "pieces", "ids"], side), "",
        "## The penalty for non-English text", "", pen, "",
        "Every language says the same thing; the count is in tokens, the factor against English (and how many of "
        "those tokens are <unk> or single bytes: the character-level tokenizer looks cheap on other scripts only "
        "because it cannot represent them). A tokenizer "
        "trained mostly on English has merges for English words; other scripts fall back to short pieces or "
        "single bytes (a Devanagari or Hangul character is 3 bytes in UTF-8), so the same meaning costs more "
        "tokens: more compute, a shorter effective context, a higher API bill.", "",
        "## Our BPE", "",
        f"{len(bpe.merges)} merges learned in {train_s:.2f} s from {len(train_text.encode('utf-8')):,} bytes; the first: "
        + ", ".join(first) + ".",
        *(["", "## Notes", "", *(f"- {n}" for n in notes)] if notes else [])])
    metrics: dict[str, Any] = {
        "corpus": src.source, "corpus_bytes": len(src.text.encode("utf-8")), "held_out_chars": len(held_out),
        "vocab_size": vocab_size, "bpe_merges": len(bpe.merges), "bpe_train_seconds": round(train_s, 3),
        "sentencepiece_train_seconds": round(sp_s, 3), "tokenizers": rows, "non_english_tokens": counts,
        "non_english_penalty": penalty, "non_english_unknown": unknown, "side_by_side": {t.name: t.encode(SIDE_BY_SIDE) for t in tokenizers},
        "notes": notes,
    }
    best = max(rows, key=lambda r: r["chars_per_token"])
    summary = (f"On held-out text, {best['tokenizer']} packs the most characters per token ({best['chars_per_token']}); "
               f"our byte-level BPE with {ours.vocab_size} tokens reaches {rows[-1]['chars_per_token']} and round-trips "
               f"losslessly. The worst non-English penalty: " +
               "; ".join(f"{n} {p:.1f}x ({lang})" for n, (p, lang) in worst.items() if n != "characters") + ".")
    return Output(metrics=metrics, summary=summary, report=report,
                  plots=["chars_per_token.png: characters per token on held-out text",
                         "non_english_penalty.png: tokens for the same sentence, relative to English",
                         "bpe_training.png: our BPE's training text shrinking merge by merge"])

"""B2: tokenizers. The same text through five of them, side by side.

    text ──► GPT-2 and cl100k (tiktoken, from local .tiktoken files)
         ──► a Llama-style SentencePiece model, trained here on the corpus (or your own .model)
         ──► characters
         ──► our own byte-level BPE: trained here, merge by merge (the ~100 lines of BPE are
             models/tokenizers.py, BytePairTokenizer, which B12 trains its models on too)

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
from typing import TYPE_CHECKING, Annotated, Any, Protocol

import numpy as np
from annotated_types import Ge

from models.tokenizers import TIKTOKEN, BPETokenizer, BytePairTokenizer, TiktokenTokenizer, find_tiktoken, tiktoken_dirs
from tiers.report import md_table, pyplot, save
from tiers.tier1 import common

if TYPE_CHECKING:
    from tiers.runner import Context, Output


@dataclass
class Config:
    corpus_bytes: Annotated[int, Ge(1000)] = 100_000   # text read; its last 10% is held out, never trained on
    vocab_size: Annotated[int, Ge(256)] = 512          # our BPE's and SentencePiece's: 256 bytes + merges


# ---------------------------------------------------------------- the tokenizers compared, one interface

class Tokenizer(Protocol):
    label: str                   # its name in the tables
    vocab_size: int

    def encode(self, text: str) -> list[int]: ...
    def decode(self, ids: list[int]) -> str: ...
    def piece(self, i: int) -> str: ...
    def unknown(self, ids: list[int]) -> int: ...


class Ours(BPETokenizer):
    """Our byte-level BPE (models/tokenizers.py), as B12 uses it; bytes cover everything."""

    label = "ours (byte BPE)"

    def piece(self, i: int) -> str:
        return self.bpe.piece(i)

    def unknown(self, ids: list[int]) -> int:
        return 0


class TikToken(TiktokenTokenizer):
    """GPT-2's or GPT-4's tokenizer from a local ranks file (models/tokenizers.py); bytes cover everything."""

    def __init__(self, name: str, label: str):
        super().__init__(name)
        self.label = label

    def piece(self, i: int) -> str:
        return self.enc.decode_single_token_bytes(i).decode("utf-8", errors="backslashreplace")

    def unknown(self, ids: list[int]) -> int:
        return 0


@dataclass
class Chars:
    """One token per character seen in training; anything else is <unk> (id 0)."""

    chars: list[str]
    label: str = "characters"
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
class SentencePiece:
    sp: Any
    label: str

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



# ---------------------------------------------------------------- the experiment

def run(ctx: Context) -> Output:
    from tiers.runner import Output

    cfg: Config = ctx.config
    notes: list[str] = []

    # 1. the text: train on the first 90%, measure on the last 10% (text no tokenizer trained on)
    src = source_text(cfg.corpus_bytes)
    if src.note:
        notes.append(src.note)
    cut = int(len(src.text) * 0.9)
    train_text, held_out = src.text[:cut], src.text[cut:]
    ctx.log(f"corpus: {src.source}, {len(src.text.encode('utf-8')):,} bytes; held out {len(held_out):,} characters")

    # 2. our BPE, merge by merge: each merge shortens the training text by that pair's count
    curve: list[tuple[int, int]] = []
    with ctx.progress(f"training our byte-level BPE to {cfg.vocab_size} tokens", cfg.vocab_size - 256) as bar:
        def on_merge(i: int, pair: tuple[int, int], count: int, left: int) -> None:
            curve.append((257 + i, left))
            bar.advance()

        t0 = time.perf_counter()
        ours = Ours(BytePairTokenizer.train(train_text, cfg.vocab_size, on_merge=on_merge))
        train_s = time.perf_counter() - t0
    bpe = ours.bpe
    first = [f"{bpe.piece(a)!r}+{bpe.piece(b)!r}" for (a, b), _ in sorted(bpe.merges.items(), key=lambda kv: kv[1])[:8]]
    ctx.log(f"our BPE: {len(bpe.merges)} merges in {train_s:.2f} s; first merges {', '.join(first)}")

    # 3. the others: GPT-2's and GPT-4's, SentencePiece trained on the same text, characters
    tokenizers = tiktoken_tokenizers(notes)
    with ctx.progress("training a SentencePiece BPE model", None):
        t0 = time.perf_counter()
        sp, sp_size = train_sentencepiece(train_text, cfg.vocab_size)
        sp_s = time.perf_counter() - t0
    tokenizers.append(SentencePiece(sp, "SentencePiece BPE (trained here)"))
    ctx.log(f"SentencePiece: {sp.get_piece_size()} pieces in {sp_s:.2f} s")
    if sp_size != cfg.vocab_size:
        notes.append(f"SentencePiece was asked for {sp_size} pieces (byte fallback needs 259 + the characters)")
    if (user_spm := common.user_path("TIERKIT_B2_SPM")) is not None:
        import sentencepiece as spm

        tokenizers.append(SentencePiece(spm.SentencePieceProcessor(model_file=str(user_spm)),
                                        f"your SentencePiece ({user_spm.name})"))
    tokenizers += [Chars(sorted(set(train_text))), ours]

    # 4. every tokenizer on the held-out text, and on the same sentence in other languages
    rows = [stats(t, held_out) for t in tokenizers]
    for r in rows:
        ctx.log(f"{r['tokenizer']}: {r['tokens']:,} tokens, {r['chars_per_token']} chars/token, "
                f"round trip {'ok' if r['round_trip'] else 'LOSSY'}")
    counts: dict[str, dict[str, int]] = {}
    unknown: dict[str, dict[str, int]] = {}
    penalty: dict[str, dict[str, float]] = {}   # tokens(language) / tokens(English)
    for t in tokenizers:
        ids = {lang: t.encode(s) for lang, s in SAMPLES.items()}
        counts[t.label] = {lang: len(x) for lang, x in ids.items()}
        unknown[t.label] = {lang: t.unknown(x) for lang, x in ids.items()}
        penalty[t.label] = {lang: round(c / counts[t.label]["English"], 2) for lang, c in counts[t.label].items()}

    metrics: dict[str, Any] = {
        "corpus": src.source, "corpus_bytes": len(src.text.encode("utf-8")), "held_out_chars": len(held_out),
        "vocab_size": cfg.vocab_size, "bpe_merges": len(bpe.merges), "bpe_train_seconds": round(train_s, 3),
        "sentencepiece_train_seconds": round(sp_s, 3), "tokenizers": rows, "non_english_tokens": counts,
        "non_english_penalty": penalty, "non_english_unknown": unknown,
        "side_by_side": {t.label: t.encode(SIDE_BY_SIDE) for t in tokenizers}, "notes": notes,
    }
    plt = pyplot()
    plots = [compression_plot(plt, ctx.out_dir / "chars_per_token.png", rows, src.source),
             penalty_plot(plt, ctx.out_dir / "non_english_penalty.png", penalty,
                          [t.label for t in tokenizers if not isinstance(t, Chars)]),  # other scripts: all <unk>
             merges_plot(plt, ctx.out_dir / "bpe_training.png", curve, len(train_text.encode("utf-8")))]
    return Output(metrics=metrics, summary=summary(metrics, ours), plots=plots,
                  report=report(metrics, tokenizers, first, len(train_text.encode("utf-8"))))


def source_text(corpus_bytes: int) -> common.Text:
    """Your text (TIERKIT_B2_TEXT) when given, else the corpus: at most `corpus_bytes` UTF-8 bytes."""
    own = common.user_path("TIERKIT_B2_TEXT")
    if own is None:
        return common.corpus(corpus_bytes)
    return common.Text(common.truncate_utf8(own.read_text(encoding="utf-8"), corpus_bytes), f"your text ({own})")


def tiktoken_tokenizers(notes: list[str]) -> list[Tokenizer]:
    """GPT-2's and GPT-4's tokenizers, from local ranks files; a note for each file that is not here."""
    out: list[Tokenizer] = []
    for name, label in (("gpt2", "GPT-2 (tiktoken r50k)"), ("cl100k_base", "cl100k (tiktoken, GPT-4)")):
        if find_tiktoken(name) is None:
            notes.append(f"{label}: {TIKTOKEN[name][0]} not found (looked in "
                         f"{', '.join(map(str, tiktoken_dirs()))} and tiktoken's cache): copy it there to compare")
            continue
        out.append(TikToken(name, label))
    return out


def stats(tok: Tokenizer, text: str) -> dict[str, Any]:
    """Counts on `text`, and whether decode(encode(text)) gives it back."""
    t = time.perf_counter()
    ids = tok.encode(text)
    sec = time.perf_counter() - t
    return {"tokenizer": tok.label, "vocab_size": tok.vocab_size, "tokens": len(ids),
            "chars_per_token": round(len(text) / max(1, len(ids)), 3),
            "bytes_per_token": round(len(text.encode("utf-8")) / max(1, len(ids)), 3),
            "vocab_used": round(len(set(ids)) / tok.vocab_size, 4), "distinct_tokens": len(set(ids)),
            "unknown_tokens": tok.unknown(ids), "round_trip": tok.decode(ids) == text,
            "encode_mb_per_s": round(len(text.encode("utf-8")) / 1e6 / max(sec, 1e-9), 2)}


# ---------------------------------------------------------------- plots

def compression_plot(plt: Any, path: Any, rows: list[dict[str, Any]], source: str) -> str:
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.barh([r["tokenizer"] for r in rows], [r["chars_per_token"] for r in rows], color="tab:blue")
    for i, r in enumerate(rows):
        ax.text(r["chars_per_token"], i, f" {r['chars_per_token']:.2f} (vocab {r['vocab_size']:,})", va="center",
                fontsize=8)
    ax.set_xlabel("characters per token on held-out text (higher: fewer tokens for the same text)")
    ax.set_title(f"Compression on {source.split(' (')[0]}", fontsize=10)
    ax.set_xlim(0, max(r["chars_per_token"] for r in rows) * 1.45)
    save(fig, path)
    return f"{path.name}: characters per token on held-out text"


def penalty_plot(plt: Any, path: Any, penalty: dict[str, dict[str, float]], shown: list[str]) -> str:
    fig, ax = plt.subplots(figsize=(11, 5))
    langs = list(SAMPLES)
    width = 0.8 / len(shown)
    for j, label in enumerate(shown):
        ax.bar(np.arange(len(langs)) + j * width, [penalty[label][lang] for lang in langs], width, label=label)
    ax.axhline(1, color="black", lw=0.8)
    ax.set_xticks(np.arange(len(langs)) + 0.4 - width / 2, langs, rotation=30)
    ax.set_ylabel("tokens / tokens for the English sentence")
    ax.set_title("The same sentence in other languages: how many times the English token count", fontsize=10)
    ax.legend(fontsize=8)
    save(fig, path)
    return f"{path.name}: tokens for the same sentence, relative to English"


def merges_plot(plt: Any, path: Any, curve: list[tuple[int, int]], train_bytes: int) -> str:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot([256, *(v for v, _ in curve)], [train_bytes, *(n for _, n in curve)])
    ax.set_xlabel("vocabulary size (256 bytes + merges)")
    ax.set_ylabel("tokens in the training text")
    ax.set_title("Our BPE: each merge shortens the text by that pair's count", fontsize=10)
    ax.grid(alpha=0.3)
    save(fig, path)
    return f"{path.name}: our BPE's training text shrinking merge by merge"


# ---------------------------------------------------------------- the report

def summary(m: dict[str, Any], ours: Ours) -> str:
    rows = m["tokenizers"]
    best = max(rows, key=lambda r: r["chars_per_token"])
    langs = list(SAMPLES)
    worst = {name: max((pen[lang], lang) for lang in langs) for name, pen in m["non_english_penalty"].items()}
    return (f"On held-out text, {best['tokenizer']} packs the most characters per token ({best['chars_per_token']}); "
            f"our byte-level BPE with {ours.vocab_size} tokens reaches {rows[-1]['chars_per_token']} and round-trips "
            f"losslessly. The worst non-English penalty: " +
            "; ".join(f"{n} {p:.1f}x ({lang})" for n, (p, lang) in worst.items() if n != "characters") + ".")


def report(m: dict[str, Any], tokenizers: list[Tokenizer], first_merges: list[str], train_bytes: int) -> str:
    counts, penalty, unknown = m["non_english_tokens"], m["non_english_penalty"], m["non_english_unknown"]
    table = md_table(["tokenizer", "vocab", "tokens", "chars/token", "bytes/token", "vocab used", "unknown/byte tokens",
                      "round trip"],
                     [[r["tokenizer"], f"{r['vocab_size']:,}", f"{r['tokens']:,}", r["chars_per_token"],
                       r["bytes_per_token"], f"{r['vocab_used']:.1%}", r["unknown_tokens"],
                       "lossless" if r["round_trip"] else "lossy"] for r in m["tokenizers"]])
    side = [[t.label, len(ids := t.encode(SIDE_BY_SIDE)), " · ".join(t.piece(i) for i in ids), " ".join(map(str, ids))]
            for t in tokenizers]

    def cell(name: str, lang: str) -> str:
        unk = unknown[name][lang]
        return f"{counts[name][lang]} ({penalty[name][lang]:.1f}x" + (f", {unk} unknown/byte)" if unk else ")")

    names = [t.label for t in tokenizers]
    pen = md_table(["language", *names], [[lang, *(cell(n, lang) for n in names)] for lang in SAMPLES])
    return "\n".join([
        f"## Held-out text ({m['held_out_chars']:,} characters of {m['corpus']})", "", table, "",
        ("*vocab used*: the share of the vocabulary that appears in the held-out text. *unknown/byte tokens*: "
        "tokens that are not pieces of the vocabulary (<unk> for characters never seen in training; single "
        "bytes for SentencePiece's byte fallback)."), "",
        "## One sentence, side by side", "", f"`{SIDE_BY_SIDE}`", "",
        md_table(["tokenizer", "tokens", "pieces", "ids"], side), "",
        "## The penalty for non-English text", "", pen, "",
        ("Every language says the same thing; the count is in tokens, the factor against English (and how many of "
        "those tokens are <unk> or single bytes: the character-level tokenizer looks cheap on other scripts only "
        "because it cannot represent them). A tokenizer "
        "trained mostly on English has merges for English words; other scripts fall back to short pieces or "
        "single bytes (a Devanagari or Hangul character is 3 bytes in UTF-8), so the same meaning costs more "
        "tokens: more compute, a shorter effective context, a higher API bill."), "",
        "## Our BPE", "",
        f"{m['bpe_merges']} merges learned in {m['bpe_train_seconds']:.2f} s from {train_bytes:,} bytes; the first: "
        + ", ".join(first_merges) + ".",
        *(["", "## Notes", "", *(f"- {n}" for n in m["notes"])] if m["notes"] else [])])

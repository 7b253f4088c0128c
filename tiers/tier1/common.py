"""The text tier-1 milestones read: a corpus, the shipped docs, a file the user names.

    corpus(max_bytes)    Tiny Shakespeare from the data registry, else the embedded docs  (B2)
    docs()               the embedded default corpus: this project's own docs (tiers/tier1/corpus/)  (B15)
    user_path(var)       a file or folder the user named in an environment variable  (B2, B15)

Nothing here downloads. A milestone that lacks data uses its embedded default and
says which `tierkit data fetch` would give it the real thing. (Tables and plots are
tiers/report.py; the sentence encoder B3 and B15 share is models/minilm.py.)
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from tiers import data

CORPUS_DIR = Path(__file__).with_name("corpus")   # the embedded default: this project's docs, as shipped


@dataclass
class Text:
    text: str
    source: str          # what it is and where it came from, for the README
    note: str = ""       # what the user could do to get the real thing


def docs() -> dict[str, str]:
    """The embedded default corpus: {file name: text} of the project docs shipped with tierkit."""
    return {p.name: p.read_text(encoding="utf-8") for p in sorted(CORPUS_DIR.glob("*.md"))}


def corpus(max_bytes: int | None = None) -> Text:
    """Tiny Shakespeare when the registry has it, else the embedded docs; at most `max_bytes` UTF-8 bytes."""
    try:
        path = data.locate("tinyshakespeare")
    except (data.DataError, OSError):  # a registry that cannot answer means: use the embedded default
        path = None
    if path is not None and path.is_file():
        text, source, note = path.read_text(encoding="utf-8"), f"Tiny Shakespeare ({path})", ""
    else:
        text = "\n\n".join(docs().values())
        source = f"embedded default: this project's docs ({', '.join(docs())})"
        note = "Tiny Shakespeare is not here: `tierkit data fetch tinyshakespeare` gives the real corpus"
    if max_bytes is not None:
        text = truncate_utf8(text, max_bytes)
    return Text(text, source, note)


def truncate_utf8(text: str, max_bytes: int) -> str:
    """The longest prefix of `text` that is at most `max_bytes` in UTF-8 (never half a character)."""
    return text.encode("utf-8")[:max_bytes].decode("utf-8", errors="ignore")


def user_path(var: str, kind: str = "file") -> Path | None:
    """A path the user gave in environment variable `var`; ValueError (one line) if it is not there."""
    value = os.environ.get(var)
    if not value:
        return None
    p = Path(value).expanduser()
    ok = p.is_dir() if kind == "folder" else p.is_file()
    if not ok:
        raise ValueError(f"{var}={value}: no such {kind}; point it at an existing {kind} or unset it")
    return p

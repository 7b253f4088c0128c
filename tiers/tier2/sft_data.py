"""The instruction pairs B13 fine-tunes on and the preference dialogues B14 reads, from the data registry.

    alpaca-cleaned   one JSON list of {instruction, input, output}       prompt = instruction (+ blank line + input)
    dolly-15k        JSONL lines {instruction, context, response, ...}   prompt = instruction (+ blank line + context)
    hh-rlhf          JSONL.gz lines {chosen, rejected}: "\\n\\nHuman: ...\\n\\nAssistant: ..." dialogues
                     B13: the first exchange of each chosen dialogue; B14 splits chosen / rejected itself
    your file        JSONL lines {prompt, response}  (config data_file, or $TIERKIT_B13_DATA)
          │
          ▼
    [(prompt, response), ...]   in file order: the last part is held out, so nothing is shuffled across the split

Why the first exchange only for hh-rlhf: later turns depend on a conversation a small
model's context cannot hold. Why the input/context joins the prompt: the model is asked
to answer *given* it, so it belongs to what is masked, not to what is learnt.

Errors are SFTError; str() is one line naming the file (and line) and the fix.
"""
from __future__ import annotations

import gzip
import itertools
import json
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

Pair = tuple[str, str]                      # (prompt, response)
INSTRUCTION_SETS = ("alpaca-cleaned", "dolly-15k", "hh-rlhf")


class SFTError(ValueError):
    """Bad SFT input (a malformed JSONL line, no usable pairs); str() is one line naming the fix."""


# ---------------------------------------------------------------- hh-rlhf dialogues

_TURN = re.compile(r"\n\n(Human|Assistant): ?")


def parse_dialogue(text: str) -> list[tuple[str, str]]:
    """'\\n\\nHuman: ...\\n\\nAssistant: ...' -> [("Human", ...), ("Assistant", ...), ...] (text stripped)."""
    parts = _TURN.split(text)
    # split with a capturing group: [before, role, text, role, text, ...]
    return [(parts[i], parts[i + 1].strip()) for i in range(1, len(parts) - 1, 2)]


def exchanges(turns: Sequence[tuple[str, str]]) -> list[Pair]:
    """Every (Human turn, the Assistant turn right after it) pair, in order, both non-empty."""
    return [(a[1], b[1]) for a, b in itertools.pairwise(turns)
            if a[0] == "Human" and b[0] == "Assistant" and a[1] and b[1]]


def hh_pairs(rows: Iterable[dict[str, Any]], key: str = "chosen") -> list[Pair]:
    """The first exchange of each hh-rlhf dialogue (`key`: chosen or rejected) as (prompt, response)."""
    out = []
    for row in rows:
        ex = exchanges(parse_dialogue(str(row.get(key, ""))))
        if ex:
            out.append(ex[0])
    return out


def hh_file(files: Sequence[str] | None = None) -> Path:
    """hh-rlhf through the data registry: the first of `files` here (a rung may name the split it reads),
    else the train split when it is here, else the test split."""
    from tiers import data

    for name in files or ("harmless-base-train.jsonl.gz", "harmless-base-test.jsonl.gz"):
        p = data.find_file("hh-rlhf", name)
        if p is not None:
            return p
    raise SFTError(data.missing_message("hh-rlhf"))


# ---------------------------------------------------------------- files

def _open(path: Path) -> Any:
    return gzip.open(path, "rt", encoding="utf-8") if path.suffix == ".gz" else open(path, encoding="utf-8")


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Lines of a .jsonl or .jsonl.gz file; SFTError naming the line when one is not a JSON object."""
    rows = []
    try:
        with _open(path) as f:
            for no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise SFTError(f"{path}:{no}: not JSON ({e.msg}); each line must be one JSON object") from None
                if not isinstance(row, dict):
                    raise SFTError(f"{path}:{no}: a JSON {type(row).__name__}, not an object; "
                                   "each line must be one JSON object") from None
                rows.append(row)
    except (OSError, EOFError, UnicodeDecodeError) as e:
        raise SFTError(f"{path}: cannot read it ({type(e).__name__}: {e}); give a UTF-8 .jsonl or .jsonl.gz file") \
            from None
    return rows


def read_records(path: Path) -> list[dict[str, Any]]:
    """A JSON list of objects (Alpaca's one file) or JSONL lines, whichever the file holds."""
    try:
        with _open(path) as f:
            head = f.read(1 << 12).lstrip()
    except (OSError, EOFError, UnicodeDecodeError) as e:
        raise SFTError(f"{path}: cannot read it ({type(e).__name__}: {e})") from None
    if not head.startswith("["):
        return read_jsonl(path)
    try:
        with _open(path) as f:
            rows = json.load(f)
    except json.JSONDecodeError as e:
        raise SFTError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}); fetch it again with "
                       "`tierkit data fetch`") from None
    bad = next((i for i, r in enumerate(rows) if not isinstance(r, dict)), None)
    if bad is not None:
        raise SFTError(f"{path}: item {bad} of the list is not an object; each item must be one JSON object")
    return rows


def data_file(where: Path) -> Path:
    """The file of a data set the registry gave: the path itself, or the one .json/.jsonl(.gz) file in a folder."""
    if where.is_file():
        return where
    found = sorted(p for p in where.rglob("*") if p.is_file()
                   and p.name.endswith((".json", ".jsonl", ".jsonl.gz")) and not p.name.startswith("."))
    if not found:
        raise SFTError(f"{where}: no .json or .jsonl file in it; fetch the data set again with `tierkit data fetch`")
    return found[0]


# ---------------------------------------------------------------- each set's fields -> (prompt, response)

def _join(instruction: Any, extra: Any) -> str:
    a, b = str(instruction or "").strip(), str(extra or "").strip()
    return f"{a}\n\n{b}" if a and b else a or b


def instruction_pairs(rows: Iterable[dict[str, Any]], extra: str, answer: str) -> list[Pair]:
    """(instruction [+ extra], answer) for every row with a non-empty instruction and answer."""
    out = []
    for row in rows:
        prompt, reply = _join(row.get("instruction"), row.get(extra)), str(row.get(answer) or "").strip()
        if str(row.get("instruction") or "").strip() and reply:
            out.append((prompt, reply))
    return out


def user_pairs(path: Path) -> list[Pair]:
    """{"prompt", "response"} lines of your own file; SFTError naming the first bad line."""
    rows = read_jsonl(path)
    out = []
    for no, row in enumerate(rows, 1):
        p, r = row.get("prompt"), row.get("response")
        if not isinstance(p, str) or not isinstance(r, str) or not r.strip():
            raise SFTError(f"{path}: object {no} lacks a string 'prompt' and a non-empty string 'response'; "
                           'each line must be {"prompt": "...", "response": "..."}')
        out.append((p.strip(), r.strip()))
    if not out:
        raise SFTError(f"{path}: no pairs in it; each line must be {{\"prompt\": \"...\", \"response\": \"...\"}}")
    return out


def registry_pairs(name: str, files: Sequence[str] | None = None) -> tuple[list[Pair], str]:
    """(pairs, where they came from) for one of INSTRUCTION_SETS; DataError's line when it is not here."""
    from tiers import data

    if name == "hh-rlhf":
        path = hh_file(files)
        return hh_pairs(read_jsonl(path)), f"hh-rlhf chosen dialogues, first exchange ({path})"
    if name not in INSTRUCTION_SETS:
        raise SFTError(f"dataset {name!r} is not an instruction set; B13 trains on {', '.join(INSTRUCTION_SETS)} "
                       "(--set dataset=NAME) or your JSONL (--set data_file=PATH)")
    path = data_file(Path(data.require(name)))
    rows = read_records(path)
    pairs = instruction_pairs(rows, "input", "output") if name == "alpaca-cleaned" \
        else instruction_pairs(rows, "context", "response")
    if not pairs:
        fields = "instruction, input, output" if name == "alpaca-cleaned" else "instruction, context, response"
        raise SFTError(f"{path}: no usable pairs (objects with {fields}); fetch it again with "
                       f"`tierkit data fetch {name}`")
    return pairs, f"{name} ({path})"


def load_pairs(dataset: str, user_file: str | None = None,
               files: Sequence[str] | None = None) -> tuple[list[Pair], str]:
    """(pairs, where they came from): `user_file` or TIERKIT_B13_DATA when given, else the registry's `dataset`."""
    user = user_file or os.environ.get("TIERKIT_B13_DATA")
    if user:
        p = Path(user).expanduser()
        if not p.is_file():
            raise SFTError(f"{p}: no such file; point data_file / TIERKIT_B13_DATA at a JSONL of "
                           '{"prompt", "response"} lines, or unset it for the registry data set')
        return user_pairs(p), f"your file {p}"
    return registry_pairs(dataset, files)


def split_pairs(pairs: list[Pair], frac: float) -> tuple[list[Pair], list[Pair]]:
    """The last `frac` of the pairs (at least 1, at most all but 1) held out; file order, so no shuffling leak."""
    if len(pairs) < 2:
        raise SFTError(f"{len(pairs)} usable pair(s): SFT needs at least 2 (one to train on, one to hold out)")
    n = min(len(pairs) - 1, max(1, int(len(pairs) * frac)))
    return pairs[:-n], pairs[-n:]

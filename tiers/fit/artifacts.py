"""What a planned size needs from the registry, and whether it is here.

    rung.model, rung.base, rung.dataset ──► needs(rung) ──► [Artifact(name, kind, size, here)]
                                                  │
                 the missing ones ──► fetch_line(...) = "tierkit data fetch gpt2 (551 MB)"
                                      the plan's note: "fetch first: ..."
    before a run: check_own_model (model: b12 / b13 needs that build), then
                  ensure(...): each missing one fetched (`run --fetch`), or Missing, one line

A size that needs an artifact not here still fits the hardware: the planner says
which `tierkit data fetch` brings it, and `tierkit run` stops before it starts
(or fetches first with `--fetch`). Here means: the whole artifact is where
`tiers.data.locate` finds it, or, for a size that reads only some files of a data
set (`dataset_files`, e.g. MNIST's test split), those files. Looking is a few
`stat` calls (no network, no huggingface_hub import), so `tierkit fit` stays fast.
"""
from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from inventory.units import fmt_bytes
from tiers import catalog
from tiers.catalog import Rung
from tiers.plan import Artifact


class Missing(Exception):
    """Something a planned size needs is not here; str() is one line saying how to get it."""


def is_here(rung: Rung, name: str) -> bool:
    """Whether what `rung` reads of artifact `name` is on this machine now."""
    from tiers import data

    if name == rung.dataset and rung.dataset_files:
        return all(data.find_file(name, f) is not None for f in rung.dataset_files)
    return data.locate(name) is not None


def needs(rung: Rung) -> list[Artifact]:
    """The registry artifacts a size needs: its model (and a b12/b13 model's base), then its data."""
    from tiers import data

    out = []
    for name in rung.artifacts:
        entry = data.get(name)
        out.append(Artifact(name=name, kind=entry.kind, size=entry.size, here=is_here(rung, name)))
    return out


def fetch_line(missing: list[Artifact]) -> str:
    """'tierkit data fetch gpt2 (551 MB) and tierkit data fetch alpaca-cleaned (44.3 MB)'."""
    return " and ".join(f"tierkit data fetch {a.name} ({fmt_bytes(a.size) if a.size else 'size unknown'})"
                        for a in missing)


def describe(arts: list[Artifact]) -> str:
    """'gpt2 551 MB (here), tinyshakespeare 1.12 MB (not here)': for the table."""
    return ", ".join(f"{a.name} {fmt_bytes(a.size) if a.size else '?'} ({'here' if a.here else 'not here'})"
                     for a in arts)


def _standin_hint(milestone: str) -> str:
    sizes = [r.size for r in catalog.get(milestone).ladder if r.model == "standin"]
    return f", or pick --size {sizes[0]} (a stand-in trained in seconds)" if sizes else ""


def check_own_model(milestone: str, rung: Rung, out_root: Path) -> None:
    """A size on the learner's own model needs that build under `out_root`: B12's checkpoint, or B13's
    build at the same size (its metrics.json says which); Missing otherwise. Nothing is substituted."""
    own = str(rung.own_model)
    folder = Path(out_root) / f"B{int(own[1:]):02d}-{catalog.get(own).slug}"
    alt = _standin_hint(milestone)
    if own == "B12":
        ckpt = folder / "ckpt.pt"
        if not ckpt.is_file():
            raise Missing(f"no B12 checkpoint at {ckpt}: run `tierkit run B12` first{alt}")
        return
    first = f"run `tierkit run {own} --size {rung.size}` first{alt}"
    try:
        built = json.loads((folder / "metrics.json").read_text(encoding="utf-8"))["plan"]["size"]
    except (OSError, ValueError, KeyError, TypeError):
        raise Missing(f"no {own} model at {folder}: {first}") from None
    if built != rung.size:
        raise Missing(f"the {own} model at {folder} is size {built}, not {rung.size}: {first}")


def ensure(milestone: str, rung: Rung, skip: set[str | None], fetch: Callable[[str], Any] | None) -> list[Artifact]:
    """The size's artifacts (but `skip`), each here: fetched now with `fetch(name)`, or Missing naming the fetch."""
    from tiers import data

    arts = [a for a in needs(rung) if a.name not in skip]
    missing = [a for a in arts if not a.here]
    if missing and fetch is None:
        raise Missing(f"{milestone} {rung.size}: {', '.join(a.name for a in missing)} not here: "
                      f"run {fetch_line(missing)}, or pass --fetch")
    for a in missing:
        try:
            fetch(a.name)  # type: ignore[misc]
        except data.DataError as exc:
            raise Missing(str(exc)) from None
        if not is_here(rung, a.name):
            raise Missing(f"{a.name} was fetched but is not found where tierkit looks (TIERKIT_DATA, HF_HUB_CACHE)")
        a.here = True
    return arts

"""What every milestone's report is made of: markdown tables and PNG plots.

    md_table(["size", "loss"], rows)     -> a markdown table for README.md
    plt = pyplot(); fig, ax = plt.subplots(); ...; save(fig, ctx.out_dir / "loss.png")

matplotlib is imported when the first plot is drawn, never at import time, and
always with the file-only Agg backend: milestones run on servers and in CI with
no display, and a learner's plots belong in the build folder anyway.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any


def md_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A markdown table; `|` inside a cell is escaped so the table stays a table."""
    def cell(x: Any) -> str:
        return str(x).replace("|", "\\|").replace("\n", " ")

    out = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    out += ["| " + " | ".join(cell(x) for x in r) + " |" for r in rows]
    return "\n".join(out)


def pyplot() -> Any:
    """matplotlib.pyplot drawing to files only (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(fig: Any, path: Path) -> None:
    """Lay the figure out, write it as a PNG, and free it (a long run draws many)."""
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    pyplot().close(fig)

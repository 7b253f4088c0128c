"""`tierkit kws export`: compile an int8 .tflite into C that calls our own int8 kernels.

    export_c(tflite_bytes, out_dir)
      read_model   the flatbuffer, no TensorFlow         compiler/tflite.py
      lower        each op -> one kernel call             compiler/lowering.py (+ prepare.py, abi.py)
      plan_memory  a fixed arena offset per activation    compiler/memory.py
      generate_c   model.c, model.h                       compiler/codegen.py
    -> ExportResult(arena_bytes, const_bytes, ...), or ExportError: one line naming the op and the fix

What a microcontroller interpreter (TFLite Micro) does at start-up, we do
once, here, on the host; the phases live in `tiers/tier0/compiler/`. The
kernels live in firmware/lib/kernels/ and are bit-exact with TFLite Micro's
reference kernels; the tests compare every output (and, in a debug build,
every intermediate tensor) with the interpreter.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

from inventory.files import atomic_write
from tiers.tier0.compiler import ExportError
from tiers.tier0.compiler.codegen import generate_c
from tiers.tier0.compiler.lowering import SUPPORTED_OPS, UnsupportedOpError, lower
from tiers.tier0.compiler.memory import MemoryPlan, check_plan, plan_memory
from tiers.tier0.compiler.tflite import read_model

__all__ = ["SUPPORTED_OPS", "ExportError", "ExportResult", "UnsupportedOpError", "export_c", "main", "read_model"]


@dataclass
class ExportResult:
    """What `export_c` wrote and the numbers a report needs."""

    c_path: Path
    h_path: Path
    prefix: str
    arena_bytes: int           # static RAM for activations and scratch
    naive_arena_bytes: int     # the most bytes live at once with no overlap (what buffer reuse alone can reach)
    const_bytes: int           # weights, biases, multipliers, shifts, parameter blocks (flash)
    input_bytes: list[int]
    output_bytes: list[int]
    ops: list[str]
    plan: MemoryPlan

    def summary(self) -> str:
        return (f"{len(self.ops)} ops -> {self.c_path.name}/{self.h_path.name}: arena {self.arena_bytes:,} B "
                f"(reuse without overlap: >= {self.naive_arena_bytes:,} B), constants {self.const_bytes:,} B, "
                f"input {'+'.join(map(str, self.input_bytes))} B, output {'+'.join(map(str, self.output_bytes))} B")


def export_c(tflite: bytes, out_dir: str | Path, *, prefix: str = "kws_model", basename: str = "model",
             source_name: str = "model.tflite", overlap: bool = True) -> ExportResult:
    """Compile `tflite` to `<out_dir>/<basename>.c` and `.h`; raise ExportError (one line) if it cannot."""
    m = read_model(tflite)
    steps = lower(m)
    plan = plan_memory(m, steps, overlap=overlap)
    check_plan(plan)
    c_text, h_text, const_bytes = generate_c(m, steps, plan, prefix=prefix, header=f"{basename}.h",
                                             source_name=source_name)
    out = Path(out_dir)
    c_path, h_path = out / f"{basename}.c", out / f"{basename}.h"
    atomic_write(h_path, h_text)
    atomic_write(c_path, c_text)
    return ExportResult(c_path, h_path, prefix, plan.arena_bytes, plan.naive_bytes(), const_bytes,
                        [m.tensors[t].nbytes for t in m.inputs], [m.tensors[t].nbytes for t in m.outputs],
                        [s.op.name for s in steps], plan)


def main(argv: list[str] | None = None) -> int:
    """`python -m tiers.tier0.export MODEL.tflite [-o DIR]`: exit 2 with one line on a model it refuses."""
    ap = argparse.ArgumentParser(prog="tierkit kws export", description=__doc__.splitlines()[0])
    ap.add_argument("model", type=Path)
    ap.add_argument("-o", "--out", type=Path, default=Path("."))
    ap.add_argument("--prefix", default="kws_model")
    ap.add_argument("--basename", default="model")
    a = ap.parse_args(argv)
    try:
        data = a.model.read_bytes()
    except OSError as e:
        print(f"error: cannot read {a.model}: {e.strerror}", file=sys.stderr)
        return 2
    try:
        r = export_c(data, a.out, prefix=a.prefix, basename=a.basename, source_name=a.model.name)
    except ExportError as e:
        print(f"error: {a.model.name}: {e}", file=sys.stderr)
        return 2
    print(r.summary())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

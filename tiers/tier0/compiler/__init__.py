"""The `.tflite`-to-C compiler behind `tierkit kws export`, one module per phase.

    .tflite bytes ─► tflite.read_model ─► Model        tensors (with constant data and quantisation), ops
                  ─► lowering.lower    ─► [Step]       one kernel call per op, TFLite Micro's prepared
                                                       parameters (prepare.py), filters packed
                  ─► memory.plan_memory ─► MemoryPlan  a fixed arena offset for every activation
                  ─► codegen.generate_c ─► model.c, model.h
    abi.py: the kernels' parameter structs and size formulas, shared with the C header

What TFLite Micro does on the device at start-up (parse the flatbuffer, check
the ops, compute multipliers and paddings, plan the arena), this does once on
the host, so the firmware holds only const data, one static arena and a list
of kernel calls. `tiers/tier0/export.py` is the entry point (`export_c`, the CLI).
"""
from __future__ import annotations


class ExportError(Exception):
    """The model cannot be compiled; str() is one line that says what and what to do."""

"""Run an int8 .tflite on the TFLite Micro interpreter: the reference for what a microcontroller computes.

The `tflite-micro` Python package wraps the same C++ interpreter and reference
kernels that run on a board, so its int8 outputs are what our generated C must
reproduce byte for byte, and its arena is the RAM figure our memory planner is
measured against.

    from tiers.tier0 import verify
    y = verify.run(model_bytes, x_int8)            # (N, ...) int8 in, (N, ...) int8 out
    verify.arena(model_bytes).total                # bytes TFLite Micro needs for this model
"""
from __future__ import annotations

import ctypes
import os
import re
import tempfile
from dataclasses import dataclass
from typing import Any

import numpy as np

# The Python wrapper defaults to an arena of 10x the model size; tiny models with wide
# activations need more. Unused arena costs host memory only: the arena *used* is what
# `arena()` reports.
MIN_ARENA = 1 << 20


def _runtime() -> Any:
    from tflite_micro.python.tflite_micro import runtime

    return runtime


def interpreter(model: bytes, *, preserve_all_tensors: bool = False, arena_size: int | None = None) -> Any:
    """A TFLite Micro interpreter for `model`.

    `preserve_all_tensors` keeps every intermediate tensor readable after
    invoke (GetTensor), at the price of not reusing arena memory, so the arena
    it reports is not the real one: use `arena()` for that.
    """
    rt = _runtime()
    cfg = rt.InterpreterConfig.kPreserveAllTensors if preserve_all_tensors else rt.InterpreterConfig.kAllocationRecording
    size = arena_size or max(MIN_ARENA, 10 * len(model))
    return rt.Interpreter.from_bytes(bytes(model), arena_size=size, intrepreter_config=cfg)


def run(model: bytes, x: np.ndarray, *, interp: Any = None) -> np.ndarray:
    """Outputs of output 0 for a batch `x` of int8 inputs (first axis: examples).

    The interpreter's input has a batch of 1, so examples run one by one; each
    example may be given with or without that leading 1.
    """
    ip = interp or interpreter(model)
    d = ip.get_input_details(0)
    shape = tuple(int(s) for s in d["shape"])
    x = np.asarray(x)
    if x.dtype != np.int8:
        raise ValueError(f"TFLite Micro input must be int8, got {x.dtype}: quantise the features first")
    per = int(np.prod(shape))
    if x.size % per:
        raise ValueError(f"input of {x.size} values does not split into examples of shape {shape}")
    xs = x.reshape((-1, *shape))
    outs = []
    for row in xs:
        ip.set_input(row[None] if row.shape != shape else row, 0)
        ip.invoke()
        outs.append(np.array(ip.get_output(0), copy=True))
    return np.stack(outs) if outs else np.zeros((0,), np.int8)


def run_multi(model: bytes, inputs: list[np.ndarray], *, interp: Any = None) -> list[np.ndarray]:
    """One invocation of a model with several inputs; every output, in graph order."""
    ip = interp or interpreter(model)
    for k, x in enumerate(inputs):
        ip.set_input(np.asarray(x, np.int8).reshape(tuple(ip.get_input_details(k)["shape"])), k)
    ip.invoke()
    from tiers.tier0.compiler.tflite import read_model  # how many outputs: the wrapper only errors past the last

    return [np.array(ip.get_output(k), copy=True) for k in range(len(read_model(model).outputs))]


def intermediates(model: bytes, inputs: list[np.ndarray], tensors: list[int]) -> dict[int, np.ndarray]:
    """The contents of tensors `tensors` after one invocation (for comparing a debug build op by op)."""
    ip = interpreter(model, preserve_all_tensors=True)
    run_multi(model, inputs, interp=ip)
    return {t: np.array(ip.GetTensor(t, 0)["tensor_data"], copy=True) for t in tensors}


def run_float(model: bytes, features: np.ndarray) -> np.ndarray:
    """Float features in, dequantised float scores out, through TFLite Micro."""
    from tiers.tier0.quantize import io_params

    qin, qout = io_params(model)
    return qout.dequantize(run(model, qin.quantize(features)))


def accuracy(model: bytes, features: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy of the int8 model on TFLite Micro: the figure a board would reach."""
    labels = np.asarray(labels)
    if len(labels) == 0:
        raise ValueError("no examples to measure accuracy on")
    scores = run_float(model, features)
    return float((scores.reshape(len(labels), -1).argmax(-1) == labels).mean())


@dataclass(frozen=True)
class Arena:
    """TFLite Micro's arena for one model, as its RecordingMicroAllocator reports it."""

    total: int          # bytes the arena must have
    head: int           # activation buffers (the memory plan)
    tail: int           # persistent data: tensor structs, op data, quantisation tables
    report: str         # the allocator's own lines

    def line(self) -> str:
        return f"TFLite Micro arena {self.total:,} B (activations {self.head:,} B + persistent {self.tail:,} B)"


def arena(model: bytes, *, example: np.ndarray | None = None) -> Arena:
    """Invoke once and read the arena figures `print_allocations()` writes to stderr.

    The interpreter prints from C++, straight to file descriptor 2, so Python's
    sys.stderr never sees it: we point fd 2 at a temporary file for the call.
    """
    ip = interpreter(model)
    d = ip.get_input_details(0)
    x = example if example is not None else np.zeros(tuple(d["shape"]), np.int8)
    ip.set_input(np.asarray(x, np.int8).reshape(tuple(d["shape"])), 0)
    ip.invoke()
    text = _capture_fd2(ip.print_allocations)

    def grab(what: str) -> int:
        m = re.search(rf"Arena allocation {what} (\d+) bytes", text)
        if not m:
            raise RuntimeError(f"TFLite Micro printed no arena {what}: {text.strip()[:200]!r}")
        return int(m.group(1))

    return Arena(grab("total"), grab("head"), grab("tail"), text)


def _capture_fd2(fn: Any) -> str:
    libc = ctypes.CDLL(None)
    saved = os.dup(2)
    with tempfile.TemporaryFile() as f:
        try:
            libc.fflush(None)
            os.dup2(f.fileno(), 2)
            fn()
            libc.fflush(None)
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        f.seek(0)
        return f.read().decode("utf-8", "replace")

"""Read a .tflite flatbuffer: the first subgraph's tensors and ops, as plain dataclasses.

    read_model(bytes) -> Model(tensors=[Tensor(shape, dtype, data, scales, zero_points)],
                               ops=[Op(name, inputs, outputs, options)], inputs, outputs)

A small reader over the `flatbuffers` package, addressing the schema's fields
by vtable slot (4 + 2 * field id in tensorflow/lite/schema/schema.fbs), so
exporting needs no TensorFlow. It reads what inference needs and nothing else:
tensor shapes, types, constant buffers (inline or past the 2 GB offset form),
quantisation, the operator codes, and the builtin options of the ops the
kernels implement.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tiers.tier0.compiler import ExportError

BUILTIN_CODES = {"ADD": 0, "AVERAGE_POOL_2D": 1, "CONV_2D": 3, "DEPTHWISE_CONV_2D": 4, "FULLY_CONNECTED": 9,
                 "MAX_POOL_2D": 17, "RESHAPE": 22, "SOFTMAX": 25}
_CODE_NAMES = {v: k for k, v in BUILTIN_CODES.items()}
_TYPES = {0: "float32", 1: "float16", 2: "int32", 3: "uint8", 4: "int64", 5: "string", 6: "bool", 7: "int16",
          8: "complex64", 9: "int8", 10: "float64", 11: "complex128", 12: "uint64", 13: "resource",
          14: "variant", 15: "uint32", 16: "uint16", 17: "int4", 18: "bfloat16"}
NUMPY_TYPES = {"float32": np.float32, "float16": np.float16, "int32": np.int32, "uint8": np.uint8,
               "int64": np.int64, "bool": np.bool_, "int16": np.int16, "int8": np.int8, "float64": np.float64,
               "uint64": np.uint64, "uint32": np.uint32, "uint16": np.uint16}

# Builtin options: (key, vtable slot, type, schema default) per op. The window ops share their head.
_WINDOW = (("padding", 4, "i8", 0), ("stride_w", 6, "i32", 0), ("stride_h", 8, "i32", 0))
_POOL = (*_WINDOW, ("filter_w", 10, "i32", 0), ("filter_h", 12, "i32", 0), ("act", 14, "i8", 0))
OPTIONS: dict[str, tuple[tuple[str, int, str, Any], ...]] = {
    "CONV_2D": (*_WINDOW, ("act", 10, "i8", 0), ("dil_w", 12, "i32", 1), ("dil_h", 14, "i32", 1)),
    "DEPTHWISE_CONV_2D": (*_WINDOW, ("depth_mult", 10, "i32", 0), ("act", 12, "i8", 0), ("dil_w", 14, "i32", 1),
                          ("dil_h", 16, "i32", 1)),
    "FULLY_CONNECTED": (("act", 4, "i8", 0), ("weights_format", 6, "i8", 0), ("keep_num_dims", 8, "bool", False)),
    "AVERAGE_POOL_2D": _POOL,
    "MAX_POOL_2D": _POOL,
    "SOFTMAX": (("beta", 4, "f32", 0.0),),
    "ADD": (("act", 4, "i8", 0),),
}


@dataclass
class Tensor:
    """One tensor of the subgraph, with its constant data if it has any."""

    index: int
    name: str
    shape: tuple[int, ...]
    dtype: str
    data: np.ndarray | None          # constant contents (typed, shaped), None for activations
    scales: tuple[float, ...] = ()    # float32 values, held as Python floats
    zero_points: tuple[int, ...] = ()
    quantized_dim: int = 0
    sparse: bool = False              # stored in TFLite's sparse format (not supported)

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) if self.shape else 1

    @property
    def nbytes(self) -> int:
        return self.size * np.dtype(NUMPY_TYPES.get(self.dtype, np.int8)).itemsize

    @property
    def scale(self) -> float:
        return self.scales[0] if self.scales else 0.0

    @property
    def zero_point(self) -> int:
        return self.zero_points[0] if self.zero_points else 0


@dataclass
class Op:
    index: int
    name: str                         # builtin operator name, e.g. "CONV_2D"
    code: int
    version: int
    inputs: tuple[int, ...]           # -1: an optional input that is absent
    outputs: tuple[int, ...]
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class Model:
    tensors: list[Tensor]
    ops: list[Op]
    inputs: tuple[int, ...]
    outputs: tuple[int, ...]
    subgraphs: int
    description: str = ""


class _Table:
    """A flatbuffer table: fields are addressed by vtable slot, 4 + 2 * field id."""

    def __init__(self, buf: bytes, pos: int):
        from flatbuffers.table import Table

        self.t = Table(buf, pos)

    def _o(self, slot: int) -> int:
        return self.t.Offset(slot)

    def scalar(self, slot: int, flags: Any, default: Any) -> Any:
        o = self._o(slot)
        return self.t.Get(flags, self.t.Pos + o) if o else default

    def table(self, slot: int) -> _Table | None:
        o = self._o(slot)
        return _Table(self.t.Bytes, self.t.Indirect(self.t.Pos + o)) if o else None

    def tables(self, slot: int) -> list[_Table]:
        o = self._o(slot)
        if not o:
            return []
        start, n = self.t.Vector(o), self.t.VectorLen(o)
        return [_Table(self.t.Bytes, self.t.Indirect(start + 4 * i)) for i in range(n)]

    def vector(self, slot: int, flags: Any) -> np.ndarray | None:
        o = self._o(slot)
        return self.t.GetVectorAsNumpy(flags, o) if o else None

    def ints(self, slot: int, flags: Any) -> tuple[int, ...]:
        v = self.vector(slot, flags)
        return tuple(int(x) for x in v) if v is not None else ()

    def string(self, slot: int) -> str:
        o = self._o(slot)
        return self.t.String(self.t.Pos + o).decode("utf-8", "replace") if o else ""

    def union(self, slot: int) -> _Table | None:
        o = self._o(slot)
        if not o:
            return None
        from flatbuffers.table import Table

        t2 = Table(self.t.Bytes, 0)
        self.t.Union(t2, o)
        return _Table(self.t.Bytes, t2.Pos)


def op_name(code: int, custom: str = "") -> str:
    """The schema's name of a builtin operator code (TANH, LSTM, ...), for error messages."""
    if custom:
        return f"CUSTOM({custom})"
    if code in _CODE_NAMES:
        return _CODE_NAMES[code]
    for mod in ("tflite_micro.tensorflow.lite.micro.python.schema_py_generated",
                "ai_edge_litert.schema_py_generated", "tensorflow.lite.python.schema_py_generated"):
        try:
            ops = importlib.import_module(mod).BuiltinOperator
            names = {v: k for k, v in vars(ops).items() if isinstance(v, int) and not k.startswith("_")}
            if code in names:
                return names[code]
        except (ImportError, AttributeError):   # a missing helper module only costs the name
            pass
    return f"BUILTIN_OPERATOR_{code}"


def read_model(data: bytes) -> Model:
    """Parse the parts of a .tflite flatbuffer that inference needs (first subgraph).

    A file cut short (a copy interrupted, a download not finished) points past its
    end; that is one ExportError naming the size, not a struct error.
    """
    import struct

    data = bytes(data)
    if len(data) < 8 or data[4:8] != b"TFL3":
        raise ExportError("not a TFLite model (no 'TFL3' flatbuffer identifier): give the .tflite the "
                          "quantiser wrote")
    try:
        return _parse(data)
    except (struct.error, IndexError, UnicodeDecodeError):
        raise ExportError(f"the file is truncated or damaged ({len(data)} bytes, and its tables point past "
                          "them): copy or export the .tflite again") from None


def _parse(data: bytes) -> Model:
    from flatbuffers import number_types as N

    root = _Table(data, int.from_bytes(data[0:4], "little"))
    codes = []
    for oc in root.tables(6):
        dep = oc.scalar(4, N.Int8Flags, 0)
        builtin = oc.scalar(10, N.Int32Flags, 0)
        codes.append((max(int(dep), int(builtin)), oc.string(6), oc.scalar(8, N.Int32Flags, 1)))
    subgraphs = root.tables(8)
    if not subgraphs:
        raise ExportError("the model has no subgraph")
    sg = subgraphs[0]
    buffers = root.tables(12)
    tensors = [_tensor(i, t, data, buffers) for i, t in enumerate(sg.tables(4))]
    ops: list[Op] = []
    for i, o in enumerate(sg.tables(10)):
        code, custom, version = codes[int(o.scalar(4, N.Uint32Flags, 0))]
        name = op_name(code, custom)
        ops.append(Op(i, name, code, int(version), o.ints(6, N.Int32Flags), o.ints(8, N.Int32Flags),
                      _options(name, o.union(12))))
    return Model(tensors, ops, sg.ints(6, N.Int32Flags), sg.ints(8, N.Int32Flags), len(subgraphs),
                 root.string(10))


def _tensor(i: int, t: _Table, data: bytes, buffers: list[_Table]) -> Tensor:
    """Tensor `i`: shape, type, constant contents if its buffer has any, quantisation."""
    from flatbuffers import number_types as N

    shape = t.ints(4, N.Int32Flags)
    dtype = _TYPES.get(int(t.scalar(6, N.Int8Flags, 0)), "unknown")
    raw = _buffer_bytes(int(t.scalar(8, N.Uint32Flags, 0)), data, buffers)
    arr = None
    if raw is not None and dtype in NUMPY_TYPES:
        arr = np.frombuffer(raw, dtype=NUMPY_TYPES[dtype]).copy()
        arr = arr.reshape(shape) if arr.size == int(np.prod(shape, dtype=np.int64)) else arr
    q = t.table(12)
    scales: tuple[float, ...] = ()
    zps: tuple[int, ...] = ()
    qdim = 0
    if q is not None:
        s = q.vector(8, N.Float32Flags)
        scales = tuple(float(x) for x in s) if s is not None else ()
        zps = q.ints(10, N.Int64Flags)
        qdim = int(q.scalar(16, N.Int32Flags, 0))
    return Tensor(i, t.string(10), shape, dtype, arr, scales, zps, qdim, sparse=t.table(16) is not None)


def _buffer_bytes(i: int, data: bytes, buffers: list[_Table]) -> bytes | None:
    """Buffer `i`'s bytes: inline, or at an offset into the file (models over 2 GB); None if empty."""
    from flatbuffers import number_types as N

    if i <= 0 or i >= len(buffers):
        return None
    b = buffers[i]
    off, size = b.scalar(6, N.Uint64Flags, 0), b.scalar(8, N.Uint64Flags, 0)
    if off > 1:
        return data[off:off + size]
    v = b.vector(4, N.Uint8Flags)
    return None if v is None or len(v) == 0 else v.tobytes()


def _options(name: str, t: _Table | None) -> dict[str, Any]:
    """The builtin options of the ops we support (schema defaults where a field is absent)."""
    from flatbuffers import number_types as N

    flags = {"i8": N.Int8Flags, "i32": N.Int32Flags, "f32": N.Float32Flags, "bool": N.BoolFlags}
    cast = {"f32": float, "bool": bool}
    out = {}
    for key, slot, kind, default in OPTIONS.get(name, ()):
        v = t.scalar(slot, flags[kind], default) if t is not None else default
        out[key] = cast[kind](v) if kind in cast else v
    return out

"""`tierkit kws export`: compile an int8 .tflite into C that calls our own int8 kernels.

What a microcontroller interpreter (TFLite Micro) does at start-up, we do once,
here, on the host:

1. read the flatbuffer (a small reader over the `flatbuffers` package: no
   TensorFlow at run time);
2. check every op is one our kernels implement, and refuse the model naming
   the op otherwise;
3. compute each op's parameters with TFLite Micro's own arithmetic (padding,
   per-channel multipliers and shifts, activation ranges, the ADD and SOFTMAX
   rescalings), so the C kernels only do integer work;
4. plan memory: every activation gets a fixed offset in one static arena,
   reusing bytes of tensors that are dead, and letting an op's output overlap
   the part of its input it has already consumed (see `overlap_limit`);
5. write `model.c` / `model.h`: weights as const arrays, the parameters as
   const structs, the arena, and `<prefix>_invoke()`, which calls the kernels
   in order.

The kernels live in firmware/lib/kernels/ and are bit-exact with TFLite
Micro's reference kernels; the tests compare every output (and, in a debug
build, every intermediate tensor) with the interpreter.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

KERNELS_DIR = Path(__file__).resolve().parents[2] / "firmware" / "lib" / "kernels"

SUPPORTED_OPS = ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED", "AVERAGE_POOL_2D", "MAX_POOL_2D",
                 "RESHAPE", "SOFTMAX", "ADD")
_BUILTIN_CODES = {"ADD": 0, "AVERAGE_POOL_2D": 1, "CONV_2D": 3, "DEPTHWISE_CONV_2D": 4, "FULLY_CONNECTED": 9,
                  "MAX_POOL_2D": 17, "RESHAPE": 22, "SOFTMAX": 25}
_CODE_NAMES = {v: k for k, v in _BUILTIN_CODES.items()}
_ACTIVATIONS = {0: "NONE", 1: "RELU", 2: "RELU_N1_TO_1", 3: "RELU6", 4: "TANH", 5: "SIGN_BIT"}
_TYPES = {0: "float32", 1: "float16", 2: "int32", 3: "uint8", 4: "int64", 5: "string", 6: "bool", 7: "int16",
          8: "complex64", 9: "int8", 10: "float64", 11: "complex128", 12: "uint64", 13: "resource",
          14: "variant", 15: "uint32", 16: "uint16", 17: "int4", 18: "bfloat16"}
_NP = {"float32": np.float32, "float16": np.float16, "int32": np.int32, "uint8": np.uint8, "int64": np.int64,
       "bool": np.bool_, "int16": np.int16, "int8": np.int8, "float64": np.float64, "uint64": np.uint64,
       "uint32": np.uint32, "uint16": np.uint16}


class ExportError(Exception):
    """The model cannot be compiled; str() is one line that says what and what to do."""


class UnsupportedOpError(ExportError):
    """The model uses an op our kernels do not implement; `.ops` names them."""

    def __init__(self, ops: list[tuple[int, str]]):
        self.ops = ops
        names = ", ".join(f"{name} (op {i})" for i, name in ops)
        super().__init__(f"unsupported op{'s' if len(ops) > 1 else ''}: {names}; the int8 kernels implement "
                         f"{', '.join(SUPPORTED_OPS)} (with fused RELU/RELU6)")


# ====================================================================== the flatbuffer reader

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
        return self.size * np.dtype(_NP.get(self.dtype, np.int8)).itemsize

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
            import importlib

            ops = importlib.import_module(mod).BuiltinOperator
            names = {v: k for k, v in vars(ops).items() if isinstance(v, int) and not k.startswith("_")}
            if code in names:
                return names[code]
        except (ImportError, AttributeError):   # a missing helper module only costs the name
            pass
    return f"BUILTIN_OPERATOR_{code}"


def read_model(data: bytes) -> Model:
    """Parse the parts of a .tflite flatbuffer that inference needs (first subgraph)."""
    from flatbuffers import number_types as N

    data = bytes(data)
    if len(data) < 8 or data[4:8] != b"TFL3":
        raise ExportError("not a TFLite model (no 'TFL3' flatbuffer identifier): give the .tflite the "
                          "quantiser wrote")
    root = _Table(data, int.from_bytes(data[0:4], "little"))
    buffers = root.tables(12)
    codes = []
    for oc in root.tables(6):
        dep = oc.scalar(4, N.Int8Flags, 0)
        builtin = oc.scalar(10, N.Int32Flags, 0)
        codes.append((max(int(dep), int(builtin)), oc.string(6), oc.scalar(8, N.Int32Flags, 1)))
    subgraphs = root.tables(8)
    if not subgraphs:
        raise ExportError("the model has no subgraph")
    sg = subgraphs[0]

    def buffer_bytes(i: int) -> bytes | None:
        if i <= 0 or i >= len(buffers):
            return None
        b = buffers[i]
        off, size = b.scalar(6, N.Uint64Flags, 0), b.scalar(8, N.Uint64Flags, 0)
        if off > 1:
            return data[off:off + size]
        v = b.vector(4, N.Uint8Flags)
        return None if v is None or len(v) == 0 else v.tobytes()

    tensors: list[Tensor] = []
    for i, t in enumerate(sg.tables(4)):
        shape_v = t.vector(4, N.Int32Flags)
        shape = tuple(int(d) for d in shape_v) if shape_v is not None else ()
        dtype = _TYPES.get(int(t.scalar(6, N.Int8Flags, 0)), "unknown")
        raw = buffer_bytes(int(t.scalar(8, N.Uint32Flags, 0)))
        arr = None
        if raw is not None and dtype in _NP:
            arr = np.frombuffer(raw, dtype=_NP[dtype]).copy()
            arr = arr.reshape(shape) if arr.size == int(np.prod(shape, dtype=np.int64)) else arr
        q = t.table(12)
        scales: tuple[float, ...] = ()
        zps: tuple[int, ...] = ()
        qdim = 0
        if q is not None:
            s = q.vector(8, N.Float32Flags)
            z = q.vector(10, N.Int64Flags)
            scales = tuple(float(x) for x in s) if s is not None else ()
            zps = tuple(int(x) for x in z) if z is not None else ()
            qdim = int(q.scalar(16, N.Int32Flags, 0))
        tensors.append(Tensor(i, t.string(10), shape, dtype, arr, scales, zps, qdim, sparse=t.table(16) is not None))

    ops: list[Op] = []
    for i, o in enumerate(sg.tables(10)):
        code, custom, version = codes[int(o.scalar(4, N.Uint32Flags, 0))]
        name = op_name(code, custom)
        ins = o.vector(6, N.Int32Flags)
        outs = o.vector(8, N.Int32Flags)
        op = Op(i, name, code, int(version), tuple(int(x) for x in ins) if ins is not None else (),
                tuple(int(x) for x in outs) if outs is not None else ())
        op.options = _read_options(name, o.union(12))
        ops.append(op)
    ins = sg.vector(6, N.Int32Flags)
    outs = sg.vector(8, N.Int32Flags)
    return Model(tensors, ops, tuple(int(x) for x in ins) if ins is not None else (),
                 tuple(int(x) for x in outs) if outs is not None else (), len(subgraphs), root.string(10))


def _read_options(name: str, t: _Table | None) -> dict[str, Any]:
    """The builtin options of the ops we support (schema defaults where a field is absent)."""
    from flatbuffers import number_types as N

    i8, i32, f32 = N.Int8Flags, N.Int32Flags, N.Float32Flags

    def g(slot: int, flags: Any, default: Any) -> Any:
        return t.scalar(slot, flags, default) if t is not None else default

    if name == "CONV_2D":
        return {"padding": g(4, i8, 0), "stride_w": g(6, i32, 0), "stride_h": g(8, i32, 0), "act": g(10, i8, 0),
                    "dil_w": g(12, i32, 1), "dil_h": g(14, i32, 1)}
    if name == "DEPTHWISE_CONV_2D":
        return {"padding": g(4, i8, 0), "stride_w": g(6, i32, 0), "stride_h": g(8, i32, 0), "depth_mult": g(10, i32, 0),
                    "act": g(12, i8, 0), "dil_w": g(14, i32, 1), "dil_h": g(16, i32, 1)}
    if name == "FULLY_CONNECTED":
        return {"act": g(4, i8, 0), "weights_format": g(6, i8, 0), "keep_num_dims": bool(g(8, N.BoolFlags, False))}
    if name in ("AVERAGE_POOL_2D", "MAX_POOL_2D"):
        return {"padding": g(4, i8, 0), "stride_w": g(6, i32, 0), "stride_h": g(8, i32, 0), "filter_w": g(10, i32, 0),
                    "filter_h": g(12, i32, 0), "act": g(14, i8, 0)}
    if name == "SOFTMAX":
        return {"beta": float(g(4, f32, 0.0))}
    if name == "ADD":
        return {"act": g(4, i8, 0)}
    return {}


# ====================================================================== TFLite Micro's prepare-time arithmetic

def tf_round(x: float) -> float:
    """std::round: half away from zero (Python's round() is half to even)."""
    a = abs(x)
    f = math.floor(a)
    r = f + 1.0 if a - f >= 0.5 else f
    return math.copysign(r, x)


def quantize_multiplier(m: float) -> tuple[int, int]:
    """tflite::QuantizeMultiplier (double rounding build): m = q * 2^shift, q as Q0.31."""
    if m == 0.0:
        return 0, 0
    q, shift = math.frexp(m)
    q_fixed = int(tf_round(q * (1 << 31)))
    if q_fixed > (1 << 31):
        raise ExportError(f"multiplier {m!r} does not quantise")
    if q_fixed == (1 << 31):
        q_fixed //= 2
        shift += 1
    if shift < -31:
        shift, q_fixed = 0, 0
    return q_fixed, shift


def _f32(x: float) -> float:
    return float(np.float32(x))


def conv_multipliers(in_scale: float, w_scales: tuple[float, ...], out_scale: float,
                     channels: int) -> tuple[list[int], list[int]]:
    """PopulateConvolutionQuantizationParams: per channel, double(in) * double(w[c]) / double(out)."""
    scales = w_scales if len(w_scales) > 1 else w_scales * channels
    if len(scales) != channels:
        raise ExportError(f"filter has {len(w_scales)} scales for {channels} output channels")
    ms, ss = [], []
    for ws in scales:
        m, s = quantize_multiplier(_f32(in_scale) * _f32(ws) / _f32(out_scale))
        ms.append(m)
        ss.append(s)
    return ms, ss


def fc_multiplier_per_tensor(in_scale: float, w_scale: float, out_scale: float) -> tuple[int, int]:
    """GetQuantizedConvolutionMultipler: the product input*filter is formed in float32 first."""
    prod = float(np.float32(in_scale) * np.float32(w_scale))
    return quantize_multiplier(prod / _f32(out_scale))


def activation_range(act: int, scale: float, zero_point: int) -> tuple[int, int]:
    """CalculateActivationRangeQuantized for an int8 output: zp + round(f / scale) in float32."""
    def q(f: float) -> int:
        return zero_point + int(tf_round(float(np.float32(f) / np.float32(scale))))

    name = _ACTIVATIONS.get(act, f"activation {act}")
    if name == "NONE":
        return -128, 127
    if name == "RELU":
        return max(-128, q(0.0)), 127
    if name == "RELU6":
        return max(-128, q(0.0)), min(127, q(6.0))
    if name == "RELU_N1_TO_1":
        return max(-128, q(-1.0)), min(127, q(1.0))
    raise ExportError(f"fused activation {name} is not supported (NONE, RELU, RELU6, RELU_N1_TO_1 are)")


def out_size(padding: int, size: int, k: int, stride: int, dil: int) -> int:
    """ComputeOutSize (padding 0 = SAME, 1 = VALID)."""
    eff = (k - 1) * dil + 1
    if stride == 0:
        return 0
    return (size + stride - 1) // stride if padding == 0 else (size + stride - eff) // stride


def pad_before(stride: int, dil: int, size: int, k: int, out: int) -> int:
    """ComputePaddingWithOffset: the top/left padding; any odd extra goes bottom/right."""
    eff = (k - 1) * dil + 1
    total = max(0, (out - 1) * stride + eff - size)
    return total // 2


def softmax_params(beta: float, in_scale: float) -> tuple[int, int, int]:
    """(input_multiplier, input_left_shift, diff_min) as SoftmaxPrepare computes them for int8."""
    real = min(_f32(beta) * _f32(in_scale) * float(1 << 26), float((1 << 31) - 1))
    if not real > 1.0:
        raise ExportError(f"softmax beta*input_scale = {real / (1 << 26):.3g} is too small for TFLite Micro's "
                          "int8 softmax")
    m, shift = quantize_multiplier(real)
    if shift < 0:
        raise ExportError("softmax input multiplier has a negative shift")
    radius = math.floor(1.0 * ((1 << 5) - 1) * float(1 << (31 - 5)) / float(1 << shift))
    return m, shift, int(-1.0 * radius)


def add_params(s1: float, s2: float, so: float) -> dict[str, int]:
    """CalculateOpDataAdd for int8: both inputs to twice the larger scale with 20 bits of headroom."""
    twice_max = 2.0 * _f32(max(np.float32(s1), np.float32(s2)))
    r1, r2 = _f32(s1) / twice_max, _f32(s2) / twice_max
    ro = twice_max / (float(1 << 20) * _f32(so))
    out = {"left_shift": 20}
    for key, r in (("input1", r1), ("input2", r2), ("output", ro)):
        if not 0.0 < r < 1.0:
            raise ExportError(f"ADD rescaling {key} multiplier {r:.3g} is outside (0, 1): the output scale is "
                              "too small for the input scales")
        m, s = quantize_multiplier(r)
        if s > 0:
            raise ExportError(f"ADD {key} multiplier has a positive shift")
        out[f"{key}_multiplier"], out[f"{key}_shift"] = m, s
    return out


# ====================================================================== lowering: ops to kernel calls

@dataclass
class Step:
    """One kernel call: what the generated code does for one op."""

    op: Op
    kernel: str                      # conv, depthwise, fc, avg_pool, max_pool, add, softmax, reshape
    params: dict[str, int]           # the C parameter struct's fields
    act_inputs: list[int]            # activation tensors read (graph order)
    output: int
    consts: dict[str, np.ndarray] = field(default_factory=dict)   # filter, bias, and rq or mult/shift
    scratch: int = 0                 # bytes of scratch the kernel may use
    scratch_buffer: int = -1         # the plan's buffer for it
    lo: np.ndarray | None = None     # per output element: the lowest input index still to be read


def _need(cond: bool, msg: str) -> None:
    if not cond:
        raise ExportError(msg)


def _int8_act(m: Model, i: int, op: Op, what: str) -> Tensor:
    _need(0 <= i < len(m.tensors), f"op {op.index} {op.name}: {what} tensor is missing")
    t = m.tensors[i]
    _need(t.dtype == "int8", f"op {op.index} {op.name}: {what} tensor '{t.name}' is {t.dtype}; the kernels take "
          "int8 only (quantise with inference_input_type=tf.int8 and TFLITE_BUILTINS_INT8)")
    _need(len(t.scales) >= 1, f"op {op.index} {op.name}: {what} tensor '{t.name}' has no quantisation parameters")
    return t


def _const(m: Model, i: int, op: Op, what: str, dtype: str) -> Tensor:
    t = m.tensors[i]
    _need(t.data is not None, f"op {op.index} {op.name}: {what} '{t.name}' must be a constant")
    _need(not t.sparse, f"op {op.index} {op.name}: {what} '{t.name}' is stored sparse; convert without sparsity")
    _need(t.dtype == dtype, f"op {op.index} {op.name}: {what} '{t.name}' is {t.dtype}, expected {dtype}")
    return t


def _nhwc(t: Tensor, op: Op, what: str) -> tuple[int, int, int, int]:
    _need(len(t.shape) == 4, f"op {op.index} {op.name}: {what} must be 4-D NHWC, is {list(t.shape)}")
    return t.shape  # type: ignore[return-value]


def _window_lo(batches: int, in_h: int, in_w: int, in_c: int, out_h: int, out_w: int, out_c: int,
               k_h: int, k_w: int, s_h: int, s_w: int, d_h: int, d_w: int, p_h: int, p_w: int,
               chan_of_out: np.ndarray) -> np.ndarray:
    """Per output element (NHWC order), the flat index of the first input element its window reads."""
    big = np.iinfo(np.int64).max // 4

    def first(o: np.ndarray, s: int, d: int, p: int, size: int, k: int) -> np.ndarray:
        start = o * s - p
        f = np.where(start < 0, (-start + d - 1) // d, 0)
        pos = start + d * f
        return np.where((f < k) & (pos < size), pos, -1)

    oy, ox = np.arange(out_h), np.arange(out_w)
    iy, ix = first(oy, s_h, d_h, p_h, in_h, k_h), first(ox, s_w, d_w, p_w, in_w, k_w)
    b = np.arange(batches)
    base = ((b[:, None, None] * in_h + iy[None, :, None]) * in_w + ix[None, None, :]) * in_c
    valid = (iy[None, :, None] >= 0) & (ix[None, None, :] >= 0) & np.ones((batches, 1, 1), bool)
    lo = base[..., None] + chan_of_out[None, None, None, :]
    lo = np.where(valid[..., None], lo, big)
    return lo.reshape(-1).astype(np.int64)


def lower(m: Model) -> list[Step]:
    """Check the model and turn each op into a kernel call with TFLM's prepared parameters."""
    if m.subgraphs > 1:
        raise ExportError(f"the model has {m.subgraphs} subgraphs (control flow); only single-graph models export")
    bad = [(op.index, op.name) for op in m.ops if op.name not in SUPPORTED_OPS]
    if bad:
        raise UnsupportedOpError(bad)
    _need(len(m.inputs) >= 1 and len(m.outputs) >= 1, "the model has no inputs or outputs")
    for i in (*m.inputs, *m.outputs):
        t = m.tensors[i]
        _need(t.dtype == "int8", f"model {'input' if i in m.inputs else 'output'} '{t.name}' is {t.dtype}: export "
              "needs a fully int8 model (quantise with inference_input_type/inference_output_type = tf.int8)")
    steps: list[Step] = []
    for op in m.ops:
        steps.append(_LOWER[op.name](m, op))
    return steps


def _window_params(op: Op, name: str, x: Any, y: Any, kh: int, kw: int, depth_mult: int,
                   filter_in_c: int) -> dict[str, Any]:
    """The kernel parameters a sliding-window op (CONV_2D, DEPTHWISE_CONV_2D) shares, with the checks
    that its strides, dilations and padding produce the output shape the model declares."""
    o = op.options
    nb, ih, iw, ic = _nhwc(x, op, "input")
    _, oh, ow, oc = _nhwc(y, op, "output")
    sh, sw, dh, dw = o["stride_h"], o["stride_w"], o["dil_h"], o["dil_w"]
    _need(sh > 0 and sw > 0 and dh > 0 and dw > 0, f"op {op.index} {name}: stride and dilation must be positive")
    _need((out_size(o["padding"], ih, kh, sh, dh), out_size(o["padding"], iw, kw, sw, dw)) == (oh, ow),
          f"op {op.index} {name}: output {oh}x{ow} does not match the padding arithmetic")
    act_min, act_max = activation_range(o["act"], y.scale, y.zero_point)
    return {"batches": nb, "in_h": ih, "in_w": iw, "in_c": ic, "out_h": oh, "out_w": ow, "out_c": oc, "k_h": kh,
            "k_w": kw, "stride_h": sh, "stride_w": sw, "dil_h": dh, "dil_w": dw,
            "pad_h": pad_before(sh, dh, ih, kh, oh), "pad_w": pad_before(sw, dw, iw, kw, ow),
            "depth_mult": depth_mult, "filter_in_c": filter_in_c, "input_offset": -x.zero_point,
            "output_offset": y.zero_point, "act_min": act_min, "act_max": act_max}


def _lower_conv(m: Model, op: Op) -> Step:
    x = _int8_act(m, op.inputs[0], op, "input")
    w = _const(m, op.inputs[1], op, "filter", "int8")
    y = _int8_act(m, op.outputs[0], op, "output")
    nb, ih, iw, ic = _nhwc(x, op, "input")
    _, oh, ow, oc = _nhwc(y, op, "output")
    _need(len(w.shape) == 4 and w.shape[0] == oc, f"op {op.index} CONV_2D: filter shape {list(w.shape)} does not "
          f"match {oc} output channels")
    _, kh, kw, fic = w.shape
    _need(fic > 0 and ic % fic == 0 and oc % (ic // fic) == 0,
          f"op {op.index} CONV_2D: {ic} input channels do not split into groups of {fic}")
    p = _window_params(op, "CONV_2D", x, y, kh, kw, depth_mult=1, filter_in_c=fic)
    sh, sw, dh, dw = p["stride_h"], p["stride_w"], p["dil_h"], p["dil_w"]
    bias = _bias(m, op, oc)
    mult, shift = conv_multipliers(x.scale, w.scales, y.scale, oc)
    wk = w.data.reshape(oc, -1).astype(np.int64)
    rq, p["requant_fast"] = requant_table(mult, shift, y.zero_point, _acc_bounds(wk, bias, -x.zero_point))
    per_group = oc // (ic // fic)
    chan = (np.arange(oc) // per_group) * fic
    lo = _window_lo(nb, ih, iw, ic, oh, ow, oc, kh, kw, sh, sw, dh, dw, p["pad_h"], p["pad_w"], chan)
    consts = _consts(w, bias, mult, shift)
    consts = {"filter": pack_conv_filter(wk), **({"bias": consts["bias"]} if "bias" in consts else {}), "rq": rq}
    return Step(op, "conv", p, [x.index], y.index, consts, scratch=2 * 2 * kh * kw * ic, lo=lo)


def _lower_depthwise(m: Model, op: Op) -> Step:
    o = op.options
    x = _int8_act(m, op.inputs[0], op, "input")
    w = _const(m, op.inputs[1], op, "filter", "int8")
    y = _int8_act(m, op.outputs[0], op, "output")
    nb, ih, iw, ic = _nhwc(x, op, "input")
    _, oh, ow, oc = _nhwc(y, op, "output")
    _need(len(w.shape) == 4 and w.shape[0] == 1 and w.shape[3] == oc,
          f"op {op.index} DEPTHWISE_CONV_2D: filter shape {list(w.shape)} does not match {oc} output channels")
    _need(oc % ic == 0, f"op {op.index} DEPTHWISE_CONV_2D: {oc} output channels is not a multiple of {ic}")
    mult_d = oc // ic
    _need(o["depth_mult"] in (0, mult_d), f"op {op.index} DEPTHWISE_CONV_2D: depth_multiplier "
          f"{o['depth_mult']} disagrees with {ic} -> {oc} channels")
    _, kh, kw, _ = w.shape
    p = _window_params(op, "DEPTHWISE_CONV_2D", x, y, kh, kw, depth_mult=mult_d, filter_in_c=1)
    sh, sw, dh, dw = p["stride_h"], p["stride_w"], p["dil_h"], p["dil_w"]
    bias = _bias(m, op, oc)
    mult, shift = conv_multipliers(x.scale, w.scales, y.scale, oc)
    wt = w.data.reshape(kh * kw, oc).astype(np.int64)
    rq, p["requant_fast"] = requant_table(mult, shift, y.zero_point, _acc_bounds(wt.T, bias, -x.zero_point))
    lo = _window_lo(nb, ih, iw, ic, oh, ow, oc, kh, kw, sh, sw, dh, dw, p["pad_h"], p["pad_w"],
                    np.arange(oc) // mult_d)
    _consts(w, bias, mult, shift)       # the checks
    # the input offset folded into the bias (int32 arithmetic wraps, as the kernel's sum does)
    folded = (np.zeros(oc, np.int64) if bias is None else bias.astype(np.int64)) - x.zero_point * wt.sum(axis=0)
    folded = ((folded + 2 ** 31) % 2 ** 32 - 2 ** 31).astype(np.int32)
    consts = {"filter": pack_depthwise_filter(wt), "bias": folded, "rq": rq}
    scratch = oc * kh * ((ow - 1) * sw + (kw - 1) * dw + 1) if mult_d == 1 and ic % 4 == 0 else 0
    return Step(op, "depthwise", p, [x.index], y.index, consts, scratch=scratch, lo=lo)


def _lower_fc(m: Model, op: Op) -> Step:
    o = op.options
    x = _int8_act(m, op.inputs[0], op, "input")
    w = _const(m, op.inputs[1], op, "weights", "int8")
    y = _int8_act(m, op.outputs[0], op, "output")
    _need(o["weights_format"] == 0, f"op {op.index} FULLY_CONNECTED: shuffled weights are not supported")
    _need(len(w.shape) == 2, f"op {op.index} FULLY_CONNECTED: weights must be 2-D, are {list(w.shape)}")
    out_d, acc = w.shape
    _need(acc > 0 and x.size % acc == 0, f"op {op.index} FULLY_CONNECTED: input size {x.size} is not a multiple of "
          f"{acc}")
    batches = x.size // acc
    _need(y.size == batches * out_d, f"op {op.index} FULLY_CONNECTED: output size {y.size} != {batches}x{out_d}")
    bias = _bias(m, op, out_d)
    per_channel = len(w.scales) > 1
    if per_channel:
        mult, shift = conv_multipliers(x.scale, w.scales, y.scale, out_d)
    else:
        m1, s1 = fc_multiplier_per_tensor(x.scale, w.scale, y.scale)
        mult, shift = [m1], [s1]
    lo_, hi_ = activation_range(o["act"], y.scale, y.zero_point)
    p = {"batches": batches, "accum_depth": acc, "out_depth": out_d, "input_offset": -x.zero_point,
             "filter_offset": -w.zero_point, "output_offset": y.zero_point, "act_min": lo_, "act_max": hi_,
             "per_channel": int(per_channel)}
    lo = np.repeat(np.arange(batches, dtype=np.int64) * acc, out_d)
    return Step(op, "fc", p, [x.index], y.index, _consts(w, bias, mult, shift), lo=lo)


def _lower_pool(m: Model, op: Op) -> Step:
    o = op.options
    x = _int8_act(m, op.inputs[0], op, "input")
    y = _int8_act(m, op.outputs[0], op, "output")
    nb, ih, iw, ic = _nhwc(x, op, "input")
    _, oh, ow, oc = _nhwc(y, op, "output")
    _need(ic == oc, f"op {op.index} {op.name}: {ic} input channels but {oc} output channels")
    kh, kw, sh, sw = o["filter_h"], o["filter_w"], o["stride_h"], o["stride_w"]
    _need(min(kh, kw, sh, sw) > 0, f"op {op.index} {op.name}: window and stride must be positive")
    _need((out_size(o["padding"], ih, kh, sh, 1), out_size(o["padding"], iw, kw, sw, 1)) == (oh, ow),
          f"op {op.index} {op.name}: output {oh}x{ow} does not match the padding arithmetic")
    lo_, hi_ = activation_range(o["act"], y.scale, y.zero_point)
    p = {"batches": nb, "in_h": ih, "in_w": iw, "in_c": ic, "out_h": oh, "out_w": ow, "out_c": oc, "k_h": kh, "k_w": kw, "stride_h": sh,
             "stride_w": sw, "dil_h": 1, "dil_w": 1, "pad_h": pad_before(sh, 1, ih, kh, oh), "pad_w": pad_before(sw, 1, iw, kw, ow),
             "depth_mult": 1, "filter_in_c": 1, "input_offset": -x.zero_point, "output_offset": y.zero_point,
             "act_min": lo_, "act_max": hi_}
    lo = _window_lo(nb, ih, iw, ic, oh, ow, oc, kh, kw, sh, sw, 1, 1, p["pad_h"], p["pad_w"], np.arange(oc))
    return Step(op, "avg_pool" if op.name == "AVERAGE_POOL_2D" else "max_pool", p, [x.index], y.index, lo=lo)


def _lower_reshape(m: Model, op: Op) -> Step:
    x = _int8_act(m, op.inputs[0], op, "input")
    y = _int8_act(m, op.outputs[0], op, "output")
    _need(x.size == y.size, f"op {op.index} RESHAPE: {x.size} elements in, {y.size} out")
    return Step(op, "reshape", {}, [x.index], y.index)


def _lower_softmax(m: Model, op: Op) -> Step:
    x = _int8_act(m, op.inputs[0], op, "input")
    y = _int8_act(m, op.outputs[0], op, "output")
    _need(y.zero_point == -128 and np.float32(y.scale) == np.float32(1.0 / 256),
          f"op {op.index} SOFTMAX: int8 output must have scale 1/256 and zero point -128 (has {y.scale:.6g}, "
          f"{y.zero_point}), as TFLite Micro requires")
    _need(len(x.shape) >= 1 and x.shape[-1] > 0, f"op {op.index} SOFTMAX: input has no classes axis")
    depth = x.shape[-1]
    mult, shift, diff_min = softmax_params(op.options["beta"], x.scale)
    p = {"outer": x.size // depth, "depth": depth, "input_multiplier": mult, "input_left_shift": shift, "diff_min": diff_min}
    return Step(op, "softmax", p, [x.index], y.index, lo=np.arange(x.size, dtype=np.int64))


def _lower_add(m: Model, op: Op) -> Step:
    a = _int8_act(m, op.inputs[0], op, "input 1")
    b = _int8_act(m, op.inputs[1], op, "input 2")
    y = _int8_act(m, op.outputs[0], op, "output")
    try:
        out_shape = np.broadcast_shapes(a.shape, b.shape)
    except ValueError:
        raise ExportError(f"op {op.index} ADD: shapes {list(a.shape)} and {list(b.shape)} do not broadcast") from None
    _need(tuple(out_shape) == tuple(y.shape) or int(np.prod(out_shape)) == y.size,
          f"op {op.index} ADD: output shape {list(y.shape)} is not the broadcast {list(out_shape)}")
    _need(len(out_shape) <= 6, f"op {op.index} ADD: more than 6 dimensions")
    dims = [1] * (6 - len(out_shape)) + list(out_shape)

    def strides(shape: tuple[int, ...]) -> list[int]:
        s = [1] * (6 - len(shape)) + list(shape)
        st, acc = [0] * 6, 1
        for d in range(5, -1, -1):
            st[d] = 0 if s[d] == 1 and dims[d] != 1 else acc
            acc *= s[d]
        return st

    p = dict(size=y.size, broadcast=int(a.shape != b.shape), dims=dims, stride1=strides(a.shape),
             stride2=strides(b.shape), **add_params(a.scale, b.scale, y.scale),
             input1_offset=-a.zero_point, input2_offset=-b.zero_point, output_offset=y.zero_point)
    p["act_min"], p["act_max"] = activation_range(op.options["act"], y.scale, y.zero_point)
    lo = np.arange(y.size, dtype=np.int64) if not p["broadcast"] else None
    return Step(op, "add", p, [a.index, b.index], y.index, lo=lo)


def _bias(m: Model, op: Op, n: int) -> np.ndarray | None:
    if len(op.inputs) < 3 or op.inputs[2] < 0:
        return None
    b = _const(m, op.inputs[2], op, "bias", "int32")
    _need(b.size == n, f"op {op.index} {op.name}: bias has {b.size} values for {n} channels")
    return b.data.reshape(-1).astype(np.int32)


def _consts(w: Tensor, bias: np.ndarray | None, mult: list[int], shift: list[int]) -> dict[str, np.ndarray]:
    c = {"filter": w.data.reshape(-1).astype(np.int8), "mult": np.array(mult, np.int64),
         "shift": np.array(shift, np.int64)}
    if bias is not None:
        c["bias"] = bias
    if (c["mult"] < 0).any():
        raise ExportError(f"negative requantisation multiplier for filter '{w.name}' (negative scale?)")
    return c


def pack_conv_filter(w: np.ndarray) -> np.ndarray:
    """(out_c, K) int8 weights in the kernels' CONV_2D layout (kws_kernels.h): channel pairs, each
    group of four K positions as 4 bytes of one channel then 4 of the other, the K % 4 tails after;
    pairs KWS_CONV_PAIR_STRIDE(K) bytes apart; a last odd channel in natural order."""
    oc, k = w.shape
    k4, stride = k & ~3, (2 * k + 3) & ~3
    out = np.zeros((oc // 2) * stride + (k if oc % 2 else 0), np.int8)
    for q in range(oc // 2):
        a, b = w[2 * q].astype(np.int8), w[2 * q + 1].astype(np.int8)
        groups = np.stack([a[:k4].reshape(-1, 4), b[:k4].reshape(-1, 4)], axis=1).reshape(-1)
        out[q * stride:q * stride + 2 * k] = np.concatenate([groups, a[k4:], b[k4:]])
    if oc % 2:
        out[(oc // 2) * stride:] = w[-1]
    return out


def pack_depthwise_filter(w: np.ndarray) -> np.ndarray:
    """(taps, out_c) weights as the kernels' int16 DEPTHWISE_CONV_2D layout: for each full group of
    four channels, every tap's four weights as c0 c2 c1 c3 (the order SXTB16 unpacks a word of input
    in); then the channels past the last full group, [tap][channel]."""
    taps, oc = w.shape
    full = oc & ~3
    groups = w[:, :full].reshape(taps, full // 4, 4)[:, :, [0, 2, 1, 3]].transpose(1, 0, 2).reshape(-1)
    return np.concatenate([groups, w[:, full:].reshape(-1)]).astype(np.int16)


def _acc_bounds(w: np.ndarray, bias: np.ndarray | None, input_offset: int) -> list[int]:
    """Per output channel (rows of w), the largest |accumulator| any int8 input can give:
    |bias| + max|x + input_offset| * sum|w|."""
    most = max(abs(-128 + input_offset), abs(127 + input_offset))
    b = np.zeros(w.shape[0], np.int64) if bias is None else np.abs(bias.astype(np.int64))
    return [int(v) for v in b + most * np.abs(w).sum(axis=1)]


def requant_table(mult: list[int], shift: list[int], output_offset: int, bounds: list[int]) -> tuple[np.ndarray, int]:
    """The kernels' requantisation rows {M, left + 1, right, rounding} per channel, and 1 when the
    fast form (SMMULR, then one add and an arithmetic shift; kws_kernels.c) is exact for every
    accumulator the layer can produce: right >= 1, acc << (left + 1) stays in int32, and so does
    v + (v >> 31) + 2^(right-1) + output_offset * 2^right with |v| <= |acc| * 2^left + 1."""
    rows, fast = [], True
    for m, s, bound in zip(mult, shift, bounds):
        left, right = max(s, 0), max(-s, 0)
        if m == 0:                      # the result is output_offset either way; right >= 1 keeps it fast
            left, right = 0, 1
        rows.append((m, left, right))
        fast = fast and right >= 1 and (bound << (left + 1)) < 2 ** 31 and \
            (bound << left) + 2 + (1 << (right - 1)) + (128 << right) < 2 ** 31
    table = [(m, left + 1, right, ((1 << (right - 1)) + (output_offset << right)) if fast else 0)
             for m, left, right in rows]
    return np.array(table, np.int64).reshape(-1), int(fast)


_LOWER = {"CONV_2D": _lower_conv, "DEPTHWISE_CONV_2D": _lower_depthwise, "FULLY_CONNECTED": _lower_fc,
          "AVERAGE_POOL_2D": _lower_pool, "MAX_POOL_2D": _lower_pool, "RESHAPE": _lower_reshape,
          "SOFTMAX": _lower_softmax, "ADD": _lower_add}


# ====================================================================== the static memory plan

def overlap_limit(lo: np.ndarray) -> float:
    """The largest (output offset - input offset) at which an op can write over its own input.

    `lo[k]` is the lowest input index output element k (NHWC order) reads. The
    kernels (kws_kernels.h, "In-place safety") read what an output needs before
    writing it, and after writing output j read only what outputs after j need.
    Writing output j at byte out+j destroys input byte out+j-in; that byte must
    lie below L(j) = min over k > j of lo[k], the lowest input index still to be
    read. So out - in <= L(j) - j - 1 for every j. For a 3x3 depthwise
    convolution that is one image row and a pixel; for a 1x1 convolution, one
    pixel; for elementwise ops and softmax, 0 (in place).
    """
    if lo is None or len(lo) == 0:
        return -math.inf
    if len(lo) == 1:
        return math.inf
    suffix_min = np.minimum.accumulate(lo[::-1])[::-1]      # suffix_min[j] = min(lo[j:])
    later = suffix_min[1:]                                   # L(j) for j = 0..n-2
    return float(np.min(later - np.arange(len(later))) - 1)


@dataclass
class Buffer:
    """Storage for one tensor and its RESHAPE aliases."""

    id: int
    tensors: list[int]
    size: int
    kind: str                  # "arena", "input", "output", "const", "scratch"
    ext: int = -1              # index into inputs/outputs for kind input/output
    start: int = 0             # first op that writes it
    end: int = 0               # last op that reads it (len(ops) if copied out after the last op)
    offset: int = -1           # arena offset


@dataclass
class MemoryPlan:
    buffers: list[Buffer]
    tensor_buffer: dict[int, int]
    arena_bytes: int
    overlaps: dict[tuple[int, int], float]   # (input buffer, output buffer) -> max offset difference
    copies_out: list[tuple[int, int]]        # (graph output k, buffer id) copied after the last op

    def naive_bytes(self) -> int:
        """The least arena any plan without overlap can have: the most bytes live at any one op."""
        arena = [b for b in self.buffers if b.kind in ("arena", "scratch")]
        if not arena:
            return 0
        last = max(b.end for b in arena)
        return max(sum(b.size for b in arena if b.start <= t <= b.end) for t in range(last + 1))


def _align(n: int, a: int = 4) -> int:
    return (n + a - 1) // a * a


def plan_memory(m: Model, steps: list[Step], *, overlap: bool = True) -> MemoryPlan:
    """Give every activation an arena offset; graph inputs and outputs stay in the caller's buffers.

    Greedy first-fit (each buffer at the lowest offset that conflicts with no
    buffer placed before it), where two buffers may share bytes if their
    lifetimes do not overlap, or if one is the input of the op that produces
    the other, the input dies there, and the output's offset respects
    `overlap_limit`. An output may only overlap its input from below, so a
    chain of such ops steps down through the arena: placing the last buffers
    first (at the bottom) finds that layout, where TFLite Micro's order
    (largest first) would ping-pong two whole buffers. Three orderings are
    tried and the smallest arena kept; RESHAPE outputs alias their input.
    """
    parent = {i: i for i in range(len(m.tensors))}

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for s in steps:
        if s.kernel == "reshape":
            parent[find(s.output)] = find(s.act_inputs[0])
    groups: dict[int, list[int]] = {}
    used = {t for s in steps for t in (*s.act_inputs, s.output)} | set(m.inputs) | set(m.outputs)
    for t in sorted(used):
        groups.setdefault(find(t), []).append(t)

    buffers: list[Buffer] = []
    tensor_buffer: dict[int, int] = {}
    copies_out: list[tuple[int, int]] = []
    n_ops = len(steps)
    for members in groups.values():
        b = Buffer(len(buffers), members, max(m.tensors[t].nbytes for t in members), "arena")
        ins = [k for k, t in enumerate(m.inputs) if t in members]
        outs = [k for k, t in enumerate(m.outputs) if t in members]
        if any(m.tensors[t].data is not None for t in members):
            b.kind = "const"
        elif ins:
            b.kind, b.ext = "input", ins[0]
        elif len(outs) == 1:
            b.kind, b.ext = "output", outs[0]
        writers = [i for i, s in enumerate(steps) if s.output in members and s.kernel != "reshape"]
        readers = [i for i, s in enumerate(steps) if set(s.act_inputs) & set(members)]
        b.start = min(writers) if writers else -1
        b.end = max(readers + [b.start])
        for k in outs:
            if not (b.kind == "output" and b.ext == k):
                copies_out.append((k, b.id))
                b.end = n_ops
        buffers.append(b)
        for t in members:
            tensor_buffer[t] = b.id
    for i, s in enumerate(steps):
        if s.scratch:
            b = Buffer(len(buffers), [], s.scratch, "scratch", start=i, end=i)
            buffers.append(b)
            s.scratch_buffer = b.id

    overlaps: dict[tuple[int, int], float] = {}
    if overlap:
        for i, s in enumerate(steps):
            if s.kernel == "reshape" or s.lo is None:
                continue
            yb = buffers[tensor_buffer[s.output]]
            if yb.kind != "arena":
                continue
            limit = overlap_limit(s.lo)
            for t in s.act_inputs:
                xb = buffers[tensor_buffer[t]]
                if xb.kind == "arena" and xb.end == i and xb.id != yb.id and limit > -math.inf:
                    key = (xb.id, yb.id)
                    overlaps[key] = min(overlaps.get(key, math.inf), limit)

    arena = [b for b in buffers if b.kind in ("arena", "scratch")]

    def place(order: list[Buffer]) -> dict[int, int]:
        off: dict[int, int] = {}
        for b in order:
            forbidden: list[tuple[float, float]] = []
            for u in order:
                if u.id not in off or u.start > b.end or b.start > u.end:
                    continue
                ou = off[u.id]
                if (u.id, b.id) in overlaps:       # b is the output written over input u
                    d = overlaps[(u.id, b.id)]
                    forbidden.append((ou + max(d, -b.size), ou + u.size))
                elif (b.id, u.id) in overlaps:     # b is the input that output u overwrites
                    d = overlaps[(b.id, u.id)]
                    forbidden.append((ou - b.size, min(ou - d, ou + u.size)))
                else:
                    forbidden.append((ou - b.size, ou + u.size))
            cands = sorted({0} | {_align(math.ceil(hi)) for _, hi in forbidden if hi > 0})
            for c in cands:
                if all(not (lo < c < hi) for lo, hi in forbidden):
                    off[b.id] = c
                    break
        return off

    best: dict[int, int] | None = None
    # Scratch goes last in every order: small, it fits in whatever gap its op leaves.
    tensors_ = [b for b in arena if b.kind == "arena"]
    scratch = sorted((b for b in arena if b.kind == "scratch"), key=lambda b: -b.size)
    orders = (sorted(tensors_, key=lambda b: (-b.size, b.start)),           # TFLite Micro's order
              sorted(tensors_, key=lambda b: (-b.end, -b.start, -b.size)),  # last first: lets chains of
              sorted(tensors_, key=lambda b: (b.start, -b.size)))           # overlapping ops step down
    for order in (o + scratch for o in orders):
        off = place(order)
        total = max((off[b.id] + b.size for b in arena), default=0)
        if best is None or total < max((best[b.id] + b.size for b in arena), default=0):
            best = off
    for b in arena:
        b.offset = best[b.id] if best else 0
    arena_bytes = _align(max((b.offset + b.size for b in arena), default=0))
    return MemoryPlan(buffers, tensor_buffer, arena_bytes, overlaps, copies_out)


def check_plan(plan: MemoryPlan) -> None:
    """Assert no two simultaneously live arena buffers share a byte, except as the overlap rule allows."""
    arena = [b for b in plan.buffers if b.kind in ("arena", "scratch")]
    for i, a in enumerate(arena):
        assert a.offset >= 0 and a.offset + a.size <= plan.arena_bytes
        for b in arena[i + 1:]:
            if a.start > b.end or b.start > a.end:
                continue
            if a.offset + a.size <= b.offset or b.offset + b.size <= a.offset:
                continue
            if (a.id, b.id) in plan.overlaps:
                assert b.offset - a.offset <= plan.overlaps[(a.id, b.id)], (a, b)
            elif (b.id, a.id) in plan.overlaps:
                assert a.offset - b.offset <= plan.overlaps[(b.id, a.id)], (a, b)
            else:
                raise AssertionError(f"buffers {a.id} and {b.id} overlap while both live")


# ====================================================================== C code generation

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


def _c_array(ctype: str, name: str, values: np.ndarray, per_line: int = 24, align: bool = False) -> str:
    vals = [str(int(v)) for v in np.asarray(values).reshape(-1)]
    if not vals:
        vals = ["0"]
    lines = [", ".join(vals[i:i + per_line]) for i in range(0, len(vals), per_line)]
    body = ",\n  ".join(lines)
    return f"static const {ctype} {name}[{len(vals)}]{' KWS_ALIGN4' if align else ''} = {{\n  {body}\n}};\n"


def _c_struct(ctype: str, name: str, params: dict[str, Any]) -> str:
    fields = []
    for k, v in params.items():
        if isinstance(v, (list, tuple)):
            fields.append(f".{k} = {{{', '.join(str(int(x)) for x in v)}}}")
        else:
            fields.append(f".{k} = {int(v)}")
    return f"static const {ctype} {name} = {{{', '.join(fields)}}};\n"


def _ident(s: str) -> str:
    out = "".join(c if c.isalnum() or c == "_" else "_" for c in s)
    if not out or out[0].isdigit():
        out = "_" + out
    return out


def generate_c(m: Model, steps: list[Step], plan: MemoryPlan, *, prefix: str = "kws_model",
               header: str = "model.h", source_name: str = "model.tflite") -> tuple[str, str, int]:
    """(model.c text, model.h text, bytes of constants)."""
    P, U = _ident(prefix), _ident(prefix).upper()
    tb = plan.tensor_buffer
    const_bytes = 0
    decls: list[str] = []
    body: list[str] = []
    const_names: dict[int, str] = {}

    def ptr(t: int, writable: bool = False) -> str:
        b = plan.buffers[tb[t]]
        if b.kind == "arena":
            return f"(ARENA + {b.offset})"
        if b.kind == "input":
            if writable:
                raise ExportError(f"tensor {t} would be written into the caller's input buffer")
            return f"inputs[{b.ext}]"
        if b.kind == "output":
            return f"outputs[{b.ext}]"
        # a constant activation operand (e.g. ADD with a constant): a flash array
        nonlocal const_bytes
        if t not in const_names:
            src = next(x for x in b.tensors if m.tensors[x].data is not None)
            name = f"c{src}"
            decls.append(_c_array("int8_t", name, m.tensors[src].data))
            const_bytes += m.tensors[src].nbytes
            const_names[t] = name
        return const_names[t]

    for i, s in enumerate(steps):
        op = s.op
        tag = f"op{i}"
        names = {}
        for key, ctype in (("filter", "int8_t"), ("bias", "int32_t"), ("mult", "int32_t"), ("shift", "int32_t"),
                           ("rq", "int32_t")):
            if key in s.consts:
                if key == "filter" and s.kernel == "depthwise":
                    ctype = "int16_t"
                names[key] = f"{tag}_{key}"
                decls.append(_c_array(ctype, names[key], s.consts[key], align=key == "filter"))
                const_bytes += s.consts[key].size * {"int8_t": 1, "int16_t": 2, "int32_t": 4}[ctype]
        out = ptr(s.output, writable=s.kernel != "reshape")
        ins = [ptr(t) for t in s.act_inputs]
        y = m.tensors[s.output]
        comment = f"  /* op {i}: {op.name} {list(m.tensors[s.act_inputs[0]].shape)} -> {list(y.shape)} */\n"
        bias = names.get("bias", "0")
        if s.kernel in ("conv", "depthwise", "avg_pool", "max_pool"):
            decls.append(_c_struct("kws_conv_params_t", f"{tag}_p", s.params))
            const_bytes += 4 * 20
        if s.kernel == "conv":
            sb = plan.buffers[s.scratch_buffer]
            call = (f"kws_conv2d_s8(&{tag}_p, {ins[0]}, {names['filter']}, {bias}, {names['rq']}, {out}, "
                    f"(int16_t *)(void *)(ARENA + {sb.offset}));")
        elif s.kernel == "depthwise":
            scratch = (f"ARENA + {plan.buffers[s.scratch_buffer].offset}" if s.scratch_buffer >= 0 else "0")
            call = (f"kws_depthwise_conv2d_s8(&{tag}_p, {ins[0]}, {names['filter']}, {bias}, {names['rq']}, {out}, "
                    f"{scratch});")
        elif s.kernel == "fc":
            decls.append(_c_struct("kws_fc_params_t", f"{tag}_p", s.params))
            const_bytes += 4 * 9
            call = (f"kws_fully_connected_s8(&{tag}_p, {ins[0]}, {names['filter']}, {bias}, {names['mult']}, "
                    f"{names['shift']}, {out});")
        elif s.kernel == "avg_pool":
            call = f"if (kws_avg_pool_s8(&{tag}_p, {ins[0]}, {out}) != 0) return -1;"
        elif s.kernel == "max_pool":
            call = f"kws_max_pool_s8(&{tag}_p, {ins[0]}, {out});"
        elif s.kernel == "add":
            decls.append(_c_struct("kws_add_params_t", f"{tag}_p", s.params))
            const_bytes += 4 * 32
            call = f"kws_add_s8(&{tag}_p, {ins[0]}, {ins[1]}, {out});"
        elif s.kernel == "softmax":
            decls.append(_c_struct("kws_softmax_params_t", f"{tag}_p", s.params))
            const_bytes += 4 * 5
            call = f"kws_softmax_s8(&{tag}_p, {ins[0]}, {out});"
        elif s.kernel == "reshape":
            src = ins[0]
            call = "/* RESHAPE: same bytes, no code */"
            if plan.tensor_buffer[s.output] != plan.tensor_buffer[s.act_inputs[0]]:  # pragma: no cover
                call = f"memcpy({out}, {src}, {y.nbytes});"
        else:  # pragma: no cover - lower() only makes the kinds above
            raise ExportError(f"no code for {s.kernel}")
        body.append(comment + f"  {call}\n  {U}_DUMP({i}, {s.output}, {ptr(s.output)}, {y.nbytes});\n")

    for k, bid in plan.copies_out:
        b = plan.buffers[bid]
        t = m.outputs[k]
        src = ptr(b.tensors[0])
        body.append(f"  memcpy(outputs[{k}], {src}, {m.tensors[t].nbytes});  /* graph output {k} */\n")

    ins_t = [m.tensors[t] for t in m.inputs]
    outs_t = [m.tensors[t] for t in m.outputs]
    single = len(ins_t) == 1 and len(outs_t) == 1
    h_lines = [
        f"/* {header}: generated by `tierkit kws export` from {source_name}; do not edit. */",
        f"#ifndef {U}_H", f"#define {U}_H", "", "#include <stdint.h>", "",
        "#ifdef __cplusplus", 'extern "C" {', "#endif", "",
        f"#define {U}_ARENA_BYTES {plan.arena_bytes}   /* static RAM for activations (the arena in {Path(header).stem}.c) */",
        f"#define {U}_CONST_BYTES {const_bytes}   /* weights, biases, requantisation tables (flash) */",
        f"#define {U}_NUM_INPUTS {len(ins_t)}", f"#define {U}_NUM_OUTPUTS {len(outs_t)}",
        f"#define {U}_NUM_OPS {len(steps)}",
    ]
    for k, t in enumerate(ins_t):
        sfx = "" if k == 0 else f"_{k}"
        h_lines += [f"#define {U}_INPUT{sfx}_SIZE {t.size}   /* int8, shape {list(t.shape)} */",
                    f"#define {U}_INPUT{sfx}_SCALE {t.scale!r}f",
                    f"#define {U}_INPUT{sfx}_ZERO_POINT ({t.zero_point})"]
    for k, t in enumerate(outs_t):
        sfx = "" if k == 0 else f"_{k}"
        h_lines += [f"#define {U}_OUTPUT{sfx}_SIZE {t.size}   /* int8, shape {list(t.shape)} */",
                    f"#define {U}_OUTPUT{sfx}_SCALE {t.scale!r}f",
                    f"#define {U}_OUTPUT{sfx}_ZERO_POINT ({t.zero_point})"]
    h_lines += [
        "",
        "/* Run the model: `in` holds the quantised input (q = round(x / SCALE) + ZERO_POINT, clamped",
        " * to int8), `out` receives the int8 output. Returns 0, or -1 if an average pool window was",
        " * empty. Not reentrant: the activations live in one static arena. */",
        *([f"int {P}_invoke(const int8_t *in, int8_t *out);", ""] if single else
          [f"/* ({P}_invoke(in, out) exists for one-input one-output models only.) */", ""]),
        "/* Any model: inputs and outputs in graph order. */",
        f"int {P}_invoke_io(const int8_t *const *inputs, int8_t *const *outputs);",
        "",
        f"#ifdef {U}_DEBUG",
        "/* Debug builds call this after every op with the tensor it wrote (TFLite tensor index). */",
        f"typedef void (*{P}_debug_fn)(int op, int tensor, const int8_t *data, int32_t bytes, void *user);",
        f"void {P}_set_debug_hook({P}_debug_fn fn, void *user);",
        "#endif", "", "#ifdef __cplusplus", "}", "#endif", "", f"#endif /* {U}_H */", ""]

    scratch_lines = [f" *   op {i:>2} scratch               arena [{plan.buffers[s.scratch_buffer].offset}, "
                     f"{plan.buffers[s.scratch_buffer].offset + s.scratch})"
                     for i, s in enumerate(steps) if s.scratch_buffer >= 0]
    layout = [f" *   op {i:>2} {s.op.name:<18} t{s.output:<4} " + (
        f"arena [{plan.buffers[tb[s.output]].offset}, {plan.buffers[tb[s.output]].offset + m.tensors[s.output].nbytes})"
        if plan.buffers[tb[s.output]].kind == "arena" else plan.buffers[tb[s.output]].kind)
        for i, s in enumerate(steps)]
    c = [f"/* Generated by `tierkit kws export` from {source_name}; do not edit.",
         " *",
         f" * {len(steps)} ops, arena {plan.arena_bytes} B (outputs may overlap the inputs they consume;",
         " * see tiers/tier0/export.py). Memory plan:",
         *layout, *scratch_lines, " */",
         f'#include "{header}"', "", '#include <string.h>', "", '#include "kws_kernels.h"', "",
         *(["/* int32 alignment for the int16 scratch and the DSP path's word loads */",
            f"static union {{ int32_t align; int8_t bytes[{plan.arena_bytes}]; }} {P}_arena;",
            f"#define ARENA ({P}_arena.bytes)"] if plan.arena_bytes else ["/* no arena: nothing to store */"]),
         "",
         f"#ifdef {U}_DEBUG",
         f"static {P}_debug_fn dbg_fn;", "static void *dbg_user;",
         f"void {P}_set_debug_hook({P}_debug_fn fn, void *user) {{ dbg_fn = fn; dbg_user = user; }}",
         f"#define {U}_DUMP(op, t, p, n) do {{ if (dbg_fn) dbg_fn((op), (t), (p), (n), dbg_user); }} while (0)",
         "#else",
         f"#define {U}_DUMP(op, t, p, n) ((void)0)",
         "#endif", "", *decls, "",
         f"int {P}_invoke_io(const int8_t *const *inputs, int8_t *const *outputs) {{",
         "  (void)inputs; (void)outputs;", *body, "  return 0;", "}", "",
         *([f"int {P}_invoke(const int8_t *in, int8_t *out) {{",
            "  const int8_t *ins[1]; int8_t *outs[1];",
            "  ins[0] = in; outs[0] = out;",
            f"  return {P}_invoke_io(ins, outs);", "}", ""] if single else [])]
    return "\n".join(c), "\n".join(h_lines), const_bytes


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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
    _write_atomic(h_path, h_text)
    _write_atomic(c_path, c_text)
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

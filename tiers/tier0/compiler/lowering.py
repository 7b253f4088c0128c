"""Lowering: check each op of the model and turn it into one kernel call with its parameters ready.

    for op in model.ops:                                   CONV_2D ─► Step(kernel="conv")
        step = LOWER[op.name](model, op)                      params   the C struct's fields (abi.CONV)
                                                              consts   packed filter, bias, requant rows
                                                              scratch  bytes of arena it may use
                                                              lo       what it still reads, for in-place
        step.call(operands) -> "kws_conv2d_s8(&op3_p, ...);"  its own line of C (abi.KERNELS)

A model the kernels cannot run is refused here, naming the op and what to do
(an unsupported op, a float tensor, a sparse filter, shapes that disagree).
Adding a kernel is one lowering function here, one entry in abi.KERNELS (its
struct and its call), and the kernel itself in firmware/lib/kernels/.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tiers.tier0.compiler import ExportError, abi
from tiers.tier0.compiler.prepare import (
    acc_bounds,
    activation_range,
    add_params,
    conv_multipliers,
    fc_multiplier_per_tensor,
    out_size,
    pad_before,
    requant_table,
    softmax_params,
)
from tiers.tier0.compiler.tflite import Model, Op, Tensor

CONST_ORDER = ("filter", "bias", "mult", "shift", "rq")      # the order their arrays are declared in
CTYPE_BYTES = {"int8_t": 1, "int16_t": 2, "int32_t": 4}


class UnsupportedOpError(ExportError):
    """The model uses an op our kernels do not implement; `.ops` names them."""

    def __init__(self, ops: list[tuple[int, str]]):
        self.ops = ops
        names = ", ".join(f"{name} (op {i})" for i, name in ops)
        super().__init__(f"unsupported op{'s' if len(ops) > 1 else ''}: {names}; the int8 kernels implement "
                         f"{', '.join(SUPPORTED_OPS)} (with fused RELU/RELU6)")


# ====================================================================== steps: one kernel call each

@dataclass
class Operands:
    """What a kernel call names, as C expressions: its parameter block, constants, tensors, scratch."""

    params: str                  # the const struct, e.g. "op3_p"
    consts: dict[str, str]       # "filter" -> "op3_filter", ...
    ins: list[str]               # activation inputs: "(ARENA + 512)", "inputs[0]", a constant array
    out: str
    scratch: str | None          # "ARENA + 1024", or None when the step has no scratch


@dataclass
class Step:
    """One kernel call: what the generated code does for one op."""

    op: Op
    kernel: str                      # a key of abi.KERNELS: conv, depthwise, fc, avg_pool, max_pool, add, ...
    params: dict[str, Any]           # the C parameter struct's fields
    act_inputs: list[int]            # activation tensors read (graph order)
    output: int
    consts: dict[str, np.ndarray] = field(default_factory=dict)   # filter, bias, and rq or mult/shift
    scratch: int = 0                 # bytes of scratch the kernel may use
    scratch_buffer: int = -1         # the plan's buffer for it
    lo: np.ndarray | None = None     # per output element: the lowest input index still to be read

    @property
    def struct(self) -> abi.Struct | None:
        """Its parameter block's C struct."""
        return abi.KERNELS[self.kernel].struct

    def ctype(self, key: str) -> str:
        """The C type of constant array `key`."""
        return abi.KERNELS[self.kernel].filter_ctype if key == "filter" else "int32_t"

    def call(self, a: Operands) -> str:
        """Its line of C: the kernel's call with the operands filled in."""
        ins = {f"in{k}": x for k, x in enumerate(a.ins)}
        return abi.KERNELS[self.kernel].call.format(params=a.params, out=a.out, scratch=a.scratch or "0",
                                                    **{"bias": "0", **a.consts}, **ins)


# ====================================================================== checks

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


def _bias(m: Model, op: Op, n: int) -> np.ndarray | None:
    if len(op.inputs) < 3 or op.inputs[2] < 0:
        return None
    b = _const(m, op.inputs[2], op, "bias", "int32")
    _need(b.size == n, f"op {op.index} {op.name}: bias has {b.size} values for {n} channels")
    return b.data.reshape(-1).astype(np.int32)


def _multipliers(w: Tensor, mult: list[int]) -> None:
    if (np.array(mult, np.int64) < 0).any():
        raise ExportError(f"negative requantisation multiplier for filter '{w.name}' (negative scale?)")


# ====================================================================== the whole model

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
    return [LOWER[op.name](m, op) for op in m.ops]


# ====================================================================== sliding windows

def window_lo(batches: int, in_h: int, in_w: int, in_c: int, out_h: int, out_w: int, out_c: int,
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


def _window_params(op: Op, x: Tensor, y: Tensor, k: tuple[int, int], stride: tuple[int, int],
                   dil: tuple[int, int], depth_mult: int, filter_in_c: int) -> dict[str, Any]:
    """The kws_conv_params_t every sliding-window op fills (convolutions and pools), after checking
    that its strides, dilations and padding produce the output shape the model declares."""
    o = op.options
    nb, ih, iw, ic = _nhwc(x, op, "input")
    _, oh, ow, oc = _nhwc(y, op, "output")
    (kh, kw), (sh, sw), (dh, dw) = k, stride, dil
    _need((out_size(o["padding"], ih, kh, sh, dh), out_size(o["padding"], iw, kw, sw, dw)) == (oh, ow),
          f"op {op.index} {op.name}: output {oh}x{ow} does not match the padding arithmetic")
    act_min, act_max = activation_range(o["act"], y.scale, y.zero_point)
    return {"batches": nb, "in_h": ih, "in_w": iw, "in_c": ic, "out_h": oh, "out_w": ow, "out_c": oc, "k_h": kh,
            "k_w": kw, "stride_h": sh, "stride_w": sw, "dil_h": dh, "dil_w": dw,
            "pad_h": pad_before(sh, dh, ih, kh, oh), "pad_w": pad_before(sw, dw, iw, kw, ow),
            "depth_mult": depth_mult, "filter_in_c": filter_in_c, "input_offset": -x.zero_point,
            "output_offset": y.zero_point, "act_min": act_min, "act_max": act_max}


def _params_lo(p: dict[str, Any], chan_of_out: np.ndarray) -> np.ndarray:
    """window_lo for a window op's parameter block."""
    return window_lo(*(p[k] for k in ("batches", "in_h", "in_w", "in_c", "out_h", "out_w", "out_c", "k_h", "k_w",
                                      "stride_h", "stride_w", "dil_h", "dil_w", "pad_h", "pad_w")), chan_of_out)


def _conv_window(op: Op, x: Tensor, y: Tensor, kh: int, kw: int, depth_mult: int, filter_in_c: int
                 ) -> dict[str, Any]:
    o = op.options
    sh, sw, dh, dw = o["stride_h"], o["stride_w"], o["dil_h"], o["dil_w"]
    _need(sh > 0 and sw > 0 and dh > 0 and dw > 0, f"op {op.index} {op.name}: stride and dilation must be positive")
    return _window_params(op, x, y, (kh, kw), (sh, sw), (dh, dw), depth_mult, filter_in_c)


# ====================================================================== one function per op

def _conv_operands(m: Model, op: Op) -> tuple[Tensor, Tensor, Tensor, int, int]:
    """(input, filter, output, input channels, output channels) of a convolution, checked."""
    x = _int8_act(m, op.inputs[0], op, "input")
    w = _const(m, op.inputs[1], op, "filter", "int8")
    y = _int8_act(m, op.outputs[0], op, "output")
    return x, w, y, _nhwc(x, op, "input")[3], _nhwc(y, op, "output")[3]


def _lower_conv(m: Model, op: Op) -> Step:
    x, w, y, ic, oc = _conv_operands(m, op)
    _need(len(w.shape) == 4 and w.shape[0] == oc, f"op {op.index} CONV_2D: filter shape {list(w.shape)} does not "
          f"match {oc} output channels")
    _, kh, kw, fic = w.shape
    _need(fic > 0 and ic % fic == 0 and oc % (ic // fic) == 0,
          f"op {op.index} CONV_2D: {ic} input channels do not split into groups of {fic}")
    p = _conv_window(op, x, y, kh, kw, depth_mult=1, filter_in_c=fic)
    bias = _bias(m, op, oc)
    mult, shift = conv_multipliers(x.scale, w.scales, y.scale, oc)
    wk = w.data.reshape(oc, -1).astype(np.int64)
    rq, p["requant_fast"] = requant_table(mult, shift, y.zero_point, acc_bounds(wk, bias, -x.zero_point))
    _multipliers(w, mult)
    per_group = oc // (ic // fic)
    lo = _params_lo(p, (np.arange(oc) // per_group) * fic)
    consts = {"filter": pack_conv_filter(wk), **({"bias": bias} if bias is not None else {}), "rq": rq}
    return Step(op, "conv", p, [x.index], y.index, consts, scratch=abi.CONV2D_SCRATCH(p), lo=lo)


def _lower_depthwise(m: Model, op: Op) -> Step:
    x, w, y, ic, oc = _conv_operands(m, op)
    _need(len(w.shape) == 4 and w.shape[0] == 1 and w.shape[3] == oc,
          f"op {op.index} DEPTHWISE_CONV_2D: filter shape {list(w.shape)} does not match {oc} output channels")
    _need(oc % ic == 0, f"op {op.index} DEPTHWISE_CONV_2D: {oc} output channels is not a multiple of {ic}")
    mult_d = oc // ic
    _need(op.options["depth_mult"] in (0, mult_d), f"op {op.index} DEPTHWISE_CONV_2D: depth_multiplier "
          f"{op.options['depth_mult']} disagrees with {ic} -> {oc} channels")
    _, kh, kw, _ = w.shape
    p = _conv_window(op, x, y, kh, kw, depth_mult=mult_d, filter_in_c=1)
    bias = _bias(m, op, oc)
    mult, shift = conv_multipliers(x.scale, w.scales, y.scale, oc)
    wt = w.data.reshape(kh * kw, oc).astype(np.int64)
    rq, p["requant_fast"] = requant_table(mult, shift, y.zero_point, acc_bounds(wt.T, bias, -x.zero_point))
    lo = _params_lo(p, np.arange(oc) // mult_d)
    _multipliers(w, mult)
    # the input offset folded into the bias (int32 arithmetic wraps, as the kernel's sum does)
    folded = (np.zeros(oc, np.int64) if bias is None else bias.astype(np.int64)) - x.zero_point * wt.sum(axis=0)
    folded = ((folded + 2 ** 31) % 2 ** 32 - 2 ** 31).astype(np.int32)
    consts = {"filter": pack_depthwise_filter(wt), "bias": folded, "rq": rq}
    return Step(op, "depthwise", p, [x.index], y.index, consts, scratch=abi.DEPTHWISE_SCRATCH(p), lo=lo)


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
    consts = {"filter": w.data.reshape(-1).astype(np.int8), "mult": np.array(mult, np.int64),
              "shift": np.array(shift, np.int64), **({"bias": bias} if bias is not None else {})}
    _multipliers(w, mult)
    lo = np.repeat(np.arange(batches, dtype=np.int64) * acc, out_d)
    return Step(op, "fc", p, [x.index], y.index, consts, lo=lo)


def _lower_pool(m: Model, op: Op) -> Step:
    o = op.options
    x = _int8_act(m, op.inputs[0], op, "input")
    y = _int8_act(m, op.outputs[0], op, "output")
    _, _, _, ic = _nhwc(x, op, "input")
    _, _, _, oc = _nhwc(y, op, "output")
    _need(ic == oc, f"op {op.index} {op.name}: {ic} input channels but {oc} output channels")
    kh, kw, sh, sw = o["filter_h"], o["filter_w"], o["stride_h"], o["stride_w"]
    _need(min(kh, kw, sh, sw) > 0, f"op {op.index} {op.name}: window and stride must be positive")
    p = _window_params(op, x, y, (kh, kw), (sh, sw), (1, 1), depth_mult=1, filter_in_c=1)
    kind = "avg_pool" if op.name == "AVERAGE_POOL_2D" else "max_pool"
    return Step(op, kind, p, [x.index], y.index, lo=_params_lo(p, np.arange(oc)))


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
    p = {"outer": x.size // depth, "depth": depth, "input_multiplier": mult, "input_left_shift": shift,
         "diff_min": diff_min}
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
    n = abi.ADD_MAX_DIMS
    _need(len(out_shape) <= n, f"op {op.index} ADD: more than {n} dimensions")
    dims = [1] * (n - len(out_shape)) + list(out_shape)

    def strides(shape: tuple[int, ...]) -> list[int]:
        s = [1] * (n - len(shape)) + list(shape)
        st, acc = [0] * n, 1
        for d in range(n - 1, -1, -1):
            st[d] = 0 if s[d] == 1 and dims[d] != 1 else acc
            acc *= s[d]
        return st

    p = dict(size=y.size, broadcast=int(a.shape != b.shape), dims=dims, stride1=strides(a.shape),
             stride2=strides(b.shape), **add_params(a.scale, b.scale, y.scale),
             input1_offset=-a.zero_point, input2_offset=-b.zero_point, output_offset=y.zero_point)
    p["act_min"], p["act_max"] = activation_range(op.options["act"], y.scale, y.zero_point)
    lo = np.arange(y.size, dtype=np.int64) if not p["broadcast"] else None
    return Step(op, "add", p, [a.index, b.index], y.index, lo=lo)


# ====================================================================== filter layouts

def pack_conv_filter(w: np.ndarray) -> np.ndarray:
    """(out_c, K) int8 weights in the kernels' CONV_2D layout (kws_kernels.h): channel pairs, each
    group of four K positions as 4 bytes of one channel then 4 of the other, the K % 4 tails after;
    pairs KWS_CONV_PAIR_STRIDE(K) bytes apart; a last odd channel in natural order."""
    oc, k = w.shape
    k4, stride = k & ~3, abi.CONV_PAIR_STRIDE({"K": k})
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


LOWER = {"CONV_2D": _lower_conv, "DEPTHWISE_CONV_2D": _lower_depthwise, "FULLY_CONNECTED": _lower_fc,
         "AVERAGE_POOL_2D": _lower_pool, "MAX_POOL_2D": _lower_pool, "RESHAPE": _lower_reshape,
         "SOFTMAX": _lower_softmax, "ADD": _lower_add}
SUPPORTED_OPS = tuple(LOWER)

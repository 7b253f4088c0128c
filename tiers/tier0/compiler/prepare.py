"""TFLite Micro's prepare-time arithmetic, in Python, so the C kernels only do integer work.

    real multiplier m (float)  ─► quantize_multiplier ─► (q, shift): m = q * 2^(shift - 31), q in Q0.31
    conv / fc scales           ─► conv_multipliers, fc_multiplier_per_tensor (TFLM's float32 vs double order)
    fused activation           ─► activation_range: the int8 clamp
    SAME / VALID padding       ─► out_size, pad_before
    SOFTMAX, ADD               ─► softmax_params, add_params: their fixed-point rescalings
    (q, shift) per channel     ─► requant_table: the kernels' {M, left + 1, right, rounding} rows

Bit-exactness with the interpreter starts here: each function reproduces the
TFLite Micro function it names, including where it rounds in float32 and where
in double, and std::round's half-away-from-zero (not Python's half-to-even).
"""
from __future__ import annotations

import math

import numpy as np

from tiers.tier0.compiler import ExportError

ACTIVATIONS = {0: "NONE", 1: "RELU", 2: "RELU_N1_TO_1", 3: "RELU6", 4: "TANH", 5: "SIGN_BIT"}


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

    name = ACTIVATIONS.get(act, f"activation {act}")
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


def acc_bounds(w: np.ndarray, bias: np.ndarray | None, input_offset: int) -> list[int]:
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

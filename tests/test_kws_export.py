"""`tierkit kws export`: the generated C must equal TFLite Micro byte for byte.

Models come from two places. Random single-layer (and small multi-layer)
int8 models are written straight into a .tflite flatbuffer here, with random
shapes, strides, paddings, dilations, depth multipliers, activations, scales
and zero points: much wider coverage than a converter would produce, and no
TensorFlow needed. And a tiny DS-CNN trained for a few steps on random data is
quantised by the real TFLite converter. Every model runs on the TFLite Micro
interpreter and on our C (host gcc, ctypes), and outputs and every
intermediate tensor (debug build) must be identical. The kernels are also
built for Cortex-M4 and, where QEMU is installed, run there so the DSP path
(SMLAD) is checked against the interpreter too.
"""
from __future__ import annotations

import ctypes
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

fb = pytest.importorskip("tflite_micro.tensorflow.lite.micro.python.schema_py_generated")
flatbuffers = pytest.importorskip("flatbuffers")

from tests.conftest import REPO
from tiers.tier0 import export as ex
from tiers.tier0 import verify
from tiers.tier0.compiler import abi, lowering, memory, prepare

KERNELS = REPO / "firmware" / "lib" / "kernels"
CFLAGS = ["-O2", "-std=c99", "-Wall", "-Wextra", "-Werror"]
M4_FLAGS = ["-mcpu=cortex-m4", "-mthumb", "-mfloat-abi=hard", "-mfpu=fpv4-sp-d16"]
HAVE_GCC = shutil.which("gcc") is not None
HAVE_ARM = shutil.which("arm-none-eabi-gcc") is not None
HAVE_QEMU = shutil.which("qemu-system-arm") is not None
DSP_PER_KIND = 6           # layers shaped for the DSP paths, per kind and requantisation form

OPCODES = {"ADD": 0, "AVERAGE_POOL_2D": 1, "CONV_2D": 3, "DEPTHWISE_CONV_2D": 4, "FULLY_CONNECTED": 9,
           "MAX_POOL_2D": 17, "RESHAPE": 22, "SOFTMAX": 25, "TANH": 28, "UNIDIRECTIONAL_SEQUENCE_LSTM": 44}
INT8, INT32, FLOAT32 = 9, 2, 0
SAME, VALID = 0, 1
ACTS = (0, 1, 2, 3)        # NONE, RELU, RELU_N1_TO_1, RELU6

needs_gcc = pytest.mark.skipif(not HAVE_GCC, reason="host gcc not installed (Debian package gcc)")


# ====================================================================== a .tflite writer for tests

class Graph:
    """Builds a one-subgraph int8 .tflite with the flatbuffer object API of the TFLite schema."""

    def __init__(self) -> None:
        self.tensors: list = []
        self.buffers: list = [fb.BufferT()]
        self.ops: list = []
        self.codes: list[str] = []

    def tensor(self, shape, dtype=INT8, scale=None, zp=None, data=None, qdim=0) -> int:
        t = fb.TensorT()
        t.shape = [int(d) for d in shape]
        t.type = dtype
        t.name = f"t{len(self.tensors)}"
        if data is not None:
            b = fb.BufferT()
            b.data = np.frombuffer(np.ascontiguousarray(data).tobytes(), np.uint8).copy()
            self.buffers.append(b)
            t.buffer = len(self.buffers) - 1
        if scale is not None:
            q = fb.QuantizationParametersT()
            q.scale = [float(s) for s in np.atleast_1d(scale)]
            q.zeroPoint = [int(z) for z in np.atleast_1d(zp if zp is not None else 0)]
            q.quantizedDimension = qdim
            t.quantization = q
        self.tensors.append(t)
        return len(self.tensors) - 1

    def act(self, shape, scale, zp) -> int:
        return self.tensor(shape, INT8, scale, zp)

    def op(self, name, inputs, outputs, opt_type=0, opt=None) -> None:
        if name not in self.codes:
            self.codes.append(name)
        o = fb.OperatorT()
        o.opcodeIndex = self.codes.index(name)
        o.inputs, o.outputs = list(inputs), list(outputs)
        o.builtinOptionsType, o.builtinOptions = opt_type, opt
        self.ops.append(o)

    def q(self, t: int) -> tuple[float, int]:
        qp = self.tensors[t].quantization
        return float(qp.scale[0]), int(qp.zeroPoint[0])

    def calibrate(self, y: int, inputs: list[int], rng, n: int = 3) -> tuple[float, int]:
        """Rescale tensor y until its int8 values spread over the range (a few percent saturating).

        Random weights through a few layers otherwise collapse to a constant, and a
        constant tensor would hide a memory-plan bug that overwrites it too early.
        """
        qp = self.tensors[y].quantization
        xs = [[rng.integers(-128, 128, self.tensors[i].shape).astype(np.int8) for i in inputs] for _ in range(n)]
        for _ in range(8):
            model = self.build(inputs, [y])
            out = np.concatenate([verify.run_multi(model, x)[0].reshape(-1) for x in xs]).astype(int)
            zp = int(qp.zeroPoint[0])
            dev = np.abs(out - zp)
            sat = np.mean((out == 127) | ((out == -128) & (zp > -128)))
            if sat > 0.05:
                f = 2.0
            elif np.percentile(dev, 95) < 32:
                f = max(float(np.percentile(dev, 95)), 1.0) / 64
            else:
                break
            qp.scale = [float(np.float32(qp.scale[0] * f))]
        return self.q(y)

    def build(self, inputs, outputs) -> bytes:
        sg = fb.SubGraphT()
        sg.tensors, sg.inputs, sg.outputs, sg.operators, sg.name = self.tensors, list(inputs), list(outputs), \
            self.ops, "main"
        m = fb.ModelT()
        m.version, m.subgraphs, m.buffers, m.description = 3, [sg], self.buffers, "tierkit test"
        m.operatorCodes = []
        for n in self.codes:
            c = fb.OperatorCodeT()
            c.builtinCode, c.deprecatedBuiltinCode, c.version = OPCODES[n], min(OPCODES[n], 127), 1
            m.operatorCodes.append(c)
        b = flatbuffers.Builder(1024)
        b.Finish(m.Pack(b), file_identifier=b"TFL3")
        return bytes(b.Output())


# ---------------------------------------------------------------- layers with random parameters

def _q(rng) -> tuple[float, int]:
    return float(np.float32(rng.uniform(0.004, 0.2))), int(rng.integers(-128, 128))


def _out_scale(rng, in_q: tuple[float, int], w_s: np.ndarray, k: int) -> float:
    """An output scale that spreads the outputs over int8 (a few saturate): about 30 levels per std."""
    in_s, zp = in_q
    std = in_s * float(np.mean(w_s)) * 73 * math.sqrt(max(k, 1)) * math.sqrt(74 ** 2 + zp ** 2)
    return float(np.float32(std / 30 * math.exp(rng.uniform(-0.7, 0.7))))


def _out_zp(rng) -> int:
    return -128 if rng.random() < 0.2 else int(rng.integers(-64, 64))


def _weights(rng, shape, channels: int, per_channel: bool = True):
    w = rng.integers(-127, 128, shape).astype(np.int8)
    base = rng.uniform(0.002, 0.03)
    s = (base * rng.uniform(0.6, 1.6, channels if per_channel else 1)).astype(np.float32)
    return w, s


def _bias(rng, g: Graph, n: int, in_s: float, w_s: np.ndarray, optional: bool = True):
    if optional and rng.random() < 0.15:     # TFLite Micro's depthwise conv crashes without one
        return -1
    b = rng.integers(-3000, 3000, n).astype(np.int32)
    scales = (np.float32(in_s) * np.resize(w_s, n)).astype(np.float32)
    return g.tensor([n], INT32, scales, np.zeros(n, np.int64), b)


def _spatial(rng, k: int, s: int, d: int, pad: int) -> int:
    """An input size for which this window gives at least one output."""
    eff = (k - 1) * d + 1
    lo = eff if pad == VALID else 1
    return int(rng.integers(lo, lo + 9))


def _window(rng, h: int, w: int, k, stride, pad, max_stride: int):
    """Window, stride, dilation (sometimes) and padding for a random convolution on an h x w input."""
    kh, kw = k or (int(rng.integers(1, 5)), int(rng.integers(1, 5)))
    sh, sw = stride or (int(rng.integers(1, max_stride)), int(rng.integers(1, max_stride)))
    dh, dw = (int(rng.integers(1, 3)), int(rng.integers(1, 3))) if rng.random() < 0.3 and pad is None else (1, 1)
    pad = int(rng.integers(0, 2)) if pad is None else pad
    if pad == VALID and (h < (kh - 1) * dh + 1 or w < (kw - 1) * dw + 1):
        pad = SAME
    return kh, kw, sh, sw, dh, dw, pad


def add_conv(g: Graph, rng, x: int, shape, in_q, *, groups: int = 1, k=None, stride=None, act=None, pad=None,
             out_c=None):
    n, h, w, c = shape
    kh, kw, sh, sw, dh, dw, pad = _window(rng, h, w, k, stride, pad, max_stride=4)
    oc = int(rng.integers(1, 9)) * groups if out_c is None else out_c
    fic = c // groups
    wt, ws = _weights(rng, (oc, kh, kw, fic), oc, per_channel=rng.random() < 0.85)
    wi = g.tensor(wt.shape, INT8, ws, np.zeros(len(ws), np.int64), wt, qdim=0)
    bi = _bias(rng, g, oc, in_q[0], ws)
    oh, ow = prepare.out_size(pad, h, kh, sh, dh), prepare.out_size(pad, w, kw, sw, dw)
    out_q = (_out_scale(rng, in_q, ws, kh * kw * fic), _out_zp(rng))
    y = g.act((n, oh, ow, oc), *out_q)
    opt = fb.Conv2DOptionsT()
    opt.padding, opt.strideW, opt.strideH = pad, sw, sh
    opt.fusedActivationFunction = int(rng.choice(ACTS)) if act is None else act
    opt.dilationWFactor, opt.dilationHFactor = dw, dh
    g.op("CONV_2D", [x, wi, bi], [y], 1, opt)
    return y, (n, oh, ow, oc), out_q


def add_depthwise(g: Graph, rng, x: int, shape, in_q, *, mult=None, k=None, act=None, stride=None, pad=None):
    n, h, w, c = shape
    m = mult or int(rng.integers(1, 4))
    kh, kw, sh, sw, dh, dw, pad = _window(rng, h, w, k, stride, pad, max_stride=3)
    oc = c * m
    wt, ws = _weights(rng, (1, kh, kw, oc), oc, per_channel=rng.random() < 0.85)
    wi = g.tensor(wt.shape, INT8, ws, np.zeros(len(ws), np.int64), wt, qdim=3)
    bi = _bias(rng, g, oc, in_q[0], ws, optional=False)
    oh, ow = prepare.out_size(pad, h, kh, sh, dh), prepare.out_size(pad, w, kw, sw, dw)
    out_q = (_out_scale(rng, in_q, ws, kh * kw), _out_zp(rng))
    y = g.act((n, oh, ow, oc), *out_q)
    opt = fb.DepthwiseConv2DOptionsT()
    opt.padding, opt.strideW, opt.strideH, opt.depthMultiplier = pad, sw, sh, m
    opt.fusedActivationFunction = int(rng.choice(ACTS)) if act is None else act
    opt.dilationWFactor, opt.dilationHFactor = dw, dh
    g.op("DEPTHWISE_CONV_2D", [x, wi, bi], [y], 2, opt)
    return y, (n, oh, ow, oc), out_q


def add_fc(g: Graph, rng, x: int, shape, in_q, *, units=None, act=None):
    acc = shape[-1]
    batches = int(np.prod(shape)) // acc
    out = units or int(rng.integers(1, 17))
    per_channel = rng.random() < 0.5
    wt, ws = _weights(rng, (out, acc), out, per_channel=per_channel)
    wi = g.tensor(wt.shape, INT8, ws, np.zeros(len(ws), np.int64), wt, qdim=0)
    bi = _bias(rng, g, out, in_q[0], ws)
    out_q = (_out_scale(rng, in_q, ws, acc), _out_zp(rng))
    y = g.act((batches, out), *out_q)
    opt = fb.FullyConnectedOptionsT()
    opt.fusedActivationFunction = int(rng.choice(ACTS)) if act is None else act
    g.op("FULLY_CONNECTED", [x, wi, bi], [y], 8, opt)
    return y, (batches, out), out_q


def add_pool(g: Graph, rng, x: int, shape, in_q, kind: str, *, k=None, act=None):
    n, h, w, c = shape
    kh, kw = k or (int(rng.integers(1, 5)), int(rng.integers(1, 5)))
    sh, sw = int(rng.integers(1, 4)), int(rng.integers(1, 4))
    pad = int(rng.integers(0, 2))
    if pad == VALID and (h < kh or w < kw):
        pad = SAME
    oh, ow = prepare.out_size(pad, h, kh, sh, 1), prepare.out_size(pad, w, kw, sw, 1)
    y = g.act((n, oh, ow, c), *in_q)
    opt = fb.Pool2DOptionsT()
    opt.padding, opt.strideW, opt.strideH, opt.filterWidth, opt.filterHeight = pad, sw, sh, kw, kh
    opt.fusedActivationFunction = int(rng.choice(ACTS)) if act is None else act
    g.op(kind, [x], [y], 5, opt)
    return y, (n, oh, ow, c), in_q


def add_softmax(g: Graph, rng, x: int, shape, in_q, *, beta=None):
    y = g.act(shape, 1.0 / 256, -128)
    opt = fb.SoftmaxOptionsT()
    opt.beta = float(beta if beta is not None else rng.choice([1.0, 0.5, 2.0, float(rng.uniform(0.3, 3))]))
    g.op("SOFTMAX", [x], [y], 9, opt)
    return y, shape, (1.0 / 256, -128)


def add_reshape(g: Graph, rng, x: int, shape, in_q, new_shape):
    s = g.tensor([len(new_shape)], INT32, data=np.array(new_shape, np.int32))
    y = g.act(new_shape, *in_q)
    opt = fb.ReshapeOptionsT()
    opt.newShape = list(new_shape)
    g.op("RESHAPE", [x, s], [y], 17, opt)
    return y, tuple(new_shape), in_q


def add_add(g: Graph, rng, a: int, b: int, shape, qa, qb, *, act=None):
    out_q = (float(np.float32(max(qa[0], qb[0]) * rng.uniform(0.6, 3))), _out_zp(rng))
    y = g.act(shape, *out_q)
    opt = fb.AddOptionsT()
    opt.fusedActivationFunction = int(rng.choice(ACTS)) if act is None else act
    g.op("ADD", [a, b], [y], 11, opt)
    return y, shape, out_q


# ---------------------------------------------------------------- whole random models

def single_op_model(kind: str, seed: int) -> bytes:
    """One random layer of `kind`, its input a graph input (two for ADD)."""
    rng = np.random.default_rng(seed)
    g = Graph()
    in_q = _q(rng)
    n = 2 if rng.random() < 0.15 else 1
    if kind in ("CONV_2D", "DEPTHWISE_CONV_2D", "AVERAGE_POOL_2D", "MAX_POOL_2D"):
        c = int(rng.choice([1, 2, 3, 4, 8, 12]))
        shape = (n, int(rng.integers(1, 11)), int(rng.integers(1, 11)), c)
        x = g.act(shape, *in_q)
        if kind == "CONV_2D":
            divisors = [d for d in (2, 3, 4) if c % d == 0]
            groups = int(rng.choice(divisors)) if divisors and rng.random() < 0.3 else 1   # grouped conv
            y, *_ = add_conv(g, rng, x, shape, in_q, groups=groups)
        elif kind == "DEPTHWISE_CONV_2D":
            y, *_ = add_depthwise(g, rng, x, shape, in_q)
        else:
            y, *_ = add_pool(g, rng, x, shape, in_q, kind)
        return g.build([x], [y])
    if kind == "FULLY_CONNECTED":
        shape = (n, int(rng.integers(1, 48))) if rng.random() < 0.6 else (n, 1, 1, int(rng.integers(1, 48)))
        x = g.act(shape, *in_q)
        y, *_ = add_fc(g, rng, x, shape, in_q)
        return g.build([x], [y])
    if kind == "SOFTMAX":
        shape = (n, int(rng.integers(1, 40))) if rng.random() < 0.7 else (n, 3, int(rng.integers(2, 12)))
        in_q = (float(np.float32(rng.uniform(0.004, 0.08))), int(rng.integers(-128, 128)))
        x = g.act(shape, *in_q)
        y, *_ = add_softmax(g, rng, x, shape, in_q)
        return g.build([x], [y])
    if kind == "RESHAPE":
        shape = (1, int(rng.integers(1, 6)), int(rng.integers(1, 6)), int(rng.integers(1, 6)))
        x = g.act(shape, *in_q)
        y, *_ = add_reshape(g, rng, x, shape, in_q, (1, int(np.prod(shape))))
        return g.build([x], [y])
    if kind == "ADD":
        shape = (1, int(rng.integers(1, 6)), int(rng.integers(1, 6)), int(rng.integers(1, 9)))
        qb = _q(rng)
        a = g.act(shape, *in_q)
        form = rng.integers(0, 4)
        if form == 0:          # same shapes, two graph inputs
            b = g.act(shape, *qb)
            ins = [a, b]
        elif form == 1:        # a per-channel vector, broadcast
            b = g.act((shape[-1],), *qb)
            ins = [a, b]
        elif form == 2:        # broadcast the other way round, 4-D
            b = g.act((1, 1, shape[2], 1), *qb)
            a, b = b, a
            in_q, qb = qb, in_q
            ins = [a, b]
        else:                  # a constant operand
            b = g.tensor(shape, INT8, qb[0], qb[1], rng.integers(-128, 128, shape).astype(np.int8))
            ins = [a]
        y, *_ = add_add(g, rng, a, b, shape, in_q, qb)
        return g.build(ins, [y])
    raise ValueError(kind)


def dsp_shaped_model(kind: str, seed: int, exact: bool = False) -> bytes:
    """A CONV_2D or DEPTHWISE_CONV_2D shaped for the kernels' DSP paths (channels in fours, depth
    multiplier 1, 3x3 windows often, pointwise convolutions, odd output channel counts, K % 4 tails),
    with random strides, dilations, paddings and batches. exact=True: small weights and an output
    scale near the input*weight scale, so the requantisation multiplier has no right shift (or a left
    one) and the exporter must choose the exact requantisation form."""
    rng = np.random.default_rng(seed)
    g = Graph()
    in_q = _q(rng)
    n = 2 if rng.random() < 0.2 else 1
    c = int(rng.choice([4, 8, 12, 16])) if kind == "DEPTHWISE_CONV_2D" or rng.random() < 0.7 else int(rng.choice([1, 3]))
    shape = (n, int(rng.integers(3, 12)), int(rng.integers(3, 9)), c)
    x = g.act(shape, *in_q)
    k = (3, 3) if rng.random() < 0.5 else (1, 1) if kind == "CONV_2D" and rng.random() < 0.5 else None
    if kind == "CONV_2D":
        y, *_ = add_conv(g, rng, x, shape, in_q, k=k, out_c=int(rng.integers(1, 12)))
    else:
        y, *_ = add_depthwise(g, rng, x, shape, in_q, mult=1, k=k)
    if exact:
        op = g.ops[-1]
        w, b = g.tensors[op.inputs[1]], op.inputs[2]
        small = rng.integers(-1, 2, w.shape).astype(np.int8)
        g.buffers[w.buffer].data = np.frombuffer(small.tobytes(), np.uint8).copy()
        if b >= 0:
            g.buffers[g.tensors[b].buffer].data = np.frombuffer(
                rng.integers(-40, 40, g.tensors[b].shape).astype(np.int32).tobytes(), np.uint8).copy()
        ws = float(np.mean(w.quantization.scale))
        g.tensors[y].quantization.scale = [float(np.float32(in_q[0] * ws / rng.uniform(0.55, 1.3)))]
    return g.build([x], [y])


def graph_model(seed: int) -> bytes:
    """A small network of random layers: conv, depthwise, residual ADD, pool, reshape, FC, softmax."""
    rng = np.random.default_rng(seed)
    g = Graph()
    q = _q(rng)
    shape = (1, int(rng.integers(10, 20)), int(rng.integers(5, 10)), int(rng.choice([1, 2, 3])))
    x = g.act(shape, *q)

    def cal(y: int) -> tuple[float, int]:
        return g.calibrate(y, [x], rng)

    h, s, _ = add_conv(g, rng, x, shape, q, k=(3, 3), stride=(2, 1), act=1, pad=SAME)
    hq = cal(h)
    if rng.random() < 0.5:     # a per-channel constant added by broadcasting
        cq = _q(rng)
        const = g.tensor((s[-1],), INT8, cq[0], cq[1], rng.integers(-128, 128, s[-1]).astype(np.int8))
        h, s, _ = add_add(g, rng, h, const, s, hq, cq, act=0)
        hq = cal(h)
    for _ in range(int(rng.integers(1, 3))):
        d, ds, _ = add_depthwise(g, rng, h, s, hq, mult=1, k=(3, 3), act=1, stride=(1, 1) if rng.random() < 0.7
                                 else None, pad=SAME)
        dq = cal(d)
        if ds[1:3] != s[1:3]:
            h, s, hq = d, ds, dq
            continue
        p, ps, _ = add_conv(g, rng, d, ds, dq, k=(1, 1), stride=(1, 1), act=0, pad=SAME, out_c=s[3])
        pq = cal(p)
        if ps == s:            # a residual connection keeps the block's input alive across it
            h, s, _ = add_add(g, rng, h, p, s, hq, pq, act=1)
        else:
            h, s = p, ps
        hq = cal(h)
    kind = "AVERAGE_POOL_2D" if rng.random() < 0.5 else "MAX_POOL_2D"
    h, s, hq = add_pool(g, rng, h, s, hq, kind, act=0)
    h, s, hq = add_reshape(g, rng, h, s, hq, (1, int(np.prod(s))))
    h, s, _ = add_fc(g, rng, h, s, hq, units=int(rng.integers(2, 13)), act=0)
    hq = cal(h)
    y, ys, yq = add_softmax(g, rng, h, s, hq, beta=float(np.float32(0.02 / hq[0])))   # logits of a few units
    tail = rng.integers(0, 3)
    if tail == 1:              # the output written through a RESHAPE alias
        y, *_ = add_reshape(g, rng, y, ys, yq, (1, 1, int(np.prod(ys))))
    elif tail == 2:            # softmax into the arena (in place over its input), then one more layer
        y, *_ = add_fc(g, rng, y, ys, yq, units=3, act=0)
        cal(y)
    return g.build([x], [y])


def dscnn_model(seed: int = 0, channels: int = 64, blocks: int = 4, calibrate: bool = True) -> bytes:
    """The MLPerf Tiny DS-CNN topology with random int8 weights (no training, no TensorFlow)."""
    rng = np.random.default_rng(seed)
    g = Graph()
    q = (0.03, 8)
    x = x0 = g.act((1, 49, 10, 1), *q)

    def conv(x, shape, q, k, stride, oc, depthwise=False):
        n, h, w, c = shape
        oh, ow = -(-h // stride), -(-w // stride)
        if depthwise:
            wt, ws = _weights(rng, (1, *k, c), c)
            wi = g.tensor(wt.shape, INT8, ws, np.zeros(c, np.int64), wt, qdim=3)
            oc = c
        else:
            wt, ws = _weights(rng, (oc, *k, c), oc)
            wi = g.tensor(wt.shape, INT8, ws, np.zeros(oc, np.int64), wt)
        bi = g.tensor([oc], INT32, (np.float32(q[0]) * ws).astype(np.float32), np.zeros(oc, np.int64),
                      rng.integers(-2000, 2000, oc).astype(np.int32))
        oq = (_out_scale(rng, q, ws, k[0] * k[1] * (1 if depthwise else c)), -128)
        y = g.act((n, oh, ow, oc), *oq)
        opt = fb.DepthwiseConv2DOptionsT() if depthwise else fb.Conv2DOptionsT()
        opt.padding, opt.strideW, opt.strideH, opt.fusedActivationFunction = SAME, stride, stride, 1
        opt.dilationWFactor = opt.dilationHFactor = 1
        if depthwise:
            opt.depthMultiplier = 1
        g.op("DEPTHWISE_CONV_2D" if depthwise else "CONV_2D", [x, wi, bi], [y], 2 if depthwise else 1, opt)
        return y, (n, oh, ow, oc), (g.calibrate(y, [x0], rng) if calibrate else oq)

    h, s, hq = conv(x, (1, 49, 10, 1), q, (10, 4), 2, channels)
    for _ in range(blocks):
        h, s, hq = conv(h, s, hq, (3, 3), 1, channels, depthwise=True)
        h, s, hq = conv(h, s, hq, (1, 1), 1, channels)
    y = g.act((1, 1, 1, channels), *hq)
    opt = fb.Pool2DOptionsT()
    opt.padding, opt.strideW, opt.strideH, opt.filterWidth, opt.filterHeight = VALID, 5, 24, 5, 24
    g.op("AVERAGE_POOL_2D", [h], [y], 5, opt)
    h, s, hq = add_fc(g, rng, y, (1, 1, 1, channels), hq, units=12, act=0)
    if calibrate:
        hq = g.calibrate(h, [x0], rng)
    y, *_ = add_softmax(g, rng, h, s, hq, beta=float(np.float32(0.02 / hq[0])))
    return g.build([x0], [y])


# ====================================================================== compile and run the C

class CModels:
    """Several exported models compiled into one shared library (one gcc call), run through ctypes."""

    def __init__(self, models: dict[str, bytes], workdir: Path, *, debug: bool = True, extra_flags=()):
        self.models = models
        self.results: dict[str, ex.ExportResult] = {}
        src = [str(KERNELS / "kws_kernels.c")]
        defines = []
        for name, data in models.items():
            r = ex.export_c(data, workdir, prefix=name, basename=name)
            self.results[name] = r
            src.append(str(r.c_path))
            defines.append(f"-D{name.upper()}_DEBUG")
        lib = workdir / "models.so"
        cmd = ["gcc", *CFLAGS, *extra_flags, "-shared", "-fPIC", f"-I{KERNELS}", f"-I{workdir}",
               *(defines if debug else []), *src, "-o", str(lib)]
        p = subprocess.run(cmd, capture_output=True, text=True, check=False)
        assert p.returncode == 0, p.stderr[-3000:]
        self.lib = ctypes.CDLL(str(lib))
        self.debug = debug
        self._dumps: dict[int, np.ndarray] = {}
        self._cb_type = ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_int, ctypes.POINTER(ctypes.c_int8),
                                         ctypes.c_int32, ctypes.c_void_p)
        self._cb = self._cb_type(self._hook)

    def _hook(self, op, tensor, data, n, user) -> None:
        self._dumps[tensor] = np.ctypeslib.as_array(data, shape=(n,)).copy()

    def run(self, name: str, inputs: list[np.ndarray]) -> tuple[list[np.ndarray], dict[int, np.ndarray]]:
        r = self.results[name]
        ins = [np.ascontiguousarray(x, np.int8).reshape(-1) for x in inputs]
        outs = [np.zeros(n, np.int8) for n in r.output_bytes]
        in_arr = (ctypes.c_void_p * len(ins))(*[x.ctypes.data for x in ins])
        out_arr = (ctypes.c_void_p * len(outs))(*[o.ctypes.data for o in outs])
        self._dumps = {}
        if self.debug:
            getattr(self.lib, f"{name}_set_debug_hook")(self._cb, None)
        rc = getattr(self.lib, f"{name}_invoke_io")(in_arr, out_arr)
        assert rc == 0
        return outs, dict(self._dumps)


def random_inputs(model: bytes, rng) -> list[np.ndarray]:
    m = ex.read_model(model)
    return [rng.integers(-128, 128, m.tensors[t].shape).astype(np.int8) for t in m.inputs]


def assert_bit_exact(c: CModels, name: str, model: bytes, rng, n_inputs: int = 4) -> int:
    """Outputs and every op's output tensor, C vs TFLite Micro; returns the number of bytes compared."""
    m = ex.read_model(model)
    op_outputs = [op.outputs[0] for op in m.ops]
    compared = 0
    for k in range(n_inputs):
        inputs = random_inputs(model, rng)
        if k == 0:   # extremes: all lowest, all highest
            inputs = [np.full_like(x, -128) for x in inputs]
        elif k == 1:
            inputs = [np.full_like(x, 127) for x in inputs]
        ref_out = verify.run_multi(model, inputs)
        ref_mid = verify.intermediates(model, inputs, op_outputs)
        outs, dumps = c.run(name, inputs)
        for j, (o, r) in enumerate(zip(outs, ref_out)):
            assert np.array_equal(o, r.reshape(-1)), (name, "output", j, o, r.reshape(-1))
            compared += o.size
        for t in op_outputs:
            assert t in dumps, (name, "no dump of tensor", t)
            r = ref_mid[t].reshape(-1)
            assert np.array_equal(dumps[t], r), (name, "tensor", t, np.flatnonzero(dumps[t] != r)[:10])
            compared += r.size
    return compared


# ====================================================================== tests

SINGLE = ["CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED", "AVERAGE_POOL_2D", "MAX_POOL_2D", "SOFTMAX",
          "ADD", "RESHAPE"]
PER_KIND = 10


@pytest.fixture(scope="module")
def random_layers(tmp_path_factory) -> tuple[CModels, dict[str, bytes]]:
    if not HAVE_GCC:
        pytest.skip("host gcc not installed (Debian package gcc)")
    models = {}
    for ki, kind in enumerate(SINGLE):
        for s in range(PER_KIND):
            models[f"{kind.lower()}_{s}"] = single_op_model(kind, 1000 * ki + s)
    for s in range(8):
        models[f"graph_{s}"] = graph_model(50 + s)
    for s in range(DSP_PER_KIND):
        models[f"dspconv_{s}"] = dsp_shaped_model("CONV_2D", 7000 + s)
        models[f"dspdw_{s}"] = dsp_shaped_model("DEPTHWISE_CONV_2D", 8000 + s)
        models[f"exactconv_{s}"] = dsp_shaped_model("CONV_2D", 9000 + s, exact=True)
        models[f"exactdw_{s}"] = dsp_shaped_model("DEPTHWISE_CONV_2D", 9500 + s, exact=True)
    models["dscnn_s"] = dscnn_model()
    return CModels(models, tmp_path_factory.mktemp("random_layers")), models


@needs_gcc
@pytest.mark.parametrize("kind", SINGLE)
def test_random_single_layers_match_tflite_micro(random_layers, kind):
    c, models = random_layers
    rng = np.random.default_rng(7)
    names = [n for n in models if n.startswith(kind.lower() + "_")]
    total = sum(assert_bit_exact(c, n, models[n], rng) for n in names)
    assert total > 0


@needs_gcc
def test_dsp_shaped_layers_and_both_requantisation_forms_match_tflite_micro(random_layers):
    """Layers shaped for the DSP paths, and layers whose requantisation the exporter must leave in
    the exact form: bit-exact here (portable path) and, in the QEMU test, on the M4's DSP path."""
    c, models = random_layers
    rng = np.random.default_rng(13)
    names = [n for n in models if n.startswith(("dspconv_", "dspdw_", "exactconv_", "exactdw_"))]
    for n in names:
        assert_bit_exact(c, n, models[n], rng, n_inputs=3)
    fast = {n: [s.params["requant_fast"] for s in lowering.lower(ex.read_model(models[n]))
                if s.kernel in ("conv", "depthwise")] for n in names}
    assert all(f == [1] for n, f in fast.items() if n.startswith("dsp")), fast
    assert all(f == [0] for n, f in fast.items() if n.startswith("exact")), fast
    # the DSP depthwise path (channels in fours, multiplier 1) is what these exercise, 3x3 included
    dw = [s.params for n in names if "dw_" in n for s in lowering.lower(ex.read_model(models[n]))]
    assert all(p["in_c"] % 4 == 0 and p["depth_mult"] == 1 for p in dw)
    assert any(p["k_w"] == 3 and p["dil_w"] == 1 for p in dw) and any(p["stride_w"] > 1 or p["dil_w"] > 1 for p in dw)


def test_fast_requantisation_equals_the_reference_on_its_whole_range():
    """The fast form (SMMULR, add, shift; kws_kernels.c) against MultiplyByQuantizedMultiplier, in
    Python integers, for rows the exporter marks fast: random accumulators and the bounds themselves."""
    rng = np.random.default_rng(17)

    def srdhm(a, b):
        ab = a * b
        return _trunc_div(ab + (2 ** 30 if ab >= 0 else 1 - 2 ** 30), 2 ** 31)

    def rdbpot(x, e):
        mask = (1 << e) - 1
        return (x >> e) + (1 if (x & mask) > (mask >> 1) + (1 if x < 0 else 0) else 0)

    checked = refused = 0
    for _ in range(400):
        scale = float(np.exp(rng.uniform(np.log(1e-6), np.log(2.0))))
        m, s = prepare.quantize_multiplier(scale)
        bound = int(np.exp(rng.uniform(0, np.log(2 ** 31))))
        off = int(rng.integers(-128, 128))
        rq, fast = prepare.requant_table([m], [s], off, [bound])
        if not fast:
            refused += 1
            continue
        mm, lsh1, right, rnd = (int(v) for v in rq)
        assert (mm, lsh1 - 1, right) == ((m, max(s, 0), max(-s, 0)) if m else (0, 0, 1))
        for acc in [bound, -bound, 0, 1, -1, *(int(v) for v in rng.integers(-bound, bound + 1, 50))]:
            want = rdbpot(srdhm(_wrap32(acc << max(s, 0)), m), max(-s, 0)) + off
            a = acc << lsh1
            assert -2 ** 31 <= a < 2 ** 31
            v = (a * mm + 2 ** 31) >> 32                    # SMMULR
            t = v + (v >> 31) + rnd
            assert -2 ** 31 <= t < 2 ** 31
            assert t >> right == want, (acc, m, s, off)
            checked += 1
    assert checked > 5000 and refused > 10


@needs_gcc
def test_random_graphs_and_dscnn_match_tflite_micro(random_layers):
    """Multi-op graphs exercise the memory plan: overlapped in-place outputs, residual ADDs, reshape aliases."""
    c, models = random_layers
    rng = np.random.default_rng(11)
    for n in [n for n in models if n.startswith("graph_")] + ["dscnn_s"]:
        assert_bit_exact(c, n, models[n], rng, n_inputs=6)
    # at least one planned output really does overlap its input
    assert any(c.results[n].plan.overlaps for n in models)


def test_dscnn_arena_well_under_tflite_micro():
    """MLPerf-size DS-CNN: our static plan against TFLite Micro's arena (target <= 0.6x)."""
    model = dscnn_model()
    m = ex.read_model(model)
    steps = lowering.lower(m)
    plan = memory.plan_memory(m, steps)
    memory.check_plan(plan)
    tflm = verify.arena(model)
    print(f"\nDS-CNN 64x4: ours {plan.arena_bytes:,} B (no overlap {plan.naive_bytes():,} B) vs {tflm.line()} "
          f"-> {plan.arena_bytes / tflm.total:.2f}x")
    assert plan.arena_bytes <= 0.6 * tflm.total
    # with the caller's input and output buffers counted too
    io = 49 * 10 + 12
    assert plan.arena_bytes + io <= 0.6 * tflm.total


def test_overlap_limits_by_hand():
    # 3x3 depthwise, stride 1, SAME, W=5, C=64: the output may start one image row plus one pixel below
    lo = lowering.window_lo(1, 25, 5, 64, 25, 5, 64, 3, 3, 1, 1, 1, 1, 1, 1, np.arange(64))
    assert memory.overlap_limit(lo) == -(5 + 1) * 64
    # 1x1 convolution, 64 -> 64: one pixel, less the last channel
    lo = lowering.window_lo(1, 25, 5, 64, 25, 5, 64, 1, 1, 1, 1, 1, 1, 0, 0, np.zeros(64, np.int64))
    assert memory.overlap_limit(lo) == -63
    # elementwise: in place
    assert memory.overlap_limit(np.arange(10)) == 0
    # fully connected, one row: every output needs the whole input
    assert memory.overlap_limit(np.zeros(12, np.int64)) == -11


def test_quantize_multiplier_matches_tflite():
    assert prepare.quantize_multiplier(0.0) == (0, 0)
    assert prepare.quantize_multiplier(0.5) == (1 << 30, 0)
    assert prepare.quantize_multiplier(1.0) == (1 << 30, 1)
    assert prepare.quantize_multiplier(0.75) == (1610612736, 0)
    # q rounds up to 2^31: halve and bump the shift
    assert prepare.quantize_multiplier(1 - 2 ** -40) == (1 << 30, 1)
    # below 2^-31 flushes to zero
    assert prepare.quantize_multiplier(2 ** -40) == (0, 0)
    m, s = prepare.quantize_multiplier(0.0123)
    assert abs(m * 2.0 ** (s - 31) - 0.0123) < 1e-9
    # std::round is half away from zero, Python's round is not
    assert prepare.tf_round(2.5) == 3 and prepare.tf_round(-2.5) == -3 and prepare.tf_round(0.49999999999999994) == 0


def test_activation_ranges():
    assert prepare.activation_range(0, 0.1, 5) == (-128, 127)
    assert prepare.activation_range(1, 0.1, -128) == (-128, 127)
    assert prepare.activation_range(3, 0.05, -128) == (-128, -8)          # 6 / 0.05 = 120 -> -8
    assert prepare.activation_range(2, 0.1, 0) == (-10, 10)
    with pytest.raises(ex.ExportError, match="TANH"):
        prepare.activation_range(4, 0.1, 0)


def test_kernel_params_header_is_current():
    """The kernels' parameter structs and size formulas are generated from the exporter's description."""
    assert (KERNELS / "kws_params.h").read_text() == abi.header(), \
        "regenerate: python -m tiers.tier0.compiler.abi"
    assert [s.size for s in abi.STRUCTS] == [4 * 22, 4 * 9, 4 * 32, 4 * 5]


@needs_gcc
def test_size_formulas_agree_in_c_and_python(tmp_path):
    """Each formula as C computes it (the generated macro) equals the Python evaluation the memory plan
    uses, on random parameter blocks: C's operator precedence is not Python's."""
    rng = np.random.default_rng(5)
    cases = [{f: int(rng.integers(1, 9)) for f in abi.CONV.fields} for _ in range(300)]
    for c in cases[::3]:
        c["in_c"], c["depth_mult"] = 4 * c["in_c"], 1          # the DSP depthwise case, often
    lines = ['#include <stdio.h>', '#include "kws_kernels.h"', "int main(void) {"]
    for c in cases:
        init = ", ".join(f".{k} = {v}" for k, v in c.items())
        lines.append(f"  {{ kws_conv_params_t p = {{{init}}}; printf(\"%ld %ld %ld\\n\", "
                     f"(long)KWS_CONV2D_SCRATCH_BYTES(&p), (long)KWS_DEPTHWISE_SCRATCH_BYTES(&p), "
                     f"(long)KWS_CONV_PAIR_STRIDE(p.in_h * p.k_w)); }}")
    (tmp_path / "f.c").write_text("\n".join([*lines, "  return 0;", "}", ""]))
    subprocess.run(["gcc", *CFLAGS, f"-I{KERNELS}", str(tmp_path / "f.c"), "-o", str(tmp_path / "f")], check=True)
    got = subprocess.run([str(tmp_path / "f")], capture_output=True, text=True, check=True).stdout.split("\n")
    for c, line in zip(cases, got):
        want = (abi.CONV2D_SCRATCH(c), abi.DEPTHWISE_SCRATCH(c), abi.CONV_PAIR_STRIDE({"K": c["in_h"] * c["k_w"]}))
        assert tuple(int(v) for v in line.split()) == want, c
    assert any(abi.DEPTHWISE_SCRATCH(c) for c in cases) and not all(abi.DEPTHWISE_SCRATCH(c) for c in cases)


@needs_gcc
def test_fixed_point_primitives_match_gemmlowp(tmp_path):
    """The C primitives against a Python transcription of gemmlowp, on edge and random values."""
    lib_path = tmp_path / "k.so"
    subprocess.run(["gcc", *CFLAGS, "-shared", "-fPIC", str(KERNELS / "kws_kernels.c"), "-o", str(lib_path)],
                   check=True)
    lib = ctypes.CDLL(str(lib_path))
    for f in ("kws_saturating_rounding_doubling_high_mul", "kws_rounding_divide_by_pot",
              "kws_multiply_by_quantized_multiplier"):
        getattr(lib, f).restype = ctypes.c_int32

    def srdhm(a, b):
        if a == b == -2 ** 31:
            return 2 ** 31 - 1
        ab = a * b
        nudge = 2 ** 30 if ab >= 0 else 1 - 2 ** 30
        return _trunc_div(ab + nudge, 2 ** 31)

    def rdbpot(x, e):
        mask = (1 << e) - 1
        rem = x & mask
        thr = (mask >> 1) + (1 if x < 0 else 0)
        return (x >> e) + (1 if rem > thr else 0)

    rng = np.random.default_rng(3)
    edge = [-2 ** 31, -2 ** 31 + 1, -2 ** 30, -1, 0, 1, 2 ** 30, 2 ** 31 - 1]
    pairs = [(a, b) for a in edge for b in edge] + [tuple(int(v) for v in rng.integers(-2 ** 31, 2 ** 31, 2))
                                                   for _ in range(3000)]
    for a, b in pairs:
        assert lib.kws_saturating_rounding_doubling_high_mul(a, b) == srdhm(a, b), (a, b)
    for _ in range(3000):
        x, e = int(rng.integers(-2 ** 31, 2 ** 31)), int(rng.integers(0, 32))
        assert lib.kws_rounding_divide_by_pot(x, e) == rdbpot(x, e), (x, e)
    for _ in range(3000):
        x = int(rng.integers(-2 ** 24, 2 ** 24))
        m, s = prepare.quantize_multiplier(float(rng.uniform(1e-6, 4)))
        left, right = max(s, 0), max(-s, 0)
        want = rdbpot(srdhm(_wrap32(x << left), m), right)
        assert lib.kws_multiply_by_quantized_multiplier(x, m, s) == want, (x, m, s)


def _trunc_div(a: int, b: int) -> int:
    q = abs(a) // abs(b)
    return q if (a >= 0) == (b >= 0) else -q


def _wrap32(v: int) -> int:
    return (v + 2 ** 31) % 2 ** 32 - 2 ** 31


# ---------------------------------------------------------------- refusals

def _tanh_model() -> bytes:
    g = Graph()
    x = g.act((1, 8), 0.05, 0)
    h = g.act((1, 8), 0.05, 0)
    y = g.act((1, 8), 1 / 128, 0)
    opt = fb.AddOptionsT()
    g.op("ADD", [x, x], [h], 11, opt)
    g.op("TANH", [h], [y])
    return g.build([x], [y])


def _lstm_model() -> bytes:
    g = Graph()
    x = g.act((1, 4, 8), 0.05, 0)
    y = g.act((1, 4, 8), 0.05, 0)
    g.op("UNIDIRECTIONAL_SEQUENCE_LSTM", [x], [y])
    return g.build([x], [y])


def test_unsupported_ops_are_refused_by_name(tmp_path):
    with pytest.raises(ex.UnsupportedOpError) as e:
        ex.export_c(_tanh_model(), tmp_path)
    assert "TANH" in str(e.value) and "\n" not in str(e.value)
    assert e.value.ops == [(1, "TANH")]
    with pytest.raises(ex.UnsupportedOpError, match="UNIDIRECTIONAL_SEQUENCE_LSTM"):
        ex.export_c(_lstm_model(), tmp_path)
    assert not list(tmp_path.glob("*.c")), "nothing may be written for a refused model"


def test_export_cli_refuses_with_one_line_and_exit_2(tmp_path):
    bad = tmp_path / "tanh.tflite"
    bad.write_bytes(_tanh_model())
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    p = subprocess.run([sys.executable, "-m", "tiers.tier0.export", str(bad), "-o", str(tmp_path / "out")],
                       capture_output=True, text=True, env=env, timeout=60, check=False)
    assert p.returncode == 2, p
    assert len(p.stderr.strip().splitlines()) == 1 and "TANH" in p.stderr and "Traceback" not in p.stderr
    junk = tmp_path / "junk.tflite"
    junk.write_bytes(b"not a model at all")
    p = subprocess.run([sys.executable, "-m", "tiers.tier0.export", str(junk)], capture_output=True, text=True,
                       env=env, timeout=60, cwd=tmp_path, check=False)
    assert p.returncode == 2 and "TFL3" in p.stderr and len(p.stderr.strip().splitlines()) == 1
    good = tmp_path / "dense.tflite"
    good.write_bytes(single_op_model("FULLY_CONNECTED", 1))
    p = subprocess.run([sys.executable, "-m", "tiers.tier0.export", str(good), "-o", str(tmp_path / "out")],
                       capture_output=True, text=True, env=env, timeout=60, check=False)
    assert p.returncode == 0, p.stderr
    assert (tmp_path / "out" / "model.c").exists() and "arena" in p.stdout


def test_float_model_is_refused(tmp_path):
    g = Graph()
    x = g.tensor((1, 4), FLOAT32)
    y = g.tensor((1, 4), FLOAT32)
    opt = fb.SoftmaxOptionsT()
    opt.beta = 1.0
    g.op("SOFTMAX", [x], [y], 9, opt)
    with pytest.raises(ex.ExportError, match="float32") as e:
        ex.export_c(g.build([x], [y]), tmp_path)
    assert "\n" not in str(e.value)


# ---------------------------------------------------------------- Cortex-M4

@pytest.mark.skipif(not HAVE_ARM, reason="arm-none-eabi-gcc not installed (Debian package gcc-arm-none-eabi)")
def test_kernels_and_model_build_for_cortex_m4(tmp_path):
    r = ex.export_c(dscnn_model(), tmp_path)
    objs = []
    for src in (KERNELS / "kws_kernels.c", r.c_path):
        o = tmp_path / (src.stem + ".o")
        subprocess.run(["arm-none-eabi-gcc", *M4_FLAGS, *CFLAGS, f"-I{KERNELS}", f"-I{tmp_path}", "-c", str(src),
                        "-o", str(o)], check=True, capture_output=True, text=True)
        objs.append(o)
    size = subprocess.run(["arm-none-eabi-size", *map(str, objs)], capture_output=True, text=True, check=True)
    print("\n" + size.stdout)
    rows = {Path(line.split()[-1]).stem: [int(v) for v in line.split()[:3]] for line in size.stdout.splitlines()[1:]}
    text, _data, bss = rows["model"]
    assert bss == r.arena_bytes               # the arena is the model's only RAM
    assert text >= r.const_bytes              # weights and tables live in flash
    dis = subprocess.run(["arm-none-eabi-objdump", "-d", str(objs[0])], capture_output=True, text=True,
                         check=True).stdout
    assert "smlad" in dis and "sxtb16" in dis  # the DSP path is what gets built for the M4


# ---------------------------------------------------------------- the DSP path, run on an emulated Cortex-M4

_STARTUP = r"""
#include <stdint.h>
extern uint32_t _sidata, _sdata, _edata, _sbss, _ebss, _estack;
int main(void);
void exit(int);
void initialise_monitor_handles(void);
void Reset_Handler(void);
static void Fault(void) { exit(3); }
__attribute__((section(".isr_vector"), used)) static void (*const vectors[16])(void) = {
    (void (*)(void))(&_estack), Reset_Handler, Fault, Fault, Fault, Fault, Fault};
void Reset_Handler(void) {
  uint32_t *s = &_sidata, *d = &_sdata;
  while (d < &_edata) *d++ = *s++;
  for (d = &_sbss; d < &_ebss; d++) *d = 0;
  *(volatile uint32_t *)0xE000ED88 |= 0xFu << 20;   /* FPU on: newlib's printf touches it */
  __asm volatile("dsb\n isb");
  initialise_monitor_handles();                      /* semihosting stdout */
  exit(main());
}
void _init(void) {}
void _fini(void) {}
"""

_LINK = """
MEMORY { FLASH (rx) : ORIGIN = 0x00000000, LENGTH = 4M  RAM (rwx) : ORIGIN = 0x20000000, LENGTH = 4M }
ENTRY(Reset_Handler)
SECTIONS {
  .isr_vector : { KEEP(*(.isr_vector)) } > FLASH
  .text : { *(.text*) *(.rodata*) KEEP(*(.init)) KEEP(*(.fini)) . = ALIGN(4); } > FLASH
  .ARM.exidx : { *(.ARM.exidx*) } > FLASH
  _sidata = LOADADDR(.data);
  .data : { _sdata = .; *(.data*) . = ALIGN(4); _edata = .; } > RAM AT > FLASH
  .bss (NOLOAD) : { _sbss = .; *(.bss*) *(COMMON) . = ALIGN(4); _ebss = .; } > RAM
  . = ALIGN(8); end = .; __end__ = .;
  _estack = ORIGIN(RAM) + LENGTH(RAM);
}
"""


def _qemu_firmware(models: dict[str, bytes], cases: dict[str, list[list[np.ndarray]]], work: Path,
                   portable: bool = False) -> Path:
    """A semihosting image that runs every case of every model and prints outputs and SysTick ticks."""
    srcs = [KERNELS / "kws_kernels.c"]
    main = ['#include <stdio.h>', '#include <stdint.h>', '#include "kws_kernels.h"']
    calls = []
    for name, data in models.items():
        r = ex.export_c(data, work, prefix=name, basename=name)
        srcs.append(r.c_path)
        main.append(f'#include "{name}.h"')
        for k, inputs in enumerate(cases[name]):
            for j, x in enumerate(inputs):
                vals = ",".join(str(int(v)) for v in np.asarray(x).reshape(-1))
                main.append(f"static const int8_t {name}_in{k}_{j}[] = {{{vals}}};")
            outs = [f"static int8_t {name}_out{k}_{j}[{n}];" for j, n in enumerate(r.output_bytes)]
            main += outs
            ins = ", ".join(f"{name}_in{k}_{j}" for j in range(len(inputs)))
            outp = ", ".join(f"{name}_out{k}_{j}" for j in range(len(r.output_bytes)))
            calls.append((name, k, ins, outp, r.output_bytes))
    main += ["#define SYST_CSR (*(volatile uint32_t *)0xE000E010)",
             "#define SYST_RVR (*(volatile uint32_t *)0xE000E014)",
             "#define SYST_CVR (*(volatile uint32_t *)0xE000E018)",
             "static void dump(const int8_t *p, int n) { int i; for (i = 0; i < n; i++) printf(\"%d,\", p[i]); }",
             "int main(void) {",
             "  uint32_t t0, t1; int rc;",
             "  SYST_RVR = 0xFFFFFF; SYST_CVR = 0; SYST_CSR = 5;",
             "  t0 = SYST_CVR;",
             '  __asm volatile("mov r0, %0\\n1: subs r0, r0, #1\\n bne 1b" :: "r"(1000000) : "r0", "cc");',
             "  t1 = SYST_CVR;",
             '  printf("calib %lu\\n", (unsigned long)((t0 - t1) & 0xFFFFFF));',
             f'  printf("dsp {0 if portable else 1} %d\\n", kws_kernels_dsp());']
    for name, k, ins, outp, nbytes in calls:
        main += ["  {", f"    const int8_t *const ins[] = {{{ins}}};", f"    int8_t *const outs[] = {{{outp}}};",
                 "    t0 = SYST_CVR;", f"    rc = {name}_invoke_io(ins, outs);", "    t1 = SYST_CVR;",
                 f'    printf("case {name} {k} %d %lu ", rc, (unsigned long)((t0 - t1) & 0xFFFFFF));']
        main += [f"    dump({name}_out{k}_{j}, {n});" for j, n in enumerate(nbytes)]
        main += ['    printf("\\n");', "  }"]
    main += ["  return 0;", "}"]
    (work / "main.c").write_text("\n".join(main) + "\n")
    (work / "startup.c").write_text(_STARTUP)
    (work / "link.ld").write_text(_LINK)
    elf = work / "fw.elf"
    cmd = ["arm-none-eabi-gcc", *M4_FLAGS, *CFLAGS, "-Wno-unused-parameter", "-nostartfiles", "--specs=rdimon.specs",
           "-T", str(work / "link.ld"), f"-I{KERNELS}", f"-I{work}", *(["-DKWS_KERNELS_PORTABLE"] if portable else []),
           str(work / "startup.c"), str(work / "main.c"), *map(str, srcs), "-o", str(elf)]
    p = subprocess.run(cmd, capture_output=True, text=True, check=False)
    assert p.returncode == 0, p.stderr[-3000:]
    return elf


def _run_qemu(elf: Path) -> list[str]:
    p = subprocess.run(["qemu-system-arm", "-M", "mps2-an386", "-nographic", "-icount", "shift=0",
                        "-semihosting-config", "enable=on,target=native", "-kernel", str(elf)],
                       capture_output=True, text=True, timeout=300, check=False)
    assert p.returncode == 0, (p.returncode, p.stdout[-2000:], p.stderr[-2000:])
    return p.stdout.splitlines()


@pytest.mark.skipif(not (HAVE_ARM and HAVE_QEMU),
                    reason="needs arm-none-eabi-gcc and qemu-system-arm (Debian: gcc-arm-none-eabi, qemu-system-arm)")
def test_dsp_path_matches_tflite_micro_on_emulated_cortex_m4(random_layers, tmp_path):
    """Every random layer, graph and the DS-CNN, built for Cortex-M4 with the SMLAD path, under QEMU."""
    _, models = random_layers
    rng = np.random.default_rng(5)
    cases = {n: [random_inputs(b, rng) for _ in range(3 if n == "dscnn_s" else 2)] for n, b in models.items()}
    results = {}
    for portable in (False, True):
        work = tmp_path / ("portable" if portable else "dsp")
        work.mkdir()
        lines = _run_qemu(_qemu_firmware(models, cases, work, portable=portable))
        assert f"dsp {0 if portable else 1} {0 if portable else 1}" in lines
        calib = int(next(line for line in lines if line.startswith("calib")).split()[1])
        for line in lines:
            if line.startswith("case "):
                _, name, k, rc, ticks, vals = line.split(" ", 5)
                assert rc == "0", line
                results[(portable, name, int(k))] = (np.array([int(v) for v in vals.strip(",").split(",")], np.int8),
                                                     int(ticks))
    for name, model in models.items():
        for k, inputs in enumerate(cases[name]):
            ref = np.concatenate([o.reshape(-1) for o in verify.run_multi(model, inputs)])
            for portable in (False, True):
                got = results[(portable, name, k)][0]
                assert np.array_equal(got, ref), (name, k, "portable" if portable else "DSP", got, ref)
    # instructions per inference, from SysTick under -icount (calibrated on a 2-instruction loop)
    per_instr = calib / 2_000_000
    macs = 2_656_768
    dsp = results[(False, "dscnn_s", 0)][1] / per_instr
    port = results[(True, "dscnn_s", 0)][1] / per_instr
    print(f"\nDS-CNN 64x4 on the emulated Cortex-M4: DSP path {dsp / 1e6:.2f}M instructions "
          f"({dsp / macs:.2f}/MAC), portable {port / 1e6:.2f}M ({port / macs:.2f}/MAC)")
    assert dsp < port


# ---------------------------------------------------------------- the real pipeline: Keras -> converter -> C

@needs_gcc
def test_trained_dscnn_from_the_converter_is_bit_exact(tmp_path):
    """A tiny DS-CNN trained a few steps on random data, quantised by the TFLite converter, exported,
    compiled with host gcc: outputs for many inputs, and every intermediate for some, equal TFLM's."""
    pytest.importorskip("tensorflow")
    from models import kws
    from models.costs import DSCNNShape
    from tiers.tier0 import quantize

    rng = np.random.default_rng(1)
    x = rng.normal(0, 1, (192, 49, 10, 1)).astype(np.float32)
    y = rng.integers(0, 12, 192)
    model = kws.compile_for_training(kws.build(DSCNNShape(channels=8, blocks=2), seed=1))
    model.fit(x, y, epochs=2, batch_size=64, verbose=0)
    tflite = quantize.quantize(model, x, samples=64)

    c = CModels({"kws_model": tflite}, tmp_path)
    assert_bit_exact(c, "kws_model", tflite, rng, n_inputs=8)          # outputs and intermediates
    qin, _ = quantize.io_params(tflite)
    xs = np.concatenate([qin.quantize(x[:150]), rng.integers(-128, 128, (50, 49, 10, 1)).astype(np.int8)])
    ref = verify.run(tflite, xs).reshape(len(xs), -1)
    got = np.stack([c.run("kws_model", [row])[0][0] for row in xs])
    assert np.array_equal(got, ref), np.flatnonzero((got != ref).any(axis=1))[:10]
    # the one-input entry point the firmware calls gives the same
    out = np.zeros(12, np.int8)
    c.lib.kws_model_invoke(xs[0].ctypes.data_as(ctypes.c_void_p), out.ctypes.data_as(ctypes.c_void_p))
    assert np.array_equal(out, ref[0])
    h = c.results["kws_model"].h_path.read_text()
    assert "#define KWS_MODEL_INPUT_SIZE 490" in h and f"#define KWS_MODEL_INPUT_ZERO_POINT ({qin.zero_point})" in h

"""Int8 post-training quantisation of a Keras model with the TFLite converter.

Full-integer quantisation: every weight int8 (per channel for convolutions),
every activation int8 with a scale and zero point calibrated on a
representative dataset, int8 input and int8 output, and only builtin int8 ops,
so the model runs on TFLite Micro and on our generated C without a float unit
in the inference path. The calibration data must come from the training
features: the activation ranges are measured on them, and a range measured on
anything else clips (or wastes) int8 levels on the real inputs.

TensorFlow is imported inside the functions: it takes seconds to load.
"""
from __future__ import annotations

import contextlib
import io
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class QuantParams:
    """Scale and zero point of one int8 tensor: real = scale * (q - zero_point)."""

    scale: float
    zero_point: int

    def quantize(self, x: np.ndarray) -> np.ndarray:
        """Float features to the model's int8 input, rounding half away from zero as TFLite does."""
        q = np.asarray(x, np.float64) / self.scale
        q = np.sign(q) * np.floor(np.abs(q) + 0.5) + self.zero_point
        return np.clip(q, -128, 127).astype(np.int8)

    def dequantize(self, q: np.ndarray) -> np.ndarray:
        return (np.asarray(q, np.float32) - self.zero_point) * np.float32(self.scale)


def quantize(model: Any, representative: np.ndarray, *, samples: int = 500, seed: int = 0) -> bytes:
    """The int8 .tflite bytes of `model`, calibrated on up to `samples` rows of `representative`.

    `representative` is float features shaped like the model input without the
    batch axis ((N, 49, 10, 1) for the DS-CNN; a missing channel axis is added).
    Rows are drawn at random (seeded) so the calibration sees every class, not
    just the first ones of a sorted array.
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")   # before TensorFlow's first import: no C++ info logs
    import tensorflow as tf

    rep = np.asarray(representative, np.float32)
    want = tuple(int(d) for d in model.input_shape[1:])
    if rep.shape[1:] != want and rep.shape[1:] + (1,) == want:
        rep = rep[..., None]
    if rep.shape[1:] != want:
        raise ValueError(f"representative data has rows of shape {rep.shape[1:]}, the model takes {want}")
    if len(rep) == 0:
        raise ValueError("representative data is empty: calibration needs at least one training example")
    idx = np.random.default_rng(seed).permutation(len(rep))[:samples]

    def gen() -> Iterator[list[np.ndarray]]:
        for i in idx:
            yield [rep[i:i + 1]]

    # Convert a batch-1 wrapper, not the model itself: with Keras 3 a dynamic batch axis makes
    # Flatten/Reshape export as SHAPE -> STRIDED_SLICE -> PACK -> RESHAPE, ops a microcontroller
    # has no use for. With every shape static they fold into one RESHAPE.
    inp = tf.keras.Input(shape=want, batch_size=1, name="input")
    fixed = tf.keras.Model(inp, model(inp, training=False))
    conv = tf.lite.TFLiteConverter.from_keras_model(fixed)
    conv.optimizations = [tf.lite.Optimize.DEFAULT]
    conv.representative_dataset = gen
    conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    conv.inference_input_type = tf.int8
    conv.inference_output_type = tf.int8
    # Keras prints the exported signature and the converter warns that int8 inputs carry no
    # statistics (they need none: the representative data calibrates them); keep the CLI quiet.
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.filterwarnings("ignore", message="Statistics for quantized inputs were expected")
        return bytes(conv.convert())


def io_params(tflite: bytes) -> tuple[QuantParams, QuantParams]:
    """(input, output) quantisation of a one-input one-output int8 model, read from the flatbuffer."""
    from tiers.tier0.compiler.tflite import read_model  # no TensorFlow needed

    m = read_model(tflite)
    i, o = m.tensors[m.inputs[0]], m.tensors[m.outputs[0]]
    return QuantParams(i.scales[0], i.zero_points[0]), QuantParams(o.scales[0], o.zero_points[0])


def predict_int8(tflite: bytes, x: np.ndarray, *, batch: int = 256) -> np.ndarray:
    """Int8 model outputs (dequantised float scores) for float features `x`, via LiteRT.

    LiteRT's CPU kernels are fast and batchable; they are *not* the reference
    for the microcontroller (TFLite Micro is, see verify.py), but argmax agrees
    with it on all but a handful of ties, which is what an accuracy figure needs.
    """
    from ai_edge_litert.interpreter import Interpreter

    qin, qout = io_params(tflite)
    x = np.asarray(x, np.float32)
    ip = Interpreter(model_content=tflite)
    d_in = ip.get_input_details()[0]
    shape = [int(d) for d in d_in["shape"][1:]]
    x = x.reshape((-1, *shape))
    out_index = ip.get_output_details()[0]["index"]

    def invoke(chunk: np.ndarray) -> np.ndarray:
        ip.resize_tensor_input(d_in["index"], [len(chunk), *shape])
        ip.allocate_tensors()
        ip.set_tensor(d_in["index"], chunk)
        ip.invoke()
        return qout.dequantize(ip.get_tensor(out_index))

    out = []
    for s in range(0, len(x), batch):
        chunk = qin.quantize(x[s:s + batch])
        try:
            out.append(invoke(chunk))
        except (RuntimeError, ValueError):
            # a graph with the batch of 1 baked in (a RESHAPE to [1, n]): one example at a time
            out.append(np.concatenate([invoke(chunk[i:i + 1]) for i in range(len(chunk))]))
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


@dataclass(frozen=True)
class AccuracyReport:
    """Top-1 accuracy of the float model and of its int8 quantisation on the same examples."""

    float_acc: float
    int8_acc: float
    n: int
    agreement: float   # fraction of examples where both pick the same class

    def line(self) -> str:
        return (f"top-1 on {self.n} held-out examples: float {self.float_acc:.1%}, int8 {self.int8_acc:.1%} "
                f"({self.int8_acc - self.float_acc:+.1%}); same class {self.agreement:.1%}")


def compare_accuracy(model: Any, tflite: bytes, x: np.ndarray, y: np.ndarray) -> AccuracyReport:
    """Float vs int8 top-1 accuracy on held-out (speaker-disjoint) features `x` with labels `y`."""
    x = np.asarray(x, np.float32)
    want = tuple(int(d) for d in model.input_shape[1:])
    if x.shape[1:] != want:
        x = x.reshape((-1, *want))
    y = np.asarray(y)
    if len(x) == 0:
        raise ValueError("no held-out examples to measure accuracy on")
    pf = np.asarray(model.predict(x, verbose=0, batch_size=256)).argmax(-1)
    pq = predict_int8(tflite, x).argmax(-1)
    return AccuracyReport(float_acc=float((pf == y).mean()), int8_acc=float((pq == y).mean()),
                          n=len(y), agreement=float((pf == pq).mean()))

"""The keyword-spotting DS-CNN (MLPerf Tiny's reference model) and its size ladder.

    input 49x10x1 MFCC
    Conv2D C @ 10x4, stride 2, same -> BN -> ReLU -> Dropout 0.2
    blocks x [DepthwiseConv 3x3 same -> BN -> ReLU -> Conv 1x1 C -> BN -> ReLU]
    Dropout 0.4 -> AveragePool (H/2 x W/2, as the reference: int(49/2) x int(10/2) = 24x5)
    -> Flatten -> Dense 12 -> softmax

`build(size)` makes the Keras model (TensorFlow is imported inside it: it takes
seconds to import, and the planner, which only needs the numbers, must not pay
for it). `params`, `macs`, `weight_bytes`, `flash_bytes` and `arena_bytes` are
plain arithmetic, shared with the planner through `models.costs.dscnn`, so
that what `tierkit fit` predicts and what `tierkit kws train` builds are the
same network. Batch norm is folded into the convolutions by the TFLite
converter, so the counts are those of the int8 model, not Keras' count (which
also holds BN's moving statistics).

Why 24x5 for the pool when the feature map is 25x5: the MLPerf Tiny reference
computes the pool size as `int(input_shape/2)`; we keep its arithmetic so a
model trained with their recipe and one trained here have the same graph.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from models.costs import DSCNNShape, dscnn

if TYPE_CHECKING:  # pragma: no cover - typing only
    import tensorflow as tf

INPUT_SHAPE: tuple[int, int, int] = (49, 10, 1)   # frames x MFCCs x 1
NUM_CLASSES = 12
LABELS: tuple[str, ...] = ("_silence_", "_unknown_", "yes", "no", "up", "down",
                           "left", "right", "on", "off", "stop", "go")

# The ladder. Names match the B6 rungs of tiers/milestones.yaml ("ds-cnn-s" == "s").
SIZES: dict[str, DSCNNShape] = {
    "xs": DSCNNShape(channels=32, blocks=4),
    "s": DSCNNShape(channels=64, blocks=4),    # the MLPerf Tiny reference
    "m": DSCNNShape(channels=172, blocks=4),
    "l": DSCNNShape(channels=276, blocks=5),
}


@dataclass(frozen=True)
class KWSNumbers:
    """What the planner needs about one size, before any training."""

    size: str
    params: int          # after BN folding (what the int8 .tflite holds)
    macs: int            # multiply-accumulates per inference
    weight_bytes: int    # int8 weights + int32 biases
    flash_bytes: int     # estimated int8 .tflite size
    arena_bytes: int     # estimated TFLite Micro arena


def shape(size: str | DSCNNShape) -> DSCNNShape:
    """A ladder name ("s" or "ds-cnn-s") or a shape, as a shape; a one-line error otherwise."""
    if isinstance(size, DSCNNShape):
        return size
    key = size.removeprefix("ds-cnn-")
    if key not in SIZES:
        raise ValueError(f"unknown DS-CNN size {size!r}: choose one of {', '.join(SIZES)}")
    return SIZES[key]


def numbers(size: str | DSCNNShape) -> KWSNumbers:
    """Params, MACs, bytes of one size: models.costs.dscnn's arithmetic, unpacked."""
    s = shape(size)
    c = dscnn(s)
    weights = _weight_count(s)
    biases = c.params - weights
    name = size if isinstance(size, str) else f"c{s.channels}b{s.blocks}"
    return KWSNumbers(size=name, params=c.params, macs=int(c.extra["macs"]),
                      weight_bytes=weights + 4 * biases, flash_bytes=int(c.extra["model_bytes"]),
                      arena_bytes=int(c.extra["arena_bytes"]))


def params(size: str | DSCNNShape) -> int:
    return numbers(size).params


def macs(size: str | DSCNNShape) -> int:
    return numbers(size).macs


def weight_bytes(size: str | DSCNNShape) -> int:
    """Bytes of int8 weights plus int32 biases: the floor of any int8 model file."""
    return numbers(size).weight_bytes


def _weight_count(s: DSCNNShape) -> int:
    kh, kw = s.first_kernel
    return kh * kw * s.channels + s.blocks * (9 * s.channels + s.channels * s.channels) + s.channels * s.classes


def pool_size(s: DSCNNShape) -> tuple[int, int]:
    """The reference's final pool: int(H/2) x int(W/2) of the input (24x5 for 49x10)."""
    return s.input_hw[0] // 2, s.input_hw[1] // 2


def build(size: str | DSCNNShape = "s", *, weight_decay: float = 1e-4, seed: int | None = None) -> tf.keras.Model:
    """The Keras DS-CNN of one size, uncompiled.

    Layer for layer the MLPerf Tiny `keras_model.py` DS-CNN, with the width and
    depth taken from the ladder. Dropout is a no-op at inference, so it leaves
    no op in the .tflite.
    """
    import tensorflow as tf
    from tensorflow.keras import layers, regularizers

    s = shape(size)
    if seed is not None:
        tf.keras.utils.set_random_seed(seed)
    reg = regularizers.l2(weight_decay) if weight_decay else None
    c = s.channels
    inputs = tf.keras.Input(shape=(*s.input_hw, 1), name="mfcc")
    x = layers.Conv2D(c, s.first_kernel, strides=s.stride, padding="same", kernel_regularizer=reg)(inputs)
    x = layers.BatchNormalization()(x)
    x = layers.Activation("relu")(x)
    x = layers.Dropout(0.2)(x)
    for _ in range(s.blocks):
        x = layers.DepthwiseConv2D((3, 3), padding="same", depth_multiplier=1, depthwise_regularizer=reg)(x)
        x = layers.BatchNormalization()(x)
        x = layers.Activation("relu")(x)
        x = layers.Conv2D(c, (1, 1), padding="same", kernel_regularizer=reg)(x)
        x = layers.BatchNormalization()(x)
        x = layers.Activation("relu")(x)
    x = layers.Dropout(0.4)(x)
    x = layers.AveragePooling2D(pool_size=pool_size(s))(x)
    x = layers.Flatten()(x)
    outputs = layers.Dense(s.classes, activation="softmax")(x)
    return tf.keras.Model(inputs, outputs, name=f"ds_cnn_c{c}_b{s.blocks}")


def compile_for_training(model: Any, learning_rate: float = 1e-3) -> Any:
    """Adam + sparse categorical cross-entropy on the softmax output, as the reference trains it."""
    import tensorflow as tf

    model.compile(optimizer=tf.keras.optimizers.Adam(learning_rate),
                  loss=tf.keras.losses.SparseCategoricalCrossentropy(),
                  metrics=["accuracy"])
    return model

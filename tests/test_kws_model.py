"""The DS-CNN (models/kws.py), its int8 quantisation (tiers/tier0/quantize.py) and the TFLite Micro
reference run (tiers/tier0/verify.py): real Keras, the real converter, the real interpreter, on a
tiny model trained for a few steps on random data (no dataset needed)."""
from __future__ import annotations

import numpy as np
import pytest

from models import kws
from models.costs import DSCNNShape, dscnn

TINY = DSCNNShape(channels=8, blocks=2)


# ---------------------------------------------------------------- analytic numbers (no TensorFlow)

def test_ladder_numbers_match_the_cost_model_and_mlperf():
    s = kws.numbers("s")
    assert s.params == 22_604 and s.macs == 2_656_768          # MLPerf Tiny: ~22.6K params, ~2.66M MACs
    assert s.params == dscnn(kws.SIZES["s"]).params            # one formula for the planner and the model
    assert s.weight_bytes == (10 * 4 * 64 + 4 * (9 * 64 + 64 * 64) + 64 * 12) + 4 * (64 + 4 * 128 + 12)
    assert abs(s.flash_bytes / 53_936 - 1) < 0.05
    sizes = [kws.numbers(k) for k in ("xs", "s", "m", "l")]
    assert [n.params for n in sizes] == sorted(n.params for n in sizes)
    assert kws.numbers("ds-cnn-m").macs == kws.macs("m")        # the milestone's rung names work too
    with pytest.raises(ValueError, match="unknown DS-CNN size 'xxl'"):
        kws.shape("xxl")


def test_ladder_matches_milestone_rungs():
    from tiers import catalog

    rungs = {r.size: r for r in catalog.load().get("B6").ladder}
    for name, shape in kws.SIZES.items():
        r = rungs[f"ds-cnn-{name}"]
        assert (r.channels, r.blocks) == (shape.channels, shape.blocks)


# ---------------------------------------------------------------- Keras, converter, interpreter

tf = pytest.importorskip("tensorflow")
pytest.importorskip("tflite_micro")

from tiers.tier0 import export, quantize, verify


@pytest.fixture(scope="module")
def trained():
    """A tiny DS-CNN fitted for a few steps on random 'features' (labels from a fixed rule)."""
    rng = np.random.default_rng(0)
    x = rng.normal(0, 1, (256, 49, 10, 1)).astype(np.float32)
    y = (x[:, :10, :, 0].mean(axis=(1, 2)) > 0).astype(np.int64) * 3 + rng.integers(0, 2, 256)
    model = kws.compile_for_training(kws.build(TINY, seed=0))
    model.fit(x, y, epochs=2, batch_size=64, verbose=0)
    tflite = quantize.quantize(model, x, samples=64)
    return model, tflite, x, y


def test_keras_model_shapes_and_folded_params():
    for name in ("xs", "s", "m", "l"):
        m = kws.build(name)
        assert m.input_shape == (None, 49, 10, 1) and m.output_shape == (None, 12)
        # Keras also counts BN's 4 vectors and the conv biases BN makes redundant; folded, they leave
        # one bias per conv channel: the cost model's count.
        convs = [layer for layer in m.layers if type(layer).__name__ in ("Conv2D", "DepthwiseConv2D", "Dense")]
        weights = sum(int(np.prod(layer.get_weights()[0].shape)) for layer in convs)
        biases = sum(int(layer.get_weights()[0].shape[-1]) * (layer.get_weights()[0].shape[-2]
                     if type(layer).__name__ == "DepthwiseConv2D" else 1) for layer in convs)
        assert weights + biases == kws.params(name), name
    # the reference's pool: int(49/2) x int(10/2) over the 25 x 5 map
    pool = next(layer for layer in kws.build("xs").layers if type(layer).__name__ == "AveragePooling2D")
    assert tuple(pool.pool_size) == (24, 5)


def test_quantised_model_is_int8_with_supported_ops_only(trained):
    _, tflite, _, _ = trained
    m = export.read_model(tflite)
    assert {op.name for op in m.ops} <= set(export.SUPPORTED_OPS)
    assert next(op.name for op in m.ops) == "CONV_2D" and m.ops[-1].name == "SOFTMAX"
    qin, qout = quantize.io_params(tflite)
    assert m.tensors[m.inputs[0]].dtype == "int8" and m.tensors[m.outputs[0]].dtype == "int8"
    assert qout.scale == pytest.approx(1 / 256) and qout.zero_point == -128
    # the int8 weights in the file are exactly the cost model's count (BN folded)
    weights = sum(t.size for t in m.tensors if t.data is not None and t.dtype == "int8")
    biases = sum(t.size for t in m.tensors if t.data is not None and t.dtype == "int32" and len(t.shape) == 1
                 and t.size > 2)
    assert weights + biases == kws.params(TINY)
    assert quantize.QuantParams(qin.scale, qin.zero_point).quantize(np.array([1e9, -1e9])).tolist() == [127, -128]


def test_quantise_rejects_bad_calibration_data():
    model = kws.build(TINY, seed=0)
    with pytest.raises(ValueError, match="shape"):
        quantize.quantize(model, np.zeros((4, 40, 10), np.float32))
    with pytest.raises(ValueError, match="empty"):
        quantize.quantize(model, np.zeros((0, 49, 10), np.float32))


def test_float_vs_int8_accuracy_report(trained):
    model, tflite, x, y = trained
    r = quantize.compare_accuracy(model, tflite, x[:128], y[:128])
    assert r.n == 128 and 0 <= r.float_acc <= 1 and 0 <= r.int8_acc <= 1
    assert r.agreement > 0.8                 # int8 picks the float model's class almost always
    assert "float" in r.line() and "int8" in r.line()


def test_tflite_micro_runs_batches_and_reports_its_arena(trained):
    _, tflite, x, y = trained
    qin, _ = quantize.io_params(tflite)
    xq = qin.quantize(x[:16])
    batch = verify.run(tflite, xq)
    assert batch.shape == (16, 1, 12) and batch.dtype == np.int8
    one = verify.run(tflite, xq[3:4])
    assert np.array_equal(one[0], batch[3])
    # LiteRT (batched CPU kernels) picks the same class as TFLite Micro
    lite = quantize.predict_int8(tflite, x[:16]).reshape(16, -1).argmax(-1)
    assert (lite == batch.reshape(16, -1).argmax(-1)).mean() >= 0.9
    a = verify.arena(tflite)
    assert a.total == a.head + a.tail and a.head >= 25 * 5 * 8 * 2   # two live 25x5x8 activations at least
    assert "TFLite Micro arena" in a.line()
    acc = verify.accuracy(tflite, x[:32], y[:32])
    assert 0 <= acc <= 1
    with pytest.raises(ValueError, match="int8"):
        verify.run(tflite, x[:2])


def test_intermediates_are_readable(trained):
    _, tflite, x, _ = trained
    m = export.read_model(tflite)
    qin, _ = quantize.io_params(tflite)
    outs = [op.outputs[0] for op in m.ops]
    mid = verify.intermediates(tflite, [qin.quantize(x[0])], outs)
    assert set(mid) == set(outs)
    assert mid[outs[0]].shape == (1, 25, 5, 8)
    assert np.array_equal(mid[outs[-1]].reshape(-1), verify.run(tflite, qin.quantize(x[:1])).reshape(-1))

"""The MFCC front end: numpy against MLPerf Tiny's tf.signal pipeline, the device's C
against numpy (batch, streaming, int8 input), and the C built for a Cortex-M4.

Measured on the 2,665 real Speech Commands test clips (features span about
-124..+27): numpy vs tf.signal max |diff| 3.4e-4, C vs numpy 2.2e-4, and the int8
input tensors agree on >= 99.9997% of elements (at most 1 step apart).
"""
from __future__ import annotations

import ctypes
import shutil
import subprocess

import numpy as np
import pytest

from tests.conftest import SHARED
from tiers.tier0 import data as d
from tiers.tier0 import features as F

REAL = SHARED / "data" / "speech_commands_v2_test"
C_DIR = F.C_DIR
CFLAGS = ["-O2", "-std=c99", "-Wall", "-Wextra", "-Wpedantic", "-Wdouble-promotion", "-Werror"]
M4_FLAGS = ["-mcpu=cortex-m4", "-mthumb", "-mfloat-abi=hard", "-mfpu=fpv4-sp-d16"]

MAX_ABS = 1e-3        # MFCC units; the features span ~150
INT8_AGREE = 0.999    # fraction of int8 input elements that must be identical


@pytest.fixture(scope="module")
def clips() -> np.ndarray:
    if not REAL.is_dir():
        pytest.skip(f"real Speech Commands clips not found at {REAL}")
    return d.load(REAL).audio                       # (2665, 16000) int16


@pytest.fixture(scope="module")
def np_feats(clips) -> np.ndarray:
    return F.mfcc(clips)


@pytest.fixture(scope="module")
def qparams(np_feats) -> tuple[float, int]:
    """The input scale/zero point a converter would pick from these features."""
    return F.int8_params(np_feats)


@pytest.fixture(scope="module")
def lib(tmp_path_factory) -> ctypes.CDLL:
    """kws_features.c built for this host as a shared library."""
    if shutil.which("gcc") is None:
        pytest.skip("gcc not installed (sudo apt-get install gcc)")
    so = tmp_path_factory.mktemp("kws") / "libkws_features.so"
    proc = subprocess.run(["gcc", *CFLAGS, "-shared", "-fPIC", "-o", str(so), str(C_DIR / "kws_features.c"), "-lm"],
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    lib = ctypes.CDLL(str(so))
    i16 = np.ctypeslib.ndpointer(np.int16, flags="C")
    f32 = np.ctypeslib.ndpointer(np.float32, flags="C")
    i8 = np.ctypeslib.ndpointer(np.int8, flags="C")
    lib.kws_peak.argtypes, lib.kws_peak.restype = [i16, ctypes.c_size_t], ctypes.c_float
    lib.kws_mfcc.argtypes = [i16, f32]
    lib.kws_mfcc_frame.argtypes = [i16, ctypes.c_float, f32]
    lib.kws_mel_frame.argtypes = [i16, ctypes.c_float, f32]
    lib.kws_mfcc_from_mel.argtypes = [f32, ctypes.c_float, f32]
    lib.kws_quantize_int8.argtypes = [f32, i8, ctypes.c_size_t, ctypes.c_float, ctypes.c_int32]
    lib.kws_log.argtypes, lib.kws_log.restype = [ctypes.c_float], ctypes.c_float
    return lib


def test_own_log_is_within_two_ulp(lib):
    """The front end's logarithm (ours, not libm's, so board and host agree bit for bit) against
    float64, over the whole float32 range, subnormals and the values around 1."""
    rng = np.random.default_rng(0)
    xs = np.concatenate([np.exp(rng.uniform(np.log(1e-45), np.log(3e38), 20000)), rng.uniform(0.5, 2, 20000),
                         1 + rng.normal(0, 1e-3, 2000), [1.0, 2.0, 0.5, 1e-6, 1.4142135, 1.4142136]]).astype(np.float32)
    xs = xs[xs > 0]
    got = np.array([lib.kws_log(float(x)) for x in xs], np.float32)
    true = np.log(xs.astype(np.float64))
    ulps = np.abs(got - true) / np.spacing(np.abs(true).astype(np.float32)).astype(np.float64)
    assert ulps.max() <= 2.0, (ulps.max(), xs[ulps.argmax()])
    assert lib.kws_log(1.0) == 0.0 and lib.kws_log(0.0) == -np.inf and np.isnan(lib.kws_log(-1.0))
    assert lib.kws_log(float("inf")) == np.inf


def c_mfcc(lib: ctypes.CDLL, audio: np.ndarray) -> np.ndarray:
    out = np.empty((len(audio), F.NUM_FRAMES, F.NUM_MFCC), dtype=np.float32)
    for i, clip in enumerate(audio):
        lib.kws_mfcc(np.ascontiguousarray(clip), out[i])
    return out


def int8_agreement(a: np.ndarray, b: np.ndarray, q: tuple[float, int]) -> tuple[float, int]:
    qa, qb = F.quantize_int8(a, *q), F.quantize_int8(b, *q)
    return float(np.mean(qa == qb)), int(np.max(np.abs(qa.astype(int) - qb)))


# ------------------------------------------------------------------ numpy vs tf.signal

def test_numpy_equals_tf_signal_on_real_clips(clips, np_feats, qparams):
    tf_feats = F.mfcc_tf(clips)
    assert np_feats.shape == tf_feats.shape == (len(clips), 49, 10)
    err = np.abs(np_feats - tf_feats)
    span = float(np_feats.max() - np_feats.min())
    agree, worst = int8_agreement(np_feats, tf_feats, qparams)
    print(f"numpy vs tf.signal: max |diff| {err.max():.2e}, mean {err.mean():.1e}, "
          f"span {span:.1f}, int8 agreement {agree:.7f} (worst {worst} step)")
    assert err.max() < MAX_ABS and err.max() / span < 1e-5
    assert agree >= 0.9999 and worst <= 1


def test_tables_equal_tf_signal_tables():
    import tensorflow as tf

    np.testing.assert_allclose(F.hann_window(), tf.signal.hann_window(480).numpy(), atol=1e-6)
    np.testing.assert_allclose(F.mel_weight_matrix(),
                               tf.signal.linear_to_mel_weight_matrix(40, 257, 16000, 20.0, 4000.0).numpy(), atol=2e-5)
    log_mel = np.random.default_rng(0).standard_normal((3, 40)).astype(np.float32)
    np.testing.assert_allclose(log_mel @ F.dct_matrix().T,
                               tf.signal.mfccs_from_log_mel_spectrograms(log_mel).numpy()[:, :10], atol=1e-5)


def test_numpy_front_end_conventions(clips, np_feats):
    one = F.mfcc(clips[5])
    np.testing.assert_array_equal(one, np_feats[5])                     # a clip is a batch of one
    np.testing.assert_allclose(F.mfcc(clips[5].astype(np.float32) / 32768), one, atol=1e-4)  # level-free
    short = clips[7][:12000]                                           # padded at the end, like the reference
    np.testing.assert_array_equal(F.mfcc(short), F.mfcc(np.pad(short, (0, 4000)), F.peak(short)))
    silent = F.mfcc(np.zeros(16000, np.int16))                         # reference: NaN; here: log(1e-6)
    assert np.isfinite(silent).all() and np.allclose(silent[:, 0], np.sqrt(80) * np.log(1e-6), atol=1e-3)
    frame = F.mfcc_frame(clips[5][320 * 10:320 * 10 + 480], F.peak(clips[5]))
    np.testing.assert_allclose(frame, one[10], atol=1e-5)
    with pytest.raises(ValueError, match="samples"):
        F.mfcc(np.zeros(16001, np.int16))


# ------------------------------------------------------------------ the device's C vs numpy

def test_c_equals_numpy_on_real_clips(lib, clips, np_feats, qparams):
    c = c_mfcc(lib, clips)
    err = np.abs(c - np_feats)
    agree, worst = int8_agreement(c, np_feats, qparams)
    print(f"C vs numpy: max |diff| {err.max():.2e}, mean {err.mean():.1e}, int8 agreement {agree:.7f} "
          f"(worst {worst} step) with scale {qparams[0]:.4f} zero point {qparams[1]}")
    assert err.max() < MAX_ABS
    assert agree >= INT8_AGREE and worst <= 1


def test_c_peak_follows_the_reference_rule(lib):
    def peak(x: list[int]) -> float:
        a = np.array(x, dtype=np.int16)
        c = lib.kws_peak(a, len(a))
        assert c == F.peak(a)
        return c
    assert peak([3, -7, 5]) == 5          # the largest sample, not the largest magnitude
    assert peak([0, -7, -3]) == 7         # no positive sample: the reference divides by 0; we by |min|
    assert peak([0, 0]) == 1
    assert peak([-2, -9]) == -2           # negative peak: the sign cancels in |FFT|, as in the reference


def test_c_streaming_equals_batch(lib, clips):
    """Frame by frame (kws_mfcc_frame with the clip's peak) is the batch call, bit for bit; the
    two-half streaming path (mel energies at a fixed divisor, rescaled when the window's peak
    is known) equals it within float rounding, digital silence included."""
    for clip in clips[::97]:
        clip = np.ascontiguousarray(clip)
        batch = np.empty((49, 10), np.float32)
        lib.kws_mfcc(clip, batch)
        p = lib.kws_peak(clip, 16000)
        framed = np.empty_like(batch)
        streamed = np.empty_like(batch)
        mel = np.empty(40, np.float32)
        for f in range(49):
            frame = np.ascontiguousarray(clip[f * 320:f * 320 + 480])
            lib.kws_mfcc_frame(frame, p, framed[f])
            lib.kws_mel_frame(frame, 32768.0, mel)            # every 20 ms, before the peak is known
            lib.kws_mfcc_from_mel(mel, 32768.0 / p, streamed[f])  # when the model runs
        np.testing.assert_array_equal(framed, batch)
        np.testing.assert_allclose(streamed, batch, atol=1e-4)


def test_c_quantize_equals_numpy(lib, qparams):
    rng = np.random.default_rng(0)
    scale, zp = qparams
    x = np.concatenate([rng.uniform(-200, 60, 5000),
                        (np.arange(-300, 300) + 0.5) * scale,         # ties (up to float32 rounding)
                        [1e9, -1e9, 0.0]]).astype(np.float32)
    out = np.empty(len(x), np.int8)
    lib.kws_quantize_int8(x, out, len(x), scale, zp)
    np.testing.assert_array_equal(out, F.quantize_int8(x, scale, zp))
    exact = np.array([0.5, -0.5, 1.5, -1.5, 2.5], np.float32)         # exact ties: half away from zero
    q = np.empty(5, np.int8)
    lib.kws_quantize_int8(exact, q, 5, 1.0, 0)
    assert q.tolist() == F.quantize_int8(exact, 1.0, 0).tolist() == [1, -1, 2, -2, 3]


def test_c_tables_header_is_current():
    assert (C_DIR / "kws_features_tables.h").read_text() == F.c_tables_header(), \
        "regenerate: python -m tiers.tier0.features --c-tables"


def test_builds_for_cortex_m4(tmp_path):
    if shutil.which("arm-none-eabi-gcc") is None:
        pytest.skip("arm-none-eabi-gcc not installed (sudo apt-get install gcc-arm-none-eabi libnewlib-arm-none-eabi)")
    obj = tmp_path / "kws_features.o"
    proc = subprocess.run(["arm-none-eabi-gcc", *M4_FLAGS, *CFLAGS, "-c", str(C_DIR / "kws_features.c"),
                           "-o", str(obj)], capture_output=True, text=True, check=False)
    assert proc.returncode == 0 and not proc.stderr, proc.stderr
    size = subprocess.run(["arm-none-eabi-size", str(obj)], capture_output=True, text=True, check=True).stdout
    text, data, bss = (int(v) for v in size.splitlines()[1].split()[:3])
    print(f"cortex-m4 kws_features.o: text {text} B, data {data} B, bss {bss} B")
    assert data == 0 and bss <= 4096 and text <= 12 * 1024

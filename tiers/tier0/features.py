"""The keyword spotter's front end: 49 x 10 MFCC per second of 16 kHz audio.

The parameters are MLPerf Tiny's (30 ms Hann window, 20 ms stride, 512-point FFT,
40 mel bins over 20-4000 Hz, natural log, first 10 DCT-II coefficients), and so is
the arithmetic: this is the `tf.signal` graph of MLPerf Tiny's reference pipeline
(`benchmark/training/keyword_spotting/get_dataset.py`), step for step, in numpy:

1. cast the int16 clip to float32 and divide by its largest sample (`tf.reduce_max`,
   the positive peak, not the largest magnitude); the features are therefore
   independent of the recording level;
2. zero-pad at the end to 16000 samples;
3. `tf.signal.stft(frame_length=480, frame_step=320, fft_length=None -> 512,
   window_fn=tf.signal.hann_window)`: periodic Hann, no end padding -> 49 frames;
4. magnitude `|X|` (not power), times `linear_to_mel_weight_matrix(40, 257, 16000, 20, 4000)`
   (HTK mel, triangles in mel, bin 0 zeroed);
5. `log(mel + 1e-6)`;
6. `mfccs_from_log_mel_spectrograms`: DCT-II x 1/sqrt(2 x 40), first 10 coefficients.

Why it matters: a device whose front end differs from training's is the top cause
of a keyword spotter that answers "unknown" to everything. The same arithmetic in
C for the firmware lives in `firmware/lib/features/`; its tables are generated here
(`python -m tiers.tier0.features --c-tables PATH`), and the tests hold numpy to
tf.signal and the C to numpy.

Where the reference would divide by zero (a clip with no positive sample) we divide
by the largest magnitude instead, or by 1 for digital silence.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from inventory.files import atomic_write

SAMPLE_RATE = 16_000
CLIP_SAMPLES = 16_000
FRAME_LENGTH = 480        # 30 ms
FRAME_STEP = 320          # 20 ms
FFT_LENGTH = 512          # tf.signal.stft's fft_length=None: the next power of two
NUM_BINS = FFT_LENGTH // 2 + 1
NUM_MEL = 40
MEL_LOW_HZ = 20.0
MEL_HIGH_HZ = 4000.0
NUM_MFCC = 10
LOG_EPS = 1e-6
NUM_FRAMES = 1 + (CLIP_SAMPLES - FRAME_LENGTH) // FRAME_STEP  # 49
SHAPE = (NUM_FRAMES, NUM_MFCC)

C_DIR = Path(__file__).resolve().parents[2] / "firmware" / "lib" / "features"
C_TABLES = C_DIR / "kws_features_tables.h"


# ------------------------------------------------------------------ constant tables

def hann_window(n: int = FRAME_LENGTH) -> np.ndarray:
    """Periodic Hann (tf.signal.hann_window's default): 0.5 - 0.5 cos(2 pi k / n), float32."""
    k = np.arange(n, dtype=np.float64)
    return (0.5 - 0.5 * np.cos(2 * np.pi * k / n)).astype(np.float32)


def _hz_to_mel(hz: np.ndarray | float) -> np.ndarray:
    return 1127.0 * np.log1p(np.asarray(hz, dtype=np.float64) / 700.0)


def mel_weight_matrix(num_mel: int = NUM_MEL, num_bins: int = NUM_BINS, sample_rate: int = SAMPLE_RATE,
                      low_hz: float = MEL_LOW_HZ, high_hz: float = MEL_HIGH_HZ) -> np.ndarray:
    """(num_bins, num_mel) triangles, as tf.signal.linear_to_mel_weight_matrix builds them.

    Bin frequencies are linspace(0, nyquist, num_bins); band edges are equally spaced
    in HTK mel (1127 ln(1 + f/700)); each weight is the triangle's height at the bin's
    mel value; the DC bin gets no weight. Unnormalised: a band's weights do not sum to 1.
    """
    bins_mel = _hz_to_mel(np.linspace(0.0, sample_rate / 2, num_bins)[1:])[:, None]
    edges = np.linspace(_hz_to_mel(low_hz), _hz_to_mel(high_hz), num_mel + 2)
    lower, centre, upper = edges[:-2][None], edges[1:-1][None], edges[2:][None]
    up = (bins_mel - lower) / (centre - lower)
    down = (upper - bins_mel) / (upper - centre)
    w = np.maximum(0.0, np.minimum(up, down))
    return np.pad(w, [(1, 0), (0, 0)])


def dct_matrix(num_mfcc: int = NUM_MFCC, num_mel: int = NUM_MEL) -> np.ndarray:
    """(num_mfcc, num_mel): tf.signal.mfccs_from_log_mel_spectrograms, i.e. the unnormalised
    DCT-II (2 sum x_n cos(pi k (2n+1) / 2N)) times 1/sqrt(2N) = sqrt(2/N) cos(...) for every k."""
    k = np.arange(num_mfcc)[:, None]
    n = np.arange(num_mel)[None, :]
    return np.sqrt(2.0 / num_mel) * np.cos(np.pi * k * (2 * n + 1) / (2 * num_mel))


_WINDOW = hann_window()
_MEL = mel_weight_matrix()
_DCT_T = dct_matrix().T.copy()


# ------------------------------------------------------------------ the front end

def peak(audio: np.ndarray) -> np.ndarray:
    """The divisor per clip: its largest sample as float32 (MLPerf's `tf.reduce_max`).

    Accepts (samples,) or (N, samples); returns () or (N,). Where that is zero, the
    largest magnitude; where that is zero too (digital silence), 1.
    """
    x = np.asarray(audio).astype(np.float32)
    p = np.max(x, axis=-1)
    mag = np.max(np.abs(x), axis=-1)
    p = np.where(p != 0, p, np.where(mag != 0, mag, np.float32(1.0)))
    return p.astype(np.float32)


def _frames(x: np.ndarray) -> np.ndarray:
    """(N, samples) -> (N, frames, 480) views at a 320-sample stride; no end padding."""
    view = np.lib.stride_tricks.sliding_window_view(x, FRAME_LENGTH, axis=-1)
    return view[:, ::FRAME_STEP]


def mfcc_from_scaled(x: np.ndarray) -> np.ndarray:
    """MFCC of already-scaled float32 audio (N, samples >= 480) -> (N, frames, 10) float32.

    Window and scaling are done in float32, as TensorFlow does, so the FFT's input
    is bit-identical to the reference's; from the FFT on we compute in float64, which
    stays within float32 rounding of TensorFlow's float32 arithmetic.
    """
    windowed = _frames(x) * _WINDOW                      # float32, like tf.signal.stft
    mag = np.abs(np.fft.rfft(windowed.astype(np.float64), n=FFT_LENGTH))
    log_mel = np.log(mag @ _MEL + LOG_EPS)
    return (log_mel @ _DCT_T).astype(np.float32)


def mfcc(audio: np.ndarray, peak_value: float | np.ndarray | None = None, chunk: int = 256) -> np.ndarray:
    """49 x 10 MFCC of one clip (samples,) or a batch (N, samples) -> (49, 10) or (N, 49, 10) float32.

    `audio`: int16 (as recorded) or float; at most 16000 samples, zero-padded at the
    end like the reference. `peak_value`: the divisor; None (the reference's way)
    uses each clip's own `peak`. Batches are processed `chunk` clips at a time to
    bound memory.
    """
    a = np.asarray(audio)
    single = a.ndim == 1
    batch = a[None] if single else a
    if batch.ndim != 2 or batch.shape[1] > CLIP_SAMPLES or batch.shape[1] < FRAME_LENGTH:
        raise ValueError(f"mfcc wants (N, samples) or (samples,) with {FRAME_LENGTH}..{CLIP_SAMPLES} samples, "
                         f"got shape {a.shape}")
    divisor = peak(batch) if peak_value is None else np.broadcast_to(
        np.asarray(peak_value, dtype=np.float32), (len(batch),))
    out = np.empty((len(batch), NUM_FRAMES, NUM_MFCC), dtype=np.float32)
    for s in range(0, len(batch), chunk):
        x = batch[s:s + chunk].astype(np.float32) / divisor[s:s + chunk, None]
        x = np.pad(x, [(0, 0), (0, CLIP_SAMPLES - x.shape[1])])
        out[s:s + chunk] = mfcc_from_scaled(x)
    return out[0] if single else out


def mfcc_frame(frame: np.ndarray, peak_value: float) -> np.ndarray:
    """The 10 coefficients of one 480-sample frame divided by `peak_value`
    (`kws_mfcc_frame` in C)."""
    f = np.asarray(frame)
    if f.shape != (FRAME_LENGTH,):
        raise ValueError(f"mfcc_frame wants {FRAME_LENGTH} samples, got shape {f.shape}")
    x = (f.astype(np.float32) / np.float32(peak_value))[None]
    return mfcc_from_scaled(x)[0, 0]


def quantize_int8(features: np.ndarray, scale: float, zero_point: int) -> np.ndarray:
    """float -> int8 the way TFLite's QUANTIZE does: round(x / scale) half away from zero,
    plus the zero point, clamped. float32 division and exact rounding, so that the C
    `kws_quantize_int8` gives the same bytes."""
    r = np.asarray(features, dtype=np.float32) / np.float32(scale)
    whole = np.trunc(r)
    rounded = whole + np.where(np.abs(r - whole) >= 0.5, np.sign(r), 0).astype(np.float32)
    return np.clip(rounded + zero_point, -128, 127).astype(np.int8)


def int8_params(features: np.ndarray) -> tuple[float, int]:
    """(scale, zero_point) covering the features' range with int8, as the TFLite converter
    picks them from a representative dataset (range widened to include 0)."""
    lo = min(float(np.min(features)), 0.0)
    hi = max(float(np.max(features)), 0.0)
    scale = (hi - lo) / 255.0 or 1.0
    zero_point = int(np.clip(round(-128 - lo / scale), -128, 127))
    return scale, zero_point


def mfcc_tf(audio: np.ndarray) -> np.ndarray:
    """The reference: MLPerf Tiny's tf.signal graph on a batch (N, <=16000) -> (N, 49, 10).

    For tests and for checking a new front end; imports TensorFlow (seconds), so the
    training path uses `mfcc` instead.
    """
    import tensorflow as tf  # heavy: only here

    a = np.asarray(audio)
    x = tf.cast(a if a.ndim == 2 else a[None], tf.float32)
    x = x / tf.reduce_max(x, axis=-1, keepdims=True)
    x = tf.pad(x, [[0, 0], [0, CLIP_SAMPLES - x.shape[-1]]])
    stfts = tf.signal.stft(x, frame_length=FRAME_LENGTH, frame_step=FRAME_STEP, fft_length=None,
                           window_fn=tf.signal.hann_window)
    spectrograms = tf.abs(stfts)
    weights = tf.signal.linear_to_mel_weight_matrix(NUM_MEL, stfts.shape[-1], SAMPLE_RATE, MEL_LOW_HZ, MEL_HIGH_HZ)
    mel = tf.tensordot(spectrograms, weights, 1)
    log_mel = tf.math.log(mel + LOG_EPS)
    out = tf.signal.mfccs_from_log_mel_spectrograms(log_mel)[..., :NUM_MFCC].numpy()
    return out if a.ndim == 2 else out[0]


# ------------------------------------------------------------------ C tables for the firmware

def _c_floats(values: np.ndarray, per_line: int = 6) -> str:
    vals = [np.format_float_scientific(np.float32(v), unique=True, trim="0", exp_digits=2) + "f"
            for v in np.ravel(values)]
    rows = [", ".join(vals[i:i + per_line]) for i in range(0, len(vals), per_line)]
    return ",\n    ".join(rows)


def _c_ints(values: np.ndarray, per_line: int = 16) -> str:
    vals = [str(int(v)) for v in np.ravel(values)]
    return ",\n    ".join(", ".join(vals[i:i + per_line]) for i in range(0, len(vals), per_line))


def mel_sparse() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The mel matrix as the device stores it: per band its first bin, bin count, offset
    into one packed weight array, and that array (zeros inside a triangle are kept)."""
    starts, lengths, offsets, weights = [], [], [], []
    for m in range(NUM_MEL):
        nz = np.nonzero(_MEL[:, m])[0]
        first, last = int(nz[0]), int(nz[-1])
        starts.append(first)
        lengths.append(last - first + 1)
        offsets.append(len(weights))
        weights.extend(_MEL[first:last + 1, m])
    return np.array(starts), np.array(lengths), np.array(offsets), np.array(weights)


def _bit_reverse(n_bits: int) -> np.ndarray:
    return np.array([int(f"{i:0{n_bits}b}"[::-1], 2) for i in range(1 << n_bits)])


def c_tables_header() -> str:
    """Source of `kws_features_tables.h`: every constant the C front end needs."""
    half = FFT_LENGTH // 2
    k = np.arange(half)
    starts, lengths, offsets, weights = mel_sparse()
    dct_rows = ",\n    ".join("{ " + _c_floats(row, per_line=5).replace("\n    ", "\n      ") + " }"
                                for row in dct_matrix())
    return f"""/* kws_features_tables.h: constant tables of the keyword-spotting MFCC front end.
 * GENERATED by `python -m tiers.tier0.features --c-tables {C_TABLES.name}`
 * from tiers/tier0/features.py; do not edit (tests check it is current). */
#ifndef KWS_FEATURES_TABLES_H
#define KWS_FEATURES_TABLES_H

#include <stdint.h>

#define KWS_MEL_WEIGHT_COUNT {len(weights)}

/* Periodic Hann window, 480 points. */
static const float kws_hann[{FRAME_LENGTH}] = {{
    {_c_floats(_WINDOW)}
}};

/* cos and sin of 2 pi k / 512, k = 0..255: twiddles of the 256-point complex FFT
 * (every other entry) and of the real-FFT split (every entry). */
static const float kws_cos512[{half}] = {{
    {_c_floats(np.cos(2 * np.pi * k / FFT_LENGTH))}
}};
static const float kws_sin512[{half}] = {{
    {_c_floats(np.sin(2 * np.pi * k / FFT_LENGTH))}
}};

/* 8-bit bit reversal: input order of the in-place radix-2 FFT. */
static const uint8_t kws_bitrev256[{half}] = {{
    {_c_ints(_bit_reverse(8))}
}};

/* Mel filterbank, sparse: band m covers FFT bins start[m] .. start[m]+len[m]-1 with
 * weights kws_mel_weights[offset[m] ...]. */
static const uint16_t kws_mel_start[{NUM_MEL}] = {{
    {_c_ints(starts)}
}};
static const uint8_t kws_mel_len[{NUM_MEL}] = {{
    {_c_ints(lengths)}
}};
static const uint16_t kws_mel_offset[{NUM_MEL}] = {{
    {_c_ints(offsets)}
}};
static const float kws_mel_weights[KWS_MEL_WEIGHT_COUNT] = {{
    {_c_floats(weights)}
}};

/* DCT-II rows scaled as tf.signal.mfccs_from_log_mel_spectrograms: sqrt(2/40) cos(pi k (2n+1) / 80). */
static const float kws_dct[{NUM_MFCC}][{NUM_MEL}] = {{
    {dct_rows}
}};

#endif /* KWS_FEATURES_TABLES_H */
"""


def write_c_tables(path: str | Path = C_TABLES) -> Path:
    """Write the tables header (atomically) and return its path."""
    return atomic_write(path, c_tables_header())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Keyword-spotting MFCC front end: C table generator.")
    ap.add_argument("--c-tables", metavar="PATH", nargs="?", const=str(C_TABLES),
                    help=f"write the C tables header (default {C_TABLES})")
    args = ap.parse_args(argv)
    if args.c_tables:
        print(write_c_tables(args.c_tables))
    else:
        ap.print_help()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

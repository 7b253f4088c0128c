/* kws_features.c: MFCC front end of the keyword spotter (see kws_features.h).
 *
 * The pipeline per frame, and why each step is done this way:
 *   scale   sample / peak in float32, then x Hann: the same float32 operations as
 *           the TensorFlow reference, so the FFT sees bit-identical input;
 *   FFT     a 512-point real FFT as a 256-point complex FFT of the even/odd samples
 *           packed as re/im, plus one split pass: half the work of a complex 512;
 *   |X|     magnitude (not power), as tf.abs(stft);
 *   mel     sparse triangles: only the ~256 non-zero weights are stored and used;
 *   log     ln(mel x gain + 1e-6), gain 1 unless streaming (see kws_features.h), with our
 *           own kws_log: libm's logf differs between newlib and glibc in the last bit,
 *           ours gives the same bits on the board and on the host;
 *   DCT     10 x 40 matrix, rows already scaled like tf.signal's MFCC.
 */
#include "kws_features.h"

#include <math.h>
#include <string.h>

#include "kws_features_tables.h"

#define FFT_HALF (KWS_FFT_LENGTH / 2) /* 256 complex points */

/* Interleaved re/im of the 256-point complex FFT; reused by every call. */
static float s_fft[2 * FFT_HALF];
static float s_mag[KWS_NUM_BINS];
static float s_mel[KWS_NUM_MEL];

float kws_peak(const int16_t *audio, size_t n)
{
    int32_t hi = INT16_MIN, mag = 0;
    size_t i;
    for (i = 0; i < n; i++) {
        int32_t v = audio[i];
        int32_t a = v < 0 ? -v : v;
        if (v > hi) hi = v;
        if (a > mag) mag = a;
    }
    if (n == 0 || mag == 0) return 1.0f;
    return hi != 0 ? (float)hi : (float)mag;
}

/* Load a frame scaled and windowed, in bit-reversed order, packed as z[n] = x[2n] + i x[2n+1]. */
static void load_frame(const int16_t *frame, float peak)
{
    int n;
    for (n = 0; n < FFT_HALF; n++) {
        float re = 0.0f, im = 0.0f;
        if (2 * n + 1 < KWS_FRAME_LENGTH) {
            re = ((float)frame[2 * n] / peak) * kws_hann[2 * n];
            im = ((float)frame[2 * n + 1] / peak) * kws_hann[2 * n + 1];
        }
        s_fft[2 * kws_bitrev256[n]] = re;
        s_fft[2 * kws_bitrev256[n] + 1] = im;
    }
}

/* In-place radix-2 decimation-in-time FFT of s_fft (input already bit-reversed). */
static void fft256(void)
{
    int size, k, s;
    for (size = 2; size <= FFT_HALF; size <<= 1) {
        int half = size >> 1;
        int step = KWS_FFT_LENGTH / size; /* W_size^k = W_512^(k * 512 / size) */
        for (k = 0; k < half; k++) {
            float wr = kws_cos512[k * step];
            float wi = -kws_sin512[k * step];
            for (s = k; s < FFT_HALF; s += size) {
                float *a = &s_fft[2 * s];
                float *b = &s_fft[2 * (s + half)];
                float tr = wr * b[0] - wi * b[1];
                float ti = wr * b[1] + wi * b[0];
                b[0] = a[0] - tr;
                b[1] = a[1] - ti;
                a[0] += tr;
                a[1] += ti;
            }
        }
    }
}

/* |X[k]|, k = 0..256, of the real 512-point input from its packed 256-point FFT Z:
 * X[k] = E[k] + W_512^k O[k], E = (Z[k] + conj Z[256-k]) / 2, O = (Z[k] - conj Z[256-k]) / 2i. */
static void split_magnitude(void)
{
    int k;
    s_mag[0] = fabsf(s_fft[0] + s_fft[1]);
    s_mag[FFT_HALF] = fabsf(s_fft[0] - s_fft[1]);
    for (k = 1; k < FFT_HALF; k++) {
        int m = FFT_HALF - k;
        float zr = s_fft[2 * k], zi = s_fft[2 * k + 1];
        float mr = s_fft[2 * m], mi = s_fft[2 * m + 1];
        float er = 0.5f * (zr + mr), ei = 0.5f * (zi - mi);
        float or_ = 0.5f * (zi + mi), oi = -0.5f * (zr - mr);
        float c = kws_cos512[k], sn = kws_sin512[k]; /* W = c - i sn */
        float xr = er + c * or_ + sn * oi;
        float xi = ei + c * oi - sn * or_;
        s_mag[k] = sqrtf(xr * xr + xi * xi);
    }
}

/* Mel energies of the spectrum in s_mag: sparse triangles, ~256 multiply-adds. */
static void mel(float *out)
{
    int m, j;
    for (m = 0; m < KWS_NUM_MEL; m++) {
        const float *w = &kws_mel_weights[kws_mel_offset[m]];
        const float *x = &s_mag[kws_mel_start[m]];
        float acc = 0.0f;
        for (j = 0; j < kws_mel_len[m]; j++) acc += w[j] * x[j];
        out[m] = acc;
    }
}

void kws_mel_frame(const int16_t *frame, float peak, float *mel_out)
{
    load_frame(frame, peak);
    fft256();
    split_magnitude();
    mel(mel_out);
}

/* ln(x) from +, -, *, / in float32 only (each correctly rounded by IEEE 754, and no fused
 * multiply-add: -ffp-contract=off), so every IEEE single-precision machine gets the same bits.
 * x = m * 2^e with m in [sqrt(1/2), sqrt(2)); ln m = 2 atanh(s), s = (m - 1) / (m + 1), |s| <= 0.172,
 * by its series to s^9 (the next term is below 1e-9); e ln 2 in two parts (Cody and Waite), the
 * high part exact. Within 2 ulp of the true logarithm (tested against float64). */
float kws_log(float x)
{
    static const float ln2_hi = 0.693145751953125f, ln2_lo = 1.42860682e-06f;
    uint32_t u;
    int32_t e;
    float m, s, s2, t, fe;
    if (!(x > 0.0f)) return x == 0.0f ? -HUGE_VALF : (x - x) / (x - x);   /* -inf; NaN below 0 */
    if (x == HUGE_VALF) return x;
    memcpy(&u, &x, 4);
    e = (int32_t)(u >> 23) - 127;
    if (e == -127) {                                   /* subnormal: scale into the normal range */
        x *= 8388608.0f;                               /* 2^23, exact */
        memcpy(&u, &x, 4);
        e = (int32_t)(u >> 23) - 127 - 23;
    }
    u = (u & 0x007FFFFFu) | 0x3F800000u;               /* m in [1, 2) */
    memcpy(&m, &u, 4);
    if (m > 1.41421354f) {
        m *= 0.5f;                                     /* exact */
        e += 1;
    }
    s = (m - 1.0f) / (m + 1.0f);
    s2 = s * s;
    t = s * s2 * (0.666666686f + s2 * (0.400000006f + s2 * (0.285714298f + s2 * 0.222222224f)));
    fe = (float)e;
    return fe * ln2_hi + ((s + s) + (t + fe * ln2_lo));
}

void kws_mfcc_from_mel(const float *mel_in, float gain, float *out)
{
    float log_mel[KWS_NUM_MEL];
    int k, n;
    for (n = 0; n < KWS_NUM_MEL; n++) log_mel[n] = kws_log(mel_in[n] * gain + 1e-6f);
    for (k = 0; k < KWS_NUM_MFCC; k++) {
        float acc = 0.0f;
        for (n = 0; n < KWS_NUM_MEL; n++) acc += kws_dct[k][n] * log_mel[n];
        out[k] = acc;
    }
}

void kws_mfcc_frame(const int16_t *frame, float peak, float *out)
{
    kws_mel_frame(frame, peak, s_mel);
    kws_mfcc_from_mel(s_mel, 1.0f, out);
}

void kws_mfcc(const int16_t *audio, float *out)
{
    float peak = kws_peak(audio, KWS_CLIP_SAMPLES);
    int f;
    for (f = 0; f < KWS_NUM_FRAMES; f++)
        kws_mfcc_frame(audio + f * KWS_FRAME_STEP, peak, out + f * KWS_NUM_MFCC);
}

void kws_quantize_int8(const float *in, int8_t *out, size_t n, float scale, int32_t zero_point)
{
    size_t i;
    for (i = 0; i < n; i++) {
        float r = roundf(in[i] / scale); /* half away from zero, like std::round */
        int32_t q;
        if (r > 512.0f) r = 512.0f;      /* keep the int conversion defined */
        if (r < -512.0f) r = -512.0f;
        q = (int32_t)r + zero_point;
        out[i] = (int8_t)(q > 127 ? 127 : (q < -128 ? -128 : q));
    }
}

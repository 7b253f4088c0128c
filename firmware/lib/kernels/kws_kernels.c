/*
 * kws_kernels.c: int8 kernels bit-exact with TFLite Micro's reference integer kernels.
 *
 * Read kws_kernels.h first. Each kernel below names the TFLM function whose
 * arithmetic it reproduces. The portable path follows the reference loops
 * closely; the DSP path (Armv7E-M: Cortex-M4/M7/M33, __ARM_FEATURE_DSP) packs
 * pairs of 16-bit values into one register and multiplies-and-accumulates two
 * of them per SMLAD instruction. Integer addition is associative (and wraps the
 * same way in both paths), so the order of the sums does not change a bit of
 * the result; the requantisation after the sum is shared code.
 *
 * Define KWS_KERNELS_PORTABLE to force the portable path on a DSP core.
 */
#include "kws_kernels.h"

#include <limits.h>
#include <string.h>

#if defined(__ARM_FEATURE_DSP) && (__ARM_FEATURE_DSP == 1) && !defined(KWS_KERNELS_PORTABLE)
#define KWS_USE_DSP 1
#else
#define KWS_USE_DSP 0
#endif

int kws_kernels_dsp(void) { return KWS_USE_DSP; }

/* ------------------------------------------------------------------ fixed point (gemmlowp) */

/* gemmlowp::SaturatingRoundingDoublingHighMul: (a*b + nudge) / 2^31, truncating, with the one
 * overflow case (INT32_MIN * INT32_MIN) saturated. Written with the reference's division so it
 * reads as the reference does; the compiler turns the division into shifts. */
static inline int32_t srdhm(int32_t a, int32_t b) {
  if (a == b && a == INT32_MIN) return INT32_MAX;
  {
    const int64_t ab = (int64_t)a * (int64_t)b;
    const int64_t nudge = ab >= 0 ? ((int64_t)1 << 30) : (1 - ((int64_t)1 << 30));
    return (int32_t)((ab + nudge) / ((int64_t)1 << 31));
  }
}

/* The same for a non-negative multiplier b (every requantisation multiplier is >= 0, so the
 * INT32_MIN*INT32_MIN case cannot arise). (ab + nudge)/2^31 truncated equals
 * floor((ab + 2^30) / 2^31) for both signs of ab: for ab < 0, trunc((ab + 1 - 2^30) / 2^31)
 * = ceil(...) = floor((ab + 1 - 2^30 + 2^31 - 1) / 2^31). One multiply, an add, a shift. */
static inline int32_t srdhm_pos(int32_t a, int32_t b) {
  const int64_t ab = (int64_t)a * (int64_t)b;
  return (int32_t)((ab + ((int64_t)1 << 30)) >> 31);
}

/* gemmlowp::RoundingDivideByPOT: x / 2^e rounded to nearest, ties away from zero. */
static inline int32_t rdbpot(int32_t x, int32_t e) {
  const int32_t mask = (int32_t)(((int64_t)1 << e) - 1);
  const int32_t remainder = x & mask;
  const int32_t threshold = (mask >> 1) + (x < 0 ? 1 : 0);
  return (x >> e) + (remainder > threshold ? 1 : 0);
}

/* tflite::MultiplyByQuantizedMultiplier (double rounding): a left shift before the doubling
 * high multiply, a rounding right shift after. The left shift wraps, as the reference's
 * x * (1 << left_shift) does on every compiler TFLM is built with. Written without branches:
 * this runs once per output value, and on a Cortex-M4 it costs as much as ~20 MACs. */
static inline int32_t mbqm(int32_t x, int32_t m, int32_t shift) {
  const int32_t left = shift > 0 ? shift : 0;
  const int32_t right = left - shift;
  const int32_t v = srdhm_pos((int32_t)((uint32_t)x << left), m);
  const int32_t mask = (int32_t)((1u << right) - 1u);
  const int32_t threshold = (mask >> 1) + (int32_t)((uint32_t)v >> 31);
  return (v >> right) + ((v & mask) > threshold);
}

int32_t kws_saturating_rounding_doubling_high_mul(int32_t a, int32_t b) { return srdhm(a, b); }
int32_t kws_rounding_divide_by_pot(int32_t x, int32_t exponent) { return rdbpot(x, exponent); }
int32_t kws_multiply_by_quantized_multiplier(int32_t x, int32_t multiplier, int32_t shift) {
  /* the general multiplier may be negative: use the exact SRDHM */
  const int32_t left = shift > 0 ? shift : 0;
  const int32_t right = shift > 0 ? 0 : -shift;
  return rdbpot(srdhm((int32_t)((uint32_t)x << left), multiplier), right);
}

static inline int8_t requant(int32_t acc, int32_t m, int32_t shift, int32_t out_offset, int32_t lo, int32_t hi) {
  acc = mbqm(acc, m, shift) + out_offset;
  acc = acc < lo ? lo : acc;
  acc = acc > hi ? hi : acc;
  return (int8_t)acc;
}

/* ------------------------------------------------------------------ DSP helpers */
#if KWS_USE_DSP
static inline uint32_t ld32(const void *p) { uint32_t v; memcpy(&v, p, 4); return v; }
static inline void st32(void *p, uint32_t v) { memcpy(p, &v, 4); }
/* bytes 0 and 2, sign-extended to two halfwords */
static inline uint32_t sxtb16(uint32_t x) { uint32_t r; __asm__("sxtb16 %0, %1" : "=r"(r) : "r"(x)); return r; }
/* bytes 1 and 3 */
static inline uint32_t sxtb16_ror8(uint32_t x) {
  uint32_t r; __asm__("sxtb16 %0, %1, ror #8" : "=r"(r) : "r"(x)); return r;
}
static inline uint32_t sadd16(uint32_t a, uint32_t b) {
  uint32_t r; __asm__("sadd16 %0, %1, %2" : "=r"(r) : "r"(a), "r"(b)); return r;
}
/* acc + a.lo*b.lo + a.hi*b.hi: two MACs in one instruction */
static inline int32_t smlad(uint32_t a, uint32_t b, int32_t acc) {
  int32_t r; __asm__("smlad %0, %1, %2, %3" : "=r"(r) : "r"(a), "r"(b), "r"(acc)); return r;
}
static inline int32_t smlabb(uint32_t a, uint32_t b, int32_t acc) {
  int32_t r; __asm__("smlabb %0, %1, %2, %3" : "=r"(r) : "r"(a), "r"(b), "r"(acc)); return r;
}
static inline int32_t smlatt(uint32_t a, uint32_t b, int32_t acc) {
  int32_t r; __asm__("smlatt %0, %1, %2, %3" : "=r"(r) : "r"(a), "r"(b), "r"(acc)); return r;
}

/* Convolution patches, two output pixels at a time, as int16 (input + offset) in the order the
 * inner loop reads them: for each group of four K positions, pixel A's x0 x2 x1 x3 then pixel B's
 * x0 x2 x1 x3 (SXTB16 unpacks four filter bytes as (w0, w2) and (w1, w3), so SMLAD pairs each x
 * with its w); then the K % 4 tail, A's then B's, in natural order. Taps in the padding are 0,
 * as the reference skips them. */
static inline int32_t patch_pos(int32_t k, int32_t pixel, int32_t K) {
  static const int8_t perm[4] = {0, 2, 1, 3};
  const int32_t K4 = K & ~3;
  return k < K4 ? (k & ~3) * 2 + pixel * 4 + perm[k & 3] : K4 * 2 + pixel * (K - K4) + (k - K4);
}

static void im2col_q15(const kws_conv_params_t *p, const int8_t *input, int32_t pix, int32_t which,
                       int16_t *dst) {
  const int32_t C = p->in_c, K = p->k_h * p->k_w * C, K4 = K & ~3, run = p->k_w * C;
  const int32_t ox = pix % p->out_w, oy = (pix / p->out_w) % p->out_h, b = pix / (p->out_w * p->out_h);
  const int32_t y0 = oy * p->stride_h - p->pad_h, x0 = ox * p->stride_w - p->pad_w;
  const uint32_t off2 = ((uint32_t)p->input_offset & 0xFFFFu) | ((uint32_t)p->input_offset << 16);
  /* a filter row reads one contiguous run of input bytes when it is not dilated and lies inside */
  const int row_contiguous = p->dil_w == 1 && x0 >= 0 && x0 + p->k_w <= p->in_w && (run & 3) == 0;
  int32_t fy, fx, c;
  for (fy = 0; fy < p->k_h; ++fy) {
    const int32_t iy = y0 + p->dil_h * fy;
    const int32_t k0 = fy * run;
    const int row_inside = iy >= 0 && iy < p->in_h;
    if ((row_contiguous || !row_inside) && (k0 & 3) == 0 && k0 + run <= K4 && (run & 3) == 0) {
      /* whole groups of four: a word of input at a time (or zeros for a padding row) */
      const int8_t *src = input + ((b * p->in_h + iy) * p->in_w + x0) * C;
      int16_t *d = dst + k0 * 2 + which * 4;
      for (c = 0; c < run; c += 4, d += 8) {
        if (row_inside) {
          const uint32_t v = ld32(src + c);
          st32(d, sadd16(sxtb16(v), off2));
          st32(d + 2, sadd16(sxtb16_ror8(v), off2));
        } else {
          st32(d, 0);
          st32(d + 2, 0);
        }
      }
      continue;
    }
    for (fx = 0; fx < p->k_w; ++fx) {
      const int32_t ix = x0 + p->dil_w * fx;
      const int inside = row_inside && ix >= 0 && ix < p->in_w;
      const int8_t *src = input + ((b * p->in_h + iy) * p->in_w + ix) * C;
      for (c = 0; c < C; ++c)
        dst[patch_pos(k0 + fx * C + c, which, K)] = inside ? (int16_t)(src[c] + p->input_offset) : 0;
    }
  }
}

/* All output channels of two pixels from their interleaved patches; ob == 0: one pixel only. */
static void pixels_out(const kws_conv_params_t *p, const int8_t *filter, const int32_t *bias, const int32_t *mult,
                       const int32_t *shift, const int16_t *x, int8_t *oa, int8_t *ob) {
  const int32_t K = p->k_h * p->k_w * p->in_c, K4 = K & ~3, n4 = K4 >> 2;
  int32_t oc = 0;
  for (; oc < p->out_c; oc += 2) {
    const int32_t two = oc + 1 < p->out_c;
    const int8_t *w0 = filter + oc * K;
    const int8_t *w1 = two ? w0 + K : w0;
    const int16_t *xp = x;
    int32_t a0 = bias ? bias[oc] : 0, a1 = bias && two ? bias[oc + 1] : 0;
    int32_t b0 = a0, b1 = a1, n, k;
    for (n = n4; n > 0; --n) {
      uint32_t wa = ld32(w0), wb = ld32(w1), xa, xb;
      uint32_t wae = sxtb16(wa), wbe = sxtb16(wb);
      w0 += 4; w1 += 4;
      wa = sxtb16_ror8(wa); wb = sxtb16_ror8(wb);
      xa = ld32(xp); xb = ld32(xp + 4);
      a0 = smlad(wae, xa, a0); a1 = smlad(wbe, xa, a1);
      b0 = smlad(wae, xb, b0); b1 = smlad(wbe, xb, b1);
      xa = ld32(xp + 2); xb = ld32(xp + 6);
      a0 = smlad(wa, xa, a0); a1 = smlad(wb, xa, a1);
      b0 = smlad(wa, xb, b0); b1 = smlad(wb, xb, b1);
      xp += 8;
    }
    for (k = 0; k < K - K4; ++k) {
      const int32_t xv = xp[k], yv = xp[K - K4 + k];
      a0 += w0[k] * xv; a1 += w1[k] * xv;
      b0 += w0[k] * yv; b1 += w1[k] * yv;
    }
    {
      const int32_t off = p->output_offset, lo = p->act_min, hi = p->act_max;
      oa[oc] = requant(a0, mult[oc], shift[oc], off, lo, hi);
      if (ob) ob[oc] = requant(b0, mult[oc], shift[oc], off, lo, hi);
      if (two) {
        oa[oc + 1] = requant(a1, mult[oc + 1], shift[oc + 1], off, lo, hi);
        if (ob) ob[oc + 1] = requant(b1, mult[oc + 1], shift[oc + 1], off, lo, hi);
      }
    }
  }
}
#endif /* KWS_USE_DSP */

/* ------------------------------------------------------------------ CONV_2D */

int32_t kws_conv2d_scratch_bytes(const kws_conv_params_t *p) {
  /* two pixels' int16 patches, for the DSP path's 2x2 (pixels x channels) inner loop */
  return 2 * 2 * p->k_h * p->k_w * p->in_c;
}

/* reference_integer_ops::ConvPerChannel */
static void conv2d_portable(const kws_conv_params_t *p, const int8_t *input, const int8_t *filter,
                            const int32_t *bias, const int32_t *mult, const int32_t *shift, int8_t *output) {
  const int32_t groups = p->in_c / p->filter_in_c;
  const int32_t per_group = p->out_c / groups;
  int32_t b, oy, ox, oc, fy, fx, ic;
  for (b = 0; b < p->batches; ++b) {
    for (oy = 0; oy < p->out_h; ++oy) {
      const int32_t y0 = oy * p->stride_h - p->pad_h;
      for (ox = 0; ox < p->out_w; ++ox) {
        const int32_t x0 = ox * p->stride_w - p->pad_w;
        int8_t *out = output + ((b * p->out_h + oy) * p->out_w + ox) * p->out_c;
        for (oc = 0; oc < p->out_c; ++oc) {
          const int32_t g = oc / per_group;
          int32_t acc = 0;
          for (fy = 0; fy < p->k_h; ++fy) {
            const int32_t iy = y0 + p->dil_h * fy;
            if (iy < 0 || iy >= p->in_h) continue;
            for (fx = 0; fx < p->k_w; ++fx) {
              const int32_t ix = x0 + p->dil_w * fx;
              const int8_t *in, *w;
              if (ix < 0 || ix >= p->in_w) continue;
              in = input + ((b * p->in_h + iy) * p->in_w + ix) * p->in_c + g * p->filter_in_c;
              w = filter + ((oc * p->k_h + fy) * p->k_w + fx) * p->filter_in_c;
              for (ic = 0; ic < p->filter_in_c; ++ic) acc += w[ic] * (in[ic] + p->input_offset);
            }
          }
          if (bias) acc += bias[oc];
          out[oc] = requant(acc, mult[oc], shift[oc], p->output_offset, p->act_min, p->act_max);
        }
      }
    }
  }
}

void kws_conv2d_s8(const kws_conv_params_t *p, const int8_t *input, const int8_t *filter, const int32_t *bias,
                   const int32_t *mult, const int32_t *shift, int8_t *output, int16_t *scratch) {
#if KWS_USE_DSP
  if (scratch && p->filter_in_c == p->in_c) {
    /* Pixels two at a time: gather both patches (every read of theirs happens here, before any
     * write of theirs), then all output channels of both. */
    const int32_t n_pix = p->batches * p->out_h * p->out_w;
    int32_t i;
    for (i = 0; i < n_pix; i += 2) {
      const int32_t two = i + 1 < n_pix;
      im2col_q15(p, input, i, 0, scratch);
      im2col_q15(p, input, two ? i + 1 : i, 1, scratch);   /* a lone last pixel: computed twice */
      pixels_out(p, filter, bias, mult, shift, scratch, output + i * p->out_c, two ? output + (i + 1) * p->out_c : 0);
    }
    return;
  }
#else
  (void)scratch;
#endif
  conv2d_portable(p, input, filter, bias, mult, shift, output);
}

/* ------------------------------------------------------------------ DEPTHWISE_CONV_2D */

/* reference_integer_ops::DepthwiseConvPerChannel */
static void depthwise_portable(const kws_conv_params_t *p, const int8_t *input, const int8_t *filter,
                               const int32_t *bias, const int32_t *mult, const int32_t *shift, int8_t *output) {
  int32_t b, oy, ox, ic, m, fy, fx;
  for (b = 0; b < p->batches; ++b) {
    for (oy = 0; oy < p->out_h; ++oy) {
      const int32_t y0 = oy * p->stride_h - p->pad_h;
      for (ox = 0; ox < p->out_w; ++ox) {
        const int32_t x0 = ox * p->stride_w - p->pad_w;
        int8_t *out = output + ((b * p->out_h + oy) * p->out_w + ox) * p->out_c;
        for (ic = 0; ic < p->in_c; ++ic) {
          for (m = 0; m < p->depth_mult; ++m) {
            const int32_t oc = m + ic * p->depth_mult;
            int32_t acc = 0;
            for (fy = 0; fy < p->k_h; ++fy) {
              const int32_t iy = y0 + p->dil_h * fy;
              if (iy < 0 || iy >= p->in_h) continue;
              for (fx = 0; fx < p->k_w; ++fx) {
                const int32_t ix = x0 + p->dil_w * fx;
                if (ix < 0 || ix >= p->in_w) continue;
                acc += filter[(fy * p->k_w + fx) * p->out_c + oc] *
                       (input[((b * p->in_h + iy) * p->in_w + ix) * p->in_c + ic] + p->input_offset);
              }
            }
            if (bias) acc += bias[oc];
            out[oc] = requant(acc, mult[oc], shift[oc], p->output_offset, p->act_min, p->act_max);
          }
        }
      }
    }
  }
}

void kws_depthwise_conv2d_s8(const kws_conv_params_t *p, const int8_t *input, const int8_t *filter,
                             const int32_t *bias, const int32_t *mult, const int32_t *shift, int8_t *output) {
#if KWS_USE_DSP
  if (p->depth_mult == 1 && (p->in_c & 3) == 0) {
    /* Four channels per pass: one word of input and one of filter per tap, unpacked to
     * halfword pairs (c, c+2) and (c+1, c+3), one 16x16 MAC per channel (SMLABB/SMLATT).
     * The valid taps of each output pixel (the window clipped to the image) are found once. */
    const int32_t C = p->in_c;
    const uint32_t off2 = ((uint32_t)p->input_offset & 0xFFFFu) | ((uint32_t)p->input_offset << 16);
    const int32_t in_row_step = p->dil_h * p->in_w * C, in_col_step = p->dil_w * C, w_row_step = p->k_w * C;
    /* locals, not p->...: every int8 store may alias *p, which would force a reload per output */
    const int32_t out_off = p->output_offset, lo = p->act_min, hi = p->act_max;
    int32_t b, oy, ox, c, fy;
    for (b = 0; b < p->batches; ++b) {
      for (oy = 0; oy < p->out_h; ++oy) {
        const int32_t y0 = oy * p->stride_h - p->pad_h;
        const int32_t fy_lo = y0 < 0 ? (-y0 + p->dil_h - 1) / p->dil_h : 0;
        const int32_t rows = p->in_h - y0 > 0 ? (p->in_h - y0 + p->dil_h - 1) / p->dil_h : 0;
        const int32_t fy_hi = rows < p->k_h ? rows : p->k_h;
        for (ox = 0; ox < p->out_w; ++ox) {
          const int32_t x0 = ox * p->stride_w - p->pad_w;
          const int32_t fx_lo = x0 < 0 ? (-x0 + p->dil_w - 1) / p->dil_w : 0;
          const int32_t cols = p->in_w - x0 > 0 ? (p->in_w - x0 + p->dil_w - 1) / p->dil_w : 0;
          const int32_t fx_hi = cols < p->k_w ? cols : p->k_w;
          const int32_t ny = fy_hi - fy_lo, nx = fx_hi - fx_lo;
          const int8_t *in0 = input + ((b * p->in_h + y0 + p->dil_h * fy_lo) * p->in_w + x0 + p->dil_w * fx_lo) * C;
          const int8_t *w0 = filter + (fy_lo * p->k_w + fx_lo) * C;
          int8_t *out = output + ((b * p->out_h + oy) * p->out_w + ox) * C;
          for (c = 0; c < C; c += 4) {
            int32_t a0 = bias ? bias[c] : 0, a1 = bias ? bias[c + 1] : 0;
            int32_t a2 = bias ? bias[c + 2] : 0, a3 = bias ? bias[c + 3] : 0;
            const int8_t *in_row = in0 + c, *w_row = w0 + c;
            for (fy = 0; fy < ny; ++fy, in_row += in_row_step, w_row += w_row_step) {
              const int8_t *ip = in_row, *wp = w_row, *const w_end = w_row + nx * C;
              for (; wp != w_end; ip += in_col_step, wp += C) {
                const uint32_t xv = ld32(ip), wv = ld32(wp);
                const uint32_t xe = sadd16(sxtb16(xv), off2), xo = sadd16(sxtb16_ror8(xv), off2);
                const uint32_t we = sxtb16(wv), wo = sxtb16_ror8(wv);
                a0 = smlabb(we, xe, a0);
                a2 = smlatt(we, xe, a2);
                a1 = smlabb(wo, xo, a1);
                a3 = smlatt(wo, xo, a3);
              }
            }
            out[c] = requant(a0, mult[c], shift[c], out_off, lo, hi);
            out[c + 1] = requant(a1, mult[c + 1], shift[c + 1], out_off, lo, hi);
            out[c + 2] = requant(a2, mult[c + 2], shift[c + 2], out_off, lo, hi);
            out[c + 3] = requant(a3, mult[c + 3], shift[c + 3], out_off, lo, hi);
          }
        }
      }
    }
    return;
  }
#endif
  depthwise_portable(p, input, filter, bias, mult, shift, output);
}

/* ------------------------------------------------------------------ FULLY_CONNECTED */

/* reference_integer_ops::FullyConnected (per tensor, with the weights offset) and
 * FullyConnectedPerChannel (per channel, weights symmetric). */
void kws_fully_connected_s8(const kws_fc_params_t *p, const int8_t *input, const int8_t *filter,
                            const int32_t *bias, const int32_t *mult, const int32_t *shift, int8_t *output) {
  int32_t b, oc, d;
  for (b = 0; b < p->batches; ++b) {
    const int8_t *in = input + b * p->accum_depth;
    int8_t *out = output + b * p->out_depth;
    for (oc = 0; oc < p->out_depth; ++oc) {
      const int8_t *w = filter + oc * p->accum_depth;
      const int32_t ch = p->per_channel ? oc : 0;
      int32_t acc = 0;
#if KWS_USE_DSP
      if (p->filter_offset == 0) {
        const uint32_t off2 = ((uint32_t)p->input_offset & 0xFFFFu) | ((uint32_t)p->input_offset << 16);
        const int32_t K4 = p->accum_depth & ~3;
        for (d = 0; d < K4; d += 4) {
          const uint32_t xv = ld32(in + d), wv = ld32(w + d);
          acc = smlad(sxtb16(wv), sadd16(sxtb16(xv), off2), acc);
          acc = smlad(sxtb16_ror8(wv), sadd16(sxtb16_ror8(xv), off2), acc);
        }
        for (; d < p->accum_depth; ++d) acc += w[d] * (in[d] + p->input_offset);
      } else
#endif
      {
        for (d = 0; d < p->accum_depth; ++d) acc += (w[d] + p->filter_offset) * (in[d] + p->input_offset);
      }
      if (bias) acc += bias[oc];
      out[oc] = requant(acc, mult[ch], shift[ch], p->output_offset, p->act_min, p->act_max);
    }
  }
}

/* ------------------------------------------------------------------ AVERAGE_POOL_2D, MAX_POOL_2D */

/* reference_integer_ops::AveragePool: the window clipped to the image, sum, then divide by the
 * count rounding half away from zero. */
int kws_avg_pool_s8(const kws_conv_params_t *p, const int8_t *input, int8_t *output) {
  int32_t b, oy, ox, c, fy, fx;
  for (b = 0; b < p->batches; ++b) {
    for (oy = 0; oy < p->out_h; ++oy) {
      const int32_t y0 = oy * p->stride_h - p->pad_h;
      const int32_t fy_lo = y0 < 0 ? -y0 : 0;
      const int32_t fy_hi = p->k_h < p->in_h - y0 ? p->k_h : p->in_h - y0;
      for (ox = 0; ox < p->out_w; ++ox) {
        const int32_t x0 = ox * p->stride_w - p->pad_w;
        const int32_t fx_lo = x0 < 0 ? -x0 : 0;
        const int32_t fx_hi = p->k_w < p->in_w - x0 ? p->k_w : p->in_w - x0;
        const int32_t count = (fy_hi - fy_lo) * (fx_hi - fx_lo);
        int8_t *out = output + ((b * p->out_h + oy) * p->out_w + ox) * p->out_c;
        if (fy_hi <= fy_lo || fx_hi <= fx_lo) return -1;
        for (c = 0; c < p->in_c; ++c) {
          int32_t acc = 0;
          for (fy = fy_lo; fy < fy_hi; ++fy)
            for (fx = fx_lo; fx < fx_hi; ++fx)
              acc += input[((b * p->in_h + y0 + fy) * p->in_w + x0 + fx) * p->in_c + c];
          acc = acc > 0 ? (acc + count / 2) / count : (acc - count / 2) / count;
          acc = acc < p->act_min ? p->act_min : acc;
          acc = acc > p->act_max ? p->act_max : acc;
          out[c] = (int8_t)acc;
        }
      }
    }
  }
  return 0;
}

/* reference_integer_ops::MaxPool */
void kws_max_pool_s8(const kws_conv_params_t *p, const int8_t *input, int8_t *output) {
  int32_t b, oy, ox, c, fy, fx;
  for (b = 0; b < p->batches; ++b) {
    for (oy = 0; oy < p->out_h; ++oy) {
      const int32_t y0 = oy * p->stride_h - p->pad_h;
      const int32_t fy_lo = y0 < 0 ? -y0 : 0;
      const int32_t fy_hi = p->k_h < p->in_h - y0 ? p->k_h : p->in_h - y0;
      for (ox = 0; ox < p->out_w; ++ox) {
        const int32_t x0 = ox * p->stride_w - p->pad_w;
        const int32_t fx_lo = x0 < 0 ? -x0 : 0;
        const int32_t fx_hi = p->k_w < p->in_w - x0 ? p->k_w : p->in_w - x0;
        int8_t *out = output + ((b * p->out_h + oy) * p->out_w + ox) * p->out_c;
        for (c = 0; c < p->in_c; ++c) {
          int32_t mx = -128;
          for (fy = fy_lo; fy < fy_hi; ++fy)
            for (fx = fx_lo; fx < fx_hi; ++fx) {
              const int32_t v = input[((b * p->in_h + y0 + fy) * p->in_w + x0 + fx) * p->in_c + c];
              mx = v > mx ? v : mx;
            }
          mx = mx < p->act_min ? p->act_min : mx;
          mx = mx > p->act_max ? p->act_max : mx;
          out[c] = (int8_t)mx;
        }
      }
    }
  }
}

/* ------------------------------------------------------------------ ADD */

/* reference_integer_ops::AddFunc: both inputs to a common scale with 20 bits of headroom, sum,
 * then to the output scale. */
static inline int8_t add_one(const kws_add_params_t *p, int8_t x, int8_t y) {
  const int32_t v1 = (p->input1_offset + x) * (1 << p->left_shift);
  const int32_t v2 = (p->input2_offset + y) * (1 << p->left_shift);
  const int32_t s1 = rdbpot(srdhm(v1, p->input1_multiplier), -p->input1_shift);
  const int32_t s2 = rdbpot(srdhm(v2, p->input2_multiplier), -p->input2_shift);
  int32_t out = rdbpot(srdhm(s1 + s2, p->output_multiplier), -p->output_shift) + p->output_offset;
  out = out < p->act_min ? p->act_min : out;
  out = out > p->act_max ? p->act_max : out;
  return (int8_t)out;
}

void kws_add_s8(const kws_add_params_t *p, const int8_t *in1, const int8_t *in2, int8_t *output) {
  int32_t i;
  if (!p->broadcast) {
    for (i = 0; i < p->size; ++i) output[i] = add_one(p, in1[i], in2[i]);
    return;
  }
  {
    /* BroadcastAdd6DSlow: output in order, each input stepping by its own strides */
    int32_t idx[KWS_ADD_MAX_DIMS] = {0, 0, 0, 0, 0, 0};
    int32_t o1 = 0, o2 = 0, d;
    for (i = 0; i < p->size; ++i) {
      output[i] = add_one(p, in1[o1], in2[o2]);
      for (d = KWS_ADD_MAX_DIMS - 1; d >= 0; --d) {   /* odometer increment */
        o1 += p->stride1[d];
        o2 += p->stride2[d];
        if (++idx[d] < p->dims[d]) break;
        o1 -= p->stride1[d] * p->dims[d];
        o2 -= p->stride2[d] * p->dims[d];
        idx[d] = 0;
      }
    }
  }
}

/* ------------------------------------------------------------------ SOFTMAX */

/* gemmlowp::exp_on_interval_between_negative_one_quarter_and_0_excl, Q0.31 in and out. */
static int32_t exp_quarter(int32_t a) {
  const int32_t constant_term = 1895147668;     /* exp(-1/8) */
  const int32_t constant_1_over_3 = 715827883;
  const int32_t x = a + (1 << 28);              /* a + 1/8 */
  const int32_t x2 = srdhm(x, x);
  const int32_t x3 = srdhm(x2, x);
  const int32_t x4 = srdhm(x2, x2);
  const int32_t x4_over_4 = rdbpot(x4, 2);
  const int32_t poly = rdbpot(srdhm(x4_over_4 + x3, constant_1_over_3) + x2, 1);
  return constant_term + srdhm(constant_term, x + poly);
}

/* gemmlowp::exp_on_negative_values for a Q5.26 input: exp(a) for a <= 0, as Q0.31. */
static int32_t exp_on_negative_values_q5(int32_t a) {
  enum { kIntegerBits = 5, kFractionalBits = 26 };
  const int32_t one_quarter = 1 << (kFractionalBits - 2);
  const int32_t mask = one_quarter - 1;
  const int32_t a_mod_quarter_minus_one_quarter = (a & mask) - one_quarter;
  /* Rescale<0> from 5 integer bits: a saturating multiply by 2^5 */
  const int32_t t = a_mod_quarter_minus_one_quarter;
  const int32_t threshold = (1 << (31 - kIntegerBits)) - 1;
  const int32_t rescaled = t > threshold ? INT32_MAX : t < -threshold ? INT32_MIN : t * (1 << kIntegerBits);
  int32_t result = exp_quarter(rescaled);
  const int32_t remainder = a_mod_quarter_minus_one_quarter - a;
  /* the barrel shifter: multiply by exp(-2^k) for each bit k set in the remainder */
  if (remainder & (1 << (kFractionalBits - 2))) result = srdhm(result, 1672461947); /* exp(-1/4) */
  if (remainder & (1 << (kFractionalBits - 1))) result = srdhm(result, 1302514674); /* exp(-1/2) */
  if (remainder & (1 << (kFractionalBits + 0))) result = srdhm(result, 790015084);  /* exp(-1) */
  if (remainder & (1 << (kFractionalBits + 1))) result = srdhm(result, 290630308);  /* exp(-2) */
  if (remainder & (1 << (kFractionalBits + 2))) result = srdhm(result, 39332535);   /* exp(-4) */
  if (remainder & (1 << (kFractionalBits + 3))) result = srdhm(result, 720401);     /* exp(-8) */
  if (remainder & (1 << (kFractionalBits + 4))) result = srdhm(result, 242);        /* exp(-16) */
  /* kIntegerBits == 5 is not > 5: no clamp for a < -32 in this format */
  return a == 0 ? INT32_MAX : result;
}

/* gemmlowp::one_over_one_plus_x_for_x_in_0_1, Q0.31 in and out (Newton-Raphson in Q2.29). */
static int32_t one_over_one_plus_x(int32_t a) {
  const int64_t sum = (int64_t)a + INT32_MAX;                /* RoundingHalfSum(a, One) */
  const int32_t half_denominator = (int32_t)((sum + (sum >= 0 ? 1 : -1)) / 2);
  const int32_t c48_17 = 1515870810, cneg32_17 = -1010580540; /* 48/17, -32/17 in Q2.29 */
  const int32_t one_q2 = 1 << 29;
  int32_t x = c48_17 + srdhm(half_denominator, cneg32_17);
  int i;
  for (i = 0; i < 3; ++i) {
    const int32_t hdx = srdhm(half_denominator, x);
    const int32_t one_minus = one_q2 - hdx;
    const int32_t prod = srdhm(x, one_minus);                 /* Q4.27 */
    /* Rescale<2> from 4 integer bits: saturating multiply by 4 */
    const int32_t thr = (1 << 29) - 1;
    x = x + (prod > thr ? INT32_MAX : prod < -thr ? INT32_MIN : prod * 4);
  }
  /* ExactMulByPot<-1> then Rescale<0> from 1 integer bit: saturating multiply by 2 */
  {
    const int32_t thr = (1 << 30) - 1;
    return x > thr ? INT32_MAX : x < -thr ? INT32_MIN : x * 2;
  }
}

/* reference_ops::Softmax<int8_t, int8_t> with TFLM's prepared parameters. */
void kws_softmax_s8(const kws_softmax_params_t *p, const int8_t *input, int8_t *output) {
  int32_t i, c;
  for (i = 0; i < p->outer; ++i) {
    const int8_t *in = input + i * p->depth;
    int8_t *out = output + i * p->depth;
    int32_t max_in_row = -128, sum_of_exps = 0, num_bits_over_unit, shifted_scale, exponent, headroom;
    uint32_t s;
    for (c = 0; c < p->depth; ++c) max_in_row = in[c] > max_in_row ? in[c] : max_in_row;
    for (c = 0; c < p->depth; ++c) {
      const int32_t diff = in[c] - max_in_row;
      if (diff >= p->diff_min) {
        const int32_t rescaled = srdhm(diff * (1 << p->input_left_shift), p->input_multiplier);
        sum_of_exps += rdbpot(exp_on_negative_values_q5(rescaled), 12);  /* Rescale<12> */
      }
    }
    /* GetReciprocal(sum_of_exps, 12 integer bits) */
    s = (uint32_t)sum_of_exps;
    headroom = 0;
    if (s == 0) headroom = 32;
    else while (!(s & 0x80000000u)) { s <<= 1; ++headroom; }
    num_bits_over_unit = 12 - headroom;
    shifted_scale = one_over_one_plus_x(
        (int32_t)(((uint32_t)sum_of_exps << headroom) - ((uint32_t)1 << 31)));
    exponent = num_bits_over_unit + 31 - 8;
    for (c = 0; c < p->depth; ++c) {
      const int32_t diff = in[c] - max_in_row;
      if (diff >= p->diff_min) {
        const int32_t rescaled = srdhm(diff * (1 << p->input_left_shift), p->input_multiplier);
        const int32_t e = exp_on_negative_values_q5(rescaled);
        int32_t v = rdbpot(srdhm(shifted_scale, e), exponent) - 128;
        v = v > 127 ? 127 : v;
        v = v < -128 ? -128 : v;
        out[c] = (int8_t)v;
      } else {
        out[c] = -128;
      }
    }
  }
}

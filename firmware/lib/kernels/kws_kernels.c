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
 * Where the instructions go on a Cortex-M4 (QEMU -icount, the MLPerf DS-CNN: 1.88
 * instructions per MAC overall):
 *   CONV_2D      two pixels x two output channels per inner turn: the two pixels'
 *                patches as int16 (im2col, offset added), the filter packed at export
 *                time so one LDRD fetches four K positions of both channels; 17
 *                instructions per 16 MACs (inline assembly, unrolled twice);
 *   DEPTHWISE    four channels per pass over a padded, channel-group-major copy of the
 *                rows an output row reads (so every window is whole and a row of three
 *                taps is three loads at fixed offsets), int16 filter pairs, the input
 *                offset folded into the bias at export time: 8 instructions per 4 MACs;
 *   requantise   SMMULR, then one add and an arithmetic shift where the exporter has
 *                proved that exact (requant_fast), four results packed into one word
 *                and clamped with SSUB8/SEL: about 9 instructions per output.
 *
 * Define KWS_KERNELS_PORTABLE to force the portable path on a DSP core.
 */
#include "kws_kernels.h"

#include <limits.h>
#include <string.h>

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

/* tflite::MultiplyByQuantizedMultiplier (double rounding) for m >= 0, with the shift already split
 * into its left and right parts: a left shift before the doubling high multiply, a rounding right
 * shift after. The left shift wraps, as the reference's x * (1 << left_shift) does on every
 * compiler TFLM is built with. Branch-free. */
static inline int32_t mbqm_lr(int32_t x, int32_t m, int32_t left, int32_t right) {
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

static inline int32_t clamp(int32_t v, int32_t lo, int32_t hi) {
  v = v < lo ? lo : v;
  return v > hi ? hi : v;
}

/* ------------------------------------------------------------------ requantisation tables
 *
 * Convolutions take one row of four int32 per output channel (kws_kernels.h, "Requantisation"):
 * q[0] = multiplier M >= 0, q[1] = left shift + 1, q[2] = right shift, q[3] = rounding term.
 *
 * Exact, any row:      MultiplyByQuantizedMultiplier(acc, M, left - right) + output_offset
 * Fast (requant_fast): v = SMMULR(acc << (left + 1), M)             = SRDHM(acc << left, M)
 *                      (v + (v >> 31) + q[3]) >> right              = RoundingDivideByPOT(v, right)
 *                                                                     + output_offset
 * SMMULR is (a*b + 2^31) >> 32: with a doubled, that is floor((x*M + 2^30) / 2^31), which is
 * SRDHM for M >= 0 (see srdhm_pos). With q[3] = 2^(right-1) + output_offset * 2^right, the sum
 * floor((v + 2^(right-1) - [v < 0]) / 2^right) rounds half away from zero as RoundingDivideByPOT
 * does, and adding output_offset * 2^right under the floor adds output_offset after it. The
 * exporter sets requant_fast only where every step is exact for every accumulator the layer can
 * produce: right >= 1, and no shift or sum can leave int32 (it bounds |acc| from the weights and
 * bias; tiers/tier0/compiler/prepare.py, `requant_table`). Five instructions on a Cortex-M4 instead of ~20. */
static inline int32_t smmulr_c(int32_t a, int32_t b) {
  return (int32_t)(((int64_t)a * (int64_t)b + ((int64_t)1 << 31)) >> 32);
}

static inline int32_t rq_exact(int32_t acc, const int32_t *q, int32_t out_offset) {
  return mbqm_lr(acc, q[0], q[1] - 1, q[2]) + out_offset;
}

#if defined(__ARM_FEATURE_DSP) && (__ARM_FEATURE_DSP == 1) && !defined(KWS_KERNELS_PORTABLE)
#define KWS_USE_DSP 1
#else
#define KWS_USE_DSP 0
#endif

int kws_kernels_dsp(void) { return KWS_USE_DSP; }

#if KWS_USE_DSP
static inline int32_t smmulr(int32_t a, int32_t b) {
  int32_t r; __asm__("smmulr %0, %1, %2" : "=r"(r) : "r"(a), "r"(b)); return r;
}
#else
#define smmulr smmulr_c
#endif

static inline int32_t rq_fast(int32_t acc, const int32_t *q) {
  const int32_t v = smmulr((int32_t)((uint32_t)acc << q[1]), q[0]);
  return (v + (v >> 31) + q[3]) >> q[2];
}

static inline int8_t requant(int32_t acc, const int32_t *q, int fast, int32_t out_offset, int32_t lo, int32_t hi) {
  return (int8_t)clamp(fast ? rq_fast(acc, q) : rq_exact(acc, q, out_offset), lo, hi);
}

/* ------------------------------------------------------------------ packed filter layouts */

/* CONV_2D: where w[oc][k] (k over k_h, k_w, filter_in_c) lives in the packed filter. */
static inline int32_t conv_w_index(int32_t oc, int32_t k, int32_t K, int32_t out_c) {
  const int32_t K4 = K & ~3, base = (oc >> 1) * KWS_CONV_PAIR_STRIDE(K), j = oc & 1;
  if ((oc | 1) >= out_c) return base + k;       /* a last odd channel: natural order */
  return base + (k < K4 ? 8 * (k >> 2) + 4 * j + (k & 3) : 2 * K4 + j * (K - K4) + (k - K4));
}

/* DEPTHWISE_CONV_2D: int16; for each full group of four channels, every tap's four weights stored
 * c0 c2 c1 c3; then the channels past the last full group, [tap][channel]. */
static inline int32_t dw_w_index(int32_t tap, int32_t oc, int32_t out_c, int32_t taps) {
  static const int8_t perm[4] = {0, 2, 1, 3};
  const int32_t C4 = out_c & ~3;
  return oc < C4 ? ((oc >> 2) * taps + tap) * 4 + perm[oc & 3] : C4 * taps + tap * (out_c - C4) + (oc - C4);
}

/* ------------------------------------------------------------------ DSP helpers */
#if KWS_USE_DSP
static inline uint32_t ld32(const void *p) { uint32_t v; memcpy(&v, p, 4); return v; }
static inline void st32(void *p, uint32_t v) { memcpy(p, &v, 4); }
static inline void st16(void *p, uint32_t v) { const uint16_t h = (uint16_t)v; memcpy(p, &h, 2); }
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
static inline int32_t ssat8(int32_t x) { int32_t r; __asm__("ssat %0, #8, %1" : "=r"(r) : "r"(x)); return r; }
/* four int32 already in [-128, 127] to one word of int8 (little-endian: r0 is the lowest byte) */
static inline uint32_t pack4(int32_t r0, int32_t r1, int32_t r2, int32_t r3) {
  uint32_t w = (uint32_t)r0;
  __asm__("bfi %0, %1, #8, #8\n\tbfi %0, %2, #16, #8\n\tbfi %0, %3, #24, #8"
          : "+&r"(w) : "r"(r1), "r"(r2), "r"(r3));
  return w;
}
/* per byte: max(w, lo), then min(., hi); SSUB8 sets a GE flag per byte that SEL reads */
static inline uint32_t clamp4(uint32_t w, uint32_t lo4, uint32_t hi4) {
  uint32_t t;
  __asm__("ssub8 %[t], %[w], %[lo]\n\t"
          "sel   %[w], %[w], %[lo]\n\t"
          "ssub8 %[t], %[hi], %[w]\n\t"
          "sel   %[w], %[w], %[hi]"
          : [w] "+&r"(w), [t] "=&r"(t) : [lo] "r"(lo4), [hi] "r"(hi4) : "cc");
  return w;
}
static inline uint32_t bytes4(int32_t v) { return (uint32_t)(v & 0xFF) * 0x01010101u; }

/* rq_fast (see "requantisation tables") of one accumulator with the row loaded in m l r c, then
 * saturated to int8: 6 instructions */
#define KWS_RQ_FAST_ASM(a)                          \
  "lsl    " a ", " a ", %[l]\n\t"                  \
  "smmulr " a ", " a ", %[m]\n\t"                  \
  "add    " a ", " a ", " a ", asr #31\n\t"        \
  "add    " a ", " a ", %[c]\n\t"                  \
  "asr    " a ", " a ", %[r]\n\t"                  \
  "ssat   " a ", #8, " a "\n\t"
#define KWS_RQ_LOAD_ASM(off)                                   \
  "ldrd   %[m], %[l], [%[q], #" off "]\n\t"                   \
  "ldrd   %[r], %[c], [%[q], #" off "+8]\n\t"
/* four saturated results to one word (a0 the lowest byte), clamped bytewise to [lo, hi] */
#define KWS_PACK_CLAMP_ASM                          \
  "bfi    %[a0], %[a1], #8, #8\n\t"                \
  "bfi    %[a0], %[a2], #16, #8\n\t"               \
  "bfi    %[a0], %[a3], #24, #8\n\t"               \
  "ssub8  %[m], %[a0], %[lo]\n\t"                  \
  "sel    %[a0], %[a0], %[lo]\n\t"                 \
  "ssub8  %[m], %[hi], %[a0]\n\t"                  \
  "sel    %[a0], %[a0], %[hi]\n\t"
#define KWS_RQ_OPERANDS                                                                             \
  : [a0] "+&r"(a0), [a1] "+&r"(a1), [a2] "+&r"(a2), [a3] "+&r"(a3), [m] "=&r"(m), [l] "=&r"(l),      \
    [r] "=&r"(r), [c] "=&r"(c)                                                                      \
  : [q] "r"(q), [lo] "r"(lo4), [hi] "r"(hi4)                                                        \
  : "cc"

/* four channels' accumulators with table rows q[0..15]: the int8 results as one word */
static inline uint32_t rq4_fast(int32_t a0, int32_t a1, int32_t a2, int32_t a3, const int32_t *q,
                                uint32_t lo4, uint32_t hi4) {
  int32_t m, l, r, c;
  __asm__(KWS_RQ_LOAD_ASM("0") KWS_RQ_FAST_ASM("%[a0]") KWS_RQ_LOAD_ASM("16") KWS_RQ_FAST_ASM("%[a1]")
          KWS_RQ_LOAD_ASM("32") KWS_RQ_FAST_ASM("%[a2]") KWS_RQ_LOAD_ASM("48") KWS_RQ_FAST_ASM("%[a3]")
          KWS_PACK_CLAMP_ASM KWS_RQ_OPERANDS);
  return (uint32_t)a0;
}

/* two channels (rows q[0..7]) of two pixels: a0 a1 are pixel A's, a2 a3 pixel B's; the word holds
 * A's two bytes then B's */
static inline uint32_t rq2x2_fast(int32_t a0, int32_t a1, int32_t a2, int32_t a3, const int32_t *q,
                                  uint32_t lo4, uint32_t hi4) {
  int32_t m, l, r, c;
  __asm__(KWS_RQ_LOAD_ASM("0") KWS_RQ_FAST_ASM("%[a0]") KWS_RQ_FAST_ASM("%[a2]")
          KWS_RQ_LOAD_ASM("16") KWS_RQ_FAST_ASM("%[a1]") KWS_RQ_FAST_ASM("%[a3]")
          KWS_PACK_CLAMP_ASM KWS_RQ_OPERANDS);
  return (uint32_t)a0;
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
  const int32_t C = p->in_c, K = p->k_h * p->k_w * C, run = p->k_w * C;
  const int32_t ox = pix % p->out_w, oy = (pix / p->out_w) % p->out_h, b = pix / (p->out_w * p->out_h);
  const int32_t y0 = oy * p->stride_h - p->pad_h, x0 = ox * p->stride_w - p->pad_w;
  const uint32_t off2 = ((uint32_t)p->input_offset & 0xFFFFu) | ((uint32_t)p->input_offset << 16);
  /* a filter row reads one contiguous run of input bytes when it is not dilated and lies inside */
  const int row_contiguous = p->dil_w == 1 && x0 >= 0 && x0 + p->k_w <= p->in_w && (run & 3) == 0;
  int32_t fy, fx, c;
  if (p->k_h == 1 && p->k_w == 1 && (C & 3) == 0 && y0 >= 0 && y0 < p->in_h && x0 >= 0 && x0 < p->in_w) {
    /* 1x1 (pointwise): the patch is one pixel's channels, a word at a time */
    const int8_t *src = input + ((b * p->in_h + y0) * p->in_w + x0) * C, *const end = src + C;
    int16_t *d = dst + which * 4;
    for (; src != end; src += 4, d += 8) {
      const uint32_t v = ld32(src);
      st32(d, sadd16(sxtb16(v), off2));
      st32(d + 2, sadd16(sxtb16_ror8(v), off2));
    }
    return;
  }
  if ((run & 3) == 0) {
    /* every filter row is whole groups of four: walk the patch with one pointer */
    static const int8_t perm[4] = {0, 2, 1, 3};
    const int32_t in_w = p->in_w, in_h = p->in_h, dil_w = p->dil_w, kw = p->k_w, off = p->input_offset;
    int16_t *d = dst + which * 4;
    for (fy = 0; fy < p->k_h; ++fy) {
      const int32_t iy = y0 + p->dil_h * fy;
      const int8_t *src = input + ((b * in_h + iy) * in_w + x0) * C;
      if (iy < 0 || iy >= in_h) {
        for (c = 0; c < run; c += 4, d += 8) {     /* a padding row: zeros */
          st32(d, 0);
          st32(d + 2, 0);
        }
      } else if (row_contiguous) {
        for (c = 0; c < run; c += 4, d += 8) {     /* a word of input at a time */
          const uint32_t v = ld32(src + c);
          st32(d, sadd16(sxtb16(v), off2));
          st32(d + 2, sadd16(sxtb16_ror8(v), off2));
        }
      } else {
        int32_t kk = 0;                            /* position in the row: its lane in the group */
        for (fx = 0; fx < kw; ++fx) {
          const int32_t ix = x0 + dil_w * fx;
          const int8_t *px = src + dil_w * fx * C;
          if (ix < 0 || ix >= in_w) {
            for (c = 0; c < C; ++c, ++kk) {
              d[perm[kk & 3]] = 0;
              if ((kk & 3) == 3) d += 8;
            }
          } else {
            for (c = 0; c < C; ++c, ++kk) {
              d[perm[kk & 3]] = (int16_t)(px[c] + off);
              if ((kk & 3) == 3) d += 8;
            }
          }
        }
      }
    }
    return;
  }
  for (fy = 0; fy < p->k_h; ++fy) {
    const int32_t iy = y0 + p->dil_h * fy;
    const int32_t k0 = fy * run;
    const int row_inside = iy >= 0 && iy < p->in_h;
    for (fx = 0; fx < p->k_w; ++fx) {
      const int32_t ix = x0 + p->dil_w * fx;
      const int inside = row_inside && ix >= 0 && ix < p->in_w;
      const int8_t *src = input + ((b * p->in_h + iy) * p->in_w + ix) * C;
      for (c = 0; c < C; ++c)
        dst[patch_pos(k0 + fx * C + c, which, K)] = inside ? (int16_t)(src[c] + p->input_offset) : 0;
    }
  }
}

/* 2 pixels x 2 channels, one group of four K positions: 16 MACs in 8 SMLADs. The patch holds
 * A's (x0,x2) (x1,x3) then B's; the packed filter a word of channel oc then one of oc+1. */
#define KWS_MAC_2X2                                   \
  "ldrd   %[wa], %[wb], [%[wp]], #8\n\t"              \
  "ldrd   %[x0], %[x1], [%[xp]], #8\n\t"              \
  "sxtb16 %[t0], %[wa]\n\t"                           \
  "sxtb16 %[wa], %[wa], ror #8\n\t"                   \
  "smlad  %[a0], %[t0], %[x0], %[a0]\n\t"             \
  "smlad  %[a0], %[wa], %[x1], %[a0]\n\t"             \
  "sxtb16 %[t1], %[wb]\n\t"                           \
  "sxtb16 %[wb], %[wb], ror #8\n\t"                   \
  "smlad  %[a1], %[t1], %[x0], %[a1]\n\t"             \
  "smlad  %[a1], %[wb], %[x1], %[a1]\n\t"             \
  "ldrd   %[x0], %[x1], [%[xp]], #8\n\t"              \
  "smlad  %[b0], %[t0], %[x0], %[b0]\n\t"             \
  "smlad  %[b0], %[wa], %[x1], %[b0]\n\t"             \
  "smlad  %[b1], %[t1], %[x0], %[b1]\n\t"             \
  "smlad  %[b1], %[wb], %[x1], %[b1]\n\t"

#define KWS_MAC_2X2_OPERANDS                                                                  \
  : [a0] "+r"(a0), [a1] "+r"(a1), [b0] "+r"(b0), [b1] "+r"(b1), [xp] "+r"(xp), [wp] "+r"(wp),  \
    [n] "+r"(n), [wa] "=&r"(wa), [wb] "=&r"(wb), [x0] "=&r"(x0), [x1] "=&r"(x1), [t0] "=&r"(t0), \
    [t1] "=&r"(t1)                                                                             \
  :                                                                                            \
  : "cc", "memory"

/* All output channels of two pixels from their interleaved patches (a lone last pixel is passed as
 * both A and B, and written twice with the same bytes). */
static void pixels_out(const kws_conv_params_t *p, const int8_t *filter, const int32_t *bias, const int32_t *rq,
                       const int16_t *x, int8_t *oa, int8_t *ob) {
  const int32_t K = p->k_h * p->k_w * p->in_c, K4 = K & ~3, n4 = K4 >> 2, tail = K - K4;
  const int32_t out_c = p->out_c, stride = KWS_CONV_PAIR_STRIDE(K);
  const int32_t off = p->output_offset, lo = p->act_min, hi = p->act_max, fast = p->requant_fast;
  const uint32_t lo4 = bytes4(lo), hi4 = bytes4(hi);
  const int16_t *const xt = x + 2 * K4;          /* the K % 4 tails: A's, then B's */
  const int8_t *w = filter;
  const int32_t *q = rq;
  int32_t oc, k;
  for (oc = 0; oc + 1 < out_c; oc += 2, w += stride, q += 8) {
    int32_t a0 = bias ? bias[oc] : 0, a1 = bias ? bias[oc + 1] : 0, b0 = a0, b1 = a1;
    const int16_t *xp = x;
    const int8_t *wp = w;
    uint32_t wa, wb, x0, x1, t0, t1;
    int32_t n = n4;
    if (n) {
      /* n4 groups of four K positions, two per turn; an odd one first */
      __asm__("lsrs   %[n], %[n], #1\n\t"
              "bcc    2f\n\t"
              KWS_MAC_2X2
              "cmp    %[n], #0\n\t"
              "beq    3f\n\t"
              "2:\n\t"
              KWS_MAC_2X2 KWS_MAC_2X2
              "subs   %[n], %[n], #1\n\t"
              "bne    2b\n\t"
              "3:\n\t"
              KWS_MAC_2X2_OPERANDS);
    }
    if (tail) for (k = 0; k < tail; ++k) {
      const int32_t xa = xt[k], xb = xt[tail + k], w0 = w[2 * K4 + k], w1 = w[2 * K4 + tail + k];
      a0 += w0 * xa; a1 += w1 * xa;
      b0 += w0 * xb; b1 += w1 * xb;
    }
    /* all four results before any store (an int8 store may alias the table), then saturate,
     * pack A's two bytes and B's two into one word, clamp all four at once, two halfword stores */
    {
      uint32_t v;
      if (fast) {
        v = rq2x2_fast(a0, a1, b0, b1, q, lo4, hi4);
      } else {
        a0 = rq_exact(a0, q, off); b0 = rq_exact(b0, q, off);
        a1 = rq_exact(a1, q + 4, off); b1 = rq_exact(b1, q + 4, off);
        v = clamp4(pack4(ssat8(a0), ssat8(a1), ssat8(b0), ssat8(b1)), lo4, hi4);
      }
      st16(oa + oc, v);
      st16(ob + oc, v >> 16);
    }
  }
  if (oc < out_c) {
    /* a last odd channel: its filter row is in natural order */
    const int16_t *xp = x;
    int32_t a0 = bias ? bias[oc] : 0, b0 = a0, n;
    for (n = n4; n > 0; --n, w += 4, xp += 8) {
      const uint32_t wv = ld32(w), we = sxtb16(wv), wo = sxtb16_ror8(wv);
      a0 = smlad(wo, ld32(xp + 2), smlad(we, ld32(xp), a0));
      b0 = smlad(wo, ld32(xp + 6), smlad(we, ld32(xp + 4), b0));
    }
    for (k = 0; k < tail; ++k) {
      a0 += w[k] * xt[k];
      b0 += w[k] * xt[tail + k];
    }
    oa[oc] = requant(a0, q, fast, off, lo, hi);
    ob[oc] = requant(b0, q, fast, off, lo, hi);
  }
}
#endif /* KWS_USE_DSP */

/* ------------------------------------------------------------------ CONV_2D */

/* The formula lives in kws_params.h, generated from the exporter's description (abi.py). */
int32_t kws_conv2d_scratch_bytes(const kws_conv_params_t *p) { return KWS_CONV2D_SCRATCH_BYTES(p); }

/* reference_integer_ops::ConvPerChannel */
static void conv2d_portable(const kws_conv_params_t *p, const int8_t *input, const int8_t *filter,
                            const int32_t *bias, const int32_t *rq, int8_t *output) {
  const int32_t groups = p->in_c / p->filter_in_c;
  const int32_t per_group = p->out_c / groups;
  const int32_t K = p->k_h * p->k_w * p->filter_in_c;
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
              const int8_t *in;
              const int32_t k0 = (fy * p->k_w + fx) * p->filter_in_c;
              if (ix < 0 || ix >= p->in_w) continue;
              in = input + ((b * p->in_h + iy) * p->in_w + ix) * p->in_c + g * p->filter_in_c;
              for (ic = 0; ic < p->filter_in_c; ++ic)
                acc += filter[conv_w_index(oc, k0 + ic, K, p->out_c)] * (in[ic] + p->input_offset);
            }
          }
          if (bias) acc += bias[oc];
          out[oc] = requant(acc, rq + 4 * oc, p->requant_fast, p->output_offset, p->act_min, p->act_max);
        }
      }
    }
  }
}

void kws_conv2d_s8(const kws_conv_params_t *p, const int8_t *input, const int8_t *filter, const int32_t *bias,
                   const int32_t *rq, int8_t *output, int16_t *scratch) {
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
      pixels_out(p, filter, bias, rq, scratch, output + i * p->out_c, output + (two ? i + 1 : i) * p->out_c);
    }
    return;
  }
#else
  (void)scratch;
#endif
  conv2d_portable(p, input, filter, bias, rq, output);
}

/* ------------------------------------------------------------------ DEPTHWISE_CONV_2D */

int32_t kws_depthwise_scratch_bytes(const kws_conv_params_t *p) { return KWS_DEPTHWISE_SCRATCH_BYTES(p); }

/* reference_integer_ops::DepthwiseConvPerChannel, with the input offset folded into the bias:
 * bias_eff = bias + input_offset * sum(w) over all taps, and a tap in the padding reads the input
 * zero point (x + input_offset = 0 there, as the reference's skipped tap contributes 0). */
static void depthwise_portable(const kws_conv_params_t *p, const int8_t *input, const int16_t *filter,
                               const int32_t *bias_eff, const int32_t *rq, int8_t *output) {
  const int32_t zp = -p->input_offset;
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
            int32_t acc = bias_eff[oc];
            for (fy = 0; fy < p->k_h; ++fy) {
              const int32_t iy = y0 + p->dil_h * fy;
              for (fx = 0; fx < p->k_w; ++fx) {
                const int32_t ix = x0 + p->dil_w * fx;
                const int32_t x = iy < 0 || iy >= p->in_h || ix < 0 || ix >= p->in_w
                                      ? zp : input[((b * p->in_h + iy) * p->in_w + ix) * p->in_c + ic];
                acc += filter[dw_w_index(fy * p->k_w + fx, oc, p->out_c, p->k_h * p->k_w)] * x;
              }
            }
            out[oc] = requant(acc, rq + 4 * oc, p->requant_fast, p->output_offset, p->act_min, p->act_max);
          }
        }
      }
    }
  }
}

#if KWS_USE_DSP
/* one tap of four channels: x holds the four input bytes, w the filter's (c0,c2) (c1,c3) pairs */
#define KWS_DW_TAP(x, w)                                            \
  do {                                                              \
    const uint32_t xe_ = sxtb16(x), xo_ = sxtb16_ror8(x);           \
    const uint32_t we_ = ld32(w), wo_ = ld32((w) + 2);              \
    a0 = smlabb(we_, xe_, a0);                                      \
    a2 = smlatt(we_, xe_, a2);                                      \
    a1 = smlabb(wo_, xo_, a1);                                      \
    a3 = smlatt(wo_, xo_, a3);                                      \
  } while (0)

#define KWS_DW_TAP_ASM(off)                         \
  "ldr    %[x], [%[r], " off "]\n\t"                 \
  "ldrd   %[we], %[wo], [%[w]], #8\n\t"             \
  "sxtb16 %[xe], %[x]\n\t"                          \
  "sxtb16 %[x], %[x], ror #8\n\t"                   \
  "smlabb %[a0], %[we], %[xe], %[a0]\n\t"           \
  "smlatt %[a2], %[we], %[xe], %[a2]\n\t"           \
  "smlabb %[a1], %[wo], %[x], %[a1]\n\t"            \
  "smlatt %[a3], %[wo], %[x], %[a3]\n\t"

/* Four channels at a time from a padded, channel-group-major copy of the rows one output row
 * reads: S[g][fy][px] is the word of channels 4g..4g+3 at padded column px of that row (the input
 * zero point in the padding), so every window is whole and a 3-wide row is three word loads at
 * fixed offsets. With the input offset folded into the bias there is no per-tap add. */
static void depthwise_dsp(const kws_conv_params_t *p, const int8_t *input, const int16_t *filter,
                          const int32_t *bias_eff, const int32_t *rq, int8_t *output, uint32_t *S) {
  const int32_t C = p->in_c, G = C >> 2, KH = p->k_h, KW = p->k_w;
  const int32_t PW = (p->out_w - 1) * p->stride_w + (KW - 1) * p->dil_w + 1, gstride = KH * PW;
  const int32_t sw = p->stride_w, dw = p->dil_w, out_w = p->out_w, pw4 = 4 * PW;
  const uint32_t zp4 = bytes4(-p->input_offset);
  /* locals, not p->...: every int8 store may alias *p, which would force a reload per output */
  const int32_t out_off = p->output_offset, fast = p->requant_fast;
  const uint32_t lo4 = bytes4(p->act_min), hi4 = bytes4(p->act_max);
  const int three = KW == 3 && dw == 1;
  int32_t b, oy, ox, g, fy, fx, px;
  for (b = 0; b < p->batches; ++b) {
    for (oy = 0; oy < p->out_h; ++oy) {
      const int32_t y0 = oy * p->stride_h - p->pad_h;
      /* the rows this output row reads: every read of its input happens here, before any write */
      for (fy = 0; fy < KH; ++fy) {
        const int32_t iy = y0 + p->dil_h * fy;
        uint32_t *row = S + fy * PW;
        for (px = 0; px < PW; ++px) {
          const int32_t ix = px - p->pad_w;
          uint32_t *d = row + px, *const d_end = d + G * gstride;
          if (iy < 0 || iy >= p->in_h || ix < 0 || ix >= p->in_w) {
            for (; d != d_end; d += gstride) *d = zp4;
          } else {
            const int8_t *src = input + ((b * p->in_h + iy) * p->in_w + ix) * C;
            for (; d != d_end; d += gstride, src += 4) *d = ld32(src);
          }
        }
      }
      for (ox = 0; ox < out_w; ++ox) {
        const uint32_t *xs = S + ox * sw;
        const int16_t *w = filter;
        int8_t *out = output + ((b * p->out_h + oy) * out_w + ox) * C;
        const int32_t *q = rq, *bp = bias_eff;
        for (g = 0; g < G; ++g, xs += gstride, q += 16, bp += 4, out += 4) {
          int32_t a0 = bp[0], a1 = bp[1], a2 = bp[2], a3 = bp[3];
          const uint32_t *r = xs;
          if (three) {
            /* KH rows of three taps: 8 instructions a tap, 4 MACs */
            int32_t n = KH;
            uint32_t x, xe, we, wo;
            __asm__("1:\n\t"
                    KWS_DW_TAP_ASM("#0") KWS_DW_TAP_ASM("#4") KWS_DW_TAP_ASM("#8")
                    "add    %[r], %[r], %[pw4]\n\t"
                    "subs   %[n], %[n], #1\n\t"
                    "bne    1b\n\t"
                    : [a0] "+r"(a0), [a1] "+r"(a1), [a2] "+r"(a2), [a3] "+r"(a3), [r] "+r"(r), [w] "+r"(w),
                      [n] "+r"(n), [x] "=&r"(x), [xe] "=&r"(xe), [we] "=&r"(we), [wo] "=&r"(wo)
                    : [pw4] "r"(pw4)
                    : "cc", "memory");
          } else {
            for (fy = 0; fy < KH; ++fy, r += PW)
              for (fx = 0; fx < KW; ++fx, w += 4) {
                const uint32_t x = r[fx * dw];
                KWS_DW_TAP(x, w);
              }
          }
          if (fast) {
            st32(out, rq4_fast(a0, a1, a2, a3, q, lo4, hi4));
          } else {
            a0 = rq_exact(a0, q, out_off); a1 = rq_exact(a1, q + 4, out_off);
            a2 = rq_exact(a2, q + 8, out_off); a3 = rq_exact(a3, q + 12, out_off);
            st32(out, clamp4(pack4(ssat8(a0), ssat8(a1), ssat8(a2), ssat8(a3)), lo4, hi4));
          }
        }
      }
    }
  }
}
#endif

void kws_depthwise_conv2d_s8(const kws_conv_params_t *p, const int8_t *input, const int16_t *filter,
                             const int32_t *bias_eff, const int32_t *rq, int8_t *output, int8_t *scratch) {
#if KWS_USE_DSP
  if (scratch && p->depth_mult == 1 && (p->in_c & 3) == 0) {
    depthwise_dsp(p, input, filter, bias_eff, rq, output, (uint32_t *)(void *)scratch);
    return;
  }
#else
  (void)scratch;
#endif
  depthwise_portable(p, input, filter, bias_eff, rq, output);
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
      {
        const int32_t sh = shift[ch], left = sh > 0 ? sh : 0;
        out[oc] = (int8_t)clamp(mbqm_lr(acc, mult[ch], left, left - sh) + p->output_offset, p->act_min, p->act_max);
      }
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

/*
 * kws_kernels.h: int8 inference kernels, bit-exact with TensorFlow Lite Micro.
 *
 * Every kernel computes exactly what TFLite Micro's reference integer kernel
 * computes (tensorflow/lite/kernels/internal/reference/integer_ops/ *.h and
 * reference/softmax.h), so a model compiled by `tierkit kws export` gives the
 * same int8 outputs as the interpreter, byte for byte. The arithmetic, in short
 * (the project's REFERENCE.md, "TFLite int8 arithmetic", has the long form):
 *
 *   acc = bias + sum(w * (x + input_offset))            int32, input_offset = -zp_in
 *   out = MultiplyByQuantizedMultiplier(acc, M, shift) + output_offset
 *   out = clamp(out, act_min, act_max)                  fused RELU/RELU6 live here
 *
 * All parameters (multipliers, shifts, paddings, activation ranges) are
 * computed at export time by tiers/tier0/compiler/ and stored as const data:
 * nothing here touches a float, and nothing allocates. Tensors are NHWC int8.
 *
 * Two implementations share one interface: a portable C99 one, and on cores
 * with the Armv7E-M DSP extension (__ARM_FEATURE_DSP: Cortex-M4/M7/M33) one
 * that does two 16-bit multiply-accumulates per instruction (SMLAD). Integer
 * sums are exact, so both give identical results; the tests check it.
 *
 * In-place safety: a kernel reads the inputs an output element needs before it
 * writes that element, and after writing it reads only inputs that outputs
 * later in NHWC order need (the DSP convolution gathers two pixels' patches
 * before writing either; the DSP depthwise copies the rows an output row reads
 * before writing any of that row). The exporter's memory planner relies on this to let
 * an output overlap the part of its input already consumed (compiler/memory.py,
 * `overlap_limit`): that is how the MLPerf DS-CNN fits in 0.41x TFLite Micro's
 * arena.
 *
 * The parameter structs and the size formulas (scratch, the conv filter's pair
 * stride) are in kws_params.h, generated from the exporter's own description
 * (tiers/tier0/compiler/abi.py): the bytes it writes are the bytes read here.
 *
 * Scratch: kws_conv2d_s8 takes kws_conv2d_scratch_bytes(p) bytes of int16
 * scratch, kws_depthwise_conv2d_s8 kws_depthwise_scratch_bytes(p) bytes (both
 * int32-aligned), for the DSP path; the generated model places them in its
 * arena. The portable path ignores them (NULL is fine there).
 *
 * Layouts prepared at export time (both paths read the same constants):
 *
 *   CONV_2D filter, int8, 4-byte aligned, in pairs of output channels. With
 *   K = k_h * k_w * filter_in_c and K4 = K rounded down to a multiple of 4,
 *   the pair (2q, 2q+1) starts at byte q * KWS_CONV_PAIR_STRIDE(K) and holds,
 *   for each group g of four K positions, 4 bytes of channel 2q then 4 of
 *   channel 2q+1 (byte 8g + 4j + i is w[2q+j][4g+i]); then channel 2q's K - K4
 *   tail, then channel 2q+1's. A last odd channel is stored in natural order.
 *   One LDRD fetches a group of both channels.
 *
 *   DEPTHWISE_CONV_2D filter, int16, 4-byte aligned: for each full group of
 *   four channels, every tap's four weights as c0 c2 c1 c3 (the order SXTB16
 *   unpacks a word of four input channels in); then the channels past the last
 *   full group as [tap][channel]. Its bias is folded: bias + input_offset *
 *   (sum of the channel's weights over all taps), always present; the kernel
 *   reads a tap in the padding as the input zero point, which adds the same 0.
 *
 *   Requantisation (CONV_2D, DEPTHWISE_CONV_2D): four int32 per output
 *   channel, {M, left + 1, right, rounding}: MultiplyByQuantizedMultiplier(acc,
 *   M, left - right) + output_offset. With requant_fast set (the exporter
 *   proves it exact for the layer) the kernels compute it as
 *   (v + (v >> 31) + rounding) >> right, v = SMMULR(acc << (left + 1), M),
 *   rounding = 2^(right-1) + output_offset * 2^right: 5 instructions.
 *   kws_kernels.c, "requantisation tables", has the argument.
 *
 * Plain C99, no OS, no malloc: drop kws_kernels.c and a generated model.c
 * into any firmware.
 */
#ifndef KWS_KERNELS_H
#define KWS_KERNELS_H

#include <stdint.h>

#include "kws_params.h"   /* the parameter structs and size formulas, generated */

#ifdef __cplusplus
extern "C" {
#endif

/* Alignment for the packed constants (LDRD needs a word-aligned address). */
#if defined(__GNUC__) || defined(__clang__)
#define KWS_ALIGN4 __attribute__((aligned(4)))
#else
#define KWS_ALIGN4
#endif

/* Bytes of int16 scratch the DSP convolution needs (0 on the portable path is fine):
 * KWS_CONV2D_SCRATCH_BYTES(p). */
int32_t kws_conv2d_scratch_bytes(const kws_conv_params_t *p);

/* filter: packed in channel pairs; rq: 4 int32 per output channel (see above). */
void kws_conv2d_s8(const kws_conv_params_t *p, const int8_t *input, const int8_t *filter,
                   const int32_t *bias, const int32_t *rq, int8_t *output, int16_t *scratch);

/* Bytes of scratch (int32-aligned) the DSP depthwise path needs; 0 where it does not apply:
 * KWS_DEPTHWISE_SCRATCH_BYTES(p). */
int32_t kws_depthwise_scratch_bytes(const kws_conv_params_t *p);

/* filter and folded bias as above; rq as for kws_conv2d_s8; scratch may be NULL (portable path). */
void kws_depthwise_conv2d_s8(const kws_conv_params_t *p, const int8_t *input, const int16_t *filter,
                             const int32_t *bias_eff, const int32_t *rq, int8_t *output, int8_t *scratch);

void kws_fully_connected_s8(const kws_fc_params_t *p, const int8_t *input, const int8_t *filter,
                            const int32_t *bias, const int32_t *mult, const int32_t *shift,
                            int8_t *output);

/* Returns 0, or -1 where a window holds no input element (TFLM fails the op there too). */
int kws_avg_pool_s8(const kws_conv_params_t *p, const int8_t *input, int8_t *output);

void kws_max_pool_s8(const kws_conv_params_t *p, const int8_t *input, int8_t *output);

void kws_add_s8(const kws_add_params_t *p, const int8_t *input1, const int8_t *input2, int8_t *output);

void kws_softmax_s8(const kws_softmax_params_t *p, const int8_t *input, int8_t *output);

/* The fixed-point primitives, exposed for tests. */
int32_t kws_multiply_by_quantized_multiplier(int32_t x, int32_t multiplier, int32_t shift);
int32_t kws_saturating_rounding_doubling_high_mul(int32_t a, int32_t b);
int32_t kws_rounding_divide_by_pot(int32_t x, int32_t exponent);

/* 1 when this build uses the DSP-extension path (for reports and tests). */
int kws_kernels_dsp(void);

#ifdef __cplusplus
}
#endif

#endif /* KWS_KERNELS_H */

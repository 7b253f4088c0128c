/* model_runner.h: the int8 model compiled by `tierkit kws export`, behind a narrow interface.
 *
 * The generated model.h (from the model directory the build is given) says the
 * input's quantisation and the output size; this file adds the labels and checks,
 * at compile time, that the model takes the 49 x 10 features this firmware makes:
 * a model trained on another feature size must not build.
 */
#ifndef KWS_MODEL_RUNNER_H
#define KWS_MODEL_RUNNER_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define MODEL_MAX_CLASSES 32

int model_num_classes(void);
int model_input_size(void);
float model_input_scale(void);
int32_t model_input_zero_point(void);
float model_output_scale(void);
int32_t model_output_zero_point(void);
uint32_t model_arena_bytes(void);
uint32_t model_const_bytes(void);

/* Label of output i ("yes", "_silence_", ...): tiers/tier0/data.py CLASSES order. */
const char *model_label(int i);

/* float features -> the int8 input tensor, with the input's scale and zero point. */
void model_quantize_input(const float *features, int8_t *input);

/* Run the model on an int8 input; writes model_num_classes() int8 scores. Returns 0, or -1. */
int model_invoke(const int8_t *input, int8_t *scores);

#ifdef __cplusplus
}
#endif

#endif /* KWS_MODEL_RUNNER_H */

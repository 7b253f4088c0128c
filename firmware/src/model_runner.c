/* model_runner.c: see model_runner.h. */
#include "model_runner.h"

#include "kws_features.h"
#include "model.h"   /* generated: firmware/lib/model/ for PlatformIO, the build's model dir for QEMU */

#if KWS_MODEL_INPUT_SIZE != KWS_NUM_FEATURES
#error "the model's input is not 49 x 10 MFCC: retrain it on tiers/tier0/features.py's features"
#endif
#if KWS_MODEL_OUTPUT_SIZE > MODEL_MAX_CLASSES
#error "the model has more outputs than MODEL_MAX_CLASSES"
#endif

/* The order of tiers/tier0/data.py CLASSES (the training labels); tests check they agree. */
static const char *const s_labels[] = {
    "yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go", "_silence_", "_unknown_",
};
#define NUM_LABELS ((int)(sizeof(s_labels) / sizeof(s_labels[0])))

int model_num_classes(void) { return KWS_MODEL_OUTPUT_SIZE; }
int model_input_size(void) { return KWS_MODEL_INPUT_SIZE; }
float model_input_scale(void) { return KWS_MODEL_INPUT_SCALE; }
int32_t model_input_zero_point(void) { return KWS_MODEL_INPUT_ZERO_POINT; }
float model_output_scale(void) { return KWS_MODEL_OUTPUT_SCALE; }
int32_t model_output_zero_point(void) { return KWS_MODEL_OUTPUT_ZERO_POINT; }
uint32_t model_arena_bytes(void) { return KWS_MODEL_ARENA_BYTES; }
uint32_t model_const_bytes(void) { return KWS_MODEL_CONST_BYTES; }

const char *model_label(int i)
{
    static const char *const other[] = {"c12", "c13", "c14", "c15", "c16", "c17", "c18", "c19", "c20", "c21",
                                        "c22", "c23", "c24", "c25", "c26", "c27", "c28", "c29", "c30", "c31"};
    if (i >= 0 && i < NUM_LABELS) return s_labels[i];
    if (i >= NUM_LABELS && i < MODEL_MAX_CLASSES) return other[i - NUM_LABELS];
    return "?";
}

void model_quantize_input(const float *features, int8_t *input)
{
    kws_quantize_int8(features, input, KWS_MODEL_INPUT_SIZE, KWS_MODEL_INPUT_SCALE, KWS_MODEL_INPUT_ZERO_POINT);
}

int model_invoke(const int8_t *input, int8_t *scores)
{
    return kws_model_invoke(input, scores);
}

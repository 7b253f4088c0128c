/* recognizer.h: turn a stream of per-inference scores into keyword detections.
 *
 * micro_speech's RecognizeCommands: keep the scores of the last
 * `average_window_ms`, average them per class, and report the top class as a
 * new detection when its average passes `threshold` and it differs from the
 * last detection (or `suppression_ms` has passed since it). Averaging over about
 * a second steadies a model that sees each word in many shifted windows.
 *
 * Scores are the model's int8 softmax outputs; this works on q + 128 (0..255,
 * i.e. probability x 256 for TFLite's softmax quantisation).
 */
#ifndef KWS_RECOGNIZER_H
#define KWS_RECOGNIZER_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define RECOGNIZER_MAX_RESULTS 64
#define RECOGNIZER_MAX_CLASSES 32

typedef struct {
    int32_t average_window_ms;   /* 1000 */
    int32_t threshold;           /* 0..255 on q + 128; 200 is p = 0.78 */
    int32_t suppression_ms;      /* 1500 */
    int32_t minimum_count;       /* fewer results in the window: no decision (3) */
    int32_t silence_index;       /* class whose detection does not start a suppression period (-1: none) */
} recognizer_config_t;

typedef struct {
    int found;       /* the top class (or the last detection while undecided), -1 before any */
    int32_t score;   /* its average, 0..255 */
    int is_new;      /* 1: report it */
} recognizer_result_t;

void recognizer_default_config(recognizer_config_t *cfg);
void recognizer_init(const recognizer_config_t *cfg, int num_classes);

/* Add one inference's scores at `now_ms` (non-decreasing); returns 0, or -1 if time went backwards. */
int recognizer_process(const int8_t *scores, int32_t now_ms, recognizer_result_t *out);

#ifdef __cplusplus
}
#endif

#endif /* KWS_RECOGNIZER_H */

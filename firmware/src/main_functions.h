/* main_functions.h: the keyword spotter's pipeline (micro_speech's main_functions).
 *
 *   app_setup()  board, audio, features, model, recognizer; banner line
 *   app_loop()   serve the host's test frames; in live mode: new audio ->
 *                features -> model -> recognizer -> responder
 *
 * The QEMU board's main() calls them; Arduino boards call them from setup() and loop().
 */
#ifndef KWS_MAIN_FUNCTIONS_H
#define KWS_MAIN_FUNCTIONS_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define KWS_FIRMWARE_VERSION "0.1.0"

void app_setup(void);
void app_loop(void);

/* Test mode's entry points into the pipeline (test_mode.c). */

typedef struct {
    uint32_t feature_count;   /* board_counter() ticks spent on features */
    uint32_t invoke_count;    /* ... on the model */
    int32_t status;           /* the model's return: 0 ok */
} app_timing_t;

/* Live detection on (the microphone) or paused (the host drives). Returns -1 when
 * the board has no microphone. */
int app_set_live(int live);

/* One second of audio -> features -> int8 input -> scores (the batch front end: kws_mfcc). */
void app_classify(const int16_t *clip, int8_t *scores, app_timing_t *timing);

/* Host audio through the live pipeline: push `n` samples, update features, run at most
 * one inference; `reset` starts a new stream. Returns 1 if the model ran. */
int app_stream(const int16_t *pcm, uint32_t n, int reset, int8_t *scores, app_timing_t *timing);

/* Since the stream started: samples, inferences, detections. */
void app_stream_stats(uint32_t *samples, uint32_t *inferences, uint32_t *detections);

/* The last inference's int8 input tensor and float features (490 each). */
const int8_t *app_last_input(void);
const float *app_last_features(void);

#ifdef __cplusplus
}
#endif

#endif /* KWS_MAIN_FUNCTIONS_H */

/* main_functions.c: the pipeline, read top to bottom (see main_functions.h).
 *
 * Live:  microphone -> audio_provider (ring) -> feature_provider (MFCC, 20 ms
 *        frames) -> model_runner (int8 DS-CNN on the last second) -> recognizer
 *        (average ~1 s, threshold, suppression) -> responder ("DET ..." lines).
 * Test:  the host sends clips (classify) or audio (stream) in frames; test_mode.c
 *        answers with the scores, the features and the time each part took.
 */
#include "main_functions.h"

#include "audio_provider.h"
#include "board.h"
#include "feature_provider.h"
#include "kws_features.h"
#include "model_runner.h"
#include "recognizer.h"
#include "responder.h"
#include "test_mode.h"
#include "text.h"

static float s_features[KWS_NUM_FEATURES];
static int8_t s_input[KWS_NUM_FEATURES];
static int8_t s_scores[MODEL_MAX_CLASSES];
static int s_live;            /* 1: microphone and detections; 0: the host drives */
static int s_have_mic;
static uint32_t s_inferences, s_detections, s_overruns_seen;
static recognizer_config_t s_rcfg;

static int silence_index(void)
{
    int i;
    for (i = 0; i < model_num_classes(); i++) {
        const char *l = model_label(i);
        if (l[0] == '_' && l[1] == 's') return i;  /* "_silence_" */
    }
    return -1;
}

static void start_stream(int source)
{
    audio_provider_reset(source);
    feature_provider_reset();
    recognizer_init(&s_rcfg, model_num_classes());
    s_inferences = s_detections = 0;
}

/* Features of the window -> int8 input -> model -> recognizer -> maybe a DET line. */
static void infer_window(int8_t *scores, app_timing_t *timing)
{
    recognizer_result_t r;
    uint32_t t0 = board_counter(), t1, t2;
    uint32_t now_ms = feature_provider_slices() * (KWS_FRAME_STEP * 1000u / KWS_SAMPLE_RATE);
    feature_provider_features(s_features);
    model_quantize_input(s_features, s_input);
    t1 = board_counter();
    timing->status = model_invoke(s_input, scores);
    t2 = board_counter();
    timing->feature_count = t1 - t0;
    timing->invoke_count = t2 - t1;
    s_inferences++;
    if (timing->status != 0) return;
    recognizer_process(scores, (int32_t)now_ms, &r);
    if (r.is_new && model_label(r.found)[0] != '_') {   /* _silence_ and _unknown_ are not keywords */
        s_detections++;
        responder_detection(model_label(r.found), r.score, now_ms);
    }
}

static void live_step(void)
{
    app_timing_t timing;
    if (feature_provider_update() == 0) {
        if (feature_provider_overruns() != s_overruns_seen) {
            s_overruns_seen = feature_provider_overruns();
            responder_note("overrun: audio lost while the model ran; restarting the window");
        }
        return;
    }
    if (feature_provider_slices() >= FEATURE_SLICES) infer_window(s_scores, &timing);
}

void app_setup(void)
{
    char buf[160];
    text_t t;
    board_init();
    recognizer_default_config(&s_rcfg);
    s_rcfg.silence_index = silence_index();
    test_mode_init();
    s_have_mic = board_audio_start() == 0;
    start_stream(AUDIO_SOURCE_MIC);
    s_live = s_have_mic;
    text_init(&t, buf, sizeof(buf));
    text_str(&t, "tierkit kws firmware " KWS_FIRMWARE_VERSION " board=");
    text_str(&t, board_name());
    text_str(&t, " classes=");
    text_u32(&t, (uint32_t)model_num_classes());
    text_str(&t, " arena=");
    text_u32(&t, model_arena_bytes());
    text_str(&t, s_have_mic ? " mic=on" : " mic=none (test mode only)");
    responder_note(buf);
}

void app_loop(void)
{
    test_mode_poll();
    if (s_live) live_step();
}

int app_set_live(int live)
{
    if (live && !s_have_mic) return -1;
    if (live != s_live) start_stream(live ? AUDIO_SOURCE_MIC : AUDIO_SOURCE_HOST);
    s_live = live;
    return 0;
}

void app_classify(const int16_t *clip, int8_t *scores, app_timing_t *timing)
{
    uint32_t t0 = board_counter(), t1, t2;
    kws_mfcc(clip, s_features);
    model_quantize_input(s_features, s_input);
    t1 = board_counter();
    timing->status = model_invoke(s_input, scores);
    t2 = board_counter();
    timing->feature_count = t1 - t0;
    timing->invoke_count = t2 - t1;
}

int app_stream(const int16_t *pcm, uint32_t n, int reset, int8_t *scores, app_timing_t *timing)
{
    uint32_t t0, update;
    int added;
    if (reset || audio_provider_source() != AUDIO_SOURCE_HOST) start_stream(AUDIO_SOURCE_HOST);
    audio_provider_write(pcm, n, AUDIO_SOURCE_HOST);
    t0 = board_counter();
    added = feature_provider_update();
    update = board_counter() - t0;          /* FFT + mel of the new frames */
    timing->feature_count = update;
    timing->invoke_count = 0;
    timing->status = 0;
    if (added == 0 || feature_provider_slices() < FEATURE_SLICES) return 0;
    infer_window(scores, timing);           /* + log, DCT, quantise of the window */
    timing->feature_count += update;
    return 1;
}

void app_stream_stats(uint32_t *samples, uint32_t *inferences, uint32_t *detections)
{
    *samples = audio_provider_latest();
    *inferences = s_inferences;
    *detections = s_detections;
}

const int8_t *app_last_input(void) { return s_input; }
const float *app_last_features(void) { return s_features; }

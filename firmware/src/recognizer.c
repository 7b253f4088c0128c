/* recognizer.c: see recognizer.h. Follows micro_speech's recognize_commands.cc. */
#include "recognizer.h"

#include <string.h>

typedef struct {
    int32_t time_ms;
    uint8_t scores[RECOGNIZER_MAX_CLASSES];
} result_t;

static recognizer_config_t s_cfg;
static int s_classes;
static result_t s_results[RECOGNIZER_MAX_RESULTS];   /* a queue: s_head is the oldest */
static int s_head, s_count;
static int s_prev_label;
static int32_t s_prev_time;
static int s_have_prev_time;

void recognizer_default_config(recognizer_config_t *cfg)
{
    cfg->average_window_ms = 1000;
    cfg->threshold = 200;
    cfg->suppression_ms = 1500;
    cfg->minimum_count = 3;
    cfg->silence_index = -1;
}

void recognizer_init(const recognizer_config_t *cfg, int num_classes)
{
    s_cfg = *cfg;
    s_classes = num_classes > RECOGNIZER_MAX_CLASSES ? RECOGNIZER_MAX_CLASSES : num_classes;
    s_head = s_count = 0;
    s_prev_label = cfg->silence_index;
    s_prev_time = 0;
    s_have_prev_time = 0;
}

static const result_t *at(int i) { return &s_results[(s_head + i) % RECOGNIZER_MAX_RESULTS]; }

int recognizer_process(const int8_t *scores, int32_t now_ms, recognizer_result_t *out)
{
    result_t *r;
    int32_t sums[RECOGNIZER_MAX_CLASSES];
    int i, c, top = 0;
    int32_t since_top;

    if (s_count > 0 && now_ms < at(s_count - 1)->time_ms) return -1;
    if (s_count == RECOGNIZER_MAX_RESULTS) {          /* full: drop the oldest */
        s_head = (s_head + 1) % RECOGNIZER_MAX_RESULTS;
        s_count--;
    }
    r = &s_results[(s_head + s_count) % RECOGNIZER_MAX_RESULTS];
    r->time_ms = now_ms;
    for (c = 0; c < s_classes; c++) r->scores[c] = (uint8_t)(scores[c] + 128);
    s_count++;
    while (s_count > 0 && at(0)->time_ms < now_ms - s_cfg.average_window_ms) {  /* forget old results */
        s_head = (s_head + 1) % RECOGNIZER_MAX_RESULTS;
        s_count--;
    }

    out->found = s_prev_label;
    out->score = 0;
    out->is_new = 0;
    if (s_count < s_cfg.minimum_count || now_ms - at(0)->time_ms < s_cfg.average_window_ms / 4)
        return 0;                                        /* too few results to trust */

    memset(sums, 0, sizeof(sums));
    for (i = 0; i < s_count; i++)
        for (c = 0; c < s_classes; c++) sums[c] += at(i)->scores[c];
    for (c = 1; c < s_classes; c++)
        if (sums[c] > sums[top]) top = c;

    since_top = (!s_have_prev_time || s_prev_label == s_cfg.silence_index) ? INT32_MAX : now_ms - s_prev_time;
    out->found = top;
    out->score = sums[top] / s_count;
    if (out->score > s_cfg.threshold && (top != s_prev_label || since_top > s_cfg.suppression_ms)) {
        s_prev_label = top;
        s_prev_time = now_ms;
        s_have_prev_time = 1;
        out->is_new = 1;
    }
    return 0;
}

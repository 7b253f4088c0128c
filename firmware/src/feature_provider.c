/* feature_provider.c: see feature_provider.h. */
#include "feature_provider.h"

#include "audio_provider.h"
#include "kws_features.h"

#define RING FEATURE_SLICES     /* frames kept: one per slice */

static float s_mel[RING][KWS_NUM_MEL];  /* mel energies of frame f at s_mel[f % RING], at divisor 32768 */
static int16_t s_hi[RING];              /* slice s: largest sample */
static int32_t s_mag[RING];             /* slice s: largest magnitude (32768 for -32768) */
static uint32_t s_base;                 /* audio sample where slice 0 / frame 0 start */
static uint32_t s_frames, s_slices, s_overruns;
static int16_t s_buf[KWS_FRAME_LENGTH];

void feature_provider_reset(void)
{
    s_base = audio_provider_latest();
    s_frames = 0;
    s_slices = 0;
}

uint32_t feature_provider_slices(void) { return s_slices; }
uint32_t feature_provider_overruns(void) { return s_overruns; }

static int overrun(void)
{
    s_overruns++;
    feature_provider_reset();
    return 0;
}

int feature_provider_update(void)
{
    uint32_t latest = audio_provider_latest();
    int added = 0;
    while (s_base + s_slices * KWS_FRAME_STEP + KWS_FRAME_STEP <= latest) {
        int32_t hi = INT16_MIN, mag = 0;
        int i;
        if (audio_provider_read(s_base + s_slices * KWS_FRAME_STEP, KWS_FRAME_STEP, s_buf) != 0) return overrun();
        for (i = 0; i < KWS_FRAME_STEP; i++) {
            int32_t v = s_buf[i], a = v < 0 ? -v : v;
            if (v > hi) hi = v;
            if (a > mag) mag = a;
        }
        s_hi[s_slices % RING] = (int16_t)hi;
        s_mag[s_slices % RING] = mag;
        s_slices++;
        added++;
    }
    while (s_base + s_frames * KWS_FRAME_STEP + KWS_FRAME_LENGTH <= latest) {
        if (audio_provider_read(s_base + s_frames * KWS_FRAME_STEP, KWS_FRAME_LENGTH, s_buf) != 0)
            return overrun();
        kws_mel_frame(s_buf, 32768.0f, s_mel[s_frames % RING]);
        s_frames++;
    }
    return added;
}

/* kws_peak's rule over the window's 50 slices: the largest sample; else the largest magnitude; else 1. */
static float window_peak(uint32_t first_slice)
{
    int32_t hi = INT16_MIN, mag = 0;
    uint32_t s;
    for (s = first_slice; s < first_slice + FEATURE_SLICES; s++) {
        if (s_hi[s % RING] > hi) hi = s_hi[s % RING];
        if (s_mag[s % RING] > mag) mag = s_mag[s % RING];
    }
    if (mag == 0) return 1.0f;
    return hi != 0 ? (float)hi : (float)mag;
}

int feature_provider_features(float *out)
{
    uint32_t first, f;
    float gain;
    if (s_slices < FEATURE_SLICES) return -1;
    first = s_slices - FEATURE_SLICES;             /* frames first .. first + 48 */
    gain = 32768.0f / window_peak(first);
    for (f = 0; f < KWS_NUM_FRAMES; f++)
        kws_mfcc_from_mel(s_mel[(first + f) % RING], gain, out + f * KWS_NUM_MFCC);
    return 0;
}

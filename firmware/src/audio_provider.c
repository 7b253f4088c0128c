/* audio_provider.c: see audio_provider.h. */
#include "audio_provider.h"

static int16_t s_ring[AUDIO_RING_SAMPLES];
static volatile uint32_t s_written;   /* total samples since reset; the ring holds the last ones */
static volatile int s_source = AUDIO_SOURCE_MIC;

void audio_provider_reset(int source)
{
    s_source = source;
    s_written = 0;
}

int audio_provider_source(void) { return s_source; }

void audio_provider_write(const int16_t *samples, uint32_t n, int source)
{
    uint32_t w, i;
    if (source != s_source) return;
    w = s_written;
    for (i = 0; i < n; i++) s_ring[(w + i) & (AUDIO_RING_SAMPLES - 1u)] = samples[i];
#if defined(__GNUC__)
    __sync_synchronize();   /* the samples before the count, also for a reader on another core (ESP32-S3) */
#endif
    s_written = w + n;      /* published after the samples, so a reader never sees unwritten ones */
}

uint32_t audio_provider_latest(void) { return s_written; }

int audio_provider_read(uint32_t first, uint32_t n, int16_t *dst)
{
    uint32_t i;
    if (first + n > s_written) return -2;
    if (s_written - first > AUDIO_RING_SAMPLES) return -1;
    for (i = 0; i < n; i++) dst[i] = s_ring[(first + i) & (AUDIO_RING_SAMPLES - 1u)];
    /* The writer may have lapped us while we copied: check again. */
    if (s_written - first > AUDIO_RING_SAMPLES) return -1;
    return 0;
}

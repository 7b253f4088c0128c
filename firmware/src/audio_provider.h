/* audio_provider.h: the last half second of 16 kHz int16 audio, in a ring.
 *
 * micro_speech's audio provider, with time counted in samples (exact; 20 ms is
 * 320 samples) instead of milliseconds. Two sources can fill the ring: the
 * board's microphone (an interrupt or DMA callback calls audio_provider_write)
 * and the host, which streams PCM over serial in test mode. Only the selected
 * source is kept; the other is ignored, so a host stream is never mixed with
 * room noise.
 */
#ifndef KWS_AUDIO_PROVIDER_H
#define KWS_AUDIO_PROVIDER_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define AUDIO_RING_SAMPLES 8192u   /* 512 ms: a slow inference must not lose audio */

enum { AUDIO_SOURCE_MIC = 0, AUDIO_SOURCE_HOST = 1 };

/* Select the source and forget what the ring holds (the sample count starts again at 0). */
void audio_provider_reset(int source);
int audio_provider_source(void);

/* Append samples (from an ISR for the microphone). Ignored unless `source` is selected. */
void audio_provider_write(const int16_t *samples, uint32_t n, int source);

/* Samples written since the last reset. */
uint32_t audio_provider_latest(void);

/* Copy samples [first, first + n) into dst. Returns 0; -1 if they were already
 * overwritten (the reader fell behind by more than the ring); -2 if not yet written. */
int audio_provider_read(uint32_t first, uint32_t n, int16_t *dst);

#ifdef __cplusplus
}
#endif

#endif /* KWS_AUDIO_PROVIDER_H */

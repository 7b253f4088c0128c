/* feature_provider.h: the 49 x 10 MFCC of the latest second of audio, updated every 20 ms.
 *
 * micro_speech's feature provider, on the MLPerf Tiny front end of
 * lib/features/kws_features.h. The costly half (FFT and mel energies) runs once
 * per 20 ms frame as audio arrives and is kept in a ring of 50 frames; the cheap
 * half (log, DCT) runs per inference, because the reference divides each second
 * by its own peak sample, known only when the whole second is. The peak comes
 * from per-slice (320-sample) maxima kept beside the frames.
 *
 * Time is counted in slices of 320 samples since the last reset. With S slices
 * complete, the window is the second [S-50, S) slices: frames S-50 .. S-2
 * (frame f covers samples [320 f, 320 f + 480)), exactly the frames kws_mfcc
 * computes on that second, with the same peak. Equal to kws_mfcc on the same
 * second up to float rounding of the rescaling (kws_features.h).
 */
#ifndef KWS_FEATURE_PROVIDER_H
#define KWS_FEATURE_PROVIDER_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define FEATURE_SLICES 50   /* slices per window: 16000 / 320 */

/* Start again from the audio provider's current position. */
void feature_provider_reset(void);

/* Compute the frames and slices the audio provider now has. Returns how many new
 * slices completed (0: nothing new). An overrun (audio lost) restarts the window. */
int feature_provider_update(void);

/* Slices completed since reset; a window exists once this reaches FEATURE_SLICES. */
uint32_t feature_provider_slices(void);

/* Times the reader fell behind the microphone and had to restart. */
uint32_t feature_provider_overruns(void);

/* The window's 490 MFCC (row-major, oldest frame first). Returns -1 if no full window yet. */
int feature_provider_features(float *out);

#ifdef __cplusplus
}
#endif

#endif /* KWS_FEATURE_PROVIDER_H */

/* responder.h: what the firmware says over serial, one line each (see firmware/README.md).
 *
 *   DET <label> <score> <ms>     a keyword was heard: label, average probability
 *                                0.00-1.00 over the smoothing window, and the time
 *                                (ms of audio since the stream started)
 *   # <text>                     anything else: boot banner, warnings
 *
 * Test-mode replies are binary frames (test_mode.h); they start with byte 0xA5,
 * which no text line contains, so one reader can take both apart.
 */
#ifndef KWS_RESPONDER_H
#define KWS_RESPONDER_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* score: 0..255 (q + 128 of the softmax output, i.e. probability x 256). */
void responder_detection(const char *label, int32_t score, uint32_t time_ms);

/* "# " + text + "\n". */
void responder_note(const char *text);

#ifdef __cplusplus
}
#endif

#endif /* KWS_RESPONDER_H */

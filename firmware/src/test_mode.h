/* test_mode.h: the host drives the firmware over serial with small framed messages.
 *
 * Frame (both directions), little-endian:
 *
 *   A5 5A | type u8 | flags u8 | length u32 | payload (length bytes) | crc32 u32
 *
 * crc32 is zlib's CRC-32 of type, flags, length and payload. Host -> device:
 *
 *   'I'  info                  -> 'i' text, one "key=value" per line
 *   'C'  classify one clip     payload: 16000 int16 samples (1 s at 16 kHz);
 *                              flags 0x01: also return the int8 input tensor,
 *                                    0x02: also return the float features
 *                              -> 's' scores
 *   'A'  stream audio          payload: up to 4096 int16 samples, pushed through
 *                              the live pipeline (ring, features, model, recognizer,
 *                              DET lines) with at most one inference per frame;
 *                              flags 0x04: start a new stream first,
 *                                    0x01: return the last inference's input tensor
 *                              -> 'a' stream status
 *   'L'  back to the microphone -> 'l' (u8: 0 ok, 1 no microphone)
 *   'Q'  quit (payload: optional u8 exit code) -> 'q', then QEMU exits / a board resets
 *
 * Device -> host, besides those:
 *
 *   's'  u8 classes, u8 flags, u16 inputs, i8 scores[classes], u32 feature_count,
 *        u32 invoke_count, i32 status, [i8 input[inputs]], [f32 features[inputs]]
 *   'a'  u32 samples, u32 inferences, u32 detections, u32 invoke_count, u8 ran,
 *        u8 classes, i8 scores[classes], [i8 input[490]]
 *   'e'  u8 code, text: 1 bad CRC, 2 too long, 3 bad length for the type,
 *        4 unknown type, 5 timeout inside a frame, 6 unsupported, 7 model failed
 *
 * Counts are board_counter() ticks (info: counter_hz, counter_unit). Any valid
 * frame but 'L' pauses live detection until 'L' or a reset. A bad frame gets an
 * 'e' reply and the parser hunts for the next A5 5A: the firmware stays up.
 */
#ifndef KWS_TEST_MODE_H
#define KWS_TEST_MODE_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define TM_MAGIC0 0xA5u
#define TM_MAGIC1 0x5Au
#define TM_MAX_PAYLOAD 32000u       /* one second of int16 audio */
#define TM_STREAM_MAX_SAMPLES 4096u
#define TM_TIMEOUT_MS 2000u

enum {
    TM_ERR_CRC = 1, TM_ERR_TOO_LONG = 2, TM_ERR_LENGTH = 3, TM_ERR_TYPE = 4,
    TM_ERR_TIMEOUT = 5, TM_ERR_UNSUPPORTED = 6, TM_ERR_MODEL = 7
};

void test_mode_init(void);

/* Read what the serial port has, handle every complete frame. Call from the main loop. */
void test_mode_poll(void);

/* zlib's CRC-32, continued from `crc` (start with 0). */
uint32_t tm_crc32(uint32_t crc, const void *data, size_t n);

#ifdef __cplusplus
}
#endif

#endif /* KWS_TEST_MODE_H */

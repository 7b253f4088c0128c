/* board.h: what the application needs from a board, and nothing more.
 *
 * One implementation per board in firmware/boards/<board>/ (the emulated
 * Cortex-M4 for tests, Nano 33 BLE Sense, ESP32-S3, Pico). Everything above
 * this line (features, model, recognizer, responder, test mode) is plain C99
 * and identical on every board.
 */
#ifndef KWS_BOARD_H
#define KWS_BOARD_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Serial port, microphone, counter. Called once by app_setup(). */
void board_init(void);

/* Short board name for the info reply and the boot line, e.g. "qemu_m4". */
const char *board_name(void);

/* Non-blocking read of up to `max` bytes received on the serial port; returns how many. */
size_t board_read(uint8_t *buf, size_t max);

/* Blocking write of `n` bytes to the serial port. */
void board_write(const void *buf, size_t n);

/* Milliseconds since boot (wraps after 49 days). */
uint32_t board_millis(void);

/* A free-running counter for latency (cycles, or SysTick ticks under QEMU), and its rate. */
uint32_t board_counter(void);
uint32_t board_counter_hz(void);

/* What board_counter counts: "cycles", "us" or "systick" (QEMU: host converts to instructions). */
const char *board_counter_unit(void);

/* Start the microphone; it calls audio_provider_write(..., AUDIO_SOURCE_MIC) as samples arrive.
 * Returns 0, or -1 when the board has no microphone (QEMU). */
int board_audio_start(void);

/* Leave: QEMU exits with `code` (semihosting); a real board resets. */
void board_exit(int code);

#ifdef __cplusplus
}
#endif

#endif /* KWS_BOARD_H */

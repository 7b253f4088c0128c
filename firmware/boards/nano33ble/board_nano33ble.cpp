/* board_nano33ble.cpp: board.h for the Arduino Nano 33 BLE Sense (nRF52840, Cortex-M4F, 64 MHz).
 *
 * Serial: native USB CDC (`Serial`). Microphone: the on-board MP34DT05 PDM mic
 * through the Arduino PDM library, mono 16 kHz int16, its callback feeding the
 * audio ring. Counter: the DWT cycle counter (64 MHz).
 *
 * Written against ArduinoCore-mbed (PlatformIO platform nordicnrf52, board
 * nano33ble); not compiled in tierkit's CI, which cannot download the platform.
 */
#include <Arduino.h>
#include <PDM.h>

#include "nrf.h"   /* CMSIS: DWT, CoreDebug, NVIC_SystemReset */

extern "C" {
#include "audio_provider.h"
#include "board.h"
#include "main_functions.h"
}

#ifndef KWS_PDM_GAIN
#define KWS_PDM_GAIN 20
#endif

static int16_t s_pdm[256];

static void on_pdm(void)
{
    int bytes = PDM.available();
    while (bytes > 0) {
        int n = bytes > (int)sizeof(s_pdm) ? (int)sizeof(s_pdm) : bytes;
        PDM.read(s_pdm, n);
        audio_provider_write(s_pdm, (uint32_t)(n / 2), AUDIO_SOURCE_MIC);
        bytes -= n;
    }
}

extern "C" void board_init(void)
{
    Serial.begin(115200);
    uint32_t t0 = millis();
    while (!Serial && millis() - t0 < 2000) {}   /* give a host 2 s to open the port; run without one */
    CoreDebug->DEMCR |= CoreDebug_DEMCR_TRCENA_Msk;
    DWT->CYCCNT = 0;
    DWT->CTRL |= DWT_CTRL_CYCCNTENA_Msk;
}

extern "C" const char *board_name(void) { return "nano33ble"; }

extern "C" size_t board_read(uint8_t *buf, size_t max)
{
    size_t n = 0;
    while (n < max && Serial.available() > 0) buf[n++] = (uint8_t)Serial.read();
    return n;
}

extern "C" void board_write(const void *buf, size_t n) { Serial.write((const uint8_t *)buf, n); }
extern "C" uint32_t board_millis(void) { return millis(); }
extern "C" uint32_t board_counter(void) { return DWT->CYCCNT; }
extern "C" uint32_t board_counter_hz(void) { return SystemCoreClock; }
extern "C" const char *board_counter_unit(void) { return "cycles"; }

extern "C" int board_audio_start(void)
{
    PDM.onReceive(on_pdm);
    if (!PDM.begin(1, 16000)) return -1;
    PDM.setGain(KWS_PDM_GAIN);
    return 0;
}

extern "C" void board_exit(int code)
{
    (void)code;
    Serial.flush();
    NVIC_SystemReset();
}

void setup() { app_setup(); }
void loop() { app_loop(); }

/* board_esp32s3.cpp: board.h for an ESP32-S3 DevKitC-1 with an I2S MEMS microphone (INMP441 or alike).
 *
 * Serial: the native USB port (USB CDC on boot; see platformio.ini). Microphone:
 * I2S0 master, 16 kHz, 32-bit slots, left channel (the INMP441 with L/R to GND),
 * read by a FreeRTOS task on core 0 while the pipeline runs on core 1; the
 * 24-bit samples are scaled to int16 with saturation (the features divide each
 * second by its peak, so the level does not matter, only that nothing clips).
 * Pins (override with -D): SCK/BCLK GPIO 41, WS/LRCL GPIO 42, SD/DOUT GPIO 2.
 * Counter: the CPU cycle counter (240 MHz).
 *
 * Written against arduino-esp32 2.x (ESP-IDF 4.4's legacy I2S driver; PlatformIO
 * platform espressif32); not compiled in tierkit's CI, which cannot download it.
 */
#include <Arduino.h>
#include <driver/i2s.h>

extern "C" {
#include "audio_provider.h"
#include "board.h"
#include "main_functions.h"
}

#ifndef KWS_I2S_SCK
#define KWS_I2S_SCK 41
#endif
#ifndef KWS_I2S_WS
#define KWS_I2S_WS 42
#endif
#ifndef KWS_I2S_SD
#define KWS_I2S_SD 2
#endif
#ifndef KWS_I2S_SHIFT
#define KWS_I2S_SHIFT 14   /* 32-bit slot -> int16: keep 18 of the 24 bits' dynamic range, saturate the rest */
#endif

static void mic_task(void *arg)
{
    static int32_t raw[256];
    static int16_t pcm[256];
    (void)arg;
    for (;;) {
        size_t bytes = 0;
        if (i2s_read(I2S_NUM_0, raw, sizeof(raw), &bytes, portMAX_DELAY) != ESP_OK) continue;
        size_t n = bytes / sizeof(int32_t);
        for (size_t i = 0; i < n; i++) {
            int32_t v = raw[i] >> KWS_I2S_SHIFT;
            pcm[i] = (int16_t)(v > 32767 ? 32767 : (v < -32768 ? -32768 : v));
        }
        audio_provider_write(pcm, (uint32_t)n, AUDIO_SOURCE_MIC);
    }
}

extern "C" void board_init(void)
{
    Serial.begin(115200);
    uint32_t t0 = millis();
    while (!Serial && millis() - t0 < 2000) {}
}

extern "C" const char *board_name(void) { return "esp32s3"; }

extern "C" size_t board_read(uint8_t *buf, size_t max)
{
    size_t n = 0;
    while (n < max && Serial.available() > 0) buf[n++] = (uint8_t)Serial.read();
    return n;
}

extern "C" void board_write(const void *buf, size_t n) { Serial.write((const uint8_t *)buf, n); }
extern "C" uint32_t board_millis(void) { return millis(); }
extern "C" uint32_t board_counter(void) { return ESP.getCycleCount(); }
extern "C" uint32_t board_counter_hz(void) { return getCpuFrequencyMhz() * 1000000u; }
extern "C" const char *board_counter_unit(void) { return "cycles"; }

extern "C" int board_audio_start(void)
{
    i2s_config_t cfg = {};
    cfg.mode = (i2s_mode_t)(I2S_MODE_MASTER | I2S_MODE_RX);
    cfg.sample_rate = 16000;
    cfg.bits_per_sample = I2S_BITS_PER_SAMPLE_32BIT;
    cfg.channel_format = I2S_CHANNEL_FMT_ONLY_LEFT;
    cfg.communication_format = I2S_COMM_FORMAT_STAND_I2S;
    cfg.intr_alloc_flags = ESP_INTR_FLAG_LEVEL1;
    cfg.dma_buf_count = 8;
    cfg.dma_buf_len = 256;
    cfg.use_apll = false;
    i2s_pin_config_t pins = {};
    pins.mck_io_num = I2S_PIN_NO_CHANGE;
    pins.bck_io_num = KWS_I2S_SCK;
    pins.ws_io_num = KWS_I2S_WS;
    pins.data_out_num = I2S_PIN_NO_CHANGE;
    pins.data_in_num = KWS_I2S_SD;
    if (i2s_driver_install(I2S_NUM_0, &cfg, 0, NULL) != ESP_OK) return -1;
    if (i2s_set_pin(I2S_NUM_0, &pins) != ESP_OK) return -1;
    return xTaskCreatePinnedToCore(mic_task, "kws_mic", 4096, NULL, 5, NULL, 0) == pdPASS ? 0 : -1;
}

extern "C" void board_exit(int code)
{
    (void)code;
    Serial.flush();
    esp_restart();
}

void setup() { app_setup(); }
void loop() { app_loop(); }

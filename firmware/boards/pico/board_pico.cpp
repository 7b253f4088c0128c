/* board_pico.cpp: board.h for the Raspberry Pi Pico (RP2040, Cortex-M0+, 133 MHz).
 *
 * The Pico has no microphone: wire an analog electret module (MAX9814 or
 * MAX4466, output biased at mid-supply) to GP26 / ADC0. The ADC free-runs at
 * 16 kHz (48 MHz / 3000) into a pair of DMA buffers; each completed buffer is
 * re-centred to int16 and fed to the audio ring from the DMA interrupt.
 * Serial: USB CDC. Counter: the 1 MHz timer (the M0+ has no cycle counter).
 *
 * Written against ArduinoCore-mbed for RP2040 (PlatformIO platform raspberrypi,
 * board pico) with the Pico SDK's hardware_adc / hardware_dma; not compiled in
 * tierkit's CI, which cannot download the platform.
 */
#include <Arduino.h>

#include "hardware/adc.h"
#include "hardware/dma.h"
#include "hardware/timer.h"

extern "C" {
#include "audio_provider.h"
#include "board.h"
#include "main_functions.h"
}

#ifndef KWS_ADC_GPIO
#define KWS_ADC_GPIO 26
#endif
#define BLOCK 320   /* 20 ms */

static uint16_t s_dma[2][BLOCK];
static int16_t s_pcm[BLOCK];
static int s_chan = -1;
static volatile int s_next;

static void on_dma(void)
{
    int done = s_next;
    dma_hw->ints0 = 1u << s_chan;                              /* acknowledge */
    s_next ^= 1;
    dma_channel_set_write_addr(s_chan, s_dma[s_next], true);   /* keep sampling into the other half */
    for (int i = 0; i < BLOCK; i++) s_pcm[i] = (int16_t)(((int32_t)(s_dma[done][i] & 0xFFF) - 2048) * 16);
    audio_provider_write(s_pcm, BLOCK, AUDIO_SOURCE_MIC);
}

extern "C" void board_init(void)
{
    Serial.begin(115200);
    uint32_t t0 = millis();
    while (!Serial && millis() - t0 < 2000) {}
}

extern "C" const char *board_name(void) { return "pico"; }

extern "C" size_t board_read(uint8_t *buf, size_t max)
{
    size_t n = 0;
    while (n < max && Serial.available() > 0) buf[n++] = (uint8_t)Serial.read();
    return n;
}

extern "C" void board_write(const void *buf, size_t n) { Serial.write((const uint8_t *)buf, n); }
extern "C" uint32_t board_millis(void) { return millis(); }
extern "C" uint32_t board_counter(void) { return time_us_32(); }
extern "C" uint32_t board_counter_hz(void) { return 1000000u; }
extern "C" const char *board_counter_unit(void) { return "us"; }

extern "C" int board_audio_start(void)
{
    adc_init();
    adc_gpio_init(KWS_ADC_GPIO);
    adc_select_input(KWS_ADC_GPIO - 26);
    adc_fifo_setup(true, true, 1, false, false);   /* FIFO on, DMA request per sample, 12 bits */
    adc_set_clkdiv(48000000.0f / 16000.0f - 1.0f);  /* one conversion every 3000 cycles of 48 MHz */
    s_chan = dma_claim_unused_channel(false);
    if (s_chan < 0) return -1;
    dma_channel_config c = dma_channel_get_default_config(s_chan);
    channel_config_set_transfer_data_size(&c, DMA_SIZE_16);
    channel_config_set_read_increment(&c, false);
    channel_config_set_write_increment(&c, true);
    channel_config_set_dreq(&c, DREQ_ADC);
    s_next = 0;
    dma_channel_configure(s_chan, &c, s_dma[0], &adc_hw->fifo, BLOCK, true);
    dma_channel_set_irq0_enabled(s_chan, true);
    NVIC_SetVector(DMA_IRQ_0_IRQn, (uint32_t)on_dma);
    NVIC_EnableIRQ(DMA_IRQ_0_IRQn);
    adc_run(true);
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

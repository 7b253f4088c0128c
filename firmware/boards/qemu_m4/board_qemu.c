/* board_qemu.c: board.h for the emulated Cortex-M4 (QEMU mps2-an386).
 *
 * Serial: CMSDK UART0, polled (QEMU puts it on a pseudo-terminal with -serial pty).
 * Counter: SysTick on the 25 MHz CPU clock, extended to 64 bits by counting
 * wraps. Under `-icount shift=0` QEMU's virtual clock advances exactly 1 ns per
 * guest instruction, so one tick is 40 instructions and the counts do not depend
 * on how busy the host is; the host multiplies (tiers/tier0/firmware.py).
 * Audio: none; the host streams it in test mode.
 */
#include "board.h"

#include "main_functions.h"
#include "qemu_m4.h"

static volatile uint32_t s_wraps;

void SysTick_Handler(void) { s_wraps++; }

/* Ticks since board_init. The wrap interrupt can be taken a few instructions after
 * the counter reloads: a pending SysTick with a freshly reloaded counter is a wrap
 * not counted yet. */
static uint64_t ticks(void)
{
    uint32_t w, v, pending;
    do {
        w = s_wraps;
        v = SYST_CVR;
        pending = SCB_ICSR & ICSR_PENDSTSET;
    } while (w != s_wraps);
    if (pending && v > 0x800000u) w++;
    return ((uint64_t)w << 24) + (0xFFFFFFu - v);
}

void board_init(void)
{
    UART0_BAUDDIV = 16;
    UART0_CTRL = 3u;                /* TX and RX on */
    SYST_RVR = 0xFFFFFFu;
    SYST_CVR = 0;
    SYST_CSR = 7u;                  /* enable, interrupt on wrap, CPU clock */
    while (SYST_CVR == 0) {}        /* the first tick loads the reload value */
}

const char *board_name(void) { return "qemu_m4"; }

size_t board_read(uint8_t *buf, size_t max)
{
    size_t n = 0;
    while (n < max && (UART0_STATE & 2u)) buf[n++] = (uint8_t)UART0_DATA;
    return n;
}

void board_write(const void *buf, size_t n)
{
    const uint8_t *p = (const uint8_t *)buf;
    while (n--) {
        while (UART0_STATE & 1u) {}
        UART0_DATA = *p++;
    }
}

uint32_t board_millis(void) { return (uint32_t)(ticks() / (QEMU_SYSCLK_HZ / 1000u)); }
uint32_t board_counter(void) { return (uint32_t)ticks(); }
uint32_t board_counter_hz(void) { return QEMU_SYSCLK_HZ; }
const char *board_counter_unit(void) { return "systick"; }
int board_audio_start(void) { return -1; }
void board_exit(int code) { qemu_exit(code); }

int main(void)
{
    app_setup();
    for (;;) app_loop();
}

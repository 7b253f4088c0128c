/* qemu_m4.h: registers of QEMU's mps2-an386 that the board support uses, and semihosting. */
#ifndef KWS_QEMU_M4_H
#define KWS_QEMU_M4_H

#include <stdint.h>

#define REG(addr) (*(volatile uint32_t *)(addr))

/* CMSDK APB UART0 */
#define UART0_DATA    REG(0x40004000u)
#define UART0_STATE   REG(0x40004004u)   /* bit 0: TX full, bit 1: RX full */
#define UART0_CTRL    REG(0x40004008u)   /* bit 0: TX enable, bit 1: RX enable */
#define UART0_BAUDDIV REG(0x40004010u)

/* System control */
#define SCB_CPACR REG(0xE000ED88u)
#define SCB_ICSR  REG(0xE000ED04u)
#define ICSR_PENDSTSET (1u << 26)
#define SYST_CSR  REG(0xE000E010u)
#define SYST_RVR  REG(0xE000E014u)
#define SYST_CVR  REG(0xE000E018u)

/* QEMU's mps2 boards clock the CPU (and SysTick with CLKSOURCE=1) at 25 MHz: under
 * `-icount shift=N` one tick is 40 / 2^N instructions (measured: tests/test_kws_firmware.py). */
#define QEMU_SYSCLK_HZ 25000000u

/* ARM semihosting: `bkpt 0xab` with the operation in r0 and its argument in r1. */
static inline int32_t qemu_semihost(int32_t op, const void *arg)
{
    register int32_t r0 __asm("r0") = op;
    register const void *r1 __asm("r1") = arg;
    __asm volatile("bkpt 0xab" : "+r"(r0) : "r"(r1) : "memory");
    return r0;
}

/* SYS_WRITE0: a NUL-terminated string to QEMU's stdout/stderr (not the UART). */
static inline void qemu_puts(const char *s) { qemu_semihost(0x04, s); }

/* SYS_EXIT_EXTENDED (ADP_Stopped_ApplicationExit, code): QEMU exits with `code`. */
static inline void qemu_exit(int code)
{
    uint32_t block[2];
    block[0] = 0x20026u;
    block[1] = (uint32_t)code;
    qemu_semihost(0x20, block);
    for (;;) {}
}

#endif /* KWS_QEMU_M4_H */

/* startup.c: reset and exception vectors of the emulated Cortex-M4 (QEMU mps2-an386).
 *
 * What a Cortex-M needs before C runs: the initial stack pointer and reset
 * address in the first two words (the vector table at 0x0), .data copied from
 * flash, .bss zeroed, and the FPU switched on (CPACR: full access to CP10 and
 * CP11), since the features use float. No C library start-up: main() is ours.
 */
#include <stdint.h>

#include "qemu_m4.h"

extern uint32_t _sidata, _sdata, _edata, _sbss, _ebss, _estack;
int main(void);

void Reset_Handler(void);
void Fault_Handler(void);
void Default_Handler(void);
void SysTick_Handler(void);

__attribute__((section(".isr_vector"), used)) static void (*const vectors[16 + 32])(void) = {
    (void (*)(void))(&_estack),
    Reset_Handler,
    Default_Handler,   /* NMI */
    Fault_Handler,     /* HardFault */
    Fault_Handler,     /* MemManage */
    Fault_Handler,     /* BusFault */
    Fault_Handler,     /* UsageFault */
    0, 0, 0, 0,
    Default_Handler,   /* SVCall */
    Default_Handler,   /* DebugMon */
    0,
    Default_Handler,   /* PendSV */
    SysTick_Handler,
    /* 32 external interrupts: none enabled */
};

void Reset_Handler(void)
{
    uint32_t *src = &_sidata, *dst = &_sdata;
    while (dst < &_edata) *dst++ = *src++;
    for (dst = &_sbss; dst < &_ebss; dst++) *dst = 0;
    SCB_CPACR |= (0xFu << 20);   /* CP10, CP11: full access */
    __asm volatile("dsb\n isb" ::: "memory");
    main();
    qemu_exit(0);
}

void Fault_Handler(void)
{
    qemu_puts("tierkit kws firmware: fault (HardFault/MemManage/BusFault/UsageFault)\n");
    qemu_exit(3);
}

void Default_Handler(void)
{
    qemu_puts("tierkit kws firmware: unexpected exception\n");
    qemu_exit(4);
}

/* newlib's libc references these when some of its objects are linked; nothing to do here. */
void _init(void) {}
void _fini(void) {}

/*
 * serial.c — COM1 (0x3f8) from CPL 3. Output is one `outb` to THR per byte,
 * with no LSR polling (every port access is a VM exit of ~25 µs here, and the
 * VMMs' UARTs never hold output). Input polls LSR.DR, for the shell job.
 */
#include "guest.h"

#define COM1 0x3f8

int serial_mid_line;

void serial_write(const char *s, int n)
{
    for (int i = 0; i < n; i++)
        outb(COM1, (u8)s[i]);
    if (n > 0)
        serial_mid_line = s[n - 1] != '\n';
}

int serial_getc(void)
{
    if (!(inb(COM1 + 5) & 1))
        return -1;
    return inb(COM1);
}

/* One string I/O instruction for the whole buffer: a single exit if the VMM
 * handles KVM_EXIT_IO with count > 1 (QEMU does). Used by the probe job. */
void serial_write_rep(const char *s, int n)
{
    __asm__ volatile("rep outsb" : "+S"(s), "+c"(n) : "d"(COM1) : "memory");
}

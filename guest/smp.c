/*
 * smp.c — LAPIC set-up, the Intel MP table (floating pointer + configuration
 * table, checksums verified) and AP bring-up with INIT-SIPI-SIPI to the real-
 * mode trampoline in boot.S, copied to 0x8000. All of it runs at CPL 3; the
 * APs themselves count in and park (cli; hlt) at CPL 0.
 */
#include "guest.h"

#define LAPIC_BASE 0xfee00000ull
#define LAPIC_ID 0x020
#define LAPIC_TPR 0x080
#define LAPIC_SVR 0x0f0
#define LAPIC_ICR_LO 0x300
#define LAPIC_ICR_HI 0x310
#define LAPIC_LVT0 0x350
#define SPURIOUS_VECTOR 0x3f
#define TRAMPOLINE 0x8000
#define MAX_CPUS 64

static u64 ioapic = 0xfec00000ull;
static u8 cpu_ids[MAX_CPUS]; /* enabled processors from the MP table */
static int ncpu_entries, mp_found, aps_started, cpus_up = 1;
static u32 isa_buses;        /* bit n: bus id n is ISA */
static u8 isa_pin[16];       /* ISA IRQ -> IOAPIC pin + 1 (0: no I/O interrupt entry) */

u64 lapic_base(void) { return LAPIC_BASE; }
u64 ioapic_base(void) { return ioapic; }

u32 ioapic_read(u32 reg)
{
    mmio_w32(ioapic, reg);
    return mmio_r32(ioapic + 0x10);
}

void ioapic_write(u32 reg, u32 v)
{
    mmio_w32(ioapic, reg);
    mmio_w32(ioapic + 0x10, v);
}

/* The IOAPIC pin of an ISA IRQ: from the MP table's I/O interrupt entries if
 * it has one for that IRQ, else identity (what both VMMs wire). */
u32 isa_irq_pin(u32 irq) { return irq < 16 && isa_pin[irq] ? isa_pin[irq] - 1u : irq; }

void lapic_init(void)
{
    mmio_w32(LAPIC_BASE + LAPIC_SVR, 0x100 | SPURIOUS_VECTOR); /* software enable */
    mmio_w32(LAPIC_BASE + LAPIC_LVT0, 0x10000);               /* mask LINT0 (8259) */
}

static int csum_ok(const u8 *p, u32 n)
{
    u8 s = 0;
    for (u32 i = 0; i < n; i++)
        s += p[i];
    return s == 0;
}

static u64 mp_scan(u64 start, u64 len)
{
    for (u64 a = start; a + 16 <= start + len; a += 16) {
        const u8 *p = (const u8 *)a;
        if (p[0] == '_' && p[1] == 'M' && p[2] == 'P' && p[3] == '_' && p[8] >= 1 &&
            csum_ok(p, p[8] * 16u))
            return a;
    }
    return 0;
}

/* Find and validate the MP table once, at boot (before jobs reuse RAM). */
void mp_parse(void)
{
    u64 ebda = (u64)*(volatile u16 *)0x40e << 4;
    u64 fp = 0;
    if (ebda >= 0x400 && ebda < 0xa0000)
        fp = mp_scan(ebda, 1024);
    if (!fp)
        fp = mp_scan(0x9fc00, 0x400);
    if (!fp)
        fp = mp_scan(0xf0000, 0x10000);
    if (!fp)
        return;
    u32 cfg = *(const u32 *)(fp + 4);
    if (cfg == 0 || cfg >= 0xfff00000u) {
        say("MP floating pointer at 0x%lx has no configuration table (default config %u unsupported)",
            fp, *(const u8 *)(fp + 11));
        return;
    }
    const u8 *t = (const u8 *)(u64)cfg;
    u16 len = *(const u16 *)(t + 4); /* like Linux, walk by length: qboot leaves the count 0 */
    if (t[0] != 'P' || t[1] != 'C' || t[2] != 'M' || t[3] != 'P' || len < 44 || !csum_ok(t, len)) {
        say("MP configuration table at 0x%x is invalid", cfg);
        return;
    }
    mp_found = 1;
    const u8 *e = t + 44, *end = t + len;
    while (e < end) {
        if (e[0] == 0) { /* processor: type, id, version, flags (EN=1, BP=2) */
            if (e + 20 > end)
                break;
            if ((e[3] & 1) && ncpu_entries < MAX_CPUS)
                cpu_ids[ncpu_entries++] = e[1];
            e += 20;
        } else if (e[0] <= 4) {
            if (e + 8 > end)
                break;
            if (e[0] == 1 && e[1] < 32 && e[2] == 'I' && e[3] == 'S' && e[4] == 'A') /* bus "ISA   " */
                isa_buses |= 1u << e[1];
            if (e[0] == 2 && (e[3] & 1)) /* I/O APIC, enabled */
                ioapic = *(const u32 *)(e + 4);
            /* I/O interrupt (type 3), INT: bus, bus IRQ, IOAPIC id, pin. Buses come first. */
            if (e[0] == 3 && e[1] == 0 && e[4] < 32 && (isa_buses >> e[4] & 1) && e[5] < 16 && e[7] < 255)
                isa_pin[e[5]] = (u8)(e[7] + 1);
            e += 8;
        } else {
            say("MP table: unknown entry type %u", e[0]);
            break;
        }
    }
}

static void icr_send(u32 dest, u32 lo)
{
    mmio_w32(LAPIC_BASE + LAPIC_ICR_HI, dest << 24);
    mmio_w32(LAPIC_BASE + LAPIC_ICR_LO, lo);
    for (int i = 0; i < 1000 && (mmio_r32(LAPIC_BASE + LAPIC_ICR_LO) & (1u << 12)); i++)
        cpu_relax(); /* delivery pending (never, on KVM's LAPIC) */
}

static void delay_us(u64 us)
{
    u64 end = clock_ns() + us * 1000;
    while (clock_ns() < end)
        cpu_relax();
}

int smp_cpus(void) { return cpus_up; }

int smp_start_aps(void)
{
    if (aps_started || !mp_found)
        return cpus_up;
    aps_started = 1;
    u32 bsp = mmio_r32(LAPIC_BASE + LAPIC_ID) >> 24;
    int want = 0;
    memcpy((void *)TRAMPOLINE, ap_tramp_start, (size_t)(ap_tramp_end - ap_tramp_start));
    mb();
    for (int i = 0; i < ncpu_entries; i++) {
        if (cpu_ids[i] == bsp)
            continue;
        want++;
        icr_send(cpu_ids[i], 0xc500); /* INIT, level, assert */
        icr_send(cpu_ids[i], 0x8500); /* INIT, level, de-assert */
    }
    if (!want)
        return cpus_up;
    delay_us(100);
    u64 t0 = clock_ns();
    for (int round = 0; round < 2; round++) {
        for (int i = 0; i < ncpu_entries; i++)
            if (cpu_ids[i] != bsp)
                icr_send(cpu_ids[i], 0x4600 | (TRAMPOLINE >> 12)); /* SIPI */
        /* A started AP ignores the second SIPI. Bounded wait: 10 ms, then 1 s. */
        u64 limit = t0 + (round ? 1000000000ull : 10000000ull);
        while (boot_ap_count < (u32)want && clock_ns() < limit)
            cpu_relax();
        if (boot_ap_count >= (u32)want)
            break;
    }
    cpus_up = 1 + (int)boot_ap_count;
    if (cpus_up != 1 + want)
        say("only %d of %d APs came up", cpus_up - 1, want);
    return cpus_up;
}

/*
 * main.c — CPL 3 start: boot information (hvm_start_info: command line and
 * memory map), kvm-clock, boot id, the "@godwit" output contract, the job
 * loop, the final "done" line and power-off, and the fault reporter.
 */
#include "guest.h"

#define HVM_START_MAGIC 0x336ec578
#define MAX_CMDLINE 4096
#define MAX_ARGS 128
#define MAX_JOBS 32
#define DEBUG_EXIT_PORT 0xf4

struct hvm_start_info {
    u32 magic, version, flags, nr_modules;
    u64 modlist_paddr, cmdline_paddr, rsdp_paddr, memmap_paddr;
    u32 memmap_entries, reserved;
};
struct hvm_memmap_entry {
    u64 addr, size;
    u32 type, reserved;
};
struct pvclock_vcpu_time_info {
    u32 version, pad0;
    u64 tsc_timestamp, system_time;
    u32 tsc_to_system_mul;
    int8_t tsc_shift;
    u8 flags, pad[2];
};
extern volatile struct pvclock_vcpu_time_info pvclock;

u64 boot_id;
u64 ram_bytes;
u64 heap_base, heap_end;
static u64 heap_ptr;
static char cmdline[MAX_CMDLINE];
static u64 last_ns;
u64 main_ns;

/* ------------------------------------------------------------ kvm-clock */

/* pvclock_scale_delta() as in Linux. */
static u64 pvclock_scale(u64 delta, u32 mul, int8_t shift)
{
    if (shift < 0)
        delta >>= -shift;
    else
        delta <<= shift;
    return (u64)(((unsigned __int128)delta * mul) >> 32);
}

/* Linux pvclock_clocksource_read() without the monotonic fix-up: going
 * backwards is exactly what the guest is here to detect. */
static u64 pvclock_read(void)
{
    u32 version;
    u64 ns;
    do {
        version = pvclock.version;
        barrier();
        u64 delta = rdtsc() - pvclock.tsc_timestamp;
        ns = pvclock.system_time + pvclock_scale(delta, pvclock.tsc_to_system_mul, pvclock.tsc_shift);
        barrier();
    } while ((version & 1) || version != pvclock.version);
    return ns;
}

u64 tsc_to_ns(u64 tsc)
{
    u64 ts = pvclock.tsc_timestamp, st = pvclock.system_time;
    u32 mul = pvclock.tsc_to_system_mul;
    int8_t sh = pvclock.tsc_shift;
    return tsc >= ts ? st + pvclock_scale(tsc - ts, mul, sh) : st - MIN(st, pvclock_scale(ts - tsc, mul, sh));
}

static void emit_at(u64 ns, const char *job, const char *f, va_list ap);
static void emit_at_v(u64 ns, const char *job, const char *f, ...)
{
    va_list ap;
    va_start(ap, f);
    emit_at(ns, job, f, ap);
    va_end(ap);
}

static NORETURN void poweroff(int pass)
{
    outb(DEBUG_EXIT_PORT, pass ? 0x10 : 0x11);
    for (;;)
        cpu_relax();
}

u64 clock_ns(void)
{
    /* Every wait loop of the guest reads the clock: the one place where a
     * keyboard interrupt (the host's Ctrl-Alt-Del) is noticed. A memory read. */
    if (boot_kbd_count != kbd_seen)
        kbd_irq();
    if (!boot_kvmclock_ok)
        return 0;
    u64 now = pvclock_read();
    if (now < last_ns) {
        u64 prev = last_ns;
        boot_kvmclock_ok = 0; /* no more readings: report with the values we have */
        emit_at_v(now, "clock", "error=backwards prev_us=%lu now_us=%lu", prev / 1000, now / 1000);
        emit_at_v(now, "done", "status=fail reason=clock-backwards");
        poweroff(0);
    }
    last_ns = now;
    return now;
}

u64 clock_us(void) { return clock_ns() / 1000; }

/* --------------------------------------------------------------- output */

static void emit_at(u64 ns, const char *job, const char *f, va_list ap)
{
    char line[1024];
    int n = fmt(line, sizeof line - 2, "@godwit job=%s boot=%016lx t_us=%lu", job, boot_id, ns / 1000);
    if (f && *f) {
        line[n++] = ' ';
        n += vfmt(line + n, (int)sizeof line - 1 - n, f, ap);
    }
    line[n++] = '\n';
    serial_write(line, n);
}

void emit(const char *job, const char *f, ...)
{
    va_list ap;
    u64 now = clock_ns();
    va_start(ap, f);
    emit_at(now, job, f, ap);
    va_end(ap);
}

void say(const char *f, ...)
{
    char line[256];
    va_list ap;
    va_start(ap, f);
    int n = fmt(line, sizeof line, "godwit: ");
    n += vfmt(line + n, (int)sizeof line - 1 - n, f, ap);
    va_end(ap);
    line[n++] = '\n';
    serial_write(line, n);
}

NORETURN void finish(int pass, const char *reason)
{
    if (pass && reason && *reason)
        emit("done", "status=pass reason=%s", reason);
    else if (pass)
        emit("done", "status=pass");
    else
        emit("done", "status=fail reason=%s", reason && *reason ? reason : "unknown");
    poweroff(pass);
}

/* -------------------------------------------------------- free RAM heap */

void heap_reset(void) { heap_ptr = heap_base; }

void *heap_alloc(u64 size, u64 align)
{
    u64 p = (heap_ptr + align - 1) & ~(align - 1);
    if (p < heap_ptr || p + size < p || p + size > heap_end)
        return 0;
    heap_ptr = p + size;
    return (void *)p;
}

/* Memory kept for the whole boot (virtqueues, packet buffers): taken from
 * the bottom of the free RAM before any job runs, so no job reuses it. */
void *perm_alloc(u64 size, u64 align)
{
    void *p = heap_alloc(size, align);
    if (p)
        heap_base = heap_ptr;
    return p;
}

/* ------------------------------------------------------------ boot info */

static void read_start_info(void)
{
    const struct hvm_start_info *si = (const void *)(u64)boot_start_info;
    int have_map = 0;
    u64 image_end = (u64)__image_end;
    heap_base = (image_end + (2u << 20) - 1) & ~(u64)((2u << 20) - 1);

    if (!si || si->magic != HVM_START_MAGIC) {
        say("no valid hvm_start_info at 0x%x", boot_start_info);
    } else {
        if (si->cmdline_paddr && si->cmdline_paddr < (4ull << 30)) {
            const char *c = (const char *)si->cmdline_paddr;
            int i = 0;
            for (; i < MAX_CMDLINE - 1 && c[i]; i++)
                cmdline[i] = c[i];
            cmdline[i] = 0;
        }
        if (si->version >= 1 && si->memmap_paddr && si->memmap_paddr < (4ull << 30) && si->memmap_entries <= 1024) {
            const struct hvm_memmap_entry *e = (const void *)si->memmap_paddr;
            for (u32 i = 0; i < si->memmap_entries; i++) {
                if (e[i].type != 1)
                    continue;
                have_map = 1;
                ram_bytes += e[i].size;
                u64 s = e[i].addr, end = e[i].addr + e[i].size;
                if (end > (4ull << 30))
                    end = 4ull << 30; /* identity map covers 4 GiB */
                if (s <= heap_base && end > heap_base && end > heap_end)
                    heap_end = end;
            }
        }
    }
    if (!have_map) {
        ram_bytes = 64ull << 20;
        heap_end = 64ull << 20;
    }
    if (heap_end < heap_base)
        heap_end = heap_base;
    heap_reset();
}

static void make_boot_id(void)
{
    if (boot_cpuid1_ecx & (1u << 30)) { /* RDRAND */
        for (int i = 0; i < 32; i++) {
            u64 v;
            u8 ok;
            __asm__ volatile("rdrand %0; setc %1" : "=r"(v), "=qm"(ok));
            if (ok) {
                boot_id = v;
                return;
            }
        }
    }
    boot_id = mix64(rdtsc() ^ mix64(clock_ns()) ^ mix64((u64)boot_start_info));
}

/* ---------------------------------------------------------------- main */

char job_fail_reason[64];
int jobs_stop; /* set by the shell's poweroff */

void guest_main(void)
{
    memset(__bss_start, 0, (size_t)(__bss_end - __bss_start));
    read_start_info();
    mp_parse(); /* before any job reuses RAM */
    make_boot_id();
    if (!boot_kvmclock_ok) {
        emit("clock", "error=no-kvmclock kvm_features=0x%x", boot_kvm_features);
        finish(0, "no-kvmclock");
    }
    main_ns = clock_ns();
    lapic_init();
    kbd_init();

    /* Split the command line into words; collect devices and jobs. */
    char *argv[MAX_ARGS], *jobs[MAX_JOBS];
    int argc = 0, njobs = 0;
    for (char *p = cmdline; *p;) {
        while (*p == ' ' || *p == '\t' || *p == '\n')
            *p++ = 0;
        if (!*p)
            break;
        if (argc < MAX_ARGS)
            argv[argc++] = p;
        while (*p && *p != ' ' && *p != '\t' && *p != '\n')
            p++;
    }
    for (int i = 0; i < argc; i++)
        if (strneq(argv[i], "godwit.job=", 11) && njobs < MAX_JOBS)
            jobs[njobs++] = argv[i] + 11;
    net_config_args(argv, argc);
    virtio_probe_args(argv, argc);
    heap_reset();

    static char ready[] = "ready";
    if (njobs == 0)
        jobs[njobs++] = ready;
    for (int i = 0; i < njobs && !jobs_stop; i++) {
        heap_reset();
        if (run_job(jobs[i]))
            finish(0, job_fail_reason);
    }
    if (virtio_errors())
        finish(0, "virtio");
    finish(1, 0);
}

/* Entered at CPL 3 (fresh stack) after any exception or unexpected vector. */
void fault_report(void)
{
    static const char nl = '\n';
    serial_write(&nl, 1);
    emit("fault", "vector=%lu error=0x%lx rip=0x%lx cs=0x%lx rsp=0x%lx cr2=0x%lx",
         boot_fault[0], boot_fault[1], boot_fault[2], boot_fault[3], boot_fault[4], boot_fault[5]);
    finish(0, "fault");
}

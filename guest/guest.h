/*
 * guest.h — shared declarations for the Godwit test guest (all C runs at CPL 3).
 */
#ifndef GUEST_H
#define GUEST_H

#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

typedef uint8_t u8;
typedef uint16_t u16;
typedef uint32_t u32;
typedef uint64_t u64;
typedef int64_t i64;

#define NORETURN __attribute__((noreturn))
#define barrier() __asm__ volatile("" ::: "memory")
#define mb() __asm__ volatile("mfence" ::: "memory")
#define MIN(a, b) ((a) < (b) ? (a) : (b))
#define MAX(a, b) ((a) > (b) ? (a) : (b))

static inline void outb(u16 port, u8 v) { __asm__ volatile("outb %0, %1" ::"a"(v), "Nd"(port)); }
static inline u8 inb(u16 port) { u8 v; __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port)); return v; }
static inline void cpu_relax(void) { __asm__ volatile("pause" ::: "memory"); }
static inline u32 mmio_r32(u64 a) { return *(volatile u32 *)a; }
static inline void mmio_w32(u64 a, u32 v) { *(volatile u32 *)a = v; }
static inline u64 rdtsc(void)
{
    u32 lo, hi;
    __asm__ volatile("lfence; rdtsc" : "=a"(lo), "=d"(hi)::"memory");
    return ((u64)hi << 32) | lo;
}

/* Set at CPL 0 by boot.S. */
extern volatile u32 boot_start_info, boot_cpuid1_ecx, boot_kvm_features, boot_kvmclock_ok;
extern volatile u32 boot_ap_count, boot_fault_depth;
extern volatile u32 boot_irq_count[8];
extern volatile u64 boot_fault[6];
extern volatile u64 boot_entry_tsc;
extern char ap_tramp_start[], ap_tramp_end[];
extern char __image_start[], __image_end[], __bss_start[], __bss_end[];

/* lib.c */
void *memset(void *d, int c, size_t n);
void *memcpy(void *d, const void *s, size_t n);
void *memmove(void *d, const void *s, size_t n);
int memcmp(const void *a, const void *b, size_t n);
size_t strlen(const char *s);
int streq(const char *a, const char *b);
int strneq(const char *a, const char *b, size_t n);  /* first n bytes equal */
int vfmt(char *buf, int cap, const char *fmt, va_list ap);
int fmt(char *buf, int cap, const char *fmt, ...);
int parse_u64(const char *s, const char **end, u64 *out);  /* base 0 (0x, 0, dec) */
int parse_size(const char *s, const char **end, u64 *out); /* + K/M/G suffix */
u64 mix64(u64 x);                                          /* splitmix64 finalizer */
void sort_u32(u32 *a, u64 n);

/* serial.c */
void serial_write(const char *s, int n);
void serial_write_rep(const char *s, int n);
int serial_getc(void); /* -1 if nothing pending */

/* main.c: clock, output contract, globals */
extern u64 boot_id;
extern u64 ram_bytes;         /* RAM per the memmap */
extern u64 heap_base, heap_end; /* free RAM above the image, for jobs */
u64 clock_ns(void);          /* kvm-clock; fails the boot if it goes backwards */
u64 clock_us(void);
u64 tsc_to_ns(u64 tsc);      /* kvm-clock time of an earlier TSC reading */
extern u64 main_ns;          /* kvm-clock at guest_main */
void emit(const char *job, const char *fmt, ...);   /* "@godwit job=..." line */
void say(const char *fmt, ...);                     /* chatter line */
NORETURN void finish(int pass, const char *reason);
void *heap_alloc(u64 size, u64 align);  /* job-scoped bump allocator; 0 if no RAM */
void heap_reset(void);

/* smp.c */
int smp_start_aps(void);     /* returns number of vCPUs up (incl. BSP) */
int smp_cpus(void);
u64 lapic_base(void);
u64 ioapic_base(void);
void lapic_init(void);

/* virtio.c */
#define MAX_VIRTIO 8
struct blkdev;
void virtio_probe_args(char **argv, int argc); /* virtio_mmio.device= words */
int blk_count(void);
struct blkdev *blk_get(int i);
u64 blk_capacity(struct blkdev *d); /* sectors */
u64 blk_base(struct blkdev *d);
int blk_ro(struct blkdev *d);
const char *blk_describe(struct blkdev *d, char *buf, int cap);
int virtio_errors(void);

/* Synchronous and queued I/O. Returns 0 ok, >0 virtio status, <0 error (see blk_error). */
#define VIRTIO_BLK_T_IN 0
#define VIRTIO_BLK_T_OUT 1
#define VIRTIO_BLK_T_FLUSH 4
#define VIRTIO_BLK_S_OK 0
#define VIRTIO_BLK_S_IOERR 1
#define VIRTIO_BLK_S_UNSUPP 2
int blk_set_mode(struct blkdev *d, int irq_mode);
int blk_slots(struct blkdev *d);
int blk_submit(struct blkdev *d, u32 type, u64 sector, void *buf, u32 len); /* slot or <0 */
void blk_kick(struct blkdev *d);
/* Wait for >= 1 completion; reports each via cb(slot, status, ctx). 0 ok, <0 error. */
int blk_complete(struct blkdev *d, void (*cb)(int slot, int status, void *ctx), void *ctx);
int blk_rw(struct blkdev *d, u32 type, u64 sector, void *buf, u32 len);
int blk_has_flush(struct blkdev *d);
const char *blk_error(struct blkdev *d);

/* jobs.c */
int run_job(char *spec);    /* 0 pass, else fail; sets job_fail_reason */
extern char job_fail_reason[64];
extern int jobs_stop;
void mp_parse(void);

#endif

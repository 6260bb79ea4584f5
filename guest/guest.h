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
extern volatile u32 boot_kbd_count;  /* i8042 interrupts (vector 0x38) */
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
extern int serial_mid_line;  /* the last byte written was not '\n' */
void serial_write(const char *s, int n);
void serial_write_rep(const char *s, int n);
int serial_getc(void); /* -1 if nothing pending */

/* main.c: clock, output contract, globals */
extern u64 boot_id;
extern u64 ram_bytes;         /* RAM per the memmap */
extern u64 heap_base, heap_end; /* free RAM above the image, for jobs */
u64 clock_ns(void);          /* kvm-clock; fails the boot if it goes backwards; handles Ctrl-Alt-Del */
u64 clock_us(void);
u64 tsc_to_ns(u64 tsc);      /* kvm-clock time of an earlier TSC reading */
extern u64 main_ns;          /* kvm-clock at guest_main */
void emit(const char *job, const char *fmt, ...);   /* "@godwit job=..." line */
void say(const char *fmt, ...);                     /* chatter line */
NORETURN void finish(int pass, const char *reason); /* pass with a reason: "status=pass reason=R" */
void *heap_alloc(u64 size, u64 align);  /* job-scoped bump allocator; 0 if no RAM */
void heap_reset(void);
void *perm_alloc(u64 size, u64 align);  /* for the whole boot (device rings, buffers); probe time only */

/* smp.c */
int smp_start_aps(void);     /* returns number of vCPUs up (incl. BSP) */
int smp_cpus(void);
u64 lapic_base(void);
u64 ioapic_base(void);
u32 ioapic_read(u32 reg);
void ioapic_write(u32 reg, u32 v);
u32 isa_irq_pin(u32 irq);    /* IOAPIC pin per the MP table (default: the same number) */
void lapic_init(void);

/* kbd.c: the i8042 keyboard, for the host's Ctrl-Alt-Del */
extern u32 kbd_seen;         /* boot_kbd_count last handled */
void kbd_init(void);         /* IOAPIC pin of ISA IRQ 1 -> vector 0x38; drains stale bytes */
void kbd_irq(void);          /* called by clock_ns() when boot_kbd_count moved */

/* virtio.c: transport and probing; blk.c, vnet.c: the drivers */
#define MAX_VIRTIO 8
struct blkdev;
void virtio_probe_args(char **argv, int argc); /* virtio_mmio.device= words */
int virtio_errors(void);
int blk_count(void);
struct blkdev *blk_get(int i);
u64 blk_capacity(struct blkdev *d); /* sectors; re-read after a config-change interrupt */
int blk_read_capacity(struct blkdev *d); /* re-read config space now (generation-checked); 0 ok */
u64 blk_config_irqs(struct blkdev *d);   /* config-change notices (InterruptStatus bit 1) seen */
int blk_wait_config(struct blkdev *d, u64 deadline_ns); /* irq mode: 1 interrupt (capacity re-read after a
                                                          config change), 0 deadline, -1 error */
u64 blk_base(struct blkdev *d);
int blk_ro(struct blkdev *d);
const char *blk_describe(struct blkdev *d, char *buf, int cap);

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

/* Frames dropped, by reason (names in net.c, drop_names). */
enum {
    D_RX_LEN, D_HDR, D_MRG, D_RUNT, D_TOO_LONG, D_MAC, D_SRC, D_ETHERTYPE, D_ARP_SHORT, D_ARP_BAD,
    D_IP_SHORT, D_IP_VERSION, D_IP_HLEN, D_IP_LEN, D_IP_CSUM, D_IP_FRAG, D_IP_DST, D_IP_PROTO,
    D_ICMP_SHORT, D_ICMP_CSUM, D_ICMP_TYPE, D_UDP_SHORT, D_UDP_LEN, D_UDP_CSUM, D_UDP_PORT, D_TX_FULL,
    D_COUNT
};
struct net_stats {
    u64 rx_frames, tx_frames;     /* every frame taken from / given to the device */
    u64 arp, icmp, udp_echo;      /* ARP replies, ICMP echo replies, UDP echo replies sent */
    u64 dropped, csum_partial;    /* dropped = sum of drop[] */
    u64 notifies, irqs;           /* QueueNotify writes (RX + TX), interrupts taken: up to date after nic_stats() */
    u64 drop[D_COUNT];
};

/* vnet.c: virtio-net (RX queue 0, TX queue 1; 12-byte virtio_net_hdr_v1) */
#define NET_MAX_FRAME 1514           /* Ethernet header + 1500 (no FCS) */
struct nic;
int nic_count(void);
struct nic *nic_get(int i);
const u8 *nic_mac(struct nic *n);
int nic_link_up(struct nic *n);      /* 1 without VIRTIO_NET_F_STATUS */
const char *nic_describe(struct nic *n, char *buf, int cap);
const char *nic_error(struct nic *n);
struct net_stats *nic_stats(struct nic *n);
int nic_set_mode(struct nic *n, int irq_mode);
/* Takes up to budget received frames; cb(ctx, frame, len, virtio hdr flags) for each good one,
 * then gives the buffers back. Returns frames taken (incl. dropped ones) or -1 (device error). */
int nic_rx(struct nic *n, int budget, void (*cb)(void *ctx, u8 *frame, u32 len, u8 flags), void *ctx);
u8 *nic_tx_alloc(struct nic *n);                   /* room for one frame (NET_MAX_FRAME), or 0: ring full */
void nic_tx_submit(struct nic *n, u8 *frame, u32 len); /* to the avail ring; not yet notified */
void nic_tx_abort(struct nic *n, u8 *frame);
void nic_tx_kick(struct nic *n);
int nic_tx_reclaim(struct nic *n);                 /* completions taken, or -1 */
int nic_tx_inflight(struct nic *n);
int nic_tx_free(struct nic *n);
/* Until a used entry is pending on RX (or TX, with want_tx) or the deadline: polls the rings,
 * or in irq mode waits for the interrupt. Returns 1 (work) or 0 (deadline). */
int nic_wait(struct nic *n, u64 deadline_ns, int want_tx);
/* VIRTIO_NET_F_GUEST_ANNOUNCE: 1 when the device asks the driver to announce itself (read after a
 * configuration change, or every 20 ms when polled); nic_announce_ack sends ANNOUNCE_ACK and waits
 * for the answer: 0 ok, 1 refused, -1 device error. nic_wait returns 1 when a status poll is due. */
int nic_announce_pending(struct nic *n);
int nic_status_poll_due(struct nic *n);
int nic_announce_ack(struct nic *n);
u64 nic_announces(struct nic *n);
void nic_announce_retry(struct nic *n);            /* look at the status again on the next poll */
void fmt_mac(char *buf, const u8 *mac);            /* "aa:bb:cc:dd:ee:ff", buf >= 18 bytes */

/* net.c: Ethernet, ARP, IPv4, ICMP echo, UDP (echo on port 7) on the first NIC */
void net_config_args(char **argv, int argc);       /* godwit.ip=, godwit.net_rxbuf= */
u32 net_rxbuf_size(void);
const char *net_ip_string(char *buf, int cap);      /* "A.B.C.D/P" of the first NIC */

/* jobs.c */
#define MAX_KEYS 16
struct args {
    const char *job;
    int n;
    char *key[MAX_KEYS], *val[MAX_KEYS];
    u8 used[MAX_KEYS];
    const char *bad_key, *bad_what;
};
int job_error(const char *job, const char *what, const char *extra_fmt, ...);
u64 arg_num(struct args *a, const char *k, u64 def, u64 min, u64 max);
const char *arg_str(struct args *a, const char *k, const char *def);
int args_check(struct args *a);
int arg_mode(struct args *a);
void wait_until(u64 t);
int run_job(char *spec);    /* 0 pass, else fail; sets job_fail_reason */
extern char job_fail_reason[64];
extern int jobs_stop;
void mp_parse(void);

/* net.c: the network jobs */
int job_net_echo(struct args *a);
int job_net_send(struct args *a);
int job_net_recv(struct args *a);
int job_net_ping(struct args *a);
/* idle,net=1: the stack served between heartbeats. begin parses mode= (before args_check),
 * start brings the NIC up (0, or 1 with the job's error line printed), poll serves it once
 * (-1 on a device error, with the error line printed), end returns the ICMP echo replies sent. */
void net_serve_begin(struct args *a);
int net_serve_start(void);
int net_serve_poll(void);
u64 net_serve_end(void);

#endif

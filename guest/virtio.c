/*
 * virtio.c — modern (version 2) virtio-mmio transport and a minimal virtio-blk
 * driver, all at CPL 3: split virtqueue 0 with up to 128 entries, three
 * descriptors per request (header, data, status) in fixed triples, optional
 * EVENT_IDX, completion by polling the used ring or by interrupt (IOAPIC ->
 * vector 0x30 + window; the CPL 0 stub only counts). Everything the device
 * hands back is validated: this guest is test equipment for the VMM.
 */
#include "guest.h"

/* virtio-mmio registers */
#define VM_MAGIC 0x000
#define VM_VERSION 0x004
#define VM_DEVICE_ID 0x008
#define VM_DEV_FEATURES 0x010
#define VM_DEV_FEATURES_SEL 0x014
#define VM_DRV_FEATURES 0x020
#define VM_DRV_FEATURES_SEL 0x024
#define VM_QUEUE_SEL 0x030
#define VM_QUEUE_NUM_MAX 0x034
#define VM_QUEUE_NUM 0x038
#define VM_QUEUE_READY 0x044
#define VM_QUEUE_NOTIFY 0x050
#define VM_INT_STATUS 0x060
#define VM_INT_ACK 0x064
#define VM_STATUS 0x070
#define VM_QUEUE_DESC 0x080
#define VM_QUEUE_DRIVER 0x090
#define VM_QUEUE_DEVICE 0x0a0
#define VM_CONFIG_GEN 0x0fc
#define VM_CONFIG 0x100

#define S_ACK 1
#define S_DRIVER 2
#define S_DRIVER_OK 4
#define S_FEATURES_OK 8
#define S_NEEDS_RESET 0x40
#define S_FAILED 0x80

#define F_BLK_RO (1ull << 5)
#define F_BLK_FLUSH (1ull << 9)
#define F_EVENT_IDX (1ull << 29)
#define F_VERSION_1 (1ull << 32)

#define DESC_F_NEXT 1
#define DESC_F_WRITE 2
#define AVAIL_F_NO_INTERRUPT 1
#define USED_F_NO_NOTIFY 1

#define QMAX 128
#define SLOTS (QMAX / 3)
#define IRQ_VECTOR_BASE 0x30
#define TIMEOUT_NS 10000000000ull

struct vring_desc {
    u64 addr;
    u32 len;
    u16 flags, next;
};
struct vring_used_elem {
    u32 id, len;
};
/* Ring memory for one queue: descriptors, then the driver (avail) ring, then
 * the device (used) ring on its own page. */
struct ring_mem {
    struct vring_desc desc[QMAX];
    u16 avail[2 + QMAX + 1];  /* flags, idx, ring[num], used_event */
    u8 pad[4096 - sizeof(struct vring_desc) * QMAX - 2 * (2 + QMAX + 1)];
    u16 used_hdr[2];          /* flags, idx */
    struct vring_used_elem used[QMAX];
    u16 avail_event_pad[2];
} __attribute__((aligned(4096)));

struct blk_hdr {
    u32 type, reserved;
    u64 sector;
};

struct blkdev {
    u64 base, size;
    u32 irq;
    int window;
    u64 features, capacity;
    u16 num, nslots, last_used, avail_idx, kicked_idx;
    int irq_mode, inflight;
    u32 irq_seen;
    u64 isr_zero;            /* interrupts with InterruptStatus == 0 */
    volatile struct vring_desc *desc;
    volatile u16 *avail_flags, *avail_idx_p, *avail_ring, *used_event;
    volatile u16 *used_flags, *used_idx_p, *avail_event;
    volatile struct vring_used_elem *used;
    struct blk_hdr hdr[SLOTS];
    volatile u8 status[SLOTS];
    u32 writable[SLOTS];
    u8 busy[SLOTS];
    u8 free_list[SLOTS];
    int nfree;
    char err[64];
};

struct window {
    u64 base, size;
    u32 irq;
};

static struct ring_mem rings[MAX_VIRTIO];
static struct blkdev devs[MAX_VIRTIO];
static struct window windows[MAX_VIRTIO];
static int nwindows, ndevs, nerrors;

static void update_suppression(struct blkdev *d);
static u32 rd(struct blkdev *d, u32 off) { return mmio_r32(d->base + off); }
static void wr(struct blkdev *d, u32 off, u32 v) { mmio_w32(d->base + off, v); }

static int fail(struct blkdev *d, const char *what)
{
    if (!d->err[0])
        fmt(d->err, sizeof d->err, "%s", what);
    return -1;
}

int blk_count(void) { return ndevs; }
struct blkdev *blk_get(int i) { return i >= 0 && i < ndevs ? &devs[i] : 0; }
u64 blk_capacity(struct blkdev *d) { return d->capacity; }
u64 blk_base(struct blkdev *d) { return d->base; }
int blk_ro(struct blkdev *d) { return !!(d->features & F_BLK_RO); }
int blk_has_flush(struct blkdev *d) { return !!(d->features & F_BLK_FLUSH); }
int blk_slots(struct blkdev *d) { return d->nslots; }
const char *blk_error(struct blkdev *d) { return d->err[0] ? d->err : "unknown"; }
int virtio_errors(void) { return nerrors; }

const char *blk_describe(struct blkdev *d, char *buf, int cap)
{
    fmt(buf, cap, "addr=0x%lx irq=%u sectors=%lu ro=%d flush=%d event_idx=%d qsize=%u", d->base, d->irq,
        d->capacity, blk_ro(d), blk_has_flush(d), !!(d->features & F_EVENT_IDX), d->num);
    return buf;
}

/* virtio_mmio.device=SIZE@ADDR:IRQ[:ID], parsed like Linux's vm_cmdline_set(). */
static int parse_window(const char *s, struct window *w)
{
    const char *e;
    if (parse_size(s, &e, &w->size) || *e != '@')
        return -1;
    if (parse_u64(e + 1, &e, &w->base) || *e != ':')
        return -1;
    u64 irq;
    if (parse_u64(e + 1, &e, &irq) || irq > 0xffffffffu)
        return -1;
    w->irq = (u32)irq;
    if (*e == ':') {
        u64 id;
        if (parse_u64(e + 1, &e, &id))
            return -1;
    }
    return *e ? -1 : 0;
}

static void error_line(struct window *w, const char *what)
{
    nerrors++;
    emit("virtio", "addr=0x%lx irq=%u error=%s", w->base, w->irq, what);
}

static int blk_init(struct blkdev *d)
{
    wr(d, VM_STATUS, 0);
    if (rd(d, VM_STATUS) != 0)
        return fail(d, "reset");
    wr(d, VM_STATUS, S_ACK);
    wr(d, VM_STATUS, S_ACK | S_DRIVER);
    wr(d, VM_DEV_FEATURES_SEL, 0);
    u64 f = rd(d, VM_DEV_FEATURES);
    wr(d, VM_DEV_FEATURES_SEL, 1);
    f |= (u64)rd(d, VM_DEV_FEATURES) << 32;
    if (!(f & F_VERSION_1))
        return fail(d, "no-version-1");
    d->features = F_VERSION_1 | (f & (F_BLK_RO | F_BLK_FLUSH | F_EVENT_IDX));
    wr(d, VM_DRV_FEATURES_SEL, 0);
    wr(d, VM_DRV_FEATURES, (u32)d->features);
    wr(d, VM_DRV_FEATURES_SEL, 1);
    wr(d, VM_DRV_FEATURES, (u32)(d->features >> 32));
    wr(d, VM_STATUS, S_ACK | S_DRIVER | S_FEATURES_OK);
    if (!(rd(d, VM_STATUS) & S_FEATURES_OK))
        return fail(d, "features-refused");

    wr(d, VM_QUEUE_SEL, 0);
    if (rd(d, VM_QUEUE_READY))
        return fail(d, "queue-already-ready");
    u32 max = rd(d, VM_QUEUE_NUM_MAX);
    u32 num = QMAX;
    while (num > max)
        num >>= 1;
    if (num < 4)
        return fail(d, "queue-too-small");
    d->num = (u16)num;
    d->nslots = (u16)(num / 3);

    struct ring_mem *r = &rings[d - devs];
    memset(r, 0, sizeof *r);
    d->desc = r->desc;
    d->avail_flags = &r->avail[0];
    d->avail_idx_p = &r->avail[1];
    d->avail_ring = &r->avail[2];
    d->used_event = &r->avail[2 + num];
    d->used_flags = &r->used_hdr[0];
    d->used_idx_p = &r->used_hdr[1];
    d->used = r->used;
    d->avail_event = (volatile u16 *)&r->used[num];
    d->nfree = d->nslots;
    for (int i = 0; i < d->nslots; i++)
        d->free_list[i] = (u8)(d->nslots - 1 - i);

    u64 da = (u64)r->desc, aa = (u64)r->avail, ua = (u64)r->used_hdr;
    wr(d, VM_QUEUE_NUM, num);
    wr(d, VM_QUEUE_DESC, (u32)da);
    wr(d, VM_QUEUE_DESC + 4, (u32)(da >> 32));
    wr(d, VM_QUEUE_DRIVER, (u32)aa);
    wr(d, VM_QUEUE_DRIVER + 4, (u32)(aa >> 32));
    wr(d, VM_QUEUE_DEVICE, (u32)ua);
    wr(d, VM_QUEUE_DEVICE + 4, (u32)(ua >> 32));
    wr(d, VM_QUEUE_READY, 1);
    wr(d, VM_STATUS, S_ACK | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK);
    u32 st = rd(d, VM_STATUS);
    if (st & (S_NEEDS_RESET | S_FAILED) || !(st & S_DRIVER_OK))
        return fail(d, "driver-ok-refused");

    for (int tries = 0;; tries++) {
        u32 gen = rd(d, VM_CONFIG_GEN);
        u64 cap = rd(d, VM_CONFIG) | (u64)rd(d, VM_CONFIG + 4) << 32;
        if (rd(d, VM_CONFIG_GEN) == gen) {
            d->capacity = cap;
            break;
        }
        if (tries > 10)
            return fail(d, "config-generation");
    }
    update_suppression(d); /* poll mode until a job asks for interrupts */
    return 0;
}

void virtio_probe_args(char **argv, int argc)
{
    for (int i = 0; i < argc; i++) {
        if (!strneq(argv[i], "virtio_mmio.device=", 19))
            continue;
        struct window w;
        if (parse_window(argv[i] + 19, &w)) {
            nerrors++;
            emit("virtio", "error=bad-cmdline arg=%s", argv[i]);
            continue;
        }
        if (nwindows == MAX_VIRTIO) {
            say("more than %d virtio-mmio windows; ignoring %s", MAX_VIRTIO, argv[i]);
            continue;
        }
        windows[nwindows++] = w;
    }
    for (int i = 0; i < nwindows; i++) {
        struct window *w = &windows[i];
        if (w->size < 0x200 || w->base >= (4ull << 30) - w->size) {
            error_line(w, "bad-window");
            continue;
        }
        u32 magic = mmio_r32(w->base + VM_MAGIC);
        if (magic != 0x74726976) {
            error_line(w, "bad-magic");
            continue;
        }
        u32 id = mmio_r32(w->base + VM_DEVICE_ID);
        if (id == 0)
            continue; /* empty slot */
        u32 version = mmio_r32(w->base + VM_VERSION);
        if (version != 2) {
            say("virtio-mmio at 0x%lx: version %u (legacy) device %u skipped", w->base, version, id);
            continue;
        }
        if (id != 2)
            continue; /* not a block device: not ours */
        struct blkdev *d = &devs[ndevs];
        memset(d, 0, sizeof *d);
        d->base = w->base;
        d->size = w->size;
        d->irq = w->irq;
        d->window = i;
        if (blk_init(d)) {
            error_line(w, d->err);
            wr(d, VM_STATUS, S_FAILED);
            continue;
        }
        ndevs++;
    }
}

/* ------------------------------------------------------------ interrupts */

static u32 ioapic_read(u32 reg)
{
    mmio_w32(ioapic_base(), reg);
    return mmio_r32(ioapic_base() + 0x10);
}

static void ioapic_write(u32 reg, u32 v)
{
    mmio_w32(ioapic_base(), reg);
    mmio_w32(ioapic_base() + 0x10, v);
}

/* Suppress or request used-ring interrupts to match the mode. */
static void update_suppression(struct blkdev *d)
{
    if (d->features & F_EVENT_IDX)
        *d->used_event = d->irq_mode ? d->last_used : (u16)(d->last_used - 1);
    else
        *d->avail_flags = d->irq_mode ? 0 : AVAIL_F_NO_INTERRUPT;
}

/* Poll mode: IOAPIC entry masked. IRQ mode: edge, active high, fixed,
 * physical destination = this CPU, vector 0x30 + window. */
int blk_set_mode(struct blkdev *d, int irq_mode)
{
    if (d->irq_mode == irq_mode)
        return 0;
    u32 pins = ((ioapic_read(1) >> 16) & 0xff) + 1;
    if (d->irq >= pins)
        return fail(d, "irq-beyond-ioapic");
    u32 reg = 0x10 + 2 * d->irq;
    if (irq_mode) {
        u32 isr = rd(d, VM_INT_STATUS);
        if (isr)
            wr(d, VM_INT_ACK, isr); /* drop a line left high while polling */
        u32 apic_id = mmio_r32(lapic_base() + 0x20) >> 24;
        ioapic_write(reg + 1, apic_id << 24);
        ioapic_write(reg, IRQ_VECTOR_BASE + (u32)d->window);
        d->irq_seen = boot_irq_count[d->window];
    } else {
        ioapic_write(reg, 0x10000 | (IRQ_VECTOR_BASE + (u32)d->window));
    }
    d->irq_mode = irq_mode;
    update_suppression(d);
    return 0;
}

/* ------------------------------------------------------------- requests */

int blk_submit(struct blkdev *d, u32 type, u64 sector, void *buf, u32 len)
{
    if (!d->nfree)
        return -1;
    int slot = d->free_list[--d->nfree];
    u16 h = (u16)(3 * slot);
    d->hdr[slot] = (struct blk_hdr){type, 0, sector};
    d->status[slot] = 0xff;
    d->busy[slot] = 1;
    d->writable[slot] = 1 + (type == VIRTIO_BLK_T_IN ? len : 0);
    d->inflight++;
    volatile struct vring_desc *dh = &d->desc[h], *dd = &d->desc[h + 1], *ds = &d->desc[h + 2];
    dh->addr = (u64)&d->hdr[slot];
    dh->len = sizeof(struct blk_hdr);
    dh->flags = DESC_F_NEXT;
    dh->next = len ? h + 1 : h + 2;
    if (len) {
        dd->addr = (u64)buf;
        dd->len = len;
        dd->flags = DESC_F_NEXT | (type == VIRTIO_BLK_T_IN ? DESC_F_WRITE : 0);
        dd->next = h + 2;
    }
    ds->addr = (u64)&d->status[slot];
    ds->len = 1;
    ds->flags = DESC_F_WRITE;
    ds->next = 0;
    d->avail_ring[d->avail_idx & (d->num - 1)] = h;
    barrier(); /* x86 keeps stores in order: the ring entry is seen before idx */
    d->avail_idx++;
    *d->avail_idx_p = d->avail_idx;
    return slot;
}

void blk_kick(struct blkdev *d)
{
    u16 new_idx = d->avail_idx, old = d->kicked_idx;
    if (new_idx == old)
        return;
    mb(); /* publish avail->idx before reading the device's suppression state */
    int need;
    if (d->features & F_EVENT_IDX)
        need = (u16)(new_idx - *d->avail_event - 1) < (u16)(new_idx - old);
    else
        need = !(*d->used_flags & USED_F_NO_NOTIFY);
    d->kicked_idx = new_idx;
    if (need)
        wr(d, VM_QUEUE_NOTIFY, 0);
}

/* Take every used entry, validating it; returns the number taken or -1. */
static int harvest(struct blkdev *d, void (*cb)(int, int, void *), void *ctx)
{
    u16 uidx = *d->used_idx_p;
    barrier();
    u16 pending = (u16)(uidx - d->last_used);
    if (pending > d->inflight)
        return fail(d, "used-idx-jump");
    int n = 0;
    while (d->last_used != uidx) {
        volatile struct vring_used_elem *e = &d->used[d->last_used & (d->num - 1)];
        u32 id = e->id, len = e->len;
        if (id >= d->num || id % 3 || !d->busy[id / 3])
            return fail(d, "used-id-bad");
        int slot = (int)(id / 3);
        int st = d->status[slot];
        if (len > d->writable[slot])
            return fail(d, "used-len-too-big");
        if (st == 0xff)
            return fail(d, "status-not-written");
        d->busy[slot] = 0;
        d->free_list[d->nfree++] = (u8)slot;
        d->inflight--;
        d->last_used++;
        n++;
        cb(slot, st, ctx);
    }
    if (n)
        update_suppression(d);
    return n;
}

int blk_complete(struct blkdev *d, void (*cb)(int, int, void *), void *ctx)
{
    if (!d->inflight)
        return fail(d, "wait-with-nothing-in-flight");
    u64 deadline = clock_ns() + TIMEOUT_NS;
    for (;;) {
        int n = harvest(d, cb, ctx);
        if (n)
            return n < 0 ? -1 : 0;
        if (d->irq_mode) {
            update_suppression(d);
            mb(); /* used_event written before re-checking used->idx */
            if (*d->used_idx_p != d->last_used)
                continue;
            /* Wait for an interrupt not yet acknowledged. Acknowledging every
             * one keeps a level-style line (QEMU) producing fresh edges. */
            for (u32 spin = 0; boot_irq_count[d->window] == d->irq_seen; spin++) {
                cpu_relax();
                if (!(spin & 255) && clock_ns() > deadline)
                    return fail(d, "irq-timeout");
            }
            d->irq_seen = boot_irq_count[d->window];
            u32 isr = rd(d, VM_INT_STATUS);
            if (isr)
                wr(d, VM_INT_ACK, isr);
            else
                d->isr_zero++;
        } else {
            for (u32 spin = 0; *d->used_idx_p == d->last_used; spin++) {
                cpu_relax();
                if (!(spin & 255) && clock_ns() > deadline)
                    return fail(d, "poll-timeout");
            }
        }
    }
}

struct sync_ctx {
    int slot, status, done;
};
static void sync_cb(int slot, int status, void *p)
{
    struct sync_ctx *c = p;
    if (slot == c->slot) {
        c->status = status;
        c->done = 1;
    }
}

/* One request, waited for. Returns the virtio status (0 = OK) or -1. */
int blk_rw(struct blkdev *d, u32 type, u64 sector, void *buf, u32 len)
{
    struct sync_ctx c = {0, 0, 0};
    c.slot = blk_submit(d, type, sector, buf, len);
    if (c.slot < 0)
        return fail(d, "no-free-slot");
    blk_kick(d);
    while (!c.done)
        if (blk_complete(d, sync_cb, &c))
            return -1;
    return c.status;
}

/*
 * blk.c — a minimal virtio-blk driver over virtio.c, at CPL 3: queue 0 with
 * up to 128 entries, three descriptors per request (header, data, status) in
 * fixed triples, optional EVENT_IDX, completion by polling the used ring or
 * by interrupt. Everything the device hands back is validated: this guest is
 * test equipment for the VMM.
 */
#include "virtio.h"

#define F_BLK_RO (1ull << 5)
#define F_BLK_FLUSH (1ull << 9)
#define QMAX 128
#define SLOTS (QMAX / 3)

struct blk_hdr {
    u32 type, reserved;
    u64 sector;
};

struct blkdev {
    struct vdev *v;
    struct vq q;
    u64 capacity;
    u16 nslots;
    int inflight;
    struct blk_hdr hdr[SLOTS];
    volatile u8 status[SLOTS];
    u32 writable[SLOTS];
    u8 busy[SLOTS];
    u8 free_list[SLOTS];
    int nfree;
};

static struct blkdev devs[MAX_VIRTIO];
static int ndevs;

static int fail(struct blkdev *d, const char *what) { return vdev_fail(d->v, what); }

int blk_count(void) { return ndevs; }
struct blkdev *blk_get(int i) { return i >= 0 && i < ndevs ? &devs[i] : 0; }

/* Capacity (config offset 0, u64) re-read with the ConfigGeneration check.
 * 0 ok, -1 if the generation never settled (error recorded). */
int blk_read_capacity(struct blkdev *d)
{
    u64 cap;
    d->v->config_dirty = 0; /* before the read: a change during it sets it again */
    if (vdev_config(d->v, 0, &cap, 8))
        return -1;
    d->capacity = cap;
    return 0;
}

/* The cached capacity, re-read first if a configuration-change interrupt
 * (InterruptStatus bit 1) arrived since the last read (irq mode). */
u64 blk_capacity(struct blkdev *d)
{
    if (d->v->config_dirty)
        blk_read_capacity(d);
    return d->capacity;
}

u64 blk_config_irqs(struct blkdev *d) { return d->v->config_irqs; }

/* irq mode, nothing in flight: wait for an interrupt; after a configuration
 * change re-read the capacity. 1 interrupt, 0 deadline, -1 config error. */
int blk_wait_config(struct blkdev *d, u64 deadline_ns)
{
    if (!vdev_wait_irq(d->v, deadline_ns))
        return 0;
    if (d->v->config_dirty && blk_read_capacity(d))
        return -1;
    return 1;
}
u64 blk_base(struct blkdev *d) { return d->v->base; }
int blk_ro(struct blkdev *d) { return !!(d->v->features & F_BLK_RO); }
int blk_has_flush(struct blkdev *d) { return !!(d->v->features & F_BLK_FLUSH); }
int blk_slots(struct blkdev *d) { return d->nslots; }
const char *blk_error(struct blkdev *d) { return d->v->err[0] ? d->v->err : "unknown"; }

const char *blk_describe(struct blkdev *d, char *buf, int cap)
{
    fmt(buf, cap, "addr=0x%lx irq=%u sectors=%lu ro=%d flush=%d event_idx=%d qsize=%u", d->v->base, d->v->irq,
        blk_capacity(d), blk_ro(d), blk_has_flush(d), !!(d->v->features & F_EVENT_IDX), d->q.num);
    return buf;
}

int blk_attach(struct vdev *v)
{
    if (ndevs == MAX_VIRTIO)
        return vdev_fail(v, "too-many");
    struct blkdev *d = &devs[ndevs];
    memset(d, 0, sizeof *d);
    d->v = v;
    if (vdev_negotiate(v, F_BLK_RO | F_BLK_FLUSH | F_EVENT_IDX, 0))
        return -1;
    if (vq_setup(v, &d->q, 0, QMAX))
        return -1;
    d->nslots = (u16)(d->q.num / 3);
    d->nfree = d->nslots;
    for (int i = 0; i < d->nslots; i++)
        d->free_list[i] = (u8)(d->nslots - 1 - i);
    if (vdev_driver_ok(v))
        return -1;
    if (blk_read_capacity(d))
        return -1;
    ndevs++;
    return 0;
}

/* Poll mode: IOAPIC entry masked, used-ring interrupts suppressed. */
int blk_set_mode(struct blkdev *d, int irq_mode)
{
    if (vdev_set_mode(d->v, irq_mode))
        return -1;
    vq_set_irq(&d->q, irq_mode);
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
    volatile struct vring_desc *dh = &d->q.desc[h], *dd = &d->q.desc[h + 1], *ds = &d->q.desc[h + 2];
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
    vq_push(&d->q, h);
    return slot;
}

void blk_kick(struct blkdev *d) { vq_kick(d->v, &d->q); }

/* Take every used entry, validating it; returns the number taken or -1. */
static int harvest(struct blkdev *d, void (*cb)(int, int, void *), void *ctx)
{
    struct vq *q = &d->q;
    u16 uidx = vq_used_idx(q);
    barrier();
    u16 pending = (u16)(uidx - q->last_used);
    if (pending > d->inflight)
        return fail(d, "used-idx-jump");
    int n = 0;
    while (q->last_used != uidx) {
        volatile struct vring_used_elem *e = &q->used[q->last_used & (q->num - 1)];
        u32 id = e->id, len = e->len;
        if (id >= q->num || id % 3 || !d->busy[id / 3])
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
        q->last_used++;
        n++;
        cb(slot, st, ctx);
    }
    if (n)
        vq_set_irq(q, d->v->irq_mode);
    return n;
}

int blk_complete(struct blkdev *d, void (*cb)(int, int, void *), void *ctx)
{
    if (!d->inflight)
        return fail(d, "wait-with-nothing-in-flight");
    u64 deadline = clock_ns() + VIRTIO_TIMEOUT_NS;
    for (;;) {
        int n = harvest(d, cb, ctx);
        if (n)
            return n < 0 ? -1 : 0;
        if (d->v->irq_mode) {
            vq_set_irq(&d->q, 1);
            mb(); /* used_event written before re-checking used->idx */
            if (vq_used_idx(&d->q) != d->q.last_used)
                continue;
            if (!vdev_wait_irq(d->v, deadline))
                return fail(d, "irq-timeout");
        } else {
            for (u32 spin = 0; vq_used_idx(&d->q) == d->q.last_used; spin++) {
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

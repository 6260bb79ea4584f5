/*
 * virtio.c — modern (version 2) virtio-mmio transport, all at CPL 3: window
 * discovery from virtio_mmio.device= words, device initialisation and feature
 * negotiation, split virtqueues (ring memory allocated once at probe, above
 * the image), notification with optional EVENT_IDX, interrupt suppression,
 * and interrupts through the IOAPIC (edge, vector 0x30 + window; the CPL 0
 * stub in boot.S only counts). Device drivers: blk.c (ID 2), vnet.c (ID 1).
 */
#include "virtio.h"

struct window {
    u64 base, size;
    u32 irq;
};

static struct window windows[MAX_VIRTIO];
static struct vdev vdevs[MAX_VIRTIO];
static int nwindows, nerrors;

int virtio_errors(void) { return nerrors; }

int vdev_fail(struct vdev *d, const char *what)
{
    if (!d->err[0])
        fmt(d->err, sizeof d->err, "%s", what);
    return -1;
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

/* Reset, ACKNOWLEDGE, DRIVER, features (VERSION_1 required; the rest of
 * offered_mask when the device offers it), FEATURES_OK re-read. */
int vdev_negotiate(struct vdev *d, u64 offered_mask, u64 *offered)
{
    vd_wr(d, VM_STATUS, 0);
    if (vd_rd(d, VM_STATUS) != 0)
        return vdev_fail(d, "reset");
    vd_wr(d, VM_STATUS, S_ACK);
    vd_wr(d, VM_STATUS, S_ACK | S_DRIVER);
    vd_wr(d, VM_DEV_FEATURES_SEL, 0);
    u64 f = vd_rd(d, VM_DEV_FEATURES);
    vd_wr(d, VM_DEV_FEATURES_SEL, 1);
    f |= (u64)vd_rd(d, VM_DEV_FEATURES) << 32;
    if (offered)
        *offered = f;
    if (!(f & F_VERSION_1))
        return vdev_fail(d, "no-version-1");
    d->features = F_VERSION_1 | (f & offered_mask);
    vd_wr(d, VM_DRV_FEATURES_SEL, 0);
    vd_wr(d, VM_DRV_FEATURES, (u32)d->features);
    vd_wr(d, VM_DRV_FEATURES_SEL, 1);
    vd_wr(d, VM_DRV_FEATURES, (u32)(d->features >> 32));
    vd_wr(d, VM_STATUS, S_ACK | S_DRIVER | S_FEATURES_OK);
    if (!(vd_rd(d, VM_STATUS) & S_FEATURES_OK))
        return vdev_fail(d, "features-refused");
    return 0;
}

/* Queue `index`: size = largest power of two <= min(max, QueueNumMax);
 * descriptor table, driver ring and device ring packed in one allocation. */
int vq_setup(struct vdev *d, struct vq *q, u16 index, u16 max)
{
    vd_wr(d, VM_QUEUE_SEL, index);
    if (vd_rd(d, VM_QUEUE_READY))
        return vdev_fail(d, "queue-already-ready");
    u32 devmax = vd_rd(d, VM_QUEUE_NUM_MAX);
    u32 num = max;
    while (num > devmax)
        num >>= 1;
    if (num < 4)
        return vdev_fail(d, "queue-too-small");
    u64 dsz = 16ull * num, asz = 2ull * (3 + num), usz = 6 + 8ull * num;
    u64 uoff = (dsz + asz + 3) & ~3ull;
    u8 *mem = perm_alloc(uoff + usz, 4096);
    if (!mem)
        return vdev_fail(d, "nomem");
    memset(mem, 0, uoff + usz);
    memset(q, 0, sizeof *q);
    q->index = index;
    q->num = (u16)num;
    q->event_idx = !!(d->features & F_EVENT_IDX);
    q->desc = (volatile struct vring_desc *)mem;
    volatile u16 *avail = (volatile u16 *)(mem + dsz);
    q->avail_flags = &avail[0];
    q->avail_idx_p = &avail[1];
    q->avail_ring = &avail[2];
    q->used_event = &avail[2 + num];
    volatile u16 *used = (volatile u16 *)(mem + uoff);
    q->used_flags = &used[0];
    q->used_idx_p = &used[1];
    q->used = (volatile struct vring_used_elem *)&used[2];
    q->avail_event = (volatile u16 *)&q->used[num];

    u64 da = (u64)q->desc, aa = (u64)avail, ua = (u64)used;
    vd_wr(d, VM_QUEUE_NUM, num);
    vd_wr(d, VM_QUEUE_DESC, (u32)da);
    vd_wr(d, VM_QUEUE_DESC + 4, (u32)(da >> 32));
    vd_wr(d, VM_QUEUE_DRIVER, (u32)aa);
    vd_wr(d, VM_QUEUE_DRIVER + 4, (u32)(aa >> 32));
    vd_wr(d, VM_QUEUE_DEVICE, (u32)ua);
    vd_wr(d, VM_QUEUE_DEVICE + 4, (u32)(ua >> 32));
    vd_wr(d, VM_QUEUE_READY, 1);
    vq_set_irq(q, 0); /* poll mode until a job asks for interrupts */
    return 0;
}

int vdev_driver_ok(struct vdev *d)
{
    vd_wr(d, VM_STATUS, S_ACK | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK);
    u32 st = vd_rd(d, VM_STATUS);
    if (st & (S_NEEDS_RESET | S_FAILED) || !(st & S_DRIVER_OK))
        return vdev_fail(d, "driver-ok-refused");
    return 0;
}

/* Config space read, repeated until ConfigGeneration is stable. Access widths
 * as the spec requires for MMIO: a 16/32-bit field with one aligned access of
 * its size, a 64-bit one with two 32-bit accesses, anything else (byte arrays
 * such as a MAC) byte by byte. */
int vdev_config(struct vdev *d, u32 off, void *buf, u32 len)
{
    u8 *b = buf;
    u64 a = d->base + VM_CONFIG + off;
    for (int tries = 0; tries <= 10; tries++) {
        u32 gen = vd_rd(d, VM_CONFIG_GEN);
        if (len == 8 && !(off & 3)) {
            u32 lo = mmio_r32(a), hi = mmio_r32(a + 4);
            memcpy(b, &lo, 4);
            memcpy(b + 4, &hi, 4);
        } else if (len == 4 && !(off & 3)) {
            u32 v = mmio_r32(a);
            memcpy(b, &v, 4);
        } else if (len == 2 && !(off & 1)) {
            u16 v = *(volatile u16 *)a;
            memcpy(b, &v, 2);
        } else {
            for (u32 i = 0; i < len; i++)
                b[i] = *(volatile u8 *)(a + i);
        }
        if (vd_rd(d, VM_CONFIG_GEN) == gen)
            return 0;
    }
    return vdev_fail(d, "config-generation");
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
        if (id != 1 && id != 2)
            continue; /* not a device this guest drives */
        struct vdev *d = &vdevs[i];
        memset(d, 0, sizeof *d);
        d->base = w->base;
        d->size = w->size;
        d->irq = w->irq;
        d->id = id;
        d->window = i;
        if ((id == 2 ? blk_attach(d) : net_attach(d))) {
            error_line(w, d->err);
            vd_wr(d, VM_STATUS, S_FAILED);
        }
    }
}

/* ------------------------------------------------------------ interrupts */

/* Request (want = 1) or suppress used-ring interrupts: with EVENT_IDX the
 * used_event index (at last_used: the next entry interrupts; half the index
 * space ahead: none, however many entries a device adds between two of its
 * notification checks while the driver harvests), else the avail ring's
 * NO_INTERRUPT flag. ("One behind" is not enough: a driver that harvests part
 * of a batch moves it into the window the device checks at the batch's end.) */
void vq_set_irq(struct vq *q, int want)
{
    q->want_irq = (u8)want;
    if (q->event_idx)
        *q->used_event = want ? q->last_used : (u16)(q->last_used + 0x8000);
    else
        *q->avail_flags = want ? 0 : AVAIL_F_NO_INTERRUPT;
}

/* Poll mode: IOAPIC entry masked. IRQ mode: edge, active high, fixed,
 * physical destination = this CPU, vector 0x30 + window. */
int vdev_set_mode(struct vdev *d, int irq_mode)
{
    if (d->irq_mode == irq_mode)
        return 0;
    u32 pins = ((ioapic_read(1) >> 16) & 0xff) + 1;
    if (d->irq >= pins)
        return vdev_fail(d, "irq-beyond-ioapic");
    u32 reg = 0x10 + 2 * d->irq;
    if (irq_mode) {
        u32 isr = vd_rd(d, VM_INT_STATUS);
        if (isr)
            vdev_ack(d, isr); /* drop a line left high while polling */
        u32 apic_id = mmio_r32(lapic_base() + 0x20) >> 24;
        ioapic_write(reg + 1, apic_id << 24);
        ioapic_write(reg, IRQ_VECTOR_BASE + (u32)d->window);
        d->irq_seen = boot_irq_count[d->window];
    } else {
        ioapic_write(reg, 0x10000 | (IRQ_VECTOR_BASE + (u32)d->window));
    }
    d->irq_mode = irq_mode;
    return 0;
}

/* Wait for an interrupt not yet handled, then read and acknowledge
 * InterruptStatus. Acknowledging every one keeps a level-style line (QEMU)
 * producing fresh edges. Returns 1 after an interrupt, 0 at the deadline. */
int vdev_wait_irq(struct vdev *d, u64 deadline)
{
    for (u32 spin = 0; boot_irq_count[d->window] == d->irq_seen; spin++) {
        cpu_relax();
        if (!(spin & 255) && clock_ns() >= deadline)
            return 0;
    }
    d->irq_seen = boot_irq_count[d->window];
    d->irqs++;
    u32 isr = vd_rd(d, VM_INT_STATUS);
    if (isr)
        vdev_ack(d, isr);
    else
        d->isr_zero++;
    return 1;
}

/* Acknowledge InterruptStatus bits; a configuration change (bit 1) is
 * recorded for the driver (blk.c re-reads the capacity). */
void vdev_ack(struct vdev *d, u32 isr)
{
    vd_wr(d, VM_INT_ACK, isr);
    if (isr & ISR_CONFIG) {
        d->config_irqs++;
        d->config_dirty = 1;
    }
}

/* ------------------------------------------------------------ the rings */

void vq_push(struct vq *q, u16 head)
{
    q->avail_ring[q->avail_idx & (q->num - 1)] = head;
    barrier(); /* x86 keeps stores in order: the ring entry is seen before idx */
    q->avail_idx++;
    *q->avail_idx_p = q->avail_idx;
}

void vq_kick(struct vdev *d, struct vq *q)
{
    u16 new_idx = q->avail_idx, old = q->kicked_idx;
    if (new_idx == old)
        return;
    mb(); /* publish avail->idx before reading the device's suppression state */
    int need;
    if (q->event_idx)
        need = (u16)(new_idx - *q->avail_event - 1) < (u16)(new_idx - old);
    else
        need = !(*q->used_flags & USED_F_NO_NOTIFY);
    q->kicked_idx = new_idx;
    if (need) {
        q->notifies++;
        vd_wr(d, VM_QUEUE_NOTIFY, q->index);
    }
}

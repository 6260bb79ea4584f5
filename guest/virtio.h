/*
 * virtio.h — the modern virtio-mmio transport and split virtqueues shared by
 * the virtio-blk (blk.c) and virtio-net (vnet.c) drivers. Everything here
 * runs at CPL 3; see virtio.c.
 */
#ifndef VIRTIO_H
#define VIRTIO_H

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

#define F_EVENT_IDX (1ull << 29)
#define F_VERSION_1 (1ull << 32)

#define DESC_F_NEXT 1
#define DESC_F_WRITE 2
#define AVAIL_F_NO_INTERRUPT 1
#define USED_F_NO_NOTIFY 1

#define VQ_MAX 256            /* largest queue any driver here uses */
#define IRQ_VECTOR_BASE 0x30
#define VIRTIO_TIMEOUT_NS 10000000000ull
#define ISR_USED 1
#define ISR_CONFIG 2

struct vring_desc {
    u64 addr;
    u32 len;
    u16 flags, next;
};
struct vring_used_elem {
    u32 id, len;
};

/* One split virtqueue. The ring memory is allocated once, at probe time. */
struct vq {
    u16 index, num, last_used, avail_idx, kicked_idx;
    u8 event_idx, want_irq;
    u64 notifies;   /* QueueNotify writes */
    volatile struct vring_desc *desc;
    volatile u16 *avail_flags, *avail_idx_p, *avail_ring, *used_event;
    volatile u16 *used_flags, *used_idx_p, *avail_event;
    volatile struct vring_used_elem *used;
};

/* One virtio-mmio device (window). */
struct vdev {
    u64 base, size;
    u32 irq, id;
    int window;     /* position among the virtio_mmio.device= words: vector 0x30 + window */
    u64 features;   /* accepted */
    int irq_mode;
    u32 irq_seen;   /* boot_irq_count[window] last handled */
    u64 irqs, isr_zero;
    u64 config_irqs;  /* InterruptStatus bit 1 (configuration change) seen */
    u8 config_dirty;  /* set with config_irqs; the driver re-reads its config and clears it */
    char err[64];   /* first error, for "error=<what>" */
};

static inline u32 vd_rd(struct vdev *d, u32 off) { return mmio_r32(d->base + off); }
static inline void vd_wr(struct vdev *d, u32 off, u32 v) { mmio_w32(d->base + off, v); }

int vdev_fail(struct vdev *d, const char *what);               /* records the first error; returns -1 */
int vdev_negotiate(struct vdev *d, u64 offered_mask, u64 *offered); /* reset .. FEATURES_OK */
int vq_setup(struct vdev *d, struct vq *q, u16 index, u16 max);  /* size, ring memory, QueueReady */
int vdev_driver_ok(struct vdev *d);
int vdev_config(struct vdev *d, u32 off, void *buf, u32 len);   /* generation-checked byte reads */
int vdev_set_mode(struct vdev *d, int irq_mode);                /* IOAPIC pin: masked / edge */
int vdev_wait_irq(struct vdev *d, u64 deadline_ns);             /* 1: interrupt (acknowledged), 0: deadline */
void vdev_ack(struct vdev *d, u32 isr);                         /* InterruptACK; notes a config change */

/* Queue helpers. */
static inline u16 vq_used_idx(struct vq *q) { return *q->used_idx_p; }
static inline u16 vq_pending(struct vq *q) { return (u16)(*q->used_idx_p - q->last_used); }
void vq_push(struct vq *q, u16 head);           /* avail ring; the caller kicks */
void vq_kick(struct vdev *d, struct vq *q);     /* notify if the device asked for it */
void vq_set_irq(struct vq *q, int want);        /* request / suppress used-ring interrupts */

/* Drivers: called by the prober for each device of their type. */
int blk_attach(struct vdev *v);   /* 0 ok, else -1 with v->err set */
int net_attach(struct vdev *v);

#endif

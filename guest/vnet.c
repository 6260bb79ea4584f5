/*
 * vnet.c — a minimal virtio-net driver over virtio.c, at CPL 3.
 *
 * Features: VERSION_1 (required), MAC, STATUS, MRG_RXBUF, EVENT_IDX when
 * offered; no checksum or segmentation offloads, so every frame carries a
 * 12-byte virtio_net_hdr_v1 {flags, gso_type, hdr_len, gso_size, csum_start,
 * csum_offset, num_buffers} and is at most 1514 bytes.
 *
 * RX (queue 0): one device-writable descriptor per buffer (2 KiB, or
 * godwit.net_rxbuf= bytes with MRG_RXBUF), descriptor i <-> buffer i, the
 * ring kept full. A frame that spans num_buffers > 1 buffers (MRG_RXBUF) is
 * copied together; the state survives between calls, so the rest of a frame
 * may arrive later. TX (queue 1): one descriptor per frame (header + frame
 * contiguous), descriptor i <-> 2 KiB buffer i.
 *
 * Control queue (queue 2), with CTRL_VQ and GUEST_ANNOUNCE when offered: only
 * for the announce handshake (virtio 1.2 5.1.6.5.4). When the device sets
 * VIRTIO_NET_S_ANNOUNCE (after the VM moved), nic_announce_pending says so
 * (noticed from a configuration change interrupt, or by reading the status
 * every 20 ms while the net stack polls); net.c sends a gratuitous ARP and
 * nic_announce_ack sends VIRTIO_NET_CTRL_ANNOUNCE_ACK and checks the answer.
 *
 * Everything the device hands back is validated. Broken ring protocol (an
 * unknown id, used->idx moving by more than what is posted) stops the device
 * (nic_error); a bad length or header only drops that frame, counted by
 * reason in the NIC's net_stats.
 */
#include "virtio.h"

#define F_NET_MAC (1ull << 5)
#define F_NET_MRG_RXBUF (1ull << 15)
#define F_NET_STATUS (1ull << 16)
#define F_NET_CTRL_VQ (1ull << 17)
#define F_NET_GUEST_ANNOUNCE (1ull << 21)
#define NET_S_ANNOUNCE 2
#define CTRL_QSIZE 16
#define CTRL_ANNOUNCE 3
#define CTRL_ANNOUNCE_ACK 0
#define STATUS_POLL_NS 20000000ull
#define NET_QSIZE 256
#define NET_HDR 12
#define BUF_SIZE 2048
#define ASM_CAP (NET_HDR + NET_MAX_FRAME)

struct nic {
    struct vdev *v;
    struct vq rx, tx, ctrl;
    u8 *ctrlbuf;              /* [0..1] command header, [8] ack */
    u64 next_status_poll;     /* poll mode: when to read the status for ANNOUNCE */
    u64 announces;            /* ANNOUNCE_ACKs the device accepted */
    u8 mac[6], mac_from_device;
    u32 rxbuf_size;
    u8 *rxbufs, *txbufs;
    int broken;
    u16 rx_posted;
    u8 rx_busy[NET_QSIZE];
    u16 tx_free[NET_QSIZE];
    u16 tx_nfree, tx_inflight;
    u8 tx_state[NET_QSIZE]; /* 0 free, 1 allocated, 2 with the device */
    /* a mergeable frame being put together */
    u16 mrg_left;
    u8 mrg_flags, mrg_drop;  /* mrg_drop: reason + 1, or 0 */
    u32 mrg_len;
    u8 mrg_buf[ASM_CAP] __attribute__((aligned(64)));
    struct net_stats st;
};

static struct nic nics[MAX_VIRTIO];
static int nnics;

int nic_count(void) { return nnics; }
struct nic *nic_get(int i) { return i >= 0 && i < nnics ? &nics[i] : 0; }
const u8 *nic_mac(struct nic *n) { return n->mac; }
const char *nic_error(struct nic *n) { return n->v->err[0] ? n->v->err : "unknown"; }
struct net_stats *nic_stats(struct nic *n)
{
    n->st.notifies = n->rx.notifies + n->tx.notifies;
    n->st.irqs = n->v->irqs;
    return &n->st;
}
int nic_tx_inflight(struct nic *n) { return n->tx_inflight; }
int nic_tx_free(struct nic *n) { return n->tx_nfree; }

static int fail(struct nic *n, const char *what)
{
    n->broken = 1;
    return vdev_fail(n->v, what);
}

void fmt_mac(char *buf, const u8 *m)
{
    fmt(buf, 18, "%02x:%02x:%02x:%02x:%02x:%02x", m[0], m[1], m[2], m[3], m[4], m[5]);
}

int nic_link_up(struct nic *n)
{
    if (!(n->v->features & F_NET_STATUS))
        return 1;
    u16 status = 0;
    if (vdev_config(n->v, 6, &status, 2))
        return 0;
    return status & 1;
}

const char *nic_describe(struct nic *n, char *buf, int cap)
{
    char mac[18];
    fmt_mac(mac, n->mac);
    fmt(buf, cap, "addr=0x%lx irq=%u mac=%s mac_from_device=%d link=%s mrg_rxbuf=%d event_idx=%d rxq=%u txq=%u rxbuf=%u",
        n->v->base, n->v->irq, mac, n->mac_from_device, nic_link_up(n) ? "up" : "down",
        !!(n->v->features & F_NET_MRG_RXBUF), !!(n->v->features & F_EVENT_IDX), n->rx.num, n->tx.num, n->rxbuf_size);
    return buf;
}

static void rx_post(struct nic *n, u16 id)
{
    n->rx_busy[id] = 1;
    n->rx_posted++;
    vq_push(&n->rx, id);
}

int net_attach(struct vdev *v)
{
    if (nnics == MAX_VIRTIO)
        return vdev_fail(v, "too-many");
    struct nic *n = &nics[nnics];
    memset(n, 0, sizeof *n);
    n->v = v;
    u64 offered = 0;
    if (vdev_negotiate(v, F_NET_MAC | F_NET_STATUS | F_NET_MRG_RXBUF | F_EVENT_IDX | F_NET_CTRL_VQ | F_NET_GUEST_ANNOUNCE,
                       &offered))
        return -1;
    /* GUEST_ANNOUNCE needs CTRL_VQ (5.1.3.1): a device offering one without the other gets neither. */
    if ((v->features & (F_NET_CTRL_VQ | F_NET_GUEST_ANNOUNCE)) != (F_NET_CTRL_VQ | F_NET_GUEST_ANNOUNCE) &&
        (v->features & (F_NET_CTRL_VQ | F_NET_GUEST_ANNOUNCE))) {
        if (vdev_negotiate(v, F_NET_MAC | F_NET_STATUS | F_NET_MRG_RXBUF | F_EVENT_IDX, 0))
            return -1;
    }
    if (vq_setup(v, &n->rx, 0, NET_QSIZE) || vq_setup(v, &n->tx, 1, NET_QSIZE))
        return -1;
    if (v->features & F_NET_CTRL_VQ) {
        if (vq_setup(v, &n->ctrl, 2, CTRL_QSIZE))
            return -1;
        n->ctrlbuf = perm_alloc(64, 64);
        if (!n->ctrlbuf)
            return vdev_fail(v, "nomem");
    }
    /* Without MRG_RXBUF every buffer must hold a whole frame and its header. */
    n->rxbuf_size = BUF_SIZE;
    if (v->features & F_NET_MRG_RXBUF)
        n->rxbuf_size = net_rxbuf_size();
    n->rxbufs = perm_alloc((u64)n->rx.num * n->rxbuf_size, 4096);
    n->txbufs = perm_alloc((u64)n->tx.num * BUF_SIZE, 4096);
    if (!n->rxbufs || !n->txbufs)
        return vdev_fail(v, "nomem");
    for (u16 i = 0; i < n->rx.num; i++) {
        n->rx.desc[i].addr = (u64)(n->rxbufs + (u64)i * n->rxbuf_size);
        n->rx.desc[i].len = n->rxbuf_size;
        n->rx.desc[i].flags = DESC_F_WRITE;
        n->rx.desc[i].next = 0;
    }
    for (u16 i = 0; i < n->tx.num; i++) {
        n->tx.desc[i].addr = (u64)(n->txbufs + (u64)i * BUF_SIZE);
        n->tx_free[n->tx_nfree++] = (u16)(n->tx.num - 1 - i);
    }
    if (v->features & F_NET_MAC) {
        if (vdev_config(v, 0, n->mac, 6))
            return -1;
        n->mac_from_device = 1;
    } else { /* locally administered unicast, from the boot id and the window */
        u64 r = mix64(boot_id ^ (u64)v->window);
        n->mac[0] = 0x02;
        for (int i = 1; i < 6; i++)
            n->mac[i] = (u8)(r >> (8 * i));
    }
    if (vdev_driver_ok(v))
        return -1;
    for (u16 i = 0; i < n->rx.num; i++)
        rx_post(n, i);
    vq_kick(v, &n->rx);
    nnics++;
    return 0;
}

int nic_set_mode(struct nic *n, int irq_mode)
{
    if (vdev_set_mode(n->v, irq_mode))
        return -1;
    vq_set_irq(&n->rx, 0); /* armed by nic_wait when there is nothing to do */
    vq_set_irq(&n->tx, 0);
    return 0;
}

static void drop(struct nic *n, int reason)
{
    n->st.dropped++;
    n->st.drop[reason]++;
}

static inline u16 le16(const u8 *p) { return (u16)(p[0] | p[1] << 8); }

int nic_rx(struct nic *n, int budget, void (*cb)(void *, u8 *, u32, u8), void *ctx)
{
    if (n->broken)
        return -1;
    struct vq *q = &n->rx;
    u16 uidx = vq_used_idx(q);
    barrier(); /* the used entries are read after used->idx */
    if ((u16)(uidx - q->last_used) > n->rx_posted)
        return fail(n, "used-idx-jump");
    int frames = 0, taken = 0;
    int mrg = !!(n->v->features & F_NET_MRG_RXBUF);
    while (q->last_used != uidx && frames < budget) {
        volatile struct vring_used_elem *e = &q->used[q->last_used & (q->num - 1)];
        u32 id = e->id, len = e->len;
        if (id >= q->num || !n->rx_busy[id])
            return fail(n, "used-id-bad");
        n->rx_busy[id] = 0;
        n->rx_posted--;
        q->last_used++;
        taken++;
        u8 *buf = n->rxbufs + (u64)id * n->rxbuf_size;

        if (n->mrg_left) { /* the next buffer of a mergeable frame */
            if (len > n->rxbuf_size) {
                if (!n->mrg_drop)
                    n->mrg_drop = D_RX_LEN + 1;
            } else if (!n->mrg_drop) {
                if (n->mrg_len + len > ASM_CAP)
                    n->mrg_drop = D_TOO_LONG + 1;
                else
                    memcpy(n->mrg_buf + n->mrg_len, buf, len);
            }
            n->mrg_len += len;
            rx_post(n, (u16)id);
            if (--n->mrg_left)
                continue;
            frames++;
            n->st.rx_frames++;
            if (n->mrg_drop)
                drop(n, n->mrg_drop - 1);
            else if (n->mrg_len - NET_HDR > NET_MAX_FRAME)
                drop(n, D_TOO_LONG);
            else
                cb(ctx, n->mrg_buf + NET_HDR, n->mrg_len - NET_HDR, n->mrg_flags);
            continue;
        }

        u16 nbuf = mrg && len >= NET_HDR ? le16(buf + 10) : 1;
        if (len > n->rxbuf_size || len < NET_HDR || nbuf == 0 || nbuf > q->num) {
            frames++;
            n->st.rx_frames++;
            drop(n, len > n->rxbuf_size ? D_RX_LEN : len < NET_HDR ? D_HDR : D_MRG);
            rx_post(n, (u16)id);
            continue;
        }
        if (nbuf > 1) { /* first of several buffers: collect */
            n->mrg_left = (u16)(nbuf - 1);
            n->mrg_flags = buf[0];
            n->mrg_drop = 0;
            n->mrg_len = len;
            memcpy(n->mrg_buf, buf, len);
            rx_post(n, (u16)id);
            continue;
        }
        frames++;
        n->st.rx_frames++;
        if (len - NET_HDR > NET_MAX_FRAME)
            drop(n, D_TOO_LONG);
        else
            cb(ctx, buf + NET_HDR, len - NET_HDR, buf[0]); /* processed in place, then reposted */
        rx_post(n, (u16)id);
    }
    if (taken) {
        vq_kick(n->v, q);                 /* only if the device ran dry and asked */
        vq_set_irq(q, q->want_irq);       /* keep a suppressing used_event trailing */
    }
    return frames;
}

u8 *nic_tx_alloc(struct nic *n)
{
    if (!n->tx_nfree && nic_tx_reclaim(n) <= 0)
        return 0;
    u16 slot = n->tx_free[--n->tx_nfree];
    n->tx_state[slot] = 1;
    return n->txbufs + (u64)slot * BUF_SIZE + NET_HDR;
}

static u16 slot_of(struct nic *n, u8 *frame) { return (u16)((u64)(frame - NET_HDR - n->txbufs) / BUF_SIZE); }

void nic_tx_abort(struct nic *n, u8 *frame)
{
    u16 slot = slot_of(n, frame);
    n->tx_state[slot] = 0;
    n->tx_free[n->tx_nfree++] = slot;
}

void nic_tx_submit(struct nic *n, u8 *frame, u32 len)
{
    u16 slot = slot_of(n, frame);
    memset(frame - NET_HDR, 0, NET_HDR); /* no offloads: flags 0, GSO_NONE */
    volatile struct vring_desc *d = &n->tx.desc[slot];
    d->addr = (u64)(frame - NET_HDR);
    d->len = NET_HDR + len;
    d->flags = 0;
    d->next = 0;
    n->tx_state[slot] = 2;
    n->tx_inflight++;
    n->st.tx_frames++;
    vq_push(&n->tx, slot);
}

void nic_tx_kick(struct nic *n) { vq_kick(n->v, &n->tx); }

int nic_tx_reclaim(struct nic *n)
{
    if (n->broken)
        return -1;
    struct vq *q = &n->tx;
    u16 uidx = vq_used_idx(q);
    barrier();
    if ((u16)(uidx - q->last_used) > n->tx_inflight)
        return fail(n, "used-idx-jump");
    int done = 0;
    while (q->last_used != uidx) {
        u32 id = q->used[q->last_used & (q->num - 1)].id; /* len: nothing is device-writable */
        if (id >= q->num || n->tx_state[id] != 2)
            return fail(n, "used-id-bad");
        n->tx_state[id] = 0;
        n->tx_free[n->tx_nfree++] = (u16)id;
        n->tx_inflight--;
        q->last_used++;
        done++;
    }
    if (done)
        vq_set_irq(q, q->want_irq);
    return done;
}

int nic_wait(struct nic *n, u64 deadline, int want_tx)
{
    if (n->broken)
        return 1; /* let the caller see the error */
    if (n->v->irq_mode) {
        vq_set_irq(&n->rx, 1);
        vq_set_irq(&n->tx, want_tx);
        mb(); /* used_event written before re-checking the used rings */
        if (vq_pending(&n->rx) || (want_tx && vq_pending(&n->tx)))
            return 1;
        int r = vdev_wait_irq(n->v, deadline);
        vq_set_irq(&n->rx, 0); /* polled until idle again, like NAPI */
        vq_set_irq(&n->tx, 0);
        return r;
    }
    for (u32 spin = 0;; spin++) {
        if (vq_pending(&n->rx) || (want_tx && vq_pending(&n->tx)))
            return 1;
        if (!(spin & 63) && nic_status_poll_due(n))
            return 1; /* time to look for VIRTIO_NET_S_ANNOUNCE */
        cpu_relax();
        if (!(spin & 63) && clock_ns() >= deadline)
            return 0;
    }
}


/* ------------------------------------------------------------- announce */

int nic_announce_pending(struct nic *n)
{
    if (n->broken || !(n->v->features & F_NET_GUEST_ANNOUNCE))
        return 0;
    u64 now = clock_ns();
    if (!n->v->config_dirty && now < n->next_status_poll)
        return 0;
    n->v->config_dirty = 0; /* before the read: a change during it sets it again */
    n->next_status_poll = now + STATUS_POLL_NS;
    u16 status = 0;
    if (vdev_config(n->v, 6, &status, 2))
        return 0;
    return !!(status & NET_S_ANNOUNCE);
}

int nic_status_poll_due(struct nic *n)
{
    return (n->v->features & F_NET_GUEST_ANNOUNCE) && !n->v->irq_mode && clock_ns() >= n->next_status_poll;
}

u64 nic_announces(struct nic *n) { return n->announces; }
void nic_announce_retry(struct nic *n) { n->v->config_dirty = 1; }

int nic_announce_ack(struct nic *n)
{
    if (n->broken || !(n->v->features & F_NET_CTRL_VQ))
        return -1;
    struct vq *q = &n->ctrl;
    u8 *b = n->ctrlbuf;
    b[0] = CTRL_ANNOUNCE;
    b[1] = CTRL_ANNOUNCE_ACK;
    b[8] = 0xff; /* the device overwrites it */
    q->desc[0].addr = (u64)b;
    q->desc[0].len = 2;
    q->desc[0].flags = DESC_F_NEXT;
    q->desc[0].next = 1;
    q->desc[1].addr = (u64)(b + 8);
    q->desc[1].len = 1;
    q->desc[1].flags = DESC_F_WRITE;
    q->desc[1].next = 0;
    vq_push(q, 0);
    vq_kick(n->v, q);
    u64 deadline = clock_ns() + 1000000000ull;
    for (u32 spin = 0; vq_pending(q) == 0; spin++) {
        cpu_relax();
        if (!(spin & 63) && clock_ns() >= deadline)
            return fail(n, "ctrl-timeout");
    }
    barrier();
    if (vq_pending(q) != 1)
        return fail(n, "used-idx-jump");
    volatile struct vring_used_elem *e = &q->used[q->last_used & (q->num - 1)];
    u32 id = e->id, len = e->len;
    q->last_used++;
    if (id != 0)
        return fail(n, "used-id-bad");
    if (len != 1 || b[8] != 0)
        return 1; /* the device refused (VIRTIO_NET_ERR) or did not answer */
    n->announces++;
    return 0;
}

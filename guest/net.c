/*
 * net.c — a minimal network stack at CPL 3 on the first virtio-net NIC:
 * Ethernet, ARP (answers for our address; resolves and caches peers, with
 * retries), IPv4 (no fragments, header checksum verified), ICMP echo (answers
 * ping; sends it for net-ping), UDP (echo on port 7; send/receive for jobs).
 * Every field of every received frame is validated and each dropped frame is
 * counted by reason: a hostile host must not be able to crash the guest.
 *
 * The stack runs only while a net-* job polls it (net_poll): then it answers
 * ARP, ICMP echo and UDP echo whatever the job is.
 *
 * Jobs: net-echo, net-send, net-recv, net-ping (formats in README.md).
 */
#include "guest.h"

#define ETH_HLEN 14
#define ETH_P_IP 0x0800
#define ETH_P_ARP 0x0806
#define IP_PROTO_ICMP 1
#define IP_PROTO_UDP 17
#define MTU 1500
#define UDP_MAX_PAYLOAD (MTU - 20 - 8)
#define ICMP_MAX_PAYLOAD (MTU - 20 - 8)
#define UDP_ECHO_PORT 7
#define ARP_SLOTS 16
#define ARP_RETRY_NS 250000000ull
#define ARP_TIMEOUT_NS 3000000000ull
#define RX_BUDGET 64
#define NS 1000000000ull

static const char *const drop_names[D_COUNT] = {
    [D_RX_LEN] = "rx-len",         [D_HDR] = "hdr",           [D_MRG] = "mrg",
    [D_RUNT] = "runt",             [D_TOO_LONG] = "too-long", [D_MAC] = "mac",
    [D_SRC] = "src",               [D_ETHERTYPE] = "ethertype", [D_ARP_SHORT] = "arp-short",
    [D_ARP_BAD] = "arp-bad",       [D_IP_SHORT] = "ip-short", [D_IP_VERSION] = "ip-version",
    [D_IP_HLEN] = "ip-hlen",       [D_IP_LEN] = "ip-len",     [D_IP_CSUM] = "ip-csum",
    [D_IP_FRAG] = "ip-frag",       [D_IP_DST] = "ip-dst",     [D_IP_PROTO] = "ip-proto",
    [D_ICMP_SHORT] = "icmp-short", [D_ICMP_CSUM] = "icmp-csum", [D_ICMP_TYPE] = "icmp-type",
    [D_UDP_SHORT] = "udp-short",   [D_UDP_LEN] = "udp-len",   [D_UDP_CSUM] = "udp-csum",
    [D_UDP_PORT] = "udp-port",     [D_TX_FULL] = "tx-full",
};

struct arp_entry {
    u32 ip;
    u8 mac[6];
    u8 valid;
    u64 used;
};

struct netif {
    struct nic *nic;
    struct net_stats *st;
    u8 mac[6];
    u32 ip, mask;
    u16 ip_id;
    struct arp_entry arp[ARP_SLOTS];
    u64 arp_clock;
    u8 partial; /* the frame being handled had VIRTIO_NET_HDR_F_NEEDS_CSUM */
    /* the running job's hooks */
    u16 udp_port;
    void (*udp_cb)(void *ctx, const u8 *payload, u32 len);
    void (*echo_reply_cb)(void *ctx, u32 src, const u8 *icmp, u32 len);
    void *ctx;
};

static struct netif netif0;
static int netif_ready;
static u32 cfg_ip = 0x0a4d0002, cfg_prefix = 24; /* 10.77.0.2/24 */
static int cfg_bad;
static u32 cfg_rxbuf = 2048;

/* ------------------------------------------------------------ helpers */

typedef u64 __attribute__((aligned(1), may_alias)) u64_ua;
typedef u16 __attribute__((aligned(1), may_alias)) u16_ua;

static inline u16 rd16(const u8 *p) { return (u16)(p[0] << 8 | p[1]); }
static inline u32 rd32(const u8 *p) { return (u32)p[0] << 24 | (u32)p[1] << 16 | (u32)p[2] << 8 | p[3]; }
static inline void wr16(u8 *p, u32 v) { p[0] = (u8)(v >> 8), p[1] = (u8)v; }
static inline void wr32(u8 *p, u32 v) { p[0] = (u8)(v >> 24), p[1] = (u8)(v >> 16), p[2] = (u8)(v >> 8), p[3] = (u8)v; }
static inline int mac_eq(const u8 *a, const u8 *b) { return !memcmp(a, b, 6); }
static const u8 bcast_mac[6] = {0xff, 0xff, 0xff, 0xff, 0xff, 0xff};

/* Internet checksum (RFC 1071), summed 8 bytes at a time in memory order;
 * pieces summed one after another must have even lengths except the last. */
static u64 csum_add(u64 s, const u8 *p, u32 n)
{
    while (n >= 8) {
        u64 v = *(const u64_ua *)p;
        s += v;
        s += s < v;
        p += 8;
        n -= 8;
    }
    u64 t = 0;
    for (u32 i = 0; i < n; i++)
        t |= (u64)p[i] << (8 * i);
    s += t;
    s += s < t;
    return s;
}

/* Folded and complemented: 0 when verifying a correct sum; stored as is. */
static u16 csum_fold(u64 s)
{
    s = (s & 0xffffffffu) + (s >> 32);
    s = (s & 0xffffffffu) + (s >> 32);
    s = (s & 0xffff) + (s >> 16);
    s = (s & 0xffff) + (s >> 16);
    return (u16)~s;
}

static u64 pseudo_sum(u32 src, u32 dst, u8 proto, u32 len)
{
    u8 ph[12];
    wr32(ph, src);
    wr32(ph + 4, dst);
    ph[8] = 0;
    ph[9] = proto;
    wr16(ph + 10, len);
    return csum_add(0, ph, 12);
}

static void fmt_ip(char *buf, u32 ip) { fmt(buf, 16, "%u.%u.%u.%u", ip >> 24, (ip >> 16) & 255, (ip >> 8) & 255, ip & 255); }

/* "A.B.C.D"; returns 0 and *end past it. */
static int parse_ip(const char *s, const char **end, u32 *out)
{
    u32 ip = 0;
    for (int i = 0; i < 4; i++) {
        if (i && *s++ != '.')
            return -1;
        if (*s < '0' || *s > '9')
            return -1;
        u32 v = 0;
        int digits = 0;
        while (*s >= '0' && *s <= '9' && digits < 4)
            v = v * 10 + (u32)(*s++ - '0'), digits++;
        if (v > 255 || digits > 3)
            return -1;
        ip = ip << 8 | v;
    }
    *end = s;
    *out = ip;
    return 0;
}

static u32 prefix_mask(u32 prefix) { return prefix ? ~0u << (32 - prefix) : 0; }

/* ------------------------------------------------------- configuration */

void net_config_args(char **argv, int argc)
{
    for (int i = 0; i < argc; i++) {
        if (strneq(argv[i], "godwit.ip=", 10)) {
            const char *e;
            u32 ip;
            u64 prefix = 24;
            int bad = parse_ip(argv[i] + 10, &e, &ip);
            if (!bad && *e == '/')
                bad = parse_u64(e + 1, &e, &prefix) || prefix < 1 || prefix > 32;
            if (!bad && *e)
                bad = 1;
            u32 m = bad ? 0 : prefix_mask((u32)prefix);
            if (!bad && (ip == 0 || ip >= 0xe0000000u || (ip >> 24) == 127 ||
                         (prefix <= 30 && ((ip & ~m) == 0 || (ip & ~m) == ~m))))
                bad = 1; /* unusable as a host address */
            if (bad) {
                cfg_bad = 1;
                emit("net", "error=bad-ip arg=%s", argv[i]);
            } else {
                cfg_ip = ip, cfg_prefix = (u32)prefix, cfg_bad = 0;
            }
        } else if (strneq(argv[i], "godwit.net_rxbuf=", 17)) {
            const char *e;
            u64 v;
            if (parse_size(argv[i] + 17, &e, &v) || *e || v < 64 || v > 2048)
                emit("net", "error=bad-value arg=%s", argv[i]);
            else
                cfg_rxbuf = (u32)v;
        }
    }
}

u32 net_rxbuf_size(void) { return cfg_rxbuf; }

const char *net_ip_string(char *buf, int cap)
{
    char ip[16];
    fmt_ip(ip, cfg_ip);
    fmt(buf, cap, "%s/%u", ip, cfg_prefix);
    return buf;
}

/* --------------------------------------------------------------- drops */

static void drop(struct netif *nf, int reason)
{
    nf->st->dropped++;
    nf->st->drop[reason]++;
}

/* "reason:count,reason:count" of the drops since `base`, or "none". */
static void drop_list(char *buf, int cap, const struct net_stats *now, const struct net_stats *base)
{
    int n = 0;
    buf[0] = 0;
    for (int i = 0; i < D_COUNT; i++) {
        u64 d = now->drop[i] - base->drop[i];
        if (d)
            n += fmt(buf + n, cap - n, "%s%s:%lu", n ? "," : "", drop_names[i], d);
    }
    if (!n)
        fmt(buf, cap, "none");
}

/* ----------------------------------------------------------------- ARP */

static struct arp_entry *arp_find(struct netif *nf, u32 ip)
{
    for (int i = 0; i < ARP_SLOTS; i++)
        if (nf->arp[i].valid && nf->arp[i].ip == ip)
            return &nf->arp[i];
    return 0;
}

/* Learn ip -> mac; `create`: make an entry (else only refresh one we have). */
static void arp_learn(struct netif *nf, u32 ip, const u8 *mac, int create)
{
    struct arp_entry *e = arp_find(nf, ip);
    if (!e && !create)
        return;
    if (!e) { /* a free slot, else the least recently used */
        e = &nf->arp[0];
        for (int i = 0; i < ARP_SLOTS; i++) {
            if (!nf->arp[i].valid) {
                e = &nf->arp[i];
                break;
            }
            if (nf->arp[i].used < e->used)
                e = &nf->arp[i];
        }
    }
    e->ip = ip;
    memcpy(e->mac, mac, 6);
    e->valid = 1;
    e->used = ++nf->arp_clock;
}

static u8 *eth_begin(struct netif *nf, const u8 *dst, u16 type)
{
    u8 *f = nic_tx_alloc(nf->nic);
    if (!f)
        return 0;
    memcpy(f, dst, 6);
    memcpy(f + 6, nf->mac, 6);
    wr16(f + 12, type);
    return f;
}

static int arp_send(struct netif *nf, u16 op, const u8 *eth_dst, const u8 *tha, u32 tpa)
{
    u8 *f = eth_begin(nf, eth_dst, ETH_P_ARP);
    if (!f)
        return -1;
    u8 *a = f + ETH_HLEN;
    wr16(a, 1);
    wr16(a + 2, ETH_P_IP);
    a[4] = 6;
    a[5] = 4;
    wr16(a + 6, op);
    memcpy(a + 8, nf->mac, 6);
    wr32(a + 14, nf->ip);
    memcpy(a + 18, tha, 6);
    wr32(a + 24, tpa);
    nic_tx_submit(nf->nic, f, ETH_HLEN + 28);
    return 0;
}

static void arp_rx(struct netif *nf, const u8 *f, u32 len)
{
    const u8 *a = f + ETH_HLEN;
    if (len < ETH_HLEN + 28)
        return drop(nf, D_ARP_SHORT);
    u16 op = rd16(a + 6);
    if (rd16(a) != 1 || rd16(a + 2) != ETH_P_IP || a[4] != 6 || a[5] != 4 || (op != 1 && op != 2))
        return drop(nf, D_ARP_BAD);
    const u8 *sha = a + 8;
    u32 spa = rd32(a + 14), tpa = rd32(a + 24);
    if (sha[0] & 1)
        return drop(nf, D_SRC); /* a multicast sender hardware address */
    if (spa == nf->ip)
        return; /* someone else claims our address: ignore it */
    if (tpa == nf->ip) {
        if (spa)
            arp_learn(nf, spa, sha, 1);
        if (op == 1) {
            if (arp_send(nf, 2, sha, sha, spa))
                return drop(nf, D_TX_FULL);
            nf->st->arp++;
        }
    } else if (spa) {
        arp_learn(nf, spa, sha, 0); /* gratuitous or for someone else: refresh only */
    }
}

/* ---------------------------------------------------------------- IPv4 */

static void ip_header(struct netif *nf, u8 *ip, u32 dst, u8 proto, u32 payload_len)
{
    ip[0] = 0x45;
    ip[1] = 0;
    wr16(ip + 2, 20 + payload_len);
    wr16(ip + 4, nf->ip_id++);
    wr16(ip + 6, 0x4000); /* DF */
    ip[8] = 64;
    ip[9] = proto;
    ip[10] = ip[11] = 0;
    wr32(ip + 12, nf->ip);
    wr32(ip + 16, dst);
    *(u16_ua *)(ip + 10) = csum_fold(csum_add(0, ip, 20));
}

/* A UDP frame to (dst_mac, dst); the caller writes `len` payload bytes at
 * *payload, then udp_finish(). 0 if the TX ring is full. */
static u8 *udp_begin(struct netif *nf, const u8 *dst_mac, u32 dst, u16 sport, u16 dport, u32 len, u8 **payload)
{
    u8 *f = eth_begin(nf, dst_mac, ETH_P_IP);
    if (!f)
        return 0;
    u8 *ip = f + ETH_HLEN, *u = ip + 20;
    ip_header(nf, ip, dst, IP_PROTO_UDP, 8 + len);
    wr16(u, sport);
    wr16(u + 2, dport);
    wr16(u + 4, 8 + len);
    u[6] = u[7] = 0;
    *payload = u + 8;
    return f;
}

static void udp_finish(struct netif *nf, u8 *f, u32 len)
{
    u8 *ip = f + ETH_HLEN, *u = ip + 20;
    u16 c = csum_fold(csum_add(pseudo_sum(nf->ip, rd32(ip + 16), IP_PROTO_UDP, 8 + len), u, 8 + len));
    *(u16_ua *)(u + 6) = c ? c : 0xffff; /* 0 means "no checksum" */
    nic_tx_submit(nf->nic, f, ETH_HLEN + 20 + 8 + len);
}

static int bad_source(struct netif *nf, u32 src)
{
    u32 bcast = nf->ip | ~nf->mask;
    return src == 0 || src >= 0xe0000000u || (src >> 24) == 127 || src == nf->ip ||
           (nf->mask != ~0u && nf->mask != 0xfffffffeu && src == bcast);
}

static void icmp_rx(struct netif *nf, const u8 *f, const u8 *ip, u32 hl, u32 tot)
{
    const u8 *ic = ip + hl;
    u32 n = tot - hl;
    if (n < 8)
        return drop(nf, D_ICMP_SHORT);
    if (nf->partial)
        nf->st->csum_partial++; /* the host says the checksum is partial: trust it, as Linux does */
    else if (csum_fold(csum_add(0, ic, n)))
        return drop(nf, D_ICMP_CSUM);
    u32 src = rd32(ip + 12);
    if (ic[0] == 8 && ic[1] == 0) { /* echo request: same id, seq and data back */
        u8 *r = eth_begin(nf, f + 6, ETH_P_IP);
        if (!r)
            return drop(nf, D_TX_FULL);
        u8 *rip = r + ETH_HLEN, *ric = rip + 20;
        ip_header(nf, rip, src, IP_PROTO_ICMP, n);
        memcpy(ric, ic, n);
        ric[0] = 0;
        ric[2] = ric[3] = 0;
        *(u16_ua *)(ric + 2) = csum_fold(csum_add(0, ric, n));
        nic_tx_submit(nf->nic, r, ETH_HLEN + 20 + n);
        nf->st->icmp++;
        return;
    }
    if (ic[0] == 0 && ic[1] == 0 && nf->echo_reply_cb) {
        nf->echo_reply_cb(nf->ctx, src, ic, n);
        return;
    }
    drop(nf, D_ICMP_TYPE);
}

static void udp_rx(struct netif *nf, const u8 *f, const u8 *ip, u32 hl, u32 tot)
{
    const u8 *u = ip + hl;
    u32 n = tot - hl;
    if (n < 8)
        return drop(nf, D_UDP_SHORT);
    u32 ulen = rd16(u + 4);
    if (ulen < 8 || ulen > n)
        return drop(nf, D_UDP_LEN);
    u32 src = rd32(ip + 12);
    if (rd16(u + 6)) { /* 0: sent without a checksum */
        if (nf->partial)
            nf->st->csum_partial++; /* the host says it is partial: trust it, as Linux does */
        else if (csum_fold(csum_add(pseudo_sum(src, nf->ip, IP_PROTO_UDP, ulen), u, ulen)))
            return drop(nf, D_UDP_CSUM);
    }
    u16 sport = rd16(u), dport = rd16(u + 2);
    u32 len = ulen - 8;
    if (dport == UDP_ECHO_PORT) {
        if (!sport)
            return drop(nf, D_UDP_PORT);
        u8 *p, *r = udp_begin(nf, f + 6, src, UDP_ECHO_PORT, sport, len, &p);
        if (!r)
            return drop(nf, D_TX_FULL);
        memcpy(p, u + 8, len);
        udp_finish(nf, r, len);
        nf->st->udp_echo++;
        return;
    }
    if (nf->udp_cb && dport == nf->udp_port) {
        nf->udp_cb(nf->ctx, u + 8, len);
        return;
    }
    drop(nf, D_UDP_PORT);
}

static void ip_rx(struct netif *nf, const u8 *f, u32 len)
{
    const u8 *ip = f + ETH_HLEN;
    u32 n = len - ETH_HLEN;
    if (n < 20)
        return drop(nf, D_IP_SHORT);
    if (ip[0] >> 4 != 4)
        return drop(nf, D_IP_VERSION);
    u32 hl = (ip[0] & 15) * 4u;
    if (hl < 20 || hl > n)
        return drop(nf, D_IP_HLEN);
    u32 tot = rd16(ip + 2);
    if (tot < hl || tot > n) /* n may be larger: Ethernet padding */
        return drop(nf, D_IP_LEN);
    if (csum_fold(csum_add(0, ip, hl)))
        return drop(nf, D_IP_CSUM);
    if (rd16(ip + 6) & 0x3fff) /* MF or a fragment offset */
        return drop(nf, D_IP_FRAG);
    if (rd32(ip + 16) != nf->ip)
        return drop(nf, D_IP_DST);
    if (bad_source(nf, rd32(ip + 12)))
        return drop(nf, D_SRC);
    switch (ip[9]) {
    case IP_PROTO_ICMP:
        return icmp_rx(nf, f, ip, hl, tot);
    case IP_PROTO_UDP:
        return udp_rx(nf, f, ip, hl, tot);
    default:
        return drop(nf, D_IP_PROTO);
    }
}

static void rx_frame(void *ctx, u8 *f, u32 len, u8 flags)
{
    struct netif *nf = ctx;
    if (len < ETH_HLEN)
        return drop(nf, D_RUNT);
    if (!mac_eq(f, nf->mac) && !mac_eq(f, bcast_mac))
        return drop(nf, D_MAC);
    if (f[6] & 1)
        return drop(nf, D_SRC); /* multicast source address */
    nf->partial = flags & 1; /* VIRTIO_NET_HDR_F_NEEDS_CSUM */
    switch (rd16(f + 12)) {
    case ETH_P_ARP:
        return arp_rx(nf, f, len);
    case ETH_P_IP:
        return ip_rx(nf, f, len);
    default:
        return drop(nf, D_ETHERTYPE);
    }
}

/* VIRTIO_NET_S_ANNOUNCE (the VM moved to another host): a gratuitous ARP (a
 * broadcast request for our own address, sender = target = our IP) so that
 * switches learn our MAC's new port and peers refresh their caches, then
 * ANNOUNCE_ACK, which clears the bit. -1 on a device error. */
static int net_announce(struct netif *nf)
{
    if (!nic_announce_pending(nf->nic))
        return 0;
    static const u8 zero[6];
    if (arp_send(nf, 1, bcast_mac, zero, nf->ip)) {
        if (nic_tx_reclaim(nf->nic) < 0)
            return -1;
        if (arp_send(nf, 1, bcast_mac, zero, nf->ip)) {
            nic_announce_retry(nf->nic); /* TX ring full: the bit stays set, try again on the next poll */
            return 0;
        }
    }
    nic_tx_kick(nf->nic);
    int r = nic_announce_ack(nf->nic);
    if (r < 0)
        return -1;
    char ip[16], mac[18];
    fmt_ip(ip, nf->ip);
    fmt_mac(mac, nf->mac);
    emit("announce", "nic=0 ip=%s mac=%s garp=1 ack=%s announces=%lu", ip, mac, r ? "refused" : "ok",
         nic_announces(nf->nic));
    return 0;
}

/* Handles what has arrived (up to a budget), reclaims sent frames and sends
 * the replies; announces us when the device asks. Returns frames received, or
 * -1 on a device error. */
static int net_poll(struct netif *nf)
{
    int n = nic_rx(nf->nic, RX_BUDGET, rx_frame, nf);
    if (n < 0 || nic_tx_reclaim(nf->nic) < 0)
        return -1;
    nic_tx_kick(nf->nic);
    if (net_announce(nf) < 0)
        return -1;
    return n;
}

/* Until dst's MAC is known: requests every 250 ms, for 3 s. 0 ok, 1 timeout, -1 device error. */
static int arp_resolve(struct netif *nf, u32 dst, u8 *mac)
{
    u64 t0 = clock_ns(), next = t0;
    for (;;) {
        struct arp_entry *e = arp_find(nf, dst);
        if (e) {
            memcpy(mac, e->mac, 6);
            e->used = ++nf->arp_clock;
            return 0;
        }
        u64 now = clock_ns();
        if (now - t0 >= ARP_TIMEOUT_NS)
            return 1;
        if (now >= next) {
            static const u8 zero[6];
            if (!arp_send(nf, 1, bcast_mac, zero, dst))
                nic_tx_kick(nf->nic);
            next = now + ARP_RETRY_NS;
        }
        int r = net_poll(nf);
        if (r < 0)
            return -1;
        if (!r)
            nic_wait(nf->nic, MIN(next, t0 + ARP_TIMEOUT_NS), 0);
    }
}

/* ---------------------------------------------------------------- jobs */

struct net_job {
    struct args *a;
    struct netif *nf;
    int irq;
    struct net_stats base;
};

static int net_job_begin(struct args *a, struct net_job *j)
{
    j->a = a;
    j->irq = arg_mode(a);
    j->nf = &netif0;
    return 0;
}

/* After the arguments are checked: the NIC, the address, the mode. */
static int net_job_start(struct net_job *j)
{
    struct args *a = j->a;
    if (!nic_count())
        return job_error(a->job, "no-nic", "nics=0");
    if (cfg_bad)
        return job_error(a->job, "bad-ip", 0);
    struct netif *nf = j->nf;
    if (!netif_ready) {
        nf->nic = nic_get(0);
        nf->st = nic_stats(nf->nic);
        memcpy(nf->mac, nic_mac(nf->nic), 6);
        nf->ip = cfg_ip;
        nf->mask = prefix_mask(cfg_prefix);
        nf->ip_id = (u16)boot_id;
        netif_ready = 1;
    }
    nf->udp_cb = 0;
    nf->echo_reply_cb = 0;
    if (nic_set_mode(nf->nic, j->irq))
        return job_error(a->job, nic_error(nf->nic), 0);
    j->base = *nic_stats(nf->nic);
    if (!nic_link_up(nf->nic))
        say("%s: link is down", a->job);
    return 0;
}

static void net_job_end(struct net_job *j)
{
    j->nf->udp_cb = 0;
    j->nf->echo_reply_cb = 0;
    nic_set_mode(j->nf->nic, 0);
}

static int net_job_device_error(struct net_job *j)
{
    net_job_end(j);
    return job_error(j->a->job, nic_error(j->nf->nic), 0);
}

static const char *mode_name(struct net_job *j) { return j->irq ? "irq" : "poll"; }

/* dst=A.B.C.D or dst=A.B.C.D:PORT (with_port) */
static int arg_dst(struct args *a, int with_port, u32 *ip, u16 *port)
{
    const char *s = arg_str(a, "dst", 0), *e;
    u64 p = 0;
    int bad = !s || parse_ip(s, &e, ip);
    if (!bad && with_port)
        bad = *e != ':' || parse_u64(e + 1, &e, &p) || p < 1 || p > 65535;
    if (!bad && *e)
        bad = 1;
    if (bad && !a->bad_key)
        a->bad_key = "dst", a->bad_what = "bad-value";
    if (port)
        *port = (u16)p;
    return bad;
}

/* The destination must be another host on our subnet (there is no router). */
static int check_dst(struct net_job *j, u32 dst, u8 *mac)
{
    struct netif *nf = j->nf;
    char ip[16];
    fmt_ip(ip, dst);
    if (dst == nf->ip)
        return net_job_end(j), job_error(j->a->job, "bad-value", "key=dst dst=%s", ip);
    if ((dst & nf->mask) != (nf->ip & nf->mask) || bad_source(nf, dst))
        return net_job_end(j), job_error(j->a->job, "no-route", "dst=%s", ip);
    int r = arp_resolve(nf, dst, mac);
    if (r < 0)
        return net_job_device_error(j);
    if (r)
        return net_job_end(j), job_error(j->a->job, "arp-timeout", "dst=%s", ip);
    return 0;
}

/* <int>.<1 digit> of x10 */
#define DEC1(x10) (x10) / 10, (x10) % 10

/* net-echo,seconds=N: serve ARP, ICMP echo and UDP echo. */
int job_net_echo(struct args *a)
{
    struct net_job j;
    net_job_begin(a, &j);
    u64 secs = arg_num(a, "seconds", 10, 0, 1000000);
    if (args_check(a) || net_job_start(&j))
        return 1;
    struct netif *nf = j.nf;
    u64 end = clock_ns() + secs * NS;
    while (clock_ns() < end) {
        int r = net_poll(nf);
        if (r < 0)
            return net_job_device_error(&j);
        if (!r)
            nic_wait(nf->nic, end, 0);
    }
    net_job_end(&j);
    struct net_stats *s = nic_stats(nf->nic), *b = &j.base;
    char drops[640];
    drop_list(drops, sizeof drops, s, b);
    emit(a->job, "rx_frames=%lu tx_frames=%lu arp=%lu icmp=%lu udp_echo=%lu dropped=%lu drop_reasons=%s mode=%s "
                 "notifies=%lu irqs=%lu",
         s->rx_frames - b->rx_frames, s->tx_frames - b->tx_frames, s->arp - b->arp, s->icmp - b->icmp,
         s->udp_echo - b->udp_echo, s->dropped - b->dropped, drops, mode_name(&j), s->notifies - b->notifies,
         s->irqs - b->irqs);
    return 0;
}

/* idle,net=1: the same service as net-echo, polled by the idle job between its beats. */
static struct net_job serve_job;

void net_serve_begin(struct args *a) { net_job_begin(a, &serve_job); }

int net_serve_start(void) { return net_job_start(&serve_job); }

int net_serve_poll(void)
{
    if (net_poll(serve_job.nf) < 0) {
        net_job_device_error(&serve_job);
        return -1;
    }
    return 0;
}

u64 net_serve_end(void)
{
    net_job_end(&serve_job);
    return nic_stats(serve_job.nf->nic)->icmp - serve_job.base.icmp;
}

/* net-send,dst=IP:PORT,bytes=B,size=S: B bytes of UDP payload in datagrams of
 * S bytes (the last one shorter if S does not divide B), as fast as the TX
 * ring takes them. Payload: the datagram's sequence number (big-endian, first
 * 8 bytes, truncated for S < 8), then bytes (i * 7 + 1) & 0xff. */
int job_net_send(struct args *a)
{
    struct net_job j;
    net_job_begin(a, &j);
    u32 dst;
    u16 dport;
    arg_dst(a, 1, &dst, &dport);
    u64 bytes = arg_num(a, "bytes", 1 << 20, 1, 1ull << 40);
    u64 size = arg_num(a, "size", UDP_MAX_PAYLOAD, 1, UDP_MAX_PAYLOAD);
    if (args_check(a) || net_job_start(&j))
        return 1;
    struct netif *nf = j.nf;
    struct nic *nic = nf->nic;
    u8 mac[6];
    if (check_dst(&j, dst, mac))
        return 1;
    u8 pattern[UDP_MAX_PAYLOAD];
    for (u32 i = 0; i < sizeof pattern; i++)
        pattern[i] = (u8)(i * 7 + 1);
    u16 sport = (u16)(49152 + (boot_id >> 8) % 16384);
    u64 count = (bytes + size - 1) / size, sent = 0, sent_bytes = 0;
    u64 t0 = clock_ns(), last_progress = t0;
    while (sent < count || nic_tx_inflight(nic)) {
        int added = 0;
        while (sent < count) {
            u32 len = (u32)MIN(size, bytes - sent_bytes);
            u8 *p, *f = udp_begin(nf, mac, dst, sport, dport, len, &p);
            if (!f)
                break;
            memcpy(p, pattern, len);
            u64 seq = sent;
            for (int i = 0; i < 8 && (u32)i < len; i++)
                p[i] = (u8)(seq >> (56 - 8 * i));
            udp_finish(nf, f, len);
            sent++;
            sent_bytes += len;
            added++;
        }
        if (added)
            nic_tx_kick(nic);
        int inflight = nic_tx_inflight(nic);
        int r = net_poll(nf); /* also answers ARP from the receiver */
        if (r < 0)
            return net_job_device_error(&j);
        u64 now = clock_ns();
        if (nic_tx_inflight(nic) < inflight || added)
            last_progress = now;
        else if (now - last_progress > 10 * NS)
            return net_job_end(&j), job_error(a->job, "tx-timeout", "sent=%lu inflight=%d", sent, inflight);
        if (!r && nic_tx_inflight(nic) && (sent == count || !nic_tx_free(nic)))
            nic_wait(nic, last_progress + 10 * NS + 1, 1);
    }
    u64 us = (clock_ns() - t0) / 1000;
    net_job_end(&j);
    if (!us)
        us = 1;
    u64 mbps10 = sent_bytes * 80 / us;
    struct net_stats *s = nic_stats(nic);
    emit(a->job, "sent=%lu bytes=%lu mbps=%lu.%lu pps=%lu size=%lu mode=%s notifies=%lu irqs=%lu", sent, sent_bytes,
         DEC1(mbps10), sent * 1000000 / us, size, mode_name(&j), s->notifies - j.base.notifies,
         s->irqs - j.base.irqs);
    return 0;
}

struct recv_ctx {
    u64 datagrams, bytes, t_first, t_last;
};

static void recv_cb(void *p, const u8 *payload, u32 len)
{
    struct recv_ctx *c = p;
    u64 now = clock_ns();
    if (!c->datagrams++)
        c->t_first = now;
    c->t_last = now;
    c->bytes += len;
}

/* net-recv,port=P,seconds=N: count UDP datagrams to port P; rates from the
 * first datagram to the last; ends early 2 s after the last datagram. */
int job_net_recv(struct args *a)
{
    struct net_job j;
    net_job_begin(a, &j);
    u64 port = arg_num(a, "port", 0, 1, 65535);
    u64 secs = arg_num(a, "seconds", 10, 1, 1000000);
    if (!port && !a->bad_key)
        a->bad_key = "port", a->bad_what = "bad-value";
    if (port == UDP_ECHO_PORT && !a->bad_key)
        a->bad_key = "port", a->bad_what = "bad-value"; /* the echo service owns it */
    if (args_check(a) || net_job_start(&j))
        return 1;
    struct netif *nf = j.nf;
    struct recv_ctx c = {0, 0, 0, 0};
    nf->udp_port = (u16)port;
    nf->udp_cb = recv_cb;
    nf->ctx = &c;
    u64 end = clock_ns() + secs * NS;
    int idle = 0;
    for (;;) {
        u64 now = clock_ns();
        if (now >= end)
            break;
        if (c.datagrams && now - c.t_last >= 2 * NS) {
            idle = 1;
            break;
        }
        int r = net_poll(nf);
        if (r < 0)
            return net_job_device_error(&j);
        if (!r)
            nic_wait(nf->nic, c.datagrams ? MIN(end, c.t_last + 2 * NS) : end, 0);
    }
    net_job_end(&j);
    u64 us = (c.t_last - c.t_first) / 1000;
    u64 mbps10 = us ? c.bytes * 80 / us : 0, pps = us ? c.datagrams * 1000000 / us : 0;
    struct net_stats *s = nic_stats(nf->nic);
    emit(a->job, "datagrams=%lu bytes=%lu mbps=%lu.%lu pps=%lu idle=%d port=%lu mode=%s dropped=%lu notifies=%lu irqs=%lu",
         c.datagrams, c.bytes, DEC1(mbps10), pps, idle, port, mode_name(&j), s->dropped - j.base.dropped,
         s->notifies - j.base.notifies, s->irqs - j.base.irqs);
    if (!c.datagrams) {
        fmt(job_fail_reason, sizeof job_fail_reason, "%s:nothing", a->job);
        return 1;
    }
    return 0;
}

struct ping_ctx {
    u32 dst;
    u16 ident;
    u32 size;
    u64 sent, received, bad;
    u64 *t_sent;
    u32 *rtt;    /* ns, in arrival order */
    u8 *got;
};

static u8 ping_byte(u64 seq, u32 i) { return (u8)(seq * 31 + i); }

static void ping_reply_cb(void *p, u32 src, const u8 *ic, u32 n)
{
    struct ping_ctx *c = p;
    u64 now = clock_ns();
    u32 seq = rd16(ic + 6);
    if (src != c->dst || rd16(ic + 4) != c->ident)
        return; /* not ours */
    /* 16-bit sequence numbers wrap: take the newest sent one that matches */
    u64 s = c->sent ? c->sent - 1 : 0;
    s -= (u16)(s - seq);
    if (s >= c->sent || c->got[s] || n != 8 + c->size) {
        c->bad++;
        return;
    }
    for (u32 i = 0; i < c->size; i++)
        if (ic[8 + i] != ping_byte(s, i)) {
            c->bad++;
            return;
        }
    c->got[s] = 1;
    u64 rtt = now - c->t_sent[s];
    c->rtt[c->received++] = rtt > 0xffffffffu ? 0xffffffffu : (u32)rtt;
}

/* net-ping,dst=IP,count=N[,interval_us=1000][,size=56]: ICMP echo requests,
 * one every interval (never in bursts); waits up to 1 s for the last replies. */
int job_net_ping(struct args *a)
{
    struct net_job j;
    net_job_begin(a, &j);
    u32 dst;
    arg_dst(a, 0, &dst, 0);
    u64 count = arg_num(a, "count", 10, 1, 1u << 24);
    u64 interval = arg_num(a, "interval_us", 1000, 0, 60000000) * 1000;
    u64 size = arg_num(a, "size", 56, 0, ICMP_MAX_PAYLOAD);
    if (args_check(a) || net_job_start(&j))
        return 1;
    struct netif *nf = j.nf;
    struct ping_ctx c = {0};
    c.dst = dst;
    c.size = (u32)size;
    c.ident = (u16)(mix64(boot_id ^ clock_ns()) & 0xffff);
    c.t_sent = heap_alloc(count * 8, 64);
    c.rtt = heap_alloc(count * 4, 64);
    c.got = heap_alloc(count, 64);
    if (!c.t_sent || !c.rtt || !c.got)
        return net_job_end(&j), job_error(a->job, "nomem", 0);
    memset(c.got, 0, count);
    u8 mac[6];
    if (check_dst(&j, dst, mac))
        return 1;
    nf->echo_reply_cb = ping_reply_cb;
    nf->ctx = &c;
    u64 next = clock_ns(), last_sent = 0;
    for (;;) {
        u64 now = clock_ns();
        if (c.sent < count && now >= next) {
            u8 *f = eth_begin(nf, mac, ETH_P_IP);
            if (f) {
                u8 *ip = f + ETH_HLEN, *ic = ip + 20;
                ip_header(nf, ip, dst, IP_PROTO_ICMP, 8 + c.size);
                ic[0] = 8;
                ic[1] = 0;
                ic[2] = ic[3] = 0;
                wr16(ic + 4, c.ident);
                wr16(ic + 6, (u16)c.sent);
                for (u32 i = 0; i < c.size; i++)
                    ic[8 + i] = ping_byte(c.sent, i);
                *(u16_ua *)(ic + 2) = csum_fold(csum_add(0, ic, 8 + c.size));
                nic_tx_submit(nf->nic, f, ETH_HLEN + 20 + 8 + c.size);
                last_sent = clock_ns();
                c.t_sent[c.sent++] = last_sent;
                nic_tx_kick(nf->nic);
                next += interval;
                if (next < now)
                    next = now; /* late: no bursts to catch up */
            }
        }
        if (c.sent == count && (c.received == count || now >= last_sent + NS))
            break;
        int r = net_poll(nf);
        if (r < 0)
            return net_job_device_error(&j);
        if (!r && (c.sent == count || now < next))
            nic_wait(nf->nic, c.sent < count ? next : last_sent + NS, 0);
    }
    net_job_end(&j);
    u64 loss10 = (c.sent - c.received) * 1000 / c.sent;
    u32 p50 = 0, p99 = 0, max = 0;
    if (c.received) {
        sort_u32(c.rtt, c.received);
        p50 = c.rtt[(c.received - 1) / 2] / 1000;
        p99 = c.rtt[(c.received - 1) * 99 / 100] / 1000;
        max = c.rtt[c.received - 1] / 1000;
    }
    struct net_stats *s = nic_stats(nf->nic);
    emit(a->job, "sent=%lu received=%lu loss_pct=%lu.%lu rtt_p50_us=%u rtt_p99_us=%u rtt_max_us=%u bad=%lu size=%lu "
                 "interval_us=%lu mode=%s notifies=%lu irqs=%lu",
         c.sent, c.received, DEC1(loss10), p50, p99, max, c.bad, size, interval / 1000, mode_name(&j),
         s->notifies - j.base.notifies, s->irqs - j.base.irqs);
    if (!c.received) {
        fmt(job_fail_reason, sizeof job_fail_reason, "%s:no-reply", a->job);
        return 1;
    }
    return 0;
}

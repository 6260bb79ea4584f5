/*
 * jobs.c — the jobs named by godwit.job=NAME[,key=value...]: ready, idle,
 * blk-verify, blk-check, blk-bench, dirty, shell, probe, fault (the net-*
 * jobs are in net.c). Each prints its result as
 * one "@godwit job=NAME ..." line and returns 0 (pass) or 1 (fail, with
 * job_fail_reason set to "NAME:what").
 */
#include "guest.h"

#define SECTOR 512
#define MIB (1ull << 20)

int job_error(const char *job, const char *what, const char *extra_fmt, ...)
{
    char extra[160];
    va_list ap;
    va_start(ap, extra_fmt);
    vfmt(extra, sizeof extra, extra_fmt ? extra_fmt : "", ap);
    va_end(ap);
    emit(job, "error=%s%s%s", what, extra[0] ? " " : "", extra);
    fmt(job_fail_reason, sizeof job_fail_reason, "%s:%s", job, what);
    return 1;
}

static int arg_find(struct args *a, const char *k)
{
    for (int i = 0; i < a->n; i++)
        if (streq(a->key[i], k)) {
            a->used[i] = 1;
            return i;
        }
    return -1;
}

/* Numeric option (decimal, 0x-hex, optional K/M/G suffix). */
u64 arg_num(struct args *a, const char *k, u64 def, u64 min, u64 max)
{
    int i = arg_find(a, k);
    if (i < 0)
        return def;
    const char *e;
    u64 v;
    if (parse_size(a->val[i], &e, &v) || *e || v < min || v > max) {
        if (!a->bad_key)
            a->bad_key = k, a->bad_what = "bad-value";
        return def;
    }
    return v;
}

const char *arg_str(struct args *a, const char *k, const char *def)
{
    int i = arg_find(a, k);
    return i < 0 ? def : a->val[i];
}

/* Returns nonzero (after printing the error line) if any key was bad or unused. */
int args_check(struct args *a)
{
    for (int i = 0; i < a->n && !a->bad_key; i++)
        if (!a->used[i])
            a->bad_key = a->key[i], a->bad_what = "bad-key";
    if (!a->bad_key)
        return 0;
    return job_error(a->job, a->bad_what, "key=%s", a->bad_key);
}

int arg_mode(struct args *a)
{
    const char *m = arg_str(a, "mode", "poll");
    if (streq(m, "poll"))
        return 0;
    if (streq(m, "irq"))
        return 1;
    if (!a->bad_key)
        a->bad_key = "mode", a->bad_what = "bad-value";
    return 0;
}

/* Wait until the kvm-clock reaches t (ns), pausing. */
void wait_until(u64 t)
{
    while (clock_ns() < t)
        for (int i = 0; i < 64; i++)
            cpu_relax();
}

/* ---------------------------------------------------------------- ready */

static int job_ready(struct args *a)
{
    if (args_check(a))
        return 1;
    int cpus = smp_start_aps();
    char mac[18] = "none";
    if (nic_count())
        fmt_mac(mac, nic_mac(nic_get(0)));
    emit("ready", "cpus=%d mem_mib=%lu disks=%d nics=%d mac=%s", cpus, (ram_bytes + MIB - 1) >> 20, blk_count(),
         nic_count(), mac);
    return 0;
}

/* ----------------------------------------------------------------- idle */

/* A heartbeat line: `emit`'s, or with brief=1 only "@godwit job=JOB seq=N" (23-30 bytes instead of
 * ~60: every byte is a port exit of ~25 us on kvm_pvm, so a full line takes ~1.6 ms and a brief one
 * ~0.7, which is what limits how finely a host can time a stall by the gaps between beats). */
static void beat_line(const char *job, u64 seq, int brief)
{
    if (!brief) {
        emit(job, "seq=%lu", seq);
        return;
    }
    char line[64];
    int n = fmt(line, sizeof line - 1, "@godwit job=%s seq=%lu", job, seq);
    line[n++] = '\n';
    serial_write(line, n);
}

static int job_idle(struct args *a)
{
    u64 secs = arg_num(a, "seconds", 1, 0, 1000000);
    int net = (int)arg_num(a, "net", 0, 0, 1);
    const u64 period = arg_num(a, "period_us", 10000, 100, 10000000) * 1000;
    int brief = (int)arg_num(a, "brief", 0, 0, 1);
    if (net)
        net_serve_begin(a);
    if (args_check(a) || (net && net_serve_start()))
        return 1;
    u64 t0 = clock_ns(), end = t0 + secs * 1000000000ull, prev = t0, max_gap = 0, seq = 0, k = 0;
    for (;;) {
        u64 target = t0 + k * period;
        if (target >= end)
            break;
        if (net) {
            while (clock_ns() < target)
                if (net_serve_poll() < 0)
                    return 1;
        } else {
            wait_until(target);
        }
        u64 now = clock_ns();
        if (seq && now - prev > max_gap)
            max_gap = now - prev;
        prev = now;
        beat_line("idle", seq++, brief);
        /* After a stall (pause, migration) skip the missed beats, don't burst. */
        u64 next = (clock_ns() - t0) / period + 1;
        k = next > k + 1 ? next : k + 1;
    }
    if (net)
        emit("idle", "beats=%lu max_gap_us=%lu icmp=%lu", seq, max_gap / 1000, net_serve_end());
    else
        emit("idle", "beats=%lu max_gap_us=%lu", seq, max_gap / 1000);
    return 0;
}

/* ------------------------------------------------------ block patterns
 * Each 512-byte sector: magic, LBA, seed, pass, filler from (seed, LBA), and a
 * checksum of the first 504 bytes in the last 8, so blk-check can verify a
 * region written by another boot without knowing its seed.
 */
#define PAT_MAGIC 0x4b42544957444f47ull /* "GODWITBK" */

static u64 sector_sum(const u64 *w)
{
    u64 h = 0xcbf29ce484222325ull;
    for (int i = 0; i < 63; i++)
        h = (h ^ w[i]) * 0x100000001b3ull + (h >> 29);
    return h;
}

static void fill_sector(u64 *w, u64 lba, u64 seed, u64 pass)
{
    w[0] = PAT_MAGIC;
    w[1] = lba;
    w[2] = seed;
    w[3] = pass;
    u64 x = mix64(seed ^ lba);
    for (int i = 4; i < 63; i++)
        w[i] = x = x * 6364136223846793005ull + 1442695040888963407ull;
    w[63] = sector_sum(w);
}

/* 0 ok, else what is wrong. */
static const char *check_sector(const u64 *w, u64 lba)
{
    if (w[0] != PAT_MAGIC)
        return "magic";
    if (w[1] != lba)
        return "lba";
    if (w[63] != sector_sum(w))
        return "checksum";
    u64 x = mix64(w[2] ^ lba);
    for (int i = 4; i < 63; i++)
        if (w[i] != (x = x * 6364136223846793005ull + 1442695040888963407ull))
            return "filler";
    return 0;
}

struct region {
    struct blkdev *d;
    int disk;
    u64 offset, size;
};

static int arg_region(struct args *a, struct region *r, u64 def_size)
{
    r->disk = (int)arg_num(a, "disk", 0, 0, 64);
    r->offset = arg_num(a, "offset", 0, 0, ~0ull);
    u64 size = arg_num(a, "size", 0, 1, ~0ull);
    r->d = blk_get(r->disk);
    if (!a->bad_key && r->d) {
        u64 cap = blk_capacity(r->d) * SECTOR;
        if (r->offset % SECTOR || r->offset >= cap)
            a->bad_key = "offset", a->bad_what = "bad-value";
        else if (!size)
            size = MIN(def_size, cap - r->offset);
        if (!a->bad_key && (size % SECTOR || size > cap - r->offset))
            a->bad_key = "size", a->bad_what = "bad-value";
    }
    r->size = size;
    if (args_check(a))
        return 1;
    if (!r->d)
        return job_error(a->job, "no-disk", "disk=%d disks=%d", r->disk, blk_count());
    return 0;
}

#define CHUNK (256u * 1024)
static u64 verify_passes; /* across jobs: every pass of this boot has its own seed */

/* The common start of the pattern jobs: the region, a CHUNK buffer, and the completion mode.
 * Returns 0, or the job's failing status (already reported). */
static int region_open(struct args *a, struct region *r, int irq, u64 **buf)
{
    if (arg_region(a, r, MIB))
        return 1;
    *buf = heap_alloc(CHUNK, 4096);
    if (!*buf)
        return job_error(a->job, "nomem", 0);
    if (blk_set_mode(r->d, irq))
        return job_error(a->job, blk_error(r->d), 0);
    return 0;
}

static int job_blk_verify(struct args *a)
{
    struct region r;
    u64 *buf;
    u64 secs = arg_num(a, "seconds", 0, 0, 1000000);
    int irq = arg_mode(a);
    int failed = region_open(a, &r, irq, &buf);
    if (failed)
        return failed;
    struct blkdev *d = r.d;
    const char *mode = irq ? "irq" : "poll";

    if (blk_ro(d)) {
        /* Read-only disk: one write, which the VMM must refuse with IOERR. */
        fill_sector(buf, r.offset / SECTOR, boot_id, 0);
        int st = blk_rw(d, VIRTIO_BLK_T_OUT, r.offset / SECTOR, buf, SECTOR);
        blk_set_mode(d, 0);
        if (st < 0)
            return job_error(a->job, blk_error(d), "disk=%d ro=1", r.disk);
        if (st != VIRTIO_BLK_S_IOERR)
            return job_error(a->job, "ro-write-not-refused", "disk=%d ro=1 ro_write=%s status=%d", r.disk,
                             st == 0 ? "accepted" : "wrong-status", st);
        emit(a->job, "disk=%d ro=1 ro_write=refused passes=0 bytes=0 errors=0 mode=%s", r.disk, mode);
        return 0;
    }

    u64 t_end = clock_ns() + secs * 1000000000ull;
    u64 passes = 0, bytes = 0, errors = 0, seed = 0, bad_lba = 0;
    int bad_status = 0;
    const char *bad_kind = 0;
    do {
        seed = mix64(boot_id ^ mix64(++verify_passes));
        for (u64 off = 0; off < r.size; off += CHUNK) {
            u32 len = (u32)MIN((u64)CHUNK, r.size - off);
            u64 lba = (r.offset + off) / SECTOR;
            for (u32 s = 0; s < len / SECTOR; s++)
                fill_sector(buf + s * 64, lba + s, seed, verify_passes);
            int st = blk_rw(d, VIRTIO_BLK_T_OUT, lba, buf, len);
            if (st < 0)
                goto dev_error;
            if (st) {
                errors++;
                bad_status = st;
            }
        }
        if (blk_has_flush(d)) {
            int st = blk_rw(d, VIRTIO_BLK_T_FLUSH, 0, 0, 0);
            if (st < 0)
                goto dev_error;
            if (st) {
                errors++;
                bad_status = st;
            }
        }
        for (u64 off = 0; off < r.size; off += CHUNK) {
            u32 len = (u32)MIN((u64)CHUNK, r.size - off);
            u64 lba = (r.offset + off) / SECTOR;
            memset(buf, 0, len);
            int st = blk_rw(d, VIRTIO_BLK_T_IN, lba, buf, len);
            if (st < 0)
                goto dev_error;
            if (st) {
                errors++;
                bad_status = st;
                continue;
            }
            for (u32 s = 0; s < len / SECTOR; s++) {
                const u64 *w = buf + s * 64;
                const char *why = check_sector(w, lba + s);
                if (!why && (w[2] != seed || w[3] != verify_passes))
                    why = "stale";
                if (why) {
                    if (!bad_kind)
                        bad_kind = why, bad_lba = lba + s;
                    errors++;
                }
            }
        }
        passes++;
        bytes += r.size;
    } while (clock_ns() < t_end);
    blk_set_mode(d, 0);

    char extra[96] = "";
    if (bad_status)
        fmt(extra, sizeof extra, " status=%d", bad_status);
    if (bad_kind)
        fmt(extra + strlen(extra), (int)(sizeof extra - strlen(extra)), " first_bad_lba=%lu kind=%s", bad_lba,
            bad_kind);
    emit(a->job, "disk=%d ro=0 passes=%lu bytes=%lu errors=%lu seed=%016lx mode=%s%s", r.disk, passes, bytes,
         errors, seed, mode, extra);
    if (errors) {
        fmt(job_fail_reason, sizeof job_fail_reason, "%s:errors", a->job);
        return 1;
    }
    return 0;

dev_error:
    blk_set_mode(d, 0);
    return job_error(a->job, blk_error(d), "disk=%d passes=%lu", r.disk, passes);
}

static int job_blk_check(struct args *a)
{
    struct region r;
    u64 *buf;
    int irq = arg_mode(a);
    int failed = region_open(a, &r, irq, &buf);
    if (failed)
        return failed;
    struct blkdev *d = r.d;
    u64 errors = 0, seed = 0, seeds = 0, bad_lba = 0;
    const char *bad_kind = 0;
    int bad_status = 0;
    for (u64 off = 0; off < r.size; off += CHUNK) {
        u32 len = (u32)MIN((u64)CHUNK, r.size - off);
        u64 lba = (r.offset + off) / SECTOR;
        memset(buf, 0, len);
        int st = blk_rw(d, VIRTIO_BLK_T_IN, lba, buf, len);
        if (st < 0) {
            blk_set_mode(d, 0);
            return job_error(a->job, blk_error(d), "disk=%d", r.disk);
        }
        if (st) {
            errors += len / SECTOR;
            bad_status = st;
            continue;
        }
        for (u32 s = 0; s < len / SECTOR; s++) {
            const u64 *w = buf + s * 64;
            const char *why = check_sector(w, lba + s);
            if (why) {
                if (!errors++)
                    bad_kind = why, bad_lba = lba + s;
            } else if (!seeds || w[2] != seed) {
                seed = w[2];
                seeds++; /* counts changes of seed along the region */
            }
        }
    }
    blk_set_mode(d, 0);
    char extra[96] = "";
    if (bad_status)
        fmt(extra, sizeof extra, " status=%d", bad_status);
    if (bad_kind)
        fmt(extra + strlen(extra), (int)(sizeof extra - strlen(extra)), " first_bad_lba=%lu kind=%s", bad_lba,
            bad_kind);
    emit(a->job, "disk=%d ro=%d bytes=%lu errors=%lu seed=%016lx seed_runs=%lu%s", r.disk, blk_ro(d), r.size,
         errors, seed, seeds, extra);
    if (errors) {
        fmt(job_fail_reason, sizeof job_fail_reason, "%s:errors", a->job);
        return 1;
    }
    return 0;
}

/* ----------------------------------------------------------- blk-bench */

struct bench {
    u64 *t_submit; /* per slot */
    int *buf_of_slot, *free_bufs, nfree_bufs;
    u32 *lat;
    u64 done, errors;
    int last_status;
};

static void bench_cb(int slot, int status, void *p)
{
    struct bench *b = p;
    u64 dt = clock_ns() - b->t_submit[slot];
    b->lat[b->done++] = dt > 0xffffffffu ? 0xffffffffu : (u32)dt;
    if (status)
        b->errors++, b->last_status = status;
    b->free_bufs[b->nfree_bufs++] = b->buf_of_slot[slot];
}

static int job_blk_bench(struct args *a)
{
    int disk = (int)arg_num(a, "disk", 0, 0, 64);
    const char *rw = arg_str(a, "rw", "randread");
    u64 bs = arg_num(a, "bs", 4096, SECTOR, MIB);
    u64 qd = arg_num(a, "qd", 1, 1, 128);
    u64 n = arg_num(a, "n", 1000, 1, 1u << 22);
    int irq = arg_mode(a);
    int write = 0, rnd = 0;
    if (streq(rw, "randread"))
        rnd = 1;
    else if (streq(rw, "randwrite"))
        rnd = 1, write = 1;
    else if (streq(rw, "write"))
        write = 1;
    else if (!streq(rw, "read") && !a->bad_key)
        a->bad_key = "rw", a->bad_what = "bad-value";
    if (bs % SECTOR && !a->bad_key)
        a->bad_key = "bs", a->bad_what = "bad-value";
    if (args_check(a))
        return 1;
    struct blkdev *d = blk_get(disk);
    if (!d)
        return job_error(a->job, "no-disk", "disk=%d disks=%d", disk, blk_count());
    if (qd > (u64)blk_slots(d))
        return job_error(a->job, "bad-value", "key=qd max=%d", blk_slots(d));
    if (write && blk_ro(d))
        return job_error(a->job, "read-only", "disk=%d", disk);
    u64 span = MIN(64 * MIB, blk_capacity(d) * SECTOR) / bs;
    if (!span)
        return job_error(a->job, "disk-too-small", "disk=%d", disk);

    struct bench b = {0};
    u8 *bufs = heap_alloc(qd * bs, 4096);
    b.lat = heap_alloc(n * 4, 64);
    b.t_submit = heap_alloc(128 * 8, 64);
    b.buf_of_slot = heap_alloc(128 * sizeof(int), 64);
    b.free_bufs = heap_alloc(128 * sizeof(int), 64);
    if (!bufs || !b.lat || !b.t_submit || !b.buf_of_slot || !b.free_bufs)
        return job_error(a->job, "nomem", 0);
    for (u64 i = 0; i < qd; i++)
        b.free_bufs[b.nfree_bufs++] = (int)i;
    for (u64 i = 0; i < qd * bs; i += 8)
        *(u64 *)(bufs + i) = mix64(i ^ boot_id); /* not all zero, not compressible */
    if (blk_set_mode(d, irq))
        return job_error(a->job, blk_error(d), 0);

    u64 rng = boot_id | 1, issued = 0;
    u64 t0 = clock_ns();
    while (b.done < n) {
        int submitted = 0;
        while (issued < n && b.nfree_bufs > 0) {
            u64 blk;
            if (rnd) {
                rng ^= rng << 13, rng ^= rng >> 7, rng ^= rng << 17;
                blk = rng % span;
            } else {
                blk = issued % span;
            }
            int bi = b.free_bufs[--b.nfree_bufs];
            u64 now = clock_ns();
            int slot = blk_submit(d, write ? VIRTIO_BLK_T_OUT : VIRTIO_BLK_T_IN, blk * bs / SECTOR, bufs + bi * bs,
                                  (u32)bs);
            if (slot < 0) {
                b.nfree_bufs++;
                break;
            }
            b.buf_of_slot[slot] = bi;
            b.t_submit[slot] = now;
            issued++;
            submitted++;
        }
        if (submitted)
            blk_kick(d);
        if (blk_complete(d, bench_cb, &b)) {
            blk_set_mode(d, 0);
            return job_error(a->job, blk_error(d), "disk=%d done=%lu", disk, b.done);
        }
    }
    u64 elapsed_us = (clock_ns() - t0) / 1000;
    blk_set_mode(d, 0);
    if (!elapsed_us)
        elapsed_us = 1;
    sort_u32(b.lat, n);
    u64 iops = n * 1000000 / elapsed_us;
    u64 kibps = n * bs / 1024 * 1000000 / elapsed_us;
    u64 mibps10 = kibps * 10 / 1024;
    char extra[32] = "";
    if (b.errors)
        fmt(extra, sizeof extra, " status=%d", b.last_status);
    emit(a->job, "disk=%d rw=%s bs=%lu qd=%lu n=%lu mode=%s iops=%lu mibps=%lu.%lu lat_p50_us=%u lat_p99_us=%u "
                 "lat_max_us=%u errors=%lu%s",
         disk, rw, bs, qd, n, irq ? "irq" : "poll", iops, mibps10 / 10, mibps10 % 10, b.lat[(n - 1) / 2] / 1000,
         b.lat[(n - 1) * 99 / 100] / 1000, b.lat[n - 1] / 1000, b.errors, extra);
    if (b.errors) {
        fmt(job_fail_reason, sizeof job_fail_reason, "%s:errors", a->job);
        return 1;
    }
    return 0;
}

/* --------------------------------------------------------- blk-capacity
 * The disk's capacity now, or (wait_sectors=N) how long until it becomes N:
 * mode=poll re-reads config space every 10 ms (each read is an exit, so no
 * faster); mode=irq reads it once, then only after a configuration-change
 * interrupt (InterruptStatus bit 1), which is what the VMM must send.
 */
static int job_blk_capacity(struct args *a)
{
    int disk = (int)arg_num(a, "disk", 0, 0, 64);
    int wait = arg_find(a, "wait_sectors") >= 0;
    u64 want = arg_num(a, "wait_sectors", 0, 0, ~0ull);
    u64 secs = arg_num(a, "seconds", 10, 0, 1000000);
    int irq = arg_mode(a);
    if (args_check(a))
        return 1;
    struct blkdev *d = blk_get(disk);
    if (!d)
        return job_error(a->job, "no-disk", "disk=%d disks=%d", disk, blk_count());
    if (!wait) {
        if (blk_read_capacity(d))
            return job_error(a->job, blk_error(d), "disk=%d", disk);
        emit(a->job, "disk=%d sectors=%lu", disk, blk_capacity(d));
        return 0;
    }
    const char *mode = irq ? "irq" : "poll";
    u64 t0 = clock_ns(), end = t0 + secs * 1000000000ull;
    if (blk_set_mode(d, irq)) /* irq: a change noticed from here on interrupts */
        return job_error(a->job, blk_error(d), "disk=%d", disk);
    u64 irqs0 = blk_config_irqs(d);
    int bad = blk_read_capacity(d);
    for (u64 k = 1; !bad && blk_capacity(d) != want; k++) {
        u64 now = clock_ns();
        if (now >= end)
            break;
        if (irq) {
            bad = blk_wait_config(d, end) < 0;
        } else {
            wait_until(MIN(end, t0 + k * 10000000ull));
            bad = blk_read_capacity(d);
        }
    }
    u64 waited = (clock_ns() - t0) / 1000, cap = blk_capacity(d), irqs = blk_config_irqs(d) - irqs0;
    blk_set_mode(d, 0);
    char extra[48] = "";
    if (irq)
        fmt(extra, sizeof extra, " config_irqs=%lu", irqs);
    if (bad)
        return job_error(a->job, blk_error(d), "disk=%d sectors=%lu", disk, cap);
    if (cap != want)
        return job_error(a->job, "timeout", "disk=%d sectors=%lu wait_sectors=%lu waited_us=%lu mode=%s%s", disk,
                         cap, want, waited, mode, extra);
    emit(a->job, "disk=%d sectors=%lu waited_us=%lu mode=%s%s", disk, cap, waited, mode, extra);
    return 0;
}

/* ---------------------------------------------------------------- dirty */

/* Writes one 4 KiB page with content from (seed, page, generation) and
 * returns its checksum; the verifier recomputes the checksum from memory. */
static u64 page_sum(const volatile u64 *w)
{
    u64 h = 0x84222325cbf29ce4ull;
    for (int i = 0; i < 512; i++)
        h = (h ^ w[i]) * 0x100000001b3ull;
    return h;
}

static u64 write_page(u64 *w, u64 v)
{
    u64 h = 0x84222325cbf29ce4ull;
    for (int i = 0; i < 512; i++) {
        v += 0x9e3779b97f4a7c15ull;
        w[i] = v;
        h = (h ^ v) * 0x100000001b3ull;
    }
    return h;
}

static int job_dirty(struct args *a)
{
    u64 mib = arg_num(a, "mib", 64, 1, 1u << 20);
    u64 rate = arg_num(a, "rate", 0, 0, 1u << 20);
    u64 secs = arg_num(a, "seconds", 5, 0, 1000000);
    u64 beat = arg_num(a, "beat", 0, 0, 1);
    const u64 period = arg_num(a, "period_us", 10000, 100, 10000000) * 1000;
    int brief = (int)arg_num(a, "brief", 0, 0, 1);
    if (args_check(a))
        return 1;
    u64 pages = mib * 256;
    u64 *sums = heap_alloc(pages * 8, 4096);
    u8 *mem = heap_alloc(mib * MIB, 2 * MIB);
    if (!sums || !mem)
        return job_error(a->job, "nomem", "mib=%lu free_mib=%lu", mib, (heap_end - heap_base) >> 20);
    emit(a->job, "phase=start mib=%lu rate=%lu seconds=%lu addr=0x%lx", mib, rate, secs, (u64)mem);
    u64 t0 = clock_ns(), end = t0 + secs * 1000000000ull, written = 0, pos = 0, now = t0;
    /* beat=1: a heartbeat line every period_us (10 ms) as `idle` prints them (missed beats skipped),
     * so that a host can time a migration's downtime on a guest that dirties memory. */
    u64 beats = 0, next_beat = t0, prev_beat = t0, max_gap = 0;
    while (now < end) {
        if (beat && now >= next_beat) {
            if (beats && now - prev_beat > max_gap)
                max_gap = now - prev_beat;
            prev_beat = now;
            beat_line(a->job, beats++, brief);
            next_beat = t0 + ((now - t0) / period + 1) * period;
        }
        if (rate) {
            u64 allowed = rate * 256 * ((now - t0) / 1000) / 1000000;
            if (written >= allowed) {
                for (int i = 0; i < 64; i++)
                    cpu_relax();
                now = clock_ns();
                continue;
            }
        }
        sums[pos] = write_page((u64 *)(mem + pos * 4096), mix64(boot_id ^ (pos << 20) ^ written));
        written++;
        if (++pos == pages)
            pos = 0;
        now = clock_ns();
    }
    u64 errors = 0, first_bad = 0, checked = MIN(written, pages);
    for (u64 p = 0; p < checked; p++)
        if (page_sum((const u64 *)(mem + p * 4096)) != sums[p])
            if (!errors++)
                first_bad = p;
    if (beat)
        emit(a->job, "beats=%lu max_gap_us=%lu", beats, max_gap / 1000);
    emit(a->job, "mib=%lu pages_written=%lu verified=%d errors=%lu rate=%lu seconds=%lu", mib, written, !errors, errors,
         rate, secs);
    if (errors) {
        emit(a->job, "error=verify first_bad_addr=0x%lx", (u64)mem + first_bad * 4096);
        fmt(job_fail_reason, sizeof job_fail_reason, "%s:verify", a->job);
        return 1;
    }
    return 0;
}

/* ---------------------------------------------------------------- probe
 * Boot timing and the cost of the exits this guest uses, measured with the
 * guest's own clock: useful to compare VMMs.
 */
static u64 per_op_ns(u64 t0, u64 n) { return (clock_ns() - t0) / n; }

static int job_probe(struct args *a)
{
    u64 n = arg_num(a, "n", 200, 1, 1000000);
    u64 rep_test = arg_num(a, "rep", 0, 0, 1);
    if (args_check(a))
        return 1;
    u64 t0 = clock_ns();
    for (int i = 0; i < 10000; i++)
        clock_ns();
    u64 clock = per_op_ns(t0, 10000);
    t0 = clock_ns();
    for (u64 i = 0; i < n; i++)
        inb(0x3f8 + 5);
    u64 pio = per_op_ns(t0, n);
    t0 = clock_ns();
    for (u64 i = 0; i < n; i++)
        mmio_r32(lapic_base() + 0x80);
    u64 lapic = per_op_ns(t0, n);
    u64 mmio = 0;
    if (blk_count()) {
        t0 = clock_ns();
        for (u64 i = 0; i < n; i++)
            mmio_r32(blk_base(blk_get(0)));
        mmio = per_op_ns(t0, n);
    }
    /* Opt-in: a VMM that ignores KVM_EXIT_IO's count would print 1 byte of it. */
    static const char line[] = "godwit: probe: this line is written with rep outsb\n";
    u64 rep = 0;
    if (rep_test) {
        t0 = clock_ns();
        serial_write_rep(line, sizeof line - 1);
        rep = per_op_ns(t0, 1);
    }
    emit(a->job, "entry_us=%lu main_us=%lu clock_ns=%lu pio_ns=%lu lapic_ns=%lu mmio_ns=%lu rep_line_ns=%lu",
         tsc_to_ns(boot_entry_tsc) / 1000, main_ns / 1000, clock, pio, lapic, mmio, rep);
    return 0;
}

/* A deliberate exception, to test the fault path: ud2, gp or pf. */
static int job_fault(struct args *a)
{
    const char *kind = arg_str(a, "kind", "ud2");
    if (args_check(a))
        return 1;
    if (streq(kind, "ud2"))
        __asm__ volatile("ud2");
    else if (streq(kind, "gp"))
        __asm__ volatile("cli"); /* privileged at CPL 3 */
    else if (streq(kind, "pf"))
        (void)*(volatile u32 *)0x100000000ull; /* above the 4 GiB identity map */
    return job_error(a->job, "bad-value", "key=kind");
}

/* ----------------------------------------------------------------- acpi */

static u64 rd64(u64 a) { return *(volatile u64 *)a; }
static u32 rd32(u64 a) { return *(volatile u32 *)a; }

static int table_ok(u64 a, u64 len)
{
    u8 sum = 0;
    for (u64 i = 0; i < len; i++)
        sum += *(volatile u8 *)(a + i);
    return sum == 0;
}

/* Finds the RSDP the way an OS without a boot pointer does (the BIOS area), follows the XSDT to the
 * FADT and powers off or resets through its hardware-reduced sleep control or reset register. */
static int job_acpi(struct args *a)
{
    const char *action = arg_str(a, "action", "poweroff");
    if (args_check(a))
        return 1;
    u64 rsdp = 0;
    for (u64 p = 0xe0000; p < 0x100000; p += 16)
        if (rd64(p) == 0x2052545020445352ull) { /* "RSD PTR " */
            rsdp = p;
            break;
        }
    if (!rsdp || !table_ok(rsdp, 20) || !table_ok(rsdp, 36))
        return job_error(a->job, "no-rsdp", 0);
    u64 xsdt = rd64(rsdp + 24), fadt = 0;
    if (rd32(xsdt) != 0x54445358u || !table_ok(xsdt, rd32(xsdt + 4)))
        return job_error(a->job, "bad-xsdt", 0);
    for (u64 i = 36; i + 8 <= rd32(xsdt + 4); i += 8) {
        u64 t = rd64(xsdt + i);
        if (rd32(t) == 0x50434146u && table_ok(t, rd32(t + 4))) /* "FACP" */
            fadt = t;
    }
    if (!fadt || !(rd32(fadt + 112) & (1u << 20)))
        return job_error(a->job, "no-hw-reduced-fadt", 0);
    u16 sleep = (u16)rd64(fadt + 248), reset = (u16)rd64(fadt + 120);
    u8 reset_value = *(volatile u8 *)(fadt + 128);
    emit("acpi", "fadt=0x%lx sleep_port=0x%x reset_port=0x%x action=%s", fadt, sleep, reset, action);
    if (streq(action, "poweroff"))
        outb(sleep, (5 << 2) | 0x20); /* SLP_TYP of \_S5_ (5 in our DSDT), SLP_EN */
    else if (streq(action, "reset"))
        outb(reset, reset_value);
    else
        return job_error(a->job, "bad-value", "key=action");
    wait_until(clock_ns() + 1000000000ull);
    return job_error(a->job, "still-running", 0);
}

/* ---------------------------------------------------------------- shell */

static void shell_info(void)
{
    smp_start_aps(); /* idempotent: report the machine's vCPUs */
    emit("shell", "cmd=info uptime_us=%lu cpus=%d disks=%d mem_mib=%lu nics=%d", clock_us(), smp_cpus(), blk_count(),
         (ram_bytes + MIB - 1) >> 20, nic_count());
    char desc[200];
    for (int i = 0; i < blk_count(); i++) {
        struct blkdev *d = blk_get(i);
        int bad = blk_read_capacity(d); /* the capacity now: the VMM may have swapped the image */
        emit("shell", "cmd=info disk=%d %s%s%s", i, blk_describe(d, desc, sizeof desc), bad ? " error=" : "",
             bad ? blk_error(d) : "");
    }
    for (int i = 0; i < nic_count(); i++) {
        char ip[24] = "";
        if (i == 0)
            net_ip_string(ip, sizeof ip);
        emit("shell", "cmd=info nic=%d %s%s%s", i, nic_describe(nic_get(i), desc, sizeof desc), i ? "" : " ip=", ip);
    }
}

static int job_shell(struct args *a)
{
    if (args_check(a))
        return 1;
    char line[80];
    int len = 0, prev = 0;
    serial_write("godwit> ", 8);
    for (;;) {
        int c = serial_getc();
        if (c < 0) {
            wait_until(clock_ns() + 1000000); /* poll every ~1 ms */
            continue;
        }
        if (c == '\n' && prev == '\r') {
            prev = c;
            continue;
        }
        prev = c;
        if (c == '\r' || c == '\n') {
            serial_write("\n", 1);
            line[len] = 0;
            len = 0;
            if (streq(line, "info"))
                shell_info();
            else if (streq(line, "help"))
                say("commands: info help poweroff");
            else if (streq(line, "poweroff")) {
                emit("shell", "cmd=poweroff");
                jobs_stop = 1;
                return 0;
            } else if (line[0])
                say("unknown command: %s", line);
            serial_write("godwit> ", 8);
        } else if (c == 0x7f || c == 8) {
            if (len) {
                len--;
                serial_write("\b \b", 3);
            }
        } else if (c >= 0x20 && c < 0x7f && len < (int)sizeof line - 1) {
            char ch = (char)c;
            line[len++] = ch;
            serial_write(&ch, 1);
        }
    }
}

/* --------------------------------------------------------------- dispatch */

static const struct {
    const char *name;
    int (*fn)(struct args *);
} jobs[] = {
    {"ready", job_ready},         {"idle", job_idle},   {"blk-verify", job_blk_verify},
    {"blk-check", job_blk_check}, {"blk-bench", job_blk_bench}, {"dirty", job_dirty},
    {"shell", job_shell},         {"probe", job_probe},         {"blk-capacity", job_blk_capacity},
    {"fault", job_fault},         {"net-echo", job_net_echo},   {"net-send", job_net_send},
    {"net-recv", job_net_recv},   {"net-ping", job_net_ping},   {"acpi", job_acpi},
};

int run_job(char *spec)
{
    struct args a = {0};
    char *p = spec;
    a.job = p;
    while (*p && *p != ',')
        p++;
    while (*p) { /* ",key=value" pairs */
        *p++ = 0;
        char *k = p;
        while (*p && *p != ',')
            p++;
        char *eq = k;
        while (eq < p && *eq != '=')
            eq++;
        if (a.n == MAX_KEYS || eq == p || eq == k) {
            *p = 0;
            return job_error(a.job, "bad-key", "key=%s", k);
        }
        *eq = 0;
        a.key[a.n] = k;
        a.val[a.n++] = eq + 1;
    }
    if (!a.job[0])
        a.job = "unnamed";
    for (unsigned i = 0; i < sizeof jobs / sizeof jobs[0]; i++)
        if (streq(a.job, jobs[i].name))
            return jobs[i].fn(&a);
    return job_error(a.job, "unknown-job", 0);
}

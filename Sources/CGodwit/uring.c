#define _GNU_SOURCE
// io_uring through raw syscalls and the ring ABI of <linux/io_uring.h> (no liburing: its inline
// helpers are not callable from Swift, and the few operations Godwit needs fit here). One ring, no
// SQPOLL; the caller serialises submissions (prep + enter) and, separately, reaping.
#include "CGodwit.h"
#include <errno.h>
#include <sched.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <unistd.h>
#include <linux/io_uring.h>

struct godwit_uring {
    int fd;
    unsigned sq_entries;
    unsigned sq_mask, cq_mask;
    unsigned *sq_head, *sq_tail, *sq_array;
    unsigned *cq_head, *cq_tail;
    struct io_uring_sqe *sqes;
    struct io_uring_cqe *cqes;
    void *rings;
    size_t rings_size;
    size_t sqes_size;
    /// The SQ tail as this process last published it.
    unsigned tail;
};

static long uring_register(int fd, unsigned opcode, const void *arg, unsigned count) {
    long rc = syscall(SYS_io_uring_register, fd, opcode, arg, count);
    return rc < 0 ? -errno : rc;
}

void godwit_uring_close(struct godwit_uring *ring) {
    if (ring == NULL) return;
    if (ring->sqes != NULL && ring->sqes != MAP_FAILED) munmap(ring->sqes, ring->sqes_size);
    if (ring->rings != NULL && ring->rings != MAP_FAILED) munmap(ring->rings, ring->rings_size);
    if (ring->fd >= 0) close(ring->fd);
    free(ring);
}

int godwit_uring_open(unsigned entries, struct godwit_uring **out) {
    *out = NULL;
    struct io_uring_params params;
    memset(&params, 0, sizeof params);
    // Disabled until restricted (below); a completion queue twice the submission queue, as liburing does.
    params.flags = IORING_SETUP_R_DISABLED | IORING_SETUP_CQSIZE;
    params.cq_entries = entries * 2;
    int fd = (int)syscall(SYS_io_uring_setup, entries, &params);
    if (fd < 0) return -errno;
    struct godwit_uring *ring = calloc(1, sizeof *ring);
    if (ring == NULL) {
        close(fd);
        return -ENOMEM;
    }
    ring->fd = fd;
    if (!(params.features & IORING_FEAT_SINGLE_MMAP) || !(params.features & IORING_FEAT_NODROP)) {
        godwit_uring_close(ring);
        return -EOPNOTSUPP;  // kernels before 5.5: native AIO does the job there
    }
    size_t sq_size = params.sq_off.array + params.sq_entries * sizeof(unsigned);
    size_t cq_size = params.cq_off.cqes + params.cq_entries * sizeof(struct io_uring_cqe);
    ring->rings_size = sq_size > cq_size ? sq_size : cq_size;
    ring->rings = mmap(NULL, ring->rings_size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd, IORING_OFF_SQ_RING);
    ring->sqes_size = params.sq_entries * sizeof(struct io_uring_sqe);
    ring->sqes = mmap(NULL, ring->sqes_size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd, IORING_OFF_SQES);
    if (ring->rings == MAP_FAILED || ring->sqes == MAP_FAILED) {
        int error = errno;
        godwit_uring_close(ring);
        return -error;
    }
    char *base = ring->rings;
    ring->sq_entries = params.sq_entries;
    ring->sq_head = (unsigned *)(base + params.sq_off.head);
    ring->sq_tail = (unsigned *)(base + params.sq_off.tail);
    ring->sq_mask = *(unsigned *)(base + params.sq_off.ring_mask);
    ring->sq_array = (unsigned *)(base + params.sq_off.array);
    ring->cq_head = (unsigned *)(base + params.cq_off.head);
    ring->cq_tail = (unsigned *)(base + params.cq_off.tail);
    ring->cq_mask = *(unsigned *)(base + params.cq_off.ring_mask);
    ring->cqes = (struct io_uring_cqe *)(base + params.cq_off.cqes);
    ring->tail = *ring->sq_tail;
    for (unsigned i = 0; i < params.sq_entries; i++) ring->sq_array[i] = i;  // SQE i in slot i

    // The kernel's async workers (io-wq) stay on the CPUs this thread may use (--cpu-affinity);
    // best effort: kernels before 5.14 do not know the call.
    cpu_set_t cpus;
    if (sched_getaffinity(0, sizeof cpus, &cpus) == 0) (void)uring_register(fd, IORING_REGISTER_IOWQ_AFF, &cpus, sizeof cpus);

    // The ring can only read and write descriptors the process already holds: none of io_uring's
    // other operations (openat, connect, ...), which seccomp would not see, and no SQE flags.
    static const unsigned char allowed[] = {IORING_OP_NOP, IORING_OP_READV, IORING_OP_WRITEV, IORING_OP_READ, IORING_OP_WRITE};
    struct io_uring_restriction restrictions[sizeof allowed + 1];
    memset(restrictions, 0, sizeof restrictions);
    for (size_t i = 0; i < sizeof allowed; i++) {
        restrictions[i].opcode = IORING_RESTRICTION_SQE_OP;
        restrictions[i].sqe_op = allowed[i];
    }
    restrictions[sizeof allowed].opcode = IORING_RESTRICTION_SQE_FLAGS_ALLOWED;
    restrictions[sizeof allowed].sqe_flags = 0;
    long rc = uring_register(fd, IORING_REGISTER_RESTRICTIONS, restrictions, sizeof allowed + 1);
    if (rc == 0) rc = uring_register(fd, IORING_REGISTER_ENABLE_RINGS, NULL, 0);
    if (rc < 0) {
        godwit_uring_close(ring);
        return (int)rc;
    }
    *out = ring;
    return 0;
}

int godwit_uring_prep(struct godwit_uring *ring, int operation, int fd, uint64_t offset, const struct iovec *iovecs,
                      int iovec_count, uint64_t data) {
    unsigned head = __atomic_load_n(ring->sq_head, __ATOMIC_ACQUIRE);
    if (ring->tail - head >= ring->sq_entries) return -EBUSY;
    struct io_uring_sqe *sqe = &ring->sqes[ring->tail & ring->sq_mask];
    memset(sqe, 0, sizeof *sqe);
    sqe->fd = fd;
    sqe->off = offset;
    sqe->user_data = data;
    if (operation == GODWIT_URING_NOP) {
        sqe->opcode = IORING_OP_NOP;
        sqe->fd = -1;
    } else if (iovec_count == 1) {
        // One buffer: the plain form, without the kernel importing an iovec array.
        sqe->opcode = operation == GODWIT_URING_WRITE ? IORING_OP_WRITE : IORING_OP_READ;
        sqe->addr = (uint64_t)(uintptr_t)iovecs[0].iov_base;
        sqe->len = (uint32_t)iovecs[0].iov_len;
    } else {
        sqe->opcode = operation == GODWIT_URING_WRITE ? IORING_OP_WRITEV : IORING_OP_READV;
        sqe->addr = (uint64_t)(uintptr_t)iovecs;
        sqe->len = (uint32_t)iovec_count;
    }
    ring->tail++;
    __atomic_store_n(ring->sq_tail, ring->tail, __ATOMIC_RELEASE);
    return 0;
}

void godwit_uring_unprep(struct godwit_uring *ring, unsigned count) {
    // Only SQEs the kernel has not consumed (head is behind them): no SQPOLL thread reads the tail
    // outside io_uring_enter.
    unsigned head = __atomic_load_n(ring->sq_head, __ATOMIC_ACQUIRE);
    unsigned pending = ring->tail - head;
    ring->tail -= count < pending ? count : pending;
    __atomic_store_n(ring->sq_tail, ring->tail, __ATOMIC_RELEASE);
}

long godwit_uring_enter(struct godwit_uring *ring, unsigned submit, unsigned wait) {
    long rc = syscall(SYS_io_uring_enter, ring->fd, submit, wait, wait > 0 ? IORING_ENTER_GETEVENTS : 0, NULL, 0);
    return rc < 0 ? -errno : rc;
}

int godwit_uring_reap(struct godwit_uring *ring, int max, uint64_t *datas, int64_t *results) {
    unsigned head = *ring->cq_head;  // only reapers move it, and the caller serialises them
    unsigned tail = __atomic_load_n(ring->cq_tail, __ATOMIC_ACQUIRE);
    int n = 0;
    while (head != tail && n < max) {
        const struct io_uring_cqe *cqe = &ring->cqes[head & ring->cq_mask];
        datas[n] = cqe->user_data;
        results[n] = cqe->res;
        n++;
        head++;
    }
    __atomic_store_n(ring->cq_head, head, __ATOMIC_RELEASE);
    return n;
}

int godwit_uring_has_completions(const struct godwit_uring *ring) {
    return __atomic_load_n(ring->cq_tail, __ATOMIC_ACQUIRE) != __atomic_load_n(ring->cq_head, __ATOMIC_RELAXED);
}

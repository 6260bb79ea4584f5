#define _GNU_SOURCE
#include "CGodwit.h"
#include <spawn.h>
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <unistd.h>
#include <linux/falloc.h>
#include <linux/if_tun.h>
#include <net/if.h>
#include <sys/socket.h>
#include <sys/epoll.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <poll.h>
#include <time.h>
#include <linux/aio_abi.h>

int godwit_ioctl_ptr(int fd, unsigned long request, void *arg) { return ioctl(fd, request, arg); }
int godwit_ioctl_val(int fd, unsigned long request, unsigned long arg) { return ioctl(fd, request, arg); }
int godwit_open(const char *path, int flags, unsigned int mode) { return open(path, flags | O_CLOEXEC, (mode_t)mode); }
int godwit_memfd_create(const char *name) { return memfd_create(name, MFD_CLOEXEC); }
int godwit_memfd_create_sealable(const char *name) { return memfd_create(name, MFD_CLOEXEC | MFD_ALLOW_SEALING); }
#ifndef MFD_HUGE_2MB
#define MFD_HUGE_2MB (21U << 26)
#endif
int godwit_memfd_create_huge_2m(const char *name, int sealable) {
    return memfd_create(name, MFD_CLOEXEC | MFD_HUGETLB | MFD_HUGE_2MB | (sealable ? MFD_ALLOW_SEALING : 0));
}
const int GODWIT_MADV_HUGEPAGE = MADV_HUGEPAGE;
int godwit_get_seals(int fd) { return fcntl(fd, F_GET_SEALS); }
int godwit_add_seals(int fd, int seals) { return fcntl(fd, F_ADD_SEALS, seals); }
const int GODWIT_F_SEAL_SEAL = F_SEAL_SEAL;
const int GODWIT_F_SEAL_SHRINK = F_SEAL_SHRINK;
const int GODWIT_F_SEAL_GROW = F_SEAL_GROW;
int godwit_eventfd(unsigned int initval, int nonblocking) { return eventfd(initval, EFD_CLOEXEC | (nonblocking ? EFD_NONBLOCK : 0)); }
int godwit_fallocate(int fd, int mode, int64_t offset, int64_t length) { return fallocate(fd, mode, offset, length); }
const int GODWIT_FALLOC_FL_KEEP_SIZE = FALLOC_FL_KEEP_SIZE;
const int GODWIT_FALLOC_FL_PUNCH_HOLE = FALLOC_FL_PUNCH_HOLE;
const int GODWIT_FALLOC_FL_ZERO_RANGE = FALLOC_FL_ZERO_RANGE;
int godwit_errno(void) { return errno; }

#include <pthread.h>
#include <sched.h>
void godwit_set_thread_name(const char *name) {
    char buf[16];
    strncpy(buf, name, 15);
    buf[15] = 0;
    pthread_setname_np(pthread_self(), buf);
}
int godwit_set_affinity_of(pthread_t thread, const int *cpus, int count) {
    cpu_set_t set;
    CPU_ZERO(&set);
    for (int i = 0; i < count; i++) {
        if (cpus[i] < 0 || cpus[i] >= CPU_SETSIZE) return EINVAL;
        CPU_SET(cpus[i], &set);
    }
    return pthread_setaffinity_np(thread, sizeof set, &set);
}
int godwit_cpu_count(void) { return (int)sysconf(_SC_NPROCESSORS_CONF); }

void godwit_fence(void) { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
uint16_t godwit_load16(const void *address) { return __atomic_load_n((const uint16_t *)address, __ATOMIC_RELAXED); }
uint32_t godwit_load32(const void *address) { return __atomic_load_n((const uint32_t *)address, __ATOMIC_RELAXED); }
uint64_t godwit_load64(const void *address) { return __atomic_load_n((const uint64_t *)address, __ATOMIC_RELAXED); }
void godwit_store16(void *address, uint16_t value) { __atomic_store_n((uint16_t *)address, value, __ATOMIC_RELAXED); }
void godwit_store32(void *address, uint32_t value) { __atomic_store_n((uint32_t *)address, value, __ATOMIC_RELAXED); }
void godwit_store64(void *address, uint64_t value) { __atomic_store_n((uint64_t *)address, value, __ATOMIC_RELAXED); }
void godwit_atomic_or64(uint64_t *address, uint64_t bits) { __atomic_fetch_or(address, bits, __ATOMIC_RELAXED); }
uint64_t godwit_atomic_exchange64(uint64_t *address, uint64_t value) { return __atomic_exchange_n(address, value, __ATOMIC_ACQ_REL); }
int godwit_atomic_load_int(const int *address) { return __atomic_load_n(address, __ATOMIC_ACQUIRE); }
void godwit_atomic_store_int(int *address, int value) { __atomic_store_n(address, value, __ATOMIC_RELEASE); }
int godwit_atomic_exchange_int(int *address, int value) { return __atomic_exchange_n(address, value, __ATOMIC_ACQ_REL); }
void godwit_atomic_or8(uint8_t *address, uint8_t bits) { __atomic_fetch_or(address, bits, __ATOMIC_SEQ_CST); }

int godwit_set_nonblocking(int fd, int on) {
    int flags = fcntl(fd, F_GETFL);
    if (flags < 0) return -1;
    flags = on ? (flags | O_NONBLOCK) : (flags & ~O_NONBLOCK);
    return fcntl(fd, F_SETFL, flags);
}

static void godwit_kick_handler(int signo) { (void)signo; }

int godwit_kick_signal(void) { return SIGRTMIN + 1; }

int godwit_install_kick_handler(int signo) {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = godwit_kick_handler;
    sigemptyset(&sa.sa_mask);
    return sigaction(signo, &sa, NULL);
}

const unsigned long GODWIT_KVM_GET_API_VERSION = KVM_GET_API_VERSION;
const unsigned long GODWIT_KVM_CREATE_VM = KVM_CREATE_VM;
const unsigned long GODWIT_KVM_CHECK_EXTENSION = KVM_CHECK_EXTENSION;
const unsigned long GODWIT_KVM_GET_VCPU_MMAP_SIZE = KVM_GET_VCPU_MMAP_SIZE;
const unsigned long GODWIT_KVM_GET_SUPPORTED_CPUID = KVM_GET_SUPPORTED_CPUID;
const unsigned long GODWIT_KVM_GET_MSR_INDEX_LIST = KVM_GET_MSR_INDEX_LIST;
const unsigned long GODWIT_KVM_CREATE_VCPU = KVM_CREATE_VCPU;
const unsigned long GODWIT_KVM_SET_USER_MEMORY_REGION = KVM_SET_USER_MEMORY_REGION;
const unsigned long GODWIT_KVM_SET_TSS_ADDR = KVM_SET_TSS_ADDR;
const unsigned long GODWIT_KVM_SET_IDENTITY_MAP_ADDR = KVM_SET_IDENTITY_MAP_ADDR;
const unsigned long GODWIT_KVM_CREATE_IRQCHIP = KVM_CREATE_IRQCHIP;
const unsigned long GODWIT_KVM_CREATE_PIT2 = KVM_CREATE_PIT2;
const unsigned long GODWIT_KVM_IRQ_LINE = KVM_IRQ_LINE;
const unsigned long GODWIT_KVM_IRQFD = KVM_IRQFD;
const unsigned long GODWIT_KVM_IOEVENTFD = KVM_IOEVENTFD;
const unsigned long GODWIT_KVM_GET_DIRTY_LOG = KVM_GET_DIRTY_LOG;
const unsigned long GODWIT_KVM_RUN = KVM_RUN;
const unsigned long GODWIT_KVM_GET_REGS = KVM_GET_REGS;
const unsigned long GODWIT_KVM_SET_REGS = KVM_SET_REGS;
const unsigned long GODWIT_KVM_GET_SREGS = KVM_GET_SREGS;
const unsigned long GODWIT_KVM_SET_SREGS = KVM_SET_SREGS;
const unsigned long GODWIT_KVM_SET_CPUID2 = KVM_SET_CPUID2;
const unsigned long GODWIT_KVM_GET_MSRS = KVM_GET_MSRS;
const unsigned long GODWIT_KVM_SET_MSRS = KVM_SET_MSRS;
const unsigned long GODWIT_KVM_GET_MP_STATE = KVM_GET_MP_STATE;
const unsigned long GODWIT_KVM_SET_MP_STATE = KVM_SET_MP_STATE;
const unsigned long GODWIT_KVM_GET_LAPIC = KVM_GET_LAPIC;
const unsigned long GODWIT_KVM_SET_LAPIC = KVM_SET_LAPIC;
const unsigned long GODWIT_KVM_GET_XSAVE = KVM_GET_XSAVE;
const unsigned long GODWIT_KVM_SET_XSAVE = KVM_SET_XSAVE;
const unsigned long GODWIT_KVM_GET_XCRS = KVM_GET_XCRS;
const unsigned long GODWIT_KVM_SET_XCRS = KVM_SET_XCRS;
const unsigned long GODWIT_KVM_GET_DEBUGREGS = KVM_GET_DEBUGREGS;
const unsigned long GODWIT_KVM_SET_DEBUGREGS = KVM_SET_DEBUGREGS;
const unsigned long GODWIT_KVM_GET_IRQCHIP = KVM_GET_IRQCHIP;
const unsigned long GODWIT_KVM_SET_IRQCHIP = KVM_SET_IRQCHIP;
const unsigned long GODWIT_KVM_GET_PIT2 = KVM_GET_PIT2;
const unsigned long GODWIT_KVM_SET_PIT2 = KVM_SET_PIT2;
const unsigned long GODWIT_KVM_KVMCLOCK_CTRL = KVM_KVMCLOCK_CTRL;
const unsigned long GODWIT_KVM_CLEAR_DIRTY_LOG = KVM_CLEAR_DIRTY_LOG;
const unsigned long GODWIT_KVM_GET_FPU = KVM_GET_FPU;
const unsigned long GODWIT_KVM_SET_FPU = KVM_SET_FPU;
const unsigned long GODWIT_KVM_GET_CLOCK = KVM_GET_CLOCK;
const unsigned long GODWIT_KVM_SET_CLOCK = KVM_SET_CLOCK;
const unsigned long GODWIT_KVM_GET_VCPU_EVENTS = KVM_GET_VCPU_EVENTS;
const unsigned long GODWIT_KVM_SET_VCPU_EVENTS = KVM_SET_VCPU_EVENTS;
const unsigned long GODWIT_KVM_ENABLE_CAP = KVM_ENABLE_CAP;
const unsigned long GODWIT_KVM_GET_TSC_KHZ = KVM_GET_TSC_KHZ;

uint32_t godwit_run_exit_reason(const struct kvm_run *run) { return run->exit_reason; }
void godwit_run_set_immediate_exit(struct kvm_run *run, uint8_t value) { run->immediate_exit = value; }

void godwit_run_io(const struct kvm_run *run, uint8_t *direction, uint8_t *size, uint16_t *port,
                   uint32_t *count, uint64_t *data_offset) {
    *direction = run->io.direction;
    *size = run->io.size;
    *port = run->io.port;
    *count = run->io.count;
    *data_offset = run->io.data_offset;
}

uint8_t *godwit_run_mmio(struct kvm_run *run, uint64_t *address, uint32_t *length, uint8_t *is_write) {
    *address = run->mmio.phys_addr;
    *length = run->mmio.len;
    *is_write = run->mmio.is_write;
    return run->mmio.data;
}

const uint64_t *godwit_run_internal(struct kvm_run *run, uint32_t *suberror, uint32_t *ndata) {
    *suberror = run->internal.suberror;
    uint32_t n = run->internal.ndata;
    *ndata = n > 16 ? 16 : n;
    return (const uint64_t *)run->internal.data;
}

uint64_t godwit_run_fail_entry_reason(const struct kvm_run *run) { return run->fail_entry.hardware_entry_failure_reason; }
uint32_t godwit_run_system_event_type(const struct kvm_run *run) { return run->system_event.type; }

int godwit_tap_open(const char *name, char *actual_name) {
    if (godwit_broker_available()) return godwit_broker_tap_open(name, actual_name);
    return godwit_tap_attach(name, actual_name);
}

int godwit_tap_attach(const char *name, char *actual_name) {
    int fd = open("/dev/net/tun", O_RDWR | O_CLOEXEC | O_NONBLOCK);
    if (fd < 0) return -1;
    struct ifreq ifr;
    memset(&ifr, 0, sizeof ifr);
    ifr.ifr_flags = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR;
    if (name) strncpy(ifr.ifr_name, name, IFNAMSIZ - 1);
    if (ioctl(fd, TUNSETIFF, &ifr) < 0) {
        int saved = errno;
        close(fd);
        errno = saved;
        return -1;
    }
    memcpy(actual_name, ifr.ifr_name, IFNAMSIZ);
    actual_name[IFNAMSIZ - 1] = 0;
    return fd;
}

int godwit_tap_adopt(int fd, char *actual_name) {
    struct ifreq ifr;
    memset(&ifr, 0, sizeof ifr);
    if (ioctl(fd, TUNGETIFF, &ifr) < 0) return -1;
    if ((ifr.ifr_flags & (IFF_TAP | IFF_NO_PI | IFF_VNET_HDR)) != (IFF_TAP | IFF_NO_PI | IFF_VNET_HDR)) {
        errno = EINVAL;
        return -1;
    }
    int flags = fcntl(fd, F_GETFL);
    if (flags < 0 || fcntl(fd, F_SETFL, flags | O_NONBLOCK) < 0) return -1;
    if (fcntl(fd, F_SETFD, FD_CLOEXEC) < 0) return -1;
    memcpy(actual_name, ifr.ifr_name, IFNAMSIZ);
    actual_name[IFNAMSIZ - 1] = 0;
    return fd;
}

const unsigned long GODWIT_TUNSETOFFLOAD = TUNSETOFFLOAD;
const unsigned long GODWIT_TUNGETIFF = TUNGETIFF;
const unsigned long GODWIT_TUNSETVNETHDRSZ = TUNSETVNETHDRSZ;

int godwit_tap_set_offload(int fd, unsigned int flags) { return ioctl(fd, TUNSETOFFLOAD, flags); }
int godwit_tap_set_vnet_header_size(int fd, int size) { return ioctl(fd, TUNSETVNETHDRSZ, &size); }

int godwit_interface_set_up(const char *name, int up) {
    if (godwit_broker_available()) return godwit_broker_set_link(name, up);
    return godwit_interface_set_up_here(name, up);
}

int godwit_interface_set_up_here(const char *name, int up) {
    int s = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (s < 0) return -1;
    struct ifreq ifr;
    memset(&ifr, 0, sizeof ifr);
    strncpy(ifr.ifr_name, name, IFNAMSIZ - 1);
    int rc = ioctl(s, SIOCGIFFLAGS, &ifr);
    if (rc == 0) {
        if (up) ifr.ifr_flags |= IFF_UP; else ifr.ifr_flags &= ~IFF_UP;
        rc = ioctl(s, SIOCSIFFLAGS, &ifr);
    }
    int saved = errno;
    close(s);
    errno = saved;
    return rc;
}

int godwit_interface_mac(const char *name, unsigned char *mac) {
    int s = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (s < 0) return -1;
    struct ifreq ifr;
    memset(&ifr, 0, sizeof ifr);
    strncpy(ifr.ifr_name, name, IFNAMSIZ - 1);
    int rc = ioctl(s, SIOCGIFHWADDR, &ifr);
    if (rc == 0) memcpy(mac, ifr.ifr_hwaddr.sa_data, 6);
    int saved = errno;
    close(s);
    errno = saved;
    return rc;
}

const unsigned int GODWIT_TUN_F_CSUM = TUN_F_CSUM;
const unsigned int GODWIT_TUN_F_TSO4 = TUN_F_TSO4;
const unsigned int GODWIT_TUN_F_TSO6 = TUN_F_TSO6;
const unsigned int GODWIT_TUN_F_TSO_ECN = TUN_F_TSO_ECN;
const unsigned int GODWIT_TUN_F_UFO = TUN_F_UFO;

int godwit_epoll_create(void) { return epoll_create1(EPOLL_CLOEXEC); }

int godwit_epoll_ctl(int epfd, int op, int fd, uint32_t events, uint64_t token) {
    struct epoll_event ev;
    memset(&ev, 0, sizeof ev);
    ev.events = events;
    ev.data.u64 = token;
    return epoll_ctl(epfd, op, fd, &ev);
}

int godwit_epoll_wait(int epfd, uint64_t *tokens, uint32_t *events, int max, int timeout_ms) {
    struct epoll_event evs[64];
    if (max > 64) max = 64;
    int n = epoll_wait(epfd, evs, max, timeout_ms);
    for (int i = 0; i < n; i++) {
        tokens[i] = evs[i].data.u64;
        events[i] = evs[i].events;
    }
    return n;
}

const uint32_t GODWIT_EPOLLIN = EPOLLIN;
const uint32_t GODWIT_EPOLLOUT = EPOLLOUT;
const uint32_t GODWIT_EPOLLERR = EPOLLERR;
const uint32_t GODWIT_EPOLLHUP = EPOLLHUP;

int godwit_socketpair(int *fds) { return socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, fds); }

int godwit_accept(int fd) { return accept4(fd, NULL, NULL, SOCK_CLOEXEC); }

long godwit_send_fds(int socket, const void *buffer, size_t length, const int *fds, int nfds) {
    if (nfds < 0 || nfds > GODWIT_MAX_PASSED_FDS) { errno = EINVAL; return -1; }
    struct iovec iov = { .iov_base = (void *)buffer, .iov_len = length };
    // Aligned storage for the largest control message we send.
    union { char buf[CMSG_SPACE(sizeof(int) * GODWIT_MAX_PASSED_FDS)]; struct cmsghdr align; } control;
    memset(&control, 0, sizeof control);
    struct msghdr msg;
    memset(&msg, 0, sizeof msg);
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    if (nfds > 0) {
        msg.msg_control = control.buf;
        msg.msg_controllen = CMSG_SPACE(sizeof(int) * (size_t)nfds);
        struct cmsghdr *cmsg = CMSG_FIRSTHDR(&msg);
        cmsg->cmsg_level = SOL_SOCKET;
        cmsg->cmsg_type = SCM_RIGHTS;
        cmsg->cmsg_len = CMSG_LEN(sizeof(int) * (size_t)nfds);
        memcpy(CMSG_DATA(cmsg), fds, sizeof(int) * (size_t)nfds);
    }
    ssize_t n;
    do { n = sendmsg(socket, &msg, MSG_NOSIGNAL); } while (n < 0 && errno == EINTR);
    return (long)n;
}

long godwit_recv_fds(int socket, void *buffer, size_t length, int *fds, int max_fds, int *nfds, int *truncated) {
    *nfds = 0;
    *truncated = 0;
    struct iovec iov = { .iov_base = buffer, .iov_len = length };
    // Room for more descriptors than anyone may send, so that extras are seen (and closed), not lost.
    union { char buf[CMSG_SPACE(sizeof(int) * GODWIT_MAX_PASSED_FDS * 2)]; struct cmsghdr align; } control;
    struct msghdr msg;
    memset(&msg, 0, sizeof msg);
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.buf;
    msg.msg_controllen = sizeof control.buf;
    ssize_t n;
    do { n = recvmsg(socket, &msg, MSG_CMSG_CLOEXEC); } while (n < 0 && errno == EINTR);
    if (n < 0) return -1;
    if (msg.msg_flags & MSG_CTRUNC) *truncated = 1;
    for (struct cmsghdr *cmsg = CMSG_FIRSTHDR(&msg); cmsg != NULL; cmsg = CMSG_NXTHDR(&msg, cmsg)) {
        if (cmsg->cmsg_level != SOL_SOCKET || cmsg->cmsg_type != SCM_RIGHTS) continue;
        if (cmsg->cmsg_len < CMSG_LEN(0)) continue;
        size_t count = (cmsg->cmsg_len - CMSG_LEN(0)) / sizeof(int);
        const unsigned char *data = CMSG_DATA(cmsg);
        for (size_t i = 0; i < count; i++) {
            int fd;
            memcpy(&fd, data + i * sizeof(int), sizeof fd);
            if (*nfds < max_fds) {
                fds[(*nfds)++] = fd;
            } else {
                close(fd);
                *truncated = 1;
            }
        }
    }
    return (long)n;
}

// MARK: - Spawning supervised processes

int godwit_spawn(const char *path, char *const argv[], char *const envp[], const int *keep, int count) {
    if (count < 0 || count > 64) return -EINVAL;
    posix_spawn_file_actions_t actions;
    posix_spawnattr_t attributes;
    int rc = posix_spawn_file_actions_init(&actions);
    if (rc != 0) return -rc;
    rc = posix_spawnattr_init(&attributes);
    if (rc != 0) {
        posix_spawn_file_actions_destroy(&actions);
        return -rc;
    }
    // Move the kept descriptors out of the way first (one may already sit at 3 + j), then into place.
    int moved[64];
    for (int i = 0; i < count && rc == 0; i++) {
        moved[i] = 100 + i;
        rc = posix_spawn_file_actions_adddup2(&actions, keep[i], moved[i]);
    }
    for (int i = 0; i < count && rc == 0; i++) rc = posix_spawn_file_actions_adddup2(&actions, moved[i], 3 + i);
    if (rc == 0) rc = posix_spawn_file_actions_addclosefrom_np(&actions, 3 + count);
    sigset_t empty, all;
    sigemptyset(&empty);
    sigfillset(&all);
    if (rc == 0) rc = posix_spawnattr_setsigmask(&attributes, &empty);
    if (rc == 0) rc = posix_spawnattr_setsigdefault(&attributes, &all);
    if (rc == 0) rc = posix_spawnattr_setflags(&attributes, POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF);
    pid_t pid = -1;
    if (rc == 0) rc = posix_spawn(&pid, path, &actions, &attributes, argv, envp);
    posix_spawn_file_actions_destroy(&actions);
    posix_spawnattr_destroy(&attributes);
    return rc == 0 ? (int)pid : -rc;
}

// MARK: Linux native AIO

const size_t GODWIT_IOCB_SIZE = sizeof(struct iocb);

int godwit_io_setup(unsigned int nr_events, uint64_t *context) {
    aio_context_t ctx = 0;
    long rc = syscall(SYS_io_setup, nr_events, &ctx);
    if (rc < 0) return -errno;
    *context = (uint64_t)ctx;
    return 0;
}

int godwit_io_destroy(uint64_t context) {
    long rc = syscall(SYS_io_destroy, (aio_context_t)context);
    return rc < 0 ? -errno : 0;
}

void godwit_iocb_prep_rw(void *iocb, int fd, int is_write, uint64_t offset, const void *iovecs, int iovec_count,
                         uint64_t data, int resfd) {
    struct iocb *cb = iocb;
    memset(cb, 0, sizeof *cb);
    cb->aio_data = data;
    cb->aio_lio_opcode = is_write ? IOCB_CMD_PWRITEV : IOCB_CMD_PREADV;
    cb->aio_fildes = (uint32_t)fd;
    cb->aio_buf = (uint64_t)(uintptr_t)iovecs;
    cb->aio_nbytes = (uint64_t)iovec_count;
    cb->aio_offset = (int64_t)offset;
    if (resfd >= 0) {
        cb->aio_flags = IOCB_FLAG_RESFD;
        cb->aio_resfd = (uint32_t)resfd;
    }
}

void godwit_iocb_prep_poll_in(void *iocb, int fd, uint64_t data) {
    struct iocb *cb = iocb;
    memset(cb, 0, sizeof *cb);
    cb->aio_data = data;
    cb->aio_lio_opcode = IOCB_CMD_POLL;
    cb->aio_fildes = (uint32_t)fd;
    cb->aio_buf = POLLIN;
}

long godwit_io_submit(uint64_t context, long count, void **iocbs) {
    long rc = syscall(SYS_io_submit, (aio_context_t)context, count, (struct iocb **)iocbs);
    return rc < 0 ? -errno : rc;
}

long godwit_io_getevents(uint64_t context, long min, long max, uint64_t *datas, int64_t *results, int64_t timeout_ns) {
    struct io_event events[256];
    if (max > 256) max = 256;
    if (min > max) min = max;
    struct timespec timeout = {timeout_ns / 1000000000, timeout_ns % 1000000000};
    long rc = syscall(SYS_io_getevents, (aio_context_t)context, min, max, events, timeout_ns < 0 ? NULL : &timeout);
    if (rc < 0) return -errno;
    for (long i = 0; i < rc; i++) {
        datas[i] = events[i].data;
        results[i] = events[i].res;
    }
    return rc;
}

/// The kernel's completion ring header (fs/aio.c, the ABI libaio reads too).
struct godwit_aio_ring {
    unsigned id, nr, head, tail, magic, compat_features, incompat_features, header_length;
};

int godwit_aio_ring_usable(uint64_t context) {
    const struct godwit_aio_ring *ring = (const struct godwit_aio_ring *)(uintptr_t)context;
    return ring != NULL && ring->magic == 0xa10a10a1 && ring->incompat_features == 0 && ring->nr > 0
        && ring->header_length == sizeof(struct godwit_aio_ring);
}

long godwit_aio_ring_reap(uint64_t context, long max, uint64_t *datas, int64_t *results) {
    // As libaio's user-space reaping and QEMU's linux-aio: events between head and tail are complete
    // (the kernel publishes tail after writing them); head is handed back once they are copied.
    struct godwit_aio_ring *ring = (struct godwit_aio_ring *)(uintptr_t)context;
    const struct io_event *events = (const struct io_event *)(ring + 1);
    unsigned nr = ring->nr;
    unsigned head = __atomic_load_n(&ring->head, __ATOMIC_RELAXED);
    unsigned tail = __atomic_load_n(&ring->tail, __ATOMIC_ACQUIRE);
    if (head >= nr || tail >= nr) return -EIO;  // not a ring the kernel keeps: refuse rather than read out of it
    long n = 0;
    while (head != tail && n < max) {
        datas[n] = events[head].data;
        results[n] = events[head].res;
        n++;
        head = (head + 1) % nr;
    }
    __atomic_store_n(&ring->head, head, __ATOMIC_RELEASE);
    return n;
}

int godwit_aio_ring_has_events(uint64_t context) {
    const struct godwit_aio_ring *ring = (const struct godwit_aio_ring *)(uintptr_t)context;
    if (ring == NULL || __atomic_load_n(&ring->magic, __ATOMIC_RELAXED) != 0xa10a10a1) return 1;
    return __atomic_load_n(&ring->head, __ATOMIC_ACQUIRE) != __atomic_load_n(&ring->tail, __ATOMIC_ACQUIRE);
}

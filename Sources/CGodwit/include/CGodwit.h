// CGodwit: the C shim for what Swift cannot import — variadic calls (ioctl, open, fcntl),
// function-like macros (KVM_* ioctl numbers, CMSG_*), and kvm_run's anonymous union.
#ifndef CGODWIT_H
#define CGODWIT_H

#include <stdint.h>
#include <pthread.h>
#include <stddef.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <linux/kvm.h>

// Syscalls Swift cannot call directly (variadic in libc).
int godwit_ioctl_ptr(int fd, unsigned long request, void *arg);
int godwit_ioctl_val(int fd, unsigned long request, unsigned long arg);
int godwit_open(const char *path, int flags, unsigned int mode);
/// memfd_create with MFD_CLOEXEC.
int godwit_memfd_create(const char *name);
/// memfd_create with MFD_CLOEXEC | MFD_ALLOW_SEALING (seals can be added later).
int godwit_memfd_create_sealable(const char *name);
/// memfd_create of 2 MiB hugetlbfs pages (MFD_HUGETLB | MFD_HUGE_2MB), sealable when `sealable` is not 0.
int godwit_memfd_create_huge_2m(const char *name, int sealable);
/// madvise(2)'s MADV_HUGEPAGE: back the range with transparent huge pages where the host allows it.
extern const int GODWIT_MADV_HUGEPAGE;
/// fcntl(F_GET_SEALS): the seals of a memfd (GODWIT_F_SEAL_*), or -1 with errno.
int godwit_get_seals(int fd);
/// fcntl(F_ADD_SEALS) (the memfd must have been created with MFD_ALLOW_SEALING).
int godwit_add_seals(int fd, int seals);
extern const int GODWIT_F_SEAL_SEAL;
extern const int GODWIT_F_SEAL_SHRINK;
extern const int GODWIT_F_SEAL_GROW;
/// eventfd with EFD_CLOEXEC, and EFD_NONBLOCK when `nonblocking`.
int godwit_eventfd(unsigned int initval, int nonblocking);
int godwit_fallocate(int fd, int mode, int64_t offset, int64_t length);
extern const int GODWIT_FALLOC_FL_KEEP_SIZE;
extern const int GODWIT_FALLOC_FL_PUNCH_HOLE;
extern const int GODWIT_FALLOC_FL_ZERO_RANGE;
int godwit_set_nonblocking(int fd, int on);
int godwit_errno(void);
/// Names the calling thread (visible in ps/top); at most 15 characters are kept.
void godwit_set_thread_name(const char *name);
/// Restricts `thread` (threads it creates later inherit it) to the `count` CPUs in `cpus`
/// (pthread_setaffinity_np); returns 0 or an errno value (EINVAL for a CPU outside 0..<CPU_SETSIZE).
int godwit_set_affinity_of(pthread_t thread, const int *cpus, int count);
/// How many CPUs the kernel knows (configured, online or not).
int godwit_cpu_count(void);


// Linux native AIO (<linux/aio_abi.h>) through raw syscalls: glibc has no wrappers and Swift
// cannot call the variadic syscall(). Every function returns the result or -errno.
/// The size of one struct iocb, for callers that allocate them.
extern const size_t GODWIT_IOCB_SIZE;
/// io_setup(nr_events): writes the new context to `context`.
int godwit_io_setup(unsigned int nr_events, uint64_t *context);
int godwit_io_destroy(uint64_t context);
/// Fills the iocb at `iocb` for a vectored read (`is_write` 0) or write at `offset` of `fd`; with
/// `resfd` >= 0 its completion also signals that eventfd (IOCB_FLAG_RESFD).
void godwit_iocb_prep_rw(void *iocb, int fd, int is_write, uint64_t offset, const void *iovecs, int iovec_count,
                         uint64_t data, int resfd);
/// Fills the iocb at `iocb` for IOCB_CMD_POLL (POLLIN) on `fd`: completes when `fd` becomes readable.
void godwit_iocb_prep_poll_in(void *iocb, int fd, uint64_t data);
/// io_submit of `count` iocbs (pointers in `iocbs`): how many were queued, or -errno.
long godwit_io_submit(uint64_t context, long count, void **iocbs);
/// io_getevents: waits for at least `min` (at most `max`) completions, up to `timeout_ns` (< 0: for
/// ever); writes each event's data and result to `datas` and `results`. Returns the count or -errno.
long godwit_io_getevents(uint64_t context, long min, long max, uint64_t *datas, int64_t *results, int64_t timeout_ns);
/// Whether the context's completion ring (mapped in user space at `context`) may hold events: a
/// cheap check before io_getevents when polling. 1 when it cannot tell.
int godwit_aio_ring_has_events(uint64_t context);
/// Whether the context's completion ring has the layout user-space reaping needs (magic, no
/// incompatible features).
int godwit_aio_ring_usable(uint64_t context);
/// Takes up to `max` completions from the context's ring in user space (no io_getevents), as libaio
/// and QEMU do; the caller serialises reapers and never calls io_getevents meanwhile. Returns the
/// count or -EIO for a ring that does not look like the kernel's.
long godwit_aio_ring_reap(uint64_t context, long max, uint64_t *datas, int64_t *results);

// io_uring (uring.c), through raw syscalls. Every function returns the result or -errno. A ring is
// made disabled, restricted to NOP/READ/WRITE/READV/WRITEV without SQE flags, then enabled: it can
// only read and write descriptors the process holds. No SQPOLL: submissions happen in io_uring_enter.
struct godwit_uring;

enum { GODWIT_URING_READ = 0, GODWIT_URING_WRITE = 1, GODWIT_URING_NOP = 2 };
/// io_uring_setup for `entries` submissions (a completion queue twice as large), restricted and enabled.
int godwit_uring_open(unsigned entries, struct godwit_uring **ring);
void godwit_uring_close(struct godwit_uring *ring);
/// Fills and publishes the next SQE (-EBUSY when the queue is full): a read or write of `iovecs` at
/// `offset` of `fd` (the plain form for one buffer), or a NOP.
int godwit_uring_prep(struct godwit_uring *ring, int operation, int fd, uint64_t offset, const struct iovec *iovecs,
                      int iovec_count, uint64_t data);
/// Takes back up to `count` of the last published SQEs the kernel has not consumed.
void godwit_uring_unprep(struct godwit_uring *ring, unsigned count);
/// io_uring_enter: submits `submit` SQEs and, if `wait` > 0, waits until that many completions are there.
long godwit_uring_enter(struct godwit_uring *ring, unsigned submit, unsigned wait);
/// Takes up to `max` completions from the ring (user data and result of each); returns how many.
int godwit_uring_reap(struct godwit_uring *ring, int max, uint64_t *datas, int64_t *results);
/// Whether completions are waiting in the ring.
int godwit_uring_has_completions(const struct godwit_uring *ring);

// A full memory barrier (guest memory is shared with running vCPUs and other processes).
void godwit_fence(void);

/// Atomically ORs `bits` into the byte at `address` (shared dirty-log bitmaps).
void godwit_atomic_or8(uint8_t *address, uint8_t bits);
void godwit_atomic_or64(uint64_t *address, uint64_t bits);
/// Single-access loads and stores of naturally aligned 2-, 4- and 8-byte values in memory another
/// party writes at the same time (guest RAM, rings): never torn, unlike a memcpy.
uint16_t godwit_load16(const void *address);
uint32_t godwit_load32(const void *address);
uint64_t godwit_load64(const void *address);
void godwit_store16(void *address, uint16_t value);
void godwit_store32(void *address, uint32_t value);
void godwit_store64(void *address, uint64_t value);
uint64_t godwit_atomic_exchange64(uint64_t *address, uint64_t value);
int godwit_atomic_load_int(const int *address);
void godwit_atomic_store_int(int *address, int value);
int godwit_atomic_exchange_int(int *address, int value);

// Signal used to kick a vCPU thread out of KVM_RUN; the handler does nothing.
int godwit_install_kick_handler(int signo);
int godwit_kick_signal(void);

// TAP devices (<linux/if_tun.h>): open /dev/net/tun as IFF_TAP | IFF_NO_PI | IFF_VNET_HDR.
/// Attaches to TAP `name` (created if it does not exist; "" lets the kernel pick a name). Writes the
/// interface name (IFNAMSIZ = 16 bytes) to `actual_name`. Returns the fd, or -1 with errno.
int godwit_tap_open(const char *name, char *actual_name);
/// Checks that `fd` (passed in) is a TAP opened IFF_TAP | IFF_NO_PI | IFF_VNET_HDR, makes it
/// non-blocking and close-on-exec, and writes its name to `actual_name`. Returns fd, or -1 with errno.
int godwit_tap_adopt(int fd, char *actual_name);
extern const unsigned long GODWIT_TUNSETOFFLOAD;
extern const unsigned long GODWIT_TUNGETIFF;
extern const unsigned long GODWIT_TUNSETVNETHDRSZ;
/// TUNSETOFFLOAD with TUN_F_* flags.
int godwit_tap_set_offload(int fd, unsigned int flags);
/// TUNSETVNETHDRSZ.
int godwit_tap_set_vnet_header_size(int fd, int size);
/// Sets or clears IFF_UP on interface `name`.
int godwit_interface_set_up(const char *name, int up);
/// Reads the MAC address of interface `name` into `mac` (6 bytes).
int godwit_interface_mac(const char *name, unsigned char *mac);
extern const unsigned int GODWIT_TUN_F_CSUM;
extern const unsigned int GODWIT_TUN_F_TSO4;
extern const unsigned int GODWIT_TUN_F_TSO6;
extern const unsigned int GODWIT_TUN_F_TSO_ECN;
extern const unsigned int GODWIT_TUN_F_UFO;

// epoll, with the (packed) epoll_event kept on the C side.
int godwit_epoll_create(void);
/// EPOLL_CTL_ADD (op 1), DEL (2) or MOD (3) of `fd` with `events`, reported back with `token`.
int godwit_epoll_ctl(int epfd, int op, int fd, uint32_t events, uint64_t token);
/// Waits up to `timeout_ms`; fills `tokens` and `events` (at most `max`); returns the count or -1.
int godwit_epoll_wait(int epfd, uint64_t *tokens, uint32_t *events, int max, int timeout_ms);
extern const uint32_t GODWIT_EPOLLIN;
extern const uint32_t GODWIT_EPOLLOUT;
extern const uint32_t GODWIT_EPOLLERR;
extern const uint32_t GODWIT_EPOLLHUP;

// KVM ioctl numbers (function-like macros in <linux/kvm.h>).
extern const unsigned long GODWIT_KVM_GET_API_VERSION;
extern const unsigned long GODWIT_KVM_CREATE_VM;
extern const unsigned long GODWIT_KVM_CHECK_EXTENSION;
extern const unsigned long GODWIT_KVM_GET_VCPU_MMAP_SIZE;
extern const unsigned long GODWIT_KVM_GET_SUPPORTED_CPUID;
extern const unsigned long GODWIT_KVM_GET_MSR_INDEX_LIST;
extern const unsigned long GODWIT_KVM_CREATE_VCPU;
extern const unsigned long GODWIT_KVM_SET_USER_MEMORY_REGION;
extern const unsigned long GODWIT_KVM_SET_TSS_ADDR;
extern const unsigned long GODWIT_KVM_SET_IDENTITY_MAP_ADDR;
extern const unsigned long GODWIT_KVM_CREATE_IRQCHIP;
extern const unsigned long GODWIT_KVM_CREATE_PIT2;
extern const unsigned long GODWIT_KVM_IRQ_LINE;
extern const unsigned long GODWIT_KVM_IRQFD;
extern const unsigned long GODWIT_KVM_IOEVENTFD;
extern const unsigned long GODWIT_KVM_GET_DIRTY_LOG;
extern const unsigned long GODWIT_KVM_RUN;
extern const unsigned long GODWIT_KVM_GET_REGS;
extern const unsigned long GODWIT_KVM_SET_REGS;
extern const unsigned long GODWIT_KVM_GET_SREGS;
extern const unsigned long GODWIT_KVM_SET_SREGS;
extern const unsigned long GODWIT_KVM_SET_CPUID2;
extern const unsigned long GODWIT_KVM_GET_MSRS;
extern const unsigned long GODWIT_KVM_SET_MSRS;
extern const unsigned long GODWIT_KVM_GET_MP_STATE;
extern const unsigned long GODWIT_KVM_SET_MP_STATE;
extern const unsigned long GODWIT_KVM_GET_LAPIC;
extern const unsigned long GODWIT_KVM_SET_LAPIC;
extern const unsigned long GODWIT_KVM_GET_XSAVE;
extern const unsigned long GODWIT_KVM_SET_XSAVE;
extern const unsigned long GODWIT_KVM_GET_XCRS;
extern const unsigned long GODWIT_KVM_SET_XCRS;
extern const unsigned long GODWIT_KVM_GET_DEBUGREGS;
extern const unsigned long GODWIT_KVM_SET_DEBUGREGS;
extern const unsigned long GODWIT_KVM_GET_IRQCHIP;
extern const unsigned long GODWIT_KVM_SET_IRQCHIP;
extern const unsigned long GODWIT_KVM_GET_PIT2;
extern const unsigned long GODWIT_KVM_SET_PIT2;
extern const unsigned long GODWIT_KVM_KVMCLOCK_CTRL;
extern const unsigned long GODWIT_KVM_CLEAR_DIRTY_LOG;
extern const unsigned long GODWIT_KVM_GET_FPU;
extern const unsigned long GODWIT_KVM_SET_FPU;
extern const unsigned long GODWIT_KVM_GET_CLOCK;
extern const unsigned long GODWIT_KVM_SET_CLOCK;
extern const unsigned long GODWIT_KVM_GET_VCPU_EVENTS;
extern const unsigned long GODWIT_KVM_SET_VCPU_EVENTS;
extern const unsigned long GODWIT_KVM_ENABLE_CAP;
extern const unsigned long GODWIT_KVM_GET_TSC_KHZ;

// kvm_run accessors (the exit payload is an anonymous union).
uint32_t godwit_run_exit_reason(const struct kvm_run *run);
void godwit_run_set_immediate_exit(struct kvm_run *run, uint8_t value);
/// KVM_EXIT_IO: direction (0 in, 1 out), size, port, count, and the data offset into the run page.
void godwit_run_io(const struct kvm_run *run, uint8_t *direction, uint8_t *size, uint16_t *port,
                   uint32_t *count, uint64_t *data_offset);
/// KVM_EXIT_MMIO: address, length, is_write, and a pointer to the 8 data bytes.
uint8_t *godwit_run_mmio(struct kvm_run *run, uint64_t *address, uint32_t *length, uint8_t *is_write);
/// KVM_EXIT_INTERNAL_ERROR: suberror, number of data words, and a pointer to them (at most 16).
const uint64_t *godwit_run_internal(struct kvm_run *run, uint32_t *suberror, uint32_t *ndata);
/// KVM_EXIT_FAIL_ENTRY: hardware entry failure reason.
uint64_t godwit_run_fail_entry_reason(const struct kvm_run *run);
/// KVM_EXIT_SYSTEM_EVENT: type.
uint32_t godwit_run_system_event_type(const struct kvm_run *run);

// Unix stream sockets with file-descriptor passing (SCM_RIGHTS; the CMSG_* macros are C-only).
/// The most descriptors `godwit_send_fds` sends in one message (vhost-user itself allows 8).
#define GODWIT_MAX_PASSED_FDS 16
/// socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC); fills `fds[2]`.
int godwit_socketpair(int *fds);
/// accept4(SOCK_CLOEXEC) on a listening socket.
int godwit_accept(int fd);
/// sendmsg of `length` bytes with `nfds` descriptors (0...GODWIT_MAX_PASSED_FDS) as SCM_RIGHTS,
/// MSG_NOSIGNAL. Returns the bytes sent or -1 with errno (EINVAL when `nfds` is out of range).
long godwit_send_fds(int socket, const void *buffer, size_t length, const int *fds, int nfds);
/// recvmsg of up to `length` bytes with MSG_CMSG_CLOEXEC. Received descriptors are stored in `fds`
/// (up to `max_fds`; any beyond are closed) and counted in `*nfds`; `*truncated` is set to 1 when
/// descriptors were dropped (more than `max_fds`, or MSG_CTRUNC). Returns the bytes received (0 at
/// end of file) or -1 with errno; on -1 no descriptor is left open.
long godwit_recv_fds(int socket, void *buffer, size_t length, int *fds, int max_fds, int *nfds, int *truncated);

// The VMM's network broker (broker.c): a process left in the caller's network namespace that hands
// the namespaced VMM TCP sockets and TAPs. Without a broker these fall back to the direct calls.
/// 1 when this process has a broker (a `godwit vm` in its namespaces), else 0.
int godwit_broker_available(void);
/// Forks the broker (call single-threaded, before unsharing); 0 or -1 with errno.
int godwit_broker_start(void);
/// socket(domain, type | SOCK_CLOEXEC, protocol) in the caller's network namespace: through the
/// broker (TCP over IPv4/IPv6 only) when there is one. Returns the descriptor or -1 with errno.
int godwit_host_socket(int domain, int type, int protocol);
/// The TAP `name` (NULL or "": a new one) attached through the broker; its name in `actual_name` (16 bytes).
int godwit_broker_tap_open(const char *name, char *actual_name);
/// Brings a TAP the broker opened up (1) or down (0); 0 or -1 with errno.
int godwit_broker_set_link(const char *name, int up);
/// Tells the broker to hand out nothing but sockets from now on; 0 or -1 with errno.
int godwit_broker_seal(void);
/// The direct paths behind godwit_tap_open and godwit_interface_set_up (what the broker itself calls):
/// attach the TAP `name` (NULL or "": a new one) in this process's network namespace, and bring an
/// interface of this namespace up or down.
int godwit_tap_attach(const char *name, char *actual_name);
int godwit_interface_set_up_here(const char *name, int up);

// Process sandbox (sandbox.c): namespaces entered by a constructor before Swift's main, then
// no_new_privs, no capabilities and a libseccomp allow-list once set-up is done (GodwitSystem's Sandbox).
/// 1 in the process the constructor moved into new user, mount, IPC, network and PID namespaces
/// (it ran with GODWIT_SANDBOX_NAMESPACES=1 and is PID 1 there), else 0.
int godwit_sandbox_in_namespaces(void);
/// prctl(PR_SET_NO_NEW_PRIVS, 1) for the calling thread (seccomp's thread sync extends it to all).
int godwit_sandbox_set_no_new_privs(void);
/// Empties the effective, permitted, inheritable, ambient and bounding capability sets of every
/// thread of the process (capabilities are per thread: the others are reached with a SIGSYS from
/// tgkill, which libdispatch's workers leave unblocked), then checks each thread's
/// /proc/self/task/TID/status. Returns 0, or -1 with errno and `*failed_tid` set to the thread that
/// kept a capability (0 when the failure is not a thread's). Call before loading the seccomp filter.
int godwit_sandbox_drop_capabilities(int *failed_tid);

// seccomp filters built with libseccomp. Comparison operators for a rule's conditions:
#define GODWIT_SECCOMP_CMP_EQ 0        // argument == value
#define GODWIT_SECCOMP_CMP_NE 1        // argument != value
#define GODWIT_SECCOMP_CMP_MASKED_EQ 2 // (argument & mask) == value
// Actions:
#define GODWIT_SECCOMP_ALLOW 0
#define GODWIT_SECCOMP_ERRNO 1         // fail the call with `errno_value`
#define GODWIT_SECCOMP_KILL_PROCESS 2
struct godwit_seccomp_condition {
    uint32_t argument;  // 0...5
    uint32_t operation; // GODWIT_SECCOMP_CMP_*
    uint64_t mask;      // for GODWIT_SECCOMP_CMP_MASKED_EQ
    uint64_t value;
};
/// 1 when this build has libseccomp (header at compile time, library linked), else 0.
int godwit_seccomp_available(void);
/// A new filter whose default action fails every other syscall with `default_errno`; foreign
/// architectures (i386 int 0x80, x32) kill the process. NULL with errno on failure.
void *godwit_seccomp_new(int default_errno);
/// Adds one rule for the syscall `name` (resolved with seccomp_syscall_resolve_name; an unknown
/// name is -ENOENT). All `count` conditions must hold. Returns 0 or a negative errno.
int godwit_seccomp_add(void *filter, const char *name, int action, int errno_value,
                       const struct godwit_seccomp_condition *conditions, uint32_t count);
/// Loads the filter into every thread of the process (SECCOMP_FILTER_FLAG_TSYNC). Returns 0 or a
/// negative errno; a positive value is the id of a thread that could not be synchronised.
int godwit_seccomp_load(void *filter);
void godwit_seccomp_release(void *filter);
/// The syscall number of `name` on this architecture, or -1 when libseccomp does not know it.
int godwit_seccomp_resolve(const char *name);

// MARK: - Spawning supervised processes

/// posix_spawn of `path` with `argv` and `envp` (NULL-terminated), a clean signal state (empty mask,
/// default dispositions) and only the descriptors in `keep` (`count` of them), which become 3, 4, ...
/// in the child; every other descriptor above 2 is closed. Returns the pid, or -errno.
int godwit_spawn(const char *path, char *const argv[], char *const envp[], const int *keep, int count);

// MARK: - HMAC-SHA256

// OpenSSL's libcrypto (crypto.c), for the authenticated migration stream.
#define GODWIT_HMAC_SHA256_LENGTH 32
/// An HMAC-SHA256 computation keyed once (an EVP_MAC_CTX behind an opaque type).
typedef struct godwit_hmac godwit_hmac;
/// A context keyed with `key` and ready for `godwit_hmac_update`, or NULL on failure.
godwit_hmac *godwit_hmac_new(const void *key, size_t key_length);
/// Restarts the computation with the same key (after `godwit_hmac_final`). 0, or -1 on failure.
int godwit_hmac_init(godwit_hmac *hmac);
/// Adds `length` bytes to the message. 0, or -1 on failure.
int godwit_hmac_update(godwit_hmac *hmac, const void *data, size_t length);
/// Writes the 32-byte tag to `out`. 0, or -1 on failure.
int godwit_hmac_final(godwit_hmac *hmac, uint8_t *out);
void godwit_hmac_free(godwit_hmac *hmac);
/// One-shot HMAC-SHA256 of `data` under `key` into `out` (32 bytes). 0, or -1 on failure.
int godwit_hmac_sha256(const void *key, size_t key_length, const void *data, size_t length, uint8_t *out);
/// 1 when the `length` bytes at `a` and `b` are equal, else 0, in time independent of the contents.
int godwit_constant_time_equal(const void *a, const void *b, size_t length);
/// Fills `out` with `length` cryptographically random bytes (RAND_bytes). 0, or -1 on failure.
int godwit_random_bytes(void *out, size_t length);

#endif

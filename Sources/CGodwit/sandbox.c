// The process sandbox, in C because two of its steps cannot be written in Swift:
//
// 1. Namespaces. unshare(CLONE_NEWUSER) fails with EINVAL in a process that has more than one
//    thread, and the Swift runtime and Foundation may start threads before or in main. So a
//    constructor enters the namespaces before main runs, when GODWIT_SANDBOX_NAMESPACES=1: new user,
//    mount, IPC, network and PID namespaces, then a fork so that the child is PID 1 of the new PID
//    namespace. The parent stays outside it, waits, forwards SIGTERM, SIGINT, SIGHUP and SIGQUIT, and
//    exits as the child did. Any failure prints one line and exits 70: never half-sandboxed.
//    `godwit vm` takes the same path without the variable (its command line decides, below), after
//    forking its network broker (broker.c) in the caller's namespaces.
// 2. The lock-down after set-up: no_new_privs, every capability dropped in every thread, and a seccomp
//    filter. libseccomp's seccomp_rule_add is variadic (Swift cannot call it); rules are built here
//    with seccomp_rule_add_array from the names and conditions GodwitSystem's Sandbox passes.
//
// libseccomp's functions are weak references: the library links when the target asks for it
// (`linkedLibrary("seccomp")`), and a build without it still links and reports
// godwit_seccomp_available() == 0 instead of failing to link or to load.
#define _GNU_SOURCE
#include "CGodwit.h"
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <sched.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>
#include <linux/capability.h>

#if defined(__has_include)
#if __has_include(<seccomp.h>)
#include <seccomp.h>
#define GODWIT_HAVE_SECCOMP 1
#endif
#endif
#ifndef GODWIT_HAVE_SECCOMP
#define GODWIT_HAVE_SECCOMP 0
#endif

#if GODWIT_HAVE_SECCOMP
#pragma weak seccomp_init
#pragma weak seccomp_release
#pragma weak seccomp_attr_set
#pragma weak seccomp_rule_add_array
#pragma weak seccomp_load
#pragma weak seccomp_syscall_resolve_name
#endif

// MARK: - Namespaces, from a constructor

static int godwit_sandbox_namespaced = 0;
static int godwit_sandbox_vmm = 0;
static pid_t godwit_sandbox_child = 0;
static volatile sig_atomic_t godwit_sandbox_forwarded = 0;
static int drop_thread_capabilities(void);

int godwit_sandbox_in_namespaces(void) { return godwit_sandbox_namespaced; }

/// One line on stderr, then exit 70 (EX_SOFTWARE): a process that asked for a sandbox never runs without it.
__attribute__((noreturn)) static void sandbox_fail_hint(const char *step, int code, const char *hint) {
    dprintf(2, "godwit: sandbox: %s failed: %s (errno %d)%s%s\n", step, strerror(code), code, hint ? "; " : "", hint ? hint : "");
    _exit(70);
}

__attribute__((noreturn)) static void sandbox_fail(const char *step, int code) { sandbox_fail_hint(step, code, NULL); }

static int write_file(const char *path, const char *text) {
    int fd = open(path, O_WRONLY | O_CLOEXEC);
    if (fd < 0) return -1;
    size_t length = strlen(text);
    ssize_t n = write(fd, text, length);
    int code = errno;
    close(fd);
    if (n != (ssize_t)length) {
        errno = n < 0 ? code : EIO;
        return -1;
    }
    return 0;
}

/// The number of threads of this process (the `Threads:` line of /proc/self/status), or -1.
static int thread_count(void) {
    int fd = open("/proc/self/status", O_RDONLY | O_CLOEXEC);
    if (fd < 0) return -1;
    char buffer[4096];
    ssize_t n = read(fd, buffer, sizeof buffer - 1);
    close(fd);
    if (n <= 0) return -1;
    buffer[n] = 0;
    const char *line = strstr(buffer, "\nThreads:");
    return line ? atoi(line + 9) : -1;
}

static void forward_signal(int signo) {
    int saved = errno;
    godwit_sandbox_forwarded = signo;
    if (godwit_sandbox_child > 0) kill(godwit_sandbox_child, signo);
    errno = saved;
}

/// PID 1 of a PID namespace ignores every signal it has no handler for (SIGKILL from outside aside),
/// so the child exits on the forwarded stop signals the way the default action would have stopped it.
/// Code that wants these signals (godwit vm blocks them and sigwaits) takes them over as usual.
static void init_stop_handler(int signo) { _exit(128 + signo); }

static const int forwarded_signals[] = {SIGTERM, SIGINT, SIGHUP, SIGQUIT};
#define FORWARDED_COUNT (sizeof forwarded_signals / sizeof forwarded_signals[0])

/// Dies of `signo`, so the caller sees what it would have seen without the namespaces; without a
/// core file of this waiting process.
__attribute__((noreturn)) static void die_of(int signo) {
    struct rlimit none = {0, 0};
    setrlimit(RLIMIT_CORE, &none);
    prctl(PR_SET_DUMPABLE, 0, 0, 0, 0);
    signal(signo, SIG_DFL);
    sigset_t only;
    sigemptyset(&only);
    sigaddset(&only, signo);
    sigprocmask(SIG_UNBLOCK, &only, NULL);
    raise(signo);
    _exit(128 + signo);
}

/// Whether the process inherited SIG_IGN for `signo` (nohup, a shell's background job): such a
/// signal stays ignored on both sides, as it would have been without the namespaces.
static int inherited_ignored(int signo) {
    struct sigaction current;
    return sigaction(signo, NULL, &current) == 0 && current.sa_handler == SIG_IGN;
}

/// The parent outside the PID namespace: waits for the child and leaves with its status.
__attribute__((noreturn)) static void supervise(pid_t child, const sigset_t *original_mask) {
    godwit_sandbox_child = child;
    struct sigaction action;
    memset(&action, 0, sizeof action);
    action.sa_handler = forward_signal;
    sigemptyset(&action.sa_mask);
    // Forwarding needs the signals unblocked here even if the spawner blocked them (Foundation's
    // Process passes on its libdispatch thread's mask); the child keeps the inherited mask.
    sigset_t mask = *original_mask;
    for (size_t i = 0; i < FORWARDED_COUNT; i++) {
        if (inherited_ignored(forwarded_signals[i])) continue;
        sigaction(forwarded_signals[i], &action, NULL);
        sigdelset(&mask, forwarded_signals[i]);
    }
    sigprocmask(SIG_SETMASK, &mask, NULL);
    // Hold none of the child's descriptors (sockets, memfds, devices): when the child goes, they go.
    syscall(SYS_close_range, 3, ~0U, 0);
    // The parent needs no privilege to wait for and signal its child (same uid).
    prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0);
    drop_thread_capabilities(); // single-threaded here: no other thread to reach

    int status = 0;
    while (waitpid(child, &status, 0) < 0) {
        if (errno != EINTR) sandbox_fail("waitpid for the sandboxed child", errno);
    }
    if (WIFEXITED(status)) {
        // The child's default-like exit on a signal we forwarded (init_stop_handler): die of it too.
        int forwarded = godwit_sandbox_forwarded;
        if (forwarded != 0 && WEXITSTATUS(status) == 128 + forwarded) die_of(forwarded);
        _exit(WEXITSTATUS(status));
    }
    if (WIFSIGNALED(status)) die_of(WTERMSIG(status));
    _exit(70);
}

/// Whether this process is `godwit vm` and should enter its own namespaces: its first argument is
/// `vm` and neither `--no-sandbox` nor `--no-namespaces` is among the others (/proc/self/cmdline;
/// a command line longer than the buffer is judged by its first 64 KiB, which can only keep the sandbox).
static int vmm_wants_namespaces(void) {
    static char buffer[65536];
    int fd = open("/proc/self/cmdline", O_RDONLY | O_CLOEXEC);
    if (fd < 0) return 0;
    size_t total = 0;
    for (;;) {
        ssize_t n = read(fd, buffer + total, sizeof buffer - 1 - total);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) break;
        total += (size_t)n;
        if (total == sizeof buffer - 1) break;
    }
    close(fd);
    buffer[total] = 0;
    int index = 0, is_vm = 0;
    for (size_t at = 0; at < total; at += strlen(buffer + at) + 1, index++) {
        const char *argument = buffer + at;
        if (index == 1) is_vm = strcmp(argument, "vm") == 0;
        if (index >= 2 && (strcmp(argument, "--no-sandbox") == 0 || strcmp(argument, "--no-namespaces") == 0)) return 0;
    }
    return is_vm;
}

__attribute__((constructor)) static void godwit_sandbox_enter_namespaces(void) {
    // A supervised I/O domain dies with its VMM, even one killed with SIGKILL (a supervisor that
    // restarts it sets GODWIT_PARENT_PID). PDEATHSIG follows the spawning thread, which in the
    // supervisor lives as long as it watches this process.
    const char *parent = getenv("GODWIT_PARENT_PID");
    if (parent != NULL) {
        if (prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0) != 0) sandbox_fail("prctl(PR_SET_PDEATHSIG)", errno);
        if (getppid() != (pid_t)atol(parent)) _exit(70); // the parent is already gone
        unsetenv("GODWIT_PARENT_PID");
    }
    const char *request = getenv("GODWIT_SANDBOX_NAMESPACES");
    int requested = request != NULL && strcmp(request, "1") == 0;
    int vmm = !requested && vmm_wants_namespaces();
    if (!requested && !vmm) return;
    // The VMM keeps a broker in the caller's network namespace for its TAPs and migration sockets.
    if (vmm && godwit_broker_start() != 0) sandbox_fail("starting the VMM's network broker (fork)", errno);
    godwit_sandbox_vmm = vmm;

    uid_t uid = getuid();
    gid_t gid = getgid();
    int flags = CLONE_NEWUSER | CLONE_NEWNS | CLONE_NEWIPC | CLONE_NEWNET | CLONE_NEWPID;
    if (unshare(flags) != 0) {
        int code = errno;
        const char *step = "unshare(user, mount, IPC, network, PID)";
        if (code == EINVAL && thread_count() > 1) sandbox_fail_hint(step, code, "the process already has threads");
        if (code == EPERM || code == ENOSPC)
            sandbox_fail_hint(step, code, godwit_sandbox_vmm
                                  ? "user namespaces are disabled or exhausted here (user.max_user_namespaces, "
                                    "kernel.unprivileged_userns_clone); `godwit vm --no-namespaces` keeps the caller's"
                                  : "user namespaces are disabled or exhausted here "
                                    "(user.max_user_namespaces, kernel.unprivileged_userns_clone)");
        sandbox_fail(step, code);
    }
    // Root inside is the caller outside; setgroups must be denied before an unprivileged gid_map write.
    char map[64];
    if (write_file("/proc/self/setgroups", "deny") != 0) sandbox_fail("writing /proc/self/setgroups", errno);
    snprintf(map, sizeof map, "0 %u 1\n", (unsigned)uid);
    if (write_file("/proc/self/uid_map", map) != 0) sandbox_fail("writing /proc/self/uid_map", errno);
    snprintf(map, sizeof map, "0 %u 1\n", (unsigned)gid);
    if (write_file("/proc/self/gid_map", map) != 0) sandbox_fail("writing /proc/self/gid_map", errno);
    // Nothing mounted here propagates back to the host, and nothing from the host propagates in.
    if (mount(NULL, "/", NULL, MS_REC | MS_PRIVATE, NULL) != 0) sandbox_fail("making / private (mount MS_REC|MS_PRIVATE)", errno);

    // Block the forwarded signals across fork so none arrives before the parent knows its child.
    sigset_t block, original;
    sigemptyset(&block);
    for (size_t i = 0; i < FORWARDED_COUNT; i++) sigaddset(&block, forwarded_signals[i]);
    sigprocmask(SIG_BLOCK, &block, &original);
    pid_t child = fork();
    if (child < 0) sandbox_fail("fork into the new PID namespace", errno);
    if (child > 0) supervise(child, &original);

    // The child: PID 1 of the new namespace; it dies with its parent.
    if (prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0) != 0) sandbox_fail("prctl(PR_SET_PDEATHSIG)", errno);
    struct sigaction action;
    memset(&action, 0, sizeof action);
    action.sa_handler = init_stop_handler;
    sigemptyset(&action.sa_mask);
    for (size_t i = 0; i < FORWARDED_COUNT; i++) {
        if (!inherited_ignored(forwarded_signals[i])) sigaction(forwarded_signals[i], &action, NULL);
    }
    sigprocmask(SIG_SETMASK, &original, NULL);
    unsetenv("GODWIT_SANDBOX_NAMESPACES");
    godwit_sandbox_namespaced = 1;
}

// MARK: - no_new_privs and capabilities

int godwit_sandbox_set_no_new_privs(void) { return prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0); }

/// Empties the calling thread's capability sets. Async-signal-safe (it runs in a signal handler).
/// The bounding set can only shrink with CAP_SETPCAP: without it (an unprivileged process outside a
/// user namespace) the bounding set stays; it only matters to execve, which no_new_privs and the
/// seccomp filter take away.
static int drop_thread_capabilities(void) {
    struct __user_cap_header_struct header = {_LINUX_CAPABILITY_VERSION_3, 0};
    struct __user_cap_data_struct data[2];
    memset(data, 0, sizeof data);
    int may_shrink_bounding = syscall(SYS_capget, &header, data) == 0 && ((data[0].effective >> CAP_SETPCAP) & 1);
    for (int cap = 0; cap < 64; cap++) {
        int present = prctl(PR_CAPBSET_READ, cap, 0, 0, 0);
        if (present < 0) break; // EINVAL: past the kernel's last capability
        if (present == 1 && may_shrink_bounding && prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0) return -1;
    }
    if (prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0) != 0 && errno != EINVAL) return -1;
    memset(data, 0, sizeof data);
    header.version = _LINUX_CAPABILITY_VERSION_3;
    header.pid = 0;
    return (int)syscall(SYS_capset, &header, data);
}

static atomic_int caps_round_active;
static atomic_int caps_handled;
static atomic_int caps_failed;

static void caps_signal_handler(int signo, siginfo_t *info, void *context) {
    (void)signo;
    (void)context;
    int saved = errno;
    // Only our own tgkill during a round; any other SIGSYS is ignored here.
    if (atomic_load(&caps_round_active) && info->si_code == SI_TKILL && info->si_pid == getpid()) {
        if (drop_thread_capabilities() != 0) atomic_fetch_add(&caps_failed, 1);
        atomic_fetch_add(&caps_handled, 1);
    }
    errno = saved;
}

/// Reads /proc/self/task/TID/status and says whether every capability set is empty (1), not (0),
/// the thread is gone (-1), or its status cannot be read (-2, errno set). The bounding set is checked only when `check_bounding`. `*own_tid` is
/// the thread's id in this process's PID namespace (the last NSpid entry): /proc may belong to an
/// outer PID namespace (the constructor does not mount a new one), and tgkill takes our ids.
static int thread_has_no_capabilities(int tid, int check_bounding, int *own_tid) {
    *own_tid = tid;
    char path[64];
    snprintf(path, sizeof path, "/proc/self/task/%d/status", tid);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return errno == ENOENT || errno == ESRCH ? -1 : -2;
    char buffer[8192];
    ssize_t n = read(fd, buffer, sizeof buffer - 1);
    int code = errno;
    close(fd);
    if (n == 0 || (n < 0 && code == ESRCH)) return -1;
    if (n < 0) {
        errno = code;
        return -2;
    }
    buffer[n] = 0;
    const char *nspid = strstr(buffer, "\nNSpid:");
    if (nspid != NULL) {
        const char *end = strchr(nspid + 1, '\n');
        const char *cursor = nspid + 7;
        while (end == NULL || cursor < end) {
            char *next;
            long value = strtol(cursor, &next, 10);
            if (next == cursor) break;
            *own_tid = (int)value;
            cursor = next;
        }
    }
    static const char *const fields[] = {"\nCapInh:", "\nCapPrm:", "\nCapEff:", "\nCapAmb:", "\nCapBnd:"};
    for (int i = 0; i < 5; i++) {
        if (i == 4 && !check_bounding) continue;
        const char *line = strstr(buffer, fields[i]);
        if (line == NULL) continue; // CapAmb is missing before Linux 4.3
        if (strtoull(line + strlen(fields[i]), NULL, 16) != 0) return 0;
    }
    return 1;
}

int godwit_sandbox_drop_capabilities(int *failed_tid) {
    *failed_tid = 0;
    struct __user_cap_header_struct header = {_LINUX_CAPABILITY_VERSION_3, 0};
    struct __user_cap_data_struct data[2];
    memset(data, 0, sizeof data);
    int check_bounding = syscall(SYS_capget, &header, data) == 0 && ((data[0].effective >> CAP_SETPCAP) & 1);

    struct sigaction action, previous;
    memset(&action, 0, sizeof action);
    action.sa_sigaction = caps_signal_handler;
    action.sa_flags = SA_SIGINFO | SA_RESTART;
    sigemptyset(&action.sa_mask);
    if (sigaction(SIGSYS, &action, &previous) != 0) return -1;
    atomic_store(&caps_handled, 0);
    atomic_store(&caps_failed, 0);
    atomic_store(&caps_round_active, 1);

    pid_t self = (pid_t)syscall(SYS_gettid);
    pid_t process = getpid();
    int result = 0;
    if (drop_thread_capabilities() != 0) {
        *failed_tid = self;
        result = -1;
    }
    // Rounds: signal every thread that still holds something, wait for the handlers, look again
    // (a thread may have started another meanwhile, inheriting its creator's capabilities). A thread
    // still holding capabilities after 20 rounds blocks SIGSYS: it never runs the handler.
    int sent = 0;
    for (int round = 0; result == 0; round++) {
        DIR *tasks = opendir("/proc/self/task");
        if (tasks == NULL) {
            result = -1;
            break;
        }
        int dirty = 0;
        int stubborn = 0;
        int stubborn_errno = EPERM;
        struct dirent *entry;
        while ((entry = readdir(tasks)) != NULL) {
            int tid = atoi(entry->d_name);
            if (tid <= 0) continue;
            int own_tid;
            int clean = thread_has_no_capabilities(tid, check_bounding, &own_tid);
            if (clean == -2) {
                stubborn = tid;
                stubborn_errno = errno;
                break;
            }
            if (clean != 0) continue; // clean, or gone
            if (own_tid == self || round >= 20) {
                stubborn = own_tid;
                break;
            }
            dirty++;
            if (syscall(SYS_tgkill, process, own_tid, SIGSYS) == 0) sent++;
        }
        closedir(tasks);
        if (stubborn) {
            *failed_tid = stubborn;
            errno = stubborn_errno;
            result = -1;
            break;
        }
        if (dirty == 0) break;
        // Give the handlers up to 100 ms per round.
        for (int i = 0; i < 100 && atomic_load(&caps_handled) < sent; i++) {
            struct timespec pause = {0, 1000000};
            nanosleep(&pause, NULL);
        }
    }
    if (result == 0 && atomic_load(&caps_failed) != 0) {
        errno = EPERM;
        result = -1;
    }
    int saved = errno;
    // Put the previous SIGSYS disposition back only when no signal of ours can still be pending:
    // one arriving under SIG_DFL would kill the process. (Our handler ignores it once the round is over.)
    atomic_store(&caps_round_active, 0);
    if (atomic_load(&caps_handled) >= sent) sigaction(SIGSYS, &previous, NULL);
    errno = saved;
    return result;
}

// MARK: - seccomp

#if GODWIT_HAVE_SECCOMP
int godwit_seccomp_available(void) {
    return seccomp_init != NULL && seccomp_rule_add_array != NULL && seccomp_load != NULL &&
           seccomp_attr_set != NULL && seccomp_release != NULL && seccomp_syscall_resolve_name != NULL;
}

void *godwit_seccomp_new(int default_errno) {
    if (!godwit_seccomp_available()) {
        errno = ENOSYS;
        return NULL;
    }
    scmp_filter_ctx filter = seccomp_init(SCMP_ACT_ERRNO((uint32_t)default_errno));
    if (filter == NULL) {
        errno = ENOMEM;
        return NULL;
    }
    int r = seccomp_attr_set(filter, SCMP_FLTATR_ACT_BADARCH, SCMP_ACT_KILL_PROCESS);
    if (r == 0) r = seccomp_attr_set(filter, SCMP_FLTATR_CTL_NNP, 1);
    if (r == 0) r = seccomp_attr_set(filter, SCMP_FLTATR_CTL_TSYNC, 1);
    // Real kernel errors from seccomp_load rather than libseccomp's -ECANCELED (best effort: 2.5.0+).
    if (r == 0) seccomp_attr_set(filter, SCMP_FLTATR_API_SYSRAWRC, 1);
    if (r != 0) {
        seccomp_release(filter);
        errno = -r;
        return NULL;
    }
    return filter;
}

int godwit_seccomp_add(void *filter, const char *name, int action, int errno_value,
                       const struct godwit_seccomp_condition *conditions, uint32_t count) {
    if (filter == NULL || count > 6) return -EINVAL;
    int number = seccomp_syscall_resolve_name(name);
    if (number == __NR_SCMP_ERROR) return -ENOENT;
    uint32_t seccomp_action;
    switch (action) {
    case GODWIT_SECCOMP_ALLOW: seccomp_action = SCMP_ACT_ALLOW; break;
    case GODWIT_SECCOMP_ERRNO: seccomp_action = SCMP_ACT_ERRNO((uint32_t)errno_value); break;
    case GODWIT_SECCOMP_KILL_PROCESS: seccomp_action = SCMP_ACT_KILL_PROCESS; break;
    default: return -EINVAL;
    }
    struct scmp_arg_cmp comparisons[6];
    for (uint32_t i = 0; i < count; i++) {
        if (conditions[i].argument > 5) return -EINVAL;
        comparisons[i].arg = conditions[i].argument;
        switch (conditions[i].operation) {
        case GODWIT_SECCOMP_CMP_EQ:
            comparisons[i].op = SCMP_CMP_EQ;
            comparisons[i].datum_a = conditions[i].value;
            comparisons[i].datum_b = 0;
            break;
        case GODWIT_SECCOMP_CMP_NE:
            comparisons[i].op = SCMP_CMP_NE;
            comparisons[i].datum_a = conditions[i].value;
            comparisons[i].datum_b = 0;
            break;
        case GODWIT_SECCOMP_CMP_MASKED_EQ:
            comparisons[i].op = SCMP_CMP_MASKED_EQ;
            comparisons[i].datum_a = conditions[i].mask;
            comparisons[i].datum_b = conditions[i].value;
            break;
        default: return -EINVAL;
        }
    }
    return seccomp_rule_add_array((scmp_filter_ctx)filter, seccomp_action, number, count, comparisons);
}

int godwit_seccomp_load(void *filter) {
    if (filter == NULL) return -EINVAL;
    return seccomp_load((scmp_filter_ctx)filter);
}

void godwit_seccomp_release(void *filter) {
    if (filter != NULL) seccomp_release((scmp_filter_ctx)filter);
}

int godwit_seccomp_resolve(const char *name) {
    if (!godwit_seccomp_available()) return -1;
    int number = seccomp_syscall_resolve_name(name);
    return number == __NR_SCMP_ERROR ? -1 : number;
}
#else
int godwit_seccomp_available(void) { return 0; }
void *godwit_seccomp_new(int default_errno) {
    (void)default_errno;
    errno = ENOSYS;
    return NULL;
}
int godwit_seccomp_add(void *filter, const char *name, int action, int errno_value,
                       const struct godwit_seccomp_condition *conditions, uint32_t count) {
    (void)filter, (void)name, (void)action, (void)errno_value, (void)conditions, (void)count;
    return -ENOSYS;
}
int godwit_seccomp_load(void *filter) {
    (void)filter;
    return -ENOSYS;
}
void godwit_seccomp_release(void *filter) { (void)filter; }
int godwit_seccomp_resolve(const char *name) {
    (void)name;
    return -1;
}
#endif

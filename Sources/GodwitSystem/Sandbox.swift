import CGodwit
#if canImport(Glibc)
import Glibc
#endif

/// A sandbox step that failed: which one, on what, and the errno.
public struct SandboxError: Error, CustomStringConvertible, Equatable, Sendable {
    public var step: String
    public var errno: Int32
    public var context: String

    public init(step: String, errno: Int32, context: String = "") {
        self.step = step
        self.errno = errno
        self.context = context
    }

    public var description: String {
        let message = String(cString: strerror(errno))
        return context.isEmpty
            ? "sandbox: \(step) failed: \(message) (errno \(errno))"
            : "sandbox: \(step) failed: \(context): \(message) (errno \(errno))"
    }
}

/// The process sandbox of I/O domains (and of the VMM once it has opened what it needs), the way
/// Firecracker's jailer and crosvm's minijail do it.
///
/// Two halves:
/// - **Namespaces**, entered before `main` by a C constructor (sandbox.c) when the environment has
///   `GODWIT_SANDBOX_NAMESPACES=1`: new user (root inside = the caller outside), mount (private),
///   IPC, network (only `lo`, down) and PID namespaces. The process forks there: the child is PID 1
///   of the new PID namespace and runs `main`; the parent waits outside, forwards SIGTERM, SIGINT,
///   SIGHUP and SIGQUIT, and exits with the child's status (or dies of its signal). A failure
///   exits 70 with one line on stderr. `isInNamespaces` tells the child it got there. `godwit vm`
///   enters the same namespaces without the variable (unless given `--no-namespaces` or
///   `--no-sandbox`), after forking its network broker (`hasNetworkBroker`).
/// - **`lockDown(allowing:ioctls:)`**, called once set-up is over (every file, device, socket and
///   passed-in descriptor is open): `no_new_privs`, every capability dropped from every thread,
///   then a seccomp allow-list (`baseSyscalls` plus the caller's) loaded into every thread. Any other
///   syscall fails with EPERM, so `open` of any path fails and the process can use only the
///   descriptors it already holds; the `fatalSyscalls` kill the process.
///
/// Why EPERM by default and kill for a few: libraries probe optional calls (glibc, Foundation and the
/// Swift runtime open files, query sockets, spawn the crash backtracer) and cope with an error, so
/// failing them keeps a sandboxed domain alive and its errors readable (a crash still shows its real
/// signal). The fatal list holds what no code path of ours issues after set-up and only an attacker
/// would: execve, namespace, mount, module, kexec, BPF, ptrace and cross-process memory calls (the
/// crash backtracer's posix_spawn already fails at its non-thread `clone`); probing them
/// costs the attacker the process (a supervisor restarts it), as with crosvm's kill-by-default.
public enum Sandbox {
    /// The environment variable that makes the constructor enter the namespaces before `main`.
    public static let namespacesVariable = "GODWIT_SANDBOX_NAMESPACES"

    /// True in the process the constructor moved into new namespaces (it is PID 1 there).
    public static var isInNamespaces: Bool { godwit_sandbox_in_namespaces() != 0 }

    /// True in a `godwit vm` that entered its namespaces: a broker in the caller's network namespace
    /// opens its TAPs and creates its TCP sockets (CGodwit's broker.c; `Tap` and the migration channel
    /// go through it without knowing).
    public static var hasNetworkBroker: Bool { godwit_broker_available() != 0 }

    /// Tells the network broker that set-up is over: it hands out TCP sockets only, no more TAPs.
    public static func sealNetworkBroker() throws(SystemError) {
        _ = try systemCall("seal the network broker") { godwit_broker_seal() }
    }

    /// True when this build can load seccomp filters (libseccomp linked).
    public static var isSeccompAvailable: Bool { godwit_seccomp_available() != 0 }

    /// The number of syscall `name` on this architecture, as libseccomp resolves it; nil when unknown
    /// (or libseccomp is missing).
    public static func syscallNumber(_ name: String) -> Int32? {
        let number = godwit_seccomp_resolve(name)
        return number < 0 ? nil : number
    }

    // MARK: Rules

    /// A condition on one syscall argument (0...5).
    public struct Condition: Sendable, Hashable {
        public enum Operation: Sendable, Hashable {
            case equal
            case notEqual
            /// `(argument & mask) == value`
            case maskedEqual(mask: UInt64)
        }
        public var argument: Int
        public var operation: Operation
        public var value: UInt64

        public init(argument: Int, _ operation: Operation, _ value: UInt64) {
            self.argument = argument
            self.operation = operation
            self.value = value
        }

        public static func argument(_ index: Int, equals value: UInt64) -> Condition {
            Condition(argument: index, .equal, value)
        }

        /// `(argument & mask) == value`.
        public static func argument(_ index: Int, masked mask: UInt64, equals value: UInt64) -> Condition {
            Condition(argument: index, .maskedEqual(mask: mask), value)
        }
    }

    public enum Action: Sendable, Hashable {
        case allow
        /// The call fails with this errno.
        case fail(errno: Int32)
        case killProcess
    }

    /// One seccomp rule: the syscall (by name, as `seccomp_syscall_resolve_name` knows it), the action,
    /// and conditions that must all hold. Several rules for one syscall are alternatives.
    public struct Rule: Sendable, Hashable {
        public var syscall: String
        public var action: Action
        public var conditions: [Condition]

        public init(_ syscall: String, _ action: Action, when conditions: [Condition] = []) {
            self.syscall = syscall
            self.action = action
            self.conditions = conditions
        }

        public static func allow(_ syscall: String, when conditions: [Condition] = []) -> Rule {
            Rule(syscall, .allow, when: conditions)
        }
    }

    /// Which ioctl requests stay allowed after lock-down.
    public enum IoctlPolicy: Sendable, Hashable {
        /// Any request (a VMM's KVM ioctls are too many to list usefully).
        case any
        /// Only these requests (argument 1 compared on its low 32 bits, the width the kernel uses),
        /// plus `baseIoctls`.
        case only([UInt])
    }

    /// What any Godwit process still needs after set-up, found with `strace -f` on `godwit vm`
    /// (in-process virtio-blk under load) and `godwit sandbox-probe`: I/O on descriptors it holds
    /// (files, the guest-memory memfd mapped at set-up, sockets it was given or listens on, eventfds,
    /// epoll), memory management, threads, time, signals and exit. Some are narrowed by arguments in
    /// `rules(allowing:ioctls:)`: `clone` only for threads, `mmap`/`mprotect` never executable,
    /// `tgkill` only within this process, `prctl` only for thread names; `clone3` fails with ENOSYS
    /// (its flags sit in memory seccomp cannot read) and glibc falls back to `clone`.
    /// Not here, so failing with EPERM: `open`, `openat`, `openat2`, `creat`, `socket`,
    /// `connect`, `bind`, `listen`, `fork`/`vfork`, `kill`, `link`/`unlink`/`rename`, `chmod`/`chown`,
    /// `setuid` and friends, `socketpair`, `pipe2`, `memfd_create`, `dup*`.
    public static let baseSyscalls: [String] = [
        // I/O on descriptors already open
        "read", "write", "readv", "writev", "pread64", "pwrite64", "preadv", "pwritev", "preadv2", "pwritev2",
        "lseek", "fsync", "fdatasync", "fallocate", "close", "fstat", "newfstatat", "statx", "fcntl",
        // the O_DIRECT disk's asynchronous I/O (AsyncIOContext): rings made before lock-down (restricted to
        // reads and writes) are entered; io_uring_setup/io_uring_register fail after it, so a drive swapped
        // in later sets up native AIO instead
        "io_uring_enter", "io_setup", "io_submit", "io_getevents", "io_destroy",
        // sockets it holds: the vhost-user and control connections, the listening sockets
        "recvmsg", "sendmsg", "recvfrom", "sendto", "accept", "accept4", "shutdown", "getsockopt",
        // waiting
        "epoll_create1", "epoll_ctl", "epoll_wait", "epoll_pwait", "epoll_pwait2", "poll", "ppoll", "eventfd2",
        // memory (guest RAM arrives as memfds mapped after lock-down by SET_MEM_TABLE)
        "mmap", "munmap", "mprotect", "madvise", "mremap", "brk",
        // threads and their synchronisation
        "clone", "futex", "set_robust_list", "rseq", "sched_yield", "sched_getaffinity", "set_tid_address",
        // time
        "clock_gettime", "clock_getres", "clock_nanosleep", "nanosleep", "gettimeofday",
        // identity, signals, exit
        "getpid", "gettid", "getppid", "getuid", "geteuid", "getgid", "getegid", "getrandom",
        "tgkill", "rt_sigreturn", "rt_sigprocmask", "rt_sigaction", "rt_sigtimedwait", "sigaltstack",
        "restart_syscall", "prctl", "exit", "exit_group",
    ]

    /// ioctl requests every process keeps: TCGETS (isatty, from stdio and Foundation).
    public static let baseIoctls: [UInt] = [0x5401]

    /// Syscalls that kill the process instead of failing (see the type's comment).
    public static let fatalSyscalls: [String] = [
        "execve", "execveat", "ptrace", "process_vm_readv", "process_vm_writev", "process_madvise", "pidfd_getfd",
        "mount", "umount2", "pivot_root", "chroot", "unshare", "setns", "mount_setattr", "move_mount",
        "open_tree", "fsopen", "fsconfig", "fsmount", "fspick",
        "kexec_load", "kexec_file_load", "init_module", "finit_module", "delete_module",
        "bpf", "perf_event_open", "userfaultfd", "open_by_handle_at", "name_to_handle_at",
        "keyctl", "add_key", "request_key", "iopl", "ioperm", "swapon", "swapoff", "reboot",
        "settimeofday", "clock_settime", "clock_adjtime", "adjtimex", "acct", "quotactl",
    ]

    /// Linux constants the filter compares against (x86-64 values).
    enum Constant {
        static let cloneThread: UInt64 = 0x0001_0000 // CLONE_THREAD
        static let protExec: UInt64 = 0x4 // PROT_EXEC
        static let prSetName: UInt64 = 15 // PR_SET_NAME
        static let prGetName: UInt64 = 16 // PR_GET_NAME
    }

    /// The full rule list `lockDown(allowing:ioctls:)` loads: `baseSyscalls` (some narrowed) and
    /// `extraSyscalls` allowed outright, ioctl per `ioctls`, `fatalSyscalls` killing (except any the
    /// caller allows).
    public static func rules(allowing extraSyscalls: [String] = [], ioctls: IoctlPolicy = .only([])) -> [Rule] {
        let extra = Set(extraSyscalls)
        var rules: [Rule] = []
        for name in baseSyscalls where !extra.contains(name) {
            switch name {
            case "clone":
                rules.append(.allow(name, when: [.argument(0, masked: Constant.cloneThread, equals: Constant.cloneThread)]))
            case "mmap", "mprotect":
                rules.append(.allow(name, when: [.argument(2, masked: Constant.protExec, equals: 0)]))
            case "tgkill":
                rules.append(.allow(name, when: [.argument(0, equals: UInt64(getpid()))]))
            case "prctl":
                rules.append(.allow(name, when: [.argument(0, equals: Constant.prSetName)]))
                rules.append(.allow(name, when: [.argument(0, equals: Constant.prGetName)]))
            default:
                rules.append(.allow(name))
            }
        }
        if !extra.contains("clone3") { rules.append(Rule("clone3", .fail(errno: ENOSYS))) }
        var seen = Set<String>()
        for name in extraSyscalls where seen.insert(name).inserted && name != "ioctl" {
            rules.append(.allow(name))
        }
        if case .only(let requests) = ioctls, !extra.contains("ioctl") {
            var seenRequests = Set<UInt>()
            for request in baseIoctls + requests where seenRequests.insert(request).inserted {
                rules.append(.allow("ioctl", when: [.argument(1, masked: 0xFFFF_FFFF, equals: UInt64(request) & 0xFFFF_FFFF)]))
            }
        } else {
            rules.append(.allow("ioctl"))
        }
        for name in fatalSyscalls where !extra.contains(name) {
            rules.append(Rule(name, .killProcess))
        }
        return rules
    }

    // MARK: Lock-down

    /// Locks the process down after set-up: `no_new_privs`, no capabilities in any thread, and the
    /// seccomp filter of `rules(allowing:ioctls:)` in every thread. Irreversible. Call it once the
    /// process holds every descriptor it will use; from then on `open` of any path fails with EPERM.
    ///
    /// Threads started before this call must leave SIGSYS unblocked (libdispatch's workers do): it
    /// reaches them to drop their capabilities, which are per thread.
    public static func lockDown(allowing extraSyscalls: [String] = [], ioctls: IoctlPolicy = .only([])) throws(SandboxError) {
        try lockDown(rules: rules(allowing: extraSyscalls, ioctls: ioctls))
    }

    /// `lockDown` with an explicit rule list (every syscall not named fails with EPERM).
    public static func lockDown(rules: [Rule]) throws(SandboxError) {
        // Build the filter first: a bad rule is reported while the process can still do something about it.
        let filter = try makeFilter(rules)
        defer { godwit_seccomp_release(filter) }
        try setNoNewPrivileges()
        try dropCapabilities()
        let result = godwit_seccomp_load(filter)
        if result < 0 { throw SandboxError(step: "seccomp_load", errno: -result, context: "\(rules.count) rules") }
        if result > 0 {
            throw SandboxError(step: "seccomp_load", errno: ESRCH, context: "thread \(result) could not take the filter (it has another)")
        }
    }

    /// prctl(PR_SET_NO_NEW_PRIVS): execve can never grant privileges again.
    public static func setNoNewPrivileges() throws(SandboxError) {
        if godwit_sandbox_set_no_new_privs() != 0 {
            throw SandboxError(step: "prctl(PR_SET_NO_NEW_PRIVS)", errno: godwit_errno())
        }
    }

    /// Empties every capability set (effective, permitted, inheritable, ambient and, with CAP_SETPCAP,
    /// bounding) of every thread.
    public static func dropCapabilities() throws(SandboxError) {
        var failedThread: Int32 = 0
        if godwit_sandbox_drop_capabilities(&failedThread) != 0 {
            let code = godwit_errno()
            throw SandboxError(step: "dropping capabilities", errno: code,
                               context: failedThread == 0 ? "" : "thread \(failedThread) kept some (does it block SIGSYS?)")
        }
    }

    static func makeFilter(_ rules: [Rule]) throws(SandboxError) -> UnsafeMutableRawPointer {
        guard isSeccompAvailable else {
            throw SandboxError(step: "seccomp", errno: ENOSYS,
                               context: "this godwit was built without libseccomp (install libseccomp-dev; CGodwit links \"seccomp\")")
        }
        guard let filter = godwit_seccomp_new(EPERM) else {
            throw SandboxError(step: "seccomp_init", errno: godwit_errno())
        }
        for rule in rules {
            let conditions = rule.conditions.map { condition -> godwit_seccomp_condition in
                switch condition.operation {
                case .equal:
                    return godwit_seccomp_condition(argument: UInt32(condition.argument), operation: UInt32(GODWIT_SECCOMP_CMP_EQ),
                                                    mask: 0, value: condition.value)
                case .notEqual:
                    return godwit_seccomp_condition(argument: UInt32(condition.argument), operation: UInt32(GODWIT_SECCOMP_CMP_NE),
                                                    mask: 0, value: condition.value)
                case .maskedEqual(let mask):
                    return godwit_seccomp_condition(argument: UInt32(condition.argument), operation: UInt32(GODWIT_SECCOMP_CMP_MASKED_EQ),
                                                    mask: mask, value: condition.value)
                }
            }
            let (action, code): (Int32, Int32) = switch rule.action {
            case .allow: (GODWIT_SECCOMP_ALLOW, 0)
            case .fail(let errno): (GODWIT_SECCOMP_ERRNO, errno)
            case .killProcess: (GODWIT_SECCOMP_KILL_PROCESS, 0)
            }
            let result = conditions.withUnsafeBufferPointer {
                godwit_seccomp_add(filter, rule.syscall, action, code, $0.baseAddress, UInt32($0.count))
            }
            if result != 0 {
                godwit_seccomp_release(filter)
                let context = result == -ENOENT ? "'\(rule.syscall)' is not a syscall libseccomp knows" : "rule for '\(rule.syscall)'"
                throw SandboxError(step: "seccomp_rule_add_array", errno: -result, context: context)
            }
        }
        return filter
    }

    // MARK: /proc/PID/status

    /// The sandbox-related fields of a `/proc/PID/status` (or `/proc/PID/task/TID/status`) text.
    public struct ProcessStatus: Sendable, Equatable {
        /// 0 none, 1 strict, 2 filter.
        public var seccomp: Int?
        public var noNewPrivs: Int?
        public var capEff: UInt64?
        public var capPrm: UInt64?
        public var capInh: UInt64?
        public var capBnd: UInt64?
        public var capAmb: UInt64?
        /// The pid in each PID namespace, outermost first (the one the /proc mount belongs to).
        public var nsPids: [Int32]
        public var threads: Int?
        public var uid: [Int]
        public var gid: [Int]

        public init(parsing text: String) {
            var fields: [Substring: Substring] = [:]
            for line in text.split(separator: "\n") {
                guard let colon = line.firstIndex(of: ":") else { continue }
                fields[line[..<colon]] = line[line.index(after: colon)...].drop { $0 == " " || $0 == "\t" }
            }
            func int(_ key: Substring) -> Int? { fields[key].flatMap { Int($0) } }
            func hex(_ key: Substring) -> UInt64? { fields[key].flatMap { UInt64($0, radix: 16) } }
            func list(_ key: Substring) -> [Int] { fields[key].map { $0.split(whereSeparator: { $0 == " " || $0 == "\t" }).compactMap { Int($0) } } ?? [] }
            seccomp = int("Seccomp")
            noNewPrivs = int("NoNewPrivs")
            capEff = hex("CapEff")
            capPrm = hex("CapPrm")
            capInh = hex("CapInh")
            capBnd = hex("CapBnd")
            capAmb = hex("CapAmb")
            nsPids = list("NSpid").map { Int32($0) }
            threads = int("Threads")
            uid = list("Uid")
            gid = list("Gid")
        }
    }
}

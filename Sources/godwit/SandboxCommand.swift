import ArgumentParser
import GodwitSystem
#if canImport(Glibc)
import Glibc
#endif

/// `godwit sandbox-probe` (hidden; for the sandbox tests): sets up like an I/O domain (opens what it
/// needs), locks down with `Sandbox.lockDown`, then prints one JSON line with what it sees from inside
/// and waits, so a test can also look at it from outside through /proc.
struct SandboxProbeCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "sandbox-probe",
        abstract: "Lock down like an I/O domain and report what the sandbox allows (for tests).",
        discussion: """
        Prints one JSON line: namespaces, pid (inside) and outer_pid (first NSpid), uid, gid, net_devices \
        and net_ns (read before lock-down), then, read through descriptors opened before lock-down: \
        seccomp, no_new_privs, cap_eff, cap_prm, cap_inh, cap_amb, cap_bnd (from /proc/self/status), \
        file_read/file_bytes (the --file), and the errno of forbidden calls after lock-down: open_errno \
        (open /etc/hostname), reopen_errno (open --file again), socket_errno (socket AF_INET), \
        fork_errno; thread_ok says a thread started after lock-down ran. Run with \
        GODWIT_SANDBOX_NAMESPACES=1 to be in new namespaces.
        """,
        shouldDisplay: false)

    @Option(help: "A file to open before lock-down and read after it.")
    var file: String?

    @Option(help: "Seconds to wait after the report before exiting 0.")
    var seconds: Double = 0

    @Option(help: "An extra syscall to allow (repeatable).")
    var allow: [String] = []

    @Option(help: "Threads to start before lock-down (they block every signal but SIGSYS, like libdispatch's workers).")
    var threads: Int = 0

    @Flag(help: "Also start a thread that blocks SIGSYS: lock-down must then fail (exit 1), never leave it privileged.")
    var stubbornThread = false

    @Flag(help: "After the report and the wait, call mount(2): a fatal syscall, so the process dies of SIGSYS.")
    var tryFatal = false

    @Flag(help: "Report without locking down (a baseline).")
    var noLockDown = false

    func run() throws {
        // Start from an empty signal mask, as a daemon does: a spawner's mask (Foundation's Process
        // passes on its libdispatch thread's, SIGTERM blocked) would keep SIGTERM from stopping the probe.
        var empty = sigset_t()
        sigemptyset(&empty)
        pthread_sigmask(SIG_SETMASK, &empty, nil)

        var report = Report()
        report["namespaces"] = .bool(Sandbox.isInNamespaces)
        report["pid"] = .int(Int(getpid()))
        report["uid"] = .int(Int(getuid()))
        report["gid"] = .int(Int(getgid()))

        // Set-up: everything opened now, as an I/O domain would.
        let status = try FileDescriptor.open("/proc/self/status", flags: O_RDONLY)
        let before = Sandbox.ProcessStatus(parsing: try Self.readAll(status))
        report["outer_pid"] = .int(Int(before.nsPids.first ?? getpid()))
        if let dev = try? FileDescriptor.open("/proc/self/net/dev", flags: O_RDONLY), let text = try? Self.readAll(dev) {
            // Two header lines, then "  name: counters...".
            let names = text.split(separator: "\n").dropFirst(2).compactMap { line in
                line.split(separator: ":").first.map { String($0.drop { $0 == " " }) }
            }
            report["net_devices"] = .strings(names)
        }
        report["net_ns"] = .string(Self.readLink("/proc/self/ns/net"))
        let given = try file.map { path throws(SystemError) in try FileDescriptor.open(path, flags: O_RDONLY) }
        // Each thread posts `ready` once its signal mask is set, so lock-down meets the mask the test asked for.
        let ready = UnsafeMutablePointer<sem_t>.allocate(capacity: 1)
        sem_init(ready, 0, 0)
        let started = max(threads, 0) + (stubbornThread ? 1 : 0)
        for _ in 0..<max(threads, 0) { Self.startSleeper(blockingSIGSYS: false, ready: ready) }
        if stubbornThread { Self.startSleeper(blockingSIGSYS: true, ready: ready) }
        for _ in 0..<started { while sem_wait(ready) != 0 {} }
        if tryFatal {
            var none = rlimit(rlim_cur: 0, rlim_max: 0)
            setrlimit(__rlimit_resource_t(RLIMIT_CORE.rawValue), &none) // no core file from the SIGSYS
        }

        // Lock-down.
        if !noLockDown {
            do {
                try Sandbox.lockDown(allowing: allow)
            } catch {
                fputs("godwit: \(error)\n", stderr)
                throw ExitCode(1)
            }
        }
        report["locked"] = .bool(!noLockDown)

        // What the process sees now.
        let after = Sandbox.ProcessStatus(parsing: (try? Self.readAll(status)) ?? "")
        report["seccomp"] = .int(after.seccomp ?? -1)
        report["no_new_privs"] = .int(after.noNewPrivs ?? -1)
        report["cap_eff"] = .string(Self.hex(after.capEff))
        report["cap_prm"] = .string(Self.hex(after.capPrm))
        report["cap_inh"] = .string(Self.hex(after.capInh))
        report["cap_amb"] = .string(Self.hex(after.capAmb))
        report["cap_bnd"] = .string(Self.hex(after.capBnd))
        report["threads"] = .int(after.threads ?? -1)
        if let given {
            let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 4096, alignment: 8)
            defer { buffer.deallocate() }
            do {
                report["file_bytes"] = .int(try given.pread(into: buffer, offset: 0))
                report["file_read"] = .bool(true)
            } catch {
                report["file_read"] = .bool(false)
                report["file_errno"] = .int(Int(error.errno))
            }
            report["reopen_errno"] = .int(Self.openErrno(file!))
        }
        report["open_errno"] = .int(Self.openErrno("/etc/hostname"))
        let sock = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        report["socket_errno"] = .int(sock >= 0 ? 0 : Int(errno))
        if sock >= 0 { close(sock) }
        report["fork_errno"] = .int(Self.forkErrno())
        report["thread_ok"] = .bool(Self.runThread())

        print(report.text)
        fflush(stdout)
        if seconds > 0 {
            var pause = timespec(tv_sec: Int(seconds), tv_nsec: Int((seconds - seconds.rounded(.down)) * 1e9))
            var left = timespec()
            while nanosleep(&pause, &left) != 0 && errno == EINTR { pause = left }
        }
        if tryFatal {
            // Harmless if it ran: the mount point does not exist.
            _ = mount("none", "/nonexistent-godwit-probe", "tmpfs", 0, nil)
            fputs("godwit: mount(2) returned errno \(errno) instead of killing the process\n", stderr)
            throw ExitCode(3)
        }
    }

    static func readAll(_ fd: FileDescriptor) throws(SystemError) -> String {
        var bytes: [UInt8] = []
        let chunk = UnsafeMutableRawBufferPointer.allocate(byteCount: 4096, alignment: 8)
        defer { chunk.deallocate() }
        while true {
            let n = try fd.pread(into: chunk, offset: UInt64(bytes.count))
            if n == 0 { break }
            bytes += chunk[..<n]
        }
        return String(decoding: bytes, as: UTF8.self)
    }

    static func readLink(_ path: String) -> String {
        var buffer = [CChar](repeating: 0, count: 256)
        let n = readlink(path, &buffer, buffer.count - 1)
        return n > 0 ? String(decoding: buffer[..<n].map { UInt8(bitPattern: $0) }, as: UTF8.self) : ""
    }

    static func hex(_ value: UInt64?) -> String {
        guard let value else { return "" }
        let digits = String(value, radix: 16)
        return String(repeating: "0", count: max(0, 16 - digits.count)) + digits
    }

    /// 0 when `path` opened (and it is closed again), else the errno.
    static func openErrno(_ path: String) -> Int {
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        if fd >= 0 {
            close(fd)
            return 0
        }
        return Int(errno)
    }

    /// 0 when fork worked (the child exits at once), else the errno.
    static func forkErrno() -> Int {
        let child = fork()
        if child == 0 { _exit(0) }
        if child < 0 { return Int(errno) }
        var status: Int32 = 0
        while waitpid(child, &status, 0) < 0 && errno == EINTR {}
        return 0
    }

    /// Starts a thread, which must run and be joined.
    static func runThread() -> Bool {
        var thread = pthread_t()
        let flag = UnsafeMutablePointer<Int32>.allocate(capacity: 1)
        defer { flag.deallocate() }
        flag.pointee = 0
        guard pthread_create(&thread, nil, { argument in
            argument!.assumingMemoryBound(to: Int32.self).pointee = 1
            return nil
        }, flag) == 0 else { return false }
        pthread_join(thread, nil)
        return flag.pointee == 1
    }

    /// A thread that sleeps for ever with every signal blocked but SIGSYS (unless `blockingSIGSYS`).
    /// It posts `ready` once its mask is set.
    static func startSleeper(blockingSIGSYS: Bool, ready: UnsafeMutablePointer<sem_t>) {
        var thread = pthread_t()
        let body: @convention(c) (UnsafeMutableRawPointer?) -> UnsafeMutableRawPointer? = blockingSIGSYS
            ? { ready in
                var mask = sigset_t()
                sigfillset(&mask)
                pthread_sigmask(SIG_SETMASK, &mask, nil)
                sem_post(ready!.assumingMemoryBound(to: sem_t.self))
                while true { sleep(1000) }
            }
            : { ready in
                var mask = sigset_t()
                sigfillset(&mask)
                sigdelset(&mask, SIGSYS)
                pthread_sigmask(SIG_SETMASK, &mask, nil)
                sem_post(ready!.assumingMemoryBound(to: sem_t.self))
                while true { sleep(1000) }
            }
        _ = pthread_create(&thread, nil, body, ready)
        pthread_detach(thread)
    }
}

extension SandboxProbeCommand {
/// One JSON object, keys in insertion order, printed on one line.
struct Report {
    enum Value {
        case int(Int)
        case bool(Bool)
        case string(String)
        case strings([String])
    }

    private var entries: [(String, Value)] = []

    subscript(key: String) -> Value? {
        get { entries.first { $0.0 == key }?.1 }
        set {
            entries.removeAll { $0.0 == key }
            if let newValue { entries.append((key, newValue)) }
        }
    }

    var text: String {
        "{" + entries.map { "\(Self.quote($0.0)):\(Self.encode($0.1))" }.joined(separator: ",") + "}"
    }

    static func encode(_ value: Value) -> String {
        switch value {
        case .int(let n): String(n)
        case .bool(let b): b ? "true" : "false"
        case .string(let s): quote(s)
        case .strings(let list): "[" + list.map(quote).joined(separator: ",") + "]"
        }
    }

    static func quote(_ s: String) -> String {
        var out = "\""
        for scalar in s.unicodeScalars {
            switch scalar {
            case "\"": out += "\\\""
            case "\\": out += "\\\\"
            case "\n": out += "\\n"
            case "\t": out += "\\t"
            case _ where scalar.value < 0x20:
                let digits = String(scalar.value, radix: 16)
                out += "\\u" + String(repeating: "0", count: 4 - digits.count) + digits
            default: out.unicodeScalars.append(scalar)
            }
        }
        return out + "\""
    }
}
}

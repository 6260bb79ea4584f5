import CGodwit
import Foundation
import GodwitSystem
import VhostUser
#if canImport(Glibc)
import Glibc
#endif

/// Starts the I/O domains a VMM's devices need and starts each again when it dies, until `stop()`:
/// the supervisor DESIGN.md gives the VMM until the host agent exists.
///
/// Each domain is a `godwit iodomain` process spawned with a clean signal state, only the descriptors
/// it is given (a TAP, for example), its namespaces (`GODWIT_SANDBOX_NAMESPACES=1`) and
/// `GODWIT_PARENT_PID`, so it dies with the VMM even when the VMM is killed. One watcher thread per
/// domain waits for it and restarts it with back-off (20 ms, doubling while it keeps dying within a
/// second of starting, at most 2 s). The VMM's vhost-user devices reconnect on their own
/// (`VhostUserDevice.reconnectAutomatically`).
public final class IODomainSupervisor: @unchecked Sendable {
    /// One supervised I/O domain: how to start it and what it serves.
    public struct Spec: Sendable {
        /// A short name for logs ("disk0").
        public var name: String
        /// Arguments after the executable (`["iodomain", "--blk", ...]`).
        public var arguments: [String]
        /// Descriptors passed to the domain as 3, 4, ... in this order.
        public var descriptors: [FileDescriptor]
        /// The sockets the domain listens on: a start counts as done when they all exist.
        public var sockets: [String]
        /// Enter new user, mount, IPC, network and PID namespaces (the full sandbox).
        public var namespaces: Bool

        public init(name: String, arguments: [String], descriptors: [FileDescriptor] = [], sockets: [String], namespaces: Bool = true) {
            self.name = name
            self.arguments = arguments
            self.descriptors = descriptors
            self.sockets = sockets
            self.namespaces = namespaces
        }
    }

    /// A domain's current process and history.
    public struct Status: Sendable, Equatable {
        public var name: String
        /// The running process (the namespace waiter when namespaced), 0 while restarting.
        public var pid: Int32
        public var restarts: Int
        /// How the last process ended (`exited 1`, `killed by signal 9`), nil before the first restart.
        public var lastExit: String?
    }

    public typealias Logger = @Sendable (String) -> Void

    private let executable: String
    private let log: Logger
    private let lock = Lock()
    private var domains: [Supervised] = []
    private var stopping = false

    /// `executable` is the `godwit` binary (default: this process's own).
    public init(executable: String? = nil, log: Logger? = nil) {
        self.executable = executable ?? IODomainSupervisor.ownExecutable()
        self.log = log ?? { message in FileHandle.standardError.write(Data(("godwit: " + message + "\n").utf8)) }
    }

    /// The running binary's path (/proc/self/exe).
    public static func ownExecutable() -> String {
        (try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/exe")) ?? CommandLine.arguments[0]
    }

    /// Starts a domain and waits (up to `timeout` seconds) until its sockets exist; the watcher keeps it
    /// running from then on. Throws when it cannot be spawned or dies before it serves.
    public func start(_ spec: Spec, timeout: Double = 10) throws {
        let domain = Supervised(spec: spec)
        let pid = try spawn(spec)
        domain.setPID(pid)
        switch IODomainSupervisor.waitForSockets(spec.sockets, of: pid, timeout: timeout) {
        case .ready: break
        case let .exited(status):
            throw MachineSupervisionError.domainFailed(name: spec.name, reason: IODomainSupervisor.describe(status))
        case .timedOut:
            kill(pid, SIGKILL)
            var status: Int32 = 0
            _ = waitpid(pid, &status, 0)
            throw MachineSupervisionError.domainFailed(name: spec.name, reason: "its sockets did not appear within \(timeout) s")
        }
        lock.withLock { domains.append(domain) }
        detachThread(name: "supervise-\(spec.name)") { [weak self] in self?.watch(domain) }
        log("I/O domain \(spec.name) started (pid \(pid))")
    }

    /// How waiting for a process's sockets ended.
    public enum SocketWait: Equatable { case ready, exited(status: Int32), timedOut }

    /// Waits until every path in `sockets` exists, the child `pid` exits (reaped; its wait status), or
    /// `timeout` seconds pass.
    public static func waitForSockets(_ sockets: [String], of pid: Int32, timeout: Double) -> SocketWait {
        let deadline = Date().addingTimeInterval(timeout)
        while !sockets.allSatisfy({ FileManager.default.fileExists(atPath: $0) }) {
            var status: Int32 = 0
            if waitpid(pid, &status, WNOHANG) == pid { return .exited(status: status) }
            if Date() > deadline { return .timedOut }
            usleep(5000)
        }
        return .ready
    }

    /// Every domain's current state.
    public var statuses: [Status] { lock.withLock { domains.map(\.status) } }

    /// Stops supervising and ends every domain (SIGTERM, then SIGKILL after `timeout` seconds).
    public func stop(timeout: Double = 3) {
        let all: [Supervised] = lock.withLock {
            stopping = true
            return domains
        }
        for domain in all where domain.status.pid > 0 { kill(domain.status.pid, SIGTERM) }
        let deadline = Date().addingTimeInterval(timeout)
        for domain in all {
            while !domain.isFinished && Date() < deadline { usleep(5000) }
            if !domain.isFinished && domain.status.pid > 0 { kill(domain.status.pid, SIGKILL) }
        }
        let last = Date().addingTimeInterval(timeout)
        for domain in all {
            while !domain.isFinished && Date() < last { usleep(5000) }
        }
    }

    private var isStopping: Bool { lock.withLock { stopping } }

    /// The watcher: waits for the process, restarts it, until `stop()`.
    private func watch(_ domain: Supervised) {
        var delay = 0.02
        while true {
            let pid = domain.status.pid
            let started = Date()
            var status: Int32 = 0
            while waitpid(pid, &status, 0) < 0 && errno == EINTR {}
            let how = IODomainSupervisor.describe(status)
            if isStopping {
                domain.finish(how)
                return
            }
            // Quick deaths in a row back off; a domain that ran a while restarts at once.
            delay = Date().timeIntervalSince(started) > 1 ? 0.02 : min(delay * 2, 2)
            log("I/O domain \(domain.spec.name) (pid \(pid)) \(how); restarting in \(Int(delay * 1000)) ms")
            domain.exited(how)
            // In its namespaces the domain's server is a child of the process waited for, and can outlive
            // it by a few milliseconds; a new domain would find the socket still served and refuse to start.
            VhostUserListener.waitUntilUnserved(domain.spec.sockets, timeout: 2)
            while true {
                usleep(UInt32(delay * 1_000_000))
                if isStopping {
                    domain.finish(how)
                    return
                }
                do {
                    let next = try spawn(domain.spec)
                    domain.setPID(next)
                    if isStopping { kill(next, SIGTERM) }  // stop() may have looked before the pid was set
                    log("I/O domain \(domain.spec.name) restarted (pid \(next), restart \(domain.status.restarts))")
                    break
                } catch {
                    log("I/O domain \(domain.spec.name) cannot be restarted: \(error)")
                    delay = min(delay * 2, 2)
                }
            }
        }
    }

    private func spawn(_ spec: Spec) throws -> Int32 {
        do {
            return try IODomainSupervisor.spawn(executable: executable, arguments: spec.arguments, descriptors: spec.descriptors,
                                                namespaces: spec.namespaces)
        } catch {
            throw MachineSupervisionError.domainFailed(name: spec.name, reason: "\(error)")
        }
    }

    /// Starts `executable` with `arguments`, a clean signal state, only `descriptors` (as 3, 4, ...),
    /// `GODWIT_PARENT_PID` (it dies with this process) and, with `namespaces`, the sandbox namespaces.
    public static func spawn(executable: String, arguments: [String], descriptors: [FileDescriptor], namespaces: Bool) throws -> Int32 {
        var environment = ProcessInfo.processInfo.environment
        environment["GODWIT_PARENT_PID"] = String(getpid())
        if namespaces { environment[Sandbox.namespacesVariable] = "1" } else { environment.removeValue(forKey: Sandbox.namespacesVariable) }
        let argv = [executable] + arguments
        let envp = environment.map { "\($0.key)=\($0.value)" }
        let keep = descriptors.map(\.rawValue)
        let pid = withCStrings(argv) { argvPointers in
            withCStrings(envp) { envpPointers in
                keep.withUnsafeBufferPointer { godwit_spawn(executable, argvPointers, envpPointers, $0.baseAddress, Int32(keep.count)) }
            }
        }
        guard pid > 0 else { throw SystemError(operation: "posix_spawn", errno: -pid, context: executable) }
        return pid
    }

    static func describe(_ status: Int32) -> String {
        let signal = status & 0x7f
        if signal == 0 { return "exited \((status >> 8) & 0xff)" }
        return "killed by signal \(signal)"
    }
}

/// Why a supervised I/O domain could not be started.
public enum MachineSupervisionError: Error, CustomStringConvertible {
    case domainFailed(name: String, reason: String)

    public var description: String {
        switch self {
        case let .domainFailed(name, reason): return "I/O domain \(name): \(reason)"
        }
    }
}

/// One domain's mutable state, shared by its watcher and readers.
private final class Supervised: @unchecked Sendable {
    let spec: IODomainSupervisor.Spec
    private let lock = Lock()
    private var current: IODomainSupervisor.Status
    private var finished = false

    init(spec: IODomainSupervisor.Spec) {
        self.spec = spec
        current = IODomainSupervisor.Status(name: spec.name, pid: 0, restarts: 0, lastExit: nil)
    }

    var status: IODomainSupervisor.Status { lock.withLock { current } }
    var isFinished: Bool { lock.withLock { finished } }

    func setPID(_ pid: Int32) { lock.withLock { current.pid = pid } }

    func exited(_ how: String) {
        lock.withLock {
            current.pid = 0
            current.restarts += 1
            current.lastExit = how
        }
    }

    func finish(_ how: String) {
        lock.withLock {
            current.pid = 0
            current.lastExit = how
            finished = true
        }
    }
}

/// Calls `body` with a NULL-terminated C array of `strings` that lives for the call.
private func withCStrings<R>(_ strings: [String], _ body: ([UnsafeMutablePointer<CChar>?]) -> R) -> R {
    let pointers = strings.map { strdup($0) } + [nil]
    defer { for pointer in pointers { free(pointer) } }
    return body(pointers)
}

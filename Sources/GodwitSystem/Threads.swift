import CGodwit
#if canImport(Glibc)
import Glibc
#endif

/// What a new thread runs, handed to pthread_create as one retained pointer.
private final class ThreadStart {
    let name: String
    let body: () -> Void
    init(name: String, body: @escaping () -> Void) {
        self.name = name
        self.body = body
    }
}

/// Starts `body` on a new pthread named `name` (at most 15 bytes show in /proc, `top -H` and crash
/// reports, which is how a fault is tied to a thread); detached unless `joinable`, in which case the
/// caller joins the returned handle. The one way threads start in Godwit.
@discardableResult
public func startThread(name: String, joinable: Bool = false, _ body: @escaping () -> Void) throws(SystemError) -> pthread_t {
    var thread = pthread_t()
    let start = Unmanaged.passRetained(ThreadStart(name: name, body: body)).toOpaque()
    let rc = pthread_create(&thread, nil, { raw in
        // raw is the pointer passed below, retained once for this thread.
        let start = Unmanaged<ThreadStart>.fromOpaque(raw!).takeRetainedValue()
        godwit_set_thread_name(start.name)
        start.body()
        return nil
    }, start)
    guard rc == 0 else {
        Unmanaged<ThreadStart>.fromOpaque(start).release()
        throw SystemError(operation: "pthread_create", errno: rc, context: name)
    }
    if !joinable { pthread_detach(thread) }
    return thread
}

/// Starts `body` on a new detached thread named `name`, for callers with no way to report failure:
/// a thread that cannot be created (the process is out of threads or memory) is logged on stderr and
/// the result is false.
@discardableResult
public func detachThread(name: String, _ body: @escaping () -> Void) -> Bool {
    do {
        try startThread(name: name, body)
        return true
    } catch {
        fputs("godwit: cannot start thread \(name): \(error)\n", stderr)
        return false
    }
}

/// CPU affinity: which host CPUs a thread may run on (`taskset`'s list syntax, e.g. "0", "1,3", "0-3").
public enum CPUAffinity {
    /// The CPUs in `list` ("N", "N-M", comma-separated), in order and without repeats; nil when the
    /// list is malformed, empty, or names a CPU at or above `limit` (default: the CPUs this host has).
    public static func parse(_ list: String, limit: Int = Int(godwit_cpu_count())) -> [Int]? {
        var cpus: [Int] = []
        for part in list.split(separator: ",", omittingEmptySubsequences: false) {
            let bounds = part.split(separator: "-", omittingEmptySubsequences: false)
            guard bounds.count == 1 || bounds.count == 2,
                  let low = Int(bounds[0]), let high = Int(bounds[bounds.count - 1]),
                  low >= 0, low <= high, high < limit else { return nil }
            for cpu in low...high where !cpus.contains(cpu) { cpus.append(cpu) }
        }
        return cpus.isEmpty ? nil : cpus
    }

    /// Restricts `thread` (and the threads it starts from then on) to `cpus`.
    public static func pin(_ thread: pthread_t, to cpus: [Int], name: String) throws(SystemError) {
        let rc = cpus.map { Int32(clamping: $0) }.withUnsafeBufferPointer { godwit_set_affinity_of(thread, $0.baseAddress, Int32($0.count)) }
        guard rc == 0 else {
            throw SystemError(operation: "sched_setaffinity", errno: rc, context: "\(name) on CPUs \(cpus.map(String.init).joined(separator: ","))")
        }
    }

    /// The CPUs of `wanted` a thread of this process cannot be pinned to (outside the process's cpuset,
    /// offline, or not a CPU of this host), found by pinning a short-lived thread to each in turn: the
    /// same call `pin` makes, so what passes here pins later. (A thread may be pinned outside the
    /// affinity its process was started with, e.g. by taskset: only the cpuset limits it.)
    public static func unavailable(_ wanted: [Int]) throws(SystemError) -> [Int] {
        // Written by the probe only; read after pthread_join, which orders the two.
        final class Refused: @unchecked Sendable { var cpus: [Int] = [] }
        let refused = Refused()
        let probe = try startThread(name: "affinity-probe", joinable: true) {
            for cpu in wanted where (try? pinCurrentThread(to: [cpu])) == nil { refused.cpus.append(cpu) }
        }
        pthread_join(probe, nil)
        return refused.cpus
    }

    /// Restricts the calling thread, and the threads it starts from now on, to `cpus`.
    public static func pinCurrentThread(to cpus: [Int]) throws(SystemError) {
        try pin(pthread_self(), to: cpus, name: "this thread")
    }
}

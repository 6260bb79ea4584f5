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

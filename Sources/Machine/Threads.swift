import CGodwit
#if canImport(Glibc)
import Glibc
#endif

/// Starts `body` on a new detached-style pthread and returns its handle (joined with `join`).
final class ThreadBox {
    let body: () -> Void
    init(_ body: @escaping () -> Void) { self.body = body }
}

func startThread(name: String, _ body: @escaping () -> Void) throws -> pthread_t {
    var thread = pthread_t()
    let box = Unmanaged.passRetained(ThreadBox({ godwit_set_thread_name(name); body() })).toOpaque()
    let rc = pthread_create(&thread, nil, { raw in
        let box = Unmanaged<ThreadBox>.fromOpaque(raw!).takeRetainedValue()
        box.body()
        return nil
    }, box)
    guard rc == 0 else {
        Unmanaged<ThreadBox>.fromOpaque(box).release()
        throw MachineError.setup("cannot start thread \(name): error \(rc)")
    }
    return thread
}

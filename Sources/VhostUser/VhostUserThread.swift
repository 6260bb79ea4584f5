import GodwitSystem
import CGodwit
#if canImport(Glibc)
import Glibc
#endif

/// A joinable pthread running one closure.
final class VhostUserThread: @unchecked Sendable {
    private final class Box {
        let body: () -> Void
        init(_ body: @escaping () -> Void) { self.body = body }
    }

    private var handle: pthread_t?

    /// Starts `body` on a new thread named `name` (at most 15 characters are kept).
    init(name: String, _ body: @escaping () -> Void) throws {
        var thread = pthread_t()
        let box = Unmanaged.passRetained(Box({ godwit_set_thread_name(name); body() })).toOpaque()
        let rc = pthread_create(&thread, nil, { raw in
            let box = Unmanaged<Box>.fromOpaque(raw!).takeRetainedValue()
            box.body()
            return nil
        }, box)
        guard rc == 0 else {
            Unmanaged<Box>.fromOpaque(box).release()
            throw VhostUserError.deviceError("cannot start thread \(name): error \(rc)")
        }
        handle = thread
    }

    /// Waits for the thread to end (once; later calls return at once). Never call from the thread itself.
    func join() {
        guard let handle else { return }
        self.handle = nil
        pthread_join(handle, nil)
    }

    /// Lets the thread end on its own (its resources go when it returns); `join` then does nothing.
    func detach() {
        guard let handle else { return }
        self.handle = nil
        pthread_detach(handle)
    }

    /// True when called on this thread.
    var isCurrent: Bool {
        guard let handle else { return false }
        return pthread_equal(handle, pthread_self()) != 0
    }
}

/// Runs a GodwitSystem call, turning its `SystemError` into `VhostUserError.system`.
@inline(__always)
func vhostSystem<T>(_ body: () throws(SystemError) -> T) throws -> T {
    do { return try body() } catch { throw VhostUserError.system(error) }
}

import GodwitSystem
#if canImport(Glibc)
import Glibc
#endif

// Small system helpers the API module needs and GodwitSystem does not (yet) have: a condition
// variable, pthreads with a closure, a monotonic clock, and a syscall wrapper with untyped throws
// (GodwitSystem's `systemCall` uses typed throws, which the Swift 6.3 compiler mishandles inside
// do/catch blocks; this module keeps to untyped throws).

/// Runs `body` until it returns something other than -1, retrying on EINTR; -1 becomes a `SystemError`.
@inline(__always)
func posixCall<T: FixedWidthInteger>(_ operation: @autoclosure () -> String, context: @autoclosure () -> String = "",
                                     _ body: () -> T) throws -> T {
    while true {
        let result = body()
        if result != -1 { return result }
        let code = errno
        if code == EINTR { continue }
        throw SystemError(operation: operation(), errno: code, context: context())
    }
}

/// A mutex with a condition variable (CLOCK_MONOTONIC timeouts), both heap-allocated so they never move.
final class ConditionLock: @unchecked Sendable {
    private let mutex: UnsafeMutablePointer<pthread_mutex_t>
    private let cond: UnsafeMutablePointer<pthread_cond_t>

    init() {
        mutex = .allocate(capacity: 1)
        mutex.initialize(to: pthread_mutex_t())
        pthread_mutex_init(mutex, nil)
        cond = .allocate(capacity: 1)
        cond.initialize(to: pthread_cond_t())
        var attributes = pthread_condattr_t()
        pthread_condattr_init(&attributes)
        pthread_condattr_setclock(&attributes, CLOCK_MONOTONIC)
        pthread_cond_init(cond, &attributes)
        pthread_condattr_destroy(&attributes)
    }

    deinit {
        pthread_cond_destroy(cond)
        pthread_mutex_destroy(mutex)
        cond.deinitialize(count: 1)
        cond.deallocate()
        mutex.deinitialize(count: 1)
        mutex.deallocate()
    }

    @inline(__always)
    func withLock<T>(_ body: () throws -> T) rethrows -> T {
        pthread_mutex_lock(mutex)
        defer { pthread_mutex_unlock(mutex) }
        return try body()
    }

    /// Waits (the lock held) until signalled or until the monotonic `deadline`; false on time-out.
    @discardableResult
    func wait(until deadline: Double) -> Bool {
        var ts = timespec()
        let seconds = deadline.rounded(.down)
        ts.tv_sec = Int(seconds)
        ts.tv_nsec = Int((deadline - seconds) * 1e9)
        return pthread_cond_timedwait(cond, mutex, &ts) == 0
    }

    func wait() { pthread_cond_wait(cond, mutex) }
    func signal() { pthread_cond_signal(cond) }
    func broadcast() { pthread_cond_broadcast(cond) }
}

/// Seconds on the monotonic clock.
func monotonicNow() -> Double { monotonicSeconds() }


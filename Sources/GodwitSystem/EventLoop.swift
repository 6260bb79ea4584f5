import CGodwit
#if canImport(Glibc)
import Glibc
#endif

/// An epoll loop on one thread: file descriptors with handlers, run until stopped.
///
/// Handlers run on the loop's thread. `add`/`remove`/`stop` may be called from any thread.
public final class EventLoop: @unchecked Sendable {
    public typealias Handler = (_ events: UInt32) -> Void

    public static let readable = GODWIT_EPOLLIN
    public static let writable = GODWIT_EPOLLOUT

    private let epoll: FileDescriptor
    private let wakeup: EventFD
    private let lock = Lock()
    private var handlers: [UInt64: Handler] = [:]
    private var tokens: [Int32: UInt64] = [:]
    private var nextToken: UInt64 = 1
    private var stopping = false
    private static let wakeToken: UInt64 = 0
    /// `suspend()` in effect, and whether the loop thread has parked for it.
    private let parking = Condition()
    private var suspendRequested = false
    private var parked = false
    private var running = false

    public init() throws(SystemError) {
        epoll = FileDescriptor(owning: try systemCall("epoll_create1") { godwit_epoll_create() })
        wakeup = try EventFD(nonBlocking: true)
        let epfd = epoll.rawValue, wfd = wakeup.descriptor.rawValue
        _ = try systemCall("epoll_ctl") { godwit_epoll_ctl(epfd, 1, wfd, GODWIT_EPOLLIN, EventLoop.wakeToken) }
    }

    /// Watches `fd` for `events` (readable, writable); `handler` runs on the loop thread.
    public func add(_ fd: FileDescriptor, events: UInt32 = EventLoop.readable, handler: @escaping Handler) throws(SystemError) {
        let raw = fd.rawValue
        let token: UInt64 = lock.withLock {
            let t = nextToken
            nextToken += 1
            handlers[t] = handler
            tokens[raw] = t
            return t
        }
        let epfd = epoll.rawValue
        _ = try systemCall("epoll_ctl(ADD)") { godwit_epoll_ctl(epfd, 1, raw, events, token) }
    }

    /// Changes the events watched on `fd` (for example to stop reading a TAP when the guest has no buffers).
    public func modify(_ fd: FileDescriptor, events: UInt32) throws(SystemError) {
        let raw = fd.rawValue
        guard let token = lock.withLock({ tokens[raw] }) else { return }
        let epfd = epoll.rawValue
        _ = try systemCall("epoll_ctl(MOD)") { godwit_epoll_ctl(epfd, 3, raw, events, token) }
    }

    public func remove(_ fd: FileDescriptor) {
        let raw = fd.rawValue
        _ = godwit_epoll_ctl(epoll.rawValue, 2, raw, 0, 0)
        lock.withLock {
            if let t = tokens.removeValue(forKey: raw) { handlers[t] = nil }
        }
    }

    /// Runs until `stop()`; returns then.
    public func run() {
        var tokenBuffer = [UInt64](repeating: 0, count: 32)
        var eventBuffer = [UInt32](repeating: 0, count: 32)
        parking.withLock { running = true }
        defer {
            parking.withLock {
                running = false
                parking.broadcast()
            }
        }
        while !lock.withLock({ stopping }) {
            parkWhileSuspended()
            let n = godwit_epoll_wait(epoll.rawValue, &tokenBuffer, &eventBuffer, 32, -1)
            if n < 0 { continue }  // EINTR
            for i in 0..<Int(n) {
                if tokenBuffer[i] == EventLoop.wakeToken { _ = try? wakeup.wait(); continue }
                if let handler = lock.withLock({ handlers[tokenBuffer[i]] }) { handler(eventBuffer[i]) }
            }
        }
    }

    /// Makes `run()` return after the handlers in progress.
    public func stop() {
        lock.withLock { stopping = true }
        parking.withLock {
            suspendRequested = false
            parking.broadcast()
        }
        try? wakeup.signal()
    }

    /// Holds the loop between handlers: returns once no handler runs and none will until `resume()`
    /// (events that arrive meanwhile wait in the kernel). Returns at once when the loop is not running.
    public func suspend() {
        parking.withLock { suspendRequested = true }
        try? wakeup.signal()
        parking.withLock {
            parking.wait { !running || parked || lock.withLock({ stopping }) }
        }
    }

    /// Lets a suspended loop go on.
    public func resume() {
        parking.withLock {
            suspendRequested = false
            parking.broadcast()
        }
    }

    private func parkWhileSuspended() {
        parking.withLock {
            guard suspendRequested else { return }
            parked = true
            parking.broadcast()
            parking.wait { !suspendRequested }
            parked = false
        }
    }
}

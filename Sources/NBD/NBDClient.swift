import CGodwit
import CNBD
import Foundation
import GodwitSystem
#if canImport(Glibc)
import Glibc
#endif

/// An NBD client on one connection, through libnbd (`nbd_connect_socket`: the connection is made by
/// whoever may open network connections and passed in, so a sandboxed I/O domain never dials out).
///
/// Many commands can be in flight at once on the one connection (`start`): libnbd's asynchronous calls
/// send them without waiting, and one thread per client (`nbd-client`) polls the socket, feeds libnbd's
/// state machine and hands each finished command to its completion, in whatever order the server
/// answers. The synchronous calls are `start` plus a wait. Every libnbd error comes back as
/// `NBDError.remote` with libnbd's message and errno; a server that breaks the protocol makes libnbd
/// drop the connection, and every later call fails the same way (never a trap).
public final class NBDClient: @unchecked Sendable {
    /// One command for `start`. Buffers must stay valid until the completion ran.
    public enum Request {
        case read(offset: UInt64, into: UnsafeMutableRawBufferPointer)
        case write(offset: UInt64, from: UnsafeRawBufferPointer, fua: Bool)
        case flush
        case trim(offset: UInt64, length: UInt64)
        case writeZeroes(offset: UInt64, length: UInt64, mayUnmap: Bool, fua: Bool)
    }

    private let connection: Connection
    /// The export's size in bytes.
    public let size: UInt64
    public let readOnly: Bool
    public let canFlush: Bool
    public let canFUA: Bool
    public let canTrim: Bool
    public let canZero: Bool

    /// Completes the NBD handshake on `socket` (connected to a server) for the export `name`. The client
    /// takes the descriptor over (libnbd closes it): `socket` is left closed, whatever happens.
    public init(socket: FileDescriptor, export name: String) throws(NBDError) {
        let fd = socket.release()
        guard fd >= 0 else { throw .invalidArgument("the NBD socket is closed") }
        guard let handle = nbd_create() else {
            close(fd)
            throw NBDClient.lastError("nbd_create")
        }
        guard nbd_set_export_name(handle, name) == 0 else {
            close(fd)
            let error = NBDClient.lastError("setting export '\(name)'")
            nbd_close(handle)
            throw error
        }
        // From here libnbd owns fd (it closes it on failure too).
        guard nbd_connect_socket(handle, fd) == 0 else {
            let error = NBDClient.lastError("connecting to export '\(name)'")
            nbd_close(handle)
            throw error
        }
        let size = nbd_get_size(handle)
        guard size >= 0 else {
            let error = NBDClient.lastError("nbd_get_size")
            nbd_close(handle)
            throw error
        }
        self.size = UInt64(size)
        readOnly = nbd_is_read_only(handle) == 1
        canFlush = nbd_can_flush(handle) == 1
        canFUA = nbd_can_fua(handle) == 1
        canTrim = nbd_can_trim(handle) == 1
        canZero = nbd_can_zero(handle) == 1
        // libnbd copes with EAGAIN everywhere: a non-blocking socket keeps every submission short.
        let flags = fcntl(fd, F_GETFL)
        if flags >= 0 { _ = fcntl(fd, F_SETFL, flags | O_NONBLOCK) }
        do {
            connection = try Connection(handle: handle, socket: fd)
        } catch {
            nbd_close(handle)
            throw error
        }
    }

    deinit {
        // The poller thread disconnects and frees the handle when it stops (it may be the thread
        // running this, from a completion).
        connection.close()
    }

    /// Calls `body` on the poller thread after each batch of completions it ran (so that their effects
    /// can be passed on together).
    public func setCompletionBatchEnd(_ body: @escaping () -> Void) { connection.setBatchEnd(body) }

    /// Cuts the connection under the commands in flight (one waiting on a dead network fails); every
    /// later call fails. Safe from any thread.
    public func abort() { connection.abort() }

    static func lastError(_ operation: String) -> NBDError {
        let message = nbd_get_error().map { String(cString: $0) } ?? "unknown error"
        return .remote(operation: operation, errno: nbd_get_errno(), message: message)
    }

    private func rangeError(_ offset: UInt64, _ length: UInt64) -> NBDError? {
        offset <= size && length <= size - offset ? nil : .outOfRange(offset: offset, length: length, size: size)
    }

    // MARK: Asynchronous commands

    /// Sends `request` without waiting. `completion` runs once, on the client's poller thread (never
    /// inside this call), with nil or what failed; it must not wait for another command of this client.
    public func start(_ request: Request, completion: @escaping (NBDError?) -> Void) {
        switch request {
        case let .read(offset, buffer):
            if let error = rangeError(offset, UInt64(buffer.count)) { return connection.finish(completion, error) }
            guard buffer.count > 0 else { return connection.finish(completion, nil) }
            connection.issue(.read, offset, completion) { cnbd_aio_pread($0, buffer.baseAddress, buffer.count, offset) }
        case let .write(offset, buffer, fua):
            if let error = rangeError(offset, UInt64(buffer.count)) { return connection.finish(completion, error) }
            guard buffer.count > 0 else { return connection.finish(completion, nil) }
            let flags: UInt32 = fua && canFUA ? CNBD_FLAG_FUA : 0
            connection.issue(.write, offset, flushingAfter(fua && !canFUA, completion)) {
                cnbd_aio_pwrite($0, buffer.baseAddress, buffer.count, offset, flags)
            }
        case .flush:
            guard canFlush else { return connection.finish(completion, nil) }
            connection.issue(.flush, nil, completion) { cnbd_aio_flush($0) }
        case let .trim(offset, length):
            if let error = rangeError(offset, length) { return connection.finish(completion, error) }
            guard canTrim, length > 0 else { return connection.finish(completion, nil) }
            connection.issue(.trim, offset, completion) { cnbd_aio_trim($0, length, offset) }
        case let .writeZeroes(offset, length, mayUnmap, fua):
            if let error = rangeError(offset, length) { return connection.finish(completion, error) }
            guard length > 0 else { return connection.finish(completion, nil) }
            let then = flushingAfter(fua && !canFUA, completion)
            guard canZero else { return writeZeroesByWriting(at: offset, length: length, then) }
            var flags: UInt32 = mayUnmap ? 0 : CNBD_FLAG_NO_HOLE
            if fua && canFUA { flags |= CNBD_FLAG_FUA }
            connection.issue(.writeZeroes, offset, then) { cnbd_aio_zero($0, length, offset, flags) }
        }
    }

    /// `completion`, preceded by a flush when `flush` (FUA asked of a server without it).
    private func flushingAfter(_ flush: Bool, _ completion: @escaping (NBDError?) -> Void) -> (NBDError?) -> Void {
        guard flush else { return completion }
        return { [self] error in
            if let error { completion(error) } else { start(.flush, completion: completion) }
        }
    }

    /// Zeroes written as data, one megabyte after the other (a server without WRITE_ZEROES).
    private func writeZeroesByWriting(at offset: UInt64, length: UInt64, _ completion: @escaping (NBDError?) -> Void) {
        let n = Int(min(UInt64(NBDClient.zeroes.count), length))
        // In bounds: n <= zeroes.count.
        let chunk = UnsafeRawBufferPointer(rebasing: NBDClient.zeroes[0..<n])
        start(.write(offset: offset, from: chunk, fua: false)) { [self] error in
            if let error { return completion(error) }
            guard UInt64(n) < length else { return completion(nil) }
            writeZeroesByWriting(at: offset + UInt64(n), length: length - UInt64(n), completion)
        }
    }

    /// One megabyte of zeroes, shared and never written.
    private static let zeroes: UnsafeRawBufferPointer = {
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 1 << 20, alignment: 4096)
        buffer.initializeMemory(as: UInt8.self, repeating: 0)
        return UnsafeRawBufferPointer(buffer)
    }()

    // MARK: Synchronous commands (never from a completion: they would wait for the poller running it)

    private func wait(_ request: Request) throws(NBDError) {
        guard !connection.isPollerThread else {
            throw .invalidArgument("a synchronous NBD call from a completion would wait for itself")
        }
        let waiter = Waiter()
        start(request) { waiter.finish($0) }
        if let error = waiter.wait() { throw error }
    }

    public func read(at offset: UInt64, into buffer: UnsafeMutableRawBufferPointer) throws(NBDError) {
        try wait(.read(offset: offset, into: buffer))
    }

    public func write(at offset: UInt64, from buffer: UnsafeRawBufferPointer, fua: Bool = false) throws(NBDError) {
        try wait(.write(offset: offset, from: buffer, fua: fua))
    }

    public func flush() throws(NBDError) { try wait(.flush) }

    public func trim(at offset: UInt64, length: UInt64) throws(NBDError) { try wait(.trim(offset: offset, length: length)) }

    public func writeZeroes(at offset: UInt64, length: UInt64, mayUnmap: Bool = false, fua: Bool = false) throws(NBDError) {
        try wait(.writeZeroes(offset: offset, length: length, mayUnmap: mayUnmap, fua: fua))
    }
}

/// One synchronous call's wait for its completion.
private final class Waiter: @unchecked Sendable {
    private let condition = Condition()
    private var done = false
    private var error: NBDError?

    func finish(_ error: NBDError?) {
        condition.withLock {
            self.error = error
            done = true
            condition.broadcast()
        }
    }

    func wait() -> NBDError? {
        condition.withLock {
            condition.wait(until: { done })
            return error
        }
    }
}

/// The libnbd handle of one client and the thread that drives it: it polls the socket (and an eventfd
/// that submitters and `close` signal), calls libnbd's notify functions, and collects finished commands
/// by cookie. Only this thread reads replies, so a finished command is never missed; submitters only
/// send. The thread owns the handle: it disconnects and frees it when the client is gone.
private final class Connection: @unchecked Sendable {
    enum Kind: String { case read, write, flush, trim, writeZeroes = "write zeroes" }

    typealias Completion = (NBDError?) -> Void

    private let handle: OpaquePointer
    /// libnbd's descriptor (for `abort`).
    private let socket: Int32
    private let wake: EventFD
    private let lock = Lock()
    /// Commands libnbd took, by cookie.
    private var waiting: [Int64: (kind: Kind, offset: UInt64?, completion: Completion)] = [:]
    /// Commands that finished without reaching the server (refused, or nothing to do), to complete.
    private var finished: [(Completion, NBDError?)] = []
    private var closing = false
    private var poller: pthread_t?
    private var batchEnd: (() -> Void)?

    init(handle: OpaquePointer, socket: Int32) throws(NBDError) {
        self.handle = handle
        self.socket = socket
        do { wake = try EventFD(nonBlocking: true) } catch { throw .system(error) }
        detachThread(name: "nbd-client") { [self] in run() }
    }

    var isPollerThread: Bool {
        lock.withLock { poller.map { pthread_equal($0, pthread_self()) != 0 } ?? false }
    }

    private static func describe(_ kind: Kind, _ offset: UInt64?) -> String {
        offset.map { "\(kind.rawValue) at \($0)" } ?? kind.rawValue
    }

    /// Sends a command (`send` calls libnbd with the handle and returns the cookie or -1).
    func issue(_ kind: Kind, _ offset: UInt64?, _ completion: @escaping Completion, _ send: (OpaquePointer) -> Int64) {
        let wakePoller: Bool = lock.withLock {
            guard !closing else {
                finished.append((completion, .remote(operation: Connection.describe(kind, offset), errno: ENOTCONN,
                                                     message: "the client is closed")))
                return true
            }
            let cookie = send(handle)
            guard cookie > 0 else {
                finished.append((completion, NBDClient.lastError(Connection.describe(kind, offset))))
                return true
            }
            waiting[cookie] = (kind, offset, completion)
            // The poller sleeps on replies; it must also watch for the socket to take the rest of a
            // request that did not fit, and learn of a connection that died while sending.
            return nbd_aio_get_direction(handle) & CNBD_DIRECTION_WRITE != 0 || nbd_aio_is_dead(handle) != 0
        }
        if wakePoller { try? wake.signal() }
    }

    /// Completes `completion` with `error` from the poller thread.
    func finish(_ completion: @escaping Completion, _ error: NBDError?) {
        lock.withLock { finished.append((completion, error)) }
        try? wake.signal()
    }

    func abort() {
        // Only while libnbd still uses the descriptor (a dead connection's number may have been reused).
        if nbd_aio_get_fd(handle) == socket { _ = Glibc.shutdown(socket, Int32(Glibc.SHUT_RDWR)) }
    }

    func setBatchEnd(_ body: @escaping () -> Void) { lock.withLock { batchEnd = body } }

    func close() {
        lock.withLock { closing = true }
        try? wake.signal()
    }

    private func run() {
        lock.withLock { poller = pthread_self() }
        var fds = [pollfd](repeating: pollfd(), count: 2)
        while true {
            let fd = nbd_aio_get_fd(handle)  // -1 once the connection is gone
            let direction = fd >= 0 ? nbd_aio_get_direction(handle) : 0
            var events: Int16 = 0
            if direction & CNBD_DIRECTION_READ != 0 { events |= Int16(POLLIN) }
            if direction & CNBD_DIRECTION_WRITE != 0 { events |= Int16(POLLOUT) }
            fds[0] = pollfd(fd: wake.descriptor.rawValue, events: Int16(POLLIN), revents: 0)
            fds[1] = pollfd(fd: events != 0 ? fd : -1, events: events, revents: 0)
            // In bounds: fds holds the 2 entries poll is told about.
            let n = fds.withUnsafeMutableBufferPointer { Glibc.poll($0.baseAddress, 2, -1) }
            if n < 0 { continue }  // EINTR
            if fds[0].revents != 0 { _ = try? wake.wait() }
            if fds[1].revents & Int16(POLLIN | POLLHUP | POLLERR) != 0 { _ = nbd_aio_notify_read(handle) }
            if fds[1].revents & Int16(POLLOUT) != 0, nbd_aio_get_direction(handle) & CNBD_DIRECTION_WRITE != 0 {
                _ = nbd_aio_notify_write(handle)
            }
            let done = reap()
            for (completion, error) in done { completion(error) }
            if !done.isEmpty, let batchEnd = lock.withLock({ batchEnd }) { batchEnd() }
            if lock.withLock({ closing }) { break }
        }
        nbd_shutdown(handle, 0)
        for (completion, error) in reap(closed: true) { completion(error) }
        nbd_close(handle)
    }

    /// Takes every finished command (by then libnbd has retired them); `closed`: everything left too.
    private func reap(closed: Bool = false) -> [(Completion, NBDError?)] {
        lock.withLock {
            var done = finished
            finished = []
            while true {
                let cookie = nbd_aio_peek_command_completed(handle)
                guard cookie > 0 else { break }
                let ok = nbd_aio_command_completed(handle, UInt64(cookie)) == 1
                guard let entry = waiting.removeValue(forKey: cookie) else { continue }
                done.append((entry.completion, ok ? nil : NBDClient.lastError(Connection.describe(entry.kind, entry.offset))))
            }
            // libnbd retires every command when the connection dies; none can finish after that.
            if closed || nbd_aio_is_dead(handle) != 0 || nbd_aio_is_closed(handle) != 0 {
                for entry in waiting.values {
                    done.append((entry.completion, .remote(operation: Connection.describe(entry.kind, entry.offset),
                                                           errno: ENOTCONN, message: "the NBD connection is gone")))
                }
                waiting = [:]
            }
            return done
        }
    }
}

import CGodwit
import GodwitSystem
#if canImport(Glibc)
import Glibc
#endif

/// Reads and writes whole buffers on a stream socket with a no-progress time-out on every wait,
/// a bandwidth cap on writes, and byte counters. Errors are `MigrationError`s.
final class SocketIO: @unchecked Sendable {
    let socket: FileDescriptor
    let limiter = BandwidthLimiter()
    private let lock = Lock()
    private var timeoutSeconds: Double
    private var sent: UInt64 = 0
    private var received: UInt64 = 0

    init(socket: FileDescriptor, timeout: Double) {
        self.socket = socket
        timeoutSeconds = timeout
    }

    var timeout: Double {
        get { lock.withLock { timeoutSeconds } }
        set { lock.withLock { timeoutSeconds = newValue } }
    }
    var bytesSent: UInt64 { lock.withLock { sent } }
    var bytesReceived: UInt64 { lock.withLock { received } }

    /// Writes all of `buffer`, in pieces the limiter grants.
    func writeAll(_ buffer: UnsafeRawBufferPointer, operation: String) throws(MigrationError) {
        let raw = socket.rawValue
        var done = 0
        while done < buffer.count {
            let end = done + limiter.acquire(upTo: buffer.count - done)
            while done < end {
                // In bounds: done < end <= buffer.count.
                let piece = UnsafeRawBufferPointer(rebasing: buffer[done..<end])
                let result = Result { () throws(SystemError) -> Int in
                    try systemCall("send", context: "migration socket") {
                        Glibc.send(raw, piece.baseAddress, piece.count, Int32(MSG_NOSIGNAL | MSG_DONTWAIT))
                    }
                }
                guard let n = try progress(result) else { try wait(for: POLLOUT, operation: operation); continue }
                done += n
                lock.withLock { sent &+= UInt64(n) }
            }
        }
    }

    func writeAll(_ bytes: [UInt8], operation: String) throws(MigrationError) {
        // In bounds: the buffer is the array's own storage with its own count.
        let result = bytes.withUnsafeBytes { b in Result { () throws(MigrationError) in try writeAll(b, operation: operation) } }
        try result.get()
    }

    /// Fills all of `buffer`; the peer closing first is `.peerClosed`.
    func readExactly(_ buffer: UnsafeMutableRawBufferPointer, operation: String) throws(MigrationError) {
        let raw = socket.rawValue
        var done = 0
        while done < buffer.count {
            // In bounds: done < buffer.count.
            let piece = UnsafeMutableRawBufferPointer(rebasing: buffer[done...])
            let result = Result { () throws(SystemError) -> Int in
                try systemCall("recv", context: "migration socket") { Glibc.recv(raw, piece.baseAddress, piece.count, Int32(MSG_DONTWAIT)) }
            }
            guard let n = try progress(result) else { try wait(for: POLLIN, operation: operation); continue }
            if n == 0 { throw .peerClosed }
            done += n
            lock.withLock { received &+= UInt64(n) }
        }
    }

    func read(count: Int, operation: String) throws(MigrationError) -> [UInt8] {
        var bytes = [UInt8](repeating: 0, count: count)
        // In bounds: the buffer is the array's own `count` bytes.
        let result = bytes.withUnsafeMutableBytes { b in Result { () throws(MigrationError) in try readExactly(b, operation: operation) } }
        try result.get()
        return bytes
    }

    /// The count transferred, nil when the socket would block; a vanished peer is `.peerClosed`.
    private func progress(_ result: Result<Int, SystemError>) throws(MigrationError) -> Int? {
        switch result {
        case .success(let n): return n
        case .failure(let error) where error.errno == EAGAIN || error.errno == EWOULDBLOCK: return nil
        case .failure(let error) where error.errno == EPIPE || error.errno == ECONNRESET: throw .peerClosed
        case .failure(let error): throw .system(error)
        }
    }

    /// Waits until the socket is ready for `events`, at most the time-out.
    func wait(for events: Int32, operation: String) throws(MigrationError) {
        try Self.poll(socket, events: events, timeout: timeout, operation: operation)
    }

    /// poll(2) on one descriptor; nil `timeout` waits for ever.
    static func poll(_ fd: FileDescriptor, events: Int32, timeout: Double?, operation: String) throws(MigrationError) {
        var entry = pollfd(fd: fd.rawValue, events: Int16(events), revents: 0)
        let milliseconds: Int32 = timeout.map { $0.isFinite ? Int32(max(0, min($0, 86_400)) * 1000) : -1 } ?? -1
        let result = Result { () throws(SystemError) -> Int32 in try systemCall("poll", context: "migration socket") { Glibc.poll(&entry, 1, milliseconds) } }
        switch result {
        case .success(0): throw .timedOut(operation: "\(operation) (nothing for \(timeout ?? 0) s)")
        case .success: return
        case .failure(let error): throw .system(error)
        }
    }

    /// shutdown(2) both ways: wakes a thread blocked on the socket, and the peer sees the end of the stream.
    func shutdown() { _ = Glibc.shutdown(socket.rawValue, Int32(SHUT_RDWR)) }
}

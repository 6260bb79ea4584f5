import CGodwit
import GodwitSystem
#if canImport(Glibc)
import Glibc
#endif

/// One end of a vhost-user connection: a connected Unix stream socket that sends and receives whole
/// messages with their file descriptors (SCM_RIGHTS).
///
/// Not thread-safe for concurrent receives or concurrent sends; the frontend and the backend each use
/// a channel from one thread at a time.
public final class VhostUserChannel: @unchecked Sendable {
    public let socket: FileDescriptor
    /// Once the first byte of a message has arrived, the rest must arrive within this many seconds,
    /// or the read fails (a peer that stalls mid-message cannot hold a thread for ever).
    public var messageTimeout: Double = 5

    /// Takes ownership of a connected stream socket.
    public init(socket: FileDescriptor) {
        self.socket = socket
    }

    /// Connects to the backend listening at `path`.
    public static func connect(path: String) throws -> VhostUserChannel {
        var address = try VhostUserSocket.address(path)
        let fd = try VhostUserSocket.newSocket()
        let raw = fd.rawValue
        let rc = withUnsafePointer(to: &address) { pointer in
            pointer.withMemoryRebound(to: sockaddr.self, capacity: 1) { sa in
                Glibc.connect(raw, sa, socklen_t(MemoryLayout<sockaddr_un>.size))
            }
        }
        if rc != 0 { throw VhostUserError.system(SystemError(operation: "connect", errno: godwit_errno(), context: path)) }
        return VhostUserChannel(socket: fd)
    }

    /// A connected pair (socketpair), for tests and for serving a connection passed in by a supervisor.
    public static func pair() throws -> (VhostUserChannel, VhostUserChannel) {
        var fds: [Int32] = [-1, -1]
        _ = try vhostSystem { () throws(SystemError) in try systemCall("socketpair") { godwit_socketpair(&fds) } }
        return (VhostUserChannel(socket: FileDescriptor(owning: fds[0])),
                VhostUserChannel(socket: FileDescriptor(owning: fds[1])))
    }

    /// Shuts the socket down in both directions: the peer sees end of file, a blocked receive returns.
    public func shutdown() {
        _ = Glibc.shutdown(socket.rawValue, Int32(SHUT_RDWR))
    }

    // MARK: Sending

    /// Sends `message` with its descriptors in one sendmsg.
    public func send(_ message: VhostUserMessage) throws {
        try sendRaw(VhostUserCodec.encode(message), fileDescriptors: message.fileDescriptors.map(\.rawValue))
    }

    /// Sends raw bytes with raw descriptors (the descriptors go with the first byte). For tests that
    /// need malformed messages, and for `send`.
    public func sendRaw(_ bytes: [UInt8], fileDescriptors: [Int32] = []) throws {
        guard !bytes.isEmpty else { return }
        var done = 0
        var fds = fileDescriptors
        let raw = socket.rawValue
        while done < bytes.count {
            let start = done
            let n = bytes.withUnsafeBytes { buffer -> Int in
                // In bounds: start < buffer.count.
                godwit_send_fds(raw, buffer.baseAddress! + start, buffer.count - start, fds, Int32(fds.count))
            }
            if n < 0 {
                throw VhostUserError.system(SystemError(operation: "sendmsg", errno: godwit_errno(), context: "vhost-user socket"))
            }
            // The descriptors went with the first part.
            fds = []
            done += n
        }
    }

    // MARK: Receiving

    /// Receives one message. Waits for its first byte up to `timeout` seconds (nil: for ever), then up
    /// to `messageTimeout` for the rest. Decoding errors close the descriptors that came with it.
    public func receive(direction: VhostUserDirection, timeout: Double? = nil) throws -> VhostUserMessage {
        var fds: [FileDescriptor] = []
        do {
            var header = [UInt8](repeating: 0, count: VhostUserCodec.headerSize)
            let got = try readFully(&header, fds: &fds, firstTimeout: timeout, request: nil)
            if got == 0 { throw VhostUserError.connectionClosed }
            if got < header.count { throw VhostUserError.truncatedHeader(received: got) }
            let decoded = try VhostUserCodec.decodeHeader(header, direction: direction)
            var payload = [UInt8](repeating: 0, count: Int(decoded.size))
            if !payload.isEmpty {
                let n = try readFully(&payload, fds: &fds, firstTimeout: messageTimeout, request: decoded.request.rawValue)
                if n < payload.count {
                    throw VhostUserError.truncatedPayload(request: decoded.request.rawValue, expected: payload.count, received: n)
                }
            }
            let message = try VhostUserCodec.decodePayload(header: decoded, payload: payload, fileDescriptors: fds,
                                                           direction: direction)
            return message
        } catch {
            for fd in fds { fd.close() }
            throw error
        }
    }

    /// Fills `buffer`; returns the bytes read (fewer only at end of file). Descriptors that arrive are
    /// appended to `fds`.
    private func readFully(_ buffer: inout [UInt8], fds: inout [FileDescriptor], firstTimeout: Double?,
                           request: UInt32?) throws -> Int {
        var done = 0
        var deadline: Double? = firstTimeout.map { VhostUserSocket.now() + $0 }
        while done < buffer.count {
            try waitReadable(until: deadline, operation: done == 0 && request == nil ? "receive" : "message read")
            var received = [Int32](repeating: -1, count: VhostUserCodec.maxFileDescriptors)
            var count: Int32 = 0
            var truncated: Int32 = 0
            let start = done
            let raw = socket.rawValue
            let n = buffer.withUnsafeMutableBytes { b in
                // In bounds: start < b.count.
                godwit_recv_fds(raw, b.baseAddress! + start, b.count - start, &received,
                                Int32(VhostUserCodec.maxFileDescriptors), &count, &truncated)
            }
            if n < 0 {
                let code = godwit_errno()
                if code == EAGAIN || code == EINTR { continue }
                throw VhostUserError.system(SystemError(operation: "recvmsg", errno: code, context: "vhost-user socket"))
            }
            for i in 0..<Int(count) { fds.append(FileDescriptor(owning: received[i])) }
            if truncated != 0 || fds.count > VhostUserCodec.maxFileDescriptors {
                throw VhostUserError.tooManyFileDescriptors(request: request)
            }
            if n == 0 { return done }
            done += n
            // The rest of the message must follow promptly.
            deadline = VhostUserSocket.now() + messageTimeout
        }
        return done
    }

    private func waitReadable(until deadline: Double?, operation: String) throws {
        var p = pollfd(fd: socket.rawValue, events: Int16(POLLIN), revents: 0)
        while true {
            var timeout: Int32 = -1
            if let deadline {
                let remaining = deadline - VhostUserSocket.now()
                if remaining <= 0 { throw VhostUserError.timedOut(operation: operation, seconds: messageTimeout) }
                timeout = Int32(min(remaining * 1000 + 1, 60_000))
            }
            let n = poll(&p, 1, timeout)
            if n < 0 {
                let code = godwit_errno()
                if code == EINTR { continue }
                throw VhostUserError.system(SystemError(operation: "poll", errno: code, context: "vhost-user socket"))
            }
            if n > 0 { return }
        }
    }
}

/// A listening Unix socket for vhost-user connections.
public final class VhostUserListener: @unchecked Sendable {
    public let socket: FileDescriptor
    public let path: String

    /// Whether some process accepts connections on `path` now.
    public static func isServed(_ path: String) -> Bool {
        (try? VhostUserChannel.connect(path: path)) != nil
    }

    /// Waits until nobody accepts on any of `paths`, or `timeout` seconds pass; returns whether all are
    /// free. For a supervisor restarting a killed I/O domain: the domain's server runs inside its own
    /// namespaces as a child of the process that was waited for, and can outlive it by a few
    /// milliseconds, long enough for its replacement to find the sockets still served and refuse them.
    @discardableResult
    public static func waitUntilUnserved(_ paths: [String], timeout: Double) -> Bool {
        let deadline = monotonicSeconds() + timeout
        while paths.contains(where: isServed) {
            if monotonicSeconds() > deadline { return false }
            usleep(5000)
        }
        return true
    }

    /// Binds and listens on `path`. A stale socket file (nobody accepts on it) is replaced; a live socket
    /// or a file that is not a socket is left alone and reported.
    public init(path: String, backlog: Int32 = 16) throws {
        var address = try VhostUserSocket.address(path)
        var st = stat()
        if lstat(path, &st) == 0 {
            guard (st.st_mode & S_IFMT) == S_IFSOCK else {
                throw VhostUserError.system(SystemError(operation: "bind", errno: EEXIST, context: "\(path) (exists and is not a socket)"))
            }
            if VhostUserListener.isServed(path) {
                throw VhostUserError.system(SystemError(operation: "bind", errno: EADDRINUSE, context: "\(path) (another process serves it)"))
            }
            _ = unlink(path)
        }
        let fd = try VhostUserSocket.newSocket()
        let raw = fd.rawValue
        let rc = withUnsafePointer(to: &address) { pointer in
            pointer.withMemoryRebound(to: sockaddr.self, capacity: 1) { sa in
                bind(raw, sa, socklen_t(MemoryLayout<sockaddr_un>.size))
            }
        }
        if rc != 0 { throw VhostUserError.system(SystemError(operation: "bind", errno: godwit_errno(), context: path)) }
        if Glibc.listen(raw, backlog) != 0 {
            throw VhostUserError.system(SystemError(operation: "listen", errno: godwit_errno(), context: path))
        }
        socket = fd
        self.path = path
    }

    /// Takes ownership of a socket that already listens (passed in by a supervisor).
    public init(listening socket: FileDescriptor, path: String = "") {
        self.socket = socket
        self.path = path
    }

    /// Accepts one connection; nil when the listener is non-blocking and none is pending, or the
    /// connection was aborted before it was accepted.
    public func accept() throws -> VhostUserChannel? {
        let raw = socket.rawValue
        while true {
            let fd = godwit_accept(raw)
            if fd >= 0 { return VhostUserChannel(socket: FileDescriptor(owning: fd)) }
            let code = godwit_errno()
            switch code {
            case EINTR: continue
            case EAGAIN, ECONNABORTED, EPROTO: return nil
            default: throw VhostUserError.system(SystemError(operation: "accept", errno: code, context: path))
            }
        }
    }
}

enum VhostUserSocket {
    static let maxPathLength = MemoryLayout.size(ofValue: sockaddr_un().sun_path) - 1

    static func address(_ path: String) throws -> sockaddr_un {
        let bytes = Array(path.utf8)
        guard !bytes.isEmpty, !bytes.contains(0) else {
            throw VhostUserError.system(SystemError(operation: "socket address", errno: EINVAL, context: "(empty path or NUL in path)"))
        }
        guard bytes.count <= maxPathLength else {
            throw VhostUserError.system(SystemError(operation: "socket address", errno: ENAMETOOLONG,
                                                    context: "\(path) (\(bytes.count) bytes; at most \(maxPathLength))"))
        }
        var address = sockaddr_un()
        address.sun_family = sa_family_t(AF_UNIX)
        withUnsafeMutableBytes(of: &address.sun_path) { raw in
            // In bounds: bytes.count <= maxPathLength < raw.count; the rest stays zero (the NUL).
            for (i, byte) in bytes.enumerated() { raw[i] = byte }
        }
        return address
    }

    static func newSocket() throws -> FileDescriptor {
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        if fd < 0 { throw VhostUserError.system(SystemError(operation: "socket(AF_UNIX)", errno: godwit_errno())) }
        return FileDescriptor(owning: fd)
    }

    /// Monotonic seconds.
    static func now() -> Double { monotonicSeconds() }
}

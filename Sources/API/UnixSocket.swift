import GodwitSystem
#if canImport(Glibc)
import Glibc
#endif

/// Stream sockets in the Unix domain, as the API server and client use them. (GodwitSystem has no
/// socket helpers yet; these could move there when another module needs them.)
public enum UnixSocket {
    /// The longest path a `sockaddr_un` holds (107 bytes plus the terminating NUL on Linux).
    public static let maxPathLength = MemoryLayout.size(ofValue: sockaddr_un().sun_path) - 1

    static func address(_ path: String) throws -> sockaddr_un {
        let bytes = Array(path.utf8)
        guard !bytes.isEmpty else { throw SystemError(operation: "socket address", errno: EINVAL, context: "(empty path)") }
        guard bytes.count <= maxPathLength else {
            throw SystemError(operation: "socket address", errno: ENAMETOOLONG,
                              context: "\(path) (\(bytes.count) bytes; at most \(maxPathLength))")
        }
        guard !bytes.contains(0) else { throw SystemError(operation: "socket address", errno: EINVAL, context: "(path contains NUL)") }
        var address = sockaddr_un()
        address.sun_family = sa_family_t(AF_UNIX)
        withUnsafeMutableBytes(of: &address.sun_path) { raw in
            // In bounds: bytes.count <= maxPathLength < raw.count, and the rest stays zero (the NUL).
            for (i, byte) in bytes.enumerated() { raw[i] = byte }
        }
        return address
    }

    static func newSocket() throws -> FileDescriptor {
        let fd = try posixCall("socket(AF_UNIX)") { socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0) }
        return FileDescriptor(owning: fd)
    }

    /// Binds and listens on `path`. A stale socket file (nobody accepts on it) is removed first; a live
    /// socket or a file that is not a socket is left alone and reported.
    public static func listen(path: String, backlog: Int32 = 128) throws -> FileDescriptor {
        var address = try address(path)
        var st = stat()
        if lstat(path, &st) == 0 {
            guard (st.st_mode & S_IFMT) == S_IFSOCK else {
                throw SystemError(operation: "bind", errno: EEXIST, context: "\(path) (exists and is not a socket)")
            }
            if (try? connect(path: path)) != nil {
                throw SystemError(operation: "bind", errno: EADDRINUSE, context: "\(path) (another process serves it)")
            }
            _ = unlink(path)
        }
        let fd = try newSocket()
        let raw = fd.rawValue
        _ = try withUnsafePointer(to: &address) { pointer in
            try pointer.withMemoryRebound(to: sockaddr.self, capacity: 1) { sa in
                try posixCall("bind", context: path) { bind(raw, sa, socklen_t(MemoryLayout<sockaddr_un>.size)) }
            }
        }
        _ = try posixCall("listen", context: path) { Glibc.listen(raw, backlog) }
        return fd
    }

    /// Connects to the socket at `path`.
    public static func connect(path: String) throws -> FileDescriptor {
        var address = try address(path)
        let fd = try newSocket()
        let raw = fd.rawValue
        _ = try withUnsafePointer(to: &address) { pointer in
            try pointer.withMemoryRebound(to: sockaddr.self, capacity: 1) { sa in
                try posixCall("connect", context: path) { Glibc.connect(raw, sa, socklen_t(MemoryLayout<sockaddr_un>.size)) }
            }
        }
        return fd
    }

    /// Accepts one connection (close-on-exec); nil when none is pending on a non-blocking listener.
    static func accept(_ listener: FileDescriptor) throws -> FileDescriptor? {
        let raw = listener.rawValue
        while true {
            // accept4(SOCK_CLOEXEC) is a GNU extension Swift's Glibc module does not declare: set
            // close-on-exec right after accepting instead.
            let fd = Glibc.accept(raw, nil, nil)
            if fd >= 0 {
                _ = fcntl(fd, F_SETFD, FD_CLOEXEC)
                return FileDescriptor(owning: fd)
            }
            let code = errno
            switch code {
            case EINTR: continue
            case EAGAIN, ECONNABORTED, EPROTO: return nil
            default: throw SystemError(operation: "accept4", errno: code)
            }
        }
    }

    /// Sets the send time-out, so a peer that stops reading cannot block a writer for ever.
    static func setSendTimeout(_ fd: FileDescriptor, seconds: Double) {
        var tv = timeval(tv_sec: Int(seconds), tv_usec: Int((seconds - seconds.rounded(.down)) * 1e6))
        _ = setsockopt(fd.rawValue, SOL_SOCKET, SO_SNDTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
    }

    /// Writes all of `bytes` without raising SIGPIPE; throws on error or send time-out.
    static func sendAll(_ fd: FileDescriptor, _ bytes: [UInt8]) throws {
        var done = 0
        let raw = fd.rawValue
        while done < bytes.count {
            let n = try bytes.withUnsafeBytes { buffer in
                // In bounds: done < buffer.count.
                try posixCall("send") { send(raw, buffer.baseAddress! + done, buffer.count - done, Int32(MSG_NOSIGNAL)) }
            }
            if n == 0 { throw SystemError(operation: "send", errno: EPIPE) }
            done += n
        }
    }

    /// What waiting for input produced.
    enum ReadOutcome: Equatable {
        case data(Int)
        case endOfFile
        case timedOut
        case interrupted   // the wake-up descriptor became readable (the server stops)
    }

    /// Waits until `fd` is readable (or `wake` is, or the monotonic `deadline` passes), then reads into `buffer`.
    static func read(_ fd: FileDescriptor, into buffer: inout [UInt8], deadline: Double, wake: FileDescriptor?) throws -> ReadOutcome {
        var fds = [pollfd(fd: fd.rawValue, events: Int16(POLLIN), revents: 0)]
        if let wake { fds.append(pollfd(fd: wake.rawValue, events: Int16(POLLIN), revents: 0)) }
        while true {
            let remaining = deadline - monotonicNow()
            if remaining <= 0 { return .timedOut }
            let timeout = Int32(min(remaining * 1000 + 1, 60_000))
            let n = poll(&fds, nfds_t(fds.count), timeout)
            if n < 0 {
                if errno == EINTR { continue }
                throw SystemError(operation: "poll", errno: errno)
            }
            if n == 0 { continue }
            if fds.count > 1 && fds[1].revents != 0 { return .interrupted }
            if fds[0].revents != 0 { break }
        }
        let count = buffer.count
        let raw = fd.rawValue
        let n = try buffer.withUnsafeMutableBytes { b in
            try posixCall("recv") { recv(raw, b.baseAddress, count, Int32(MSG_DONTWAIT)) }
        }
        return n == 0 ? .endOfFile : .data(n)
    }

    /// True when the peer has closed or reset the connection (checked without blocking or reading).
    static func peerClosed(_ fd: FileDescriptor) -> Bool {
        let pollRDHUP: Int16 = 0x2000
        var p = pollfd(fd: fd.rawValue, events: pollRDHUP, revents: 0)
        let n = poll(&p, 1, 0)
        return n > 0 && (p.revents & (pollRDHUP | Int16(POLLHUP) | Int16(POLLERR) | Int16(POLLNVAL))) != 0
    }
}

import CGodwit
import GodwitSystem
#if canImport(Glibc)
import Glibc
#endif

/// Listening sockets for an NBD server: TCP (IPv4 HOST:PORT) or a Unix socket path.
public enum NBDListener {
    /// A listening socket on `tcp` ("HOST:PORT") or `unix` (a path, replaced if a stale socket is there).
    public static func open(tcp: String?, unix: String?) throws(NBDError) -> FileDescriptor {
        if let unix {
            var address = sockaddr_un()
            address.sun_family = sa_family_t(AF_UNIX)
            let bytes = Array(unix.utf8)
            guard bytes.count < MemoryLayout.size(ofValue: address.sun_path) else { throw .invalidArgument("socket path '\(unix)' is too long") }
            // In bounds: bytes.count < sizeof(sun_path), checked above; the rest stays zero.
            withUnsafeMutableBytes(of: &address.sun_path) { for (i, b) in bytes.enumerated() { $0[i] = b } }
            let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
            guard fd >= 0 else { throw .system(SystemError(operation: "socket", errno: godwit_errno())) }
            let descriptor = FileDescriptor(owning: fd)
            unlink(unix)
            let rc = withUnsafePointer(to: &address) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) } }
            guard rc == 0 else { throw .system(SystemError(operation: "bind", errno: godwit_errno(), context: unix)) }
            guard Glibc.listen(fd, 64) == 0 else { throw .system(SystemError(operation: "listen", errno: godwit_errno(), context: unix)) }
            return descriptor
        }
        guard let tcp, let colon = tcp.lastIndex(of: ":"), let port = UInt16(tcp[tcp.index(after: colon)...]) else {
            throw .invalidArgument("'\(tcp ?? "")' is not HOST:PORT")
        }
        let host = String(tcp[..<colon])
        var address = sockaddr_in()
        address.sin_family = sa_family_t(AF_INET)
        address.sin_port = port.bigEndian
        guard inet_pton(AF_INET, host.isEmpty ? "0.0.0.0" : host, &address.sin_addr) == 1 else {
            throw .invalidArgument("'\(host)' is not an IPv4 address")
        }
        let fd = godwit_host_socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        guard fd >= 0 else { throw .system(SystemError(operation: "socket", errno: godwit_errno())) }
        let descriptor = FileDescriptor(owning: fd)
        var on: Int32 = 1
        _ = setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &on, socklen_t(MemoryLayout<Int32>.size))
        let rc = withUnsafePointer(to: &address) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) } }
        guard rc == 0 else { throw .system(SystemError(operation: "bind", errno: godwit_errno(), context: tcp)) }
        guard Glibc.listen(fd, 64) == 0 else { throw .system(SystemError(operation: "listen", errno: godwit_errno(), context: tcp)) }
        return descriptor
    }
}

/// Connections to NBD servers, made by whoever may dial out (`godwit ctl`, the agent) and then passed
/// to a sandboxed I/O domain.
public enum NBDConnector {
    /// Connects to `address`: `tcp:HOST:PORT` (IPv4 literal) or `unix:PATH`; gives up after `timeout` seconds.
    public static func connect(_ address: String, timeout: Double = 10) throws(NBDError) -> FileDescriptor {
        if address.hasPrefix("unix:") {
            let path = String(address.dropFirst(5))
            var socketAddress = sockaddr_un()
            socketAddress.sun_family = sa_family_t(AF_UNIX)
            let bytes = Array(path.utf8)
            guard !bytes.isEmpty, bytes.count < MemoryLayout.size(ofValue: socketAddress.sun_path) else { throw .invalidArgument("socket path '\(path)'") }
            // In bounds: bytes.count < sizeof(sun_path), checked above.
            withUnsafeMutableBytes(of: &socketAddress.sun_path) { for (i, b) in bytes.enumerated() { $0[i] = b } }
            let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
            guard fd >= 0 else { throw .system(SystemError(operation: "socket", errno: godwit_errno())) }
            let descriptor = FileDescriptor(owning: fd)
            let rc = withUnsafePointer(to: &socketAddress) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { Glibc.connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) } }
            guard rc == 0 else { throw .system(SystemError(operation: "connect", errno: godwit_errno(), context: path)) }
            return descriptor
        }
        guard address.hasPrefix("tcp:"), let colon = address.lastIndex(of: ":"), colon > address.index(address.startIndex, offsetBy: 3),
              let port = UInt16(address[address.index(after: colon)...]) else {
            throw .invalidArgument("'\(address)' is not tcp:HOST:PORT or unix:PATH")
        }
        let host = String(address[address.index(address.startIndex, offsetBy: 4)..<colon])
        var socketAddress = sockaddr_in()
        socketAddress.sin_family = sa_family_t(AF_INET)
        socketAddress.sin_port = port.bigEndian
        guard inet_pton(AF_INET, host, &socketAddress.sin_addr) == 1 else { throw .invalidArgument("'\(host)' is not an IPv4 address") }
        let fd = godwit_host_socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        guard fd >= 0 else { throw .system(SystemError(operation: "socket", errno: godwit_errno())) }
        let descriptor = FileDescriptor(owning: fd)
        var limit = timeval(tv_sec: Int(timeout), tv_usec: 0)
        _ = setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &limit, socklen_t(MemoryLayout<timeval>.size))
        let rc = withUnsafePointer(to: &socketAddress) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { Glibc.connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) } }
        guard rc == 0 else { throw .system(SystemError(operation: "connect", errno: godwit_errno(), context: address)) }
        var zero = timeval()
        _ = setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &zero, socklen_t(MemoryLayout<timeval>.size))
        var on: Int32 = 1
        _ = setsockopt(fd, Int32(IPPROTO_TCP), TCP_NODELAY, &on, socklen_t(MemoryLayout<Int32>.size))
        return descriptor
    }
}

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

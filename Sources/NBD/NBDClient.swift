import CGodwit
import CNBD
import GodwitSystem
#if canImport(Glibc)
import Glibc
#endif

/// An NBD client on one connection, through libnbd (`nbd_connect_socket`: the connection is made by
/// whoever may open network connections and passed in, so a sandboxed I/O domain never dials out).
///
/// Calls are synchronous and libnbd serializes them per handle; for requests in parallel use one
/// client per connection. Every libnbd error comes back as `NBDError.remote` with libnbd's message
/// and errno; a server that breaks the protocol makes libnbd drop the connection, and every later
/// call fails the same way (never a trap).
public final class NBDClient: @unchecked Sendable {
    private let handle: OpaquePointer
    /// The connection's descriptor (libnbd's), kept to cut it from another thread (`abort`).
    private let socket: Int32
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
        self.handle = handle
        guard nbd_set_export_name(handle, name) == 0 else {
            close(fd)
            let error = NBDClient.lastError("setting export '\(name)'")
            nbd_close(handle)
            throw error
        }
        // From here libnbd owns fd (it closes it on failure too).
        self.socket = fd
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
    }

    deinit {
        nbd_shutdown(handle, 0)
        nbd_close(handle)
    }

    /// Cuts the connection under any call in progress (one blocked on a dead network returns with an
    /// error); every later call fails. Safe from any thread: it touches only the socket, not libnbd's
    /// handle, whose lock the blocked call holds.
    public func abort() {
        _ = Glibc.shutdown(socket, Int32(Glibc.SHUT_RDWR))
    }

    static func lastError(_ operation: String) -> NBDError {
        let message = nbd_get_error().map { String(cString: $0) } ?? "unknown error"
        return .remote(operation: operation, errno: nbd_get_errno(), message: message)
    }

    private func check(_ offset: UInt64, _ length: Int) throws(NBDError) {
        guard offset <= size, UInt64(length) <= size - offset else { throw .outOfRange(offset: offset, length: UInt64(length), size: size) }
    }

    public func read(at offset: UInt64, into buffer: UnsafeMutableRawBufferPointer) throws(NBDError) {
        try check(offset, buffer.count)
        guard buffer.count > 0 else { return }
        guard nbd_pread(handle, buffer.baseAddress, buffer.count, offset, 0) == 0 else { throw Self.lastError("read at \(offset)") }
    }

    public func write(at offset: UInt64, from buffer: UnsafeRawBufferPointer, fua: Bool = false) throws(NBDError) {
        try check(offset, buffer.count)
        guard buffer.count > 0 else { return }
        let flags: UInt32 = fua && canFUA ? CNBD_FLAG_FUA : 0
        guard nbd_pwrite(handle, buffer.baseAddress, buffer.count, offset, flags) == 0 else { throw Self.lastError("write at \(offset)") }
        if fua && !canFUA { try flush() }
    }

    public func flush() throws(NBDError) {
        guard canFlush else { return }
        guard nbd_flush(handle, 0) == 0 else { throw Self.lastError("flush") }
    }

    public func trim(at offset: UInt64, length: UInt64) throws(NBDError) {
        guard offset <= size, length <= size - offset else { throw .outOfRange(offset: offset, length: length, size: size) }
        guard canTrim, length > 0 else { return }
        guard nbd_trim(handle, length, offset, 0) == 0 else { throw Self.lastError("trim at \(offset)") }
    }

    public func writeZeroes(at offset: UInt64, length: UInt64, mayUnmap: Bool = false, fua: Bool = false) throws(NBDError) {
        guard offset <= size, length <= size - offset else { throw .outOfRange(offset: offset, length: length, size: size) }
        guard length > 0 else { return }
        if canZero {
            var flags: UInt32 = mayUnmap ? 0 : CNBD_FLAG_NO_HOLE
            if fua && canFUA { flags |= CNBD_FLAG_FUA }
            guard nbd_zero(handle, length, offset, flags) == 0 else { throw Self.lastError("write zeroes at \(offset)") }
        } else {
            let chunk = [UInt8](repeating: 0, count: 1 << 20)
            var done: UInt64 = 0
            while done < length {
                let n = Int(min(UInt64(chunk.count), length - done))
                // In bounds: n <= chunk.count.
                let result = chunk.withUnsafeBytes { c in Result { () throws(NBDError) in try write(at: offset + done, from: UnsafeRawBufferPointer(rebasing: c[0..<n])) } }
                try result.get()
                done += UInt64(n)
            }
        }
        if fua && !canFUA { try flush() }
    }
}

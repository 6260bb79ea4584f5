import CGodwit
#if canImport(Glibc)
import Glibc
#endif

/// A TAP network interface opened with `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`, non-blocking.
///
/// Every frame read or written starts with a `virtio_net_hdr_v1` of `vnetHeaderSize` bytes (12).
public final class Tap: @unchecked Sendable {
    public let descriptor: FileDescriptor
    public let name: String
    public let vnetHeaderSize = 12
    /// True when Godwit created the interface (`tap=auto`): it disappears when the descriptor closes.
    public let created: Bool

    /// Attaches to the TAP `name`, or creates a fresh one when `name` is nil.
    public init(name: String?) throws(SystemError) {
        var actual = [CChar](repeating: 0, count: 16)
        let requested = name ?? ""
        let fd = try systemCall("open TAP", context: requested.isEmpty ? "(new)" : requested) {
            godwit_tap_open(requested, &actual)
        }
        descriptor = FileDescriptor(owning: fd)
        self.name = String(decoding: actual.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
        created = name == nil
        _ = try systemCall("TUNSETVNETHDRSZ", context: self.name) { godwit_tap_set_vnet_header_size(fd, 12) }
    }

    /// Adopts a TAP descriptor passed in by another process (an I/O domain's supervisor): it must have
    /// been opened IFF_TAP | IFF_NO_PI | IFF_VNET_HDR. Takes ownership of `descriptor`.
    public init(adopting descriptor: FileDescriptor) throws(SystemError) {
        var actual = [CChar](repeating: 0, count: 16)
        let fd = descriptor.rawValue
        _ = try systemCall("adopt TAP", context: "descriptor \(fd)") { godwit_tap_adopt(fd, &actual) }
        self.descriptor = descriptor
        self.name = String(decoding: actual.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
        created = false
        _ = try systemCall("TUNSETVNETHDRSZ", context: self.name) { godwit_tap_set_vnet_header_size(fd, 12) }
    }

    /// The TUNSETOFFLOAD request number (for a sandbox's ioctl allow-list).
    public static let setOffloadRequest = UInt(GODWIT_TUNSETOFFLOAD)
    /// TUNGETIFF and TUNSETVNETHDRSZ: adopting a TAP passed in after lock-down.
    public static let getInterfaceRequest = UInt(GODWIT_TUNGETIFF)
    public static let setVnetHeaderSizeRequest = UInt(GODWIT_TUNSETVNETHDRSZ)

    /// Tells the kernel which offloads the guest can take on received frames (TUN_F_* flags).
    public func setOffload(_ flags: UInt32) throws(SystemError) {
        _ = try systemCall("TUNSETOFFLOAD", context: name) { godwit_tap_set_offload(descriptor.rawValue, flags) }
    }

    public func setUp(_ up: Bool) throws(SystemError) {
        _ = try systemCall("SIOCSIFFLAGS", context: name) { godwit_interface_set_up(name, up ? 1 : 0) }
    }

    /// Reads one frame (with its vnet header); nil when none is waiting.
    public func read(into buffer: UnsafeMutableRawBufferPointer) throws(SystemError) -> Int? {
        let n = Glibc.read(descriptor.rawValue, buffer.baseAddress, buffer.count)
        if n >= 0 { return n }
        let code = godwit_errno()
        if code == EAGAIN || code == EINTR { return nil }
        throw SystemError(operation: "read TAP", errno: code, context: name)
    }

    /// Writes one frame from several pieces (the vnet header first); false when the TAP queue is full.
    public func write(_ pieces: [UnsafeRawBufferPointer]) throws(SystemError) -> Bool {
        var iov = pieces.map { iovec(iov_base: UnsafeMutableRawPointer(mutating: $0.baseAddress), iov_len: $0.count) }
        let n = writev(descriptor.rawValue, &iov, Int32(iov.count))
        if n >= 0 { return true }
        let code = godwit_errno()
        if code == EAGAIN || code == EINTR || code == ENOBUFS { return false }
        throw SystemError(operation: "write TAP", errno: code, context: name)
    }
}

extension Tap {
    public static let offloadChecksum = GODWIT_TUN_F_CSUM
    public static let offloadTSO4 = GODWIT_TUN_F_TSO4
    public static let offloadTSO6 = GODWIT_TUN_F_TSO6
    public static let offloadTSOECN = GODWIT_TUN_F_TSO_ECN
    public static let offloadUFO = GODWIT_TUN_F_UFO
}

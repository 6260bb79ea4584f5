import CGodwit
import GodwitSystem
#if canImport(Glibc)
import Glibc
#endif

/// The vhost-user dirty log (SET_LOG_BASE with LOG_SHMFD): a bitmap shared with the frontend, one bit
/// per 4 KiB page of guest-physical memory, set with atomic ORs because the frontend clears it while
/// the backend writes.
public final class VhostUserDirtyLog: @unchecked Sendable {
    /// VHOST_LOG_PAGE.
    public static let pageSize: UInt64 = 0x1000

    private let mapping: MemoryMapping
    /// The first byte of the bitmap inside `mapping`.
    private let start: Int
    /// The bitmap's length in bytes.
    public let size: UInt64
    /// Signalled after a batch of marks (SET_LOG_FD), if the frontend gave one.
    private let lock = Lock()
    private var notifier: FileDescriptor?
    private var outOfRangeMarks: UInt64 = 0

    /// Maps `size` bytes of `fd` at `offset` (any offset: the mapping starts at the page below it).
    public init(fd: FileDescriptor, size: UInt64, offset: UInt64) throws {
        guard size > 0, size <= 1 << 40 else {
            throw VhostUserError.protocolViolation(request: VhostUserRequest.setLogBase.rawValue,
                                                   reason: "log size \(size) is 0 or implausibly large")
        }
        let pageOffset = offset % 4096
        let (end, overflow) = offset.addingReportingOverflow(size)
        guard !overflow, end <= UInt64(Int64.max) else {
            throw VhostUserError.protocolViolation(request: VhostUserRequest.setLogBase.rawValue,
                                                   reason: "log offset \(offset) + size \(size) overflows")
        }
        mapping = try vhostSystem { () throws(SystemError) in
            try MemoryMapping(size: Int(size + pageOffset), fd: fd, offset: Int(offset - pageOffset))
        }
        start = Int(pageOffset)
        self.size = size
    }

    /// Sets the eventfd signalled after marks (nil: none).
    public func setNotifier(_ fd: FileDescriptor?) {
        lock.withLock { notifier = fd }
    }

    /// Marks pages whose bits fell outside the bitmap (a frontend that sized it too small).
    public var marksOutOfRange: UInt64 { lock.withLock { outOfRangeMarks } }

    /// Marks every page that `[address, address + length)` touches.
    public func mark(address: UInt64, length: UInt64) {
        guard length > 0 else { return }
        let first = address / VhostUserDirtyLog.pageSize
        let (end, overflow) = address.addingReportingOverflow(length - 1)
        let last = (overflow ? UInt64.max : end) / VhostUserDirtyLog.pageSize
        var page = first
        while page <= last {
            let byte = page / 8
            guard byte < size else {
                lock.withLock { outOfRangeMarks += 1 }
                return
            }
            // In bounds: byte < size, and the mapping holds start + size bytes.
            godwit_atomic_or8(mapping.base.advanced(by: start + Int(byte)).assumingMemoryBound(to: UInt8.self),
                              UInt8(1) << UInt8(page % 8))
            if page == UInt64.max { break }
            page += 1
        }
    }

    /// Tells the frontend that the log changed (if it asked to be told).
    public func notify() {
        guard let fd = lock.withLock({ notifier }) else { return }
        var one: UInt64 = 1
        _ = withUnsafeBytes(of: &one) { Glibc.write(fd.rawValue, $0.baseAddress, 8) }
    }

    /// Whether the bit for `address`'s page is set (for tests and the frontend's merge).
    public func isDirty(_ address: UInt64) -> Bool {
        let page = address / VhostUserDirtyLog.pageSize
        guard page / 8 < size else { return false }
        let byte = mapping.base.load(fromByteOffset: start + Int(page / 8), as: UInt8.self)
        return byte & (UInt8(1) << UInt8(page % 8)) != 0
    }
}

import GodwitSystem

/// A window of another `BlockBackend`: `[offset, offset + size)` of it, seen as a disk of `size` bytes.
///
/// This is how one I/O domain serves one physical device to many VMs, each on its own slice: a
/// request is checked against the slice's capacity by `BlockDevice` and then shifted by `offset`,
/// so no guest can reach another slice.
public final class SliceBlockBackend: BlockBackend, @unchecked Sendable {
    public let base: BlockBackend
    public let offset: UInt64
    public let capacity: UInt64
    public let readOnly: Bool

    /// `offset` and `size` must be multiples of 512 and lie inside `base`; `readOnly` narrows, never widens.
    public init(base: BlockBackend, offset: UInt64, size: UInt64, readOnly: Bool = false) throws {
        let (end, overflow) = offset.addingReportingOverflow(size)
        guard offset % 512 == 0, size % 512 == 0, size > 0, !overflow, end <= base.capacity else {
            throw VirtioError.backendMismatch(reason: "slice at \(offset) of \(size) bytes is not 512-aligned inside the \(base.capacity)-byte device")
        }
        self.base = base
        self.offset = offset
        self.capacity = size
        self.readOnly = readOnly || base.readOnly
    }

    public var blockSize: UInt32 { base.blockSize }
    public var supportsDiscard: Bool { base.supportsDiscard && !readOnly }
    public var supportsWriteZeroes: Bool { base.supportsWriteZeroes && !readOnly }

    public func read(at position: UInt64, into buffers: [UnsafeMutableRawBufferPointer]) throws {
        try base.read(at: offset + position, into: buffers)
    }

    public func write(at position: UInt64, from buffers: [UnsafeRawBufferPointer]) throws {
        guard !readOnly else { throw VirtioError.backendMismatch(reason: "write to a read-only slice") }
        try base.write(at: offset + position, from: buffers)
    }

    public func flush() throws { try base.flush() }

    public func acceptsAsync(isWrite: Bool, offset position: UInt64, buffers: [UnsafeMutableRawBufferPointer]) -> Bool {
        !(isWrite && readOnly) && base.acceptsAsync(isWrite: isWrite, offset: offset + position, buffers: buffers)
    }

    public func setAsyncPolling(_ on: Bool) { base.setAsyncPolling(on) }
    public func pollAsync() -> Int { base.pollAsync() }

    public func submitAsync(_ requests: [BlockIORequest], handler: AsyncIOHandler) -> Int {
        // BlockDevice checked every range against this slice's capacity: the shift stays inside `base`.
        // Reads and writes only (commands are not accepted): the first other request ends the batch.
        base.submitAsync(requests.prefix { if case .transfer = $0.command { return true } else { return false } }.map {
            BlockIORequest(isWrite: $0.isWrite, offset: offset + $0.offset, buffers: $0.buffers, tag: $0.tag)
        }, handler: handler)
    }

    public func discard(at position: UInt64, length: UInt64) throws {
        guard !readOnly else { throw VirtioError.backendMismatch(reason: "discard on a read-only slice") }
        try base.discard(at: offset + position, length: length)
    }

    public func writeZeroes(at position: UInt64, length: UInt64, mayUnmap: Bool) throws {
        guard !readOnly else { throw VirtioError.backendMismatch(reason: "write-zeroes on a read-only slice") }
        try base.writeZeroes(at: offset + position, length: length, mayUnmap: mayUnmap)
    }
}

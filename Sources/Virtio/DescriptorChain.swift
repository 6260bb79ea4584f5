import GuestMemory

/// One guest buffer of a descriptor chain: a guest-physical range already checked to lie inside one RAM region.
public struct DescriptorSegment: Equatable, Hashable, Sendable, CustomStringConvertible {
    public var address: UInt64
    public var length: UInt32

    public init(address: UInt64, length: UInt32) {
        self.address = address
        self.length = length
    }

    public var description: String { "0x\(String(address, radix: 16))+\(length)" }
}

/// A split-ring descriptor as laid out in guest memory (virtio 1.2 §2.7.5).
struct RawDescriptor {
    static let size: UInt64 = 16
    static let flagNext: UInt16 = 1
    static let flagWrite: UInt16 = 2
    static let flagIndirect: UInt16 = 4

    var address: UInt64
    var length: UInt32
    var flags: UInt16
    var next: UInt16

    /// Reads descriptor `index` of the table at `table`; `GuestMemory` refuses ranges outside RAM.
    static func read(_ memory: GuestMemory, table: UInt64, index: UInt16) throws(VirtioError) -> RawDescriptor {
        // index < 65536, so the offset is below 2^20; a wrap of table + offset is refused by buffer(at:).
        let address = table &+ UInt64(index) &* size
        do {
            let bytes = UnsafeRawBufferPointer(try memory.buffer(at: address, length: Int(size)))
            return RawDescriptor(
                address: UInt64(littleEndian: bytes.loadUnaligned(fromByteOffset: 0, as: UInt64.self)),
                length: UInt32(littleEndian: bytes.loadUnaligned(fromByteOffset: 8, as: UInt32.self)),
                flags: UInt16(littleEndian: bytes.loadUnaligned(fromByteOffset: 12, as: UInt16.self)),
                next: UInt16(littleEndian: bytes.loadUnaligned(fromByteOffset: 14, as: UInt16.self)))
        } catch {
            throw .memory(error)
        }
    }
}

/// A validated descriptor chain: the device-readable buffers followed by the device-writable ones.
///
/// Building one walks the chain from its head with every check the spec implies: indices in range,
/// no loops (at most `queueSize` descriptors in total, indirect ones included), no zero-length or
/// out-of-RAM buffers, indirect tables well formed and not nested, readable before writable, and a
/// cap on the total byte count. A chain that exists has passed all of them.
public struct DescriptorChain: Equatable, Sendable {
    /// The head descriptor index: what `Virtqueue.addUsed(head:length:)` reports back.
    public let head: UInt16
    /// Device-readable buffers, in chain order.
    public let readable: [DescriptorSegment]
    /// Device-writable buffers, in chain order.
    public let writable: [DescriptorSegment]
    /// How many descriptors carried data (not counting a descriptor that points to an indirect table).
    public let descriptorCount: Int

    public init(head: UInt16, readable: [DescriptorSegment], writable: [DescriptorSegment], descriptorCount: Int) {
        self.head = head
        self.readable = readable
        self.writable = writable
        self.descriptorCount = descriptorCount
    }

    /// Total bytes the device may read.
    public var readableLength: UInt64 { readable.reduce(0) { $0 + UInt64($1.length) } }
    /// Total bytes the device may write.
    public var writableLength: UInt64 { writable.reduce(0) { $0 + UInt64($1.length) } }

    /// Walks and validates the chain starting at `head` in the descriptor table at `descriptorTable`.
    ///
    /// - Parameters:
    ///   - queueSize: the queue's size: the bound for head and next indices and for the chain length.
    ///   - indirectAllowed: whether VIRTIO_F_INDIRECT_DESC was negotiated.
    ///   - maxBytes: the largest total (readable + writable) the caller accepts.
    public static func parse(memory: GuestMemory, descriptorTable: UInt64, queueSize: UInt16, head: UInt16,
                             indirectAllowed: Bool, maxBytes: UInt64 = UInt64(UInt32.max)) throws(VirtioError) -> DescriptorChain {
        guard head < queueSize else { throw .headOutOfRange(head: head, queueSize: queueSize) }
        let limit = Int(queueSize)
        var readable: [DescriptorSegment] = []
        var writable: [DescriptorSegment] = []
        var count = 0
        var total: UInt64 = 0
        var table = descriptorTable
        var tableSize = UInt32(queueSize)
        var inIndirect = false
        var index = head

        while true {
            count += 1
            guard count <= limit else { throw .chainTooLong(head: head, limit: limit) }
            let descriptor = try RawDescriptor.read(memory, table: table, index: index)

            if descriptor.flags & RawDescriptor.flagIndirect != 0 {
                guard !inIndirect else { throw .nestedIndirect(index: index) }
                guard indirectAllowed else { throw .indirectNotNegotiated(index: index) }
                guard descriptor.flags & RawDescriptor.flagNext == 0 else { throw .indirectWithNext(index: index) }
                let entries = descriptor.length / UInt32(RawDescriptor.size)
                guard descriptor.length != 0, descriptor.length % UInt32(RawDescriptor.size) == 0,
                      entries <= UInt32(limit) else {
                    throw .indirectBadLength(index: index, length: descriptor.length)
                }
                let (_, overflow) = descriptor.address.addingReportingOverflow(UInt64(descriptor.length))
                guard !overflow else {
                    throw .addressOverflow(index: index, address: descriptor.address, length: descriptor.length)
                }
                guard memory.contains(descriptor.address, length: UInt64(descriptor.length)) else {
                    throw .indirectTableOutOfRange(index: index, address: descriptor.address, length: descriptor.length)
                }
                // The pointer to the table carries no data: only the table's entries count toward the limit.
                count -= 1
                table = descriptor.address
                tableSize = entries
                inIndirect = true
                index = 0
                continue
            }

            guard descriptor.length != 0 else { throw .zeroLengthDescriptor(index: index) }
            let (_, overflow) = descriptor.address.addingReportingOverflow(UInt64(descriptor.length))
            guard !overflow else {
                throw .addressOverflow(index: index, address: descriptor.address, length: descriptor.length)
            }
            guard memory.contains(descriptor.address, length: UInt64(descriptor.length)) else {
                throw .bufferOutOfRange(index: index, address: descriptor.address, length: descriptor.length)
            }
            let segment = DescriptorSegment(address: descriptor.address, length: descriptor.length)
            if descriptor.flags & RawDescriptor.flagWrite != 0 {
                writable.append(segment)
            } else {
                guard writable.isEmpty else { throw .readableAfterWritable(index: index) }
                readable.append(segment)
            }
            // count <= 65536 descriptors of < 2^32 bytes each: the sum fits in UInt64.
            total += UInt64(descriptor.length)
            guard total <= maxBytes else { throw .chainTooLarge(head: head, bytes: total, limit: maxBytes) }

            guard descriptor.flags & RawDescriptor.flagNext != 0 else { break }
            guard UInt32(descriptor.next) < tableSize else {
                throw .nextOutOfRange(index: index, next: descriptor.next, tableSize: tableSize)
            }
            index = descriptor.next
        }
        return DescriptorChain(head: head, readable: readable, writable: writable, descriptorCount: count)
    }
}

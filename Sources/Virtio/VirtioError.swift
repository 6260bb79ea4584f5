import GuestMemory

/// Everything that can go wrong in virtqueues, descriptor chains and virtio devices, with the offending value.
///
/// Guest data that breaks the rules produces one of these errors; nothing in this module traps on it.
public enum VirtioError: Error, CustomStringConvertible, Equatable, Sendable {
    // MARK: Descriptor chains
    /// A chain's head index (from the avail ring) is not below the queue size.
    case headOutOfRange(head: UInt16, queueSize: UInt16)
    /// A descriptor's `next` field points outside its table (the queue, or an indirect table).
    case nextOutOfRange(index: UInt16, next: UInt16, tableSize: UInt32)
    /// The chain has more descriptors than `limit` (the queue size): a loop, or simply too long.
    case chainTooLong(head: UInt16, limit: Int)
    /// A descriptor has length 0.
    case zeroLengthDescriptor(index: UInt16)
    /// `address + length` of a descriptor wraps around 2^64.
    case addressOverflow(index: UInt16, address: UInt64, length: UInt32)
    /// A data descriptor's buffer is not inside guest RAM (one region).
    case bufferOutOfRange(index: UInt16, address: UInt64, length: UInt32)
    /// A device-readable descriptor follows a device-writable one.
    case readableAfterWritable(index: UInt16)
    /// The chain's buffers add up to more bytes than the device accepts.
    case chainTooLarge(head: UInt16, bytes: UInt64, limit: UInt64)
    /// A descriptor has the INDIRECT flag but VIRTIO_F_INDIRECT_DESC was not negotiated.
    case indirectNotNegotiated(index: UInt16)
    /// A descriptor inside an indirect table has the INDIRECT flag.
    case nestedIndirect(index: UInt16)
    /// A descriptor has both INDIRECT and NEXT set.
    case indirectWithNext(index: UInt16)
    /// An indirect table's length is 0, not a multiple of 16, or holds more descriptors than allowed.
    case indirectBadLength(index: UInt16, length: UInt32)
    /// An indirect table is not inside guest RAM.
    case indirectTableOutOfRange(index: UInt16, address: UInt64, length: UInt32)

    // MARK: Rings and queues
    /// The avail ring's idx is more than the queue size ahead of the device's position.
    case availIndexTooFar(availIndex: UInt16, nextAvail: UInt16, queueSize: UInt16)
    /// A queue size that is 0, above the maximum, or not a power of two.
    case badQueueSize(queue: Int, size: UInt16, maximum: UInt16)
    /// A ring (descriptor table, driver area or device area) is misaligned.
    case misalignedRing(queue: Int, ring: String, address: UInt64)
    /// A ring is not inside guest RAM.
    case ringOutOfRange(queue: Int, ring: String, address: UInt64, length: UInt64)
    /// A guest-memory access failed (ring memory that vanished or a range that was not checked before).
    case memory(GuestMemoryError)

    // MARK: Devices
    /// A device was activated without a queue it needs.
    case queueMissing(queue: Int)
    /// The driver broke the initialization sequence (e.g. DRIVER_OK without FEATURES_OK).
    case driverProtocol(status: UInt32, reason: String)
    /// A request the device cannot complete, not even with an error status (e.g. no status byte).
    case malformedRequest(head: UInt16, reason: String)

    /// A replacement backend does not fit the device as the driver negotiated it.
    case backendMismatch(reason: String)

    /// An inflight-tracking region (vhost-user INFLIGHT_SHMFD) that cannot track the queue.
    case inflightRegion(reason: String)

    public var description: String {
        switch self {
        case let .headOutOfRange(head, queueSize):
            return "descriptor chain head \(head) is out of range for queue size \(queueSize)"
        case let .nextOutOfRange(index, next, tableSize):
            return "descriptor \(index) has next \(next), out of range for a table of \(tableSize) descriptors"
        case let .chainTooLong(head, limit):
            return "descriptor chain from head \(head) has more than \(limit) descriptors (loop or overlong chain)"
        case let .zeroLengthDescriptor(index):
            return "descriptor \(index) has length 0"
        case let .addressOverflow(index, address, length):
            return "descriptor \(index) address 0x\(String(address, radix: 16)) + length \(length) overflows"
        case let .bufferOutOfRange(index, address, length):
            return "descriptor \(index) buffer 0x\(String(address, radix: 16)) length \(length) is outside guest RAM"
        case let .readableAfterWritable(index):
            return "descriptor \(index) is device-readable but follows a device-writable descriptor"
        case let .chainTooLarge(head, bytes, limit):
            return "descriptor chain from head \(head) holds \(bytes) bytes, more than the limit of \(limit)"
        case let .indirectNotNegotiated(index):
            return "descriptor \(index) is indirect but VIRTIO_F_INDIRECT_DESC was not negotiated"
        case let .nestedIndirect(index):
            return "indirect table entry \(index) is itself indirect (nested indirect tables are not allowed)"
        case let .indirectWithNext(index):
            return "descriptor \(index) has both INDIRECT and NEXT flags"
        case let .indirectBadLength(index, length):
            return "descriptor \(index) has an indirect table length of \(length), not a non-zero multiple of 16 within the queue size"
        case let .indirectTableOutOfRange(index, address, length):
            return "descriptor \(index) indirect table 0x\(String(address, radix: 16)) length \(length) is outside guest RAM"
        case let .availIndexTooFar(availIndex, nextAvail, queueSize):
            return "avail idx \(availIndex) is more than queue size \(queueSize) ahead of next avail \(nextAvail)"
        case let .badQueueSize(queue, size, maximum):
            return "queue \(queue) size \(size) is not a power of two between 1 and \(maximum)"
        case let .misalignedRing(queue, ring, address):
            return "queue \(queue) \(ring) at 0x\(String(address, radix: 16)) is misaligned"
        case let .ringOutOfRange(queue, ring, address, length):
            return "queue \(queue) \(ring) at 0x\(String(address, radix: 16)) length \(length) is outside guest RAM"
        case let .memory(error):
            return "guest memory access failed: \(error)"
        case let .queueMissing(queue):
            return "device activated without queue \(queue)"
        case let .driverProtocol(status, reason):
            return "driver error at status 0x\(String(status, radix: 16)): \(reason)"
        case let .malformedRequest(head, reason):
            return "request at head \(head) is malformed: \(reason)"
        case let .backendMismatch(reason):
            return "cannot replace the backend: \(reason)"
        case let .inflightRegion(reason):
            return "inflight region: \(reason)"
        }
    }
}

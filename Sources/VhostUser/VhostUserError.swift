import GodwitSystem

/// Everything that can go wrong on a vhost-user connection, with the values that failed.
///
/// Bytes and descriptors from the peer are untrusted: every malformed or out-of-order message becomes
/// one of these errors (and the descriptors that came with it are closed); nothing traps.
public enum VhostUserError: Error, CustomStringConvertible, Equatable, Sendable {
    // MARK: Wire format
    /// The connection ended (or a read stopped) inside a 12-byte header.
    case truncatedHeader(received: Int)
    /// The connection ended inside a payload.
    case truncatedPayload(request: UInt32, expected: Int, received: Int)
    /// The header's version bits are not 1, or it has flag bits this implementation does not know.
    case badFlags(request: UInt32, flags: UInt32)
    /// A request number this implementation does not handle.
    case unknownRequest(UInt32)
    /// The header's size is larger than any payload of this request can be (checked before reading it).
    case payloadTooLarge(request: UInt32, size: UInt32, maximum: Int)
    /// The payload size does not match the request's payload type (`expected` says what would).
    case badPayloadSize(request: UInt32, size: Int, expected: String)
    /// The message came with the wrong number of file descriptors.
    case wrongFileDescriptorCount(request: UInt32, received: Int, expected: Int)
    /// More descriptors arrived than any message may carry (or the kernel truncated them); all were closed.
    case tooManyFileDescriptors(request: UInt32?)
    /// A memory table with 0 or more than 8 regions.
    case badRegionCount(count: UInt32, maximum: Int)
    /// A config-space access outside 0..<256.
    case badConfigAccess(offset: UInt32, size: UInt32)
    /// A reply for another request, or without the REPLY flag.
    case unexpectedReply(request: UInt32, expected: UInt32, flags: UInt32)
    /// A request was sent where a reply was expected, or the other way round.
    case unexpectedMessage(request: UInt32, reason: String)

    // MARK: Protocol
    /// A request the protocol state does not allow (out of order, feature not negotiated, bad value).
    case protocolViolation(request: UInt32, reason: String)
    /// A queue index outside the device's queues.
    case badQueueIndex(request: UInt32, index: UInt32, queueCount: Int)
    /// A ring address (a frontend user address) that no region of the memory table covers.
    case addressNotMapped(queue: Int, ring: String, address: UInt64)
    /// The memory table could not be mapped or is not a valid layout.
    case badMemoryTable(reason: String)
    /// The backend answered a request with a non-zero status (REPLY_ACK, or an empty GET_CONFIG reply).
    case requestFailed(request: UInt32, status: UInt64)
    /// The device refused to start or a ring failed its checks.
    case deviceError(String)
    /// The frontend cannot use guest memory that has no shareable file behind it.
    case memoryNotShareable(guestBase: UInt64)
    /// The device is not connected (never connected, or the backend went away).
    case disconnected(reason: String)

    // MARK: I/O
    /// The peer closed the connection between messages.
    case connectionClosed
    /// No complete message (or reply) arrived in time.
    case timedOut(operation: String, seconds: Double)
    /// A system call failed.
    case system(SystemError)

    public var description: String {
        switch self {
        case let .truncatedHeader(received):
            return "vhost-user header truncated after \(received) of \(VhostUserCodec.headerSize) bytes"
        case let .truncatedPayload(request, expected, received):
            return "vhost-user \(VhostUserRequest.name(request)) payload truncated: \(received) of \(expected) bytes"
        case let .badFlags(request, flags):
            return "vhost-user \(VhostUserRequest.name(request)) has bad flags 0x\(String(flags, radix: 16)) (version must be 1, only REPLY and NEED_REPLY may be set)"
        case let .unknownRequest(request):
            return "unknown vhost-user request \(request)"
        case let .payloadTooLarge(request, size, maximum):
            return "vhost-user \(VhostUserRequest.name(request)) payload of \(size) bytes exceeds its maximum of \(maximum)"
        case let .badPayloadSize(request, size, expected):
            return "vhost-user \(VhostUserRequest.name(request)) payload is \(size) bytes, expected \(expected)"
        case let .wrongFileDescriptorCount(request, received, expected):
            return "vhost-user \(VhostUserRequest.name(request)) came with \(received) file descriptors, expected \(expected)"
        case let .tooManyFileDescriptors(request):
            return "vhost-user \(request.map(VhostUserRequest.name) ?? "message") came with more file descriptors than allowed (\(VhostUserCodec.maxFileDescriptors))"
        case let .badRegionCount(count, maximum):
            return "vhost-user memory table has \(count) regions, expected 1 to \(maximum)"
        case let .badConfigAccess(offset, size):
            return "vhost-user config access at offset \(offset) size \(size) is outside 0..<\(VhostUserConfigSpace.maxSize)"
        case let .unexpectedReply(request, expected, flags):
            return "vhost-user reply \(VhostUserRequest.name(request)) (flags 0x\(String(flags, radix: 16))) does not answer \(VhostUserRequest.name(expected))"
        case let .unexpectedMessage(request, reason):
            return "unexpected vhost-user \(VhostUserRequest.name(request)): \(reason)"
        case let .protocolViolation(request, reason):
            return "vhost-user \(VhostUserRequest.name(request)) refused: \(reason)"
        case let .badQueueIndex(request, index, queueCount):
            return "vhost-user \(VhostUserRequest.name(request)) names queue \(index), the device has \(queueCount)"
        case let .addressNotMapped(queue, ring, address):
            return "queue \(queue) \(ring) at user address 0x\(String(address, radix: 16)) is not inside the memory table"
        case let .badMemoryTable(reason):
            return "bad vhost-user memory table: \(reason)"
        case let .requestFailed(request, status):
            return "vhost-user backend failed \(VhostUserRequest.name(request)) with status \(status)"
        case let .deviceError(reason):
            return "vhost-user device error: \(reason)"
        case let .memoryNotShareable(guestBase):
            return "guest RAM region at 0x\(String(guestBase, radix: 16)) has no file behind it and cannot be shared with a vhost-user backend"
        case let .disconnected(reason):
            return "vhost-user device disconnected: \(reason)"
        case .connectionClosed:
            return "vhost-user peer closed the connection"
        case let .timedOut(operation, seconds):
            return "vhost-user \(operation) timed out after \(seconds) s"
        case let .system(error):
            return "vhost-user: \(error)"
        }
    }
}

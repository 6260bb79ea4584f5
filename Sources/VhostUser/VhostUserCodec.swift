import GodwitSystem

/// A decoded header: request number, flags and payload size, already checked against the request.
public struct VhostUserHeader: Equatable, Sendable {
    public var request: VhostUserRequest
    public var flags: UInt32
    public var size: UInt32
}

/// Which side sent a message: a request (frontend to backend) or a reply (backend to frontend). The
/// same request number has different payloads in each direction.
public enum VhostUserDirection: Sendable {
    case request
    case reply
}

/// The vhost-user wire format: a 12-byte header {u32 request, u32 flags, u32 size} and a payload whose
/// type depends on the request and direction; numbers in the machine's byte order (little-endian on
/// every platform Godwit runs on).
///
/// Decoding is strict and total: a message is accepted only if its version is 1, its flags known, its
/// request known, its size exactly what its payload type needs (checked against the maximum before the
/// payload is read) and its descriptor count exactly what the request carries. Anything else is a
/// `VhostUserError` naming the values, and the descriptors that came with it are closed.
public enum VhostUserCodec {
    public static let headerSize = 12
    /// The most file descriptors one message may carry (VHOST_MEMORY_BASELINE_NREGIONS).
    public static let maxFileDescriptors = 8
    /// The most regions in SET_MEM_TABLE.
    public static let maxRegions = 8
    /// SET_VRING_KICK/CALL/ERR: the queue index bits and the "no descriptor" bit of the u64.
    public static let vringIndexMask: UInt64 = 0xff
    public static let vringNoFileDescriptor: UInt64 = 0x100

    /// The largest payload any message of `request` may have in `direction`.
    public static func maximumPayloadSize(_ request: VhostUserRequest, _ direction: VhostUserDirection) -> Int {
        switch direction {
        case .request:
            switch request {
            case .getFeatures, .setOwner, .resetOwner, .getProtocolFeatures, .getQueueNum, .setLogFD: return 0
            case .setFeatures, .setProtocolFeatures, .setVringKick, .setVringCall, .setVringErr: return 8
            case .setVringNum, .setVringBase, .getVringBase, .setVringEnable: return 8
            case .setVringAddr: return VhostUserVringAddress.size
            case .setMemTable: return 8 + maxRegions * VhostUserMemoryRegion.size
            case .setLogBase: return VhostUserLogDescription.size
            case .getConfig, .setConfig: return VhostUserConfigSpace.headerSize + VhostUserConfigSpace.maxSize
            case .getInflightFD, .setInflightFD: return VhostUserInflightDescription.size
            }
        case .reply:
            switch request {
            case .getVringBase: return 8
            case .getConfig: return VhostUserConfigSpace.headerSize + VhostUserConfigSpace.maxSize
            case .getInflightFD: return VhostUserInflightDescription.size
            default: return 8
            }
        }
    }

    // MARK: Decoding

    /// Decodes and checks a header (the first 12 bytes of `bytes`).
    public static func decodeHeader(_ bytes: [UInt8], direction: VhostUserDirection = .request) throws -> VhostUserHeader {
        guard bytes.count >= headerSize else { throw VhostUserError.truncatedHeader(received: bytes.count) }
        var reader = ByteReader(bytes)
        // In bounds: 12 bytes are there.
        let rawRequest = reader.u32()!, flags = reader.u32()!, size = reader.u32()!
        guard flags & VhostUserFlags.versionMask == VhostUserFlags.version, flags & ~VhostUserFlags.known == 0 else {
            throw VhostUserError.badFlags(request: rawRequest, flags: flags)
        }
        guard let request = VhostUserRequest(rawValue: rawRequest) else { throw VhostUserError.unknownRequest(rawRequest) }
        let maximum = maximumPayloadSize(request, direction)
        guard Int(size) <= maximum else { throw VhostUserError.payloadTooLarge(request: rawRequest, size: size, maximum: maximum) }
        return VhostUserHeader(request: request, flags: flags, size: size)
    }

    /// Decodes a whole message in `bytes` (header and exactly the payload it announces). The
    /// descriptors are closed when it throws.
    public static func decode(_ bytes: [UInt8], fileDescriptors: [FileDescriptor] = [],
                              direction: VhostUserDirection = .request) throws -> VhostUserMessage {
        do {
            let header = try decodeHeader(bytes, direction: direction)
            let available = bytes.count - headerSize
            guard available >= Int(header.size) else {
                throw VhostUserError.truncatedPayload(request: header.request.rawValue, expected: Int(header.size),
                                                      received: available)
            }
            guard available == Int(header.size) else {
                throw VhostUserError.badPayloadSize(request: header.request.rawValue, size: available,
                                                    expected: "\(header.size) (the header's size)")
            }
            return try decodePayload(header: header, payload: Array(bytes[headerSize...]),
                                     fileDescriptors: fileDescriptors, direction: direction)
        } catch {
            for fd in fileDescriptors { fd.close() }
            throw error
        }
    }

    /// Decodes the payload that follows `header`, and checks the descriptor count. The descriptors are
    /// closed when it throws.
    public static func decodePayload(header: VhostUserHeader, payload: [UInt8], fileDescriptors: [FileDescriptor],
                                     direction: VhostUserDirection) throws -> VhostUserMessage {
        do {
            let (decoded, expectedFDs) = try decodeBody(header: header, payload, direction: direction)
            guard fileDescriptors.count == expectedFDs else {
                throw VhostUserError.wrongFileDescriptorCount(request: header.request.rawValue,
                                                              received: fileDescriptors.count, expected: expectedFDs)
            }
            return VhostUserMessage(request: header.request, flags: header.flags, payload: decoded,
                                    fileDescriptors: fileDescriptors)
        } catch {
            for fd in fileDescriptors { fd.close() }
            throw error
        }
    }

    private static func exact(_ payload: [UInt8], _ size: Int, _ request: VhostUserRequest, _ what: String) throws {
        guard payload.count == size else {
            throw VhostUserError.badPayloadSize(request: request.rawValue, size: payload.count, expected: "\(size) (\(what))")
        }
    }

    /// The payload, and how many descriptors must come with it.
    private static func decodeBody(header: VhostUserHeader, _ payload: [UInt8],
                                   direction: VhostUserDirection) throws -> (VhostUserPayload, Int) {
        let request = header.request
        var reader = ByteReader(payload)
        switch direction {
        case .request:
            switch request {
            case .getFeatures, .setOwner, .resetOwner, .getProtocolFeatures, .getQueueNum:
                try exact(payload, 0, request, "no payload")
                return (.none, 0)
            case .setLogFD:
                try exact(payload, 0, request, "no payload")
                return (.none, 1)
            case .setFeatures, .setProtocolFeatures:
                try exact(payload, 8, request, "u64")
                return (.u64(reader.u64()!), 0)
            case .setVringKick, .setVringCall, .setVringErr:
                try exact(payload, 8, request, "u64")
                let value = reader.u64()!
                guard value & ~(vringIndexMask | vringNoFileDescriptor) == 0 else {
                    throw VhostUserError.protocolViolation(
                        request: request.rawValue, reason: "reserved bits set in 0x\(String(value, radix: 16))")
                }
                return (.u64(value), value & vringNoFileDescriptor != 0 ? 0 : 1)
            case .setVringNum, .setVringBase, .getVringBase, .setVringEnable:
                try exact(payload, 8, request, "vring state")
                return (.vringState(VhostUserVringState(index: reader.u32()!, num: reader.u32()!)), 0)
            case .setVringAddr:
                try exact(payload, VhostUserVringAddress.size, request, "vring address")
                let index = reader.u32()!, flags = reader.u32()!
                let descriptor = reader.u64()!, used = reader.u64()!, available = reader.u64()!, log = reader.u64()!
                return (.vringAddress(VhostUserVringAddress(index: index, flags: flags, descriptor: descriptor, used: used,
                                                            available: available, log: log)), 0)
            case .setMemTable:
                guard payload.count >= 8 else {
                    throw VhostUserError.badPayloadSize(request: request.rawValue, size: payload.count,
                                                        expected: "8 + 32 per region")
                }
                let count = reader.u32()!
                _ = reader.u32()  // padding
                guard count >= 1, count <= UInt32(maxRegions) else {
                    throw VhostUserError.badRegionCount(count: count, maximum: maxRegions)
                }
                try exact(payload, 8 + Int(count) * VhostUserMemoryRegion.size, request, "\(count) regions")
                var regions: [VhostUserMemoryRegion] = []
                for _ in 0..<count {
                    regions.append(VhostUserMemoryRegion(guestAddress: reader.u64()!, size: reader.u64()!,
                                                         userAddress: reader.u64()!, mmapOffset: reader.u64()!))
                }
                return (.memoryTable(regions), Int(count))
            case .setLogBase:
                try exact(payload, VhostUserLogDescription.size, request, "log description")
                return (.log(VhostUserLogDescription(mmapSize: reader.u64()!, mmapOffset: reader.u64()!)), 1)
            case .getConfig, .setConfig:
                return (.config(try decodeConfig(request, payload)), 0)
            case .getInflightFD, .setInflightFD:
                try exact(payload, VhostUserInflightDescription.size, request, "inflight description")
                let description = VhostUserInflightDescription(mmapSize: reader.u64()!, mmapOffset: reader.u64()!,
                                                               queueCount: reader.u16()!, queueSize: reader.u16()!)
                return (.inflight(description), request == .setInflightFD ? 1 : 0)
            }
        case .reply:
            switch request {
            case .getVringBase:
                try exact(payload, 8, request, "vring state")
                return (.vringState(VhostUserVringState(index: reader.u32()!, num: reader.u32()!)), 0)
            case .getConfig:
                // An empty payload is the backend's way of reporting failure.
                if payload.isEmpty { return (.none, 0) }
                return (.config(try decodeConfig(request, payload)), 0)
            case .getInflightFD:
                try exact(payload, VhostUserInflightDescription.size, request, "inflight description")
                let description = VhostUserInflightDescription(mmapSize: reader.u64()!, mmapOffset: reader.u64()!,
                                                               queueCount: reader.u16()!, queueSize: reader.u16()!)
                return (.inflight(description), 1)
            default:
                try exact(payload, 8, request, "u64")
                return (.u64(reader.u64()!), 0)
            }
        }
    }

    private static func decodeConfig(_ request: VhostUserRequest, _ payload: [UInt8]) throws -> VhostUserConfigSpace {
        guard payload.count >= VhostUserConfigSpace.headerSize else {
            throw VhostUserError.badPayloadSize(request: request.rawValue, size: payload.count,
                                                expected: "12 + the config size")
        }
        var reader = ByteReader(payload)
        let offset = reader.u32()!, size = reader.u32()!, flags = reader.u32()!
        guard offset <= UInt32(VhostUserConfigSpace.maxSize), size <= UInt32(VhostUserConfigSpace.maxSize) - offset else {
            throw VhostUserError.badConfigAccess(offset: offset, size: size)
        }
        try exact(payload, VhostUserConfigSpace.headerSize + Int(size), request, "12 + config size \(size)")
        return VhostUserConfigSpace(offset: offset, flags: flags, bytes: Array(payload[VhostUserConfigSpace.headerSize...]))
    }

    // MARK: Encoding

    /// The bytes of `message` (header and payload); its descriptors travel separately (SCM_RIGHTS).
    public static func encode(_ message: VhostUserMessage) -> [UInt8] {
        var body = ByteWriter()
        switch message.payload {
        case .none:
            break
        case let .u64(value):
            body.u64(value)
        case let .vringState(state):
            body.u32(state.index)
            body.u32(state.num)
        case let .vringAddress(address):
            body.u32(address.index)
            body.u32(address.flags)
            body.u64(address.descriptor)
            body.u64(address.used)
            body.u64(address.available)
            body.u64(address.log)
        case let .memoryTable(regions):
            body.u32(UInt32(regions.count))
            body.u32(0)
            for region in regions {
                body.u64(region.guestAddress)
                body.u64(region.size)
                body.u64(region.userAddress)
                body.u64(region.mmapOffset)
            }
        case let .log(log):
            body.u64(log.mmapSize)
            body.u64(log.mmapOffset)
        case let .config(config):
            body.u32(config.offset)
            body.u32(UInt32(config.bytes.count))
            body.u32(config.flags)
            body.bytes.append(contentsOf: config.bytes)
        case let .inflight(inflight):
            body.u64(inflight.mmapSize)
            body.u64(inflight.mmapOffset)
            body.u16(inflight.queueCount)
            body.u16(inflight.queueSize)
            body.u32(0)  // padding of QEMU's unpacked struct
        }
        var out = ByteWriter()
        out.u32(message.request.rawValue)
        out.u32(message.flags)
        out.u32(UInt32(body.bytes.count))
        out.bytes.append(contentsOf: body.bytes)
        return out.bytes
    }

    /// A raw header, for tests and for writing deliberately malformed messages.
    public static func encodeHeader(request: UInt32, flags: UInt32, size: UInt32) -> [UInt8] {
        var out = ByteWriter()
        out.u32(request)
        out.u32(flags)
        out.u32(size)
        return out.bytes
    }
}

/// Little-endian reads from a byte array; nil past the end.
struct ByteReader {
    let bytes: [UInt8]
    var position = 0

    init(_ bytes: [UInt8]) { self.bytes = bytes }

    private mutating func read<T: FixedWidthInteger>(_: T.Type) -> T? {
        let size = MemoryLayout<T>.size
        guard bytes.count - position >= size else { return nil }
        var value: T = 0
        for i in 0..<size { value |= T(bytes[position + i]) << (8 * i) }
        position += size
        return value
    }

    mutating func u16() -> UInt16? { read(UInt16.self) }
    mutating func u32() -> UInt32? { read(UInt32.self) }
    mutating func u64() -> UInt64? { read(UInt64.self) }
}

/// Little-endian writes to a byte array.
struct ByteWriter {
    var bytes: [UInt8] = []

    private mutating func write<T: FixedWidthInteger>(_ value: T) {
        for i in 0..<MemoryLayout<T>.size { bytes.append(UInt8(truncatingIfNeeded: value >> (8 * i))) }
    }

    mutating func u16(_ value: UInt16) { write(value) }
    mutating func u32(_ value: UInt32) { write(value) }
    mutating func u64(_ value: UInt64) { write(value) }
}

import GodwitSystem

/// The frontend requests this implementation knows (QEMU `docs/interop/vhost-user.rst`, "Front-end
/// message types"). Any other number is refused as `VhostUserError.unknownRequest`.
public enum VhostUserRequest: UInt32, CaseIterable, Sendable {
    case getFeatures = 1
    case setFeatures = 2
    case setOwner = 3
    case resetOwner = 4
    case setMemTable = 5
    case setLogBase = 6
    case setLogFD = 7
    case setVringNum = 8
    case setVringAddr = 9
    case setVringBase = 10
    case getVringBase = 11
    case setVringKick = 12
    case setVringCall = 13
    case setVringErr = 14
    case getProtocolFeatures = 15
    case setProtocolFeatures = 16
    case getQueueNum = 17
    case setVringEnable = 18
    case getConfig = 24
    case setConfig = 25
    case getInflightFD = 31
    case setInflightFD = 32

    /// The spec's name, for messages and logs.
    public var name: String {
        switch self {
        case .getFeatures: return "GET_FEATURES"
        case .setFeatures: return "SET_FEATURES"
        case .setOwner: return "SET_OWNER"
        case .resetOwner: return "RESET_OWNER"
        case .setMemTable: return "SET_MEM_TABLE"
        case .setLogBase: return "SET_LOG_BASE"
        case .setLogFD: return "SET_LOG_FD"
        case .setVringNum: return "SET_VRING_NUM"
        case .setVringAddr: return "SET_VRING_ADDR"
        case .setVringBase: return "SET_VRING_BASE"
        case .getVringBase: return "GET_VRING_BASE"
        case .setVringKick: return "SET_VRING_KICK"
        case .setVringCall: return "SET_VRING_CALL"
        case .setVringErr: return "SET_VRING_ERR"
        case .getProtocolFeatures: return "GET_PROTOCOL_FEATURES"
        case .setProtocolFeatures: return "SET_PROTOCOL_FEATURES"
        case .getQueueNum: return "GET_QUEUE_NUM"
        case .setVringEnable: return "SET_VRING_ENABLE"
        case .getConfig: return "GET_CONFIG"
        case .setConfig: return "SET_CONFIG"
        case .getInflightFD: return "GET_INFLIGHT_FD"
        case .setInflightFD: return "SET_INFLIGHT_FD"
        }
    }

    /// The name of a raw request number (known or not).
    public static func name(_ raw: UInt32) -> String {
        VhostUserRequest(rawValue: raw)?.name ?? "request \(raw)"
    }

    /// Requests whose reply carries data; the others are answered only when NEED_REPLY asks for an ack.
    public var hasExplicitReply: Bool {
        switch self {
        case .getFeatures, .getProtocolFeatures, .getQueueNum, .getVringBase, .getConfig, .getInflightFD, .setLogBase:
            return true
        default:
            return false
        }
    }
}

/// The header's flags word.
public enum VhostUserFlags {
    /// The protocol version in bits 0-1.
    public static let version: UInt32 = 0x1
    public static let versionMask: UInt32 = 0x3
    /// Set on every reply.
    public static let reply: UInt32 = 0x4
    /// The frontend wants an ack (REPLY_ACK).
    public static let needReply: UInt32 = 0x8
    /// Every bit this implementation accepts.
    public static let known: UInt32 = versionMask | reply | needReply
}

/// Virtio feature bits that vhost-user gives a meaning of its own.
public enum VhostUserFeature {
    /// VHOST_F_LOG_ALL (26): the backend logs its writes to guest memory in the dirty log.
    public static let logAll: UInt64 = 1 << 26
    /// VHOST_USER_F_PROTOCOL_FEATURES (30): GET/SET_PROTOCOL_FEATURES are supported.
    public static let protocolFeatures: UInt64 = 1 << 30
    /// Bits that are vhost-user's, never the guest's.
    public static let transportOnly: UInt64 = logAll | protocolFeatures
}

/// VHOST_USER_PROTOCOL_F_* bits.
public enum VhostUserProtocolFeature {
    public static let multiQueue: UInt64 = 1 << 0
    public static let logSharedMemory: UInt64 = 1 << 1
    public static let replyAck: UInt64 = 1 << 3
    public static let backendRequests: UInt64 = 1 << 5
    public static let config: UInt64 = 1 << 9
    public static let inflightSharedMemory: UInt64 = 1 << 12
    public static let resetDevice: UInt64 = 1 << 13
    public static let configureMemorySlots: UInt64 = 1 << 15
    public static let status: UInt64 = 1 << 16
}

/// A vring state description: `index`, `num` (two u32).
public struct VhostUserVringState: Equatable, Sendable {
    public var index: UInt32
    public var num: UInt32
    public init(index: UInt32, num: UInt32) {
        self.index = index
        self.num = num
    }
}

/// A vring address description: index, flags, size, then descriptor, used, available and log
/// addresses (frontend user addresses; `log` is guest-physical).
public struct VhostUserVringAddress: Equatable, Sendable {
    /// VHOST_VRING_F_LOG: used-ring writes are logged at `log`.
    public static let flagLog: UInt32 = 1
    public static let size = 40

    public var index: UInt32
    public var flags: UInt32
    public var descriptor: UInt64
    public var used: UInt64
    public var available: UInt64
    public var log: UInt64

    public init(index: UInt32, flags: UInt32 = 0, descriptor: UInt64, used: UInt64, available: UInt64, log: UInt64 = 0) {
        self.index = index
        self.flags = flags
        self.descriptor = descriptor
        self.used = used
        self.available = available
        self.log = log
    }
}

/// One memory region of SET_MEM_TABLE: guest-physical base, size, the frontend's user address of it,
/// and the offset of the region in the file descriptor that comes with it.
public struct VhostUserMemoryRegion: Equatable, Sendable {
    public static let size = 32
    public var guestAddress: UInt64
    public var size: UInt64
    public var userAddress: UInt64
    public var mmapOffset: UInt64

    public init(guestAddress: UInt64, size: UInt64, userAddress: UInt64, mmapOffset: UInt64) {
        self.guestAddress = guestAddress
        self.size = size
        self.userAddress = userAddress
        self.mmapOffset = mmapOffset
    }
}

/// The log description of SET_LOG_BASE (with LOG_SHMFD): size of the bitmap and its offset in the fd.
public struct VhostUserLogDescription: Equatable, Sendable {
    public static let size = 16
    public var mmapSize: UInt64
    public var mmapOffset: UInt64
    public init(mmapSize: UInt64, mmapOffset: UInt64) {
        self.mmapSize = mmapSize
        self.mmapOffset = mmapOffset
    }
}

/// The config-space payload of GET_CONFIG / SET_CONFIG: offset, size, flags, then `size` bytes.
public struct VhostUserConfigSpace: Equatable, Sendable {
    /// VHOST_USER_MAX_CONFIG_SIZE.
    public static let maxSize = 256
    public static let headerSize = 12
    /// Flags: 0 = a write of writable fields by the driver, 1 = live migration.
    public static let flagMigration: UInt32 = 1

    public var offset: UInt32
    public var flags: UInt32
    public var bytes: [UInt8]

    public init(offset: UInt32, flags: UInt32 = 0, bytes: [UInt8]) {
        self.offset = offset
        self.flags = flags
        self.bytes = bytes
    }
}

/// The inflight description of GET/SET_INFLIGHT_FD (QEMU's unpacked struct: 24 bytes).
public struct VhostUserInflightDescription: Equatable, Sendable {
    public static let size = 24
    public var mmapSize: UInt64
    public var mmapOffset: UInt64
    public var queueCount: UInt16
    public var queueSize: UInt16

    public init(mmapSize: UInt64, mmapOffset: UInt64, queueCount: UInt16, queueSize: UInt16) {
        self.mmapSize = mmapSize
        self.mmapOffset = mmapOffset
        self.queueCount = queueCount
        self.queueSize = queueSize
    }
}

/// A decoded payload.
public enum VhostUserPayload: Equatable, Sendable {
    case none
    case u64(UInt64)
    case vringState(VhostUserVringState)
    case vringAddress(VhostUserVringAddress)
    case memoryTable([VhostUserMemoryRegion])
    case log(VhostUserLogDescription)
    case config(VhostUserConfigSpace)
    case inflight(VhostUserInflightDescription)
}

/// One vhost-user message: header fields, payload, and the descriptors passed with it.
///
/// The descriptors are owned: they close when the message (and every other reference) goes away.
public struct VhostUserMessage: @unchecked Sendable {
    public var request: VhostUserRequest
    public var flags: UInt32
    public var payload: VhostUserPayload
    public var fileDescriptors: [FileDescriptor]

    public init(request: VhostUserRequest, flags: UInt32 = VhostUserFlags.version, payload: VhostUserPayload = .none,
                fileDescriptors: [FileDescriptor] = []) {
        self.request = request
        self.flags = flags
        self.payload = payload
        self.fileDescriptors = fileDescriptors
    }

    public var isReply: Bool { flags & VhostUserFlags.reply != 0 }
    public var needsReply: Bool { flags & VhostUserFlags.needReply != 0 }

    /// A reply to `request` with `payload`.
    public static func reply(to request: VhostUserRequest, _ payload: VhostUserPayload,
                             fileDescriptors: [FileDescriptor] = []) -> VhostUserMessage {
        VhostUserMessage(request: request, flags: VhostUserFlags.version | VhostUserFlags.reply, payload: payload,
                         fileDescriptors: fileDescriptors)
    }

    /// Closes the descriptors now (a rejected message must not keep the peer's files open).
    public func closeFileDescriptors() {
        for fd in fileDescriptors { fd.close() }
    }

    /// SET_VRING_KICK/CALL/ERR: the queue index (bits 0-7).
    public var vringIndexFromU64: UInt32? {
        if case let .u64(value) = payload { return UInt32(value & VhostUserCodec.vringIndexMask) }
        return nil
    }
}

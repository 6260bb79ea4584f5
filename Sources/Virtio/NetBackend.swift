import GodwitSystem

/// The header in front of every frame a virtio-net device exchanges with its driver and its backend:
/// `struct virtio_net_hdr_v1` (virtio 1.2 §5.1.6), 12 bytes, little-endian.
///
/// Backends use the same layout (a TAP opened with `IFF_VNET_HDR` and a 12-byte header size).
public struct NetHeader: Equatable, Hashable, Sendable {
    public static let size = 12

    /// VIRTIO_NET_HDR_F_NEEDS_CSUM: the checksum at csum_start + csum_offset is still to be computed.
    public static let flagNeedsChecksum: UInt8 = 1
    /// VIRTIO_NET_HDR_F_DATA_VALID (receive only): the checksum was already validated.
    public static let flagDataValid: UInt8 = 2
    /// VIRTIO_NET_HDR_F_RSC_INFO (receive only, with VIRTIO_NET_F_RSC_EXT).
    public static let flagRSCInfo: UInt8 = 4

    public static let gsoNone: UInt8 = 0
    public static let gsoTCPv4: UInt8 = 1
    public static let gsoUDP: UInt8 = 3
    public static let gsoTCPv6: UInt8 = 4
    public static let gsoUDPL4: UInt8 = 5
    /// VIRTIO_NET_HDR_GSO_ECN: or-ed into gso_type when the TCP segments carry ECN (CWR).
    public static let gsoECN: UInt8 = 0x80

    public var flags: UInt8
    public var gsoType: UInt8
    public var headerLength: UInt16
    public var gsoSize: UInt16
    public var checksumStart: UInt16
    public var checksumOffset: UInt16
    public var numBuffers: UInt16

    public init(flags: UInt8 = 0, gsoType: UInt8 = NetHeader.gsoNone, headerLength: UInt16 = 0, gsoSize: UInt16 = 0,
                checksumStart: UInt16 = 0, checksumOffset: UInt16 = 0, numBuffers: UInt16 = 0) {
        self.flags = flags
        self.gsoType = gsoType
        self.headerLength = headerLength
        self.gsoSize = gsoSize
        self.checksumStart = checksumStart
        self.checksumOffset = checksumOffset
        self.numBuffers = numBuffers
    }

    /// Decodes the first 12 bytes of `bytes`; nil when there are fewer.
    public init?(_ bytes: UnsafeRawBufferPointer) {
        guard bytes.count >= NetHeader.size else { return nil }
        // In bounds: every load ends at or before byte 12.
        func u16(_ offset: Int) -> UInt16 { UInt16(littleEndian: bytes.loadUnaligned(fromByteOffset: offset, as: UInt16.self)) }
        self.init(flags: bytes[0], gsoType: bytes[1], headerLength: u16(2), gsoSize: u16(4),
                  checksumStart: u16(6), checksumOffset: u16(8), numBuffers: u16(10))
    }

    /// Decodes the first 12 bytes of `bytes`; nil when there are fewer.
    public init?(_ bytes: [UInt8]) {
        guard let header = bytes.withUnsafeBytes({ NetHeader($0) }) else { return nil }
        self = header
    }

    /// The 12 encoded bytes.
    public var bytes: [UInt8] {
        var result = [flags, gsoType]
        for value in [headerLength, gsoSize, checksumStart, checksumOffset, numBuffers] {
            result.append(UInt8(truncatingIfNeeded: value))
            result.append(UInt8(truncatingIfNeeded: value >> 8))
        }
        return result
    }
}

/// Where a virtio-net device's frames go to and come from: a TAP, an in-memory queue, later a vhost-user
/// or socket peer.
///
/// Every frame, in both directions, starts with a 12-byte `NetHeader`. `NetDevice` validates what the
/// guest sends before `send` sees it, and validates what `receive` returns before the guest sees it.
/// The device calls `receive` from its RX thread and `send` from the thread that processes TX (a vCPU or
/// the Machine's device thread), possibly at the same time: implementations must allow that.
public protocol NetBackend: AnyObject {
    /// The virtio-net offload features (`NetDevice.Feature`) this backend can carry; the device offers
    /// at most these (and at most `NetDevice.implementedOffloads`).
    var supportedOffloadFeatures: UInt64 { get }
    /// A descriptor that polls readable when `receive` has a frame, and writable when `send` may
    /// succeed again after it returned false; nil when the backend has none (the caller polls).
    var pollDescriptor: Int32? { get }
    /// Reads one frame (header + data) into `buffer`; returns its length, or nil when none is waiting.
    func receive(into buffer: UnsafeMutableRawBufferPointer) throws -> Int?
    /// Sends one frame given in pieces (the header first); false when the backend is full for now
    /// (nothing was sent: try again later).
    func send(_ pieces: [UnsafeRawBufferPointer]) throws -> Bool
    /// Called at activation with the features the driver accepted (and with 0 at reset): lets the
    /// backend hand the guest only the offloaded frames it can take (partial checksums, TSO).
    func configureOffloads(negotiatedFeatures: UInt64) throws
}

// MARK: - TAP

/// A `NetBackend` over a `GodwitSystem.Tap` (IFF_TAP | IFF_NO_PI | IFF_VNET_HDR, non-blocking).
///
/// Offloads: the TAP takes any offloaded frame the guest sends (partial checksums, TSO) without
/// configuration; what it may *send to* the guest is set with TUNSETOFFLOAD from the negotiated
/// GUEST_* features only (`tunOffloadFlags`). Until then (and after a reset) the TAP sends only
/// complete, checksummed frames.
public final class TapBackend: NetBackend, @unchecked Sendable {
    public let tap: Tap
    /// CSUM, GUEST_CSUM, GUEST_TSO4/6, HOST_TSO4/6.
    public let supportedOffloadFeatures: UInt64 = NetDevice.implementedOffloads

    private let lock = Lock()
    private var flags: UInt32 = 0

    public init(tap: Tap) {
        self.tap = tap
    }

    /// Opens (or, with nil, creates) the TAP `name`.
    public convenience init(name: String?) throws(SystemError) {
        self.init(tap: try Tap(name: name))
    }

    /// The TUN_F_* flags last set with TUNSETOFFLOAD (0 until activation).
    public var offloadFlags: UInt32 { lock.withLock { flags } }

    public var pollDescriptor: Int32? { tap.descriptor.rawValue }

    public func receive(into buffer: UnsafeMutableRawBufferPointer) throws -> Int? {
        try tap.read(into: buffer)
    }

    public func send(_ pieces: [UnsafeRawBufferPointer]) throws -> Bool {
        try tap.write(pieces)
    }

    public func configureOffloads(negotiatedFeatures: UInt64) throws {
        let wanted = TapBackend.tunOffloadFlags(negotiatedFeatures: negotiatedFeatures)
        try tap.setOffload(wanted)
        lock.withLock { flags = wanted }
    }

    /// The TUN_F_* flags for the driver's GUEST_* features: GUEST_CSUM → TUN_F_CSUM; GUEST_TSO4/6 →
    /// TUN_F_TSO4/6 (only together with GUEST_CSUM, as the spec and the kernel require); GUEST_ECN →
    /// TUN_F_TSO_ECN (with a TSO flag); GUEST_UFO → TUN_F_UFO. The device never offers ECN or UFO, so
    /// in practice the result is a subset of CSUM | TSO4 | TSO6.
    public static func tunOffloadFlags(negotiatedFeatures features: UInt64) -> UInt32 {
        typealias F = NetDevice.Feature
        guard features & F.guestChecksum != 0 else { return 0 }
        var flags = Tap.offloadChecksum
        if features & F.guestTSO4 != 0 { flags |= Tap.offloadTSO4 }
        if features & F.guestTSO6 != 0 { flags |= Tap.offloadTSO6 }
        if features & F.guestECN != 0, flags & (Tap.offloadTSO4 | Tap.offloadTSO6) != 0 { flags |= Tap.offloadTSOECN }
        if features & F.guestUFO != 0 { flags |= Tap.offloadUFO }
        return flags
    }
}

// MARK: - In memory

/// A `NetBackend` that keeps frames in memory: for unit tests, and for wiring a device without a TAP.
///
/// Frames for the guest are queued with `inject` (a bounded queue: `inject` refuses frames past
/// `maxQueuedFrames`, as a kernel queue drops them); frames the guest sent are collected in order and
/// taken with `takeSent`. `pollDescriptor` is an eventfd that is readable while frames are queued.
/// `sendLimit` and `failSends` simulate a full or broken backend.
public final class MemoryNetBackend: NetBackend, @unchecked Sendable {
    public struct Failure: Error, CustomStringConvertible {
        public var description: String { "memory backend set to fail" }
    }

    public let supportedOffloadFeatures: UInt64
    public let maxQueuedFrames: Int

    private let lock = Lock()
    private let ready: EventFD
    private var incoming: [[UInt8]] = []
    private var incomingStart = 0
    private var outgoing: [[UInt8]] = []
    private var sendLimitValue: Int?
    private var failSendsValue = false
    private var failReceivesValue = false
    private var offloads: UInt64 = 0
    private var reads = 0

    public init(supportedOffloadFeatures: UInt64 = NetDevice.implementedOffloads,
                maxQueuedFrames: Int = 1024) throws(SystemError) {
        self.supportedOffloadFeatures = supportedOffloadFeatures
        self.maxQueuedFrames = max(1, maxQueuedFrames)
        ready = try EventFD(nonBlocking: true)
    }

    public var pollDescriptor: Int32? { ready.descriptor.rawValue }

    /// Queues a frame for the guest (`bytes` starts with the 12-byte header); false when the queue is full.
    @discardableResult
    public func inject(_ bytes: [UInt8]) -> Bool {
        lock.withLock {
            guard incoming.count - incomingStart < maxQueuedFrames else { return false }
            incoming.append(bytes)
            try? ready.signal()
            return true
        }
    }

    /// Queues `frame` (an Ethernet frame) behind `header`; false when the queue is full.
    @discardableResult
    public func inject(frame: [UInt8], header: NetHeader = NetHeader()) -> Bool {
        inject(header.bytes + frame)
    }

    /// Frames still queued for the guest.
    public var queuedCount: Int { lock.withLock { incoming.count - incomingStart } }
    /// How many frames `receive` has handed out.
    public var framesRead: Int { lock.withLock { reads } }
    /// The features last passed to `configureOffloads`.
    public var offloadFeatures: UInt64 { lock.withLock { offloads } }

    /// Frames sent by the guest (header included), oldest first; empties the list.
    public func takeSent() -> [[UInt8]] {
        lock.withLock {
            defer { outgoing = [] }
            return outgoing
        }
    }

    /// When set, `send` reports "full" while this many sent frames are waiting in `takeSent`.
    public var sendLimit: Int? {
        get { lock.withLock { sendLimitValue } }
        set { lock.withLock { sendLimitValue = newValue } }
    }

    /// When true, `send` throws.
    public var failSends: Bool {
        get { lock.withLock { failSendsValue } }
        set { lock.withLock { failSendsValue = newValue } }
    }

    /// When true, `receive` throws.
    public var failReceives: Bool {
        get { lock.withLock { failReceivesValue } }
        set { lock.withLock { failReceivesValue = newValue } }
    }

    public func receive(into buffer: UnsafeMutableRawBufferPointer) throws -> Int? {
        try lock.withLock { () throws -> Int? in
            if failReceivesValue { throw Failure() }
            guard incomingStart < incoming.count else { return nil }
            let frame = incoming[incomingStart]
            incomingStart += 1
            if incomingStart == incoming.count {
                incoming = []
                incomingStart = 0
                // Empty: the eventfd stops polling readable.
                _ = try? ready.wait()
            }
            reads += 1
            // Like a datagram socket: a frame longer than the buffer is cut (the device never passes
            // a buffer shorter than the largest frame).
            let n = min(frame.count, buffer.count)
            frame.withUnsafeBytes { source in
                UnsafeMutableRawBufferPointer(rebasing: buffer[0..<n])
                    .copyMemory(from: UnsafeRawBufferPointer(rebasing: source[0..<n]))
            }
            return n
        }
    }

    public func send(_ pieces: [UnsafeRawBufferPointer]) throws -> Bool {
        try lock.withLock { () throws -> Bool in
            if failSendsValue { throw Failure() }
            if let limit = sendLimitValue, outgoing.count >= limit { return false }
            var frame: [UInt8] = []
            frame.reserveCapacity(pieces.reduce(0) { $0 + $1.count })
            for piece in pieces { frame.append(contentsOf: piece) }
            outgoing.append(frame)
            return true
        }
    }

    public func configureOffloads(negotiatedFeatures: UInt64) throws {
        lock.withLock { offloads = negotiatedFeatures }
    }
}

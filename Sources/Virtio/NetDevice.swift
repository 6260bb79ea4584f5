import GodwitSystem
import GuestMemory

/// Counters of one virtio-net device, for statistics and tests. Bytes count Ethernet frames without the
/// 12-byte virtio-net header.
public struct NetDeviceStatistics: Equatable, Codable, Sendable {
    /// Frames delivered to the guest.
    public var rxFrames: UInt64 = 0
    public var rxBytes: UInt64 = 0
    /// Frames sent by the guest and accepted by the backend.
    public var txFrames: UInt64 = 0
    public var txBytes: UInt64 = 0

    /// TX chains dropped because they break the rules: a malformed descriptor chain (out of RAM, loop...),
    /// a device-writable buffer, a length outside 12 + [14, 65550], a header that lies (flags or GSO the
    /// driver did not negotiate, csum_start/offset or hdr_len past the frame). Completed with used length 0.
    public var txMalformed: UInt64 = 0
    /// TX frames dropped because the backend failed to send them (an error, not "full").
    public var txBackendErrors: UInt64 = 0
    /// Times TX stopped because the backend was full; the chain stays in the ring and is sent on retry.
    public var txBackendFull: UInt64 = 0

    /// Times RX stopped because the guest had no (or not enough) receive buffers. Nothing is dropped by
    /// the device: frames stay in the backend (the kernel's TAP queue, which drops when full).
    public var rxNoBuffers: UInt64 = 0
    /// Frames dropped because they do not fit the guest's buffers (one chain without MRG_RXBUF; the whole
    /// ring with it).
    public var rxTooBig: UInt64 = 0
    /// Frames from the backend dropped because the guest cannot take them: shorter than a header plus an
    /// Ethernet header, or carrying an offload (partial checksum, GSO type) the driver did not negotiate.
    public var rxBadFrames: UInt64 = 0
    /// RX chains that break the rules (malformed chain, device-readable buffers, smaller than the 12-byte
    /// header); completed with used length 0 and not used for data.
    public var rxMalformedBuffers: UInt64 = 0
    /// Backend read errors (not "no frame waiting").
    public var rxBackendErrors: UInt64 = 0
    /// A frame already read from the backend and waiting for guest buffers, dropped by a reset.
    public var rxDroppedOnReset: UInt64 = 0

    /// Control queue: announce acknowledgements (VIRTIO_NET_CTRL_ANNOUNCE_ACK) answered OK.
    public var controlAnnounceAcks: UInt64 = 0
    /// Control queue: commands answered VIRTIO_NET_ERR (an unsupported class or command).
    public var controlRefused: UInt64 = 0
    /// Control queue: chains completed without an answer (malformed, no header, no ack byte).
    public var controlMalformed: UInt64 = 0

    /// Backend offload configuration failures at activation (the backend then sends only plain frames).
    public var offloadConfigurationErrors: UInt64 = 0
    /// Times the device stopped and asked for a reset (a broken ring: avail idx too far, bad head index).
    public var resetsNeeded: UInt64 = 0

    public init() {}
}

/// What `NetDevice.receive` stopped on, and so what the RX thread should wait for next.
public enum NetReceiveOutcome: Equatable, Sendable {
    /// The backend has no frame waiting: wait until its descriptor polls readable.
    case backendEmpty
    /// The guest has no (or not enough) receive buffers: stop polling the backend (frames stay queued
    /// in the kernel, which bounds memory) until `NetDevice.onReceiveWakeup` fires.
    case waitingForBuffers
    /// The frame budget of this call is used up: call again (the backend may still be readable).
    case budgetExhausted
    /// The backend failed to read (counted in `rxBackendErrors`): try again later, not in a tight loop.
    case backendError
    /// The device is not running (before DRIVER_OK, after a reset or DEVICE_NEEDS_RESET): wait until
    /// `NetDevice.onReceiveWakeup` fires (it does at activation).
    case inactive

    /// Whether the RX thread should watch the backend's descriptor for readability.
    public var wantsBackendReadable: Bool { self == .backendEmpty || self == .budgetExhausted }
}

/// An Ethernet MAC address that a virtio-net device can use: 6 bytes, unicast, not all zero.
public struct MACAddress: Equatable, Hashable, Sendable, Codable, CustomStringConvertible {
    public let bytes: [UInt8]

    /// Nil unless `bytes` is 6 bytes, unicast (bit 0 of the first byte clear) and not all zero.
    public init?(_ bytes: [UInt8]) {
        guard bytes.count == 6, bytes[0] & 1 == 0, bytes.contains(where: { $0 != 0 }) else { return nil }
        self.bytes = bytes
    }

    /// Parses "52:54:00:12:34:56" (or with "-"); nil unless it is a valid unicast address.
    public init?(_ string: String) {
        let parts = string.split(omittingEmptySubsequences: false, whereSeparator: { $0 == ":" || $0 == "-" })
        guard parts.count == 6 else { return nil }
        var bytes: [UInt8] = []
        for part in parts {
            guard (1...2).contains(part.count), let byte = UInt8(part, radix: 16) else { return nil }
            bytes.append(byte)
        }
        self.init(bytes)
    }

    /// A locally administered unicast address derived from `seed` (a VM id, a TAP name): `02:` followed
    /// by 40 bits of a 64-bit FNV-1a hash of the seed's UTF-8 bytes. The same seed gives the same
    /// address in every process and on every host.
    public static func generated(seed: String) -> MACAddress {
        var hash: UInt64 = 0xcbf2_9ce4_8422_2325
        for byte in seed.utf8 {
            hash ^= UInt64(byte)
            hash &*= 0x0000_0100_0000_01b3
        }
        // splitmix64's finalizer spreads similar seeds (vm1, vm2) over all bits.
        hash = (hash ^ (hash >> 30)) &* 0xbf58_476d_1ce4_e5b9
        hash = (hash ^ (hash >> 27)) &* 0x94d0_49bb_1331_11eb
        hash ^= hash >> 31
        let bytes: [UInt8] = [0x02] + (0..<5).map { UInt8(truncatingIfNeeded: hash >> (8 * UInt64($0))) }
        // 0x02: locally administered, unicast, and never all zero.
        return MACAddress(bytes)!
    }

    /// Bit 1 of the first byte: not a vendor (OUI) address.
    public var isLocallyAdministered: Bool { bytes[0] & 2 != 0 }

    public var description: String {
        bytes.map { ($0 < 16 ? "0" : "") + String($0, radix: 16) }.joined(separator: ":")
    }

    public init(from decoder: Decoder) throws {
        let container = try decoder.singleValueContainer()
        let string = try container.decode(String.self)
        guard let address = MACAddress(string) else {
            throw DecodingError.dataCorruptedError(in: container, debugDescription: "\(string) is not a unicast MAC address")
        }
        self = address
    }

    public func encode(to encoder: Encoder) throws {
        var container = encoder.singleValueContainer()
        try container.encode(description)
    }
}

/// A virtio-net device (device ID 1, virtio 1.2 §5.1) over a `NetBackend`: one queue pair, queue 0
/// receives (RX), queue 1 transmits (TX).
///
/// ## Features
/// Always offered: VERSION_1, RING_EVENT_IDX, RING_INDIRECT_DESC, MAC, STATUS, MRG_RXBUF; MTU when an
/// `mtu` is given (advertised only: the device does not police frame sizes against it).
/// Offloads (`implementedOffloads`, intersected with the `offloads` argument and what the backend
/// supports): CSUM and HOST_TSO4/6 (the guest may send partial checksums and TSO frames; the device
/// checks their headers and the backend finishes them), GUEST_CSUM and GUEST_TSO4/6 (the guest may
/// receive them; the backend is allowed to produce them only for what the driver accepted, via
/// `NetBackend.configureOffloads`). CTRL_VQ and GUEST_ANNOUNCE unless `controlQueue` is false: queue 2
/// is then the control queue (`NetControlQueue`: the announce command, VIRTIO_NET_ERR for the rest),
/// and `requestAnnounce()` (after a migration or a snapshot load) sets VIRTIO_NET_S_ANNOUNCE and raises
/// a configuration change until the driver acknowledges. Never offered: ECN, UFO/USO, MQ, CTRL_RX,
/// CTRL_VLAN, CTRL_MAC_ADDR, CTRL_GUEST_OFFLOADS, RSC, RSS.
///
/// ## TX
/// A TX notification (`queueNotified(1)`, on the notifying thread) drains the TX queue: each chain is
/// validated, its header copied out of guest memory (the guest cannot change it after the checks), and
/// the frame is sent to the backend in one gather write, with the data straight from guest memory. A
/// malformed chain is dropped, counted and completed with used length 0; the device goes on. When the
/// backend is full, the chain stays in the ring, `transmitBlocked` becomes true and `onTransmitBlocked`
/// fires: call `retryTransmit()` when the backend polls writable (the next TX notification retries too).
///
/// ## RX
/// The Machine's RX thread calls `receive()` when the backend's `pollDescriptor` is readable and
/// acts on the returned `NetReceiveOutcome`; `onReceiveWakeup` fires when the guest adds receive buffers
/// (RX notification) or the device is activated. A frame is read from the backend only when the guest
/// has a buffer for it, into one fixed buffer of 12 + 65550 bytes: the device holds at most one frame;
/// all others wait in the backend. Without MRG_RXBUF a frame goes into one chain (too big: dropped and
/// counted, the chain kept); with it, over as many chains as needed, with num_buffers set and every
/// used element published at once. One interrupt per `receive()` call at most, when the driver wants it
/// (event-idx or the avail flags). `NetRxWorker` is a ready-made RX thread.
///
/// ## Threads
/// RX state is under one lock, TX state under another, so RX and TX run in parallel; a third lock
/// protects configuration, link status and activation. `Virtqueue`s are not thread-safe: each is only
/// touched under its own queue's lock. Hooks are called with no device lock held.
public final class NetDevice: VirtioDevice, GuestAnnouncing, @unchecked Sendable {
    /// virtio-net feature bits (virtio 1.2 §5.1.3).
    public enum Feature {
        public static let checksum: UInt64 = 1 << 0
        public static let guestChecksum: UInt64 = 1 << 1
        public static let controlGuestOffloads: UInt64 = 1 << 2
        public static let mtu: UInt64 = 1 << 3
        public static let mac: UInt64 = 1 << 5
        public static let guestTSO4: UInt64 = 1 << 7
        public static let guestTSO6: UInt64 = 1 << 8
        public static let guestECN: UInt64 = 1 << 9
        public static let guestUFO: UInt64 = 1 << 10
        public static let hostTSO4: UInt64 = 1 << 11
        public static let hostTSO6: UInt64 = 1 << 12
        public static let hostECN: UInt64 = 1 << 13
        public static let hostUFO: UInt64 = 1 << 14
        public static let mergeableRxBuffers: UInt64 = 1 << 15
        public static let status: UInt64 = 1 << 16
        public static let controlQueue: UInt64 = 1 << 17
        public static let controlRx: UInt64 = 1 << 18
        public static let controlVLAN: UInt64 = 1 << 19
        public static let controlRxExtra: UInt64 = 1 << 20
        public static let guestAnnounce: UInt64 = 1 << 21
        public static let controlMACAddress: UInt64 = 1 << 23
        public static let multiQueue: UInt64 = 1 << 22
    }

    /// The status field's bits.
    public enum LinkStatus {
        public static let up: UInt16 = 1
        public static let announce: UInt16 = 2
    }

    /// The offload features this device implements (and so may offer).
    public static let implementedOffloads: UInt64 = Feature.checksum | Feature.guestChecksum
        | Feature.guestTSO4 | Feature.guestTSO6 | Feature.hostTSO4 | Feature.hostTSO6
    /// The largest Ethernet frame (without the virtio-net header) in either direction: a 64 KiB GSO
    /// frame plus its Ethernet header.
    public static let maxFrameLength = 65550
    /// The smallest frame accepted from the guest or delivered to it: an Ethernet header.
    public static let minFrameLength = 14
    /// The size of the one buffer the device reads backend frames into.
    public static let receiveBufferSize = NetHeader.size + maxFrameLength
    /// How many backend frames one `receive()` call handles at most (bounds interrupt latency).
    public static let defaultReceiveBudget = 256
    public static let receiveQueueIndex = 0
    public static let transmitQueueIndex = 1

    public let backend: NetBackend
    public let mac: MACAddress
    /// The MTU advertised with VIRTIO_NET_F_MTU, or nil when not offered.
    public let mtu: UInt16?
    public let deviceID: UInt32 = VirtioDeviceType.network
    /// 3 with the control queue, else 2.
    public let queueCount: Int
    public let maxQueueSize: UInt16
    public let deviceFeatures: UInt64

    /// The state the RX side works on between activation and reset.
    private final class ReceiveState {
        let queue: Virtqueue
        let memory: GuestMemory
        let interrupt: VirtioInterrupt
        let features: UInt64
        /// The length of the frame in `receiveBuffer` still waiting for guest buffers.
        var pendingLength: Int?

        init(queue: Virtqueue, memory: GuestMemory, interrupt: VirtioInterrupt, features: UInt64) {
            self.queue = queue
            self.memory = memory
            self.interrupt = interrupt
            self.features = features
        }

        var mergeable: Bool { features & Feature.mergeableRxBuffers != 0 }
    }

    /// The state the TX side works on between activation and reset.
    private struct TransmitState {
        let queue: Virtqueue
        let memory: GuestMemory
        let interrupt: VirtioInterrupt
        let features: UInt64
    }

    /// Configuration space, activation, link status, hooks. Taken last (after rxLock or txLock), never
    /// held while calling out.
    private let controlLock = Lock()
    private var config: [UInt8]
    private var interrupt: VirtioInterrupt?
    private var negotiated: UInt64 = 0
    private var broken = false
    private var receiveWakeupHook: (() -> Void)?
    private var transmitBlockedHook: (() -> Void)?
    private var controlStats = NetDeviceStatistics()

    /// The control queue between activation and reset, and its counters. Taken before controlLock.
    private let ctrlLock = Lock()
    private var ctrl: (queue: Virtqueue, memory: GuestMemory, interrupt: VirtioInterrupt)?
    private var ctrlStats = NetDeviceStatistics()

    /// The RX queue, the pending frame and RX counters.
    private let rxLock = Lock()
    private var rx: ReceiveState?
    private var rxStats = NetDeviceStatistics()
    /// Frames from the backend land here (header + frame); used under rxLock only.
    private let receiveBuffer: UnsafeMutableRawBufferPointer

    /// The TX queue and TX counters.
    private let txLock = Lock()
    private var tx: TransmitState?
    private var txStats = NetDeviceStatistics()
    private var txBlocked = false
    /// The header of the frame being sent, copied out of guest memory; used under txLock only.
    private let transmitHeader: UnsafeMutableRawBufferPointer

    /// Creates a device for `backend` with address `mac`.
    ///
    /// - Parameters:
    ///   - mtu: advertise VIRTIO_NET_F_MTU with this MTU (raised to the spec's minimum of 68).
    ///   - linkUp: the initial link status.
    ///   - offloads: the offload features to offer, further limited to `implementedOffloads` and the
    ///     backend's `supportedOffloadFeatures`; TSO is dropped when its checksum feature is missing.
    ///     Pass 0 for a device without offloads.
    ///   - maxQueueSize: QueueNumMax for every queue.
    ///   - controlQueue: offer CTRL_VQ and GUEST_ANNOUNCE with a control queue (queue 2).
    public init(backend: NetBackend, mac: MACAddress, mtu: UInt16? = nil, linkUp: Bool = true,
                offloads: UInt64 = NetDevice.implementedOffloads, maxQueueSize: UInt16 = 256,
                controlQueue: Bool = true) {
        self.backend = backend
        self.mac = mac
        self.mtu = mtu.map { max($0, 68) }
        self.maxQueueSize = min(max(maxQueueSize, 2), 32768)

        var offered = offloads & NetDevice.implementedOffloads & backend.supportedOffloadFeatures
        // A feature must not be offered without the one it requires (virtio 1.2 §5.1.3.1).
        if offered & Feature.checksum == 0 { offered &= ~(Feature.hostTSO4 | Feature.hostTSO6) }
        if offered & Feature.guestChecksum == 0 { offered &= ~(Feature.guestTSO4 | Feature.guestTSO6) }
        deviceFeatures = VirtioFeature.version1 | VirtioFeature.eventIndex | VirtioFeature.indirectDescriptors
            | Feature.mac | Feature.status | Feature.mergeableRxBuffers
            | (self.mtu == nil ? 0 : Feature.mtu) | offered
            | (controlQueue ? Feature.controlQueue | Feature.guestAnnounce : 0)
        queueCount = controlQueue ? 3 : 2

        // struct virtio_net_config: mac[6], status, max_virtqueue_pairs, mtu (only with VIRTIO_NET_F_MTU).
        var config = [UInt8](repeating: 0, count: self.mtu == nil ? 10 : 12)
        config.replaceSubrange(0..<6, with: mac.bytes)
        config[6] = linkUp ? UInt8(LinkStatus.up) : 0
        config[8] = 1
        if let mtu = self.mtu {
            config[10] = UInt8(truncatingIfNeeded: mtu)
            config[11] = UInt8(truncatingIfNeeded: mtu >> 8)
        }
        self.config = config

        receiveBuffer = .allocate(byteCount: NetDevice.receiveBufferSize, alignment: 64)
        receiveBuffer.initializeMemory(as: UInt8.self, repeating: 0)
        transmitHeader = .allocate(byteCount: NetHeader.size, alignment: 8)
        transmitHeader.initializeMemory(as: UInt8.self, repeating: 0)
    }

    deinit {
        receiveBuffer.deallocate()
        transmitHeader.deallocate()
    }

    /// A locally administered unicast MAC derived from `seed` (see `MACAddress.generated(seed:)`).
    public static func generatedMAC(seed: String) -> [UInt8] {
        MACAddress.generated(seed: seed).bytes
    }

    // MARK: Observing and wiring

    /// The counters so far.
    public var statistics: NetDeviceStatistics {
        var result = rxLock.withLock { rxStats }
        let transmit = txLock.withLock { txStats }
        let control = controlLock.withLock { controlStats }
        let commands = ctrlLock.withLock { ctrlStats }
        result.controlAnnounceAcks = commands.controlAnnounceAcks
        result.controlRefused = commands.controlRefused
        result.controlMalformed = commands.controlMalformed
        result.txFrames = transmit.txFrames
        result.txBytes = transmit.txBytes
        result.txMalformed = transmit.txMalformed
        result.txBackendErrors = transmit.txBackendErrors
        result.txBackendFull = transmit.txBackendFull
        result.offloadConfigurationErrors = control.offloadConfigurationErrors
        result.resetsNeeded = control.resetsNeeded
        return result
    }

    /// The features the driver accepted (0 when not active).
    public var negotiatedFeatures: UInt64 { controlLock.withLock { negotiated } }

    /// True between activation and reset (also while stopped on DEVICE_NEEDS_RESET).
    public var isActive: Bool { controlLock.withLock { interrupt != nil } }

    /// True when the device stopped on a broken ring and waits for a reset.
    public var needsReset: Bool { controlLock.withLock { broken } }

    /// True while TX waits for the backend to accept a frame (see `retryTransmit`).
    public var transmitBlocked: Bool { txLock.withLock { txBlocked } }

    /// The RX and TX queues' positions, when active (for migration). A frame read from the backend
    /// but not yet delivered is not part of the state: it is lost, as on a wire.
    public var queueStates: (receive: VirtqueueState, transmit: VirtqueueState)? {
        guard let receive = rxLock.withLock({ rx?.queue.state }),
              let transmit = txLock.withLock({ tx?.queue.state }) else { return nil }
        return (receive, transmit)
    }

    /// Called, with no device lock held, when `receive()` can make progress again: the driver added
    /// receive buffers (an RX notification), or the device was activated. Typically signals the RX
    /// thread's eventfd, or (on the thread that owns the backend's poll) calls `receive()` directly.
    public var onReceiveWakeup: (() -> Void)? {
        get { controlLock.withLock { receiveWakeupHook } }
        set { controlLock.withLock { receiveWakeupHook = newValue } }
    }

    /// Called, with no device lock held, when TX becomes blocked on a full backend (not again while it
    /// stays blocked): poll the backend's descriptor for writable and call `retryTransmit()` until
    /// it returns true.
    public var onTransmitBlocked: (() -> Void)? {
        get { controlLock.withLock { transmitBlockedHook } }
        set { controlLock.withLock { transmitBlockedHook = newValue } }
    }

    // MARK: Link status

    /// Whether the status field says the link is up.
    public var isLinkUp: Bool { controlLock.withLock { UInt16(config[6]) & LinkStatus.up != 0 } }

    /// Sets the link status bit and, when it changed on an active device, raises a configuration change
    /// interrupt. Frames keep flowing either way: the status only tells the driver (which stops
    /// transmitting while the link is down).
    public func setLinkUp(_ up: Bool) {
        let signal: VirtioInterrupt? = controlLock.withLock {
            let old = config[6]
            let new = up ? old | UInt8(LinkStatus.up) : old & ~UInt8(LinkStatus.up)
            guard new != old else { return nil }
            config[6] = new
            return interrupt
        }
        signal?.signalConfigChange()
    }

    // MARK: Announce

    /// Whether VIRTIO_NET_S_ANNOUNCE is set (the driver has not acknowledged an announce yet).
    public var isAnnouncing: Bool { controlLock.withLock { UInt16(config[6]) & LinkStatus.announce != 0 } }

    /// Asks the driver to announce itself on the network (virtio 1.2 §5.1.6.5.4): sets
    /// VIRTIO_NET_S_ANNOUNCE and raises a configuration change interrupt. The driver sends a gratuitous
    /// ARP (or what its protocols use) and acknowledges on the control queue, which clears the bit.
    /// Returns false, doing nothing, unless the device is active with GUEST_ANNOUNCE and CTRL_VQ.
    @discardableResult
    public func requestAnnounce() -> Bool {
        let signal: VirtioInterrupt? = controlLock.withLock {
            let needed = Feature.guestAnnounce | Feature.controlQueue
            guard let interrupt, !broken, negotiated & needed == needed else { return nil }
            config[6] |= UInt8(LinkStatus.announce)
            return interrupt
        }
        signal?.signalConfigChange()
        return signal != nil
    }

    /// Runs the control queue. Called on the notifying thread.
    private func processControlQueue() {
        let (failure, notify): (Error?, VirtioInterrupt?) = ctrlLock.withLock {
            guard let ctrl, !isBroken else { return (nil, nil) }
            let outcome: NetControlQueue.Outcome
            do {
                outcome = try NetControlQueue.process(ctrl.queue, memory: ctrl.memory) { command in
                    guard command == .announceAck else { return NetControlQueue.error }
                    controlLock.withLock { config[6] &= ~UInt8(LinkStatus.announce) }
                    return NetControlQueue.ok
                }
            } catch {
                return (error, ctrl.interrupt)
            }
            ctrlStats.controlAnnounceAcks += UInt64(outcome.announceAcks)
            ctrlStats.controlRefused += UInt64(outcome.refused)
            ctrlStats.controlMalformed += UInt64(outcome.malformed)
            guard outcome.completed > 0, (try? ctrl.queue.needsNotification()) ?? true else { return (nil, nil) }
            return (nil, ctrl.interrupt)
        }
        if let failure, let notify {
            stop(failure, notify)
        } else {
            notify?.signalUsedBuffer(queue: NetControlQueue.queueIndex)
        }
    }

    // MARK: VirtioDevice

    public func readConfig(offset: Int, into data: UnsafeMutableRawBufferPointer) {
        controlLock.withLock {
            for i in 0..<data.count {
                let (position, overflow) = offset.addingReportingOverflow(i)
                data[i] = !overflow && position >= 0 && position < config.count ? config[position] : 0
            }
        }
    }

    public func writeConfig(offset: Int, from data: UnsafeRawBufferPointer) {
        // Every field is read-only for a VERSION_1 driver (the MAC is set through the control queue,
        // which is not offered).
    }

    public func activate(memory: GuestMemory, queues: [Virtqueue], features: UInt64, interrupt: VirtioInterrupt) throws {
        guard let receiveQueue = queues.first(where: { $0.index == NetDevice.receiveQueueIndex }) else {
            throw VirtioError.queueMissing(queue: NetDevice.receiveQueueIndex)
        }
        guard let transmitQueue = queues.first(where: { $0.index == NetDevice.transmitQueueIndex }) else {
            throw VirtioError.queueMissing(queue: NetDevice.transmitQueueIndex)
        }
        transmitQueue.maxChainBytes = UInt64(NetHeader.size + NetDevice.maxFrameLength)
        var controlQueue: Virtqueue?
        if features & Feature.controlQueue != 0 {
            guard queueCount > NetControlQueue.queueIndex,
                  let queue = queues.first(where: { $0.index == NetControlQueue.queueIndex }) else {
                throw VirtioError.queueMissing(queue: NetControlQueue.queueIndex)
            }
            queue.maxChainBytes = NetControlQueue.maxCommandBytes
            controlQueue = queue
        }
        controlLock.withLock {
            self.interrupt = interrupt
            negotiated = features
            broken = false
        }
        ctrlLock.withLock { ctrl = controlQueue.map { ($0, memory, interrupt) } }
        var offloadError = false
        do { try backend.configureOffloads(negotiatedFeatures: features) } catch { offloadError = true }
        if offloadError { controlLock.withLock { controlStats.offloadConfigurationErrors += 1 } }
        txLock.withLock {
            tx = TransmitState(queue: transmitQueue, memory: memory, interrupt: interrupt, features: features)
            txBlocked = false
        }
        rxLock.withLock {
            if rx?.pendingLength != nil { rxStats.rxDroppedOnReset += 1 }
            rx = ReceiveState(queue: receiveQueue, memory: memory, interrupt: interrupt, features: features)
        }
        wakeReceiver()
    }

    public func reset() {
        // Queues first, so that nothing touches the old rings once this returns.
        rxLock.withLock {
            if rx?.pendingLength != nil { rxStats.rxDroppedOnReset += 1 }
            rx = nil
        }
        txLock.withLock {
            tx = nil
            txBlocked = false
        }
        ctrlLock.withLock { ctrl = nil }
        controlLock.withLock {
            interrupt = nil
            negotiated = 0
            broken = false
            config[6] &= ~UInt8(LinkStatus.announce)
        }
        // Back to plain frames only; a failure changes nothing for the next driver, which sets its own.
        try? backend.configureOffloads(negotiatedFeatures: 0)
    }

    public func queueNotified(_ index: Int) {
        switch index {
        case NetDevice.receiveQueueIndex: wakeReceiver()
        case NetDevice.transmitQueueIndex: transmit()
        case NetControlQueue.queueIndex: processControlQueue()
        default: break
        }
    }

    private func wakeReceiver() {
        let hook = controlLock.withLock { receiveWakeupHook }
        hook?()
    }

    /// Stops the device until reset (a broken ring). Called with rxLock or txLock held.
    private func stop(_ error: Error, _ interrupt: VirtioInterrupt) {
        let first: Bool = controlLock.withLock {
            guard !broken else { return false }
            broken = true
            controlStats.resetsNeeded += 1
            return true
        }
        if first { interrupt.deviceNeedsReset(because: error) }
    }

    private var isBroken: Bool { controlLock.withLock { broken } }

    // MARK: TX

    /// Sends what the TX queue holds (after the backend became writable again); returns false when
    /// the backend is still full (TX stays blocked). The same as a TX notification.
    @discardableResult
    public func retryTransmit() -> Bool {
        transmit()
    }

    @discardableResult
    private func transmit() -> Bool {
        let (wasBlocked, blocked) = txLock.withLock { (txBlocked, transmitLocked()) }
        // Only when TX becomes blocked: a retry that stays blocked must not wake the retrier again.
        if blocked && !wasBlocked {
            let hook = controlLock.withLock { transmitBlockedHook }
            hook?()
        }
        return !blocked
    }

    /// Drains the TX queue; returns whether it stopped on a full backend. Called with txLock held.
    private func transmitLocked() -> Bool {
        guard let tx, !isBroken else { return false }
        txBlocked = false
        var completed = false
        while true {
            let popped: (head: UInt16, chain: Result<DescriptorChain, VirtioError>)?
            switch Result(catching: { () throws(VirtioError) in try tx.queue.popAvailableOrFailure() }) {
            case let .success(value): popped = value
            case let .failure(error):
                stop(error, tx.interrupt)
                popped = nil
            }
            guard let popped else { break }
            if case .full = transmitOne(popped.chain, tx) {
                // Keep the chain: the next attempt takes it again from the ring.
                tx.queue.nextAvail &-= 1
                txBlocked = true
                txStats.txBackendFull += 1
                break
            }
            if case let .failure(error) = Result(catching: { () throws(VirtioError) in
                try tx.queue.addUsed(head: popped.head, length: 0)
            }) {
                stop(error, tx.interrupt)
                break
            }
            completed = true
        }
        if completed {
            let notify = (try? tx.queue.needsNotification()) ?? true
            if notify { tx.interrupt.signalUsedBuffer(queue: NetDevice.transmitQueueIndex) }
        }
        return txBlocked
    }

    private enum TransmitResult { case sent, dropped, full }

    /// Validates one TX chain and sends it. Called with txLock held.
    private func transmitOne(_ parsed: Result<DescriptorChain, VirtioError>, _ tx: TransmitState) -> TransmitResult {
        guard case let .success(chain) = parsed, chain.writable.isEmpty else {
            txStats.txMalformed += 1
            return .dropped
        }
        let total = chain.readableLength
        guard total >= UInt64(NetHeader.size + NetDevice.minFrameLength),
              total <= UInt64(NetHeader.size + NetDevice.maxFrameLength) else {
            txStats.txMalformed += 1
            return .dropped
        }
        let dataLength = Int(total) - NetHeader.size
        // The parser checked every segment against RAM; a failure here means the layout changed.
        guard let headerBuffers = try? NetDevice.buffers(chain.readable, tx.memory),
              let dataBuffers = try? NetDevice.buffers(BlockDevice.dropping(UInt64(NetHeader.size), from: chain.readable),
                                                       tx.memory) else {
            txStats.txMalformed += 1
            return .dropped
        }
        // Copy the header out: the guest cannot change it between the checks and the send.
        var cursor = ScatterCursor(buffers: headerBuffers)
        cursor.copyOut(to: transmitHeader)
        guard let header = NetHeader(UnsafeRawBufferPointer(transmitHeader)),
              NetDevice.transmitHeaderIsValid(header, dataLength: dataLength, features: tx.features) else {
            txStats.txMalformed += 1
            return .dropped
        }
        let pieces = [UnsafeRawBufferPointer(transmitHeader)] + dataBuffers.map { UnsafeRawBufferPointer($0) }
        let sent: Bool
        do {
            sent = try backend.send(pieces)
        } catch {
            txStats.txBackendErrors += 1
            return .dropped
        }
        guard sent else { return .full }
        txStats.txFrames += 1
        txStats.txBytes += UInt64(dataLength)
        return .sent
    }

    /// Whether a header the driver sent is consistent with the frame and the negotiated features
    /// (virtio 1.2 §5.1.6.2): NEEDS_CSUM only with CSUM and with csum_start + csum_offset + 2 inside
    /// the frame; no receive-only flags; a GSO type only with its HOST_* feature, a non-zero gso_size
    /// and hdr_len inside the frame.
    public static func transmitHeaderIsValid(_ header: NetHeader, dataLength: Int, features: UInt64) -> Bool {
        let allowedFlags = features & Feature.checksum != 0 ? NetHeader.flagNeedsChecksum : 0
        guard header.flags & ~allowedFlags == 0 else { return false }
        if header.flags & NetHeader.flagNeedsChecksum != 0 {
            guard Int(header.checksumStart) + Int(header.checksumOffset) + 2 <= dataLength else { return false }
        }
        guard header.gsoType != NetHeader.gsoNone else { return true }
        let needed: UInt64
        switch header.gsoType & ~NetHeader.gsoECN {
        case NetHeader.gsoTCPv4: needed = Feature.hostTSO4
        case NetHeader.gsoTCPv6: needed = Feature.hostTSO6
        case NetHeader.gsoUDP: needed = Feature.hostUFO
        default: return false
        }
        guard features & needed != 0 else { return false }
        if header.gsoType & NetHeader.gsoECN != 0, features & Feature.hostECN == 0 { return false }
        return header.gsoSize > 0 && Int(header.headerLength) <= dataLength
    }

    // MARK: RX

    /// Moves frames from the backend into the guest's receive buffers until the backend is empty, the
    /// guest runs out of buffers, or `budget` frames were read; then interrupts the guest once if it
    /// asked for it. Call it on the RX thread when the backend's `pollDescriptor` is readable, and when
    /// `onReceiveWakeup` fires; the outcome says what to wait for next.
    @discardableResult
    public func receive(budget: Int = NetDevice.defaultReceiveBudget) -> NetReceiveOutcome {
        rxLock.withLock { receiveLocked(budget: max(budget, 1)) }
    }

    /// Called with rxLock held.
    private func receiveLocked(budget: Int) -> NetReceiveOutcome {
        guard let rx, !isBroken else { return .inactive }
        var published = false
        var read = 0
        var outcome = NetReceiveOutcome.budgetExhausted
        while true {
            if rx.pendingLength == nil {
                guard read < budget else { break }
                // Read only when the guest has somewhere to put the frame: otherwise it stays in the
                // backend. (With event-idx this also asks the driver to notify when it adds buffers.)
                let available: Bool
                switch Result(catching: { () throws(VirtioError) in try rx.queue.hasAvailable() }) {
                case let .success(value): available = value
                case let .failure(error):
                    stop(error, rx.interrupt)
                    outcome = .inactive
                    return finishReceive(rx, published: published, outcome: outcome)
                }
                guard available else {
                    rxStats.rxNoBuffers += 1
                    outcome = .waitingForBuffers
                    break
                }
                let length: Int?
                do {
                    length = try backend.receive(into: receiveBuffer)
                } catch {
                    rxStats.rxBackendErrors += 1
                    outcome = .backendError
                    break
                }
                guard let length else {
                    outcome = .backendEmpty
                    break
                }
                read += 1
                guard length <= receiveBuffer.count,
                      NetDevice.sanitizeReceivedHeader(receiveBuffer, length: length, features: rx.features) else {
                    rxStats.rxBadFrames += 1
                    continue
                }
                rx.pendingLength = length
            }
            guard let length = rx.pendingLength else { continue }
            let delivery: Delivery
            switch Result(catching: { () throws(VirtioError) in try deliver(rx, length: length, published: &published) }) {
            case let .success(value): delivery = value
            case let .failure(error):
                stop(error, rx.interrupt)
                rx.pendingLength = nil
                return finishReceive(rx, published: published, outcome: .inactive)
            }
            switch delivery {
            case .delivered:
                rx.pendingLength = nil
                rxStats.rxFrames += 1
                rxStats.rxBytes += UInt64(length - NetHeader.size)
            case .dropped:
                rx.pendingLength = nil
                rxStats.rxTooBig += 1
            case .needBuffers:
                rxStats.rxNoBuffers += 1
                return finishReceive(rx, published: published, outcome: .waitingForBuffers)
            }
        }
        return finishReceive(rx, published: published, outcome: outcome)
    }

    private func finishReceive(_ rx: ReceiveState, published: Bool, outcome: NetReceiveOutcome) -> NetReceiveOutcome {
        if published {
            let notify = (try? rx.queue.needsNotification()) ?? true
            if notify { rx.interrupt.signalUsedBuffer(queue: NetDevice.receiveQueueIndex) }
        }
        return outcome
    }

    private enum Delivery { case delivered, dropped, needBuffers }

    /// Puts the frame in `receiveBuffer[0..<length]` (header included) into the guest's buffers.
    ///
    /// Malformed chains met before the frame's first buffer are completed at once with length 0;
    /// those met after it are completed with the frame. When the buffers run out before the frame
    /// fits, every chain taken for it goes back to the ring (`nextAvail` is rewound) and the frame
    /// waits, unless the whole ring was offered, in which case it can never fit and is dropped.
    /// Throws only for a broken ring. Called with rxLock held.
    private func deliver(_ rx: ReceiveState, length: Int, published: inout Bool) throws(VirtioError) -> Delivery {
        let queue = rx.queue
        var chains: [DescriptorChain] = []
        var lateMalformed: [UInt16] = []
        var firstChainPosition = queue.nextAvail
        var capacity: UInt64 = 0
        while chains.isEmpty || (rx.mergeable && capacity < UInt64(length)) {
            let position = queue.nextAvail
            guard let popped = try queue.popAvailableOrFailure() else {
                guard !chains.isEmpty else { return .needBuffers }
                let offered = queue.nextAvail &- firstChainPosition
                queue.nextAvail = firstChainPosition
                return offered >= queue.size ? .dropped : .needBuffers
            }
            guard case let .success(chain) = popped.chain, chain.readable.isEmpty,
                  chain.writableLength >= UInt64(NetHeader.size) else {
                rxStats.rxMalformedBuffers += 1
                if chains.isEmpty {
                    try queue.addUsed(head: popped.head, length: 0)
                    published = true
                } else {
                    lateMalformed.append(popped.head)
                }
                continue
            }
            if chains.isEmpty { firstChainPosition = position }
            if !rx.mergeable && chain.writableLength < UInt64(length) {
                // Keep the buffer for a smaller frame.
                queue.nextAvail = position
                return .dropped
            }
            chains.append(chain)
            capacity += chain.writableLength
        }

        // num_buffers: how many chains the frame spans (1 without MRG_RXBUF). chains.count <= queue size.
        let numBuffers = UInt16(chains.count)
        receiveBuffer[10] = UInt8(truncatingIfNeeded: numBuffers)
        receiveBuffer[11] = UInt8(truncatingIfNeeded: numBuffers >> 8)
        var elements: [(head: UInt16, length: UInt32)] = []
        elements.reserveCapacity(chains.count + lateMalformed.count)
        var offset = 0
        for chain in chains {
            let count = Int(min(UInt64(length - offset), chain.writableLength))
            let destination: [UnsafeMutableRawBufferPointer]
            do { destination = try NetDevice.buffers(chain.writable, rx.memory) } catch { throw .memory(error) }
            var cursor = ScatterCursor(buffers: destination)
            // In bounds: offset + count <= length <= receiveBuffer.count.
            cursor.copyIn(from: UnsafeRawBufferPointer(rebasing: receiveBuffer[offset..<(offset + count)]))
            elements.append((chain.head, UInt32(count)))
            offset += count
        }
        elements += lateMalformed.map { (head: $0, length: UInt32(0)) }
        try queue.addUsed(elements)
        published = true
        return .delivered
    }

    /// Checks the header of a frame from the backend against the driver's features and makes it what
    /// the driver expects (virtio 1.2 §5.1.6.4); false when the frame must be dropped.
    ///
    /// Without GUEST_CSUM the header must describe a plain frame and is zeroed (flags 0, no GSO). With
    /// it, NEEDS_CSUM must point inside the frame and a GSO type needs its GUEST_* feature; receive
    /// flags other than NEEDS_CSUM and DATA_VALID are cleared. num_buffers is set later.
    static func sanitizeReceivedHeader(_ buffer: UnsafeMutableRawBufferPointer, length: Int, features: UInt64) -> Bool {
        guard length >= NetHeader.size + NetDevice.minFrameLength, length <= buffer.count,
              var header = NetHeader(UnsafeRawBufferPointer(buffer)) else { return false }
        let dataLength = length - NetHeader.size
        if features & Feature.guestChecksum == 0 {
            guard header.flags & NetHeader.flagNeedsChecksum == 0, header.gsoType == NetHeader.gsoNone else { return false }
            header = NetHeader()
        } else {
            header.flags &= NetHeader.flagNeedsChecksum | NetHeader.flagDataValid
            if header.flags & NetHeader.flagNeedsChecksum != 0 {
                guard Int(header.checksumStart) + Int(header.checksumOffset) + 2 <= dataLength else { return false }
            }
            if header.gsoType != NetHeader.gsoNone {
                let needed: UInt64
                switch header.gsoType & ~NetHeader.gsoECN {
                case NetHeader.gsoTCPv4: needed = Feature.guestTSO4
                case NetHeader.gsoTCPv6: needed = Feature.guestTSO6
                case NetHeader.gsoUDP: needed = Feature.guestUFO
                default: return false
                }
                guard features & needed != 0 else { return false }
                if header.gsoType & NetHeader.gsoECN != 0, features & Feature.guestECN == 0 { return false }
            }
        }
        header.numBuffers = 0
        // In bounds: buffer holds at least NetHeader.size bytes (length >= 12 and length <= count).
        for (i, byte) in header.bytes.enumerated() { buffer[i] = byte }
        return true
    }

    // MARK: Helpers

    /// Host views of guest segments the chain parser already checked.
    private static func buffers(_ segments: [DescriptorSegment],
                                _ memory: GuestMemory) throws(GuestMemoryError) -> [UnsafeMutableRawBufferPointer] {
        var result: [UnsafeMutableRawBufferPointer] = []
        result.reserveCapacity(segments.count)
        for segment in segments {
            result.append(try memory.buffer(at: segment.address, length: Int(segment.length)))
        }
        return result
    }
}

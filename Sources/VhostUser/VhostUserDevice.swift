import GodwitSystem
import GuestMemory
import Virtio
#if canImport(Glibc)
import Glibc
#endif

/// A virtio device whose logic lives in a vhost-user backend (an I/O domain, qemu-storage-daemon): the
/// VMM's transport (virtio-mmio) talks to this object, and this object drives the backend.
///
/// Notifications never pass through the VMM: the Machine gives each queue a kick eventfd (registered
/// as a KVM ioeventfd on the queue's notify address) and a call eventfd (registered as a KVM irqfd on
/// the device's interrupt line), both through the `notifiers` closure, and the backend reads the kicks
/// and writes the calls. `queueNotified` (the path of `--notify exit`) writes the kick eventfd.
///
/// A network device with one queue pair gets a third queue, the control queue, that this object runs
/// itself, as QEMU's frontend does: the guest sees CTRL_VQ and GUEST_ANNOUNCE whatever the backend
/// offers (the backend's own control-queue features are hidden and never negotiated with it), its
/// notifications exit to the VMM (no ioeventfd), and `requestAnnounce()` sets VIRTIO_NET_S_ANNOUNCE in
/// the config space the guest reads, over the backend's status byte, until the driver acknowledges.
///
/// ```swift
/// let disk = try VhostUserDevice(socketPath: "/run/godwit/vm1-disk.sock", deviceID: VirtioDeviceType.block) { queue in
///     (kick: kickFDs[queue], call: callFD)   // the Machine's ioeventfd and irqfd
/// }
/// ```
public final class VhostUserDevice: VirtioDevice, GuestAnnouncing, @unchecked Sendable {
    /// The kick and call eventfds of queue `queue`, made (and registered with KVM) by the Machine.
    public typealias Notifiers = (_ queue: Int) throws -> (kick: EventFD, call: EventFD)

    /// The protocol features the frontend uses when the backend offers them.
    public static let wantedProtocolFeatures: UInt64 = VhostUserProtocolFeature.multiQueue
        | VhostUserProtocolFeature.replyAck | VhostUserProtocolFeature.config | VhostUserProtocolFeature.logSharedMemory
        | VhostUserProtocolFeature.inflightSharedMemory
    /// Features never offered to the guest: in the transport range (bits 24-40) only indirect
    /// descriptors, event-idx and VERSION_1 pass (vhost-user's own bits 26 and 30, packed rings, IOMMU,
    /// queue reset and the rest need the VMM's transport, which does not do them); device bits pass.
    public static let hiddenFeatures: UInt64 = (((1 << 41) - 1) & ~((1 << 24) - 1))
        & ~(VirtioFeature.indirectDescriptors | VirtioFeature.eventIndex | VirtioFeature.version1)

    public let deviceID: UInt32
    public let queueCount: Int
    /// The queues that run in the backend: `queueCount`, less the control queue run here.
    public let backendQueueCount: Int
    /// Whether this object runs a virtio-net control queue (queue 2) and the announce status itself.
    public let runsNetControlQueue: Bool
    /// virtio-net features that need the control queue: hidden from the guest when the backend offers
    /// them (the backend never sees the control queue), but for the two this object implements.
    public static let netControlFeatures: UInt64 = NetDevice.Feature.controlGuestOffloads | NetDevice.Feature.controlQueue
        | NetDevice.Feature.controlRx | NetDevice.Feature.controlVLAN | NetDevice.Feature.controlRxExtra
        | NetDevice.Feature.guestAnnounce | NetDevice.Feature.controlMACAddress | NetDevice.Feature.multiQueue
        | (1 << 52) | (1 << 53) | (1 << 57) | (1 << 60)  // VQ_NOTF_COAL, NOTF_COAL, HASH_REPORT, RSS
    /// The control-queue features the guest gets from this object.
    public static let localNetFeatures: UInt64 = NetDevice.Feature.controlQueue | NetDevice.Feature.guestAnnounce
    public let maxQueueSize: UInt16
    /// How many bytes of config space are fetched (GET_CONFIG) and cached.
    public let configSize: Int

    private let connector: () throws -> VhostUserFrontend
    private let notifiers: Notifiers
    private let lock = Lock()
    private var frontend: VhostUserFrontend?
    private var backendFeatures: UInt64 = 0
    private var protocolFeatures: UInt64 = 0
    private var guestFeatures: UInt64 = 0
    private var config: [UInt8]
    private var activation: Activation?
    private var ringBases: [Int: UInt16] = [:]
    private var lastErrorValue: Error?
    /// The backend's inflight-tracking region (INFLIGHT_SHMFD), kept across reconnects so that a new
    /// backend resubmits what the old one had taken; dropped when the driver resets the device.
    private var inflightRegion: (description: VhostUserInflightDescription, fd: FileDescriptor)?
    /// The dirty log shared with the backend while a migration runs (replayed on reconnect).
    private var dirtyLog: (fd: FileDescriptor, size: UInt64)?
    /// Rings stopped for a migration's final phase: their next avail indices.
    private var suspendedBases: [Int: UInt16]?
    /// Guards the control queue, the announce bit and their counters: never held while talking to the
    /// backend, so that a vCPU running the control queue never waits for backend I/O. Taken after `lock`.
    private let controlLock = Lock()
    /// The control queue run here, between activation and reset, with the negotiated features.
    private var control: (queue: Virtqueue, memory: GuestMemory, interrupt: VirtioInterrupt, features: UInt64)?
    /// VIRTIO_NET_S_ANNOUNCE as the guest sees it.
    private var announcing = false
    private var controlStatistics = NetDeviceStatistics()

    /// What `activate` was given: replayed on reconnect.
    private struct Activation {
        var memory: GuestMemory
        var queues: [(index: Int, state: VirtqueueState)]
        var features: UInt64
        var interrupt: VirtioInterrupt
        var eventFDs: [Int: (kick: EventFD, call: EventFD)]
    }

    /// Connects to the backend at `socketPath` and runs the handshake (features, protocol features,
    /// queue count, owner, config space).
    ///
    /// - Parameters:
    ///   - deviceID: the virtio device type the guest sees (2 block, 1 net).
    ///   - queueCount: the queues the guest gets (default 1 for block, 2 for net, else the backend's count).
    ///   - configSize: bytes of config space to fetch (default 60 for block, 12 for net).
    public convenience init(socketPath: String, deviceID: UInt32, queueCount: Int? = nil, maxQueueSize: UInt16 = 256,
                            configSize: Int? = nil, notifiers: @escaping Notifiers) throws {
        try self.init(deviceID: deviceID, queueCount: queueCount, maxQueueSize: maxQueueSize, configSize: configSize,
                      notifiers: notifiers, connect: { try VhostUserFrontend.connect(path: socketPath) })
    }

    /// Like `init(socketPath:...)` with a connection function of the caller's (a socket passed in, a test pair).
    /// `connect` is called again by `reconnect()`.
    public init(deviceID: UInt32, queueCount: Int? = nil, maxQueueSize: UInt16 = 256, configSize: Int? = nil,
                notifiers: @escaping Notifiers, connect: @escaping () throws -> VhostUserFrontend) throws {
        self.deviceID = deviceID
        self.maxQueueSize = maxQueueSize
        self.notifiers = notifiers
        self.connector = connect
        self.configSize = min(configSize ?? (deviceID == VirtioDeviceType.block ? 60 : deviceID == VirtioDeviceType.network ? 12 : 0),
                              VhostUserConfigSpace.maxSize)
        config = Array(repeating: 0, count: self.configSize)
        let frontend = try connect()
        do {
            let negotiated = try VhostUserDevice.negotiate(frontend, configSize: self.configSize)
            let wanted = queueCount ?? (deviceID == VirtioDeviceType.block ? 1 : deviceID == VirtioDeviceType.network ? 2 : nil)
                ?? Int(negotiated.queues ?? 1)
            guard wanted >= 1, wanted <= 256 else { throw VhostUserError.deviceError("queue count \(wanted) is not 1 to 256") }
            backendQueueCount = wanted
            runsNetControlQueue = deviceID == VirtioDeviceType.network && wanted == NetControlQueue.queueIndex
            self.queueCount = runsNetControlQueue ? wanted + 1 : wanted
            try lock.withLock { try adopt(frontend, negotiated) }
        } catch {
            frontend.close()
            throw error
        }
    }

    /// What the handshake learnt from the backend.
    private struct Negotiated {
        var features: UInt64
        var protocolFeatures: UInt64
        /// GET_QUEUE_NUM's answer (nil: MQ not offered).
        var queues: UInt64?
        var config: [UInt8]
    }

    /// The handshake on a new connection, in QEMU's order: GET_FEATURES, GET/SET_PROTOCOL_FEATURES,
    /// GET_QUEUE_NUM, SET_OWNER, GET_CONFIG.
    private static func negotiate(_ frontend: VhostUserFrontend, configSize: Int) throws -> Negotiated {
        let features = try frontend.getFeatures()
        var negotiated: UInt64 = 0
        var queues: UInt64?
        if features & VhostUserFeature.protocolFeatures != 0 {
            let offered = try frontend.getProtocolFeatures()
            negotiated = offered & VhostUserDevice.wantedProtocolFeatures
            try frontend.setProtocolFeatures(negotiated)
            if negotiated & VhostUserProtocolFeature.multiQueue != 0 { queues = try frontend.getQueueNum() }
        }
        try frontend.setOwner()
        var space = Array(repeating: UInt8(0), count: configSize)
        if negotiated & VhostUserProtocolFeature.config != 0 && configSize > 0 {
            space = try frontend.getConfig(offset: 0, size: configSize)
        }
        return Negotiated(features: features, protocolFeatures: negotiated, queues: queues, config: space)
    }

    /// Makes `frontend` the device's connection. Called with the lock held.
    private func adopt(_ frontend: VhostUserFrontend, _ negotiated: Negotiated) throws {
        if let queues = negotiated.queues, queues < UInt64(backendQueueCount) {
            throw VhostUserError.deviceError("the backend serves \(queues) queues, \(backendQueueCount) wanted")
        }
        var guest = negotiated.features & ~VhostUserDevice.hiddenFeatures
        if deviceID == VirtioDeviceType.block && queueCount == 1 { guest &= ~BlockDevice.Feature.multiQueue }
        if runsNetControlQueue { guest = guest & ~VhostUserDevice.netControlFeatures | VhostUserDevice.localNetFeatures }
        // The guest negotiated with the old backend's features: a backend that lacks some cannot take over.
        if let activation, activation.features & ~guest != 0 {
            let missing = activation.features & ~guest
            throw VhostUserError.deviceError("the new backend lacks negotiated features 0x\(String(missing, radix: 16))")
        }
        try frontend.watchForDisconnect { [weak self] error in self?.disconnected(frontend, error) }
        self.frontend = frontend
        backendFeatures = negotiated.features
        protocolFeatures = negotiated.protocolFeatures
        guestFeatures = guest
        config = negotiated.config
    }

    deinit { frontend?.close() }

    /// Closes the connection on purpose (no `onDisconnect`, and automatic reconnection stops); the
    /// backend stops the rings.
    public func disconnect() {
        let old: VhostUserFrontend? = lock.withLock {
            let f = frontend
            frontend = nil
            activation = nil
            closedOnPurpose = true
            return f
        }
        old?.close()
    }

    private var closedOnPurpose = false

    /// From now on, when the backend goes away, reconnect (and replay the set-up) until it is back:
    /// retries wait `initialDelay`, doubling up to `maxDelay`; the device is never latched off. Stops
    /// after `disconnect()`. `log` hears of each loss and recovery. Replaces `onDisconnect`.
    public func reconnectAutomatically(initialDelay: Double = 0.05, maxDelay: Double = 1,
                                       log: (@Sendable (String) -> Void)? = nil) {
        onDisconnect = { device, error in
            log?("vhost-user device lost its backend (\(error)); reconnecting")
            var delay = initialDelay
            var attempts = 0
            while !device.lock.withLock({ device.closedOnPurpose }) {
                attempts += 1
                do {
                    try device.reconnect()
                    log?("vhost-user device reconnected after \(attempts) attempt(s)")
                    return
                } catch {
                    if attempts == 1 || attempts % 50 == 0 { log?("vhost-user reconnect attempt \(attempts) failed: \(error)") }
                    usleep(UInt32(delay * 1_000_000))
                    delay = min(delay * 2, maxDelay)
                }
            }
        }
    }

    // MARK: Connection

    private var disconnectHandler: (@Sendable (VhostUserDevice, VhostUserError) -> Void)?

    /// Called on a thread of its own when the backend goes away (it crashed, was restarted, or closed
    /// the connection). The device keeps what it needs to replay its set-up: call `reconnect` (with the
    /// backend back) and the rings resume where the guest left them.
    public var onDisconnect: (@Sendable (VhostUserDevice, VhostUserError) -> Void)? {
        get { lock.withLock { disconnectHandler } }
        set { lock.withLock { disconnectHandler = newValue } }
    }

    private func disconnected(_ frontend: VhostUserFrontend, _ error: VhostUserError) {
        let handler: (@Sendable (VhostUserDevice, VhostUserError) -> Void)? = lock.withLock {
            // A connection that was already replaced is not news.
            guard self.frontend === frontend else { return nil }
            lastErrorValue = error
            return disconnectHandler
        }
        handler?(self, error)
    }

    /// `reconnect()` until it succeeds, waiting `initialDelay` after the first failure and twice as long
    /// after each next one (at most `maxDelay`), for up to `timeout` seconds; throws the last error.
    public func reconnect(timeout: Double, initialDelay: Double = 0.05, maxDelay: Double = 2) throws {
        let deadline = VhostUserSocket.now() + timeout
        var delay = initialDelay
        while true {
            do {
                try reconnect()
                return
            } catch {
                let remaining = deadline - VhostUserSocket.now()
                if remaining <= 0 { throw error }
                usleep(UInt32(min(delay, remaining) * 1_000_000))
                delay = min(delay * 2, maxDelay)
            }
        }
    }

    // MARK: State

    /// The features the backend offered (GET_FEATURES), vhost-user bits included.
    public var backendFeatureBits: UInt64 { lock.withLock { backendFeatures } }
    /// The protocol features in use.
    public var negotiatedProtocolFeatures: UInt64 { lock.withLock { protocolFeatures } }
    /// The next avail index of each queue, as the backend reported it when its ring stopped (reset).
    public var savedRingBases: [Int: UInt16] { lock.withLock { ringBases } }
    /// The last error talking to the backend outside a throwing call (reset, config writes).
    public var lastError: Error? { lock.withLock { lastErrorValue } }
    /// True while the rings run in the backend.
    public var isActive: Bool { lock.withLock { activation != nil } }

    /// Fetches the config space again (GET_CONFIG), for example after the backend resized its image.
    public func refreshConfig() throws {
        try lock.withLock {
            guard let frontend else { throw VhostUserError.disconnected(reason: "no connection") }
            guard protocolFeatures & VhostUserProtocolFeature.config != 0, configSize > 0 else { return }
            config = try frontend.getConfig(offset: 0, size: configSize)
        }
    }

    /// Connects again and replays the handshake and, when the device was active, the activation. With
    /// INFLIGHT_SHMFD the new backend resubmits, oldest first, the requests the old one took and did not
    /// complete, and continues after them; without it the rings restart from the used index in guest
    /// memory, so those requests are submitted again (correct only for backends that complete in order).
    public func reconnect() throws {
        let frontend = try connector()
        try lock.withLock {
            self.frontend?.close()
            self.frontend = nil
            do {
                try adopt(frontend, try VhostUserDevice.negotiate(frontend, configSize: configSize))
            } catch {
                frontend.close()
                throw error
            }
            guard let activation else { return }
            var queues = activation.queues
            for i in queues.indices {
                let state = queues[i].state
                queues[i].state.nextAvail = (try? activation.memory.load(UInt16.self, at: state.deviceArea &+ 2)) ?? state.nextAvail
            }
            try start(frontend, memory: activation.memory, queues: queues, features: activation.features,
                      interrupt: activation.interrupt, eventFDs: activation.eventFDs)
        }
    }

    // MARK: VirtioDevice

    public var deviceFeatures: UInt64 { lock.withLock { guestFeatures } }

    public func readConfig(offset: Int, into data: UnsafeMutableRawBufferPointer) {
        var space = lock.withLock { config }
        // virtio_net_config.status (offset 6): the announce bit is this object's, the rest the backend's.
        if runsNetControlQueue, space.count > 6 {
            let announce = controlLock.withLock { announcing }
            space[6] = space[6] & ~UInt8(NetDevice.LinkStatus.announce) | (announce ? UInt8(NetDevice.LinkStatus.announce) : 0)
        }
        for i in 0..<data.count {
            let (position, overflow) = offset.addingReportingOverflow(i)
            data[i] = !overflow && position >= 0 && position < space.count ? space[position] : 0
        }
    }

    public func writeConfig(offset: Int, from data: UnsafeRawBufferPointer) {
        lock.withLock {
            guard offset >= 0, offset <= configSize, data.count <= configSize - offset else { return }
            for (i, byte) in data.enumerated() { config[offset + i] = byte }
            guard let frontend, protocolFeatures & VhostUserProtocolFeature.config != 0 else { return }
            do { try frontend.setConfig(offset: UInt32(offset), bytes: Array(data)) } catch { lastErrorValue = error }
        }
    }

    public func activate(memory: GuestMemory, queues: [Virtqueue], features: UInt64, interrupt: VirtioInterrupt) throws {
        try lock.withLock {
            guard let frontend else { throw VhostUserError.disconnected(reason: "no connection to the backend") }
            var controlQueue: Virtqueue?
            if runsNetControlQueue && features & NetDevice.Feature.controlQueue != 0 {
                guard let queue = queues.first(where: { $0.index == NetControlQueue.queueIndex }) else {
                    throw VhostUserError.deviceError("the driver negotiated CTRL_VQ without setting up queue \(NetControlQueue.queueIndex), the control queue")
                }
                queue.maxChainBytes = NetControlQueue.maxCommandBytes
                controlQueue = queue
            }
            // The control queue's notifications exit to the VMM: no ioeventfd, nothing for the backend.
            let remote = queues.filter { !(runsNetControlQueue && $0.index == NetControlQueue.queueIndex) }
            var eventFDs: [Int: (kick: EventFD, call: EventFD)] = [:]
            for queue in remote { eventFDs[queue.index] = try notifiers(queue.index) }
            do {
                try start(frontend, memory: memory, queues: remote.map { (index: $0.index, state: $0.state) },
                          features: features, interrupt: interrupt, eventFDs: eventFDs)
            } catch {
                lastErrorValue = error
                throw error
            }
            controlLock.withLock { control = controlQueue.map { ($0, memory, interrupt, features) } }
        }
    }

    /// The features negotiated with the backend: the guest's, without those this object implements.
    private func backendFeatures(_ features: UInt64) -> UInt64 {
        runsNetControlQueue ? features & ~VhostUserDevice.localNetFeatures : features
    }

    /// SET_FEATURES, SET_MEM_TABLE, then per queue NUM, BASE, ADDR, KICK, CALL and ENABLE (QEMU's order).
    /// Called with the lock held.
    private func start(_ frontend: VhostUserFrontend, memory: GuestMemory, queues: [(index: Int, state: VirtqueueState)],
                       features: UInt64, interrupt: VirtioInterrupt,
                       eventFDs: [Int: (kick: EventFD, call: EventFD)]) throws {
        let usesProtocolFeatures = backendFeatures & VhostUserFeature.protocolFeatures != 0
        if protocolFeatures & VhostUserProtocolFeature.inflightSharedMemory != 0 {
            // QEMU's order: the region first (fetched once, handed back to every later backend).
            if inflightRegion == nil {
                inflightRegion = try frontend.getInflightFD(queueCount: UInt16(backendQueueCount), queueSize: maxQueueSize)
            }
            if let region = inflightRegion {
                try frontend.setInflightFD(region.description, fileDescriptor: region.fd)
            }
        }
        let logging = dirtyLog != nil
        try frontend.setFeatures(backendFeatures(features) | (usesProtocolFeatures ? VhostUserFeature.protocolFeatures : 0)
                                 | (logging ? VhostUserFeature.logAll : 0))
        let (regions, fds) = try VhostUserDevice.memoryTable(memory)
        try frontend.setMemoryTable(regions, fileDescriptors: fds)
        if let dirtyLog { try frontend.setLogBase(size: dirtyLog.size, offset: 0, fileDescriptor: dirtyLog.fd) }
        for (index, state) in queues {
            guard let notifier = eventFDs[index] else { throw VhostUserError.deviceError("queue \(index) has no eventfds") }
            try frontend.setVringNum(queue: index, size: state.size)
            try frontend.setVringBase(queue: index, base: state.nextAvail)
            try frontend.setVringAddress(try VhostUserDevice.vringAddress(index, state, memory, logging: logging))
            try frontend.setVringKick(queue: index, fileDescriptor: notifier.kick.descriptor)
            try frontend.setVringCall(queue: index, fileDescriptor: notifier.call.descriptor)
        }
        if usesProtocolFeatures {
            for (index, _) in queues { try frontend.setVringEnable(queue: index, enabled: true) }
        }
        activation = Activation(memory: memory, queues: queues, features: features, interrupt: interrupt,
                                eventFDs: eventFDs)
    }

    public func queueNotified(_ index: Int) {
        if runsNetControlQueue && index == NetControlQueue.queueIndex {
            processControlQueue()
            return
        }
        let kick = lock.withLock { activation?.eventFDs[index]?.kick }
        try? kick?.signal()
    }

    // MARK: Announce (virtio-net)

    /// Whether VIRTIO_NET_S_ANNOUNCE is set for the guest.
    public var isAnnouncing: Bool { controlLock.withLock { announcing } }

    /// The control queue's counters (only the control* fields are used).
    public var controlQueueStatistics: NetDeviceStatistics { controlLock.withLock { controlStatistics } }

    /// Sets VIRTIO_NET_S_ANNOUNCE and raises a configuration change, when the driver negotiated
    /// GUEST_ANNOUNCE and the control queue runs here; the driver's ANNOUNCE_ACK clears it.
    @discardableResult
    public func requestAnnounce() -> Bool {
        let interrupt: VirtioInterrupt? = controlLock.withLock {
            let needed = NetDevice.Feature.guestAnnounce | NetDevice.Feature.controlQueue
            guard let control, control.features & needed == needed else { return nil }
            announcing = true
            return control.interrupt
        }
        interrupt?.signalConfigChange()
        return interrupt != nil
    }

    /// Runs the control queue (on the vCPU thread that wrote QueueNotify).
    private func processControlQueue() {
        let (failure, interrupt): (Error?, VirtioInterrupt?) = controlLock.withLock {
            guard let control else { return (nil, nil) }
            let outcome: NetControlQueue.Outcome
            do {
                outcome = try NetControlQueue.process(control.queue, memory: control.memory) { command in
                    guard command == .announceAck else { return NetControlQueue.error }
                    announcing = false
                    return NetControlQueue.ok
                }
            } catch {
                // A broken ring: stop the queue until the driver resets the device.
                self.control = nil
                return (error, control.interrupt)
            }
            controlStatistics.controlAnnounceAcks += UInt64(outcome.announceAcks)
            controlStatistics.controlRefused += UInt64(outcome.refused)
            controlStatistics.controlMalformed += UInt64(outcome.malformed)
            guard outcome.completed > 0, (try? control.queue.needsNotification()) ?? true else { return (nil, nil) }
            return (nil, control.interrupt)
        }
        if let failure {
            interrupt?.deviceNeedsReset(because: failure)
        } else {
            interrupt?.signalUsedBuffer(queue: NetControlQueue.queueIndex)
        }
    }

    public func reset() {
        lock.withLock {
            controlLock.withLock {
                control = nil
                announcing = false
            }
            guard let active = activation else { return }
            activation = nil
            inflightRegion = nil
            guard let frontend else { return }
            do {
                if backendFeatures & VhostUserFeature.protocolFeatures != 0 {
                    for (index, _) in active.queues { try frontend.setVringEnable(queue: index, enabled: false) }
                }
                for (index, _) in active.queues { ringBases[index] = try frontend.getVringBase(queue: index) }
            } catch {
                lastErrorValue = error
            }
        }
    }

    // MARK: Migration

    /// Whether the backend can log the guest pages it writes (VHOST_F_LOG_ALL with LOG_SHMFD).
    public var supportsDirtyLog: Bool {
        lock.withLock {
            backendFeatures & VhostUserFeature.logAll != 0 && protocolFeatures & VhostUserProtocolFeature.logSharedMemory != 0
        }
    }

    /// Starts (`fd` given) or stops (nil) the backend's dirty logging into `fd` (`size` bytes: one bit per
    /// 4 KiB guest page), used-ring writes included; the rings keep running.
    public func setDirtyLog(_ fd: FileDescriptor?, size: UInt64) throws {
        try lock.withLock {
            dirtyLog = fd.map { ($0, size) }
            guard let frontend, let activation else { return }
            guard backendFeatures & VhostUserFeature.logAll != 0, protocolFeatures & VhostUserProtocolFeature.logSharedMemory != 0 else {
                throw VhostUserError.deviceError("the backend cannot log dirty pages (no VHOST_F_LOG_ALL or LOG_SHMFD)")
            }
            let usesProtocolFeatures = backendFeatures & VhostUserFeature.protocolFeatures != 0
            if let fd { try frontend.setLogBase(size: size, offset: 0, fileDescriptor: fd) }
            try frontend.setFeatures(backendFeatures(activation.features) | (usesProtocolFeatures ? VhostUserFeature.protocolFeatures : 0)
                                     | (fd != nil ? VhostUserFeature.logAll : 0))
            for (index, state) in activation.queues {
                try frontend.setVringAddress(try VhostUserDevice.vringAddress(index, state, activation.memory, logging: fd != nil))
            }
        }
    }

    /// Stops the rings in the backend (GET_VRING_BASE: it finishes the requests it holds) and returns
    /// each queue's next avail index; the connection stays, for `resumeAfterSuspend` or the end.
    public func suspendForMigration() throws -> [Int: UInt16]? {
        try lock.withLock {
            guard let frontend, let activation else { return [:] }
            var bases: [Int: UInt16] = [:]
            if backendFeatures & VhostUserFeature.protocolFeatures != 0 {
                for (index, _) in activation.queues { try frontend.setVringEnable(queue: index, enabled: false) }
            }
            for (index, _) in activation.queues { bases[index] = try frontend.getVringBase(queue: index) }
            suspendedBases = bases
            // The control queue runs here (on vCPU threads, which are stopped): its position is ours.
            if let queue = controlLock.withLock({ control?.queue }) { bases[queue.index] = queue.nextAvail }
            return bases
        }
    }

    /// Restarts rings stopped by `suspendForMigration` where they stopped (a cancelled migration).
    public func resumeAfterSuspend() throws {
        try lock.withLock {
            guard let bases = suspendedBases, let frontend, let activation else { return }
            suspendedBases = nil
            var queues = activation.queues
            for i in queues.indices { queues[i].state.nextAvail = bases[queues[i].index] ?? queues[i].state.nextAvail }
            try start(frontend, memory: activation.memory, queues: queues, features: activation.features,
                      interrupt: activation.interrupt, eventFDs: activation.eventFDs)
        }
    }

    // MARK: Address translation

    /// The memory table of `memory`: every region must be backed by a shareable file (a memfd).
    static func memoryTable(_ memory: GuestMemory) throws -> ([VhostUserMemoryRegion], [FileDescriptor]) {
        guard memory.regions.count <= VhostUserCodec.maxRegions else {
            throw VhostUserError.badRegionCount(count: UInt32(memory.regions.count), maximum: VhostUserCodec.maxRegions)
        }
        var regions: [VhostUserMemoryRegion] = []
        var fds: [FileDescriptor] = []
        for region in memory.regions {
            guard let backing = region.backing else { throw VhostUserError.memoryNotShareable(guestBase: region.guestBase) }
            regions.append(VhostUserMemoryRegion(guestAddress: region.guestBase, size: region.size,
                                                 userAddress: UInt64(UInt(bitPattern: region.hostBase)),
                                                 mmapOffset: region.backingOffset))
            fds.append(backing)
        }
        return (regions, fds)
    }

    /// SET_VRING_ADDR for queue `index`: the rings at the VMM's addresses; with `logging`, used-ring
    /// writes logged at the used ring's guest-physical address.
    static func vringAddress(_ index: Int, _ state: VirtqueueState, _ memory: GuestMemory, logging: Bool) throws -> VhostUserVringAddress {
        VhostUserVringAddress(
            index: UInt32(index), flags: logging ? VhostUserVringAddress.flagLog : 0,
            descriptor: try userAddress(memory, state.descriptorTable, queue: index, ring: "descriptor table"),
            used: try userAddress(memory, state.deviceArea, queue: index, ring: "used ring"),
            available: try userAddress(memory, state.driverArea, queue: index, ring: "avail ring"),
            log: state.deviceArea)
    }

    /// The VMM's host address of guest-physical `address`.
    static func userAddress(_ memory: GuestMemory, _ address: UInt64, queue: Int, ring: String) throws -> UInt64 {
        for region in memory.regions where address >= region.guestBase && address - region.guestBase < region.size {
            return UInt64(UInt(bitPattern: region.hostBase)) + (address - region.guestBase)
        }
        throw VhostUserError.deviceError("queue \(queue) \(ring) at guest 0x\(String(address, radix: 16)) is outside guest RAM")
    }
}

import CGodwit
import GodwitSystem
import GuestMemory
import Virtio
#if canImport(Glibc)
import Glibc
#endif

/// The call and error eventfds of one connection's rings: the `VirtioInterrupt` its device signals.
///
/// Thread-safe: devices signal from whichever thread completes a request, while the connection's thread
/// replaces descriptors (QEMU swaps call fds at run time when it masks interrupts).
final class VhostUserRingSignals: VirtioInterrupt, @unchecked Sendable {
    private let lock = Lock()
    private var calls: [FileDescriptor?]
    private var errors: [FileDescriptor?]
    private let onNeedsReset: (Error) -> Void

    init(queueCount: Int, onNeedsReset: @escaping (Error) -> Void) {
        calls = Array(repeating: nil, count: queueCount)
        errors = Array(repeating: nil, count: queueCount)
        self.onNeedsReset = onNeedsReset
    }

    func setCall(_ queue: Int, _ fd: FileDescriptor?) { lock.withLock { calls[queue] = fd } }
    func setError(_ queue: Int, _ fd: FileDescriptor?) { lock.withLock { errors[queue] = fd } }

    func clear() {
        lock.withLock {
            for i in calls.indices { calls[i] = nil }
            for i in errors.indices { errors[i] = nil }
        }
    }

    private static func poke(_ fd: FileDescriptor?) {
        guard let fd else { return }
        var one: UInt64 = 1
        // A full counter (EAGAIN) still means "signalled"; the descriptor is non-blocking.
        _ = withUnsafeBytes(of: &one) { Glibc.write(fd.rawValue, $0.baseAddress, 8) }
    }

    func signalUsedBuffer(queue: Int) {
        lock.withLock {
            guard queue >= 0, queue < calls.count else { return }
            VhostUserRingSignals.poke(calls[queue])
        }
    }

    func signalConfigChange() {
        // Telling the frontend needs the backend request channel (BACKEND_REQ), which is not offered.
    }

    func deviceNeedsReset(because error: Error) {
        lock.withLock { for fd in errors { VhostUserRingSignals.poke(fd) } }
        onNeedsReset(error)
    }
}

/// A value the connection's thread sets and the threads that complete requests read: the dirty log
/// (set while the frontend asks for VHOST_F_LOG_ALL with a log base) and each ring's used-ring log
/// address (SET_VRING_ADDR with VHOST_VRING_F_LOG). Both change while the rings run, so completions
/// read them each time rather than capturing them when a ring starts.
final class VhostUserShared<Value>: @unchecked Sendable {
    private let lock = Lock()
    private var stored: Value

    init(_ value: Value) { stored = value }

    var value: Value {
        get { lock.withLock { stored } }
        set { lock.withLock { stored = newValue } }
    }
}

/// One frontend connection of a `VhostUserBackend`: the protocol state machine and the rings, on one
/// thread with its own event loop.
final class VhostUserConnection: @unchecked Sendable {
    /// What the frontend told us about one ring.
    struct Ring {
        var size: UInt16 = 0
        var address: VhostUserVringAddress?
        /// The next avail index: set by SET_VRING_BASE, saved when the ring stops.
        var base: UInt16 = 0
        var kick: FileDescriptor?
        /// Started by SET_VRING_KICK, stopped by GET_VRING_BASE.
        var started = false
        var enabled = false
    }

    let id: Int
    let channel: VhostUserChannel
    let device: VirtioDevice
    private weak var backend: VhostUserBackend?
    private let loop: EventLoop
    private var thread: VhostUserThread?
    private let signals: VhostUserRingSignals

    // Protocol state: touched only on the connection's thread.
    private var features: UInt64 = 0
    private var protocolFeatures: UInt64 = 0
    private var memory: GuestMemory?
    private var table: [VhostUserMemoryRegion] = []
    private var rings: [Ring]
    /// Each ring's used-ring log address, for writes a device completes on another thread.
    private let usedLogs: [VhostUserShared<UInt64?>]
    /// The queues the device runs on (by index), empty while it is not activated.
    private var active: [Int: Virtqueue] = [:]
    private var dirtyLog: VhostUserDirtyLog? { didSet { updateLogSink() } }
    private var logNotifier: FileDescriptor?
    /// `dirtyLog` while logging is on, for writes a device completes on another thread.
    private let logSink = VhostUserShared<VhostUserDirtyLog?>(nil)
    /// The inflight-tracking region (GET/SET_INFLIGHT_FD) and the queue geometry it was made for.
    private var inflight: (mapping: MemoryMapping, queueCount: Int, queueSize: UInt16)?
    /// Why the connection is closing (nil: the peer closed it).
    private var closeReason: Error?
    private var closing = false
    private var warnedUnsealed = false

    init(id: Int, channel: VhostUserChannel, device: VirtioDevice, backend: VhostUserBackend) throws {
        self.id = id
        self.channel = channel
        self.device = device
        self.backend = backend
        loop = try vhostSystem { () throws(SystemError) in try EventLoop() }
        rings = Array(repeating: Ring(), count: device.queueCount)
        usedLogs = (0..<device.queueCount).map { _ in VhostUserShared<UInt64?>(nil) }
        let log: (String) -> Void = { [weak backend] message in backend?.log("connection \(id): \(message)") }
        signals = VhostUserRingSignals(queueCount: device.queueCount) { error in
            log("device stopped and needs a reset: \(error)")
        }
    }

    private func log(_ message: String) { backend?.log("connection \(id): \(message)") }

    private func updateLogSink() {
        logSink.value = features & VhostUserFeature.logAll != 0 ? dirtyLog : nil
    }

    func start() throws {
        try vhostSystem { () throws(SystemError) in
            try loop.add(channel.socket) { [weak self] _ in self?.socketReadable() }
        }
        thread = try VhostUserThread(name: "vu-conn-\(id)") { [self] in
            loop.run()
            cleanUp()
            backend?.connectionEnded(self, error: closeReason)
        }
    }

    /// Asks the connection to close (from any thread); `join()` waits for it.
    func requestClose() {
        channel.shutdown()
        loop.stop()
    }

    func join() { thread?.join() }

    /// Ends the loop; called on the connection's thread.
    private func close(_ error: Error?) {
        guard !closing else { return }
        closing = true
        closeReason = error
        loop.stop()
    }

    private func cleanUp() {
        deactivate()
        for i in rings.indices {
            if let kick = rings[i].kick { loop.remove(kick) }
            rings[i].kick = nil
        }
        loop.remove(channel.socket)
        signals.clear()
        channel.shutdown()
        channel.socket.close()
        memory = nil
        dirtyLog = nil
        inflight = nil
    }

    // MARK: Messages

    private func socketReadable() {
        guard !closing else { return }
        let message: VhostUserMessage
        do {
            message = try channel.receive(direction: .request, timeout: 0.5)
        } catch VhostUserError.connectionClosed {
            close(nil)
            return
        } catch VhostUserError.timedOut(let operation, _) where operation == "receive" {
            return  // spurious wake-up
        } catch {
            close(error)
            return
        }
        let request = message.request
        let wantsAck = message.needsReply && !request.hasExplicitReply
            && protocolFeatures & VhostUserProtocolFeature.replyAck != 0
        do {
            let reply = try handle(message)
            if let reply {
                try channel.send(reply)
            } else if wantsAck {
                try channel.send(.reply(to: request, .u64(0)))
            }
        } catch {
            if wantsAck { try? channel.send(.reply(to: request, .u64(1))) }
            close(error)
        }
    }

    private func queueIndex(_ raw: UInt32, _ request: VhostUserRequest) throws -> Int {
        guard Int(raw) < rings.count else {
            throw VhostUserError.badQueueIndex(request: request.rawValue, index: raw, queueCount: rings.count)
        }
        return Int(raw)
    }

    private func violation(_ request: VhostUserRequest, _ reason: String) -> VhostUserError {
        .protocolViolation(request: request.rawValue, reason: reason)
    }

    /// The features offered in GET_FEATURES.
    private var offeredFeatures: UInt64 {
        device.deviceFeatures | VhostUserFeature.logAll | VhostUserFeature.protocolFeatures
    }

    /// Handles one request; returns the reply to send, if the request has one.
    private func handle(_ message: VhostUserMessage) throws -> VhostUserMessage? {
        let request = message.request
        let fds = message.fileDescriptors
        switch (request, message.payload) {
        case (.getFeatures, _):
            return .reply(to: request, .u64(offeredFeatures))

        case let (.setFeatures, .u64(value)):
            guard value & ~offeredFeatures == 0 else {
                throw violation(request, "features 0x\(String(value, radix: 16)) include bits not offered (0x\(String(offeredFeatures, radix: 16)))")
            }
            let old = features
            features = value
            updateLogSink()
            if value & VhostUserFeature.protocolFeatures == 0 {
                // Without protocol features rings are enabled from the start.
                for i in rings.indices { rings[i].enabled = true }
            }
            if !active.isEmpty && (old ^ value) & ~VhostUserFeature.logAll != 0 { deactivate() }
            try reconcile()
            return nil

        case (.getProtocolFeatures, _):
            return .reply(to: request, .u64(VhostUserBackend.offeredProtocolFeatures))

        case let (.setProtocolFeatures, .u64(value)):
            guard value & ~VhostUserBackend.offeredProtocolFeatures == 0 else {
                throw violation(request, "protocol features 0x\(String(value, radix: 16)) include bits not offered")
            }
            protocolFeatures = value
            return nil

        case (.setOwner, _):
            return nil

        case (.resetOwner, _):
            // Deprecated; the spec recommends disabling every ring.
            deactivate()
            for i in rings.indices {
                if let kick = rings[i].kick { loop.remove(kick) }
                rings[i] = Ring()
                usedLogs[i].value = nil
            }
            return nil

        case let (.setMemTable, .memoryTable(regions)):
            try setMemoryTable(regions, fds)
            return nil

        case let (.setLogBase, .log(description)):
            let fileSize = try VhostUserConnection.fileSize(fds[0])
            guard description.mmapOffset <= fileSize, description.mmapSize <= fileSize - description.mmapOffset else {
                throw violation(request, "log offset \(description.mmapOffset) size \(description.mmapSize) runs past the end of its file (\(fileSize) bytes)")
            }
            let log = try VhostUserDirtyLog(fd: fds[0], size: description.mmapSize, offset: description.mmapOffset)
            log.setNotifier(logNotifier)
            dirtyLog = log
            return .reply(to: request, .u64(0))

        case (.setLogFD, _):
            try? fds[0].setNonBlocking(true)
            logNotifier = fds[0]
            dirtyLog?.setNotifier(fds[0])
            return nil

        case let (.setVringNum, .vringState(state)):
            let i = try queueIndex(state.index, request)
            let maximum = min(UInt32(device.maxQueueSize), 32768)
            guard state.num > 0, state.num <= maximum, state.num & (state.num - 1) == 0 else {
                throw violation(request, "queue \(i) size \(state.num) is not a power of two between 1 and \(maximum)")
            }
            rings[i].size = UInt16(state.num)
            if active[i] != nil { deactivate() }
            try reconcile()
            return nil

        case let (.setVringAddr, .vringAddress(address)):
            let i = try queueIndex(address.index, request)
            guard address.flags & ~VhostUserVringAddress.flagLog == 0 else {
                throw violation(request, "unknown vring flags 0x\(String(address.flags, radix: 16))")
            }
            let old = rings[i].address
            rings[i].address = address
            usedLogs[i].value = address.flags & VhostUserVringAddress.flagLog != 0 ? address.log : nil
            let sameRings = old.map { $0.descriptor == address.descriptor && $0.used == address.used
                && $0.available == address.available } ?? false
            // Switching used-ring logging on or off must not stop a running ring.
            if active[i] != nil && !sameRings { deactivate() }
            try reconcile()
            return nil

        case let (.setVringBase, .vringState(state)):
            let i = try queueIndex(state.index, request)
            guard state.num <= 0xFFFF else { throw violation(request, "queue \(i) base \(state.num) is above 65535") }
            rings[i].base = UInt16(state.num)
            if active[i] != nil { deactivate() }
            try reconcile()
            return nil

        case let (.getVringBase, .vringState(state)):
            let i = try queueIndex(state.index, request)
            // Stops the ring: the device finishes what it is doing (its reset drains), positions are saved.
            if active[i] != nil { deactivate() }
            rings[i].started = false
            if let kick = rings[i].kick { loop.remove(kick) }
            rings[i].kick = nil
            let base = rings[i].base
            try reconcile()
            return .reply(to: request, .vringState(VhostUserVringState(index: state.index, num: UInt32(base))))

        case let (.setVringKick, .u64(value)):
            let i = try queueIndex(UInt32(value & VhostUserCodec.vringIndexMask), request)
            if let old = rings[i].kick { loop.remove(old) }
            rings[i].kick = nil
            if let fd = fds.first {
                try? fd.setNonBlocking(true)
                try vhostSystem { () throws(SystemError) in
                    try loop.add(fd) { [weak self] _ in self?.kicked(i, fd) }
                }
                rings[i].kick = fd
            } else {
                log("queue \(i) has no kick descriptor (polling is not supported): it runs only when restarted")
            }
            rings[i].started = true
            try reconcile()
            return nil

        case let (.setVringCall, .u64(value)):
            let i = try queueIndex(UInt32(value & VhostUserCodec.vringIndexMask), request)
            if let fd = fds.first { try? fd.setNonBlocking(true) }
            signals.setCall(i, fds.first)
            // One interrupt now, as libvhost-user does: one lost while the frontend reconnected or switched
            // descriptors would leave the driver waiting for ever; a spurious one costs nothing.
            signals.signalUsedBuffer(queue: i)
            return nil

        case let (.setVringErr, .u64(value)):
            let i = try queueIndex(UInt32(value & VhostUserCodec.vringIndexMask), request)
            if let fd = fds.first { try? fd.setNonBlocking(true) }
            signals.setError(i, fds.first)
            return nil

        case (.getQueueNum, _):
            return .reply(to: request, .u64(UInt64(rings.count)))

        case let (.setVringEnable, .vringState(state)):
            let i = try queueIndex(state.index, request)
            guard state.num <= 1 else { throw violation(request, "queue \(i) enable value \(state.num) is not 0 or 1") }
            rings[i].enabled = state.num == 1
            try reconcile()
            return nil

        case let (.getConfig, .config(config)):
            var bytes = [UInt8](repeating: 0, count: config.bytes.count)
            bytes.withUnsafeMutableBytes { device.readConfig(offset: Int(config.offset), into: $0) }
            return .reply(to: request, .config(VhostUserConfigSpace(offset: config.offset, flags: config.flags, bytes: bytes)))

        case let (.setConfig, .config(config)):
            config.bytes.withUnsafeBytes { device.writeConfig(offset: Int(config.offset), from: $0) }
            return nil

        case let (.getInflightFD, .inflight(description)):
            // A new region for the frontend to keep: it hands it back (SET_INFLIGHT_FD) after a reconnect.
            let (count, size) = try inflightGeometry(description, request)
            let length = count * VirtqueueInflight.regionSize(queueSize: size)
            let (fd, mapping) = try vhostSystem { () throws(SystemError) -> (FileDescriptor, MemoryMapping) in
                let fd = try MemFD.create(name: "godwit-inflight", size: UInt64(length))
                return (fd, try MemoryMapping(size: length, fd: fd))
            }
            deactivate()
            inflight = (mapping, count, size)
            try reconcile()
            return .reply(to: request, .inflight(VhostUserInflightDescription(
                mmapSize: UInt64(length), mmapOffset: 0, queueCount: UInt16(count), queueSize: size)), fileDescriptors: [fd])

        case let (.setInflightFD, .inflight(description)):
            let (count, size) = try inflightGeometry(description, request)
            let length = count * VirtqueueInflight.regionSize(queueSize: size)
            let fileSize = try VhostUserConnection.fileSize(fds[0])
            guard description.mmapSize >= UInt64(length), description.mmapOffset <= fileSize,
                  description.mmapSize <= fileSize - description.mmapOffset, description.mmapOffset % UInt64(getpagesize()) == 0,
                  description.mmapSize <= UInt64(Int.max) else {
                throw violation(request, "inflight region offset \(description.mmapOffset) size \(description.mmapSize) does not hold \(count) queue(s) of \(size) inside its file (\(fileSize) bytes)")
            }
            let mapping = try vhostSystem { () throws(SystemError) in
                try MemoryMapping(size: Int(description.mmapSize), fd: fds[0], offset: Int(description.mmapOffset))
            }
            deactivate()
            inflight = (mapping, count, size)
            try reconcile()
            return nil

        default:
            throw VhostUserError.unexpectedMessage(request: request.rawValue, reason: "payload \(message.payload) does not fit")
        }
    }

    private func setMemoryTable(_ regions: [VhostUserMemoryRegion], _ fds: [FileDescriptor]) throws {
        // User ranges must not wrap or overlap: ring addresses are translated through them.
        for (i, r) in regions.enumerated() {
            let (_, wrapsUser) = r.userAddress.addingReportingOverflow(r.size)
            let (_, wrapsGuest) = r.guestAddress.addingReportingOverflow(r.size)
            let (_, wrapsOffset) = r.mmapOffset.addingReportingOverflow(r.size)
            guard r.size > 0, !wrapsUser, !wrapsGuest, !wrapsOffset, r.size <= UInt64(Int.max),
                  r.mmapOffset <= UInt64(Int64.max) else {
                throw VhostUserError.badMemoryTable(reason: "region \(i) (guest 0x\(String(r.guestAddress, radix: 16)) size 0x\(String(r.size, radix: 16))) is empty or wraps")
            }
            for other in regions[..<i] where r.userAddress < other.userAddress &+ other.size
                && other.userAddress < r.userAddress &+ r.size {
                throw VhostUserError.badMemoryTable(reason: "region \(i) user range overlaps another region")
            }
        }
        // Touching a mapping past the end of its file raises SIGBUS and would kill the whole domain:
        // every region must lie inside its file as the file is now. (A frontend that shrinks the file
        // later can still do that; its memfd should be sealed against shrinking, as QEMU's are.)
        for (i, (region, fd)) in zip(regions, fds).enumerated() {
            let size = try VhostUserConnection.fileSize(fd)
            guard region.mmapOffset <= size, region.size <= size - region.mmapOffset else {
                throw VhostUserError.badMemoryTable(reason: "region \(i) (offset 0x\(String(region.mmapOffset, radix: 16)) size 0x\(String(region.size, radix: 16))) runs past the end of its file (\(size) bytes)")
            }
        }
        // A file that can still shrink is a way to crash the domain later (see above).
        let unsealed = fds.indices.filter { !VhostUserSharedMemory.isSealedAgainstShrinking(fds[$0]) }
        if let first = unsealed.first {
            if backend?.requireSealedMemory == true {
                throw VhostUserError.badMemoryTable(reason: "region \(first)'s file is not sealed against shrinking (F_SEAL_SHRINK)")
            }
            if !warnedUnsealed {
                warnedUnsealed = true
                log("warning: guest memory is not sealed against shrinking; a frontend that truncates it can crash this domain")
            }
        }
        let mapped: GuestMemory
        do {
            mapped = try GuestMemory.mapping(regions: zip(regions, fds).map {
                (base: $0.guestAddress, size: $0.size, fd: $1, offset: $0.mmapOffset)
            })
        } catch {
            throw VhostUserError.badMemoryTable(reason: "\(error)")
        }
        deactivate()
        memory = mapped
        table = regions
        try reconcile()
    }

    /// The queue count and size of an inflight description, checked against the device.
    private func inflightGeometry(_ description: VhostUserInflightDescription, _ request: VhostUserRequest) throws -> (Int, UInt16) {
        let count = Int(description.queueCount), size = description.queueSize
        guard count >= 1, count <= rings.count, size >= 1, size <= 32768 else {
            throw violation(request, "inflight region for \(count) queue(s) of \(size) entries does not fit a device of \(rings.count) queue(s)")
        }
        return (count, size)
    }

    /// The size of a regular file (a memfd); anything else cannot be mapped safely.
    static func fileSize(_ fd: FileDescriptor) throws -> UInt64 {
        var st = stat()
        guard fstat(fd.rawValue, &st) == 0 else {
            throw VhostUserError.system(SystemError(operation: "fstat", errno: godwit_errno(), context: "a passed memory descriptor"))
        }
        guard (st.st_mode & S_IFMT) == S_IFREG else {
            throw VhostUserError.badMemoryTable(reason: "a passed memory descriptor is not a regular file or memfd")
        }
        return UInt64(st.st_size)
    }

    // MARK: Rings

    /// The guest-physical address of a frontend user address, through the memory table.
    private func guestAddress(user: UInt64) -> UInt64? {
        for region in table where user >= region.userAddress && user - region.userAddress < region.size {
            return region.guestAddress + (user - region.userAddress)
        }
        return nil
    }

    /// Stops the device (it drains what it is doing) and saves each queue's next avail index.
    private func deactivate() {
        guard !active.isEmpty else { return }
        device.reset()
        for (i, queue) in active { rings[i].base = queue.nextAvail }
        active = [:]
    }

    /// Activates the device on the rings that are started and enabled, when that set changed.
    private func reconcile() throws {
        guard let memory else { return }
        let wanted = rings.indices.filter { i in
            rings[i].started && rings[i].enabled && rings[i].address != nil && rings[i].size > 0
        }
        if Set(wanted) == Set(active.keys) { return }
        deactivate()
        guard !wanted.isEmpty else { return }
        let guestFeatures = features & ~VhostUserFeature.transportOnly
        var queues: [Virtqueue] = []
        for i in wanted {
            // In bounds: wanted only holds rings with an address.
            let address = rings[i].address!
            func translate(_ user: UInt64, _ name: String) throws -> UInt64 {
                guard let gpa = guestAddress(user: user) else {
                    throw VhostUserError.addressNotMapped(queue: i, ring: name, address: user)
                }
                return gpa
            }
            let descriptor = try translate(address.descriptor, "descriptor table")
            let available = try translate(address.available, "avail ring")
            let used = try translate(address.used, "used ring")
            do {
                // The next used index is the one in guest memory (the spec: the backend reads it there).
                let usedIndex = try memory.load(UInt16.self, at: used &+ 2)
                let queue = try Virtqueue(index: i, memory: memory, size: rings[i].size, descriptorTable: descriptor,
                                          driverArea: available, deviceArea: used, features: guestFeatures,
                                          maxSize: device.maxQueueSize, nextAvail: rings[i].base, nextUsed: usedIndex)
                // Writes a device completes later (asynchronous I/O) reach the dirty log when they land.
                let sink = logSink
                // Read at each completion: logging is switched on (SET_VRING_ADDR) while the ring runs.
                let usedLog = usedLogs[i]
                let usedBytes = 6 + 8 * UInt64(rings[i].size)
                queue.writeObserver = { segments in
                    guard let log = sink.value else { return }
                    for segment in segments { log.mark(address: segment.address, length: UInt64(segment.length)) }
                    if let address = usedLog.value { log.mark(address: address, length: usedBytes) }
                    log.notify()
                }
                if let inflight, i < inflight.queueCount, rings[i].size <= inflight.queueSize {
                    let stride = VirtqueueInflight.regionSize(queueSize: inflight.queueSize)
                    // In bounds: the mapping holds queueCount regions of `stride` bytes (checked when it was set).
                    let tracker = try VirtqueueInflight(base: inflight.mapping.base + i * stride, length: stride,
                                                        queueSize: rings[i].size, owner: inflight.mapping)
                    let resubmitted = try queue.resumeInflight(tracker)
                    if resubmitted > 0 { log("queue \(i): resubmitting \(resubmitted) request(s) left in flight") }
                }
                queues.append(queue)
            } catch {
                throw VhostUserError.deviceError("queue \(i): \(error)")
            }
        }
        do {
            try device.activate(memory: memory, queues: queues, features: guestFeatures, interrupt: signals)
        } catch VirtioError.queueMissing {
            return  // the device needs more rings; it starts when they are there
        } catch {
            throw VhostUserError.deviceError("activation failed: \(error)")
        }
        for queue in queues { active[queue.index] = queue }
        // Requests made while the ring was stopped (or before a reconnect) are processed now.
        for queue in queues { process(queue.index) }
    }

    private func kicked(_ index: Int, _ fd: FileDescriptor) {
        guard !closing else { return }
        var value: UInt64 = 0
        let n = withUnsafeMutableBytes(of: &value) { Glibc.read(fd.rawValue, $0.baseAddress, 8) }
        if n == 0 || (n < 0 && godwit_errno() != EAGAIN && godwit_errno() != EINTR) {
            // Not an eventfd that stays quiet once read: it would spin the loop.
            close(VhostUserError.protocolViolation(request: VhostUserRequest.setVringKick.rawValue,
                                                   reason: "queue \(index) kick descriptor is not a usable eventfd"))
            return
        }
        process(index)
        pollAfterBatch(index)
    }

    /// The longest a connection's thread polls without going back to its event loop (control messages
    /// wait at most this long).
    static let maxPollSeconds = 0.002

    /// Adaptive polling after a kick: keeps processing ring `index` until nothing was ready for the
    /// backend's poll window (or `maxPollSeconds` passed); not while the frontend logs dirty pages
    /// (`process` does the logging of what completes synchronously).
    private func pollAfterBatch(_ index: Int) {
        guard let window = backend?.pollWindowSeconds, window > 0, active[index] != nil,
              features & VhostUserFeature.logAll == 0 else { return }
        device.pollingStarted(index)
        let start = VhostUserSocket.now()
        var lastWork = start
        while !closing {
            let now = VhostUserSocket.now()
            if device.poll(index) {
                lastWork = now
            } else if now - lastWork > window {
                break
            }
            if now - start > VhostUserConnection.maxPollSeconds { break }
        }
        device.pollingStopped(index)
    }

    /// Runs the device on queue `index`, logging the guest pages it writes when the frontend asked.
    private func process(_ index: Int) {
        guard let queue = active[index] else { return }
        guard let log = dirtyLog, features & VhostUserFeature.logAll != 0, let memory else {
            device.queueNotified(index)
            return
        }
        // The chains the device will take, read before it completes them (once used, the driver may
        // reuse their descriptors).
        let start = queue.nextAvail
        var chains: [DescriptorChain?] = []
        if let pending = try? queue.pendingCount() {
            for k in 0..<pending { chains.append(chain(queue, memory, slot: start &+ k)) }
        }
        device.queueNotified(index)
        let consumed = queue.nextAvail &- start
        for k in 0..<consumed {
            // Chains the driver added while the device ran are read after their completion: best effort,
            // as the driver may already have reused their descriptors.
            let parsed = Int(k) < chains.count ? chains[Int(k)] : chain(queue, memory, slot: start &+ k)
            for segment in parsed?.writable ?? [] { log.mark(address: segment.address, length: UInt64(segment.length)) }
        }
        if consumed > 0 {
            if let address = rings[index].address, address.flags & VhostUserVringAddress.flagLog != 0 {
                log.mark(address: address.log, length: 6 + 8 * UInt64(queue.size))
            }
            log.notify()
        }
    }

    private func chain(_ queue: Virtqueue, _ memory: GuestMemory, slot: UInt16) -> DescriptorChain? {
        let entry = queue.driverArea &+ 4 &+ 2 &* UInt64(slot % queue.size)
        guard let head = try? memory.load(UInt16.self, at: entry) else { return nil }
        return try? DescriptorChain.parse(memory: memory, descriptorTable: queue.descriptorTable, queueSize: queue.size,
                                          head: head, indirectAllowed: queue.indirectDescriptors,
                                          maxBytes: queue.maxChainBytes)
    }
}

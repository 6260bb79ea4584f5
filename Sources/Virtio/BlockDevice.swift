import GodwitSystem
import GuestMemory

/// Counters of one virtio-blk device, for statistics and tests.
public struct BlockDeviceStatistics: Equatable, Codable, Sendable {
    /// Requests completed (with any status).
    public var requests: UInt64 = 0
    public var reads: UInt64 = 0
    public var writes: UInt64 = 0
    public var flushes: UInt64 = 0
    public var discards: UInt64 = 0
    public var writeZeroes: UInt64 = 0
    public var bytesRead: UInt64 = 0
    public var bytesWritten: UInt64 = 0
    /// Requests completed with VIRTIO_BLK_S_IOERR.
    public var errors: UInt64 = 0
    /// Requests completed with VIRTIO_BLK_S_UNSUPP.
    public var unsupported: UInt64 = 0
    /// Times the device stopped and asked for a reset (malformed chain or ring).
    public var resetsNeeded: UInt64 = 0

    public init() {}
}

/// A virtio-blk device (device ID 2, virtio 1.2 §5.2) over a `BlockBackend`, with one request queue.
///
/// Each notification takes every available request. Reads and writes the backend can run
/// asynchronously (`BlockBackend.submitAsync`: aligned O_DIRECT on native AIO) are started together
/// and completed, in whatever order they finish, from the backend's completion thread; so are flush,
/// discard and write-zeroes when the backend takes them (`acceptsAsyncCommands`: a routed disk). The
/// others (GET_ID, unaligned or buffered I/O, commands the backend does not take) are done at once. Used ring
/// entries go out in completion order, each after its status byte, with one interrupt per batch when
/// the driver asks for it. While requests are in flight the driver is asked not to notify: each
/// completion batch takes what was added meanwhile. A chain it cannot answer stops the device until reset
/// (DEVICE_NEEDS_RESET through `VirtioInterrupt.deviceNeedsReset`); requests already started still
/// complete. `reset`, `suspendForMigration` and `replaceBackend` wait until nothing is in flight.
public final class BlockDevice: VirtioDevice, AsyncIOHandler, @unchecked Sendable {
    /// virtio-blk feature bits.
    public enum Feature {
        public static let sizeMax: UInt64 = 1 << 1
        public static let segMax: UInt64 = 1 << 2
        public static let geometry: UInt64 = 1 << 4
        public static let readOnly: UInt64 = 1 << 5
        public static let blockSize: UInt64 = 1 << 6
        public static let flush: UInt64 = 1 << 9
        public static let topology: UInt64 = 1 << 10
        public static let configWCE: UInt64 = 1 << 11
        public static let multiQueue: UInt64 = 1 << 12
        public static let discard: UInt64 = 1 << 13
        public static let writeZeroes: UInt64 = 1 << 14
    }

    /// Request types (virtio_blk_outhdr.type).
    public enum RequestType {
        public static let read: UInt32 = 0
        public static let write: UInt32 = 1
        public static let flush: UInt32 = 4
        public static let getID: UInt32 = 8
        public static let discard: UInt32 = 11
        public static let writeZeroes: UInt32 = 13
    }

    /// Request status values (the last writable byte of a request).
    public enum Status {
        public static let ok: UInt8 = 0
        public static let ioError: UInt8 = 1
        public static let unsupported: UInt8 = 2
    }

    public static let sectorSize: UInt64 = 512
    /// VIRTIO_BLK_ID_BYTES.
    public static let idBytes = 20
    /// VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP.
    public static let writeZeroesFlagUnmap: UInt32 = 1
    public static let maxDiscardSectors: UInt32 = 0x3F_FFFF
    public static let maxDiscardSegments: UInt32 = 32
    public static let maxWriteZeroesSectors: UInt32 = 0x3F_FFFF
    public static let maxWriteZeroesSegments: UInt32 = 32
    /// The largest request (data bytes plus header and status) accepted in one chain.
    public static let maxRequestBytes: UInt64 = 256 << 20
    /// The size of the configuration space (struct virtio_blk_config up to write_zeroes_may_unmap + padding).
    public static let configSize = 60

    /// The image behind the device; replaced by `replaceBackend(_:)` (requests use it under `lock`).
    public private(set) var backend: BlockBackend
    /// The 20-byte serial returned by GET_ID (zero-padded).
    public let serial: [UInt8]
    public let deviceID: UInt32 = VirtioDeviceType.block
    public let queueCount = 1
    public let maxQueueSize: UInt16
    public let deviceFeatures: UInt64
    private var config: [UInt8]

    /// Guards everything below; its condition wakes those waiting for requests in flight to drain.
    private let lock = Condition()
    private var queue: Virtqueue?
    private var memory: GuestMemory?
    private var interrupt: VirtioInterrupt?
    private var features: UInt64 = 0
    private var broken = false
    private var stats = BlockDeviceStatistics()

    /// A request started on the backend and not yet completed, by tag.
    private struct InFlightRequest {
        let chain: DescriptorChain
        let queue: Virtqueue
        let memory: GuestMemory
        let isWrite: Bool
        let length: UInt64
    }

    private var inFlight: [UInt64: InFlightRequest] = [:]
    private var nextTag: UInt64 = 0
    /// Completions added to the used ring since the last notification decision (the reaper's batch).
    private var completionsToSignal = false
    /// Callers waiting for the queue to drain (reset, backend swap): no new request starts meanwhile.
    private var quiescing = 0
    /// Between `suspendForMigration` and `resumeAfterSuspend`: no new request starts.
    private var suspended = false
    /// A notification arrived while quiescing or suspended: processed when that ends.
    private var missedNotification = false
    /// The most requests in flight at once so far (for statistics and tests).
    private var inFlightPeak = 0
    /// The backend put in polling mode by `pollingStarted` (the one to take out of it).
    private var pollingBackend: BlockBackend?

    /// Creates a device for `backend`. `serial` is truncated to 20 bytes; `maxQueueSize` must be a
    /// power of two of at least 4 (seg_max is `maxQueueSize - 2`).
    public init(backend: BlockBackend, serial: String = "", maxQueueSize: UInt16 = 256) {
        self.backend = backend
        self.serial = Array(Array(serial.utf8).prefix(BlockDevice.idBytes))
            + Array(repeating: 0, count: max(0, BlockDevice.idBytes - serial.utf8.count))
        self.maxQueueSize = max(maxQueueSize, 4)

        var features = VirtioFeature.version1 | VirtioFeature.eventIndex | VirtioFeature.indirectDescriptors
            | Feature.segMax | Feature.blockSize | Feature.flush
        if backend.readOnly {
            features |= Feature.readOnly
        } else {
            if backend.supportsDiscard { features |= Feature.discard }
            if backend.supportsWriteZeroes { features |= Feature.writeZeroes }
        }
        self.deviceFeatures = features

        var config = [UInt8](repeating: 0, count: BlockDevice.configSize)
        func put<T: FixedWidthInteger>(_ value: T, _ offset: Int) {
            withUnsafeBytes(of: value.littleEndian) { bytes in
                for (i, byte) in bytes.enumerated() { config[offset + i] = byte }
            }
        }
        put(backend.capacity / BlockDevice.sectorSize, 0)        // capacity
        put(UInt32(0), 8)                                        // size_max (not offered)
        put(UInt32(self.maxQueueSize - 2), 12)                   // seg_max
        put(UInt32(max(backend.blockSize, 512)), 20)             // blk_size
        put(UInt8(1), 32)                                        // writeback: FLUSH is offered
        put(UInt16(1), 34)                                       // num_queues
        put(BlockDevice.maxDiscardSectors, 36)
        put(BlockDevice.maxDiscardSegments, 40)
        put(UInt32(max(backend.blockSize, 512) / 512), 44)       // discard_sector_alignment
        put(BlockDevice.maxWriteZeroesSectors, 48)
        put(BlockDevice.maxWriteZeroesSegments, 52)
        put(UInt8(backend.supportsDiscard ? 1 : 0), 56)          // write_zeroes_may_unmap
        self.config = config
    }

    /// The counters so far.
    public var statistics: BlockDeviceStatistics { lock.withLock { stats } }

    /// Puts a new image behind the running device (Firecracker's `PATCH /drives`): later requests go
    /// to it, the capacity in config space follows it, and the driver gets a config-change interrupt.
    /// The new image must match the old one's read-only mode (the negotiated features cannot change).
    /// Requests started before the swap finish on the old image first.
    public func replaceBackend(_ newBackend: BlockBackend) throws {
        let (interrupt, missed): (VirtioInterrupt?, Bool) = try lock.withLock {
            guard newBackend.readOnly == backend.readOnly else {
                throw VirtioError.backendMismatch(reason: newBackend.readOnly ? "the new image is read-only, the device is not"
                                                                                 : "the device is read-only, the new image is not")
            }
            drainLocked()
            backend = newBackend
            withUnsafeBytes(of: (newBackend.capacity / BlockDevice.sectorSize).littleEndian) { bytes in
                for (i, byte) in bytes.enumerated() { config[i] = byte }
            }
            return (self.interrupt, takeMissedNotification())
        }
        interrupt?.signalConfigChange()
        if missed { queueNotified(0) }
    }

    /// Requests started on the backend and not completed yet.
    public var requestsInFlight: Int { lock.withLock { inFlight.count } }

    /// The most requests that were in flight at once.
    public var peakRequestsInFlight: Int { lock.withLock { inFlightPeak } }

    /// Waits until no request is in flight and the last completions' interrupt decision was made
    /// (requests keep starting meanwhile; for tests and statistics).
    public func waitUntilIdle() {
        lock.withLock { lock.wait { inFlight.isEmpty && !completionsToSignal } }
    }

    /// With the lock held: waits until every request in flight completed and its batch's notification
    /// decision was made; no request starts meanwhile.
    private func drainLocked() {
        quiescing += 1
        lock.wait { inFlight.isEmpty && !completionsToSignal }
        quiescing -= 1
    }

    private func takeMissedNotification() -> Bool {
        guard quiescing == 0, !suspended else { return false }
        let missed = missedNotification
        missedNotification = false
        return missed && queue != nil
    }

    /// True when the device stopped on a malformed chain and waits for a reset.
    public var needsReset: Bool { lock.withLock { broken } }

    /// The request queue's positions, when active (for migration).
    public var queueState: VirtqueueState? { lock.withLock { queue?.state } }

    // MARK: VirtioDevice

    public func readConfig(offset: Int, into data: UnsafeMutableRawBufferPointer) {
        let config = lock.withLock { self.config }
        for i in 0..<data.count {
            let (position, overflow) = offset.addingReportingOverflow(i)
            data[i] = !overflow && position >= 0 && position < config.count ? config[position] : 0
        }
    }

    public func writeConfig(offset: Int, from data: UnsafeRawBufferPointer) {
        // writeback is writable only with VIRTIO_BLK_F_CONFIG_WCE, which is not offered: nothing to write.
    }

    public func activate(memory: GuestMemory, queues: [Virtqueue], features: UInt64, interrupt: VirtioInterrupt) throws {
        guard let queue = queues.first(where: { $0.index == 0 }) else { throw VirtioError.queueMissing(queue: 0) }
        queue.maxChainBytes = BlockDevice.maxRequestBytes
        lock.withLock {
            self.queue = queue
            self.memory = memory
            self.interrupt = interrupt
            self.features = features
            self.broken = false
        }
    }

    /// Waits for the requests in flight (their completions reach the used ring), then forgets the queue.
    public func reset() {
        lock.withLock {
            drainLocked()
            queue = nil
            memory = nil
            interrupt = nil
            features = 0
            broken = false
            missedNotification = false
        }
    }

    /// Stops taking requests and waits until those in flight completed (like vhost-user's
    /// GET_VRING_BASE), so the queue's positions stand still; the transport's queue holds them.
    public func suspendForMigration() throws -> [Int: UInt16]? {
        lock.withLock {
            suspended = true
            drainLocked()
        }
        return nil
    }

    public func resumeAfterSuspend() throws {
        let missed = lock.withLock { () -> Bool in
            suspended = false
            return takeMissedNotification()
        }
        if missed { queueNotified(0) }
    }

    public func queueNotified(_ index: Int) {
        lock.withLock {
            guard index == 0, let queue, let memory, let interrupt else { return }
            guard quiescing == 0, !suspended else {
                missedNotification = true
                return
            }
            processLocked(queue, memory, interrupt)
        }
    }

    /// Takes every available request (starting or doing each), until the ring stays empty once the
    /// driver's notifications are in the state `updateNotificationsLocked` wants; then decides on an
    /// interrupt for what completed here. Called with the lock held.
    private func processLocked(_ queue: Virtqueue, _ memory: GuestMemory, _ interrupt: VirtioInterrupt) {
        var completed = false
        repeat {
            guard !broken else { break }
            if takeAvailableLocked(queue, memory, interrupt) { completed = true }
        } while updateNotificationsLocked(queue)
        if completed { notifyLocked(queue, interrupt) }
    }

    /// The driver is asked not to notify while requests are in flight (each completion looks at the
    /// ring: the guest mostly adds requests when it sees completions, and saves a VM exit per
    /// notification) or a transport thread polls. Otherwise notifications are asked for again, and
    /// this returns true when chains arrived meanwhile (they must be taken now). With the lock held.
    private func updateNotificationsLocked(_ queue: Virtqueue) -> Bool {
        if pollingBackend != nil || !inFlight.isEmpty {
            if !queue.notificationsSuppressed { try? queue.suppressNotifications() }
            return false
        }
        guard queue.notificationsSuppressed else { return false }
        // A ring that cannot be read counts as busy: taking from it stops the device properly.
        return (try? queue.enableNotifications()) ?? true
    }

    /// One pass over the avail ring: starts or does every request; returns whether any completed
    /// synchronously. A malformed chain stops the device. With the lock held.
    private func takeAvailableLocked(_ queue: Virtqueue, _ memory: GuestMemory, _ interrupt: VirtioInterrupt) -> Bool {
        var completed = false
        // Two parallel arrays rather than an array of pairs: the backend takes `requests` as they are.
        var requests: [BlockIORequest] = []
        var pendings: [InFlightRequest] = []
        while true {
            let chain: DescriptorChain
            do {
                guard let next = try queue.popAvailable() else { break }
                chain = next
            } catch {
                stop(error, interrupt)
                break
            }
            do {
                switch try handle(chain, queue: queue, memory: memory) {
                case .done(let status):
                    try complete(chain, status: status, queue: queue, memory: memory)
                    completed = true
                case .async(let request, let pending):
                    requests.append(request)
                    pendings.append(pending)
                }
            } catch {
                stop(error, interrupt)
                break
            }
        }
        // Chains taken before a malformed one still run: they must not be lost.
        if !requests.isEmpty && submitLocked(requests, pendings, interrupt: interrupt) { completed = true }
        return completed
    }

    /// Starts `requests` on the backend; those it does not take run synchronously now. Returns whether
    /// any completed synchronously (the caller then decides on a notification). Called with the lock held.
    private func submitLocked(_ requests: [BlockIORequest], _ pendings: [InFlightRequest], interrupt: VirtioInterrupt) -> Bool {
        for i in requests.indices { inFlight[requests[i].tag] = pendings[i] }
        inFlightPeak = max(inFlightPeak, inFlight.count)
        // Completions of started requests wait for the lock, which is held until the caller returns.
        let startedCount = backend.submitAsync(requests, handler: self)
        var completed = false
        for i in startedCount..<requests.count {
            inFlight[requests[i].tag] = nil
            let request = requests[i]
            var status = Status.ok
            do {
                if case .transfer = request.command {
                    if request.isWrite {
                        try backend.write(at: request.offset, from: request.buffers.map { UnsafeRawBufferPointer($0) })
                    } else {
                        try backend.read(at: request.offset, into: request.buffers)
                    }
                } else if !performSynchronously(request.command) {
                    status = Status.ioError
                }
            } catch {
                status = Status.ioError
            }
            do {
                try finish(pendings[i], status: status)
                completed = true
            } catch {
                stop(error, interrupt)
            }
        }
        return completed
    }

    /// Writes the status of a completed request, counts it and returns its chain. With the lock held.
    private func finish(_ request: InFlightRequest, status: UInt8) throws(VirtioError) {
        if status == Status.ok {
            if request.isWrite { stats.bytesWritten += request.length } else { stats.bytesRead += request.length }
        }
        try complete(request.chain, status: status, queue: request.queue, memory: request.memory)
    }

    /// Stores `status` in the chain's last writable byte and returns the chain (used length: every
    /// writable byte). With the lock held.
    private func complete(_ chain: DescriptorChain, status: UInt8, queue: Virtqueue, memory: GuestMemory) throws(VirtioError) {
        try store(status: status, for: chain, memory: memory)
        try queue.addUsed(head: chain.head, length: UInt32(clamping: chain.writableLength))
        // Data and status may have landed long after the chain was taken (or on the completion thread):
        // migration's trackers must see them now.
        queue.noteDeviceWrites(chain.writable)
    }

    private func notifyLocked(_ queue: Virtqueue, _ interrupt: VirtioInterrupt) {
        let notify: Bool
        do { notify = try queue.needsNotification() } catch { notify = true }
        if notify { interrupt.signalUsedBuffer(queue: 0) }
    }

    // MARK: Polling (an I/O domain's connection thread, between kicks)

    public func pollingStarted(_ index: Int) {
        let backend: BlockBackend? = lock.withLock {
            guard index == 0, let queue, !broken, pollingBackend == nil else { return nil }
            pollingBackend = self.backend
            _ = updateNotificationsLocked(queue)
            return self.backend
        }
        backend?.setAsyncPolling(true)
    }

    public func poll(_ index: Int) -> Bool {
        let backend = lock.withLock { pollingBackend }
        let reaped = backend?.pollAsync() ?? 0
        let ready = lock.withLock { () -> Bool in
            guard index == 0, let queue, !broken, quiescing == 0, !suspended else { return false }
            // A ring that lies about its avail idx counts as ready: queueNotified stops the device.
            return !queue.resubmissions.isEmpty || ((try? queue.pendingCount()) ?? 1) > 0
        }
        if ready { queueNotified(index) }
        return reaped > 0 || ready
    }

    public func pollingStopped(_ index: Int) {
        let (backend, again): (BlockBackend?, Bool) = lock.withLock {
            let backend = pollingBackend
            pollingBackend = nil
            guard let queue else { return (backend, false) }
            return (backend, updateNotificationsLocked(queue))
        }
        backend?.setAsyncPolling(false)
        if again { queueNotified(index) }
    }

    // MARK: AsyncIOHandler (the backend's completion thread)

    public func asyncIOCompleted(tag: UInt64, result: Int) {
        lock.withLock {
            guard let request = inFlight.removeValue(forKey: tag) else { return }
            let ok = result >= 0 && UInt64(result) == request.length
            do {
                try finish(request, status: ok ? Status.ok : Status.ioError)
            } catch {
                if let interrupt { stop(error, interrupt) }
            }
            completionsToSignal = true
        }
    }

    public func asyncIOBatchEnded() {
        lock.withLock {
            if completionsToSignal, let queue, let interrupt { notifyLocked(queue, interrupt) }
            completionsToSignal = false
            // Requests the driver added without notifying (see `updateNotificationsLocked`) are taken here.
            if let queue, let memory, let interrupt {
                if quiescing == 0 && !suspended {
                    processLocked(queue, memory, interrupt)
                } else if updateNotificationsLocked(queue) {
                    missedNotification = true
                }
            }
            lock.broadcast()
        }
    }

    /// Stops the device until reset. Called with the lock held.
    private func stop(_ error: Error, _ interrupt: VirtioInterrupt) {
        broken = true
        stats.resetsNeeded += 1
        interrupt.deviceNeedsReset(because: error)
    }

    // MARK: Requests (called with the lock held)

    private func store(status: UInt8, for chain: DescriptorChain, memory: GuestMemory) throws(VirtioError) {
        guard let last = chain.writable.last else {
            throw .malformedRequest(head: chain.head, reason: "no writable status byte")
        }
        // The chain parser checked that address + length does not overflow and length >= 1.
        do { try memory.store(status, at: last.address &+ UInt64(last.length) &- 1) } catch { throw .memory(error) }
        stats.requests += 1
        if status == Status.ioError { stats.errors += 1 }
        if status == Status.unsupported { stats.unsupported += 1 }
    }

    /// What `handle` did with a request.
    private enum Outcome {
        /// Done synchronously with this status.
        case done(UInt8)
        /// To be started on the backend (by `submitLocked`), completed later.
        case async(BlockIORequest, InFlightRequest)
    }

    /// Validates one request and performs it, or prepares it to start asynchronously. Throws only when
    /// the request has no status byte, or guest memory cannot be reached.
    private func handle(_ chain: DescriptorChain, queue: Virtqueue, memory: GuestMemory) throws(VirtioError) -> Outcome {
        guard !chain.writable.isEmpty else {
            throw .malformedRequest(head: chain.head, reason: "no writable status byte")
        }
        guard chain.readableLength >= 16 else { return .done(Status.ioError) }
        var header = [UInt8](repeating: 0, count: 16)
        try gather(chain.readable, skipping: 0, into: &header, memory: memory)
        // In bounds: header has 16 bytes; the loads cover bytes 0..<4 and 8..<16.
        let type = header.withUnsafeBytes { UInt32(littleEndian: $0.loadUnaligned(fromByteOffset: 0, as: UInt32.self)) }
        let sector = header.withUnsafeBytes { UInt64(littleEndian: $0.loadUnaligned(fromByteOffset: 8, as: UInt64.self)) }
        let readableData = BlockDevice.dropping(16, from: chain.readable)
        let writableData = BlockDevice.droppingLast(1, from: chain.writable)

        switch type {
        case RequestType.read:
            stats.reads += 1
            let length = BlockDevice.total(writableData)
            guard let offset = checkedRange(sector: sector, length: length) else { return .done(Status.ioError) }
            guard let buffers = try? writableData.map({ try memory.buffer(at: $0.address, length: Int($0.length)) }) else {
                return .done(Status.ioError)
            }
            if backend.acceptsAsync(isWrite: false, offset: offset, buffers: buffers) {
                return asyncOutcome(chain, queue: queue, memory: memory, isWrite: false, offset: offset, length: length,
                                    buffers: buffers)
            }
            do { try backend.read(at: offset, into: buffers) } catch { return .done(Status.ioError) }
            stats.bytesRead += length
            return .done(Status.ok)

        case RequestType.write:
            stats.writes += 1
            guard !backend.readOnly else { return .done(Status.ioError) }
            let length = BlockDevice.total(readableData)
            guard let offset = checkedRange(sector: sector, length: length) else { return .done(Status.ioError) }
            guard let buffers = try? readableData.map({ try memory.buffer(at: $0.address, length: Int($0.length)) }) else {
                return .done(Status.ioError)
            }
            if backend.acceptsAsync(isWrite: true, offset: offset, buffers: buffers) {
                return asyncOutcome(chain, queue: queue, memory: memory, isWrite: true, offset: offset, length: length,
                                    buffers: buffers)
            }
            do { try backend.write(at: offset, from: buffers.map { UnsafeRawBufferPointer($0) }) } catch {
                return .done(Status.ioError)
            }
            stats.bytesWritten += length
            return .done(Status.ok)

        case RequestType.flush:
            // Every write completed before this request was taken is in the file: fdatasync covers it.
            stats.flushes += 1
            if backend.acceptsAsyncCommands { return asyncCommand(chain, queue: queue, memory: memory, .flush) }
            do { try backend.flush() } catch { return .done(Status.ioError) }
            return .done(Status.ok)

        case RequestType.getID:
            guard let buffers = try? writableData.map({ try memory.buffer(at: $0.address, length: Int($0.length)) }) else {
                return .done(Status.ioError)
            }
            var cursor = ScatterCursor(buffers: buffers)
            serial.withUnsafeBytes { cursor.copyIn(from: $0) }
            return .done(Status.ok)

        case RequestType.discard, RequestType.writeZeroes:
            return try discardOrWriteZeroes(chain, isDiscard: type == RequestType.discard, segments: readableData,
                                            queue: queue, memory: memory)

        default:
            return .done(Status.unsupported)
        }
    }

    private func asyncOutcome(_ chain: DescriptorChain, queue: Virtqueue, memory: GuestMemory, isWrite: Bool,
                              offset: UInt64, length: UInt64, buffers: [UnsafeMutableRawBufferPointer]) -> Outcome {
        let tag = nextTag
        nextTag &+= 1
        return .async(BlockIORequest(isWrite: isWrite, offset: offset, buffers: buffers, tag: tag),
                      InFlightRequest(chain: chain, queue: queue, memory: memory, isWrite: isWrite, length: length))
    }

    /// A command started on the backend (`acceptsAsyncCommands`); it completes with result 0.
    private func asyncCommand(_ chain: DescriptorChain, queue: Virtqueue, memory: GuestMemory, _ command: BlockIOCommand) -> Outcome {
        let tag = nextTag
        nextTag &+= 1
        return .async(BlockIORequest(command: command, tag: tag),
                      InFlightRequest(chain: chain, queue: queue, memory: memory, isWrite: command.writes, length: 0))
    }

    private func discardOrWriteZeroes(_ chain: DescriptorChain, isDiscard: Bool, segments: [DescriptorSegment],
                                      queue: Virtqueue, memory: GuestMemory) throws(VirtioError) -> Outcome {
        if isDiscard { stats.discards += 1 } else { stats.writeZeroes += 1 }
        let feature = isDiscard ? Feature.discard : Feature.writeZeroes
        guard features & feature != 0 else { return .done(Status.unsupported) }
        let maxSegments = isDiscard ? BlockDevice.maxDiscardSegments : BlockDevice.maxWriteZeroesSegments
        let maxSectors = isDiscard ? BlockDevice.maxDiscardSectors : BlockDevice.maxWriteZeroesSectors
        let length = BlockDevice.total(segments)
        guard length > 0, length % 16 == 0, length / 16 <= UInt64(maxSegments) else { return .done(Status.unsupported) }
        var bytes = [UInt8](repeating: 0, count: Int(length))
        try gather(segments, skipping: 0, into: &bytes, memory: memory)

        var ranges: [(offset: UInt64, length: UInt64, unmap: Bool)] = []
        for i in 0..<(bytes.count / 16) {
            // In bounds: i * 16 + 16 <= bytes.count.
            let (sector, count, flags) = bytes.withUnsafeBytes { raw in
                (UInt64(littleEndian: raw.loadUnaligned(fromByteOffset: i * 16, as: UInt64.self)),
                 UInt32(littleEndian: raw.loadUnaligned(fromByteOffset: i * 16 + 8, as: UInt32.self)),
                 UInt32(littleEndian: raw.loadUnaligned(fromByteOffset: i * 16 + 12, as: UInt32.self)))
            }
            // Unknown flags, or UNMAP on a discard: UNSUPP (virtio 1.2 §5.2.6.2).
            guard flags & ~BlockDevice.writeZeroesFlagUnmap == 0, !(isDiscard && flags != 0) else {
                return .done(Status.unsupported)
            }
            guard count <= maxSectors else { return .done(Status.ioError) }
            let bytesCount = UInt64(count) * BlockDevice.sectorSize
            guard let offset = checkedRange(sector: sector, length: bytesCount) else { return .done(Status.ioError) }
            ranges.append((offset, bytesCount, flags & BlockDevice.writeZeroesFlagUnmap != 0))
        }
        guard !backend.readOnly else { return .done(Status.ioError) }
        let blockRanges = ranges.map { BlockRange(offset: $0.offset, length: $0.length, mayUnmap: $0.unmap) }
        if backend.acceptsAsyncCommands {
            return asyncCommand(chain, queue: queue, memory: memory, isDiscard ? .discard(blockRanges) : .writeZeroes(blockRanges))
        }
        return .done(performSynchronously(isDiscard ? .discard(blockRanges) : .writeZeroes(blockRanges)) ? Status.ok : Status.ioError)
    }

    /// Does a command on the backend synchronously; returns whether it succeeded.
    private func performSynchronously(_ command: BlockIOCommand) -> Bool {
        do {
            switch command {
            case .transfer: return false
            case .flush: try backend.flush()
            case .discard(let ranges): for range in ranges { try backend.discard(at: range.offset, length: range.length) }
            case .writeZeroes(let ranges):
                for range in ranges { try backend.writeZeroes(at: range.offset, length: range.length, mayUnmap: range.mayUnmap) }
            }
            return true
        } catch {
            return false
        }
    }

    /// The byte offset of `sector` when `[sector*512, +length)` is sector-aligned and inside the capacity.
    private func checkedRange(sector: UInt64, length: UInt64) -> UInt64? {
        guard length % BlockDevice.sectorSize == 0 else { return nil }
        let (offset, overflow1) = sector.multipliedReportingOverflow(by: BlockDevice.sectorSize)
        let (end, overflow2) = offset.addingReportingOverflow(length)
        guard !overflow1, !overflow2, end <= backend.capacity else { return nil }
        return offset
    }

    // MARK: Segment helpers

    private func gather(_ segments: [DescriptorSegment], skipping: UInt64, into bytes: inout [UInt8],
                        memory: GuestMemory) throws(VirtioError) {
        let buffers: [UnsafeMutableRawBufferPointer]
        do {
            buffers = try BlockDevice.dropping(skipping, from: segments).map { (segment) throws(GuestMemoryError) in
                try memory.buffer(at: segment.address, length: Int(segment.length))
            }
        } catch {
            throw .memory(error)
        }
        var cursor = ScatterCursor(buffers: buffers)
        bytes.withUnsafeMutableBytes { cursor.copyOut(to: $0) }
    }

    static func total(_ segments: [DescriptorSegment]) -> UInt64 {
        segments.reduce(0) { $0 + UInt64($1.length) }
    }

    /// The segments after the first `count` bytes.
    static func dropping(_ count: UInt64, from segments: [DescriptorSegment]) -> [DescriptorSegment] {
        var remaining = count
        var result: [DescriptorSegment] = []
        for segment in segments {
            if remaining >= UInt64(segment.length) {
                remaining -= UInt64(segment.length)
                continue
            }
            // remaining < segment.length <= UInt32.max, and address + length was checked not to overflow.
            let skip = UInt32(remaining)
            result.append(DescriptorSegment(address: segment.address &+ UInt64(skip), length: segment.length - skip))
            remaining = 0
        }
        return result
    }

    /// The segments without their last `count` bytes.
    static func droppingLast(_ count: UInt64, from segments: [DescriptorSegment]) -> [DescriptorSegment] {
        var remaining = count
        var result = segments
        while remaining > 0, let last = result.last {
            if remaining >= UInt64(last.length) {
                remaining -= UInt64(last.length)
                result.removeLast()
            } else {
                result[result.count - 1].length = last.length - UInt32(remaining)
                remaining = 0
            }
        }
        return result
    }
}

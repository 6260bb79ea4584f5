import Foundation
import GodwitSystem
import GuestMemory
import Testing
@testable import Virtio

/// A backend over an in-memory disk that holds every read and write started with `submitAsync` until
/// the test completes it, in the order the test chooses (the test plays the AIO reaper thread).
final class VirtioHeldBackend: BlockBackend, @unchecked Sendable {
    let capacity: UInt64
    let readOnly = false
    let blockSize: UInt32 = 512
    let supportsDiscard = false
    let supportsWriteZeroes = false
    /// How many requests may be held at once; `submitAsync` refuses the rest (the device does them synchronously).
    var limit = Int.max

    private let lock = NSLock()
    private var disk: [UInt8]
    private var held: [UInt64: (request: BlockIORequest, handler: AsyncIOHandler)] = [:]
    private var order: [UInt64] = []
    private var lastHandler: AsyncIOHandler?
    private(set) var syncRequests = 0

    init(capacity: Int) {
        self.capacity = UInt64(capacity)
        disk = [UInt8](repeating: 0, count: capacity)
    }

    /// Tags of the held requests, in submission order.
    var heldTags: [UInt64] { lock.withLock { order } }

    func bytes(at offset: Int, count: Int) -> [UInt8] { lock.withLock { Array(disk[offset..<(offset + count)]) } }

    func acceptsAsync(isWrite: Bool, offset: UInt64, buffers: [UnsafeMutableRawBufferPointer]) -> Bool { true }

    func submitAsync(_ requests: [BlockIORequest], handler: AsyncIOHandler) -> Int {
        lock.withLock {
            let count = max(0, min(requests.count, limit - held.count))
            lastHandler = handler
            for request in requests.prefix(count) {
                held[request.tag] = (request, handler)
                order.append(request.tag)
            }
            return count
        }
    }

    private func perform(_ request: BlockIORequest) -> Int {
        var position = Int(request.offset)
        for buffer in request.buffers {
            // In bounds: the device checked offset + length against the capacity.
            disk.withUnsafeMutableBytes { raw in
                let range = UnsafeMutableRawBufferPointer(rebasing: raw[position..<(position + buffer.count)])
                if request.isWrite { range.copyMemory(from: UnsafeRawBufferPointer(buffer)) } else { buffer.copyMemory(from: UnsafeRawBufferPointer(range)) }
            }
            position += buffer.count
        }
        return position - Int(request.offset)
    }

    /// Performs held request `tag` and reports it (with `result` instead of the byte count when given);
    /// the batch is not ended.
    func complete(_ tag: UInt64, result: Int? = nil) {
        let (request, handler, count): (BlockIORequest, AsyncIOHandler, Int) = lock.withLock {
            let (request, handler) = held.removeValue(forKey: tag)!
            order.removeAll { $0 == tag }
            return (request, handler, perform(request))
        }
        handler.asyncIOCompleted(tag: request.tag, result: result ?? count)
    }

    /// Reports a completion for a tag that is not (or no longer) in flight, as a confused engine might.
    func completeUnknown(_ tag: UInt64, handler: AsyncIOHandler) { handler.asyncIOCompleted(tag: tag, result: 512) }

    func endBatch(_ handler: AsyncIOHandler) { handler.asyncIOBatchEnded() }

    /// Ends the batch of the handler that submitted last (when the test cannot reach the device).
    func endLastBatch() { lock.withLock { lastHandler }?.asyncIOBatchEnded() }

    func read(at offset: UInt64, into buffers: [UnsafeMutableRawBufferPointer]) throws {
        lock.withLock {
            syncRequests += 1
            _ = perform(BlockIORequest(isWrite: false, offset: offset, buffers: buffers, tag: 0))
        }
    }

    func write(at offset: UInt64, from buffers: [UnsafeRawBufferPointer]) throws {
        lock.withLock {
            syncRequests += 1
            _ = perform(BlockIORequest(isWrite: true, offset: offset, buffers: buffers.map { UnsafeMutableRawBufferPointer(mutating: $0) }, tag: 0))
        }
    }

    func flush() throws {}
    func discard(at offset: UInt64, length: UInt64) throws {}
    func writeZeroes(at offset: UInt64, length: UInt64, mayUnmap: Bool) throws {}
}

/// Runs `body` on a new thread; `wait()` blocks until it returned.
final class VirtioBackgroundCall: @unchecked Sendable {
    private let done = DispatchSemaphore(value: 0)
    private let lock = NSLock()
    private var finished = false

    init(_ body: @escaping @Sendable () -> Void) {
        Thread.detachNewThread { [self] in
            body()
            lock.withLock { finished = true }
            done.signal()
        }
    }

    var hasReturned: Bool { lock.withLock { finished } }
    func wait() { done.wait() }
}

/// virtio-blk with requests in flight: out-of-order completion, drain on reset and suspend, malformed
/// chains among good ones, the synchronous fallback, inflight tracking, and real native AIO.
@Suite struct VirtioBlockAsyncTests {
    /// `count` one-sector writes of distinct payloads to sectors 0, 2, 4, ..., published together.
    func publishWrites(_ harness: VirtioBlockHarness, count: Int, seed: UInt64 = 1) throws
        -> [(request: VirtioBlockHarness.Submitted, payload: [UInt8], sector: UInt64)] {
        try (0..<count).map { i in
            let payload = virtioRandomBytes(512, seed: seed + UInt64(i))
            let request = try harness.prepare(type: VirtioBlkType.write, sector: UInt64(2 * i), out: payload)
            try harness.driver.publish(request.head)
            return (request, payload, UInt64(2 * i))
        }
    }

    @Test func manyRequestsInFlightCompleteInAnyOrder() throws {
        let backend = VirtioHeldBackend(capacity: 1 << 20)
        let harness = try VirtioBlockHarness(backend: backend, queueSize: 64)
        let writes = try publishWrites(harness, count: 16)
        harness.device.queueNotified(0)
        // Every request was taken and started; none is complete yet.
        #expect(backend.heldTags.count == 16)
        #expect(harness.device.requestsInFlight == 16)
        #expect(harness.device.peakRequestsInFlight == 16)
        #expect(try harness.driver.takeUsed().isEmpty)
        #expect(try writes.allSatisfy { try harness.status(of: $0.request) == 0xFF })

        // Completed in a scrambled order: each used entry appears as its request completes.
        let tags = backend.heldTags
        let scrambled = [7, 0, 15, 3, 8, 12, 1, 14, 2, 9, 5, 11, 4, 13, 10, 6].map { tags[$0] }
        for (n, tag) in scrambled.enumerated() {
            let index = tags.firstIndex(of: tag)!
            backend.complete(tag)
            let used = try harness.driver.takeUsed()
            #expect(used.map(\.id) == [UInt32(writes[index].request.head)])
            #expect(try harness.status(of: writes[index].request) == VirtioBlkStatus.ok)
            #expect(backend.bytes(at: Int(writes[index].sector) * 512, count: 512) == writes[index].payload)
            if n % 4 == 3 { backend.endBatch(harness.device) }
        }
        #expect(harness.device.requestsInFlight == 0)
        // One notification decision per batch: at most one interrupt each (event idx may suppress some).
        #expect(harness.interrupt.usedSignals >= 1 && harness.interrupt.usedSignals <= 4)
        #expect(harness.device.statistics.writes == 16 && harness.device.statistics.bytesWritten == 16 * 512)

        // Read them back, completed newest first.
        let reads = try writes.map { write in
            let request = try harness.prepare(type: VirtioBlkType.read, sector: write.sector, inLength: 512)
            try harness.driver.publish(request.head)
            return request
        }
        harness.device.queueNotified(0)
        for tag in backend.heldTags.reversed() { backend.complete(tag) }
        backend.endBatch(harness.device)
        let used = try harness.driver.takeUsed()
        #expect(used.map(\.id) == reads.reversed().map { UInt32($0.head) })
        #expect(used.allSatisfy { $0.length == 513 })
        for (read, write) in zip(reads, writes) {
            #expect(try harness.status(of: read) == VirtioBlkStatus.ok)
            #expect(try harness.dataIn(of: read) == write.payload)
        }
        #expect(!harness.device.needsReset)
    }

    @Test func failedOrShortCompletionsAreIOErrorsAndUnknownTagsAreIgnored() throws {
        let backend = VirtioHeldBackend(capacity: 1 << 20)
        let harness = try VirtioBlockHarness(backend: backend)
        let a = try harness.prepare(type: VirtioBlkType.read, sector: 0, inLength: 4096)
        let b = try harness.prepare(type: VirtioBlkType.read, sector: 8, inLength: 4096)
        let c = try harness.prepare(type: VirtioBlkType.read, sector: 16, inLength: 4096)
        for request in [a, b, c] { try harness.driver.publish(request.head) }
        harness.device.queueNotified(0)
        let tags = backend.heldTags
        backend.complete(tags[0], result: -Int(EIO))
        backend.complete(tags[1], result: 2048)  // short
        backend.complete(tags[2])
        backend.endBatch(harness.device)
        #expect(try harness.status(of: a) == VirtioBlkStatus.ioError)
        #expect(try harness.status(of: b) == VirtioBlkStatus.ioError)
        #expect(try harness.status(of: c) == VirtioBlkStatus.ok)
        #expect(harness.device.statistics.errors == 2)
        #expect(try harness.driver.takeUsed().count == 3)
        // A completion reported twice (or never started) does not complete anything again.
        backend.completeUnknown(tags[2], handler: harness.device)
        backend.completeUnknown(12345, handler: harness.device)
        backend.endBatch(harness.device)
        #expect(try harness.driver.takeUsed().isEmpty)
        #expect(harness.device.statistics.requests == 3)
    }

    @Test func resetWaitsForRequestsInFlightAndCompletesThem() throws {
        let backend = VirtioHeldBackend(capacity: 1 << 20)
        let harness = try VirtioBlockHarness(backend: backend)
        let writes = try publishWrites(harness, count: 4)
        harness.device.queueNotified(0)
        #expect(harness.device.requestsInFlight == 4)
        let device = harness.device
        let reset = VirtioBackgroundCall { device.reset() }
        usleep(20_000)
        // The reset cannot return while requests are in flight: their buffers are still being written.
        #expect(!reset.hasReturned)
        // A notification meanwhile starts nothing new.
        let late = try harness.prepare(type: VirtioBlkType.flush, sector: 0)
        try harness.driver.publish(late.head)
        device.queueNotified(0)
        #expect(backend.heldTags.count == 4)
        for tag in backend.heldTags { backend.complete(tag) }
        backend.endBatch(device)
        reset.wait()
        // Every request in flight completed into the used ring before the reset finished; nothing twice.
        let used = try harness.driver.takeUsed()
        #expect(Set(used.map(\.id)) == Set(writes.map { UInt32($0.request.head) }) && used.count == 4)
        #expect(try harness.status(of: late) == 0xFF)
        #expect(harness.device.queueState == nil)
    }

    @Test func suspendDrainsAndHoldsNewRequestsUntilResumed() throws {
        let backend = VirtioHeldBackend(capacity: 1 << 20)
        let harness = try VirtioBlockHarness(backend: backend)
        let device = harness.device
        _ = try publishWrites(harness, count: 2)
        device.queueNotified(0)
        let suspend = VirtioBackgroundCall { _ = try? device.suspendForMigration() }
        usleep(20_000)
        #expect(!suspend.hasReturned)
        for tag in backend.heldTags { backend.complete(tag) }
        backend.endBatch(device)
        suspend.wait()
        #expect(try harness.driver.takeUsed().count == 2)
        // The positions stand still: both requests returned, the avail and used indices agree.
        let state = try #require(device.queueState)
        #expect(state.nextAvail == 2 && state.nextUsed == 2)
        // A request made while suspended is not taken...
        let read = try harness.prepare(type: VirtioBlkType.read, sector: 0, inLength: 512)
        try harness.driver.publish(read.head)
        device.queueNotified(0)
        #expect(device.queueState?.nextAvail == 2)
        #expect(backend.heldTags.isEmpty)
        // ...until the migration is cancelled: the missed notification runs then.
        try device.resumeAfterSuspend()
        #expect(device.queueState?.nextAvail == 3)
        #expect(backend.heldTags.count == 1)
        for tag in backend.heldTags { backend.complete(tag) }
        backend.endBatch(device)
        #expect(try harness.driver.takeUsed().map(\.id) == [UInt32(read.head)])
    }

    @Test func aMalformedChainStopsTheDeviceButNotRequestsAlreadyTaken() throws {
        let backend = VirtioHeldBackend(capacity: 1 << 20)
        let harness = try VirtioBlockHarness(backend: backend, queueSize: 16)
        let driver = harness.driver
        let good = try (0..<3).map { i -> VirtioBlockHarness.Submitted in
            let request = try harness.prepare(type: VirtioBlkType.read, sector: UInt64(i), inLength: 512)
            try driver.publish(request.head)
            return request
        }
        // A chain whose head is out of the table's bounds through a bad next: NEXT pointing past the queue.
        let header = try driver.allocate(16)
        let bad = driver.nextDescriptor
        try driver.writeDescriptor(bad, address: header, length: 16, flags: VirtioTestFlag.next, next: 200)
        driver.nextDescriptor = (bad + 1) % driver.size
        try driver.publish(bad)
        let after = try harness.prepare(type: VirtioBlkType.read, sector: 9, inLength: 512)
        try driver.publish(after.head)
        harness.device.queueNotified(0)
        #expect(harness.device.needsReset)
        #expect(harness.interrupt.resetErrors.count == 1)
        // The three good requests before it were started and still complete.
        #expect(backend.heldTags.count == 3)
        for tag in backend.heldTags.reversed() { backend.complete(tag) }
        backend.endBatch(harness.device)
        let used = try driver.takeUsed()
        #expect(Set(used.map(\.id)) == Set(good.map { UInt32($0.head) }) && used.count == 3)
        #expect(try good.allSatisfy { try harness.status(of: $0) == VirtioBlkStatus.ok })
        #expect(try harness.status(of: after) == 0xFF)
        // Stopped: later notifications take nothing.
        harness.device.queueNotified(0)
        #expect(backend.heldTags.isEmpty)
        #expect(try driver.takeUsed().isEmpty)
    }

    @Test func requestsTheEngineRefusesRunSynchronously() throws {
        let backend = VirtioHeldBackend(capacity: 1 << 20)
        backend.limit = 2
        let harness = try VirtioBlockHarness(backend: backend)
        let writes = try publishWrites(harness, count: 5)
        harness.device.queueNotified(0)
        #expect(backend.heldTags.count == 2)
        #expect(backend.syncRequests == 3)
        // The three done at once are in the used ring already.
        let first = try harness.driver.takeUsed()
        #expect(first.count == 3 && Set(first.map(\.id)) == Set(writes[2...].map { UInt32($0.request.head) }))
        #expect(harness.interrupt.usedSignals == 1)
        for tag in backend.heldTags { backend.complete(tag) }
        backend.endBatch(harness.device)
        #expect(Set(try harness.driver.takeUsed().map(\.id)) == Set(writes[..<2].map { UInt32($0.request.head) }))
        for write in writes {
            #expect(backend.bytes(at: Int(write.sector) * 512, count: 512) == write.payload)
        }
    }

    /// Out-of-order completion with vhost-user inflight tracking: after a "crash", exactly the chains
    /// not returned are resubmitted, oldest first, and the avail position is right.
    @Test func inflightTrackingSurvivesOutOfOrderCompletion() throws {
        let backend = VirtioHeldBackend(capacity: 1 << 20)
        let driver = try VirtioTestDriver(size: 32)
        let region = try VirtqueueInflightTests.Region(queueSize: 32)
        let device = BlockDevice(backend: backend)
        let features = device.deviceFeatures
        let queue = try driver.makeQueue(features: features)
        try queue.resumeInflight(region.tracker(32))
        try device.activate(memory: driver.memory, queues: [queue], features: features, interrupt: VirtioRecordingInterrupt())
        var heads: [UInt16] = []
        for i in 0..<6 {
            let header = try driver.place(VirtioBlockHarness.header(type: VirtioBlkType.read, sector: UInt64(i)))
            let data = try driver.allocate(512)
            let status = try driver.allocate(1, fill: 0xFF)
            let head = try driver.addChain([VirtioTestBuffer(address: header, length: 16, writable: false),
                                            VirtioTestBuffer(address: data, length: 512, writable: true),
                                            VirtioTestBuffer(address: status, length: 1, writable: true)])
            try driver.publish(head)
            heads.append(head)
        }
        device.queueNotified(0)
        let tags = backend.heldTags
        #expect(tags.count == 6)
        backend.complete(tags[4])
        backend.complete(tags[1])
        backend.endBatch(device)
        #expect(try driver.takeUsed().map(\.id) == [UInt32(heads[4]), UInt32(heads[1])])
        // The process dies with 0, 2, 3 and 5 in flight; a new one recovers them from the region.
        let restarted = try driver.makeQueue(features: features)
        #expect(try restarted.resumeInflight(region.tracker(32)) == 4)
        #expect(restarted.nextUsed == 2 && restarted.nextAvail == 6)
        let again = try [0, 1, 2, 3].map { _ in try #require(try restarted.popAvailable()).head }
        #expect(again == [heads[0], heads[2], heads[3], heads[5]])
        #expect(try restarted.popAvailable() == nil)
    }

    /// The real engines: aligned O_DIRECT requests on io_uring and on Linux native AIO, many in flight
    /// (one and two buffers each), data checked.
    @Test(arguments: AsyncIOContext.Engine.allCases)
    func realEnginesKeepManyRequestsInFlight(engine: AsyncIOContext.Engine) throws {
        let image = try VirtioTempImage(size: 4 << 20, pattern: { _ in 0 })
        let backend: FileBlockBackend
        do { backend = try FileBlockBackend(path: image.path, direct: true, directAlignment: 4096, asyncEngines: [engine]) } catch {
            // A temporary directory without O_DIRECT (some tmpfs): nothing to test here.
            return
        }
        try #require(backend.asyncIO?.engine == engine, "\(engine.rawValue) was refused on this host")
        let harness = try VirtioBlockHarness(backend: backend, queueSize: 128)
        let driver = harness.driver
        func aligned(_ count: Int) throws -> UInt64 { (try driver.allocate(count + 4096) + 4095) & ~4095 }
        let count = 48
        var payloads: [[UInt8]] = []
        var statuses: [UInt64] = []
        for i in 0..<count {
            let payload = virtioRandomBytes(8192, seed: 1000 + UInt64(i))
            let data = try aligned(8192)
            try driver.memory.writeBytes(payload, at: data)
            let status = try driver.allocate(1, fill: 0xFF)
            let header = try driver.place(VirtioBlockHarness.header(type: VirtioBlkType.write, sector: UInt64(i * 80)))
            // Two aligned 4 KiB segments: a vectored request.
            try driver.publish(try driver.addIndirectChain([
                VirtioTestBuffer(address: header, length: 16, writable: false),
                VirtioTestBuffer(address: data, length: 4096, writable: false),
                VirtioTestBuffer(address: data + 4096, length: 4096, writable: false),
                VirtioTestBuffer(address: status, length: 1, writable: true)]))
            payloads.append(payload)
            statuses.append(status)
        }
        harness.device.queueNotified(0)
        #expect(harness.device.peakRequestsInFlight == count)
        harness.device.waitUntilIdle()
        #expect(try driver.takeUsed().count == count)
        #expect(try statuses.allSatisfy { try driver.memory.load(UInt8.self, at: $0) == VirtioBlkStatus.ok })
        for (i, payload) in payloads.enumerated() {
            #expect(try image.bytes(at: i * 80 * 512, count: 8192) == payload)
        }
        // Read back into aligned buffers, all in flight together.
        var reads: [(data: UInt64, status: UInt64)] = []
        for i in 0..<count {
            let data = try aligned(8192)
            let status = try driver.allocate(1, fill: 0xFF)
            let header = try driver.place(VirtioBlockHarness.header(type: VirtioBlkType.read, sector: UInt64(i * 80)))
            try driver.publish(try driver.addIndirectChain([
                VirtioTestBuffer(address: header, length: 16, writable: false),
                VirtioTestBuffer(address: data, length: 8192, writable: true),
                VirtioTestBuffer(address: status, length: 1, writable: true)]))
            reads.append((data, status))
        }
        harness.device.queueNotified(0)
        harness.device.waitUntilIdle()
        #expect(try driver.takeUsed().count == count)
        for (i, read) in reads.enumerated() {
            #expect(try driver.memory.load(UInt8.self, at: read.status) == VirtioBlkStatus.ok)
            #expect(try driver.memory.readBytes(at: read.data, count: 8192) == payloads[i])
        }
        #expect(harness.device.statistics.bytesRead == UInt64(count * 8192))
        #expect(backend.asyncIO?.inFlight == 0)
        // A flush after the writes completed.
        #expect(try harness.run(type: VirtioBlkType.flush, sector: 0).status == VirtioBlkStatus.ok)
        harness.device.reset()
    }

    /// Polling: the driver is asked not to notify while the device polls, new requests and completions
    /// are picked up by `poll`, and stopping asks again and takes what came meanwhile.
    @Test(arguments: [true, false])
    func pollingSuppressesNotificationsAndMissesNothing(eventIndex: Bool) throws {
        let backend = VirtioHeldBackend(capacity: 1 << 20)
        let probe = BlockDevice(backend: backend)
        let features = eventIndex ? probe.deviceFeatures : probe.deviceFeatures & ~VirtioFeature.eventIndex
        let harness = try VirtioBlockHarness(backend: backend, features: features)
        let device = harness.device
        let driver = harness.driver
        func usedFlags() throws -> UInt16 { try driver.memory.load(UInt16.self, at: driver.deviceArea) }
        _ = try publishWrites(harness, count: 1)
        device.queueNotified(0)
        for tag in backend.heldTags { backend.complete(tag) }
        backend.endBatch(device)
        #expect(try driver.takeUsed().count == 1)
        let eventBefore = try driver.availEvent()
        if eventIndex { #expect(eventBefore == 1) }
        #expect(try usedFlags() == 0)

        device.pollingStarted(0)
        #expect(!device.poll(0))
        _ = try publishWrites(harness, count: 2, seed: 50)
        #expect(device.poll(0))
        #expect(backend.heldTags.count == 2)
        // Taken without asking for the next notification.
        if eventIndex {
            #expect(!Virtqueue.needEvent(event: try driver.availEvent(), new: driver.availIdx, old: driver.availIdx &- 2))
        } else {
            #expect(try usedFlags() == 1)
        }
        for tag in backend.heldTags { backend.complete(tag) }
        backend.endBatch(device)
        #expect(try driver.takeUsed().count == 2)
        #expect(!device.poll(0))
        // A request the driver adds without notifying just as polling stops is not missed.
        _ = try publishWrites(harness, count: 1, seed: 90)
        device.pollingStopped(0)
        #expect(backend.heldTags.count == 1)
        for tag in backend.heldTags { backend.complete(tag) }
        backend.endBatch(device)
        #expect(try driver.takeUsed().count == 1)
        // Idle again: the driver notifies for its next request.
        if eventIndex { #expect(try driver.availEvent() == 4) } else { #expect(try usedFlags() == 0) }
        #expect(harness.device.statistics.requests == 4)
    }

    /// Polling with the real engines: the polling thread reaps completions itself.
    @Test(arguments: AsyncIOContext.Engine.allCases)
    func realEngineCompletionsArePolled(engine: AsyncIOContext.Engine) throws {
        let image = try VirtioTempImage(size: 1 << 20)
        let backend: FileBlockBackend
        do { backend = try FileBlockBackend(path: image.path, direct: true, directAlignment: 4096, asyncEngines: [engine]) } catch { return }
        try #require(backend.asyncIO?.engine == engine, "\(engine.rawValue) was refused on this host")
        let harness = try VirtioBlockHarness(backend: backend)
        let driver = harness.driver
        harness.device.pollingStarted(0)
        var reads: [(data: UInt64, status: UInt64, sector: Int)] = []
        for i in 0..<16 {
            let data = (try driver.allocate(8192) + 4095) & ~4095
            let status = try driver.allocate(1, fill: 0xFF)
            let header = try driver.place(VirtioBlockHarness.header(type: VirtioBlkType.read, sector: UInt64(i * 8)))
            try driver.publish(try driver.addIndirectChain([
                VirtioTestBuffer(address: header, length: 16, writable: false),
                VirtioTestBuffer(address: data, length: 4096, writable: true),
                VirtioTestBuffer(address: status, length: 1, writable: true)]))
            reads.append((data, status, i * 8))
        }
        #expect(harness.device.poll(0))
        // Poll until every completion was reaped (bounded, so a lost completion fails instead of hanging).
        var spins = 0
        while harness.device.requestsInFlight > 0 && spins < 2_000_000 {
            _ = harness.device.poll(0)
            spins += 1
        }
        harness.device.pollingStopped(0)
        harness.device.waitUntilIdle()
        #expect(try driver.takeUsed().count == 16)
        let contents = try image.contents
        for read in reads {
            #expect(try driver.memory.load(UInt8.self, at: read.status) == VirtioBlkStatus.ok)
            #expect(try driver.memory.readBytes(at: read.data, count: 4096) == Array(contents[(read.sector * 512)..<(read.sector * 512 + 4096)]))
        }
    }

    /// While requests are in flight the driver is asked not to notify; a request it adds then is taken
    /// when a completion comes, and once nothing is in flight it is asked to notify again.
    @Test func requestsAddedWhileBusyAreTakenOnCompletion() throws {
        let backend = VirtioHeldBackend(capacity: 1 << 20)
        let harness = try VirtioBlockHarness(backend: backend)
        let device = harness.device
        let driver = harness.driver
        _ = try publishWrites(harness, count: 2)
        device.queueNotified(0)
        #expect(backend.heldTags.count == 2)
        let event = try driver.availEvent()
        // The driver adds two more; avail_event does not ask for a notification, so it sends none.
        _ = try publishWrites(harness, count: 2, seed: 20)
        #expect(try driver.availEvent() == event)
        #expect(!Virtqueue.needEvent(event: event, new: driver.availIdx &- 1, old: driver.availIdx &- 2))
        #expect(!Virtqueue.needEvent(event: event, new: driver.availIdx, old: driver.availIdx &- 1))
        backend.complete(backend.heldTags[0])
        backend.endBatch(device)
        // The completion took them.
        #expect(backend.heldTags.count == 3)
        #expect(try driver.takeUsed().count == 1)
        for tag in backend.heldTags { backend.complete(tag) }
        backend.endBatch(device)
        #expect(try driver.takeUsed().count == 3)
        #expect(device.requestsInFlight == 0)
        #expect(try driver.availEvent() == driver.availIdx)
        // Idle: a new request is announced by a notification as usual.
        let read = try harness.prepare(type: VirtioBlkType.read, sector: 0, inLength: 512)
        try driver.publish(read.head)
        #expect(Virtqueue.needEvent(event: try driver.availEvent(), new: driver.availIdx, old: driver.availIdx &- 1))
        device.queueNotified(0)
        #expect(backend.heldTags.count == 1)
        for tag in backend.heldTags { backend.complete(tag) }
        backend.endBatch(device)
        #expect(try driver.takeUsed().map(\.id) == [UInt32(read.head)])
    }
}

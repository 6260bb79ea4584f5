import Foundation
import GodwitSystem
@testable import IODomain
import Testing
import Virtio

/// A disk in memory whose failures are switched on by the test: errors, or hanging until released.
final class FlakyDisk: BlockBackend, ReplicaStorage, @unchecked Sendable {
    enum Mode { case healthy, failing, hanging }
    let lock = NSLock()
    var bytes: [UInt8]
    /// Set by the test while the route's threads read it: under the lock.
    var mode: Mode {
        get { lock.withLock { storedMode } }
        set { lock.withLock { storedMode = newValue } }
    }
    private var storedMode = Mode.healthy
    var writes: Int { lock.withLock { storedWrites } }
    private var storedWrites = 0
    var flushes = 0
    var writeDelay: useconds_t = 0
    let release = DispatchSemaphore(value: 0)
    var capacity: UInt64 { UInt64(bytes.count) }
    var size: UInt64 { capacity }
    let readOnly = false
    let blockSize: UInt32 = 512
    let supportsDiscard = true
    let supportsWriteZeroes = true

    init(size: Int, seed: UInt8 = 0) { bytes = (0..<size).map { UInt8(truncatingIfNeeded: $0 / 512) &+ seed } }

    private func gate() throws {
        switch mode {
        case .healthy: return
        case .failing: throw SystemError(operation: "pread", errno: EIO, context: "flaky disk")
        case .hanging:
            release.wait()
            throw SystemError(operation: "pread", errno: EIO, context: "released")
        }
    }

    func read(at offset: UInt64, into buffers: [UnsafeMutableRawBufferPointer]) throws {
        try gate()
        var position = Int(offset)
        lock.withLock {
            for buffer in buffers {
                bytes.withUnsafeBytes { buffer.copyMemory(from: UnsafeRawBufferPointer(rebasing: $0[position..<(position + buffer.count)])) }
                position += buffer.count
            }
        }
    }

    func write(at offset: UInt64, from buffers: [UnsafeRawBufferPointer]) throws {
        try gate()
        if writeDelay > 0 { usleep(writeDelay) }
        var position = Int(offset)
        lock.withLock {
            storedWrites += 1
            for buffer in buffers {
                for (i, b) in buffer.enumerated() { bytes[position + i] = b }
                position += buffer.count
            }
        }
    }

    func flush() throws { try gate(); lock.withLock { flushes += 1 } }
    func discard(at offset: UInt64, length: UInt64) throws { try gate() }
    func writeZeroes(at offset: UInt64, length: UInt64, mayUnmap: Bool) throws {
        try gate()
        lock.withLock { for i in Int(offset)..<Int(offset + length) { bytes[i] = 0 } }
    }

    // ReplicaStorage
    func read(at offset: UInt64, into buffer: UnsafeMutableRawBufferPointer) throws { try read(at: offset, into: [buffer]) }
    func write(at offset: UInt64, from buffer: UnsafeRawBufferPointer, fua: Bool) throws { try write(at: offset, from: [buffer]) }
    func trim(at offset: UInt64, length: UInt64) throws { try discard(at: offset, length: length) }
    func writeZeroes(at offset: UInt64, length: UInt64, mayUnmap: Bool, fua: Bool) throws { try writeZeroes(at: offset, length: length, mayUnmap: mayUnmap) }

    var snapshot: [UInt8] { lock.withLock { bytes } }

    /// As a cut connection does: the hanging call returns (with an error).
    func abort() { release.signal() }
}

final class EventLog: @unchecked Sendable {
    let lock = NSLock()
    var events: [RouteEvent] = []
    func add(_ e: RouteEvent) { lock.withLock { events.append(e) } }
    var kinds: [String] { lock.withLock { events.map(\.kind) } }
    func first(_ kind: String) -> RouteEvent? { lock.withLock { events.first { $0.kind == kind } } }
}

func waitFor(_ condition: () -> Bool) -> Bool {
    for _ in 0..<2000 {
        if condition() { return true }
        usleep(5000)
    }
    return condition()
}

private func write(_ route: RoutedBlockBackend, _ offset: UInt64, _ bytes: [UInt8]) throws {
    try bytes.withUnsafeBytes { try route.write(at: offset, from: [$0]) }
}

private func read(_ route: RoutedBlockBackend, _ offset: UInt64, _ count: Int) throws -> [UInt8] {
    var out = [UInt8](repeating: 0, count: count)
    try out.withUnsafeMutableBytes { try route.read(at: offset, into: [$0]) }
    return out
}

/// A route with a replica attached and in sync (mirror).
private func mirrored(size: Int = 1 << 20) throws -> (RoutedBlockBackend, FlakyDisk, FlakyDisk, EventLog) {
    let local = FlakyDisk(size: size, seed: 1), replica = FlakyDisk(size: size, seed: 99)
    let route = RoutedBlockBackend(local: local, chunkSize: 64 << 10)
    let log = EventLog()
    route.onEvent = { log.add($0) }
    try route.attachReplica(replica)
    #expect(waitFor { route.status.route == .mirror })
    return (route, local, replica, log)
}

@Suite("Device routes (local, remote, mirror)")
struct RouteTests {
    @Test func anAttachedReplicaIsCopiedThenMirrored() throws {
        let (route, local, replica, log) = try mirrored()
        #expect(replica.snapshot == local.snapshot, "the sync copied every chunk")
        #expect(log.kinds.starts(with: ["sync-started", "in-sync"]))
        try write(route, 4096, [UInt8](repeating: 0xAB, count: 8192))
        try route.flush()
        #expect(local.snapshot[4096..<12288].allSatisfy { $0 == 0xAB } && replica.snapshot[4096..<12288].allSatisfy { $0 == 0xAB })
        #expect(local.flushes >= 1 && replica.flushes >= 1, "FLUSH goes to both")
        #expect(route.status.replicaInSync && route.status.bytesOutOfSync == 0)
    }

    /// Writes while the copy runs land in chunks already copied and not yet copied: all reach the replica.
    @Test func writesDuringTheSyncAreNotLost() throws {
        let size = 4 << 20
        let local = FlakyDisk(size: size, seed: 1), replica = FlakyDisk(size: size, seed: 99)
        replica.writeDelay = 300  // a slow replica: the sync takes a while
        let route = RoutedBlockBackend(local: local, chunkSize: 64 << 10)
        try route.attachReplica(replica)
        var n: UInt8 = 0
        while route.status.route != .mirror {
            n &+= 1
            let offset = UInt64(Int(n) * 37 % 60) * 65536 + UInt64(n % 7) * 512
            try write(route, offset, [UInt8](repeating: n, count: 1024))
            #expect(route.status.syncProgress.map { (0...1).contains($0) } ?? true)
            if n == 250 { break }
        }
        #expect(waitFor { route.status.route == .mirror })
        #expect(replica.snapshot == local.snapshot, "the replica got every write made during the copy")
    }

    /// The promise: the local device fails under a mirrored disk; no request fails, the route
    /// becomes remote, and what was written before is on the replica.
    @Test func aLocalFailureFailsOverWithoutAnError() throws {
        let (route, local, replica, log) = try mirrored()
        try write(route, 0, [UInt8](repeating: 0x11, count: 4096))
        local.mode = .failing
        try write(route, 8192, [UInt8](repeating: 0x22, count: 4096))   // fails locally, replayed remotely
        try route.flush()
        #expect(try read(route, 0, 4096) == [UInt8](repeating: 0x11, count: 4096), "acknowledged before the fault, read from the replica")
        #expect(try read(route, 8192, 4096) == [UInt8](repeating: 0x22, count: 4096))
        let status = route.status
        #expect(status.route == .remote && status.localFailed && status.failovers == 1)
        #expect(log.kinds.contains("local-fault") && log.kinds.contains("failover"), "\(log.kinds)")
        #expect(log.first("failover")?.milliseconds != nil)
        #expect(replica.snapshot[8192..<12288].allSatisfy { $0 == 0x22 })
        #expect(throws: IODomainError.self) { try route.setRoute(.local) }
    }

    /// A local device that stops answering: after the configured time-out the request runs on the
    /// replica; a late answer cannot touch the guest's buffer.
    @Test func aHangingLocalDeviceTimesOutAndFailsOver() throws {
        let (route, local, _, log) = try mirrored()
        route.localTimeout = 0.05
        try write(route, 65536, [UInt8](repeating: 0x33, count: 512))
        local.mode = .hanging
        var buffer = [UInt8](repeating: 0, count: 512)
        try buffer.withUnsafeMutableBytes { try route.read(at: 65536, into: [$0]) }
        #expect(buffer == [UInt8](repeating: 0x33, count: 512))
        #expect(route.status.route == .remote)
        #expect(log.first("local-fault")?.reason?.contains("did not answer") == true, "\(log.kinds)")
        local.release.signal()  // the stuck call returns late, into the bounce buffer only
        usleep(20_000)
        #expect(buffer == [UInt8](repeating: 0x33, count: 512))
    }

    /// A slow local device with nothing to fail over to is waited for, past the time-out: no fault, no error.
    @Test func aSlowLocalDeviceWithoutAReplicaIsWaitedFor() throws {
        let local = FlakyDisk(size: 1 << 20)
        let route = RoutedBlockBackend(local: local)
        let log = EventLog()
        route.onEvent = { log.add($0) }
        route.localTimeout = 0.02
        local.writeDelay = 100_000
        try write(route, 0, [UInt8](repeating: 0x5A, count: 512))
        #expect(local.snapshot[0..<512].allSatisfy { $0 == 0x5A })
        #expect(!log.kinds.contains("local-fault") && !route.status.localFailed, "\(log.kinds)")
    }

    /// No replica in sync yet (the copy is still running): the guest gets the error, and the event says why.
    @Test func withoutAReplicaInSyncTheGuestGetsTheError() throws {
        let local = FlakyDisk(size: 4 << 20), replica = FlakyDisk(size: 4 << 20)
        replica.writeDelay = 20_000
        let route = RoutedBlockBackend(local: local)
        let log = EventLog()
        route.onEvent = { log.add($0) }
        try route.attachReplica(replica)
        local.mode = .failing
        #expect(throws: (any Error).self) { try write(route, 0, [1, 2, 3, 4]) }
        #expect(log.first("local-fault")?.reason?.contains("no replica in sync") == true, "\(log.kinds)")
        #expect(route.status.route == .local)
    }

    /// The replica fails while the local device is healthy: the disk runs on locally, remembers what
    /// the replica misses, and a returning replica gets only that.
    @Test func aReplicaFailureDegradesAndTheReturnIsAResync() throws {
        let (route, local, replica, log) = try mirrored(size: 2 << 20)
        replica.mode = .failing
        try write(route, 0, [UInt8](repeating: 0x44, count: 4096))      // local has it; the replica drops out
        #expect(route.status.route == .local)
        #expect(log.first("replica-fault") != nil)
        try write(route, 1 << 20, [UInt8](repeating: 0x55, count: 4096))
        #expect(route.status.bytesOutOfSync == 2 * (64 << 10), "two chunks remembered: \(route.status)")
        replica.mode = .healthy
        let writesBefore = replica.writes
        try route.attachReplica(replica, resync: true)
        #expect(waitFor { route.status.route == .mirror })
        #expect(replica.writes - writesBefore == 2, "only the two chunks written meanwhile were copied")
        #expect(replica.snapshot == local.snapshot)
    }

    /// A replica that stops answering (a dead link) under a mirrored disk: after the time-out it is cut
    /// off, the write completes from the local device, and the route degrades to local.
    @Test func aHangingReplicaIsCutOffAndTheDiskGoesOnLocally() throws {
        let (route, local, replica, log) = try mirrored()
        route.localTimeout = 0.05
        replica.mode = .hanging
        try write(route, 4096, [UInt8](repeating: 0x66, count: 512))
        #expect(local.snapshot[4096..<4608].allSatisfy { $0 == 0x66 })
        #expect(route.status.route == .local && !route.status.replica)
        #expect(log.first("replica-fault")?.reason?.contains("did not answer") == true, "\(log.kinds)")
        try write(route, 8192, [1, 2, 3, 4])  // and the next one does not wait
        #expect(route.status.bytesOutOfSync == 64 << 10)
    }

    @Test func routesSetByHandFollowTheRules() throws {
        let route = RoutedBlockBackend(local: FlakyDisk(size: 1 << 20))
        #expect(throws: IODomainError.self) { try route.setRoute(.remote) }
        #expect(throws: IODomainError.self) { try route.setRoute(.mirror) }
        #expect(throws: IODomainError.self) { try route.detachReplica() }
        #expect(throws: IODomainError.self) { try route.attachReplica(FlakyDisk(size: 4096)) }  // too small
        let (mirroredRoute, local, replica, _) = try mirrored()
        try mirroredRoute.setRoute(.local)
        try write(mirroredRoute, 0, [9, 9, 9, 9])
        #expect(throws: IODomainError.self) { try mirroredRoute.setRoute(.mirror) }  // out of sync now
        try mirroredRoute.resync()
        #expect(waitFor { mirroredRoute.status.route == .mirror })
        #expect(replica.snapshot == local.snapshot)
        try mirroredRoute.setRoute(.remote)
        #expect(mirroredRoute.status.route == .remote)
        try mirroredRoute.detachReplica()
        #expect(mirroredRoute.status.route == .local && !mirroredRoute.status.replica)
    }

    /// A plain local disk passes many requests straight to the device's engine; attaching a replica
    /// waits for those to come back before the copy starts, and from then on requests go through the
    /// route, still many at a time (their local halves on the same engine).
    @Test func plainLocalRequestsGoStraightToTheEngine() throws {
        let held = VirtioHeldBackend(capacity: 1 << 20)
        let route = RoutedBlockBackend(local: held)
        let sink = CompletionSink()
        let page = UnsafeMutableRawBufferPointer.allocate(byteCount: 4096, alignment: 4096)
        defer { page.deallocate() }
        #expect(route.acceptsAsync(isWrite: true, offset: 0, buffers: [page]))
        let requests = (0..<3).map { BlockIORequest(isWrite: true, offset: UInt64($0) * 4096, buffers: [page], tag: UInt64($0)) }
        #expect(route.submitAsync(requests, handler: sink) == 3)
        #expect(held.heldTags.count == 3)
        // Attaching waits for the three writes in flight.
        let replica = FlakyDisk(size: 1 << 20)
        let attached = VirtioBackgroundCall { try? route.attachReplica(replica) }
        usleep(50_000)
        #expect(!attached.hasReturned, "attach waits while writes that went straight to the device are out")
        for tag in 0..<3 { held.complete(UInt64(tag)) }  // straight to the engine: the device's own handler
        attached.wait()
        #expect(sink.tags.sorted() == [0, 1, 2])
        // Through the route now (the replica is being copied): accepted, all on the engine at once.
        #expect(route.acceptsAsync(isWrite: true, offset: 0, buffers: [page]))
        let later = (3..<6).map { BlockIORequest(isWrite: true, offset: UInt64($0) * 4096, buffers: [page], tag: UInt64($0)) }
        #expect(route.submitAsync(later, handler: sink) == 3)
        #expect(waitFor { held.heldTags.count == 3 })
        for tag in held.heldTags.reversed() { held.complete(tag) }
        held.endBatch(route.engineCompletions)
        #expect(waitFor { sink.tags.count == 6 })
        #expect(sink.tags.sorted() == [0, 1, 2, 3, 4, 5] && sink.results.allSatisfy { $0 == 4096 })
        #expect(waitFor { route.status.route == .mirror })
        #expect(replica.snapshot[(3 * 4096)..<(6 * 4096)] == held.bytes(at: 3 * 4096, count: 3 * 4096)[...],
                "writes made during the copy reached the replica")
    }

    @Test func chunkBitmapCountsAndClips() {
        var bitmap = ChunkBitmap(capacity: 1000, chunkSize: 256)
        #expect(bitmap.chunks == 4)
        bitmap.mark(offset: 250, length: 10)          // chunks 0 and 1
        bitmap.mark(offset: 900, length: UInt64.max)  // clipped to the last chunk
        bitmap.mark(offset: 0, length: 0)
        #expect(bitmap.count == 3)
        #expect(bitmap.takeFirst() == 0 && bitmap.takeFirst() == 1 && bitmap.takeFirst() == 3 && bitmap.takeFirst() == nil)
        bitmap.markAll()
        #expect(bitmap.count == 4)
    }
}

/// A device's completion handler that records what came back (from any thread).
final class CompletionSink: AsyncIOHandler, @unchecked Sendable {
    private let lock = NSLock()
    private var done: [(tag: UInt64, result: Int)] = []
    private(set) var batches = 0
    func asyncIOCompleted(tag: UInt64, result: Int) { lock.withLock { done.append((tag, result)) } }
    func asyncIOBatchEnded() { lock.withLock { batches += 1 } }
    var tags: [UInt64] { lock.withLock { done.map(\.tag) } }
    var results: [Int] { lock.withLock { done.map(\.result) } }
}

/// A replica in memory with the asynchronous interface, that holds every command until the test
/// answers it (in the order the test chooses), and logs the order commands arrived in.
final class HeldReplica: ReplicaStorage, @unchecked Sendable {
    private let lock = NSLock()
    private var bytes: [UInt8]
    private var pending: [(request: ReplicaRequest, completion: (Error?) -> Void)] = []
    private var arrivals: [String] = []
    /// Commands are answered at once (on another thread) instead of held.
    var passThrough = false
    var size: UInt64 { UInt64(lock.withLock { bytes.count }) }

    init(size: Int) { bytes = [UInt8](repeating: 0, count: size) }

    /// What arrived, in order: "W<offset>", "R<offset>", "F", "T<offset>", "Z<offset>".
    var log: [String] { lock.withLock { arrivals } }
    var heldCount: Int { lock.withLock { pending.count } }
    var heldLog: [String] { lock.withLock { pending.map { HeldReplica.describe($0.request) } } }
    var snapshot: [UInt8] { lock.withLock { bytes } }

    static func describe(_ request: ReplicaRequest) -> String {
        switch request {
        case let .read(offset, _): return "R\(offset)"
        case let .write(offset, _, _): return "W\(offset)"
        case .flush: return "F"
        case let .trim(offset, _): return "T\(offset)"
        case let .writeZeroes(offset, _, _, _): return "Z\(offset)"
        }
    }

    func submit(_ request: ReplicaRequest, completion: @escaping (Error?) -> Void) -> Bool {
        lock.withLock {
            arrivals.append(HeldReplica.describe(request))
            pending.append((request, completion))
        }
        if passThrough { DispatchQueue.global().async { self.answer(0) } }
        return true
    }

    /// Performs the held command at `index` (or fails it with `error`) and answers it.
    func answer(_ index: Int, error: Error? = nil) {
        let item: (request: ReplicaRequest, completion: (Error?) -> Void)? = lock.withLock {
            guard pending.indices.contains(index) else { return nil }
            let item = pending.remove(at: index)
            if error == nil { perform(item.request) }
            return item
        }
        item?.completion(error)
    }

    /// Answers the first held command whose description is `name`.
    func answer(_ name: String, error: Error? = nil) {
        guard let index = lock.withLock({ pending.firstIndex { HeldReplica.describe($0.request) == name } }) else { return }
        answer(index, error: error)
    }

    private func perform(_ request: ReplicaRequest) {
        switch request {
        case let .read(offset, buffer):
            bytes.withUnsafeBytes { buffer.copyMemory(from: UnsafeRawBufferPointer(rebasing: $0[Int(offset)..<(Int(offset) + buffer.count)])) }
        case let .write(offset, buffer, _):
            for (i, b) in buffer.enumerated() { bytes[Int(offset) + i] = b }
        case let .writeZeroes(offset, length, _, _):
            for i in Int(offset)..<Int(offset + length) { bytes[i] = 0 }
        case .flush, .trim:
            break
        }
    }

    // The synchronous calls (the background copy uses them) act at once.
    func read(at offset: UInt64, into buffer: UnsafeMutableRawBufferPointer) throws { lock.withLock { perform(.read(offset: offset, into: buffer)) } }
    func write(at offset: UInt64, from buffer: UnsafeRawBufferPointer, fua: Bool) throws { lock.withLock { perform(.write(offset: offset, from: buffer, fua: fua)) } }
    func flush() throws {}
    func trim(at offset: UInt64, length: UInt64) throws {}
    func writeZeroes(at offset: UInt64, length: UInt64, mayUnmap: Bool, fua: Bool) throws {
        lock.withLock { perform(.writeZeroes(offset: offset, length: length, mayUnmap: mayUnmap, fua: fua)) }
    }
}

/// Page-aligned guest buffers for asynchronous requests, freed together.
final class PageBuffers {
    private var pages: [UnsafeMutableRawBufferPointer] = []
    func page(filledWith byte: UInt8, count: Int = 4096) -> UnsafeMutableRawBufferPointer {
        let page = UnsafeMutableRawBufferPointer.allocate(byteCount: count, alignment: 4096)
        page.initializeMemory(as: UInt8.self, repeating: byte)
        pages.append(page)
        return page
    }
    deinit { for page in pages { page.deallocate() } }
}

/// The mirror route with many requests in flight: both halves at once, answers out of order, FLUSH as a
/// barrier, overlapping writes kept in order, and faults with requests in flight.
@Suite("Device routes with requests in flight")
struct RouteConcurrencyTests {
    /// A route over a held engine (`VirtioHeldBackend`) mirrored to a held replica, in sync.
    func mirrored(size: Int = 1 << 20) throws -> (RoutedBlockBackend, VirtioHeldBackend, HeldReplica, EventLog) {
        let local = VirtioHeldBackend(capacity: size)
        let replica = HeldReplica(size: size)
        let route = RoutedBlockBackend(local: local, chunkSize: 64 << 10)
        let log = EventLog()
        route.onEvent = { log.add($0) }
        try route.attachReplica(replica)
        #expect(waitFor { route.status.route == .mirror })
        return (route, local, replica, log)
    }

    /// The engine finishes the local half `tag` and ends its batch, as the reaper does.
    func finishLocal(_ local: VirtioHeldBackend, _ route: RoutedBlockBackend, _ tag: UInt64) {
        local.complete(tag)
        local.endBatch(route.engineCompletions)
    }

    func write(_ offset: UInt64, _ page: UnsafeMutableRawBufferPointer, tag: UInt64) -> BlockIORequest {
        BlockIORequest(isWrite: true, offset: offset, buffers: [page], tag: tag)
    }

    /// Four writes: all four local halves and all four replica halves are out together; each write is
    /// answered when its second half comes back, whatever the order.
    @Test func bothHalvesRunTogetherAndAnswersComeOutOfOrder() throws {
        let (route, local, replica, _) = try mirrored()
        let sink = CompletionSink(), pages = PageBuffers()
        let writes = (0..<4).map { write(UInt64($0) * 65536, pages.page(filledWith: UInt8(0xA0 + $0)), tag: UInt64($0)) }
        #expect(route.acceptsAsync(isWrite: true, offset: 0, buffers: writes[0].buffers))
        #expect(route.submitAsync(writes, handler: sink) == 4)
        #expect(local.heldTags.count == 4, "every local half is on the engine")
        #expect(replica.heldCount == 4, "every replica half is on the replica")
        let ids = local.heldTags
        // Write 2: local first, then the replica. Write 0: the replica first. Write 3 and 1 last.
        finishLocal(local, route, ids[2])
        usleep(20_000)
        #expect(sink.tags.isEmpty, "one half is not an answer")
        replica.answer("W131072")
        #expect(waitFor { sink.tags == [2] })
        replica.answer("W0")
        usleep(20_000)
        #expect(sink.tags == [2])
        finishLocal(local, route, ids[0])
        #expect(waitFor { sink.tags == [2, 0] })
        replica.answer("W196608")
        replica.answer("W65536")
        finishLocal(local, route, ids[3])
        finishLocal(local, route, ids[1])
        #expect(waitFor { sink.tags.count == 4 })
        #expect(sink.tags == [2, 0, 3, 1] && sink.results.allSatisfy { $0 == 4096 })
        for i in 0..<4 {
            let expected = [UInt8](repeating: UInt8(0xA0 + i), count: 4096)
            #expect(Array(replica.snapshot[(i * 65536)..<(i * 65536 + 4096)]) == expected)
            #expect(local.bytes(at: i * 65536, count: 4096) == expected)
        }
        #expect(route.status.route == .mirror && route.status.bytesOutOfSync == 0)
    }

    /// A FLUSH goes to the replica (and the device) only when every write before it is done on both
    /// sides; a write after it does not wait for it.
    @Test func aFlushWaitsForTheWritesBeforeIt() throws {
        let (route, local, replica, _) = try mirrored()
        let sink = CompletionSink(), pages = PageBuffers()
        #expect(route.submitAsync([write(0, pages.page(filledWith: 1), tag: 0), write(65536, pages.page(filledWith: 2), tag: 1)],
                                  handler: sink) == 2)
        let flush = VirtioBackgroundCall { try? route.flush() }
        usleep(20_000)
        #expect(route.submitAsync([write(131072, pages.page(filledWith: 3), tag: 2)], handler: sink) == 1)
        #expect(replica.log == ["W0", "W65536", "W131072"], "the write after the FLUSH went out; the FLUSH did not")
        let ids = local.heldTags
        finishLocal(local, route, ids[0])
        replica.answer("W0")
        finishLocal(local, route, ids[1])
        usleep(20_000)
        #expect(!replica.log.contains("F") && !flush.hasReturned, "one write before the FLUSH is still out on the replica")
        replica.answer("W65536")
        #expect(waitFor { replica.log.contains("F") })
        #expect(!flush.hasReturned)
        replica.answer("F")
        flush.wait()
        #expect(replica.log == ["W0", "W65536", "W131072", "F"])
        finishLocal(local, route, ids[2])
        replica.answer("W131072")
        #expect(waitFor { sink.tags.count == 3 })
    }

    /// Writes to the same block keep their order on both sides: the second starts when the first is done.
    @Test func overlappingWritesKeepTheirOrder() throws {
        let (route, local, replica, _) = try mirrored()
        let sink = CompletionSink(), pages = PageBuffers()
        #expect(route.submitAsync([write(4096, pages.page(filledWith: 1), tag: 0), write(4096, pages.page(filledWith: 2), tag: 1),
                                   write(8192, pages.page(filledWith: 3), tag: 2)], handler: sink) == 3)
        #expect(local.heldTags.count == 2 && replica.log == ["W4096", "W8192"], "the overlapping write waits")
        finishLocal(local, route, local.heldTags[0])
        replica.answer("W4096")
        #expect(waitFor { replica.log == ["W4096", "W8192", "W4096"] && local.heldTags.count == 2 })
        for tag in local.heldTags { finishLocal(local, route, tag) }
        replica.answer("W4096")
        replica.answer("W8192")
        #expect(waitFor { sink.tags.count == 3 })
        #expect(sink.tags.first == 0)
        #expect(Array(replica.snapshot[4096..<8192]) == [UInt8](repeating: 2, count: 4096) && local.bytes(at: 4096, count: 4096) == [UInt8](repeating: 2, count: 4096))
    }

    /// The local device fails one of several requests in flight: every one of them is answered by the
    /// replica (reads replayed there in arrival order, writes from their replica halves), a request
    /// arriving meanwhile waits until the failed one is answered, and the guest sees no error.
    @Test func aFaultWithRequestsInFlightReplaysThemInOrder() throws {
        let size = 1 << 20
        let local = FlakyDisk(size: size, seed: 1)
        let replica = HeldReplica(size: size)
        let route = RoutedBlockBackend(local: local, chunkSize: 64 << 10)
        let log = EventLog()
        route.onEvent = { log.add($0) }
        route.localTimeout = 30  // local halves on workers, reads through bounce buffers; the time-out itself never fires here
        try route.attachReplica(replica)
        #expect(waitFor { route.status.route == .mirror })
        let expected = replica.snapshot
        #expect(expected == local.snapshot)

        let sink = CompletionSink(), pages = PageBuffers()
        local.mode = .hanging
        let reads = (0..<4).map { BlockIORequest(isWrite: false, offset: UInt64(3 - $0) * 8192, buffers: [pages.page(filledWith: 0xEE)], tag: UInt64($0)) }
        let written = pages.page(filledWith: 0x77)
        #expect(route.submitAsync(Array(reads[0..<2]) + [write(200_704, written, tag: 10)] + Array(reads[2..<4]), handler: sink) == 5)
        #expect(replica.log == ["W200704"], "in mirror only writes go to the replica")
        replica.answer("W200704")  // acknowledged by the replica; its local half hangs
        local.release.signal()      // one local request comes back with an error: the fault
        #expect(waitFor { replica.log.count == 5 })
        #expect(replica.log == ["W200704", "R24576", "R16384", "R8192", "R0"], "replayed in arrival order")
        #expect(route.status.route == .remote)
        // A request arriving now is held until the failed one is answered by the replica.
        #expect(route.submitAsync([BlockIORequest(isWrite: false, offset: 65536, buffers: [pages.page(filledWith: 0xEE)], tag: 20)],
                                  handler: sink) == 1)
        // Which hung local half comes back first (with the error) is up to the scheduler: a read, and the
        // new request waits for its replay; or the write, answered at once from its replica half, and
        // nothing is left to wait for.
        if waitFor({ route.status.held == 1 }) {
            #expect(replica.log.count == 5)
        } else {
            #expect(waitFor { replica.log.count == 6 }, "not held, so sent: \(replica.log)")
        }
        for _ in 0..<4 { replica.answer(0) }
        #expect(waitFor { replica.log.count == 6 })
        #expect(replica.log.last == "R65536" && route.status.held == 0)
        replica.answer(0)
        #expect(waitFor { sink.tags.count == 6 })
        #expect(zip(sink.tags, sink.results).allSatisfy { $0.1 == 4096 }, "no error reached the guest: \(sink.results)")
        for read in reads {
            let offset = Int(read.offset)
            #expect(Array(read.buffers[0]) == Array(expected[offset..<(offset + 4096)]))
        }
        #expect(log.kinds.contains("local-fault") && log.kinds.contains("failover"), "\(log.kinds)")
        #expect((log.first("failover")?.held ?? 0) >= 4)
        #expect(route.status.failovers == 1 && route.status.localFailed)
        for _ in 0..<8 { local.release.signal() }  // the hanging workers return; their answers are ignored
    }

    /// The replica fails one write while others are out there: the disk degrades to local, every write
    /// is answered without an error once its local half is back, and the chunks of all of them are
    /// remembered; late answers from the dropped replica change nothing.
    @Test func aReplicaFailureMidFlightDegradesWithoutAGuestError() throws {
        let (route, local, replica, log) = try mirrored()
        let sink = CompletionSink(), pages = PageBuffers()
        let writes = (0..<4).map { write(UInt64($0) * 65536 + 4096, pages.page(filledWith: UInt8($0 + 1)), tag: UInt64($0)) }
        #expect(route.submitAsync(writes, handler: sink) == 4)
        for tag in local.heldTags { finishLocal(local, route, tag) }
        replica.answer("W69632")
        #expect(waitFor { sink.tags == [1] })
        replica.answer("W135168", error: IODomainError.system("the replica's disk failed"))
        #expect(waitFor { sink.tags.count == 4 })
        #expect(sink.results.allSatisfy { $0 == 4096 })
        let status = route.status
        #expect(status.route == .local && !status.replica)
        #expect(status.bytesOutOfSync == 3 * 65536, "the three writes the replica may lack: \(status)")
        #expect(log.first("replica-fault") != nil)
        replica.answer(0)
        replica.answer(0)
        usleep(20_000)
        #expect(sink.tags.count == 4 && route.status.bytesOutOfSync == 3 * 65536)
    }

    /// Writes submitted many at a time while the replica is being copied all reach it.
    @Test func writesInFlightDuringTheSyncAreNotLost() throws {
        let size = 4 << 20
        let local = FlakyDisk(size: size, seed: 1), replica = FlakyDisk(size: size, seed: 99)
        replica.writeDelay = 300
        let route = RoutedBlockBackend(local: local, chunkSize: 64 << 10)
        try route.attachReplica(replica)
        let sink = CompletionSink(), pages = PageBuffers()
        var round = 0
        while route.status.route != .mirror && round < 40 {
            let batch = (0..<8).map { i -> BlockIORequest in
                let offset = UInt64((round * 8 + i) * 37 % 60) * 65536 + UInt64(i) * 512
                return write(offset, pages.page(filledWith: UInt8(truncatingIfNeeded: round * 8 + i + 1), count: 1024), tag: UInt64(round * 8 + i))
            }
            #expect(route.submitAsync(batch, handler: sink) == 8)
            #expect(waitFor { sink.tags.count == (round + 1) * 8 })
            round += 1
        }
        #expect(waitFor { route.status.route == .mirror })
        #expect(replica.snapshot == local.snapshot, "the replica got every write made during the copy")
    }

    /// Through a virtio-blk device: writes in flight, then a FLUSH, which the device hands to the route
    /// like the writes (it never waits for the route with its lock held): the FLUSH reaches the replica
    /// only after the writes, and every answer reaches the used ring.
    @Test func aDeviceFlushBehindWritesInFlight() throws {
        let (route, local, replica, _) = try mirrored()
        let harness = try VirtioBlockHarness(backend: route, queueSize: 64)
        var writes: [VirtioBlockHarness.Submitted] = []
        for i in 0..<4 {
            let request = try harness.prepare(type: VirtioBlkType.write, sector: UInt64(i) * 128, out: [UInt8](repeating: UInt8(i + 1), count: 4096))
            try harness.driver.publish(request.head)
            writes.append(request)
        }
        harness.device.queueNotified(0)
        #expect(replica.heldCount == 4 && local.heldTags.count == 4)
        let flush = try harness.prepare(type: VirtioBlkType.flush, sector: 0)
        try harness.driver.publish(flush.head)
        harness.device.queueNotified(0)
        #expect(harness.device.requestsInFlight == 5 && replica.heldCount == 4, "the FLUSH waits in the route, not in the device")
        for tag in local.heldTags { finishLocal(local, route, tag) }
        for _ in 0..<3 { replica.answer(0) }
        usleep(20_000)
        #expect(try harness.status(of: flush) == 0xFF && replica.heldLog == ["W196608"])
        replica.answer(0)
        #expect(waitFor { replica.heldLog == ["F"] })
        replica.answer(0)
        #expect(waitFor { harness.device.requestsInFlight == 0 })
        harness.device.waitUntilIdle()
        for request in writes + [flush] { #expect(try harness.status(of: request) == VirtioBlkStatus.ok) }
        #expect(Array(replica.snapshot[0..<4096]) == [UInt8](repeating: 1, count: 4096))
        #expect(harness.device.statistics.flushes == 1 && harness.device.statistics.errors == 0)
    }
}

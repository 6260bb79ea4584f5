import Foundation
import GodwitSystem
@testable import IODomain
import Testing
import Virtio

/// A disk in memory whose failures are switched on by the test: errors, or hanging until released.
private final class FlakyDisk: BlockBackend, ReplicaStorage, @unchecked Sendable {
    enum Mode { case healthy, failing, hanging }
    let lock = NSLock()
    var bytes: [UInt8]
    var mode = Mode.healthy
    var writes = 0
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
        switch lock.withLock({ mode }) {
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
            writes += 1
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

private final class EventLog: @unchecked Sendable {
    let lock = NSLock()
    var events: [RouteEvent] = []
    func add(_ e: RouteEvent) { lock.withLock { events.append(e) } }
    var kinds: [String] { lock.withLock { events.map(\.kind) } }
    func first(_ kind: String) -> RouteEvent? { lock.withLock { events.first { $0.kind == kind } } }
}

private func waitFor(_ condition: () -> Bool) -> Bool {
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
    /// waits for those to come back before the copy starts, and from then on requests go through the route.
    @Test func plainLocalRequestsGoStraightToTheEngine() throws {
        let held = VirtioHeldBackend(capacity: 1 << 20)
        let route = RoutedBlockBackend(local: held)
        final class Sink: AsyncIOHandler {
            var completed: [UInt64] = []
            func asyncIOCompleted(tag: UInt64, result: Int) { completed.append(tag) }
            func asyncIOBatchEnded() {}
        }
        let sink = Sink()
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
        for tag in 0..<3 { held.complete(UInt64(tag)) }
        attached.wait()
        #expect(sink.completed.sorted() == [0, 1, 2])
        #expect(!route.acceptsAsync(isWrite: true, offset: 0, buffers: [page]), "with a replica every request goes through the route")
        #expect(route.submitAsync(requests, handler: sink) == 0)
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

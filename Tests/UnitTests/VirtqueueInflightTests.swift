import GodwitSystem
import GuestMemory
import Testing
@testable import Virtio

/// Inflight tracking (vhost-user INFLIGHT_SHMFD) over plain memory: what a restarted device finds.
@Suite struct VirtqueueInflightTests {
    /// A region shared by the "old" and the "new" device process (anonymous memory here).
    final class Region {
        let mapping: MemoryMapping
        init(queueSize: UInt16) throws { mapping = try MemoryMapping(size: VirtqueueInflight.regionSize(queueSize: queueSize), fd: nil) }
        func tracker(_ size: UInt16) throws -> VirtqueueInflight {
            try VirtqueueInflight(base: mapping.base, length: mapping.size, queueSize: size, owner: mapping)
        }
    }

    func request(_ driver: VirtioTestDriver) throws -> UInt16 {
        let head = try driver.addChain([VirtioTestBuffer(address: try driver.allocate(16), length: 16, writable: false),
                                        VirtioTestBuffer(address: try driver.allocate(1), length: 1, writable: true)])
        try driver.publish(head)
        return head
    }

    @Test func takenButNotReturnedChainsAreResubmittedOldestFirst() throws {
        let driver = try VirtioTestDriver(size: 16)
        let region = try Region(queueSize: 16)
        let old = try driver.makeQueue()
        #expect(try old.resumeInflight(region.tracker(16)) == 0)
        let heads = try (0..<4).map { _ in try request(driver) }
        let taken = try (0..<3).map { _ in try #require(try old.popAvailable()) }
        try old.addUsed(head: taken[0].head, length: 1)
        // The old device dies here: chains 1 and 2 were taken and not returned; 3 was never taken.
        let new = try driver.makeQueue()
        #expect(try new.resumeInflight(region.tracker(16)) == 2)
        #expect(new.nextAvail == 3 && new.nextUsed == 1)
        #expect(try new.popAvailable()?.head == heads[1])
        #expect(try new.popAvailable()?.head == heads[2])
        #expect(try new.popAvailable()?.head == heads[3])
        #expect(try new.popAvailable() == nil)
        for head in heads[1...] { try new.addUsed(head: head, length: 1) }
        #expect(try driver.takeUsed().map(\.id) == heads.map(UInt32.init))
        // A third process finds nothing in flight.
        let third = try driver.makeQueue()
        #expect(try third.resumeInflight(region.tracker(16)) == 0)
        #expect(third.nextAvail == 4)
    }

    /// The old device published the used idx but died before clearing its marks: those chains were
    /// completed and must not run again.
    @Test func aReturnCutShortIsSettledFromTheUsedRing() throws {
        let driver = try VirtioTestDriver(size: 8)
        let region = try Region(queueSize: 8)
        let old = try driver.makeQueue()
        try old.resumeInflight(region.tracker(8))
        let heads = try (0..<3).map { _ in try request(driver) }
        let taken = try (0..<3).map { _ in try #require(try old.popAvailable()) }
        // Publish two completions behind the tracker's back (as if the process died mid-return).
        old.inflight = nil
        try old.addUsed([(head: taken[0].head, length: 1), (head: taken[1].head, length: 1)])
        let new = try driver.makeQueue()
        #expect(try new.resumeInflight(region.tracker(8)) == 1)
        #expect(try new.popAvailable()?.head == heads[2])
    }

    @Test func aFreshRegionKeepsTheFrontendsPosition() throws {
        let driver = try VirtioTestDriver(size: 8)
        let region = try Region(queueSize: 8)
        _ = try request(driver)
        let queue = try driver.makeQueue()
        queue.nextAvail = 1  // e.g. restored by migration: request 0 was done elsewhere
        #expect(try queue.resumeInflight(region.tracker(8)) == 0)
        #expect(queue.nextAvail == 1)
    }

    /// The region is the frontend's memory: garbage in it must not trap or reach outside the ring.
    @Test func aHostileRegionCannotBreakTheDevice() throws {
        let driver = try VirtioTestDriver(size: 8)
        let region = try Region(queueSize: 8)
        _ = try region.tracker(8)  // desc_num = 8: a region "in use"
        // Every byte after the header set: every head in flight, huge counters, used idx far away.
        for i in 12..<region.mapping.size { region.mapping.base.storeBytes(of: UInt8(0xff), toByteOffset: i, as: UInt8.self) }
        for i in 0..<8 { region.mapping.base.storeBytes(of: UInt8(1), toByteOffset: 16 + 16 * i, as: UInt8.self) }
        let queue = try driver.makeQueue()
        // 8 "in flight" heads but the driver made none available: the avail idx check refuses the ring.
        let resubmitted = try queue.resumeInflight(region.tracker(8))
        #expect(resubmitted > 0 && resubmitted <= 8)
        #expect(throws: VirtioError.self) { _ = try queue.pendingCount() }
        // A region too small for the queue is refused with a clear error.
        #expect(throws: VirtioError.self) { _ = try VirtqueueInflight(base: region.mapping.base, length: 64, queueSize: 8, owner: region.mapping) }
    }
}

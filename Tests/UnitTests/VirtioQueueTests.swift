import Foundation
import GuestMemory
import Testing
import Virtio

// MARK: - A test-side virtio driver

/// Descriptor flags as a driver writes them.
enum VirtioTestFlag {
    static let next: UInt16 = 1
    static let write: UInt16 = 2
    static let indirect: UInt16 = 4
}

/// One buffer of a chain the test driver builds.
struct VirtioTestBuffer {
    var address: UInt64
    var length: UInt32
    var writable: Bool
}

/// Plays the driver's side of one split virtqueue in plain guest memory: writes descriptors and
/// avail entries, reads used entries. Guest RAM is 4 MiB at 0; rings live in the first 64 KiB,
/// buffers are handed out from 1 MiB up.
/// Hands out guest memory for buffers (16-byte aligned, from 1 MiB up), shared by the rings of one device.
final class VirtioTestAllocator {
    let memory: GuestMemory
    private var next: UInt64 = 1 << 20

    init(memory: GuestMemory) { self.memory = memory }

    /// `count` bytes filled with `fill`.
    func allocate(_ count: Int, fill: UInt8 = 0) throws -> UInt64 {
        let address = next
        next += (UInt64(count) + 15) & ~15
        try memory.writeBytes([UInt8](repeating: fill, count: count), at: address)
        return address
    }

    /// A copy of `bytes`.
    func place(_ bytes: [UInt8]) throws -> UInt64 {
        let address = try allocate(bytes.count)
        try memory.writeBytes(bytes, at: address)
        return address
    }
}

final class VirtioTestDriver {
    static let ramSize: UInt64 = 4 << 20

    let memory: GuestMemory
    let index: Int
    let size: UInt16
    let descriptorTable: UInt64
    let driverArea: UInt64
    let deviceArea: UInt64
    let allocator: VirtioTestAllocator
    var availIdx: UInt16 = 0
    var usedSeen: UInt16 = 0
    var nextDescriptor: UInt16 = 0

    /// A ring at `base` (default 0x1000) of queue `index`; rings of one device share an `allocator`.
    init(size: UInt16 = 16, memory: GuestMemory? = nil, index: Int = 0, base: UInt64? = nil,
         allocator: VirtioTestAllocator? = nil) throws {
        self.memory = try memory ?? GuestMemory.anonymous(layout: [(base: 0, size: VirtioTestDriver.ramSize)])
        self.index = index
        self.size = size
        self.allocator = allocator ?? VirtioTestAllocator(memory: self.memory)
        if let base {
            descriptorTable = base
            driverArea = base + 16 * UInt64(size)
            deviceArea = (driverArea + 6 + 2 * UInt64(size) + 0xFF) & ~0xFF
        } else {
            descriptorTable = 0x1000
            driverArea = descriptorTable + 16 * UInt64(size) + 0x100
            deviceArea = (driverArea + 6 + 2 * UInt64(size) + 0x100) & ~0xFF
        }
    }

    /// Creates the device-side queue over this layout.
    func makeQueue(features: UInt64 = VirtioFeature.version1) throws -> Virtqueue {
        try Virtqueue(index: index, memory: memory, size: size, descriptorTable: descriptorTable, driverArea: driverArea,
                      deviceArea: deviceArea, features: features)
    }

    /// Creates the device-side queue starting where the driver is (as after a reset and re-activation).
    func makeQueueAtDriverPosition(features: UInt64) throws -> Virtqueue {
        let queue = try makeQueue(features: features)
        queue.nextAvail = availIdx
        queue.nextUsed = usedSeen
        return queue
    }

    /// Hands out `count` bytes of guest memory (16-byte aligned), filled with `fill`.
    func allocate(_ count: Int, fill: UInt8 = 0) throws -> UInt64 { try allocator.allocate(count, fill: fill) }

    /// Copies `bytes` into fresh guest memory.
    func place(_ bytes: [UInt8]) throws -> UInt64 { try allocator.place(bytes) }

    func writeDescriptor(table: UInt64? = nil, _ index: UInt16, address: UInt64, length: UInt32, flags: UInt16,
                         next: UInt16 = 0) throws {
        let entry = (table ?? descriptorTable) + 16 * UInt64(index)
        try memory.store(address, at: entry)
        try memory.store(length, at: entry + 8)
        try memory.store(flags, at: entry + 12)
        try memory.store(next, at: entry + 14)
    }

    /// Writes `buffers` into consecutive free descriptors linked with NEXT; returns the head.
    func addChain(_ buffers: [VirtioTestBuffer]) throws -> UInt16 {
        let head = nextDescriptor
        for (i, buffer) in buffers.enumerated() {
            let index = (head &+ UInt16(i)) % size
            let last = i == buffers.count - 1
            let flags = (last ? 0 : VirtioTestFlag.next) | (buffer.writable ? VirtioTestFlag.write : 0)
            try writeDescriptor(index, address: buffer.address, length: buffer.length, flags: flags,
                                next: (index &+ 1) % size)
        }
        nextDescriptor = (head &+ UInt16(buffers.count)) % size
        return head
    }

    /// Writes `buffers` as an indirect table and one descriptor pointing to it; returns the head.
    func addIndirectChain(_ buffers: [VirtioTestBuffer]) throws -> UInt16 {
        let table = try allocate(16 * buffers.count)
        for (i, buffer) in buffers.enumerated() {
            let last = i == buffers.count - 1
            let flags = (last ? 0 : VirtioTestFlag.next) | (buffer.writable ? VirtioTestFlag.write : 0)
            try writeDescriptor(table: table, UInt16(i), address: buffer.address, length: buffer.length, flags: flags,
                                next: UInt16(i + 1))
        }
        let head = nextDescriptor
        try writeDescriptor(head, address: table, length: UInt32(16 * buffers.count), flags: VirtioTestFlag.indirect)
        nextDescriptor = (head &+ 1) % size
        return head
    }

    /// Puts `head` in the next avail slot and publishes the new avail idx.
    func publish(_ head: UInt16) throws {
        try memory.store(head, at: driverArea + 4 + 2 * UInt64(availIdx % size))
        availIdx &+= 1
        try memory.store(availIdx, at: driverArea + 2)
    }

    func setAvailIdx(_ value: UInt16) throws {
        availIdx = value
        try memory.store(value, at: driverArea + 2)
    }

    func setAvailFlags(_ flags: UInt16) throws { try memory.store(flags, at: driverArea) }
    func setUsedEvent(_ value: UInt16) throws { try memory.store(value, at: driverArea + 4 + 2 * UInt64(size)) }
    func availEvent() throws -> UInt16 { try memory.load(UInt16.self, at: deviceArea + 4 + 8 * UInt64(size)) }
    func usedIdx() throws -> UInt16 { try memory.load(UInt16.self, at: deviceArea + 2) }

    /// The used elements published since the last call.
    func takeUsed() throws -> [(id: UInt32, length: UInt32)] {
        let idx = try usedIdx()
        var result: [(id: UInt32, length: UInt32)] = []
        while usedSeen != idx {
            let element = deviceArea + 4 + 8 * UInt64(usedSeen % size)
            result.append((try memory.load(UInt32.self, at: element), try memory.load(UInt32.self, at: element + 4)))
            usedSeen &+= 1
        }
        return result
    }
}

func virtioExpectError(_ expected: VirtioError, sourceLocation: SourceLocation = #_sourceLocation,
                       _ body: () throws -> Void) {
    do {
        try body()
        Issue.record("expected \(expected), got no error", sourceLocation: sourceLocation)
    } catch let error as VirtioError {
        #expect(error == expected, sourceLocation: sourceLocation)
        #expect(!error.description.isEmpty, sourceLocation: sourceLocation)
    } catch {
        Issue.record("expected \(expected), got \(error)", sourceLocation: sourceLocation)
    }
}

// MARK: - Virtqueue and descriptor chain tests

@Suite struct VirtioQueueTests {
    @Test func goodChainYieldsSegmentsAndUsedEntry() throws {
        let driver = try VirtioTestDriver()
        let queue = try driver.makeQueue()
        let a = try driver.allocate(100), b = try driver.allocate(28), c = try driver.allocate(512)
        let head = try driver.addChain([
            VirtioTestBuffer(address: a, length: 100, writable: false),
            VirtioTestBuffer(address: b, length: 28, writable: false),
            VirtioTestBuffer(address: c, length: 512, writable: true),
        ])
        try driver.publish(head)

        let chain = try #require(try queue.popAvailable())
        #expect(chain.head == head)
        #expect(chain.readable == [DescriptorSegment(address: a, length: 100), DescriptorSegment(address: b, length: 28)])
        #expect(chain.writable == [DescriptorSegment(address: c, length: 512)])
        #expect(chain.readableLength == 128 && chain.writableLength == 512)
        #expect(try queue.popAvailable() == nil)
        #expect(queue.nextAvail == 1)

        try queue.addUsed(head: chain.head, length: 77)
        let used = try driver.takeUsed()
        #expect(used.count == 1)
        #expect(used.first?.id == UInt32(head) && used.first?.length == 77)
        #expect(queue.nextUsed == 1)
    }

    @Test func emptyRingReturnsNil() throws {
        let driver = try VirtioTestDriver()
        let queue = try driver.makeQueue()
        #expect(try queue.popAvailable() == nil)
        #expect(queue.nextAvail == 0)
    }

    @Test func headOutOfRange() throws {
        let driver = try VirtioTestDriver(size: 16)
        let queue = try driver.makeQueue()
        try driver.publish(16)
        virtioExpectError(.headOutOfRange(head: 16, queueSize: 16)) { _ = try queue.popAvailable() }
    }

    @Test func nextOutOfRange() throws {
        let driver = try VirtioTestDriver(size: 16)
        let queue = try driver.makeQueue()
        let a = try driver.allocate(64)
        try driver.writeDescriptor(0, address: a, length: 64, flags: VirtioTestFlag.next, next: 40)
        try driver.publish(0)
        virtioExpectError(.nextOutOfRange(index: 0, next: 40, tableSize: 16)) { _ = try queue.popAvailable() }
    }

    @Test func loopIsCaught() throws {
        let driver = try VirtioTestDriver(size: 8)
        let queue = try driver.makeQueue()
        let a = try driver.allocate(64)
        try driver.writeDescriptor(0, address: a, length: 64, flags: VirtioTestFlag.next, next: 1)
        try driver.writeDescriptor(1, address: a, length: 64, flags: VirtioTestFlag.next, next: 0)
        try driver.publish(0)
        virtioExpectError(.chainTooLong(head: 0, limit: 8)) { _ = try queue.popAvailable() }
    }

    @Test func selfLoopIsCaught() throws {
        let driver = try VirtioTestDriver(size: 4)
        let queue = try driver.makeQueue()
        let a = try driver.allocate(64)
        try driver.writeDescriptor(2, address: a, length: 64, flags: VirtioTestFlag.next, next: 2)
        try driver.publish(2)
        virtioExpectError(.chainTooLong(head: 2, limit: 4)) { _ = try queue.popAvailable() }
    }

    @Test func chainOfExactlyQueueSizeIsAcceptedButNotLonger() throws {
        let driver = try VirtioTestDriver(size: 8)
        let queue = try driver.makeQueue(features: VirtioFeature.version1 | VirtioFeature.indirectDescriptors)
        let a = try driver.allocate(8)
        let eight = Array(repeating: VirtioTestBuffer(address: a, length: 8, writable: false), count: 8)
        try driver.publish(try driver.addChain(eight))
        let chain = try #require(try queue.popAvailable())
        #expect(chain.descriptorCount == 8 && chain.readableLength == 64)

        // Nine descriptors through an indirect table: longer than the queue size.
        try driver.publish(try driver.addIndirectChain(eight + [eight[0]]))
        virtioExpectError(.indirectBadLength(index: 0, length: 9 * 16)) { _ = try queue.popAvailable() }
    }

    @Test func zeroLengthDescriptorRejected() throws {
        let driver = try VirtioTestDriver()
        let queue = try driver.makeQueue()
        let a = try driver.allocate(16)
        let head = try driver.addChain([
            VirtioTestBuffer(address: a, length: 16, writable: false),
            VirtioTestBuffer(address: a, length: 0, writable: true),
        ])
        try driver.publish(head)
        virtioExpectError(.zeroLengthDescriptor(index: head + 1)) { _ = try queue.popAvailable() }
    }

    @Test func bufferOutsideRam() throws {
        let driver = try VirtioTestDriver()
        let queue = try driver.makeQueue()
        let end = VirtioTestDriver.ramSize
        // Straddles the end of RAM by one byte.
        try driver.publish(try driver.addChain([VirtioTestBuffer(address: end - 511, length: 512, writable: true)]))
        virtioExpectError(.bufferOutOfRange(index: 0, address: end - 511, length: 512)) { _ = try queue.popAvailable() }
        // Wholly outside.
        try driver.publish(try driver.addChain([VirtioTestBuffer(address: 1 << 40, length: 1, writable: false)]))
        virtioExpectError(.bufferOutOfRange(index: 1, address: 1 << 40, length: 1)) { _ = try queue.popAvailable() }
    }

    @Test func addressPlusLengthOverflow() throws {
        let driver = try VirtioTestDriver()
        let queue = try driver.makeQueue()
        let address = UInt64.max - 0xFFF
        try driver.publish(try driver.addChain([VirtioTestBuffer(address: address, length: 0x2000, writable: false)]))
        virtioExpectError(.addressOverflow(index: 0, address: address, length: 0x2000)) { _ = try queue.popAvailable() }
    }

    @Test func readableAfterWritableRejected() throws {
        let driver = try VirtioTestDriver()
        let queue = try driver.makeQueue()
        let a = try driver.allocate(64)
        let head = try driver.addChain([
            VirtioTestBuffer(address: a, length: 16, writable: false),
            VirtioTestBuffer(address: a, length: 16, writable: true),
            VirtioTestBuffer(address: a, length: 16, writable: false),
        ])
        try driver.publish(head)
        virtioExpectError(.readableAfterWritable(index: head + 2)) { _ = try queue.popAvailable() }
    }

    @Test func totalLengthCap() throws {
        let driver = try VirtioTestDriver()
        let queue = try driver.makeQueue()
        queue.maxChainBytes = 1000
        let a = try driver.allocate(4096)
        try driver.publish(try driver.addChain([
            VirtioTestBuffer(address: a, length: 600, writable: false),
            VirtioTestBuffer(address: a, length: 600, writable: true),
        ]))
        virtioExpectError(.chainTooLarge(head: 0, bytes: 1200, limit: 1000)) { _ = try queue.popAvailable() }
    }

    @Test func indirectTableGood() throws {
        let driver = try VirtioTestDriver()
        let queue = try driver.makeQueue(features: VirtioFeature.version1 | VirtioFeature.indirectDescriptors)
        let a = try driver.allocate(16), b = try driver.allocate(4096), c = try driver.allocate(1)
        let head = try driver.addIndirectChain([
            VirtioTestBuffer(address: a, length: 16, writable: false),
            VirtioTestBuffer(address: b, length: 4096, writable: true),
            VirtioTestBuffer(address: c, length: 1, writable: true),
        ])
        try driver.publish(head)
        let chain = try #require(try queue.popAvailable())
        #expect(chain.head == head)
        #expect(chain.readable == [DescriptorSegment(address: a, length: 16)])
        #expect(chain.writable == [DescriptorSegment(address: b, length: 4096), DescriptorSegment(address: c, length: 1)])
        #expect(chain.descriptorCount == 3)
    }

    @Test func indirectWithoutNegotiation() throws {
        let driver = try VirtioTestDriver()
        let queue = try driver.makeQueue()
        let a = try driver.allocate(16)
        try driver.publish(try driver.addIndirectChain([VirtioTestBuffer(address: a, length: 16, writable: false)]))
        virtioExpectError(.indirectNotNegotiated(index: 0)) { _ = try queue.popAvailable() }
    }

    @Test func indirectNested() throws {
        let driver = try VirtioTestDriver()
        let queue = try driver.makeQueue(features: VirtioFeature.version1 | VirtioFeature.indirectDescriptors)
        let inner = try driver.allocate(16)
        let table = try driver.allocate(32)
        try driver.writeDescriptor(table: table, 0, address: inner, length: 16, flags: VirtioTestFlag.next, next: 1)
        try driver.writeDescriptor(table: table, 1, address: inner, length: 16, flags: VirtioTestFlag.indirect)
        try driver.writeDescriptor(0, address: table, length: 32, flags: VirtioTestFlag.indirect)
        try driver.publish(0)
        virtioExpectError(.nestedIndirect(index: 1)) { _ = try queue.popAvailable() }
    }

    @Test func indirectBadLength() throws {
        let driver = try VirtioTestDriver()
        let queue = try driver.makeQueue(features: VirtioFeature.version1 | VirtioFeature.indirectDescriptors)
        let table = try driver.allocate(64)
        try driver.writeDescriptor(0, address: table, length: 24, flags: VirtioTestFlag.indirect)
        try driver.publish(0)
        virtioExpectError(.indirectBadLength(index: 0, length: 24)) { _ = try queue.popAvailable() }
        try driver.writeDescriptor(1, address: table, length: 0, flags: VirtioTestFlag.indirect)
        try driver.publish(1)
        virtioExpectError(.indirectBadLength(index: 1, length: 0)) { _ = try queue.popAvailable() }
    }

    @Test func indirectTableOutOfRange() throws {
        let driver = try VirtioTestDriver()
        let queue = try driver.makeQueue(features: VirtioFeature.version1 | VirtioFeature.indirectDescriptors)
        let address = VirtioTestDriver.ramSize - 16
        try driver.writeDescriptor(0, address: address, length: 32, flags: VirtioTestFlag.indirect)
        try driver.publish(0)
        virtioExpectError(.indirectTableOutOfRange(index: 0, address: address, length: 32)) {
            _ = try queue.popAvailable()
        }
    }

    @Test func indirectWithNextFlagAndInnerNextOutOfRange() throws {
        let driver = try VirtioTestDriver()
        let queue = try driver.makeQueue(features: VirtioFeature.version1 | VirtioFeature.indirectDescriptors)
        let data = try driver.allocate(16)
        let table = try driver.allocate(32)
        try driver.writeDescriptor(0, address: table, length: 32, flags: VirtioTestFlag.indirect | VirtioTestFlag.next,
                                   next: 1)
        try driver.publish(0)
        virtioExpectError(.indirectWithNext(index: 0)) { _ = try queue.popAvailable() }

        // Inside a two-entry table, next = 2 is out of range even though the queue has 16 entries.
        try driver.writeDescriptor(table: table, 0, address: data, length: 16, flags: VirtioTestFlag.next, next: 2)
        try driver.writeDescriptor(1, address: table, length: 32, flags: VirtioTestFlag.indirect)
        try driver.publish(1)
        virtioExpectError(.nextOutOfRange(index: 0, next: 2, tableSize: 2)) { _ = try queue.popAvailable() }
    }

    @Test func loopInsideIndirectTable() throws {
        let driver = try VirtioTestDriver(size: 4)
        let queue = try driver.makeQueue(features: VirtioFeature.version1 | VirtioFeature.indirectDescriptors)
        let data = try driver.allocate(16)
        let table = try driver.allocate(32)
        try driver.writeDescriptor(table: table, 0, address: data, length: 16, flags: VirtioTestFlag.next, next: 1)
        try driver.writeDescriptor(table: table, 1, address: data, length: 16, flags: VirtioTestFlag.next, next: 0)
        try driver.writeDescriptor(0, address: table, length: 32, flags: VirtioTestFlag.indirect)
        try driver.publish(0)
        virtioExpectError(.chainTooLong(head: 0, limit: 4)) { _ = try queue.popAvailable() }
    }

    @Test func availIndexTooFarAhead() throws {
        let driver = try VirtioTestDriver(size: 16)
        let queue = try driver.makeQueue()
        try driver.setAvailIdx(17)
        virtioExpectError(.availIndexTooFar(availIndex: 17, nextAvail: 0, queueSize: 16)) {
            _ = try queue.popAvailable()
        }
        // Exactly a full ring is fine.
        try driver.setAvailIdx(16)
        #expect(try queue.pendingCount() == 16)
    }

    @Test func queueCreationChecks() throws {
        let driver = try VirtioTestDriver(size: 16)
        let memory = driver.memory
        virtioExpectError(.badQueueSize(queue: 3, size: 12, maximum: 256)) {
            _ = try Virtqueue(index: 3, memory: memory, size: 12, descriptorTable: 0x1000, driverArea: 0x2000,
                              deviceArea: 0x3000, features: 0, maxSize: 256)
        }
        virtioExpectError(.badQueueSize(queue: 0, size: 512, maximum: 256)) {
            _ = try Virtqueue(memory: memory, size: 512, descriptorTable: 0x1000, driverArea: 0x4000,
                              deviceArea: 0x6000, features: 0, maxSize: 256)
        }
        virtioExpectError(.badQueueSize(queue: 0, size: 0, maximum: 256)) {
            _ = try Virtqueue(memory: memory, size: 0, descriptorTable: 0x1000, driverArea: 0x2000,
                              deviceArea: 0x3000, features: 0, maxSize: 256)
        }
        virtioExpectError(.misalignedRing(queue: 0, ring: "descriptor table", address: 0x1008)) {
            _ = try Virtqueue(memory: memory, size: 16, descriptorTable: 0x1008, driverArea: 0x2000,
                              deviceArea: 0x3000, features: 0)
        }
        virtioExpectError(.ringOutOfRange(queue: 0, ring: "device area (used ring)",
                                          address: VirtioTestDriver.ramSize - 64, length: 6 + 8 * 16)) {
            _ = try Virtqueue(memory: memory, size: 16, descriptorTable: 0x1000, driverArea: 0x2000,
                              deviceArea: VirtioTestDriver.ramSize - 64, features: 0)
        }
    }

    @Test(arguments: [
        (event: UInt16(0), new: UInt16(1), old: UInt16(0), expected: true),
        (event: 0, new: 2, old: 1, expected: false),
        (event: 5, new: 10, old: 3, expected: true),
        (event: 10, new: 10, old: 3, expected: false),
        (event: 2, new: 10, old: 3, expected: false),
        (event: 0xFFFF, new: 1, old: 0xFFFE, expected: true),
        (event: 0, new: 1, old: 0xFFFE, expected: true),
        (event: 1, new: 1, old: 0xFFFE, expected: false),
    ])
    func needEventFormula(event: UInt16, new: UInt16, old: UInt16, expected: Bool) {
        #expect(Virtqueue.needEvent(event: event, new: new, old: old) == expected)
    }

    @Test func eventIndexNotificationDecisions() throws {
        let driver = try VirtioTestDriver()
        let queue = try driver.makeQueue(features: VirtioFeature.version1 | VirtioFeature.eventIndex)
        let a = try driver.allocate(16)
        for _ in 0..<4 {
            try driver.publish(try driver.addChain([VirtioTestBuffer(address: a, length: 16, writable: true)]))
        }
        // Nothing used yet: never notify.
        #expect(try queue.needsNotification() == false)

        // used_event = 0: the driver wants to hear when used idx passes 0.
        try driver.setUsedEvent(0)
        let first = try #require(try queue.popAvailable())
        #expect(try driver.availEvent() == 1)
        try queue.addUsed(head: first.head, length: 0)
        #expect(try queue.needsNotification() == true)

        // Still used_event = 0: the next completion (used 1 -> 2) does not cross it.
        let second = try #require(try queue.popAvailable())
        try queue.addUsed(head: second.head, length: 0)
        #expect(try queue.needsNotification() == false)

        // used_event = 3: completing two more (2 -> 4) crosses it in one batch.
        try driver.setUsedEvent(3)
        for _ in 0..<2 {
            let chain = try #require(try queue.popAvailable())
            try queue.addUsed(head: chain.head, length: 0)
        }
        #expect(try queue.needsNotification() == true)
        #expect(try driver.takeUsed().count == 4)
        // The empty ring leaves avail_event at the device's position.
        #expect(try queue.popAvailable() == nil)
        #expect(try driver.availEvent() == 4)
    }

    @Test func noInterruptFlagWithoutEventIndex() throws {
        let driver = try VirtioTestDriver()
        let queue = try driver.makeQueue()
        let a = try driver.allocate(16)
        try driver.publish(try driver.addChain([VirtioTestBuffer(address: a, length: 16, writable: true)]))
        try driver.publish(try driver.addChain([VirtioTestBuffer(address: a, length: 16, writable: true)]))
        try driver.setAvailFlags(1)
        try queue.addUsed(head: try #require(try queue.popAvailable()).head, length: 16)
        #expect(try queue.needsNotification() == false)
        try driver.setAvailFlags(0)
        try queue.addUsed(head: try #require(try queue.popAvailable()).head, length: 16)
        #expect(try queue.needsNotification() == true)
        #expect(try queue.needsNotification() == false)  // nothing new
    }

    @Test func addUsedRejectsBadHead() throws {
        let driver = try VirtioTestDriver(size: 8)
        let queue = try driver.makeQueue()
        virtioExpectError(.headOutOfRange(head: 8, queueSize: 8)) { try queue.addUsed(head: 8, length: 0) }
        #expect(try driver.usedIdx() == 0)
    }

    @Test func stateRoundTripsAndIndicesWrap() throws {
        let driver = try VirtioTestDriver(size: 8)
        let features = VirtioFeature.version1 | VirtioFeature.eventIndex
        // Start the rings near the 16-bit wrap, as if restored from a long-running VM.
        let saved = VirtqueueState(size: 8, descriptorTable: driver.descriptorTable, driverArea: driver.driverArea,
                                   deviceArea: driver.deviceArea, nextAvail: 0xFFFE, nextUsed: 0xFFFE)
        let encoded = try JSONEncoder().encode(saved)
        let decoded = try JSONDecoder().decode(VirtqueueState.self, from: encoded)
        #expect(decoded == saved)

        let queue = try Virtqueue(memory: driver.memory, state: decoded, features: features)
        driver.availIdx = 0xFFFE
        driver.usedSeen = 0xFFFE
        let a = try driver.allocate(16)
        for _ in 0..<4 {
            try driver.publish(try driver.addChain([VirtioTestBuffer(address: a, length: 16, writable: true)]))
        }
        #expect(driver.availIdx == 2)
        var heads: [UInt16] = []
        while let chain = try queue.popAvailable() {
            heads.append(chain.head)
            try queue.addUsed(head: chain.head, length: 16)
        }
        #expect(heads == [0, 1, 2, 3])
        #expect(queue.state.nextAvail == 2 && queue.state.nextUsed == 2)
        #expect(try driver.takeUsed().map(\.id) == [0, 1, 2, 3])
        // Restored queues notify on their first batch even if used_event says otherwise.
        #expect(try queue.needsNotification() == true)
    }
}

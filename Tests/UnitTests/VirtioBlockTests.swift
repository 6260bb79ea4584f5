import Foundation
import GodwitSystem
import GuestMemory
import Testing
import Virtio

// MARK: - Helpers

/// A temporary image file with a known pattern, removed on deinit.
final class VirtioTempImage {
    let path: String

    /// Creates `size` bytes where byte i is `pattern(i)`.
    init(size: Int, pattern: (Int) -> UInt8 = { UInt8(truncatingIfNeeded: $0 &* 7 &+ $0 / 512) }) throws {
        path = FileManager.default.temporaryDirectory
            .appendingPathComponent("godwit-virtio-\(UUID().uuidString).img").path
        let bytes = (0..<size).map(pattern)
        guard FileManager.default.createFile(atPath: path, contents: Data(bytes)) else {
            throw CocoaError(.fileWriteUnknown)
        }
    }

    deinit { try? FileManager.default.removeItem(atPath: path) }

    /// The file's bytes, read by Foundation (not by the code under test).
    func bytes(at offset: Int, count: Int) throws -> [UInt8] {
        let data = try Data(contentsOf: URL(fileURLWithPath: path))
        return Array(data[offset..<(offset + count)])
    }

    var contents: [UInt8] { get throws { Array(try Data(contentsOf: URL(fileURLWithPath: path))) } }
}

/// Records what a device signals.
final class VirtioRecordingInterrupt: VirtioInterrupt, @unchecked Sendable {
    private let lock = NSLock()
    private var used = 0
    private var config = 0
    private var errors: [Error] = []

    func signalUsedBuffer(queue: Int) { lock.withLock { used += 1 } }
    func signalConfigChange() { lock.withLock { config += 1 } }
    func deviceNeedsReset(because error: Error) { lock.withLock { errors.append(error) } }

    var usedSignals: Int { lock.withLock { used } }
    var configSignals: Int { lock.withLock { config } }
    var resetErrors: [Error] { lock.withLock { errors } }
}

/// A backend whose every operation fails, for the I/O error path.
final class VirtioFailingBackend: BlockBackend {
    struct Failure: Error {}
    let capacity: UInt64 = 1 << 20
    let readOnly = false
    let blockSize: UInt32 = 512
    let supportsDiscard = true
    let supportsWriteZeroes = true
    func read(at offset: UInt64, into buffers: [UnsafeMutableRawBufferPointer]) throws { throw Failure() }
    func write(at offset: UInt64, from buffers: [UnsafeRawBufferPointer]) throws { throw Failure() }
    func flush() throws { throw Failure() }
    func discard(at offset: UInt64, length: UInt64) throws { throw Failure() }
    func writeZeroes(at offset: UInt64, length: UInt64, mayUnmap: Bool) throws { throw Failure() }
}

/// A virtio-blk device on one queue, with a test driver that submits requests.
final class VirtioBlockHarness {
    let driver: VirtioTestDriver
    let device: BlockDevice
    let interrupt = VirtioRecordingInterrupt()
    let features: UInt64

    init(backend: BlockBackend, serial: String = "godwit-test-disk", features: UInt64? = nil,
         queueSize: UInt16 = 64) throws {
        driver = try VirtioTestDriver(size: queueSize)
        device = BlockDevice(backend: backend, serial: serial)
        self.features = features ?? device.deviceFeatures
        try activate()
    }

    func activate() throws {
        let queue = try driver.makeQueue(features: features)
        queue.nextAvail = driver.availIdx
        queue.nextUsed = driver.usedSeen
        try device.activate(memory: driver.memory, queues: [queue], features: features, interrupt: interrupt)
    }

    static func header(type: UInt32, sector: UInt64) -> [UInt8] {
        var bytes = [UInt8]()
        withUnsafeBytes(of: type.littleEndian) { bytes += $0 }
        bytes += [0, 0, 0, 0]
        withUnsafeBytes(of: sector.littleEndian) { bytes += $0 }
        return bytes
    }

    struct Submitted {
        var head: UInt16
        var status: UInt64
        var data: [VirtioTestBuffer]
    }

    /// Lays out a request (header, data buffers, status byte) without publishing it.
    func prepare(type: UInt32, sector: UInt64, out: [UInt8] = [], inLength: Int = 0,
                 outSplit: [Int]? = nil, inSplit: [Int]? = nil) throws -> Submitted {
        var buffers = [VirtioTestBuffer(address: try driver.place(VirtioBlockHarness.header(type: type, sector: sector)),
                                        length: 16, writable: false)]
        var data: [VirtioTestBuffer] = []
        var start = 0
        for piece in outSplit ?? (out.isEmpty ? [] : [out.count]) {
            let address = try driver.place(Array(out[start..<(start + piece)]))
            buffers.append(VirtioTestBuffer(address: address, length: UInt32(piece), writable: false))
            start += piece
        }
        for piece in inSplit ?? (inLength == 0 ? [] : [inLength]) {
            let buffer = VirtioTestBuffer(address: try driver.allocate(piece, fill: 0xEE), length: UInt32(piece),
                                          writable: true)
            buffers.append(buffer)
            data.append(buffer)
        }
        let status = try driver.allocate(1, fill: 0xFF)
        buffers.append(VirtioTestBuffer(address: status, length: 1, writable: true))
        return Submitted(head: try driver.addChain(buffers), status: status, data: data)
    }

    func status(of request: Submitted) throws -> UInt8 { try driver.memory.load(UInt8.self, at: request.status) }

    func dataIn(of request: Submitted) throws -> [UInt8] {
        try request.data.flatMap { try driver.memory.readBytes(at: $0.address, count: Int($0.length)) }
    }

    /// Submits one request, notifies, and returns its status and the bytes read into its data buffers.
    @discardableResult
    func run(type: UInt32, sector: UInt64, out: [UInt8] = [], inLength: Int = 0,
             outSplit: [Int]? = nil, inSplit: [Int]? = nil) throws -> (status: UInt8, data: [UInt8], used: UInt32?) {
        let request = try prepare(type: type, sector: sector, out: out, inLength: inLength,
                                  outSplit: outSplit, inSplit: inSplit)
        try driver.publish(request.head)
        device.queueNotified(0)
        device.waitUntilIdle()
        let used = try driver.takeUsed()
        #expect(used.count == 1)
        #expect(used.first.map { $0.id == UInt32(request.head) } ?? false)
        return (try status(of: request), try dataIn(of: request), used.first?.length)
    }

    static func discardSegment(sector: UInt64, count: UInt32, flags: UInt32) -> [UInt8] {
        var bytes = [UInt8]()
        withUnsafeBytes(of: sector.littleEndian) { bytes += $0 }
        withUnsafeBytes(of: count.littleEndian) { bytes += $0 }
        withUnsafeBytes(of: flags.littleEndian) { bytes += $0 }
        return bytes
    }
}

typealias VirtioBlkType = BlockDevice.RequestType
typealias VirtioBlkStatus = BlockDevice.Status

func virtioRandomBytes(_ count: Int, seed: UInt64) -> [UInt8] {
    var state = seed &* 0x9E37_79B9_7F4A_7C15 | 1
    return (0..<count).map { _ in
        state ^= state << 13; state ^= state >> 7; state ^= state << 17
        return UInt8(truncatingIfNeeded: state)
    }
}

// MARK: - Block device tests

@Suite struct VirtioBlockTests {
    @Test func featuresAndConfigSpace() throws {
        let image = try VirtioTempImage(size: 512 * 100 + 300)  // not a multiple of 512: rounded down
        let backend = try FileBlockBackend(path: image.path)
        #expect(backend.capacity == 512 * 100)
        let device = BlockDevice(backend: backend, maxQueueSize: 128)
        #expect(device.deviceID == 2 && device.queueCount == 1 && device.maxQueueSize == 128)
        let f = device.deviceFeatures
        #expect(f & VirtioFeature.version1 != 0)
        #expect(f & VirtioFeature.eventIndex != 0 && f & VirtioFeature.indirectDescriptors != 0)
        #expect(f & BlockDevice.Feature.segMax != 0 && f & BlockDevice.Feature.blockSize != 0)
        #expect(f & BlockDevice.Feature.flush != 0)
        #expect(f & BlockDevice.Feature.readOnly == 0)
        // /tmp is a real file system here: punch-hole probes succeed.
        #expect(backend.supportsDiscard)
        #expect(f & BlockDevice.Feature.discard != 0 && f & BlockDevice.Feature.writeZeroes != 0)

        var config = [UInt8](repeating: 0xAA, count: 64)
        config.withUnsafeMutableBytes { device.readConfig(offset: 0, into: $0) }
        func u32(_ o: Int) -> UInt32 { config[o..<(o + 4)].reversed().reduce(0) { $0 << 8 | UInt32($1) } }
        func u64(_ o: Int) -> UInt64 { config[o..<(o + 8)].reversed().reduce(0) { $0 << 8 | UInt64($1) } }
        #expect(u64(0) == 100)                     // capacity in sectors
        #expect(u32(12) == 126)                    // seg_max
        #expect(u32(20) == 512)                    // blk_size
        #expect(config[34] == 1 && config[35] == 0) // num_queues
        #expect(u32(36) == BlockDevice.maxDiscardSectors)
        #expect(u32(40) == BlockDevice.maxDiscardSegments)
        #expect(u32(48) == BlockDevice.maxWriteZeroesSectors)
        #expect(config[56] == 1)                   // write_zeroes_may_unmap
        #expect(config[60...].allSatisfy { $0 == 0 }) // past the end reads as 0

        var far = [UInt8](repeating: 0xAA, count: 4)
        far.withUnsafeMutableBytes { device.readConfig(offset: Int.max - 1, into: $0) }
        #expect(far == [0, 0, 0, 0])
    }

    @Test func readReturnsFileBytes() throws {
        let image = try VirtioTempImage(size: 64 * 1024)
        let harness = try VirtioBlockHarness(backend: try FileBlockBackend(path: image.path))
        let result = try harness.run(type: VirtioBlkType.read, sector: 3, inLength: 2048)
        #expect(result.status == VirtioBlkStatus.ok)
        #expect(result.data == (try image.bytes(at: 3 * 512, count: 2048)))
        #expect(result.used == 2049)
        #expect(harness.interrupt.usedSignals == 1)
        let stats = harness.device.statistics
        #expect(stats.requests == 1 && stats.reads == 1 && stats.bytesRead == 2048 && stats.errors == 0)
    }

    @Test func replacingTheBackendChangesCapacityAndSignalsTheDriver() throws {
        let small = try VirtioTempImage(size: 64 * 1024)
        let large = try VirtioTempImage(size: 256 * 1024, pattern: { _ in 0x5a })
        let harness = try VirtioBlockHarness(backend: try FileBlockBackend(path: small.path))
        try harness.device.replaceBackend(try FileBlockBackend(path: large.path))
        var capacity: UInt64 = 0
        withUnsafeMutableBytes(of: &capacity) { harness.device.readConfig(offset: 0, into: $0) }
        #expect(capacity == 512, "256 KiB in sectors")
        #expect(harness.interrupt.configSignals == 1)
        // Requests go to the new image, including sectors past the old capacity.
        let result = try harness.run(type: VirtioBlkType.read, sector: 300, inLength: 512)
        #expect(result.status == VirtioBlkStatus.ok)
        #expect(result.data == [UInt8](repeating: 0x5a, count: 512))
        // A read-only image cannot replace a writable device's.
        #expect(throws: VirtioError.self) { try harness.device.replaceBackend(try FileBlockBackend(path: large.path, readOnly: true)) }
    }

    @Test func slicesStayInsideTheirWindow() throws {
        let image = try VirtioTempImage(size: 64 * 1024, pattern: { _ in 0 })
        let file = try FileBlockBackend(path: image.path)
        let slice = try SliceBlockBackend(base: file, offset: 16 * 1024, size: 8 * 1024)
        let harness = try VirtioBlockHarness(backend: slice)
        var capacity: UInt64 = 0
        withUnsafeMutableBytes(of: &capacity) { harness.device.readConfig(offset: 0, into: $0) }
        #expect(capacity == 16, "8 KiB in sectors")
        let write = try harness.run(type: VirtioBlkType.write, sector: 1, out: [UInt8](repeating: 0xab, count: 512))
        #expect(write.status == VirtioBlkStatus.ok)
        #expect(try image.bytes(at: 16 * 1024 + 512, count: 512) == [UInt8](repeating: 0xab, count: 512))
        #expect(try image.bytes(at: 512, count: 512) == [UInt8](repeating: 0, count: 512), "nothing outside the slice")
        // Past the slice's end: refused, even though the file goes on.
        let past = try harness.run(type: VirtioBlkType.read, sector: 16, inLength: 512)
        #expect(past.status == VirtioBlkStatus.ioError)
        #expect(throws: VirtioError.self) { _ = try SliceBlockBackend(base: file, offset: 60 * 1024, size: 8 * 1024) }
        #expect(throws: VirtioError.self) { _ = try SliceBlockBackend(base: file, offset: 100, size: 512) }
        let readOnly = try SliceBlockBackend(base: file, offset: 0, size: 4096, readOnly: true)
        #expect(readOnly.readOnly && !readOnly.supportsDiscard)
    }

    @Test func writeLandsOnDiskAndReadsBack() throws {
        let image = try VirtioTempImage(size: 64 * 1024)
        let before = try image.contents
        let harness = try VirtioBlockHarness(backend: try FileBlockBackend(path: image.path))
        let payload = virtioRandomBytes(1536, seed: 1)
        // Odd scatter-gather framing: 100 + 412 + 1024 bytes.
        let result = try harness.run(type: VirtioBlkType.write, sector: 7, out: payload, outSplit: [100, 412, 1024])
        #expect(result.status == VirtioBlkStatus.ok)
        #expect(result.used == 1)
        var expected = before
        expected.replaceSubrange((7 * 512)..<(7 * 512 + 1536), with: payload)
        #expect(try image.contents == expected)

        let back = try harness.run(type: VirtioBlkType.read, sector: 7, inLength: 1536, inSplit: [1, 511, 1000, 24])
        #expect(back.status == VirtioBlkStatus.ok && back.data == payload)
        let stats = harness.device.statistics
        #expect(stats.writes == 1 && stats.bytesWritten == 1536 && stats.bytesRead == 1536)
    }

    @Test func headerDataAndStatusInAnyFraming() throws {
        let image = try VirtioTempImage(size: 8192)
        let harness = try VirtioBlockHarness(backend: try FileBlockBackend(path: image.path))
        let driver = harness.driver
        // One readable descriptor with header + 512 data bytes; one writable with the status byte only.
        let payload = virtioRandomBytes(512, seed: 2)
        let out = try driver.place(VirtioBlockHarness.header(type: VirtioBlkType.write, sector: 1) + payload)
        let status = try driver.allocate(1, fill: 0xFF)
        try driver.publish(try driver.addChain([
            VirtioTestBuffer(address: out, length: 528, writable: false),
            VirtioTestBuffer(address: status, length: 1, writable: true),
        ]))
        // A read whose data and status share one writable descriptor.
        let header = try driver.place(VirtioBlockHarness.header(type: VirtioBlkType.read, sector: 1))
        let inBuffer = try driver.allocate(513, fill: 0xFF)
        try driver.publish(try driver.addChain([
            VirtioTestBuffer(address: header, length: 16, writable: false),
            VirtioTestBuffer(address: inBuffer, length: 513, writable: true),
        ]))
        harness.device.queueNotified(0)
        #expect(try driver.takeUsed().count == 2)
        #expect(try driver.memory.load(UInt8.self, at: status) == VirtioBlkStatus.ok)
        #expect(try image.bytes(at: 512, count: 512) == payload)
        #expect(try driver.memory.readBytes(at: inBuffer, count: 512) == payload)
        #expect(try driver.memory.load(UInt8.self, at: inBuffer + 512) == VirtioBlkStatus.ok)
    }

    @Test func flushAndGetID() throws {
        let image = try VirtioTempImage(size: 8192)
        let harness = try VirtioBlockHarness(backend: try FileBlockBackend(path: image.path), serial: "serial-0123456789-ABCDEF")
        #expect(try harness.run(type: VirtioBlkType.flush, sector: 0).status == VirtioBlkStatus.ok)
        let id = try harness.run(type: VirtioBlkType.getID, sector: 0, inLength: 20)
        #expect(id.status == VirtioBlkStatus.ok)
        #expect(id.data == Array("serial-0123456789-AB".utf8))
        let short = try VirtioBlockHarness(backend: try FileBlockBackend(path: image.path), serial: "disk1")
        #expect(try short.run(type: VirtioBlkType.getID, sector: 0, inLength: 20).data
            == Array("disk1".utf8) + [UInt8](repeating: 0, count: 15))
        #expect(harness.device.statistics.flushes == 1)
    }

    @Test func discardPunchesAndLeavesNeighbours() throws {
        let size = 256 * 1024
        let image = try VirtioTempImage(size: size, pattern: { _ in 0x5A })
        let harness = try VirtioBlockHarness(backend: try FileBlockBackend(path: image.path))
        // Two segments: 64 KiB at 64 KiB, 4 KiB at 192 KiB.
        let segments = VirtioBlockHarness.discardSegment(sector: 128, count: 128, flags: 0)
            + VirtioBlockHarness.discardSegment(sector: 384, count: 8, flags: 0)
        let result = try harness.run(type: VirtioBlkType.discard, sector: 0, out: segments)
        #expect(result.status == VirtioBlkStatus.ok)
        let after = try image.contents
        #expect(after.count == size)  // KEEP_SIZE
        #expect(after[0..<65536].allSatisfy { $0 == 0x5A })
        #expect(after[65536..<131072].allSatisfy { $0 == 0 })
        #expect(after[131072..<196608].allSatisfy { $0 == 0x5A })
        #expect(after[196608..<200704].allSatisfy { $0 == 0 })
        #expect(after[200704...].allSatisfy { $0 == 0x5A })
        #expect(harness.device.statistics.discards == 1)
    }

    @Test func writeZeroesWithAndWithoutUnmap() throws {
        let image = try VirtioTempImage(size: 128 * 1024, pattern: { _ in 0xC3 })
        let harness = try VirtioBlockHarness(backend: try FileBlockBackend(path: image.path))
        let keep = VirtioBlockHarness.discardSegment(sector: 1, count: 3, flags: 0)
        #expect(try harness.run(type: VirtioBlkType.writeZeroes, sector: 0, out: keep).status == VirtioBlkStatus.ok)
        let unmap = VirtioBlockHarness.discardSegment(sector: 64, count: 64, flags: BlockDevice.writeZeroesFlagUnmap)
        #expect(try harness.run(type: VirtioBlkType.writeZeroes, sector: 0, out: unmap).status == VirtioBlkStatus.ok)
        let after = try image.contents
        #expect(after.count == 128 * 1024)
        #expect(after[0..<512].allSatisfy { $0 == 0xC3 })
        #expect(after[512..<2048].allSatisfy { $0 == 0 })
        #expect(after[2048..<32768].allSatisfy { $0 == 0xC3 })
        #expect(after[32768..<65536].allSatisfy { $0 == 0 })
        #expect(after[65536...].allSatisfy { $0 == 0xC3 })
    }

    @Test func discardAndWriteZeroesValidation() throws {
        let image = try VirtioTempImage(size: 64 * 1024, pattern: { _ in 0x11 })
        let harness = try VirtioBlockHarness(backend: try FileBlockBackend(path: image.path))
        typealias Seg = VirtioBlockHarness
        // UNMAP on a discard, unknown flags: UNSUPP.
        #expect(try harness.run(type: VirtioBlkType.discard, sector: 0,
                                out: Seg.discardSegment(sector: 0, count: 1, flags: 1)).status == VirtioBlkStatus.unsupported)
        #expect(try harness.run(type: VirtioBlkType.writeZeroes, sector: 0,
                                out: Seg.discardSegment(sector: 0, count: 1, flags: 2)).status == VirtioBlkStatus.unsupported)
        // Not a multiple of 16 bytes, or too many segments: UNSUPP.
        #expect(try harness.run(type: VirtioBlkType.discard, sector: 0,
                                out: Array(Seg.discardSegment(sector: 0, count: 1, flags: 0).prefix(12)))
            .status == VirtioBlkStatus.unsupported)
        let many = (0..<33).flatMap { Seg.discardSegment(sector: UInt64($0), count: 1, flags: 0) }
        #expect(try harness.run(type: VirtioBlkType.discard, sector: 0, out: many).status == VirtioBlkStatus.unsupported)
        // Past the end, or more sectors than max_discard_sectors: IOERR.
        #expect(try harness.run(type: VirtioBlkType.discard, sector: 0,
                                out: Seg.discardSegment(sector: 127, count: 2, flags: 0)).status == VirtioBlkStatus.ioError)
        #expect(try harness.run(type: VirtioBlkType.writeZeroes, sector: 0,
                                out: Seg.discardSegment(sector: UInt64.max, count: 1, flags: 0)).status == VirtioBlkStatus.ioError)
        #expect(try harness.run(type: VirtioBlkType.discard, sector: 0,
                                out: Seg.discardSegment(sector: 0, count: BlockDevice.maxDiscardSectors + 1, flags: 0))
            .status == VirtioBlkStatus.ioError)
        // Nothing was touched.
        #expect(try image.contents.allSatisfy { $0 == 0x11 })
    }

    @Test func discardNotNegotiatedIsUnsupported() throws {
        let image = try VirtioTempImage(size: 8192, pattern: { _ in 0x22 })
        let backend = try FileBlockBackend(path: image.path)
        let features = BlockDevice(backend: backend).deviceFeatures & ~BlockDevice.Feature.discard
        let harness = try VirtioBlockHarness(backend: backend, features: features)
        let segment = VirtioBlockHarness.discardSegment(sector: 0, count: 1, flags: 0)
        #expect(try harness.run(type: VirtioBlkType.discard, sector: 0, out: segment).status == VirtioBlkStatus.unsupported)
        #expect(try image.contents.allSatisfy { $0 == 0x22 })
    }

    @Test func readOnlyRefusesWrites() throws {
        let image = try VirtioTempImage(size: 16 * 1024)
        let before = try image.contents
        let backend = try FileBlockBackend(path: image.path, readOnly: true)
        let harness = try VirtioBlockHarness(backend: backend)
        let f = harness.device.deviceFeatures
        #expect(f & BlockDevice.Feature.readOnly != 0)
        #expect(f & BlockDevice.Feature.discard == 0 && f & BlockDevice.Feature.writeZeroes == 0)
        #expect(try harness.run(type: VirtioBlkType.write, sector: 0, out: virtioRandomBytes(512, seed: 3)).status
            == VirtioBlkStatus.ioError)
        // Write-zeroes was not offered: UNSUPP.
        #expect(try harness.run(type: VirtioBlkType.writeZeroes, sector: 0,
                                out: VirtioBlockHarness.discardSegment(sector: 0, count: 1, flags: 0)).status
            == VirtioBlkStatus.unsupported)
        #expect(try image.contents == before)
        // Reads still work.
        let read = try harness.run(type: VirtioBlkType.read, sector: 2, inLength: 512)
        #expect(read.status == VirtioBlkStatus.ok && read.data == Array(before[1024..<1536]))
        #expect(harness.device.statistics.errors == 1)
    }

    @Test func rangeAndLengthChecks() throws {
        let image = try VirtioTempImage(size: 16 * 512)
        let before = try image.contents
        let harness = try VirtioBlockHarness(backend: try FileBlockBackend(path: image.path))
        // The last sector is fine; one past it is not.
        #expect(try harness.run(type: VirtioBlkType.read, sector: 15, inLength: 512).status == VirtioBlkStatus.ok)
        #expect(try harness.run(type: VirtioBlkType.read, sector: 15, inLength: 1024).status == VirtioBlkStatus.ioError)
        #expect(try harness.run(type: VirtioBlkType.write, sector: 16, out: virtioRandomBytes(512, seed: 4)).status
            == VirtioBlkStatus.ioError)
        // sector * 512 overflows.
        #expect(try harness.run(type: VirtioBlkType.read, sector: UInt64.max / 256, inLength: 512).status == VirtioBlkStatus.ioError)
        // Data not a multiple of 512.
        #expect(try harness.run(type: VirtioBlkType.write, sector: 0, out: virtioRandomBytes(100, seed: 5)).status
            == VirtioBlkStatus.ioError)
        #expect(try harness.run(type: VirtioBlkType.read, sector: 0, inLength: 700).status == VirtioBlkStatus.ioError)
        // Unknown request type.
        #expect(try harness.run(type: 99, sector: 0).status == VirtioBlkStatus.unsupported)
        #expect(try image.contents == before)
        let stats = harness.device.statistics
        #expect(stats.errors == 5 && stats.unsupported == 1 && stats.requests == 7)
    }

    @Test func truncatedHeaderGetsIOErrorAndDeviceGoesOn() throws {
        let image = try VirtioTempImage(size: 8192)
        let harness = try VirtioBlockHarness(backend: try FileBlockBackend(path: image.path))
        let driver = harness.driver
        let header = try driver.place(Array(VirtioBlockHarness.header(type: VirtioBlkType.read, sector: 0).prefix(8)))
        let status = try driver.allocate(1, fill: 0xFF)
        try driver.publish(try driver.addChain([
            VirtioTestBuffer(address: header, length: 8, writable: false),
            VirtioTestBuffer(address: status, length: 1, writable: true),
        ]))
        harness.device.queueNotified(0)
        #expect(try driver.takeUsed().count == 1)
        #expect(try driver.memory.load(UInt8.self, at: status) == VirtioBlkStatus.ioError)
        #expect(!harness.device.needsReset)
        #expect(try harness.run(type: VirtioBlkType.read, sector: 1, inLength: 512).status == VirtioBlkStatus.ok)
    }

    @Test func missingStatusByteFlagsNeedsResetUntilReset() throws {
        let image = try VirtioTempImage(size: 8192)
        let harness = try VirtioBlockHarness(backend: try FileBlockBackend(path: image.path))
        let driver = harness.driver
        let header = try driver.place(VirtioBlockHarness.header(type: VirtioBlkType.flush, sector: 0))
        try driver.publish(try driver.addChain([VirtioTestBuffer(address: header, length: 16, writable: false)]))
        // A good request behind the bad one is not processed while the device is stopped.
        let good = try harness.prepare(type: VirtioBlkType.flush, sector: 0)
        try driver.publish(good.head)
        harness.device.queueNotified(0)
        #expect(harness.device.needsReset)
        #expect(harness.interrupt.resetErrors.count == 1)
        #expect(harness.interrupt.resetErrors.first.map { "\($0)".contains("status byte") } ?? false)
        #expect(try driver.takeUsed().isEmpty)
        harness.device.queueNotified(0)
        #expect(try driver.takeUsed().isEmpty)
        #expect(harness.device.statistics.resetsNeeded == 1)

        // After a reset and re-activation (positions as the driver re-initializes them) it works again.
        harness.device.reset()
        #expect(!harness.device.needsReset)
        driver.availIdx = 0
        driver.usedSeen = 0
        try driver.memory.store(UInt16(0), at: driver.deviceArea + 2)
        try harness.activate()
        #expect(try harness.run(type: VirtioBlkType.flush, sector: 0).status == VirtioBlkStatus.ok)
    }

    @Test func malformedChainFlagsNeedsReset() throws {
        let image = try VirtioTempImage(size: 8192)
        let harness = try VirtioBlockHarness(backend: try FileBlockBackend(path: image.path), queueSize: 8)
        let driver = harness.driver
        let a = try driver.allocate(16)
        try driver.writeDescriptor(0, address: a, length: 16, flags: VirtioTestFlag.next, next: 0)  // loop
        try driver.publish(0)
        harness.device.queueNotified(0)
        #expect(harness.device.needsReset)
        #expect(harness.interrupt.resetErrors.first as? VirtioError == .chainTooLong(head: 0, limit: 8))
        // An avail idx far ahead is just as fatal, and nothing traps.
        let fresh = try VirtioBlockHarness(backend: try FileBlockBackend(path: image.path), queueSize: 8)
        try fresh.driver.setAvailIdx(200)
        fresh.device.queueNotified(0)
        #expect(fresh.interrupt.resetErrors.first as? VirtioError
            == .availIndexTooFar(availIndex: 200, nextAvail: 0, queueSize: 8))
    }

    @Test func manyRequestsOneNotificationOneInterrupt() throws {
        let image = try VirtioTempImage(size: 256 * 1024)
        let harness = try VirtioBlockHarness(backend: try FileBlockBackend(path: image.path))
        var requests: [(VirtioBlockHarness.Submitted, [UInt8], Int)] = []
        for i in 0..<12 {
            let payload = virtioRandomBytes(4096, seed: UInt64(100 + i))
            let request = try harness.prepare(type: VirtioBlkType.write, sector: UInt64(i * 16), out: payload)
            try harness.driver.publish(request.head)
            requests.append((request, payload, i))
        }
        harness.device.queueNotified(0)
        let used = try harness.driver.takeUsed()
        #expect(used.count == 12)
        #expect(Set(used.map(\.id)) == Set(requests.map { UInt32($0.0.head) }))
        #expect(harness.interrupt.usedSignals == 1)
        for (request, payload, i) in requests {
            #expect(try harness.status(of: request) == VirtioBlkStatus.ok)
            #expect(try image.bytes(at: i * 16 * 512, count: 4096) == payload)
        }
    }

    @Test func eventIndexSuppressesInterrupt() throws {
        let image = try VirtioTempImage(size: 64 * 1024)
        let harness = try VirtioBlockHarness(backend: try FileBlockBackend(path: image.path))
        #expect(harness.features & VirtioFeature.eventIndex != 0)
        // The driver asks to hear only once used idx passes 5.
        try harness.driver.setUsedEvent(5)
        for _ in 0..<3 { try harness.run(type: VirtioBlkType.flush, sector: 0) }
        #expect(harness.interrupt.usedSignals == 0)
        for _ in 0..<3 { try harness.run(type: VirtioBlkType.flush, sector: 0) }
        #expect(harness.interrupt.usedSignals == 1)
    }

    @Test func backendErrorsBecomeIOErrors() throws {
        let harness = try VirtioBlockHarness(backend: VirtioFailingBackend())
        #expect(try harness.run(type: VirtioBlkType.read, sector: 0, inLength: 512).status == VirtioBlkStatus.ioError)
        #expect(try harness.run(type: VirtioBlkType.write, sector: 0, out: [UInt8](repeating: 1, count: 512)).status
            == VirtioBlkStatus.ioError)
        #expect(try harness.run(type: VirtioBlkType.flush, sector: 0).status == VirtioBlkStatus.ioError)
        #expect(try harness.run(type: VirtioBlkType.discard, sector: 0,
                                out: VirtioBlockHarness.discardSegment(sector: 0, count: 1, flags: 0)).status
            == VirtioBlkStatus.ioError)
        #expect(!harness.device.needsReset)
        #expect(harness.device.statistics.errors == 4)
    }

    @Test(arguments: [UInt32?.none, 4096])
    func directIOWithUnalignedGuestBuffers(alignment: UInt32?) throws {
        let image = try VirtioTempImage(size: 3 << 20)
        let before = try image.contents
        let backend = try FileBlockBackend(path: image.path, direct: true, directAlignment: alignment)
        #expect(backend.direct)
        if let alignment { #expect(backend.blockSize == alignment) }
        let harness = try VirtioBlockHarness(backend: backend)
        // 512-byte sectors at odd places (a read-modify-write with 4096 alignment), odd buffer sizes.
        let payload = virtioRandomBytes(3 * 512, seed: 9)
        #expect(try harness.run(type: VirtioBlkType.write, sector: 5, out: payload, outSplit: [7, 1000, 529]).status
            == VirtioBlkStatus.ok)
        var expected = before
        expected.replaceSubrange((5 * 512)..<(8 * 512), with: payload)
        #expect(try image.contents == expected)
        let back = try harness.run(type: VirtioBlkType.read, sector: 4, inLength: 5 * 512, inSplit: [3, 2000, 557])
        #expect(back.status == VirtioBlkStatus.ok)
        #expect(back.data == Array(expected[(4 * 512)..<(9 * 512)]))
        // A write larger than one bounce chunk (1 MiB), starting and ending off the alignment.
        let big = virtioRandomBytes((1 << 20) + 64 * 1024 + 512, seed: 10)
        #expect(try harness.run(type: VirtioBlkType.write, sector: 1, out: big).status == VirtioBlkStatus.ok)
        expected.replaceSubrange(512..<(512 + big.count), with: big)
        #expect(try image.contents == expected)
        // Write-zeroes through the direct descriptor.
        #expect(try harness.run(type: VirtioBlkType.writeZeroes, sector: 0,
                                out: VirtioBlockHarness.discardSegment(sector: 2, count: 1, flags: 0)).status
            == VirtioBlkStatus.ok)
        expected.replaceSubrange(1024..<1536, with: [UInt8](repeating: 0, count: 512))
        #expect(try image.contents == expected)
    }

    @Test func backendRefusesBadAlignmentOverride() throws {
        let image = try VirtioTempImage(size: 4096)
        #expect(throws: SystemError.self) { _ = try FileBlockBackend(path: image.path, direct: true, directAlignment: 1000) }
        #expect(throws: SystemError.self) { _ = try FileBlockBackend(path: image.path + ".missing") }
    }
}

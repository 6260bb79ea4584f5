import Foundation
import GodwitSystem
import GuestMemory
import Testing
import Virtio
import VhostUser
#if canImport(Glibc)
import Glibc
#endif

// MARK: - Helpers

/// A temporary file or socket path, removed on deinit.
final class VUTempPath {
    let path: String

    init(_ suffix: String) {
        // Socket paths must stay short (108 bytes): /tmp, not a long temporary directory.
        path = "/tmp/godwit-vu-\(UUID().uuidString.prefix(12))\(suffix)"
    }

    deinit { unlink(path) }

    /// Creates the file with `size` zero bytes.
    func createImage(size: Int) throws {
        guard FileManager.default.createFile(atPath: path, contents: Data(count: size)) else {
            throw CocoaError(.fileWriteUnknown)
        }
    }

    func bytes(at offset: Int, count: Int) throws -> [UInt8] {
        let data = try Data(contentsOf: URL(fileURLWithPath: path))
        return Array(data[offset..<(offset + count)])
    }
}

/// Records what the transport side of a `VhostUserDevice` is told.
final class VURecordingInterrupt: VirtioInterrupt, @unchecked Sendable {
    private let lock = NSLock()
    private var errors: [Error] = []
    func signalUsedBuffer(queue: Int) {}
    func signalConfigChange() {}
    func deviceNeedsReset(because error: Error) { lock.withLock { errors.append(error) } }
    var resetErrors: [Error] { lock.withLock { errors } }
}

/// Waits until `fd` is readable, up to `seconds`.
func vuWaitReadable(_ fd: FileDescriptor, seconds: Double = 5) -> Bool {
    var p = pollfd(fd: fd.rawValue, events: Int16(POLLIN), revents: 0)
    return poll(&p, 1, Int32(seconds * 1000)) > 0
}

/// The driver's side of one split virtqueue in guest memory: what a guest's virtio-blk driver writes.
struct VUTestDriver {
    let memory: GuestMemory
    let size: UInt16 = 16
    let descriptorTable: UInt64 = 0x1000
    let availRing: UInt64 = 0x2000
    let usedRing: UInt64 = 0x3000
    var nextDescriptor: UInt16 = 0
    var availIndex: UInt16 = 0

    init(memory: GuestMemory) throws {
        self.memory = memory
        try memory.writeBytes(Array(repeating: 0, count: 0x3000), at: 0x1000)
    }

    func queue(features: UInt64) throws -> Virtqueue {
        try Virtqueue(index: 0, memory: memory, size: size, descriptorTable: descriptorTable, driverArea: availRing,
                      deviceArea: usedRing, features: features)
    }

    /// Puts a chain of (address, length, device-writable) buffers in the ring and publishes it.
    mutating func submit(_ buffers: [(UInt64, UInt32, Bool)]) throws {
        let head = nextDescriptor
        for (i, buffer) in buffers.enumerated() {
            let index = nextDescriptor
            nextDescriptor = (nextDescriptor + 1) % size
            let entry = descriptorTable + UInt64(index) * 16
            let last = i == buffers.count - 1
            try memory.store(buffer.0, at: entry)
            try memory.store(buffer.1, at: entry + 8)
            try memory.store(UInt16((last ? 0 : 1) | (buffer.2 ? 2 : 0)), at: entry + 12)
            try memory.store(last ? UInt16(0) : nextDescriptor, at: entry + 14)
        }
        try memory.store(head, at: availRing + 4 + 2 * UInt64(availIndex % size))
        GuestMemory.fence()
        availIndex &+= 1
        try memory.store(availIndex, at: availRing + 2)
    }

    /// Writes a virtio-blk request: header at 0x10000, data at `data`, status at 0x12000.
    mutating func blockRequest(type: UInt32, sector: UInt64, data: UInt64, length: UInt32) throws {
        try memory.store(type, at: 0x10000)
        try memory.store(UInt32(0), at: 0x10004)
        try memory.store(sector, at: 0x10008)
        try memory.store(UInt8(0xFF), at: 0x12000)
        try submit([(0x10000, 16, false), (data, length, type == 0), (0x12000, 1, true)])
    }

    var usedIndex: UInt16 { (try? memory.load(UInt16.self, at: usedRing + 2)) ?? 0 }

    /// Waits until the used idx reaches `n` (the call eventfd alone is not enough: backends signal it
    /// once when it is set, as libvhost-user does).
    func waitForUsed(_ n: UInt16, call: EventFD? = nil, seconds: Double = 5) -> Bool {
        let deadline = Date().addingTimeInterval(seconds)
        while usedIndex != n && Date() < deadline {
            if let call {
                if vuWaitReadable(call.descriptor, seconds: 0.1) { _ = try? call.wait() }
            } else {
                usleep(1000)
            }
        }
        return usedIndex == n
    }
    var status: UInt8 { (try? memory.load(UInt8.self, at: 0x12000)) ?? 0xEE }
}

/// A block backend served over a socketpair, and a `VhostUserDevice` driving it.
final class VUBlockPair {
    let image = VUTempPath(".img")
    let backend: VhostUserBackend
    let memory: GuestMemory
    let kick: EventFD
    let call: EventFD
    let device: VhostUserDevice
    let logLines = VULog()

    init(imageSize: Int = 1 << 20) throws {
        try image.createImage(size: imageSize)
        let file = try FileBlockBackend(path: image.path)
        let lines = logLines
        backend = VhostUserBackend(name: "test-blk", logger: { lines.append($0) }) { BlockDevice(backend: file) }
        let (backendEnd, frontendEnd) = try VhostUserChannel.pair()
        try backend.serve(backendEnd)
        memory = try GuestMemory.create(layout: [(base: 0, size: 1 << 20)], name: "vu-test")
        let kick = try EventFD(), call = try EventFD()
        self.kick = kick
        self.call = call
        device = try VhostUserDevice(deviceID: VirtioDeviceType.block, notifiers: { _ in (kick: kick, call: call) },
                                     connect: { VhostUserFrontend(channel: frontendEnd) })
    }

    deinit { backend.stop() }
}

final class VULog: @unchecked Sendable {
    private let lock = NSLock()
    private var lines: [String] = []
    func append(_ line: String) { lock.withLock { lines.append(line) } }
    var all: [String] { lock.withLock { lines } }
}

func vuExpectError(_ expected: VhostUserError, _ body: () throws -> Void,
                   sourceLocation: SourceLocation = #_sourceLocation) {
    do {
        try body()
        Issue.record("expected \(expected), nothing was thrown", sourceLocation: sourceLocation)
    } catch let error as VhostUserError {
        #expect(error == expected, sourceLocation: sourceLocation)
    } catch {
        Issue.record("expected \(expected), got \(error)", sourceLocation: sourceLocation)
    }
}

/// Expects `body` to fail because the backend closed the connection (end of file, or a reset when it
/// closed with our request unread).
func vuExpectDisconnected(_ body: () throws -> Void, sourceLocation: SourceLocation = #_sourceLocation) {
    do {
        try body()
        Issue.record("expected the connection to be closed", sourceLocation: sourceLocation)
    } catch VhostUserError.connectionClosed {
    } catch let VhostUserError.system(error) where error.errno == ECONNRESET || error.errno == EPIPE {
    } catch {
        Issue.record("expected the connection to be closed, got \(error)", sourceLocation: sourceLocation)
    }
}

/// A pipe whose write end is handed out: once every copy of it is closed, the read end sees EOF.
final class VUPipe {
    let read: FileDescriptor
    var write: FileDescriptor?

    init() throws {
        var fds: [Int32] = [-1, -1]
        guard pipe(&fds) == 0 else { throw SystemError(operation: "pipe", errno: errno) }
        read = FileDescriptor(owning: fds[0])
        write = FileDescriptor(owning: fds[1])
    }

    /// True when the read end reports end of file within `seconds` (no writer is left).
    func writersGone(seconds: Double = 2) -> Bool {
        guard vuWaitReadable(read, seconds: seconds) else { return false }
        var byte: UInt8 = 0
        return Glibc.read(read.rawValue, &byte, 1) == 0
    }
}

// MARK: - Codec

@Suite struct VhostUserCodecTests {
    func roundTrip(_ message: VhostUserMessage, _ direction: VhostUserDirection = .request) throws -> VhostUserMessage {
        try VhostUserCodec.decode(VhostUserCodec.encode(message), fileDescriptors: message.fileDescriptors,
                                  direction: direction)
    }

    @Test func everyPayloadRoundTrips() throws {
        let fd = { try EventFD().descriptor }
        let messages: [(VhostUserMessage, VhostUserDirection)] = [
            (VhostUserMessage(request: .getFeatures), .request),
            (VhostUserMessage(request: .setFeatures, payload: .u64(0x1_4000_0000)), .request),
            (VhostUserMessage(request: .setVringNum, payload: .vringState(.init(index: 1, num: 256))), .request),
            (VhostUserMessage(request: .setVringAddr, flags: VhostUserFlags.version | VhostUserFlags.needReply,
                              payload: .vringAddress(.init(index: 0, flags: 1, descriptor: 0x7f00_0000_1000,
                                                           used: 0x7f00_0000_3000, available: 0x7f00_0000_2000, log: 0x3000))),
             .request),
            (VhostUserMessage(request: .setMemTable, payload: .memoryTable([
                .init(guestAddress: 0, size: 0x10_0000, userAddress: 0x7f12_0000_0000, mmapOffset: 0),
                .init(guestAddress: 0x1_0000_0000, size: 0x20_0000, userAddress: 0x7f13_0000_0000, mmapOffset: 0x10_0000)]),
                              fileDescriptors: [try fd(), try fd()]), .request),
            (VhostUserMessage(request: .setLogBase, payload: .log(.init(mmapSize: 4096, mmapOffset: 0)),
                              fileDescriptors: [try fd()]), .request),
            (VhostUserMessage(request: .setVringKick, payload: .u64(1), fileDescriptors: [try fd()]), .request),
            (VhostUserMessage(request: .setVringCall, payload: .u64(0x100)), .request),
            (VhostUserMessage(request: .getConfig, payload: .config(.init(offset: 0, bytes: Array(repeating: 0, count: 60)))), .request),
            (VhostUserMessage(request: .setConfig, payload: .config(.init(offset: 32, flags: 1, bytes: [1]))), .request),
            (VhostUserMessage(request: .getInflightFD, payload: .inflight(.init(mmapSize: 0, mmapOffset: 0, queueCount: 1, queueSize: 128))), .request),
            (.reply(to: .getFeatures, .u64(0x1234)), .reply),
            (.reply(to: .getVringBase, .vringState(.init(index: 0, num: 77))), .reply),
            (.reply(to: .getConfig, .config(.init(offset: 4, bytes: [1, 2, 3]))), .reply),
            (.reply(to: .getConfig, .none), .reply),
            (.reply(to: .setVringNum, .u64(0)), .reply),
            (.reply(to: .getInflightFD, .inflight(.init(mmapSize: 8192, mmapOffset: 0, queueCount: 1, queueSize: 128)),
                    fileDescriptors: [try fd()]), .reply),
        ]
        for (message, direction) in messages {
            let decoded = try roundTrip(message, direction)
            #expect(decoded.request == message.request)
            #expect(decoded.flags == message.flags)
            #expect(decoded.payload == message.payload)
            #expect(decoded.fileDescriptors.count == message.fileDescriptors.count)
        }
        // The memory table's size is exactly 8 + 32 per region.
        let table = VhostUserCodec.encode(VhostUserMessage(request: .setMemTable, payload: .memoryTable([
            .init(guestAddress: 0, size: 4096, userAddress: 0, mmapOffset: 0)])))
        #expect(table.count == 12 + 8 + 32)
        #expect(Array(table[0..<12]) == VhostUserCodec.encodeHeader(request: 5, flags: 1, size: 40))
    }

    @Test func truncatedHeaderAndPayload() {
        vuExpectError(.truncatedHeader(received: 5)) { _ = try VhostUserCodec.decode([1, 0, 0, 0, 1]) }
        vuExpectError(.truncatedHeader(received: 0)) { _ = try VhostUserCodec.decode([]) }
        let header = VhostUserCodec.encodeHeader(request: 2, flags: 1, size: 8)
        vuExpectError(.truncatedPayload(request: 2, expected: 8, received: 4)) {
            _ = try VhostUserCodec.decode(header + [1, 2, 3, 4])
        }
        // Bytes after the announced payload are refused too.
        vuExpectError(.badPayloadSize(request: 2, size: 9, expected: "8 (the header's size)")) {
            _ = try VhostUserCodec.decode(header + Array(repeating: 0, count: 9))
        }
    }

    @Test func oversizedPayloadsAreRefusedFromTheHeader() {
        vuExpectError(.payloadTooLarge(request: 2, size: 4096, maximum: 8)) {
            _ = try VhostUserCodec.decodeHeader(VhostUserCodec.encodeHeader(request: 2, flags: 1, size: 4096))
        }
        vuExpectError(.payloadTooLarge(request: 5, size: 0xFFFF_FFFF, maximum: 264)) {
            _ = try VhostUserCodec.decodeHeader(VhostUserCodec.encodeHeader(request: 5, flags: 1, size: 0xFFFF_FFFF))
        }
        vuExpectError(.payloadTooLarge(request: 1, size: 8, maximum: 0)) {
            _ = try VhostUserCodec.decodeHeader(VhostUserCodec.encodeHeader(request: 1, flags: 1, size: 8))
        }
        vuExpectError(.payloadTooLarge(request: 24, size: 269, maximum: 268)) {
            _ = try VhostUserCodec.decodeHeader(VhostUserCodec.encodeHeader(request: 24, flags: 1, size: 269))
        }
    }

    @Test func wrongSizesAndValues() {
        // A vring address of 32 bytes instead of 40.
        vuExpectError(.badPayloadSize(request: 9, size: 32, expected: "40 (vring address)")) {
            _ = try VhostUserCodec.decode(VhostUserCodec.encodeHeader(request: 9, flags: 1, size: 32) + Array(repeating: 0, count: 32))
        }
        // A memory table announcing 9 regions, or 0, or 2 with the bytes of 1.
        func table(count: UInt32, regions: Int) -> [UInt8] {
            var body: [UInt8] = withUnsafeBytes(of: count.littleEndian, Array.init) + [0, 0, 0, 0]
            body += Array(repeating: 0, count: regions * 32)
            return VhostUserCodec.encodeHeader(request: 5, flags: 1, size: UInt32(body.count)) + body
        }
        vuExpectError(.payloadTooLarge(request: 5, size: 8 + 9 * 32, maximum: 264)) { _ = try VhostUserCodec.decode(table(count: 9, regions: 9)) }
        vuExpectError(.badRegionCount(count: 9, maximum: 8)) { _ = try VhostUserCodec.decode(table(count: 9, regions: 1)) }
        vuExpectError(.badRegionCount(count: 0, maximum: 8)) { _ = try VhostUserCodec.decode(table(count: 0, regions: 0)) }
        vuExpectError(.badPayloadSize(request: 5, size: 40, expected: "72 (2 regions)")) { _ = try VhostUserCodec.decode(table(count: 2, regions: 1)) }
        // Config access past 256 bytes.
        var config: [UInt8] = withUnsafeBytes(of: UInt32(250).littleEndian, Array.init) + withUnsafeBytes(of: UInt32(10).littleEndian, Array.init)
        config += [0, 0, 0, 0] + Array(repeating: 0, count: 10)
        vuExpectError(.badConfigAccess(offset: 250, size: 10)) {
            _ = try VhostUserCodec.decode(VhostUserCodec.encodeHeader(request: 24, flags: 1, size: UInt32(config.count)) + config)
        }
        // A config size that disagrees with the payload.
        var short: [UInt8] = withUnsafeBytes(of: UInt32(0).littleEndian, Array.init) + withUnsafeBytes(of: UInt32(60).littleEndian, Array.init)
        short += [0, 0, 0, 0] + Array(repeating: 0, count: 10)
        vuExpectError(.badPayloadSize(request: 25, size: 22, expected: "72 (12 + config size 60)")) {
            _ = try VhostUserCodec.decode(VhostUserCodec.encodeHeader(request: 25, flags: 1, size: UInt32(short.count)) + short)
        }
        // Reserved bits in a kick's u64.
        vuExpectError(.protocolViolation(request: 12, reason: "reserved bits set in 0x201")) {
            _ = try VhostUserCodec.decode(VhostUserCodec.encode(VhostUserMessage(request: .setVringKick, payload: .u64(0x201))))
        }
    }

    @Test func unknownRequestsAndBadFlags() {
        vuExpectError(.unknownRequest(99)) { _ = try VhostUserCodec.decode(VhostUserCodec.encodeHeader(request: 99, flags: 1, size: 0)) }
        vuExpectError(.unknownRequest(0)) { _ = try VhostUserCodec.decode(VhostUserCodec.encodeHeader(request: 0, flags: 1, size: 0)) }
        vuExpectError(.badFlags(request: 1, flags: 2)) { _ = try VhostUserCodec.decode(VhostUserCodec.encodeHeader(request: 1, flags: 2, size: 0)) }
        vuExpectError(.badFlags(request: 1, flags: 0)) { _ = try VhostUserCodec.decode(VhostUserCodec.encodeHeader(request: 1, flags: 0, size: 0)) }
        vuExpectError(.badFlags(request: 1, flags: 0x11)) { _ = try VhostUserCodec.decode(VhostUserCodec.encodeHeader(request: 1, flags: 0x11, size: 0)) }
    }

    @Test func wrongDescriptorCounts() throws {
        vuExpectError(.wrongFileDescriptorCount(request: 5, received: 0, expected: 1)) {
            _ = try VhostUserCodec.decode(VhostUserCodec.encode(VhostUserMessage(request: .setMemTable, payload: .memoryTable([
                .init(guestAddress: 0, size: 4096, userAddress: 0, mmapOffset: 0)]))))
        }
        // A kick without the no-descriptor bit needs one descriptor; with it, none.
        vuExpectError(.wrongFileDescriptorCount(request: 12, received: 0, expected: 1)) {
            _ = try VhostUserCodec.decode(VhostUserCodec.encode(VhostUserMessage(request: .setVringKick, payload: .u64(0))))
        }
        let extra = try EventFD()
        vuExpectError(.wrongFileDescriptorCount(request: 13, received: 1, expected: 0)) {
            _ = try VhostUserCodec.decode(VhostUserCodec.encode(VhostUserMessage(request: .setVringCall, payload: .u64(0x100))),
                                          fileDescriptors: [FileDescriptor(owning: dup(extra.descriptor.rawValue))])
        }
        vuExpectError(.wrongFileDescriptorCount(request: 1, received: 1, expected: 0)) {
            _ = try VhostUserCodec.decode(VhostUserCodec.encode(VhostUserMessage(request: .getFeatures)),
                                          fileDescriptors: [FileDescriptor(owning: dup(extra.descriptor.rawValue))])
        }
    }

    @Test func descriptorsOfARefusedMessageAreClosed() throws {
        // Decoding alone.
        let pipe = try VUPipe()
        let copy = FileDescriptor(owning: dup(pipe.write!.rawValue))
        pipe.write = nil
        vuExpectError(.wrongFileDescriptorCount(request: 1, received: 1, expected: 0)) {
            _ = try VhostUserCodec.decode(VhostUserCodec.encode(VhostUserMessage(request: .getFeatures)), fileDescriptors: [copy])
        }
        #expect(pipe.writersGone())

        // Over a socket: every kind of refusal closes what came with it.
        let cases: [([UInt8], VhostUserError)] = [
            (VhostUserCodec.encodeHeader(request: 99, flags: 1, size: 0), .unknownRequest(99)),
            (VhostUserCodec.encodeHeader(request: 1, flags: 3, size: 0), .badFlags(request: 1, flags: 3)),
            (VhostUserCodec.encodeHeader(request: 2, flags: 1, size: 100), .payloadTooLarge(request: 2, size: 100, maximum: 8)),
            (VhostUserCodec.encode(VhostUserMessage(request: .setFeatures, payload: .u64(1))),
             .wrongFileDescriptorCount(request: 2, received: 1, expected: 0)),
        ]
        for (bytes, expected) in cases {
            let (a, b) = try VhostUserChannel.pair()
            let pipe = try VUPipe()
            try a.sendRaw(bytes, fileDescriptors: [pipe.write!.rawValue])
            pipe.write = nil
            vuExpectError(expected) { _ = try b.receive(direction: .request, timeout: 2) }
            #expect(pipe.writersGone())
        }
    }

    @Test func truncatedMessagesOnASocket() throws {
        // The peer closes inside a header, then inside a payload.
        do {
            let (a, b) = try VhostUserChannel.pair()
            try a.sendRaw([2, 0, 0, 0, 1])
            a.shutdown()
            vuExpectError(.truncatedHeader(received: 5)) { _ = try b.receive(direction: .request, timeout: 2) }
        }
        do {
            let (a, b) = try VhostUserChannel.pair()
            try a.sendRaw(VhostUserCodec.encodeHeader(request: 2, flags: 1, size: 8) + [1, 2, 3])
            a.shutdown()
            vuExpectError(.truncatedPayload(request: 2, expected: 8, received: 3)) { _ = try b.receive(direction: .request, timeout: 2) }
        }
        // A peer that stalls mid-message times out instead of holding the reader.
        do {
            let (a, b) = try VhostUserChannel.pair()
            b.messageTimeout = 0.2
            try a.sendRaw(VhostUserCodec.encodeHeader(request: 2, flags: 1, size: 8) + [1])
            #expect(throws: VhostUserError.self) { _ = try b.receive(direction: .request, timeout: 2) }
        }
        // End of file between messages is a clean close.
        do {
            let (a, b) = try VhostUserChannel.pair()
            a.shutdown()
            vuExpectError(.connectionClosed) { _ = try b.receive(direction: .request, timeout: 2) }
        }
    }
}

// MARK: - Backend and frontend over a socket

@Suite struct VhostUserBlockTests {
    @Test func handshakeFeaturesAndConfig() throws {
        let pair = try VUBlockPair(imageSize: 1 << 20)
        let device = pair.device
        #expect(device.deviceID == 2 && device.queueCount == 1)
        let f = device.deviceFeatures
        #expect(f & VirtioFeature.version1 != 0 && f & BlockDevice.Feature.flush != 0)
        #expect(f & VhostUserFeature.transportOnly == 0)
        #expect(device.backendFeatureBits & VhostUserFeature.protocolFeatures != 0)
        #expect(device.backendFeatureBits & VhostUserFeature.logAll != 0)
        #expect(device.negotiatedProtocolFeatures == VhostUserBackend.offeredProtocolFeatures)
        var config = [UInt8](repeating: 0, count: 8)
        config.withUnsafeMutableBytes { device.readConfig(offset: 0, into: $0) }
        #expect(config == withUnsafeBytes(of: UInt64(2048).littleEndian, Array.init))  // 1 MiB in sectors
    }

    @Test func requestsCrossTheSocketAndReachTheDisk() throws {
        let pair = try VUBlockPair()
        var driver = try VUTestDriver(memory: pair.memory)
        let features = VirtioFeature.version1
        let interrupt = VURecordingInterrupt()
        try pair.device.activate(memory: pair.memory, queues: [try driver.queue(features: features)], features: features,
                                 interrupt: interrupt)
        #expect(pair.device.isActive)
        // The backend signals the call eventfd once when it gets it (REPLY_ACK: activate returned after that).
        #expect(vuWaitReadable(pair.call.descriptor, seconds: 0))
        _ = try pair.call.wait()

        // Write 4 KiB at sector 8: the completion comes with an interrupt.
        let pattern = (0..<4096).map { UInt8(truncatingIfNeeded: $0 &* 31 &+ 7) }
        try pair.memory.writeBytes(pattern, at: 0x11000)
        try driver.blockRequest(type: 1, sector: 8, data: 0x11000, length: 4096)
        try pair.kick.signal()
        #expect(vuWaitReadable(pair.call.descriptor))
        #expect(driver.waitForUsed(1, call: pair.call))
        #expect(driver.status == 0)
        #expect(try pair.image.bytes(at: 8 * 512, count: 4096) == pattern)

        // Read it back into another buffer, this time through queueNotified (the `--notify exit` path).
        try driver.blockRequest(type: 0, sector: 8, data: 0x13000, length: 4096)
        pair.device.queueNotified(0)
        #expect(driver.waitForUsed(2, call: pair.call))
        #expect(driver.status == 0)
        #expect(try pair.memory.readBytes(at: 0x13000, count: 4096) == pattern)

        // Reset stops the ring in the backend and saves its position.
        pair.device.reset()
        #expect(!pair.device.isActive)
        #expect(pair.device.savedRingBases[0] == 2)
        #expect(pair.device.lastError == nil)
        #expect(interrupt.resetErrors.isEmpty)

        // Activate again from the saved position: the next request is served.
        let queue = try driver.queue(features: features)
        queue.nextAvail = 2
        queue.nextUsed = 2
        try pair.device.activate(memory: pair.memory, queues: [queue], features: features, interrupt: interrupt)
        try driver.blockRequest(type: 1, sector: 0, data: 0x11000, length: 512)
        try pair.kick.signal()
        #expect(driver.waitForUsed(3))
        #expect(try pair.image.bytes(at: 0, count: 512) == Array(pattern[0..<512]))
        #expect(pair.backend.closedConnections.isEmpty)
    }

    @Test func dirtyLogMarksDataAndUsedRingPages() throws {
        let image = VUTempPath(".img")
        try image.createImage(size: 1 << 20)
        let file = try FileBlockBackend(path: image.path)
        let backend = VhostUserBackend(name: "log", logger: { _ in }) { BlockDevice(backend: file) }
        defer { backend.stop() }
        let (backendEnd, frontendEnd) = try VhostUserChannel.pair()
        try backend.serve(backendEnd)
        let frontend = VhostUserFrontend(channel: frontendEnd)
        let memory = try GuestMemory.create(layout: [(base: 0, size: 1 << 20)], name: "vu-log")
        var driver = try VUTestDriver(memory: memory)

        let offered = try frontend.getFeatures()
        #expect(offered & VhostUserFeature.logAll != 0)
        try frontend.setProtocolFeatures(VhostUserProtocolFeature.logSharedMemory | VhostUserProtocolFeature.replyAck)
        try frontend.setOwner()
        try frontend.setFeatures(VirtioFeature.version1 | VhostUserFeature.logAll | VhostUserFeature.protocolFeatures)
        let logFD = try MemFD.create(name: "vu-log-bitmap", size: 4096)
        try frontend.setLogBase(size: 32, offset: 0, fileDescriptor: logFD)  // 256 pages = 1 MiB
        let (regions, fds) = try VUTestDriverTable.table(memory)
        try frontend.setMemoryTable(regions, fileDescriptors: fds)
        let base = regions[0].userAddress
        let (kick, call) = try vuStartRing(frontend, driver, userBase: base, flags: VhostUserVringAddress.flagLog)

        // A read request: the device writes the data buffer (page 0x40) and the status (page 0x12).
        try driver.blockRequest(type: 0, sector: 0, data: 0x40000, length: 4096)
        try kick.signal()
        #expect(driver.waitForUsed(1, call: call))
        // Stopping the ring orders everything the backend did before it (the frontend's final sync).
        #expect(try frontend.getVringBase(queue: 0) == 1)
        let log = try MemoryMapping(size: 4096, fd: logFD)
        func dirty(_ address: UInt64) -> Bool { vuPageIsDirty(log, address) }
        #expect(dirty(0x40000) && dirty(0x12000) && dirty(driver.usedRing))
        #expect(!dirty(0x10000) && !dirty(0x20000) && !dirty(driver.descriptorTable))
    }

    /// A migration switches logging on while the ring runs (SET_FEATURES with LOG_ALL, SET_LOG_BASE,
    /// SET_VRING_ADDR with the log flag, no restart). A request the device took before that and
    /// completes after it, on another thread (the AIO reaper; here the test), marks the used ring too.
    /// (Captured when the ring started, the log address stayed unset: the target's used index was one
    /// behind for a request finished in the migration's final drain, and the guest waited for ever.)
    @Test func aRequestFinishedAfterLoggingStartsMarksTheUsedRing() throws {
        let held = VirtioHeldBackend(capacity: 1 << 20)
        let backend = VhostUserBackend(name: "log-late", logger: { _ in }) { BlockDevice(backend: held) }
        defer { backend.stop() }
        let (backendEnd, frontendEnd) = try VhostUserChannel.pair()
        try backend.serve(backendEnd)
        let frontend = VhostUserFrontend(channel: frontendEnd)
        let memory = try GuestMemory.create(layout: [(base: 0, size: 1 << 20)], name: "vu-log-late")
        var driver = try VUTestDriver(memory: memory)

        try frontend.setProtocolFeatures(VhostUserProtocolFeature.logSharedMemory | VhostUserProtocolFeature.replyAck)
        try frontend.setOwner()
        try frontend.setFeatures(VirtioFeature.version1 | VhostUserFeature.protocolFeatures)
        let (regions, fds) = try VUTestDriverTable.table(memory)
        try frontend.setMemoryTable(regions, fileDescriptors: fds)
        let base = regions[0].userAddress
        let (kick, call) = try vuStartRing(frontend, driver, userBase: base, flags: 0)
        // A read the device takes and leaves in flight.
        try driver.blockRequest(type: 0, sector: 0, data: 0x40000, length: 4096)
        try kick.signal()
        var tags: [UInt64] = []
        for _ in 0..<500 where tags.isEmpty { usleep(10_000); tags = held.heldTags }
        try #require(tags.count == 1, "the device submitted the read asynchronously")

        // The migration starts: logging on, the ring keeps running.
        try frontend.setFeatures(VirtioFeature.version1 | VhostUserFeature.logAll | VhostUserFeature.protocolFeatures)
        let logFD = try MemFD.create(name: "vu-log-late-bitmap", size: 4096)
        try frontend.setLogBase(size: 32, offset: 0, fileDescriptor: logFD)
        try frontend.setVringAddress(vuRingAddress(driver, userBase: base, flags: VhostUserVringAddress.flagLog))
        // The read completes now, on this thread.
        held.complete(tags[0])
        held.endLastBatch()
        #expect(driver.waitForUsed(1, call: call))
        #expect(try frontend.getVringBase(queue: 0) == 1)
        let log = try MemoryMapping(size: 4096, fd: logFD)
        func dirty(_ address: UInt64) -> Bool { vuPageIsDirty(log, address) }
        #expect(dirty(0x40000), "the read's data, written after logging started")
        #expect(dirty(driver.usedRing), "the used ring, written after logging started")
    }

    @Test func replyAckReportsFailuresAndTheConnectionCloses() throws {
        let pair = try VUBlockPair()
        let (backendEnd, frontendEnd) = try VhostUserChannel.pair()
        try pair.backend.serve(backendEnd)
        let frontend = VhostUserFrontend(channel: frontendEnd)
        try frontend.setProtocolFeatures(VhostUserProtocolFeature.replyAck)
        try frontend.setOwner()  // acked with 0
        vuExpectError(.requestFailed(request: 8, status: 1)) { try frontend.setVringNum(queue: 0, size: 3) }
        vuExpectDisconnected { _ = try frontend.getFeatures() }
        #expect(pair.backend.waitForClosedConnections(1, timeout: 5))
        #expect(pair.backend.closedConnections.first?.error?.contains("size 3 is not a power of two") == true)
    }
}

/// Ring 0's addresses for `driver` in a frontend whose guest RAM starts at `userBase`; the used ring logs at its guest address.
func vuRingAddress(_ driver: VUTestDriver, userBase: UInt64, flags: UInt32) -> VhostUserVringAddress {
    VhostUserVringAddress(index: 0, flags: flags, descriptor: userBase + driver.descriptorTable, used: userBase + driver.usedRing,
                          available: userBase + driver.availRing, log: driver.usedRing)
}

/// Sets up and enables ring 0 from position 0; returns its kick and call eventfds.
func vuStartRing(_ frontend: VhostUserFrontend, _ driver: VUTestDriver, userBase: UInt64, flags: UInt32) throws -> (kick: EventFD, call: EventFD) {
    try frontend.setVringNum(queue: 0, size: driver.size)
    try frontend.setVringBase(queue: 0, base: 0)
    try frontend.setVringAddress(vuRingAddress(driver, userBase: userBase, flags: flags))
    let kick = try EventFD(), call = try EventFD()
    try frontend.setVringKick(queue: 0, fileDescriptor: kick.descriptor)
    try frontend.setVringCall(queue: 0, fileDescriptor: call.descriptor)
    try frontend.setVringEnable(queue: 0, enabled: true)
    return (kick, call)
}

/// Whether the dirty log (one bit per 4 KiB page) marks the page of guest address `address`.
func vuPageIsDirty(_ log: MemoryMapping, _ address: UInt64) -> Bool {
    let page = Int(address / 4096)
    return log.base.load(fromByteOffset: page / 8, as: UInt8.self) & (1 << (page % 8)) != 0
}

/// The memory table of a `GuestMemory`, as a VMM frontend sends it.
enum VUTestDriverTable {
    static func table(_ memory: GuestMemory) throws -> ([VhostUserMemoryRegion], [FileDescriptor]) {
        let regions = memory.regions.map {
            VhostUserMemoryRegion(guestAddress: $0.guestBase, size: $0.size, userAddress: UInt64(UInt(bitPattern: $0.hostBase)),
                                  mmapOffset: $0.backingOffset)
        }
        return (regions, memory.regions.map { $0.backing! })
    }
}

// MARK: - Reconnection

@Suite struct VhostUserReconnectTests {
    @Test func theDeviceReconnectsToARestartedBackendAndResumes() throws {
        let image = VUTempPath(".img")
        try image.createImage(size: 1 << 20)
        let file = try FileBlockBackend(path: image.path)
        let socket = VUTempPath(".sock")
        let first = VhostUserBackend(name: "first", logger: { _ in }) { BlockDevice(backend: file) }
        try first.listen(path: socket.path)

        let memory = try GuestMemory.create(layout: [(base: 0, size: 1 << 20)], name: "vu-reconnect")
        let kick = try EventFD(), call = try EventFD(nonBlocking: true)
        let device = try VhostUserDevice(socketPath: socket.path, deviceID: VirtioDeviceType.block,
                                         notifiers: { _ in (kick: kick, call: call) })
        let gone = try EventFD()
        device.onDisconnect = { _, _ in try? gone.signal() }
        var driver = try VUTestDriver(memory: memory)
        try device.activate(memory: memory, queues: [try driver.queue(features: VirtioFeature.version1)],
                            features: VirtioFeature.version1, interrupt: VURecordingInterrupt())
        func waitUsed(_ n: UInt16) -> Bool { driver.waitForUsed(n) }
        try memory.writeBytes(Array(repeating: 0x11, count: 512), at: 0x11000)
        try driver.blockRequest(type: 1, sector: 1, data: 0x11000, length: 512)
        try kick.signal()
        #expect(waitUsed(1))

        // The backend dies; the device hears of it.
        first.stop()
        #expect(vuWaitReadable(gone.descriptor))
        // The guest goes on: a request made while no backend runs waits in the ring.
        try memory.writeBytes(Array(repeating: 0x22, count: 512), at: 0x11000)
        try driver.blockRequest(type: 1, sector: 2, data: 0x11000, length: 512)
        try kick.signal()

        // A new backend on the same socket; the device replays its set-up and the request completes.
        let second = VhostUserBackend(name: "second", logger: { _ in }) { BlockDevice(backend: file) }
        defer { second.stop() }
        try second.listen(path: socket.path)
        try device.reconnect(timeout: 5)
        #expect(waitUsed(2))
        #expect(try image.bytes(at: 1024, count: 512) == Array(repeating: 0x22, count: 512))
        #expect(try image.bytes(at: 512, count: 512) == Array(repeating: 0x11, count: 512))
        #expect(device.isActive)

        // And the next one too.
        try driver.blockRequest(type: 1, sector: 3, data: 0x11000, length: 512)
        try kick.signal()
        #expect(waitUsed(3))
        device.reset()
        #expect(device.savedRingBases[0] == 3)
    }

    @Test func automaticReconnectionSurvivesRepeatedRestarts() throws {
        let image = VUTempPath(".img")
        try image.createImage(size: 1 << 20)
        let file = try FileBlockBackend(path: image.path)
        let socket = VUTempPath(".sock")
        var backend = VhostUserBackend(name: "restart-0", logger: { _ in }) { BlockDevice(backend: file) }
        try backend.listen(path: socket.path)
        let memory = try GuestMemory.create(layout: [(base: 0, size: 1 << 20)], name: "vu-auto")
        let kick = try EventFD(), call = try EventFD(nonBlocking: true)
        let device = try VhostUserDevice(socketPath: socket.path, deviceID: VirtioDeviceType.block,
                                         notifiers: { _ in (kick: kick, call: call) })
        let lines = VULog()
        device.reconnectAutomatically(initialDelay: 0.01, maxDelay: 0.05, log: { lines.append($0) })
        var driver = try VUTestDriver(memory: memory)
        try device.activate(memory: memory, queues: [try driver.queue(features: VirtioFeature.version1)],
                            features: VirtioFeature.version1, interrupt: VURecordingInterrupt())
        for round in 1...5 {
            // A request is made while the backend is down, then it comes back.
            backend.stop()
            try memory.writeBytes(Array(repeating: UInt8(round), count: 512), at: 0x11000)
            try driver.blockRequest(type: 1, sector: UInt64(round), data: 0x11000, length: 512)
            try kick.signal()
            backend = VhostUserBackend(name: "restart-\(round)", logger: { _ in }) { BlockDevice(backend: file) }
            try backend.listen(path: socket.path)
            #expect(driver.waitForUsed(UInt16(round)))
            #expect(driver.status == 0)
            #expect(try image.bytes(at: round * 512, count: 512) == Array(repeating: UInt8(round), count: 512))
        }
        // The last request completes inside the replay, just before `reconnect` returns and logs.
        let deadline = Date().addingTimeInterval(5)
        while lines.all.filter({ $0.contains("reconnected") }).count < 5 && Date() < deadline { usleep(1000) }
        #expect(lines.all.filter { $0.contains("reconnected") }.count == 5)
        device.disconnect()
        backend.stop()
    }

    @Test func reconnectRetriesUntilTheBackendIsBack() throws {
        let image = VUTempPath(".img")
        try image.createImage(size: 1 << 20)
        let file = try FileBlockBackend(path: image.path)
        let socket = VUTempPath(".sock")
        let first = VhostUserBackend(name: "first", logger: { _ in }) { BlockDevice(backend: file) }
        try first.listen(path: socket.path)
        let device = try VhostUserDevice(socketPath: socket.path, deviceID: VirtioDeviceType.block,
                                         notifiers: { _ in (kick: try EventFD(), call: try EventFD()) })
        first.stop()
        #expect(throws: VhostUserError.self) { try device.reconnect(timeout: 0.1) }
        let second = VhostUserBackend(name: "second", logger: { _ in }) { BlockDevice(backend: file) }
        defer { second.stop() }
        let starter = Thread {
            usleep(200_000)
            try? second.listen(path: socket.path)
        }
        starter.start()
        try device.reconnect(timeout: 10)
        var config = [UInt8](repeating: 0, count: 8)
        config.withUnsafeMutableBytes { device.readConfig(offset: 0, into: $0) }
        #expect(config == withUnsafeBytes(of: UInt64(2048).littleEndian, Array.init))
    }
}

// MARK: - Hostile frontends

@Suite struct VhostUserHostileTests {
    @Test func hostileConnectionsAreClosedWhileAGoodOneKeepsWorking() throws {
        let image = VUTempPath(".img")
        try image.createImage(size: 1 << 20)
        let file = try FileBlockBackend(path: image.path)
        let socket = VUTempPath(".sock")
        let lines = VULog()
        let backend = VhostUserBackend(name: "shared", logger: { lines.append($0) }) { BlockDevice(backend: file) }
        defer { backend.stop() }
        try backend.listen(path: socket.path)

        // The good VM.
        let memory = try GuestMemory.create(layout: [(base: 0, size: 1 << 20)], name: "vu-good")
        let kick = try EventFD(), call = try EventFD()
        let device = try VhostUserDevice(socketPath: socket.path, deviceID: VirtioDeviceType.block,
                                         notifiers: { _ in (kick: kick, call: call) })
        var driver = try VUTestDriver(memory: memory)
        try device.activate(memory: memory, queues: [try driver.queue(features: VirtioFeature.version1)],
                            features: VirtioFeature.version1, interrupt: VURecordingInterrupt())
        func goodRequest(_ n: UInt16) throws {
            try memory.writeBytes(Array(repeating: UInt8(n), count: 512), at: 0x11000)
            try driver.blockRequest(type: 1, sector: UInt64(n), data: 0x11000, length: 512)
            try kick.signal()
            #expect(driver.waitForUsed(n, call: call))
            #expect(try image.bytes(at: Int(n) * 512, count: 512) == Array(repeating: UInt8(n), count: 512))
        }
        try goodRequest(1)

        // Hostile 1: rings at user addresses outside its memory table.
        do {
            let frontend = try VhostUserFrontend.connect(path: socket.path)
            let evil = try GuestMemory.create(layout: [(base: 0, size: 64 * 1024)], name: "vu-evil")
            let (regions, fds) = try VUTestDriverTable.table(evil)
            try frontend.setFeatures(VirtioFeature.version1)
            try frontend.setMemoryTable(regions, fileDescriptors: fds)
            try frontend.setVringNum(queue: 0, size: 16)
            try frontend.setVringAddress(VhostUserVringAddress(index: 0, descriptor: 0x1000, used: 0x3000, available: 0x2000))
            try frontend.setVringKick(queue: 0, fileDescriptor: try EventFD().descriptor)
            vuExpectDisconnected { _ = try frontend.getFeatures() }
        }
        // Hostile 2: a used ring that runs past the end of its memory.
        do {
            let frontend = try VhostUserFrontend.connect(path: socket.path)
            let evil = try GuestMemory.create(layout: [(base: 0, size: 64 * 1024)], name: "vu-evil2")
            let (regions, fds) = try VUTestDriverTable.table(evil)
            let base = regions[0].userAddress
            try frontend.setFeatures(VirtioFeature.version1)
            try frontend.setMemoryTable(regions, fileDescriptors: fds)
            try frontend.setVringNum(queue: 0, size: 256)
            try frontend.setVringAddress(VhostUserVringAddress(index: 0, descriptor: base + 0x1000, used: base + 0xF800,
                                                               available: base + 0x2000))
            try frontend.setVringKick(queue: 0, fileDescriptor: try EventFD().descriptor)
            vuExpectDisconnected { _ = try frontend.getFeatures() }
        }
        // Hostile 3: garbage in the middle of a valid conversation.
        do {
            let channel = try VhostUserChannel.connect(path: socket.path)
            let frontend = VhostUserFrontend(channel: channel)
            _ = try frontend.getFeatures()
            try channel.sendRaw(VhostUserCodec.encodeHeader(request: 77, flags: 1, size: 0))
            vuExpectDisconnected { _ = try frontend.getFeatures() }
        }
        // Hostile 4: an oversized header (a payload it never sends).
        do {
            let channel = try VhostUserChannel.connect(path: socket.path)
            try channel.sendRaw(VhostUserCodec.encodeHeader(request: 5, flags: 1, size: 1 << 30))
            vuExpectDisconnected { _ = try VhostUserFrontend(channel: channel).getFeatures() }
        }
        // Hostile 5: a region larger than the file behind it (touching it would raise SIGBUS).
        do {
            let frontend = try VhostUserFrontend.connect(path: socket.path)
            let small = try MemFD.create(name: "vu-evil3", size: 4096)
            try frontend.setMemoryTable([VhostUserMemoryRegion(guestAddress: 0, size: 1 << 20, userAddress: 0x7000_0000_0000,
                                                               mmapOffset: 0)], fileDescriptors: [small])
            vuExpectDisconnected { _ = try frontend.getFeatures() }
        }
        // Hostile 6: a dirty log larger than its file.
        do {
            let frontend = try VhostUserFrontend.connect(path: socket.path)
            try frontend.setProtocolFeatures(VhostUserProtocolFeature.logSharedMemory)
            vuExpectDisconnected { try frontend.setLogBase(size: 1 << 20, offset: 0, fileDescriptor: try MemFD.create(name: "vu-log", size: 4096)) }
        }
        #expect(backend.waitForClosedConnections(6, timeout: 5))
        let errors = backend.closedConnections.compactMap(\.error)
        #expect(errors.count == 6)
        #expect(errors.contains { $0.contains("runs past the end of its file (4096 bytes)") && $0.contains("region 0") })
        #expect(errors.contains { $0.contains("log offset 0 size 1048576 runs past the end of its file") })
        #expect(errors.contains { $0.contains("is not inside the memory table") })
        #expect(errors.contains { $0.contains("used ring") && $0.contains("outside guest RAM") })
        #expect(errors.contains { $0.contains("unknown vhost-user request 77") })
        #expect(errors.contains { $0.contains("exceeds its maximum") })

        // The good VM never noticed.
        try goodRequest(2)
        try goodRequest(3)
        #expect(backend.connectionCount == 1)
    }

    @Test func unsealedMemoryCanBeRefused() throws {
        let image = VUTempPath(".img")
        try image.createImage(size: 1 << 20)
        let file = try FileBlockBackend(path: image.path)
        let lines = VULog()
        let backend = VhostUserBackend(name: "sealed", logger: { lines.append($0) }) { BlockDevice(backend: file) }
        defer { backend.stop() }
        let region = [VhostUserMemoryRegion(guestAddress: 0, size: 1 << 20, userAddress: 0x7000_0000_0000, mmapOffset: 0)]

        // By default unsealed memory is taken, with a warning.
        let (a, b) = try VhostUserChannel.pair()
        try backend.serve(a)
        let lenient = VhostUserFrontend(channel: b)
        try lenient.setProtocolFeatures(VhostUserProtocolFeature.replyAck)
        try lenient.setMemoryTable(region, fileDescriptors: [try MemFD.create(name: "vu-unsealed", size: 1 << 20)])
        #expect(lines.all.contains { $0.contains("not sealed against shrinking") })

        // Required: unsealed memory is refused, sealed memory is taken.
        backend.requireSealedMemory = true
        let (c, d) = try VhostUserChannel.pair()
        try backend.serve(c)
        let strict = VhostUserFrontend(channel: d)
        try strict.setProtocolFeatures(VhostUserProtocolFeature.replyAck)
        let sealed = try VhostUserSharedMemory.createSealed(name: "vu-sealed", size: 1 << 20)
        #expect(VhostUserSharedMemory.isSealedAgainstShrinking(sealed))
        #expect(ftruncate(sealed.rawValue, 4096) != 0)
        try strict.setMemoryTable(region, fileDescriptors: [sealed])
        vuExpectError(.requestFailed(request: 5, status: 1)) {
            try strict.setMemoryTable(region, fileDescriptors: [try MemFD.create(name: "vu-unsealed", size: 1 << 20)])
        }
        #expect(backend.waitForClosedConnections(1, timeout: 5))
        #expect(backend.closedConnections.first?.error?.contains("not sealed against shrinking (F_SEAL_SHRINK)") == true)
    }

    @Test func oneDeviceServesOneConnectionAtATime() throws {
        let image = VUTempPath(".img")
        try image.createImage(size: 1 << 20)
        let socket = VUTempPath(".sock")
        let backend = VhostUserBackend(name: "excl", device: BlockDevice(backend: try FileBlockBackend(path: image.path)),
                                       logger: { _ in })
        defer { backend.stop() }
        try backend.listen(path: socket.path)
        let first = try VhostUserFrontend.connect(path: socket.path)
        _ = try first.getFeatures()
        let second = try VhostUserFrontend.connect(path: socket.path)
        vuExpectDisconnected { _ = try second.getFeatures() }
        _ = try first.getFeatures()
        first.close()
        #expect(backend.waitForClosedConnections(1, timeout: 5))
        // Once the first is gone, a new connection is served.
        let third = try VhostUserFrontend.connect(path: socket.path)
        #expect(try third.getQueueNum() == 1)
    }
}

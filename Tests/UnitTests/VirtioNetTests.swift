import Foundation
import GodwitSystem
import GuestMemory
import Testing
import VhostUser
import Machine
import Virtio

// MARK: - Driver-side helpers

/// A virtio-net device over a `MemoryNetBackend`, with the driver's RX and TX rings in plain memory.
final class NetHarness {
    static let ramSize: UInt64 = 8 << 20

    let memory: GuestMemory
    let allocator: VirtioTestAllocator
    let rx: VirtioTestDriver
    let tx: VirtioTestDriver
    /// The control queue (queue 2), used when the features include CTRL_VQ.
    let ctrl: VirtioTestDriver
    let backend: MemoryNetBackend
    let device: NetDevice
    let interrupt = VirtioRecordingInterrupt()
    let features: UInt64
    /// RX buffers posted, by head: where they are.
    var rxBuffers: [UInt16: [VirtioTestBuffer]] = [:]

    /// `features` is the driver's choice, taken from what the device offers (default: everything).
    init(features: ((UInt64) -> UInt64)? = nil, queueSize: UInt16 = 16, mtu: UInt16? = nil,
         offloads: UInt64 = NetDevice.implementedOffloads, controlQueue: Bool = true, activate: Bool = true) throws {
        memory = try GuestMemory.anonymous(layout: [(base: 0, size: NetHarness.ramSize)])
        allocator = VirtioTestAllocator(memory: memory)
        rx = try VirtioTestDriver(size: queueSize, memory: memory, index: 0, base: 0x1000, allocator: allocator)
        tx = try VirtioTestDriver(size: queueSize, memory: memory, index: 1, base: 0x40000, allocator: allocator)
        ctrl = try VirtioTestDriver(size: queueSize, memory: memory, index: 2, base: 0x80000, allocator: allocator)
        backend = try MemoryNetBackend()
        device = NetDevice(backend: backend, mac: MACAddress([0x52, 0x54, 0, 0x12, 0x34, 0x56])!, mtu: mtu,
                           offloads: offloads, controlQueue: controlQueue)
        let offered = device.deviceFeatures
        self.features = features.map { $0(offered) } ?? offered
        if activate { try self.activate() }
    }

    func activate() throws {
        var queues = [try rx.makeQueueAtDriverPosition(features: features), try tx.makeQueueAtDriverPosition(features: features)]
        if features & NetF.controlQueue != 0 { queues.append(try ctrl.makeQueueAtDriverPosition(features: features)) }
        try device.activate(memory: memory, queues: queues, features: features, interrupt: interrupt)
    }

    /// Puts both rings back to their initial state, as a driver does after a reset.
    func resetRings() throws {
        for ring in [rx, tx] {
            ring.availIdx = 0
            ring.usedSeen = 0
            ring.nextDescriptor = 0
            try memory.store(UInt16(0), at: ring.driverArea + 2)
            try memory.store(UInt16(0), at: ring.deviceArea + 2)
        }
        rxBuffers = [:]
    }

    // MARK: TX

    /// Publishes a TX chain of `pieces` (readable unless marked) and notifies; returns the head.
    @discardableResult
    func transmit(_ buffers: [VirtioTestBuffer], indirect: Bool = false, notify: Bool = true) throws -> UInt16 {
        let head = indirect ? try tx.addIndirectChain(buffers) : try tx.addChain(buffers)
        try tx.publish(head)
        if notify { device.queueNotified(1) }
        return head
    }

    /// Places `bytes` in guest memory as readable buffers of the given sizes (one buffer by default).
    func readable(_ bytes: [UInt8], split: [Int]? = nil) throws -> [VirtioTestBuffer] {
        var result: [VirtioTestBuffer] = []
        var start = 0
        for piece in split ?? [bytes.count] {
            let address = try allocator.place(Array(bytes[start..<(start + piece)]))
            result.append(VirtioTestBuffer(address: address, length: UInt32(piece), writable: false))
            start += piece
        }
        return result
    }

    /// Sends header + frame as one TX chain; returns the used elements it produced.
    @discardableResult
    func transmitFrame(_ frame: [UInt8], header: NetHeader = NetHeader(), split: [Int]? = nil,
                       indirect: Bool = false) throws -> [(id: UInt32, length: UInt32)] {
        try transmit(try readable(header.bytes + frame, split: split), indirect: indirect)
        return try tx.takeUsed()
    }

    // MARK: RX

    /// Posts one RX chain of writable buffers with the given lengths; returns its head.
    @discardableResult
    func postReceive(_ lengths: [Int], notify: Bool = false) throws -> UInt16 {
        let buffers = try lengths.map {
            VirtioTestBuffer(address: try allocator.allocate($0, fill: 0xEE), length: UInt32($0), writable: true)
        }
        let head = try rx.addChain(buffers)
        rxBuffers[head] = buffers
        try rx.publish(head)
        if notify { device.queueNotified(0) }
        return head
    }

    /// The first `length` bytes written into the RX chain `head`.
    func received(head: UInt32, length: UInt32) throws -> [UInt8] {
        guard let buffers = rxBuffers[UInt16(head)] else { return [] }
        var bytes: [UInt8] = []
        var left = Int(length)
        for buffer in buffers where left > 0 {
            let n = min(left, Int(buffer.length))
            bytes += try memory.readBytes(at: buffer.address, count: n)
            left -= n
        }
        return bytes
    }

    /// The frames delivered since the last call, reassembled from their used elements (header included).
    func takeReceivedFrames() throws -> [[UInt8]] {
        let used = try rx.takeUsed()
        var frames: [[UInt8]] = []
        var i = 0
        while i < used.count {
            let first = try received(head: used[i].id, length: used[i].length)
            guard first.count >= NetHeader.size, let header = NetHeader(first) else {
                Issue.record("used element with \(used[i].length) bytes: no header")
                i += 1
                continue
            }
            var frame = first
            let count = max(Int(header.numBuffers), 1)
            for j in 1..<count where i + j < used.count {
                frame += try received(head: used[i + j].id, length: used[i + j].length)
            }
            frames.append(frame)
            i += count
        }
        return frames
    }
}

/// A frame that starts with an Ethernet header (to the device's MAC, from a fixed peer) and `count` bytes in all.
func netTestFrame(_ count: Int, seed: UInt64) -> [UInt8] {
    let header: [UInt8] = [0x52, 0x54, 0, 0x12, 0x34, 0x56, 0x02, 0, 0, 0, 0, 1, 0x08, 0x00]
    guard count > header.count else { return Array(header.prefix(count)) }
    return header + virtioRandomBytes(count - header.count, seed: seed)
}

typealias NetF = NetDevice.Feature

// MARK: - virtio-mmio helpers (driver side)

fileprivate extension VirtioMmioTransport {
    func netRead(_ offset: UInt64) -> UInt32 { readRegister(offset) }
    func netWrite(_ offset: UInt64, _ value: UInt32) { writeRegister(offset, value) }

    func netNegotiate(_ features: UInt64) -> Bool {
        typealias R = VirtioMmioTransport.Register
        netWrite(R.status, 0)
        netWrite(R.status, VirtioStatus.acknowledge)
        netWrite(R.status, VirtioStatus.acknowledge | VirtioStatus.driver)
        netWrite(R.driverFeaturesSel, 0)
        netWrite(R.driverFeatures, UInt32(truncatingIfNeeded: features))
        netWrite(R.driverFeaturesSel, 1)
        netWrite(R.driverFeatures, UInt32(truncatingIfNeeded: features >> 32))
        netWrite(R.status, VirtioStatus.acknowledge | VirtioStatus.driver | VirtioStatus.featuresOK)
        return netRead(R.status) & VirtioStatus.featuresOK != 0
    }

    func netSetUpQueue(_ ring: VirtioTestDriver) {
        typealias R = VirtioMmioTransport.Register
        netWrite(R.queueSel, UInt32(ring.index))
        netWrite(R.queueNum, UInt32(ring.size))
        netWrite(R.queueDescLow, UInt32(truncatingIfNeeded: ring.descriptorTable))
        netWrite(R.queueDescHigh, UInt32(truncatingIfNeeded: ring.descriptorTable >> 32))
        netWrite(R.queueDriverLow, UInt32(truncatingIfNeeded: ring.driverArea))
        netWrite(R.queueDriverHigh, UInt32(truncatingIfNeeded: ring.driverArea >> 32))
        netWrite(R.queueDeviceLow, UInt32(truncatingIfNeeded: ring.deviceArea))
        netWrite(R.queueDeviceHigh, UInt32(truncatingIfNeeded: ring.deviceArea >> 32))
        netWrite(R.queueReady, 1)
    }

    func netDriverOK() {
        netWrite(VirtioMmioTransport.Register.status,
                 VirtioStatus.acknowledge | VirtioStatus.driver | VirtioStatus.featuresOK | VirtioStatus.driverOK)
    }
}

/// Why the TAP test cannot run here, or nil.
let netTapUnavailableReason: String? = {
    if getuid() != 0 { return "not root" }
    if access("/dev/net/tun", R_OK | W_OK) != 0 { return "/dev/net/tun is not available" }
    return nil
}()

// MARK: - Tests

@Suite struct VirtioNetTests {
    // MARK: Identity, configuration, features

    @Test func configSpaceAndOfferedFeatures() throws {
        let backend = try MemoryNetBackend()
        let mac = MACAddress([0x02, 0x11, 0x22, 0x33, 0x44, 0x55])!
        let device = NetDevice(backend: backend, mac: mac)
        #expect(device.deviceID == 1 && device.queueCount == 3 && device.maxQueueSize == 256)
        let f = device.deviceFeatures
        for bit in [VirtioFeature.version1, VirtioFeature.eventIndex, VirtioFeature.indirectDescriptors,
                    NetF.mac, NetF.status, NetF.mergeableRxBuffers, NetF.controlQueue, NetF.guestAnnounce,
                    NetF.checksum, NetF.guestChecksum, NetF.guestTSO4, NetF.guestTSO6, NetF.hostTSO4, NetF.hostTSO6] {
            #expect(f & bit != 0, "feature 0x\(String(bit, radix: 16)) should be offered")
        }
        for bit in [NetF.mtu, NetF.guestECN, NetF.guestUFO, NetF.hostECN, NetF.hostUFO, NetF.controlRx, NetF.controlVLAN,
                    NetF.controlMACAddress, NetF.multiQueue, NetF.controlGuestOffloads, VirtioFeature.ringPacked] {
            #expect(f & bit == 0, "feature 0x\(String(bit, radix: 16)) should not be offered")
        }

        var config = [UInt8](repeating: 0xAA, count: 16)
        config.withUnsafeMutableBytes { device.readConfig(offset: 0, into: $0) }
        #expect(Array(config[0..<6]) == mac.bytes)
        #expect(config[6] == 1 && config[7] == 0)      // status: LINK_UP
        #expect(config[8] == 1 && config[9] == 0)      // max_virtqueue_pairs
        #expect(config[10...].allSatisfy { $0 == 0 })  // no mtu field without VIRTIO_NET_F_MTU
        // Unaligned and out-of-range reads.
        var two = [UInt8](repeating: 0xAA, count: 2)
        two.withUnsafeMutableBytes { device.readConfig(offset: 5, into: $0) }
        #expect(two == [0x55, 1])
        two.withUnsafeMutableBytes { device.readConfig(offset: Int.max, into: $0) }
        #expect(two == [0, 0])
        // Writes are ignored.
        [UInt8](repeating: 0, count: 6).withUnsafeBytes { device.writeConfig(offset: 0, from: $0) }
        config.withUnsafeMutableBytes { device.readConfig(offset: 0, into: $0) }
        #expect(Array(config[0..<6]) == mac.bytes)

        // MTU offered only when given; link down at start.
        let withMTU = NetDevice(backend: backend, mac: mac, mtu: 1400, linkUp: false)
        #expect(withMTU.deviceFeatures & NetF.mtu != 0)
        config.withUnsafeMutableBytes { withMTU.readConfig(offset: 0, into: $0) }
        #expect(config[6] == 0 && config[10] == 0x78 && config[11] == 0x05)  // 1400
        #expect(NetDevice(backend: backend, mac: mac, mtu: 10).mtu == 68)

        // Offloads: none on request; TSO never without its checksum feature; limited by the backend.
        let plain = NetDevice(backend: backend, mac: mac, offloads: 0)
        #expect(plain.deviceFeatures & NetDevice.implementedOffloads == 0)
        let noChecksum = NetDevice(backend: backend, mac: mac, offloads: NetF.hostTSO4 | NetF.guestTSO4 | NetF.guestChecksum)
        #expect(noChecksum.deviceFeatures & NetDevice.implementedOffloads == NetF.guestChecksum | NetF.guestTSO4)
        let limited = NetDevice(backend: try MemoryNetBackend(supportedOffloadFeatures: NetF.checksum), mac: mac)
        #expect(limited.deviceFeatures & NetDevice.implementedOffloads == NetF.checksum)
        // Without the control queue: two queues, neither CTRL_VQ nor GUEST_ANNOUNCE.
        let noControl = NetDevice(backend: backend, mac: mac, controlQueue: false)
        #expect(noControl.queueCount == 2 && noControl.deviceFeatures & (NetF.controlQueue | NetF.guestAnnounce) == 0)
    }

    @Test func macAddresses() throws {
        let a = NetDevice.generatedMAC(seed: "vm-1")
        #expect(a == NetDevice.generatedMAC(seed: "vm-1"))
        #expect(a.count == 6 && a[0] == 0x02)   // locally administered, unicast
        #expect(a != NetDevice.generatedMAC(seed: "vm-2"))
        #expect(MACAddress.generated(seed: "tap0").isLocallyAdministered)
        // Many seeds, no collision, all unicast.
        let many = Set((0..<2000).map { NetDevice.generatedMAC(seed: "vm-\($0)") })
        #expect(many.count == 2000 && many.allSatisfy { $0[0] & 1 == 0 })

        let parsed = try #require(MACAddress("52:54:00:ab:CD:0f"))
        #expect(parsed.bytes == [0x52, 0x54, 0, 0xAB, 0xCD, 0x0F])
        #expect(parsed.description == "52:54:00:ab:cd:0f")
        #expect(MACAddress("01:00:5e:00:00:01") == nil)    // multicast
        #expect(MACAddress("00:00:00:00:00:00") == nil)
        #expect(MACAddress("52:54:00:ab:cd") == nil)
        #expect(MACAddress("52:54:00:ab:cd:0g") == nil)
        #expect(MACAddress([1, 2, 3]) == nil)
        let json = try JSONEncoder().encode([parsed])
        #expect(String(decoding: json, as: UTF8.self) == "[\"52:54:00:ab:cd:0f\"]")
        #expect(try JSONDecoder().decode([MACAddress].self, from: json) == [parsed])
        #expect(throws: DecodingError.self) { try JSONDecoder().decode([MACAddress].self, from: Data("[\"ff:ff:ff:ff:ff:ff\"]".utf8)) }
    }

    @Test func negotiationThroughMmioSetsBackendOffloadsAndCarriesFrames() throws {
        let h = try NetHarness(activate: false)
        let line = VirtioRecordingLine()
        let transport = VirtioMmioTransport(device: h.device, memory: h.memory, interruptLine: line)
        #expect(transport.netRead(VirtioMmioTransport.Register.deviceID) == 1)

        // A feature that was not offered is refused.
        #expect(!transport.netNegotiate(VirtioFeature.version1 | NetF.guestECN))
        let accepted = VirtioFeature.version1 | NetF.mac | NetF.status | NetF.mergeableRxBuffers
            | NetF.guestChecksum | NetF.guestTSO4
        #expect(transport.netNegotiate(accepted))
        transport.netSetUpQueue(h.rx)
        transport.netSetUpQueue(h.tx)
        transport.netDriverOK()
        #expect(transport.isActive)
        #expect(h.device.negotiatedFeatures == accepted)
        #expect(h.backend.offloadFeatures == accepted)
        #expect(TapBackend.tunOffloadFlags(negotiatedFeatures: accepted) == Tap.offloadChecksum | Tap.offloadTSO4)

        // TX through the MMIO notify register.
        let frame = netTestFrame(100, seed: 1)
        let head = try h.tx.addChain(try h.readable(NetHeader().bytes + frame))
        try h.tx.publish(head)
        transport.netWrite(VirtioMmioTransport.Register.queueNotify, 1)
        #expect(h.backend.takeSent() == [NetHeader().bytes + frame])
        #expect(line.raiseCount == 1)
        #expect(transport.interruptStatus & VirtioMmioTransport.interruptUsedBuffer != 0)

        // RX: a notify on queue 0 wakes the receiver; receive() delivers.
        var wakeups = 0
        h.device.onReceiveWakeup = { wakeups += 1 }
        h.backend.inject(frame: frame)
        try h.postReceive([2048])
        try h.postReceive([2048])
        transport.netWrite(VirtioMmioTransport.Register.queueNotify, 0)
        #expect(wakeups == 1)
        #expect(h.device.receive() == .backendEmpty)
        #expect(try h.takeReceivedFrames() == [NetHeader(numBuffers: 1).bytes + frame])

        // Link status through the transport: a configuration change interrupt and a new generation.
        let generation = transport.netRead(VirtioMmioTransport.Register.configGeneration)
        h.device.setLinkUp(false)
        #expect(transport.interruptStatus & VirtioMmioTransport.interruptConfigChange != 0)
        #expect(transport.netRead(VirtioMmioTransport.Register.configGeneration) != generation)
        #expect(transport.readBytesForNet(0x100 + 6, count: 2) == [0, 0])

        // Reset: the backend goes back to plain frames, the device to inactive.
        transport.netWrite(VirtioMmioTransport.Register.status, 0)
        #expect(h.backend.offloadFeatures == 0)
        #expect(!h.device.isActive && h.device.receive() == .inactive)
    }

    @Test func tunOffloadFlagsFollowGuestFeaturesOnly() {
        func flags(_ f: UInt64) -> UInt32 { TapBackend.tunOffloadFlags(negotiatedFeatures: f) }
        #expect(flags(0) == 0)
        #expect(flags(NetF.checksum | NetF.hostTSO4 | NetF.hostTSO6) == 0)   // host side needs no TUN flag
        #expect(flags(NetF.guestTSO4 | NetF.guestTSO6) == 0)                 // TSO without GUEST_CSUM: nothing
        #expect(flags(NetF.guestChecksum) == Tap.offloadChecksum)
        #expect(flags(NetF.guestChecksum | NetF.guestTSO4 | NetF.guestTSO6)
                == Tap.offloadChecksum | Tap.offloadTSO4 | Tap.offloadTSO6)
        #expect(flags(NetF.guestChecksum | NetF.guestECN) == Tap.offloadChecksum)  // ECN only with TSO
    }

    // MARK: TX

    @Test func transmitGoodFramesByteForByte() throws {
        // Without event-idx every completion interrupts (the avail flags ask for it).
        let h = try NetHarness(features: { $0 & ~VirtioFeature.eventIndex })
        // One buffer; header split over two buffers and data over three; an indirect chain.
        let frames = [netTestFrame(60, seed: 1), netTestFrame(1514, seed: 2), netTestFrame(900, seed: 3)]
        let checksum = NetHeader(flags: NetHeader.flagNeedsChecksum, checksumStart: 34, checksumOffset: 16)
        var used = try h.transmitFrame(frames[0])
        used += try h.transmitFrame(frames[1], header: checksum, split: [5, 7, 14, 1000, 500])
        used += try h.transmitFrame(frames[2], split: [12, 900], indirect: true)
        #expect(used.map(\.length) == [0, 0, 0])
        #expect(h.backend.takeSent() == [NetHeader().bytes + frames[0], checksum.bytes + frames[1],
                                         NetHeader().bytes + frames[2]])
        #expect(h.interrupt.usedSignals == 3)
        let stats = h.device.statistics
        #expect(stats.txFrames == 3 && stats.txBytes == UInt64(60 + 1514 + 900) && stats.txMalformed == 0)

        // A batch: several chains, one notification, one interrupt; the largest frame is accepted.
        let big = netTestFrame(NetDevice.maxFrameLength, seed: 4)
        let tso = NetHeader(flags: NetHeader.flagNeedsChecksum, gsoType: NetHeader.gsoTCPv4, headerLength: 54,
                            gsoSize: 1448, checksumStart: 34, checksumOffset: 16)
        try h.transmit(try h.readable(tso.bytes + big), notify: false)
        try h.transmit(try h.readable(NetHeader().bytes + frames[0]), notify: false)
        h.device.queueNotified(1)
        #expect(try h.tx.takeUsed().count == 2)
        #expect(h.backend.takeSent() == [tso.bytes + big, NetHeader().bytes + frames[0]])
        #expect(h.interrupt.usedSignals == 4)
    }

    @Test func transmitHostileChainsAreDroppedAndCounted() throws {
        let h = try NetHarness(features: { $0 & ~(NetF.hostTSO4 | NetF.hostTSO6) })
        let frame = netTestFrame(200, seed: 5)
        let good = NetHeader().bytes + frame
        var expectedDrops = 0

        func expectDropped(_ what: String, _ body: () throws -> Void) throws {
            try body()
            expectedDrops += 1
            let used = try h.tx.takeUsed()
            #expect(used.count == 1 && used.first?.length == 0, "\(what): completed with length 0")
            #expect(h.backend.takeSent().isEmpty, "\(what): nothing sent")
            #expect(h.device.statistics.txMalformed == UInt64(expectedDrops), "\(what): counted")
            #expect(!h.device.needsReset, "\(what): device still running")
        }

        try expectDropped("buffer past the end of RAM") {
            try h.transmit([VirtioTestBuffer(address: NetHarness.ramSize - 100, length: 300, writable: false)])
        }
        try expectDropped("length that wraps") {
            try h.transmit([VirtioTestBuffer(address: UInt64.max - 10, length: 300, writable: false)])
        }
        try expectDropped("writable descriptor") {
            try h.transmit(try h.readable(good) + [VirtioTestBuffer(address: try h.allocator.allocate(64),
                                                                    length: 64, writable: true)])
        }
        try expectDropped("only a writable descriptor") {
            try h.transmit([VirtioTestBuffer(address: try h.allocator.allocate(300), length: 300, writable: true)])
        }
        try expectDropped("shorter than the header") { try h.transmit(try h.readable(Array(good.prefix(11)))) }
        try expectDropped("header and no Ethernet header") { try h.transmit(try h.readable(Array(good.prefix(20)))) }
        try expectDropped("longer than 12 + 65550") {
            try h.transmit(try h.readable(NetHeader().bytes + netTestFrame(NetDevice.maxFrameLength + 1, seed: 6)))
        }
        try expectDropped("csum_start past the end") {
            let header = NetHeader(flags: NetHeader.flagNeedsChecksum, checksumStart: 199, checksumOffset: 0)
            try h.transmit(try h.readable(header.bytes + frame))
        }
        try expectDropped("csum_offset past the end") {
            let header = NetHeader(flags: NetHeader.flagNeedsChecksum, checksumStart: 34, checksumOffset: 65000)
            try h.transmit(try h.readable(header.bytes + frame))
        }
        try expectDropped("receive-only flag") {
            try h.transmit(try h.readable(NetHeader(flags: NetHeader.flagDataValid).bytes + frame))
        }
        try expectDropped("GSO without HOST_TSO4") {
            let header = NetHeader(flags: NetHeader.flagNeedsChecksum, gsoType: NetHeader.gsoTCPv4, headerLength: 54,
                                   gsoSize: 100, checksumStart: 34, checksumOffset: 16)
            try h.transmit(try h.readable(header.bytes + frame))
        }
        try expectDropped("unknown GSO type") {
            try h.transmit(try h.readable(NetHeader(gsoType: 0x42, gsoSize: 100).bytes + frame))
        }
        try expectDropped("a chain that loops") {
            let address = try h.allocator.place(good)
            let head = h.tx.nextDescriptor
            let second = (head + 1) % h.tx.size
            try h.tx.writeDescriptor(head, address: address, length: 12, flags: VirtioTestFlag.next, next: second)
            try h.tx.writeDescriptor(second, address: address + 12, length: 200, flags: VirtioTestFlag.next, next: head)
            h.tx.nextDescriptor = (head + 2) % h.tx.size
            try h.tx.publish(head)
            h.device.queueNotified(1)
        }
        try expectDropped("indirect table outside RAM") {
            let head = h.tx.nextDescriptor
            try h.tx.writeDescriptor(head, address: NetHarness.ramSize, length: 32, flags: VirtioTestFlag.indirect)
            h.tx.nextDescriptor = (head + 1) % h.tx.size
            try h.tx.publish(head)
            h.device.queueNotified(1)
        }

        // The device still works.
        #expect(try h.transmitFrame(frame).map(\.length) == [0])
        #expect(h.backend.takeSent() == [good])
        #expect(h.device.statistics.txFrames == 1)
    }

    @Test func transmitChecksumAndGSOOnlyWhenNegotiated() throws {
        // Without CSUM, NEEDS_CSUM is a lie; with HOST_TSO4, a TSO header must still be consistent.
        let plain = try NetHarness(features: { $0 & ~(NetF.checksum | NetF.hostTSO4 | NetF.hostTSO6) })
        let frame = netTestFrame(300, seed: 7)
        let checksum = NetHeader(flags: NetHeader.flagNeedsChecksum, checksumStart: 34, checksumOffset: 6)
        try plain.transmitFrame(frame, header: checksum)
        #expect(plain.backend.takeSent().isEmpty && plain.device.statistics.txMalformed == 1)

        let h = try NetHarness()
        let tso4 = NetHeader(flags: NetHeader.flagNeedsChecksum, gsoType: NetHeader.gsoTCPv4, headerLength: 54,
                             gsoSize: 100, checksumStart: 34, checksumOffset: 16)
        var tso6 = tso4
        tso6.gsoType = NetHeader.gsoTCPv6
        try h.transmitFrame(frame, header: checksum)
        try h.transmitFrame(frame, header: tso4)
        try h.transmitFrame(frame, header: tso6)
        #expect(h.backend.takeSent() == [checksum.bytes + frame, tso4.bytes + frame, tso6.bytes + frame])
        var zeroSize = tso4
        zeroSize.gsoSize = 0
        var longHeader = tso4
        longHeader.headerLength = 301
        var ecn = tso4
        ecn.gsoType |= NetHeader.gsoECN
        var udp = tso4
        udp.gsoType = NetHeader.gsoUDP
        for header in [zeroSize, longHeader, ecn, udp] { try h.transmitFrame(frame, header: header) }
        #expect(h.backend.takeSent().isEmpty)
        #expect(h.device.statistics.txMalformed == 4 && h.device.statistics.txFrames == 3)
    }

    @Test func transmitBackendFullKeepsTheChainAndRetries() throws {
        let h = try NetHarness()
        var blockedCalls = 0
        h.device.onTransmitBlocked = { blockedCalls += 1 }
        h.backend.sendLimit = 1
        let frames = (0..<3).map { netTestFrame(100 + $0, seed: UInt64(10 + $0)) }
        for frame in frames { try h.transmit(try h.readable(NetHeader().bytes + frame), notify: false) }
        h.device.queueNotified(1)
        #expect(try h.tx.takeUsed().count == 1)   // the others stay in the ring
        #expect(h.device.transmitBlocked && blockedCalls == 1)
        #expect(h.device.statistics.txBackendFull == 1)
        // Still full: retrying changes nothing (and does not fire the hook again).
        #expect(!h.device.retryTransmit())
        #expect(try h.tx.takeUsed().isEmpty)
        #expect(blockedCalls == 1)
        // The backend drains: everything goes, in order.
        var sent = h.backend.takeSent()
        h.backend.sendLimit = nil
        #expect(h.device.retryTransmit())
        #expect(!h.device.transmitBlocked)
        #expect(try h.tx.takeUsed().count == 2)
        sent += h.backend.takeSent()
        #expect(sent == frames.map { NetHeader().bytes + $0 })
        #expect(h.device.statistics.txFrames == 3)
    }

    @Test func transmitBackendErrorDropsTheFrame() throws {
        let h = try NetHarness()
        h.backend.failSends = true
        #expect(try h.transmitFrame(netTestFrame(80, seed: 1)).map(\.length) == [0])
        #expect(h.device.statistics.txBackendErrors == 1 && h.device.statistics.txFrames == 0)
        h.backend.failSends = false
        try h.transmitFrame(netTestFrame(80, seed: 2))
        #expect(h.backend.takeSent().count == 1)
    }

    // MARK: RX

    @Test func receiveIntoSingleBuffers() throws {
        let h = try NetHarness(features: { $0 & ~(NetF.mergeableRxBuffers | NetDevice.implementedOffloads) })
        let frames = [netTestFrame(60, seed: 1), netTestFrame(1514, seed: 2), netTestFrame(14, seed: 3)]
        for frame in frames { h.backend.inject(frame: frame, header: NetHeader(flags: NetHeader.flagDataValid)) }
        try h.postReceive([2048])
        try h.postReceive([12, 100, 1500])   // header in its own buffer, frame over two
        try h.postReceive([26])
        try h.postReceive([2048])
        #expect(h.device.receive() == .backendEmpty)
        #expect(h.interrupt.usedSignals == 1)   // one per batch
        let used = try h.rx.takeUsed()
        #expect(used.map(\.length) == frames.map { UInt32(12 + $0.count) })
        // Without GUEST_CSUM the header is all zero except num_buffers = 1.
        let plain = NetHeader(numBuffers: 1).bytes
        #expect(try used.map { try h.received(head: $0.id, length: $0.length) } == frames.map { plain + $0 })
        let stats = h.device.statistics
        #expect(stats.rxFrames == 3 && stats.rxBytes == UInt64(60 + 1514 + 14))
        // One buffer left, nothing to read.
        #expect(h.device.receive() == .backendEmpty)
        #expect(h.interrupt.usedSignals == 1)
    }

    @Test func receiveMergeableSpreadsOverBuffers() throws {
        let h = try NetHarness()
        for _ in 0..<8 { try h.postReceive([1000]) }
        let big = netTestFrame(3000, seed: 1)   // 3012 bytes: 4 buffers
        let small = netTestFrame(100, seed: 2)
        h.backend.inject(frame: big)
        h.backend.inject(frame: small)
        #expect(h.device.receive() == .backendEmpty)
        let used = try h.rx.takeUsed()
        #expect(used.map(\.length) == [1000, 1000, 1000, 12, 112])
        h.rx.usedSeen &-= UInt16(used.count)
        let frames = try h.takeReceivedFrames()
        #expect(frames == [NetHeader(numBuffers: 4).bytes + big, NetHeader(numBuffers: 1).bytes + small])
        #expect(h.interrupt.usedSignals == 1)

        #expect(h.device.statistics.rxFrames == 2)

        // The largest frame, over page-sized buffers as Linux posts them: 65562 bytes in 17 buffers.
        let l = try NetHarness(queueSize: 32)
        for _ in 0..<18 { try l.postReceive([4096]) }
        let largest = netTestFrame(NetDevice.maxFrameLength, seed: 3)
        l.backend.inject(frame: largest)
        #expect(l.device.receive() == .backendEmpty)
        let largeUsed = try l.rx.takeUsed()
        #expect(largeUsed.count == 17 && largeUsed.last?.length == UInt32(65562 - 16 * 4096))
        l.rx.usedSeen &-= 17
        #expect(try l.takeReceivedFrames() == [NetHeader(numBuffers: 17).bytes + largest])
    }

    @Test func receiveWithoutBuffersLeavesFramesInTheBackend() throws {
        let h = try NetHarness(features: { $0 & ~NetF.mergeableRxBuffers })
        var wakeups = 0
        h.device.onReceiveWakeup = { wakeups += 1 }
        let frames = (0..<5).map { netTestFrame(200 + $0, seed: UInt64($0)) }
        for frame in frames { h.backend.inject(frame: frame) }
        for _ in 0..<100 { #expect(h.device.receive() == .waitingForBuffers) }
        #expect(h.backend.framesRead == 0 && h.backend.queuedCount == 5)
        #expect(h.interrupt.usedSignals == 0)
        // With event-idx the device asked to be notified at the next buffer.
        #expect(try h.rx.availEvent() == h.rx.availIdx)

        try h.postReceive([2048], notify: true)
        try h.postReceive([2048], notify: true)
        #expect(wakeups == 2)
        #expect(h.device.receive() == .waitingForBuffers)
        #expect(h.backend.framesRead == 2 && h.backend.queuedCount == 3)
        for _ in 0..<4 { try h.postReceive([2048]) }
        #expect(h.device.receive() == .backendEmpty)
        #expect(try h.takeReceivedFrames() == frames.map { NetHeader(numBuffers: 1).bytes + $0 })
        #expect(h.device.statistics.rxNoBuffers >= 100)
    }

    @Test func receiveMergeableWaitsForEnoughBuffers() throws {
        let h = try NetHarness()
        let frame = netTestFrame(2500, seed: 9)   // 2512 bytes: 3 buffers of 1000
        h.backend.inject(frame: frame)
        h.backend.inject(frame: netTestFrame(50, seed: 10))
        try h.postReceive([1000])
        try h.postReceive([1000])
        // The frame is read, does not fit, and waits in the device (one frame at most); the ring is untouched.
        #expect(h.device.receive() == .waitingForBuffers)
        #expect(h.backend.framesRead == 1)
        #expect(try h.rx.usedIdx() == 0)
        #expect(h.device.receive() == .waitingForBuffers)
        #expect(h.backend.framesRead == 1)
        try h.postReceive([1000])
        try h.postReceive([1000])
        // Both frames delivered; then no buffer is left, so the backend is not even asked.
        #expect(h.device.receive() == .waitingForBuffers)
        #expect(h.backend.queuedCount == 0)
        #expect(try h.takeReceivedFrames().map(\.count) == [2512, 62])
        #expect(h.device.statistics.rxFrames == 2 && h.device.statistics.rxTooBig == 0)
    }

    @Test func receiveTooBigIsDroppedAndTheBufferKept() throws {
        let h = try NetHarness(features: { $0 & ~NetF.mergeableRxBuffers })
        try h.postReceive([512])
        let small = netTestFrame(100, seed: 2)
        h.backend.inject(frame: netTestFrame(1000, seed: 1))
        h.backend.inject(frame: small)
        #expect(h.device.receive() == .waitingForBuffers)   // the one buffer went to the small frame
        #expect(try h.takeReceivedFrames() == [NetHeader(numBuffers: 1).bytes + small])
        #expect(h.device.statistics.rxTooBig == 1 && h.device.statistics.rxFrames == 1)

        // With MRG_RXBUF: a frame larger than the whole ring's buffers can never fit: dropped.
        let m = try NetHarness(queueSize: 4)
        for _ in 0..<4 { try m.postReceive([64]) }
        m.backend.inject(frame: netTestFrame(500, seed: 3))
        m.backend.inject(frame: netTestFrame(40, seed: 4))
        #expect(m.device.receive() == .backendEmpty)
        #expect(try m.takeReceivedFrames().map(\.count) == [52])
        #expect(m.device.statistics.rxTooBig == 1)
    }

    @Test func receiveSkipsMalformedBuffers() throws {
        let h = try NetHarness()
        let readableHead = try h.rx.addChain([VirtioTestBuffer(address: try h.allocator.allocate(2048), length: 2048,
                                                               writable: false)])
        try h.rx.publish(readableHead)
        let outsideHead = try h.rx.addChain([VirtioTestBuffer(address: NetHarness.ramSize - 16, length: 2048,
                                                              writable: true)])
        try h.rx.publish(outsideHead)
        try h.postReceive([8])   // smaller than the header
        try h.postReceive([2048])
        let frame = netTestFrame(300, seed: 1)
        h.backend.inject(frame: frame)
        #expect(h.device.receive() == .waitingForBuffers)
        let used = try h.rx.takeUsed()
        #expect(used.map(\.length) == [0, 0, 0, 312])
        #expect(try h.received(head: used[3].id, length: used[3].length) == NetHeader(numBuffers: 1).bytes + frame)
        #expect(h.device.statistics.rxMalformedBuffers == 3 && !h.device.needsReset)

        // A malformed chain between the buffers of a merged frame is completed after the frame.
        try h.postReceive([1000])
        let bad = try h.rx.addChain([VirtioTestBuffer(address: UInt64.max - 8, length: 100, writable: true)])
        try h.rx.publish(bad)
        try h.postReceive([1000])
        let big = netTestFrame(1500, seed: 2)
        h.backend.inject(frame: big)
        #expect(h.device.receive() == .waitingForBuffers)
        let merged = try h.rx.takeUsed()
        #expect(merged.map(\.length) == [1000, 512, 0] && merged[2].id == UInt32(bad))
        #expect(try h.received(head: merged[0].id, length: 1000) + h.received(head: merged[1].id, length: 512)
                == NetHeader(numBuffers: 2).bytes + big)
    }

    @Test func receivedHeadersMatchNegotiatedOffloads() throws {
        let frame = netTestFrame(200, seed: 1)
        let partial = NetHeader(flags: NetHeader.flagNeedsChecksum, checksumStart: 34, checksumOffset: 16)
        let gso = NetHeader(flags: NetHeader.flagNeedsChecksum, gsoType: NetHeader.gsoTCPv4, headerLength: 54,
                            gsoSize: 1448, checksumStart: 34, checksumOffset: 16)
        let valid = NetHeader(flags: NetHeader.flagDataValid | NetHeader.flagRSCInfo, headerLength: 7)

        // No offloads negotiated: partial checksums and GSO are dropped, other headers zeroed.
        let plain = try NetHarness(features: { $0 & ~NetDevice.implementedOffloads })
        for _ in 0..<4 { try plain.postReceive([2048]) }
        for header in [partial, gso, valid] { plain.backend.inject(frame: frame, header: header) }
        plain.backend.inject(Array(NetHeader().bytes + frame.prefix(13)))   // shorter than an Ethernet header
        plain.backend.inject([1, 2, 3])                                      // shorter than the header
        #expect(plain.device.receive() == .backendEmpty)
        #expect(try plain.takeReceivedFrames() == [NetHeader(numBuffers: 1).bytes + frame])
        #expect(plain.device.statistics.rxBadFrames == 4)

        // GUEST_CSUM and GUEST_TSO4: passed through (num_buffers set, RSC_INFO cleared); TSO6 still refused.
        let h = try NetHarness(features: { $0 & ~NetF.guestTSO6 })
        for _ in 0..<4 { try h.postReceive([2048]) }
        var gso6 = gso
        gso6.gsoType = NetHeader.gsoTCPv6
        var lying = partial
        lying.checksumStart = 199
        for header in [partial, gso, valid, gso6, lying] { h.backend.inject(frame: frame, header: header) }
        #expect(h.device.receive() == .backendEmpty)
        var expectedValid = valid
        expectedValid.flags = NetHeader.flagDataValid
        let expected = [partial, gso, expectedValid].map { header -> [UInt8] in
            var header = header
            header.numBuffers = 1
            return header.bytes + frame
        }
        #expect(try h.takeReceivedFrames() == expected)
        #expect(h.device.statistics.rxBadFrames == 2)
    }

    @Test func receiveBudgetAndBackendErrors() throws {
        let h = try NetHarness()
        for _ in 0..<10 { try h.postReceive([256]) }
        for i in 0..<6 { h.backend.inject(frame: netTestFrame(60, seed: UInt64(i))) }
        #expect(h.device.receive(budget: 4) == .budgetExhausted)
        #expect(h.interrupt.usedSignals == 1)
        #expect(h.device.receive(budget: 4) == .backendEmpty)
        #expect(try h.takeReceivedFrames().count == 6)
        h.backend.failReceives = true
        #expect(h.device.receive() == .backendError)
        #expect(!NetReceiveOutcome.backendError.wantsBackendReadable)
        #expect(h.device.statistics.rxBackendErrors == 1)
    }

    // MARK: Interrupts, link, reset

    @Test func eventIndexSuppressesInterrupts() throws {
        let h = try NetHarness()
        for _ in 0..<8 { try h.postReceive([256]) }
        // used_event = 0: the first completion (used idx 0 -> 1) interrupts.
        h.backend.inject(frame: netTestFrame(60, seed: 1))
        h.device.receive()
        #expect(h.interrupt.usedSignals == 1)
        // The driver wants to hear only once used idx passes 4.
        try h.rx.setUsedEvent(4)
        for i in 0..<3 {
            h.backend.inject(frame: netTestFrame(60, seed: UInt64(i)))
            h.device.receive()
        }
        #expect(h.interrupt.usedSignals == 1)   // used idx 1 -> 4: event 4 not yet crossed
        h.backend.inject(frame: netTestFrame(60, seed: 9))
        h.device.receive()
        #expect(h.interrupt.usedSignals == 2)   // 4 -> 5 crosses it
        // A batch that jumps over used_event interrupts once.
        try h.rx.setUsedEvent(6)
        for i in 0..<3 { h.backend.inject(frame: netTestFrame(60, seed: UInt64(i))) }
        h.device.receive()
        #expect(h.interrupt.usedSignals == 3)

        // TX honours it too.
        try h.tx.setUsedEvent(5)
        for i in 0..<3 { try h.transmitFrame(netTestFrame(60, seed: UInt64(i))) }
        #expect(h.interrupt.usedSignals == 3)
        for i in 0..<3 { try h.transmitFrame(netTestFrame(60, seed: UInt64(i))) }
        #expect(h.interrupt.usedSignals == 4)

        // Without event-idx, VIRTQ_AVAIL_F_NO_INTERRUPT suppresses.
        let n = try NetHarness(features: { $0 & ~VirtioFeature.eventIndex })
        try n.rx.setAvailFlags(1)
        try n.postReceive([256])
        n.backend.inject(frame: netTestFrame(60, seed: 1))
        n.device.receive()
        #expect(n.interrupt.usedSignals == 0 && n.device.statistics.rxFrames == 1)
        try n.rx.setAvailFlags(0)
        try n.postReceive([256])
        n.backend.inject(frame: netTestFrame(60, seed: 2))
        n.device.receive()
        #expect(n.interrupt.usedSignals == 1)
    }

    @Test func linkStatusRaisesConfigInterrupts() throws {
        let h = try NetHarness()
        func status() -> [UInt8] {
            var bytes = [UInt8](repeating: 0xAA, count: 2)
            bytes.withUnsafeMutableBytes { h.device.readConfig(offset: 6, into: $0) }
            return bytes
        }
        #expect(h.device.isLinkUp && status() == [1, 0])
        h.device.setLinkUp(false)
        #expect(!h.device.isLinkUp && status() == [0, 0])
        #expect(h.interrupt.configSignals == 1)
        h.device.setLinkUp(false)   // no change, no interrupt
        #expect(h.interrupt.configSignals == 1)
        h.device.setLinkUp(true)
        #expect(status() == [1, 0] && h.interrupt.configSignals == 2)
        // Not active: the field changes, nobody is told.
        h.device.reset()
        h.device.setLinkUp(false)
        #expect(status() == [0, 0] && h.interrupt.configSignals == 2)
    }

    @Test func resetStopsTheQueuesAndDropsThePendingFrame() throws {
        let h = try NetHarness()
        try h.postReceive([1000])
        h.backend.inject(frame: netTestFrame(1500, seed: 1))   // needs two buffers: waits in the device
        #expect(h.device.receive() == .waitingForBuffers)
        h.device.reset()
        #expect(h.device.statistics.rxDroppedOnReset == 1)
        #expect(h.device.receive() == .inactive)
        try h.tx.publish(try h.tx.addChain(try h.readable(NetHeader().bytes + netTestFrame(60, seed: 2))))
        h.device.queueNotified(1)
        #expect(h.backend.takeSent().isEmpty && h.device.queueStates == nil)

        // Activated again (same rings, positions carried over by the harness): both directions work.
        var wakeups = 0
        h.device.onReceiveWakeup = { wakeups += 1 }
        try h.resetRings()
        try h.activate()
        #expect(wakeups == 1)   // activation wakes the receiver
        try h.transmitFrame(netTestFrame(60, seed: 2))
        #expect(h.backend.takeSent().count == 1)
        try h.postReceive([2048])
        try h.postReceive([2048])
        h.backend.inject(frame: netTestFrame(60, seed: 3))
        #expect(h.device.receive() == .backendEmpty)
        #expect(try h.takeReceivedFrames().count == 1)
        #expect(h.device.queueStates?.transmit.nextUsed == 1)
    }

    @Test func brokenRingAsksForReset() throws {
        let h = try NetHarness()
        // The driver claims 100 chains on a 16-entry ring.
        try h.memory.store(UInt16(100), at: h.tx.driverArea + 2)
        h.device.queueNotified(1)
        #expect(h.device.needsReset && h.interrupt.resetErrors.count == 1)
        #expect(h.device.statistics.resetsNeeded == 1)
        #expect(h.device.receive() == .inactive)
    }

    // MARK: Threads

    @Test func rxWorkerDeliversAndWaitsForBuffers() throws {
        let h = try NetHarness()
        let worker = try NetRxWorker(device: h.device)
        try worker.start()
        defer { worker.stop() }
        #expect(worker.isRunning)

        func waitForUsed(_ count: UInt16) -> Bool {
            for _ in 0..<2000 {
                if (try? h.rx.usedIdx()) == count { return true }
                usleep(1000)
            }
            return false
        }

        // Frames first, no buffers: the worker leaves them in the backend.
        let frames = (0..<6).map { netTestFrame(100 + $0, seed: UInt64($0)) }
        for frame in frames { h.backend.inject(frame: frame) }
        usleep(20_000)
        #expect(h.backend.framesRead == 0)
        // Buffers and a notification: delivered.
        for _ in 0..<3 { try h.postReceive([2048]) }
        h.device.queueNotified(0)
        #expect(waitForUsed(3))
        usleep(10_000)
        #expect(h.backend.queuedCount == 3)
        for _ in 0..<3 { try h.postReceive([2048]) }
        h.device.queueNotified(0)
        #expect(waitForUsed(6))
        // Frames arriving later wake the worker through the backend's descriptor.
        for _ in 0..<2 { try h.postReceive([2048]) }
        h.device.queueNotified(0)
        h.backend.inject(frame: frames[0])
        h.backend.inject(frame: frames[1])
        #expect(waitForUsed(8))
        #expect(try h.takeReceivedFrames() == (frames + frames.prefix(2)).map { NetHeader(numBuffers: 1).bytes + $0 })

        // TX meanwhile on this thread, blocked then unblocked: the worker retries.
        h.backend.sendLimit = 0
        try h.transmitFrame(netTestFrame(80, seed: 1))
        #expect(h.device.transmitBlocked)
        h.backend.sendLimit = nil
        var sent: [[UInt8]] = []
        for _ in 0..<2000 where sent.isEmpty {
            sent = h.backend.takeSent()
            usleep(1000)
        }
        #expect(sent.count == 1)

        worker.stop()
        #expect(!worker.isRunning)
        #expect(h.device.onReceiveWakeup == nil && h.device.onTransmitBlocked == nil)
        worker.stop()   // idempotent
    }

    @Test func rxWorkerBacksOffOnAFullBackend() throws {
        let h = try NetHarness()
        let worker = try NetRxWorker(device: h.device)
        try worker.start()
        defer { worker.stop() }
        h.backend.sendLimit = 0
        try h.transmitFrame(netTestFrame(80, seed: 1))
        #expect(h.device.transmitBlocked)
        // The memory backend's descriptor always polls writable: without a back-off the worker would
        // retry in a tight loop. It retries about every 10 ms instead.
        usleep(200_000)
        let attempts = h.device.statistics.txBackendFull
        #expect(attempts >= 2 && attempts < 200, "\(attempts) attempts in 200 ms")
        h.backend.sendLimit = nil
        var sent: [[UInt8]] = []
        for _ in 0..<2000 where sent.isEmpty {
            sent = h.backend.takeSent()
            usleep(1000)
        }
        #expect(sent.count == 1 && !h.device.transmitBlocked)
    }

    @Test func rxAndTxInParallel() throws {
        let h = try NetHarness(queueSize: 64)
        let worker = try NetRxWorker(device: h.device)
        try worker.start()
        defer { worker.stop() }
        let count = 500
        // Placed up front: the allocator is not thread-safe; the TX thread only touches the TX ring.
        let txChains = try (0..<count).map { try h.readable(NetHeader().bytes + netTestFrame(60 + $0 % 1400, seed: UInt64($0))) }
        let txThread = Thread {
            for chain in txChains {
                _ = try? h.transmit(chain)
                _ = try? h.tx.takeUsed()
            }
        }
        txThread.start()
        var received: [[UInt8]] = []
        var injected = 0
        var posted = 0
        for _ in 0..<20_000 where received.count < count {
            while posted - received.count < 32 {
                try h.postReceive([256 + 1400])
                posted += 1
            }
            h.device.queueNotified(0)
            while injected < count, h.backend.inject(frame: netTestFrame(60 + injected % 1400, seed: UInt64(injected))) {
                injected += 1
            }
            received += try h.takeReceivedFrames()
            usleep(200)
        }
        for _ in 0..<5000 where !txThread.isFinished { usleep(1000) }
        #expect(received.count == count)
        #expect(received.enumerated().allSatisfy { $0.element == NetHeader(numBuffers: 1).bytes + netTestFrame(60 + $0.offset % 1400, seed: UInt64($0.offset)) })
        let stats = h.device.statistics
        #expect(stats.txFrames == UInt64(count) && stats.rxFrames == UInt64(count))
        #expect(h.backend.takeSent().count == count)
    }

    // MARK: TAP

    @Test(.enabled(if: netTapUnavailableReason == nil,
                   "needs root and /dev/net/tun: \(netTapUnavailableReason ?? "")"))
    func tapBackendOpensConfiguresAndCloses() throws {
        let backend = try TapBackend(name: nil)
        let name = backend.tap.name
        #expect(!name.isEmpty && backend.tap.created)
        #expect(FileManager.default.fileExists(atPath: "/sys/class/net/\(name)"))
        #expect(backend.pollDescriptor == backend.tap.descriptor.rawValue)

        try backend.configureOffloads(negotiatedFeatures: NetF.guestChecksum | NetF.guestTSO4 | NetF.guestTSO6)
        #expect(backend.offloadFlags == Tap.offloadChecksum | Tap.offloadTSO4 | Tap.offloadTSO6)
        try backend.configureOffloads(negotiatedFeatures: 0)
        #expect(backend.offloadFlags == 0)

        // Through a device: activation sets the guest's offloads; an empty TAP reads as empty; a frame
        // written by the guest is accepted by the kernel.
        let memory = try GuestMemory.anonymous(layout: [(base: 0, size: NetHarness.ramSize)])
        let allocator = VirtioTestAllocator(memory: memory)
        let rx = try VirtioTestDriver(size: 16, memory: memory, index: 0, base: 0x1000, allocator: allocator)
        let tx = try VirtioTestDriver(size: 16, memory: memory, index: 1, base: 0x40000, allocator: allocator)
        let device = NetDevice(backend: backend, mac: MACAddress.generated(seed: name))
        let features = device.deviceFeatures & ~(NetF.guestTSO6 | NetF.controlQueue | NetF.guestAnnounce)
        try device.activate(memory: memory, queues: [try rx.makeQueueAtDriverPosition(features: features), try tx.makeQueueAtDriverPosition(features: features)],
                            features: features, interrupt: VirtioRecordingInterrupt())
        #expect(backend.offloadFlags == Tap.offloadChecksum | Tap.offloadTSO4)
        try backend.tap.setUp(true)
        try rx.publish(try rx.addChain([VirtioTestBuffer(address: try allocator.allocate(2048), length: 2048, writable: true)]))
        // An IPv4 broadcast frame (the kernel takes it and drops it).
        let broadcast: [UInt8] = [0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF] + device.mac.bytes + [0x08, 0x00]
            + [UInt8](repeating: 0, count: 46)
        let address = try allocator.place(NetHeader().bytes + broadcast)
        try tx.publish(try tx.addChain([VirtioTestBuffer(address: address, length: UInt32(12 + broadcast.count), writable: false)]))
        device.queueNotified(1)
        #expect(device.statistics.txFrames == 1 && device.statistics.txBackendErrors == 0)
        let outcome = device.receive()
        #expect(outcome == .backendEmpty || outcome == .budgetExhausted)
        device.reset()
        #expect(backend.offloadFlags == 0)

        // Closing the descriptor removes the interface Godwit created.
        backend.tap.descriptor.close()
        var gone = false
        for _ in 0..<100 where !gone {
            gone = !FileManager.default.fileExists(atPath: "/sys/class/net/\(name)")
            if !gone { usleep(10_000) }
        }
        #expect(gone, "interface \(name) still exists after close")
    }
}

fileprivate extension VirtioMmioTransport {
    func readBytesForNet(_ offset: UInt64, count: Int) -> [UInt8] {
        var bytes = [UInt8](repeating: 0xAA, count: count)
        bytes.withUnsafeMutableBytes { read(offset: offset, into: $0) }
        return bytes
    }
}

// MARK: - Control queue and announce

extension NetHarness {
    /// Sends one control command: `readable` pieces (each its own descriptor) then writable buffers of
    /// `writable` bytes (filled with 0xEE); returns the used elements and the first writable byte.
    func control(_ readable: [[UInt8]], writable: [Int] = [1]) throws -> (used: [(id: UInt32, length: UInt32)], ack: UInt8?) {
        var buffers: [VirtioTestBuffer] = []
        for piece in readable {
            buffers.append(VirtioTestBuffer(address: try allocator.place(piece), length: UInt32(piece.count), writable: false))
        }
        for length in writable {
            buffers.append(VirtioTestBuffer(address: try allocator.allocate(length, fill: 0xEE), length: UInt32(length), writable: true))
        }
        try ctrl.publish(try ctrl.addChain(buffers))
        device.queueNotified(NetControlQueue.queueIndex)
        let ack = try buffers.first(where: \.writable).map { try memory.load(UInt8.self, at: $0.address) }
        return (try ctrl.takeUsed(), ack)
    }

    /// The config status field (2 bytes, little-endian).
    var status: UInt16 {
        var bytes = [UInt8](repeating: 0xAA, count: 2)
        bytes.withUnsafeMutableBytes { device.readConfig(offset: 6, into: $0) }
        return UInt16(bytes[0]) | UInt16(bytes[1]) << 8
    }
}

@Suite struct VirtioNetControlQueueTests {
    static let announceAck: [UInt8] = [NetControlQueue.classAnnounce, NetControlQueue.commandAnnounceAck]

    @Test func announceSetsTheStatusAndTheAckClearsIt() throws {
        let h = try NetHarness()
        #expect(h.status == NetDevice.LinkStatus.up && !h.device.isAnnouncing)
        #expect(h.device.requestAnnounce())
        #expect(h.status == NetDevice.LinkStatus.up | NetDevice.LinkStatus.announce && h.device.isAnnouncing)
        #expect(h.interrupt.configSignals == 1)
        // Link changes leave the announce bit alone.
        h.device.setLinkUp(false)
        #expect(h.status == NetDevice.LinkStatus.announce)
        h.device.setLinkUp(true)

        let (used, ack) = try h.control([VirtioNetControlQueueTests.announceAck])
        #expect(used.count == 1 && used[0].length == 1 && ack == NetControlQueue.ok)
        #expect(h.status == NetDevice.LinkStatus.up && !h.device.isAnnouncing)
        #expect(h.device.statistics.controlAnnounceAcks == 1)
        #expect(h.interrupt.usedSignals >= 1)
        // The header may be split over two descriptors; a second ACK is answered OK too.
        let split = try h.control([[NetControlQueue.classAnnounce], [NetControlQueue.commandAnnounceAck]])
        #expect(split.used.count == 1 && split.ack == NetControlQueue.ok)
        // Frames still flow.
        try h.transmitFrame(netTestFrame(60, seed: 1))
        #expect(h.backend.takeSent().count == 1)
    }

    @Test func otherCommandsAreAnsweredWithAnError() throws {
        let h = try NetHarness()
        _ = h.device.requestAnnounce()
        for (command, what) in [([UInt8(0), 0, 1], "VIRTIO_NET_CTRL_RX promisc (not offered)"),
                                ([1, 0] + [UInt8](repeating: 0, count: 14), "MAC table"),
                                ([3, 1], "announce class, unknown command"),
                                ([3, 0, 0], "ANNOUNCE_ACK with data"),
                                ([0xFF, 0xFF], "unknown class")] {
            let (used, ack) = try h.control([command])
            #expect(used.count == 1 && used[0].length == 1 && ack == NetControlQueue.error, "\(what)")
        }
        // None of them cleared the announce bit.
        #expect(h.device.isAnnouncing)
        #expect(h.device.statistics.controlRefused == 5 && h.device.statistics.controlAnnounceAcks == 0)
        // Writable space larger than one byte: only the ack is written.
        let (used, ack) = try h.control([VirtioNetControlQueueTests.announceAck], writable: [8])
        #expect(used[0].length == 1 && ack == NetControlQueue.ok && !h.device.isAnnouncing)
    }

    @Test func hostileChainsAreCompletedWithoutAnAnswer() throws {
        let h = try NetHarness()
        _ = h.device.requestAnnounce()
        var malformed: UInt64 = 0
        func expectMalformed(_ what: String, _ body: () throws -> [(id: UInt32, length: UInt32)]) throws {
            let used = try body()
            malformed += 1
            #expect(used.count == 1 && used[0].length == 0, "\(what): \(used)")
            #expect(h.device.statistics.controlMalformed == malformed, "\(what)")
            #expect(h.device.isAnnouncing, "\(what) must not acknowledge")
            #expect(!h.device.needsReset, "\(what) must not stop the device")
        }
        try expectMalformed("no ack byte") { try h.control([VirtioNetControlQueueTests.announceAck], writable: []).used }
        try expectMalformed("one-byte header") { try h.control([[3]]).used }
        try expectMalformed("no header at all") { try h.control([], writable: [2]).used }
        try expectMalformed("a chain too large") { try h.control([VirtioNetControlQueueTests.announceAck + [UInt8](repeating: 0, count: 5000)]).used }
        // Hand-made descriptor tables: out of RAM, a loop, readable after writable.
        let ack = try h.allocator.allocate(1)
        let header = try h.allocator.place(VirtioNetControlQueueTests.announceAck)
        func raw(_ descriptors: [(address: UInt64, length: UInt32, flags: UInt16, next: UInt16)]) throws -> [(id: UInt32, length: UInt32)] {
            for (i, d) in descriptors.enumerated() {
                try h.ctrl.writeDescriptor(UInt16(10 + i), address: d.address, length: d.length, flags: d.flags, next: d.next)
            }
            try h.ctrl.publish(10)
            h.device.queueNotified(NetControlQueue.queueIndex)
            return try h.ctrl.takeUsed()
        }
        let next = VirtioTestFlag.next, write = VirtioTestFlag.write
        try expectMalformed("header outside RAM") {
            try raw([(NetHarness.ramSize - 1, 2, next, 11), (ack, 1, write, 0)])
        }
        try expectMalformed("ack outside RAM") {
            try raw([(header, 2, next, 11), (NetHarness.ramSize + 4096, 1, write, 0)])
        }
        try expectMalformed("a descriptor loop") {
            try raw([(header, 2, next, 11), (ack, 1, write | next, 10)])
        }
        try expectMalformed("readable after writable") {
            try raw([(ack, 1, write | next, 11), (header, 2, next, 12), (ack, 1, write, 0)])
        }
        try expectMalformed("next index out of the table") {
            try raw([(header, 2, next, 200)])
        }
        // The device goes on: a good command still works.
        let good = try h.control([VirtioNetControlQueueTests.announceAck])
        #expect(good.ack == NetControlQueue.ok && !h.device.isAnnouncing)

        // A broken ring (avail idx far ahead) stops the device until reset.
        try h.ctrl.setAvailIdx(h.ctrl.availIdx &+ 100)
        h.device.queueNotified(NetControlQueue.queueIndex)
        #expect(h.device.needsReset && h.interrupt.resetErrors.count == 1)
    }

    @Test func announceNeedsTheFeaturesAndAnActiveDevice() throws {
        // Not negotiated: nothing happens.
        let plain = try NetHarness(features: { $0 & ~(NetF.guestAnnounce | NetF.controlQueue) })
        #expect(!plain.device.requestAnnounce())
        #expect(plain.status == NetDevice.LinkStatus.up && plain.interrupt.configSignals == 0)
        // Control queue without GUEST_ANNOUNCE: commands run, announce is not asked.
        let noAnnounce = try NetHarness(features: { $0 & ~NetF.guestAnnounce })
        #expect(!noAnnounce.device.requestAnnounce())
        #expect(try noAnnounce.control([[0, 0, 1]]).ack == NetControlQueue.error)
        // Not active: nothing; a reset clears a pending announce.
        let h = try NetHarness(activate: false)
        #expect(!h.device.requestAnnounce())
        try h.activate()
        #expect(h.device.requestAnnounce())
        h.device.reset()
        #expect(h.status == NetDevice.LinkStatus.up)
        // CTRL_VQ negotiated but no queue 2: activation refuses.
        let missing = try NetHarness(activate: false)
        #expect(throws: VirtioError.queueMissing(queue: 2)) {
            try missing.device.activate(memory: missing.memory, queues: [try missing.rx.makeQueue(features: missing.features),
                                                                         try missing.tx.makeQueue(features: missing.features)],
                                        features: missing.features, interrupt: missing.interrupt)
        }
    }

    /// A saved state from a NIC without the control queue (an older VMM) restores into one with it;
    /// the other way round is refused.
    @Test func aStateWithFewerQueuesRestores() throws {
        let old = try NetHarness(controlQueue: false, activate: false)
        let transport = VirtioMmioTransport(device: old.device, memory: old.memory, interruptLine: VirtioRecordingLine())
        let features = VirtioFeature.version1 | NetF.mac | NetF.status
        #expect(transport.netNegotiate(features))
        transport.netSetUpQueue(old.rx)
        transport.netSetUpQueue(old.tx)
        transport.netDriverOK()
        try old.transmitFrame(netTestFrame(60, seed: 3))
        let saved = transport.captureState(externalBases: nil)
        #expect(saved.queues.count == 2 && saved.queues[1].nextAvail == 1)

        let new = try NetHarness(activate: false)
        let restored = VirtioMmioTransport(device: new.device, memory: old.memory, interruptLine: VirtioRecordingLine())
        try restored.restoreState(saved)
        #expect(new.device.isActive && new.device.negotiatedFeatures == features)
        #expect(restored.captureState(externalBases: nil).queues.count == 3)
        #expect(!new.device.requestAnnounce(), "a driver without GUEST_ANNOUNCE is not asked")

        // Three saved queues do not fit a device with two.
        let withControl = restored.captureState(externalBases: nil)
        let older = VirtioMmioTransport(device: NetDevice(backend: try MemoryNetBackend(), mac: old.device.mac, controlQueue: false),
                                        memory: old.memory, interruptLine: VirtioRecordingLine())
        #expect(throws: VirtioError.self) { try older.restoreState(withControl) }

        // The machine-level check agrees: fewer queues fit, more do not.
        func shape(_ queues: Int) -> MachineShape {
            let json = #"{"cpus": 1, "regions": [{"base": 0, "size": 268435456}], "devices": [{"id": "virtio0", "deviceID": 1, "queues": \#(queues)}], "cpuid": []}"#
            return try! JSONDecoder().decode(MachineShape.self, from: Data(json.utf8))
        }
        #expect(shape(3).mismatch(shape(2)) == nil)
        #expect(shape(2).mismatch(shape(3)) != nil)
        #expect(shape(3).mismatch(shape(3)) == nil)
    }

    @Test func decodeChecksEveryByte() {
        #expect(NetControlQueue.decode([3, 0], dataLength: 0) == .announceAck)
        #expect(NetControlQueue.decode([3, 0], dataLength: 1) == .unsupported(commandClass: 3, command: 0, dataLength: 1))
        #expect(NetControlQueue.decode([3], dataLength: 0) == nil)
        #expect(NetControlQueue.decode([], dataLength: 0) == nil)
        #expect(NetControlQueue.decode([4, 0], dataLength: 0) == .unsupported(commandClass: 4, command: 0, dataLength: 0))
    }
}

/// The VMM's vhost-user frontend runs a net device's control queue and announce bit itself; the
/// backend (an I/O domain's `NetDevice`) only ever sees the RX and TX rings.
@Suite struct VhostUserNetControlQueueTests {
    @Test func theFrontendRunsTheControlQueueAndAnnounces() throws {
        let netBackend = try MemoryNetBackend()
        let served = NetDevice(backend: netBackend, mac: MACAddress([0x52, 0x54, 0, 1, 2, 3])!)
        let backend = VhostUserBackend(name: "test-net", device: served)
        defer { backend.stop() }
        let (backendEnd, frontendEnd) = try VhostUserChannel.pair()
        _ = try backend.serve(backendEnd)
        let memory = try GuestMemory.create(layout: [(base: 0, size: NetHarness.ramSize)], name: "vu-net-test")
        let call = try EventFD()
        let kicks = try (0..<2).map { _ in try EventFD() }
        let asked = VULog()
        let device = try VhostUserDevice(deviceID: VirtioDeviceType.network, notifiers: { queue in
            asked.append("\(queue)")
            return (kick: kicks[queue], call: call)
        }, connect: { VhostUserFrontend(channel: frontendEnd) })
        #expect(device.queueCount == 3 && device.backendQueueCount == 2 && device.runsNetControlQueue)
        let offered = device.deviceFeatures
        #expect(offered & NetF.controlQueue != 0 && offered & NetF.guestAnnounce != 0)
        #expect(offered & (NetF.controlRx | NetF.controlVLAN | NetF.multiQueue) == 0)

        let allocator = VirtioTestAllocator(memory: memory)
        let rx = try VirtioTestDriver(size: 16, memory: memory, index: 0, base: 0x1000, allocator: allocator)
        let tx = try VirtioTestDriver(size: 16, memory: memory, index: 1, base: 0x40000, allocator: allocator)
        let ctrl = try VirtioTestDriver(size: 16, memory: memory, index: 2, base: 0x80000, allocator: allocator)
        let features = VirtioFeature.version1 | NetF.mac | NetF.status | NetF.controlQueue | NetF.guestAnnounce
        let interrupt = VirtioRecordingInterrupt()
        try device.activate(memory: memory, queues: [try rx.makeQueue(features: features), try tx.makeQueue(features: features),
                                                     try ctrl.makeQueue(features: features)],
                            features: features, interrupt: interrupt)
        // Eventfds only for the backend's rings; the backend negotiated neither control feature.
        #expect(asked.all.sorted() == ["0", "1"])
        #expect(served.negotiatedFeatures == features & ~(NetF.controlQueue | NetF.guestAnnounce))

        func status() -> UInt16 {
            var bytes = [UInt8](repeating: 0xAA, count: 2)
            bytes.withUnsafeMutableBytes { device.readConfig(offset: 6, into: $0) }
            return UInt16(bytes[0]) | UInt16(bytes[1]) << 8
        }
        #expect(status() == NetDevice.LinkStatus.up)
        #expect(device.requestAnnounce() && interrupt.configSignals == 1)
        #expect(status() == NetDevice.LinkStatus.up | NetDevice.LinkStatus.announce)

        // A refused command, a malformed chain, then the ACK, all answered here.
        func command(_ bytes: [UInt8], ackLength: Int = 1) throws -> (length: UInt32?, ack: UInt8) {
            let ack = try allocator.allocate(max(ackLength, 1), fill: 0xEE)
            var buffers = [VirtioTestBuffer(address: try allocator.place(bytes), length: UInt32(bytes.count), writable: false)]
            if ackLength > 0 { buffers.append(VirtioTestBuffer(address: ack, length: UInt32(ackLength), writable: true)) }
            try ctrl.publish(try ctrl.addChain(buffers))
            device.queueNotified(NetControlQueue.queueIndex)
            return (try ctrl.takeUsed().first?.length, try memory.load(UInt8.self, at: ack))
        }
        #expect(try command([0, 0, 1]) == (1, NetControlQueue.error))
        #expect(try command([3, 0], ackLength: 0).length == 0)
        #expect(device.isAnnouncing)
        #expect(try command([3, 0]) == (1, NetControlQueue.ok))
        #expect(!device.isAnnouncing && status() == NetDevice.LinkStatus.up)
        let stats = device.controlQueueStatistics
        #expect(stats.controlAnnounceAcks == 1 && stats.controlRefused == 1 && stats.controlMalformed == 1)

        // Migration: the control queue's position comes from here, the rings' from the backend.
        let bases = try #require(try device.suspendForMigration())
        #expect(bases[2] == 3 && bases[0] == 0 && bases[1] == 0)
        try device.resumeAfterSuspend()
        device.reset()
        #expect(!device.requestAnnounce())
        #expect(backend.closedConnections.isEmpty)
    }
}

import Foundation
import GuestMemory
import Testing
import Virtio

// MARK: - Helpers

/// Records raises and lowers of the interrupt line, and its level.
final class VirtioRecordingLine: InterruptLine, @unchecked Sendable {
    private let lock = NSLock()
    private var raises = 0
    private var lowers = 0
    private var level = false

    func raise() { lock.withLock { raises += 1; level = true } }
    func lower() { lock.withLock { lowers += 1; level = false } }

    var raiseCount: Int { lock.withLock { raises } }
    var lowerCount: Int { lock.withLock { lowers } }
    var asserted: Bool { lock.withLock { level } }
}

/// A device that records what the transport does to it; activation can be made to fail.
final class VirtioStubDevice: VirtioDevice, @unchecked Sendable {
    struct Refused: Error {}
    let deviceID: UInt32 = 42
    let queueCount = 2
    let maxQueueSize: UInt16 = 64
    let deviceFeatures: UInt64 = VirtioFeature.version1 | (1 << 3)
    var failActivation = false
    private(set) var activatedQueues: [Int]?
    private(set) var activatedFeatures: UInt64 = 0
    private(set) var notified: [Int] = []
    private(set) var resets = 0
    private(set) var interrupt: VirtioInterrupt?
    var config: [UInt8] = [1, 2, 3, 4, 5, 6, 7, 8]

    func readConfig(offset: Int, into data: UnsafeMutableRawBufferPointer) {
        for i in 0..<data.count { data[i] = offset + i < config.count ? config[offset + i] : 0 }
    }
    func writeConfig(offset: Int, from data: UnsafeRawBufferPointer) {
        for i in 0..<data.count where offset + i < config.count { config[offset + i] = data[i] }
    }
    func activate(memory: GuestMemory, queues: [Virtqueue], features: UInt64, interrupt: VirtioInterrupt) throws {
        if failActivation { throw Refused() }
        activatedQueues = queues.map(\.index)
        activatedFeatures = features
        self.interrupt = interrupt
    }
    func queueNotified(_ index: Int) { notified.append(index) }
    func reset() { resets += 1; activatedQueues = nil; interrupt = nil }
}

typealias VirtioReg = VirtioMmioTransport.Register
typealias VirtioSt = VirtioStatus

fileprivate extension VirtioMmioTransport {
    /// A 4-byte guest read through the MMIO entry point.
    func r(_ offset: UInt64) -> UInt32 {
        var value: UInt32 = 0xDEAD_BEEF
        withUnsafeMutableBytes(of: &value) { read(offset: offset, into: $0) }
        return UInt32(littleEndian: value)
    }

    /// A 4-byte guest write through the MMIO entry point.
    func w(_ offset: UInt64, _ value: UInt32) {
        withUnsafeBytes(of: value.littleEndian) { write(offset: offset, from: $0) }
    }

    /// Reads `count` bytes at `offset` (any width).
    func readBytes(_ offset: UInt64, count: Int) -> [UInt8] {
        var bytes = [UInt8](repeating: 0xAA, count: count)
        bytes.withUnsafeMutableBytes { read(offset: offset, into: $0) }
        return bytes
    }

    /// The driver side of feature negotiation; returns whether FEATURES_OK stuck.
    func negotiate(_ features: UInt64) -> Bool {
        w(VirtioReg.status, 0)
        w(VirtioReg.status, VirtioSt.acknowledge)
        w(VirtioReg.status, VirtioSt.acknowledge | VirtioSt.driver)
        w(VirtioReg.driverFeaturesSel, 0)
        w(VirtioReg.driverFeatures, UInt32(truncatingIfNeeded: features))
        w(VirtioReg.driverFeaturesSel, 1)
        w(VirtioReg.driverFeatures, UInt32(truncatingIfNeeded: features >> 32))
        w(VirtioReg.status, VirtioSt.acknowledge | VirtioSt.driver | VirtioSt.featuresOK)
        return r(VirtioReg.status) & VirtioSt.featuresOK != 0
    }

    /// Programs queue `index` with the test driver's layout (or `size` / `usedRing` overrides).
    func setUpQueue(_ index: UInt32, _ driver: VirtioTestDriver, size: UInt32? = nil, usedRing: UInt64? = nil) {
        w(VirtioReg.queueSel, index)
        w(VirtioReg.queueNum, size ?? UInt32(driver.size))
        let used = usedRing ?? driver.deviceArea
        w(VirtioReg.queueDescLow, UInt32(truncatingIfNeeded: driver.descriptorTable))
        w(VirtioReg.queueDescHigh, UInt32(truncatingIfNeeded: driver.descriptorTable >> 32))
        w(VirtioReg.queueDriverLow, UInt32(truncatingIfNeeded: driver.driverArea))
        w(VirtioReg.queueDriverHigh, UInt32(truncatingIfNeeded: driver.driverArea >> 32))
        w(VirtioReg.queueDeviceLow, UInt32(truncatingIfNeeded: used))
        w(VirtioReg.queueDeviceHigh, UInt32(truncatingIfNeeded: used >> 32))
        w(VirtioReg.queueReady, 1)
    }

    func driverOK() {
        w(VirtioReg.status, VirtioSt.acknowledge | VirtioSt.driver | VirtioSt.featuresOK | VirtioSt.driverOK)
    }
}

/// A block device behind the MMIO transport, with a test driver on the same guest memory.
final class VirtioMmioBlockRig {
    let image: VirtioTempImage
    let driver: VirtioTestDriver
    let device: BlockDevice
    let line = VirtioRecordingLine()
    let transport: VirtioMmioTransport
    let features: UInt64

    init(queueSize: UInt16 = 16, activate: Bool = true) throws {
        image = try VirtioTempImage(size: 64 * 1024)
        driver = try VirtioTestDriver(size: queueSize)
        device = BlockDevice(backend: try FileBlockBackend(path: image.path), serial: "mmio")
        transport = VirtioMmioTransport(device: device, memory: driver.memory, interruptLine: line)
        features = VirtioFeature.version1 | BlockDevice.Feature.flush | BlockDevice.Feature.blockSize
        if activate {
            #expect(transport.negotiate(features))
            transport.setUpQueue(0, driver)
            transport.driverOK()
        }
    }

    /// Publishes a write of `payload` at `sector`; returns the status address.
    func submitWrite(sector: UInt64, payload: [UInt8]) throws -> UInt64 {
        let header = try driver.place(VirtioBlockHarness.header(type: BlockDevice.RequestType.write, sector: sector))
        let data = try driver.place(payload)
        let status = try driver.allocate(1, fill: 0xFF)
        try driver.publish(try driver.addChain([
            VirtioTestBuffer(address: header, length: 16, writable: false),
            VirtioTestBuffer(address: data, length: UInt32(payload.count), writable: false),
            VirtioTestBuffer(address: status, length: 1, writable: true),
        ]))
        return status
    }
}

// MARK: - virtio-mmio transport tests

@Suite struct VirtioMmioTests {
    /// Out-of-process devices: the used-ring bit shows once the driver runs, and reading it does not
    /// deadlock (a regression: the flag was read under the transport's own lock).
    @Test func usedBufferBitAlwaysReportedForExternalDevices() throws {
        let rig = try VirtioMmioBlockRig(activate: false)
        rig.transport.reportsUsedBufferAlways = true
        #expect(rig.transport.readRegister(VirtioMmioTransport.Register.interruptStatus) == 0, "not before DRIVER_OK")
        #expect(rig.transport.negotiate(rig.features))
        rig.transport.setUpQueue(0, rig.driver)
        rig.transport.driverOK()
        #expect(rig.transport.readRegister(VirtioMmioTransport.Register.interruptStatus) & 1 == 1)
        rig.transport.reportsUsedBufferAlways = false
        #expect(rig.transport.readRegister(VirtioMmioTransport.Register.interruptStatus) == 0)
    }

    @Test func identityRegistersAndWidths() throws {
        let rig = try VirtioMmioBlockRig(activate: false)
        let t = rig.transport
        #expect(t.r(VirtioReg.magicValue) == 0x7472_6976)
        #expect(t.readBytes(0, count: 4) == Array("virt".utf8))
        #expect(t.r(VirtioReg.version) == 2)
        #expect(t.r(VirtioReg.deviceID) == 2)
        #expect(t.r(VirtioReg.vendorID) == VirtioMmioTransport.vendorID)
        #expect(t.readBytes(VirtioReg.vendorID, count: 4) == Array("GODW".utf8))
        // Registers answer 32-bit aligned accesses only.
        #expect(t.readBytes(VirtioReg.magicValue, count: 2) == [0, 0])
        #expect(t.readBytes(VirtioReg.magicValue, count: 1) == [0])
        #expect(t.r(VirtioReg.magicValue + 2) == 0)
        #expect(t.readBytes(VirtioReg.magicValue, count: 16) == [UInt8](repeating: 0, count: 16))
        #expect(t.r(VirtioReg.shmLenLow) == UInt32.max && t.r(VirtioReg.shmLenHigh) == UInt32.max)
        #expect(t.r(0x0f0) == 0)  // unassigned
        t.w(VirtioReg.queueSel, 0)
        #expect(t.r(VirtioReg.queueNumMax) == 256)
        t.w(VirtioReg.queueSel, 1)
        #expect(t.r(VirtioReg.queueNumMax) == 0)
        #expect(t.r(VirtioReg.queueReady) == 0)
        // Device features through the selector.
        t.w(VirtioReg.deviceFeaturesSel, 0)
        let low = t.r(VirtioReg.deviceFeatures)
        t.w(VirtioReg.deviceFeaturesSel, 1)
        let high = t.r(VirtioReg.deviceFeatures)
        t.w(VirtioReg.deviceFeaturesSel, 2)
        #expect(t.r(VirtioReg.deviceFeatures) == 0)
        #expect(UInt64(high) << 32 | UInt64(low) == rig.device.deviceFeatures)
        #expect(high & 1 == 1)  // VIRTIO_F_VERSION_1
        // A 2-byte write to a register is ignored.
        withUnsafeBytes(of: UInt16(5).littleEndian) { t.write(offset: VirtioReg.queueSel, from: $0) }
        #expect(t.r(VirtioReg.queueNumMax) == 0)  // still queue 1
    }

    @Test func configSpaceAnyWidth() throws {
        let rig = try VirtioMmioBlockRig(activate: false)
        let t = rig.transport
        let capacity = t.readBytes(0x100, count: 8)
        #expect(capacity == withUnsafeBytes(of: UInt64(128).littleEndian) { Array($0) })
        #expect(t.r(0x100) == 128 && t.r(0x104) == 0)
        #expect(t.readBytes(0x100 + 34, count: 2) == [1, 0])  // num_queues
        #expect(t.readBytes(0x100 + 34, count: 1) == [1])
        #expect(t.readBytes(0x100 + 20, count: 4) == [0, 2, 0, 0])  // blk_size 512
        #expect(t.readBytes(0x1F0, count: 4) == [0, 0, 0, 0])  // past the config: 0
        #expect(t.r(VirtioReg.configGeneration) == 0)
    }

    @Test func fullInitializationNotifyInterruptAck() throws {
        let rig = try VirtioMmioBlockRig()
        let t = rig.transport
        #expect(t.r(VirtioReg.status) == VirtioSt.acknowledge | VirtioSt.driver | VirtioSt.featuresOK | VirtioSt.driverOK)
        #expect(t.isActive)
        #expect(t.negotiatedFeatures == rig.features)
        t.w(VirtioReg.queueSel, 0)
        #expect(t.r(VirtioReg.queueReady) == 1)
        #expect(t.r(VirtioReg.queueNum) == 16)
        #expect(t.r(VirtioReg.interruptStatus) == 0)

        let payload = virtioRandomBytes(1024, seed: 77)
        let status = try rig.submitWrite(sector: 10, payload: payload)
        t.w(VirtioReg.queueNotify, 0)

        let used = try rig.driver.takeUsed()
        #expect(used.count == 1)
        #expect(try rig.driver.memory.load(UInt8.self, at: status) == BlockDevice.Status.ok)
        #expect(try rig.image.bytes(at: 10 * 512, count: 1024) == payload)
        #expect(t.r(VirtioReg.interruptStatus) == 1)
        #expect(rig.line.raiseCount == 1 && rig.line.asserted)

        t.w(VirtioReg.interruptACK, 1)
        #expect(t.r(VirtioReg.interruptStatus) == 0)
        #expect(!rig.line.asserted)
        #expect(rig.line.lowerCount >= 1)
    }

    @Test func featureNegotiationRefusesWhatWasNotOffered() throws {
        let rig = try VirtioMmioBlockRig(activate: false)
        let t = rig.transport
        // Bit 40 is not offered.
        #expect(!t.negotiate(VirtioFeature.version1 | (1 << 40)))
        #expect(t.r(VirtioReg.status) == VirtioSt.acknowledge | VirtioSt.driver)
        // VIRTIO_F_VERSION_1 is required (no legacy).
        #expect(!t.negotiate(BlockDevice.Feature.flush))
        // A subset of the offer is fine, and is frozen once FEATURES_OK is set.
        #expect(t.negotiate(VirtioFeature.version1 | BlockDevice.Feature.flush))
        t.w(VirtioReg.driverFeaturesSel, 0)
        t.w(VirtioReg.driverFeatures, 0xFFFF_FFFF)
        #expect(t.negotiatedFeatures == VirtioFeature.version1 | BlockDevice.Feature.flush)
        // The driver cannot clear bits except by reset; the status stays.
        t.w(VirtioReg.status, VirtioSt.acknowledge)
        #expect(t.r(VirtioReg.status) == VirtioSt.acknowledge | VirtioSt.driver | VirtioSt.featuresOK)
    }

    @Test func resetByWritingStatusZero() throws {
        let rig = try VirtioMmioBlockRig()
        let t = rig.transport
        #expect(rig.device.queueState != nil)
        _ = try rig.submitWrite(sector: 0, payload: [UInt8](repeating: 1, count: 512))
        t.w(VirtioReg.queueNotify, 0)
        #expect(t.r(VirtioReg.interruptStatus) == 1)

        t.w(VirtioReg.status, 0)
        #expect(t.r(VirtioReg.status) == 0)
        #expect(!t.isActive)
        #expect(t.r(VirtioReg.interruptStatus) == 0)
        #expect(!rig.line.asserted)
        #expect(t.negotiatedFeatures == 0)
        t.w(VirtioReg.queueSel, 0)
        #expect(t.r(VirtioReg.queueReady) == 0)
        #expect(t.r(VirtioReg.queueDescLow) == 0)
        #expect(rig.device.queueState == nil)

        // Notifications after reset do nothing.
        let before = try rig.driver.usedIdx()
        _ = try rig.submitWrite(sector: 1, payload: [UInt8](repeating: 2, count: 512))
        t.w(VirtioReg.queueNotify, 0)
        #expect(try rig.driver.usedIdx() == before)
        #expect(try rig.image.bytes(at: 512, count: 512) != [UInt8](repeating: 2, count: 512))
    }

    @Test(arguments: [UInt32(3), 512, 0, 0x1_0000])
    func badQueueSizeSetsNeedsReset(size: UInt32) throws {
        let rig = try VirtioMmioBlockRig(activate: false)
        let t = rig.transport
        #expect(t.negotiate(rig.features))
        t.setUpQueue(0, rig.driver, size: size)
        t.driverOK()
        #expect(t.r(VirtioReg.status) & VirtioSt.deviceNeedsReset != 0)
        #expect(!t.isActive)
        #expect(t.lastError is VirtioError)
        // The driver hears about it through a configuration change interrupt.
        #expect(t.r(VirtioReg.interruptStatus) & 2 != 0)
        #expect(rig.line.raiseCount == 1)
        // The device was never activated, and notifies are ignored.
        #expect(rig.device.queueState == nil)
        _ = try rig.submitWrite(sector: 0, payload: [UInt8](repeating: 3, count: 512))
        t.w(VirtioReg.queueNotify, 0)
        #expect(try rig.driver.usedIdx() == 0)
        // A reset recovers.
        #expect(t.negotiate(rig.features))
        #expect(t.r(VirtioReg.status) & VirtioSt.deviceNeedsReset == 0)
    }

    @Test func ringsOutsideRamSetNeedsReset() throws {
        let rig = try VirtioMmioBlockRig(activate: false)
        let t = rig.transport
        #expect(t.negotiate(rig.features))
        t.setUpQueue(0, rig.driver, usedRing: 1 << 36)
        t.driverOK()
        #expect(t.r(VirtioReg.status) & VirtioSt.deviceNeedsReset != 0)
        #expect(t.lastError as? VirtioError
            == .ringOutOfRange(queue: 0, ring: "device area (used ring)", address: 1 << 36, length: 6 + 8 * 16))
    }

    @Test func driverOKWithoutFeaturesOK() throws {
        let rig = try VirtioMmioBlockRig(activate: false)
        let t = rig.transport
        t.w(VirtioReg.status, VirtioSt.acknowledge)
        t.w(VirtioReg.status, VirtioSt.acknowledge | VirtioSt.driver)
        t.setUpQueue(0, rig.driver)
        t.w(VirtioReg.status, VirtioSt.acknowledge | VirtioSt.driver | VirtioSt.driverOK)
        #expect(t.r(VirtioReg.status) & VirtioSt.deviceNeedsReset != 0)
        #expect(!t.isActive)
    }

    @Test func queueLayoutFrozenWhileReady() throws {
        let rig = try VirtioMmioBlockRig()
        let t = rig.transport
        t.w(VirtioReg.queueSel, 0)
        t.w(VirtioReg.queueNum, 4)
        t.w(VirtioReg.queueDescLow, 0x9000)
        #expect(t.r(VirtioReg.queueNum) == 16)
        #expect(UInt64(t.r(VirtioReg.queueDescLow)) == rig.driver.descriptorTable)
    }

    @Test func malformedChainFromDriverSetsNeedsReset() throws {
        let rig = try VirtioMmioBlockRig()
        let t = rig.transport
        let a = try rig.driver.allocate(16)
        try rig.driver.writeDescriptor(0, address: a, length: 16, flags: VirtioTestFlag.next, next: 0)
        try rig.driver.publish(0)
        t.w(VirtioReg.queueNotify, 0)
        #expect(t.r(VirtioReg.status) & VirtioSt.deviceNeedsReset != 0)
        #expect(t.r(VirtioReg.interruptStatus) == 2)
        #expect(t.lastError as? VirtioError == .chainTooLong(head: 0, limit: 16))
        #expect(rig.line.asserted)
    }

    @Test func notifyHookAndIgnoredNotifies() throws {
        let stub = VirtioStubDevice()
        let driver = try VirtioTestDriver(size: 8)
        let line = VirtioRecordingLine()
        let t = VirtioMmioTransport(device: stub, memory: driver.memory, interruptLine: line)
        // Before DRIVER_OK: ignored.
        t.w(VirtioReg.queueNotify, 0)
        #expect(stub.notified.isEmpty)
        #expect(t.negotiate(VirtioFeature.version1 | (1 << 3)))
        t.setUpQueue(0, driver)  // queue 1 stays not ready
        t.driverOK()
        #expect(stub.activatedQueues == [0])
        #expect(stub.activatedFeatures == VirtioFeature.version1 | (1 << 3))
        t.w(VirtioReg.queueNotify, 1)
        t.w(VirtioReg.queueNotify, 2)  // no such queue: ignored
        #expect(stub.notified == [1])

        var hooked: [Int] = []
        t.onQueueNotify = { hooked.append($0) }
        t.w(VirtioReg.queueNotify, 0)
        #expect(hooked == [0])
        #expect(stub.notified == [1])

        // Device-side signals: used buffer, config change (bumps the generation).
        let interrupt = try #require(stub.interrupt)
        interrupt.signalConfigChange()
        #expect(t.r(VirtioReg.interruptStatus) == 2)
        #expect(t.r(VirtioReg.configGeneration) == 1)
        interrupt.signalUsedBuffer(queue: 0)
        #expect(t.r(VirtioReg.interruptStatus) == 3)
        t.w(VirtioReg.interruptACK, 2)
        #expect(t.r(VirtioReg.interruptStatus) == 1 && line.asserted)
        t.w(VirtioReg.interruptACK, 1)
        #expect(!line.asserted)

        // Config writes reach the device.
        withUnsafeBytes(of: UInt16(0xBBAA).littleEndian) { t.write(offset: 0x102, from: $0) }
        #expect(stub.config == [1, 2, 0xAA, 0xBB, 5, 6, 7, 8])

        // After a reset, the old activation's interrupt handle is dead.
        let resets = stub.resets
        t.w(VirtioReg.status, 0)
        #expect(stub.resets == resets + 1)
        interrupt.signalUsedBuffer(queue: 0)
        interrupt.deviceNeedsReset(because: VirtioError.queueMissing(queue: 0))
        #expect(t.r(VirtioReg.interruptStatus) == 0)
        #expect(t.r(VirtioReg.status) == 0)
    }

    @Test func activationFailureSetsNeedsReset() throws {
        let stub = VirtioStubDevice()
        stub.failActivation = true
        let driver = try VirtioTestDriver(size: 8)
        let t = VirtioMmioTransport(device: stub, memory: driver.memory, interruptLine: VirtioRecordingLine())
        #expect(t.negotiate(VirtioFeature.version1))
        t.setUpQueue(0, driver)
        t.driverOK()
        #expect(t.r(VirtioReg.status) & VirtioSt.deviceNeedsReset != 0)
        #expect(t.lastError is VirtioStubDevice.Refused)
    }

    @Test func concurrentNotifiesAndAcks() throws {
        // 48 requests of 3 descriptors each fit in a 256-entry table.
        let rig = try VirtioMmioBlockRig(queueSize: 256)
        let t = rig.transport
        var statuses: [UInt64] = []
        for i in 0..<48 {
            statuses.append(try rig.submitWrite(sector: UInt64(i), payload: virtioRandomBytes(512, seed: UInt64(i))))
        }
        DispatchQueue.concurrentPerform(iterations: 4) { worker in
            for _ in 0..<200 {
                if worker % 2 == 0 {
                    t.w(VirtioReg.queueNotify, 0)
                } else {
                    let pending = t.r(VirtioReg.interruptStatus)
                    t.w(VirtioReg.interruptACK, pending)
                    _ = t.readBytes(0x100, count: 8)
                }
            }
        }
        #expect(try rig.driver.takeUsed().count == 48)
        for (i, status) in statuses.enumerated() {
            #expect(try rig.driver.memory.load(UInt8.self, at: status) == BlockDevice.Status.ok)
            #expect(try rig.image.bytes(at: i * 512, count: 512) == virtioRandomBytes(512, seed: UInt64(i)))
        }
        #expect(rig.device.statistics.requests == 48)
    }
}

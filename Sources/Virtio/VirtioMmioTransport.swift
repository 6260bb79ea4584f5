import GodwitSystem
import GuestMemory

/// The interrupt wire from a transport to the guest's interrupt controller (a KVM GSI line or irqfd).
///
/// `raise` is called each time the transport sets an InterruptStatus bit, `lower` when the driver's
/// InterruptACK clears the last one (level-triggered lines use it; an edge-triggered irqfd ignores it).
/// Both are called with the transport's lock held, so they must not call back into the transport.
public protocol InterruptLine: AnyObject {
    func raise()
    func lower()
}

extension InterruptLine {
    /// Edge-triggered lines have nothing to do on lower.
    public func lower() {}
}

/// An `InterruptLine` made of two closures, for wiring and tests.
public final class ClosureInterruptLine: InterruptLine, @unchecked Sendable {
    private let onRaise: () -> Void
    private let onLower: () -> Void

    public init(raise: @escaping () -> Void, lower: @escaping () -> Void = {}) {
        onRaise = raise
        onLower = lower
    }

    public func raise() { onRaise() }
    public func lower() { onLower() }
}

/// The virtio-mmio version 2 register window (virtio 1.2 §4.2.2) in front of one `VirtioDevice`.
///
/// Pure register logic: the Machine routes guest MMIO accesses inside the window to `read(offset:into:)`
/// and `write(offset:from:)` (offsets relative to the window base) and gives the transport an
/// `InterruptLine`. Safe to call from several vCPU threads while the device completes requests on
/// another thread.
public final class VirtioMmioTransport: @unchecked Sendable {
    public static let magicValue: UInt32 = 0x7472_6976  // "virt"
    public static let version: UInt32 = 2
    /// "GODW" in little-endian byte order.
    public static let vendorID: UInt32 = 0x5744_4F47
    /// Offset of the device configuration space in the window.
    public static let configOffset: UInt64 = 0x100
    /// The size of the window to declare (`virtio_mmio.device=512@ADDR:IRQ`).
    public static let windowSize: UInt64 = 0x200

    /// Register offsets (virtio 1.2 §4.2.2, table "MMIO Device Register Layout").
    public enum Register {
        public static let magicValue: UInt64 = 0x000
        public static let version: UInt64 = 0x004
        public static let deviceID: UInt64 = 0x008
        public static let vendorID: UInt64 = 0x00c
        public static let deviceFeatures: UInt64 = 0x010
        public static let deviceFeaturesSel: UInt64 = 0x014
        public static let driverFeatures: UInt64 = 0x020
        public static let driverFeaturesSel: UInt64 = 0x024
        public static let queueSel: UInt64 = 0x030
        public static let queueNumMax: UInt64 = 0x034
        public static let queueNum: UInt64 = 0x038
        public static let queueReady: UInt64 = 0x044
        public static let queueNotify: UInt64 = 0x050
        public static let interruptStatus: UInt64 = 0x060
        public static let interruptACK: UInt64 = 0x064
        public static let status: UInt64 = 0x070
        public static let queueDescLow: UInt64 = 0x080
        public static let queueDescHigh: UInt64 = 0x084
        public static let queueDriverLow: UInt64 = 0x090
        public static let queueDriverHigh: UInt64 = 0x094
        public static let queueDeviceLow: UInt64 = 0x0a0
        public static let queueDeviceHigh: UInt64 = 0x0a4
        public static let shmSel: UInt64 = 0x0ac
        public static let shmLenLow: UInt64 = 0x0b0
        public static let shmLenHigh: UInt64 = 0x0b4
        public static let shmBaseLow: UInt64 = 0x0b8
        public static let shmBaseHigh: UInt64 = 0x0bc
        public static let configGeneration: UInt64 = 0x0fc
    }

    /// InterruptStatus bit 0: the device used a buffer.
    public static let interruptUsedBuffer: UInt32 = 1
    /// InterruptStatus bit 1: the configuration changed (or the device needs a reset).
    public static let interruptConfigChange: UInt32 = 2

    private struct QueueConfig {
        var size: UInt32
        var ready = false
        var descriptorTable: UInt64 = 0
        var driverArea: UInt64 = 0
        var deviceArea: UInt64 = 0
    }

    public let device: VirtioDevice
    public let memory: GuestMemory
    public let interruptLine: InterruptLine

    /// Serializes status changes (activate, reset): held while calling into the device, never taken
    /// by device callbacks.
    private let controlLock = Lock()
    /// Protects the registers below. Taken by device callbacks; never held while calling the device.
    private let stateLock = Lock()

    private var statusValue: UInt32 = 0
    private var deviceFeaturesSel: UInt32 = 0
    private var driverFeaturesSel: UInt32 = 0
    private var driverFeatures: UInt64 = 0
    private var queueSel: UInt32 = 0
    private var queues: [QueueConfig]
    private var interruptStatusValue: UInt32 = 0
    /// For out-of-process devices (vhost-user): InterruptStatus always shows the used-ring bit.
    public var reportsUsedBufferAlways: Bool {
        get { stateLock.withLock { reportsUsedBufferAlwaysValue } }
        set { stateLock.withLock { reportsUsedBufferAlwaysValue = newValue } }
    }
    private var reportsUsedBufferAlwaysValue = false
    private var configGenerationValue: UInt32 = 0
    /// Bumped on every activation and reset: callbacks from an older activation are ignored.
    private var generation: UInt64 = 0
    private var lastErrorValue: Error?
    private var notifyHook: (Int) -> Void
    /// The queues handed to the device at its activation (their positions are the device's).
    private var activeQueues: [Virtqueue] = []

    /// Creates the transport for `device` over `memory`, raising `interruptLine` when the device signals.
    public init(device: VirtioDevice, memory: GuestMemory, interruptLine: InterruptLine) {
        self.device = device
        self.memory = memory
        self.interruptLine = interruptLine
        self.queues = Array(repeating: QueueConfig(size: UInt32(device.maxQueueSize)), count: device.queueCount)
        self.notifyHook = { [weak device] index in device?.queueNotified(index) }
    }

    /// What a QueueNotify write does, with the queue index. Defaults to `device.queueNotified`; the
    /// Machine may replace it (e.g. to hand the notification to another thread or an eventfd).
    public var onQueueNotify: (Int) -> Void {
        get { stateLock.withLock { notifyHook } }
        set { stateLock.withLock { notifyHook = newValue } }
    }

    /// The device status register.
    public var status: UInt32 { stateLock.withLock { statusValue } }
    /// The InterruptStatus register.
    public var interruptStatus: UInt32 { stateLock.withLock { interruptStatusValue } }
    /// The features the driver wrote (accepted once FEATURES_OK is set).
    public var negotiatedFeatures: UInt64 { stateLock.withLock { driverFeatures } }
    /// True between a successful DRIVER_OK activation and the next reset or DEVICE_NEEDS_RESET.
    public var isActive: Bool {
        stateLock.withLock {
            statusValue & VirtioStatus.driverOK != 0 && statusValue & VirtioStatus.deviceNeedsReset == 0
        }
    }
    /// The error that last set DEVICE_NEEDS_RESET, for logs.
    public var lastError: Error? { stateLock.withLock { lastErrorValue } }

    // MARK: MMIO access

    /// Handles a guest read of `data.count` bytes at `offset` in the window. Registers answer 4-byte
    /// aligned reads only; the configuration space any width up to 8. Anything else reads as 0.
    public func read(offset: UInt64, into data: UnsafeMutableRawBufferPointer) {
        data.initializeMemory(as: UInt8.self, repeating: 0)
        guard !data.isEmpty, data.count <= 8 else { return }
        if offset >= VirtioMmioTransport.configOffset {
            let configOffset = offset - VirtioMmioTransport.configOffset
            guard configOffset < 0x1000 else { return }
            device.readConfig(offset: Int(configOffset), into: data)
            return
        }
        guard data.count == 4, offset % 4 == 0 else { return }
        let value = readRegister(offset)
        data.storeBytes(of: value.littleEndian, as: UInt32.self)
    }

    /// Handles a guest write of `data.count` bytes at `offset` in the window. Registers take 4-byte
    /// aligned writes only; the configuration space any width up to 8. Anything else is ignored.
    public func write(offset: UInt64, from data: UnsafeRawBufferPointer) {
        guard !data.isEmpty, data.count <= 8 else { return }
        if offset >= VirtioMmioTransport.configOffset {
            let configOffset = offset - VirtioMmioTransport.configOffset
            guard configOffset < 0x1000 else { return }
            controlLock.withLock { device.writeConfig(offset: Int(configOffset), from: data) }
            return
        }
        guard data.count == 4, offset % 4 == 0 else { return }
        writeRegister(offset, UInt32(littleEndian: data.loadUnaligned(as: UInt32.self)))
    }

    /// A 32-bit register read (also used by tests).
    public func readRegister(_ offset: UInt64) -> UInt32 {
        typealias R = Register
        switch offset {
        case R.magicValue: return VirtioMmioTransport.magicValue
        case R.version: return VirtioMmioTransport.version
        case R.deviceID: return device.deviceID
        case R.vendorID: return VirtioMmioTransport.vendorID
        case R.shmLenLow, R.shmLenHigh, R.shmBaseLow, R.shmBaseHigh: return UInt32.max  // no shared memory regions
        default: break
        }
        return stateLock.withLock { () -> UInt32 in
            let queue = Int(queueSel) < queues.count ? Int(queueSel) : nil
            switch offset {
            case R.deviceFeatures:
                switch deviceFeaturesSel {
                case 0: return UInt32(truncatingIfNeeded: device.deviceFeatures)
                case 1: return UInt32(truncatingIfNeeded: device.deviceFeatures >> 32)
                default: return 0
                }
            case R.queueNumMax: return queue == nil ? 0 : UInt32(device.maxQueueSize)
            case R.queueNum: return queue.map { queues[$0].size } ?? 0
            case R.queueReady: return queue.map { queues[$0].ready ? 1 : 0 } ?? 0
            case R.queueDescLow: return queue.map { UInt32(truncatingIfNeeded: queues[$0].descriptorTable) } ?? 0
            case R.queueDescHigh: return queue.map { UInt32(truncatingIfNeeded: queues[$0].descriptorTable >> 32) } ?? 0
            case R.queueDriverLow: return queue.map { UInt32(truncatingIfNeeded: queues[$0].driverArea) } ?? 0
            case R.queueDriverHigh: return queue.map { UInt32(truncatingIfNeeded: queues[$0].driverArea >> 32) } ?? 0
            case R.queueDeviceLow: return queue.map { UInt32(truncatingIfNeeded: queues[$0].deviceArea) } ?? 0
            case R.queueDeviceHigh: return queue.map { UInt32(truncatingIfNeeded: queues[$0].deviceArea >> 32) } ?? 0
            case R.interruptStatus:
                // A device whose interrupts go straight from another process to KVM (an irqfd) never
                // tells the transport; report the used-ring bit whenever the driver is running so its
                // interrupt handler looks at the rings (a spurious check is allowed by the spec).
                let running = statusValue & VirtioStatus.driverOK != 0
                return interruptStatusValue | (reportsUsedBufferAlwaysValue && running ? VirtioMmioTransport.interruptUsedBuffer : 0)
            case R.status: return statusValue
            case R.configGeneration: return configGenerationValue
            default: return 0
            }
        }
    }

    /// A 32-bit register write (also used by tests).
    public func writeRegister(_ offset: UInt64, _ value: UInt32) {
        typealias R = Register
        switch offset {
        case R.status:
            controlLock.withLock { writeStatus(value) }
        case R.queueNotify:
            let hook: ((Int) -> Void)? = stateLock.withLock {
                let running = statusValue & VirtioStatus.driverOK != 0
                    && statusValue & VirtioStatus.deviceNeedsReset == 0
                return running && Int(value) < queues.count ? notifyHook : nil
            }
            // Called without locks: the device takes its own and calls back into signal methods.
            hook?(Int(value))
        case R.interruptACK:
            stateLock.withLock {
                interruptStatusValue &= ~value
                if interruptStatusValue == 0 { interruptLine.lower() }
            }
        default:
            stateLock.withLock { writeQueueOrFeatureRegister(offset, value) }
        }
    }

    private func writeQueueOrFeatureRegister(_ offset: UInt64, _ value: UInt32) {
        typealias R = Register
        let featuresLocked = statusValue & (VirtioStatus.featuresOK | VirtioStatus.driverOK) != 0
        switch offset {
        case R.deviceFeaturesSel: deviceFeaturesSel = value
        case R.driverFeaturesSel: driverFeaturesSel = value
        case R.driverFeatures:
            guard !featuresLocked else { return }
            switch driverFeaturesSel {
            case 0: driverFeatures = (driverFeatures & 0xFFFF_FFFF_0000_0000) | UInt64(value)
            case 1: driverFeatures = (driverFeatures & 0x0000_0000_FFFF_FFFF) | (UInt64(value) << 32)
            default: break
            }
        case R.queueSel: queueSel = value
        default:
            guard Int(queueSel) < queues.count else { return }
            let index = Int(queueSel)
            if offset == R.queueReady {
                queues[index].ready = value & 1 != 0
                return
            }
            // Queue layout is frozen while the queue is ready.
            guard !queues[index].ready else { return }
            switch offset {
            case R.queueNum: queues[index].size = value
            case R.queueDescLow: queues[index].descriptorTable = low(queues[index].descriptorTable, value)
            case R.queueDescHigh: queues[index].descriptorTable = high(queues[index].descriptorTable, value)
            case R.queueDriverLow: queues[index].driverArea = low(queues[index].driverArea, value)
            case R.queueDriverHigh: queues[index].driverArea = high(queues[index].driverArea, value)
            case R.queueDeviceLow: queues[index].deviceArea = low(queues[index].deviceArea, value)
            case R.queueDeviceHigh: queues[index].deviceArea = high(queues[index].deviceArea, value)
            default: break
            }
        }
    }

    private func low(_ old: UInt64, _ value: UInt32) -> UInt64 { (old & 0xFFFF_FFFF_0000_0000) | UInt64(value) }
    private func high(_ old: UInt64, _ value: UInt32) -> UInt64 { (old & 0x0000_0000_FFFF_FFFF) | (UInt64(value) << 32) }

    // MARK: Status and lifecycle (called with controlLock held)

    private func writeStatus(_ value: UInt32) {
        if value == 0 {
            resetLocked()
            return
        }
        enum Step { case none, activate([Virtqueue], UInt64, Signal), failed(Error) }
        let step: Step = stateLock.withLock {
            let old = statusValue
            // The driver only adds bits (a reset is a write of 0); DEVICE_NEEDS_RESET is the device's.
            var new = (value & ~VirtioStatus.deviceNeedsReset) | (old & VirtioStatus.deviceNeedsReset)
            guard new & old == old else { return .none }
            if new & VirtioStatus.featuresOK != 0 && old & VirtioStatus.featuresOK == 0 {
                let offered = device.deviceFeatures
                if driverFeatures & ~offered != 0 || driverFeatures & VirtioFeature.version1 == 0 {
                    // Refused: the driver reads FEATURES_OK back as clear.
                    new &= ~VirtioStatus.featuresOK
                }
            }
            let startsDriver = new & VirtioStatus.driverOK != 0 && old & VirtioStatus.driverOK == 0
            statusValue = new
            guard startsDriver, new & VirtioStatus.deviceNeedsReset == 0 else { return .none }
            guard new & VirtioStatus.featuresOK != 0 else {
                return .failed(VirtioError.driverProtocol(status: new, reason: "DRIVER_OK set without FEATURES_OK"))
            }
            var ready: [Virtqueue] = []
            for (index, config) in queues.enumerated() where config.ready {
                do {
                    guard let size = UInt16(exactly: config.size) else {
                        throw VirtioError.badQueueSize(queue: index, size: UInt16(truncatingIfNeeded: config.size),
                                                       maximum: device.maxQueueSize)
                    }
                    ready.append(try Virtqueue(index: index, memory: memory, size: size,
                                               descriptorTable: config.descriptorTable, driverArea: config.driverArea,
                                               deviceArea: config.deviceArea, features: driverFeatures,
                                               maxSize: device.maxQueueSize))
                } catch {
                    return .failed(error)
                }
            }
            generation &+= 1
            return .activate(ready, driverFeatures, Signal(transport: self, generation: generation))
        }
        switch step {
        case .none:
            break
        case let .failed(error):
            stateLock.withLock { setNeedsResetLocked(error) }
        case let .activate(queues, features, signal):
            do {
                try device.activate(memory: memory, queues: queues, features: features, interrupt: signal)
                stateLock.withLock { activeQueues = queues }
            } catch {
                stateLock.withLock { setNeedsResetLocked(error) }
            }
        }
    }

    private func resetLocked() {
        stateLock.withLock {
            generation &+= 1
            statusValue = 0
            deviceFeaturesSel = 0
            driverFeaturesSel = 0
            driverFeatures = 0
            queueSel = 0
            queues = Array(repeating: QueueConfig(size: UInt32(device.maxQueueSize)), count: device.queueCount)
            interruptStatusValue = 0
            lastErrorValue = nil
            activeQueues = []
            interruptLine.lower()
        }
        device.reset()
    }

    /// Sets DEVICE_NEEDS_RESET and, when the driver is running, sends a configuration change interrupt.
    private func setNeedsResetLocked(_ error: Error) {
        lastErrorValue = error
        statusValue |= VirtioStatus.deviceNeedsReset
        if statusValue & VirtioStatus.driverOK != 0 {
            interruptStatusValue |= VirtioMmioTransport.interruptConfigChange
            interruptLine.raise()
        }
    }

    // MARK: Migration

    /// The register file and each queue's configuration and position. Call with the device suspended
    /// (`VirtioDevice.suspendForMigration`, whose answer is `externalBases`) so that nothing moves.
    public func captureState(externalBases: [Int: UInt16]?) -> VirtioMmioState {
        controlLock.withLock {
            stateLock.withLock {
                let running = statusValue & VirtioStatus.driverOK != 0 && statusValue & VirtioStatus.deviceNeedsReset == 0
                var saved: [VirtioMmioState.Queue] = []
                for (index, config) in queues.enumerated() {
                    var queue = VirtioMmioState.Queue(size: config.size, ready: config.ready, descriptorTable: config.descriptorTable,
                                                      driverArea: config.driverArea, deviceArea: config.deviceArea)
                    if running, config.ready {
                        if let externalBases {
                            queue.nextAvail = externalBases[index]
                            queue.nextUsed = try? memory.load(UInt16.self, at: config.deviceArea &+ 2)
                        } else if let live = activeQueues.first(where: { $0.index == index }) {
                            queue.nextAvail = live.nextAvail
                            queue.nextUsed = live.nextUsed
                        }
                    }
                    saved.append(queue)
                }
                return VirtioMmioState(deviceID: device.deviceID, status: statusValue, deviceFeaturesSel: deviceFeaturesSel,
                                       driverFeaturesSel: driverFeaturesSel, driverFeatures: driverFeatures, queueSel: queueSel,
                                       interruptStatus: interruptStatusValue, configGeneration: configGenerationValue, queues: saved)
            }
        }
    }

    /// Puts the transport (fresh, never activated) in a saved state and, when the driver was running,
    /// activates the device with the saved queue positions. Every field is checked against this device.
    public func restoreState(_ state: VirtioMmioState) throws {
        guard state.deviceID == device.deviceID else {
            throw VirtioError.backendMismatch(reason: "saved device type \(state.deviceID), this device is \(device.deviceID)")
        }
        // Fewer saved queues is a state from a device that had fewer (a virtio-net device before it had a
        // control queue): the rest stay as after a reset, and the driver never set them up.
        guard state.queues.count <= queues.count else {
            throw VirtioError.backendMismatch(reason: "saved \(state.queues.count) queues, this device has \(queues.count)")
        }
        guard state.driverFeatures & ~device.deviceFeatures == 0 else {
            throw VirtioError.backendMismatch(reason: "the driver negotiated features 0x\(String(state.driverFeatures & ~device.deviceFeatures, radix: 16)) this device lacks")
        }
        let running = state.status & VirtioStatus.driverOK != 0 && state.status & VirtioStatus.deviceNeedsReset == 0
        var ready: [Virtqueue] = []
        for (index, saved) in state.queues.enumerated() {
            guard saved.size <= UInt32(device.maxQueueSize) else {
                throw VirtioError.badQueueSize(queue: index, size: UInt16(truncatingIfNeeded: saved.size), maximum: device.maxQueueSize)
            }
            guard running, saved.ready else { continue }
            guard let nextAvail = saved.nextAvail, let nextUsed = saved.nextUsed else {
                throw VirtioError.backendMismatch(reason: "queue \(index) is running but its position was not saved")
            }
            ready.append(try Virtqueue(index: index, memory: memory, state: VirtqueueState(
                size: UInt16(saved.size), descriptorTable: saved.descriptorTable, driverArea: saved.driverArea,
                deviceArea: saved.deviceArea, nextAvail: nextAvail, nextUsed: nextUsed), features: state.driverFeatures,
                maxSize: device.maxQueueSize))
        }
        try controlLock.withLock {
            let signal: Signal = stateLock.withLock {
                statusValue = state.status
                deviceFeaturesSel = state.deviceFeaturesSel
                driverFeaturesSel = state.driverFeaturesSel
                driverFeatures = state.driverFeatures
                queueSel = state.queueSel
                queues = state.queues.map { QueueConfig(size: $0.size, ready: $0.ready, descriptorTable: $0.descriptorTable,
                                                        driverArea: $0.driverArea, deviceArea: $0.deviceArea) }
                    + queues.dropFirst(state.queues.count)
                interruptStatusValue = state.interruptStatus
                configGenerationValue = state.configGeneration
                generation &+= 1
                return Signal(transport: self, generation: generation)
            }
            guard running else { return }
            try device.activate(memory: memory, queues: ready, features: state.driverFeatures, interrupt: signal)
            stateLock.withLock { activeQueues = ready }
        }
        // Requests the driver made while the VM moved: run them now (a spurious check costs nothing).
        for queue in ready { onQueueNotify(queue.index) }
    }

    // MARK: Device callbacks

    fileprivate func signal(_ bit: UInt32, generation: UInt64, bumpConfigGeneration: Bool = false) {
        stateLock.withLock {
            guard generation == self.generation else { return }
            if bumpConfigGeneration { configGenerationValue &+= 1 }
            interruptStatusValue |= bit
            interruptLine.raise()
        }
    }

    fileprivate func needsReset(_ error: Error, generation: UInt64) {
        stateLock.withLock {
            guard generation == self.generation else { return }
            setNeedsResetLocked(error)
        }
    }

    /// The `VirtioInterrupt` handed to the device at one activation; stale after the next reset.
    private final class Signal: VirtioInterrupt, @unchecked Sendable {
        weak var transport: VirtioMmioTransport?
        let generation: UInt64

        init(transport: VirtioMmioTransport, generation: UInt64) {
            self.transport = transport
            self.generation = generation
        }

        func signalUsedBuffer(queue: Int) {
            transport?.signal(VirtioMmioTransport.interruptUsedBuffer, generation: generation)
        }

        func signalConfigChange() {
            transport?.signal(VirtioMmioTransport.interruptConfigChange, generation: generation,
                              bumpConfigGeneration: true)
        }

        func deviceNeedsReset(because error: Error) {
            transport?.needsReset(error, generation: generation)
        }
    }
}

/// A virtio-mmio transport's saved registers and queues (with their positions when the driver runs).
public struct VirtioMmioState: Codable, Equatable, Sendable {
    /// One queue's configuration, and where the device stood in it.
    public struct Queue: Codable, Equatable, Sendable {
        public var size: UInt32
        public var ready: Bool
        public var descriptorTable: UInt64
        public var driverArea: UInt64
        public var deviceArea: UInt64
        public var nextAvail: UInt16?
        public var nextUsed: UInt16?
    }

    public var deviceID: UInt32
    public var status: UInt32
    public var deviceFeaturesSel: UInt32
    public var driverFeaturesSel: UInt32
    public var driverFeatures: UInt64
    public var queueSel: UInt32
    public var interruptStatus: UInt32
    public var configGeneration: UInt32
    public var queues: [Queue]
}

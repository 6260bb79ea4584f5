import API
import Foundation
import GodwitSystem
import Machine
import Virtio

/// The VMM behind the API: collects the pre-boot configuration, builds and runs the `MicroVM` on
/// `InstanceStart`, and serves the run-time requests (pause, resume, drive updates, Ctrl-Alt-Del,
/// events, metrics). The HTTP server, the config file and the tests all drive it through the same
/// `VMMController` calls.
public final class VMMService: VMMController, @unchecked Sendable {
    public static let version = "0.1.0"

    public let id: String
    public let events = EventHub()
    /// Called once, on the VM's thread, when the guest has stopped.
    public var onGuestExit: ((GuestExit) -> Void)?
    /// Called when an incoming migration failed and its VM was discarded (the CLI's `--incoming` exits).
    public var onIncomingFailure: ((String) -> Void)?

    let lock = Lock()
    var bootSource: BootSource?
    var machine = MachineConfiguration()
    var drives: [Drive] = []
    var interfaces: [NetworkInterface] = []
    private var logger: Logger?
    private var loggerFile: FileDescriptor?
    private var metrics: Metrics?
    private var metricsFile: FileDescriptor?
    var lifecycle = Lifecycle.notStarted
    var vm: MicroVM?
    /// The current or last migration (guarded by `lock`).
    var migration = MigrationStatus(state: "none")
    /// Whether a client has read the migration's status while it ran, and whether it has read its end:
    /// a source VMM lingers briefly after a completed migration until such a client has seen the figures.
    var migrationWatched = (during: false, end: false)
    /// The key migrations use when a request names none (`--migration-key-file`).
    public var defaultMigrationKey: String?
    private var exit: GuestExit?
    private let started = ContinuousClock.now

    private let serialOutput: FileDescriptor
    private let serialInput: FileDescriptor?
    private let kvmPath: String
    private let queueNotification: MachineConfig.QueueNotification

    public init(id: String = "godwit", serialOutput: FileDescriptor, serialInput: FileDescriptor? = nil,
                kvmPath: String = "/dev/kvm", queueNotification: MachineConfig.QueueNotification = .ioeventfd) {
        self.id = id
        self.serialOutput = serialOutput
        self.serialInput = serialInput
        self.kvmPath = kvmPath
        self.queueNotification = queueNotification
    }

    /// The running VM, once started.
    public var machineInstance: MicroVM? { lock.withLock { vm } }
    public var state: Lifecycle { lock.withLock { lifecycle } }

    // MARK: Information

    public func instanceInfo() throws -> InstanceInfo {
        InstanceInfo(id: id, state: lock.withLock { lifecycle.instanceState }, vmmVersion: VMMService.version)
    }

    public func version() throws -> FirecrackerVersion { FirecrackerVersion(firecrackerVersion: VMMService.version) }

    public func vmConfig() throws -> FullVmConfiguration {
        lock.withLock {
            var config = FullVmConfiguration()
            config.bootSource = bootSource
            config.machineConfig = machine
            config.drives = drives
            config.networkInterfaces = interfaces
            config.logger = logger
            config.metrics = metrics
            return config
        }
    }

    public func machineConfig() throws -> MachineConfiguration { lock.withLock { machine } }

    // MARK: Pre-boot configuration

    func requireNotStarted(_ what: String) throws {
        guard case .notStarted = lifecycle else {
            throw APIError.badRequest("\(what) is a pre-boot setting and the VM has already started (it is \(lifecycle.instanceState))")
        }
    }

    public func putBootSource(_ bootSource: BootSource) throws {
        try bootSource.validate()
        try lock.withLock {
            try requireNotStarted("PUT /boot-source")
            guard FileManager.default.fileExists(atPath: bootSource.kernelImagePath) else {
                throw APIError.badRequest("kernel_image_path \(bootSource.kernelImagePath) does not exist")
            }
            if let initrd = bootSource.initrdPath, !FileManager.default.fileExists(atPath: initrd) {
                throw APIError.badRequest("initrd_path \(initrd) does not exist")
            }
            self.bootSource = bootSource
        }
    }

    public func putMachineConfig(_ config: MachineConfiguration) throws {
        try config.validate()
        try checkSupported(config)
        try lock.withLock {
            try requireNotStarted("PUT /machine-config")
            machine = config
        }
    }

    public func patchMachineConfig(_ update: MachineConfigurationUpdate) throws {
        try lock.withLock {
            try requireNotStarted("PATCH /machine-config")
            let next = try machine.applying(update)
            try checkSupported(next)
            machine = next
        }
    }

    private func checkSupported(_ config: MachineConfiguration) throws {
        if config.smt == true { throw APIError.unsupported("smt", "true") }
        if let t = config.cpuTemplate, t != .none { throw APIError.unsupported("cpu_template", t.rawValue) }
        guard config.vcpuCount <= MachineConfig.maxCPUs else {
            throw APIError.badRequest("vcpu_count \(config.vcpuCount) is more than Godwit's \(MachineConfig.maxCPUs)")
        }
    }

    public func putDrive(_ drive: Drive) throws {
        try drive.validate()
        if let socket = drive.socket, !FileManager.default.fileExists(atPath: socket) {
            throw APIError.badRequest("socket \(socket) of drive \(drive.driveId) does not exist (is its I/O domain running?)")
        }
        if drive.rateLimiter != nil { throw APIError.unsupported("rate_limiter", "(set)") }
        if drive.ioEngine == .async { throw APIError.unsupported("io_engine", "Async") }
        if let path = drive.pathOnHost, !FileManager.default.fileExists(atPath: path) {
            throw APIError.badRequest("path_on_host \(path) of drive \(drive.driveId) does not exist")
        }
        try lock.withLock {
            try requireNotStarted("PUT /drives")
            if drive.isRootDevice, drives.contains(where: { $0.isRootDevice && $0.driveId != drive.driveId }) {
                throw APIError.badRequest("drive \(drive.driveId): another drive is already the root device")
            }
            if let i = drives.firstIndex(where: { $0.driveId == drive.driveId }) { drives[i] = drive } else { drives.append(drive) }
        }
    }

    public func putNetworkInterface(_ iface: NetworkInterface) throws {
        try iface.validate()
        if iface.rxRateLimiter != nil { throw APIError.unsupported("rx_rate_limiter", "(set)") }
        if iface.txRateLimiter != nil { throw APIError.unsupported("tx_rate_limiter", "(set)") }
        if let mtu = iface.mtu { throw APIError.unsupported("mtu", String(mtu)) }
        if let mac = iface.guestMac, MACAddress(mac) == nil {
            throw APIError.badRequest("guest_mac \(mac) is not a unicast MAC address")
        }
        try lock.withLock {
            try requireNotStarted("PUT /network-interfaces")
            if let name = iface.hostDevName, interfaces.contains(where: { $0.hostDevName == name && $0.ifaceId != iface.ifaceId }) {
                throw APIError.badRequest("host_dev_name \(name) is already used by another interface")
            }
            if let socket = iface.socket, interfaces.contains(where: { $0.socket == socket && $0.ifaceId != iface.ifaceId }) {
                throw APIError.badRequest("socket \(socket) is already used by another interface")
            }
            if let i = interfaces.firstIndex(where: { $0.ifaceId == iface.ifaceId }) { interfaces[i] = iface } else { interfaces.append(iface) }
        }
    }

    public func putLogger(_ logger: Logger) throws {
        try logger.validate()
        var file: FileDescriptor?
        if let path = logger.logPath {
            do { file = try FileDescriptor.open(path, flags: O_WRONLY | O_CREAT | O_APPEND) } catch {
                throw APIError.badRequest("log_path \(path): \(error)")
            }
        }
        lock.withLock {
            self.logger = logger
            loggerFile = file
        }
        log("logger configured")
    }

    public func putMetrics(_ metrics: Metrics) throws {
        try metrics.validate()
        let file: FileDescriptor
        do { file = try FileDescriptor.open(metrics.metricsPath, flags: O_WRONLY | O_CREAT | O_APPEND) } catch {
            throw APIError.badRequest("metrics_path \(metrics.metricsPath): \(error)")
        }
        try lock.withLock {
            guard metricsFile == nil else { throw APIError.badRequest("metrics are already configured") }
            self.metrics = metrics
            metricsFile = file
        }
    }

    // MARK: Actions

    /// Called once the VM is built, before it runs: the CLI locks the VMM down here (`pinsThreads`: the
    /// VM's vCPU threads are pinned, so sched_setaffinity must stay allowed).
    public var lockDownAfterStart: ((_ pinsThreads: Bool) throws -> Void)?
    /// Set once `lockDownAfterStart` ran (a VMM whose incoming migration failed builds the next VM locked
    /// down), with whether that lock-down let threads be pinned.
    private var lockedDown = false
    private var lockedDownPinning = false
    /// The fence deadline (`PUT /fence`) and its watcher.
    let fence = FenceWatch()

    public func instanceStart() throws {
        let config: MachineConfig = try lock.withLock {
            try requireNotStarted("InstanceStart")
            let config = try machineConfigLocked(incoming: false)
            lifecycle = try lifecycle.applying(.start)
            return config
        }
        try startMachine(config)
    }

    /// The machine the API configured. `incoming`: no kernel (memory and state arrive by migration or
    /// from a snapshot). Called with the lock held.
    func machineConfigLocked(incoming: Bool) throws -> MachineConfig {
        var kernel = ""
        var arguments = ""
        if !incoming {
            guard let bootSource else { throw APIError.badRequest("cannot start: no boot source (PUT /boot-source first)") }
            kernel = bootSource.kernelImagePath
            arguments = bootSource.bootArgs ?? ""
            if let root = drives.first(where: { $0.isRootDevice }) {
                // As Firecracker: the root drive is the first virtio-blk device.
                let suffix = root.isReadOnly == true ? " ro" : " rw"
                arguments += root.partuuid.map { " root=PARTUUID=\($0)" } ?? " root=/dev/vda"
                arguments += suffix
            }
        }
        var config = MachineConfig(kernelPath: kernel, commandLine: arguments,
                                   cpus: self.machine.vcpuCount, memoryBytes: UInt64(self.machine.memSizeMib) << 20,
                                   disks: orderedDrives.map { DiskConfig(path: $0.pathOnHost ?? "", readOnly: $0.isReadOnly == true, socket: $0.socket) },
                                   serialOutput: serialOutput, serialInput: serialInput, kvmPath: kvmPath)
        config.initrdPath = incoming ? nil : bootSource?.initrdPath
        config.nets = interfaces.map { NetConfig(tap: $0.hostDevName, mac: $0.guestMac.flatMap(MACAddress.init), socket: $0.socket) }
        config.queueNotification = queueNotification
        config.incoming = incoming
        config.hugePages = self.machine.hugePages == .twoMiB
        config.vcpuAffinity = self.machine.vcpuAffinity ?? []
        return config
    }

    /// Builds the machine (the lifecycle is already `booting`), lets `prepare` fill it in (restore a
    /// snapshot or an incoming migration), locks the VMM down and runs the guest on a thread of its own.
    /// On failure the lifecycle goes back to not started.
    func startMachine(_ config: MachineConfig, startsPaused: Bool = false, prepare: ((MicroVM) throws -> Void)? = nil) throws {
        let instance: MicroVM
        do {
            instance = try MicroVM(config: config)
            instance.startsPaused = startsPaused
            // Locked down before `prepare` reads a snapshot or an incoming migration stream: untrusted
            // input is parsed inside the sandbox, and the lock-down is off a migration's critical path.
            let pins = !config.vcpuAffinity.isEmpty
            if lock.withLock({ lockedDown && pins && !lockedDownPinning }) {
                throw APIError.badRequest("vcpu_affinity: this VMM was locked down for an earlier VM without pinning; start a new VMM process")
            }
            if let lockDown = lock.withLock({ lockedDown ? nil : lockDownAfterStart }) {
                try lockDown(pins)
                lock.withLock {
                    lockedDown = true
                    lockedDownPinning = pins
                }
            }
            try prepare?(instance)
        } catch {
            lock.withLock { lifecycle = (try? lifecycle.applying(.startFailed)) ?? lifecycle }
            if let error = error as? APIError { throw error }
            throw APIError.badRequest("cannot start the VM: \(error)")
        }
        lock.withLock { vm = instance }
        detachThread(name: "vm") { [weak self] in self?.runGuest(instance, paused: startsPaused) }
    }

    /// The drives in device order: the root device first, as Firecracker does.
    var orderedDrives: [Drive] { drives.filter(\.isRootDevice) + drives.filter { !$0.isRootDevice } }

    private func runGuest(_ machine: MicroVM, paused: Bool) {
        lock.withLock {
            lifecycle = (try? lifecycle.applying(.booted)) ?? lifecycle
            if paused { lifecycle = (try? lifecycle.applying(.pause)) ?? lifecycle }
        }
        publish(.booted, ["vcpus": .number(Double(machine.vcpus.count))])
        let result: GuestExit
        do { result = try machine.run() } catch { result = .unhandledExit("\(error)") }
        lock.withLock {
            lifecycle = (try? lifecycle.applying(.stopped)) ?? .stopped
            exit = result
        }
        publish(.shutdown, ["reason": .string(result.description), "exit_status": .number(Double(result.processExitStatus))])
        try? flushMetrics()
        onGuestExit?(result)
    }

    public func sendSerialInput(_ input: SerialInput) throws {
        let machine = try runningMachine("PUT /serial/input")
        let bytes = Array(input.data.utf8)
        let (taken, room) = machine.serial.receiveAll(bytes)
        guard taken else {
            throw APIError.badRequest("the serial console's receive buffer has room for \(room) bytes, not \(bytes.count): retry once the guest has read it")
        }
    }

    public func sendCtrlAltDel() throws {
        let machine = try runningMachine("SendCtrlAltDel")
        try lock.withLock { lifecycle = try lifecycle.applying(.shutdown) }
        machine.keyboard.sendCtrlAltDel()
        log("sent Ctrl-Alt-Del")
    }

    public func setVMState(_ state: VM.State) throws {
        let machine = try lock.withLock { () throws -> MicroVM in
            guard let vm, lifecycle == .running || lifecycle == .paused else {
                throw APIError.badRequest("cannot set the VM \(state.rawValue): it is \(lifecycle.instanceState)")
            }
            return vm
        }
        switch state {
        case .paused:
            _ = try lock.withLock { try lifecycle.applying(.pause) }
            do { try machine.pause() } catch { throw APIError.badRequest("cannot pause: \(error)") }
            try lock.withLock { lifecycle = try lifecycle.applying(.pause) }
            publish(.paused)
        case .resumed:
            _ = try lock.withLock { try lifecycle.applying(.resume) }
            do { try machine.resume() } catch { throw APIError.badRequest("cannot resume: \(error)") }
            try lock.withLock { lifecycle = try lifecycle.applying(.resume) }
            publish(.resumed)
        }
    }

    private func runningMachine(_ what: String) throws -> MicroVM {
        try lock.withLock {
            guard let vm, lifecycle == .running || lifecycle == .paused else {
                throw APIError.badRequest("\(what) needs a running VM; it is \(lifecycle.instanceState)")
            }
            return vm
        }
    }

    public func patchDrive(_ update: PartialDrive) throws {
        try update.validate()
        let machine = try runningMachine("PATCH /drives")
        if update.rateLimiter != nil { throw APIError.unsupported("rate_limiter", "(set)") }
        let (index, drive) = try lock.withLock { () throws -> (Int, Drive) in
            guard let i = orderedDrives.firstIndex(where: { $0.driveId == update.driveId }) else {
                throw APIError.badRequest("no drive \(update.driveId)")
            }
            return (i, orderedDrives[i])
        }
        guard let path = update.pathOnHost else { return }
        guard let block = machine.virtioDevices[index].device as? BlockDevice else {
            throw APIError.badRequest("drive \(update.driveId) is served by a vhost-user backend: change its image there")
        }
        do {
            let backend = try FileBlockBackend(path: path, readOnly: drive.isReadOnly == true)
            try block.replaceBackend(backend)
        } catch {
            throw APIError.badRequest("path_on_host \(path) of drive \(update.driveId): \(error)")
        }
        lock.withLock {
            if let i = drives.firstIndex(where: { $0.driveId == update.driveId }) { drives[i].pathOnHost = path }
        }
        publish("drive_updated", ["drive_id": .string(update.driveId), "path_on_host": .string(path)])
    }

    public func patchNetworkInterface(_ update: PartialNetworkInterface) throws {
        try update.validate()
        _ = try runningMachine("PATCH /network-interfaces")
        guard lock.withLock({ interfaces.contains { $0.ifaceId == update.ifaceId } }) else {
            throw APIError.badRequest("no network interface \(update.ifaceId)")
        }
        if update.rxRateLimiter != nil { throw APIError.unsupported("rx_rate_limiter", "(set)") }
        if update.txRateLimiter != nil { throw APIError.unsupported("tx_rate_limiter", "(set)") }
    }

    // MARK: Events, logs, metrics

    public func subscribeEvents(since: UInt64?) throws -> EventSubscription { events.subscribe(since: since) }

    func publish(_ kind: GodwitEvent.Kind, _ details: [String: JSONValue] = [:]) {
        let event = events.publish(kind, details: details)
        log("event \(event.type): \(details)")
    }

    func log(_ message: String) {
        guard let file = lock.withLock({ loggerFile }) else { return }
        try? file.writeAll(Array("\(GodwitEvent.timestampNow()) [\(id)] \(message)\n".utf8))
    }

    public func flushMetrics() throws {
        guard let file = lock.withLock({ metricsFile }) else {
            throw APIError.badRequest("FlushMetrics: no metrics file (PUT /metrics first)")
        }
        let snapshot = metricsSnapshot()
        let data = try JSONSerialization.data(withJSONObject: snapshot, options: [.sortedKeys])
        try file.writeAll(Array(data) + [0x0a])
    }

    /// Counters as a JSON object, in the spirit of Firecracker's metrics file.
    func metricsSnapshot() -> [String: Any] {
        var object: [String: Any] = ["utc_timestamp_ms": Int(Date().timeIntervalSince1970 * 1000),
                                     "uptime_seconds": uptimeSeconds]
        guard let machine = machineInstance else { return object }
        object["vcpu_exits"] = Dictionary(uniqueKeysWithValues: machine.exitStatistics.byReason.map { ($0.0, $0.1) })
        var devices: [String: Any] = [:]
        for (i, wired) in machine.virtioDevices.enumerated() {
            switch wired.device {
            case let blk as BlockDevice:
                let s = blk.statistics
                devices["block\(i)"] = ["requests": s.requests, "read_bytes": s.bytesRead, "write_bytes": s.bytesWritten, "errors": s.errors]
            case let net as NetDevice:
                let s = net.statistics
                devices["net\(i)"] = ["rx_frames": s.rxFrames, "rx_bytes": s.rxBytes, "tx_frames": s.txFrames, "tx_bytes": s.txBytes,
                                      "tx_malformed": s.txMalformed, "rx_no_buffers": s.rxNoBuffers]
            default: break
            }
        }
        object["devices"] = devices
        return object
    }

    private var uptimeSeconds: Double {
        let d = ContinuousClock.now - started
        return Double(d.components.seconds) + Double(d.components.attoseconds) / 1e18
    }

    public func prometheusMetrics() throws -> String {
        var out = """
        # HELP godwit_uptime_seconds Seconds since the VMM started.
        # TYPE godwit_uptime_seconds gauge
        godwit_uptime_seconds \(uptimeSeconds)

        """
        let state = lock.withLock { lifecycle }
        out += "# HELP godwit_vm_state The VM lifecycle state (1 for the current one).\n# TYPE godwit_vm_state gauge\n"
        for s in Lifecycle.allCases { out += "godwit_vm_state{state=\"\(s.instanceState)\"} \(s == state ? 1 : 0)\n" }
        guard let machine = machineInstance else { return out }
        out += "# HELP godwit_vcpu_exits_total vCPU exits to the VMM, by reason.\n# TYPE godwit_vcpu_exits_total counter\n"
        for (reason, count) in machine.exitStatistics.byReason { out += "godwit_vcpu_exits_total{reason=\"\(reason)\"} \(count)\n" }
        out += "# HELP godwit_virtio_requests_total Requests completed by each virtio device.\n# TYPE godwit_virtio_requests_total counter\n"
        var bytes = "# HELP godwit_virtio_bytes_total Bytes moved by each virtio device.\n# TYPE godwit_virtio_bytes_total counter\n"
        var errors = "# HELP godwit_virtio_errors_total Requests or frames that failed or were dropped.\n# TYPE godwit_virtio_errors_total counter\n"
        for (i, wired) in machine.virtioDevices.enumerated() {
            switch wired.device {
            case let blk as BlockDevice:
                let s = blk.statistics
                out += "godwit_virtio_requests_total{device=\"\(i)\",type=\"block\"} \(s.requests)\n"
                bytes += "godwit_virtio_bytes_total{device=\"\(i)\",type=\"block\",direction=\"read\"} \(s.bytesRead)\n"
                bytes += "godwit_virtio_bytes_total{device=\"\(i)\",type=\"block\",direction=\"write\"} \(s.bytesWritten)\n"
                errors += "godwit_virtio_errors_total{device=\"\(i)\",type=\"block\"} \(s.errors)\n"
            case let net as NetDevice:
                let s = net.statistics
                out += "godwit_virtio_requests_total{device=\"\(i)\",type=\"net\"} \(s.rxFrames + s.txFrames)\n"
                bytes += "godwit_virtio_bytes_total{device=\"\(i)\",type=\"net\",direction=\"rx\"} \(s.rxBytes)\n"
                bytes += "godwit_virtio_bytes_total{device=\"\(i)\",type=\"net\",direction=\"tx\"} \(s.txBytes)\n"
                errors += "godwit_virtio_errors_total{device=\"\(i)\",type=\"net\"} \(s.txMalformed + s.txBackendErrors + s.rxBadFrames + s.rxTooBig)\n"
            default: break
            }
        }
        return out + bytes + errors
    }
}

/// The VMM's lifecycle as the API reports it, as an explicit state machine: `applying(_:)` lists
/// every allowed transition; anything else is refused with the state it was in.
public enum Lifecycle: CaseIterable, Equatable, Sendable {
    case notStarted, booting, running, paused, shuttingDown, stopped

    /// What moves the lifecycle.
    public enum Event: CaseIterable, Equatable, Sendable {
        /// InstanceStart accepted: the VM is being built.
        case start
        /// Building the VM failed: back to configuring.
        case startFailed
        /// The vCPUs run.
        case booted
        case pause, resume
        /// Ctrl-Alt-Del sent or a stop requested: the guest is on its way down.
        case shutdown
        /// The guest has stopped (power-off, reboot, fault, or a stop).
        case stopped
    }

    public func applying(_ event: Event) throws -> Lifecycle {
        switch (self, event) {
        case (.notStarted, .start): return .booting
        case (.booting, .startFailed): return .notStarted
        case (.booting, .booted): return .running
        case (.running, .pause): return .paused
        case (.paused, .resume): return .running
        case (.running, .shutdown), (.paused, .shutdown): return .shuttingDown
        case (.booting, .stopped), (.running, .stopped), (.paused, .stopped), (.shuttingDown, .stopped): return .stopped
        default:
            throw APIError.badRequest("cannot \(event) a VM that is \(instanceState)")
        }
    }

    public var instanceState: InstanceState {
        switch self {
        case .notStarted: return .notStarted
        case .booting: return .booting
        case .running: return .running
        case .paused: return .paused
        case .shuttingDown: return .shuttingDown
        case .stopped: return .stopped
        }
    }
}

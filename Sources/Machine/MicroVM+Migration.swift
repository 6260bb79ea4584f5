import CGodwit
import Foundation
import GodwitSystem
import GuestMemory
import KVM
import VhostUser
import Virtio
#if canImport(Glibc)
import Glibc
#endif

/// What a migration target must match before any state arrives: vCPUs, CPUID, the memory layout and
/// the devices (in order, by type and transport).
public struct MachineShape: Codable, Equatable, Sendable {
    /// One RAM region.
    public struct Region: Codable, Equatable, Sendable {
        public var base: UInt64
        public var size: UInt64
    }

    /// One virtio device, by its id in the state tree.
    public struct Device: Codable, Equatable, Sendable {
        public var id: String
        public var deviceID: UInt32
        public var queues: Int
    }

    public var cpus: Int
    public var regions: [Region]
    public var devices: [Device]
    /// Each vCPU's CPUID table.
    public var cpuid: [[CPUIDEntry]]

    /// Why `other` (a saved or incoming shape) cannot run here; nil when it can.
    public func mismatch(_ other: MachineShape) -> String? {
        if other.cpus != cpus { return "the VM has \(other.cpus) vCPUs, this one \(cpus)" }
        if other.regions != regions {
            return "memory layout differs: \(other.regions.map { "0x\(String($0.base, radix: 16))+\($0.size >> 20) MiB" }) vs \(regions.map { "0x\(String($0.base, radix: 16))+\($0.size >> 20) MiB" })"
        }
        if other.devices.count != devices.count {
            return "the VM has \(other.devices.count) devices, this one \(devices.count)"
        }
        // A device may have gained queues since (virtio-net's control queue): a state with fewer still fits.
        for (a, b) in zip(other.devices, devices) where a.id != b.id || a.deviceID != b.deviceID || a.queues > b.queues {
            return "device \(a.id) is type \(a.deviceID) with \(a.queues) queues, here \(b.id) is type \(b.deviceID) with \(b.queues) queues"
        }
        if other.cpuid != cpuid {
            return "CPUID differs (another CPU model or KVM): the guest could see its CPU change"
        }
        return nil
    }
}

/// The whole machine's saved state, a tree of plain values keyed by device id.
public struct MachineState: Codable, Equatable, Sendable {
    public static let currentVersion = 1
    public var version: Int
    public var vcpus: [VCPUState]
    public var kernel: VMKernelState
    public var serial: SerialState
    /// Each virtio-mmio transport ("virtio0", "virtio1", ...).
    public var devices: [String: VirtioMmioState]
}

/// A migration's live resources: the vhost-user dirty log and the rings stopped for the final copy.
final class MigrationRuntime: @unchecked Sendable {
    let lock = Lock()
    var logging = false
    var vhostLog: (fd: FileDescriptor, mapping: MemoryMapping, words: Int)?
    var suspended = false
    var externalBases: [Int: [Int: UInt16]?] = [:]
    /// Set by `restore`: the guest announces itself on the network once it runs again.
    var announcePending = false
}

extension MicroVM {
    /// The id of virtio device `index` in the state tree.
    static func deviceID(_ index: Int) -> String { "virtio\(index)" }

    public var shape: MachineShape {
        MachineShape(cpus: vcpus.count, regions: memory.regions.map { .init(base: $0.guestBase, size: $0.size) },
                     devices: virtioDevices.enumerated().map { .init(id: MicroVM.deviceID($0), deviceID: $1.device.deviceID, queues: $1.device.queueCount) },
                     cpuid: cpuidTables)
    }

    /// Guest pages by guest-physical page number: [0, pageCount).
    public var pageCount: Int { memory.writeTracker.pageCount }

    /// The host bytes of guest page `number`; nil when the page is not RAM.
    public func page(_ number: UInt64) -> UnsafeMutableRawBufferPointer? {
        let (address, overflow) = number.multipliedReportingOverflow(by: 4096)
        guard !overflow else { return nil }
        return try? memory.untrackedBuffer(at: address, length: 4096)
    }

    /// Starts or stops logging every guest page written: by the guest (KVM's dirty log on every RAM
    /// slot), by devices in this process (`GuestMemory.writeTracker`) and by I/O domains (a shared
    /// vhost-user log). Starting clears the logs: the first pass sends everything anyway.
    public func setDirtyLogging(_ on: Bool) throws {
        try migration.lock.withLock {
            guard migration.logging != on else { return }
            for (slot, region) in memory.regions.enumerated() {
                try vm.setUserMemoryRegion(slot: UInt32(slot), guestAddress: region.guestBase, size: region.size,
                                           hostAddress: region.hostBase, logDirtyPages: on)
            }
            memory.writeTracker.setOn(on)
            let external = virtioDevices.compactMap { $0.device as? VhostUserDevice }
            if on && !external.isEmpty {
                let words = (pageCount + 63) / 64
                let bytes = UInt64(max(words, 1) * 8)
                let fd = try MemFD.create(name: "godwit-dirty-log", size: bytes)
                let mapping = try MemoryMapping(size: Int(bytes), fd: fd)
                migration.vhostLog = (fd, mapping, words)
                for device in external { try device.setDirtyLog(fd, size: bytes) }
            } else if !on {
                for device in external { try? device.setDirtyLog(nil, size: 0) }
                migration.vhostLog = nil
            }
            migration.logging = on
        }
    }

    /// The pages written since the last call (or since logging started), merged from every log, as a
    /// bitmap by guest-physical page number; the logs are cleared.
    public func takeDirtyBitmap() throws -> [UInt64] {
        var bitmap = memory.writeTracker.take()
        for (slot, region) in memory.regions.enumerated() {
            let pages = Int(region.size / 4096)
            let log = try vm.dirtyLog(slot: UInt32(slot), pages: pages)
            let first = Int(region.guestBase / 4096)
            if first % 64 == 0 {
                for (i, word) in log.enumerated() where word != 0 && first / 64 + i < bitmap.count { bitmap[first / 64 + i] |= word }
            } else {
                for page in 0..<pages where log[page / 64] & (1 << UInt64(page % 64)) != 0 {
                    let n = first + page
                    if n / 64 < bitmap.count { bitmap[n / 64] |= 1 << UInt64(n % 64) }
                }
            }
        }
        migration.lock.withLock {
            guard let log = migration.vhostLog else { return }
            let words = log.mapping.base.assumingMemoryBound(to: UInt64.self)
            for i in 0..<min(log.words, bitmap.count) {
                // In bounds: i < words, and the mapping holds `words` 64-bit words.
                bitmap[i] |= godwit_atomic_exchange64(words + i, 0)
            }
        }
        return bitmap
    }

    /// The final phase's stop: vCPUs parked, the guest's clock frozen, then `quiesceDevices`. From here
    /// guest memory and device state stand still.
    public func suspendForMigration() throws {
        try pause()
        for vcpu in vcpus { vcpu.notifyClockPaused() }
        do { try quiesceDevices() } catch {
            try? resume()
            throw error
        }
    }

    /// Undoes `suspendForMigration` (a migration cancelled before its commit point): rings restart
    /// where they stopped, the guest runs on with its clock where it stopped.
    public func resumeAfterMigrationCancelled() throws {
        try? setDirtyLogging(false)
        var firstError: Error?
        do { try releaseDevices() } catch { firstError = error }
        try resume()
        if let firstError { throw firstError }
    }

    /// Devices stand still (the vCPUs must be paused): receive threads stopped, the device thread held
    /// between handlers, I/O domain rings stopped with their requests finished.
    public func quiesceDevices() throws {
        for receiver in receivers { receiver.stop() }
        eventLoop.suspend()
        var bases: [Int: [Int: UInt16]?] = [:]
        do {
            for (i, wired) in virtioDevices.enumerated() { bases[i] = try wired.device.suspendForMigration() }
        } catch {
            for (i, wired) in virtioDevices.enumerated() where bases[i] != nil { try? wired.device.resumeAfterSuspend() }
            restartDeviceThreads()
            throw error
        }
        migration.lock.withLock {
            migration.externalBases = bases
            migration.suspended = true
        }
    }

    /// Undoes `quiesceDevices`.
    public func releaseDevices() throws {
        let wasSuspended = migration.lock.withLock { () -> Bool in
            let was = migration.suspended
            migration.suspended = false
            migration.externalBases = [:]
            return was
        }
        guard wasSuspended else { return }
        var firstError: Error?
        for wired in virtioDevices {
            do { try wired.device.resumeAfterSuspend() } catch { if firstError == nil { firstError = error } }
        }
        restartDeviceThreads()
        if let firstError { throw firstError }
    }

    private func restartDeviceThreads() {
        eventLoop.resume()
        // A stopped receive thread does not start again: new ones for the same devices.
        receivers = receivers.compactMap { old in
            guard let fresh = try? NetRxWorker(device: old.device) else { return nil }
            try? fresh.start()
            return fresh
        }
    }

    /// The state of every vCPU, the in-kernel devices, the UART and each virtio transport. Call after
    /// `suspendForMigration` (or on a paused VM whose devices are idle, for a snapshot).
    public func captureState() throws -> MachineState {
        let indices = try kvm.msrIndexList()
        let bases = migration.lock.withLock { migration.externalBases }
        var devices: [String: VirtioMmioState] = [:]
        for (i, wired) in virtioDevices.enumerated() {
            devices[MicroVM.deviceID(i)] = wired.transport.captureState(externalBases: bases[i] ?? nil)
        }
        var kernel = try vm.captureKernelState()
        // The clock as it was when the vCPUs stopped: the guest does not see the downtime as time passing.
        if let pausedClock { kernel.clock = pausedClock }
        return MachineState(version: MachineState.currentVersion, vcpus: try vcpus.map { try $0.captureState(msrIndices: indices) },
                            kernel: kernel, serial: serial.state, devices: devices)
    }

    /// Puts an incoming VM (built with `MachineConfig.incoming`, memory already filled) in a saved state;
    /// `run()` then continues the guest where the source stopped it. Every part is checked first.
    public func restore(_ state: MachineState) throws {
        guard state.version == MachineState.currentVersion else {
            throw MachineError.setup("saved state version \(state.version) is not \(MachineState.currentVersion)")
        }
        guard state.vcpus.count == vcpus.count else {
            throw MachineError.setup("saved state has \(state.vcpus.count) vCPUs, this VM \(vcpus.count)")
        }
        let ids = Set(virtioDevices.indices.map(MicroVM.deviceID))
        guard Set(state.devices.keys) == ids else {
            throw MachineError.setup("saved devices \(state.devices.keys.sorted()) do not match this VM's \(ids.sorted())")
        }
        try vm.restoreKernelState(state.kernel)
        for (vcpu, saved) in zip(vcpus, state.vcpus) {
            guard saved.id == vcpu.id else { throw MachineError.setup("saved vCPU \(saved.id) where vCPU \(vcpu.id) was expected") }
            try vcpu.restoreState(saved)
        }
        serial.restore(state.serial)
        for (i, wired) in virtioDevices.enumerated() {
            // In bounds: the key set was checked above.
            try wired.transport.restoreState(state.devices[MicroVM.deviceID(i)]!)
        }
        migration.lock.withLock { migration.announcePending = true }
    }

    /// When the announce rounds after a restore start, after the previous one: like QEMU's defaults
    /// (`announce-initial` 50 ms, `announce-step` 100 ms, 5 rounds) but with the first round at once.
    /// Several rounds, because the first gratuitous ARP can be lost: a bridge port whose TAP just got
    /// its carrier (the target opened it when the migration arrived) forwards only once the kernel's
    /// link watch ran, up to a second later.
    public static let announceDelays: [Double] = [0, 0.15, 0.25, 0.35, 0.45]

    /// Once after `restore`, when the vCPUs run (from `run()`, or from `resume()` for a VM restored
    /// paused): every network device whose driver negotiated VIRTIO_NET_F_GUEST_ANNOUNCE is asked to
    /// announce the guest (status bit and a configuration change interrupt), so that switches learn the
    /// guest's MAC address on its new port; the first round now, the others (`announceDelays`) on a
    /// thread of their own while the VM runs. Returns how many devices were asked in the first round.
    @discardableResult
    func announceAfterRestore() -> Int {
        let pending = migration.lock.withLock { () -> Bool in
            defer { migration.announcePending = false }
            return migration.announcePending
        }
        guard pending else { return 0 }
        let devices = virtioDevices.compactMap { $0.device as? GuestAnnouncing }
        let asked = devices.filter { $0.requestAnnounce() }.count
        if ProcessInfo.processInfo.environment["GODWIT_MIGRATION_TRACE"] != nil {
            FileHandle.standardError.write(Data("godwit: migration: asked \(asked) network device(s) to announce the guest\n".utf8))
        }
        guard asked > 0 else { return 0 }
        detachThread(name: "announce") { [weak self] in
            for delay in MicroVM.announceDelays.dropFirst() {
                usleep(UInt32(delay * 1_000_000))
                guard let self, self.isRunningForAnnounce else { return }
                for device in devices { device.requestAnnounce() }
            }
        }
        return asked
    }
}

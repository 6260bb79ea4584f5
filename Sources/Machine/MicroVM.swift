import CGodwit
import GodwitSystem
import GuestMemory
import KVM
import VhostUser
import Virtio
#if canImport(Glibc)
import Glibc
#endif

/// One disk as the user gave it: a raw image file or block device, or a vhost-user socket of an
/// I/O domain (or any vhost-user-blk backend) that serves it.
public struct DiskConfig: Equatable, Sendable {
    public var path: String
    public var readOnly: Bool
    public var direct: Bool
    /// The vhost-user socket; when set, `path` is unused and the device logic runs in the backend.
    public var socket: String?
    /// Asked for an I/O domain that the VMM starts (`iodomain=`): the CLI starts it and sets `socket`.
    public var inIODomain = false

    public init(path: String, readOnly: Bool = false, direct: Bool = false, socket: String? = nil) {
        self.path = path
        self.readOnly = readOnly
        self.direct = direct
        self.socket = socket
    }
}

/// One network interface as the user gave it: a TAP device and an optional MAC, or the vhost-user
/// socket of an I/O domain that serves the NIC.
public struct NetConfig: Equatable, Sendable {
    /// The TAP to attach to; nil creates one (`tap=auto`) that is removed when the VM exits.
    public var tap: String?
    /// The guest's MAC; nil derives a stable one from the TAP's name.
    public var mac: MACAddress?
    /// The vhost-user socket; when set, `tap` and `mac` are the backend's business.
    public var socket: String?
    /// Asked for an I/O domain that the VMM starts (`iodomain`): the CLI starts it and sets `socket`.
    public var inIODomain = false

    public init(tap: String?, mac: MACAddress? = nil, socket: String? = nil) {
        self.tap = tap
        self.mac = mac
        self.socket = socket
    }
}

/// Everything needed to build a VM.
public struct MachineConfig: Sendable {
    public var kernelPath: String
    /// An initrd (initramfs) for a Linux kernel: a PVH module, or the boot protocol's ramdisk.
    public var initrdPath: String?
    public var commandLine: String
    public var cpus: Int
    public var memoryBytes: UInt64
    /// Guest RAM in 2 MiB hugetlbfs pages from the host's reserved pool (Firecracker's `huge_pages: "2M"`);
    /// otherwise a memfd of ordinary pages that asks for transparent huge pages.
    public var hugePages = false
    public var disks: [DiskConfig]
    public var nets: [NetConfig] = []
    /// Where the guest's serial output goes (stdout or a file).
    public var serialOutput: FileDescriptor
    /// Where serial input comes from, if anywhere.
    public var serialInput: FileDescriptor?
    public var kvmPath: String
    /// How the guest's queue notifications reach the devices.
    public var queueNotification: QueueNotification = .ioeventfd
    /// A VM whose memory and state will arrive by migration or from a snapshot: no kernel is loaded and
    /// no boot state set; `restore` fills it in before `run`.
    public var incoming = false
    /// Host CPUs for the vCPU threads: vCPU i runs only on `vcpuAffinity[i % count]` (libvirt's
    /// vcpupin, Cloud Hypervisor's `affinity`); empty: wherever the scheduler puts them.
    public var vcpuAffinity: [Int] = []

    /// `exit`: every QueueNotify is an MMIO exit handled on the vCPU thread (the in-process baseline).
    /// `ioeventfd`: KVM signals an eventfd without leaving the kernel and the device thread runs the queue.
    public enum QueueNotification: String, Sendable, CaseIterable {
        case exit, ioeventfd
    }

    public static let maxCPUs = 32
    public static let minMemory: UInt64 = 8 << 20

    public init(kernelPath: String, commandLine: String = "", cpus: Int = 1, memoryBytes: UInt64 = 128 << 20,
                disks: [DiskConfig] = [], serialOutput: FileDescriptor, serialInput: FileDescriptor? = nil,
                kvmPath: String = KVMSystem.defaultPath) {
        self.kernelPath = kernelPath
        self.commandLine = commandLine
        self.cpus = cpus
        self.memoryBytes = memoryBytes
        self.disks = disks
        self.serialOutput = serialOutput
        self.serialInput = serialInput
        self.kvmPath = kvmPath
    }
}

/// How often each kind of vCPU exit happened: for metrics and for checking that a fast path has no exits.
public struct ExitStatistics: Codable, Equatable, Sendable {
    public var io: UInt64 = 0
    public var mmio: UInt64 = 0
    public var halt: UInt64 = 0
    public var interrupted: UInt64 = 0
    public var shutdown: UInt64 = 0
    public var internalError: UInt64 = 0
    public var systemEvent: UInt64 = 0
    public var other: UInt64 = 0

    public init() {}

    public static func + (a: ExitStatistics, b: ExitStatistics) -> ExitStatistics {
        var r = a
        r.io += b.io; r.mmio += b.mmio; r.halt += b.halt; r.interrupted += b.interrupted
        r.shutdown += b.shutdown; r.internalError += b.internalError; r.systemEvent += b.systemEvent; r.other += b.other
        return r
    }

    /// (reason, count) pairs, for the Prometheus exposition.
    public var byReason: [(String, UInt64)] {
        [("io", io), ("mmio", mmio), ("halt", halt), ("interrupted", interrupted), ("shutdown", shutdown),
         ("internal_error", internalError), ("system_event", systemEvent), ("other", other)]
    }
}

/// A running (or runnable) microVM: KVM VM, guest RAM, devices and vCPU threads.
public final class MicroVM: @unchecked Sendable {
    public let config: MachineConfig
    public let memory: GuestMemory
    public let kvm: KVMSystem
    public let vm: VirtualMachine
    public private(set) var vcpus: [VirtualCPU] = []
    public let serial: Serial
    public private(set) var keyboard: I8042!
    public let pio = IOBus()
    public let mmio = IOBus()
    public private(set) var virtioDevices: [VirtioMMIODevice] = []
    /// The device thread: queue notifications (ioeventfds) and backend readiness (TAPs) are handled here,
    /// so a vCPU never waits for device I/O.
    public let eventLoop: EventLoop
    private var notifiers: [EventFD] = []
    /// One receive thread per NIC: it waits for TAP frames and guest buffers.
    var receivers: [NetRxWorker] = []
    /// The full guest command line, with the virtio-mmio device declarations the VMM added.
    public private(set) var guestCommandLine: String = ""

    /// Guards `state`, `threads` and `parkedVCPUs`; vCPU threads wait on it while the VM is paused.
    private let stateLock = Condition()
    private var state: VMState = .configured
    private var parkedVCPUs = 0
    /// Exit counters, one per vCPU, each written only by its vCPU thread.
    private var exitCounters: [ExitCounter] = []
    /// The kvm-clock when the VM was paused, restored on resume so the guest's time does not jump.
    var pausedClock: UInt64?
    private var threads: [pthread_t] = []
    /// The vCPU threads still inside `vcpuLoop`, by vCPU id: the only ones a kick may signal. A thread
    /// leaves this under `stateLock` before it returns, so a signal sent under the lock never reaches a
    /// thread that is gone (pthread_kill on an exited, joined thread reads freed memory: it killed a
    /// migrated VMM with SIGSEGV when a late kick raced the join).
    private var kickable: [UInt32: pthread_t] = [:]
    /// `run()` starts with the vCPUs parked (a restored snapshot loaded without `resume_vm`).
    public var startsPaused = false
    /// What a migration in progress holds (dirty logging, stopped rings).
    let migration = MigrationRuntime()
    /// The CPUID each vCPU was given (a migration target must give the same).
    public private(set) var cpuidTables: [[CPUIDEntry]] = []

    /// Refuses vCPU CPUs no thread of this process can be pinned to (outside its cpuset, offline, not
    /// a CPU of this host): caught before the guest runs, not as a pin that fails while vCPU threads start.
    static func checkAffinity(_ cpus: [Int]) throws {
        guard !cpus.isEmpty else { return }
        let refused: [Int]
        do { refused = try CPUAffinity.unavailable(cpus) } catch { throw MachineError.setup("vCPU affinity: \(error)") }
        guard refused.isEmpty else {
            throw MachineError.setup("vCPU affinity: this process's threads cannot run on CPU \(refused.map(String.init).joined(separator: ",")) "
                                     + "(not in its cpuset, offline, or not a CPU of this host)")
        }
    }

    public init(config: MachineConfig) throws {
        self.config = config
        guard (1...MachineConfig.maxCPUs).contains(config.cpus) else {
            throw MachineError.cpus(requested: config.cpus, max: MachineConfig.maxCPUs)
        }
        try MicroVM.checkMemory(config.memoryBytes)
        try MicroVM.checkAffinity(config.vcpuAffinity)
        // Read and check the kernel before touching KVM: a bad file is the commonest mistake. An ELF
        // kernel is parsed from its headers and notes; its segments and the initrd are read later straight
        // into guest RAM (a vmlinux is mostly symbols: reading it whole would double the VMM's peak memory).
        var kernel: (file: BootFile, bytes: [UInt8]?, image: KernelImage)?
        var initrdFile: BootFile?
        if !config.incoming {
            let path = config.kernelPath
            let file = try BootFile.open(path) { MachineError.kernel(path: path, reason: $0) }
            do {
                if try file.read(at: 0, count: min(file.size, 4)) == ElfImage.magic {
                    kernel = (file, nil, try KernelImage.pvh(try ElfImage.parse(size: file.size) { offset, count throws(ElfError) in
                        do { return try file.read(at: offset, count: count) } catch { throw ElfError.invalid("\(error)") }
                    }))
                } else {
                    let bytes = try file.read(at: 0, count: file.size)
                    kernel = (file, bytes, try KernelImage.parse(bytes))
                }
            } catch let error as MachineError {
                throw error
            } catch {
                throw MachineError.kernel(path: path, reason: "\(error)")
            }
            if let path = config.initrdPath {
                initrdFile = try BootFile.open(path) { MachineError.initrd(path: path, reason: $0) }
            }
        }

        eventLoop = try EventLoop()
        kvm = try KVMSystem(path: config.kvmPath)
        let kvmMax = kvm.maxVCPUs
        guard config.cpus <= kvmMax else { throw MachineError.cpus(requested: config.cpus, max: kvmMax) }
        let regions = Layout.ramRegions(size: config.memoryBytes)
        do {
            memory = try GuestMemory.create(layout: regions, hugePages: config.hugePages)
        } catch {
            throw MachineError.memory("cannot allocate \(config.memoryBytes >> 20) MiB: \(error)")
        }
        vm = try kvm.createVM()
        try? vm.setTSSAddress(Layout.tssAddress)
        try vm.createIRQChip()
        try vm.createPIT2()
        for (slot, region) in memory.regions.enumerated() {
            try vm.setUserMemoryRegion(slot: UInt32(slot), guestAddress: region.guestBase, size: region.size,
                                       hostAddress: region.hostBase)
        }

        let vmRef = vm
        let output = config.serialOutput
        serial = Serial(output: { bytes in try? output.writeAll(bytes) },
                        setInterrupt: { level in try? vmRef.setIRQLine(Serial.com1IRQ, level: level) })

        keyboard = I8042(onReset: { [weak self] in self?.requestExit(.reboot) },
                         pulseInterrupt: { try? vmRef.pulseIRQ(I8042.irq) })
        try addLegacyDevices()
        try addDisks()
        try addNets()

        // A Linux kernel on PVM (no VMX/SVM: its kernel code goes through KVM's instruction emulator)
        // is told to avoid what that emulator cannot run (DESIGN.md, "Guests, and the KVM these machines have").
        let linux = kernel?.image.isLinux == true
        var pvmOptions: [String] = []
        if linux && KVMSystem.isPVM {
            pvmOptions.append(MicroVM.pvmLinuxOptions)
            // One vCPU: keep the lock prefixes rather than patching them out at emulation speed (~2.5 s).
            if config.cpus == 1 { pvmOptions.append("noreplace-smp") }
        }
        // A Linux kernel finds the virtio-mmio devices in the DSDT; declaring them on its command line
        // too makes it probe each twice (`can't request region`). The command-line form stays for the
        // test guest and for a Linux booted with `acpi=off`.
        let acpiOff = config.commandLine.split(separator: " ").contains("acpi=off")
        let deviceEntries = linux && !acpiOff ? [] : virtioDevices.map(\.commandLineEntry)
        guestCommandLine = ([config.commandLine] + pvmOptions + deviceEntries)
            .filter { !$0.isEmpty }.joined(separator: " ")
        /// The boot vCPU's entry registers, built from the special registers KVM gives it.
        var entry: ((kvm_sregs) -> (kvm_regs, kvm_sregs))?
        if let kernel {
            let memoryMap = Layout.memoryMap(for: regions)
            let acpi = ACPITables(cpus: config.cpus, virtio: virtioDevices.map {
                ACPITables.VirtioDevice(base: $0.address, size: Layout.virtioMMIOSize, irq: $0.irq)
            })
            try memory.writeBytes(try acpi.build(at: Layout.acpiTables), at: Layout.acpiTables)
            try memory.writeBytes(try MPTable.build(cpus: config.cpus, at: Layout.ebda), at: Layout.ebda)
            try memory.store(UInt16(Layout.ebda >> 4), at: 0x40e)     // BDA: EBDA segment
            try memory.store(UInt16(Layout.ebda >> 10), at: 0x413)    // BDA: base memory in KiB
            let ramBelow4G = min(config.memoryBytes, Layout.mmioGapStart)
            do {
                switch kernel.image {
                case let .pvh(image, pvhEntry, _):
                    if let bytes = kernel.bytes {
                        try image.load(from: bytes, into: memory)
                    } else {
                        // Each segment's file bytes straight from the file into guest RAM.
                        try image.load(into: memory) { segment, destination in
                            try kernel.file.read(at: Int(segment.fileOffset), into: destination)
                        }
                    }
                    let initrd = try initrdFile.map { file in
                        (address: try MicroVM.placeInitrd(file, limit: UInt64(UInt32.max), floor: image.end, ramBelow4G: ramBelow4G, into: memory),
                         size: UInt64(file.size))
                    }
                    let startInfo = try PVHBoot.write(commandLine: guestCommandLine, memoryMap: memoryMap, initrd: initrd,
                                                      rsdp: Layout.acpiTables, into: memory)
                    entry = { CPUSetup.pvhEntryState(entry: pvhEntry, startInfo: startInfo, base: $0) }
                case let .bzImage(image):
                    // A bzImage was read whole (its payload is one compressed blob).
                    try LinuxBoot.load(image, from: kernel.bytes ?? [], into: memory)
                    let initrd = try initrdFile.map { file in
                        (address: try MicroVM.placeInitrd(file, limit: UInt64(image.initrdAddressMax), floor: image.loadAddress + image.initSize,
                                                          ramBelow4G: ramBelow4G, into: memory),
                         size: UInt64(file.size))
                    }
                    let length = try writeCommandLine(guestCommandLine, into: memory)
                    let bootParams = try LinuxBoot.writeBootParams(image, commandLineLength: length, initrd: initrd, memoryMap: memoryMap,
                                                                   rsdp: Layout.acpiTables, into: memory)
                    try LinuxBoot.writeLongModeTables(into: memory)
                    entry = { LinuxBoot.entryState(entry: image.entry64, bootParams: bootParams, base: $0) }
                }
            } catch let error as MachineError {
                throw error
            } catch {
                throw MachineError.kernel(path: config.kernelPath, reason: "\(error)")
            }
        }

        let supported = try kvm.supportedCPUID()
        for id in 0..<config.cpus {
            let vcpu = try vm.createVCPU(id: UInt32(id))
            let cpuid = CPUSetup.cpuid(from: supported, vcpu: UInt32(id), count: config.cpus)
            try vcpu.setCPUID(cpuid)
            cpuidTables.append(cpuid)
            for msr in CPUSetup.bootMSRs { _ = try? vcpu.setMSRs([msr]) }
            var fpu = kvm_fpu()
            fpu.fcw = 0x37f
            fpu.mxcsr = 0x1f80
            try vcpu.setFPU(fpu)
            if id == 0, let entry {
                let (regs, sregs) = entry(try vcpu.specialRegisters())
                try vcpu.setSpecialRegisters(sregs)
                try vcpu.setRegisters(regs)
            }
            vcpus.append(vcpu)
            exitCounters.append(ExitCounter())
        }
    }

    static func checkMemory(_ bytes: UInt64) throws {
        guard bytes >= MachineConfig.minMemory else {
            throw MachineError.memory("\(bytes >> 20) MiB is too little: at least \(MachineConfig.minMemory >> 20) MiB")
        }
        guard bytes % Layout.pageSize == 0 else { throw MachineError.memory("\(bytes) bytes is not a whole number of pages") }
        // sysconf answers -1 when it cannot tell (its sysinfo call refused by a locked-down VMM's filter,
        // for a second VM built after a failed incoming migration): then there is nothing to check.
        let pages = sysconf(Int32(_SC_PHYS_PAGES)), pageSize = sysconf(Int32(_SC_PAGESIZE))
        guard pages > 0, pageSize > 0 else { return }
        let (hostBytes, overflow) = UInt64(pages).multipliedReportingOverflow(by: UInt64(pageSize))
        guard overflow || bytes <= hostBytes else {
            throw MachineError.memory("\(bytes >> 20) MiB requested but the host has only \(hostBytes >> 20) MiB")
        }
    }

    /// Options a Linux guest needs on PVM: no XSAVE (`xrstor64`), and CPUID bits cleared for
    /// `cmpxchg16b`, SMAP (`clac`) and `popcnt`, which KVM's emulator cannot execute, and for
    /// `erms`/`fsrm`/`rep_good`, whose `rep movsb`/`stosb` it runs a byte at a time (~5 s of boot).
    /// One string: the kernel honours only the last `clearcpuid=`.
    public static let pvmLinuxOptions = "noxsave clearcpuid=cx16,smap,popcnt,erms,fsrm,rep_good"

    /// Reads the initrd straight into the top of RAM below 4 GiB (and below the kernel's `limit`), above `floor`.
    static func placeInitrd(_ file: BootFile, limit: UInt64, floor: UInt64, ramBelow4G: UInt64, into memory: GuestMemory) throws -> UInt64 {
        let address = try LinuxBoot.initrdAddress(size: UInt64(file.size), ramBelow4G: ramBelow4G, limit: limit, floor: floor)
        do {
            try file.read(at: 0, into: try memory.buffer(at: address, length: file.size))
        } catch let error as MachineError {
            throw error
        } catch {
            throw MachineError.setup("initrd of \(file.size) bytes at 0x\(String(address, radix: 16)): \(error)")
        }
        return address
    }

    private func addLegacyDevices() throws {
        let serial = self.serial
        try pio.register(start: UInt64(Serial.com1Port), size: 8, name: "serial", handler: .init(
            read: { offset, data in
                data[0] = serial.read(offset: UInt16(offset))
                if data.count > 1 { UnsafeMutableRawBufferPointer(rebasing: data[1...]).initializeMemory(as: UInt8.self, repeating: 0) }
            },
            write: { offset, data in serial.write(offset: UInt16(offset), value: data[0]) }))
        // i8042: the reset line (0xfe to 0x64) and host-sent Ctrl-Alt-Del on IRQ 1.
        let keyboard: I8042 = self.keyboard
        for port in [I8042.dataPort, I8042.commandPort] {
            try pio.register(start: UInt64(port), size: 1, name: "i8042 \(port)", handler: .init(
                read: { _, data in
                    data.initializeMemory(as: UInt8.self, repeating: 0)
                    data[0] = keyboard.read(port: port)
                },
                write: { _, data in keyboard.write(port: port, value: data[0]) }))
        }
        // isa-debug-exit at 0xf4 (iosize 4), as QEMU's `-device isa-debug-exit,iobase=0xf4,iosize=0x04`.
        try pio.register(start: 0xf4, size: 4, name: "debug exit", handler: .init(
            read: { _, data in data.initializeMemory(as: UInt8.self, repeating: 0xff) },
            write: { [weak self] _, data in self?.requestExit(.powerOff(status: data[0])) }))
        // ACPI (hardware-reduced): the sleep control register powers off on SLP_EN with \_S5_'s type, the
        // reset register reboots on RESET_VALUE; the sleep status register reads 0 and ignores writes.
        try pio.register(start: UInt64(ACPITables.sleepControlPort), size: 1, name: "acpi sleep control", handler: .init(
            read: { _, data in data.initializeMemory(as: UInt8.self, repeating: 0) },
            // A clean ACPI power-off (Linux `poweroff`) is the guest's success: exit status 0, as the test guest's pass.
            write: { [weak self] _, data in if ACPITables.isSoftOff(data[0]) { self?.requestExit(.powerOff(status: GuestExit.passStatus)) } }))
        try pio.register(start: UInt64(ACPITables.sleepStatusPort), size: 1, name: "acpi sleep status", handler: .init(
            read: { _, data in data.initializeMemory(as: UInt8.self, repeating: 0) }, write: { _, _ in }))
        try pio.register(start: UInt64(ACPITables.resetPort), size: 1, name: "acpi reset", handler: .init(
            read: { _, data in data.initializeMemory(as: UInt8.self, repeating: 0) },
            write: { [weak self] _, data in if data[0] == ACPITables.resetValue { self?.requestExit(.reboot) } }))
        // POST code port: ignored, as on PCs without a debug card.
        try pio.register(start: 0x80, size: 1, name: "post", handler: .init(
            read: { _, data in data.initializeMemory(as: UInt8.self, repeating: 0) }, write: { _, _ in }))
    }

    private func addNets() throws {
        for net in config.nets {
            if let socket = net.socket {
                try addVhostUserDevice(socket: socket, deviceID: VirtioDeviceType.network)
                continue
            }
            if let name = net.tap, access("/sys/class/net/\(name)", F_OK) != 0 {
                throw MachineError.setup("TAP \(name) does not exist (create it, or use tap=auto)")
            }
            let backend: TapBackend
            do { backend = try TapBackend(name: net.tap) } catch {
                throw MachineError.setup("TAP \(net.tap ?? "(auto)"): \(error)")
            }
            // A TAP we created starts down; an existing one is left as its owner configured it.
            if net.tap == nil {
                do { try backend.tap.setUp(true) } catch { throw MachineError.setup("TAP \(backend.tap.name): \(error)") }
            }
            let device = NetDevice(backend: backend, mac: net.mac ?? MACAddress.generated(seed: backend.tap.name))
            try addVirtioDevice(device)
            receivers.append(try NetRxWorker(device: device))
        }
    }

    private func addDisks() throws {
        guard config.disks.count <= Layout.maxVirtioDevices else {
            throw MachineError.layout("\(config.disks.count) disks, at most \(Layout.maxVirtioDevices) devices")
        }
        for disk in config.disks {
            if let socket = disk.socket {
                try addVhostUserDevice(socket: socket, deviceID: VirtioDeviceType.block)
                continue
            }
            let backend: FileBlockBackend
            do {
                backend = try FileBlockBackend(path: disk.path, readOnly: disk.readOnly, direct: disk.direct)
            } catch {
                throw MachineError.disk(path: disk.path, reason: "\(error)")
            }
            try addVirtioDevice(BlockDevice(backend: backend))
        }
    }

    /// A virtio device served by a vhost-user backend at `socket`: the guest's queue notifications go
    /// to the backend through KVM ioeventfds and its completions come back through the device's irqfd,
    /// so neither passes through the VMM.
    public func addVhostUserDevice(socket: String, deviceID: UInt32) throws {
        let index = virtioDevices.count
        let address = Layout.virtioMMIOBase + UInt64(index) * Layout.virtioMMIOSize
        let slot = ExternalSlot()
        let vmRef = vm
        let device: VhostUserDevice
        do {
            device = try VhostUserDevice(socketPath: socket, deviceID: deviceID) { queue in
                try slot.notifiers(queue: queue, vm: vmRef, notifyAddress: address + VirtioMmioTransport.Register.queueNotify)
            }
        } catch {
            throw MachineError.disk(path: socket, reason: "\(error)")  // its text names vhost-user already
        }
        // A backend that dies (an I/O domain restarted by its supervisor) is reconnected, with back-off,
        // for as long as the VM runs; the guest sees latency, not an error.
        device.reconnectAutomatically { message in
            let line = Array("godwit: \(socket): \(message)\n".utf8)
            line.withUnsafeBytes { _ = Glibc.write(2, $0.baseAddress, $0.count) }
        }
        try addVirtioDevice(device, external: true)
        slot.call = virtioDevices[index].interruptFD
    }

    /// Closes every vhost-user connection on purpose (no reconnection): before the backends go away at exit.
    public func disconnectExternalDevices() {
        for wired in virtioDevices { (wired.device as? VhostUserDevice)?.disconnect() }
    }

    /// Places a virtio device in the next virtio-mmio window with the next IRQ.
    public func addVirtioDevice(_ device: VirtioDevice) throws {
        try addVirtioDevice(device, external: false)
    }

    private func addVirtioDevice(_ device: VirtioDevice, external: Bool) throws {
        let index = virtioDevices.count
        let address = Layout.virtioMMIOBase + UInt64(index) * Layout.virtioMMIOSize
        let irq = Layout.virtioFirstIRQ + UInt32(index)
        let wired = try VirtioMMIODevice(device: device, memory: memory, vm: vm, address: address, irq: irq)
        try mmio.register(start: address, size: Layout.virtioMMIOSize, name: "virtio-mmio \(index)", handler: .init(
            read: { offset, data in wired.transport.read(offset: offset, into: data) },
            write: { offset, data in wired.transport.write(offset: offset, from: data) }))
        virtioDevices.append(wired)
        if external {
            wired.transport.reportsUsedBufferAlways = true
            return
        }
        if config.queueNotification == .ioeventfd {
            // QueueNotify writes of queue i signal an eventfd in the kernel; the device thread runs the queue.
            for queue in 0..<device.queueCount {
                let notifier = try EventFD(nonBlocking: true)
                try vm.registerIOEventFD(notifier, mmioAddress: address + VirtioMmioTransport.Register.queueNotify,
                                         length: 4, matching: UInt64(queue))
                let transport = wired.transport
                try eventLoop.add(notifier.descriptor) { _ in
                    _ = try? notifier.wait()
                    transport.writeRegister(VirtioMmioTransport.Register.queueNotify, UInt32(queue))
                }
                notifiers.append(notifier)
            }
        }
    }

    // MARK: - Running

    /// Runs the guest until it exits; returns how it ended.
    ///
    /// With `stopOnSignals`, SIGINT, SIGTERM and SIGHUP stop the guest (`GuestExit.stopped`) instead of
    /// killing the process, so the caller can restore the terminal and report.
    public func run(stopOnSignals: Bool = false) throws -> GuestExit {
        _ = godwit_install_kick_handler(godwit_kick_signal())
        try stateLock.withLock {
            state = try state.applying(.start)
            // A restored VM that should wait for a resume: its vCPUs park before their first KVM_RUN.
            if startsPaused { state = try state.applying(.pause) }
        }
        if startsPaused { pausedClock = try vm.clock() }
        if stopOnSignals { try startSignalWatcher() }
        startConsole()
        let loop = eventLoop
        let deviceThread = try startThread(name: "devices", joinable: true) { loop.run() }
        for receiver in receivers { try receiver.start() }
        defer {
            for receiver in receivers { receiver.stop() }
            loop.stop()
            pthread_join(deviceThread, nil)
        }
        for vcpu in vcpus {
            let thread = try startThread(name: "vcpu\(vcpu.id)", joinable: true) { [self] in self.vcpuLoop(vcpu) }
            stateLock.withLock { threads.append(thread) }
            if !config.vcpuAffinity.isEmpty {
                let cpu = config.vcpuAffinity[Int(vcpu.id) % config.vcpuAffinity.count]
                do { try CPUAffinity.pin(thread, to: [cpu], name: "vCPU \(vcpu.id)") } catch {
                    requestExit(.unhandledExit("cannot pin: \(error)"))
                }
            }
        }
        // A stop that came while threads were still starting may have missed a thread: kick again.
        if isStopped { kickAll() }
        // A restored guest that runs now tells the network where it is (a paused one: at resume).
        if !startsPaused { announceAfterRestore() }
        // Every vCPU thread ends once the VM is stopped (requestExit kicks them out of KVM_RUN).
        for thread in stateLock.withLock({ threads }) { pthread_join(thread, nil) }
        if getenv("GODWIT_DEVICE_STATISTICS") != nil {
            fputs("godwit: exits: \(exitStatistics)\n", stderr)
            for (i, wired) in virtioDevices.enumerated() {
                let line: String
                switch wired.device {
                case let net as NetDevice: line = "\(net.statistics)"
                case let blk as BlockDevice: line = "\(blk.statistics)"
                default: line = "vhost-user (statistics in the backend)"
                }
                fputs("godwit: device \(i): \(line)\n", stderr)
            }
        }
        if case let .stopped(exit) = stateLock.withLock({ state }) { return exit }
        return .stopped
    }

    /// Ends the run with `exit` (the first reason wins) and kicks every vCPU out of KVM_RUN.
    public func requestExit(_ exit: GuestExit) {
        let changed: Bool = stateLock.withLock {
            guard let next = try? state.applying(.exit(exit)) else { return false }
            state = next
            stateLock.broadcast()  // parked vCPUs wake up and leave
            return true
        }
        guard changed else { return }
        kickAll()
    }

    /// Makes every vCPU leave KVM_RUN: immediate_exit for the next entry, a signal for the current one.
    private func kickAll() {
        for vcpu in vcpus { vcpu.setImmediateExit(true) }
        stateLock.withLock {
            for thread in kickable.values where pthread_equal(thread, pthread_self()) == 0 {
                pthread_kill(thread, godwit_kick_signal())
            }
        }
    }

    public var currentState: VMState { stateLock.withLock { state } }

    /// How many vCPU threads a kick would signal now: none once `run` has returned.
    public var kickableThreadCount: Int { stateLock.withLock { kickable.count } }

    /// vCPU exits so far, summed over the vCPUs.
    public var exitStatistics: ExitStatistics { exitCounters.reduce(ExitStatistics()) { $0 + $1.snapshot } }

    /// Stops every vCPU (they park outside KVM_RUN) and freezes the guest's clock; returns when all are parked.
    public func pause() throws {
        try stateLock.withLock { state = try state.applying(.pause) }
        kickAll()
        stateLock.withLock {
            stateLock.wait {
                if case .stopped = state { return true }
                return parkedVCPUs == vcpus.count
            }
        }
        pausedClock = try vm.clock()
    }

    /// Restores the guest's clock to its value at pause and lets the vCPUs run again.
    public func resume() throws {
        try stateLock.withLock {
            guard case .paused = state else { _ = try state.applying(.resume); return }
            if let clock = pausedClock { try vm.setClock(clock) }
            pausedClock = nil
            state = try state.applying(.resume)
            stateLock.broadcast()
        }
        announceAfterRestore()
    }

    /// Called by a vCPU thread after a kick: parks it while the VM is paused.
    private func parkIfPaused() {
        stateLock.withLock {
            guard case .paused = state else { return }
            parkedVCPUs += 1
            stateLock.broadcast()
            stateLock.wait {
                if case .paused = state { return false }
                return true
            }
            parkedVCPUs -= 1
        }
    }

    /// True while the vCPUs run (not paused, not stopped) and no migration is under way: when a later
    /// announce round may touch the devices.
    var isRunningForAnnounce: Bool {
        guard stateLock.withLock({ state == .running }) else { return false }
        return !migration.lock.withLock { migration.logging || migration.suspended }
    }

    private var isStopped: Bool {
        if case .stopped = stateLock.withLock({ state }) { return true }
        return false
    }

    private func vcpuLoop(_ vcpu: VirtualCPU) {
        // The kick signal must be deliverable here even if our parent started us with it blocked.
        var kick = sigset_t()
        sigemptyset(&kick)
        sigaddset(&kick, godwit_kick_signal())
        pthread_sigmask(SIG_UNBLOCK, &kick, nil)
        stateLock.withLock { kickable[vcpu.id] = pthread_self() }
        defer { stateLock.withLock { kickable[vcpu.id] = nil } }
        parkIfPaused()
        while !isStopped {
            let exit: VCPUExit
            do { exit = try vcpu.run() } catch {
                requestExit(.unhandledExit("vCPU \(vcpu.id): \(error)"))
                return
            }
            let counter = exitCounters[Int(vcpu.id)]
            counter.count(exit)
            switch exit {
            case let .io(port, isWrite, size, count, data):
                for i in 0..<count {
                    let buffer = UnsafeMutableRawBufferPointer(start: data + i * size, count: size)
                    if isWrite { pio.write(UInt64(port), UnsafeRawBufferPointer(buffer)) } else { pio.read(UInt64(port), buffer) }
                }
            case let .mmio(address, length, isWrite, data):
                let buffer = UnsafeMutableRawBufferPointer(start: data, count: length)
                if isWrite { mmio.write(address, UnsafeRawBufferPointer(buffer)) } else { mmio.read(address, buffer) }
            case .interrupted:
                vcpu.setImmediateExit(false)
                parkIfPaused()
            case .halt:
                continue
            case .shutdown:
                requestExit(.tripleFault)
            case let .internalError(suberror, data):
                requestExit(.internalError(describeInternalError(vcpu, suberror: suberror, data: data)))
            case let .systemEvent(type):
                requestExit(type == UInt32(KVM_SYSTEM_EVENT_RESET) ? .reboot : .powerOff(status: 0))
            case let .failEntry(reason):
                requestExit(.unhandledExit("vCPU \(vcpu.id): entry failed, hardware reason 0x\(String(reason, radix: 16))"))
            case let .other(reason):
                requestExit(.unhandledExit("vCPU \(vcpu.id): exit reason \(reason)"))
            }
        }
    }

    /// RIP, CS and the instruction bytes of an emulation failure, so each KVM gap is found in one run.
    func describeInternalError(_ vcpu: VirtualCPU, suberror: UInt32, data: [UInt64]) -> String {
        var parts = ["vCPU \(vcpu.id) suberror \(suberror)\(suberror == 1 ? " (emulation failure)" : "")"]
        if let regs = try? vcpu.registers() {
            parts.append("rip=0x\(String(regs.rip, radix: 16))")
            if let sregs = try? vcpu.specialRegisters() {
                parts.append("cs=0x\(String(sregs.cs.selector, radix: 16)) cpl=\(sregs.cs.dpl) cr0=0x\(String(sregs.cr0, radix: 16))")
                // With paging off, or identity-mapped low memory, RIP is a physical address.
                let physical = sregs.cs.base &+ regs.rip
                if let bytes = try? memory.readBytes(at: physical, count: 16) {
                    parts.append("bytes at rip: " + bytes.map { hex2($0) }.joined(separator: " "))
                }
            }
        }
        if suberror == 1, data.count >= 3, data[0] & 1 != 0 {
            // KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES: after the flags word come
            // insn_size (one byte) and up to 15 instruction bytes.
            var bytes: [UInt8] = []
            for word in data[1...2] { for i in 0..<8 { bytes.append(UInt8((word >> (8 * UInt64(i))) & 0xff)) } }
            let length = Int(min(bytes[0], 15))
            parts.append("instruction (\(length) bytes): " + bytes[1..<(1 + length)].map { hex2($0) }.joined(separator: " "))
        }
        parts.append("data: [" + data.map { "0x" + String($0, radix: 16) }.joined(separator: ", ") + "]")
        return parts.joined(separator: "; ")
    }

    /// Blocks the stop signals in every thread and waits for them on one.
    private func startSignalWatcher() throws {
        var set = sigset_t()
        sigemptyset(&set)
        for signal in [SIGINT, SIGTERM, SIGHUP] { sigaddset(&set, signal) }
        pthread_sigmask(SIG_BLOCK, &set, nil)
        let waitSet = set
        _ = try startThread(name: "signals") { [weak self] in
            var set = waitSet
            var received: Int32 = 0
            while sigwait(&set, &received) != 0 {}
            self?.requestExit(.stopped)
        }
    }

    private func startConsole() {
        guard let input = config.serialInput else { return }
        let serial = self.serial
        _ = try? startThread(name: "console") { [weak self] in
            var buffer = [UInt8](repeating: 0, count: 256)
            while self.map({ !$0.isStopped }) ?? false {
                let n = (try? buffer.withUnsafeMutableBytes { try input.read(into: $0) }) ?? 0
                if n <= 0 { return }
                var pending = Array(buffer[0..<n])
                while !pending.isEmpty {
                    let taken = serial.receive(pending)
                    pending.removeFirst(taken)
                    if !pending.isEmpty { usleep(1000) }
                }
            }
        }
    }
}

/// The kick and call eventfds of one vhost-user device, made once per queue and registered with KVM:
/// kicks as ioeventfds on the queue-notify register (datamatch = queue), calls on the device's irqfd.
final class ExternalSlot: @unchecked Sendable {
    private let lock = Lock()
    private var kicks: [Int: EventFD] = [:]
    var call: EventFD?

    func notifiers(queue: Int, vm: VirtualMachine, notifyAddress: UInt64) throws -> (kick: EventFD, call: EventFD) {
        try lock.withLock {
            guard let call else { throw MachineError.setup("vhost-user device activated before it was placed") }
            if let kick = kicks[queue] { return (kick, call) }
            let kick = try EventFD(nonBlocking: true)
            try vm.registerIOEventFD(kick, mmioAddress: notifyAddress, length: 4, matching: UInt64(queue))
            kicks[queue] = kick
            return (kick, call)
        }
    }
}

/// One vCPU's exit counts behind a lock (taken once per exit, uncontended but for metrics readers).
final class ExitCounter: @unchecked Sendable {
    private let lock = Lock()
    private var stats = ExitStatistics()

    var snapshot: ExitStatistics { lock.withLock { stats } }

    func count(_ exit: VCPUExit) {
        lock.withLock {
            switch exit {
            case .io: stats.io += 1
            case .mmio: stats.mmio += 1
            case .halt: stats.halt += 1
            case .interrupted: stats.interrupted += 1
            case .shutdown: stats.shutdown += 1
            case .internalError: stats.internalError += 1
            case .systemEvent: stats.systemEvent += 1
            case .failEntry, .other: stats.other += 1
            }
        }
    }
}

func hex2(_ b: UInt8) -> String { b < 16 ? "0" + String(b, radix: 16) : String(b, radix: 16) }

/// A kernel or initrd file, open and read in pieces (1 byte to 1 GiB): a read that comes back short
/// (the file shrank meanwhile) is an error, never a crash.
struct BootFile {
    let file: FileDescriptor
    let size: Int
    /// Makes the error for a refused file (names the path and whether it is the kernel or the initrd).
    let refused: (String) -> MachineError

    static func open(_ path: String, refused: @escaping (String) -> MachineError) throws -> BootFile {
        let fd: FileDescriptor
        do { fd = try FileDescriptor.open(path, flags: O_RDONLY) } catch { throw refused("\(error)") }
        let size = try fd.size()
        guard size > 0 else { throw refused("the file is empty") }
        guard size <= 1 << 30 else { throw refused("\(size) bytes is larger than 1 GiB") }
        return BootFile(file: fd, size: Int(size), refused: refused)
    }

    /// Bytes `offset..<offset + count`, which the caller keeps inside `size`.
    func read(at offset: Int, count: Int) throws -> [UInt8] {
        var bytes = [UInt8](repeating: 0, count: count)
        try bytes.withUnsafeMutableBytes { try read(at: offset, into: $0) }
        return bytes
    }

    /// Fills `buffer` from `offset`.
    func read(at offset: Int, into buffer: UnsafeMutableRawBufferPointer) throws {
        guard !buffer.isEmpty else { return }
        let n = try file.preadFully(into: buffer, offset: UInt64(offset))
        guard n == buffer.count else { throw refused("short read (\(n) of \(buffer.count) bytes at \(offset); did the file change?)") }
    }
}

import API
import CGodwit
import ArgumentParser
import Dispatch
import Foundation
import GodwitSystem
import Machine
import Virtio
import VMM
#if canImport(Glibc)
import Glibc
#endif

@main
struct Godwit: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "godwit",
        abstract: "A KVM virtual machine monitor whose device I/O runs in separate I/O domains.",
        subcommands: [VMCommand.self, IODomainCommand.self, NBDServerCommand.self, AgentCommand.self, CtlCommand.self, SandboxProbeCommand.self, SuperviseCommand.self])
}

/// Exit statuses of `godwit vm`, documented in the README.
enum ExitStatus {
    static let setupError: Int32 = 2
}

/// Ends the process with `status` without running atexit handlers and library destructors: other
/// threads (a migration thread finishing, a device thread) may still be running, and `exit` would tear
/// the runtime and global objects down under them. Output is flushed first.
func exitNow(_ status: Int32) -> Never {
    fflush(nil)
    _exit(status)
}

struct VMCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "vm",
        abstract: "Boot a guest on /dev/kvm and run it until it powers off.",
        discussion: """
        Exit status: 0 the guest reported pass (wrote 0x10 to port 0xf4); 1 the guest powered off with \
        another status; 2 bad arguments or set-up failure (missing file, not a PVH kernel, too little \
        memory, no /dev/kvm); 3 the guest rebooted; 4 triple fault; 5 KVM internal error (emulation \
        failure: RIP and instruction bytes are printed); 6 an exit the VMM does not handle; 7 stopped by a signal.
        """)

    @Option(help: "Guest kernel: an ELF with the Xen PVH entry note (the test guest, or a Linux vmlinux) or a Linux bzImage. Not with --api-sock or --config-file.")
    var kernel: String?

    @Option(help: "Serve the Firecracker-compatible HTTP API on this Unix socket; the VM is configured and started through it.")
    var apiSock: String?

    @Option(help: "Build and start the VM from a Firecracker-format JSON configuration file.")
    var configFile: String?

    @Option(help: "An initrd (initramfs) for a Linux kernel. Not with --api-sock or --config-file.")
    var initrd: String?

    @Option(help: "Guest kernel command line.")
    var cmdline: String = ""

    @Option(help: "Number of vCPUs (1 to \(MachineConfig.maxCPUs)).")
    var cpus: Int = 1

    @Option(help: "Guest RAM, in MiB or with a K/M/G suffix (e.g. 256M, 1G).")
    var memory: String = "128M"

    @Option(help: ArgumentHelp("Pin vCPU threads to host CPUs: vCPU i runs only on the i-th CPU of the list (round robin when the list is shorter), e.g. 2 or 2,3 or 2-3. Keeps polling vCPUs and I/O domain threads (godwit iodomain --cpu-affinity) off each other's CPUs.", valueName: "cpu-list"))
    var vcpuAffinity: String?

    @Flag(help: "Back guest RAM with 2 MiB huge pages (hugetlbfs) from the host's reserved pool (/proc/sys/vm/nr_hugepages); the memory size must be a multiple of 2 MiB.")
    var hugePages = false

    @Option(help: ArgumentHelp("A virtio-blk disk: PATH[,readonly][,direct] (in the VMM); iodomain=PATH[,readonly][,direct] (in an I/O domain the VMM starts, sandboxes and restarts); or socket=PATH (a disk an I/O domain or any vhost-user-blk backend serves). Repeat for more disks.",
                               valueName: "path|iodomain=path[,readonly][,direct]|socket=path"))
    var disk: [String] = []

    @Option(help: ArgumentHelp("A virtio-net NIC on a TAP: tap=NAME (an existing TAP) or tap=auto (a new TAP, removed at exit), with an optional mac=aa:bb:cc:dd:ee:ff; add iodomain to serve it from an I/O domain the VMM starts (the TAP is passed to it); or socket=PATH (a NIC an I/O domain serves). Repeat for more NICs.",
                               valueName: "tap=NAME|auto[,mac=MAC][,iodomain]|socket=path"))
    var net: [String] = []

    @Flag(help: "Start the I/O domains of iodomain= devices without their namespaces (they still lock down with seccomp).")
    var iodomainNoNamespaces = false

    @Flag(help: "Do not lock the VMM down after set-up (debugging only: it then keeps every privilege it started with).")
    var noSandbox = false

    @Flag(help: "Keep the VMM in the caller's namespaces (it still locks down with seccomp). Without it the VMM runs in new user, mount, IPC, network and PID namespaces, and a broker left outside hands it its TAPs and migration sockets.")
    var noNamespaces = false

    @Option(help: "Where guest serial output goes: stdio (and input from stdin), or a file path.")
    var serial: String = "stdio"

    @Option(help: "How virtio queue notifications reach the devices: ioeventfd (a device thread, no VMM exit) or exit (handled on the vCPU thread).")
    var notify: String = "ioeventfd"

    @Option(help: "The KVM device.")
    var kvmDevice: String = "/dev/kvm"

    @Option(help: "Wait for a live migration on tcp:ADDRESS:PORT instead of booting a kernel; the VM is built from --cpus, --memory, --disk and --net (which must match the source's).")
    var incoming: String?

    @Option(help: "A file holding the migration key (hex, 16 to 64 bytes) that senders and receivers must share.")
    var migrationKeyFile: String?

    func validate() throws {
        if kernel == nil && apiSock == nil && configFile == nil && incoming == nil {
            throw ValidationError("give --kernel, --config-file, --api-sock or --incoming")
        }
        if incoming != nil && (kernel != nil || configFile != nil) { throw ValidationError("--incoming takes no --kernel or --config-file") }
        if kernel != nil && configFile != nil { throw ValidationError("--kernel and --config-file exclude each other") }
        if vcpuAffinity != nil && incoming == nil && (apiSock != nil || configFile != nil) {
            throw ValidationError("--vcpu-affinity goes with --kernel or --incoming; through the API or a config file, give machine-config's vcpu_affinity")
        }
    }

    func run() throws {
        if apiSock != nil || configFile != nil || incoming != nil {
            try runService()
            return
        }
        var supervisor: SupervisorProcess?
        do {
            var config = try makeConfig()
            supervisor = try startIODomains(&config)
            let vm = try MicroVM(config: config)
            try VMCommand.lockDown(noSandbox: noSandbox, supervisor: supervisor?.pid, allowingOpen: false,
                                   pinsThreads: !config.vcpuAffinity.isEmpty)
            let terminal = RawTerminal(enabled: serial == "stdio")
            let exit = try vm.run(stopOnSignals: true)
            terminal.restore()
            vm.disconnectExternalDevices()
            supervisor?.stop()
            if exit.processExitStatus != 0 {
                fputs("godwit: \(exit)\n", stderr)
            }
            exitNow(exit.processExitStatus)
        } catch let error as ValidationError {
            throw error
        } catch {
            fputs("godwit: error: \(error)\n", stderr)
            supervisor?.stop()
            exitNow(ExitStatus.setupError)
        }
    }

    /// Locks the VMM down once it holds everything it needs (/dev/kvm and the VM's descriptors, guest
    /// memory, disks, TAPs, sockets): no_new_privs, no capabilities, and a seccomp allow-list (any
    /// ioctl, for KVM; AF_UNIX sockets and connect, for vhost-user reconnects; kill and wait4 only for
    /// the I/O domain supervisor; sched_setaffinity when vCPUs are pinned). No exec from here on, and no
    /// open unless `allowingOpen` (API mode).
    static func lockDown(noSandbox: Bool, supervisor: Int32?, allowingOpen: Bool, pinsThreads: Bool = false) throws {
        if noSandbox {
            fputs("godwit: WARNING: --no-sandbox: this VMM runs with every privilege it was started with\n", stderr)
            return
        }
        let open = allowingOpen ? ["openat", "open"] : []
        let pin = pinsThreads ? ["sched_setaffinity"] : []
        // memfd_create and ftruncate: the dirty log shared with I/O domains during a migration.
        var rules = Sandbox.rules(allowing: ["connect", "getsockname", "getpeername", "setsockopt", "memfd_create", "ftruncate"] + open,
                                  ioctls: .any)
        rules += pin.map { .allow($0) }
        rules.append(.allow("socket", when: [.argument(0, equals: UInt64(AF_UNIX))]))
        if allowingOpen && !Sandbox.hasNetworkBroker {
            // API mode without namespaces: PUT /migration/send connects to the target over TCP. (In its
            // namespaces the VMM gets TCP sockets from its broker, created in the caller's network.)
            rules.append(.allow("socket", when: [.argument(0, equals: UInt64(AF_INET))]))
            rules.append(.allow("socket", when: [.argument(0, equals: UInt64(AF_INET6))]))
        }
        if let supervisor {
            rules.append(.allow("kill", when: [.argument(0, equals: UInt64(supervisor))]))
            rules.append(.allow("wait4", when: [.argument(0, equals: UInt64(supervisor))]))
        }
        // Set-up is over: the broker hands out no more TAPs, only migration sockets.
        if Sandbox.hasNetworkBroker {
            do { try Sandbox.sealNetworkBroker() } catch { throw MachineError.setup("cannot seal the network broker: \(error)") }
        }
        do { try Sandbox.lockDown(rules: rules) } catch {
            throw MachineError.setup("cannot lock the VMM down: \(error)")
        }
    }

    /// Starts the supervisor of an I/O domain for each `iodomain=` disk and `iodomain` NIC and points
    /// the devices at their sockets (in a directory of this VMM's, removed when the supervisor ends).
    func startIODomains(_ config: inout MachineConfig) throws -> SupervisorProcess? {
        let disks = config.disks.indices.filter { config.disks[$0].inIODomain }
        let nets = config.nets.indices.filter { config.nets[$0].inIODomain }
        guard !disks.isEmpty || !nets.isEmpty else { return nil }
        // A fresh directory (mkdtemp): in its PID namespace every VMM is PID 1, so the pid names nothing.
        var template = Array(FileManager.default.temporaryDirectory.appendingPathComponent("godwit-vm-XXXXXX").path.utf8CString)
        guard let created = template.withUnsafeMutableBufferPointer({ mkdtemp($0.baseAddress!) }) else {
            throw MachineError.setup("cannot create a directory for the I/O domain sockets: \(String(cString: strerror(errno)))")
        }
        let directory = URL(fileURLWithPath: String(cString: created))
        var specs: [SuperviseCommand.DomainSpec] = []
        var descriptors: [FileDescriptor] = []
        for (n, i) in disks.enumerated() {
            let disk = config.disks[i]
            let socket = directory.appendingPathComponent("disk\(n).sock").path
            var arguments = ["iodomain", "--blk", disk.path, "--device", "socket=\(socket)" + (disk.readOnly ? ",readonly" : "")]
            if disk.direct { arguments.append("--direct") }
            specs.append(.init(name: "disk\(n)", arguments: arguments, descriptors: [], sockets: [socket], namespaces: !iodomainNoNamespaces))
            config.disks[i] = DiskConfig(path: disk.path, readOnly: disk.readOnly, socket: socket)
        }
        for (n, i) in nets.enumerated() {
            let net = config.nets[i]
            let socket = directory.appendingPathComponent("net\(n).sock").path
            // The VMM opens the TAP where it runs (its network namespace) and hands the descriptor over.
            let tap: Tap
            do {
                tap = try Tap(name: net.tap)
                if net.tap == nil { try tap.setUp(true) }
            } catch {
                throw MachineError.setup("TAP \(net.tap ?? "(auto)"): \(error)")
            }
            let mac = net.mac ?? MACAddress.generated(seed: tap.name)
            // The TAP is the supervisor's descriptor 3 + k; it hands it to the domain as its 3.
            let inherited = Int32(3 + descriptors.count)
            descriptors.append(tap.descriptor)
            specs.append(.init(name: "net\(n)", arguments: ["iodomain", "--net", "tap-fd=3,socket=\(socket),mac=\(mac)"],
                               descriptors: [inherited], sockets: [socket], namespaces: !iodomainNoNamespaces))
            config.nets[i] = NetConfig(tap: tap.name, mac: mac, socket: socket)
            openTaps.append(tap)
        }
        let encoder = JSONEncoder()
        var arguments = ["supervise", "--directory", directory.path]
        for spec in specs { arguments += ["--domain", String(decoding: try encoder.encode(spec), as: UTF8.self)] }
        let supervisor = try SupervisorProcess(arguments: arguments, descriptors: descriptors)
        try supervisor.waitForSockets(specs.flatMap(\.sockets))
        return supervisor
    }

    /// API and config-file mode: one `VMMService` that both drive.
    func runService() throws {
        guard let mode = MachineConfig.QueueNotification(rawValue: notify) else {
            throw ValidationError("--notify must be ioeventfd or exit, not '\(notify)'")
        }
        let (output, input) = try serialDescriptors()
        let service = VMMService(serialOutput: output, serialInput: input, kvmPath: kvmDevice, queueNotification: mode)
        // The API may still swap drive files after boot (PATCH /drives), so this lock-down keeps open.
        let noSandbox = self.noSandbox
        service.lockDownAfterStart = { pins in
            try VMCommand.lockDown(noSandbox: noSandbox, supervisor: nil, allowingOpen: true, pinsThreads: pins)
        }
        service.defaultMigrationKey = migrationKeyFile
        let done = DispatchSemaphore(value: 0)
        let exitBox = ExitBox()
        service.onGuestExit = { exit in
            exitBox.exit = exit
            done.signal()
        }
        // Before any other thread starts, so that every thread inherits the blocked stop signals.
        StopSignals.install {
            if let machine = service.machineInstance { machine.requestExit(.stopped) } else { exitNow(GuestExit.stopped.processExitStatus) }
        }
        var server: APIServer?
        if let apiSock {
            server = APIServer(socketPath: apiSock, controller: service)
            do { try server?.start() } catch {
                fputs("godwit: error: API socket \(apiSock): \(error)\n", stderr)
                exitNow(ExitStatus.setupError)
            }
        }
        if let configFile {
            do {
                try VMConfigFile.apply(try VMConfigFile.load(path: configFile), to: service)
            } catch {
                fputs("godwit: error: config file \(configFile): \(error)\n", stderr)
                server?.stop()
                exitNow(ExitStatus.setupError)
            }
        }
        if let incoming {
            do {
                try configureIncoming(service)
                try service.receiveMigration(MigrationReceiveParams(receiverUrl: incoming))
            } catch {
                fputs("godwit: error: --incoming \(incoming): \(error)\n", stderr)
                server?.stop()
                exitNow(ExitStatus.setupError)
            }
            fputs("godwit: waiting for a migration on \(incoming)\n", stderr)
        }
        let terminal = RawTerminal(enabled: serial == "stdio" && apiSock == nil)
        done.wait()
        terminal.restore()
        server?.stop(timeout: 1)
        let exit = exitBox.exit ?? .stopped
        if exit.processExitStatus != 0 { fputs("godwit: \(exit)\n", stderr) }
        exitNow(exit.processExitStatus)
    }

    /// `--vcpu-affinity` as CPU numbers (nil when not given).
    func parsedVCPUAffinity() throws -> [Int]? {
        guard let vcpuAffinity else { return nil }
        guard let cpus = CPUAffinity.parse(vcpuAffinity) else {
            throw ValidationError("--vcpu-affinity '\(vcpuAffinity)' is not a list of this host's CPUs (0-\(godwit_cpu_count() - 1)), e.g. 1 or 0,2-3")
        }
        return cpus
    }

    /// `--incoming`: the VM the migration fills in, from the command line, through the API's calls.
    func configureIncoming(_ service: VMMService) throws {
        let bytes = try parseSize(memory)
        try service.putMachineConfig(MachineConfiguration(vcpuCount: cpus, memSizeMib: Int(bytes >> 20),
                                                          hugePages: hugePages ? .twoMiB : nil, vcpuAffinity: try parsedVCPUAffinity()))
        for (i, text) in disk.enumerated() {
            let d = try parseDisk(text)
            guard !d.inIODomain else { throw ValidationError("--incoming takes --disk PATH or socket=PATH (start the I/O domain yourself)") }
            try service.putDrive(Drive(driveId: "disk\(i)", pathOnHost: d.socket == nil ? d.path : nil, isRootDevice: false,
                                       isReadOnly: d.socket == nil ? d.readOnly : nil, socket: d.socket))
        }
        for (i, text) in net.enumerated() {
            let n = try parseNet(text)
            guard !n.inIODomain, let name = n.socket == nil ? n.tap : "" else {
                throw ValidationError("--incoming takes --net tap=NAME or socket=PATH")
            }
            try service.putNetworkInterface(NetworkInterface(ifaceId: "net\(i)", hostDevName: n.socket == nil ? name : nil,
                                                             guestMac: n.mac?.description, socket: n.socket))
        }
    }

    func serialDescriptors() throws -> (FileDescriptor, FileDescriptor?) {
        if serial == "stdio" { return (FileDescriptor(owning: dup(1)), FileDescriptor(owning: dup(0))) }
        do {
            return (try FileDescriptor.open(serial, flags: O_WRONLY | O_CREAT | O_TRUNC), nil)
        } catch {
            throw MachineError.setup("serial output \(serial): \(error)")
        }
    }

    func makeConfig() throws -> MachineConfig {
        guard let kernel else { throw ValidationError("--kernel is required") }
        let bytes = try parseSize(memory)
        let disks = try disk.map(parseDisk)
        let nets = try net.map(parseNet)
        let (output, input) = try serialDescriptors()
        var config = MachineConfig(kernelPath: kernel, commandLine: cmdline, cpus: cpus, memoryBytes: bytes, disks: disks,
                                   serialOutput: output, serialInput: input, kvmPath: kvmDevice)
        config.nets = nets
        config.initrdPath = initrd
        if hugePages && bytes % MemFD.hugePageSize != 0 {
            throw ValidationError("--huge-pages: --memory \(memory) is not a multiple of 2 MiB")
        }
        config.hugePages = hugePages
        config.vcpuAffinity = try parsedVCPUAffinity() ?? []
        guard let mode = MachineConfig.QueueNotification(rawValue: notify) else {
            throw ValidationError("--notify must be ioeventfd or exit, not '\(notify)'")
        }
        config.queueNotification = mode
        return config
    }
}

/// Parses "256", "256M", "1G", "65536K" into bytes; a bare number is MiB.
func parseSize(_ text: String) throws -> UInt64 {
    let units: [Character: UInt64] = ["K": 1 << 10, "M": 1 << 20, "G": 1 << 30]
    var digits = Substring(text.uppercased())
    var multiplier: UInt64 = 1 << 20
    if let last = digits.last, let unit = units[last] {
        multiplier = unit
        digits = digits.dropLast()
    }
    if digits.hasSuffix("I") || digits.hasSuffix("B") { throw ValidationError("memory size '\(text)': use a number with K, M or G") }
    guard let value = UInt64(digits), value > 0 else {
        throw ValidationError("memory size '\(text)' is not a number of MiB or a size like 256M or 1G")
    }
    let (bytes, overflow) = value.multipliedReportingOverflow(by: multiplier)
    guard !overflow else { throw ValidationError("memory size '\(text)' is too large") }
    return bytes
}

/// The `godwit supervise` process that runs a VMM's I/O domains.
final class SupervisorProcess {
    let pid: Int32
    private var reaped = false

    init(arguments: [String], descriptors: [FileDescriptor]) throws {
        let pid: Int32
        do {
            pid = try IODomainSupervisor.spawn(executable: IODomainSupervisor.ownExecutable(), arguments: arguments,
                                               descriptors: descriptors, namespaces: false)
        } catch {
            throw MachineError.setup("cannot start the I/O domain supervisor: \(error)")
        }
        self.pid = pid
    }

    /// Waits until every socket exists; throws when the supervisor gave up (it printed why).
    func waitForSockets(_ sockets: [String], timeout: Double = 20) throws {
        switch IODomainSupervisor.waitForSockets(sockets, of: pid, timeout: timeout) {
        case .ready: return
        case .exited:
            reaped = true
            throw MachineError.setup("the I/O domains did not start")
        case .timedOut: throw MachineError.setup("the I/O domains did not start within \(Int(timeout)) s")
        }
    }

    /// Ends the supervisor and its domains, and waits for it.
    func stop() {
        guard !reaped else { return }
        kill(pid, SIGTERM)
        var status: Int32 = 0
        while waitpid(pid, &status, 0) < 0 && errno == EINTR {}
        reaped = true
    }
}

/// TAPs the VMM opened for I/O domains: kept open (a `tap=auto` TAP lives as long as a descriptor does).
nonisolated(unsafe) var openTaps: [Tap] = []

/// Parses "PATH[,readonly][,direct]", "iodomain=PATH[,readonly][,direct]" or "socket=PATH" (a
/// vhost-user backend such as an I/O domain).
func parseDisk(_ text: String) throws -> DiskConfig {
    if text.hasPrefix("iodomain=") {
        var disk = try parseDisk(String(text.dropFirst("iodomain=".count)))
        guard disk.socket == nil else { throw ValidationError("--disk iodomain= needs an image path: '\(text)'") }
        disk.inIODomain = true
        return disk
    }
    if text.hasPrefix("socket=") {
        let path = String(text.dropFirst("socket=".count))
        guard !path.isEmpty, !path.contains(",") else { throw ValidationError("--disk socket= needs one socket path: '\(text)'") }
        return DiskConfig(path: "", socket: path)
    }
    var parts = text.split(separator: ",", omittingEmptySubsequences: false).map(String.init)
    guard let path = parts.first, !path.isEmpty else { throw ValidationError("--disk needs a path: '\(text)'") }
    parts.removeFirst()
    var disk = DiskConfig(path: path)
    for option in parts {
        switch option {
        case "readonly", "ro": disk.readOnly = true
        case "direct": disk.direct = true
        default: throw ValidationError("--disk option '\(option)' is not one of readonly, direct")
        }
    }
    return disk
}

/// Parses "tap=NAME|auto[,mac=MAC][,iodomain]" or "socket=PATH".
func parseNet(_ text: String) throws -> NetConfig {
    if text.hasPrefix("socket=") {
        let path = String(text.dropFirst("socket=".count))
        guard !path.isEmpty, !path.contains(",") else { throw ValidationError("--net socket= needs one socket path: '\(text)'") }
        return NetConfig(tap: nil, socket: path)
    }
    var tap: String??
    var mac: MACAddress?
    var inIODomain = false
    for option in text.split(separator: ",") {
        if option == "iodomain" {
            inIODomain = true
            continue
        }
        let kv = option.split(separator: "=", maxSplits: 1).map(String.init)
        guard kv.count == 2 else { throw ValidationError("--net option '\(option)' is not key=value") }
        switch kv[0] {
        case "tap":
            guard !kv[1].isEmpty, kv[1].utf8.count < 16 else { throw ValidationError("--net tap name '\(kv[1])' must be 1 to 15 characters") }
            tap = kv[1] == "auto" ? .some(nil) : .some(kv[1])
        case "mac":
            guard let parsed = MACAddress(kv[1]) else {
                throw ValidationError("--net mac '\(kv[1])' is not a unicast MAC address (six hex bytes, aa:bb:cc:dd:ee:ff, first byte even)")
            }
            mac = parsed
        default:
            throw ValidationError("--net option '\(kv[0])' is not one of tap, mac, iodomain")
        }
    }
    guard let tap else { throw ValidationError("--net needs tap=NAME or tap=auto: '\(text)'") }
    var net = NetConfig(tap: tap, mac: mac)
    net.inIODomain = inIODomain
    return net
}

/// Puts the terminal in raw mode while the guest owns the console, so a person can type into it.
final class RawTerminal {
    private var saved = termios()
    private var active = false

    init(enabled: Bool) {
        guard enabled, isatty(0) != 0, tcgetattr(0, &saved) == 0 else { return }
        var raw = saved
        cfmakeraw(&raw)
        raw.c_oflag |= tcflag_t(OPOST | ONLCR)
        raw.c_lflag |= tcflag_t(ISIG)       // Ctrl-C still stops the VMM
        if tcsetattr(0, TCSANOW, &raw) == 0 { active = true }
    }

    func restore() {
        if active { tcsetattr(0, TCSANOW, &saved); active = false }
    }

    deinit { restore() }
}

final class ExitBox: @unchecked Sendable {
    var exit: GuestExit?
}

/// SIGINT/SIGTERM/SIGHUP in service mode: stop the guest (or exit if none runs), on a watcher thread.
enum StopSignals {
    static func install(_ handler: @escaping @Sendable () -> Void) {
        var set = sigset_t()
        sigemptyset(&set)
        for signal in [SIGINT, SIGTERM, SIGHUP] { sigaddset(&set, signal) }
        pthread_sigmask(SIG_BLOCK, &set, nil)
        let waitSet = set
        detachThread(name: "stop-signals") {
            var set = waitSet
            var received: Int32 = 0
            while sigwait(&set, &received) != 0 {}
            handler()
        }
    }
}

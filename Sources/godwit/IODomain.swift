import ArgumentParser
import Foundation
import GodwitSystem
import IODomain
import VhostUser
import Virtio

/// `godwit iodomain`: serves one physical block device to many VMs, each on a slice of it, and TAPs
/// (one VM NIC each), through one vhost-user socket per VM device; more devices arrive at run time
/// through the control socket.
struct IODomainCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "iodomain",
        abstract: "Serve a block device or TAPs to VMs over vhost-user (one socket per VM device).",
        discussion: """
        Each --device is one VM's disk: a slice of --blk (offset and size in bytes, 512-aligned; the \
        whole device when absent) behind its own vhost-user socket. A VMM (godwit vm --disk socket=PATH, \
        or QEMU's vhost-user-blk) connects to that socket; when it goes away, the socket waits for the next. \
        Each --net is one VM's NIC on a TAP, given by name or as a descriptor passed in (tap-fd=N). \
        With --control, `godwit ctl iodomain` adds, lists and removes devices while the domain runs.
        """)

    @Option(help: "The raw image file or block device this domain serves.")
    var blk: String?

    @Option(help: ArgumentHelp("A VM device: socket=PATH[,offset=BYTES][,size=BYTES][,readonly][,fault-timeout-ms=N] (no answer from the device within N ms counts as a failure: a replica in sync takes over). Repeat for more VMs.",
                               valueName: "socket=path[,offset=][,size=][,readonly][,fault-timeout-ms=]"))
    var device: [String] = []

    @Option(help: ArgumentHelp("A VM NIC: tap=NAME or tap-fd=N (a TAP descriptor passed in), socket=PATH[,mac=MAC]. Repeat for more NICs.",
                               valueName: "tap=NAME|tap-fd=N,socket=path[,mac=]"))
    var net: [String] = []

    @Option(help: "A control socket: devices can then be added and removed at run time (godwit ctl iodomain).")
    var control: String?

    @Flag(help: "Open the device with O_DIRECT.")
    var direct = false

    @Option(name: .customLong("io-engine"), help: ArgumentHelp("How the O_DIRECT disk's requests reach the kernel: io_uring, aio (Linux native AIO) or auto (aio, else io_uring).", valueName: "engine"))
    var ioEngine: String = "auto"

    @Option(name: .customLong("poll-us"), help: "After a request, keep polling the ring (and the disk's completions) this many microseconds before sleeping (0: sleep at once).")
    var pollMicroseconds: Int = 0

    @Option(help: ArgumentHelp("Run the domain's threads only on these host CPUs, e.g. 1 or 2-3 (keep them off the CPUs of polling vCPUs: godwit vm --vcpu-affinity).", valueName: "cpu-list"))
    var cpuAffinity: String?

    @Flag(help: "Accept guest memory that is not sealed against shrinking (a frontend that truncates it could then crash this domain with SIGBUS). Godwit's and QEMU's memfds are sealed.")
    var allowUnsealedMemory = false

    @Flag(help: "Do not lock the domain down after set-up (debugging only: the domain then keeps every privilege it started with).")
    var noSandbox = false

    func validate() throws {
        guard !device.isEmpty || !net.isEmpty || control != nil else {
            throw ValidationError("give at least one --device socket=PATH, --net or --control")
        }
        if !device.isEmpty && blk == nil { throw ValidationError("--device needs --blk") }
        if ioEngine != "auto" && AsyncIOContext.Engine(rawValue: ioEngine) == nil {
            throw ValidationError("--io-engine '\(ioEngine)' is not io_uring, aio or auto")
        }
        if let cpuAffinity, CPUAffinity.parse(cpuAffinity) == nil {
            throw ValidationError("--cpu-affinity '\(cpuAffinity)' is not a list of this host's CPUs, e.g. 1 or 0,2-3")
        }
    }

    func run() throws {
        if let cpuAffinity, let cpus = CPUAffinity.parse(cpuAffinity) {
            // Before the domain starts any thread: they all inherit it.
            do { try CPUAffinity.pinCurrentThread(to: cpus) } catch { fail("--cpu-affinity: \(error)") }
        }
        let specs = try device.map(parseDevice)
        let netSpecs = try net.map(parseNet)
        var block: FileBlockBackend?
        if let blk {
            do {
                let engines = AsyncIOContext.Engine(rawValue: ioEngine).map { [$0] } ?? AsyncIOContext.Engine.automatic
                block = try FileBlockBackend(path: blk, readOnly: !specs.isEmpty && specs.allSatisfy(\.readOnly) && control == nil,
                                             direct: direct, asyncEngines: engines)
            } catch {
                fail("\(blk): \(error)")
            }
            if direct, let block {
                let engine = block.asyncIO.map { "O_DIRECT requests through \($0.engine.rawValue)" }
                    ?? "no asynchronous I/O engine (--io-engine \(ioEngine) refused): requests run synchronously"
                fputs("godwit iodomain: \(blk): \(engine)\n", stderr)
            }
        }
        let service = IODomainService(block: block, requireSealedMemory: !allowUnsealedMemory,
                                      blockPollMicroseconds: pollMicroseconds)
        for spec in specs {
            do {
                try service.addBlock(socket: spec.socket, listener: VhostUserListener(path: spec.socket), offset: spec.offset,
                                     size: spec.size, readOnly: spec.readOnly, faultTimeout: spec.faultTimeoutMs.map { Double($0) / 1000 })
            } catch {
                fail("device \(spec.socket): \(error)")
            }
        }
        for spec in netSpecs {
            do {
                let tap: Tap
                switch spec.tap {
                case let .name(name): tap = try Tap(name: name)
                case let .descriptor(fd): tap = try Tap(adopting: FileDescriptor(owning: fd))
                }
                try service.addNet(socket: spec.socket, listener: VhostUserListener(path: spec.socket), tap: tap, mac: spec.mac)
            } catch {
                fail("NIC \(spec.socket): \(error)")
            }
        }
        if let control {
            do {
                try ControlServer(path: control, service: service) { message in fputs("godwit iodomain: \(message)\n", stderr) }.start()
            } catch {
                fail("control socket \(control): \(error)")
            }
        }
        var set = sigset_t()
        sigemptyset(&set)
        for signal in [SIGINT, SIGTERM, SIGHUP] { sigaddset(&set, signal) }
        pthread_sigmask(SIG_BLOCK, &set, nil)
        if noSandbox {
            fputs("godwit iodomain: WARNING: --no-sandbox: this I/O domain runs with every privilege it was started with\n", stderr)
        } else {
            // Everything is open: the image, the TAPs and the listening sockets. From here the domain can
            // only use what it holds or is handed (no open, no new sockets, no exec), with no capabilities.
            // memfd_create and ftruncate: inflight regions (GET_INFLIGHT_FD); TUNSETOFFLOAD: the guest's
            // offloads; TUNGETIFF: TAPs passed in through the control socket.
            do {
                try Sandbox.lockDown(allowing: ["memfd_create", "ftruncate"],
                                     ioctls: .only([Tap.setOffloadRequest, Tap.getInterfaceRequest, Tap.setVnetHeaderSizeRequest]))
            } catch {
                fputs("godwit iodomain: error: cannot lock down: \(error)\n", stderr)
                Foundation.exit(70)
            }
        }
        let what = [blk].compactMap { $0 } + netSpecs.map { "TAP for \($0.socket)" } + (control.map { ["control \($0)"] } ?? [])
        fputs("godwit iodomain: serving \(what.joined(separator: ", ")) on \(specs.count + netSpecs.count) socket(s)\(noSandbox ? "" : ", sandboxed")\n", stderr)
        var received: Int32 = 0
        while sigwait(&set, &received) != 0 {}
        service.stopAll()
        if noSandbox { for path in specs.map(\.socket) + netSpecs.map(\.socket) + [control].compactMap({ $0 }) { unlink(path) } }
        exitNow(0)  // not exit(): the service's threads may still be winding down
    }

    func fail(_ message: String) -> Never {
        fputs("godwit iodomain: error: \(message)\n", stderr)
        Foundation.exit(2)
    }

    struct DeviceSpec {
        var socket: String
        var offset: UInt64 = 0
        var size: UInt64?
        var readOnly = false
        var faultTimeoutMs: Int?
    }

    func parseDevice(_ text: String) throws -> DeviceSpec {
        var spec = DeviceSpec(socket: "")
        for option in text.split(separator: ",") {
            let kv = option.split(separator: "=", maxSplits: 1).map(String.init)
            switch (kv[0], kv.count) {
            case ("socket", 2): spec.socket = kv[1]
            case ("offset", 2):
                guard let v = UInt64(kv[1]) else { throw ValidationError("--device offset '\(kv[1])' is not a number of bytes") }
                spec.offset = v
            case ("size", 2):
                guard let v = UInt64(kv[1]), v > 0 else { throw ValidationError("--device size '\(kv[1])' is not a number of bytes") }
                spec.size = v
            case ("readonly", 1), ("ro", 1): spec.readOnly = true
            case ("fault-timeout-ms", 2):
                guard let v = Int(kv[1]), (1...600_000).contains(v) else { throw ValidationError("--device fault-timeout-ms '\(kv[1])' is not 1 to 600000") }
                spec.faultTimeoutMs = v
            default: throw ValidationError("--device option '\(option)' is not one of socket=, offset=, size=, readonly, fault-timeout-ms=")
            }
        }
        guard !spec.socket.isEmpty else { throw ValidationError("--device needs socket=PATH: '\(text)'") }
        return spec
    }

    struct NetSpec {
        enum Source { case name(String), descriptor(Int32) }
        var tap: Source
        var socket: String
        var mac: MACAddress?
    }

    func parseNet(_ text: String) throws -> NetSpec {
        var tap: NetSpec.Source?
        var socket = ""
        var mac: MACAddress?
        for option in text.split(separator: ",") {
            let kv = option.split(separator: "=", maxSplits: 1).map(String.init)
            guard kv.count == 2 else { throw ValidationError("--net option '\(option)' is not key=value") }
            switch kv[0] {
            case "tap":
                guard !kv[1].isEmpty, kv[1].utf8.count < 16 else { throw ValidationError("--net tap name '\(kv[1])' must be 1 to 15 characters") }
                tap = .name(kv[1])
            case "tap-fd":
                guard let fd = Int32(kv[1]), fd > 2 else { throw ValidationError("--net tap-fd '\(kv[1])' is not a descriptor number above 2") }
                tap = .descriptor(fd)
            case "socket": socket = kv[1]
            case "mac":
                guard let parsed = MACAddress(kv[1]) else { throw ValidationError("--net mac '\(kv[1])' is not a unicast MAC address") }
                mac = parsed
            default: throw ValidationError("--net option '\(kv[0])' is not one of tap, tap-fd, socket, mac")
            }
        }
        guard let tap, !socket.isEmpty else { throw ValidationError("--net needs tap=NAME or tap-fd=N, and socket=PATH: '\(text)'") }
        return NetSpec(tap: tap, socket: socket, mac: mac)
    }
}

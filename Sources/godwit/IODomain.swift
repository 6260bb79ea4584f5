import ArgumentParser
import Foundation
import GodwitSystem
import VhostUser
import Virtio

/// `godwit iodomain`: serves one physical block device to many VMs, each on a slice of it, and TAPs
/// (one VM NIC each), through one vhost-user socket per VM device.
struct IODomainCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "iodomain",
        abstract: "Serve a block device or TAPs to VMs over vhost-user (one socket per VM device).",
        discussion: """
        Each --device is one VM's disk: a slice of --blk (offset and size in bytes, 512-aligned; the \
        whole device when absent) behind its own vhost-user socket. A VMM (godwit vm --disk socket=PATH, \
        or QEMU's vhost-user-blk) connects to that socket; when it goes away, the socket waits for the next. \
        Each --net is one VM's NIC on a TAP, given by name or as a descriptor passed in (tap-fd=N).
        """)

    @Option(help: "The raw image file or block device this domain serves.")
    var blk: String?

    @Option(help: ArgumentHelp("A VM NIC: tap=NAME or tap-fd=N (a TAP descriptor passed in), socket=PATH[,mac=MAC]. Repeat for more NICs.",
                               valueName: "tap=NAME|tap-fd=N,socket=path[,mac=]"))
    var net: [String] = []

    @Option(help: ArgumentHelp("A VM device: socket=PATH[,offset=BYTES][,size=BYTES][,readonly]. Repeat for more VMs.",
                               valueName: "socket=path[,offset=][,size=][,readonly]"))
    var device: [String] = []

    @Flag(help: "Open the device with O_DIRECT.")
    var direct = false

    @Flag(help: "Accept guest memory that is not sealed against shrinking (a frontend that truncates it could then crash this domain with SIGBUS). Godwit's and QEMU's memfds are sealed.")
    var allowUnsealedMemory = false

    @Flag(help: "Do not lock the domain down after set-up (debugging only: the domain then keeps every privilege it started with).")
    var noSandbox = false

    func validate() throws {
        guard !device.isEmpty || !net.isEmpty else { throw ValidationError("give at least one --device socket=PATH or --net") }
        if !device.isEmpty && blk == nil { throw ValidationError("--device needs --blk") }
        if blk != nil && device.isEmpty { throw ValidationError("--blk needs at least one --device socket=PATH") }
    }

    func run() throws {
        let specs = try device.map(parseDevice)
        let netSpecs = try net.map(parseNet)
        var backends: [VhostUserBackend] = []
        var receivers: [NetRxWorker] = []
        if let blk {
            let base: FileBlockBackend
            do {
                base = try FileBlockBackend(path: blk, readOnly: specs.allSatisfy(\.readOnly), direct: direct)
            } catch {
                fputs("godwit iodomain: error: \(blk): \(error)\n", stderr)
                Foundation.exit(2)
            }
            backends += serveSlices(of: base, specs)
        }
        for spec in netSpecs {
            do {
                let tap: Tap
                switch spec.tap {
                case let .name(name): tap = try Tap(name: name)
                case let .descriptor(fd): tap = try Tap(adopting: FileDescriptor(owning: fd))
                }
                // One NIC per TAP: one device, served to one VMM connection at a time; its receive
                // thread reads the TAP only while the guest has buffers.
                let device = NetDevice(backend: TapBackend(tap: tap), mac: spec.mac ?? MACAddress.generated(seed: tap.name))
                let receiver = try NetRxWorker(device: device)
                try receiver.start()
                let backend = VhostUserBackend(name: URL(fileURLWithPath: spec.socket).lastPathComponent, device: device)
                backend.requireSealedMemory = !allowUnsealedMemory
                try backend.listen(path: spec.socket)
                backends.append(backend)
                receivers.append(receiver)
            } catch {
                fputs("godwit iodomain: error: NIC \(spec.socket): \(error)\n", stderr)
                Foundation.exit(2)
            }
        }
        lockDownAndServe(backends, what: [blk].compactMap { $0 } + netSpecs.map { "TAP for \($0.socket)" })
        for receiver in receivers { receiver.stop() }
        if noSandbox { for path in specs.map(\.socket) + netSpecs.map(\.socket) { unlink(path) } }
    }

    /// One backend per slice of `base`, listening on the slice's socket.
    func serveSlices(of base: FileBlockBackend, _ specs: [DeviceSpec]) -> [VhostUserBackend] {
        var backends: [VhostUserBackend] = []
        for spec in specs {
            do {
                let slice = try SliceBlockBackend(base: base, offset: spec.offset, size: spec.size ?? (base.capacity - spec.offset),
                                                  readOnly: spec.readOnly)
                let name = URL(fileURLWithPath: spec.socket).lastPathComponent
                // A fresh device per connection: a reconnecting VMM gets a clean device, other VMs are untouched.
                let backend = VhostUserBackend(name: name) { BlockDevice(backend: slice, serial: String(name.prefix(20))) }
                backend.requireSealedMemory = !allowUnsealedMemory
                try backend.listen(path: spec.socket)
                backends.append(backend)
            } catch {
                fputs("godwit iodomain: error: device \(spec.socket): \(error)\n", stderr)
                Foundation.exit(2)
            }
        }
        return backends
    }

    /// Locks the domain down (unless --no-sandbox), then serves until SIGINT, SIGTERM or SIGHUP.
    func lockDownAndServe(_ backends: [VhostUserBackend], what: [String]) {
        var set = sigset_t()
        sigemptyset(&set)
        for signal in [SIGINT, SIGTERM, SIGHUP] { sigaddset(&set, signal) }
        pthread_sigmask(SIG_BLOCK, &set, nil)
        if noSandbox {
            fputs("godwit iodomain: WARNING: --no-sandbox: this I/O domain runs with every privilege it was started with\n", stderr)
        } else {
            // Everything is open: the image and the listening sockets. From here the domain can only
            // use what it holds (no open, no new sockets, no exec), with no capabilities.
            // memfd_create and ftruncate: inflight regions (GET_INFLIGHT_FD); TUNSETOFFLOAD: the guest's offloads.
            do { try Sandbox.lockDown(allowing: ["memfd_create", "ftruncate"], ioctls: .only([Tap.setOffloadRequest])) } catch {
                fputs("godwit iodomain: error: cannot lock down: \(error)\n", stderr)
                Foundation.exit(70)
            }
        }
        fputs("godwit iodomain: serving \(what.joined(separator: ", ")) on \(backends.count) socket(s)\(noSandbox ? "" : ", sandboxed")\n", stderr)
        var received: Int32 = 0
        while sigwait(&set, &received) != 0 {}
        for backend in backends { backend.stop() }
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

    struct DeviceSpec {
        var socket: String
        var offset: UInt64 = 0
        var size: UInt64?
        var readOnly = false
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
            default: throw ValidationError("--device option '\(option)' is not one of socket=, offset=, size=, readonly")
            }
        }
        guard !spec.socket.isEmpty else { throw ValidationError("--device needs socket=PATH: '\(text)'") }
        return spec
    }
}

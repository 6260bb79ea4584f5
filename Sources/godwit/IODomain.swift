import ArgumentParser
import Foundation
import GodwitSystem
import VhostUser
import Virtio

/// `godwit iodomain`: serves one physical block device to many VMs, each on a slice of it, through
/// one vhost-user socket per VM device.
struct IODomainCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "iodomain",
        abstract: "Serve a block device to VMs over vhost-user (one socket per VM device).",
        discussion: """
        Each --device is one VM's disk: a slice of --blk (offset and size in bytes, 512-aligned; the \
        whole device when absent) behind its own vhost-user socket. A VMM (godwit vm --disk socket=PATH, \
        or QEMU's vhost-user-blk) connects to that socket; when it goes away, the socket waits for the next.
        """)

    @Option(help: "The raw image file or block device this domain serves.")
    var blk: String

    @Option(help: ArgumentHelp("A VM device: socket=PATH[,offset=BYTES][,size=BYTES][,readonly]. Repeat for more VMs.",
                               valueName: "socket=path[,offset=][,size=][,readonly]"))
    var device: [String] = []

    @Flag(help: "Open the device with O_DIRECT.")
    var direct = false

    @Flag(help: "Do not lock the domain down after set-up (debugging only: the domain then keeps every privilege it started with).")
    var noSandbox = false

    func validate() throws {
        guard !device.isEmpty else { throw ValidationError("give at least one --device socket=PATH") }
    }

    func run() throws {
        let specs = try device.map(parseDevice)
        let base: FileBlockBackend
        do {
            base = try FileBlockBackend(path: blk, readOnly: specs.allSatisfy(\.readOnly), direct: direct)
        } catch {
            fputs("godwit iodomain: error: \(blk): \(error)\n", stderr)
            Foundation.exit(2)
        }
        var backends: [VhostUserBackend] = []
        for spec in specs {
            do {
                let slice = try SliceBlockBackend(base: base, offset: spec.offset, size: spec.size ?? (base.capacity - spec.offset),
                                                  readOnly: spec.readOnly)
                let name = URL(fileURLWithPath: spec.socket).lastPathComponent
                // A fresh device per connection: a reconnecting VMM gets a clean device, other VMs are untouched.
                let backend = VhostUserBackend(name: name) { BlockDevice(backend: slice, serial: String(name.prefix(20))) }
                try backend.listen(path: spec.socket)
                backends.append(backend)
            } catch {
                fputs("godwit iodomain: error: device \(spec.socket): \(error)\n", stderr)
                Foundation.exit(2)
            }
        }
        var set = sigset_t()
        sigemptyset(&set)
        for signal in [SIGINT, SIGTERM, SIGHUP] { sigaddset(&set, signal) }
        pthread_sigmask(SIG_BLOCK, &set, nil)
        if noSandbox {
            fputs("godwit iodomain: WARNING: --no-sandbox: this I/O domain runs with every privilege it was started with\n", stderr)
        } else {
            // Everything is open: the image and the listening sockets. From here the domain can only
            // use what it holds (no open, no new sockets, no exec), with no capabilities.
            do { try Sandbox.lockDown() } catch {
                fputs("godwit iodomain: error: cannot lock down: \(error)\n", stderr)
                Foundation.exit(70)
            }
        }
        fputs("godwit iodomain: serving \(blk) on \(specs.count) socket(s)\(noSandbox ? "" : ", sandboxed")\n", stderr)
        var received: Int32 = 0
        while sigwait(&set, &received) != 0 {}
        for backend in backends { backend.stop() }
        if noSandbox { for spec in specs { unlink(spec.socket) } }
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

import ArgumentParser
import Foundation
#if canImport(Glibc)
import Glibc
#endif
import GodwitSystem
import IODomain
import NBD

/// `godwit ctl iodomain`: lists, adds and removes the VM devices of a running I/O domain through its
/// control socket. The domain is sandboxed, so this command makes what a new device needs (the
/// listening vhost-user socket, and for a NIC the TAP) and hands it over.
struct CtlIODomainCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "iodomain",
        abstract: "Control an I/O domain through its control socket (godwit iodomain --control).",
        subcommands: [List.self, AddBlock.self, AddNet.self, Remove.self, Route.self, AttachReplica.self, DetachReplica.self,
                      Resync.self, Events.self])

    struct Options: ParsableArguments {
        @Option(help: "The I/O domain's control socket.")
        var control: String

        @Flag(help: "Print the JSON the domain returned.")
        var json = false

        func run(_ request: ControlRequest, descriptors: [FileDescriptor] = []) throws {
            try ctl {
                let response = try ControlClient(path: control).call(request, descriptors: descriptors)
                if json {
                    let encoder = JSONEncoder()
                    encoder.outputFormatting = [.prettyPrinted, .sortedKeys]
                    print(String(decoding: try encoder.encode(response), as: UTF8.self))
                    return
                }
                for device in response.devices ?? [] {
                    var what = device.kind == "blk"
                        ? "blk offset=\(device.offset ?? 0) size=\(device.size ?? 0)\(device.readonly == true ? " readonly" : "")"
                        : "net mac=\(device.mac ?? "?")"
                    if let r = device.route {
                        what += " route=\(r.route.rawValue) replica=\(r.replica ? (r.replicaInSync ? "in-sync" : "out-of-sync") : "none")"
                        if let p = r.syncProgress { what += String(format: " sync=%.0f%%", p * 100) }
                        what += " out_of_sync_bytes=\(r.bytesOutOfSync) held=\(r.held) failovers=\(r.failovers)\(r.localFailed ? " local=failed" : "")"
                    }
                    print("\(device.socket): \(what) connections=\(device.connections)")
                }
                for e in response.events ?? [] {
                    let ev = e.event
                    print(String(format: "%10.3f ", e.time) + "\(e.socket): \(ev.kind) route=\(ev.route.rawValue)"
                          + (ev.held.map { " held=\($0)" } ?? "") + (ev.milliseconds.map { String(format: " %.1fms", $0) } ?? "")
                          + (ev.reason.map { ": \($0)" } ?? ""))
                }
            }
        }
    }

    struct List: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "The domain's VM devices.")
        @OptionGroup var options: Options
        func run() throws { try options.run(ControlRequest(op: .list)) }
    }

    struct AddBlock: ParsableCommand {
        static let configuration = CommandConfiguration(commandName: "add-blk", abstract: "Serve a slice of the domain's block device on a new socket.")
        @OptionGroup var options: Options
        @Option(help: "The vhost-user socket to create.") var socket: String
        @Option(help: "The slice's first byte.") var offset: UInt64 = 0
        @Option(help: "The slice's size in bytes (default: to the end).") var size: UInt64?
        @Flag(help: "Read-only.") var readonly = false
        @Option(help: "Milliseconds without an answer from the device after which a request counts as failed (and a replica in sync takes over).")
        var faultTimeoutMs: Int?
        func run() throws {
            let listener = try ctlSocket(socket)
            try options.run(ControlRequest(op: .addBlock, socket: socket, offset: offset, size: size, readonly: readonly,
                                           faultTimeoutMs: faultTimeoutMs), descriptors: [listener])
        }
    }

    struct AddNet: ParsableCommand {
        static let configuration = CommandConfiguration(commandName: "add-net", abstract: "Serve a NIC on a TAP on a new socket.")
        @OptionGroup var options: Options
        @Option(help: "The vhost-user socket to create.") var socket: String
        @Option(help: "The TAP (opened here and handed over).") var tap: String
        @Option(help: "The guest's MAC.") var mac: String?
        func run() throws {
            let opened: Tap
            do { opened = try Tap(name: tap) } catch {
                FileHandle.standardError.write(Data("godwit ctl: TAP \(tap): \(error)\n".utf8))
                throw ExitCode(1)
            }
            let listener = try ctlSocket(socket)
            try options.run(ControlRequest(op: .addNet, socket: socket, mac: mac), descriptors: [listener, opened.descriptor])
        }
    }

    struct Remove: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Stop serving the device on a socket (its VMM sees the backend go).")
        @OptionGroup var options: Options
        @Option(help: "The device's vhost-user socket.") var socket: String
        func run() throws {
            try options.run(ControlRequest(op: .remove, socket: socket))
            unlink(socket)
        }
    }
}

extension CtlIODomainCommand {
    struct Route: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Switch a disk's route: local, remote (its replica) or mirror (both).")
        @OptionGroup var options: Options
        @Option(help: "The disk's vhost-user socket.") var socket: String
        @Argument(help: "local, remote or mirror.") var route: String
        func run() throws {
            guard let parsed = DeviceRoute(rawValue: route) else { throw ValidationError("route must be local, remote or mirror, not '\(route)'") }
            try options.run(ControlRequest(op: .route, socket: socket, route: parsed))
        }
    }

    struct AttachReplica: ParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "attach-replica",
            abstract: "Give a disk a replica on an NBD server: it is copied in the background, then mirrored.",
            discussion: "The connection is made here and handed to the sandboxed domain, which never dials out.")
        @OptionGroup var options: Options
        @Option(help: "The disk's vhost-user socket.") var socket: String
        @Option(help: "The NBD server: tcp:HOST:PORT or unix:PATH.") var nbd: String
        @Option(help: "The export's name.") var export: String = ""
        @Flag(help: "The replica already holds the disk but for what was written since it left: copy only that.") var resync = false
        func run() throws {
            let connection: FileDescriptor
            do { connection = try NBDConnector.connect(nbd) } catch {
                FileHandle.standardError.write(Data("godwit ctl: NBD server \(nbd): \(error)\n".utf8))
                throw ExitCode(1)
            }
            try options.run(ControlRequest(op: .attachReplica, socket: socket, export: export, resync: resync), descriptors: [connection])
        }
    }

    struct DetachReplica: ParsableCommand {
        static let configuration = CommandConfiguration(commandName: "detach-replica", abstract: "Stop using a disk's replica (the route becomes local).")
        @OptionGroup var options: Options
        @Option(help: "The disk's vhost-user socket.") var socket: String
        func run() throws { try options.run(ControlRequest(op: .detachReplica, socket: socket)) }
    }

    struct Resync: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Bring a disk's out-of-sync replica back in sync (then mirror).")
        @OptionGroup var options: Options
        @Option(help: "The disk's vhost-user socket.") var socket: String
        func run() throws { try options.run(ControlRequest(op: .resync, socket: socket)) }
    }

    struct Events: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "The route events (faults, failovers, syncs), oldest first.")
        @OptionGroup var options: Options
        @Option(help: "Only this disk's.") var socket: String?
        func run() throws { try options.run(ControlRequest(op: .events, socket: socket)) }
    }
}

/// A listening socket at `path` for a device, or exit status 1 with the reason.
func ctlSocket(_ path: String) throws -> FileDescriptor {
    do { return try ControlClient.listeningSocket(path: path) } catch {
        FileHandle.standardError.write(Data("godwit ctl: \(error)\n".utf8))
        throw ExitCode(1)
    }
}

import ArgumentParser
import Foundation
#if canImport(Glibc)
import Glibc
#endif
import GodwitSystem
import IODomain

/// `godwit ctl iodomain`: lists, adds and removes the VM devices of a running I/O domain through its
/// control socket. The domain is sandboxed, so this command makes what a new device needs (the
/// listening vhost-user socket, and for a NIC the TAP) and hands it over.
struct CtlIODomainCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "iodomain",
        abstract: "Control an I/O domain through its control socket (godwit iodomain --control).",
        subcommands: [List.self, AddBlock.self, AddNet.self, Remove.self])

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
                    let what = device.kind == "blk"
                        ? "blk offset=\(device.offset ?? 0) size=\(device.size ?? 0)\(device.readonly == true ? " readonly" : "")"
                        : "net mac=\(device.mac ?? "?")"
                    print("\(device.socket): \(what) connections=\(device.connections)")
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
        func run() throws {
            let listener = try ctlSocket(socket)
            try options.run(ControlRequest(op: .addBlock, socket: socket, offset: offset, size: size, readonly: readonly), descriptors: [listener])
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

/// A listening socket at `path` for a device, or exit status 1 with the reason.
func ctlSocket(_ path: String) throws -> FileDescriptor {
    do { return try ControlClient.listeningSocket(path: path) } catch {
        FileHandle.standardError.write(Data("godwit ctl: \(error)\n".utf8))
        throw ExitCode(1)
    }
}

import API
import ArgumentParser
import Foundation

/// `godwit ctl`: a typed client for a running `godwit vm --api-sock`.
struct CtlCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "ctl",
        abstract: "Control a VMM through its API socket.",
        subcommands: [Info.self, Config.self, Version.self, BootSourceCommand.self, MachineConfigCommand.self, Drive.self,
                      Net.self, LoggerCommand.self, MetricsFile.self, Start.self, Pause.self, Resume.self, CtrlAltDel.self, TypeText.self,
                      FlushMetrics.self, Metrics.self, Events.self, Snapshot.self, Migrate.self, CtlIODomainCommand.self, CtlAgentCommand.self])
}

/// Options every `ctl` subcommand takes.
struct CtlOptions: ParsableArguments {
    @Option(help: "The VMM's API socket.")
    var apiSock: String

    @Flag(help: "Print the JSON the API returned instead of a summary.")
    var json = false

    var client: APIClient { APIClient(socketPath: apiSock, timeout: 30) }

    func print<T: Encodable>(_ value: T, summary: (T) -> String) throws {
        if json {
            let encoder = JSONEncoder()
            encoder.outputFormatting = [.prettyPrinted, .sortedKeys]
            Swift.print(String(decoding: try encoder.encode(value), as: UTF8.self))
        } else {
            Swift.print(summary(value))
        }
    }
}

/// Runs a client call and turns API errors into one line and exit status 1.
func ctl(_ body: () throws -> Void) throws {
    do { try body() } catch {
        FileHandle.standardError.write(Data("godwit ctl: \(error)\n".utf8))
        throw ExitCode(1)
    }
}

extension CtlCommand {
    struct Info: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "The instance: id, state, version.")
        @OptionGroup var options: CtlOptions
        func run() throws {
            try ctl {
                try options.print(try options.client.instanceInfo()) { "\($0.id): \($0.state) (\($0.appName) \($0.vmmVersion))" }
            }
        }
    }

    struct Config: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "The VM's configuration (GET /vm/config).")
        @OptionGroup var options: CtlOptions
        func run() throws {
            try ctl {
                try options.print(try options.client.vmConfig()) { c in
                    var lines: [String] = []
                    if let b = c.bootSource { lines.append("kernel: \(b.kernelImagePath)  args: \(b.bootArgs ?? "")") }
                    if let m = c.machineConfig { lines.append("vcpus: \(m.vcpuCount)  memory: \(m.memSizeMib) MiB") }
                    for d in c.drives ?? [] {
                        lines.append("drive \(d.driveId): \(d.pathOnHost ?? d.socket ?? "?")\(d.isReadOnly == true ? " (read-only)" : "")")
                    }
                    for n in c.networkInterfaces ?? [] { lines.append("nic \(n.ifaceId): \(n.hostDevName ?? "socket=" + (n.socket ?? "")) \(n.guestMac ?? "")") }
                    return lines.joined(separator: "\n")
                }
            }
        }
    }

    struct Version: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "The VMM's version.")
        @OptionGroup var options: CtlOptions
        func run() throws { try ctl { try options.print(try options.client.version()) { $0.firecrackerVersion } } }
    }

    struct Start: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Start the configured VM (InstanceStart).")
        @OptionGroup var options: CtlOptions
        func run() throws { try ctl { try options.client.instanceStart() } }
    }

    struct Pause: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Pause the VM (its clock stops too).")
        @OptionGroup var options: CtlOptions
        func run() throws { try ctl { try options.client.pause() } }
    }

    struct Resume: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Resume a paused VM.")
        @OptionGroup var options: CtlOptions
        func run() throws { try ctl { try options.client.resume() } }
    }

    struct CtrlAltDel: ParsableCommand {
        static let configuration = CommandConfiguration(commandName: "ctrl-alt-del", abstract: "Send Ctrl-Alt-Del to the guest.")
        @OptionGroup var options: CtlOptions
        func run() throws { try ctl { try options.client.sendCtrlAltDel() } }
    }

    struct TypeText: ParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "type", abstract: "Type a line on the guest's serial console (PUT /serial/input): a command for its shell.")
        @OptionGroup var options: CtlOptions
        @Flag(help: "Do not end the text with a carriage return.") var noNewline = false
        @Argument(help: "The text.") var text: String
        func run() throws { try ctl { try options.client.sendSerialInput(noNewline ? text : text + "\r") } }
    }

    struct FlushMetrics: ParsableCommand {
        static let configuration = CommandConfiguration(commandName: "flush-metrics", abstract: "Write the metrics file now.")
        @OptionGroup var options: CtlOptions
        func run() throws { try ctl { try options.client.flushMetrics() } }
    }

    struct Metrics: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "The Prometheus metrics.")
        @OptionGroup var options: CtlOptions
        func run() throws { try ctl { print(try options.client.prometheusMetrics(), terminator: "") } }
    }

    struct Events: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Follow the event stream (boot, pause, resume, shutdown, ...).")
        @OptionGroup var options: CtlOptions
        @Option(help: "Start after this sequence number (default: the history the VMM keeps).")
        var since: UInt64?
        @Flag(help: "Stop after the shutdown event.")
        var untilShutdown = false

        func run() throws {
            try ctl {
                let stream = try options.client.events(since: since ?? 0)
                defer { stream.close() }
                while let event = try stream.next() {
                    try options.print(event) { e in
                        let details = e.details.keys.sorted().map { "\($0)=\(e.details[$0]!)" }.joined(separator: " ")
                        return "\(e.timestamp) #\(e.seq) \(e.type) \(details)"
                    }
                    fflush(stdout)
                    if untilShutdown && event.type == .shutdown { break }
                }
            }
        }
    }

    struct BootSourceCommand: ParsableCommand {
        static let configuration = CommandConfiguration(commandName: "boot-source", abstract: "Set the kernel and its command line (PUT /boot-source).")
        @OptionGroup var options: CtlOptions
        @Option(help: "The guest kernel on the host.") var kernel: String
        @Option(help: "The guest command line.") var bootArgs: String?
        @Option(help: "An initrd (initramfs) for a Linux kernel.") var initrd: String?
        func run() throws {
            let path = URL(fileURLWithPath: kernel).standardizedFileURL.path
            let initrdPath = initrd.map { URL(fileURLWithPath: $0).standardizedFileURL.path }
            try ctl { try options.client.putBootSource(BootSource(kernelImagePath: path, bootArgs: bootArgs, initrdPath: initrdPath)) }
        }
    }

    struct MachineConfigCommand: ParsableCommand {
        static let configuration = CommandConfiguration(commandName: "machine-config",
                                                        abstract: "Show the machine configuration, or change it before boot (PATCH /machine-config).")
        @OptionGroup var options: CtlOptions
        @Option(help: "vCPUs.") var vcpus: Int?
        @Option(help: "Memory in MiB.") var memory: Int?
        func run() throws {
            try ctl {
                if vcpus != nil || memory != nil {
                    try options.client.patchMachineConfig(MachineConfigurationUpdate(vcpuCount: vcpus, memSizeMib: memory))
                }
                try options.print(try options.client.machineConfig()) { "vcpus: \($0.vcpuCount)  memory: \($0.memSizeMib) MiB" }
            }
        }
    }

    struct Net: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Network interfaces.", subcommands: [Add.self])

        struct Add: ParsableCommand {
            static let configuration = CommandConfiguration(abstract: "Add a NIC on a TAP, or one an I/O domain serves, before boot (PUT /network-interfaces).")
            @OptionGroup var options: CtlOptions
            @Argument(help: "The interface id.") var id: String
            @Option(help: "The TAP on the host.") var tap: String?
            @Option(help: "The vhost-user socket of an I/O domain serving the NIC (instead of --tap).") var socket: String?
            @Option(help: "The guest's MAC (with --tap).") var mac: String?
            func run() throws {
                try ctl { try options.client.putNetworkInterface(NetworkInterface(ifaceId: id, hostDevName: tap, guestMac: mac, socket: socket)) }
            }
        }
    }

    struct LoggerCommand: ParsableCommand {
        static let configuration = CommandConfiguration(commandName: "logger", abstract: "Log the VMM's events to a file (PUT /logger).")
        @OptionGroup var options: CtlOptions
        @Option(help: "The log file.") var path: String
        func run() throws { try ctl { try options.client.putLogger(Logger(logPath: path)) } }
    }

    struct MetricsFile: ParsableCommand {
        static let configuration = CommandConfiguration(commandName: "metrics-file", abstract: "The file FlushMetrics writes to (PUT /metrics).")
        @OptionGroup var options: CtlOptions
        @Option(help: "The metrics file.") var path: String
        func run() throws { try ctl { try options.client.putMetrics(API.Metrics(metricsPath: path)) } }
    }

    struct Drive: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Drives.", subcommands: [Add.self, Update.self])

        struct Add: ParsableCommand {
            static let configuration = CommandConfiguration(abstract: "Add a drive before boot (PUT /drives).")
            @OptionGroup var options: CtlOptions
            @Argument(help: "The drive id.") var id: String
            @Option(help: "The image on the host.") var path: String
            @Flag(help: "Read-only.") var readOnly = false
            @Flag(help: "The root device (root=/dev/vda on the command line).") var root = false
            func run() throws {
                try ctl {
                    try options.client.putDrive(API.Drive(driveId: id, pathOnHost: path, isRootDevice: root, isReadOnly: readOnly))
                }
            }
        }

        struct Update: ParsableCommand {
            static let configuration = CommandConfiguration(abstract: "Point a running VM's drive at another image (PATCH /drives).")
            @OptionGroup var options: CtlOptions
            @Argument(help: "The drive id.") var id: String
            @Option(help: "The new image on the host.") var path: String
            func run() throws { try ctl { try options.client.patchDrive(PartialDrive(driveId: id, pathOnHost: path)) } }
        }
    }
}

extension CtlCommand {
    struct Snapshot: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Save a paused VM, or load one into a fresh VMM.", subcommands: [Create.self, Load.self])

        struct Create: ParsableCommand {
            static let configuration = CommandConfiguration(abstract: "PUT /snapshot/create (the VM must be paused).")
            @OptionGroup var options: CtlOptions
            @Option(help: "The state file to write.") var snapshotPath: String
            @Option(help: "The memory file to write.") var memFilePath: String
            func run() throws { try ctl { try options.client.createSnapshot(SnapshotCreateParams(snapshotPath: snapshotPath, memFilePath: memFilePath)) } }
        }

        struct Load: ParsableCommand {
            static let configuration = CommandConfiguration(abstract: "PUT /snapshot/load (a VMM with no VM yet).")
            @OptionGroup var options: CtlOptions
            @Option(help: "The state file.") var snapshotPath: String
            @Option(help: "The memory file.") var memFilePath: String
            @Flag(help: "Resume the guest at once.") var resume = false
            func run() throws {
                try ctl {
                    try options.client.loadSnapshot(SnapshotLoadParams(snapshotPath: snapshotPath,
                                                                       memBackend: .init(backendPath: memFilePath), resumeVm: resume))
                }
            }
        }
    }
}

extension CtlCommand {
    /// `godwit ctl migrate`: starts a live migration and shows its progress until it ends.
    struct Migrate: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Live-migrate the VM to a VMM waiting with --incoming or PUT /migration/receive, showing progress.")
        @OptionGroup var options: CtlOptions
        @Option(help: "The target, tcp:HOST:PORT.") var to: String
        @Option(help: "The downtime limit in milliseconds.") var downtimeMs: Int = 300
        @Option(help: "Give up after this many seconds (the VM keeps running here).") var timeoutS: Int = 300
        @Option(help: "Bandwidth cap in megabits per second.") var maxBandwidthMbps: Int?
        @Option(help: "The shared key (hex) or a file holding it (default: the VMM's --migration-key-file).") var key: String?

        func run() throws {
            try ctl {
                let client = options.client
                try client.sendMigration(MigrationSendParams(destinationUrl: to, downtimeMs: downtimeMs, timeoutS: timeoutS,
                                                             maxBandwidthMbps: maxBandwidthMbps, key: key))
                var last = MigrationStatus(state: "sending")
                while true {
                    guard let status = try? client.migrationStatus() else { break }  // the source VMM exited: done
                    last = status
                    let bar = String(repeating: "#", count: min(20, status.pass)) + String(repeating: ".", count: max(0, 20 - status.pass))
                    print("\r[\(bar)] pass \(status.pass) dirty \(status.dirtyPages) pages, \(status.bytesSent >> 20) MiB sent, \(Int(status.rateMbps)) Mbit/s, expected downtime \(Int(status.expectedDowntimeMs)) ms   ", terminator: "")
                    fflush(stdout)
                    if status.state != "sending" { break }
                    usleep(200_000)
                }
                print("")
                switch last.state {
                case "completed", "sending":
                    print("migrated: downtime \(last.downtimeMs.map { String(format: "%.1f ms", $0) } ?? "?"), total \(last.totalMs.map { String(format: "%.0f ms", $0) } ?? "?")")
                default:
                    throw APIError.badRequest("migration \(last.state): \(last.error ?? "")")
                }
            }
        }
    }
}

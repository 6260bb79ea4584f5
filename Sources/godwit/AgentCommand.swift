import Agent
import API
import ArgumentParser
import Foundation
#if canImport(Glibc)
import Glibc
#endif

/// `godwit agent`: the host agent, one per host.
struct AgentCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "agent",
        abstract: "Run the host agent: this host's I/O domain and VMMs, VM ownership in etcd, failover to a replica host.",
        discussion: """
        The configuration file is JSON: host, listen (peer API, IPv4 ADDRESS:PORT, token required), socket (Unix socket \
        for godwit ctl agent), state_dir, token_file, etcd (http://ADDRESS:PORT), lease_ttl_s, device (the block \
        device or image the host's I/O domain serves in slices), direct, nbd_listen (replicas for peers), \
        migration_address, migration_ports ([FIRST, LAST]), migration_key_file, fault_timeout_ms, peers \
        ([{"host", "address"}]), godwit (the executable to start VMMs with). A restarted agent adopts the VMMs \
        and the I/O domain its state directory names. Stops on SIGTERM or SIGINT; the VMs keep running.
        """)

    @Option(help: "The agent's configuration file (JSON).")
    var config: String

    func run() throws {
        let configuration: AgentConfig
        do { configuration = try AgentConfig.load(path: config) } catch {
            fputs("godwit agent: \(error)\n", stderr)
            exitNow(ExitStatus.setupError)
        }
        var set = sigset_t()
        sigemptyset(&set)
        for signal in [SIGINT, SIGTERM, SIGHUP] { sigaddset(&set, signal) }
        pthread_sigmask(SIG_BLOCK, &set, nil)
        let agent: Agent
        do {
            agent = try Agent(config: configuration)
            try agent.start()
        } catch {
            fputs("godwit agent: error: \(error)\n", stderr)
            exitNow(ExitStatus.setupError)
        }
        fputs("godwit agent \(configuration.host): serving peers on \(configuration.listen), ctl on \(configuration.socket)\n", stderr)
        var received: Int32 = 0
        while sigwait(&set, &received) != 0 {}
        agent.stop()
        fputs("godwit agent \(configuration.host): stopped (signal \(received)); the VMs keep running\n", stderr)
        exitNow(0)
    }
}

/// `godwit ctl agent`: a host agent through its Unix socket.
struct CtlAgentCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "agent",
        abstract: "Control a host agent through its Unix socket (godwit agent).",
        subcommands: [Status.self, Create.self, Delete.self, Failover.self, Events.self])

    struct Options: ParsableArguments {
        @Option(help: "The agent's Unix socket.") var socket: String
        @Flag(help: "Print the JSON the agent returned.") var json = false
        var client: APIClient { APIClient(socketPath: socket, timeout: 120) }

        func print<T: Encodable>(_ value: T) {
            let encoder = JSONEncoder()
            encoder.outputFormatting = [.prettyPrinted, .sortedKeys]
            Swift.print(String(decoding: (try? encoder.encode(value)) ?? Data(), as: UTF8.self))
        }
    }

    struct Status: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "The host: its VMs (route, owner), replicas, I/O domain, etcd.")
        @OptionGroup var options: Options
        func run() throws {
            try ctl {
                let status: HostStatus = try options.client.get("/host")
                if options.json { options.print(status); return }
                print("host \(status.host): etcd \(status.etcdHealthy ? "healthy" : "NOT RENEWING"), I/O domain pid \(status.iodomainPid.map(String.init) ?? "none"), peers \(status.peers.joined(separator: ","))")
                for vm in status.vms {
                    print("vm \(vm.spec.id): \(vm.state) owner=\(vm.owner.map { "\($0.host)#\($0.generation)" } ?? "none") disk=\(vm.size >> 20)MiB@\(vm.offset)"
                          + " replica=\(vm.replicaHost ?? "none") vmm=\(vm.vmmPid)")
                }
                for r in status.replicas { print("replica \(r.vm): for \(r.fromHost), \(r.size >> 20)MiB@\(r.offset) on \(r.nbd)") }
            }
        }
    }

    struct Create: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Run a VM on this host (its disk a slice of the host's device).")
        @OptionGroup var options: Options
        @Option(help: "The VM's id.") var id: String
        @Option(help: "The guest kernel (absolute path).") var kernel: String
        @Option(help: "The guest's command line.") var cmdline: String = ""
        @Option(help: "vCPUs.") var vcpus: Int = 1
        @Option(help: "Memory in MiB.") var memoryMib: Int = 128
        @Option(help: "Disk size in MiB.") var diskMib: Int = 16
        @Option(help: "The peer host that keeps the disk's replica.") var replica: String?
        func run() throws {
            try ctl {
                let spec = VMSpec(id: id, kernel: kernel, cmdline: cmdline, vcpus: vcpus, memoryMib: memoryMib, diskMib: diskMib, replica: replica)
                let record = try options.client.send("POST", "/vms", spec, answer: VMRecord.self)
                if options.json { options.print(record) } else { print("vm \(record.spec.id): \(record.state), owner generation \(record.owner?.generation ?? 0)") }
            }
        }
    }

    struct Delete: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Stop a VM and give up its ownership, disk and replica.")
        @OptionGroup var options: Options
        @Option(help: "The VM's id.") var id: String
        func run() throws { try ctl { _ = try options.client.request("DELETE", "/vms/\(id)") } }
    }

    struct Failover: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Move a VM to its replica's host now (as after a disk fault).")
        @OptionGroup var options: Options
        @Option(help: "The VM's id.") var id: String
        func run() throws {
            try ctl {
                let r = try options.client.request("POST", "/vms/\(id)/failover", body: [])
                guard (200..<300).contains(r.status) else { throw AgentError.failed(String(decoding: r.body, as: UTF8.self)) }
            }
        }
    }

    struct Events: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "The agent's steps (and its peers' steps for VMs they share), with durations.")
        @OptionGroup var options: Options
        @Flag(help: "Keep following new events.") var follow = false
        func run() throws {
            try ctl {
                var since: UInt64 = 0
                repeat {
                    let events: [AgentEvent] = try options.client.get("/events?since=\(since)&wait=\(follow ? 10 : 0)")
                    for e in events {
                        if options.json { options.print(e); continue }
                        let time = ISO8601DateFormatter().string(from: Date(timeIntervalSince1970: e.time))
                        print("\(time) \(e.host) \(e.vm ?? "-") \(e.step)" + (e.durationMs.map { String(format: " %.1fms", $0) } ?? "") + (e.detail.map { ": \($0)" } ?? ""))
                        since = max(since, e.seq)
                    }
                } while follow
            }
        }
    }
}

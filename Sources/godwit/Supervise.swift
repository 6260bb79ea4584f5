import ArgumentParser
import Foundation
import GodwitSystem
import VMM
#if canImport(Glibc)
import Glibc
#endif

/// `godwit supervise` (hidden): the process that starts and restarts a VMM's I/O domains, so that the
/// VMM itself never needs to exec once it has locked itself down. The VMM spawns it with the
/// descriptors the domains need (TAPs, as 3, 4, ...); it dies with the VMM, and on SIGTERM it stops the
/// domains, prints each domain's restart count and removes its socket directory.
struct SuperviseCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "supervise",
        abstract: "Start I/O domains and restart them when they die (started by godwit vm).",
        shouldDisplay: false)

    /// One domain, as the VMM describes it on the command line (JSON).
    struct DomainSpec: Codable {
        var name: String
        var arguments: [String]
        /// Inherited descriptor numbers passed on to the domain, as its 3, 4, ...
        var descriptors: [Int32]
        var sockets: [String]
        var namespaces: Bool
    }

    @Option(help: "A domain to run: JSON {name, arguments, descriptors, sockets, namespaces}. Repeatable.")
    var domain: [String] = []

    @Option(help: "A directory of sockets to remove when supervision ends.")
    var directory: String?

    func run() throws {
        var set = sigset_t()
        sigemptyset(&set)
        for signal in [SIGINT, SIGTERM, SIGHUP] { sigaddset(&set, signal) }
        pthread_sigmask(SIG_BLOCK, &set, nil)
        let supervisor = IODomainSupervisor()
        var failed = false
        for text in domain {
            do {
                let spec = try JSONDecoder().decode(DomainSpec.self, from: Data(text.utf8))
                try supervisor.start(.init(name: spec.name, arguments: spec.arguments,
                                           descriptors: spec.descriptors.map { FileDescriptor(owning: $0) },
                                           sockets: spec.sockets, namespaces: spec.namespaces))
            } catch {
                fputs("godwit: error: \(error)\n", stderr)
                failed = true
                break
            }
        }
        if !failed {
            var received: Int32 = 0
            while sigwait(&set, &received) != 0 {}
        }
        supervisor.stop()
        if ProcessInfo.processInfo.environment["GODWIT_DEVICE_STATISTICS"] == "1" {
            for status in supervisor.statuses { fputs("godwit: iodomain \(status.name) restarts=\(status.restarts)\n", stderr) }
        }
        if let directory { try? FileManager.default.removeItem(atPath: directory) }
        Foundation.exit(failed ? 2 : 0)
    }
}

import ArgumentParser
import Foundation
import GodwitSystem
import NBD
#if canImport(Glibc)
import Glibc
#endif

/// `godwit nbd-server`: serves image files (or slices of them) over NBD, the protocol device routes
/// use between hosts; readable and writable by nbdinfo, nbdcopy, qemu-img, qemu-io and qemu-nbd's peers.
struct NBDServerCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "nbd-server",
        abstract: "Serve image files over NBD (fixed newstyle, many requests in flight).",
        discussion: "Each --export is NAME=PATH[,readonly][,offset=BYTES][,size=BYTES]; an empty NAME is the default export. Listens on TCP (--listen HOST:PORT) or a Unix socket (--unix PATH) until SIGTERM or SIGINT.")

    @Option(help: ArgumentHelp("An export: NAME=PATH[,readonly][,offset=N][,size=N]. Repeat for more.", valueName: "name=path[,...]"))
    var export: [String] = []

    @Option(help: "Listen on TCP HOST:PORT (IPv4).")
    var listen: String?

    @Option(help: "Listen on a Unix socket at PATH.")
    var unix: String?

    @Option(help: "Requests executed at once per connection.")
    var workers: Int = 8

    func validate() throws {
        if export.isEmpty { throw ValidationError("give at least one --export NAME=PATH") }
        if (listen == nil) == (unix == nil) { throw ValidationError("give exactly one of --listen HOST:PORT and --unix PATH") }
        if !(1...64).contains(workers) { throw ValidationError("--workers must be 1 to 64") }
    }

    /// Parses NAME=PATH[,readonly][,offset=N][,size=N].
    static func parseExport(_ text: String) throws -> (name: String, path: String, readOnly: Bool, offset: UInt64, size: UInt64?) {
        guard let equals = text.firstIndex(of: "=") else { throw ValidationError("--export '\(text)' is not NAME=PATH") }
        let name = String(text[..<equals])
        var parts = text[text.index(after: equals)...].split(separator: ",", omittingEmptySubsequences: false).map(String.init)
        guard let path = parts.first, !path.isEmpty else { throw ValidationError("--export '\(text)' has no path") }
        parts.removeFirst()
        var readOnly = false, offset: UInt64 = 0, size: UInt64?
        for part in parts {
            let kv = part.split(separator: "=", maxSplits: 1).map(String.init)
            switch kv[0] {
            case "readonly" where kv.count == 1: readOnly = true
            case "offset" where kv.count == 2:
                guard let n = UInt64(kv[1]) else { throw ValidationError("--export offset '\(kv[1])' is not a byte count") }
                offset = n
            case "size" where kv.count == 2:
                guard let n = UInt64(kv[1]) else { throw ValidationError("--export size '\(kv[1])' is not a byte count") }
                size = n
            default: throw ValidationError("--export option '\(part)' is not one of readonly, offset=N, size=N")
            }
        }
        return (name, path, readOnly, offset, size)
    }

    func run() throws {
        var exports: [String: NBDStorage] = [:]
        for text in export {
            let e = try Self.parseExport(text)
            guard exports[e.name] == nil else { throw ValidationError("export '\(e.name)' given twice") }
            do {
                let fd = try FileDescriptor.open(e.path, flags: e.readOnly ? O_RDONLY : O_RDWR)
                exports[e.name] = try NBDFileStorage(file: fd, offset: e.offset, size: e.size, readOnly: e.readOnly)
            } catch {
                fputs("godwit: error: export '\(e.name)' (\(e.path)): \(error)\n", stderr)
                exitNow(ExitStatus.setupError)
            }
        }
        var options = NBDServer.Options()
        options.workers = workers
        let server = NBDServer(exports: exports, options: options)
        let listener: FileDescriptor
        do {
            listener = try NBDListener.open(tcp: listen, unix: unix)
        } catch {
            fputs("godwit: error: \(error)\n", stderr)
            exitNow(ExitStatus.setupError)
        }
        fputs("godwit: nbd-server: serving \(exports.keys.sorted().map { "'\($0)'" }.joined(separator: ", ")) on \(listen ?? unix ?? "")\n", stderr)
        var stopSignals = sigset_t()
        sigemptyset(&stopSignals)
        for signo in [SIGTERM, SIGINT] { sigaddset(&stopSignals, signo) }
        pthread_sigmask(SIG_BLOCK, &stopSignals, nil)
        detachThread(name: "nbd-accept") { server.serve(listener: listener) }
        var received: Int32 = 0
        sigwait(&stopSignals, &received)
        _ = shutdown(listener.rawValue, Int32(SHUT_RDWR))
        server.stop()
        if let unix { unlink(unix) }
        exitNow(0)
    }
}

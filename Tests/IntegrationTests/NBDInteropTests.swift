import Foundation
import GodwitSystem
import GodwitTestSupport
import NBD
import Testing
#if canImport(Glibc)
import Glibc
#endif

/// Godwit's NBD server (`godwit nbd-server`) read and written by the NBD world's own tools: libnbd's
/// nbdinfo and nbdcopy, qemu-img and qemu-io.
/// The NBD tools the interop tier needs (scripts/install-deps.sh installs them).
enum NBDTools {
    static let all = ["/usr/bin/nbdinfo", "/usr/bin/nbdcopy", "/usr/bin/qemu-img", "/usr/bin/qemu-io", "/usr/bin/qemu-nbd", "/usr/bin/nbdkit"]
    static var missing: [String] { all.filter { !FileManager.default.isExecutableFile(atPath: $0) } }
}

@Suite("Interop: NBD with nbdinfo, nbdcopy, qemu-img, qemu-io, qemu-nbd, nbdkit", .serialized,
       .enabled(if: NBDTools.missing.isEmpty, "needs \(NBDTools.missing.joined(separator: ", ")) (scripts/install-deps.sh installs them)"))
struct NBDInteropTests {
    /// A server on a Unix socket with a writable export "disk" and a read-only default export.
    final class Server {
        let dir: URL
        let image: URL
        let socket: String
        let process: BackgroundProcess

        init(size: UInt64 = 64 << 20) throws {
            dir = try TestEnvironment.temporaryDirectory()
            image = dir.appendingPathComponent("disk.img")
            try TestEnvironment.makeImage(at: image, size: size)
            socket = dir.appendingPathComponent("nbd.sock").path
            process = try BackgroundProcess(TestEnvironment.godwitPath, ["nbd-server", "--export", "disk=\(image.path)",
                                                                         "--export", "=\(image.path),readonly", "--unix", socket])
            for _ in 0..<500 where !FileManager.default.fileExists(atPath: socket) { usleep(10_000) }
        }

        func uri(_ export: String = "disk") -> String { "nbd+unix:///\(export)?socket=\(socket)" }

        func stop() {
            process.terminate()
            _ = process.wait(timeout: 10)
            try? FileManager.default.removeItem(at: dir)
        }
    }

    @Test func nbdinfoSeesBothExportsAndTheirFlags() throws {
        let server = try Server()
        defer { server.stop() }
        let list = try runProcess("/usr/bin/nbdinfo", ["--list", "--json", server.uri("")], timeout: 30)
        #expect(list.status == 0, "\(list.stderr)")
        let json = try #require(try JSONSerialization.jsonObject(with: Data(list.stdout.utf8)) as? [String: Any])
        let exports = try #require(json["exports"] as? [[String: Any]])
        #expect(Set(exports.compactMap { $0["export-name"] as? String }) == ["", "disk"])
        let disk = try #require(exports.first { $0["export-name"] as? String == "disk" })
        #expect(disk["export-size"] as? Int == 64 << 20)
        #expect(disk["is_read_only"] as? Bool == false)
        #expect(disk["can_flush"] as? Bool == true && disk["can_fua"] as? Bool == true && disk["can_zero"] as? Bool == true)
        let ro = try #require(exports.first { $0["export-name"] as? String == "" })
        #expect(ro["is_read_only"] as? Bool == true)
    }

    @Test func nbdcopyAndQemuImgMoveEveryByte() throws {
        let server = try Server(size: 16 << 20)
        defer { server.stop() }
        let source = server.dir.appendingPathComponent("source.bin"), back = server.dir.appendingPathComponent("back.bin")
        var bytes = [UInt8](repeating: 0, count: 16 << 20)
        var state: UInt64 = 0x9E37_79B9_7F4A_7C15
        for i in stride(from: 0, to: bytes.count / 2, by: 1) {  // half random, half zeros (sparse detection)
            state = state &* 6364136223846793005 &+ 1442695040888963407
            bytes[i] = UInt8(truncatingIfNeeded: state >> 33)
        }
        try Data(bytes).write(to: source)
        let copyIn = try runProcess("/usr/bin/nbdcopy", [source.path, server.uri()], timeout: 60)
        #expect(copyIn.status == 0, "\(copyIn.stderr)")
        #expect(try Data(contentsOf: server.image) == Data(bytes), "nbdcopy wrote the image byte for byte")
        let copyOut = try runProcess("/usr/bin/nbdcopy", [server.uri(), back.path], timeout: 60)
        #expect(copyOut.status == 0, "\(copyOut.stderr)")
        #expect(try Data(contentsOf: back) == Data(bytes))
        let converted = server.dir.appendingPathComponent("converted.qcow2")
        let convert = try runProcess("/usr/bin/qemu-img", ["convert", "-f", "raw", "-O", "qcow2", server.uri(), converted.path], timeout: 60)
        #expect(convert.status == 0, "\(convert.stderr)")
        let compare = try runProcess("/usr/bin/qemu-img", ["compare", "-f", "qcow2", "-F", "raw", converted.path, source.path], timeout: 60)
        #expect(compare.status == 0, "qemu-img read what nbdcopy wrote: \(compare.stdout) \(compare.stderr)")
    }

    @Test func qemuIoWritesPatternsZeroesAndFlushes() throws {
        let server = try Server()
        defer { server.stop() }
        let io = try runProcess("/usr/bin/qemu-io", ["-f", "raw",
                                                     "-c", "write -P 0xab 1M 4M", "-c", "write -z 8M 1M", "-c", "write -P 0xcd -f 12M 64k",
                                                     "-c", "flush", "-c", "discard 16M 1M",
                                                     "-c", "read -P 0xab 1M 4M", "-c", "read -P 0 8M 1M", "-c", "read -P 0xcd 12M 64k",
                                                     server.uri()], timeout: 60)
        #expect(io.status == 0, "\(io.stdout)\n\(io.stderr)")
        #expect(!io.stdout.contains("Pattern verification failed"), "\(io.stdout)")
        let image = try Data(contentsOf: server.image)
        #expect(image[(1 << 20)..<(5 << 20)].allSatisfy { $0 == 0xab })
        #expect(image[(12 << 20)..<((12 << 20) + 65536)].allSatisfy { $0 == 0xcd })
        // The read-only export: qemu-io cannot write it.
        let ro = try runProcess("/usr/bin/qemu-io", ["-f", "raw", "-r", "-c", "read -P 0 60M 4k", server.uri("")], timeout: 30)
        #expect(ro.status == 0, "\(ro.stdout)\n\(ro.stderr)")
        let write = try runProcess("/usr/bin/qemu-io", ["-f", "raw", "-c", "write -P 1 0 4k", server.uri("")], timeout: 30)
        #expect(write.status != 0 || write.stdout.contains("error"), "a read-only export refuses writes: \(write.stdout) \(write.stderr)")
        #expect(server.process.isRunning)
    }

    @Test func badExportsAreSetUpErrors() throws {
        let r = try runProcess(TestEnvironment.godwitPath, ["nbd-server", "--export", "x=/nonexistent/img", "--unix", "/tmp/godwit-nbd-never.sock"], timeout: 10)
        #expect(r.status == 2, "\(r.stderr)")
        #expect(r.stderr.contains("/nonexistent/img"))
        let bad = try runProcess(TestEnvironment.godwitPath, ["nbd-server", "--export", "x=/tmp,offset=banana", "--unix", "/tmp/godwit-nbd-never.sock"], timeout: 10)
        #expect(bad.status != 0 && bad.stderr.contains("offset"), "\(bad.stderr)")
    }

    /// Connects to a Unix socket (retrying while the server starts).
    static func connect(_ path: String) throws -> FileDescriptor {
        for _ in 0..<500 {
            let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
            var address = sockaddr_un()
            address.sun_family = sa_family_t(AF_UNIX)
            withUnsafeMutableBytes(of: &address.sun_path) { raw in for (i, b) in path.utf8.enumerated() where i < raw.count - 1 { raw[i] = b } }
            let rc = withUnsafePointer(to: &address) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { Glibc.connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) } }
            if rc == 0 { return FileDescriptor(owning: fd) }
            close(fd)
            usleep(10_000)
        }
        throw TestFailure("cannot connect to \(path)")
    }

    /// Godwit's client (libnbd over a socket we connect and hand over) against other servers: writes,
    /// FUA, zeroes, flush and reads, checked in the file the server serves.
    @Test(arguments: ["qemu-nbd", "nbdkit", "nbd-server"])
    func clientWorksWithOtherServers(server name: String) throws {
        if name == "nbd-server" && !FileManager.default.isExecutableFile(atPath: "/usr/bin/nbd-server") { return }
        let dir = try TestEnvironment.temporaryDirectory()
        defer { try? FileManager.default.removeItem(at: dir) }
        let image = dir.appendingPathComponent("disk.img")
        try TestEnvironment.makeImage(at: image, size: 16 << 20)
        let socketPath = dir.appendingPathComponent("s.sock").path
        let port = UInt16.random(in: 20000..<30000)
        let server: BackgroundProcess
        switch name {
        case "qemu-nbd": server = try BackgroundProcess("/usr/bin/qemu-nbd", ["-k", socketPath, "-f", "raw", "-x", "disk", "-t", image.path])
        case "nbdkit": server = try BackgroundProcess("/usr/bin/nbdkit", ["-U", socketPath, "-f", "file", image.path])
        default:  // the NBD project's reference server, on TCP (its export from the command line is the default, "")
            server = try BackgroundProcess("/usr/bin/nbd-server", ["127.0.0.1:\(port)", image.path, "-C", "/dev/null", "-d"])
        }
        defer { server.terminate(); _ = server.wait(timeout: 10) }
        var socket: FileDescriptor?
        if name == "nbd-server" {
            for _ in 0..<200 where socket == nil {
                socket = try? NBDConnector.connect("tcp:127.0.0.1:\(port)")
                if socket == nil { usleep(20_000) }
            }
        } else {
            socket = try Self.connect(socketPath)
        }
        let connection = try #require(socket, "\(name) listens")
        let client = try NBDClient(socket: connection, export: name == "qemu-nbd" ? "disk" : "")
        #expect(client.size == 16 << 20, "\(name)")
        let data = (0..<(256 << 10)).map { UInt8(truncatingIfNeeded: $0 &* 13 &+ 7) }
        try data.withUnsafeBytes { try client.write(at: 3 << 20, from: $0, fua: true) }
        try client.writeZeroes(at: (3 << 20) + 4096, length: 8192)
        try client.flush()
        var back = [UInt8](repeating: 0, count: data.count)
        try back.withUnsafeMutableBytes { try client.read(at: 3 << 20, into: $0) }
        var expected = data
        for i in 4096..<(4096 + 8192) { expected[i] = 0 }
        #expect(back == expected, "\(name): what was written reads back")
        let file = try Data(contentsOf: image)
        #expect(file[(3 << 20)..<((3 << 20) + data.count)] == Data(expected), "\(name): and is in the file")
    }
}

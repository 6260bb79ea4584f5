import CGodwit
import Foundation
import GodwitSystem
@testable import NBD
import Testing
#if canImport(Glibc)
import Glibc
#endif

/// A connected socket pair: `client` for the NBD client, `server` for whoever answers.
private func socketPair() throws -> (client: FileDescriptor, server: FileDescriptor) {
    var fds: [Int32] = [0, 0]
    guard godwit_socketpair(&fds) == 0 else { throw SystemError(operation: "socketpair", errno: errno) }
    return (FileDescriptor(owning: fds[0]), FileDescriptor(owning: fds[1]))
}

/// A file-backed export in a temporary file.
private func temporaryStorage(size: Int) throws -> (NBDFileStorage, String) {
    let path = NSTemporaryDirectory() + "godwit-nbd-\(UUID().uuidString).img"
    FileManager.default.createFile(atPath: path, contents: Data(count: size))
    return (try NBDFileStorage(path: path, readOnly: false), path)
}

/// A server that lies: a correct handshake (GO answered with an export of `size` bytes), then, for the
/// first request, `reply` bytes instead of a proper answer, then it closes.
private final class LyingServer {
    let done = DispatchSemaphore(value: 0)

    init(_ socket: FileDescriptor, size: UInt64 = 1 << 20, handshakeJunk: [UInt8]? = nil, reply: @escaping ([UInt8]) -> [UInt8]) {
        Thread {
            defer { socket.close(); self.done.signal() }
            func send(_ b: [UInt8]) { _ = b.withUnsafeBytes { Glibc.send(socket.rawValue, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) } }
            func read(_ n: Int) -> [UInt8]? {
                var out = [UInt8](repeating: 0, count: n)
                var got = 0
                while got < n {
                    let r = out.withUnsafeMutableBytes { Glibc.read(socket.rawValue, $0.baseAddress! + got, n - got) }
                    if r <= 0 { return nil }
                    got += r
                }
                return out
            }
            var greeting = [UInt8]()
            greeting.appendBE(NBDProtocol.initMagic)
            greeting.appendBE(NBDProtocol.optionMagic)
            greeting.appendBE(UInt16(3))
            if let handshakeJunk { send(greeting + handshakeJunk); return }
            send(greeting)
            guard read(4) != nil else { return }
            while let header = read(16) {
                let option: UInt32 = header.loadBE(at: 8)
                guard read(Int(header.loadBE(at: 12, as: UInt32.self))) != nil else { return }
                func optionReply(_ type: UInt32, _ data: [UInt8]) {
                    var m = [UInt8]()
                    m.appendBE(NBDProtocol.replyMagic)
                    m.appendBE(option)
                    m.appendBE(type)
                    m.appendBE(UInt32(data.count))
                    send(m + data)
                }
                if option == NBDProtocol.Option.go {
                    var info = [UInt8]()
                    info.appendBE(NBDProtocol.Info.export)
                    info.appendBE(size)
                    info.appendBE(NBDProtocol.TransmissionFlag.hasFlags | NBDProtocol.TransmissionFlag.sendFlush)
                    optionReply(NBDProtocol.Reply.info, info)
                    optionReply(NBDProtocol.Reply.ack, [])
                    break
                }
                optionReply(NBDProtocol.Reply.errUnsupported, [])
            }
            guard let request = read(28) else { return }
            send(reply(request))
        }.start()
    }
}

@Suite("NBD client (libnbd)")
struct NBDClientTests {
    /// libnbd against Godwit's server: every command, data checked on the file underneath.
    @Test func clientAndServerAgree() throws {
        let (storage, path) = try temporaryStorage(size: 4 << 20)
        defer { unlink(path) }
        let server = NBDServer(exports: ["disk": storage])
        let (c, s) = try socketPair()
        Thread { server.serve(connection: s) }.start()
        let client = try NBDClient(socket: c, export: "disk")
        c.close()
        #expect(client.size == 4 << 20)
        #expect(!client.readOnly && client.canFlush && client.canFUA && client.canTrim && client.canZero)
        let data = (0..<65536).map { UInt8(truncatingIfNeeded: $0 &* 31) }
        try data.withUnsafeBytes { try client.write(at: 1 << 20, from: $0, fua: true) }
        var back = [UInt8](repeating: 0, count: 65536)
        try back.withUnsafeMutableBytes { try client.read(at: 1 << 20, into: $0) }
        #expect(back == data)
        try client.flush()
        try client.writeZeroes(at: (1 << 20) + 4096, length: 4096)
        try client.trim(at: 2 << 20, length: 65536)
        let file = try Data(contentsOf: URL(fileURLWithPath: path))
        #expect(file[(1 << 20)..<((1 << 20) + 4096)] == Data(data[0..<4096]))
        #expect(file[((1 << 20) + 4096)..<((1 << 20) + 8192)].allSatisfy { $0 == 0 })
        // Out of range is refused before anything is sent.
        #expect(throws: NBDError.self) { try back.withUnsafeMutableBytes { try client.read(at: (4 << 20) - 100, into: $0) } }
        #expect(throws: NBDError.self) { try client.writeZeroes(at: UInt64.max - 10, length: 100) }
    }

    @Test func anUnknownExportIsAnError() throws {
        let (storage, path) = try temporaryStorage(size: 65536)
        defer { unlink(path) }
        let server = NBDServer(exports: ["disk": storage])
        let (c, s) = try socketPair()
        Thread { server.serve(connection: s) }.start()
        #expect(throws: NBDError.self) { _ = try NBDClient(socket: c, export: "other") }
    }

    /// Malformed replies (wrong magic, an unknown cookie, an error reply, junk, a reply cut short) and
    /// a broken handshake: each is an error from the call, and the client stays failed, never traps.
    @Test(arguments: ["magic", "cookie", "error", "junk", "short", "handshake"])
    func malformedRepliesAreErrors(kind: String) throws {
        let (c, s) = try socketPair()
        let liar: LyingServer
        switch kind {
        case "handshake":
            liar = LyingServer(s, handshakeJunk: Array(repeating: 0xFF, count: 64)) { _ in [] }
        default:
            liar = LyingServer(s) { request in
                var r = [UInt8]()
                let cookie: UInt64 = request.loadBE(at: 8)
                switch kind {
                case "magic": r.appendBE(UInt32(0xDEAD_BEEF)); r.appendBE(UInt32(0)); r.appendBE(cookie)
                case "cookie": r.appendBE(NBDProtocol.simpleReplyMagic); r.appendBE(UInt32(0)); r.appendBE(cookie &+ 12345)
                case "error": r.appendBE(NBDProtocol.simpleReplyMagic); r.appendBE(NBDProtocol.Errno.io); r.appendBE(cookie)
                case "short": r.appendBE(NBDProtocol.simpleReplyMagic); r.appendBE(UInt32(0)); r.appendBE(cookie); r += [1, 2, 3]
                default: r = (0..<200).map { UInt8(truncatingIfNeeded: $0 &* 97) }
                }
                return r
            }
        }
        if kind == "handshake" {
            #expect(throws: NBDError.self) { _ = try NBDClient(socket: c, export: "") }
            _ = liar.done.wait(timeout: .now() + 5)
            return
        }
        let client = try NBDClient(socket: c, export: "")
        c.close()
        var buffer = [UInt8](repeating: 0, count: 4096)
        #expect(throws: NBDError.self, "\(kind)") { try buffer.withUnsafeMutableBytes { try client.read(at: 0, into: $0) } }
        #expect(liar.done.wait(timeout: .now() + 5) == .success)
        #expect(throws: NBDError.self, "\(kind): later calls fail too") { try buffer.withUnsafeMutableBytes { try client.read(at: 0, into: $0) } }
    }

    /// Random bytes as the first reply, many times: always an error, never a trap or a hang.
    @Test func fuzzedRepliesNeverTrap() throws {
        for round in 0..<100 {
            let (c, s) = try socketPair()
            let liar = LyingServer(s) { request in
                var r = [UInt8]()
                if round % 2 == 0 {  // a valid header, then garbage behind it
                    r.appendBE(NBDProtocol.simpleReplyMagic)
                    r.appendBE(UInt32.random(in: 0...3))
                    r.appendBE(round % 4 == 0 ? request.loadBE(at: 8, as: UInt64.self) : UInt64.random(in: 0...UInt64.max))
                }
                return r + (0..<Int.random(in: 0...300)).map { _ in UInt8.random(in: 0...255) }
            }
            let client = try NBDClient(socket: c, export: "")
            c.close()
            var buffer = [UInt8](repeating: 0, count: 512)
            _ = try? buffer.withUnsafeMutableBytes { try client.read(at: 0, into: $0) }
            #expect(liar.done.wait(timeout: .now() + 5) == .success, "round \(round)")
        }
    }
}

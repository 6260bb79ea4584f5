import CGodwit
import Foundation
import GodwitSystem
@testable import NBD
import Testing
#if canImport(Glibc)
import Glibc
#endif

/// An export in memory, counting flushes; `failWrites` makes every write fail with EIO.
private final class MemoryStorage: NBDStorage, @unchecked Sendable {
    let lock = NSLock()
    var bytes: [UInt8]
    let readOnly: Bool
    var flushes = 0
    var failWrites = false
    /// Fixed at creation (`bytes` never changes length): read by the server's threads without the lock.
    let size: UInt64

    init(size: Int, readOnly: Bool = false) {
        bytes = (0..<size).map { UInt8(truncatingIfNeeded: $0 &* 7) }
        self.size = UInt64(size)
        self.readOnly = readOnly
    }

    func read(at offset: UInt64, into buffer: UnsafeMutableRawBufferPointer) throws {
        lock.withLock { bytes.withUnsafeBytes { buffer.copyMemory(from: UnsafeRawBufferPointer(rebasing: $0[Int(offset)..<(Int(offset) + buffer.count)])) } }
    }

    func write(at offset: UInt64, from buffer: UnsafeRawBufferPointer, fua: Bool) throws {
        if failWrites { throw SystemError(operation: "pwrite", errno: EIO) }
        lock.withLock { for (i, b) in buffer.enumerated() { bytes[Int(offset) + i] = b } }
    }

    func flush() throws { lock.withLock { flushes += 1 } }
    func trim(at offset: UInt64, length: UInt64) throws {}
    func writeZeroes(at offset: UInt64, length: UInt64, mayUnmap: Bool, fua: Bool) throws {
        lock.withLock { for i in Int(offset)..<Int(offset + length) { bytes[i] = 0 } }
    }
}

/// The client end of a socket pair whose other end a server thread serves.
private final class TestClient {
    let fd: Int32
    let done = DispatchSemaphore(value: 0)
    var serverResult: NBDError?

    init(_ server: NBDServer) throws {
        var fds: [Int32] = [0, 0]
        guard godwit_socketpair(&fds) == 0 else { throw SystemError(operation: "socketpair", errno: errno) }
        fd = fds[0]
        // A reply that never comes fails the test after 10 s instead of hanging it.
        var limit = timeval(tv_sec: 10, tv_usec: 0)
        _ = setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &limit, socklen_t(MemoryLayout<timeval>.size))
        let serverEnd = FileDescriptor(owning: fds[1])
        let t = Thread { [self] in
            serverResult = server.serve(connection: serverEnd)
            done.signal()
        }
        t.start()
    }

    deinit { close(fd) }

    func send(_ bytes: [UInt8]) { _ = bytes.withUnsafeBytes { Glibc.send(fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) } }

    /// Reads exactly `count` bytes, or nil at end of file.
    func read(_ count: Int) -> [UInt8]? {
        var out = [UInt8](repeating: 0, count: count)
        var done = 0
        while done < count {
            let n = out.withUnsafeMutableBytes { Glibc.read(fd, $0.baseAddress! + done, count - done) }
            if n <= 0 { return nil }
            done += n
        }
        return out
    }

    /// True when the server closed the connection (end of file), waiting at most 5 s.
    func serverClosed() -> Bool { done.wait(timeout: .now() + 5) == .success && read(1) == nil }

    func option(_ code: UInt32, _ data: [UInt8]) {
        var m = [UInt8]()
        m.appendBE(NBDProtocol.optionMagic)
        m.appendBE(code)
        m.appendBE(UInt32(data.count))
        send(m + data)
    }

    /// One option reply: its type and data.
    func optionReply() -> (type: UInt32, data: [UInt8])? {
        guard let h = read(20), h.loadBE(at: 0, as: UInt64.self) == NBDProtocol.replyMagic else { return nil }
        let length = Int(h.loadBE(at: 16, as: UInt32.self))
        guard let data = read(length) else { return nil }
        return (h.loadBE(at: 12, as: UInt32.self), data)
    }

    /// Greeting, client flags, NBD_OPT_GO for `name`; returns the export's size and flags.
    func go(_ name: String) -> (size: UInt64, flags: UInt16)? {
        guard let greeting = read(18), greeting.loadBE(at: 0, as: UInt64.self) == NBDProtocol.initMagic else { return nil }
        var flags = [UInt8]()
        flags.appendBE(UInt32(3))
        send(flags)
        var data = [UInt8]()
        data.appendBE(UInt32(name.utf8.count))
        data += Array(name.utf8)
        data.appendBE(UInt16(0))
        option(NBDProtocol.Option.go, data)
        var result: (UInt64, UInt16)?
        while let reply = optionReply() {
            if reply.type == NBDProtocol.Reply.ack { return result }
            if reply.type == NBDProtocol.Reply.info, reply.data.loadBE(at: 0, as: UInt16.self) == NBDProtocol.Info.export {
                result = (reply.data.loadBE(at: 2, as: UInt64.self), reply.data.loadBE(at: 10, as: UInt16.self))
            }
            if reply.type & 0x8000_0000 != 0 { return nil }
        }
        return nil
    }

    func request(_ type: UInt16, flags: UInt16 = 0, cookie: UInt64, offset: UInt64, length: UInt32, data: [UInt8] = [], magic: UInt32 = NBDProtocol.requestMagic) {
        send(TestClient.message(type, flags: flags, cookie: cookie, offset: offset, length: length, data: data, magic: magic))
    }

    /// A request's bytes on the wire (to send several at once).
    static func message(_ type: UInt16, flags: UInt16 = 0, cookie: UInt64, offset: UInt64, length: UInt32, data: [UInt8] = [],
                        magic: UInt32 = NBDProtocol.requestMagic) -> [UInt8] {
        var m = [UInt8]()
        m.appendBE(magic)
        m.appendBE(flags)
        m.appendBE(type)
        m.appendBE(cookie)
        m.appendBE(offset)
        m.appendBE(length)
        return m + data
    }

    /// A simple reply: error and cookie (read data is read by the caller).
    func reply() -> (error: UInt32, cookie: UInt64)? {
        guard let h = read(16), h.loadBE(at: 0, as: UInt32.self) == NBDProtocol.simpleReplyMagic else { return nil }
        return (h.loadBE(at: 4, as: UInt32.self), h.loadBE(at: 8, as: UInt64.self))
    }
}

@Suite("NBD server")
struct NBDServerTests {
    @Test func goReadWriteFlushAndZero() throws {
        let storage = MemoryStorage(size: 1 << 20)
        let server = NBDServer(exports: ["disk": storage])
        let client = try TestClient(server)
        let export = try #require(client.go("disk"))
        #expect(export.size == 1 << 20)
        #expect(export.flags & NBDProtocol.TransmissionFlag.readOnly == 0)
        #expect(export.flags & NBDProtocol.TransmissionFlag.sendWriteZeroes != 0)

        let payload = (0..<8192).map { UInt8(truncatingIfNeeded: $0 ^ 0x5A) }
        client.request(NBDProtocol.Command.write, flags: NBDProtocol.CommandFlag.fua, cookie: 1, offset: 4096, length: 8192, data: payload)
        #expect(client.reply().map { $0 == (0, 1) } == true)
        client.request(NBDProtocol.Command.read, cookie: 2, offset: 4096, length: 8192)
        #expect(client.reply().map { $0 == (0, 2) } == true)
        #expect(client.read(8192) == payload)
        client.request(NBDProtocol.Command.flush, cookie: 3, offset: 0, length: 0)
        #expect(client.reply().map { $0 == (0, 3) } == true)
        #expect(storage.flushes == 1)
        client.request(NBDProtocol.Command.writeZeroes, cookie: 4, offset: 4096, length: 4096)
        #expect(client.reply().map { $0 == (0, 4) } == true)
        #expect(storage.bytes[4096..<8192].allSatisfy { $0 == 0 })
        client.request(NBDProtocol.Command.disconnect, cookie: 5, offset: 0, length: 0)
        #expect(client.serverClosed())
        #expect(client.serverResult == nil, "a clean disconnect")
    }

    /// Wrong requests get their error and the connection goes on.
    @Test func wrongRequestsGetErrors() throws {
        let storage = MemoryStorage(size: 65536)
        let readOnly = MemoryStorage(size: 65536, readOnly: true)
        let server = NBDServer(exports: ["disk": storage, "ro": readOnly])
        let client = try TestClient(server)
        #expect(client.go("disk") != nil)
        let cases: [(UInt16, UInt16, UInt64, UInt32, UInt32)] = [
            (NBDProtocol.Command.read, 0, 65536, 1, NBDProtocol.Errno.invalid),                 // past the end
            (NBDProtocol.Command.read, 0, UInt64.max, 4096, NBDProtocol.Errno.invalid),         // offset + length overflows
            (NBDProtocol.Command.read, 0, 0, NBDProtocol.maxPayload + 1, NBDProtocol.Errno.overflow),
            (NBDProtocol.Command.writeZeroes, 0, 65000, 4096, NBDProtocol.Errno.noSpace),
            (NBDProtocol.Command.trim, 0, 1 << 40, 1, NBDProtocol.Errno.invalid),
            (77, 0, 0, 0, NBDProtocol.Errno.invalid),                                            // unknown command
            (NBDProtocol.Command.read, 0x80, 0, 512, NBDProtocol.Errno.invalid),                 // unknown flag
        ]
        for (n, c) in cases.enumerated() {
            client.request(c.0, flags: c.1, cookie: UInt64(100 + n), offset: c.2, length: c.3)
            let r = client.reply()
            #expect(r.map { $0 == (c.4, UInt64(100 + n)) } == true, "case \(n): \(String(describing: r))")
        }
        // A write past the end: its data is read and discarded, the error comes back.
        client.request(NBDProtocol.Command.write, cookie: 200, offset: 65536 - 100, length: 200, data: [UInt8](repeating: 1, count: 200))
        #expect(client.reply().map { $0 == (NBDProtocol.Errno.noSpace, 200) } == true)
        // A failing disk: EIO, not a dropped connection.
        storage.failWrites = true
        client.request(NBDProtocol.Command.write, cookie: 201, offset: 0, length: 4, data: [1, 2, 3, 4])
        #expect(client.reply().map { $0 == (NBDProtocol.Errno.io, 201) } == true)
        client.request(NBDProtocol.Command.read, cookie: 202, offset: 0, length: 4)
        #expect(client.reply().map { $0 == (0, 202) } == true)
        #expect(client.read(4) == Array(storage.bytes[0..<4]))

        let second = try TestClient(server)
        let ro = try #require(second.go("ro"))
        #expect(ro.flags & NBDProtocol.TransmissionFlag.readOnly != 0)
        second.request(NBDProtocol.Command.write, cookie: 1, offset: 0, length: 4, data: [9, 9, 9, 9])
        #expect(second.reply().map { $0 == (NBDProtocol.Errno.perm, 1) } == true)
        #expect(readOnly.bytes[0..<4] == MemoryStorage(size: 4).bytes[0..<4])
        #expect(server.statistics.violations == 0)
    }

    /// Many requests sent before any reply is read: each is answered once, with its own data.
    @Test func manyRequestsInFlight() throws {
        let storage = MemoryStorage(size: 1 << 20)
        let server = NBDServer(exports: ["": storage])
        let client = try TestClient(server)
        #expect(client.go("") != nil)
        for i in 0..<48 { client.request(NBDProtocol.Command.read, cookie: UInt64(i), offset: UInt64(i) * 4096, length: 4096) }
        var seen = Set<UInt64>()
        for _ in 0..<48 {
            let r = try #require(client.reply())
            #expect(r.error == 0)
            let data = try #require(client.read(4096))
            #expect(data == Array(storage.bytes[Int(r.cookie) * 4096..<Int(r.cookie + 1) * 4096]), "cookie \(r.cookie)")
            #expect(seen.insert(r.cookie).inserted, "cookie \(r.cookie) answered twice")
        }
        #expect(seen.count == 48)
    }

    /// Requests that arrive together are read with one call and answered with one; a reply held back is
    /// sent before the server waits for more, whatever the sizes (a payload larger than the read buffer,
    /// one split over two sends, a read reply larger than the socket takes at once).
    @Test func requestsInOneSendAndRepliesHeldBack() throws {
        let storage = MemoryStorage(size: 4 << 20)
        let server = NBDServer(exports: ["": storage])
        let client = try TestClient(server)
        #expect(client.go("") != nil)
        let small = (0..<4096).map { UInt8(truncatingIfNeeded: $0 ^ 0xA5) }
        let large = (0..<(100 << 10)).map { UInt8(truncatingIfNeeded: $0 &* 13) }
        // Two writes (one larger than half the read buffer), a read of the first, a FLUSH: one send.
        client.send(TestClient.message(NBDProtocol.Command.write, cookie: 1, offset: 0, length: 4096, data: small)
                    + TestClient.message(NBDProtocol.Command.write, cookie: 2, offset: 8192, length: UInt32(large.count), data: large)
                    + TestClient.message(NBDProtocol.Command.read, cookie: 3, offset: 0, length: 4096)
                    + TestClient.message(NBDProtocol.Command.flush, cookie: 4, offset: 0, length: 0))
        var seen: Set<UInt64> = []
        for _ in 0..<4 {
            let r = try #require(client.reply(), "every reply comes, none is held back for ever")
            #expect(r.error == 0, "cookie \(r.cookie)")
            if r.cookie == 3 { #expect(client.read(4096) == small) }
            seen.insert(r.cookie)
        }
        #expect(seen == [1, 2, 3, 4])
        #expect(Array(storage.bytes[8192..<(8192 + large.count)]) == large)
        // A write whose header and half its data come first, the rest 50 ms later.
        let split = TestClient.message(NBDProtocol.Command.write, cookie: 5, offset: 65536, length: 8192, data: large.prefix(8192).map { $0 })
        client.send(Array(split[..<(28 + 4096)]))
        usleep(50_000)
        client.send(Array(split[(28 + 4096)...]))
        #expect(client.reply().map { $0 == (0, 5) } == true)
        #expect(Array(storage.bytes[65536..<(65536 + 8192)]) == Array(large.prefix(8192)))
        // A 2 MiB read after a 4 KiB one, in one send: the large reply goes out in pieces.
        client.send(TestClient.message(NBDProtocol.Command.read, cookie: 6, offset: 0, length: 4096)
                    + TestClient.message(NBDProtocol.Command.read, cookie: 7, offset: 1 << 20, length: 2 << 20))
        for _ in 0..<2 {
            let r = try #require(client.reply())
            #expect(r.error == 0)
            let length = r.cookie == 7 ? 2 << 20 : 4096
            let offset = r.cookie == 7 ? 1 << 20 : 0
            #expect(client.read(length) == Array(storage.bytes[offset..<(offset + length)]), "cookie \(r.cookie)")
        }
        client.request(NBDProtocol.Command.disconnect, cookie: 8, offset: 0, length: 0)
        #expect(client.serverClosed())
        #expect(client.serverResult == nil)
    }

    @Test func optionsAndUnknownExports() throws {
        let server = NBDServer(exports: ["a": MemoryStorage(size: 4096), "b": MemoryStorage(size: 8192)])
        let client = try TestClient(server)
        _ = client.read(18)
        client.send([0, 0, 0, 3])
        client.option(NBDProtocol.Option.list, [])
        var names: [String] = []
        while let r = client.optionReply(), r.type == NBDProtocol.Reply.server {
            names.append(String(decoding: r.data[4...], as: UTF8.self))
        }
        #expect(names == ["a", "b"])
        var data = [UInt8]()
        data.appendBE(UInt32(1))
        data += Array("c".utf8)
        data.appendBE(UInt16(0))
        client.option(NBDProtocol.Option.go, data)
        #expect(client.optionReply()?.type == NBDProtocol.Reply.errUnknown)
        client.option(NBDProtocol.Option.structuredReply, [])
        #expect(client.optionReply()?.type == NBDProtocol.Reply.errUnsupported)
        client.option(NBDProtocol.Option.info, [0, 0, 0, 200, 0, 0])  // a name longer than the data
        #expect(client.optionReply()?.type == NBDProtocol.Reply.errInvalid)
        client.option(NBDProtocol.Option.abort, [])
        #expect(client.optionReply()?.type == NBDProtocol.Reply.ack)
        #expect(client.serverClosed())
    }

    /// Breaking the protocol ends the connection cleanly: bad magic, an oversized write, an oversized
    /// option, a client without fixed newstyle, an unknown export by EXPORT_NAME.
    @Test(arguments: ["request magic", "huge write", "huge option", "old client", "export name"])
    func protocolViolationsDisconnect(kind: String) throws {
        let server = NBDServer(exports: ["disk": MemoryStorage(size: 65536)])
        let client = try TestClient(server)
        switch kind {
        case "old client":
            _ = client.read(18)
            client.send([0, 0, 0, 0])
        case "huge option":
            _ = client.read(18)
            client.send([0, 0, 0, 3])
            client.option(NBDProtocol.Option.go, [])
            var m = [UInt8]()
            m.appendBE(NBDProtocol.optionMagic)
            m.appendBE(NBDProtocol.Option.go)
            m.appendBE(UInt32.max)
            client.send(m)
        case "export name":
            _ = client.read(18)
            client.send([0, 0, 0, 3])
            client.option(NBDProtocol.Option.exportName, Array("nope".utf8))
        default:
            #expect(client.go("disk") != nil)
            if kind == "request magic" {
                client.request(NBDProtocol.Command.read, cookie: 1, offset: 0, length: 512, magic: 0xdead_beef)
            } else {
                client.request(NBDProtocol.Command.write, cookie: 1, offset: 0, length: UInt32.max)
            }
        }
        // Whatever replies came first, the server then closes.
        var closed = false
        for _ in 0..<100 where !closed { closed = client.read(1) == nil }
        #expect(closed, "\(kind): the server closed the connection")
        #expect(client.done.wait(timeout: .now() + 5) == .success)
        #expect(client.serverResult != nil, "\(kind): reported as a violation")
    }

    /// Fencing on the replica: `NAME@N` is export NAME written by owner generation N; once a newer
    /// owner has connected, an older one's writes get EPERM (its reads still work).
    @Test func anOlderOwnerGenerationCannotWrite() throws {
        let storage = MemoryStorage(size: 65536)
        let server = NBDServer(exports: ["disk": storage])
        let old = try TestClient(server)
        #expect(old.go("disk@1") != nil)
        old.request(NBDProtocol.Command.write, cookie: 1, offset: 0, length: 4, data: [1, 1, 1, 1])
        #expect(old.reply().map { $0 == (0, 1) } == true, "generation 1 writes while it is the newest")
        let new = try TestClient(server)
        #expect(new.go("disk@2") != nil)
        #expect(server.generation(of: "disk") == 2)
        old.request(NBDProtocol.Command.write, cookie: 2, offset: 0, length: 4, data: [6, 6, 6, 6])
        #expect(old.reply().map { $0 == (NBDProtocol.Errno.perm, 2) } == true, "the stale owner is refused")
        old.request(NBDProtocol.Command.writeZeroes, cookie: 3, offset: 0, length: 512)
        #expect(old.reply().map { $0 == (NBDProtocol.Errno.perm, 3) } == true)
        old.request(NBDProtocol.Command.read, cookie: 4, offset: 0, length: 4)
        #expect(old.reply().map { $0 == (0, 4) } == true)
        #expect(old.read(4) == [1, 1, 1, 1], "the stale write did not land")
        new.request(NBDProtocol.Command.write, cookie: 5, offset: 0, length: 4, data: [2, 2, 2, 2])
        #expect(new.reply().map { $0 == (0, 5) } == true)
        // A client that names no generation counts as generation 0 once the export is fenced.
        let anonymous = try TestClient(server)
        #expect(anonymous.go("disk") != nil)
        anonymous.request(NBDProtocol.Command.write, cookie: 6, offset: 0, length: 4, data: [3, 3, 3, 3])
        #expect(anonymous.reply().map { $0 == (NBDProtocol.Errno.perm, 6) } == true)
        #expect(storage.bytes[0..<4] == [2, 2, 2, 2])
    }

    /// Random bytes after a good handshake, and as the handshake: the server never traps and always ends.
    @Test func fuzzedInputNeverTraps() throws {
        var generator = SystemRandomNumberGenerator()
        for round in 0..<200 {
            let server = NBDServer(exports: ["": MemoryStorage(size: 65536)])
            let client = try TestClient(server)
            if round % 2 == 0 { _ = client.go("") } else { _ = client.read(18) }
            let count = Int.random(in: 1...600, using: &generator)
            var junk = (0..<count).map { _ in UInt8.random(in: 0...255, using: &generator) }
            // Half the time start with a valid magic so that the fields behind it get exercised.
            if round % 4 < 2 && junk.count >= 4 { junk.replaceSubrange(0..<4, with: [0x25, 0x60, 0x95, 0x13]) }
            client.send(junk)
            shutdown(client.fd, Int32(SHUT_WR))
            #expect(client.done.wait(timeout: .now() + 10) == .success, "round \(round): the server ended")
        }
    }
}

import Foundation
import GodwitSystem
@testable import Migration
import Testing
#if canImport(Glibc)
import Glibc
#endif

// MARK: - Helpers

private let testKey = try! MigrationKey(hex: "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff")
private let otherKey = try! MigrationKey(hex: "ffeeddccbbaa99887766554433221100ffeeddccbbaa99887766554433221100")

/// Runs `body` on its own thread; `wait()` returns its result.
private final class Background<T>: @unchecked Sendable {
    private let done = DispatchSemaphore(value: 0)
    private var result: Result<T, Error>?

    init(_ body: @escaping () throws -> T) {
        Thread {
            self.result = Result(catching: body)
            self.done.signal()
        }.start()
    }

    func wait() -> Result<T, Error> {
        done.wait()
        return result!
    }
}

private func socketPair() throws -> (FileDescriptor, FileDescriptor) {
    var fds: [Int32] = [-1, -1]
    _ = try systemCall("socketpair") { socketpair(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0, &fds) }
    return (FileDescriptor(owning: fds[0]), FileDescriptor(owning: fds[1]))
}

/// A source and a target channel over a socketpair, with their raw sockets for injecting bytes.
private struct Pair {
    let source: MigrationChannel
    let target: MigrationChannel
    let sourceSocket: FileDescriptor
    let targetSocket: FileDescriptor

    init(timeout: Double = 5) throws {
        let (s, t) = try socketPair()
        let target = Background { try MigrationChannel(socket: t, role: .target, key: testKey, timeout: timeout) }
        source = try MigrationChannel(socket: s, role: .source, key: testKey, timeout: timeout)
        self.target = try target.wait().get()
        sourceSocket = s
        targetSocket = t
    }

    /// What the source sent, read raw (the target channel never sees it).
    func takeSent(_ count: Int) throws -> [UInt8] { try readRaw(targetSocket, count) }

    /// Bytes that appear to the target as if the source had sent them; `end` closes the source's side.
    func inject(_ bytes: [UInt8], end: Bool = true) throws {
        try sourceSocket.writeAll(bytes)
        if end { _ = Glibc.shutdown(sourceSocket.rawValue, Int32(SHUT_WR)) }
    }
}

private func readRaw(_ fd: FileDescriptor, _ count: Int) throws -> [UInt8] {
    var bytes = [UInt8](repeating: 0, count: count)
    var done = 0
    while done < count {
        let n = try bytes.withUnsafeMutableBytes { try fd.read(into: UnsafeMutableRawBufferPointer(rebasing: $0[done...])) }
        if n == 0 { break }
        done += n
    }
    return Array(bytes[..<done])
}

/// Everything until the peer closes (a reset, when it closed with bytes unread, counts as closing).
private func readToEnd(_ fd: FileDescriptor) throws -> [UInt8] {
    var all: [UInt8] = []
    while true {
        let chunk: [UInt8]
        do { chunk = try readRaw(fd, 65536) } catch let error as SystemError where error.errno == ECONNRESET { return all }
        all += chunk
        if chunk.count < 65536 { return all }
    }
}

/// The MigrationError `body` throws (nil, recorded as a failure, when it throws none or another type).
private func migrationError(_ body: () throws -> Void, sourceLocation: SourceLocation = #_sourceLocation) -> MigrationError? {
    do {
        try body()
        Issue.record("expected a MigrationError, nothing was thrown", sourceLocation: sourceLocation)
    } catch let error as MigrationError {
        return error
    } catch {
        Issue.record("expected a MigrationError, got \(error)", sourceLocation: sourceLocation)
    }
    return nil
}

private func le<T: FixedWidthInteger>(_ value: T) -> [UInt8] { withUnsafeBytes(of: value.littleEndian) { Array($0) } }

private func header(_ kind: UInt32, _ length: UInt64) -> [UInt8] { le(kind) + le(length) }

/// A page whose bytes are derived from its number.
private func pattern(_ page: UInt64) -> [UInt8] { (0..<4096).map { UInt8(truncatingIfNeeded: UInt64($0) &* 31 &+ page &* 7) } }

/// A small reproducible PRNG (splitmix64) for the fuzz test.
private struct SplitMix: RandomNumberGenerator {
    var state: UInt64
    mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
}

private struct Config: Codable, Equatable {
    var vcpus: Int
    var memoryMiB: Int
    var name: String
}

private func sendPatternPages(_ channel: MigrationChannel, _ numbers: [UInt64]) throws {
    let pages = numbers.map(pattern)
    try withExtendedLifetime(pages) {
        let buffers = pages.map { $0.withUnsafeBytes { $0 } }
        try channel.sendPages(zip(numbers, buffers).map { (pageNumber: $0, bytes: $1) })
    }
}

// MARK: - Tests

@Suite struct MigrationStreamTests {
    @Test func keyParsing() throws {
        let key = try MigrationKey(fileContents: "  00112233445566778899AABBCCDDEEFF\n")
        #expect(key.bytes == (0..<16).map { UInt8($0 * 0x11) })
        #expect(try MigrationKey(hex: key.hex) == key)
        #expect(!key.description.contains("0011"))
        for bad in ["", "  \n", "0011223344556677889", "00112233445566778899aabbccddeegg", String(repeating: "ab", count: 15),
                    String(repeating: "ab", count: 65), "0011 2233445566778899aabbccddeeff00"] {
            guard case .invalidKey? = migrationError({ _ = try MigrationKey(hex: bad) }) else {
                Issue.record("\(bad) was not refused as an invalid key")
                continue
            }
        }
        #expect(try MigrationKey.random().bytes.count == 32)
    }

    @Test func hmacMatchesRFC4231AndIncrementalUse() throws {
        // RFC 4231 test case 2.
        let tag = try HMAC.tag(key: Array("Jefe".utf8), Array("what do ya want ".utf8), Array("for nothing?".utf8))
        #expect(tag.map { String(format: "%02x", $0) }.joined() == "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843")
        let hmac = try HMAC(key: Array("Jefe".utf8))
        for _ in 0..<3 {
            try hmac.restart()
            try hmac.update(Array("what do ya want for ".utf8))
            try hmac.update(Array("nothing?".utf8))
            #expect(try hmac.finish() == tag)
        }
        #expect(HMAC.equal(tag, tag) && !HMAC.equal(tag, Array(tag.reversed())) && !HMAC.equal(tag, []))
    }

    @Test func handshakeAndEverySectionKindBothWays() throws {
        let pair = try Pair()
        #expect(pair.source.role == .source && pair.target.role == .target)
        let config = Config(vcpus: 2, memoryMiB: 128, name: "guest-ü")
        for (from, to) in [(pair.source, pair.target), (pair.target, pair.source)] {
            try from.send(json: config, kind: .config)
            #expect(try to.receiveJSON(Config.self, kind: .config) == config)
            try from.send(json: ["cpus": [1, 2]], kind: .state)
            #expect(try to.receive(expecting: [.state]).decodeJSON([String: [Int]].self) == ["cpus": [1, 2]])
            try from.send(json: ["sent": 5], kind: .progress)
            #expect(try to.receiveJSON([String: Int].self, kind: .progress) == ["sent": 5])
            try sendPatternPages(from, [7, 0, 7])
            var seen: [UInt64] = []
            try to.receive(expecting: [.pages]).forEachPage(pageLimit: 8) { number, bytes in
                #expect(Array(bytes) == pattern(number))
                seen.append(number)
            }
            #expect(seen == [7, 0, 7])
            try from.sendZeroPages([3, 1, 4])
            #expect(try to.receive().zeroPageNumbers(pageLimit: 5) == [3, 1, 4])
            for kind in [MigrationSectionKind.ready, .commit, .done] {
                try from.send(kind: kind)
                #expect(try to.receive() == MigrationSection(kind: kind, payload: []))
            }
            try from.sendAbort(reason: "disk full ✗")
            #expect(try to.receive().abortReason() == "disk full ✗")
        }
        #expect(pair.source.bytesSent == pair.target.bytesReceived)
        #expect(pair.target.bytesSent == pair.source.bytesReceived)
        #expect(pair.source.bytesSent > 76)
    }

    @Test func manyPagesAreSplitIntoSections() throws {
        // A generous time-out: a sanitized debug build on a busy machine checksums a full section slowly.
        let pair = try Pair(timeout: 60)
        let numbers = (0..<UInt64(2 * MigrationStream.maxPagesPerSection + 5)).map { ($0 * 7919) % 5000 }
        let zeros = (0..<UInt64(MigrationStream.maxZeroPagesPerSection + 3)).map { $0 % 5000 }
        let sender = Background {
            try sendPatternPages(pair.source, numbers)
            try pair.source.sendZeroPages(zeros)
            try pair.source.send(kind: .done)
        }
        var seen: [UInt64] = []
        var zeroSeen: [UInt64] = []
        var sections = 0
        while true {
            let section = try pair.target.receive(expecting: [.pages, .zeroPages, .done])
            sections += 1
            if section.kind == .done { break }
            if section.kind == .zeroPages { zeroSeen += try section.zeroPageNumbers(pageLimit: 5000); continue }
            try section.forEachPage(pageLimit: 5000) { number, bytes in
                if Array(bytes) != pattern(number) { Issue.record("page \(number) differs") }
                seen.append(number)
            }
        }
        try sender.wait().get()
        #expect(seen == numbers && zeroSeen == zeros)
        #expect(sections == 3 + 2 + 1)
    }

    @Test func wrongKeyIsRefusedBySourceAndTarget() throws {
        let (s, t) = try socketPair()
        let target = Background { try MigrationChannel(socket: t, role: .target, key: testKey, timeout: 5) }
        #expect(migrationError { _ = try MigrationChannel(socket: s, role: .source, key: otherKey, timeout: 5) } == .handshakeRefused)
        #expect(migrationError { _ = try target.wait().get() } == .authenticationFailed(peer: .source))
    }

    @Test func impostorTargetIsRefusedBeforeAnySection() throws {
        let (s, t) = try socketPair()
        let source = Background { try MigrationChannel(socket: s, role: .source, key: testKey, timeout: 5) }
        try t.writeAll(MigrationStream.magic + le(UInt32(1)) + [UInt8](repeating: 9, count: 32))
        #expect(try readRaw(t, 76).count == 76)
        try t.writeAll([UInt8](repeating: 0x5A, count: 32))  // a guessed proof
        #expect(migrationError { _ = try source.wait().get() } == .authenticationFailed(peer: .target))
        #expect(try readToEnd(t).isEmpty)  // the source sent nothing more and closed
    }

    @Test func badMagicAndVersionAreRefusedOnBothSides() throws {
        let hello = MigrationStream.magic + le(UInt32(1)) + [UInt8](repeating: 1, count: 32)
        let cases: [([UInt8], MigrationError)] = [
            (Array("GET / HT".utf8) + le(UInt32(1)), .badMagic(Array("GET / HT".utf8))),
            (MigrationStream.magic + le(UInt32(2)), .unsupportedVersion(2)),
        ]
        for (bytes, expected) in cases {
            // The source receives a bad hello.
            var (s, t) = try socketPair()
            try t.writeAll(bytes + [UInt8](repeating: 0, count: 32))
            #expect(migrationError { _ = try MigrationChannel(socket: s, role: .source, key: testKey, timeout: 5) } == expected)
            #expect(try readToEnd(t).isEmpty)  // it answered nothing and closed
            // The target receives a bad answer.
            (s, t) = try socketPair()
            try s.writeAll(bytes + [UInt8](repeating: 0, count: 64))
            #expect(migrationError { _ = try MigrationChannel(socket: t, role: .target, key: testKey, timeout: 5) } == expected)
            #expect(try readRaw(s, hello.count).count == hello.count)  // its hello (then it closes)
        }
    }

    @Test func pageDecoderRejectsOutOfRangeAndLyingCounts() throws {
        let pair = try Pair()
        try sendPatternPages(pair.source, [1, 100])
        var delivered = 0
        #expect(migrationError { try pair.target.receive().forEachPage(pageLimit: 100) { _, _ in delivered += 1 } } == .pageOutOfRange(100, limit: 100))
        #expect(delivered == 0)  // nothing is delivered from a bad batch
        try pair.source.sendZeroPages([5, UInt64.max])
        #expect(migrationError { _ = try pair.target.receive().zeroPageNumbers(pageLimit: 10) } == .pageOutOfRange(UInt64.max, limit: 10))

        let onePage = le(UInt64(1)) + pattern(1)
        try pair.source.send(kind: .pages, payload: le(UInt32(2)) + onePage)  // claims two pages, carries one
        #expect(migrationError { try pair.target.receive().forEachPage(pageLimit: 10) { _, _ in } }
                == .pageCountMismatch(kind: .pages, count: 2, length: 4 + 4104))
        try pair.source.send(kind: .pages, payload: le(UInt32(1)) + onePage + [0])  // one byte too many
        #expect(migrationError { try pair.target.receive().forEachPage(pageLimit: 10) { _, _ in } }
                == .pageCountMismatch(kind: .pages, count: 1, length: 4 + 4104 + 1))
        try pair.source.send(kind: .pages, payload: le(UInt32(0xFFFF_FFFF)))
        #expect(migrationError { try pair.target.receive().forEachPage(pageLimit: 10) { _, _ in } }
                == .pageCountMismatch(kind: .pages, count: 0xFFFF_FFFF, length: 4))
        try pair.source.send(kind: .zeroPages, payload: [1, 0])
        #expect(migrationError { _ = try pair.target.receive().zeroPageNumbers(pageLimit: 10) }
                == .malformedSection(kind: .zeroPages, reason: "2 bytes, no count"))
        try pair.source.send(kind: .zeroPages, payload: le(UInt32(1)) + [1, 2, 3])
        #expect(migrationError { _ = try pair.target.receive().zeroPageNumbers(pageLimit: 10) }
                == .pageCountMismatch(kind: .zeroPages, count: 1, length: 7))
        try pair.source.send(kind: .config, payload: Array("{\"vcpus\":".utf8))
        guard case .invalidJSON(kind: .config, _)? = migrationError({ _ = try pair.target.receiveJSON(Config.self, kind: .config) }) else {
            Issue.record("truncated JSON was not refused")
            return
        }
        try pair.source.send(kind: .abort, payload: [0xFF, 0xFE])
        #expect(migrationError { _ = try pair.target.receive().abortReason() } == .malformedSection(kind: .abort, reason: "reason is not UTF-8"))
        #expect(migrationError { try pair.source.sendPages([(pageNumber: 3, bytes: UnsafeRawBufferPointer(start: nil, count: 0))]) }
                == .badPageSize(pageNumber: 3, size: 0))
        #expect(migrationError { try pair.source.send(json: 1, kind: .pages) } == .malformedSection(kind: .pages, reason: "not a JSON section"))
        #expect(migrationError { try pair.source.send(kind: .config, payload: [UInt8](repeating: 0x20, count: 65537)) }
                == .sectionTooLarge(kind: .config, length: 65537, limit: 65536))
    }

    @Test func unexpectedSectionsAndAborts() throws {
        let pair = try Pair()
        try pair.source.sendAbort(reason: "out of memory")
        #expect(migrationError { _ = try pair.target.receive(expecting: [.ready]) } == .peerAborted(reason: "out of memory"))
        try pair.source.send(kind: .done)
        #expect(migrationError { _ = try pair.target.receive(expecting: [.ready, .commit]) } == .unexpectedSection(.done, expected: [.ready, .commit]))
    }

    @Test func oversizedAndUnknownSectionsAreRefusedBeforeThePayload() throws {
        let cases: [([UInt8], MigrationError)] = [
            (header(2, 4 << 20 + 1), .sectionTooLarge(kind: .pages, length: 4 << 20 + 1, limit: 4 << 20)),
            (header(1, UInt64.max), .sectionTooLarge(kind: .config, length: UInt64.max, limit: 65536)),
            (header(5, 1), .sectionTooLarge(kind: .ready, length: 1, limit: 0)),
            (header(0, 0), .unknownSectionKind(0)),
            (header(99, 8), .unknownSectionKind(99)),
        ]
        for (bytes, expected) in cases {
            let pair = try Pair()
            try pair.inject(bytes, end: false)  // no payload follows: the header alone must be refused
            #expect(migrationError { _ = try pair.target.receive() } == expected)
            #expect(migrationError { _ = try pair.target.receive() } == expected)  // and the channel stays failed
        }
    }

    @Test func everyFlippedByteOfASectionIsRefused() throws {
        let payload = Array("{\"sent\":1}".utf8)
        let length = 12 + payload.count + 32
        for index in -1..<length {
            let pair = try Pair()
            try pair.source.send(kind: .progress, payload: payload)
            var bytes = try pair.takeSent(length)
            if index < 0 {  // control: the untouched section goes through
                try pair.inject(bytes)
                #expect(try pair.target.receive() == MigrationSection(kind: .progress, payload: payload))
                continue
            }
            bytes[index] ^= 0x10
            try pair.inject(bytes)
            let error = migrationError { _ = try pair.target.receive() }
            switch index {
            case 0..<4: #expect(error == .unknownSectionKind(UInt32(MigrationSectionKind.progress.rawValue ^ (0x10 << (8 * UInt32(index))))))
            case 4..<12: #expect(error != nil)  // a longer length runs into the end of the stream or the limit
            default: #expect(error == .badTag(sequence: 0), "byte \(index)")
            }
        }
        // A shorter length field (the payload boundary moves) fails the tag too.
        let pair = try Pair()
        try pair.source.send(kind: .progress, payload: payload)
        var bytes = try pair.takeSent(length)
        bytes[4] -= 1
        try pair.inject(bytes)
        #expect(migrationError { _ = try pair.target.receive() } == .badTag(sequence: 0))
    }

    @Test func replayedReorderedAndTruncatedSectionsAreRefused() throws {
        func twoSections(_ pair: Pair) throws -> ([UInt8], [UInt8]) {
            try pair.source.send(kind: .ready)
            try pair.source.send(kind: .ready)
            return (try pair.takeSent(44), try pair.takeSent(44))
        }
        var pair = try Pair()
        var (a, b) = try twoSections(pair)
        try pair.inject(b + a)  // reordered
        #expect(migrationError { _ = try pair.target.receive() } == .badTag(sequence: 0))

        pair = try Pair()
        (a, b) = try twoSections(pair)
        try pair.inject(a + a)  // replayed
        #expect(try pair.target.receive().kind == .ready)
        #expect(migrationError { _ = try pair.target.receive() } == .badTag(sequence: 1))

        for cut in [0, 5, 12, 20, 43] {
            pair = try Pair()
            (a, b) = try twoSections(pair)
            try pair.inject(Array(a.prefix(cut)))
            #expect(migrationError { _ = try pair.target.receive() } == .peerClosed, "cut at \(cut)")
        }
    }

    @Test func mutatedStreamsAlwaysEndInAMigrationError() throws {
        // Record what a source sends to a target whose nonce is fixed, acting as that target by hand.
        let nonce = [UInt8](repeating: 0xA5, count: 32)
        let (s, t) = try socketPair()
        let started = Background { try MigrationChannel(socket: s, role: .source, key: testKey, timeout: 5) }
        try t.writeAll(MigrationStream.magic + le(UInt32(1)) + nonce)
        let answer = try readRaw(t, 76)
        try t.writeAll(try HMAC.tag(key: testKey.bytes, MigrationStream.targetProofLabel, Array(answer[12..<44]), nonce))
        let source = try started.wait().get()
        var headers: [Int] = []  // where each section starts in the recording
        func note(_ send: () throws -> Void) throws { headers.append(Int(source.bytesSent)); try send() }
        try note { try source.send(json: Config(vcpus: 1, memoryMiB: 1, name: "fuzz"), kind: .config) }
        try note { try sendPatternPages(source, [3, 1, 2]) }
        try note { try source.sendZeroPages([0, 4, 5]) }
        try note { try source.send(json: ["rip": 4096], kind: .state) }
        try note { try source.send(kind: .ready) }
        try note { try source.sendAbort(reason: "not really") }
        try note { try source.send(kind: .done) }
        let offset = Int(source.bytesSent)
        source.shutdown()
        let original = answer + (try readToEnd(t))
        #expect(original.count == offset)

        /// Feeds `stream` to a target; true when it is accepted whole (sections up to done, then a clean end).
        func replay(_ stream: [UInt8]) throws -> Bool {
            let (feeder, socket) = try socketPair()
            try feeder.writeAll(stream)
            _ = Glibc.shutdown(feeder.rawValue, Int32(SHUT_WR))
            do {
                let target = try MigrationChannel(socket: socket, role: .target, key: testKey, timeout: 5, nonce: nonce)
                while true {
                    let section = try target.receive()
                    switch section.kind {
                    case .config: _ = try section.decodeJSON(Config.self)
                    case .pages: try section.forEachPage(pageLimit: 8) { _, bytes in _ = bytes.count }
                    case .zeroPages: _ = try section.zeroPageNumbers(pageLimit: 8)
                    case .state, .progress: _ = try section.decodeJSON([String: Int].self)
                    case .abort: _ = try section.abortReason()
                    case .ready, .commit: break
                    case .done:
                        guard case .peerClosed? = migrationError({ _ = try target.receive() }) else { return false }
                        return true
                    }
                }
            } catch is MigrationError {
                return false
            }
        }
        #expect(try replay(original))

        var rng = SplitMix(state: 0x60D_317)
        let interesting: [UInt64] = [0, 1, 11, 12, 4095, 4096, 65536, 65537, 4 << 20, 0xFFFF_FFFF, UInt64.max]
        var accepted = 0
        for _ in 0..<2000 {
            var stream = original
            switch rng.next() % 5 {
            case 0:  // flip bytes
                for _ in 0...(rng.next() % 4) { stream[Int(rng.next() % UInt64(stream.count))] ^= UInt8(1 + rng.next() % 255) }
            case 1:  // truncate
                stream.removeLast(1 + Int(rng.next() % UInt64(stream.count)))
            case 2:  // a lying length in a real section header
                let at = headers[Int(rng.next() % UInt64(headers.count))] + 4
                let value = rng.next() % 2 == 0 ? interesting[Int(rng.next() % UInt64(interesting.count))] : rng.next() % 20000
                stream.replaceSubrange(at..<(at + 8), with: le(value))
            case 3:  // splice: a copy of one range inserted elsewhere
                let from = Int(rng.next() % UInt64(stream.count))
                let range = from..<min(stream.count, from + 1 + Int(rng.next() % 64))
                let piece = Array(stream[range])
                stream.insert(contentsOf: piece, at: Int(rng.next() % UInt64(stream.count)))
            default:  // splice: a range removed
                let from = Int(rng.next() % UInt64(stream.count))
                stream.removeSubrange(from..<min(stream.count, from + 1 + Int(rng.next() % 64)))
            }
            if stream == original { continue }
            if try replay(stream) { accepted += 1 }
        }
        #expect(accepted == 0)
    }

    @Test func tcpConnectAcceptOnLoopback() throws {
        let listener = try MigrationChannel.listen(host: "127.0.0.1", port: 0)
        defer { listener.close() }
        #expect(listener.port != 0)
        // A source with the wrong key: accept throws, the listener keeps listening.
        let refused = Background { try listener.accept(key: testKey, timeout: 5, waitForConnection: 10) }
        #expect(migrationError { _ = try MigrationChannel.connect(host: "127.0.0.1", port: listener.port, key: otherKey, timeout: 5) } == .handshakeRefused)
        #expect(migrationError { _ = try refused.wait().get() } == .authenticationFailed(peer: .source))

        let accepted = Background { try listener.accept(key: testKey, timeout: 5, waitForConnection: 10) }
        let source = try MigrationChannel.connect(host: "localhost", port: listener.port, key: testKey, timeout: 5)
        let target = try accepted.wait().get()
        try source.send(json: Config(vcpus: 4, memoryMiB: 512, name: "tcp"), kind: .config)
        #expect(try target.receiveJSON(Config.self, kind: .config).vcpus == 4)
        try target.send(kind: .ready)
        #expect(try source.receive().kind == .ready)
        #expect(source.bytesSent == target.bytesReceived && target.bytesSent == source.bytesReceived)
        source.close()
        #expect(migrationError { _ = try target.receive() } == .peerClosed)

        // Nobody listening: a clear system error, not a hang.
        let closed = try MigrationChannel.listen(host: "127.0.0.1", port: 0)
        let port = closed.port
        closed.close()
        guard case .system(let error)? = migrationError({ _ = try MigrationChannel.connect(host: "127.0.0.1", port: port, key: testKey, timeout: 2) }) else {
            Issue.record("connecting to a closed port did not fail with a system error")
            return
        }
        #expect(error.errno == ECONNREFUSED)
        #expect(migrationError { _ = try listener.accept(key: testKey, timeout: 1, waitForConnection: 0.1) }
                == .timedOut(operation: "waiting for a migration connection (nothing for 0.1 s)"))
    }

    @Test func silentPeersTimeOut() throws {
        // A target that never says hello.
        let (s, t) = try socketPair()
        let start = BandwidthLimiter.monotonicSeconds()
        guard case .timedOut? = migrationError({ _ = try MigrationChannel(socket: s, role: .source, key: testKey, timeout: 0.2) }) else {
            Issue.record("a silent target did not time out")
            return
        }
        #expect(BandwidthLimiter.monotonicSeconds() - start < 3)
        withExtendedLifetime(t) {}  // the silent peer stayed open all along
        // A peer that stops sending mid-stream, and one that stops reading.
        let pair = try Pair()
        pair.source.timeout = 0.2
        pair.target.timeout = 0.2
        try pair.inject(header(9, 10), end: false)
        #expect(migrationError { _ = try pair.target.receive() } == .timedOut(operation: "receiving a progress section (nothing for 0.2 s)"))
        guard case .timedOut? = migrationError({ for _ in 0..<100 { try sendPatternPages(pair.source, Array(0..<64)) } }) else {
            Issue.record("a peer that does not read did not time the sender out")
            return
        }
    }

    @Test func limiterArithmeticWithAFakeClock() {
        final class Clock: @unchecked Sendable { var now = 0.0 }
        let clock = Clock()
        let limiter = BandwidthLimiter(bytesPerSecond: 1000, now: { clock.now }, sleep: { clock.now += $0 })
        #expect(limiter.burstBytes == 50)
        #expect(limiter.acquire(upTo: 50) == 50 && clock.now == 0)  // starts with a full bucket
        #expect(limiter.acquire(upTo: 50) == 50 && abs(clock.now - 0.05) < 1e-9)  // then waits for the tokens
        #expect(limiter.acquire(upTo: 500) == 50 && abs(clock.now - 0.1) < 1e-9)  // never more than a bucket
        #expect(limiter.acquire(upTo: 10) == 10 && abs(clock.now - 0.11) < 1e-9)
        limiter.bytesPerSecond = nil
        #expect(limiter.acquire(upTo: 1 << 30) == 1 << 30 && abs(clock.now - 0.11) < 1e-9)

        // Random demand at 1 MB/s for 10 s, then 100 kB/s: every 1-second window stays within 5%.
        func worstWindow(_ grants: [(Double, Int)], from: Int, rate: Double) -> Double {
            var worst = 0.0
            for (i, g) in grants.enumerated() where i >= from {
                let total = grants[i...].prefix { $0.0 < g.0 + 1 }.reduce(0) { $0 + $1.1 }
                worst = max(worst, Double(total) / rate)
            }
            return worst
        }
        var rng = SplitMix(state: 42)
        var grants: [(Double, Int)] = []
        limiter.bytesPerSecond = 1_000_000
        let start = clock.now
        var switched = 0
        while clock.now < start + 15 {
            if clock.now >= start + 10 && limiter.bytesPerSecond == 1_000_000 {
                limiter.bytesPerSecond = 100_000
                switched = grants.count  // grants from here on are at the new rate
            }
            var wanted = 1 + Int(rng.next() % 200_000)
            while wanted > 0 {
                let granted = limiter.acquire(upTo: wanted)
                #expect(granted >= 1 && granted <= limiter.burstBytes)
                grants.append((clock.now, granted))
                wanted -= granted
            }
            if rng.next() % 10 == 0 { clock.now += Double(rng.next() % 100) / 1000 }  // idle now and then
        }
        let fast = worstWindow(grants.filter { $0.0 < start + 9 }, from: 0, rate: 1_000_000)
        let slow = worstWindow(grants, from: switched, rate: 100_000)
        #expect(fast <= 1.05 && fast > 0.9, "worst 1 s window at 1 MB/s: \(fast)")
        #expect(slow <= 1.05 && slow > 0.9, "worst 1 s window at 100 kB/s: \(slow)")
        let firstTen = grants.filter { $0.0 < start + 10 }.reduce(0) { $0 + $1.1 }
        #expect(Double(firstTen) <= 10 * 1_000_000 * 1.005 + 50_000)
    }

    @Test func bandwidthCapOverASocketpair() throws {
        let rate = 40_000_000 / 8  // 40 Mbit/s
        let pair = try Pair()
        for (fd, option) in [(pair.sourceSocket, SO_SNDBUF), (pair.targetSocket, SO_RCVBUF)] {
            var size: Int32 = 64 << 10
            _ = setsockopt(fd.rawValue, SOL_SOCKET, option, &size, socklen_t(MemoryLayout<Int32>.size))
        }
        pair.source.maxBytesPerSecond = UInt64(rate)
        let batches = 38  // 38 × 64 pages ≈ 10 MB ≈ 2 s
        let expected = batches * (12 + 4 + 64 * 4104 + 32)
        let receiver = Background { () -> [(Double, Int)] in
            var samples: [(Double, Int)] = [(BandwidthLimiter.monotonicSeconds(), 0)]
            var buffer = [UInt8](repeating: 0, count: 1 << 20)
            var total = 0
            while total < expected {
                let n = try buffer.withUnsafeMutableBytes { try pair.targetSocket.read(into: $0) }
                if n == 0 { break }
                total += n
                samples.append((BandwidthLimiter.monotonicSeconds(), total))
            }
            return samples
        }
        for batch in 0..<batches { try sendPatternPages(pair.source, (0..<64).map { UInt64(batch * 64 + $0) }) }
        let samples = try receiver.wait().get()
        #expect(samples.last!.1 == expected)
        var worst = 0
        for (i, s) in samples.enumerated() {
            let end = samples[i...].last { $0.0 <= s.0 + 1 }!
            worst = max(worst, end.1 - s.1)
        }
        let elapsed = samples.last!.0 - samples.first!.0
        let average = Double(expected) / elapsed
        // The upper bound only: the limiter must never exceed its cap. How close it gets to the cap is a
        // matter of wall-clock speed (a loaded host, a sanitizer build): the fake-clock test above checks it.
        #expect(Double(worst) <= 1.10 * Double(rate), "worst 1 s window \(worst) bytes, cap \(rate); average \(average) bytes/s")
    }
}

// MARK: - The format at rest (snapshot files)

@Suite("Migration file format")
struct MigrationFileTests {
    let sections = [MigrationSection(kind: .config, payload: Array(#"{"cpus":2}"#.utf8)),
                    MigrationSection(kind: .state, payload: Array(repeating: 0x5A, count: 300))]

    @Test func roundTrip() throws {
        let bytes = try MigrationFile.encode(sections)
        #expect(Array(bytes[0..<8]) == MigrationStream.magic)
        #expect(try MigrationFile.decode(bytes) == sections)
        #expect(try MigrationFile.decode(try MigrationFile.encode([])) == [])
    }

    /// Every truncation and every single flipped bit is an error, never a trap or a different file.
    @Test func everyTruncationAndFlipIsRefused() throws {
        let bytes = try MigrationFile.encode(sections)
        for length in 0..<bytes.count {
            #expect(throws: MigrationError.self) { try MigrationFile.decode(Array(bytes[0..<length])) }
        }
        for index in bytes.indices {
            for bit in [0, 3, 7] {
                var damaged = bytes
                damaged[index] ^= UInt8(1 << bit)
                #expect(throws: MigrationError.self, "byte \(index) bit \(bit)") { try MigrationFile.decode(damaged) }
            }
        }
    }

    @Test func lyingLengthsAndTrailingBytesAreRefused() throws {
        var bytes = try MigrationFile.encode(sections)
        #expect(throws: MigrationError.self) { try MigrationFile.decode(bytes + [0]) }
        // The first section's length (after the 20-byte header and its 4-byte kind) set past the end,
        // and past the kind's limit.
        for length in [UInt64(bytes.count), UInt64.max, UInt64(Int.max)] {
            withUnsafeBytes(of: length.littleEndian) { for (i, b) in $0.enumerated() { bytes[MigrationFile.headerLength + 4 + i] = b } }
            #expect(throws: MigrationError.self) { try MigrationFile.decode(bytes) }
        }
        // A wire stream is not a file (another label), and an unknown version is refused.
        var other = try MigrationFile.encode(sections)
        other[12] ^= 1
        #expect(throws: MigrationError.self) { try MigrationFile.decode(other) }
        var version = try MigrationFile.encode(sections)
        version[8] = 2
        #expect(throws: MigrationError.self) { try MigrationFile.decode(version) }
    }

    @Test func sectionsThatAreTooLargeAreNotWritten() {
        #expect(throws: MigrationError.self) {
            try MigrationFile.encode([MigrationSection(kind: .config, payload: Array(repeating: 0, count: 64 << 10 + 1))])
        }
    }
}

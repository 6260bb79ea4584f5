import Foundation
import GodwitSystem
#if canImport(Glibc)
import Glibc
#endif

/// A TCP relay between a migration source and its target on loopback that damages the stream the way
/// a network or an attacker would: flips a byte, cuts the connection, lies about a section's length, or
/// silently stops forwarding (a cut link: no FIN, no RST) just before or just after a given section.
///
/// It follows the wire format (a 76-byte handshake each way, then sections of a 12-byte header
/// — kind u32, length u64 — the payload and a 32-byte tag) so that cuts land exactly at a section
/// boundary, and it records the source's sections (kind and payload, up to `recordLimit` bytes each).
public final class MigrationProxy: @unchecked Sendable {
    /// What the relay does to the stream; offsets count the source's bytes from the first.
    public enum Fault: Sendable, CustomStringConvertible {
        /// Forward everything unchanged.
        case none
        /// Invert one byte of the source's stream.
        case flipByte(at: Int)
        /// Close both connections once this many of the source's bytes have passed.
        case truncate(at: Int)
        /// Add `by` to the length field of the source's `section`-th section (0 is the first after the
        /// handshake); the bytes that follow are unchanged, so the receiver reads past the section.
        case growLength(section: Int, by: UInt64)
        /// Stop forwarding both ways, keeping both connections open, when a section of `kind` is about
        /// to pass in the given direction (it does not arrive).
        case cutBefore(kind: UInt32, fromSource: Bool)
        /// As `cutBefore`, but after the section has passed whole.
        case cutAfter(kind: UInt32, fromSource: Bool)

        public var description: String {
            switch self {
            case .none: return "none"
            case .flipByte(let at): return "flip byte \(at)"
            case .truncate(let at): return "truncate at \(at)"
            case .growLength(let section, let delta): return "section \(section) length + \(delta)"
            case .cutBefore(let kind, let fromSource): return "cut before kind \(kind) from the \(fromSource ? "source" : "target")"
            case .cutAfter(let kind, let fromSource): return "cut after kind \(kind) from the \(fromSource ? "source" : "target")"
            }
        }
    }

    /// Migration section kinds (Migration's `MigrationSectionKind` raw values).
    public enum Kind {
        public static let config: UInt32 = 1
        public static let pages: UInt32 = 2
        public static let state: UInt32 = 4
        public static let ready: UInt32 = 5
        public static let commit: UInt32 = 6
        public static let done: UInt32 = 8
        public static let progress: UInt32 = 9
    }

    static let handshakeLength = 76
    static let headerLength = 12
    static let tagLength = 32

    public let port: UInt16
    public let fault: Fault
    public let recordLimit: Int
    private let targetPort: UInt16
    private let listener: Int32
    private let lock = NSLock()
    private var sockets: [Int32] = []
    private var sourceSections: [(kind: UInt32, payload: [UInt8])] = []
    private var cut = false
    private var closed = false
    private var timeline: [(seconds: Double, bytes: Int)] = []

    /// Listens on 127.0.0.1 (a free port) and relays each connection to 127.0.0.1:`targetPort`.
    public init(targetPort: UInt16, fault: Fault, recordLimit: Int = 1 << 20) throws {
        self.targetPort = targetPort
        self.fault = fault
        self.recordLimit = recordLimit
        let listener = socket(AF_INET, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard listener >= 0 else { throw TestFailure("socket: errno \(errno)") }
        var address = sockaddr_in()
        address.sin_family = sa_family_t(AF_INET)
        address.sin_addr.s_addr = inet_addr("127.0.0.1")
        var length = socklen_t(MemoryLayout<sockaddr_in>.size)
        let bound = withUnsafePointer(to: &address) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(listener, $0, length) } }
        guard bound == 0, Glibc.listen(listener, 8) == 0 else { close(listener); throw TestFailure("bind/listen: errno \(errno)") }
        _ = withUnsafeMutablePointer(to: &address) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(listener, $0, &length) } }
        port = UInt16(bigEndian: address.sin_port)
        self.listener = listener
        detachThread(name: "proxy-accept") { [self] in acceptLoop() }
    }

    deinit { stop() }

    /// `tcp:127.0.0.1:PORT` of the relay, for `destination_url`.
    public var url: String { "tcp:127.0.0.1:\(port)" }

    /// The sections the source sent so far (payloads cut at `recordLimit`).
    public var recordedSections: [(kind: UInt32, payload: [UInt8])] { lock.withLock { sourceSections } }

    /// When the source's bytes arrived: each read, with its time (monotonic seconds) and size.
    public var sourceTimeline: [(seconds: Double, bytes: Int)] { lock.withLock { timeline } }

    /// The most of the source's bytes that arrived in any `window`-second interval (sliding over each
    /// arrival), and the average rate from the first byte to the last, in bytes per second.
    public func sourceRate(window: Double = 1) -> (peakWindowBytes: Int, averageBytesPerSecond: Double) {
        let events = sourceTimeline
        guard let first = events.first, let last = events.last, last.seconds > first.seconds else { return (0, 0) }
        var peak = 0, sum = 0, start = 0
        for event in events {
            sum += event.bytes
            while events[start].seconds <= event.seconds - window {
                sum -= events[start].bytes
                start += 1
            }
            peak = max(peak, sum)
        }
        let total = events.reduce(0) { $0 + $1.bytes }
        return (peak, Double(total - first.bytes) / (last.seconds - first.seconds))
    }

    /// Whether a cut fault has fired.
    public var hasCut: Bool { lock.withLock { cut } }

    /// Closes the listener and every relayed connection.
    public func stop() {
        let all: [Int32] = lock.withLock {
            if closed { return [] }
            closed = true
            defer { sockets.removeAll() }
            return sockets + [listener]
        }
        for fd in all {
            Glibc.shutdown(fd, Int32(SHUT_RDWR))
            close(fd)
        }
    }

    private func acceptLoop() {
        while true {
            let client = accept(listener, nil, nil)
            if client < 0 {
                if errno == EINTR { continue }
                return
            }
            let server = socket(AF_INET, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
            var address = sockaddr_in()
            address.sin_family = sa_family_t(AF_INET)
            address.sin_addr.s_addr = inet_addr("127.0.0.1")
            address.sin_port = targetPort.bigEndian
            let connected = withUnsafePointer(to: &address) {
                $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(server, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
            }
            let keep = lock.withLock { () -> Bool in
                if closed { return false }
                sockets += [client, server]
                return true
            }
            guard keep, connected == 0 else {
                close(client)
                close(server)
                if !keep { return }
                continue
            }
            detachThread(name: "proxy-out") { [self] in pump(from: client, to: server, fromSource: true) }
            detachThread(name: "proxy-back") { [self] in pump(from: server, to: client, fromSource: false) }
        }
    }

    /// The parser of one direction: where the current section is and what it is.
    private struct Parser {
        var handshakeLeft = MigrationProxy.handshakeLength
        var header: [UInt8] = []
        var bodyLeft = 0
        var payloadLeft = 0
        var kind: UInt32 = 0
        var sections = 0
        var payload: [UInt8] = []
    }

    private func pump(from input: Int32, to output: Int32, fromSource: Bool) {
        var parser = Parser()
        var offset = 0
        var buffer = [UInt8](repeating: 0, count: 65536)
        defer {
            // A connection that ends (not one that is cut) ends both ways, as TCP would.
            if !lock.withLock({ cut }) { Glibc.shutdown(output, Int32(SHUT_WR)) }
        }
        while true {
            let n = buffer.withUnsafeMutableBytes { read(input, $0.baseAddress, $0.count) }
            if n < 0 && errno == EINTR { continue }
            if n <= 0 { return }
            var chunk = Array(buffer[0..<n])
            if fromSource {
                var now = timespec()
                clock_gettime(CLOCK_MONOTONIC, &now)
                let at = Double(now.tv_sec) + Double(now.tv_nsec) / 1e9
                lock.withLock { timeline.append((at, n)) }
            }
            if lock.withLock({ cut }) { continue }  // a cut link: swallow everything, answer nothing
            if fromSource {
                if case .flipByte(let at) = fault, at >= offset, at < offset + n { chunk[at - offset] ^= 0xFF }
                if case .truncate(let at) = fault, offset + n >= at {
                    let keep = max(0, at - offset)
                    _ = writeAll(output, Array(chunk[0..<keep]))
                    Glibc.shutdown(input, Int32(SHUT_RDWR))
                    Glibc.shutdown(output, Int32(SHUT_RDWR))
                    return
                }
            }
            offset += n
            var out: [UInt8] = []
            var stopAfterWrite = false
            var i = 0
            while i < chunk.count && !stopAfterWrite {
                if parser.handshakeLeft > 0 {
                    let take = min(parser.handshakeLeft, chunk.count - i)
                    out += chunk[i..<(i + take)]
                    parser.handshakeLeft -= take
                    i += take
                } else if parser.bodyLeft == 0 {
                    let take = min(MigrationProxy.headerLength - parser.header.count, chunk.count - i)
                    parser.header += chunk[i..<(i + take)]
                    i += take
                    guard parser.header.count == MigrationProxy.headerLength else { continue }
                    let kind = parser.header.withUnsafeBytes { UInt32(littleEndian: $0.loadUnaligned(fromByteOffset: 0, as: UInt32.self)) }
                    let length = parser.header.withUnsafeBytes { UInt64(littleEndian: $0.loadUnaligned(fromByteOffset: 4, as: UInt64.self)) }
                    if case .cutBefore(let cutKind, let cutFromSource) = fault, cutKind == kind, cutFromSource == fromSource {
                        _ = writeAll(output, out)
                        lock.withLock { cut = true }
                        out = []
                        break
                    }
                    if fromSource, case .growLength(let section, let delta) = fault, section == parser.sections {
                        withUnsafeBytes(of: (length &+ delta).littleEndian) { bytes in
                            for (j, byte) in bytes.enumerated() { parser.header[4 + j] = byte }
                        }
                    }
                    out += parser.header
                    parser.header = []
                    parser.kind = kind
                    // The true stream goes on with the length the sender wrote.
                    parser.payloadLeft = Int(clamping: length)
                    parser.bodyLeft = parser.payloadLeft &+ MigrationProxy.tagLength
                    parser.payload = []
                } else {
                    let take = min(parser.bodyLeft, chunk.count - i)
                    out += chunk[i..<(i + take)]
                    let payloadPart = min(take, parser.payloadLeft)
                    if fromSource && parser.payload.count < recordLimit {
                        parser.payload += chunk[i..<(i + min(payloadPart, recordLimit - parser.payload.count))]
                    }
                    parser.payloadLeft -= payloadPart
                    parser.bodyLeft -= take
                    i += take
                    if parser.bodyLeft == 0 {
                        if fromSource {
                            let section = (parser.kind, parser.payload)
                            lock.withLock { sourceSections.append(section) }
                        }
                        parser.sections += 1
                        if case .cutAfter(let cutKind, let cutFromSource) = fault, cutKind == parser.kind, cutFromSource == fromSource {
                            stopAfterWrite = true
                        }
                    }
                }
            }
            if !out.isEmpty && !writeAll(output, out) { return }
            if stopAfterWrite { lock.withLock { cut = true } }
        }
    }

    private func writeAll(_ fd: Int32, _ bytes: [UInt8]) -> Bool {
        var done = 0
        while done < bytes.count {
            let n = bytes.withUnsafeBytes { send(fd, $0.baseAddress! + done, bytes.count - done, Int32(MSG_NOSIGNAL)) }
            if n < 0 && errno == EINTR { continue }
            if n <= 0 { return false }
            done += n
        }
        return true
    }
}

/// A test helper's failure to set itself up (not a finding about the code under test).
public struct TestFailure: Error, CustomStringConvertible {
    public let description: String
    public init(_ description: String) { self.description = description }
}

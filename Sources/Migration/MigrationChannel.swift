import CGodwit
import Foundation
import GodwitSystem
#if canImport(Glibc)
import Glibc
#endif

/// An authenticated migration connection: the handshake on creation, then sections both ways, each
/// tagged under the session key with a per-direction sequence number.
public final class MigrationChannel: @unchecked Sendable {
    public static let defaultTimeout = 10.0
    public let role: MigrationRole
    private let io: SocketIO
    private let sendLock = Lock()
    private let receiveLock = Lock()
    private let sendMAC: HMAC
    private let receiveMAC: HMAC
    private let sendLabel: [UInt8]
    private let receiveLabel: [UInt8]
    private var sendSequence: UInt64 = 0
    private var receiveSequence: UInt64 = 0
    private var sendFailure: MigrationError?
    private var receiveFailure: MigrationError?
    private var outgoing: [UInt8] = []
    private static let flushThreshold = 256 << 10

    /// Runs the handshake as `role` on a connected stream socket, which the channel owns from now on
    /// (it is closed when the handshake fails). `timeout` bounds every wait for the peer.
    public convenience init(socket: FileDescriptor, role: MigrationRole, key: MigrationKey,
                            timeout: Double = MigrationChannel.defaultTimeout) throws(MigrationError) {
        try self.init(socket: socket, role: role, key: key, timeout: timeout, nonce: nil)
    }

    /// `nonce` fixes this side's handshake nonce (tests replay recorded streams with it).
    init(socket: FileDescriptor, role: MigrationRole, key: MigrationKey, timeout: Double, nonce: [UInt8]?) throws(MigrationError) {
        let io = SocketIO(socket: socket, timeout: timeout)
        let sessionKey: [UInt8]
        do throws(MigrationError) {
            sessionKey = try Self.handshake(io, role: role, key: key.bytes, nonce: nonce)
            sendMAC = try HMAC(key: sessionKey)
            receiveMAC = try HMAC(key: sessionKey)
        } catch {
            io.shutdown()
            socket.close()
            throw error
        }
        self.io = io
        self.role = role
        sendLabel = MigrationStream.directionLabel(from: role)
        receiveLabel = MigrationStream.directionLabel(from: role == .source ? .target : .source)
    }

    /// Connects to a target at `host` (IPv4/IPv6 literal or name) and `port` and authenticates as the source.
    public static func connect(host: String, port: UInt16, key: MigrationKey,
                               timeout: Double = MigrationChannel.defaultTimeout) throws(MigrationError) -> MigrationChannel {
        var lastError = MigrationError.address(host: host, reason: "no address")
        for address in try resolve(host: host, port: port, passive: false) {
            let attempt = Result { () throws(MigrationError) -> FileDescriptor in
                let fd = FileDescriptor(owning: try call("socket") { godwit_host_socket(address.family, address.type, 0) })
                let rc = address.withSockaddr { sa, length in Glibc.connect(fd.rawValue, sa, length) }
                if rc != 0 && godwit_errno() != EINPROGRESS {
                    throw .system(SystemError(operation: "connect", errno: godwit_errno(), context: "\(host):\(port)"))
                }
                try SocketIO.poll(fd, events: POLLOUT, timeout: timeout, operation: "connecting to \(host):\(port)")
                var code: Int32 = 0
                var length = socklen_t(MemoryLayout<Int32>.size)
                _ = try call("getsockopt(SO_ERROR)") { getsockopt(fd.rawValue, SOL_SOCKET, SO_ERROR, &code, &length) }
                if code != 0 { throw .system(SystemError(operation: "connect", errno: code, context: "\(host):\(port)")) }
                return fd
            }
            switch attempt {
            case .success(let fd):
                var on: Int32 = 1
                _ = try call("setsockopt(TCP_NODELAY)") {
                    setsockopt(fd.rawValue, Int32(IPPROTO_TCP), TCP_NODELAY, &on, socklen_t(MemoryLayout<Int32>.size))
                }
                return try MigrationChannel(socket: fd, role: .source, key: key, timeout: timeout)
            case .failure(let error): lastError = error
            }
        }
        throw lastError
    }

    /// Listens for a source on `host` (e.g. "0.0.0.0", "::" or "127.0.0.1") and `port` (0: any free port).
    public static func listen(host: String, port: UInt16) throws(MigrationError) -> MigrationListener {
        var lastError = MigrationError.address(host: host, reason: "no address")
        for address in try resolve(host: host, port: port, passive: true) {
            let attempt = Result { () throws(MigrationError) -> FileDescriptor in
                let fd = FileDescriptor(owning: try call("socket") { godwit_host_socket(address.family, address.type, 0) })
                var on: Int32 = 1
                _ = try call("setsockopt(SO_REUSEADDR)") { setsockopt(fd.rawValue, SOL_SOCKET, SO_REUSEADDR, &on, socklen_t(MemoryLayout<Int32>.size)) }
                _ = try call("bind", context: "\(host):\(port)") { address.withSockaddr { Glibc.bind(fd.rawValue, $0, $1) } }
                _ = try call("listen", context: "\(host):\(port)") { Glibc.listen(fd.rawValue, 8) }
                return fd
            }
            switch attempt {
            case .success(let fd): return try MigrationListener(socket: fd)
            case .failure(let error): lastError = error
            }
        }
        throw lastError
    }

    // MARK: Counters and settings

    /// Every byte written to the socket, handshake and framing included.
    public var bytesSent: UInt64 { io.bytesSent }
    /// Every byte read from the socket, handshake and framing included.
    public var bytesReceived: UInt64 { io.bytesReceived }
    /// The longest wait for the peer to make progress, in seconds, on every read and write.
    public var timeout: Double {
        get { io.timeout }
        set { io.timeout = newValue }
    }
    /// The send cap in bytes per second (nil: none); may be changed while another thread sends.
    public var maxBytesPerSecond: UInt64? {
        get { io.limiter.bytesPerSecond }
        set { io.limiter.bytesPerSecond = newValue }
    }

    /// Ends the connection both ways (wakes a thread blocked on it); the peer sees the stream end.
    public func shutdown() { io.shutdown() }

    /// Shuts the connection down and closes the socket; use only once no other thread uses the channel.
    public func close() {
        io.shutdown()
        io.socket.close()
    }

    // MARK: Sending

    /// Sends one section with `payload` (at most `kind.maxPayloadLength` bytes).
    public func send(kind: MigrationSectionKind, payload: [UInt8] = []) throws(MigrationError) {
        try payload.withBytes { (b: UnsafeRawBufferPointer) throws(MigrationError) in
            try sendSection(kind, length: b.count) { (put: (UnsafeRawBufferPointer) throws(MigrationError) -> Void) throws(MigrationError) in try put(b) }
        }
    }

    /// Sends `value` as JSON in a `config`, `state` or `progress` section.
    public func send<T: Encodable>(json value: T, kind: MigrationSectionKind) throws(MigrationError) {
        guard kind.isJSON else { throw .malformedSection(kind: kind, reason: "not a JSON section") }
        let data: Data
        do { data = try JSONEncoder().encode(value) } catch { throw .invalidJSON(kind: kind, reason: "\(error)") }
        try send(kind: kind, payload: [UInt8](data))
    }

    /// Sends an `abort` section with `reason` (cut at a character boundary to fit the section).
    public func sendAbort(reason: String) throws(MigrationError) {
        var text = Substring(reason)
        while text.utf8.count > Int(MigrationSectionKind.abort.maxPayloadLength) { text = text.dropLast() }
        try send(kind: .abort, payload: Array(text.utf8))
    }

    /// Sends guest pages (each exactly 4096 bytes) in as many `pages` sections as they need
    /// (`MigrationStream.maxPagesPerSection` per section); every size is checked before anything is sent.
    public func sendPages(_ pages: [(pageNumber: UInt64, bytes: UnsafeRawBufferPointer)]) throws(MigrationError) {
        if let bad = pages.first(where: { $0.bytes.count != MigrationStream.pageSize }) {
            throw .badPageSize(pageNumber: bad.pageNumber, size: bad.bytes.count)
        }
        var start = 0
        while start < pages.count {
            let batch = pages[start..<min(start + MigrationStream.maxPagesPerSection, pages.count)]
            start = batch.endIndex
            var count = [UInt8]()
            count.appendLE(UInt32(batch.count))
            try sendSection(.pages, length: 4 + batch.count * MigrationStream.pageEntryLength) { (put: (UnsafeRawBufferPointer) throws(MigrationError) -> Void) throws(MigrationError) in
                try count.withBytes { (b: UnsafeRawBufferPointer) throws(MigrationError) in try put(b) }
                for page in batch {
                    // In bounds: the buffer is exactly the 8 bytes of the page number; page.bytes was checked to be 4096.
                    try withUnsafeBytes(of: page.pageNumber.littleEndian) { (b: UnsafeRawBufferPointer) throws(MigrationError) in try put(b) }
                    try put(page.bytes)
                }
            }
        }
    }

    /// Sends page numbers of all-zero pages in as many `zeroPages` sections as they need.
    public func sendZeroPages(_ pageNumbers: [UInt64]) throws(MigrationError) {
        var start = 0
        while start < pageNumbers.count {
            let batch = pageNumbers[start..<min(start + MigrationStream.maxZeroPagesPerSection, pageNumbers.count)]
            start = batch.endIndex
            var payload = [UInt8]()
            payload.reserveCapacity(4 + batch.count * 8)
            payload.appendLE(UInt32(batch.count))
            for page in batch { payload.appendLE(page) }
            try send(kind: .zeroPages, payload: payload)
        }
    }

    /// Frames one section: header, the payload `produce` hands to `put`, then the tag.
    private func sendSection(_ kind: MigrationSectionKind, length: Int,
                             _ produce: ((UnsafeRawBufferPointer) throws(MigrationError) -> Void) throws(MigrationError) -> Void) throws(MigrationError) {
        guard UInt64(length) <= kind.maxPayloadLength else {
            throw .sectionTooLarge(kind: kind, length: UInt64(length), limit: kind.maxPayloadLength)
        }
        let result = sendLock.withLock { Result { () throws(MigrationError) in
            if let sendFailure { throw sendFailure }
            do throws(MigrationError) {
                var header = [UInt8]()
                header.appendLE(kind.rawValue)
                header.appendLE(UInt64(length))
                var sequence = [UInt8]()
                sequence.appendLE(sendSequence)
                try sendMAC.restart()
                try sendMAC.update(sendLabel)
                try sendMAC.update(sequence)
                var produced = 0
                // Guest pages change while they are sent (pre-copy): authenticate and send one stable copy,
                // or the tag would cover other bytes than those on the wire.
                var scratch = [UInt8](repeating: 0, count: MigrationStream.pageSize)
                let put = { (bytes: UnsafeRawBufferPointer) throws(MigrationError) in
                    var offset = 0
                    while offset < bytes.count {
                        let n = min(scratch.count, bytes.count - offset)
                        // In bounds: offset + n <= bytes.count and n <= scratch.count.
                        scratch.withUnsafeMutableBytes { $0.copyMemory(from: UnsafeRawBufferPointer(rebasing: bytes[offset..<(offset + n)])) }
                        try scratch.withBytes { (copy: UnsafeRawBufferPointer) throws(MigrationError) in
                            let stable = UnsafeRawBufferPointer(rebasing: copy[0..<n])
                            try self.sendMAC.update(stable)
                            try self.buffer(stable)
                        }
                        offset += n
                    }
                    produced += bytes.count
                }
                try header.withBytes { (b: UnsafeRawBufferPointer) throws(MigrationError) in try put(b) }
                try produce(put)
                guard produced == MigrationStream.sectionHeaderLength + length else {
                    throw .malformedSection(kind: kind, reason: "produced \(produced - MigrationStream.sectionHeaderLength) of \(length) bytes")
                }
                let tag = try sendMAC.finish()
                try tag.withBytes { (b: UnsafeRawBufferPointer) throws(MigrationError) in try buffer(b) }
                try flush()
                sendSequence += 1
            } catch {
                sendFailure = error
                throw error
            }
        } }
        try result.get()
    }

    /// Appends to the outgoing buffer, writing it out whenever it reaches the flush threshold.
    private func buffer(_ bytes: UnsafeRawBufferPointer) throws(MigrationError) {
        var offset = 0
        while offset < bytes.count {
            let n = min(bytes.count - offset, Self.flushThreshold - outgoing.count)
            // In bounds: offset + n <= bytes.count.
            outgoing.append(contentsOf: UnsafeRawBufferPointer(rebasing: bytes[offset..<(offset + n)]))
            offset += n
            if outgoing.count >= Self.flushThreshold { try flush() }
        }
    }

    private func flush() throws(MigrationError) {
        defer { outgoing.removeAll(keepingCapacity: true) }
        try io.writeAll(outgoing, operation: "sending a section")
    }

    // MARK: Receiving

    /// Receives the next section: checks its kind and length before reading the payload, then its tag
    /// and sequence. After an error the channel is unusable for receiving (it throws that error again).
    public func receive() throws(MigrationError) -> MigrationSection {
        let result = receiveLock.withLock { Result { () throws(MigrationError) -> MigrationSection in
            if let receiveFailure { throw receiveFailure }
            do throws(MigrationError) {
                let header = try io.read(count: MigrationStream.sectionHeaderLength, operation: "receiving a section header")
                // In bounds: the header is 12 bytes (u32 at 0, u64 at 4).
                let (rawKind, length): (UInt32, UInt64) = header.withUnsafeBytes { ($0.loadLE(at: 0), $0.loadLE(at: 4)) }
                guard let kind = MigrationSectionKind(rawValue: rawKind) else { throw .unknownSectionKind(rawKind) }
                guard length <= kind.maxPayloadLength else {
                    throw .sectionTooLarge(kind: kind, length: length, limit: kind.maxPayloadLength)
                }
                let payload = try io.read(count: Int(length), operation: "receiving a \(kind) section")
                let tag = try io.read(count: MigrationStream.tagLength, operation: "receiving a section tag")
                var sequence = [UInt8]()
                sequence.appendLE(receiveSequence)
                try receiveMAC.restart()
                for part in [receiveLabel, sequence, header, payload] { try receiveMAC.update(part) }
                guard HMAC.equal(try receiveMAC.finish(), tag) else { throw .badTag(sequence: receiveSequence) }
                receiveSequence += 1
                return MigrationSection(kind: kind, payload: payload)
            } catch {
                receiveFailure = error
                throw error
            }
        } }
        return try result.get()
    }

    /// Receives a section of one of `kinds`; an unexpected `abort` is `.peerAborted` with its reason.
    public func receive(expecting kinds: [MigrationSectionKind]) throws(MigrationError) -> MigrationSection {
        let section = try receive()
        guard kinds.contains(section.kind) else {
            if section.kind == .abort { throw .peerAborted(reason: try section.abortReason()) }
            throw .unexpectedSection(section.kind, expected: kinds)
        }
        return section
    }

    /// Receives a `kind` section (JSON) and decodes it.
    public func receiveJSON<T: Decodable>(_ type: T.Type, kind: MigrationSectionKind) throws(MigrationError) -> T {
        try receive(expecting: [kind]).decodeJSON(type)
    }

    // MARK: Handshake

    /// Mutual proof of the key; returns the session key.
    private static func handshake(_ io: SocketIO, role: MigrationRole, key: [UInt8], nonce: [UInt8]?) throws(MigrationError) -> [UInt8] {
        var ours = nonce ?? []
        if nonce == nil { ours = try randomBytes(MigrationStream.nonceLength) }
        var hello = MigrationStream.magic
        hello.appendLE(MigrationStream.version)
        switch role {
        case .target:
            try io.writeAll(hello + ours, operation: "sending the handshake")
            try readHello(io)
            let theirs = try io.read(count: MigrationStream.nonceLength, operation: "receiving the source's nonce")
            let proof = try io.read(count: HMAC.length, operation: "receiving the source's proof")
            guard HMAC.equal(proof, try HMAC.tag(key: key, MigrationStream.sourceProofLabel, ours, theirs)) else {
                throw .authenticationFailed(peer: .source)
            }
            try io.writeAll(try HMAC.tag(key: key, MigrationStream.targetProofLabel, theirs, ours), operation: "sending the target's proof")
            return try HMAC.tag(key: key, MigrationStream.sessionLabel, ours, theirs)
        case .source:
            try readHello(io)
            let theirs = try io.read(count: MigrationStream.nonceLength, operation: "receiving the target's nonce")
            let proof = try HMAC.tag(key: key, MigrationStream.sourceProofLabel, theirs, ours)
            try io.writeAll(hello + ours + proof, operation: "sending the handshake")
            let answer: [UInt8]
            do throws(MigrationError) {
                answer = try io.read(count: HMAC.length, operation: "receiving the target's proof")
            } catch {
                if case .peerClosed = error { throw .handshakeRefused }
                throw error
            }
            guard HMAC.equal(answer, try HMAC.tag(key: key, MigrationStream.targetProofLabel, ours, theirs)) else {
                throw .authenticationFailed(peer: .target)
            }
            return try HMAC.tag(key: key, MigrationStream.sessionLabel, theirs, ours)
        }
    }

    /// Reads and checks the peer's magic and version.
    private static func readHello(_ io: SocketIO) throws(MigrationError) {
        let magic = try io.read(count: MigrationStream.magic.count, operation: "receiving the handshake")
        guard magic == MigrationStream.magic else { throw .badMagic(magic) }
        // In bounds: 4 bytes were read.
        let version: UInt32 = try io.read(count: 4, operation: "receiving the handshake").withUnsafeBytes { $0.loadLE(at: 0) }
        guard version == MigrationStream.version else { throw .unsupportedVersion(version) }
    }

    // MARK: Addresses

    /// One resolved address, copied out of getaddrinfo's list.
    struct Address {
        var family: Int32
        var type: Int32
        var storage = sockaddr_storage()
        var length: socklen_t

        func withSockaddr<T>(_ body: (UnsafePointer<sockaddr>, socklen_t) -> T) -> T {
            withUnsafeBytes(of: storage) { raw in
                // In bounds: `length` <= sizeof(sockaddr_storage), checked when the address was copied.
                body(raw.baseAddress!.assumingMemoryBound(to: sockaddr.self), length)
            }
        }
    }

    static func resolve(host: String, port: UInt16, passive: Bool) throws(MigrationError) -> [Address] {
        var hints = addrinfo()
        hints.ai_family = AF_UNSPEC
        hints.ai_socktype = Int32(SOCK_STREAM.rawValue)
        hints.ai_flags = AI_NUMERICSERV | (passive ? AI_PASSIVE : 0)
        var list: UnsafeMutablePointer<addrinfo>?
        let rc = getaddrinfo(host, String(port), &hints, &list)
        guard rc == 0 else {
            throw .address(host: host, reason: rc == EAI_SYSTEM ? String(cString: strerror(godwit_errno())) : String(cString: gai_strerror(rc)))
        }
        defer { freeaddrinfo(list) }
        var addresses: [Address] = []
        var next = list
        while let entry = next?.pointee {
            next = entry.ai_next
            guard let source = entry.ai_addr, Int(entry.ai_addrlen) <= MemoryLayout<sockaddr_storage>.size else { continue }
            var address = Address(family: entry.ai_family, type: entry.ai_socktype | Int32(SOCK_CLOEXEC.rawValue) | Int32(SOCK_NONBLOCK.rawValue),
                                  length: entry.ai_addrlen)
            // In bounds: ai_addrlen <= sizeof(sockaddr_storage), checked above.
            withUnsafeMutableBytes(of: &address.storage) { $0.copyMemory(from: UnsafeRawBufferPointer(start: source, count: Int(entry.ai_addrlen))) }
            addresses.append(address)
        }
        return addresses
    }
}

/// `systemCall` with the error wrapped as a `MigrationError`.
func call<T: FixedWidthInteger>(_ operation: String, context: String = "", _ body: () -> T) throws(MigrationError) -> T {
    do throws(SystemError) {
        return try systemCall(operation, context: context, body)
    } catch {
        throw .system(error)
    }
}

/// A listening TCP socket on the target that accepts authenticated sources, one at a time.
public final class MigrationListener: @unchecked Sendable {
    public let socket: FileDescriptor
    /// The bound port (the one the kernel chose when listening on port 0).
    public let port: UInt16

    init(socket: FileDescriptor) throws(MigrationError) {
        var storage = sockaddr_storage()
        var length = socklen_t(MemoryLayout<sockaddr_storage>.size)
        _ = try withUnsafeMutableBytes(of: &storage) { (raw: UnsafeMutableRawBufferPointer) throws(MigrationError) in
            // In bounds: `length` tells getsockname the size of the storage.
            try call("getsockname") { getsockname(socket.rawValue, raw.baseAddress!.assumingMemoryBound(to: sockaddr.self), &length) }
        }
        // In bounds: sin_port and sin6_port are both at offset 2 of the 128-byte storage, in network byte order.
        let port: UInt16 = withUnsafeBytes(of: storage) { UInt16(bigEndian: $0.loadUnaligned(fromByteOffset: 2, as: UInt16.self)) }
        self.socket = socket
        self.port = port
    }

    /// Waits for a source (at most `waitForConnection` seconds; nil: for ever) and runs the handshake as
    /// the target. A peer that fails the handshake is disconnected and this throws; the listener stays usable.
    public func accept(key: MigrationKey, timeout: Double = MigrationChannel.defaultTimeout,
                       waitForConnection: Double? = nil) throws(MigrationError) -> MigrationChannel {
        while true {
            try SocketIO.poll(socket, events: POLLIN, timeout: waitForConnection, operation: "waiting for a migration connection")
            let fd = godwit_accept(socket.rawValue)
            if fd < 0 {
                let code = godwit_errno()
                if [EAGAIN, EWOULDBLOCK, EINTR, ECONNABORTED, EPROTO].contains(code) { continue }
                throw .system(SystemError(operation: "accept", errno: code, context: "migration listener"))
            }
            let connection = FileDescriptor(owning: fd)
            var on: Int32 = 1
            _ = try? call("setsockopt(TCP_NODELAY)") { setsockopt(fd, Int32(IPPROTO_TCP), TCP_NODELAY, &on, socklen_t(MemoryLayout<Int32>.size)) }
            return try MigrationChannel(socket: connection, role: .target, key: key, timeout: timeout)
        }
    }

    public func close() { socket.close() }
}

import CGodwit
import Foundation
import GodwitSystem
#if canImport(Glibc)
import Glibc
#endif

/// Blocking reads and writes of whole messages on a connected stream socket.
///
/// Reads go through a buffer (one `read` takes every request the client has sent so far, instead of
/// two calls per request), and replies can be held back while the reader has more requests in hand
/// (`write(_:more:)`), so that a burst of requests is answered with one `sendmsg`: on loopback each
/// send costs the receiver a wake-up, most of a page-cache write's cost.
final class NBDSocket: @unchecked Sendable {
    let descriptor: FileDescriptor
    private let writeLock = Lock()
    /// Replies held back (guarded by `writeLock`).
    private var held: [UInt8] = []
    /// Bytes read but not taken yet: `inbox[inboxStart..<inboxEnd]`. Only the connection's reader uses it.
    private let inbox = UnsafeMutableRawBufferPointer.allocate(byteCount: NBDSocket.inboxCapacity, alignment: 16)
    private var inboxStart = 0
    private var inboxEnd = 0

    static let inboxCapacity = 128 << 10
    /// Replies are held back up to this many bytes.
    static let heldLimit = 64 << 10

    init(_ descriptor: FileDescriptor) { self.descriptor = descriptor }

    deinit { inbox.deallocate() }

    /// Limits each blocking read to `seconds` (nil: no limit).
    func setReceiveTimeout(_ seconds: Double?) {
        var value = timeval(tv_sec: Int(seconds ?? 0), tv_usec: Int(((seconds ?? 0) - Double(Int(seconds ?? 0))) * 1e6))
        _ = setsockopt(descriptor.rawValue, SOL_SOCKET, SO_RCVTIMEO, &value, socklen_t(MemoryLayout<timeval>.size))
    }

    /// The buffered bytes (valid until the next read).
    var bufferedBytes: UnsafeRawBufferPointer {
        // In bounds: 0 <= inboxStart <= inboxEnd <= inbox.count.
        UnsafeRawBufferPointer(rebasing: inbox[inboxStart..<inboxEnd])
    }

    func read(into buffer: UnsafeMutableRawBufferPointer, operation: String) throws(NBDError) {
        var done = 0
        while done < buffer.count {
            if inboxStart < inboxEnd {
                let n = min(inboxEnd - inboxStart, buffer.count - done)
                // In bounds: n bytes are buffered and n <= buffer.count - done.
                UnsafeMutableRawBufferPointer(rebasing: buffer[done..<(done + n)])
                    .copyMemory(from: UnsafeRawBufferPointer(rebasing: inbox[inboxStart..<(inboxStart + n)]))
                inboxStart += n
                done += n
                continue
            }
            // Nothing buffered: this read may wait for the client, which may wait for the replies held back.
            try flush()
            let wanted = buffer.count - done
            let direct = wanted >= NBDSocket.inboxCapacity / 2  // a large payload goes straight to its place
            inboxStart = 0
            inboxEnd = 0
            let n = direct ? Glibc.read(descriptor.rawValue, buffer.baseAddress! + done, wanted)
                           : Glibc.read(descriptor.rawValue, inbox.baseAddress!, inbox.count)
            if n > 0 {
                if direct { done += n } else { inboxEnd = n }
                continue
            }
            if n == 0 { throw .peerClosed }
            let code = godwit_errno()
            if code == EINTR { continue }
            if code == EAGAIN || code == EWOULDBLOCK { throw .timedOut(operation: operation) }
            throw .system(SystemError(operation: "read", errno: code, context: operation))
        }
    }

    func read(count: Int, operation: String) throws(NBDError) -> [UInt8] {
        var bytes = [UInt8](repeating: 0, count: count)
        // In bounds: the buffer is exactly `count` bytes.
        let result = bytes.withUnsafeMutableBytes { b in Result { () throws(NBDError) in try read(into: b, operation: operation) } }
        try result.get()
        return bytes
    }

    /// Writes every piece in order as one message (other writers wait). `more`: the caller has another
    /// reply coming right after this one, so a small one may be held back (a later write, or the reader
    /// before it waits, sends it).
    func write(_ pieces: [UnsafeRawBufferPointer], more: Bool = false) throws(NBDError) {
        let result: Result<Void, NBDError> = writeLock.withLock {
            let size = pieces.reduce(held.count) { $0 + $1.count }
            if more && size <= NBDSocket.heldLimit {
                for piece in pieces { held.append(contentsOf: piece) }
                return .success(())
            }
            defer { held.removeAll(keepingCapacity: true) }
            return held.withUnsafeBytes { h in sendAll([h] + pieces) }
        }
        try result.get()
    }

    func write(_ bytes: [UInt8]) throws(NBDError) {
        let result = bytes.withUnsafeBytes { b in Result { () throws(NBDError) in try write([b]) } }
        try result.get()
    }

    /// Sends the replies held back.
    func flush() throws(NBDError) {
        let result: Result<Void, NBDError> = writeLock.withLock {
            guard !held.isEmpty else { return .success(()) }
            defer { held.removeAll(keepingCapacity: true) }
            return held.withUnsafeBytes { h in sendAll([h]) }
        }
        try result.get()
    }

    /// One `sendmsg` for all the pieces (more when the socket takes part of them). With `writeLock` held.
    private func sendAll(_ pieces: [UnsafeRawBufferPointer]) -> Result<Void, NBDError> {
        var vectors = pieces.filter { $0.count > 0 }.map { iovec(iov_base: UnsafeMutableRawPointer(mutating: $0.baseAddress), iov_len: $0.count) }
        var first = 0
        while first < vectors.count {
            // In bounds: first < vectors.count, and the message covers vectors[first...].
            let n = vectors.withUnsafeMutableBufferPointer { v -> Int in
                var message = msghdr()
                message.msg_iov = v.baseAddress! + first
                message.msg_iovlen = v.count - first
                return sendmsg(descriptor.rawValue, &message, Int32(MSG_NOSIGNAL))
            }
            if n <= 0 {
                let code = n == 0 ? EPIPE : godwit_errno()
                if code == EINTR { continue }
                return .failure(code == EPIPE || code == ECONNRESET ? .peerClosed : .system(SystemError(operation: "sendmsg", errno: code, context: "NBD")))
            }
            var sent = n
            while first < vectors.count, sent >= vectors[first].iov_len {
                sent -= vectors[first].iov_len
                first += 1
            }
            if sent > 0 {
                // A piece went out in part: the rest of it goes next.
                vectors[first].iov_base = vectors[first].iov_base + sent
                vectors[first].iov_len -= sent
            }
        }
        return .success(())
    }

    func shutdown() { _ = Glibc.shutdown(descriptor.rawValue, Int32(Glibc.SHUT_RDWR)) }
}

/// Counters of an NBD server, for statistics and tests.
public struct NBDServerStatistics: Sendable, Equatable {
    public var connections = 0
    public var requests = 0
    public var errors = 0
    /// Connections dropped for a protocol violation (bad magic, a lying length, a hostile option).
    public var violations = 0
    /// The most requests one connection had in flight at once.
    public var peakInFlight = 0
}

/// An NBD server (fixed newstyle; `NBD_OPT_GO`, `NBD_OPT_INFO`, `NBD_OPT_LIST`, `NBD_OPT_EXPORT_NAME`;
/// simple replies; READ, WRITE, FLUSH, TRIM, WRITE_ZEROES, CACHE, with FUA; many requests in flight,
/// answered as they finish). Every field a client sends is checked; a client that breaks the
/// protocol is disconnected, one that asks for something wrong gets an error reply.
public final class NBDServer: @unchecked Sendable {
    public struct Options: Sendable {
        /// Seconds a client has to finish the handshake.
        public var handshakeTimeout: Double = 30
        /// Requests executed at once per connection.
        public var workers = 8
        /// Requests read ahead of the workers per connection (beyond that the reader waits).
        public var maxQueued = 64
        /// The connection's reader runs a small request itself, instead of waking a worker, while requests
        /// take less than this many microseconds on average (page-cache writes do; a slow disk does not,
        /// and then requests go to the workers and run in parallel). Waking a worker costs two context
        /// switches, which on a small host are most of a page-cache write's cost: measured with a
        /// mirrored guest disk at queue depth 8 (the replica on this server, 2 CPUs), 13.4-13.9k
        /// writes/s with every request on a worker, 19.1-20.3k with the reader running all of them,
        /// 16.1-19.6k with this average at 200 us. 0: only a request with nothing else in flight.
        public var inlineMicroseconds = 200
        public init() {}
    }

    public let options: Options
    private let lock = Lock()
    private var exports: [String: NBDStorage]
    /// Per export, the newest owner generation a client has connected with (see `lookup`).
    private var generations: [String: UInt64] = [:]
    private var stats = NBDServerStatistics()
    private var connections: [ObjectIdentifier: NBDSocket] = [:]
    private var stopping = false

    /// A server for `exports` by name ("" is the default export NBD clients ask for without a name).
    public init(exports: [String: NBDStorage], options: Options = Options()) {
        self.exports = exports
        self.options = options
    }

    public var statistics: NBDServerStatistics { lock.withLock { stats } }

    /// The names of the exports served now.
    public var exportNames: [String] { lock.withLock { exports.keys.sorted() } }

    /// Serves `storage` as `name` from now on (a replica a peer asked this host to keep).
    public func addExport(_ name: String, storage: NBDStorage) throws(NBDError) {
        guard !name.contains("@"), name.utf8.count <= 4096 else { throw .unknownExport(name) }
        let added = lock.withLock { () -> Bool in
            guard exports[name] == nil else { return false }
            exports[name] = storage
            return true
        }
        guard added else { throw .unknownExport("\(name) (already exported)") }
    }

    /// Stops offering `name` to new clients (connected ones keep their storage until they leave, and
    /// the export's fence stays: an old generation still connected cannot write).
    public func removeExport(_ name: String) {
        lock.withLock { exports[name] = nil }
    }

    /// Refuses writes from every owner generation older than `generation` on `name` from now on, as
    /// if a client of that generation had connected: the new owner's agent fences the old one.
    public func fence(_ name: String, generation: UInt64) {
        lock.withLock { generations[name] = max(generations[name] ?? 0, generation) }
    }

    /// Accepts connections on a listening socket until `stop()`, each served on its own thread.
    public func serve(listener: FileDescriptor) {
        while !lock.withLock({ stopping }) {
            let fd = godwit_accept(listener.rawValue)
            if fd < 0 {
                let code = godwit_errno()
                if code == EINTR || code == ECONNABORTED { continue }
                return
            }
            let connection = FileDescriptor(owning: fd)
            detachThread(name: "nbd-conn") { [self] in serve(connection: connection) }
        }
    }

    /// Disconnects every client; `serve(listener:)` returns once its listener is shut down by the caller.
    public func stop() {
        let all: [NBDSocket] = lock.withLock {
            stopping = true
            return Array(connections.values)
        }
        for socket in all { socket.shutdown() }
    }

    /// Serves one connected client until it disconnects or breaks the protocol; returns the reason
    /// the connection ended (nil: a clean disconnect).
    @discardableResult
    public func serve(connection: FileDescriptor) -> NBDError? {
        let socket = NBDSocket(connection)
        let id = ObjectIdentifier(socket)
        lock.withLock {
            stats.connections += 1
            connections[id] = socket
        }
        defer {
            lock.withLock { _ = connections.removeValue(forKey: id) }
            socket.shutdown()
            connection.close()
        }
        var on: Int32 = 1
        _ = setsockopt(connection.rawValue, Int32(IPPROTO_TCP), TCP_NODELAY, &on, socklen_t(MemoryLayout<Int32>.size))
        do throws(NBDError) {
            socket.setReceiveTimeout(options.handshakeTimeout)
            guard let (name, storage, generation) = try handshake(socket) else { return nil }
            socket.setReceiveTimeout(nil)
            try transmission(socket, export: name, storage: storage, generation: generation)
            return nil
        } catch {
            if case .peerClosed = error { return nil }
            lock.withLock { stats.violations += 1 }
            return error
        }
    }

    // MARK: Owner generations

    /// The export a client asks for, and the owner generation it claims. A name `NAME@N` is export
    /// `NAME` written by owner generation `N` (the VM's owner record in etcd): the newest generation
    /// seen wins, and from then on an older owner's writes are refused with EPERM. That is how a
    /// replica refuses a stale owner that lost its VM to another host but still runs.
    func lookup(_ requested: String) -> (name: String, storage: NBDStorage, generation: UInt64)? {
        var name = requested, generation: UInt64 = 0
        if let at = requested.lastIndex(of: "@"), let n = UInt64(requested[requested.index(after: at)...]) {
            name = String(requested[..<at])
            generation = n
        }
        let storage: NBDStorage? = lock.withLock {
            guard let storage = exports[name] else { return nil }
            generations[name] = max(generations[name] ?? 0, generation)
            return storage
        }
        guard let storage else { return nil }
        return (name, storage, generation)
    }

    /// Whether a client of `generation` may still write `export`.
    func mayWrite(_ export: String, generation: UInt64) -> Bool {
        lock.withLock { generation >= (generations[export] ?? 0) }
    }

    /// The newest owner generation seen on `export` (0: none).
    public func generation(of export: String) -> UInt64 { lock.withLock { generations[export] ?? 0 } }

    // MARK: Handshake

    private func transmissionFlags(_ storage: NBDStorage) -> UInt16 {
        var flags = NBDProtocol.TransmissionFlag.hasFlags | NBDProtocol.TransmissionFlag.sendFlush
            | NBDProtocol.TransmissionFlag.sendFUA | NBDProtocol.TransmissionFlag.canMultiConn | NBDProtocol.TransmissionFlag.sendCache
        if storage.readOnly { flags |= NBDProtocol.TransmissionFlag.readOnly } else {
            flags |= NBDProtocol.TransmissionFlag.sendTrim | NBDProtocol.TransmissionFlag.sendWriteZeroes
        }
        return flags
    }

    /// The option phase; returns the export to serve, or nil when the client aborted.
    private func handshake(_ socket: NBDSocket) throws(NBDError) -> (String, NBDStorage, UInt64)? {
        var greeting = [UInt8]()
        greeting.appendBE(NBDProtocol.initMagic)
        greeting.appendBE(NBDProtocol.optionMagic)
        greeting.appendBE(NBDProtocol.HandshakeFlag.fixedNewstyle | NBDProtocol.HandshakeFlag.noZeroes)
        try socket.write(greeting)
        let clientFlags: UInt32 = try socket.read(count: 4, operation: "reading the client flags").loadBE(at: 0)
        guard clientFlags & ~UInt32(NBDProtocol.HandshakeFlag.fixedNewstyle | NBDProtocol.HandshakeFlag.noZeroes) == 0,
              clientFlags & UInt32(NBDProtocol.HandshakeFlag.fixedNewstyle) != 0 else {
            throw .protocolViolation("client flags 0x\(String(clientFlags, radix: 16)) (fixed newstyle is required)")
        }
        let noZeroes = clientFlags & UInt32(NBDProtocol.HandshakeFlag.noZeroes) != 0
        for _ in 0..<64 {  // a client that haggles for ever is dropped
            let header = try socket.read(count: 16, operation: "reading an option")
            let magic: UInt64 = header.loadBE(at: 0)
            guard magic == NBDProtocol.optionMagic else { throw .badMagic(expected: NBDProtocol.optionMagic, got: magic) }
            let option: UInt32 = header.loadBE(at: 8)
            let length: UInt32 = header.loadBE(at: 12)
            guard length <= NBDProtocol.maxOptionLength else { throw .protocolViolation("option \(option) with \(length) bytes of data") }
            let data = try socket.read(count: Int(length), operation: "reading option \(option)")
            switch option {
            case NBDProtocol.Option.exportName:
                let requested = String(decoding: data, as: UTF8.self)
                // No error reply exists for EXPORT_NAME: an unknown name ends the connection.
                guard let (name, storage, generation) = lookup(requested) else { throw .unknownExport(requested) }
                var reply = [UInt8]()
                reply.appendBE(storage.size)
                reply.appendBE(transmissionFlags(storage))
                if !noZeroes { reply += [UInt8](repeating: 0, count: 124) }
                try socket.write(reply)
                return (name, storage, generation)
            case NBDProtocol.Option.abort:
                try? sendOptionReply(socket, option, NBDProtocol.Reply.ack)
                return nil
            case NBDProtocol.Option.list:
                guard data.isEmpty else { try sendOptionReply(socket, option, NBDProtocol.Reply.errInvalid, message: "LIST takes no data"); continue }
                for name in exports.keys.sorted() {
                    var payload = [UInt8]()
                    payload.appendBE(UInt32(name.utf8.count))
                    payload += Array(name.utf8)
                    try sendOptionReply(socket, option, NBDProtocol.Reply.server, payload)
                }
                try sendOptionReply(socket, option, NBDProtocol.Reply.ack)
            case NBDProtocol.Option.info, NBDProtocol.Option.go:
                // u32 name length, name, u16 number of requests, that many u16 info types.
                guard data.count >= 6 else { try sendOptionReply(socket, option, NBDProtocol.Reply.errInvalid, message: "short request"); continue }
                let nameLength = Int(data.loadBE(at: 0, as: UInt32.self))
                guard nameLength <= data.count - 6 else { try sendOptionReply(socket, option, NBDProtocol.Reply.errInvalid, message: "name length"); continue }
                let count = Int(data.loadBE(at: 4 + nameLength, as: UInt16.self))
                guard data.count == 6 + nameLength + 2 * count else {
                    try sendOptionReply(socket, option, NBDProtocol.Reply.errInvalid, message: "request length"); continue
                }
                let requested = String(decoding: data[4..<(4 + nameLength)], as: UTF8.self)
                guard let (name, storage, generation) = lookup(requested) else {
                    try sendOptionReply(socket, option, NBDProtocol.Reply.errUnknown, message: "no export named '\(requested)'"); continue
                }
                var export = [UInt8]()
                export.appendBE(NBDProtocol.Info.export)
                export.appendBE(storage.size)
                export.appendBE(transmissionFlags(storage))
                try sendOptionReply(socket, option, NBDProtocol.Reply.info, export)
                var block = [UInt8]()
                block.appendBE(NBDProtocol.Info.blockSize)
                block.appendBE(UInt32(1))
                block.appendBE(UInt32(4096))
                block.appendBE(NBDProtocol.maxPayload)
                try sendOptionReply(socket, option, NBDProtocol.Reply.info, block)
                try sendOptionReply(socket, option, NBDProtocol.Reply.ack)
                if option == NBDProtocol.Option.go { return (name, storage, generation) }
            default:
                // STARTTLS, STRUCTURED_REPLY, meta contexts and anything unknown: not offered.
                try sendOptionReply(socket, option, NBDProtocol.Reply.errUnsupported, message: "option \(option) is not supported")
            }
        }
        throw .protocolViolation("more than 64 options")
    }

    private func sendOptionReply(_ socket: NBDSocket, _ option: UInt32, _ type: UInt32, _ payload: [UInt8] = [],
                                 message: String? = nil) throws(NBDError) {
        let data = message.map { Array($0.utf8) } ?? payload
        var reply = [UInt8]()
        reply.appendBE(NBDProtocol.replyMagic)
        reply.appendBE(option)
        reply.appendBE(type)
        reply.appendBE(UInt32(data.count))
        try socket.write(reply + data)
    }

    // MARK: Transmission

    /// One request read off the wire, with its data for a write.
    private struct Request {
        var flags: UInt16
        var type: UInt16
        var cookie: UInt64
        var offset: UInt64
        var length: UInt32
        var data: [UInt8]
    }

    /// Whether the next request, with its data, is already in the socket's buffer (so the reader takes
    /// it without waiting, and a reply may be held back for the next one).
    private static func hasRequestBuffered(_ socket: NBDSocket) -> Bool {
        let bytes = socket.bufferedBytes
        guard bytes.count >= NBDProtocol.requestLength else { return false }
        guard bytes.loadBE(at: 6, as: UInt16.self) == NBDProtocol.Command.write else { return true }
        return bytes.count - NBDProtocol.requestLength >= Int(bytes.loadBE(at: 24, as: UInt32.self))
    }

    /// The requests of one connection between its reader and its workers.
    private final class RequestQueue: @unchecked Sendable {
        let condition = Condition()
        var pending: [Request] = []
        var inFlight = 0
        /// Moving average of how long requests took to execute (microseconds), readers' and workers'.
        var averageMicroseconds = 0.0
        var finished = false
        var failure: NBDError?

        /// Adds one request's execution time to the moving average (1/8 weight). With the lock held.
        func note(_ microseconds: Double) {
            averageMicroseconds += (microseconds - averageMicroseconds) / 8
        }
    }

    private func transmission(_ socket: NBDSocket, export: String, storage: NBDStorage, generation: UInt64) throws(NBDError) {
        let queue = RequestQueue()
        let condition = queue.condition
        for n in 0..<max(1, options.workers) {
            detachThread(name: "nbd-worker-\(n)") { [self] in
                while true {
                    let next: Request? = condition.withLock {
                        condition.wait(until: { !queue.pending.isEmpty || queue.finished })
                        guard !queue.pending.isEmpty else { return nil }
                        // The reader waits for room only when the queue is full.
                        if queue.pending.count == options.maxQueued { condition.broadcast() }
                        return queue.pending.removeFirst()
                    }
                    guard let request = next else { return }
                    let started = monotonicSeconds()
                    do throws(NBDError) {
                        try execute(request, socket: socket, export: export, storage: storage, generation: generation, more: false)
                    } catch {
                        condition.withLock { if queue.failure == nil { queue.failure = error } }
                        socket.shutdown()
                    }
                    let took = (monotonicSeconds() - started) * 1e6
                    condition.withLock {
                        queue.note(took)
                        queue.inFlight -= 1
                        // Only the end of the connection waits for requests in flight.
                        if queue.finished { condition.broadcast() }
                    }
                }
            }
        }
        defer {
            // Every request read is answered (or its connection is gone) before the connection closes.
            condition.withLock {
                queue.finished = true
                condition.broadcast()
                condition.wait(until: { queue.inFlight == 0 })
            }
        }
        while true {
            let header = try socket.read(count: NBDProtocol.requestLength, operation: "reading a request")
            let magic: UInt32 = header.loadBE(at: 0)
            guard magic == NBDProtocol.requestMagic else { throw .badMagic(expected: UInt64(NBDProtocol.requestMagic), got: UInt64(magic)) }
            var request = Request(flags: header.loadBE(at: 4), type: header.loadBE(at: 6), cookie: header.loadBE(at: 8),
                                  offset: header.loadBE(at: 16), length: header.loadBE(at: 24), data: [])
            if request.type == NBDProtocol.Command.disconnect { return try socket.flush() }
            if request.type == NBDProtocol.Command.write {
                // The data follows whatever we think of the request; a length we will not read is a violation.
                guard request.length <= NBDProtocol.maxPayload else {
                    throw .protocolViolation("a write of \(request.length) bytes (at most \(NBDProtocol.maxPayload))")
                }
                request.data = try socket.read(count: Int(request.length), operation: "reading write data")
            }
            if let error = condition.withLock({ queue.failure }) { throw error }
            // Nothing else in flight, or requests are quick (`Options.inlineMicroseconds`): the reader answers
            // a small request itself, which saves waking a worker; a FLUSH may take long and goes to one.
            let limit = Double(options.inlineMicroseconds)
            let inline: Bool = condition.withLock {
                guard queue.inFlight == 0 || queue.averageMicroseconds < limit,
                      request.length <= 64 << 10, request.type != NBDProtocol.Command.flush else { return false }
                queue.inFlight += 1
                return true
            }
            if inline {
                let started = monotonicSeconds()
                let outcome = Result { () throws(NBDError) in
                    try execute(request, socket: socket, export: export, storage: storage, generation: generation,
                                more: NBDServer.hasRequestBuffered(socket))
                }
                let took = (monotonicSeconds() - started) * 1e6
                condition.withLock {
                    queue.note(took)
                    queue.inFlight -= 1
                }
                lock.withLock {
                    stats.requests += 1
                    stats.peakInFlight = max(stats.peakInFlight, 1)
                }
                try outcome.get()
                continue
            }
            let maxQueued = options.maxQueued
            let inFlight: Int = condition.withLock {
                condition.wait(until: { queue.pending.count < maxQueued || queue.finished })
                queue.pending.append(request)
                queue.inFlight += 1
                // One idle worker takes it (waking all of them costs every worker a switch per request).
                condition.signal()
                return queue.inFlight
            }
            lock.withLock {
                stats.requests += 1
                stats.peakInFlight = max(stats.peakInFlight, inFlight)
            }
        }
    }

    /// Performs a request and sends its reply (`more`: may be held back, another request is in hand).
    private func execute(_ request: Request, socket: NBDSocket, export: String, storage: NBDStorage, generation: UInt64,
                         more: Bool) throws(NBDError) {
        var code: UInt32 = 0
        var readData: [UInt8] = []
        let length = UInt64(request.length)
        let inRange = request.offset <= storage.size && length <= storage.size - request.offset
        let fua = request.flags & NBDProtocol.CommandFlag.fua != 0
        let knownFlags = NBDProtocol.CommandFlag.fua | NBDProtocol.CommandFlag.noHole
        do {
            let changes = [NBDProtocol.Command.write, NBDProtocol.Command.trim, NBDProtocol.Command.writeZeroes].contains(request.type)
            if request.flags & ~knownFlags != 0 {
                code = NBDProtocol.Errno.invalid
            } else if changes && !mayWrite(export, generation: generation) {
                // A newer owner has connected: this one lost the VM (fencing).
                code = NBDProtocol.Errno.perm
            } else {
                switch request.type {
                case NBDProtocol.Command.read:
                    if request.length > NBDProtocol.maxPayload { code = NBDProtocol.Errno.overflow } else if !inRange { code = NBDProtocol.Errno.invalid } else {
                        readData = [UInt8](repeating: 0, count: Int(request.length))
                        try readData.withUnsafeMutableBytes { try storage.read(at: request.offset, into: $0) }
                    }
                case NBDProtocol.Command.write:
                    if storage.readOnly { code = NBDProtocol.Errno.perm } else if !inRange { code = NBDProtocol.Errno.noSpace } else {
                        try request.data.withUnsafeBytes { try storage.write(at: request.offset, from: $0, fua: fua) }
                    }
                case NBDProtocol.Command.flush:
                    try storage.flush()
                case NBDProtocol.Command.trim:
                    if storage.readOnly { code = NBDProtocol.Errno.perm } else if !inRange { code = NBDProtocol.Errno.invalid } else {
                        try storage.trim(at: request.offset, length: length)
                        if fua { try storage.flush() }
                    }
                case NBDProtocol.Command.writeZeroes:
                    if storage.readOnly { code = NBDProtocol.Errno.perm } else if !inRange { code = NBDProtocol.Errno.noSpace } else {
                        let mayUnmap = request.flags & NBDProtocol.CommandFlag.noHole == 0
                        try storage.writeZeroes(at: request.offset, length: length, mayUnmap: mayUnmap, fua: fua)
                    }
                case NBDProtocol.Command.cache:
                    if !inRange { code = NBDProtocol.Errno.invalid }
                default:
                    code = NBDProtocol.Errno.invalid
                }
            }
        } catch let e as NBDError where e == .readOnly {
            code = NBDProtocol.Errno.perm
        } catch let e as SystemError {
            code = e.errno == ENOSPC ? NBDProtocol.Errno.noSpace : NBDProtocol.Errno.io
        } catch {
            code = NBDProtocol.Errno.io
        }
        if code != 0 {
            lock.withLock { stats.errors += 1 }
            readData = []
        }
        var header = [UInt8]()
        header.appendBE(NBDProtocol.simpleReplyMagic)
        header.appendBE(code)
        header.appendBE(request.cookie)
        let result = header.withUnsafeBytes { h in
            readData.withUnsafeBytes { d in Result { () throws(NBDError) in try socket.write([h, d], more: more) } }
        }
        try result.get()
    }
}

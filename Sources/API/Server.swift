import GodwitSystem
#if canImport(Glibc)
import Glibc
#endif

/// The API's HTTP/1.1 server on a Unix socket, written by hand and kept small and strict.
///
/// One thread accepts; each connection is served by a thread from a bounded pool (`maxConnections`;
/// beyond that a connection gets 503 and is closed). Connections are kept alive and may pipeline.
/// A request must arrive whole within `requestTimeout` from its first byte (else 408 and close), an
/// idle connection is closed after `idleTimeout`, and a write that cannot proceed for `sendTimeout`
/// closes the connection, so no client can hold a thread for ever. Malformed requests get their 4xx
/// with a `fault_message` and the connection is closed.
public final class APIServer: @unchecked Sendable {
    public struct Options: Sendable {
        public var maxConnections = 64
        public var maxHeadBytes = 8192
        public var maxBodyBytes = 65536
        /// Seconds from the first byte of a request to its last.
        public var requestTimeout: Double = 10
        /// Seconds a kept-alive connection may wait for its next request.
        public var idleTimeout: Double = 120
        /// Seconds a write may block on a client that does not read.
        public var sendTimeout: Double = 10
        /// Pool threads kept waiting for connections once their connection closed.
        public var idleThreads = 4

        public init() {}
    }

    /// The Unix socket's path ("" for a server on a listening socket it was given, such as TCP).
    public let socketPath: String
    public let handler: HTTPHandler
    private var given: FileDescriptor?
    public let options: Options

    private let state = ConditionLock()
    private var listener: FileDescriptor?
    private var wake: EventFD?
    private var acceptThread: pthread_t?
    private var stopping = false
    private var started = false
    private var pending: [FileDescriptor] = []
    private var idleWorkers = 0
    private var workers = 0
    private var busy = 0
    private var peakBusy = 0
    private var servedCount = 0
    private var rejectedCount = 0

    public init(socketPath: String, handler: HTTPHandler, options: Options = Options()) {
        self.socketPath = socketPath
        self.handler = handler
        self.options = options
    }

    /// A server on a listening socket made by the caller (a host agent's TCP port for its peers).
    public init(listening socket: FileDescriptor, handler: HTTPHandler, options: Options = Options()) {
        self.socketPath = ""
        self.given = socket
        self.handler = handler
        self.options = options
    }

    /// A server whose handler is an `APIRouter` over `controller`.
    public convenience init(socketPath: String, controller: VMMController, options: Options = Options()) {
        self.init(socketPath: socketPath, handler: APIRouter(controller: controller), options: options)
    }

    deinit { stop() }

    /// Binds the socket (removing a stale socket file) and starts accepting; returns once the socket
    /// accepts connections.
    public func start() throws {
        try state.withLock {
            if started || stopping { throw SystemError(operation: "APIServer.start", errno: EALREADY, context: socketPath) }
            started = true
        }
        let listener = try state.withLock { given } ?? UnixSocket.listen(path: socketPath)
        do {
            try listener.setNonBlocking(true)
            let wake = try EventFD(nonBlocking: true)
            state.withLock {
                self.listener = listener
                self.wake = wake
            }
            let thread = try startThread(name: "api-accept", joinable: true) { [self] in acceptLoop(listener, wake) }
            state.withLock { acceptThread = thread }
        } catch {
            state.withLock {
                self.listener = nil
                self.wake = nil
            }
            listener.close()
            if !socketPath.isEmpty { _ = unlink(socketPath) }
            throw error
        }
    }

    /// Stops accepting, ends every connection (streams included) and removes the socket file. Waits up
    /// to `timeout` seconds for connection threads (a controller call in progress is not interrupted).
    public func stop(timeout: Double = 5) {
        let (thread, wake, listener): (pthread_t?, EventFD?, FileDescriptor?) = state.withLock {
            if stopping || !started {
                stopping = true
                return (nil, nil, nil)
            }
            stopping = true
            state.broadcast()
            let t = acceptThread
            acceptThread = nil
            return (t, self.wake, self.listener)
        }
        guard let wake else { return }
        try? wake.signal()
        if let thread { pthread_join(thread, nil) }
        if let listener {
            // Remove the socket file, unless something other than a socket has taken its place.
            var onDisk = stat()
            if !socketPath.isEmpty, lstat(socketPath, &onDisk) == 0, (onDisk.st_mode & S_IFMT) == S_IFSOCK { _ = unlink(socketPath) }
            listener.close()
        }
        let deadline = monotonicNow() + timeout
        state.withLock {
            for fd in pending { fd.close() }
            pending.removeAll()
            while workers > 0 && monotonicNow() < deadline { state.wait(until: min(deadline, monotonicNow() + 0.1)) }
        }
    }

    /// Connections being served now.
    public var activeConnections: Int { state.withLock { busy } }
    /// The most connections served at once since start.
    public var peakActiveConnections: Int { state.withLock { peakBusy } }
    /// Connections accepted and served since start.
    public var servedConnections: Int { state.withLock { servedCount } }
    /// Connections refused with 503 because the pool was full.
    public var rejectedConnections: Int { state.withLock { rejectedCount } }

    private var isStopping: Bool { state.withLock { stopping } }

    // MARK: Accepting

    private func acceptLoop(_ listener: FileDescriptor, _ wake: EventFD) {
        var fds = [pollfd(fd: listener.rawValue, events: Int16(POLLIN), revents: 0),
                   pollfd(fd: wake.descriptor.rawValue, events: Int16(POLLIN), revents: 0)]
        while true {
            let n = poll(&fds, 2, -1)
            if n < 0 {
                if errno == EINTR { continue }
                return
            }
            if fds[1].revents != 0 { return }
            if fds[0].revents & Int16(POLLNVAL) != 0 { return }
            while let connection = (try? UnixSocket.accept(listener)) ?? nil {
                UnixSocket.setSendTimeout(connection, seconds: options.sendTimeout)
                if !dispatch(connection) { reject(connection) }
            }
        }
    }

    /// Hands the connection to an idle pool thread or a new one; false when the pool is full.
    private enum Placement { case queued, spawn, full }

    private func dispatch(_ connection: FileDescriptor) -> Bool {
        let placement: Placement = state.withLock {
            if stopping { return .full }
            if idleWorkers > pending.count {
                pending.append(connection)
                state.signal()
                return .queued
            }
            if workers >= options.maxConnections { return .full }
            workers += 1
            return .spawn
        }
        switch placement {
        case .queued: return true
        case .full: return false
        case .spawn: break
        }
        do {
            try startThread(name: "api-conn") { [self] in workerLoop(first: connection) }
            return true
        } catch {
            state.withLock {
                workers -= 1
                state.broadcast()
            }
            return false
        }
    }

    private func reject(_ connection: FileDescriptor) {
        state.withLock { rejectedCount += 1 }
        let response = HTTPResponse.error(.serviceUnavailable("too many connections (at most \(options.maxConnections)); retry later"),
                                          closeConnection: true)
        let bytes = response.serialized(keepAlive: false)
        _ = bytes.withUnsafeBytes { send(connection.rawValue, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL) | Int32(MSG_DONTWAIT)) }
        connection.close()
    }

    private func workerLoop(first: FileDescriptor) {
        var next: FileDescriptor? = first
        while let connection = next {
            state.withLock {
                busy += 1
                peakBusy = max(peakBusy, busy)
                servedCount += 1
            }
            serve(connection)
            connection.close()
            next = state.withLock {
                busy -= 1
                idleWorkers += 1
                defer { idleWorkers -= 1 }
                let idleSince = monotonicNow()
                while pending.isEmpty && !stopping {
                    let idleFor = monotonicNow() - idleSince
                    if idleWorkers > options.idleThreads || idleFor > 30 { return nil }
                    state.wait(until: monotonicNow() + (idleWorkers > options.idleThreads ? 0 : 30 - idleFor))
                }
                if stopping || pending.isEmpty { return nil }
                return pending.removeFirst()
            }
        }
        state.withLock {
            workers -= 1
            state.broadcast()
        }
    }

    // MARK: Serving a connection

    private func serve(_ connection: FileDescriptor) {
        guard let wake = state.withLock({ self.wake }) else { return }
        let parser = HTTPParser(maxHeadBytes: options.maxHeadBytes, maxBodyBytes: options.maxBodyBytes)
        var buffer: [UInt8] = []
        var scratch = [UInt8](repeating: 0, count: 16384)
        var requestDeadline = 0.0
        var continueSent = false
        while true {
            if !buffer.isEmpty {
                switch parser.parse(buffer) {
                case let .request(request, consumed):
                    buffer.removeFirst(consumed)
                    continueSent = false
                    let response = handler.handle(request)
                    let keepAlive = request.keepAlive && !response.closeConnection && !isStopping
                    if response.stream != nil {
                        stream(response, to: connection, chunked: request.minorVersion >= 1)
                        return
                    }
                    guard (try? UnixSocket.sendAll(connection, response.serialized(keepAlive: keepAlive))) != nil, keepAlive else {
                        return
                    }
                    if !buffer.isEmpty { requestDeadline = monotonicNow() + options.requestTimeout }
                    continue
                case let .failure(error):
                    fail(connection, error)
                    return
                case let .incomplete(expectsContinue):
                    if expectsContinue && !continueSent {
                        continueSent = true
                        guard (try? UnixSocket.sendAll(connection, Array("HTTP/1.1 100 Continue\r\n\r\n".utf8))) != nil else { return }
                    }
                }
            }
            let deadline = buffer.isEmpty ? monotonicNow() + options.idleTimeout : requestDeadline
            guard let outcome = try? UnixSocket.read(connection, into: &scratch, deadline: deadline, wake: wake.descriptor) else { return }
            switch outcome {
            case let .data(n):
                if buffer.isEmpty { requestDeadline = monotonicNow() + options.requestTimeout }
                buffer.append(contentsOf: scratch[0..<n])
            case .endOfFile:
                if !buffer.isEmpty, case let .failure(error) = parser.parse(buffer, endOfInput: true) {
                    fail(connection, error)
                }
                return
            case .timedOut:
                if !buffer.isEmpty {
                    fail(connection, HTTPParseError(408, "the request did not arrive within \(Int(options.requestTimeout)) s"))
                }
                return
            case .interrupted:
                return
            }
        }
    }

    /// Answers a malformed request and closes gently: stop writing, then drain briefly what the client
    /// is still sending so that it can read the answer.
    private func fail(_ connection: FileDescriptor, _ error: HTTPParseError) {
        let response = HTTPResponse.error(error.apiError, closeConnection: true)
        guard (try? UnixSocket.sendAll(connection, response.serialized(keepAlive: false))) != nil else { return }
        _ = shutdown(connection.rawValue, Int32(SHUT_WR))
        var scratch = [UInt8](repeating: 0, count: 16384)
        let deadline = monotonicNow() + 0.5
        var drained = 0
        while drained < 1 << 20, case let .data(n)? = try? UnixSocket.read(connection, into: &scratch, deadline: deadline, wake: nil) {
            drained += n
        }
    }

    private func stream(_ response: HTTPResponse, to connection: FileDescriptor, chunked: Bool) {
        guard let stream = response.stream, let wake = state.withLock({ self.wake }) else { return }
        defer { stream.cancel() }
        guard (try? UnixSocket.sendAll(connection, response.serialized(keepAlive: false, chunked: chunked))) != nil else { return }
        let ready = stream.readinessDescriptor
        streaming: while !isStopping {
            switch stream.next(timeout: ready == nil ? 0.25 : 0) {
            case let .data(bytes):
                if bytes.isEmpty { continue }
                let framed = chunked ? Array((String(bytes.count, radix: 16) + "\r\n").utf8) + bytes + [0x0d, 0x0a] : bytes
                guard (try? UnixSocket.sendAll(connection, framed)) != nil else { return }
            case .idle:
                if let ready {
                    // Wait for more data, the client closing, or the server stopping — whichever comes first.
                    let pollRDHUP: Int16 = 0x2000
                    var fds = [pollfd(fd: connection.rawValue, events: pollRDHUP, revents: 0),
                               pollfd(fd: wake.descriptor.rawValue, events: Int16(POLLIN), revents: 0),
                               pollfd(fd: ready, events: Int16(POLLIN), revents: 0)]
                    if poll(&fds, 3, 1000) > 0 {
                        if fds[0].revents != 0 { return }           // the client went away
                        if fds[1].revents != 0 { break streaming }  // the server stops: end the body properly
                    }
                } else if UnixSocket.peerClosed(connection) {
                    return
                }
            case .end:
                if chunked { _ = try? UnixSocket.sendAll(connection, Array("0\r\n\r\n".utf8)) }
                return
            }
        }
        // The server stops: deliver what is already queued (a VMM's last event is its shutdown) first.
        drain: for _ in 0..<1024 {
            guard case let .data(bytes) = stream.next(timeout: 0) else { break drain }
            if bytes.isEmpty { continue }
            let framed = chunked ? Array((String(bytes.count, radix: 16) + "\r\n").utf8) + bytes + [0x0d, 0x0a] : bytes
            guard (try? UnixSocket.sendAll(connection, framed)) != nil else { return }
        }
        if chunked { _ = try? UnixSocket.sendAll(connection, Array("0\r\n\r\n".utf8)) }
    }
}

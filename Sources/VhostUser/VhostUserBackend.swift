import CGodwit
import GodwitSystem
import GuestMemory
import Virtio
#if canImport(Glibc)
import Glibc
#endif

/// The backend side of vhost-user (the I/O domain): serves `VirtioDevice`s to frontends (a VMM, QEMU)
/// that connect to a Unix socket, one device per connection.
///
/// Each connection runs on its own thread with its own `EventLoop`: the socket's messages and the
/// rings' kick eventfds are handled there, so a request is never processed while a control message
/// changes the rings, and a connection that misbehaves (malformed messages, rings outside its memory,
/// a stall mid-message) is closed with its error logged while the others go on.
///
/// ```swift
/// let backend = VhostUserBackend(name: "vm1-disk", device: BlockDevice(backend: image))
/// try backend.listen(path: "/run/godwit/vm1-disk.sock")
/// ...
/// backend.stop()
/// ```
public final class VhostUserBackend: @unchecked Sendable {
    public typealias Logger = @Sendable (String) -> Void
    public typealias DeviceFactory = () throws -> VirtioDevice

    /// What happened to a connection that ended.
    public struct ClosedConnection: Sendable {
        public var id: Int
        /// nil when the frontend closed the connection (or `stop()` did); otherwise why it was closed.
        public var error: String?
    }

    /// The protocol features offered (and implemented).
    public static let offeredProtocolFeatures: UInt64 = VhostUserProtocolFeature.multiQueue
        | VhostUserProtocolFeature.replyAck | VhostUserProtocolFeature.config | VhostUserProtocolFeature.logSharedMemory
        | VhostUserProtocolFeature.inflightSharedMemory

    public let name: String
    private let makeDevice: DeviceFactory
    /// One device shared by every connection: at most one connection at a time.
    private let exclusive: Bool
    private let logger: Logger

    private let lock = Lock()
    private var listener: VhostUserListener?
    private var acceptLoop: EventLoop?
    private var acceptThread: VhostUserThread?
    private var connections: [Int: VhostUserConnection] = [:]
    private var closedList: [ClosedConnection] = []
    private var nextID = 1
    private var stopped = false
    private let closedCondition = Condition()
    private var closedCount = 0

    /// Serves a new device from `makeDevice` on every connection.
    public init(name: String, logger: Logger? = nil, makeDevice: @escaping DeviceFactory) {
        self.name = name
        self.makeDevice = makeDevice
        self.exclusive = false
        self.logger = logger ?? { message in VhostUserBackend.standardErrorLog(message) }
    }

    /// Serves `device` to one connection at a time; a connection that arrives while another is being
    /// served is closed at once (the frontend retries).
    public init(name: String, device: VirtioDevice, logger: Logger? = nil) {
        self.name = name
        self.makeDevice = { device }
        self.exclusive = true
        self.logger = logger ?? { message in VhostUserBackend.standardErrorLog(message) }
    }

    static func standardErrorLog(_ message: String) {
        let line = Array((message + "\n").utf8)
        line.withUnsafeBytes { _ = Glibc.write(2, $0.baseAddress, $0.count) }
    }

    func log(_ message: String) { logger("vhost-user \(name): \(message)") }

    private var requireSealed = false

    /// Refuse guest memory whose file is not sealed against shrinking (F_SEAL_SHRINK): a frontend that
    /// truncates a mapped file makes the domain's next access raise SIGBUS. QEMU's memfd backends are
    /// sealed; off by default until every frontend seals (unsealed memory is then only logged).
    public var requireSealedMemory: Bool {
        get { lock.withLock { requireSealed } }
        set { lock.withLock { requireSealed = newValue } }
    }

    private var pollWindow: Double = 0

    /// Adaptive polling (like QEMU's iothread poll-max-ns): after a kick, each connection's thread keeps
    /// processing its ring without sleeping until nothing has been ready for this many microseconds
    /// (the driver is asked not to notify meanwhile). 0, the default, sleeps on the kick at once.
    public var pollMicroseconds: Int {
        get { lock.withLock { Int(pollWindow * 1e6) } }
        set { lock.withLock { pollWindow = Double(max(0, min(newValue, 10_000))) / 1e6 } }
    }

    var pollWindowSeconds: Double { lock.withLock { pollWindow } }

    /// Connections being served.
    public var connectionCount: Int { lock.withLock { connections.count } }

    /// How many ended connections `closedConnections` remembers.
    public static let closedHistory = 64

    /// Connections that ended, in order (the last `closedHistory`).
    public var closedConnections: [ClosedConnection] { lock.withLock { closedList } }

    /// Waits until at least `count` connections have ended, or `timeout` seconds pass; returns whether they had.
    public func waitForClosedConnections(_ count: Int, timeout: Double) -> Bool {
        let deadline = VhostUserSocket.now() + timeout
        while VhostUserSocket.now() < deadline {
            if closedCondition.withLock({ closedCount }) >= count { return true }
            usleep(2000)
        }
        return closedCondition.withLock { closedCount } >= count
    }

    // MARK: Listening

    /// Listens on `path` and serves every connection that arrives, until `stop()`.
    public func listen(path: String) throws {
        try listen(on: VhostUserListener(path: path))
    }

    /// Serves connections from a listening socket (one passed in by a supervisor, for example).
    public func listen(on listener: VhostUserListener) throws {
        let loop = try vhostSystem { () throws(SystemError) in try EventLoop() }
        try vhostSystem { () throws(SystemError) in try listener.socket.setNonBlocking(true) }
        try vhostSystem { () throws(SystemError) in
            try loop.add(listener.socket) { [weak self] _ in self?.acceptPending() }
        }
        let thread = try VhostUserThread(name: "vu-accept") { loop.run() }
        lock.withLock {
            self.listener = listener
            acceptLoop = loop
            acceptThread = thread
        }
        log("listening on \(listener.path)")
    }

    private func acceptPending() {
        guard let listener = lock.withLock({ self.listener }) else { return }
        while true {
            let channel: VhostUserChannel?
            do { channel = try listener.accept() } catch {
                log("accept failed: \(error)")
                return
            }
            guard let channel else { return }
            do { _ = try serve(channel) } catch { log("cannot serve a connection: \(error)") }
        }
    }

    // MARK: Connections

    /// Serves one connected channel (from `listen`, a socketpair, or a socket a supervisor passed in) on
    /// a new thread; returns the connection's id.
    @discardableResult
    public func serve(_ channel: VhostUserChannel) throws -> Int {
        let (id, refused): (Int, String?) = lock.withLock {
            let id = nextID
            nextID += 1
            if stopped { return (id, "the backend is stopping") }
            if exclusive && !connections.isEmpty { return (id, "the device is already being served to another connection") }
            return (id, nil)
        }
        // Threads of connections that ended are joined here (they have returned or are about to).
        let finished: [VhostUserConnection] = lock.withLock {
            let f = finishedConnections
            finishedConnections = []
            return f
        }
        for connection in finished { connection.join() }
        if let refused {
            log("connection \(id) refused: \(refused)")
            channel.shutdown()
            throw VhostUserError.deviceError("connection refused: \(refused)")
        }
        let device = try makeDevice()
        let connection = try VhostUserConnection(id: id, channel: channel, device: device, backend: self)
        lock.withLock { connections[id] = connection }
        do {
            try connection.start()
        } catch {
            lock.withLock { _ = connections.removeValue(forKey: id) }
            throw error
        }
        log("connection \(id) open")
        return id
    }

    /// Called by a connection's thread when it has ended and cleaned up.
    func connectionEnded(_ connection: VhostUserConnection, error: Error?) {
        let text = error.map { "\($0)" }
        if let text { log("connection \(connection.id) closed: \(text)") } else { log("connection \(connection.id) closed") }
        lock.withLock {
            closedList.append(ClosedConnection(id: connection.id, error: text))
            if closedList.count > VhostUserBackend.closedHistory { closedList.removeFirst(closedList.count - VhostUserBackend.closedHistory) }
            // The entry stays until `stop()` joins the thread or the next connection replaces it.
            _ = connections.removeValue(forKey: connection.id)
            finishedConnections.append(connection)
        }
        closedCondition.withLock { closedCount += 1 }
    }

    private var finishedConnections: [VhostUserConnection] = []

    /// Stops listening, closes every connection (their devices are reset) and joins the threads.
    public func stop() {
        let (loop, thread, listener, live): (EventLoop?, VhostUserThread?, VhostUserListener?, [VhostUserConnection]) =
            lock.withLock {
                stopped = true
                let result = (acceptLoop, acceptThread, self.listener, Array(connections.values))
                acceptLoop = nil
                acceptThread = nil
                self.listener = nil
                return result
            }
        loop?.stop()
        thread?.join()
        if let listener, !listener.path.isEmpty { _ = unlink(listener.path) }
        for connection in live { connection.requestClose() }
        for connection in live { connection.join() }
        let finished: [VhostUserConnection] = lock.withLock {
            let f = finishedConnections
            finishedConnections = []
            return f
        }
        for connection in finished { connection.join() }
    }
}

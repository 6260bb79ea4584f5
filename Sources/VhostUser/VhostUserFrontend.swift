import CGodwit
import GodwitSystem
#if canImport(Glibc)
import Glibc
#endif

/// The frontend side of vhost-user (the VMM): one method per request over a connected channel.
///
/// Requests are serialized (one at a time, each waiting for its reply when it has one). When REPLY_ACK
/// has been negotiated, every request without a reply of its own asks for an ack and throws
/// `VhostUserError.requestFailed` when the backend reports a failure.
public final class VhostUserFrontend: @unchecked Sendable {
    public let channel: VhostUserChannel
    /// How long to wait for a reply (GET_VRING_BASE waits for the backend to drain its requests).
    public var replyTimeout: Double = 30

    private let lock = Lock()
    private var negotiatedProtocolFeatures: UInt64 = 0

    public init(channel: VhostUserChannel) {
        self.channel = channel
    }

    /// Connects to a backend listening at `path`.
    public static func connect(path: String) throws -> VhostUserFrontend {
        VhostUserFrontend(channel: try VhostUserChannel.connect(path: path))
    }

    /// The protocol features set with `setProtocolFeatures`.
    public var protocolFeatures: UInt64 { lock.withLock { negotiatedProtocolFeatures } }

    private var watcherWake: EventFD?
    private var closed = false

    /// Closes the connection (the backend sees end of file) and stops the disconnect watcher.
    public func close() {
        let wake: EventFD? = lock.withLock {
            closed = true
            return watcherWake
        }
        try? wake?.signal()
        channel.shutdown()
    }

    /// Calls `handler` (once, on a thread of its own) when the backend closes the connection or goes
    /// away, unless `close()` was called first. Reads nothing: replies still go to the requests.
    public func watchForDisconnect(_ handler: @escaping @Sendable (VhostUserError) -> Void) throws {
        let wake = try vhostSystem { () throws(SystemError) in try EventFD(nonBlocking: true) }
        lock.withLock { watcherWake = wake }
        let socket = channel.socket
        let thread = try VhostUserThread(name: "vu-watch") { [weak self] in
            let rdhup: Int16 = 0x2000  // POLLRDHUP
            var fds = [pollfd(fd: socket.rawValue, events: rdhup, revents: 0),
                       pollfd(fd: wake.descriptor.rawValue, events: Int16(POLLIN), revents: 0)]
            while true {
                let n = poll(&fds, 2, -1)
                if n < 0 && godwit_errno() == EINTR { continue }
                if n < 0 || fds[1].revents != 0 { return }
                if fds[0].revents != 0 { break }
            }
            let report = self.map { frontend in frontend.lock.withLock { !frontend.closed } } ?? false
            if report { handler(.disconnected(reason: "the backend closed the connection")) }
        }
        thread.detach()
    }

    // MARK: Requests

    public func getFeatures() throws -> UInt64 { try u64Reply(.getFeatures) }

    public func setFeatures(_ features: UInt64) throws { try send(.setFeatures, .u64(features)) }

    public func getProtocolFeatures() throws -> UInt64 { try u64Reply(.getProtocolFeatures) }

    /// Enables protocol features; REPLY_ACK applies from the next request on.
    public func setProtocolFeatures(_ features: UInt64) throws {
        try send(.setProtocolFeatures, .u64(features))
        lock.withLock { negotiatedProtocolFeatures = features }
    }

    public func setOwner() throws { try send(.setOwner, .none) }

    public func resetOwner() throws { try send(.resetOwner, .none) }

    /// Sends the memory table: one descriptor per region, in the same order.
    public func setMemoryTable(_ regions: [VhostUserMemoryRegion], fileDescriptors: [FileDescriptor]) throws {
        guard !regions.isEmpty, regions.count <= VhostUserCodec.maxRegions, regions.count == fileDescriptors.count else {
            throw VhostUserError.badRegionCount(count: UInt32(regions.count), maximum: VhostUserCodec.maxRegions)
        }
        try send(.setMemTable, .memoryTable(regions), fileDescriptors: fileDescriptors)
    }

    /// Shares the dirty log (LOG_SHMFD): `size` bytes of `fd` from `offset`. The backend always replies.
    public func setLogBase(size: UInt64, offset: UInt64, fileDescriptor: FileDescriptor) throws {
        let reply = try request(VhostUserMessage(request: .setLogBase,
                                                 payload: .log(VhostUserLogDescription(mmapSize: size, mmapOffset: offset)),
                                                 fileDescriptors: [fileDescriptor]))
        guard case let .u64(status) = reply.payload else { throw unexpected(reply, .setLogBase) }
        if status != 0 { throw VhostUserError.requestFailed(request: VhostUserRequest.setLogBase.rawValue, status: status) }
    }

    public func setLogFD(_ fd: FileDescriptor) throws { try send(.setLogFD, .none, fileDescriptors: [fd]) }

    public func setVringNum(queue: Int, size: UInt16) throws {
        try send(.setVringNum, .vringState(VhostUserVringState(index: UInt32(queue), num: UInt32(size))))
    }

    /// Ring addresses are the frontend's user (host virtual) addresses; `log` is guest-physical.
    public func setVringAddress(_ address: VhostUserVringAddress) throws {
        try send(.setVringAddr, .vringAddress(address))
    }

    public func setVringBase(queue: Int, base: UInt16) throws {
        try send(.setVringBase, .vringState(VhostUserVringState(index: UInt32(queue), num: UInt32(base))))
    }

    /// Stops the ring and returns its next avail index.
    public func getVringBase(queue: Int) throws -> UInt16 {
        let reply = try request(VhostUserMessage(request: .getVringBase,
                                                 payload: .vringState(VhostUserVringState(index: UInt32(queue), num: 0))))
        guard case let .vringState(state) = reply.payload, state.index == UInt32(queue), state.num <= 0xFFFF else {
            throw unexpected(reply, .getVringBase)
        }
        return UInt16(state.num)
    }

    /// The kick eventfd of `queue` (nil: the backend polls).
    public func setVringKick(queue: Int, fileDescriptor: FileDescriptor?) throws {
        try sendVringFD(.setVringKick, queue, fileDescriptor)
    }

    /// The call eventfd of `queue` (nil: no interrupts).
    public func setVringCall(queue: Int, fileDescriptor: FileDescriptor?) throws {
        try sendVringFD(.setVringCall, queue, fileDescriptor)
    }

    public func setVringErr(queue: Int, fileDescriptor: FileDescriptor?) throws {
        try sendVringFD(.setVringErr, queue, fileDescriptor)
    }

    private func sendVringFD(_ request: VhostUserRequest, _ queue: Int, _ fd: FileDescriptor?) throws {
        guard queue >= 0, UInt64(queue) <= VhostUserCodec.vringIndexMask else {
            throw VhostUserError.badQueueIndex(request: request.rawValue, index: UInt32(truncatingIfNeeded: queue), queueCount: 256)
        }
        let value = UInt64(queue) | (fd == nil ? VhostUserCodec.vringNoFileDescriptor : 0)
        try send(request, .u64(value), fileDescriptors: fd.map { [$0] } ?? [])
    }

    public func getQueueNum() throws -> UInt64 { try u64Reply(.getQueueNum) }

    public func setVringEnable(queue: Int, enabled: Bool) throws {
        try send(.setVringEnable, .vringState(VhostUserVringState(index: UInt32(queue), num: enabled ? 1 : 0)))
    }

    /// Reads `size` bytes of config space at `offset`.
    public func getConfig(offset: UInt32 = 0, size: Int, flags: UInt32 = 0) throws -> [UInt8] {
        guard size >= 0, size <= VhostUserConfigSpace.maxSize, UInt64(offset) + UInt64(size) <= UInt64(VhostUserConfigSpace.maxSize) else {
            throw VhostUserError.badConfigAccess(offset: offset, size: UInt32(clamping: size))
        }
        let reply = try request(VhostUserMessage(
            request: .getConfig,
            payload: .config(VhostUserConfigSpace(offset: offset, flags: flags, bytes: Array(repeating: 0, count: size)))))
        switch reply.payload {
        case let .config(config) where config.offset == offset && config.bytes.count == size:
            return config.bytes
        case .none:
            throw VhostUserError.requestFailed(request: VhostUserRequest.getConfig.rawValue, status: 1)
        default:
            throw unexpected(reply, .getConfig)
        }
    }

    public func setConfig(offset: UInt32, bytes: [UInt8], flags: UInt32 = 0) throws {
        guard bytes.count <= VhostUserConfigSpace.maxSize,
              UInt64(offset) + UInt64(bytes.count) <= UInt64(VhostUserConfigSpace.maxSize) else {
            throw VhostUserError.badConfigAccess(offset: offset, size: UInt32(clamping: bytes.count))
        }
        try send(.setConfig, .config(VhostUserConfigSpace(offset: offset, flags: flags, bytes: bytes)))
    }

    /// Asks the backend for an inflight-tracking region for `queueCount` queues of `queueSize`.
    public func getInflightFD(queueCount: UInt16, queueSize: UInt16) throws -> (VhostUserInflightDescription, FileDescriptor) {
        let reply = try request(VhostUserMessage(request: .getInflightFD, payload: .inflight(
            VhostUserInflightDescription(mmapSize: 0, mmapOffset: 0, queueCount: queueCount, queueSize: queueSize))))
        guard case let .inflight(description) = reply.payload, let fd = reply.fileDescriptors.first else {
            throw unexpected(reply, .getInflightFD)
        }
        return (description, fd)
    }

    public func setInflightFD(_ description: VhostUserInflightDescription, fileDescriptor: FileDescriptor) throws {
        try send(.setInflightFD, .inflight(description), fileDescriptors: [fileDescriptor])
    }

    // MARK: Plumbing

    private func u64Reply(_ request: VhostUserRequest) throws -> UInt64 {
        let reply = try self.request(VhostUserMessage(request: request))
        guard case let .u64(value) = reply.payload else { throw unexpected(reply, request) }
        return value
    }

    private func unexpected(_ reply: VhostUserMessage, _ request: VhostUserRequest) -> VhostUserError {
        .unexpectedMessage(request: reply.request.rawValue, reason: "reply \(reply.payload) does not answer \(request.name)")
    }

    /// Sends a request without a reply of its own; waits for the ack when REPLY_ACK is negotiated.
    private func send(_ request: VhostUserRequest, _ payload: VhostUserPayload, fileDescriptors: [FileDescriptor] = []) throws {
        try lock.withLock {
            let ack = negotiatedProtocolFeatures & VhostUserProtocolFeature.replyAck != 0
            let flags = VhostUserFlags.version | (ack ? VhostUserFlags.needReply : 0)
            try channel.send(VhostUserMessage(request: request, flags: flags, payload: payload, fileDescriptors: fileDescriptors))
            guard ack else { return }
            let reply = try receiveReply(for: request)
            guard case let .u64(status) = reply.payload else { throw unexpected(reply, request) }
            if status != 0 { throw VhostUserError.requestFailed(request: request.rawValue, status: status) }
        }
    }

    /// Sends a request that has a reply and returns the reply.
    private func request(_ message: VhostUserMessage) throws -> VhostUserMessage {
        try lock.withLock {
            try channel.send(message)
            return try receiveReply(for: message.request)
        }
    }

    private func receiveReply(for request: VhostUserRequest) throws -> VhostUserMessage {
        let reply: VhostUserMessage
        do {
            reply = try channel.receive(direction: .reply, timeout: replyTimeout)
        } catch VhostUserError.timedOut(_, _) {
            throw VhostUserError.timedOut(operation: "reply to \(request.name)", seconds: replyTimeout)
        }
        guard reply.isReply, reply.request == request else {
            reply.closeFileDescriptors()
            throw VhostUserError.unexpectedReply(request: reply.request.rawValue, expected: request.rawValue, flags: reply.flags)
        }
        return reply
    }
}

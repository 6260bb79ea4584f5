import Foundation
import GodwitSystem
import NBD
import VhostUser
import Virtio
#if canImport(Glibc)
import Glibc
#endif

/// The VM devices one I/O domain serves, by vhost-user socket path: slices of its block device and
/// NICs on TAPs. Devices are added at start-up (the command line) or at run time (the control socket),
/// with everything they need already open, so the domain can stay locked down.
public final class IODomainService: @unchecked Sendable {
    private struct Entry {
        var backend: VhostUserBackend
        var info: ControlDevice
        var receiver: NetRxWorker?
        var route: RoutedBlockBackend?
    }

    /// The last events of every device (at most `maxEvents`), oldest first.
    private var events: [ControlEvent] = []
    private static let maxEvents = 1000
    private let started = monotonicSeconds()

    /// The block device slices are cut from (`--blk`), if any.
    public let block: FileBlockBackend?
    private let requireSealedMemory: Bool
    private let lock = Lock()
    private var entries: [String: Entry] = [:]

    /// Adaptive polling window of block devices' connection threads (`VhostUserBackend.pollMicroseconds`).
    public let blockPollMicroseconds: Int

    public init(block: FileBlockBackend?, requireSealedMemory: Bool = true, blockPollMicroseconds: Int = 0) {
        self.block = block
        self.requireSealedMemory = requireSealedMemory
        self.blockPollMicroseconds = blockPollMicroseconds
    }

    /// Serves a slice [offset, offset + size) of the block device on `listener` (size nil: to the end).
    public func addBlock(socket path: String, listener: VhostUserListener, offset: UInt64, size: UInt64?, readOnly: Bool,
                         faultTimeout: Double? = nil) throws {
        guard let block else { throw IODomainError.badRequest("this domain has no block device (--blk)") }
        try checkNew(path)
        guard offset <= block.capacity else { throw IODomainError.badRequest("offset \(offset) is past the device's \(block.capacity) bytes") }
        let slice = try SliceBlockBackend(base: block, offset: offset, size: size ?? (block.capacity - offset), readOnly: readOnly)
        let name = URL(fileURLWithPath: path).lastPathComponent
        // Every disk goes through its route (local until a replica is attached), so that it can fail over.
        let route = RoutedBlockBackend(local: slice)
        route.localTimeout = faultTimeout
        route.onEvent = { [weak self] event in self?.record(path, event) }
        // A fresh device per connection: a reconnecting VMM gets a clean device, other VMs are untouched.
        let backend = VhostUserBackend(name: name) { BlockDevice(backend: route, serial: String(name.prefix(20))) }
        backend.requireSealedMemory = requireSealedMemory
        backend.pollMicroseconds = blockPollMicroseconds
        try backend.listen(on: listener)
        insert(path, Entry(backend: backend, info: ControlDevice(socket: path, kind: "blk", offset: offset, size: slice.capacity,
                                                                  readonly: readOnly, mac: nil, connections: 0, closedWithError: 0),
                           route: route))
    }

    private func record(_ path: String, _ event: RouteEvent) {
        let name = URL(fileURLWithPath: path).lastPathComponent
        fputs("godwit: iodomain: \(name): \(event.kind) (route \(event.route.rawValue))\(event.reason.map { ": \($0)" } ?? "")"
              + "\(event.held.map { ", \($0) held" } ?? "")\(event.milliseconds.map { String(format: ", %.1f ms", $0) } ?? "")\n", stderr)
        lock.withLock {
            events.append(ControlEvent(socket: path, time: monotonicSeconds() - started, event: event))
            if events.count > Self.maxEvents { events.removeFirst(events.count - Self.maxEvents) }
        }
    }

    /// The route of the block device on `path`.
    public func route(_ path: String) throws -> RoutedBlockBackend {
        guard let entry = lock.withLock({ entries[path] }) else { throw IODomainError.badRequest("no device serves \(path)") }
        guard let route = entry.route else { throw IODomainError.badRequest("\(path) is not a block device") }
        return route
    }

    /// Attaches an NBD export on `socket` (connected by the caller) as the replica of the disk on `path`.
    public func attachReplica(socket path: String, nbd: FileDescriptor, export: String, resync: Bool) throws {
        let route = try route(path)
        let client: NBDClient
        do { client = try NBDClient(socket: nbd, export: export) } catch {
            throw IODomainError.badRequest("the replica's NBD export '\(export)': \(error)")
        }
        try route.attachReplica(client, resync: resync)
    }

    /// Serves a NIC on `tap` on `listener`: one device, one VMM connection at a time; its receive
    /// thread reads the TAP only while the guest has buffers.
    public func addNet(socket path: String, listener: VhostUserListener, tap: Tap, mac: MACAddress?) throws {
        try checkNew(path)
        let address = mac ?? MACAddress.generated(seed: tap.name)
        let device = NetDevice(backend: TapBackend(tap: tap), mac: address)
        let receiver = try NetRxWorker(device: device)
        try receiver.start()
        let backend = VhostUserBackend(name: URL(fileURLWithPath: path).lastPathComponent, device: device)
        backend.requireSealedMemory = requireSealedMemory
        do { try backend.listen(on: listener) } catch {
            receiver.stop()
            throw error
        }
        insert(path, Entry(backend: backend, info: ControlDevice(socket: path, kind: "net", offset: nil, size: nil, readonly: nil,
                                                                  mac: address.description, connections: 0, closedWithError: 0),
                           receiver: receiver))
    }

    private func checkNew(_ path: String) throws {
        guard !path.isEmpty else { throw IODomainError.badRequest("a device needs its socket path") }
        if lock.withLock({ entries[path] != nil }) { throw IODomainError.badRequest("a device already serves \(path)") }
    }

    private func insert(_ path: String, _ entry: Entry) { lock.withLock { entries[path] = entry } }

    /// Stops serving the device on `path`: its connections close (their VMMs see the backend go).
    public func remove(socket path: String) throws {
        guard let entry = lock.withLock({ entries.removeValue(forKey: path) }) else {
            throw IODomainError.badRequest("no device serves \(path)")
        }
        entry.backend.stop()
        entry.receiver?.stop()
    }

    /// Every device, with its connection counts.
    public func list() -> [ControlDevice] {
        lock.withLock {
            entries.values.map { entry in
                var info = entry.info
                info.connections = entry.backend.connectionCount
                info.closedWithError = entry.backend.closedConnections.filter { $0.error != nil }.count
                info.route = entry.route?.status
                return info
            }.sorted { $0.socket < $1.socket }
        }
    }

    public func stopAll() {
        let all = lock.withLock { () -> [Entry] in
            let values = Array(entries.values)
            entries = [:]
            return values
        }
        for entry in all {
            entry.backend.stop()
            entry.receiver?.stop()
        }
    }

    /// Carries out one control request; never throws (errors become the response).
    public func handle(_ request: ControlRequest, descriptors: [FileDescriptor]) -> ControlResponse {
        do {
            switch request.op {
            case .list:
                guard descriptors.isEmpty else { throw IODomainError.badRequest("list takes no descriptors") }
            case .addBlock:
                guard descriptors.count == 1 else { throw IODomainError.badRequest("add-blk takes one descriptor (the listening socket), got \(descriptors.count)") }
                let path = request.socket ?? ""
                if let ms = request.faultTimeoutMs, !(1...600_000).contains(ms) {
                    throw IODomainError.badRequest("fault_timeout_ms must be 1 to 600000, not \(ms)")
                }
                try addBlock(socket: path, listener: try listener(descriptors[0], path), offset: request.offset ?? 0,
                             size: request.size, readOnly: request.readonly ?? false,
                             faultTimeout: request.faultTimeoutMs.map { Double($0) / 1000 })
            case .addNet:
                guard descriptors.count == 2 else { throw IODomainError.badRequest("add-net takes two descriptors (the listening socket, the TAP), got \(descriptors.count)") }
                var mac: MACAddress?
                if let text = request.mac {
                    guard let parsed = MACAddress(text) else { throw IODomainError.badRequest("mac '\(text)' is not a unicast MAC address") }
                    mac = parsed
                }
                let path = request.socket ?? ""
                let tap: Tap
                do { tap = try Tap(adopting: descriptors[1]) } catch { throw IODomainError.badRequest("the second descriptor is not a usable TAP: \(error)") }
                try addNet(socket: path, listener: try listener(descriptors[0], path), tap: tap, mac: mac)
            case .remove:
                guard descriptors.isEmpty else { throw IODomainError.badRequest("remove takes no descriptors") }
                try remove(socket: request.socket ?? "")
            case .route:
                guard descriptors.isEmpty else { throw IODomainError.badRequest("route takes no descriptors") }
                guard let newRoute = request.route else { throw IODomainError.badRequest("route needs route: local, remote or mirror") }
                try route(request.socket ?? "").setRoute(newRoute)
            case .attachReplica:
                guard descriptors.count == 1 else { throw IODomainError.badRequest("attach-replica takes one descriptor (a connected NBD socket), got \(descriptors.count)") }
                try attachReplica(socket: request.socket ?? "", nbd: descriptors[0], export: request.export ?? "", resync: request.resync ?? false)
            case .detachReplica:
                guard descriptors.isEmpty else { throw IODomainError.badRequest("detach-replica takes no descriptors") }
                try route(request.socket ?? "").detachReplica()
            case .resync:
                guard descriptors.isEmpty else { throw IODomainError.badRequest("resync takes no descriptors") }
                try route(request.socket ?? "").resync()
            case .events:
                guard descriptors.isEmpty else { throw IODomainError.badRequest("events takes no descriptors") }
                let all = lock.withLock { events }
                return ControlResponse(ok: true, events: request.socket.map { socket in all.filter { $0.socket == socket } } ?? all)
            }
            return ControlResponse(ok: true, devices: list())
        } catch {
            return ControlResponse(ok: false, error: "\(error)")
        }
    }

    /// A passed descriptor that must be a listening stream Unix socket.
    private func listener(_ fd: FileDescriptor, _ path: String) throws -> VhostUserListener {
        var listening: Int32 = 0, type: Int32 = 0, domain: Int32 = 0
        var size = socklen_t(MemoryLayout<Int32>.size)
        guard getsockopt(fd.rawValue, SOL_SOCKET, SO_ACCEPTCONN, &listening, &size) == 0, listening == 1,
              getsockopt(fd.rawValue, SOL_SOCKET, SO_TYPE, &type, &size) == 0, type == Int32(SOCK_STREAM.rawValue),
              getsockopt(fd.rawValue, SOL_SOCKET, SO_DOMAIN, &domain, &size) == 0, domain == AF_UNIX else {
            throw IODomainError.badRequest("the first descriptor is not a listening Unix stream socket")
        }
        return VhostUserListener(listening: fd, path: path)
    }
}

/// Serves an I/O domain's control socket: one thread per connection, one request and one answer at
/// a time (see `ControlRequest`). Created before the domain locks down; accepts afterwards.
public final class ControlServer: @unchecked Sendable {
    private let service: IODomainService
    private let listener: VhostUserListener
    private let log: (String) -> Void

    public init(path: String, service: IODomainService, log: @escaping (String) -> Void) throws {
        self.service = service
        self.log = log
        listener = try VhostUserListener(path: path)
    }

    /// Starts the accept thread.
    public func start() {
        detachThread(name: "control") { [self] in
            while true {
                let channel: VhostUserChannel?
                do { channel = try listener.accept() } catch {
                    log("control socket: accept failed: \(error)")
                    usleep(100_000)
                    continue
                }
                guard let channel else { continue }
                detachThread(name: "control-conn") { [self] in serve(channel.socket) }
            }
        }
    }

    private func serve(_ socket: FileDescriptor) {
        while true {
            do {
                guard let (body, descriptors) = try ControlFraming.receive(socket) else { return }
                let response: ControlResponse
                if let request = try? JSONDecoder().decode(ControlRequest.self, from: body) {
                    response = service.handle(request, descriptors: descriptors)
                    log("control: \(request.op.rawValue) \(request.socket ?? ""): \(response.ok ? "ok" : response.error ?? "refused")")
                } else {
                    response = ControlResponse(ok: false, error: "the request is not a JSON control request")
                }
                try ControlFraming.send(socket, try JSONEncoder().encode(response))
            } catch {
                log("control socket: connection closed: \(error)")
                return
            }
        }
    }
}

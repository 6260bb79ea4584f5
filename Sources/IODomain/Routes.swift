import Foundation
import GodwitSystem
import NBD
import Virtio

/// How one VM disk's requests travel (DESIGN.md, "Failover"): to the local device, to a replica on
/// another host, or to both.
public enum DeviceRoute: String, Codable, Sendable, CaseIterable {
    case local, remote, mirror
}

/// Something a route reports: a fault, a switch, a sync's progress. `kind` is one of local-fault,
/// failover, replica-fault, sync-started, sync-failed, in-sync, route, replica-detached.
public struct RouteEvent: Codable, Equatable, Sendable {
    public var kind: String
    public var route: DeviceRoute
    public var reason: String?
    /// Requests held while the event happened (failover).
    public var held: Int?
    /// How long it took (failover: from the fault to the replayed request's completion).
    public var milliseconds: Double?
}

/// What a route reports about itself (for `godwit ctl` and tests).
public struct RouteStatus: Codable, Equatable, Sendable {
    public var route: DeviceRoute
    public var replica: Bool
    public var replicaInSync: Bool
    /// Bytes of the disk the replica still lacks (written while it was out of sync, or not copied yet).
    public var bytesOutOfSync: UInt64
    /// 0...1 while a sync runs (nil otherwise).
    public var syncProgress: Double?
    /// Requests waiting behind a failover now.
    public var held: Int
    public var failovers: Int
    public var localFailed: Bool
}

/// The replica side of a route: a byte range with reads, writes, flush, trim and zeroing (an NBD export
/// through `NBDClient`).
public protocol ReplicaStorage: AnyObject {
    var size: UInt64 { get }
    func read(at offset: UInt64, into buffer: UnsafeMutableRawBufferPointer) throws
    func write(at offset: UInt64, from buffer: UnsafeRawBufferPointer, fua: Bool) throws
    func flush() throws
    func trim(at offset: UInt64, length: UInt64) throws
    func writeZeroes(at offset: UInt64, length: UInt64, mayUnmap: Bool, fua: Bool) throws
    /// Cuts the replica off under a call that does not return (a dead network), so that it fails.
    func abort()
}

extension ReplicaStorage {
    public func abort() {}
}

extension NBDClient: ReplicaStorage {}

/// Which chunks of a disk a replica lacks, one bit per `chunkSize` bytes.
struct ChunkBitmap {
    let chunkSize: UInt64
    let chunks: Int
    private var words: [UInt64]
    private(set) var count = 0

    init(capacity: UInt64, chunkSize: UInt64) {
        self.chunkSize = chunkSize
        chunks = Int((capacity + chunkSize - 1) / chunkSize)
        words = [UInt64](repeating: 0, count: (chunks + 63) / 64)
    }

    /// Marks every chunk `[offset, offset + length)` touches (a range past the end is clipped).
    mutating func mark(offset: UInt64, length: UInt64) {
        guard length > 0, chunks > 0 else { return }
        let first = Int(min(offset / chunkSize, UInt64(chunks - 1)))
        let (end, overflow) = offset.addingReportingOverflow(length - 1)
        let last = Int(min((overflow ? UInt64.max : end) / chunkSize, UInt64(chunks - 1)))
        for chunk in first...last where words[chunk / 64] & (1 << (chunk % 64)) == 0 {
            // In bounds: chunk < chunks, so chunk / 64 < words.count.
            words[chunk / 64] |= 1 << (chunk % 64)
            count += 1
        }
    }

    mutating func markAll() { mark(offset: 0, length: UInt64(chunks) * chunkSize) }

    /// Clears and returns the first marked chunk, if any.
    mutating func takeFirst() -> Int? {
        for (i, word) in words.enumerated() where word != 0 {
            let bit = word.trailingZeroBitCount
            words[i] &= ~(1 << UInt64(bit))
            count -= 1
            return i * 64 + bit
        }
        return nil
    }
}

/// A `BlockBackend` that routes a VM disk's requests: `local` (the device), `remote` (a replica, an NBD
/// export on another host) or `mirror` (both; a write completes only when both have it, FLUSH goes
/// to both). It is the I/O domain's multiplexer for one VM device.
///
/// - A replica attached while the disk runs is brought in sync in the background: every chunk is
///   copied, chunks written meanwhile are copied again, then the route becomes `mirror`.
/// - When the local device fails a request (an error, or no answer within `localTimeout`) and the
///   replica is in sync, nothing fails: that request and every later one wait (held), the route
///   becomes `remote`, and they run there in order. Without a replica in sync the guest gets the
///   error, as with real hardware, and the event says why.
/// - When the replica fails while the local device is healthy, the route degrades to `local`, the
///   chunks written from then on are remembered, and a returning replica gets only those.
///
/// Requests run one at a time, in the order they arrive, so that no write is reordered across a
/// FLUSH or lost between the two sides during a switch.
public final class RoutedBlockBackend: BlockBackend, @unchecked Sendable {
    public let local: BlockBackend
    public let capacity: UInt64
    public let readOnly: Bool
    public let blockSize: UInt32
    public let supportsDiscard: Bool
    public let supportsWriteZeroes: Bool
    /// No answer from the local device within this many seconds counts as a failure (nil: wait).
    public var localTimeout: Double?
    /// Called (on the thread that saw it) for each event.
    public var onEvent: ((RouteEvent) -> Void)?

    private let requestLock = Lock()       // one request at a time, and sync's final cut-over
    private let state = Condition()        // everything below
    private var route: DeviceRoute = .local
    private var replica: ReplicaStorage?
    private var replicaInSync = false
    private var tracking = false           // remembering chunks written while the replica lacks them
    private var bitmap: ChunkBitmap
    private var syncTotal = 0
    private var syncing = false
    private var held = 0
    private var failoverStarted: Double?
    private var failovers = 0
    private var localFailed = false
    private let localWorker = LocalWorker()
    /// Where a mirrored request's replica half runs (one at a time, as requests are).
    private let remoteQueue = DispatchQueue(label: "route-remote")

    public init(local: BlockBackend, chunkSize: UInt64 = 64 << 10) {
        self.local = local
        capacity = local.capacity
        readOnly = local.readOnly
        blockSize = local.blockSize
        supportsDiscard = local.supportsDiscard
        supportsWriteZeroes = local.supportsWriteZeroes
        bitmap = ChunkBitmap(capacity: local.capacity, chunkSize: chunkSize)
    }

    public var status: RouteStatus {
        state.withLock {
            RouteStatus(route: route, replica: replica != nil, replicaInSync: replicaInSync,
                        bytesOutOfSync: min(UInt64(bitmap.count) * bitmap.chunkSize, capacity),
                        syncProgress: syncing && syncTotal > 0 ? 1 - Double(bitmap.count) / Double(syncTotal) : nil,
                        held: held, failovers: failovers, localFailed: localFailed)
        }
    }

    private func emit(_ kind: String, reason: String? = nil, held: Int? = nil, milliseconds: Double? = nil) {
        let route = state.withLock { self.route }
        onEvent?(RouteEvent(kind: kind, route: route, reason: reason, held: held, milliseconds: milliseconds))
    }

    // MARK: Replicas and routes

    /// Attaches `replica` and starts bringing it in sync in the background (`resync`: it already holds
    /// the disk except the chunks written since it left, which the route remembered).
    public func attachReplica(_ replica: ReplicaStorage, resync: Bool = false) throws {
        guard replica.size >= capacity else {
            throw IODomainError.badRequest("the replica has \(replica.size) bytes, the disk \(capacity)")
        }
        try state.withLock {
            guard self.replica == nil else { throw IODomainError.badRequest("the disk already has a replica") }
            guard !localFailed else { throw IODomainError.badRequest("the local device has failed: nothing to copy from") }
            self.replica = replica
            replicaInSync = false
            if !(resync && tracking) { bitmap.markAll() }
            tracking = true
            syncTotal = max(bitmap.count, 1)
            syncing = true
            waitForAsync()  // writes that went straight to the device land before the copy reads them
        }
        emit("sync-started", reason: resync ? "resync of the chunks written while the replica was away" : "full copy")
        let thread = Thread { [self] in runSync(replica) }
        thread.name = "route-sync"
        thread.start()
    }

    /// Brings an attached replica that fell out of sync (the route was set to `local` by hand) back in
    /// sync from the chunks written since; the route becomes `mirror` when done.
    public func resync() throws {
        let attached: ReplicaStorage = try state.withLock {
            guard let replica = self.replica else { throw IODomainError.badRequest("the disk has no replica") }
            guard !replicaInSync, !syncing else { throw IODomainError.badRequest(syncing ? "a sync is running" : "the replica is in sync") }
            guard !localFailed else { throw IODomainError.badRequest("the local device has failed") }
            syncTotal = max(bitmap.count, 1)
            syncing = true
            return replica
        }
        emit("sync-started", reason: "resync of the chunks written while the replica was out of sync")
        let thread = Thread { [self] in runSync(attached) }
        thread.name = "route-sync"
        thread.start()
    }

    /// Stops using the replica (the route becomes `local`, remembering what the replica misses).
    public func detachReplica() throws {
        try requestLock.withLock {
            try state.withLock {
                guard replica != nil else { throw IODomainError.badRequest("the disk has no replica") }
                guard !localFailed else { throw IODomainError.badRequest("the local device has failed: the replica is all there is") }
                replica = nil
                replicaInSync = false
                syncing = false
                route = .local
                tracking = true
            }
        }
        emit("replica-detached")
    }

    /// Switches the route by hand: `mirror` and `remote` need a replica in sync, `local` a working device.
    public func setRoute(_ newRoute: DeviceRoute) throws {
        try requestLock.withLock {
            try state.withLock {
                switch newRoute {
                case .local:
                    guard !localFailed else { throw IODomainError.badRequest("the local device has failed") }
                    if replica != nil { replicaInSync = false; tracking = true }
                case .mirror:
                    guard !localFailed else { throw IODomainError.badRequest("the local device has failed") }
                    guard replica != nil, replicaInSync else {
                        throw IODomainError.badRequest(replica == nil ? "mirror needs a replica (attach one)"
                                                                      : "the replica is out of sync: resync it (attach with resync) first")
                    }
                case .remote:
                    guard replica != nil, replicaInSync else { throw IODomainError.badRequest("remote needs a replica in sync") }
                }
                route = newRoute
                waitForAsync()
            }
        }
        emit("route", reason: "set by hand")
    }

    private func runSync(_ replica: ReplicaStorage) {
        let chunkSize = bitmap.chunkSize
        var buffer = [UInt8](repeating: 0, count: Int(chunkSize))
        while true {
            let next: Int? = state.withLock { self.replica === replica && syncing ? bitmap.takeFirst() : nil }
            guard let chunk = next else {
                let current = state.withLock { self.replica === replica && syncing }
                guard current else { return }
                // Nothing marked: cut over with no request in flight, so none is between the two sides.
                let done: Bool = requestLock.withLock {
                    state.withLock {
                        guard self.replica === replica, syncing, bitmap.count == 0 else { return false }
                        syncing = false
                        replicaInSync = true
                        tracking = false
                        route = .mirror
                        return true
                    }
                }
                if done {
                    do { try replica.flush() } catch { replicaFailed(replica, error); return }
                    emit("in-sync")
                    return
                }
                continue
            }
            let offset = UInt64(chunk) * chunkSize
            let length = Int(min(chunkSize, capacity - offset))
            // In bounds: length <= chunkSize == buffer.count.
            let copied: Result<Void, Error> = buffer.withUnsafeMutableBytes { raw in
                let part = UnsafeMutableRawBufferPointer(rebasing: raw[0..<length])
                do { try local.read(at: offset, into: [part]) } catch {
                    return .failure(IODomainError.system("the local device failed while the replica was being copied: \(error)"))
                }
                do { try replica.write(at: offset, from: UnsafeRawBufferPointer(part), fua: false) } catch { return .failure(error) }
                return .success(())
            }
            if case .failure(let error) = copied {
                state.withLock { bitmap.mark(offset: offset, length: UInt64(length)) }
                if case IODomainError.system(let reason) = error, reason.hasPrefix("the local device failed") {
                    // The copy stops; the replica stays attached and out of sync. Guest requests meet
                    // the local failure themselves and get the error (no replica is in sync).
                    let stop = state.withLock { () -> Bool in
                        guard self.replica === replica else { return false }
                        syncing = false
                        return true
                    }
                    if stop { emit("sync-failed", reason: reason) }
                } else {
                    replicaFailed(replica, error)
                }
                return
            }
        }
    }

    /// The replica failed: drop it, keep the local device, remember what it misses.
    private func replicaFailed(_ failed: ReplicaStorage, _ error: Error) {
        let dropped: Bool = state.withLock {
            guard replica === failed else { return false }
            replica = nil
            replicaInSync = false
            syncing = false
            tracking = true
            if route != .local && !localFailed { route = .local }
            return true
        }
        if dropped { emit("replica-fault", reason: "\(error); the disk runs on the local device and remembers what the replica misses") }
    }

    // MARK: Asynchronous pass-through

    /// While the route is plain local (no replica, nothing to remember, no time-out, a healthy
    /// device) reads and writes go straight to the local device's engine, many at a time; in every
    /// other state they run one at a time through the route. Leaving plain local waits until what
    /// went out that way has come back (`waitForAsync`), so that no write slips past a replica's copy.
    private var plainLocal: Bool { route == .local && replica == nil && !tracking && localTimeout == nil && !localFailed }
    private var asyncInFlight = 0
    private var asyncHandlers: [ObjectIdentifier: CountingHandler] = [:]

    /// Forwards completions and counts them back in.
    private final class CountingHandler: AsyncIOHandler {
        let inner: AsyncIOHandler
        weak var route: RoutedBlockBackend?
        init(_ inner: AsyncIOHandler, _ route: RoutedBlockBackend) {
            self.inner = inner
            self.route = route
        }
        func asyncIOCompleted(tag: UInt64, result: Int) {
            inner.asyncIOCompleted(tag: tag, result: result)
            route?.asyncReturned(1)
        }
        func asyncIOBatchEnded() { inner.asyncIOBatchEnded() }
    }

    fileprivate func asyncReturned(_ count: Int) {
        state.withLock {
            asyncInFlight -= count
            if asyncInFlight == 0 { state.broadcast() }
        }
    }

    /// With the state lock held: waits until no request that went straight to the device is out.
    private func waitForAsync() { state.wait(until: { asyncInFlight == 0 }) }

    public func acceptsAsync(isWrite: Bool, offset: UInt64, buffers: [UnsafeMutableRawBufferPointer]) -> Bool {
        state.withLock { plainLocal } && local.acceptsAsync(isWrite: isWrite, offset: offset, buffers: buffers)
    }

    public func submitAsync(_ requests: [BlockIORequest], handler: AsyncIOHandler) -> Int {
        let counting: CountingHandler? = state.withLock {
            guard plainLocal else { return nil }
            asyncInFlight += requests.count
            let key = ObjectIdentifier(handler)
            if let existing = asyncHandlers[key], existing.inner === handler { return existing }
            let made = CountingHandler(handler, self)
            asyncHandlers[key] = made
            return made
        }
        guard let counting else { return 0 }  // the caller runs them synchronously, through the route
        let started = local.submitAsync(requests, handler: counting)
        if started < requests.count { asyncReturned(requests.count - started) }
        return started
    }

    public func setAsyncPolling(_ on: Bool) { local.setAsyncPolling(on) }
    public func pollAsync() -> Int { local.pollAsync() }

    // MARK: Requests

    private enum Operation {
        case read(UInt64, [UnsafeMutableRawBufferPointer])
        case write(UInt64, [UnsafeRawBufferPointer])
        case flush
        case discard(UInt64, UInt64)
        case writeZeroes(UInt64, UInt64, Bool)

        /// The range it changes, if any.
        var written: (UInt64, UInt64)? {
            switch self {
            case let .write(offset, buffers): return (offset, buffers.reduce(0) { $0 + UInt64($1.count) })
            case let .discard(offset, length), let .writeZeroes(offset, length, _): return (offset, length)
            default: return nil
            }
        }
    }

    public func read(at offset: UInt64, into buffers: [UnsafeMutableRawBufferPointer]) throws { try perform(.read(offset, buffers)) }
    public func write(at offset: UInt64, from buffers: [UnsafeRawBufferPointer]) throws { try perform(.write(offset, buffers)) }
    public func flush() throws { try perform(.flush) }
    public func discard(at offset: UInt64, length: UInt64) throws { try perform(.discard(offset, length)) }
    public func writeZeroes(at offset: UInt64, length: UInt64, mayUnmap: Bool) throws { try perform(.writeZeroes(offset, length, mayUnmap)) }

    private func perform(_ operation: Operation) throws {
        // Requests behind a failover wait here: count them.
        state.withLock { if failoverStarted != nil { held += 1 } }
        try requestLock.withLock {
            state.withLock { if held > 0 { held -= 1 } }
            let (route, replica) = state.withLock { (self.route, self.replica) }
            switch route {
            case .remote:
                guard let replica else { throw IODomainError.system("route remote without a replica") }
                try runRemote(operation, replica)
            case .local, .mirror:
                let started = monotonicSeconds()
                // Mirrored: the replica's half runs beside the local one, so a write costs the slower of
                // the two, not their sum. (Replaying it on the replica after a local failure repeats the
                // same bytes at the same place: harmless.)
                let remote = RemoteOutcome()
                let group = DispatchGroup()
                if route == .mirror, let replica {
                    remoteQueue.async(group: group) { [self] in remote.result = Result { try runRemote(operation, replica) } }
                }
                do {
                    try runLocal(operation)
                } catch {
                    group.wait()
                    try failOver(operation, error, requestStarted: started)
                    return
                }
                // A replica that does not answer within the fault time-out (or 30 s) is cut off and counts as failed.
                // The replica is across a network and another host's page cache: it gets twenty times the
                // local time-out, at least a second (a 50 ms limit dropped healthy replicas on a busy host).
                var replicaLimit = localTimeout.map { max(1, $0 * 20) } ?? 30
                if case .flush = operation { replicaLimit *= 20 }
                if group.wait(timeout: .now() + replicaLimit) == .timedOut, let replica {
                    replica.abort()
                    group.wait()
                    if case .success? = remote.result {} else {
                        remote.result = .failure(IODomainError.system("the replica did not answer within \(Int((localTimeout ?? 30) * 1000)) ms"))
                    }
                }
                if route == .mirror, let replica, case .failure(let error)? = remote.result {
                    if let range = operation.written { state.withLock { bitmap.mark(offset: range.0, length: range.1) } }
                    replicaFailed(replica, error)
                } else if route != .mirror, let range = operation.written {
                    state.withLock { if tracking { bitmap.mark(offset: range.0, length: range.1) } }
                }
            }
        }
    }

    /// The local device failed `operation` (sent at `requestStarted`): with a replica in sync, switch to
    /// it and replay; else the error. The failover event's time runs from the failed request's start to
    /// the replayed one's completion (for a time-out, the time-out is part of it).
    private func failOver(_ operation: Operation, _ error: Error, requestStarted: Double) throws {
        let started = monotonicSeconds()
        let replica: ReplicaStorage? = state.withLock {
            localFailed = true
            guard let replica = self.replica, replicaInSync else { return nil }
            failoverStarted = started
            route = .remote
            failovers += 1
            return replica
        }
        guard let replica else {
            emit("local-fault", reason: "\(error); no replica in sync, so the guest gets the error")
            throw error
        }
        emit("local-fault", reason: "\(error); holding requests and switching to the replica", held: state.withLock { held })
        defer { state.withLock { failoverStarted = nil } }
        try runRemote(operation, replica)
        let heldNow = state.withLock { held }
        let now = monotonicSeconds()
        emit("failover", reason: String(format: "the disk runs on the replica (%.1f ms after the fault was seen)", (now - started) * 1000),
             held: heldNow, milliseconds: (now - requestStarted) * 1000)
    }

    private func runLocal(_ operation: Operation) throws {
        guard var timeout = localTimeout else { return try runLocalDirectly(operation) }
        // A slow device is only a failed one when a replica in sync can take over: without one the
        // guest waits, as with a slow disk, rather than get an error. A FLUSH may legitimately take
        // far longer than a write on a busy host (fdatasync), so its limit is twenty times longer.
        let noFallback = { [self] in state.withLock { replica == nil || !replicaInSync } }
        if case .flush = operation { timeout *= 20 }
        // With a time-out the device is driven from a worker; reads land in a bounce buffer first, so
        // that an answer coming after we gave up cannot write into guest memory the guest reuses.
        switch operation {
        case let .read(offset, buffers):
            let total = buffers.reduce(0) { $0 + $1.count }
            let bounce = UnsafeMutableRawBufferPointer.allocate(byteCount: max(total, 1), alignment: 4096)
            let finished = try localWorker.run(timeout: timeout, keepWaiting: noFallback) { [local] in
                try local.read(at: offset, into: [UnsafeMutableRawBufferPointer(rebasing: bounce[0..<total])])
            }
            guard finished else {
                // The worker may still write into `bounce`: leave it allocated (a small, bounded leak per dead device).
                throw IODomainError.system("the local device did not answer within \(Int(timeout * 1000)) ms")
            }
            var position = 0
            for buffer in buffers {
                // In bounds: the buffers' counts sum to total == the bounce buffer's used length.
                buffer.copyMemory(from: UnsafeRawBufferPointer(rebasing: bounce[position..<(position + buffer.count)]))
                position += buffer.count
            }
            bounce.deallocate()
        default:
            let finished = try localWorker.run(timeout: timeout, keepWaiting: noFallback) { [self] in try runLocalDirectly(operation) }
            guard finished else { throw IODomainError.system("the local device did not answer within \(Int(timeout * 1000)) ms") }
        }
    }

    private func runLocalDirectly(_ operation: Operation) throws {
        switch operation {
        case let .read(offset, buffers): try local.read(at: offset, into: buffers)
        case let .write(offset, buffers): try local.write(at: offset, from: buffers)
        case .flush: try local.flush()
        case let .discard(offset, length): try local.discard(at: offset, length: length)
        case let .writeZeroes(offset, length, mayUnmap): try local.writeZeroes(at: offset, length: length, mayUnmap: mayUnmap)
        }
    }

    private func runRemote(_ operation: Operation, _ replica: ReplicaStorage) throws {
        switch operation {
        case let .read(offset, buffers):
            var position = offset
            for buffer in buffers {
                try replica.read(at: position, into: buffer)
                position += UInt64(buffer.count)
            }
        case let .write(offset, buffers):
            var position = offset
            for buffer in buffers {
                try replica.write(at: position, from: buffer, fua: false)
                position += UInt64(buffer.count)
            }
        case .flush: try replica.flush()
        case let .discard(offset, length): try replica.trim(at: offset, length: length)
        case let .writeZeroes(offset, length, mayUnmap): try replica.writeZeroes(at: offset, length: length, mayUnmap: mayUnmap, fua: false)
        }
    }
}

/// The replica half of a mirrored request, handed back across the dispatch group's wait.
private final class RemoteOutcome: @unchecked Sendable {
    var result: Result<Void, Error>?
}


/// One thread that runs local device calls so that the caller can stop waiting for them. Once a call
/// overran its time-out the worker is considered lost (it may never return) and every later call fails.
final class LocalWorker: @unchecked Sendable {
    private let condition = Condition()
    private var job: (() throws -> Void)?
    private var result: Result<Void, Error>?
    private var generation = 0
    private var lost = false
    private var started = false

    /// Runs `body` on the worker; false when it did not finish within `timeout` seconds. While
    /// `keepWaiting` says so (nothing could take over from a slow device), it waits on, a time-out at a time.
    func run(timeout: Double, keepWaiting: () -> Bool = { false }, _ body: @escaping () throws -> Void) throws -> Bool {
        let mine: Int = try condition.withLock {
            guard !lost else { throw IODomainError.system("the local device is not answering (an earlier request never returned)") }
            if !started {
                started = true
                let thread = Thread { [self] in loop() }
                thread.name = "route-local"
                thread.start()
            }
            generation += 1
            job = body
            result = nil
            condition.broadcast()
            return generation
        }
        let finished: Bool = condition.withLock {
            var done = condition.wait(until: { generation == mine && result != nil }, timeout: timeout)
            while !done && keepWaiting() { done = condition.wait(until: { generation == mine && result != nil }, timeout: timeout) }
            if !done { lost = true }
            return done
        }
        guard finished else { return false }
        try condition.withLock { result }?.get()
        return true
    }

    private func loop() {
        while true {
            let body: () throws -> Void = condition.withLock {
                condition.wait(until: { job != nil })
                defer { job = nil }
                return job!
            }
            let outcome = Result { try body() }
            condition.withLock {
                result = outcome
                condition.broadcast()
            }
        }
    }
}

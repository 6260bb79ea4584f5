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
    /// Requests held or moved to the replica while the event happened (failover).
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

/// One command for a replica's asynchronous interface (the NBD client's).
public typealias ReplicaRequest = NBDClient.Request

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
    /// Starts `request` without waiting; `completion` runs once, later, on another thread (never inside
    /// this call). Returns false when the replica has no asynchronous interface: the route then runs
    /// the synchronous calls one at a time, in order, on a queue of its own.
    func submit(_ request: ReplicaRequest, completion: @escaping (Error?) -> Void) -> Bool
    /// Asks for `body` after each batch of completions, on the thread that ran them; returns false when
    /// the replica has no such batches (every completion then stands alone).
    func setCompletionBatchEnd(_ body: @escaping () -> Void) -> Bool
}

extension ReplicaStorage {
    public func abort() {}
    public func submit(_ request: ReplicaRequest, completion: @escaping (Error?) -> Void) -> Bool { false }
    public func setCompletionBatchEnd(_ body: @escaping () -> Void) -> Bool { false }
}

/// Many commands in flight on the one connection (libnbd's asynchronous calls).
extension NBDClient: ReplicaStorage {
    public func submit(_ request: ReplicaRequest, completion: @escaping (Error?) -> Void) -> Bool {
        start(request) { (error: NBDError?) in completion(error) }
        return true
    }

    public func setCompletionBatchEnd(_ body: @escaping () -> Void) -> Bool {
        setCompletionBatchEnd(body) as Void
        return true
    }
}

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
///   replica is in sync, nothing fails: that request and every one in flight are answered by the
///   replica (replayed there in arrival order when it did not have them), later ones wait (held) until
///   the failed request's replay is back, and the route becomes `remote`. Without a replica in sync
///   the guest gets the error, as with real hardware, and the event says why.
/// - When the replica fails while the local device is healthy, the route degrades to `local`, the
///   chunks written from then on (and those whose replica half was still out) are remembered, and a
///   returning replica gets only those.
///
/// Many requests are in flight at once and complete in any order (`RouteRequests.swift`): the local
/// half on the device's engine (or a worker thread), the replica half on the replica at the same time.
/// A FLUSH starts only when every write that arrived before it is done on both sides, and a request
/// that overlaps an earlier write waits for it, so both sides apply writes to a block in one order.
public final class RoutedBlockBackend: BlockBackend, @unchecked Sendable {
    public let local: BlockBackend
    public let capacity: UInt64
    public let readOnly: Bool
    public let blockSize: UInt32
    public let supportsDiscard: Bool
    public let supportsWriteZeroes: Bool
    /// No answer from the local device within this many seconds (twenty times as long for a FLUSH)
    /// counts as a failure when a replica in sync can take over; without one the guest waits, as with
    /// a slow disk (nil: always wait). A replica half gets twenty times as long, at least 1 s (30 s
    /// without a time-out), and is then cut off.
    public var localTimeout: Double? {
        get { state.withLock { timeout } }
        set { state.withLock { timeout = newValue } }
    }
    /// Called for each event, on the thread that saw it, never with the route's lock held.
    public var onEvent: ((RouteEvent) -> Void)?

    /// Guards everything below and in `RouteRequests.swift`; waiters (synchronous callers, drains,
    /// the watchdog) wait on it.
    let state = Condition()
    var timeout: Double?
    var route: DeviceRoute = .local
    var replica: ReplicaStorage?
    /// Runs the synchronous calls of a replica without an asynchronous interface, one at a time
    /// (one queue per attached replica, so that a call stuck on a dead one holds up nothing else).
    var replicaQueue: DispatchQueue?
    var replicaInSync = false
    var tracking = false           // remembering chunks written while the replica lacks them
    var bitmap: ChunkBitmap
    var syncTotal = 0
    var syncing = false
    var failovers = 0
    var localFailed = false

    // The request pipeline (RouteRequests.swift).
    var nextID: UInt64 = 0
    /// Requests admitted and not finished (started, or blocked behind an earlier one), by arrival.
    var unfinished: [RouteRequest] = []
    /// Requests that arrived while a gate was up (a failover, a switch, the sync's cut-over), by arrival.
    var heldRequests: [RouteRequest] = []
    var gates = 0
    /// The request whose local failure started the failover now running.
    var failingOver: RouteRequest?
    var failoverSeen = 0.0
    var failoverMoved = 0
    /// What the code under the lock left to do after it (`locked`).
    var effects = RouteEffects()
    var watchdogStarted = false
    /// The attached replica calls `answerBatch` after each batch of its completions.
    var replicaBatches = false
    /// Answers held for the end of the replica's batch (their own lock: they are handed over without the state lock).
    let batchLock = Lock()
    var batchedAnswers: [(handler: AsyncIOHandler, tag: UInt64, result: Int)] = []
    let workers = LocalWorkers()
    let delivery = CompletionDelivery()
    let engineCompletions = EngineCompletions()

    public init(local: BlockBackend, chunkSize: UInt64 = 64 << 10) {
        self.local = local
        capacity = local.capacity
        readOnly = local.readOnly
        blockSize = local.blockSize
        supportsDiscard = local.supportsDiscard
        supportsWriteZeroes = local.supportsWriteZeroes
        bitmap = ChunkBitmap(capacity: local.capacity, chunkSize: chunkSize)
        engineCompletions.route = self
    }

    deinit {
        workers.stop()
        delivery.stop()
    }

    public var status: RouteStatus {
        state.withLock {
            RouteStatus(route: route, replica: replica != nil, replicaInSync: replicaInSync,
                        bytesOutOfSync: min(UInt64(bitmap.count) * bitmap.chunkSize, capacity),
                        syncProgress: syncing && syncTotal > 0 ? 1 - Double(bitmap.count) / Double(syncTotal) : nil,
                        held: heldRequests.count, failovers: failovers, localFailed: localFailed)
        }
    }

    /// With the lock held: an event, emitted after the lock is released.
    func eventLocked(_ kind: String, reason: String? = nil, held: Int? = nil, milliseconds: Double? = nil) {
        effects.events.append(RouteEvent(kind: kind, route: route, reason: reason, held: held, milliseconds: milliseconds))
    }

    /// How `locked` hands finished requests to their devices: `.now` from this thread (one of the
    /// route's own: the engine's reaper, the NBD poller, a worker, the watchdog, a caller), `.later`
    /// through the delivery thread (this thread was called by a device, which holds its lock),
    /// `.batch` at the end of the replica's or the engine's batch of completions (`answerBatch`), so that a device
    /// gets answers that came back together in one batch (one interrupt, new requests taken together).
    enum Answering { case now, later, batch }

    /// Runs `body` with the lock held, then carries out what it left in `effects` (events, I/O to
    /// start, replicas to cut off, answers) after releasing it.
    func locked<T>(answering: Answering = .now, _ body: () -> T) -> T {
        let (result, taken): (T, RouteEffects) = state.withLock {
            let result = body()
            defer { effects = RouteEffects() }
            return (result, effects)
        }
        apply(taken, answering: answering)
        return result
    }

    // MARK: Replicas and routes

    /// Attaches `replica` and starts bringing it in sync in the background (`resync`: it already holds
    /// the disk except the chunks written since it left, which the route remembered).
    public func attachReplica(_ replica: ReplicaStorage, resync: Bool = false) throws {
        guard replica.size >= capacity else {
            throw IODomainError.badRequest("the replica has \(replica.size) bytes, the disk \(capacity)")
        }
        let refused: IODomainError? = locked {
            guard self.replica == nil else { return .badRequest("the disk already has a replica") }
            guard !localFailed else { return .badRequest("the local device has failed: nothing to copy from") }
            self.replica = replica
            replicaQueue = DispatchQueue(label: "route-replica")
            replicaBatches = replica.setCompletionBatchEnd { [weak self] in self?.answerBatch() }
            replicaInSync = false
            if !(resync && tracking) { bitmap.markAll() }
            tracking = true
            syncTotal = max(bitmap.count, 1)
            syncing = true
            // Writes that went straight to the device land before the copy reads them.
            state.wait(until: { asyncInFlight == 0 })
            eventLocked("sync-started", reason: resync ? "resync of the chunks written while the replica was away" : "full copy")
            return nil
        }
        if let refused { throw refused }
        startWatchdog()
        detachThread(name: "route-sync") { [self] in runSync(replica) }
    }

    /// Brings an attached replica that fell out of sync (the route was set to `local` by hand) back in
    /// sync from the chunks written since; the route becomes `mirror` when done.
    public func resync() throws {
        let attached: Result<ReplicaStorage, IODomainError> = locked {
            guard let replica = self.replica else { return .failure(.badRequest("the disk has no replica")) }
            guard !replicaInSync, !syncing else { return .failure(.badRequest(syncing ? "a sync is running" : "the replica is in sync")) }
            guard !localFailed else { return .failure(.badRequest("the local device has failed")) }
            syncTotal = max(bitmap.count, 1)
            syncing = true
            eventLocked("sync-started", reason: "resync of the chunks written while the replica was out of sync")
            return .success(replica)
        }
        let replica = try attached.get()
        detachThread(name: "route-sync") { [self] in runSync(replica) }
    }

    /// Stops using the replica (the route becomes `local`, remembering what the replica misses).
    public func detachReplica() throws {
        let refused: IODomainError? = quiesced {
            guard replica != nil else { return .badRequest("the disk has no replica") }
            guard !localFailed else { return .badRequest("the local device has failed: the replica is all there is") }
            replica = nil
            replicaQueue = nil
            replicaInSync = false
            syncing = false
            route = .local
            tracking = true
            eventLocked("replica-detached")
            return nil
        }
        if let refused { throw refused }
    }

    /// Switches the route by hand: `mirror` and `remote` need a replica in sync, `local` a working device.
    public func setRoute(_ newRoute: DeviceRoute) throws {
        let refused: IODomainError? = quiesced {
            switch newRoute {
            case .local:
                guard !localFailed else { return .badRequest("the local device has failed") }
                if replica != nil { replicaInSync = false; tracking = true }
            case .mirror:
                guard !localFailed else { return .badRequest("the local device has failed") }
                guard replica != nil, replicaInSync else {
                    return .badRequest(replica == nil ? "mirror needs a replica (attach one)"
                                                      : "the replica is out of sync: resync it (attach with resync) first")
                }
            case .remote:
                guard replica != nil, replicaInSync else { return .badRequest("remote needs a replica in sync") }
            }
            route = newRoute
            eventLocked("route", reason: "set by hand")
            return nil
        }
        if let refused { throw refused }
    }

    /// Holds new requests, waits until none is in flight, runs `body` (with the lock held), then lets
    /// the held requests go on under whatever `body` decided.
    func quiesced<T>(_ body: () -> T) -> T {
        locked {
            gates += 1
            state.wait(until: { unfinished.isEmpty && asyncInFlight == 0 })
            let result = body()
            gates -= 1
            releaseHeldLocked()
            return result
        }
    }

    private func runSync(_ replica: ReplicaStorage) {
        let chunkSize = state.withLock { bitmap.chunkSize }  // the bitmap is marked under the lock by other threads
        var buffer = [UInt8](repeating: 0, count: Int(chunkSize))
        while true {
            let next: Int? = state.withLock { self.replica === replica && syncing ? bitmap.takeFirst() : nil }
            guard let chunk = next else {
                let current = state.withLock { self.replica === replica && syncing }
                guard current else { return }
                // Nothing marked: cut over with no request in flight, so none is between the two sides.
                let done: Bool = locked {
                    guard self.replica === replica, syncing, bitmap.count == 0 else { return false }
                    gates += 1
                    state.wait(until: { (unfinished.isEmpty && asyncInFlight == 0) || !(self.replica === replica && syncing) })
                    defer {
                        gates -= 1
                        releaseHeldLocked()
                    }
                    guard self.replica === replica, syncing, bitmap.count == 0 else { return false }
                    syncing = false
                    replicaInSync = true
                    tracking = false
                    route = .mirror
                    return true
                }
                if done {
                    do { try replica.flush() } catch { replicaFailed(replica, error); return }
                    locked { eventLocked("in-sync") }
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
                if case IODomainError.system(let reason) = error, reason.hasPrefix("the local device failed") {
                    // The copy stops; the replica stays attached and out of sync. Guest requests meet
                    // the local failure themselves and get the error (no replica is in sync).
                    locked {
                        bitmap.mark(offset: offset, length: UInt64(length))
                        guard self.replica === replica else { return }
                        syncing = false
                        eventLocked("sync-failed", reason: reason)
                    }
                } else {
                    locked { bitmap.mark(offset: offset, length: UInt64(length)) }
                    replicaFailed(replica, error)
                }
                return
            }
        }
    }

    /// The replica failed: drop it, keep the local device, remember what it misses.
    func replicaFailed(_ failed: ReplicaStorage, _ error: Error) {
        locked { replicaFaultLocked(failed, error) }
    }

    // MARK: Asynchronous pass-through

    /// While the route is plain local (no replica, nothing to remember, no time-out, a healthy
    /// device) reads and writes go straight to the local device's engine, with nothing of the route in
    /// between; in every other state they go through the route's requests (`RouteRequests.swift`).
    /// Leaving plain local waits until what went out that way has come back, so that no write slips
    /// past a replica's copy.
    var plainLocal: Bool { route == .local && replica == nil && !tracking && timeout == nil && !localFailed }
    var asyncInFlight = 0
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

    /// Every read and write can be started asynchronously, and FLUSH, DISCARD and WRITE_ZEROES too
    /// (`acceptsAsyncCommands`): plain local sends what the device's engine takes straight to it and
    /// the rest through the route. So a device never waits for the route with its lock held, and the
    /// route's threads may hand answers to the device directly.
    public func acceptsAsync(isWrite: Bool, offset: UInt64, buffers: [UnsafeMutableRawBufferPointer]) -> Bool { true }
    public var acceptsAsyncCommands: Bool { true }

    public func submitAsync(_ requests: [BlockIORequest], handler: AsyncIOHandler) -> Int {
        let counting: CountingHandler? = state.withLock {
            guard plainLocal, requests.allSatisfy({ request in
                guard case .transfer = request.command else { return false }
                return local.acceptsAsync(isWrite: request.isWrite, offset: request.offset, buffers: request.buffers)
            }) else {
                return nil
            }
            asyncInFlight += requests.count
            let key = ObjectIdentifier(handler)
            if let existing = asyncHandlers[key], existing.inner === handler { return existing }
            let made = CountingHandler(handler, self)
            asyncHandlers[key] = made
            return made
        }
        if let counting {
            let started = local.submitAsync(requests, handler: counting)
            if started < requests.count { asyncReturned(requests.count - started) }
            if started == requests.count { return started }
            // The engine is full: the rest go through the route.
            return started + submitThroughRoute(requests[started...], handler: handler)
        }
        return submitThroughRoute(requests[...], handler: handler)
    }

    /// Takes every request into the route; each is answered through `handler` later (never inside this
    /// call: the device holds its lock while it submits).
    private func submitThroughRoute(_ requests: ArraySlice<BlockIORequest>, handler: AsyncIOHandler) -> Int {
        locked(answering: .later) {
            for request in requests {
                let operation: RouteOperation
                switch request.command {
                case .transfer:
                    operation = request.isWrite ? .write(request.offset, request.buffers.map { UnsafeRawBufferPointer($0) })
                                                : .read(request.offset, request.buffers)
                case .flush: operation = .flush
                case .discard(let ranges): operation = .discard(ranges)
                case .writeZeroes(let ranges): operation = .writeZeroes(ranges)
                }
                _ = arriveLocked(operation, reply: .device(handler, tag: request.tag))
            }
        }
        return requests.count
    }

    public func setAsyncPolling(_ on: Bool) { local.setAsyncPolling(on) }

    /// Reaps the engine's completions and hands the route's finished requests to their handlers, on
    /// the calling thread.
    public func pollAsync() -> Int { local.pollAsync() + delivery.drain() }

    // MARK: Synchronous requests

    public func read(at offset: UInt64, into buffers: [UnsafeMutableRawBufferPointer]) throws { try perform(.read(offset, buffers)) }
    public func write(at offset: UInt64, from buffers: [UnsafeRawBufferPointer]) throws { try perform(.write(offset, buffers)) }
    public func flush() throws { try perform(.flush) }
    public func discard(at offset: UInt64, length: UInt64) throws { try perform(.discard([BlockRange(offset: offset, length: length)])) }
    public func writeZeroes(at offset: UInt64, length: UInt64, mayUnmap: Bool) throws {
        try perform(.writeZeroes([BlockRange(offset: offset, length: length, mayUnmap: mayUnmap)]))
    }

    /// Plain local: straight to the device. Otherwise the request joins the others in flight and this
    /// waits for its answer (the route's own threads finish it: waiting here with the device's lock
    /// held blocks nothing the answer needs).
    private func perform(_ operation: RouteOperation) throws {
        // Counted like the requests that went straight to the engine: attaching a replica waits for it.
        let direct: Bool = state.withLock {
            guard plainLocal else { return false }
            asyncInFlight += 1
            return true
        }
        if direct {
            defer { asyncReturned(1) }
            do { try runLocalDirectly(operation) } catch {
                locked { localFaultLocked(nil, error) }
                throw error
            }
            return
        }
        let request = locked { arriveLocked(operation, reply: .caller) }
        let error: Error? = state.withLock {
            state.wait(until: { request.answered })
            return request.error
        }
        if let error { throw error }
    }

    func runLocalDirectly(_ operation: RouteOperation) throws {
        switch operation {
        case let .read(offset, buffers): try local.read(at: offset, into: buffers)
        case let .write(offset, buffers): try local.write(at: offset, from: buffers)
        case .flush: try local.flush()
        case let .discard(ranges): for range in ranges { try local.discard(at: range.offset, length: range.length) }
        case let .writeZeroes(ranges):
            for range in ranges { try local.writeZeroes(at: range.offset, length: range.length, mayUnmap: range.mayUnmap) }
        }
    }
}

import Foundation
import GodwitSystem
import Virtio
#if canImport(Glibc)
import Glibc
#endif

// The request pipeline of `RoutedBlockBackend` in every state but plain local: many requests in
// flight, each with a local half (the device's engine, or a worker thread) and a replica half (the
// replica's asynchronous interface, or a queue of its synchronous calls) that run at the same time,
// finished in whatever order they come back. Everything here runs with the route's lock held, except
// `apply` and what it calls; code under the lock leaves the I/O it decided on in `effects`.

/// What a request does.
enum RouteOperation {
    case read(UInt64, [UnsafeMutableRawBufferPointer])
    case write(UInt64, [UnsafeRawBufferPointer])
    case flush
    case discard([BlockRange])
    case writeZeroes([BlockRange])

    var isRead: Bool { if case .read = self { return true } else { return false } }
    var isFlush: Bool { if case .flush = self { return true } else { return false } }

    /// Bytes read or written (a device's completion reports them; 0 for a command).
    var byteCount: Int {
        switch self {
        case let .read(_, buffers): return buffers.reduce(0) { $0 + $1.count }
        case let .write(_, buffers): return buffers.reduce(0) { $0 + $1.count }
        default: return 0
        }
    }

    /// The ranges it changes (none for a read or FLUSH).
    var written: [(offset: UInt64, length: UInt64)] {
        switch self {
        case let .write(offset, _): return [(offset, UInt64(byteCount))]
        case let .discard(ranges), let .writeZeroes(ranges): return ranges.map { ($0.offset, $0.length) }
        default: return []
        }
    }

    /// The ranges it reads or changes (none for FLUSH).
    var touched: [(offset: UInt64, length: UInt64)] {
        if case let .read(offset, _) = self { return [(offset, UInt64(byteCount))] }
        return written
    }

    /// Whether this must wait for an unfinished `earlier` request: a FLUSH waits for every earlier write
    /// (it covers them on both sides), and a request waits for an earlier one it overlaps when either
    /// writes (so both sides see writes to a block in the same order). Writes after a FLUSH need not
    /// wait for it.
    func mustWait(for earlier: RouteOperation) -> Bool {
        if isFlush { return !earlier.written.isEmpty }
        guard !written.isEmpty || !earlier.written.isEmpty else { return false }
        return touched.contains { mine in
            earlier.touched.contains { theirs in
                mine.length > 0 && theirs.length > 0
                    && mine.offset < theirs.offset &+ theirs.length && theirs.offset < mine.offset &+ mine.length
            }
        }
    }

    /// Its replica half: one command per buffer of a read or write, per range of a discard or write-zeroes.
    var replicaRequests: [ReplicaRequest] {
        switch self {
        case let .read(offset, buffers):
            var position = offset
            return buffers.map { buffer in
                defer { position += UInt64(buffer.count) }
                return .read(offset: position, into: buffer)
            }
        case let .write(offset, buffers):
            var position = offset
            return buffers.map { buffer in
                defer { position += UInt64(buffer.count) }
                return .write(offset: position, from: buffer, fua: false)
            }
        case .flush: return [.flush]
        case let .discard(ranges): return ranges.map { .trim(offset: $0.offset, length: $0.length) }
        case let .writeZeroes(ranges):
            return ranges.map { .writeZeroes(offset: $0.offset, length: $0.length, mayUnmap: $0.mayUnmap, fua: false) }
        }
    }
}

/// One request on its way through the route. Every field is guarded by the route's lock.
final class RouteRequest {
    /// Where the answer goes.
    enum Reply {
        /// A device that submitted it asynchronously: its handler, through `CompletionDelivery`.
        case device(AsyncIOHandler, tag: UInt64)
        /// A synchronous call waiting for `answered`.
        case caller
    }

    /// One side's part of the request.
    enum Half {
        case idle           // not needed, or not started
        case running
        case succeeded
        case failed(Error)

        var isRunning: Bool { if case .running = self { return true } else { return false } }
        var hasSucceeded: Bool { if case .succeeded = self { return true } else { return false } }
    }

    let id: UInt64
    let operation: RouteOperation
    let reply: Reply
    let arrived: Double
    /// Not blocked behind an earlier request any more.
    var started = false
    var finished = false
    var error: Error?
    /// The answer was handed over (after the events it caused were emitted).
    var answered = false

    var local = Half.idle
    var localSince = 0.0
    /// The local half runs on the device's engine (else on a worker thread).
    var onEngine = false
    /// A local read with a time-out lands here first, so that an answer after the time-out cannot write
    /// into guest memory; freed when the local half has returned.
    var bounce: UnsafeMutableRawBufferPointer?
    /// The local half was given up while running (time-out, failover): its answer is ignored.
    var abandoned = false

    var remote = Half.idle
    var remoteSince = 0.0
    var remoteReplica: ReplicaStorage?
    /// Commands of the replica half not back yet, and the first error among those back.
    var remoteLeft = 0
    var remoteError: Error?
    /// Counts the starts of the replica half, so that an answer to an earlier start is not taken for one to a later.
    var remoteRound = 0
    /// The local device is out of the picture (failed over): only the replica's answer counts.
    var replicaOnly = false

    init(id: UInt64, operation: RouteOperation, reply: Reply, arrived: Double) {
        self.id = id
        self.operation = operation
        self.reply = reply
        self.arrived = arrived
    }

    /// A read the device does straight into guest memory: it cannot be called back, so its answer is
    /// awaited even after a failover (only reads with a time-out use a bounce buffer).
    var readsIntoGuest: Bool { operation.isRead && bounce == nil }
}

/// What code under the route's lock decided, done by `RoutedBlockBackend.apply` after releasing it.
struct RouteEffects {
    var events: [RouteEvent] = []
    var local: [RouteRequest] = []
    /// Replica halves to start, in this order (a failover's replays are in arrival order).
    var remote: [(request: RouteRequest, commands: [ReplicaRequest], replica: ReplicaStorage, queue: DispatchQueue?, round: Int)] = []
    var cutOff: [ReplicaStorage] = []
    var answers: [RouteRequest] = []
    var startWatchdog = false
}

/// The local device's engine reports completions here, by request id; answers wait for the batch end.
final class EngineCompletions: AsyncIOHandler {
    weak var route: RoutedBlockBackend?
    func asyncIOCompleted(tag: UInt64, result: Int) { route?.engineFinished(tag: tag, result: result) }
    func asyncIOBatchEnded() { route?.answerBatch() }
}

extension RoutedBlockBackend {
    // MARK: Arrival and start

    /// A new request: held behind a gate, blocked behind an earlier request, or started.
    func arriveLocked(_ operation: RouteOperation, reply: RouteRequest.Reply) -> RouteRequest {
        let request = RouteRequest(id: nextID, operation: operation, reply: reply, arrived: monotonicSeconds())
        nextID &+= 1
        if gates > 0 { heldRequests.append(request) } else { admitLocked(request) }
        return request
    }

    private func admitLocked(_ request: RouteRequest) {
        let blocked = unfinished.contains { request.operation.mustWait(for: $0.operation) }
        unfinished.append(request)
        if !blocked { startLocked(request) }
    }

    /// Lets the held requests go on, in arrival order, once no gate is up.
    func releaseHeldLocked() {
        guard gates == 0, !heldRequests.isEmpty else { return }
        let held = heldRequests
        heldRequests = []
        for request in held { admitLocked(request) }
    }

    /// Starts the blocked requests nothing earlier holds up any more.
    private func unblockLocked() {
        while let index = unfinished.indices.first(where: { i in
            !unfinished[i].started && !unfinished[..<i].contains { unfinished[i].operation.mustWait(for: $0.operation) }
        }) {
            startLocked(unfinished[index])
        }
    }

    private func startLocked(_ request: RouteRequest) {
        request.started = true
        switch route {
        case .remote:
            request.replicaOnly = true
            if replica != nil { startRemoteLocked(request) }
        case .mirror:
            startLocalLocked(request)
            if !request.operation.isRead, replica != nil { startRemoteLocked(request) }
        case .local:
            startLocalLocked(request)
        }
        settleLocked(request)
    }

    private func startLocalLocked(_ request: RouteRequest) {
        request.local = .running
        request.localSince = monotonicSeconds()
        switch request.operation {
        case let .read(offset, buffers):
            if timeout != nil {
                request.bounce = .allocate(byteCount: max(request.operation.byteCount, 1), alignment: 4096)
            } else {
                request.onEngine = local.acceptsAsync(isWrite: false, offset: offset, buffers: buffers)
            }
        case let .write(offset, buffers):
            request.onEngine = timeout == nil
                && local.acceptsAsync(isWrite: true, offset: offset, buffers: buffers.map { UnsafeMutableRawBufferPointer(mutating: $0) })
        default:
            break
        }
        effects.local.append(request)
        if timeout != nil && !watchdogStarted { effects.startWatchdog = true }
    }

    private func startRemoteLocked(_ request: RouteRequest) {
        guard let replica else {
            request.remote = .failed(IODomainError.system("the disk has no replica to answer the request"))
            return
        }
        let commands = request.operation.replicaRequests
        request.remoteRound += 1
        request.remoteSince = monotonicSeconds()
        request.remoteReplica = replica
        request.remoteLeft = commands.count
        request.remoteError = nil
        guard !commands.isEmpty else {
            request.remote = .succeeded
            return
        }
        request.remote = .running
        effects.remote.append((request, commands, replica, replicaQueue, request.remoteRound))
        if !watchdogStarted { effects.startWatchdog = true }
    }

    // MARK: Halves coming back

    func engineFinished(tag: UInt64, result: Int) {
        locked(answering: .batch) {
            guard let request = unfinished.first(where: { $0.id == tag }), request.onEngine else { return }
            var error: Error?
            if result != request.operation.byteCount {
                let offset = request.operation.touched.first?.offset ?? 0
                error = SystemError(operation: request.operation.isRead ? "read" : "write", errno: result < 0 ? Int32(-result) : EIO,
                                    context: "the local device at \(offset)\(result >= 0 ? ": \(result) bytes" : "")")
            }
            localFinishedLocked(request, error)
        }
    }

    func localFinished(_ request: RouteRequest, _ error: Error?) {
        locked { localFinishedLocked(request, error) }
    }

    private func localFinishedLocked(_ request: RouteRequest, _ error: Error?) {
        guard !request.abandoned, !request.finished, request.local.isRunning else {
            // Given up on: nobody reads the bounce buffer any more, and the device is done with it.
            request.bounce?.deallocate()
            request.bounce = nil
            return
        }
        if let bounce = request.bounce {
            if error == nil, !request.replicaOnly, case let .read(_, buffers) = request.operation {
                var position = 0
                for buffer in buffers {
                    // In bounds: the buffers' counts sum to byteCount, the bounce buffer's size (or 0 of 1).
                    buffer.copyMemory(from: UnsafeRawBufferPointer(rebasing: bounce[position..<(position + buffer.count)]))
                    position += buffer.count
                }
            }
            bounce.deallocate()
            request.bounce = nil
        }
        request.local = error.map { .failed($0) } ?? .succeeded
        if let error, !request.replicaOnly { localFaultLocked(request, error) }
        settleLocked(request)
    }

    func remoteFinished(_ request: RouteRequest, _ replica: ReplicaStorage, round: Int, _ error: Error?) {
        // The attached replica's completions come in batches, each followed by `answerBatch`.
        let answering: Answering = state.withLock { replicaBatches && self.replica === replica } ? .batch : .now
        locked(answering: answering) {
            guard request.remoteReplica === replica, request.remoteRound == round, request.remote.isRunning, !request.finished else { return }
            if let error, request.remoteError == nil { request.remoteError = error }
            request.remoteLeft -= 1
            guard request.remoteLeft == 0 else { return }
            if let failure = request.remoteError {
                request.remote = .failed(failure)
                if !request.replicaOnly { replicaFaultLocked(replica, failure) }
            } else {
                request.remote = .succeeded
            }
            settleLocked(request)
        }
    }

    /// Finishes `request` when the halves that count are back.
    func settleLocked(_ request: RouteRequest) {
        guard request.started, !request.finished else { return }
        if request.replicaOnly {
            switch request.remote {
            case .running: return
            case .succeeded: finishLocked(request, nil)
            case .failed(let error): finishLocked(request, error)
            case .idle:
                switch request.local {
                case .running: return  // a read into guest memory, awaited (see `moveToReplicaLocked`)
                case .succeeded: finishLocked(request, nil)
                case .failed, .idle:
                    startRemoteLocked(request)
                    settleLocked(request)
                }
            }
            return
        }
        guard !request.local.isRunning, !request.remote.isRunning else { return }
        if case .failed(let error) = request.local { return finishLocked(request, error) }
        if tracking, !request.remote.hasSucceeded {
            for range in request.operation.written { bitmap.mark(offset: range.offset, length: range.length) }
        }
        finishLocked(request, nil)
    }

    private func finishLocked(_ request: RouteRequest, _ error: Error?) {
        guard !request.finished else { return }
        request.finished = true
        request.error = error
        if let index = unfinished.firstIndex(where: { $0 === request }) { unfinished.remove(at: index) }
        effects.answers.append(request)
        if failingOver === request {
            failingOver = nil
            if error == nil {
                let now = monotonicSeconds()
                eventLocked("failover", reason: String(format: "the disk runs on the replica (%.1f ms after the fault was seen)", (now - failoverSeen) * 1000),
                            held: heldRequests.count + failoverMoved, milliseconds: (now - request.arrived) * 1000)
            }
            gates -= 1
            releaseHeldLocked()
        }
        unblockLocked()
        state.broadcast()
    }

    // MARK: Faults

    /// The local device failed `request` (nil: a plain-local request, answered by the caller): with a
    /// replica in sync, everything in flight moves to it and new requests wait until the failed one is
    /// answered there; else the guest gets the error.
    func localFaultLocked(_ request: RouteRequest?, _ error: Error) {
        localFailed = true
        guard let request, replica != nil, replicaInSync else {
            eventLocked("local-fault", reason: "\(error); no replica in sync, so the guest gets the error")
            if let request { finishLocked(request, error) }
            return
        }
        guard failingOver == nil, route != .remote else { return moveToReplicaLocked(request) }
        route = .remote
        failovers += 1
        failingOver = request
        failoverSeen = monotonicSeconds()
        gates += 1
        eventLocked("local-fault", reason: "\(error); holding requests and switching to the replica", held: heldRequests.count)
        // Everything in flight now counts on the replica alone; what it does not have is replayed there,
        // in arrival order.
        let moving = unfinished.filter { $0.started && !$0.replicaOnly }
        failoverMoved = moving.count - 1
        for other in moving { moveToReplicaLocked(other) }
    }

    private func moveToReplicaLocked(_ request: RouteRequest) {
        request.replicaOnly = true
        if case .idle = request.remote {
            if request.local.isRunning {
                if request.readsIntoGuest { return settleLocked(request) }  // awaited: it cannot be called back
                request.abandoned = true
            }
            startRemoteLocked(request)
        }
        settleLocked(request)
    }

    /// With the local device healthy, the replica failed (`failed` must be the attached one): drop it,
    /// go on locally, remember what it misses, including what requests still out there write.
    func replicaFaultLocked(_ failed: ReplicaStorage, _ error: Error) {
        guard replica === failed else { return }
        replica = nil
        replicaQueue = nil
        replicaInSync = false
        syncing = false
        tracking = true
        if route != .local && !localFailed { route = .local }
        eventLocked("replica-fault", reason: "\(error); the disk runs on the local device and remembers what the replica misses")
        for request in unfinished where request.remoteReplica === failed && request.remote.isRunning && !request.replicaOnly {
            for range in request.operation.written { bitmap.mark(offset: range.offset, length: range.length) }
            request.remote = .idle
            request.remoteReplica = nil
        }
        for request in unfinished { settleLocked(request) }
    }

    // MARK: Time-outs

    func startWatchdog() {
        let start: Bool = state.withLock {
            defer { watchdogStarted = true }
            return !watchdogStarted
        }
        guard start else { return }
        detachThread(name: "route-watch") { [weak self] in
            while let pause = self?.watchOnce() { usleep(UInt32(pause * 1_000_000)) }
        }
    }

    /// Fails local halves older than the time-out when a replica in sync can take over (a FLUSH gets
    /// twenty times as long: fdatasync on a busy host), and cuts off a replica that did not answer
    /// within twenty times the time-out, at least 1 s (30 s without one; a FLUSH four times that, so that
    /// a silent replica host holds a guest's FLUSH for seconds, not the 20 s that outlasted guests' own
    /// request time-outs);
    /// returns how long to sleep: until the next deadline, at most a quarter of the time-out (so that
    /// a request started meanwhile is seen before its deadline), at most 1 s.
    private func watchOnce() -> Double {
        locked {
            let now = monotonicSeconds()
            var next = now + min(timeout ?? 4, 4) / 4
            for request in unfinished where request.started {
                let scale = request.operation.isFlush ? 20.0 : 1.0
                if let limit = timeout.map({ $0 * scale }), !request.finished, request.local.isRunning, !request.abandoned,
                   !request.replicaOnly, !request.readsIntoGuest {
                    let deadline = request.localSince + limit
                    if deadline > now {
                        next = min(next, deadline)
                    } else if replica == nil || !replicaInSync {
                        next = min(next, now + limit)  // nothing could take over: a slow disk, waited for
                    } else {
                        let error = IODomainError.system("the local device did not answer within \(Int(limit * 1000)) ms")
                        request.abandoned = true
                        request.local = .failed(error)
                        localFaultLocked(request, error)
                        settleLocked(request)
                    }
                }
                if !request.finished, !request.replicaOnly, request.remote.isRunning, let replica = request.remoteReplica {
                    // The replica is across a network and another host's page cache: twenty times the local
                    // time-out, at least a second (a 50 ms limit dropped healthy replicas on a busy host).
                    let limit = (timeout.map { max(1, $0 * 20) } ?? 30) * (request.operation.isFlush ? 4 : 1)
                    let deadline = request.remoteSince + limit
                    if deadline > now {
                        next = min(next, deadline)
                    } else {
                        effects.cutOff.append(replica)
                        replicaFaultLocked(replica, IODomainError.system("the replica did not answer within \(Int(limit * 1000)) ms"))
                    }
                }
            }
            return max(next - now, 0.001)
        }
    }

    // MARK: Doing it (without the lock)

    func apply(_ effects: RouteEffects, answering: Answering) {
        for replica in effects.cutOff { replica.abort() }
        // Events first: an answer to I/O started below must not reach anyone before the event that led to it.
        for event in effects.events { onEvent?(event) }
        // The local halves first: the device is the slower half (a 4 KiB write here ~68 us at p50, the
        // replica on loopback ~37 us), so it starts working before the replica's sends take their time.
        if !effects.local.isEmpty { startLocal(effects.local) }
        for item in effects.remote { startRemote(item.request, item.commands, item.replica, item.queue, round: item.round) }
        if effects.startWatchdog { startWatchdog() }
        if !effects.answers.isEmpty { answer(effects.answers, answering) }
    }

    private func startLocal(_ requests: [RouteRequest]) {
        var engine: [(RouteRequest, BlockIORequest)] = []
        for request in requests {
            switch request.operation {
            case let .read(offset, buffers) where request.onEngine:
                engine.append((request, BlockIORequest(isWrite: false, offset: offset, buffers: buffers, tag: request.id)))
            case let .write(offset, buffers) where request.onEngine:
                engine.append((request, BlockIORequest(isWrite: true, offset: offset,
                                                       buffers: buffers.map { UnsafeMutableRawBufferPointer(mutating: $0) }, tag: request.id)))
            default:
                workers.run { [weak self] in self?.runLocalHalf(request) }
            }
        }
        guard !engine.isEmpty else { return }
        let started = local.submitAsync(engine.map(\.1), handler: engineCompletions)
        // What the engine did not take (it is full) runs on workers, straight into the same buffers.
        for (request, _) in engine[started...] { workers.run { [weak self] in self?.runLocalHalf(request) } }
    }

    /// A worker's local half: synchronous device calls (reads with a time-out into the bounce buffer).
    private func runLocalHalf(_ request: RouteRequest) {
        var failure: Error?
        do {
            if let bounce = request.bounce, case let .read(offset, _) = request.operation {
                // In bounds: the bounce buffer holds max(byteCount, 1) bytes.
                try local.read(at: offset, into: [UnsafeMutableRawBufferPointer(rebasing: bounce[0..<request.operation.byteCount])])
            } else {
                try runLocalDirectly(request.operation)
            }
        } catch {
            failure = error
        }
        localFinished(request, failure)
    }

    private func startRemote(_ request: RouteRequest, _ commands: [ReplicaRequest], _ replica: ReplicaStorage,
                             _ queue: DispatchQueue?, round: Int) {
        for command in commands {
            let done: (Error?) -> Void = { [weak self] error in self?.remoteFinished(request, replica, round: round, error) }
            if replica.submit(command, completion: done) { continue }
            // Synchronous calls only: one at a time on the replica's queue, skipped once nobody waits for them.
            (queue ?? DispatchQueue.global()).async { [weak self] in
                guard let self, self.state.withLock({ request.remoteRound == round && request.remote.isRunning && !request.finished }) else {
                    return done(IODomainError.system("no longer needed"))
                }
                done(Result { try RoutedBlockBackend.run(command, on: replica) }.failure)
            }
        }
    }

    /// The end of a batch of the replica's or the engine's completions: the answers held for it go to
    /// their devices, one batch end per device.
    func answerBatch() {
        let answers = batchLock.withLock {
            defer { batchedAnswers = [] }
            return batchedAnswers
        }
        guard !answers.isEmpty else { return }
        var handlers: [AsyncIOHandler] = []
        for answer in answers {
            answer.handler.asyncIOCompleted(tag: answer.tag, result: answer.result)
            if !handlers.contains(where: { $0 === answer.handler }) { handlers.append(answer.handler) }
        }
        for handler in handlers { handler.asyncIOBatchEnded() }
    }

    private static func run(_ command: ReplicaRequest, on replica: ReplicaStorage) throws {
        switch command {
        case let .read(offset, buffer): try replica.read(at: offset, into: buffer)
        case let .write(offset, buffer, fua): try replica.write(at: offset, from: buffer, fua: fua)
        case .flush: try replica.flush()
        case let .trim(offset, length): try replica.trim(at: offset, length: length)
        case let .writeZeroes(offset, length, mayUnmap, fua): try replica.writeZeroes(at: offset, length: length, mayUnmap: mayUnmap, fua: fua)
        }
    }

    /// Hands finished requests to their devices (one batch end per device) and to waiting callers.
    private func answer(_ requests: [RouteRequest], _ answering: Answering) {
        var callers = false
        var handlers: [AsyncIOHandler] = []
        for request in requests {
            switch request.reply {
            case let .device(handler, tag):
                let result = request.error == nil ? request.operation.byteCount : -Int(EIO)
                switch answering {
                case .now: break
                case .later:
                    delivery.post(handler, tag: tag, result: result)
                    continue
                case .batch:
                    batchLock.withLock { batchedAnswers.append((handler, tag, result)) }
                    continue
                }
                handler.asyncIOCompleted(tag: tag, result: result)
                if !handlers.contains(where: { $0 === handler }) { handlers.append(handler) }
            case .caller:
                callers = true
            }
        }
        for handler in handlers { handler.asyncIOBatchEnded() }
        guard callers else { return }
        state.withLock {
            for request in requests { request.answered = true }
            state.broadcast()
        }
    }
}

private extension Result {
    var failure: Failure? { if case .failure(let error) = self { return error } else { return nil } }
}

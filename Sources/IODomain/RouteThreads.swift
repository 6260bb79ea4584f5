import Foundation
import GodwitSystem
import Virtio

/// Threads that run a route's synchronous local calls (flush, discard, write-zeroes, requests the
/// engine does not take, and everything while a time-out is set, so that a call that never returns
/// holds up only its thread). Threads are made as jobs need them, up to `maxThreads`, and then kept.
final class LocalWorkers: @unchecked Sendable {
    static let maxThreads = 16
    private let condition = Condition()
    private var jobs: [() -> Void] = []
    private var threads = 0
    private var idle = 0
    private var stopped = false

    func run(_ job: @escaping () -> Void) {
        let spawn: Bool = condition.withLock {
            jobs.append(job)
            condition.broadcast()
            guard jobs.count > idle, threads < LocalWorkers.maxThreads, !stopped else { return false }
            threads += 1
            return true
        }
        guard spawn else { return }
        detachThread(name: "route-local") { [self] in loop() }
    }

    /// Idle threads end; busy ones end after their job.
    func stop() {
        condition.withLock {
            stopped = true
            condition.broadcast()
        }
    }

    private func loop() {
        while true {
            let job: (() -> Void)? = condition.withLock {
                idle += 1
                condition.wait(until: { !jobs.isEmpty || stopped })
                idle -= 1
                guard !stopped else {
                    threads -= 1
                    return nil
                }
                return jobs.removeFirst()
            }
            guard let job else { return }
            job()
        }
    }
}

/// Hands a route's finished requests to their devices' handlers from a thread of its own, for answers
/// that come up while a device is calling the route (and holds its lock), or from a polling thread
/// (`drain`). Every other answer goes to the device directly from the thread that finished it.
final class CompletionDelivery: @unchecked Sendable {
    private let condition = Condition()
    private var pending: [(handler: AsyncIOHandler, tag: UInt64, result: Int)] = []
    private var waiting = false
    private var started = false
    private var stopped = false

    func post(_ handler: AsyncIOHandler, tag: UInt64, result: Int) {
        let start: Bool = condition.withLock {
            pending.append((handler, tag, result))
            if waiting { condition.broadcast() }
            guard !started else { return false }
            started = true
            return true
        }
        guard start else { return }
        detachThread(name: "route-complete") { [self] in loop() }
    }

    /// Hands what is queued to the handlers on the calling thread (one batch end per handler); returns
    /// how many.
    @discardableResult
    func drain() -> Int {
        let batch: [(handler: AsyncIOHandler, tag: UInt64, result: Int)] = condition.withLock {
            defer { pending = [] }
            return pending
        }
        var handlers: [AsyncIOHandler] = []
        for item in batch {
            item.handler.asyncIOCompleted(tag: item.tag, result: item.result)
            if !handlers.contains(where: { $0 === item.handler }) { handlers.append(item.handler) }
        }
        for handler in handlers { handler.asyncIOBatchEnded() }
        return batch.count
    }

    func stop() {
        condition.withLock {
            stopped = true
            condition.broadcast()
        }
    }

    private func loop() {
        while true {
            let go: Bool = condition.withLock {
                waiting = true
                condition.wait(until: { !pending.isEmpty || stopped })
                waiting = false
                return !pending.isEmpty
            }
            guard go else { return }
            drain()
        }
    }
}

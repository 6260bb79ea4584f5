import API
import Foundation
import GodwitSystem

/// The fence: a deadline on the monotonic clock that the host agent keeps moving forward (`PUT
/// /fence`). When it lapses the VMM pauses its guest by itself: an agent that hangs or loses etcd
/// stops renewing, and by the time its lease (twice the deadline) runs out and another host may take
/// the VM over, this guest has long stopped. Resuming is the agent's decision (`PATCH /vm`).
final class FenceWatch: @unchecked Sendable {
    let condition = Condition()
    var deadline: Double?
    var generation = 0
    var started = false

    static func now() -> Double { monotonicSeconds() }
}

extension VMMService {
    public func setFence(_ params: FenceParams) throws {
        let fence = self.fence
        let startWatcher: Bool = fence.condition.withLock {
            fence.deadline = params.deadlineMs == 0 ? nil : FenceWatch.now() + Double(params.deadlineMs) / 1000
            fence.generation += 1
            fence.condition.broadcast()
            defer { fence.started = true }
            return !fence.started
        }
        guard startWatcher else { return }
        detachThread(name: "fence") { [weak self] in self?.watchFence() }
    }

    private func watchFence() {
        let fence = self.fence
        while true {
            // Wait until a deadline is set and has passed without being moved.
            let lapsed: Bool = fence.condition.withLock {
                guard let deadline = fence.deadline else {
                    fence.condition.wait(until: { fence.deadline != nil })
                    return false
                }
                let generation = fence.generation
                let remaining = deadline - FenceWatch.now()
                if remaining > 0 {
                    _ = fence.condition.wait(until: { fence.generation != generation }, timeout: remaining)
                    return false
                }
                fence.deadline = nil
                return true
            }
            guard lapsed else { continue }
            let running = lock.withLock { lifecycle == .running }
            guard running else { continue }
            do {
                try setVMState(.paused)
                log("fence: the deadline lapsed without renewal; the guest is paused")
                FileHandle.standardError.write(Data("godwit: fence: the deadline lapsed without renewal; the guest is paused\n".utf8))
                publish(.fenced, ["reason": .string("the fence deadline lapsed without renewal")])
            } catch {
                FileHandle.standardError.write(Data("godwit: fence: the deadline lapsed but pausing failed: \(error)\n".utf8))
            }
        }
    }
}

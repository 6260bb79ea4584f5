import API
import Testing
import VMM

/// The API's lifecycle state machine: every (state, event) pair, allowed or refused.
@Suite("VMM lifecycle state machine")
struct LifecycleAPITests {
    @Test func everyTransition() {
        let allowed: [Lifecycle: [Lifecycle.Event: Lifecycle]] = [
            .notStarted: [.start: .booting],
            .booting: [.startFailed: .notStarted, .booted: .running, .stopped: .stopped],
            .running: [.pause: .paused, .shutdown: .shuttingDown, .stopped: .stopped],
            .paused: [.resume: .running, .shutdown: .shuttingDown, .stopped: .stopped],
            .shuttingDown: [.stopped: .stopped],
            .stopped: [:],
        ]
        for state in Lifecycle.allCases {
            for event in Lifecycle.Event.allCases {
                if let expected = allowed[state]?[event] {
                    #expect((try? state.applying(event)) == expected, "\(state) + \(event)")
                } else {
                    #expect(throws: APIError.self, "\(state) + \(event) must be refused") { _ = try state.applying(event) }
                }
            }
        }
    }
}

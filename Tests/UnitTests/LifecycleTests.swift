@testable import Machine
import Testing

@Suite("VM lifecycle state machine")
struct LifecycleTests {
    static let states: [VMState] = [.configured, .running, .paused, .stopped(.reboot)]
    static let events: [VMState.Event] = [.start, .pause, .resume, .exit(.powerOff(status: 0x10))]

    /// Every (state, event) pair: allowed ones give the documented state, the rest throw.
    @Test func everyTransition() throws {
        let allowed: [String: VMState] = [
            "configured/start": .running,
            "configured/stop": .stopped(.powerOff(status: 0x10)),
            "running/pause": .paused,
            "running/stop": .stopped(.powerOff(status: 0x10)),
            "paused/resume": .running,
            "paused/stop": .stopped(.powerOff(status: 0x10)),
        ]
        for state in Self.states {
            for event in Self.events {
                let name: String
                switch event { case .exit: name = "stop"; default: name = event.description }
                let key = "\(state)/\(name)"
                if let expected = allowed[key] {
                    #expect(try state.applying(event) == expected, "\(key)")
                } else {
                    #expect(throws: MachineError.self, "\(key) must be refused") { _ = try state.applying(event) }
                }
            }
        }
    }

    @Test func exitStatuses() {
        #expect(GuestExit.powerOff(status: 0x10).processExitStatus == 0)
        #expect(GuestExit.powerOff(status: 0x11).processExitStatus == 1)
        #expect(GuestExit.reboot.processExitStatus == 3)
        #expect(GuestExit.tripleFault.processExitStatus == 4)
        #expect(GuestExit.internalError("x").processExitStatus == 5)
        #expect(GuestExit.unhandledExit("x").processExitStatus == 6)
    }
}

/// How a guest run ended.
public enum GuestExit: Equatable, Sendable, CustomStringConvertible {
    /// The guest wrote `status` to the debug-exit port (0xf4).
    case powerOff(status: UInt8)
    /// The guest asked for a reset (i8042 0xfe, or a KVM system event).
    case reboot
    /// The CPU shut down (triple fault).
    case tripleFault
    /// KVM could not continue; for an emulation failure the details hold RIP and the instruction bytes.
    case internalError(String)
    /// An exit the VMM does not handle.
    case unhandledExit(String)
    /// The VMM stopped the guest (signal or API).
    case stopped
    /// The guest was live-migrated to another VMM, which runs it now.
    case migrated

    /// The guest status byte that means "pass" (0x10 → QEMU exit 33).
    public static let passStatus: UInt8 = 0x10

    public var description: String {
        switch self {
        case let .powerOff(status): return status == GuestExit.passStatus ? "guest powered off: pass" : "guest powered off: status 0x\(String(status, radix: 16))"
        case .reboot: return "guest rebooted"
        case .tripleFault: return "guest triple-faulted (KVM_EXIT_SHUTDOWN)"
        case let .internalError(details): return "KVM internal error: \(details)"
        case let .unhandledExit(details): return "unhandled exit: \(details)"
        case .stopped: return "stopped by the VMM"
        case .migrated: return "migrated: the guest runs on the target"
        }
    }

    /// The `godwit vm` process exit status for this ending (documented in the README).
    public var processExitStatus: Int32 {
        switch self {
        case let .powerOff(status): return status == GuestExit.passStatus ? 0 : 1
        case .reboot: return 3
        case .tripleFault: return 4
        case .internalError: return 5
        case .unhandledExit: return 6
        case .stopped: return 7
        case .migrated: return 0
        }
    }
}

/// The VM lifecycle as an explicit state machine: every allowed transition is listed here.
public enum VMState: Equatable, Sendable, CustomStringConvertible {
    case configured
    case running
    case paused
    case stopped(GuestExit)

    public enum Event: Equatable, Sendable, CustomStringConvertible {
        case start, pause, resume
        case exit(GuestExit)

        public var description: String {
            switch self {
            case .start: return "start"
            case .pause: return "pause"
            case .resume: return "resume"
            case let .exit(e): return "stop (\(e))"
            }
        }
    }

    public var description: String {
        switch self {
        case .configured: return "configured"
        case .running: return "running"
        case .paused: return "paused"
        case .stopped: return "stopped"
        }
    }

    /// The state after `event`, or `MachineError.invalidTransition`.
    public func applying(_ event: Event) throws -> VMState {
        switch (self, event) {
        case (.configured, .start): return .running
        case (.configured, .exit(let e)): return .stopped(e)
        case (.running, .pause): return .paused
        case (.paused, .resume): return .running
        case (.running, .exit(let e)), (.paused, .exit(let e)): return .stopped(e)
        default: throw MachineError.invalidTransition(from: description, event: event.description)
        }
    }
}

/// Errors from building or running a machine, each with the value that was refused.
public enum MachineError: Error, CustomStringConvertible, Sendable {
    case kernel(path: String, reason: String)
    case initrd(path: String, reason: String)
    case memory(String)
    case cpus(requested: Int, max: Int)
    case commandLine(String)
    case disk(path: String, reason: String)
    case layout(String)
    case invalidTransition(from: String, event: String)
    case setup(String)

    public var description: String {
        switch self {
        case let .kernel(path, reason): return "kernel \(path): \(reason)"
        case let .initrd(path, reason): return "initrd \(path): \(reason)"
        case let .memory(why): return "guest memory: \(why)"
        case let .cpus(requested, max): return "cannot run \(requested) vCPUs: this VMM supports 1 to \(max)"
        case let .commandLine(why): return "guest command line: \(why)"
        case let .disk(path, reason): return "disk \(path): \(reason)"
        case let .layout(why): return "guest layout: \(why)"
        case let .invalidTransition(from, event): return "cannot \(event) a VM that is \(from)"
        case let .setup(why): return why
        }
    }
}

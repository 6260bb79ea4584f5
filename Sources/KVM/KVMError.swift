import GodwitSystem

/// Errors from the KVM layer, with the ioctl or value that failed.
public enum KVMError: Error, CustomStringConvertible, Sendable {
    case deviceUnavailable(path: String, SystemError)
    case apiVersion(Int32)
    case missingCapability(name: String)
    case ioctl(SystemError)
    case tooManyEntries(what: String, count: Int)
    /// Saved state that cannot be restored: `name` says which part, `reason` what is wrong with it.
    case badState(name: String, reason: String)

    public var description: String {
        switch self {
        case let .deviceUnavailable(path, error):
            return "cannot open \(path): \(error). Is KVM loaded and are you allowed to use it (root or the kvm group)?"
        case let .apiVersion(v): return "unsupported KVM API version \(v) (expected 12)"
        case let .missingCapability(name): return "this KVM lacks \(name)"
        case let .ioctl(e): return e.description
        case let .tooManyEntries(what, count): return "KVM returned too many \(what) (\(count))"
        case let .badState(name, reason): return "saved state \(name) cannot be restored: \(reason)"
        }
    }
}

@inline(__always)
func kvmCall<T>(_ body: () throws -> T) throws -> T {
    do { return try body() } catch let error as SystemError { throw KVMError.ioctl(error) }
}

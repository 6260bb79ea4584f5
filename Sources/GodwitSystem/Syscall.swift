import CGodwit
#if canImport(Glibc)
import Glibc
#endif

/// A failed system call: which call, on what, and the errno it returned.
public struct SystemError: Error, CustomStringConvertible, Equatable, Sendable {
    public var operation: String
    public var errno: Int32
    public var context: String

    public init(operation: String, errno: Int32, context: String = "") {
        self.operation = operation
        self.errno = errno
        self.context = context
    }

    public var description: String {
        let message = String(cString: strerror(errno))
        return context.isEmpty
            ? "\(operation) failed: \(message) (errno \(errno))"
            : "\(operation) \(context) failed: \(message) (errno \(errno))"
    }
}

/// The one syscall wrapper every module uses: retries on EINTR, turns -1 into a `SystemError`.
///
/// `retryOnInterrupt: false` is for calls whose EINTR is a wake-up the caller wants to see
/// (KVM_RUN kicked by a signal).
@inline(__always)
public func systemCall<T: FixedWidthInteger>(
    _ operation: @autoclosure () -> String,
    context: @autoclosure () -> String = "",
    retryOnInterrupt: Bool = true,
    _ body: () -> T
) throws(SystemError) -> T {
    while true {
        let result = body()
        if result != -1 { return result }
        let code = godwit_errno()
        if code == EINTR && retryOnInterrupt { continue }
        throw SystemError(operation: operation(), errno: code, context: context())
    }
}

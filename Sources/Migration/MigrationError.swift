import GodwitSystem

/// Everything that can go wrong on the migration wire, each case carrying the value that failed.
public enum MigrationError: Error, CustomStringConvertible, Equatable, Sendable {
    case invalidKey(String)
    case badMagic([UInt8])
    case unsupportedVersion(UInt32)
    /// The peer in this role could not prove it holds the key.
    case authenticationFailed(peer: MigrationRole)
    /// The target closed the connection before proving itself (it refused our proof or version).
    case handshakeRefused
    case unknownSectionKind(UInt32)
    case sectionTooLarge(kind: MigrationSectionKind, length: UInt64, limit: UInt64)
    case badTag(sequence: UInt64)
    case pageOutOfRange(UInt64, limit: UInt64)
    case pageCountMismatch(kind: MigrationSectionKind, count: UInt32, length: UInt64)
    case badPageSize(pageNumber: UInt64, size: Int)
    case malformedSection(kind: MigrationSectionKind, reason: String)
    case invalidJSON(kind: MigrationSectionKind, reason: String)
    case unexpectedSection(MigrationSectionKind, expected: [MigrationSectionKind])
    case peerAborted(reason: String)
    case timedOut(operation: String)
    case peerClosed
    case address(host: String, reason: String)
    case crypto(String)
    case system(SystemError)

    public var description: String {
        switch self {
        case .invalidKey(let why): return "invalid migration key: \(why)"
        case .badMagic(let bytes):
            return "not a godwit migration stream: magic \(bytes.map { String($0, radix: 16) }) (expected \"GODWITMG\")"
        case .unsupportedVersion(let v): return "unsupported migration stream version \(v) (this build speaks \(MigrationStream.version))"
        case .authenticationFailed(let peer): return "the \(peer) could not prove it holds the migration key (wrong key or impostor)"
        case .handshakeRefused: return "the target closed the connection during the handshake (it refused our key or version)"
        case .unknownSectionKind(let k): return "unknown section kind \(k)"
        case .sectionTooLarge(let kind, let length, let limit): return "\(kind) section of \(length) bytes exceeds its limit of \(limit)"
        case .badTag(let sequence): return "section \(sequence) failed authentication (altered, reordered, replayed or wrong session)"
        case .pageOutOfRange(let page, let limit): return "page number \(page) is outside guest RAM (\(limit) pages)"
        case .pageCountMismatch(let kind, let count, let length): return "\(kind) section claims \(count) entries but is \(length) bytes long"
        case .badPageSize(let page, let size): return "page \(page) is \(size) bytes (pages are \(MigrationStream.pageSize))"
        case .malformedSection(let kind, let reason): return "malformed \(kind) section: \(reason)"
        case .invalidJSON(let kind, let reason): return "invalid JSON in \(kind) section: \(reason)"
        case .unexpectedSection(let kind, let expected): return "unexpected \(kind) section (expected \(expected.map { "\($0)" }.joined(separator: " or ")))"
        case .peerAborted(let reason): return "the peer aborted the migration: \(reason)"
        case .timedOut(let operation): return "timed out \(operation)"
        case .peerClosed: return "the peer closed the migration connection"
        case .address(let host, let reason): return "cannot use address \(host): \(reason)"
        case .crypto(let what): return "libcrypto failed: \(what)"
        case .system(let error): return error.description
        }
    }
}

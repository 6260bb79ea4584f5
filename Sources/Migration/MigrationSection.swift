import Foundation

/// The constants of the migration wire format (version 1).
///
/// Handshake: the target sends magic, version (u32 LE) and a 32-byte nonce; the source answers
/// magic, version, its nonce and HMAC(key, "godwit-migration-v1 source" ‖ nonceT ‖ nonceS); the
/// target answers HMAC(key, "godwit-migration-v1 target" ‖ nonceS ‖ nonceT). Then sections flow
/// both ways: kind u32 LE, length u64 LE, payload, and a 32-byte HMAC under the session key of
/// direction label ‖ sequence u64 LE ‖ kind ‖ length ‖ payload.
public enum MigrationStream {
    public static let magic: [UInt8] = Array("GODWITMG".utf8)
    public static let version: UInt32 = 1
    public static let pageSize = 4096
    public static let nonceLength = 32
    public static let tagLength = 32
    /// kind u32 + length u64.
    public static let sectionHeaderLength = 12
    /// One entry of a `pages` section: page number u64 and the page.
    public static let pageEntryLength = 8 + pageSize
    /// The most pages `sendPages` puts in one section (it splits longer lists).
    public static let maxPagesPerSection = Int(MigrationSectionKind.pages.maxPayloadLength - 4) / pageEntryLength
    /// The most page numbers `sendZeroPages` puts in one section.
    public static let maxZeroPagesPerSection = Int(MigrationSectionKind.zeroPages.maxPayloadLength - 4) / 8

    static let sourceProofLabel = Array("godwit-migration-v1 source".utf8)
    static let targetProofLabel = Array("godwit-migration-v1 target".utf8)
    static let sessionLabel = Array("godwit-migration-v1 session".utf8)
    static func directionLabel(from role: MigrationRole) -> [UInt8] {
        Array("godwit-migration-v1 from-\(role)".utf8)
    }
}

/// Which end of a migration connection: the source sends the VM, the target (the listener) receives it.
public enum MigrationRole: String, Sendable, CustomStringConvertible {
    case source, target
    public var description: String { rawValue }
}

/// The kind of a section, which fixes how its payload is encoded and how long it may be.
public enum MigrationSectionKind: UInt32, Sendable, CaseIterable, CustomStringConvertible {
    /// JSON: the machine configuration the target must match.
    case config = 1
    /// count u32 LE, then count × (page number u64 LE, 4096 bytes).
    case pages = 2
    /// count u32 LE, then count × page number u64 LE: pages that are all zeros.
    case zeroPages = 3
    /// JSON: vCPU, irqchip, clock and device state.
    case state = 4
    /// Empty: the target validated everything and can resume.
    case ready = 5
    /// Empty: the source hands the guest over (the commit point).
    case commit = 6
    /// UTF-8 reason: the sender gives up.
    case abort = 7
    /// Empty: the end of a phase or of the stream.
    case done = 8
    /// JSON: progress counters.
    case progress = 9

    /// The longest payload a receiver accepts, checked before the payload is read.
    public var maxPayloadLength: UInt64 {
        switch self {
        case .config, .progress: return 64 << 10
        case .state: return 16 << 20
        case .pages, .zeroPages: return 4 << 20
        case .abort: return 4 << 10
        case .ready, .commit, .done: return 0
        }
    }

    /// The kinds whose payload is JSON.
    public var isJSON: Bool { self == .config || self == .state || self == .progress }

    public var description: String {
        switch self {
        case .config: return "config"
        case .pages: return "pages"
        case .zeroPages: return "zeroPages"
        case .state: return "state"
        case .ready: return "ready"
        case .commit: return "commit"
        case .abort: return "abort"
        case .done: return "done"
        case .progress: return "progress"
        }
    }
}

/// One authenticated section as received, with decoders that validate its payload.
public struct MigrationSection: Sendable, Equatable {
    public let kind: MigrationSectionKind
    public let payload: [UInt8]

    public init(kind: MigrationSectionKind, payload: [UInt8]) {
        self.kind = kind
        self.payload = payload
    }

    /// Decodes a JSON section (`config`, `state`, `progress`).
    public func decodeJSON<T: Decodable>(_ type: T.Type = T.self) throws(MigrationError) -> T {
        guard kind.isJSON else { throw .malformedSection(kind: kind, reason: "not a JSON section") }
        do {
            return try JSONDecoder().decode(T.self, from: Data(payload))
        } catch {
            throw .invalidJSON(kind: kind, reason: "\(error)")
        }
    }

    /// The reason of an `abort` section.
    public func abortReason() throws(MigrationError) -> String {
        guard kind == .abort else { throw .malformedSection(kind: kind, reason: "not an abort section") }
        guard let reason = String(validating: payload, as: UTF8.self) else {
            throw .malformedSection(kind: kind, reason: "reason is not UTF-8")
        }
        return reason
    }

    /// Validates a `pages` section completely (count, length, every page number below `pageLimit`),
    /// then calls `body` with each page number and its 4096 bytes, which point into `payload`.
    public func forEachPage(pageLimit: UInt64, _ body: (_ pageNumber: UInt64, _ bytes: UnsafeRawBufferPointer) throws -> Void) throws {
        let count = try entryCount(expected: .pages, entryLength: UInt64(MigrationStream.pageEntryLength))
        try payload.withUnsafeBytes { raw in
            // In bounds: entryCount checked raw.count == 4 + count * pageEntryLength.
            for i in 0..<count {
                let page: UInt64 = raw.loadLE(at: 4 + i * MigrationStream.pageEntryLength)
                guard page < pageLimit else { throw MigrationError.pageOutOfRange(page, limit: pageLimit) }
            }
            for i in 0..<count {
                let offset = 4 + i * MigrationStream.pageEntryLength
                try body(raw.loadLE(at: offset), UnsafeRawBufferPointer(rebasing: raw[(offset + 8)..<(offset + MigrationStream.pageEntryLength)]))
            }
        }
    }

    /// The page numbers of a `zeroPages` section, each checked to be below `pageLimit`.
    public func zeroPageNumbers(pageLimit: UInt64) throws(MigrationError) -> [UInt64] {
        let count = try entryCount(expected: .zeroPages, entryLength: 8)
        let pages = payload.withUnsafeBytes { raw in
            // In bounds: entryCount checked raw.count == 4 + count * 8.
            (0..<count).map { raw.loadLE(at: 4 + $0 * 8) as UInt64 }
        }
        if let bad = pages.first(where: { $0 >= pageLimit }) { throw .pageOutOfRange(bad, limit: pageLimit) }
        return pages
    }

    /// The count u32 at the start of a page list, checked against the payload's length.
    private func entryCount(expected: MigrationSectionKind, entryLength: UInt64) throws(MigrationError) -> Int {
        guard kind == expected else { throw .malformedSection(kind: kind, reason: "not a \(expected) section") }
        guard payload.count >= 4 else { throw .malformedSection(kind: kind, reason: "\(payload.count) bytes, no count") }
        // In bounds: payload.count >= 4.
        let count: UInt32 = payload.withUnsafeBytes { $0.loadLE(at: 0) }
        guard UInt64(payload.count) == 4 + UInt64(count) * entryLength else {
            throw .pageCountMismatch(kind: kind, count: count, length: UInt64(payload.count))
        }
        return Int(count)
    }
}

extension UnsafeRawBufferPointer {
    /// A little-endian integer at `offset`; the caller has checked offset + size <= count.
    func loadLE<T: FixedWidthInteger>(at offset: Int) -> T {
        T(littleEndian: loadUnaligned(fromByteOffset: offset, as: T.self))
    }
}

extension Array where Element == UInt8 {
    mutating func appendLE<T: FixedWidthInteger>(_ value: T) {
        // In bounds: the buffer is exactly the value's bytes.
        Swift.withUnsafeBytes(of: value.littleEndian) { append(contentsOf: $0) }
    }

    /// `withUnsafeBytes` for a body that throws `MigrationError` (the Array method only rethrows `any Error`).
    func withBytes<R>(_ body: (UnsafeRawBufferPointer) throws(MigrationError) -> R) throws(MigrationError) -> R {
        // In bounds: the buffer is the array's own storage with its own count.
        try withUnsafeBytes { b in Result { () throws(MigrationError) -> R in try body(b) } }.get()
    }
}

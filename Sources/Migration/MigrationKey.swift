import CGodwit

/// The secret both hosts share to authenticate a migration: 16 to 64 bytes, usually read from a hex file.
public struct MigrationKey: Sendable, Equatable, CustomStringConvertible {
    public static let allowedLengths = 16...64
    public let bytes: [UInt8]

    public init(bytes: [UInt8]) throws(MigrationError) {
        guard Self.allowedLengths.contains(bytes.count) else {
            throw .invalidKey("\(bytes.count) bytes (must be \(Self.allowedLengths.lowerBound) to \(Self.allowedLengths.upperBound))")
        }
        self.bytes = bytes
    }

    /// Parses a hex string (upper or lower case); whitespace around it is ignored.
    public init(hex: String) throws(MigrationError) {
        let isSpace: (UInt8) -> Bool = { $0 == 0x20 || (0x09...0x0D).contains($0) }
        var trimmed = Array(hex.utf8)[...]
        while let first = trimmed.first, isSpace(first) { trimmed = trimmed.dropFirst() }
        while let last = trimmed.last, isSpace(last) { trimmed = trimmed.dropLast() }
        let text = Array(trimmed)
        guard !text.isEmpty else { throw .invalidKey("empty") }
        guard text.count % 2 == 0 else { throw .invalidKey("odd number of hex digits (\(text.count))") }
        func nibble(_ c: UInt8, at index: Int) throws(MigrationError) -> UInt8 {
            switch c {
            case 0x30...0x39: return c - 0x30
            case 0x41...0x46: return c - 0x41 + 10
            case 0x61...0x66: return c - 0x61 + 10
            default: throw .invalidKey("character \(UnicodeScalar(c).escaped(asASCII: true)) at offset \(index) is not a hex digit")
            }
        }
        var bytes: [UInt8] = []
        bytes.reserveCapacity(text.count / 2)
        var index = 0
        while index < text.count {
            bytes.append(try nibble(text[index], at: index) << 4 | nibble(text[index + 1], at: index + 1))
            index += 2
        }
        try self.init(bytes: bytes)
    }

    /// Parses the contents of a key file: one hex string, surrounding whitespace (a final newline) ignored.
    public init(fileContents: String) throws(MigrationError) {
        try self.init(hex: fileContents)
    }

    /// A new random key of `count` bytes.
    public static func random(count: Int = 32) throws(MigrationError) -> MigrationKey {
        try MigrationKey(bytes: randomBytes(count))
    }

    /// The key as lower-case hex (what `init(hex:)` reads).
    public var hex: String { bytes.map { ($0 < 16 ? "0" : "") + String($0, radix: 16) }.joined() }

    /// Never prints the key itself.
    public var description: String { "MigrationKey(\(bytes.count) bytes)" }
}

/// `count` bytes from OpenSSL's RAND_bytes.
func randomBytes(_ count: Int) throws(MigrationError) -> [UInt8] {
    var bytes = [UInt8](repeating: 0, count: count)
    // In bounds: the buffer is exactly `count` bytes.
    let rc = bytes.withUnsafeMutableBytes { godwit_random_bytes($0.baseAddress, $0.count) }
    guard rc == 0 else { throw .crypto("RAND_bytes(\(count))") }
    return bytes
}

/// An HMAC-SHA256 context keyed once and restarted per message (libcrypto through CGodwit).
final class HMAC {
    static let length = Int(GODWIT_HMAC_SHA256_LENGTH)
    private let context: OpaquePointer

    init(key: [UInt8]) throws(MigrationError) {
        // In bounds: the key buffer's own count is passed.
        guard let context = key.withUnsafeBytes({ godwit_hmac_new($0.baseAddress, $0.count) }) else {
            throw .crypto("HMAC-SHA256 context")
        }
        self.context = context
    }

    deinit { godwit_hmac_free(context) }

    func restart() throws(MigrationError) {
        guard godwit_hmac_init(context) == 0 else { throw .crypto("HMAC restart") }
    }

    func update(_ buffer: UnsafeRawBufferPointer) throws(MigrationError) {
        guard godwit_hmac_update(context, buffer.baseAddress, buffer.count) == 0 else { throw .crypto("HMAC update") }
    }

    func update(_ bytes: [UInt8]) throws(MigrationError) {
        let rc = bytes.withUnsafeBytes { godwit_hmac_update(context, $0.baseAddress, $0.count) }
        guard rc == 0 else { throw .crypto("HMAC update") }
    }

    /// The tag of everything since the last restart; the context must be restarted before reuse.
    func finish() throws(MigrationError) -> [UInt8] {
        var tag = [UInt8](repeating: 0, count: Self.length)
        // In bounds: `tag` holds the 32 bytes godwit_hmac_final writes.
        let rc = tag.withUnsafeMutableBufferPointer { godwit_hmac_final(context, $0.baseAddress) }
        guard rc == 0 else { throw .crypto("HMAC final") }
        return tag
    }

    /// One-shot HMAC-SHA256 of the concatenated `parts`.
    static func tag(key: [UInt8], _ parts: [UInt8]...) throws(MigrationError) -> [UInt8] {
        let message = parts.flatMap { $0 }
        var tag = [UInt8](repeating: 0, count: length)
        // In bounds: each buffer's own count is passed; `tag` holds the 32 output bytes.
        let rc = key.withUnsafeBytes { k in
            message.withUnsafeBytes { m in
                tag.withUnsafeMutableBufferPointer { godwit_hmac_sha256(k.baseAddress, k.count, m.baseAddress, m.count, $0.baseAddress) }
            }
        }
        guard rc == 0 else { throw .crypto("HMAC-SHA256") }
        return tag
    }

    /// Equality of two tags in constant time.
    static func equal(_ a: [UInt8], _ b: [UInt8]) -> Bool {
        guard a.count == b.count else { return false }
        // In bounds: both arrays hold a.count bytes.
        return a.withUnsafeBytes { x in b.withUnsafeBytes { y in godwit_constant_time_equal(x.baseAddress, y.baseAddress, x.count) == 1 } }
    }
}

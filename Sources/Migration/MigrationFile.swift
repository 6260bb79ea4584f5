/// The migration stream's format at rest: a snapshot file is a header and sections like the wire
/// (kind u32 LE, length u64 LE, payload, 32-byte tag), ending with a `done` section.
///
/// Header: magic "GODWITMG", version u32 LE, and the label "snapshot". A file has no peer to share a
/// key with, so each tag is HMAC-SHA256 under a fixed, public key of "godwit-migration-v1 file" ‖
/// sequence u64 LE ‖ kind ‖ length ‖ payload: a checksum that also catches sections swapped, dropped
/// or repeated, not a proof of origin (whoever can write the file can rewrite it). A reader checks
/// every length against the kind's limit and what is left of the file, every tag, the final `done`
/// and that nothing follows it.
public enum MigrationFile {
    static let label = Array("snapshot".utf8)
    static let checksumKey = Array("godwit-migration-v1 file key".utf8)
    static let tagLabel = Array("godwit-migration-v1 file".utf8)
    /// magic (8) + version (4) + label (8).
    public static let headerLength = 20

    /// The bytes of a file holding `sections` (a `done` section is added at the end).
    public static func encode(_ sections: [MigrationSection]) throws(MigrationError) -> [UInt8] {
        var bytes = MigrationStream.magic
        bytes.appendLE(MigrationStream.version)
        bytes += label
        let mac = try HMAC(key: checksumKey)
        for (sequence, section) in (sections + [MigrationSection(kind: .done, payload: [])]).enumerated() {
            guard UInt64(section.payload.count) <= section.kind.maxPayloadLength else {
                throw .sectionTooLarge(kind: section.kind, length: UInt64(section.payload.count), limit: section.kind.maxPayloadLength)
            }
            var header = [UInt8]()
            header.appendLE(section.kind.rawValue)
            header.appendLE(UInt64(section.payload.count))
            var number = [UInt8]()
            number.appendLE(UInt64(sequence))
            try mac.restart()
            for part in [tagLabel, number, header, section.payload] { try mac.update(part) }
            bytes += header
            bytes += section.payload
            bytes += try mac.finish()
        }
        return bytes
    }

    /// The sections of a file (without the final `done`), each checked; throws on the first fault.
    public static func decode(_ bytes: [UInt8]) throws(MigrationError) -> [MigrationSection] {
        guard bytes.count >= headerLength else { throw .malformedSection(kind: .config, reason: "a file of \(bytes.count) bytes has no header") }
        guard Array(bytes[0..<8]) == MigrationStream.magic else { throw .badMagic(Array(bytes[0..<8])) }
        // In bounds: bytes.count >= headerLength = 20 > 12.
        let version: UInt32 = bytes.withUnsafeBytes { $0.loadLE(at: 8) }
        guard version == MigrationStream.version else { throw .unsupportedVersion(version) }
        guard Array(bytes[12..<20]) == label else { throw .malformedSection(kind: .config, reason: "not a snapshot file (label \(Array(bytes[12..<20])))") }
        let mac = try HMAC(key: checksumKey)
        var sections: [MigrationSection] = []
        var offset = headerLength
        var sequence: UInt64 = 0
        while true {
            guard bytes.count - offset >= MigrationStream.sectionHeaderLength else {
                throw .malformedSection(kind: sections.last?.kind ?? .config, reason: "the file ends after \(sections.count) sections, without its done section (truncated)")
            }
            let header = Array(bytes[offset..<(offset + MigrationStream.sectionHeaderLength)])
            // In bounds: the header is 12 bytes (u32 at 0, u64 at 4).
            let (rawKind, length): (UInt32, UInt64) = header.withUnsafeBytes { ($0.loadLE(at: 0), $0.loadLE(at: 4)) }
            guard let kind = MigrationSectionKind(rawValue: rawKind) else { throw .unknownSectionKind(rawKind) }
            guard length <= kind.maxPayloadLength else { throw .sectionTooLarge(kind: kind, length: length, limit: kind.maxPayloadLength) }
            offset += MigrationStream.sectionHeaderLength
            // length <= maxPayloadLength (at most 16 MiB): no overflow in Int.
            guard bytes.count - offset >= Int(length) + MigrationStream.tagLength else {
                throw .malformedSection(kind: kind, reason: "section \(sequence) claims \(length) bytes, the file has \(bytes.count - offset) left (truncated)")
            }
            let payload = Array(bytes[offset..<(offset + Int(length))])
            offset += Int(length)
            let tag = Array(bytes[offset..<(offset + MigrationStream.tagLength)])
            offset += MigrationStream.tagLength
            var number = [UInt8]()
            number.appendLE(sequence)
            try mac.restart()
            for part in [tagLabel, number, header, payload] { try mac.update(part) }
            guard HMAC.equal(try mac.finish(), tag) else { throw .badTag(sequence: sequence) }
            sequence += 1
            if kind == .done {
                guard offset == bytes.count else {
                    throw .malformedSection(kind: .done, reason: "\(bytes.count - offset) bytes follow the done section")
                }
                return sections
            }
            sections.append(MigrationSection(kind: kind, payload: payload))
        }
    }
}

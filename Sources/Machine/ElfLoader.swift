import GuestMemory

/// A parsed ELF64 x86-64 kernel: its loadable segments and its PVH entry point.
///
/// Every header field and segment is checked against the file before use: a truncated or
/// lying header is an `ElfError`, never a trap.
public struct ElfImage: Equatable, Sendable {
    /// One PT_LOAD segment, placed at its physical address.
    public struct Segment: Equatable, Sendable {
        public var physicalAddress: UInt64
        public var fileOffset: UInt64
        public var fileSize: UInt64
        public var memorySize: UInt64
    }

    public var entry: UInt64
    /// The 32-bit entry from the Xen `XEN_ELFNOTE_PHYS32_ENTRY` note, if present.
    public var pvhEntry: UInt32?
    public var segments: [Segment]
    /// Whether the file carries Linux's own ELF notes (name "Linux"): a `vmlinux`, not the test guest.
    public var isLinux = false

    /// The end of the highest segment in memory.
    public var end: UInt64 { segments.map { $0.physicalAddress + $0.memorySize }.max() ?? 0 }

    static let xenNoteType: UInt32 = 18
    /// The first four bytes of every ELF file.
    static let magic: [UInt8] = [0x7f, 0x45, 0x4c, 0x46]

    /// Parses `bytes` as an ELF64 little-endian x86-64 executable.
    public static func parse(_ bytes: [UInt8]) throws(ElfError) -> ElfImage {
        // In bounds: parse(size:read:) asks only for ranges inside `size` (= bytes.count).
        try parse(size: bytes.count) { offset, count in Array(bytes[offset..<offset + count]) }
    }

    /// Parses an ELF64 file of `size` bytes read in pieces: `read(offset, count)` returns that range,
    /// which is always inside `size`. Only the headers and notes are read, not the segments' contents
    /// (`load(into:copying:)` brings those straight into guest memory).
    static func parse(size: Int, read: (Int, Int) throws(ElfError) -> [UInt8]) throws(ElfError) -> ElfImage {
        let bytes = try read(0, min(size, 64))
        let r = ByteReader(bytes)
        guard bytes.starts(with: magic) || bytes.count < 4 else { throw .notELF }
        guard bytes.count >= 64 else { throw .truncated(what: "ELF header", need: 64, have: size) }
        guard bytes[4] == 2 else { throw .unsupported("class \(bytes[4]) (only ELF64)") }
        guard bytes[5] == 1 else { throw .unsupported("data encoding \(bytes[5]) (only little-endian)") }
        guard bytes[6] == 1 else { throw .unsupported("ELF version \(bytes[6])") }
        let type = r.u16(16)!, machine = r.u16(18)!
        guard type == 2 else { throw .unsupported("type \(type) (only ET_EXEC)") }
        guard machine == 62 else { throw .unsupported("machine \(machine) (only x86-64)") }
        let entry = r.u64(24)!, phoff = r.u64(32)!
        let phentsize = Int(r.u16(54)!), phnum = Int(r.u16(56)!)
        guard phnum > 0 else { throw .invalid("no program headers") }
        guard phentsize == 56 else { throw .invalid("program header size \(phentsize), expected 56") }
        guard phnum <= 128 else { throw .invalid("\(phnum) program headers") }
        let tableSize = UInt64(phnum * phentsize)
        guard phoff <= UInt64(size), tableSize <= UInt64(size) - phoff else {
            throw .truncated(what: "program headers at \(phoff)", need: Int(clamping: tableSize), have: size)
        }
        let table = ByteReader(try read(Int(phoff), Int(tableSize)))
        var segments: [Segment] = []
        var pvhEntry: UInt32?
        var isLinux = false
        for i in 0..<phnum {
            let at = i * phentsize
            let pType = table.u32(at)!, offset = table.u64(at + 8)!, paddr = table.u64(at + 24)!
            let filesz = table.u64(at + 32)!, memsz = table.u64(at + 40)!
            guard offset <= UInt64(size), filesz <= UInt64(size) - offset else {
                throw .invalid("segment \(i) (offset \(offset), size \(filesz)) extends past the end of the file (\(size) bytes)")
            }
            switch pType {
            case 1: // PT_LOAD
                guard filesz <= memsz else { throw .invalid("segment \(i) file size \(filesz) exceeds memory size \(memsz)") }
                guard paddr &+ memsz >= paddr else { throw .invalid("segment \(i) at 0x\(String(paddr, radix: 16)) wraps around") }
                if memsz > 0 {
                    segments.append(Segment(physicalAddress: paddr, fileOffset: offset, fileSize: filesz, memorySize: memsz))
                }
            case 4: // PT_NOTE
                let notes = try parseNotes(ByteReader(try read(Int(offset), Int(filesz))), from: 0, size: Int(filesz), fileOffset: Int(offset))
                if let found = notes.pvhEntry { pvhEntry = found }
                isLinux = isLinux || notes.linux
            default:
                continue
            }
        }
        guard !segments.isEmpty else { throw .invalid("no loadable segments") }
        let sorted = segments.sorted { $0.physicalAddress < $1.physicalAddress }
        for (a, b) in zip(sorted, sorted.dropFirst()) where a.physicalAddress + a.memorySize > b.physicalAddress {
            throw .invalid("segments at 0x\(String(a.physicalAddress, radix: 16)) and 0x\(String(b.physicalAddress, radix: 16)) overlap")
        }
        return ElfImage(entry: entry, pvhEntry: pvhEntry, segments: segments, isLinux: isLinux)
    }

    /// Finds the Xen PHYS32_ENTRY note in a PT_NOTE segment, and whether any note is Linux's.
    /// `r` holds the segment from `start`; `fileOffset` is where the segment is in the file (for errors).
    static func parseNotes(_ r: ByteReader, from start: Int, size: Int, fileOffset: Int) throws(ElfError) -> (pvhEntry: UInt32?, linux: Bool) {
        var at = start
        var pvhEntry: UInt32?
        var linux = false
        let end = start + size
        while at + 12 <= end {
            let namesz = Int(r.u32(at)!), descsz = Int(r.u32(at + 4)!), type = r.u32(at + 8)!
            guard namesz <= 256, descsz <= 4096 else { throw .invalid("note at \(at - start + fileOffset) has sizes \(namesz)/\(descsz)") }
            let nameAt = at + 12
            let descAt = nameAt + ((namesz + 3) & ~3)
            let next = descAt + ((descsz + 3) & ~3)
            guard next <= end else { throw .truncated(what: "note at \(at - start + fileOffset)", need: next - at, have: end - at) }
            if namesz == 6, r.bytes[nameAt..<nameAt + 6].elementsEqual(Array("Linux".utf8) + [0]) { linux = true }
            if type == xenNoteType, namesz == 4, r.bytes[nameAt..<nameAt + 4].elementsEqual([0x58, 0x65, 0x6e, 0]) {
                switch descsz {
                case 4: pvhEntry = r.u32(descAt)!
                case 8:
                    let value = r.u64(descAt)!
                    guard value <= UInt64(UInt32.max) else { throw .invalid("PVH entry 0x\(String(value, radix: 16)) is above 4 GiB") }
                    pvhEntry = UInt32(value)
                default: throw .invalid("PVH entry note has \(descsz) bytes")
                }
            }
            at = next
        }
        return (pvhEntry, linux)
    }

    /// Copies the segments into guest memory, zeroing the rest of each; refuses VMM-owned areas.
    public func load(from bytes: [UInt8], into memory: GuestMemory) throws {
        try load(into: memory) { s, destination in
            // In bounds: parse() checked fileOffset + fileSize <= bytes.count, and destination holds fileSize bytes.
            bytes.withUnsafeBytes { source in
                destination.copyMemory(from: UnsafeRawBufferPointer(rebasing: source[Int(s.fileOffset)..<Int(s.fileOffset + s.fileSize)]))
            }
        }
    }

    /// Places each segment in guest memory: `copy` fills the segment's first `fileSize` bytes (from the
    /// file, at `fileOffset`); the rest up to `memorySize` is zeroed. Refuses VMM-owned areas.
    func load(into memory: GuestMemory, copying copy: (Segment, UnsafeMutableRawBufferPointer) throws -> Void) throws {
        for s in segments {
            for area in Layout.reserved where s.physicalAddress < area.end && s.physicalAddress + s.memorySize > area.start {
                throw ElfError.invalid("segment at 0x\(String(s.physicalAddress, radix: 16)) overlaps \(area.name) at 0x\(String(area.start, radix: 16))")
            }
            guard memory.contains(s.physicalAddress, length: s.memorySize) else {
                throw ElfError.doesNotFit(address: s.physicalAddress, size: s.memorySize)
            }
            let destination = try memory.buffer(at: s.physicalAddress, length: Int(s.memorySize))
            // In bounds: parse() checked fileSize <= memorySize, the destination's length.
            try copy(s, UnsafeMutableRawBufferPointer(rebasing: destination[0..<Int(s.fileSize)]))
            if s.memorySize > s.fileSize {
                UnsafeMutableRawBufferPointer(rebasing: destination[Int(s.fileSize)...]).initializeMemory(as: UInt8.self, repeating: 0)
            }
        }
    }
}

/// Why an ELF kernel was refused.
public enum ElfError: Error, CustomStringConvertible, Equatable, Sendable {
    case notELF
    case truncated(what: String, need: Int, have: Int)
    case unsupported(String)
    case invalid(String)
    case doesNotFit(address: UInt64, size: UInt64)
    case noPVHNote

    public var description: String {
        switch self {
        case .notELF: return "not an ELF file"
        case let .truncated(what, need, have): return "truncated: \(what) needs \(need) bytes, have \(have)"
        case let .unsupported(what): return "unsupported ELF \(what)"
        case let .invalid(what): return "invalid ELF: \(what)"
        case let .doesNotFit(address, size):
            return "segment at 0x\(String(address, radix: 16)) of \(size) bytes does not fit in guest RAM"
        case .noPVHNote: return "no Xen PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY): not a PVH kernel"
        }
    }
}

/// Little-endian reads from a byte array that return nil instead of trapping when out of range.
struct ByteReader {
    let bytes: [UInt8]
    init(_ bytes: [UInt8]) { self.bytes = bytes }

    func u16(_ at: Int) -> UInt16? { value(at, 2).map { UInt16($0) } }
    func u32(_ at: Int) -> UInt32? { value(at, 4).map { UInt32($0) } }
    func u64(_ at: Int) -> UInt64? { value(at, 8) }

    private func value(_ at: Int, _ size: Int) -> UInt64? {
        guard at >= 0, at <= bytes.count - size else { return nil }
        var v: UInt64 = 0
        for i in (0..<size).reversed() { v = v << 8 | UInt64(bytes[at + i]) }
        return v
    }
}

import CGodwit
import GodwitSystem
#if canImport(Glibc)
import Glibc
#endif

/// Errors from guest-memory access: the guest-physical range that was refused.
public enum GuestMemoryError: Error, CustomStringConvertible, Equatable, Sendable {
    /// The range is not entirely inside one RAM region.
    case outOfRange(address: UInt64, length: UInt64)
    /// Regions overlap or are empty.
    case badLayout(String)
    /// The host's pool of 2 MiB huge pages has fewer free pages than the RAM needs (`free`: nil when
    /// /proc/meminfo cannot be read).
    case hugePagesUnavailable(needed: UInt64, free: UInt64?)

    public var description: String {
        switch self {
        case let .outOfRange(address, length):
            return "guest range 0x\(String(address, radix: 16)) length \(length) is outside guest RAM"
        case let .badLayout(why):
            return "bad guest memory layout: \(why)"
        case let .hugePagesUnavailable(needed, free):
            let have = free.map { "\($0) are free" } ?? "the free count is unknown"
            return "guest RAM needs \(needed) free 2 MiB huge pages but \(have) (reserve more in /proc/sys/vm/nr_hugepages)"
        }
    }
}

/// One contiguous range of guest-physical RAM, backed by host memory (a memfd when shareable).
public final class GuestRegion: @unchecked Sendable {
    public let guestBase: UInt64
    public let size: UInt64
    /// The memfd behind this region and its offset, so another process can map it (vhost-user).
    public let backing: FileDescriptor?
    public let backingOffset: UInt64
    let mapping: MemoryMapping

    public var hostBase: UnsafeMutableRawPointer { mapping.base }

    init(guestBase: UInt64, size: UInt64, backing: FileDescriptor?, backingOffset: UInt64, mapping: MemoryMapping) {
        self.guestBase = guestBase
        self.size = size
        self.backing = backing
        self.backingOffset = backingOffset
        self.mapping = mapping
    }

}

/// Guest-physical memory: the RAM regions of one VM, with bounds-checked access.
///
/// Every access names a guest-physical range; a range that is not wholly inside one region
/// is refused with `GuestMemoryError.outOfRange`, never trapped on.
public final class GuestMemory: @unchecked Sendable {
    public let regions: [GuestRegion]

    /// The guest page numbers (4 KiB, guest-physical) that may hold data, as ranges: everything else
    /// is a hole in the memfd that reads as zeros and was never touched (found with SEEK_DATA and
    /// SEEK_HOLE, without faulting a page in). Nil when a region has no memfd or the file system
    /// cannot tell.
    /// lseek's SEEK_DATA and SEEK_HOLE (Linux; not exported by Swift's Glibc module).
    static let seekData: Int32 = 3
    static let seekHole: Int32 = 4

    public func dataPageRanges() -> [Range<UInt64>]? {
        var ranges: [Range<UInt64>] = []
        for region in regions {
            guard let fd = region.backing?.rawValue else { return nil }
            let start = Int(region.backingOffset), end = Int(region.backingOffset + region.size)
            var offset = start
            while offset < end {
                let data = lseek(fd, offset, GuestMemory.seekData)
                if data < 0 {
                    if errno == ENXIO { break }  // no data after `offset`
                    return nil
                }
                if data >= end { break }
                var hole = lseek(fd, data, GuestMemory.seekHole)
                if hole < 0 { return nil }
                hole = min(hole, end)
                // Pages, rounded outwards, as guest page numbers.
                let first = (region.guestBase + UInt64(data - start)) / 4096
                let last = (region.guestBase + UInt64(hole - start) + 4095) / 4096
                ranges.append(first..<last)
                offset = hole
            }
        }
        return ranges
    }

    /// Creates RAM for `layout` (guest base, size) in one memfd, each region at its own offset.
    ///
    /// `hugePages`: the memfd is made of 2 MiB hugetlbfs pages (every region a multiple of 2 MiB), all
    /// reserved from the host's pool when mapped: too few free huge pages is an error here, never a
    /// SIGBUS later. Otherwise the RAM asks for transparent huge pages (`adviseHugePages`).
    public static func create(layout: [(base: UInt64, size: UInt64)], name: String = "godwit-ram",
                              hugePages: Bool = false) throws -> GuestMemory {
        try validate(layout)
        if hugePages, let odd = layout.first(where: { $0.size % MemFD.hugePageSize != 0 || $0.base % MemFD.hugePageSize != 0 }) {
            throw GuestMemoryError.badLayout("region at 0x\(String(odd.base, radix: 16)) of \(odd.size) bytes is not made of whole 2 MiB huge pages")
        }
        let total = layout.reduce(UInt64(0)) { $0 + $1.size }
        let fd = try MemFD.create(name: name, size: total, sealed: true, hugePages: hugePages)
        var offset: UInt64 = 0
        var regions: [GuestRegion] = []
        for item in layout {
            let mapped: Result<MemoryMapping, SystemError> = Result { () throws(SystemError) in
                try MemoryMapping(size: Int(item.size), fd: fd, offset: Int(offset))
            }
            if hugePages, case .failure(let error) = mapped, error.errno == ENOMEM {
                throw GuestMemoryError.hugePagesUnavailable(needed: total / MemFD.hugePageSize, free: GuestMemory.freeHugePages())
            }
            let mapping = try mapped.get()
            if !hugePages { mapping.adviseHugePages() }
            regions.append(GuestRegion(guestBase: item.base, size: item.size, backing: fd, backingOffset: offset, mapping: mapping))
            offset += item.size
        }
        return GuestMemory(regions: regions)
    }

    /// HugePages_Free from /proc/meminfo (the default huge page size is 2 MiB on x86), or nil.
    static func freeHugePages() -> UInt64? {
        guard let file = try? FileDescriptor.open("/proc/meminfo", flags: O_RDONLY) else { return nil }
        var bytes = [UInt8](repeating: 0, count: 16384)
        // In bounds: read fills at most bytes.count bytes of the buffer it is given.
        guard let n = try? bytes.withUnsafeMutableBytes({ (b) throws(SystemError) -> Int in try file.read(into: b) }) else { return nil }
        let text = String(decoding: bytes.prefix(n), as: UTF8.self)
        for line in text.split(separator: "\n") where line.hasPrefix("HugePages_Free:") {
            return UInt64(line.dropFirst("HugePages_Free:".count).filter { $0 != " " })
        }
        return nil
    }

    /// Another process's RAM, mapped from the file descriptors it passed (vhost-user SET_MEM_TABLE):
    /// each region is `size` bytes of `fd` from `offset`, at guest-physical `base`.
    public static func mapping(regions: [(base: UInt64, size: UInt64, fd: FileDescriptor, offset: UInt64)]) throws -> GuestMemory {
        try validate(regions.map { (base: $0.base, size: $0.size) })
        let mapped = try regions.map { r in
            GuestRegion(guestBase: r.base, size: r.size, backing: r.fd, backingOffset: r.offset,
                        mapping: try MemoryMapping(size: Int(r.size), fd: r.fd, offset: Int(r.offset)))
        }
        return GuestMemory(regions: mapped)
    }

    /// Anonymous, unshared RAM: for tests of device logic over plain memory.
    public static func anonymous(layout: [(base: UInt64, size: UInt64)]) throws -> GuestMemory {
        try validate(layout)
        let regions = try layout.map { item in
            GuestRegion(guestBase: item.base, size: item.size, backing: nil, backingOffset: 0,
                        mapping: try MemoryMapping(size: Int(item.size), fd: nil, flags: MAP_PRIVATE))
        }
        return GuestMemory(regions: regions)
    }

    static func validate(_ layout: [(base: UInt64, size: UInt64)]) throws {
        guard !layout.isEmpty else { throw GuestMemoryError.badLayout("no regions") }
        let sorted = layout.sorted { $0.base < $1.base }
        for (i, item) in sorted.enumerated() {
            guard item.size > 0, item.size % 4096 == 0, item.base % 4096 == 0 else {
                throw GuestMemoryError.badLayout("region at 0x\(String(item.base, radix: 16)) is empty or not page aligned")
            }
            guard item.base &+ item.size > item.base else { throw GuestMemoryError.badLayout("region wraps") }
            if i > 0, sorted[i - 1].base + sorted[i - 1].size > item.base {
                throw GuestMemoryError.badLayout("regions overlap at 0x\(String(item.base, radix: 16))")
            }
        }
    }

    /// Where each region is, as plain values: the hot path (`buffer(at:)`, a dozen calls per block
    /// request) walks these instead of the region objects, which costs a retain and a release each.
    /// Valid while `regions` (which own the mappings) are; never changed after `init`.
    private struct Span {
        let guestBase: UInt64
        let size: UInt64
        let host: UnsafeMutableRawPointer
    }
    private let spans: UnsafeMutableBufferPointer<Span>

    init(regions: [GuestRegion]) {
        self.regions = regions.sorted { $0.guestBase < $1.guestBase }
        let end = self.regions.last.map { $0.guestBase + $0.size } ?? 0
        writeTracker = WriteTracker(pages: Int((end + 4095) / 4096))
        spans = .allocate(capacity: self.regions.count)
        for (i, region) in self.regions.enumerated() {
            // In bounds: i < regions.count, the capacity.
            (spans.baseAddress! + i).initialize(to: Span(guestBase: region.guestBase, size: region.size, host: region.hostBase))
        }
    }

    deinit { spans.deallocate() }

    /// The host address of `[address, address + length)` when it lies inside one region (the one bounds
    /// rule every access goes through).
    @inline(__always)
    private func host(_ address: UInt64, _ length: UInt64) -> UnsafeMutableRawPointer? {
        for i in 0..<spans.count {
            // In bounds: i < spans.count.
            let span = spans[i]
            guard address >= span.guestBase else { continue }
            let offset = address - span.guestBase
            if offset <= span.size && length <= span.size - offset { return span.host + Int(offset) }
        }
        return nil
    }

    /// `host` for a signed length (negative: nowhere).
    @inline(__always)
    private func host(_ address: UInt64, _ length: Int) -> UnsafeMutableRawPointer? {
        length >= 0 ? host(address, UInt64(length)) : nil
    }

    /// The pages this process touches while tracking is on: KVM's dirty log sees only the guest's own
    /// writes, not those of devices in the VMM, so a migration merges these in. Every `buffer(at:)` is
    /// counted (reads too: a superset, which costs only bandwidth).
    public let writeTracker: WriteTracker

    public var totalSize: UInt64 { regions.reduce(0) { $0 + $1.size } }

    /// True when `[address, address+length)` lies inside one region.
    public func contains(_ address: UInt64, length: UInt64) -> Bool {
        host(address, length) != nil
    }

    /// Host view of a guest range that lies inside one region.
    public func buffer(at address: UInt64, length: Int) throws(GuestMemoryError) -> UnsafeMutableRawBufferPointer {
        // In bounds: host() found the whole range inside one region.
        guard let start = host(address, length) else { throw .outOfRange(address: address, length: UInt64(bitPattern: Int64(length))) }
        if writeTracker.isOn { writeTracker.mark(address: address, length: UInt64(length)) }
        return UnsafeMutableRawBufferPointer(start: start, count: length)
    }

    /// Counts a write to `[address, address + length)` made after its `buffer(at:)` was taken (a
    /// device whose asynchronous read lands in guest RAM later): the migration must see it again.
    public func noteWrite(at address: UInt64, length: UInt64) {
        if writeTracker.isOn { writeTracker.mark(address: address, length: length) }
    }

    /// Like `buffer(at:length:)`, but not counted by the write tracker: for the migration's own reads.
    public func untrackedBuffer(at address: UInt64, length: Int) throws(GuestMemoryError) -> UnsafeMutableRawBufferPointer {
        // In bounds: host() found the whole range inside one region.
        guard let start = host(address, length) else { throw .outOfRange(address: address, length: UInt64(bitPattern: Int64(length))) }
        return UnsafeMutableRawBufferPointer(start: start, count: length)
    }

    public func read(at address: UInt64, into destination: UnsafeMutableRawBufferPointer) throws(GuestMemoryError) {
        let source = try buffer(at: address, length: destination.count)
        destination.copyMemory(from: UnsafeRawBufferPointer(source))
    }

    public func write(at address: UInt64, from source: UnsafeRawBufferPointer) throws(GuestMemoryError) {
        let destination = try buffer(at: address, length: source.count)
        destination.copyMemory(from: source)
    }

    public func readBytes(at address: UInt64, count: Int) throws(GuestMemoryError) -> [UInt8] {
        let source = try buffer(at: address, length: count)
        return Array(source)
    }

    public func writeBytes(_ bytes: [UInt8], at address: UInt64) throws(GuestMemoryError) {
        let destination = try buffer(at: address, length: bytes.count)
        bytes.withUnsafeBytes { destination.copyMemory(from: $0) }
    }

    /// Loads a little-endian integer. A naturally aligned 2-, 4- or 8-byte value is read with one
    /// access, so a field the guest updates at the same time (a ring index) is never seen half old,
    /// half new.
    public func load<T: FixedWidthInteger>(_ type: T.Type = T.self, at address: UInt64) throws(GuestMemoryError) -> T {
        let source = try buffer(at: address, length: MemoryLayout<T>.size)
        // In bounds: `buffer` checked the whole value lies in RAM.
        let pointer = source.baseAddress!
        let aligned = Int(bitPattern: pointer) % MemoryLayout<T>.size == 0
        switch MemoryLayout<T>.size {
        case 2 where aligned: return T(truncatingIfNeeded: UInt16(littleEndian: godwit_load16(pointer)))
        case 4 where aligned: return T(truncatingIfNeeded: UInt32(littleEndian: godwit_load32(pointer)))
        case 8 where aligned: return T(truncatingIfNeeded: UInt64(littleEndian: godwit_load64(pointer)))
        default: return T(littleEndian: source.loadUnaligned(as: T.self))
        }
    }

    /// Stores a little-endian integer; naturally aligned 2-, 4- and 8-byte values with one access.
    public func store<T: FixedWidthInteger>(_ value: T, at address: UInt64) throws(GuestMemoryError) {
        let destination = try buffer(at: address, length: MemoryLayout<T>.size)
        // In bounds: `buffer` checked the whole value lies in RAM.
        let pointer = destination.baseAddress!
        let aligned = Int(bitPattern: pointer) % MemoryLayout<T>.size == 0
        switch MemoryLayout<T>.size {
        case 2 where aligned: godwit_store16(pointer, UInt16(truncatingIfNeeded: value).littleEndian)
        case 4 where aligned: godwit_store32(pointer, UInt32(truncatingIfNeeded: value).littleEndian)
        case 8 where aligned: godwit_store64(pointer, UInt64(truncatingIfNeeded: value).littleEndian)
        default: destination.storeBytes(of: value.littleEndian, as: T.self)
        }
    }

    /// A full memory barrier, for ring protocols shared with running vCPUs.
    @inline(__always)
    public static func fence() { godwit_fence() }
}

/// A bitmap of guest pages (4 KiB, by guest-physical page number) set with atomic ORs from any
/// thread while tracking is on, and taken (cleared) by the migration.
public final class WriteTracker: @unchecked Sendable {
    /// Pages the bitmap covers (the highest guest-physical address / 4096).
    public let pageCount: Int
    private let words: UnsafeMutablePointer<UInt64>
    private let wordCount: Int
    private let flag: UnsafeMutablePointer<Int32>

    init(pages: Int) {
        pageCount = pages
        wordCount = (pages + 63) / 64
        words = .allocate(capacity: max(wordCount, 1))
        words.initialize(repeating: 0, count: max(wordCount, 1))
        flag = .allocate(capacity: 1)
        flag.initialize(to: 0)
    }

    deinit {
        words.deallocate()
        flag.deallocate()
    }

    public var isOn: Bool { godwit_atomic_load_int(flag) != 0 }

    /// Starts (clearing the bitmap) or stops tracking.
    public func setOn(_ on: Bool) {
        if on { _ = take() }
        godwit_atomic_store_int(flag, on ? 1 : 0)
    }

    func mark(address: UInt64, length: UInt64) {
        guard length > 0 else { return }
        let first = Int(address / 4096), last = Int((address + length - 1) / 4096)
        for page in first...min(last, pageCount - 1) {
            // In bounds: page < pageCount, so page / 64 < wordCount.
            godwit_atomic_or64(words + page / 64, 1 << UInt64(page % 64))
        }
    }

    /// The pages marked since the last call, as a bitmap (bit n of word n/64 = page n), cleared.
    public func take() -> [UInt64] {
        (0..<wordCount).map { godwit_atomic_exchange64(words + $0, 0) }
    }
}

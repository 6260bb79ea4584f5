import GodwitSystem
#if canImport(Glibc)
import Glibc
#endif

/// The storage behind a virtio-blk device: byte-addressed reads and writes with scatter-gather buffers,
/// flush, discard and write-zeroes.
///
/// `BlockDevice` checks every range against `capacity` (and sector alignment) before calling, so
/// implementations see only in-range requests whose offset and length are multiples of 512.
/// Implementations must be safe to call from several threads.
public protocol BlockBackend: AnyObject {
    /// Usable size in bytes, a multiple of 512.
    var capacity: UInt64 { get }
    /// Writes, discards and write-zeroes are refused.
    var readOnly: Bool { get }
    /// The logical block size to report to the guest (virtio-blk blk_size), at least 512.
    var blockSize: UInt32 { get }
    /// Discard (deallocate) is supported: the device offers VIRTIO_BLK_F_DISCARD.
    var supportsDiscard: Bool { get }
    /// Write-zeroes is supported: the device offers VIRTIO_BLK_F_WRITE_ZEROES.
    var supportsWriteZeroes: Bool { get }
    /// Fills `buffers`, in order, from `offset`.
    func read(at offset: UInt64, into buffers: [UnsafeMutableRawBufferPointer]) throws
    /// Writes `buffers`, in order, at `offset`.
    func write(at offset: UInt64, from buffers: [UnsafeRawBufferPointer]) throws
    /// Makes completed writes durable.
    func flush() throws
    /// Deallocates a range; later reads return zeroes or the old data (the guest may not rely on either).
    func discard(at offset: UInt64, length: UInt64) throws
    /// Makes a range read as zeroes, deallocating it when `mayUnmap` allows.
    func writeZeroes(at offset: UInt64, length: UInt64, mayUnmap: Bool) throws

    /// Whether a read (or write) of `buffers` at `offset` can be started with `submitAsync`.
    func acceptsAsync(isWrite: Bool, offset: UInt64, buffers: [UnsafeMutableRawBufferPointer]) -> Bool
    /// Whether FLUSH, DISCARD and WRITE_ZEROES can be started with `submitAsync` too (a backend whose
    /// synchronous calls may wait for requests in flight: the device never waits for it with its
    /// lock held).
    var acceptsAsyncCommands: Bool { get }
    /// Starts requests (each accepted by `acceptsAsync`) without waiting; returns how many, from the
    /// front, were started. `handler` gets each started one's result (byte count or -errno), on
    /// another thread, possibly before this returns. The caller does the rest synchronously.
    func submitAsync(_ requests: [BlockIORequest], handler: AsyncIOHandler) -> Int
    /// Busy polling: while on, the calling thread reaps completions itself with `pollAsync` (the
    /// engine's own completion thread stays asleep).
    func setAsyncPolling(_ on: Bool)
    /// Hands ready completions to their handlers on the calling thread; returns how many.
    func pollAsync() -> Int
}

/// One read or write for `BlockBackend.submitAsync`, or a command (for backends that accept them).
public struct BlockIORequest {
    public var isWrite: Bool
    public var offset: UInt64
    public var buffers: [UnsafeMutableRawBufferPointer]
    /// Handed back with the result.
    public var tag: UInt64
    /// `.transfer`: the read or write above; else a command (offset and buffers unused), whose
    /// successful result is 0.
    public var command: BlockIOCommand = .transfer

    public init(isWrite: Bool, offset: UInt64, buffers: [UnsafeMutableRawBufferPointer], tag: UInt64) {
        self.isWrite = isWrite
        self.offset = offset
        self.buffers = buffers
        self.tag = tag
    }

    public init(command: BlockIOCommand, tag: UInt64) {
        self.init(isWrite: command.writes, offset: 0, buffers: [], tag: tag)
        self.command = command
    }
}

/// What a `BlockIORequest` does beyond reading or writing.
public enum BlockIOCommand {
    case transfer
    case flush
    case discard([BlockRange])
    case writeZeroes([BlockRange])

    /// Whether it changes the disk's contents.
    public var writes: Bool {
        switch self {
        case .discard, .writeZeroes: return true
        case .transfer, .flush: return false
        }
    }
}

/// A byte range of a discard or write-zeroes (`mayUnmap`: write-zeroes may deallocate it).
public struct BlockRange: Equatable {
    public var offset: UInt64
    public var length: UInt64
    public var mayUnmap: Bool

    public init(offset: UInt64, length: UInt64, mayUnmap: Bool = false) {
        self.offset = offset
        self.length = length
        self.mayUnmap = mayUnmap
    }
}

extension BlockBackend {
    /// Backends without an asynchronous engine do every request synchronously.
    public func acceptsAsync(isWrite: Bool, offset: UInt64, buffers: [UnsafeMutableRawBufferPointer]) -> Bool { false }
    public var acceptsAsyncCommands: Bool { false }
    public func submitAsync(_ requests: [BlockIORequest], handler: AsyncIOHandler) -> Int { 0 }
    public func setAsyncPolling(_ on: Bool) {}
    public func pollAsync() -> Int { 0 }
}

/// A `BlockBackend` over a raw image file or a host block device, optionally with O_DIRECT.
///
/// With `direct`, reads and writes whose buffers and offset are aligned to the medium's direct-I/O
/// alignment can run asynchronously on a Linux native AIO context (`AsyncIOContext`, `submitAsync`);
/// other guest buffers go synchronously through 4096-aligned bounce buffers, and requests that are
/// not aligned are widened (reads) or read-modify-written (writes).
public final class FileBlockBackend: BlockBackend, @unchecked Sendable {
    /// fallocate(2) modes (linux/falloc.h).
    static let fallocKeepSize: Int32 = 0x01
    static let fallocPunchHole: Int32 = 0x02
    static let fallocZeroRange: Int32 = 0x10
    /// O_DIRECT (asm-generic value; arm64 has its own).
    #if arch(arm64)
    static let openDirect: Int32 = 0o200000
    #else
    static let openDirect: Int32 = 0o40000
    #endif
    /// Largest bounce buffer (direct I/O) and zero-fill buffer.
    static let chunkSize = 1 << 20
    static let bounceAlignment = 4096
    /// The most buffers one asynchronous request may have (UIO_MAXIOV).
    static let maxAsyncSegments = 1024

    public let path: String
    public let readOnly: Bool
    public let direct: Bool
    public let capacity: UInt64
    public let blockSize: UInt32
    public let supportsDiscard: Bool
    public var supportsWriteZeroes: Bool { !readOnly }
    /// The open file (for tests and statistics; do not close it).
    public let file: FileDescriptor

    /// The asynchronous I/O context for aligned direct I/O (nil: buffered, or the kernel refused it).
    public let asyncIO: AsyncIOContext?
    /// Serializes read-modify-write of partial direct-I/O blocks and the zero-range fallback flag.
    private let lock = Lock()
    private var zeroRangeUnsupported = false

    /// Opens `path`. Capacity is the file (or block device) size rounded down to whole sectors
    /// (to the direct-I/O alignment with `direct`).
    ///
    /// - Parameter directAlignment: with `direct`, an alignment to use instead of the probed one
    ///   (a power of two from 512 to 1 MiB, at least what the medium needs).
    /// - Parameter asyncDepth: with `direct`, how many requests the AIO context keeps in flight
    ///   (0: no AIO, every request synchronous).
    /// - Parameter asyncEngines: the kernel interfaces the AIO context may use, in order of preference.
    public init(path: String, readOnly: Bool = false, direct: Bool = false,
                directAlignment: UInt32? = nil, asyncDepth: Int = 512,
                asyncEngines: [AsyncIOContext.Engine] = AsyncIOContext.Engine.automatic) throws(SystemError) {
        self.path = path
        self.readOnly = readOnly
        self.direct = direct
        if let directAlignment {
            guard directAlignment >= 512, directAlignment <= UInt32(FileBlockBackend.chunkSize),
                  directAlignment & (directAlignment - 1) == 0 else {
                throw SystemError(operation: "open", errno: EINVAL,
                                  context: "\(path) with direct-I/O alignment \(directAlignment)")
            }
        }
        var flags = readOnly ? O_RDONLY : O_RDWR
        if direct { flags |= FileBlockBackend.openDirect }
        let file = try FileDescriptor.open(path, flags: flags)
        self.file = file
        let alignment: UInt64 = direct
            ? UInt64(directAlignment ?? UInt32(FileBlockBackend.probeDirectAlignment(file))) : 512
        let size = try file.size()
        self.blockSize = UInt32(alignment)
        self.capacity = size - size % alignment
        self.supportsDiscard = !readOnly && FileBlockBackend.probePunchHole(file, at: size)
        // Without an engine (io_uring_setup and io_setup refused, e.g. after lock-down with aio-max-nr
        // reached) requests stay synchronous.
        self.asyncIO = direct && asyncDepth > 0 ? try? AsyncIOContext(depth: asyncDepth, engines: asyncEngines) : nil
    }

    deinit {
        asyncIO?.close()
    }

    /// The smallest read size O_DIRECT accepts on this file, between 512 and 4096.
    private static func probeDirectAlignment(_ file: FileDescriptor) -> UInt64 {
        let probe = UnsafeMutableRawBufferPointer.allocate(byteCount: 4096, alignment: bounceAlignment)
        defer { probe.deallocate() }
        for size in [512, 1024, 2048] {
            do {
                _ = try file.pread(into: UnsafeMutableRawBufferPointer(rebasing: probe[0..<size]), offset: 0)
                return UInt64(size)
            } catch {
                continue
            }
        }
        return 4096
    }

    /// Whether the file system (or device) knows FALLOC_FL_PUNCH_HOLE: punches at the end of the file,
    /// which changes nothing. Only "not supported" answers count as no (a block device refuses the
    /// range instead, and supports the mode).
    private static func probePunchHole(_ file: FileDescriptor, at size: UInt64) -> Bool {
        do {
            try file.fallocate(mode: fallocPunchHole | fallocKeepSize, offset: size, length: 4096)
            return true
        } catch {
            return error.errno != EOPNOTSUPP && error.errno != ENOSYS && error.errno != EBADF && error.errno != ENODEV
        }
    }

    // MARK: BlockBackend

    /// Whether direct I/O can go straight to `buffers` (each aligned in address and length to the
    /// medium's direct-I/O alignment, as guest page buffers usually are) at `offset`: no bounce copy.
    private func alignedForDirect(_ buffers: [UnsafeMutableRawBufferPointer], at offset: UInt64) -> Bool {
        let alignment = Int(blockSize)
        return offset % UInt64(alignment) == 0 && buffers.allSatisfy {
            $0.count % alignment == 0 && Int(bitPattern: $0.baseAddress) % alignment == 0
        }
    }

    public func acceptsAsync(isWrite: Bool, offset: UInt64, buffers: [UnsafeMutableRawBufferPointer]) -> Bool {
        asyncIO != nil && !(isWrite && readOnly) && !buffers.isEmpty && buffers.count <= FileBlockBackend.maxAsyncSegments
            && alignedForDirect(buffers, at: offset)
    }

    public func submitAsync(_ requests: [BlockIORequest], handler: AsyncIOHandler) -> Int {
        guard let asyncIO else { return 0 }
        // Reads and writes only (commands are not accepted): the first other request ends the batch.
        let transfers = requests.prefix { if case .transfer = $0.command { return true } else { return false } }
        return asyncIO.submit(transfers.map {
            AsyncIORequest(fd: file.rawValue, isWrite: $0.isWrite, offset: $0.offset, buffers: $0.buffers, tag: $0.tag)
        }, handler: handler)
    }

    public func setAsyncPolling(_ on: Bool) {
        if on { asyncIO?.beginPolling() } else { asyncIO?.endPolling() }
    }

    public func pollAsync() -> Int { asyncIO?.pollCompletions() ?? 0 }

    public func read(at offset: UInt64, into buffers: [UnsafeMutableRawBufferPointer]) throws {
        if direct && !alignedForDirect(buffers, at: offset) {
            let total = buffers.reduce(0) { $0 + $1.count }
            var cursor = ScatterCursor(buffers: buffers)
            try directTransfer(offset: offset, length: total, isWrite: false, cursor: &cursor)
            return
        }
        var position = offset
        for buffer in buffers {
            let n = try file.preadFully(into: buffer, offset: position)
            guard n == buffer.count else {
                throw SystemError(operation: "pread", errno: EIO, context: "of \(path) at \(position): short read")
            }
            position += UInt64(n)
        }
    }

    public func write(at offset: UInt64, from buffers: [UnsafeRawBufferPointer]) throws {
        guard !readOnly else { throw SystemError(operation: "pwrite", errno: EROFS, context: path) }
        if direct && !alignedForDirect(buffers.map { UnsafeMutableRawBufferPointer(mutating: $0) }, at: offset) {
            let total = buffers.reduce(0) { $0 + $1.count }
            // The cursor only reads from these buffers on the write path.
            var cursor = ScatterCursor(buffers: buffers.map { UnsafeMutableRawBufferPointer(mutating: $0) })
            try directTransfer(offset: offset, length: total, isWrite: true, cursor: &cursor)
            return
        }
        var position = offset
        for buffer in buffers {
            try file.pwriteFully(from: buffer, offset: position)
            position += UInt64(buffer.count)
        }
    }

    public func flush() throws {
        try file.fdatasync()
    }

    public func discard(at offset: UInt64, length: UInt64) throws {
        try punchHole(at: offset, length: length)
    }

    private func punchHole(at offset: UInt64, length: UInt64) throws(SystemError) {
        guard !readOnly else { throw SystemError(operation: "fallocate", errno: EROFS, context: path) }
        guard length > 0 else { return }
        try file.fallocate(mode: FileBlockBackend.fallocPunchHole | FileBlockBackend.fallocKeepSize,
                           offset: offset, length: length)
    }

    public func writeZeroes(at offset: UInt64, length: UInt64, mayUnmap: Bool) throws {
        guard !readOnly else { throw SystemError(operation: "fallocate", errno: EROFS, context: path) }
        guard length > 0 else { return }
        if mayUnmap && supportsDiscard {
            // A punched hole reads as zeroes.
            do {
                try punchHole(at: offset, length: length)
                return
            } catch {
                guard error.errno == EOPNOTSUPP else { throw error }
            }
        }
        if !lock.withLock({ zeroRangeUnsupported }) {
            do {
                try file.fallocate(mode: FileBlockBackend.fallocZeroRange | FileBlockBackend.fallocKeepSize,
                                   offset: offset, length: length)
                return
            } catch {
                guard error.errno == EOPNOTSUPP || error.errno == ENOSYS else { throw error }
                lock.withLock { zeroRangeUnsupported = true }
            }
        }
        try writeZeroesByWriting(at: offset, length: length)
    }

    private func writeZeroesByWriting(at offset: UInt64, length: UInt64) throws {
        let zeroes = UnsafeMutableRawBufferPointer.allocate(byteCount: FileBlockBackend.chunkSize,
                                                            alignment: FileBlockBackend.bounceAlignment)
        defer { zeroes.deallocate() }
        zeroes.initializeMemory(as: UInt8.self, repeating: 0)
        var done: UInt64 = 0
        while done < length {
            let n = Int(min(UInt64(zeroes.count), length - done))
            try write(at: offset + done, from: [UnsafeRawBufferPointer(rebasing: zeroes[0..<n])])
            done += UInt64(n)
        }
    }

    // MARK: Direct I/O through bounce buffers

    /// Moves `length` bytes between the file at `offset` and the cursor's buffers, through an aligned
    /// bounce buffer, one aligned window (at most `chunkSize`) at a time.
    private func directTransfer(offset: UInt64, length: Int, isWrite: Bool, cursor: inout ScatterCursor) throws {
        guard length > 0 else { return }
        let alignment = UInt64(blockSize)
        let end = offset + UInt64(length)
        // end <= capacity, a multiple of the alignment: the rounded end is still inside the file.
        let alignedEnd = (end + alignment - 1) / alignment * alignment
        let firstWindow = offset / alignment * alignment
        let bounceSize = Int(min(alignedEnd - firstWindow, UInt64(FileBlockBackend.chunkSize)))
        let bounce = UnsafeMutableRawBufferPointer.allocate(byteCount: bounceSize,
                                                            alignment: FileBlockBackend.bounceAlignment)
        defer { bounce.deallocate() }

        var position = offset
        while position < end {
            let windowStart = position / alignment * alignment
            let windowEnd = min(alignedEnd, windowStart + UInt64(bounceSize))
            let window = UnsafeMutableRawBufferPointer(rebasing: bounce[0..<Int(windowEnd - windowStart)])
            let dataEnd = min(end, windowEnd)
            let skip = Int(position - windowStart)
            let count = Int(dataEnd - position)
            let data = UnsafeMutableRawBufferPointer(rebasing: window[skip..<(skip + count)])
            if isWrite {
                let partial = skip != 0 || dataEnd != windowEnd
                try lock.withLock {
                    if partial { try readWindow(window, at: windowStart) }
                    cursor.copyOut(to: data)
                    try file.pwriteFully(from: UnsafeRawBufferPointer(window), offset: windowStart)
                }
            } else {
                try readWindow(window, at: windowStart)
                cursor.copyIn(from: UnsafeRawBufferPointer(data))
            }
            position = dataEnd
        }
    }

    private func readWindow(_ window: UnsafeMutableRawBufferPointer, at offset: UInt64) throws {
        let n = try file.preadFully(into: window, offset: offset)
        guard n == window.count else {
            throw SystemError(operation: "pread", errno: EIO, context: "of \(path) at \(offset): short read")
        }
    }
}

/// A position in a list of buffers, for copying a byte stream into or out of them in order.
struct ScatterCursor {
    let buffers: [UnsafeMutableRawBufferPointer]
    private var index = 0
    private var offset = 0

    init(buffers: [UnsafeMutableRawBufferPointer]) {
        self.buffers = buffers
    }

    /// Copies `source` into the buffers at the cursor and advances; stops at the end of the buffers.
    mutating func copyIn(from source: UnsafeRawBufferPointer) {
        var done = 0
        while done < source.count, index < buffers.count {
            let buffer = buffers[index]
            let n = min(buffer.count - offset, source.count - done)
            // In bounds: offset + n <= buffer.count and done + n <= source.count.
            UnsafeMutableRawBufferPointer(rebasing: buffer[offset..<(offset + n)])
                .copyMemory(from: UnsafeRawBufferPointer(rebasing: source[done..<(done + n)]))
            advance(n)
            done += n
        }
    }

    /// Copies bytes from the buffers at the cursor into `destination` and advances.
    mutating func copyOut(to destination: UnsafeMutableRawBufferPointer) {
        var done = 0
        while done < destination.count, index < buffers.count {
            let buffer = buffers[index]
            let n = min(buffer.count - offset, destination.count - done)
            UnsafeMutableRawBufferPointer(rebasing: destination[done..<(done + n)])
                .copyMemory(from: UnsafeRawBufferPointer(rebasing: buffer[offset..<(offset + n)]))
            advance(n)
            done += n
        }
    }

    private mutating func advance(_ n: Int) {
        offset += n
        while index < buffers.count, offset >= buffers[index].count {
            offset -= buffers[index].count
            index += 1
        }
    }
}

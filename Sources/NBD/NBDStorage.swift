import CGodwit
import GodwitSystem
#if canImport(Glibc)
import Glibc
#endif

/// What goes wrong in the NBD module, each case with the value that failed.
public enum NBDError: Error, CustomStringConvertible, Equatable {
    case system(SystemError)
    case peerClosed
    case timedOut(operation: String)
    case badMagic(expected: UInt64, got: UInt64)
    case protocolViolation(String)
    case unknownExport(String)
    case refused(option: UInt32, reply: UInt32, message: String)
    case outOfRange(offset: UInt64, length: UInt64, size: UInt64)
    case readOnly
    case invalidArgument(String)
    /// What libnbd said when a client call failed (its message and errno).
    case remote(operation: String, errno: Int32, message: String)

    public var description: String {
        switch self {
        case .system(let error): return "\(error)"
        case .peerClosed: return "the NBD peer closed the connection"
        case .timedOut(let operation): return "timed out \(operation)"
        case .badMagic(let expected, let got): return "bad NBD magic 0x\(String(got, radix: 16)) (expected 0x\(String(expected, radix: 16)))"
        case .protocolViolation(let what): return "NBD protocol violation: \(what)"
        case .unknownExport(let name): return "no NBD export named '\(name)'"
        case .refused(let option, let reply, let message): return "the NBD server refused option \(option) (reply 0x\(String(reply, radix: 16))): \(message)"
        case .outOfRange(let offset, let length, let size): return "NBD request [\(offset), +\(length)) is outside the export (\(size) bytes)"
        case .readOnly: return "the NBD export is read-only"
        case .invalidArgument(let what): return "invalid NBD argument: \(what)"
        case .remote(let operation, let errno, let message): return "NBD \(operation) failed: \(message) (errno \(errno))"
        }
    }
}

/// The storage behind an NBD export: a byte range with reads, writes, flush, trim and zeroing.
public protocol NBDStorage: AnyObject, Sendable {
    var size: UInt64 { get }
    var readOnly: Bool { get }
    func read(at offset: UInt64, into buffer: UnsafeMutableRawBufferPointer) throws
    /// Writes `buffer`; with `fua` the data is on stable storage before this returns.
    func write(at offset: UInt64, from buffer: UnsafeRawBufferPointer, fua: Bool) throws
    func flush() throws
    /// Discards a range (contents afterwards unspecified, as NBD allows).
    func trim(at offset: UInt64, length: UInt64) throws
    /// Makes a range read as zeros; `mayUnmap` allows punching a hole.
    func writeZeroes(at offset: UInt64, length: UInt64, mayUnmap: Bool, fua: Bool) throws
}

/// An NBD export over a file or block device descriptor (pread/pwrite, fdatasync, fallocate),
/// optionally a slice `[offset, offset + size)` of it.
public final class NBDFileStorage: NBDStorage, @unchecked Sendable {
    public let file: FileDescriptor
    public let base: UInt64
    public let size: UInt64
    public let readOnly: Bool

    /// Serves `file` from `offset` for `size` bytes (nil: to its end).
    public init(file: FileDescriptor, offset: UInt64 = 0, size: UInt64? = nil, readOnly: Bool) throws(NBDError) {
        let total: UInt64
        do { total = try file.size() } catch { throw .system(error) }
        guard offset <= total else { throw .invalidArgument("offset \(offset) is past the end of the file (\(total) bytes)") }
        let length = size ?? (total - offset)
        guard length <= total - offset else { throw .invalidArgument("slice [\(offset), +\(length)) is past the end of the file (\(total) bytes)") }
        self.file = file
        self.base = offset
        self.size = length
        self.readOnly = readOnly
    }

    /// Opens `path` (read-write unless `readOnly`).
    public convenience init(path: String, readOnly: Bool) throws(NBDError) {
        let fd: FileDescriptor
        do { fd = try FileDescriptor.open(path, flags: readOnly ? O_RDONLY : O_RDWR) } catch { throw .system(error) }
        try self.init(file: fd, readOnly: readOnly)
    }

    public func read(at offset: UInt64, into buffer: UnsafeMutableRawBufferPointer) throws {
        let n = try file.preadFully(into: buffer, offset: base + offset)
        // Past the end of a file that shrank underneath: zeros, as a hole would read.
        if n < buffer.count { UnsafeMutableRawBufferPointer(rebasing: buffer[n...]).initializeMemory(as: UInt8.self, repeating: 0) }
    }

    public func write(at offset: UInt64, from buffer: UnsafeRawBufferPointer, fua: Bool) throws {
        guard !readOnly else { throw NBDError.readOnly }
        try file.pwriteFully(from: buffer, offset: base + offset)
        if fua { try file.fdatasync() }
    }

    public func flush() throws { try file.fdatasync() }

    public func trim(at offset: UInt64, length: UInt64) throws {
        guard !readOnly else { throw NBDError.readOnly }
        // Trim is advisory: a file system without hole punching keeps the data.
        try? file.fallocate(mode: GODWIT_FALLOC_FL_PUNCH_HOLE | GODWIT_FALLOC_FL_KEEP_SIZE, offset: base + offset, length: length)
    }

    public func writeZeroes(at offset: UInt64, length: UInt64, mayUnmap: Bool, fua: Bool) throws {
        guard !readOnly else { throw NBDError.readOnly }
        let mode = mayUnmap ? GODWIT_FALLOC_FL_PUNCH_HOLE | GODWIT_FALLOC_FL_KEEP_SIZE : GODWIT_FALLOC_FL_ZERO_RANGE | GODWIT_FALLOC_FL_KEEP_SIZE
        if (try? file.fallocate(mode: mode, offset: base + offset, length: length)) == nil {
            let chunk = [UInt8](repeating: 0, count: 1 << 20)
            var done: UInt64 = 0
            while done < length {
                let n = Int(min(UInt64(chunk.count), length - done))
                // In bounds: n <= chunk.count.
                try chunk.withUnsafeBytes { try file.pwriteFully(from: UnsafeRawBufferPointer(rebasing: $0[0..<n]), offset: base + offset + done) }
                done += UInt64(n)
            }
        }
        if fua { try file.fdatasync() }
    }
}

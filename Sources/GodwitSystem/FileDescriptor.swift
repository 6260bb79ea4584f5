import CGodwit
#if canImport(Glibc)
import Glibc
#endif

/// An owning file descriptor: closed exactly once, when the last reference goes away or on `close()`.
///
/// The number is kept in an atomic cell: one thread may close (or shut down and close) a descriptor
/// another is blocked on, and two closers race to close it once (ThreadSanitizer found the plain
/// variable read by `shutdown` on one thread while `close` wrote it on another).
public final class FileDescriptor: @unchecked Sendable {
    private let cell: UnsafeMutablePointer<Int32>

    /// The descriptor, or -1 once closed or released.
    public var rawValue: Int32 { godwit_atomic_load_int(cell) }

    /// Takes ownership of `rawValue`.
    public init(owning rawValue: Int32) {
        cell = UnsafeMutablePointer<Int32>.allocate(capacity: 1)
        cell.initialize(to: rawValue)
    }

    deinit {
        let fd = godwit_atomic_exchange_int(cell, -1)
        if fd >= 0 { _ = Glibc.close(fd) }
        cell.deallocate()
    }

    /// Closes now; later uses fail with EBADF.
    public func close() {
        let fd = godwit_atomic_exchange_int(cell, -1)
        if fd >= 0 { _ = Glibc.close(fd) }
    }

    /// Gives up ownership: returns the descriptor, which this object no longer closes (-1 if closed).
    public func release() -> Int32 {
        godwit_atomic_exchange_int(cell, -1)
    }

    /// Opens `path`; the descriptor is close-on-exec.
    public static func open(_ path: String, flags: Int32, mode: UInt32 = 0o644) throws(SystemError) -> FileDescriptor {
        let fd = try systemCall("open", context: path) { godwit_open(path, flags, mode) }
        return FileDescriptor(owning: fd)
    }

    public func ioctl(_ request: UInt, _ argument: UnsafeMutableRawPointer?, _ name: @autoclosure () -> String) throws(SystemError) -> Int32 {
        try systemCall(name()) { godwit_ioctl_ptr(rawValue, request, argument) }
    }

    public func ioctl(_ request: UInt, value: UInt, _ name: @autoclosure () -> String) throws(SystemError) -> Int32 {
        try systemCall(name()) { godwit_ioctl_val(rawValue, request, value) }
    }

    /// Reads up to `count` bytes at `offset`.
    public func pread(into buffer: UnsafeMutableRawBufferPointer, offset: UInt64) throws(SystemError) -> Int {
        try systemCall("pread") { Glibc.pread(rawValue, buffer.baseAddress, buffer.count, off_t(offset)) }
    }

    public func pwrite(from buffer: UnsafeRawBufferPointer, offset: UInt64) throws(SystemError) -> Int {
        try systemCall("pwrite") { Glibc.pwrite(rawValue, buffer.baseAddress, buffer.count, off_t(offset)) }
    }

    /// Reads the whole buffer at `offset`, or fewer bytes only at end of file; returns the count.
    public func preadFully(into buffer: UnsafeMutableRawBufferPointer, offset: UInt64) throws(SystemError) -> Int {
        var done = 0
        while done < buffer.count {
            let n = try pread(into: UnsafeMutableRawBufferPointer(rebasing: buffer[done...]), offset: offset + UInt64(done))
            if n == 0 { break }
            done += n
        }
        return done
    }

    /// Writes the whole buffer at `offset`.
    public func pwriteFully(from buffer: UnsafeRawBufferPointer, offset: UInt64) throws(SystemError) {
        var done = 0
        while done < buffer.count {
            let n = try pwrite(from: UnsafeRawBufferPointer(rebasing: buffer[done...]), offset: offset + UInt64(done))
            if n == 0 { throw SystemError(operation: "pwrite", errno: EIO, context: "wrote 0 bytes") }
            done += n
        }
    }

    public func read(into buffer: UnsafeMutableRawBufferPointer) throws(SystemError) -> Int {
        try systemCall("read") { Glibc.read(rawValue, buffer.baseAddress, buffer.count) }
    }

    public func write(from buffer: UnsafeRawBufferPointer) throws(SystemError) -> Int {
        try systemCall("write") { Glibc.write(rawValue, buffer.baseAddress, buffer.count) }
    }

    public func writeAll(_ bytes: [UInt8]) throws(SystemError) {
        var done = 0
        while done < bytes.count {
            let start = done
            let n = bytes.withUnsafeBytes { b in
                Result { () throws(SystemError) -> Int in try write(from: UnsafeRawBufferPointer(rebasing: b[start...])) }
            }
            done += try n.get()
        }
    }

    public func fsync() throws(SystemError) {
        _ = try systemCall("fsync") { Glibc.fsync(rawValue) }
    }

    public func fdatasync() throws(SystemError) {
        _ = try systemCall("fdatasync") { Glibc.fdatasync(rawValue) }
    }

    /// The size of a regular file, or of a block device.
    public func size() throws(SystemError) -> UInt64 {
        var st = stat()
        _ = try systemCall("fstat") { fstat(rawValue, &st) }
        if (st.st_mode & S_IFMT) == S_IFBLK {
            var bytes: UInt64 = 0
            _ = try systemCall("ioctl(BLKGETSIZE64)") { godwit_ioctl_ptr(rawValue, 0x8008_1272, &bytes) }
            return bytes
        }
        return UInt64(st.st_size)
    }

    public func truncate(to size: UInt64) throws(SystemError) {
        _ = try systemCall("ftruncate") { ftruncate(rawValue, off_t(size)) }
    }

    /// fallocate(2) with `mode` (punch hole, zero range); throws EOPNOTSUPP where the file system lacks it.
    public func fallocate(mode: Int32, offset: UInt64, length: UInt64) throws(SystemError) {
        _ = try systemCall("fallocate") { godwit_fallocate(rawValue, mode, Int64(offset), Int64(length)) }
    }

    public func setNonBlocking(_ on: Bool) throws(SystemError) {
        _ = try systemCall("fcntl(O_NONBLOCK)") { godwit_set_nonblocking(rawValue, on ? 1 : 0) }
    }
}

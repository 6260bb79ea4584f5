import CGodwit
#if canImport(Glibc)
import Glibc
#endif

/// An owned mmap(2) region, unmapped on deinit.
public final class MemoryMapping: @unchecked Sendable {
    public let base: UnsafeMutableRawPointer
    public let size: Int

    /// Maps `size` bytes of `fd` at `offset` shared, or anonymous memory when `fd` is nil.
    public init(size: Int, fd: FileDescriptor?, offset: Int = 0, protection: Int32 = PROT_READ | PROT_WRITE,
                flags: Int32 = MAP_SHARED) throws(SystemError) {
        let anonymous = fd == nil ? MAP_ANONYMOUS : 0
        let address = mmap(nil, size, protection, flags | anonymous, fd?.rawValue ?? -1, off_t(offset))
        guard let address, address != MAP_FAILED else {
            throw SystemError(operation: "mmap", errno: godwit_errno(), context: "of \(size) bytes")
        }
        self.base = address
        self.size = size
    }

    deinit { munmap(base, size) }

    /// Asks for transparent huge pages behind this mapping (madvise MADV_HUGEPAGE), as QEMU does for
    /// guest RAM: the host honours it for memfd memory when its shmem_enabled setting is `advise` (or
    /// more), and ignores it otherwise. Fewer, larger pages mean fewer page-table walks for the guest and
    /// longer contiguous segments for direct I/O into guest buffers.
    public func adviseHugePages() {
        _ = madvise(base, size, GODWIT_MADV_HUGEPAGE)
    }

    public var buffer: UnsafeMutableRawBufferPointer { UnsafeMutableRawBufferPointer(start: base, count: size) }
}

/// An anonymous memory file (memfd) that another process can map.
public enum MemFD {
    /// The huge page size `create(hugePages: true)` uses.
    public static let hugePageSize: UInt64 = 2 << 20

    /// A memfd of `size` bytes. `sealed`: sealed against growing, shrinking and further sealing, as
    /// QEMU's `memory-backend-memfd` makes them, so that a process that maps it (an I/O domain) can never
    /// be made to touch memory past its end (SIGBUS).
    ///
    /// `hugePages`: 2 MiB hugetlbfs pages (`size` must be a multiple of 2 MiB); they come from the
    /// host's reserved pool (`/proc/sys/vm/nr_hugepages`), and mapping the file fails with ENOMEM
    /// when the pool has too few free pages.
    public static func create(name: String, size: UInt64, sealed: Bool = false, hugePages: Bool = false) throws(SystemError) -> FileDescriptor {
        if hugePages && size % hugePageSize != 0 {
            throw SystemError(operation: "memfd_create", errno: EINVAL, context: "\(name): \(size) bytes is not a whole number of 2 MiB huge pages")
        }
        let raw = try systemCall("memfd_create", context: hugePages ? "\(name) (2 MiB huge pages)" : name) {
            hugePages ? godwit_memfd_create_huge_2m(name, sealed ? 1 : 0)
                : sealed ? godwit_memfd_create_sealable(name) : godwit_memfd_create(name)
        }
        let fd = FileDescriptor(owning: raw)
        try fd.truncate(to: size)
        if sealed {
            let seals = GODWIT_F_SEAL_SHRINK | GODWIT_F_SEAL_GROW | GODWIT_F_SEAL_SEAL
            _ = try systemCall("fcntl(F_ADD_SEALS)", context: name) { godwit_add_seals(fd.rawValue, seals) }
        }
        return fd
    }
}

/// A Linux eventfd: a counter one side signals and the other waits on (ioeventfd, irqfd).
public final class EventFD: @unchecked Sendable {
    public let descriptor: FileDescriptor

    public init(initialValue: UInt32 = 0, nonBlocking: Bool = false) throws(SystemError) {
        let raw = try systemCall("eventfd") { godwit_eventfd(initialValue, nonBlocking ? 1 : 0) }
        descriptor = FileDescriptor(owning: raw)
    }

    public func signal(_ value: UInt64 = 1) throws(SystemError) {
        var v = value
        _ = try withUnsafeBytes(of: &v) { (b) throws(SystemError) -> Int in try descriptor.write(from: b) }
    }

    /// Reads and resets the counter; nil when non-blocking and nothing was signalled.
    public func wait() throws(SystemError) -> UInt64? {
        var v: UInt64 = 0
        do {
            _ = try withUnsafeMutableBytes(of: &v) { (b) throws(SystemError) -> Int in try descriptor.read(into: b) }
        } catch where error.errno == EAGAIN {
            return nil
        }
        return v
    }
}

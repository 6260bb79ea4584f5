import CGodwit
import GodwitSystem

/// Memory files shared with a backend, and the seals that keep them from shrinking under its mappings.
public enum VhostUserSharedMemory {
    /// A memfd of `size` bytes sealed against growing and shrinking (and against further sealing), as
    /// QEMU's `memory-backend-memfd` makes them: a backend that maps it can never be made to touch
    /// memory past its end.
    public static func createSealed(name: String, size: UInt64) throws -> FileDescriptor {
        try vhostSystem { () throws(SystemError) in try MemFD.create(name: name, size: size, sealed: true) }
    }

    /// Seals a sealable memfd against growing and shrinking (and further sealing).
    public static func seal(_ fd: FileDescriptor) throws {
        let seals = GODWIT_F_SEAL_SHRINK | GODWIT_F_SEAL_GROW | GODWIT_F_SEAL_SEAL
        _ = try vhostSystem { () throws(SystemError) in try systemCall("fcntl(F_ADD_SEALS)") { godwit_add_seals(fd.rawValue, seals) } }
    }

    /// True when `fd` is a memfd sealed against shrinking.
    public static func isSealedAgainstShrinking(_ fd: FileDescriptor) -> Bool {
        let seals = godwit_get_seals(fd.rawValue)
        return seals >= 0 && seals & GODWIT_F_SEAL_SHRINK != 0
    }
}

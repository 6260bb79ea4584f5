import CGodwit
import GodwitSystem
#if canImport(Glibc)
import Glibc
#endif

/// One CPUID leaf as KVM describes it (`struct kvm_cpuid_entry2`), Codable for VM state.
public struct CPUIDEntry: Codable, Equatable, Sendable {
    public var function: UInt32
    public var index: UInt32
    public var flags: UInt32
    public var eax: UInt32
    public var ebx: UInt32
    public var ecx: UInt32
    public var edx: UInt32

    public init(function: UInt32, index: UInt32, flags: UInt32, eax: UInt32, ebx: UInt32, ecx: UInt32, edx: UInt32) {
        self.function = function; self.index = index; self.flags = flags
        self.eax = eax; self.ebx = ebx; self.ecx = ecx; self.edx = edx
    }

    init(_ e: kvm_cpuid_entry2) {
        self.init(function: e.function, index: e.index, flags: e.flags, eax: e.eax, ebx: e.ebx, ecx: e.ecx, edx: e.edx)
    }

    var raw: kvm_cpuid_entry2 {
        var e = kvm_cpuid_entry2()
        e.function = function; e.index = index; e.flags = flags
        e.eax = eax; e.ebx = ebx; e.ecx = ecx; e.edx = edx
        return e
    }
}

/// The host's KVM (`/dev/kvm`): capabilities, supported CPUID, and the factory for VMs.
public final class KVMSystem: @unchecked Sendable {
    public let descriptor: FileDescriptor
    public let vcpuMmapSize: Int

    public static let defaultPath = "/dev/kvm"

    /// Whether this host's KVM is `kvm_pvm` (no VMX/SVM: guest kernel code runs through KVM's
    /// instruction emulator, which lacks some instructions Linux uses).
    public static let isPVM: Bool = access("/sys/module/kvm_pvm", F_OK) == 0

    public init(path: String = KVMSystem.defaultPath) throws {
        let fd: FileDescriptor
        do {
            fd = try FileDescriptor.open(path, flags: O_RDWR)
        } catch {
            throw KVMError.deviceUnavailable(path: path, error)
        }
        let version = try kvmCall { try fd.ioctl(GODWIT_KVM_GET_API_VERSION, value: 0, "KVM_GET_API_VERSION") }
        guard version == 12 else { throw KVMError.apiVersion(version) }
        descriptor = fd
        vcpuMmapSize = Int(try kvmCall { try fd.ioctl(GODWIT_KVM_GET_VCPU_MMAP_SIZE, value: 0, "KVM_GET_VCPU_MMAP_SIZE") })
        for (cap, name) in [(KVM_CAP_IRQCHIP, "KVM_CAP_IRQCHIP"), (KVM_CAP_USER_MEMORY, "KVM_CAP_USER_MEMORY"),
                            (KVM_CAP_IOEVENTFD, "KVM_CAP_IOEVENTFD"), (KVM_CAP_IRQFD, "KVM_CAP_IRQFD"),
                            (KVM_CAP_PIT2, "KVM_CAP_PIT2"), (KVM_CAP_EXT_CPUID, "KVM_CAP_EXT_CPUID")] {
            guard try checkExtension(Int32(cap)) > 0 else { throw KVMError.missingCapability(name: name) }
        }
    }

    /// KVM_CHECK_EXTENSION: 0 when absent, otherwise a capability-specific value.
    public func checkExtension(_ capability: Int32) throws -> Int32 {
        try kvmCall { try descriptor.ioctl(GODWIT_KVM_CHECK_EXTENSION, value: UInt(capability), "KVM_CHECK_EXTENSION") }
    }

    /// The largest vCPU count this KVM allows (KVM_CAP_MAX_VCPUS, else the recommended KVM_CAP_NR_VCPUS).
    public var maxVCPUs: Int {
        if let max = try? checkExtension(Int32(KVM_CAP_MAX_VCPUS)), max > 0 { return Int(max) }
        return (try? checkExtension(Int32(KVM_CAP_NR_VCPUS))).map { Int($0) } ?? 1
    }

    /// KVM_GET_SUPPORTED_CPUID.
    public func supportedCPUID() throws -> [CPUIDEntry] {
        let maxEntries = 256
        let size = MemoryLayout<kvm_cpuid2>.size + maxEntries * MemoryLayout<kvm_cpuid_entry2>.stride
        let raw = UnsafeMutableRawPointer.allocate(byteCount: size, alignment: 8)
        defer { raw.deallocate() }
        raw.initializeMemory(as: UInt8.self, repeating: 0, count: size)
        raw.storeBytes(of: UInt32(maxEntries), as: UInt32.self)
        _ = try kvmCall { try descriptor.ioctl(GODWIT_KVM_GET_SUPPORTED_CPUID, raw, "KVM_GET_SUPPORTED_CPUID") }
        let count = Int(raw.load(as: UInt32.self))
        guard count <= maxEntries else { throw KVMError.tooManyEntries(what: "CPUID entries", count: count) }
        // In bounds: count <= maxEntries, the buffer holds maxEntries entries after the header.
        let entries = (raw + MemoryLayout<kvm_cpuid2>.size).bindMemory(to: kvm_cpuid_entry2.self, capacity: count)
        return (0..<count).map { CPUIDEntry(entries[$0]) }
    }

    /// KVM_GET_MSR_INDEX_LIST: the MSRs this KVM saves and restores.
    public func msrIndexList() throws -> [UInt32] {
        let maxEntries = 1024
        let raw = UnsafeMutableRawPointer.allocate(byteCount: 4 + 4 * maxEntries, alignment: 4)
        defer { raw.deallocate() }
        raw.storeBytes(of: UInt32(maxEntries), as: UInt32.self)
        _ = try kvmCall { try descriptor.ioctl(GODWIT_KVM_GET_MSR_INDEX_LIST, raw, "KVM_GET_MSR_INDEX_LIST") }
        let count = Int(raw.load(as: UInt32.self))
        guard count <= maxEntries else { throw KVMError.tooManyEntries(what: "MSR indices", count: count) }
        // In bounds: count <= maxEntries.
        return (0..<count).map { raw.load(fromByteOffset: 4 + 4 * $0, as: UInt32.self) }
    }

    /// Creates an empty VM.
    public func createVM() throws -> VirtualMachine {
        let fd = try kvmCall { try descriptor.ioctl(GODWIT_KVM_CREATE_VM, value: 0, "KVM_CREATE_VM") }
        return VirtualMachine(system: self, descriptor: FileDescriptor(owning: fd))
    }
}

import CGodwit
import GodwitSystem
#if canImport(Glibc)
import Glibc
#endif

/// Why KVM_RUN returned: the exits a VMM must handle.
public enum VCPUExit {
    /// Port I/O. For `.out` the bytes are in `data`; for `.in` fill them. `count` > 1 is string I/O.
    case io(port: UInt16, isWrite: Bool, size: Int, count: Int, data: UnsafeMutableRawPointer)
    /// MMIO access of `length` bytes at `address`; `data` holds 8 bytes.
    case mmio(address: UInt64, length: Int, isWrite: Bool, data: UnsafeMutableRawPointer)
    case halt
    /// Triple fault or similar.
    case shutdown
    /// KVM could not run the guest; suberror 1 is an emulation failure (data holds the instruction bytes).
    case internalError(suberror: UInt32, data: [UInt64])
    case failEntry(reason: UInt64)
    case systemEvent(type: UInt32)
    /// KVM_RUN returned EINTR (a kick) or immediate_exit was set.
    case interrupted
    case other(reason: UInt32)
}

/// One KVM vCPU: its fd, the shared `kvm_run` page, register and state accessors.
public final class VirtualCPU: @unchecked Sendable {
    public let id: UInt32
    public let descriptor: FileDescriptor
    let runMapping: MemoryMapping

    var runPage: UnsafeMutablePointer<kvm_run> {
        // In bounds: the mapping is vcpu_mmap_size bytes, at least sizeof(kvm_run).
        runMapping.base.assumingMemoryBound(to: kvm_run.self)
    }

    init(id: UInt32, descriptor: FileDescriptor, runMapping: MemoryMapping) {
        self.id = id
        self.descriptor = descriptor
        self.runMapping = runMapping
    }

    /// Makes the next (or current, after a signal) KVM_RUN return at once.
    public func setImmediateExit(_ on: Bool) {
        godwit_run_set_immediate_exit(runPage, on ? 1 : 0)
    }

    /// Runs the vCPU until the next exit.
    public func run() throws -> VCPUExit {
        // Not through systemCall: EINTR here is a kick the caller wants to see, not a retry.
        if godwit_ioctl_val(descriptor.rawValue, GODWIT_KVM_RUN, 0) < 0 {
            let code = godwit_errno()
            if code == EINTR || code == EAGAIN { return .interrupted }
            throw KVMError.ioctl(SystemError(operation: "KVM_RUN", errno: code))
        }
        let reason = godwit_run_exit_reason(runPage)
        switch Int32(reason) {
        case KVM_EXIT_IO:
            var direction: UInt8 = 0, size: UInt8 = 0, port: UInt16 = 0, count: UInt32 = 0, offset: UInt64 = 0
            godwit_run_io(runPage, &direction, &size, &port, &count, &offset)
            // KVM places the data inside the run mapping at data_offset; check it anyway.
            let total = Int(size) * Int(count)
            guard offset < UInt64(runMapping.size), total <= runMapping.size - Int(offset) else {
                return .other(reason: reason)
            }
            return .io(port: port, isWrite: direction == UInt8(KVM_EXIT_IO_OUT), size: Int(size), count: Int(count),
                       data: runMapping.base + Int(offset))
        case KVM_EXIT_MMIO:
            var address: UInt64 = 0, length: UInt32 = 0, isWrite: UInt8 = 0
            let data = godwit_run_mmio(runPage, &address, &length, &isWrite)!
            return .mmio(address: address, length: Int(min(length, 8)), isWrite: isWrite != 0, data: UnsafeMutableRawPointer(data))
        case KVM_EXIT_HLT:
            return .halt
        case KVM_EXIT_SHUTDOWN:
            return .shutdown
        case KVM_EXIT_INTERNAL_ERROR:
            var suberror: UInt32 = 0, ndata: UInt32 = 0
            let words = godwit_run_internal(runPage, &suberror, &ndata)!
            return .internalError(suberror: suberror, data: (0..<Int(ndata)).map { words[$0] })
        case KVM_EXIT_FAIL_ENTRY:
            return .failEntry(reason: godwit_run_fail_entry_reason(runPage))
        case KVM_EXIT_SYSTEM_EVENT:
            return .systemEvent(type: godwit_run_system_event_type(runPage))
        case KVM_EXIT_INTR:
            return .interrupted
        default:
            return .other(reason: reason)
        }
    }

    public func registers() throws -> kvm_regs {
        var r = kvm_regs()
        _ = try kvmCall { try descriptor.ioctl(GODWIT_KVM_GET_REGS, &r, "KVM_GET_REGS") }
        return r
    }

    public func setRegisters(_ registers: kvm_regs) throws {
        var r = registers
        _ = try kvmCall { try descriptor.ioctl(GODWIT_KVM_SET_REGS, &r, "KVM_SET_REGS") }
    }

    public func specialRegisters() throws -> kvm_sregs {
        var s = kvm_sregs()
        _ = try kvmCall { try descriptor.ioctl(GODWIT_KVM_GET_SREGS, &s, "KVM_GET_SREGS") }
        return s
    }

    public func setSpecialRegisters(_ sregs: kvm_sregs) throws {
        var s = sregs
        _ = try kvmCall { try descriptor.ioctl(GODWIT_KVM_SET_SREGS, &s, "KVM_SET_SREGS") }
    }

    public func setFPU(_ fpu: kvm_fpu) throws {
        var f = fpu
        _ = try kvmCall { try descriptor.ioctl(GODWIT_KVM_SET_FPU, &f, "KVM_SET_FPU") }
    }

    /// KVM_SET_CPUID2.
    public func setCPUID(_ entries: [CPUIDEntry]) throws {
        let size = MemoryLayout<kvm_cpuid2>.size + entries.count * MemoryLayout<kvm_cpuid_entry2>.stride
        let raw = UnsafeMutableRawPointer.allocate(byteCount: size, alignment: 8)
        defer { raw.deallocate() }
        raw.initializeMemory(as: UInt8.self, repeating: 0, count: size)
        raw.storeBytes(of: UInt32(entries.count), as: UInt32.self)
        // In bounds: the buffer holds entries.count entries after the header.
        let table = (raw + MemoryLayout<kvm_cpuid2>.size).bindMemory(to: kvm_cpuid_entry2.self, capacity: entries.count)
        for (i, e) in entries.enumerated() { table[i] = e.raw }
        _ = try kvmCall { try descriptor.ioctl(GODWIT_KVM_SET_CPUID2, raw, "KVM_SET_CPUID2") }
    }

    /// KVM_SET_MSRS; returns how many were set (KVM stops at the first it refuses).
    @discardableResult
    public func setMSRs(_ msrs: [(index: UInt32, value: UInt64)]) throws -> Int {
        let size = MemoryLayout<kvm_msrs>.size + msrs.count * MemoryLayout<kvm_msr_entry>.stride
        let raw = UnsafeMutableRawPointer.allocate(byteCount: size, alignment: 8)
        defer { raw.deallocate() }
        raw.initializeMemory(as: UInt8.self, repeating: 0, count: size)
        raw.storeBytes(of: UInt32(msrs.count), as: UInt32.self)
        // In bounds: the buffer holds msrs.count entries after the header.
        let table = (raw + MemoryLayout<kvm_msrs>.size).bindMemory(to: kvm_msr_entry.self, capacity: msrs.count)
        for (i, m) in msrs.enumerated() {
            var e = kvm_msr_entry()
            e.index = m.index
            e.data = m.value
            table[i] = e
        }
        return Int(try kvmCall { try descriptor.ioctl(GODWIT_KVM_SET_MSRS, raw, "KVM_SET_MSRS") })
    }

    /// KVM_GET_MSRS for `indices`; MSRs KVM refuses are left out of the result.
    public func msrs(_ indices: [UInt32]) throws -> [(index: UInt32, value: UInt64)] {
        let size = MemoryLayout<kvm_msrs>.size + indices.count * MemoryLayout<kvm_msr_entry>.stride
        let raw = UnsafeMutableRawPointer.allocate(byteCount: size, alignment: 8)
        defer { raw.deallocate() }
        raw.initializeMemory(as: UInt8.self, repeating: 0, count: size)
        raw.storeBytes(of: UInt32(indices.count), as: UInt32.self)
        // In bounds: the buffer holds indices.count entries after the header.
        let table = (raw + MemoryLayout<kvm_msrs>.size).bindMemory(to: kvm_msr_entry.self, capacity: indices.count)
        for (i, index) in indices.enumerated() {
            var e = kvm_msr_entry()
            e.index = index
            table[i] = e
        }
        let n = Int(try kvmCall { try descriptor.ioctl(GODWIT_KVM_GET_MSRS, raw, "KVM_GET_MSRS") })
        return (0..<min(n, indices.count)).map { (table[$0].index, table[$0].data) }
    }

    /// KVM_GET_MP_STATE (e.g. KVM_MP_STATE_RUNNABLE, KVM_MP_STATE_UNINITIALIZED, KVM_MP_STATE_HALTED).
    public func mpState() throws -> UInt32 {
        var s = kvm_mp_state()
        _ = try kvmCall { try descriptor.ioctl(GODWIT_KVM_GET_MP_STATE, &s, "KVM_GET_MP_STATE") }
        return s.mp_state
    }

    public func setMPState(_ state: UInt32) throws {
        var s = kvm_mp_state(mp_state: state)
        _ = try kvmCall { try descriptor.ioctl(GODWIT_KVM_SET_MP_STATE, &s, "KVM_SET_MP_STATE") }
    }

    public func lapic() throws -> kvm_lapic_state {
        var s = kvm_lapic_state()
        _ = try kvmCall { try descriptor.ioctl(GODWIT_KVM_GET_LAPIC, &s, "KVM_GET_LAPIC") }
        return s
    }

    public func setLAPIC(_ state: kvm_lapic_state) throws {
        var s = state
        _ = try kvmCall { try descriptor.ioctl(GODWIT_KVM_SET_LAPIC, &s, "KVM_SET_LAPIC") }
    }

    /// The vCPU's TSC frequency in kHz (KVM_GET_TSC_KHZ), or nil when KVM cannot tell.
    public var tscKHz: Int32? {
        try? kvmCall { try descriptor.ioctl(GODWIT_KVM_GET_TSC_KHZ, value: 0, "KVM_GET_TSC_KHZ") }
    }
}

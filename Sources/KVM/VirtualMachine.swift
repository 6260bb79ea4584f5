import CGodwit
import GodwitSystem
#if canImport(Glibc)
import Glibc
#endif

/// A KVM VM: memory slots, the in-kernel irqchip and PIT, interrupt lines, ioeventfd/irqfd, vCPUs.
public final class VirtualMachine: @unchecked Sendable {
    public let system: KVMSystem
    public let descriptor: FileDescriptor

    init(system: KVMSystem, descriptor: FileDescriptor) {
        self.system = system
        self.descriptor = descriptor
    }

    /// Maps `size` bytes of host memory at `hostAddress` into the guest at `guestAddress` as `slot`.
    public func setUserMemoryRegion(slot: UInt32, guestAddress: UInt64, size: UInt64, hostAddress: UnsafeMutableRawPointer,
                                    logDirtyPages: Bool = false) throws {
        var region = kvm_userspace_memory_region(
            slot: slot, flags: logDirtyPages ? UInt32(KVM_MEM_LOG_DIRTY_PAGES) : 0,
            guest_phys_addr: guestAddress, memory_size: size,
            userspace_addr: UInt64(UInt(bitPattern: hostAddress)))
        _ = try kvmCall { try descriptor.ioctl(GODWIT_KVM_SET_USER_MEMORY_REGION, &region, "KVM_SET_USER_MEMORY_REGION") }
    }

    /// KVM_SET_TSS_ADDR (needed by VMX for real mode; harmless elsewhere).
    public func setTSSAddress(_ address: UInt64) throws {
        _ = try kvmCall { try descriptor.ioctl(GODWIT_KVM_SET_TSS_ADDR, value: UInt(address), "KVM_SET_TSS_ADDR") }
    }

    public func setIdentityMapAddress(_ address: UInt64) throws {
        var a = address
        _ = try kvmCall { try descriptor.ioctl(GODWIT_KVM_SET_IDENTITY_MAP_ADDR, &a, "KVM_SET_IDENTITY_MAP_ADDR") }
    }

    /// Creates the in-kernel PIC, IOAPIC and per-vCPU LAPICs (with default GSI routing).
    public func createIRQChip() throws {
        _ = try kvmCall { try descriptor.ioctl(GODWIT_KVM_CREATE_IRQCHIP, value: 0, "KVM_CREATE_IRQCHIP") }
    }

    /// Creates the in-kernel i8254 PIT.
    public func createPIT2() throws {
        var config = kvm_pit_config()
        config.flags = UInt32(KVM_PIT_SPEAKER_DUMMY)
        _ = try kvmCall { try descriptor.ioctl(GODWIT_KVM_CREATE_PIT2, &config, "KVM_CREATE_PIT2") }
    }

    /// Sets interrupt line `irq` (a GSI) to `level`.
    public func setIRQLine(_ irq: UInt32, level: Bool) throws {
        var line = kvm_irq_level()
        line.irq = irq
        line.level = level ? 1 : 0
        _ = try kvmCall { try descriptor.ioctl(GODWIT_KVM_IRQ_LINE, &line, "KVM_IRQ_LINE") }
    }

    /// Pulses an edge-triggered line: high then low.
    public func pulseIRQ(_ irq: UInt32) throws {
        try setIRQLine(irq, level: true)
        try setIRQLine(irq, level: false)
    }

    /// Routes writes to `eventFD` into GSI `gsi` (KVM_IRQFD); `deassign` removes it.
    public func registerIRQFD(_ eventFD: EventFD, gsi: UInt32, deassign: Bool = false) throws {
        var request = kvm_irqfd()
        request.fd = UInt32(eventFD.descriptor.rawValue)
        request.gsi = gsi
        request.flags = deassign ? UInt32(KVM_IRQFD_FLAG_DEASSIGN) : 0
        _ = try kvmCall { try descriptor.ioctl(GODWIT_KVM_IRQFD, &request, "KVM_IRQFD") }
    }

    /// Makes guest writes of `length` bytes to MMIO `address` (matching `value` when given) signal `eventFD`
    /// without an exit to the VMM (KVM_IOEVENTFD).
    public func registerIOEventFD(_ eventFD: EventFD, mmioAddress address: UInt64, length: UInt32,
                                  matching value: UInt64? = nil, deassign: Bool = false) throws {
        var request = kvm_ioeventfd()
        request.addr = address
        request.len = length
        request.fd = eventFD.descriptor.rawValue
        var flags: UInt32 = 0
        if let value { request.datamatch = value; flags |= UInt32(1 << kvm_ioeventfd_flag_nr_datamatch) }
        if deassign { flags |= UInt32(1 << kvm_ioeventfd_flag_nr_deassign) }
        request.flags = flags
        _ = try kvmCall { try descriptor.ioctl(GODWIT_KVM_IOEVENTFD, &request, "KVM_IOEVENTFD") }
    }

    /// Creates vCPU `id` (its APIC id).
    public func createVCPU(id: UInt32) throws -> VirtualCPU {
        let fd = try kvmCall { try descriptor.ioctl(GODWIT_KVM_CREATE_VCPU, value: UInt(id), "KVM_CREATE_VCPU") }
        let owned = FileDescriptor(owning: fd)
        let run = try kvmCall { try MemoryMapping(size: system.vcpuMmapSize, fd: owned) }
        return VirtualCPU(id: id, descriptor: owned, runMapping: run)
    }

    /// The kvm-clock value (KVM_GET_CLOCK), in nanoseconds.
    public func clock() throws -> UInt64 {
        var data = kvm_clock_data()
        _ = try kvmCall { try descriptor.ioctl(GODWIT_KVM_GET_CLOCK, &data, "KVM_GET_CLOCK") }
        return data.clock
    }

    public func setClock(_ nanoseconds: UInt64) throws {
        var data = kvm_clock_data()
        data.clock = nanoseconds
        _ = try kvmCall { try descriptor.ioctl(GODWIT_KVM_SET_CLOCK, &data, "KVM_SET_CLOCK") }
    }
}

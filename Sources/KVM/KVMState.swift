import CGodwit
import Foundation
import GodwitSystem
#if canImport(Glibc)
import Glibc
#endif

/// The saved state of one vCPU: what KVM holds for it, as plain bytes of the kernel's own structs
/// (checked for size when restored) plus the MSRs as index/value pairs.
public struct VCPUState: Codable, Equatable, Sendable {
    public var id: UInt32
    public var registers: Data
    public var specialRegisters: Data
    /// `kvm_xsave` (FPU, SSE, AVX...): the whole extended state.
    public var xsave: Data
    public var xcrs: Data
    public var msrs: [MSR]
    public var lapic: Data
    /// `kvm_vcpu_events`: pending exceptions, interrupts, NMIs, SMIs.
    public var events: Data
    public var mpState: UInt32
    public var debugRegisters: Data

    /// One model-specific register.
    public struct MSR: Codable, Equatable, Sendable {
        public var index: UInt32
        public var value: UInt64
    }
}

/// The saved state of a VM's in-kernel devices: the two PICs and the IOAPIC, the PIT, the kvm-clock.
public struct VMKernelState: Codable, Equatable, Sendable {
    /// `kvm_irqchip` for chip 0 (PIC master), 1 (PIC slave), 2 (IOAPIC).
    public var irqchips: [Data]
    public var pit: Data
    public var clock: UInt64
}

/// Raw kernel structs in and out of `Data`, size-checked: a saved blob of the wrong size is refused.
enum KernelStruct {
    static func bytes<T>(of value: T) -> Data {
        var copy = value
        return withUnsafeBytes(of: &copy) { Data($0) }
    }

    static func value<T>(_ type: T.Type, from data: Data, name: String) throws -> T {
        guard data.count == MemoryLayout<T>.size else {
            throw KVMError.badState(name: name, reason: "\(data.count) bytes, expected \(MemoryLayout<T>.size)")
        }
        // In bounds: the data is exactly one T; kernel structs are plain old data.
        return data.withUnsafeBytes { $0.loadUnaligned(as: T.self) }
    }
}

extension VirtualCPU {
    private func get<T>(_ request: UInt, _ empty: T, _ name: String) throws -> T {
        var value = empty
        _ = try kvmCall { try descriptor.ioctl(request, &value, name) }
        return value
    }

    private func set<T>(_ request: UInt, _ value: T, _ name: String) throws {
        var copy = value
        _ = try kvmCall { try descriptor.ioctl(request, &copy, name) }
    }

    /// Captures everything KVM holds for this vCPU. The vCPU must not be running. `msrIndices` is the
    /// list to save (KVM's own, from `KVMSystem.msrIndexList`); MSRs KVM refuses to read are skipped.
    public func captureState(msrIndices: [UInt32]) throws -> VCPUState {
        let registers = try registers()
        let sregs = try specialRegisters()
        let xsave = try get(GODWIT_KVM_GET_XSAVE, kvm_xsave(), "KVM_GET_XSAVE")
        let xcrs = try get(GODWIT_KVM_GET_XCRS, kvm_xcrs(), "KVM_GET_XCRS")
        let lapic = try lapic()
        let events = try get(GODWIT_KVM_GET_VCPU_EVENTS, kvm_vcpu_events(), "KVM_GET_VCPU_EVENTS")
        let debug = try get(GODWIT_KVM_GET_DEBUGREGS, kvm_debugregs(), "KVM_GET_DEBUGREGS")
        // KVM_GET_MSRS stops at the first MSR it refuses: read in one go, then the rest one by one.
        var saved: [VCPUState.MSR] = []
        var remaining = msrIndices[...]
        while !remaining.isEmpty {
            let got = try msrs(Array(remaining))
            saved += got.map { VCPUState.MSR(index: $0.index, value: $0.value) }
            remaining = remaining.dropFirst(got.count + 1)  // skip the refused one
        }
        return VCPUState(id: id, registers: KernelStruct.bytes(of: registers), specialRegisters: KernelStruct.bytes(of: sregs),
                         xsave: KernelStruct.bytes(of: xsave), xcrs: KernelStruct.bytes(of: xcrs), msrs: saved,
                         lapic: KernelStruct.bytes(of: lapic), events: KernelStruct.bytes(of: events), mpState: try mpState(),
                         debugRegisters: KernelStruct.bytes(of: debug))
    }

    /// Restores a captured state, in the order QEMU and Firecracker use (special registers before the
    /// MSRs and LAPIC, events and MP state last). Throws on a blob of the wrong size or an MSR KVM refuses.
    public func restoreState(_ state: VCPUState) throws {
        try setSpecialRegisters(try KernelStruct.value(kvm_sregs.self, from: state.specialRegisters, name: "vcpu \(id) sregs"))
        try setRegisters(try KernelStruct.value(kvm_regs.self, from: state.registers, name: "vcpu \(id) regs"))
        try set(GODWIT_KVM_SET_XSAVE, try KernelStruct.value(kvm_xsave.self, from: state.xsave, name: "vcpu \(id) xsave"), "KVM_SET_XSAVE")
        try set(GODWIT_KVM_SET_XCRS, try KernelStruct.value(kvm_xcrs.self, from: state.xcrs, name: "vcpu \(id) xcrs"), "KVM_SET_XCRS")
        let msrs = state.msrs.map { (index: $0.index, value: $0.value) }
        let set = try setMSRs(msrs)
        if set != msrs.count {
            throw KVMError.badState(name: "vcpu \(id) MSRs", reason: "KVM refused MSR 0x\(String(msrs[set].index, radix: 16))")
        }
        try setLAPIC(try KernelStruct.value(kvm_lapic_state.self, from: state.lapic, name: "vcpu \(id) lapic"))
        try self.set(GODWIT_KVM_SET_DEBUGREGS, try KernelStruct.value(kvm_debugregs.self, from: state.debugRegisters, name: "vcpu \(id) debugregs"),
                     "KVM_SET_DEBUGREGS")
        try setMPState(state.mpState)
        try self.set(GODWIT_KVM_SET_VCPU_EVENTS, try KernelStruct.value(kvm_vcpu_events.self, from: state.events, name: "vcpu \(id) events"),
                     "KVM_SET_VCPU_EVENTS")
    }

    /// Tells KVM the guest was paused on purpose, so its kvm-clock watchdogs do not fire (KVM_KVMCLOCK_CTRL);
    /// fails harmlessly when the guest has no kvm-clock.
    public func notifyClockPaused() {
        _ = try? kvmCall { try descriptor.ioctl(GODWIT_KVM_KVMCLOCK_CTRL, value: 0, "KVM_KVMCLOCK_CTRL") }
    }
}

extension VirtualMachine {
    /// Captures the in-kernel irqchip (both PICs, the IOAPIC), the PIT and the kvm-clock. vCPUs must be stopped.
    public func captureKernelState() throws -> VMKernelState {
        var chips: [Data] = []
        for chip in UInt32(0)...2 {
            var value = kvm_irqchip()
            value.chip_id = chip
            _ = try kvmCall { try descriptor.ioctl(GODWIT_KVM_GET_IRQCHIP, &value, "KVM_GET_IRQCHIP") }
            chips.append(KernelStruct.bytes(of: value))
        }
        var pit = kvm_pit_state2()
        _ = try kvmCall { try descriptor.ioctl(GODWIT_KVM_GET_PIT2, &pit, "KVM_GET_PIT2") }
        return VMKernelState(irqchips: chips, pit: KernelStruct.bytes(of: pit), clock: try clock())
    }

    /// Restores what `captureKernelState` saved (the clock too: the guest's time continues from it).
    public func restoreKernelState(_ state: VMKernelState) throws {
        guard state.irqchips.count == 3 else {
            throw KVMError.badState(name: "irqchip", reason: "\(state.irqchips.count) chips, expected 3")
        }
        for (i, data) in state.irqchips.enumerated() {
            var chip = try KernelStruct.value(kvm_irqchip.self, from: data, name: "irqchip \(i)")
            guard chip.chip_id == UInt32(i) else { throw KVMError.badState(name: "irqchip \(i)", reason: "chip id \(chip.chip_id)") }
            _ = try kvmCall { try descriptor.ioctl(GODWIT_KVM_SET_IRQCHIP, &chip, "KVM_SET_IRQCHIP") }
        }
        var pit = try KernelStruct.value(kvm_pit_state2.self, from: state.pit, name: "pit")
        _ = try kvmCall { try descriptor.ioctl(GODWIT_KVM_SET_PIT2, &pit, "KVM_SET_PIT2") }
        try setClock(state.clock)
    }

    /// KVM_GET_DIRTY_LOG for `slot` of `pages` pages: one bit per page written since the last call
    /// (KVM clears the log as it returns it). The slot must have been made with `logDirtyPages`.
    public func dirtyLog(slot: UInt32, pages: Int) throws -> [UInt64] {
        var bitmap = [UInt64](repeating: 0, count: (pages + 63) / 64)
        try bitmap.withUnsafeMutableBytes { raw in
            var log = kvm_dirty_log()
            log.slot = slot
            log.dirty_bitmap = raw.baseAddress
            _ = try kvmCall { try descriptor.ioctl(GODWIT_KVM_GET_DIRTY_LOG, &log, "KVM_GET_DIRTY_LOG") }
        }
        return bitmap
    }
}

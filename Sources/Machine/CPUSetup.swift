import CGodwit
import KVM

/// What the VMM tells each vCPU about itself: CPUID filtered from KVM's supported set, boot MSRs, and
/// the PVH entry register state.
public enum CPUSetup {
    /// KVM's supported CPUID adjusted for vCPU `id` of `count`: APIC ids, topology, the hypervisor bit.
    public static func cpuid(from supported: [CPUIDEntry], vcpu id: UInt32, count: Int) -> [CPUIDEntry] {
        let n = UInt32(max(1, count))
        let shift = UInt32(n <= 1 ? 0 : 32 - (n - 1).leadingZeroBitCount)
        return supported.map { original in
            var e = original
            switch e.function {
            case 1:
                e.ebx = (e.ebx & 0x0000_ffff) | (id << 24) | (min(n, 255) << 16)
                e.ecx |= 1 << 31                     // running under a hypervisor
                if n > 1 { e.edx |= 1 << 28 } else { e.edx &= ~(1 << 28) }  // HTT: more than one logical CPU
            case 4:
                // Cache topology: every cache shared by one core; cores per package in EAX[31:26].
                if e.eax & 0x1f != 0 { e.eax = (e.eax & 0x3ff) | ((n - 1) << 26) }
            case 0xb, 0x1f:
                // x2APIC topology: one thread per core, n cores per package.
                e.edx = id
                switch e.index {
                case 0: e.eax = 0; e.ebx = 1; e.ecx = (1 << 8)
                case 1: e.eax = shift; e.ebx = n; e.ecx = (2 << 8) | 1
                default: e.eax = 0; e.ebx = 0; e.ecx = e.index
                }
            case 6:
                e.eax &= ~UInt32(1 << 1)             // no turbo boost control for a guest
            default:
                break
            }
            return e
        }
    }

    /// The MSRs a booting x86 guest expects, as Firecracker and Cloud Hypervisor set them.
    public static let bootMSRs: [(index: UInt32, value: UInt64)] = [
        (0x174, 0), (0x175, 0), (0x176, 0),          // IA32_SYSENTER_CS/ESP/EIP
        (0xc000_0081, 0), (0xc000_0082, 0), (0xc000_0083, 0), (0xc000_0084, 0),  // STAR, LSTAR, CSTAR, SFMASK
        (0xc000_0102, 0),                            // KERNEL_GS_BASE
        (0x10, 0),                                   // IA32_TSC
        (0x1a0, 1),                                  // IA32_MISC_ENABLE: fast strings
        (0x2ff, (1 << 11) | 6),                      // MTRRdefType: enabled, write-back
    ]

    /// Registers for the PVH entry: 32-bit protected mode, paging off, flat segments, EBX = start info.
    public static func pvhEntryState(entry: UInt32, startInfo: UInt64, base sregs: kvm_sregs) -> (kvm_regs, kvm_sregs) {
        var regs = kvm_regs()
        regs.rip = UInt64(entry)
        regs.rbx = startInfo
        regs.rflags = 0x2
        var s = sregs
        func segment(selector: UInt16, type: UInt8) -> kvm_segment {
            var seg = kvm_segment()
            seg.base = 0; seg.limit = 0xffff_ffff; seg.selector = selector
            seg.type = type; seg.present = 1; seg.dpl = 0; seg.db = 1; seg.s = 1; seg.l = 0; seg.g = 1
            return seg
        }
        s.cs = segment(selector: 0x10, type: 0xb)
        let data = segment(selector: 0x18, type: 0x3)
        s.ds = data; s.es = data; s.fs = data; s.gs = data; s.ss = data
        var tr = kvm_segment()
        tr.base = 0; tr.limit = 0x67; tr.selector = 0x20; tr.type = 0xb; tr.present = 1; tr.s = 0
        s.tr = tr
        s.cr0 = 0x11                                  // PE | ET
        s.cr3 = 0; s.cr4 = 0; s.efer = 0
        return (regs, s)
    }
}

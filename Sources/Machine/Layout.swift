/// Where the VMM puts things in guest-physical memory (x86-64, PVH boot).
public enum Layout {
    public static let pageSize: UInt64 = 4096
    /// `struct hvm_start_info`, then the memory map right after it.
    public static let startInfo: UInt64 = 0x5000
    public static let memoryMap: UInt64 = 0x5400
    public static let memoryMapMaxEntries = 32
    /// The 64-bit Linux boot protocol's GDT, empty IDT, `boot_params` (the zero page), a stack, and
    /// page tables identity-mapping 4 GiB (a PML4, a PDPT and four page directories).
    public static let bootGDT: UInt64 = 0x500
    public static let bootIDT: UInt64 = 0x520
    public static let zeroPage: UInt64 = 0x7000
    public static let bootStack: UInt64 = 0x8ff0
    public static let pml4: UInt64 = 0x9000
    public static let pdpt: UInt64 = 0xa000
    public static let pageDirectories: UInt64 = 0xb000
    /// The PVH module list (the initrd), after the memory map.
    public static let moduleList: UInt64 = 0x5800
    /// Guest command line, NUL-terminated.
    public static let commandLine: UInt64 = 0x20000
    public static let commandLineMax: UInt64 = 0x10000
    /// The MP table lives in the EBDA, as on PCs (Firecracker puts it here too).
    public static let ebda: UInt64 = 0x9fc00
    public static let ebdaEnd: UInt64 = 0xa0000
    /// The legacy BIOS area: reserved in the e820 map.
    public static let biosStart: UInt64 = 0xe0000
    /// The ACPI tables (RSDP first), inside the reserved BIOS area where guests scan for the RSDP.
    public static let acpiTables: UInt64 = 0xe0000
    public static let acpiTablesEnd: UInt64 = 0x10_0000
    public static let highMemory: UInt64 = 0x10_0000
    /// Guest RAM below 4 GiB stops here; the rest of RAM goes above 4 GiB.
    public static let mmioGapStart: UInt64 = 0xc000_0000
    public static let fourGiB: UInt64 = 0x1_0000_0000
    /// virtio-mmio windows: one 4 KiB window per device from here, IRQs from `virtioFirstIRQ`.
    public static let virtioMMIOBase: UInt64 = 0xd000_0000
    public static let virtioMMIOSize: UInt64 = 0x1000
    public static let virtioFirstIRQ: UInt32 = 5
    public static let maxVirtioDevices = 16
    public static let ioapicAddress: UInt64 = 0xfec0_0000
    public static let lapicAddress: UInt64 = 0xfee0_0000
    /// KVM_SET_TSS_ADDR wants three pages outside RAM.
    public static let tssAddress: UInt64 = 0xfffb_d000

    /// VMM-owned areas a kernel image may not overlap.
    public static let reserved: [(name: String, start: UInt64, end: UInt64)] = [
        ("the PVH start info", startInfo, moduleList + 32),
        ("the command line", commandLine, commandLine + commandLineMax),
        ("the MP table", ebda, ebdaEnd),
        ("the boot GDT and IDT", bootGDT, bootIDT + 8),
        ("boot_params and the boot stack", zeroPage, pml4),
        ("the boot page tables", pml4, pageDirectories + 4 * pageSize),
        ("the ACPI tables", acpiTables, acpiTablesEnd),
    ]

    /// The RAM regions for `size` bytes: below the MMIO gap, the rest above 4 GiB.
    public static func ramRegions(size: UInt64) -> [(base: UInt64, size: UInt64)] {
        if size <= mmioGapStart { return [(0, size)] }
        return [(0, mmioGapStart), (fourGiB, size - mmioGapStart)]
    }

    /// One e820 entry: type 1 is RAM, 2 reserved.
    public struct MemoryMapEntry: Equatable, Sendable {
        public var address: UInt64
        public var size: UInt64
        public var type: UInt32
    }

    /// The guest's memory map (e820 style) for the given RAM regions.
    public static func memoryMap(for regions: [(base: UInt64, size: UInt64)]) -> [MemoryMapEntry] {
        var entries: [MemoryMapEntry] = []
        for region in regions {
            if region.base == 0 {
                entries.append(.init(address: 0, size: ebda, type: 1))
                entries.append(.init(address: ebda, size: ebdaEnd - ebda, type: 2))
                entries.append(.init(address: biosStart, size: highMemory - biosStart, type: 2))
                if region.size > highMemory {
                    entries.append(.init(address: highMemory, size: region.size - highMemory, type: 1))
                }
            } else {
                entries.append(.init(address: region.base, size: region.size, type: 1))
            }
        }
        return entries
    }
}

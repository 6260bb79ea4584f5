import GuestMemory

/// Writes the PVH boot data: `hvm_start_info`, its memory map, and the command line.
public enum PVHBoot {
    public static let startInfoMagic: UInt32 = 0x336e_c578

    /// Writes the command line, memory map and start info; returns the start info address (for EBX).
    public static func write(commandLine: String, memoryMap: [Layout.MemoryMapEntry], into memory: GuestMemory) throws -> UInt64 {
        var line = Array(commandLine.utf8)
        guard !line.contains(0) else { throw MachineError.commandLine("contains a NUL byte") }
        line.append(0)
        guard UInt64(line.count) <= Layout.commandLineMax else {
            throw MachineError.commandLine("\(line.count) bytes, at most \(Layout.commandLineMax) fit")
        }
        guard memoryMap.count <= Layout.memoryMapMaxEntries else {
            throw MachineError.layout("\(memoryMap.count) memory map entries, at most \(Layout.memoryMapMaxEntries)")
        }
        try memory.writeBytes(line, at: Layout.commandLine)
        for (i, e) in memoryMap.enumerated() {
            let at = Layout.memoryMap + UInt64(i) * 24
            try memory.store(e.address, at: at)
            try memory.store(e.size, at: at + 8)
            try memory.store(e.type, at: at + 16)
            try memory.store(UInt32(0), at: at + 20)
        }
        let s = Layout.startInfo
        try memory.writeBytes([UInt8](repeating: 0, count: 56), at: s)
        try memory.store(startInfoMagic, at: s)          // magic
        try memory.store(UInt32(1), at: s + 4)           // version 1: has the memory map
        try memory.store(UInt32(0), at: s + 8)           // flags
        try memory.store(UInt32(0), at: s + 12)          // nr_modules
        try memory.store(UInt64(0), at: s + 16)          // modlist_paddr
        try memory.store(Layout.commandLine, at: s + 24) // cmdline_paddr
        try memory.store(UInt64(0), at: s + 32)          // rsdp_paddr
        try memory.store(Layout.memoryMap, at: s + 40)   // memmap_paddr
        try memory.store(UInt32(memoryMap.count), at: s + 48)
        return s
    }
}

/// The Intel MultiProcessor Specification 1.4 table that tells a guest its CPUs, IOAPIC and IRQ wiring.
public enum MPTable {
    static let apicVersion: UInt8 = 0x14
    static let ioapicVersion: UInt8 = 0x11
    static let isaBusID: UInt8 = 0
    /// The IOAPIC's id: after the CPUs' APIC ids.
    static func ioapicID(cpus: Int) -> UInt8 { UInt8(cpus) }

    /// The table bytes (floating pointer first, configuration table after it) for a guest at `address`.
    public static func build(cpus: Int, at address: UInt64) throws -> [UInt8] {
        guard (1...254).contains(cpus) else { throw MachineError.cpus(requested: cpus, max: 254) }
        let tableAddress = address + 16
        var entries: [UInt8] = []
        var count: UInt16 = 0
        for cpu in 0..<cpus {  // processor entries, 20 bytes
            var e: [UInt8] = [0, UInt8(cpu), apicVersion, cpu == 0 ? 0x3 : 0x1]  // enabled, BSP flag on cpu 0
            e += le32(0x600) + le32(0x201) + [UInt8](repeating: 0, count: 8)      // signature, features (FPU, APIC)
            entries += e; count += 1
        }
        entries += [1, isaBusID] + Array("ISA   ".utf8); count += 1               // bus entry
        entries += [2, ioapicID(cpus: cpus), ioapicVersion, 1] + le32(UInt32(Layout.ioapicAddress)); count += 1
        for irq in 0..<16 {  // I/O interrupt entries: ISA IRQ n → IOAPIC pin n (conforming, edge/high)
            entries += [3, 0] + le16(0) + [isaBusID, UInt8(irq), ioapicID(cpus: cpus), UInt8(irq)]; count += 1
        }
        entries += [4, 3] + le16(0) + [isaBusID, 0, 0xff, 0]; count += 1           // LINT0: ExtINT
        entries += [4, 1] + le16(0) + [isaBusID, 0, 0xff, 1]; count += 1           // LINT1: NMI
        var header: [UInt8] = Array("PCMP".utf8) + le16(UInt16(44 + entries.count)) + [4, 0]
        header += Array("GODWIT  ".utf8) + Array("MICROVM     ".utf8)
        header += le32(0) + le16(0) + le16(count) + le32(UInt32(Layout.lapicAddress)) + le16(0) + [0, 0]
        var table = header + entries
        table[7] = checksum(table)
        var floating: [UInt8] = Array("_MP_".utf8) + le32(UInt32(tableAddress)) + [1, 4, 0, 0, 0, 0, 0, 0]
        floating[10] = checksum(floating)
        let all = floating + table
        guard address + UInt64(all.count) <= Layout.ebdaEnd else {
            throw MachineError.layout("MP table of \(all.count) bytes does not fit in the EBDA")
        }
        return all
    }

    /// The byte that makes the sum of `bytes` zero.
    static func checksum(_ bytes: [UInt8]) -> UInt8 {
        UInt8(truncatingIfNeeded: 0 &- bytes.reduce(UInt8(0), &+))
    }

    static func le16(_ v: UInt16) -> [UInt8] { [UInt8(v & 0xff), UInt8(v >> 8)] }
    static func le32(_ v: UInt32) -> [UInt8] { (0..<4).map { UInt8((v >> (8 * $0)) & 0xff) } }
}

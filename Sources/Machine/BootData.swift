import GuestMemory

/// Writes the PVH boot data: `hvm_start_info`, its memory map, and the command line.
public enum PVHBoot {
    public static let startInfoMagic: UInt32 = 0x336e_c578

    /// Writes the command line, memory map, the initrd's module entry and start info; returns the
    /// start info address (for EBX).
    public static func write(commandLine: String, memoryMap: [Layout.MemoryMapEntry], initrd: (address: UInt64, size: UInt64)? = nil,
                             rsdp: UInt64 = 0, into memory: GuestMemory) throws -> UInt64 {
        try writeCommandLine(commandLine, into: memory)
        guard memoryMap.count <= Layout.memoryMapMaxEntries else {
            throw MachineError.layout("\(memoryMap.count) memory map entries, at most \(Layout.memoryMapMaxEntries)")
        }
        for (i, e) in memoryMap.enumerated() {
            let at = Layout.memoryMap + UInt64(i) * 24
            try memory.store(e.address, at: at)
            try memory.store(e.size, at: at + 8)
            try memory.store(e.type, at: at + 16)
            try memory.store(UInt32(0), at: at + 20)
        }
        if let initrd {  // struct hvm_modlist_entry: paddr, size, cmdline_paddr, reserved
            try memory.writeBytes([UInt8](repeating: 0, count: 32), at: Layout.moduleList)
            try memory.store(initrd.address, at: Layout.moduleList)
            try memory.store(initrd.size, at: Layout.moduleList + 8)
        }
        let s = Layout.startInfo
        try memory.writeBytes([UInt8](repeating: 0, count: 56), at: s)
        try memory.store(startInfoMagic, at: s)          // magic
        try memory.store(UInt32(1), at: s + 4)           // version 1: has the memory map
        try memory.store(UInt32(0), at: s + 8)           // flags
        try memory.store(UInt32(initrd == nil ? 0 : 1), at: s + 12)          // nr_modules
        try memory.store(initrd == nil ? UInt64(0) : Layout.moduleList, at: s + 16)  // modlist_paddr
        try memory.store(Layout.commandLine, at: s + 24) // cmdline_paddr
        try memory.store(rsdp, at: s + 32)               // rsdp_paddr
        try memory.store(Layout.memoryMap, at: s + 40)   // memmap_paddr
        try memory.store(UInt32(memoryMap.count), at: s + 48)
        return s
    }
}

/// Writes the NUL-terminated command line at `Layout.commandLine`; returns its length without the NUL.
@discardableResult
public func writeCommandLine(_ commandLine: String, into memory: GuestMemory) throws -> Int {
    var line = Array(commandLine.utf8)
    guard !line.contains(0) else { throw MachineError.commandLine("contains a NUL byte") }
    line.append(0)
    guard UInt64(line.count) <= Layout.commandLineMax else {
        throw MachineError.commandLine("\(line.count) bytes, at most \(Layout.commandLineMax) fit")
    }
    try memory.writeBytes(line, at: Layout.commandLine)
    return line.count - 1
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
            e += leBytes32(0x600) + leBytes32(0x201) + [UInt8](repeating: 0, count: 8)      // signature, features (FPU, APIC)
            entries += e; count += 1
        }
        entries += [1, isaBusID] + Array("ISA   ".utf8); count += 1               // bus entry
        entries += [2, ioapicID(cpus: cpus), ioapicVersion, 1] + leBytes32(UInt32(Layout.ioapicAddress)); count += 1
        for irq in 0..<16 {  // I/O interrupt entries: ISA IRQ n → IOAPIC pin n (conforming, edge/high)
            entries += [3, 0] + leBytes16(0) + [isaBusID, UInt8(irq), ioapicID(cpus: cpus), UInt8(irq)]; count += 1
        }
        entries += [4, 3] + leBytes16(0) + [isaBusID, 0, 0xff, 0]; count += 1           // LINT0: ExtINT
        entries += [4, 1] + leBytes16(0) + [isaBusID, 0, 0xff, 1]; count += 1           // LINT1: NMI
        var header: [UInt8] = Array("PCMP".utf8) + leBytes16(UInt16(44 + entries.count)) + [4, 0]
        header += Array("GODWIT  ".utf8) + Array("MICROVM     ".utf8)
        header += leBytes32(0) + leBytes16(0) + leBytes16(count) + leBytes32(UInt32(Layout.lapicAddress)) + leBytes16(0) + [0, 0]
        var table = header + entries
        table[7] = checksum(table)
        var floating: [UInt8] = Array("_MP_".utf8) + leBytes32(UInt32(tableAddress)) + [1, 4, 0, 0, 0, 0, 0, 0]
        floating[10] = checksum(floating)
        let all = floating + table
        guard address + UInt64(all.count) <= Layout.ebdaEnd else {
            throw MachineError.layout("MP table of \(all.count) bytes does not fit in the EBDA")
        }
        return all
    }

}

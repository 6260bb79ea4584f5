import CGodwit
import GodwitTestSupport
import GuestMemory
import KVM
@testable import Machine
import Testing

/// ACPI tables parsed back, the bzImage setup header checks, and `boot_params`/e820 as a Linux
/// kernel reads them, over plain memory.
@Suite("Linux boot: ACPI tables, bzImage header, boot_params")
struct LinuxBootTests {
    // MARK: ACPI

    /// A minimal reader of the blob: the table at guest address `address`, checked.
    struct Tables {
        let blob: [UInt8]
        let base: UInt64

        func u16(_ at: Int) -> Int { Int(blob[at]) | Int(blob[at + 1]) << 8 }
        func u32(_ at: Int) -> UInt64 { (0..<4).reduce(UInt64(0)) { $0 | UInt64(blob[at + $1]) << (8 * UInt64($1)) } }
        func u64(_ at: Int) -> UInt64 { (0..<8).reduce(UInt64(0)) { $0 | UInt64(blob[at + $1]) << (8 * UInt64($1)) } }
        func signature(_ at: Int) -> String { String(decoding: blob[at..<at + 4], as: UTF8.self) }

        /// The table at `address`: its offset in the blob and length, after checking the checksum.
        func table(at address: UInt64) throws -> (offset: Int, length: Int) {
            let offset = Int(address - base)
            try #require(offset >= 0 && offset + 36 <= blob.count)
            let length = Int(u32(offset + 4))
            try #require(offset + length <= blob.count, "table \(signature(offset)) runs past the blob")
            #expect(blob[offset..<offset + length].reduce(UInt8(0), &+) == 0, "checksum of \(signature(offset))")
            return (offset, length)
        }
    }

    func build(cpus: Int, devices: Int) throws -> Tables {
        let virtio = (0..<devices).map {
            ACPITables.VirtioDevice(base: Layout.virtioMMIOBase + UInt64($0) * Layout.virtioMMIOSize, size: Layout.virtioMMIOSize,
                                    irq: Layout.virtioFirstIRQ + UInt32($0))
        }
        let blob = try ACPITables(cpus: cpus, virtio: virtio).build(at: Layout.acpiTables)
        return Tables(blob: blob, base: Layout.acpiTables)
    }

    @Test(arguments: [(1, 0), (2, 3), (32, 16)])
    func tablesParseBackWithTheirChecksums(cpus: Int, devices: Int) throws {
        let t = try build(cpus: cpus, devices: devices)
        let b = t.blob
        #expect(Array(b[0..<8]) == Array("RSD PTR ".utf8))
        #expect(b[0..<20].reduce(UInt8(0), &+) == 0, "RSDP checksum (ACPI 1.0 part)")
        #expect(b[0..<36].reduce(UInt8(0), &+) == 0, "RSDP extended checksum")
        #expect(b[15] == 2, "RSDP revision 2 (XSDT)")
        let xsdt = try t.table(at: t.u64(24))
        #expect(t.signature(xsdt.offset) == "XSDT")
        var found: [String: (offset: Int, length: Int)] = [:]
        for i in stride(from: 36, to: xsdt.length, by: 8) {
            let table = try t.table(at: t.u64(xsdt.offset + i))
            found[t.signature(table.offset)] = table
        }
        let fadt = try #require(found["FACP"])
        let madt = try #require(found["APIC"])
        // FADT: hardware-reduced, reset register supported, sleep registers and X_DSDT.
        #expect(fadt.length == 276)
        let flags = t.u32(fadt.offset + 112)
        #expect(flags & (1 << 20) != 0, "HW_REDUCED_ACPI")
        #expect(flags & (1 << 10) != 0, "RESET_REG_SUP")
        #expect(b[fadt.offset + 116] == 1 && t.u64(fadt.offset + 120) == UInt64(ACPITables.resetPort), "RESET_REG in I/O space")
        #expect(b[fadt.offset + 128] == ACPITables.resetValue)
        #expect(b[fadt.offset + 244] == 1 && t.u64(fadt.offset + 248) == UInt64(ACPITables.sleepControlPort))
        #expect(b[fadt.offset + 256] == 1 && t.u64(fadt.offset + 260) == UInt64(ACPITables.sleepStatusPort))
        #expect(t.u16(fadt.offset + 109) & 0x2 != 0, "an 8042 is present")
        let dsdt = try t.table(at: t.u64(fadt.offset + 140))
        #expect(t.signature(dsdt.offset) == "DSDT")
        #expect(t.u32(fadt.offset + 40) == t.u64(fadt.offset + 140), "DSDT and X_DSDT agree")
        // MADT: one enabled local APIC per vCPU with ids 0..n-1, one IOAPIC at its address.
        #expect(t.u32(madt.offset + 36) == Layout.lapicAddress)
        var at = madt.offset + 44
        var apicIDs: [UInt8] = []
        var ioapics: [UInt64] = []
        while at < madt.offset + madt.length {
            let type = b[at], length = Int(b[at + 1])
            try #require(length >= 2 && at + length <= madt.offset + madt.length, "MADT entry at \(at)")
            if type == 0 {
                #expect(t.u32(at + 4) & 1 == 1, "enabled")
                apicIDs.append(b[at + 3])
            }
            if type == 1 { ioapics.append(t.u32(at + 4)) }
            at += length
        }
        #expect(at == madt.offset + madt.length)
        #expect(apicIDs == (0..<cpus).map { UInt8($0) })
        #expect(ioapics == [Layout.ioapicAddress])
        // DSDT: \_S5_ first, then one scope whose package length covers the rest of the table exactly.
        let aml = Array(b[dsdt.offset + 36..<dsdt.offset + dsdt.length])
        #expect(Array(aml[0..<5]) == [0x08] + Array("_S5_".utf8))
        let scope = try #require(aml.firstIndex(of: 0x10))
        let (length, size) = decodePackageLength(Array(aml[(scope + 1)...]))
        #expect(scope + 1 + length == aml.count, "the \\_SB_ scope's PkgLength (\(size) bytes) spans the rest")
        let text = String(decoding: aml.map { $0 == 0 ? 0x20 : $0 }, as: UTF8.self)
        #expect(text.components(separatedBy: "LNRO0005").count - 1 == devices)
        #expect(text.contains("COM1") && text.contains("PS2K"))
        for i in 0..<devices {
            // Each device's Memory32Fixed descriptor carries its window.
            let window = [0x86, 9, 0, 1] + le32(UInt32(Layout.virtioMMIOBase + UInt64(i) * Layout.virtioMMIOSize)) + le32(0x1000)
            #expect(contains(aml, window), "device \(i)'s window")
        }
    }

    func contains(_ haystack: [UInt8], _ needle: [UInt8]) -> Bool {
        guard haystack.count >= needle.count else { return false }
        return (0...(haystack.count - needle.count)).contains { haystack[$0..<$0 + needle.count].elementsEqual(needle) }
    }

    /// PkgLength as ACPI defines it: (value including its own bytes, how many bytes it took).
    func decodePackageLength(_ bytes: [UInt8]) -> (Int, Int) {
        let extra = Int(bytes[0] >> 6)
        if extra == 0 { return (Int(bytes[0] & 0x3f), 1) }
        var value = Int(bytes[0] & 0xf)
        for i in 0..<extra { value |= Int(bytes[1 + i]) << (4 + 8 * i) }
        return (value, 1 + extra)
    }

    @Test(arguments: [0, 1, 61, 62, 63, 64, 200, 4000, 4093, 4094, 5000, 1 << 20])
    func packageLengthsRoundTrip(content: Int) {
        let encoded = AML.packageLength(content)
        let (value, size) = decodePackageLength(encoded)
        #expect(size == encoded.count)
        #expect(value == content + size, "PkgLength counts itself")
    }

    @Test func eisaIDsEncodeAsTheSpecsMacro() {
        // EISAID("PNP0501") is 0x0105D041 as a little-endian DWord.
        #expect(AML.eisaID("PNP0501") == [0x0c, 0x41, 0xd0, 0x05, 0x01])
        #expect(AML.eisaID("PNP0303") == [0x0c, 0x41, 0xd0, 0x03, 0x03])
    }

    @Test func sleepControlValues() {
        #expect(ACPITables.isSoftOff(0x20 | 5 << 2), "SLP_EN with SLP_TYP 5: soft off")
        #expect(!ACPITables.isSoftOff(5 << 2), "no SLP_EN")
        #expect(!ACPITables.isSoftOff(0x20 | 3 << 2), "S3 is not soft off")
        #expect(!ACPITables.isSoftOff(0x80), "the wake status bit the guest clears first")
    }

    @Test func tooManyCPUsIsAClearError() {
        #expect(throws: MachineError.self) { _ = try ACPITables(cpus: 255, virtio: []).build(at: Layout.acpiTables) }
    }

    // MARK: bzImage

    /// A synthetic bzImage: 3 setup sectors and a 4 KiB "kernel", header as Linux 6.1 writes it.
    func bzImage(version: UInt16 = 0x020f, kernel: Int = 4096) -> [UInt8] {
        var b = [UInt8](repeating: 0, count: 4 * 512 + kernel)
        func put(_ bytes: [UInt8], _ at: Int) { b.replaceSubrange(at..<at + bytes.count, with: bytes) }
        b[0x1f1] = 3
        put(le32(UInt32(kernel / 16)), 0x1f4)      // syssize
        put([0x55, 0xaa], 0x1fe)
        b[0x201] = 0x66                             // header ends at 0x268
        put(Array("HdrS".utf8), 0x202)
        put(le16(version), 0x206)
        b[0x211] = 0x01                             // LOADED_HIGH
        put(le32(0x7fff_ffff), 0x22c)               // initrd_addr_max
        put(le32(0x20_0000), 0x230)                 // kernel_alignment
        b[0x234] = 1                                // relocatable
        put(le16(0x3), 0x236)                       // XLF_KERNEL_64 | XLF_CAN_BE_LOADED_ABOVE_4G
        put(le32(2047), 0x238)                      // cmdline_size
        put(le64(0x100_0000), 0x258)                // pref_address
        put(le32(0x10_0000), 0x260)                 // init_size
        for i in 0..<kernel { b[4 * 512 + i] = UInt8(truncatingIfNeeded: i &* 7) }
        return b
    }

    @Test func aWellFormedHeaderParses() throws {
        let image = try BzImage.parse(bzImage())
        #expect(image.protocolVersion == 0x020f)
        #expect(image.kernelOffset == 2048 && image.kernelSize == 4096)
        #expect(image.commandLineMax == 2047)
        #expect(image.loadAddress == Layout.highMemory && image.entry64 == Layout.highMemory + 0x200)
        #expect(image.setupHeader.count == 0x268 - 0x1f1)
    }

    @Test func truncatedAndLyingHeadersAreClearErrors() {
        let good = bzImage()
        #expect(throws: BootError.notBzImage) { _ = try BzImage.parse(Array(good[0..<0x300].map { _ in 0 })) }
        #expect(throws: BootError.self) { _ = try BzImage.parse(Array(good[0..<0x300])) }  // setup code cut
        var lying = good
        lying.replaceSubrange(0x1f4..<0x1f8, with: le32(0x10_0000))  // syssize: 16 MiB in a 4 KiB kernel
        #expect(throws: BootError.self) { _ = try BzImage.parse(lying) }
        var old = bzImage(version: 0x0209)
        #expect(throws: BootError.self) { _ = try BzImage.parse(old) }
        old = good
        old[0x236] = 0                                              // no 64-bit entry
        #expect(throws: BootError.self) { _ = try BzImage.parse(old) }
        old = good
        old[0x201] = 0xff                                           // header past boot_params' room
        #expect(throws: BootError.self) { _ = try BzImage.parse(old) }
        old = good
        old[0x211] = 0                                              // not LOADED_HIGH
        #expect(throws: BootError.self) { _ = try BzImage.parse(old) }
        old = good
        old.replaceSubrange(0x260..<0x264, with: le32(16))          // init_size below the kernel's size
        #expect(throws: BootError.self) { _ = try BzImage.parse(old) }
        // Every prefix of a valid image is refused or parsed, never a trap.
        for length in stride(from: 0, through: good.count, by: 7) { _ = try? BzImage.parse(Array(good[0..<length])) }
    }

    @Test func bootParamsCarryTheHeaderCommandLineInitrdAndE820() throws {
        let memory = try GuestMemory.anonymous(layout: [(0, 64 << 20)])
        let image = try BzImage.parse(bzImage())
        let bytes = bzImage()
        try LinuxBoot.load(image, from: bytes, into: memory)
        #expect(try memory.readBytes(at: image.loadAddress, count: 4096) == Array(bytes[2048...]))
        let map = Layout.memoryMap(for: Layout.ramRegions(size: 64 << 20))
        let length = try writeCommandLine("console=ttyS0 root=/dev/vda", into: memory)
        let initrd = (address: UInt64(0x3f0_0000), size: UInt64(0x8_0000))
        let z = try LinuxBoot.writeBootParams(image, commandLineLength: length, initrd: initrd, memoryMap: map, rsdp: Layout.acpiTables, into: memory)
        #expect(z == Layout.zeroPage)
        #expect(try memory.readBytes(at: z + 0x202, count: 4) == Array("HdrS".utf8), "setup header copied")
        #expect(try memory.load(UInt8.self, at: z + 0x210) == 0xff, "type_of_loader")
        #expect(try memory.load(UInt32.self, at: z + 0x228) == UInt32(Layout.commandLine))
        #expect(try memory.readBytes(at: Layout.commandLine, count: length + 1) == Array("console=ttyS0 root=/dev/vda\0".utf8))
        #expect(try memory.load(UInt32.self, at: z + 0x218) == 0x3f0_0000 && memory.load(UInt32.self, at: z + 0x21c) == 0x8_0000)
        #expect(try memory.load(UInt64.self, at: z + 0x070) == Layout.acpiTables, "acpi_rsdp_addr")
        #expect(try memory.load(UInt8.self, at: z + 0x1e8) == UInt8(map.count))
        for (i, entry) in map.enumerated() {
            let at = z + 0x2d0 + UInt64(i) * 20
            #expect(try memory.load(UInt64.self, at: at) == entry.address)
            #expect(try memory.load(UInt64.self, at: at + 8) == entry.size)
            #expect(try memory.load(UInt32.self, at: at + 16) == entry.type)
        }
        // The ACPI area and the boot structures are not usable RAM in the map.
        #expect(map.contains { $0.type == 2 && $0.address <= Layout.acpiTables && $0.address + $0.size >= Layout.acpiTablesEnd })
        #expect(throws: MachineError.self) {
            _ = try LinuxBoot.writeBootParams(image, commandLineLength: 4096, initrd: nil, memoryMap: map, rsdp: 0, into: memory)
        }
    }

    @Test func pageTablesIdentityMapFourGiB() throws {
        let memory = try GuestMemory.anonymous(layout: [(0, 4 << 20)])
        try LinuxBoot.writeLongModeTables(into: memory)
        func translate(_ virtual: UInt64) throws -> UInt64 {
            let pml4e = try memory.load(UInt64.self, at: Layout.pml4 + ((virtual >> 39) & 0x1ff) * 8)
            try #require(pml4e & 1 == 1)
            let pdpte = try memory.load(UInt64.self, at: (pml4e & ~0xfff) + ((virtual >> 30) & 0x1ff) * 8)
            try #require(pdpte & 1 == 1)
            let pde = try memory.load(UInt64.self, at: (pdpte & ~0xfff) + ((virtual >> 21) & 0x1ff) * 8)
            try #require(pde & 0x81 == 0x81, "present 2 MiB page")
            return (pde & ~0x1f_ffff & 0xf_ffff_ffff_f000) | (virtual & 0x1f_ffff)
        }
        for address: UInt64 in [0, 0x7000, 0x10_0200, 0x3f0_0000, 0xbfff_f000, 0xffff_ffff] {
            #expect(try translate(address) == address)
        }
        let (regs, sregs) = LinuxBoot.entryState(entry: 0x10_0200, bootParams: Layout.zeroPage, base: kvm_sregs())
        #expect(regs.rip == 0x10_0200 && regs.rsi == Layout.zeroPage)
        #expect(sregs.cs.l == 1 && sregs.cs.selector == 0x10 && sregs.ds.selector == 0x18)
        #expect(sregs.efer & 0x500 == 0x500 && sregs.cr0 & 0x8000_0001 == 0x8000_0001 && sregs.cr3 == Layout.pml4)
    }

    @Test func theInitrdGoesToTheTopOfRAMBelowItsLimit() throws {
        #expect(try LinuxBoot.initrdAddress(size: 0x1800, ramBelow4G: 64 << 20, limit: 0x7fff_ffff, floor: 0x100_0000) == (64 << 20) - 0x2000)
        #expect(try LinuxBoot.initrdAddress(size: 0x1000, ramBelow4G: 0xc000_0000, limit: 0x3fff_ffff, floor: 0) == 0x4000_0000 - 0x1000)
        #expect(throws: BootError.self) { _ = try LinuxBoot.initrdAddress(size: 60 << 20, ramBelow4G: 64 << 20, limit: 0x7fff_ffff, floor: 0x100_0000) }
        #expect(throws: BootError.self) { _ = try LinuxBoot.initrdAddress(size: 0, ramBelow4G: 64 << 20, limit: 0x7fff_ffff, floor: 0) }
    }
}

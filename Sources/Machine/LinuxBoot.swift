import CGodwit
import GuestMemory

/// A bzImage's setup header, checked against the Linux x86 boot protocol (Documentation/arch/x86/
/// boot.rst) before anything is loaded: a truncated file or a lying header is a `BootError`.
public struct BzImage: Equatable, Sendable {
    public var protocolVersion: UInt16
    /// Where the protected-mode kernel starts in the file, and its length.
    public var kernelOffset: Int
    public var kernelSize: Int
    public var loadFlags: UInt8
    public var initrdAddressMax: UInt32
    /// The longest command line the kernel takes, without the NUL.
    public var commandLineMax: Int
    public var relocatable: Bool
    public var preferredAddress: UInt64
    /// Memory the kernel needs from its load address while it decompresses and starts.
    public var initSize: UInt64
    /// The setup header as the file has it (offset 0x1f1 up to its end), copied into `boot_params`.
    public var setupHeader: [UInt8]

    static let headerStart = 0x1f1
    /// `boot_params` ends its setup header before the EDD signature buffer at 0x290.
    static let headerLimit = 0x290
    static let minimumVersion: UInt16 = 0x020c  // XLF_KERNEL_64 (the 64-bit entry) came with 2.12

    /// Whether `bytes` look like a bzImage: the boot sector signature and "HdrS".
    public static func matches(_ bytes: [UInt8]) -> Bool {
        bytes.count >= 0x208 && bytes[0x1fe] == 0x55 && bytes[0x1ff] == 0xaa && bytes[0x202..<0x206].elementsEqual(Array("HdrS".utf8))
    }

    public static func parse(_ bytes: [UInt8]) throws(BootError) -> BzImage {
        guard matches(bytes) else { throw .notBzImage }
        let r = ByteReader(bytes)
        let version = r.u16(0x206)!
        guard version >= minimumVersion else {
            throw .unsupported("boot protocol \(version >> 8).\(version & 0xff): the 64-bit entry needs 2.12 or later")
        }
        let headerEnd = 0x202 + Int(bytes[0x201])
        guard headerEnd <= headerLimit else { throw .invalid("setup header says it ends at 0x\(String(headerEnd, radix: 16)), past 0x\(String(headerLimit, radix: 16))") }
        guard headerEnd >= 0x268, bytes.count >= headerEnd else {
            throw .truncated(what: "setup header", need: max(headerEnd, 0x268), have: bytes.count)
        }
        var setupSectors = Int(bytes[0x1f1])
        if setupSectors == 0 { setupSectors = 4 }
        let kernelOffset = (setupSectors + 1) * 512
        guard kernelOffset < bytes.count else {
            throw .truncated(what: "setup code (\(setupSectors) sectors)", need: kernelOffset + 1, have: bytes.count)
        }
        let kernelSize = bytes.count - kernelOffset
        let paragraphs = UInt64(r.u32(0x1f4)!)
        guard paragraphs * 16 <= UInt64(kernelSize) else {
            throw .invalid("syssize says the kernel has \(paragraphs * 16) bytes, the file holds \(kernelSize) after the setup code")
        }
        let loadFlags = bytes[0x211]
        guard loadFlags & 0x1 != 0 else { throw .unsupported("kernel not built to load high (LOADED_HIGH clear)") }
        let xloadFlags = r.u16(0x236)!
        guard xloadFlags & 0x1 != 0 else { throw .unsupported("no 64-bit entry point (XLF_KERNEL_64 clear)") }
        let alignment = r.u32(0x230)!
        guard alignment == 0 || alignment & (alignment - 1) == 0 else { throw .invalid("kernel_alignment 0x\(String(alignment, radix: 16)) is not a power of two") }
        let commandLineMax = Int(r.u32(0x238)!)
        let initSize = UInt64(r.u32(0x260)!)
        guard initSize >= UInt64(kernelSize) || initSize == 0 else {
            throw .invalid("init_size \(initSize) is smaller than the kernel (\(kernelSize) bytes)")
        }
        return BzImage(protocolVersion: version, kernelOffset: kernelOffset, kernelSize: kernelSize, loadFlags: loadFlags,
                       initrdAddressMax: r.u32(0x22c)!, commandLineMax: commandLineMax, relocatable: bytes[0x234] != 0,
                       preferredAddress: r.u64(0x258)!, initSize: max(initSize, UInt64(kernelSize)),
                       setupHeader: Array(bytes[headerStart..<headerEnd]))
    }

    /// Where the protected-mode kernel goes: 1 MiB for a relocatable kernel (its decompressor moves
    /// itself), otherwise the address it was linked for.
    public var loadAddress: UInt64 { relocatable ? Layout.highMemory : max(preferredAddress, Layout.highMemory) }
    /// The 64-bit entry point: 0x200 past the load address.
    public var entry64: UInt64 { loadAddress + 0x200 }
}

/// Why a Linux kernel or initrd cannot be booted.
public enum BootError: Error, CustomStringConvertible, Equatable, Sendable {
    case notBzImage
    case truncated(what: String, need: Int, have: Int)
    case unsupported(String)
    case invalid(String)
    case doesNotFit(String)

    public var description: String {
        switch self {
        case .notBzImage: return "not a bzImage (no boot sector signature or HdrS setup header)"
        case let .truncated(what, need, have): return "truncated bzImage: \(what) needs \(need) bytes, the file has \(have)"
        case let .unsupported(what): return "unsupported bzImage: \(what)"
        case let .invalid(what): return "invalid bzImage: \(what)"
        case let .doesNotFit(what): return "does not fit in guest RAM: \(what)"
        }
    }
}

/// Puts a Linux guest in memory: the kernel (bzImage or PVH vmlinux), the initrd, the 64-bit boot
/// protocol's `boot_params`, and the GDT and identity page tables its 64-bit entry expects.
public enum LinuxBoot {
    /// Where the initrd goes: page-aligned at the top of RAM below 4 GiB and below `limit`, above `floor`.
    public static func initrdAddress(size: UInt64, ramBelow4G: UInt64, limit: UInt64, floor: UInt64) throws(BootError) -> UInt64 {
        let top = min(ramBelow4G, limit &+ 1)
        guard size > 0, size <= top else { throw .doesNotFit("an initrd of \(size) bytes below 0x\(String(top, radix: 16))") }
        let address = (top - size) & ~(Layout.pageSize - 1)
        guard address >= floor else {
            throw .doesNotFit("an initrd of \(size >> 20) MiB between the kernel's end (0x\(String(floor, radix: 16))) and 0x\(String(top, radix: 16)): give the guest more memory")
        }
        return address
    }

    /// Loads the protected-mode part of `image` (from `bytes`) at its load address.
    public static func load(_ image: BzImage, from bytes: [UInt8], into memory: GuestMemory) throws {
        let address = image.loadAddress
        guard memory.contains(address, length: image.initSize) else {
            throw BootError.doesNotFit("the kernel needs \(image.initSize >> 20) MiB from 0x\(String(address, radix: 16))")
        }
        let destination = try memory.buffer(at: address, length: image.kernelSize)
        // In bounds: parse() set kernelOffset + kernelSize == bytes.count, and the destination is kernelSize long.
        bytes.withUnsafeBytes { source in
            destination.copyMemory(from: UnsafeRawBufferPointer(rebasing: source[image.kernelOffset...]))
        }
    }

    /// Writes `boot_params` (the zero page) for `image` at `Layout.zeroPage`: the setup header, the
    /// command line pointer, the initrd, the e820 map and the RSDP; returns its address (for RSI).
    public static func writeBootParams(_ image: BzImage, commandLineLength: Int, initrd: (address: UInt64, size: UInt64)?,
                                       memoryMap: [Layout.MemoryMapEntry], rsdp: UInt64, into memory: GuestMemory) throws -> UInt64 {
        guard commandLineLength <= image.commandLineMax else {
            throw MachineError.commandLine("\(commandLineLength) bytes; this kernel takes at most \(image.commandLineMax)")
        }
        guard memoryMap.count <= 128 else { throw MachineError.layout("\(memoryMap.count) e820 entries, at most 128") }
        let z = Layout.zeroPage
        try memory.writeBytes([UInt8](repeating: 0, count: 4096), at: z)
        try memory.writeBytes(image.setupHeader, at: z + UInt64(BzImage.headerStart))
        try memory.store(rsdp, at: z + 0x070)                        // acpi_rsdp_addr
        try memory.store(UInt8(memoryMap.count), at: z + 0x1e8)      // e820_entries
        try memory.store(UInt16(0xffff), at: z + 0x1fa)              // vid_mode: normal
        try memory.store(UInt8(0xff), at: z + 0x210)                 // type_of_loader: undefined
        try memory.store(image.loadFlags & 0x1, at: z + 0x211)       // LOADED_HIGH only
        try memory.store(UInt32(truncatingIfNeeded: Layout.commandLine), at: z + 0x228)
        try memory.store(UInt32(truncatingIfNeeded: Layout.commandLine >> 32), at: z + 0x0c8)
        if let initrd {
            try memory.store(UInt32(truncatingIfNeeded: initrd.address), at: z + 0x218)
            try memory.store(UInt32(truncatingIfNeeded: initrd.size), at: z + 0x21c)
            try memory.store(UInt32(truncatingIfNeeded: initrd.address >> 32), at: z + 0x0c0)
            try memory.store(UInt32(truncatingIfNeeded: initrd.size >> 32), at: z + 0x0c4)
        }
        for (i, e) in memoryMap.enumerated() {
            let at = z + 0x2d0 + UInt64(i) * 20
            try memory.store(e.address, at: at)
            try memory.store(e.size, at: at + 8)
            try memory.store(e.type, at: at + 16)
        }
        return z
    }

    /// The GDT the 64-bit entry wants (__BOOT_CS 0x10, __BOOT_DS 0x18, a TSS at 0x20) and page
    /// tables identity-mapping the first 4 GiB with 2 MiB pages.
    public static func writeLongModeTables(into memory: GuestMemory) throws {
        let gdt: [UInt64] = [0, 0, 0x00af_9b00_0000_ffff, 0x00cf_9300_0000_ffff, 0x008f_8b00_0000_ffff]
        for (i, entry) in gdt.enumerated() { try memory.store(entry, at: Layout.bootGDT + UInt64(i) * 8) }
        try memory.store(UInt64(0), at: Layout.bootIDT)
        try memory.writeBytes([UInt8](repeating: 0, count: 4096), at: Layout.pml4)
        try memory.store(Layout.pdpt | 0x3, at: Layout.pml4)
        try memory.writeBytes([UInt8](repeating: 0, count: 4096), at: Layout.pdpt)
        for gib in 0..<UInt64(4) {
            let directory = Layout.pageDirectories + gib * 4096
            try memory.store(directory | 0x3, at: Layout.pdpt + gib * 8)
            for i in 0..<UInt64(512) {
                try memory.store((gib << 30) | (i << 21) | 0x83, at: directory + i * 8)  // present, writable, 2 MiB
            }
        }
    }

    /// Registers for the 64-bit entry: long mode with paging on the tables above, flat segments,
    /// RSI = `boot_params`, interrupts off.
    public static func entryState(entry: UInt64, bootParams: UInt64, base sregs: kvm_sregs) -> (kvm_regs, kvm_sregs) {
        var regs = kvm_regs()
        regs.rip = entry
        regs.rsi = bootParams
        regs.rflags = 0x2
        regs.rsp = Layout.bootStack
        var s = sregs
        func segment(selector: UInt16, type: UInt8, long: Bool) -> kvm_segment {
            var seg = kvm_segment()
            seg.base = 0; seg.limit = 0xffff_ffff; seg.selector = selector
            seg.type = type; seg.present = 1; seg.dpl = 0; seg.s = 1; seg.g = 1
            seg.l = long ? 1 : 0; seg.db = long ? 0 : 1
            return seg
        }
        s.cs = segment(selector: 0x10, type: 0xb, long: true)
        let data = segment(selector: 0x18, type: 0x3, long: false)
        s.ds = data; s.es = data; s.fs = data; s.gs = data; s.ss = data
        var tr = kvm_segment()
        tr.base = 0; tr.limit = 0xffff_ffff; tr.selector = 0x20; tr.type = 0xb; tr.present = 1; tr.g = 1
        s.tr = tr
        s.gdt.base = Layout.bootGDT; s.gdt.limit = 5 * 8 - 1
        s.idt.base = Layout.bootIDT; s.idt.limit = 0
        s.cr3 = Layout.pml4
        s.cr4 = 0x20                                  // PAE
        s.cr0 = 0x8000_0011                           // PG | ET | PE
        s.efer = 0x500                                // LME | LMA
        return (regs, s)
    }
}

/// The kernel file a VM boots, by format.
enum KernelImage {
    /// An ELF with the PVH entry note (the test guest, a Linux `vmlinux`); `linux` when it carries
    /// Linux's own ELF notes.
    case pvh(ElfImage, entry: UInt32, linux: Bool)
    /// A bzImage, entered through the 64-bit boot protocol.
    case bzImage(BzImage)

    static func parse(_ bytes: [UInt8]) throws -> KernelImage {
        if BzImage.matches(bytes) { return .bzImage(try BzImage.parse(bytes)) }
        return try pvh(try ElfImage.parse(bytes))
    }

    /// A parsed ELF as a PVH kernel: it must have the PVH entry note.
    static func pvh(_ image: ElfImage) throws -> KernelImage {
        guard let entry = image.pvhEntry else { throw ElfError.noPVHNote }
        return .pvh(image, entry: entry, linux: image.isLinux)
    }

    var isLinux: Bool {
        switch self {
        case let .pvh(_, _, linux): return linux
        case .bzImage: return true
        }
    }
}

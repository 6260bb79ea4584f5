/// The ACPI tables a Linux guest reads to find its CPUs, interrupt controllers, devices and power
/// controls without PCI: RSDP, XSDT, a hardware-reduced FADT, MADT and a DSDT (ACPI 6.5).
///
/// The whole set is one blob placed at `Layout.acpiTables` (reserved in the e820 map, inside the legacy
/// BIOS area where a guest without a boot-protocol pointer scans for the RSDP), RSDP first.
public struct ACPITables: Equatable, Sendable {
    /// One virtio-mmio device as the DSDT declares it (`LNRO0005`).
    public struct VirtioDevice: Equatable, Sendable {
        public var base: UInt64
        public var size: UInt64
        public var irq: UInt32
        public init(base: UInt64, size: UInt64, irq: UInt32) {
            self.base = base
            self.size = size
            self.irq = irq
        }
    }

    public var cpus: Int
    public var virtio: [VirtioDevice]

    /// The I/O ports of the hardware-reduced sleep and reset registers the FADT points at.
    public static let sleepControlPort: UInt16 = 0x600
    public static let sleepStatusPort: UInt16 = 0x601
    public static let resetPort: UInt16 = 0x602
    /// What the guest writes to the reset register to reboot.
    public static let resetValue: UInt8 = 0x1
    /// The `SLP_TYP` value of `\_S5_` (soft off); a write of `SLP_EN | SLP_TYP << 2` powers off.
    public static let softOffType: UInt8 = 5
    static let sleepEnable: UInt8 = 0x20

    static let oemID = Array("GODWIT".utf8)
    static let oemTableID = Array("GWMICROV".utf8)
    static let creatorID = Array("GDWT".utf8)

    public init(cpus: Int, virtio: [VirtioDevice]) {
        self.cpus = cpus
        self.virtio = virtio
    }

    /// Whether a byte written to the sleep control register asks for soft off (S5).
    public static func isSoftOff(_ value: UInt8) -> Bool {
        value & sleepEnable != 0 && (value >> 2) & 0x7 == softOffType
    }

    /// The tables laid out for guest-physical address `base`: RSDP, XSDT, FADT, MADT, DSDT, each
    /// 16-byte aligned, with every pointer and checksum filled in.
    public func build(at base: UInt64) throws -> [UInt8] {
        guard (1...254).contains(cpus) else { throw MachineError.cpus(requested: cpus, max: 254) }
        let dsdt = dsdtTable()
        let madt = madtTable()
        var blob = [UInt8](repeating: 0, count: 36)  // RSDP, filled in last
        func place(_ table: [UInt8]) -> UInt64 {
            while blob.count % 16 != 0 { blob.append(0) }
            let address = base + UInt64(blob.count)
            blob += table
            return address
        }
        let dsdtAddress = place(dsdt)
        let fadtAddress = place(fadtTable(dsdt: dsdtAddress))
        let madtAddress = place(madt)
        let xsdtAddress = place(ACPITables.table("XSDT", revision: 1, body: leBytes64(fadtAddress) + leBytes64(madtAddress)))
        var rsdp: [UInt8] = Array("RSD PTR ".utf8) + [0] + ACPITables.oemID + [2] + leBytes32(0) + leBytes32(36) + leBytes64(xsdtAddress) + [0, 0, 0, 0]
        rsdp[8] = checksum(rsdp[0..<20])
        rsdp[32] = checksum(rsdp[0..<36])
        blob.replaceSubrange(0..<36, with: rsdp)
        guard base + UInt64(blob.count) <= Layout.acpiTablesEnd else {
            throw MachineError.layout("ACPI tables of \(blob.count) bytes do not fit below 0x\(String(Layout.acpiTablesEnd, radix: 16))")
        }
        return blob
    }

    // MARK: Tables

    /// A system description table: the 36-byte header (checksum filled in) and `body`.
    static func table(_ signature: String, revision: UInt8, body: [UInt8]) -> [UInt8] {
        var bytes = Array(signature.utf8) + leBytes32(UInt32(36 + body.count)) + [revision, 0] + oemID + oemTableID
        bytes += leBytes32(1) + creatorID + leBytes32(1) + body
        bytes[9] = checksum(bytes[...])
        return bytes
    }

    /// A Generic Address Structure for a one-byte register in I/O space.
    static func ioRegister(_ port: UInt16) -> [UInt8] { [1, 8, 0, 1] + leBytes64(UInt64(port)) }

    /// FADT 6.5, hardware-reduced: no PM1 blocks, no SCI; sleep and reset through the registers above.
    func fadtTable(dsdt: UInt64) -> [UInt8] {
        var body = [UInt8](repeating: 0, count: 276 - 36)
        func put(_ bytes: [UInt8], at offset: Int) { body.replaceSubrange(offset - 36..<offset - 36 + bytes.count, with: bytes) }
        put(leBytes32(UInt32(truncatingIfNeeded: dsdt)), at: 40)   // DSDT (32-bit; X_DSDT below wins)
        // IAPC_BOOT_ARCH: an 8042 is present (the reset line and Ctrl-Alt-Del), no VGA, no MSI, no CMOS RTC.
        put(leBytes16(0x0002 | 0x0004 | 0x0008 | 0x0020), at: 109)
        // Flags: WBINVD, PROC_C1, PWR_BUTTON and SLP_BUTTON absent (control-method ones: none), RESET_REG_SUP, HW_REDUCED_ACPI.
        put(leBytes32((1 << 0) | (1 << 2) | (1 << 4) | (1 << 5) | (1 << 10) | (1 << 20)), at: 112)
        put(ACPITables.ioRegister(ACPITables.resetPort), at: 116)
        put([ACPITables.resetValue], at: 128)
        put([5], at: 131)                                      // FADT minor version: 6.5
        put(leBytes64(dsdt), at: 140)                               // X_DSDT
        put(ACPITables.ioRegister(ACPITables.sleepControlPort), at: 244)
        put(ACPITables.ioRegister(ACPITables.sleepStatusPort), at: 256)
        put(Array("GODWIT  ".utf8), at: 268)                    // hypervisor vendor identity
        return ACPITables.table("FACP", revision: 6, body: body)
    }

    /// MADT: the local APIC address, one enabled local APIC per vCPU, the IOAPIC (GSI 0 up), identity
    /// overrides for the ISA IRQs the devices use, and LINT1 as NMI on every CPU.
    func madtTable() -> [UInt8] {
        var body = leBytes32(UInt32(Layout.lapicAddress)) + leBytes32(1)  // PCAT_COMPAT: there is an 8259 (masked by Linux)
        for cpu in 0..<cpus { body += [0, 8, UInt8(cpu), UInt8(cpu)] + leBytes32(1) }
        body += [1, 12, MPTable.ioapicID(cpus: cpus), 0] + leBytes32(UInt32(Layout.ioapicAddress)) + leBytes32(0)
        // ISA IRQ 0 (the PIT) on GSI 0 as KVM's default routing wires it; serial (4) edge, active high.
        for irq: UInt8 in [0, 1, 4] { body += [2, 10, 0, irq] + leBytes32(UInt32(irq)) + leBytes16(0x5) }
        body += [4, 6, 0xff] + leBytes16(0x5) + [1]
        return ACPITables.table("APIC", revision: 6, body: body)
    }

    /// DSDT: `\_S5_` and, under `\_SB_`, COM1, the i8042 and each virtio-mmio device.
    func dsdtTable() -> [UInt8] {
        var devices: [UInt8] = []
        devices += AML.device("COM1", [
            AML.name("_HID", AML.eisaID("PNP0501")),
            AML.name("_UID", AML.integer(0)),
            AML.name("_CRS", AML.resources(AML.ioPort(0x3f8, length: 8) + AML.irq(4))),
        ])
        devices += AML.device("PS2K", [
            AML.name("_HID", AML.eisaID("PNP0303")),
            AML.name("_CRS", AML.resources(AML.ioPort(0x60, length: 1) + AML.ioPort(0x64, length: 1) + AML.irq(1))),
        ])
        for (i, device) in virtio.enumerated() {
            let digits = Array("0123456789ABCDEF".utf8)
            devices += AML.device("VR" + String(decoding: [digits[(i >> 4) & 0xf], digits[i & 0xf]], as: UTF8.self), [
                AML.name("_HID", AML.string("LNRO0005")),
                AML.name("_UID", AML.integer(UInt64(i))),
                AML.name("_CCA", AML.integer(1)),
                AML.name("_CRS", AML.resources(AML.memory32Fixed(base: UInt32(truncatingIfNeeded: device.base), length: UInt32(truncatingIfNeeded: device.size))
                                                + AML.extendedInterrupt(device.irq))),
            ])
        }
        let body = AML.name("_S5_", AML.package([AML.integer(UInt64(ACPITables.softOffType)), AML.integer(0), AML.integer(0), AML.integer(0)]))
            + AML.scope("\\_SB_", devices)
        return ACPITables.table("DSDT", revision: 2, body: body)
    }
}

/// The few AML encodings the DSDT needs (ACPI 6.5, chapter 20), and resource descriptors (6.4).
enum AML {
    /// PkgLength for `length` bytes of content: the encoding counts itself.
    static func packageLength(_ length: Int) -> [UInt8] {
        if length + 1 < 0x40 { return [UInt8(length + 1)] }
        for extra in 1...3 {
            let total = length + 1 + extra
            if total < 1 << (4 + 8 * extra) {
                var bytes = [UInt8(extra << 6) | UInt8(total & 0xf)]
                for i in 0..<extra { bytes.append(UInt8((total >> (4 + 8 * i)) & 0xff)) }
                return bytes
            }
        }
        return [0]  // unreachable for tables this size: 2^28 bytes is the limit
    }

    /// A NameString: an optional root prefix and 4-character segments joined by dots.
    static func nameString(_ path: String) -> [UInt8] {
        var bytes: [UInt8] = []
        var rest = Substring(path)
        if rest.hasPrefix("\\") { bytes.append(0x5c); rest = rest.dropFirst() }
        let segments = rest.split(separator: ".").map { String($0).padding(toLength: 4, withPad: "_", startingAt: 0) }
        switch segments.count {
        case 1: break
        case 2: bytes.append(0x2e)
        default: bytes += [0x2f, UInt8(segments.count)]
        }
        for segment in segments { bytes += Array(segment.utf8.prefix(4)) }
        return bytes
    }

    static func name(_ name: String, _ value: [UInt8]) -> [UInt8] { [0x08] + nameString(name) + value }
    static func scope(_ name: String, _ content: [UInt8]) -> [UInt8] {
        let inner = nameString(name) + content
        return [0x10] + packageLength(inner.count) + inner
    }
    static func device(_ name: String, _ objects: [[UInt8]]) -> [UInt8] {
        let inner = nameString(name) + objects.joined()
        return [0x5b, 0x82] + packageLength(inner.count) + inner
    }
    static func package(_ elements: [[UInt8]]) -> [UInt8] {
        let inner = [UInt8(elements.count)] + elements.joined()
        return [0x12] + packageLength(inner.count) + inner
    }
    static func integer(_ value: UInt64) -> [UInt8] {
        switch value {
        case 0: return [0x00]
        case 1: return [0x01]
        case ...0xff: return [0x0a, UInt8(value)]
        case ...0xffff: return [0x0b] + leBytes16(UInt16(value))
        case ...0xffff_ffff: return [0x0c] + leBytes32(UInt32(value))
        default: return [0x0e] + leBytes64(value)
        }
    }
    static func string(_ text: String) -> [UInt8] { [0x0d] + Array(text.utf8) + [0] }

    /// A compressed EISA id ("PNP0501") as a DWord integer.
    static func eisaID(_ id: String) -> [UInt8] {
        let c = Array(id.utf8)
        guard c.count == 7 else { return integer(0) }
        func letter(_ b: UInt8) -> UInt32 { UInt32(b &- 0x40) & 0x1f }
        func hex(_ b: UInt8) -> UInt32 { UInt32(Int(String(UnicodeScalar(b)), radix: 16) ?? 0) }
        let value = (letter(c[0]) << 26) | (letter(c[1]) << 21) | (letter(c[2]) << 16)
            | (hex(c[3]) << 12) | (hex(c[4]) << 8) | (hex(c[5]) << 4) | hex(c[6])
        // Stored big-endian within the little-endian DWord, as the ACPI spec's EISAID() macro does.
        return [0x0c, UInt8(value >> 24), UInt8((value >> 16) & 0xff), UInt8((value >> 8) & 0xff), UInt8(value & 0xff)]
    }

    /// A Buffer holding resource descriptors and the end tag.
    static func resources(_ descriptors: [UInt8]) -> [UInt8] {
        let data = descriptors + [0x79, 0]
        let inner = integer(UInt64(data.count)) + data
        return [0x11] + packageLength(inner.count) + inner
    }
    static func ioPort(_ port: UInt16, length: UInt8) -> [UInt8] { [0x47, 1] + leBytes16(port) + leBytes16(port) + [1, length] }
    static func irq(_ line: UInt8) -> [UInt8] { [0x22] + leBytes16(UInt16(1) << UInt16(line & 0xf)) }
    static func memory32Fixed(base: UInt32, length: UInt32) -> [UInt8] { [0x86, 9, 0, 1] + leBytes32(base) + leBytes32(length) }
    /// Extended interrupt: consumer, edge-triggered, active high, exclusive, one GSI.
    static func extendedInterrupt(_ gsi: UInt32) -> [UInt8] { [0x89, 6, 0, 0x03, 1] + leBytes32(gsi) }
}

func leBytes16(_ v: UInt16) -> [UInt8] { [UInt8(v & 0xff), UInt8(v >> 8)] }
func leBytes32(_ v: UInt32) -> [UInt8] { (0..<4).map { UInt8((v >> (8 * $0)) & 0xff) } }
func leBytes64(_ v: UInt64) -> [UInt8] { (0..<8).map { UInt8((v >> (8 * UInt64($0))) & 0xff) } }

/// The byte that makes the sum of `bytes` zero.
func checksum<C: Collection>(_ bytes: C) -> UInt8 where C.Element == UInt8 {
    UInt8(truncatingIfNeeded: 0 &- bytes.reduce(UInt8(0), &+))
}

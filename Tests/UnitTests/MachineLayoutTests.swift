import GuestMemory
import KVM
@testable import Machine
import Testing

@Suite("MP table, PVH start info and memory map")
struct MachineLayoutTests {
    func sum(_ bytes: ArraySlice<UInt8>) -> UInt8 { bytes.reduce(0, &+) }

    @Test(arguments: [1, 2, 8, 32])
    func mpTableIsWellFormed(cpus: Int) throws {
        let bytes = try MPTable.build(cpus: cpus, at: Layout.ebda)
        #expect(Array(bytes[0..<4]) == Array("_MP_".utf8))
        #expect(sum(bytes[0..<16]) == 0, "floating pointer checksum")
        let pointer = UInt64(bytes[4]) | UInt64(bytes[5]) << 8 | UInt64(bytes[6]) << 16 | UInt64(bytes[7]) << 24
        #expect(pointer == Layout.ebda + 16)
        let table = bytes[16...]
        #expect(Array(table.prefix(4)) == Array("PCMP".utf8))
        let length = Int(table[table.startIndex + 4]) | Int(table[table.startIndex + 5]) << 8
        #expect(length == table.count)
        #expect(sum(table) == 0, "configuration table checksum")
        let entryCount = Int(table[table.startIndex + 34]) | Int(table[table.startIndex + 35]) << 8
        // Walk the entries: processors first, each with its APIC id, exactly one BSP.
        var at = table.startIndex + 44
        var processors: [UInt8] = []
        var bsps = 0
        var ioapics = 0
        for _ in 0..<entryCount {
            switch table[at] {
            case 0:
                processors.append(table[at + 1])
                if table[at + 3] & 2 != 0 { bsps += 1 }
                at += 20
            case 2: ioapics += 1; at += 8
            default: at += 8
            }
        }
        #expect(at == table.endIndex)
        #expect(processors == (0..<cpus).map { UInt8($0) })
        #expect(bsps == 1)
        #expect(ioapics == 1)
    }

    @Test func mpTableRefusesImpossibleCPUCounts() {
        #expect(throws: MachineError.self) { _ = try MPTable.build(cpus: 0, at: Layout.ebda) }
        #expect(throws: MachineError.self) { _ = try MPTable.build(cpus: 255, at: Layout.ebda) }
    }

    @Test func startInfoAndCommandLine() throws {
        let memory = try GuestMemory.anonymous(layout: [(0, 4 << 20)])
        let map = Layout.memoryMap(for: Layout.ramRegions(size: 4 << 20))
        let address = try PVHBoot.write(commandLine: "godwit.job=ready", memoryMap: map, into: memory)
        #expect(try memory.load(UInt32.self, at: address) == PVHBoot.startInfoMagic)
        let cmdline = try memory.load(UInt64.self, at: address + 24)
        #expect(try memory.readBytes(at: cmdline, count: 17) == Array("godwit.job=ready\0".utf8))
        #expect(try memory.load(UInt32.self, at: address + 48) == UInt32(map.count))
        let mapAddress = try memory.load(UInt64.self, at: address + 40)
        let last = mapAddress + UInt64(map.count - 1) * 24
        #expect(try memory.load(UInt64.self, at: last) == Layout.highMemory)
        #expect(try memory.load(UInt64.self, at: last + 8) == (4 << 20) - Layout.highMemory)
        #expect(try memory.load(UInt32.self, at: last + 16) == 1)
    }

    @Test func commandLineLimits() throws {
        let memory = try GuestMemory.anonymous(layout: [(0, 4 << 20)])
        #expect(throws: MachineError.self) {
            _ = try PVHBoot.write(commandLine: String(repeating: "x", count: 70000), memoryMap: [], into: memory)
        }
        #expect(throws: MachineError.self) { _ = try PVHBoot.write(commandLine: "a\0b", memoryMap: [], into: memory) }
    }

    /// Huge-page RAM needs regions of whole 2 MiB pages; the RAM layout of any size that is a multiple of
    /// 2 MiB gives exactly that, on both sides of the MMIO gap.
    @Test func hugePageRAMNeedsWhole2MiBRegions() throws {
        for size: UInt64 in [8 << 20, 256 << 20, (3 << 30) + (2 << 20), 6 << 30] {
            for region in Layout.ramRegions(size: size) {
                #expect(region.base % (2 << 20) == 0 && region.size % (2 << 20) == 0, "\(size): \(region)")
            }
        }
        #expect(throws: GuestMemoryError.badLayout("region at 0x0 of 3145728 bytes is not made of whole 2 MiB huge pages")) {
            try GuestMemory.create(layout: [(base: 0, size: 3 << 20)], hugePages: true)
        }
        #expect(GuestMemoryError.hugePagesUnavailable(needed: 64, free: 3).description
                == "guest RAM needs 64 free 2 MiB huge pages but 3 are free (reserve more in /proc/sys/vm/nr_hugepages)")
    }

    @Test func largeMemorySkipsTheMMIOGap() {
        let regions = Layout.ramRegions(size: 4 << 30)
        #expect(regions.count == 2)
        #expect(regions[0].base + regions[0].size == Layout.mmioGapStart)
        #expect(regions[1].base == Layout.fourGiB)
        #expect(regions[0].size + regions[1].size == 4 << 30)
        let map = Layout.memoryMap(for: regions)
        #expect(!map.contains { $0.type == 1 && $0.address < Layout.fourGiB && $0.address + $0.size > Layout.mmioGapStart })
    }

    @Test func cpuidCarriesAPICIDsAndTheHypervisorBit() {
        let supported = [CPUIDEntry(function: 1, index: 0, flags: 0, eax: 0x806f8, ebx: 0x00ff_0800, ecx: 0, edx: 0),
                         CPUIDEntry(function: 0xb, index: 1, flags: 1, eax: 0, ebx: 0, ecx: 0, edx: 0)]
        let leaves = CPUSetup.cpuid(from: supported, vcpu: 3, count: 4)
        #expect(leaves[0].ebx >> 24 == 3)
        #expect((leaves[0].ebx >> 16) & 0xff == 4)
        #expect(leaves[0].ecx & (1 << 31) != 0)
        #expect(leaves[1].edx == 3)
        #expect(leaves[1].ebx == 4)
    }
}

import GuestMemory
@testable import Machine
import Testing

/// Builds small ELF64 images for the loader tests.
struct ElfBuilder {
    var entry: UInt64 = 0x100000
    var loadAddress: UInt64 = 0x100000
    var code: [UInt8] = [0xf4, 0x90, 0x90, 0x90]
    var bssExtra: UInt64 = 16
    var pvhEntry: UInt64? = 0x100000
    var pvhDescriptorSize = 4

    func build() -> [UInt8] {
        var note: [UInt8] = []
        if let pvhEntry {
            note += le32(4) + le32(UInt32(pvhDescriptorSize)) + le32(18) + Array("Xen\0".utf8)
            note += pvhDescriptorSize == 8 ? le64(pvhEntry) : le32(UInt32(truncatingIfNeeded: pvhEntry))
        }
        let phnum = note.isEmpty ? 1 : 2
        let codeOffset = 64 + 56 * phnum
        let noteOffset = codeOffset + code.count
        var bytes: [UInt8] = [0x7f, 0x45, 0x4c, 0x46, 2, 1, 1, 0] + [UInt8](repeating: 0, count: 8)
        bytes += le16(2) + le16(62) + le32(1) + le64(entry) + le64(64) + le64(0) + le32(0)
        bytes += le16(64) + le16(56) + le16(UInt16(phnum)) + le16(64) + le16(0) + le16(0)
        bytes += phdr(type: 1, offset: UInt64(codeOffset), address: loadAddress, fileSize: UInt64(code.count),
                      memorySize: UInt64(code.count) + bssExtra)
        if !note.isEmpty {
            bytes += phdr(type: 4, offset: UInt64(noteOffset), address: 0, fileSize: UInt64(note.count), memorySize: 0)
        }
        return bytes + code + note
    }

    func phdr(type: UInt32, offset: UInt64, address: UInt64, fileSize: UInt64, memorySize: UInt64) -> [UInt8] {
        le32(type) + le32(5) + le64(offset) + le64(address) + le64(address) + le64(fileSize) + le64(memorySize) + le64(8)
    }
}

func le16(_ v: UInt16) -> [UInt8] { [UInt8(v & 0xff), UInt8(v >> 8)] }
func le32(_ v: UInt32) -> [UInt8] { (0..<4).map { UInt8((v >> (8 * $0)) & 0xff) } }
func le64(_ v: UInt64) -> [UInt8] { (0..<8).map { UInt8((v >> (8 * UInt64($0))) & 0xff) } }

@Suite("ELF and PVH loader")
struct ElfLoaderTests {
    @Test func parsesSegmentsAndPVHNote() throws {
        let image = try ElfImage.parse(ElfBuilder().build())
        #expect(image.pvhEntry == 0x100000)
        #expect(image.segments.count == 1)
        #expect(image.segments[0].physicalAddress == 0x100000)
        #expect(image.segments[0].memorySize == 20)
    }

    @Test func acceptsAnEightByteNote() throws {
        var b = ElfBuilder()
        b.pvhDescriptorSize = 8
        b.pvhEntry = 0x1000c0
        #expect(try ElfImage.parse(b.build()).pvhEntry == 0x1000c0)
    }

    @Test func reportsAMissingNote() throws {
        var b = ElfBuilder()
        b.pvhEntry = nil
        #expect(try ElfImage.parse(b.build()).pvhEntry == nil)
    }

    @Test func loadsAndZeroesBSS() throws {
        let memory = try GuestMemory.anonymous(layout: [(0, 4 << 20)])
        try memory.writeBytes([UInt8](repeating: 0xaa, count: 64), at: 0x100000)
        let bytes = ElfBuilder().build()
        try ElfImage.parse(bytes).load(from: bytes, into: memory)
        #expect(try memory.readBytes(at: 0x100000, count: 4) == [0xf4, 0x90, 0x90, 0x90])
        #expect(try memory.readBytes(at: 0x100004, count: 16) == [UInt8](repeating: 0, count: 16))
        #expect(try memory.readBytes(at: 0x100014, count: 1) == [0xaa])
    }

    @Test func refusesEveryTruncation() throws {
        let bytes = ElfBuilder().build()
        for length in 0..<bytes.count - 12 {  // the last bytes are the note's descriptor
            #expect(throws: ElfError.self) { _ = try ElfImage.parse(Array(bytes.prefix(length))) }
        }
    }

    @Test func refusesLyingHeaders() throws {
        let good = ElfBuilder().build()
        var notElf = good; notElf[1] = 0x46
        var elf32 = good; elf32[4] = 1
        var bigEndian = good; bigEndian[5] = 2
        var arm = good; arm[18] = 183
        var phentsize = good; phentsize[54] = 32
        var hugePhnum = good; hugePhnum[56] = 0xff; hugePhnum[57] = 0xff
        var phoffPastEnd = good; phoffPastEnd[32...39] = ArraySlice(le64(UInt64.max - 8))
        var segmentPastEnd = good; segmentPastEnd[64 + 32..<64 + 40] = ArraySlice(le64(1 << 40))  // p_filesz
        var fileBiggerThanMemory = good; fileBiggerThanMemory[64 + 40..<64 + 48] = ArraySlice(le64(1))  // p_memsz
        var wrapping = good; wrapping[64 + 24..<64 + 32] = ArraySlice(le64(UInt64.max - 4))  // p_paddr
        for bad in [notElf, elf32, bigEndian, arm, phentsize, hugePhnum, phoffPastEnd, segmentPastEnd, fileBiggerThanMemory, wrapping] {
            #expect(throws: ElfError.self) { _ = try ElfImage.parse(bad) }
        }
    }

    @Test func refusesANoteThatRunsPastItsSegment() throws {
        var bytes = ElfBuilder().build()
        let noteAt = bytes.count - 16
        bytes[noteAt + 4..<noteAt + 8] = ArraySlice(le32(64))  // descsz larger than the segment
        #expect(throws: ElfError.self) { _ = try ElfImage.parse(bytes) }
    }

    @Test func refusesSegmentsOutsideRAMOrOverVMMData() throws {
        let memory = try GuestMemory.anonymous(layout: [(0, 2 << 20)])
        var high = ElfBuilder(); high.loadAddress = 0x300000
        let highBytes = high.build()
        #expect(throws: ElfError.self) { try ElfImage.parse(highBytes).load(from: highBytes, into: memory) }
        var low = ElfBuilder(); low.loadAddress = Layout.startInfo
        let lowBytes = low.build()
        #expect(throws: ElfError.self) { try ElfImage.parse(lowBytes).load(from: lowBytes, into: memory) }
    }
}

import GodwitTestSupport
import GuestMemory
@testable import Machine
import Testing

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

    /// A kernel read in pieces (the VMM's path for a vmlinux): parsing reads the headers and notes only,
    /// never a segment's contents, and the segments then go straight into guest memory.
    @Test func readsOnlyHeadersAndNotesThenLoadsFromTheFile() throws {
        var b = ElfBuilder()
        b.code = [0xf4] + [UInt8](repeating: 0x90, count: 1 << 20)
        let bytes = b.build()
        var ranges: [Range<Int>] = []
        let image = try ElfImage.parse(size: bytes.count) { offset, count in
            ranges.append(offset..<offset + count)
            return Array(bytes[offset..<offset + count])
        }
        #expect(image == (try ElfImage.parse(bytes)))
        let code = Int(image.segments[0].fileOffset)..<Int(image.segments[0].fileOffset + image.segments[0].fileSize)
        #expect(!ranges.contains { $0.overlaps(code) }, "read \(ranges), the segment is \(code)")
        #expect(ranges.reduce(0) { $0 + $1.count } < 4096)

        let memory = try GuestMemory.anonymous(layout: [(0, 4 << 20)])
        try image.load(into: memory) { segment, destination in
            // In bounds: destination holds fileSize bytes, which parse() checked are inside the file.
            bytes.withUnsafeBytes { destination.copyMemory(from: UnsafeRawBufferPointer(rebasing: $0[Int(segment.fileOffset)..<Int(segment.fileOffset + segment.fileSize)])) }
        }
        #expect(try memory.readBytes(at: 0x100000, count: 4) == [0xf4, 0x90, 0x90, 0x90])
        #expect(try memory.readBytes(at: 0x100000 + UInt64(b.code.count), count: 16) == [UInt8](repeating: 0, count: 16))
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
        let noteAt = bytes.count - 20  // 12-byte header, "Xen\0", a 4-byte entry
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

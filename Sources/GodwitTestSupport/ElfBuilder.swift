import Foundation

/// Builds small ELF64 images with a PVH note: for the loader tests and for tiny "broken" guests.
public struct ElfBuilder {
    public init() {}
    public var entry: UInt64 = 0x100000
    public var loadAddress: UInt64 = 0x100000
    public var code: [UInt8] = [0xf4, 0x90, 0x90, 0x90]
    public var bssExtra: UInt64 = 16
    public var pvhEntry: UInt64? = 0x100000
    public var pvhDescriptorSize = 4

    public func build() -> [UInt8] {
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

public func le16(_ v: UInt16) -> [UInt8] { [UInt8(v & 0xff), UInt8(v >> 8)] }
public func le32(_ v: UInt32) -> [UInt8] { (0..<4).map { UInt8((v >> (8 * $0)) & 0xff) } }
public func le64(_ v: UInt64) -> [UInt8] { (0..<8).map { UInt8((v >> (8 * UInt64($0))) & 0xff) } }


extension ElfBuilder {
    /// A guest of a few instructions, run at the PVH entry (32-bit protected mode, CPL 0).
    public static func tinyGuest(_ code: [UInt8]) -> [UInt8] {
        var b = ElfBuilder()
        b.code = code
        return b.build()
    }

    /// `mov al, value; out 0xf4, al; hlt`: powers off with `value` through the debug-exit port.
    public static func powerOff(status: UInt8) -> [UInt8] { tinyGuest([0xb0, status, 0xe6, 0xf4, 0xf4]) }
    /// `mov al, 0xfe; out 0x64, al; hlt`: the i8042 reset.
    public static let reboot: [UInt8] = tinyGuest([0xb0, 0xfe, 0xe6, 0x64, 0xf4])
    /// `lidt [zero]; ud2`: an exception with no IDT, which escalates to a triple fault.
    public static let tripleFault: [UInt8] = tinyGuest([0x0f, 0x01, 0x1d, 0x10, 0x00, 0x10, 0x00, 0x0f, 0x0b, 0x90, 0x90, 0x90, 0x90, 0x90, 0x90, 0x90,
                                                        0, 0, 0, 0, 0, 0])
    /// Writes `bytes` to a file.
    public static func write(_ bytes: [UInt8], to path: String) throws {
        FileManager.default.createFile(atPath: path, contents: Data(bytes))
    }
}

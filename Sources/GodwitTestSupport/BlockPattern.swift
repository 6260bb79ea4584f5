import Foundation

/// The test guest's checksummed sector pattern (guest/README.md), verified from the host side.
public enum BlockPattern {
    public static let magic: UInt64 = 0x4b42_5449_5744_4f47  // "GODWITBK"

    public struct Report: Sendable {
        public var sectors = 0
        public var bad: [(lba: UInt64, kind: String)] = []
        public var seeds = Set<UInt64>()
    }

    static func mix64(_ v: UInt64) -> UInt64 {
        var x = v &+ 0x9e37_79b9_7f4a_7c15
        x = (x ^ (x >> 30)) &* 0xbf58_476d_1ce4_e5b9
        x = (x ^ (x >> 27)) &* 0x94d0_49bb_1331_11eb
        return x ^ (x >> 31)
    }

    static func sectorSum(_ w: [UInt64]) -> UInt64 {
        var h: UInt64 = 0xcbf2_9ce4_8422_2325
        for i in 0..<63 { h = ((h ^ w[i]) &* 0x1_0000_0001b3) &+ (h >> 29) }
        return h
    }

    /// Checks every sector of `[offset, offset+size)` in the image file. `sliceStart` is where the
    /// guest's disk begins in the file (an I/O domain slice): the guest numbers sectors from there.
    public static func verify(imagePath: String, offset: UInt64, size: UInt64, sliceStart: UInt64 = 0) throws -> Report {
        let handle = try FileHandle(forReadingFrom: URL(fileURLWithPath: imagePath))
        defer { try? handle.close() }
        try handle.seek(toOffset: offset)
        let data = try handle.read(upToCount: Int(size)) ?? Data()
        var report = Report()
        for sector in 0..<(data.count / 512) {
            let lba = (offset - sliceStart) / 512 + UInt64(sector)
            let w: [UInt64] = (0..<64).map { i in
                data.withUnsafeBytes { UInt64(littleEndian: $0.loadUnaligned(fromByteOffset: sector * 512 + i * 8, as: UInt64.self)) }
            }
            report.sectors += 1
            if w[0] != magic { report.bad.append((lba, "magic")); continue }
            if w[1] != lba { report.bad.append((lba, "lba")); continue }
            if w[63] != sectorSum(w) { report.bad.append((lba, "checksum")); continue }
            var x = mix64(w[2] ^ lba)
            var fillerOK = true
            for i in 4..<63 {
                x = x &* 6_364_136_223_846_793_005 &+ 1_442_695_040_888_963_407
                if w[i] != x { fillerOK = false; break }
            }
            if !fillerOK { report.bad.append((lba, "filler")); continue }
            report.seeds.insert(w[2])
        }
        return report
    }
}

/// Runs the test guest under QEMU microvm, as the README describes, when QEMU is installed.
public enum QEMU {
    public static let binary = "/usr/bin/qemu-system-x86_64"
    public static var isAvailable: Bool {
        if FileManager.default.isExecutableFile(atPath: binary) { return true }
        FileHandle.standardError.write("skipping QEMU interop test: \(binary) is not installed (scripts/install-deps.sh installs it)\n".data(using: .utf8)!)
        return false
    }

    /// QEMU's exit status for the guest's pass (0x10 → (0x10 << 1) | 1).
    public static let passStatus: Int32 = 33

    public static func run(jobs: String, cpus: Int = 1, memory: String = "128M", disks: [String] = [], timeout: Double = 120) throws -> ProcessResult {
        var args = ["-M", "microvm,acpi=off", "-enable-kvm", "-cpu", "host,-arch-capabilities", "-smp", String(cpus), "-m", memory,
                    "-nographic", "-nodefaults", "-no-user-config", "-serial", "stdio",
                    "-global", "virtio-mmio.force-legacy=false", "-device", "isa-debug-exit,iobase=0xf4,iosize=0x04"]
        for (i, d) in disks.enumerated() {
            args += ["-drive", "id=d\(i),file=\(d),format=raw,if=none", "-device", "virtio-blk-device,drive=d\(i)"]
        }
        args += ["-kernel", TestEnvironment.guestPath, "-append", jobs]
        return try runProcess(binary, args, timeout: timeout)
    }
}

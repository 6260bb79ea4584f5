import Foundation
import GodwitSystem
import GodwitTestSupport
import Testing

/// The Linux tier: the project's own kernel and initramfs (`make linux`) on this KVM. Kernel code is
/// emulated here (about 1 M instructions/s), so each boot takes tens of seconds: the jobs are chained
/// in as few boots as possible.
@Suite("Linux: the project's kernel and initramfs", .serialized, .enabled(if: LinuxTier.isAvailable))
struct LinuxTests {
    static let commandLine = "console=ttyS0 pci=off tsc=reliable no_timer_check i8042.noaux i8042.nomux i8042.dumbkbd reboot=k panic=-1"

    /// One boot, through PVH with the initramfs as its module: 2 vCPUs to the ready line, a checksummed
    /// pattern written to the disk and read back, the host pinged over the NIC, power off with status 0;
    /// the host's image holds the pattern the guest wrote.
    @Test func bootsWithTwoVCPUsVerifiesItsDiskAndPingsTheHost() throws {
        let dir = try TestEnvironment.temporaryDirectory()
        defer { try? FileManager.default.removeItem(at: dir) }
        let image = dir.appendingPathComponent("disk.img").path
        #expect(FileManager.default.createFile(atPath: image, contents: nil))
        #expect(truncate(image, 64 << 20) == 0)
        let console = dir.appendingPathComponent("console.log").path
        let net = try TestNetwork()
        defer { net.tearDown() }
        let (program, arguments) = net.inside(TestEnvironment.godwitPath, [
            "vm", "--kernel", TestEnvironment.linuxArtifact("vmlinux"), "--initrd", TestEnvironment.linuxArtifact("initramfs.cpio"),
            "--cpus", "2", "--memory", "256M", "--disk", image, "--net", "tap=\(net.taps[0])", "--serial", console,
            "--cmdline", Self.commandLine + " godwit.ip=10.77.0.2/24 godwit.job=ready godwit.job=blk-verify godwit.job=net,dst=\(TestNetwork.hostAddress)",
        ])
        let r = try runProcess(program, arguments, timeout: 600)
        let output = (try? String(contentsOfFile: console, encoding: .utf8)) ?? ""
        let lines = output.split(whereSeparator: \.isNewline).compactMap { GuestLine(String($0)) }
        let tail = "jobs seen: \(lines.map(\.job)); console ends: " + output.split(whereSeparator: \.isNewline).suffix(8).joined(separator: " | ")
        #expect(r.status == 0, "exit \(r.status): \(r.stderr.suffix(800))\n\(tail)")
        #expect(lines.first { $0.job == "ready" }?["nproc"] == "2", "\(tail)")
        let verify = try #require(lines.first { $0.job == "blk-verify" }, "\(tail)")
        #expect(verify["errors"] == "0")
        let received = lines.first { $0.job == "net" }?.int("received") ?? 0
        #expect(received > 0, "the guest's pings were answered: \(tail)")
        #expect(lines.last { $0.job == "done" }?["status"] == "pass")
        // What the guest wrote is on the host's image: the first 1 MiB hashes to what it reported.
        let sum = try runProcess("/bin/sh", ["-c", "head -c 1048576 '\(image)' | sha256sum"], timeout: 30).stdout
        #expect(sum.hasPrefix(verify["sha256"] ?? "?"), "host image sha256 \(sum.prefix(16)), guest \(verify["sha256"] ?? "?")")
        let handle = try #require(FileHandle(forReadingAtPath: image))
        #expect(String(decoding: handle.readData(ofLength: 8), as: UTF8.self) == "GODWITBK")
    }

    /// The bzImage path, the second boot: the VMM enters the 64-bit boot protocol with `boot_params`,
    /// the compressed kernel decompresses itself (at emulation speed here: about a minute; this config
    /// has no verbose decompressor, so the first line is the kernel's banner), finds the initrd as the
    /// boot protocol's ramdisk and reaches the ready line; a `reboot` ends the VMM with the reboot status.
    @Test func theBzImageBootsToReadyAndRebootGivesTheRebootStatus() throws {
        let dir = try TestEnvironment.temporaryDirectory()
        defer { try? FileManager.default.removeItem(at: dir) }
        let console = dir.appendingPathComponent("console.log").path
        let r = try runProcess(TestEnvironment.godwitPath, [
            "vm", "--kernel", TestEnvironment.linuxArtifact("bzImage"), "--initrd", TestEnvironment.linuxArtifact("initramfs.cpio"),
            "--memory", "256M", "--serial", console, "--cmdline", Self.commandLine + " godwit.job=ready godwit.job=reboot",
        ], timeout: 600)
        let output = (try? String(contentsOfFile: console, encoding: .utf8)) ?? ""
        let tail = output.split(whereSeparator: \.isNewline).suffix(8).joined(separator: " | ")
        #expect(output.contains("Linux version"), "\(r.stderr.suffix(500)) \(tail)")
        #expect(output.split(whereSeparator: \.isNewline).compactMap { GuestLine(String($0)) }.contains { $0.job == "ready" }, "\(tail)")
        #expect(r.status == 3, "reboot: \(r.status) \(r.stderr.suffix(300)) \(tail)")
    }

    /// A truncated bzImage and one whose setup header lies are refused with a clear error, before any VM exists.
    @Test func aDamagedBzImageIsAClearError() throws {
        let dir = try TestEnvironment.temporaryDirectory()
        defer { try? FileManager.default.removeItem(at: dir) }
        let bytes = try [UInt8](Data(contentsOf: URL(fileURLWithPath: TestEnvironment.linuxArtifact("bzImage"))))
        let truncated = dir.appendingPathComponent("truncated").path
        try Data(bytes.prefix(0x1000)).write(to: URL(fileURLWithPath: truncated))
        var lying = bytes
        lying[0x1f4] = 0xff; lying[0x1f5] = 0xff; lying[0x1f6] = 0xff; lying[0x1f7] = 0x0f  // syssize: 4 GiB
        let lyingPath = dir.appendingPathComponent("lying").path
        try Data(lying).write(to: URL(fileURLWithPath: lyingPath))
        for (path, words) in [(truncated, "truncated"), (lyingPath, "syssize")] {
            let r = try runGodwit(jobs: "", kernel: path, timeout: 30)
            #expect(r.status == 2, "\(r.stderr)")
            #expect(r.stderr.contains(words), "\(r.stderr)")
        }
    }
}

/// Whether the Linux tier can run here (KVM, root for the network, the built kernel and initramfs).
enum LinuxTier {
    static var isAvailable: Bool {
        if let reason = TestEnvironment.linuxUnavailableReason {
            FileHandle.standardError.write("skipping the Linux tier: \(reason)\n".data(using: .utf8)!)
            return false
        }
        return TestNetwork.isAvailable
    }
}

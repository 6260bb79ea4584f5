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

    /// The second boot, the way an operator runs it: configured through the API in Firecracker's
    /// getting-started order, its disk served by an I/O domain and its NIC on host A's TAP. The guest
    /// writes its disk, pings the client and opens a shell; it is live-migrated to host B (a network
    /// namespace with its own I/O domain on the same image, as with shared storage); there Linux's own
    /// virtio-net driver announces it (the client reaches it), and the shell answers a command typed
    /// through `godwit ctl type` that reads the disk back. `exit` powers it off on B with status 0.
    @Test func bootsThroughTheAPIAndMovesToAnotherHostWithItsShell() throws {
        let net = try TwoHostNetwork()
        defer { net.tearDown() }
        let image = net.path("disk.img")
        #expect(FileManager.default.createFile(atPath: image, contents: nil))
        #expect(truncate(image, 64 << 20) == 0)
        var domains: [BackgroundProcess] = []
        defer { for d in domains { d.terminate(); _ = d.wait(timeout: 5) } }
        let sockets = [net.path("blkA.sock"), net.path("blkB.sock")]
        for host in 0..<2 {
            domains.append(try net.start(net.hosts[host], TestEnvironment.godwitPath, ["iodomain", "--blk", image, "--device", "socket=\(sockets[host])"]))
        }
        for _ in 0..<500 where !sockets.allSatisfy({ FileManager.default.fileExists(atPath: $0) }) { usleep(10_000) }

        typealias HostVMM = MigrationNetworkTests.HostVMM
        let source = try HostVMM(empty: net, host: 0, name: "a1")
        defer { source.stop() }
        let jobs = " godwit.ip=\(TwoHostNetwork.guestIP)/24 godwit.job=ready godwit.job=blk-verify godwit.job=net,dst=\(TwoHostNetwork.clientIP) godwit.job=shell"
        let steps: [(String, [String: Any])] = [
            ("/boot-source", ["kernel_image_path": TestEnvironment.linuxArtifact("vmlinux"), "initrd_path": TestEnvironment.linuxArtifact("initramfs.cpio"),
                              "boot_args": Self.commandLine + jobs]),
            ("/machine-config", ["vcpu_count": 2, "mem_size_mib": 256]),
            ("/drives/rootfs", ["drive_id": "rootfs", "socket": sockets[0], "is_root_device": false]),
            ("/network-interfaces/net0", ["iface_id": "net0", "host_dev_name": net.taps[0], "guest_mac": TwoHostNetwork.guestMAC]),
            ("/actions", ["action_type": "InstanceStart"]),
        ]
        for (path, body) in steps {
            let reply = try source.call("PUT", path, body)
            try #require(reply.status == 204, "PUT \(path): \(reply.status) \(reply.body)")
        }
        let console = { (vmm: HostVMM) in (try? String(contentsOfFile: vmm.serial, encoding: .utf8)) ?? "" }
        let tail = { (vmm: HostVMM) in console(vmm).split(whereSeparator: \.isNewline).suffix(8).joined(separator: " | ") }
        let shell = source.waitForLine(timeout: 300) { $0.job == "net" }
        try #require(shell != nil, "Linux booted to its jobs on host A: \(tail(source))")
        let lines = source.lines()
        #expect(lines.first { $0.job == "ready" }?["nproc"] == "2", "\(tail(source))")
        #expect(lines.first { $0.job == "blk-verify" }?["errors"] == "0", "\(tail(source))")
        #expect((shell?.int("received") ?? 0) > 0, "the guest reached the client from host A: \(tail(source))")
        for _ in 0..<1000 where !console(source).contains("godwit# ") { usleep(20_000) }
        #expect(try net.clientPing(wait: 2), "the client reaches the guest on host A")

        let target = try HostVMM(target: net, host: 1, name: "b1", nic: "tap=\(net.taps[1]),mac=\(TwoHostNetwork.guestMAC)", disk: "socket=\(sockets[1])")
        defer { target.stop() }
        let ctl = try source.migrate(to: target)
        #expect(ctl.status == 0, "\(ctl.stdout)\n\(ctl.stderr)")
        let left = source.process.wait(timeout: 30)
        #expect(left.status == 0, "the source VMM exits once the target owns the guest: \(left.stderr.suffix(800))")

        // Linux's virtio-net driver sends the gratuitous ARP when the target asks (VIRTIO_NET_S_ANNOUNCE).
        var answered = false
        for _ in 0..<15 where !answered { answered = try net.clientPing(wait: 1) }
        #expect(answered, "the client reaches the guest on host B: \(net.diagnostics())")
        #expect(try net.clientBridgePort() == "B", "the client's bridge learnt the guest's new port")

        let before = console(target).count
        let typed = try runProcess(TestEnvironment.godwitPath, ["ctl", "type", "--api-sock", target.socket,
                                                                "head -c 8 /dev/vda; echo; echo answer-$((6*7)) cpus-$(grep -c ^processor /proc/cpuinfo)"], timeout: 30)
        #expect(typed.status == 0, "\(typed.stderr)")
        var reply = ""
        for _ in 0..<1500 where !reply.contains("answer-42") {
            usleep(20_000)
            reply = String(console(target).dropFirst(before))
        }
        #expect(reply.contains("GODWITBK"), "the shell on host B read the disk: \(reply.suffix(300))")
        #expect(reply.contains("answer-42 cpus-2"), "the shell on host B answered: \(reply.suffix(300))")
        _ = try runProcess(TestEnvironment.godwitPath, ["ctl", "type", "--api-sock", target.socket, "exit"], timeout: 30)
        let r = target.process.wait(timeout: 120)
        #expect(r.status == 0, "powered off on host B: \(r.stderr.suffix(500)) \(tail(target))")
        let end = target.lines()
        #expect(end.last { $0.job == "done" }?["status"] == "pass", "\(tail(target))")
        #expect(end.last { $0.job == "done" }?["boot"] == lines.first { $0.job == "ready" }?["boot"], "the same boot, moved")
    }

    /// The bzImage path, the third boot: the VMM enters the 64-bit boot protocol with `boot_params`,
    /// the compressed kernel's decompressor speaks first on the earlyprintk serial port and decompresses
    /// (at emulation speed here: about a minute), the kernel finds the initrd as the boot protocol's
    /// ramdisk and reaches the ready line; a `reboot` ends the VMM with the reboot status.
    @Test func theBzImageBootsToReadyAndRebootGivesTheRebootStatus() throws {
        let dir = try TestEnvironment.temporaryDirectory()
        defer { try? FileManager.default.removeItem(at: dir) }
        let console = dir.appendingPathComponent("console.log").path
        let r = try runProcess(TestEnvironment.godwitPath, [
            "vm", "--kernel", TestEnvironment.linuxArtifact("bzImage"), "--initrd", TestEnvironment.linuxArtifact("initramfs.cpio"),
            "--memory", "256M", "--serial", console,
            "--cmdline", Self.commandLine + " earlyprintk=serial,ttyS0,115200 godwit.job=ready godwit.job=reboot",
        ], timeout: 600)
        let output = (try? String(contentsOfFile: console, encoding: .utf8)) ?? ""
        let tail = output.split(whereSeparator: \.isNewline).suffix(8).joined(separator: " | ")
        #expect(output.hasPrefix("early console in extract_kernel"), "the decompressor's first output: \(output.prefix(200))")
        #expect(output.contains("Decompressing Linux... Parsing ELF... "), "\(output.prefix(600))")
        #expect(output.contains("Booting the kernel"), "the decompressor handed over: \(output.prefix(800))")
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

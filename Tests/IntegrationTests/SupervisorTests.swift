import Foundation
import GodwitSystem
import GodwitTestSupport
import Testing

/// I/O domains the VMM starts itself (`--disk iodomain=`, `--net ...,iodomain`), supervises and
/// restarts; the guest must not notice a domain being killed.
@Suite("Integration: supervised I/O domains", .serialized, .enabled(if: TestEnvironment.hasKVM))
struct SupervisorTests {
    static func children(of pid: Int32) -> [Int32] { VMMProcesses.children(of: pid) }

    /// The issue's test: kill -9 the I/O domain twenty times while the guest runs `blk-verify` for a
    /// minute; the supervisor restarts it, the VMM reconnects, requests in flight are resubmitted
    /// from the inflight region, and the guest sees no I/O error.
    @Test func guestSurvivesTwentyKillsOfItsIODomain() throws {
        let dir = try TestEnvironment.temporaryDirectory()
        defer { try? FileManager.default.removeItem(at: dir) }
        let image = dir.appendingPathComponent("disk.img").path
        try TestEnvironment.makeImage(at: URL(fileURLWithPath: image), size: 16 << 20)
        setenv("GODWIT_DEVICE_STATISTICS", "1", 1)
        defer { unsetenv("GODWIT_DEVICE_STATISTICS") }
        let vm = try BackgroundProcess(TestEnvironment.godwitPath, [
            "vm", "--kernel", TestEnvironment.guestPath, "--memory", "128M", "--disk", "iodomain=\(image)",
            "--cmdline", "godwit.job=blk-verify,size=4194304,seconds=60 godwit.job=blk-check,size=4194304"])
        #expect(vm.waitForOutput(timeout: 20) { $0.contains("@godwit job=") || $0.contains("blk") } || vm.isRunning)
        var killed: [Int32] = []
        usleep(2_000_000)
        for _ in 0..<20 {
            guard vm.isRunning else { break }
            // The domain (with namespaces: the waiting parent; its child dies with it).
            var domain: Int32?
            for _ in 0..<200 {
                domain = VMMProcesses.supervisedDomains(of: vm.pid).first { !killed.contains($0) }
                if domain != nil { break }
                usleep(10_000)
            }
            guard let domain else { break }
            kill(domain, SIGKILL)
            killed.append(domain)
            usleep(1_800_000)
        }
        let r = vm.wait(timeout: 120)
        #expect(killed.count == 20)
        #expect(r.status == 0, "\(r.stdout)\n\(r.stderr.suffix(4000))")
        let verify = try #require(r.lines(job: "blk-verify").first, "\(r.stdout)")
        #expect(verify["errors"] == "0")
        #expect((verify.int("passes") ?? 0) > 20)
        #expect(r.lines(job: "blk-check").first?["errors"] == "0")
        #expect(r.stderr.contains("iodomain disk0 restarts=20"), "\(r.stderr.suffix(2000))")
        // The last pass is on the disk, sector by sector.
        let report = try BlockPattern.verify(imagePath: image, offset: 0, size: 4 << 20)
        #expect(report.bad.isEmpty, "\(report.bad.count) bad sectors, first \(report.bad.prefix(3))")
        // No domain is left behind.
        usleep(200_000)
        for pid in killed { #expect(kill(pid, 0) != 0) }
    }

    /// The I/O domain the VMM starts is sandboxed the same way as one started by hand, and dies with
    /// the VMM even when the VMM is killed with SIGKILL.
    @Test func supervisedDomainIsSandboxedAndDiesWithItsVMM() throws {
        let dir = try TestEnvironment.temporaryDirectory()
        defer { try? FileManager.default.removeItem(at: dir) }
        let image = dir.appendingPathComponent("disk.img").path
        try TestEnvironment.makeImage(at: URL(fileURLWithPath: image), size: 4 << 20)
        let vm = try BackgroundProcess(TestEnvironment.godwitPath, [
            "vm", "--kernel", TestEnvironment.guestPath, "--disk", "iodomain=\(image)",
            "--cmdline", "godwit.job=blk-verify,size=1048576 godwit.job=idle,seconds=30"])
        guard vm.waitForOutput(timeout: 30, { $0.contains("job=blk-verify") }) else {
            let r = vm.wait(timeout: 5)
            Issue.record("the VM did not run blk-verify: status \(r.status)\n\(r.stdout)\n\(r.stderr)")
            return
        }
        // The VMM's child is the supervisor (it restarts domains, so that the locked-down VMM never
        // execs); its child the domain, whose child is the namespaced server.
        // The process we started waits outside; its child, PID 1 of a new PID namespace, is the VMM;
        // the network broker stays in our namespaces.
        let vmmPid = VMMProcesses.vmm(of: vm.pid)
        #expect(vmmPid != vm.pid, "the VMM runs in its own PID namespace")
        let broker = try #require(VMMProcesses.broker(of: vm.pid), "the VMM's network broker")
        let supervisor = try #require(Self.children(of: vmmPid).first)
        let waiter = try #require(Self.children(of: supervisor).first)
        let server = try #require(Self.children(of: waiter).first, "the namespaced domain")
        let vmm = try String(contentsOfFile: "/proc/\(vmmPid)/status", encoding: .utf8)
        #expect(vmm.contains("Seccomp:\t2"), "the VMM locks itself down too")
        #expect(vmm.contains("NoNewPrivs:\t1"))
        #expect(vmm.contains("CapEff:\t0000000000000000"))
        #expect(vmm.contains("CapBnd:\t0000000000000000"))
        #expect(Sandbox.ProcessStatus(parsing: vmm).nsPids.last == 1, "PID 1 of its namespace")
        for kind in ["user", "mnt", "ipc", "net", "pid"] {
            let its = try FileManager.default.destinationOfSymbolicLink(atPath: "/proc/\(vmmPid)/ns/\(kind)")
            #expect(its != (try FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/ns/\(kind)")), "the VMM's \(kind) namespace")
        }
        let devices = try String(contentsOfFile: "/proc/\(vmmPid)/net/dev", encoding: .utf8)
            .split(separator: "\n").dropFirst(2).map { $0.split(separator: ":")[0].trimmingCharacters(in: .whitespaces) }
        #expect(devices == ["lo"], "the VMM's network namespace has only lo: \(devices)")
        #expect(try FileManager.default.destinationOfSymbolicLink(atPath: "/proc/\(broker)/ns/net")
                == FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/ns/net"), "the broker stays in our network")
        let status = try String(contentsOfFile: "/proc/\(server)/status", encoding: .utf8)
        #expect(status.contains("Seccomp:\t2"))
        #expect(status.contains("NoNewPrivs:\t1"))
        #expect(status.contains("CapEff:\t0000000000000000"))
        #expect(try FileManager.default.destinationOfSymbolicLink(atPath: "/proc/\(server)/ns/pid")
                != FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/ns/pid"))
        kill(vm.pid, SIGKILL)
        _ = vm.wait(timeout: 10)
        var gone = false
        for _ in 0..<200 where !gone {
            gone = kill(supervisor, 0) != 0 && kill(waiter, 0) != 0 && kill(server, 0) != 0 && kill(vmmPid, 0) != 0 && kill(broker, 0) != 0
            usleep(10_000)
        }
        #expect(gone, "the I/O domain outlived its VMM")
    }

    @Test func aBadImageIsAClearSetUpError() throws {
        let r = try runGodwit(jobs: "godwit.job=ready", extra: ["--disk", "iodomain=/nonexistent/disk.img"])
        #expect(r.status == 2, "\(r.stderr)")
        #expect(r.stderr.contains("/nonexistent/disk.img"), "\(r.stderr)")
    }
}

/// A NIC served by an I/O domain: the VMM opens the TAP and passes it in; the guest answers pings and
/// UDP echoes through the domain, and keeps doing so after the domain is killed and restarted.
@Suite("Network: NIC in an I/O domain", .serialized, .enabled(if: TestNetwork.isAvailable))
struct NetIODomainTests {
    static let guest = "10.77.0.2"

    @Test func guestNetworkThroughAnIODomainSurvivesARestart() throws {
        let net = try TestNetwork()
        defer { net.tearDown() }
        let vm = try net.startGodwit(jobs: "godwit.ip=\(Self.guest)/24 godwit.job=net-echo,seconds=20",
                                     nets: ["tap=\(net.taps[0]),iodomain"])
        var up = false
        for _ in 0..<50 where !up { up = try net.run("/usr/bin/ping", ["-c", "1", "-W", "1", "-q", Self.guest], timeout: 5).status == 0 }
        #expect(up, "the guest answers through its I/O domain")
        let first = try net.nettool(["udp-echo-client", "--dst", "\(Self.guest):7", "--count", "2000", "--sizes", "1,64,1472", "--timeout", "10"], timeout: 30)
        #expect(first["received"] as? Int == 2000, "\(first)")
        #expect(first["mismatched"] as? Int == 0, "\(first)")
        // Kill the domain: the supervisor restarts it with the same TAP, the VMM reconnects.
        let domain = try #require(VMMProcesses.supervisedDomains(of: vm.pid).first)
        kill(domain, SIGKILL)
        usleep(500_000)
        var back = false
        for _ in 0..<50 where !back { back = try net.run("/usr/bin/ping", ["-c", "1", "-W", "1", "-q", Self.guest], timeout: 5).status == 0 }
        #expect(back, "the guest answers again after the restart")
        let ping = try net.run("/usr/bin/ping", ["-c", "200", "-i", "0.005", "-W", "1", "-q", Self.guest], timeout: 30)
        #expect(ping.stdout.contains(" 0% packet loss"), "\(ping.stdout)")
        let r = vm.wait(timeout: 60)
        #expect(r.status == 0, "\(r.stdout)\n\(r.stderr.suffix(3000))")
    }
}

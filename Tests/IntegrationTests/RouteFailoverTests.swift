import Foundation
import GodwitSystem
import GodwitTestSupport
import Testing

/// The tools a real local-device failure is made with: nbdkit's error filter serving the local image,
/// mounted as a file by nbdfuse (errors switched on by creating a file), plus FUSE itself.
enum FailureTools {
    static let all = ["/usr/bin/nbdkit", "/usr/bin/nbdfuse", "/usr/bin/fusermount3", "/dev/fuse"]
    static var missing: [String] { all.filter { !FileManager.default.fileExists(atPath: $0) } }
}

/// Device routes end to end: a test guest's disk lives in a sandboxed I/O domain whose local device
/// fails for real (nbdkit error filter under nbdfuse), mirrored to a replica served over NBD from
/// another host (a network namespace joined by a veth pair, whose link the tests can cut).
@Suite("Integration: device routes, mirror and failover", .serialized,
       .enabled(if: TestNetwork.isAvailable && FailureTools.missing.isEmpty, "needs KVM, root and \(FailureTools.missing.joined(separator: ", "))"))
struct RouteFailoverTests {
    static var nextPort: UInt16 = 7700

    /// The pieces: a failable local device, a replica server, a domain with a control socket.
    final class Rig {
        let dir: URL
        let local: URL, replica: URL, errorFlag: URL, mount: URL
        let control: String, disk: String
        let nbdkit: BackgroundProcess, nbdfuse: BackgroundProcess, replicaServer: BackgroundProcess
        var domain: BackgroundProcess!
        let port: UInt16
        /// The replica's host: another network namespace, over a veth pair.
        let peer: PeerHost

        init(size: UInt64 = 16 << 20, faultTimeoutMs: Int = 2000, slowReadsMs: Int? = nil) throws {
            RouteFailoverTests.nextPort += 1
            peer = try PeerHost(subnet: Int(RouteFailoverTests.nextPort % 200))
            dir = try TestEnvironment.temporaryDirectory()
            local = dir.appendingPathComponent("local.img")
            replica = dir.appendingPathComponent("replica.img")
            errorFlag = dir.appendingPathComponent("fail-now")
            mount = dir.appendingPathComponent("mnt")
            try FileManager.default.createDirectory(at: mount, withIntermediateDirectories: true)
            try TestEnvironment.makeImage(at: local, size: size)
            try TestEnvironment.makeImage(at: replica, size: size)
            let nbdSocket = dir.appendingPathComponent("local-nbd.sock").path
            // The error filter (errors while the flag file exists), and optionally slow reads so that a
            // replica's copy takes long enough to be interrupted.
            let delay = slowReadsMs == nil ? [] : ["--filter=delay"]
            let delayArguments = slowReadsMs.map { ["delay-read=\($0)ms"] } ?? []
            nbdkit = try BackgroundProcess("/usr/bin/nbdkit", ["-U", nbdSocket, "-f", "--filter=error"] + delay + ["file", local.path,
                                                               "error-rate=100%", "error-file=\(errorFlag.path)", "error=EIO"] + delayArguments)
            for _ in 0..<500 where !FileManager.default.fileExists(atPath: nbdSocket) { usleep(10_000) }
            nbdfuse = try BackgroundProcess("/usr/bin/nbdfuse", [mount.path, "--unix", nbdSocket])
            let device = mount.appendingPathComponent("nbd").path
            for _ in 0..<500 where !FileManager.default.fileExists(atPath: device) { usleep(10_000) }
            port = RouteFailoverTests.nextPort
            replicaServer = try peer.start(TestEnvironment.godwitPath, ["nbd-server", "--export", "replica=\(replica.path)",
                                                                        "--listen", "\(peer.address):\(port)"])
            control = dir.appendingPathComponent("control.sock").path
            disk = dir.appendingPathComponent("disk.sock").path
            domain = try BackgroundProcess("/usr/bin/env", ["GODWIT_SANDBOX_NAMESPACES=1", TestEnvironment.godwitPath, "iodomain",
                                                            "--blk", device, "--direct", "--control", control,
                                                            "--device", "socket=\(disk),fault-timeout-ms=\(faultTimeoutMs)"])
            for _ in 0..<500 where !FileManager.default.fileExists(atPath: control) { usleep(10_000) }
        }

        func ctl(_ arguments: [String]) throws -> ProcessResult {
            try runProcess(TestEnvironment.godwitPath, ["ctl", "iodomain"] + arguments + ["--control", control], timeout: 30)
        }

        /// The disk's line in `list`.
        func status() throws -> String {
            try ctl(["list"]).stdout.split(separator: "\n").first { $0.hasPrefix(disk) }.map(String.init) ?? ""
        }

        func attachReplica() throws -> ProcessResult {
            try ctl(["attach-replica", "--socket", disk, "--nbd", "tcp:\(peer.address):\(port)", "--export", "replica"])
        }

        func waitFor(_ text: String, seconds: Double = 60) throws -> Bool {
            let deadline = Date().addingTimeInterval(seconds)
            while Date() < deadline {
                if try status().contains(text) { return true }
                usleep(50_000)
            }
            return false
        }

        func stop() {
            domain?.terminate()
            _ = domain?.wait(timeout: 10)
            replicaServer.terminate()
            _ = replicaServer.wait(timeout: 10)
            _ = try? runProcess("/usr/bin/fusermount3", ["-u", mount.path], timeout: 10)
            _ = nbdfuse.wait(timeout: 10)
            nbdkit.terminate()
            _ = nbdkit.wait(timeout: 10)
            peer.tearDown()
            try? FileManager.default.removeItem(at: dir)
        }
    }

    /// The issue's test: the guest runs blk-verify on a mirrored disk, the local device starts failing
    /// mid-run; the guest sees no error, the route is remote, the replica holds every pass.
    @Test func aLocalFailureUnderAMirroredDiskIsInvisibleToTheGuest() throws {
        let rig = try Rig()
        defer { rig.stop() }
        let attach = try rig.attachReplica()
        #expect(attach.status == 0, "\(attach.stderr)")
        let synced = try rig.waitFor("route=mirror replica=in-sync")
        let afterSync = try rig.status()
        #expect(synced, "\(afterSync)")
        let vm = try BackgroundProcess(TestEnvironment.godwitPath, [
            "vm", "--kernel", TestEnvironment.guestPath, "--memory", "128M", "--disk", "socket=\(rig.disk)",
            "--cmdline", "godwit.job=ready godwit.job=blk-verify,size=4194304,seconds=12 godwit.job=blk-check,size=4194304"])
        #expect(vm.waitForOutput(timeout: 30) { $0.contains("job=ready") })
        usleep(4_000_000)  // blk-verify is in its passes (it reports at its end, 12 s in)
        _ = FileManager.default.createFile(atPath: rig.errorFlag.path, contents: Data())  // the local device fails from now on
        let r = vm.wait(timeout: 120)
        #expect(r.status == 0, "\(r.stdout.suffix(2000))\n\(r.stderr.suffix(2000))")
        #expect(r.lines(job: "blk-verify").first?["errors"] == "0", "\(r.stdout.suffix(1000))")
        #expect(r.lines(job: "blk-check").first?["errors"] == "0")
        let status = try rig.status()
        #expect(status.contains("route=remote") && status.contains("failovers=1") && status.contains("local=failed"), "\(status)")
        let events = try rig.ctl(["events"]).stdout
        #expect(events.contains("local-fault") && events.contains("failover"), "\(events)")
        // The replica holds the guest's last pass, sector by sector.
        let report = try BlockPattern.verify(imagePath: rig.replica.path, offset: 0, size: 4 << 20)
        #expect(report.bad.isEmpty, "\(report.bad.count) bad sectors on the replica, first \(report.bad.prefix(3))")
        #expect(rig.domain.isRunning)
    }

    /// The local device fails while the replica is still being copied (reads slowed down so that the
    /// copy is under way): the guest gets the error (as from real hardware), nothing hangs, the sync
    /// stops, and the events say why.
    @Test func aFailureBeforeTheReplicaIsInSyncReachesTheGuest() throws {
        let rig = try Rig(size: 64 << 20, slowReadsMs: 5)  // 1024 chunks at >= 5 ms: the copy takes seconds
        defer { rig.stop() }
        #expect(try rig.attachReplica().status == 0)
        #expect(try rig.waitFor("sync="), "the copy is under way")
        _ = FileManager.default.createFile(atPath: rig.errorFlag.path, contents: Data())  // the local device fails mid-copy
        let r = try runGodwit(jobs: "godwit.job=blk-verify,size=1048576", disks: ["socket=\(rig.disk)"])
        #expect(r.status != 0, "the guest saw the error")
        #expect(r.stdout.contains("error") || r.stdout.contains("status=fail"), "\(r.stdout.suffix(1000))")
        let events = try rig.ctl(["events"]).stdout
        #expect(events.contains("no replica in sync"), "\(events)")
        #expect(events.contains("sync-failed") && events.contains("the local device failed while the replica was being copied"), "\(events)")
        #expect(rig.domain.isRunning)
    }

    /// The replica goes away while the local device is healthy: the disk carries on locally, and when
    /// the replica comes back it gets only the chunks written meanwhile; afterwards both images agree.
    @Test func aReplicaOutageIsResyncedFromTheBitmap() throws {
        // The replica is cut off after twenty times the fault time-out (4 s), well inside the guest's 10 s
        // request time-out (500 ms made it 10 s, and the guest gave up at the same moment).
        let rig = try Rig(faultTimeoutMs: 200)
        defer { rig.stop() }
        #expect(try rig.attachReplica().status == 0)
        #expect(try rig.waitFor("route=mirror"))
        // The wire to the replica's host goes dead: no reset, nothing; the time-out notices.
        try rig.peer.setLink(up: false)
        rig.replicaServer.terminate()
        _ = rig.replicaServer.wait(timeout: 10)
        let first = try runGodwit(jobs: "godwit.job=blk-verify,size=1048576", disks: ["socket=\(rig.disk)"])
        #expect(first.status == 0, "the guest runs on the local device: \(first.stdout.suffix(500))")
        let degraded = try rig.waitFor("route=local replica=none")
        let afterOutage = try rig.status()
        #expect(degraded, "\(afterOutage)")
        #expect(try rig.ctl(["events"]).stdout.contains("replica-fault"))
        let outOfSync = try rig.status()
        #expect(!outOfSync.contains("out_of_sync_bytes=0 "), "\(outOfSync)")
        // The replica returns (same image): a resync copies what it missed, not the whole disk.
        try rig.peer.setLink(up: true)
        let server = try rig.peer.start(TestEnvironment.godwitPath, ["nbd-server", "--export", "replica=\(rig.replica.path)",
                                                                     "--listen", "\(rig.peer.address):\(rig.port)"])
        defer { server.terminate(); _ = server.wait(timeout: 10) }
        usleep(500_000)
        let resync = try rig.ctl(["attach-replica", "--socket", rig.disk, "--nbd", "tcp:\(rig.peer.address):\(rig.port)", "--export", "replica", "--resync"])
        #expect(resync.status == 0, "\(resync.stderr)")
        #expect(try rig.waitFor("route=mirror replica=in-sync"))
        #expect(try rig.ctl(["events"]).stdout.contains("resync"))
        #expect(try Data(contentsOf: rig.replica) == Data(contentsOf: rig.local), "both images agree after the resync")
    }
}

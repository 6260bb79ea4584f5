import Foundation
import GodwitTestSupport
import Testing

/// virtio-blk end to end: the test guest writes, reads and benchmarks a real image file under godwit.
@Suite("Integration: virtio-blk with the test guest", .serialized, .enabled(if: TestEnvironment.hasKVM))
struct DiskTests {
    static let mib: UInt64 = 1 << 20

    func image(_ size: UInt64 = 16 << 20) throws -> (URL, String) {
        let dir = try TestEnvironment.temporaryDirectory()
        let path = dir.appendingPathComponent("disk.img")
        try TestEnvironment.makeImage(at: path, size: size)
        return (dir, path.path)
    }

    @Test(arguments: [(1, "poll"), (2, "poll"), (1, "irq"), (2, "irq")])
    func patternWrittenByTheGuestIsOnTheHostAndSurvivesAReboot(cpus: Int, mode: String) throws {
        let (dir, path) = try image()
        defer { try? FileManager.default.removeItem(at: dir) }
        let offset: UInt64 = 1 << 20, size: UInt64 = 2 << 20
        let r = try runGodwit(jobs: "godwit.job=blk-verify,offset=\(offset),size=\(size),mode=\(mode)", cpus: cpus, disks: [path])
        #expect(r.status == 0, "\(r.stdout)\n\(r.stderr)")
        let line = try #require(r.lines(job: "blk-verify").first, "\(r.stdout)")
        #expect(line["errors"] == "0")
        #expect(line.int("bytes") == Int(size))

        // The host sees exactly the guest's pattern, with the seed the guest reported.
        let report = try BlockPattern.verify(imagePath: path, offset: offset, size: size)
        #expect(report.sectors == Int(size / 512))
        #expect(report.bad.isEmpty, "bad sectors: \(report.bad.prefix(5))")
        #expect(report.seeds.map { String($0, radix: 16) } == [line["seed"]].compactMap { $0?.trimmingLeadingZeros })
        // Outside the region the image is untouched.
        #expect(try BlockPattern.verify(imagePath: path, offset: 0, size: offset).bad.count == Int(offset / 512))

        // A second boot verifies what the first wrote.
        let again = try runGodwit(jobs: "godwit.job=blk-check,offset=\(offset),size=\(size),mode=\(mode)", cpus: cpus, disks: [path])
        #expect(again.status == 0, "\(again.stdout)\n\(again.stderr)")
        #expect(again.lines(job: "blk-check").first?["seed"] == line["seed"])
        #expect(again.lines(job: "blk-check").first?["errors"] == "0")
    }

    @Test func blkCheckFailsOnADiskTheGuestDidNotWrite() throws {
        let (dir, path) = try image()
        defer { try? FileManager.default.removeItem(at: dir) }
        let r = try runGodwit(jobs: "godwit.job=blk-check,size=65536", disks: [path])
        #expect(r.status == 1, "\(r.stdout)")
        #expect(r.lines(job: "done").first?["status"] == "fail")
    }

    @Test func readOnlyDiskRefusesWrites() throws {
        let (dir, path) = try image()
        defer { try? FileManager.default.removeItem(at: dir) }
        let before = try Data(contentsOf: URL(fileURLWithPath: path))
        let r = try runGodwit(jobs: "godwit.job=blk-verify,size=65536", disks: [path + ",readonly"])
        #expect(r.status == 0, "\(r.stdout)\n\(r.stderr)")
        let line = try #require(r.lines(job: "blk-verify").first, "\(r.stdout)")
        #expect(line["ro"] == "1")
        #expect(line["ro_write"] == "refused")
        #expect(try Data(contentsOf: URL(fileURLWithPath: path)) == before, "the image is unchanged")
    }

    @Test func verifyForSecondsWithBothVCPUsAndTwoDisks() throws {
        let (dir, path) = try image()
        defer { try? FileManager.default.removeItem(at: dir) }
        let second = dir.appendingPathComponent("second.img")
        try TestEnvironment.makeImage(at: second, size: 8 << 20)
        let r = try runGodwit(jobs: "godwit.job=ready godwit.job=blk-verify,seconds=1,size=1048576 godwit.job=blk-verify,disk=1,size=1048576,mode=irq",
                              cpus: 2, disks: [path, second.path])
        #expect(r.status == 0, "\(r.stdout)\n\(r.stderr)")
        #expect(r.lines(job: "ready").first?.int("disks") == 2)
        let lines = r.lines(job: "blk-verify")
        #expect(lines.count == 2)
        #expect((lines.first?.int("passes") ?? 0) >= 2, "repeated passes for a second")
        #expect(try BlockPattern.verify(imagePath: second.path, offset: 0, size: 1 << 20).bad.isEmpty)
    }

    @Test(arguments: [("randread", 1), ("randwrite", 2), ("read", 2), ("write", 1)])
    func benchmarkJobReportsThroughputAndLatency(rw: String, cpus: Int) throws {
        let (dir, path) = try image()
        defer { try? FileManager.default.removeItem(at: dir) }
        let r = try runGodwit(jobs: "godwit.job=blk-bench,rw=\(rw),qd=8,n=500,mode=irq", cpus: cpus, disks: [path])
        #expect(r.status == 0, "\(r.stdout)\n\(r.stderr)")
        let line = try #require(r.lines(job: "blk-bench").first, "\(r.stdout)")
        #expect((line.int("iops") ?? 0) > 0)
        #expect(line["errors"] == "0")
        let p50 = line.int("lat_p50_us") ?? -1, p99 = line.int("lat_p99_us") ?? -1
        #expect(p50 > 0 && p50 <= p99)
    }

    /// The baseline path: every queue notification is an MMIO exit handled on the vCPU thread.
    @Test(arguments: [1, 2])
    func notificationsAsExits(cpus: Int) throws {
        let (dir, path) = try image()
        defer { try? FileManager.default.removeItem(at: dir) }
        let r = try runGodwit(jobs: "godwit.job=blk-verify,size=1048576,mode=irq godwit.job=blk-bench,qd=8,n=500",
                              cpus: cpus, disks: [path], extra: ["--notify", "exit"])
        #expect(r.status == 0, "\(r.stdout)\n\(r.stderr)")
        #expect(try BlockPattern.verify(imagePath: path, offset: 0, size: 1 << 20).bad.isEmpty)
    }

    /// DESIGN.md's fast path: with ioeventfds a queue notification is no VMM exit; with `--notify exit`
    /// every notification is one.
    @Test func notificationsCauseNoVMMExits() throws {
        let (dir, path) = try image()
        defer { try? FileManager.default.removeItem(at: dir) }
        let fast = try runGodwit(jobs: "godwit.job=blk-bench,n=2000", disks: [path], statistics: true)
        let slow = try runGodwit(jobs: "godwit.job=blk-bench,n=2000", disks: [path], extra: ["--notify", "exit"], statistics: true)
        #expect(fast.status == 0 && slow.status == 0, "\(fast.stderr)\(slow.stderr)")
        let fastMMIO = try #require(fast.counter("exits", "mmio"), "\(fast.stderr)")
        let slowMMIO = try #require(slow.counter("exits", "mmio"), "\(slow.stderr)")
        #expect(fast.counter("device 0", "requests") == 2000)
        #expect(fastMMIO < 100, "only set-up register accesses exit: \(fastMMIO)")
        #expect(slowMMIO >= 2000, "one exit per notification: \(slowMMIO)")
    }

    @Test func directIO() throws {
        let (dir, path) = try image()
        defer { try? FileManager.default.removeItem(at: dir) }
        let r = try runGodwit(jobs: "godwit.job=blk-verify,size=1048576 godwit.job=blk-check,size=1048576", disks: [path + ",direct"])
        #expect(r.status == 0, "\(r.stdout)\n\(r.stderr)")
        #expect(try BlockPattern.verify(imagePath: path, offset: 0, size: 1 << 20).bad.isEmpty)
    }
}

/// The same guest file under QEMU microvm: the test guest is a common workload, not Godwit-specific.
@Suite("Interop: QEMU runs the same test guest", .serialized,
       .enabled(if: TestEnvironment.hasKVM && QEMU.isAvailable))
struct QEMUInteropTests {
    @Test func readyAndBlkVerifyUnderQEMU() throws {
        let dir = try TestEnvironment.temporaryDirectory()
        defer { try? FileManager.default.removeItem(at: dir) }
        let path = dir.appendingPathComponent("disk.img")
        try TestEnvironment.makeImage(at: path, size: 16 << 20)
        let r = try QEMU.run(jobs: "godwit.job=ready godwit.job=blk-verify,size=1048576", cpus: 2, disks: [path.path])
        #expect(r.status == QEMU.passStatus, "\(r.stdout)\n\(r.stderr)")
        #expect(r.lines(job: "ready").first?.int("cpus") == 2)
        #expect(r.lines(job: "blk-verify").first?["errors"] == "0")
        // A disk QEMU's guest wrote is verified by the guest under Godwit, and vice versa.
        let check = try runGodwit(jobs: "godwit.job=blk-check,size=1048576", disks: [path.path])
        #expect(check.status == 0, "\(check.stdout)")
        #expect(check.lines(job: "blk-check").first?["seed"] == r.lines(job: "blk-verify").first?["seed"])
    }
}

extension String {
    var trimmingLeadingZeros: String {
        let t = drop { $0 == "0" }
        return t.isEmpty ? "0" : String(t)
    }
}

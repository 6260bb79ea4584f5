import Foundation
import GodwitTestSupport
import Testing

/// Real KVM, the real `godwit` binary, and tiny or full test guests.
@Suite("Integration: boot, exits and errors", .serialized, .enabled(if: TestEnvironment.hasKVM))
struct BootTests {
    @Test(arguments: [1, 2, 8])
    func readyJob(cpus: Int) throws {
        let r = try runGodwit(jobs: "godwit.job=ready", cpus: cpus)
        #expect(r.status == 0, "\(r.stdout)\n\(r.stderr)")
        let ready = try #require(r.lines(job: "ready").first, "\(r.stdout)")
        #expect(ready.int("cpus") == cpus)
        #expect(ready.int("mem_mib").map { $0 >= 120 && $0 <= 128 } == true, "\(ready)")
        #expect(r.lines(job: "done").first?["status"] == "pass")
        let boots = Set(r.guestLines.compactMap { $0["boot"] })
        #expect(boots.count == 1, "one boot_id per boot")
    }

    @Test func bootIDDiffersBetweenBoots() throws {
        let a = try runGodwit(jobs: "godwit.job=ready")
        let b = try runGodwit(jobs: "godwit.job=ready")
        let idA = try #require(a.lines(job: "ready").first?["boot"])
        let idB = try #require(b.lines(job: "ready").first?["boot"])
        #expect(idA != idB)
    }

    @Test(arguments: [1, 2])
    func idleHeartbeats(cpus: Int) throws {
        let r = try runGodwit(jobs: "godwit.job=idle,seconds=1", cpus: cpus)
        #expect(r.status == 0, "\(r.stdout)\n\(r.stderr)")
        let summary = try #require(r.lines(job: "idle").last(where: { $0["beats"] != nil }), "\(r.stdout)")
        #expect((summary.int("beats") ?? 0) >= 50, "\(summary)")
        let times = r.lines(job: "idle").compactMap { $0.int("t_us") }
        #expect(times == times.sorted(), "the guest clock never goes backwards")
    }

    @Test(arguments: [1, 2])
    func dirtyJobVerifiesMemory(cpus: Int) throws {
        let r = try runGodwit(jobs: "godwit.job=dirty,mib=16,rate=0,seconds=1", cpus: cpus)
        #expect(r.status == 0, "\(r.stdout)\n\(r.stderr)")
        #expect(r.lines(job: "dirty").last?["verified"] == "1", "\(r.stdout)")
    }

    @Test(arguments: [1, 2])
    func shellTakesTypedCommands(cpus: Int) throws {
        let r = try runGodwit(jobs: "godwit.job=shell", cpus: cpus, input: "info\rpoweroff\r", inputDelay: 0.5, timeout: 60)
        #expect(r.status == 0, "\(r.stdout)\n\(r.stderr)")
        #expect(r.stdout.contains("godwit> "))
        #expect(r.stdout.contains("info"), "typed characters are echoed")
        let info = try #require(r.lines(job: "shell").first { $0["cmd"] == "info" && $0["cpus"] != nil }, "\(r.stdout)")
        #expect(info.int("cpus") == cpus, "info prints the vCPUs")
    }

    @Test func serialOutputToAFile() throws {
        let dir = try TestEnvironment.temporaryDirectory()
        defer { try? FileManager.default.removeItem(at: dir) }
        let log = dir.appendingPathComponent("console.log").path
        let r = try runGodwit(jobs: "godwit.job=ready", extra: ["--serial", log])
        #expect(r.status == 0)
        #expect(!r.stdout.contains("@godwit"))
        let text = try String(contentsOfFile: log, encoding: .utf8)
        #expect(text.contains("@godwit job=ready"))
        #expect(text.contains("status=pass"))
    }

    @Test func sigtermStopsTheGuestCleanly() throws {
        let r = try runGodwit(jobs: "godwit.job=idle,seconds=30", timeout: 1.5)
        #expect(r.timedOut)
        #expect(r.status == 7, "SIGTERM stops the VM with status 7: \(r.stderr)")
        #expect(r.stderr.contains("stopped"))
    }

    // MARK: Exit statuses from tiny guests

    func runTiny(_ bytes: [UInt8], memory: String = "32M") throws -> ProcessResult {
        let dir = try TestEnvironment.temporaryDirectory()
        defer { try? FileManager.default.removeItem(at: dir) }
        let path = dir.appendingPathComponent("tiny.elf").path
        try ElfBuilder.write(bytes, to: path)
        return try runGodwit(jobs: "", memory: memory, kernel: path, timeout: 60)
    }

    @Test func powerOffPassAndFail() throws {
        #expect(try runTiny(ElfBuilder.powerOff(status: 0x10)).status == 0)
        let fail = try runTiny(ElfBuilder.powerOff(status: 0x11))
        #expect(fail.status == 1)
        #expect(fail.stderr.contains("status 0x11"))
    }

    @Test func rebootExitStatus() throws {
        let r = try runTiny(ElfBuilder.reboot)
        #expect(r.status == 3, "\(r.stderr)")
        #expect(r.stderr.contains("reboot"))
    }

    /// The guest finds the RSDP in the BIOS area, follows the XSDT to the hardware-reduced FADT and uses
    /// its sleep control and reset registers, as Linux's `poweroff` and `reboot` do.
    @Test func acpiPowerOffAndResetEndTheVMMWithTheirStatuses() throws {
        let off = try runGodwit(jobs: "godwit.job=acpi,action=poweroff", timeout: 60)
        #expect(off.status == 0, "\(off.stdout) \(off.stderr)")
        #expect(off.stdout.contains("sleep_port=0x600"))
        let reset = try runGodwit(jobs: "godwit.job=acpi,action=reset", cpus: 2, timeout: 60)
        #expect(reset.status == 3, "\(reset.stdout) \(reset.stderr)")
        #expect(reset.stderr.contains("reboot"))
    }

    @Test func tripleFaultExitStatus() throws {
        let r = try runTiny(ElfBuilder.tripleFault)
        #expect(r.status == 4 || r.status == 5, "\(r.stderr)")
    }

    @Test func emulationFailurePrintsTheInstruction() throws {
        // `rdrand eax` then `popcnt eax, ebx` at CPL 0: kvm_pvm's emulator lacks at least one of these.
        // On hardware-virtualized KVM they run, and the guest powers off with pass instead.
        let r = try runTiny(ElfBuilder.tinyGuest([0xf3, 0x0f, 0xb8, 0xc3, 0xb0, 0x10, 0xe6, 0xf4, 0xf4]))
        if r.status == 5 {
            #expect(r.stderr.contains("rip=0x100000"), "\(r.stderr)")
            #expect(r.stderr.contains("instruction (15 bytes): f3 0f b8 c3"), "the instruction bytes are printed: \(r.stderr)")
        } else {
            #expect(r.status == 0, "\(r.stderr)")
        }
    }

    // MARK: Bad input: one clear line, a non-zero status, never a trap

    func expectSetupError(_ r: ProcessResult, mentions text: String) {
        #expect(r.status == 2, "\(r.stderr)")
        #expect(r.stderr.contains(text), "\(r.stderr)")
        #expect(!r.stderr.contains("Fatal error"), "no Swift trap")
    }

    @Test func missingKernel() throws {
        expectSetupError(try runGodwit(jobs: "", kernel: "/nonexistent/guest.elf"), mentions: "No such file")
    }

    @Test func kernelThatIsNotPVH() throws {
        var b = ElfBuilder()
        b.pvhEntry = nil
        expectSetupError(try runTiny(b.build()), mentions: "PVH")
        expectSetupError(try runTiny(Array("#!/bin/sh\necho not a kernel\n".utf8)), mentions: "not an ELF")
        expectSetupError(try runTiny(Array(ElfBuilder.powerOff(status: 0x10).prefix(100))), mentions: "truncated")
    }

    @Test func memoryAndCPULimits() throws {
        expectSetupError(try runGodwit(jobs: "", memory: "4M"), mentions: "too little")
        expectSetupError(try runGodwit(jobs: "", memory: "100000G"), mentions: "the host has only")
        expectSetupError(try runGodwit(jobs: "", cpus: 0), mentions: "vCPUs")
        expectSetupError(try runGodwit(jobs: "", cpus: 500), mentions: "vCPUs")
    }

    @Test func missingKVMDevice() throws {
        expectSetupError(try runGodwit(jobs: "", extra: ["--kvm-device", "/nonexistent/kvm"]), mentions: "/nonexistent/kvm")
    }

    @Test func missingDisk() throws {
        expectSetupError(try runGodwit(jobs: "", disks: ["/nonexistent/disk.img"]), mentions: "/nonexistent/disk.img")
    }
}

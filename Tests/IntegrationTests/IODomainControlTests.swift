import Foundation
import GodwitSystem
import GodwitTestSupport
import GuestMemory
import IODomain
import Testing
import VhostUser

/// The I/O domain's run-time control socket, and a hostile frontend against a live, sandboxed domain.
@Suite("Integration: I/O domain control socket and hostile frontends", .serialized, .enabled(if: TestEnvironment.hasKVM))
struct IODomainControlTests {
    final class ControlledDomain {
        let dir: URL
        let image: String
        let control: String
        let process: BackgroundProcess

        init(size: UInt64 = 32 << 20) throws {
            dir = try TestEnvironment.temporaryDirectory()
            image = dir.appendingPathComponent("device.img").path
            control = dir.appendingPathComponent("control.sock").path
            try TestEnvironment.makeImage(at: URL(fileURLWithPath: image), size: size)
            process = try BackgroundProcess("/usr/bin/env", ["GODWIT_SANDBOX_NAMESPACES=1", TestEnvironment.godwitPath,
                                                             "iodomain", "--blk", image, "--control", control])
            for _ in 0..<500 where !FileManager.default.fileExists(atPath: control) { usleep(10_000) }
        }

        func path(_ name: String) -> String { dir.appendingPathComponent(name).path }

        func ctl(_ arguments: [String]) throws -> ProcessResult {
            try runProcess(TestEnvironment.godwitPath, ["ctl", "iodomain"] + arguments + ["--control", control], timeout: 20)
        }

        func stop() {
            process.terminate()
            _ = process.wait(timeout: 10)
            try? FileManager.default.removeItem(at: dir)
        }
    }

    @Test func devicesAreAddedListedAndRemovedWhileTheDomainRuns() throws {
        let domain = try ControlledDomain()
        defer { domain.stop() }
        let a = domain.path("a.sock"), b = domain.path("b.sock")
        #expect(try domain.ctl(["add-blk", "--socket", a, "--offset", "0", "--size", String(16 << 20)]).status == 0)
        #expect(try domain.ctl(["add-blk", "--socket", b, "--offset", String(16 << 20)]).status == 0)
        let duplicate = try domain.ctl(["add-blk", "--socket", a])
        #expect(duplicate.status == 1 && duplicate.stderr.contains("a.sock"), "\(duplicate.stderr)")
        let outside = try domain.ctl(["add-blk", "--socket", domain.path("c.sock"), "--offset", String(64 << 20)])
        #expect(outside.status == 1 && outside.stderr.contains("past the device"), "\(outside.stderr)")
        let r = try runGodwit(jobs: "godwit.job=blk-verify,size=1048576 godwit.job=blk-capacity", extra: ["--disk", "socket=\(b)"])
        #expect(r.status == 0, "\(r.stdout)\n\(r.stderr)")
        #expect(try BlockPattern.verify(imagePath: domain.image, offset: 16 << 20, size: 1 << 20, sliceStart: 16 << 20).bad.isEmpty)
        let list = try domain.ctl(["list"])
        #expect(list.stdout.contains("a.sock: blk offset=0 size=16777216"), "\(list.stdout)")
        #expect(list.stdout.contains("b.sock: blk offset=16777216 size=16777216"), "\(list.stdout)")
        #expect(try domain.ctl(["remove", "--socket", a]).status == 0)
        #expect(!(try domain.ctl(["list"]).stdout.contains("a.sock")))
        #expect(!FileManager.default.fileExists(atPath: a))
        // Bad requests on the socket itself: clear errors, the domain keeps serving.
        let client = try ControlClient(path: domain.control)
        #expect(throws: IODomainError.self) { try client.call(ControlRequest(op: .addBlock, socket: domain.path("x.sock"))) }
        #expect(throws: IODomainError.self) { try client.call(ControlRequest(op: .remove, socket: "/nowhere")) }
        #expect(domain.process.isRunning)
    }

    /// A frontend that lies (memory outside its file, rings outside its memory, descriptor tables full
    /// of garbage, raw junk, unsealed memory) on one VM's socket while another VM runs `blk-verify` on
    /// another slice: that VM passes, the domain keeps running, and the hostile slice is untouched
    /// beyond what that frontend asked for.
    @Test func aHostileFrontendCannotAffectAnotherVM() throws {
        let domain = try ControlledDomain()
        defer { domain.stop() }
        let good = domain.path("good.sock"), evil = domain.path("evil.sock")
        #expect(try domain.ctl(["add-blk", "--socket", good, "--size", String(16 << 20)]).status == 0)
        #expect(try domain.ctl(["add-blk", "--socket", evil, "--offset", String(16 << 20)]).status == 0)
        let vm = try BackgroundProcess(TestEnvironment.godwitPath, ["vm", "--kernel", TestEnvironment.guestPath, "--memory", "64M",
                                                                  "--disk", "socket=\(good)",
                                                                  "--cmdline", "godwit.job=blk-verify,size=2097152,seconds=6,mode=irq"])
        var attacks = 0
        let deadline = Date().addingTimeInterval(5)
        while Date() < deadline {
            attacks += 1
            try? attack(evil, variant: attacks % 5)
        }
        let r = vm.wait(timeout: 60)
        #expect(r.status == 0, "\(r.stdout)\n\(r.stderr)")
        #expect(r.lines(job: "blk-verify").first?["errors"] == "0")
        #expect(domain.process.isRunning, "the domain survived \(attacks) hostile connections")
        #expect(attacks > 10)
        // The good VM's slice holds its pattern.
        #expect(try BlockPattern.verify(imagePath: domain.image, offset: 0, size: 2 << 20).bad.isEmpty)
        // The attacks reached the domain and were refused one connection at a time, with reasons.
        domain.process.terminate()
        let log = domain.process.wait(timeout: 10).stderr
        let refused = log.split(separator: "\n").filter { $0.contains("evil.sock: connection") && $0.contains("closed:") }
        #expect(refused.count > 10, "\(log.suffix(3000))")
        #expect(log.contains("not sealed"), "unsealed memory is refused")
        #expect(log.contains("runs past the end of its file"))
    }

    /// One hostile connection.
    func attack(_ socket: String, variant: Int) throws {
        switch variant {
        case 0:
            // Raw junk: a header with a huge size, then garbage.
            let channel = try VhostUserChannel.connect(path: socket)
            try channel.sendRaw([0x05, 0, 0, 0, 0x01, 0, 0, 0, 0xff, 0xff, 0xff, 0x7f] + (0..<64).map { UInt8(truncatingIfNeeded: $0 &* 37) })
            channel.shutdown()
        case 1:
            // A memory table that runs past the end of its file.
            let frontend = try VhostUserFrontend.connect(path: socket)
            defer { frontend.close() }
            let memory = try GuestMemory.create(layout: [(base: 0, size: 1 << 20)])
            let region = memory.regions[0]
            try frontend.setOwner()
            try frontend.setMemoryTable([VhostUserMemoryRegion(guestAddress: 0, size: 64 << 20, userAddress: 0x7000_0000_0000, mmapOffset: 0)],
                                        fileDescriptors: [region.backing!])
        case 2:
            // Unsealed memory.
            let frontend = try VhostUserFrontend.connect(path: socket)
            defer { frontend.close() }
            let fd = try MemFD.create(name: "unsealed", size: 1 << 20)
            try frontend.setMemoryTable([VhostUserMemoryRegion(guestAddress: 0, size: 1 << 20, userAddress: 0x7000_0000_0000, mmapOffset: 0)],
                                        fileDescriptors: [fd])
        default:
            // A well-formed set-up whose ring is full of garbage descriptors pointing anywhere.
            let frontend = try VhostUserFrontend.connect(path: socket)
            defer { frontend.close() }
            let memory = try GuestMemory.create(layout: [(base: 0, size: 1 << 20)])
            let region = memory.regions[0]
            let user = UInt64(UInt(bitPattern: region.hostBase))
            let junk = memory.regions[0].hostBase
            var seed = UInt64(variant) &* 0x9E37_79B9_7F4A_7C15
            for i in 0..<(64 << 10) / 8 {
                seed = seed &* 6364136223846793005 &+ 1442695040888963407
                // In bounds: 64 KiB inside the 1 MiB region.
                junk.storeBytes(of: seed, toByteOffset: 8 * i, as: UInt64.self)
            }
            try memory.store(UInt16(variant == 3 ? 5 : 0xffff), at: 0x4000 + 2)  // avail idx
            let features = try frontend.getFeatures()
            try frontend.setFeatures(features & ((1 << 32) | (1 << 30)))
            try frontend.setOwner()
            try frontend.setMemoryTable([VhostUserMemoryRegion(guestAddress: 0, size: 1 << 20, userAddress: user, mmapOffset: 0)],
                                        fileDescriptors: [region.backing!])
            try frontend.setVringNum(queue: 0, size: 256)
            try frontend.setVringBase(queue: 0, base: 0)
            try frontend.setVringAddress(VhostUserVringAddress(index: 0, descriptor: user, used: user + 0x8000, available: user + 0x4000, log: 0))
            let kick = try EventFD()
            let call = try EventFD()
            try frontend.setVringKick(queue: 0, fileDescriptor: kick.descriptor)
            try frontend.setVringCall(queue: 0, fileDescriptor: call.descriptor)
            try frontend.setVringEnable(queue: 0, enabled: true)
            try kick.signal()
            usleep(20_000)
        }
    }
}

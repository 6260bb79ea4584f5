import Foundation
import GodwitTestSupport
import Testing

/// virtio-net end to end: test guests on TAPs on a bridge in a network namespace of their own.
@Suite("Integration: virtio-net on TAPs in a network namespace", .serialized, .enabled(if: TestNetwork.isAvailable))
struct NetTests {
    static let guestA = "10.77.0.2"
    static let guestB = "10.77.0.3"

    /// Waits until the guest answers one ping, so a test starts once the guest is up.
    func waitForGuest(_ net: TestNetwork, _ ip: String, tries: Int = 50) throws -> Bool {
        for _ in 0..<tries {
            if try net.run("/usr/bin/ping", ["-c", "1", "-W", "1", "-q", ip], timeout: 5).status == 0 { return true }
        }
        return false
    }

    @Test(arguments: ["poll", "irq"])
    func hostPingsTheGuestWithoutLoss(mode: String) throws {
        let net = try TestNetwork()
        defer { net.tearDown() }
        let vm = try net.startGodwit(jobs: "godwit.ip=\(Self.guestA)/24 godwit.job=net-echo,seconds=8,mode=\(mode)", nets: ["tap=\(net.taps[0])"])
        #expect(try waitForGuest(net, Self.guestA))
        let ping = try net.run("/usr/bin/ping", ["-c", "1000", "-i", "0.002", "-W", "1", "-q", Self.guestA], timeout: 30)
        #expect(ping.stdout.contains(" 0% packet loss"), "\(ping.stdout)")
        let r = vm.wait(timeout: 30)
        #expect(r.status == 0, "\(r.stdout)\n\(r.stderr)")
        let echo = try #require(r.lines(job: "net-echo").last, "\(r.stdout)")
        #expect((echo.int("icmp") ?? 0) >= 1000)
    }

    @Test func twoGuestsOnOneBridgePingEachOther() throws {
        let net = try TestNetwork(taps: 2)
        defer { net.tearDown() }
        let a = try net.startGodwit(jobs: "godwit.ip=\(Self.guestA)/24 godwit.job=net-echo,seconds=6", nets: ["tap=\(net.taps[0])"])
        #expect(try waitForGuest(net, Self.guestA))
        let b = try net.startGodwit(jobs: "godwit.ip=\(Self.guestB)/24 godwit.job=net-ping,dst=\(Self.guestA),count=200",
                                    cpus: 2, nets: ["tap=\(net.taps[1])"])
        let rb = b.wait(timeout: 60)
        let ra = a.wait(timeout: 60)
        #expect(rb.status == 0, "\(rb.stdout)\n\(rb.stderr)")
        #expect(ra.status == 0, "\(ra.stdout)\n\(ra.stderr)")
        let ping = try #require(rb.lines(job: "net-ping").last, "\(rb.stdout)")
        #expect(ping.int("received") == 200)
        #expect((ping.int("rtt_p50_us") ?? 0) > 0)
    }

    @Test func udpEchoReturnsEveryByte() throws {
        let net = try TestNetwork()
        defer { net.tearDown() }
        let vm = try net.startGodwit(jobs: "godwit.ip=\(Self.guestA)/24 godwit.job=net-echo,seconds=25", nets: ["tap=\(net.taps[0])"])
        #expect(try waitForGuest(net, Self.guestA))
        let result = try net.nettool(["udp-echo-client", "--dst", "\(Self.guestA):7", "--count", "10000",
                                      "--sizes", "1,18,64,512,1000,1472", "--timeout", "15"], timeout: 60)
        #expect(result["received"] as? Int == 10000, "\(result)")
        #expect(result["mismatched"] as? Int == 0, "\(result)")
        vm.terminate()
        #expect(vm.wait(timeout: 10).status == 7)
    }

    @Test func floodedGuestKeepsAnsweringAndMemoryStaysBounded() throws {
        let net = try TestNetwork()
        defer { net.tearDown() }
        let vm = try net.startGodwit(jobs: "godwit.ip=\(Self.guestA)/24 godwit.job=net-echo,seconds=40", nets: ["tap=\(net.taps[0])"])
        #expect(try waitForGuest(net, Self.guestA))
        let before = residentAnonymousKB(pid: vm.pid) ?? 0
        let (p, a) = net.inside("/usr/bin/python3", [TestEnvironment.repositoryRoot.appendingPathComponent("scripts/nettool.py").path,
                                                     "flood", "--dst", "\(Self.guestA):9", "--bytes", String(1 << 40), "--size", "1400",
                                                     "--seconds", "12"])
        let flood = try BackgroundProcess(p, a)
        defer { flood.terminate() }
        var peak = before
        var answered = 0, asked = 0
        while flood.isRunning && asked < 200 {
            asked += 1
            if try net.run("/usr/bin/ping", ["-c", "1", "-W", "1", "-q", Self.guestA], timeout: 5).status == 0 { answered += 1 }
            peak = max(peak, residentAnonymousKB(pid: vm.pid) ?? 0)
        }
        let sent = flood.wait(timeout: 120)
        #expect(sent.stdout.contains("\"bytes\""), "the flood ran: \(sent.stdout)\(sent.stderr)")
        // A flood at full speed fills the TAP's queue, so the host drops some pings before the
        // guest sees them (as a real NIC's would); a wedged or starved guest answers none.
        print("flood: the guest answered \(answered) of \(asked) pings, \(sent.stdout)")
        #expect(asked >= 8, "the flood lasted \(asked) pings")
        #expect(answered * 4 >= asked, "the guest answered \(answered) of \(asked) pings during the flood")
        #expect(peak - before < 32 * 1024, "VMM private memory grew from \(before) kB to \(peak) kB")
        #expect(try waitForGuest(net, Self.guestA, tries: 5), "still answering after the flood")
        vm.terminate()
        let r = vm.wait(timeout: 10)
        #expect(r.status == 7, "\(r.stderr)")
    }

    @Test func macFromTheCommandLineIsWhatTheGuestSees() throws {
        let net = try TestNetwork()
        defer { net.tearDown() }
        let vm = try net.startGodwit(jobs: "godwit.job=ready", nets: ["tap=\(net.taps[0]),mac=52:54:00:ab:cd:ef"])
        let r = vm.wait(timeout: 30)
        #expect(r.status == 0, "\(r.stdout)\n\(r.stderr)")
        #expect(r.lines(job: "ready").first?["mac"] == "52:54:00:ab:cd:ef")
        #expect(r.lines(job: "ready").first?.int("nics") == 1)
    }

    @Test func generatedMACIsStablePerTAP() throws {
        let net = try TestNetwork()
        defer { net.tearDown() }
        let first = try net.startGodwit(jobs: "godwit.job=ready", nets: ["tap=\(net.taps[0])"]).wait(timeout: 30)
        let second = try net.startGodwit(jobs: "godwit.job=ready", nets: ["tap=\(net.taps[0])"]).wait(timeout: 30)
        let mac = try #require(first.lines(job: "ready").first?["mac"], "\(first.stdout)\(first.stderr)")
        #expect(second.lines(job: "ready").first?["mac"] == mac)
        #expect(UInt8(mac.prefix(2), radix: 16).map { $0 & 0x02 != 0 && $0 & 0x01 == 0 } == true, "locally administered unicast: \(mac)")
    }

    @Test func autoTAPIsCreatedAndRemoved() throws {
        let net = try TestNetwork()
        defer { net.tearDown() }
        let vm = try net.startGodwit(jobs: "godwit.job=ready godwit.job=idle,seconds=1", nets: ["tap=auto"])
        #expect(vm.waitForOutput { $0.contains("job=ready") })
        let during = try net.run("/usr/sbin/ip", ["-o", "link", "show", "type", "tun"], timeout: 10).stdout
        let r = vm.wait(timeout: 30)
        #expect(r.status == 0, "\(r.stdout)\n\(r.stderr)")
        let after = try net.run("/usr/sbin/ip", ["-o", "link", "show", "type", "tun"], timeout: 10).stdout
        let count = { (s: String) in s.split(separator: "\n").filter { !$0.contains(net.bridge) }.count }
        #expect(count(during) == 1, "one auto TAP while running: \(during)")
        #expect(count(after) == 0, "removed at exit: \(after)")
    }

    @Test func badNetArgumentsAreRefused() throws {
        let r = try runGodwit(jobs: "", extra: ["--net", "tap=x,mac=01:00:00:00:00:01"])
        #expect(r.status == 64, "\(r.stderr)")
        #expect(r.stderr.contains("unicast"))
        let missing = try runGodwit(jobs: "", extra: ["--net", "tap=gwnosuchtap0"])
        #expect(missing.status == 2, "\(missing.stderr)")
        #expect(missing.stderr.contains("gwnosuchtap0"), "names the TAP: \(missing.stderr)")
    }
}

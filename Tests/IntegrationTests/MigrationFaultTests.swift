import Foundation
import GodwitTestSupport
import Migration
import Testing

/// A live source and target with a damaging relay between them (`MigrationProxy`): the stream is
/// corrupted, truncated, lied about or cut at the commit point, and a key holder sends hostile
/// sections. Before *commit* the guest keeps running on the source; after it, only on the target; a
/// target never runs a guest from a stream it rejected, and keeps serving the next migration.
extension MigrationTests {
    /// Waits for the source's migration to leave `sending`; returns GET /migration's answer.
    func finalStatus(_ api: APIHarness, seconds: Double = 40) throws -> [String: Any] {
        let deadline = Date().addingTimeInterval(seconds)
        while Date() < deadline {
            let status = try status(api)
            if (status["state"] as? String) != "sending" { return status }
            usleep(50_000)
        }
        return try status(api)
    }

    /// A target, a relay with `fault` in front of it, and a source running `jobs` that starts migrating
    /// through the relay once its guest beats; the caller stops all three.
    func migrateThroughRelay(_ fault: MigrationProxy.Fault, jobs: String) throws -> (Target, MigrationProxy, APIHarness) {
        let target = try Target()
        let proxy = try MigrationProxy(targetPort: target.port, fault: fault)
        let api = try source(jobs: jobs)
        #expect(try api.waitForSerial { $0.contains("seq=50") })
        let body: [String: Any] = ["destination_url": proxy.url, "downtime_ms": 100, "key": MigrationTests.key]
        #expect(try api.call("PUT", "/migration/send", body).status == 204)
        return (target, proxy, api)
    }

    /// What must hold when a migration failed before its commit point: the guest finished its job on
    /// the source, and the target never ran it.
    func expectGuestStayedOnSource(_ api: APIHarness, _ target: Target, _ label: String) throws {
        let r = api.process.wait(timeout: 60)
        #expect(r.status == 0, "\(label): the guest finished on the source: \(r.stderr)")
        #expect(try api.serialLines().last { $0.job == "done" }?["status"] == "pass")
        #expect(target.lines().isEmpty, "\(label): the target never ran the guest")
    }

    @Test(arguments: ["flipped byte", "truncated", "length beyond the limit", "length longer than the section"])
    func aDamagedStreamLeavesTheGuestOnTheSource(damage: String) throws {
        let fault: MigrationProxy.Fault
        let expected: String
        switch damage {
        case "flipped byte": fault = .flipByte(at: 200_000); expected = "failed authentication"
        case "truncated": fault = .truncate(at: 300_000); expected = "closed"
        case "length beyond the limit": fault = .growLength(section: 1, by: 1 << 40); expected = "exceeds its limit"
        default: fault = .growLength(section: 1, by: 4096); expected = "failed authentication"
        }
        let (target, proxy, api) = try migrateThroughRelay(fault, jobs: "godwit.job=idle,seconds=8")
        defer { target.stop(); proxy.stop(); api.stop() }
        let final = try finalStatus(api)
        #expect(final["state"] as? String == "cancelled", "\(damage): \(final)")
        // The target says why it threw the half-built VM away, and is ready for the next attempt.
        #expect(target.process.waitForErrorOutput(timeout: 30) { $0.contains("VM discarded") && $0.contains(expected) },
                "\(damage): \(target.process.stderrSoFar)")
        #expect(target.process.isRunning, "the target VMM survives a bad stream")
        try expectGuestStayedOnSource(api, target, damage)
    }

    /// The link dies before *ready* reaches the source (the target has restored everything and
    /// waits for *commit*): the source gives up after its ready time-out and resumes the guest; the
    /// target, without *commit*, never runs it.
    @Test func aLinkCutBeforeCommitLeavesTheGuestOnTheSource() throws {
        let (target, proxy, api) = try migrateThroughRelay(.cutBefore(kind: MigrationProxy.Kind.ready, fromSource: false),
                                                           jobs: "godwit.job=idle,seconds=16")
        defer { target.stop(); proxy.stop(); api.stop() }
        let final = try finalStatus(api)
        #expect(proxy.hasCut)
        #expect(final["state"] as? String == "cancelled", "\(final)")
        #expect((final["error"] as? String ?? "").contains("ready"), "\(final)")
        try expectGuestStayedOnSource(api, target, "cut before ready")
    }

    /// The link dies right after *commit* reached the target: the target runs the guest; the source,
    /// never hearing *done*, does not resume it and exits. The guest's heartbeats never overlap.
    @Test func aLinkCutAfterCommitLeavesTheGuestOnTheTarget() throws {
        let (target, proxy, api) = try migrateThroughRelay(.cutAfter(kind: MigrationProxy.Kind.commit, fromSource: true),
                                                           jobs: "godwit.job=idle,seconds=8")
        defer { target.stop(); proxy.stop(); api.stop() }
        let source = api.process.wait(timeout: 60)
        #expect(proxy.hasCut)
        #expect(source.status == 0, "the source ends: the guest is the target's after commit: \(source.stderr)")
        let r = target.process.wait(timeout: 60)
        #expect(r.status == 0, "\(r.stderr)")
        let before = try api.serialLines().filter { $0.job == "idle" }.compactMap { $0.int("seq") }
        let after = target.lines().filter { $0.job == "idle" }.compactMap { $0.int("seq") }
        #expect(!before.isEmpty && !after.isEmpty)
        #expect((before.max() ?? .max) < (after.min() ?? 0), "no heartbeat from both: source up to \(before.max() ?? -1), target from \(after.min() ?? -1)")
        #expect(target.lines().last { $0.job == "done" }?["status"] == "pass")
    }

    /// A sender that holds the key but lies: after a genuine `config` (recorded from a real source),
    /// sections with page numbers outside RAM, lying counts, sizes that are not pages, garbage state,
    /// or out of order. Each is refused with its reason; then a real migration to the same target works.
    @Test func aHostileSenderWithTheKeyIsRefused() throws {
        let target = try Target()
        defer { target.stop() }
        let api = try source(jobs: "godwit.job=idle,seconds=30")
        defer { api.stop() }
        #expect(try api.waitForSerial { $0.contains("seq=20") })
        // Record a genuine config: the relay lets it through and then cuts; the source cancels.
        let recorder = try MigrationProxy(targetPort: target.port, fault: .cutAfter(kind: MigrationProxy.Kind.config, fromSource: true))
        #expect(try api.call("PUT", "/migration/send", ["destination_url": recorder.url, "downtime_ms": 100, "key": MigrationTests.key]).status == 204)
        #expect(try finalStatus(api)["state"] as? String == "cancelled")
        recorder.stop()
        let config = try #require(recorder.recordedSections.first { $0.kind == MigrationProxy.Kind.config }?.payload)
        #expect(target.process.waitForErrorOutput(timeout: 30) { $0.contains("VM discarded") }, "\(target.process.stderrSoFar)")

        let key = try MigrationKey(hex: MigrationTests.key)
        let pages: UInt64 = 256 << 8  // 256 MiB of 4 KiB pages
        func entryList(_ count: UInt32, _ numbers: [UInt64], pageBytes: Int) -> [UInt8] {
            var payload = withUnsafeBytes(of: count.littleEndian) { Array($0) }
            for n in numbers {
                payload += withUnsafeBytes(of: n.littleEndian) { Array($0) }
                payload += [UInt8](repeating: 0xAB, count: pageBytes)
            }
            return payload
        }
        let attacks: [(String, MigrationSectionKind, [UInt8], String)] = [
            ("a page past RAM", .pages, entryList(1, [pages], pageBytes: 4096), "outside guest RAM"),
            ("a huge page number", .pages, entryList(1, [UInt64.max], pageBytes: 4096), "outside guest RAM"),
            ("a zero page past RAM", .zeroPages, entryList(2, [1, pages + 7], pageBytes: 0), "outside guest RAM"),
            ("a count that lies", .pages, entryList(3, [1], pageBytes: 4096), "claims 3 entries"),
            ("a short page", .pages, entryList(1, [1], pageBytes: 100), "claims 1 entries"),
            ("garbage state", .state, Array("{\"vcpus\": [1, 2".utf8), "state"),
            ("commit before ready", .commit, [], "unexpected commit"),
        ]
        for (name, kind, payload, reason) in attacks {
            let before = target.process.stderrSoFar.components(separatedBy: "VM discarded").count
            let channel = try MigrationChannel.connect(host: "127.0.0.1", port: target.port, key: key)
            try channel.send(kind: .config, payload: config)
            let answer: MigrationSection
            do { answer = try channel.receive() } catch {
                Issue.record("\(name): no answer to the config (\(error)); the target said: \(target.process.stderrSoFar.suffix(1500))")
                break
            }
            #expect(answer.kind == .progress, "\(name): the genuine config is accepted")
            try channel.send(kind: kind, payload: payload)
            // The target answers abort or closes; either way it reads nothing more of this stream.
            let reply = Result { try channel.receive() }
            if case .success(let section) = reply { #expect(section.kind == .abort, "\(name): \(section.kind)") }
            channel.close()
            #expect(target.process.waitForErrorOutput(timeout: 20) {
                $0.components(separatedBy: "VM discarded").count > before && $0.contains(reason)
            }, "\(name): \(target.process.stderrSoFar.suffix(600))")
            #expect(target.process.isRunning, "\(name): the target survives")
        }
        #expect(target.lines().isEmpty, "no hostile stream ever ran")

        // The same target still takes a real guest.
        #expect(try migrate(api, to: target).status == 204)
        do { let exited = api.process.wait(timeout: 60); #expect(exited.status == 0, "exit \(exited.status): \(exited.stderr.suffix(3000))") }
        let r = target.process.wait(timeout: 60)
        #expect(r.status == 0, "\(r.stderr.suffix(2000))")
        #expect(target.lines().last { $0.job == "done" }?["status"] == "pass")
        #expect(target.lines().first?["boot"] == (try api.serialLines()).first?["boot"])
    }
}

extension MigrationTests {
    /// `max_bandwidth_mbps` end to end: no 1-second window of the stream (measured by a relay on its
    /// way to the target) carries more than the cap plus 10%, the stream still moves at most of
    /// the cap, and the guest arrives intact.
    @Test func theBandwidthCapHoldsOnTheWire() throws {
        let target = try Target()
        defer { target.stop() }
        let proxy = try MigrationProxy(targetPort: target.port, fault: .none)
        defer { proxy.stop() }
        // 32 MiB of written pages, then idling: the first pass is ~34 MB, over 3 s at 80 Mbit/s.
        let api = try source(jobs: "godwit.job=dirty,mib=32,rate=0,seconds=1 godwit.job=idle,seconds=10")
        defer { api.stop() }
        #expect(try api.waitForSerial { $0.contains("job=idle") })
        let mbps = 80
        let body: [String: Any] = ["destination_url": proxy.url, "downtime_ms": 100, "key": MigrationTests.key, "max_bandwidth_mbps": mbps]
        #expect(try api.call("PUT", "/migration/send", body).status == 204)
        do { let exited = api.process.wait(timeout: 60); #expect(exited.status == 0, "exit \(exited.status): \(exited.stderr.suffix(3000))") }
        let r = target.process.wait(timeout: 60)
        #expect(r.status == 0, "\(r.stderr)")
        #expect(target.lines().last { $0.job == "done" }?["status"] == "pass")
        let cap = Double(mbps) * 1e6 / 8
        let (peak, average) = proxy.sourceRate(window: 1)
        let total = proxy.sourceTimeline.reduce(0) { $0 + $1.bytes }
        #expect(total > 30_000_000, "the guest's pages went through the relay: \(total) bytes")
        #expect(Double(peak) <= cap * 1.1, "peak 1-s window \(peak) bytes, cap \(Int(cap)) bytes/s")
        #expect(average >= cap * 0.7, "average \(Int(average)) bytes/s under a cap of \(Int(cap))")
    }
}

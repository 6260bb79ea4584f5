import Cluster
import Foundation
import GodwitTestSupport
import Testing

/// A throw-away single-member etcd on loopback (Debian's etcd-server), in a temporary directory.
final class EtcdServer {
    let dir: URL
    let process: BackgroundProcess
    let endpoint: String
    static var nextPort: UInt16 = 23790

    /// On loopback, or on `address` in a namespace `spawn` starts programs in.
    init(address: String = "127.0.0.1", spawn: ((String, [String]) throws -> BackgroundProcess)? = nil) throws {
        dir = try TestEnvironment.temporaryDirectory()
        EtcdServer.nextPort += 2
        let client = EtcdServer.nextPort, peer = EtcdServer.nextPort + 1
        endpoint = "http://\(address):\(client)"
        let arguments = [
            "--name", "test", "--data-dir", dir.appendingPathComponent("data").path,
            "--listen-client-urls", endpoint, "--advertise-client-urls", endpoint,
            "--listen-peer-urls", "http://\(address):\(peer)", "--initial-advertise-peer-urls", "http://\(address):\(peer)",
            "--initial-cluster", "test=http://\(address):\(peer)", "--log-level", "error"]
        process = try spawn?("/usr/bin/etcd", arguments) ?? BackgroundProcess("/usr/bin/etcd", arguments)
        let etcd = try EtcdClient(endpoint: endpoint, timeout: 2)
        // Up to a minute: once in CI (a loaded machine) every probe failed for 15 s although etcd's log
        // said it had become leader; why is not known (not reproduced here, even under CPU load), so the
        // failure now says what the last probe got.
        var lastError: (any Error)?
        let deadline = Date().addingTimeInterval(60)
        while Date() < deadline {
            do { _ = try etcd.put("/probe", "1"); return } catch { lastError = error }
            usleep(50_000)
        }
        let log = process.stderrSoFar
        stop()
        throw TestFailure("etcd did not answer within 60 s (last probe: \(lastError.map { "\($0)" } ?? "none")): \(log.suffix(1500))")
    }

    func stop() {
        process.terminate()
        _ = process.wait(timeout: 10)
        try? FileManager.default.removeItem(at: dir)
    }
}

@Suite("Interop: etcd (the owner of each VM)", .serialized,
       .enabled(if: FileManager.default.isExecutableFile(atPath: "/usr/bin/etcd"), "needs etcd (scripts/install-deps.sh installs etcd-server)"))
struct EtcdTests {
    @Test func keysTransactionsAndLeases() throws {
        let server = try EtcdServer()
        defer { server.stop() }
        let etcd = try EtcdClient(endpoint: server.endpoint)
        try etcd.put("/t/a", "one")
        let a = try #require(try etcd.get("/t/a"))
        #expect(a.value == "one" && a.version == 1)
        #expect(try etcd.get("/t/missing") == nil)
        // Compare-and-swap: only the first of two writers who read the same value wins.
        let first = try etcd.transaction(compare: [.holds("/t/a", "one")], success: [.put(key: "/t/a", value: "two", lease: nil)])
        let second = try etcd.transaction(compare: [.holds("/t/a", "one")], success: [.put(key: "/t/a", value: "three", lease: nil)],
                                          failure: [.get(key: "/t/a")])
        #expect(first.succeeded && !second.succeeded)
        #expect(second.read.first?.value == "two")
        // A key on a lease goes with it; keep-alive renews it.
        let lease = try etcd.grantLease(ttl: 2)
        try etcd.put("/t/leased", "x", lease: lease)
        #expect(try etcd.keepAlive(lease) > 0)
        #expect(try etcd.get("/t/leased")?.lease == lease)
        try etcd.revoke(lease)
        #expect(try etcd.get("/t/leased") == nil, "revoking the lease removed its key")
        #expect(try etcd.delete("/t/a") == 1)
    }

    /// One owner per VM: a claim, a hand-over on the exact previous record (the migration's commit
    /// point), a stale owner's hand-over refused, and the record gone with its owner's lease.
    @Test func oneOwnerPerVM() throws {
        let server = try EtcdServer()
        defer { server.stop() }
        let registry = OwnershipRegistry(etcd: try EtcdClient(endpoint: server.endpoint))
        let leaseA = try registry.etcd.grantLease(ttl: 30), leaseB = try registry.etcd.grantLease(ttl: 2)
        let a = try registry.claim("vm1", host: "A", lease: leaseA)
        #expect(a == OwnerRecord(host: "A", generation: 1))
        #expect(throws: ClusterError.self) { _ = try registry.claim("vm1", host: "B", lease: leaseB) }
        let b = try registry.transfer("vm1", from: a, to: "B", lease: leaseB)
        #expect(b == OwnerRecord(host: "B", generation: 2))
        #expect(try registry.owner(of: "vm1") == b)
        // A believes it still owns vm1: its hand-over is refused.
        #expect(throws: ClusterError.self) { _ = try registry.transfer("vm1", from: a, to: "C", lease: leaseA) }
        // B's agent stops renewing: the record lapses and another host can claim the VM, one generation on.
        var gone = false
        for _ in 0..<100 where !gone {
            gone = try registry.owner(of: "vm1") == nil
            if !gone { usleep(100_000) }
        }
        #expect(gone, "the owner record went with its lease")
        let c = try registry.claim("vm1", host: "C", lease: leaseA, after: b)
        #expect(c.generation == 3)
        #expect(throws: ClusterError.self) { _ = try registry.owner(of: "bad/id") }
    }

    /// Two agents race to take the same VM many times: exactly one wins each time.
    @Test func racingClaimsHaveOneWinner() throws {
        let server = try EtcdServer()
        defer { server.stop() }
        let registry = OwnershipRegistry(etcd: try EtcdClient(endpoint: server.endpoint))
        let lease = try registry.etcd.grantLease(ttl: 60)
        for round in 0..<20 {
            let vm = "race\(round)"
            let wins = LockedWins()
            DispatchQueue.concurrentPerform(iterations: 4) { i in
                if (try? registry.claim(vm, host: "host\(i)", lease: lease)) != nil { wins.add() }
            }
            #expect(wins.count == 1, "round \(round): \(wins.count) winners")
        }
    }

    @Test func aDeadEndpointIsAClearError() throws {
        let etcd = try EtcdClient(endpoint: "http://127.0.0.1:1", timeout: 1)
        #expect(throws: ClusterError.self) { _ = try etcd.get("/x") }
        #expect(throws: ClusterError.self) { _ = try EtcdClient(endpoint: "etcd.example:2379") }
    }
}

final class LockedWins: @unchecked Sendable {
    private let lock = NSLock()
    private var n = 0
    func add() { lock.lock(); n += 1; lock.unlock() }
    var count: Int { lock.lock(); defer { lock.unlock() }; return n }
}

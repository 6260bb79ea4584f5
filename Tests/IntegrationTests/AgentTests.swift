import Agent
import API
import Cluster
import Foundation
import GodwitSystem
import GodwitTestSupport
import NBD
import Testing

/// Hosts for the agent tests: network namespaces on one bridge, etcd on host 0, an agent on each other
/// host. The first hosts' devices are images served by nbdkit's error filter and mounted by nbdfuse, so
/// that they fail for real when the test creates their flag files; the others are plain images.
final class AgentCluster {
    let dir: URL
    let net: ClusterNetwork
    let etcd: EtcdServer
    var agents: [BackgroundProcess?]
    let configs: [AgentConfig]
    let devices: [String]
    /// Per failable host, the file whose existence makes its device fail.
    let errorFlags: [URL]
    var errorFlag: URL { errorFlags[0] }
    var mounts: [URL] = []
    var tools: [BackgroundProcess] = []
    static var nextSubnet = 10

    /// `hosts` agents (host names a, b, c...), each device `deviceMiB` MiB; the first `failable` hosts'
    /// devices fail on demand.
    init(hosts: Int = 2, failable: Int = 1, deviceMiB: UInt64 = 256, leaseTtlS: Int = 4) throws {
        AgentCluster.nextSubnet += 1
        dir = try TestEnvironment.temporaryDirectory()
        net = try ClusterNetwork(hosts: hosts + 1, subnet: AgentCluster.nextSubnet)
        let network = net
        do {
            etcd = try EtcdServer(address: net.addresses[0]) { try network.start(host: 0, $0, $1) }
        } catch {
            network.tearDown()
            throw error
        }
        let token = dir.appendingPathComponent("token")
        try Data("test-token-0123456789abcdef".utf8).write(to: token)
        let key = dir.appendingPathComponent("migration.key")
        try Data(MigrationTests.key.utf8).write(to: key)
        var devices: [String] = [], flags: [URL] = []
        for i in 0..<hosts {
            let name = AgentCluster.name(i)
            let image = dir.appendingPathComponent("\(name).img")
            try TestEnvironment.makeImage(at: image, size: deviceMiB << 20)
            guard i < failable else {
                devices.append(image.path)
                continue
            }
            let flag = dir.appendingPathComponent("fail-\(name)")
            let mount = dir.appendingPathComponent("mnt-\(name)")
            try FileManager.default.createDirectory(at: mount, withIntermediateDirectories: true)
            let nbdSocket = dir.appendingPathComponent("\(name)-nbd.sock").path
            tools.append(try BackgroundProcess("/usr/bin/nbdkit", ["-U", nbdSocket, "-f", "--filter=error", "file", image.path,
                                                                   "error-rate=100%", "error-file=\(flag.path)", "error=EIO"]))
            for _ in 0..<500 where !FileManager.default.fileExists(atPath: nbdSocket) { usleep(10_000) }
            tools.append(try BackgroundProcess("/usr/bin/nbdfuse", [mount.path, "--unix", nbdSocket]))
            let failable = mount.appendingPathComponent("nbd").path
            for _ in 0..<500 where !FileManager.default.fileExists(atPath: failable) { usleep(10_000) }
            devices.append(failable)
            flags.append(flag)
            mounts.append(mount)
        }
        errorFlags = flags
        self.devices = devices
        let names = (0..<hosts).map(AgentCluster.name)
        var configs: [AgentConfig] = []
        for i in 0..<hosts {
            let address = net.addresses[i + 1]
            let state = dir.appendingPathComponent("state-\(names[i])").path
            let peers = (0..<hosts).filter { $0 != i }.map { AgentConfig.Peer(host: names[$0], address: "\(network.addresses[$0 + 1]):7400") }
            configs.append(AgentConfig(host: names[i], listen: "\(address):7400", socket: dir.appendingPathComponent("\(names[i]).sock").path,
                                       stateDir: state, tokenFile: token.path, etcd: etcd.endpoint, leaseTtlS: leaseTtlS, device: devices[i],
                                       direct: i < failable, nbdListen: "\(address):10809", migrationAddress: address,
                                       migrationKeyFile: key.path, faultTimeoutMs: 50, peers: peers, godwit: TestEnvironment.godwitPath))
        }
        self.configs = configs
        agents = Array(repeating: nil, count: hosts)
        for i in 0..<hosts { try startAgent(i) }
    }

    static func name(_ i: Int) -> String { String(UnicodeScalar(UInt8(ascii: "a") + UInt8(i))) }

    func startAgent(_ i: Int) throws {
        let path = dir.appendingPathComponent("agent-\(configs[i].host).json").path
        try JSONEncoder().encode(configs[i]).write(to: URL(fileURLWithPath: path))
        unlink(configs[i].socket)
        agents[i] = try net.start(host: i + 1, TestEnvironment.godwitPath, ["agent", "--config", path])
        for _ in 0..<1000 where !FileManager.default.fileExists(atPath: configs[i].socket) { usleep(10_000) }
        guard FileManager.default.fileExists(atPath: configs[i].socket) else {
            throw TestFailure("agent \(configs[i].host) did not start: \(agents[i]?.stderrSoFar.suffix(2000) ?? "")")
        }
    }

    func client(_ i: Int) -> APIClient { APIClient(socketPath: configs[i].socket, timeout: 60) }

    func status(_ i: Int) throws -> HostStatus { try client(i).get("/host") }

    func events(_ i: Int) throws -> [AgentEvent] { try client(i).get("/events?since=0") }

    /// Waits until host `i`'s stream has `step` for `vm`.
    func waitForEvent(_ i: Int, _ step: String, vm: String? = nil, seconds: Double = 60) -> AgentEvent? {
        let deadline = Date().addingTimeInterval(seconds)
        while Date() < deadline {
            if let e = (try? events(i))?.first(where: { $0.step == step && (vm == nil || $0.vm == vm) }) { return e }
            usleep(50_000)
        }
        return nil
    }

    /// The guest's `@godwit` lines on host `i`'s serial file for `vm`.
    func serial(_ i: Int, _ vm: String) -> [GuestLine] {
        let path = configs[i].stateDir + "/vms/\(vm).serial"
        let text = (try? String(contentsOfFile: path, encoding: .utf8)) ?? ""
        return text.split(separator: "\n").compactMap { GuestLine(String($0)) }
    }

    func agentLog(_ i: Int) -> String { agents[i]?.stderrSoFar ?? "" }

    func stop() {
        for agent in agents { agent?.terminate(); _ = agent?.wait(timeout: 10) }
        // The VMMs and I/O domains outlive their agent by design: end them here.
        for config in configs {
            for file in ["state.json"] {
                guard let data = FileManager.default.contents(atPath: config.stateDir + "/" + file),
                      let json = try? JSONSerialization.jsonObject(with: data) as? [String: Any] else { continue }
                var pids: [Int32] = []
                if let p = json["iodomainPid"] as? Int { pids.append(Int32(p)) }
                for case let vm as [String: Any] in (json["vms"] as? [String: Any])?.values.map({ $0 }) ?? [] {
                    if let p = vm["vmmPid"] as? Int { pids.append(Int32(p)) }
                }
                for pid in pids where pid > 0 { kill(pid, SIGKILL) }
            }
        }
        usleep(200_000)
        etcd.stop()
        for mount in mounts { _ = try? runProcess("/usr/bin/fusermount3", ["-u", mount.path], timeout: 10) }
        for tool in tools.reversed() {
            tool.terminate()
            _ = tool.wait(timeout: 10)
        }
        net.tearDown()
        try? FileManager.default.removeItem(at: dir)
    }
}

/// The host agent end to end: hosts are network namespaces, etcd runs on one of them, the local disk
/// fails for real (nbdkit's error filter under nbdfuse), and the agents move the VM, live, to the host
/// that holds its replica.
@Suite("Multi-host: the host agent (failover with live migration, ownership in etcd)", .serialized,
       .enabled(if: TestNetwork.isAvailable, "needs /dev/kvm, the test guest and root (network namespaces)"),
       .enabled(if: FailureTools.missing.isEmpty && FileManager.default.isExecutableFile(atPath: "/usr/bin/etcd"),
                "needs nbdkit, nbdfuse, fusermount3, /dev/fuse and etcd (scripts/install-deps.sh): missing \(FailureTools.missing)"))
struct AgentTests {
    /// The issue's test: a guest on host a with a mirrored disk (replica on b) runs blk-verify; a's disk
    /// fails; the guest sees no I/O error; the agents migrate it to b, where it finishes with its disk
    /// local; b's image verifies end to end; etcd names b as the owner; both streams show every step.
    @Test func aVMWhoseDiskFailsMovesLiveToItsReplicaHost() throws {
        let cluster = try AgentCluster()
        defer { cluster.stop() }
        let jobs = "godwit.job=ready godwit.job=blk-verify,size=4194304,seconds=120 godwit.job=blk-check,size=4194304"
        let spec = VMSpec(id: "vm1", kernel: TestEnvironment.guestPath, cmdline: jobs, vcpus: 1, memoryMib: 128, diskMib: 16, replica: "b")
        let created = try cluster.client(0).send("POST", "/vms", spec, answer: VMRecord.self)
        #expect(created.state == "running" && created.owner?.host == "a", "\(created)")
        #expect(cluster.waitForEvent(0, "route-in-sync", vm: "vm1") != nil, "the replica gets in sync: \(cluster.agentLog(0).suffix(3000))")
        let deadline = Date().addingTimeInterval(30)
        while Date() < deadline && !cluster.serial(0, "vm1").contains(where: { $0.job == "ready" }) { usleep(100_000) }
        usleep(5_000_000)  // blk-verify is writing its passes
        _ = FileManager.default.createFile(atPath: cluster.errorFlag.path, contents: Data())  // a's device fails from now on

        let done = cluster.waitForEvent(0, "failover-done", vm: "vm1", seconds: 90)
        #expect(done != nil, "a: \(cluster.agentLog(0).suffix(4000))\nb: \(cluster.agentLog(1).suffix(3000))")
        // Every step is on both streams, each with its duration.
        let steps = ["fault", "replica-confirmed", "route-remote", "bandwidth-reserved", "target-prepared", "migrated", "owner-moved", "source-cleaned"]
        for i in 0..<2 {
            let events = try cluster.events(i)
            for step in steps {
                #expect(events.contains { $0.step == step && $0.vm == "vm1" && $0.host == "a" && ($0.durationMs != nil || step == "fault") },
                        "host \(i) lacks a's \(step): \(events.map(\.step))")
            }
            for step in ["state-received", "ownership-taken", "resumed", "disk-local"] {
                #expect(events.contains { $0.step == step && $0.vm == "vm1" && $0.host == "b" }, "host \(i) lacks b's \(step)")
            }
        }
        // b runs it, owns it in etcd, and a has let it go.
        let b = try cluster.status(1)
        let moved = b.vms.first { $0.spec.id == "vm1" }
        #expect(moved?.state == "running" && moved?.owner?.host == "b" && moved?.owner?.generation == 2, "\(String(describing: moved))")
        #expect(b.replicas.isEmpty, "the replica became the disk")
        #expect(try cluster.status(0).vms.isEmpty)
        let owner = try OwnershipRegistry(etcd: try EtcdClient(endpoint: cluster.etcd.endpoint)).owner(of: "vm1")
        #expect(owner == OwnerRecord(host: "b", generation: 2))

        // The job finishes on b without an I/O error, and b's disk holds the guest's last pass.
        let end = Date().addingTimeInterval(150)
        while Date() < end && !cluster.serial(1, "vm1").contains(where: { $0.job == "done" && $0["status"] != nil }) { usleep(200_000) }
        let lines = cluster.serial(1, "vm1")
        #expect(lines.first { $0.job == "blk-verify" }?["errors"] == "0", "\(lines.suffix(5))")
        #expect(lines.first { $0.job == "blk-check" }?["errors"] == "0", "\(lines.suffix(5))")
        #expect(lines.last { $0.job == "done" }?["status"] == "pass", "\(lines.suffix(5))")
        #expect(!cluster.serial(0, "vm1").contains { $0.job == "blk-verify" && $0["errors"] != "0" })
        let offset = try #require(moved?.offset)
        let report = try BlockPattern.verify(imagePath: cluster.devices[1], offset: offset, size: 4 << 20)
        #expect(report.bad.isEmpty, "\(report.bad.count) bad sectors on b, first \(report.bad.prefix(3))")
    }

    /// The source's agent is killed (SIGKILL) in the middle of the sequence and started again: it adopts
    /// its VMM and I/O domain and finishes the failover; the guest ends on b without an I/O error.
    @Test func anAgentKilledMidFailoverFinishesItAfterItsRestart() throws {
        let cluster = try AgentCluster()
        defer { cluster.stop() }
        // 192 MiB of written memory make the migration take a few seconds: the kill lands in the middle.
        let jobs = "godwit.job=dirty,mib=192,rate=0,seconds=1 godwit.job=ready godwit.job=blk-verify,size=4194304,seconds=40 godwit.job=blk-check,size=4194304"
        let spec = VMSpec(id: "vm2", kernel: TestEnvironment.guestPath, cmdline: jobs, vcpus: 1, memoryMib: 384, diskMib: 16, replica: "b")
        _ = try cluster.client(0).send("POST", "/vms", spec, answer: VMRecord.self)
        #expect(cluster.waitForEvent(0, "route-in-sync", vm: "vm2") != nil)
        let ready = Date().addingTimeInterval(30)
        while Date() < ready && !cluster.serial(0, "vm2").contains(where: { $0.job == "ready" }) { usleep(100_000) }
        usleep(3_000_000)
        _ = FileManager.default.createFile(atPath: cluster.errorFlag.path, contents: Data())
        #expect(cluster.waitForEvent(0, "target-prepared", vm: "vm2", seconds: 30) != nil, "\(cluster.agentLog(0).suffix(3000))")
        let killed = cluster.agents[0]
        if let pid = killed?.pid { kill(pid, SIGKILL) }
        _ = killed?.wait(timeout: 10)
        try cluster.startAgent(0)
        // Whichever point it was killed at, the restarted agent gets the VM to b.
        let done = cluster.waitForEvent(0, "failover-done", vm: "vm2", seconds: 90)
        #expect(done != nil, "a: \(cluster.agentLog(0).suffix(4000))\nb: \(cluster.agentLog(1).suffix(3000))")
        #expect(try cluster.status(0).vms.isEmpty)
        let moved = try cluster.status(1).vms.first { $0.spec.id == "vm2" }
        #expect(moved?.state == "running" && moved?.owner?.host == "b", "\(String(describing: moved))")
        let end = Date().addingTimeInterval(90)
        while Date() < end && !cluster.serial(1, "vm2").contains(where: { $0.job == "done" && $0["status"] != nil }) { usleep(200_000) }
        let lines = cluster.serial(1, "vm2")
        #expect(lines.first { $0.job == "blk-verify" }?["errors"] == "0", "\(lines.suffix(5))")
        #expect(lines.last { $0.job == "done" }?["status"] == "pass", "\(lines.suffix(5))")
    }

    /// Host a is cut off from etcd (and from b): its guest pauses by itself within the lease time; b
    /// sees the owner record vanish, takes the VM (generation 2) and boots it from its replica; a writer
    /// of the old generation is refused by b's export; when a comes back it finds the VM gone and
    /// stops its stale copy.
    @Test func aHostCutOffFromEtcdPausesAndItsReplicaHostTakesOver() throws {
        let cluster = try AgentCluster(leaseTtlS: 4)
        defer { cluster.stop() }
        let spec = VMSpec(id: "vm3", kernel: TestEnvironment.guestPath, cmdline: "godwit.job=ready godwit.job=idle,seconds=20",
                          vcpus: 1, memoryMib: 64, diskMib: 8, replica: "b")
        let created = try cluster.client(0).send("POST", "/vms", spec, answer: VMRecord.self)
        #expect(cluster.waitForEvent(0, "route-in-sync", vm: "vm3") != nil)
        // A writer that holds generation 1 on b's export, as a's I/O domain does.
        let stale = try NBDClient(socket: try NBDConnector.connect("tcp:\(cluster.net.addresses[2]):10809"), export: "vm3@1")
        var block = [UInt8](repeating: 0x5a, count: 4096)
        try block.withUnsafeBytes { try stale.write(at: 0, from: $0) }
        let vmm = APIClient(socketPath: created.apiSocket, timeout: 5)
        #expect(try vmm.instanceInfo().state == .running)

        try cluster.net.setLink(host: 1, up: false)  // a loses etcd and b
        let cut = Date()
        var pausedAfter: Double?
        while Date().timeIntervalSince(cut) < 15 {
            if (try? vmm.instanceInfo().state) == .paused { pausedAfter = Date().timeIntervalSince(cut); break }
            usleep(50_000)
        }
        let paused = try #require(pausedAfter, "a's guest never paused: \(cluster.agentLog(0).suffix(2000))")
        #expect(paused <= 4.5, "paused \(paused) s after the cut; the lease is 4 s")
        let taken = cluster.waitForEvent(1, "taken-over", vm: "vm3", seconds: 30)
        #expect(taken != nil, "b: \(cluster.agentLog(1).suffix(3000))")
        #expect(Date().timeIntervalSince(cut) > 4, "b waited for the lease to lapse")
        let owner = try OwnershipRegistry(etcd: try EtcdClient(endpoint: cluster.etcd.endpoint)).owner(of: "vm3")
        #expect(owner == OwnerRecord(host: "b", generation: 2))
        let booted = Date().addingTimeInterval(30)
        while Date() < booted && !cluster.serial(1, "vm3").contains(where: { $0.job == "ready" }) { usleep(100_000) }
        #expect(cluster.serial(1, "vm3").contains { $0.job == "ready" }, "the guest boots on b from the replica")
        // Generation 1 may not write any more.
        block = [UInt8](repeating: 0xa5, count: 4096)
        #expect(throws: (any Error).self) { try block.withUnsafeBytes { try stale.write(at: 0, from: $0) } }
        stale.abort()

        try cluster.net.setLink(host: 1, up: true)  // a is back: the VM is b's, a stops its copy
        #expect(cluster.waitForEvent(0, "lost", vm: "vm3", seconds: 30) != nil, "a: \(cluster.agentLog(0).suffix(3000))")
        let gone = Date().addingTimeInterval(10)
        while Date() < gone && (try? vmm.instanceInfo()) != nil { usleep(50_000) }
        #expect((try? vmm.instanceInfo()) == nil, "a's stale VMM is gone")
        #expect(try OwnershipRegistry(etcd: try EtcdClient(endpoint: cluster.etcd.endpoint)).owner(of: "vm3")?.host == "b")
    }

    /// Three hosts, four VMs, two faults at once: a and b each run two VMs mirrored to c; both devices
    /// fail together; every VM ends on c, owned once (generation 2), and finishes its job without error.
    @Test func twoFaultsAtOnceMoveFourVMsToTheHealthyHost() throws {
        let cluster = try AgentCluster(hosts: 3, failable: 2)
        defer { cluster.stop() }
        let jobs = "godwit.job=ready godwit.job=blk-verify,size=1048576,seconds=25 godwit.job=blk-check,size=1048576"
        let placement = [("vm1", 0), ("vm2", 0), ("vm3", 1), ("vm4", 1)]
        for (id, host) in placement {
            let spec = VMSpec(id: id, kernel: TestEnvironment.guestPath, cmdline: jobs, vcpus: 1, memoryMib: 64, diskMib: 4, replica: "c")
            _ = try cluster.client(host).send("POST", "/vms", spec, answer: VMRecord.self)
        }
        for (id, host) in placement {
            #expect(cluster.waitForEvent(host, "route-in-sync", vm: id) != nil, "\(id)")
        }
        let ready = Date().addingTimeInterval(30)
        while Date() < ready && !placement.allSatisfy({ cluster.serial($0.1, $0.0).contains { $0.job == "ready" } }) { usleep(100_000) }
        usleep(2_000_000)
        for flag in cluster.errorFlags { _ = FileManager.default.createFile(atPath: flag.path, contents: Data()) }
        for (id, host) in placement {
            #expect(cluster.waitForEvent(host, "failover-done", vm: id, seconds: 120) != nil,
                    "\(id): \(cluster.agentLog(host).suffix(2500))\nc: \(cluster.agentLog(2).suffix(2500))")
        }
        let registry = OwnershipRegistry(etcd: try EtcdClient(endpoint: cluster.etcd.endpoint))
        let c = try cluster.status(2)
        for (id, _) in placement {
            #expect(c.vms.first { $0.spec.id == id }?.owner == OwnerRecord(host: "c", generation: 2), "\(id) on c")
            #expect(try registry.owner(of: id) == OwnerRecord(host: "c", generation: 2))
        }
        #expect(try cluster.status(0).vms.isEmpty && cluster.status(1).vms.isEmpty, "a and b keep no copy")
        for (id, _) in placement {
            let end = Date().addingTimeInterval(90)
            while Date() < end && !cluster.serial(2, id).contains(where: { $0.job == "done" && $0["status"] != nil }) { usleep(200_000) }
            let lines = cluster.serial(2, id)
            #expect(lines.first { $0.job == "blk-verify" }?["errors"] == "0", "\(id): \(lines.suffix(4))")
            #expect(lines.last { $0.job == "done" }?["status"] == "pass", "\(id): \(lines.suffix(4))\nc: \(cluster.agentLog(2).suffix(4000))")
        }
    }

    /// The fault comes while the VM is already being moved (an operator's `failover`): the route is
    /// remote by then or switches by itself; the move completes and the guest sees no error.
    @Test func aFaultDuringTheMigrationChangesNothingForTheGuest() throws {
        let cluster = try AgentCluster()
        defer { cluster.stop() }
        let jobs = "godwit.job=dirty,mib=96,rate=0,seconds=1 godwit.job=ready godwit.job=blk-verify,size=1048576,seconds=20 godwit.job=blk-check,size=1048576"
        let spec = VMSpec(id: "vm5", kernel: TestEnvironment.guestPath, cmdline: jobs, vcpus: 1, memoryMib: 192, diskMib: 4, replica: "b")
        _ = try cluster.client(0).send("POST", "/vms", spec, answer: VMRecord.self)
        #expect(cluster.waitForEvent(0, "route-in-sync", vm: "vm5") != nil)
        // The guest is up (its 96 MiB dirtying job first: slow on a loaded host) and the agent says it runs.
        let ready = Date().addingTimeInterval(90)
        while Date() < ready && !cluster.serial(0, "vm5").contains(where: { $0.job == "ready" }) { usleep(100_000) }
        try #require(cluster.serial(0, "vm5").contains { $0.job == "ready" }, "\(cluster.serial(0, "vm5").suffix(3))")
        func failable() -> Bool {
            (try? cluster.status(0))?.vms.contains { $0.spec.id == "vm5" && $0.state == "running" && $0.replicaHost != nil } == true
        }
        while Date() < ready, !failable() { usleep(100_000) }
        #expect(failable(), "the agent reports vm5 running with its replica: \(String(describing: try? cluster.status(0).vms))")
        usleep(1_000_000)
        let asked = try cluster.client(0).request("POST", "/vms/vm5/failover", body: [])
        #expect(asked.status == 204, "\(String(decoding: asked.body, as: UTF8.self))")
        #expect(cluster.waitForEvent(0, "target-prepared", vm: "vm5", seconds: 30) != nil)
        _ = FileManager.default.createFile(atPath: cluster.errorFlag.path, contents: Data())  // mid-migration
        #expect(cluster.waitForEvent(0, "failover-done", vm: "vm5", seconds: 60) != nil, "\(cluster.agentLog(0).suffix(3000))")
        #expect(try cluster.status(1).vms.first { $0.spec.id == "vm5" }?.owner == OwnerRecord(host: "b", generation: 2))
        let end = Date().addingTimeInterval(60)
        while Date() < end && !cluster.serial(1, "vm5").contains(where: { $0.job == "done" && $0["status"] != nil }) { usleep(200_000) }
        let lines = cluster.serial(1, "vm5")
        #expect(lines.first { $0.job == "blk-verify" }?["errors"] == "0", "\(lines.suffix(4))")
        #expect(lines.last { $0.job == "done" }?["status"] == "pass", "\(lines.suffix(4))")
    }

    /// The agent restarts the host's I/O domain when it dies (kill -9) and gives it back the disk and
    /// its replica; the VMM reconnects and the guest's job passes.
    @Test func theAgentRestartsADeadIODomain() throws {
        let cluster = try AgentCluster()
        defer { cluster.stop() }
        let jobs = "godwit.job=ready godwit.job=blk-verify,size=1048576,seconds=15 godwit.job=blk-check,size=1048576"
        let spec = VMSpec(id: "vm6", kernel: TestEnvironment.guestPath, cmdline: jobs, vcpus: 1, memoryMib: 64, diskMib: 4, replica: "b")
        _ = try cluster.client(0).send("POST", "/vms", spec, answer: VMRecord.self)
        #expect(cluster.waitForEvent(0, "route-in-sync", vm: "vm6") != nil)
        let ready = Date().addingTimeInterval(30)
        while Date() < ready && !cluster.serial(0, "vm6").contains(where: { $0.job == "ready" }) { usleep(100_000) }
        usleep(2_000_000)
        let pid = try #require(try cluster.status(0).iodomainPid)
        kill(pid, SIGKILL)
        #expect(cluster.waitForEvent(0, "iodomain-restarted", seconds: 30) != nil, "\(cluster.agentLog(0).suffix(3000))")
        #expect(try cluster.status(0).iodomainPid != pid)
        // The replica comes back in sync (a fresh copy: the new domain has no bitmap).
        let synced = Date().addingTimeInterval(60)
        func syncs() -> Int { ((try? cluster.events(0)) ?? []).filter { $0.step == "route-in-sync" && $0.vm == "vm6" }.count }
        while Date() < synced && syncs() < 2 { usleep(100_000) }
        #expect(syncs() >= 2, "the replica is in sync again")
        let end = Date().addingTimeInterval(60)
        while Date() < end && !cluster.serial(0, "vm6").contains(where: { $0.job == "done" && $0["status"] != nil }) { usleep(200_000) }
        let lines = cluster.serial(0, "vm6")
        #expect(lines.first { $0.job == "blk-verify" }?["errors"] == "0", "\(lines.suffix(4))")
        #expect(lines.last { $0.job == "done" }?["status"] == "pass", "\(lines.suffix(4))")
    }

    /// Host b (the replica's host) is down when a's disk fails: the route had already dropped the
    /// silent replica, so the guest gets the I/O error as from real hardware, nothing hangs, the VM is
    /// not moved, and the events say why.
    @Test func withTheReplicaHostDownAFaultReachesTheGuest() throws {
        let cluster = try AgentCluster()
        defer { cluster.stop() }
        let jobs = "godwit.job=ready godwit.job=blk-verify,size=1048576,seconds=15"
        let spec = VMSpec(id: "vm7", kernel: TestEnvironment.guestPath, cmdline: jobs, vcpus: 1, memoryMib: 64, diskMib: 4, replica: "b")
        _ = try cluster.client(0).send("POST", "/vms", spec, answer: VMRecord.self)
        #expect(cluster.waitForEvent(0, "route-in-sync", vm: "vm7") != nil)
        let ready = Date().addingTimeInterval(30)
        while Date() < ready && !cluster.serial(0, "vm7").contains(where: { $0.job == "ready" }) { usleep(100_000) }
        try cluster.net.setLink(host: 2, up: false)  // b is gone, silently
        #expect(cluster.waitForEvent(0, "route-replica-fault", vm: "vm7", seconds: 30) != nil, "\(cluster.agentLog(0).suffix(2000))")
        _ = FileManager.default.createFile(atPath: cluster.errorFlag.path, contents: Data())
        let fault = cluster.waitForEvent(0, "route-local-fault", vm: "vm7", seconds: 30)
        #expect(fault?.detail?.contains("no replica in sync") == true, "\(String(describing: fault)) \(cluster.agentLog(0).suffix(4000))")
        let end = Date().addingTimeInterval(60)
        while Date() < end && !cluster.serial(0, "vm7").contains(where: { $0.job == "done" && $0["status"] != nil }) { usleep(200_000) }
        let lines = cluster.serial(0, "vm7")
        #expect(lines.last { $0.job == "done" }?["status"] == "fail", "the guest saw the error: \(lines.suffix(3))")
        let attempted = try cluster.events(0).contains { $0.step == "fault" }
        #expect(!attempted, "no move was attempted")
    }

    /// Peers must present the token: a request without it, with a wrong one, or with a malformed body is
    /// refused (and logged), and nothing changes.
    @Test func peersWithoutTheTokenAreRefused() throws {
        let cluster = try AgentCluster(hosts: 1)
        defer { cluster.stop() }
        let address = cluster.configs[0].listen
        func peer(_ token: String?) -> APIClient {
            let client = APIClient(name: "test", timeout: 10) { try NBDConnectorForTests.connect(address) }
            if let token { client.extraHeaders = [("Authorization", "Bearer \(token)")] }
            return client
        }
        for token in [nil, "wrong-token-0123456789", "test-token-0123456789abcdeF"] {
            let r = try peer(token).request("POST", "/replicas", body: Array("{\"vm\":\"x\",\"size\":1048576,\"from_host\":\"a\"}".utf8))
            #expect(r.status == 401, "token \(token ?? "none"): \(r.status)")
        }
        let good = peer("test-token-0123456789abcdef")
        #expect(try good.request("GET", "/host").status == 200)
        #expect(try good.request("POST", "/replicas", body: Array("{\"vm\":\"x\",\"size\":1048576,\"from_host\":\"a\",\"evil\":1}".utf8)).status == 400)
        #expect(try good.request("POST", "/replicas", body: Array("{\"vm\":\"../x\",\"size\":1048576,\"from_host\":\"a\"}".utf8)).status == 400)
        #expect(try good.request("POST", "/replicas", body: Array("not json".utf8)).status == 400)
        #expect(try cluster.status(0).replicas.isEmpty)
        #expect(cluster.agentLog(0).contains("refused POST /replicas"))
    }
}

/// A TCP connection for the tests' peer client.
enum NBDConnectorForTests {
    static func connect(_ address: String) throws -> FileDescriptor {
        try NBDConnector.connect("tcp:" + address, timeout: 5)
    }
}

import API
import Cluster
import Foundation
import GodwitSystem
import IODomain
import NBD
import VhostUser
#if canImport(Glibc)
import Glibc
#endif

/// A process the agent watches: one it started (a Foundation `Process`) or one it adopted after a
/// restart (only a pid; its parent is gone).
final class ManagedProcess: @unchecked Sendable {
    let pid: Int32
    let process: Process?

    init(_ process: Process) {
        self.process = process
        self.pid = process.processIdentifier
    }

    init(adopting pid: Int32) {
        self.process = nil
        self.pid = pid
    }

    var isRunning: Bool {
        if let process { return process.isRunning }
        return kill(pid, 0) == 0 || errno == EPERM
    }

    func signal(_ signo: Int32) { if isRunning { kill(pid, signo) } }

    /// Whether `pid` is a live godwit process (an adopted pid could have been reused).
    static func isGodwit(_ pid: Int32) -> Bool {
        guard pid > 0, kill(pid, 0) == 0 else { return false }
        guard let data = FileManager.default.contents(atPath: "/proc/\(pid)/cmdline") else { return false }
        return data.split(separator: 0).contains { String(decoding: $0, as: UTF8.self).hasSuffix("godwit") }
    }
}

/// What the agent persists so that a restarted agent adopts its VMMs and I/O domain.
struct AgentState: Codable {
    var vms: [String: VMRecord] = [:]
    var replicas: [String: ReplicaRecord] = [:]
    var iodomainPid: Int32?
    var lease: Int64?
}

/// The host agent (`godwit agent`): runs this host's I/O domain and VMMs, keeps each VM's ownership in
/// etcd under its lease, renews each VMM's fence, serves replicas for its peers over NBD, and when a
/// local disk fails, moves the VM live to the host that holds its replica.
public final class Agent: @unchecked Sendable {
    public let config: AgentConfig
    let token: String
    let godwit: String
    let lock = Condition()
    var state = AgentState()
    var events: [AgentEvent] = []
    var nextSeq: UInt64 = 1
    var iodomain: ManagedProcess?
    var vmms: [String: ManagedProcess] = [:]
    /// Route events already seen, per disk socket.
    var routeEventsSeen: [String: Int] = [:]
    /// VMs with a failover or an incoming migration under way.
    var busy: Set<String> = []
    var stopping = false
    var lastLeaseRenewal: Double = 0
    var linkMbps: [String: Double] = [:]
    /// Per replica, how many lease periods in a row its VM had no owner in etcd.
    var ownerAbsences: [String: Int] = [:]
    /// Migrations under way to each peer (they share the bandwidth reserved for migrations).
    var migrationsTo: [String: Int] = [:]
    /// VMs whose replica is being brought back.
    var resyncing: Set<String> = []

    let etcd: EtcdClient
    let registry: OwnershipRegistry
    let nbd = NBDServer(exports: [:])
    var nbdListener: FileDescriptor?
    var servers: [APIServer] = []

    var controlPath: String { config.stateDir + "/iodomain.ctl" }
    var statePath: String { config.stateDir + "/state.json" }

    public init(config: AgentConfig) throws {
        try config.validate()
        self.config = config
        let text: String
        do { text = try String(contentsOfFile: config.tokenFile, encoding: .utf8) } catch {
            throw AgentError.config("cannot read token_file \(config.tokenFile): \(error.localizedDescription)")
        }
        token = text.trimmingCharacters(in: .whitespacesAndNewlines)
        guard token.utf8.count >= 16 else { throw AgentError.config("the token in \(config.tokenFile) is shorter than 16 characters") }
        godwit = config.godwit ?? URL(fileURLWithPath: "/proc/self/exe").resolvingSymlinksInPath().path
        do { etcd = try EtcdClient(endpoint: config.etcd, timeout: 2) } catch { throw AgentError.config("etcd '\(config.etcd)': \(error)") }
        registry = OwnershipRegistry(etcd: etcd)
    }

    // MARK: Start and stop

    /// Loads the saved state, takes (or keeps) the lease, starts or adopts the I/O domain and the VMMs,
    /// and opens both APIs.
    public func start() throws {
        try FileManager.default.createDirectory(atPath: config.stateDir + "/vms", withIntermediateDirectories: true)
        if let data = FileManager.default.contents(atPath: statePath) {
            do { state = try JSONDecoder().decode(AgentState.self, from: data) } catch {
                throw AgentError.config("saved state \(statePath) is not readable: \(error)")
            }
        }
        try takeLease()
        try startNBD()
        try startOrAdoptIODomain()
        adoptVMMs()
        try startAPIs()
        for (name, body) in [("agent-lease", { @Sendable [self] in leaseLoop() }), ("agent-fence", { @Sendable [self] in fenceLoop() }),
                             ("agent-monitor", { @Sendable [self] in monitorLoop() })] as [(String, @Sendable () -> Void)] {
            let thread = Thread(block: body)
            thread.name = name
            thread.start()
        }
        event(nil, "agent-started", detail: "\(state.vms.count) VMs, \(state.replicas.count) replicas, lease \(state.lease ?? 0)")
    }

    /// Stops serving; the VMMs and the I/O domain keep running (a new agent adopts them).
    public func stop() {
        lock.withLock { stopping = true; lock.broadcast() }
        for server in servers { server.stop(timeout: 1) }
        nbd.stop()
        if let listener = nbdListener { _ = Glibc.shutdown(listener.rawValue, Int32(SHUT_RDWR)); listener.close() }
    }

    var isStopping: Bool { lock.withLock { stopping } }

    func save() {
        let snapshot = lock.withLock { state }
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys, .prettyPrinted]
        guard let data = try? encoder.encode(snapshot) else { return }
        let temporary = statePath + ".new"
        if FileManager.default.createFile(atPath: temporary, contents: data) { _ = rename(temporary, statePath) }
    }

    // MARK: Events

    /// Records a step (and prints it: an operator follows the agent's log).
    @discardableResult
    func event(_ vm: String?, _ step: String, ms: Double? = nil, detail: String? = nil, forwardTo peer: String? = nil) -> AgentEvent {
        let e: AgentEvent = lock.withLock {
            let e = AgentEvent(seq: nextSeq, time: Date().timeIntervalSince1970, host: config.host, vm: vm, step: step, durationMs: ms, detail: detail)
            nextSeq += 1
            events.append(e)
            if events.count > 4096 { events.removeFirst(events.count - 4096) }
            lock.broadcast()
            return e
        }
        var line = "godwit agent \(config.host): \(vm.map { "\($0): " } ?? "")\(step)"
        if let ms { line += String(format: " (%.1f ms)", ms) }
        if let detail { line += ": \(detail)" }
        FileHandle.standardError.write(Data((line + "\n").utf8))
        if let peer, let client = try? peerClient(peer) {
            _ = try? client.call("POST", "/events", e)
        }
        return e
    }

    /// A peer's step, added to this agent's stream with the peer's host name.
    func record(peerEvent: AgentEvent) {
        lock.withLock {
            var e = peerEvent
            e.seq = nextSeq
            nextSeq += 1
            events.append(e)
            lock.broadcast()
        }
    }

    /// Events after `since`, waiting up to `wait` seconds for one when there is none yet.
    func events(since: UInt64, wait: Double) -> [AgentEvent] {
        lock.withLock {
            _ = lock.wait(until: { events.last.map { $0.seq > since } ?? false }, timeout: wait)
            return events.filter { $0.seq > since }
        }
    }

    // MARK: etcd

    func takeLease() throws {
        if let old = state.lease, let ttl = try? etcd.keepAlive(old), ttl > 0 {
            lastLeaseRenewal = monotonicSeconds()
            return
        }
        do {
            let lease = try etcd.grantLease(ttl: config.leaseTtlS)
            lock.withLock {
                state.lease = lease
                lastLeaseRenewal = monotonicSeconds()
            }
        } catch { throw AgentError.failed("etcd \(config.etcd): cannot grant a lease: \(error)") }
        save()
    }

    var lease: Int64 { lock.withLock { state.lease ?? 0 } }

    var etcdHealthy: Bool { lock.withLock { monotonicSeconds() - lastLeaseRenewal < Double(config.leaseTtlS) / 2 } }

    /// Renews the lease a few times per time to live. If it lapsed (etcd lost us for longer than its
    /// time to live), the owner records went with it: a new lease, and each VM claimed again only if
    /// nobody else took it; one that another host took stays paused and is stopped here.
    func leaseLoop() {
        let period = Double(config.leaseTtlS) / 4
        while !isStopping {
            let lease = self.lease
            if let ttl = try? etcd.keepAlive(lease) {
                if ttl > 0 {
                    lock.withLock { lastLeaseRenewal = monotonicSeconds() }
                    watchReplicas()
                } else {
                    event(nil, "lease-lapsed", detail: "lease \(lease) expired; reclaiming the VMs nobody took")
                    reclaimAfterLapse()
                }
            }
            lock.withLock { _ = lock.wait(until: { stopping }, timeout: period) }
        }
    }

    func reclaimAfterLapse() {
        guard let fresh = try? etcd.grantLease(ttl: config.leaseTtlS) else { return }
        lock.withLock {
            state.lease = fresh
            lastLeaseRenewal = monotonicSeconds()
        }
        save()
        for record in lock.withLock({ Array(state.vms.values) }) where record.state == "running" {
            do {
                let owner = try registry.claim(record.spec.id, host: config.host, lease: fresh, after: record.owner)
                lock.withLock { state.vms[record.spec.id]?.owner = owner }
                _ = try? vmmClient(record).resume()
                event(record.spec.id, "reclaimed", detail: "owner generation \(owner.generation)")
            } catch {
                event(record.spec.id, "lost", detail: "another host owns it now (\(error)); stopping the stale copy")
                stopVMM(record.spec.id)
                lock.withLock { state.vms[record.spec.id]?.state = "gone" }
            }
        }
        save()
    }

    /// Moves every running VMM's fence deadline (half the lease) while the lease is being renewed; when
    /// it is not, the VMMs pause themselves.
    func fenceLoop() {
        let deadlineMs = config.leaseTtlS * 500
        let period = Double(config.leaseTtlS) / 8
        while !isStopping {
            if etcdHealthy {
                for record in lock.withLock({ Array(state.vms.values) }) where record.state == "running" || record.state == "migrating" {
                    _ = try? vmmClient(record).setFence(FenceParams(deadlineMs: deadlineMs))
                }
            }
            lock.withLock { _ = lock.wait(until: { stopping }, timeout: period) }
        }
    }

    // MARK: Processes

    func spawn(_ arguments: [String], log: String, environment extra: [String: String] = [:]) throws -> ManagedProcess {
        let process = Process()
        process.executableURL = URL(fileURLWithPath: godwit)
        process.arguments = arguments
        var environment = ProcessInfo.processInfo.environment
        for (k, v) in extra { environment[k] = v }
        process.environment = environment
        if !FileManager.default.fileExists(atPath: log) { _ = FileManager.default.createFile(atPath: log, contents: nil) }
        guard let handle = FileHandle(forWritingAtPath: log) else { throw AgentError.failed("cannot open log \(log)") }
        handle.seekToEndOfFile()
        process.standardOutput = handle
        process.standardError = handle
        process.standardInput = FileHandle.nullDevice
        do { try process.run() } catch { throw AgentError.failed("cannot start \(godwit) \(arguments.first ?? ""): \(error)") }
        return ManagedProcess(process)
    }

    func waitForFile(_ path: String, seconds: Double) -> Bool {
        let deadline = monotonicSeconds() + seconds
        while monotonicSeconds() < deadline {
            if FileManager.default.fileExists(atPath: path) { return true }
            usleep(10_000)
        }
        return false
    }

    func startOrAdoptIODomain() throws {
        if let pid = state.iodomainPid, ManagedProcess.isGodwit(pid), (try? ControlClient(path: controlPath).call(ControlRequest(op: .list))) != nil {
            lock.withLock { iodomain = ManagedProcess(adopting: pid) }
            event(nil, "iodomain-adopted", detail: "pid \(pid)")
            return
        }
        try startIODomain()
    }

    /// Starts the host's I/O domain (sandboxed) and gives it back every disk and replica it served.
    func startIODomain() throws {
        unlink(controlPath)
        var arguments = ["iodomain", "--blk", config.device, "--control", controlPath]
        if config.direct { arguments.append("--direct") }
        let process = try spawn(arguments, log: config.stateDir + "/iodomain.log", environment: ["GODWIT_SANDBOX_NAMESPACES": "1"])
        guard waitForFile(controlPath, seconds: 10) else {
            process.signal(SIGKILL)
            throw AgentError.failed("the I/O domain did not open its control socket; see \(config.stateDir)/iodomain.log")
        }
        lock.withLock {
            iodomain = process
            state.iodomainPid = process.pid
            routeEventsSeen = [:]
        }
        save()
        for record in lock.withLock({ Array(state.vms.values) }) where record.state == "running" || record.state == "incoming" {
            do {
                try addDisk(record)
                if let replica = record.replicaHost, record.state == "running" {
                    try attachReplica(record, on: replica)
                }
            } catch {
                event(record.spec.id, "disk-restore-failed", detail: "\(error)")
            }
        }
    }

    @discardableResult
    func control(_ request: ControlRequest, descriptors: [FileDescriptor] = []) throws -> ControlResponse {
        try ControlClient(path: controlPath).call(request, descriptors: descriptors)
    }

    func addDisk(_ record: VMRecord) throws {
        let listening = try ControlClient.listeningSocket(path: record.diskSocket)
        defer { listening.close() }
        try control(ControlRequest(op: .addBlock, socket: record.diskSocket, offset: record.offset, size: record.size,
                                   faultTimeoutMs: config.faultTimeoutMs), descriptors: [listening])
    }

    func adoptVMMs() {
        for record in lock.withLock({ Array(state.vms.values) }) {
            if ManagedProcess.isGodwit(record.vmmPid) {
                lock.withLock { vmms[record.spec.id] = ManagedProcess(adopting: record.vmmPid) }
                event(record.spec.id, "vmm-adopted", detail: "pid \(record.vmmPid)")
                if record.state == "migrating" || record.state == "incoming" {
                    // The sequence this agent ran died with it: the VMM's own state says where it stands.
                    resumeInterruptedSequence(record)
                }
            } else if record.state == "migrating", let target = record.replicaHost, (try? registry.owner(of: record.spec.id))??.host == target {
                // The migration committed while the agent was away: finish the source's half.
                do { try finishSource(record.spec.id, record, target: target, since: monotonicSeconds()) } catch {
                    event(record.spec.id, "cleanup-failed", detail: "\(error)")
                }
            } else if record.state != "gone" {
                lock.withLock { state.vms[record.spec.id]?.state = "gone" }
                event(record.spec.id, "vmm-gone", detail: "its VMM (pid \(record.vmmPid)) ended while the agent was away")
            }
        }
        save()
    }

    func vmmClient(_ record: VMRecord) -> APIClient { APIClient(socketPath: record.apiSocket, timeout: 10) }

    func stopVMM(_ id: String) {
        let process = lock.withLock { vmms[id] }
        process?.signal(SIGTERM)
        for _ in 0..<200 where process?.isRunning == true { usleep(10_000) }
        process?.signal(SIGKILL)
    }

    /// Watches the I/O domain (restarted when it dies), the VMMs, and the disks' route events (a local
    /// fault starts the failover).
    func monitorLoop() {
        while !isStopping {
            if let domain = lock.withLock({ iodomain }), !domain.isRunning {
                event(nil, "iodomain-exited", detail: "pid \(domain.pid); restarting it")
                let started = monotonicSeconds()
                // The dead domain's server (in its namespaces) may still hold the VMs' sockets for a few ms.
                let sockets = lock.withLock { state.vms.values.map(\.diskSocket) }
                VhostUserListener.waitUntilUnserved(sockets, timeout: 2)
                do {
                    try startIODomain()
                    event(nil, "iodomain-restarted", ms: (monotonicSeconds() - started) * 1000)
                } catch {
                    event(nil, "iodomain-restart-failed", detail: "\(error)")
                    usleep(500_000)
                }
            }
            for (id, process) in lock.withLock({ vmms }) where !process.isRunning {
                let record: VMRecord? = lock.withLock {
                    vmms[id] = nil
                    guard let record = state.vms[id], record.state == "running" || record.state == "starting" else { return nil }
                    state.vms[id]?.state = "gone"
                    return record
                }
                if let record {
                    let status = process.process.map { Int($0.terminationStatus) }
                    event(id, "vmm-exited", detail: "status \(status.map(String.init) ?? "?")")
                    _ = try? control(ControlRequest(op: .remove, socket: record.diskSocket))
                    save()
                }
            }
            pollRouteEvents()
            lock.withLock { _ = lock.wait(until: { stopping }, timeout: 0.05) }
        }
    }

    func pollRouteEvents() {
        guard let response = try? control(ControlRequest(op: .events)), let all = response.events else { return }
        var bySocket: [String: [ControlEvent]] = [:]
        for e in all { bySocket[e.socket, default: []].append(e) }
        for (socket, list) in bySocket {
            let fresh: [ControlEvent] = lock.withLock {
                let seen = routeEventsSeen[socket] ?? 0
                routeEventsSeen[socket] = list.count
                return list.count > seen ? Array(list[seen...]) : []
            }
            guard let record = lock.withLock({ state.vms.values.first { $0.diskSocket == socket } }) else { continue }
            for e in fresh {
                let detail = "\(e.event.kind) route=\(e.event.route.rawValue)" + (e.event.reason.map { ": \($0)" } ?? "")
                event(record.spec.id, "route-\(e.event.kind)", ms: e.event.milliseconds, detail: detail)
                if e.event.kind == "failover", record.state == "running", record.replicaHost != nil {
                    startFailover(record.spec.id, reason: e.event.reason ?? "local device fault")
                }
                if e.event.kind == "replica-fault" || e.event.kind == "sync-failed", record.state == "running", record.replicaHost != nil {
                    startResync(record)
                }
            }
        }
    }

    /// A replica that dropped out (it did not answer in time, its host restarted) is brought back: the
    /// route copies only what it missed. Tried every two seconds while the local disk is healthy.
    func startResync(_ record: VMRecord) {
        let id = record.spec.id
        guard lock.withLock({ resyncing.insert(id).inserted }) else { return }
        detachThread(name: "agent-resync") { [self] in
            defer { lock.withLock { _ = resyncing.remove(id) } }
            for attempt in 1...30 {
                lock.withLock { _ = lock.wait(until: { stopping }, timeout: 2) }
                guard !isStopping, let current = lock.withLock({ state.vms[id] }), current.state == "running", current.replicaHost != nil else { return }
                guard let device = (try? control(ControlRequest(op: .list)))?.devices?.first(where: { $0.socket == current.diskSocket }),
                      let route = device.route else { continue }
                if route.localFailed || (route.replicaInSync && route.route == .mirror) { return }
                if route.replica {
                    if (try? control(ControlRequest(op: .resync, socket: current.diskSocket))) != nil {
                        event(id, "replica-resync", detail: "attempt \(attempt)")
                        return
                    }
                } else if let host = current.replicaHost, (try? attachReplica(current, on: host, resync: true)) != nil {
                    event(id, "replica-reattached", detail: "attempt \(attempt)")
                    return
                }
            }
        }
    }

    // MARK: Replicas (this host keeping a peer's VM's disk)

    func startNBD() throws {
        let listener: FileDescriptor
        do { listener = try NBDListener.open(tcp: config.nbdListen, unix: nil) } catch {
            throw AgentError.failed("NBD listen \(config.nbdListen): \(error)")
        }
        nbdListener = listener
        for replica in state.replicas.values { try exportReplica(replica) }
        let server = nbd
        detachThread(name: "agent-nbd") { server.serve(listener: listener) }
    }

    func exportReplica(_ replica: ReplicaRecord) throws {
        let fd: FileDescriptor
        do { fd = try FileDescriptor.open(config.device, flags: O_RDWR | O_CLOEXEC) } catch { throw AgentError.failed("open \(config.device): \(error)") }
        do {
            try nbd.addExport(replica.vm, storage: try NBDFileStorage(file: fd, offset: replica.offset, size: replica.size, readOnly: false))
        } catch { throw AgentError.failed("export \(replica.vm): \(error)") }
    }

    /// Keeps a replica of a peer's VM disk: a slice of this host's device, exported as the VM's id.
    func createReplica(_ request: ReplicaRequest) throws -> ReplicaRecord {
        guard AgentConfig.isName(request.vm), AgentConfig.isName(request.fromHost) else { throw AgentError.badRequest("bad VM or host name") }
        guard request.size > 0, request.size <= 1 << 40, request.size % 512 == 0 else { throw AgentError.badRequest("size \(request.size) is not a multiple of 512 up to 1 TiB") }
        if let existing = lock.withLock({ state.replicas[request.vm] }) {
            guard existing.size == request.size else { throw AgentError.conflict("a replica of \(request.vm) with another size exists") }
            return existing
        }
        guard lock.withLock({ state.vms[request.vm] == nil }) else { throw AgentError.conflict("\(request.vm) runs here") }
        let offset = try allocate(request.size)
        if let spec = request.spec {
            try spec.validate()
            guard spec.id == request.vm, UInt64(spec.diskMib) << 20 == request.size else { throw AgentError.badRequest("the spec is not the replica's VM") }
        }
        let record = ReplicaRecord(vm: request.vm, fromHost: request.fromHost, offset: offset, size: request.size, nbd: "tcp:\(config.nbdListen)",
                                   spec: request.spec, generation: request.generation)
        try exportReplica(record)
        lock.withLock { state.replicas[request.vm] = record }
        save()
        event(request.vm, "replica-created", detail: "for \(request.fromHost): \(request.size >> 20) MiB at offset \(offset)")
        return record
    }

    func deleteReplica(_ vm: String) throws {
        guard lock.withLock({ state.replicas.removeValue(forKey: vm) }) != nil else { throw AgentError.notFound("no replica of \(vm)") }
        nbd.removeExport(vm)
        save()
        event(vm, "replica-deleted")
    }

    /// The first gap of `size` bytes (1 MiB aligned) in the device after every VM disk and replica.
    func allocate(_ size: UInt64) throws -> UInt64 {
        let used: [(UInt64, UInt64)] = lock.withLock {
            (state.vms.values.filter { $0.state != "gone" }.map { ($0.offset, $0.size) } + state.replicas.values.map { ($0.offset, $0.size) })
                .sorted { $0.0 < $1.0 }
        }
        var candidate: UInt64 = 0
        for (offset, length) in used {
            if candidate + size <= offset { break }
            candidate = max(candidate, (offset + length + 0xFFFFF) & ~0xFFFFF)
        }
        var st = stat()
        guard stat(config.device, &st) == 0 else { throw AgentError.failed("stat \(config.device): errno \(errno)") }
        var capacity = UInt64(st.st_size)
        if (st.st_mode & S_IFMT) == S_IFBLK, let fd = try? FileDescriptor.open(config.device, flags: O_RDONLY | O_CLOEXEC) {
            capacity = UInt64(max(0, lseek(fd.rawValue, 0, SEEK_END)))
            fd.close()
        }
        guard candidate + size <= capacity else {
            throw AgentError.conflict("no room for \(size >> 20) MiB on \(config.device) (\(capacity >> 20) MiB, next free offset \(candidate))")
        }
        return candidate
    }

    // MARK: Peers

    func peer(_ host: String) throws -> AgentConfig.Peer {
        guard let p = config.peers.first(where: { $0.host == host }) else { throw AgentError.badRequest("'\(host)' is not a peer of \(config.host)") }
        return p
    }

    func peerClient(_ host: String, timeout: Double = 30) throws -> APIClient {
        let address = try peer(host).address
        let client = APIClient(name: "agent \(host) at \(address)", timeout: timeout) {
            do { return try NBDConnector.connect("tcp:" + address, timeout: 5) } catch { throw AgentError.failed("cannot reach \(host) at \(address): \(error)") }
        }
        client.extraHeaders = [("Authorization", "Bearer \(token)")]
        return client
    }

    /// Attaches `record`'s disk to a replica on `host`: the peer makes the replica, this agent dials its
    /// NBD server (the I/O domain never dials out) and hands the connection over.
    func attachReplica(_ record: VMRecord, on host: String, resync: Bool = false) throws {
        let request = ReplicaRequest(vm: record.spec.id, size: record.size, fromHost: config.host, spec: record.spec, generation: record.owner?.generation)
        let replica = try peerClient(host).send("POST", "/replicas", request, answer: ReplicaRecord.self)
        let connection: FileDescriptor
        do { connection = try NBDConnector.connect(replica.nbd) } catch { throw AgentError.failed("NBD \(replica.nbd): \(error)") }
        defer { connection.close() }
        let generation = record.owner?.generation ?? 0
        try control(ControlRequest(op: .attachReplica, socket: record.diskSocket, export: "\(record.spec.id)@\(generation)", resync: resync),
                    descriptors: [connection])
        lock.withLock { state.vms[record.spec.id]?.replicaHost = host }
        save()
    }

    /// The link to `host` in Mbit/s: an 8 MiB answer from its agent, timed.
    func measureLink(to host: String) -> Double {
        let started = monotonicSeconds()
        guard let client = try? peerClient(host), let response = try? client.request("GET", "/probe"), response.status == 200 else { return 0 }
        let seconds = max(monotonicSeconds() - started, 1e-6)
        return Double(response.body.count) * 8 / seconds / 1e6
    }

    // MARK: VMs

    /// Runs a new VM here: claims it in etcd, carves its disk, attaches the replica, starts the VMM.
    public func createVM(_ spec: VMSpec) throws -> VMRecord {
        try spec.validate()
        if let replica = spec.replica { _ = try peer(replica) }
        let taken: Bool = lock.withLock {
            if state.vms[spec.id].map({ $0.state != "gone" }) == true || busy.contains(spec.id) { return true }
            busy.insert(spec.id)
            return false
        }
        guard !taken else { throw AgentError.conflict("\(spec.id) exists here") }
        defer { lock.withLock { _ = busy.remove(spec.id) } }
        let owner: OwnerRecord
        do { owner = try registry.claim(spec.id, host: config.host, lease: lease, after: try registry.owner(of: spec.id)) } catch {
            throw AgentError.conflict("cannot take \(spec.id) in etcd: \(error)")
        }
        let size = UInt64(spec.diskMib) << 20
        let dir = config.stateDir + "/vms/"
        var record = VMRecord(spec: spec, state: "starting", owner: owner, vmmPid: 0, apiSocket: dir + spec.id + ".api",
                              diskSocket: dir + spec.id + ".disk", offset: try allocate(size), size: size, replicaHost: nil, error: nil)
        lock.withLock { state.vms[spec.id] = record }
        do {
            try addDisk(record)
            if let replica = spec.replica {
                try attachReplica(record, on: replica)
                record.replicaHost = replica
            }
            let vmm = try boot(&record)
            lock.withLock {
                vmms[spec.id] = vmm
                state.vms[spec.id] = record
            }
            save()
            event(spec.id, "vm-started", detail: "owner generation \(owner.generation), disk \(spec.diskMib) MiB at \(record.offset)"
                  + (record.replicaHost.map { ", replica on \($0)" } ?? ""))
            return record
        } catch {
            stopVMM(spec.id)
            _ = try? control(ControlRequest(op: .remove, socket: record.diskSocket))
            _ = try? registry.release(spec.id, owner: owner)
            lock.withLock { state.vms[spec.id] = nil }
            save()
            throw error
        }
    }

    /// Starts a VMM for `record`, configures the VM (kernel, machine, the disk on this host's I/O domain,
    /// the fence) and boots it; `record` is then running.
    func boot(_ record: inout VMRecord) throws -> ManagedProcess {
        let spec = record.spec
        let vmm = try startVMM(&record)
        let client = vmmClient(record)
        try client.putBootSource(BootSource(kernelImagePath: spec.kernel, bootArgs: spec.cmdline))
        try client.putMachineConfig(MachineConfiguration(vcpuCount: spec.vcpus, memSizeMib: spec.memoryMib))
        try client.putDrive(Drive(driveId: "disk", isRootDevice: true, socket: record.diskSocket))
        try client.setFence(FenceParams(deadlineMs: config.leaseTtlS * 500))
        try client.instanceStart()
        record.state = "running"
        return vmm
    }

    /// Ends a VM here: its VMM stopped, its disk removed from the I/O domain, its record dropped.
    func discard(_ id: String, diskSocket: String) {
        stopVMM(id)
        _ = try? control(ControlRequest(op: .remove, socket: diskSocket))
        lock.withLock {
            state.vms[id] = nil
            vmms[id] = nil
        }
        save()
    }

    /// Starts a VMM with an API socket for `record` (its serial console to a file beside it).
    func startVMM(_ record: inout VMRecord) throws -> ManagedProcess {
        unlink(record.apiSocket)
        let base = config.stateDir + "/vms/" + record.spec.id
        let vmm = try spawn(["vm", "--api-sock", record.apiSocket, "--migration-key-file", config.migrationKeyFile, "--serial", base + ".serial"],
                            log: base + ".log")
        record.vmmPid = vmm.pid
        lock.withLock { vmms[record.spec.id] = vmm }
        // The socket file appears at bind, a moment before the VMM listens: wait for an answer.
        let deadline = monotonicSeconds() + 10
        let probe = APIClient(socketPath: record.apiSocket, timeout: 2)
        while (try? probe.instanceInfo()) == nil {
            guard monotonicSeconds() < deadline, vmm.isRunning else {
                vmm.signal(SIGKILL)
                throw AgentError.failed("the VMM for \(record.spec.id) did not answer on its API socket; see \(base).log")
            }
            usleep(10_000)
        }
        probe.close()
        return vmm
    }

    /// Stops a VM here and gives up its ownership, disk and replica.
    public func deleteVM(_ id: String) throws {
        guard let record = lock.withLock({ state.vms[id] }) else { throw AgentError.notFound("no VM \(id) here") }
        stopVMM(id)
        _ = try? control(ControlRequest(op: .remove, socket: record.diskSocket))
        // The replica goes first: its host would take over a VM whose owner vanished while it still had one.
        if let replica = record.replicaHost { _ = try? peerClient(replica).request("DELETE", "/replicas/\(id)") }
        if let owner = record.owner { _ = try? registry.release(id, owner: owner) }
        lock.withLock {
            state.vms[id] = nil
            vmms[id] = nil
        }
        save()
        event(id, "vm-deleted")
    }

    public var status: HostStatus {
        lock.withLock {
            HostStatus(host: config.host, vms: state.vms.values.sorted { $0.spec.id < $1.spec.id },
                       replicas: state.replicas.values.sorted { $0.vm < $1.vm }, iodomainPid: iodomain?.pid,
                       etcdHealthy: monotonicSeconds() - lastLeaseRenewal < Double(config.leaseTtlS) / 2, peers: config.peers.map(\.host))
        }
    }

    func startAPIs() throws {
        let unixServer = APIServer(socketPath: config.socket, handler: AgentRouter(agent: self, requireToken: false))
        try unixServer.start()
        chmod(config.socket, 0o600)
        let listener: FileDescriptor
        do { listener = try NBDListener.open(tcp: config.listen, unix: nil) } catch { throw AgentError.failed("listen \(config.listen): \(error)") }
        let tcpServer = APIServer(listening: listener, handler: AgentRouter(agent: self, requireToken: true))
        try tcpServer.start()
        servers = [unixServer, tcpServer]
    }
}

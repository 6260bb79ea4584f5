import API
import Cluster
import Foundation
import GodwitSystem
import IODomain
#if canImport(Glibc)
import Glibc
#endif

/// The failover sequence (DESIGN.md, "Failover", steps 2-7): the source agent's half runs on a thread
/// of its own when the I/O domain reports that a disk failed over to its replica; the target's half
/// runs when the source asks it to prepare an incoming VMM.
extension Agent {
    func startFailover(_ id: String, reason: String, attempt: Int = 1) {
        let started: Bool = lock.withLock {
            guard !busy.contains(id), state.vms[id]?.state == "running" else { return false }
            busy.insert(id)
            state.vms[id]?.state = "migrating"
            return true
        }
        guard started else { return }
        save()
        detachThread(name: "agent-failover") { [self] in
            let moved: Bool
            do {
                defer { lock.withLock { _ = busy.remove(id) } }
                moved = failover(id, reason: reason)
            }
            // The local disk is still dead: try again, a little later each time, while the guest runs here.
            if !moved && attempt < 5 && !isStopping && lock.withLock({ state.vms[id]?.state == "running" && vmms[id]?.isRunning == true }) {
                usleep(useconds_t(500_000 * attempt))
                startFailover(id, reason: "retry \(attempt + 1) after: \(reason)", attempt: attempt + 1)
            }
        }
    }

    /// Times one step and reports it on this agent's stream and the peer's.
    func step<T>(_ id: String, _ name: String, peer: String?, detail: ((T) -> String?)? = nil, _ body: () throws -> T) throws -> T {
        let started = monotonicSeconds()
        do {
            let value = try body()
            event(id, name, ms: (monotonicSeconds() - started) * 1000, detail: detail?(value), forwardTo: peer)
            return value
        } catch {
            event(id, name + "-failed", ms: (monotonicSeconds() - started) * 1000, detail: "\(error)", forwardTo: peer)
            throw error
        }
    }

    /// The source's half; true when the VM runs on the target now.
    @discardableResult
    func failover(_ id: String, reason: String) -> Bool {
        let t0 = monotonicSeconds()
        guard let record = lock.withLock({ state.vms[id] }), let target = record.replicaHost, let owner = record.owner else { return false }
        event(id, "fault", detail: reason, forwardTo: target)
        do {
            let client = try peerClient(target)
            _ = try step(id, "replica-confirmed", peer: target, detail: { (r: ReplicaRecord) in "\(r.size >> 20) MiB on \(target)" }) {
                try client.get("/replicas/\(id)") as ReplicaRecord
            }
            _ = try step(id, "route-remote", peer: target) { () -> Void in
                let list = try control(ControlRequest(op: .list))
                if list.devices?.first(where: { $0.socket == record.diskSocket })?.route?.route != .remote {
                    try control(ControlRequest(op: .route, socket: record.diskSocket, route: .remote))
                }
            }
            // The migrations to one host share three quarters of the link; the guests' remote I/O keeps the rest.
            lock.withLock { migrationsTo[target, default: 0] += 1 }
            defer { lock.withLock { migrationsTo[target, default: 1] -= 1 } }
            let cap: Int = try step(id, "bandwidth-reserved", peer: target, detail: { (cap: Int) in "migration capped at \(cap) Mbit/s" }) {
                let measured = lock.withLock { linkMbps[target] } ?? measureLink(to: target)
                let sharing = lock.withLock { () -> Int in
                    linkMbps[target] = measured
                    return max(1, migrationsTo[target] ?? 1)
                }
                return max(8, Int(measured * 0.75) / sharing)
            }
            let incoming = try step(id, "target-prepared", peer: target, detail: { (a: IncomingAnswer) in "incoming VMM on \(a.url), disk local there" }) {
                try peerClient(target, timeout: 60).send("POST", "/incoming", IncomingRequest(spec: record.spec, owner: owner, fromHost: config.host),
                                                         answer: IncomingAnswer.self)
            }
            let vmm = vmmClient(record)
            let outcome = try step(id, "migrated", peer: target, detail: { (s: MigrationStatus) in
                String(format: "downtime %.1f ms, %d bytes", s.downtimeMs ?? -1, s.bytesSent)
            }) { () -> MigrationStatus in
                try vmm.sendMigration(MigrationSendParams(destinationUrl: incoming.url, downtimeMs: 50, timeoutS: 60, maxBandwidthMbps: cap))
                let deadline = monotonicSeconds() + 90
                while monotonicSeconds() < deadline {
                    let status: MigrationStatus
                    do { status = try vmm.migrationStatus() } catch {
                        // The VMM ends right after a completed migration (its API socket goes first): its
                        // last answer is lost. The owner record in etcd says next whether it committed.
                        for _ in 0..<500 where lock.withLock({ vmms[id]?.isRunning }) == true { usleep(10_000) }
                        if lock.withLock({ vmms[id]?.isRunning }) != true {
                            var final = MigrationStatus(state: "completed")
                            final.downtimeMs = lastReportedDowntime(id)
                            return final
                        }
                        throw error
                    }
                    if status.state == "completed" { return status }
                    if status.state == "cancelled" || status.state == "failed" { throw AgentError.failed("migration \(status.state): \(status.error ?? "")") }
                    usleep(20_000)
                }
                throw AgentError.failed("the migration did not end within 90 s")
            }
            _ = outcome
            try finishSource(id, record, target: target, since: t0)
            return true
        } catch {
            // Before the commit point the guest keeps running here on the replica (route remote).
            lock.withLock { if state.vms[id]?.state == "migrating" { state.vms[id]?.state = "running" } }
            save()
            _ = try? peerClient(target).request("DELETE", "/incoming/\(id)")
            event(id, "failover-stopped", ms: (monotonicSeconds() - t0) * 1000,
                  detail: "\(error); the guest keeps running here on its replica", forwardTo: target)
            return false
        }
    }

    /// The downtime the VMM printed when its migration completed (its log is the last word of a VMM that
    /// ended before its status could be read).
    func lastReportedDowntime(_ id: String) -> Double? {
        guard let text = try? String(contentsOfFile: config.stateDir + "/vms/\(id).log", encoding: .utf8),
              let line = text.split(separator: "\n").last(where: { $0.contains("migration: to ") && $0.contains("completed: downtime ") }),
              let range = line.range(of: "completed: downtime ") else { return nil }
        return Double(line[range.upperBound...].prefix { $0.isNumber || $0 == "." })
    }

    /// After the migration: the target owns the VM in etcd, the source's VMM has ended, its disk goes.
    func finishSource(_ id: String, _ record: VMRecord, target: String, since t0: Double) throws {
        _ = try step(id, "owner-moved", peer: target, detail: { (o: OwnerRecord) in "etcd: \(o.host) generation \(o.generation)" }) { () -> OwnerRecord in
            let deadline = monotonicSeconds() + 20
            while monotonicSeconds() < deadline {
                if let now = try? registry.owner(of: id), now.host == target { return now }
                usleep(20_000)
            }
            throw AgentError.failed("\(target) did not take \(id) over in etcd within 20 s")
        }
        try step(id, "source-cleaned", peer: target) { () -> Void in
            for _ in 0..<300 where lock.withLock({ vmms[id]?.isRunning }) == true { usleep(10_000) }
            discard(id, diskSocket: record.diskSocket)
        }
        event(id, "failover-done", ms: (monotonicSeconds() - t0) * 1000, detail: "\(id) runs on \(target) with its disk local", forwardTo: target)
    }

    // MARK: Taking over from a replica

    /// For each replica kept here: when its VM has had no owner in etcd for two lease periods in a row
    /// (the owner's lease lapsed: its host is cut off or dead, and its VMM paused itself at half the
    /// lease), this host takes the VM and boots it from the replica.
    func watchReplicas() {
        for replica in lock.withLock({ Array(state.replicas.values) }) where replica.spec != nil {
            guard !lock.withLock({ busy.contains(replica.vm) }) else { continue }
            let owner: OwnerRecord??
            do { owner = .some(try registry.owner(of: replica.vm)) } catch { owner = nil }
            guard let present = owner else { continue }  // etcd did not answer: decide nothing
            let absences: Int = lock.withLock {
                ownerAbsences[replica.vm] = present == nil ? (ownerAbsences[replica.vm] ?? 0) + 1 : 0
                return ownerAbsences[replica.vm] ?? 0
            }
            if absences >= 2 { takeOver(replica) }
        }
    }

    func takeOver(_ replica: ReplicaRecord) {
        let id = replica.vm
        guard let spec = replica.spec, lock.withLock({ busy.insert(id).inserted }) else { return }
        defer { lock.withLock { _ = busy.remove(id) } }
        let t0 = monotonicSeconds()
        event(id, "owner-vanished", detail: "\(replica.fromHost)'s lease lapsed; starting \(id) from its replica here")
        let previous = OwnerRecord(host: replica.fromHost, generation: max(replica.generation ?? 0, Int64(nbd.generation(of: id))))
        let owner: OwnerRecord
        do { owner = try registry.claim(id, host: config.host, lease: lease, after: previous) } catch {
            event(id, "take-over-refused", detail: "\(error)")
            return
        }
        // The old owner's connection (generation `previous`) can no longer write the replica.
        nbd.fence(id, generation: UInt64(owner.generation))
        nbd.removeExport(id)
        let dir = config.stateDir + "/vms/"
        var record = VMRecord(spec: spec, state: "starting", owner: owner, vmmPid: 0, apiSocket: dir + id + ".api", diskSocket: dir + id + ".disk",
                              offset: replica.offset, size: replica.size, replicaHost: nil, error: nil)
        lock.withLock {
            state.replicas[id] = nil
            state.vms[id] = record
            ownerAbsences[id] = nil
        }
        save()
        do {
            try addDisk(record)
            _ = try boot(&record)
            lock.withLock { state.vms[id] = record }
            save()
            event(id, "taken-over", ms: (monotonicSeconds() - t0) * 1000, detail: "owner generation \(owner.generation); the guest boots from the replica")
        } catch {
            lock.withLock { state.vms[id]?.state = "failed"; state.vms[id]?.error = "\(error)" }
            save()
            event(id, "take-over-failed", detail: "\(error)")
        }
    }

    // MARK: The target's half

    /// Prepares an incoming VMM for a peer's VM on its replica here: the disk is a device of this
    /// host's I/O domain on the replica's slice (local from the first instruction the guest runs here),
    /// and the VMM waits paused for the migration so that the ownership transaction is the commit point.
    func prepareIncoming(_ request: IncomingRequest) throws -> IncomingAnswer {
        try request.spec.validate()
        let id = request.spec.id
        _ = try peer(request.fromHost)
        guard let replica = lock.withLock({ state.replicas[id] }) else { throw AgentError.notFound("no replica of \(id) here") }
        // The same source asking again (its agent restarted mid-sequence): the first attempt is discarded.
        if lock.withLock({ state.vms[id].map { $0.state == "incoming" } ?? false }) {
            try? cancelIncoming(id)
            for _ in 0..<1000 where lock.withLock({ busy.contains(id) }) { usleep(10_000) }
        }
        let claimed: Bool = lock.withLock {
            if busy.contains(id) || state.vms[id].map({ $0.state != "gone" }) == true { return false }
            busy.insert(id)
            return true
        }
        guard claimed else { throw AgentError.conflict("\(id) is already here") }
        let dir = config.stateDir + "/vms/"
        var record = VMRecord(spec: request.spec, state: "incoming", owner: request.owner, vmmPid: 0, apiSocket: dir + id + ".api",
                              diskSocket: dir + id + ".disk", offset: replica.offset, size: replica.size, replicaHost: nil, error: nil)
        do {
            try addDisk(record)
            _ = try startVMM(&record)
            let client = vmmClient(record)
            try client.putMachineConfig(MachineConfiguration(vcpuCount: request.spec.vcpus, memSizeMib: request.spec.memoryMib))
            try client.putDrive(Drive(driveId: "disk", isRootDevice: true, socket: record.diskSocket))
            let url = try receiveOnFreePort(client)
            lock.withLock { state.vms[id] = record }
            save()
            detachThread(name: "agent-incoming") { [self] in
                defer { lock.withLock { _ = busy.remove(id) } }
                completeIncoming(id, from: request.fromHost, previous: request.owner)
            }
            return IncomingAnswer(url: url)
        } catch {
            stopVMM(id)
            _ = try? control(ControlRequest(op: .remove, socket: record.diskSocket))
            lock.withLock {
                vmms[id] = nil
                _ = busy.remove(id)
            }
            throw error
        }
    }

    func receiveOnFreePort(_ client: APIClient) throws -> String {
        var lastError: Error = AgentError.failed("no migration port free in \(config.migrationPorts)")
        for port in config.migrationPorts.shuffled().prefix(16) {
            let url = "tcp:\(config.migrationAddress):\(port)"
            do {
                try client.receiveMigration(MigrationReceiveParams(receiverUrl: url, resumeVm: false))
                return url
            } catch { lastError = error }
        }
        throw lastError
    }

    /// Waits for the migration, then takes the VM in etcd (the commit point), fences the old owner's
    /// writes on the replica export, resumes the guest and keeps the disk local.
    func completeIncoming(_ id: String, from source: String, previous: OwnerRecord) {
        guard let record = lock.withLock({ state.vms[id] }) else { return }
        let client = vmmClient(record)
        let t0 = monotonicSeconds()
        do {
            _ = try step(id, "state-received", peer: source) { () -> Void in
                let deadline = monotonicSeconds() + 120
                while monotonicSeconds() < deadline {
                    if lock.withLock({ stopping }) { throw AgentError.failed("the agent stops") }
                    if lock.withLock({ state.vms[id]?.state }) != "incoming" { throw AgentError.failed("cancelled by \(source)") }
                    if let status = try? client.migrationStatus(), status.state == "completed" { return }
                    if lock.withLock({ vmms[id]?.isRunning }) != true { throw AgentError.failed("the incoming VMM ended") }
                    usleep(5_000)
                }
                throw AgentError.failed("no migration within 120 s")
            }
            let owner = try step(id, "ownership-taken", peer: source, detail: { (o: OwnerRecord) in "generation \(o.generation)" }) { () -> OwnerRecord in
                do { return try registry.transfer(id, from: previous, to: config.host, lease: lease) } catch {
                    // The previous owner's lease lapsed (its record is gone): take it only if nobody else has.
                    if (try? registry.owner(of: id)) == nil { return try registry.claim(id, host: config.host, lease: lease, after: previous) }
                    throw error
                }
            }
            nbd.fence(id, generation: UInt64(owner.generation))
            try step(id, "resumed", peer: source) { () -> Void in
                try client.setFence(FenceParams(deadlineMs: config.leaseTtlS * 500))
                try client.resume()
            }
            lock.withLock {
                state.vms[id]?.owner = owner
                state.vms[id]?.state = "running"
                state.replicas[id] = nil
            }
            nbd.removeExport(id)
            save()
            event(id, "disk-local", ms: (monotonicSeconds() - t0) * 1000, detail: "the replica is the VM's local disk now", forwardTo: source)
            // A third host keeps the next replica.
            if let next = config.peers.map(\.host).first(where: { $0 != source }), let current = lock.withLock({ state.vms[id] }) {
                _ = try? step(id, "replica-attached", peer: nil, detail: { (_: Void) in "on \(next)" }) { try attachReplica(current, on: next) }
            }
        } catch {
            event(id, "incoming-failed", ms: (monotonicSeconds() - t0) * 1000, detail: "\(error); VM discarded here", forwardTo: source)
            discard(id, diskSocket: record.diskSocket)
        }
    }

    /// A restarted agent finds a VM mid-sequence: the VMM's own state says where it stands.
    func resumeInterruptedSequence(_ record: VMRecord) {
        let id = record.spec.id
        let status = try? vmmClient(record).migrationStatus()
        let info = try? vmmClient(record).instanceInfo()
        if record.state == "migrating", let target = record.replicaHost {
            if status?.state == "sending" || status?.state == "completed" {
                // The VMM carries on by itself: finish the source's half once it has.
                lock.withLock { _ = busy.insert(id) }
                detachThread(name: "agent-failover") { [self] in
                    defer { lock.withLock { _ = busy.remove(id) } }
                    event(id, "sequence-resumed", detail: "the agent restarted mid-failover; the migration is \(status?.state ?? "?")", forwardTo: target)
                    for _ in 0..<9000 where lock.withLock({ vmms[id]?.isRunning }) == true { usleep(10_000) }
                    do { try finishSource(id, record, target: target, since: monotonicSeconds()) } catch {
                        lock.withLock { state.vms[id]?.state = "failed" }
                        save()
                    }
                }
            } else if info?.state == .running || info?.state == .paused {
                // The migration never started or was cancelled: the guest runs here on its replica; start again.
                lock.withLock { state.vms[id]?.state = "running" }
                event(id, "sequence-restarted", detail: "the agent restarted mid-failover (migration \(status?.state ?? "none")); failing over again", forwardTo: target)
                startFailover(id, reason: "resumed after an agent restart")
            }
        } else if record.state == "incoming", let previous = record.owner {
            lock.withLock { _ = busy.insert(id) }
            detachThread(name: "agent-incoming") { [self] in
                defer { lock.withLock { _ = busy.remove(id) } }
                completeIncoming(id, from: "?", previous: previous)
            }
        }
    }

    /// A source that gave up asks the target to discard its incoming VMM.
    func cancelIncoming(_ id: String) throws {
        let record: VMRecord? = lock.withLock {
            guard let r = state.vms[id], r.state == "incoming" else { return nil }
            state.vms[id]?.state = "gone"
            return r
        }
        guard record != nil else { throw AgentError.notFound("no incoming VM \(id)") }
    }
}

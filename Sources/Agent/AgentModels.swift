import API
import Cluster
import Foundation

/// What an operator asks the agent to run: a VM with one disk (a slice of this host's device),
/// optionally mirrored to a replica on a peer.
public struct VMSpec: Codable, Equatable, Sendable {
    public var id: String
    public var kernel: String
    public var cmdline: String
    public var vcpus: Int
    public var memoryMib: Int
    public var diskMib: Int
    /// The peer host that keeps the disk's replica (nil: none).
    public var replica: String?

    public init(id: String, kernel: String, cmdline: String = "", vcpus: Int = 1, memoryMib: Int = 128, diskMib: Int = 16, replica: String? = nil) {
        self.id = id
        self.kernel = kernel
        self.cmdline = cmdline
        self.vcpus = vcpus
        self.memoryMib = memoryMib
        self.diskMib = diskMib
        self.replica = replica
    }

    enum CodingKeys: String, CodingKey, CaseIterable { case id, kernel, cmdline, vcpus, memoryMib = "memory_mib", diskMib = "disk_mib", replica }

    public init(from decoder: Decoder) throws {
        let c = try decoder.strictContainer(CodingKeys.self)
        id = try c.decode(String.self, forKey: .id)
        kernel = try c.decode(String.self, forKey: .kernel)
        cmdline = try c.decodeIfPresent(String.self, forKey: .cmdline) ?? ""
        vcpus = try c.decodeIfPresent(Int.self, forKey: .vcpus) ?? 1
        memoryMib = try c.decodeIfPresent(Int.self, forKey: .memoryMib) ?? 128
        diskMib = try c.decodeIfPresent(Int.self, forKey: .diskMib) ?? 16
        replica = try c.decodeIfPresent(String.self, forKey: .replica)
    }

    public func validate() throws {
        guard AgentConfig.isName(id) else { throw AgentError.badRequest("VM id '\(id)' is not a name (1-64 of A-Z a-z 0-9 - _ .)") }
        guard kernel.hasPrefix("/"), kernel.utf8.count <= 4096 else { throw AgentError.badRequest("kernel '\(kernel)' is not an absolute path") }
        guard cmdline.utf8.count <= 4096 else { throw AgentError.badRequest("cmdline is longer than 4096 bytes") }
        guard (1...32).contains(vcpus) else { throw AgentError.badRequest("vcpus \(vcpus) is not within 1...32") }
        guard (16...65536).contains(memoryMib) else { throw AgentError.badRequest("memory_mib \(memoryMib) is not within 16...65536") }
        guard (1...1_048_576).contains(diskMib) else { throw AgentError.badRequest("disk_mib \(diskMib) is not within 1...1048576") }
        if let replica, !AgentConfig.isName(replica) { throw AgentError.badRequest("replica '\(replica)' is not a host name") }
    }
}

/// A VM as its agent knows it; persisted, so that a restarted agent adopts it.
public struct VMRecord: Codable, Equatable, Sendable {
    public var spec: VMSpec
    /// starting, running, migrating, incoming, failed, gone
    public var state: String
    public var owner: OwnerRecord?
    /// The waiting parent of the VMM (signals reach the VMM through it).
    public var vmmPid: Int32
    public var apiSocket: String
    /// The disk's vhost-user socket on this host's I/O domain.
    public var diskSocket: String
    /// The disk's slice of the host's device.
    public var offset: UInt64
    public var size: UInt64
    /// The host that keeps the replica now (nil: none).
    public var replicaHost: String?
    /// Why the VM failed, when it did.
    public var error: String?
}

/// A replica this host keeps for a VM running on a peer: a slice of its device, exported over NBD.
public struct ReplicaRecord: Codable, Equatable, Sendable {
    public var vm: String
    public var fromHost: String
    public var offset: UInt64
    public var size: UInt64
    /// `tcp:ADDRESS:PORT` of this host's NBD server; the export is the VM's id.
    public var nbd: String
    /// The VM, so that this host can start it from the replica if its owner vanishes from etcd.
    public var spec: VMSpec?
    /// The owner generation that asked for the replica.
    public var generation: Int64?
}

/// A peer's request for a replica.
public struct ReplicaRequest: Codable, Equatable, Sendable {
    public var vm: String
    public var size: UInt64
    public var fromHost: String
    public var spec: VMSpec?
    public var generation: Int64?

    enum CodingKeys: String, CodingKey, CaseIterable { case vm, size, fromHost = "from_host", spec, generation }

    public init(vm: String, size: UInt64, fromHost: String, spec: VMSpec? = nil, generation: Int64? = nil) {
        self.vm = vm
        self.size = size
        self.fromHost = fromHost
        self.spec = spec
        self.generation = generation
    }

    public init(from decoder: Decoder) throws {
        let c = try decoder.strictContainer(CodingKeys.self)
        vm = try c.decode(String.self, forKey: .vm)
        size = try c.decode(UInt64.self, forKey: .size)
        fromHost = try c.decode(String.self, forKey: .fromHost)
        spec = try c.decodeIfPresent(VMSpec.self, forKey: .spec)
        generation = try c.decodeIfPresent(Int64.self, forKey: .generation)
    }
}

/// A peer's request to prepare an incoming VMM on the VM's replica ("drivers preloaded").
public struct IncomingRequest: Codable, Equatable, Sendable {
    public var spec: VMSpec
    /// The owner record the migration's commit point hands over from.
    public var owner: OwnerRecord
    public var fromHost: String

    enum CodingKeys: String, CodingKey, CaseIterable { case spec, owner, fromHost = "from_host" }

    public init(spec: VMSpec, owner: OwnerRecord, fromHost: String) {
        self.spec = spec
        self.owner = owner
        self.fromHost = fromHost
    }

    public init(from decoder: Decoder) throws {
        let c = try decoder.strictContainer(CodingKeys.self)
        spec = try c.decode(VMSpec.self, forKey: .spec)
        owner = try c.decode(OwnerRecord.self, forKey: .owner)
        fromHost = try c.decode(String.self, forKey: .fromHost)
    }
}

/// Where an incoming VMM waits for the migration.
public struct IncomingAnswer: Codable, Equatable, Sendable {
    /// `tcp:ADDRESS:PORT`
    public var url: String
}

/// One step of the agent's work (a failover's steps, a restart), with its duration.
public struct AgentEvent: Codable, Equatable, Sendable {
    public var seq: UInt64
    /// Seconds since 1970.
    public var time: Double
    /// The host whose agent did the step.
    public var host: String
    public var vm: String?
    public var step: String
    public var durationMs: Double?
    public var detail: String?

    enum CodingKeys: String, CodingKey, CaseIterable { case seq, time, host, vm, step, durationMs = "duration_ms", detail }

    public init(seq: UInt64, time: Double, host: String, vm: String?, step: String, durationMs: Double?, detail: String?) {
        self.seq = seq
        self.time = time
        self.host = host
        self.vm = vm
        self.step = step
        self.durationMs = durationMs
        self.detail = detail
    }

    public init(from decoder: Decoder) throws {
        let c = try decoder.strictContainer(CodingKeys.self)
        seq = try c.decode(UInt64.self, forKey: .seq)
        time = try c.decode(Double.self, forKey: .time)
        host = try c.decode(String.self, forKey: .host)
        vm = try c.decodeIfPresent(String.self, forKey: .vm)
        step = try c.decode(String.self, forKey: .step)
        durationMs = try c.decodeIfPresent(Double.self, forKey: .durationMs)
        detail = try c.decodeIfPresent(String.self, forKey: .detail)
        guard host.utf8.count <= 64, step.utf8.count <= 64, (vm?.utf8.count ?? 0) <= 64, (detail?.utf8.count ?? 0) <= 4096 else {
            throw AgentError.badRequest("event fields too long")
        }
    }
}

/// The host as `GET /host` reports it.
public struct HostStatus: Codable, Equatable, Sendable {
    public var host: String
    public var vms: [VMRecord]
    public var replicas: [ReplicaRecord]
    public var iodomainPid: Int32?
    /// Whether the owner lease was renewed within half its time to live.
    public var etcdHealthy: Bool
    public var peers: [String]
}

import Foundation

/// Who runs a VM: the host and the owner generation (each hand-over increments it, so a replica
/// export can refuse writes from an older owner).
public struct OwnerRecord: Codable, Equatable, Sendable {
    public var host: String
    public var generation: Int64

    public init(host: String, generation: Int64) {
        self.host = host
        self.generation = generation
    }

    /// The record as stored: canonical JSON, so that a transaction can compare it byte for byte.
    public var encoded: String {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys]
        return String(decoding: (try? encoder.encode(self)) ?? Data(), as: UTF8.self)
    }
}

/// One owner per VM, kept in etcd under `/godwit/vms/<vm>/owner`, bound to the owning agent's lease
/// (the record goes when the agent stops renewing it). Every change is a transaction on the previous
/// value, so two agents can never both believe they took a VM: no home-made consensus.
public final class OwnershipRegistry: @unchecked Sendable {
    public let etcd: EtcdClient
    public let prefix: String

    public init(etcd: EtcdClient, prefix: String = "/godwit/vms/") {
        self.etcd = etcd
        self.prefix = prefix
    }

    func key(_ vm: String) throws -> String {
        guard !vm.isEmpty, vm.utf8.count <= 128, !vm.contains("/") else { throw ClusterError.conflict("'\(vm)' is not a VM id (1-128 bytes, no '/')") }
        return prefix + vm + "/owner"
    }

    /// The VM's owner, or nil when nobody owns it (never claimed, or the owner's lease lapsed).
    public func owner(of vm: String) throws -> OwnerRecord? {
        guard let kv = try etcd.get(try key(vm)) else { return nil }
        do { return try JSONDecoder().decode(OwnerRecord.self, from: Data(kv.value.utf8)) } catch {
            throw ClusterError.malformedResponse("owner record of \(vm) is not an owner: \(kv.value.prefix(200))")
        }
    }

    /// Takes an unowned VM for `host` under `lease` (generation: one more than `after`, or 1).
    public func claim(_ vm: String, host: String, lease: Int64, after previous: OwnerRecord? = nil) throws -> OwnerRecord {
        let record = OwnerRecord(host: host, generation: (previous?.generation ?? 0) + 1)
        let k = try key(vm)
        let result = try etcd.transaction(compare: [.absent(k)], success: [.put(key: k, value: record.encoded, lease: lease)], failure: [.get(key: k)])
        guard result.succeeded else {
            throw ClusterError.conflict("\(vm) is owned already: \(result.read.first?.value ?? "?")")
        }
        return record
    }

    /// Hands `vm` from `current` (what the caller believes) to `host` under `lease`: succeeds only if
    /// the record is still exactly `current`. This is a migration's commit point.
    public func transfer(_ vm: String, from current: OwnerRecord, to host: String, lease: Int64) throws -> OwnerRecord {
        let next = OwnerRecord(host: host, generation: current.generation + 1)
        let k = try key(vm)
        let result = try etcd.transaction(compare: [.holds(k, current.encoded)], success: [.put(key: k, value: next.encoded, lease: lease)],
                                          failure: [.get(key: k)])
        guard result.succeeded else {
            throw ClusterError.conflict("\(vm) is not owned by \(current.host) generation \(current.generation) any more: \(result.read.first?.value ?? "nobody")")
        }
        return next
    }

    /// Gives `vm` up if `current` still owns it; false when it did not.
    @discardableResult
    public func release(_ vm: String, owner current: OwnerRecord) throws -> Bool {
        let k = try key(vm)
        return try etcd.transaction(compare: [.holds(k, current.encoded)], success: [.delete(key: k)]).succeeded
    }
}

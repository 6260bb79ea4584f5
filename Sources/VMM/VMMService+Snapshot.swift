import API
import Foundation
import GodwitSystem
import Machine
import Migration
#if canImport(Glibc)
import Glibc
#endif

/// What a snapshot file (`snapshot_path`) holds, in the migration stream's format at rest
/// (`MigrationFile`: magic, version, sections with lengths and checksums): a `config` section with the
/// API configuration that built the VM, what the VM must look like and its memory size, and a `state`
/// section with the saved `MachineState`. Guest memory is in the memory file (`mem_file_path`): every
/// RAM region, in order, byte for byte (Firecracker's two files).
struct SnapshotFile {
    /// The `config` section.
    struct Header: Codable {
        var config: FullVmConfiguration
        var shape: MachineShape
        var memoryBytes: UInt64
    }

    var header: Header
    var state: MachineState

    func encoded() throws -> [UInt8] {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys]
        return try MigrationFile.encode([MigrationSection(kind: .config, payload: Array(try encoder.encode(header))),
                                         MigrationSection(kind: .state, payload: Array(try encoder.encode(state)))])
    }

    init(header: Header, state: MachineState) {
        self.header = header
        self.state = state
    }

    /// Reads and checks a file: its format (every length and checksum), then exactly one `config`
    /// and one `state` section, each valid JSON of its type.
    init(decoding bytes: [UInt8]) throws {
        let sections = try MigrationFile.decode(bytes)
        guard sections.map(\.kind) == [.config, .state] else {
            throw MigrationError.malformedSection(kind: sections.first?.kind ?? .config,
                                                  reason: "a snapshot holds a config and a state section, this one \(sections.map { "\($0.kind)" })")
        }
        header = try sections[0].decodeJSON(Header.self)
        state = try sections[1].decodeJSON(MachineState.self)
    }
}

extension VMMService {
    public func createSnapshot(_ params: SnapshotCreateParams) throws {
        let machine = try lock.withLock { () throws -> MicroVM in
            guard let vm, lifecycle == .paused else {
                throw APIError.badRequest("PUT /snapshot/create needs a paused VM (PATCH /vm Paused first); it is \(lifecycle.instanceState)")
            }
            return vm
        }
        let config = try vmConfig()
        do {
            try machine.quiesceDevices()
            defer { try? machine.releaseDevices() }
            let state = try machine.captureState()
            let file = SnapshotFile(header: .init(config: config, shape: machine.shape, memoryBytes: machine.memory.totalSize), state: state)
            try writeMemory(machine, to: params.memFilePath)
            try writeFile(params.snapshotPath, try file.encoded())
        } catch let error as APIError {
            throw error
        } catch {
            throw APIError.badRequest("cannot create the snapshot: \(error)")
        }
        publish("snapshot_created", ["snapshot_path": .string(params.snapshotPath), "mem_file_path": .string(params.memFilePath)])
    }

    public func loadSnapshot(_ params: SnapshotLoadParams) throws {
        guard let memoryPath = params.memoryPath else { throw APIError.badRequest("no memory file") }
        let file: SnapshotFile
        do {
            let data = try Data(contentsOf: URL(fileURLWithPath: params.snapshotPath))
            guard data.count <= 64 << 20 else { throw APIError.badRequest("snapshot file \(params.snapshotPath) is larger than 64 MiB") }
            file = try SnapshotFile(decoding: Array(data))
        } catch let error as APIError {
            throw error
        } catch {
            throw APIError.badRequest("snapshot_path \(params.snapshotPath) is not a Godwit snapshot: \(error)")
        }
        let config: MachineConfig = try lock.withLock {
            try requireNotStarted("PUT /snapshot/load")
            // The snapshot's own configuration: the same machine, drives and NICs (paths must still exist).
            // Except vCPU placement, which belongs to this host: the loading VMM's own vcpu_affinity stays.
            if var m = file.header.config.machineConfig {
                m.vcpuAffinity = machine.vcpuAffinity
                machine = m
            }
            drives = file.header.config.drives ?? []
            interfaces = file.header.config.networkInterfaces ?? []
            bootSource = file.header.config.bootSource
            let config = try machineConfigLocked(incoming: true)
            lifecycle = try lifecycle.applying(.start)
            return config
        }
        try startMachine(config, startsPaused: params.resumeVm != true) { machine in
            if let mismatch = machine.shape.mismatch(file.header.shape) { throw APIError.badRequest("the snapshot cannot run here: \(mismatch)") }
            guard file.header.memoryBytes == machine.memory.totalSize else {
                throw APIError.badRequest("the snapshot has \(file.header.memoryBytes) bytes of memory, this VM \(machine.memory.totalSize)")
            }
            try self.readMemory(machine, from: memoryPath)
            try machine.restore(file.state)
        }
        publish("snapshot_loaded", ["snapshot_path": .string(params.snapshotPath)])
    }

    private func writeFile(_ path: String, _ bytes: [UInt8]) throws {
        let fd = try FileDescriptor.open(path, flags: O_WRONLY | O_CREAT | O_TRUNC, mode: 0o600)
        try fd.writeAll(bytes)
        try fd.fsync()
    }

    private func writeMemory(_ machine: MicroVM, to path: String) throws {
        let fd = try FileDescriptor.open(path, flags: O_WRONLY | O_CREAT | O_TRUNC, mode: 0o600)
        try fd.truncate(to: 0)
        var offset: UInt64 = 0
        for region in machine.memory.regions {
            // In bounds: the region's whole mapping.
            let bytes = UnsafeRawBufferPointer(start: region.hostBase, count: Int(region.size))
            try fd.pwriteFully(from: bytes, offset: offset)
            offset += region.size
        }
        try fd.fsync()
    }

    private func readMemory(_ machine: MicroVM, from path: String) throws {
        let fd: FileDescriptor
        do { fd = try FileDescriptor.open(path, flags: O_RDONLY) } catch {
            throw APIError.badRequest("memory file \(path): \(error)")
        }
        let size = try fd.size()
        guard size == machine.memory.totalSize else {
            throw APIError.badRequest("memory file \(path) has \(size) bytes, the VM \(machine.memory.totalSize)")
        }
        var offset: UInt64 = 0
        for region in machine.memory.regions {
            // In bounds: the region's whole mapping.
            let bytes = UnsafeMutableRawBufferPointer(start: region.hostBase, count: Int(region.size))
            let n = try fd.preadFully(into: bytes, offset: offset)
            guard n == bytes.count else { throw APIError.badRequest("memory file \(path) is short") }
            offset += region.size
        }
    }
}

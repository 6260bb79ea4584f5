import GodwitSystem
#if canImport(Glibc)
import Glibc
#endif

/// Firecracker's `--config-file`: the whole VM in one JSON file (`FullVmConfiguration`, dashed keys),
/// applied through the same `VMMRequests` calls as the HTTP API.
public enum VMConfigFile {
    /// Config files larger than this are refused (a VM description is a few KiB).
    public static let maxBytes = 1 << 20

    /// Decodes a config file's bytes strictly.
    public static func parse(_ bytes: [UInt8]) throws -> FullVmConfiguration {
        try decodeStrictly(FullVmConfiguration.self, from: bytes, what: "config file")
    }

    /// Reads and decodes the config file at `path`.
    public static func load(path: String) throws -> FullVmConfiguration {
        let fd = try posixCall("open", context: path) { open(path, O_RDONLY | O_CLOEXEC) }
        let file = FileDescriptor(owning: fd)
        var st = stat()
        _ = try posixCall("fstat", context: path) { fstat(fd, &st) }
        guard (st.st_mode & S_IFMT) == S_IFREG else { throw APIError.badRequest("config file \(path): not a regular file") }
        guard st.st_size <= maxBytes else {
            throw APIError.badRequest("config file \(path): \(st.st_size) bytes (at most \(maxBytes))")
        }
        var bytes = [UInt8](repeating: 0, count: Int(st.st_size))
        var done = 0
        while done < bytes.count {
            let n = try bytes.withUnsafeMutableBytes { b in
                try posixCall("read", context: path) { read(file.rawValue, b.baseAddress! + done, b.count - done) }
            }
            if n == 0 { break }
            done += n
        }
        return try parse(Array(bytes[0..<done]))
    }

    /// Applies `config` in Firecracker's order — logger, metrics, machine-config, boot-source, drives,
    /// network-interfaces — then, when `startInstance`, InstanceStart. The whole file is validated first,
    /// so a bad value anywhere fails before the VMM is touched; a refusal from the VMM names the section.
    public static func apply(_ config: FullVmConfiguration, to controller: VMMController, startInstance: Bool = true) throws {
        func step(_ section: String, _ body: () throws -> Void) throws {
            do { try body() } catch { throw APIError.from(error).prefixed("config file: \(section)") }
        }
        do { try config.validate() } catch { throw APIError.from(error).prefixed("config file") }
        if startInstance && config.bootSource == nil {
            throw APIError.badRequest("config file: `boot-source` is required to start the VM")
        }
        if let logger = config.logger { try step("logger") { try VMMRequests.putLogger(logger, on: controller) } }
        if let metrics = config.metrics { try step("metrics") { try VMMRequests.putMetrics(metrics, on: controller) } }
        if let machine = config.machineConfig { try step("machine-config") { try VMMRequests.putMachineConfig(machine, on: controller) } }
        if let boot = config.bootSource { try step("boot-source") { try VMMRequests.putBootSource(boot, on: controller) } }
        for (i, drive) in (config.drives ?? []).enumerated() {
            try step("drives[\(i)] (`\(drive.driveId)`)") { try VMMRequests.putDrive(drive, on: controller) }
        }
        for (i, iface) in (config.networkInterfaces ?? []).enumerated() {
            try step("network-interfaces[\(i)] (`\(iface.ifaceId)`)") { try VMMRequests.putNetworkInterface(iface, on: controller) }
        }
        if startInstance {
            try step("InstanceStart") { try VMMRequests.perform(InstanceActionInfo(actionType: .instanceStart), on: controller) }
        }
    }
}

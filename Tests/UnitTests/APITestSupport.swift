import Foundation
import GodwitSystem
@testable import API
#if canImport(Glibc)
import Glibc
#endif

/// A VMMController that records its calls and keeps just enough state to refuse what a VMM refuses
/// (pre-boot-only requests after InstanceStart, PATCH before it, unknown drives).
final class APIFakeController: VMMController, @unchecked Sendable {
    private let lock = Lock()
    private var _calls: [String] = []
    private(set) var bootSource: BootSource?
    private(set) var machine = MachineConfiguration()
    private(set) var drives: [String: Drive] = [:]
    private(set) var interfaces: [String: NetworkInterface] = [:]
    private(set) var logger: Logger?
    private(set) var metrics: Metrics?
    private(set) var started = false
    private(set) var paused = false
    /// Thrown by the next call, then cleared.
    var failNext: Error?
    /// Seconds each call takes (for concurrency tests).
    var delay: Double = 0
    let hub = EventHub(historyLimit: 64)

    var calls: [String] { lock.withLock { _calls } }

    private func record(_ call: String, preBoot: Bool? = nil) throws {
        if delay > 0 { usleep(UInt32(delay * 1e6)) }
        try lock.withLock {
            if let error = failNext {
                failNext = nil
                throw error
            }
            if preBoot == true && started { throw APIError.badRequest("\(call): pre-boot only, and the VM is running") }
            if preBoot == false && !started { throw APIError.badRequest("\(call): the VM is not running yet") }
            _calls.append(call)
        }
    }

    func instanceInfo() throws -> InstanceInfo {
        try record("instanceInfo")
        return lock.withLock {
            InstanceInfo(id: "test_vm", state: !started ? .notStarted : paused ? .paused : .running, vmmVersion: "0.1.0")
        }
    }

    func version() throws -> FirecrackerVersion {
        try record("version")
        return FirecrackerVersion(firecrackerVersion: "0.1.0")
    }

    func vmConfig() throws -> FullVmConfiguration {
        try record("vmConfig")
        return lock.withLock {
            FullVmConfiguration(bootSource: bootSource, machineConfig: machine, drives: drives.values.sorted { $0.driveId < $1.driveId },
                                networkInterfaces: interfaces.values.sorted { $0.ifaceId < $1.ifaceId }, logger: logger, metrics: metrics)
        }
    }

    func putBootSource(_ value: BootSource) throws {
        try record("putBootSource(\(value.kernelImagePath))", preBoot: true)
        lock.withLock { bootSource = value }
    }

    func machineConfig() throws -> MachineConfiguration {
        try record("machineConfig")
        return lock.withLock { machine }
    }

    func putMachineConfig(_ value: MachineConfiguration) throws {
        try record("putMachineConfig(\(value.vcpuCount),\(value.memSizeMib))", preBoot: true)
        lock.withLock { machine = value }
    }

    func patchMachineConfig(_ update: MachineConfigurationUpdate) throws {
        let merged = try lock.withLock { try machine.applying(update) }
        try record("patchMachineConfig(\(merged.vcpuCount),\(merged.memSizeMib))", preBoot: true)
        lock.withLock { machine = merged }
    }

    func putDrive(_ value: Drive) throws {
        if value.socket != nil { throw APIError.unsupported("socket", jsonQuoted(value.socket!), "vhost-user drives are not supported yet") }
        try record("putDrive(\(value.driveId))", preBoot: true)
        lock.withLock { drives[value.driveId] = value }
    }

    func patchDrive(_ update: PartialDrive) throws {
        try record("patchDrive(\(update.driveId))", preBoot: false)
        try lock.withLock {
            guard drives[update.driveId] != nil else { throw APIError.badRequest("no drive `\(update.driveId)`") }
            if let path = update.pathOnHost { drives[update.driveId]?.pathOnHost = path }
        }
    }

    func putNetworkInterface(_ value: NetworkInterface) throws {
        try record("putNetworkInterface(\(value.ifaceId))", preBoot: true)
        lock.withLock { interfaces[value.ifaceId] = value }
    }

    func patchNetworkInterface(_ update: PartialNetworkInterface) throws {
        try record("patchNetworkInterface(\(update.ifaceId))", preBoot: false)
    }

    func putLogger(_ value: Logger) throws {
        try record("putLogger", preBoot: nil)
        lock.withLock { logger = value }
    }

    func putMetrics(_ value: Metrics) throws {
        try record("putMetrics", preBoot: nil)
        lock.withLock { metrics = value }
    }

    func instanceStart() throws {
        try record("instanceStart", preBoot: true)
        lock.withLock { started = true }
        hub.publish(.booted)
    }

    func sendCtrlAltDel() throws { try record("sendCtrlAltDel", preBoot: false) }
    func flushMetrics() throws { try record("flushMetrics") }

    func setVMState(_ state: VM.State) throws {
        try record("setVMState(\(state.rawValue))", preBoot: false)
        lock.withLock { paused = state == .paused }
        hub.publish(state == .paused ? .paused : .resumed)
    }

    func subscribeEvents(since: UInt64?) throws -> EventSubscription {
        try record("subscribeEvents(\(since.map(String.init) ?? "nil"))")
        return hub.subscribe(since: since)
    }

    func prometheusMetrics() throws -> String {
        try record("prometheusMetrics")
        return "# TYPE godwit_uptime_seconds gauge\ngodwit_uptime_seconds 1.5"
    }

    func createSnapshot(_ params: SnapshotCreateParams) throws { try record("createSnapshot") }
    func loadSnapshot(_ params: SnapshotLoadParams) throws { try record("loadSnapshot") }
    func receiveMigration(_ params: MigrationReceiveParams) throws { try record("receiveMigration") }
    func sendMigration(_ params: MigrationSendParams) throws { try record("sendMigration") }
    func setFence(_ params: FenceParams) throws { try record("setFence") }
    func sendSerialInput(_ input: SerialInput) throws { try record("sendSerialInput") }
    func migrationStatus() throws -> MigrationStatus {
        try record("migrationStatus")
        return MigrationStatus(state: "none")
    }
}

enum APITest {
    private static let counter = Lock()
    nonisolated(unsafe) private static var next = 0

    /// A fresh socket path under /tmp (short enough for sockaddr_un).
    static func socketPath() -> String {
        let n = counter.withLock { () -> Int in
            next += 1
            return next
        }
        let path = "/tmp/godwit-api-\(getpid())-\(n).sock"
        unlink(path)
        return path
    }

    static func bytes(_ s: String) -> [UInt8] { Array(s.utf8) }

    /// A request as the router sees it.
    static func request(_ method: String, _ target: String, _ body: String? = nil) -> HTTPRequest {
        HTTPRequest(method: method, target: target, headers: HTTPHeaders([("Host", "localhost")]), body: body.map { Array($0.utf8) } ?? [])
    }

    /// The fault_message of an error response (or "" when there is none).
    static func fault(_ response: HTTPResponse) -> String {
        let decoder = JSONDecoder()
        return (try? decoder.decode(ErrorResponse.self, from: Data(response.body)))?.faultMessage ?? ""
    }

    /// A started server over a fake controller.
    static func server(_ controller: APIFakeController = APIFakeController(), options: APIServer.Options = APIServer.Options()) throws
        -> (APIServer, APIFakeController, String) {
        let path = socketPath()
        let server = APIServer(socketPath: path, controller: controller, options: options)
        try server.start()
        return (server, controller, path)
    }
}

/// A raw connection for sending exact bytes and reading what comes back.
final class APIRawConnection {
    let fd: FileDescriptor

    init(_ path: String) throws {
        fd = try UnixSocket.connect(path: path)
    }

    func send(_ s: String) throws { try UnixSocket.sendAll(fd, Array(s.utf8)) }
    func send(_ b: [UInt8]) throws { try UnixSocket.sendAll(fd, b) }

    /// Everything until the server closes (or `timeout` passes).
    func readAll(timeout: Double = 5) -> String {
        var out: [UInt8] = []
        var scratch = [UInt8](repeating: 0, count: 65536)
        let deadline = monotonicNow() + timeout
        while case let .data(n)? = try? UnixSocket.read(fd, into: &scratch, deadline: deadline, wake: nil) {
            out += scratch[0..<n]
        }
        return String(decoding: out, as: UTF8.self)
    }

    /// Reads until `count` responses' worth of "HTTP/1.1 " status lines and their bodies have arrived
    /// (bodies framed by Content-Length), or the time-out.
    func readResponses(_ count: Int, timeout: Double = 5) -> [APIClientResponse] {
        let reader = ConnectionReader(fd)
        var out: [APIClientResponse] = []
        let deadline = monotonicNow() + timeout
        while out.count < count {
            guard let head = (try? reader.head(deadline: deadline)) ?? nil else { break }
            let (status, headers) = head
            let length = headers["Content-Length"].flatMap { Int($0) } ?? 0
            guard let body = try? reader.exactly(length, deadline: deadline) else { break }
            out.append(APIClientResponse(status: status, headers: headers, body: body))
        }
        return out
    }

    func close() { fd.close() }
}

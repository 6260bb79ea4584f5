import GodwitSystem

/// What the API asks of the VMM: one method per endpoint, synchronous. The router has already decoded
/// the body strictly, checked the id in the path against the body, and called `validate()`, so the
/// values are in range; the controller checks what depends on the VM's state (pre-boot only, post-boot
/// only, a drive that does not exist, a path that cannot be opened, an unsupported value) and throws
/// `APIError.badRequest` with a message that says why. Any other error it throws is answered as 400
/// with the error's description; `APIError.internalError` gives 500.
///
/// The router calls the controller one request at a time (as Firecracker's API thread does); the config
/// file is applied through the same calls (`VMConfigFile.apply`).
public protocol VMMController: AnyObject {
    /// `GET /`
    func instanceInfo() throws -> InstanceInfo
    /// `GET /version`
    func version() throws -> FirecrackerVersion
    /// `GET /vm/config`
    func vmConfig() throws -> FullVmConfiguration
    /// `PUT /boot-source` (pre-boot)
    func putBootSource(_ bootSource: BootSource) throws
    /// `GET /machine-config`: the current configuration, with defaults filled in.
    func machineConfig() throws -> MachineConfiguration
    /// `PUT /machine-config` (pre-boot): replaces the configuration; absent optional fields take their defaults.
    func putMachineConfig(_ config: MachineConfiguration) throws
    /// `PATCH /machine-config` (pre-boot): `try current.applying(update)` gives the checked result.
    func patchMachineConfig(_ update: MachineConfigurationUpdate) throws
    /// `PUT /drives/{drive_id}` (pre-boot): creates or replaces the drive.
    func putDrive(_ drive: Drive) throws
    /// `PATCH /drives/{drive_id}` (post-boot): new backing file (the guest sees the new capacity) or rate limiter.
    func patchDrive(_ update: PartialDrive) throws
    /// `PUT /network-interfaces/{iface_id}` (pre-boot)
    func putNetworkInterface(_ iface: NetworkInterface) throws
    /// `PATCH /network-interfaces/{iface_id}` (post-boot): new rate limiters.
    func patchNetworkInterface(_ update: PartialNetworkInterface) throws
    /// `PUT /logger`
    func putLogger(_ logger: Logger) throws
    /// `PUT /metrics`: the file Firecracker-style JSON metrics are flushed to.
    func putMetrics(_ metrics: Metrics) throws
    /// `PUT /actions {"action_type": "InstanceStart"}`
    func instanceStart() throws
    /// `PUT /actions {"action_type": "SendCtrlAltDel"}`
    func sendCtrlAltDel() throws
    /// `PUT /actions {"action_type": "FlushMetrics"}`
    func flushMetrics() throws
    /// `PATCH /vm {"state": "Paused" | "Resumed"}`
    func setVMState(_ state: VM.State) throws
    /// `GET /events[?since=N]` (Godwit): usually `eventHub.subscribe(since: since)`.
    func subscribeEvents(since: UInt64?) throws -> EventSubscription
    /// `GET /metrics` (Godwit): the Prometheus text exposition format, version 0.0.4.
    func prometheusMetrics() throws -> String
    /// `PUT /snapshot/create` (paused VM)
    func createSnapshot(_ params: SnapshotCreateParams) throws
    /// `PUT /snapshot/load` (fresh VMM)
    func loadSnapshot(_ params: SnapshotLoadParams) throws
    /// `PUT /migration/receive` (Godwit): configured, not started; returns once listening.
    func receiveMigration(_ params: MigrationReceiveParams) throws
    /// `PUT /migration/send` (Godwit): starts the migration; progress in `GET /migration` and events.
    func sendMigration(_ params: MigrationSendParams) throws
    /// `GET /migration` (Godwit)
    func migrationStatus() throws -> MigrationStatus
    /// `PUT /fence` (Godwit): pause the guest unless fenced again within the deadline (0: off).
    func setFence(_ params: FenceParams) throws
    /// `PUT /serial/input` (Godwit): bytes for the guest's serial console, as if typed.
    func sendSerialInput(_ input: SerialInput) throws
}

/// One (method, path template) the router serves.
public struct APIRoute: Hashable, Sendable, CustomStringConvertible {
    /// Firecracker's operationId where there is one.
    public enum Operation: String, Hashable, Sendable, CaseIterable {
        case describeInstance, createSyncAction, putGuestBootSource
        case putGuestDriveByID, patchGuestDriveByID, putLogger
        case getMachineConfiguration, putMachineConfiguration, patchMachineConfiguration
        case putMetrics, putGuestNetworkInterfaceByID, patchGuestNetworkInterfaceByID
        case getFirecrackerVersion, patchVm, getExportVmConfig
        case createSnapshot, loadSnapshot
        // Godwit extensions
        case getEvents, getPrometheusMetrics, receiveMigration, sendMigration, getMigration, putFence, putSerialInput
    }

    public let method: String
    public let template: String
    public let operation: Operation
    public let isGodwitExtension: Bool

    init(_ method: String, _ template: String, _ operation: Operation, extension isExtension: Bool = false) {
        self.method = method
        self.template = template
        self.operation = operation
        self.isGodwitExtension = isExtension
    }

    public var description: String { "\(method) \(template)" }
}

public enum APIRoutes {
    /// Every (method, path template) the router serves, and nothing else: the router dispatches through
    /// this table, and a test checks it against `api/openapi.yaml`.
    public static let all: [APIRoute] = [
        APIRoute("GET", "/", .describeInstance),
        APIRoute("PUT", "/actions", .createSyncAction),
        APIRoute("PUT", "/boot-source", .putGuestBootSource),
        APIRoute("PUT", "/drives/{drive_id}", .putGuestDriveByID),
        APIRoute("PATCH", "/drives/{drive_id}", .patchGuestDriveByID),
        APIRoute("PUT", "/logger", .putLogger),
        APIRoute("GET", "/machine-config", .getMachineConfiguration),
        APIRoute("PUT", "/machine-config", .putMachineConfiguration),
        APIRoute("PATCH", "/machine-config", .patchMachineConfiguration),
        APIRoute("PUT", "/metrics", .putMetrics),
        APIRoute("PUT", "/network-interfaces/{iface_id}", .putGuestNetworkInterfaceByID),
        APIRoute("PATCH", "/network-interfaces/{iface_id}", .patchGuestNetworkInterfaceByID),
        APIRoute("GET", "/version", .getFirecrackerVersion),
        APIRoute("PATCH", "/vm", .patchVm),
        APIRoute("GET", "/vm/config", .getExportVmConfig),
        APIRoute("GET", "/events", .getEvents, extension: true),
        APIRoute("GET", "/metrics", .getPrometheusMetrics, extension: true),
        APIRoute("PUT", "/snapshot/create", .createSnapshot),
        APIRoute("PUT", "/snapshot/load", .loadSnapshot),
        APIRoute("PUT", "/migration/receive", .receiveMigration, extension: true),
        APIRoute("PUT", "/migration/send", .sendMigration, extension: true),
        APIRoute("GET", "/migration", .getMigration, extension: true),
        APIRoute("PUT", "/fence", .putFence, extension: true),
        APIRoute("PUT", "/serial/input", .putSerialInput, extension: true),
    ]

    /// The route for `method` and `segments` (the decoded path segments) and its path parameters;
    /// nil when no template matches; `.methodNotAllowed` when a template matches with other methods only.
    static func match(method: String, segments: [String], path: String) throws -> (APIRoute, [String: String]) {
        var allowed: [String] = []
        for route in all {
            guard let parameters = parameters(template: route.template, segments: segments) else { continue }
            if route.method == method { return (route, parameters) }
            allowed.append(route.method)
        }
        if allowed.isEmpty { throw APIError.notFound("no resource at \(path)") }
        throw APIError.methodNotAllowed("\(method) is not allowed on \(path) (allowed: \(allowed.joined(separator: ", ")))", allowed: allowed)
    }

    static func parameters(template: String, segments: [String]) -> [String: String]? {
        let parts = template == "/" ? [] : template.dropFirst().split(separator: "/", omittingEmptySubsequences: false)
        guard parts.count == segments.count else { return nil }
        var result: [String: String] = [:]
        for (part, segment) in zip(parts, segments) {
            if part.hasPrefix("{") && part.hasSuffix("}") {
                result[String(part.dropFirst().dropLast())] = segment
            } else if part != segment {
                return nil
            }
        }
        return result
    }
}

/// The checks and calls behind every configuring endpoint, shared by the HTTP router and the config
/// file so that both build the VM through one code path.
public enum VMMRequests {
    public static func putBootSource(_ bootSource: BootSource, on controller: VMMController) throws {
        try bootSource.validate()
        try controller.putBootSource(bootSource)
    }

    public static func putMachineConfig(_ config: MachineConfiguration, on controller: VMMController) throws {
        try config.validate()
        try controller.putMachineConfig(config)
    }

    public static func patchMachineConfig(_ update: MachineConfigurationUpdate, on controller: VMMController) throws {
        try update.validate()
        try controller.patchMachineConfig(update)
    }

    static func checkPathID(_ field: String, path: String?, body: String) throws {
        guard let path else { return }
        try Check.id("\(field) in the path", path)
        if path != body {
            throw APIError.badRequest("the \(field) in the path (`\(path)`) does not match the \(field) in the body (\(jsonQuoted(body)))")
        }
    }

    public static func putDrive(_ drive: Drive, pathID: String? = nil, on controller: VMMController) throws {
        try checkPathID("drive_id", path: pathID, body: drive.driveId)
        try drive.validate()
        try controller.putDrive(drive)
    }

    public static func patchDrive(_ update: PartialDrive, pathID: String? = nil, on controller: VMMController) throws {
        try checkPathID("drive_id", path: pathID, body: update.driveId)
        try update.validate()
        try controller.patchDrive(update)
    }

    public static func putNetworkInterface(_ iface: NetworkInterface, pathID: String? = nil, on controller: VMMController) throws {
        try checkPathID("iface_id", path: pathID, body: iface.ifaceId)
        try iface.validate()
        try controller.putNetworkInterface(iface)
    }

    public static func patchNetworkInterface(_ update: PartialNetworkInterface, pathID: String? = nil, on controller: VMMController) throws {
        try checkPathID("iface_id", path: pathID, body: update.ifaceId)
        try update.validate()
        try controller.patchNetworkInterface(update)
    }

    public static func putLogger(_ logger: Logger, on controller: VMMController) throws {
        try logger.validate()
        try controller.putLogger(logger)
    }

    public static func putMetrics(_ metrics: Metrics, on controller: VMMController) throws {
        try metrics.validate()
        try controller.putMetrics(metrics)
    }

    public static func perform(_ action: InstanceActionInfo, on controller: VMMController) throws {
        switch action.actionType {
        case .instanceStart: try controller.instanceStart()
        case .sendCtrlAltDel: try controller.sendCtrlAltDel()
        case .flushMetrics: try controller.flushMetrics()
        }
    }
}

/// Anything that answers HTTP requests (the server calls it from its connection threads).
public protocol HTTPHandler: AnyObject {
    func handle(_ request: HTTPRequest) -> HTTPResponse
}

/// Maps requests to a `VMMController`: strict decoding, validation, Firecracker's status codes
/// (200 + JSON for GET, 204 for PUT/PATCH, 400 + fault_message for a bad request).
public final class APIRouter: HTTPHandler, @unchecked Sendable {
    public let controller: VMMController
    private let lock = Lock()

    public static let prometheusContentType = "text/plain; version=0.0.4"
    public static let eventsContentType = "application/x-ndjson"

    public init(controller: VMMController) {
        self.controller = controller
    }

    public func handle(_ request: HTTPRequest) -> HTTPResponse {
        do {
            return try route(request)
        } catch {
            return .error(APIError.from(error))
        }
    }

    /// The decoded segments of a path ("/drives/a" → ["drives", "a"]; "/" → []).
    static func segments(_ path: String) throws -> [String] {
        guard path.hasPrefix("/") else { throw APIError.badRequest("invalid path \(jsonQuoted(path))") }
        if path == "/" { return [] }
        return try path.dropFirst().split(separator: "/", omittingEmptySubsequences: false).map { raw in
            guard let decoded = percentDecode(raw) else { throw APIError.badRequest("invalid percent-encoding in path \(jsonQuoted(path))") }
            return decoded
        }
    }

    /// `name=value` pairs of a query string.
    static func queryItems(_ query: String) throws -> [(String, String)] {
        if query.isEmpty { return [] }
        return try query.split(separator: "&", omittingEmptySubsequences: false).map { item in
            let pair = item.split(separator: "=", maxSplits: 1, omittingEmptySubsequences: false)
            guard let name = percentDecode(pair[0], plusIsSpace: true),
                  let value = percentDecode(pair.count > 1 ? pair[1] : "", plusIsSpace: true) else {
                throw APIError.badRequest("invalid percent-encoding in query \(jsonQuoted(query))")
            }
            return (name, value)
        }
    }

    private func route(_ request: HTTPRequest) throws -> HTTPResponse {
        let segments = try APIRouter.segments(request.path)
        let (route, parameters) = try APIRoutes.match(method: request.method, segments: segments, path: request.path)
        let what = "\(route.method) \(route.template)"
        let query = try APIRouter.queryItems(request.query)
        if route.operation != .getEvents, let (name, _) = query.first {
            throw APIError.badRequest("\(what) takes no query parameter (got `\(name)`)")
        }
        if route.method == "GET" && !request.body.isEmpty {
            throw APIError.badRequest("\(what) takes no body")
        }
        func body<T: Decodable>(_ type: T.Type) throws -> T { try decodeStrictly(type, from: request.body, what: what) }
        func serialized<T>(_ call: () throws -> T) throws -> T { try lock.withLock { try call() } }
        let c = controller

        switch route.operation {
        case .describeInstance:
            return .json(try serialized { try c.instanceInfo() })
        case .getFirecrackerVersion:
            return .json(try serialized { try c.version() })
        case .getExportVmConfig:
            return .json(try serialized { try c.vmConfig() })
        case .getMachineConfiguration:
            return .json(try serialized { try c.machineConfig() })
        case .putGuestBootSource:
            let value = try body(BootSource.self)
            try serialized { try VMMRequests.putBootSource(value, on: c) }
        case .putMachineConfiguration:
            let value = try body(MachineConfiguration.self)
            try serialized { try VMMRequests.putMachineConfig(value, on: c) }
        case .patchMachineConfiguration:
            let value = try body(MachineConfigurationUpdate.self)
            try serialized { try VMMRequests.patchMachineConfig(value, on: c) }
        case .putGuestDriveByID:
            let value = try body(Drive.self)
            try serialized { try VMMRequests.putDrive(value, pathID: parameters["drive_id"] ?? "", on: c) }
        case .patchGuestDriveByID:
            let value = try body(PartialDrive.self)
            try serialized { try VMMRequests.patchDrive(value, pathID: parameters["drive_id"] ?? "", on: c) }
        case .putGuestNetworkInterfaceByID:
            let value = try body(NetworkInterface.self)
            try serialized { try VMMRequests.putNetworkInterface(value, pathID: parameters["iface_id"] ?? "", on: c) }
        case .patchGuestNetworkInterfaceByID:
            let value = try body(PartialNetworkInterface.self)
            try serialized { try VMMRequests.patchNetworkInterface(value, pathID: parameters["iface_id"] ?? "", on: c) }
        case .putLogger:
            let value = try body(Logger.self)
            try serialized { try VMMRequests.putLogger(value, on: c) }
        case .putMetrics:
            let value = try body(Metrics.self)
            try serialized { try VMMRequests.putMetrics(value, on: c) }
        case .createSyncAction:
            let value = try body(InstanceActionInfo.self)
            try serialized { try VMMRequests.perform(value, on: c) }
        case .patchVm:
            let value = try body(VM.self)
            try serialized { try c.setVMState(value.state) }
        case .getEvents:
            var since: UInt64? = nil
            for (name, value) in query {
                guard name == "since" else { throw APIError.badRequest("\(what): unknown query parameter `\(name)` (accepted: since)") }
                guard let n = UInt64(value) else {
                    throw APIError.badRequest("\(what): since = \(jsonQuoted(value)) is not a sequence number (a non-negative integer)")
                }
                since = n
            }
            let subscription = try serialized { try c.subscribeEvents(since: since) }
            return .streaming(contentType: APIRouter.eventsContentType, EventLineStream(subscription))
        case .createSnapshot:
            let value = try body(SnapshotCreateParams.self)
            try value.validate()
            try serialized { try c.createSnapshot(value) }
        case .loadSnapshot:
            let value = try body(SnapshotLoadParams.self)
            try value.validate()
            try serialized { try c.loadSnapshot(value) }
        case .receiveMigration:
            let value = try body(MigrationReceiveParams.self)
            try value.validate()
            try serialized { try c.receiveMigration(value) }
        case .sendMigration:
            let value = try body(MigrationSendParams.self)
            try value.validate()
            try serialized { try c.sendMigration(value) }
        case .getMigration:
            return .json(try serialized { try c.migrationStatus() })
        case .putFence:
            let value = try body(FenceParams.self)
            try value.validate()
            try c.setFence(value)
        case .putSerialInput:
            let value = try body(SerialInput.self)
            try value.validate()
            try serialized { try c.sendSerialInput(value) }
        case .getPrometheusMetrics:
            var text = try serialized { try c.prometheusMetrics() }
            if !text.isEmpty && !text.hasSuffix("\n") { text += "\n" }
            return HTTPResponse(status: 200, contentType: APIRouter.prometheusContentType, body: Array(text.utf8))
        }
        return .noContent
    }
}

/// Events as JSON lines, for a chunked response.
final class EventLineStream: HTTPStream {
    let subscription: EventSubscription
    init(_ subscription: EventSubscription) { self.subscription = subscription }

    func next(timeout: Double) -> HTTPStreamStep {
        switch subscription.next(timeout: timeout) {
        case let .event(event): return .data(encodeJSON(event) + [0x0a])
        case .timedOut: return .idle
        case .finished: return .end
        }
    }

    func cancel() { subscription.cancel() }

    var readinessDescriptor: Int32? { subscription.notifier?.descriptor.rawValue }
}

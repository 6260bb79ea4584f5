import Foundation
import GodwitSystem
#if canImport(Glibc)
import Glibc
#endif

/// A failed API call, as the client sees it.
public enum APIClientError: Error, Equatable, Sendable, CustomStringConvertible {
    /// The VMM answered with an error status; `faultMessage` is its `fault_message`.
    case server(status: Int, faultMessage: String)
    /// The socket could not be reached, or the connection failed or timed out.
    case connection(String)
    /// The answer is not the HTTP the client expects.
    case protocolError(String)
    /// The answer's JSON does not decode as the model.
    case decoding(String)

    public var description: String {
        switch self {
        case let .server(status, message): return "\(status) \(HTTPStatus.reason(status)): \(message)"
        case let .connection(m): return "connection: \(m)"
        case let .protocolError(m): return "protocol error: \(m)"
        case let .decoding(m): return "cannot decode the answer: \(m)"
        }
    }
}

/// A raw answer.
public struct APIClientResponse: Sendable {
    public var status: Int
    public var headers: HTTPHeaders
    public var body: [UInt8]
}

/// Bytes from a connection, read as needed with a deadline.
final class ConnectionReader {
    let fd: FileDescriptor
    var buffer: [UInt8] = []
    private var scratch = [UInt8](repeating: 0, count: 16384)

    init(_ fd: FileDescriptor) { self.fd = fd }

    /// Reads more bytes; false at end of file.
    func fill(deadline: Double) throws -> Bool {
        switch try UnixSocket.read(fd, into: &scratch, deadline: deadline, wake: nil) {
        case let .data(n):
            buffer.append(contentsOf: scratch[0..<n])
            return true
        case .endOfFile, .interrupted:
            return false
        case .timedOut:
            throw APIClientError.connection("no answer within the time-out")
        }
    }

    /// A CRLF-terminated line (without the CRLF); nil at end of file before any byte of it.
    func line(limit: Int, deadline: Double) throws -> [UInt8]? {
        var searched = 0
        while true {
            if let i = buffer[searched...].firstIndex(of: 0x0a) {
                guard i > 0, buffer[i - 1] == 0x0d else { throw APIClientError.protocolError("a line without CRLF") }
                let line = Array(buffer[0..<(i - 1)])
                buffer.removeFirst(i + 1)
                return line
            }
            searched = max(0, buffer.count - 1)
            if buffer.count > limit { throw APIClientError.protocolError("a line longer than \(limit) bytes") }
            if try !fill(deadline: deadline) {
                if buffer.isEmpty { return nil }
                throw APIClientError.protocolError("the connection closed in the middle of a line")
            }
        }
    }

    func exactly(_ count: Int, deadline: Double) throws -> [UInt8] {
        while buffer.count < count {
            if try !fill(deadline: deadline) {
                throw APIClientError.protocolError("the connection closed with \(buffer.count) of \(count) body bytes")
            }
        }
        let bytes = Array(buffer[0..<count])
        buffer.removeFirst(count)
        return bytes
    }

    /// The status line and headers of a response; nil when the connection closed before any byte.
    func head(deadline: Double) throws -> (status: Int, headers: HTTPHeaders)? {
        guard let statusLine = try line(limit: 8192, deadline: deadline) else { return nil }
        let parts = statusLine.split(separator: 0x20, maxSplits: 2, omittingEmptySubsequences: false)
        guard parts.count >= 2, parts[0].starts(with: Array("HTTP/1.".utf8)), parts[1].count == 3,
              let status = Int(String(decoding: parts[1], as: UTF8.self)) else {
            throw APIClientError.protocolError("invalid status line \(printable(statusLine))")
        }
        var headers = HTTPHeaders()
        var total = statusLine.count
        while true {
            guard let field = try line(limit: 8192, deadline: deadline) else {
                throw APIClientError.protocolError("the connection closed in the middle of the headers")
            }
            if field.isEmpty { break }
            total += field.count
            if total > 65536 { throw APIClientError.protocolError("response headers longer than 64 KiB") }
            guard let colon = field.firstIndex(of: 0x3a) else { throw APIClientError.protocolError("invalid header \(printable(field))") }
            headers.add(String(decoding: field[..<colon], as: UTF8.self),
                        String(decoding: field[(colon + 1)...], as: UTF8.self).trimmingCharacters(in: .whitespaces))
        }
        return (status, headers)
    }

    /// One chunk of a chunked body; nil after the last chunk (and its trailer).
    func chunk(deadline: Double) throws -> [UInt8]? {
        guard let sizeLine = try line(limit: 1024, deadline: deadline) else {
            throw APIClientError.protocolError("the connection closed before the end of a chunked body")
        }
        let sizeText = String(decoding: sizeLine.prefix { $0 != UInt8(ascii: ";") }, as: UTF8.self).trimmingCharacters(in: .whitespaces)
        guard let size = Int(sizeText, radix: 16), size >= 0, size <= 16 << 20 else {
            throw APIClientError.protocolError("invalid chunk size \(printable(sizeLine))")
        }
        if size == 0 {
            while let trailer = try line(limit: 8192, deadline: deadline), !trailer.isEmpty {}
            return nil
        }
        let data = try exactly(size, deadline: deadline)
        guard try exactly(2, deadline: deadline) == [0x0d, 0x0a] else { throw APIClientError.protocolError("a chunk not followed by CRLF") }
        return data
    }
}

/// A typed client of the API over its Unix socket: one method per endpoint, the same models as the
/// server. Errors are `APIClientError`s; a refusal carries the VMM's `fault_message`. Requests go one at
/// a time over one kept-alive connection (re-opened when the server closed it).
public final class APIClient: @unchecked Sendable {
    public let socketPath: String
    /// Seconds to wait for each answer.
    public var timeout: Double
    /// Answer bodies larger than this are refused.
    public var maxResponseBytes = 16 << 20

    private let lock = Lock()
    private var reader: ConnectionReader?

    /// Headers sent with every request (a host agent's peer token).
    public var extraHeaders: [(String, String)] = []
    private let connector: (() throws -> FileDescriptor)?

    public init(socketPath: String, timeout: Double = 120) {
        self.socketPath = socketPath
        self.timeout = timeout
        self.connector = nil
    }

    /// A client whose connections `connect` makes (TCP to a peer agent); `name` appears in errors.
    public init(name: String, timeout: Double = 120, connect: @escaping () throws -> FileDescriptor) {
        self.socketPath = name
        self.timeout = timeout
        self.connector = connect
    }

    /// Closes the kept-alive connection (the next request opens a new one).
    public func close() {
        lock.withLock {
            reader?.fd.close()
            reader = nil
        }
    }

    // MARK: Endpoints

    /// `GET /`
    public func instanceInfo() throws -> InstanceInfo { try get("/") }
    /// `GET /version`
    public func version() throws -> FirecrackerVersion { try get("/version") }
    /// `GET /vm/config`
    public func vmConfig() throws -> FullVmConfiguration { try get("/vm/config") }
    /// `GET /machine-config`
    public func machineConfig() throws -> MachineConfiguration { try get("/machine-config") }
    /// `PUT /boot-source`
    public func putBootSource(_ value: BootSource) throws { try call("PUT", "/boot-source", value) }
    /// `PUT /machine-config`
    public func putMachineConfig(_ value: MachineConfiguration) throws { try call("PUT", "/machine-config", value) }
    /// `PATCH /machine-config`
    public func patchMachineConfig(_ value: MachineConfigurationUpdate) throws { try call("PATCH", "/machine-config", value) }
    /// `PUT /drives/{drive_id}`
    public func putDrive(_ value: Drive) throws { try call("PUT", "/drives/\(pathSegment(value.driveId))", value) }
    /// `PATCH /drives/{drive_id}`
    public func patchDrive(_ value: PartialDrive) throws { try call("PATCH", "/drives/\(pathSegment(value.driveId))", value) }
    /// `PUT /network-interfaces/{iface_id}`
    public func putNetworkInterface(_ value: NetworkInterface) throws {
        try call("PUT", "/network-interfaces/\(pathSegment(value.ifaceId))", value)
    }
    /// `PATCH /network-interfaces/{iface_id}`
    public func patchNetworkInterface(_ value: PartialNetworkInterface) throws {
        try call("PATCH", "/network-interfaces/\(pathSegment(value.ifaceId))", value)
    }
    /// `PUT /logger`
    public func putLogger(_ value: Logger) throws { try call("PUT", "/logger", value) }
    /// `PUT /metrics`
    public func putMetrics(_ value: Metrics) throws { try call("PUT", "/metrics", value) }
    /// `PUT /actions`
    public func action(_ type: InstanceActionInfo.ActionType) throws { try call("PUT", "/actions", InstanceActionInfo(actionType: type)) }
    public func instanceStart() throws { try action(.instanceStart) }
    public func sendCtrlAltDel() throws { try action(.sendCtrlAltDel) }
    public func flushMetrics() throws { try action(.flushMetrics) }
    /// `PATCH /vm`
    public func setVMState(_ state: VM.State) throws { try call("PATCH", "/vm", VM(state: state)) }
    public func pause() throws { try setVMState(.paused) }
    public func createSnapshot(_ value: SnapshotCreateParams) throws { try call("PUT", "/snapshot/create", value) }
    public func loadSnapshot(_ value: SnapshotLoadParams) throws { try call("PUT", "/snapshot/load", value) }
    public func receiveMigration(_ value: MigrationReceiveParams) throws { try call("PUT", "/migration/receive", value) }
    public func sendMigration(_ value: MigrationSendParams) throws { try call("PUT", "/migration/send", value) }
    public func migrationStatus() throws -> MigrationStatus { try get("/migration") }
    /// `PUT /fence` (Godwit): the deadline after which the VMM pauses its guest unless renewed.
    public func setFence(_ value: FenceParams) throws { try call("PUT", "/fence", value) }
    /// `PUT /serial/input` (Godwit): text for the guest's serial console.
    public func sendSerialInput(_ text: String) throws { try call("PUT", "/serial/input", SerialInput(data: text)) }
    public func resume() throws { try setVMState(.resumed) }

    /// `GET /metrics` (Godwit): Prometheus text.
    public func prometheusMetrics() throws -> String {
        let response = try checked(request("GET", "/metrics"))
        return String(decoding: response.body, as: UTF8.self)
    }

    /// `GET /events` (Godwit): a stream of events after `since` (nil: from now on; 0: the history the VMM still holds).
    public func events(since: UInt64? = nil) throws -> APIEventStream {
        try APIEventStream(socketPath: socketPath, since: since, timeout: timeout)
    }

    // MARK: Requests

    /// Sends one request and returns the answer, whatever its status.
    public func request(_ method: String, _ path: String, body: [UInt8]? = nil) throws -> APIClientResponse {
        var message = "\(method) \(path) HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\n"
        for (name, value) in extraHeaders { message += "\(name): \(value)\r\n" }
        if let body {
            message += "Content-Type: application/json\r\nContent-Length: \(body.count)\r\n"
        }
        message += "\r\n"
        let bytes = Array(message.utf8) + (body ?? [])
        return try lock.withLock {
            // A kept-alive connection the server has since closed fails before any answer byte: retry once
            // on a fresh connection. A fresh connection is never retried.
            for attempt in 0..<2 {
                let reused = reader != nil
                let reader = try self.reader ?? connect()
                self.reader = reader
                var sendError: Error? = nil
                do { try UnixSocket.sendAll(reader.fd, bytes) } catch { sendError = error }
                // Even when sending failed, the server may have answered (413) before closing: read it.
                let response: APIClientResponse?
                do {
                    response = try readResponse(reader, method: method)
                } catch {
                    drop()
                    throw error
                }
                guard let response else {
                    drop()
                    if reused && attempt == 0 { continue }
                    if let sendError { throw APIClientError.connection("sending \(method) \(path): \(sendError)") }
                    throw APIClientError.connection("the server closed the connection without answering \(method) \(path)")
                }
                let closes = response.headers.values("Connection").contains { $0.lowercased().contains("close") }
                if closes || sendError != nil { drop() }
                return response
            }
            throw APIClientError.connection("the server closed the connection without answering \(method) \(path)")
        }
    }

    private func connect() throws -> ConnectionReader {
        do {
            let fd = try connector?() ?? UnixSocket.connect(path: socketPath)
            UnixSocket.setSendTimeout(fd, seconds: timeout)
            return ConnectionReader(fd)
        } catch {
            throw APIClientError.connection("cannot connect to \(socketPath): \(error)")
        }
    }

    private func drop() {
        reader?.fd.close()
        reader = nil
    }

    private func readResponse(_ reader: ConnectionReader, method: String) throws -> APIClientResponse? {
        let deadline = monotonicNow() + timeout
        while true {
            guard let (status, headers) = try reader.head(deadline: deadline) else { return nil }
            if (100..<200).contains(status) { continue }   // 100 Continue
            var body: [UInt8] = []
            if status == 204 || status == 304 || method == "HEAD" {
                // no body
            } else if let te = headers["Transfer-Encoding"], te.lowercased().contains("chunked") {
                while let chunk = try reader.chunk(deadline: deadline) {
                    body += chunk
                    if body.count > maxResponseBytes { throw APIClientError.protocolError("answer larger than \(maxResponseBytes) bytes") }
                }
            } else if let lengthText = headers["Content-Length"] {
                guard let length = Int(lengthText), length >= 0 else {
                    throw APIClientError.protocolError("invalid Content-Length \(jsonQuoted(lengthText))")
                }
                guard length <= maxResponseBytes else { throw APIClientError.protocolError("answer larger than \(maxResponseBytes) bytes") }
                body = try reader.exactly(length, deadline: deadline)
            } else {
                while try reader.fill(deadline: deadline) {
                    if reader.buffer.count > maxResponseBytes { throw APIClientError.protocolError("answer larger than \(maxResponseBytes) bytes") }
                }
                body = reader.buffer
                reader.buffer.removeAll()
            }
            return APIClientResponse(status: status, headers: headers, body: body)
        }
    }

    private func checked(_ response: APIClientResponse) throws -> APIClientResponse {
        if (200..<300).contains(response.status) { return response }
        throw APIClient.serverError(response)
    }

    static func serverError(_ response: APIClientResponse) -> APIClientError {
        let decoder = JSONDecoder()
        decoder.userInfo[.godwitLenientDecoding] = true
        if let error = try? decoder.decode(ErrorResponse.self, from: Data(response.body)) {
            return .server(status: response.status, faultMessage: error.faultMessage)
        }
        return .server(status: response.status, faultMessage: String(decoding: response.body.prefix(1024), as: UTF8.self))
    }

    /// `GET path`, the answer decoded as `T` (a refusal throws with its `fault_message`).
    public func get<T: Decodable>(_ path: String) throws -> T {
        let response = try checked(request("GET", path))
        return try APIClient.decode(T.self, response.body)
    }

    /// `method path` with `value` as JSON, the answer decoded as `R`.
    public func send<T: Encodable, R: Decodable>(_ method: String, _ path: String, _ value: T, answer: R.Type) throws -> R {
        let response = try checked(request(method, path, body: encodeJSON(value)))
        return try APIClient.decode(R.self, response.body)
    }

    static func decode<T: Decodable>(_ type: T.Type, _ body: [UInt8]) throws -> T {
        let decoder = JSONDecoder()
        decoder.userInfo[.godwitLenientDecoding] = true
        do {
            return try decoder.decode(T.self, from: Data(body))
        } catch let error as DecodingError {
            throw APIClientError.decoding("\(T.self): \(describe(error))")
        } catch {
            throw APIClientError.decoding("\(T.self): \(error)")
        }
    }

    /// `method path` with `value` as JSON; any 2xx answer is success.
    public func call<T: Encodable>(_ method: String, _ path: String, _ value: T) throws {
        _ = try checked(request(method, path, body: encodeJSON(value)))
    }

    /// Percent-encodes what is not an unreserved character, so that an id with '/' or '?' stays one segment
    /// (and the server refuses it as an id).
    private func pathSegment(_ s: String) -> String {
        var out = ""
        for b in s.utf8 {
            switch b {
            case 0x30...0x39, 0x41...0x5a, 0x61...0x7a, UInt8(ascii: "-"), UInt8(ascii: "."), UInt8(ascii: "_"), UInt8(ascii: "~"):
                out.unicodeScalars.append(Unicode.Scalar(b))
            default:
                let hex = String(b, radix: 16, uppercase: true)
                out += "%" + (hex.count == 1 ? "0" + hex : hex)
            }
        }
        return out
    }
}

/// The events of `GET /events`, read one by one from their own connection.
public final class APIEventStream: @unchecked Sendable {
    private let reader: ConnectionReader
    private var lines: [UInt8] = []
    private var ended = false

    init(socketPath: String, since: UInt64?, timeout: Double) throws {
        let fd: FileDescriptor
        do { fd = try UnixSocket.connect(path: socketPath) } catch {
            throw APIClientError.connection("cannot connect to \(socketPath): \(error)")
        }
        UnixSocket.setSendTimeout(fd, seconds: timeout)
        reader = ConnectionReader(fd)
        let target = since.map { "/events?since=\($0)" } ?? "/events"
        do {
            try UnixSocket.sendAll(fd, Array("GET \(target) HTTP/1.1\r\nHost: localhost\r\nAccept: application/x-ndjson\r\n\r\n".utf8))
        } catch {
            throw APIClientError.connection("sending GET \(target): \(error)")
        }
        guard let (status, headers) = try reader.head(deadline: monotonicNow() + timeout) else {
            throw APIClientError.connection("the server closed the connection without answering GET \(target)")
        }
        guard status == 200 else {
            var body: [UInt8] = []
            if let length = headers["Content-Length"].flatMap({ Int($0) }), length <= 1 << 20 {
                body = (try? reader.exactly(length, deadline: monotonicNow() + timeout)) ?? []
            }
            throw APIClient.serverError(APIClientResponse(status: status, headers: headers, body: body))
        }
        guard headers["Transfer-Encoding"]?.lowercased().contains("chunked") == true else {
            throw APIClientError.protocolError("GET /events answered without Transfer-Encoding: chunked")
        }
    }

    /// The next event; nil when the stream ended (the VMM stopped or closed it). `timeout` nil waits for ever;
    /// after `timeout` seconds without an event it throws `APIClientError.connection`.
    public func next(timeout: Double? = nil) throws -> GodwitEvent? {
        let deadline = monotonicNow() + (timeout ?? Double(Int32.max))
        while true {
            if let newline = lines.firstIndex(of: 0x0a) {
                let line = Array(lines[0..<newline])
                lines.removeFirst(newline + 1)
                if line.allSatisfy({ $0 == 0x20 || $0 == 0x0d }) { continue }
                return try APIClient.decode(GodwitEvent.self, line)
            }
            if ended { return nil }
            if lines.count > 1 << 20 { throw APIClientError.protocolError("an event line longer than 1 MiB") }
            if let chunk = try reader.chunk(deadline: deadline) {
                lines += chunk
            } else {
                ended = true
            }
        }
    }

    /// Closes the connection (the server ends the stream).
    public func close() { reader.fd.close() }
}

import CGodwit
import Foundation
import GodwitSystem
#if canImport(Glibc)
import Glibc
#endif

/// What goes wrong talking to etcd, each case with the failing value.
public enum ClusterError: Error, CustomStringConvertible, Equatable {
    case endpoint(String)
    case connection(String)
    case http(status: Int, body: String)
    case malformedResponse(String)
    case conflict(String)

    public var description: String {
        switch self {
        case .endpoint(let e): return "not an etcd endpoint (http://HOST:PORT): \(e)"
        case .connection(let why): return "etcd connection: \(why)"
        case .http(let status, let body): return "etcd answered HTTP \(status): \(body.prefix(300))"
        case .malformedResponse(let why): return "etcd answered something unexpected: \(why)"
        case .conflict(let why): return "etcd transaction lost: \(why)"
        }
    }
}

/// One key as etcd stores it.
public struct EtcdKeyValue: Equatable, Sendable {
    public var key: String
    public var value: String
    public var createRevision: Int64
    public var modRevision: Int64
    public var version: Int64
    public var lease: Int64
}

/// A comparison in a transaction (etcd's `Compare`): the key's value, version, create or mod revision.
public struct EtcdCompare: Sendable {
    public enum Target: String, Sendable { case value = "VALUE", version = "VERSION", createRevision = "CREATE", modRevision = "MOD" }
    public enum Result: String, Sendable { case equal = "EQUAL", notEqual = "NOT_EQUAL", greater = "GREATER", less = "LESS" }
    public var key: String
    public var target: Target
    public var result: Result
    public var value: String = ""
    public var number: Int64 = 0

    public init(key: String, target: Target, _ result: Result, value: String = "", number: Int64 = 0) {
        self.key = key
        self.target = target
        self.result = result
        self.value = value
        self.number = number
    }

    /// The key does not exist.
    public static func absent(_ key: String) -> EtcdCompare { EtcdCompare(key: key, target: .createRevision, .equal, number: 0) }
    /// The key holds exactly `value`.
    public static func holds(_ key: String, _ value: String) -> EtcdCompare { EtcdCompare(key: key, target: .value, .equal, value: value) }

    var json: [String: Any] {
        var c: [String: Any] = ["key": base64(key), "target": target.rawValue, "result": result.rawValue]
        switch target {
        case .value: c["value"] = base64(value)
        case .version: c["version"] = String(number)
        case .createRevision: c["create_revision"] = String(number)
        case .modRevision: c["mod_revision"] = String(number)
        }
        return c
    }
}

/// An operation in a transaction's branch.
public enum EtcdOperation: Sendable {
    case put(key: String, value: String, lease: Int64?)
    case delete(key: String)
    case get(key: String)

    var json: [String: Any] {
        switch self {
        case let .put(key, value, lease):
            var p: [String: Any] = ["key": base64(key), "value": base64(value)]
            if let lease { p["lease"] = String(lease) }
            return ["request_put": p]
        case let .delete(key): return ["request_delete_range": ["key": base64(key)]]
        case let .get(key): return ["request_range": ["key": base64(key)]]
        }
    }
}

func base64(_ text: String) -> String { Data(text.utf8).base64EncodedString() }

/// A client of etcd's v3 JSON gateway (`/v3/kv/*`, `/v3/lease/*`; keys and values base64 in JSON,
/// 64-bit numbers as strings): the agents' one source of truth for who owns a VM. Each call is one
/// HTTP/1.1 request on its own TCP connection, with a time-out; nothing is cached.
public final class EtcdClient: @unchecked Sendable {
    public let host: String
    public let port: UInt16
    public let timeout: Double

    /// `endpoint` is `http://HOST:PORT` (an IPv4 literal).
    public init(endpoint: String, timeout: Double = 5) throws {
        guard endpoint.hasPrefix("http://") else { throw ClusterError.endpoint(endpoint) }
        let rest = endpoint.dropFirst(7).split(separator: "/", maxSplits: 1).first.map(String.init) ?? ""
        guard let colon = rest.lastIndex(of: ":"), let port = UInt16(rest[rest.index(after: colon)...]) else {
            throw ClusterError.endpoint(endpoint)
        }
        host = String(rest[..<colon])
        self.port = port
        self.timeout = timeout
    }

    // MARK: Keys

    /// Stores `value` at `key` (bound to `lease` if given); returns the new revision.
    @discardableResult
    public func put(_ key: String, _ value: String, lease: Int64? = nil) throws -> Int64 {
        var body: [String: Any] = ["key": base64(key), "value": base64(value)]
        if let lease { body["lease"] = String(lease) }
        let answer = try call("/v3/kv/put", body)
        return Self.int64((answer["header"] as? [String: Any])?["revision"]) ?? 0
    }

    /// The key, or nil when it does not exist.
    public func get(_ key: String) throws -> EtcdKeyValue? {
        let answer = try call("/v3/kv/range", ["key": base64(key)])
        guard let kvs = answer["kvs"] as? [[String: Any]], let first = kvs.first else { return nil }
        return try Self.keyValue(first)
    }

    /// Deletes `key`; returns how many keys went.
    @discardableResult
    public func delete(_ key: String) throws -> Int64 {
        let answer = try call("/v3/kv/deleterange", ["key": base64(key)])
        return Self.int64(answer["deleted"]) ?? 0
    }

    /// Runs `success` if every comparison holds, else `failure`; returns whether it succeeded, and
    /// what `get` operations read.
    public func transaction(compare: [EtcdCompare], success: [EtcdOperation], failure: [EtcdOperation] = []) throws -> (succeeded: Bool, read: [EtcdKeyValue]) {
        let answer = try call("/v3/kv/txn", ["compare": compare.map(\.json), "success": success.map(\.json), "failure": failure.map(\.json)])
        let succeeded = answer["succeeded"] as? Bool ?? false
        var read: [EtcdKeyValue] = []
        for response in answer["responses"] as? [[String: Any]] ?? [] {
            if let range = response["response_range"] as? [String: Any] {
                for kv in range["kvs"] as? [[String: Any]] ?? [] { read.append(try Self.keyValue(kv)) }
            }
        }
        return (succeeded, read)
    }

    // MARK: Leases

    /// A new lease of `ttl` seconds; returns its id.
    public func grantLease(ttl: Int) throws -> Int64 {
        let answer = try call("/v3/lease/grant", ["TTL": String(ttl)])
        guard let id = Self.int64(answer["ID"]), id != 0 else { throw ClusterError.malformedResponse("lease grant without an ID: \(answer)") }
        return id
    }

    /// Renews a lease; returns its remaining TTL in seconds (0 or less: it had already expired).
    public func keepAlive(_ lease: Int64) throws -> Int64 {
        let answer = try call("/v3/lease/keepalive", ["ID": String(lease)])
        let result = answer["result"] as? [String: Any] ?? answer
        return Self.int64(result["TTL"]) ?? 0
    }

    public func revoke(_ lease: Int64) throws {
        _ = try call("/v3/lease/revoke", ["ID": String(lease)])
    }

    // MARK: Wire

    static func int64(_ value: Any?) -> Int64? {
        if let s = value as? String { return Int64(s) }
        if let n = value as? NSNumber { return n.int64Value }
        return nil
    }

    static func keyValue(_ json: [String: Any]) throws -> EtcdKeyValue {
        func decode(_ field: String) throws -> String {
            guard let text = json[field] as? String else { return "" }
            guard let data = Data(base64Encoded: text) else { throw ClusterError.malformedResponse("\(field) is not base64") }
            return String(decoding: data, as: UTF8.self)
        }
        return EtcdKeyValue(key: try decode("key"), value: try decode("value"), createRevision: int64(json["create_revision"]) ?? 0,
                            modRevision: int64(json["mod_revision"]) ?? 0, version: int64(json["version"]) ?? 0, lease: int64(json["lease"]) ?? 0)
    }

    /// POSTs `body` as JSON to `path`; returns the decoded JSON object (the first one, for a stream).
    func call(_ path: String, _ body: [String: Any]) throws -> [String: Any] {
        let payload = try JSONSerialization.data(withJSONObject: body)
        let request = "POST \(path) HTTP/1.1\r\nHost: \(host):\(port)\r\nContent-Type: application/json\r\nContent-Length: \(payload.count)\r\nConnection: close\r\n\r\n"
        let fd = try connect()
        defer { fd.close() }
        try send(fd, Array(request.utf8) + Array(payload))
        let response = try receive(fd)
        guard let headerEnd = response.range(of: Data("\r\n\r\n".utf8)) else { throw ClusterError.malformedResponse("no HTTP header") }
        let header = String(decoding: response[..<headerEnd.lowerBound], as: UTF8.self)
        let statusLine = header.split(separator: "\r\n").first ?? ""
        let parts = statusLine.split(separator: " ")
        guard parts.count >= 2, let status = Int(parts[1]) else { throw ClusterError.malformedResponse("status line '\(statusLine)'") }
        var content = Data(response[headerEnd.upperBound...])
        if header.lowercased().contains("transfer-encoding: chunked") { content = try Self.dechunk(content) }
        guard status == 200 else { throw ClusterError.http(status: status, body: String(decoding: content, as: UTF8.self)) }
        // A streaming answer (keepalive) is one JSON object per line: take the first.
        let first = content.split(separator: UInt8(ascii: "\n")).first.map { Data($0) } ?? content
        guard let object = try JSONSerialization.jsonObject(with: first) as? [String: Any] else {
            throw ClusterError.malformedResponse("not a JSON object: \(String(decoding: first.prefix(200), as: UTF8.self))")
        }
        if let error = object["error"] { throw ClusterError.http(status: status, body: "\(error)") }
        return object
    }

    static func dechunk(_ data: Data) throws -> Data {
        var out = Data()
        var rest = data[...]
        while let lineEnd = rest.range(of: Data("\r\n".utf8)) {
            let sizeText = String(decoding: rest[..<lineEnd.lowerBound], as: UTF8.self).split(separator: ";").first ?? ""
            guard let size = Int(sizeText.trimmingCharacters(in: .whitespaces), radix: 16) else { throw ClusterError.malformedResponse("chunk size '\(sizeText)'") }
            if size == 0 { break }
            let start = lineEnd.upperBound
            guard rest.distance(from: start, to: rest.endIndex) >= size else { break }  // cut short: keep what came
            let end = rest.index(start, offsetBy: size)
            out.append(rest[start..<end])
            rest = rest[end...].dropFirst(2)
        }
        return out
    }

    private func connect() throws -> FileDescriptor {
        var address = sockaddr_in()
        address.sin_family = sa_family_t(AF_INET)
        address.sin_port = port.bigEndian
        guard inet_pton(AF_INET, host, &address.sin_addr) == 1 else { throw ClusterError.endpoint("\(host) is not an IPv4 address") }
        let fd = godwit_host_socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        guard fd >= 0 else { throw ClusterError.connection("socket: errno \(godwit_errno())") }
        let descriptor = FileDescriptor(owning: fd)
        var limit = timeval(tv_sec: Int(timeout), tv_usec: Int((timeout - Double(Int(timeout))) * 1e6))
        _ = setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &limit, socklen_t(MemoryLayout<timeval>.size))
        _ = setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &limit, socklen_t(MemoryLayout<timeval>.size))
        let rc = withUnsafePointer(to: &address) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { Glibc.connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) } }
        guard rc == 0 else { throw ClusterError.connection("connect \(host):\(port): \(String(cString: strerror(godwit_errno())))") }
        return descriptor
    }

    private func send(_ fd: FileDescriptor, _ bytes: [UInt8]) throws {
        var done = 0
        while done < bytes.count {
            let n = bytes.withUnsafeBytes { Glibc.send(fd.rawValue, $0.baseAddress! + done, bytes.count - done, Int32(MSG_NOSIGNAL)) }
            if n < 0 && godwit_errno() == EINTR { continue }
            guard n > 0 else { throw ClusterError.connection("send: \(String(cString: strerror(godwit_errno())))") }
            done += n
        }
    }

    /// Reads until the server closes (Connection: close), at most 16 MiB.
    private func receive(_ fd: FileDescriptor) throws -> Data {
        var data = Data()
        var buffer = [UInt8](repeating: 0, count: 65536)
        while data.count < 16 << 20 {
            let n = buffer.withUnsafeMutableBytes { Glibc.read(fd.rawValue, $0.baseAddress, $0.count) }
            if n < 0 && godwit_errno() == EINTR { continue }
            if n < 0 {
                let code = godwit_errno()
                throw ClusterError.connection(code == EAGAIN ? "no answer within \(timeout) s" : "read: \(String(cString: strerror(code)))")
            }
            if n == 0 { break }
            data.append(contentsOf: buffer[0..<n])
            // A streaming answer (keepalive) need not end by itself: stop once a whole JSON line arrived.
            if let end = data.range(of: Data("\r\n\r\n".utf8)),
               String(decoding: data[..<end.lowerBound], as: UTF8.self).lowercased().contains("transfer-encoding: chunked"),
               let body = try? Self.dechunk(Data(data[end.upperBound...])), body.contains(UInt8(ascii: "\n")) {
                break
            }
        }
        return data
    }
}

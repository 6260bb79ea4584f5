import API
import Foundation

/// Errors of the host agent, each with the value that failed.
public enum AgentError: Error, CustomStringConvertible, Equatable {
    case config(String)
    case badRequest(String)
    case notFound(String)
    case conflict(String)
    case unauthorized(String)
    case failed(String)

    public var description: String {
        switch self {
        case let .config(m): return "agent configuration: \(m)"
        case let .badRequest(m): return "bad request: \(m)"
        case let .notFound(m): return "not found: \(m)"
        case let .conflict(m): return "conflict: \(m)"
        case let .unauthorized(m): return "unauthorized: \(m)"
        case let .failed(m): return m
        }
    }

    /// The HTTP status the agent's API answers this error with.
    var status: Int {
        switch self {
        case .config, .badRequest: return 400
        case .unauthorized: return 401
        case .notFound: return 404
        case .conflict: return 409
        case .failed: return 500
        }
    }
}

/// The host agent's configuration file (JSON, unknown fields refused): who this host is, where it
/// listens, its block device, its peers and etcd.
public struct AgentConfig: Codable, Equatable, Sendable {
    /// Another host's agent.
    public struct Peer: Codable, Equatable, Sendable {
        public var host: String
        /// Its agent's peer API, IPv4 `ADDRESS:PORT`.
        public var address: String

        public init(host: String, address: String) {
            self.host = host
            self.address = address
        }

        enum CodingKeys: String, CodingKey, CaseIterable { case host, address }

        public init(from decoder: Decoder) throws {
            let c = try decoder.strictContainer(CodingKeys.self)
            host = try c.decode(String.self, forKey: .host)
            address = try c.decode(String.self, forKey: .address)
        }
    }

    /// This host's name (the owner recorded in etcd).
    public var host: String
    /// The peer API on TCP, IPv4 `ADDRESS:PORT` (token required).
    public var listen: String
    /// The Unix socket `godwit ctl agent` talks to (mode 0600, no token).
    public var socket: String
    /// Where the agent keeps its state, its processes' sockets and logs.
    public var stateDir: String
    /// A file holding the token peers present (`Authorization: Bearer TOKEN`), at least 16 characters.
    public var tokenFile: String
    /// etcd's client URL, `http://ADDRESS:PORT`.
    public var etcd: String
    /// The owner lease's time to live in seconds; VMMs pause themselves after half of it without renewal.
    public var leaseTtlS: Int
    /// The block device (or image) this host's I/O domain serves, in slices: VM disks and replicas.
    public var device: String
    /// Open the device with O_DIRECT.
    public var direct: Bool
    /// Where this host serves replicas over NBD, IPv4 `ADDRESS:PORT`.
    public var nbdListen: String
    /// The address incoming migrations listen on (a port per migration is chosen from `migrationPorts`).
    public var migrationAddress: String
    public var migrationPorts: ClosedRange<Int>
    /// The shared migration key (hex) file every host uses.
    public var migrationKeyFile: String
    /// A local request without an answer in this many milliseconds counts as a device failure.
    public var faultTimeoutMs: Int
    public var peers: [Peer]
    /// The `godwit` executable the agent starts VMMs and I/O domains with (default: its own).
    public var godwit: String?

    public init(host: String, listen: String, socket: String, stateDir: String, tokenFile: String, etcd: String, leaseTtlS: Int = 6,
                device: String, direct: Bool = false, nbdListen: String, migrationAddress: String, migrationPorts: ClosedRange<Int> = 7600...7699,
                migrationKeyFile: String, faultTimeoutMs: Int = 50, peers: [Peer] = [], godwit: String? = nil) {
        self.host = host
        self.listen = listen
        self.socket = socket
        self.stateDir = stateDir
        self.tokenFile = tokenFile
        self.etcd = etcd
        self.leaseTtlS = leaseTtlS
        self.device = device
        self.direct = direct
        self.nbdListen = nbdListen
        self.migrationAddress = migrationAddress
        self.migrationPorts = migrationPorts
        self.migrationKeyFile = migrationKeyFile
        self.faultTimeoutMs = faultTimeoutMs
        self.peers = peers
        self.godwit = godwit
    }

    enum CodingKeys: String, CodingKey, CaseIterable {
        case host, listen, socket, stateDir = "state_dir", tokenFile = "token_file", etcd, leaseTtlS = "lease_ttl_s", device, direct
        case nbdListen = "nbd_listen", migrationAddress = "migration_address", migrationPorts = "migration_ports"
        case migrationKeyFile = "migration_key_file", faultTimeoutMs = "fault_timeout_ms", peers, godwit
    }

    public init(from decoder: Decoder) throws {
        let c = try decoder.strictContainer(CodingKeys.self)
        host = try c.decode(String.self, forKey: .host)
        listen = try c.decode(String.self, forKey: .listen)
        socket = try c.decode(String.self, forKey: .socket)
        stateDir = try c.decode(String.self, forKey: .stateDir)
        tokenFile = try c.decode(String.self, forKey: .tokenFile)
        etcd = try c.decode(String.self, forKey: .etcd)
        leaseTtlS = try c.decodeIfPresent(Int.self, forKey: .leaseTtlS) ?? 6
        device = try c.decode(String.self, forKey: .device)
        direct = try c.decodeIfPresent(Bool.self, forKey: .direct) ?? false
        nbdListen = try c.decode(String.self, forKey: .nbdListen)
        migrationAddress = try c.decode(String.self, forKey: .migrationAddress)
        let ports = try c.decodeIfPresent([Int].self, forKey: .migrationPorts) ?? [7600, 7699]
        guard ports.count == 2, ports[0] >= 1, ports[0] <= ports[1], ports[1] <= 65535 else {
            throw AgentError.config("migration_ports must be [FIRST, LAST] within 1...65535, not \(ports)")
        }
        migrationPorts = ports[0]...ports[1]
        migrationKeyFile = try c.decode(String.self, forKey: .migrationKeyFile)
        faultTimeoutMs = try c.decodeIfPresent(Int.self, forKey: .faultTimeoutMs) ?? 50
        peers = try c.decodeIfPresent([Peer].self, forKey: .peers) ?? []
        godwit = try c.decodeIfPresent(String.self, forKey: .godwit)
    }

    public func encode(to encoder: Encoder) throws {
        var c = encoder.container(keyedBy: CodingKeys.self)
        try c.encode(host, forKey: .host)
        try c.encode(listen, forKey: .listen)
        try c.encode(socket, forKey: .socket)
        try c.encode(stateDir, forKey: .stateDir)
        try c.encode(tokenFile, forKey: .tokenFile)
        try c.encode(etcd, forKey: .etcd)
        try c.encode(leaseTtlS, forKey: .leaseTtlS)
        try c.encode(device, forKey: .device)
        try c.encode(direct, forKey: .direct)
        try c.encode(nbdListen, forKey: .nbdListen)
        try c.encode(migrationAddress, forKey: .migrationAddress)
        try c.encode([migrationPorts.lowerBound, migrationPorts.upperBound], forKey: .migrationPorts)
        try c.encode(migrationKeyFile, forKey: .migrationKeyFile)
        try c.encode(faultTimeoutMs, forKey: .faultTimeoutMs)
        try c.encode(peers, forKey: .peers)
        try c.encodeIfPresent(godwit, forKey: .godwit)
    }

    /// Reads and checks a configuration file.
    public static func load(path: String) throws -> AgentConfig {
        let data: Data
        do { data = try Data(contentsOf: URL(fileURLWithPath: path)) } catch { throw AgentError.config("cannot read \(path): \(error.localizedDescription)") }
        let config: AgentConfig
        do { config = try JSONDecoder().decode(AgentConfig.self, from: data) } catch let error as APIError {
            throw AgentError.config("\(path): \(error.faultMessage)")
        } catch let error as AgentError {
            throw error
        } catch {
            throw AgentError.config("\(path): \(error)")
        }
        try config.validate()
        return config
    }

    /// Every field in range: names, addresses, the lease, the time-out.
    public func validate() throws {
        guard AgentConfig.isName(host) else { throw AgentError.config("host '\(host)' is not a name (1-64 of A-Z a-z 0-9 - _ .)") }
        for (field, value) in [("listen", listen), ("nbd_listen", nbdListen)] {
            guard AgentConfig.parseAddress(value) != nil else { throw AgentError.config("\(field) '\(value)' is not IPv4 ADDRESS:PORT") }
        }
        guard AgentConfig.parseAddress("\(migrationAddress):1") != nil else { throw AgentError.config("migration_address '\(migrationAddress)' is not an IPv4 address") }
        guard etcd.hasPrefix("http://") else { throw AgentError.config("etcd '\(etcd)' is not http://ADDRESS:PORT") }
        guard (2...600).contains(leaseTtlS) else { throw AgentError.config("lease_ttl_s \(leaseTtlS) is not within 2...600") }
        guard (1...600_000).contains(faultTimeoutMs) else { throw AgentError.config("fault_timeout_ms \(faultTimeoutMs) is not within 1...600000") }
        var seen = Set([host])
        for peer in peers {
            guard AgentConfig.isName(peer.host), seen.insert(peer.host).inserted else { throw AgentError.config("peer host '\(peer.host)' is not a new name") }
            guard AgentConfig.parseAddress(peer.address) != nil else { throw AgentError.config("peer \(peer.host) address '\(peer.address)' is not IPv4 ADDRESS:PORT") }
        }
    }

    static func isName(_ s: String) -> Bool {
        !s.isEmpty && s.utf8.count <= 64 && s.utf8.allSatisfy { b in
            (0x30...0x39).contains(b) || (0x41...0x5a).contains(b) || (0x61...0x7a).contains(b) || b == UInt8(ascii: "-") || b == UInt8(ascii: "_") || b == UInt8(ascii: ".")
        }
    }

    /// `ADDRESS:PORT` with an IPv4 dotted quad and a port 1...65535.
    static func parseAddress(_ s: String) -> (host: String, port: UInt16)? {
        guard let colon = s.lastIndex(of: ":"), let port = UInt16(s[s.index(after: colon)...]), port > 0 else { return nil }
        let host = String(s[..<colon])
        let parts = host.split(separator: ".", omittingEmptySubsequences: false)
        guard parts.count == 4, parts.allSatisfy({ UInt8($0) != nil }) else { return nil }
        return (host, port)
    }
}

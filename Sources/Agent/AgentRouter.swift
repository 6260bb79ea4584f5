import API
import Foundation

/// The agent's HTTP API. On TCP (peers) every request must carry `Authorization: Bearer TOKEN`; on the
/// Unix socket (`godwit ctl agent`, mode 0600) the file's permissions stand in for the token. Bodies
/// are decoded strictly; a refused or malformed request is answered with `fault_message` and logged.
final class AgentRouter: HTTPHandler, @unchecked Sendable {
    let agent: Agent
    let requireToken: Bool
    /// 8 MiB of zeros for `GET /probe` (a peer timing the link).
    static let probe = [UInt8](repeating: 0, count: 8 << 20)

    init(agent: Agent, requireToken: Bool) {
        self.agent = agent
        self.requireToken = requireToken
    }

    func handle(_ request: HTTPRequest) -> HTTPResponse {
        if requireToken {
            let presented = request.headers["Authorization"] ?? ""
            guard AgentRouter.constantTimeEqual(presented, "Bearer " + agent.token) else {
                refuse(request, "no valid token")
                return HTTPResponse(status: 401, body: Array("{\"fault_message\": \"a peer token is required\"}".utf8), closeConnection: true)
            }
        }
        do {
            return try route(request)
        } catch let error as AgentError {
            if error.status == 400 || error.status == 401 { refuse(request, "\(error)") }
            return HTTPResponse(status: error.status, body: Array("{\"fault_message\": \(jsonString(error.description))}".utf8))
        } catch let error as APIError {
            refuse(request, error.faultMessage)
            return .error(error)
        } catch {
            return HTTPResponse(status: 500, body: Array("{\"fault_message\": \(jsonString("\(error)"))}".utf8))
        }
    }

    func refuse(_ request: HTTPRequest, _ why: String) {
        FileHandle.standardError.write(Data("godwit agent \(agent.config.host): refused \(request.method) \(request.path.prefix(200)): \(why)\n".utf8))
    }

    func route(_ request: HTTPRequest) throws -> HTTPResponse {
        let segments = request.path.split(separator: "/").map(String.init)
        switch (request.method, segments.count, segments.first ?? "") {
        case ("GET", 1, "host"):
            return .json(agent.status)
        case ("GET", 1, "vms"):
            return .json(agent.status.vms)
        case ("POST", 1, "vms"):
            return .json(try agent.createVM(try decode(VMSpec.self, request)), status: 201)
        case ("GET", 2, "vms"):
            guard let vm = agent.status.vms.first(where: { $0.spec.id == segments[1] }) else { throw AgentError.notFound("no VM \(segments[1]) here") }
            return .json(vm)
        case ("DELETE", 2, "vms"):
            try agent.deleteVM(segments[1])
            return .noContent
        case ("POST", 3, "vms") where segments[2] == "failover":
            guard agent.status.vms.contains(where: { $0.spec.id == segments[1] && $0.state == "running" && $0.replicaHost != nil }) else {
                throw AgentError.conflict("\(segments[1]) is not a running VM with a replica here")
            }
            agent.startFailover(segments[1], reason: "asked by the operator")
            return .noContent
        case ("POST", 1, "replicas"):
            return .json(try agent.createReplica(try decode(ReplicaRequest.self, request)), status: 201)
        case ("GET", 2, "replicas"):
            guard let r = agent.status.replicas.first(where: { $0.vm == segments[1] }) else { throw AgentError.notFound("no replica of \(segments[1]) here") }
            return .json(r)
        case ("DELETE", 2, "replicas"):
            try agent.deleteReplica(segments[1])
            return .noContent
        case ("POST", 1, "incoming"):
            return .json(try agent.prepareIncoming(try decode(IncomingRequest.self, request)), status: 201)
        case ("DELETE", 2, "incoming"):
            try agent.cancelIncoming(segments[1])
            return .noContent
        case ("GET", 1, "events"):
            var since: UInt64 = 0, wait = 0.0
            for pair in request.query.split(separator: "&") {
                let kv = pair.split(separator: "=", maxSplits: 1).map(String.init)
                guard kv.count == 2 else { throw AgentError.badRequest("query '\(pair)'") }
                switch kv[0] {
                case "since": guard let n = UInt64(kv[1]) else { throw AgentError.badRequest("since=\(kv[1])") }; since = n
                case "wait": guard let w = Double(kv[1]), (0...30).contains(w) else { throw AgentError.badRequest("wait=\(kv[1]) (0...30 s)") }; wait = w
                default: throw AgentError.badRequest("unknown query parameter '\(kv[0])'")
                }
            }
            return .json(agent.events(since: since, wait: wait))
        case ("POST", 1, "events"):
            agent.record(peerEvent: try decode(AgentEvent.self, request))
            return .noContent
        case ("GET", 1, "probe"):
            return HTTPResponse(status: 200, contentType: "application/octet-stream", body: AgentRouter.probe)
        default:
            throw AgentError.notFound("\(request.method) \(request.path)")
        }
    }

    func decode<T: Decodable>(_ type: T.Type, _ request: HTTPRequest) throws -> T {
        do { return try JSONDecoder().decode(T.self, from: Data(request.body)) } catch let error as APIError {
            throw error
        } catch let error as AgentError {
            throw error
        } catch {
            throw AgentError.badRequest("the body is not a \(T.self): \(error)")
        }
    }

    static func constantTimeEqual(_ a: String, _ b: String) -> Bool {
        let x = Array(a.utf8), y = Array(b.utf8)
        var difference = UInt8(x.count == y.count ? 0 : 1)
        for i in 0..<max(x.count, y.count) { difference |= (i < x.count ? x[i] : 0) ^ (i < y.count ? y[i] : 0) }
        return difference == 0
    }
}

func jsonString(_ s: String) -> String {
    String(decoding: (try? JSONEncoder().encode(s)) ?? Data("\"\"".utf8), as: UTF8.self)
}

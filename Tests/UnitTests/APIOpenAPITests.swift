import Foundation
import Testing
@testable import API

/// Checks `api/openapi.yaml` against the code: the paths and methods against the router's table, the
/// schemas' properties and enums against the models' JSON keys and cases. The YAML is read line by line
/// (the file keeps a plain two-space layout for that).
@Suite("API OpenAPI document")
struct APIOpenAPITests {
    struct Operation: Hashable {
        var method: String
        var path: String
        var operationId: String?
        var isExtension: Bool
    }

    struct Schema {
        var properties: [String: [String]?] = [:]   // property → enum values, if any
        var enumValues: [String]? = nil
        var isExtension = false
    }

    static func document() throws -> [Substring] {
        let url = URL(fileURLWithPath: #filePath)
            .deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
            .appendingPathComponent("api/openapi.yaml")
        let text = try String(contentsOf: url, encoding: .utf8)
        return text.split(separator: "\n", omittingEmptySubsequences: false)
    }

    static func indent(_ line: Substring) -> Int { line.prefix { $0 == " " }.count }

    static func key(_ line: Substring) -> String? {
        let trimmed = line.trimmingCharacters(in: .whitespaces)
        guard !trimmed.hasPrefix("#"), !trimmed.hasPrefix("-"), let colon = trimmed.firstIndex(of: ":") else { return nil }
        return String(trimmed[..<colon]).trimmingCharacters(in: CharacterSet(charactersIn: "\"'"))
    }

    static func value(_ line: Substring) -> String {
        guard let colon = line.firstIndex(of: ":") else { return "" }
        return line[line.index(after: colon)...].trimmingCharacters(in: .whitespaces)
    }

    static func inlineList(_ text: String) -> [String]? {
        guard text.hasPrefix("["), text.hasSuffix("]") else { return nil }
        return text.dropFirst().dropLast().split(separator: ",").map {
            $0.trimmingCharacters(in: .whitespaces).trimmingCharacters(in: CharacterSet(charactersIn: "\"'"))
        }
    }

    /// The lines of the top-level section `name` (without its own line).
    static func section(_ lines: [Substring], _ name: String, indent level: Int = 0) -> [Substring] {
        guard let start = lines.firstIndex(where: { indent($0) == level && key($0) == name }) else { return [] }
        var out: [Substring] = []
        for line in lines[(start + 1)...] {
            if !line.trimmingCharacters(in: .whitespaces).isEmpty && indent(line) <= level { break }
            out.append(line)
        }
        return out
    }

    static func operations() throws -> [Operation] {
        var result: [Operation] = []
        var path: String?
        for line in section(try document(), "paths") {
            guard let k = key(line) else { continue }
            switch indent(line) {
            case 2 where k.hasPrefix("/"):
                path = k
            case 4 where ["get", "put", "patch", "post", "delete", "head", "options", "trace"].contains(k):
                result.append(Operation(method: k.uppercased(), path: path ?? "?", operationId: nil, isExtension: false))
            case 6 where k == "operationId" && !result.isEmpty:
                result[result.count - 1].operationId = value(line)
            case 6 where k == "x-godwit-extension" && !result.isEmpty:
                result[result.count - 1].isExtension = value(line) == "true"
            default:
                break
            }
        }
        return result
    }

    static func schemas() throws -> [String: Schema] {
        var result: [String: Schema] = [:]
        var name: String?
        var property: String?
        var inProperties = false
        for line in section(section(try document(), "components"), "schemas", indent: 2) {
            guard let k = key(line) else { continue }
            switch indent(line) {
            case 4:
                name = k
                result[k] = Schema()
                inProperties = false
            case 6:
                inProperties = k == "properties"
                if k == "enum", let name { result[name]?.enumValues = inlineList(value(line)) }
                if k == "x-godwit-extension", let name { result[name]?.isExtension = value(line) == "true" }
            case 8 where inProperties:
                property = k
                if let name { result[name]?.properties[k] = .some(nil) }
            case 10 where inProperties && k == "enum":
                if let name, let property { result[name]?.properties[property] = inlineList(value(line)) }
            default:
                break
            }
        }
        return result
    }

    @Test func documentedPathsAreExactlyTheServedOnes() throws {
        let documented = try APIOpenAPITests.operations()
        #expect(!documented.isEmpty)
        let documentedPairs = Set(documented.map { "\($0.method) \($0.path)" })
        let served = Set(APIRoutes.all.map(\.description))
        #expect(documentedPairs.count == documented.count, "an operation is documented twice")
        #expect(served.subtracting(documentedPairs).isEmpty, "served but undocumented: \(served.subtracting(documentedPairs).sorted())")
        #expect(documentedPairs.subtracting(served).isEmpty, "documented but not served: \(documentedPairs.subtracting(served).sorted())")
        for route in APIRoutes.all {
            guard let op = documented.first(where: { $0.method == route.method && $0.path == route.template }) else { continue }
            #expect(op.operationId == route.operation.rawValue, "\(route): operationId \(op.operationId ?? "none")")
            #expect(op.isExtension == route.isGodwitExtension, "\(route): x-godwit-extension is \(op.isExtension)")
        }
    }

    @Test func everyDocumentedOperationAnswersAndNothingElseDoes() throws {
        let router = APIRouter(controller: APIFakeController())
        for op in try APIOpenAPITests.operations() {
            let path = op.path.replacingOccurrences(of: "{drive_id}", with: "rootfs").replacingOccurrences(of: "{iface_id}", with: "eth0")
            let response = router.handle(APITest.request(op.method, path, op.method == "GET" ? nil : "{}"))
            response.stream?.cancel()
            #expect(response.status != 404 && response.status != 405, "\(op.method) \(op.path): \(response.status)")
        }
        for (method, path) in [("GET", "/balloon"), ("PUT", "/snapshot/diff"), ("PUT", "/vsock"), ("GET", "/mmds"), ("PUT", "/entropy")] {
            #expect(router.handle(APITest.request(method, path, "{}")).status == 404, "\(method) \(path)")
        }
    }

    @Test func schemasMatchTheModels() throws {
        let schemas = try APIOpenAPITests.schemas()
        func keys<K: CodingKey & CaseIterable>(_ type: K.Type) -> Set<String> { Set(K.allCases.map(\.stringValue)) }
        let models: [String: Set<String>] = [
            "Error": keys(ErrorResponse.CodingKeys.self),
            "BootSource": keys(BootSource.CodingKeys.self),
            "MachineConfiguration": keys(MachineConfiguration.CodingKeys.self),
            "MachineConfigurationUpdate": keys(MachineConfigurationUpdate.CodingKeys.self),
            "TokenBucket": keys(TokenBucket.CodingKeys.self),
            "RateLimiter": keys(RateLimiter.CodingKeys.self),
            "Drive": keys(Drive.CodingKeys.self),
            "PartialDrive": keys(PartialDrive.CodingKeys.self),
            "NetworkInterface": keys(NetworkInterface.CodingKeys.self),
            "PartialNetworkInterface": keys(PartialNetworkInterface.CodingKeys.self),
            "Logger": keys(Logger.CodingKeys.self),
            "Metrics": keys(Metrics.CodingKeys.self),
            "InstanceActionInfo": keys(InstanceActionInfo.CodingKeys.self),
            "Vm": keys(VM.CodingKeys.self),
            "InstanceInfo": keys(InstanceInfo.CodingKeys.self),
            "FirecrackerVersion": keys(FirecrackerVersion.CodingKeys.self),
            "FullVmConfiguration": keys(FullVmConfiguration.CodingKeys.self),
            "GodwitEvent": keys(GodwitEvent.CodingKeys.self),
        ]
        for (name, fields) in models {
            guard let schema = schemas[name] else { Issue.record("schema \(name) missing"); continue }
            #expect(Set(schema.properties.keys) == fields, "\(name): documented \(schema.properties.keys.sorted()), model \(fields.sorted())")
        }
        #expect(schemas["GodwitEvent"]?.isExtension == true)

        func cases<E: RawRepresentable & CaseIterable>(_ type: E.Type) -> [String] where E.RawValue == String { E.allCases.map(\.rawValue) }
        #expect(Set(schemas["CpuTemplate"]?.enumValues ?? []) == Set(cases(CpuTemplate.self)))
        #expect(Set(schemas["HugePages"]?.enumValues ?? []) == Set(cases(HugePages.self)))
        #expect(Set((schemas["Drive"]?.properties["cache_type"] ?? nil) ?? []) == Set(cases(CacheType.self)))
        #expect(Set((schemas["Drive"]?.properties["io_engine"] ?? nil) ?? []) == Set(cases(IOEngine.self)))
        #expect(Set((schemas["Logger"]?.properties["level"] ?? nil) ?? []) == Set(cases(LogLevel.self)))
        #expect(Set((schemas["InstanceActionInfo"]?.properties["action_type"] ?? nil) ?? []) == Set(cases(InstanceActionInfo.ActionType.self)))
        #expect(Set((schemas["Vm"]?.properties["state"] ?? nil) ?? []) == Set(cases(VM.State.self)))
        let states: [InstanceState] = [.notStarted, .running, .paused, .booting, .shuttingDown, .stopped]
        #expect(Set((schemas["InstanceInfo"]?.properties["state"] ?? nil) ?? []) == Set(states.map(\.rawValue)))
    }

    @Test func everyReferencedSchemaIsDefined() throws {
        let lines = try APIOpenAPITests.document()
        let schemas = try APIOpenAPITests.schemas()
        for line in lines where line.contains("$ref: \"#/components/schemas/") {
            let name = line.components(separatedBy: "#/components/schemas/").last?.trimmingCharacters(in: CharacterSet(charactersIn: "\" ")) ?? ""
            #expect(schemas[name] != nil, "undefined schema \(name)")
        }
    }
}

import Foundation

/// An error answered to an API client: an HTTP status and a `fault_message` that says what was wrong,
/// naming the field and the value where there is one.
///
/// A `VMMController` throws these; any other error it throws is answered as 400 with the error's
/// description (as Firecracker answers every failed VMM action with 400).
public enum APIError: Error, Equatable, Sendable, CustomStringConvertible {
    /// 400: the request cannot be carried out as sent (bad field, wrong state, unsupported value).
    case badRequest(String)
    /// 404: no such resource (path).
    case notFound(String)
    /// 405: the resource exists but does not take this method.
    case methodNotAllowed(String, allowed: [String])
    /// 408: the request did not arrive in time.
    case requestTimeout(String)
    /// 411: a body without Content-Length (or chunked).
    case lengthRequired(String)
    /// 413: the body is larger than the server takes.
    case payloadTooLarge(String)
    /// 417: an Expect header other than 100-continue.
    case expectationFailed(String)
    /// 431: the request line and headers are larger than the server takes.
    case headerTooLarge(String)
    /// 500: the VMM failed in a way that is not the client's fault.
    case internalError(String)
    /// 501: a method the server does not implement at all.
    case notImplemented(String)
    /// 503: too many connections.
    case serviceUnavailable(String)
    /// 505: an HTTP version other than 1.0 and 1.1.
    case httpVersionNotSupported(String)

    /// A field whose value Godwit does not support (yet).
    public static func unsupported(_ field: String, _ value: String, _ why: String = "not supported by Godwit yet") -> APIError {
        .badRequest("\(field) = \(value): \(why)")
    }

    public var status: Int {
        switch self {
        case .badRequest: return 400
        case .notFound: return 404
        case .methodNotAllowed: return 405
        case .requestTimeout: return 408
        case .lengthRequired: return 411
        case .payloadTooLarge: return 413
        case .expectationFailed: return 417
        case .headerTooLarge: return 431
        case .internalError: return 500
        case .notImplemented: return 501
        case .serviceUnavailable: return 503
        case .httpVersionNotSupported: return 505
        }
    }

    public var faultMessage: String {
        switch self {
        case let .badRequest(m), let .notFound(m), let .methodNotAllowed(m, _), let .requestTimeout(m),
             let .lengthRequired(m), let .payloadTooLarge(m), let .expectationFailed(m), let .headerTooLarge(m),
             let .internalError(m), let .notImplemented(m), let .serviceUnavailable(m), let .httpVersionNotSupported(m):
            return m
        }
    }

    public var description: String { "\(status) \(HTTPStatus.reason(status)): \(faultMessage)" }

    /// The same error with `prefix: ` before its message (for context such as "config file: drives[1]").
    func prefixed(_ prefix: String) -> APIError {
        let message = "\(prefix): \(faultMessage)"
        switch self {
        case .badRequest: return .badRequest(message)
        case .notFound: return .notFound(message)
        case let .methodNotAllowed(_, allowed): return .methodNotAllowed(message, allowed: allowed)
        case .requestTimeout: return .requestTimeout(message)
        case .lengthRequired: return .lengthRequired(message)
        case .payloadTooLarge: return .payloadTooLarge(message)
        case .expectationFailed: return .expectationFailed(message)
        case .headerTooLarge: return .headerTooLarge(message)
        case .internalError: return .internalError(message)
        case .notImplemented: return .notImplemented(message)
        case .serviceUnavailable: return .serviceUnavailable(message)
        case .httpVersionNotSupported: return .httpVersionNotSupported(message)
        }
    }

    /// Any error as an APIError: APIErrors as they are, others as 400 with their description.
    static func from(_ error: Error) -> APIError {
        if let api = error as? APIError { return api }
        if let decoding = error as? DecodingError { return .badRequest(describe(decoding)) }
        return .badRequest(String(describing: error))
    }
}

/// The JSON `{"fault_message": "..."}` every error response carries.
public struct ErrorResponse: Codable, Equatable, Sendable {
    public var faultMessage: String

    public init(faultMessage: String) { self.faultMessage = faultMessage }

    enum CodingKeys: String, CodingKey, CaseIterable { case faultMessage = "fault_message" }

    public init(from decoder: Decoder) throws {
        let c = try decoder.strictContainer(CodingKeys.self)
        faultMessage = try c.decode(String.self, forKey: .faultMessage)
    }
}

// MARK: - Strict decoding

/// Any key, for looking at all the keys of a JSON object.
struct AnyCodingKey: CodingKey {
    var stringValue: String
    var intValue: Int?
    init(stringValue: String) { self.stringValue = stringValue; intValue = nil }
    init(intValue: Int) { stringValue = String(intValue); self.intValue = intValue }
}

extension CodingUserInfoKey {
    /// Set to `true` to accept unknown fields (the client, reading what a newer server sends).
    public static let godwitLenientDecoding = CodingUserInfoKey(rawValue: "godwit.lenientDecoding")!
}

/// "a.b[2].c" for a coding path.
func fieldPath(_ path: [CodingKey], _ last: String? = nil) -> String {
    var result = ""
    for key in path {
        if let index = key.intValue {
            result += "[\(index)]"
        } else {
            if !result.isEmpty { result += "." }
            result += key.stringValue
        }
    }
    if let last {
        if !result.isEmpty { result += "." }
        result += last
    }
    return result
}

extension Decoder {
    /// The keyed container for `keys`, after checking that the object has no other field (unless the
    /// decoder is lenient). The error names the unknown field and the fields that are accepted.
    public func strictContainer<K: CodingKey & CaseIterable>(_ keys: K.Type) throws -> KeyedDecodingContainer<K> {
        if userInfo[.godwitLenientDecoding] as? Bool != true {
            let all = try container(keyedBy: AnyCodingKey.self)
            for key in all.allKeys.sorted(by: { $0.stringValue < $1.stringValue }) where K(stringValue: key.stringValue) == nil {
                let accepted = K.allCases.map(\.stringValue).joined(separator: ", ")
                throw APIError.badRequest("unknown field `\(fieldPath(codingPath, key.stringValue))` (accepted fields: \(accepted))")
            }
        }
        return try container(keyedBy: K.self)
    }

    /// A string that must be one of `E`'s raw values; the error names the field, the value and the choices.
    func decodeEnum<E: RawRepresentable & CaseIterable>(_ type: E.Type, caseInsensitive: Bool = false) throws -> E where E.RawValue == String {
        let value = try singleValueContainer().decode(String.self)
        for candidate in E.allCases {
            if candidate.rawValue == value || (caseInsensitive && candidate.rawValue.lowercased() == value.lowercased()) {
                return candidate
            }
        }
        let choices = E.allCases.map { "\"\($0.rawValue)\"" }.joined(separator: ", ")
        throw APIError.badRequest("invalid value \(jsonQuoted(value)) for `\(fieldPath(codingPath))` (expected one of \(choices))")
    }
}

extension KeyedDecodingContainer {
    /// An integer field. Foundation reports a number that is not an integer in range (1.5, 1e40) with an
    /// internal error that becomes "not valid JSON" without the field; this names the field and the value.
    func decodeInteger<T: FixedWidthInteger & Decodable>(_ type: T.Type, forKey key: Key) throws -> T {
        do {
            return try decode(T.self, forKey: key)
        } catch let error as DecodingError {
            throw error
        } catch let error as APIError {
            throw error
        } catch {
            let field = fieldPath(codingPath, key.stringValue)
            guard let number = try? decode(Double.self, forKey: key) else {
                throw APIError.badRequest("invalid value for `\(field)`: expected an integer")
            }
            if number != number.rounded() {
                throw APIError.badRequest("invalid value for `\(field)`: \(number) is not an integer")
            }
            throw APIError.badRequest("invalid value for `\(field)`: \(number) is out of range for a \(T.bitWidth)-bit integer")
        }
    }

    func decodeIntegerIfPresent<T: FixedWidthInteger & Decodable>(_ type: T.Type, forKey key: Key) throws -> T? {
        guard contains(key), try !decodeNil(forKey: key) else { return nil }
        return try decodeInteger(type, forKey: key)
    }
}

func jsonQuoted(_ s: String) -> String {
    var out = "\""
    for scalar in s.unicodeScalars.prefix(200) {
        switch scalar {
        case "\"": out += "\\\""
        case "\\": out += "\\\\"
        case "\n": out += "\\n"
        case "\r": out += "\\r"
        case "\t": out += "\\t"
        default:
            if scalar.value < 0x20 || scalar.value == 0x7f {
                out += String(format: "\\u%04x", scalar.value)
            } else {
                out.unicodeScalars.append(scalar)
            }
        }
    }
    if s.unicodeScalars.count > 200 { out += "…" }
    return out + "\""
}

private func typeName(_ type: Any.Type) -> String {
    switch type {
    case is String.Type: return "a string"
    case is Bool.Type: return "a boolean"
    case is Int.Type, is Int64.Type, is UInt64.Type, is Int32.Type, is UInt32.Type, is UInt16.Type, is UInt8.Type:
        return "an integer"
    case is Double.Type, is Float.Type: return "a number"
    default:
        let name = String(describing: type)
        if name.hasPrefix("Array") { return "an array" }
        if name.hasPrefix("Dictionary") || name.contains("KeyedDecodingContainer") { return "an object" }
        return "a value of type \(name)"
    }
}

/// A DecodingError as a message that names the field.
func describe(_ error: DecodingError) -> String {
    switch error {
    case let .typeMismatch(type, context):
        let field = fieldPath(context.codingPath)
        return field.isEmpty ? "the body must be \(typeName(type))" : "invalid type for `\(field)`: expected \(typeName(type))"
    case let .valueNotFound(type, context):
        let field = fieldPath(context.codingPath)
        return field.isEmpty ? "the body must not be null" : "`\(field)` must not be null (expected \(typeName(type)))"
    case let .keyNotFound(key, context):
        return "missing required field `\(fieldPath(context.codingPath, key.stringValue))`"
    case let .dataCorrupted(context):
        let field = fieldPath(context.codingPath)
        if field.isEmpty {
            var detail = context.debugDescription
            if let underlying = context.underlyingError {
                let text = (underlying as NSError).userInfo[NSDebugDescriptionErrorKey] as? String ?? String(describing: underlying)
                detail += ": " + text
            }
            return "malformed JSON body (\(detail))"
        }
        return "invalid value for `\(field)`: \(context.debugDescription)"
    @unknown default:
        return "malformed JSON body"
    }
}

/// Decodes `T` strictly from a JSON body; every failure is an `APIError.badRequest` naming the field.
public func decodeStrictly<T: Decodable>(_ type: T.Type, from bytes: [UInt8], what: String) throws -> T {
    if bytes.allSatisfy({ $0 == 0x20 || $0 == 0x0a || $0 == 0x0d || $0 == 0x09 }) {
        throw APIError.badRequest("\(what): the body is empty (expected a JSON object)")
    }
    do {
        return try JSONDecoder().decode(T.self, from: Data(bytes))
    } catch let error as APIError {
        throw error.prefixed(what)
    } catch let error as DecodingError {
        throw APIError.badRequest("\(what): \(describe(error))")
    } catch {
        throw APIError.badRequest("\(what): malformed JSON body (\(error))")
    }
}

/// The encoder every response and request body goes through.
func makeEncoder() -> JSONEncoder {
    let encoder = JSONEncoder()
    encoder.outputFormatting = [.sortedKeys, .withoutEscapingSlashes]
    return encoder
}

func encodeJSON<T: Encodable>(_ value: T) -> [UInt8] {
    // Encoding our own models cannot fail (no non-finite numbers, string keys only).
    (try? Array(makeEncoder().encode(value))) ?? Array("{}".utf8)
}

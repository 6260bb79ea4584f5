// A small, strict HTTP/1.1 request parser (RFC 9110/9112) for the API socket. It works on bytes and
// holds no state between calls, so it is tested over byte arrays. Every limit is checked before the
// bytes it guards are looked at; malformed input gives a status and a message, never a trap.

import Foundation

public enum HTTPStatus {
    public static func reason(_ status: Int) -> String {
        switch status {
        case 100: return "Continue"
        case 200: return "OK"
        case 204: return "No Content"
        case 400: return "Bad Request"
        case 404: return "Not Found"
        case 405: return "Method Not Allowed"
        case 408: return "Request Timeout"
        case 411: return "Length Required"
        case 413: return "Content Too Large"
        case 417: return "Expectation Failed"
        case 431: return "Request Header Fields Too Large"
        case 500: return "Internal Server Error"
        case 501: return "Not Implemented"
        case 503: return "Service Unavailable"
        case 505: return "HTTP Version Not Supported"
        default: return "Status \(status)"
        }
    }
}

/// The header fields of a message, in order; names compare case-insensitively.
public struct HTTPHeaders: Equatable, Sendable, Sequence {
    public private(set) var fields: [(name: String, value: String)] = []

    public init(_ fields: [(String, String)] = []) {
        for (n, v) in fields { add(n, v) }
    }

    public mutating func add(_ name: String, _ value: String) { fields.append((name, value)) }

    /// All values of `name`.
    public func values(_ name: String) -> [String] {
        let lower = name.lowercased()
        return fields.filter { $0.name.lowercased() == lower }.map(\.value)
    }

    /// The first value of `name`.
    public subscript(_ name: String) -> String? { values(name).first }

    public func makeIterator() -> IndexingIterator<[(name: String, value: String)]> { fields.makeIterator() }

    public static func == (a: HTTPHeaders, b: HTTPHeaders) -> Bool {
        a.fields.count == b.fields.count && zip(a.fields, b.fields).allSatisfy { $0.name == $1.name && $0.value == $1.value }
    }
}

/// A parsed request.
public struct HTTPRequest: Equatable, Sendable {
    public var method: String
    /// The request target as sent ("/drives/rootfs?x=1").
    public var target: String
    /// The target up to '?', still percent-encoded.
    public var path: String
    /// The target after '?', or "" when there is none.
    public var query: String
    /// 0 for HTTP/1.0, 1 for HTTP/1.1.
    public var minorVersion: Int
    public var headers: HTTPHeaders
    public var body: [UInt8]

    public init(method: String, target: String, minorVersion: Int = 1, headers: HTTPHeaders = HTTPHeaders(), body: [UInt8] = []) {
        self.method = method
        self.target = target
        if let q = target.firstIndex(of: "?") {
            path = String(target[..<q])
            query = String(target[target.index(after: q)...])
        } else {
            path = target
            query = ""
        }
        self.minorVersion = minorVersion
        self.headers = headers
        self.body = body
    }

    /// Whether the connection stays open after the response (HTTP/1.1 unless "close"; HTTP/1.0 only with "keep-alive").
    public var keepAlive: Bool {
        let tokens = headers.values("Connection").flatMap { $0.split(separator: ",") }
            .map { $0.trimmingCharacters(in: .whitespaces).lowercased() }
        if tokens.contains("close") { return false }
        return minorVersion >= 1 || tokens.contains("keep-alive")
    }
}

/// A response to send: a status, headers and a body, or a stream of chunks (Transfer-Encoding: chunked).
public struct HTTPResponse {
    public var status: Int
    public var headers: HTTPHeaders
    public var body: [UInt8]
    /// When set, the body is sent in chunks as the stream produces them, and the connection closes after.
    public var stream: HTTPStream?
    /// Close the connection after this response.
    public var closeConnection: Bool

    public init(status: Int, contentType: String? = "application/json", body: [UInt8] = [], extraHeaders: [(String, String)] = [],
                closeConnection: Bool = false) {
        self.status = status
        var headers = HTTPHeaders()
        if let contentType, status != 204 { headers.add("Content-Type", contentType) }
        for (n, v) in extraHeaders { headers.add(n, v) }
        self.headers = headers
        self.body = status == 204 ? [] : body
        self.stream = nil
        self.closeConnection = closeConnection
    }

    /// 200 with a JSON body.
    public static func json<T: Encodable>(_ value: T, status: Int = 200) -> HTTPResponse {
        HTTPResponse(status: status, body: encodeJSON(value))
    }

    /// 204 No Content.
    public static var noContent: HTTPResponse { HTTPResponse(status: 204, contentType: nil) }

    /// An error with `{"fault_message": ...}`.
    public static func error(_ error: APIError, closeConnection: Bool = false) -> HTTPResponse {
        var extra: [(String, String)] = []
        if case let .methodNotAllowed(_, allowed) = error { extra.append(("Allow", allowed.joined(separator: ", "))) }
        return HTTPResponse(status: error.status, body: encodeJSON(ErrorResponse(faultMessage: error.faultMessage)),
                            extraHeaders: extra, closeConnection: closeConnection)
    }

    /// A chunked streaming response.
    public static func streaming(contentType: String, _ stream: HTTPStream) -> HTTPResponse {
        var response = HTTPResponse(status: 200, contentType: contentType)
        response.stream = stream
        response.closeConnection = true
        return response
    }

    /// Status line and headers (with Content-Length or Transfer-Encoding, and Connection), then the body.
    /// A stream is sent chunked, unless `chunked` is false (an HTTP/1.0 client: the body ends when the connection closes).
    public func serialized(keepAlive: Bool, chunked: Bool = true) -> [UInt8] {
        var head = "HTTP/1.1 \(status) \(HTTPStatus.reason(status))\r\n"
        for (n, v) in headers.fields { head += "\(n): \(v)\r\n" }
        if stream != nil {
            if chunked { head += "Transfer-Encoding: chunked\r\n" }
        } else if status != 204 && status >= 200 {
            head += "Content-Length: \(body.count)\r\n"
        }
        if !keepAlive || closeConnection || stream != nil { head += "Connection: close\r\n" }
        head += "\r\n"
        return Array(head.utf8) + (stream == nil ? body : [])
    }
}

/// The source of a streaming response's chunks.
public protocol HTTPStream: AnyObject {
    /// The next piece of body, waiting at most `timeout` seconds: bytes, nothing yet, or the end.
    func next(timeout: Double) -> HTTPStreamStep
    /// The client went away or the server stops.
    func cancel()
    /// A descriptor that becomes readable when `next` may have more after answering `.idle` (nil: the
    /// server calls `next` again after a short wait).
    var readinessDescriptor: Int32? { get }
}

extension HTTPStream {
    public var readinessDescriptor: Int32? { nil }
}

public enum HTTPStreamStep: Equatable {
    case data([UInt8])
    case idle
    case end
}

/// What a failed parse answers.
public struct HTTPParseError: Error, Equatable, Sendable, CustomStringConvertible {
    public var status: Int
    public var message: String
    public init(_ status: Int, _ message: String) { self.status = status; self.message = message }
    public var description: String { "\(status) \(HTTPStatus.reason(status)): \(message)" }

    var apiError: APIError {
        switch status {
        case 408: return .requestTimeout(message)
        case 411: return .lengthRequired(message)
        case 413: return .payloadTooLarge(message)
        case 417: return .expectationFailed(message)
        case 431: return .headerTooLarge(message)
        case 501: return .notImplemented(message)
        case 505: return .httpVersionNotSupported(message)
        default: return .badRequest(message)
        }
    }
}

public enum HTTPParseResult: Equatable {
    /// More bytes are needed. `expectsContinue`: the head is complete and asked for "100 Continue".
    case incomplete(expectsContinue: Bool)
    /// A complete request, which used the first `consumed` bytes.
    case request(HTTPRequest, consumed: Int)
    /// The bytes are not an acceptable request: answer `status` and close.
    case failure(HTTPParseError)
}

public struct HTTPParser: Sendable {
    /// The request line and headers together, with their CRLFs.
    public var maxHeadBytes = 8192
    public var maxHeaderCount = 64
    public var maxBodyBytes = 65536

    public init(maxHeadBytes: Int = 8192, maxBodyBytes: Int = 65536) {
        self.maxHeadBytes = maxHeadBytes
        self.maxBodyBytes = maxBodyBytes
    }

    private static let cr: UInt8 = 0x0d, lf: UInt8 = 0x0a, sp: UInt8 = 0x20, ht: UInt8 = 0x09, colon: UInt8 = 0x3a

    /// RFC 9110 tchar.
    static func isTokenByte(_ b: UInt8) -> Bool {
        switch b {
        case 0x30...0x39, 0x41...0x5a, 0x61...0x7a: return true
        case UInt8(ascii: "!"), UInt8(ascii: "#"), UInt8(ascii: "$"), UInt8(ascii: "%"), UInt8(ascii: "&"), UInt8(ascii: "'"),
             UInt8(ascii: "*"), UInt8(ascii: "+"), UInt8(ascii: "-"), UInt8(ascii: "."), UInt8(ascii: "^"), UInt8(ascii: "_"),
             UInt8(ascii: "`"), UInt8(ascii: "|"), UInt8(ascii: "~"): return true
        default: return false
        }
    }

    /// Parses the request at the start of `bytes`. `endOfInput`: no more bytes will come (the peer closed),
    /// so an incomplete request is a failure.
    public func parse<C: RandomAccessCollection>(_ bytes: C, endOfInput: Bool = false) -> HTTPParseResult where C.Element == UInt8, C.Index == Int {
        let start = bytes.startIndex
        let count = bytes.count
        if count == 0 {
            return endOfInput ? .failure(HTTPParseError(400, "the connection closed before a request")) : .incomplete(expectsContinue: false)
        }

        // Find the end of each line within the head limit; CR must be followed by LF and LF preceded by CR.
        var lines: [Range<Int>] = []   // offsets relative to `start`, without the CRLF
        var lineStart = 0
        var headEnd: Int? = nil
        let scanLimit = min(count, maxHeadBytes)
        var i = 0
        while i < scanLimit {
            let b = bytes[start + i]
            if lines.isEmpty && ((b < 0x20 && b != HTTPParser.cr && b != HTTPParser.lf) || b >= 0x7f) {
                return .failure(HTTPParseError(400, "invalid byte 0x\(String(b, radix: 16)) in the request line"))
            }
            if b == HTTPParser.lf {
                return .failure(HTTPParseError(400, "a line ends with a bare LF (expected CRLF)"))
            }
            if b == HTTPParser.cr {
                guard i + 1 < count else { break }   // wait for the LF
                guard bytes[start + i + 1] == HTTPParser.lf else {
                    return .failure(HTTPParseError(400, "a bare CR in the request head"))
                }
                if i + 1 >= maxHeadBytes { break }
                if i == lineStart {
                    // An empty line: the end of the head (or an empty request line).
                    if lines.isEmpty { return .failure(HTTPParseError(400, "empty request line")) }
                    headEnd = i + 2
                    break
                }
                lines.append(lineStart..<i)
                if lines.count == 1, let failure = checkRequestLine(bytes, start + lineStart, start + i) {
                    return .failure(failure)
                }
                if lines.count > maxHeaderCount + 1 {
                    return .failure(HTTPParseError(431, "more than \(maxHeaderCount) header fields"))
                }
                i += 2
                lineStart = i
                continue
            }
            i += 1
        }
        guard let headEnd else {
            if count >= maxHeadBytes {
                return .failure(HTTPParseError(431, lines.isEmpty ? "the request line is longer than \(maxHeadBytes) bytes"
                                                                  : "the request head is longer than \(maxHeadBytes) bytes"))
            }
            if endOfInput { return .failure(HTTPParseError(400, "the connection closed in the middle of the request head")) }
            return .incomplete(expectsContinue: false)
        }

        // Request line (already checked): METHOD SP target SP HTTP/1.x
        let requestLine = Array(bytes[(start + lines[0].lowerBound)..<(start + lines[0].upperBound)])
        let parts = requestLine.split(separator: HTTPParser.sp, omittingEmptySubsequences: false)
        let method = String(decoding: parts[0], as: UTF8.self)
        let target = String(decoding: parts[1], as: UTF8.self)
        let minor = parts[2].last == UInt8(ascii: "1") ? 1 : 0

        // Header fields.
        var headers = HTTPHeaders()
        for line in lines.dropFirst() {
            let field = Array(bytes[(start + line.lowerBound)..<(start + line.upperBound)])
            if field.first == HTTPParser.sp || field.first == HTTPParser.ht {
                return .failure(HTTPParseError(400, "obsolete line folding in a header field"))
            }
            guard let colon = field.firstIndex(of: HTTPParser.colon) else {
                return .failure(HTTPParseError(400, "a header field without ':' (\(printable(field)))"))
            }
            let name = field[..<colon]
            if name.isEmpty || !name.allSatisfy(HTTPParser.isTokenByte) {
                return .failure(HTTPParseError(400, "invalid header field name \(printable(Array(name)))"))
            }
            var value = field[(colon + 1)...]
            while let f = value.first, f == HTTPParser.sp || f == HTTPParser.ht { value = value.dropFirst() }
            while let l = value.last, l == HTTPParser.sp || l == HTTPParser.ht { value = value.dropLast() }
            if value.contains(where: { ($0 < 0x20 && $0 != HTTPParser.ht) || $0 == 0x7f }) {
                return .failure(HTTPParseError(400, "a control character in header field \(String(decoding: name, as: UTF8.self))"))
            }
            headers.add(String(decoding: name, as: UTF8.self), String(decoding: value, as: UTF8.self))
        }

        // Framing: Content-Length only.
        if !headers.values("Transfer-Encoding").isEmpty {
            if !headers.values("Content-Length").isEmpty {
                return .failure(HTTPParseError(400, "both Transfer-Encoding and Content-Length"))
            }
            return .failure(HTTPParseError(411, "Transfer-Encoding (chunked bodies) is not supported; send Content-Length"))
        }
        let lengths = headers.values("Content-Length")
        var contentLength = 0
        if lengths.count > 1 { return .failure(HTTPParseError(400, "more than one Content-Length")) }
        if let text = lengths.first {
            guard !text.isEmpty, text.utf8.allSatisfy({ $0 >= 0x30 && $0 <= 0x39 }) else {
                return .failure(HTTPParseError(400, "invalid Content-Length \(jsonQuoted(text))"))
            }
            let digits = text.drop(while: { $0 == "0" })
            guard digits.count <= 9, let value = Int(digits.isEmpty ? "0" : String(digits)), value <= maxBodyBytes else {
                return .failure(HTTPParseError(413, "the body (Content-Length \(text)) is larger than \(maxBodyBytes) bytes"))
            }
            contentLength = value
        } else if ["PUT", "PATCH", "POST"].contains(method) {
            return .failure(HTTPParseError(411, "\(method) needs a Content-Length"))
        }

        var expectsContinue = false
        if let expect = headers["Expect"] {
            guard expect.lowercased() == "100-continue", headers.values("Expect").count == 1 else {
                return .failure(HTTPParseError(417, "unsupported Expect \(jsonQuoted(expect))"))
            }
            expectsContinue = minor == 1
        }

        let available = count - headEnd
        if available < contentLength {
            if endOfInput {
                return .failure(HTTPParseError(400, "the body is shorter than its Content-Length (\(available) of \(contentLength) bytes)"))
            }
            return .incomplete(expectsContinue: expectsContinue)
        }
        let body = Array(bytes[(start + headEnd)..<(start + headEnd + contentLength)])
        let request = HTTPRequest(method: method, target: target, minorVersion: minor, headers: headers, body: body)
        return .request(request, consumed: headEnd + contentLength)
    }

    /// Checks "METHOD SP origin-form SP HTTP/1.x" in bytes[from..<to].
    private func checkRequestLine<C: RandomAccessCollection>(_ bytes: C, _ from: Int, _ to: Int) -> HTTPParseError? where C.Element == UInt8, C.Index == Int {
        let line = Array(bytes[from..<to])
        let parts = line.split(separator: HTTPParser.sp, omittingEmptySubsequences: false)
        guard parts.count == 3 else {
            return HTTPParseError(400, "malformed request line \(printable(line)) (expected METHOD SP target SP HTTP/1.1)")
        }
        let method = parts[0], target = parts[1], version = parts[2]
        if method.isEmpty || method.count > 32 || !method.allSatisfy(HTTPParser.isTokenByte) {
            return HTTPParseError(400, "invalid method \(printable(Array(method)))")
        }
        if target.first != UInt8(ascii: "/") {
            return HTTPParseError(400, "invalid request target \(printable(Array(target))) (expected a path starting with /)")
        }
        if target.contains(where: { $0 <= 0x20 || $0 >= 0x7f }) {
            return HTTPParseError(400, "invalid character in request target \(printable(Array(target)))")
        }
        let v = Array(version)
        if v == Array("HTTP/1.1".utf8) || v == Array("HTTP/1.0".utf8) { return nil }
        if v.count == 8, v.starts(with: Array("HTTP/".utf8)), (0x30...0x39).contains(v[5]), v[6] == UInt8(ascii: "."), (0x30...0x39).contains(v[7]) {
            return HTTPParseError(505, "HTTP version \(printable(v)) is not supported (use HTTP/1.1)")
        }
        return HTTPParseError(400, "invalid HTTP version \(printable(v))")
    }
}

/// At most 80 bytes of `bytes`, quoted, with anything outside printable ASCII escaped.
func printable(_ bytes: [UInt8]) -> String {
    var out = "\""
    for b in bytes.prefix(80) {
        switch b {
        case 0x22: out += "\\\""
        case 0x5c: out += "\\\\"
        case 0x20...0x7e: out.unicodeScalars.append(Unicode.Scalar(b))
        default:
            let hex = String(b, radix: 16)
            out += "\\x" + (hex.count == 1 ? "0" + hex : hex)
        }
    }
    return out + (bytes.count > 80 ? "…\"" : "\"")
}

/// Percent-decodes one path segment or query component; nil when an escape is malformed or the result is not UTF-8.
func percentDecode(_ text: Substring, plusIsSpace: Bool = false) -> String? {
    var bytes: [UInt8] = []
    var iterator = Array(text.utf8)[...]
    while let b = iterator.popFirst() {
        if b == UInt8(ascii: "%") {
            let hex = Array(iterator.prefix(2))
            guard hex.count == 2, hex.allSatisfy({ ($0 >= 0x30 && $0 <= 0x39) || ($0 | 0x20 >= 0x61 && $0 | 0x20 <= 0x66) }),
                  let v = UInt8(String(decoding: hex, as: UTF8.self), radix: 16) else { return nil }
            bytes.append(v)
            iterator = iterator.dropFirst(2)
        } else if plusIsSpace && b == UInt8(ascii: "+") {
            bytes.append(0x20)
        } else {
            bytes.append(b)
        }
    }
    return String(validating: bytes, as: UTF8.self)
}

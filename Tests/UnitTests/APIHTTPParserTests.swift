import Testing
@testable import API

@Suite("API HTTP parser")
struct APIHTTPParserTests {
    let parser = HTTPParser()

    func parse(_ s: String, endOfInput: Bool = false) -> HTTPParseResult { parser.parse(Array(s.utf8), endOfInput: endOfInput) }

    func status(_ s: String, endOfInput: Bool = false) -> Int? {
        if case let .failure(e) = parse(s, endOfInput: endOfInput) { return e.status }
        return nil
    }

    @Test func simpleGet() throws {
        let text = "GET /machine-config HTTP/1.1\r\nHost: localhost\r\nAccept: */*\r\n\r\n"
        guard case let .request(r, consumed) = parse(text) else { Issue.record("not parsed: \(parse(text))"); return }
        #expect(consumed == text.utf8.count)
        #expect(r.method == "GET")
        #expect(r.path == "/machine-config")
        #expect(r.query == "")
        #expect(r.minorVersion == 1)
        #expect(r.headers["host"] == "localhost")
        #expect(r.headers["ACCEPT"] == "*/*")
        #expect(r.body.isEmpty)
        #expect(r.keepAlive)
    }

    @Test func putWithBodyAndQuery() throws {
        let body = #"{"vcpu_count": 2, "mem_size_mib": 256}"#
        let text = "PUT /machine-config?x=1 HTTP/1.1\r\nContent-Length: \(body.utf8.count)\r\nContent-Type: application/json\r\n\r\n\(body)"
        guard case let .request(r, consumed) = parse(text) else { Issue.record("not parsed"); return }
        #expect(consumed == text.utf8.count)
        #expect(r.path == "/machine-config")
        #expect(r.query == "x=1")
        #expect(String(decoding: r.body, as: UTF8.self) == body)
    }

    @Test func headerValuesAreTrimmedAndTabsAllowed() throws {
        guard case let .request(r, _) = parse("GET / HTTP/1.1\r\nX-A: \t value \t\r\nX-B:\r\n\r\n") else { Issue.record("not parsed"); return }
        #expect(r.headers["x-a"] == "value")
        #expect(r.headers["x-b"] == "")
    }

    @Test func keepAlivePipeline() throws {
        let one = "PUT /vm HTTP/1.1\r\nContent-Length: 20\r\n\r\n{\"state\": \"Paused\"}\n"
        let two = "GET / HTTP/1.1\r\n\r\n"
        let three = "GET /version HTTP/1.1\r\nConnection: close\r\n\r\n"
        var bytes = Array((one + two + three).utf8)[...]
        var methods: [String] = []
        var keepAlive: [Bool] = []
        while !bytes.isEmpty {
            guard case let .request(r, consumed) = parser.parse(bytes) else { Issue.record("pipeline broke at \(methods.count)"); return }
            methods.append("\(r.method) \(r.path)")
            keepAlive.append(r.keepAlive)
            bytes = bytes.dropFirst(consumed)
        }
        #expect(methods == ["PUT /vm", "GET /", "GET /version"])
        #expect(keepAlive == [true, true, false])
    }

    @Test func connectionSemanticsByVersion() throws {
        guard case let .request(a, _) = parse("GET / HTTP/1.0\r\n\r\n"),
              case let .request(b, _) = parse("GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n"),
              case let .request(c, _) = parse("GET / HTTP/1.1\r\nConnection: foo, close\r\n\r\n") else {
            Issue.record("not parsed"); return
        }
        #expect(!a.keepAlive)
        #expect(b.keepAlive)
        #expect(!c.keepAlive)
    }

    @Test func everyPrefixOfAGoodRequestIsIncomplete() throws {
        let text = Array("PATCH /drives/rootfs HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello".utf8)
        for n in 0..<text.count {
            let result = parser.parse(text[0..<n])
            #expect(result == .incomplete(expectsContinue: false), "prefix of \(n) bytes: \(result)")
        }
        guard case .request = parser.parse(text) else { Issue.record("whole request not parsed"); return }
    }

    @Test func expectContinue() throws {
        let head = "PUT /boot-source HTTP/1.1\r\nContent-Length: 10\r\nExpect: 100-continue\r\n\r\n"
        #expect(parse(head) == .incomplete(expectsContinue: true))
        guard case .request = parse(head + "0123456789") else { Issue.record("not parsed with body"); return }
        #expect(status("PUT / HTTP/1.1\r\nContent-Length: 1\r\nExpect: magic\r\n\r\n") == 417)
    }

    @Test func incompleteAtEndOfInputIsBadRequest() throws {
        #expect(status("PUT /vm HTTP/1.1\r\nContent-Length: 20\r\n\r\n{\"state\"", endOfInput: true) == 400)
        if case let .failure(e) = parse("PUT /vm HTTP/1.1\r\nContent-Length: 20\r\n\r\n{\"st", endOfInput: true) {
            #expect(e.message.contains("4 of 20"))
        }
        #expect(status("GET / HTTP/1.1\r\nHost: x\r\n", endOfInput: true) == 400)
        #expect(status("GET / HT", endOfInput: true) == 400)
    }

    @Test(arguments: [
        // Request line.
        ("GET /\r\n\r\n", 400),
        ("GET  / HTTP/1.1\r\n\r\n", 400),
        ("GET / HTTP/1.1 extra\r\n\r\n", 400),
        (" GET / HTTP/1.1\r\n\r\n", 400),
        ("GET / HTTP/2.0\r\n\r\n", 505),
        ("GET / HTTP/1.1x\r\n\r\n", 400),
        ("GET / FOO/1.1\r\n\r\n", 400),
        ("GET / http/1.1\r\n\r\n", 400),
        ("GET x HTTP/1.1\r\n\r\n", 400),
        ("GET http://localhost/ HTTP/1.1\r\n\r\n", 400),
        ("GET /a\u{7f}b HTTP/1.1\r\n\r\n", 400),
        ("G(ET / HTTP/1.1\r\n\r\n", 400),
        ("\r\nGET / HTTP/1.1\r\n\r\n", 400),
        ("GET / HTTP/1.1\n\n", 400),
        ("GET / HTTP/1.1\rX", 400),
        ("GET /\u{0} HTTP/1.1\r\n\r\n", 400),
        ("\u{16}\u{3}\u{1}\u{2}\u{0}", 400),
        // Header fields.
        ("GET / HTTP/1.1\r\nHost localhost\r\n\r\n", 400),
        ("GET / HTTP/1.1\r\nHost : localhost\r\n\r\n", 400),
        ("GET / HTTP/1.1\r\nBad Name: x\r\n\r\n", 400),
        ("GET / HTTP/1.1\r\n: x\r\n\r\n", 400),
        ("GET / HTTP/1.1\r\nX-A: a\r\n  folded\r\n\r\n", 400),
        ("GET / HTTP/1.1\r\nX-A: a\u{1}b\r\n\r\n", 400),
        ("GET / HTTP/1.1\r\nX-A: a\nX-B: b\r\n\r\n", 400),
        // Framing.
        ("PUT /vm HTTP/1.1\r\n\r\n", 411),
        ("PATCH /vm HTTP/1.1\r\nHost: x\r\n\r\n", 411),
        ("PUT /vm HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n", 411),
        ("PUT /vm HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\nhello", 400),
        ("PUT /vm HTTP/1.1\r\nContent-Length: abc\r\n\r\n", 400),
        ("PUT /vm HTTP/1.1\r\nContent-Length: -1\r\n\r\n", 400),
        ("PUT /vm HTTP/1.1\r\nContent-Length: +5\r\n\r\nhello", 400),
        ("PUT /vm HTTP/1.1\r\nContent-Length: 1 2\r\n\r\n", 400),
        ("PUT /vm HTTP/1.1\r\nContent-Length: 5, 5\r\n\r\nhello", 400),
        ("PUT /vm HTTP/1.1\r\nContent-Length:\r\n\r\n", 400),
        ("PUT /vm HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\nhello", 400),
        ("PUT /vm HTTP/1.1\r\nContent-Length: 65537\r\n\r\n", 413),
        ("PUT /vm HTTP/1.1\r\nContent-Length: 99999999999999999999999999\r\n\r\n", 413),
        ("PUT /vm HTTP/1.1\r\nContent-Length: 1\r\nExpect: 100-continue, foo\r\n\r\n", 417),
    ])
    func malformed(_ input: String, _ expected: Int) throws {
        let result = parse(input)
        guard case let .failure(error) = result else {
            Issue.record("\(input.debugDescription) gave \(result), expected \(expected)")
            return
        }
        #expect(error.status == expected, "\(input.debugDescription): \(error)")
        #expect(!error.message.isEmpty)
    }

    @Test func largestBodyAccepted() throws {
        let body = String(repeating: "x", count: 65536)
        guard case let .request(r, _) = parse("PUT /vm HTTP/1.1\r\nContent-Length: 065536\r\n\r\n" + body) else {
            Issue.record("64 KiB body refused"); return
        }
        #expect(r.body.count == 65536)
    }

    @Test func headLimits() throws {
        // A head of exactly the limit is fine; one byte more is 431.
        let base = "GET / HTTP/1.1\r\nX-Pad: \r\n\r\n"
        let fits = "GET / HTTP/1.1\r\nX-Pad: " + String(repeating: "a", count: 8192 - base.utf8.count) + "\r\n\r\n"
        #expect(fits.utf8.count == 8192)
        guard case .request = parse(fits) else { Issue.record("8192-byte head refused"); return }
        let over = "GET / HTTP/1.1\r\nX-Pad: " + String(repeating: "a", count: 8193 - base.utf8.count) + "\r\n\r\n"
        #expect(status(over) == 431)
        // Refused as soon as the limit is passed, before the end of the head arrives.
        #expect(status("GET / HTTP/1.1\r\nX-Pad: " + String(repeating: "a", count: 9000)) == 431)
        #expect(status("GET /" + String(repeating: "a", count: 9000)) == 431)
        // Too many fields.
        let many = "GET / HTTP/1.1\r\n" + (0..<100).map { "X-\($0): 1\r\n" }.joined() + "\r\n"
        #expect(status(many) == 431)
    }

    @Test func customLimits() throws {
        let small = HTTPParser(maxHeadBytes: 64, maxBodyBytes: 4)
        if case let .failure(e) = small.parse(Array("PUT / HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello".utf8)) {
            #expect(e.status == 413)
        } else {
            Issue.record("5-byte body accepted with a 4-byte limit")
        }
        if case let .failure(e) = small.parse(Array(("GET / HTTP/1.1\r\nX: " + String(repeating: "a", count: 64) + "\r\n\r\n").utf8)) {
            #expect(e.status == 431)
        } else {
            Issue.record("long head accepted")
        }
    }

    /// Random bytes and random mutations of good requests: the parser always answers, never traps, and
    /// never claims more bytes than it was given.
    @Test func neverTrapsOnHostileInput() throws {
        var rng = APISplitMix64(seed: 0x5eed)
        let seeds = [
            "PUT /drives/rootfs HTTP/1.1\r\nHost: localhost\r\nContent-Length: 17\r\n\r\n{\"drive_id\": \"a\"}",
            "GET /events?since=3 HTTP/1.1\r\nConnection: keep-alive\r\n\r\nGET / HTTP/1.1\r\n\r\n",
        ].map { Array($0.utf8) }
        for i in 0..<3000 {
            var bytes: [UInt8]
            if i % 3 == 0 {
                bytes = (0..<Int(rng.next() % 300)).map { _ in UInt8(truncatingIfNeeded: rng.next()) }
            } else {
                bytes = seeds[i % seeds.count]
                for _ in 0..<(1 + rng.next() % 6) {
                    let at = Int(rng.next() % UInt64(bytes.count))
                    switch rng.next() % 4 {
                    case 0: bytes[at] = UInt8(truncatingIfNeeded: rng.next())
                    case 1: bytes.remove(at: at)
                    case 2: bytes.insert([0x0d, 0x0a, 0x3a, 0x20, 0x30, 0x00, 0xff][Int(rng.next() % 7)], at: at)
                    default: bytes = Array(bytes[0..<at])
                    }
                    if bytes.isEmpty { break }
                }
            }
            for end in [false, true] {
                if case let .request(_, consumed) = parser.parse(bytes, endOfInput: end) {
                    #expect(consumed <= bytes.count)
                }
            }
        }
    }

    @Test func responseSerialization() throws {
        let noContent = String(decoding: HTTPResponse.noContent.serialized(keepAlive: true), as: UTF8.self)
        #expect(noContent == "HTTP/1.1 204 No Content\r\n\r\n")
        let ok = String(decoding: HTTPResponse.json(FirecrackerVersion(firecrackerVersion: "1.0")).serialized(keepAlive: false), as: UTF8.self)
        let json = #"{"firecracker_version":"1.0"}"#
        #expect(ok == "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: \(json.utf8.count)\r\nConnection: close\r\n\r\n" + json)
        let bad = String(decoding: HTTPResponse.error(.badRequest("vcpu_count = 0 is out of range")).serialized(keepAlive: true), as: UTF8.self)
        #expect(bad.hasPrefix("HTTP/1.1 400 Bad Request\r\nContent-Type: application/json\r\n"))
        #expect(bad.hasSuffix("\r\n\r\n{\"fault_message\":\"vcpu_count = 0 is out of range\"}"))
        let notAllowed = String(decoding: HTTPResponse.error(.methodNotAllowed("no", allowed: ["GET", "PUT"])).serialized(keepAlive: true), as: UTF8.self)
        #expect(notAllowed.contains("\r\nAllow: GET, PUT\r\n"))
    }

    @Test func percentDecoding() throws {
        #expect(percentDecode("root%5Ffs") == "root_fs")
        #expect(percentDecode("a%2Fb") == "a/b")
        #expect(percentDecode("a+b", plusIsSpace: true) == "a b")
        #expect(percentDecode("a%2") == nil)
        #expect(percentDecode("a%zz") == nil)
        #expect(percentDecode("a%+1") == nil)
        #expect(percentDecode("%4a%4A") == "JJ")
        #expect(percentDecode("%ff") == nil)   // not UTF-8
    }
}

/// A small deterministic generator for the hostile-input tests.
struct APISplitMix64 {
    var state: UInt64
    init(seed: UInt64) { state = seed }
    mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
}

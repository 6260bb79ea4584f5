import Foundation
import GodwitSystem
import Testing
@testable import API
#if canImport(Glibc)
import Glibc
#endif

@Suite("API server and client over a Unix socket")
struct APIServerTests {
    func expectServerError(_ status: Int, _ fragments: String..., sourceLocation: SourceLocation = #_sourceLocation, _ body: () throws -> Void) {
        do {
            try body()
            Issue.record("succeeded", sourceLocation: sourceLocation)
        } catch let APIClientError.server(got, message) {
            #expect(got == status, "\(got): \(message)", sourceLocation: sourceLocation)
            for f in fragments { #expect(message.contains(f), "\(message) lacks \(f)", sourceLocation: sourceLocation) }
        } catch {
            Issue.record("unexpected error \(error)", sourceLocation: sourceLocation)
        }
    }

    @Test func typedClientReachesEveryEndpoint() throws {
        let (server, controller, path) = try APITest.server()
        defer { server.stop() }
        let client = APIClient(socketPath: path, timeout: 10)
        defer { client.close() }

        #expect(try client.instanceInfo().state == .notStarted)
        #expect(try client.version().firecrackerVersion == "0.1.0")
        #expect(try client.machineConfig() == MachineConfiguration())
        try client.putLogger(Logger(level: .debug, logPath: "/tmp/log"))
        try client.putMetrics(Metrics(metricsPath: "/tmp/metrics"))
        try client.putMachineConfig(MachineConfiguration(vcpuCount: 2, memSizeMib: 256))
        try client.patchMachineConfig(MachineConfigurationUpdate(memSizeMib: 384))
        try client.putBootSource(BootSource(kernelImagePath: "/guest.elf", bootArgs: "console=ttyS0"))
        try client.putDrive(Drive(driveId: "rootfs", pathOnHost: "/disk.img", isRootDevice: true, isReadOnly: false))
        try client.putNetworkInterface(NetworkInterface(ifaceId: "eth0", hostDevName: "tap0", guestMac: "06:00:ac:10:00:02"))
        let events = try client.events(since: 0)
        defer { events.close() }
        try client.instanceStart()
        try client.pause()
        #expect(try client.instanceInfo().state == .paused)
        try client.resume()
        try client.patchDrive(PartialDrive(driveId: "rootfs", pathOnHost: "/bigger.img"))
        try client.patchNetworkInterface(PartialNetworkInterface(ifaceId: "eth0", rxRateLimiter: RateLimiter(ops: TokenBucket(size: 10, refillTime: 100))))
        try client.flushMetrics()
        try client.sendCtrlAltDel()
        let config = try client.vmConfig()
        #expect(config.machineConfig?.memSizeMib == 384)
        #expect(config.drives?.first?.pathOnHost == "/bigger.img")
        #expect(config.bootSource?.bootArgs == "console=ttyS0")
        #expect(try client.prometheusMetrics().contains("godwit_uptime_seconds 1.5"))

        var kinds: [GodwitEvent.Kind] = []
        while kinds.count < 3, let event = try events.next(timeout: 5) { kinds.append(event.type) }
        #expect(kinds == [.booted, .paused, .resumed])
        #expect(controller.calls.contains("sendCtrlAltDel"))
    }

    @Test func errorsCarryTheFaultMessage() throws {
        let (server, _, path) = try APITest.server()
        defer { server.stop() }
        let client = APIClient(socketPath: path, timeout: 10)
        expectServerError(400, "vcpu_count = 0") { try client.putMachineConfig(MachineConfiguration(vcpuCount: 0, memSizeMib: 128)) }
        expectServerError(400, "invalid drive_id") { try client.putDrive(Drive(driveId: "a/b", pathOnHost: "/x")) }
        expectServerError(400, "not running") { try client.pause() }
        let notFound = try client.request("GET", "/balloon")
        #expect(notFound.status == 404)
        let wrongMethod = try client.request("DELETE", "/vm")
        #expect(wrongMethod.status == 405 && wrongMethod.headers["Allow"] == "PATCH")
        let unknownField = try client.request("PUT", "/boot-source", body: Array(#"{"kernel_image_path": "/k", "foo": 1}"#.utf8))
        #expect(unknownField.status == 400)
        #expect(String(decoding: unknownField.body, as: UTF8.self).contains("unknown field `foo`"))
        // The connection survived all of that.
        #expect(try client.version().firecrackerVersion == "0.1.0")
        let missing = APIClient(socketPath: path + ".missing", timeout: 1)
        #expect(throws: APIClientError.self) { try missing.version() }
    }

    /// 50 clients on 50 threads, all connected at once (each holds its kept-alive connection while the
    /// others connect), then 10 requests each: every request answered, none refused.
    @Test func fiftyConcurrentClients() throws {
        let controller = APIFakeController()
        controller.delay = 0.001
        let (server, _, path) = try APITest.server(controller)
        defer { server.stop() }
        let clients = 50
        let state = ConditionLock()
        var connected = 0, finished = 0
        var errors: [String] = []
        for i in 0..<clients {
            try startThread(name: "client\(i)") {
                let client = APIClient(socketPath: path, timeout: 30)
                defer { client.close() }
                func note(_ j: Int, _ error: Error) { state.withLock { errors.append("client \(i) request \(j): \(error)") } }
                do { _ = try client.instanceInfo() } catch { note(0, error) }
                state.withLock {
                    connected += 1
                    state.broadcast()
                    while connected < clients { state.wait(until: monotonicNow() + 1) }
                }
                for j in 1..<10 {
                    do {
                        if j % 2 == 0 {
                            _ = try client.instanceInfo()
                        } else {
                            try client.putMachineConfig(MachineConfiguration(vcpuCount: 1 + (i + j) % 32, memSizeMib: 128))
                        }
                    } catch {
                        note(j, error)
                    }
                }
                state.withLock {
                    finished += 1
                    state.broadcast()
                }
            }
        }
        let deadline = monotonicNow() + 60
        state.withLock { while finished < clients && monotonicNow() < deadline { state.wait(until: monotonicNow() + 0.5) } }
        state.withLock {
            #expect(finished == clients)
            #expect(errors.isEmpty, "\(errors.prefix(5))")
        }
        #expect(controller.calls.count == clients * 10)
        #expect(server.peakActiveConnections == clients)
        #expect(server.rejectedConnections == 0)
    }

    @Test func pipelinedRequestsOnOneConnection() throws {
        let (server, _, path) = try APITest.server()
        defer { server.stop() }
        let raw = try APIRawConnection(path)
        defer { raw.close() }
        let body = #"{"vcpu_count": 2, "mem_size_mib": 256}"#
        try raw.send("GET /version HTTP/1.1\r\n\r\nPUT /machine-config HTTP/1.1\r\nContent-Length: \(body.utf8.count)\r\n\r\n\(body)GET /machine-config HTTP/1.1\r\n\r\n")
        let responses = raw.readResponses(3)
        #expect(responses.map(\.status) == [200, 204, 200])
        let last = String(decoding: responses.last?.body ?? [], as: UTF8.self)
        #expect(last.contains("\"mem_size_mib\":256"))
    }

    @Test func malformedRequestsGet400AndTheServerKeepsServing() throws {
        let (server, _, path) = try APITest.server()
        defer { server.stop() }
        for garbage in ["GARBAGE\r\n\r\n", "GET / HTTP/1.1\nHost: x\n\n", "\u{16}\u{3}\u{1}\u{0}\u{a5}\u{1}", "PUT /vm HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
                        "GET / HTTP/1.1\r\nX: " + String(repeating: "a", count: 10000) + "\r\n\r\n"] {
            let raw = try APIRawConnection(path)
            try? raw.send(garbage)
            let answer = raw.readAll()
            #expect(answer.hasPrefix("HTTP/1.1 4"), "\(garbage.prefix(30).debugDescription) → \(answer.prefix(60).debugDescription)")
            #expect(answer.contains("fault_message"))
            #expect(answer.contains("Connection: close"))
            raw.close()
        }
        #expect(try APIClient(socketPath: path, timeout: 5).version().firecrackerVersion == "0.1.0")
    }

    @Test func oversizedBodyGets413() throws {
        let (server, _, path) = try APITest.server()
        defer { server.stop() }
        let client = APIClient(socketPath: path, timeout: 10)
        let huge = Array(#"{"kernel_image_path": ""#.utf8) + [UInt8](repeating: 0x61, count: 1 << 20) + Array(#""}"#.utf8)
        let response = try client.request("PUT", "/boot-source", body: huge)
        #expect(response.status == 413)
        #expect(String(decoding: response.body, as: UTF8.self).contains("65536"))
        #expect(try client.version().firecrackerVersion == "0.1.0")
    }

    @Test func clientThatDisconnectsMidBody() throws {
        let (server, controller, path) = try APITest.server()
        defer { server.stop() }
        for _ in 0..<20 {
            let raw = try APIRawConnection(path)
            try raw.send("PUT /boot-source HTTP/1.1\r\nContent-Length: 100\r\n\r\n{\"kernel_image_path\"")
            raw.close()
        }
        #expect(try APIClient(socketPath: path, timeout: 5).instanceInfo().state == .notStarted)
        #expect(!controller.calls.contains { $0.hasPrefix("putBootSource") })
    }

    @Test func clientThatStallsMidBodyTimesOut() throws {
        var options = APIServer.Options()
        options.requestTimeout = 0.3
        let (server, _, path) = try APITest.server(options: options)
        defer { server.stop() }
        let raw = try APIRawConnection(path)
        defer { raw.close() }
        let start = monotonicNow()
        try raw.send("PUT /boot-source HTTP/1.1\r\nContent-Length: 100\r\n\r\n{\"kernel")
        let answer = raw.readAll(timeout: 5)
        #expect(answer.hasPrefix("HTTP/1.1 408 Request Timeout"), "\(answer.debugDescription)")
        #expect(monotonicNow() - start < 4)
        // A stalled head is timed out the same way.
        let head = try APIRawConnection(path)
        defer { head.close() }
        try head.send("GET / HTTP/1.1\r\nHost: loc")
        #expect(head.readAll(timeout: 5).hasPrefix("HTTP/1.1 408"))
        // The threads are free again once they have drained what the clients still send (at most 0.5 s).
        let deadline = monotonicNow() + 5
        while server.activeConnections > 0 && monotonicNow() < deadline { usleep(10_000) }
        #expect(server.activeConnections == 0)
    }

    @Test func idleConnectionsAreClosed() throws {
        var options = APIServer.Options()
        options.idleTimeout = 0.2
        let (server, _, path) = try APITest.server(options: options)
        defer { server.stop() }
        let raw = try APIRawConnection(path)
        defer { raw.close() }
        try raw.send("GET /version HTTP/1.1\r\n\r\n")
        let answer = raw.readAll(timeout: 5)   // the answer, then the server closes after 0.2 s idle
        #expect(answer.hasPrefix("HTTP/1.1 200"))
        // The client re-opens a connection the server closed.
        let client = APIClient(socketPath: path, timeout: 5)
        _ = try client.version()
        usleep(400_000)
        _ = try client.version()
    }

    @Test func connectionsBeyondThePoolGet503() throws {
        var options = APIServer.Options()
        options.maxConnections = 3
        let (server, _, path) = try APITest.server(options: options)
        defer { server.stop() }
        var held: [APIRawConnection] = []
        for _ in 0..<3 {
            let raw = try APIRawConnection(path)
            try raw.send("GET /version HTTP/1.1\r\n\r\n")
            #expect(raw.readResponses(1).first?.status == 200)
            held.append(raw)
        }
        let extra = try APIRawConnection(path)
        let answer = extra.readAll(timeout: 5)
        #expect(answer.hasPrefix("HTTP/1.1 503"), "\(answer.debugDescription)")
        #expect(server.rejectedConnections == 1)
        extra.close()
        // Freed slots are reused.
        for raw in held { raw.close() }
        let deadline = monotonicNow() + 5
        while server.activeConnections > 0 && monotonicNow() < deadline { usleep(10_000) }
        #expect(try APIClient(socketPath: path, timeout: 5).version().firecrackerVersion == "0.1.0")
    }

    @Test func eventStreamEndsWhenTheServerStops() throws {
        let (server, controller, path) = try APITest.server()
        let client = APIClient(socketPath: path, timeout: 10)
        let stream = try client.events()
        controller.hub.publish(.deviceFault, details: ["device": "rootfs", "error": "EIO"])
        let event = try stream.next(timeout: 5)
        #expect(event?.type == .deviceFault && event?.details["device"] == "rootfs")
        let start = monotonicNow()
        server.stop()
        #expect(try stream.next(timeout: 5) == nil)
        #expect(monotonicNow() - start < 4)
        #expect(access(path, F_OK) != 0, "socket file left behind")
    }

    @Test func eventStreamEndsWhenTheClientGoesAway() throws {
        let (server, controller, path) = try APITest.server()
        defer { server.stop() }
        let stream = try APIClient(socketPath: path).events()
        let deadline = monotonicNow() + 5
        while server.activeConnections == 0 && monotonicNow() < deadline { usleep(10_000) }
        #expect(server.activeConnections == 1)
        stream.close()
        while server.activeConnections > 0 && monotonicNow() < deadline { usleep(10_000) }
        #expect(server.activeConnections == 0)
        controller.hub.publish(.shutdown)
    }

    /// A stream's thread is freed as soon as its client closes (it waits on the client and the events at once),
    /// so clients that come and go cannot use up the pool.
    @Test func eventStreamChurnDoesNotExhaustThePool() throws {
        var options = APIServer.Options()
        options.maxConnections = 4
        let (server, _, path) = try APITest.server(options: options)
        defer { server.stop() }
        let client = APIClient(socketPath: path, timeout: 5)
        for _ in 0..<40 {
            let stream = try client.events()
            stream.close()
        }
        _ = try client.version()
        #expect(server.rejectedConnections == 0)
    }

    @Test func eventsOverHTTP10AreNotChunked() throws {
        let (server, controller, path) = try APITest.server()
        defer { server.stop() }
        controller.hub.publish(.booted)
        let raw = try APIRawConnection(path)
        try raw.send("GET /events?since=0 HTTP/1.0\r\n\r\n")
        usleep(200_000)
        server.stop()
        let answer = raw.readAll()
        #expect(answer.hasPrefix("HTTP/1.1 200 OK"))
        #expect(!answer.contains("chunked"))
        #expect(answer.contains("\r\n\r\n{\"details\":{},\"seq\":1,"))
    }

    @Test func staleSocketFilesAreReplacedAndOthersLeftAlone() throws {
        let path = APITest.socketPath()
        // A socket file nobody listens on.
        let stale = try UnixSocket.listen(path: path)
        stale.close()
        #expect(access(path, F_OK) == 0)
        let server = APIServer(socketPath: path, controller: APIFakeController())
        try server.start()
        #expect(try APIClient(socketPath: path, timeout: 5).version().firecrackerVersion == "0.1.0")
        // A live socket is not taken over.
        let second = APIServer(socketPath: path, controller: APIFakeController())
        #expect(throws: SystemError.self) { try second.start() }
        server.stop()
        #expect(access(path, F_OK) != 0)
        // A regular file is not removed.
        let file = APITest.socketPath()
        #expect(FileManager.default.createFile(atPath: file, contents: Data("keep".utf8)))
        defer { unlink(file) }
        #expect(throws: SystemError.self) { try APIServer(socketPath: file, controller: APIFakeController()).start() }
        #expect(FileManager.default.contents(atPath: file) == Data("keep".utf8))
        // A path too long for sockaddr_un is an error, not a truncation.
        #expect(throws: SystemError.self) { try APIServer(socketPath: "/tmp/" + String(repeating: "x", count: 200), controller: APIFakeController()).start() }
    }

    @Test func stopIsIdempotentAndWithoutStartHarmless() throws {
        let idle = APIServer(socketPath: APITest.socketPath(), controller: APIFakeController())
        idle.stop()
        let (server, _, _) = try APITest.server()
        server.stop()
        server.stop()
        #expect(throws: SystemError.self) { try server.start() }
    }

    /// curl, the client of Firecracker's getting-started guide, drives the server as it drives Firecracker
    /// (including `Expect: 100-continue` for bodies over 1 KiB). Skipped without curl.
    @Test func curlCompatibility() throws {
        let candidates: [String] = ["/usr/bin/curl", "/bin/curl", "/usr/local/bin/curl"]
        guard let curl = candidates.first(where: { access($0, X_OK) == 0 }) else {
            print("skipped: curl not installed")
            return
        }
        let (server, controller, path) = try APITest.server()
        defer { server.stop() }
        func run(_ arguments: [String]) throws -> String {
            let process = Process()
            process.executableURL = URL(fileURLWithPath: curl)
            process.arguments = ["-sS", "--max-time", "10", "--unix-socket", path] + arguments
            let pipe = Pipe()
            process.standardOutput = pipe
            try process.run()
            let data = pipe.fileHandleForReading.readDataToEndOfFile()
            process.waitUntilExit()
            return String(decoding: data, as: UTF8.self)
        }
        let longArgs = String(repeating: "quiet ", count: 300)
        let status = try run(["-o", "/dev/null", "-w", "%{http_code}", "-X", "PUT", "http://localhost/boot-source",
                              "-H", "Accept: application/json", "-H", "Content-Type: application/json",
                              "-d", #"{"kernel_image_path": "/guest.elf", "boot_args": "\#(longArgs)"}"#])
        #expect(status == "204")
        #expect(controller.bootSource?.bootArgs == longArgs)
        let info = try run(["http://localhost/"])
        #expect(info.contains("\"state\":\"Not started\""))
        let bad = try run(["-X", "PUT", "http://localhost/machine-config", "-d", #"{"vcpu_count": 0, "mem_size_mib": 128}"#])
        #expect(bad.contains("vcpu_count = 0"))
    }
}

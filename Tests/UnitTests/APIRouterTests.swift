import Foundation
import Testing
@testable import API

@Suite("API router")
struct APIRouterTests {
    /// A valid request for every route the router serves.
    static let sample: [APIRoute.Operation: (String, String?)] = [
        .describeInstance: ("/", nil),
        .createSyncAction: ("/actions", #"{"action_type": "FlushMetrics"}"#),
        .putGuestBootSource: ("/boot-source", #"{"kernel_image_path": "/vmlinux", "boot_args": "console=ttyS0"}"#),
        .putGuestDriveByID: ("/drives/rootfs", #"{"drive_id": "rootfs", "path_on_host": "/rootfs.ext4", "is_root_device": true, "is_read_only": false}"#),
        .patchGuestDriveByID: ("/drives/rootfs", #"{"drive_id": "rootfs", "path_on_host": "/bigger.ext4"}"#),
        .putLogger: ("/logger", #"{"log_path": "/tmp/log", "level": "Warning"}"#),
        .getMachineConfiguration: ("/machine-config", nil),
        .putMachineConfiguration: ("/machine-config", #"{"vcpu_count": 2, "mem_size_mib": 256}"#),
        .patchMachineConfiguration: ("/machine-config", #"{"mem_size_mib": 512}"#),
        .putMetrics: ("/metrics", #"{"metrics_path": "/tmp/metrics"}"#),
        .putGuestNetworkInterfaceByID: ("/network-interfaces/eth0", #"{"iface_id": "eth0", "host_dev_name": "tap0", "guest_mac": "06:00:ac:10:00:02"}"#),
        .patchGuestNetworkInterfaceByID: ("/network-interfaces/eth0", #"{"iface_id": "eth0", "rx_rate_limiter": {"ops": {"size": 100, "refill_time": 1000}}}"#),
        .getFirecrackerVersion: ("/version", nil),
        .patchVm: ("/vm", #"{"state": "Paused"}"#),
        .getExportVmConfig: ("/vm/config", nil),
        .getEvents: ("/events", nil),
        .getPrometheusMetrics: ("/metrics", nil),
        .createSnapshot: ("/snapshot/create", #"{"snapshot_type": "Full", "snapshot_path": "/tmp/s", "mem_file_path": "/tmp/m"}"#),
        .loadSnapshot: ("/snapshot/load", #"{"snapshot_path": "/tmp/s", "mem_backend": {"backend_type": "File", "backend_path": "/tmp/m"}, "resume_vm": true}"#),
        .receiveMigration: ("/migration/receive", #"{"receiver_url": "tcp:0.0.0.0:6000"}"#),
        .sendMigration: ("/migration/send", #"{"destination_url": "tcp:10.0.0.2:6000", "downtime_ms": 50, "timeout_s": 60, "max_bandwidth_mbps": 800}"#),
        .getMigration: ("/migration", nil),
        .putFence: ("/fence", #"{"deadline_ms": 2500}"#),
        .putSerialInput: ("/serial/input", #"{"data": "info\r"}"#),
    ]

    func handle(_ router: APIRouter, _ method: String, _ target: String, _ body: String? = nil) -> HTTPResponse {
        let response = router.handle(APITest.request(method, target, body))
        response.stream?.cancel()
        return response
    }

    /// The answer is 400 and its fault_message contains every fragment.
    func expect400(_ response: HTTPResponse, _ fragments: String..., sourceLocation: SourceLocation = #_sourceLocation) {
        #expect(response.status == 400, "\(response.status) \(APITest.fault(response))", sourceLocation: sourceLocation)
        let message = APITest.fault(response)
        for f in fragments { #expect(message.contains(f), "\(message) lacks \(f)", sourceLocation: sourceLocation) }
    }

    @Test func everyRouteIsServed() throws {
        #expect(Set(APIRouterTests.sample.keys) == Set(APIRoute.Operation.allCases))
        #expect(Set(APIRoutes.all.map(\.operation)) == Set(APIRoute.Operation.allCases))
        #expect(Set(APIRoutes.all.map(\.description)).count == APIRoutes.all.count, "duplicate routes")
        for route in APIRoutes.all {
            let controller = APIFakeController()
            let router = APIRouter(controller: controller)
            // Post-boot requests need a started VM, with the drive they patch.
            if [.patchGuestDriveByID, .patchGuestNetworkInterfaceByID, .patchVm].contains(route.operation) {
                #expect(handle(router, "PUT", "/drives/rootfs", APIRouterTests.sample[.putGuestDriveByID]!.1).status == 204)
                #expect(handle(router, "PUT", "/actions", #"{"action_type": "InstanceStart"}"#).status == 204)
            }
            let (target, body) = APIRouterTests.sample[route.operation]!
            let response = handle(router, route.method, target, body)
            let expected = route.method == "GET" ? 200 : 204
            #expect(response.status == expected, "\(route): \(response.status) \(APITest.fault(response))")
        }
    }

    @Test func getsAnswerJSON() throws {
        let controller = APIFakeController()
        let router = APIRouter(controller: controller)
        let info = handle(router, "GET", "/")
        #expect(info.headers["Content-Type"] == "application/json")
        let decoded = try JSONDecoder().decode(InstanceInfo.self, from: Data(info.body))
        #expect(decoded.state == .notStarted && decoded.appName == "Godwit")
        let version = try JSONDecoder().decode(FirecrackerVersion.self, from: Data(handle(router, "GET", "/version").body))
        #expect(version.firecrackerVersion == "0.1.0")
        let machine = try JSONDecoder().decode(MachineConfiguration.self, from: Data(handle(router, "GET", "/machine-config").body))
        #expect(machine == MachineConfiguration())
        let metrics = handle(router, "GET", "/metrics")
        #expect(metrics.headers["Content-Type"] == "text/plain; version=0.0.4")
        #expect(String(decoding: metrics.body, as: UTF8.self).hasSuffix("godwit_uptime_seconds 1.5\n"))
        let events = router.handle(APITest.request("GET", "/events?since=0"))
        #expect(events.stream != nil && events.headers["Content-Type"] == "application/x-ndjson")
        events.stream?.cancel()
        #expect(controller.calls.last == "subscribeEvents(0)")
    }

    @Test func putsReachTheControllerWithTheirValues() throws {
        let controller = APIFakeController()
        let router = APIRouter(controller: controller)
        for op in [APIRoute.Operation.putGuestBootSource, .putMachineConfiguration, .patchMachineConfiguration, .putGuestDriveByID,
                   .putGuestNetworkInterfaceByID, .putLogger, .putMetrics] {
            let (target, body) = APIRouterTests.sample[op]!
            let method = op == .patchMachineConfiguration ? "PATCH" : "PUT"
            #expect(handle(router, method, target, body).status == 204, "\(op)")
        }
        #expect(handle(router, "PUT", "/actions", #"{"action_type": "InstanceStart"}"#).status == 204)
        #expect(handle(router, "PUT", "/actions", #"{"action_type": "SendCtrlAltDel"}"#).status == 204)
        #expect(controller.calls == ["putBootSource(/vmlinux)", "putMachineConfig(2,256)", "patchMachineConfig(2,512)", "putDrive(rootfs)",
                                     "putNetworkInterface(eth0)", "putLogger", "putMetrics", "instanceStart", "sendCtrlAltDel"])
        #expect(controller.bootSource?.bootArgs == "console=ttyS0")
        #expect(controller.drives["rootfs"]?.isRootDevice == true)
        #expect(controller.interfaces["eth0"]?.guestMac == "06:00:ac:10:00:02")
        #expect(controller.logger?.level == .warning)
        // Pre-boot only after boot: the controller's refusal is a 400 with its reason.
        expect400(handle(router, "PUT", "/boot-source", #"{"kernel_image_path": "/k"}"#), "pre-boot only")
        let config = try JSONDecoder().decode(FullVmConfiguration.self, from: Data(handle(router, "GET", "/vm/config").body))
        #expect(config.drives?.map(\.driveId) == ["rootfs"])
        #expect(config.machineConfig?.memSizeMib == 512)
    }

    @Test func idInPathMustMatchTheBody() {
        let router = APIRouter(controller: APIFakeController())
        expect400(handle(router, "PUT", "/drives/other", APIRouterTests.sample[.putGuestDriveByID]!.1), "drive_id in the path (`other`)", "\"rootfs\"")
        expect400(handle(router, "PATCH", "/drives/other", #"{"drive_id": "rootfs"}"#), "does not match")
        expect400(handle(router, "PUT", "/network-interfaces/eth1", APIRouterTests.sample[.putGuestNetworkInterfaceByID]!.1), "iface_id", "`eth1`")
        expect400(handle(router, "PATCH", "/network-interfaces/eth1", #"{"iface_id": "eth0"}"#), "iface_id")
        expect400(handle(router, "PUT", "/drives/", #"{"drive_id": "", "is_root_device": true, "path_on_host": "/x"}"#), "drive_id")
        expect400(handle(router, "PUT", "/drives/a-b", #"{"drive_id": "a-b", "is_root_device": true, "path_on_host": "/x"}"#), "invalid drive_id")
        expect400(handle(router, "PUT", "/drives/a%2Fb", #"{"drive_id": "a/b", "is_root_device": true, "path_on_host": "/x"}"#), "invalid drive_id")
        expect400(handle(router, "PUT", "/drives/a%zz", #"{"drive_id": "a", "is_root_device": true, "path_on_host": "/x"}"#), "percent-encoding")
        // Percent-encoded ids are decoded before the comparison.
        #expect(handle(router, "PUT", "/drives/root%5Ffs", #"{"drive_id": "root_fs", "is_root_device": true, "path_on_host": "/x"}"#).status == 204)
    }

    @Test func badBodiesAreRefusedNamingTheField() {
        let router = APIRouter(controller: APIFakeController())
        expect400(handle(router, "PUT", "/machine-config", #"{"vcpu_count": 2, "mem_size_mib": 256, "ht_enabled": true}"#), "PUT /machine-config", "unknown field `ht_enabled`")
        expect400(handle(router, "PUT", "/machine-config", #"{"vcpu_count": "two", "mem_size_mib": 256}"#), "vcpu_count", "integer")
        expect400(handle(router, "PUT", "/machine-config", #"{"vcpu_count": -2, "mem_size_mib": 256}"#), "vcpu_count = -2")
        expect400(handle(router, "PUT", "/machine-config", #"{"vcpu_count": 2, "mem_size_mib": 99999999999}"#), "mem_size_mib = 99999999999")
        expect400(handle(router, "PUT", "/machine-config", #"{"vcpu_count": 2, "mem_size_mib": 1e300}"#), "mem_size_mib")
        expect400(handle(router, "PATCH", "/machine-config", #"{"vcpu_count": 0}"#), "vcpu_count = 0")
        expect400(handle(router, "PATCH", "/machine-config", #"{"smt": "on"}"#), "smt", "boolean")
        expect400(handle(router, "PUT", "/drives/d", #"{"drive_id": "d", "is_root_device": false, "path_on_host": "/d", "rate_limiter": {"bandwidth": {"size": -1, "refill_time": 5}}}"#),
                  "rate_limiter.bandwidth.size = -1")
        expect400(handle(router, "PUT", "/drives/d", #"{"drive_id": "d", "is_root_device": false}"#), "path_on_host")
        expect400(handle(router, "PUT", "/network-interfaces/e", #"{"iface_id": "e", "host_dev_name": "tap0", "guest_mac": "zz:00:00:00:00:00"}"#), "guest_mac", "zz:00")
        expect400(handle(router, "PUT", "/boot-source", #"{"kernel_image_path": "/k", "initrd": "/i"}"#), "unknown field `initrd`")
        expect400(handle(router, "PUT", "/boot-source", #"{"boot_args": "x"}"#), "missing required field `kernel_image_path`")
        expect400(handle(router, "PUT", "/actions", #"{"action_type": "Reboot"}"#), "action_type", "Reboot")
        expect400(handle(router, "PATCH", "/vm", #"{"state": "Stopped"}"#), "state", "Paused")
        expect400(handle(router, "PUT", "/logger", #"{"level": 3}"#), "level", "string")
        expect400(handle(router, "PUT", "/metrics", "{}"), "metrics_path")
        expect400(handle(router, "PUT", "/boot-source", "{"), "malformed JSON")
        expect400(handle(router, "PUT", "/boot-source", ""), "empty")
        expect400(handle(router, "PUT", "/boot-source", "\u{FFFD}\u{0}"), "PUT /boot-source")
        expect400(handle(router, "PUT", "/boot-source", String(repeating: "[", count: 50000)), "PUT /boot-source")
    }

    @Test func unknownPathsAndMethods() {
        let router = APIRouter(controller: APIFakeController())
        for path in ["/nope", "/machine-config/", "/drives", "/drives/a/b", "/vm/config/x", "//", "/balloon", "/snapshot/diff", "/mmds"] {
            let response = handle(router, "GET", path)
            #expect(response.status == 404, "\(path): \(response.status)")
            #expect(APITest.fault(response).contains(path))
        }
        let wrong = handle(router, "DELETE", "/machine-config")
        #expect(wrong.status == 405)
        #expect(wrong.headers["Allow"] == "GET, PUT, PATCH")
        #expect(APITest.fault(wrong).contains("DELETE"))
        #expect(handle(router, "GET", "/boot-source").status == 405)
        #expect(handle(router, "POST", "/actions", #"{"action_type": "InstanceStart"}"#).status == 405)
        #expect(handle(router, "PUT", "/", "{}").status == 405)
        #expect(handle(router, "HEAD", "/").status == 405)
        #expect(handle(router, "get", "/").status == 405)
        let metrics = handle(router, "PATCH", "/metrics", "{}")
        #expect(metrics.status == 405 && metrics.headers["Allow"] == "PUT, GET")
        // Every documented template refuses every other method with 405.
        for template in Set(APIRoutes.all.map(\.template)) {
            let path = template.replacingOccurrences(of: "{drive_id}", with: "d").replacingOccurrences(of: "{iface_id}", with: "e")
            let served = Set(APIRoutes.all.filter { $0.template == template }.map(\.method))
            for method in ["GET", "PUT", "PATCH", "POST", "DELETE", "OPTIONS"] where !served.contains(method) {
                #expect(handle(router, method, path, "{}").status == 405, "\(method) \(template)")
            }
        }
    }

    @Test func queriesAndGetBodies() {
        let controller = APIFakeController()
        let router = APIRouter(controller: controller)
        expect400(handle(router, "GET", "/machine-config?verbose=1"), "no query parameter", "verbose")
        expect400(handle(router, "GET", "/", "{}"), "takes no body")
        expect400(handle(router, "GET", "/events?since=abc"), "since", "abc")
        expect400(handle(router, "GET", "/events?since=-1"), "since")
        expect400(handle(router, "GET", "/events?from=1"), "unknown query parameter `from`")
        #expect(handle(router, "GET", "/events?since=5").status == 200)
        #expect(controller.calls.last == "subscribeEvents(5)")
    }

    @Test func controllerErrorsBecomeStatuses() {
        let controller = APIFakeController()
        let router = APIRouter(controller: controller)
        struct DiskError: Error, CustomStringConvertible { var description: String { "cannot open /missing.img: No such file" } }
        controller.failNext = DiskError()
        expect400(handle(router, "PUT", "/drives/rootfs", APIRouterTests.sample[.putGuestDriveByID]!.1), "/missing.img")
        controller.failNext = APIError.internalError("KVM_CREATE_VM failed")
        let internalFailure = handle(router, "PUT", "/actions", #"{"action_type": "InstanceStart"}"#)
        #expect(internalFailure.status == 500 && APITest.fault(internalFailure) == "KVM_CREATE_VM failed")
        controller.failNext = APIError.badRequest("already paused")
        expect400(handle(router, "GET", "/"), "already paused")
        // Vhost-user drives are refused, by name, until the I/O domain exists.
        expect400(handle(router, "PUT", "/drives/v", #"{"drive_id": "v", "is_root_device": false, "socket": "/run/v.sock"}"#), "socket", "vhost-user")
        // Post-boot only before boot.
        expect400(handle(router, "PATCH", "/vm", #"{"state": "Resumed"}"#), "not running")
    }

    @Test func eventsStreamAsJSONLines() throws {
        let controller = APIFakeController()
        let router = APIRouter(controller: controller)
        controller.hub.publish(.booted, details: ["vcpus": 2])
        let response = router.handle(APITest.request("GET", "/events?since=0"))
        guard let stream = response.stream else { Issue.record("not a stream"); return }
        defer { stream.cancel() }
        guard case let .data(line) = stream.next(timeout: 1) else { Issue.record("no event"); return }
        #expect(line.last == 0x0a)
        #expect(line.filter { $0 == 0x0a }.count == 1)
        let event = try JSONDecoder().decode(GodwitEvent.self, from: Data(line))
        #expect(event.type == .booted && event.details["vcpus"] == 2)
        #expect(stream.next(timeout: 0.01) == .idle)
        controller.hub.close()
        #expect(stream.next(timeout: 1) == .end)
    }

    @Test func concurrentRequestsAreSerialized() async throws {
        let controller = APIFakeController()
        let router = APIRouter(controller: controller)
        await withTaskGroup(of: Int.self) { group in
            for i in 0..<40 {
                group.addTask {
                    router.handle(APITest.request("PUT", "/machine-config", #"{"vcpu_count": \#(1 + i % 32), "mem_size_mib": 128}"#)).status
                }
            }
            for await status in group { #expect(status == 204) }
        }
        #expect(controller.calls.count == 40)
    }
}

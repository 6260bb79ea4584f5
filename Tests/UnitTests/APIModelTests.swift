import Foundation
import Testing
@testable import API

@Suite("API models")
struct APIModelTests {
    func decode<T: Decodable>(_ type: T.Type, _ json: String) throws -> T {
        try decodeStrictly(type, from: Array(json.utf8), what: "body")
    }

    /// Decoding fails with 400 and a message containing every one of `fragments`.
    func expectDecodeFault<T: Decodable>(_ type: T.Type, _ json: String, _ fragments: String..., sourceLocation: SourceLocation = #_sourceLocation) {
        do {
            _ = try decode(type, json)
            Issue.record("\(json) decoded as \(type)", sourceLocation: sourceLocation)
        } catch let error as APIError {
            #expect(error.status == 400, sourceLocation: sourceLocation)
            for f in fragments { #expect(error.faultMessage.contains(f), "\(error.faultMessage) lacks \(f)", sourceLocation: sourceLocation) }
        } catch {
            Issue.record("not an APIError: \(error)", sourceLocation: sourceLocation)
        }
    }

    /// `validate()` fails with 400 and a message containing every one of `fragments`.
    func expectInvalid(_ validate: () throws -> Void, _ fragments: String..., sourceLocation: SourceLocation = #_sourceLocation) {
        do {
            try validate()
            Issue.record("accepted", sourceLocation: sourceLocation)
        } catch let error as APIError {
            #expect(error.status == 400, sourceLocation: sourceLocation)
            for f in fragments { #expect(error.faultMessage.contains(f), "\(error.faultMessage) lacks \(f)", sourceLocation: sourceLocation) }
        } catch {
            Issue.record("not an APIError: \(error)", sourceLocation: sourceLocation)
        }
    }

    func keys(_ value: some Encodable) throws -> Set<String> {
        let object = try JSONSerialization.jsonObject(with: Data(encodeJSON(value))) as? [String: Any]
        return Set(object?.keys.map { $0 } ?? [])
    }

    // MARK: Firecracker's examples decode, and encode back with the same keys

    @Test func firecrackerGettingStartedBodies() throws {
        let boot = try decode(BootSource.self, #"{"kernel_image_path": "./vmlinux", "boot_args": "console=ttyS0 reboot=k panic=1 pci=off"}"#)
        #expect(boot == BootSource(kernelImagePath: "./vmlinux", bootArgs: "console=ttyS0 reboot=k panic=1 pci=off"))
        try boot.validate()
        #expect(try keys(boot) == ["kernel_image_path", "boot_args"])

        let drive = try decode(Drive.self, #"{"drive_id": "rootfs", "path_on_host": "./rootfs.ext4", "is_root_device": true, "is_read_only": false}"#)
        #expect(drive == Drive(driveId: "rootfs", pathOnHost: "./rootfs.ext4", isRootDevice: true, isReadOnly: false))
        try drive.validate()

        let net = try decode(NetworkInterface.self, #"{"iface_id": "net1", "guest_mac": "06:00:AC:10:00:02", "host_dev_name": "tap0"}"#)
        try net.validate()
        #expect(net.guestMac == "06:00:AC:10:00:02")

        let machine = try decode(MachineConfiguration.self, #"{"vcpu_count": 2, "mem_size_mib": 1024, "smt": false}"#)
        #expect(machine == MachineConfiguration(vcpuCount: 2, memSizeMib: 1024, smt: false))
        try machine.validate()

        let logger = try decode(Logger.self, #"{"log_path": "/tmp/fc.log", "level": "debug", "show_level": true, "show_log_origin": true}"#)
        #expect(logger.level == .debug)
        try logger.validate()

        let action = try decode(InstanceActionInfo.self, #"{"action_type": "InstanceStart"}"#)
        #expect(action.actionType == .instanceStart)
        let vm = try decode(VM.self, #"{"state": "Paused"}"#)
        #expect(vm.state == .paused)
    }

    @Test func everyFieldOfFirecrackersSchemaIsAccepted() throws {
        let drive = try decode(Drive.self, """
            {"drive_id": "d1", "partuuid": "0eaa91a0-01", "is_root_device": false, "cache_type": "Writeback",
             "is_read_only": true, "path_on_host": "/d.img", "io_engine": "Async",
             "rate_limiter": {"bandwidth": {"size": 1000, "one_time_burst": 10, "refill_time": 100}, "ops": {"size": 10, "refill_time": 1}}}
            """)
        #expect(drive.cacheType == .writeback)
        #expect(drive.ioEngine == .async)
        #expect(drive.rateLimiter?.bandwidth == TokenBucket(size: 1000, oneTimeBurst: 10, refillTime: 100))
        try drive.validate()
        let roundTrip = try decode(Drive.self, String(decoding: encodeJSON(drive), as: UTF8.self))
        #expect(roundTrip == drive)

        let vhost = try decode(Drive.self, #"{"drive_id": "v", "is_root_device": false, "socket": "/run/vhost.sock"}"#)
        try vhost.validate()
        #expect(vhost.isVhostUser)

        let machine = try decode(MachineConfiguration.self, """
            {"vcpu_count": 4, "mem_size_mib": 512, "smt": true, "track_dirty_pages": true, "cpu_template": "T2S", "huge_pages": "2M"}
            """)
        #expect(machine.hugePages == .twoMiB)
        #expect(machine.cpuTemplate == .t2s)
        try machine.validate()
        #expect(try keys(machine) == ["vcpu_count", "mem_size_mib", "smt", "track_dirty_pages", "cpu_template", "huge_pages"])

        let net = try decode(NetworkInterface.self, """
            {"iface_id": "eth0", "host_dev_name": "tap0", "guest_mac": "02:00:00:00:00:01", "mtu": 1500,
             "rx_rate_limiter": {"ops": {"size": 1, "refill_time": 1}}, "tx_rate_limiter": {}}
            """)
        try net.validate()
        _ = try decode(PartialNetworkInterface.self, #"{"iface_id": "eth0", "rx_rate_limiter": {}, "tx_rate_limiter": {}}"#)
        _ = try decode(PartialDrive.self, #"{"drive_id": "d1", "path_on_host": "/new.img", "rate_limiter": {}}"#)
        _ = try decode(Logger.self, #"{"level": "Off", "log_path": "/l", "show_level": false, "show_log_origin": false, "module": "api_server::request"}"#)
        _ = try decode(Metrics.self, #"{"metrics_path": "/m"}"#)
        _ = try decode(InstanceInfo.self, #"{"app_name": "Firecracker", "id": "anonymous-instance", "state": "Not started", "vmm_version": "1.7.0"}"#)
        _ = try decode(FirecrackerVersion.self, #"{"firecracker_version": "1.7.0"}"#)
        _ = try decode(ErrorResponse.self, #"{"fault_message": "x"}"#)
        // null is the same as absent for optional fields.
        let nulls = try decode(BootSource.self, #"{"kernel_image_path": "/k", "boot_args": null, "initrd_path": null}"#)
        #expect(nulls.bootArgs == nil)
    }

    // MARK: Strict decoding names the field

    @Test func unknownFieldsAreRefusedByName() {
        expectDecodeFault(MachineConfiguration.self, #"{"vcpu_count": 1, "mem_size_mib": 128, "vcpus": 2}"#, "unknown field `vcpus`", "vcpu_count")
        expectDecodeFault(Drive.self, #"{"drive_id": "a", "is_root_device": false, "path_on_host": "/x", "rate_limiter": {"bandwidth": {"size": 1, "refill_time": 1, "burst": 5}}}"#,
                          "unknown field `rate_limiter.bandwidth.burst`")
        expectDecodeFault(FullVmConfiguration.self, #"{"boot-source": {"kernel_image_path": "/k"}, "drives": [{"drive_id": "a", "is_root_device": true, "path_on_host": "/a", "oops": 1}]}"#,
                          "unknown field `drives[0].oops`")
        expectDecodeFault(FullVmConfiguration.self, #"{"boot_source": {"kernel_image_path": "/k"}}"#, "unknown field `boot_source`", "boot-source")
        expectDecodeFault(VM.self, #"{"state": "Paused", "force": true}"#, "unknown field `force`")
    }

    @Test func wrongTypesAndMissingFieldsAreRefusedByName() {
        expectDecodeFault(MachineConfiguration.self, #"{"vcpu_count": "2", "mem_size_mib": 128}"#, "vcpu_count", "integer")
        expectDecodeFault(MachineConfiguration.self, #"{"vcpu_count": 1.5, "mem_size_mib": 128}"#, "`vcpu_count`", "1.5 is not an integer")
        expectDecodeFault(MachineConfiguration.self, #"{"vcpu_count": 1, "mem_size_mib": 1e40}"#, "`mem_size_mib`", "out of range")
        expectDecodeFault(Drive.self, #"{"drive_id": "a", "is_root_device": true, "rate_limiter": {"ops": {"size": 99999999999999999999, "refill_time": 1}}}"#,
                          "`rate_limiter.ops.size`", "out of range")
        expectDecodeFault(MachineConfiguration.self, #"{"vcpu_count": 1}"#, "missing required field `mem_size_mib`")
        expectDecodeFault(MachineConfiguration.self, #"{"vcpu_count": null, "mem_size_mib": 128}"#, "vcpu_count")
        expectDecodeFault(Drive.self, #"{"drive_id": "a", "is_root_device": "yes", "path_on_host": "/x"}"#, "is_root_device", "boolean")
        expectDecodeFault(Drive.self, #"{"drive_id": 7, "is_root_device": true}"#, "drive_id", "string")
        expectDecodeFault(Drive.self, #"{"drive_id": "a", "is_root_device": true, "rate_limiter": []}"#, "rate_limiter")
        expectDecodeFault(BootSource.self, #"["kernel_image_path"]"#, "object")
        expectDecodeFault(BootSource.self, #"{"kernel_image_path": "/k""#, "malformed JSON")
        expectDecodeFault(BootSource.self, "", "empty")
        expectDecodeFault(BootSource.self, "  \n", "empty")
        expectDecodeFault(BootSource.self, "null", "null")
        expectDecodeFault(FullVmConfiguration.self, #"{"drives": {"drive_id": "a"}}"#, "drives", "array")
    }

    @Test func enumValuesAreCheckedWithTheChoices() {
        expectDecodeFault(InstanceActionInfo.self, #"{"action_type": "Reboot"}"#, "\"Reboot\"", "action_type", "InstanceStart", "SendCtrlAltDel", "FlushMetrics")
        expectDecodeFault(InstanceActionInfo.self, #"{"action_type": "instancestart"}"#, "action_type")
        expectDecodeFault(VM.self, #"{"state": "Running"}"#, "state", "Paused", "Resumed")
        expectDecodeFault(Drive.self, #"{"drive_id": "a", "is_root_device": true, "path_on_host": "/a", "cache_type": "None"}"#, "cache_type", "Writeback")
        expectDecodeFault(Drive.self, #"{"drive_id": "a", "is_root_device": true, "path_on_host": "/a", "io_engine": "Uring"}"#, "io_engine", "Async")
        expectDecodeFault(MachineConfiguration.self, #"{"vcpu_count": 1, "mem_size_mib": 128, "huge_pages": "1G"}"#, "huge_pages", "2M")
        expectDecodeFault(MachineConfiguration.self, #"{"vcpu_count": 1, "mem_size_mib": 128, "cpu_template": "M5"}"#, "cpu_template", "T2")
        expectDecodeFault(Logger.self, #"{"level": "Verbose"}"#, "level", "Trace")
    }

    @Test func deeplyNestedJSONIsRefusedWithoutTrapping() {
        let deep = String(repeating: "[", count: 60000) + String(repeating: "]", count: 60000)
        expectDecodeFault(BootSource.self, deep)
        let deepObject = String(repeating: #"{"a":"#, count: 10000) + "1" + String(repeating: "}", count: 10000)
        expectDecodeFault(FullVmConfiguration.self, deepObject)
    }

    // MARK: Range checks name the field and the value

    @Test func machineConfigurationRanges() {
        expectInvalid({ try MachineConfiguration(vcpuCount: 0, memSizeMib: 128).validate() }, "vcpu_count = 0", "1 to 32")
        expectInvalid({ try MachineConfiguration(vcpuCount: 33, memSizeMib: 128).validate() }, "vcpu_count = 33")
        expectInvalid({ try MachineConfiguration(vcpuCount: -1, memSizeMib: 128).validate() }, "vcpu_count = -1")
        expectInvalid({ try MachineConfiguration(vcpuCount: 3, memSizeMib: 128, smt: true).validate() }, "vcpu_count = 3", "smt")
        expectInvalid({ try MachineConfiguration(vcpuCount: 1, memSizeMib: 7).validate() }, "mem_size_mib = 7")
        expectInvalid({ try MachineConfiguration(vcpuCount: 1, memSizeMib: -128).validate() }, "mem_size_mib = -128")
        expectInvalid({ try MachineConfiguration(vcpuCount: 1, memSizeMib: Int.max).validate() }, "mem_size_mib = \(Int.max)")
        expectInvalid({ try MachineConfiguration(vcpuCount: 1, memSizeMib: 129, hugePages: .twoMiB).validate() }, "mem_size_mib = 129", "2M")
        #expect(throws: Never.self) { try MachineConfiguration(vcpuCount: 1, memSizeMib: 8, smt: true).validate() }
        #expect(throws: Never.self) { try MachineConfiguration(vcpuCount: 32, memSizeMib: 1 << 20).validate() }
        expectInvalid({ try MachineConfigurationUpdate(vcpuCount: 64).validate() }, "vcpu_count = 64")
        expectInvalid({ try MachineConfigurationUpdate(memSizeMib: 0).validate() }, "mem_size_mib = 0")
        expectInvalid({ try MachineConfiguration(vcpuCount: 1, memSizeMib: 128, vcpuAffinity: []).validate() }, "vcpu_affinity", "0 CPUs")
        expectInvalid({ try MachineConfiguration(vcpuCount: 1, memSizeMib: 128, vcpuAffinity: [0, 1024]).validate() }, "CPU 1024")
        expectInvalid({ try MachineConfigurationUpdate(vcpuAffinity: [-1]).validate() }, "CPU -1")
        expectInvalid({ try MachineConfigurationUpdate(vcpuAffinity: Array(repeating: 0, count: 1025)).validate() }, "1025 CPUs")
        #expect(throws: Never.self) { try MachineConfiguration(vcpuCount: 4, memSizeMib: 128, vcpuAffinity: [1023, 0]).validate() }
    }

    /// `vcpu_affinity` (Godwit's extension) decodes, encodes and merges like the other fields.
    @Test func vcpuAffinityRoundTrips() throws {
        let machine = try decode(MachineConfiguration.self, #"{"vcpu_count": 2, "mem_size_mib": 128, "vcpu_affinity": [3, 1]}"#)
        #expect(machine.vcpuAffinity == [3, 1])
        let encoded = String(decoding: try JSONEncoder().encode(machine), as: UTF8.self)
        #expect(encoded.contains("\"vcpu_affinity\":[3,1]"))
        #expect(try MachineConfiguration(vcpuCount: 2, memSizeMib: 128).applying(MachineConfigurationUpdate(vcpuAffinity: [0])).vcpuAffinity == [0])
        expectDecodeFault(MachineConfiguration.self, #"{"vcpu_count": 1, "mem_size_mib": 128, "vcpu_affinity": "0-1"}"#, "vcpu_affinity")
    }

    @Test func patchMergesAndChecksTheWhole() throws {
        let base = MachineConfiguration(vcpuCount: 2, memSizeMib: 256, smt: true)
        let merged = try base.applying(MachineConfigurationUpdate(memSizeMib: 512, trackDirtyPages: true))
        #expect(merged == MachineConfiguration(vcpuCount: 2, memSizeMib: 512, smt: true, trackDirtyPages: true))
        // Each field fine alone, the result is not: 3 vCPUs with SMT.
        expectInvalid({ _ = try base.applying(MachineConfigurationUpdate(vcpuCount: 3)) }, "vcpu_count = 3", "smt")
    }

    @Test func idsPathsAndStrings() {
        for bad in ["", "a-b", "a b", "a/b", "ä", String(repeating: "x", count: 65), "../etc"] {
            expectInvalid({ try Drive(driveId: bad, pathOnHost: "/x").validate() }, "drive_id")
            expectInvalid({ try NetworkInterface(ifaceId: bad, hostDevName: "tap0").validate() }, "iface_id")
        }
        #expect(throws: Never.self) { try Drive(driveId: String(repeating: "A_9", count: 21), pathOnHost: "/x").validate() }
        expectInvalid({ try Drive(driveId: "a", pathOnHost: "").validate() }, "path_on_host", "empty")
        expectInvalid({ try Drive(driveId: "a", pathOnHost: "/" + String(repeating: "p", count: 5000)).validate() }, "path_on_host", "5001 bytes")
        expectInvalid({ try Drive(driveId: "a", pathOnHost: "/a\u{0}b").validate() }, "path_on_host", "NUL")
        expectInvalid({ try BootSource(kernelImagePath: "").validate() }, "kernel_image_path")
        expectInvalid({ try BootSource(kernelImagePath: "/k", initrdPath: "").validate() }, "initrd_path")
        expectInvalid({ try BootSource(kernelImagePath: "/k", bootArgs: String(repeating: "a", count: 3000)).validate() }, "boot_args", "3000 bytes")
        expectInvalid({ try BootSource(kernelImagePath: "/k", bootArgs: "console=ttyS0\nx").validate() }, "boot_args", "control character")
        expectInvalid({ try Metrics(metricsPath: "").validate() }, "metrics_path")
        expectInvalid({ try Logger(logPath: "").validate() }, "log_path")
    }

    @Test func driveBackends() {
        expectInvalid({ try Drive(driveId: "a").validate() }, "drive `a`", "path_on_host", "socket")
        expectInvalid({ try Drive(driveId: "a", pathOnHost: "/a", socket: "/s").validate() }, "mutually exclusive")
        expectInvalid({ try Drive(driveId: "a", isReadOnly: true, socket: "/s").validate() }, "is_read_only", "vhost-user")
        expectInvalid({ try Drive(driveId: "a", ioEngine: .sync, socket: "/s").validate() }, "io_engine")
        expectInvalid({ try Drive(driveId: "a", rateLimiter: RateLimiter(), socket: "/s").validate() }, "rate_limiter")
        expectInvalid({ try Drive(driveId: "a", pathOnHost: "/a", partuuid: "").validate() }, "partuuid")
    }

    @Test func rateLimitersMustNotBeNegative() {
        let negative = RateLimiter(bandwidth: TokenBucket(size: -1, refillTime: 100))
        expectInvalid({ try Drive(driveId: "a", pathOnHost: "/a", rateLimiter: negative).validate() }, "rate_limiter.bandwidth.size = -1", "negative")
        let burst = RateLimiter(ops: TokenBucket(size: 1, oneTimeBurst: -5, refillTime: 1))
        expectInvalid({ try NetworkInterface(ifaceId: "e", hostDevName: "tap0", txRateLimiter: burst).validate() }, "tx_rate_limiter.ops.one_time_burst = -5")
        let refill = RateLimiter(ops: TokenBucket(size: 1, refillTime: -1))
        expectInvalid({ try PartialNetworkInterface(ifaceId: "e", rxRateLimiter: refill).validate() }, "rx_rate_limiter.ops.refill_time = -1")
        expectInvalid({ try PartialDrive(driveId: "d", rateLimiter: negative).validate() }, "rate_limiter.bandwidth.size")
    }

    @Test func networkInterfaceChecks() {
        for bad in ["06:00:AC:10:00", "06:00:AC:10:00:02:03", "06-00-AC-10-00-02", "0g:00:00:00:00:01", "6:0:AC:10:0:2", ""] {
            expectInvalid({ try NetworkInterface(ifaceId: "e", hostDevName: "tap0", guestMac: bad).validate() }, "guest_mac")
        }
        expectInvalid({ try NetworkInterface(ifaceId: "e", hostDevName: "tap0", guestMac: "01:00:5e:00:00:01").validate() }, "multicast")
        expectInvalid({ try NetworkInterface(ifaceId: "e", hostDevName: "tap0", guestMac: "00:00:00:00:00:00").validate() }, "all-zero")
        for bad in ["", "a/b", "tap 0", "averyveryverylongname", ".", ".."] {
            expectInvalid({ try NetworkInterface(ifaceId: "e", hostDevName: bad).validate() }, "host_dev_name")
        }
        expectInvalid({ try NetworkInterface(ifaceId: "e", hostDevName: "tap0", mtu: 67).validate() }, "mtu = 67")
        expectInvalid({ try NetworkInterface(ifaceId: "e", hostDevName: "tap0", mtu: 65536).validate() }, "mtu = 65536")
        #expect(throws: Never.self) { try NetworkInterface(ifaceId: "e", hostDevName: "tap-0.x", guestMac: "aa:BB:cc:00:11:22", mtu: 9000).validate() }
    }

    // MARK: Full configuration

    @Test func fullConfigurationUsesDashedKeys() throws {
        let config = try decode(FullVmConfiguration.self, """
            {"boot-source": {"kernel_image_path": "/k", "boot_args": "console=ttyS0"},
             "machine-config": {"vcpu_count": 2, "mem_size_mib": 256},
             "drives": [{"drive_id": "rootfs", "path_on_host": "/r", "is_root_device": true, "is_read_only": false}],
             "network-interfaces": [{"iface_id": "eth0", "host_dev_name": "tap0"}],
             "logger": {"level": "Info"}, "metrics": {"metrics_path": "/m"},
             "balloon": null, "vsock": null, "mmds-config": null, "entropy": null, "pmem": [], "cpu-config": null, "memory-hotplug": null}
            """)
        try config.validate()
        #expect(config.unsupportedSections.isEmpty)
        // null sections are left out; an empty list is kept (and is not an unsupported section).
        #expect(try keys(config) == ["boot-source", "machine-config", "drives", "network-interfaces", "logger", "metrics", "pmem"])
        #expect(try decode(FullVmConfiguration.self, String(decoding: encodeJSON(config), as: UTF8.self)) == config)
    }

    @Test func fullConfigurationCrossChecks() throws {
        let unsupported = try decode(FullVmConfiguration.self, #"{"vsock": {"guest_cid": 3, "uds_path": "/v"}, "balloon": {"amount_mib": 1, "deflate_on_oom": true}}"#)
        #expect(unsupported.unsupportedSections == ["balloon", "vsock"])
        expectInvalid({ try unsupported.validate() }, "`balloon`", "not supported")

        var twice = FullVmConfiguration(drives: [Drive(driveId: "a", pathOnHost: "/a"), Drive(driveId: "a", pathOnHost: "/b")])
        expectInvalid({ try twice.validate() }, "drives[1]", "duplicate drive_id `a`")
        twice.drives = [Drive(driveId: "a", pathOnHost: "/a", isRootDevice: true), Drive(driveId: "b", pathOnHost: "/b", isRootDevice: true)]
        expectInvalid({ try twice.validate() }, "more than one root device")
        let nets = FullVmConfiguration(networkInterfaces: [NetworkInterface(ifaceId: "e", hostDevName: "t0"), NetworkInterface(ifaceId: "e", hostDevName: "t1")])
        expectInvalid({ try nets.validate() }, "network-interfaces[1]", "duplicate iface_id `e`")
        let bad = FullVmConfiguration(machineConfig: MachineConfiguration(vcpuCount: 99, memSizeMib: 128))
        expectInvalid({ try bad.validate() }, "machine-config: vcpu_count = 99")
    }

    // MARK: Events

    @Test func eventTimestampsAreRFC3339() {
        let ts = GodwitEvent.timestampNow()
        #expect(ts.range(of: #"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z$"#, options: .regularExpression) != nil, "\(ts)")
    }

    @Test func eventHubDeliversInOrderAndResumes() throws {
        let hub = EventHub(historyLimit: 8)
        let live = hub.subscribe()
        #expect(live.next(timeout: 0.01) == .timedOut)
        hub.publish(.booted)
        hub.publish(.paused, details: ["reason": "api"])
        guard case let .event(first) = live.next(timeout: 1), case let .event(second) = live.next(timeout: 1) else {
            Issue.record("events not delivered"); return
        }
        #expect(first.type == .booted && first.seq == 1)
        #expect(second.type == .paused && second.seq == 2 && second.details["reason"] == "api")
        // since: replays after the given number.
        let replay = hub.subscribe(since: 1)
        guard case let .event(again) = replay.next(timeout: 1) else { Issue.record("no replay"); return }
        #expect(again == second)
        let all = hub.subscribe(since: 0)
        guard case let .event(one) = all.next(timeout: 1) else { Issue.record("no replay from 0"); return }
        #expect(one == first)
        // A subscription from beyond the end sees only new events.
        let future = hub.subscribe(since: 1000)
        hub.publish(.resumed)
        guard case let .event(three) = future.next(timeout: 1) else { Issue.record("no new event"); return }
        #expect(three.type == .resumed && three.seq == 3)
        // Round trip through JSON.
        let decoded = try decodeStrictly(GodwitEvent.self, from: encodeJSON(second), what: "event")
        #expect(decoded == second)
    }

    @Test func slowSubscribersAreToldWhatTheyMissed() {
        let hub = EventHub(historyLimit: 4)
        let slow = hub.subscribe(since: 0)
        for _ in 0..<10 { hub.publish(.routeChange) }
        guard case let .event(dropped) = slow.next(timeout: 1) else { Issue.record("nothing"); return }
        #expect(dropped.type == .eventsDropped)
        #expect(dropped.details["count"] == 6)
        var seqs: [UInt64] = []
        while case let .event(e) = slow.next(timeout: 0.01) { seqs.append(e.seq) }
        #expect(seqs == [7, 8, 9, 10])
    }

    @Test func closingTheHubOrCancellingEndsSubscriptions() {
        let hub = EventHub()
        let a = hub.subscribe(), b = hub.subscribe()
        hub.publish(.shutdown)
        b.cancel()
        #expect(b.next(timeout: 1) == .finished)
        hub.close()
        guard case let .event(last) = a.next(timeout: 1) else { Issue.record("pending event lost at close"); return }
        #expect(last.type == .shutdown)
        #expect(a.next(timeout: 1) == .finished)
    }

    @Test func cancelWakesAWaitingSubscriber() throws {
        let hub = EventHub()
        let subscription = hub.subscribe()
        let start = monotonicNow()
        DispatchQueue.global().asyncAfter(deadline: .now() + 0.1) { subscription.cancel() }
        #expect(subscription.next(timeout: 10) == .finished)
        #expect(monotonicNow() - start < 5)
    }

    @Test func jsonValueRoundTrips() throws {
        let value: JSONValue = ["a": 1, "b": [true, nil, "x", 1.5], "c": ["d": "e"]]
        let back = try JSONDecoder().decode(JSONValue.self, from: Data(encodeJSON(value)))
        #expect(back == value)
        #expect(JSONValue.number(3).description == "3")
    }
}

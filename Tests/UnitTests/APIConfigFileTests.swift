import Foundation
import Testing
@testable import API
#if canImport(Glibc)
import Glibc
#endif

@Suite("API config file")
struct APIConfigFileTests {
    /// A config file as Firecracker's documentation writes them, with every section Godwit implements.
    static let firecrackerStyle = """
        {
          "boot-source": {
            "kernel_image_path": "vmlinux.bin",
            "boot_args": "console=ttyS0 reboot=k panic=1 pci=off",
            "initrd_path": null
          },
          "drives": [
            {"drive_id": "rootfs", "partuuid": null, "is_root_device": true, "cache_type": "Unsafe",
             "is_read_only": false, "path_on_host": "bionic.rootfs.ext4", "io_engine": "Sync", "rate_limiter": null, "socket": null},
            {"drive_id": "scratch", "is_root_device": false, "is_read_only": true, "path_on_host": "scratch.img"}
          ],
          "machine-config": {"vcpu_count": 2, "mem_size_mib": 1024, "smt": false, "track_dirty_pages": false, "huge_pages": "None"},
          "cpu-config": null,
          "balloon": null,
          "network-interfaces": [
            {"iface_id": "net1", "guest_mac": "06:00:AC:10:00:02", "host_dev_name": "tap0"}
          ],
          "vsock": null,
          "logger": {"log_path": "/tmp/fc.log", "level": "Info", "show_level": true, "show_log_origin": true},
          "metrics": {"metrics_path": "/tmp/fc-metrics.json"},
          "mmds-config": null,
          "entropy": null
        }
        """

    func expectFault(_ fragments: String..., sourceLocation: SourceLocation = #_sourceLocation, _ body: () throws -> Void) {
        do {
            try body()
            Issue.record("accepted", sourceLocation: sourceLocation)
        } catch let error as APIError {
            for f in fragments { #expect(error.faultMessage.contains(f), "\(error.faultMessage) lacks \(f)", sourceLocation: sourceLocation) }
        } catch {
            Issue.record("not an APIError: \(error)", sourceLocation: sourceLocation)
        }
    }

    @Test func appliesInFirecrackersOrder() throws {
        let config = try VMConfigFile.parse(Array(APIConfigFileTests.firecrackerStyle.utf8))
        let controller = APIFakeController()
        try VMConfigFile.apply(config, to: controller)
        #expect(controller.calls == ["putLogger", "putMetrics", "putMachineConfig(2,1024)", "putBootSource(vmlinux.bin)",
                                     "putDrive(rootfs)", "putDrive(scratch)", "putNetworkInterface(net1)", "instanceStart"])
        #expect(controller.drives["scratch"]?.isReadOnly == true)
        #expect(controller.started)
    }

    @Test func withoutStartingTheInstance() throws {
        let config = try VMConfigFile.parse(Array(APIConfigFileTests.firecrackerStyle.utf8))
        let controller = APIFakeController()
        try VMConfigFile.apply(config, to: controller, startInstance: false)
        #expect(controller.calls.last == "putNetworkInterface(net1)")
        #expect(!controller.started)
        // The rest can then come through the API.
        #expect(APIRouter(controller: controller).handle(APITest.request("PUT", "/actions", #"{"action_type": "InstanceStart"}"#)).status == 204)
    }

    @Test func theWholeFileIsCheckedBeforeTheVMMIsTouched() throws {
        var config = try VMConfigFile.parse(Array(APIConfigFileTests.firecrackerStyle.utf8))
        config.drives?[1].pathOnHost = ""
        let controller = APIFakeController()
        expectFault("config file", "drives[1]", "path_on_host") { try VMConfigFile.apply(config, to: controller) }
        #expect(controller.calls.isEmpty)

        config = try VMConfigFile.parse(Array(APIConfigFileTests.firecrackerStyle.utf8))
        config.bootSource = nil
        expectFault("`boot-source` is required") { try VMConfigFile.apply(config, to: controller) }
        #expect(controller.calls.isEmpty)
        try VMConfigFile.apply(config, to: controller, startInstance: false)
        #expect(!controller.calls.contains { $0.hasPrefix("putBootSource") })
    }

    @Test func unsupportedSectionsAreRefusedByName() throws {
        let json = #"{"boot-source": {"kernel_image_path": "/k"}, "vsock": {"guest_cid": 3, "uds_path": "/tmp/v.sock"}}"#
        let config = try VMConfigFile.parse(Array(json.utf8))
        let controller = APIFakeController()
        expectFault("config file", "`vsock`", "not supported") { try VMConfigFile.apply(config, to: controller) }
        #expect(controller.calls.isEmpty)
    }

    @Test func parseErrorsNameTheField() {
        expectFault("config file", "unknown field `drives[0].path`") {
            _ = try VMConfigFile.parse(Array(#"{"drives": [{"drive_id": "a", "is_root_device": true, "path": "/a"}]}"#.utf8))
        }
        expectFault("config file", "machine-config.vcpu_count", "integer") {
            _ = try VMConfigFile.parse(Array(#"{"machine-config": {"vcpu_count": "2", "mem_size_mib": 128}}"#.utf8))
        }
        expectFault("config file", "malformed JSON") { _ = try VMConfigFile.parse(Array("{,}".utf8)) }
    }

    @Test func aRefusalFromTheVMMNamesTheSection() throws {
        let config = try VMConfigFile.parse(Array(APIConfigFileTests.firecrackerStyle.utf8))
        let controller = APIFakeController()
        controller.failNext = nil
        // The controller refuses vhost-user drives: the message says which drive of the file.
        var vhost = config
        vhost.drives = [Drive(driveId: "v", isRootDevice: true, socket: "/run/v.sock")]
        expectFault("config file: drives[0] (`v`)", "vhost-user") { try VMConfigFile.apply(vhost, to: controller) }
        #expect(controller.calls == ["putLogger", "putMetrics", "putMachineConfig(2,1024)", "putBootSource(vmlinux.bin)"])
    }

    @Test func oneCodePathWithTheAPI() throws {
        // The same bad drive gives the same message from the router and from the config file.
        let drive = #"{"drive_id": "d", "is_root_device": false, "path_on_host": "/d", "rate_limiter": {"ops": {"size": 5, "refill_time": -3}}}"#
        let response = APIRouter(controller: APIFakeController()).handle(APITest.request("PUT", "/drives/d", drive))
        let config = try VMConfigFile.parse(Array(#"{"boot-source": {"kernel_image_path": "/k"}, "drives": [\#(drive)]}"#.utf8))
        var fileMessage = ""
        do { try VMConfigFile.apply(config, to: APIFakeController()) } catch let error as APIError { fileMessage = error.faultMessage }
        #expect(APITest.fault(response).hasSuffix("rate_limiter.ops.refill_time = -3 is negative"))
        #expect(fileMessage.hasSuffix("rate_limiter.ops.refill_time = -3 is negative"))
    }

    @Test func loadFromAFile() throws {
        let path = "/tmp/godwit-api-config-\(getpid()).json"
        defer { unlink(path) }
        #expect(FileManager.default.createFile(atPath: path, contents: Data(APIConfigFileTests.firecrackerStyle.utf8)))
        let config = try VMConfigFile.load(path: path)
        #expect(config.drives?.count == 2)
        #expect(config.networkInterfaces?.first?.hostDevName == "tap0")
        #expect(throws: (any Error).self) { try VMConfigFile.load(path: path + ".missing") }
        #expect(throws: APIError.self) { try VMConfigFile.load(path: "/tmp") }
        #expect(FileManager.default.createFile(atPath: path, contents: Data(count: VMConfigFile.maxBytes + 1)))
        expectFault("bytes (at most") { _ = try VMConfigFile.load(path: path) }
    }
}

import Foundation
import GodwitTestSupport
import Testing

/// I/O domains: `godwit iodomain` serves slices of one image over vhost-user to VMs that `godwit vm`
/// runs with `--disk socket=PATH`; notifications and completions bypass the VMM.
@Suite("Integration: I/O domain over vhost-user", .serialized, .enabled(if: TestEnvironment.hasKVM))
struct IODomainTests {
    static let slice: UInt64 = 16 << 20

    /// An I/O domain serving `count` slices of a fresh image.
    final class Domain {
        let dir: URL
        let image: String
        let sockets: [String]
        let process: BackgroundProcess

        init(slices count: Int, namespaces: Bool = false, extra: [String] = []) throws {
            dir = try TestEnvironment.temporaryDirectory()
            image = dir.appendingPathComponent("device.img").path
            try TestEnvironment.makeImage(at: URL(fileURLWithPath: image), size: IODomainTests.slice * UInt64(count))
            let base = dir
            let paths = (0..<count).map { base.appendingPathComponent("vm\($0).sock").path }
            sockets = paths
            var args = ["iodomain", "--blk", image] + extra
            for (i, socket) in paths.enumerated() {
                args += ["--device", "socket=\(socket),offset=\(UInt64(i) * IODomainTests.slice),size=\(IODomainTests.slice)"]
            }
            process = namespaces
                ? try BackgroundProcess("/usr/bin/env", ["GODWIT_SANDBOX_NAMESPACES=1", TestEnvironment.godwitPath] + args)
                : try BackgroundProcess(TestEnvironment.godwitPath, args)
            for _ in 0..<500 where !paths.allSatisfy({ FileManager.default.fileExists(atPath: $0) }) { usleep(10_000) }
        }

        func stop() {
            process.terminate()
            _ = process.wait(timeout: 10)
            try? FileManager.default.removeItem(at: dir)
        }
    }

    @Test(arguments: [1, 2])
    func guestUsesADiskServedByAnIODomain(cpus: Int) throws {
        let domain = try Domain(slices: 2)
        defer { domain.stop() }
        let r = try runGodwit(jobs: "godwit.job=blk-verify,size=1048576,mode=poll godwit.job=blk-verify,offset=2097152,size=1048576,mode=irq godwit.job=blk-check,offset=2097152,size=1048576",
                              cpus: cpus, extra: ["--disk", "socket=\(domain.sockets[1])"])
        #expect(r.status == 0, "\(r.stdout)\n\(r.stderr)")
        #expect(r.lines(job: "blk-verify").count == 2)
        // The pattern is in the second slice of the device, at the slice's offset; the first is untouched.
        let report = try BlockPattern.verify(imagePath: domain.image, offset: Self.slice + (2 << 20), size: 1 << 20, sliceStart: Self.slice)
        #expect(report.bad.isEmpty && report.sectors == 2048, "\(report.bad.count) bad sectors, first \(report.bad.prefix(3))")
        #expect(try BlockPattern.verify(imagePath: domain.image, offset: 0, size: 1 << 20).bad.count == 2048)
    }

    /// Both asynchronous engines of an O_DIRECT disk in a sandboxed domain (namespaces, seccomp): the
    /// io_uring ring is made before lock-down and entered after it; polled and interrupt-driven
    /// requests, many in flight, land where they should.
    @Test(arguments: ["io_uring", "aio"])
    func directDiskOnEachEngineInASandboxedDomain(engine: String) throws {
        let domain = try Domain(slices: 1, namespaces: true, extra: ["--direct", "--io-engine", engine])
        defer { domain.stop() }
        #expect(domain.process.waitForErrorOutput(timeout: 10) { $0.contains("sandboxed") }, "\(domain.process.stderrSoFar)")
        #expect(domain.process.stderrSoFar.contains("O_DIRECT requests through \(engine)"), "\(domain.process.stderrSoFar)")
        // The benchmark first: its random writes go anywhere in the slice.
        let jobs = "godwit.job=blk-bench,rw=randwrite,qd=32,n=3000,mode=poll godwit.job=blk-bench,rw=randread,qd=32,n=3000,mode=irq "
            + "godwit.job=blk-verify,size=2097152,mode=poll godwit.job=blk-verify,offset=4194304,size=2097152,mode=irq "
            + "godwit.job=blk-verify,offset=8388608,size=1048576,mode=irq"
        let r = try runGodwit(jobs: jobs, extra: ["--disk", "socket=\(domain.sockets[0])"])
        #expect(r.status == 0, "\(r.stdout)\n\(r.stderr)\n\(domain.process.stderrSoFar)")
        #expect(r.lines(job: "blk-verify").count == 3 && r.lines(job: "blk-verify").allSatisfy { $0["errors"] == "0" }, "\(r.stdout)")
        #expect(r.lines(job: "blk-bench").count == 2 && r.lines(job: "blk-bench").allSatisfy { $0["errors"] == "0" }, "\(r.stdout)")
        let report = try BlockPattern.verify(imagePath: domain.image, offset: 4 << 20, size: 2 << 20)
        #expect(report.bad.isEmpty && report.sectors == 4096, "\(report.bad.count) bad sectors")
        #expect(domain.process.isRunning)
    }

    @Test func notificationsAndCompletionsBypassTheVMM() throws {
        let domain = try Domain(slices: 1)
        defer { domain.stop() }
        let r = try runGodwit(jobs: "godwit.job=blk-bench,n=4000,mode=poll", extra: ["--disk", "socket=\(domain.sockets[0])"], statistics: true)
        #expect(r.status == 0, "\(r.stdout)\n\(r.stderr)")
        let mmio = try #require(r.counter("exits", "mmio"), "\(r.stderr)")
        #expect(mmio < 100, "4000 polled requests, only set-up register accesses exit: \(mmio)")
    }

    /// `--huge-pages`: guest RAM in 2 MiB hugetlbfs pages, which the I/O domain maps too (vhost-user
    /// SET_MEM_TABLE); the pool must hold every page up front, and too few is a clear set-up error.
    @Test func guestRAMInHugePagesWithAnIODomainDisk() throws {
        let domain = try Domain(slices: 1)
        defer { domain.stop() }
        let jobs = "godwit.job=blk-verify,size=2097152,mode=poll godwit.job=blk-bench,rw=read,bs=1048576,qd=4,n=64,mode=irq godwit.job=ready"
        // 128 MiB is 64 pages: with exactly 64 free the guest runs (and takes them all), with 63 it cannot start.
        let r = try HugePagePool.withFree(64) {
            try runGodwit(jobs: jobs, memory: "128M", extra: ["--huge-pages", "--disk", "socket=\(domain.sockets[0])"])
        }
        #expect(r.status == 0, "\(r.stdout)\n\(r.stderr)")
        #expect(r.lines(job: "blk-verify").first?["errors"] == "0", "\(r.stdout)")
        #expect(r.lines(job: "blk-bench").first?["errors"] == "0", "\(r.stdout)")
        #expect(r.lines(job: "ready").first?.int("mem_mib").map { $0 >= 120 && $0 <= 128 } == true, "\(r.stdout)")
        let report = try BlockPattern.verify(imagePath: domain.image, offset: 0, size: 2 << 20)
        #expect(report.bad.isEmpty, "\(report.bad.count) bad sectors")

        let short = try HugePagePool.withFree(63) {
            try runGodwit(jobs: jobs, memory: "128M", extra: ["--huge-pages", "--disk", "socket=\(domain.sockets[0])"])
        }
        #expect(short.status == 2, "\(short.stderr)")
        #expect(short.stderr.contains("needs 64 free 2 MiB huge pages but 63 are free"), "\(short.stderr)")
        let odd = try runGodwit(jobs: jobs, memory: "129M", extra: ["--huge-pages"])
        #expect(odd.status != 0 && odd.stderr.contains("multiple of 2 MiB"), "\(odd.stderr)")
        #expect(domain.process.isRunning, "the domain serves on")
    }

    @Test func fourVMsShareOneDomainEachOnItsSlice() throws {
        let domain = try Domain(slices: 4)
        defer { domain.stop() }
        let vms = try domain.sockets.map { socket in
            try BackgroundProcess(TestEnvironment.godwitPath, ["vm", "--kernel", TestEnvironment.guestPath, "--memory", "64M",
                                                             "--disk", "socket=\(socket)",
                                                             "--cmdline", "godwit.job=blk-verify,seconds=2,size=2097152,mode=irq"])
        }
        var seeds: [String] = []
        for vm in vms {
            let r = vm.wait(timeout: 60)
            #expect(r.status == 0, "\(r.stdout)\n\(r.stderr)")
            let line = try #require(r.lines(job: "blk-verify").first, "\(r.stdout)")
            #expect(line["errors"] == "0")
            seeds.append(line["seed"] ?? "")
        }
        // Each slice holds exactly its own VM's last pass.
        for (i, seed) in seeds.enumerated() {
            let report = try BlockPattern.verify(imagePath: domain.image, offset: UInt64(i) * Self.slice, size: 2 << 20, sliceStart: UInt64(i) * Self.slice)
            #expect(report.bad.isEmpty, "slice \(i): \(report.bad.count) bad sectors, first \(report.bad.prefix(3))")
            #expect(report.seeds.map { String($0, radix: 16) } == [seed.trimmingLeadingZeros], "slice \(i)")
        }
        #expect(domain.process.isRunning)
    }

    /// The domain locks itself down after set-up (seccomp, no_new_privs, no capabilities) and, with
    /// GODWIT_SANDBOX_NAMESPACES=1, runs as PID 1 of its own user, mount, IPC, network and PID
    /// namespaces; it still serves its VMs.
    @Test(arguments: [false, true])
    func sandboxedDomainServesAndIsLockedDown(namespaces: Bool) throws {
        let domain = try IODomainTests.Domain(slices: 1, namespaces: namespaces)
        defer { domain.stop() }
        #expect(domain.process.waitForOutput(timeout: 10) { _ in
            (try? String(decoding: Data(contentsOf: URL(fileURLWithPath: "/proc/\(domain.process.pid)/status")), as: UTF8.self)) != nil
        })
        let r = try runGodwit(jobs: "godwit.job=blk-verify,size=1048576,mode=irq", extra: ["--disk", "socket=\(domain.sockets[0])"])
        #expect(r.status == 0, "\(r.stdout)\n\(r.stderr)")
        // The process that serves: the domain itself, or with namespaces the child of the waiting parent.
        let server = namespaces ? try #require(childOf(domain.process.pid), "the namespaced child") : domain.process.pid
        let status = try String(contentsOfFile: "/proc/\(server)/status", encoding: .utf8)
        #expect(status.contains("Seccomp:\t2"), "\(status)")
        #expect(status.contains("NoNewPrivs:\t1"))
        #expect(status.contains("CapEff:\t0000000000000000"))
        if namespaces {
            let mine = try FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/ns/net")
            let its = try FileManager.default.destinationOfSymbolicLink(atPath: "/proc/\(server)/ns/net")
            #expect(mine != its, "a network namespace of its own")
        }
    }

    /// `godwit iodomain --cpu-affinity` and `godwit vm --vcpu-affinity`: every thread of the domain and
    /// every vCPU thread runs only on the CPU given (the last one of this host), and the guest's I/O works.
    @Test func domainAndVCPUThreadsStayOnTheirCPUs() throws {
        let cpu = String(ProcessInfo.processInfo.activeProcessorCount - 1)
        let domain = try Domain(slices: 1, extra: ["--cpu-affinity", cpu])
        defer { domain.stop() }
        let vm = try BackgroundProcess(TestEnvironment.godwitPath, ["vm", "--kernel", TestEnvironment.guestPath, "--memory", "64M", "--cpus", "2",
                                                                    "--vcpu-affinity", cpu, "--disk", "socket=\(domain.sockets[0])",
                                                                    "--cmdline", "godwit.job=blk-verify,size=1048576,mode=irq godwit.job=idle,seconds=3"])
        #expect(vm.waitForOutput { $0.contains("job=blk-verify") })
        let vcpus = threads(of: vm.pid).filter { $0.name.hasPrefix("vcpu") }
        #expect(vcpus.count == 2, "\(vcpus)")
        #expect(vcpus.allSatisfy { $0.cpus == cpu }, "\(vcpus)")
        let served = threads(of: domain.process.pid)
        #expect(served.count >= 2 && served.allSatisfy { $0.cpus == cpu }, "\(served)")
        let r = vm.wait(timeout: 60)
        #expect(r.status == 0, "\(r.stdout)\n\(r.stderr)")
        let bad = try runGodwit(jobs: "", extra: ["--vcpu-affinity", "0-99999"])
        #expect(bad.status == 64 && bad.stderr.contains("--vcpu-affinity"), "\(bad.stderr)")
    }

    /// machine-config's `vcpu_affinity` pins an API-booted VM's vCPU threads, also when the VMM was
    /// started confined to another CPU (taskset: only the cpuset limits a thread); a CPU no thread can be
    /// pinned to is refused before the guest runs (400 from InstanceStart, naming the CPU).
    @Test(.enabled(if: ProcessInfo.processInfo.activeProcessorCount >= 2))
    func vcpuAffinityThroughTheAPIAndCPUsTheVMMCannotUse() throws {
        let last = ProcessInfo.processInfo.activeProcessorCount - 1
        let api = try APIHarness(launcher: ["/usr/bin/taskset", "-c", "0"])
        defer { api.stop() }
        try api.configure(jobs: "godwit.job=idle,seconds=2")
        #expect(try api.call("PUT", "/machine-config", ["vcpu_count": 2, "mem_size_mib": 128, "vcpu_affinity": []]).status == 400)
        #expect(try api.call("PUT", "/machine-config", ["vcpu_count": 2, "mem_size_mib": 128, "vcpu_affinity": [5000]]).status == 400)
        #expect(try api.call("PUT", "/machine-config", ["vcpu_count": 2, "mem_size_mib": 128, "vcpu_affinity": [last]]).status == 204)
        #expect(try api.call("GET", "/machine-config").body.contains("\"vcpu_affinity\":[\(last)]"))
        #expect(try api.call("PUT", "/actions", ["action_type": "InstanceStart"]).status == 204)
        var vcpus: [(name: String, cpus: String)] = []
        for _ in 0..<300 where vcpus.count < 2 {
            vcpus = threads(of: api.process.pid).filter { $0.name.hasPrefix("vcpu") }
            usleep(10_000)
        }
        #expect(vcpus.count == 2 && vcpus.allSatisfy { $0.cpus == String(last) }, "\(vcpus)")
        let r = api.process.wait(timeout: 60)
        #expect(r.status == 0, "\(r.stderr)")

        // CPU 1000 passes the API's range check (0-1023) but is no CPU of this host.
        let absent = try APIHarness()
        defer { absent.stop() }
        try absent.configure(jobs: "godwit.job=idle,seconds=1")
        #expect(try absent.call("PATCH", "/machine-config", ["vcpu_affinity": [last, 1000]]).status == 204)
        let refused = try absent.call("PUT", "/actions", ["action_type": "InstanceStart"])
        #expect(refused.status == 400 && refused.body.contains("cannot run on CPU 1000"), "\(refused.body)")
        #expect(absent.process.isRunning, "a refused start leaves the VMM serving its API")
    }

    func childOf(_ parent: Int32) -> Int32? { children(of: parent).first }

    /// `"socket"` in `PUT /drives`, as in Firecracker's schema: the API's VM gets its disk from the domain.
    @Test func apiDriveWithASocket() throws {
        let domain = try Domain(slices: 1)
        defer { domain.stop() }
        let api = try APIHarness()
        defer { api.stop() }
        #expect(try api.call("PUT", "/boot-source", ["kernel_image_path": TestEnvironment.guestPath,
                                                     "boot_args": "godwit.job=blk-verify,size=1048576,mode=irq"]).status == 204)
        #expect(try api.call("PUT", "/drives/missing", ["drive_id": "missing", "socket": "/nonexistent/x.sock", "is_root_device": false]).status == 400)
        #expect(try api.call("PUT", "/drives/rootfs", ["drive_id": "rootfs", "socket": domain.sockets[0], "is_root_device": false]).status == 204)
        #expect(try api.call("PUT", "/actions", ["action_type": "InstanceStart"]).status == 204)
        let r = api.process.wait(timeout: 60)
        #expect(r.status == 0, "\(r.stderr)")
        #expect(try api.serialLines().first { $0.job == "blk-verify" }?["errors"] == "0")
        #expect(try BlockPattern.verify(imagePath: domain.image, offset: 0, size: 1 << 20).bad.isEmpty)
    }

    @Test func aMissingSocketIsAClearError() throws {
        let r = try runGodwit(jobs: "", extra: ["--disk", "socket=/nonexistent/vm.sock"])
        #expect(r.status == 2, "\(r.stderr)")
        #expect(r.stderr.contains("/nonexistent/vm.sock"), "\(r.stderr)")
    }
}

/// vhost-user with real peers: QEMU as the frontend of a Godwit I/O domain, and Godwit as the
/// frontend of qemu-storage-daemon.
@Suite("Interop: vhost-user with QEMU and qemu-storage-daemon", .serialized,
       .enabled(if: TestEnvironment.hasKVM && QEMU.isAvailable))
struct VhostUserInteropTests {
    @Test func qemuDrivesAGodwitIODomain() throws {
        let domain = try IODomainTests.Domain(slices: 1)
        defer { domain.stop() }
        let r = try runProcess(QEMU.binary, [
            "-M", "microvm,acpi=off,memory-backend=mem", "-enable-kvm", "-cpu", "host,-arch-capabilities", "-m", "128M",
            "-object", "memory-backend-memfd,id=mem,size=128M,share=on",
            "-chardev", "socket,id=c0,path=\(domain.sockets[0])", "-device", "vhost-user-blk,chardev=c0",
            "-global", "virtio-mmio.force-legacy=false", "-nographic", "-nodefaults", "-no-user-config", "-serial", "stdio",
            "-device", "isa-debug-exit,iobase=0xf4,iosize=0x04", "-kernel", TestEnvironment.guestPath,
            "-append", "godwit.job=blk-verify,size=1048576 godwit.job=blk-verify,offset=1048576,size=1048576,mode=irq",
        ], timeout: 60)
        #expect(r.status == QEMU.passStatus, "\(r.stdout)\n\(r.stderr)")
        #expect(r.lines(job: "blk-verify").count == 2)
        #expect(try BlockPattern.verify(imagePath: domain.image, offset: 1 << 20, size: 1 << 20).bad.isEmpty)
        #expect(domain.process.isRunning, "the domain outlives its frontend")
    }

    @Test func godwitDrivesQemuStorageDaemon() throws {
        let daemon = "/usr/bin/qemu-storage-daemon"
        guard FileManager.default.isExecutableFile(atPath: daemon) else {
            FileHandle.standardError.write(Data("skipping: \(daemon) is not installed\n".utf8))
            return
        }
        let dir = try TestEnvironment.temporaryDirectory()
        defer { try? FileManager.default.removeItem(at: dir) }
        let image = dir.appendingPathComponent("disk.img").path
        let socket = dir.appendingPathComponent("qsd.sock").path
        try TestEnvironment.makeImage(at: URL(fileURLWithPath: image), size: 16 << 20)
        let qsd = try BackgroundProcess(daemon, ["--blockdev", "driver=file,node-name=f,filename=\(image)",
                                                 "--export", "type=vhost-user-blk,id=e,node-name=f,addr.type=unix,addr.path=\(socket),writable=on"])
        defer { qsd.terminate(); _ = qsd.wait(timeout: 5) }
        for _ in 0..<500 where !FileManager.default.fileExists(atPath: socket) { usleep(10_000) }
        let r = try runGodwit(jobs: "godwit.job=ready godwit.job=blk-verify,size=1048576 godwit.job=blk-verify,offset=2097152,size=1048576,mode=irq",
                              extra: ["--disk", "socket=\(socket)"])
        #expect(r.status == 0, "\(r.stdout)\n\(r.stderr)")
        #expect(r.lines(job: "ready").first?.int("disks") == 1)
        #expect(try BlockPattern.verify(imagePath: image, offset: 2 << 20, size: 1 << 20).bad.isEmpty)
    }
}

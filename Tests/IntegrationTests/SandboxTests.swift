import Foundation
import GodwitSystem
import GodwitTestSupport
import Testing

/// When the sandbox tests can run here; each reason is printed once when a suite is skipped.
enum SandboxEnvironment {
    /// Why `godwit sandbox-probe` cannot run, or nil.
    static let probeUnavailableReason: String? = {
        if !FileManager.default.isExecutableFile(atPath: TestEnvironment.godwitPath) {
            return "godwit is not built (\(TestEnvironment.godwitPath)); run `swift build`"
        }
        if !Sandbox.isSeccompAvailable { return "this build has no libseccomp (install libseccomp-dev, link \"seccomp\")" }
        return nil
    }()

    /// Why new user namespaces cannot be made here, or nil. Reads the sysctls, then tries: a probe in
    /// namespaces that exits 70 naming unshare (EPERM, ENOSPC) means the kernel refuses them.
    static let userNamespacesUnavailableReason: String? = {
        if let reason = probeUnavailableReason { return reason }
        func sysctl(_ path: String) -> Int? {
            (try? String(contentsOfFile: path, encoding: .utf8)).flatMap { Int($0.trimmingCharacters(in: .whitespacesAndNewlines)) }
        }
        if sysctl("/proc/sys/user/max_user_namespaces") == 0 { return "user namespaces are disabled (user.max_user_namespaces = 0)" }
        if getuid() != 0, sysctl("/proc/sys/kernel/unprivileged_userns_clone") == 0 {
            return "unprivileged user namespaces are disabled (kernel.unprivileged_userns_clone = 0) and the tests do not run as root"
        }
        guard let r = try? runProcess("/usr/bin/env", ["\(Sandbox.namespacesVariable)=1", TestEnvironment.godwitPath, "sandbox-probe", "--no-lock-down"],
                                      timeout: 30) else { return "cannot run /usr/bin/env" }
        if r.status == 70 && r.stderr.contains("unshare(") && (r.stderr.contains("(errno 1)") || r.stderr.contains("(errno 28)")) {
            return "the kernel refuses new user namespaces here: \(r.stderr.trimmingCharacters(in: .whitespacesAndNewlines))"
        }
        return nil
    }()

    static func available(_ reason: String?, _ what: String) -> Bool {
        guard let reason else { return true }
        FileHandle.standardError.write("skipping \(what): \(reason)\n".data(using: .utf8)!)
        return false
    }

    static let canProbe = available(probeUnavailableReason, "sandbox tests")
    static let canUseNamespaces = available(userNamespacesUnavailableReason, "sandbox namespace tests")
}

/// A running `godwit sandbox-probe`, and its JSON report.
struct SandboxProbe {
    let process: BackgroundProcess
    let report: [String: Any]

    /// Starts the probe (in new namespaces when `namespaces`), waits for its one JSON line.
    init(namespaces: Bool, _ arguments: [String]) throws {
        let probe = [TestEnvironment.godwitPath, "sandbox-probe"] + arguments
        // Through env, which execs godwit: the pid we hold is godwit's (the waiting parent, with namespaces).
        process = try BackgroundProcess("/usr/bin/env", (namespaces ? ["\(Sandbox.namespacesVariable)=1"] : []) + probe)
        let printed = process.waitForOutput(timeout: 30) { $0.contains("}\n") }
        let line = process.stdoutSoFar.split(separator: "\n").first.map(String.init) ?? ""
        guard printed, let object = try? JSONSerialization.jsonObject(with: Data(line.utf8)) as? [String: Any] else {
            let result = process.wait(timeout: 10)
            throw ProbeError(message: "no JSON report (status \(result.status)): \(result.stdout)\n\(result.stderr)")
        }
        report = object
    }

    struct ProbeError: Error, CustomStringConvertible {
        var message: String
        var description: String { message }
    }

    func int(_ key: String) -> Int? { report[key] as? Int }
    func bool(_ key: String) -> Bool? { report[key] as? Bool }
    func string(_ key: String) -> String? { report[key] as? String }

    /// The sandboxed process's pid as the test sees it: its first NSpid entry, which the probe reports.
    var sandboxedPid: Int32 { Int32(int("outer_pid") ?? -1) }

    /// The status of each thread of `pid`, read from outside.
    static func threadStatuses(of pid: Int32) throws -> [Int32: Sandbox.ProcessStatus] {
        var statuses: [Int32: Sandbox.ProcessStatus] = [:]
        for task in try FileManager.default.contentsOfDirectory(atPath: "/proc/\(pid)/task") {
            guard let tid = Int32(task), let text = try? String(contentsOfFile: "/proc/\(pid)/task/\(task)/status", encoding: .utf8) else { continue }
            statuses[tid] = Sandbox.ProcessStatus(parsing: text)
        }
        return statuses
    }

    /// Where /proc/PID/ns/KIND points (e.g. `net:[4026531833]`).
    static func namespaceLink(_ pid: String, _ kind: String) -> String? {
        try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/\(pid)/ns/\(kind)")
    }
}

@Suite("Integration: the process sandbox (seccomp, capabilities, no_new_privs, namespaces)", .serialized,
       .enabled(if: SandboxEnvironment.canProbe))
struct SandboxTests {
    let isRoot = getuid() == 0
    let EPERM = 1
    let SIGSYS: Int32 = 31

    /// What must hold of every locked-down probe, from its report and from outside.
    func expectLockedDown(_ probe: SandboxProbe, fileSize: Int) throws {
        let r = probe.report
        #expect(probe.bool("locked") == true, "\(r)")
        #expect(probe.int("seccomp") == 2, "Seccomp: 2 (filter) inside: \(r)")
        #expect(probe.int("no_new_privs") == 1, "\(r)")
        for key in ["cap_eff", "cap_prm", "cap_inh", "cap_amb"] {
            #expect(probe.string(key) == "0000000000000000", "\(key): \(r)")
        }
        #expect(probe.bool("file_read") == true, "the descriptor opened before lock-down still reads: \(r)")
        #expect(probe.int("file_bytes") == fileSize, "\(r)")
        #expect(probe.int("reopen_errno") == EPERM, "opening the same file again by path fails: \(r)")
        #expect(probe.int("open_errno") == EPERM, "open(/etc/hostname) fails with EPERM: \(r)")
        #expect(probe.int("socket_errno") == EPERM, "socket(AF_INET) fails with EPERM: \(r)")
        #expect(probe.int("fork_errno") == EPERM, "fork (clone without CLONE_THREAD) fails: \(r)")
        #expect(probe.bool("thread_ok") == true, "threads still start after lock-down: \(r)")

        // From outside: every thread, including those started before lock-down.
        let pid = probe.sandboxedPid
        let statuses = try SandboxProbe.threadStatuses(of: pid)
        #expect(statuses.count == probe.int("threads"), "\(statuses.count) threads seen from outside: \(r)")
        for (tid, status) in statuses {
            #expect(status.seccomp == 2, "thread \(tid) of \(pid): Seccomp \(String(describing: status.seccomp))")
            #expect(status.noNewPrivs == 1, "thread \(tid) of \(pid)")
            #expect(status.capEff == 0, "thread \(tid) of \(pid): CapEff \(String(describing: status.capEff))")
            #expect(status.capPrm == 0, "thread \(tid) of \(pid)")
            if isRoot || probe.bool("namespaces") == true {
                #expect(status.capBnd == 0, "thread \(tid) of \(pid): CapBnd \(String(describing: status.capBnd))")
            }
        }
    }

    func makeFile() throws -> (URL, Int) {
        let dir = try TestEnvironment.temporaryDirectory()
        let file = dir.appendingPathComponent("given.img")
        let content = Data("the only file this domain may read\n".utf8)
        try content.write(to: file)
        return (dir, content.count)
    }

    @Test func lockDownWithoutNamespaces() throws {
        let (dir, size) = try makeFile()
        defer { try? FileManager.default.removeItem(at: dir) }
        let probe = try SandboxProbe(namespaces: false, ["--file", dir.appendingPathComponent("given.img").path,
                                                         "--threads", "2", "--seconds", "2"])
        #expect(probe.bool("namespaces") == false)
        #expect(probe.sandboxedPid == probe.process.pid, "without namespaces the probe is the process we started")
        #expect((probe.int("threads") ?? 0) >= 3, "main and two threads started before lock-down: \(probe.report)")
        try expectLockedDown(probe, fileSize: size)
        if isRoot { #expect(probe.string("cap_bnd") == "0000000000000000", "\(probe.report)") }
        let result = probe.process.wait(timeout: 30)
        #expect(result.status == 0, "\(result.stderr)")
    }

    @Test(.enabled(if: SandboxEnvironment.canUseNamespaces))
    func lockDownInNamespaces() throws {
        let (dir, size) = try makeFile()
        defer { try? FileManager.default.removeItem(at: dir) }
        let probe = try SandboxProbe(namespaces: true, ["--file", dir.appendingPathComponent("given.img").path,
                                                        "--threads", "2", "--seconds", "2"])
        let r = probe.report
        #expect(probe.bool("namespaces") == true, "\(r)")
        #expect(probe.int("pid") == 1, "PID 1 of its own PID namespace: \(r)")
        #expect(probe.int("uid") == 0 && probe.int("gid") == 0, "root inside its user namespace: \(r)")
        #expect(probe.report["net_devices"] as? [String] == ["lo"], "a network namespace with only lo: \(r)")
        #expect(probe.string("cap_bnd") == "0000000000000000", "\(r)")
        try expectLockedDown(probe, fileSize: size)

        // The sandboxed process is the child of the one we started, which waits outside the PID namespace.
        let pid = probe.sandboxedPid
        #expect(pid != probe.process.pid)
        let status = try String(contentsOfFile: "/proc/\(pid)/status", encoding: .utf8)
        #expect(status.contains("\nPPid:\t\(probe.process.pid)\n"), "its parent is the process we started")
        #expect(Sandbox.ProcessStatus(parsing: status).nsPids == [pid, 1])
        for kind in ["user", "mnt", "ipc", "net", "pid"] {
            let theirs = SandboxProbe.namespaceLink(String(pid), kind)
            #expect(theirs != nil && theirs != SandboxProbe.namespaceLink("self", kind), "\(kind) namespace differs: \(theirs ?? "?")")
        }
        #expect(probe.string("net_ns") == SandboxProbe.namespaceLink(String(pid), "net"), "the probe saw its own network namespace")
        let result = probe.process.wait(timeout: 30)
        #expect(result.status == 0, "the waiting parent exits with the child's status: \(result.stderr)")
    }

    @Test(arguments: [false, true])
    func fatalSyscallKillsTheProcess(namespaces: Bool) throws {
        if namespaces && !SandboxEnvironment.canUseNamespaces { return }
        let probe = try SandboxProbe(namespaces: namespaces, ["--try-fatal"])
        #expect(probe.int("seccomp") == 2)
        let result = probe.process.wait(timeout: 30)
        // mount(2) is on the kill list: SIGSYS (Process reports the signal number as the status; the
        // probe's own exit statuses are 0, 1 and 3). With namespaces the parent dies of the same signal.
        #expect(result.status == SIGSYS, "\(result.stdout)\n\(result.stderr)")
        #expect(!result.stderr.contains("instead of killing"))
    }

    @Test func anExtraSyscallIsAllowed() throws {
        let probe = try SandboxProbe(namespaces: false, ["--allow", "socket"])
        #expect(probe.int("socket_errno") == 0, "socket was failing because of the filter only: \(probe.report)")
        #expect(probe.int("open_errno") == EPERM)
        _ = probe.process.wait(timeout: 30)
    }

    @Test func anUnknownSyscallNameIsAClearError() throws {
        let r = try runProcess(TestEnvironment.godwitPath, ["sandbox-probe", "--allow", "no_such_syscall"], timeout: 30)
        #expect(r.status == 1)
        #expect(r.stderr.contains("'no_such_syscall' is not a syscall libseccomp knows"), "\(r.stderr)")
        #expect(r.stdout.isEmpty, "no report: the process never ran unfiltered past lock-down")
    }

    @Test(arguments: [false, true])
    func aThreadThatBlocksSIGSYSMakesLockDownFail(namespaces: Bool) throws {
        // Capabilities are per thread; one that cannot be reached must not stay privileged silently.
        // (Only a process with capabilities has something to drop: root, or root in its user namespace.)
        if namespaces && !SandboxEnvironment.canUseNamespaces { return }
        if !namespaces && !isRoot {
            FileHandle.standardError.write("skipping the capability-drop failure test outside namespaces: not root\n".data(using: .utf8)!)
            return
        }
        let r = try runProcess("/usr/bin/env", (namespaces ? ["\(Sandbox.namespacesVariable)=1"] : [])
                               + [TestEnvironment.godwitPath, "sandbox-probe", "--threads", "1", "--stubborn-thread"], timeout: 30)
        #expect(r.status == 1, "\(r.stdout)\n\(r.stderr)")
        #expect(r.stderr.contains("dropping capabilities failed") && r.stderr.contains("does it block SIGSYS?"), "\(r.stderr)")
        #expect(r.stdout.isEmpty)
    }

    @Test(.enabled(if: SandboxEnvironment.canUseNamespaces))
    func sigtermReachesTheSandboxedProcess() throws {
        let probe = try SandboxProbe(namespaces: true, ["--seconds", "60"])
        let pid = probe.sandboxedPid
        let start = Date()
        probe.process.terminate()
        let result = probe.process.wait(timeout: 20)
        #expect(!result.timedOut)
        #expect(Date().timeIntervalSince(start) < 10, "the forwarded SIGTERM stopped PID 1 of the namespace")
        #expect(result.status == SIGTERM, "the parent dies of the signal its child died of: \(result.status) \(result.stderr)")
        #expect(!FileManager.default.fileExists(atPath: "/proc/\(pid)/status"), "the sandboxed child is gone too")
    }

    @Test(.enabled(if: SandboxEnvironment.canUseNamespaces))
    func refusedNamespacesExit70() throws {
        // A user namespace whose max_user_namespaces is 0 (a per-namespace limit: the host's is untouched)
        // refuses the probe's unshare: one line on stderr, exit 70, nothing run unsandboxed.
        guard FileManager.default.isExecutableFile(atPath: "/usr/bin/unshare") else {
            FileHandle.standardError.write("skipping refusedNamespacesExit70: no /usr/bin/unshare (util-linux)\n".data(using: .utf8)!)
            return
        }
        let script = "echo 0 > /proc/sys/user/max_user_namespaces && exec /usr/bin/env \(Sandbox.namespacesVariable)=1 \"$0\" sandbox-probe"
        let r = try runProcess("/usr/bin/unshare", ["--user", "--map-root-user", "/bin/sh", "-c", script, TestEnvironment.godwitPath], timeout: 30)
        #expect(r.status == 70, "\(r.stdout)\n\(r.stderr)")
        #expect(r.stdout.isEmpty, "main never ran")
        let lines = r.stderr.split(separator: "\n")
        #expect(lines.count == 1 && lines[0].hasPrefix("godwit: sandbox: unshare(user, mount, IPC, network, PID) failed:"), "\(r.stderr)")
    }

    @Test func withoutLockDownNothingIsFiltered() throws {
        // A baseline: the same probe, not locked down, can open, make sockets and fork.
        let probe = try SandboxProbe(namespaces: false, ["--no-lock-down"])
        #expect(probe.int("seccomp") == 0)
        #expect(probe.int("open_errno") == 0)
        #expect(probe.int("socket_errno") == 0)
        #expect(probe.int("fork_errno") == 0)
        _ = probe.process.wait(timeout: 30)
    }

    // MARK: The rule list and the status parser (no process needed)

    @Test func everyNamedSyscallIsKnown() {
        for name in Sandbox.baseSyscalls + Sandbox.fatalSyscalls + ["clone3", "ioctl"] {
            #expect(Sandbox.syscallNumber(name) != nil, "\(name)")
        }
        #expect(Sandbox.syscallNumber("no_such_syscall") == nil)
        #expect(Set(Sandbox.baseSyscalls).isDisjoint(with: Sandbox.fatalSyscalls))
        for forbidden in ["open", "openat", "openat2", "creat", "execve", "socket", "connect", "bind", "ptrace", "mount",
                          "unshare", "setns", "kexec_load", "bpf", "perf_event_open", "clone3", "ioctl"] {
            #expect(!Sandbox.baseSyscalls.contains(forbidden), "\(forbidden) is not in the allow-list")
        }
    }

    @Test func rulesNarrowAndExtend() {
        let rules = Sandbox.rules(allowing: ["socket", "ptrace"], ioctls: .only([0x400454ca]))
        let clone = rules.filter { $0.syscall == "clone" }
        #expect(clone.count == 1 && clone[0].conditions == [.argument(0, masked: 0x10000, equals: 0x10000)], "threads only")
        #expect(rules.contains(Sandbox.Rule("clone3", .fail(errno: ENOSYS))))
        #expect(rules.contains(.allow("socket")))
        #expect(rules.contains(.allow("ptrace")) && !rules.contains(Sandbox.Rule("ptrace", .killProcess)), "an allowed fatal syscall is allowed")
        #expect(rules.contains(Sandbox.Rule("mount", .killProcess)))
        let ioctl = rules.filter { $0.syscall == "ioctl" }
        #expect(ioctl.count == 2, "TCGETS and the one request: \(ioctl)")
        #expect(ioctl.allSatisfy { $0.conditions.count == 1 && $0.conditions[0].argument == 1 })
        #expect(Sandbox.rules(ioctls: .any).contains(.allow("ioctl")))
        #expect(Sandbox.rules(allowing: ["mmap"]).filter { $0.syscall == "mmap" } == [.allow("mmap")], "an extra replaces the narrowed rule")
    }

    @Test func statusParser() {
        let text = """
        Name:\tgodwit
        Pid:\t4242
        PPid:\t4240
        NSpid:\t4242\t1
        Uid:\t0\t0\t0\t0
        Gid:\t0\t0\t0\t0
        Threads:\t3
        CapInh:\t0000000000000000
        CapPrm:\t0000000000000000
        CapEff:\t0000000000000000
        CapBnd:\t000001ffffffffff
        CapAmb:\t0000000000000000
        NoNewPrivs:\t1
        Seccomp:\t2
        Seccomp_filters:\t1
        """
        let s = Sandbox.ProcessStatus(parsing: text)
        #expect(s.seccomp == 2 && s.noNewPrivs == 1 && s.threads == 3)
        #expect(s.capEff == 0 && s.capPrm == 0 && s.capBnd == 0x1ff_ffff_ffff)
        #expect(s.nsPids == [4242, 1])
        #expect(s.uid == [0, 0, 0, 0])
    }
}

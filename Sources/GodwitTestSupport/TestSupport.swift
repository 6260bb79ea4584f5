import Foundation
import GodwitSystem

/// Shared helpers for Godwit's test tiers: where the artifacts are, running VMMs, reading guest results.
public enum TestEnvironment {
    /// The repository root (found from this file's path).
    public static let repositoryRoot: URL = {
        var url = URL(fileURLWithPath: #filePath)
        for _ in 0..<3 { url.deleteLastPathComponent() }
        return url
    }()

    /// The test guest ELF built by `make guest`.
    public static var guestPath: String {
        ProcessInfo.processInfo.environment["GODWIT_GUEST"]
            ?? repositoryRoot.appendingPathComponent("guest/out/guest.elf").path
    }

    /// The `godwit` binary built by SwiftPM next to the test bundle.
    public static var godwitPath: String {
        if let path = ProcessInfo.processInfo.environment["GODWIT_BIN"] { return path }
        let candidates = [".build/debug/godwit", ".build/release/godwit"].map { repositoryRoot.appendingPathComponent($0).path }
        return candidates.first { FileManager.default.isExecutableFile(atPath: $0) } ?? candidates[0]
    }

    /// The project's Linux guest: `make linux` links the cached builds under `out/linux/`
    /// (`vmlinux`, `bzImage`, `initramfs.cpio`); GODWIT_LINUX_DIR points elsewhere.
    public static func linuxArtifact(_ name: String) -> String {
        let dir = ProcessInfo.processInfo.environment["GODWIT_LINUX_DIR"] ?? repositoryRoot.appendingPathComponent("out/linux").path
        return dir + "/" + name
    }

    /// Why the Linux tier cannot run here, or nil when it can.
    public static var linuxUnavailableReason: String? {
        if let reason = kvmUnavailableReason { return reason }
        for name in ["vmlinux", "bzImage", "initramfs.cpio"] where !FileManager.default.fileExists(atPath: linuxArtifact(name)) {
            return "the Linux guest is not built (\(linuxArtifact(name))); run `make linux`"
        }
        return nil
    }

    /// Why the KVM tier cannot run here, or nil when it can.
    public static var kvmUnavailableReason: String? {
        if getuid() != 0 && access("/dev/kvm", R_OK | W_OK) != 0 { return "no access to /dev/kvm (not root and not in the kvm group)" }
        if access("/dev/kvm", F_OK) != 0 { return "/dev/kvm does not exist (KVM not loaded)" }
        if access("/dev/kvm", R_OK | W_OK) != 0 { return "/dev/kvm is not readable and writable by this user" }
        if !FileManager.default.fileExists(atPath: guestPath) { return "the test guest is not built (\(guestPath)); run `make guest`" }
        if !FileManager.default.isExecutableFile(atPath: godwitPath) { return "godwit is not built (\(godwitPath)); run `swift build`" }
        return nil
    }

    public static var hasKVM: Bool {
        if let reason = kvmUnavailableReason {
            FileHandle.standardError.write("skipping KVM test: \(reason)\n".data(using: .utf8)!)
            return false
        }
        return true
    }

    /// A fresh temporary directory.
    public static func temporaryDirectory() throws -> URL {
        let url = FileManager.default.temporaryDirectory.appendingPathComponent("godwit-test-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: url, withIntermediateDirectories: true)
        return url
    }

    /// Creates a sparse file of `size` bytes.
    public static func makeImage(at url: URL, size: UInt64) throws {
        FileManager.default.createFile(atPath: url.path, contents: nil)
        let handle = try FileHandle(forWritingTo: url)
        try handle.truncate(atOffset: size)
        try handle.close()
    }
}

/// The outcome of running a program: exit status and what it printed.
public struct ProcessResult: Sendable {
    public var status: Int32
    public var stdout: String
    public var stderr: String
    public var timedOut: Bool

    /// The guest's `@godwit` result lines, parsed.
    public var guestLines: [GuestLine] { stdout.split(separator: "\n").compactMap { GuestLine(String($0)) } }

    public func lines(job: String) -> [GuestLine] { guestLines.filter { $0.job == job } }

    /// A counter from the statistics godwit prints at exit with GODWIT_DEVICE_STATISTICS=1,
    /// e.g. `counter("exits", "mmio")`.
    public func counter(_ line: String, _ name: String) -> Int? {
        guard let l = stderr.split(separator: "\n").first(where: { $0.hasPrefix("godwit: \(line):") }),
              let r = l.range(of: "\(name): ") else { return nil }
        return Int(l[r.upperBound...].prefix { $0.isNumber })
    }
}

/// One `@godwit job=NAME boot=ID t_us=T key=value...` line from the test guest.
public struct GuestLine: Sendable, CustomStringConvertible {
    public var job: String
    public var fields: [String: String]
    public var raw: String

    public init?(_ line: String) {
        let trimmed = line.trimmingCharacters(in: .whitespacesAndNewlines)
        guard let start = trimmed.range(of: "@godwit ") else { return nil }
        var fields: [String: String] = [:]
        for token in trimmed[start.upperBound...].split(separator: " ") {
            guard let eq = token.firstIndex(of: "=") else { continue }
            fields[String(token[..<eq])] = String(token[token.index(after: eq)...])
        }
        guard let job = fields["job"] else { return nil }
        self.job = job
        self.fields = fields
        self.raw = trimmed
    }

    public subscript(_ key: String) -> String? { fields[key] }
    public func int(_ key: String) -> Int? { fields[key].flatMap { Int($0) } }
    public func double(_ key: String) -> Double? { fields[key].flatMap { Double($0) } }
    public var description: String { raw }
}

/// A program started in the background; `wait()` collects its result (with a time limit).
public final class BackgroundProcess: @unchecked Sendable {
    let process = Process()
    let outData = LockedData(), errData = LockedData()
    let out = Pipe(), err = Pipe()
    /// Signalled by each reader thread at end of file.
    let readersDone = DispatchSemaphore(value: 0)

    /// Starts `path`; `input`, if given, is written to its standard input after `inputDelay` seconds
    /// (which stays open until the process exits).
    public init(_ path: String, _ arguments: [String], input: String? = nil, inputDelay: Double = 0) throws {
        process.executableURL = URL(fileURLWithPath: path)
        process.arguments = arguments
        process.standardOutput = out
        process.standardError = err
        let inPipe = Pipe()
        process.standardInput = inPipe
        try process.run()
        // One reader thread per pipe, to end of file: what `wait` returns holds every byte (a
        // readability handler could still be appending a chunk it had taken when `wait` collected).
        for (pipe, data) in [(out, outData), (err, errData)] {
            let handle = pipe.fileHandleForReading, done = readersDone
            detachThread(name: "test-output") {
                while true {
                    let chunk = handle.availableData
                    if chunk.isEmpty { break }
                    data.append(chunk)
                }
                done.signal()
            }
        }
        if let input {
            DispatchQueue.global().asyncAfter(deadline: .now() + inputDelay) {
                inPipe.fileHandleForWriting.write(Data(input.utf8))
            }
        }
    }

    public var pid: Int32 { process.processIdentifier }
    public var isRunning: Bool { process.isRunning }
    /// What it has printed so far.
    public var stdoutSoFar: String { outData.string }
    /// What it has printed on standard error so far.
    public var stderrSoFar: String { errData.string }

    /// Waits until `predicate` holds for the standard error so far, or `timeout` passes.
    public func waitForErrorOutput(timeout: Double = 30, _ predicate: (String) -> Bool) -> Bool {
        let deadline = Date().addingTimeInterval(timeout)
        while Date() < deadline {
            if predicate(errData.string) { return true }
            if !process.isRunning { return predicate(errData.string) }
            usleep(10_000)
        }
        return false
    }

    /// Waits until `predicate` holds for the output so far, or `timeout` passes; returns whether it held.
    public func waitForOutput(timeout: Double = 30, _ predicate: (String) -> Bool) -> Bool {
        let deadline = Date().addingTimeInterval(timeout)
        while Date() < deadline {
            if predicate(outData.string) { return true }
            if !process.isRunning { return predicate(outData.string) }
            usleep(10_000)
        }
        return false
    }

    /// Asks the process to stop (SIGTERM: `godwit vm` stops its guest and exits 7), and kills it if it
    /// is still there after 3 seconds (a child started with SIGTERM blocked ignores it). Returns at once
    /// when the process has already gone.
    public func terminate() {
        guard process.isRunning else { return }
        process.terminate()
        let grace = Date().addingTimeInterval(3)
        while process.isRunning && Date() < grace { usleep(10_000) }
        if process.isRunning { kill(process.processIdentifier, SIGKILL) }
    }

    public func wait(timeout: Double = 120) -> ProcessResult {
        let deadline = Date().addingTimeInterval(timeout)
        var timedOut = false
        while process.isRunning && Date() < deadline { usleep(10_000) }
        if process.isRunning {
            timedOut = true
            process.terminate()
            let grace = Date().addingTimeInterval(3)
            while process.isRunning && Date() < grace { usleep(10_000) }
            if process.isRunning { kill(process.processIdentifier, SIGKILL) }
        }
        process.waitUntilExit()
        // End of file comes when every holder of the pipes is gone (a VMM's I/O domains too); a
        // straggler that keeps them open does not hold the test up for more than a few seconds.
        for _ in 0..<2 { _ = readersDone.wait(timeout: .now() + 5) }
        return ProcessResult(status: process.terminationStatus, stdout: outData.string, stderr: errData.string, timedOut: timedOut)
    }
}

/// Runs a program with a time limit, optional standard input, and captures its output.
public func runProcess(_ path: String, _ arguments: [String], input: String? = nil, inputDelay: Double = 0,
                       timeout: Double = 120) throws -> ProcessResult {
    try BackgroundProcess(path, arguments, input: input, inputDelay: inputDelay).wait(timeout: timeout)
}

/// Runs `godwit vm` with the test guest and `append` as the command line.
public func runGodwit(jobs: String, cpus: Int = 1, memory: String = "128M", disks: [String] = [], extra: [String] = [],
                      kernel: String? = nil, input: String? = nil, inputDelay: Double = 0, timeout: Double = 120,
                      statistics: Bool = false) throws -> ProcessResult {
    if statistics { setenv("GODWIT_DEVICE_STATISTICS", "1", 1) } else { unsetenv("GODWIT_DEVICE_STATISTICS") }
    var args = ["vm", "--kernel", kernel ?? TestEnvironment.guestPath, "--cpus", String(cpus), "--memory", memory, "--cmdline", jobs]
    for d in disks { args += ["--disk", d] }
    args += extra
    return try runProcess(TestEnvironment.godwitPath, args, input: input, inputDelay: inputDelay, timeout: timeout)
}

final class LockedData: @unchecked Sendable {
    private let lock = NSLock()
    private var data = Data()
    func append(_ d: Data) { lock.lock(); data.append(d); lock.unlock() }
    var string: String { lock.lock(); defer { lock.unlock() }; return String(decoding: data, as: UTF8.self) }
}

/// Where a `godwit vm` process tree keeps its parts: in its namespaces the process a test starts
/// only waits, its child (PID 1 of the VMM's PID namespace) is the VMM, and a second child, the
/// network broker, stays in the caller's namespaces.
public enum VMMProcesses {
    /// The processes `pid`'s threads started (`/proc/PID/task/*/children`).
    public static func children(of pid: Int32) -> [Int32] {
        let tasks = (try? FileManager.default.contentsOfDirectory(atPath: "/proc/\(pid)/task")) ?? []
        return tasks.flatMap { task -> [Int32] in
            let text = (try? String(contentsOfFile: "/proc/\(pid)/task/\(task)/children", encoding: .utf8)) ?? ""
            return text.split(separator: " ").compactMap { Int32($0.trimmingCharacters(in: .whitespacesAndNewlines)) }
        }
    }

    /// The short name of process `pid` (`/proc/PID/comm`), or nil when it is gone.
    public static func name(of pid: Int32) -> String? {
        (try? String(contentsOfFile: "/proc/\(pid)/comm", encoding: .utf8))?.trimmingCharacters(in: .whitespacesAndNewlines)
    }

    /// The network broker of the `godwit vm` started as `pid`, if it has one.
    public static func broker(of pid: Int32) -> Int32? {
        children(of: pid).first { name(of: $0) == "godwit-broker" }
    }

    /// The VMM itself: the namespaced child of `pid` (waiting up to two seconds for it) when `pid` is a
    /// `godwit vm` that enters its namespaces, else `pid` (run with `--no-namespaces` or `--no-sandbox`).
    public static func vmm(of pid: Int32) -> Int32 {
        let arguments = ((try? Data(contentsOf: URL(fileURLWithPath: "/proc/\(pid)/cmdline"))) ?? Data())
            .split(separator: 0).map { String(decoding: $0, as: UTF8.self) }
        guard arguments.count > 1, arguments[1] == "vm",
              !arguments.contains("--no-namespaces"), !arguments.contains("--no-sandbox") else { return pid }
        for _ in 0..<200 {
            if let vmm = children(of: pid).first(where: { name(of: $0) != "godwit-broker" }) { return vmm }
            usleep(10_000)
        }
        return pid
    }

    /// The I/O domain processes the VMM `pid` supervises (children of its supervisor child).
    public static func supervisedDomains(of pid: Int32) -> [Int32] {
        let vmm = vmm(of: pid)
        return children(of: vmm).flatMap { children(of: $0) }
    }
}

/// The host's pool of 2 MiB huge pages (`/proc/sys/vm/nr_hugepages`), resized for a test and put back.
public enum HugePagePool {
    static let sysctl = "/proc/sys/vm/nr_hugepages"

    /// A field of /proc/meminfo (`HugePages_Total`, `HugePages_Free`), or nil.
    public static func meminfo(_ field: String) -> Int? {
        let text = (try? String(contentsOfFile: "/proc/meminfo", encoding: .utf8)) ?? ""
        guard let line = text.split(separator: "\n").first(where: { $0.hasPrefix(field + ":") }) else { return nil }
        return Int(line.dropFirst(field.count + 1).trimmingCharacters(in: .whitespaces))
    }

    /// Runs `body` with exactly `free` free huge pages in the pool (root only), then restores the pool's size.
    public static func withFree<T>(_ free: Int, _ body: () throws -> T) throws -> T {
        guard let total = meminfo("HugePages_Total"), let now = meminfo("HugePages_Free") else {
            throw TestFailure("cannot read the huge page pool from /proc/meminfo")
        }
        try String(total - now + free).write(toFile: sysctl, atomically: false, encoding: .utf8)
        defer { try? String(total).write(toFile: sysctl, atomically: false, encoding: .utf8) }
        guard meminfo("HugePages_Free") == free else {
            throw TestFailure("the kernel did not give the pool \(free) free huge pages (free: \(meminfo("HugePages_Free") ?? -1))")
        }
        return try body()
    }
}

/// The threads (name, Cpus_allowed_list) of process `pid` and of its descendants, from /proc.
public func threads(of pid: Int32) -> [(name: String, cpus: String)] {
    var result: [(name: String, cpus: String)] = []
    var pids = [pid]
    while let p = pids.popLast() {
        for task in (try? FileManager.default.contentsOfDirectory(atPath: "/proc/\(p)/task")) ?? [] {
            guard let status = try? String(contentsOfFile: "/proc/\(p)/task/\(task)/status", encoding: .utf8) else { continue }
            let field = { (key: String) in
                status.split(separator: "\n").first { $0.hasPrefix(key + ":") }.map { String($0.dropFirst(key.count + 1)).trimmingCharacters(in: .whitespaces) } ?? ""
            }
            result.append((field("Name"), field("Cpus_allowed_list")))
        }
        pids += children(of: p)
    }
    return result
}

/// The processes whose parent is `parent`, from /proc.
public func children(of parent: Int32) -> [Int32] {
    ((try? FileManager.default.contentsOfDirectory(atPath: "/proc")) ?? []).compactMap { entry in
        guard let pid = Int32(entry),
              let status = try? String(contentsOfFile: "/proc/\(pid)/status", encoding: .utf8),
              status.split(separator: "\n").contains(where: { $0 == "PPid:\t\(parent)" }) else { return nil }
        return pid
    }
}

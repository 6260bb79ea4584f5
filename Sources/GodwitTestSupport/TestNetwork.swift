import Foundation

/// A throw-away test network: a network namespace with a bridge (10.77.0.1/24) and TAPs on it,
/// made by `scripts/testnet.sh` and removed again by `tearDown()`.
public final class TestNetwork: @unchecked Sendable {
    public let namespace: String
    public let bridge: String
    public let taps: [String]
    public static let hostAddress = "10.77.0.1"

    /// Why the network tier cannot run here, or nil.
    public static var unavailableReason: String? {
        if getuid() != 0 { return "network tests need root (network namespaces, TAPs)" }
        if access("/dev/net/tun", R_OK | W_OK) != 0 { return "/dev/net/tun is missing" }
        for tool in ["/usr/sbin/ip", "/usr/bin/ping", "/usr/bin/python3"] where !FileManager.default.isExecutableFile(atPath: tool) {
            return "\(tool) is not installed (scripts/install-deps.sh installs it)"
        }
        return nil
    }

    public static var isAvailable: Bool {
        guard TestEnvironment.hasKVM else { return false }
        if let reason = unavailableReason {
            FileHandle.standardError.write("skipping network test: \(reason)\n".data(using: .utf8)!)
            return false
        }
        return true
    }

    public init(taps: Int = 1) throws {
        let tag = String(UInt32.random(in: 0..<0xffffff), radix: 16)
        namespace = "gwtest-\(tag)"
        bridge = "gwb\(tag)"
        self.taps = (0..<taps).map { "gwb\(tag)t\($0)" }
        let r = try runProcess("/bin/bash", [TestEnvironment.repositoryRoot.appendingPathComponent("scripts/testnet.sh").path, "up",
                                             "--netns", namespace, "--bridge", bridge, "--taps", String(taps),
                                             "--addr", "\(TestNetwork.hostAddress)/24"], timeout: 30)
        guard r.status == 0 else { throw TestNetworkError(message: "testnet.sh up failed: \(r.stdout)\(r.stderr)") }
    }

    public func tearDown() {
        _ = try? runProcess("/bin/bash", [TestEnvironment.repositoryRoot.appendingPathComponent("scripts/testnet.sh").path, "down",
                                          "--netns", namespace, "--bridge", bridge, "--taps", String(taps.count)], timeout: 30)
    }

    /// Arguments that run `program` inside the namespace.
    public func inside(_ program: String, _ arguments: [String]) -> (String, [String]) {
        ("/usr/sbin/ip", ["netns", "exec", namespace, program] + arguments)
    }

    /// Runs a command inside the namespace and waits for it.
    public func run(_ program: String, _ arguments: [String], timeout: Double = 120) throws -> ProcessResult {
        let (p, a) = inside(program, arguments)
        return try runProcess(p, a, timeout: timeout)
    }

    /// Starts `godwit vm` with the test guest inside the namespace, in the background.
    public func startGodwit(jobs: String, cpus: Int = 1, nets: [String], extra: [String] = []) throws -> BackgroundProcess {
        var args = ["vm", "--kernel", TestEnvironment.guestPath, "--cpus", String(cpus), "--memory", "128M", "--cmdline", jobs]
        for n in nets { args += ["--net", n] }
        let (p, a) = inside(TestEnvironment.godwitPath, args + extra)
        return try BackgroundProcess(p, a)
    }

    /// Runs `scripts/nettool.py` inside the namespace and decodes its JSON output.
    public func nettool(_ arguments: [String], timeout: Double = 120) throws -> [String: Any] {
        let r = try run("/usr/bin/python3", [TestEnvironment.repositoryRoot.appendingPathComponent("scripts/nettool.py").path] + arguments,
                        timeout: timeout)
        let last = r.stdout.split(separator: "\n").last.map(String.init) ?? ""
        guard let object = try? JSONSerialization.jsonObject(with: Data(last.utf8)) as? [String: Any] else {
            throw TestNetworkError(message: "nettool \(arguments.first ?? "") printed no JSON (status \(r.status)): \(r.stdout)\(r.stderr)")
        }
        return object
    }
}

public struct TestNetworkError: Error, CustomStringConvertible {
    public var message: String
    public var description: String { message }
}

/// Memory of a running process from /proc (kB), for boundedness checks.
public func residentAnonymousKB(pid: Int32) -> Int? {
    guard let status = try? String(contentsOfFile: "/proc/\(pid)/status", encoding: .utf8) else { return nil }
    for line in status.split(separator: "\n") where line.hasPrefix("RssAnon:") {
        return Int(line.split(separator: " ").dropFirst().first ?? "")
    }
    return nil
}

/// A second "host" for multi-host tests: a network namespace joined to the test's own by a veth pair
/// (ours `10.89.N.1`, theirs `10.89.N.2`); `setLink(up:)` cuts and restores the wire.
public final class PeerHost: @unchecked Sendable {
    public let namespace: String
    public let link: String
    public let ourAddress: String
    public let address: String

    public init(subnet: Int) throws {
        let tag = String(UInt32.random(in: 0..<0xffffff), radix: 16)
        namespace = "gwpeer-\(tag)"
        link = "gwp\(tag)a"
        ourAddress = "10.89.\(subnet).1"
        address = "10.89.\(subnet).2"
        let peer = "gwp\(tag)b"
        let steps: [[String]] = [
            ["netns", "add", namespace],
            ["link", "add", link, "type", "veth", "peer", "name", peer],
            ["link", "set", peer, "netns", namespace],
            ["addr", "add", "\(ourAddress)/24", "dev", link],
            ["link", "set", link, "up"],
            ["netns", "exec", namespace, "ip", "addr", "add", "\(address)/24", "dev", peer],
            ["netns", "exec", namespace, "ip", "link", "set", peer, "up"],
            ["netns", "exec", namespace, "ip", "link", "set", "lo", "up"],
        ]
        for step in steps {
            let r = try runProcess("/usr/sbin/ip", step, timeout: 20)
            guard r.status == 0 else {
                tearDown()
                throw TestNetworkError(message: "ip \(step.joined(separator: " ")): \(r.stderr)")
            }
        }
    }

    /// Starts `program` inside the peer's namespace.
    public func start(_ program: String, _ arguments: [String]) throws -> BackgroundProcess {
        try BackgroundProcess("/usr/sbin/ip", ["netns", "exec", namespace, program] + arguments)
    }

    /// Brings our end of the wire down (nothing passes, no reset is sent) or up again.
    public func setLink(up: Bool) throws {
        _ = try runProcess("/usr/sbin/ip", ["link", "set", link, up ? "up" : "down"], timeout: 20)
    }

    public func tearDown() {
        _ = try? runProcess("/usr/sbin/ip", ["link", "del", link], timeout: 20)
        _ = try? runProcess("/usr/sbin/ip", ["netns", "del", namespace], timeout: 20)
    }
}

/// Hosts as network namespaces on one bridge (in a namespace of its own), plus a leg from the test's
/// own namespace: host `i` is 10.91.S.(i+1), the test is 10.91.S.254. A host's link can be cut.
public final class ClusterNetwork: @unchecked Sendable {
    public let switchNamespace: String
    public let namespaces: [String]
    public let addresses: [String]
    public let ourAddress: String
    /// The switch-side end of each host's wire, and of ours.
    let switchLinks: [String]
    let ourLink: String

    public init(hosts count: Int, subnet: Int) throws {
        let tag = String(UInt32.random(in: 0..<0xffffff), radix: 16)
        switchNamespace = "gwsw-\(tag)"
        namespaces = (0..<count).map { "gwh\($0)-\(tag)" }
        addresses = (0..<count).map { "10.91.\(subnet).\($0 + 1)" }
        ourAddress = "10.91.\(subnet).254"
        switchLinks = (0..<count).map { "gwc\(tag)\($0)b" }
        ourLink = "gwc\(tag)ra"
        var steps: [[String]] = [
            ["netns", "add", switchNamespace],
            ["-n", switchNamespace, "link", "add", "br0", "type", "bridge"],
            ["-n", switchNamespace, "link", "set", "br0", "up"],
            ["-n", switchNamespace, "link", "set", "lo", "up"],
        ]
        for i in 0..<count {
            let inner = "gwc\(tag)\(i)a"
            steps += [
                ["netns", "add", namespaces[i]],
                ["link", "add", inner, "type", "veth", "peer", "name", switchLinks[i]],
                ["link", "set", inner, "netns", namespaces[i]],
                ["link", "set", switchLinks[i], "netns", switchNamespace],
                ["-n", namespaces[i], "addr", "add", "\(addresses[i])/24", "dev", inner],
                ["-n", namespaces[i], "link", "set", inner, "up"],
                ["-n", namespaces[i], "link", "set", "lo", "up"],
                ["-n", switchNamespace, "link", "set", switchLinks[i], "master", "br0", "up"],
            ]
        }
        steps += [
            ["link", "add", ourLink, "type", "veth", "peer", "name", "gwc\(tag)rb"],
            ["link", "set", "gwc\(tag)rb", "netns", switchNamespace],
            ["-n", switchNamespace, "link", "set", "gwc\(tag)rb", "master", "br0", "up"],
            ["addr", "add", "\(ourAddress)/24", "dev", ourLink],
            ["link", "set", ourLink, "up"],
        ]
        for step in steps {
            let r = try runProcess("/usr/sbin/ip", step, timeout: 20)
            guard r.status == 0 else {
                tearDown()
                throw TestNetworkError(message: "ip \(step.joined(separator: " ")): \(r.stderr)")
            }
        }
    }

    /// Starts `program` inside host `i`'s namespace.
    public func start(host i: Int, _ program: String, _ arguments: [String], environment: [String: String] = [:]) throws -> BackgroundProcess {
        let env = environment.map { "\($0.key)=\($0.value)" }.sorted()
        return try BackgroundProcess("/usr/sbin/ip", ["netns", "exec", namespaces[i], "/usr/bin/env"] + env + [program] + arguments)
    }

    /// Cuts host `i` off the switch (nothing passes, no reset is sent), or connects it again.
    public func setLink(host i: Int, up: Bool) throws {
        _ = try runProcess("/usr/sbin/ip", ["-n", switchNamespace, "link", "set", switchLinks[i], up ? "up" : "down"], timeout: 20)
    }

    public func tearDown() {
        _ = try? runProcess("/usr/sbin/ip", ["link", "del", ourLink], timeout: 20)
        for ns in namespaces + [switchNamespace] { _ = try? runProcess("/usr/sbin/ip", ["netns", "del", ns], timeout: 20) }
    }
}

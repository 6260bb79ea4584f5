// The API's models: the resources of Firecracker's API (`src/firecracker/swagger/firecracker.yaml`)
// with its JSON field names, plus Godwit's extensions. Decoding is strict: a field the schema does not
// have is refused with a message that names it (as Firecracker's `deny_unknown_fields`). `validate()`
// checks the values a VMM must range-check; its messages name the field and the value.

// MARK: - Validation helpers

enum Check {
    static let maxIDLength = 64
    /// PATH_MAX less the terminating NUL.
    static let maxPathBytes = 4095
    /// The x86 kernel command line limit (COMMAND_LINE_SIZE) less the terminating NUL.
    static let maxBootArgsBytes = 2047

    /// Firecracker's resource ids: 1 to 64 characters from [A-Za-z0-9_].
    static func id(_ field: String, _ value: String) throws {
        let ok = !value.isEmpty && value.utf8.count <= maxIDLength && value.utf8.allSatisfy { b in
            (b >= 0x30 && b <= 0x39) || (b >= 0x41 && b <= 0x5a) || (b >= 0x61 && b <= 0x7a) || b == 0x5f
        }
        if !ok {
            throw APIError.badRequest("invalid \(field) \(jsonQuoted(value)): an id is 1 to \(maxIDLength) characters from A-Z, a-z, 0-9 and _")
        }
    }

    /// A host path: not empty, no NUL, at most PATH_MAX.
    static func path(_ field: String, _ value: String) throws {
        if value.isEmpty { throw APIError.badRequest("\(field) is empty (expected a path on the host)") }
        if value.utf8.count > maxPathBytes {
            throw APIError.badRequest("\(field) is \(value.utf8.count) bytes long (at most \(maxPathBytes))")
        }
        if value.utf8.contains(0) { throw APIError.badRequest("\(field) \(jsonQuoted(value)) contains a NUL character") }
    }

    static func range<T: BinaryInteger>(_ field: String, _ value: T, _ range: ClosedRange<T>, _ unit: String = "") throws {
        if !range.contains(value) {
            throw APIError.badRequest("\(field) = \(value) is out of range (\(range.lowerBound) to \(range.upperBound)\(unit))")
        }
    }

    static func nonNegative(_ field: String, _ value: Int64) throws {
        if value < 0 { throw APIError.badRequest("\(field) = \(value) is negative") }
    }

    /// A unicast Ethernet address written as six colon-separated hex pairs.
    static func mac(_ field: String, _ value: String) throws {
        let parts = value.split(separator: ":", omittingEmptySubsequences: false)
        let octets = parts.compactMap { $0.count == 2 ? UInt8($0, radix: 16) : nil }
        guard parts.count == 6, octets.count == 6 else {
            throw APIError.badRequest("invalid \(field) \(jsonQuoted(value)): expected six hex pairs such as 06:00:ac:10:00:02")
        }
        if octets[0] & 1 != 0 {
            throw APIError.badRequest("invalid \(field) \(jsonQuoted(value)): a multicast address cannot name an interface")
        }
        if octets.allSatisfy({ $0 == 0 }) {
            throw APIError.badRequest("invalid \(field) \(jsonQuoted(value)): the all-zero address is not valid")
        }
    }

    /// A Linux network interface name (dev_valid_name): 1-15 bytes, no '/', ':' or white space, not "." or "..".
    static func interfaceName(_ field: String, _ value: String) throws {
        let bytes = Array(value.utf8)
        let bad = bytes.isEmpty || bytes.count > 15 || value == "." || value == ".."
            || bytes.contains(where: { $0 == 0x2f || $0 == 0x3a || $0 <= 0x20 || $0 == 0x7f })
        if bad {
            throw APIError.badRequest("invalid \(field) \(jsonQuoted(value)): an interface name is 1 to 15 characters without '/', ':' or white space")
        }
    }

    static func noControlCharacters(_ field: String, _ value: String) throws {
        if let index = value.utf8.firstIndex(where: { $0 < 0x20 || $0 == 0x7f }) {
            let offset = value.utf8.distance(from: value.utf8.startIndex, to: index)
            throw APIError.badRequest("\(field) contains a control character at byte \(offset)")
        }
    }
}

// MARK: - Boot source

/// `PUT /boot-source`: the kernel (and initrd) and its command line. Pre-boot only.
public struct BootSource: Codable, Equatable, Sendable {
    public var kernelImagePath: String
    public var bootArgs: String?
    public var initrdPath: String?

    public init(kernelImagePath: String, bootArgs: String? = nil, initrdPath: String? = nil) {
        self.kernelImagePath = kernelImagePath
        self.bootArgs = bootArgs
        self.initrdPath = initrdPath
    }

    enum CodingKeys: String, CodingKey, CaseIterable {
        case kernelImagePath = "kernel_image_path", bootArgs = "boot_args", initrdPath = "initrd_path"
    }

    public init(from decoder: Decoder) throws {
        let c = try decoder.strictContainer(CodingKeys.self)
        kernelImagePath = try c.decode(String.self, forKey: .kernelImagePath)
        bootArgs = try c.decodeIfPresent(String.self, forKey: .bootArgs)
        initrdPath = try c.decodeIfPresent(String.self, forKey: .initrdPath)
    }

    public func validate() throws {
        try Check.path("kernel_image_path", kernelImagePath)
        if let initrdPath { try Check.path("initrd_path", initrdPath) }
        if let bootArgs {
            if bootArgs.utf8.count > Check.maxBootArgsBytes {
                throw APIError.badRequest("boot_args is \(bootArgs.utf8.count) bytes long (at most \(Check.maxBootArgsBytes))")
            }
            try Check.noControlCharacters("boot_args", bootArgs)
        }
    }
}

// MARK: - Machine configuration

/// Firecracker's (deprecated) static CPU templates.
public enum CpuTemplate: String, Codable, CaseIterable, Sendable {
    case c3 = "C3", t2 = "T2", t2s = "T2S", t2cl = "T2CL", t2a = "T2A", v1n1 = "V1N1", none = "None"
    public init(from decoder: Decoder) throws { self = try decoder.decodeEnum(CpuTemplate.self) }
}

/// What backs guest memory.
public enum HugePages: String, Codable, CaseIterable, Sendable {
    case none = "None", transparent = "Transparent", twoMiB = "2M"
    public init(from decoder: Decoder) throws { self = try decoder.decodeEnum(HugePages.self) }
}

/// `PUT|GET /machine-config`: vCPUs and memory. Absent optional fields take Firecracker's defaults
/// (smt false, track_dirty_pages false, cpu_template None, huge_pages None).
public struct MachineConfiguration: Codable, Equatable, Sendable {
    public static let vcpuRange = 1...32
    public static let minMemoryMiB = 8
    /// 1 TiB: anything above is refused as absurd before the VMM tries to allocate it.
    public static let maxMemoryMiB = 1 << 20

    public var vcpuCount: Int
    public var memSizeMib: Int
    public var smt: Bool?
    public var trackDirtyPages: Bool?
    public var cpuTemplate: CpuTemplate?
    public var hugePages: HugePages?
    /// Godwit's extension: host CPUs for the vCPU threads, vCPU i on the i-th (round robin); nil: unpinned.
    public var vcpuAffinity: [Int]?

    /// The most CPUs `vcpu_affinity` lists, and the CPU numbers it may name (the kernel's CPU_SETSIZE).
    public static let maxAffinityCPUs = 1024

    public init(vcpuCount: Int = 1, memSizeMib: Int = 128, smt: Bool? = nil, trackDirtyPages: Bool? = nil,
                cpuTemplate: CpuTemplate? = nil, hugePages: HugePages? = nil, vcpuAffinity: [Int]? = nil) {
        self.vcpuCount = vcpuCount
        self.memSizeMib = memSizeMib
        self.smt = smt
        self.trackDirtyPages = trackDirtyPages
        self.cpuTemplate = cpuTemplate
        self.hugePages = hugePages
        self.vcpuAffinity = vcpuAffinity
    }

    enum CodingKeys: String, CodingKey, CaseIterable {
        case vcpuCount = "vcpu_count", memSizeMib = "mem_size_mib", smt, trackDirtyPages = "track_dirty_pages"
        case cpuTemplate = "cpu_template", hugePages = "huge_pages", vcpuAffinity = "vcpu_affinity"
    }

    /// Checks a `vcpu_affinity` list on its own (whether the host has the CPUs is checked at start).
    static func checkAffinity(_ cpus: [Int]?) throws {
        guard let cpus else { return }
        guard !cpus.isEmpty, cpus.count <= maxAffinityCPUs else {
            throw APIError.badRequest("vcpu_affinity lists \(cpus.count) CPUs: give 1 to \(maxAffinityCPUs), or null for no pinning")
        }
        if let bad = cpus.first(where: { !(0..<maxAffinityCPUs).contains($0) }) {
            throw APIError.badRequest("vcpu_affinity: CPU \(bad) is not a CPU number (0 to \(maxAffinityCPUs - 1))")
        }
    }

    public init(from decoder: Decoder) throws {
        let c = try decoder.strictContainer(CodingKeys.self)
        vcpuCount = try c.decodeInteger(Int.self, forKey: .vcpuCount)
        memSizeMib = try c.decodeInteger(Int.self, forKey: .memSizeMib)
        smt = try c.decodeIfPresent(Bool.self, forKey: .smt)
        trackDirtyPages = try c.decodeIfPresent(Bool.self, forKey: .trackDirtyPages)
        cpuTemplate = try c.decodeIfPresent(CpuTemplate.self, forKey: .cpuTemplate)
        hugePages = try c.decodeIfPresent(HugePages.self, forKey: .hugePages)
        vcpuAffinity = try c.decodeIfPresent([Int].self, forKey: .vcpuAffinity)
    }

    public func validate() throws {
        try MachineConfiguration.checkAffinity(vcpuAffinity)
        try Check.range("vcpu_count", vcpuCount, MachineConfiguration.vcpuRange)
        if smt == true && vcpuCount > 1 && vcpuCount % 2 != 0 {
            throw APIError.badRequest("vcpu_count = \(vcpuCount): with smt enabled the vCPU count must be 1 or even")
        }
        try Check.range("mem_size_mib", memSizeMib, MachineConfiguration.minMemoryMiB...MachineConfiguration.maxMemoryMiB, " MiB")
        if hugePages == .twoMiB && memSizeMib % 2 != 0 {
            throw APIError.badRequest("mem_size_mib = \(memSizeMib): with huge_pages \"2M\" the memory size must be a multiple of 2 MiB")
        }
    }

    /// This configuration with `update`'s fields applied, validated as a whole (for `PATCH /machine-config`).
    public func applying(_ update: MachineConfigurationUpdate) throws -> MachineConfiguration {
        var result = self
        if let v = update.vcpuCount { result.vcpuCount = v }
        if let v = update.memSizeMib { result.memSizeMib = v }
        if let v = update.smt { result.smt = v }
        if let v = update.trackDirtyPages { result.trackDirtyPages = v }
        if let v = update.cpuTemplate { result.cpuTemplate = v }
        if let v = update.hugePages { result.hugePages = v }
        if let v = update.vcpuAffinity { result.vcpuAffinity = v }
        try result.validate()
        return result
    }
}

/// `PATCH /machine-config`: any subset of the machine configuration's fields.
public struct MachineConfigurationUpdate: Codable, Equatable, Sendable {
    public var vcpuCount: Int?
    public var memSizeMib: Int?
    public var smt: Bool?
    public var trackDirtyPages: Bool?
    public var cpuTemplate: CpuTemplate?
    public var hugePages: HugePages?
    public var vcpuAffinity: [Int]?

    public init(vcpuCount: Int? = nil, memSizeMib: Int? = nil, smt: Bool? = nil, trackDirtyPages: Bool? = nil,
                cpuTemplate: CpuTemplate? = nil, hugePages: HugePages? = nil, vcpuAffinity: [Int]? = nil) {
        self.vcpuCount = vcpuCount
        self.memSizeMib = memSizeMib
        self.smt = smt
        self.trackDirtyPages = trackDirtyPages
        self.cpuTemplate = cpuTemplate
        self.hugePages = hugePages
        self.vcpuAffinity = vcpuAffinity
    }

    typealias CodingKeys = MachineConfiguration.CodingKeys

    public init(from decoder: Decoder) throws {
        let c = try decoder.strictContainer(CodingKeys.self)
        vcpuCount = try c.decodeIntegerIfPresent(Int.self, forKey: .vcpuCount)
        memSizeMib = try c.decodeIntegerIfPresent(Int.self, forKey: .memSizeMib)
        smt = try c.decodeIfPresent(Bool.self, forKey: .smt)
        trackDirtyPages = try c.decodeIfPresent(Bool.self, forKey: .trackDirtyPages)
        cpuTemplate = try c.decodeIfPresent(CpuTemplate.self, forKey: .cpuTemplate)
        hugePages = try c.decodeIfPresent(HugePages.self, forKey: .hugePages)
        vcpuAffinity = try c.decodeIfPresent([Int].self, forKey: .vcpuAffinity)
    }

    /// Checks the fields present on their own; `MachineConfiguration.applying(_:)` checks the result.
    public func validate() throws {
        try MachineConfiguration.checkAffinity(vcpuAffinity)
        if let vcpuCount { try Check.range("vcpu_count", vcpuCount, MachineConfiguration.vcpuRange) }
        if let memSizeMib {
            try Check.range("mem_size_mib", memSizeMib, MachineConfiguration.minMemoryMiB...MachineConfiguration.maxMemoryMiB, " MiB")
        }
    }
}

// MARK: - Rate limiters

/// A token bucket: `size` tokens, refilled over `refill_time` ms, with an initial `one_time_burst`.
public struct TokenBucket: Codable, Equatable, Sendable {
    public var size: Int64
    public var oneTimeBurst: Int64?
    public var refillTime: Int64

    public init(size: Int64, oneTimeBurst: Int64? = nil, refillTime: Int64) {
        self.size = size
        self.oneTimeBurst = oneTimeBurst
        self.refillTime = refillTime
    }

    enum CodingKeys: String, CodingKey, CaseIterable {
        case size, oneTimeBurst = "one_time_burst", refillTime = "refill_time"
    }

    public init(from decoder: Decoder) throws {
        let c = try decoder.strictContainer(CodingKeys.self)
        size = try c.decodeInteger(Int64.self, forKey: .size)
        oneTimeBurst = try c.decodeIntegerIfPresent(Int64.self, forKey: .oneTimeBurst)
        refillTime = try c.decodeInteger(Int64.self, forKey: .refillTime)
    }

    public func validate(_ field: String) throws {
        try Check.nonNegative("\(field).size", size)
        try Check.nonNegative("\(field).refill_time", refillTime)
        if let oneTimeBurst { try Check.nonNegative("\(field).one_time_burst", oneTimeBurst) }
    }
}

/// Independent limits on bytes/s (`bandwidth`) and operations/s (`ops`).
public struct RateLimiter: Codable, Equatable, Sendable {
    public var bandwidth: TokenBucket?
    public var ops: TokenBucket?

    public init(bandwidth: TokenBucket? = nil, ops: TokenBucket? = nil) {
        self.bandwidth = bandwidth
        self.ops = ops
    }

    enum CodingKeys: String, CodingKey, CaseIterable { case bandwidth, ops }

    public init(from decoder: Decoder) throws {
        let c = try decoder.strictContainer(CodingKeys.self)
        bandwidth = try c.decodeIfPresent(TokenBucket.self, forKey: .bandwidth)
        ops = try c.decodeIfPresent(TokenBucket.self, forKey: .ops)
    }

    public func validate(_ field: String) throws {
        try bandwidth?.validate("\(field).bandwidth")
        try ops?.validate("\(field).ops")
    }
}

// MARK: - Drives

public enum CacheType: String, Codable, CaseIterable, Sendable {
    case unsafe = "Unsafe", writeback = "Writeback"
    public init(from decoder: Decoder) throws { self = try decoder.decodeEnum(CacheType.self) }
}

public enum IOEngine: String, Codable, CaseIterable, Sendable {
    case sync = "Sync", async = "Async"
    public init(from decoder: Decoder) throws { self = try decoder.decodeEnum(IOEngine.self) }
}

/// `PUT /drives/{drive_id}`: a block device backed by a host file (`path_on_host`, virtio-blk) or by a
/// vhost-user backend (`socket`). Pre-boot only.
public struct Drive: Codable, Equatable, Sendable {
    public var driveId: String
    public var partuuid: String?
    public var isRootDevice: Bool
    public var cacheType: CacheType?
    public var isReadOnly: Bool?
    public var pathOnHost: String?
    public var rateLimiter: RateLimiter?
    public var ioEngine: IOEngine?
    public var socket: String?

    public init(driveId: String, pathOnHost: String? = nil, isRootDevice: Bool = false, isReadOnly: Bool? = nil,
                partuuid: String? = nil, cacheType: CacheType? = nil, ioEngine: IOEngine? = nil,
                rateLimiter: RateLimiter? = nil, socket: String? = nil) {
        self.driveId = driveId
        self.partuuid = partuuid
        self.isRootDevice = isRootDevice
        self.cacheType = cacheType
        self.isReadOnly = isReadOnly
        self.pathOnHost = pathOnHost
        self.rateLimiter = rateLimiter
        self.ioEngine = ioEngine
        self.socket = socket
    }

    enum CodingKeys: String, CodingKey, CaseIterable {
        case driveId = "drive_id", partuuid, isRootDevice = "is_root_device", cacheType = "cache_type"
        case isReadOnly = "is_read_only", pathOnHost = "path_on_host", rateLimiter = "rate_limiter"
        case ioEngine = "io_engine", socket
    }

    public init(from decoder: Decoder) throws {
        let c = try decoder.strictContainer(CodingKeys.self)
        driveId = try c.decode(String.self, forKey: .driveId)
        partuuid = try c.decodeIfPresent(String.self, forKey: .partuuid)
        isRootDevice = try c.decode(Bool.self, forKey: .isRootDevice)
        cacheType = try c.decodeIfPresent(CacheType.self, forKey: .cacheType)
        isReadOnly = try c.decodeIfPresent(Bool.self, forKey: .isReadOnly)
        pathOnHost = try c.decodeIfPresent(String.self, forKey: .pathOnHost)
        rateLimiter = try c.decodeIfPresent(RateLimiter.self, forKey: .rateLimiter)
        ioEngine = try c.decodeIfPresent(IOEngine.self, forKey: .ioEngine)
        socket = try c.decodeIfPresent(String.self, forKey: .socket)
    }

    /// True for a vhost-user drive (`socket` set).
    public var isVhostUser: Bool { socket != nil }

    public func validate() throws {
        try Check.id("drive_id", driveId)
        switch (pathOnHost, socket) {
        case (nil, nil):
            throw APIError.badRequest("drive `\(driveId)`: one of path_on_host (virtio-blk) and socket (vhost-user) is required")
        case (.some, .some):
            throw APIError.badRequest("drive `\(driveId)`: path_on_host and socket are mutually exclusive")
        case let (.some(path), nil):
            try Check.path("path_on_host", path)
        case let (nil, .some(path)):
            try Check.path("socket", path)
            for (name, present) in [("is_read_only", isReadOnly != nil), ("io_engine", ioEngine != nil), ("rate_limiter", rateLimiter != nil)] where present {
                throw APIError.badRequest("drive `\(driveId)`: \(name) does not apply to a vhost-user drive (socket); omit it")
            }
        }
        if let partuuid {
            if partuuid.isEmpty || partuuid.utf8.count > 64 {
                throw APIError.badRequest("partuuid \(jsonQuoted(partuuid)) must be 1 to 64 characters")
            }
            try Check.noControlCharacters("partuuid", partuuid)
        }
        try rateLimiter?.validate("rate_limiter")
    }
}

/// `PATCH /drives/{drive_id}`: a new backing file and/or rate limiter for a drive. Post-boot only.
public struct PartialDrive: Codable, Equatable, Sendable {
    public var driveId: String
    public var pathOnHost: String?
    public var rateLimiter: RateLimiter?

    public init(driveId: String, pathOnHost: String? = nil, rateLimiter: RateLimiter? = nil) {
        self.driveId = driveId
        self.pathOnHost = pathOnHost
        self.rateLimiter = rateLimiter
    }

    enum CodingKeys: String, CodingKey, CaseIterable {
        case driveId = "drive_id", pathOnHost = "path_on_host", rateLimiter = "rate_limiter"
    }

    public init(from decoder: Decoder) throws {
        let c = try decoder.strictContainer(CodingKeys.self)
        driveId = try c.decode(String.self, forKey: .driveId)
        pathOnHost = try c.decodeIfPresent(String.self, forKey: .pathOnHost)
        rateLimiter = try c.decodeIfPresent(RateLimiter.self, forKey: .rateLimiter)
    }

    public func validate() throws {
        try Check.id("drive_id", driveId)
        if let pathOnHost { try Check.path("path_on_host", pathOnHost) }
        try rateLimiter?.validate("rate_limiter")
    }
}

// MARK: - Network interfaces

/// `PUT /network-interfaces/{iface_id}`: a virtio-net device on a host TAP. Pre-boot only.
public struct NetworkInterface: Codable, Equatable, Sendable {
    public static let mtuRange = 68...65535

    public var ifaceId: String
    /// The host TAP (virtio-net in the VMM); nil for a vhost-user NIC (`socket`).
    public var hostDevName: String?
    public var guestMac: String?
    public var mtu: Int?
    public var rxRateLimiter: RateLimiter?
    public var txRateLimiter: RateLimiter?
    /// Godwit's extension, as `socket` in drives: the vhost-user socket of an I/O domain serving the NIC.
    public var socket: String?

    public init(ifaceId: String, hostDevName: String?, guestMac: String? = nil, mtu: Int? = nil,
                rxRateLimiter: RateLimiter? = nil, txRateLimiter: RateLimiter? = nil, socket: String? = nil) {
        self.ifaceId = ifaceId
        self.hostDevName = hostDevName
        self.guestMac = guestMac
        self.mtu = mtu
        self.rxRateLimiter = rxRateLimiter
        self.txRateLimiter = txRateLimiter
        self.socket = socket
    }

    enum CodingKeys: String, CodingKey, CaseIterable {
        case ifaceId = "iface_id", hostDevName = "host_dev_name", guestMac = "guest_mac", mtu
        case rxRateLimiter = "rx_rate_limiter", txRateLimiter = "tx_rate_limiter", socket
    }

    public init(from decoder: Decoder) throws {
        let c = try decoder.strictContainer(CodingKeys.self)
        ifaceId = try c.decode(String.self, forKey: .ifaceId)
        hostDevName = try c.decodeIfPresent(String.self, forKey: .hostDevName)
        guestMac = try c.decodeIfPresent(String.self, forKey: .guestMac)
        mtu = try c.decodeIntegerIfPresent(Int.self, forKey: .mtu)
        rxRateLimiter = try c.decodeIfPresent(RateLimiter.self, forKey: .rxRateLimiter)
        txRateLimiter = try c.decodeIfPresent(RateLimiter.self, forKey: .txRateLimiter)
        socket = try c.decodeIfPresent(String.self, forKey: .socket)
    }

    public func validate() throws {
        try Check.id("iface_id", ifaceId)
        switch (hostDevName, socket) {
        case (nil, nil):
            throw APIError.badRequest("interface `\(ifaceId)`: one of host_dev_name (a TAP) and socket (vhost-user) is required")
        case (.some, .some):
            throw APIError.badRequest("interface `\(ifaceId)`: host_dev_name and socket are mutually exclusive")
        case let (.some(name), nil):
            try Check.interfaceName("host_dev_name", name)
        case let (nil, .some(path)):
            try Check.path("socket", path)
            if guestMac != nil { throw APIError.badRequest("interface `\(ifaceId)`: guest_mac does not apply to a vhost-user NIC (the I/O domain sets it); omit it") }
        }
        if let guestMac { try Check.mac("guest_mac", guestMac) }
        if let mtu { try Check.range("mtu", mtu, NetworkInterface.mtuRange) }
        try rxRateLimiter?.validate("rx_rate_limiter")
        try txRateLimiter?.validate("tx_rate_limiter")
    }
}

/// `PATCH /network-interfaces/{iface_id}`: new rate limiters for an interface. Post-boot only.
public struct PartialNetworkInterface: Codable, Equatable, Sendable {
    public var ifaceId: String
    public var rxRateLimiter: RateLimiter?
    public var txRateLimiter: RateLimiter?

    public init(ifaceId: String, rxRateLimiter: RateLimiter? = nil, txRateLimiter: RateLimiter? = nil) {
        self.ifaceId = ifaceId
        self.rxRateLimiter = rxRateLimiter
        self.txRateLimiter = txRateLimiter
    }

    enum CodingKeys: String, CodingKey, CaseIterable {
        case ifaceId = "iface_id", rxRateLimiter = "rx_rate_limiter", txRateLimiter = "tx_rate_limiter"
    }

    public init(from decoder: Decoder) throws {
        let c = try decoder.strictContainer(CodingKeys.self)
        ifaceId = try c.decode(String.self, forKey: .ifaceId)
        rxRateLimiter = try c.decodeIfPresent(RateLimiter.self, forKey: .rxRateLimiter)
        txRateLimiter = try c.decodeIfPresent(RateLimiter.self, forKey: .txRateLimiter)
    }

    public func validate() throws {
        try Check.id("iface_id", ifaceId)
        try rxRateLimiter?.validate("rx_rate_limiter")
        try txRateLimiter?.validate("tx_rate_limiter")
    }
}

// MARK: - Logger and metrics

/// Log levels; case-insensitive on input, as Firecracker's.
public enum LogLevel: String, Codable, CaseIterable, Sendable {
    case error = "Error", warning = "Warning", info = "Info", debug = "Debug", trace = "Trace", off = "Off"
    public init(from decoder: Decoder) throws { self = try decoder.decodeEnum(LogLevel.self, caseInsensitive: true) }
}

/// `PUT /logger`: where the VMM's human-readable log goes and how much of it.
public struct Logger: Codable, Equatable, Sendable {
    public var level: LogLevel?
    public var logPath: String?
    public var showLevel: Bool?
    public var showLogOrigin: Bool?
    public var module: String?

    public init(level: LogLevel? = nil, logPath: String? = nil, showLevel: Bool? = nil, showLogOrigin: Bool? = nil, module: String? = nil) {
        self.level = level
        self.logPath = logPath
        self.showLevel = showLevel
        self.showLogOrigin = showLogOrigin
        self.module = module
    }

    enum CodingKeys: String, CodingKey, CaseIterable {
        case level, logPath = "log_path", showLevel = "show_level", showLogOrigin = "show_log_origin", module
    }

    public init(from decoder: Decoder) throws {
        let c = try decoder.strictContainer(CodingKeys.self)
        level = try c.decodeIfPresent(LogLevel.self, forKey: .level)
        logPath = try c.decodeIfPresent(String.self, forKey: .logPath)
        showLevel = try c.decodeIfPresent(Bool.self, forKey: .showLevel)
        showLogOrigin = try c.decodeIfPresent(Bool.self, forKey: .showLogOrigin)
        module = try c.decodeIfPresent(String.self, forKey: .module)
    }

    public func validate() throws {
        if let logPath { try Check.path("log_path", logPath) }
        if let module {
            if module.utf8.count > 256 { throw APIError.badRequest("module is \(module.utf8.count) bytes long (at most 256)") }
            try Check.noControlCharacters("module", module)
        }
    }
}

/// `PUT /metrics`: the file or named pipe Firecracker-style JSON metrics are flushed to.
public struct Metrics: Codable, Equatable, Sendable {
    public var metricsPath: String

    public init(metricsPath: String) { self.metricsPath = metricsPath }

    enum CodingKeys: String, CodingKey, CaseIterable { case metricsPath = "metrics_path" }

    public init(from decoder: Decoder) throws {
        let c = try decoder.strictContainer(CodingKeys.self)
        metricsPath = try c.decode(String.self, forKey: .metricsPath)
    }

    public func validate() throws { try Check.path("metrics_path", metricsPath) }
}

// MARK: - Actions and VM state

/// `PUT /actions`.
public struct InstanceActionInfo: Codable, Equatable, Sendable {
    public enum ActionType: String, Codable, CaseIterable, Sendable {
        case flushMetrics = "FlushMetrics", instanceStart = "InstanceStart", sendCtrlAltDel = "SendCtrlAltDel"
        public init(from decoder: Decoder) throws { self = try decoder.decodeEnum(ActionType.self) }
    }

    public var actionType: ActionType

    public init(actionType: ActionType) { self.actionType = actionType }

    enum CodingKeys: String, CodingKey, CaseIterable { case actionType = "action_type" }

    public init(from decoder: Decoder) throws {
        let c = try decoder.strictContainer(CodingKeys.self)
        actionType = try c.decode(ActionType.self, forKey: .actionType)
    }
}

/// `PATCH /vm`: pause or resume the guest.
public struct VM: Codable, Equatable, Sendable {
    public enum State: String, Codable, CaseIterable, Sendable {
        case paused = "Paused", resumed = "Resumed"
        public init(from decoder: Decoder) throws { self = try decoder.decodeEnum(State.self) }
    }

    public var state: State

    public init(state: State) { self.state = state }

    enum CodingKeys: String, CodingKey, CaseIterable { case state }

    public init(from decoder: Decoder) throws {
        let c = try decoder.strictContainer(CodingKeys.self)
        state = try c.decode(State.self, forKey: .state)
    }
}

// MARK: - Information

/// The instance's state as `GET /` reports it: Firecracker's three values, and Godwit's finer ones
/// (documented as extensions) for the states Firecracker does not have.
public struct InstanceState: RawRepresentable, Codable, Hashable, Sendable, CustomStringConvertible {
    public var rawValue: String
    public init(rawValue: String) { self.rawValue = rawValue }

    public static let notStarted = InstanceState(rawValue: "Not started")
    public static let running = InstanceState(rawValue: "Running")
    public static let paused = InstanceState(rawValue: "Paused")
    /// Godwit extensions.
    public static let booting = InstanceState(rawValue: "Booting")
    public static let shuttingDown = InstanceState(rawValue: "Shutting down")
    public static let stopped = InstanceState(rawValue: "Stopped")

    public init(from decoder: Decoder) throws { rawValue = try decoder.singleValueContainer().decode(String.self) }
    public func encode(to encoder: Encoder) throws {
        var c = encoder.singleValueContainer()
        try c.encode(rawValue)
    }
    public var description: String { rawValue }
}

/// `GET /`.
public struct InstanceInfo: Codable, Equatable, Sendable {
    public var appName: String
    public var id: String
    public var state: InstanceState
    public var vmmVersion: String

    public init(appName: String = "Godwit", id: String, state: InstanceState, vmmVersion: String) {
        self.appName = appName
        self.id = id
        self.state = state
        self.vmmVersion = vmmVersion
    }

    enum CodingKeys: String, CodingKey, CaseIterable {
        case appName = "app_name", id, state, vmmVersion = "vmm_version"
    }

    public init(from decoder: Decoder) throws {
        let c = try decoder.strictContainer(CodingKeys.self)
        appName = try c.decode(String.self, forKey: .appName)
        id = try c.decode(String.self, forKey: .id)
        state = try c.decode(InstanceState.self, forKey: .state)
        vmmVersion = try c.decode(String.self, forKey: .vmmVersion)
    }
}

/// `GET /version`. The field keeps Firecracker's name so that its clients read it.
public struct FirecrackerVersion: Codable, Equatable, Sendable {
    public var firecrackerVersion: String

    public init(firecrackerVersion: String) { self.firecrackerVersion = firecrackerVersion }

    enum CodingKeys: String, CodingKey, CaseIterable { case firecrackerVersion = "firecracker_version" }

    public init(from decoder: Decoder) throws {
        let c = try decoder.strictContainer(CodingKeys.self)
        firecrackerVersion = try c.decode(String.self, forKey: .firecrackerVersion)
    }
}

// MARK: - Full configuration (GET /vm/config, --config-file)

/// The whole VM configuration, with the dashed keys of `GET /vm/config` and of Firecracker's
/// `--config-file`. Sections of Firecracker's schema that Godwit does not implement (balloon, vsock, ...)
/// are accepted by the decoder and refused, by name, when the configuration is applied.
public struct FullVmConfiguration: Codable, Equatable, Sendable {
    public var bootSource: BootSource?
    public var machineConfig: MachineConfiguration?
    public var drives: [Drive]?
    public var networkInterfaces: [NetworkInterface]?
    public var logger: Logger?
    public var metrics: Metrics?
    // Firecracker sections Godwit does not implement yet.
    public var balloon: JSONValue?
    public var cpuConfig: JSONValue?
    public var memoryHotplug: JSONValue?
    public var mmdsConfig: JSONValue?
    public var pmem: JSONValue?
    public var vsock: JSONValue?
    public var entropy: JSONValue?

    public init(bootSource: BootSource? = nil, machineConfig: MachineConfiguration? = nil, drives: [Drive]? = nil,
                networkInterfaces: [NetworkInterface]? = nil, logger: Logger? = nil, metrics: Metrics? = nil) {
        self.bootSource = bootSource
        self.machineConfig = machineConfig
        self.drives = drives
        self.networkInterfaces = networkInterfaces
        self.logger = logger
        self.metrics = metrics
    }

    enum CodingKeys: String, CodingKey, CaseIterable {
        case bootSource = "boot-source", machineConfig = "machine-config", drives
        case networkInterfaces = "network-interfaces", logger, metrics
        case balloon, cpuConfig = "cpu-config", memoryHotplug = "memory-hotplug", mmdsConfig = "mmds-config"
        case pmem, vsock, entropy
    }

    public init(from decoder: Decoder) throws {
        let c = try decoder.strictContainer(CodingKeys.self)
        bootSource = try c.decodeIfPresent(BootSource.self, forKey: .bootSource)
        machineConfig = try c.decodeIfPresent(MachineConfiguration.self, forKey: .machineConfig)
        drives = try c.decodeIfPresent([Drive].self, forKey: .drives)
        networkInterfaces = try c.decodeIfPresent([NetworkInterface].self, forKey: .networkInterfaces)
        logger = try c.decodeIfPresent(Logger.self, forKey: .logger)
        metrics = try c.decodeIfPresent(Metrics.self, forKey: .metrics)
        balloon = try c.decodeIfPresent(JSONValue.self, forKey: .balloon)
        cpuConfig = try c.decodeIfPresent(JSONValue.self, forKey: .cpuConfig)
        memoryHotplug = try c.decodeIfPresent(JSONValue.self, forKey: .memoryHotplug)
        mmdsConfig = try c.decodeIfPresent(JSONValue.self, forKey: .mmdsConfig)
        pmem = try c.decodeIfPresent(JSONValue.self, forKey: .pmem)
        vsock = try c.decodeIfPresent(JSONValue.self, forKey: .vsock)
        entropy = try c.decodeIfPresent(JSONValue.self, forKey: .entropy)
    }

    /// The sections present that Godwit does not implement, by their JSON key.
    public var unsupportedSections: [String] {
        let sections: [(CodingKeys, JSONValue?)] = [(.balloon, balloon), (.cpuConfig, cpuConfig), (.memoryHotplug, memoryHotplug),
                                                    (.mmdsConfig, mmdsConfig), (.pmem, pmem), (.vsock, vsock), (.entropy, entropy)]
        return sections.compactMap { key, value in
            guard let value, value != .null else { return nil }
            if case let .array(items) = value, items.isEmpty { return nil }
            return key.rawValue
        }
    }

    /// Every section checked on its own, then across sections (duplicate ids, more than one root drive).
    public func validate() throws {
        if let unsupported = unsupportedSections.first {
            throw APIError.badRequest("`\(unsupported)`: this section is not supported by Godwit yet")
        }
        func within(_ prefix: String, _ body: () throws -> Void) throws {
            do { try body() } catch { throw APIError.from(error).prefixed(prefix) }
        }
        if let bootSource { try within("boot-source") { try bootSource.validate() } }
        if let machineConfig { try within("machine-config") { try machineConfig.validate() } }
        var driveIDs = Set<String>()
        var roots: [String] = []
        for (i, drive) in (drives ?? []).enumerated() {
            try within("drives[\(i)]") { try drive.validate() }
            if !driveIDs.insert(drive.driveId).inserted {
                throw APIError.badRequest("drives[\(i)]: duplicate drive_id `\(drive.driveId)`")
            }
            if drive.isRootDevice { roots.append(drive.driveId) }
        }
        if roots.count > 1 {
            throw APIError.badRequest("drives: more than one root device (\(roots.map { "`\($0)`" }.joined(separator: ", ")))")
        }
        var ifaceIDs = Set<String>()
        for (i, iface) in (networkInterfaces ?? []).enumerated() {
            try within("network-interfaces[\(i)]") { try iface.validate() }
            if !ifaceIDs.insert(iface.ifaceId).inserted {
                throw APIError.badRequest("network-interfaces[\(i)]: duplicate iface_id `\(iface.ifaceId)`")
            }
        }
        if let logger { try within("logger") { try logger.validate() } }
        if let metrics { try within("metrics") { try metrics.validate() } }
    }
}

// MARK: - Snapshots (Firecracker's fields)

/// `PUT /snapshot/create`: saves a paused VM's state and memory to two files.
public struct SnapshotCreateParams: Codable, Equatable, Sendable {
    public enum SnapshotType: String, Codable, CaseIterable, Sendable {
        case full = "Full", diff = "Diff"
        public init(from decoder: Decoder) throws { self = try decoder.decodeEnum(SnapshotType.self) }
    }

    public var snapshotType: SnapshotType?
    public var snapshotPath: String
    public var memFilePath: String

    public init(snapshotPath: String, memFilePath: String, snapshotType: SnapshotType? = nil) {
        self.snapshotPath = snapshotPath
        self.memFilePath = memFilePath
        self.snapshotType = snapshotType
    }

    enum CodingKeys: String, CodingKey, CaseIterable {
        case snapshotType = "snapshot_type", snapshotPath = "snapshot_path", memFilePath = "mem_file_path"
    }

    public init(from decoder: Decoder) throws {
        let c = try decoder.strictContainer(CodingKeys.self)
        snapshotType = try c.decodeIfPresent(SnapshotType.self, forKey: .snapshotType)
        snapshotPath = try c.decode(String.self, forKey: .snapshotPath)
        memFilePath = try c.decode(String.self, forKey: .memFilePath)
    }

    public func validate() throws {
        try Check.path("snapshot_path", snapshotPath)
        try Check.path("mem_file_path", memFilePath)
        if snapshotType == .diff { throw APIError.badRequest("snapshot_type Diff is not supported; use Full") }
    }
}

/// `PUT /snapshot/load`: builds the VM of a snapshot in a fresh VMM.
public struct SnapshotLoadParams: Codable, Equatable, Sendable {
    /// Where guest memory comes from (`File` only).
    public struct MemoryBackend: Codable, Equatable, Sendable {
        public var backendType: String
        public var backendPath: String

        public init(backendType: String = "File", backendPath: String) {
            self.backendType = backendType
            self.backendPath = backendPath
        }

        enum CodingKeys: String, CodingKey, CaseIterable { case backendType = "backend_type", backendPath = "backend_path" }

        public init(from decoder: Decoder) throws {
            let c = try decoder.strictContainer(CodingKeys.self)
            backendType = try c.decode(String.self, forKey: .backendType)
            backendPath = try c.decode(String.self, forKey: .backendPath)
        }
    }

    public var snapshotPath: String
    public var memFilePath: String?
    public var memBackend: MemoryBackend?
    public var enableDiffSnapshots: Bool?
    public var resumeVm: Bool?

    public init(snapshotPath: String, memFilePath: String? = nil, memBackend: MemoryBackend? = nil, resumeVm: Bool? = nil) {
        self.snapshotPath = snapshotPath
        self.memFilePath = memFilePath
        self.memBackend = memBackend
        self.resumeVm = resumeVm
    }

    enum CodingKeys: String, CodingKey, CaseIterable {
        case snapshotPath = "snapshot_path", memFilePath = "mem_file_path", memBackend = "mem_backend"
        case enableDiffSnapshots = "enable_diff_snapshots", resumeVm = "resume_vm"
    }

    public init(from decoder: Decoder) throws {
        let c = try decoder.strictContainer(CodingKeys.self)
        snapshotPath = try c.decode(String.self, forKey: .snapshotPath)
        memFilePath = try c.decodeIfPresent(String.self, forKey: .memFilePath)
        memBackend = try c.decodeIfPresent(MemoryBackend.self, forKey: .memBackend)
        enableDiffSnapshots = try c.decodeIfPresent(Bool.self, forKey: .enableDiffSnapshots)
        resumeVm = try c.decodeIfPresent(Bool.self, forKey: .resumeVm)
    }

    /// The memory file, from either field.
    public var memoryPath: String? { memBackend?.backendPath ?? memFilePath }

    public func validate() throws {
        try Check.path("snapshot_path", snapshotPath)
        switch (memFilePath, memBackend) {
        case (nil, nil): throw APIError.badRequest("one of mem_file_path and mem_backend is required")
        case (.some, .some): throw APIError.badRequest("mem_file_path and mem_backend are mutually exclusive")
        case let (.some(path), nil): try Check.path("mem_file_path", path)
        case let (nil, .some(backend)):
            guard backend.backendType == "File" else {
                throw APIError.badRequest("mem_backend.backend_type \(jsonQuoted(backend.backendType)) is not supported; use File")
            }
            try Check.path("mem_backend.backend_path", backend.backendPath)
        }
        if enableDiffSnapshots == true { throw APIError.badRequest("enable_diff_snapshots is not supported") }
    }
}

// MARK: - Live migration (Godwit; parameter names as Cloud Hypervisor's)

/// `PUT /migration/receive`: this VMM (configured, not started) waits for a migration.
public struct MigrationReceiveParams: Codable, Equatable, Sendable {
    /// `tcp:ADDRESS:PORT` to listen on.
    public var receiverUrl: String
    /// The shared key (hex, 16 to 64 bytes) or a file holding it; without either, the VMM's `--migration-key-file`.
    public var key: String?
    /// Whether the guest runs as soon as the migration commits (default true). With false it waits
    /// paused for `PATCH /vm` Resumed: the host agent first takes the VM's ownership in etcd, which
    /// makes that transaction the migration's commit point.
    public var resumeVm: Bool?

    public init(receiverUrl: String, key: String? = nil, resumeVm: Bool? = nil) {
        self.receiverUrl = receiverUrl
        self.key = key
        self.resumeVm = resumeVm
    }

    enum CodingKeys: String, CodingKey, CaseIterable { case receiverUrl = "receiver_url", key, resumeVm = "resume_vm" }

    public init(from decoder: Decoder) throws {
        let c = try decoder.strictContainer(CodingKeys.self)
        receiverUrl = try c.decode(String.self, forKey: .receiverUrl)
        key = try c.decodeIfPresent(String.self, forKey: .key)
        resumeVm = try c.decodeIfPresent(Bool.self, forKey: .resumeVm)
    }

    public func validate() throws { _ = try MigrationURL(receiverUrl, field: "receiver_url") }
}

/// `PUT /fence` (Godwit): a deadline the host agent keeps moving forward; when it lapses the VMM
/// pauses its guest by itself, so that a hung or cut-off agent cannot leave a guest running that
/// another host may take over.
public struct FenceParams: Codable, Equatable, Sendable {
    public static let deadlineRange = 0...3_600_000

    /// Milliseconds from now (monotonic clock) until the guest is paused unless another `PUT /fence`
    /// arrives first; 0 turns fencing off.
    public var deadlineMs: Int

    public init(deadlineMs: Int) { self.deadlineMs = deadlineMs }

    enum CodingKeys: String, CodingKey, CaseIterable { case deadlineMs = "deadline_ms" }

    public init(from decoder: Decoder) throws {
        let c = try decoder.strictContainer(CodingKeys.self)
        deadlineMs = try c.decode(Int.self, forKey: .deadlineMs)
    }

    public func validate() throws {
        guard FenceParams.deadlineRange.contains(deadlineMs) else {
            throw APIError.badRequest("deadline_ms must be 0 (off) to \(FenceParams.deadlineRange.upperBound), not \(deadlineMs)")
        }
    }
}

/// `PUT /serial/input` (Godwit): text for the guest's serial console (COM1), as if typed on it; the
/// way to drive a guest's shell from a script when the VMM's own standard input is not a terminal.
public struct SerialInput: Codable, Equatable, Sendable {
    /// At most the UART's receive buffer: a longer text is refused rather than cut.
    public static let maxBytes = 4096

    public var data: String

    public init(data: String) { self.data = data }

    enum CodingKeys: String, CodingKey, CaseIterable { case data }

    public init(from decoder: Decoder) throws {
        let c = try decoder.strictContainer(CodingKeys.self)
        data = try c.decode(String.self, forKey: .data)
    }

    public func validate() throws {
        guard !data.isEmpty, data.utf8.count <= SerialInput.maxBytes else {
            throw APIError.badRequest("data must be 1 to \(SerialInput.maxBytes) bytes, not \(data.utf8.count)")
        }
    }
}

/// `PUT /migration/send`: migrates the running VM to a VMM waiting in `/migration/receive`.
public struct MigrationSendParams: Codable, Equatable, Sendable {
    public static let downtimeRange = 1...60_000
    public static let timeoutRange = 1...86_400

    /// `tcp:HOST:PORT` of the target.
    public var destinationUrl: String
    /// The longest the guest may be stopped, in milliseconds (default 300).
    public var downtimeMs: Int?
    /// Give up (and keep running here) after this many seconds (default 300).
    public var timeoutS: Int?
    /// The stream's bandwidth cap in megabits per second (default: none).
    public var maxBandwidthMbps: Int?
    public var key: String?

    public init(destinationUrl: String, downtimeMs: Int? = nil, timeoutS: Int? = nil, maxBandwidthMbps: Int? = nil, key: String? = nil) {
        self.destinationUrl = destinationUrl
        self.downtimeMs = downtimeMs
        self.timeoutS = timeoutS
        self.maxBandwidthMbps = maxBandwidthMbps
        self.key = key
    }

    enum CodingKeys: String, CodingKey, CaseIterable {
        case destinationUrl = "destination_url", downtimeMs = "downtime_ms", timeoutS = "timeout_s"
        case maxBandwidthMbps = "max_bandwidth_mbps", key
    }

    public init(from decoder: Decoder) throws {
        let c = try decoder.strictContainer(CodingKeys.self)
        destinationUrl = try c.decode(String.self, forKey: .destinationUrl)
        downtimeMs = try c.decodeIntegerIfPresent(Int.self, forKey: .downtimeMs)
        timeoutS = try c.decodeIntegerIfPresent(Int.self, forKey: .timeoutS)
        maxBandwidthMbps = try c.decodeIntegerIfPresent(Int.self, forKey: .maxBandwidthMbps)
        key = try c.decodeIfPresent(String.self, forKey: .key)
    }

    public func validate() throws {
        _ = try MigrationURL(destinationUrl, field: "destination_url")
        if let downtimeMs { try Check.range("downtime_ms", downtimeMs, MigrationSendParams.downtimeRange) }
        if let timeoutS { try Check.range("timeout_s", timeoutS, MigrationSendParams.timeoutRange) }
        if let maxBandwidthMbps { try Check.range("max_bandwidth_mbps", maxBandwidthMbps, 1...1_000_000) }
    }
}

/// A migration endpoint, `tcp:HOST:PORT`.
public struct MigrationURL: Equatable, Sendable, CustomStringConvertible {
    public var host: String
    public var port: UInt16

    public init(_ text: String, field: String = "url") throws {
        let parts = text.split(separator: ":", omittingEmptySubsequences: false).map(String.init)
        guard parts.count == 3, parts[0] == "tcp", !parts[1].isEmpty, parts[1].utf8.count <= 253,
              parts[1].allSatisfy({ $0.isLetter || $0.isNumber || $0 == "." || $0 == "-" }),
              let port = UInt16(parts[2]), port > 0 else {
            throw APIError.badRequest("\(field) \(jsonQuoted(text)) is not tcp:HOST:PORT (an IPv4 address or host name, and a port 1-65535)")
        }
        host = parts[1]
        self.port = port
    }

    public var description: String { "tcp:\(host):\(port)" }
}

/// `GET /migration`: where a migration stands.
public struct MigrationStatus: Codable, Equatable, Sendable {
    /// none, listening, receiving, sending, completed, cancelled, failed
    public var state: String
    public var pass: Int
    public var dirtyPages: Int
    public var bytesSent: UInt64
    public var rateMbps: Double
    public var expectedDowntimeMs: Double
    public var downtimeMs: Double?
    public var totalMs: Double?
    public var error: String?

    public init(state: String, pass: Int = 0, dirtyPages: Int = 0, bytesSent: UInt64 = 0, rateMbps: Double = 0,
                expectedDowntimeMs: Double = 0, downtimeMs: Double? = nil, totalMs: Double? = nil, error: String? = nil) {
        self.state = state
        self.pass = pass
        self.dirtyPages = dirtyPages
        self.bytesSent = bytesSent
        self.rateMbps = rateMbps
        self.expectedDowntimeMs = expectedDowntimeMs
        self.downtimeMs = downtimeMs
        self.totalMs = totalMs
        self.error = error
    }

    enum CodingKeys: String, CodingKey, CaseIterable {
        case state, pass, dirtyPages = "dirty_pages", bytesSent = "bytes_sent", rateMbps = "rate_mbps"
        case expectedDowntimeMs = "expected_downtime_ms", downtimeMs = "downtime_ms", totalMs = "total_ms", error
    }
}

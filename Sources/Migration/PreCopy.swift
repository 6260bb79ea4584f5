import Foundation
#if canImport(Glibc)
import Glibc
#endif
import GodwitSystem

/// The VM being migrated away, as the pre-copy engine needs it (the VMM implements it over its
/// machine; this module knows no KVM).
public protocol MigrationSourceVM: AnyObject {
    /// Guest pages by guest-physical page number: [0, pageCount).
    var pageCount: Int { get }
    /// The bytes of RAM page `number`; nil for a hole (not RAM).
    func page(_ number: UInt64) -> UnsafeRawBufferPointer?
    /// Page ranges that may hold data; pages outside them read as zeros without being touched (nil:
    /// unknown, every page is read).
    func dataPageRanges() -> [Range<UInt64>]?
    /// JSON the target checks before any memory moves (vCPUs, memory layout, devices, CPUID).
    func configuration() throws -> [UInt8]
    /// Starts or stops logging the pages written (by the guest, the VMM's devices, I/O domains).
    func setDirtyLogging(_ on: Bool) throws
    /// Pages written since the last call, one bit per page number.
    func takeDirtyBitmap() throws -> [UInt64]
    /// Stops the guest and its devices for the final copy.
    func stopForFinalCopy() throws
    /// Undoes `stopForFinalCopy`: the migration was cancelled before its commit point.
    func resumeAfterCancel() throws
    /// JSON of every vCPU's, the irqchip's, the clock's and each device's state (after the stop).
    func captureState() throws -> [UInt8]
}

/// The VM a migration fills in on the target (built, not running).
public protocol MigrationTargetVM: AnyObject {
    var pageCount: Int { get }
    /// Throws, with the reason, when the source's configuration cannot run here.
    func checkConfiguration(_ json: [UInt8]) throws
    /// The bytes of RAM page `number`, to fill; nil for a hole.
    func writablePage(_ number: UInt64) -> UnsafeMutableRawBufferPointer?
    /// Restores the saved state; throws when any part of it is invalid.
    func restoreState(_ json: [UInt8]) throws
}

/// How a migration should go.
public struct MigrationParameters: Sendable {
    /// The longest the guest may be stopped, in seconds.
    public var downtime: Double
    /// Give up (and keep running on the source) after this many seconds.
    public var timeout: Double
    /// The stream's cap, in bytes per second.
    public var maxBytesPerSecond: UInt64?
    /// How long to wait for the target's *ready* after the state was sent (the guest is stopped all
    /// that time; the target restores in milliseconds, so a longer wait only means a lost link or a
    /// hung target, and the guest is better off running again here).
    public var readyTimeout: Double

    public init(downtime: Double = 0.3, timeout: Double = 300, maxBytesPerSecond: UInt64? = nil, readyTimeout: Double = 10) {
        self.downtime = downtime
        self.timeout = timeout
        self.maxBytesPerSecond = maxBytesPerSecond
        self.readyTimeout = readyTimeout
    }
}

/// Where a migration stands (for `GET /migration`, events and `godwit ctl migrate`'s progress bar).
public struct MigrationProgress: Codable, Equatable, Sendable {
    /// "config", "precopy", "stop-and-copy", "committing", "completed"
    public var phase: String
    public var pass: Int
    /// Pages dirty at the start of this pass.
    public var dirtyPages: Int
    public var bytesSent: UInt64
    /// The measured rate, bytes per second.
    public var rate: Double
    /// The downtime the remaining dirty pages would cost at this rate, in seconds.
    public var expectedDowntime: Double
    public var elapsed: Double
}

/// What a completed migration took.
public struct MigrationOutcome: Codable, Equatable, Sendable {
    /// From stopping the guest here to the target's *done* (the guest running there), in seconds.
    public var downtime: Double
    public var total: Double
    public var bytesSent: UInt64
    public var passes: Int
    public var pagesSent: Int
    public var zeroPages: Int
}

/// The source side of a pre-copy live migration over an authenticated `MigrationChannel`.
///
/// 1. `config`; the target answers `progress` (it matches) or `abort` (why not).
/// 2. Dirty logging on; every RAM page (zero pages as numbers only); then, pass after pass, the pages
///    written meanwhile, until the rest fits the downtime at the measured rate; then a `progress`
///    round trip, so that the target has applied everything before the guest stops.
/// 3. Stop the guest and devices, send the last dirty pages and the state; the target restores and
///    answers `ready`. 4. `commit`: from here the source never resumes the guest; the target resumes it
///    and answers `done`.
/// Any failure before `commit` (time-out, refusal, the connection lost) resumes the guest here with
/// nothing lost and throws.
public final class PreCopySender {
    private let channel: MigrationChannel
    private let vm: MigrationSourceVM
    private let parameters: MigrationParameters
    private let report: (MigrationProgress) -> Void
    private var pagesSent = 0
    private var zeroPages = 0
    private var pass = 0
    private let started = BandwidthLimiter.monotonicSeconds()

    /// The final phase's steps and when each ended, in seconds after the guest stopped.
    public private(set) var trace: [(String, Double)] = []

    /// A rest this quick to send is not worth another pass.
    static let negligibleDowntime = 0.002
    /// At most this many passes in all while the rest already fits the limit.
    static let maxExtraPasses = 30

    /// Set once `commit` has been sent: the guest belongs to the target from then on.
    public private(set) var committed = false

    public init(channel: MigrationChannel, vm: MigrationSourceVM, parameters: MigrationParameters,
                report: @escaping (MigrationProgress) -> Void = { _ in }) {
        self.channel = channel
        self.vm = vm
        self.parameters = parameters
        self.report = report
        channel.maxBytesPerSecond = parameters.maxBytesPerSecond
    }

    private var elapsed: Double { BandwidthLimiter.monotonicSeconds() - started }

    /// Runs the migration. Throws before the commit point with the guest running here again; after it
    /// (`committed` true) errors are only reported: the guest is the target's.
    public func run() throws -> MigrationOutcome {
        var stopped = false
        var logging = false
        do {
            try channel.send(kind: .config, payload: try vm.configuration())
            let answer = try channel.receive(expecting: [.progress, .abort])
            if answer.kind == .abort { throw MigrationError.peerAborted(reason: (try? answer.abortReason()) ?? "refused") }

            try vm.setDirtyLogging(true)
            logging = true
            // The first pass: everything.
            var rate = try sendPass(all: true, bitmap: [])
            var bitmap = try vm.takeDirtyBitmap()
            var previousDirty = Int.max
            while true {
                let dirty = bitmap.reduce(0) { $0 + $1.nonzeroBitCount }
                let expected = Double(dirty * (MigrationStream.pageEntryLength)) / max(rate, 1)
                report(MigrationProgress(phase: "precopy", pass: pass, dirtyPages: dirty, bytesSent: channel.bytesSent,
                                         rate: rate, expectedDowntime: expected, elapsed: elapsed))
                // Within the limit, another pass is still worth it while passes shrink the rest by a
                // quarter or more: it costs the running guest nothing, and each one cuts the downtime.
                let shrinking = Double(dirty) < Double(previousDirty) * 0.75
                if expected <= parameters.downtime
                    && (expected <= PreCopySender.negligibleDowntime || !shrinking || pass >= PreCopySender.maxExtraPasses) { break }
                previousDirty = dirty
                if elapsed > parameters.timeout {
                    throw MigrationError.timedOut(operation: "converging: \(dirty) pages still dirty after \(pass) passes, \(Int(expected * 1000)) ms at \(Int(rate * 8 / 1e6)) Mbit/s, limit \(Int(parameters.downtime * 1000)) ms")
                }
                rate = try sendPass(all: false, bitmap: bitmap)
                bitmap = try vm.takeDirtyBitmap()
            }

            // Before stopping, wait until the target has applied everything sent so far (a `progress`
            // round trip): a target still working through the last pass would add its backlog to the
            // downtime. The guest keeps running meanwhile.
            try channel.send(kind: .progress, payload: Array(#"{"sync":true}"#.utf8))
            let synced = try channel.receive(expecting: [.progress, .abort])
            if synced.kind == .abort { throw MigrationError.peerAborted(reason: (try? synced.abortReason()) ?? "refused") }

            // Stop and copy.
            let stopTime = BandwidthLimiter.monotonicSeconds()
            if getenv("GODWIT_MIGRATION_TRACE") != nil { fputs("godwit: migration: \(String(format: "%.3f", stopTime)) stopping\n", stderr) }
            func mark(_ what: String) { trace.append((what, BandwidthLimiter.monotonicSeconds() - stopTime)) }
            try vm.stopForFinalCopy()
            mark("stopped")
            stopped = true
            bitmap.merge(try vm.takeDirtyBitmap())
            report(MigrationProgress(phase: "stop-and-copy", pass: pass + 1, dirtyPages: bitmap.reduce(0) { $0 + $1.nonzeroBitCount },
                                     bytesSent: channel.bytesSent, rate: rate, expectedDowntime: 0, elapsed: elapsed))
            _ = try sendPass(all: false, bitmap: bitmap)
            mark("pages")
            let state = try vm.captureState()
            mark("captured")
            try channel.send(kind: .state, payload: state)
            mark("state sent")
            let savedTimeout = channel.timeout
            channel.timeout = parameters.readyTimeout
            let ready: MigrationSection
            do { ready = try channel.receive(expecting: [.ready, .abort]) } catch {
                if case .timedOut = error {
                    throw MigrationError.timedOut(operation: "waiting for the target's ready (\(parameters.readyTimeout) s after the state was sent)")
                }
                throw error
            }
            if ready.kind == .abort { throw MigrationError.peerAborted(reason: (try? ready.abortReason()) ?? "refused") }
            channel.timeout = savedTimeout
            mark("ready")

            // The commit point.
            report(MigrationProgress(phase: "committing", pass: pass, dirtyPages: 0, bytesSent: channel.bytesSent, rate: rate,
                                     expectedDowntime: 0, elapsed: elapsed))
            committed = true
            try channel.send(kind: .commit)
            // The target resumes the guest, then says so; a lost `done` does not change who owns it.
            var downtime = BandwidthLimiter.monotonicSeconds() - stopTime
            if (try? channel.receive(expecting: [.done])) != nil { downtime = BandwidthLimiter.monotonicSeconds() - stopTime }
            mark("done")
            let outcome = MigrationOutcome(downtime: downtime, total: elapsed, bytesSent: channel.bytesSent, passes: pass,
                                           pagesSent: pagesSent, zeroPages: zeroPages)
            report(MigrationProgress(phase: "completed", pass: pass, dirtyPages: 0, bytesSent: channel.bytesSent, rate: rate,
                                     expectedDowntime: downtime, elapsed: elapsed))
            return outcome
        } catch {
            if committed { throw error }
            // Before the commit point: tell the target (best effort) and keep the guest here.
            try? channel.sendAbort(reason: "\(error)")
            if stopped { try? vm.resumeAfterCancel() } else if logging { try? vm.setDirtyLogging(false) }
            throw error
        }
    }

    /// Sends one pass (every RAM page, or those in `bitmap`); returns its rate in bytes per second.
    private func sendPass(all: Bool, bitmap: [UInt64]) throws -> Double {
        pass += 1
        let begin = BandwidthLimiter.monotonicSeconds()
        let bytesBefore = channel.bytesSent
        var batch: [(pageNumber: UInt64, bytes: UnsafeRawBufferPointer)] = []
        var zeros: [UInt64] = []
        batch.reserveCapacity(MigrationStream.maxPagesPerSection)
        func visit(_ number: UInt64) throws {
            guard let bytes = vm.page(number) else { return }
            if PreCopySender.isZero(bytes) {
                zeros.append(number)
                if zeros.count == MigrationStream.maxZeroPagesPerSection { try flushZeros() }
            } else {
                batch.append((number, bytes))
                if batch.count == MigrationStream.maxPagesPerSection { try flushPages() }
            }
        }
        func flushPages() throws {
            guard !batch.isEmpty else { return }
            try channel.sendPages(batch)
            pagesSent += batch.count
            batch.removeAll(keepingCapacity: true)
        }
        func flushZeros() throws {
            guard !zeros.isEmpty else { return }
            try channel.sendZeroPages(zeros)
            zeroPages += zeros.count
            zeros.removeAll(keepingCapacity: true)
        }
        if all {
            // Pages in holes of guest memory are zeros: list them without reading them (reading would
            // fault every untouched page in, on the source's CPU and memory).
            // (`page` only translates the address: it touches nothing.)
            let count = UInt64(vm.pageCount)
            func hole(_ number: UInt64) throws {
                guard vm.page(number) != nil else { return }  // not RAM
                zeros.append(number)
                if zeros.count == MigrationStream.maxZeroPagesPerSection { try flushZeros() }
            }
            var next: UInt64 = 0
            for range in vm.dataPageRanges() ?? [0..<count] {
                let lower = min(max(range.lowerBound, next), count), upper = min(range.upperBound, count)
                while next < lower { try hole(next); next += 1 }
                while next < upper { try visit(next); next += 1 }
            }
            while next < count { try hole(next); next += 1 }
        } else {
            for (w, word) in bitmap.enumerated() where word != 0 {
                var bits = word
                while bits != 0 {
                    let bit = bits.trailingZeroBitCount
                    bits &= bits - 1
                    try visit(UInt64(w * 64 + bit))
                }
            }
        }
        try flushPages()
        try flushZeros()
        let seconds = BandwidthLimiter.monotonicSeconds() - begin
        let bytes = Double(channel.bytesSent - bytesBefore)
        // A pass too short to time says little: assume at least the cap (or 1 GB/s).
        guard seconds > 0.005, bytes > 0 else { return Double(parameters.maxBytesPerSecond ?? 1_000_000_000) }
        return bytes / seconds
    }

    /// Whether a 4 KiB page is all zeros.
    static func isZero(_ page: UnsafeRawBufferPointer) -> Bool {
        // In bounds: pages are 4096 bytes, 512 words.
        let words = page.bindMemory(to: UInt64.self)
        for word in words where word != 0 { return false }
        return true
    }
}

extension Array where Element == UInt64 {
    /// ORs `other` into this bitmap.
    mutating func merge(_ other: [UInt64]) {
        for i in 0..<Swift.min(count, other.count) { self[i] |= other[i] }
    }
}

/// The target side of a pre-copy live migration: checks the configuration, fills guest memory,
/// restores the state, answers `ready` and waits for `commit`. Any failure (a malformed or hostile
/// stream, a mismatch, the connection lost, no commit) throws: the caller discards the VM.
public final class MigrationReceiver {
    private let channel: MigrationChannel
    private let vm: MigrationTargetVM
    public private(set) var pagesReceived = 0
    public private(set) var zeroPages = 0

    public init(channel: MigrationChannel, vm: MigrationTargetVM) {
        self.channel = channel
        self.vm = vm
    }

    /// Runs until `commit`; returns then (the caller resumes the guest and calls `confirmResumed`).
    public func run(commitTimeout: Double = 60) throws {
        let config = try channel.receive(expecting: [.config])
        do { try vm.checkConfiguration(config.payload) } catch {
            try? channel.sendAbort(reason: "\(error)")
            throw error
        }
        try channel.send(kind: .progress, payload: Array("{}".utf8))
        let limit = UInt64(vm.pageCount)
        // A new VM's memory reads as zeros: a zero page needs writing only where data was put before
        // (touching every page would also make the target allocate all of the guest's memory).
        var written = [UInt64](repeating: 0, count: (vm.pageCount + 63) / 64)
        let tracing = getenv("GODWIT_MIGRATION_TRACE") != nil
        while true {
            let section = try channel.receive(expecting: [.pages, .zeroPages, .progress, .state, .abort])
            if tracing { fputs("godwit: migration: \(String(format: "%.3f", BandwidthLimiter.monotonicSeconds())) received \(section.kind) (\(section.payload.count) bytes)\n", stderr) }
            switch section.kind {
            case .pages:
                try section.forEachPage(pageLimit: limit) { number, bytes in
                    guard let page = vm.writablePage(number) else { throw MigrationError.pageOutOfRange(number, limit: limit) }
                    page.copyMemory(from: bytes)
                    // In bounds: number < limit (checked by forEachPage), so number / 64 < written.count.
                    written[Int(number / 64)] |= 1 << (number % 64)
                    pagesReceived += 1
                }
            case .zeroPages:
                // Most zero pages were never written here (a first pass lists every untouched page of the
                // guest): test the bitmap first and look the page up only to clear it. This runs while the
                // source may already be stopping, so it has to be cheap per page.
                let numbers = try section.zeroPageNumbers(pageLimit: limit)
                for number in numbers {
                    // In bounds: number < limit (checked by zeroPageNumbers), so number / 64 < written.count.
                    let word = Int(number / 64), bit = UInt64(1) << (number % 64)
                    guard written[word] & bit != 0 else { continue }
                    guard let page = vm.writablePage(number) else { throw MigrationError.pageOutOfRange(number, limit: limit) }
                    page.initializeMemory(as: UInt8.self, repeating: 0)
                    written[word] &= ~bit
                }
                zeroPages += numbers.count
            case .abort:
                throw MigrationError.peerAborted(reason: (try? section.abortReason()) ?? "aborted")
            case .progress:
                // The source is about to stop the guest: everything before this is applied; say so.
                try channel.send(kind: .progress, payload: Array(#"{"synced":true}"#.utf8))
            default:  // .state
                do { try vm.restoreState(section.payload) } catch {
                    try? channel.sendAbort(reason: "the state cannot be restored: \(error)")
                    throw error
                }
                try channel.send(kind: .ready)
                let saved = channel.timeout
                channel.timeout = commitTimeout
                let commit = try channel.receive(expecting: [.commit, .abort])
                channel.timeout = saved
                if commit.kind == .abort { throw MigrationError.peerAborted(reason: (try? commit.abortReason()) ?? "aborted") }
                return
            }
        }
    }

    /// Tells the source the guest runs here (it measures the downtime up to this).
    public func confirmResumed() { try? channel.send(kind: .done) }
}

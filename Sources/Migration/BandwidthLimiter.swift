import GodwitSystem
#if canImport(Glibc)
import Glibc
#endif

/// A token bucket that caps a sender at `bytesPerSecond`: the bucket holds at most 1/20 s worth of
/// bytes and is never overdrawn, so any window of T seconds carries at most (T + 0.05) × rate bytes
/// (≤ 1.05 × rate per 1-second window).
public final class BandwidthLimiter: @unchecked Sendable {
    /// The bucket's size as a fraction of one second's worth of bytes.
    public static let burstSeconds = 0.05
    private let lock = Lock()
    private let now: () -> Double
    private let sleep: (Double) -> Void
    private var rate: UInt64?
    private var tokens = 0.0
    private var last = 0.0

    /// `now` (seconds, monotonic) and `sleep` (seconds) are injectable for tests.
    public init(bytesPerSecond: UInt64? = nil, now: @escaping () -> Double = BandwidthLimiter.monotonicSeconds,
                sleep: @escaping (Double) -> Void = BandwidthLimiter.sleepSeconds) {
        self.now = now
        self.sleep = sleep
        self.bytesPerSecond = bytesPerSecond
    }

    /// The cap (nil: unlimited; 0 is treated as 1 byte per second). Settable while a sender runs.
    public var bytesPerSecond: UInt64? {
        get { lock.withLock { rate } }
        set {
            lock.withLock {
                let t = now()
                if rate == nil {
                    rate = newValue.map { max($0, 1) }
                    tokens = burst  // starts full
                } else {
                    refill(at: t)   // what the old rate earned until now
                    rate = newValue.map { max($0, 1) }
                    tokens = min(tokens, burst)
                }
                last = t
            }
        }
    }

    /// The bucket's capacity in bytes at the current rate (at least 1; Int.max when unlimited).
    public var burstBytes: Int { lock.withLock { rate == nil ? Int.max : Int(burst) } }

    private var burst: Double {
        guard let rate else { return .infinity }
        return max(1, (Double(rate) * Self.burstSeconds).rounded(.down))
    }

    private func refill(at t: Double) {
        if let rate, t > last { tokens = min(burst, tokens + (t - last) * Double(rate)) }
        last = max(last, t)
    }

    /// Waits until it may send, then returns how many bytes (1...wanted, at most one bucketful) it may
    /// send now; those are taken from the bucket.
    public func acquire(upTo wanted: Int) -> Int {
        guard wanted > 0 else { return 0 }
        while true {
            let (granted, wait): (Int, Double) = lock.withLock {
                guard let rate else { return (wanted, 0) }
                refill(at: now())
                let chunk = min(Double(wanted), burst)
                // The slack absorbs rounding (a millionth of a byte), so a wait always ends in a grant.
                if tokens + 1e-6 >= chunk { tokens = max(0, tokens - chunk); return (Int(chunk), 0) }
                return (0, max((chunk - tokens) / Double(rate), 1e-6))
            }
            if granted > 0 { return granted }
            sleep(wait)
        }
    }

    public static func monotonicSeconds() -> Double { GodwitSystem.monotonicSeconds() }

    public static func sleepSeconds(_ seconds: Double) {
        guard seconds > 0 else { return }
        let capped = min(seconds, 3600)
        var request = timespec(tv_sec: Int(capped), tv_nsec: Int((capped - capped.rounded(.down)) * 1e9))
        var remaining = timespec()
        while nanosleep(&request, &remaining) == -1 && errno == EINTR { request = remaining }
    }
}

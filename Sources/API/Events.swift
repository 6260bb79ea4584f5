import GodwitSystem
#if canImport(Glibc)
import Glibc
#endif

/// A lifecycle or device event, as `GET /events` streams it (one JSON object per line). A Godwit extension.
public struct GodwitEvent: Codable, Equatable, Sendable {
    /// The kind of event; a string so that later kinds do not break older clients.
    public struct Kind: RawRepresentable, Codable, Hashable, Sendable, CustomStringConvertible, ExpressibleByStringLiteral {
        public var rawValue: String
        public init(rawValue: String) { self.rawValue = rawValue }
        public init(stringLiteral value: String) { rawValue = value }
        public init(from decoder: Decoder) throws { rawValue = try decoder.singleValueContainer().decode(String.self) }
        public func encode(to encoder: Encoder) throws {
            var c = encoder.singleValueContainer()
            try c.encode(rawValue)
        }
        public var description: String { rawValue }

        public static let booted: Kind = "booted"
        public static let paused: Kind = "paused"
        public static let resumed: Kind = "resumed"
        public static let shutdown: Kind = "shutdown"
        public static let deviceFault: Kind = "device_fault"
        public static let routeChange: Kind = "route_change"
        public static let migrationProgress: Kind = "migration_progress"
        /// The fence deadline lapsed and the VMM paused its guest by itself.
        public static let fenced: Kind = "fenced"
        /// The subscriber fell behind and `details.count` events were dropped for it.
        public static let eventsDropped: Kind = "events_dropped"
    }

    /// Increases by one per event published by the VMM; `GET /events?since=N` resumes after N.
    public var seq: UInt64
    public var type: Kind
    /// UTC, RFC 3339 with milliseconds ("2025-01-31T12:00:00.123Z").
    public var timestamp: String
    public var details: [String: JSONValue]

    public init(seq: UInt64, type: Kind, timestamp: String, details: [String: JSONValue] = [:]) {
        self.seq = seq
        self.type = type
        self.timestamp = timestamp
        self.details = details
    }

    enum CodingKeys: String, CodingKey, CaseIterable { case seq, type, timestamp, details }

    public init(from decoder: Decoder) throws {
        let c = try decoder.strictContainer(CodingKeys.self)
        seq = try c.decodeInteger(UInt64.self, forKey: .seq)
        type = try c.decode(Kind.self, forKey: .type)
        timestamp = try c.decode(String.self, forKey: .timestamp)
        details = try c.decodeIfPresent([String: JSONValue].self, forKey: .details) ?? [:]
    }

    /// The current time as an event timestamp.
    public static func timestampNow() -> String {
        var ts = timespec()
        clock_gettime(CLOCK_REALTIME, &ts)
        var seconds = time_t(ts.tv_sec)
        var parts = tm()
        gmtime_r(&seconds, &parts)
        func pad(_ v: Int32, _ width: Int) -> String {
            let s = String(v)
            return String(repeating: "0", count: max(0, width - s.count)) + s
        }
        return "\(pad(parts.tm_year + 1900, 4))-\(pad(parts.tm_mon + 1, 2))-\(pad(parts.tm_mday, 2))T"
            + "\(pad(parts.tm_hour, 2)):\(pad(parts.tm_min, 2)):\(pad(parts.tm_sec, 2)).\(pad(Int32(ts.tv_nsec / 1_000_000), 3))Z"
    }
}

/// The VMM's event broadcaster: publishers append to a bounded history; each subscriber reads it at its
/// own pace from its own position. A subscriber that falls more than `historyLimit` events behind gets an
/// `events_dropped` event saying how many it missed, so a slow client never makes the VMM buffer without bound.
public final class EventHub: @unchecked Sendable {
    public let historyLimit: Int
    private let condition = ConditionLock()
    private var history: [GodwitEvent] = []   // ring: oldest at `head`
    private var head = 0
    private var nextSeq: UInt64 = 1
    private var closed = false
    /// Each live subscription's eventfd, signalled on every publish and at close.
    private var notifiers: [ObjectIdentifier: EventFD] = [:]

    public init(historyLimit: Int = 1024) {
        self.historyLimit = max(1, historyLimit)
    }

    /// Publishes an event now; returns it (with its sequence number and timestamp).
    @discardableResult
    public func publish(_ type: GodwitEvent.Kind, details: [String: JSONValue] = [:]) -> GodwitEvent {
        condition.withLock {
            let event = GodwitEvent(seq: nextSeq, type: type, timestamp: GodwitEvent.timestampNow(), details: details)
            nextSeq += 1
            if history.count < historyLimit {
                history.append(event)
            } else {
                history[head] = event
                head = (head + 1) % historyLimit
            }
            condition.broadcast()
            for notifier in notifiers.values { try? notifier.signal() }
            return event
        }
    }

    /// A subscription to the events after `since` (nil: only events published from now on; 0: all the
    /// history still held).
    public func subscribe(since: UInt64? = nil) -> EventSubscription {
        let start: UInt64 = condition.withLock {
            guard let since else { return nextSeq }
            return min(since &+ 1, nextSeq)
        }
        let subscription = EventSubscription(hub: self, next: max(start, 1))
        if let notifier = subscription.notifier {
            condition.withLock { notifiers[ObjectIdentifier(subscription)] = notifier }
        }
        return subscription
    }

    /// Ends every subscription (the VMM is going away): their `next` returns nil once they have read what is left.
    public func close() {
        condition.withLock {
            closed = true
            condition.broadcast()
            for notifier in notifiers.values { try? notifier.signal() }
        }
    }

    /// The sequence number the next event will get.
    public var nextSequenceNumber: UInt64 { condition.withLock { nextSeq } }

    fileprivate enum Wait { case event(GodwitEvent), timedOut, finished }

    fileprivate func next(after position: inout UInt64, deadline: Double, cancelled: () -> Bool) -> Wait {
        condition.withLock {
            while true {
                if cancelled() { return .finished }
                if position < nextSeq {
                    let oldest = history.isEmpty ? nextSeq : history[head].seq
                    if position < oldest {
                        let missed = oldest - position
                        position = oldest
                        return .event(GodwitEvent(seq: oldest - 1, type: .eventsDropped, timestamp: GodwitEvent.timestampNow(),
                                                  details: ["count": .number(Double(missed))]))
                    }
                    let index = (head + Int(position - oldest)) % history.count
                    position += 1
                    return .event(history[index])
                }
                if closed { return .finished }
                if monotonicNow() >= deadline { return .timedOut }
                condition.wait(until: deadline)
            }
        }
    }

    fileprivate func wakeAll() { condition.withLock { condition.broadcast() } }

    fileprivate func forget(_ subscription: ObjectIdentifier) { _ = condition.withLock { notifiers.removeValue(forKey: subscription) } }
}

/// One reader of an `EventHub`.
public final class EventSubscription: @unchecked Sendable {
    private let hub: EventHub
    private let lock = ConditionLock()
    private var position: UInt64
    private var cancelled = false
    /// Readable when events may be waiting (signalled by every publish, by `cancel` and at close), so that a
    /// reader can wait for events and for something else at once with poll/epoll. `next` resets it.
    public let notifier: EventFD?

    fileprivate init(hub: EventHub, next: UInt64) {
        self.hub = hub
        position = next
        notifier = try? EventFD(nonBlocking: true)
    }

    deinit { hub.forget(ObjectIdentifier(self)) }

    public enum Next: Equatable, Sendable {
        case event(GodwitEvent)
        /// Nothing arrived within the time-out.
        case timedOut
        /// The hub closed or the subscription was cancelled.
        case finished
    }

    /// The next event, waiting at most `timeout` seconds.
    public func next(timeout: Double) -> Next {
        // Reset the notifier before looking, so that an event published after the look signals it again.
        _ = try? notifier?.wait()
        let deadline = monotonicNow() + max(0, timeout)
        var current = lock.withLock { position }
        let result = hub.next(after: &current, deadline: deadline, cancelled: { lock.withLock { cancelled } })
        lock.withLock { position = current }
        switch result {
        case let .event(e): return .event(e)
        case .timedOut: return .timedOut
        case .finished: return .finished
        }
    }

    /// Ends this subscription; a `next` in progress returns `.finished`.
    public func cancel() {
        lock.withLock { cancelled = true }
        hub.forget(ObjectIdentifier(self))
        try? notifier?.signal()
        hub.wakeAll()
    }
}

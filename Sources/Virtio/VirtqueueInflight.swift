import GuestMemory

/// Inflight I/O tracking for one split virtqueue, in a shared region that outlives the process
/// serving the queue (vhost-user's "Inflight I/O tracking", `VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD`).
///
/// The device marks each chain it takes from the avail ring and clears the mark when it returns the
/// chain; a device that restarts after a crash finds the chains it had taken and not returned, and
/// processes them again, oldest first, before taking new ones. Layout (little-endian, as libvhost-user):
///
/// ```
/// u64 features; u16 version; u16 desc_num; u16 last_batch_head; u16 used_idx;   // 16-byte header
/// struct { u8 inflight; u8 pad[5]; u16 next; u64 counter; } desc[desc_num];      // 16 bytes each
/// ```
///
/// The region is shared with a frontend that may be hostile: every field read from it is checked
/// (a head out of range is ignored), and it never decides an address.
public final class VirtqueueInflight: @unchecked Sendable {
    public static let headerSize = 16
    public static let descriptorStateSize = 16
    public static let version: UInt16 = 1

    /// The bytes one queue of `queueSize` entries takes, rounded to 64 so queues do not share lines.
    public static func regionSize(queueSize: UInt16) -> Int {
        (headerSize + descriptorStateSize * Int(queueSize) + 63) & ~63
    }

    private let base: UnsafeMutableRawPointer
    private let owner: AnyObject
    /// The entries this region tracks (the ring's size).
    public let descriptorCount: UInt16
    private var counter: UInt64 = 0

    /// Tracks a queue of `queueSize` entries in `length` bytes at `base`, kept mapped by `owner`.
    /// Throws when the region is too small. A region that was never used (desc_num 0) is initialised.
    public init(base: UnsafeMutableRawPointer, length: Int, queueSize: UInt16, owner: AnyObject) throws(VirtioError) {
        guard queueSize > 0, length >= VirtqueueInflight.regionSize(queueSize: queueSize) else {
            throw .inflightRegion(reason: "\(length) bytes cannot track a queue of \(queueSize) entries (needs \(VirtqueueInflight.regionSize(queueSize: queueSize)))")
        }
        self.base = base
        self.owner = owner
        self.descriptorCount = queueSize
        // In bounds: the checks above cover the header and queueSize entries.
        // A region set up for another ring size (the driver re-negotiated) is started over.
        wasFresh = UInt16(littleEndian: base.loadUnaligned(fromByteOffset: 10, as: UInt16.self)) != queueSize
        if wasFresh {
            for head in 0..<queueSize { base.storeBytes(of: UInt8(0), toByteOffset: entry(head), as: UInt8.self) }
            store(UInt16(0), 12)
            store(UInt16(0), 14)
            store(UInt64(0), 0)
            store(VirtqueueInflight.version, 8)
            store(queueSize, 10)
        }
        for head in 0..<queueSize where isInflight(head) { counter = max(counter, load(UInt64.self, entry(head) + 8)) }
    }

    /// True when the region had never tracked this queue (desc_num was 0, or another ring size): nothing to recover, and the
    /// ring's position comes from the frontend.
    public let wasFresh: Bool

    private func entry(_ head: UInt16) -> Int { VirtqueueInflight.headerSize + VirtqueueInflight.descriptorStateSize * Int(head) }

    private func load<T: FixedWidthInteger>(_: T.Type, _ offset: Int) -> T {
        // In bounds: offsets are the header's or entry(head) with head < descriptorCount, all inside `length`.
        T(littleEndian: base.loadUnaligned(fromByteOffset: offset, as: T.self))
    }

    private func store<T: FixedWidthInteger>(_ value: T, _ offset: Int) {
        // In bounds: as for `load`.
        base.storeBytes(of: value.littleEndian, toByteOffset: offset, as: T.self)
    }

    private func isInflight(_ head: UInt16) -> Bool { head < descriptorCount && base.load(fromByteOffset: entry(head), as: UInt8.self) == 1 }

    /// The device took chain `head` from the avail ring.
    public func taken(head: UInt16) {
        guard head < descriptorCount else { return }
        counter &+= 1
        store(counter, entry(head) + 8)
        store(UInt16(0), entry(head) + 6)
        GuestMemory.fence()
        base.storeBytes(of: UInt8(1), toByteOffset: entry(head), as: UInt8.self)
    }

    /// Before the used ring is written: the last head of the batch being returned.
    public func returning(lastHead: UInt16) {
        store(lastHead, 12)
        GuestMemory.fence()
    }

    /// After the used idx was published as `usedIndex`: the returned heads are no longer in flight.
    public func returned(heads: [UInt16], usedIndex: UInt16) {
        for head in heads where head < descriptorCount {
            base.storeBytes(of: UInt8(0), toByteOffset: entry(head), as: UInt8.self)
        }
        GuestMemory.fence()
        store(usedIndex, 14)
    }

    /// After a restart: settles a return that was cut short, then lists the chains still in flight,
    /// oldest first. `usedIndex` is the used idx in guest memory; `usedHead(i)` reads the head of used
    /// ring entry `i` (nil when unreadable).
    public func recover(usedIndex: UInt16, usedHead: (UInt16) -> UInt16?) -> [UInt16] {
        let recorded = load(UInt16.self, 14)
        if recorded != usedIndex {
            // The used idx was published but the marks were not cleared: every entry between the recorded
            // and the published idx was returned (at most a queue's worth; more means the region lies).
            let gap = usedIndex &- recorded
            if gap <= descriptorCount {
                var i = recorded
                while i != usedIndex {
                    if let head = usedHead(i), head < descriptorCount {
                        base.storeBytes(of: UInt8(0), toByteOffset: entry(head), as: UInt8.self)
                    }
                    i &+= 1
                }
            } else {
                let last = load(UInt16.self, 12)
                if last < descriptorCount { base.storeBytes(of: UInt8(0), toByteOffset: entry(last), as: UInt8.self) }
            }
            GuestMemory.fence()
            store(usedIndex, 14)
        }
        let pending = (0..<descriptorCount).filter(isInflight)
        return pending.sorted { load(UInt64.self, entry($0) + 8) < load(UInt64.self, entry($1) + 8) }
    }

    /// Forgets every chain (the driver reset the device).
    public func clear() {
        for head in 0..<descriptorCount { base.storeBytes(of: UInt8(0), toByteOffset: entry(head), as: UInt8.self) }
        store(UInt16(0), 12)
        store(UInt16(0), 14)
        counter = 0
    }
}

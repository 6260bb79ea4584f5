import GuestMemory

/// The positions and addresses of one virtqueue: what migration saves and restores.
public struct VirtqueueState: Codable, Equatable, Sendable {
    public var size: UInt16
    public var descriptorTable: UInt64
    /// The driver area (avail ring).
    public var driverArea: UInt64
    /// The device area (used ring).
    public var deviceArea: UInt64
    /// The next avail ring slot the device will read (last_avail_idx).
    public var nextAvail: UInt16
    /// The used ring idx the device will publish next.
    public var nextUsed: UInt16

    public init(size: UInt16, descriptorTable: UInt64, driverArea: UInt64, deviceArea: UInt64,
                nextAvail: UInt16 = 0, nextUsed: UInt16 = 0) {
        self.size = size
        self.descriptorTable = descriptorTable
        self.driverArea = driverArea
        self.deviceArea = deviceArea
        self.nextAvail = nextAvail
        self.nextUsed = nextUsed
    }
}

/// The device side of one split virtqueue (virtio 1.2 §2.7) in guest memory.
///
/// A `Virtqueue` only exists once its size and ring addresses have been checked: a power-of-two size,
/// rings aligned and inside guest RAM. It is not thread-safe: the device that owns it serializes
/// `popAvailable`, `addUsed` and `needsNotification` (in Godwit, under the device's lock).
public final class Virtqueue: @unchecked Sendable {
    /// VIRTQ_AVAIL_F_NO_INTERRUPT.
    static let availNoInterrupt: UInt16 = 1
    /// VIRTQ_USED_F_NO_NOTIFY.
    static let usedNoNotify: UInt16 = 1

    /// The queue's index in its device.
    public let index: Int
    public let memory: GuestMemory
    public let size: UInt16
    public let descriptorTable: UInt64
    /// The avail ring.
    public let driverArea: UInt64
    /// The used ring.
    public let deviceArea: UInt64
    /// VIRTIO_F_EVENT_IDX was negotiated: used_event / avail_event drive notifications.
    public let eventIndex: Bool
    /// VIRTIO_F_INDIRECT_DESC was negotiated.
    public let indirectDescriptors: Bool
    /// The largest chain (in bytes, readable + writable) `popAvailable` accepts.
    public var maxChainBytes: UInt64 = UInt64(UInt32.max)
    /// The next avail ring slot to read (last_avail_idx); settable for restore.
    public var nextAvail: UInt16
    /// The next used ring idx to publish; settable for restore.
    public var nextUsed: UInt16
    /// `nextUsed` when the last notification decision was made; nil forces the next decision to notify.
    private var signalledUsed: UInt16?
    /// Inflight tracking (vhost-user INFLIGHT_SHMFD): every chain taken is marked there until returned.
    public var inflight: VirtqueueInflight?
    /// Told of the guest ranges a device wrote after the chain was taken (asynchronous completions),
    /// once the chain was returned: the vhost-user dirty log (which also marks the used ring).
    /// Called from the completing thread.
    public var writeObserver: (([DescriptorSegment]) -> Void)?
    /// The device polls the avail ring: the driver is asked not to notify (avail_event is left behind,
    /// or VIRTQ_USED_F_NO_NOTIFY without event-idx). Set with `suppressNotifications`, cleared with
    /// `enableNotifications`.
    public private(set) var notificationsSuppressed = false
    /// Heads taken before a restart and not returned: handed out again, in order, before new chains.
    public private(set) var resubmissions: [UInt16] = []

    /// Checks and creates a queue. `maxSize` is the device's QueueNumMax.
    public init(index: Int = 0, memory: GuestMemory, size: UInt16, descriptorTable: UInt64, driverArea: UInt64,
                deviceArea: UInt64, features: UInt64, maxSize: UInt16 = 32768,
                nextAvail: UInt16 = 0, nextUsed: UInt16 = 0) throws(VirtioError) {
        guard size > 0, size <= maxSize, size <= 32768, size & (size - 1) == 0 else {
            throw .badQueueSize(queue: index, size: size, maximum: min(maxSize, 32768))
        }
        let n = UInt64(size)
        try Virtqueue.checkRing(memory, queue: index, name: "descriptor table", address: descriptorTable,
                                length: 16 * n, alignment: 16)
        try Virtqueue.checkRing(memory, queue: index, name: "driver area (avail ring)", address: driverArea,
                                length: 6 + 2 * n, alignment: 2)
        try Virtqueue.checkRing(memory, queue: index, name: "device area (used ring)", address: deviceArea,
                                length: 6 + 8 * n, alignment: 4)
        self.index = index
        self.memory = memory
        self.size = size
        self.descriptorTable = descriptorTable
        self.driverArea = driverArea
        self.deviceArea = deviceArea
        self.eventIndex = features & VirtioFeature.eventIndex != 0
        self.indirectDescriptors = features & VirtioFeature.indirectDescriptors != 0
        self.nextAvail = nextAvail
        self.nextUsed = nextUsed
        self.signalledUsed = nextUsed
    }

    /// Re-creates a queue from saved state (migration, snapshot restore), with the same checks.
    public convenience init(index: Int = 0, memory: GuestMemory, state: VirtqueueState, features: UInt64,
                            maxSize: UInt16 = 32768) throws(VirtioError) {
        try self.init(index: index, memory: memory, size: state.size, descriptorTable: state.descriptorTable,
                      driverArea: state.driverArea, deviceArea: state.deviceArea, features: features,
                      maxSize: maxSize, nextAvail: state.nextAvail, nextUsed: state.nextUsed)
        // An interrupt may have been lost in transit: let the first decision after restore notify.
        resetNotificationState()
    }

    private static func checkRing(_ memory: GuestMemory, queue: Int, name: String, address: UInt64,
                                  length: UInt64, alignment: UInt64) throws(VirtioError) {
        guard address % alignment == 0 else { throw .misalignedRing(queue: queue, ring: name, address: address) }
        let (_, overflow) = address.addingReportingOverflow(length)
        guard !overflow, memory.contains(address, length: length) else {
            throw .ringOutOfRange(queue: queue, ring: name, address: address, length: length)
        }
    }

    /// After a restart with inflight tracking: recovers the chains the previous process took and did not
    /// return, to be processed again first, and sets `nextAvail` past them (used idx + their count).
    /// A fresh region keeps `nextAvail` as the frontend set it. Returns how many will be resubmitted.
    @discardableResult
    public func resumeInflight(_ tracker: VirtqueueInflight) throws(VirtioError) -> Int {
        inflight = tracker
        let usedIndex = try load16(usedIdxAddress)
        nextUsed = usedIndex
        guard !tracker.wasFresh else {
            tracker.returned(heads: [], usedIndex: usedIndex)
            return 0
        }
        let pending = tracker.recover(usedIndex: usedIndex) { i in
            try? load16(deviceArea &+ 4 &+ 8 &* UInt64(i % size))
        }
        resubmissions = pending
        nextAvail = usedIndex &+ UInt16(truncatingIfNeeded: pending.count)
        return pending.count
    }

    /// The queue's positions and addresses.
    public var state: VirtqueueState {
        VirtqueueState(size: size, descriptorTable: descriptorTable, driverArea: driverArea, deviceArea: deviceArea,
                       nextAvail: nextAvail, nextUsed: nextUsed)
    }

    // MARK: Ring fields (addresses were checked at creation; GuestMemory still refuses anything outside RAM)

    private var availIdxAddress: UInt64 { driverArea &+ 2 }
    private var usedEventAddress: UInt64 { driverArea &+ 4 &+ 2 &* UInt64(size) }
    private var usedIdxAddress: UInt64 { deviceArea &+ 2 }
    private var availEventAddress: UInt64 { deviceArea &+ 4 &+ 8 &* UInt64(size) }

    private func load16(_ address: UInt64) throws(VirtioError) -> UInt16 {
        do { return try memory.load(UInt16.self, at: address) } catch { throw .memory(error) }
    }

    private func store<T: FixedWidthInteger>(_ value: T, _ address: UInt64) throws(VirtioError) {
        do { try memory.store(value, at: address) } catch { throw .memory(error) }
    }

    /// The driver's avail idx.
    public func availableIndex() throws(VirtioError) -> UInt16 { try load16(availIdxAddress) }

    /// How many chains the driver has made available that the device has not taken; throws when the
    /// avail idx is more than the queue size ahead (a driver bug or a hostile guest).
    public func pendingCount() throws(VirtioError) -> UInt16 {
        let availIndex = try availableIndex()
        let pending = availIndex &- nextAvail
        guard pending <= size else {
            throw .availIndexTooFar(availIndex: availIndex, nextAvail: nextAvail, queueSize: size)
        }
        return pending
    }

    /// Takes the next available chain and validates it; nil when the ring is empty.
    ///
    /// With event-idx, publishes avail_event = the new position, and on an empty ring re-checks
    /// after publishing so that a chain added in between is not missed.
    public func popAvailable() throws(VirtioError) -> DescriptorChain? {
        guard let head = try takeAvailableHead() else { return nil }
        return try parseChain(head: head)
    }

    /// Whether the driver has made a chain available that the device has not taken.
    ///
    /// When the ring is empty and event-idx is on, publishes avail_event = `nextAvail` (so the driver's
    /// next addition notifies) and re-checks, as `popAvailable` does. Takes nothing from the ring.
    public func hasAvailable() throws(VirtioError) -> Bool {
        if !resubmissions.isEmpty { return true }
        if try pendingCount() > 0 { return true }
        guard eventIndex, !notificationsSuppressed else { return false }
        try store(nextAvail, availEventAddress)
        GuestMemory.fence()
        return try pendingCount() > 0
    }

    /// Asks the driver not to notify while the device looks at the ring by itself. With event-idx,
    /// avail_event goes one behind `nextAvail` (an entry already taken), so no addition matches it.
    public func suppressNotifications() throws(VirtioError) {
        guard !notificationsSuppressed else { return }
        notificationsSuppressed = true
        if eventIndex { try store(nextAvail &- 1, availEventAddress) } else { try store(UInt16(Virtqueue.usedNoNotify), deviceArea) }
    }

    /// Asks the driver to notify again; returns whether chains arrived that it did not notify about
    /// (checked after the request is visible, so none is missed).
    public func enableNotifications() throws(VirtioError) -> Bool {
        notificationsSuppressed = false
        if eventIndex { try store(nextAvail, availEventAddress) } else { try store(UInt16(0), deviceArea) }
        GuestMemory.fence()
        return try hasAvailable()
    }

    /// Like `popAvailable`, but a chain that fails validation does not throw: its head comes back with
    /// the error, so that the device can complete it (used length 0) and go on.
    ///
    /// Throws only when the ring itself is unusable: avail idx too far ahead, a head index not below
    /// the queue size (it cannot be completed), ring memory unreachable.
    public func popAvailableOrFailure() throws(VirtioError) -> (head: UInt16, chain: Result<DescriptorChain, VirtioError>)? {
        guard let head = try takeAvailableHead() else { return nil }
        guard head < size else { throw .headOutOfRange(head: head, queueSize: size) }
        return (head, Result { () throws(VirtioError) -> DescriptorChain in try parseChain(head: head) })
    }

    /// Takes the next head index from the avail ring (advancing `nextAvail`); nil when the ring is empty.
    private func takeAvailableHead() throws(VirtioError) -> UInt16? {
        if !resubmissions.isEmpty { return resubmissions.removeFirst() }
        guard try hasAvailable() else { return nil }
        // Read the ring entry only after seeing the idx that covers it.
        GuestMemory.fence()
        let slot = UInt64(nextAvail % size)
        let head = try load16(driverArea &+ 4 &+ 2 &* slot)
        nextAvail &+= 1
        if eventIndex && !notificationsSuppressed { try store(nextAvail, availEventAddress) }
        inflight?.taken(head: head)
        return head
    }

    private func parseChain(head: UInt16) throws(VirtioError) -> DescriptorChain {
        try DescriptorChain.parse(memory: memory, descriptorTable: descriptorTable, queueSize: size, head: head,
                                  indirectAllowed: indirectDescriptors, maxBytes: maxChainBytes)
    }

    /// Records, after returning a chain, that a device wrote `segments` of guest memory after taking
    /// it (its data landed asynchronously) and the used ring: counted by the memory's write tracker
    /// and `writeObserver`.
    public func noteDeviceWrites(_ segments: [DescriptorSegment]) {
        for segment in segments { memory.noteWrite(at: segment.address, length: UInt64(segment.length)) }
        memory.noteWrite(at: deviceArea, length: 6 &+ 8 &* UInt64(size))
        writeObserver?(segments)
    }

    /// Returns a chain to the driver: writes the used element, then (after a fence) the used idx.
    ///
    /// `length` is the number of bytes the device wrote into the chain's writable buffers.
    public func addUsed(head: UInt16, length: UInt32) throws(VirtioError) {
        guard head < size else { throw .headOutOfRange(head: head, queueSize: size) }
        inflight?.returning(lastHead: head)
        let element = deviceArea &+ 4 &+ 8 &* UInt64(nextUsed % size)
        try store(UInt32(head), element)
        try store(length, element &+ 4)
        // The element must be visible before the idx that publishes it.
        GuestMemory.fence()
        nextUsed &+= 1
        try store(nextUsed, usedIdxAddress)
        inflight?.returned(heads: [head], usedIndex: nextUsed)
    }

    /// Returns several chains at once: writes every used element, then (after one fence) the used idx,
    /// so that the driver sees them together (virtio-net's merged receive buffers must appear at once).
    /// Checks every head before writing anything.
    public func addUsed(_ elements: [(head: UInt16, length: UInt32)]) throws(VirtioError) {
        for element in elements where element.head >= size {
            throw .headOutOfRange(head: element.head, queueSize: size)
        }
        guard !elements.isEmpty else { return }
        inflight?.returning(lastHead: elements[elements.count - 1].head)
        var index = nextUsed
        for element in elements {
            let address = deviceArea &+ 4 &+ 8 &* UInt64(index % size)
            try store(UInt32(element.head), address)
            try store(element.length, address &+ 4)
            index &+= 1
        }
        // The elements must be visible before the idx that publishes them.
        GuestMemory.fence()
        nextUsed = index
        try store(nextUsed, usedIdxAddress)
        inflight?.returned(heads: elements.map(\.head), usedIndex: nextUsed)
    }

    /// Whether the driver wants an interrupt for the used entries added since the last call.
    ///
    /// With event-idx: `vring_need_event(used_event, new, old)`, i.e. notify when used_event lies in
    /// [old, new). Without: notify unless the driver set VIRTQ_AVAIL_F_NO_INTERRUPT. Never when nothing
    /// was added since the last call.
    public func needsNotification() throws(VirtioError) -> Bool {
        // The used idx store must be visible before the driver's fields are read.
        GuestMemory.fence()
        let new = nextUsed
        let old = signalledUsed
        signalledUsed = new
        if let old, old == new { return false }
        if eventIndex {
            guard let old else { return true }
            let usedEvent = try load16(usedEventAddress)
            return Virtqueue.needEvent(event: usedEvent, new: new, old: old)
        }
        let flags = try load16(driverArea)
        return flags & Virtqueue.availNoInterrupt == 0
    }

    /// The spec's vring_need_event: true when `event` lies in [old, new) modulo 2^16.
    public static func needEvent(event: UInt16, new: UInt16, old: UInt16) -> Bool {
        (new &- event &- 1) < (new &- old)
    }

    /// Forgets the last notification decision so that the next `needsNotification` notifies (after restore).
    public func resetNotificationState() { signalledUsed = nil }
}

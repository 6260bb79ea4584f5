import GuestMemory

/// The way back from a device to its transport: used-buffer and configuration-change interrupts, and
/// the report that the device can no longer go on without a reset.
///
/// Implementations are thread-safe: devices call them from whichever thread completes a request.
public protocol VirtioInterrupt: AnyObject {
    /// The device put buffers in the used ring of `queue` and the driver asked to be told.
    func signalUsedBuffer(queue: Int)
    /// The device configuration space changed.
    func signalConfigChange()
    /// The device met an error it cannot report in a request (a malformed chain, a broken ring) and
    /// stopped; the transport sets DEVICE_NEEDS_RESET (status bit 0x40) and tells the driver.
    func deviceNeedsReset(because error: Error)
}

/// The device logic of one virtio device (block, net), independent of its transport (virtio-mmio in
/// the VMM, vhost-user in an I/O domain): features, configuration space and queue processing.
///
/// The transport calls `activate` once the driver has set DRIVER_OK, `queueNotified` for every
/// notification (possibly from several threads at once), and `reset` when the driver writes status 0;
/// the device serializes these itself.
public protocol VirtioDevice: AnyObject {
    /// The virtio device ID: 1 = network, 2 = block.
    var deviceID: UInt32 { get }
    /// How many virtqueues the device has.
    var queueCount: Int { get }
    /// The largest queue size the device accepts (QueueNumMax).
    var maxQueueSize: UInt16 { get }
    /// The feature bits offered: VIRTIO_F_VERSION_1, the ring features, and the device's own.
    var deviceFeatures: UInt64 { get }
    /// Reads configuration space at `offset`; bytes past the end read as 0.
    func readConfig(offset: Int, into data: UnsafeMutableRawBufferPointer)
    /// Writes configuration space at `offset`; read-only fields and bytes past the end are ignored.
    func writeConfig(offset: Int, from data: UnsafeRawBufferPointer)
    /// Starts the device with the negotiated `features` and the queues the driver made ready
    /// (each knows its `index`); throws when the device cannot run with them.
    func activate(memory: GuestMemory, queues: [Virtqueue], features: UInt64, interrupt: VirtioInterrupt) throws
    /// Processes everything available on queue `index`.
    func queueNotified(_ index: Int)
    /// Stops the device and forgets its queues, back to the state before `activate`.
    func reset()
    /// Migration: stops processing so that the queues stand still, and returns each active queue's
    /// next avail index when the queues run elsewhere (an I/O domain); nil when the transport's own
    /// `Virtqueue`s hold the positions. `resumeAfterSuspend` undoes it (the migration was cancelled).
    func suspendForMigration() throws -> [Int: UInt16]?
    func resumeAfterSuspend() throws
    /// Busy polling by the transport's thread after a batch (an I/O domain's connection thread, for a
    /// few tens of µs, instead of sleeping on the kick): `pollingStarted(index)` and `pollingStopped(index)`
    /// bracket calls to `poll(index)`, which processes what is ready on queue `index` (new requests,
    /// completions) and returns whether there was anything. While polling, the device may ask the
    /// driver not to notify; `pollingStopped` asks again and processes what came meanwhile.
    func pollingStarted(_ index: Int)
    func poll(_ index: Int) -> Bool
    func pollingStopped(_ index: Int)
}

extension VirtioDevice {
    /// In-process devices run only when notified; the VMM holds back their notifications itself.
    public func suspendForMigration() throws -> [Int: UInt16]? { nil }
    public func resumeAfterSuspend() throws {}
    /// Devices that do not poll: nothing is ever ready.
    public func pollingStarted(_ index: Int) {}
    public func poll(_ index: Int) -> Bool { false }
    public func pollingStopped(_ index: Int) {}
}

/// A device that can ask its driver to announce the guest on the network (virtio-net's
/// VIRTIO_NET_F_GUEST_ANNOUNCE): the VMM asks after a migration or a snapshot load, so that switches
/// learn where the guest's MAC address now is.
public protocol GuestAnnouncing: AnyObject {
    /// Sets VIRTIO_NET_S_ANNOUNCE and raises a configuration change interrupt when the driver
    /// negotiated GUEST_ANNOUNCE and the control queue; returns whether it did.
    @discardableResult
    func requestAnnounce() -> Bool
}

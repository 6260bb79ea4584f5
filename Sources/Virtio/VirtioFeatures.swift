/// Feature bits, status bits and device IDs of virtio 1.2 that are independent of the device type.
public enum VirtioFeature {
    /// VIRTIO_F_INDIRECT_DESC (28): descriptors may point to indirect descriptor tables.
    public static let indirectDescriptors: UInt64 = 1 << 28
    /// VIRTIO_F_EVENT_IDX (29): used_event / avail_event notification suppression.
    public static let eventIndex: UInt64 = 1 << 29
    /// VIRTIO_F_VERSION_1 (32): a modern (non-legacy) device. Required by every Godwit device.
    public static let version1: UInt64 = 1 << 32
    /// VIRTIO_F_ACCESS_PLATFORM (33).
    public static let accessPlatform: UInt64 = 1 << 33
    /// VIRTIO_F_RING_PACKED (34): packed virtqueues (not supported).
    public static let ringPacked: UInt64 = 1 << 34
}

/// The device status register bits (virtio 1.2 §2.1).
public enum VirtioStatus {
    public static let acknowledge: UInt32 = 1
    public static let driver: UInt32 = 2
    public static let driverOK: UInt32 = 4
    public static let featuresOK: UInt32 = 8
    public static let deviceNeedsReset: UInt32 = 0x40
    public static let failed: UInt32 = 0x80
}

/// Virtio device type numbers (virtio 1.2 §5).
public enum VirtioDeviceType {
    public static let network: UInt32 = 1
    public static let block: UInt32 = 2
}

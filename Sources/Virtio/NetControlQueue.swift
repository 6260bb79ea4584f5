import GuestMemory

/// virtio-net's control virtqueue (virtio 1.2 §5.1.6.5), as far as Godwit implements it: the
/// announce command (§5.1.6.5.4) and VIRTIO_NET_ERR for everything else.
///
/// It runs in the process that owns the announce status: the in-process `NetDevice`, and the VMM's
/// vhost-user frontend (`VhostUserDevice`), which, like QEMU, keeps the control queue instead of
/// passing it to the backend.
///
/// A command is a chain of device-readable bytes `{u8 class; u8 command; data...}` followed by
/// device-writable bytes whose first is the `u8 ack` the device writes. Every byte the guest gave is
/// checked: a chain that cannot carry an answer (a descriptor out of RAM or looping, fewer than two
/// readable bytes, no writable byte, more than `maxCommandBytes`) is completed with used length 0
/// and counted as malformed; a readable header with an unknown class, an unknown command or data
/// where none belongs is answered VIRTIO_NET_ERR. Only a broken ring (avail idx too far ahead, a head
/// index out of range, ring memory unreachable) throws: the caller stops the device.
public enum NetControlQueue {
    /// The control queue's index when VIRTIO_NET_F_MQ is not negotiated: after one RX/TX pair.
    public static let queueIndex = 2
    /// VIRTIO_NET_CTRL_ANNOUNCE.
    public static let classAnnounce: UInt8 = 3
    /// VIRTIO_NET_CTRL_ANNOUNCE_ACK.
    public static let commandAnnounceAck: UInt8 = 0
    /// VIRTIO_NET_OK.
    public static let ok: UInt8 = 0
    /// VIRTIO_NET_ERR.
    public static let error: UInt8 = 1
    /// The largest command chain accepted (readable plus writable bytes). The biggest command of the
    /// spec that a driver could send without a feature Godwit offers is far smaller.
    public static let maxCommandBytes: UInt64 = 4096

    /// One command as read from the guest.
    public enum Command: Equatable, Sendable {
        /// VIRTIO_NET_CTRL_ANNOUNCE / ACK with no data: the driver announced itself.
        case announceAck
        /// Anything else (answered VIRTIO_NET_ERR).
        case unsupported(commandClass: UInt8, command: UInt8, dataLength: UInt64)
    }

    /// What one `process` call did.
    public struct Outcome: Equatable, Sendable {
        /// Chains returned to the driver.
        public var completed = 0
        /// Announce acknowledgements (answered OK).
        public var announceAcks = 0
        /// Commands answered VIRTIO_NET_ERR.
        public var refused = 0
        /// Chains completed with used length 0, without an answer.
        public var malformed = 0

        public init() {}
    }

    /// Decodes a command from its readable bytes; nil when there is no two-byte header.
    public static func decode(_ readable: [UInt8], dataLength: UInt64) -> Command? {
        guard readable.count >= 2 else { return nil }
        if readable[0] == classAnnounce && readable[1] == commandAnnounceAck && dataLength == 0 { return .announceAck }
        return .unsupported(commandClass: readable[0], command: readable[1], dataLength: dataLength)
    }

    /// Handles every chain available on `queue` (the control queue, with `maxChainBytes` set to
    /// `maxCommandBytes` by the caller). `answer` is asked for each well-formed command and returns
    /// the ack byte; it runs with whatever lock the caller holds. The caller interrupts the driver
    /// when `queue.needsNotification()` says so.
    public static func process(_ queue: Virtqueue, memory: GuestMemory,
                               answer: (Command) -> UInt8) throws(VirtioError) -> Outcome {
        var outcome = Outcome()
        while let popped = try queue.popAvailableOrFailure() {
            var used: UInt32 = 0
            if case let .success(chain) = popped.chain, let command = readCommand(chain, memory),
               let ackAddress = chain.writable.first?.address {
                let ack = answer(command)
                // The parser checked the writable segment lies in RAM and is at least one byte long.
                if (try? memory.store(ack, at: ackAddress)) != nil {
                    used = 1
                    if command == .announceAck && ack == ok { outcome.announceAcks += 1 } else if ack != ok { outcome.refused += 1 }
                } else {
                    outcome.malformed += 1
                }
            } else {
                outcome.malformed += 1
            }
            try queue.addUsed(head: popped.head, length: used)
            outcome.completed += 1
        }
        return outcome
    }

    /// The command of a parsed chain: its first two readable bytes (possibly in two descriptors) and
    /// the length of the data after them; nil when the chain cannot carry a command and its answer.
    private static func readCommand(_ chain: DescriptorChain, _ memory: GuestMemory) -> Command? {
        let readable = chain.readableLength
        guard readable >= 2, chain.writableLength >= 1,
              readable + chain.writableLength <= maxCommandBytes else { return nil }
        var header: [UInt8] = []
        for segment in chain.readable where header.count < 2 {
            let n = min(Int(segment.length), 2 - header.count)
            guard let bytes = try? memory.readBytes(at: segment.address, count: n) else { return nil }
            header += bytes
        }
        return decode(header, dataLength: readable - 2)
    }
}

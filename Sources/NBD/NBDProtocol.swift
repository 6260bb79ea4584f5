/// The constants of the NBD protocol (the NBD project's `doc/proto.md`), fixed newstyle only.
public enum NBDProtocol {
    /// "NBDMAGIC", the first 8 bytes from a server.
    public static let initMagic: UInt64 = 0x4e42_444d_4147_4943
    /// "IHAVEOPT": newstyle negotiation; also the magic of every option request.
    public static let optionMagic: UInt64 = 0x4948_4156_454F_5054
    /// The magic of every option reply.
    public static let replyMagic: UInt64 = 0x0003_e889_0455_65a9
    public static let requestMagic: UInt32 = 0x2560_9513
    public static let simpleReplyMagic: UInt32 = 0x6744_6698

    /// Handshake flags (server) and client flags.
    public enum HandshakeFlag {
        public static let fixedNewstyle: UInt16 = 1 << 0
        public static let noZeroes: UInt16 = 1 << 1
    }

    /// Option codes.
    public enum Option {
        public static let exportName: UInt32 = 1
        public static let abort: UInt32 = 2
        public static let list: UInt32 = 3
        public static let startTLS: UInt32 = 5
        public static let info: UInt32 = 6
        public static let go: UInt32 = 7
        public static let structuredReply: UInt32 = 8
    }

    /// Option reply types (errors have bit 31 set).
    public enum Reply {
        public static let ack: UInt32 = 1
        public static let server: UInt32 = 2
        public static let info: UInt32 = 3
        public static let errUnsupported: UInt32 = 0x8000_0001
        public static let errPolicy: UInt32 = 0x8000_0002
        public static let errInvalid: UInt32 = 0x8000_0003
        public static let errUnknown: UInt32 = 0x8000_0006
    }

    /// Information types in NBD_REP_INFO.
    public enum Info {
        public static let export: UInt16 = 0
        public static let name: UInt16 = 1
        public static let description: UInt16 = 2
        public static let blockSize: UInt16 = 3
    }

    /// Transmission flags.
    public enum TransmissionFlag {
        public static let hasFlags: UInt16 = 1 << 0
        public static let readOnly: UInt16 = 1 << 1
        public static let sendFlush: UInt16 = 1 << 2
        public static let sendFUA: UInt16 = 1 << 3
        public static let sendTrim: UInt16 = 1 << 5
        public static let sendWriteZeroes: UInt16 = 1 << 6
        public static let canMultiConn: UInt16 = 1 << 8
        public static let sendCache: UInt16 = 1 << 10
    }

    /// Commands.
    public enum Command {
        public static let read: UInt16 = 0
        public static let write: UInt16 = 1
        public static let disconnect: UInt16 = 2
        public static let flush: UInt16 = 3
        public static let trim: UInt16 = 4
        public static let cache: UInt16 = 5
        public static let writeZeroes: UInt16 = 6
    }

    /// Command flags.
    public enum CommandFlag {
        public static let fua: UInt16 = 1 << 0
        public static let noHole: UInt16 = 1 << 1
    }

    /// Error values in replies.
    public enum Errno {
        public static let perm: UInt32 = 1
        public static let io: UInt32 = 5
        public static let noMemory: UInt32 = 12
        public static let invalid: UInt32 = 22
        public static let noSpace: UInt32 = 28
        public static let overflow: UInt32 = 75
        public static let notSupported: UInt32 = 95
        public static let shutdown: UInt32 = 108
    }

    /// The size of a transmission request header.
    public static let requestLength = 28
    /// The size of a simple reply header.
    public static let simpleReplyLength = 16
    /// The longest export name or option payload accepted.
    public static let maxOptionLength = 4096
    /// The largest READ or WRITE a server accepts (advertised as the maximum block size).
    public static let maxPayload: UInt32 = 32 << 20
}

extension Array where Element == UInt8 {
    /// Appends `value` in network byte order (NBD is big-endian throughout).
    mutating func appendBE<T: FixedWidthInteger>(_ value: T) {
        Swift.withUnsafeBytes(of: value.bigEndian) { append(contentsOf: $0) }
    }

}

extension RandomAccessCollection where Element == UInt8, Index == Int {
    /// The big-endian integer at index `offset` (of bytes received or buffered); the caller has checked
    /// that `offset + size` bytes are there.
    func loadBE<T: FixedWidthInteger>(at offset: Int, as: T.Type = T.self) -> T {
        var value: T = 0
        for i in 0..<MemoryLayout<T>.size { value = value << 8 | T(self[offset + i]) }
        return value
    }
}

/// Port I/O and MMIO dispatch: which device answers an access the guest made.
public final class IOBus: @unchecked Sendable {
    /// A device on the bus: `read` fills `data`, `write` consumes it; the offset is from the range start.
    public struct Handler {
        public var read: (_ offset: UInt64, _ data: UnsafeMutableRawBufferPointer) -> Void
        public var write: (_ offset: UInt64, _ data: UnsafeRawBufferPointer) -> Void
        public init(read: @escaping (UInt64, UnsafeMutableRawBufferPointer) -> Void,
                    write: @escaping (UInt64, UnsafeRawBufferPointer) -> Void) {
            self.read = read
            self.write = write
        }
    }

    private var ranges: [(start: UInt64, size: UInt64, name: String, handler: Handler)] = []
    /// Accesses no device claimed; reads of them return all ones.
    public private(set) var unclaimedAccesses = 0

    public init() {}

    public func register(start: UInt64, size: UInt64, name: String, handler: Handler) throws {
        for r in ranges where start < r.start + r.size && r.start < start + size {
            throw MachineError.layout("\(name) at 0x\(String(start, radix: 16)) overlaps \(r.name)")
        }
        ranges.append((start, size, name, handler))
        ranges.sort { $0.start < $1.start }
    }

    private func find(_ address: UInt64) -> (start: UInt64, handler: Handler)? {
        for r in ranges where address >= r.start && address - r.start < r.size { return (r.start, r.handler) }
        return nil
    }

    public func read(_ address: UInt64, _ data: UnsafeMutableRawBufferPointer) {
        if let (start, handler) = find(address) {
            handler.read(address - start, data)
        } else {
            unclaimedAccesses &+= 1
            data.initializeMemory(as: UInt8.self, repeating: 0xff)
        }
    }

    public func write(_ address: UInt64, _ data: UnsafeRawBufferPointer) {
        if let (start, handler) = find(address) {
            handler.write(address - start, data)
        } else {
            unclaimedAccesses &+= 1
        }
    }
}

import GodwitSystem

/// A 16550A UART (the PC's COM1 at 0x3f8, IRQ 4): transmit to a sink, receive from the console, interrupts.
///
/// Input is buffered up to `inputCapacity` bytes; the console thread waits when it is full, so a
/// fast sender cannot grow the VMM's memory.
public final class Serial: @unchecked Sendable {
    public static let com1Port: UInt16 = 0x3f8
    public static let com1IRQ: UInt32 = 4
    public let inputCapacity = 4096

    private let lock = Lock()
    private let output: ([UInt8]) -> Void
    private let setInterrupt: (Bool) -> Void

    // Registers.
    private var ier: UInt8 = 0
    private var lcr: UInt8 = 0x03
    private var mcr: UInt8 = 0x08
    private var lsrExtra: UInt8 = 0
    private var msr: UInt8 = 0xb0        // DCD, DSR, CTS
    private var scr: UInt8 = 0
    private var dll: UInt8 = 0x0c
    private var dlm: UInt8 = 0
    private var fifoEnabled = false
    private var thrEmptyPending = false
    private var input: [UInt8] = []
    private var inputHead = 0
    private var interruptLevel = false

    /// `output` receives transmitted bytes; `setInterrupt` drives the IRQ line.
    public init(output: @escaping ([UInt8]) -> Void, setInterrupt: @escaping (Bool) -> Void) {
        self.output = output
        self.setInterrupt = setInterrupt
    }

    private var dlab: Bool { lcr & 0x80 != 0 }
    private var loopback: Bool { mcr & 0x10 != 0 }
    private var inputCount: Int { input.count - inputHead }

    /// Queues bytes typed on the console; returns how many fitted.
    @discardableResult
    public func receive(_ bytes: [UInt8]) -> Int {
        lock.withLock {
            let room = max(0, inputCapacity - inputCount)
            let taken = bytes.prefix(room)
            if inputHead > 0 && inputHead == input.count { input.removeAll(keepingCapacity: true); inputHead = 0 }
            input.append(contentsOf: taken)
            updateInterrupt()
            return taken.count
        }
    }

    /// Queues all of `bytes`, or none when they do not fit; returns the room there was.
    public func receiveAll(_ bytes: [UInt8]) -> (taken: Bool, room: Int) {
        lock.withLock {
            let room = max(0, inputCapacity - inputCount)
            guard bytes.count <= room else { return (false, room) }
            if inputHead > 0 && inputHead == input.count { input.removeAll(keepingCapacity: true); inputHead = 0 }
            input.append(contentsOf: bytes)
            updateInterrupt()
            return (true, room)
        }
    }

    /// True when the guest has room for more input.
    public var canReceive: Bool { lock.withLock { inputCount < inputCapacity } }

    public func read(offset: UInt16) -> UInt8 {
        lock.withLock {
            switch offset {
            case 0:
                if dlab { return dll }
                guard inputCount > 0 else { return 0 }
                let byte = input[inputHead]
                inputHead += 1
                if inputHead == input.count { input.removeAll(keepingCapacity: true); inputHead = 0 }
                updateInterrupt()
                return byte
            case 1: return dlab ? dlm : ier
            case 2:
                let iir = interruptIdentification()
                if iir & 0x0f == 0x02 { thrEmptyPending = false; updateInterrupt() }
                return iir | (fifoEnabled ? 0xc0 : 0)
            case 3: return lcr
            case 4: return mcr
            case 5:
                let value = 0x60 | (inputCount > 0 ? 0x01 : 0) | lsrExtra  // THR and transmitter always empty
                lsrExtra = 0
                return value
            case 6:
                if loopback {
                    // Loopback: outputs feed inputs (RTS→CTS, DTR→DSR, OUT1→RI, OUT2→DCD).
                    return (mcr & 0x02) << 3 | (mcr & 0x01) << 5 | (mcr & 0x04) << 4 | (mcr & 0x08) << 4
                }
                return msr
            case 7: return scr
            default: return 0xff
            }
        }
    }

    public func write(offset: UInt16, value: UInt8) {
        var transmitted: UInt8?
        lock.withLock {
            switch offset {
            case 0:
                if dlab { dll = value; return }
                if loopback {
                    if inputCount < inputCapacity { input.append(value) } else { lsrExtra |= 0x02 }  // overrun
                } else {
                    transmitted = value
                }
                thrEmptyPending = true
            case 1:
                if dlab { dlm = value; return }
                let enablingTHRE = value & 0x02 != 0 && ier & 0x02 == 0
                ier = value & 0x0f
                if enablingTHRE { thrEmptyPending = true }
            case 2:
                fifoEnabled = value & 0x01 != 0
                if value & 0x02 != 0 { input.removeAll(keepingCapacity: true); inputHead = 0 }
            case 3: lcr = value
            case 4: mcr = value & 0x1f
            case 7: scr = value
            default: break
            }
            updateInterrupt()
        }
        if let transmitted { output([transmitted]) }
    }

    private func interruptIdentification() -> UInt8 {
        if ier & 0x04 != 0 && lsrExtra != 0 { return 0x06 }
        if ier & 0x01 != 0 && inputCount > 0 { return 0x04 }
        if ier & 0x02 != 0 && thrEmptyPending { return 0x02 }
        return 0x01
    }

    private func updateInterrupt() {
        // OUT2 gates the interrupt on PCs; loopback mode suppresses it.
        let level = interruptIdentification() != 0x01 && mcr & 0x08 != 0 && !loopback
        if level != interruptLevel {
            interruptLevel = level
            setInterrupt(level)
        }
    }

    // MARK: Migration

    /// The UART's registers and unread input.
    public var state: SerialState {
        lock.withLock {
            SerialState(ier: ier, lcr: lcr, mcr: mcr, lsrExtra: lsrExtra, msr: msr, scr: scr, dll: dll, dlm: dlm,
                        fifoEnabled: fifoEnabled, thrEmptyPending: thrEmptyPending, input: Array(input[inputHead...]),
                        interruptLevel: interruptLevel)
        }
    }

    /// Restores saved registers (input beyond the buffer's capacity is dropped).
    public func restore(_ state: SerialState) {
        lock.withLock {
            ier = state.ier; lcr = state.lcr; mcr = state.mcr; lsrExtra = state.lsrExtra; msr = state.msr
            scr = state.scr; dll = state.dll; dlm = state.dlm; fifoEnabled = state.fifoEnabled
            thrEmptyPending = state.thrEmptyPending
            input = Array(state.input.prefix(inputCapacity))
            inputHead = 0
            interruptLevel = state.interruptLevel
        }
    }
}

/// A 16550A's saved registers.
public struct SerialState: Codable, Equatable, Sendable {
    public var ier, lcr, mcr, lsrExtra, msr, scr, dll, dlm: UInt8
    public var fifoEnabled: Bool
    public var thrEmptyPending: Bool
    public var input: [UInt8]
    public var interruptLevel: Bool
}

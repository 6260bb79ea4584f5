import GodwitSystem

/// The PC keyboard controller (i8042) at ports 0x60/0x64, as microVMs keep it: a reset line for the
/// guest (command 0xfe) and a Ctrl-Alt-Del the host can send (scancodes on IRQ 1), as in Firecracker.
public final class I8042: @unchecked Sendable {
    public static let dataPort: UInt16 = 0x60
    public static let commandPort: UInt16 = 0x64
    public static let irq: UInt32 = 1

    static let statusOutputFull: UInt8 = 0x01
    static let statusSystemFlag: UInt8 = 0x04
    static let statusCommandData: UInt8 = 0x08
    static let statusKeyboardUnlocked: UInt8 = 0x10
    /// Command-byte bit: keyboard interrupt enabled.
    static let commandKeyboardInterrupt: UInt8 = 0x01
    /// Set-2 scancodes for Ctrl, Alt, Delete pressed (what Firecracker sends).
    static let ctrlAltDel: [UInt8] = [0x14, 0x11, 0xe0, 0x71]
    static let bufferLimit = 16

    private let lock = Lock()
    private var buffer: [UInt8] = []
    private var commandByte: UInt8 = 0x45
    private var pendingCommand: UInt8?
    private var status: UInt8 = I8042.statusSystemFlag | I8042.statusKeyboardUnlocked
    private let onReset: () -> Void
    private let pulseInterrupt: () -> Void

    public init(onReset: @escaping () -> Void, pulseInterrupt: @escaping () -> Void) {
        self.onReset = onReset
        self.pulseInterrupt = pulseInterrupt
    }

    /// Queues Ctrl-Alt-Del and interrupts the guest (if its keyboard interrupt is on).
    public func sendCtrlAltDel() {
        let interrupt: Bool = lock.withLock {
            for code in I8042.ctrlAltDel where buffer.count < I8042.bufferLimit { buffer.append(code) }
            return commandByte & I8042.commandKeyboardInterrupt != 0
        }
        if interrupt { pulseInterrupt() }
    }

    public func read(port: UInt16) -> UInt8 {
        lock.withLock {
            switch port {
            case I8042.commandPort:
                return status | (buffer.isEmpty ? 0 : I8042.statusOutputFull)
            default:
                return buffer.isEmpty ? 0 : buffer.removeFirst()
            }
        }
    }

    public func write(port: UInt16, value: UInt8) {
        var reset = false
        lock.withLock {
            if port == I8042.commandPort {
                status |= I8042.statusCommandData
                switch value {
                case 0x20: push(commandByte)             // read command byte
                case 0x60, 0xd1, 0xd2: pendingCommand = value  // the next data byte belongs to it
                case 0xaa: push(0x55)                    // self test passed
                case 0xab: push(0x00)                    // keyboard interface test passed
                case 0xad: commandByte |= 0x10           // keyboard disabled
                case 0xae: commandByte &= ~0x10          // keyboard enabled
                case 0xfe: reset = true                  // pulse the CPU reset line
                default: break
                }
            } else {
                status &= ~I8042.statusCommandData
                switch pendingCommand {
                case 0x60: commandByte = value
                case 0xd2: push(value)                   // write keyboard output buffer
                default: push(0xfa)                      // a keyboard command: ACK
                }
                pendingCommand = nil
            }
        }
        if reset { onReset() }
    }

    private func push(_ byte: UInt8) {
        if buffer.count < I8042.bufferLimit { buffer.append(byte) }
    }
}

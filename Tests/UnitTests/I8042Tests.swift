@testable import Machine
import Testing

@Suite("i8042 keyboard controller")
struct I8042Tests {
    final class Probe: @unchecked Sendable { var resets = 0; var interrupts = 0 }

    func make() -> (I8042, Probe) {
        let probe = Probe()
        return (I8042(onReset: { probe.resets += 1 }, pulseInterrupt: { probe.interrupts += 1 }), probe)
    }

    @Test func resetCommand() {
        let (kbd, probe) = make()
        kbd.write(port: 0x64, value: 0xfe)
        #expect(probe.resets == 1)
    }

    @Test func ctrlAltDelQueuesScancodesAndInterrupts() {
        let (kbd, probe) = make()
        #expect(kbd.read(port: 0x64) & 1 == 0)
        kbd.sendCtrlAltDel()
        #expect(probe.interrupts == 1)
        var codes: [UInt8] = []
        while kbd.read(port: 0x64) & 1 != 0 { codes.append(kbd.read(port: 0x60)) }
        #expect(codes == I8042.ctrlAltDel)
    }

    @Test func noInterruptWhenTheGuestTurnedItOff() {
        let (kbd, probe) = make()
        kbd.write(port: 0x64, value: 0x60)   // write command byte
        kbd.write(port: 0x60, value: 0x44)   // keyboard interrupt off
        kbd.write(port: 0x64, value: 0x20)   // read it back
        #expect(kbd.read(port: 0x60) == 0x44)
        kbd.sendCtrlAltDel()
        #expect(probe.interrupts == 0)
        #expect(kbd.read(port: 0x64) & 1 == 1, "the scancodes still wait in the buffer")
    }

    @Test func bufferIsBounded() {
        let (kbd, _) = make()
        for _ in 0..<100 { kbd.sendCtrlAltDel() }
        var n = 0
        while kbd.read(port: 0x64) & 1 != 0 { _ = kbd.read(port: 0x60); n += 1 }
        #expect(n == I8042.bufferLimit)
    }
}

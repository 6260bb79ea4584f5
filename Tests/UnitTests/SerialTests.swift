@testable import Machine
import Testing

final class SerialProbe: @unchecked Sendable {
    var output: [UInt8] = []
    var levels: [Bool] = []
}

@Suite("16550A UART")
struct SerialTests {
    func make() -> (Serial, SerialProbe) {
        let probe = SerialProbe()
        let serial = Serial(output: { probe.output += $0 }, setInterrupt: { probe.levels.append($0) })
        return (serial, probe)
    }

    @Test func transmitsAndReportsAnEmptyTransmitter() {
        let (serial, probe) = make()
        for b in "hi".utf8 { serial.write(offset: 0, value: b) }
        #expect(probe.output == Array("hi".utf8))
        #expect(serial.read(offset: 5) & 0x60 == 0x60)
    }

    @Test func receivesWithAnInterrupt() {
        let (serial, probe) = make()
        serial.write(offset: 4, value: 0x08)      // OUT2
        serial.write(offset: 1, value: 0x01)      // IER: received data available
        #expect(serial.read(offset: 5) & 1 == 0)
        serial.receive(Array("ab".utf8))
        #expect(probe.levels.last == true)
        #expect(serial.read(offset: 2) & 0x0f == 0x04)
        #expect(serial.read(offset: 5) & 1 == 1)
        #expect(serial.read(offset: 0) == UInt8(ascii: "a"))
        #expect(serial.read(offset: 0) == UInt8(ascii: "b"))
        #expect(probe.levels.last == false)
        #expect(serial.read(offset: 2) & 0x0f == 0x01)
    }

    @Test func divisorLatchAndLoopback() {
        let (serial, probe) = make()
        serial.write(offset: 3, value: 0x80)
        serial.write(offset: 0, value: 0x01)
        serial.write(offset: 1, value: 0x00)
        #expect(serial.read(offset: 0) == 0x01)
        serial.write(offset: 3, value: 0x03)
        serial.write(offset: 4, value: 0x10)      // loopback
        serial.write(offset: 0, value: 0x5a)
        #expect(probe.output.isEmpty)
        #expect(serial.read(offset: 0) == 0x5a)
    }

    @Test func inputIsBounded() {
        let (serial, _) = make()
        let taken = serial.receive([UInt8](repeating: 1, count: serial.inputCapacity + 100))
        #expect(taken == serial.inputCapacity)
        #expect(!serial.canReceive)
        #expect(serial.receive([1]) == 0)
    }
}

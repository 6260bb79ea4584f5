import GodwitSystem
import GuestMemory
import KVM
import Virtio

/// A virtio device placed on the guest's MMIO bus: its register window, its IRQ, and its command-line entry.
public final class VirtioMMIODevice: @unchecked Sendable {
    public let device: VirtioDevice
    public let transport: VirtioMmioTransport
    public let address: UInt64
    public let irq: UInt32

    /// Signalled to raise the device's interrupt (a KVM irqfd on `irq`): one write, from any thread.
    let interruptFD: EventFD

    init(device: VirtioDevice, memory: GuestMemory, vm: VirtualMachine, address: UInt64, irq: UInt32) throws {
        self.device = device
        self.address = address
        self.irq = irq
        // The interrupt is an edge on the IOAPIC pin (ISA-style, as the MP table declares it); an irqfd
        // pulses the line in the kernel, as an I/O domain will.
        let fd = try EventFD()
        try vm.registerIRQFD(fd, gsi: irq)
        interruptFD = fd
        transport = VirtioMmioTransport(device: device, memory: memory,
                                        interruptLine: ClosureInterruptLine(raise: { try? fd.signal() }))
    }

    /// `virtio_mmio.device=4K@0xADDR:IRQ`, as Linux's CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES parses it.
    public var commandLineEntry: String {
        "virtio_mmio.device=4K@0x\(String(address, radix: 16)):\(irq)"
    }
}

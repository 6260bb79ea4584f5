import API
import Agent
import Foundation
import GodwitSystem
import GuestMemory
import Machine
import Migration
import NBD
import VhostUser
import Virtio
#if canImport(Glibc)
import Glibc
#endif

/// One fuzz target per parser or state machine that takes outside bytes. Each checks what a user
/// relies on (no access outside guest RAM or the disk, a clear error for bad input), not only that
/// nothing traps.
enum FuzzTarget: String, CaseIterable {
    case descriptorChain = "descriptor-chain"
    case mmioBlock = "mmio-blk"
    case mmioNet = "mmio-net"
    case vhostUser = "vhost-user"
    case nbdServer = "nbd-server"
    case migrationStream = "migration-stream"
    case elf
    case bzImage = "bzimage"
    case apiBody = "api-body"
    case http
    case configFile = "config-file"
    case agentPeer = "agent-peer"

    func run(_ data: [UInt8]) {
        switch self {
        case .descriptorChain: fuzzDescriptorChain(data)
        case .mmioBlock: fuzzMMIOBlock(data)
        case .mmioNet: fuzzMMIONet(data)
        case .vhostUser: fuzzVhostUser(data)
        case .nbdServer: fuzzNBDServer(data)
        case .migrationStream: fuzzMigrationStream(data)
        case .elf: fuzzELF(data)
        case .bzImage: fuzzBzImage(data)
        case .apiBody: fuzzAPIBody(data)
        case .http: fuzzHTTP(data)
        case .configFile: _ = try? VMConfigFile.parse(data)
        case .agentPeer: fuzzAgentPeer(data)
        }
    }
}

/// Guest RAM for the virtio targets: 64 KiB, filled from the input.
let guestBytes = 1 << 16

func makeMemory(_ input: inout FuzzInput) -> GuestMemory {
    // The input's image goes first; the rest of RAM stays zero.
    let memory = try! GuestMemory.anonymous(layout: [(0, UInt64(guestBytes))])
    let image = input.take(Int(input.u16()))
    if !image.isEmpty { try! memory.writeBytes(image, at: 0) }
    return memory
}

// MARK: Virtio

func fuzzDescriptorChain(_ data: [UInt8]) {
    var input = FuzzInput(data)
    let size = UInt16(1) << UInt16(input.u8() % 16)
    let table = UInt64(input.u32())
    let head = input.u16()
    let indirect = input.bool()
    let maxBytes = UInt64(input.u32())
    let memory = makeMemory(&input)
    guard let chain = try? DescriptorChain.parse(memory: memory, descriptorTable: table, queueSize: size, head: head,
                                                 indirectAllowed: indirect, maxBytes: maxBytes) else { return }
    var total: UInt64 = 0
    for segment in chain.readable + chain.writable {
        invariant(memory.contains(segment.address, length: UInt64(segment.length)), "segment \(segment) outside guest RAM")
        total += UInt64(segment.length)
    }
    invariant(total <= maxBytes, "chain of \(total) bytes over the limit \(maxBytes)")
}

/// A disk in memory that checks every access against its capacity.
final class MemoryDisk: BlockBackend, @unchecked Sendable {
    let capacity: UInt64 = 64 << 10
    let readOnly: Bool
    let blockSize: UInt32 = 512
    let supportsDiscard = true
    let supportsWriteZeroes = true
    var bytes = [UInt8](repeating: 0, count: 64 << 10)

    init(readOnly: Bool) { self.readOnly = readOnly }

    func check(_ offset: UInt64, _ length: Int) {
        invariant(offset <= capacity && UInt64(length) <= capacity - offset, "disk access at \(offset) of \(length) bytes past \(capacity)")
    }
    func read(at offset: UInt64, into buffers: [UnsafeMutableRawBufferPointer]) throws {
        var at = offset
        for buffer in buffers {
            check(at, buffer.count)
            // In bounds: check() just proved at + count <= capacity == bytes.count.
            bytes.withUnsafeBytes { buffer.copyMemory(from: UnsafeRawBufferPointer(rebasing: $0[Int(at)..<Int(at) + buffer.count])) }
            at += UInt64(buffer.count)
        }
    }
    func write(at offset: UInt64, from buffers: [UnsafeRawBufferPointer]) throws {
        invariant(!readOnly, "a write reached a read-only disk")
        var at = offset
        for buffer in buffers {
            check(at, buffer.count)
            // In bounds: as in read.
            bytes.withUnsafeMutableBytes { UnsafeMutableRawBufferPointer(rebasing: $0[Int(at)..<Int(at) + buffer.count]).copyMemory(from: buffer) }
            at += UInt64(buffer.count)
        }
    }
    func flush() throws {}
    func discard(at offset: UInt64, length: UInt64) throws { check(offset, Int(clamping: length)) }
    func writeZeroes(at offset: UInt64, length: UInt64, mayUnmap: Bool) throws { check(offset, Int(clamping: length)) }
}

final class NullLine: InterruptLine {
    func raise() {}
    func lower() {}
}

/// A virtio-blk device behind its MMIO register window: the input is guest RAM and then a script of
/// register reads and writes (the driver's side), QueueNotify included, so requests built from fuzzed
/// descriptors reach the device.
func fuzzMMIOBlock(_ data: [UInt8]) {
    var input = FuzzInput(data)
    let disk = MemoryDisk(readOnly: input.bool())
    let memory = makeMemory(&input)
    let device = BlockDevice(backend: disk, serial: "fuzz")
    let transport = VirtioMmioTransport(device: device, memory: memory, interruptLine: NullLine())
    for _ in 0..<512 where !input.isAtEnd {
        let op = input.u8()
        let offset = UInt64(input.u16() & 0x1ff)
        if op & 1 == 1 {
            transport.writeRegister(offset, input.u32())
        } else {
            _ = transport.readRegister(offset)
        }
    }
    transport.writeRegister(VirtioMmioTransport.Register.status, 0)  // reset: the device lets go of the queues
}

/// A network backend in memory: frames to receive come from the input; sent frames are checked.
final class MemoryNet: NetBackend, @unchecked Sendable {
    var pending: [[UInt8]] = []
    var sentBytes = 0
    let supportedOffloadFeatures: UInt64 = 0
    let pollDescriptor: Int32? = nil

    func receive(into buffer: UnsafeMutableRawBufferPointer) throws -> Int? {
        guard !pending.isEmpty else { return nil }
        let frame = pending.removeFirst()
        let n = min(frame.count, buffer.count)
        // In bounds: n <= buffer.count and n <= frame.count.
        frame.withUnsafeBytes { buffer.copyMemory(from: UnsafeRawBufferPointer(rebasing: $0[0..<n])) }
        return n
    }
    func send(_ pieces: [UnsafeRawBufferPointer]) throws -> Bool {
        let total = pieces.reduce(0) { $0 + $1.count }
        invariant(total <= 1 << 17, "a frame of \(total) bytes reached the backend")
        sentBytes += total
        return true
    }
    func configureOffloads(negotiatedFeatures: UInt64) throws {}
}

/// A virtio-net device behind its MMIO window: guest RAM from the input, then a script of register
/// accesses and deliveries of received frames (also from the input) into the guest's buffers.
func fuzzMMIONet(_ data: [UInt8]) {
    var input = FuzzInput(data)
    let backend = MemoryNet()
    let memory = makeMemory(&input)
    let device = NetDevice(backend: backend, mac: MACAddress("52:54:00:12:34:56")!)
    let transport = VirtioMmioTransport(device: device, memory: memory, interruptLine: NullLine())
    for _ in 0..<512 where !input.isAtEnd {
        let op = input.u8()
        switch op % 4 {
        case 0: _ = transport.readRegister(UInt64(input.u16() & 0x1ff))
        case 1, 2: transport.writeRegister(UInt64(input.u16() & 0x1ff), input.u32())
        default:
            backend.pending.append(input.take(Int(input.u16() % 2048)))
            _ = device.receive()
        }
    }
    transport.writeRegister(VirtioMmioTransport.Register.status, 0)
}

// MARK: vhost-user

func fuzzVhostUser(_ data: [UInt8]) {
    var input = FuzzInput(data)
    let direction: VhostUserDirection = input.bool() ? .reply : .request
    let count = Int(input.u8() % 9)
    var raw: [Int32] = []
    var descriptors: [FileDescriptor] = []
    for _ in 0..<count {
        guard let event = try? EventFD() else { break }
        // The decoder takes ownership: hand it a duplicate it may close.
        let copy = dup(event.descriptor.rawValue)
        guard copy >= 0 else { continue }
        raw.append(copy)
        descriptors.append(FileDescriptor(owning: copy))
    }
    let message = input.rest()
    do {
        _ = try VhostUserCodec.decode(message, fileDescriptors: descriptors, direction: direction)
    } catch {
        for fd in raw { invariant(fcntl(fd, F_GETFD) == -1, "descriptor \(fd) left open after a refused message: \(error)") }
    }
}

// MARK: NBD

func fuzzNBDServer(_ data: [UInt8]) {
    var pair: [Int32] = [0, 0]
    guard socketpair(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0, &pair) == 0 else { return }
    let memfd = try! MemFD.create(name: "fuzz-nbd", size: 1 << 20)
    let storage = try! NBDFileStorage(file: memfd, readOnly: false)
    let server = NBDServer(exports: ["disk": storage, "": storage])
    let client = pair[1]
    // The client's side: send the input, then drain every reply until the server hangs up.
    let done = DispatchSemaphore(value: 0)
    detachThread(name: "fuzz-client") {
        data.withUnsafeBytes { bytes in
            var sent = 0
            while sent < bytes.count {
                let n = send(client, bytes.baseAddress! + sent, bytes.count - sent, Int32(MSG_NOSIGNAL))
                if n <= 0 { break }
                sent += n
            }
        }
        shutdown(client, Int32(SHUT_WR))
        var sink = [UInt8](repeating: 0, count: 65536)
        while recv(client, &sink, sink.count, 0) > 0 {}
        close(client)
        done.signal()
    }
    _ = server.serve(connection: FileDescriptor(owning: pair[0]))
    done.wait()
    invariant((try? memfd.size()) == 1 << 20, "the export changed size")
}

// MARK: Migration

/// First byte 0: the input is a snapshot file (header, sections, tags). Otherwise the byte picks a
/// section kind and the rest is its payload, as it arrives after the wire's tag check: the parsers
/// behind an authenticated peer (a page number past RAM must be refused there too).
func fuzzMigrationStream(_ data: [UInt8]) {
    var input = FuzzInput(data)
    let mode = input.u8()
    let sections: [MigrationSection]
    if mode == 0 {
        guard let decoded = try? MigrationFile.decode(input.rest()) else { return }
        sections = decoded
    } else {
        guard let kind = MigrationSectionKind(rawValue: UInt32(mode % 10)) else { return }
        sections = [MigrationSection(kind: kind, payload: input.rest())]
    }
    let limit: UInt64 = 64
    for section in sections {
        switch section.kind {
        case .pages:
            try? section.forEachPage(pageLimit: limit) { number, bytes in
                invariant(number < limit, "page \(number) past the guest's \(limit)")
                invariant(bytes.count == 4096, "a page of \(bytes.count) bytes")
            }
        case .zeroPages:
            if let numbers = try? section.zeroPageNumbers(pageLimit: limit) {
                invariant(numbers.allSatisfy { $0 < limit }, "zero page past the guest's \(limit)")
            }
        case .state:
            _ = try? section.decodeJSON(MachineState.self)
        default:
            _ = try? section.decodeJSON([String: String].self)
        }
    }
}

// MARK: Kernels

func fuzzELF(_ data: [UInt8]) {
    guard let image = try? ElfImage.parse(data) else { return }
    for segment in image.segments {
        invariant(segment.fileOffset + segment.fileSize <= UInt64(data.count), "segment past the file")
        invariant(segment.fileSize <= segment.memorySize, "segment file size over its memory size")
    }
    let memory = try! GuestMemory.anonymous(layout: [(0, 4 << 20)])
    try? image.load(from: data, into: memory)
}

func fuzzBzImage(_ data: [UInt8]) {
    guard let image = try? BzImage.parse(data) else { return }
    invariant(image.kernelOffset + image.kernelSize == data.count, "kernel extent disagrees with the file")
    let memory = try! GuestMemory.anonymous(layout: [(0, 8 << 20)])
    try? LinuxBoot.load(image, from: data, into: memory)
    _ = try? LinuxBoot.writeBootParams(image, commandLineLength: 16, initrd: nil, memoryMap: Layout.memoryMap(for: [(0, 8 << 20)]),
                                       rsdp: Layout.acpiTables, into: memory)
}

// MARK: API and agent

func decodeAndValidate<T: Decodable>(_ type: T.Type, _ body: [UInt8], validate: (T) throws -> Void = { _ in }) {
    guard let value = try? decodeStrictly(type, from: body, what: "body") else { return }
    _ = try? validate(value)
}

func fuzzAPIBody(_ data: [UInt8]) {
    var input = FuzzInput(data)
    let which = input.u8() % 12
    let body = input.rest()
    switch which {
    case 0: decodeAndValidate(BootSource.self, body) { try $0.validate() }
    case 1: decodeAndValidate(MachineConfiguration.self, body) { try $0.validate() }
    case 2: decodeAndValidate(MachineConfigurationUpdate.self, body) { try $0.validate() }
    case 3: decodeAndValidate(Drive.self, body) { try $0.validate() }
    case 4: decodeAndValidate(PartialDrive.self, body) { try $0.validate() }
    case 5: decodeAndValidate(NetworkInterface.self, body) { try $0.validate() }
    case 6: decodeAndValidate(PartialNetworkInterface.self, body) { try $0.validate() }
    case 7: decodeAndValidate(SnapshotCreateParams.self, body) { try $0.validate() }
    case 8: decodeAndValidate(SnapshotLoadParams.self, body) { try $0.validate() }
    case 9: decodeAndValidate(MigrationSendParams.self, body) { try $0.validate() }
    case 10: decodeAndValidate(MigrationReceiveParams.self, body) { try $0.validate() }
    default: decodeAndValidate(FullVmConfiguration.self, body) { try $0.validate() }
    }
}

func fuzzHTTP(_ data: [UInt8]) {
    let parser = HTTPParser(maxHeadBytes: 8192, maxBodyBytes: 65536)
    for endOfInput in [false, true] {
        if case let .request(request, consumed) = parser.parse(data, endOfInput: endOfInput) {
            invariant(consumed > 0 && consumed <= data.count, "consumed \(consumed) of \(data.count) bytes")
            invariant(request.body.count <= 65536, "a body over the limit")
        }
    }
}

func fuzzAgentPeer(_ data: [UInt8]) {
    var input = FuzzInput(data)
    let which = input.u8() % 4
    let body = Data(input.rest())
    let decoder = JSONDecoder()
    switch which {
    case 0: if let spec = try? decoder.decode(VMSpec.self, from: body) { _ = try? spec.validate() }
    case 1: _ = try? decoder.decode(ReplicaRequest.self, from: body)
    case 2: _ = try? decoder.decode(IncomingRequest.self, from: body)
    default: _ = try? decoder.decode(AgentEvent.self, from: body)
    }
}

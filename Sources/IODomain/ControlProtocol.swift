import CGodwit
import Foundation
import GodwitSystem
import VhostUser
#if canImport(Glibc)
import Glibc
#endif

/// One request on an I/O domain's control socket (JSON), with the descriptors it carries.
///
/// The domain is sandboxed: it cannot create socket files or open devices, so a request that adds a
/// VM device brings what the device needs, made by the caller: a listening vhost-user socket (and for a
/// NIC, the TAP) passed with SCM_RIGHTS.
public struct ControlRequest: Codable, Equatable, Sendable {
    public enum Operation: String, Codable, Sendable {
        /// Lists the VM devices.
        case list
        /// A block device on a slice of the domain's `--blk`: descriptors [listening socket].
        case addBlock = "add-blk"
        /// A NIC: descriptors [listening socket, TAP].
        case addNet = "add-net"
        /// Stops serving the device on `socket` (the caller removes the socket file).
        case remove
        /// Switches a block device's route (`route`: local, remote or mirror).
        case route
        /// Attaches a replica to a block device: descriptors [a connected NBD socket]; `export` names
        /// the export, `resync` says the replica already holds the disk but for what the route remembered.
        case attachReplica = "attach-replica"
        /// Stops using a block device's replica.
        case detachReplica = "detach-replica"
        /// Brings a block device's out-of-sync replica back in sync.
        case resync
        /// The events of every device (or of `socket`), oldest first.
        case events
    }

    public var op: Operation
    /// The vhost-user socket path: the device's name.
    public var socket: String?
    public var offset: UInt64?
    public var size: UInt64?
    public var readonly: Bool?
    public var mac: String?
    public var route: DeviceRoute?
    public var export: String?
    public var resync: Bool?
    /// A block device's local time-out in milliseconds (add-blk): no answer within it counts as a failure.
    public var faultTimeoutMs: Int?

    public init(op: Operation, socket: String? = nil, offset: UInt64? = nil, size: UInt64? = nil, readonly: Bool? = nil, mac: String? = nil,
                route: DeviceRoute? = nil, export: String? = nil, resync: Bool? = nil, faultTimeoutMs: Int? = nil) {
        self.op = op
        self.socket = socket
        self.offset = offset
        self.size = size
        self.readonly = readonly
        self.mac = mac
        self.route = route
        self.export = export
        self.resync = resync
        self.faultTimeoutMs = faultTimeoutMs
    }
}

/// One route event of one device, as `events` reports it.
public struct ControlEvent: Codable, Equatable, Sendable {
    public var socket: String
    /// Seconds since the domain started (monotonic).
    public var time: Double
    public var event: RouteEvent
}

/// One VM device as `list` reports it.
public struct ControlDevice: Codable, Equatable, Sendable {
    public var socket: String
    /// "blk" or "net".
    public var kind: String
    public var offset: UInt64?
    public var size: UInt64?
    public var readonly: Bool?
    public var mac: String?
    /// Connections being served (0 or 1 per VMM attached).
    public var connections: Int
    /// Connections that ended, with their errors (the last few).
    public var closedWithError: Int
    /// A block device's route, replica and sync state.
    public var route: RouteStatus?
}

/// The answer to a `ControlRequest`.
public struct ControlResponse: Codable, Equatable, Sendable {
    public var ok: Bool
    public var error: String?
    public var devices: [ControlDevice]?
    public var events: [ControlEvent]?

    public init(ok: Bool, error: String? = nil, devices: [ControlDevice]? = nil, events: [ControlEvent]? = nil) {
        self.ok = ok
        self.error = error
        self.devices = devices
        self.events = events
    }
}

/// Errors of the I/O domain module.
public enum IODomainError: Error, CustomStringConvertible, Equatable {
    case badRequest(String)
    case protocolError(String)
    case system(String)

    public var description: String {
        switch self {
        case let .badRequest(reason): return "bad request: \(reason)"
        case let .protocolError(reason): return "control protocol: \(reason)"
        case let .system(reason): return reason
        }
    }
}

/// Framing on the control socket: a 4-byte little-endian length, then that many bytes of JSON; the
/// descriptors ride on the first segment. At most `maxMessage` bytes and `maxDescriptors` descriptors.
public enum ControlFraming {
    public static let maxMessage = 64 * 1024
    public static let maxDescriptors = 4

    public static func send(_ socket: FileDescriptor, _ body: Data, descriptors: [Int32] = []) throws {
        guard body.count <= maxMessage, descriptors.count <= maxDescriptors else {
            throw IODomainError.protocolError("message of \(body.count) bytes with \(descriptors.count) descriptors is too large")
        }
        var frame = Data()
        var length = UInt32(body.count).littleEndian
        withUnsafeBytes(of: &length) { frame.append(contentsOf: $0) }
        frame.append(body)
        var sent = 0
        while sent < frame.count {
            let n = frame.withUnsafeBytes { raw -> Int in
                // In bounds: sent < frame.count.
                let rest = UnsafeRawBufferPointer(rebasing: raw[sent...])
                if sent == 0 {
                    return descriptors.withUnsafeBufferPointer {
                        godwit_send_fds(socket.rawValue, rest.baseAddress, rest.count, $0.baseAddress, Int32(descriptors.count))
                    }
                }
                return godwit_send_fds(socket.rawValue, rest.baseAddress, rest.count, nil, 0)
            }
            if n < 0 {
                if godwit_errno() == EINTR { continue }
                throw IODomainError.system("control socket send: \(String(cString: strerror(godwit_errno())))")
            }
            sent += n
        }
    }

    /// Receives one message; nil at end of stream before a message starts. Descriptors beyond
    /// `maxDescriptors` are closed and make the message an error.
    public static func receive(_ socket: FileDescriptor) throws -> (Data, [FileDescriptor])? {
        var descriptors: [FileDescriptor] = []
        var header = [UInt8](repeating: 0, count: 4)
        var got = 0
        while got < 4 {
            let n = try receiveSome(socket, into: &header, from: got, collecting: &descriptors)
            if n == 0 {
                if got == 0 && descriptors.isEmpty { return nil }
                throw IODomainError.protocolError("connection closed inside a message header")
            }
            got += n
        }
        let length = Int(UInt32(header[0]) | UInt32(header[1]) << 8 | UInt32(header[2]) << 16 | UInt32(header[3]) << 24)
        guard length <= maxMessage else { throw IODomainError.protocolError("message length \(length) is above \(maxMessage)") }
        var body = [UInt8](repeating: 0, count: length)
        got = 0
        while got < length {
            let n = try receiveSome(socket, into: &body, from: got, collecting: &descriptors)
            if n == 0 { throw IODomainError.protocolError("connection closed after \(got) of \(length) bytes") }
            got += n
        }
        return (Data(body), descriptors)
    }

    private static func receiveSome(_ socket: FileDescriptor, into buffer: inout [UInt8], from offset: Int,
                                    collecting descriptors: inout [FileDescriptor]) throws -> Int {
        var fds = [Int32](repeating: -1, count: maxDescriptors)
        var count: Int32 = 0
        var truncated: Int32 = 0
        while true {
            let n = buffer.withUnsafeMutableBytes { raw -> Int in
                // In bounds: offset < raw.count (callers loop while short).
                godwit_recv_fds(socket.rawValue, raw.baseAddress! + offset, raw.count - offset, &fds, Int32(maxDescriptors), &count, &truncated)
            }
            if n < 0 {
                if godwit_errno() == EINTR { continue }
                throw IODomainError.system("control socket receive: \(String(cString: strerror(godwit_errno())))")
            }
            for i in 0..<Int(count) { descriptors.append(FileDescriptor(owning: fds[i])) }
            if truncated != 0 || descriptors.count > maxDescriptors {
                throw IODomainError.protocolError("more than \(maxDescriptors) descriptors")
            }
            return n
        }
    }
}

/// A client of an I/O domain's control socket (`godwit ctl iodomain`, the host agent).
public final class ControlClient {
    private let socket: FileDescriptor

    /// Connects to the control socket at `path` (the Unix-socket code is VhostUser's).
    public init(path: String) throws {
        do { socket = try VhostUserChannel.connect(path: path).socket } catch {
            throw IODomainError.system("control socket \(path): \(error)")
        }
    }

    /// Sends `request` with `descriptors` and returns the answer; throws the domain's error when not ok.
    @discardableResult
    public func call(_ request: ControlRequest, descriptors: [FileDescriptor] = []) throws -> ControlResponse {
        try ControlFraming.send(socket, try JSONEncoder().encode(request), descriptors: descriptors.map(\.rawValue))
        guard let (body, _) = try ControlFraming.receive(socket) else {
            throw IODomainError.protocolError("the domain closed the connection without answering")
        }
        let response = try JSONDecoder().decode(ControlResponse.self, from: body)
        if !response.ok { throw IODomainError.badRequest(response.error ?? "refused") }
        return response
    }

    /// A listening Unix socket bound at `path`, to hand to the domain (which cannot bind in its sandbox).
    public static func listeningSocket(path: String) throws -> FileDescriptor {
        do { return try VhostUserListener(path: path).socket } catch {
            throw IODomainError.system("\(error)")
        }
    }
}

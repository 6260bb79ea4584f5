import Foundation
import GodwitSystem
import Testing
#if canImport(Glibc)
import Glibc
#endif

/// Collects an engine's completions for a test.
private final class Collector: AsyncIOHandler, @unchecked Sendable {
    private let condition = Condition()
    private var results: [UInt64: Int] = [:]
    private var batches = 0

    func asyncIOCompleted(tag: UInt64, result: Int) { condition.withLock { results[tag] = result; condition.broadcast() } }
    func asyncIOBatchEnded() { condition.withLock { batches += 1 } }

    /// The results once `count` arrived (at most 10 s, so a lost completion fails instead of hanging).
    func wait(for count: Int) -> [UInt64: Int] {
        let deadline = Date().addingTimeInterval(10)
        while true {
            let done: [UInt64: Int]? = condition.withLock { results.count >= count ? results : nil }
            if let done { return done }
            if Date() > deadline { return condition.withLock { results } }
            usleep(1000)
        }
    }
}

@Suite struct AsyncIOContextTests {
    /// Each engine reads and writes a plain (buffered) file: results are byte counts; a request on a
    /// descriptor that is not open is refused (native AIO: io_submit fails) or completes with -EBADF
    /// (io_uring), and the context goes on working.
    /// (Native AIO twice: completions read from its ring in user space, and with io_getevents.)
    @Test(arguments: [(AsyncIOContext.Engine.ioUring, true), (.linuxAIO, true), (.linuxAIO, false)])
    func readsWritesAndBadDescriptors(engine: AsyncIOContext.Engine, userSpace: Bool) throws {
        let context = try AsyncIOContext(depth: 8, engines: [engine], userSpaceReaping: userSpace)
        #expect(context.engine == engine)
        if engine == .linuxAIO { #expect(context.reapsInUserSpace == userSpace, "this kernel's AIO ring has the known layout") }
        let path = FileManager.default.temporaryDirectory.appendingPathComponent("godwit-aio-\(getpid())-\(engine.rawValue)-\(userSpace)").path
        let fd = open(path, O_RDWR | O_CREAT | O_TRUNC, 0o600)
        try #require(fd >= 0)
        defer { close(fd); unlink(path) }
        let source = UnsafeMutableRawBufferPointer.allocate(byteCount: 8192, alignment: 4096)
        let target = UnsafeMutableRawBufferPointer.allocate(byteCount: 8192, alignment: 4096)
        defer { source.deallocate(); target.deallocate() }
        for i in 0..<8192 { source[i] = UInt8(truncatingIfNeeded: i &* 7 &+ 3) }

        let writes = Collector()
        // One buffer and two buffers (the vectored form).
        let halves = [UnsafeMutableRawBufferPointer(rebasing: source[0..<4096]), UnsafeMutableRawBufferPointer(rebasing: source[4096..<8192])]
        #expect(context.submit([AsyncIORequest(fd: fd, isWrite: true, offset: 0, buffers: [source], tag: 1),
                                AsyncIORequest(fd: fd, isWrite: true, offset: 8192, buffers: halves, tag: 2)], handler: writes) == 2)
        let written = writes.wait(for: 2)
        #expect(written[1] == 8192 && written[2] == 8192)
        let bad = Collector()
        switch context.submit([AsyncIORequest(fd: 9999, isWrite: true, offset: 0, buffers: [source], tag: 3)], handler: bad) {
        case 0: #expect(engine == .linuxAIO)
        default: #expect(bad.wait(for: 1)[3] == -Int(EBADF))
        }

        let reads = Collector()
        #expect(context.submit([AsyncIORequest(fd: fd, isWrite: false, offset: 8192, buffers: [target], tag: 7)], handler: reads) == 1)
        #expect(reads.wait(for: 1)[7] == 8192)
        #expect(Array(target) == Array(source))
        #expect(context.inFlight == 0)

        context.close()
        context.close()  // twice is fine
        // Closed: refused, for the caller to do another way.
        #expect(context.submit([AsyncIORequest(fd: fd, isWrite: false, offset: 0, buffers: [target], tag: 8)], handler: reads) == 0)
    }

    /// More requests than the depth: the rest are refused, not queued.
    @Test(arguments: [(AsyncIOContext.Engine.ioUring, true), (.linuxAIO, true), (.linuxAIO, false)])
    func aFullContextRefusesTheRest(engine: AsyncIOContext.Engine, userSpace: Bool) throws {
        let context = try AsyncIOContext(depth: 2, engines: [engine], userSpaceReaping: userSpace)
        defer { context.close() }
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 512, alignment: 512)
        defer { buffer.deallocate() }
        let path = FileManager.default.temporaryDirectory.appendingPathComponent("godwit-aio-full-\(getpid())-\(engine.rawValue)-\(userSpace)").path
        let fd = open(path, O_RDWR | O_CREAT | O_TRUNC, 0o600)
        try #require(fd >= 0)
        defer { close(fd); unlink(path) }
        let handler = Collector()
        let requests = (0..<5).map { AsyncIORequest(fd: fd, isWrite: false, offset: 0, buffers: [buffer], tag: UInt64($0)) }
        let taken = context.submit(requests, handler: handler)
        #expect(taken >= 1 && taken <= 2)
        #expect(handler.wait(for: taken).count == taken)
    }

    @Test func noEngineIsAClearError() {
        #expect(throws: SystemError.self) { try AsyncIOContext(depth: 8, engines: []) }
        #expect(throws: SystemError.self) { try AsyncIOContext(depth: 0) }
    }
}

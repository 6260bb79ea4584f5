import CGodwit
#if canImport(Glibc)
import Glibc
#endif

/// Receives the completions of requests started on an `AsyncIOContext`, on its reaper thread.
///
/// For each batch of events the reaper calls `asyncIOCompleted` once per finished request of this
/// handler, then `asyncIOBatchEnded` once (so a device can send one interrupt per batch). Neither is
/// called with the context's lock held.
public protocol AsyncIOHandler: AnyObject {
    /// Request `tag` finished: `result` is the byte count transferred, or -errno.
    func asyncIOCompleted(tag: UInt64, result: Int)
    /// The end of a batch that had at least one of this handler's completions.
    func asyncIOBatchEnded()
}

/// One read or write for `AsyncIOContext.submit`: `buffers` in order, at `offset` of `fd`.
public struct AsyncIORequest {
    public var fd: Int32
    public var isWrite: Bool
    public var offset: UInt64
    public var buffers: [UnsafeMutableRawBufferPointer]
    /// Handed back to the handler with the result.
    public var tag: UInt64

    public init(fd: Int32, isWrite: Bool, offset: UInt64, buffers: [UnsafeMutableRawBufferPointer], tag: UInt64) {
        self.fd = fd
        self.isWrite = isWrite
        self.offset = offset
        self.buffers = buffers
        self.tag = tag
    }
}

/// An asynchronous I/O engine on the kernel's io_uring or, where that is refused, Linux native AIO
/// (io_setup/io_submit/io_getevents), with its own reaper thread: requests are submitted without
/// waiting and completed, in whatever order the kernel finishes them, by the reaper calling their
/// `AsyncIOHandler` (or by a thread that polls, `pollCompletions`).
///
/// Meant for O_DIRECT files (on buffered files native AIO does the I/O inside io_submit). At most
/// `depth` requests are in flight; `submit` refuses the rest, and the caller does them synchronously.
/// `close()` (or deinit) refuses new requests, waits for those in flight and destroys the context.
///
/// The io_uring ring is restricted (`godwit_uring_open`) to reads, writes and NOPs on descriptors the
/// process holds, so a sandboxed process's ring cannot open files or sockets behind seccomp's back;
/// after lock-down io_uring_setup is refused and a context made then uses native AIO.
public final class AsyncIOContext: @unchecked Sendable {
    /// Which kernel interface a context uses.
    public enum Engine: String, Sendable, CaseIterable {
        case ioUring = "io_uring"
        case linuxAIO = "aio"

        /// The order `init` tries them in by default: native AIO first. Measured on this project's 2-CPU
        /// machine through an I/O domain (4 KiB, the same boots alternating, medians of 3): io_uring
        /// against native AIO 0.96x at qd1 interrupt-driven reads, 1.08x at qd32 polled reads, 0.96x at
        /// qd32 interrupt-driven writes, 0.98x at qd32 polled writes: no gain worth a default change.
        /// (fio alone on the host does show one: 109k IOPS with io_uring against 75k with libaio.)
        public static let automatic: [Engine] = [.linuxAIO, .ioUring]
    }

    /// The kernel side of a context.
    private enum Kernel {
        case uring(OpaquePointer)
        /// `userRing`: completions are taken from the context's ring in user space (no io_getevents) and
        /// every iocb signals `wakeUp` (IOCB_FLAG_RESFD), which the reaper waits on.
        case aio(context: UInt64, iocbs: UnsafeMutableRawPointer, stopIOCB: UnsafeMutableRawPointer, userRing: Bool)
    }

    /// The reaper's largest batch of events.
    static let batch = 256
    /// The data value of the stop request (slot tags are below `depth`).
    static let stopToken = UInt64.max
    /// The reaper's native-AIO io_getevents time-out, after which it looks at `closing` (only matters
    /// when the kernel refused the stop poll request).
    static let idleTimeoutNanoseconds: Int64 = 1_000_000_000

    /// Requests per submission call. One: each request reaches the device queue on its own, as soon as
    /// it is submitted, as qemu-storage-daemon does it. Measured on this project's 2-CPU machine (a
    /// guest's 4 KiB random reads at queue depth 32 through an I/O domain, native AIO, the same run):
    /// one per call 70-84k IOPS, two or four per call 67k, the whole pass (~20) in one call 60-68k;
    /// handing the kernel a batch makes it plug and dispatch the batch together, and completions then
    /// come back in convoys that leave the device idle between them. The cost is a syscall per request.
    static let submitChunk = 1
    /// How many requests may be in flight.
    public let depth: Int
    /// The kernel interface in use.
    public let engine: Engine
    /// Whether native AIO completions are read from the ring in user space (false: io_getevents).
    public var reapsInUserSpace: Bool { if case .aio(_, _, _, true) = kernel { return true } else { return false } }
    private let kernel: Kernel
    /// Wakes the reaper: close() signals it; with native AIO's user-space ring, every completion too.
    private let wakeUp: EventFD

    private struct Slot {
        var handler: AsyncIOHandler?
        var tag: UInt64 = 0
        var iovecs: UnsafeMutablePointer<iovec>?
        var iovecCapacity = 0
    }

    private let lock = Condition()
    /// Serialises io_uring submissions (filling SQEs and io_uring_enter): one producer at a time.
    private let submitLock = Lock()
    /// Serialises user-space reaping (the head of io_uring's completion queue or of native AIO's ring):
    /// one consumer at a time.
    private let reapLock = Lock()
    private var slots: [Slot]
    private var freeSlots: [Int]
    private var closing = false
    private var reaper: pthread_t?
    /// Threads polling for completions (`beginPolling`): the reaper parks meanwhile, so that events
    /// do not wake it as well.
    private var pollers = 0

    /// Creates a context for `depth` requests in flight on the first of `engines` the kernel accepts,
    /// and starts its reaper thread. `userSpaceReaping` false makes native AIO take completions with
    /// io_getevents even where its ring could be read directly (what a ring of an unknown layout gets;
    /// for tests).
    public init(depth: Int = 512, engines: [Engine] = Engine.automatic, userSpaceReaping: Bool = true) throws(SystemError) {
        guard depth > 0, depth <= 32768 else { throw SystemError(operation: "io_setup", errno: EINVAL, context: "depth \(depth)") }
        var made: (Engine, Kernel)?
        var failure = SystemError(operation: "io_setup", errno: EINVAL, context: "no engine asked for")
        for engine in engines where made == nil {
            switch engine {
            case .ioUring:
                var ring: OpaquePointer?
                // One SQE more than slots, for the stop NOP.
                let rc = godwit_uring_open(UInt32(depth + 1), &ring)
                if rc == 0, let ring { made = (.ioUring, .uring(ring)) } else {
                    failure = SystemError(operation: "io_uring_setup", errno: -rc, context: "\(depth) entries")
                }
            case .linuxAIO:
                var context: UInt64 = 0
                let rc = godwit_io_setup(UInt32(depth), &context)
                if rc == 0 {
                    let iocbs = UnsafeMutableRawPointer.allocate(byteCount: GODWIT_IOCB_SIZE * depth, alignment: 16)
                    let stopIOCB = UnsafeMutableRawPointer.allocate(byteCount: GODWIT_IOCB_SIZE, alignment: 16)
                    made = (.linuxAIO, .aio(context: context, iocbs: iocbs, stopIOCB: stopIOCB,
                                            userRing: userSpaceReaping && godwit_aio_ring_usable(context) != 0))
                } else {
                    failure = SystemError(operation: "io_setup", errno: -rc, context: "\(depth) events")
                }
            }
        }
        guard let (engine, kernel) = made else { throw failure }
        self.depth = depth
        self.engine = engine
        self.kernel = kernel
        do {
            wakeUp = try EventFD()
        } catch {
            AsyncIOContext.release(kernel, destroyingAIO: true)
            throw error
        }
        slots = Array(repeating: Slot(), count: depth)
        freeSlots = Array((0..<depth).reversed())

        if case let .aio(context, _, stopIOCB, false) = kernel {
            // The stop request: a poll on `wakeUp` that completes when close() writes it, waking the reaper.
            godwit_iocb_prep_poll_in(stopIOCB, wakeUp.descriptor.rawValue, AsyncIOContext.stopToken)
            var one: UnsafeMutableRawPointer? = stopIOCB
            _ = godwit_io_submit(context, 1, &one)  // refused (old kernel): the reaper's time-out takes over
        }

        let box = Unmanaged.passRetained(self).toOpaque()
        var thread = pthread_t()
        let created = pthread_create(&thread, nil, { raw in
            let context = Unmanaged<AsyncIOContext>.fromOpaque(raw!).takeRetainedValue()
            godwit_set_thread_name("godwit-aio")
            context.reap()
            return nil
        }, box)
        guard created == 0 else {
            // deinit gives the ring and iocbs back; the AIO context is destroyed here (no reaper will).
            if case let .aio(context, _, _, _) = kernel { _ = godwit_io_destroy(context) }
            Unmanaged<AsyncIOContext>.fromOpaque(box).release()
            throw SystemError(operation: "pthread_create", errno: created, context: "AIO reaper")
        }
        lock.withLock { reaper = thread }
    }

    /// Gives the kernel side back: the ring, the iocbs, and the AIO context when `destroyingAIO` (the
    /// reaper destroys it at its end; a destroyed context's number can be reused by a new one).
    private static func release(_ kernel: Kernel, destroyingAIO: Bool) {
        switch kernel {
        case let .uring(ring):
            godwit_uring_close(ring)
        case let .aio(context, iocbs, stopIOCB, _):
            if destroyingAIO { _ = godwit_io_destroy(context) }
            iocbs.deallocate()
            stopIOCB.deallocate()
        }
    }

    deinit {
        for slot in slots { slot.iovecs?.deallocate() }
        AsyncIOContext.release(kernel, destroyingAIO: false)
    }

    /// Requests in flight.
    public var inFlight: Int { lock.withLock { depth - freeSlots.count } }

    /// Starts `requests` (in one io_submit); returns how many, from the front, were started. The
    /// others were not (the context is full or closing, or the kernel refused them) and are the
    /// caller's to do another way. `handler` may be called for a started request before this returns.
    public func submit(_ requests: [AsyncIORequest], handler: AsyncIOHandler) -> Int {
        guard !requests.isEmpty else { return 0 }
        // Slots are reserved and their iocbs filled under the lock; io_submit runs without it, so that
        // completions (which free slots) are not held up by a submission.
        let prepared: (pointers: [UnsafeMutableRawPointer?], used: [Int])? = lock.withLock {
            guard !closing else { return nil }
            let count = min(requests.count, freeSlots.count)
            guard count > 0 else { return nil }
            var pointers: [UnsafeMutableRawPointer?] = []
            pointers.reserveCapacity(count)
            var used: [Int] = []
            used.reserveCapacity(count)
            for request in requests.prefix(count) {
                let index = freeSlots.removeLast()
                used.append(index)
                var slot = slots[index]
                if slot.iovecCapacity < request.buffers.count {
                    slot.iovecs?.deallocate()
                    slot.iovecCapacity = max(request.buffers.count, 4)
                    slot.iovecs = .allocate(capacity: slot.iovecCapacity)
                }
                let iovecs = slot.iovecs!  // allocated just above when missing or too small
                for (i, buffer) in request.buffers.enumerated() {
                    // In bounds: i < buffers.count <= iovecCapacity.
                    iovecs[i] = iovec(iov_base: buffer.baseAddress, iov_len: buffer.count)
                }
                slot.handler = handler
                slot.tag = request.tag
                slots[index] = slot
                switch kernel {
                case let .aio(_, iocbs, _, userRing):
                    // In bounds: index < depth, and iocbs holds depth iocbs.
                    let iocb = iocbs + index * GODWIT_IOCB_SIZE
                    godwit_iocb_prep_rw(iocb, request.fd, request.isWrite ? 1 : 0, request.offset, iovecs,
                                        Int32(request.buffers.count), UInt64(index), userRing ? wakeUp.descriptor.rawValue : -1)
                    pointers.append(iocb)
                case .uring:
                    // The slot's iovecs stay until the slot is freed at completion.
                    pointers.append(UnsafeMutableRawPointer(iovecs))
                }
            }
            return (pointers, used)
        }
        guard var prepared else { return 0 }
        let count = prepared.used.count
        var submitted = 0
        switch kernel {
        case let .aio(context, _, _, _):
            while submitted < count {
                let chunk = min(count - submitted, AsyncIOContext.submitChunk)
                let rc = prepared.pointers.withUnsafeMutableBufferPointer { all in
                    // In bounds: submitted + chunk <= count == all.count.
                    godwit_io_submit(context, chunk, all.baseAddress! + submitted)
                }
                if rc == -Int(EINTR) { continue }
                guard rc > 0 else { break }
                submitted += rc
            }
        case let .uring(ring):
            submitted = submitLock.withLock { submitToRing(ring, requests, iovecs: prepared.pointers, slots: prepared.used) }
        }
        if submitted < count {
            // Slots of requests the kernel did not take go back (they were never in the kernel).
            lock.withLock {
                for index in prepared.used[submitted...] {
                    slots[index].handler = nil
                    freeSlots.append(index)
                }
            }
        }
        return submitted
    }

    /// Fills an SQE per request (its slot's `iovecs`) and enters the ring, `submitChunk` at a time;
    /// returns how many the kernel took. Called with `submitLock` held.
    private func submitToRing(_ ring: OpaquePointer, _ requests: [AsyncIORequest], iovecs: [UnsafeMutableRawPointer?],
                              slots used: [Int]) -> Int {
        var submitted = 0
        while submitted < used.count {
            let chunk = min(used.count - submitted, AsyncIOContext.submitChunk)
            var filled = 0
            for k in submitted..<(submitted + chunk) {
                let request = requests[k]
                guard godwit_uring_prep(ring, request.isWrite ? Int32(GODWIT_URING_WRITE) : Int32(GODWIT_URING_READ), request.fd,
                                        request.offset, iovecs[k]?.assumingMemoryBound(to: iovec.self), Int32(request.buffers.count),
                                        UInt64(used[k])) == 0 else { break }
                filled += 1
            }
            guard filled > 0 else { break }
            var rc = godwit_uring_enter(ring, UInt32(filled), 0)
            while rc == -Int(EINTR) { rc = godwit_uring_enter(ring, UInt32(filled), 0) }
            let taken = max(rc, 0)
            if taken < filled { godwit_uring_unprep(ring, UInt32(filled - taken)) }
            submitted += taken
            guard taken == filled else { break }
        }
        return submitted
    }

    /// Takes the completions that are ready (at most `batch`) into `datas`/`results` without waiting:
    /// from the ring in user space (under `reapLock`: one consumer at a time), or with a zero-time
    /// io_getevents for native AIO without the user-space ring. Returns the count or -errno.
    private func takeReady(_ datas: UnsafeMutablePointer<UInt64>, _ results: UnsafeMutablePointer<Int64>) -> Int {
        switch kernel {
        case let .aio(context, _, _, true):
            return reapLock.withLock { godwit_aio_ring_reap(context, AsyncIOContext.batch, datas, results) }
        case let .aio(context, _, _, false):
            return godwit_io_getevents(context, 0, AsyncIOContext.batch, datas, results, 0)
        case let .uring(ring):
            return reapLock.withLock { Int(godwit_uring_reap(ring, Int32(AsyncIOContext.batch), datas, results)) }
        }
    }

    /// A thread starts polling (`pollCompletions`) and takes over from the reaper until `endPolling`.
    public func beginPolling() { lock.withLock { pollers += 1 } }

    public func endPolling() {
        lock.withLock {
            pollers -= 1
            if pollers == 0 { lock.broadcast() }
        }
    }

    /// Hands the completions that are ready to their handlers without waiting (on the calling
    /// thread); returns how many there were.
    public func pollCompletions() -> Int {
        switch kernel {
        case let .aio(context, _, _, _): guard godwit_aio_ring_has_events(context) != 0 else { return 0 }
        case let .uring(ring): guard godwit_uring_has_completions(ring) != 0 else { return 0 }
        }
        return withUnsafeTemporaryAllocation(of: UInt64.self, capacity: AsyncIOContext.batch) { datas in
            withUnsafeTemporaryAllocation(of: Int64.self, capacity: AsyncIOContext.batch) { results in
                // In bounds: both buffers hold `batch` entries, the most `takeReady` takes.
                let n = takeReady(datas.baseAddress!, results.baseAddress!)
                guard n > 0 else { return 0 }
                dispatch(count: n, datas: UnsafeBufferPointer(datas), results: UnsafeBufferPointer(results))
                return n
            }
        }
    }

    /// Frees the slots of `count` events and calls their handlers (outside the lock), then ends the
    /// batch for each handler. Returns whether the context is closing with nothing in flight.
    @discardableResult
    private func dispatch(count: Int, datas: UnsafeBufferPointer<UInt64>, results: UnsafeBufferPointer<Int64>) -> Bool {
        var completions: [(AsyncIOHandler, UInt64, Int)] = []
        completions.reserveCapacity(count)
        let done: Bool = lock.withLock {
            for i in 0..<count {
                let data = datas[i]
                guard data < UInt64(depth), let handler = slots[Int(data)].handler else { continue }
                completions.append((handler, slots[Int(data)].tag, Int(results[i])))
                slots[Int(data)].handler = nil
                freeSlots.append(Int(data))
            }
            return closing && freeSlots.count == depth
        }
        var batchHandlers: [AsyncIOHandler] = []
        for (handler, tag, result) in completions {
            handler.asyncIOCompleted(tag: tag, result: result)
            if !batchHandlers.contains(where: { $0 === handler }) { batchHandlers.append(handler) }
        }
        for handler in batchHandlers { handler.asyncIOBatchEnded() }
        return done
    }

    /// Refuses new requests, waits until those in flight completed (their handlers were called),
    /// stops the reaper and destroys the context. Safe to call more than once, and from a handler.
    public func close() {
        let thread: pthread_t? = lock.withLock {
            closing = true
            lock.broadcast()  // a reaper parked for pollers
            let t = reaper
            reaper = nil
            return t
        }
        switch kernel {
        case .aio:
            try? wakeUp.signal()
        case let .uring(ring):
            // The stop request: a NOP whose completion wakes the reaper.
            submitLock.withLock {
                if godwit_uring_prep(ring, Int32(GODWIT_URING_NOP), -1, 0, nil, 0, AsyncIOContext.stopToken) == 0,
                   godwit_uring_enter(ring, 1, 0) != 1 {
                    godwit_uring_unprep(ring, 1)
                }
            }
        }
        guard let thread else { return }
        if pthread_equal(thread, pthread_self()) != 0 {
            pthread_detach(thread)  // called from a handler: the reaper ends after this batch
        } else {
            pthread_join(thread, nil)
        }
    }

    /// The reaper thread: waits for events and hands each to its handler, until closed and idle.
    private func reap() {
        var datas = [UInt64](repeating: 0, count: AsyncIOContext.batch)
        var results = [Int64](repeating: 0, count: AsyncIOContext.batch)
        while true {
            lock.withLock { lock.wait { pollers == 0 || closing } }
            let n = datas.withUnsafeMutableBufferPointer { d in
                results.withUnsafeMutableBufferPointer { r in
                    // In bounds: both arrays hold `batch` entries, the most either call is asked for.
                    if case let .aio(context, _, _, false) = kernel {
                        // Waits for and takes completions in one call.
                        return godwit_io_getevents(context, 1, AsyncIOContext.batch, d.baseAddress, r.baseAddress,
                                                   AsyncIOContext.idleTimeoutNanoseconds)
                    }
                    let ready = takeReady(d.baseAddress!, r.baseAddress!)
                    if ready != 0 { return ready }
                    // Nothing there: wait until a completion (or close) can be there, then look again.
                    if case let .uring(ring) = kernel {
                        let rc = godwit_uring_enter(ring, 0, 1)  // one completion, the stop NOP included
                        return rc < 0 && rc != -Int(EINTR) ? rc : 0
                    }
                    if case .failure(let error) = Result(catching: { try wakeUp.wait() }) { return -Int((error as? SystemError)?.errno ?? EIO) }
                    return 0
                }
            }
            if n < 0 && n != -Int(EINTR) {
                // Cannot happen with a valid context; stop rather than spin.
                break
            }
            let done = datas.withUnsafeBufferPointer { d in
                results.withUnsafeBufferPointer { r in dispatch(count: max(n, 0), datas: d, results: r) }
            }
            if done || (n <= 0 && lock.withLock({ closing && freeSlots.count == depth })) { break }
        }
        // Native AIO: waits for anything still in flight (the kernel cancels or finishes it) and frees
        // the context; a ring goes with the object (deinit), as a late submit may still look at it.
        if case let .aio(context, _, _, _) = kernel { _ = godwit_io_destroy(context) }
    }
}

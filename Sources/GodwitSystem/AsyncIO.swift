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

/// A Linux native AIO context (io_setup/io_submit/io_getevents) with its own reaper thread: requests
/// are submitted without waiting and completed, in whatever order the kernel finishes them, by the
/// reaper calling their `AsyncIOHandler`.
///
/// Meant for O_DIRECT files (on buffered files the kernel does the I/O inside io_submit). At most
/// `depth` requests are in flight; `submit` refuses the rest, and the caller does them synchronously.
/// `close()` (or deinit) refuses new requests, waits for those in flight and destroys the context.
public final class AsyncIOContext: @unchecked Sendable {
    /// The reaper's largest batch of events.
    static let batch = 256
    /// The data value of the stop poll request (slot tags are below `depth`).
    static let stopToken = UInt64.max
    /// The reaper's io_getevents time-out, after which it looks at `closing` (only matters when the
    /// kernel refused the stop poll request).
    static let idleTimeoutNanoseconds: Int64 = 1_000_000_000

    /// Requests per io_submit call. One: each request reaches the device queue on its own, as soon as
    /// it is submitted, as qemu-storage-daemon does it. Measured on this project's 2-CPU machine (a
    /// guest's 4 KiB random reads at queue depth 32 through an I/O domain, the same run): one per
    /// call 70-84k IOPS, two or four per call 67k, the whole pass (~20) in one call 60-68k; handing
    /// the kernel a batch makes it plug and dispatch the batch together, and completions then come
    /// back in convoys that leave the device idle between them. The cost is a syscall per request.
    static let submitChunk = 1
    /// How many requests may be in flight.
    public let depth: Int
    private let context: UInt64
    private let iocbs: UnsafeMutableRawPointer
    private let stopIOCB: UnsafeMutableRawPointer
    private let stop: EventFD

    private struct Slot {
        var handler: AsyncIOHandler?
        var tag: UInt64 = 0
        var iovecs: UnsafeMutablePointer<iovec>?
        var iovecCapacity = 0
    }

    private let lock = Condition()
    private var slots: [Slot]
    private var freeSlots: [Int]
    private var closing = false
    private var reaper: pthread_t?
    /// Threads polling for completions (`beginPolling`): the reaper parks meanwhile, so that events
    /// do not wake it as well.
    private var pollers = 0

    /// Creates a context for `depth` requests in flight and starts its reaper thread.
    public init(depth: Int = 512) throws(SystemError) {
        guard depth > 0, depth <= 65536 else { throw SystemError(operation: "io_setup", errno: EINVAL, context: "depth \(depth)") }
        var context: UInt64 = 0
        let rc = godwit_io_setup(UInt32(depth), &context)
        guard rc == 0 else { throw SystemError(operation: "io_setup", errno: -rc, context: "\(depth) events") }
        self.depth = depth
        self.context = context
        do {
            stop = try EventFD(nonBlocking: true)
        } catch {
            _ = godwit_io_destroy(context)
            throw error
        }
        iocbs = UnsafeMutableRawPointer.allocate(byteCount: GODWIT_IOCB_SIZE * depth, alignment: 16)
        stopIOCB = UnsafeMutableRawPointer.allocate(byteCount: GODWIT_IOCB_SIZE, alignment: 16)
        slots = Array(repeating: Slot(), count: depth)
        freeSlots = Array((0..<depth).reversed())

        // The stop request: a poll on `stop` that completes when close() writes it, waking the reaper.
        godwit_iocb_prep_poll_in(stopIOCB, stop.descriptor.rawValue, AsyncIOContext.stopToken)
        var one: UnsafeMutableRawPointer? = stopIOCB
        _ = godwit_io_submit(context, 1, &one)  // refused (old kernel): the reaper's time-out takes over

        let box = Unmanaged.passRetained(self).toOpaque()
        var thread = pthread_t()
        let created = pthread_create(&thread, nil, { raw in
            let context = Unmanaged<AsyncIOContext>.fromOpaque(raw!).takeRetainedValue()
            godwit_set_thread_name("godwit-aio")
            context.reap()
            return nil
        }, box)
        guard created == 0 else {
            Unmanaged<AsyncIOContext>.fromOpaque(box).release()
            _ = godwit_io_destroy(context)
            iocbs.deallocate()
            stopIOCB.deallocate()
            throw SystemError(operation: "pthread_create", errno: created, context: "AIO reaper")
        }
        lock.withLock { reaper = thread }
    }

    deinit {
        for slot in slots { slot.iovecs?.deallocate() }
        iocbs.deallocate()
        stopIOCB.deallocate()
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
                // In bounds: index < depth, and iocbs holds depth iocbs.
                let iocb = iocbs + index * GODWIT_IOCB_SIZE
                godwit_iocb_prep_rw(iocb, request.fd, request.isWrite ? 1 : 0, request.offset, iovecs,
                                    Int32(request.buffers.count), UInt64(index))
                pointers.append(iocb)
            }
            return (pointers, used)
        }
        guard var prepared else { return 0 }
        let count = prepared.used.count
        var submitted = 0
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
        guard godwit_aio_ring_has_events(context) != 0 else { return 0 }
        return withUnsafeTemporaryAllocation(of: UInt64.self, capacity: AsyncIOContext.batch) { datas in
            withUnsafeTemporaryAllocation(of: Int64.self, capacity: AsyncIOContext.batch) { results in
                // In bounds: both buffers hold `batch` entries, the most io_getevents is asked for.
                let n = godwit_io_getevents(context, 0, AsyncIOContext.batch, datas.baseAddress, results.baseAddress, 0)
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
            let t = reaper
            reaper = nil
            return t
        }
        try? stop.signal()
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
                    // In bounds: both arrays hold `batch` entries, the most io_getevents is asked for.
                    godwit_io_getevents(context, 1, AsyncIOContext.batch, d.baseAddress, r.baseAddress,
                                        AsyncIOContext.idleTimeoutNanoseconds)
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
        // Waits for anything still in flight (the kernel cancels or finishes it) and frees the context.
        _ = godwit_io_destroy(context)
    }
}

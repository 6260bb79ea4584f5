import GodwitSystem
#if canImport(Glibc)
import Glibc
#endif

/// A ready-made RX thread for one `NetDevice`: poll(2) on the backend's `pollDescriptor` and on an
/// eventfd, `receive()` when either fires.
///
/// - The backend descriptor is watched for readable only while `receive()` wants more frames
///   (`NetReceiveOutcome.wantsBackendReadable`): when the guest has no buffers the thread sleeps on
///   the eventfd alone and frames wait in the kernel.
/// - The eventfd is signalled by the device's `onReceiveWakeup` (guest added RX buffers, device
///   activated), by `onTransmitBlocked` and by `stop()`.
/// - While TX is blocked on a full backend, the descriptor is also watched for writable and
///   `retryTransmit()` is called when it is (with a 10 ms back-off if the retry makes no progress).
/// - After a backend read error the thread waits 10 ms before trying again.
///
/// `start()` installs the device's two hooks (do not set them yourself while a worker runs);
/// `stop()` wakes the thread, joins it and removes them. Both are idempotent; a stopped worker does not
/// start again.
public final class NetRxWorker: @unchecked Sendable {
    public let device: NetDevice
    private let backendDescriptor: Int32
    private let wakeup: EventFD
    private let lock = Lock()
    private var thread: pthread_t?
    private var stopping = false

    /// Back-off after a backend error or an unproductive TX retry, in milliseconds.
    static let backoffMilliseconds: Int32 = 10

    /// Prepares a worker for `device`; throws when its backend has no poll descriptor.
    public init(device: NetDevice) throws(SystemError) {
        guard let descriptor = device.backend.pollDescriptor else {
            throw SystemError(operation: "start network RX thread", errno: EINVAL, context: "for a backend without a poll descriptor")
        }
        self.device = device
        backendDescriptor = descriptor
        wakeup = try EventFD(nonBlocking: true)
    }

    /// True between `start()` and `stop()`.
    public var isRunning: Bool { lock.withLock { thread != nil } }

    /// Starts the thread.
    public func start() throws(SystemError) {
        let ready: Bool = lock.withLock { thread == nil && !stopping }
        guard ready else { return }
        device.onReceiveWakeup = { [weak self] in self?.wake() }
        device.onTransmitBlocked = { [weak self] in self?.wake() }
        final class Box {
            let worker: NetRxWorker
            init(_ worker: NetRxWorker) { self.worker = worker }
        }
        let box = Unmanaged.passRetained(Box(self)).toOpaque()
        var handle = pthread_t()
        let rc = pthread_create(&handle, nil, { raw in
            let box = Unmanaged<Box>.fromOpaque(raw!).takeRetainedValue()
            box.worker.run()
            return nil
        }, box)
        guard rc == 0 else {
            Unmanaged<Box>.fromOpaque(box).release()
            device.onReceiveWakeup = nil
            device.onTransmitBlocked = nil
            throw SystemError(operation: "pthread_create", errno: rc, context: "for the network RX thread")
        }
        lock.withLock { thread = handle }
    }

    /// Stops the thread and waits for it; removes the device hooks.
    public func stop() {
        let handle: pthread_t? = lock.withLock {
            stopping = true
            defer { thread = nil }
            return thread
        }
        wake()
        if let handle { pthread_join(handle, nil) }
        device.onReceiveWakeup = nil
        device.onTransmitBlocked = nil
    }

    private func wake() { try? wakeup.signal() }

    private func run() {
        let pollIn = Int16(POLLIN)
        let pollOut = Int16(POLLOUT)
        var watchWritable = true
        while !lock.withLock({ stopping }) {
            let outcome = device.receive()
            let blocked = device.transmitBlocked
            var events: Int16 = 0
            if outcome.wantsBackendReadable { events |= pollIn }
            if blocked && watchWritable { events |= pollOut }
            var descriptors = [pollfd(fd: wakeup.descriptor.rawValue, events: pollIn, revents: 0)]
            if events != 0 { descriptors.append(pollfd(fd: backendDescriptor, events: events, revents: 0)) }
            let backOff = outcome == .backendError || (blocked && !watchWritable)
            let n = poll(&descriptors, nfds_t(descriptors.count), backOff ? NetRxWorker.backoffMilliseconds : -1)
            if n < 0 { continue }  // EINTR
            if descriptors[0].revents != 0 { _ = try? wakeup.wait() }
            if blocked {
                let writable = descriptors.count > 1 && descriptors[1].revents & pollOut != 0
                if writable || !watchWritable {
                    // Still blocked right after "writable": back off instead of spinning.
                    watchWritable = device.retryTransmit()
                }
            } else {
                watchWritable = true
            }
        }
    }
}

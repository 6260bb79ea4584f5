import API
import Foundation
import GodwitSystem
import Machine
import Migration

/// A running `MicroVM` as the pre-copy engine's source.
final class MachineMigrationSource: MigrationSourceVM {
    let machine: MicroVM
    init(_ machine: MicroVM) { self.machine = machine }

    var pageCount: Int { machine.pageCount }
    func page(_ number: UInt64) -> UnsafeRawBufferPointer? { machine.page(number).map(UnsafeRawBufferPointer.init) }
    func dataPageRanges() -> [Range<UInt64>]? { machine.memory.dataPageRanges() }
    func configuration() throws -> [UInt8] { Array(try JSONEncoder().encode(machine.shape)) }
    func setDirtyLogging(_ on: Bool) throws { try machine.setDirtyLogging(on) }
    func takeDirtyBitmap() throws -> [UInt64] { try machine.takeDirtyBitmap() }
    func stopForFinalCopy() throws { try machine.suspendForMigration() }
    func resumeAfterCancel() throws { try machine.resumeAfterMigrationCancelled() }
    func captureState() throws -> [UInt8] { Array(try JSONEncoder().encode(try machine.captureState())) }
}

/// An incoming `MicroVM` as the pre-copy engine's target.
final class MachineMigrationTarget: MigrationTargetVM {
    let machine: MicroVM
    init(_ machine: MicroVM) { self.machine = machine }

    var pageCount: Int { machine.pageCount }

    func checkConfiguration(_ json: [UInt8]) throws {
        let shape: MachineShape
        do { shape = try JSONDecoder().decode(MachineShape.self, from: Data(json)) } catch {
            throw APIError.badRequest("the source's configuration is not valid: \(error)")
        }
        if let mismatch = machine.shape.mismatch(shape) { throw APIError.badRequest("the VM cannot run here: \(mismatch)") }
    }

    func writablePage(_ number: UInt64) -> UnsafeMutableRawBufferPointer? { machine.page(number) }

    func restoreState(_ json: [UInt8]) throws {
        let t0 = Date()
        let state: MachineState
        do { state = try JSONDecoder().decode(MachineState.self, from: Data(json)) } catch {
            throw APIError.badRequest("the source's state is not valid: \(error)")
        }
        let t1 = Date()
        try machine.restore(state)
        if ProcessInfo.processInfo.environment["GODWIT_MIGRATION_TRACE"] != nil {
            FileHandle.standardError.write(Data("godwit: migration: state decoded in \(Int(t1.timeIntervalSince(t0) * 1000)) ms, restored in \(Int(Date().timeIntervalSince(t1) * 1000)) ms (\(json.count) bytes)\n".utf8))
        }
    }
}

extension VMMService {
    /// The key for a migration: the request's (hex, or a file holding hex), else the VMM's default.
    func migrationKey(_ given: String?) throws -> MigrationKey {
        guard let text = given ?? defaultMigrationKey else {
            throw APIError.badRequest("no migration key: give \"key\" or start the VMM with --migration-key-file")
        }
        do {
            if FileManager.default.fileExists(atPath: text) {
                return try MigrationKey(fileContents: String(contentsOfFile: text, encoding: .utf8))
            }
            return try MigrationKey(hex: text)
        } catch {
            throw APIError.badRequest("migration key: \(error)")
        }
    }

    public func migrationStatus() throws -> MigrationStatus {
        lock.withLock {
            if migration.state == "sending" { migrationWatched.during = true }
            if migration.state == "completed" { migrationWatched.end = true }
            return migration
        }
    }

    /// Migration news goes to the log and to standard error (an operator watches a migration).
    func migrationLog(_ message: String) {
        log("migration: \(message)")
        FileHandle.standardError.write(Data("godwit: migration: \(message)\n".utf8))
    }

    private func setMigration(_ update: (inout MigrationStatus) -> Void) {
        lock.withLock { update(&migration) }
    }

    public func receiveMigration(_ params: MigrationReceiveParams) throws {
        let url = try MigrationURL(params.receiverUrl, field: "receiver_url")
        let key = try migrationKey(params.key)
        let config: MachineConfig = try lock.withLock {
            try requireNotStarted("PUT /migration/receive")
            guard migration.state != "listening" && migration.state != "receiving" else {
                throw APIError.badRequest("already waiting for a migration")
            }
            return try machineConfigLocked(incoming: true)
        }
        let listener: MigrationListener
        do { listener = try MigrationChannel.listen(host: url.host, port: url.port) } catch {
            throw APIError.badRequest("cannot listen on \(url): \(error)")
        }
        setMigration { $0 = MigrationStatus(state: "listening") }
        publish(.migrationProgress, ["state": .string("listening"), "url": .string(url.description)])
        let paused = params.resumeVm == false
        detachThread(name: "migration-in") { [self] in receive(on: listener, key: key, config: config, paused: paused) }
    }

    /// Accepts authenticated senders until one migration succeeds; a failed attempt discards the VM
    /// and waits for the next.
    private func receive(on listener: MigrationListener, key: MigrationKey, config: MachineConfig, paused: Bool) {
        defer { listener.close() }
        while true {
            let channel: MigrationChannel
            do { channel = try listener.accept(key: key, timeout: 10) } catch {
                migrationLog("refused a connection: \(error)")
                publish(.migrationProgress, ["state": .string("refused"), "error": .string("\(error)")])
                continue
            }
            setMigration { $0.state = "receiving" }
            let started = ContinuousClock.now
            var receiver: MigrationReceiver?
            do {
                try lock.withLock { lifecycle = try lifecycle.applying(.start) }
                try startMachine(config, startsPaused: paused) { machine in
                    let r = MigrationReceiver(channel: channel, vm: MachineMigrationTarget(machine))
                    receiver = r
                    try r.run()
                }
                receiver?.confirmResumed()
                let total = ContinuousClock.now - started
                setMigration {
                    $0.state = "completed"
                    $0.totalMs = Double(total.components.seconds) * 1000 + Double(total.components.attoseconds) / 1e15
                }
                publish(.migrationProgress, ["state": .string("completed"), "pages": .number(Double(receiver?.pagesReceived ?? 0))])
                channel.close()
                return
            } catch {
                channel.close()
                migrationLog("incoming migration failed, VM discarded: \(error)")
                setMigration {
                    $0.state = "listening"
                    $0.error = "\(error)"
                }
                publish(.migrationProgress, ["state": .string("failed"), "error": .string("\(error)")])
                onIncomingFailure?("\(error)")
            }
        }
    }

    public func sendMigration(_ params: MigrationSendParams) throws {
        let url = try MigrationURL(params.destinationUrl, field: "destination_url")
        let key = try migrationKey(params.key)
        let machine = try lock.withLock { () throws -> MicroVM in
            guard let vm, lifecycle == .running else {
                throw APIError.badRequest("PUT /migration/send needs a running VM; it is \(lifecycle.instanceState)")
            }
            guard migration.state != "sending" else { throw APIError.badRequest("a migration is already running") }
            migration = MigrationStatus(state: "sending")
            migrationWatched = (false, false)
            return vm
        }
        let parameters = MigrationParameters(downtime: Double(params.downtimeMs ?? 300) / 1000, timeout: Double(params.timeoutS ?? 300),
                                             maxBytesPerSecond: params.maxBandwidthMbps.map { UInt64($0) * 1_000_000 / 8 })
        detachThread(name: "migration-out") { [self] in send(machine, to: url, key: key, parameters: parameters) }
    }

    private func send(_ machine: MicroVM, to url: MigrationURL, key: MigrationKey, parameters: MigrationParameters) {
        var sender: PreCopySender?
        do {
            let channel = try MigrationChannel.connect(host: url.host, port: url.port, key: key, timeout: 10)
            defer { channel.close() }
            let s = PreCopySender(channel: channel, vm: MachineMigrationSource(machine), parameters: parameters) { [weak self] p in
                self?.setMigration {
                    $0.pass = p.pass
                    $0.dirtyPages = p.dirtyPages
                    $0.bytesSent = p.bytesSent
                    $0.rateMbps = p.rate * 8 / 1e6
                    $0.expectedDowntimeMs = p.expectedDowntime * 1000
                }
                self?.publish(.migrationProgress, ["phase": .string(p.phase), "pass": .number(Double(p.pass)),
                                                   "dirty_pages": .number(Double(p.dirtyPages)), "bytes_sent": .number(Double(p.bytesSent))])
            }
            sender = s
            let outcome = try s.run()
            setMigration {
                $0.state = "completed"
                $0.downtimeMs = outcome.downtime * 1000
                $0.totalMs = outcome.total * 1000
                $0.bytesSent = outcome.bytesSent
            }
            migrationLog("to \(url) completed: downtime \(Int(outcome.downtime * 1000)) ms, \(outcome.bytesSent) bytes in \(outcome.passes) passes, total \(Int(outcome.total * 1000)) ms; final phase: "
                         + s.trace.map { "\($0.0) +\(String(format: "%.1f", $0.1 * 1000)) ms" }.joined(separator: ", "))
            publish(.migrationProgress, ["state": .string("completed"), "downtime_ms": .number(outcome.downtime * 1000),
                                         "total_ms": .number(outcome.total * 1000), "bytes_sent": .number(Double(outcome.bytesSent))])
            // The guest is the target's now: this VMM ends, once a client that watched the migration (`godwit ctl
            // migrate`) has read how it ended, or after a second.
            for _ in 0..<50 where lock.withLock({ migrationWatched.during && !migrationWatched.end }) { usleep(20_000) }
            machine.requestExit(.migrated)
        } catch {
            if sender?.committed == true {
                // Past the commit point: the target owns the guest even though we did not hear it resume.
                setMigration { $0.state = "completed"; $0.error = "after commit: \(error)" }
                machine.requestExit(.migrated)
                return
            }
            setMigration {
                $0.state = "cancelled"
                $0.error = "\(error)"
            }
            migrationLog("to \(url) cancelled, the guest keeps running here: \(error)")
            publish(.migrationProgress, ["state": .string("cancelled"), "error": .string("\(error)")])
        }
    }
}

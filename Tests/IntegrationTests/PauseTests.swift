import Foundation
import GodwitSystem
import GodwitTestSupport
import Machine
import Testing

/// Pause and resume a running guest through the Machine library (the API drives the same calls).
@Suite("Integration: pause and resume", .serialized, .enabled(if: TestEnvironment.hasKVM))
struct PauseTests {
    @Test(arguments: [1, 2])
    func pausedGuestSeesNoTimePass(cpus: Int) throws {
        let dir = try TestEnvironment.temporaryDirectory()
        defer { try? FileManager.default.removeItem(at: dir) }
        let log = dir.appendingPathComponent("serial.log").path
        let output = try FileDescriptor.open(log, flags: O_WRONLY | O_CREAT | O_TRUNC)
        let vm = try MicroVM(config: MachineConfig(kernelPath: TestEnvironment.guestPath,
                                                   commandLine: "godwit.job=ready godwit.job=idle,seconds=2",
                                                   cpus: cpus, memoryBytes: 64 << 20, serialOutput: output))
        let started = Date()
        let exitBox = LockedBox<GuestExit?>(nil)
        let runner = Thread { exitBox.value = try? vm.run() }
        runner.start()
        Thread.sleep(forTimeInterval: 0.6)
        try vm.pause()
        #expect(vm.currentState == .paused)
        let linesAtPause = try String(contentsOfFile: log, encoding: .utf8).split(separator: "\n").count
        Thread.sleep(forTimeInterval: 1.0)
        let linesAfterPause = try String(contentsOfFile: log, encoding: .utf8).split(separator: "\n").count
        #expect(linesAfterPause == linesAtPause, "no heartbeat while paused")
        try vm.resume()
        #expect(vm.currentState == .running)
        while exitBox.value == nil && Date().timeIntervalSince(started) < 30 { Thread.sleep(forTimeInterval: 0.05) }
        #expect(exitBox.value == .powerOff(status: GuestExit.passStatus))
        #expect(vm.kickableThreadCount == 0, "a late kick (a migration's requestExit) must signal no vCPU thread that is gone")
        #expect(Date().timeIntervalSince(started) >= 3.0, "the pause added wall-clock time")

        let lines = try String(contentsOfFile: log, encoding: .utf8).split(separator: "\n").compactMap { GuestLine(String($0)) }
        let summary = try #require(lines.last { $0.job == "idle" && $0["beats"] != nil })
        // 2 s of guest time; a loaded host delays beats (the guest skips those it missed), but the 1 s pause
        // must not show as a gap.
        #expect((summary.int("beats") ?? 0) >= 100, "\(summary)")
        #expect((summary.int("max_gap_us") ?? .max) < 900_000, "the guest's clock did not advance by the 1 s pause: \(summary)")
    }

    @Test func pauseIsRefusedWhenNotRunning() throws {
        let dir = try TestEnvironment.temporaryDirectory()
        defer { try? FileManager.default.removeItem(at: dir) }
        let output = try FileDescriptor.open(dir.appendingPathComponent("serial.log").path, flags: O_WRONLY | O_CREAT)
        let vm = try MicroVM(config: MachineConfig(kernelPath: TestEnvironment.guestPath, commandLine: "godwit.job=ready",
                                                   memoryBytes: 64 << 20, serialOutput: output))
        #expect(throws: MachineError.self) { try vm.pause() }
        #expect(throws: MachineError.self) { try vm.resume() }
    }
}

final class LockedBox<T>: @unchecked Sendable {
    private let lock = NSLock()
    private var stored: T
    init(_ value: T) { stored = value }
    var value: T {
        get { lock.lock(); defer { lock.unlock() }; return stored }
        set { lock.lock(); stored = newValue; lock.unlock() }
    }
}

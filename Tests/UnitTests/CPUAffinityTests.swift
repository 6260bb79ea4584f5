import Foundation
import GodwitSystem
import Testing

/// CPU lists for `--vcpu-affinity` and `godwit iodomain --cpu-affinity`, and pinning a thread.
@Suite("CPU affinity")
struct CPUAffinityTests {
    @Test func parsesTasksetLists() {
        #expect(CPUAffinity.parse("0", limit: 4) == [0])
        #expect(CPUAffinity.parse("1,3", limit: 4) == [1, 3])
        #expect(CPUAffinity.parse("0-2", limit: 4) == [0, 1, 2])
        #expect(CPUAffinity.parse("3,0-1,1", limit: 4) == [3, 0, 1], "order kept, repeats dropped")
    }

    @Test(arguments: ["", "4", "-1", "2-1", "1-", "a", "1,,2", "0-1-2", " 1", "99999999999999999999"])
    func refusesWhatIsNotAListOfThisHostsCPUs(_ list: String) {
        #expect(CPUAffinity.parse(list, limit: 4) == nil, "'\(list)'")
    }

    @Test func pinsTheCallingThreadAndItsChildren() throws {
        let all = try #require(CPUAffinity.parse("0-\(ProcessInfo.processInfo.activeProcessorCount - 1)"))
        let seen = Box()
        let thread = try startThread(name: "pin-test", joinable: true) {
            do {
                try CPUAffinity.pinCurrentThread(to: [all.last!])
                seen.value = try String(contentsOfFile: "/proc/thread-self/status", encoding: .utf8)
                try CPUAffinity.pinCurrentThread(to: [-1])
            } catch {
                seen.error = "\(error)"
            }
        }
        pthread_join(thread, nil)
        #expect(seen.value.contains("Cpus_allowed_list:\t\(all.last!)\n"), "\(seen.value)")
        #expect(seen.error.contains("sched_setaffinity"), "a bad CPU is an error naming the call: \(seen.error)")
    }

    /// The probe names exactly the CPUs a thread cannot be pinned to, and leaves the caller's affinity alone.
    @Test func findsTheCPUsNoThreadCanUse() throws {
        let before = try String(contentsOfFile: "/proc/thread-self/status", encoding: .utf8)
            .split(separator: "\n").first { $0.hasPrefix("Cpus_allowed_list:") }
        let last = ProcessInfo.processInfo.activeProcessorCount - 1
        #expect(try CPUAffinity.unavailable([0, last]) == [])
        #expect(try CPUAffinity.unavailable([last, 1000, 1023]) == [1000, 1023])
        let after = try String(contentsOfFile: "/proc/thread-self/status", encoding: .utf8)
            .split(separator: "\n").first { $0.hasPrefix("Cpus_allowed_list:") }
        #expect(before == after)
    }

    final class Box: @unchecked Sendable {
        var value = ""
        var error = ""
    }
}

#if canImport(Glibc)
import Glibc
#endif

#if FUZZING
/// libFuzzer's entry: the target comes from GODWIT_FUZZ_TARGET (scripts/fuzz.sh sets it).
let selectedTarget: FuzzTarget = {
    guard let name = getenv("GODWIT_FUZZ_TARGET").map({ String(cString: $0) }), let target = FuzzTarget(rawValue: name) else {
        fatalError("set GODWIT_FUZZ_TARGET to one of: \(FuzzTarget.allCases.map(\.rawValue).joined(separator: " "))")
    }
    return target
}()

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzOne(_ data: UnsafePointer<UInt8>?, _ size: Int) -> CInt {
    // In bounds: libFuzzer hands `size` readable bytes at `data`.
    let bytes = size == 0 || data == nil ? [] : Array(UnsafeBufferPointer(start: data, count: size))
    selectedTarget.run(bytes)
    return 0
}

@_silgen_name("LLVMFuzzerRunDriver")
func LLVMFuzzerRunDriver(_ argc: UnsafeMutablePointer<Int32>, _ argv: UnsafeMutablePointer<UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>?>,
                         _ callback: @convention(c) (UnsafePointer<UInt8>?, Int) -> CInt) -> CInt

/// SwiftPM links an executable's `main` to `<module>_main`: run libFuzzer's driver from there.
@_cdecl("GodwitFuzz_main")
public func fuzzMain(_ argc: Int32, _ argv: UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>?) -> Int32 {
    var count = argc
    var arguments = argv
    return LLVMFuzzerRunDriver(&count, &arguments) { data, size in fuzzOne(data, size) }
}
#else
/// Without the fuzzer: replays inputs (a corpus, regression cases) through a target, so that the
/// ordinary build and the test suite keep every target and every input that once crashed alive.
@main
struct FuzzReplay {
    static func main() {
        let arguments = Array(CommandLine.arguments.dropFirst())
        guard let name = arguments.first else {
            print("usage: godwit-fuzz TARGET FILE-OR-DIRECTORY...   (targets: \(FuzzTarget.allCases.map(\.rawValue).joined(separator: " ")))")
            exit(2)
        }
        if name == "--list" {
            for target in FuzzTarget.allCases { print(target.rawValue) }
            exit(0)
        }
        guard let target = FuzzTarget(rawValue: name) else {
            fputs("godwit-fuzz: no target \(name)\n", stderr)
            exit(2)
        }
        var count = 0
        for path in arguments.dropFirst() {
            for file in files(at: path) {
                guard let bytes = read(file) else { fputs("godwit-fuzz: cannot read \(file)\n", stderr); exit(2) }
                target.run(bytes)
                count += 1
            }
        }
        print("godwit-fuzz: \(target.rawValue): \(count) inputs replayed, no invariant broken")
    }

    static func files(at path: String) -> [String] {
        var status = stat()
        guard stat(path, &status) == 0 else { return [path] }
        guard status.st_mode & S_IFMT == S_IFDIR, let dir = opendir(path) else { return [path] }
        defer { closedir(dir) }
        var names: [String] = []
        while let entry = readdir(dir) {
            let name = withUnsafeBytes(of: entry.pointee.d_name) { String(decoding: $0.prefix { $0 != 0 }, as: UTF8.self) }
            if !name.hasPrefix(".") { names.append(path + "/" + name) }
        }
        return names.sorted()
    }

    static func read(_ path: String) -> [UInt8]? {
        guard let file = fopen(path, "rb") else { return nil }
        defer { fclose(file) }
        var bytes: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 65536)
        while true {
            let n = fread(&chunk, 1, chunk.count, file)
            if n <= 0 { break }
            bytes += chunk[0..<n]
        }
        return bytes
    }
}
#endif

// swift-tools-version:6.0
import PackageDescription

// Layers (see ARCHITECTURE.md): dependencies point down only.
// CGodwit -> GodwitSystem -> GuestMemory -> {KVM, Virtio} -> Machine -> godwit; NBD and Migration sit on GodwitSystem
let swift5: [SwiftSetting] = [.swiftLanguageMode(.v5)]

let package = Package(
    name: "Godwit",
    platforms: [.macOS(.v13)],
    products: [
        .executable(name: "godwit", targets: ["godwit"]),
        // Fuzz targets: replays inputs in a normal build; `scripts/fuzz.sh` builds it with libFuzzer.
        .executable(name: "godwit-fuzz", targets: ["GodwitFuzz"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.8.2"),
    ],
    targets: [
        .target(name: "CGodwit", linkerSettings: [.linkedLibrary("seccomp"), .linkedLibrary("crypto")]),
        .target(name: "GodwitSystem", dependencies: ["CGodwit"], swiftSettings: swift5),
        .target(name: "GuestMemory", dependencies: ["GodwitSystem"], swiftSettings: swift5),
        .target(name: "KVM", dependencies: ["CGodwit", "GodwitSystem", "GuestMemory"], swiftSettings: swift5),
        .target(name: "Virtio", dependencies: ["GodwitSystem", "GuestMemory"], swiftSettings: swift5),
        .target(name: "VhostUser", dependencies: ["CGodwit", "GodwitSystem", "GuestMemory", "Virtio"], swiftSettings: swift5),
        .target(name: "IODomain", dependencies: ["CGodwit", "GodwitSystem", "Virtio", "VhostUser", "NBD"], swiftSettings: swift5),
        .target(name: "Machine", dependencies: ["CGodwit", "GodwitSystem", "GuestMemory", "KVM", "Virtio", "VhostUser"], swiftSettings: swift5),
        .target(name: "API", dependencies: ["GodwitSystem"], swiftSettings: swift5),
        .target(name: "Migration", dependencies: ["CGodwit", "GodwitSystem"], swiftSettings: swift5),
        .target(name: "CNBD", linkerSettings: [.linkedLibrary("nbd")]),
        .target(name: "Cluster", dependencies: ["CGodwit", "GodwitSystem"], swiftSettings: swift5),
        .target(name: "NBD", dependencies: ["CGodwit", "CNBD", "GodwitSystem"], swiftSettings: swift5),
        .target(name: "VMM", dependencies: ["API", "Machine", "Migration", "Virtio", "VhostUser", "GodwitSystem"], swiftSettings: swift5),
        .target(name: "Agent", dependencies: ["API", "Cluster", "NBD", "IODomain", "VhostUser", "GodwitSystem"], swiftSettings: swift5),
        .executableTarget(
            name: "godwit",
            dependencies: ["Machine", "Virtio", "VhostUser", "IODomain", "API", "VMM", "Migration", "NBD", "Agent", .product(name: "ArgumentParser", package: "swift-argument-parser")],
            swiftSettings: swift5),
        .executableTarget(
            name: "GodwitFuzz",
            dependencies: ["GodwitSystem", "GuestMemory", "Virtio", "VhostUser", "NBD", "Migration", "Machine", "API", "Agent"],
            swiftSettings: swift5),
        .target(name: "GodwitTestSupport", dependencies: ["GodwitSystem", "GuestMemory"], swiftSettings: swift5),
        .testTarget(
            name: "UnitTests",
            dependencies: ["GodwitSystem", "GuestMemory", "KVM", "Virtio", "VhostUser", "IODomain", "Machine", "API", "VMM", "Migration", "NBD", "Cluster", "Agent", "GodwitTestSupport"],
            swiftSettings: swift5),
        .testTarget(
            name: "IntegrationTests",
            dependencies: ["GodwitSystem", "GuestMemory", "KVM", "Virtio", "VhostUser", "IODomain", "Machine", "API", "VMM", "Migration", "NBD", "Cluster", "Agent", "GodwitTestSupport"],
            swiftSettings: swift5),
    ]
)

#!/usr/bin/env bash
# The unit and integration tiers under AddressSanitizer and ThreadSanitizer.
#   scripts/sanitize.sh [address|thread]...      (default: both)
# Each sanitizer builds into its own scratch path (.build-asan, .build-tsan). Under ASan the VMMs and
# I/O domains the integration tests start are the sanitized `godwit` too (GODWIT_BIN), so a report
# from a child process fails its test through its exit status. TSan's runtime does not survive
# godwit's pre-main fork into namespaces (a CHECK failure in its interceptors), so under TSan the
# children are the ordinary build and TSan watches what runs in the test process: vCPU threads of
# in-process VMs, the API server, NBD server and routes' workers. So TSan's integration tier is the
# suites whose code runs in the test process (THREAD_SUITES); the rest only start child processes,
# which TSan cannot see. SANITIZE_ADDRESS_FILTER and SANITIZE_THREAD_FILTER override each one's
# integration tier (`swift test --filter` patterns; defaults: all of it under ASan, THREAD_SUITES
# under TSan). SANITIZE_ADDRESS_SKIP leaves suites out of the ASan run (`swift test --skip`).
set -euo pipefail
cd "$(dirname "$0")/.."
sanitizers=("$@")
[ ${#sanitizers[@]} -gt 0 ] || sanitizers=(address thread)
# Leaks: process-wide caches and detached threads are kept on purpose. TSan: report every race and
# fail at the end (halt_on_error=0, exitcode 66); signal handlers that only set a flag are fine.
export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=0}
export TSAN_OPTIONS=${TSAN_OPTIONS:-halt_on_error=0 report_signal_unsafe=0 exitcode=66}
# The integration suites that run Godwit code in the test process: VMs and their vCPU threads
# (PauseTests), the vhost-user frontend code driving live I/O domains (IODomainControlTests), the
# NBD client and server against peers (NBDInteropTests), the etcd client (EtcdTests).
THREAD_SUITES="PauseTests|IODomainControlTests|NBDInteropTests|EtcdTests"
status=0
for sanitizer in "${sanitizers[@]}"; do
    case $sanitizer in
        address) scratch=.build-asan; children="$PWD/.build-asan/debug/godwit" ;;
        thread) scratch=.build-tsan; children="$PWD/.build/debug/godwit"; swift build >/dev/null ;;
        *) echo "unknown sanitizer $sanitizer (address or thread)" >&2; exit 2 ;;
    esac
    echo "== $sanitizer: building"
    swift build --build-tests --scratch-path "$scratch" -Xswiftc -sanitize="$sanitizer" 2>&1 | grep -E "error|Build complete" || true
    if [ "$sanitizer" = address ]; then filter=${SANITIZE_ADDRESS_FILTER:-IntegrationTests}; else filter=${SANITIZE_THREAD_FILTER:-$THREAD_SUITES}; fi
    for tier in UnitTests "$filter"; do
        echo "== $sanitizer: $tier"
        log=$(mktemp)
        skip=()
        [ "$sanitizer" != address ] || [ -z "${SANITIZE_ADDRESS_SKIP:-}" ] || skip=(--skip "$SANITIZE_ADDRESS_SKIP")
        if GODWIT_BIN="$children" swift test --skip-build --scratch-path "$scratch" -Xswiftc -sanitize="$sanitizer" \
            --no-parallel --filter "$tier" "${skip[@]}" >"$log" 2>&1 && ! grep -q "Sanitizer:" "$log"; then
            grep -E "Test run with" "$log" | tail -1
        else
            grep -E "✘|Sanitizer|SUMMARY|Test run with" "$log" | head -40
            status=1
        fi
        rm -f "$log"
    done
done
exit $status

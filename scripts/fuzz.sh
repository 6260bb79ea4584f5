#!/usr/bin/env bash
# Builds the fuzz targets with libFuzzer and AddressSanitizer and runs each for a bounded time.
#   scripts/fuzz.sh [SECONDS_PER_TARGET] [TARGET...]     (default: 60 s, every target)
# New inputs that reach new code go to a work directory outside the repo; a crash is saved as
# fuzz/crashes/TARGET-*, the script fails, and the input belongs in fuzz/regressions/TARGET/ with a
# unit test. Prints the inputs executed per target.
set -euo pipefail
cd "$(dirname "$0")/.."
per_target=${1:-60}
shift || true
work=${GODWIT_FUZZ_WORK:-${TMPDIR:-/tmp}/godwit-fuzz}
mkdir -p "$work" fuzz/crashes
swift build --product godwit-fuzz >/dev/null                       # the replayer: lists the targets
swift build --product godwit-fuzz --scratch-path .build-fuzz \
    -Xswiftc -sanitize=fuzzer,address -Xswiftc -DFUZZING 2>&1 | grep -E "error|Compiling|Build complete" | grep -v "^\[" || true
fuzzer=.build-fuzz/debug/godwit-fuzz
[ -x "$fuzzer" ] || { echo "fuzz build failed" >&2; exit 1; }
targets=("$@")
[ ${#targets[@]} -gt 0 ] || mapfile -t targets < <(.build/debug/godwit-fuzz --list)
status=0
for target in "${targets[@]}"; do
    mkdir -p "$work/$target" "fuzz/corpus/$target" "fuzz/regressions/$target"
    log="$work/$target.log"
    # ASan's leak checker is off: the targets keep process-wide state (threads' caches) on purpose.
    if GODWIT_FUZZ_TARGET=$target ASAN_OPTIONS=detect_leaks=0 "$fuzzer" -max_total_time="$per_target" -timeout=20 \
        -rss_limit_mb=4096 -max_len=70000 -print_final_stats=1 -artifact_prefix="fuzz/crashes/$target-" \
        "$work/$target" "fuzz/corpus/$target" "fuzz/regressions/$target" >"$log" 2>&1; then
        result=ok
    else
        result="CRASH (see $log and fuzz/crashes/)"
        status=1
    fi
    runs=$(grep -E "^stat::number_of_executed_units" "$log" | awk "{print \$2}" | tail -1 || true)
    printf '%-18s %10s inputs in %ss  %s\n' "$target" "${runs:-?}" "$per_target" "$result"
done
exit $status

#!/usr/bin/env bash
# Runs every cargo-fuzz target of fuzz/ (decode, wire, state, control), one after the other.
#
#   scripts/fuzz.sh --seconds N   each target N seconds (CI: bounded time)
#   scripts/fuzz.sh --runs N      each target N executions (the long run)
#   scripts/fuzz.sh               same as --runs 10000000
#
# Each target is built once (cargo fuzz build -O -a: release, with overflow checks and debug
# assertions), then its binary runs on fuzz/corpus/<target> (committed seeds seed-*; what
# libFuzzer adds there is git-ignored). Prints one line per target,
#   fuzz <target>: <execs> execs in <secs> s (<rate>/s), no crash
# and writes target/bench/fuzz.json. A crash (panic, failed assertion, out-of-memory, timeout)
# fails the script, naming the target and the crashing input (fuzz/artifacts/<target>/);
# reproduce with `cargo +nightly fuzz run --fuzz-dir fuzz -O -a -s none <target> <artifact>`.
# libFuzzer's full output: target/bench/fuzz-logs/<target>.log.
#
# Toolchain: nightly when rustup has one, else the repository's (stable) toolchain with
# RUSTC_BOOTSTRAP=1; FUZZ_TOOLCHAIN=<name> forces one. cargo-fuzz is installed if missing.
# FUZZ_SANITIZER (default none): the decoders are safe Rust, and AddressSanitizer costs 5-15x
# (the KVM structs' 4 KiB stack buffers), so by default the fuzzers run without it;
# FUZZ_SANITIZER=address for a slower run with it.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
FUZZ_DIR=$ROOT/fuzz
OUT_DIR=$ROOT/target/bench
LOG_DIR=$OUT_DIR/fuzz-logs
# target:max_len
TARGETS=(decode:65536 wire:65536 state:65536 control:4096)
SANITIZER=${FUZZ_SANITIZER:-none}
TARGET_DIR=${FUZZ_TARGET_DIR:-$FUZZ_DIR/target/sanitizer-$SANITIZER}
TRIPLE=$(rustc -vV </dev/null | sed -n 's/^host: //p')

mode=runs
limit=10000000
while [ $# -gt 0 ]; do
    case "$1" in
        --seconds | --runs)
            [ $# -ge 2 ] && [[ "$2" =~ ^[1-9][0-9]*$ ]] || {
                echo "fuzz.sh: $1 needs a positive number" >&2
                exit 2
            }
            mode=${1#--}
            limit=$2
            shift 2
            ;;
        -h | --help)
            sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'
            exit 0
            ;;
        *)
            echo "fuzz.sh: unknown argument $1 (--seconds N | --runs N)" >&2
            exit 2
            ;;
    esac
done

# --- toolchain and cargo-fuzz ---
if [ -n "${FUZZ_TOOLCHAIN:-}" ]; then
    toolchain=$FUZZ_TOOLCHAIN
    cargo=(cargo "+$toolchain")
elif command -v rustup >/dev/null && rustup toolchain list </dev/null | grep -q '^nightly'; then
    toolchain=nightly
    cargo=(cargo +nightly)
else
    toolchain="$(rustc --version </dev/null | cut -d' ' -f2) (repository toolchain)"
    cargo=(cargo)
fi
case "$toolchain" in
    nightly*) ;;
    *) export RUSTC_BOOTSTRAP=1 ;; # cargo-fuzz passes -Z flags
esac
echo "fuzz: toolchain $toolchain${RUSTC_BOOTSTRAP:+ with RUSTC_BOOTSTRAP=1}, sanitizer $SANITIZER, $mode $limit per target"
cd "$ROOT"
if ! "${cargo[@]}" fuzz --version </dev/null >/dev/null 2>&1; then
    echo "fuzz: cargo-fuzz missing, installing it (cargo install cargo-fuzz --locked)"
    cargo install cargo-fuzz --locked </dev/null
fi

mkdir -p "$LOG_DIR"
results=()
crashes=()

# run <target> <max_len>: fuzzes one target; appends its figures to results / crashes
run() {
    local t=$1 max_len=$2
    local bin=$TARGET_DIR/$TRIPLE/release/$t
    local corpus=$FUZZ_DIR/corpus/$t artifacts=$FUZZ_DIR/artifacts/$t/
    local log=$LOG_DIR/$t.log
    mkdir -p "$corpus" "$artifacts"
    local budget
    if [ "$mode" = seconds ]; then budget=-max_total_time=$limit; else budget=-runs=$limit; fi
    echo "fuzz: running $t ($budget, -max_len=$max_len, corpus $(find "$corpus" -type f | wc -l) inputs)"
    local t0 t1 rc=0
    t0=$(date +%s.%N)
    "$bin" "$budget" -rss_limit_mb=2048 -max_len="$max_len" -timeout=20 \
        -print_final_stats=1 -artifact_prefix="$artifacts" "$corpus" </dev/null >"$log" 2>&1 &
    local pid=$! ticks=0
    while kill -0 "$pid" 2>/dev/null; do
        sleep 1
        ticks=$((ticks + 1))
        if [ $((ticks % 30)) -eq 0 ]; then
            # libFuzzer status line: "#N  EVENT cov: .. corp: A/B lim: .. exec/s: R rss: ..."
            local status
            status=$(grep -a '^#[0-9]' "$log" | tail -n 1 |
                sed -n 's/^#\([0-9]*\).*corp: \([0-9]*\)\/.*exec\/s: \([0-9]*\).*/\1 execs, \3\/s, corpus \2/p' || true)
            echo "fuzz:   $t ${ticks} s: ${status:-starting}"
        fi
    done
    wait "$pid" || rc=$?
    t1=$(date +%s.%N)
    local execs secs rate
    execs=$(sed -n 's/^stat::number_of_executed_units: *\([0-9]*\).*/\1/p' "$log" | tail -n 1)
    [ -n "$execs" ] || execs=$(sed -n 's/^Done \([0-9]*\) runs.*/\1/p' "$log" | tail -n 1)
    [ -n "$execs" ] || execs=$(grep -a '^#[0-9]' "$log" | tail -n 1 | sed 's/^#\([0-9]*\).*/\1/')
    [ -n "$execs" ] || execs=0
    secs=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.1f", b - a }')
    rate=$(awk -v n="$execs" -v s="$secs" 'BEGIN { printf "%d", (s > 0 ? n / s : 0) }')
    local crash=""
    if [ "$rc" -ne 0 ] || grep -aq '^==[0-9]*== *ERROR: libFuzzer' "$log"; then
        crash=$(sed -n 's/.*Test unit written to \(.*\)$/\1/p' "$log" | grep -v 'slow-unit-' | tail -n 1 || true)
        local why
        why=$(grep -a -m1 -E "panicked at|ERROR: libFuzzer|ERROR: AddressSanitizer|out-of-memory|ALARM" "$log" || true)
        echo "fuzz $t: CRASH after $execs execs in $secs s (exit $rc): ${why:-see $log}"
        echo "fuzz $t: crashing input ${crash:-(none written; see $log)}"
        grep -a -A12 'panicked at' "$log" | head -n 14 || true
        crashes+=("$t: ${crash:-see $log}")
        [ -n "$crash" ] || crash="see $log"
    else
        echo "fuzz $t: $execs execs in $secs s (${rate}/s), no crash"
    fi
    local crash_json=null
    [ -z "$crash" ] || crash_json="\"${crash//\"/\\\"}\""
    results+=("    \"$t\": {\"execs\": $execs, \"seconds\": $secs, \"rate\": $rate, \"max_len\": $max_len, \"crash\": $crash_json}")
}

for spec in "${TARGETS[@]}"; do
    t=${spec%%:*}
    echo "fuzz: building $t (cargo fuzz build -O -a -s $SANITIZER)"
    "${cargo[@]}" fuzz build --fuzz-dir "$FUZZ_DIR" -O -a -s "$SANITIZER" \
        --target-dir "$TARGET_DIR" "$t" </dev/null
done
for spec in "${TARGETS[@]}"; do
    run "${spec%%:*}" "${spec##*:}"
done

mkdir -p "$OUT_DIR"
{
    echo "{"
    echo "  \"mode\": \"$mode\","
    echo "  \"limit\": $limit,"
    echo "  \"toolchain\": \"$toolchain\","
    echo "  \"sanitizer\": \"$SANITIZER\","
    echo "  \"ok\": $([ ${#crashes[@]} -eq 0 ] && echo true || echo false),"
    echo "  \"targets\": {"
    for i in "${!results[@]}"; do
        if [ "$i" -lt $((${#results[@]} - 1)) ]; then echo "${results[$i]},"; else echo "${results[$i]}"; fi
    done
    echo "  }"
    echo "}"
} >"$OUT_DIR/fuzz.json"
echo "fuzz: wrote $OUT_DIR/fuzz.json"
if [ ${#crashes[@]} -gt 0 ]; then
    for c in "${crashes[@]}"; do echo "fuzz: FAILED $c" >&2; done
    exit 1
fi

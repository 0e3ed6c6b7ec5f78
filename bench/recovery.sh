#!/usr/bin/env bash
# Post-copy recovery after a link cut (our vmm, release builds; needs root for namespaces):
#
#   bench/recovery.sh [--runs N] [--mem MIB] [--rate-mbit R] [--cut-s S] [--help]
#
# Two namespaces on a rate-limited link (tbf); the guest migrates A -> B once undisturbed and
# once with A's uplink down for S seconds (default 30) 1.5 s after the destination resumed.
# Prints the extra time the cut cost against S + 1 s, the destination's reconnects and time
# without a source, and whether the guest's checksum of its memory is unchanged. Writes
# target/bench/recovery.json. More: target/release/vm-recovery --help
set -euo pipefail
cd "$(dirname "$0")/.."
target="${CARGO_TARGET_DIR:-target}"
for a in "$@"; do
  case "$a" in -h|--help) sed -n '2,10p' "$0"; exit 0 ;; esac
done
echo "[vm-recovery] building (release)"
cargo build --release --quiet -p vmm -p bench
exec "$target/release/vm-recovery" --vmm "$target/release/vmm" "$@"

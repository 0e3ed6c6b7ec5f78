#!/usr/bin/env bash
# A migrating VM's network and disk (our vmm, release builds; needs root for namespaces/taps):
#
#   bench/devices.sh [--quick] [--runs N] [--mem MIB] [--disk MIB] [--no-net] [--no-disk] [--help]
#
# Network: the guest answers UDP echo requests sent every 1 ms from a client namespace while it
# migrates between two bridged "host" namespaces (virtio-net on a tap, RARP announce); prints
# the longest gap between answers against 2 x downtime + 10 ms, for postcopy and hybrid.
# Disk: the same guest with a disk full of data migrates over loopback with the disk on shared
# storage and with --copy-disk; prints the downtime each way and the copy's total time against
# (RAM + disk) / raw loopback TCP throughput measured in the same run. Writes
# target/bench/devices.json. More: target/release/vm-devices --help
set -euo pipefail
cd "$(dirname "$0")/.."
target="${CARGO_TARGET_DIR:-target}"
for a in "$@"; do
  case "$a" in -h|--help) sed -n '2,12p' "$0"; exit 0 ;; esac
done
echo "[vm-devices] building (release)"
cargo build --release --quiet -p vmm -p bench
exec "$target/release/vm-devices" --vmm "$target/release/vmm" "$@"

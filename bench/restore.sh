#!/usr/bin/env bash
# Boot, snapshot, eager and lazy restore of our guest, measured with the real vmm and
# page-server (release builds):
#
#   bench/restore.sh [--quick] [--sizes 1024,4096] [--vcpus N] [--rate PAGES/S] [--repeat N]
#
# Per size: the guest boots (its workload writing --rate random pages/s), is snapshotted while
# it writes, and is restored eagerly (memory file read first) and lazily (page-server on
# loopback). Prints a table; writes target/bench/restore.json. --quick: 256 MiB and 1 GiB.
set -euo pipefail
cd "$(dirname "$0")/.."
args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) args+=(--sizes 256,1024 --run-s 1 --repeat 3) ;;
    --sizes|--vcpus|--rate|--out|--repeat) args+=("$1" "$2"); shift ;;
    -h|--help) sed -n '2,9p' "$0"; exit 0 ;;
    *) echo "restore.sh: unknown argument '$1' (try --help)" >&2; exit 2 ;;
  esac
  shift
done
echo "[vm-restore] building (release)"
cargo build --release --quiet -p vmm -p page-server -p bench
exec target/release/vm-restore "${args[@]}"

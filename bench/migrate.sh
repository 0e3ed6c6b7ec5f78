#!/usr/bin/env bash
# Post-copy live migration of our guest over loopback, our vmm vs QEMU (same guest ELF, memory
# and vCPUs), measured the same way (release builds):
#
#   bench/migrate.sh [--quick] [--sizes 1024,4096] [--vcpus N] [--rate PAGES/S] [--out PATH]
#                    [--no-qemu] [--qemu PATH] [--modes] [--help]
#
# Per size: boot the guest (its workload writing --rate random pages/s), migrate it with our vmm
# (vmm --incoming + vmm ctl migrate) and with QEMU (postcopy-ram + postcopy-preempt), and print
# downtime, heartbeat freeze and stall, total time against the loopback TCP limit, with the
# targets. Writes target/bench/migrate.json. --quick: 1 GiB only, shorter. QEMU comes from
# scripts/fetch-qemu.sh (run here if its wrapper is missing); without it qemu_* are null.
# --modes: one size (1 GiB with --quick), every mode: ours postcopy / hybrid / precopy, QEMU
# postcopy / precopy / precopy->postcopy; writes target/bench/migrate-modes.json.
# More options (--run-s, --timeout-s, --qemu-accel, --no-ours, ...): target/release/vm-migrate --help
set -euo pipefail
cd "$(dirname "$0")/.."
target="${CARGO_TARGET_DIR:-target}"
qemu=target/qemu/qemu-system-x86_64
no_qemu=0
args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --quick|--no-qemu|--no-ours|--modes) args+=("$1"); [ "$1" = --no-qemu ] && no_qemu=1 ;;
    --qemu) qemu="$2"; shift ;;
    --sizes|--vcpus|--rate|--out|--run-s|--timeout-s|--workdir|--qemu-accel|--vmm)
      [ $# -ge 2 ] || { echo "migrate.sh: $1 needs a value" >&2; exit 2; }
      args+=("$1" "$2"); shift ;;
    -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
    *) echo "migrate.sh: unknown argument '$1' (try --help)" >&2; exit 2 ;;
  esac
  shift
done
if [ "$no_qemu" = 0 ] && [ "$qemu" = target/qemu/qemu-system-x86_64 ] && [ ! -x "$qemu" ]; then
  echo "[vm-migrate] $qemu missing: running scripts/fetch-qemu.sh (QEMU 10 from bookworm-backports into target/qemu)"
  scripts/fetch-qemu.sh || echo "[vm-migrate] scripts/fetch-qemu.sh failed: QEMU figures will be null"
fi
echo "[vm-migrate] building (release)"
cargo build --release --quiet -p vmm -p bench
exec "$target/release/vm-migrate" --qemu "$qemu" "${args[@]}"

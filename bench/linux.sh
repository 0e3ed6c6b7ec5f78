#!/usr/bin/env bash
# Live migration of a Linux guest, our vmm vs QEMU, side by side inside the simulated
# hardware-virt host (scripts/hwvirt-host.sh: QEMU TCG with SVM + NPT as "L1", Debian's cloud
# kernel with kvm-amd in it). Both VMMs run the same Linux guest ("L2": Debian's cloud kernel,
# the witness initramfs of scripts/linux-guest.sh), memory, vCPUs and workload on L1's KVM, and
# migrate it over L1's loopback; QEMU runs with -accel kvm, postcopy-ram + postcopy-preempt.
#
#   bench/linux.sh [--quick] [--repeat N] [--mem MIB] [--modes] [--cpus N] [--timeout S]
#                  [--cmdline 'GUEST CMDLINE'] [--out PATH]
#
# Per run: downtime as each VMM reports it, freeze (longest heartbeat gap) and stall, total time,
# fault p50/p99, pages by origin, the witness's memory verdict on the destination, and L1's raw
# loopback RTT and TCP limit measured in the same run, with PASS/MISS per target (as
# bench/migrate.sh). --repeat N: N migrations per VMM, then a tally (how many moved the guest
# intact) and medians. --modes: every mode of both VMMs once. --quick: one run (a few minutes).
# Before the measured runs each VMM moves the guest once uncounted (a warm-up of L1's TCG).
# JSON: target/bench/linux-migrate.json (--modes: linux-migrate-modes.json); every run's logs and
# serial timelines: target/bench/linux/. Everything in L1 is TCG-slow (its loopback RTT is
# ~0.5-1 ms, not ~15 us): only ratios against the same-run baselines mean anything.
set -euo pipefail
cd "$(dirname "$0")/.."
repeat=3
mem=512
cpus=2
modes=0
timeout_s=2400
cmdline="console=ttyS0 quiet witness.mib=300 witness.rate=2000 witness.hb=20"
out=target/bench/linux-migrate.json
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) repeat=1 ;;
    --modes) modes=1 ;;
    --repeat|--mem|--cpus|--timeout|--cmdline|--out)
      [ $# -ge 2 ] || { echo "linux.sh: $1 needs a value" >&2; exit 2; }
      case "$1" in
        --repeat) repeat="$2" ;; --mem) mem="$2" ;; --cpus) cpus="$2" ;;
        --timeout) timeout_s="$2" ;; --cmdline) cmdline="$2" ;; --out) out="$2" ;;
      esac
      shift ;;
    -h|--help) sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "linux.sh: unknown argument '$1' (try --help)" >&2; exit 2 ;;
  esac
  shift
done
[[ "$repeat" =~ ^[0-9]+$ && "$mem" =~ ^[0-9]+$ ]] || { echo "linux.sh: --repeat and --mem want numbers" >&2; exit 2; }

[ -x target/qemu/qemu-system-x86_64 ] || scripts/fetch-qemu.sh
[ -f target/linux/vmlinuz ] || scripts/fetch-linux-kernel.sh
echo "[linux-bench] building (release)"
cargo build --release --quiet -p vmm -p page-server -p bench
work=target/bench/linux
rm -rf "$work"
mkdir -p "$work" "$(dirname "$out")"
args=(--linux-kernel /l2/vmlinuz --linux-initrd /l2/initrd.gz --linux-cmdline "$cmdline"
      --vmm /bin/vmm --qemu /qemu/qemu --qemu-bios /qemu/fw/qboot.rom --qemu-accel kvm
      --sizes "$mem" --vcpus 2 --workdir /results/work --out /results/linux-migrate.json)
# one uncounted migration per VMM first: TCG translates L1's KVM code paths on their first run,
# which made whichever VMM moved first in a fresh L1 pay ~25 ms of downtime more (vm-migrate
# --help, --warm-up)
if [ "$modes" = 1 ]; then args+=(--modes); else args+=(--repeat "$repeat" --warm-up); fi
printf '%q ' vm-migrate "${args[@]}" > "$work/job.sh"
echo "[linux-bench] L1: $cpus CPUs; guest: $mem MiB, 2 vCPUs, $cmdline"
rc=0
scripts/hwvirt-host.sh --with-qemu --cpus "$cpus" --timeout "$timeout_s" --out "$work" \
  --file target/release/vm-migrate:/bin/vm-migrate "$work/job.sh" || rc=$?
for f in linux-migrate.json migrate-modes.json; do
  [ -f "$work/$f" ] || continue
  dst="$out"
  [ "$f" = linux-migrate.json ] || dst="$(dirname "$out")/linux-migrate-modes.json"
  cp "$work/$f" "$dst"
  echo "[linux-bench] wrote $dst (logs and serial timelines in $work/work)"
done
exit "$rc"

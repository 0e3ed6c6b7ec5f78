#!/usr/bin/env bash
# A simulated hardware-virtualization host ("L1") for running Linux guests under our vmm.
#
# This machine's KVM (PVM kind) emulates guest ring-0 code, so a Linux guest cannot boot on it in
# useful time. QEMU under TCG with `-cpu EPYC,+svm,+npt` gives its guest working AMD SVM with
# nested paging: Debian's cloud kernel loads kvm-amd there, /dev/kvm appears, and our vmm runs
# Linux guests ("L2") at hardware-virtualization speed relative to everything else in L1.
#
#   scripts/hwvirt-host.sh [options] SCRIPT [ARGS...]   # run SCRIPT (sh, busybox) inside L1
#   scripts/hwvirt-host.sh [options] -c 'COMMANDS'       # run a command line inside L1
#   scripts/hwvirt-host.sh --shell                       # an interactive L1 (serial on stdio)
#
# Options:
#   --out DIR        where the files the job leaves in /results come back (default target/hwvirt/out)
#   --file SRC[:DST] put a host file into L1 at DST (default /files/<name>); repeatable
#   --timeout S      end QEMU after S seconds of wall time, whatever happens (default 900); the
#                    job itself is killed in L1 after 3/4 of that, so its results still come back
#   --mem SIZE       L1's memory (default 3G); --cpus N its vCPUs (default 2)
#   --log FILE       L1's whole serial output (default DIR/serial.log)
#   --quiet          do not echo L1's console (it still goes to the log)
#
# Environment, for experiments with the simulated host itself (defaults are what tests use):
#   HWVIRT_QEMU=PATH        the QEMU binary that runs L1 (default target/qemu/qemu-system-x86_64)
#   HWVIRT_CPU=MODEL        L1's -cpu (default EPYC,+svm,+npt)
#   HWVIRT_TCG_THREAD=single|multi   TCG threading (default multi: one host thread per L1 CPU)
#   HWVIRT_L1_KERNEL=DIR    L1's kernel and modules from another unpacked linux-image package
#                           (`dpkg -x`; e.g. bookworm-backports' 6.12); L2 keeps the default one
#
# What L1 holds (built only from Debian packages and this project's release binaries, cached in
# target/hwvirt/ and rebuilt when an input changes):
#   - Debian's cloud kernel (scripts/fetch-linux-kernel.sh) with kvm.ko, kvm-amd.ko, irqbypass.ko,
#     tun, bridge and virtio-pci/blk modules from the same package;
#   - busybox-static (apt-get download + dpkg -x) as the whole user space;
#   - target/release/{vmm,page-server} with the libraries `ldd` lists;
#   - /l2/vmlinuz (the same kernel) and /l2/initrd.gz, the Linux guest (scripts/linux-guest.sh),
#     /l2/disk.ext4 (an empty ext4 image for its disk) and /bin/witness (the static witness, whose
#     `witness peer` is the other end of the guest's TCP stream);
#   - QEMU 10 (scripts/fetch-qemu.sh) under /qemu when --with-qemu is given, for side-by-side runs.
# In L1 the job runs as /job.sh with `set -e` off, cwd /results; /results is tarred onto a raw
# virtio disk on the way out and unpacked into --out here. The job's exit status becomes ours.
# Exit status: the job's, or 124 when the timeout ended QEMU, or 125 when L1 did not come up or
# ended without reporting (its console log says why).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cache="$root/target/hwvirt"
out="$cache/out"
timeout_s=900
mem=3G
cpus=2
log=""
quiet=0
shell=0
with_qemu=0
tcg_thread="${HWVIRT_TCG_THREAD:-multi}"
files=()
job=""
job_args=()

die() { echo "hwvirt-host: $*" >&2; exit 125; }

while [ $# -gt 0 ]; do
  case "$1" in
    --out) out="$2"; shift 2 ;;
    --file) files+=("$2"); shift 2 ;;
    --timeout) timeout_s="$2"; shift 2 ;;
    --mem) mem="$2"; shift 2 ;;
    --cpus) cpus="$2"; shift 2 ;;
    --log) log="$2"; shift 2 ;;
    --quiet) quiet=1; shift ;;
    --shell) shell=1; shift ;;
    --with-qemu) with_qemu=1; shift ;;
    -c) job="$(mktemp)"; printf '%s\n' "$2" > "$job"; shift 2; job_args=("$@"); break ;;
    -h|--help) sed -n '2,30p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    -*) die "unknown option $1 (see --help)" ;;
    *) job="$1"; shift; job_args=("$@"); break ;;
  esac
done
[ "$shell" = 1 ] || [ -n "$job" ] || die "nothing to run: give SCRIPT, -c COMMANDS or --shell (see --help)"
[ -z "$job" ] || [ -f "$job" ] || die "no such script: $job"
[[ "$timeout_s" =~ ^[0-9]+$ ]] || die "--timeout wants whole seconds, not $timeout_s"

# --- inputs -----------------------------------------------------------------------------------
qemu="${HWVIRT_QEMU:-$root/target/qemu/qemu-system-x86_64}"
[ -x "$qemu" ] || die "QEMU is missing: run scripts/fetch-qemu.sh first ($qemu)"
kernel="$root/target/linux/vmlinuz"
[ -f "$kernel" ] || die "the Debian cloud kernel is missing: run scripts/fetch-linux-kernel.sh first ($kernel)"
l2_kernel="$kernel"
l1_pkg="${HWVIRT_L1_KERNEL:-$root/target/linux/pkg}"
kver="$(ls "$l1_pkg/lib/modules" 2>/dev/null | head -n 1)"
[ -n "$kver" ] || die "no modules in $l1_pkg/lib/modules: run scripts/fetch-linux-kernel.sh again"
moddir="$l1_pkg/lib/modules/$kver/kernel"
if [ -n "${HWVIRT_L1_KERNEL:-}" ]; then
  kernel="$(ls "$l1_pkg"/boot/vmlinuz-* 2>/dev/null | head -n 1)"
  [ -f "$kernel" ] || die "HWVIRT_L1_KERNEL=$l1_pkg has no boot/vmlinuz-*"
fi
for b in vmm page-server; do
  [ -x "$root/target/release/$b" ] || die "target/release/$b is missing: run cargo build --release first"
done
l2_initrd="$cache/l2-initrd.gz"
l2_disk="$cache/l2-disk.ext4"
witness="$root/target/release/witness-static"
"$root/scripts/linux-guest.sh" >/dev/null || die "building the Linux guest's initramfs failed (scripts/linux-guest.sh)"
for t in gzip tar; do command -v "$t" >/dev/null || die "$t is missing (apt-get install $t)"; done
[ -e /dev/kvm ] || echo "hwvirt-host: note: no /dev/kvm here; QEMU runs L1 under TCG anyway" >&2

mkdir -p "$cache"
# busybox-static, from Debian's archive (shared with scripts/linux-guest.sh)
busybox="$("$root/scripts/linux-guest.sh" --busybox)"
[ -x "$busybox" ] || die "busybox-static could not be fetched"

# --- the L1 base image: busybox, modules, /init (rebuilt when any input changes) -------------
self_hash="$(cat "$0" | sha256sum | cut -c1-16)"
base="$cache/l1-base-$self_hash-$kver.cpio.gz"
if [ ! -f "$base" ]; then
  rm -f "$cache"/l1-base-*.cpio.gz
  d="$(mktemp -d)"
  mkdir -p "$d"/{bin,sbin,proc,sys,dev,tmp,run,results,lib/modules,lib64,etc,l2,files,qemu}
  cp "$busybox" "$d/bin/busybox"
  for a in $("$busybox" --list); do [ "$a" = busybox ] || ln -sf busybox "$d/bin/$a"; done
  for m in virt/lib/irqbypass.ko arch/x86/kvm/kvm.ko arch/x86/kvm/kvm-amd.ko \
           drivers/virtio/virtio.ko drivers/virtio/virtio_ring.ko \
           drivers/virtio/virtio_pci_legacy_dev.ko drivers/virtio/virtio_pci_modern_dev.ko \
           drivers/virtio/virtio_pci.ko drivers/block/virtio_blk.ko \
           drivers/net/tun.ko net/llc/llc.ko net/802/stp.ko net/bridge/bridge.ko; do
    if [ -f "$moddir/$m" ]; then
      cp "$moddir/$m" "$d/lib/modules/"
    elif [ -f "$moddir/$m.xz" ]; then
      xz -dc "$moddir/$m.xz" > "$d/lib/modules/$(basename "$m")"
    elif grep -q "/$m\$" "$moddir/../modules.builtin" 2>/dev/null; then
      :  # built into this kernel
    else
      die "module $m is not in $kver's package"
    fi
  done
  cat > "$d/init" <<'INIT'
#!/bin/sh
# L1's init: bring up /proc, /sys, /dev, load KVM (AMD SVM) and the results disk, run the job.
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
mount -t tmpfs -o size=1500m tmp /tmp; mkdir -p /dev/shm /dev/pts; mount -t tmpfs shm /dev/shm
mount -t devpts devpts /dev/pts
ip link set lo up
# No transparent huge pages in L1: with them, L1 was seen to hang here (khugepaged and a kworker
# blocked for minutes, the job never ending) under the TCG-emulated nested paging.
echo never > /sys/kernel/mm/transparent_hugepage/enabled
echo never > /sys/kernel/mm/transparent_hugepage/defrag
for m in irqbypass kvm kvm-amd virtio virtio_ring virtio_pci_legacy_dev virtio_pci_modern_dev \
         virtio_pci virtio_blk tun llc stp bridge; do
  [ -f /lib/modules/$m.ko ] || continue  # built in
  insmod /lib/modules/$m.ko 2>/tmp/insmod.err || { echo "L1: insmod $m failed: $(cat /tmp/insmod.err)"; }
done
echo "L1: up, kernel $(uname -r), $(grep -c ^processor /proc/cpuinfo) CPUs, $(grep -o -w -m1 -E 'svm' /proc/cpuinfo | head -1)+$(grep -o -w -m1 -E 'npt' /proc/cpuinfo | head -1)"
dmesg | grep -E 'kvm|SVM|Nested' | sed 's/^/L1 dmesg: /' | tail -4
[ -e /dev/kvm ] || echo "L1: no /dev/kvm after loading kvm-amd"
if [ -f /shell ]; then
  echo "L1: interactive shell (poweroff -f to end)"
  setsid sh -c 'exec sh </dev/ttyS0 >/dev/ttyS0 2>&1'
  rc=0
else
  cd /results
  # L1's own pulse on its console: when L1 itself freezes (the simulated host, README's "Linux
  # guests") the last tick dates it, and a job that only went quiet is told apart from it
  ( while sleep 30; do echo "L1 tick uptime=$(cut -d' ' -f1 /proc/uptime)"; done ) &
  tick=$!
  echo "L1: job starts"
  # the job's own deadline (3/4 of --timeout): a job that hangs is killed here, so that its
  # /results (logs) still come back and say where it hung
  dl=$(cat /job.deadline)
  timeout -s KILL "$dl" sh /job.sh $(cat /job.args 2>/dev/null)
  rc=$?
  if [ $rc = 137 ]; then
    echo "L1: the job did not end within its deadline of $dl s and was killed; processes:"
    ps | grep -v ' \[' | tail -n 25
    for f in /results/*.log /results/*.err; do
      [ -s "$f" ] && { echo "L1: tail of $f:"; tail -n 4 "$f"; }
    done
  fi
  kill $tick 2>/dev/null
  echo "L1: job ended with status $rc"
fi
cd /
if [ -b /dev/vda ]; then
  tar -cf /dev/vda -C /results . 2>/tmp/tar.err || echo "L1: saving /results failed: $(cat /tmp/tar.err)"
  sync
else
  echo "L1: no results disk (/dev/vda)"
fi
echo "HWVIRT_EXIT=$rc"
poweroff -f
INIT
  chmod +x "$d/init"
  (cd "$d" && find . | "$busybox" cpio -o -H newc 2>/dev/null | gzip -1) > "$base.tmp"
  mv "$base.tmp" "$base"
  rm -rf "$d"
fi

# --- this project's binaries and the L2 guest (rebuilt when one of them is newer) -------------
bins="$cache/l1-bins.cpio.gz"
newest="$(ls -t "$root/target/release/vmm" "$root/target/release/page-server" "$l2_initrd" "$l2_disk" "$witness" "$l2_kernel" | head -n 1)"
if [ ! -f "$bins" ] || [ "$newest" -nt "$bins" ]; then
  d="$(mktemp -d)"
  mkdir -p "$d/bin" "$d/l2" "$d/lib64" "$d/lib/x86_64-linux-gnu"
  for b in vmm page-server; do
    cp "$root/target/release/$b" "$d/bin/"
    for lib in $(ldd "$root/target/release/$b" | grep -o '/[^ ]*'); do
      mkdir -p "$d$(dirname "$lib")"
      cp -L "$lib" "$d$lib"
    done
  done
  cp "$l2_kernel" "$d/l2/vmlinuz"
  cp "$l2_initrd" "$d/l2/initrd.gz"
  cp "$l2_disk" "$d/l2/disk.ext4"
  cp "$witness" "$d/bin/witness"
  (cd "$d" && find . | "$busybox" cpio -o -H newc 2>/dev/null | gzip -1) > "$bins.tmp"
  mv "$bins.tmp" "$bins"
  rm -rf "$d"
fi

# --- QEMU for L1 (only with --with-qemu) ----------------------------------------------------
parts=("$base" "$bins")
if [ "$with_qemu" = 1 ]; then
  qcpio="$cache/l1-qemu.cpio.gz"
  qroot="$root/target/qemu/root"
  if [ ! -f "$qcpio" ] || [ "$qroot" -nt "$qcpio" ]; then
    d="$(mktemp -d)"
    mkdir -p "$d/qemu/bin" "$d/qemu/lib" "$d/qemu/fw"
    cp "$qroot/usr/bin/qemu-system-x86_64" "$d/qemu/bin/"
    cp -L "$root"/target/qemu/fw/* "$d/qemu/fw/"
    LD_LIBRARY_PATH="$qroot/usr/lib/x86_64-linux-gnu:$qroot/lib/x86_64-linux-gnu" \
      ldd "$qroot/usr/bin/qemu-system-x86_64" | grep -o '/[^ ]*' | while read -r lib; do
        cp -L "$lib" "$d/qemu/lib/"
      done
    cat > "$d/qemu/qemu" <<'Q'
#!/bin/sh
exec /qemu/lib/ld-linux-x86-64.so.2 --library-path /qemu/lib /qemu/bin/qemu-system-x86_64 -L /qemu/fw "$@"
Q
    chmod +x "$d/qemu/qemu"
    (cd "$d" && find . | "$busybox" cpio -o -H newc 2>/dev/null | gzip -1) > "$qcpio.tmp"
    mv "$qcpio.tmp" "$qcpio"
    rm -rf "$d"
  fi
  parts+=("$qcpio")
fi

# --- this run: the job and its files --------------------------------------------------------
run="$(mktemp -d "$cache/run.XXXXXX")"
qpid=""
cleanup() {
  [ -n "$qpid" ] && kill "$qpid" 2>/dev/null || true
  rm -rf "$run"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
mkdir -p "$run/img/files"
if [ "$shell" = 1 ]; then
  touch "$run/img/shell"
else
  cp "$job" "$run/img/job.sh"
  printf '%s ' "${job_args[@]}" > "$run/img/job.args"
  echo $((timeout_s * 3 / 4)) > "$run/img/job.deadline"
fi
for f in "${files[@]}"; do
  src="${f%%:*}"
  dst="/files/$(basename "$src")"
  [[ "$f" == *:* ]] && dst="${f#*:}"
  [ -e "$src" ] || die "--file $src: no such file"
  mkdir -p "$run/img$(dirname "$dst")"
  cp -rL "$src" "$run/img$dst"
done
(cd "$run/img" && find . | "$busybox" cpio -o -H newc 2>/dev/null | gzip -1) > "$run/job.cpio.gz"
cat "${parts[@]}" "$run/job.cpio.gz" > "$run/initrd.gz"
truncate -s 512M "$run/results.img"
mkdir -p "$out"
[ -n "$log" ] || log="$out/serial.log"
: > "$log"

qemu_args=(-accel "tcg,thread=$tcg_thread" -cpu "${HWVIRT_CPU:-EPYC,+svm,+npt}" -smp "$cpus" -m "$mem"
  -kernel "$kernel" -initrd "$run/initrd.gz"
  -append "console=ttyS0 quiet panic=-1 oops=panic"
  -display none -nodefaults -no-reboot
  -drive "file=$run/results.img,if=virtio,format=raw,cache=unsafe")
if [ "$shell" = 1 ]; then
  exec "$qemu" "${qemu_args[@]}" -serial stdio
fi
start=$(date +%s)
timeout --kill-after=10 "$timeout_s" "$qemu" "${qemu_args[@]}" -serial "file:$log" </dev/null >"$run/qemu.out" 2>&1 &
qpid=$!
if [ "$quiet" = 0 ]; then
  tail -n +1 -f "$log" --pid="$qpid" 2>/dev/null &
fi
set +e
wait "$qpid"
qrc=$?
set -e
qpid=""
sleep 0.3
elapsed=$(( $(date +%s) - start ))
if [ "$qrc" = 124 ] || [ "$qrc" = 137 ]; then
  echo "hwvirt-host: L1 did not finish within ${timeout_s} s; QEMU was ended (log: $log)" >&2
  exit 124
fi
if [ "$qrc" != 0 ]; then
  echo "hwvirt-host: QEMU exited with status $qrc: $(tail -3 "$run/qemu.out")" >&2
  exit 125
fi
rc="$(grep -a -o 'HWVIRT_EXIT=[0-9]*' "$log" | tail -n 1 | cut -d= -f2)"
if [ -z "$rc" ]; then
  echo "hwvirt-host: L1 ended without reporting the job's status after ${elapsed} s (log: $log):" >&2
  tail -n 15 "$log" >&2
  exit 125
fi
tar -xf "$run/results.img" -C "$out" 2>/dev/null || true
echo "hwvirt-host: job status $rc after ${elapsed} s; results in $out, console in $log" >&2
exit "$rc"

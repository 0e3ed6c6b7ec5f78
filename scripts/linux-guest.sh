#!/usr/bin/env bash
# Builds the Linux guest's initramfs ("L2"): busybox-static from Debian's archive, the virtio
# modules of the Debian cloud kernel that scripts/fetch-linux-kernel.sh fetched, and our witness
# (guest/witness, built here as a static binary), with an /init that starts the witness on the
# serial console. Output: target/hwvirt/l2-initrd.gz (rebuilt when an input changes), and
# target/hwvirt/l2-disk.ext4, an empty 32 MiB ext4 image for the guest's virtio disk (the guest
# mounts /dev/vda at /mnt and the witness keeps its disk log there).
#
#   scripts/linux-guest.sh             # build (or keep) the initramfs, print its path
#   scripts/linux-guest.sh --busybox   # fetch busybox-static only, print the binary's path
#
# The guest's command line picks the workload: `witness.mib=N witness.rate=N witness.hb=MS`,
# `witness.log=/mnt/witness.log`, `witness.peer=10.0.2.1:5555` (see guest/witness/src/main.rs);
# `l2.shell` gives a shell on the console instead. A NIC (eth0) gets 10.0.2.15/24.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cache="$root/target/hwvirt"
mkdir -p "$cache"

busybox_bin() {
  local bb="$cache/busybox/bin/busybox"
  if [ ! -x "$bb" ]; then
    local d="$cache/busybox-deb"
    rm -rf "$d" "$cache/busybox"
    mkdir -p "$d"
    if ! (cd "$d" && apt-get download busybox-static >/dev/null 2>&1); then
      apt-get update -qq >/dev/null
      (cd "$d" && apt-get download busybox-static >/dev/null) ||
        { echo "linux-guest: apt-get download busybox-static failed" >&2; exit 1; }
    fi
    dpkg -x "$d"/busybox-static_*.deb "$cache/busybox"
    [ -x "$bb" ] || { echo "linux-guest: busybox-static has no bin/busybox" >&2; exit 1; }
  fi
  echo "$bb"
}

if [ "${1:-}" = "--busybox" ]; then
  busybox_bin
  exit 0
fi

bb="$(busybox_bin)"
kver="$(ls "$root/target/linux/pkg/lib/modules" 2>/dev/null | head -n 1)"
[ -n "$kver" ] || { echo "linux-guest: run scripts/fetch-linux-kernel.sh first" >&2; exit 1; }
moddir="$root/target/linux/pkg/lib/modules/$kver/kernel"

# The witness: static, so the initramfs needs no libraries.
witness="$root/target/release/witness-static"
src_newest="$(ls -t "$root"/guest/witness/src/*.rs "$root/guest/witness/Cargo.toml" | head -n 1)"
if [ ! -x "$witness" ] || [ "$src_newest" -nt "$witness" ]; then
  (cd "$root" && cargo rustc --release -q -p witness --bin witness -- -C target-feature=+crt-static) ||
    { echo "linux-guest: building the witness failed" >&2; exit 1; }
  cp "$root/target/release/witness" "$witness.tmp"
  mv "$witness.tmp" "$witness"
  if readelf -d "$witness" | grep -q NEEDED; then
    echo "linux-guest: the witness is not a static binary (readelf -d lists NEEDED libraries)" >&2
    exit 1
  fi
fi

self="$root/scripts/linux-guest.sh"
disk="$cache/l2-disk.ext4"
if [ ! -f "$disk" ] || [ "$self" -nt "$disk" ]; then
  command -v mke2fs >/dev/null || { echo "linux-guest: mke2fs is missing (apt-get install e2fsprogs)" >&2; exit 1; }
  rm -f "$disk.tmp"
  mke2fs -q -F -t ext4 -L l2disk "$disk.tmp" 32M >/dev/null ||
    { echo "linux-guest: mke2fs of the guest's disk image failed" >&2; exit 1; }
  mv "$disk.tmp" "$disk"
fi

out="$cache/l2-initrd.gz"
if [ -f "$out" ] && [ "$out" -nt "$witness" ] && [ "$out" -nt "$self" ] && [ "$out" -nt "$bb" ]; then
  echo "$out"
  exit 0
fi
d="$(mktemp -d)"
trap 'rm -rf "$d"' EXIT
mkdir -p "$d"/{bin,proc,sys,dev,tmp,mnt,lib/modules}
cp "$bb" "$d/bin/busybox"
for a in $("$bb" --list); do [ "$a" = busybox ] || ln -sf busybox "$d/bin/$a"; done
cp "$witness" "$d/bin/witness"
for m in drivers/virtio/virtio.ko drivers/virtio/virtio_ring.ko drivers/virtio/virtio_mmio.ko \
         drivers/virtio/virtio_pci_legacy_dev.ko drivers/virtio/virtio_pci_modern_dev.ko \
         drivers/virtio/virtio_pci.ko drivers/block/virtio_blk.ko net/core/failover.ko \
         drivers/net/net_failover.ko drivers/net/virtio_net.ko; do
  [ -f "$moddir/$m" ] || { echo "linux-guest: module $m is not in $kver's package" >&2; exit 1; }
  cp "$moddir/$m" "$d/lib/modules/"
done
cat > "$d/init" <<'INIT'
#!/bin/sh
# The Linux guest's init: mounts, virtio modules, then the witness on the console.
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
mount -t tmpfs tmp /tmp
for m in virtio virtio_ring virtio_mmio virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci \
         virtio_blk failover net_failover virtio_net; do
  insmod /lib/modules/$m.ko 2>/dev/null
done
ip link set lo up
if [ -b /dev/vda ]; then
  if mount -t ext4 /dev/vda /mnt 2>/tmp/mount.err; then echo "L2 disk: /dev/vda (ext4) on /mnt"
  else echo "L2 disk: mounting /dev/vda failed: $(cat /tmp/mount.err)"; fi
fi
if [ -d /sys/class/net/eth0 ]; then
  ip addr add 10.0.2.15/24 dev eth0 && ip link set eth0 up && echo "L2 net: eth0 10.0.2.15/24 up"
fi
echo "L2 userspace up: $(uname -r), $(grep -c ^processor /proc/cpuinfo) CPUs online, $(ls /sys/block | grep -c vd) virtio disks, $(ls /sys/class/net | grep -c eth) NICs"
args=""
for w in $(cat /proc/cmdline); do
  case "$w" in
    witness.*) args="$args ${w#witness.}" ;;
    l2.shell) exec setsid sh -c 'exec sh </dev/console >/dev/console 2>&1' ;;
  esac
done
stty -echo 2>/dev/null
exec /bin/witness $args </dev/console >/dev/console 2>&1
INIT
chmod +x "$d/init"
(cd "$d" && find . | "$bb" cpio -o -H newc 2>/dev/null | gzip -1) > "$out.tmp"
mv "$out.tmp" "$out"
echo "$out"

#!/bin/sh
# Runs inside the simulated hardware-virt host (scripts/hwvirt-host.sh): boots the Linux guest
# under `vmm run` (2 vCPUs, 512 MiB, the kernel's full log on the console) with its ext4 virtio
# disk and a virtio NIC on L1's bridge (/l1lib.sh: l2_io), lets the witness run (memory writes,
# the disk log, the TCP stream to `witness peer` in L1), asks it to verify all three and leaves
# the console in /results/vm0.serial, the vmm's log in /results/vm0.log and the peer's in
# /results/peer.log. Exit status 0 when the verdict came back. The stock kernel finds the
# devices through the DSDT's LNRO0005 entries; its boot line counts them.
. /l1lib.sh
: > /tmp/pids
l2_io 1 || { echo "BOOT failed: setting up the guest's disk and network in L1"; exit 1; }
vmm run $SEC --mem 512M --vcpus 2 --kernel /l2/vmlinuz --initrd /l2/initrd.gz \
  --disk "$L2_DISK" --net tap=l2tap0,mac=$L2_MAC \
  --cmdline "console=ttyS0 witness.mib=300 witness.rate=2000 witness.hb=20 $L2_IO_CMDLINE" \
  --api-socket /tmp/vm0.sock --serial vm0.serial </dev/null >vm0.log 2>&1 &
pid=$!
ok=1
if wait_for vm0.serial "WITNESS READY" 120 >/dev/null; then
  # a few seconds of disk log and stream before the verdict
  wait_for vm0.serial "WITNESS NET up" 30 >/dev/null
  sleep 3
  before=$(grep -a -c . vm0.serial)
  vmm ctl --api-socket /tmp/vm0.sock serial-input "v
" >/dev/null
  wait_for vm0.serial "WITNESS VERDICT" 60 "$before" >/dev/null && ok=0
fi
grep -a -E "L2 |WITNESS" vm0.serial | grep -v "^WHB"
echo "peer: $(grep -c "PEER up" peer.log) connections, $(grep -c "PEER BAD" peer.log) BAD lines"
kill $pid $(cat /tmp/pids) 2>/dev/null
sleep 0.5
tail -3 vm0.log
exit $ok

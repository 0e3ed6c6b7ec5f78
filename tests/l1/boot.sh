#!/bin/sh
# Runs inside the simulated hardware-virt host (scripts/hwvirt-host.sh): boots the Linux guest
# under `vmm run` (2 vCPUs, 512 MiB, the kernel's full log on the console), lets the witness
# run, asks it to verify all of its memory and leaves the console in /results/vm0.serial and
# the vmm's log in /results/vm0.log. Exit status 0 when the verdict came back. The guest gets a
# virtio disk and a virtio NIC (a tap in L1): its boot line counts what the stock kernel found
# (through the DSDT's LNRO0005 devices).
dd if=/dev/zero of=/tmp/disk0.img bs=1M count=16 2>/dev/null
tunctl -t l2tap0 >/dev/null && ip link set l2tap0 up
vmm run --mem 512M --vcpus 2 --kernel /l2/vmlinuz --initrd /l2/initrd.gz \
  --disk /tmp/disk0.img --net tap=l2tap0,mac=52:54:00:12:34:56 \
  --cmdline "console=ttyS0 witness.mib=300 witness.rate=2000 witness.hb=20" \
  --api-socket /tmp/vm0.sock --serial vm0.serial </dev/null >vm0.log 2>&1 &
pid=$!
ok=1
for t in $(seq 1200); do
  grep -a -q "WITNESS READY" vm0.serial 2>/dev/null && ok=0 && break
  kill -0 $pid 2>/dev/null || break
  sleep 0.1
done
if [ $ok = 0 ]; then
  sleep 3
  vmm ctl --api-socket /tmp/vm0.sock serial-input "v
" >/dev/null
  ok=1
  for t in $(seq 600); do grep -a -q "WITNESS VERDICT" vm0.serial && ok=0 && break; sleep 0.1; done
fi
grep -a -E "L2 userspace|WITNESS" vm0.serial
kill $pid 2>/dev/null
sleep 0.5
tail -3 vm0.log
exit $ok

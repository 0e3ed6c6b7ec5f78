#!/bin/sh
# Runs inside the simulated hardware-virt host (scripts/hwvirt-host.sh): the Linux guest (with
# its disk and NIC, /l1lib.sh: l2_io) is moved post-copy with no background stream, so that it
# still needs its source, and the source vmm is killed (SIGKILL) while the guest runs on the
# destination. The destination must say so within a few seconds, keep the guest paused for good
# (no heartbeat any more; resume refused with the reason) and end with status 3 on shutdown.
# Leaves in /results: vm0.* / vm1.* (source / destination), status.json (the destination's
# status once it reported the loss), resume.out, threads.txt (the destination's threads' kernel
# stacks), and `summary` with one line
#   KILLED reported_ms=.. state=.. missing=.. hb_frozen=yes|no resume_refused=yes|no exit=..
. /l1lib.sh
# L1's uptime in centiseconds (busybox date has no %N)
uptime_cs() { cut -d' ' -f1 /proc/uptime | tr -d .; }
: > summary
: > /tmp/pids
cmdline="console=ttyS0 quiet witness.mib=300 witness.rate=2000 witness.hb=20 $L2_IO_CMDLINE"
l2_io 2 || { echo "BOOT failed: setting up the guest's disk and network in L1" | tee -a summary; exit 1; }
l2_boot 512M "$cmdline" || { kill $(cat /tmp/pids); exit 1; }
vmm --incoming tcp:127.0.0.1:7801 $SEC --disk-map "$L2_DISK" --no-stream --recover-timeout-s 3 --tap-map l2tap0=l2tap1 \
  --api-socket /tmp/vm1.sock --serial vm1.serial </dev/null >vm1.log 2>&1 &
dpid=$!
echo "$dpid" >> /tmp/pids
for t in $(seq 50); do [ -S /tmp/vm1.sock ] && break; sleep 0.1; done
vmm ctl --api-socket /tmp/vm0.sock --json migrate --to 127.0.0.1:7801 >mig1.out 2>mig1.err &
# the guest runs on the destination (heartbeats there), fetching pages from the source
if ! wait_for vm1.serial "^WHB" 60 >/dev/null; then
  echo "KILLED failed: the guest never ran on the destination" | tee -a summary
  kill $(cat /tmp/pids) 2>/dev/null; exit 1
fi
wait_for vm1.serial "^WHB" 10 "$(grep -a -c . vm1.serial)" >/dev/null
kill -9 $pid
t0=$(uptime_cs)
state=none; reported_ms=none
for t in $(seq 300); do
  timeout -s KILL 15 vmm ctl --api-socket /tmp/vm1.sock --json status >status.json 2>/dev/null
  rc=$?; if [ $rc = 124 ] || [ $rc = 137 ]; then state=status-hung; break; fi
  if grep -q '"source_lost":{' status.json; then
    reported_ms=$((($(uptime_cs) - t0) * 10))
    break
  fi
  sleep 0.05
done
# where each of the destination's threads is (kernel side), for a failure's diagnosis
for t in /proc/$dpid/task/*; do
  echo "== $(cat $t/comm) state=$(cut -d' ' -f3 $t/stat) wchan=$(cat $t/wchan 2>/dev/null)"
  cat $t/stack 2>/dev/null | head -n 12
done > threads.txt 2>&1
[ "$state" = status-hung ] || state=$(grep -o '"state":"[^"]*"' status.json | head -n 1 | cut -d'"' -f4)
missing=$(grep -o '"pages_missing":[0-9]*' status.json | head -n 1 | cut -d: -f2)
a=$(grep -a -c "^WHB" vm1.serial); sleep 1; b=$(grep -a -c "^WHB" vm1.serial)
frozen=no; [ "$a" = "$b" ] && frozen=yes
timeout -s KILL 10 vmm ctl --api-socket /tmp/vm1.sock --json resume >resume.out 2>&1
refused=no; grep -q "source was lost" resume.out && refused=yes
timeout -s KILL 10 vmm ctl --api-socket /tmp/vm1.sock shutdown >/dev/null 2>&1
dexit=running
for t in $(seq 100); do
  if ! kill -0 $dpid 2>/dev/null; then wait $dpid; dexit=$?; break; fi
  sleep 0.1
done
echo "KILLED reported_ms=$reported_ms state=$state missing=$missing hb_frozen=$frozen resume_refused=$refused exit=$dexit" | tee -a summary
grep -a -E "lost|ERROR" vm1.log | tail -4
kill $(cat /tmp/pids) 2>/dev/null
[ "$reported_ms" != none ] && [ "$frozen" = yes ] && [ "$refused" = yes ] && [ "$dexit" = 3 ]

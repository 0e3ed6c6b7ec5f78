#!/bin/sh
# Runs inside the simulated hardware-virt host (scripts/hwvirt-host.sh): boots the Linux guest
# under `vmm run`, snapshots it while the witness writes (state + memory file), ends that VM,
# serves the memory file with `page-server` and restores the guest lazily from it (every page
# through userfaultfd on demand, the rest streamed), then asks the witness to verify all of its
# memory, its disk log and its TCP stream (the guest's disk and NIC: /l1lib.sh, l2_io; the
# restored VM gets the first one's disk and tap). Leaves in /results: vm0.serial / vm0.log (the
# first VM), vm1.serial / vm1.log (the restored one), snap.out, ps.log, peer.log, and `summary`
# with one line
#   RESTORE rc=.. verdict=.. hb_after=.. disk=RECORDS/BAD net=STATE/BAD
# Usage: restore.sh [MEM] [WITNESS_MIB] [RATE]
mem=${1:-512M}; wmib=${2:-300}; rate=${3:-2000}
. /l1lib.sh
cmdline="console=ttyS0 quiet witness.mib=$wmib witness.rate=$rate witness.hb=20 $L2_IO_CMDLINE"
: > summary
: > /tmp/pids
# both vCPUs on L1's CPU 0: see migrate.sh
on_cpu0="--vcpu-cpus 0"

l2_io 1 || { echo "BOOT failed: setting up the guest's disk and network in L1" | tee -a summary; exit 1; }
l2_boot "$mem" "$cmdline" $on_cpu0 || { kill $(cat /tmp/pids); exit 1; }
timeout 300 vmm ctl --api-socket /tmp/vm0.sock --json snapshot --state /tmp/vm.state \
  --memory /tmp/vm.mem >snap.out 2>&1
src=$?
vmm ctl --api-socket /tmp/vm0.sock shutdown >/dev/null 2>&1
for t in $(seq 100); do kill -0 $pid 2>/dev/null || break; sleep 0.1; done
kill $pid 2>/dev/null
if [ $src != 0 ]; then
  echo "RESTORE rc=snapshot-failed verdict=none hb_after=0" | tee -a summary
  cat snap.out; exit 1
fi
page-server $SEC --serve /tmp/vm.mem --listen 127.0.0.1:7070 --print-addr </dev/null >ps.log 2>&1 &
ps=$!
for t in $(seq 50); do grep -q "^listening" ps.log && break; sleep 0.1; done
vmm restore $SEC $on_cpu0 --state /tmp/vm.state --memory-from 127.0.0.1:7070 \
  --api-socket /tmp/vm1.sock --serial vm1.serial </dev/null >vm1.log 2>&1 &
rpid=$!
hb=0; verdict=none; rc=running; before=0
if wait_for vm1.serial "^WHB" 60 >/dev/null; then
  wait_for vm1.log "all guest memory present" 120 >/dev/null
  wait_for vm1.serial "^WHB" 10 "$(grep -a -c . vm1.serial)" >/dev/null
  before=$(grep -a -c . vm1.serial)
  vmm ctl --api-socket /tmp/vm1.sock serial-input "v
" >/dev/null 2>&1
  if wait_for vm1.serial "WITNESS VERDICT" 60 "$before" >/dev/null; then
    verdict=$(tail -n +$((before + 1)) vm1.serial | grep -a -m1 "WITNESS VERDICT" | tr -d '\r' | cut -d' ' -f3)
  fi
  hb=$(grep -a -c "^WHB" vm1.serial)
fi
kill -0 $rpid 2>/dev/null || { wait $rpid; rc=$?; }
echo "RESTORE rc=$rc verdict=$verdict hb_after=$hb $(io_check vm1.serial "$before")" | tee -a summary
grep -a -E "shutdown|reset|ERROR|error" vm1.log | tail -4
kill $rpid $ps $(cat /tmp/pids) 2>/dev/null
sleep 0.5
[ "$verdict" = ok ] && [ "$rc" = running ]

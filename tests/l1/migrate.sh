#!/bin/sh
# Runs inside the simulated hardware-virt host (scripts/hwvirt-host.sh): boots the Linux guest
# under `vmm run` and moves it COUNT times, each time to a new `vmm --incoming` on L1's loopback,
# in MODE (postcopy | hybrid | precopy). The guest has its ext4 disk (one image, shared by the
# VMMs in L1 as by hosts on shared storage) and a NIC on L1's bridge, each VMM on a tap of its
# own (/l1lib.sh: l2_io). After each move it asks the witness on the destination to verify all
# of its memory, its disk log (read back from the disk) and its TCP stream to the peer in L1.
# Leaves in /results (cwd) for the host side to judge:
#   vmN.serial  the guest's console on VM N (0 = the first `vmm run`)
#   vmN.log     that vmm's log;  migN.out / migN.err  `vmm ctl migrate --json`'s reply
#   summary     one line per move:
#               `MOVE i=N rc=.. source_exit=.. verdict=.. hb_after=.. disk=RECORDS/BAD net=STATE/BAD`
#   peer.log    the stream's other end (`PEER BAD` on a wrong byte)
#   threadsN.txt, statusN.json  on a failed move: the destination's threads (dump_threads) and status
# Usage: migrate.sh MODE COUNT [MEM] [WITNESS_MIB] [RATE] [EXTRA_MIGRATE_ARGS...]
mode=$1; count=$2; mem=${3:-512M}; wmib=${4:-300}; rate=${5:-2000}
shift 5 2>/dev/null || shift $#
extra="$*"
. /l1lib.sh
cmdline="console=ttyS0 quiet witness.mib=$wmib witness.rate=$rate witness.hb=20 $L2_IO_CMDLINE"
: > summary
: > /tmp/pids
# Both vCPUs of the guest on L1's CPU 0 (the VMMs' other threads on any CPU) when L1 has more
# than one: with the two vCPUs of a Linux guest running at once on two TCG CPUs, the simulated
# host (nested SVM under TCG) reset the guest in 5 of 6 post-copy tries; pinned, fewer, but not
# none. The tests run migration jobs in an L1 of one CPU (tests/linux/l1.rs), where this changes
# nothing. `L2_PIN=` (empty) in the environment runs them unpinned (for experiments).
on_cpu0=${L2_PIN---vcpu-cpus 0}

l2_io $((count + 1)) || { echo "BOOT failed: setting up the guest's disk and network in L1" | tee -a summary; exit 1; }
l2_boot "$mem" "$cmdline" $on_cpu0 || { kill $(cat /tmp/pids); exit 1; }
failed=0
i=1
while [ $i -le "$count" ]; do
  prev=$((i - 1))
  port=$((7700 + i))
  # this VMM's own tap (the source's tap stays the source's until it ends)
  vmm --incoming "tcp:127.0.0.1:$port" $SEC --disk-map "$L2_DISK" $on_cpu0 --api-socket /tmp/vm$i.sock --serial vm$i.serial \
    --tap-map l2tap$prev=l2tap$i --tap-map l2tap0=l2tap$i </dev/null >vm$i.log 2>&1 &
  dpid=$!
  echo "$dpid" >> /tmp/pids
  for t in $(seq 50); do [ -S /tmp/vm$i.sock ] && break; sleep 0.1; done
  echo "move $i: $mode to 127.0.0.1:$port"
  timeout 300 vmm ctl --api-socket /tmp/vm$prev.sock --json migrate --to "127.0.0.1:$port" --mode "$mode" \
    $extra >mig$i.out 2>mig$i.err
  rc=$?
  # the source ends (exit 0) once the destination has every page
  sexit=running
  for t in $(seq 600); do
    if ! kill -0 $pid 2>/dev/null; then wait $pid; sexit=$?; break; fi
    sleep 0.1
  done
  hb=0; verdict=none; before=$(grep -a -c . vm$i.serial)
  if wait_for vm$i.serial "^WHB" 30 >/dev/null; then
    wait_for vm$i.serial "^WHB" 10 "$(grep -a -c . vm$i.serial)" >/dev/null
    before=$(grep -a -c . vm$i.serial)
    vmm ctl --api-socket /tmp/vm$i.sock serial-input "v
" >/dev/null 2>&1
    if wait_for vm$i.serial "WITNESS VERDICT" 60 "$before" >/dev/null; then
      verdict=$(tail -n +$((before + 1)) vm$i.serial | grep -a -m1 "WITNESS VERDICT" | tr -d '\r' | cut -d' ' -f3)
    fi
    hb=$(grep -a -c "^WHB" vm$i.serial)
  fi
  echo "MOVE i=$i mode=$mode rc=$rc source_exit=$sexit verdict=$verdict hb_after=$hb $(io_check vm$i.serial "$before")" | tee -a summary
  if [ "$rc" != 0 ] || [ "$sexit" != 0 ] || [ "$verdict" != ok ]; then
    failed=$((failed + 1))
    tail -3 mig$i.err; grep -a -E "shutdown|reset|ERROR|error" vm$prev.log vm$i.log | tail -6
    dump_threads $dpid > threads$i.txt 2>&1
    timeout -s KILL 10 vmm ctl --api-socket /tmp/vm$i.sock --json status > status$i.json 2>&1
    kill $pid $dpid 2>/dev/null
    break
  fi
  pid=$dpid
  i=$((i + 1))
done
kill $(cat /tmp/pids) 2>/dev/null
sleep 0.5
echo "DONE moves=$((i - 1 + failed)) failed=$failed peer_bad=$(grep -c "PEER BAD" peer.log)" | tee -a summary
[ $failed = 0 ]

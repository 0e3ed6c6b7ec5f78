# Shared by the jobs in tests/l1 (and bench/linux.sh's): L1 has it as /l1lib.sh (the callers
# give it to scripts/hwvirt-host.sh with --file). Plain busybox sh.

# Migrations, lazy restores and page-servers in L1 run secured, as users run them: TLS 1.3 with
# a pre-shared key made here once ($SEC goes on every vmm run / --incoming / restore and
# page-server command line).
[ -f /tmp/l1.psk ] || vmm tls psk /tmp/l1.psk >/dev/null
SEC="--tls-psk-file /tmp/l1.psk"

# wait_for FILE PATTERN SECONDS [AFTER_LINES]: until a line matching PATTERN appears past line
# AFTER_LINES of FILE; prints the line number.
wait_for() {
  n=0
  while [ $n -lt $(($3 * 10)) ]; do
    l=$(tail -n +$((${4:-0} + 1)) "$1" 2>/dev/null | grep -n -m1 -a "$2" | cut -d: -f1)
    if [ -n "$l" ]; then echo $((l + ${4:-0})); return 0; fi
    sleep 0.1; n=$((n + 1))
  done
  return 1
}

# The guest's disk and network, as on a real host: its ext4 disk image at $L2_DISK (a copy of
# the empty /l2/disk.ext4), a bridge br0 with L1's address 10.0.2.1/24 (the guest's init gives
# its eth0 10.0.2.15/24) and taps l2tap0 .. l2tap(N-1) in it, one per VMM that will run the
# guest (a migration's destination attaches its own tap; the bridge learns where the guest's MAC
# went from its first frame there), and `witness peer` on 10.0.2.1:5555, the other end of the
# witness's TCP stream, logging to peer.log. The PIDs of what it starts go to /tmp/pids.
L2_DISK=/tmp/disk0.img
L2_MAC=52:54:00:12:34:56
L2_IO_CMDLINE="witness.log=/mnt/witness.log witness.peer=10.0.2.1:5555"
l2_io() {
  cp /l2/disk.ext4 "$L2_DISK" || return 1
  ip link add br0 type bridge || return 1
  ip addr add 10.0.2.1/24 dev br0 && ip link set br0 up || return 1
  i=0
  while [ $i -lt "$1" ]; do
    tunctl -t l2tap$i >/dev/null && ip link set l2tap$i master br0 && ip link set l2tap$i up ||
      return 1
    i=$((i + 1))
  done
  witness peer listen=10.0.2.1:5555 >peer.log 2>&1 &
  echo $! >> /tmp/pids
}

# io_check FILE AFTER_LINES: the witness's disk and stream lines of its last verdict in FILE, as
# `disk=RECORDS/BAD net=STATE/BAD`.
io_check() {
  d=$(tail -n +$(($2 + 1)) "$1" | grep -a -m1 "^WITNESS DISK log=.*records=" | tr -d '\r')
  n=$(tail -n +$(($2 + 1)) "$1" | grep -a -m1 "^WITNESS NET sent=" | tr -d '\r')
  echo "disk=$(echo "$d" | sed -n 's/.*records=\([0-9]*\).* bad=\([0-9]*\).*/\1\/\2/p')" \
    "net=$(echo "$n" | sed -n 's/.* bad=\([0-9]*\) state=\([a-z]*\).*/\2\/\1/p')"
}

# l2_boot MEM CMDLINE [VMM_RUN_ARGS...]: boots the guest as VM 0 under `vmm run` with its disk and
# tap l2tap0 (after l2_io), console vm0.serial, log vm0.log, control socket /tmp/vm0.sock; waits
# until the witness is ready, ten heartbeats went and its stream is up. Sets $pid (also in
# /tmp/pids) and writes `BOOT ok|failed: …` to summary; returns 1 when the guest never got ready.
l2_boot() {
  mem=$1; cl=$2; shift 2
  vmm run $SEC "$@" --mem "$mem" --vcpus 2 --kernel /l2/vmlinuz --initrd /l2/initrd.gz \
    --cmdline "$cl" --disk "$L2_DISK" --net tap=l2tap0,mac=$L2_MAC \
    --api-socket /tmp/vm0.sock --serial vm0.serial </dev/null >vm0.log 2>&1 &
  pid=$!
  echo "$pid" >> /tmp/pids
  if ! wait_for vm0.serial "WITNESS READY" 120 >/dev/null; then
    echo "BOOT failed: no WITNESS READY in 120 s" | tee -a summary
    tail -5 vm0.log
    return 1
  fi
  wait_for vm0.serial "^WHB n=10 " 30 >/dev/null
  wait_for vm0.serial "WITNESS NET up" 30 >/dev/null
  echo "BOOT ok: $(grep -a 'L2 userspace up' vm0.serial)" | tee -a summary
}

# dump_threads PID FILE: where each thread of PID is, for a failure's diagnosis: name, state,
# CPU time (utime+stime in ticks, read twice a second apart: a thread whose time grows is busy,
# one whose time stays is blocked), wchan and kernel stack; then the tail of L1's kernel log.
dump_threads() {
  for t in /proc/$1/task/*; do
    [ -d "$t" ] || continue
    c0=$(cut -d' ' -f14,15 $t/stat 2>/dev/null | tr ' ' '+')
    echo "$t $((c0))"
  done > /tmp/cpu0
  sleep 1
  for t in /proc/$1/task/*; do
    [ -d "$t" ] || continue
    c1=$(($(cut -d' ' -f14,15 $t/stat 2>/dev/null | tr ' ' '+')))
    c0=$(grep "^$t " /tmp/cpu0 | cut -d' ' -f2)
    echo "== $(cat $t/comm) state=$(cut -d' ' -f3 $t/stat) cpu_ticks=$c1 (+$((c1 - ${c0:-0})) in 1 s) wchan=$(cat $t/wchan 2>/dev/null)"
    cat $t/stack 2>/dev/null | head -n 12
  done
  echo "== L1 dmesg (last 40 lines)"
  dmesg | tail -n 40
}

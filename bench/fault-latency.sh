#!/usr/bin/env bash
# Fault-latency benchmark of the paging core: builds in release, makes a memory image, starts
# page-server on loopback, and measures remote / under-stream / local fault latency and stream
# throughput against raw baselines taken in the same run.
#
#   bench/fault-latency.sh [--quick] [--size MIB] [--out PATH]
#
# Prints a table; writes JSON (default target/bench/fault-latency.json) and an SVG latency CDF
# next to it. --quick: a 256 MiB image and fewer samples (under a minute).
# --placement colocated (default): the faulting thread, the pager's fault thread and the
# page-server's fault-answering loop share CPU 0 (as do both ends of the raw baselines), the
# stream uses the other CPUs; --placement free: the scheduler decides.
set -euo pipefail
cd "$(dirname "$0")/.."

size=1024
quick=()
placement=colocated
out=target/bench/fault-latency.json
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) quick=(--quick); size=256 ;;
    --size) size="$2"; shift ;;
    --out) out="$2"; shift ;;
    --placement) placement="$2"; shift ;;
    -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
    *) echo "fault-latency.sh: unknown argument '$1' (try --help)" >&2; exit 2 ;;
  esac
  shift
done

echo "[fault-latency] building (release)"
cargo build --release --quiet -p page-server -p bench
mkdir -p target/bench
image="target/bench/image-${size}m.raw"
echo "[fault-latency] memory image: $image (${size} MiB, random, ~30 % zero pages)"
target/release/fault-latency make-image --size-mib "$size" --out "$image"

addr_file=$(mktemp)
server_args=()
[ "$placement" = colocated ] && server_args=(--urgent-cpu 0)
target/release/page-server --serve "$image" --listen 127.0.0.1:0 --print-addr "${server_args[@]}" >"$addr_file" 2>target/bench/page-server.log &
server_pid=$!
cleanup() {
  kill "$server_pid" 2>/dev/null || true
  wait "$server_pid" 2>/dev/null || true
  rm -f "$addr_file"
}
trap cleanup EXIT
for _ in $(seq 100); do
  grep -q '^listening ' "$addr_file" && break
  kill -0 "$server_pid" 2>/dev/null || { echo "page-server failed to start:" >&2; cat target/bench/page-server.log >&2; exit 1; }
  sleep 0.1
done
addr=$(sed -n 's/^listening //p' "$addr_file")
[ -n "$addr" ] || { echo "page-server did not report its address" >&2; exit 1; }
echo "[fault-latency] page-server pid $server_pid on $addr"

target/release/fault-latency measure --addr "$addr" --image "$image" --out "$out" "${quick[@]}" --placement "$placement" ${FAULT_LATENCY_ARGS:-}

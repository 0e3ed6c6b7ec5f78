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

# Security on, as for users: TLS 1.3 with a pre-shared key made for this run (0600). A second
# page-server in plaintext (--insecure) gives the same-run figures for the cost of TLS.
psk=target/bench/bench-psk
rm -f "$psk"
(umask 077; od -An -tx1 -N32 /dev/urandom | tr -d ' \n' >"$psk")
server_args=()
[ "$placement" = colocated ] && server_args=(--urgent-cpu 0)
pids=()
files=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  rm -f "${files[@]}"
}
trap cleanup EXIT
# start_server NAME SECURITY-ARGS...: starts a page-server, sets $addr
start_server() {
  local name=$1; shift
  local addr_file
  addr_file=$(mktemp)
  files+=("$addr_file")
  target/release/page-server --serve "$image" --listen 127.0.0.1:0 --print-addr "${server_args[@]}" "$@" >"$addr_file" 2>"target/bench/page-server-$name.log" &
  local pid=$!
  pids+=("$pid")
  for _ in $(seq 100); do
    grep -q '^listening ' "$addr_file" && break
    kill -0 "$pid" 2>/dev/null || { echo "page-server ($name) failed to start:" >&2; cat "target/bench/page-server-$name.log" >&2; exit 1; }
    sleep 0.1
  done
  addr=$(sed -n 's/^listening //p' "$addr_file")
  [ -n "$addr" ] || { echo "page-server ($name) did not report its address" >&2; exit 1; }
  echo "[fault-latency] page-server ($name) pid $pid on $addr"
}
start_server tls --tls-psk-file "$psk"
tls_addr=$addr
start_server plaintext --insecure
plain_addr=$addr

target/release/fault-latency measure --addr "$tls_addr" --tls-psk-file "$psk" --plain-addr "$plain_addr" --image "$image" --out "$out" "${quick[@]}" --placement "$placement" ${FAULT_LATENCY_ARGS:-}

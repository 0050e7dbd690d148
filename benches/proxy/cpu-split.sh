#!/usr/bin/env bash
# Where a proxy's CPU per request goes: user space against the kernel, for mesh-proxy and
# nginx (1 worker) in one run, with a fixed request count (h2load -n), so repeated runs are
# comparable as ratios. A quick companion to run.sh, not a replacement: no latency, no
# HAProxy, no rotation of the order.
#
#   benches/proxy/cpu-split.sh [h1|h2|post] [REQUESTS]        (default h1 200000)
#
# h1: h2load --h1, 64 connections; h2: 8 connections x 32 streams (h2c, prior knowledge);
# post: HTTP/1.1 POSTs of 4 KiB to /echo, 64 connections (run.sh's post4k).
# Needs the bench upstream built by ../shared/bench/run.sh (target/bench-upstream), h2load,
# nginx and a release mesh-proxy (MESH_BIN, default target/release/mesh-proxy). Traffic
# goes to 127.0.0.1 only; the ports are the bench's (18080, 18081, 18090, 19480, 19481).
set -euo pipefail
cd "$(dirname "$0")/../.."
mode=${1:-h1}
n=${2:-200000}
bin=${MESH_BIN:-$PWD/target/release/mesh-proxy}
up=${UPSTREAM_DIR:-$PWD/target/bench-upstream/release}
bench=${BENCH_DIR:-$(cd .. && pwd)/shared/bench}
run=$(mktemp -d)
pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$run"; }
trap cleanup EXIT

for tool in h2load nginx curl; do
  command -v "$tool" >/dev/null || { echo "cpu-split: $tool not found" >&2; exit 1; }
done
[ -x "$up/upstream" ] || { echo "cpu-split: no upstream in $up (run ../shared/bench/run.sh once)" >&2; exit 1; }

"$up/upstream" --h1 127.0.0.1:18080 --h2 127.0.0.1:18081 >"$run/upstream.log" 2>&1 &
pids+=($!)
"$up/grpc-echo" 127.0.0.1:18090 >"$run/grpc.log" 2>&1 &
pids+=($!)

# cpu PID -> "total user" in clock ticks
cpu() { awk '{print $14 + $15, $14}' "/proc/$1/stat"; }

head -c 4096 /dev/urandom >"$run/body4k"
load() {
  if [ "$mode" = h1 ]; then
    h2load --h1 -n "$n" -c 64 -t 1 http://127.0.0.1:19480/
  elif [ "$mode" = post ]; then
    h2load --h1 -n "$n" -c 64 -t 1 -d "$run/body4k" http://127.0.0.1:19480/echo
  else
    h2load -n "$n" -c 8 -m 32 -t 1 http://127.0.0.1:19481/
  fi | grep -E '^requests:'
}

# until the proxy answers on 19480
ready() { for _ in $(seq 50); do curl -fs http://127.0.0.1:19480/ >/dev/null && return; sleep 0.1; done; echo "cpu-split: no answer on 19480" >&2; exit 1; }

# measure NAME PID: the load against 19480/19481, then PID's CPU per request and peak RSS
measure() {
  local name=$1 pid=$2 t0 u0 t1 u1
  read -r t0 u0 < <(cpu "$pid")
  load
  read -r t1 u1 < <(cpu "$pid")
  python3 - "$name" "$t0" "$u0" "$t1" "$u1" "$n" "$(getconf CLK_TCK)" \
    "$(awk '/VmHWM/ {print $2}' "/proc/$pid/status")" <<'EOF'
import sys
name, t0, u0, t1, u1, n, hz, hwm = sys.argv[1], *map(float, sys.argv[2:])
us = lambda ticks: ticks / hz * 1e6 / n
print(f"{name:12} cpu {us(t1 - t0):6.2f} us/req  user {us(u1 - u0):6.2f}  "
      f"kernel {us(t1 - t0 - (u1 - u0)):6.2f}  VmHWM {hwm / 1024:.1f} MB")
EOF
}

"$bin" run --config benches/proxy/bench.toml --log warn --workers "${MESH_WORKERS:-1}" \
  >"$run/mesh.log" 2>&1 &
mesh=$!
pids+=("$mesh")
ready
measure mesh-proxy "$mesh"
kill "$mesh"; wait "$mesh" 2>/dev/null || true

mkdir -p "$run/nginx"
sed 's/@PORT_H1@/19480/; s/@PORT_H2@/19481/; s/@WORKERS@/1/' "$bench/configs/nginx.conf.in" \
  >"$run/nginx.conf"
nginx -e stderr -p "$run/nginx/" -c "$run/nginx.conf" 2>"$run/nginx.log" &
master=$!
pids+=("$master")
ready
measure nginx-1w "$(pgrep -P "$master" | head -1)"

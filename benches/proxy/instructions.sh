#!/usr/bin/env bash
# User-space instructions per request of mesh-proxy under callgrind: repeatable whatever
# else the machine does, unlike CPU time on these shared VMs, so two builds can be
# compared by a change of a few percent. Each binary serves the bench hop
# (benches/proxy/bench.toml) under callgrind; after 2,000 warm-up requests the counters
# are zeroed, N requests are sent (h2load, 16 connections for h1; 4 x 8 streams for h2),
# and the count is dumped: start-up and warm-up are left out. `opaque` sends the h1 load
# through an opaque TCP relay instead (an outbound listener with protocol = "opaque" in
# front of the same upstream, benches/proxy/opaque.toml): the relay's instructions per
# request and answer. `grpc` sends unary echo calls (4 x 8 streams) to the bench's
# grpc-echo through the h2c listener's gRPC route.
#
#   benches/proxy/instructions.sh [h1|h2|grpc|opaque] [N] [BINARY...]    (default h1 10000 target/release/mesh-proxy)
#
# Prints "NAME: I instructions/request" per binary, and ratios against the first. The
# dumps stay in $OUT (default: a temporary folder, printed) for callgrind_annotate. Needs
# valgrind, h2load, curl and the bench upstream (target/bench-upstream, built by
# ../shared/bench/run.sh). Traffic goes to 127.0.0.1 only (ports 18080, 18081, 19470,
# 19480, 19481, 19490). Kernel time and cache effects (atomic reference counts shared between
# worker threads, say) are not counted: confirm a change with cpu-split.sh too.
set -euo pipefail
cd "$(dirname "$0")/../.."
mode=${1:-h1}
n=${2:-10000}
shift $(( $# > 2 ? 2 : $# ))
bins=("$@")
[ ${#bins[@]} -gt 0 ] || bins=("$PWD/target/release/mesh-proxy")
up=${UPSTREAM_DIR:-$PWD/target/bench-upstream/release}
out=${OUT:-$(mktemp -d -t mesh-instructions.XXXXXX)}
mkdir -p "$out"
for tool in valgrind callgrind_control h2load curl; do
  command -v "$tool" >/dev/null || { echo "instructions: $tool not found" >&2; exit 1; }
done
[ -x "$up/upstream" ] || { echo "instructions: no upstream in $up (run ../shared/bench/run.sh once)" >&2; exit 1; }

pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; }
trap cleanup EXIT
"$up/upstream" --h1 127.0.0.1:18080 --h2 127.0.0.1:18081 >"$out/upstream.log" 2>&1 &
pids+=($!)
if [ "$mode" = grpc ]; then
  [ -x "$up/grpc-echo" ] || { echo "instructions: no grpc-echo in $up" >&2; exit 1; }
  "$up/grpc-echo" 127.0.0.1:18090 >"$out/grpc-echo.log" 2>&1 &
  pids+=($!)
  # one gRPC frame: EchoRequest{payload: "Hello, world!"}
  printf '\x00\x00\x00\x00\x0f\x0a\x0dHello, world!' >"$out/grpc.bin"
fi

config=benches/proxy/bench.toml
port=19480
if [ "$mode" = opaque ]; then
  config=benches/proxy/opaque.toml
  port=19470
fi

# load REQUESTS: prints how many succeeded
load() {
  if [ "$mode" = h1 ] || [ "$mode" = opaque ]; then
    h2load --h1 -n "$1" -c 16 -t 1 "http://127.0.0.1:$port/"
  elif [ "$mode" = grpc ]; then
    h2load -n "$1" -c 4 -m 8 -t 1 -d "$out/grpc.bin" -H 'content-type: application/grpc' \
      -H 'te: trailers' http://127.0.0.1:19481/echo.Echo/Unary
  else
    h2load -n "$1" -c 4 -m 8 -t 1 http://127.0.0.1:19481/
  fi | awk '/^requests:/ {print $8}'
}

declare -a per
for i in "${!bins[@]}"; do
  bin=${bins[$i]}
  name=$(basename "$bin")-$i
  valgrind --tool=callgrind --callgrind-out-file="$out/$name.%p" \
    "$bin" run --config "$config" --log warn --workers "${MESH_WORKERS:-1}" >"$out/$name.log" 2>&1 &
  pid=$!
  pids+=("$pid")
  for _ in $(seq 100); do curl -fs "http://127.0.0.1:$port/" >/dev/null && break; sleep 0.3; done
  load 2000 >/dev/null
  callgrind_control -z "$pid" >/dev/null 2>&1
  ok=$(load "$n")
  callgrind_control -d "$pid" >/dev/null 2>&1
  sleep 1
  kill "$pid"; wait "$pid" 2>/dev/null || true
  [ "$ok" = "$n" ] || { echo "instructions: $name answered $ok of $n requests" >&2; exit 1; }
  dump=$(ls "$out/$name."[0-9]*.[0-9]* 2>/dev/null | head -1)
  total=$(sed -n 's/^\(summary\|totals\): *\([0-9]*\).*/\2/p' "$dump" | head -1)
  per[$i]=$(( total / n ))
  echo "$name: ${per[$i]} instructions/request (dump: $dump)"
done
for i in "${!bins[@]}"; do
  python3 -c "print(f'$(basename "${bins[$i]}")-$i: {${per[$i]} / ${per[0]}:.3f}x the first')"
done

#!/usr/bin/env bash
# Instructions per request of the serving process (user space): MeshServer (authz with 100
# rules, rate limit, metrics) against a bare hyper server, counted by callgrind, which is
# repeatable whatever else the machine does. Each server's count is (N requests − 0
# requests) / N, so start-up and warm-up cancel out; the load child is not traced.
# Needs valgrind.
#   benches/server-instructions.sh [N]        (default 2000)
set -euo pipefail
cd "$(dirname "$0")/.."
n=${1:-2000}
bin=${SERVER_BENCH_BIN:-$(cargo bench -p mesh-benches --bench server_cpu --no-run 2>&1 |
  sed -n 's/.*Executable.*(\(.*\)).*/\1/p' | tail -n 1)}
count() { # mode requests
  MESH_SERVER_BENCH_ONLY=$1 MESH_SERVER_BENCH_REQUESTS=$2 valgrind --tool=callgrind \
    --callgrind-out-file=/dev/null "$bin" 2>&1 | sed -n 's/.*Collected : *\([0-9]*\).*/\1/p'
}
declare -A per
for mode in bare mesh; do
  base=$(count "$mode" 0)
  full=$(count "$mode" "$n")
  per[$mode]=$(( (full - base) / n ))
  echo "$mode: ${per[$mode]} instructions per request"
done
python3 -c "print(f'ratio: {${per[mesh]} / ${per[bare]}:.3f}x')"

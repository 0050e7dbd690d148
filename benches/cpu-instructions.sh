#!/usr/bin/env bash
# Instructions per request of the client process (user space), MeshClient against a bare
# hyper client, counted by callgrind: repeatable whatever else the machine does, unlike
# time. Each client's count is (N requests − 0 requests) / N, so start-up and warm-up
# cancel out. Needs valgrind.
#   benches/cpu-instructions.sh [N]        (default 2000)
set -euo pipefail
cd "$(dirname "$0")/.."
n=${1:-2000}
bin=${CPU_BENCH_BIN:-$(cargo bench -p mesh-benches --bench cpu --no-run 2>&1 |
  sed -n 's/.*Executable.*(\(.*\)).*/\1/p' | tail -n 1)}
count() { # mode requests
  MESH_CPU_BENCH_ONLY=$1 MESH_CPU_BENCH_REQUESTS=$2 valgrind --tool=callgrind \
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

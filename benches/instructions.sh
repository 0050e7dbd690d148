#!/usr/bin/env bash
# User-space instructions per request under callgrind — repeatable whatever else the
# machine does, unlike time — of one side against its bare baseline, in the same run:
#   client: MeshClient against a bare hyper-util client (the `cpu` bench; the server
#           runs in an untraced child process);
#   server: MeshServer (authz with 100 rules, rate limit, metrics) against a bare hyper
#           server (the `server_cpu` bench; the load runs in an untraced child).
# Each count is (N requests − 0 requests) / N, so start-up and warm-up cancel out.
# Needs valgrind. `BENCH_BIN` measures another build of the same bench.
#   benches/instructions.sh client|server [N]        (default N: 2000)
set -euo pipefail
cd "$(dirname "$0")/.."
case ${1:-} in
  client) bench=cpu env=MESH_CPU_BENCH ;;
  server) bench=server_cpu env=MESH_SERVER_BENCH ;;
  *) echo "usage: benches/instructions.sh client|server [N]" >&2; exit 2 ;;
esac
n=${2:-2000}
bin=${BENCH_BIN:-$(cargo bench -p mesh-benches --bench "$bench" --no-run 2>&1 |
  sed -n 's/.*Executable.*(\(.*\)).*/\1/p' | tail -n 1)}
count() { # mode requests
  env "${env}_ONLY=$1" "${env}_REQUESTS=$2" valgrind --tool=callgrind \
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

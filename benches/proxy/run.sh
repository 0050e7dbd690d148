#!/usr/bin/env bash
# mesh-proxy through ../shared/bench beside a direct connection, nginx and HAProxy, in one
# run (see ../shared/bench/README.md): one plaintext HTTP hop with balancing, circuit
# breaking and metrics on (benches/proxy/bench.toml).
#
#   benches/proxy/run.sh [plain|grpc] [extra env: TESTS=..., REPS=..., QUICK=1, OHA_INSTALL=1]
#   MESH_WORKERS=1 benches/proxy/run.sh plain      # the proxy's runtime worker threads
#
# Results land in ../shared/bench/results/MODE-TIME/summary.md; report the ratios.
set -euo pipefail
cd "$(dirname "$0")/../.."
mode=${1:-plain}
bench=${BENCH_DIR:-$(cd .. && pwd)/shared/bench}
cargo build --release -p mesh-proxy
export MESH_CMD="$PWD/target/release/mesh-proxy run --config $PWD/benches/proxy/bench.toml --log warn --workers ${MESH_WORKERS:-2}"
export MESH_H1=http://127.0.0.1:19480
export MESH_H2=http://127.0.0.1:19481
export MESH_GRPC=http://127.0.0.1:19481
exec "$bench/run.sh" "$mode"

#!/usr/bin/env bash
# mesh-proxy through ../shared/bench beside a direct connection, nginx and HAProxy, in one
# run (see ../shared/bench/README.md): one plaintext HTTP hop with balancing, circuit
# breaking and metrics on (benches/proxy/bench.toml).
#
#   benches/proxy/run.sh [plain|tls|grpc] [extra env: TESTS=..., REPS=..., QUICK=1, OHA_INSTALL=1]
#
# `tls`: mesh-proxy terminates TLS with the bench's throwaway certificate
# (bench-tls.toml.in: an outbound listener with `certificate`), beside nginx-1w-tls and
# haproxy-1t-tls.
#   MESH_WORKERS=2 benches/proxy/run.sh plain      # the proxy's runtime worker threads (default 1)
#   MESH_BIN=target/pgo/mesh-proxy benches/proxy/run.sh plain   # the profile-guided build
#                                                  # (scripts/release-pgo)
#
# Results land in ../shared/bench/results/MODE-TIME/summary.md; report the ratios.
set -euo pipefail
cd "$(dirname "$0")/../.."
mode=${1:-plain}
bench=${BENCH_DIR:-$(cd .. && pwd)/shared/bench}
# MESH_BIN: a mesh-proxy binary built already (otherwise: cargo build --release).
if [ -z "${MESH_BIN:-}" ]; then cargo build --release -p mesh-proxy; fi
bin=${MESH_BIN:-$PWD/target/release/mesh-proxy}
flags="--log warn --workers ${MESH_WORKERS:-1}"
if [ "$mode" = tls ]; then
  # The bench writes its certificate into its run directory (@DIR@ in MESH_CMD).
  export MESH_CMD="sh -c 'sed s#__DIR__#@DIR@#g $PWD/benches/proxy/bench-tls.toml.in >@DIR@/mesh-tls.toml && exec $bin run --config @DIR@/mesh-tls.toml $flags'"
  export MESH_H1=https://127.0.0.1:19480
  export MESH_H2=https://127.0.0.1:19480
else
  export MESH_CMD="$bin run --config $PWD/benches/proxy/bench.toml $flags"
  export MESH_H1=http://127.0.0.1:19480
  export MESH_H2=http://127.0.0.1:19481
  export MESH_GRPC=http://127.0.0.1:19481
fi
exec "$bench/run.sh" "$mode"

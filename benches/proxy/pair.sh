#!/usr/bin/env bash
# The meshed pair: what an outbound and an inbound mesh-proxy add together (HTTP/1.1 from
# the app, HTTP/2 over SPIFFE mTLS between the proxies, HTTP/1.1 to the upstream), beside
# a direct connection and one plaintext mesh-proxy hop, in one run of
# ../shared/bench/proxy-bench.sh:
#
#   direct      load -> upstream :18080
#   mesh-1hop   load -> mesh-proxy :19480 (benches/proxy/bench.toml) -> upstream
#   mesh-pair   load -> outbound :19580 ==mTLS==> inbound :19583 -> upstream
#               (pair-outbound.toml, pair-inbound.toml; both processes' CPU and memory)
#
#   benches/proxy/pair.sh            # lat (1k req/s, 16 connections) and h1c64, REPS=3
#   RATE=2000 TESTS=lat benches/proxy/pair.sh
#
# The goal (issue 11): the pair adds at most 0.25 ms at p99 at 1k req/s: compare
# mesh-pair's p99 with direct's of the same repetition. Results land in
# ../shared/bench/results/pair-TIME/ (summary.md, report.txt).
set -euo pipefail
cd "$(dirname "$0")/../.."
root=$PWD
bench=${BENCH_DIR:-$(cd .. && pwd)/shared/bench}
export RATE=${RATE:-1000} TESTS=${TESTS:-"lat h1c64"}
# MESH_BIN: a mesh-proxy binary built already (otherwise: cargo build --release).
if [ -z "${MESH_BIN:-}" ]; then cargo build --release -p mesh-proxy; fi
bin=${MESH_BIN:-$root/target/release/mesh-proxy}
up_target=${UPSTREAM_TARGET_DIR:-$root/target/bench-upstream}
CARGO_TARGET_DIR=$up_target cargo build --release --locked --quiet --manifest-path "$bench/upstream/Cargo.toml"
if ! command -v oha >/dev/null 2>&1 && [ "${OHA_INSTALL:-0}" = 1 ]; then cargo install oha --locked; fi
command -v oha >/dev/null 2>&1 || { echo "pair.sh needs oha for the latency test (OHA_INSTALL=1)" >&2; exit 2; }
for tool in wrk; do command -v $tool >/dev/null 2>&1 || apt-get install -y -qq $tool >/dev/null; done

workers=${MESH_WORKERS:-1}
run="run --log warn --workers $workers --config"
one="$bin $run $root/benches/proxy/bench.toml"
# One process tree: the inbound proxy in the background of the shell that becomes the
# outbound one, so the bench's CPU and memory figures cover both.
pair="sh -c '$bin $run $root/benches/proxy/pair-inbound.toml & exec $bin $run $root/benches/proxy/pair-outbound.toml'"
results=${RESULTS_DIR:-$bench/results}
[ -w "$(dirname "$results")" ] || results=$root/target/bench-results
out=$results/pair-$(date +%Y%m%d-%H%M%S)
mkdir -p "$out"
bash "$bench/proxy-bench.sh" -o "$out" \
  -u "$up_target/release/upstream --h1 127.0.0.1:18080 --h2 127.0.0.1:18081" \
  -t "direct|http://127.0.0.1:18080|||" \
  -t "mesh-1hop|http://127.0.0.1:19480||$one|" \
  -t "mesh-pair|http://127.0.0.1:19580||$pair|" >"$out/report.txt"
python3 "$bench/summarize.py" "$out/results.tsv" | tee "$out/summary.md"
echo "results: $out"

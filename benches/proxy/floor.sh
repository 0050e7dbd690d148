#!/usr/bin/env bash
# Where mesh-proxy's CPU per request comes from, against nginx, in one run: the four
# modes of the proxy_floor example (benches/examples/proxy_floor.rs: a bare hyper server
# and our HTTP/1.1 connection pool, then MeshServer, MeshClient, both), mesh-proxy itself
# (benches/proxy/bench.toml) and nginx with one worker, each under the same HTTP/1.1 load
# (h2load --h1, 64 connections, a fixed request count), in rounds that rotate the order.
# Prints the median CPU per request of each (user and kernel) and its ratio to nginx's.
#
#   benches/proxy/floor.sh [REQUESTS] [ROUNDS]        (default 200000 3)
#
# Needs h2load, nginx, curl and the bench upstream (target/bench-upstream, built by
# ../shared/bench/run.sh); builds mesh-proxy (unless MESH_BIN names one) and the example.
# Traffic goes to 127.0.0.1 only (ports 18080, 18081, 19480, 19481, 19490).
set -euo pipefail
cd "$(dirname "$0")/../.."
n=${1:-200000}
rounds=${2:-3}
up=${UPSTREAM_DIR:-$PWD/target/bench-upstream/release}
bench=${BENCH_DIR:-$(cd .. && pwd)/shared/bench}
bin=${MESH_BIN:-$PWD/target/release/mesh-proxy}
floor=$PWD/target/release/examples/proxy_floor
run=$(mktemp -d)
pids=()
main=
cleanup() {
  local status=$?
  kill "${pids[@]}" $main 2>/dev/null || true; wait 2>/dev/null || true
  if [ "$status" != 0 ]; then for f in "$run"/*.log; do echo "== $f"; tail -n 5 "$f"; done >&2; fi
  rm -rf "$run"
}
trap cleanup EXIT

for tool in h2load nginx curl; do
  command -v "$tool" >/dev/null || { echo "floor: $tool not found" >&2; exit 1; }
done
[ -x "$up/upstream" ] || { echo "floor: no upstream in $up (run ../shared/bench/run.sh once)" >&2; exit 1; }
# Built (or found current) every time: a stale binary would be measured silently.
[ -n "${MESH_BIN:-}" ] || cargo build --release --locked -p mesh-proxy
cargo build --release --locked -p mesh-benches --example proxy_floor

"$up/upstream" --h1 127.0.0.1:18080 --h2 127.0.0.1:18081 >"$run/upstream.log" 2>&1 &
pids+=($!)
sed 's/@PORT_H1@/19480/; s/@PORT_H2@/19481/; s/@WORKERS@/1/' "$bench/configs/nginx.conf.in" \
  >"$run/nginx.conf"
mkdir -p "$run/nginx"

# start NAME: starts it in this shell (so that it can be waited for); sets `main` (the
# process to stop) and `pid` (the process whose CPU counts: nginx's worker)
start() {
  case $1 in
    nginx)
      nginx -e stderr -p "$run/nginx/" -c "$run/nginx.conf" >>"$run/nginx.log" 2>&1 &
      main=$!
      for _ in $(seq 50); do pgrep -P "$main" >/dev/null && break; sleep 0.1; done
      pid=$(pgrep -P "$main" | head -1) ;;
    mesh-proxy)
      "$bin" run --config benches/proxy/bench.toml --log warn >>"$run/mesh.log" 2>&1 &
      main=$! pid=$! ;;
    *)
      "$floor" "$1" >>"$run/floor.log" 2>&1 &
      main=$! pid=$! ;;
  esac
}

ready() { for _ in $(seq 50); do curl -fs http://127.0.0.1:19480/ >/dev/null && return; sleep 0.1; done; echo "floor: no answer on 19480" >&2; exit 1; }

# cpu PID -> "total user" in clock ticks
cpu() { awk '{print $14 + $15, $14}' "/proc/$1/stat"; }

names=(raw server client both mesh-proxy nginx)
for r in $(seq "$rounds"); do
  # Rotate the order each round.
  for i in "${!names[@]}"; do
    name=${names[$(( (i + r) % ${#names[@]} ))]}
    start "$name"
    ready
    h2load --h1 -n 20000 -c 64 -t 1 http://127.0.0.1:19480/ >/dev/null
    read -r t0 u0 < <(cpu "$pid")
    ok=$(h2load --h1 -n "$n" -c 64 -t 1 http://127.0.0.1:19480/ | awk '/^requests:/ {print $8}')
    read -r t1 u1 < <(cpu "$pid")
    kill "$main" 2>/dev/null || true; wait "$main" 2>/dev/null || true
    main=
    [ "$ok" = "$n" ] || { echo "floor: $name answered $ok of $n" >&2; exit 1; }
    echo "$name $t0 $u0 $t1 $u1" >>"$run/results"
  done
done

python3 - "$run/results" "$n" "$(getconf CLK_TCK)" <<'PY'
import sys, statistics, collections
path, n, hz = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
runs = collections.defaultdict(list)
for line in open(path):
    name, t0, u0, t1, u1 = line.split()
    t, u = (float(t1) - float(t0)), (float(u1) - float(u0))
    runs[name].append((t / hz * 1e6 / n, u / hz * 1e6 / n))
base = statistics.median(c for c, _ in runs["nginx"])
print(f"{'':12} {'cpu us/req':>10} {'user':>6} {'kernel':>7} {'/ nginx':>8}   (median of {len(runs['nginx'])})")
for name in ["raw", "server", "client", "both", "mesh-proxy", "nginx"]:
    cpu = statistics.median(c for c, _ in runs[name])
    user = statistics.median(u for _, u in runs[name])
    print(f"{name:12} {cpu:10.2f} {user:6.2f} {cpu - user:7.2f} {cpu / base:7.2f}x")
PY

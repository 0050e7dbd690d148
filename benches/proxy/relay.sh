#!/usr/bin/env bash
# Opaque TCP relaying: CPU per request and per MiB of one relay hop — mesh-proxy's opaque
# outbound listener, nginx's stream proxy (1 worker) and HAProxy in `mode tcp` (1 thread)
# in front of the bench upstream — beside a direct connection, in one run. What is
# measured is the relay alone: the bytes cross as they are, HTTP/1.1 from h2load only
# gives them a shape.
#
#   benches/proxy/relay.sh [MODES] [ROUNDS]          (default "small bulk idle", 5)
#
# small: GET / over 64 connections (200,000 requests): the cost of a relay's wake-ups,
#        one small read and write each way per request;
# bulk:  POST 64 KiB to /echo over 8 connections (20,000 requests, 2.5 GiB both ways
#        together): the cost per byte;
# idle:  2,000 connections opened through the relay, one request each, then held quiet:
#        the relay's resident memory per connection it holds (VmRSS after, less before).
# Each round runs every relay once, in rotating order; the medians are printed, and the
# ratios to the better of nginx and HAProxy. MESH_BIN picks the mesh-proxy build
# (default target/release/mesh-proxy; MESH_BIN_B adds a second build, as "mesh-proxy-b").
# Needs h2load, nginx with its stream module (Debian: libnginx-mod-stream), haproxy and
# the bench upstream (target/bench-upstream, built by ../shared/bench/run.sh). Traffic
# goes to 127.0.0.1 only, ports 18080 and 19470-19472.
set -euo pipefail
cd "$(dirname "$0")/../.."
modes=${1:-"small bulk idle"}
rounds=${2:-5}
bin=${MESH_BIN:-$PWD/target/release/mesh-proxy}
bin_b=${MESH_BIN_B:-}
up=${UPSTREAM_DIR:-$PWD/target/bench-upstream/release}
run=$(mktemp -d)
pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$run"; }
trap cleanup EXIT

for tool in h2load nginx haproxy python3; do
  command -v "$tool" >/dev/null || { echo "relay: $tool not found" >&2; exit 1; }
done
[ -x "$up/upstream" ] || { echo "relay: no upstream in $up (run ../shared/bench/run.sh once)" >&2; exit 1; }
stream_module=${NGINX_STREAM_MODULE:-/usr/lib/nginx/modules/ngx_stream_module.so}
[ -f "$stream_module" ] || { echo "relay: no nginx stream module at $stream_module (apt-get install libnginx-mod-stream)" >&2; exit 1; }

"$up/upstream" --h1 127.0.0.1:18080 >"$run/upstream.log" 2>&1 &
pids+=($!)
head -c 65536 /dev/urandom >"$run/body64k"

mkdir -p "$run/nginx"
cat >"$run/nginx.conf" <<EOF
load_module $stream_module;
worker_processes 1;
daemon off;
pid $run/nginx/nginx.pid;
error_log stderr warn;
events { worker_connections 4096; }
stream {
  server {
    listen 127.0.0.1:19471;
    proxy_pass 127.0.0.1:18080;
  }
}
EOF
cat >"$run/haproxy.cfg" <<'EOF'
global
  nbthread 1
  maxconn 4096
defaults
  mode tcp
  timeout connect 1s
  timeout client 60s
  timeout server 60s
frontend relay
  bind 127.0.0.1:19472
  default_backend upstream
backend upstream
  server up 127.0.0.1:18080
EOF

# cpu PID -> "total user" in clock ticks
cpu() { awk '{print $14 + $15, $14}' "/proc/$1/stat"; }

load() {
  local port=$1
  if [ "$mode" = small ]; then
    h2load --h1 -n 200000 -c 64 -t 1 "http://127.0.0.1:$port/"
  else
    h2load --h1 -n 20000 -c 8 -t 1 -d "$run/body64k" "http://127.0.0.1:$port/echo"
  fi >"$run/h2load.out"
  grep -qE '^requests: .* 0 errored' "$run/h2load.out" ||
    { echo "relay: errors through $port:" >&2; grep -E '^requests:' "$run/h2load.out" >&2; exit 1; }
  grep -E '^requests:' "$run/h2load.out" | awk '{print $2}'
}

ready() {
  for _ in $(seq 50); do
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return
    sleep 0.1
  done
  echo "relay: nothing listens on $1" >&2; exit 1
}

# hold PORT N: opens N connections to PORT, one request each, and holds them until its
# stdin closes; prints "held" once all are open and answered.
hold() {
  python3 -u - "$1" "$2" <<'EOF'
import socket, sys
port, n = int(sys.argv[1]), int(sys.argv[2])
held = []
for _ in range(n):
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(b"GET / HTTP/1.1\r\nhost: bench\r\n\r\n")
    got = b""
    while b"\r\n\r\n" not in got:
        chunk = s.recv(4096)
        if not chunk:
            sys.exit("closed before answering")
        got += chunk
    held.append(s)
print("held", flush=True)
sys.stdin.read()
EOF
}

rss() { awk '/VmRSS/ {print $2}' "/proc/$1/status"; }

# measure_idle NAME PID PORT: PID's resident memory per connection held through PORT
measure_idle() {
  local name=$1 pid=$2 port=$3 before after n=2000
  if [ "$pid" = 0 ]; then return; fi
  before=$(rss "$pid")
  mkfifo "$run/hold.in"
  hold "$port" "$n" <"$run/hold.in" >"$run/hold.out" &
  local holder=$!
  exec 4>"$run/hold.in"
  for _ in $(seq 300); do grep -q held "$run/hold.out" && break; sleep 0.1; done
  grep -q held "$run/hold.out" || { echo "relay: $name did not hold $n connections" >&2; tail -n 5 "$run"/*.log >&2; ss -s >&2; exit 1; }
  after=$(rss "$pid")
  exec 4>&-
  wait "$holder" || true
  rm -f "$run/hold.in"
  echo "$mode $name $before $after $n" >>"$run/idle"
}

# measure NAME PID PORT: one load through PORT; PID's CPU (0 for direct) per request
measure() {
  [ "$mode" = idle ] && { measure_idle "$@"; return; }
  local name=$1 pid=$2 port=$3 t0=0 u0=0 t1=0 u1=0 n hwm=0
  [ "$pid" = 0 ] || read -r t0 u0 < <(cpu "$pid")
  n=$(load "$port")
  [ "$pid" = 0 ] || { read -r t1 u1 < <(cpu "$pid"); hwm=$(awk '/VmHWM/ {print $2}' "/proc/$pid/status"); }
  local rate
  rate=$(awk '/^finished in/ {print $4}' "$run/h2load.out")
  echo "$mode $name $t0 $u0 $t1 $u1 $n $hwm $rate" >>"$run/results"
}


relays="direct mesh-proxy nginx haproxy"
[ -n "$bin_b" ] && relays="$relays mesh-proxy-b"
for mode in $modes; do
  for round in $(seq "$rounds"); do
    # Rotate the order each round, so no relay always runs first.
    set -- $relays
    for _ in $(seq $(( (round - 1) % $# ))); do set -- "${@:2}" "$1"; done
    for relay in "$@"; do
      case $relay in
        direct) measure direct 0 18080 ;;
        mesh-proxy | mesh-proxy-b)
          b=$bin; [ "$relay" = mesh-proxy-b ] && b=$bin_b
          # Started by this shell, not a subshell, so that `wait` sees it exit.
          "$b" run --config benches/proxy/opaque.toml --log warn --workers 1 >"$run/mesh.log" 2>&1 &
          pid=$!; pids+=("$pid"); ready 19470
          measure "$relay" "$pid" 19470
          kill "$pid"; wait "$pid" 2>/dev/null || true ;;
        nginx)
          nginx -e stderr -p "$run/nginx/" -c "$run/nginx.conf" 2>"$run/nginx.log" &
          master=$!; pids+=("$master"); ready 19471
          measure nginx "$(pgrep -P "$master" | head -1)" 19471
          kill "$master"; wait "$master" 2>/dev/null || true ;;
        haproxy)
          haproxy -f "$run/haproxy.cfg" -db >"$run/haproxy.log" 2>&1 &
          pid=$!; pids+=("$pid"); ready 19472
          measure haproxy "$pid" 19472
          kill "$pid"; wait "$pid" 2>/dev/null || true ;;
      esac
    done
  done
done

touch "$run/results" "$run/idle"
python3 - "$run/results" "$(getconf CLK_TCK)" <<'EOF'
import collections, statistics, sys
path, hz = sys.argv[1], float(sys.argv[2])
rows = collections.defaultdict(list)
for line in open(path):
    mode, name, t0, u0, t1, u1, n, hwm, rate = line.split()
    t0, u0, t1, u1, n, hwm, rate = map(float, (t0, u0, t1, u1, n, hwm, rate))
    us = lambda ticks: ticks / hz * 1e6 / n
    rows[(mode, name)].append((us(t1 - t0), us(u1 - u0), hwm / 1024, rate))
if not rows:
    sys.exit(0)
per_mib = {"small": None, "bulk": 2 * 64 / 1024}  # MiB moved per request, both ways
print("| mode | relay | CPU per request | user | kernel | CPU per MiB | peak RSS | req/s | CPU vs the better of nginx and HAProxy |")
print("|---|---|---|---|---|---|---|---|---|")
for mode in dict.fromkeys(k[0] for k in rows):
    med = {name: [statistics.median(col) for col in zip(*r)] for (m, name), r in rows.items() if m == mode}
    best = min(med[n][0] for n in ("nginx", "haproxy") if n in med)
    for name, (cpu, user, hwm, rate) in med.items():
        mib = f"{cpu / per_mib[mode]:.0f} µs" if per_mib[mode] and name != "direct" else "—"
        ratio = f"{cpu / best:.2f}×" if name != "direct" else "—"
        cpu_s = f"{cpu:.2f} µs" if name != "direct" else "—"
        user_s = f"{user:.2f}" if name != "direct" else "—"
        kern_s = f"{cpu - user:.2f}" if name != "direct" else "—"
        rss = f"{hwm:.1f} MB" if name != "direct" else "—"
        print(f"| {mode} | {name} | {cpu_s} | {user_s} | {kern_s} | {mib} | {rss} | {rate:,.0f} | {ratio} |")
EOF
python3 - "$run/idle" <<'EOF'
import collections, statistics, sys
rows = collections.defaultdict(list)
for line in open(sys.argv[1]):
    _, name, before, after, n = line.split()
    rows[name].append((int(after) - int(before)) / int(n))
if rows:
    best = min(statistics.median(rows[n]) for n in ("nginx", "haproxy") if n in rows)
    print()
    print("| relay | resident memory per held connection | vs the better of nginx and HAProxy |")
    print("|---|---|---|")
    for name, per in rows.items():
        kib = statistics.median(per)
        print(f"| {name} | {kib:.1f} KiB | {kib / best:.2f}× |")
EOF

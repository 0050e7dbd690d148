#!/usr/bin/env bash
# Two mesh-proxy builds against each other, the way this VM allows: cpu-split.sh rounds
# that alternate between build A and build B (each round also runs nginx with 1 worker),
# then the medians per mode and B's ratios to A. Runs of one build differ by up to 5%
# from one minute to the next here; alternating rounds keep that drift out of the ratio.
#
#   benches/proxy/ab.sh BIN_A BIN_B [MODES] [ROUNDS] [REQUESTS]
#   benches/proxy/ab.sh target/release/mesh-proxy target/pgo/mesh-proxy "h1 h2 post" 3 200000
#
# MODES: any of cpu-split.sh's (h1, h2, post; default all three); ROUNDS default 3,
# REQUESTS per round default 200,000. Same needs as cpu-split.sh (h2load, nginx, the bench
# upstream); about 15 s per round and build at the defaults.
set -euo pipefail
cd "$(dirname "$0")/../.."
[ $# -ge 2 ] || { grep -m2 '^#   benches' "$0" >&2; exit 2; }
a=$1 b=$2 modes=${3:-"h1 h2 post"} rounds=${4:-3} n=${5:-200000}
for bin in "$a" "$b"; do
  [ -x "$bin" ] || { echo "ab: $bin is not an executable" >&2; exit 2; }
done
log=$(mktemp)
trap 'rm -f "$log"' EXIT
for mode in $modes; do
  for _ in $(seq "$rounds"); do
    for side in A B; do
      bin=$a
      [ "$side" = B ] && bin=$b
      echo "== $mode $side" >>"$log"
      MESH_BIN=$bin benches/proxy/cpu-split.sh "$mode" "$n" >>"$log"
    done
  done
done
python3 - "$log" "$a" "$b" <<'EOF'
import collections, re, statistics, sys
log, a, b = sys.argv[1:]
runs = collections.defaultdict(list)
key = None
for line in open(log):
    if line.startswith("== "):
        key = tuple(line.split()[1:3])
        continue
    m = re.match(r"(\S+)\s+cpu\s+([\d.]+) us/req\s+user\s+([\d.]+)\s+kernel\s+([\d.]+)\s+VmHWM ([\d.]+)", line)
    if m and key:
        runs[key + (m.group(1),)].append([float(x) for x in m.groups()[1:]])
med = lambda rows, i: statistics.median(r[i] for r in rows)
print(f"A = {a}\nB = {b}\n")
print("| mode | CPU A | CPU B | B/A | user B/A | kernel B/A | VmHWM A → B | nginx CPU | B/nginx |")
print("|---|---|---|---|---|---|---|---|---|")
for mode in dict.fromkeys(k[0] for k in runs):
    ra, rb = runs[(mode, "A", "mesh-proxy")], runs[(mode, "B", "mesh-proxy")]
    nginx = runs[(mode, "A", "nginx-1w")] + runs[(mode, "B", "nginx-1w")]
    ca, cb, ng = med(ra, 0), med(rb, 0), med(nginx, 0)
    print(f"| {mode} | {ca:.2f} µs | {cb:.2f} µs | {cb / ca:.3f}× | {med(rb, 1) / med(ra, 1):.3f}× "
          f"| {med(rb, 2) / med(ra, 2):.3f}× | {med(ra, 3):.1f} → {med(rb, 3):.1f} MB | {ng:.2f} µs | {cb / ng:.2f}× |")
EOF

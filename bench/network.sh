#!/usr/bin/env bash
# Issue-5 network benchmark: a VM migrated across the namespace testbed (scripts/netns.sh), on a
# shaped LAN link and on a WAN link with delay, against the link's theoretical minimum
# (bytes on the wire ÷ rate) and a plain TCP copy of the same number of bytes over the same link
# in the same run. Needs root (network namespaces). Prints a Markdown table.
#   bench/network.sh [MEMORY] [RATE] [ONE_WAY_DELAY_MS] [REPS] [-- extra migrate options]
#   e.g. bench/network.sh 4GiB 1gbit 25 1
set -euo pipefail
mem=${1:-1GiB}; rate=${2:-1gbit}; delay=${3:-25}; reps=${4:-1}
shift $(( $# < 4 ? $# : 4 )); [ "${1:-}" = "--" ] && shift
extra=("$@")
cd "$(dirname "$0")/.."
here=$PWD
./livemig --help >/dev/null 2>&1   # build once
cli="$here/.build/LiveMig.Cli.dll"
[ -f "$cli" ] || cli=$(find "$here/.build" -name LiveMig.Cli.dll | head -1)
bps=$(python3 -c "
r='$rate'.lower(); m={'gbit':1e9,'mbit':1e6,'kbit':1e3}
print(int(next(float(r[:-len(k)])*v for k,v in m.items() if r.endswith(k))/8))")

# A plain TCP copy of N bytes from lm-src to ADDR:PORT in lm-dst; prints seconds.
plain_copy() {
  local addr=$1 bytes=$2
  ip netns exec lm-dst python3 -c "
import socket
s=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind(('$addr', 5999)); s.listen(1)
c,_=s.accept(); n=0; b=bytearray(1<<20)
while True:
    k=c.recv_into(b)
    if not k: break
    n+=k
c.sendall(b'x'); c.close()" &
  local srv=$!
  sleep 0.5
  ip netns exec lm-src python3 -c "
import socket, time
s=socket.create_connection(('$addr', 5999)); s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
buf=b'\xa5'*(1<<20); left=$bytes; t=time.perf_counter()
while left>0:
    k=min(left, len(buf)); s.sendall(buf[:k]); left-=k
s.shutdown(socket.SHUT_WR); s.recv(1); print('%.3f' % (time.perf_counter()-t))"
  wait $srv
}

run_one() { # ADDR -> prints total_s downtime_ms bytes verified
  local addr=$1
  local out=/tmp/lm-bench-dst.json
  ip netns exec lm-dst dotnet "$cli" listen --bind "$addr" --port 7481 --once --json > "$out" 2>/tmp/lm-bench-dst.err &
  local dst=$!
  for _ in $(seq 100); do grep -q "listening on" /tmp/lm-bench-dst.err 2>/dev/null && break; sleep 0.1; done
  ip netns exec lm-src dotnet "$cli" migrate --to "$addr:7481" --memory "$mem" --fill random --workload idle --warmup 0s \
    --json "${extra[@]}" 2>/tmp/lm-bench-src.err | tee /tmp/lm-bench-src.json | python3 -c '
import json, sys
r = json.loads(sys.stdin.read())
print("%.3f %.0f %d %s" % (r["totalTimeMs"] / 1000, r["downtimeMs"], r["bytesOnWire"], "yes" if r["verified"] else "NO"))'
  wait $dst || true
}

echo "| link | run | migration s | downtime ms | bytes on wire | bytes ÷ rate s | plain TCP copy s | migration ÷ minimum | migration ÷ plain copy | verified |"
echo "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"
for link in lan wan; do
  if [ $link = lan ]; then scripts/netns.sh up "$rate" >/dev/null; addr=10.77.0.2; name="veth, tbf $rate"
  else scripts/netns.sh wan "$rate" "$delay" >/dev/null; addr=10.78.0.2; name="WAN, tbf $rate, RTT $((2 * delay)) ms"; fi
  for r in $(seq "$reps"); do
    read -r total down bytes ver <<<"$(run_one $addr)"
    plain=$(plain_copy $addr "$bytes")
    python3 -c "
b=$bytes; t=$total; p=$plain; m=b/$bps
print('| %s | %d | %.1f | %s | %.2f GiB | %.1f | %.1f | %.2f | %.2f | %s |' % ('$name', $r, t, '$down', b/2**30, m, p, t/m, t/p, '$ver'))"
  done
  scripts/netns.sh down
done

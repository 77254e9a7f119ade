#!/usr/bin/env bash
# Measures what `livemig trace record` costs the program it records: redis-benchmark's
# throughput against redis-server with and without a recording running, alternated
# (off, on, off, on, ...) so drifts of a shared machine hit both alike.
# usage: scripts/trace-overhead.sh [ROUNDS] [INTERVAL]   (defaults 3, 100ms)
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
rounds=${1:-3}; interval=${2:-100ms}
command -v redis-server >/dev/null && command -v redis-benchmark >/dev/null || { echo "trace-overhead: needs redis-server and redis-tools (scripts/record-traces.sh installs them)" >&2; exit 1; }
"$here/livemig" --version >/dev/null
tmp=$(mktemp -d)
redis-server --port 6393 --bind 127.0.0.1 --save "" --appendonly no --logfile "$tmp/redis.log" & pid=$!
rec=""
trap 'kill $pid 2>/dev/null; [ -n "$rec" ] && kill $rec 2>/dev/null; rm -rf "$tmp"' EXIT
for _ in $(seq 100); do redis-cli -p 6393 ping >/dev/null 2>&1 && break; sleep 0.1; done
redis-benchmark -p 6393 -q -n 200000 -r 200000 -d 256 -t set >/dev/null   # the data set
bench() { redis-benchmark -p 6393 -n 300000 -r 200000 -d 256 -c 50 -t set,get --csv 2>/dev/null | awk -F'"' '/^"(SET|GET)"/ {printf "%s %s ", $2, $4}'; }
echo "redis-server $(redis-server --version | awk '{print $3}'), $(nproc) cores, load before: $(cut -d' ' -f1-3 /proc/loadavg)"
for r in $(seq "$rounds"); do
  echo "round $r off: $(bench)"
  "$here/livemig" trace record --pid $pid --interval "$interval" --out "$tmp/t.lmtrace" 2>"$tmp/rec.log" & rec=$!
  sleep 3 # past the recorder's start-up (JIT, initial image)
  echo "round $r on:  $(bench)"
  kill $rec; wait $rec || true; rec=""
  tail -1 "$tmp/rec.log"
done
echo "load after: $(cut -d' ' -f1-3 /proc/loadavg)"

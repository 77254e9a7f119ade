#!/usr/bin/env bash
# Migrates recorded workloads (issue 14) with pre-copy, post-copy and hybrid, without and with
# --optimize all, over loopback (`livemig demo`), and prints a Markdown table row per run.
# usage: [WARMUP=3s] scripts/bench-traces.sh [BANDWIDTH] TRACE...   (BANDWIDTH e.g. 1Gbit; default unlimited)
# WARMUP is how long the replay runs before the migration starts (into the trace).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bw=unlimited
case "${1:-}" in *bit*|*/s|unlimited) bw=$1; shift ;; esac
[ $# -gt 0 ] || { echo "usage: scripts/bench-traces.sh [BANDWIDTH] TRACE..." >&2; exit 2; }
"$here/livemig" --version >/dev/null
echo "commit $(git -C "$here" rev-parse --short HEAD), $(nproc) cores, bandwidth $bw, warm-up ${WARMUP:-3s}, load before: $(cut -d' ' -f1-3 /proc/loadavg)"
echo
echo "| trace | strategy | optimize | total ms | downtime ms | wire MiB | VM state KiB | rounds | stop | verified |"
echo "|---|---|---|---|---|---|---|---|---|---|"
for t in "$@"; do
  # Guest memory: the trace's page space, rounded up to 64 MiB, at least 256 MiB.
  pages=$("$here/livemig" trace show "$t" --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["pageSpace"])')
  mem=$(( (pages * 4096 / 67108864 + 1) * 64 )); [ $mem -lt 256 ] && mem=256
  for strategy in precopy postcopy hybrid; do
    for opt in none all; do
      json=$("$here/livemig" demo --memory ${mem}MiB --fill zero --workload "trace:$t" --warmup "${WARMUP:-3s}" --strategy $strategy --optimize $opt --bandwidth $bw --json 2>/dev/null) || true
      echo "$json" | python3 -c '
import json, sys
name, strategy, opt = sys.argv[1:4]
try: r = json.loads(sys.stdin.read())
except Exception: print("| {} | {} | {} | failed | | | | | | |".format(name, strategy, opt)); sys.exit()
print("| {} | {} | {} | {:.0f} | {:.1f} | {:.1f} | {:.0f} | {} | {} | {} |".format(name, strategy, opt, r["totalTimeMs"], r["downtimeMs"],
      r["bytesOnWire"] / 1048576, r["bytes"]["vmState"] / 1024, len(r["rounds"]), r.get("stopReason") or "-", r["verified"]))
' "$(basename "$t" .lmtrace)" $strategy $opt
    done
  done
done
echo
echo "load after: $(cut -d' ' -f1-3 /proc/loadavg)"

#!/usr/bin/env bash
# Issue-4 matrix: each workload migrated with every stage off, each stage alone, and all
# together, over a 1 Gbit/s cap; prints a Markdown table (median of REPS runs).
#   bench/stages.sh [MEMORY] [REPS]        e.g. bench/stages.sh 256MiB 3
# With OUT=DIR every run's JSON report is also kept there (DIR/WORKLOAD-STAGES-REP.json), e.g. for
# the per-phase downtime (downtimeBreakdown): bench/downtime.py DIR.
set -euo pipefail
mem=${1:-256MiB}
reps=${2:-3}
cd "$(dirname "$0")/.."
./livemig --help >/dev/null   # build once
workloads=("idle" "hotcold:rate=50000,wss=10%" "random:rate=20000" "kv")
configs=("baseline|" "lz4|--compress lz4" "zstd|--compress zstd:1" "adaptive|--compress adaptive" "xbzrle|--xbzrle-cache 64MiB" "dedup|--dedup" "free-pages|--skip-free-pages" "defer-hot|--defer-hot-pages --dirty-log software" "auto-converge|--auto-converge" "all|--optimize all --defer-hot-pages --auto-converge --dirty-log software")
echo "| workload | stages | total s | downtime ms | bytes on wire | vs baseline bytes | vs baseline downtime | verified |"
echo "|---|---|---:|---:|---:|---:|---:|---|"
for w in "${workloads[@]}"; do
  base_bytes=""; base_down=""
  for c in "${configs[@]}"; do
    name=${c%%|*}; opts=${c#*|}
    results=()
    for r in $(seq "$reps"); do
      # shellcheck disable=SC2086
      json=$(./livemig demo --memory "$mem" --workload "$w" --fill mixed --seed "$r" --bandwidth 1Gbit --warmup 1s --json $opts 2>/dev/null || true)
      results+=("$json")
      if [ -n "${OUT:-}" ]; then mkdir -p "$OUT"; printf '%s\n' "$json" >"$OUT/${w%%:*}-$name-$r.json"; fi
    done
    line=$(printf '%s\n' "${results[@]}" | python3 -c '
import json, sys, statistics
rs = [json.loads(l) for l in sys.stdin if l.strip().startswith("{")]
ok = [r for r in rs if r.get("outcome") == "completed"]
if not ok:
    print("nan nan nan no")
    sys.exit()
def med(k):
    return statistics.median(r[k] for r in ok)
verified = "yes" if all(r["verified"] for r in ok) and len(ok) == len(rs) else "NO"
print("%.2f %.0f %.0f %s" % (med("totalTimeMs") / 1000, med("downtimeMs"), med("bytesOnWire"), verified))')
    read -r total down bytes ver <<<"$line"
    if [ "$name" = baseline ]; then base_bytes=$bytes; base_down=$down; fi
    rb=$(python3 -c "print(f'{$bytes/$base_bytes:.2f}' if '$bytes' != 'nan' and '$base_bytes' not in ('', 'nan') else '-')")
    rd=$(python3 -c "print(f'{$down/$base_down:.2f}' if '$down' != 'nan' and '$base_down' not in ('', 'nan', '0') else '-')")
    mib=$(python3 -c "print(f'{$bytes/1048576:.1f} MiB' if '$bytes' != 'nan' else '-')")
    echo "| \`$w\` | $name | $total | $down | $mib | $rb | $rd | $ver |"
  done
done

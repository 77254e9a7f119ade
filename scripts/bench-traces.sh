#!/usr/bin/env bash
# Migrates recorded workloads (issue 14) with pre-copy, post-copy and hybrid, without and with
# --optimize all, over loopback (`livemig demo`), and prints a Markdown table row per run — or,
# with REPS=N, every configuration N times (all of them once per repetition, in turn) and the
# median of each column per row, with the spread of the total time.
# usage: [WARMUP=3s] [REPS=1] scripts/bench-traces.sh [BANDWIDTH] TRACE...   (BANDWIDTH e.g. 1Gbit; default unlimited)
# WARMUP is how long the replay runs before the migration starts (into the trace).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bw=unlimited
case "${1:-}" in *bit*|*/s|unlimited) bw=$1; shift ;; esac
[ $# -gt 0 ] || { echo "usage: [WARMUP=3s] [REPS=1] scripts/bench-traces.sh [BANDWIDTH] TRACE..." >&2; exit 2; }
reps=${REPS:-1}
"$here/livemig" --version >/dev/null
echo "commit $(git -C "$here" rev-parse --short HEAD), $(nproc) cores, bandwidth $bw, warm-up ${WARMUP:-3s}, repetitions $reps, load before: $(cut -d' ' -f1-3 /proc/loadavg)"
echo
out="$(mktemp -d /tmp/livemig-bench-traces.XXXXXX)"
for r in $(seq "$reps"); do
  for t in "$@"; do
    # Guest memory: the trace's page space, rounded up to 64 MiB, at least 256 MiB.
    pages=$("$here/livemig" trace show "$t" --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["pageSpace"])')
    mem=$(( (pages * 4096 / 67108864 + 1) * 64 )); [ $mem -lt 256 ] && mem=256
    for strategy in precopy postcopy hybrid; do
      for opt in none all; do
        name="$(basename "$t" .lmtrace)|$strategy|$opt"
        json=$("$here/livemig" demo --memory ${mem}MiB --fill zero --workload "trace:$t" --warmup "${WARMUP:-3s}" --strategy $strategy --optimize $opt --bandwidth $bw --json 2>/dev/null | tr -d '\n') || json=""
        printf '%s\t%s\n' "$name" "${json:-failed}" >> "$out/runs.tsv"
      done
    done
  done
done
python3 - "$out/runs.tsv" "$reps" <<'PY'
import json, statistics, sys
rows, order = {}, []
for line in open(sys.argv[1]):
    name, _, js = line.rstrip("\n").partition("\t")
    if name not in rows: rows[name] = []; order.append(name)
    try: rows[name].append(json.loads(js))
    except Exception: rows[name].append(None)
reps = int(sys.argv[2])
med = statistics.median
if reps == 1:
    print("| trace | strategy | optimize | total ms | downtime ms | wire MiB | VM state KiB | rounds | stop | verified |")
    print("|---|---|---|---|---|---|---|---|---|---|")
else:
    print(f"| trace | strategy | optimize | total ms (median of {reps}) | min–max | downtime ms | wire MiB | VM state KiB | rounds | stop | verified |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
for name in order:
    t, s, o = name.split("|")
    ok = [r for r in rows[name] if r]
    if not ok: print(f"| {t} | {s} | {o} | failed | | | | | | |" + (" |" if reps > 1 else "")); continue
    tot = [r["totalTimeMs"] for r in ok]
    cells = [f"{med(tot):.0f}"] + ([f"{min(tot):.0f}–{max(tot):.0f}"] if reps > 1 else []) + [
        f"{med([r['downtimeMs'] for r in ok]):.1f}", f"{med([r['bytesOnWire'] for r in ok]) / 1048576:.1f}",
        f"{med([r['bytes']['vmState'] for r in ok]) / 1024:.0f}", f"{med([len(r['rounds']) for r in ok]):.0f}",
        "/".join(sorted({r.get('stopReason') or '-' for r in ok})),
        f"{sum(1 for r in ok if r['verified'])} of {len(rows[name])}" if reps > 1 else str(ok[0]["verified"])]
    print(f"| {t} | {s} | {o} | " + " | ".join(cells) + " |")
PY
echo
echo "load after: $(cut -d' ' -f1-3 /proc/loadavg)"

#!/usr/bin/env bash
# The post-copy switch-over of two builds of the command line, alternating A B A B … in one run:
# downtime and each side's switch steps (the report's downtimeBreakdown), median of REPS.
#   bench/ab-postcopy.sh DIR_A DIR_B [REPS] [SIZES]      (REPS default 5; SIZES default "512MiB 4GiB")
# DIR_A, DIR_B: folders holding LiveMig.Cli.dll, e.g. a plain build (dotnet build src/LiveMig.Cli
# -c Release -o DIR) against ./livemig's ReadyToRun one (.build/livemig). Wait for a quiet machine.
set -euo pipefail
a="$1"; b="$2"; reps="${3:-5}"; sizes="${4:-512MiB 4GiB}"
out="$(mktemp -d /tmp/livemig-ab-postcopy.XXXXXX)"
load() { cut -d' ' -f1-3 /proc/loadavg; }
echo "Load average before: $(load)."
echo
for mem in $sizes; do
  for r in $(seq "$reps"); do
    for side in A B; do
      dir=$a; [ "$side" = B ] && dir=$b
      dotnet "$dir/LiveMig.Cli.dll" demo --strategy postcopy --memory "$mem" --json 2>/dev/null | tr -d '\n' >> "$out/$side.$mem.jsonl"
      echo >> "$out/$side.$mem.jsonl"
    done
  done
done
echo "| Guest | Build | Downtime ms (median) | min–max | source JIT ms | destination JIT ms | Source phases (median ms) | Destination phases (median ms) | Verified |"
echo "|---|---|---:|---|---:|---:|---|---|---|"
for mem in $sizes; do
  for side in A B; do
    MEM="$mem" SIDE="$side" python3 - "$out/$side.$mem.jsonl" <<'PY'
import json, os, statistics, sys
rs = [json.loads(l) for l in open(sys.argv[1]) if l.strip().startswith("{")]
def ms(r, side, name):
    return next((p["ms"] for p in r["downtimeBreakdown"][side] if p["phase"] == name), 0.0)
def phases(side):
    names = [p["phase"] for p in rs[0]["downtimeBreakdown"][side]]
    return ", ".join("%s %.1f" % (n, statistics.median(ms(r, side, n) for r in rs)) for n in names)
d = [r["downtimeMs"] for r in rs]
jit = lambda k: statistics.median(r["downtimeBreakdown"].get(k, 0) for r in rs)
print("| %s | %s | %.1f | %.1f–%.1f | %.1f | %.1f | %s | %s | %s |" % (os.environ["MEM"], os.environ["SIDE"], statistics.median(d), min(d), max(d),
      jit("sourceJitMs"), jit("destinationJitMs"), phases("source"), phases("destination"), all(r["verified"] for r in rs)))
PY
  done
done
echo
echo "Load average after: $(load)."

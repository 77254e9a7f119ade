#!/usr/bin/env bash
# Every issue-11 scenario with its baseline in the same run, as the Markdown that
# docs/benchmarks.md's "Current figures" shows (stdout; progress on stderr):
#   bench/run-all.sh [REPS] > /tmp/current.md        (REPS default 5; about 25 minutes on 2 cores)
# Wait for a quiet machine first (load average below 1): a loaded machine slows the plain-socket
# baselines too and flatters the ratios. The load before and after each part is printed.
set -euo pipefail
reps=${1:-5}
cd "$(dirname "$0")/.."
dotnet build -c Release bench/LiveMig.Bench -warnaserror -v q -nologo >&2
dotnet build -c Release bench/PostCopyBench -warnaserror -v q -nologo >&2
./livemig --help >/dev/null
bench=(dotnet bench/LiveMig.Bench/bin/Release/net10.0/LiveMig.Bench.dll)
load() { cut -d' ' -f1-3 /proc/loadavg; }

echo "## Current figures (commit $(git rev-parse --short HEAD)$(git diff --quiet || echo ', with uncommitted changes'), $(date -u '+%Y-%m-%d %H:%M UTC'))"
echo
echo "Command: \`bench/run-all.sh $reps\`. Load average at the start: $(load)."
echo
"${bench[@]}" round0 --memory 2GiB --reps "$reps"
"${bench[@]}" streams --memory 1GiB --reps "$reps"
"${bench[@]}" stage-cost --memory 1GiB --reps "$reps"

echo "### Post-copy switch-over: \`./livemig demo --strategy postcopy --memory M --json\`, median of $reps"
echo
echo "Load average before: $(load)."
echo
echo "| Guest | Downtime ms (median) | min–max | Source phases (median ms) | Destination phases (median ms) | Verified |"
echo "|---|---:|---|---|---|---|"
for mem in 512MiB 4GiB; do
  for r in $(seq "$reps"); do ./livemig demo --strategy postcopy --memory "$mem" --json 2>/dev/null | tr -d '\n'; echo; done | MEM="$mem" python3 -c '
import json, os, statistics, sys
rs = [json.loads(l) for l in sys.stdin if l.strip().startswith("{")]
def ms(r, side, name):
    return next(p["ms"] for p in r["downtimeBreakdown"][side] if p["phase"] == name)
def phases(side):
    names = [p["phase"] for p in rs[0]["downtimeBreakdown"][side]]
    return ", ".join("%s %.1f" % (n, statistics.median(ms(r, side, n) for r in rs)) for n in names)
d = [r["downtimeMs"] for r in rs]
print("| %s | %.1f | %.1f–%.1f | %s | %s | %s |" % (os.environ["MEM"], statistics.median(d), min(d), max(d), phases("source"), phases("destination"), all(r["verified"] for r in rs)))'
done
echo
echo "Load average after: $(load)."
echo
echo "### Post-copy fault service: \`PostCopyBench --strategies ,\` (1 GiB, random writes at 20,000 pages/s, no cap)"
echo
dotnet bench/PostCopyBench/bin/Release/net10.0/PostCopyBench.dll --strategies , | grep -v -e '^{' -e '^# ' -e '^## .*link capped' -e '^| strategy' -e '^|---|---|---|'
echo
"${bench[@]}" downtime --memory 1GiB --reps "$reps"
echo "Load average at the end: $(load)."

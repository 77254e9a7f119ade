#!/usr/bin/env bash
# LiveMig's simulator beside SimGrid's live-migration model (issue 15; docs/benchmarks.md, "Simulator
# against SimGrid"). Installs libsimgrid-dev (Debian; skipped, saying why, without apt-get), builds
# bench/simgrid/migrate.cpp, and runs both on the same parameters — 2 GiB VMs, one 1 Gbit/s link of
# 0.1 ms latency, SimGrid's dirty page intensity (dirty bytes/s = intensity x link; LiveMig: page writes/s
# = intensity x link / 4096) over a working set of 90% of RAM (SimGrid's default), a 30 ms downtime
# target (SimGrid's fixed one), a negligible VM state:
#   1. agreement of total time and rounds, one migration per intensity (SimGrid on an ideal link,
#      CM02 without cross-traffic, as LiveMig's links; its default LV08 figure beside);
#   2. speed: migrations per wall second and peak RSS, N sequential and N concurrent over the link.
# Wall times need a quiet machine; on a loaded one the figures only show that it runs.
# Each SimGrid cell has a wall-time bound, SIMGRID_TIMEOUT seconds (default 300): a cell that has not
# finished by then is stopped and reported as "did not finish in T s", its rate as under N / T and the
# ratio as over LiveMig's rate ÷ (N / T) (SimGrid's 10,000 sequential cells keep all 10,000 VMs
# computing while they wait their turn, and ran for minutes here).
#   bench/simgrid/run.sh [COUNTS] [INTENSITIES]     e.g. bench/simgrid/run.sh "1000 10000" "0 0.1 0.5"
set -euo pipefail
cd "$(dirname "$0")/../.."
counts=${1:-"1000 10000"}
intensities=${2:-"0 0.1 0.5"}
bound=${SIMGRID_TIMEOUT:-300}

if [ ! -f /usr/include/simgrid/plugins/live_migration.h ]; then
  if ! command -v apt-get >/dev/null; then
    echo "skipped: SimGrid comes from Debian's libsimgrid-dev and there is no apt-get here"; exit 0
  fi
  if ! apt-get install -y --no-install-recommends libsimgrid-dev g++ >/tmp/livemig-simgrid-apt.log 2>&1; then
    echo "skipped: apt-get could not install libsimgrid-dev (log: /tmp/livemig-simgrid-apt.log)"; exit 0
  fi
fi
mkdir -p .build
sg=.build/simgrid-migrate
if [ ! -x "$sg" ] || [ bench/simgrid/migrate.cpp -nt "$sg" ]; then
  g++ -std=c++17 -O2 bench/simgrid/migrate.cpp -o "$sg" -lsimgrid
fi
dotnet build -c Release bench/LiveMig.Bench >/dev/null
# The simulator is a batch job: its hot loops compiled once, optimised (no tier-0 pass first); unset to compare.
export DOTNET_TieredCompilation=${DOTNET_TieredCompilation:-0}
lm="dotnet bench/LiveMig.Bench/bin/Release/net10.0/LiveMig.Bench.dll simulate --warmup --memory 2GiB --bandwidth 1Gbit --latency 0.1ms --working-set 1843MiB --downtime-limit 30ms --state 0"
ideal="--cfg=network/model:CM02 --cfg=network/crosstraffic:0"
big="--cfg=contexts/guard-size:0 --cfg=contexts/stack-size:128"   # SimGrid's actors' stacks, for thousands of them
field() { sed -n "s/.*\b$1=\([^ ]*\).*/\1/p"; }
col() { awk -F'|' -v c="$1" '{gsub(/ /, "", $c); print $c}'; }   # a column of LiveMig's Markdown row

echo "Machine: $(nproc) cores, $(uname -r); load average $(cut -d' ' -f1-3 /proc/loadavg); DOTNET_TieredCompilation=$DOTNET_TieredCompilation; SimGrid cells bounded at ${bound} s of wall time; SimGrid $(dpkg-query -W -f '${Version}' libsimgrid-dev 2>/dev/null || echo '?'); commit $(git rev-parse --short HEAD)"
echo
echo "Agreement (one migration):"
echo
echo "| intensity | SimGrid total s (ideal link) | SimGrid rounds | SimGrid total s (its default LV08) | LiveMig total s | LiveMig rounds | LiveMig vs SimGrid (ideal) |"
echo "|---:|---:|---:|---:|---:|---:|---:|"
for i in $intensities; do
  line=$(timeout "$bound" "$sg" --count 1 --intensity "$i" $ideal --log=vm_live_migration.thres:debug 2>/tmp/livemig-simgrid.log | tail -1) || true
  s_total=$(echo "$line" | field mean_total_s)
  s_rounds=$(grep -c ': sent ' /tmp/livemig-simgrid.log || true)
  d_total=$(timeout "$bound" "$sg" --count 1 --intensity "$i" 2>/dev/null | tail -1 | field mean_total_s) || true
  [ -n "$s_total" ] || s_total="did not finish in ${bound} s"
  [ -n "$d_total" ] || d_total="did not finish in ${bound} s"
  row=$($lm --count 1 --mode sequential --intensity "$i")
  l_total=$(echo "$row" | col 9); l_rounds=$(echo "$row" | col 8)
  diff=$(awk -v a="$l_total" -v b="$s_total" 'BEGIN { if (b + 0 > 0) printf "%+.1f%%", (a - b) / b * 100; else print "-" }')
  echo "| $i | $s_total | $s_rounds | $d_total | $l_total | $l_rounds | $diff |"
done
echo
echo "Speed (SimGrid: its default network model; each cell one process, so its peak RSS is its own):"
echo
echo "| mode | migrations | intensity | SimGrid completed | SimGrid wall s | SimGrid migrations / wall s | SimGrid peak RSS MiB | LiveMig completed | LiveMig wall s | LiveMig migrations / wall s | LiveMig peak RSS | ratio (LiveMig / SimGrid per wall s) |"
echo "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
for mode in sequential concurrent; do
  # Concurrent: N VMs share the link, so each gets 1/N of it; a VM dirtying faster than its share never
  # converges (SimGrid then iterates until its 10^7 s timeout), so concurrent runs are at intensity 0.
  modes_intensities=$intensities; [ "$mode" = concurrent ] && modes_intensities=0
  for n in $counts; do
    for i in $modes_intensities; do
      rc=0
      line=$(timeout "$bound" "$sg" --count "$n" --mode "$mode" --intensity "$i" $big 2>/dev/null | tail -1) || rc=$?
      row=$($lm --count "$n" --mode "$mode" --intensity "$i")
      l_rate=$(echo "$row" | col 13 | tr -d ,)
      if [ "$rc" -ne 0 ] || [ -z "$(echo "$line" | field per_wall_s)" ]; then
        # Stopped at the bound (timeout's 124) or failed: say so; its rate is below N / T at most.
        why="did not finish in ${bound} s"; [ "$rc" -ne 124 ] && why="failed (exit $rc)"
        ratio=$(awk -v a="$l_rate" -v n="$n" -v t="$bound" -v rc="$rc" 'BEGIN { if (rc == 124) printf "> %.1f", a / (n / t); else print "-" }')
        srate=$([ "$rc" -eq 124 ] && awk -v n="$n" -v t="$bound" 'BEGIN { printf "< %.0f", n / t }' || echo "-")
        echo "| $mode | $n | $i | $why | > $bound | $srate | - | $(echo "$row" | col 7) | $(echo "$row" | col 12) | $l_rate | $(echo "$row" | col 14) | $ratio |"
        continue
      fi
      s_rate=$(echo "$line" | field per_wall_s)
      ratio=$(awk -v a="$l_rate" -v b="$s_rate" 'BEGIN { if (b > 0) printf "%.1f", a / b; else print "-" }')
      rss=$(echo "$line" | field peak_rss_kib); rss=$(awk -v k="${rss:-0}" 'BEGIN { printf "%.0f", k / 1024 }')
      echo "| $mode | $n | $i | $(echo "$line" | field completed) | $(echo "$line" | field wall_s) | $s_rate | $rss | $(echo "$row" | col 7) | $(echo "$row" | col 12) | $l_rate | $(echo "$row" | col 14) | $ratio |"
    done
  done
done

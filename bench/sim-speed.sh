#!/usr/bin/env bash
# The simulator's speed (docs/simulator.md, "Speed"): 1,000 and 10,000 migrations of 2 GiB VMs over
# one shared 1 Gbit/s link, one after another and all at once, at three dirty rates; one process per
# cell so each peak RSS is its own. Needs a quiet machine: it measures wall time.
#   bench/sim-speed.sh [COUNTS] [RATES]      e.g. bench/sim-speed.sh "1000 10000" "0 2000 8000"
set -euo pipefail
cd "$(dirname "$0")/.."
counts=${1:-"1000 10000"}
rates=${2:-"0 2000 8000"}
dotnet build -c Release bench/LiveMig.Bench >/dev/null
# The simulator is a batch job: its hot loops compiled once, optimised (no tier-0 pass first); unset to compare.
export DOTNET_TieredCompilation=${DOTNET_TieredCompilation:-0}
bench="dotnet bench/LiveMig.Bench/bin/Release/net10.0/LiveMig.Bench.dll simulate"
echo "Machine: $(nproc) cores, $(uname -r); load average $(cut -d' ' -f1-3 /proc/loadavg); DOTNET_TieredCompilation=$DOTNET_TieredCompilation; commit $(git rev-parse --short HEAD)"
echo
header=--header
for mode in sequential concurrent; do
  for n in $counts; do
    for rate in $rates; do
      $bench --warmup --count "$n" --mode "$mode" --memory 2GiB --bandwidth 1Gbit --rate "$rate" $header
      header=
    done
  done
done

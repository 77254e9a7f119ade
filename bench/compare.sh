#!/usr/bin/env bash
# Runs one LiveMig.Bench scenario from two builds in turn (A B A B …, N times each) and prints
# the median of every table row's figures per build, and B's medians over A's, so a before/after
# comparison is made in one run on the same machine state.
#   bench/compare.sh DIR_A DIR_B N -- SCENARIO [options]
# DIR_A, DIR_B: folders holding a built LiveMig.Bench (dotnet build bench/LiveMig.Bench -c Release -o DIR).
set -euo pipefail
a="$1"; b="$2"; n="$3"; shift 3
[ "$1" = "--" ] && shift
out="$(mktemp -d /tmp/livemig-compare.XXXXXX)"
echo "load before: $(cut -d' ' -f1-3 /proc/loadavg)" >&2
for i in $(seq 1 "$n"); do
  for side in A B; do
    dir=$a; [ "$side" = B ] && dir=$b
    echo "run $i $side: $dir/LiveMig.Bench $*" >&2
    dotnet "$dir/LiveMig.Bench.dll" "$@" > "$out/$side.$i.md" 2>"$out/$side.$i.err"
  done
done
echo "load after: $(cut -d' ' -f1-3 /proc/loadavg)" >&2
python3 "$(dirname "$0")/compare.py" "$out" "$n"

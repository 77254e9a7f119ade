#!/usr/bin/env bash
# Builds the self-checking boot-sector guest (bootsector.asm) with nasm into a 1.44 MB floppy
# image that QEMU boots read-only: guests/bootsector/out/bootsector.img, or the path given.
#   RANGE_MIB=100   MiB of pages the guest rewrites, from 1 MiB up (the guest needs RANGE_MIB + 1 MiB of RAM or more)
#   REPORT_EVERY=64 passes between two serial reports (a power of two)
# Usage: guests/bootsector/build.sh [OUT.img]   (nasm: scripts/install-qemu.sh)
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
out="${1:-$here/out/bootsector.img}"
range_mib="${RANGE_MIB:-100}"
report_every="${REPORT_EVERY:-64}"
command -v nasm >/dev/null || { echo "build.sh: nasm is missing (scripts/install-qemu.sh installs it)" >&2; exit 1; }
[[ "$range_mib" =~ ^[0-9]+$ ]] && [ "$range_mib" -ge 1 ] && [ "$range_mib" -le 3000 ] || { echo "build.sh: RANGE_MIB '$range_mib': expected 1..3000" >&2; exit 1; }
[[ "$report_every" =~ ^[0-9]+$ ]] && [ "$report_every" -ge 1 ] && [ $((report_every & (report_every - 1))) -eq 0 ] || { echo "build.sh: REPORT_EVERY '$report_every': expected a power of two" >&2; exit 1; }
mkdir -p "$(dirname "$out")"
nasm -f bin -DRANGE_END=$(( (1 + range_mib) << 20 )) -DREPORT_EVERY="$report_every" -o "$out.tmp" "$here/bootsector.asm"
truncate -s 1474560 "$out.tmp"   # a 1.44 MB floppy: QEMU attaches it read-only (no disk lock to hand over)
mv "$out.tmp" "$out"
echo "$out"

#!/usr/bin/env bash
# Installs what LiveMig's QEMU guests need, if missing, from Debian's packages only:
#   qemu-system-x86   qemu-system-x86_64, which runs the guests (TCG is enough; docs/qemu.md)
#   nasm              assembles the boot-sector test guest (guests/bootsector/build.sh)
# Idempotent; needs root (apt-get). Called by scripts/install-deps.sh, so CI (.ci/run) has them.
# The tests that need a missing tool say so and skip (trait qemu).
set -u
need=()
command -v qemu-system-x86_64 >/dev/null || need+=(qemu-system-x86)
command -v nasm >/dev/null || need+=(nasm)
if [ ${#need[@]} -eq 0 ]; then exit 0; fi
if [ "$(id -u)" != 0 ]; then echo "install-qemu: missing ${need[*]} and not root; install them by hand" >&2; exit 1; fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq && apt-get install -y -qq --no-install-recommends "${need[@]}"

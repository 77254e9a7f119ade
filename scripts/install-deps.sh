#!/usr/bin/env bash
# Installs the system tools LiveMig's heavier tests, benchmarks and native helper use, if missing:
#   iproute2 (ip, tc)              the network-namespace testbed (scripts/netns.sh)
#   gcc, libc6-dev, libxxhash0,    build native/uffd_serve.c, post-copy's userfaultfd fault-service
#   linux-libc-dev                 helper (without them post-copy uses its portable demand-paging path)
#   qemu-system-x86, nasm          QEMU guests and the boot-sector test guest (scripts/install-qemu.sh)
#   redis-server, redis-tools      the trace recorder's test of a real server under its own load generator
# Idempotent; needs root (apt-get). The tests that need a missing tool say so and skip.
set -u
status=0
"$(dirname "$0")/install-qemu.sh" || status=1
need=()
command -v ip  >/dev/null || need+=(iproute2)
command -v tc  >/dev/null || need+=(iproute2)
command -v gcc >/dev/null || need+=(gcc libc6-dev)
[ -e /usr/lib/x86_64-linux-gnu/libxxhash.so.0 ] || need+=(libxxhash0)
[ -e /usr/include/linux/userfaultfd.h ] || need+=(linux-libc-dev)
command -v redis-server    >/dev/null || need+=(redis-server)
command -v redis-benchmark >/dev/null || need+=(redis-tools)
if [ ${#need[@]} -eq 0 ]; then exit $status; fi
if [ "$(id -u)" != 0 ]; then echo "install-deps: missing ${need[*]} and not root; install them by hand" >&2; exit 1; fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq && apt-get install -y -qq --no-install-recommends $(printf '%s\n' "${need[@]}" | sort -u) || status=1
exit $status

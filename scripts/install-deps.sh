#!/usr/bin/env bash
# Installs the system tools LiveMig's heavier tests and benchmarks use, if they are missing:
# iproute2 (ip, tc) for the network-namespace testbed, gcc for native helpers.
# Idempotent; needs root (apt-get). The tests that need a missing tool say so and skip.
set -euo pipefail
missing=()
command -v ip  >/dev/null || missing+=(iproute2)
command -v tc  >/dev/null || missing+=(iproute2)
command -v gcc >/dev/null || missing+=(gcc)
if [ ${#missing[@]} -eq 0 ]; then exit 0; fi
if [ "$(id -u)" != 0 ]; then echo "install-deps: missing ${missing[*]} and not root; install them by hand" >&2; exit 1; fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends $(printf '%s\n' "${missing[@]}" | sort -u)

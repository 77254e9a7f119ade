#!/usr/bin/env bash
# System packages some parts need (called by .ci/run when present; safe to run again):
#   gcc + libxxhash0  build native/uffd_serve.c, the userfaultfd fault-service helper of post-copy
#                     (without them post-copy uses its portable demand-paging path).
set -u
need=()
command -v gcc >/dev/null || need+=(gcc libc6-dev)
[ -e /usr/lib/x86_64-linux-gnu/libxxhash.so.0 ] || need+=(libxxhash0)
[ -e /usr/include/linux/userfaultfd.h ] || need+=(linux-libc-dev)
if [ ${#need[@]} -gt 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq && apt-get install -y -qq --no-install-recommends "${need[@]}"
fi

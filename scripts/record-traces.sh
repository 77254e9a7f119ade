#!/usr/bin/env bash
# Records traces of real programs under their own load generators (issue 14), with
# `livemig trace record`, into OUTDIR (default traces/):
#   redis      redis-server under redis-benchmark (SET/GET/INCR/LPUSH, 50 clients, random keys)
#   postgres   PostgreSQL 15 under pgbench (TPC-B-like, 4 clients), postmaster and backends (--children)
#   memcached  memcached under memcslap (set/get mix, 8 clients)
#   compile    part of the Linux 6.1 tree (linux-source-6.1) built with make -j2 (--children)
# usage: scripts/record-traces.sh [--short] [OUTDIR] [NAME...]
#   full: 60 s each (a few hundred MiB of page writes); --short: 5 s each.
# Installs the Debian packages it needs first (idempotent; needs root for apt-get). Servers run
# on 127.0.0.1 only, on their own ports and data directories, and are stopped at the end.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
secs=60
if [ "${1:-}" = "--short" ]; then secs=5; shift; fi
out="${1:-$here/traces}"; [ $# -gt 0 ] && shift
names=("$@"); [ ${#names[@]} -eq 0 ] && names=(redis postgres memcached compile)
mkdir -p "$out"
out="$(cd "$out" && pwd)"
work="$out/.work"; mkdir -p "$work"
livemig="$here/livemig"
"$livemig" --version >/dev/null # build it now, not while a load generator runs

need=()
for n in "${names[@]}"; do
  case "$n" in
    redis) command -v redis-server >/dev/null || need+=(redis-server); command -v redis-benchmark >/dev/null || need+=(redis-tools) ;;
    postgres) command -v pgbench >/dev/null || need+=(postgresql postgresql-contrib) ;;
    memcached) command -v memcached >/dev/null || need+=(memcached); command -v memcslap >/dev/null || need+=(libmemcached-tools) ;;
    compile) ls /usr/src/linux-source-6.1.tar.xz >/dev/null 2>&1 || need+=(linux-source-6.1)
             for t in make gcc flex bison bc; do command -v $t >/dev/null || need+=($t); done
             [ -e /usr/include/libelf.h ] || need+=(libelf-dev); [ -e /usr/include/openssl/ssl.h ] || need+=(libssl-dev) ;;
    *) echo "record-traces: unknown trace '$n' (known: redis postgres memcached compile)" >&2; exit 2 ;;
  esac
done
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" != 0 ]; then echo "record-traces: missing ${need[*]} and not root; install them by hand" >&2; exit 1; fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq && apt-get install -y -qq --no-install-recommends $(printf '%s\n' "${need[@]}" | sort -u) >/dev/null
fi

pids=()
pg_stop=""
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  if [ -n "$pg_stop" ]; then $pg_stop >/dev/null 2>&1 || true; fi
}
trap cleanup EXIT

# record NAME PID [--children]: records PID for $secs while the load generator (started by the caller) runs.
record() {
  local name=$1 pid=$2; shift 2
  "$livemig" trace record --pid "$pid" --duration "${secs}s" --out "$out/$name.lmtrace" "$@"
}

wait_port() { for _ in $(seq 100); do (echo > /dev/tcp/127.0.0.1/$1) 2>/dev/null && return 0; sleep 0.1; done; echo "record-traces: nothing listens on port $1" >&2; return 1; }

redis() {
  redis-server --port 6391 --bind 127.0.0.1 --save "" --appendonly no --daemonize no --logfile "$work/redis.log" & local pid=$!; pids+=($pid)
  wait_port 6391
  # Load first (the data set), then a steady mix while recording.
  redis-benchmark -p 6391 -q -n 200000 -r 200000 -d 256 -t set >/dev/null
  (while kill -0 $pid 2>/dev/null; do redis-benchmark -p 6391 -q -n 100000 -r 200000 -d 256 -c 50 -t set,get,incr,lpush >/dev/null 2>&1 || break; done) & local gen=$!; pids+=($gen)
  record redis $pid
  kill $gen $pid 2>/dev/null || true; wait $pid 2>/dev/null || true
}

postgres() {
  local bin; bin=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)
  local data="$work/pgdata"
  rm -rf "$data"; mkdir -p "$data" "$work/pgsock"; chown postgres "$data" "$work/pgsock"
  runuser -u postgres -- "$bin/initdb" -D "$data" -A trust >/dev/null
  runuser -u postgres -- "$bin/pg_ctl" -D "$data" -l "$work/pgsock/pg.log" -w -o "-p 5439 -k $work/pgsock -c listen_addresses=127.0.0.1 -c shared_buffers=128MB" start >/dev/null
  pg_stop="runuser -u postgres -- $bin/pg_ctl -D $data -m immediate -w stop"
  local pid; pid=$(head -1 "$data/postmaster.pid")
  wait_port 5439
  runuser -u postgres -- "$bin/pgbench" -h 127.0.0.1 -p 5439 -i -s 10 postgres >/dev/null 2>&1
  runuser -u postgres -- "$bin/pgbench" -h 127.0.0.1 -p 5439 -c 4 -j 2 -T $((secs + 30)) postgres > "$work/pgbench.log" 2>&1 & local gen=$!; pids+=($gen)
  sleep 1
  record postgres $pid --children
  kill $gen 2>/dev/null || true; wait $gen 2>/dev/null || true
  runuser -u postgres -- "$bin/pg_ctl" -D "$data" -m fast -w stop >/dev/null; pg_stop=""
}

memcached() {
  command memcached -l 127.0.0.1 -p 11219 -m 256 -t 2 -u nobody & local pid=$!; pids+=($pid)
  wait_port 11219
  (while kill -0 $pid 2>/dev/null; do memcslap --servers=127.0.0.1:11219 --concurrency=8 --execute-number=20000 --binary >/dev/null 2>&1 || break; done) & local gen=$!; pids+=($gen)
  sleep 1
  record memcached $pid
  kill $gen $pid 2>/dev/null || true; wait $pid 2>/dev/null || true
}

compile() {
  local src="$work/linux"
  if [ ! -f "$src/Makefile" ]; then
    mkdir -p "$src"; tar -xJf /usr/src/linux-source-6.1.tar.xz -C "$src" --strip-components=1
  fi
  make -C "$src" -s defconfig >/dev/null
  make -C "$src" -s -j2 prepare >/dev/null 2>&1
  find "$src/kernel" "$src/mm" "$src/fs" "$src/lib" -name '*.o' -delete # compile them again
  # make and every compiler it starts (--children); the build is stopped when the recording ends.
  "$livemig" trace record --children --duration "${secs}s" --out "$out/compile.lmtrace" -- make -C "$src" -s -j2 kernel/ mm/ fs/ lib/ >/dev/null
}

for n in "${names[@]}"; do
  echo "== $n (${secs} s)" >&2
  "$n"
  "$livemig" trace show "$out/$n.lmtrace" --png "$out/$n"
done

#!/usr/bin/env bash
# Network testbed: two hosts in network namespaces joined by a veth pair, shaped with tc.
#
#   scripts/netns.sh up [RATE]     create lm-src (10.77.0.1) and lm-dst (10.77.0.2); RATE e.g.
#                                  100mbit, 1gbit, 10gbit or "none" (default none)
#   scripts/netns.sh rate RATE     change the shaping of the existing link
#   scripts/netns.sh wan RATE DELAY_MS [LOSS]
#                                  also a WAN link: lm-src 10.78.0.1 <-> lm-dst 10.78.0.2 through
#                                  the userspace forwarder (tools/LiveMig.WanLink), DELAY_MS each
#                                  way (RTT = 2 x DELAY_MS), LOSS a probability (e.g. 0.001)
#   scripts/netns.sh down          remove both namespaces
#   scripts/netns.sh check         exit 0 if namespaces can be made here (root, iproute2, veth)
#
# Shaping uses tbf on both veth ends (this kernel has no netem: latency needs the userspace
# forwarder, not this script). Socket buffers inside the namespaces are raised for long links.
# Addresses are private to the two namespaces; nothing is routed anywhere else.
set -euo pipefail
SRC=lm-src DST=lm-dst
SRC_IP=10.77.0.1 DST_IP=10.77.0.2

need() { command -v "$1" >/dev/null || { echo "netns.sh: '$1' not found (apt-get install iproute2)" >&2; exit 2; }; }

shape() {
  local rate=$1
  for pair in "$SRC veth-lms" "$DST veth-lmd"; do
    set -- $pair
    ip netns exec "$1" tc qdisc del dev "$2" root 2>/dev/null || true
    if [ "$rate" != "none" ]; then
      # burst: enough for the rate at a 1 ms timer (at least 64 KiB); limit: ~50 ms of queue.
      ip netns exec "$1" tc qdisc add dev "$2" root tbf rate "$rate" burst 1mbit latency 50ms
    fi
  done
}

case "${1:-}" in
  check)
    need ip; need tc
    [ "$(id -u)" = 0 ] || { echo "netns.sh: needs root to create network namespaces" >&2; exit 2; }
    ip netns add lm-probe 2>/dev/null || { echo "netns.sh: cannot create network namespaces here" >&2; exit 2; }
    ip netns del lm-probe
    ;;
  up)
    need ip; need tc
    rate=${2:-none}
    "$0" down >/dev/null 2>&1 || true
    ip netns add $SRC
    ip netns add $DST
    ip link add veth-lms type veth peer name veth-lmd
    ip link set veth-lms netns $SRC
    ip link set veth-lmd netns $DST
    ip netns exec $SRC ip addr add $SRC_IP/24 dev veth-lms
    ip netns exec $DST ip addr add $DST_IP/24 dev veth-lmd
    # Long fat links (WAN runs) need more than the default 4 MiB socket buffers. The core
    # maxima are global on this kernel; the TCP autotuning ranges are per namespace.
    sysctl -q -w net.core.rmem_max=67108864 net.core.wmem_max=67108864 2>/dev/null || true
    for ns in $SRC $DST; do
      ip netns exec $ns ip link set lo up
      ip netns exec $ns sysctl -q -w net.ipv4.tcp_rmem="4096 131072 67108864" net.ipv4.tcp_wmem="4096 131072 67108864" 2>/dev/null || true
    done
    ip netns exec $SRC ip link set veth-lms up
    ip netns exec $DST ip link set veth-lmd up
    shape "$rate"
    echo "lm-src $SRC_IP <-> lm-dst $DST_IP, rate $rate"
    ;;
  rate)
    shape "${2:?rate}"
    ;;
  wan)
    rate=${2:?rate} delay=${3:?delay in ms} loss=${4:-0}
    "$0" up none >/dev/null
    here="$(cd "$(dirname "$0")/.." && pwd)"
    dll="$here/tools/LiveMig.WanLink/bin/Release/net10.0/LiveMig.WanLink.dll"
    [ -f "$dll" ] || dotnet build -c Release "$here/tools/LiveMig.WanLink" -v quiet -nologo >&2
    log=/tmp/lm-wanlink.log
    nohup dotnet "$dll" --delay-ms "$delay" --loss "$loss" > "$log" 2>&1 &
    echo $! > /tmp/lm-wanlink.pid
    for _ in $(seq 100); do grep -q ready "$log" 2>/dev/null && break; sleep 0.1; done
    grep -q ready "$log" || { echo "netns.sh: WAN forwarder did not start: $(cat "$log")" >&2; exit 1; }
    if [ "$rate" != "none" ]; then
      ip netns exec $SRC tc qdisc add dev lmwan-a root tbf rate "$rate" burst 1mbit latency 100ms
      ip netns exec $DST tc qdisc add dev lmwan-b root tbf rate "$rate" burst 1mbit latency 100ms
    fi
    echo "WAN: lm-src 10.78.0.1 <-> lm-dst 10.78.0.2, rate $rate, one-way delay ${delay} ms, loss $loss"
    ;;
  down)
    if [ -f /tmp/lm-wanlink.pid ]; then kill "$(cat /tmp/lm-wanlink.pid)" 2>/dev/null || true; rm -f /tmp/lm-wanlink.pid; fi
    ip netns del $SRC 2>/dev/null || true
    ip netns del $DST 2>/dev/null || true
    ;;
  *)
    sed -n '2,13p' "$0"; exit 2 ;;
esac

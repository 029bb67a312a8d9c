#!/usr/bin/env bash
# Undo scripts/net-bridge-up.sh: remove the NAT rules, restore IPv4 forwarding, delete
# the bridge.   sudo scripts/net-bridge-down.sh [BRIDGE]   (default: wispbr0)
set -euo pipefail

BR=${1:-wispbr0}
STATE=/run/wisp-bridge-$BR.state

die() { echo "net-bridge-down: error: $*" >&2; exit 1; }
[ "$(id -u)" -eq 0 ] || die "needs root: sudo $0 $*"

if [ -f "$STATE" ]; then
    nat=$(sed -n 's/^nat=\([a-z]*\).*/\1/p' "$STATE")
    subnet=$(sed -n 's/.*subnet=\([^ ]*\).*/\1/p' "$STATE")
    case "$nat" in
    nft) nft delete table ip "wisp-$BR" 2>/dev/null || true ;;
    iptables)
        iptables -t nat -D POSTROUTING -s "$subnet" ! -o "$BR" -j MASQUERADE 2>/dev/null || true
        iptables -D FORWARD -i "$BR" -j ACCEPT 2>/dev/null || true
        iptables -D FORWARD -o "$BR" -m state --state ESTABLISHED,RELATED -j ACCEPT 2>/dev/null || true
        ;;
    esac
    fwd=$(sed -n 's/^ip_forward=//p' "$STATE")
    [ -n "$fwd" ] && echo "$fwd" >/proc/sys/net/ipv4/ip_forward
    rm -f "$STATE"
fi
if ip link show "$BR" >/dev/null 2>&1; then
    ip link del "$BR"
    echo "net-bridge-down: bridge $BR removed"
else
    echo "net-bridge-down: no bridge $BR"
fi

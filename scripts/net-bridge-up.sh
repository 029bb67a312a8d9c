#!/usr/bin/env bash
# Create a host bridge for wisp's TAP/bridge networking, with NAT to the outside world.
#
#   sudo scripts/net-bridge-up.sh [BRIDGE [HOST_CIDR]]     (defaults: wispbr0 192.168.100.1/24)
#
# What it does (undo it with scripts/net-bridge-down.sh BRIDGE):
#   1. creates bridge BRIDGE with address HOST_CIDR and brings it up;
#   2. turns on IPv4 forwarding (the previous value is saved and restored on down);
#   3. masquerades traffic from the bridge's subnet leaving through other interfaces
#      (nftables table `ip wisp-BRIDGE`, or an iptables rule when nft is missing),
#      and accepts forwarding to and from the bridge.
# Then guests join it with `wisp run --net bridge=BRIDGE` and a static address, e.g.
#   --cmdline 'ip=192.168.100.2::192.168.100.1:255.255.255.0::eth0:off'
set -euo pipefail

BR=${1:-wispbr0}
CIDR=${2:-192.168.100.1/24}
STATE=/run/wisp-bridge-$BR.state

die() { echo "net-bridge-up: error: $*" >&2; exit 1; }
[ "$(id -u)" -eq 0 ] || die "needs root: sudo $0 $*"
command -v ip >/dev/null || die "ip not found: apt-get install iproute2"
[[ $CIDR =~ ^([0-9]+\.[0-9]+\.[0-9]+\.[0-9]+)/([0-9]+)$ ]] || die "HOST_CIDR must look like 192.168.100.1/24"
HOST_IP=${BASH_REMATCH[1]}
PREFIX=${BASH_REMATCH[2]}
# The subnet: the host address with the host bits cleared.
IFS=. read -r a b c d <<<"$HOST_IP"
ipnum=$(( (a << 24) | (b << 16) | (c << 8) | d ))
mask=$(( (0xffffffff << (32 - PREFIX)) & 0xffffffff ))
net=$(( ipnum & mask ))
SUBNET="$(( net >> 24 & 255 )).$(( net >> 16 & 255 )).$(( net >> 8 & 255 )).$(( net & 255 ))/$PREFIX"

if ip link show "$BR" >/dev/null 2>&1; then
    [ -d "/sys/class/net/$BR/bridge" ] || die "$BR exists and is not a bridge"
    echo "net-bridge-up: bridge $BR exists; making sure it is configured"
else
    ip link add "$BR" type bridge
fi
ip addr replace "$CIDR" dev "$BR"
ip link set "$BR" up

if [ ! -f "$STATE" ]; then
    echo "ip_forward=$(cat /proc/sys/net/ipv4/ip_forward)" >"$STATE"
fi
echo 1 >/proc/sys/net/ipv4/ip_forward

if command -v nft >/dev/null; then
    nft delete table ip "wisp-$BR" 2>/dev/null || true
    nft -f - <<NFT
table ip wisp-$BR {
    chain postrouting {
        type nat hook postrouting priority srcnat; policy accept;
        ip saddr $SUBNET oifname != "$BR" masquerade
    }
    chain forward {
        type filter hook forward priority filter; policy accept;
        iifname "$BR" accept
        oifname "$BR" ct state established,related accept
    }
}
NFT
    echo "nat=nft" >>"$STATE"
elif command -v iptables >/dev/null; then
    iptables -t nat -C POSTROUTING -s "$SUBNET" ! -o "$BR" -j MASQUERADE 2>/dev/null ||
        iptables -t nat -A POSTROUTING -s "$SUBNET" ! -o "$BR" -j MASQUERADE
    iptables -C FORWARD -i "$BR" -j ACCEPT 2>/dev/null || iptables -A FORWARD -i "$BR" -j ACCEPT
    iptables -C FORWARD -o "$BR" -m state --state ESTABLISHED,RELATED -j ACCEPT 2>/dev/null ||
        iptables -A FORWARD -o "$BR" -m state --state ESTABLISHED,RELATED -j ACCEPT
    echo "nat=iptables subnet=$SUBNET" >>"$STATE"
else
    echo "net-bridge-up: warning: neither nft nor iptables found (apt-get install nftables):" \
        "guests reach the host and each other, but not the outside world" >&2
fi

echo "net-bridge-up: bridge $BR is up at $CIDR (subnet $SUBNET, NAT to the outside)"
echo "  guest: wisp run --net bridge=$BR --cmdline 'ip=<addr>::$HOST_IP:<netmask>::eth0:off'"
echo "  undo:  sudo scripts/net-bridge-down.sh $BR"

#!/usr/bin/env bash
# A test network for Godwit guests, with iproute2 only (run as root):
#
#   scripts/testnet.sh up   [--netns NAME] [--bridge gwbr0] [--taps 1] [--addr 10.77.0.1/24]
#   scripts/testnet.sh down [--netns NAME] [--bridge gwbr0] [--taps 1]
#
# up (idempotent): creates the network namespace NAME if it does not exist (without
# --netns everything is made in the current namespace), a Linux bridge with the
# address, and N persistent TAPs `<bridge>t0`, `<bridge>t1`, ... (mode tap,
# vnet_hdr), attached to the bridge; everything up. A quiet wire: STP, multicast
# snooping and IPv6 are off on the bridge and TAPs (no IGMP/MLD reports, router
# solicitations), so a guest sees only the test's traffic. Prints the TAP names,
# one per line. Start the VMM inside the namespace (`ip netns exec NAME ...`) and
# give it a TAP name.
#
# down: removes every `<bridge>t<digits>` TAP (at least --taps of them), the
# bridge, and the namespace if `up` created it (a marker in /run/godwit-testnet).
# Missing pieces are not an error.
set -euo pipefail

usage() {
    echo "usage: $0 up|down [--netns NAME] [--bridge NAME] [--taps N] [--addr A.B.C.D/P]" >&2
    exit 64
}

[ $# -ge 1 ] || usage
action=$1
shift
netns=""
bridge=gwbr0
taps=1
addr=10.77.0.1/24
while [ $# -gt 0 ]; do
    case $1 in
        --netns) [ $# -ge 2 ] || usage; netns=$2; shift 2 ;;
        --bridge) [ $# -ge 2 ] || usage; bridge=$2; shift 2 ;;
        --taps) [ $# -ge 2 ] || usage; taps=$2; shift 2 ;;
        --addr) [ $# -ge 2 ] || usage; addr=$2; shift 2 ;;
        -h|--help) usage ;;
        *) echo "$0: unknown argument $1" >&2; usage ;;
    esac
done
case $action in up|down) ;; *) usage ;; esac
[[ $taps =~ ^[0-9]+$ ]] && [ "$taps" -le 100 ] || { echo "$0: --taps must be 0..100" >&2; exit 64; }
[[ $bridge =~ ^[A-Za-z0-9_-]+$ ]] || { echo "$0: bad bridge name '$bridge'" >&2; exit 64; }
# Interface names have at most 15 characters; TAPs add "t" and up to two digits.
[ ${#bridge} -le 12 ] || { echo "$0: bridge name '$bridge' is longer than 12 characters" >&2; exit 64; }
[ -z "$netns" ] || [[ $netns =~ ^[A-Za-z0-9_.-]+$ ]] || { echo "$0: bad namespace name '$netns'" >&2; exit 64; }
[ "$(id -u)" -eq 0 ] || { echo "$0: must run as root" >&2; exit 1; }

state=/run/godwit-testnet
ipn() {
    if [ -n "$netns" ]; then ip -n "$netns" "$@"; else ip "$@"; fi
}
have_netns() {
    ip netns list | grep -q -E "^${netns//./\\.}( |\$)"
}
have_link() {
    ipn link show dev "$1" >/dev/null 2>&1
}
no_ipv6() { # keeps IPv6 chatter (MLD reports, router solicitations) off the test wire
    ipn link set dev "$1" addrgenmode none 2>/dev/null || true
    local f="/proc/sys/net/ipv6/conf/$1/disable_ipv6"
    if [ -n "$netns" ]; then
        ip netns exec "$netns" sh -c "[ ! -w $f ] || echo 1 >$f" 2>/dev/null || true
    else
        [ ! -w "$f" ] || echo 1 >"$f" 2>/dev/null || true
    fi
}

if [ "$action" = up ]; then
    if [ -n "$netns" ] && ! have_netns; then
        ip netns add "$netns"
        mkdir -p "$state"
        : >"$state/$netns"
        # Our own namespace: IPv6 off for every device made in it from now on, so that not
        # even the first carrier-up sends an MLD report onto the test wire.
        ip netns exec "$netns" sh -c \
            "f=/proc/sys/net/ipv6/conf/default/disable_ipv6; [ ! -w \$f ] || echo 1 >\$f" 2>/dev/null || true
    fi
    [ -z "$netns" ] || ipn link set dev lo up
    if ! have_link "$bridge"; then
        ipn link add name "$bridge" type bridge stp_state 0 mcast_snooping 0
    fi
    # No multicast snooping: it would make the bridge join 224.0.0.106 / ff02::6a and send
    # an IGMP/MLD report onto the test wire when it first gets carrier.
    ipn link set dev "$bridge" type bridge mcast_snooping 0
    no_ipv6 "$bridge"
    ipn addr replace "$addr" dev "$bridge"
    ipn link set dev "$bridge" up
    for ((i = 0; i < taps; i++)); do
        tap="${bridge}t$i"
        if ! have_link "$tap"; then
            ipn tuntap add dev "$tap" mode tap vnet_hdr
        fi
        no_ipv6 "$tap"
        ipn link set dev "$tap" master "$bridge"
        ipn link set dev "$tap" up
        echo "$tap"
    done
    exit 0
fi

# down
if [ -n "$netns" ] && ! have_netns; then
    rm -f "$state/$netns"
    exit 0
fi
names=()
for ((i = 0; i < taps; i++)); do names+=("${bridge}t$i"); done
while read -r _ name _; do # "N: NAME: <...>" or "N: NAME@peer: <...>"
    name=${name%:}
    name=${name%@*}
    if [[ $name =~ ^${bridge}t[0-9]+$ ]] && [[ " ${names[*]} " != *" $name "* ]]; then
        names+=("$name")
    fi
done < <(ipn -o link show 2>/dev/null || true)
for tap in "${names[@]}"; do
    if have_link "$tap"; then
        ipn tuntap del dev "$tap" mode tap 2>/dev/null || ipn link del dev "$tap"
    fi
done
if have_link "$bridge"; then
    ipn link del dev "$bridge"
fi
if [ -n "$netns" ] && [ -e "$state/$netns" ]; then
    ip netns del "$netns"
    rm -f "$state/$netns"
fi
exit 0

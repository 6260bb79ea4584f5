#!/bin/sh
# Run the test guest under QEMU microvm (the reference VMM for guest/).
#   guest/run-qemu.sh DISK CPUS "APPEND"
# DISK: a raw image path, or "none". Comma-separate several (DISK1,DISK2).
# Environment: RO=1 (read-only disks), MEM=256 (MiB), CPU=host,-arch-capabilities,
# QEMU_EXTRA="..." (more QEMU arguments), GUEST=path/to/guest.elf,
# NET=TAP[,TAP2...] (a virtio-net NIC on each existing TAP, in this order; run inside the
# TAPs' network namespace, see scripts/testnet.sh), MAC=aa:bb:cc:dd:ee:ff[,MAC2...]
# (default: QEMU's 52:54:00:12:34:56 + NIC index), NET_OPTS=",mrg_rxbuf=off" (appended
# to every -device virtio-net-device).
# Exit status: 0 = guest passed (QEMU 33), 1 = guest failed (QEMU 35), 2 = other.
set -u
[ $# -eq 3 ] || { echo "usage: $0 DISK|none CPUS \"APPEND\"" >&2; exit 2; }
here=$(cd "$(dirname "$0")" && pwd)
guest=${GUEST:-$here/out/guest.elf}
cpu=${CPU:-host,-arch-capabilities}
ro=""
[ "${RO:-0}" = 1 ] && ro=",readonly=on"
drives=""
if [ "$1" != none ]; then
    i=0
    for d in $(echo "$1" | tr ',' ' '); do
        drives="$drives -drive id=d$i,file=$d,format=raw,if=none$ro -device virtio-blk-device,drive=d$i"
        i=$((i + 1))
    done
fi
nics=""
if [ -n "${NET:-}" ]; then
    i=0
    for t in $(echo "$NET" | tr ',' ' '); do
        mac=$(echo "${MAC:-}," | cut -d, -f$((i + 1)))
        [ -n "$mac" ] && mac=",mac=$mac"
        nics="$nics -netdev tap,id=n$i,ifname=$t,script=no,downscript=no,vhost=off -device virtio-net-device,netdev=n$i$mac${NET_OPTS:-}"
        i=$((i + 1))
    done
fi
# shellcheck disable=SC2086
qemu-system-x86_64 -M microvm,acpi=off -enable-kvm -cpu "$cpu" -m "${MEM:-256}" -smp "$2" \
    -nographic -nodefaults -no-user-config -serial stdio \
    -global virtio-mmio.force-legacy=false -device isa-debug-exit,iobase=0xf4,iosize=0x04 \
    $drives $nics ${QEMU_EXTRA:-} -kernel "$guest" -append "$3"
rc=$?
case $rc in
    33) exit 0 ;;
    35) exit 1 ;;
    *) echo "run-qemu.sh: qemu exited with status $rc" >&2; exit 2 ;;
esac

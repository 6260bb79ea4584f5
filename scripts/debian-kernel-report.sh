#!/usr/bin/env bash
# Boots Debian's stock kernel (the package linux-image-amd64 depends on; downloaded with
# `apt-get download`, never installed) under Godwit and reports how far it gets.
#
#   scripts/debian-kernel-report.sh [--timeout SECONDS] [--godwit PATH] [--cpus N] [--memory SIZE]
#                                   [--pvh] [--qemu-tcg] [--log-dir DIR]
#
# The stock kernel has virtio_mmio, virtio_blk and virtio_net as modules, so it gets its own
# initramfs: the project's (scripts/build-initramfs.sh: busybox-static and linux/init, unchanged)
# followed by a second cpio archive (the kernel unpacks concatenated archives in order) with the
# modules and their dependencies under /lib/modules/ and /load-modules, a small /bin/sh script that
# insmods them in dependency order and then execs the project's /init; `rdinit=/load-modules`
# on the command line starts it. The guest gets a 16 MiB scratch disk, so `disks=1` on the ready
# line shows virtio_mmio and virtio_blk working.
#
# --pvh boots the vmlinux extracted (on the host) from the same vmlinuz through its PVH entry
# instead of the bzImage: it skips the xz decompressor, which runs at emulation speed on kvm_pvm,
# and goes straight to the kernel's own boot.
#
# --qemu-tcg boots the same kernel, initramfs and disk under QEMU microvm with TCG (QEMU's software
# CPU, no KVM) instead of Godwit: a control showing that the kernel, the modules and the initramfs
# reach the ready line when nothing stops them (a few seconds).
#
# Everything downloaded or built is cached in ${GODWIT_CACHE:-/var/cache/godwit}/debian-kernel/.
# The console log and the VMM's stderr are kept in --log-dir (default: a new directory under /tmp).
# Exit status: 0 when the guest reached the ready line and powered off, 1 otherwise (the report
# says where it stopped), 2 for a set-up failure.
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
cache_root=${GODWIT_CACHE:-/var/cache/godwit}/debian-kernel
timeout=600
godwit=""
cpus=1
memory=256M
pvh=0
tcg=0
log_dir=""
log() { echo "debian-kernel-report: $*" >&2; }
die() { log "$*"; exit 2; }
while [ $# -gt 0 ]; do
  case $1 in
    --timeout) timeout=$2; shift 2 ;;
    --godwit) godwit=$2; shift 2 ;;
    --cpus) cpus=$2; shift 2 ;;
    --memory) memory=$2; shift 2 ;;
    --pvh) pvh=1; shift ;;
    --qemu-tcg) tcg=1; shift ;;
    --log-dir) log_dir=$2; shift 2 ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown option $1 (--help)" ;;
  esac
done
if [ -z "$godwit" ]; then
  for g in "$repo/.build/debug/godwit" "$repo/.build-static/release/godwit"; do [ -x "$g" ] && { godwit=$g; break; }; done
fi
[ "$tcg" = 1 ] || { [ -n "$godwit" ] && [ -x "$godwit" ]; } || die "no godwit binary (make build, or --godwit PATH)"
"$repo/scripts/install-deps.sh" kmod cpio xz-utils binutils busybox-static python3

# --- the package: whatever linux-image-amd64 depends on now
pkg=$(apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-/ { print $2; exit }')
if [ -z "$pkg" ]; then
  apt-get update -qq >&2
  pkg=$(apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-/ { print $2; exit }')
fi
[ -n "$pkg" ] || die "apt-cache finds no linux-image-* behind linux-image-amd64"
version=$(apt-cache policy "$pkg" | awk '/Candidate:/ { print $2 }')
dir="$cache_root/${pkg}_$version"
mkdir -p "$dir"
deb=$(ls "$dir"/*.deb 2>/dev/null | head -n1 || true)
if [ -z "$deb" ]; then
  log "downloading $pkg $version"
  # apt downloads as its sandbox user `_apt`: into a directory that user owns, then moved here.
  tmp=$(mktemp -d)
  chown _apt "$tmp" 2>/dev/null || true
  (cd "$tmp" && apt-get download -q "$pkg=$version" >&2) || { rm -rf "$tmp"; die "apt-get download $pkg failed"; }
  mv "$tmp"/*.deb "$dir"/ && rm -rf "$tmp"
  deb=$(ls "$dir"/*.deb | head -n1)
fi
if [ ! -d "$dir/root/boot" ]; then
  rm -rf "$dir/root" && dpkg-deb -x "$deb" "$dir/root.tmp" && mv "$dir/root.tmp" "$dir/root"
fi
vmlinuz=$(ls "$dir"/root/boot/vmlinuz-* | head -n1)
kver=${vmlinuz##*/vmlinuz-}
sysmap="$dir/root/boot/System.map-$kver"
moddir="$dir/root/lib/modules/$kver"

# --- the modules and their dependencies, in load order (dependencies first)
want=(virtio_mmio virtio_blk virtio_net)
declare -A path_of=() seen=()
while IFS= read -r f; do
  n=${f##*/}; n=${n%%.ko*}; path_of[${n//-/_}]=$f
done < <(find "$moddir/kernel" -name '*.ko*')
order=()
visit() {
  local m=${1//-/_} d deps
  [ -n "${seen[$m]:-}" ] && return 0
  seen[$m]=1
  [ -n "${path_of[$m]:-}" ] || die "module $m is not in $pkg"
  deps=$(modinfo -F depends "${path_of[$m]}")
  for d in ${deps//,/ }; do visit "$d"; done
  order+=("$m")
}
for m in "${want[@]}"; do visit "$m"; done
log "modules, in load order: ${order[*]}"

# --- the initramfs: the project's, then the modules and /load-modules
base=$("$repo/scripts/build-initramfs.sh" | tail -n1)
key=$( { echo "recipe=debian-kernel-initramfs-1"; sha256sum "$base"; echo "${order[*]}"; echo "$version"; } | sha256sum | cut -c1-16)
initrd="$dir/initramfs-$key.cpio"
if [ ! -f "$initrd" ]; then
  stage=$(mktemp -d)
  mkdir -p "$stage/lib/modules"
  for m in "${order[@]}"; do
    f=${path_of[$m]}
    case $f in
      *.ko.xz) xz -dc "$f" > "$stage/lib/modules/$m.ko" ;;
      *.ko.zst) zstd -qdc "$f" > "$stage/lib/modules/$m.ko" ;;
      *.ko.gz) gzip -dc "$f" > "$stage/lib/modules/$m.ko" ;;
      *) cp "$f" "$stage/lib/modules/$m.ko" ;;
    esac
  done
  {
    echo '#!/bin/sh'
    echo '# Loads the stock kernel'"'"'s virtio modules, then becomes the project'"'"'s /init (PID 1 stays).'
    echo '# `busybox insmod` needs no /proc (an applet run by name); /init mounts everything itself.'
    for m in "${order[@]}"; do
      echo "if /bin/busybox insmod /lib/modules/$m.ko; then echo \"load-modules: $m loaded\"; else echo \"load-modules: $m FAILED\"; fi"
    done
    echo 'exec /init'
  } > "$stage/load-modules"
  chmod 755 "$stage/load-modules"
  find "$stage" -exec touch -h -d @0 {} +
  (cd "$stage" && find . -mindepth 1 | LC_ALL=C sort | cpio -o -H newc -R 0:0 --reproducible --quiet) > "$stage.cpio"
  cat "$base" "$stage.cpio" > "$initrd.tmp" && mv "$initrd.tmp" "$initrd"
  rm -rf "$stage" "$stage.cpio"
fi

# --- the kernel to boot
kernel=$vmlinuz
boot="bzImage (64-bit boot protocol; the xz decompressor runs in the guest)"
if [ "$pvh" = 1 ]; then
  kernel="$dir/vmlinux-$kver"
  if [ ! -f "$kernel" ]; then
    # As the kernel's scripts/extract-vmlinux: the payload is the first xz stream in the file.
    off=$(grep -abo $'\xfd7zXZ\x00' "$vmlinuz" | head -n1 | cut -d: -f1)
    [ -n "$off" ] || die "no xz payload in $vmlinuz"
    tail -c +$((off + 1)) "$vmlinuz" | xz -dc --single-stream > "$kernel.tmp" 2>/dev/null || true
    readelf -h "$kernel.tmp" >/dev/null 2>&1 || die "the payload of $vmlinuz is not an ELF"
    mv "$kernel.tmp" "$kernel"
  fi
  readelf -n "$kernel" 2>/dev/null | grep -q "Xen.*0x00000012" || die "$kernel has no PVH (Xen PHYS32_ENTRY) note"
  boot="vmlinux extracted from the bzImage, through its PVH entry"
fi

# --- boot it
[ -n "$log_dir" ] || log_dir=$(mktemp -d /tmp/debian-kernel-report.XXXXXX)
mkdir -p "$log_dir"
console="$log_dir/console.log"; stderr="$log_dir/godwit.stderr"; disk="$log_dir/scratch.img"
rm -f "$console" "$stderr" "$disk"
truncate -s 16M "$disk"
cmdline="console=ttyS0 pci=off tsc=reliable no_timer_check i8042.noaux i8042.nomux i8042.dumbkbd reboot=k panic=-1"
cmdline+=" earlyprintk=serial,ttyS0,115200 nokaslr rdinit=/load-modules godwit.job=ready"
log "booting $pkg $version ($boot) under $([ "$tcg" = 1 ] && echo "QEMU TCG" || basename "$godwit"), $cpus vCPU(s), $memory, time limit ${timeout}s; logs in $log_dir"
start=$(date +%s.%N)
set +e
if [ "$tcg" = 1 ]; then
  vmm_name="QEMU microvm, TCG"
  timeout --signal=TERM --kill-after=15 "$timeout" qemu-system-x86_64 -M microvm -accel tcg -cpu max -smp "$cpus" -m "$memory" \
    -nographic -nodefaults -no-user-config -serial "file:$console" -device isa-debug-exit,iobase=0xf4,iosize=0x04 \
    -drive id=d0,file="$disk",format=raw,if=none -device virtio-blk-device,drive=d0 \
    -kernel "$kernel" -initrd "$initrd" -append "$cmdline" </dev/null >/dev/null 2>"$stderr" &
else
  vmm_name="Godwit ($godwit)"
  timeout --signal=TERM --kill-after=15 "$timeout" "$godwit" vm --kernel "$kernel" --initrd "$initrd" --cpus "$cpus" \
    --memory "$memory" --disk "$disk" --serial "$console" --cmdline "$cmdline" </dev/null >/dev/null 2>"$stderr" &
fi
vmm=$!
# Wall-clock seconds (5 s resolution) at which each milestone first showed on the console.
declare -A seen_at=()
milestones=("output:." "banner:Linux version" "init:Run /[a-z-]+ as init process" "ready:^@godwit job=ready")
while kill -0 "$vmm" 2>/dev/null; do
  sleep 5
  t=$(printf '%.0f' "$(echo "$(date +%s.%N) - $start" | bc)")
  for m in "${milestones[@]}"; do
    [ -z "${seen_at[${m%%:*}]:-}" ] && tr -d '\r' < "$console" 2>/dev/null | grep -qE "${m#*:}" && seen_at[${m%%:*}]=$t
  done
  last=$(tr -d '\r' < "$console" 2>/dev/null | grep -v '^$' | tail -n1 | cut -c1-100)
  printf 'debian-kernel-report: %4ss  %s\n' "$t" "$last" >&2
done
wait "$vmm"; status=$?
set -e
elapsed=$(echo "$(date +%s.%N) - $start" | bc)
for m in "${milestones[@]}"; do   # what showed after the last look
  [ -z "${seen_at[${m%%:*}]:-}" ] && tr -d '\r' < "$console" 2>/dev/null | grep -qE "${m#*:}" && seen_at[${m%%:*}]=$(printf '%.0f' "$elapsed")
done

# --- the report
clean=$(tr -d '\r' < "$console" 2>/dev/null || true)
has() { grep -qE "$1" <<<"$clean" && echo yes || echo no; }
at() {   # when milestone $1 showed: wall clock from the VMM's start, and the kernel's printk time
  local w=${seen_at[$1]:-} k
  k=$(grep -m1 -E "$2" <<<"$clean" | sed -n 's/^\[ *\([0-9.]*\)\].*/\1/p')
  [ -n "$w" ] && printf '(by %s s after the VMM started%s)' "$w" "${k:+; printk time $k s}"
}
if [ "$tcg" = 1 ]; then
  case $status in   # isa-debug-exit: QEMU exits (byte << 1) | 1
    33) status=0; meaning="the guest wrote its pass byte to 0xf4" ;;
    35) meaning="the guest wrote its fail byte to 0xf4" ;;
    124|137) meaning="still running at the time limit (${timeout}s): stopped" ;;
    *) meaning="QEMU exited with status $status" ;;
  esac
else case $status in
  0) meaning="the guest powered off with the pass status" ;;
  1) meaning="the guest powered off with another status" ;;
  2) meaning="set-up failure (see stderr)" ;;
  3) meaning="the guest rebooted (a panic reboots: panic=-1)" ;;
  4) meaning="triple fault" ;;
  5) meaning="KVM internal error (emulation failure: RIP and instruction bytes below)" ;;
  6) meaning="an exit the VMM does not handle" ;;
  7|124|137) meaning="still running at the time limit (${timeout}s): stopped" ;;
  *) meaning="?" ;;
esac; fi
echo "== Debian stock kernel under ${vmm_name%% (*}: $(date -u +%F), $(hostname), $(nproc) CPUs, host kernel $(uname -r)$([ -e /sys/module/kvm_pvm ] && echo ' (kvm_pvm)')"
echo "package:      $pkg $version ($kver)"
echo "boot:         $boot"
echo "VMM:          $vmm_name"
echo "modules:      ${order[*]}"
echo "command line: $cmdline$([ "$tcg" = 1 ] || echo " (+ what the VMM appends on PVM)")"
printf 'result:       exit status %s after %.0f s: %s\n' "$status" "$elapsed" "$meaning"
# Without CONFIG_X86_VERBOSE_BOOTUP (Debian's config) the decompressor prints only its warnings, such as
# "KASLR disabled: 'nokaslr' on cmdline."; everything before the kernel's banner is its output.
early=$(sed '/Linux version/,$d' <<<"$clean" | grep -v '^$' || true)
if [ "$pvh" = 1 ]; then echo "decompressor printed:  (no decompressor with --pvh)"
elif [ -n "$early" ]; then echo "decompressor printed:  yes $(at output .): $(tr '\n' ' ' <<<"$early" | cut -c1-120)"
else echo "decompressor printed:  no"; fi
echo "'Linux version':       $(has '^(\[ *[0-9.]*\] )?Linux version') $(at banner 'Linux version')"
echo "init ran:              $(has 'Run /[a-z-]+ as init process') $(at init 'Run /[a-z-]+ as init process')"
echo "modules loaded:        $(grep -c 'load-modules: .* loaded' <<<"$clean" || true) of ${#order[@]}$(grep -q 'FAILED' <<<"$clean" && echo " ($(grep 'load-modules: .* FAILED' <<<"$clean" | tr '\n' ' '))")"
echo "ready line:            $(grep -m1 '^@godwit job=ready' <<<"$clean" || echo no)"
failure=$(grep -E 'suberror|internal error|rip=' "$stderr" | tail -n1 || true)
if [ -n "$failure" ]; then
  echo "VMM stopped on:        $failure"
  rip=$(sed -n 's/.*rip=0x\([0-9a-f]*\).*/\1/p' <<<"$failure" | head -n1)
  bytes=$(sed -n 's/.*instruction ([0-9]* bytes): \([0-9a-f ]*\).*/\1/p' <<<"$failure" | head -n1)
  # Debian ships a stub System.map (the real one is in the -dbg package): look up only a real one.
  if [ -n "$rip" ] && [ -f "$sysmap" ] && [ "$(wc -l < "$sysmap")" -gt 1000 ]; then
    # nokaslr: the link-time addresses hold (PVH never randomises)
    sym=$(python3 - "$sysmap" "$rip" <<'EOF'
import sys
rip = int(sys.argv[2], 16)
best = None
for line in open(sys.argv[1]):
    a, t, name = line.split()[:3]
    a = int(a, 16)
    if t in "tTwW" and a <= rip and (best is None or a > best[0]):
        best = (a, name)
print(f"{best[1]}+0x{rip - best[0]:x}" if best and rip - best[0] < 0x100000 else "?")
EOF
)
    echo "  rip 0x$rip is in:    $sym (System.map-$kver)"
  fi
  if [ -n "$bytes" ]; then
    printf '%s' "$bytes" | xxd -r -p > "$log_dir/insn.bin" 2>/dev/null || python3 -c "import sys; open(sys.argv[1],'wb').write(bytes.fromhex(sys.argv[2]))" "$log_dir/insn.bin" "$bytes"
    echo "  instruction bytes:   $bytes"
    echo "  decoded:             $(objdump -D -b binary -m i386:x86-64 "$log_dir/insn.bin" | awk -F'\t' '/^ +0:/ { print $3; exit }')"
    # The blockers the project's own kernel avoids (README, "Linux guests"), by their bytes.
    case "$bytes " in
      "cc 90 90 90 90 "*) hint="int3_selftest() (int3; nop x4; then BUG_ON(val != 1)): the project's patch 0001 skips it; no command-line option does" ;;
      "cc "*) hint="int3: kvm_pvm's emulator cannot deliver it (patch 0001 in the project's kernel)" ;;
      "0f 05 "*) hint="syscall left at CPL 3 (patch 0002)" ;;
      "9b "*) hint="fwait (patch 0003)" ;;
      *"0f ae 2f "*|*"0f ae 6f "*) hint="xrstor (noxsave)" ;;
      "f0 48 0f c7 "*|"f0 49 0f c7 "*) hint="lock cmpxchg16b (clearcpuid=cx16)" ;;
      "0f 01 ca "*) hint="clac (clearcpuid=smap)" ;;
      "f3 "*"0f b8 "*) hint="popcnt (clearcpuid=popcnt)" ;;
      *) hint="" ;;
    esac
    [ -z "$hint" ] || echo "  known blocker:       $hint"
  fi
fi
echo "VMM stderr (last 5 lines):"
tail -n5 "$stderr" | sed 's/^/  /'
echo "console (last 20 lines):"
grep -v '^$' <<<"$clean" | tail -n20 | sed 's/^/  /'
[ "$status" = 0 ] && grep -q '^@godwit job=ready' <<<"$clean"

#!/usr/bin/env bash
# Builds the Godwit guest kernel from Debian's linux-source-6.1 with linux/config and
# linux/patches/*.patch, and caches it outside the repository:
#   ${GODWIT_CACHE:-/var/cache/godwit}/linux/<key>/vmlinux   (ELF with the PVH note)
#   ${GODWIT_CACHE:-/var/cache/godwit}/linux/<key>/bzImage   (same objects, boot protocol)
#   ... plus config and System.map next to them.
# key = sha256 over the linux-source-6.1 package version, linux/config and the patches.
# If the cached vmlinux exists, nothing is built. The last stdout line is the vmlinux path.
#
# Environment: GODWIT_CACHE (cache root), GODWIT_BUILD_DIR (where the source is unpacked
# and compiled; default /var/tmp/godwit-build), JOBS (make -j, default 2).
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
cache_root=${GODWIT_CACHE:-/var/cache/godwit}
build_root=${GODWIT_BUILD_DIR:-/var/tmp/godwit-build}
jobs=${JOBS:-2}
config_fragment="$repo/linux/config"
log() { echo "build-linux: $*" >&2; }

# --- packages (apt-get only for what is missing)
packages=(linux-source-6.1 build-essential bc bison flex libelf-dev libssl-dev cpio xz-utils patch python3)
"$(dirname "$0")/install-deps.sh" "${packages[@]}"
src_version=$(dpkg-query -W -f='${Version}' linux-source-6.1)
tarball=/usr/src/linux-source-6.1.tar.xz
[ -f "$tarball" ] || { log "missing $tarball"; exit 1; }

# --- cache key
shopt -s nullglob
patches=("$repo"/linux/patches/*.patch)
shopt -u nullglob
key=$(
  {
    echo "recipe=godwit-linux-1 allnoconfig+fragment"
    echo "linux-source-6.1=$src_version"
    echo "== config"; cat "$config_fragment"
    for p in "${patches[@]}"; do echo "== patch $(basename "$p")"; cat "$p"; done
  } | sha256sum | cut -c1-64)
out="$cache_root/linux/$key"
if [ -f "$out/vmlinux" ]; then
  log "cached"
  echo "$out/vmlinux"
  exit 0
fi

# --- source tree: one per package version, reused across config and patch changes (make
# rebuilds only what changed).  The originals of the files the patches touch are kept in
# .orig/ so that another patch set starts from the pristine source.
patch_hash=$( { for p in "${patches[@]}"; do basename "$p"; cat "$p"; done; } | sha256sum | cut -c1-64)
tree="$build_root/linux-${src_version}"
src="$tree/linux-source-6.1"
if [ ! -f "$tree/.unpacked" ]; then
  log "unpacking $tarball into $tree"
  rm -rf "$tree"; mkdir -p "$tree"
  nice -n 19 tar -C "$tree" -xJf "$tarball"
  touch "$tree/.unpacked"
fi
if [ "$(cat "$tree/.patches" 2>/dev/null)" != "$patch_hash" ]; then
  rm -f "$tree/.patches"
  if [ -d "$tree/.orig" ]; then
    log "restoring the files the previous patches touched"
    (cd "$tree/.orig" && find . -type f) | while IFS= read -r f; do cp "$tree/.orig/$f" "$src/$f"; done
  fi
  if [ -f "$tree/.created" ]; then
    while IFS= read -r f; do rm -f "$src/$f"; done < "$tree/.created"
  fi
  rm -rf "$tree/.orig" "$tree/.created"
  for p in "${patches[@]}"; do
    sed -n 's|^+++ b/\([^[:space:]]*\).*|\1|p' "$p" | while IFS= read -r f; do
      if [ -e "$src/$f" ]; then
        [ -e "$tree/.orig/$f" ] || { mkdir -p "$(dirname "$tree/.orig/$f")"; cp -p "$src/$f" "$tree/.orig/$f"; }
      else
        echo "$f" >> "$tree/.created"
      fi
    done
  done
  for p in "${patches[@]}"; do
    log "applying $(basename "$p")"
    patch -d "$src" -p1 --forward --no-backup-if-mismatch < "$p" >&2
  done
  echo "$patch_hash" > "$tree/.patches"
fi

# --- configuration: allnoconfig + fragment, then olddefconfig
cd "$src"
log "configuring (allnoconfig + linux/config)"
cp "$config_fragment" "$tree/godwit.fragment"
# merge_config.sh -n: KCONFIG_ALLCONFIG=fragment allnoconfig, and warns about any value
# the fragment asks for that did not make it.
ARCH=x86_64 scripts/kconfig/merge_config.sh -n "$tree/godwit.fragment" >"$tree/merge_config.log" 2>&1 \
  || { cat "$tree/merge_config.log" >&2; exit 1; }
grep -A3 "Value requested\|not in final" "$tree/merge_config.log" >&2 || true
make ARCH=x86_64 olddefconfig >&2
# every `=y` of the fragment must be in the final .config
bad=0
while IFS= read -r line; do
  sym=${line%%=*}
  grep -qx "$line" .config || { log "config: $line requested, got: $(grep -E "^$sym=|^# $sym is not set" .config || echo absent)"; bad=1; }
done < <(grep -E '^CONFIG_[A-Z0-9_]+=y$' "$config_fragment")
# and every `is not set` that ended up on is reported (some are not user-visible; not fatal)
while IFS= read -r sym; do
  if grep -qE "^$sym=[ym]" .config; then log "config: note: $sym requested off but is on"; fi
done < <(sed -nE 's/^# (CONFIG_[A-Z0-9_]+) is not set$/\1/p' "$config_fragment")
# the integer values too
while IFS= read -r line; do
  grep -qx "$line" .config || { log "config: $line requested, got: $(grep -E "^${line%%=*}=" .config || echo absent)"; bad=1; }
done < <(grep -E '^CONFIG_[A-Z0-9_]+=[0-9]+$' "$config_fragment")
[ "$bad" -eq 0 ] || { log "configuration check failed"; exit 1; }

# --- build
start=$(date +%s)
log "building vmlinux (make -j$jobs, nice 19)"
nice -n 19 make ARCH=x86_64 -j"$jobs" vmlinux >&2
log "building bzImage"
nice -n 19 make ARCH=x86_64 -j"$jobs" bzImage >&2
log "built in $(( $(date +%s) - start )) s"

# the PVH entry note must be there
if ! readelf -n vmlinux | grep -q "Xen.*0x00000012\|PHYS32_ENTRY\|Unknown note type: (0x00000012)"; then
  log "vmlinux has no Xen PVH (PHYS32_ENTRY) note"; exit 1
fi

# --- cache (atomic: a finished directory is renamed into place)
mkdir -p "$cache_root/linux"
tmp=$(mktemp -d "$cache_root/linux/.tmp.XXXXXX")
cp vmlinux "$tmp/vmlinux"
cp arch/x86/boot/bzImage "$tmp/bzImage"
cp .config "$tmp/config"
cp System.map "$tmp/System.map"
echo "linux-source-6.1 $src_version" > "$tmp/VERSION"
chmod 755 "$tmp"
rm -rf "$out"
mv "$tmp" "$out"
log "cached in $out"
echo "$out/vmlinux"

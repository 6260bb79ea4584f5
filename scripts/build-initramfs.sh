#!/usr/bin/env bash
# Builds the Godwit guest initramfs: an UNCOMPRESSED newc cpio with Debian's busybox-static
# (/bin/busybox, /bin/sh; the other applets run through the shell without links),
# /dev/console, and linux/init as /init.  Cached outside the repository:
#   ${GODWIT_CACHE:-/var/cache/godwit}/initramfs/<key>/initramfs.cpio
# key = sha256 over the busybox-static package version and linux/init.  If the cached
# file exists nothing is built.  The last stdout line is the path of the cpio.
# The archive is reproducible: fixed owner (0:0) and mtime (0), sorted entries.
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
cache_root=${GODWIT_CACHE:-/var/cache/godwit}
init="$repo/linux/init"
log() { echo "build-initramfs: $*" >&2; }

"$(dirname "$0")/install-deps.sh" busybox-static python3
bb_version=$(dpkg-query -W -f='${Version}' busybox-static)
busybox=/bin/busybox
file -L "$busybox" 2>/dev/null | grep -q "statically linked" || [ -x "$busybox" ] || { log "no $busybox"; exit 1; }

key=$( { echo "recipe=godwit-initramfs-2"; echo "busybox-static=$bb_version"; echo "== init"; cat "$init"; } | sha256sum | cut -c1-64)
out="$cache_root/initramfs/$key"
if [ -f "$out/initramfs.cpio" ]; then
  log "cached"
  echo "$out/initramfs.cpio"
  exit 0
fi

mkdir -p "$cache_root/initramfs"
tmp=$(mktemp -d "$cache_root/initramfs/.tmp.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
# the standalone shell (applets without links) is what /init relies on
env -i PATH=/nonexistent "$busybox" sh -c 'ls / >/dev/null' || { log "$busybox cannot run applets without links"; exit 1; }

python3 - "$busybox" "$init" "$tmp/initramfs.cpio" <<'EOF'
# A newc ("070701") cpio writer: directories, files, symlinks and device nodes without
# needing root or a staging directory.
import os, stat, sys

busybox, init, out = sys.argv[1:4]
entries = {}   # path -> (mode, data, rdev)

def add_dir(path):
    parts = path.split("/")
    for i in range(1, len(parts) + 1):
        p = "/".join(parts[:i])
        entries.setdefault(p, (stat.S_IFDIR | 0o755, b"", (0, 0)))

def add(path, mode, data=b"", rdev=(0, 0)):
    if "/" in path:
        add_dir(path.rsplit("/", 1)[0])
    entries[path] = (mode, data, rdev)

for d in ["bin", "dev", "proc", "sys", "tmp", "root", "etc"]:
    add_dir(d)
add("dev/console", stat.S_IFCHR | 0o600, rdev=(5, 1))
add("dev/null", stat.S_IFCHR | 0o666, rdev=(1, 3))
add("dev/ttyS0", stat.S_IFCHR | 0o600, rdev=(4, 64))
add("bin/busybox", stat.S_IFREG | 0o755, open(busybox, "rb").read())
# Only /bin/sh (for "#!/bin/sh"): Debian's busybox-static runs its applets from the shell
# without links (FEATURE_SH_STANDALONE), and every archive entry costs the kernel a path
# walk and an inode at unpacking, emulated on kvm_pvm (400 applet links: ~8 s).
add("bin/sh", stat.S_IFLNK | 0o777, b"busybox")
add("init", stat.S_IFREG | 0o755, open(init, "rb").read())
add("etc/passwd", stat.S_IFREG | 0o644, b"root:x:0:0:root:/root:/bin/sh\n")
add("etc/group", stat.S_IFREG | 0o644, b"root:x:0:\n")

def pad(n):
    return b"\0" * ((4 - n % 4) % 4)

with open(out, "wb") as f:
    ino = 1
    def entry(name, mode, data, rdev, nlink):
        global ino
        nb = name.encode() + b"\0"
        hdr = "070701" + "".join("%08x" % v for v in (
            ino, mode, 0, 0, nlink, 0, len(data), 0, 0, rdev[0], rdev[1], len(nb), 0))
        f.write(hdr.encode() + nb + pad(110 + len(nb)) + data + pad(len(data)))
        ino += 1
    for path in sorted(entries):
        mode, data, rdev = entries[path]
        entry(path, mode, data, rdev, 2 if stat.S_ISDIR(mode) else 1)
    entry("TRAILER!!!", 0, b"", (0, 0), 1)
    f.write(b"\0" * ((512 - f.tell() % 512) % 512))
EOF

# sanity: the archive lists, /init is there and executable
cpio -it < "$tmp/initramfs.cpio" 2>/dev/null | grep -qx init || { log "bad archive"; exit 1; }
echo "busybox-static $bb_version" > "$tmp/VERSION"
chmod 755 "$tmp"
rm -rf "$out"
mv "$tmp" "$out"
trap - EXIT
log "built $out/initramfs.cpio ($(stat -c %s "$out/initramfs.cpio") bytes)"
echo "$out/initramfs.cpio"

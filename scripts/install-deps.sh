#!/usr/bin/env bash
# Installs the Debian packages Godwit needs (idempotent; runs apt-get only for what is missing).
#   scripts/install-deps.sh              everything the build and the tests need
#   scripts/install-deps.sh PACKAGE...   only these (the Linux guest's build scripts use it)
# Progress goes to stderr: callers print their results on stdout.
set -euo pipefail
packages=(gcc make binutils qemu-system-x86 qemu-utils procps iproute2 iputils-ping python3 curl libseccomp-dev fio libssl-dev libnbd-dev libnbd-bin nbdkit nbd-server fuse3 etcd-server etcd-client)
only=$#
[ $# -eq 0 ] || packages=("$@")
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing: ${missing[*]}" >&2
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi
[ "$only" -eq 0 ] || exit 0

# schemathesis (PyPI) runs the property-based API test against api/openapi.yaml.
if ! python3 -c "import schemathesis" 2>/dev/null; then
  echo "installing: schemathesis (pip)" >&2
  python3 -m pip install -q "schemathesis==4.32.5" 2>&1 | grep -v "Running pip as the 'root' user" || true
fi

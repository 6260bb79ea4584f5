#!/usr/bin/env bash
# Installs the Debian packages Godwit needs (idempotent; runs apt-get only for what is missing).
set -euo pipefail
packages=(gcc make binutils qemu-system-x86 qemu-utils procps iproute2 iputils-ping python3 curl libseccomp-dev fio libssl-dev libnbd-dev libnbd-bin nbdkit nbd-server fuse3 etcd-server etcd-client)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing: ${missing[*]}"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# schemathesis (PyPI) runs the property-based API test against api/openapi.yaml.
if ! python3 -c "import schemathesis" 2>/dev/null; then
  echo "installing: schemathesis (pip)"
  python3 -m pip install -q "schemathesis==4.32.5" 2>&1 | grep -v "Running pip as the 'root' user" || true
fi

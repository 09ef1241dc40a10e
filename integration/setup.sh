#!/usr/bin/env bash
# Install, on a fresh Debian 12 machine as root, every package the test suites need.
# Idempotent and quick when everything is present.
set -euo pipefail
pkgs=(iproute2 iptables nftables iputils-ping socat tcpdump
      charon-systemd strongswan-swanctl libcharon-extra-plugins libstrongswan-standard-plugins
      qemu-system-x86 busybox-static kmod cpio containernetworking-plugins prometheus
      etcd-server etcd-client openssl podman crun conmon)
missing=()
for p in "${pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
    echo "installing: ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
echo "test dependencies present"

#!/usr/bin/env bash
# Installs the Debian packages FireRunner's build, tests and demo need, if
# missing (as root). Used by `make deps` (and so `make demo`/`make test`) and CI.
set -euo pipefail
# prometheus provides promtool, which checks packaging/prometheus's alert rules.
# postgresql: the tests of the PostgreSQL store and make test-fleet start a
# throwaway cluster of their own (the service the package enables is not used).
# docker-registry (the CNCF distribution registry) and skopeo run the Docker
# tests' local registries and mirror (no Docker daemon on the host: the
# tests' docker client is unpacked from docker.io's .deb, not installed).
pkgs=(qemu-system-x86 qemu-utils debootstrap busybox-static cpio e2fsprogs xz-utils zstd kmod
      nftables iptables iproute2 git ca-certificates make gcc python3 jq prometheus postgresql
      docker-registry skopeo)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'ok installed' || missing+=("$p")
done
# The image builder resolves the kernel package with apt-cache: it needs lists.
if [ "$(id -u)" = 0 ] && ! compgen -G '/var/lib/apt/lists/*_Packages*' >/dev/null; then
  echo "host packages: no apt lists yet, running apt-get update"
  apt-get update -qq
fi
if [ ${#missing[@]} -eq 0 ]; then
  echo "host packages: all present"
  exit 0
fi
if [ "$(id -u)" != 0 ]; then
  echo "missing packages: ${missing[*]} (run as root, or: apt-get install ${missing[*]})" >&2
  exit 1
fi
echo "host packages: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
echo "host packages: installed"

#!/usr/bin/env bash
# Installs what building and running kxdp needs on Debian, when it is missing. Run as root.
set -euo pipefail
pkgs=(clang llvm libelf-dev zlib1g-dev m4 pkg-config libpcap-dev iproute2 ethtool iptables nftables
      iputils-ping curl tcpdump make gcc)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "setup: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${missing[@]}" >/dev/null
fi
if ! command -v cargo >/dev/null 2>&1; then
  for d in "$HOME/.cargo/bin" /usr/local/cargo/bin; do
    [ -x "$d/cargo" ] && export PATH="$d:$PATH"
  done
fi
if ! command -v cargo >/dev/null 2>&1; then
  echo "setup: cargo not found; install Rust 1.85 or newer (rustup) and run again" >&2
  exit 1
fi
# Network-namespace tests and the demo need these modules; ignore failures where they are built in.
modprobe veth 2>/dev/null || true
modprobe tun 2>/dev/null || true

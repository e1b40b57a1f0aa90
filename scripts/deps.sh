#!/usr/bin/env bash
# Installs what vxnet's build, tests and lab need on Debian/Ubuntu, when missing.
# Package scripts must not start services (no system etcd, dockerd or containerd): a
# policy-rc.d that exits 101 is in place during the install and removed afterwards.
set -euo pipefail

if [ "$(id -u)" -ne 0 ]; then
  echo "vxnet: this needs root (network namespaces, apt): run it with sudo -E env PATH=\"\$PATH\" $0" >&2
  exit 1
fi

need=()
command -v etcd >/dev/null || need+=(etcd-server)
command -v etcdctl >/dev/null || need+=(etcd-client)
command -v protoc >/dev/null || need+=(protobuf-compiler)
[ -f /usr/include/google/protobuf/descriptor.proto ] || need+=(libprotobuf-dev)
command -v ip >/dev/null || need+=(iproute2)
# The data-plane tests ping across the overlay.
command -v ping >/dev/null || need+=(iputils-ping)
command -v nsenter >/dev/null || need+=(util-linux)
command -v cc >/dev/null || need+=(gcc libc6-dev)
# The firewall module links libnftnl and libmnl (found with pkg-config); its tests read the
# table back with nft.
command -v pkg-config >/dev/null || need+=(pkg-config)
[ -f /usr/include/libnftnl/table.h ] || need+=(libnftnl-dev)
[ -f /usr/include/libmnl/libmnl.h ] || need+=(libmnl-dev)
command -v nft >/dev/null || need+=(nftables)
command -v sysctl >/dev/null || need+=(procps)
# The store-security tests make their certificates with the openssl command.
command -v openssl >/dev/null || need+=(openssl)
# `vxnet lab docker`: a Docker engine (20.10, with the legacy --cluster-store mode) inside lab
# hosts, and a static busybox for its test image. dockerd looks for iptables at start.
command -v dockerd >/dev/null || need+=(docker.io)
command -v iptables >/dev/null || need+=(iptables)
# (Debian's plain busybox package is dynamically linked: no use in an image without a libc.)
dpkg-query -W -f='${Status}' busybox-static 2>/dev/null | grep -q 'ok installed' || need+=(busybox-static)
# The CNI clients vxnet's CNI plugin is tested against, inside lab hosts (src/lab/cni.rs):
# containerd 1.6 (ctr, its runc shim), Podman 4.3 with conmon and runc (crun, its default,
# fails on cgroup v1 hybrid), Podman's seccomp profile, and the reference CNI plugins in
# /usr/lib/cni.
command -v containerd >/dev/null || need+=(containerd)
{ [ -x /usr/sbin/runc ] || command -v runc >/dev/null; } || need+=(runc)
command -v podman >/dev/null || need+=(podman)
command -v conmon >/dev/null || need+=(conmon)
[ -f /usr/share/containers/seccomp.json ] || need+=(golang-github-containers-common)
{ [ -x /usr/lib/cni/bridge ] && [ -x /usr/lib/cni/host-local ]; } || need+=(containernetworking-plugins)
# The data-plane benchmark: TCP throughput with iperf3 inside lab namespaces, and the offload
# state of the interfaces it measures (read only, never changed).
command -v iperf3 >/dev/null || need+=(iperf3)
command -v ethtool >/dev/null || need+=(ethtool)
# The DNS benchmark's second anchor: Podman's name server.
[ -x /usr/lib/podman/aardvark-dns ] || need+=(aardvark-dns)
# The metrics test parses a scrape with an independent OpenMetrics parser (the system python's).
/usr/bin/python3 -c 'import prometheus_client' 2>/dev/null || need+=(python3-prometheus-client)
# The Debian package (scripts/package, tests/package): cargo-deb reads the libraries' package
# names with dpkg-shlibdeps, and the test checks the unit with systemd-analyze verify.
command -v dpkg-shlibdeps >/dev/null || need+=(dpkg-dev)
command -v systemd-analyze >/dev/null || need+=(systemd)
# bench/run draws its charts with the system python's matplotlib (VXNET_DEPS_CHARTS=1).
if [ "${VXNET_DEPS_CHARTS:-0}" = 1 ] && ! /usr/bin/python3 -c 'import matplotlib' 2>/dev/null; then
  need+=(python3-matplotlib)
fi

if [ ${#need[@]} -gt 0 ]; then
  echo "vxnet: installing ${need[*]}" >&2
  policy=/usr/sbin/policy-rc.d
  made_policy=0
  if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy"
    chmod +x "$policy"
    made_policy=1
  fi
  cleanup() { if [ "$made_policy" = 1 ]; then rm -f "$policy"; fi; }
  trap cleanup EXIT
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

if ! command -v cargo >/dev/null; then
  echo "vxnet: cargo not found: install Rust 1.85 or newer (https://rustup.rs), then run this again" >&2
  exit 1
fi

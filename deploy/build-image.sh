#!/usr/bin/env bash
# Builds the agent's container image from deploy/agent.Containerfile without a registry:
# assembles a root filesystem (the binary, the shared libraries ldd names, CA certificates,
# /var/lib/fleet-agent, /tmp) and builds FROM scratch with podman (or docker via ENGINE=).
#
# Usage: deploy/build-image.sh PATH/TO/fleet-agent [TAG]
set -euo pipefail

bin=${1:?usage: deploy/build-image.sh PATH/TO/fleet-agent [TAG]}
tag=${2:-localhost/fleet/agent:latest}
engine=${ENGINE:-podman}
here=$(cd "$(dirname "$0")" && pwd)

root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT

install -D -m 0755 "$bin" "$root/usr/local/bin/fleet-agent"
# The dynamic loader and every library the binary links, at the same paths as on the host.
ldd "$bin" | grep -o '/[^ ]*' | sort -u | while read -r lib; do
  # 0755: the dynamic loader among them is executed.
  install -D -m 0755 "$lib" "$root$lib"
done
if [ -f /etc/ssl/certs/ca-certificates.crt ]; then
  install -D -m 0644 /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/certs/ca-certificates.crt"
fi
chmod 0755 "$root"
mkdir -p "$root/var/lib/fleet-agent" "$root/tmp"
chmod 1777 "$root/tmp"

"$engine" build -q -f "$here/agent.Containerfile" -t "$tag" "$root"

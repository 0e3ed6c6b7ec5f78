#!/usr/bin/env bash
# Fetches the Debian cloud kernel (linux-image-cloud-amd64) through apt and puts its bzImage at
# target/linux/vmlinuz (for `vmm run --kernel` and the Linux boot integration tests).
#
# Only apt downloads anything: `apt-get download` of the metapackage and of the versioned
# linux-image-*-cloud-amd64 package it depends on; `dpkg -x` unpacks it (nothing is installed).
# Idempotent: does nothing when target/linux/vmlinuz already exists.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="$root/target/linux"
meta="linux-image-cloud-amd64"

if [[ -f "$out/vmlinuz" ]]; then
    echo "fetch-linux-kernel: $out/vmlinuz already exists; nothing to do"
    exit 0
fi

for tool in apt-get apt-cache dpkg; do
    command -v "$tool" >/dev/null || { echo "fetch-linux-kernel: $tool not found (Debian/Ubuntu host needed)" >&2; exit 1; }
done

# The versioned image package the metapackage's candidate version depends on.
image_pkg() {
    apt-cache depends "$meta" 2>/dev/null \
        | sed -n 's/^ *|\{0,1\}Depends: \(linux-image-[^ ]*-cloud-amd64\)$/\1/p' \
        | head -n 1
}

pkg="$(image_pkg || true)"
if [[ -z "$pkg" ]]; then
    echo "fetch-linux-kernel: apt does not know $meta yet; running apt-get update"
    apt-get update
    pkg="$(image_pkg)"
fi
if [[ -z "$pkg" ]]; then
    echo "fetch-linux-kernel: cannot find the image package $meta depends on" >&2
    exit 1
fi
echo "fetch-linux-kernel: $meta depends on $pkg"

debs="$out/deb"
rm -rf "$debs" "$out/pkg"
mkdir -p "$debs" "$out/pkg"
download() {
    (cd "$debs" && apt-get download "$meta" "$pkg")
}
if ! download; then
    echo "fetch-linux-kernel: download failed; running apt-get update and retrying"
    apt-get update
    download
fi

deb="$(ls "$debs"/"${pkg}"_*.deb | head -n 1)"
echo "fetch-linux-kernel: downloaded $(basename "$deb")"
dpkg -x "$deb" "$out/pkg"
echo "fetch-linux-kernel: unpacked into $out/pkg"

vmlinuz="$(ls "$out"/pkg/boot/vmlinuz-* | head -n 1)"
cp "$vmlinuz" "$out/vmlinuz.tmp"
mv "$out/vmlinuz.tmp" "$out/vmlinuz"
echo "fetch-linux-kernel: $vmlinuz -> $out/vmlinuz ($(stat -c %s "$out/vmlinuz") bytes)"

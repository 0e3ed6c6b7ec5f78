#!/usr/bin/env bash
# Fetches the Debian cloud kernel (linux-image-cloud-amd64) through apt and puts its bzImage at
# target/linux/vmlinuz and the uncompressed ELF kernel inside it at target/linux/vmlinux (for
# `vmm run --kernel` and the Linux boot integration tests).
#
# Only apt downloads anything: `apt-get download` of the metapackage and of the versioned
# linux-image-*-cloud-amd64 package it depends on; `dpkg -x` unpacks it (nothing is installed).
# The vmlinux comes out of the bzImage's payload, which Debian compresses with LZ4 (legacy
# frame, magic 02 21 4c 18): decompressed with the `lz4` tool, installed with apt-get when
# missing (Python's standard library has no LZ4).
# Idempotent: skips the download when target/linux/vmlinuz exists and the extraction when
# target/linux/vmlinux is already a complete ELF file.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="$root/target/linux"
meta="linux-image-cloud-amd64"

# The versioned image package the metapackage's candidate version depends on.
image_pkg() {
    apt-cache depends "$meta" 2>/dev/null \
        | sed -n 's/^ *|\{0,1\}Depends: \(linux-image-[^ ]*-cloud-amd64\)$/\1/p' \
        | head -n 1
}

fetch_vmlinuz() {
    for tool in apt-get apt-cache dpkg; do
        command -v "$tool" >/dev/null || { echo "fetch-linux-kernel: $tool not found (Debian/Ubuntu host needed)" >&2; exit 1; }
    done

    local pkg
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

    local debs="$out/deb"
    rm -rf "$debs" "$out/pkg"
    mkdir -p "$debs" "$out/pkg"
    if ! (cd "$debs" && apt-get download "$meta" "$pkg"); then
        echo "fetch-linux-kernel: download failed; running apt-get update and retrying"
        apt-get update
        (cd "$debs" && apt-get download "$meta" "$pkg")
    fi

    local deb
    deb="$(ls "$debs"/"${pkg}"_*.deb | head -n 1)"
    echo "fetch-linux-kernel: downloaded $(basename "$deb")"
    dpkg -x "$deb" "$out/pkg"
    echo "fetch-linux-kernel: unpacked into $out/pkg"

    local vmlinuz
    vmlinuz="$(ls "$out"/pkg/boot/vmlinuz-* | head -n 1)"
    cp "$vmlinuz" "$out/vmlinuz.tmp"
    mv "$out/vmlinuz.tmp" "$out/vmlinuz"
    echo "fetch-linux-kernel: $vmlinuz -> $out/vmlinuz ($(stat -c %s "$out/vmlinuz") bytes)"
}

# Whether $1 is a complete 64-bit ELF file: the magic, and the section header table (which the
# linker puts at the end) lies inside the file.
elf_complete() {
    local f="$1" shoff shentsize shnum size
    [[ -f "$f" ]] || return 1
    [[ "$(head -c 5 "$f" | od -An -tx1 | tr -d ' \n')" == "7f454c4602" ]] || return 1
    shoff=$(od -An -tu8 -j 40 -N 8 "$f" | tr -d ' ')
    shentsize=$(od -An -tu2 -j 58 -N 2 "$f" | tr -d ' ')
    shnum=$(od -An -tu2 -j 60 -N 2 "$f" | tr -d ' ')
    size=$(stat -c %s "$f")
    ((shoff > 0 && shnum > 0 && shoff + shentsize * shnum <= size))
}

ensure_lz4() {
    command -v lz4 >/dev/null && return 0
    command -v apt-get >/dev/null || { echo "fetch-linux-kernel: lz4 not found and no apt-get to install it" >&2; exit 1; }
    echo "fetch-linux-kernel: installing lz4 (apt-get install -y lz4)"
    if ! DEBIAN_FRONTEND=noninteractive apt-get install -y lz4; then
        apt-get update
        DEBIAN_FRONTEND=noninteractive apt-get install -y lz4
    fi
}

extract_vmlinux() {
    ensure_lz4
    local tmp="$out/vmlinux.tmp" offsets off
    # Byte offsets (0-based) of every LZ4 legacy-frame magic; the first that decompresses into
    # a complete ELF is the payload (a stray match elsewhere decompresses into junk or nothing).
    offsets="$(LC_ALL=C grep -obUaP '\x02\x21\x4c\x18' "$out/vmlinuz" | cut -d: -f1 || true)"
    if [[ -z "$offsets" ]]; then
        echo "fetch-linux-kernel: no LZ4 legacy-frame magic (02 21 4c 18) in $out/vmlinuz" >&2
        exit 1
    fi
    for off in $offsets; do
        # The payload is followed by the decompressed size and the rest of the bzImage, which
        # lz4 reports as a bad frame after writing all of the data: judge by the output.
        tail -c +"$((off + 1))" "$out/vmlinuz" | lz4 -dc >"$tmp" 2>/dev/null || true
        if elf_complete "$tmp"; then
            mv "$tmp" "$out/vmlinux"
            echo "fetch-linux-kernel: LZ4 payload at offset $off -> $out/vmlinux ($(stat -c %s "$out/vmlinux") bytes)"
            return 0
        fi
    done
    rm -f "$tmp"
    echo "fetch-linux-kernel: no LZ4 payload in $out/vmlinuz decompressed into an ELF file" >&2
    exit 1
}

mkdir -p "$out"
if [[ -f "$out/vmlinuz" ]]; then
    echo "fetch-linux-kernel: $out/vmlinuz already exists; not downloading"
else
    fetch_vmlinuz
fi
if elf_complete "$out/vmlinux"; then
    echo "fetch-linux-kernel: $out/vmlinux already exists; nothing to do"
else
    extract_vmlinux
fi

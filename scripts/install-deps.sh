#!/usr/bin/env bash
# Install (idempotently) the Debian packages needed to build wisp's default
# guest and to run the tests: kernel source, toolchain for the kernel and our init,
# busybox, cpio, mke2fs, iproute2; and what `wisp bench` compares wisp with (runc,
# crun, QEMU).
# Runs `apt-get update` only when something is missing. Quiet on success.
set -euo pipefail

PKGS=(
    linux-source-6.1   # /usr/src/linux-source-6.1.tar.xz
    busybox-static     # /bin/busybox for the initramfs
    build-essential    # gcc, make, libc headers
    flex bison bc      # kconfig / kernel build
    libelf-dev         # objtool
    libssl-dev         # scripts/sign-file, extract-cert (host tools)
    perl python3       # kernel build scripts
    cpio gzip xz-utils # unpack source, pack initramfs
    lz4                # compress the bzImage (CONFIG_KERNEL_LZ4)
    patch              # apply guest/kernel/patches
    binutils           # strip/objcopy
    e2fsprogs          # mke2fs -d: target/guest/rootfs.ext4
    iproute2           # ip: network namespaces, TAPs and bridges in tests
    passt              # user-mode networking backend (--net user)
    dropbear-bin       # the guest's SSH server; dbclient for the tests
    runc crun          # OCI runtimes: the container kinds of `wisp bench`
    containerd         # ctr and containerd: the tests of containerd-shim-wisp-v2
    qemu-system-x86    # QEMU's microvm machine: a peer VMM for `wisp bench`
)

missing=()
for p in "${PKGS[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q '^install ok installed$'; then
        missing+=("$p")
    fi
done

if [ "${#missing[@]}" -eq 0 ]; then
    exit 0
fi

SUDO=()
if [ "$(id -u)" -ne 0 ]; then
    SUDO=(sudo)
fi

echo "install-deps: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
log=$(mktemp)
trap 'rm -f "$log"' EXIT
if ! { "${SUDO[@]}" apt-get update -qq &&
       "${SUDO[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}"; } >"$log" 2>&1; then
    cat "$log" >&2
    echo "install-deps: apt-get failed" >&2
    exit 1
fi

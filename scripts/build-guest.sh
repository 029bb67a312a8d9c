#!/usr/bin/env bash
# Build wisp's default Linux guest from Debian packages:
#   target/guest/vmlinux            tiny, patched 6.1 kernel (ELF, PVH note)
#   target/guest/bzImage            the same kernel as a bzImage (LZ4-compressed)
#   target/guest/initramfs.cpio.gz  busybox-static + our nolibc /init
#   target/guest/rootfs.ext4        the same files as an ext4 disk image (init at
#                                   /sbin/init): wisp run --disk ... --cmdline root=/dev/vda
#   target/guest/image-init.cpio    PID 1 of `wisp run --image` guests
#   target/guest/ssh.ext4           the guest's SSH server (dropbear), a read-only disk
#                                   `wisp run` attaches to the default guest
#   target/guest/ssh/               keys for the guest's SSH server:
#                                   id_ed25519 (OpenSSH format, for `ssh -i`),
#                                   id_ed25519.dropbear (for dbclient), host key
# Cached: does nothing when the outputs were built from the same inputs.
# WISP_GUEST_INT3_PATCH=1 also applies guest/kernel/optional/int3-selftest.patch
# and writes target/guest/vmlinux-int3 (and bzImage-int3) instead of vmlinux (separate build directory;
# part of the cache key): the kernel other VMMs boot where kernel mode is emulated.
# See guest/README.md.
set -euo pipefail

cd "$(dirname "$0")/.."

SCRIPT=scripts/build-guest.sh
KTAR=/usr/src/linux-source-6.1.tar.xz
FRAGMENT=guest/kernel/wisp.config
PATCH_DIR=guest/kernel/patches
INT3_PATCH=guest/kernel/optional/int3-selftest.patch
INIT_DIR=guest/init
GUEST_INCLUDE=guest/include   # headers shared by the guests' nolibc programs
OUT=target/guest
BUILD=target/guest-build

INT3=${WISP_GUEST_INT3_PATCH:-0}
case "$INT3" in
    0 | "") INT3=0; VARIANT=default; VMLINUX_NAME=vmlinux; BZIMAGE_NAME=bzImage ;;
    1) VARIANT=int3; VMLINUX_NAME=vmlinux-int3; BZIMAGE_NAME=bzImage-int3 ;;
    *) echo "build-guest: WISP_GUEST_INT3_PATCH must be 0 or 1" >&2; exit 2 ;;
esac

VMLINUX=$OUT/$VMLINUX_NAME
BZIMAGE=$OUT/$BZIMAGE_NAME

step() { printf 'build-guest: %s\n' "$*"; }
die() { printf 'build-guest: error: %s\n' "$*" >&2; exit 1; }

# Run a noisy command with its output in a log; show the tail on failure.
run_logged() {
    local log=$1
    shift
    if ! "$@" >"$log" 2>&1; then
        tail -n 40 "$log" >&2
        die "'$*' failed (full log: $log)"
    fi
}

scripts/install-deps.sh

mkdir -p "$OUT" "$BUILD"
exec 9>"$BUILD/.lock"
flock 9

# ---------------------------------------------------------------------- ssh
# Generated once and kept (a rebuild must not change the keys users have):
# the guest's host key and a client key whose public half root accepts.
SSH=$OUT/ssh
mkdir -p "$SSH"
if [ ! -f "$SSH/host_ed25519" ]; then
    dropbearkey -t ed25519 -f "$SSH/host_ed25519" >/dev/null 2>&1
fi
if [ ! -f "$SSH/id_ed25519.dropbear" ] || [ ! -f "$SSH/id_ed25519" ]; then
    rm -f "$SSH/id_ed25519.dropbear" "$SSH/id_ed25519"
    dropbearkey -t ed25519 -f "$SSH/id_ed25519.dropbear" >/dev/null 2>&1
    dropbearconvert dropbear openssh "$SSH/id_ed25519.dropbear" "$SSH/id_ed25519" >/dev/null 2>&1
fi
chmod 600 "$SSH/host_ed25519" "$SSH/id_ed25519.dropbear" "$SSH/id_ed25519"
dropbearkey -y -f "$SSH/id_ed25519.dropbear" | grep '^ssh-' >"$SSH/id_ed25519.pub"

# ---------------------------------------------------------------- cache keys
mapfile -t PATCHES < <(find "$PATCH_DIR" -maxdepth 1 -name '*.patch' | LC_ALL=C sort)
[ "${#PATCHES[@]}" -gt 0 ] || die "no patches in $PATCH_DIR"
if [ "$INT3" = 1 ]; then
    PATCHES+=("$INT3_PATCH")
fi

[ -f "$KTAR" ] || die "$KTAR missing"
KSRC_ID="$(dpkg-query -W -f='${Version}' linux-source-6.1) $(stat -c '%s %Y' "$KTAR")"
CC_ID=$(gcc -dumpfullversion)

key_of() { sha256sum "$@" | sha256sum | cut -c1-32; }

SRC_KEY=$(printf '%s\n%s\n%s\n' "$KSRC_ID" "$INT3" "$(key_of "${PATCHES[@]}")" | key_of -)
KERNEL_KEY=$(printf '%s\n%s\n%s\n' "$SRC_KEY" "$CC_ID" "$(key_of "$SCRIPT" "$FRAGMENT")" | key_of -)
mapfile -t INIT_FILES < <(find "$INIT_DIR" "$GUEST_INCLUDE" -type f | LC_ALL=C sort)
INITRD_KEY=$(printf '%s\n%s\n%s\n%s\n' "$KSRC_ID" "$CC_ID" \
    "$(key_of "$SCRIPT" /bin/busybox /usr/sbin/dropbear "$SSH/host_ed25519" "$SSH/id_ed25519.pub" "${INIT_FILES[@]}")" \
    "$(cd "$INIT_DIR" && find . | LC_ALL=C sort | xargs stat -c '%n %a')" | key_of -)

KB="$BUILD/linux-$VARIANT"   # kernel build dir for this variant
KSRC="$KB/src"

is_current() { # output stampfile key
    [ -f "$1" ] && [ -f "$2" ] && [ "$(cat "$2")" = "$3" ]
}

# -------------------------------------------------------------------- kernel
verify_config() {
    local cfg=$1 bad=() line sym want got
    while IFS= read -r line; do
        [[ $line =~ ^(CONFIG_[A-Za-z0-9_]+)=(.*)$ ]] || continue
        sym=${BASH_REMATCH[1]}
        want=${BASH_REMATCH[2]}
        got=$(grep -E "^$sym=" "$cfg" | cut -d= -f2- || true)
        if [ "$want" = n ]; then
            [ -z "$got" ] || bad+=("$sym: wanted n, got $got")
        elif [ "$got" != "$want" ]; then
            bad+=("$sym: wanted $want, got ${got:-n/unset}")
        fi
    done <"$FRAGMENT"
    if [ "${#bad[@]}" -gt 0 ]; then
        printf 'build-guest:   %s\n' "${bad[@]}" >&2
        die "${#bad[@]} option(s) of $FRAGMENT did not survive into $cfg (unmet dependencies?)"
    fi
}

# Copies this variant's build outputs into $OUT.
install_kernel() {
    cp "$KB/vmlinux.out" "$VMLINUX.tmp"
    mv "$VMLINUX.tmp" "$VMLINUX"
    cp "$KB/bzImage.out" "$BZIMAGE.tmp"
    mv "$BZIMAGE.tmp" "$BZIMAGE"
    echo "$KERNEL_KEY" >"$BUILD/$VMLINUX_NAME.key"
}

build_kernel() {
    mkdir -p "$KB"
    # This variant was already built from these inputs: just copy it.
    if is_current "$KB/vmlinux.out" "$KB/vmlinux.key" "$KERNEL_KEY" && [ -f "$KB/bzImage.out" ]; then
        install_kernel
        step "kernel: $VMLINUX and $BZIMAGE copied from $KB ($VARIANT)"
        return
    fi
    if ! is_current "$KSRC/Makefile" "$KB/src.key" "$SRC_KEY"; then
        step "kernel: unpacking $KTAR"
        rm -rf "$KSRC" "$KB/src.key" "$KB/config.key"
        mkdir -p "$KSRC"
        tar -xf "$KTAR" -C "$KSRC" --strip-components=1
        local p
        for p in "${PATCHES[@]}"; do
            step "kernel: applying ${p#guest/kernel/}"
            patch -d "$KSRC" -p1 -s -N <"$p" || die "patch $p failed"
        done
        echo "$SRC_KEY" >"$KB/src.key"
    fi

    local cfg_key
    cfg_key=$(printf '%s\n%s\n' "$SRC_KEY" "$(key_of "$FRAGMENT")" | key_of -)
    if ! is_current "$KSRC/.config" "$KB/config.key" "$cfg_key"; then
        step "kernel: tinyconfig + $FRAGMENT"
        run_logged "$KB/config.log" make -C "$KSRC" tinyconfig
        run_logged "$KB/merge.log" env -C "$KSRC" \
            scripts/kconfig/merge_config.sh -m .config "$PWD/$FRAGMENT"
        run_logged "$KB/olddefconfig.log" make -C "$KSRC" olddefconfig
        verify_config "$KSRC/.config"
        echo "$cfg_key" >"$KB/config.key"
    fi

    step "kernel: make -j$(nproc) vmlinux bzImage (log: $KB/build.log)"
    run_logged "$KB/build.log" nice -n 10 make -C "$KSRC" -j"$(nproc)" \
        KBUILD_BUILD_USER=wisp KBUILD_BUILD_HOST=wisp \
        KBUILD_BUILD_TIMESTAMP="Debian linux-source-6.1 ${KSRC_ID%% *}" vmlinux bzImage
    readelf -n "$KSRC/vmlinux" | grep -q 'Xen.*0x00000012' ||
        die "vmlinux has no PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY)"
    objcopy --strip-debug "$KSRC/vmlinux" "$KB/vmlinux.out"
    cp "$KSRC/arch/x86/boot/bzImage" "$KB/bzImage.out"
    echo "$KERNEL_KEY" >"$KB/vmlinux.key"
    install_kernel
    step "kernel: $VMLINUX ($(stat -c %s "$VMLINUX") bytes), $BZIMAGE ($(stat -c %s "$BZIMAGE") bytes, LZ4)"
}

if is_current "$VMLINUX" "$BUILD/$VMLINUX_NAME.key" "$KERNEL_KEY" && [ -f "$BZIMAGE" ]; then
    step "kernel: up to date ($VARIANT)"
else
    build_kernel
fi

# ----------------------------------------------------------------- initramfs
# Sets NOLIBC to the kernel's nolibc.h (unpacking just that when the kernel is cached
# but its tree is gone).
find_nolibc() {
    NOLIBC="$KSRC/tools/include/nolibc/nolibc.h"
    if [ ! -f "$NOLIBC" ]; then
        NOLIBC="$BUILD/nolibc-src/tools/include/nolibc/nolibc.h"
    fi
    if [ ! -f "$NOLIBC" ]; then
        step "unpacking nolibc from $KTAR"
        rm -rf "$BUILD/nolibc-src"
        mkdir -p "$BUILD/nolibc-src"
        tar -xf "$KTAR" -C "$BUILD/nolibc-src" --strip-components=1 \
            linux-source-6.1/tools/include/nolibc
    fi
}

# A static nolibc program: nolibc_cc OUT SOURCE.
nolibc_cc() {
    gcc -Os -static -nostdlib -fno-asynchronous-unwind-tables -fno-ident \
        -fno-stack-protector -Wall -Wextra -Werror \
        -Wl,--build-id=none -Wl,-z,noexecstack \
        -I "$GUEST_INCLUDE" -include "$NOLIBC" -o "$1" "$2" -lgcc
    strip "$1"
}

build_initramfs() {
    local stage="$BUILD/initramfs"
    find_nolibc

    step "initramfs: staging $stage"
    rm -rf "$stage"
    mkdir -p "$stage"/{bin,sbin,usr/bin,usr/sbin,etc/init.d,proc,sys,dev,tmp,root,run,mnt}
    chmod 1777 "$stage/tmp"
    chmod 0700 "$stage/root"
    cp -a "$INIT_DIR/rootfs/." "$stage/"

    step "initramfs: compiling /init (nolibc)"
    nolibc_cc "$stage/init" "$INIT_DIR/init.c"

    cp /bin/busybox "$stage/bin/busybox"
    # Applet symlinks: those listed in guest/init/applets (ALL = every one).
    local app
    while IFS= read -r app; do
        [ -e "$stage/$app" ] || ln -s /bin/busybox "$stage/$app"
    done < <(
        if grep -qx ALL "$INIT_DIR/applets"; then
            /bin/busybox --list-full | grep /   # skip 'linuxrc'
        else
            grep -v -e '^#' -e '^[[:space:]]*$' "$INIT_DIR/applets"
        fi
    )

    # The kernel opens /dev/console before running /init.
    mknod -m 600 "$stage/dev/console" c 5 1 ||
        step "initramfs: warning: cannot mknod /dev/console (init reopens it)"

    # gzip format with *stored* (level 0) deflate blocks: inflating is
    # emulated kernel work on the project's hosts (~55 s for a -9 archive
    # of this size, ~0 s for a stored one). See guest/README.md.
    step "initramfs: packing $OUT/initramfs.cpio.gz"
    find "$stage" -exec touch -h -d @0 {} +
    (cd "$stage" && find . -mindepth 1 | LC_ALL=C sort |
        cpio -o -H newc -R 0:0 --reproducible --quiet) |
        python3 -c 'import gzip, sys
sys.stdout.buffer.write(gzip.compress(sys.stdin.buffer.read(), compresslevel=0, mtime=0))' \
        >"$OUT/initramfs.cpio.gz.tmp"
    gzip -t "$OUT/initramfs.cpio.gz.tmp"
    mv "$OUT/initramfs.cpio.gz.tmp" "$OUT/initramfs.cpio.gz"
    echo "$INITRD_KEY" >"$BUILD/initramfs.key"
    step "initramfs: $OUT/initramfs.cpio.gz ($(stat -c %s "$OUT/initramfs.cpio.gz") bytes)"

    # The SSH server, off the boot path: dropbear (dropbear-bin) with its shared
    # libraries, the host key and root's authorized key from $SSH, on a small
    # read-only disk that `wisp run` attaches to the default guest (serial wisp-ssh);
    # rcS mounts it after WISP-READY. In the initramfs these 4 MiB cost seconds of
    # emulated unpacking before /init (guest/README.md, "SSH").
    local ssh_stage="$BUILD/ssh-stage" lib
    rm -rf "$ssh_stage"
    mkdir -p "$ssh_stage/usr/sbin" "$ssh_stage/etc/dropbear" "$ssh_stage/root/.ssh"
    cp /usr/sbin/dropbear "$ssh_stage/usr/sbin/dropbear"
    for lib in $(ldd /usr/sbin/dropbear | awk '$2 == "=>" && $3 ~ /^\// {print $3} $1 ~ /^\/lib/ {print $1}'); do
        mkdir -p "$ssh_stage$(dirname "$lib")"
        cp -L "$lib" "$ssh_stage$lib"
    done
    cp "$SSH/host_ed25519" "$ssh_stage/etc/dropbear/dropbear_ed25519_host_key"
    cp "$SSH/id_ed25519.pub" "$ssh_stage/root/.ssh/authorized_keys"
    chmod 700 "$ssh_stage/root/.ssh"
    chmod 600 "$ssh_stage/root/.ssh/authorized_keys" "$ssh_stage/etc/dropbear/dropbear_ed25519_host_key"
    find "$ssh_stage" -exec touch -h -d @0 {} +
    step "ssh disk: packing $OUT/ssh.ext4"
    rm -f "$OUT/ssh.ext4.tmp"
    run_logged "$BUILD/ssh-disk.log" mke2fs -q -t ext4 -O ^has_journal -L wisp-ssh \
        -E root_owner=0:0 -d "$ssh_stage" -F "$OUT/ssh.ext4.tmp" 8M
    mv "$OUT/ssh.ext4.tmp" "$OUT/ssh.ext4"
    echo "$INITRD_KEY" >"$BUILD/ssh.key"

    # The same tree as a disk, with the SSH files in place: no journal (a small
    # scratch root; mounting and replaying a journal is emulated kernel work here),
    # 64 MiB sparse.
    step "rootfs: packing $OUT/rootfs.ext4"
    mkdir -p "$stage/sbin"
    cp "$stage/init" "$stage/sbin/init"
    cp -a "$ssh_stage/." "$stage/"
    rm -f "$OUT/rootfs.ext4.tmp"
    run_logged "$BUILD/rootfs.log" mke2fs -q -t ext4 -O ^has_journal -L wisp-root \
        -E root_owner=0:0 -d "$stage" -F "$OUT/rootfs.ext4.tmp" 64M
    mv "$OUT/rootfs.ext4.tmp" "$OUT/rootfs.ext4"
    echo "$INITRD_KEY" >"$BUILD/rootfs.key"
}

if is_current "$OUT/initramfs.cpio.gz" "$BUILD/initramfs.key" "$INITRD_KEY" &&
    is_current "$OUT/ssh.ext4" "$BUILD/ssh.key" "$INITRD_KEY" &&
    is_current "$OUT/rootfs.ext4" "$BUILD/rootfs.key" "$INITRD_KEY"; then
    step "initramfs, ssh disk, rootfs: up to date"
else
    build_initramfs
fi

# ------------------------------------------------------------- image init
# PID 1 of `wisp run --image` guests, alone in an uncompressed cpio (wisp appends a
# second cpio with the process to run): mounts the image's disk under an overlay and
# runs the image's command. See guest/image-init/init.c.
IMAGE_INIT_SRC=guest/image-init/init.c
IMAGE_INIT_KEY=$(printf '%s\n%s\n%s\n' "$KSRC_ID" "$CC_ID" "$(key_of "$SCRIPT" "$IMAGE_INIT_SRC" "$GUEST_INCLUDE"/*)" | key_of -)
build_image_init() {
    local stage="$BUILD/image-init"
    find_nolibc
    step "image init: compiling (nolibc)"
    rm -rf "$stage"
    mkdir -p "$stage"/{dev,proc,sys,lower,rw,newroot,wisp}
    mknod -m 600 "$stage/dev/console" c 5 1 ||
        step "image init: warning: cannot mknod /dev/console"
    nolibc_cc "$stage/init" "$IMAGE_INIT_SRC"
    find "$stage" -exec touch -h -d @0 {} +
    (cd "$stage" && find . -mindepth 1 | LC_ALL=C sort |
        cpio -o -H newc -R 0:0 --reproducible --quiet) >"$OUT/image-init.cpio.tmp"
    mv "$OUT/image-init.cpio.tmp" "$OUT/image-init.cpio"
    echo "$IMAGE_INIT_KEY" >"$BUILD/image-init.key"
    step "image init: $OUT/image-init.cpio ($(stat -c %s "$OUT/image-init.cpio") bytes)"
}
if is_current "$OUT/image-init.cpio" "$BUILD/image-init.key" "$IMAGE_INIT_KEY"; then
    step "image init: up to date"
else
    build_image_init
fi

# ------------------------------------------------------------- probe guest
if [ -x scripts/build-probe.sh ]; then
    step "probe: scripts/build-probe.sh"
    scripts/build-probe.sh
fi

#!/usr/bin/env bash
# Makes containerd run containers as wisp microVMs (runtime io.containerd.wisp.v2):
#   1. installs containerd (Debian's package) if it is missing;
#   2. builds wisp, containerd-shim-wisp-v2 and the default guest (cached);
#   3. links the shim into /usr/local/bin, where containerd finds it by name
#      (the shim runs the wisp binary next to its real path, and wisp finds the guest
#      under target/guest: keep this checkout where it is);
#   4. declares the runtime `wisp` for CRI (Kubernetes) in containerd's config, once,
#      and restarts containerd if it runs under systemd.
# `ctr run --runtime io.containerd.wisp.v2 IMAGE ID CMD` needs only steps 1-3.
# Undo: scripts/install-containerd-runtime.sh --uninstall
# Needs root. README, "containerd and Kubernetes".
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)

CONFIG=${CONTAINERD_CONFIG:-/etc/containerd/config.toml}
BIN_DIR=${BIN_DIR:-/usr/local/bin}
SHIM=containerd-shim-wisp-v2
MARK_BEGIN="# >>> wisp runtime (scripts/install-containerd-runtime.sh)"
MARK_END="# <<< wisp runtime"

die() { echo "install-containerd-runtime: $*" >&2; exit 1; }
say() { echo "install-containerd-runtime: $*"; }

[ "$(id -u)" -eq 0 ] || die "run as root (it writes $BIN_DIR and $CONFIG)"

restart_containerd() {
    if command -v systemctl >/dev/null && systemctl is-active --quiet containerd 2>/dev/null; then
        systemctl restart containerd
        say "restarted containerd"
    else
        say "containerd is not a running systemd service: restart it yourself to load $CONFIG"
    fi
}

remove_block() {
    [ -f "$CONFIG" ] || return 0
    local tmp="$CONFIG.wisp-tmp"
    awk -v b="$MARK_BEGIN" -v e="$MARK_END" '$0 == b { skip = 1 } !skip { print } $0 == e { skip = 0 }' \
        "$CONFIG" >"$tmp"
    mv "$tmp" "$CONFIG"
}

if [ "${1:-}" = "--uninstall" ]; then
    rm -f "$BIN_DIR/$SHIM"
    remove_block
    say "removed $BIN_DIR/$SHIM and the runtime from $CONFIG"
    restart_containerd
    exit 0
fi
[ $# -eq 0 ] || die "unknown argument $1 (the only one is --uninstall)"

scripts/install-deps.sh
command -v containerd >/dev/null || die "containerd is still missing after install-deps.sh"

say "building wisp and $SHIM (cargo build --release)"
cargo build --release --locked --bin wisp --bin "$SHIM"
scripts/build-guest.sh

ln -sfn "$REPO/target/release/$SHIM" "$BIN_DIR/$SHIM"
say "linked $BIN_DIR/$SHIM -> $REPO/target/release/$SHIM"

mkdir -p "$(dirname "$CONFIG")"
if [ ! -s "$CONFIG" ]; then
    containerd config default >"$CONFIG"
    say "wrote containerd's default config to $CONFIG"
fi
remove_block
if grep -q '^version = 2' "$CONFIG"; then
    cat >>"$CONFIG" <<EOF
$MARK_BEGIN
[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.wisp]
  runtime_type = "io.containerd.wisp.v2"
$MARK_END
EOF
    say "declared the CRI runtime 'wisp' in $CONFIG"
else
    say "$CONFIG is not a version 2 config: add the runtime by hand (README, \"containerd and Kubernetes\")"
fi
restart_containerd
say "done: ctr run --runtime io.containerd.wisp.v2 IMAGE ID CMD"

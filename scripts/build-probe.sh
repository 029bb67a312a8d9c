#!/usr/bin/env bash
# Builds the `probe` test guest (guest/probe) and copies it to
# target/guest/probe. Incremental: cargo skips the build when nothing changed.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
build_dir="$root/target/probe-build"
out="$root/target/guest/probe"
triple="x86_64-unknown-linux-gnu"   # must match guest/probe/.cargo/config.toml

# guest/probe/.cargo/config.toml (target, rustflags) applies from this cwd.
cd "$root/guest/probe"
CARGO_TARGET_DIR="$build_dir" cargo build --release --locked --quiet "$@"

elf="$build_dir/$triple/release/probe"
mkdir -p "$(dirname "$out")"
if ! cmp -s "$elf" "$out"; then
    cp "$elf" "$out.tmp"
    mv -f "$out.tmp" "$out"
fi

# The VMM boots the probe through PVH: the Xen PHYS32_ENTRY note (type 0x12)
# must be present.
if ! readelf -n "$out" | grep -Eq 'Xen[[:space:]].*(0x00000012|PHYS32_ENTRY)'; then
    echo "build-probe.sh: $out has no PVH (Xen PHYS32_ENTRY) ELF note" >&2
    exit 1
fi
echo "$out"

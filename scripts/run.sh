#!/usr/bin/env bash
# Build wisp and the default guest (cached), then boot it: `scripts/run.sh [wisp run options]`.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/build-guest.sh >&2
cargo build --release --locked --quiet
exec target/release/wisp run "$@"

#!/usr/bin/env bash
# The whole test suite, from a clean Debian 12 machine with Rust:
#   1. installs the apt packages and builds the guests (cached: a no-op when up to date);
#   2. checks formatting and lints (wisp and the probe guest);
#   3. runs unit and integration tests (probe boots, bad input, one real Linux boot);
#   4. fuzzes every target for a short while (scripts/fuzz.sh, fuzz/README.md).
# .ci/run calls exactly this.
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n== %s\n' "$*"; }

step "guest images (scripts/build-guest.sh)"
scripts/build-guest.sh

step "format"
cargo fmt --all --check
(cd guest/probe && cargo fmt --check)
(cd fuzz && cargo fmt --check)

step "lint"
cargo clippy --workspace --all-targets --release --locked -- -D warnings
(cd guest/probe && cargo clippy --release --locked -- -D warnings)

step "tests"
cargo test --workspace --release --locked

step "fuzz (scripts/fuzz.sh, ${FUZZ_SECONDS:-10} s per target)"
FUZZ_SECONDS=${FUZZ_SECONDS:-10} scripts/fuzz.sh

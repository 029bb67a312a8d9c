#!/usr/bin/env bash
# Run wisp's benchmarks (reports, never pass/fail). Needs root for the network ones.
#   scripts/bench.sh [network|snapshot|console|migrate|image] [-- OPTIONS]   (see tests/bench/*.rs)
# Numbers from hosts where guest kernel mode is emulated (see `wisp doctor`) say
# nothing absolute about real hardware: compare ratios from the same run.
set -euo pipefail
cd "$(dirname "$0")/.."

which=${1:-network}
shift || true
[ "${1:-}" = "--" ] && shift

scripts/build-guest.sh >/dev/null
case "$which" in
network) exec cargo bench --locked -q -p vmm --bench network -- "$@" ;;
snapshot) exec cargo bench --locked -q -p vmm --bench snapshot -- "$@" ;;
console) exec cargo bench --locked -q -p vmm --bench console -- "$@" ;;
migrate) exec cargo bench --locked -q -p vmm --bench migrate -- "$@" ;;
image) exec cargo bench --locked -q -p vmm --bench image -- "$@" ;;
*) echo "bench: unknown benchmark '$which' (available: network, snapshot, console, migrate, image)" >&2; exit 2 ;;
esac

#!/usr/bin/env bash
# Coverage-guided fuzzing of wisp (fuzz/README.md) on the stable toolchain:
#   1. installs cargo-fuzz (pinned, --locked) if it is missing or another version;
#   2. builds every target (libFuzzer, --sanitizer none: stable has no -Zsanitizer);
#   3. runs each target in turn, one process, from the committed seeds plus what earlier
#      runs found (fuzz/corpus-run/, not committed); fails if any target crashes, hangs
#      (10 s for one input) or leaks past 2 GiB.
#
#   scripts/fuzz.sh [TARGET...]   every target (or those), FUZZ_SECONDS each (default 30)
#   scripts/fuzz.sh --long        the device targets (mmio chain block net) until
#                                 FUZZ_RUNS executions each (default 10^7)
# A crash leaves its input in fuzz/artifacts/TARGET/; replay it with
#   (cd fuzz && cargo fuzz run --sanitizer none TARGET artifacts/TARGET/crash-...)
set -euo pipefail
cd "$(dirname "$0")/.."

CARGO_FUZZ_VERSION=0.13.2
seconds=${FUZZ_SECONDS:-30}
runs=${FUZZ_RUNS:-10000000}
long=0
targets=()
for arg in "$@"; do
    case $arg in
        --long) long=1 ;;
        -h | --help) sed -n '2,14p' "$0"; exit 0 ;;
        -*) echo "fuzz.sh: unknown option $arg" >&2; exit 2 ;;
        *) targets+=("$arg") ;;
    esac
done

if ! cargo fuzz --version 2>/dev/null | grep -qF "$CARGO_FUZZ_VERSION"; then
    cargo install cargo-fuzz --version "$CARGO_FUZZ_VERSION" --locked
fi

cd fuzz
opts=(--sanitizer none)
if [ $long = 0 ]; then
    # A shorter build for short runs (CI); long runs keep cargo-fuzz's one codegen
    # unit, which the figures in fuzz/README.md were measured with.
    opts+=(--codegen-units 16)
fi
cargo fuzz build "${opts[@]}"
if [ ${#targets[@]} -eq 0 ]; then
    if [ $long = 1 ]; then
        targets=(mmio chain block net)
    else
        mapfile -t targets < <(cargo fuzz list)
    fi
fi
if [ $long = 1 ]; then
    bound=(-runs="$runs")
else
    bound=(-max_total_time="$seconds")
fi

mkdir -p target/fuzz-logs
failed=()
for t in "${targets[@]}"; do
    mkdir -p "corpus-run/$t"
    log=target/fuzz-logs/$t.log
    start=$(date +%s)
    # New inputs go to the first directory: the committed seeds stay as they are.
    if cargo fuzz run "${opts[@]}" "$t" "corpus-run/$t" "corpus/$t" -- \
        "${bound[@]}" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 >"$log" 2>&1; then
        result=ok
    else
        result=FAILED
        failed+=("$t")
    fi
    took=$(($(date +%s) - start))
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
    rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -1)
    cov=$(grep -oE 'cov: [0-9]+' "$log" | tail -1 || true)
    printf '%-12s %-6s %12s execs %8s exec/s %5ss  %s\n' \
        "$t" "$result" "${execs:-?}" "${rate:-?}" "$took" "$cov"
    if [ $result = FAILED ]; then
        grep -E -A12 'panicked at|ERROR: libFuzzer|SUMMARY' "$log" | head -40 || tail -40 "$log"
    fi
done

if [ ${#failed[@]} -gt 0 ]; then
    echo "fuzz.sh: ${failed[*]} failed; inputs in fuzz/artifacts/, logs in fuzz/target/fuzz-logs/" >&2
    exit 1
fi

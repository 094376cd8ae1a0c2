#!/usr/bin/env bash
# Builds every fuzz target (fuzz/, cargo-fuzz + libFuzzer) and runs each for SECONDS
# (default 20), one after another. Works on the stable toolchain: cargo-fuzz's nightly-only
# flags are allowed with RUSTC_BOOTSTRAP=1. AddressSanitizer is used when its runtime links,
# else the targets are built without a sanitizer (Rust's own checks still catch panics).
#   scripts/fuzz.sh [SECONDS] [TARGET...]
# A crash stops the run; its input is kept under fuzz/artifacts/TARGET/ (reproduce with
# `cargo fuzz run TARGET fuzz/artifacts/TARGET/crash-...` from fuzz/, RUSTC_BOOTSTRAP=1).
set -euo pipefail
cd "$(dirname "$0")/../fuzz"

seconds=${1:-20}
shift || true
export RUSTC_BOOTSTRAP=1

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "== installing cargo-fuzz"
    cargo install cargo-fuzz --locked
fi

sanitizer=${FUZZ_SANITIZER:-address}
echo "== building the fuzz targets (sanitizer: $sanitizer)"
if ! cargo fuzz build --sanitizer "$sanitizer"; then
    if [ "$sanitizer" = none ]; then exit 1; fi
    echo "building with $sanitizer failed; building without a sanitizer"
    sanitizer=none
    cargo fuzz build --sanitizer none
fi

targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
    mapfile -t targets < <(cargo fuzz list)
fi
for target in "${targets[@]}"; do
    echo "== fuzzing $target for ${seconds}s"
    # New inputs go to a scratch corpus (fuzz/work/, not committed); the committed seeds in
    # fuzz/corpus/TARGET are only read.
    mkdir -p "work/$target"
    log="work/$target.log"
    status=0
    cargo fuzz run --sanitizer "$sanitizer" "$target" "work/$target" "corpus/$target" -- \
        -max_total_time="$seconds" -rss_limit_mb=2048 -print_final_stats=1 >"$log" 2>&1 || status=$?
    # Only the figures and, on failure, the report: libFuzzer's progress lines are many.
    grep -E '^(#[0-9]+ +(INITED|DONE)|stat::(number_of_executed_units|new_units_added|peak_rss_mb))' "$log" || true
    if [ "$status" -ne 0 ]; then
        tail -n 60 "$log"
        echo "fuzz target $target failed (exit $status); the input is under fuzz/artifacts/$target/"
        exit 1
    fi
done
echo "fuzz: ${#targets[@]} targets ran ${seconds}s each, no crash"

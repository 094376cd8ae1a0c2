#!/usr/bin/env bash
# README command 2: installs what is missing, then checks formatting and lints and runs
# every test (unit, property and end-to-end tests with real daemons over loopback).
set -euo pipefail
cd "$(dirname "$0")/.."

./scripts/setup.sh
echo "== cargo fmt --check"
cargo fmt --all --check
echo "== cargo clippy -D warnings"
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "== building the daemon the end-to-end tests run"
cargo build --workspace --bins --locked
echo "== cargo test"
log=$(mktemp)
trap 'rm -f "$log"' EXIT
cargo test --workspace --locked 2>&1 | tee "$log"
# One closing line for the whole run (cargo prints one per test binary, the last being the
# doc tests).
awk '/^test result:/ { p += $4; f += $6; i += $8 } END { printf "tests: %d passed, %d failed, %d skipped\n", p, f, i }' "$log"

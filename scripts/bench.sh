#!/usr/bin/env bash
# Runs Ferry's benchmarks beside their standard tools (iperf3, fio), installing those if
# missing. Results print as tables and land as JSON in bench/out/.
#   ./scripts/bench.sh            # tcp and disk with defaults
#   ./scripts/bench.sh tcp --streams 1
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRA_PACKAGES="iperf3 fio" ./scripts/setup.sh
cargo build --release --quiet -p ferry-bench
if [ $# -gt 0 ]; then
    exec ./target/release/ferry-bench "$@"
fi
./target/release/ferry-bench tcp
./target/release/ferry-bench disk

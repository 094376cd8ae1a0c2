#!/usr/bin/env bash
# Runs Ferry's benchmarks beside their standard tools (iperf3, fio; ib_write_bw inside the
# RDMA VM), installing those if missing. Results print as one table and land as JSON in
# bench/out/.
#   ./scripts/bench.sh                  # compare: TCP, store and end to end on this host
#   ./scripts/bench.sh tcp --streams 1  # any ferry-bench subcommand and flags
#   ./scripts/bench.sh rdma-vm          # compare with RDMA, on soft-RoCE inside the VM
#   ./scripts/bench.sh rails-vm [N]     # RDMA striped over N rails (default 2) beside
#                                       # ib_write_bw on every rail pair at once, in the VM
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRA_PACKAGES="iperf3 fio" ./scripts/setup.sh
cargo build --release --quiet -p ferry-bench
mkdir -p bench/out
case "${1:-}" in
"") exec ./target/release/ferry-bench compare ;;
rdma-vm)
    shift
    exec ./scripts/rxe-vm.sh --mem 3072 --rw "$PWD/bench/out" -- ./target/release/ferry-bench \
        --dir /tmp --json-out "$PWD/bench/out/compare-rdma.json" compare --size-mib 256 "$@"
    ;;
rails-vm)
    shift
    rails=2
    case "${1:-}" in [0-9]*) rails=$1 && shift ;; esac
    exec ./scripts/rxe-vm.sh --mem 3072 --rails "$rails" --rw "$PWD/bench/out" -- \
        ./target/release/ferry-bench --dir /tmp --json-out "$PWD/bench/out/rdma-rails-$rails.json" \
        rdma --rails "$rails" --size-mib 256 "$@"
    ;;
*) exec ./target/release/ferry-bench "$@" ;;
esac

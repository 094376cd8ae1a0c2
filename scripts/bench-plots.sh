#!/usr/bin/env bash
# Re-makes the committed sweep results and plots under bench/results/: the TCP sweep on this
# host (beside iperf3), the RDMA sweep on soft-RoCE inside the VM (beside ib_write_bw), then
# the SVG plots from both. About 10 minutes on a 2-core machine.
#   ./scripts/bench-plots.sh
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRA_PACKAGES="iperf3 fio" ./scripts/setup.sh
cargo build --release --quiet -p ferry-bench
bench=./target/release/ferry-bench
out=bench/results
$bench --json-out $out/sweep-tcp.json sweep --transport tcp \
    --piece-mib 4,8,16,32,64 --in-flight 1,2,4,8 --size-mib 512 --rounds 2 | tee $out/sweep-tcp.txt
./scripts/rxe-vm.sh --mem 4096 --timeout 1800 --rw "$PWD/$out" -- \
    $bench --dir /tmp --json-out "$PWD/$out/sweep-rdma.json" sweep --transport rdma \
    --piece-mib 4,8,16,32,64 --in-flight 1,2,4 --queue-pairs 1,2 --size-mib 128 --rounds 1 |
    tee $out/sweep-rdma.txt
$bench plot $out/sweep-tcp.json $out/sweep-rdma.json --out-dir $out

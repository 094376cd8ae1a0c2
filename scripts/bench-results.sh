#!/usr/bin/env bash
# Re-makes every committed benchmark result under bench/results/ on this machine: the one-table
# comparison on this host (warm and cold seed), the store beside fio over 5 alternating rounds, the same with RDMA on soft-RoCE inside the VM,
# the TCP and RDMA sweeps, and the SVG plots. About 20 minutes on a 2-core machine; run it on
# an otherwise idle machine.
#   ./scripts/bench-results.sh            # everything
#   ./scripts/bench-results.sh host       # only what runs on this host (no VM)
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRA_PACKAGES="iperf3 fio" ./scripts/setup.sh
cargo build --release --quiet -p ferry-bench
bench=$PWD/target/release/ferry-bench
out=bench/results
mkdir -p $out
$bench --json-out $out/compare-host.json compare | tee $out/compare-host.txt
$bench --json-out $out/disk.json disk --repeat 5 | tee $out/disk.txt
$bench --json-out $out/e2e-cold.json e2e --cold | tee $out/e2e-cold.txt
$bench --json-out $out/sweep-tcp.json sweep --transport tcp \
    --piece-mib 4,8,16,32,64 --in-flight 1,2,4,8 --size-mib 512 --rounds 2 | tee $out/sweep-tcp.txt
if [ "${1:-}" != host ]; then
    vm=(./scripts/rxe-vm.sh --mem 4096 --timeout 1800 --rw "$PWD/$out" --)
    "${vm[@]}" $bench --dir /tmp --json-out "$PWD/$out/compare-rdma.json" compare --size-mib 256 \
        --streams 4 --register-mib 256,1024 | tee $out/compare-rdma.txt
    "${vm[@]}" $bench --dir /tmp --json-out "$PWD/$out/sweep-rdma.json" sweep --transport rdma \
        --piece-mib 4,8,16,32,64 --in-flight 1,2,4 --queue-pairs 1,2 --size-mib 128 --rounds 1 |
        tee $out/sweep-rdma.txt
fi
$bench plot $out/sweep-tcp.json $out/sweep-rdma.json --out-dir $out

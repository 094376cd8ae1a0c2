#!/usr/bin/env bash
# Ferry's RDMA piece path beside ib_write_bw (the same messages in flight) and Mooncake Transfer
# Engine (RDMA writes, the same block size and blocks in flight), in alternating rounds inside
# ONE soft-RoCE VM run, so the ratios compare like with like. Sets up Mooncake's venv as
# scripts/bench-mooncake.sh does and builds ferry-bench (release).
#   scripts/bench-rdma-alternating.sh [ROUNDS [PIECE_MIB]]    # default 3 rounds of 4 MiB pieces
# PIECE_MIB (4 to 64) is Ferry's piece length and Mooncake's block size; the task is 256 MiB.
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-3}
piece=${2:-4}
case "$rounds$piece" in *[!0-9]*) echo "usage: $0 [ROUNDS [PIECE_MIB]]" >&2; exit 2 ;; esac
if [ ! -x .mooncake-venv/bin/python ] || ! .mooncake-venv/bin/python -c 'import mooncake.engine' 2>/dev/null; then
    python3 -m venv .mooncake-venv
    .mooncake-venv/bin/pip install -q mooncake-transfer-engine-non-cuda
fi
cargo build --release --quiet -p ferry-bench
mkdir -p bench/out
exec ./scripts/rxe-vm.sh --mem 4096 --timeout 900 --rw "$PWD/bench/out" -- bash -c "
set -o pipefail
export MC_GID_INDEX=\${FERRY_RXE_GID_INDEX:-1} MC_WORKERS_PER_CTX=1 MC_TRANSFER_TIMEOUT=600
for i in \$(seq $rounds); do
    echo \"=== round \$i: ferry\"
    ./target/release/ferry-bench --dir /tmp --json-out '$PWD/bench/out/alt-ferry-'\$i.json rdma \
        --size-mib 256 --piece-mib $piece --rounds 1 --window 2 --queue-pairs 2 --register-mib 64 |
        grep -E 'into memory|into store|ib_write_bw -s'
    echo \"=== round \$i: mooncake\"
    .mooncake-venv/bin/python scripts/mooncake_te.py --size-mib 256 --block-mib $piece --in-flight 4 \
        --rounds 1 2>&1 | grep -E '\"summary\"'
done"

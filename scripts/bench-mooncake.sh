#!/usr/bin/env bash
# Benchmarks Mooncake Transfer Engine's RDMA transport in the soft-RoCE VM, for comparison with
# `ferry-bench rdma` in the same kind of run. Creates a Python venv at .mooncake-venv (if it is
# missing) with the PyPI package mooncake-transfer-engine-non-cuda, then boots the VM with
# scripts/rxe-vm.sh (the host filesystem, venv included, is visible there read-only) and runs
# scripts/mooncake_te.py in it: target engine on rxe0, initiator engine on rxe1, memory-to-
# memory writes. Arguments go to the driver (--size-mib, --block-mib, --in-flight, --rounds).
#
#   scripts/bench-mooncake.sh [--size-mib N] [--block-mib N] [--in-flight N] [--rounds N]
#
# Mooncake settings (override from the environment): MC_GID_INDEX (default: the VM's RoCE v2
# IPv4 GID index), MC_WORKERS_PER_CTX=1, MC_TRANSFER_TIMEOUT=600. VM memory: MOONCAKE_VM_MEM
# (default 3072 MiB). Prints the driver's JSON lines (one per round, then a median summary).
set -euo pipefail
cd "$(dirname "$0")/.."
venv=.mooncake-venv
if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c 'import mooncake.engine' 2>/dev/null; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q mooncake-transfer-engine-non-cuda
fi
export MC_WORKERS_PER_CTX=${MC_WORKERS_PER_CTX:-1}
export MC_TRANSFER_TIMEOUT=${MC_TRANSFER_TIMEOUT:-600}
[ -z "${MC_GID_INDEX:-}" ] || export MC_GID_INDEX
args=$(printf ' %q' "$@")
exec ./scripts/rxe-vm.sh --mem "${MOONCAKE_VM_MEM:-3072}" --timeout "${MOONCAKE_VM_TIMEOUT:-600}" -- \
    bash -c "set -o pipefail; export MC_GID_INDEX=\${MC_GID_INDEX:-\$FERRY_RXE_GID_INDEX}; \
        echo \"mooncake env: MC_GID_INDEX=\$MC_GID_INDEX MC_WORKERS_PER_CTX=\$MC_WORKERS_PER_CTX MC_TRANSFER_TIMEOUT=\$MC_TRANSFER_TIMEOUT\"; \
        $venv/bin/python scripts/mooncake_te.py$args 2>&1 | grep --line-buffered -v '^[IW][0-9]'"

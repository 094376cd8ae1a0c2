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
# The stock dfdaemon the interop tests run beside Ferry (tests/tests/stock_dfdaemon.rs): built
# once into a cache dir (about 28 minutes on 2 cores on a fresh machine), then reused.
echo "== stock dfdaemon (scripts/dfdaemon.sh)"
FERRY_DFDAEMON_BIN=$(./scripts/dfdaemon.sh)
export FERRY_DFDAEMON_BIN
echo "== cargo test"
log=$(mktemp)
trap 'rm -f "$log"' EXIT
cargo test --workspace --locked 2>&1 | tee "$log"

echo "== fuzzing every network decoder and the config parser, 20 s each"; ./scripts/fuzz.sh 20

# The RDMA tests need two soft-RoCE devices. A kernel with rdma_rxe could run them directly;
# this machine's (and CI's) has no RDMA at all, so they run inside a throwaway VM whose kernel
# has rxe (scripts/rxe-vm.sh), on test binaries built here.
echo "== RDMA tests on soft-RoCE (in a VM)"
test_binary() { # package test-target
    cargo test -p "$1" --test "$2" --no-run --locked --message-format=json 2>/dev/null |
        python3 -c 'import json,sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == sys.argv[1]:
        print(m["executable"])' "$2"
}
verbs=$(test_binary ferry-rdma rxe_verbs)
daemons=$(test_binary ferry-tests rdma)
rails=$(test_binary ferry-tests rails)
# The guest mounts a fresh /tmp: a checkout under /tmp must be shared into it explicitly.
share=()
case "$PWD" in /tmp/*) share=(--rw "$PWD") ;; esac
# 6 GiB: split over two NUMA nodes, with the 100-pieces test's two 640 MiB pools and its
# 400 MiB files (source, store copies, output) on the guest's tmpfs, 4 GiB looked short:
# once registration ran at 3.8 s/GiB instead of 0.05 and a queue pair failed mid-test
# (memory pressure is the likely cause, not a proven one).
./scripts/rxe-vm.sh --mem 6144 --timeout 1800 --rails 2 --numa 2 "${share[@]}" -- sh -c \
    "$verbs --ignored --test-threads 1 --color never && $daemons --ignored --test-threads 1 --color never && $rails --ignored --test-threads 1 --color never" 2>&1 | tee -a "$log"
# One closing line for the whole run (cargo prints one per test binary, the last being the
# doc tests). The tests the first pass ignored are the RDMA ones, which the VM pass ran.
awk '/^test result:/ { p += $4; f += $6 } END { printf "tests: %d passed, %d failed\n", p, f }' "$log"

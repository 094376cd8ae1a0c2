#!/usr/bin/env bash
# README command 1: Ferry's main job on a built-in default.
# Builds Ferry (release), starts a seed daemon and a receiving daemon on loopback, makes a
# 1 GiB file, imports it into the seed, pulls it through the receiver, checks the copy is
# byte-identical, prints the throughput, then stops both daemons and removes everything.
#   SIZE_MIB=4096 ./scripts/demo.sh     # another size
set -euo pipefail
cd "$(dirname "$0")/.."
size_mib=${SIZE_MIB:-1024}

./scripts/setup.sh
echo "== building (release)"
cargo build --release --quiet -p ferry-engine
ferry=$PWD/target/release/ferry

work=$(mktemp -d "${TMPDIR:-/tmp}/ferry-demo.XXXXXX")
mkdir "$work/in" # the only directory the daemons may import from
mkdir "$work/out" # the only directory transfers may place outputs in
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

start_daemon() { # name
    "$ferry" --control "$work/$1.sock" serve --data-dir "$work/$1" --listen 127.0.0.1:0 --import-dir "$work/in" --output-dir "$work/out" \
        2>"$work/$1.log" &
    pids+=($!)
    for _ in $(seq 100); do
        "$ferry" --control "$work/$1.sock" devices >/dev/null 2>&1 && return 0
        sleep 0.1
    done
    echo "daemon $1 did not start:" >&2
    cat "$work/$1.log" >&2
    exit 1
}

data_address() { # name
    "$ferry" --control "$work/$1.sock" --json devices | sed -n 's/.*"data_address":"\([^"]*\)".*/\1/p'
}

echo "== starting a seed and a receiver on loopback"
start_daemon seed
start_daemon receiver
seed_address=$(data_address seed)
"$ferry" --control "$work/receiver.sock" devices

echo "== writing a ${size_mib} MiB file of random bytes"
head -c "$((size_mib * 1024 * 1024))" /dev/urandom >"$work/in/model.bin"

echo "== importing it into the seed"
start=$(date +%s.%N)
task=$("$ferry" --control "$work/seed.sock" --json import "$work/in/model.bin" |
    sed -n 's/.*"task_id":"\([0-9a-f]\{64\}\)".*/\1/p')
echo "task $task imported in $(echo "$(date +%s.%N) - $start" | bc) s"

echo "== pulling it through the receiver from $seed_address"
"$ferry" --control "$work/receiver.sock" pull --task "$task" --from "$seed_address" --output "$work/out/copy.bin"

echo "== checking the copy"
cmp "$work/in/model.bin" "$work/out/copy.bin"
echo "byte-identical: $(stat -c %s "$work/out/copy.bin") bytes"

#!/usr/bin/env bash
# Builds Dragonfly's stock dfdaemon (the dragonfly-client crate, the version pinned below) into a
# cache directory once, and prints the directory holding its binaries (dfdaemon, dfget, ...).
# tests/tests/stock_dfdaemon.rs runs it as a real peer beside Ferry.
#
#   ./scripts/dfdaemon.sh            # build if missing, print the bin dir
#   FERRY_DFDAEMON_CACHE=DIR ./scripts/dfdaemon.sh
#
# The build takes about 28 minutes on 2 cores (it needs protoc, libclang, cmake and pkg-config,
# which scripts/setup.sh installs). A finished build is marked by a stamp file, so an interrupted
# one is never taken for complete; concurrent callers wait on a lock instead of building twice.
set -euo pipefail

version=1.5.10
cache=${FERRY_DFDAEMON_CACHE:-/var/tmp/ferry-dfdaemon}
root=$cache/dragonfly-client-$version
mkdir -p "$cache"

exec 9>"$cache/build.lock"
flock 9

if [ ! -f "$root/.complete" ]; then
    rm -rf "$root" "$root.partial"
    echo "== building stock dfdaemon (dragonfly-client $version) into $root; about 28 min on 2 cores" >&2
    start=$(date +%s)
    # The stock build sets tokio_unstable (its console and runtime metrics need it).
    RUSTFLAGS="--cfg tokio_unstable" CARGO_TARGET_DIR="$cache/target" \
        nice -n 10 cargo install dragonfly-client --version "$version" --locked \
        --root "$root.partial" --bins >&2
    mv "$root.partial" "$root"
    # The build tree is only needed to resume an interrupted build.
    rm -rf "$cache/target"
    touch "$root/.complete"
    echo "== stock dfdaemon built in $(($(date +%s) - start)) s" >&2
fi
echo "$root/bin"

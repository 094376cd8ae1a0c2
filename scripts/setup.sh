#!/usr/bin/env bash
# Installs what building and testing Ferry needs and this machine lacks. Idempotent.
#   EXTRA_PACKAGES="iperf3 fio" ./scripts/setup.sh   # also the benchmark baselines
set -euo pipefail

need=()
command -v cc >/dev/null || need+=(gcc)
command -v c++ >/dev/null || need+=(g++) # libFuzzer, built by the fuzz targets (scripts/fuzz.sh)
command -v bc >/dev/null || need+=(bc)
command -v cmp >/dev/null || need+=(diffutils)
command -v mount >/dev/null || need+=(mount)
# tests/tests/reflink.rs imports onto an XFS with reflinks made on a loop device.
command -v mkfs.xfs >/dev/null || need+=(xfsprogs)
# tests/tests/service.rs checks scripts/ferry.service with systemd-analyze (no running
# systemd needed).
command -v systemd-analyze >/dev/null || need+=(systemd)
# rdma-mummy-sys builds its libibverbs shim with cmake and generates bindings with libclang.
command -v cmake >/dev/null || need+=(cmake)
# dragonfly-api (the Dragonfly peer, engine/src/dragonfly/) compiles its protos with protoc.
command -v protoc >/dev/null || need+=(protobuf-compiler)
# tests/tests/model.rs runs a real OCI registry (CNCF distribution 2.8) on loopback, one
# instance with htpasswd (bcrypt) basic auth.
command -v docker-registry >/dev/null || need+=(docker-registry)
command -v htpasswd >/dev/null || need+=(apache2-utils)
dpkg-query -W -f='${Status}' libclang-dev 2>/dev/null | grep -q "ok installed" || need+=(libclang-dev)
for pkg in ${EXTRA_PACKAGES:-}; do
    command -v "$pkg" >/dev/null || need+=("$pkg")
done
if [ ${#need[@]} -gt 0 ]; then
    echo "== installing ${need[*]}"
    sudo=""
    [ "$(id -u)" = 0 ] || sudo=sudo
    export DEBIAN_FRONTEND=noninteractive
    $sudo apt-get update -qq
    $sudo apt-get install -y -qq "${need[@]}" >/dev/null
fi

# The package enables a system registry on :5000; the tests start their own on loopback.
if command -v systemctl >/dev/null && systemctl is-enabled docker-registry >/dev/null 2>&1; then
    ${sudo:-} systemctl disable --now docker-registry >/dev/null 2>&1 || true
fi

if ! command -v cargo >/dev/null; then
    echo "cargo is missing: install a Rust toolchain (1.85 or newer) first" >&2
    exit 1
fi
for component in rustfmt clippy; do
    if ! cargo "${component/rustfmt/fmt}" --version >/dev/null 2>&1; then
        rustup component add "$component"
    fi
done

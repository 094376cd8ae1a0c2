#!/usr/bin/env bash
# Makes a soft-RoCE (rdma_rxe) device on an ordinary Linux host whose kernel has rdma_rxe, so
# Ferry can use RDMA verbs over a plain Ethernet NIC. (For kernels without RDMA, e.g. CI
# sandboxes, use scripts/rxe-vm.sh instead.) Idempotent; needs root (uses sudo otherwise).
#
#   scripts/rxe-setup.sh [--name NAME] [NETDEV]   # create NAME (default rxe0) on NETDEV
#   scripts/rxe-setup.sh --remove [--name NAME]   # delete it again
#
# NETDEV defaults to the interface of the default route, else the first one that is up and
# not loopback. Prints `rdma link`, `ibv_devices` and the device's RoCE v2 IPv4 GID indexes.
# The device does not survive a reboot.
set -euo pipefail

usage() {
    sed -n '6,7p' "$0" | sed 's/^#   /usage: /' >&2
    exit 2
}

name=rxe0
remove=0
dev=""
while [ $# -gt 0 ]; do
    case "$1" in
        --remove) remove=1; shift ;;
        --name) name=${2:?--name needs a device name}; shift 2 ;;
        -h | --help) usage ;;
        -*) echo "rxe-setup: unknown option $1" >&2; usage ;;
        *) [ -z "$dev" ] || usage; dev=$1; shift ;;
    esac
done
[ "$remove" = 0 ] || [ -z "$dev" ] || usage

sudo=""
[ "$(id -u)" = 0 ] || sudo=sudo
log() { echo "rxe-setup: $*" >&2; }

# Userspace: libibverbs with the rxe provider, ibv_devices (ibverbs-utils), perftest for
# ib_write_bw, and iproute2 for `rdma`.
need=()
for pkg in rdma-core libibverbs1 ibverbs-providers ibverbs-utils perftest iproute2; do
    [ "$(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null || true)" = "install ok installed" ] ||
        need+=("$pkg")
done
if [ ${#need[@]} -gt 0 ]; then
    if ! command -v apt-get >/dev/null; then
        log "install these (or your distribution's equivalents) first: ${need[*]}"
        exit 1
    fi
    log "installing ${need[*]}"
    export DEBIAN_FRONTEND=noninteractive
    $sudo apt-get update -qq
    $sudo apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

# `rdma link show` lines look like: link rxe0/1 state ACTIVE physical_state LINK_UP netdev eth0
netdev_of() { # RXE -> its netdev, empty if there is no such device
    { rdma link show 2>/dev/null || true; } |
        awk -v n="$1" '$2 ~ "^" n "/" { for (i = 3; i < NF; i++) if ($i == "netdev") print $(i + 1) }'
}
rxe_on() { # NETDEV -> name of an rxe device already on it, if any
    { rdma link show 2>/dev/null || true; } |
        awk -v d="$1" '{ for (i = 3; i < NF; i++) if ($i == "netdev" && $(i + 1) == d) { sub("/.*", "", $2); print $2 } }'
}

v4_gids() { # RXE -> "INDEX A.B.C.D" for each RoCE v2 IPv4 GID (::ffff:A.B.C.D)
    local p=/sys/class/infiniband/$1/ports/1 i=0 g t
    while [ -e "$p/gids/$i" ]; do
        if read -r g <"$p/gids/$i" 2>/dev/null && [ "${g:0:29}" = "0000:0000:0000:0000:0000:ffff" ] &&
            read -r t <"$p/gid_attrs/types/$i" 2>/dev/null && [ "$t" = "RoCE v2" ]; then
            printf '%s %d.%d.%d.%d\n' "$i" "0x${g:30:2}" "0x${g:32:2}" "0x${g:35:2}" "0x${g:37:2}"
        fi
        i=$((i + 1))
    done
}

show() {
    echo "== rdma link"
    rdma link show
    echo "== ibv_devices"
    ibv_devices
    # The index is what `ib_write_bw -x` and Ferry's GID index setting want.
    echo "== RoCE v2 IPv4 GIDs (device, GID index, address)"
    local d
    for d in /sys/class/infiniband/*; do
        [ -e "$d/ports/1/gids/0" ] || continue
        v4_gids "${d##*/}" | sed "s|^|${d##*/} |"
    done
}

if [ "$remove" = 1 ]; then
    if [ -n "$(netdev_of "$name")" ]; then
        $sudo rdma link delete "$name"
        log "removed $name"
    else
        log "no $name: nothing to remove"
    fi
    exit 0
fi

current=$(netdev_of "$name")
if [ -z "$dev" ] && [ -n "$current" ]; then
    dev=$current # no NETDEV asked for: the existing device is as good as any
fi
if [ -z "$dev" ]; then
    dev=$(ip -o route show default 2>/dev/null | awk '{ for (i = 1; i < NF; i++) if ($i == "dev") { print $(i + 1); exit } }')
fi
if [ -z "$dev" ]; then
    dev=$(ip -o link show up | awk -F': ' '$2 != "lo" { sub("@.*", "", $2); print $2; exit }')
fi
[ -n "$dev" ] || { log "no network interface is up; name one: scripts/rxe-setup.sh NETDEV"; exit 1; }
[ -e "/sys/class/net/$dev" ] || { log "no network interface $dev"; exit 1; }

# rdma_rxe pulls in ib_core and ib_uverbs; crc32_generic because rxe needs a "crc32" crypto
# driver and cannot add a link without one; rdma_ucm for rdma_cm users. Skip modprobe when
# already loaded (or built in), so this also works where modprobe is missing.
if [ ! -d /sys/module/rdma_rxe ]; then
    command -v modprobe >/dev/null || PATH=$PATH:/sbin:/usr/sbin
    command -v modprobe >/dev/null || { log "modprobe is missing (Debian package kmod)"; exit 1; }
    if ! $sudo modprobe rdma_rxe; then
        log "this kernel has no rdma_rxe module; scripts/rxe-vm.sh runs commands in a VM that has"
        exit 1
    fi
fi
for m in crc32_generic ib_uverbs rdma_ucm; do
    [ -d "/sys/module/$m" ] || $sudo modprobe -q "$m" 2>/dev/null || true
done

other=$(rxe_on "$dev")
if [ -n "$current" ] && [ "$current" != "$dev" ]; then
    log "$name already exists on $current, not $dev; run with --remove first"
    exit 1
elif [ -n "$current" ]; then
    log "$name already on $dev"
elif [ -n "$other" ]; then
    # The kernel allows one rxe device per netdev (rdma-core's udev rules may have made one).
    log "$dev already carries rxe device $other; use that one (or remove it: rdma link delete $other)"
else
    $sudo rdma link add "$name" type rxe netdev "$dev"
    log "created $name on $dev"
    # The IPv4 GIDs appear asynchronously, shortly after the link.
    if [ -n "$(ip -4 -o addr show dev "$dev")" ]; then
        for _ in $(seq 50); do
            [ -z "$(v4_gids "$name")" ] || break
            sleep 0.1
        done
    fi
fi
show

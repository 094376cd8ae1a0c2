#!/usr/bin/env bash
# Runs one command inside a throwaway VM that has two soft-RoCE (rdma_rxe) devices, rxe0 and
# rxe1, which really talk to each other. For hosts whose kernel has no RDMA (e.g. CI
# sandboxes): QEMU under software emulation boots Debian's 6.1 kernel from a tiny busybox
# initramfs, which mounts this host's root filesystem read-only over 9p and chroots into it,
# so host-built binaries run there with the host's libraries.
#
#   scripts/rxe-vm.sh [--mem MiB] [--timeout SECS] [--rails N] [--numa N] [--disk MiB] [--rw DIR]... [--verbose] -- COMMAND [ARGS...]
#
# Inside the VM the command runs as root in the current directory, with this environment
# plus FERRY_RXE_ADDR0=10.77.0.1 FERRY_RXE_ADDR1=10.77.0.2 FERRY_RXE_DEV0=rxe0
# FERRY_RXE_DEV1=rxe1 and FERRY_RXE_GID_INDEX (the RoCE v2 IPv4 GID index on both devices;
# FERRY_RXE_GIDS lists it for every device, rxe0 first, comma-separated).
# --rails N (1-4, default 1) makes N veth pairs, rail k joining "host A" (rxe<2k> on
# veth<2k>, 10.77.k.1) to "host B" (rxe<2k+1> on veth<2k+1>, 10.77.k.2); rails do not reach
# each other. FERRY_RXE_RAILS=N, FERRY_RXE_A_DEVS/FERRY_RXE_B_DEVS (comma-separated devices)
# and FERRY_RXE_A_ADDRS/FERRY_RXE_B_ADDRS (their addresses, same order) describe them.
# --numa N (1 or 2, default 1) gives the VM N NUMA nodes (memory split evenly, one CPU each),
# FERRY_RXE_NUMA=N: rxe devices report no node, so tests name them (rdma.numa_nodes).
# The host filesystem is read-only there; /tmp, /run and /dev/shm are fresh tmpfs (lost at
# power-off); each --rw DIR (or FERRY_VM_RW=DIR:DIR...) is shared read-write at its own path.
# FERRY_RXE_DISK=/run/ferry-disk is an ext4 filesystem on a real (virtio) block device, so
# O_DIRECT works there, unlike on tmpfs: --disk MiB (default 512; 0: none) sizes its sparse
# image, made on the host per run (e2fsprogs) and deleted with the run dir.
# The command's stdout and stderr both arrive on this script's stdout; its exit status is
# this script's (124: timed out, 125: the VM itself failed). Idempotent; needs no stdin.
#
# Environment: FERRY_VM_CACHE (default /var/tmp/ferry-vm: kernel, initramfs, run dirs),
# FERRY_VM_KERNEL_PKG (e.g. linux-image-6.1.0-56-amd64; default: the cached one, else what
# linux-image-amd64 depends on), FERRY_VM_MEM, FERRY_VM_TIMEOUT, FERRY_VM_RAILS, FERRY_VM_RW,
# FERRY_VM_DISK_MIB, FERRY_VM_VERBOSE=1, FERRY_VM_KEEP=1 (keep the run dir, whose console.log
# has the whole serial console).
set -euo pipefail

usage() {
    sed -n '8p' "$0" | sed 's/^#   /usage: /' >&2
    exit 2
}

mem=${FERRY_VM_MEM:-2048}
timeout_s=${FERRY_VM_TIMEOUT:-1800}
verbose=${FERRY_VM_VERBOSE:-0}
rails=${FERRY_VM_RAILS:-1}
numa=${FERRY_VM_NUMA:-1}
disk_mib=${FERRY_VM_DISK_MIB:-512}
rw_dirs=()
if [ -n "${FERRY_VM_RW:-}" ]; then
    IFS=: read -r -a rw_dirs <<<"$FERRY_VM_RW"
fi
while [ $# -gt 0 ]; do
    case "$1" in
        --mem) mem=${2:?--mem needs MiB}; shift 2 ;;
        --timeout) timeout_s=${2:?--timeout needs seconds}; shift 2 ;;
        --rails) rails=${2:?--rails needs a count}; shift 2 ;;
        --numa) numa=${2:?--numa needs a count}; shift 2 ;;
        --disk) disk_mib=${2:?--disk needs MiB}; shift 2 ;;
        --rw) rw_dirs+=("${2:?--rw needs a directory}"); shift 2 ;;
        --verbose) verbose=1; shift ;;
        --) shift; break ;;
        -h | --help) usage ;;
        *) echo "rxe-vm: unknown option $1 (the command goes after --)" >&2; usage ;;
    esac
done
[ $# -gt 0 ] || usage
case "$mem$timeout_s$rails$numa$disk_mib" in
    *[!0-9]*) echo "rxe-vm: --mem, --timeout, --rails, --numa and --disk take integers" >&2; exit 2 ;;
esac
case "$numa" in 1 | 2) ;; *) echo "rxe-vm: --numa takes 1 or 2" >&2; exit 2 ;; esac
disk_mib=$((10#$disk_mib))
# Smaller than this, mkfs.ext4 leaves the journal out or fails.
[ "$disk_mib" = 0 ] || [ "$disk_mib" -ge 64 ] ||
    { echo "rxe-vm: --disk takes 0 or at least 64 (MiB)" >&2; exit 2; }
# Four rails are eight emulated devices on two emulated CPUs: more would only measure qemu.
[ "$rails" -ge 1 ] && [ "$rails" -le 4 ] || { echo "rxe-vm: --rails takes 1 to 4" >&2; exit 2; }

cache=${FERRY_VM_CACHE:-/var/tmp/ferry-vm}
mkdir -p "$cache"
log() { echo "rxe-vm: $*" >&2; }
now() { date +%s.%N; }
t_start=$(now)

# --- host packages -------------------------------------------------------------------------
# qemu to run the VM; the rest is what the command sees through the chroot: libibverbs with
# the rxe provider, ibv_devices (ibverbs-utils), perftest, and iproute2's `ip`/`rdma`, which
# the guest itself uses to make the veth pair and the rxe links (busybox `ip` can't do veth);
# e2fsprogs makes the test disk's filesystem here, on the host (faster than under emulation).
sudo=""
[ "$(id -u)" = 0 ] || sudo=sudo
export DEBIAN_FRONTEND=noninteractive
apt_updated=0
apt_update() {
    [ "$apt_updated" = 1 ] || $sudo apt-get update -qq
    apt_updated=1
}
need=()
pkgs=(qemu-system-x86 rdma-core ibverbs-providers libibverbs1 ibverbs-utils perftest iproute2)
[ "$disk_mib" = 0 ] || pkgs+=(e2fsprogs)
for pkg in "${pkgs[@]}"; do
    [ "$(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null || true)" = "install ok installed" ] ||
        need+=("$pkg")
done
if [ ${#need[@]} -gt 0 ]; then
    log "installing ${need[*]}"
    apt_update
    $sudo apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

# Fetches a Debian package into the cache without installing it (the VM kernel must not land
# in the host's /boot, and busybox-static conflicts with an installed busybox), keeping the
# .deb and one file from it. Built in a private dir and renamed into place, so concurrent
# runs sharing the cache never see half a download.
fetch_deb() { # PACKAGE PATH-IN-DEB DESTDIR NAME
    local tmp
    tmp=$(mktemp -d "$cache/fetch.XXXXXX")
    # As root into a root-owned dir: tell apt not to switch to _apt (it would only warn).
    if ! (cd "$tmp" && apt-get download -qq -o APT::Sandbox::User=root "$1" 2>/dev/null); then
        apt_update
        (cd "$tmp" && apt-get download -qq -o APT::Sandbox::User=root "$1")
    fi
    dpkg-deb -x "$tmp"/*.deb "$tmp/x"
    # shellcheck disable=SC2086 # $2 is a glob (vmlinuz-<version>)
    cp "$tmp"/x/$2 "$tmp/$4"
    rm -rf "$tmp/x"
    [ -f "$3/$4" ] || rm -rf "$3" # a leftover without the file
    mkdir -p "$(dirname "$3")"
    mv -T "$tmp" "$3" 2>/dev/null || rm -rf "$tmp" # lost a race: the other copy is as good
}

# --- kernel --------------------------------------------------------------------------------
# Debian 12's 6.1 kernel has rdma_rxe, veth and 9p as modules. Reuse a cached one so a run
# needs no network; delete the cache dir to move to a newer one.
kpkg=${FERRY_VM_KERNEL_PKG:-}
if [ -z "$kpkg" ]; then
    kpkg=$(find "$cache/kernel" -mindepth 2 -maxdepth 2 -name vmlinuz 2>/dev/null |
        awk -F/ '{ print $(NF-1) }' | sort -V | tail -n1 || true)
fi
if [ -z "$kpkg" ]; then
    resolve() {
        apt-cache depends linux-image-amd64 2>/dev/null |
            sed -n 's/^ *Depends: \(linux-image-6\.1\.[0-9.]*-[0-9]*-amd64\)$/\1/p' | head -n1
    }
    kpkg=$(resolve)
    if [ -z "$kpkg" ]; then apt_update; kpkg=$(resolve); fi
    if [ -z "$kpkg" ]; then # not Debian 12's meta package: take the newest 6.1 image
        kpkg=$(apt-cache search --names-only '^linux-image-6\.1\.[0-9.]*-[0-9]+-amd64$' |
            awk '{ print $1 }' | sort -V | tail -n1)
    fi
    [ -n "$kpkg" ] || { log "no linux-image-6.1.*-amd64 package found via apt"; exit 125; }
fi
kdir=$cache/kernel/$kpkg
if [ ! -f "$kdir/vmlinuz" ]; then
    log "fetching $kpkg"
    fetch_deb "$kpkg" 'boot/vmlinuz-*' "$kdir" vmlinuz # the modules come from the .deb later
fi
[ -f "$cache/busybox/busybox" ] || fetch_deb busybox-static bin/busybox "$cache/busybox" busybox

# --- initramfs -----------------------------------------------------------------------------
# PID 1 of the VM. Loads the modules, mounts the shares, sets the chroot up, runs the setup
# and the command there, reports the status and powers off.
read -r -d '' guest_init <<'INIT' || true
#!/bin/busybox sh
/bin/busybox mount -t proc proc /proc
/bin/busybox --install -s /bin
export PATH=/bin
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
verbose=0
grep -q 'ferry.verbose' /proc/cmdline && verbose=1
[ $verbose = 1 ] || echo 1 >/proc/sys/kernel/printk # keep kernel chatter off the console
say() { [ $verbose = 0 ] || echo "ferry-vm: $*"; }
halt_vm() { sync; poweroff -f; sleep 5; reboot -f; } # -no-reboot: either ends qemu
die() {
    echo "ferry-vm: $*"
    echo 125 >/ctl/status 2>/dev/null
    echo "FERRY_VM_EXIT=125 ${nonce:-}"
    halt_vm
}
say "loading modules"
while read -r m; do
    insmod "/modules/$m.ko" || die "insmod $m failed"
done </modules/order
opts=trans=virtio,version=9p2000.L,msize=262144
mkdir -p /ctl /host
mount -t 9p -o "$opts,cache=none" ferryctl /ctl || die "cannot mount the control share"
nonce=$(cat /ctl/nonce)
# Host root: read-only, and cached (nothing in the guest writes it).
mount -t 9p -o "$opts,cache=loose,ro" hostroot /host || die "cannot mount the host root"
mount -t proc proc /host/proc
mount -t sysfs sysfs /host/sys
mount -t devtmpfs devtmpfs /host/dev # has /dev/infiniband/uverbs* once rxe is up
mkdir -p /host/dev/pts /host/dev/shm
mount -t devpts devpts /host/dev/pts
mount -t tmpfs -o mode=1777 tmpfs /host/dev/shm
mount -t tmpfs -o mode=1777 tmpfs /host/tmp
mount -t tmpfs -o mode=755 tmpfs /host/run
mkdir -p /host/run/lock /host/run/ferry-vm
# The test disk (virtio, so /dev/vda: 9p shares are not block devices), with its modules
# loaded only when a disk is attached.
if [ "$(cat /ctl/disk)" != 0 ]; then
    say "mounting the test disk"
    while read -r m; do
        insmod "/modules/$m.ko" || die "insmod $m failed"
    done </modules/disk-order
    i=0
    while [ ! -b /dev/vda ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
    mkdir -p /host/run/ferry-disk
    mount -t ext4 -o noatime /dev/vda /host/run/ferry-disk || die "cannot mount the test disk"
    chmod 1777 /host/run/ferry-disk
    echo /run/ferry-disk >/host/run/ferry-vm/disk
fi
# Writable shares at their host paths (after the tmpfs mounts, so they may lie under /tmp);
# cache=mmap keeps writes going straight to the host.
while read -r tag path; do
    mkdir -p "/host$path"
    mount -t 9p -o "$opts,cache=mmap" "$tag" "/host$path" || die "cannot mount $path"
done </ctl/rw
cp /ferry/setup.sh /ferry/run.sh /ctl/args /ctl/env /ctl/cwd /ctl/interactive /ctl/rails /host/run/ferry-vm/
say "setting up veth and rxe"
chroot /host /bin/bash /run/ferry-vm/setup.sh || die "network/rxe setup failed"
echo # the firmware leaves escape sequences on the line; the host matches the nonce anyway
echo "FERRY_VM_BEGIN $nonce uptime=$(cut -d' ' -f1 /proc/uptime)"
if [ "$(cat /ctl/interactive)" = 1 ]; then
    chroot /host /bin/bash /run/ferry-vm/run.sh
else
    chroot /host /bin/bash /run/ferry-vm/run.sh </dev/null
fi
status=$?
echo "$status" >/ctl/status
sync
echo "FERRY_VM_EXIT=$status $nonce uptime=$(cut -d' ' -f1 /proc/uptime)"
halt_vm
INIT

# Runs in the chroot (host tools): two rxe devices over a veth pair in the initial network
# namespace (rxe in 6.1 works only there). Both addresses are local, so by default the
# kernel would send their traffic through `lo`, which rxe ignores; policy rules ahead of the
# `local` table send each address's packets out of its own veth end instead, and
# accept_local/rp_filter let the other end accept a packet from a local source address.
read -r -d '' guest_setup <<'SETUP' || true
set -euo pipefail
# Each exec of a host binary costs ~0.1 s under emulation: batch `ip`, use builtins elsewhere.
# Rail k: veth<2k> (10.77.k.1, host A's rxe<2k>) to veth<2k+1> (10.77.k.2, host B's rxe<2k+1>).
read -r rails </run/ferry-vm/rails
conf=/proc/sys/net/ipv4/conf
links="link set lo up"
for ((k = 0; k < rails; k++)); do
    links+=$'\n'"link add veth$((2 * k)) type veth peer name veth$((2 * k + 1))"
done
ip -batch - <<<"$links"
for c in all default; do
    echo 0 >"$conf/$c/rp_filter"
    echo 1 >"$conf/$c/accept_local"
done
# Each rail is its own /24 (what rail matching keys on, as on a rail-optimised fabric).
# Rules 100+ sit before the local table (moved from 0 to 1000) and match only packets sent
# from this machine (iif lo); arriving packets still meet the local table and are taken in.
# Static neighbours: no ARP between two local addresses to go wrong. No rule joins two
# rails, so a packet from one rail to another's address goes to `lo` and rxe drops it, as
# on separate rail subnets.
routes=$'rule add pref 1000 lookup local\nrule del pref 0 lookup local'
for ((k = 0; k < rails; k++)); do
    a=veth$((2 * k)) b=veth$((2 * k + 1)) aa=10.77.$k.1 ba=10.77.$k.2
    for c in $a $b; do
        echo 0 >"$conf/$c/rp_filter"
        echo 1 >"$conf/$c/accept_local"
    done
    read -r mac_a </sys/class/net/$a/address
    read -r mac_b </sys/class/net/$b/address
    ta=$((100 + 2 * k)) tb=$((101 + 2 * k))
    routes+="
addr add $aa/24 dev $a
addr add $ba/24 dev $b
link set $a up
link set $b up
rule add pref $ta iif lo from $aa to $ba lookup $ta
rule add pref $tb iif lo from $ba to $aa lookup $tb
route add $ba/32 dev $a src $aa table $ta
route add $aa/32 dev $b src $ba table $tb
neigh replace $ba lladdr $mac_b dev $a nud permanent
neigh replace $aa lladdr $mac_a dev $b nud permanent"
done
ip -batch - <<<"$routes"
for ((i = 0; i < 2 * rails; i++)); do
    rdma link add rxe$i type rxe netdev veth$i
done
# The GID table fills in asynchronously: wait for each device's RoCE v2 IPv4 GID.
gid_index() { # DEV ADDR -> lowest index holding ::ffff:ADDR with type RoCE v2
    local want p i=0 g t
    want=$(printf '0000:0000:0000:0000:0000:ffff:%02x%02x:%02x%02x' ${2//./ })
    p=/sys/class/infiniband/$1/ports/1
    while [ -e "$p/gids/$i" ]; do
        if read -r g <"$p/gids/$i" 2>/dev/null && [ "$g" = "$want" ] &&
            read -r t <"$p/gid_attrs/types/$i" 2>/dev/null && [ "$t" = "RoCE v2" ]; then
            echo "$i"
            return 0
        fi
        i=$((i + 1))
    done
    return 1
}
gids=()
for _ in {1..100}; do
    gids=()
    for ((i = 0; i < 2 * rails; i++)); do
        g=$(gid_index rxe$i "10.77.$((i / 2)).$((i % 2 + 1))" || true)
        [ -n "$g" ] || break
        gids+=("$g")
    done
    [ ${#gids[@]} = $((2 * rails)) ] && break
    sleep 0.1
done
if [ ${#gids[@]} != $((2 * rails)) ]; then
    echo "ferry-vm: no RoCE v2 IPv4 GID on every rxe device (have ${#gids[@]} of $((2 * rails)))"
    exit 1
fi
echo "${gids[*]}" >/run/ferry-vm/gids
SETUP
# Runs in the chroot: the caller's environment, directory and command, exactly as given.
read -r -d '' guest_run <<'RUN' || true
d=/run/ferry-vm
while IFS= read -r -d '' kv; do
    case "${kv%%=*}" in PWD | OLDPWD | SHLVL | _ | TMPDIR) continue ;; esac
    export "$kv" 2>/dev/null || true # skips readonly names and exported functions
done <"$d/env"
read -r -a gids <"$d/gids"
read -r rails <"$d/rails"
export FERRY_RXE_ADDR0=10.77.0.1 FERRY_RXE_ADDR1=10.77.0.2
export FERRY_RXE_DEV0=rxe0 FERRY_RXE_DEV1=rxe1
export FERRY_RXE_GID_INDEX=${gids[0]} FERRY_RXE_GID_INDEX0=${gids[0]} FERRY_RXE_GID_INDEX1=${gids[1]}
export FERRY_RXE_GIDS=$(IFS=,; echo "${gids[*]}")
a_devs="" b_devs="" a_addrs="" b_addrs=""
for ((k = 0; k < rails; k++)); do
    a_devs+=${a_devs:+,}rxe$((2 * k)) b_devs+=${b_devs:+,}rxe$((2 * k + 1))
    a_addrs+=${a_addrs:+,}10.77.$k.1 b_addrs+=${b_addrs:+,}10.77.$k.2
done
export FERRY_RXE_RAILS=$rails FERRY_RXE_A_DEVS=$a_devs FERRY_RXE_B_DEVS=$b_devs
export FERRY_RXE_A_ADDRS=$a_addrs FERRY_RXE_B_ADDRS=$b_addrs
nodes=(/sys/devices/system/node/node[0-9]*)
export FERRY_RXE_NUMA=${#nodes[@]}
[ ! -f "$d/disk" ] || export FERRY_RXE_DISK="$(<"$d/disk")"
cd "$(<"$d/cwd")" || exit 125
mapfile -d '' -t args <"$d/args"
exec "${args[@]}"
RUN

# Modules to load; dependencies are added from each .ko's own modinfo and loaded first.
# crc32_generic: rxe asks the crypto API for "crc32" and cannot add a link without it.
want_modules="crc32_generic veth virtio_pci 9pnet_virtio 9p rdma_rxe ib_uverbs rdma_ucm"
# The test disk's, loaded after those: ext4 asks the crypto API for "crc32c" (a soft
# dependency modinfo does not list as one).
disk_modules="virtio_blk crc32c_generic ext4"
bb_deb=$(basename "$cache"/busybox/*.deb)
key=$(printf '%s\n' "$guest_init" "$guest_setup" "$guest_run" "$want_modules" "$disk_modules" \
    "$kpkg" "$bb_deb" |
    sha256sum | cut -c1-12)
initrd=$cache/initramfs-$kpkg-$key.cpio.gz
if [ ! -f "$initrd" ]; then
    log "building $(basename "$initrd")"
    stage=$(mktemp -d "$cache/initramfs.XXXXXX")
    mkdir -p "$stage/x" "$stage/root"/{bin,modules,ferry,proc,sys,dev}
    dpkg-deb -x "$kdir"/*.deb "$stage/x"
    declare -A ko=() seen=()
    while IFS= read -r f; do
        n=${f##*/}
        n=${n%.ko}
        ko[${n//-/_}]=$f
    done < <(find "$stage/x/lib/modules" -name '*.ko')
    order=()
    add_module() { # depth-first, so dependencies come first
        local m=${1//-/_} deps d
        [ -z "${seen[$m]:-}" ] || return 0
        seen[$m]=1
        [ -n "${ko[$m]:-}" ] || { log "module $m missing from $kpkg"; exit 125; }
        deps=$(tr '\0' '\n' <"${ko[$m]}" | sed -n 's/^depends=//p' | head -n1)
        for d in ${deps//,/ }; do add_module "$d"; done
        cp "${ko[$m]}" "$stage/root/modules/$m.ko"
        order+=("$m")
    }
    for m in $want_modules; do add_module "$m"; done
    base=${#order[@]}
    for m in $disk_modules; do add_module "$m"; done
    printf '%s\n' "${order[@]:0:base}" >"$stage/root/modules/order"
    printf '%s\n' "${order[@]:base}" >"$stage/root/modules/disk-order"
    cp "$cache/busybox/busybox" "$stage/root/bin/busybox"
    printf '%s\n' "$guest_init" >"$stage/root/init"
    printf '%s\n' "$guest_setup" >"$stage/root/ferry/setup.sh"
    printf '%s\n' "$guest_run" >"$stage/root/ferry/run.sh"
    chmod 755 "$stage/root/init"
    (cd "$stage/root" && find . | "$cache/busybox/busybox" cpio -o -H newc 2>/dev/null) |
        gzip -1 >"$stage/initrd"
    mv "$stage/initrd" "$initrd"
    # Older builds: leave ones a concurrent run may be about to boot.
    find "$cache" -maxdepth 1 -name 'initramfs-*.cpio.gz' ! -name "${initrd##*/}" -mmin +60 -delete
    rm -rf "$stage"
fi

# --- run -----------------------------------------------------------------------------------
# A per-run control share carries the command in (NUL-separated, so any quoting survives)
# and the exit status out.
ctl=$(mktemp -d "$cache/run.XXXXXX")
# FERRY_VM_KEEP=1 keeps it (console.log holds the whole serial console) for debugging.
[ "${FERRY_VM_KEEP:-0}" = 1 ] || trap 'rm -rf "$ctl"' EXIT
printf '%s\0' "$@" >"$ctl/args"
env -0 >"$ctl/env"
printf '%s\n' "$PWD" >"$ctl/cwd"
nonce=$(od -An -N8 -tx1 /dev/urandom | tr -d ' \n')
echo "$nonce" >"$ctl/nonce"
interactive=0
[ -t 0 ] && interactive=1
echo "$interactive" >"$ctl/interactive"
echo "$rails" >"$ctl/rails"
echo "$disk_mib" >"$ctl/disk"
shares=(
    -virtfs "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap"
    -virtfs "local,path=$ctl,mount_tag=ferryctl,security_model=none,multidevs=remap"
)
: >"$ctl/rw"
i=0
for dir in "${rw_dirs[@]}"; do
    [ -n "$dir" ] || continue
    mkdir -p "$dir"
    dir=$(realpath "$dir")
    case "$dir" in *[[:space:]]*) log "--rw paths may not contain whitespace: $dir"; exit 2 ;; esac
    shares+=(-virtfs "local,path=$dir,mount_tag=ferryrw$i,security_model=none,multidevs=remap")
    echo "ferryrw$i $dir" >>"$ctl/rw"
    i=$((i + 1))
done
# The test disk: a sparse image in the run dir (gone with it), 4 KiB blocks, its inode
# tables and journal written here so the guest has no lazy init to do under emulation.
# cache=unsafe: a throwaway disk whose flushes need not reach the host's disk; the guest
# still sees a real block device (O_DIRECT, its own page cache to drop).
disk=()
if [ "$disk_mib" != 0 ]; then
    truncate -s "${disk_mib}M" "$ctl/disk.img"
    # mkfs.ext4 lives in /usr/sbin, which a user's PATH may lack.
    PATH=$PATH:/usr/sbin:/sbin mkfs.ext4 -F -q -b 4096 -m 0 -L ferry-disk \
        -E lazy_itable_init=0,lazy_journal_init=0 "$ctl/disk.img" ||
        { log "mkfs.ext4 of the test disk failed"; exit 125; }
    disk=(-drive "file=$ctl/disk.img,if=virtio,format=raw,cache=unsafe")
fi
append="console=ttyS0 panic=-1 rdinit=/init"
[ "$verbose" = 1 ] && append+=" ferry.verbose" || append+=" quiet loglevel=1"

# -cpu max: host-built binaries and libraries may use instructions qemu64 lacks.
# -nic none: the guest gets no route anywhere; it only talks to itself over the veth pair.
numa_args=()
if [ "$numa" = 2 ]; then
    half=$((mem / 2))
    numa_args=(-object "memory-backend-ram,id=node0,size=${half}M"
        -object "memory-backend-ram,id=node1,size=$((mem - half))M"
        -numa node,nodeid=0,cpus=0,memdev=node0 -numa node,nodeid=1,cpus=1,memdev=node1)
fi
qemu=(qemu-system-x86_64 -accel tcg -cpu max -smp 2 -m "$mem" "${numa_args[@]}" -nographic
    -no-reboot -nic none -kernel "$kdir/vmlinuz" -initrd "$initrd" -append "$append"
    "${shares[@]}" "${disk[@]}")
console=$ctl/console.log
# Show only the command's output (between the markers) unless --verbose; the full console
# goes to console.log for when the VM itself fails.
if [ "$verbose" = 1 ]; then
    filter=(cat)
else
    # The serial line ends lines with \r\n: drop the \r (a terminal adds its own).
    filter=(sed -un "/FERRY_VM_BEGIN $nonce/,/FERRY_VM_EXIT=[0-9]* $nonce/{/FERRY_VM_BEGIN $nonce/d;/FERRY_VM_EXIT=[0-9]* $nonce/d;s/\r\$//;p}")
fi
stdin=/dev/null
if [ "$interactive" = 1 ]; then # basic interactive use; qemu sets the terminal raw
    stdin=/dev/stdin
    trap 'stty sane 2>/dev/null || true; [ "${FERRY_VM_KEEP:-0}" = 1 ] || rm -rf "$ctl"' EXIT
fi
set +e
timeout --foreground -k 10 "$timeout_s" "${qemu[@]}" <"$stdin" | tee "$console" | "${filter[@]}"
rc=("${PIPESTATUS[@]}")
set -e
total=$(awk -v a="$t_start" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }')
boot=$(sed -n "s/.*FERRY_VM_BEGIN $nonce uptime=\([0-9.]*\).*/\1/p" "$console")
if [ "${rc[0]}" = 124 ] || [ "${rc[0]}" = 137 ]; then
    log "timed out after ${timeout_s}s (qemu killed)"
    exit 124
fi
if [ ! -f "$ctl/status" ] || [ -z "$boot" ]; then
    log "the VM failed before or while starting the command (qemu exit ${rc[0]}); console tail:"
    tail -n 40 "$console" | tr -d '\r' >&2
    exit 125
fi
status=$(cat "$ctl/status")
log "exit status $status (guest boot ${boot:-?}s, total ${total}s)"
exit "$status"

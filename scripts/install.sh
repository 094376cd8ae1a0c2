#!/usr/bin/env bash
# Installs Ferry as a systemd service:
#   <prefix>/bin/ferry                     the release binary (prefix: /usr/local)
#   /etc/systemd/system/ferry.service      scripts/ferry.service, ExecStart pointing at it
#   /etc/ferry/ferry.toml                  engine/ferry.example.toml for /var/lib/ferry; an
#                                          existing one is never overwritten
# then reloads systemd and prints how to start it.
#
#   sudo ./scripts/install.sh
#   ./scripts/install.sh --destdir /tmp/root              # stage everything under /tmp/root
#   ./scripts/install.sh --prefix /opt/ferry --binary target/release/ferry
#
# --destdir DIR (or DESTDIR=DIR) puts every file under DIR, as packagers expect, and leaves
# the running system alone (no daemon-reload); --binary PATH installs that binary instead
# of building one.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)

prefix=/usr/local
destdir=${DESTDIR:-}
binary=
usage() {
    sed -n '2,16s/^# \{0,1\}//p' "$0"
    exit "${1:-0}"
}
while [ $# -gt 0 ]; do
    case "$1" in
        --prefix) prefix=${2:?--prefix needs a directory}; shift 2 ;;
        --prefix=*) prefix=${1#*=}; shift ;;
        --destdir) destdir=${2:?--destdir needs a directory}; shift 2 ;;
        --destdir=*) destdir=${1#*=}; shift ;;
        --binary) binary=${2:?--binary needs a path}; shift 2 ;;
        --binary=*) binary=${1#*=}; shift ;;
        -h|--help) usage 0 ;;
        *) echo "install.sh: unknown argument $1" >&2; usage 2 >&2 ;;
    esac
done
case "$prefix" in
    /*) ;;
    *) echo "install.sh: --prefix must be absolute (it is written into the unit): $prefix" >&2; exit 2 ;;
esac
prefix=${prefix%/}
# Paths given are relative to where the script was run from.
[ -z "$binary" ] || binary=$(realpath -m "$binary")
if [ -n "$destdir" ]; then
    destdir=$(realpath -m "$destdir")
elif [ "$(id -u)" != 0 ]; then
    echo "install.sh: installing into / needs root (or stage with --destdir DIR)" >&2
    exit 1
fi
cd "$repo"

if [ -z "$binary" ]; then
    echo "== building the release binary"
    cargo build --release --locked -p ferry-engine --bin ferry
    binary=target/release/ferry
fi
[ -x "$binary" ] || { echo "install.sh: $binary is not an executable" >&2; exit 1; }

bin_path=$prefix/bin/ferry
unit_path=/etc/systemd/system/ferry.service
config_path=/etc/ferry/ferry.toml

install -D -m 0755 "$binary" "$destdir$bin_path"
echo "installed $destdir$bin_path"

# The unit names /usr/local/bin/ferry; point it at this prefix.
unit=$(mktemp)
trap 'rm -f "$unit"' EXIT
sed "s#^ExecStart=/usr/local/bin/ferry #ExecStart=$bin_path #" scripts/ferry.service >"$unit"
grep -q "^ExecStart=$bin_path serve --config $config_path\$" "$unit" ||
    { echo "install.sh: scripts/ferry.service has an unexpected ExecStart" >&2; exit 1; }
install -D -m 0644 "$unit" "$destdir$unit_path"
echo "installed $destdir$unit_path"

# The service's state and control socket live where systemd makes them (StateDirectory=,
# RuntimeDirectory=): pin those two keys whatever the example's defaults are.
if [ -e "$destdir$config_path" ]; then
    echo "kept the existing $destdir$config_path (the example is engine/ferry.example.toml)"
else
    sed -e "s#^\\(data_dir = \\)\"[^\"]*\"#\\1\"/var/lib/ferry\"#" \
        -e "s#^\\(control = \\)\"[^\"]*\"#\\1\"/run/ferry/control.sock\"#" \
        -e "s#^\\# \`ferry serve --config ferry.toml\`#\\# Read by the ferry service (\`ferry serve --config $config_path\`)#" \
        engine/ferry.example.toml >"$unit"
    "$destdir$bin_path" config --config "$unit" >/dev/null ||
        { echo "install.sh: the generated configuration does not validate" >&2; exit 1; }
    install -D -m 0644 "$unit" "$destdir$config_path"
    echo "installed $destdir$config_path"
fi

if [ -n "$destdir" ]; then
    echo "staged under $destdir; nothing on this system was changed"
elif [ -d /run/systemd/system ]; then
    systemctl daemon-reload
    echo "reloaded systemd"
else
    echo "systemd is not running here: run 'systemctl daemon-reload' on the target system"
fi
cat <<EOF

To start Ferry now and at every boot:
    systemctl enable --now ferry
    systemctl status ferry; journalctl -u ferry -f; $bin_path devices
Settings are in $config_path; to see what the daemon will run with:
    $bin_path config --config $config_path
With no output_dirs (as installed) 'ferry pull' keeps tasks in the store and no output is
placed; to place files, set output_dirs = ["/models"] in $config_path, make it (and any
data_dir outside /var/lib/ferry) writable for the service: 'systemctl edit ferry', then
[Service] ReadWritePaths=/models, and restart; then 'ferry pull --output' or 'ferry export'.
Outputs are mode 0644 (output.mode); output.owner/group also need CapabilityBoundingSet=CAP_IPC_LOCK CAP_CHOWN there.
EOF

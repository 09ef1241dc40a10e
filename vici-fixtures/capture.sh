#!/bin/bash
# Regenerates the VICI fixtures from real charon-systemd daemons (run as root).
#
#   vici-fixtures/capture.sh [OUT_DIR]      (default: vici-fixtures/sessions)
#
# Two network namespaces made here (nothing else is touched), a veth pair
# 192.168.77.1 <-> 192.168.77.2, one charon-systemd per namespace started with
# charon-conf/strongswan-libipsec.conf (kernel-libipsec: this kernel may have no
# ESP). Each scenario is ONE VICI session from vici_client.py through
# vici_proxy.py to host A's charon; the proxy writes
#   OUT_DIR/<NN-scenario>.c2s.bin  client -> charon bytes, as on the wire
#   OUT_DIR/<NN-scenario>.s2c.bin  charon -> client bytes, as on the wire
#   OUT_DIR/<NN-scenario>.txt      decoded, in arrival order
# The last scenario restarts host A with charon-conf/strongswan-netlink.conf to
# record the CHILD_SA failure of a kernel without ESP (skipped if the kernel has ESP).
# Needs: charon-systemd, libcharon-extra-plugins (kernel-libipsec), iproute2, python3.
# Run-specific values in the output: SPIs, unique ids, timestamps, uptimes, kernel
# release, and the throwaway PSK in load-shared (vici_client.py).
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)
out=${1:-$here/sessions}
[ "$(id -u)" = 0 ] || { echo "capture.sh: needs root (network namespaces)" >&2; exit 1; }
for t in /usr/sbin/charon-systemd python3 ip; do
    command -v "$t" >/dev/null || { echo "capture.sh: missing $t" >&2; exit 1; }
done

work=$(mktemp -d /tmp/vici-capture.XXXXXX)
nsa=vfx-a-$$
nsb=vfx-b-$$
declare -A pid=()

cleanup() {
    set +e
    for h in "${!pid[@]}"; do stop_charon "$h"; done
    ip netns del "$nsa" 2>/dev/null
    ip netns del "$nsb" 2>/dev/null
    rm -rf "$work"
}
trap cleanup EXIT

# start_charon a|b CONF
start_charon() {
    local h=$1 conf=$2 ns
    [ "$h" = a ] && ns=$nsa || ns=$nsb
    rm -f "$work/$h.vici"
    cat > "$work/$h.conf" <<EOC
include $conf
charon {
    plugins { vici { socket = unix://$work/$h.vici } }
    filelog { ipsec-mesh { path = $work/$h.log } }
}
EOC
    STRONGSWAN_CONF=$work/$h.conf setsid ip netns exec "$ns" /usr/sbin/charon-systemd \
        >>"$work/$h.out" 2>&1 &
    pid[$h]=$!
    for _ in $(seq 300); do [ -S "$work/$h.vici" ] && return 0; sleep 0.01; done
    echo "charon $h did not open its VICI socket; log:" >&2
    cat "$work/$h.log" "$work/$h.out" >&2
    exit 1
}

stop_charon() {
    local h=$1 p=${pid[$1]:-}
    [ -n "$p" ] || return 0
    kill "$p" 2>/dev/null || true
    for _ in $(seq 300); do kill -0 "$p" 2>/dev/null || break; sleep 0.01; done
    kill -9 "$p" 2>/dev/null || true
    unset "pid[$h]"
    rm -f "$work/$h.vici"
}

client() { (cd "$here" && python3 vici_client.py "$@"); }

# cap NN-name SCENARIO: one recorded session against host A
cap() {
    local label=$1 sc=$2 ppid
    rm -f "$out/$label".*
    (cd "$here" && exec python3 vici_proxy.py "$work/proxy.sock" "$work/a.vici" "$out/$label") &
    ppid=$!
    for _ in $(seq 300); do [ -S "$work/proxy.sock" ] && break; sleep 0.01; done
    echo "== $label" >&2
    client "$sc" "$work/proxy.sock" "$work/a.vici"
    wait "$ppid"
}

ip netns add "$nsa"
ip netns add "$nsb"
ip link add name va netns "$nsa" type veth peer name vb netns "$nsb"
ip -n "$nsa" addr add 192.168.77.1/24 dev va
ip -n "$nsb" addr add 192.168.77.2/24 dev vb
for ns in "$nsa" "$nsb"; do ip -n "$ns" link set lo up; done
ip -n "$nsa" link set va up
ip -n "$nsb" link set vb up
# one "container subnet" address per host, to check the tunnel carries traffic
ip -n "$nsa" addr add 10.42.1.1/24 dev lo
ip -n "$nsb" addr add 10.42.2.1/24 dev lo

mkdir -p "$out"
rm -f "$out"/*.bin "$out"/*.txt
dpkg-query -W -f '${Package} ${Version}\n' charon-systemd > "$out/VERSION" 2>/dev/null \
    || /usr/sbin/charon-systemd --version > "$out/VERSION" 2>&1 || true

start_charon a "$root/charon-conf/strongswan-libipsec.conf"
start_charon b "$root/charon-conf/strongswan-libipsec.conf"
client setup "$work/b.vici" b

cap 01-version version
cap 02-stats stats
cap 03-get-shared-empty get-shared
cap 04-load-shared load-shared
cap 05-get-shared get-shared
cap 06-load-conn load-conn
cap 07-get-conns get-conns
cap 08-list-conns list-conns
cap 09-initiate initiate
if command -v ping >/dev/null; then
    echo "== tunnel check: ping 10.42.1.1 -> 10.42.2.1 through ipsec0" >&2
    ip netns exec "$nsa" ping -c 1 -W 2 -I 10.42.1.1 10.42.2.1 >&2
fi
cap 10-list-sas list-sas
cap 11-terminate terminate
cap 12-error-initiate-unknown-child initiate-unknown-child
cap 13-error-unload-conn-unknown unload-conn-unknown
cap 14-cmd-unknown cmd-unknown
cap 15-event-unknown event-unknown
cap 16-monitor-updown monitor-updown
cap 17-rekey-events rekey-events
cap 18-unload-conn unload-conn
cap 19-unload-shared unload-shared
cap 20-error-load-conn-bad-proposal load-conn-bad-proposal

# kernel-netlink on host A: without kernel ESP the CHILD_SA cannot be installed
stop_charon a
if ip netns exec "$nsa" ip xfrm state add src 192.0.2.1 dst 192.0.2.2 proto esp spi 0x100 \
        mode tunnel enc 'cbc(aes)' 0x00112233445566778899aabbccddeeff \
        auth-trunc 'hmac(sha256)' 0x00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff 128 \
        2>/dev/null; then
    echo "== kernel has ESP: skipping 21-error-initiate-no-kernel-esp" >&2
else
    start_charon a "$root/charon-conf/strongswan-netlink.conf"
    client setup "$work/a.vici" a
    cap 21-error-initiate-no-kernel-esp initiate-no-kernel-esp
fi
echo "fixtures in $out:" >&2
ls -l "$out" >&2

#!/usr/bin/env bash
# See ipsec-mesh work on one machine: 3 hosts, each with a container, as network namespaces;
# the real sidecar (`ipsec-mesh run`) on every host; the mesh's status and container pings
# across hosts; then everything is torn down again.
#
#   sudo integration/demo.sh [--driver auto|charon|xfrm|vxlan] [--keep] [--timeout SECS]
#   sudo integration/demo.sh --clean
#
#   --driver auto    (default) xfrm if this kernel can hold ESP SAs (probed in a throwaway
#                    namespace), else charon
#   --driver charon  charon-systemd per host with kernel-libipsec (ESP in userspace, in UDP
#                    4500), driven over VICI by `ipsec-mesh run --driver charon`
#   --driver xfrm    kernel ESP SAs and policies installed by ipsec-mesh itself (IKE-less,
#                    keys derived from a PSK); needs a kernel with CONFIG_INET_ESP
#   --driver vxlan   VXLAN between the hosts (not encrypted)
#   --keep           leave the mesh running until Enter (or end of input) or Ctrl-C
#   --timeout SECS   how long to wait for the mesh to come up (default 60)
#   --clean          remove what demo runs killed with SIGKILL left behind (namespaces
#                    imdemo<pid>-* and temp dirs of runs whose process is gone), then exit
#
# Needs root (network namespaces), iproute2, ping; for the charon driver charon-systemd and
# kernel-libipsec: integration/setup.sh installs them. Builds target/debug/ipsec-mesh with
# `cargo build --locked` unless IPSEC_MESH_BIN names a binary. Underlay 192.0.2.0/24
# (RFC 5737 documentation range) and containers 10.42.N.0/24 exist only inside the namespaces
# this run creates, all named imdemo<pid>-*; no traffic leaves them. Exit 0 iff the mesh came
# up and every ping got its replies.
set -uo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
top=$(cd "$here/.." && pwd)

usage() { # usage [EXIT_CODE]: 0 prints to stdout (--help), else to stderr
    if [ "${1:-2}" -eq 0 ]; then
        sed -n '6,20s/^# \{0,1\}//p' "${BASH_SOURCE[0]}"
    else
        sed -n '6,20s/^# \{0,1\}//p' "${BASH_SOURCE[0]}" >&2
    fi
    exit "${1:-2}"
}
say() { printf '\n==> %s\n' "$*"; }
info() { printf 'demo: %s\n' "$*"; }
err() { printf 'demo: error: %s\n' "$*" >&2; }
die() {
    err "$*"
    exit 1
}

driver=auto
keep=0
timeout=60
clean=0
while [ $# -gt 0 ]; do
    case "$1" in
        --driver)
            [ $# -ge 2 ] || usage
            driver=$2
            shift 2
            ;;
        --driver=*)
            driver=${1#--driver=}
            shift
            ;;
        --keep)
            keep=1
            shift
            ;;
        --timeout)
            [ $# -ge 2 ] || usage
            timeout=$2
            shift 2
            ;;
        --clean)
            clean=1
            shift
            ;;
        -h | --help) usage 0 ;;
        *)
            err "unknown argument: $1"
            usage
            ;;
    esac
done
case "$driver" in
    auto | charon | xfrm | vxlan) ;;
    *)
        err "--driver: \"$driver\" is not one of auto, charon, xfrm, vxlan"
        usage
        ;;
esac
case "$timeout" in
    '' | *[!0-9]*)
        err "--timeout: \"$timeout\" is not a number of seconds"
        usage
        ;;
esac

[ "$(id -u)" -eq 0 ] ||
    die "needs root (it creates network namespaces): run it as root, e.g. sudo $0${*:+ $*}"

# --- tools ---------------------------------------------------------------------------------
need() { # need PROGRAM PACKAGE
    command -v "$1" >/dev/null 2>&1 ||
        die "$1 is missing (Debian package $2): run integration/setup.sh as root"
}
need ip iproute2
need ping iputils-ping

PREFIX="imdemo$$-"
TMPROOT=${TMPDIR:-/tmp}
CHARON=/usr/sbin/charon-systemd
LIBIPSEC=/usr/lib/ipsec/plugins/libstrongswan-kernel-libipsec.so

# Whether process $1 is a running demo.sh.
demo_alive() {
    [ -r "/proc/$1/cmdline" ] && tr '\0' ' ' <"/proc/$1/cmdline" | grep -q 'demo\.sh'
}

# Whether process $1 is running (a zombie, exited but not yet reaped, is not).
alive() {
    local st
    st=$(sed 's/.*) //; s/ .*//' "/proc/$1/stat" 2>/dev/null) || return 1
    [ -n "$st" ] && [ "$st" != Z ]
}

# Kill every process inside namespace $1, then delete it.
ns_purge() {
    local pids
    pids=$(ip netns pids "$1" 2>/dev/null)
    if [ -n "$pids" ]; then
        # shellcheck disable=SC2086 # one pid per word
        kill -KILL $pids 2>/dev/null
        sleep 0.2
    fi
    ip netns del "$1" 2>/dev/null
}

# --- --clean: leftovers of runs that were killed with SIGKILL --------------------------------
if [ "$clean" -eq 1 ]; then
    n=0
    for ns in $(ip netns list | awk '{print $1}' | grep -E '^imdemo[0-9]+-'); do
        pid=${ns#imdemo}
        pid=${pid%%-*}
        demo_alive "$pid" && continue
        ns_purge "$ns"
        info "removed namespace $ns"
        n=$((n + 1))
    done
    for d in "$TMPROOT"/imdemo[0-9]*.*; do
        [ -d "$d" ] || continue
        pid=${d##*/imdemo}
        pid=${pid%%.*}
        demo_alive "$pid" && continue
        rm -rf -- "$d"
        info "removed $d"
        n=$((n + 1))
    done
    info "$n leftovers removed"
    exit 0
fi

# --- the binary ----------------------------------------------------------------------------
if [ -n "${IPSEC_MESH_BIN:-}" ]; then
    BIN=$IPSEC_MESH_BIN
    [ -x "$BIN" ] || die "IPSEC_MESH_BIN=$BIN is not an executable"
else
    BIN="${CARGO_TARGET_DIR:-$top/target}/debug/ipsec-mesh"
    cargo=$(command -v cargo || true)
    as_user=()
    # Under sudo, build as the user who ran sudo (their cargo, their target dir's owner).
    if [ -n "${SUDO_USER:-}" ] && [ "$SUDO_USER" != root ]; then
        home=$(getent passwd "$SUDO_USER" | cut -d: -f6)
        [ -z "$cargo" ] && [ -x "$home/.cargo/bin/cargo" ] && cargo="$home/.cargo/bin/cargo"
        as_user=(runuser -u "$SUDO_USER" -- env "HOME=$home")
    fi
    if [ -n "$cargo" ]; then
        say "cargo build --locked (in $top${as_user:+, as $SUDO_USER})"
        (cd "$top" && "${as_user[@]}" "$cargo" build --locked --bin ipsec-mesh) ||
            die "cargo build --locked failed"
    elif [ ! -x "$BIN" ]; then
        die "cargo is not on PATH and $BIN does not exist: build it first (cargo build --locked) or set IPSEC_MESH_BIN"
    fi
    [ -x "$BIN" ] || die "$BIN missing after cargo build"
fi

# --- teardown (whatever happens from here on) ----------------------------------------------
NAMESPACES=()
PIDS=()      # every process started: sidecars first, then charons
PID_WHAT=()  # what each is, for messages
TMP=""
torn_down=0
# shellcheck disable=SC2317 # invoked by the EXIT trap
teardown() {
    local rc=$? i left ns
    trap '' INT TERM PIPE
    [ "$torn_down" -eq 1 ] && return
    torn_down=1
    say "tearing down"
    for i in "${!PIDS[@]}"; do
        kill -TERM "${PIDS[$i]}" 2>/dev/null
    done
    # charon needs 1-2 s after SIGTERM; SIGKILL what is still there after 5 s.
    for _ in $(seq 50); do
        left=0
        for i in "${!PIDS[@]}"; do
            alive "${PIDS[$i]}" && left=1
        done
        [ "$left" -eq 0 ] && break
        sleep 0.1
    done
    for i in "${!PIDS[@]}"; do
        if alive "${PIDS[$i]}"; then
            info "${PID_WHAT[$i]} (pid ${PIDS[$i]}) did not stop on SIGTERM: SIGKILL"
            kill -KILL "${PIDS[$i]}" 2>/dev/null
        fi
    done
    wait 2>/dev/null
    # Anything else still inside our namespaces (a ping, a process a sidecar started).
    for ((i = ${#NAMESPACES[@]} - 1; i >= 0; i--)); do
        ns_purge "${NAMESPACES[$i]}"
    done
    [ -n "$TMP" ] && rm -rf -- "$TMP"
    left=$(ip netns list | awk '{print $1}' | grep -c "^$PREFIX")
    if [ "$left" -ne 0 ]; then
        err "namespaces $PREFIX* still exist after teardown"
        [ "$rc" -eq 0 ] && rc=1
    else
        info "removed namespaces $PREFIX*, ${#PIDS[@]} processes and the temp dir"
    fi
    exit "$rc"
}
trap teardown EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
# Output into a closed pipe (`demo.sh | head`): stop, and still tear down.
trap 'exit 141' PIPE

# Our own leftovers (an earlier run with this pid that was killed with SIGKILL): remove them.
for ns in $(ip netns list | awk '{print $1}' | grep "^$PREFIX"); do
    info "removing a leftover of an earlier run with this pid: namespace $ns"
    ns_purge "$ns"
done
stale=$(ip netns list | awk '{print $1}' | grep -E '^imdemo[0-9]+-' | while read -r ns; do
    p=${ns#imdemo}
    demo_alive "${p%%-*}" || echo "$ns"
done | tr '\n' ' ')
[ -z "$stale" ] ||
    info "note: leftovers of earlier demo runs that were killed: ${stale}(not touched; integration/demo.sh --clean removes them)"

TMP=$(mktemp -d "$TMPROOT/imdemo$$.XXXXXX") || die "cannot create a temp dir in $TMPROOT"
info "namespaces $PREFIX*  temp dir $TMP"

# Run a command; on failure stop with the command and its error.
run() {
    local out
    out=$("$@" 2>&1) || die "\`$*\` failed: $out"
}

ns_add() {
    run ip netns add "$1"
    NAMESPACES+=("$1")
    run ip -n "$1" link set lo up
}

# --- the driver ----------------------------------------------------------------------------
# Whether this kernel can hold an ESP SA (CONFIG_INET_ESP), tried in a throwaway namespace.
kernel_has_esp() {
    local p="${PREFIX}probe" ok=1
    ns_add "$p"
    ip -n "$p" xfrm state add src 192.0.2.1 dst 192.0.2.2 proto esp spi 0x100 mode tunnel \
        enc 'cbc(aes)' 0x000102030405060708090a0b0c0d0e0f \
        auth-trunc 'hmac(sha256)' 0x000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f 128 \
        >/dev/null 2>&1 && ok=0
    ip netns del "$p"
    unset 'NAMESPACES[-1]'
    return $ok
}

if kernel_has_esp; then esp=1; else esp=0; fi
if [ "$driver" = auto ]; then
    if [ "$esp" -eq 1 ]; then driver=xfrm; else driver=charon; fi
    why="auto: this kernel $([ "$esp" -eq 1 ] && echo "holds ESP SAs" || echo "cannot hold ESP SAs (no CONFIG_INET_ESP): charon does ESP in userspace with kernel-libipsec")"
else
    why="chosen with --driver"
fi
if [ "$driver" = xfrm ] && [ "$esp" -eq 0 ]; then
    die "--driver xfrm: this kernel cannot hold ESP SAs: CONFIG_INET_ESP is missing; use --driver charon (ESP in userspace with kernel-libipsec) or --driver auto"
fi
if [ "$driver" = charon ]; then
    [ -x "$CHARON" ] ||
        die "$CHARON is missing (Debian package charon-systemd): run integration/setup.sh as root, or use --driver vxlan (not encrypted)"
    [ -e "$LIBIPSEC" ] ||
        die "$LIBIPSEC is missing (Debian package libcharon-extra-plugins): run integration/setup.sh as root"
fi
info "driver $driver ($why)"

# --- topology ------------------------------------------------------------------------------
#   ${PREFIX}sw          the underlay switch: bridge br0 (and counters of what crosses it)
#   ${PREFIX}a, b, c     hosts host-a..c: eth0 192.0.2.N/24 to the switch, container bridge
#                        cbr0 10.42.N.1/24, forwarding on; charon and the sidecar run here
#   ${PREFIX}ac, bc, cc  one container per host: eth0 10.42.N.2/24, default via 10.42.N.1
HOSTS="a b c"
num() { case "$1" in a) echo 1 ;; b) echo 2 ;; c) echo 3 ;; esac }
say "building 3 hosts with a container each (network namespaces $PREFIX*)"
SW="${PREFIX}sw"
ns_add "$SW"
run ip -n "$SW" link add br0 type bridge
run ip -n "$SW" link set br0 up
for h in $HOSTS; do
    n=$(num "$h")
    H="$PREFIX$h"
    C="$PREFIX${h}c"
    ns_add "$H"
    ns_add "$C"
    run ip -n "$H" link add eth0 type veth peer name "p$h" netns "$SW"
    run ip -n "$SW" link set "p$h" master br0 up
    run ip -n "$H" addr add "192.0.2.$n/24" dev eth0
    run ip -n "$H" link set eth0 up
    run ip -n "$H" link add cbr0 type bridge
    run ip -n "$H" addr add "10.42.$n.1/24" dev cbr0
    run ip -n "$H" link set cbr0 up
    run ip -n "$H" link add veth0 type veth peer name eth0 netns "$C"
    run ip -n "$H" link set veth0 master cbr0 up
    run ip -n "$C" addr add "10.42.$n.2/24" dev eth0
    run ip -n "$C" link set eth0 up
    run ip -n "$C" route add default via "10.42.$n.1"
    run ip netns exec "$H" sysctl -qw net.ipv4.ip_forward=1
    mkdir -p "$TMP/$h"
    info "host-$h: underlay 192.0.2.$n, container 10.42.$n.2 (namespaces $H, $C)"
done

# Counters on the switch: bridged packets pass iptables' FORWARD chain (br_netfilter), so what
# crossed between the hosts can be counted without tcpdump. Optional: skipped if unavailable.
counters=0
if command -v iptables >/dev/null 2>&1 &&
    ip netns exec "$SW" sysctl -qw net.bridge.bridge-nf-call-iptables=1 2>/dev/null; then
    counters=1
    for rule in "-p udp --dport 4500 -m comment --comment esp-in-udp" \
        "-p esp -m comment --comment esp" \
        "-p udp --dport 500 -m comment --comment ike" \
        "-p udp --dport 4789 -m comment --comment vxlan" \
        "-s 10.42.0.0/16 -m comment --comment plaintext-src" \
        "-d 10.42.0.0/16 -m comment --comment plaintext-dst"; do
        # shellcheck disable=SC2086 # the rule is words
        ip netns exec "$SW" iptables -w -A FORWARD $rule 2>/dev/null || counters=0
    done
fi
count() { # count COMMENT: packets the switch counted for that rule
    ip netns exec "$SW" iptables -w -L FORWARD -nvx 2>/dev/null |
        awk -v c="/* $1 */" 'index($0, c) { s += $1 } END { print s + 0 }'
}

# --- metadata, PSK, charons, sidecars ------------------------------------------------------
backend=ipsec
[ "$driver" = vxlan ] && backend=vxlan
cat >"$TMP/mesh.json" <<EOF
{
  "network": { "cidr": "10.42.0.0/16", "backend": "$backend", "mtu": 1500 },
  "hosts": [
    { "id": "host-a", "agent_ip": "192.0.2.1", "subnets": ["10.42.1.0/24"] },
    { "id": "host-b", "agent_ip": "192.0.2.2", "subnets": ["10.42.2.0/24"] },
    { "id": "host-c", "agent_ip": "192.0.2.3", "subnets": ["10.42.3.0/24"] }
  ]
}
EOF
(umask 077 && head -c 48 /dev/urandom | base64 >"$TMP/psk") || die "cannot write $TMP/psk"

started() { # started PID WHAT
    PIDS+=("$1")
    PID_WHAT+=("$2")
    info "started $2: pid $1"
}

if [ "$driver" = charon ]; then
    say "starting charon-systemd on each host (kernel-libipsec, config charon-conf/strongswan-libipsec.conf)"
    for h in $HOSTS; do
        # The documented override (charon-conf/README.md): own VICI socket and log per host.
        cat >"$TMP/$h/strongswan.conf" <<EOF
include $top/charon-conf/strongswan-libipsec.conf
charon {
  plugins { vici { socket = unix://$TMP/$h/charon.vici } }
  filelog { ipsec-mesh { path = $TMP/$h/charon.log } }
}
EOF
        STRONGSWAN_CONF="$TMP/$h/strongswan.conf" ip netns exec "$PREFIX$h" "$CHARON" \
            </dev/null >"$TMP/$h/charon.stderr" 2>&1 &
        started $! "charon-systemd on host-$h"
    done
fi

say "starting the sidecar \`ipsec-mesh run --driver $driver\` on each host"
for h in $HOSTS; do
    args=(run --metadata "$TMP/mesh.json" --host "host-$h" --driver "$driver"
        --listen "unix:$TMP/$h/status.sock" --resync 30)
    case "$driver" in
        charon) args+=(--psk-file "$TMP/psk" --vici-socket "$TMP/$h/charon.vici") ;;
        xfrm) args+=(--psk-file "$TMP/psk") ;;
    esac
    IPSEC_MESH_LOG=${IPSEC_MESH_LOG:-info} ip netns exec "$PREFIX$h" "$BIN" "${args[@]}" \
        </dev/null >"$TMP/$h/sidecar.log" 2>&1 &
    started $! "ipsec-mesh run on host-$h"
done

status() { "$BIN" status --listen "unix:$TMP/$1/status.sock" "${@:2}" 2>/dev/null; }
up_peers() { status "$1" --format json | grep -o '"state": *"up"' | wc -l; }
ping1() { ip netns exec "$PREFIX${1}c" ping -c 1 -W 1 "10.42.$(num "$2").2" >/dev/null 2>&1; }

show_logs() {
    local h
    for h in $HOSTS; do
        echo "--- host-$h: sidecar log (last lines)"
        tail -n 15 "$TMP/$h/sidecar.log" 2>/dev/null
        if [ -e "$TMP/$h/charon.log" ]; then
            echo "--- host-$h: charon log (last lines)"
            tail -n 15 "$TMP/$h/charon.log"
        fi
    done
}

say "waiting for the mesh (every peer up in every sidecar's status, every container pair pings; at most $timeout s)"
t0=$(date +%s.%N)
deadline=$(($(date +%s) + timeout))
next_note=$(($(date +%s) + 5))
while :; do
    ok=1
    for h in $HOSTS; do
        [ "$(up_peers "$h")" -eq 2 ] || { ok=0; break; }
    done
    if [ "$ok" -eq 1 ]; then
        for a in $HOSTS; do
            for b in $HOSTS; do
                [ "$a" = "$b" ] || ping1 "$a" "$b" || { ok=0; break 2; }
            done
        done
    fi
    [ "$ok" -eq 1 ] && break
    for i in "${!PIDS[@]}"; do
        alive "${PIDS[$i]}" || {
            show_logs
            die "${PID_WHAT[$i]} (pid ${PIDS[$i]}) exited"
        }
    done
    now=$(date +%s)
    if [ "$now" -ge "$next_note" ]; then
        info "still waiting: peers up per host: $(for h in $HOSTS; do printf 'host-%s %s/2  ' "$h" "$(up_peers "$h")"; done)"
        next_note=$((now + 5))
    fi
    if [ "$now" -ge "$deadline" ]; then
        for h in $HOSTS; do
            echo "--- ipsec-mesh status of host-$h"
            status "$h"
        done
        show_logs
        die "the mesh did not come up within $timeout s"
    fi
    sleep 0.3
done
info "mesh up $(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }') s after the sidecars started"

failed=0
for pair in "a b" "a c" "c b"; do
    read -r from to <<<"$pair"
    say "ping from host-$from's container (10.42.$(num "$from").2) to host-$to's container (10.42.$(num "$to").2)"
    ip netns exec "$PREFIX${from}c" ping -c 3 -i 0.2 -W 2 "10.42.$(num "$to").2" || failed=1
done

# The status table: the SA counters refresh every 5 s, so give them a moment to show the pings
# (VXLAN has no SAs to count).
if [ "$driver" != vxlan ]; then
    for _ in $(seq 30); do
        status a --format json | grep -q '"packets_in": *[1-9]' && break
        sleep 0.2
    done
fi
say "ipsec-mesh status --listen unix:$TMP/a/status.sock   (host-a)"
status a || { err "ipsec-mesh status failed"; failed=1; }

if [ "$counters" -eq 1 ]; then
    say "on the wire: what the switch between the hosts counted (iptables counters, no tcpdump)"
    plain=$(($(count plaintext-src) + $(count plaintext-dst)))
    case "$driver" in
        charon)
            printf '  ESP in UDP (port 4500):             %6d packets\n' "$(count esp-in-udp)"
            printf '  IKE (UDP 500):                      %6d packets\n' "$(count ike)"
            printf '  with a container address (10.42.*): %6d packets\n' "$plain"
            [ "$plain" -eq 0 ] && [ "$(count esp-in-udp)" -gt 0 ] &&
                echo "  => container traffic crossed between the hosts only inside ESP: encrypted"
            ;;
        xfrm)
            printf '  ESP (IP protocol 50):               %6d packets\n' "$(count esp)"
            printf '  with a container address (10.42.*): %6d packets\n' "$plain"
            [ "$plain" -eq 0 ] && [ "$(count esp)" -gt 0 ] &&
                echo "  => container traffic crossed between the hosts only inside ESP: encrypted"
            ;;
        vxlan)
            printf '  VXLAN (UDP 4789):                   %6d packets\n' "$(count vxlan)"
            echo "  => VXLAN carries the containers' packets unencrypted; the default driver encrypts"
            ;;
    esac
fi

if [ "$keep" -eq 1 ]; then
    say "the mesh keeps running; try e.g.:"
    echo "  ip netns exec ${PREFIX}ac ping 10.42.3.2"
    echo "  $BIN status --listen unix:$TMP/b/status.sock"
    [ "$driver" = charon ] && echo "  swanctl --list-sas --uri unix://$TMP/a/charon.vici"
    echo "press Enter (or Ctrl-C) to tear it down"
    read -r _ || true
fi

if [ "$failed" -ne 0 ]; then
    show_logs
    err "some pings failed"
    exit 1
fi
info "OK: 3 hosts, driver $driver, every container pair reaches the others"
exit 0

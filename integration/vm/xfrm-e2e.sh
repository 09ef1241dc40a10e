#!/bin/sh
# Runs INSIDE the test VM (busybox sh) as /test.sh: `ipsec-mesh apply --driver xfrm` end to
# end with real kernel ESP. Built into an initramfs by integration/vm/test-xfrm.sh.
#
# Topology (all network namespaces inside the VM; no traffic leaves it):
#   sw            bridge br0 = the underlay switch; br_netfilter + iptables FORWARD counters
#                 count every IPv4 packet crossing it: ESP vs. anything else ("plaintext")
#   h1 h2 h3      hosts: uN 192.168.77.N/24 (veth to br0), bridge cbr0 10.42.N.1/24,
#                 ip_forward=1; one metadata file (cidr 10.42.0.0/16) and one PSK
#   c1 c2 c3      containers: eth0 10.42.N.2/24 (veth to hN's cbr0), default via 10.42.N.1
#
# Checks (each prints "CHECK <name>: ok|FAIL ..."): apply on each host; the 6 ordered
# container pings; every SA (4 per host) counts packets; nothing but ESP on the underlay;
# a second apply writes nothing; h2's SAs flushed -> pings to/from c2 fail, c1<->c3 still
# work, no plaintext, h2's XFRM drop counters rise; apply on h2 -> all pings back, then a
# further apply writes nothing; cleanup (twice) leaves no policy/state of ours.
# "VM-RESULT: PASS" only if every check holds.
#
# Forwarding (mark chain, guard, ip rule, table 1042) must come from apply itself. Policy mode
# is asked for explicitly (`--xfrm-mode policy`): the default, auto, picks route mode on this
# kernel (it has xfrm_interface); route mode is e2e.mode=route (xfrm-e2e-route.sh).
set -u

IP=/sbin/ip # busybox sh would run its own `ip` applet (no xfrm) for a bare `ip`
IPT="iptables -w"
# e2e.mode=nftables: the image has nft and no iptables binaries at all (test-xfrm.sh builds
# it with build-initramfs.sh --nftables): the switch counts with nft, apply's default
# `--firewall auto` must pick its nftables backend (table inet ipsec-mesh, no x_tables), and
# the suite ends after cleanup (section 10).
FW=iptables
# e2e.fw=nftables: the same image for another mode (route: the one-interface route mode with
# the nftables backend beside its source-check table).
grep -qw -e e2e.mode=nftables -e e2e.fw=nftables /proc/cmdline && FW=nftables
BIN=/usr/bin/ipsec-mesh
META=/tmp/mesh.json
PSK=/tmp/mesh.psk
HOSTS="1 2 3"
MARK=0x100000/0x300000
RT_TABLE=1042
REQID_MIN=1342177280 # 0x50000000
REQID_MAX=1476395007 # 0x57ffffff

FAILED=""
t0=$(cut -d' ' -f1 /proc/uptime)
now() { cut -d' ' -f1 /proc/uptime; }
say() { echo "xfrm-e2e: [$(now)s] $*"; }
ok() { echo "CHECK $1: ok${2:+ ($2)}"; }
bad() {
    echo "CHECK $1: FAIL${2:+ ($2)}"
    FAILED="$FAILED $1"
}

dump_host() { # $1 = host number
    echo "----- h$1: ip -s xfrm state"
    $IP -n "h$1" -s xfrm state
    echo "----- h$1: ip xfrm policy"
    $IP -n "h$1" xfrm policy
    echo "----- h$1: ip rule / route (main, $RT_TABLE)"
    $IP -n "h$1" rule
    $IP -n "h$1" route
    $IP -n "h$1" route show table $RT_TABLE
    if [ "$FW" = nftables ]; then
        echo "----- h$1: nft list ruleset"
        $IP netns exec "h$1" nft list ruleset
    else
        echo "----- h$1: iptables-save"
        $IP netns exec "h$1" iptables-save
    fi
    echo "----- h$1: /proc/net/xfrm_stat (non-zero)"
    $IP netns exec "h$1" awk '$2 != 0' /proc/net/xfrm_stat
}
dumped=0
dump_all() {
    [ "$dumped" -eq 0 ] || return 0
    dumped=1
    for n in $HOSTS; do [ ! -e /run/netns/h$n ] || dump_host "$n"; done
    [ ! -e /run/netns/sw ] || { echo "----- sw: underlay counters"; sw_counters; }
}
abort() {
    bad "$1" "$2"
    dump_all
    echo "VM-RESULT: FAIL ($1)"
    exit 1
}

# --- 0. tools ----------------------------------------------------------------------------
[ -x $BIN ] || abort tools "$BIN missing from the initramfs"
if [ "$FW" = nftables ]; then
    # No iptables of any kind: the product must manage with nft alone.
    for t in iptables iptables-save iptables-restore ip6tables ip6tables-restore iptables-legacy \
        iptables-nft xtables-legacy-multi xtables-nft-multi; do
        ! command -v $t >/dev/null || abort tools "$t in an nftables-only image"
    done
    command -v nft >/dev/null || abort tools "nft missing (build-initramfs.sh --nftables)"
    say "$($BIN --version 2>&1), $(nft --version 2>&1), no iptables"
    # nft works in a netns with what our table uses: inet table, interval set, route chain,
    # meta mark arithmetic, rt ipsec missing.
    $IP netns add nftp || abort nftables "netns add"
    out=$($IP netns exec nftp sh -c 'printf "%s\n" "table inet probe {" \
        "set local { type ipv4_addr; flags interval; elements = { 10.99.1.0/24 } }" \
        "chain o { type route hook output priority mangle; ip daddr != @local ip daddr 10.99.0.0/16 meta mark set meta mark & 0xffcfffff | 0x00100000 counter; }" \
        "chain g { type filter hook output priority filter; meta mark & 0x00300000 == 0x00100000 ip daddr 10.99.0.0/16 rt ipsec missing counter drop; }" \
        "}" | nft -f - && nft list table inet probe' 2>&1)
    rc=$?
    if [ $rc -eq 0 ] && echo "$out" | grep -q 'rt ipsec missing counter packets 0 bytes 0 drop' &&
        echo "$out" | grep -q 'type route hook output priority mangle'; then
        ok nftables "nft -f: inet table, interval set, route chain, meta mark set, rt ipsec missing work"
    else
        echo "$out"
        abort nftables "nft probe failed (rc $rc)"
    fi
    $IP netns del nftp
fi
[ "$FW" = nftables ] || command -v iptables-restore >/dev/null || abort tools "iptables missing (build-initramfs.sh --iptables)"
[ "$FW" = nftables ] || say "$($BIN --version 2>&1), $(iptables -V 2>&1)"

# iptables-legacy works in a netns: iptables-restore --noflush -w, -m policy, -m mark, MARK.
if [ "$FW" = iptables ]; then
$IP netns add ipt || abort iptables "netns add"
out=$($IP netns exec ipt sh -c '
  printf "*mangle\n:PROBE-MARK - [0:0]\n-A PROBE-MARK -d 10.99.0.0/16 -j MARK --set-xmark 0x100000/0x300000\n-A OUTPUT -j PROBE-MARK\nCOMMIT\n*filter\n:PROBE-GUARD - [0:0]\n-A PROBE-GUARD -d 10.99.0.0/16 -m mark --mark 0x100000/0x300000 -m policy --dir out --pol none -j DROP\n-A OUTPUT -j PROBE-GUARD\nCOMMIT\n" |
    iptables-restore --noflush -w &&
  printf "*filter\n-A PROBE-GUARD -m policy --dir out --pol ipsec --proto esp -j RETURN\nCOMMIT\n" |
    iptables-restore --noflush -w &&
  iptables -w -A OUTPUT -m policy --dir out --pol ipsec -j ACCEPT &&
  iptables-save' 2>&1)
rc=$?
if [ $rc -eq 0 ] &&
    echo "$out" | grep -q -- '-A PROBE-MARK -d 10.99.0.0/16 -j MARK --set-xmark 0x100000/0x300000' &&
    echo "$out" | grep -q -- '-m policy --dir out --pol none -j DROP' &&
    echo "$out" | grep -q -- '-A PROBE-GUARD -m policy --dir out --pol ipsec --proto esp -j RETURN' &&
    echo "$out" | grep -q -- '-A OUTPUT -m policy --dir out --pol ipsec -j ACCEPT'; then
    ok iptables "iptables-restore --noflush -w, -m policy, -m mark, MARK work"
else
    echo "$out"
    abort iptables "iptables-legacy probe failed (rc $rc)"
fi
$IP netns del ipt
fi

# --- IPv6 (kernel command line e2e.mode=v6-u6 or e2e.mode=v6-u4; issue 18) -----------------
# xfrm-e2e-v6.sh (in the image beside this script), sourced: it builds its own topology (an
# IPv6 or IPv4 underlay, dual-stack containers) and ends the run.
case " $(cat /proc/cmdline) " in *" e2e.mode=v6-"*)
    [ -r /xfrm-e2e-v6.sh ] || abort v6 "/xfrm-e2e-v6.sh missing from the initramfs"
    . /xfrm-e2e-v6.sh ;;
esac

# --- 1. topology -------------------------------------------------------------------------
say "building topology"
for ns in sw h1 h2 h3 c1 c2 c3; do
    $IP netns add $ns || abort topology "netns add $ns"
    # No IPv6 anywhere: no DAD/RS/MLD chatter, and the underlay counters see IPv4 only.
    $IP netns exec $ns sh -c 'echo 1 >/proc/sys/net/ipv6/conf/all/disable_ipv6;
        echo 1 >/proc/sys/net/ipv6/conf/default/disable_ipv6' || abort topology "sysctl $ns"
done
$IP -batch - <<EOF || abort topology "veth pairs"
link add u1 netns h1 type veth peer name sw1 netns sw
link add u2 netns h2 type veth peer name sw2 netns sw
link add u3 netns h3 type veth peer name sw3 netns sw
link add vc1 netns h1 type veth peer name eth0 netns c1
link add vc2 netns h2 type veth peer name eth0 netns c2
link add vc3 netns h3 type veth peer name eth0 netns c3
EOF
$IP -n sw -batch - <<EOF || abort topology "switch"
link set lo up
link add br0 type bridge
link set br0 up
link set sw1 master br0
link set sw2 master br0
link set sw3 master br0
link set sw1 up
link set sw2 up
link set sw3 up
EOF
for n in $HOSTS; do
    $IP -n h$n -batch - <<EOF || abort topology "host h$n"
link set lo up
link set u$n up
addr add 192.168.77.$n/24 dev u$n
link add cbr0 type bridge
link set cbr0 up
addr add 10.42.$n.1/24 dev cbr0
link set vc$n master cbr0
link set vc$n up
EOF
    $IP -n c$n -batch - <<EOF || abort topology "container c$n"
link set lo up
link set eth0 up
addr add 10.42.$n.2/24 dev eth0
route add default via 10.42.$n.1
EOF
    $IP netns exec h$n sh -c 'echo 1 >/proc/sys/net/ipv4/ip_forward' || abort topology "ip_forward h$n"
done

# Underlay counters: br_netfilter hands bridged IPv4 to iptables FORWARD in netns sw (only
# there: the hosts' cbr0 opt out). e2e-esp counts ESP, e2e-plain everything else, e2e-overlay
# the non-ESP packets from or to container addresses.
for n in $HOSTS; do
    $IP netns exec h$n sh -c 'f=/proc/sys/net/bridge/bridge-nf-call-iptables; [ ! -e $f ] || echo 0 >$f'
done
sw_counters() {
    if [ "$FW" = nftables ]; then $IP netns exec sw nft list table ip e2e; else $IP netns exec sw $IPT -nvxL FORWARD; fi
}
if [ "$FW" = nftables ]; then
    # The same counters in an nft table of the switch (br_netfilter runs the ip family's
    # forward hook for bridged IPv4 as it runs iptables' FORWARD).
    $IP netns exec sw sh -c "echo 1 >/proc/sys/net/bridge/bridge-nf-call-iptables &&
        printf '%s\n' 'table ip e2e {' 'chain underlay { type filter hook forward priority filter;' \
            'ip protocol esp counter comment \"e2e-esp\"' 'ip protocol != esp counter comment \"e2e-plain\"' \
            'ip protocol != esp ip saddr 10.42.0.0/16 counter comment \"e2e-overlay\"' \
            'ip protocol != esp ip daddr 10.42.0.0/16 counter comment \"e2e-overlay\"' '}' '}' |
        nft -f -" || abort topology "underlay counters (br_netfilter loaded?)"
else
$IP netns exec sw sh -c "echo 1 >/proc/sys/net/bridge/bridge-nf-call-iptables &&
    printf '*filter\n-A FORWARD -p esp -m comment --comment e2e-esp\n-A FORWARD ! -p esp -m comment --comment e2e-plain\n-A FORWARD ! -p esp -s 10.42.0.0/16 -m comment --comment e2e-overlay\n-A FORWARD ! -p esp -d 10.42.0.0/16 -m comment --comment e2e-overlay\nCOMMIT\n' |
    iptables-restore --noflush -w" || abort topology "underlay counters (br_netfilter loaded?)"
fi
# underlay_count esp|plain|overlay -> packets counted so far
underlay_count() {
    if [ "$FW" = nftables ]; then
        $IP netns exec sw nft list table ip e2e | awk -v c="$1" 'index($0, "comment \"e2e-" c "\"") {
            for (i = 1; i < NF; i++) if ($i == "packets") n += $(i + 1) } END { print n + 0 }'
        return
    fi
    $IP netns exec sw $IPT -nvxL FORWARD | awk -v c="$1" '$0 ~ "/\\* e2e-" c " \\*/" { n += $1 } END { print n + 0 }'
}

# Warm-up: each host reaches the others on the underlay, each container its gateway.
warm=""
for n in $HOSTS; do
    for m in $HOSTS; do
        [ "$n" = "$m" ] && continue
        $IP netns exec h$n ping -c 1 -W 2 192.168.77.$m >/dev/null || warm="$warm h$n->h$m"
    done
    $IP netns exec c$n ping -c 1 -W 2 10.42.$n.1 >/dev/null || warm="$warm c$n->gw"
done
[ -z "$warm" ] || abort topology "underlay/bridge pings failed:$warm"
ok topology "3 hosts, 3 containers, switch; underlay pings ok"
plain_base=$(underlay_count plain) # the warm-up pings themselves (ICMP between hosts)

# ping_pairs "a>b ..." COUNT -> runs the pings in parallel; sets PING_OK / PING_FAILED
ping_pairs() {
    rm -f /tmp/ping.*
    pids=""
    for p in $1; do
        a=${p%>*} b=${p#*>}
        ($IP netns exec c$a ping -c "$2" -i 0.2 -W 2 -w 6 10.42.$b.2 >/tmp/ping.$a$b 2>&1
            echo $? >/tmp/ping.$a$b.rc) &
        pids="$pids $!"
    done
    # Only the pings: sidecars may be running in the background.
    # shellcheck disable=SC2086
    wait $pids
    PING_OK="" PING_FAILED=""
    for p in $1; do
        a=${p%>*} b=${p#*>}
        got=$(sed -n 's/.* \([0-9]*\) packets received.*/\1/p' /tmp/ping.$a$b)
        if [ "$(cat /tmp/ping.$a$b.rc)" = 0 ]; then
            PING_OK="$PING_OK c$a>c$b(${got:-?}/$2)"
        else
            PING_FAILED="$PING_FAILED c$a>c$b(${got:-?}/$2)"
        fi
    done
}
ALL_PAIRS="1>2 1>3 2>1 2>3 3>1 3>2"

# --- encrypted VXLAN (kernel command line e2e.mode=vxlan-esp) -----------------------------
# `apply --driver vxlan --vxlan-encrypt`: vtep1042 between the hosts, its UDP 4789 packets in
# ESP transport mode. Checks: every container pair pings; the underlay carries ESP and no
# plaintext VXLAN or container packets; second apply writes nothing; h2's SAs flushed ->
# c2 unreachable, nothing in clear; re-apply -> back; cleanup leaves nothing of ours.
if grep -qw e2e.mode=vxlan-esp /proc/cmdline; then
    cat >$META <<'EOF'
{
  "network": { "cidr": "10.42.0.0/16", "backend": "vxlan", "mtu": 1500 },
  "hosts": [
    { "id": "h1", "agent_ip": "192.168.77.1", "subnets": ["10.42.1.0/24"] },
    { "id": "h2", "agent_ip": "192.168.77.2", "subnets": ["10.42.2.0/24"] },
    { "id": "h3", "agent_ip": "192.168.77.3", "subnets": ["10.42.3.0/24"] }
  ]
}
EOF
    # Text (base64, one line), so the rotation checks can list the same secret in a key ring.
(umask 077 && head -c 48 /dev/urandom | base64 >$PSK)
    $IP netns exec sw $IPT -I FORWARD -p udp --dport 4789 -m comment --comment e2e-vxlan
    vx_apply() { # N -> sets VX_OUT; returns apply's status
        VX_OUT=$($IP netns exec h$1 $BIN apply --metadata $META --host h$1 --driver vxlan \
            --vxlan-encrypt --psk-file $PSK 2>&1)
    }
    for n in $HOSTS; do
        if vx_apply $n; then
            ok "vxesp-apply-h$n" "$(echo "$VX_OUT" | grep '^vxlan: host')"
        else
            echo "$VX_OUT" | sed "s/^/  h$n apply: /"
            abort "vxesp-apply-h$n" "apply failed"
        fi
    done
    ping_pairs "$ALL_PAIRS" 3
    if [ -z "$PING_FAILED" ]; then ok vxesp-ping-all "$PING_OK"; else bad vxesp-ping-all "failed:$PING_FAILED ok:$PING_OK"; dump_all; fi
    esp=$(underlay_count esp) vx=$(underlay_count vxlan) ov=$(underlay_count overlay)
    if [ "$esp" -gt 0 ] && [ "$vx" -eq 0 ] && [ "$ov" -eq 0 ]; then
        ok vxesp-underlay "$esp ESP packets, 0 plaintext VXLAN, 0 with container addresses"
    else
        bad vxesp-underlay "ESP $esp, plaintext VXLAN $vx, container addresses $ov"
    fi
    if $IP -n h1 xfrm state | grep -q 'mode transport' && $IP -n h1 link show vtep1042 | grep -q 'mtu 1413'; then
        ok vxesp-objects "transport-mode SAs, vtep1042 mtu 1413 (1500 - 50 - 37)"
    else
        bad vxesp-objects "$($IP -n h1 xfrm state | head -3; $IP -n h1 link show vtep1042)"
    fi
    for n in $HOSTS; do
        vx_apply $n
        if echo "$VX_OUT" | grep -q ': 2 peers, 0 writes, 0 errors'; then ok "vxesp-noop-h$n" "0 writes"; else bad "vxesp-noop-h$n" "$VX_OUT"; fi
    done
    $IP -n h2 xfrm state flush
    ping_pairs "1>2 3>2 2>1 2>3" 2
    fails=$PING_FAILED oks=$PING_OK
    ping_pairs "1>3 3>1" 2
    vx=$(underlay_count vxlan) ov=$(underlay_count overlay)
    if [ -z "$oks" ] && [ -z "$PING_FAILED" ] && [ "$vx" -eq 0 ] && [ "$ov" -eq 0 ]; then
        ok vxesp-no-sa "c2 unreachable ($fails), c1<->c3 fine, nothing in clear"
    else
        bad vxesp-no-sa "to/from c2 ok:$oks; c1<->c3 failed:$PING_FAILED; plaintext VXLAN $vx, container $ov"
    fi
    vx_apply 2 || bad vxesp-reapply "$VX_OUT"
    ping_pairs "$ALL_PAIRS" 3
    if [ -z "$PING_FAILED" ]; then ok vxesp-recovered "$PING_OK"; else bad vxesp-recovered "failed:$PING_FAILED"; dump_all; fi
    for n in $HOSTS; do
        out=$($IP netns exec h$n $BIN cleanup --driver vxlan --vxlan-encrypt 2>&1)
        rc=$?
        if [ $rc -eq 0 ] && ! $IP -n h$n link show vtep1042 >/dev/null 2>&1 &&
            ! $IP -n h$n xfrm policy | grep -q 'dport 4789' && [ -z "$($IP -n h$n xfrm state)" ]; then
            ok "vxesp-cleanup-h$n" "nothing of ours left"
        else
            bad "vxesp-cleanup-h$n" "exit $rc; $out"
        fi
    done
    say "done in $(awk -v a="$t0" -v b="$(now)" 'BEGIN{printf "%.1f", b-a}')s"
    if [ -n "$FAILED" ]; then
        echo "VM-RESULT: FAIL (vxlan-esp:$FAILED)"
        exit 1
    fi
    echo "VM-RESULT: PASS"
    exit 0
fi

# --- route mode (kernel command line e2e.mode=route) ---------------------------------------
# `apply --driver xfrm --xfrm-mode route`: xfrm-e2e-route.sh (in the image beside this
# script), sourced: it uses the topology and helpers above and ends the run.
if grep -qw e2e.mode=route /proc/cmdline; then
    [ -r /xfrm-e2e-route.sh ] || abort route "/xfrm-e2e-route.sh missing from the initramfs"
    . /xfrm-e2e-route.sh
fi

# --- 2. metadata, PSK, apply -------------------------------------------------------------
cat >$META <<'EOF'
{
  "network": { "cidr": "10.42.0.0/16", "backend": "ipsec", "mtu": 1500 },
  "hosts": [
    { "id": "h1", "agent_ip": "192.168.77.1", "subnets": ["10.42.1.0/24"] },
    { "id": "h2", "agent_ip": "192.168.77.2", "subnets": ["10.42.2.0/24"] },
    { "id": "h3", "agent_ip": "192.168.77.3", "subnets": ["10.42.3.0/24"] }
  ]
}
EOF
# Text (base64, no newline), so the rotation section can put the same secret in a key-ring line
# (a raw binary secret may hold a newline byte: a flaky ring).
(umask 077 && head -c 40 /dev/urandom | base64 | tr -d "\n" >$PSK)
chmod 600 $PSK

LAST_WRITES=""
# apply N -> runs apply in hN; sets LAST_WRITES; returns apply's exit status
apply() {
    out=$($IP netns exec h$1 $BIN apply --metadata $META --host h$1 --driver xfrm --xfrm-mode policy --psk-file $PSK 2>&1)
    rc=$?
    [ -f /tmp/apply-first.h$1 ] || echo "$out" >/tmp/apply-first.h$1
    echo "$out" | sed "s/^/  h$1 apply: /"
    line=$(echo "$out" | grep "^xfrm: host h$1: " | tail -n 1)
    LAST_WRITES=$(echo "$line" | sed -n 's/.* \([0-9][0-9]*\) writes.*/\1/p')
    if [ $rc -eq 0 ] && ! echo "$line" | grep -q ': 2 peers, [0-9]* writes, 0 errors'; then
        echo "  h$1 apply: exit 0 but summary line is '$line'"
        return 99
    fi
    return $rc
}

# Foreign objects in h1 that apply and cleanup must leave alone: an ESP state and a policy
# with reqid 7 (outside ipsec-mesh's range) and a policy marked with kube-proxy's bit.
$IP -n h1 xfrm state add src 192.168.77.1 dst 192.168.77.9 proto esp spi 0x7 reqid 7 mode tunnel \
    aead 'rfc4106(gcm(aes))' 0x0102030405060708090a0b0c0d0e0f1011121314 128 ||
    abort foreign-objects "cannot add the foreign state"
$IP -n h1 xfrm policy add src 172.16.1.0/24 dst 172.16.2.0/24 dir out \
    tmpl src 192.168.77.1 dst 192.168.77.9 proto esp reqid 7 mode tunnel ||
    abort foreign-objects "cannot add the foreign policy"
$IP -n h1 xfrm policy add src 0.0.0.0/0 dst 0.0.0.0/0 dir out action block mark 0x4000 mask 0x4000 priority 999999 ||
    abort foreign-objects "cannot add the foreign block policy"
foreign_intact() { # -> 0 when h1's foreign state and policies are all there
    $IP -n h1 xfrm state | grep -q 'spi 0x00000007 reqid 7 mode tunnel' &&
        $IP -n h1 xfrm policy | grep -q 'src 172.16.1.0/24 dst 172.16.2.0/24' &&
        $IP -n h1 xfrm policy | grep -q 'mark 0x4000/0x4000'
}

say "apply on h1 h2 h3"
for n in $HOSTS; do
    ts=$(now)
    if apply $n && [ "${LAST_WRITES:-0}" -gt 0 ]; then
        ok "apply-h$n" "$LAST_WRITES writes, $(awk -v a="$ts" -v b="$(now)" 'BEGIN{printf "%.2f", b-a}')s"
    else
        abort "apply-h$n" "exit $rc, writes '${LAST_WRITES}'"
    fi
done

# reqids of our states/policies in netns $1 (decimal, one per line)
our_state_lines() { # $1 = netns -> "src dst spi reqid packets" per SA of ours
    $IP -n "$1" -s xfrm state | awk -v lo=$REQID_MIN -v hi=$REQID_MAX '
        /^src / { src = $2; dst = $4 }
        $1 == "proto" && $3 == "spi" { spi = $4; reqid = $6 + 0 }
        /lifetime current:/ { getline; p = $0; sub(/.*, /, "", p); sub(/\(packets\).*/, "", p)
            if (reqid >= lo && reqid <= hi) print src, dst, spi, reqid, p + 0 }'
}
our_policy_count() { # $1 = netns -> policies with a reqid of ours or our mark mask
    $IP -n "$1" xfrm policy | awk -v lo=$REQID_MIN -v hi=$REQID_MAX '
        /^src / { if (cur) n++; cur = 0 }
        /mark .*\/0x300000/ { cur = 1 }
        { for (i = 1; i < NF; i++) if ($i == "reqid" && $(i + 1) + 0 >= lo && $(i + 1) + 0 <= hi) cur = 1 }
        END { if (cur) n++; print n + 0 }'
}
xfrm_stat() { $IP netns exec "$1" awk -v k="$2" '$1 == k { print $2 }' /proc/net/xfrm_stat; }

# --- 3. forwarding: installed by apply ---------------------------------------------------
# our_fw_left NETNS -> what of either firewall backend of ours is in NETNS (empty: nothing)
our_fw_left() {
    if command -v nft >/dev/null && $IP netns exec "$1" nft list table inet ipsec-mesh >/dev/null 2>&1; then
        echo "table inet ipsec-mesh"
    fi
    if command -v iptables-save >/dev/null && $IP netns exec "$1" iptables-save | grep -q IPSEC-MESH-; then
        echo "IPSEC-MESH- chains/jumps"
    fi
}
if [ "$FW" = nftables ]; then
    # apply ran with the default --firewall auto: its first run must have said it picked
    # nftables.
    for n in $HOSTS; do
        why=$(grep -o 'firewall backend firewall=[a-z]* why="[^"]*"' /tmp/apply-first.h$n)
        t=$($IP netns exec h$n nft list table inet ipsec-mesh 2>&1)
        # No x_tables in the host: nothing of iptables was (or could be) used.
        xt=$($IP netns exec h$n cat /proc/net/ip_tables_names 2>/dev/null)
        if echo "$why" | grep -q 'firewall=nftables why="auto: no iptables, nft present"' &&
            [ "$(echo "$t" | grep -c 'rt ipsec missing counter packets [0-9]* bytes [0-9]* drop')" -eq 2 ] &&
            [ "$(echo "$t" | grep -c 'ip daddr != @local ip daddr 10.42.0.0/16 meta mark set')" -eq 2 ] &&
            echo "$t" | grep -q 'elements = { 10.42.'"$n"'.0/24 }' && [ -z "$xt" ]; then
            ok "auto-nftables-h$n" "$why; table inet ipsec-mesh: 2 mark, 2 guard rules; no x_tables"
        else
            bad "auto-nftables-h$n" "log: '${why:-no firewall backend line}'; x_tables: '$xt'; table: $t"
        fi
    done
fi
for n in $HOSTS; do
    rule=$($IP -n h$n rule show | grep "fwmark $MARK")
    if { [ "$FW" = nftables ] && [ -n "$(our_fw_left h$n)" ] ||
        { $IP netns exec h$n $IPT -t mangle -S IPSEC-MESH-MARK >/dev/null 2>&1 &&
            $IP netns exec h$n $IPT -t filter -S IPSEC-MESH-GUARD >/dev/null 2>&1; }; } &&
        [ -n "$rule" ] && [ -n "$($IP -n h$n route show table $RT_TABLE)" ]; then
        ok "forwarding-h$n" "installed by apply: $rule"
    else
        bad "forwarding-h$n" "apply did not install the mark chain, guard, fwmark rule and table $RT_TABLE"
    fi
done

# --- 4. positive: every ordered container pair -------------------------------------------
say "pinging all 6 container pairs"
ping_pairs "$ALL_PAIRS" 3
if [ -z "$PING_FAILED" ]; then ok ping-all "$PING_OK"; else bad ping-all "failed:$PING_FAILED; ok:$PING_OK"; fi

# --- 5. every SA of the generation in use counted packets -------------------------------
# Per peer: one outbound SA (generation 1) and inbound SAs for generations 0, 1 and 2 (a
# peer may switch generation first); the generation is the SPI's last hex digit.
for n in $HOSTS; do
    lines=$(our_state_lines h$n)
    count=$(echo "$lines" | grep -c .)
    zero=$(echo "$lines" | awk '$5 == 0 && substr($3, 10, 1) == "1" { printf " spi %s (%s->%s)", $3, $1, $2 }')
    # inbound SAs per generation 0, 1, 2 (want 2 each: one per peer)
    gens=$(echo "$lines" | awk -v me="192.168.77.$n" '$2 == me { c[substr($3, 10, 1)]++ } END { printf "%d%d%d", c["0"], c["1"], c["2"] }')
    summary=$(echo "$lines" | awk '{ printf "%s%s->%s %s:%d", (NR > 1 ? ", " : ""), $1, $2, $3, $5 }')
    if [ "$count" -eq 8 ] && [ -z "$zero" ] && [ "$gens" = "222" ]; then
        ok "sa-counters-h$n" "8 SAs (inbound per generation 0/1/2: $gens); $summary"
    else
        bad "sa-counters-h$n" "$count SAs of ours (want 8), inbound SAs of generations 0/1/2: '$gens' (want 222); no packets on:${zero:- -}; $summary"
    fi
done

# 5b, 5c and 9b check the SAs, not the firewall: the iptables run does them (nftables mode
# keeps to the firewall-dependent sections, for time).
if [ "$FW" = iptables ]; then
# --- 5b. ESN and anti-replay on every SA of ours (issue 11) ------------------------------
# sa_replay_lines NETNS -> "spi reqid esn window wrap" per SA of ours, from `ip -s -d xfrm state`
sa_replay_lines() {
    $IP -n "$1" -s -d xfrm state | awk -v lo=$REQID_MIN -v hi=$REQID_MAX '
        function flush() { if (spi != "" && reqid >= lo && reqid <= hi) print spi, reqid, esn, win, wrap }
        /^src / { flush(); spi = ""; esn = 0; win = -1; wrap = 0 }
        $1 == "proto" && $3 == "spi" { spi = $4; reqid = $6 + 0 }
        /flag .*esn/ { esn = 1 }
        /replay_window [0-9]+/ { for (i = 1; i <= NF; i++) if ($i == "replay_window") { w = $(i + 1); sub(/,/, "", w); win = w + 0 } }
        /oseq-may-wrap|extra_flag/ { wrap = 1 }
        END { flush() }'
}
for n in $HOSTS; do
    lines=$(sa_replay_lines h$n)
    count=$(echo "$lines" | grep -c .)
    badl=$(echo "$lines" | awk '$3 != 1 || $4 < 128 || $5 != 0 { printf " [%s]", $0 }')
    if [ "$count" -eq 8 ] && [ -z "$badl" ]; then
        ok "esn-replay-h$n" "8 SAs with ESN, replay windows $(echo "$lines" | awk '{ printf "%s%s", (NR > 1 ? "," : ""), $4 }'), no wrap flag"
    else
        bad "esn-replay-h$n" "$count SAs; not ESN / window < 128 / wrap flag:${badl:- -}"
        $IP -n h$n -s -d xfrm state | sed 's/^/    /'
    fi
done

# --- 5c. a replayed ESP packet is dropped (issue 11) -------------------------------------
# sa_stat NETNS SPI -> "packets replay" of that SA (from `ip -s xfrm state`)
sa_stat() {
    $IP -n "$1" -s xfrm state | awk -v spi="$2" '
        /^src / { p = 0 }
        $1 == "proto" && $3 == "spi" { p = (index($4, spi) == 1) } # -s prints "0x...(decimal)"
        p && /lifetime current:/ { getline; k = $0; sub(/.*, /, "", k); sub(/\(packets\).*/, "", k); pk = k + 0 }
        p && /replay-window [0-9]+ replay [0-9]+/ { for (i = 1; i < NF; i++) if ($i == "replay") rp = $(i + 1) + 0 }
        END { print pk + 0, rp + 0 }'
}
if [ -x /usr/bin/esp-replay ]; then
    rm -f /tmp/replay.out
    $IP netns exec sw /usr/bin/esp-replay sw1 5 20 >/tmp/replay.out 2>&1 &
    rpid=$!
    sleep 0.5
    # One echo request c2 -> c1: its ESP packet leaves the switch on sw1 towards h1.
    $IP netns exec c2 ping -c 1 -W 2 10.42.1.2 >/dev/null 2>&1
    spi=$(sed -n 's/.*captured spi \(0x[0-9a-f]*\).*/\1/p' /tmp/replay.out)
    if [ -n "$spi" ]; then
        before=$(sa_stat h1 "$spi")
        wait $rpid
        rrc=$?
        sleep 0.5
        after=$(sa_stat h1 "$spi")
        set -- $before $after
        if [ $rrc -eq 0 ] && [ "$3" -eq "$1" ] && [ "$4" -ge $(($2 + 5)) ]; then
            ok replay-dropped "5 copies of spi $spi re-sent to h1: replay counter $2->$4, SA packets $1->$3 (nothing reached c1)"
        else
            bad replay-dropped "helper rc $rrc; spi $spi packets $1->$3, replay $2->$4; $(tr '\n' ' ' </tmp/replay.out)"
        fi
    else
        wait $rpid
        bad replay-dropped "no ESP frame captured: $(tr '\n' ' ' </tmp/replay.out)"
    fi
else
    bad replay-dropped "/usr/bin/esp-replay missing from the initramfs"
fi

fi # 5b, 5c

# --- 6. nothing but ESP on the underlay --------------------------------------------------
esp=$(underlay_count esp)
plain=$(($(underlay_count plain) - plain_base))
overlay=$(underlay_count overlay)
if [ "$esp" -gt 0 ] && [ "$plain" -eq 0 ] && [ "$overlay" -eq 0 ]; then
    ok no-plaintext "underlay: $esp ESP, $plain other IPv4 packets since apply, $overlay with container addresses"
else
    bad no-plaintext "underlay: $esp ESP, $plain other IPv4 packets since apply, $overlay with container addresses"
fi

# --- 7. second apply writes nothing ------------------------------------------------------
for n in $HOSTS; do
    if apply $n && [ "$LAST_WRITES" = 0 ]; then
        ok "noop-apply-h$n" "0 writes"
    else
        bad "noop-apply-h$n" "exit $rc, writes '$LAST_WRITES'"
    fi
done

# --- 8. negative: h2 loses its SAs -> fail closed ----------------------------------------
say "flushing h2's SAs"
out_ns0=$(xfrm_stat h2 XfrmOutNoStates) blk0=$(xfrm_stat h2 XfrmOutPolBlock)
in_ns0=$(xfrm_stat h2 XfrmInNoStates)
$IP -n h2 xfrm state flush || abort flush "ip xfrm state flush in h2"
ping_pairs "1>2 3>2 2>1 2>3" 2
if [ -z "$PING_OK" ]; then
    ok no-sa-ping-fails "$PING_FAILED"
else
    bad no-sa-ping-fails "succeeded without h2's SAs:$PING_OK"
fi
ping_pairs "1>3 3>1" 2
if [ -z "$PING_FAILED" ]; then ok no-sa-others-ok "$PING_OK"; else bad no-sa-others-ok "failed:$PING_FAILED"; fi
out_ns1=$(xfrm_stat h2 XfrmOutNoStates) blk1=$(xfrm_stat h2 XfrmOutPolBlock)
in_ns1=$(xfrm_stat h2 XfrmInNoStates)
drops="h2 XfrmOutNoStates $out_ns0->$out_ns1, XfrmOutPolBlock $blk0->$blk1, XfrmInNoStates $in_ns0->$in_ns1"
if [ $((out_ns1 + blk1)) -gt $((out_ns0 + blk0)) ] && [ "$in_ns1" -gt "$in_ns0" ]; then
    ok no-sa-dropped "$drops"
else
    bad no-sa-dropped "$drops"
fi
plain=$(($(underlay_count plain) - plain_base))
overlay=$(underlay_count overlay)
if [ "$plain" -eq 0 ] && [ "$overlay" -eq 0 ]; then
    ok no-sa-no-plaintext "underlay: $(underlay_count esp) ESP, $plain other, $overlay with container addresses"
else
    bad no-sa-no-plaintext "underlay: $plain other IPv4 packets, $overlay with container addresses"
fi
echo "  h2 states after the failed pings (larval/acquire ones included):"
$IP -n h2 xfrm state | sed 's/^/    /'

# --- 9. recovery: apply on h2 ------------------------------------------------------------
if apply 2 && [ "${LAST_WRITES:-0}" -gt 0 ]; then
    ok reapply-h2 "$LAST_WRITES writes"
else
    bad reapply-h2 "exit $rc, writes '$LAST_WRITES'"
fi
seq0=$(for n in 1 3; do xfrm_stat h$n XfrmInStateSeqError; done | awk '{ s += $1 } END { print s + 0 }')
ping_pairs "$ALL_PAIRS" 3
seq1=$(for n in 1 3; do xfrm_stat h$n XfrmInStateSeqError; done | awk '{ s += $1 } END { print s + 0 }')
if [ -z "$PING_FAILED" ]; then
    ok recovered-ping-all "$PING_OK"
else
    bad recovered-ping-all "failed:$PING_FAILED; ok:$PING_OK; h1+h3 XfrmInStateSeqError $seq0->$seq1"
    # Diagnostic only: XfrmInStateSeqError on the peers means h2's re-created out SAs (same
    # SPI and key, sequence numbers from 1 again) are dropped as replays by the peers' in SAs
    # until their sequence numbers pass what those SAs saw before the flush.
    ping_pairs "2>1 2>3" 10
    echo "  diagnostic: 10 more pings c2>c1, c2>c3: ok:$PING_OK failed:$PING_FAILED"
    for n in 1 3; do
        echo "  diagnostic: h$n in SA from h2:"
        $IP -n h$n -s xfrm state | awk '/^src 192.168.77.2 /{p=1} /^src /&&!/^src 192.168.77.2 /{p=0} p && /anti-replay context|replay-window [0-9]+ replay/' | sed 's/^/    /'
    done
fi
if [ "$FW" = iptables ]; then
# --- 9b. reboot simulation: h2 loses every SA and policy, apply brings it back (issue 11) --
say "reboot simulation: flushing h2's SAs and policies"
$IP -n h2 xfrm state flush && $IP -n h2 xfrm policy flush || abort reboot "flush in h2"
ts=$(now)
if apply 2 && [ "${LAST_WRITES:-0}" -gt 0 ]; then
    ok reboot-reapply-h2 "$LAST_WRITES writes"
else
    bad reboot-reapply-h2 "exit $rc, writes '$LAST_WRITES'"
fi
seq0=$(for n in 1 3; do xfrm_stat h$n XfrmInStateSeqError; done | awk '{ s += $1 } END { print s + 0 }')
ping_pairs "2>1 2>3 1>2 3>2" 3
seq1=$(for n in 1 3; do xfrm_stat h$n XfrmInStateSeqError; done | awk '{ s += $1 } END { print s + 0 }')
took=$(awk -v a="$ts" -v b="$(now)" 'BEGIN{printf "%.2f", b-a}')
win=$(for n in 1 3; do sa_replay_lines h$n; done | awk '$3 != 1 || $4 < 128 { b = 1 } END { print b + 0 }')
if [ -z "$PING_FAILED" ] && [ "$win" -eq 0 ]; then
    ok reboot-recovered "apply + 12 pings in ${took}s: $PING_OK; peers' windows still on (ESN, >= 128); peers' XfrmInStateSeqError $seq0->$seq1"
else
    bad reboot-recovered "failed:$PING_FAILED ok:$PING_OK; peers' windows off: $win; XfrmInStateSeqError $seq0->$seq1"
fi

fi # 9b

plain=$(($(underlay_count plain) - plain_base))
overlay=$(underlay_count overlay)
if [ "$plain" -eq 0 ] && [ "$overlay" -eq 0 ]; then
    ok recovered-no-plaintext "underlay: $(underlay_count esp) ESP, 0 other"
else
    bad recovered-no-plaintext "underlay: $plain other IPv4 packets, $overlay with container addresses"
fi
for n in $HOSTS; do
    if apply $n && [ "$LAST_WRITES" = 0 ]; then
        ok "noop-apply-after-recovery-h$n" "0 writes"
    else
        bad "noop-apply-after-recovery-h$n" "exit $rc, writes '$LAST_WRITES'"
    fi
done

[ -z "$FAILED" ] || dump_all

# --- 10. cleanup -------------------------------------------------------------------------
for n in $HOSTS; do
    out=$($IP netns exec h$n $BIN cleanup --driver xfrm 2>&1)
    rc1=$?
    echo "$out" | sed "s/^/  h$n cleanup: /"
    out=$($IP netns exec h$n $BIN cleanup --driver xfrm 2>&1)
    rc2=$?
    echo "$out" | sed "s/^/  h$n cleanup again: /"
    states=$(our_state_lines h$n | grep -c .)
    pols=$(our_policy_count h$n)
    left=""
    [ "$states" -eq 0 ] || left="$left $states states"
    [ "$pols" -eq 0 ] || left="$left $pols policies"
    fw=$(our_fw_left h$n | tr '\n' ' ')
    [ -z "$fw" ] || left="$left $fw"
    if $IP -n h$n rule show | grep -q "fwmark $MARK"; then
        left="$left fwmark rule"
    fi
    if [ -n "$($IP -n h$n route show table $RT_TABLE)" ]; then
        left="$left routes in table $RT_TABLE"
    fi
    if [ $rc1 -eq 0 ] && [ $rc2 -eq 0 ] && [ -z "$left" ]; then
        ok "cleanup-h$n" "nothing of ours left; second cleanup ok"
    else
        bad "cleanup-h$n" "exit $rc1/$rc2; left:${left:- nothing}"
        dump_host $n
    fi
done

if foreign_intact; then
    ok foreign-objects "a foreign state and two foreign policies survived apply, flush, re-apply and cleanup"
else
    bad foreign-objects "a foreign object in h1 was changed"
    dump_host 1
fi
if [ "$FW" = nftables ]; then
    if [ -n "$FAILED" ]; then
        echo "VM-RESULT: FAIL (nftables:$FAILED)"
        exit 1
    fi
    echo "VM-RESULT: PASS"
    exit 0
fi

# --- 11. the sidecar with UDP encapsulation (ESP in UDP 4500) ----------------------------
# `ipsec-mesh run --udp-encap` holds the port-4500 encapsulation socket the kernel needs to
# decapsulate ESP-in-UDP; the status endpoint shows every peer up with counters.
$IP netns exec sw $IPT -I FORWARD -p udp --dport 4500 -m comment --comment e2e-natt
ov0=$(underlay_count overlay)
for n in $HOSTS; do
    $IP netns exec h$n $BIN run --metadata $META --host h$n --driver xfrm --xfrm-mode policy --psk-file $PSK \
        --udp-encap --listen unix:/tmp/h$n.sock --resync 5 >/tmp/run-h$n.log 2>&1 &
    eval "RUN_PID_$n=$!"
done
for n in $HOSTS; do
    i=0
    until $BIN status --listen unix:/tmp/h$n.sock --format json 2>/dev/null | grep -q '"count": [1-9]'; do
        i=$((i + 1))
        [ $i -lt 100 ] || break
        sleep 0.1
    done
done
ping_pairs "$ALL_PAIRS" 3
if [ -z "$PING_FAILED" ]; then
    ok natt-ping-all "$PING_OK"
else
    bad natt-ping-all "failed:$PING_FAILED; ok:$PING_OK"
    for n in $HOSTS; do sed "s/^/  h$n run: /" /tmp/run-h$n.log; dump_host $n; done
fi
natt=$(underlay_count natt)
overlay=$(($(underlay_count overlay) - ov0))
if [ "$natt" -gt 0 ] && [ "$overlay" -eq 0 ] && $IP -n h1 xfrm state | grep -q 'encap type espinudp sport 4500 dport 4500'; then
    ok natt-underlay "$natt UDP/4500 packets, 0 with container addresses"
else
    bad natt-underlay "UDP/4500 $natt, container-address packets $overlay"
fi
for n in $HOSTS; do
    # Counters refresh every 5 s between reconciles: wait for them to show the pings.
    i=0
    while :; do
        st=$($BIN status --listen unix:/tmp/h$n.sock --format json 2>&1)
        echo "$st" | grep -q '"packets_in": [1-9]' && break
        i=$((i + 1))
        [ $i -lt 40 ] || break
        sleep 0.25
    done
    up=$(echo "$st" | grep -c '"state": "up"')
    if [ "$up" -eq 2 ] && echo "$st" | grep -q '"packets_in": [1-9]'; then
        ok "natt-status-h$n" "2 peers up with counters"
    else
        bad "natt-status-h$n" "$up peers up: $st"
    fi
done
for n in $HOSTS; do
    pid=$(eval echo \$RUN_PID_$n)
    kill -TERM "$pid"
    wait "$pid"
    rc=$?
    pols=$(our_policy_count h$n)
    if [ $rc -eq 0 ] && [ "$pols" -gt 0 ]; then
        ok "natt-sigterm-h$n" "exit 0, dataplane kept ($pols policies)"
    else
        bad "natt-sigterm-h$n" "exit $rc, $pols policies left"
        sed "s/^/  h$n run: /" /tmp/run-h$n.log
    fi
    $IP netns exec h$n $BIN cleanup --driver xfrm >/dev/null 2>&1 || bad "natt-cleanup-h$n" "cleanup failed"
done

# --- 12. continuous traffic while every sidecar restarts (issue 11) ----------------------
# Sidecars without UDP encapsulation (with it, the port-4500 socket dies with the process:
# see README). A flow of 20 packets/s between every container pair runs while the sidecars
# of h2, h1, h3 are stopped and started again, one after the other: 0 packets may be lost,
# and the SAs keep their counters (nothing is re-created).
REKEY_ARGS=""
start_sidecar() { # $1 = host number
    # shellcheck disable=SC2086
    $IP netns exec h$1 $BIN run --metadata $META --host h$1 --driver xfrm --xfrm-mode policy --psk-file $PSK \
        --listen unix:/tmp/h$1.sock --resync 5 $REKEY_ARGS >>/tmp/run-h$1.log 2>&1 &
    eval "RUN_PID_$1=$!"
}
wait_up() { # $1 = host number
    i=0
    until $BIN status --listen unix:/tmp/h$1.sock --format json 2>/dev/null | grep -q '"count": [1-9]'; do
        i=$((i + 1))
        [ $i -lt 100 ] || return 1
        sleep 0.1
    done
}
for n in $HOSTS; do start_sidecar $n; done
for n in $HOSTS; do wait_up $n || bad "flow-sidecar-h$n" "no reconcile reported"; done
ping_pairs "$ALL_PAIRS" 1 # the mesh is up
sas0=$(for n in $HOSTS; do our_state_lines h$n; done | awk '{ print $1, $2, $3 }' | sort | tr '\n' ' ')
FLOW_N=200 # 10 s at 20 packets/s
rm -f /tmp/flow.*
fpids=""
for p in $ALL_PAIRS; do
    a=${p%>*} b=${p#*>}
    $IP netns exec c$a ping -q -c $FLOW_N -i 0.05 -W 2 10.42.$b.2 >/tmp/flow.$a$b 2>&1 &
    fpids="$fpids $!"
done
sleep 1
for n in 2 1 3; do
    pid=$(eval echo \$RUN_PID_$n)
    kill -TERM "$pid"
    wait "$pid"
    sleep 1
    start_sidecar $n
    wait_up $n || bad "flow-restart-h$n" "no reconcile after the restart"
    sleep 1
done
# shellcheck disable=SC2086
wait $fpids
lost=""
summary=""
for p in $ALL_PAIRS; do
    a=${p%>*} b=${p#*>}
    got=$(sed -n 's/.* \([0-9]*\) packets received.*/\1/p' /tmp/flow.$a$b)
    summary="$summary c$a>c$b:${got:-?}/$FLOW_N"
    [ "${got:-0}" -eq $FLOW_N ] || lost="$lost c$a>c$b(${got:-?}/$FLOW_N)"
done
sas1=$(for n in $HOSTS; do our_state_lines h$n; done | awk '{ print $1, $2, $3 }' | sort | tr '\n' ' ')
if [ -z "$lost" ] && [ "$sas0" = "$sas1" ]; then
    ok flow-sidecar-restarts "sidecars of h2, h1, h3 restarted during 6 flows at 20/s: 0 lost ($summary); SAs unchanged"
else
    bad flow-sidecar-restarts "lost:$lost; SAs changed: $([ "$sas0" = "$sas1" ] && echo no || echo yes)"
    for n in $HOSTS; do tail -n 20 /tmp/run-h$n.log | sed "s/^/  h$n run: /"; done
fi
plain=$(($(underlay_count plain) - plain_base))
overlay=$(underlay_count overlay)
if [ "$overlay" -eq 0 ]; then
    ok flow-no-plaintext "0 packets with container addresses on the underlay"
else
    bad flow-no-plaintext "$overlay packets with container addresses on the underlay"
fi
# --- 12b. the clock jumps 30 minutes (issue 11) --------------------------------------------
# More than the 17.9 minutes in which the kernel infers the upper half of a sequence number:
# the sidecars must raise every outbound counter to the new clock and every inbound window to
# 300 s behind it (XFRM_MSG_NEWAE, at their 5 s refresh); then traffic flows again.
esn_hi() { # NETNS SRC -> seq-hi (inbound SAs from SRC) as decimal
    $IP -n "$1" -s xfrm state | awk -v src="$2" '/^src / { p = ($2 == src) }
        p && /seq-hi/ { v = $2; sub(/,/, "", v); print v; exit }'
}
hi0=$(esn_hi h1 192.168.77.2)
date -u -s "$(date -u -d @$(($(date +%s) + 1800)) '+%Y-%m-%d %H:%M:%S')" >/dev/null || bad clock-jump "date -s failed"
sleep 12
ping_pairs "$ALL_PAIRS" 3
hi1=$(esn_hi h1 192.168.77.2)
if [ -z "$PING_FAILED" ] && [ -n "$hi0" ] && [ $((hi1)) -gt $((hi0)) ]; then
    ok clock-jump "clock +30 min: windows and counters raised (h1's window from h2: seq-hi $hi0 -> $hi1), all pairs ping: $PING_OK"
else
    bad clock-jump "failed:$PING_FAILED ok:$PING_OK; h1's window from h2: seq-hi $hi0 -> $hi1"
    for n in $HOSTS; do tail -n 20 /tmp/run-h$n.log | sed "s/^/  h$n run: /"; dump_host $n; done
fi
date -u -s "$(date -u -d @$(($(date +%s) - 1800)) '+%Y-%m-%d %H:%M:%S')" >/dev/null

for n in $HOSTS; do
    pid=$(eval echo \$RUN_PID_$n)
    kill -TERM "$pid"
    wait "$pid"
    $IP netns exec h$n $BIN cleanup --driver xfrm >/dev/null 2>&1 || bad "flow-cleanup-h$n" "cleanup failed"
done

# --- 13. rolling key-generation change and PSK rotation under traffic (issue 11) ----------
# One-shot applies while a flow of 20 packets/s runs between every container pair:
#  A. generation 1 -> 2, host by host in the order h2, h1, h3, with pauses;
#  B. h1 and h2 move on to 3 while h3 stays at 2 (a host that has not moved keeps working);
#     then h3 catches up;
#  C. PSK rotation through a key ring: every host lists the old secret for 3 and a new one
#     for 4; every host moves to 4; every host drops the old secret (no SA of it remains).
# 0 packets may be lost in any phase, and nothing leaves in clear.
RING1=/tmp/ring1.psk RING2=/tmp/ring2.psk NEW=$(head -c 48 /dev/urandom | base64)
(umask 077 && printf '# ipsec-mesh key ring v1\n3 %s\n4 %s\n' "$(cat $PSK)" "$NEW" >$RING1 &&
    printf '# ipsec-mesh key ring v1\n4 %s\n' "$NEW" >$RING2)
apply_gen() { # HOST GEN PSKFILE
    $IP netns exec h$1 $BIN apply --metadata $META --host h$1 --driver xfrm --xfrm-mode policy --psk-file $3 \
        --key-generation $2 >/tmp/apply-gen.$1 2>&1 || {
        bad "rotation-apply-h$1-gen$2" "$(tail -n 3 /tmp/apply-gen.$1 | tr '\n' ' ')"
        return 1
    }
}
flow_start() { # COUNT
    FLOW_N=$1
    rm -f /tmp/flow.*
    fpids=""
    for p in $ALL_PAIRS; do
        a=${p%>*} b=${p#*>}
        $IP netns exec c$a ping -q -c "$1" -i 0.05 -W 2 10.42.$b.2 >/tmp/flow.$a$b 2>&1 &
        fpids="$fpids $!"
    done
    sleep 1
}
flow_check() { # NAME WHAT
    # shellcheck disable=SC2086
    wait $fpids
    lost="" summary=""
    for p in $ALL_PAIRS; do
        a=${p%>*} b=${p#*>}
        got=$(sed -n 's/.* \([0-9]*\) packets received.*/\1/p' /tmp/flow.$a$b)
        summary="$summary c$a>c$b:${got:-?}"
        [ "${got:-0}" -eq "$FLOW_N" ] || lost="$lost c$a>c$b(${got:-?}/$FLOW_N)"
    done
    if [ -z "$lost" ] && [ "$(underlay_count overlay)" -eq 0 ]; then
        ok "$1" "$2: 0 of 6x$FLOW_N lost ($summary), nothing in clear"
    else
        bad "$1" "$2: lost:$lost; container-address packets on the underlay: $(underlay_count overlay)"
        dump_all
    fi
}
out_gens() { # HOST -> the generations of its outbound SAs, sorted
    our_state_lines h$1 | awk -v me="192.168.77.$1" '$1 == me { print substr($3, 10, 1) }' | sort | tr -d '\n'
}
in_gens() { # HOST -> the generations of its inbound SAs, sorted
    our_state_lines h$1 | awk -v me="192.168.77.$1" '$2 == me { print substr($3, 10, 1) }' | sort | tr -d '\n'
}
for n in $HOSTS; do apply_gen $n 1 $PSK; done
ping_pairs "$ALL_PAIRS" 1
flow_start 300
for n in 2 1 3; do apply_gen $n 2 $PSK; sleep 2; done
flow_check rotation-rolling-generation "generation 1 -> 2 on h2, h1, h3 (2 s apart)"
g="$(out_gens 1) $(out_gens 2) $(out_gens 3) / $(in_gens 1)"
if [ "$g" = "22 22 22 / 112233" ]; then
    ok rotation-generation-objects "every host sends with generation 2 and receives 1, 2, 3"
else
    bad rotation-generation-objects "out generations per host / h1's inbound: $g"
fi
flow_start 200
apply_gen 1 3 $PSK; sleep 2; apply_gen 2 3 $PSK; sleep 3
flow_check rotation-peer-left-behind "h1 and h2 at generation 3, h3 still at 2"
flow_start 300
apply_gen 3 3 $PSK; sleep 2
for n in 2 1 3; do apply_gen $n 3 $RING1; sleep 1; done
for n in 1 3 2; do apply_gen $n 4 $RING1; sleep 1; done
flow_check rotation-psk-ring "h3 catches up to 3; key ring {3: old, 4: new} on every host; every host moves to 4"
flow_start 120
for n in 3 1 2; do apply_gen $n 4 $RING2; sleep 1; done
flow_check rotation-psk-retired "the old secret dropped from every host's ring"
left="$(out_gens 1)$(in_gens 1) $(out_gens 2)$(in_gens 2) $(out_gens 3)$(in_gens 3)"
if [ "$left" = "4444 4444 4444" ]; then
    ok rotation-old-secret-gone "only generation 4 SAs remain (1 out + 1 in per peer)"
else
    bad rotation-old-secret-gone "generations of each host's SAs (out then in): $left"
fi
for n in $HOSTS; do $IP netns exec h$n $BIN cleanup --driver xfrm >/dev/null 2>&1 || bad "rotation-cleanup-h$n" "cleanup failed"; done

# --- 14. automatic rekey under traffic (issue 11) -----------------------------------------
# Sidecars with --rekey-every 30 (the generation sent with advances every 30 s: maximum key
# age) and --rekey-packets 60 (a direction moves one generation ahead once its outbound SA
# carried 60 packets, ~1.5 s of the flow; at most once per period, not in its first 7 s).
# A.  A flow of 20 packets/s between every container pair for 40 s crosses at least one
#     period boundary and many usage-limit moves: 0 packets lost, nothing in clear; every
#     host counts rekeys of both kinds, its generation advanced, status says when the next
#     rekey is due.
# B.  With directions ahead, h1's sidecar restarts: they stay ahead (the restart does not go
#     back to a key that reached its limit): h1's SAs are unchanged, its status lists them.
REKEY_ARGS="--rekey-every 30 --rekey-packets 60"
status_num() { # HOST KEY -> the first number after "KEY": in h$1's status JSON
    $BIN status --listen unix:/tmp/h$1.sock --format json 2>/dev/null |
        sed -n "s/.*\"$2\": \([0-9]*\).*/\1/p" | head -n 1
}
status_ahead() { # HOST -> the peers h$1's status lists as ahead, comma-separated
    $BIN status --listen unix:/tmp/h$1.sock --format json 2>/dev/null |
        tr -d ' \n' | sed -n 's/.*"ahead":\[\([^]]*\)\].*/\1/p' | tr -d '"'
}
period_pos() { echo $(($(date +%s) % 30)); }
for n in $HOSTS; do start_sidecar $n; done
for n in $HOSTS; do wait_up $n || bad "rekey-sidecar-h$n" "no reconcile reported"; done
ping_pairs "$ALL_PAIRS" 1
gen0=$(status_num 1 generation)
flow_start 800
flow_check rekey-under-traffic "40 s of flows with --rekey-every 30 --rekey-packets 60"
counts="" rekey_bad=""
now_s=$(date +%s)
for n in $HOSTS; do
    age=$(status_num $n rekeys_age) use=$(status_num $n rekeys_usage) next=$(status_num $n next_rekey_at)
    counts="$counts h$n: ${age:-?} by age, ${use:-?} by usage, next at +$((${next:-0} - now_s)) s;"
    # next_rekey_at is refreshed by the re-plan just after each boundary (a reconcile under
    # TCG takes a few seconds), so a read at the boundary may still show the one just due.
    [ "${age:-0}" -ge 1 ] && [ "${use:-0}" -ge 1 ] && [ "${next:-0}" -gt $((now_s - 10)) ] &&
        [ "${next:-0}" -le $((now_s + 30)) ] || rekey_bad="$rekey_bad h$n"
done
gen1=$(status_num 1 generation)
if [ -z "$rekey_bad" ] && [ "$((gen1))" -gt "$((gen0))" ]; then
    ok rekey-counted "generation $gen0 -> $gen1;$counts"
else
    bad rekey-counted "hosts:$rekey_bad; generation $gen0 -> $gen1;$counts"
    for n in $HOSTS; do tail -n 20 /tmp/run-h$n.log | sed "s/^/  h$n run: /"; done
fi
if $BIN status --listen unix:/tmp/h1.sock | grep -q "^keys: generation .*rekey every 30 s, next rekey at [0-9]* (in [0-9]* s), usage limit 60 packets"; then
    ok rekey-status-table "status names the generation and when the next rekey is due"
else
    bad rekey-status-table "$($BIN status --listen unix:/tmp/h1.sock 2>&1 | head -n 3 | tr '\n' ' ')"
fi
# B: a burst after the guard of a period moves h1's directions ahead; then restart h1.
while [ "$(period_pos)" -lt 8 ] || [ "$(period_pos)" -gt 13 ]; do sleep 1; done
bpids=""
for p in $ALL_PAIRS; do
    a=${p%>*} b=${p#*>}
    $IP netns exec c$a ping -q -c 40 -i 0.05 -W 2 10.42.$b.2 >/dev/null 2>&1 &
    bpids="$bpids $!"
done
# shellcheck disable=SC2086
wait $bpids
i=0
until [ -n "$(status_ahead 1)" ] || [ $i -ge 70 ]; do sleep 0.1; i=$((i + 1)); done
ahead0=$(status_ahead 1)
sas0=$(our_state_lines h1 | awk '{ print $1, $2, $3 }' | sort | tr '\n' ' ')
kill -TERM "$RUN_PID_1"
wait "$RUN_PID_1"
start_sidecar 1
wait_up 1 || bad rekey-restart "no reconcile after the restart"
ahead1=$(status_ahead 1)
sas1=$(our_state_lines h1 | awk '{ print $1, $2, $3 }' | sort | tr '\n' ' ')
pos=$(period_pos)
if [ -n "$ahead0" ] && [ "$ahead0" = "$ahead1" ] && [ "$sas0" = "$sas1" ] && [ "$pos" -ge 8 ]; then
    ok rekey-restart-stays-ahead "h1 ahead towards $ahead0 before and after its restart; SAs unchanged"
else
    bad rekey-restart-stays-ahead "ahead before: '$ahead0', after: '$ahead1'; SAs changed: $([ "$sas0" = "$sas1" ] && echo no || echo yes); period position $pos s"
    tail -n 20 /tmp/run-h1.log | sed "s/^/  h1 run: /"
fi
ping_pairs "$ALL_PAIRS" 1
[ -z "$PING_FAILED" ] || bad rekey-after-restart "failed:$PING_FAILED"
for n in $HOSTS; do
    pid=$(eval echo \$RUN_PID_$n)
    kill -TERM "$pid"
    wait "$pid"
    $IP netns exec h$n $BIN cleanup --driver xfrm >/dev/null 2>&1 || bad "rekey-cleanup-h$n" "cleanup failed"
done

# --- result ------------------------------------------------------------------------------
say "done in $(awk -v a="$t0" -v b="$(now)" 'BEGIN{printf "%.1f", b-a}')s"
if [ -n "$FAILED" ]; then
    echo "xfrm-e2e: failed checks:$FAILED"
    echo "VM-RESULT: FAIL (xfrm-e2e:$FAILED)"
    exit 1
fi
echo "VM-RESULT: PASS"

#!/bin/sh
# Runs INSIDE the VM (busybox sh) as /test.sh: the real-ESP datapath benchmark of
# bench-datapath.sh. For every mode M of MODES (policy, route: an XFRM interface per peer,
# one: route mode with one collect_md interface; mode_args) and case N (peers) a pair of
# namespaces a<m>N (host-00000, the sender) and b<m>N (host-N, its last peer; <m> = p, r or
# o) joined by a veth (the underlay: 172.16.0.0/16), each
# programmed by `ipsec-mesh apply --driver xfrm` in mode M from the same N+1-host
# metadata (policies, SAs, firewall, routes, in route mode the XFRM interfaces: everything
# for all N peers). Each host's container is a namespace behind a veth (c<m>N of aN,
# d<m>N of bN, one container address each; the hosts forward their traffic, as for real
# containers). Then one udp-blast
# process sends, for ROUNDS rounds, SENDS datagrams from each of these targets of every mode
# and case in turn (interleaved: the same noise on every case of a round):
#   overlay:  from aN's container (cN) to bN's (dN) (forwarded by aN: PREROUTING mark,
#             routed into table 1042, FORWARD guard; policy
#             mode: XFRM out policy of peer N among all policies; route mode: the route into
#             peer N's interface imx<slot>, its if_id's policy bin; ESP with the real SA,
#             decrypted in bN and forwarded to dN)
#   underlay: from aN's underlay address to bN's (plain; walks the same mark chain and XFRM
#             lookup, matches nothing)
# Prints "DP-APPLY mode=M case=N side=S try=T rc=.. seconds=.. policies=.. states=..
# routes=.. links=.." per apply (the time to program the whole mesh and the kernel objects
# it left), "DP mode=M case=N kind=K round=R sent=.. failed=.. seconds=.. rate=..", the SA
# counters (the overlay datagrams must all have gone through aN's outbound SA and come in
# through bN's inbound SA; the underlay ones through none) and "VM-RESULT: PASS" if every
# check held. An apply that fails is a check that fails (see the retry below), not an abort.
# Files from the host: /etc/dp/config (ROUNDS, SENDS, CASES, MODES), /etc/dp/cases (per
# case: N, B's host id, B's underlay address, A's and B's container address, a second
# container address of A: on aN's lo, for the host-origin check),
# /etc/dp/meta-N.json, /etc/dp/psk.
set -u
IP=/sbin/ip # busybox sh would run its own `ip` applet (no xfrm) for a bare `ip`
BIN=/usr/bin/ipsec-mesh
BLAST=/usr/bin/udp-blast
A_UL=172.16.0.1
CT_GW=169.254.1.1 # the container's gateway: aN's end of the container veth
FAILED=""
now() { cut -d' ' -f1 /proc/uptime; }
say() { echo "dp: [$(now)s] $*"; }
bad() { echo "CHECK $1: FAIL${2:+ ($2)}"; FAILED="$FAILED $1"; }
ok() { echo "CHECK $1: ok${2:+ ($2)}"; }
abort() { bad "$1" "$2"; echo "VM-RESULT: FAIL ($1)"; exit 1; }

MODES=policy
. /etc/dp/config
[ -x $BIN ] && [ -x $BLAST ] || abort tools "ipsec-mesh or udp-blast missing from the initramfs"
command -v iptables-restore >/dev/null || abort tools "iptables missing (build-initramfs.sh --iptables)"
say "$($BIN --version 2>&1); modes: $MODES; cases: $CASES; $ROUNDS rounds of $SENDS sends"

field() { awk -v n="$1" -v f="$2" '$1 == n { print $f }' /etc/dp/cases; }
# Packets counted by the SAs from $2 to $3 in namespace $1 (all of them: inbound has one per
# accepted generation).
sa_packets() {
    $IP -n "$1" -s xfrm state list src "$2" dst "$3" proto esp |
        awk '/lifetime current:/ { getline; sub(/.*, */, ""); sub(/\(packets\).*/, ""); n += $0 } END { print n + 0 }'
}
xstat() { $IP netns exec "$1" awk -v k="$2" '$1 == k { print $2 }' /proc/net/xfrm_stat; }
mem() { grep -E '^(MemTotal|MemAvailable|Slab):' /proc/meminfo | tr -s ' ' | tr '\n' ' '; }
tag() { echo "$1" | cut -c1; } # policy -> p, route -> r, one -> o
# The apply flags of a bench mode: policy; route = an XFRM interface per peer; one = route
# mode with one collect_md interface for all peers (--xfrm-route-devices one).
mode_args() {
    case "$1" in
    policy) echo "--xfrm-mode policy" ;;
    route) echo "--xfrm-mode route --xfrm-route-devices per-peer" ;;
    one) echo "--xfrm-mode route --xfrm-route-devices one" ;;
    esac
}
count_policies() {
    $IP -n "$1" xfrm policy count | awk '{ for (i = 1; i < NF; i++) if ($i == "IN" || $i == "OUT" || $i == "FWD") n += $(i + 1) } END { print n + 0 }'
}

for mode in $MODES; do
for n in $CASES; do
    t=$(tag $mode)
    b_id=$(field "$n" 2) b_ul=$(field "$n" 3) a_ip=$(field "$n" 4) b_ip=$(field "$n" 5) a_ip2=$(field "$n" 6)
    [ -n "$a_ip2" ] || abort setup "no line for case $n in /etc/dp/cases"
    for h in a$t$n b$t$n c$t$n d$t$n; do
        $IP netns add $h || abort setup "netns add $h"
        $IP netns exec $h sh -c 'echo 1 >/proc/sys/net/ipv6/conf/all/disable_ipv6;
            echo 1 >/proc/sys/net/ipv6/conf/default/disable_ipv6'
    done
    $IP link add ul0 netns a$t$n type veth peer name ul0 netns b$t$n || abort setup "veth $mode $n"
    # aN's container: its own namespace cN behind a veth (c0), so the overlay traffic is
    # forwarded by aN as a container's is (PREROUTING mark, FORWARD guard).
    $IP link add c0 netns a$t$n type veth peer name c0 netns c$t$n || abort setup "container veth $mode $n"
    $IP netns exec a$t$n sh -c 'echo 1 >/proc/sys/net/ipv4/ip_forward'
    $IP -n a$t$n -batch - <<EOF || abort setup "a$t$n"
link set lo up
link set ul0 up
link set c0 up
addr add $A_UL/16 dev ul0
addr add $CT_GW/32 dev c0
addr add $a_ip2/32 dev lo
route add $a_ip/32 dev c0
route add default via $b_ul dev ul0
EOF
    $IP -n c$t$n -batch - <<EOF || abort setup "c$t$n"
link set lo up
link set c0 up
addr add $a_ip/32 dev c0
route add $CT_GW/32 dev c0
route add default via $CT_GW dev c0
EOF
    $IP link add c0 netns b$t$n type veth peer name c0 netns d$t$n || abort setup "container veth $mode $n"
    $IP netns exec b$t$n sh -c 'echo 1 >/proc/sys/net/ipv4/ip_forward'
    $IP -n b$t$n -batch - <<EOF || abort setup "b$t$n"
link set lo up
link set ul0 up
link set c0 up
addr add $b_ul/16 dev ul0
addr add $CT_GW/32 dev c0
route add $b_ip/32 dev c0
route add default via $A_UL dev ul0
EOF
    $IP -n d$t$n -batch - <<EOF || abort setup "d$t$n"
link set lo up
link set c0 up
addr add $b_ip/32 dev c0
route add $CT_GW/32 dev c0
route add default via $CT_GW dev c0
EOF
    for side in "a$t$n host-00000 a" "b$t$n $b_id b"; do
        set -- $side
        # A first apply that fails is a finding (CHECK apply-M-N fails, the result is FAIL);
        # it is retried (up to 7 more times) so the datapath can still be measured, and what
        # the retry had left to write tells whether the failed changes had reached the kernel.
        try=1
        while :; do
            t0=$(now)
            out=$($IP netns exec "$1" env IPSEC_MESH_LOG=warn $BIN apply \
                --metadata /etc/dp/meta-$n.json --host "$2" --driver xfrm $(mode_args $mode) \
                --psk-file /etc/dp/psk 2>&1)
            rc=$?
            secs=$(awk -v a="$t0" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }')
            line=$(echo "$out" | grep -m1 '^xfrm: host' || true)
            pols=$(count_policies "$1") sas=$($IP -n "$1" xfrm state count | awk '{ print $NF }')
            routes=$($IP -n "$1" route show table 1042 | wc -l) links=$($IP -n "$1" -o link show type xfrm | wc -l)
            # XFRM interfaces in the underlay device's hash chain (index mod 256; see
            # INDEX_CHAINS in src/dataplane/xfrmi/desired.rs), and the largest chain of them
            chains=$($IP -n "$1" -o link show | awk -F': ' '$2 ~ /^ul0(@|$)/ { u = $1 % 256 } $2 ~ /^imx/ { c[$1 % 256]++ }
                END { m = 0; for (k in c) if (c[k] > m) m = c[k]; printf "ulchain=%d maxchain=%d", c[u] + 0, m }')
            echo "DP-APPLY mode=$mode case=$n side=$3 try=$try rc=$rc seconds=$secs policies=$pols states=$sas routes=$routes links=$links $chains"
            say "apply $1 ($2, $mode) #$try: exit $rc, $secs s, $line; $(echo "$out" | grep '^  ' | tr -s ' ' | tr '\n' ';') $pols policies, $sas SAs, $routes routes in table 1042, $links xfrm interfaces; $(mem)"
            [ $rc -eq 0 ] && break
            echo "$out" | grep -v '^  ' | cut -c1-600 | head -5
            bad "apply-$mode-$n" "$1 ($2) attempt $try: exit $rc"
            [ $try -lt 8 ] || abort apply "$1 ($2): 8 attempts failed"
            try=$((try + 1))
        done
    done
    t=$(tag $mode)
    # Both directions through ESP before measuring (and ARP settled).
    if $IP netns exec c$t$n ping -c 2 -W 3 -I "$a_ip" "$b_ip" >/dev/null 2>&1; then
        ok "ping-$mode-$n" "container $a_ip -> $b_ip over ESP"
    else
        bad "ping-$mode-$n" "container $a_ip -> $b_ip"
        for h in a$t$n b$t$n; do
            echo "--- $h"
            $IP netns exec $h awk '$2 != 0' /proc/net/xfrm_stat
            $IP -n $h rule
            $IP -n $h route get "$b_ip" from "$a_ip" mark 0x100000 2>&1
            $IP netns exec $h iptables-save -c 2>&1 | grep -v '^#'
            $IP -n $h -s -o link show type xfrm | head -3
        done
    fi
    # Overlay traffic the host itself sends (from one of its own container addresses, on
    # its lo): not measured, reported (FINDING: not counted as a failed check).
    if $IP netns exec a$t$n ping -c 1 -W 2 -I "$a_ip2" "$b_ip" >/dev/null 2>&1; then
        echo "FINDING host-origin-$mode-$n: ok (host $a_ip2 -> $b_ip over ESP)"
    else
        echo "FINDING host-origin-$mode-$n: no answer (host $a_ip2 -> $b_ip; filter OUTPUT $($IP netns exec a$t$n iptables -w -L IPSEC-MESH-GUARD -v -n -x 2>/dev/null | awk '/DROP/ { print $1 " packets dropped by the guard" }'))"
    fi
    $BLAST 1 100 "a$t$n,$A_UL,$b_ul,9" >/dev/null
done
done

# Counters before the measurement.
targets="" map=""
i=0
for mode in $MODES; do
    t=$(tag $mode)
    for n in $CASES; do
        b_ul=$(field "$n" 3) a_ip=$(field "$n" 4) b_ip=$(field "$n" 5)
        eval "out0_$t$n=$(sa_packets a$t$n $A_UL "$b_ul") in0_$t$n=$(sa_packets b$t$n $A_UL "$b_ul")"
        targets="$targets c$t$n,$a_ip,$b_ip,9 a$t$n,$A_UL,$b_ul,9"
        map="$map $i=$mode,$n,overlay $((i + 1))=$mode,$n,underlay"
        i=$((i + 2))
    done
done
say "measuring; guest memory: $(mem)"
# One process, all cases interleaved in every round (udp-blast.c says why).
# shellcheck disable=SC2086 # one argument per target
$BLAST "$ROUNDS" "$SENDS" $targets >/tmp/blast.out || bad blast "udp-blast exit $?"
awk -v map="$map" 'BEGIN { n = split(map, m, " "); for (j = 1; j <= n; j++) { split(m[j], kv, "="); split(kv[2], ck, ","); md[kv[1]] = ck[1]; c[kv[1]] = ck[2]; k[kv[1]] = ck[3] } }
    { split($2, t, "="); r = $1; sub(/^round=/, "", r); rest = $0; sub(/^round=[0-9]+ target=[0-9]+ /, "", rest)
      print "DP mode=" md[t[2]] " case=" c[t[2]] " kind=" k[t[2]] " round=" r " " rest }' /tmp/blast.out >/tmp/dp.lines
cat /tmp/dp.lines
say "measured"

# Every overlay datagram left through aN's outbound SA and arrived through bN's inbound SA;
# no underlay datagram did (exactly the overlay count, nothing more).
for mode in $MODES; do
for n in $CASES; do
    t=$(tag $mode)
    b_ul=$(field "$n" 3)
    o0=0 i0=0
    eval "o0=\$out0_$t$n i0=\$in0_$t$n"
    sent=$(awk -v m="mode=$mode" -v c="case=$n" '$2 == m && $3 == c && $4 == "kind=overlay" { v = $6; sub(/^sent=/, "", v); s += v } END { print s + 0 }' /tmp/dp.lines)
    o1=$(sa_packets a$t$n $A_UL "$b_ul") i1=$(sa_packets b$t$n $A_UL "$b_ul")
    out=$((o1 - o0)) in=$((i1 - i0))
    if [ "$out" -eq "$sent" ] && [ "$in" -ge $((sent * 99 / 100)) ] && [ "$sent" -gt 0 ]; then
        ok "esp-$mode-$n" "$sent overlay datagrams sent, $out through a$t$n's outbound SA, $in through b$t$n's inbound SAs"
    else
        bad "esp-$mode-$n" "$sent overlay datagrams sent, $out through a$t$n's outbound SA, $in through b$t$n's inbound SAs"
    fi
    echo "DP-SA mode=$mode case=$n sent=$sent out=$out in=$in a_XfrmOutNoStates=$(xstat a$t$n XfrmOutNoStates) a_XfrmOutPolBlock=$(xstat a$t$n XfrmOutPolBlock) b_XfrmInNoPols=$(xstat b$t$n XfrmInNoPols) b_XfrmInTmplMismatch=$(xstat b$t$n XfrmInTmplMismatch) b_XfrmInStateProtoError=$(xstat b$t$n XfrmInStateProtoError)"
done
done
# DP_PERF=1 on the host (PERF=1 here, perf in the image): after the measurement, a
# system-wide profile (cpu-clock, kernel symbols from /proc/kallsyms) of each target sent on
# its own, the top kernel symbols printed as "PERF <mode>-<case>-<kind>: <line>": which
# kernel functions take more of a packet's time as the mesh grows.
if [ -n "${PERF:-}" ]; then
    if command -v perf >/dev/null; then
        echo 0 >/proc/sys/kernel/kptr_restrict
        echo -1 >/proc/sys/kernel/perf_event_paranoid
        for mode in $MODES; do
            t=$(tag $mode)
            for n in $CASES; do
                b_ul=$(field "$n" 3) a_ip=$(field "$n" 4) b_ip=$(field "$n" 5)
                for k in "overlay c$t$n,$a_ip,$b_ip,9" "underlay a$t$n,$A_UL,$b_ul,9"; do
                    set -- $k
                    perf record -q -a ${PERF_CALLERS:+-g} -e cpu-clock -F 1999 -o /tmp/perf.data -- $BLAST 4 "${PERF_SENDS:-3000}" "$2" >/tmp/perf.blast 2>/tmp/perf.err ||
                        { echo "PERF $mode-$n-$1: perf record failed: $(tail -n 2 /tmp/perf.err | tr '\n' ' ')"; continue; }
                    echo "PERF $mode-$n-$1: blast $(awk '{ print $NF }' /tmp/perf.blast | tr '\n' ' ')"
                    perf report -q -i /tmp/perf.data --stdio --no-children --sort sym --percent-limit 0.8 2>/dev/null |
                        grep -v '^$' | head -n "${PERF_LINES:-40}" | sed "s/^/PERF $mode-$n-$1: /"
                    # PERF_CALLERS=sym[,sym]: who calls these (call chains, callers first)
                    [ -z "${PERF_CALLERS:-}" ] || perf report -q -i /tmp/perf.data --stdio --no-children \
                        --symbols "$PERF_CALLERS" -G --percent-limit 0.3 2>/dev/null | grep -v '^$' | head -n 80 |
                        sed "s/^/PERF $mode-$n-$1 callers: /"
                done
            done
        done
    else
        echo "PERF: no perf in the image"
    fi
fi
if [ -n "$FAILED" ]; then
    echo "VM-RESULT: FAIL ($FAILED)"
    exit 1
fi
echo "VM-RESULT: PASS"

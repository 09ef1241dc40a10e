#!/bin/sh
# Runs INSIDE the VM (busybox sh) as /test.sh: the real-ESP datapath benchmark of
# bench-datapath.sh. For every case N (peers) a pair of namespaces aN (host-00000, the
# sender) and bN (host-N, its last peer) joined by a veth (the underlay: 172.16.0.0/16),
# each programmed by `ipsec-mesh apply --driver xfrm` from the same N+1-host metadata
# (policies, SAs, firewall, routes: everything for all N peers). One container address of
# each host sits on its lo. Then one udp-blast process sends, for ROUNDS rounds, SENDS
# datagrams from each of these targets of every case in turn (interleaved: the same noise on
# every case of a round):
#   overlay:  from aN's container address to bN's (marked, routed into table 1042, XFRM out
#             policy of peer N, ESP with the real SA, decrypted and delivered in bN)
#   underlay: from aN's underlay address to bN's (plain; walks the same mark chain and XFRM
#             lookup, matches nothing)
# Prints "DP case=N kind=K round=R sent=.. failed=.. seconds=.. rate=..", the SA counters
# (the overlay datagrams must all have gone through aN's outbound SA and come in through
# bN's inbound SA; the underlay ones through none) and "VM-RESULT: PASS" if every check held.
# An apply that fails is a check that fails (see the retry below), not an abort.
# Files from the host: /etc/dp/config (ROUNDS, SENDS, CASES), /etc/dp/cases (per case: N,
# B's host id, B's underlay address, A's and B's container address), /etc/dp/meta-N.json,
# /etc/dp/psk.
set -u
IP=/sbin/ip # busybox sh would run its own `ip` applet (no xfrm) for a bare `ip`
BIN=/usr/bin/ipsec-mesh
BLAST=/usr/bin/udp-blast
A_UL=172.16.0.1
FAILED=""
now() { cut -d' ' -f1 /proc/uptime; }
say() { echo "dp: [$(now)s] $*"; }
bad() { echo "CHECK $1: FAIL${2:+ ($2)}"; FAILED="$FAILED $1"; }
ok() { echo "CHECK $1: ok${2:+ ($2)}"; }
abort() { bad "$1" "$2"; echo "VM-RESULT: FAIL ($1)"; exit 1; }

. /etc/dp/config
[ -x $BIN ] && [ -x $BLAST ] || abort tools "ipsec-mesh or udp-blast missing from the initramfs"
command -v iptables-restore >/dev/null || abort tools "iptables missing (build-initramfs.sh --iptables)"
say "$($BIN --version 2>&1); cases: $CASES; $ROUNDS rounds of $SENDS sends"

field() { awk -v n="$1" -v f="$2" '$1 == n { print $f }' /etc/dp/cases; }
# Packets counted by the SAs from $2 to $3 in namespace $1 (all of them: inbound has one per
# accepted generation).
sa_packets() {
    $IP -n "$1" -s xfrm state list src "$2" dst "$3" proto esp |
        awk '/lifetime current:/ { getline; sub(/.*, */, ""); sub(/\(packets\).*/, ""); n += $0 } END { print n + 0 }'
}
xstat() { $IP netns exec "$1" awk -v k="$2" '$1 == k { print $2 }' /proc/net/xfrm_stat; }
count_policies() {
    $IP -n "$1" xfrm policy count | awk '{ for (i = 1; i < NF; i++) if ($i == "IN" || $i == "OUT" || $i == "FWD") n += $(i + 1) } END { print n + 0 }'
}

for n in $CASES; do
    b_id=$(field "$n" 2) b_ul=$(field "$n" 3) a_ip=$(field "$n" 4) b_ip=$(field "$n" 5)
    [ -n "$b_ip" ] || abort setup "no line for case $n in /etc/dp/cases"
    for h in a$n b$n; do
        $IP netns add $h || abort setup "netns add $h"
        $IP netns exec $h sh -c 'echo 1 >/proc/sys/net/ipv6/conf/all/disable_ipv6;
            echo 1 >/proc/sys/net/ipv6/conf/default/disable_ipv6'
    done
    $IP link add ul0 netns a$n type veth peer name ul0 netns b$n || abort setup "veth $n"
    $IP -n a$n -batch - <<EOF || abort setup "a$n"
link set lo up
link set ul0 up
addr add $A_UL/16 dev ul0
addr add $a_ip/32 dev lo
route add default via $b_ul dev ul0
EOF
    $IP -n b$n -batch - <<EOF || abort setup "b$n"
link set lo up
link set ul0 up
addr add $b_ul/16 dev ul0
addr add $b_ip/32 dev lo
route add default via $A_UL dev ul0
EOF
    for side in "a$n host-00000" "b$n $b_id"; do
        set -- $side
        # A first apply that fails is a finding (CHECK apply-N fails, the result is FAIL);
        # it is retried (up to 7 more times) so the datapath can still be measured, and what
        # the retry had left to write tells whether the failed changes had reached the kernel.
        try=1
        while :; do
            t=$(now)
            out=$($IP netns exec "$1" env IPSEC_MESH_LOG=warn $BIN apply \
                --metadata /etc/dp/meta-$n.json --host "$2" --driver xfrm --psk-file /etc/dp/psk 2>&1)
            rc=$?
            line=$(echo "$out" | grep -m1 '^xfrm: host' || true)
            say "apply $1 ($2) #$try: exit $rc, $(awk -v a="$t" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }') s, $line; $(echo "$out" | grep '^  ' | tr -s ' ' | tr '\n' ';') $(count_policies "$1") policies, $($IP -n "$1" xfrm state count | tr -s ' \t' ' '), $($IP -n "$1" route show table 1042 | wc -l) routes in table 1042"
            [ $rc -eq 0 ] && break
            echo "$out" | grep -v '^  ' | cut -c1-600 | head -5
            bad "apply-$n" "$1 ($2) attempt $try: exit $rc"
            [ $try -lt 8 ] || abort apply "$1 ($2): 8 attempts failed"
            try=$((try + 1))
        done
    done
    # Both directions through ESP before measuring (and ARP settled).
    if $IP netns exec a$n ping -c 2 -W 3 -I "$a_ip" "$b_ip" >/dev/null 2>&1; then
        ok "ping-$n" "$a_ip -> $b_ip over ESP"
    else
        bad "ping-$n" "$a_ip -> $b_ip"
        $IP netns exec a$n awk '$2 != 0' /proc/net/xfrm_stat
    fi
    $IP netns exec a$n $BLAST "$A_UL" "$b_ul" 9 100 >/dev/null
done

# Counters before the measurement.
targets="" map=""
i=0
for n in $CASES; do
    b_ul=$(field "$n" 3) a_ip=$(field "$n" 4) b_ip=$(field "$n" 5)
    eval "out0_$n=$(sa_packets a$n $A_UL "$b_ul") in0_$n=$(sa_packets b$n $A_UL "$b_ul")"
    targets="$targets a$n,$a_ip,$b_ip,9 a$n,$A_UL,$b_ul,9"
    map="$map $i=$n,overlay $((i + 1))=$n,underlay"
    i=$((i + 2))
done
say "measuring; guest memory: $(grep -E '^(MemTotal|MemAvailable|Slab):' /proc/meminfo | tr -s ' ' | tr '\n' ' ')"
# One process, all cases interleaved in every round (udp-blast.c says why).
# shellcheck disable=SC2086 # one argument per target
$BLAST "$ROUNDS" "$SENDS" $targets >/tmp/blast.out || bad blast "udp-blast exit $?"
awk -v map="$map" 'BEGIN { n = split(map, m, " "); for (j = 1; j <= n; j++) { split(m[j], kv, "="); split(kv[2], ck, ","); c[kv[1]] = ck[1]; k[kv[1]] = ck[2] } }
    { split($2, t, "="); r = $1; sub(/^round=/, "", r); rest = $0; sub(/^round=[0-9]+ target=[0-9]+ /, "", rest)
      print "DP case=" c[t[2]] " kind=" k[t[2]] " round=" r " " rest }' /tmp/blast.out >/tmp/dp.lines
cat /tmp/dp.lines
say "measured"

# Every overlay datagram left through aN's outbound SA and arrived through bN's inbound SA;
# no underlay datagram did (exactly the overlay count, nothing more).
for n in $CASES; do
    b_ul=$(field "$n" 3)
    o0=0 i0=0
    eval "o0=\$out0_$n i0=\$in0_$n"
    sent=$(awk -v c="case=$n" '$2 == c && $3 == "kind=overlay" { v = $5; sub(/^sent=/, "", v); s += v } END { print s + 0 }' /tmp/dp.lines)
    o1=$(sa_packets a$n $A_UL "$b_ul") i1=$(sa_packets b$n $A_UL "$b_ul")
    out=$((o1 - o0)) in=$((i1 - i0))
    if [ "$out" -eq "$sent" ] && [ "$in" -ge $((sent * 99 / 100)) ] && [ "$sent" -gt 0 ]; then
        ok "esp-$n" "$sent overlay datagrams sent, $out through a$n's outbound SA, $in through b$n's inbound SAs"
    else
        bad "esp-$n" "$sent overlay datagrams sent, $out through a$n's outbound SA, $in through b$n's inbound SAs"
    fi
    echo "DP-SA case=$n sent=$sent out=$out in=$in a_XfrmOutNoStates=$(xstat a$n XfrmOutNoStates) a_XfrmOutPolBlock=$(xstat a$n XfrmOutPolBlock) b_XfrmInNoPols=$(xstat b$n XfrmInNoPols) b_XfrmInTmplMismatch=$(xstat b$n XfrmInTmplMismatch) b_XfrmInStateProtoError=$(xstat b$n XfrmInStateProtoError)"
done
if [ -n "$FAILED" ]; then
    echo "VM-RESULT: FAIL ($FAILED)"
    exit 1
fi
echo "VM-RESULT: PASS"

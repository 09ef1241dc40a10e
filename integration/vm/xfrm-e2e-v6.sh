# Sourced by xfrm-e2e.sh (busybox sh, inside the test VM) before its own topology, when the
# kernel command line says e2e.mode=v6-u6 or e2e.mode=v6-u4 (issue 18): `apply --driver xfrm
# --xfrm-mode policy`, then `--xfrm-mode route` (XFRM interfaces), end to end with real ESP
# over an IPv6 (v6-u6) or IPv4 (v6-u4) underlay, the containers dual-stack. Uses xfrm-e2e.sh's helpers (ok, bad, abort, say, now) and
# variables (IP, BIN, META, PSK, HOSTS, MARK, RT_TABLE, REQID_*), builds its own topology and
# ends the run (VM-RESULT).
#
# e2e.overlay=4|6|46 on the command line picks the overlay families (default 46: dual-stack
# metadata, cidr ["10.42.0.0/16", "fd42::/48"]); 4 or 6 is a single-family network.
# e2e.switch=4|6 re-applies every host with a network of that family after the fail-closed
# checks (an overlay family change; with e2e.overlay=6 on v6-u6 this is the v4-in-v6 case).
# CI (integration/run.sh vm) runs v6-u6 dual-stack with e2e.switch=4 (dual-stack -> IPv4 only:
# every IPv6 object of ours must go) and v6-u4 dual-stack.
#
# Topology (network namespaces in the VM; nothing leaves it):
#   sw        bridge br0 = the underlay switch; br_netfilter hands bridged IPv4 to iptables
#             and IPv6 to ip6tables FORWARD, whose counters split ESP, neighbour discovery
#             (ICMPv6 130-137, 143: the v6 underlay's own) and everything else ("plaintext")
#   h1 h2 h3  hosts: uN fd77::N/64 nodad (v6-u6; no IPv4 address) or 192.168.77.N/24 (v6-u4;
#             IPv6 off), a default route of each overlay family on uN (so a packet that
#             missed the mark would leave in clear and be counted), bridge cbr0 10.42.N.1/24
#             and fd42:0:0:N::1/64, forwarding on
#   c1 c2 c3  containers: eth0 10.42.N.2/24 and fd42:0:0:N::2/64, default routes via cbr0
#
# Checks ("CHECK v6-<name>: ok|FAIL"): apply on each host; the fwmark path of each family
# (rule, table 1042, mark chain, guard); every ordered container pair pings in each family;
# every SA of the generation in use carries bytes; each host pings each remote container
# from its cbr0 address (host-originated: the OUTPUT mark); the underlay carries ESP of its own
# family only and no plaintext of either family; a second apply writes nothing; h2's SAs
# flushed -> pings to/from c2 fail in each family, c1<->c3 still work, nothing in clear,
# h2's drop counters rise; apply on h2 -> every pair back, a further apply writes nothing;
# cleanup (twice) leaves nothing of ours in either family. Then route mode with the first
# families ("CHECK v6-route-<name>", its own comment below), and on v6-u6 encrypted VXLAN.

V6_U=6
grep -qw e2e.mode=v6-u4 /proc/cmdline && V6_U=4
V6_FAMS="4 6"
case " $(cat /proc/cmdline) " in
*" e2e.overlay=4 "*) V6_FAMS=4 ;;
*" e2e.overlay=6 "*) V6_FAMS=6 ;;
esac
# e2e.switch=4|6: after the fail-closed checks, every host re-applies with a network of
# that family only (a change of overlay family: the old family's objects must go).
V6_SWITCH=""
case " $(cat /proc/cmdline) " in
*" e2e.switch=4 "*) V6_SWITCH=4 ;;
*" e2e.switch=6 "*) V6_SWITCH=6 ;;
esac
# Every family the containers carry at some point (once each: a dual-stack run switching to
# one of its families adds nothing).
V6_ALL=$(for f in $V6_FAMS $V6_SWITCH; do echo "$f"; done | sort -u | tr '\n' ' ')
V6_FAMS0=$V6_FAMS # the route-mode part runs with the first families again
V6_XMODE=policy # --xfrm-mode of v6_apply and the cleanup
FAILED=""
IP6T="ip6tables -w"

uaddr() { if [ "$V6_U" = 6 ]; then echo "fd77::$1"; else echo "192.168.77.$1"; fi; }
caddr() { if [ "$1" = 6 ]; then echo "fd42:0:0:$2::$3"; else echo "10.42.$2.$3"; fi; }
pingf() { if [ "$1" = 6 ]; then echo "ping -6"; else echo ping; fi; }
v6_stat() { $IP netns exec "$1" awk -v k="$2" '$1 == k { print $2 }' /proc/net/xfrm_stat; }

dump_host() { # $1 = host number
    echo "----- h$1: ip -s xfrm state"
    $IP -n "h$1" -s xfrm state
    echo "----- h$1: ip xfrm policy"
    $IP -n "h$1" xfrm policy
    for f in 4 6; do
        echo "----- h$1: ip -$f rule / route (main, $RT_TABLE)"
        $IP -$f -n "h$1" rule
        $IP -$f -n "h$1" route
        $IP -$f -n "h$1" route show table $RT_TABLE
    done
    echo "----- h$1: iptables-save / ip6tables-save"
    $IP netns exec "h$1" iptables-save
    $IP netns exec "h$1" ip6tables-save
    echo "----- h$1: /proc/net/xfrm_stat (non-zero)"
    $IP netns exec "h$1" awk '$2 != 0' /proc/net/xfrm_stat
}
sw_counters() {
    $IP netns exec sw $IPT -nvxL FORWARD
    $IP netns exec sw $IP6T -nvxL FORWARD
    echo "----- the last plaintext IPv6 packets the switch logged (after the warm-up's)"
    dmesg | grep 'e2e-plain6:' | tail -n 8
}

# --- topology ------------------------------------------------------------------------------
say "v6: underlay IPv$V6_U, overlay families: $V6_FAMS"
for ns in sw h1 h2 h3 c1 c2 c3; do
    $IP netns add $ns || abort v6-topology "netns add $ns"
    # No DAD, no router solicitations: addresses usable at once, no chatter.
    $IP netns exec $ns sh -c 'for c in all default; do echo 0 >/proc/sys/net/ipv6/conf/$c/accept_dad
        echo 0 >/proc/sys/net/ipv6/conf/$c/router_solicitations; echo 0 >/proc/sys/net/ipv6/conf/$c/accept_ra; done' ||
        abort v6-topology "sysctl $ns"
done
$IP -batch - <<EOF || abort v6-topology "veth pairs"
link add u1 netns h1 type veth peer name sw1 netns sw
link add u2 netns h2 type veth peer name sw2 netns sw
link add u3 netns h3 type veth peer name sw3 netns sw
link add vc1 netns h1 type veth peer name eth0 netns c1
link add vc2 netns h2 type veth peer name eth0 netns c2
link add vc3 netns h3 type veth peer name eth0 netns c3
EOF
$IP -n sw -batch - <<EOF || abort v6-topology "switch"
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
    if [ "$V6_U" = 6 ]; then
        uconf="addr add fd77::$n/64 dev u$n nodad"
    else
        # IPv6 on but without any address (addrgenmode none: no link-local, no ND, no MLD),
        # so an IPv6 default route can point at uN and a leak would be seen on the switch.
        uconf="addr add 192.168.77.$n/24 dev u$n"
        $IP -n h$n link set u$n addrgenmode none || abort v6-topology "addrgenmode h$n"
    fi
    {
        echo "link set lo up"
        echo "link set u$n up"
        echo "$uconf"
        echo "link add cbr0 type bridge"
        echo "link set cbr0 up"
        echo "link set vc$n master cbr0"
        echo "link set vc$n up"
        for f in $V6_ALL; do
            if [ "$f" = 6 ]; then
                echo "addr add fd42:0:0:$n::1/64 dev cbr0 nodad"
                echo "route add ::/0 dev u$n"
            else
                echo "addr add 10.42.$n.1/24 dev cbr0"
                echo "route add default dev u$n"
            fi
        done
    } | $IP -n h$n -batch - || abort v6-topology "host h$n"
    {
        echo "link set lo up"
        echo "link set eth0 up"
        for f in $V6_ALL; do
            if [ "$f" = 6 ]; then
                echo "addr add fd42:0:0:$n::2/64 dev eth0 nodad"
                echo "route add ::/0 via fd42:0:0:$n::1"
            else
                echo "addr add 10.42.$n.2/24 dev eth0"
                echo "route add default via 10.42.$n.1"
            fi
        done
    } | $IP -n c$n -batch - || abort v6-topology "container c$n"
    $IP netns exec h$n sh -c 'echo 1 >/proc/sys/net/ipv4/ip_forward; echo 1 >/proc/sys/net/ipv6/conf/all/forwarding
        for f in iptables ip6tables; do f=/proc/sys/net/bridge/bridge-nf-call-$f; [ ! -e $f ] || echo 0 >$f; done' ||
        abort v6-topology "forwarding h$n"
done

# Underlay counters in sw (br_netfilter: bridged IPv4 -> iptables, IPv6 -> ip6tables FORWARD).
# The kernel logs LOG rules of other namespaces than the first only with nf_log_all_netns.
f=/proc/sys/net/netfilter/nf_log_all_netns
[ ! -e $f ] || echo 1 >$f
$IP netns exec sw sh -c "echo 1 >/proc/sys/net/bridge/bridge-nf-call-iptables &&
    echo 1 >/proc/sys/net/bridge/bridge-nf-call-ip6tables &&
    printf '*filter\n-A FORWARD -p esp -m comment --comment e2e-esp\n-A FORWARD ! -p esp -m comment --comment e2e-plain\n-A FORWARD ! -p esp -s 10.42.0.0/16 -m comment --comment e2e-overlay\n-A FORWARD ! -p esp -d 10.42.0.0/16 -m comment --comment e2e-overlay\nCOMMIT\n' |
    iptables-restore --noflush -w &&
    { printf '*filter\n-A FORWARD -p esp -m comment --comment e2e-esp\n'
      for t in 130 131 132 133 134 135 136 137 143; do
          printf -- '-A FORWARD -p ipv6-icmp -m icmp6 --icmpv6-type %s -m comment --comment e2e-nd -j ACCEPT\n' \$t
      done
      # what kind a plaintext packet is, for the failure output (sw_counters): counted only
      for k in 'ipv6-icmp -m icmp6 --icmpv6-type 1' 'ipv6-icmp -m icmp6 --icmpv6-type 2' 'ipv6-icmp -m icmp6 --icmpv6-type 3' \
          'ipv6-icmp -m icmp6 --icmpv6-type 4' 'ipv6-icmp -m icmp6 --icmpv6-type 128' 'ipv6-icmp -m icmp6 --icmpv6-type 129' udp tcp; do
          printf -- '-A FORWARD -p %s -m comment --comment kind\n' \"\$k\"
      done
      # and which packet it was (kernel log; ND and ESP were accepted/counted above)
      printf -- '-A FORWARD ! -p esp -j LOG --log-prefix e2e-plain6:\n'
      printf -- '-A FORWARD ! -p esp -m comment --comment e2e-plain\n-A FORWARD ! -p esp -s fd42::/48 -m comment --comment e2e-overlay\n-A FORWARD ! -p esp -d fd42::/48 -m comment --comment e2e-overlay\nCOMMIT\n'
    } | ip6tables-restore --noflush -w" || abort v6-topology "underlay counters (br_netfilter loaded?)"
# ucounts -> "esp4 plain4 overlay4 esp6 plain6 overlay6 nd6": packets counted so far on the
# switch (one process reads both tables)
ucounts() {
    $IP netns exec sw sh -c "$IPT -nvxL FORWARD; echo ---; $IP6T -nvxL FORWARD" | awk '
        /^---/ { f = 6; next }
        /\/\* e2e-/ { c = $0; sub(/.*\/\* e2e-/, "", c); sub(/ .*/, "", c); n[c (f ? f : 4)] += $1 }
        END { printf "%d %d %d %d %d %d %d\n", n["esp4"], n["plain4"], n["overlay4"], n["esp6"], n["plain6"], n["overlay6"], n["nd6"] }'
}

# Warm-up: hosts reach each other on the underlay, containers their gateway in each family.
rm -f /tmp/warm.*
for n in $HOSTS; do
    for m in $HOSTS; do
        [ "$n" = "$m" ] && continue
        ($IP netns exec h$n $(pingf $V6_U) -c 1 -W 2 "$(uaddr $m)" >/dev/null 2>&1 || echo " h$n->h$m" >/tmp/warm.h$n$m) &
    done
    for f in $V6_ALL; do
        ($IP netns exec c$n $(pingf $f) -c 1 -W 2 "$(caddr $f $n 1)" >/dev/null 2>&1 || echo " c$n->gw/v$f" >/tmp/warm.c$n$f) &
    done
done
wait
warm=$(cat /tmp/warm.* 2>/dev/null | tr -d '\n')
[ -z "$warm" ] || abort v6-topology "underlay/bridge pings failed:$warm"
# shellcheck disable=SC2046
set -- $(ucounts)
plain4_0=$2 plain6_0=$5
ok v6-topology "underlay IPv$V6_U ($(uaddr 1) $(uaddr 2) $(uaddr 3)), overlay families: $V6_FAMS; underlay and gateway pings ok, the switch counted them: $plain4_0 IPv4, $plain6_0 IPv6 non-ESP packets"

# v6_pings "a>b ..." COUNT [FAMILIES] -> pings (in parallel) from container a to container b
# in each family (default: all overlay families); sets PING_OK / PING_FAILED
v6_pings() {
    rm -f /tmp/ping.*
    pids=""
    for f in ${3:-$V6_FAMS}; do
        for p in $1; do
            a=${p%>*} b=${p#*>}
            ($IP netns exec c$a $(pingf $f) -c "$2" -i 0.2 -W 2 -w "$V6_DEADLINE" "$(caddr $f $b 2)" >/tmp/ping.$a$b.$f 2>&1
                echo $? >/tmp/ping.$a$b.$f.rc) &
            pids="$pids $!"
        done
    done
    # shellcheck disable=SC2086
    wait $pids
    PING_OK="" PING_FAILED=""
    for f in ${3:-$V6_FAMS}; do
        for p in $1; do
            a=${p%>*} b=${p#*>}
            got=$(sed -n 's/.* \([0-9]*\) packets received.*/\1/p' /tmp/ping.$a$b.$f)
            if [ "$(cat /tmp/ping.$a$b.$f.rc)" = 0 ]; then
                PING_OK="$PING_OK c$a>c$b/v$f(${got:-?}/$2)"
            else
                PING_FAILED="$PING_FAILED c$a>c$b/v$f(${got:-?}/$2)"
            fi
        done
    done
}
ALL_PAIRS="1>2 1>3 2>1 2>3 3>1 3>2"
V6_DEADLINE=6 # seconds a ping may take (3 where it is expected to fail)
# v6_flush_check NAME -> h2's SAs flushed: pings to/from c2 fail in each family, c1<->c3
# still work (all at once)
v6_flush_check() {
    V6_DEADLINE=3
    v6_pings "$ALL_PAIRS" 2
    V6_DEADLINE=6
    fails="" oks="" others_ok="" others_bad=""
    for r in $PING_OK; do case "$r" in c2\>*|*\>c2/*) oks="$oks $r" ;; *) others_ok="$others_ok $r" ;; esac; done
    for r in $PING_FAILED; do case "$r" in c2\>*|*\>c2/*) fails="$fails $r" ;; *) others_bad="$others_bad $r" ;; esac; done
    if [ -z "$oks" ] && [ -z "$others_bad" ] && [ -n "$fails" ] && [ -n "$others_ok" ]; then
        ok "$1" "c2 unreachable in each family ($fails); c1<->c3 fine:$others_ok"
    else
        bad "$1" "to/from c2 ok:${oks:- -}; c1<->c3 failed:${others_bad:- -}"
    fi
}

# --- metadata, apply -----------------------------------------------------------------------
say "v6: apply on h1 h2 h3"
v6_meta() { # writes $META for the overlay families $V6_FAMS
    {
        cidrs=""
        for f in $V6_FAMS; do
            if [ "$f" = 6 ]; then c='"fd42::/48"'; else c='"10.42.0.0/16"'; fi
            cidrs="${cidrs:+$cidrs, }$c"
        done
        case "$V6_FAMS" in *" "*) cidrs="[$cidrs]" ;; esac
        echo "{ \"network\": { \"cidr\": $cidrs, \"backend\": \"ipsec\", \"mtu\": 1500 },"
        echo '  "hosts": ['
        for n in $HOSTS; do
            subs=""
            for f in $V6_FAMS; do
                if [ "$f" = 6 ]; then s="\"fd42:0:0:$n::/64\""; else s="\"10.42.$n.0/24\""; fi
                subs="${subs:+$subs, }$s"
            done
            echo "    { \"id\": \"h$n\", \"agent_ip\": \"$(uaddr $n)\", \"subnets\": [$subs] }$([ $n = 3 ] || echo ,)"
        done
        echo '  ] }'
    } >$META
}
v6_meta
sed 's/^/  metadata: /' $META
(umask 077 && head -c 40 /dev/urandom | base64 | tr -d "\n" >$PSK)

V6_OUT=""
v6_apply() { # N -> sets V6_OUT and LAST_WRITES; returns apply's status (99: odd summary)
    V6_OUT=$($IP netns exec h$1 $BIN apply --metadata $META --host h$1 --driver xfrm \
        --xfrm-mode $V6_XMODE --psk-file $PSK 2>&1)
    rc=$?
    line=$(echo "$V6_OUT" | grep "^xfrm: host h$1: " | tail -n 1)
    LAST_WRITES=$(echo "$line" | sed -n 's/.* \([0-9][0-9]*\) writes.*/\1/p')
    if [ $rc -eq 0 ] && ! echo "$line" | grep -q ': 2 peers, [0-9]* writes, 0 errors'; then
        echo "  h$1 apply: exit 0 but the summary line is '$line'"
        rc=99
    fi
    [ $rc -eq 0 ] || echo "$V6_OUT" | sed "s/^/  h$1 apply: /"
    return $rc
}
# v6_apply_all NAME -> apply on every host, each must write something ("CHECK NAME-hN")
v6_apply_all() {
    for n in $HOSTS; do
        ts=$(now)
        if v6_apply $n && [ "${LAST_WRITES:-0}" -gt 0 ]; then
            ok "$1-h$n" "$LAST_WRITES writes, $(awk -v a="$ts" -v b="$(now)" 'BEGIN{printf "%.2f", b-a}')s"
        else
            abort "$1-h$n" "exit $rc, writes '$LAST_WRITES'"
        fi
    done
}
v6_apply_all v6-apply

# --- the fwmark path of each family (installed by apply) -------------------------------------
# marks_all -> per host and overlay family, the packets the MARK rules of IPSEC-MESH-MARK
# have counted ("h1/v4:N h1/v6:N ...")
marks_all() {
    for n in $HOSTS; do
        # shellcheck disable=SC2016
        $IP netns exec h$n sh -c 'for f in $0; do if [ $f = 6 ]; then t=ip6tables; else t=iptables; fi
            $t -w -t mangle -nvxL IPSEC-MESH-MARK 2>/dev/null | awk -v l="$1/v$f" "/MARK/ { n += \$1 } END { printf \" %s:%d\", l, n }"; done' "$V6_FAMS" h$n
    done
}
for n in $HOSTS; do
    # One look per host: rules, table 1042 and both families' firewall.
    st=$($IP netns exec h$n sh -c "for f in 4 6; do echo \"=== rule \$f\"; $IP -\$f rule show; echo \"=== routes \$f\"; $IP -\$f route show table $RT_TABLE; done
        echo '=== fw 4'; iptables-save; echo '=== fw 6'; ip6tables-save")
    what="" miss=""
    for f in $V6_FAMS; do
        if [ "$f" = 6 ]; then cidr=fd42::/48; else cidr=10.42.0.0/16; fi
        sect() { echo "$st" | awk -v h="=== $1 $f" '/^=== / { p = ($0 == h); next } p'; }
        rule=$(sect rule | grep -c "fwmark $MARK lookup $RT_TABLE")
        routes=$(sect routes | grep -c "dev u$n")
        fw=$(sect fw)
        marks=$(echo "$fw" | grep -c -- "-A IPSEC-MESH-MARK -d $cidr .*-j MARK")
        jumps=$(echo "$fw" | grep -c -e '-A PREROUTING .*-j IPSEC-MESH-MARK' -e '-A OUTPUT .*-j IPSEC-MESH-MARK')
        guard=$(echo "$fw" | grep -c -- "-A IPSEC-MESH-GUARD -d $cidr .*--pol none -j DROP")
        what="$what v$f: rule $rule, $routes routes in $RT_TABLE, $marks MARK, $jumps jumps, $guard guard;"
        [ "$rule" -eq 1 ] && [ "$routes" -ge 1 ] && [ "$marks" -ge 1 ] && [ "$jumps" -eq 2 ] && [ "$guard" -ge 1 ] ||
            miss="$miss v$f"
    done
    if [ -z "$miss" ]; then ok "v6-fwmark-h$n" "$what"; else bad "v6-fwmark-h$n" "missing in$miss:$what"; dump_host $n; fi
done

# --- every ordered container pair, each family ---------------------------------------------
say "v6: container pings"
marks0=$(marks_all)
ping_start=$(now)
v6_pings "$ALL_PAIRS" 3
ping_took=$(awk -v a="$ping_start" -v b="$(now)" 'BEGIN{printf "%.1f", b-a}')
if [ -z "$PING_FAILED" ]; then
    ok v6-ping-all "${ping_took}s:$PING_OK"
else
    bad v6-ping-all "failed:$PING_FAILED; ok:${PING_OK:- -}"
    dump_all
fi
marks1=$(marks_all)
up=$(printf '%s\n%s\n' "$marks0" "$marks1" | awk '{ for (i = 1; i <= NF; i++) { split($i, kv, ":"); if (NR == 1) a[kv[1]] = kv[2]; else if (kv[2] <= a[kv[1]]) printf " %s(%d->%d)", kv[1], a[kv[1]], kv[2] } }')
if [ -z "$up" ]; then
    ok v6-fwmark-forwarded "the forwarded pings were marked on every host in each family (MARK packets before/after:$marks0 /$marks1)"
else
    bad v6-fwmark-forwarded "no marked forwarded packets on:$up"
fi

# --- every SA of the generation in use carried bytes ---------------------------------------
# v6_sa_fams NETNS -> how many SAs carry which inner family over which outer one ("any": the
# af-unspec flag, selector family unset)
v6_sa_fams() {
    $IP -n "$1" xfrm state | awk '
        function put() { if (o) print "v" (i ? i : "any") "-in-v" o }
        /^src / { put(); o = ($2 ~ /:/) ? 6 : 4; i = "" }
        /sel src/ { i = ($3 ~ /:/) ? 6 : 4 }
        END { put() }' | sort | uniq -c | awk '{ printf "%s%d %s", (NR > 1 ? ", " : ""), $1, $2 }'
}
# sa_lines NETNS -> "src dst spi reqid bytes packets" per SA of ours
sa_lines() {
    $IP -n "$1" -s xfrm state | awk -v lo=$REQID_MIN -v hi=$REQID_MAX '
        /^src / { src = $2; dst = $4 }
        $1 == "proto" && $3 == "spi" { spi = $4; reqid = $6 + 0 }
        /lifetime current:/ { getline; b = $0; sub(/\(bytes\).*/, "", b); gsub(/ /, "", b)
            p = $0; sub(/.*, /, "", p); sub(/\(packets\).*/, "", p)
            if (reqid >= lo && reqid <= hi) print src, dst, spi, reqid, b + 0, p + 0 }'
}
for n in $HOSTS; do
    lines=$(sa_lines h$n)
    count=$(echo "$lines" | grep -c .)
    used=$(echo "$lines" | awk 'substr($3, 10, 1) == "1" { n++ } END { print n + 0 }')
    zero=$(echo "$lines" | awk '$5 == 0 && substr($3, 10, 1) == "1" { printf " spi %s (%s->%s)", $3, $1, $2 }')
    fams=$(v6_sa_fams h$n)
    summary=$(echo "$lines" | awk 'substr($3, 10, 1) == "1" { printf "%s%s->%s %s:%dB", (n++ ? ", " : ""), $1, $2, $3, $5 }')
    # Per peer one outbound SA of generation 1 and one inbound one (of the 0, 1, 2 accepted).
    if [ "$count" -ge 8 ] && [ "$used" -ge 4 ] && [ -z "$zero" ]; then
        ok "v6-sa-bytes-h$n" "$count SAs of ours ($fams), $used of generation 1, each with bytes: $summary"
    else
        bad "v6-sa-bytes-h$n" "$count SAs ($fams; want >= 8), $used of generation 1 (want >= 4), no bytes on:${zero:- -}; $summary"
    fi
done

# --- host-originated traffic: each host pings each remote container from its cbr0 address --
say "v6: host-originated pings"
# The main table's default route points at uN: only the OUTPUT mark (IPSEC-MESH-MARK) takes
# the packet into table 1042 and the XFRM policy; a miss would leave in clear (counted).
om0=$(marks_all)
rm -f /tmp/hping.*
pids=""
for f in $V6_FAMS; do
    for n in $HOSTS; do
        for m in $HOSTS; do
            [ "$n" = "$m" ] && continue
            ($IP netns exec h$n $(pingf $f) -c 2 -i 0.2 -W 2 -w 6 -I "$(caddr $f $n 1)" "$(caddr $f $m 2)" >/tmp/hping.$n$m.$f 2>&1
                echo $? >/tmp/hping.$n$m.$f.rc) &
            pids="$pids $!"
        done
    done
done
# shellcheck disable=SC2086
wait $pids
hok="" hbad=""
for f in $V6_FAMS; do
    for n in $HOSTS; do
        for m in $HOSTS; do
            [ "$n" = "$m" ] && continue
            if [ "$(cat /tmp/hping.$n$m.$f.rc)" = 0 ]; then hok="$hok h$n>c$m/v$f"; else hbad="$hbad h$n>c$m/v$f($(tail -n 1 /tmp/hping.$n$m.$f))"; fi
        done
    done
done
om1=$(marks_all)
if [ -z "$hbad" ]; then
    ok v6-host-originated "from cbr0's address, marked in OUTPUT (MARK packets$om0 ->$om1):$hok"
else
    bad v6-host-originated "failed:$hbad; ok:${hok:- -}"
    dump_host 1
fi

# --- the underlay: ESP of its own family only, no plaintext of either family ---------------
v6_underlay() { # NAME WHAT
    u_name=$1 u_what=$2
    # shellcheck disable=SC2046
    set -- $(ucounts)
    esp4=$1 p4=$(($2 - plain4_0)) o4=$3 esp6=$4 p6=$(($5 - plain6_0)) o6=$6 nd=$7
    if [ "$V6_U" = 6 ]; then espu=$esp6 espo=$esp4; else espu=$esp4 espo=$esp6; fi
    msg="ESP over IPv$V6_U $espu, over the other family $espo; other IPv4 $p4, other IPv6 $p6 (neighbour discovery $nd apart); with container addresses IPv4 $o4, IPv6 $o6"
    if [ "$espu" -gt 0 ] && [ "$espo" -eq 0 ] && [ "$p4" -eq 0 ] && [ "$p6" -eq 0 ] && [ "$o4" -eq 0 ] && [ "$o6" -eq 0 ]; then
        ok "$u_name" "$u_what: $msg"
    else
        bad "$u_name" "$u_what: $msg"
        sw_counters
    fi
}
v6_underlay v6-no-plaintext "after the container and host pings"

# --- a second apply writes nothing ---------------------------------------------------------
say "v6: no-op applies"
for n in $HOSTS; do
    if v6_apply $n && [ "$LAST_WRITES" = 0 ]; then ok "v6-noop-h$n" "0 writes"; else bad "v6-noop-h$n" "exit $rc, writes '$LAST_WRITES'"; fi
done

# --- fail closed: h2 loses its SAs -------------------------------------------------------------
say "v6: flushing h2's SAs"
out_ns0=$(v6_stat h2 XfrmOutNoStates) blk0=$(v6_stat h2 XfrmOutPolBlock) in_ns0=$(v6_stat h2 XfrmInNoStates)
$IP -n h2 xfrm state flush || abort v6-flush "ip xfrm state flush in h2"
v6_flush_check v6-no-sa-pings
out_ns1=$(v6_stat h2 XfrmOutNoStates) blk1=$(v6_stat h2 XfrmOutPolBlock) in_ns1=$(v6_stat h2 XfrmInNoStates)
drops="h2 XfrmOutNoStates $out_ns0->$out_ns1, XfrmOutPolBlock $blk0->$blk1, XfrmInNoStates $in_ns0->$in_ns1"
if [ $((out_ns1 + blk1)) -gt $((out_ns0 + blk0)) ] && [ "$in_ns1" -gt "$in_ns0" ]; then
    ok v6-no-sa-dropped "$drops"
else
    bad v6-no-sa-dropped "$drops"
fi
v6_underlay v6-no-sa-no-plaintext "h2 without SAs"
ts=$(now)
if v6_apply 2 && [ "${LAST_WRITES:-0}" -gt 0 ]; then ok v6-reapply-h2 "$LAST_WRITES writes"; else bad v6-reapply-h2 "exit $rc, writes '$LAST_WRITES'"; fi
v6_pings "$ALL_PAIRS" 3
if [ -z "$PING_FAILED" ]; then ok v6-recovered "apply + pings in $(awk -v a="$ts" -v b="$(now)" 'BEGIN{printf "%.1f", b-a}')s:$PING_OK"; else bad v6-recovered "failed:$PING_FAILED; ok:${PING_OK:- -}"; dump_all; fi
v6_underlay v6-recovered-no-plaintext "after the recovery"
if v6_apply 2 && [ "$LAST_WRITES" = 0 ]; then ok v6-noop-after-recovery-h2 "0 writes"; else bad v6-noop-after-recovery-h2 "exit $rc, writes '$LAST_WRITES'"; fi

# --- a change of overlay family (e2e.switch=F) -----------------------------------------------
if [ -n "$V6_SWITCH" ]; then
    say "v6: overlay family switch: $V6_FAMS -> $V6_SWITCH"
    old_fams=$V6_FAMS
    V6_FAMS=$V6_SWITCH
    v6_meta
    for n in $HOSTS; do
        if v6_apply $n && [ "${LAST_WRITES:-0}" -gt 0 ]; then ok "v6-switch-apply-h$n" "$LAST_WRITES writes"; else bad "v6-switch-apply-h$n" "exit $rc, writes '$LAST_WRITES'"; fi
    done
    for n in $HOSTS; do
        left=""
        for f in $old_fams; do
            [ "$f" = "$V6_SWITCH" ] && continue
            if [ "$f" = 6 ]; then t="$IP6T" cidr=fd42::/48 re=':'; else t="$IPT" cidr=10.42.0.0/16 re='^src [0-9.]* '; fi
            $IP -$f -n h$n rule show | grep -q "lookup $RT_TABLE" && left="$left v$f-rule"
            [ -z "$($IP -$f -n h$n route show table $RT_TABLE)" ] || left="$left v$f-routes"
            # shellcheck disable=SC2086
            $IP netns exec h$n $t -t mangle -S 2>/dev/null | grep -q -- "-d $cidr .*-j MARK" && left="$left v$f-MARK"
            np=$($IP -n h$n xfrm policy | grep '^src' | grep -c -e "$re")
            [ "$np" -eq 0 ] || left="$left $np-v$f-policies"
        done
        if [ -z "$left" ]; then
            ok "v6-switch-old-gone-h$n" "no rule, route, MARK rule or policy of the old family; SAs now: $(v6_sa_fams h$n)"
        else
            bad "v6-switch-old-gone-h$n" "left of the old family after the switch:$left"
        fi
    done
    v6_pings "$ALL_PAIRS" 3
    if [ -z "$PING_FAILED" ]; then ok v6-switch-ping-all "$PING_OK"; else bad v6-switch-ping-all "failed:$PING_FAILED; ok:${PING_OK:- -}"; dump_all; fi
    zero=""
    for n in $HOSTS; do
        z=$(sa_lines h$n | awk -v h=$n '$5 == 0 && substr($3, 10, 1) == "1" { printf " h%s:%s", h, $3 }')
        zero="$zero$z"
    done
    if [ -z "$zero" ]; then ok v6-switch-sa-bytes "every generation-1 SA of every host carried bytes"; else bad v6-switch-sa-bytes "no bytes on:$zero"; fi
    v6_underlay v6-switch-no-plaintext "after the family switch"
fi

# --- cleanup (twice) -----------------------------------------------------------------------------
say "v6: cleanup"
for n in $HOSTS; do
    out1=$($IP netns exec h$n $BIN cleanup --driver xfrm --xfrm-mode policy 2>&1)
    rc1=$?
    out2="" rc2=0
    if [ $n = 1 ]; then # a second cleanup on one host: nothing to do, exit 0
        out2=$($IP netns exec h$n $BIN cleanup --driver xfrm --xfrm-mode policy 2>&1)
        rc2=$?
    fi
    left=""
    [ "$(sa_lines h$n | grep -c .)" -eq 0 ] || left="$left SAs"
    $IP -n h$n xfrm policy | grep -q . && left="$left policies"
    for f in 4 6; do
        $IP -$f -n h$n rule show | grep -q "lookup $RT_TABLE" && left="$left v$f-rule"
        [ -z "$($IP -$f -n h$n route show table $RT_TABLE 2>/dev/null)" ] || left="$left v$f-routes-in-$RT_TABLE"
    done
    $IP netns exec h$n iptables-save | grep -q IPSEC-MESH- && left="$left iptables-chains"
    $IP netns exec h$n ip6tables-save | grep -q IPSEC-MESH- && left="$left ip6tables-chains"
    if [ $rc1 -eq 0 ] && [ $rc2 -eq 0 ] && [ -z "$left" ]; then
        ok "v6-cleanup-h$n" "nothing of ours left in either family$([ $n = 1 ] && echo "; second cleanup ok")"
    else
        bad "v6-cleanup-h$n" "exit $rc1/$rc2; left:${left:- nothing}; $out1 $out2"
        dump_host $n
    fi
done

# --- route mode, the same hosts and containers (issue 12 item 0 with issue 18) ---------------
# `apply --driver xfrm --xfrm-mode route` with the first overlay families again (dual-stack
# in CI): one XFRM interface per peer carries both inner families over this underlay, three
# `0/0` policies per peer and family bound to its interface id, 2 inbound underlay blocks per
# family, per family the rule `to <overlay> lookup 1042`, `unreachable <overlay>`, a `throw`
# for the host's own subnet and the remote subnets routed into the peers' interfaces; the
# reverse-path rule (mangle IPSEC-MESH-RPF) in iptables and ip6tables. Checks: apply; those
# objects; every ordered container pair in each family; every SA of the generation in use
# carries bytes; host-originated pings from cbr0's address (own subnet: the source the
# reverse-path check accepts); nothing in clear on the underlay; a second apply writes
# nothing; IPv6 spoofing: h2 sending to c1 with a source in h3's subnet is dropped by h1's
# ip6tables rpfilter rule, with one in its own subnet it is answered; h2's SAs flushed ->
# c2 unreachable in each family, c1<->c3 fine, nothing in clear; apply on h2 -> back;
# cleanup leaves nothing of ours in either family.
# With nft in the image (v6-u6; integration/vm/test-xfrm.sh) `--xfrm-route-devices auto` picks
# one collect_md interface `imxmesh` for all peers, its routes carrying the peer's interface
# id, and the source check is the nft table inet ipsec-mesh-src (the spoofed IPv6 packets are
# dropped there); without (v6-u4) an interface per peer.
v6_underlay v6-policy-cleanup-no-plaintext "after the policy-mode cleanup"
say "v6: route mode (XFRM interfaces), overlay families: $V6_FAMS0"
V6_FAMS=$V6_FAMS0
V6_XMODE=route
v6_meta
RT6_ONE=0
command -v nft >/dev/null && RT6_ONE=1
rt6_rpf_drops() { # NETNS FAMILY -> packets the reverse-path rule (and the source check) dropped
    if [ "$2" = 6 ]; then t="$IP6T"; else t="$IPT"; fi
    # shellcheck disable=SC2086
    d=$($IP netns exec "$1" $t -t mangle -nvxL IPSEC-MESH-RPF 2>/dev/null | awk '/rpfilter/ { print $1 }')
    if [ "$RT6_ONE" = 1 ]; then
        d=$((${d:-0} + $($IP netns exec "$1" nft list table inet ipsec-mesh-src | awk '/ drop/ { for (i = 1; i < NF; i++) if ($i == "packets") n += $(i + 1) } END { print n + 0 }')))
    fi
    echo "$d"
}
v6_apply_all v6-route-apply
nf=$(echo $V6_FAMS | wc -w)
if [ "$RT6_ONE" = 1 ]; then want_links=1 what_links="1 collect_md xfrm interface imxmesh"; else want_links=2 what_links="2 xfrm interfaces"; fi
for n in $HOSTS; do
    if [ "$RT6_ONE" = 1 ]; then
        links=$($IP -n h$n -d -o link show type xfrm | grep ': imxmesh@.* group 1042 ' | grep -c 'xfrm external')
        others=$($IP -n h$n -o link show type xfrm | grep -c -v ': imxmesh@')
    else
        links=$($IP -n h$n -d -o link show type xfrm | grep -c ': imx[0-9a-f]*@.* group 1042 ')
        others=$($IP -n h$n -o link show type xfrm | grep -c -v ': imx[0-9a-f]*@')
    fi
    pols=$($IP -n h$n xfrm policy | grep -c '^src')
    bound=$($IP -n h$n xfrm policy | grep -c 'if_id 0x5')
    blocks=$($IP -n h$n xfrm policy | grep -B2 'action block' | grep -c "dev u$n")
    states=$($IP -n h$n xfrm state | grep -c '^src')
    sa_bound=$($IP -n h$n xfrm state | grep -c 'if_id 0x5')
    what="" miss=""
    for f in $V6_FAMS; do
        if [ "$f" = 6 ]; then cidr=fd42::/48 own=fd42:0:0:$n::/64 t="$IP6T"; else cidr=10.42.0.0/16 own=10.42.$n.0/24 t="$IPT"; fi
        rt=$($IP -$f -n h$n route show table $RT_TABLE)
        rule=$($IP -$f -n h$n rule show | grep -c "from all to $cidr lookup $RT_TABLE")
        unreach=$(echo "$rt" | grep -c "^unreachable $cidr")
        throw=$(echo "$rt" | grep -c "^throw $own")
        # shellcheck disable=SC2086
        rpf=$($IP netns exec h$n $t -t mangle -S IPSEC-MESH-RPF 2>/dev/null | grep -c -- '-i imx+ -m rpfilter --invert -j DROP')
        routed="" unrouted=""
        for m in $HOSTS; do
            [ "$m" = "$n" ] && continue
            got=$($IP -$f -n h$n route get "$(caddr $f $m 2)")
            dev=$(echo "$got" | sed -n 's/.* dev \(imx[0-9a-z]*\) .*/\1/p')
            [ "$RT6_ONE" = 0 ] || echo "$got" | grep -q 'encap xfrm if_id' || dev=""
            if [ -n "$dev" ]; then routed="$routed c$m->$dev"; else unrouted="$unrouted c$m"; fi
        done
        what="$what v$f: rule to $cidr $rule, unreachable $unreach, throw $own $throw, rpfilter rule $rpf,$routed;"
        [ "$rule" -eq 1 ] && [ "$unreach" -eq 1 ] && [ "$throw" -eq 1 ] && [ "$rpf" -eq 1 ] && [ -z "$unrouted" ] ||
            miss="$miss v$f(not routed:${unrouted:- -})"
    done
    if [ "$links" -eq "$want_links" ] && [ "$others" -eq 0 ] && [ "$pols" -eq $((8 * nf)) ] && [ "$bound" -eq $((6 * nf)) ] && [ "$blocks" -eq $((2 * nf)) ] &&
        [ "$states" -eq 8 ] && [ "$sa_bound" -eq 8 ] && [ -z "$miss" ]; then
        ok "v6-route-objects-h$n" "$what_links, $pols policies ($bound bound to an if_id, $blocks underlay blocks), 8 SAs bound ($(v6_sa_fams h$n));$what"
    else
        bad "v6-route-objects-h$n" "links $links (want $want_links), other xfrm links $others (0), policies $pols ($((8 * nf))), bound $bound ($((6 * nf))), underlay blocks $blocks ($((2 * nf))), SAs $states (8), bound SAs $sa_bound (8), missing in:${miss:- -};$what"
        dump_host $n
    fi
done
v6_pings "$ALL_PAIRS" 3
if [ -z "$PING_FAILED" ]; then ok v6-route-ping-all "$PING_OK"; else bad v6-route-ping-all "failed:$PING_FAILED; ok:${PING_OK:- -}"; dump_all; fi
zero="" used=0
for n in $HOSTS; do
    lines=$(sa_lines h$n)
    used=$((used + $(echo "$lines" | awk 'substr($3, 10, 1) == "1" { n++ } END { print n + 0 }')))
    zero="$zero$(echo "$lines" | awk -v h=$n '$5 == 0 && substr($3, 10, 1) == "1" { printf " h%s:%s", h, $3 }')"
done
if [ "$used" -ge 12 ] && [ -z "$zero" ]; then
    ok v6-route-sa-bytes "all $used generation-1 SAs of the 3 hosts carried bytes"
else
    bad v6-route-sa-bytes "$used generation-1 SAs (want >= 12), no bytes on:${zero:- -}"
fi
hok="" hbad=""
for f in $V6_FAMS; do
    for n in $HOSTS; do
        for m in $HOSTS; do
            [ "$n" = "$m" ] && continue
            if $IP netns exec h$n $(pingf $f) -c 1 -W 2 -I "$(caddr $f $n 1)" "$(caddr $f $m 2)" >/dev/null 2>&1; then
                hok="$hok h$n>c$m/v$f"
            else
                hbad="$hbad h$n>c$m/v$f"
            fi
        done
    done
done
if [ -z "$hbad" ]; then ok v6-route-host-originated "from cbr0's address:$hok"; else bad v6-route-host-originated "failed:$hbad; ok:${hok:- -}"; fi
v6_underlay v6-route-no-plaintext "route mode, after the container and host pings"
for n in $HOSTS; do
    if v6_apply $n && [ "$LAST_WRITES" = 0 ]; then ok "v6-route-noop-h$n" "0 writes"; else bad "v6-route-noop-h$n" "exit $rc, writes '$LAST_WRITES'"; fi
done
case " $V6_FAMS " in
*" 6 "*)
    spoof=fd42:0:0:3::9 mine=fd42:0:0:2::9
    $IP -n h2 addr add $spoof/128 dev lo nodad && $IP -n h2 addr add $mine/128 dev lo nodad ||
        abort v6-route-spoof "addr add on h2"
    d0=$(rt6_rpf_drops h1 6)
    $IP netns exec h2 ping -6 -c 3 -i 0.2 -W 1 -w 4 -I $spoof fd42:0:0:1::2 >/dev/null 2>&1
    rc_s=$?
    d1=$(rt6_rpf_drops h1 6)
    $IP netns exec h2 ping -6 -c 3 -i 0.2 -W 1 -w 4 -I $mine fd42:0:0:1::2 >/dev/null 2>&1
    rc_m=$?
    d2=$(rt6_rpf_drops h1 6)
    msg="h2 as h3's $spoof: ping rc $rc_s, h1's $([ "$RT6_ONE" = 1 ] && echo "source check (nft)" || echo "ip6tables rpfilter rule") dropped $((d1 - d0)); h2 with its own $mine: ping rc $rc_m, dropped $((d2 - d1))"
    if [ "$rc_s" -ne 0 ] && [ $((d1 - d0)) -ge 3 ] && [ "$rc_m" -eq 0 ] && [ "$d2" -eq "$d1" ]; then
        ok v6-route-spoof "$msg"
    else
        bad v6-route-spoof "$msg"
        dump_host 1
    fi
    $IP -n h2 addr del $spoof/128 dev lo
    $IP -n h2 addr del $mine/128 dev lo
    ;;
esac
out_ns0=$(v6_stat h2 XfrmOutNoStates) in_ns0=$(v6_stat h2 XfrmInNoStates)
$IP -n h2 xfrm state flush || abort v6-route-flush "ip xfrm state flush in h2"
v6_flush_check v6-route-no-sa-pings
out_ns1=$(v6_stat h2 XfrmOutNoStates) in_ns1=$(v6_stat h2 XfrmInNoStates)
drops="h2 XfrmOutNoStates $out_ns0->$out_ns1, XfrmInNoStates $in_ns0->$in_ns1"
if [ "$out_ns1" -gt "$out_ns0" ] && [ "$in_ns1" -gt "$in_ns0" ]; then ok v6-route-no-sa-dropped "$drops"; else bad v6-route-no-sa-dropped "$drops"; fi
v6_underlay v6-route-no-sa-no-plaintext "route mode, h2 without SAs"
if v6_apply 2 && [ "${LAST_WRITES:-0}" -gt 0 ]; then ok v6-route-reapply-h2 "$LAST_WRITES writes"; else bad v6-route-reapply-h2 "exit $rc, writes '$LAST_WRITES'"; fi
v6_pings "$ALL_PAIRS" 3
if [ -z "$PING_FAILED" ]; then ok v6-route-recovered "$PING_OK"; else bad v6-route-recovered "failed:$PING_FAILED; ok:${PING_OK:- -}"; dump_all; fi
for n in $HOSTS; do
    out=$($IP netns exec h$n $BIN cleanup --driver xfrm --xfrm-mode route 2>&1)
    rc=$?
    left=""
    [ -z "$($IP -n h$n -o link show type xfrm)" ] || left="$left xfrm-interfaces"
    [ -z "$($IP -n h$n xfrm state)" ] || left="$left SAs"
    $IP -n h$n xfrm policy | grep -q . && left="$left policies"
    for f in 4 6; do
        $IP -$f -n h$n rule show | grep -q "lookup $RT_TABLE" && left="$left v$f-rule"
        [ -z "$($IP -$f -n h$n route show table $RT_TABLE 2>/dev/null)" ] || left="$left v$f-routes-in-$RT_TABLE"
    done
    $IP netns exec h$n iptables-save | grep -q IPSEC-MESH- && left="$left iptables-chains"
    $IP netns exec h$n ip6tables-save | grep -q IPSEC-MESH- && left="$left ip6tables-chains"
    if command -v nft >/dev/null && $IP netns exec h$n nft list table inet ipsec-mesh-src >/dev/null 2>&1; then
        left="$left nft-table-ipsec-mesh-src"
    fi
    if [ $rc -eq 0 ] && [ -z "$left" ]; then
        ok "v6-route-cleanup-h$n" "nothing of ours left in either family"
    else
        bad "v6-route-cleanup-h$n" "exit $rc; left:${left:- nothing}; $out"
        dump_host $n
    fi
done
v6_underlay v6-route-cleanup-no-plaintext "after the route-mode cleanup"

# --- encrypted VXLAN over the IPv6 underlay (v6-u6 only) ---------------------------------------
# `apply --driver vxlan --vxlan-encrypt` on the same hosts and containers: vtep1042 with an
# IPv6 local address and IPv6 FDB remotes, its UDP 4789 packets in ESP transport-mode SAs
# between the fd77:: addresses. Checks: apply; every container pair pings in each family; the
# underlay carries IPv6 ESP only (plaintext VXLAN would count as other IPv6); the objects
# (transport SAs over IPv6, local fd77::N, MTU 1393 = 1500 - 70 - 37); a second apply writes
# nothing; h2's SAs flushed -> c2 unreachable, c1<->c3 fine, nothing in clear; apply on h2
# -> back; h2's cleanup while c1 sends to c2 sends no ICMP error in clear; cleanup leaves
# nothing of ours.
if [ "$V6_U" = 6 ]; then
    say "v6: encrypted VXLAN over IPv6"
    # The vxlan backend takes one overlay family (a dual-stack vxlan network is refused): IPv4
    # from a dual-stack run, else the family the xfrm part ended with.
    case "$V6_FAMS" in *" "*) V6_FAMS=4 ;; esac
    v6_meta
    sed 's/"backend": "ipsec"/"backend": "vxlan"/' $META >/tmp/mesh-vxlan.json
    VX_OUT=""
    vx6_apply() { # N -> sets VX_OUT; returns apply's status
        VX_OUT=$($IP netns exec h$1 $BIN apply --metadata /tmp/mesh-vxlan.json --host h$1 --driver vxlan \
            --vxlan-encrypt --psk-file $PSK 2>&1)
    }
    for n in $HOSTS; do
        if vx6_apply $n; then
            ok "v6-vxesp-apply-h$n" "$(echo "$VX_OUT" | grep '^vxlan: host' | tail -n 1)"
        else
            echo "$VX_OUT" | sed "s/^/  h$n apply: /"
            bad "v6-vxesp-apply-h$n" "apply failed"
        fi
    done
    v6_underlay v6-vxesp-applied-no-plaintext "encrypted VXLAN applied, before any ping"
    v6_pings "$ALL_PAIRS" 3
    if [ -z "$PING_FAILED" ]; then ok v6-vxesp-ping-all "$PING_OK"; else bad v6-vxesp-ping-all "failed:$PING_FAILED; ok:${PING_OK:- -}"; dump_all; fi
    v6_underlay v6-vxesp-underlay "encrypted VXLAN"
    st=$($IP -n h1 xfrm state)
    lk=$($IP -d -n h1 link show vtep1042)
    fdb=$(bridge -n h1 fdb show dev vtep1042 | grep -c 'dst fd77::[23] ')
    tr=$(echo "$st" | grep -c 'mode transport')
    if [ "$tr" -ge 4 ] && echo "$st" | grep -q '^src fd77::1 dst fd77::2' && echo "$lk" | grep -q 'mtu 1393 ' &&
        echo "$lk" | grep -q 'local fd77::1 ' && [ "$fdb" -ge 2 ]; then
        ok v6-vxesp-objects "h1: $tr transport-mode SAs over IPv6, vtep1042 local fd77::1 mtu 1393 (1500 - 70 - 37), $fdb FDB entries to fd77::2/3"
    else
        bad v6-vxesp-objects "transport SAs $tr, FDB to fd77:: $fdb; $(echo "$st" | head -n 3 | tr '\n' ' '); $(echo "$lk" | tr '\n' ' ')"
    fi
    vx6_apply 1
    if echo "$VX_OUT" | grep -q ': 2 peers, 0 writes, 0 errors'; then ok v6-vxesp-noop-h1 "0 writes"; else bad v6-vxesp-noop-h1 "$VX_OUT"; fi
    $IP -n h2 xfrm state flush
    v6_flush_check v6-vxesp-no-sa
    v6_underlay v6-vxesp-no-sa-no-plaintext "h2 without SAs"
    vx6_apply 2 || bad v6-vxesp-reapply "$VX_OUT"
    v6_pings "$ALL_PAIRS" 3
    if [ -z "$PING_FAILED" ]; then ok v6-vxesp-recovered "$PING_OK"; else bad v6-vxesp-recovered "failed:$PING_FAILED"; dump_all; fi
    # Cleanup under traffic: h2 first, while c1 sends to c2 every 10 ms (h1 encrypts it to
    # h2 all along). Were h2's SAs still there once its VXLAN device is gone, h2 would answer
    # each decrypted packet with an ICMPv6 port unreachable quoting it, in clear (no UDP
    # policy matches ICMP); the SAs go first (driver::EspPart), so h2 just drops the ESP.
    unreach6() { $IP netns exec sw $IP6T -nvxL FORWARD | awk '/ipv6-icmptype 1 / && /kind/ { print $1 }'; }
    # shellcheck disable=SC2046
    set -- $(ucounts)
    esp_a=$4 un_a=$(unreach6)
    $IP netns exec c1 ping -q -i 0.01 -w 20 10.42.2.2 >/dev/null 2>&1 &
    flood=$!
    sleep 1
    for n in 2 1 3; do
        out=$($IP netns exec h$n $BIN cleanup --driver vxlan --vxlan-encrypt 2>&1)
        rc=$?
        if [ $n = 2 ]; then
            sleep 0.5
            kill $flood 2>/dev/null
            wait $flood 2>/dev/null
            # shellcheck disable=SC2046
            set -- $(ucounts)
            esp_b=$4 un_b=$(unreach6)
            msg="ESP on the underlay during it $esp_a->$esp_b; ICMPv6 destination unreachable in clear $un_a->$un_b"
            if [ "$esp_b" -gt "$esp_a" ] && [ "$un_b" = "$un_a" ]; then
                ok v6-vxesp-cleanup-under-traffic "$msg"
            else
                bad v6-vxesp-cleanup-under-traffic "$msg"
                sw_counters
            fi
        fi
        if [ $rc -eq 0 ] && ! $IP -n h$n link show vtep1042 >/dev/null 2>&1 &&
            [ -z "$($IP -n h$n xfrm policy)$($IP -n h$n xfrm state)" ]; then
            ok "v6-vxesp-cleanup-h$n" "nothing of ours left"
        else
            bad "v6-vxesp-cleanup-h$n" "exit $rc; $out"
        fi
    done
fi

say "done in $(awk -v a="$t0" -v b="$(now)" 'BEGIN{printf "%.1f", b-a}')s"
if [ -n "$FAILED" ]; then
    echo "VM-RESULT: FAIL (v6-u$V6_U:$FAILED)"
    exit 1
fi
echo "VM-RESULT: PASS"
exit 0

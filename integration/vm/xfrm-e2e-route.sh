# Sourced by xfrm-e2e.sh (busybox sh, inside the test VM) after the topology is built, when
# the kernel command line says e2e.mode=route: `apply --driver xfrm` with the default
# `--xfrm-mode auto`, which must pick route mode here (one XFRM interface per peer,
# dataplane/xfrmi; the re-apply on h2 says `--xfrm-mode route`), end to end with real ESP.
# Uses xfrm-e2e.sh's topology, helpers (ok, bad, abort, ping_pairs, underlay_count,
# dump_all) and variables, and ends the run (VM-RESULT).
#
# Metadata: every host has several /32s scattered over 10.42.0.0/16 (Rancher-like), one of
# them its live container (10.42.N.2). Checks: apply on each host; per host 2 xfrm interfaces
# (group 1042), 3 x 2 + 2 policies of ours (6 bound to an interface id), 8 SAs bound to one,
# every remote /32 routed into its peer's interface and `unreachable 10.42.0.0/16`; the 6
# container pings; every SA of the generation in use carries packets; nothing but ESP on the
# underlay; a second apply writes nothing; h2's SAs flushed -> c2 unreachable, c1<->c3 fine,
# nothing in clear; apply on h2 -> all pings back; cleanup leaves nothing of ours.
# The reverse-path check (a peer may send only with its own prefixes as sources): rule
# `to 10.42.0.0/16 lookup 1042`, a `throw` route per own /32, the firewall's rpfilter rule;
# h2 sends through the tunnel to c1 with a source of h3's (10.42.250.1) and one of h1's own
# (10.42.137.9): c1 sees none, h1's check drops them (its imx for h2 received them);
# h2 with a source of its own (10.42.99.14) gets every reply; h2 with its default source
# (its underlay address) is dropped too, as in policy mode. h3 runs with
# net.ipv4.conf.all.rp_filter=1: the kernel skips it for decrypted packets (secpath), so
# strict reverse-path filtering neither breaks route mode nor is needed.
# This image has nft beside iptables, so `--xfrm-route-devices auto` picks one interface
# for all peers (`imxmesh`, collect_md, kernel >= 6.0): the objects check expects it, every
# remote /32 routed into it with its peer's interface id (`encap xfrm if_id`), and the
# source-check table `inet ipsec-mesh-src` (a chain per peer), which is what drops the
# spoofed packets here (the firewall's rpfilter rule cannot tell peers apart on one
# interface). Without nft in the image: an interface per peer, as before. (The dual-stack
# boots, xfrm-e2e-v6.sh, run route mode with an interface per peer.)

cat >$META <<'EOF'
{
  "network": { "cidr": "10.42.0.0/16", "backend": "ipsec", "mtu": 1500 },
  "hosts": [
    { "id": "h1", "agent_ip": "192.168.77.1",
      "subnets": ["10.42.1.2/32", "10.42.137.9/32", "10.42.58.77/32", "10.42.201.4/32"] },
    { "id": "h2", "agent_ip": "192.168.77.2",
      "subnets": ["10.42.2.2/32", "10.42.99.14/32", "10.42.7.200/32", "10.42.160.33/32", "10.42.41.5/32"] },
    { "id": "h3", "agent_ip": "192.168.77.3",
      "subnets": ["10.42.3.2/32", "10.42.250.1/32", "10.42.12.12/32"] }
  ]
}
EOF
(umask 077 && head -c 40 /dev/urandom | base64 | tr -d "\n" >$PSK)
RT_ONE=0
command -v nft >/dev/null && RT_ONE=1
RT_OUT=""
RT_MODE="" # the default, --xfrm-mode auto, picks route on this kernel (it has xfrm_interface)
rt_apply() { # N -> sets RT_OUT; returns apply's status
    # shellcheck disable=SC2086
    RT_OUT=$($IP netns exec h$1 $BIN apply --metadata $META --host h$1 --driver xfrm \
        $RT_MODE --psk-file $PSK 2>&1)
}
rt_summary() { echo "$RT_OUT" | grep "^xfrm: host h$1: " | tail -n 1; }
reqid_min=1342177280 reqid_max=1476395007
rt_stat() { $IP netns exec "$1" awk -v k="$2" '$1 == k { print $2 }' /proc/net/xfrm_stat; }
rt_fw_left() { # $1 = netns -> what of either firewall backend of ours is there
    if command -v nft >/dev/null && $IP netns exec "$1" nft list table inet ipsec-mesh >/dev/null 2>&1; then
        echo "table inet ipsec-mesh"
    fi
    if command -v iptables-save >/dev/null && $IP netns exec "$1" iptables-save | grep -q IPSEC-MESH-; then
        echo "IPSEC-MESH- chains/jumps"
    fi
    if command -v nft >/dev/null && $IP netns exec "$1" nft list table inet ipsec-mesh-src >/dev/null 2>&1; then
        echo "table inet ipsec-mesh-src"
    fi
}

# Strict rp_filter on h3 (the kernel ignores it for what the XFRM interfaces decrypt).
$IP netns exec h3 sh -c 'echo 1 >/proc/sys/net/ipv4/conf/all/rp_filter; echo 1 >/proc/sys/net/ipv4/conf/default/rp_filter' ||
    abort route-rp-filter "sysctl rp_filter on h3"
rt_rpf_drops() { # $1 = netns -> packets the reverse-path rule and the source check of ours dropped
    if [ "$FW" = nftables ]; then
        d=$($IP netns exec "$1" nft list chain inet ipsec-mesh rpf | awk '/fib saddr/ { for (i = 1; i < NF; i++) if ($i == "packets") print $(i + 1) }')
    else
        d=$($IP netns exec "$1" $IPT -t mangle -nvxL IPSEC-MESH-RPF | awk '/rpfilter/ { print $1 }')
    fi
    [ -n "$d" ] || return 0
    if [ "$RT_ONE" = 1 ]; then
        d=$((d + $($IP netns exec "$1" nft list table inet ipsec-mesh-src | awk '/ drop/ { for (i = 1; i < NF; i++) if ($i == "packets") n += $(i + 1) } END { print n + 0 }')))
    fi
    echo "$d"
}

for n in $HOSTS; do
    ts=$(now)
    if rt_apply $n && rt_summary $n | grep -q ': 2 peers, [1-9][0-9]* writes, 0 errors'; then
        ok "route-apply-h$n" "$(rt_summary $n), $(awk -v a="$ts" -v b="$(now)" 'BEGIN{printf "%.2f", b-a}')s"
    else
        echo "$RT_OUT" | sed "s/^/  h$n apply: /"
        abort "route-apply-h$n" "apply --xfrm-mode route failed"
    fi
done

# --- kernel objects: O(peers), whatever the number of /32s --------------------------------
for n in $HOSTS; do
    if [ "$RT_ONE" = 1 ]; then
        links=$($IP -n h$n -d -o link show type xfrm | grep ': imxmesh@.* group 1042 ' | grep -c 'xfrm external')
        want_links=1 what_links="1 collect_md xfrm interface imxmesh"
        srcchains=$($IP netns exec h$n nft list table inet ipsec-mesh-src 2>/dev/null | grep -c 'ipsec in reqid !=')
    else
        links=$($IP -n h$n -d -o link show type xfrm | grep -c ': imx[0-9a-f]*@.* group 1042 ')
        want_links=2 what_links="2 xfrm interfaces" srcchains=2
    fi
    # any other XFRM interface (one per peer left beside imxmesh, say)
    if [ "$RT_ONE" = 1 ]; then
        others=$($IP -n h$n -o link show type xfrm | grep -c -v ': imxmesh@')
    else
        others=$($IP -n h$n -o link show type xfrm | grep -c -v ': imx[0-9a-f]*@')
    fi
    pols=$($IP -n h$n xfrm policy | grep -c '^src')
    bound=$($IP -n h$n xfrm policy | grep -c 'if_id 0x5')
    blocks=$($IP -n h$n xfrm policy | grep -B2 'action block' | grep -c "dev u$n")
    states=$($IP -n h$n xfrm state | grep -c '^src')
    sa_bound=$($IP -n h$n xfrm state | grep -c 'if_id 0x5')
    unreach=$($IP -n h$n route show table $RT_TABLE | grep -c '^unreachable 10.42.0.0/16')
    throws=$($IP -n h$n route show table $RT_TABLE | grep -c '^throw 10.42.')
    own=$(awk -v h="\"h$n\"" 'f { print; exit } index($0, h) { f = 1 }' $META | grep -o '10\.42\.[0-9.]*/32' | wc -l)
    rule=$($IP -n h$n rule | grep -c "^$RT_TABLE:.*from all to 10.42.0.0/16 lookup $RT_TABLE")
    rpf=$(rt_rpf_drops h$n)
    routed="" misrouted="" ids=""
    for m in $HOSTS; do
        [ "$m" = "$n" ] && continue
        got=$($IP -n h$n route get 10.42.$m.2 mark 0x100000)
        dev=$(echo "$got" | sed -n 's/.* dev \(imx[0-9a-z]*\) .*/\1/p')
        id=$(echo "$got" | sed -n 's/.*encap xfrm if_id \([0-9a-fx]*\) .*/\1/p')
        if [ -n "$dev" ] && { [ "$RT_ONE" = 0 ] || { [ -n "$id" ] && ! echo "$ids" | grep -qw "$id"; }; }; then
            routed="$routed 10.42.$m.2->$dev${id:+ if_id $id}"
            ids="$ids $id"
        else
            misrouted="$misrouted 10.42.$m.2($got)"
        fi
    done
    nowhere=$($IP -n h$n route get 10.42.222.222 mark 0x100000 2>&1)
    if [ "$links" -eq "$want_links" ] && [ "$others" -eq 0 ] && [ "$pols" -eq 8 ] && [ "$bound" -eq 6 ] && [ "$blocks" -eq 2 ] &&
        [ "$states" -eq 8 ] && [ "$sa_bound" -eq 8 ] && [ "$unreach" -eq 1 ] && [ -z "$misrouted" ] &&
        [ "$throws" -eq "$own" ] && [ "$rule" -eq 1 ] && [ -n "$rpf" ] && [ "$srcchains" -eq 2 ] &&
        echo "$nowhere" | grep -q -i -e unreachable -e 'no route'; then
        ok "route-objects-h$n" "$what_links (group 1042), 8 policies (6 bound to an if_id, 2 inbound blocks on u$n), 8 SAs bound, unreachable 10.42.0.0/16, rule to 10.42.0.0/16, $throws throw routes (own /32s), reverse-path rule ($FW)$([ "$RT_ONE" = 1 ] && echo ", source check: a chain per peer");$routed"
    else
        bad "route-objects-h$n" "links $links (want $want_links: $what_links), other xfrm links $others (0), policies $pols (8), bound $bound (6), underlay blocks $blocks (2), states $states (8), bound SAs $sa_bound (8), unreachable $unreach (1), throws $throws ($own), rule to overlay $rule (1), rpf rule counter '${rpf}', source-check chains $srcchains (2), not routed:${misrouted:- -}, 10.42.222.222: $nowhere"
        dump_all
    fi
done

# --- traffic ------------------------------------------------------------------------------
ping_pairs "$ALL_PAIRS" 3
if [ -z "$PING_FAILED" ]; then ok route-ping-all "$PING_OK"; else bad route-ping-all "failed:$PING_FAILED; ok:$PING_OK"; dump_all; fi
for n in $HOSTS; do
    lines=$($IP -n h$n -s xfrm state | awk -v lo=$reqid_min -v hi=$reqid_max '
        /^src / { src = $2; dst = $4 }
        $1 == "proto" && $3 == "spi" { spi = $4; reqid = $6 + 0 }
        /lifetime current:/ { getline; p = $0; sub(/.*, /, "", p); sub(/\(packets\).*/, "", p)
            if (reqid >= lo && reqid <= hi) print src, dst, spi, reqid, p + 0 }')
    count=$(echo "$lines" | grep -c .)
    zero=$(echo "$lines" | awk '$5 == 0 && substr($3, 10, 1) == "1" { printf " spi %s (%s->%s)", $3, $1, $2 }')
    used=$(echo "$lines" | awk 'substr($3, 10, 1) == "1" { n++ } END { print n + 0 }')
    if [ "$count" -eq 8 ] && [ "$used" -eq 4 ] && [ -z "$zero" ]; then
        ok "route-sa-counters-h$n" "$(echo "$lines" | awk 'substr($3, 10, 1) == "1" { printf "%s%s->%s %s:%d", (n++ ? ", " : ""), $1, $2, $3, $5 }')"
    else
        bad "route-sa-counters-h$n" "$count SAs (want 8), generation-1 SAs $used (want 4), no packets on:${zero:- -}"
    fi
    xi=$($IP -n h$n -s link show type xfrm | awk '/RX:/ { getline; rx += $2 } /TX:/ { getline; tx += $2 } END { printf "rx %d tx %d", rx, tx }')
    echo "  h$n xfrm interfaces: $xi packets"
done
esp=$(underlay_count esp)
plain=$(($(underlay_count plain) - plain_base))
ov=$(underlay_count overlay)
if [ "$esp" -gt 0 ] && [ "$plain" -eq 0 ] && [ "$ov" -eq 0 ]; then
    ok route-underlay "$esp ESP packets, 0 other, 0 with container addresses"
else
    bad route-underlay "ESP $esp, other $plain, container addresses $ov"
fi
for n in $HOSTS; do
    rt_apply $n
    if rt_summary $n | grep -q ': 2 peers, 0 writes, 0 errors'; then
        ok "route-noop-h$n" "$(rt_summary $n)"
    else
        bad "route-noop-h$n" "$RT_OUT"
    fi
done

# --- the reverse-path check: h2 sends with sources that are not its own -----------------------
# c1 counts the echo requests per source; h1's rule counts its drops; h1's interface for h2
# counts what it decrypted (so the spoofed packets did reach h1 through the tunnel).
spoof_c=10.42.250.1 spoof_a=10.42.137.9 own_b=10.42.99.14
if [ "$FW" = nftables ]; then
    $IP netns exec c1 sh -c "printf '%s\n' 'table ip spoof {' 'chain in { type filter hook input priority filter;' \
        'ip saddr { $spoof_c, $spoof_a, $own_b, 192.168.77.2 } icmp type echo-request counter' '}' '}' | nft -f -" ||
        abort route-spoof "c1 counter"
    c1_seen() { $IP netns exec c1 nft list table ip spoof | awk '/echo-request/ { for (i = 1; i < NF; i++) if ($i == "packets") print $(i + 1) }'; }
else
    $IP netns exec c1 $IPT -I INPUT -p icmp --icmp-type echo-request -m comment --comment e2e-spoof ||
        abort route-spoof "c1 counter"
    c1_seen() { $IP netns exec c1 $IPT -nvxL INPUT | awk '/e2e-spoof/ { print $1 }'; }
fi
imx_h2=$($IP -n h1 route get 10.42.2.2 | sed -n 's/.* dev \(imx[0-9a-z]*\) .*/\1/p')
imx_rx() { $IP -n h1 -s link show "$imx_h2" | awk '/RX:/ { getline; print $2 }'; }
SPOOF_LINES="" SPOOF_BAD=""
spoof_try() { # SRC WHAT expect(pass|drop); 3 echo requests from h2 with source SRC to c1
    s0=$(c1_seen) d0=$(rt_rpf_drops h1) r0=$(imx_rx)
    if [ "$1" = default ]; then
        $IP netns exec h2 ping -c 3 -i 0.2 -W 1 -w 4 10.42.1.2 >/dev/null 2>&1
    else
        $IP netns exec h2 ping -c 3 -i 0.2 -W 1 -w 4 -I "$1" 10.42.1.2 >/dev/null 2>&1
    fi
    rc=$?
    seen=$(($(c1_seen) - s0)) drops=$(($(rt_rpf_drops h1) - d0)) rx=$(($(imx_rx) - r0))
    line="$2: c1 saw $seen, h1 dropped $drops, $imx_h2 rx $rx, ping rc $rc"
    SPOOF_LINES="$SPOOF_LINES; $line"
    if [ "$3" = pass ]; then
        [ "$rc" -eq 0 ] && [ "$seen" -eq 3 ] && [ "$drops" -eq 0 ] || SPOOF_BAD="$SPOOF_BAD; $line"
    else
        [ "$rc" -ne 0 ] && [ "$seen" -eq 0 ] && [ "$drops" -ge 3 ] && [ "$rx" -ge 3 ] || SPOOF_BAD="$SPOOF_BAD; $line"
    fi
}
# First the default source (before h2 has overlay addresses on lo, which it would prefer).
spoof_try default "h2 with its default source ($($IP -n h2 route get 10.42.1.2 | sed -n 's/.* src \([0-9.]*\).*/\1/p'))" drop
for a in $spoof_c $spoof_a $own_b; do
    $IP -n h2 addr add $a/32 dev lo || abort route-spoof "addr add $a on h2"
done
spoof_try $spoof_c "h2 as h3's $spoof_c" drop
spoof_try $spoof_a "h2 as h1's own $spoof_a" drop
spoof_try $own_b "h2 with its own $own_b" pass
ping_pairs "2>1 3>1 1>2" 3
if [ -z "$SPOOF_BAD" ] && [ -z "$PING_FAILED" ]; then
    ok route-spoof "${SPOOF_LINES#; }; then $PING_OK"
else
    bad route-spoof "wrong:${SPOOF_BAD#; }; all:${SPOOF_LINES#; }; pings failed:${PING_FAILED:- -}"
    dump_all
fi
for a in $spoof_c $spoof_a $own_b; do $IP -n h2 addr del $a/32 dev lo; done

# --- fail closed: h2 loses its SAs ----------------------------------------------------------
out_ns0=$(rt_stat h2 XfrmOutNoStates) in_ns0=$(rt_stat h2 XfrmInNoStates)
$IP -n h2 xfrm state flush || abort route-flush "ip xfrm state flush in h2"
ping_pairs "1>2 3>2 2>1 2>3" 2
fails=$PING_FAILED oks=$PING_OK
ping_pairs "1>3 3>1" 2
out_ns1=$(rt_stat h2 XfrmOutNoStates) in_ns1=$(rt_stat h2 XfrmInNoStates)
plain=$(($(underlay_count plain) - plain_base))
ov=$(underlay_count overlay)
if [ -z "$oks" ] && [ -z "$PING_FAILED" ] && [ "$plain" -eq 0 ] && [ "$ov" -eq 0 ] &&
    [ "$out_ns1" -gt "$out_ns0" ] && [ "$in_ns1" -gt "$in_ns0" ]; then
    ok route-no-sa "c2 unreachable ($fails), c1<->c3 fine, nothing in clear; h2 XfrmOutNoStates $out_ns0->$out_ns1, XfrmInNoStates $in_ns0->$in_ns1"
else
    bad route-no-sa "to/from c2 ok:${oks:- -}; c1<->c3 failed:${PING_FAILED:- -}; other $plain, container addresses $ov; h2 XfrmOutNoStates $out_ns0->$out_ns1, XfrmInNoStates $in_ns0->$in_ns1"
fi
RT_MODE="--xfrm-mode route" # the explicit flag once
if rt_apply 2 && rt_summary 2 | grep -q ', 0 errors'; then ok route-reapply-h2 "$(rt_summary 2) (--xfrm-mode route)"; else bad route-reapply-h2 "$RT_OUT"; fi
RT_MODE=""
ping_pairs "$ALL_PAIRS" 3
if [ -z "$PING_FAILED" ]; then ok route-recovered "$PING_OK"; else bad route-recovered "failed:$PING_FAILED"; dump_all; fi

# --- cleanup ------------------------------------------------------------------------------
for n in $HOSTS; do
    out=$($IP netns exec h$n $BIN cleanup --driver xfrm 2>&1)
    rc=$?
    left="$($IP -n h$n -o link show type xfrm)$($IP -n h$n xfrm policy)$($IP -n h$n xfrm state)$($IP -n h$n route show table $RT_TABLE)$($IP -n h$n rule | grep "lookup $RT_TABLE")$(rt_fw_left h$n)"
    if [ $rc -eq 0 ] && [ -z "$left" ]; then
        ok "route-cleanup-h$n" "nothing of ours left"
    else
        bad "route-cleanup-h$n" "exit $rc; left: $left; $out"
    fi
done
say "done in $(awk -v a="$t0" -v b="$(now)" 'BEGIN{printf "%.1f", b-a}')s"
if [ -n "$FAILED" ]; then
    echo "VM-RESULT: FAIL (route:$FAILED)"
    exit 1
fi
echo "VM-RESULT: PASS"
exit 0

#!/bin/sh
# In-VM runner of the root cargo test suites (installed as /test.sh by test-root-suites.sh).
#
# /etc/root-suites.list: one line per suite, "SUITE THREADS TIMEOUT_SECS [FILTER...]"; the
# static test executable is /opt/root-suites/tests/SUITE. Each runs with --include-ignored
# (the root tests are #[ignore = "needs root"]); FILTERs (libtest substring filters) pick
# tests when the whole suite is too slow under TCG. Prints, per test,
#   CHECK <suite>::<test>: ok|FAIL
# (a test that was listed but never reported, e.g. after a timeout, is a FAIL), the libtest
# summary of each suite, the failures section of a failed suite, and finally
# VM-RESULT: PASS|FAIL.
#
# /opt/root-suites/bin comes first in PATH: it holds dash as `sh`, because the tests run
# `sh -c "ip ..."` and busybox's sh would run its own `ip` applet (no xfrm) instead of
# iproute2's.
PATH=/opt/root-suites/bin:/sbin:/bin:/usr/sbin:/usr/bin
export PATH
export RUST_BACKTRACE=1
export TMPDIR=/tmp
# Under TCG every `ip` process the tests run to look at the kernel takes ~0.1-0.5 s, so the
# notification-repair test cannot see a repair within 1 s even when it takes milliseconds:
# here it proves the repair came from the notification (the resync is 600 s) within 10 s.
export IPSEC_MESH_TEST_REPAIR_BOUND_MS=10000

up() { cut -d' ' -f1 /proc/uptime; }

# What the tests' kernel_has_esp() will find (same probe, in a throwaway netns).
/sbin/ip netns add esp-probe
if /sbin/ip -n esp-probe xfrm state add src 192.0.2.1 dst 192.0.2.2 proto esp spi 0x101 \
    reqid 1 mode tunnel enc 'cbc(aes)' 0x000102030405060708090a0b0c0d0e0f \
    auth-trunc 'hmac(sha256)' 0x000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f 128; then
    echo "root-suites: this kernel holds ESP SAs ($(uname -r))"
else
    echo "root-suites: this kernel cannot hold ESP SAs ($(uname -r))"
fi
/sbin/ip netns del esp-probe

failed=0
total=0
while read -r suite threads tmo filters; do
    case "$suite" in '' | '#'*) continue ;; esac
    bin="/opt/root-suites/tests/$suite"
    out="/tmp/$suite.out"
    list="/tmp/$suite.list"
    if [ ! -x "$bin" ]; then
        echo "CHECK $suite: FAIL (no test executable $bin)"
        failed=$((failed + 1))
        continue
    fi
    # shellcheck disable=SC2086 # filters are separate words on purpose
    "$bin" --list --include-ignored $filters 2>/dev/null | sed -n 's/: test$//p' >"$list"
    n=$(wc -l <"$list")
    t0=$(up)
    echo "root-suites: $suite: $n tests, --test-threads=$threads, timeout ${tmo}s${filters:+, only: $filters} (at ${t0}s)"
    # Each output line gets the seconds since the suite started: libtest prints a test's
    # line when it finishes, so that is its completion time.
    {
        # shellcheck disable=SC2086
        timeout "$tmo" "$bin" --include-ignored --test-threads="$threads" $filters 2>&1
        echo "root-suites-rc $?"
    } | while IFS= read -r l; do
        printf '%s %s\n' "$(awk -v a="$t0" -v b="$(up)" 'BEGIN { printf "%.1f", b - a }')" "$l"
    done >"$out.t"
    t1=$(up)
    rc=$(sed -n 's/^[0-9.]* root-suites-rc //p' "$out.t")
    cut -d' ' -f2- "$out.t" | grep -v '^root-suites-rc ' >"$out"
    sed -n -e "s/^\([0-9.]*\) test \(.*\) \.\.\. ok\$/CHECK $suite::\2: ok (done at +\1s)/p" \
        -e "s/^\([0-9.]*\) test \(.*\) \.\.\. FAILED\$/CHECK $suite::\2: FAIL (done at +\1s)/p" "$out.t"
    # Listed but never reported: timed out or the executable died.
    while read -r t; do
        grep -q "^test $t \.\.\. " "$out" ||
            echo "CHECK $suite::$t: FAIL (no result: exit $rc after $(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.0f", b - a }')s)"
    done <"$list"
    summary=$(grep '^test result:' "$out")
    echo "root-suites: $suite: ${summary:-no libtest summary} (exit $rc, $(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.1f", b - a }')s wall)"
    total=$((total + n))
    if [ "$rc" -ne 0 ] || [ -z "$summary" ]; then
        failed=$((failed + 1))
        echo "----- $suite: output (failures section, or the tail) -----"
        if grep -q '^failures:$' "$out"; then
            sed -n '/^failures:$/,$p' "$out"
        else
            tail -n 60 "$out"
        fi
        echo "----- end of $suite output -----"
    fi
done </etc/root-suites.list

echo "root-suites: $total tests in all at $(up)s"
if [ "$failed" -eq 0 ]; then
    echo "VM-RESULT: PASS"
else
    echo "VM-RESULT: FAIL ($failed suites failed)"
fi

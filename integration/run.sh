#!/usr/bin/env bash
# The project's test entry point.
#
#   integration/run.sh all     # the one test command (CI runs exactly this, as root): installs
#                              # what the tests need, then lint + every cargo test including
#                              # the root suites (--include-ignored) + the VM suites
#   integration/run.sh unit    # fmt, clippy, cargo test (without root the root tests show
#                              # as "ignored"; as root they run)
#   integration/run.sh netns   # the root-only netns suites on this machine's kernel
#   integration/run.sh vm      # real-ESP tests in Debian's kernel under qemu (root)
#   integration/run.sh vxlan   # the vxlan driver's netns end-to-end suite (root)
#   integration/run.sh charon  # the charon driver against real charon-systemd per netns (root)
#
# Root-only tests are #[ignore = "needs root..."], so a plain `cargo test` reports them as
# ignored, never as passed. As root this script runs them with --include-ignored, and `all`
# fails when it is not root or when any test was still ignored (skipped).
#
# It closes with one line "tests: N passed, M failed, K skipped", on success and on failure:
# cargo's counts plus every "CHECK name: ok|FAIL" line the VM suites print; a stage that
# fails without counting tests (fmt, clippy, a build, a VM that never ran its checks)
# counts as one failure and is named.
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
top=$(cd "$here/.." && pwd)
cd "$top" || exit 2

say() { printf '\n==> %s\n' "$*"; }
is_root() { [ "$(id -u)" -eq 0 ]; }

work=$(mktemp -d)
cargo_log="$work/cargo.log"  # cargo test output (for "test result:" lines)
checks_log="$work/checks.log" # CHECK lines of the VM suites
: >"$cargo_log"
: >"$checks_log"
failed_stages=()
summary_done=0

fail_stage() {
    failed_stages+=("$1")
    echo "FAILED: $1" >&2
}

summary() {
    [ "$summary_done" -eq 0 ] || return
    summary_done=1
    local cp cf ci vp vf
    read -r cp cf ci < <(awk '/^test result:/ {
            for (i = 1; i <= NF; i++) {
                if ($(i) ~ /^passed;?$/) p += $(i - 1)
                if ($(i) ~ /^failed;?$/) f += $(i - 1)
                if ($(i) ~ /^ignored;?$/) g += $(i - 1)
            }
        } END { print p + 0, f + 0, g + 0 }' "$cargo_log")
    vp=$(grep -c -E '^CHECK [^ ]+: ok' "$checks_log")
    vf=$(grep -c -E '^CHECK [^ ]+: FAIL' "$checks_log")
    # Stages that failed without a failing test or check of their own (fmt, clippy, a build
    # error, a VM that never reached its checks) count once each.
    local stage_failures=0 s
    for s in "${failed_stages[@]}"; do
        case "$s" in
            cargo-test:counted | vm:*:counted) ;;
            *) stage_failures=$((stage_failures + 1)) ;;
        esac
    done
    echo
    echo "cargo test: $cp passed, $cf failed, $ci ignored; VM checks: $vp passed, $vf failed"
    if [ "${#failed_stages[@]}" -gt 0 ]; then
        echo "failed stages: ${failed_stages[*]}"
    fi
    echo "tests: $((cp + vp)) passed, $((cf + vf + stage_failures)) failed, $ci skipped"
}

finish() {
    local rc=$?
    summary
    rm -rf "$work"
    if [ "${#failed_stages[@]}" -gt 0 ] && [ "$rc" -eq 0 ]; then
        rc=1
    fi
    exit "$rc"
}
trap finish EXIT

setup() {
    if ! is_root; then
        say "not root: skipping package installation (root tests will show as ignored)"
        return
    fi
    say "installing test dependencies"
    "$here/setup.sh" || fail_stage setup
}

failed_tests() {
    awk '/^test result:/ { for (i = 1; i <= NF; i++) if ($(i) ~ /^failed;?$/) s += $(i - 1) } END { print s + 0 }' "$cargo_log"
}

# cargo test [args...]: as root with --include-ignored (root tests run), counts kept.
cargo_test() {
    local extra=()
    if is_root; then extra=(--include-ignored); fi
    local before
    before=$(failed_tests)
    cargo test --locked --no-fail-fast "$@" -- "${extra[@]}" 2>&1 | tee -a "$cargo_log"
    if [ "${PIPESTATUS[0]}" -ne 0 ]; then
        if [ "$(failed_tests)" -gt "$before" ]; then fail_stage cargo-test:counted; else fail_stage cargo-test; fi
    fi
}

unit() {
    say "cargo fmt --check"
    cargo fmt --all -- --check || fail_stage fmt
    say "cargo clippy -D warnings"
    cargo clippy --all-targets --locked -- -D warnings || fail_stage clippy
    say "cargo test"
    cargo_test
}

# As root, no test may have been skipped: every root test ran.
no_skips() {
    local ignored
    ignored=$(awk '/^test result:/ { for (i = 1; i <= NF; i++) if ($(i) ~ /^ignored;?$/) s += $(i - 1) } END { print s + 0 }' "$cargo_log")
    if [ "$ignored" -gt 0 ]; then
        grep -E '^test .* \.\.\. ignored' "$cargo_log" >&2 || true
        fail_stage "skipped:$ignored"
    fi
}

netns() {
    if ! is_root; then
        echo "netns: needs root (network namespaces); nothing run" >&2
        fail_stage netns-not-root
        return
    fi
    say "netns suites (real kernel, root)"
    local t args=()
    for t in tests/netns_*.rs; do
        args+=(--test "$(basename "$t" .rs)")
    done
    cargo_test "${args[@]}"
}

# vm_suite NAME CMD...: run one VM suite, keep its CHECK lines; a suite that fails without a
# failing CHECK line (timeout, build error) counts as one failure.
vm_suite() {
    local name="$1" out
    shift
    out="$work/vm-$name.log"
    "$@" 2>&1 | tee "$out"
    local rc=${PIPESTATUS[0]}
    tr -d '\r' <"$out" | grep -a -E '^CHECK [^ ]+: (ok|FAIL)' | sort -u | sed "s/^CHECK /CHECK $name:/" >>"$checks_log"
    if [ "$rc" -ne 0 ]; then
        if grep -q -E "^CHECK $name:[^ ]+: FAIL" "$checks_log"; then fail_stage "vm:$name:counted"; else fail_stage "vm:$name"; fi
    fi
}

# The VM suites' static release build (the ipsec-mesh binary and the root suites' test
# executables, one cargo invocation: test-root-suites.sh VM_BUILD_ONLY=1; every VM suite gets
# that binary by VM_BIN: a separate `cargo build --bin` would link another one, its
# dependencies' features unified without the dev-dependencies, ~3 min), started in the
# background at nice 19 right after setup, so it uses the CPU the host suites leave idle (most
# of their time is spent waiting on the kernel, charon and etcd). vm() waits for it; its own
# builds then find everything fresh. Its output goes to a log, shown if it fails.
prebuild_pid=""
prebuild_log="$work/vm-prebuild.log"
vm_prebuild_start() {
    is_root || return 0
    say "vm: static release build started in the background (log shown if it fails)"
    VM_BUILD_ONLY=1 nice -n 19 "$here/vm/test-root-suites.sh" >"$prebuild_log" 2>&1 &
    prebuild_pid=$!
}
vm_prebuild_wait() {
    if [ -z "$prebuild_pid" ]; then
        # `run.sh vm` alone: the same build, in the foreground.
        is_root || return 0
        say "vm: static release build (binary + root-suite test executables)"
        VM_BUILD_ONLY=1 "$here/vm/test-root-suites.sh" || fail_stage vm-build
        return 0
    fi
    say "vm: waiting for the background release build"
    if ! wait "$prebuild_pid"; then
        cat "$prebuild_log" >&2
        echo "vm: the background release build failed; the root suites build again in the foreground (the other VM suites have no binary)" >&2
    else
        tail -n 3 "$prebuild_log"
    fi
    prebuild_pid=""
}

vm() {
    vm_prebuild_wait
    if ! is_root; then
        echo "vm: needs root (qemu + kernel download); nothing run" >&2
        fail_stage vm-not-root
        return
    fi
    say "vm: real-ESP kernel under qemu"
    "$here/vm/setup.sh" || { fail_stage vm-setup; return; }
    local img
    img="$work/smoke.cpio.gz"
    "$here/vm/build-initramfs.sh" "$img" --init "$here/vm/smoke-esp.sh" || { fail_stage vm-initramfs; return; }
    vm_suite smoke "$here/vm/run.sh" "$img" 180
    say "vm: xfrm driver end to end (3 hosts, real ESP)"
    VM_BIN="${CARGO_TARGET_DIR:-$top/target}/x86_64-unknown-linux-gnu/release/ipsec-mesh" \
        vm_suite xfrm "$here/vm/test-xfrm.sh" 420
    say "vm: encrypted VXLAN end to end (ESP transport mode for UDP 4789)"
    VM_BIN="${CARGO_TARGET_DIR:-$top/target}/x86_64-unknown-linux-gnu/release/ipsec-mesh" \
        VM_APPEND="e2e.mode=vxlan-esp" vm_suite vxesp "$here/vm/test-xfrm.sh" 300
    say "vm: xfrm driver route mode end to end (one collect_md XFRM interface for all peers, nft source check, iptables backend; real ESP)"
    VM_BIN="${CARGO_TARGET_DIR:-$top/target}/x86_64-unknown-linux-gnu/release/ipsec-mesh" \
        VM_APPEND="e2e.mode=route" vm_suite route "$here/vm/test-xfrm.sh" 300
    say "vm: the same with the nftables backend (nft and no iptables in the image)"
    VM_BIN="${CARGO_TARGET_DIR:-$top/target}/x86_64-unknown-linux-gnu/release/ipsec-mesh" \
        VM_APPEND="e2e.mode=route e2e.fw=nftables" vm_suite routenft "$here/vm/test-xfrm.sh" 300
    say "vm: xfrm driver end to end with the nftables backend (nft and no iptables in the image; --firewall auto)"
    VM_BIN="${CARGO_TARGET_DIR:-$top/target}/x86_64-unknown-linux-gnu/release/ipsec-mesh" \
        VM_APPEND="e2e.mode=nftables" vm_suite xfrmnft "$here/vm/test-xfrm.sh" 300
    say "vm: xfrm driver over an IPv6-only underlay, dual-stack containers (issue 18: v6 and v4-in-v6 through one af-unspec SA pair per peer), then IPv4 only (the IPv6 objects go); encrypted VXLAN over IPv6; real ESP"
    VM_BIN="${CARGO_TARGET_DIR:-$top/target}/x86_64-unknown-linux-gnu/release/ipsec-mesh" \
        VM_APPEND="e2e.mode=v6-u6 e2e.switch=4" vm_suite xfrm6u6 "$here/vm/test-xfrm.sh" 420
    say "vm: xfrm driver over an IPv4 underlay, dual-stack containers (issue 18: v4 and v6-in-v4; real ESP)"
    VM_BIN="${CARGO_TARGET_DIR:-$top/target}/x86_64-unknown-linux-gnu/release/ipsec-mesh" \
        VM_APPEND="e2e.mode=v6-u4" vm_suite xfrm6u4 "$here/vm/test-xfrm.sh" 300
    say "vm: the ESP-sensitive root suites in a real-ESP kernel (netns_xfrm, netns_daemon, netns_charon kernel-netlink)"
    vm_suite root "$here/vm/test-root-suites.sh" 420
}

case "${1:-all}" in
    all)
        if ! is_root; then
            echo "integration/run.sh all is the CI command and must run as root (root tests and VM suites would not run)" >&2
            fail_stage not-root
            exit 1
        fi
        setup
        vm_prebuild_start
        unit
        no_skips
        vm
        if [ "${#failed_stages[@]}" -eq 0 ]; then say "all suites passed"; fi
        ;;
    unit) unit ;;
    netns) netns ;;
    vm) vm ;;
    vxlan) cargo_test --test netns_vxlan ;;
    charon) cargo_test --test netns_charon --test charon_vici --test charon_fixtures --test charon_client ;;
    setup) setup ;;
    *)
        echo "usage: $0 [all|unit|netns|vm|vxlan|charon|setup]" >&2
        exit 2
        ;;
esac

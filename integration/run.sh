#!/usr/bin/env bash
# The project's test entry point.
#
#   integration/run.sh all     # the one test command: installs what the tests need (as root),
#                              # then lint + unit/property/CLI tests + every root suite
#   integration/run.sh unit    # fmt, clippy, cargo test (no root needed; root suites skip)
#   integration/run.sh netns   # the root-only netns suites on this machine's kernel
#   integration/run.sh vm      # real-ESP tests in Debian's kernel under qemu (root)
#   integration/run.sh vxlan   # the vxlan driver's netns end-to-end suite (root)
#   integration/run.sh charon  # the charon driver against real charon-systemd per netns (root)
#
# Root suites skip loudly when not run as root; CI runs as root, where they must pass.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
top=$(cd "$here/.." && pwd)
cd "$top"

say() { printf '\n==> %s\n' "$*"; }

# Test counts for the closing line: cargo's "test result" lines, plus one per VM suite.
counts=$(mktemp)
vm_passed=0
trap 'rm -f "$counts"' EXIT
summary() {
    local passed failed
    passed=$(awk '/^test result:/ { for (i = 1; i <= NF; i++) if ($(i) ~ /^passed;?$/) s += $(i - 1) } END { print s + 0 }' "$counts")
    failed=$(awk '/^test result:/ { for (i = 1; i <= NF; i++) if ($(i) ~ /^failed;?$/) s += $(i - 1) } END { print s + 0 }' "$counts")
    echo "tests: $((passed + vm_passed)) passed, $failed failed"
}

is_root() { [ "$(id -u)" -eq 0 ]; }

setup() {
    if ! is_root; then
        say "not root: skipping package installation (root suites will skip)"
        return
    fi
    say "installing test dependencies"
    "$here/setup.sh"
}

unit() {
    say "cargo fmt --check"
    cargo fmt --all -- --check
    say "cargo clippy -D warnings"
    cargo clippy --all-targets --locked -- -D warnings
    say "cargo test"
    cargo test --locked 2>&1 | tee "$counts"
    # PIPESTATUS: cargo's status, not tee's.
    [ "${PIPESTATUS[0]}" -eq 0 ] || exit 1
}

netns() {
    if ! is_root; then
        echo "SKIP netns: needs root (network namespaces)" >&2
        return
    fi
    say "netns suites (real kernel, root)"
    local t args=()
    for t in tests/netns_*.rs; do
        args+=(--test "$(basename "$t" .rs)")
    done
    cargo test --locked "${args[@]}"
}

vm() {
    if ! is_root; then
        echo "SKIP vm: needs root (qemu + kernel download)" >&2
        return
    fi
    say "vm: real-ESP kernel under qemu"
    "$here/vm/setup.sh"
    local img
    img=$(mktemp -d)/smoke.cpio.gz
    "$here/vm/build-initramfs.sh" "$img" --init "$here/vm/smoke-esp.sh"
    "$here/vm/run.sh" "$img" 180
    vm_passed=$((vm_passed + 1))
    say "vm: xfrm driver end to end (3 hosts, real ESP)"
    "$here/vm/test-xfrm.sh" 300
    vm_passed=$((vm_passed + 1))
    say "vm: encrypted VXLAN end to end (ESP transport mode for UDP 4789)"
    VM_BIN="${CARGO_TARGET_DIR:-$top/target}/x86_64-unknown-linux-gnu/release/ipsec-mesh" \
        VM_APPEND="e2e.mode=vxlan-esp" "$here/vm/test-xfrm.sh" 300
    vm_passed=$((vm_passed + 1))
}

case "${1:-all}" in
    all)
        setup
        unit
        vm
        say "all suites passed"
        summary
        ;;
    unit) unit ;;
    netns) netns ;;
    vm) vm ;;
    vxlan) cargo test --locked --test netns_vxlan ;;
    charon) cargo test --locked --test netns_charon --test charon_vici --test charon_fixtures --test charon_client ;;
    setup) setup ;;
    *)
        echo "usage: $0 [all|unit|netns|vm|vxlan|charon|setup]" >&2
        exit 2
        ;;
esac

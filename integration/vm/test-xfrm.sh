#!/usr/bin/env bash
# Host-side driver of the real-ESP end-to-end test of `ipsec-mesh apply --driver xfrm`:
# builds a static glibc ipsec-mesh, prepares the VM kernel (setup.sh), builds an initramfs
# with the binary, iptables-legacy and xfrm-e2e.sh as /test.sh, boots it (run.sh).
# Exit 0 iff the VM prints "VM-RESULT: PASS". Run as root.
#
# usage: test-xfrm.sh [TIMEOUT_SECS]     (VM timeout, default 300)
# Environment:
#   CARGO_TARGET_DIR  cargo's target directory (default: the project's target/)
#   VM_BIN            use this ipsec-mesh binary instead of building one
#   VM_OUT            directory for the initramfs and console log (default: a temporary one,
#                     kept on failure)
#   VM_APPEND         e.g. "vm.trace" (sh -x); see run.sh for more. With "e2e.mode=nftables"
#                     the image carries nft and no iptables binaries (build-initramfs.sh
#                     --nftables instead of --iptables)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
top=$(cd "$here/../.." && pwd)
timeout_s="${1:-300}"
target=x86_64-unknown-linux-gnu

say() { printf 'test-xfrm: [%ss] %s\n' "$SECONDS" "$*" >&2; }
die() { printf 'test-xfrm: error: %s\n' "$*" >&2; exit 2; }

[[ "$(id -u)" -eq 0 ]] || die "must run as root (setup.sh installs packages; qemu)"

# 1. static glibc binary (no shared libs in the guest; musl would need rustup downloads).
if [[ -n "${VM_BIN:-}" ]]; then
    bin="$VM_BIN"
else
    say "cargo build --release --target $target (static glibc)"
    (cd "$top" && RUSTFLAGS="-C target-feature=+crt-static" \
        cargo build --release --locked --target "$target" --bin ipsec-mesh)
    bin="${CARGO_TARGET_DIR:-$top/target}/$target/release/ipsec-mesh"
fi
[[ -x "$bin" ]] || die "no binary at $bin"
if ldd "$bin" 2>&1 | grep -q '=>'; then
    die "$bin is dynamically linked (expected a +crt-static build)"
fi

# 2. kernel + host tools; iptables provides xtables-legacy-multi for the guest (nftables
# its nft in the nftables-only image).
say "vm/setup.sh"
"$here/setup.sh"
fw_image=--iptables
case " ${VM_APPEND:-} " in *" e2e.mode=nftables "*) fw_image=--nftables ;; esac
# Route mode: iptables as the firewall backend and nft beside it for the one-interface
# variant's source check (--xfrm-route-devices auto picks `one` where nft is present).
# (v6-u6 too: its route-mode part then runs the one interface with IPv6; v6-u4 keeps an
# interface per peer.)
case " ${VM_APPEND:-} " in *" e2e.mode=route "* | *" e2e.mode=v6-u6 "*) fw_image="--iptables --nftables" ;; esac
# e2e.fw=nftables: nft and no iptables whatever the mode (route: the nftables backend).
case " ${VM_APPEND:-} " in *" e2e.fw=nftables "*) fw_image=--nftables ;; esac
if [[ "$fw_image" == *--nftables* ]]; then
    command -v nft >/dev/null || {
        say "installing nftables (nft for the guest)"
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends nftables >/dev/null
    }
fi
if [[ "$fw_image" == *--iptables* ]] && ! command -v xtables-legacy-multi >/dev/null; then
    say "installing iptables (xtables-legacy-multi for the guest)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -qq --no-install-recommends iptables >/dev/null ||
        { apt-get update -qq && apt-get install -y -qq --no-install-recommends iptables >/dev/null; }
fi

# 3. initramfs: the binary without debug info (the release profile keeps it: ~30 MB).
out="${VM_OUT:-}"
keep=1
if [[ -z "$out" ]]; then
    out=$(mktemp -d "${TMPDIR:-/tmp}/xfrm-e2e.XXXXXX")
    keep=0
fi
mkdir -p "$out"
stripped="$out/ipsec-mesh"
if command -v strip >/dev/null; then
    strip --strip-debug -o "$stripped" "$bin"
else
    cp "$bin" "$stripped"
fi
# The replay attacker of the anti-replay check (a static C helper, test-only).
command -v gcc >/dev/null || die "gcc missing (needed for the esp-replay test helper)"
gcc -static -O2 -Wall -o "$out/esp-replay" "$here/esp-replay.c" || die "cannot build esp-replay"
img="$out/xfrm-e2e.cpio.gz"
say "build-initramfs.sh $img"
# shellcheck disable=SC2086 # one or two flags
"$here/build-initramfs.sh" "$img" --init "$here/xfrm-e2e.sh" $fw_image \
    --module br_netfilter --add "$here/xfrm-e2e-route.sh:/xfrm-e2e-route.sh" \
    --add "$here/xfrm-e2e-v6.sh:/xfrm-e2e-v6.sh" \
    --bin "$stripped:/usr/bin/ipsec-mesh" --bin "$out/esp-replay:/usr/bin/esp-replay"

# 4. boot and check.
say "run.sh (timeout ${timeout_s}s)"
if "$here/run.sh" "$img" "$timeout_s"; then
    tr -d '\r' <"$img.console.log" | grep -a -E '^(CHECK |NOTE:|xfrm-e2e:|VM-INIT:)' || true
    [[ "$keep" -eq 1 ]] || rm -rf "$out"
    say "PASS"
    exit 0
fi
say "FAIL (initramfs and console log kept in $out)"
exit 1

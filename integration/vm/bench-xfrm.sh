#!/usr/bin/env bash
# The xfrm benchmark (benches/xfrm.rs) in Debian's kernel under qemu, where ESP SAs exist:
# ipsec-mesh's first reconcile (policies + SAs) vs `ip -batch` of the same objects, no-op and
# one-host-added reconciles, for 1,000 and 5,000 peers. Run as root. Under TCG emulation the
# absolute times are several times the hardware's; compare the columns side by side.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
top=$(cd "$here/../.." && pwd)
target=x86_64-unknown-linux-gnu
[[ "$(id -u)" -eq 0 ]] || { echo "bench-xfrm: must run as root" >&2; exit 2; }

(cd "$top" && RUSTFLAGS="-C target-feature=+crt-static" \
    cargo bench --locked --target "$target" --bench xfrm --no-run 2>&1 | tee /dev/stderr) |
    grep -o "target/$target/release/deps/xfrm-[0-9a-f]*" | tail -1 >/tmp/bench-xfrm.path
bin="${CARGO_TARGET_DIR:-$top/target}/${target}/release/deps/$(basename "$(cat /tmp/bench-xfrm.path)")"
[[ -x "$bin" ]] || { echo "bench-xfrm: no bench binary at $bin" >&2; exit 2; }
out=$(mktemp -d)
strip --strip-debug -o "$out/xfrm-bench" "$bin"
"$here/setup.sh"
"$here/build-initramfs.sh" "$out/bench.cpio.gz" --init "$here/bench-xfrm-guest.sh" \
    --bin "$out/xfrm-bench:/usr/bin/xfrm-bench"
VM_MEM=${VM_MEM:-1024M} "$here/run.sh" "$out/bench.cpio.gz" "${1:-900}"
tr -d '\r' <"$out/bench.cpio.gz.console.log" | grep -a 'peers='

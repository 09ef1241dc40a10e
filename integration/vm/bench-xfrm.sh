#!/usr/bin/env bash
# The xfrm benchmark (benches/xfrm.rs) in Debian's kernel under qemu, where ESP SAs exist:
# ipsec-mesh's first reconcile (policies + SAs) vs `ip -batch` of the same objects, no-op and
# one-host-added reconciles. Run as root. Under TCG emulation the absolute times are several
# times the hardware's; compare the columns side by side.
#
#   integration/vm/bench-xfrm.sh [TIMEOUT_SECS]
#
# Env: BENCH_PEERS (comma list, default 1000,5000,20000; passed as `bench.peers=` on the
# guest's command line), VM_MEM (default 1024M up to 5,000 peers, 3072M above: 20,000 peers
# hold 80,000 ESN SAs, ~260 MiB of kernel slab, while the bench holds two plans), TIMEOUT_SECS
# (default 900 s, 5400 s above 5,000 peers: TCG takes tens of minutes there).
# The bench's progress (stderr) is on the console; VM_VERBOSE=1 streams it.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
top=$(cd "$here/../.." && pwd)
target=x86_64-unknown-linux-gnu
[[ "$(id -u)" -eq 0 ]] || { echo "bench-xfrm: must run as root" >&2; exit 2; }
peers=${BENCH_PEERS:-1000,5000,20000}
[[ "$peers" =~ ^[0-9]+(,[0-9]+)*$ ]] || { echo "bench-xfrm: BENCH_PEERS must be a comma list of numbers" >&2; exit 2; }
max=$(tr ',' '\n' <<<"$peers" | sort -n | tail -1)
if (( max > 5000 )); then mem=3072M; limit=5400; else mem=1024M; limit=900; fi

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
rc=0
VM_MEM=${VM_MEM:-$mem} VM_APPEND="bench.peers=$peers${VM_APPEND:+ $VM_APPEND}" \
    "$here/run.sh" "$out/bench.cpio.gz" "${1:-$limit}" || rc=$?
tr -d '\r' <"$out/bench.cpio.gz.console.log" | grep -a -E 'peers=|guest memory|xfrm bench:|VM-RESULT'
echo "bench-xfrm: console log kept in $out"
exit "$rc"

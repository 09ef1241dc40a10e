#!/usr/bin/env bash
# Boot the cached Debian kernel with an initramfs under qemu (TCG) and report the result.
#
# usage: run.sh INITRAMFS [TIMEOUT_SECS]          (default timeout: 180 s)
# Exits 0 iff the console shows a line "VM-RESULT: PASS" and no "VM-RESULT: FAIL" line;
# prints the console log on failure. Environment:
#   VM_CACHE    cache directory of setup.sh (default /var/cache/ipsec-mesh-vm)
#   VM_KERNEL   kernel image (default: VM_VMLINUZ from $VM_CACHE/kernel.env)
#   VM_MEM      guest memory (default 256M)       VM_SMP   guest CPUs (default 2)
#   VM_ACCEL    qemu -accel value (default tcg,thread=multi,tb-size=64)
#   VM_APPEND   extra kernel command line (e.g. "vm.trace" runs /test.sh with sh -x)
#   VM_LOG      console log file (default INITRAMFS with .console.log appended)
#   VM_VERBOSE  1 = also stream the console to stderr while the VM runs
set -euo pipefail

VM_CACHE="${VM_CACHE:-/var/cache/ipsec-mesh-vm}"

die() { printf 'run: error: %s\n' "$*" >&2; exit 2; }
usage() {
    sed -n '2,14s/^# \{0,1\}//p' "$0" >&2
    exit 2
}

[[ $# -ge 1 && $# -le 2 && "$1" != -* ]] || usage
initrd="$1"
timeout_s="${2:-180}"
[[ "$timeout_s" =~ ^[0-9]+$ ]] || die "TIMEOUT_SECS must be a number"
[[ -f "$initrd" ]] || die "no such initramfs: $initrd"

kernel="${VM_KERNEL:-}"
if [[ -z "$kernel" ]]; then
    envfile="$VM_CACHE/kernel.env"
    [[ -f "$envfile" ]] || die "$envfile missing: run integration/vm/setup.sh first"
    # shellcheck source=/dev/null
    . "$envfile"
    kernel="${VM_VMLINUZ:?}"
fi
[[ -f "$kernel" ]] || die "no such kernel: $kernel"
command -v qemu-system-x86_64 >/dev/null || die "qemu-system-x86_64 missing: run setup.sh"

log="${VM_LOG:-$initrd.console.log}"
append="console=ttyS0 panic=-1 loglevel=4 rdinit=/init${VM_APPEND:+ $VM_APPEND}"
qemu=(
    qemu-system-x86_64 -nodefaults -nographic -no-reboot
    -accel "${VM_ACCEL:-tcg,thread=multi,tb-size=64}"
    -cpu max -m "${VM_MEM:-256M}" -smp "${VM_SMP:-2}"
    -kernel "$kernel" -initrd "$initrd"
    -append "$append"
    -serial stdio -monitor none
)

start=$(date +%s.%N)
set +e
if [[ "${VM_VERBOSE:-0}" == 1 ]]; then
    timeout -k 5 "$timeout_s" "${qemu[@]}" </dev/null 2>&1 | tee "$log" >&2
    rc=${PIPESTATUS[0]}
else
    timeout -k 5 "$timeout_s" "${qemu[@]}" </dev/null >"$log" 2>&1
    rc=$?
fi
set -e
elapsed=$(awk -v s="$start" -v e="$(date +%s.%N)" 'BEGIN { printf "%.1f", e - s }')

# The serial console ends lines with \r\n.
results="$(tr -d '\r' <"$log" | grep -a -o 'VM-RESULT: .*' || true)"
if [[ "$rc" -eq 124 || "$rc" -eq 137 ]]; then
    why="timed out after ${timeout_s}s"
elif [[ "$rc" -ne 0 ]]; then
    why="qemu exited with status $rc"
elif ! grep -q '^VM-RESULT: PASS$' <<<"$results"; then
    why="no 'VM-RESULT: PASS' line"
elif grep -q '^VM-RESULT: FAIL' <<<"$results"; then
    why="$(grep -m1 '^VM-RESULT: FAIL' <<<"$results")"
else
    echo "run: PASS in ${elapsed}s (console log: $log)"
    exit 0
fi

if [[ "${VM_VERBOSE:-0}" != 1 ]]; then
    echo "----- console log ($log) -----"
    tr -d '\r' <"$log"
    echo "----- end of console log -----"
fi
echo "run: FAIL in ${elapsed}s: $why" >&2
exit 1

#!/usr/bin/env bash
# Prepare the host for the ESP VM harness (see README.md in this directory):
#  - install qemu-system-x86, busybox-static, kmod, cpio, iproute2 (apt-get update only if needed)
#  - fetch Debian's cloud kernel package with `apt-get download` (never installed on the host),
#    unpack it under $VM_CACHE with dpkg-deb -x and run depmod on it
#  - write $VM_CACHE/kernel.env (VM_KVER, VM_KROOT, VM_VMLINUZ) for build-initramfs.sh / run.sh
# Idempotent: a second run does no network access unless something is missing.
set -euo pipefail

VM_CACHE="${VM_CACHE:-/var/cache/ipsec-mesh-vm}"
HOST_PACKAGES=(qemu-system-x86 busybox-static kmod cpio iproute2)
KERNEL_META="${VM_KERNEL_META:-linux-image-cloud-amd64}"

log() { printf 'setup: %s\n' "$*" >&2; }
die() { printf 'setup: error: %s\n' "$*" >&2; exit 1; }

[[ "$(id -u)" -eq 0 ]] || die "must run as root (installs packages with apt-get)"
command -v apt-get >/dev/null || die "apt-get not found: this script needs a Debian host"

export DEBIAN_FRONTEND=noninteractive
apt_updated=0
apt_update_once() {
    if [[ "$apt_updated" -eq 0 ]]; then
        log "running apt-get update"
        apt-get update -qq
        apt_updated=1
    else
        return 1
    fi
}

# Run "$@" (an apt command); on failure refresh the package lists once and retry.
with_apt_retry() {
    if "$@"; then
        return 0
    fi
    apt_update_once || return 1
    "$@"
}

has_candidate() {
    local cand
    cand="$(apt-cache policy "$1" 2>/dev/null | awk '/Candidate:/ {print $2; exit}')"
    [[ -n "$cand" && "$cand" != "(none)" ]]
}

is_installed() {
    [[ "$(dpkg-query -W -f='${db:Status-Status}' "$1" 2>/dev/null || true)" == "installed" ]]
}

# --- host packages -----------------------------------------------------------------------
missing=()
for p in "${HOST_PACKAGES[@]}"; do
    is_installed "$p" || missing+=("$p")
done
if ((${#missing[@]})); then
    for p in "${missing[@]}" "$KERNEL_META"; do
        if ! has_candidate "$p"; then
            apt_update_once || true
            break
        fi
    done
    log "installing: ${missing[*]}"
    with_apt_retry apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
else
    log "host packages already installed"
fi

# --- kernel package ----------------------------------------------------------------------
debdir="$VM_CACHE/debs"
mkdir -p "$debdir"

# Sets kpkg, kver_pkg and deb (downloading it unless cached); fails if anything is missing.
fetch_kernel() {
    kpkg="$(apt-cache depends "$KERNEL_META" 2>/dev/null |
        awk '$1 == "Depends:" && $2 ~ /^linux-image-[0-9]/ {print $2; exit}')"
    [[ -n "$kpkg" ]] || { log "cannot resolve the kernel package behind $KERNEL_META"; return 1; }
    kver_pkg="$(apt-cache policy "$kpkg" | awk '/Candidate:/ {print $2; exit}')"
    [[ -n "$kver_pkg" && "$kver_pkg" != "(none)" ]] || { log "no candidate for $kpkg"; return 1; }
    log "kernel package: $kpkg $kver_pkg"
    deb="$debdir/${kpkg}_${kver_pkg//:/%3a}_amd64.deb"
    if [[ -s "$deb" ]]; then
        log "cached: $deb"
        return 0
    fi
    log "downloading $kpkg=$kver_pkg"
    # apt-get download verifies the hash against the signed package lists. Download into a
    # scratch directory so an interrupted run never leaves a truncated .deb in the cache.
    local dl rc=0
    dl="$(mktemp -d "$debdir/.download.XXXXXX")"
    (cd "$dl" && apt-get download -qq -o APT::Sandbox::User=root "$kpkg=$kver_pkg") &&
        mv -f "$dl/$(basename "$deb")" "$deb" || rc=1
    rm -rf "$dl"
    return "$rc"
}
# Stale package lists (version gone from the archive) -> refresh once and resolve again.
fetch_kernel || { apt_update_once && fetch_kernel; } || die "cannot fetch the kernel package"

kroot="$VM_CACHE/kernel/${kpkg}_${kver_pkg//:/_}"
if [[ ! -f "$kroot/.unpacked" ]]; then
    log "unpacking into $kroot"
    rm -rf "$kroot"
    mkdir -p "$kroot"
    dpkg-deb -x "$deb" "$kroot"
    touch "$kroot/.unpacked"
fi

# Modules live in lib/modules/<kver>/ (usr/lib/... on merged-/usr packages).
moddir="$(find "$kroot" -mindepth 3 -maxdepth 4 -type d -path '*lib/modules/*' -name '[0-9]*' -print -quit)"
[[ -n "$moddir" ]] || die "no lib/modules/<kver> directory in $kpkg"
kver="$(basename "$moddir")"
modbase="${moddir%/lib/modules/"$kver"}"
vmlinuz="$kroot/boot/vmlinuz-$kver"
[[ -f "$vmlinuz" ]] || die "missing $vmlinuz"

if [[ ! -s "$moddir/modules.dep" || ! -f "$moddir/.depmod-done" ]]; then
    log "depmod -b $modbase $kver"
    depmod -b "$modbase" "$kver"
    touch "$moddir/.depmod-done"
fi

# Drop kernels from earlier runs (the archive moves on; initramfs images record their kernel).
for old in "$VM_CACHE"/kernel/*/ "$debdir"/*.deb; do
    [[ -e "$old" ]] || continue
    [[ "${old%/}" == "$kroot" || "$old" == "$deb" ]] && continue
    log "removing stale $old"
    rm -rf "${old%/}"
done

tmp_env="$(mktemp "$VM_CACHE/kernel.env.XXXXXX")"
{
    printf '# written by integration/vm/setup.sh\n'
    printf 'VM_KPKG=%q\n' "$kpkg=$kver_pkg"
    printf 'VM_KVER=%q\n' "$kver"
    printf 'VM_KROOT=%q\n' "$modbase"
    printf 'VM_VMLINUZ=%q\n' "$vmlinuz"
} >"$tmp_env"
mv -f "$tmp_env" "$VM_CACHE/kernel.env"

printf 'kernel version: %s\n' "$kver"
printf 'vmlinuz: %s\n' "$vmlinuz"
printf 'modules: %s\n' "$moddir"
printf 'env: %s\n' "$VM_CACHE/kernel.env"

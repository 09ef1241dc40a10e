#!/usr/bin/env bash
# Build a gzip'ed newc initramfs for the ESP test VM (see README.md in this directory).
#
# usage: build-initramfs.sh OUT.cpio.gz [--init SCRIPT] [--add SRC:DEST]... [--bin SRC:DEST]...
#                           [--module NAME]... [--iptables] [--nftables]
#   --init SCRIPT   test script, copied to /test.sh; /init runs it with busybox sh
#   --add SRC:DEST  copy a file or directory into the image at absolute path DEST
#                   (a DEST ending in '/' means "into this directory")
#   --bin SRC:DEST  like --add for an ELF binary, plus the shared libraries ldd lists
#   --module NAME   load this kernel module (and its dependencies) too
#   --iptables      add iptables-legacy (xtables-legacy-multi as iptables, iptables-save,
#                   iptables-restore, ip6tables*, iptables-legacy*), the extensions in
#                   $VM_XT_EXTENSIONS and the netfilter modules in $VM_NF_MODULES
#   --nftables      add nft (with its shared libraries) and the nf_tables modules
#
# Needs setup.sh to have run (reads $VM_CACHE/kernel.env). Set VM_MODULES to replace the
# default module list entirely.
set -euo pipefail

VM_CACHE="${VM_CACHE:-/var/cache/ipsec-mesh-vm}"

# Module closure loaded at boot, in this order (dependencies first, resolved below).
# gcm finds ghash, drbg finds jitterentropy_rng, and jitterentropy_rng (6.1.0-56+) finds
# sha3-256 through the crypto API at run time (not as symbol dependencies), so they are listed
# explicitly. Besides, every module under ONDEMAND_DIRS is shipped (not loaded) so that the
# kernel's request_module("crypto-...") -> busybox modprobe finds any other algorithm.
DEFAULT_MODULES="xfrm_algo xfrm_user esp4 esp6 xfrm4_tunnel xfrm6_tunnel af_key ah4 ah6
  xfrm_interface aesni_intel ghash_clmulni_intel gcm ghash_generic ctr authenc seqiv echainiv
  sha3_generic jitterentropy_rng drbg sha512_generic chacha_generic poly1305_generic chacha20poly1305
  veth bridge vxlan dummy tun"

# --iptables: legacy x_tables (per netns, no nftables needed) with the tables and matches the
# product and the tests use. The kernel request_module()s anything else (e.g. xt_conntrack)
# through busybox modprobe, which finds it when it is shipped: see NF_ONDEMAND.
NF_MODULES="${VM_NF_MODULES:-x_tables ip_tables iptable_filter iptable_mangle iptable_raw
  ip6_tables ip6table_filter ip6table_mangle ip6table_raw xt_mark xt_policy xt_comment xt_esp
  xt_tcpudp xt_addrtype xt_multiport xt_physdev ipt_rpfilter ip6t_rpfilter}"
NF_ONDEMAND="xt_conntrack xt_state xt_connmark xt_CT xt_LOG xt_NFLOG xt_REDIRECT xt_MASQUERADE
  xt_nat xt_length xt_limit xt_set xt_u32 xt_iprange xt_owner xt_pkttype xt_TCPMSS
  iptable_nat ip6table_nat ipt_REJECT ip6t_REJECT br_netfilter"
# Extensions (from the host's iptables package) copied to its XTABLES_LIBDIR.
XT_EXTENSIONS="${VM_XT_EXTENSIONS:-libxt_standard libxt_mark libxt_MARK libxt_policy libxt_rpfilter
  libxt_comment libxt_esp libxt_tcp libxt_udp libxt_multiport libxt_addrtype libxt_physdev
  libxt_conntrack libxt_state libxt_CONNMARK libxt_connmark libxt_CT libxt_LOG libxt_NFLOG
  libxt_length libxt_limit libxt_iprange libxt_owner libxt_pkttype libxt_TCPMSS
  libxt_REDIRECT libxt_MASQUERADE libxt_NAT libxt_SNAT libxt_DNAT libipt_icmp libipt_REJECT
  libip6t_icmp6 libip6t_REJECT}"

# --nftables: nf_tables (its core holds meta, rt, counter, lookup, the set types and the
# route chain type; inet, ipv4 and ipv6 families are built in), nothing of x_tables; nft_fib_inet
# (with nft_fib_ipv4/6) for the route mode's reverse-path check (`fib saddr . iif oif`),
# nft_xfrm for the one-interface route mode's source check (`ipsec in reqid`).
NFT_MODULES="${VM_NFT_MODULES:-nf_tables nft_fib_inet nft_xfrm}"

ONDEMAND_DIRS="${VM_ONDEMAND_DIRS-kernel/crypto kernel/arch/x86/crypto kernel/lib/crypto}"

usage() {
    sed -n '2,14s/^# \{0,1\}//p' "$0" >&2
    exit 2
}
log() { printf 'build-initramfs: %s\n' "$*" >&2; }
die() { printf 'build-initramfs: error: %s\n' "$*" >&2; exit 1; }

[[ $# -ge 1 ]] || usage
out="$1"
shift
[[ "$out" != -* ]] || usage

adds=()
bins=()
extra_modules=()
init_script=""
with_iptables=0
with_nftables=0
while [[ $# -gt 0 ]]; do
    case "$1" in
    --add) [[ $# -ge 2 ]] || usage; adds+=("$2"); shift 2 ;;
    --bin) [[ $# -ge 2 ]] || usage; bins+=("$2"); shift 2 ;;
    --module) [[ $# -ge 2 ]] || usage; extra_modules+=("$2"); shift 2 ;;
    --init) [[ $# -ge 2 ]] || usage; init_script="$2"; shift 2 ;;
    --iptables) with_iptables=1; shift ;;
    --nftables) with_nftables=1; shift ;;
    -h | --help) usage ;;
    *) die "unknown argument: $1" ;;
    esac
done

envfile="$VM_CACHE/kernel.env"
[[ -f "$envfile" ]] || die "$envfile missing: run integration/vm/setup.sh first"
# shellcheck source=/dev/null
. "$envfile"
: "${VM_KVER:?}" "${VM_KROOT:?}"
kmoddir="$VM_KROOT/lib/modules/$VM_KVER"
[[ -s "$kmoddir/modules.dep" ]] || die "$kmoddir/modules.dep missing: rerun setup.sh"

busybox="$(command -v busybox || true)"
[[ -n "$busybox" ]] || die "busybox not found (apt-get install busybox-static)"
if ldd "$busybox" >/dev/null 2>&1; then
    die "$busybox is dynamically linked: install busybox-static"
fi
for tool in cpio gzip modprobe depmod ldd; do
    command -v "$tool" >/dev/null || die "$tool not found: run setup.sh"
done
xtables_multi=""
xtables_libdir=""
if [[ "$with_iptables" -eq 1 ]]; then
    xtables_multi="$(command -v xtables-legacy-multi || true)"
    [[ -n "$xtables_multi" ]] || die "--iptables: xtables-legacy-multi not found (apt-get install iptables)"
    # The extension directory compiled into libxtables (Debian: /usr/lib/<triplet>/xtables).
    for d in /usr/lib/x86_64-linux-gnu/xtables /usr/lib/xtables /usr/lib64/xtables /lib/xtables; do
        [[ -f "$d/libxt_standard.so" ]] && { xtables_libdir="$d"; break; }
    done
    [[ -n "$xtables_libdir" ]] || die "--iptables: iptables extension directory not found"
fi
nft_bin=""
if [[ "$with_nftables" -eq 1 ]]; then
    nft_bin="$(command -v nft || true)"
    [[ -n "$nft_bin" ]] || die "--nftables: nft not found (apt-get install nftables)"
fi
[[ -z "$init_script" || -f "$init_script" ]] || die "no such test script: $init_script"

stage="$(mktemp -d "${TMPDIR:-/tmp}/vm-initramfs.XXXXXX")"
trap 'rm -rf "$stage"' EXIT

# --- helpers -----------------------------------------------------------------------------
# Copy ELF $1 to $stage$2 plus every shared library it needs (same paths as on the host).
copy_elf() {
    local src="$1" dest="$2" lib
    install -D -m 0755 "$src" "$stage$dest"
    while read -r lib; do
        [[ -n "$lib" && -e "$stage$lib" ]] && continue
        install -D -m 0755 "$lib" "$stage$lib"
    done < <(ldd "$src" 2>/dev/null | awk '{for (i = 1; i <= NF; i++) if ($i ~ /^\//) print $i}')
}

# Copy SRC:DEST (file or directory) into the image.
copy_in() {
    local spec="$1" src dest
    [[ "$spec" == *:* ]] || die "expected SRC:DEST, got '$spec'"
    src="${spec%:*}"
    dest="${spec##*:}"
    [[ "$dest" == /* ]] || die "DEST must be absolute in '$spec'"
    [[ -e "$src" ]] || die "no such file: $src"
    [[ "$dest" == */ ]] && dest="$dest$(basename "$src")"
    mkdir -p "$stage$(dirname "$dest")"
    cp -a --dereference "$src" "$stage$dest"
}

# --- base filesystem ---------------------------------------------------------------------
mkdir -p "$stage"/{bin,sbin,usr/bin,usr/sbin,etc,proc,sys,dev,run,tmp,root,var,lib64}
ln -s ../run "$stage/var/run"
chmod 1777 "$stage/tmp"
if [[ "$(id -u)" -eq 0 ]]; then
    mknod -m 0600 "$stage/dev/console" c 5 1
    mknod -m 0666 "$stage/dev/null" c 1 3
fi

install -m 0755 "$busybox" "$stage/bin/busybox"
# Applet links, except `ip`: /sbin/ip and /bin/ip are iproute2's (busybox's has no xfrm).
while read -r applet; do
    case "$applet" in */ip | */busybox) continue ;; esac
    [[ -e "$stage/$applet" || -L "$stage/$applet" ]] && continue
    mkdir -p "$stage/$(dirname "$applet")"
    ln -s /bin/busybox "$stage/$applet"
done < <("$busybox" --list-full)

ip_bin="$(command -v ip)"
bridge_bin="$(command -v bridge)"
copy_elf "$(readlink -f "$ip_bin")" /sbin/ip
copy_elf "$(readlink -f "$bridge_bin")" /sbin/bridge
ln -sf /sbin/ip "$stage/bin/ip"
ln -sf /sbin/bridge "$stage/bin/bridge"
for f in /etc/protocols /etc/services; do
    [[ -f "$f" ]] || die "$f missing (apt-get install netbase)"
    install -m 0644 "$f" "$stage$f"
done
[[ -d /etc/iproute2 ]] && cp -a /etc/iproute2 "$stage/etc/"
printf 'root:x:0:0:root:/root:/bin/sh\n' >"$stage/etc/passwd"
printf 'root:x:0:\n' >"$stage/etc/group"
printf '127.0.0.1 localhost\n::1 localhost\n' >"$stage/etc/hosts"
printf '%s\n' "$VM_KVER" >"$stage/etc/vm-kver"

# --- kernel modules ----------------------------------------------------------------------
modconf="$stage/.modprobe.conf"
printf 'options dummy numdummies=0\n' >"$modconf"
read -r -d '' -a modules <<<"${VM_MODULES:-$DEFAULT_MODULES}" || true
if [[ "$with_iptables" -eq 1 ]]; then
    read -r -d '' -a nf_modules <<<"$NF_MODULES" || true
    modules+=("${nf_modules[@]}")
fi
if [[ "$with_nftables" -eq 1 ]]; then
    read -r -d '' -a nft_modules <<<"$NFT_MODULES" || true
    modules+=("${nft_modules[@]}")
fi
modules+=(${extra_modules[@]+"${extra_modules[@]}"})
declare -A seen=()
modlist="$stage/etc/vm-modules"
: >"$modlist"
nmod=0
for m in "${modules[@]}"; do
    deps="$(modprobe -C "$modconf" -d "$VM_KROOT" -S "$VM_KVER" --show-depends "$m" 2>&1)" ||
        die "module $m not found for $VM_KVER: $deps"
    while read -r kind path params; do
        [[ "$kind" == insmod ]] || continue # "builtin NAME": nothing to load
        rel="${path#"$kmoddir"/}"
        [[ -n "${seen[$rel]:-}" ]] && continue
        seen[$rel]=1
        install -D -m 0644 "$path" "$stage/lib/modules/$VM_KVER/$rel"
        printf '%s %s\n' "$rel" "$params" >>"$modlist"
        nmod=$((nmod + 1))
    done <<<"$deps"
done
rm -f "$modconf"
# On-demand modules: copy each with its dependencies (modules.dep lists the full closure).
read -r -d '' -a ondemand <<<"$ONDEMAND_DIRS" || true
nextra=0
if ((${#ondemand[@]})); then
    while read -r rel; do
        [[ -e "$stage/lib/modules/$VM_KVER/$rel" ]] && continue
        install -D -m 0644 "$kmoddir/$rel" "$stage/lib/modules/$VM_KVER/$rel"
        nextra=$((nextra + 1))
    done < <(
        cd "$kmoddir"
        awk -v dirs="${ondemand[*]}" '
            BEGIN { n = split(dirs, d, " ") }
            { sub(/:$/, "", $1); for (i = 1; i <= n; i++) if (index($1, d[i] "/") == 1) { for (j = 1; j <= NF; j++) { f = $j; sub(/:$/, "", f); print f } ; break } }
        ' modules.dep | sort -u
    )
fi
if [[ "$with_iptables" -eq 1 ]]; then
    read -r -d '' -a nf_ondemand <<<"$NF_ONDEMAND" || true
    for m in "${nf_ondemand[@]}"; do
        deps="$(modprobe -d "$VM_KROOT" -S "$VM_KVER" --show-depends "$m" 2>/dev/null)" || continue
        while read -r kind path _; do
            [[ "$kind" == insmod ]] || continue
            rel="${path#"$kmoddir"/}"
            [[ -e "$stage/lib/modules/$VM_KVER/$rel" ]] && continue
            install -D -m 0644 "$path" "$stage/lib/modules/$VM_KVER/$rel"
            nextra=$((nextra + 1))
        done <<<"$deps"
    done
fi
for f in modules.order modules.builtin modules.builtin.modinfo; do
    [[ -f "$kmoddir/$f" ]] && install -m 0644 "$kmoddir/$f" "$stage/lib/modules/$VM_KVER/$f"
done
# modules.dep for the modules in the image, so the kernel's request_module -> busybox modprobe
# also works for anything loaded on demand.
depmod -b "$stage" "$VM_KVER"

# --- iptables (legacy) --------------------------------------------------------------------
if [[ "$with_iptables" -eq 1 ]]; then
    copy_elf "$(readlink -f "$xtables_multi")" /usr/sbin/xtables-legacy-multi
    # xtables-legacy-multi dispatches on argv[0]: the plain names are the legacy variant here.
    for name in iptables iptables-save iptables-restore ip6tables ip6tables-save \
        ip6tables-restore iptables-legacy iptables-legacy-save iptables-legacy-restore \
        ip6tables-legacy ip6tables-legacy-save ip6tables-legacy-restore; do
        ln -sf xtables-legacy-multi "$stage/usr/sbin/$name"
        ln -sf /usr/sbin/xtables-legacy-multi "$stage/sbin/$name"
    done
    read -r -d '' -a xt_ext <<<"$XT_EXTENSIONS" || true
    nxt=0
    for e in "${xt_ext[@]}"; do
        if [[ -f "$xtables_libdir/$e.so" ]]; then
            copy_elf "$xtables_libdir/$e.so" "$xtables_libdir/$e.so"
            nxt=$((nxt + 1))
        else
            log "warning: iptables extension $e.so not found in $xtables_libdir"
        fi
    done
    [[ -f /etc/ethertypes ]] && install -m 0644 /etc/ethertypes "$stage/etc/ethertypes"
    log "iptables-legacy: $(basename "$xtables_multi") + $nxt extensions from $xtables_libdir"
fi

# --- nftables ----------------------------------------------------------------------------
if [[ "$with_nftables" -eq 1 ]]; then
    copy_elf "$(readlink -f "$nft_bin")" /usr/sbin/nft
    ln -sf /usr/sbin/nft "$stage/sbin/nft"
    log "nftables: $("$nft_bin" --version) with $(ldd "$nft_bin" | grep -c '=> /') shared libraries"
fi

# --- /init -------------------------------------------------------------------------------
cat >"$stage/init" <<'INIT'
#!/bin/sh
# Generated by integration/vm/build-initramfs.sh.
PATH=/sbin:/bin:/usr/sbin:/usr/bin
export PATH
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs -o mode=0755 tmpfs /run
# Files the image put under /tmp (a project checked out there, as CI's clone may be) must
# survive the tmpfs mounted over it: copy them in.
if [ -n "$(ls -A /tmp 2>/dev/null)" ]; then
    mv /tmp /.image-tmp && mkdir -m 1777 /tmp
fi
mount -t tmpfs -o mode=1777 tmpfs /tmp
[ ! -d /.image-tmp ] || { cp -a /.image-tmp/. /tmp/ && rm -rf /.image-tmp; }
hostname vm
/sbin/ip link set lo up

uptime_s() { cut -d' ' -f1 /proc/uptime; }
finish() {
    echo "VM-INIT: done at $(uptime_s)s"
    sync
    poweroff -f
    sleep 5
    echo o >/proc/sysrq-trigger
}

kver="$(uname -r)"
echo "VM-INIT: kernel $kver, init started at $(uptime_s)s"
if [ "$kver" != "$(cat /etc/vm-kver)" ]; then
    echo "VM-RESULT: FAIL (initramfs built for $(cat /etc/vm-kver), booted $kver)"
    finish
fi

failed=""
n=0
while read -r rel params; do
    # shellcheck disable=SC2086 # params are word-split on purpose
    if insmod "/lib/modules/$kver/$rel" $params 2>/tmp/insmod.err; then
        n=$((n + 1))
    else
        # Already loaded on demand (kernel request_module -> busybox modprobe) is fine.
        name="$(basename "$rel" .ko | tr - _)"
        if [ -d "/sys/module/$name" ]; then
            n=$((n + 1))
        else
            cat /tmp/insmod.err
            failed="$failed $name"
        fi
    fi
done </etc/vm-modules
if [ -n "$failed" ]; then
    echo "VM-RESULT: FAIL (module load failed:$failed)"
    finish
fi
echo "VM-INIT: $n modules loaded at $(uptime_s)s"

if [ ! -f /test.sh ]; then
    echo "VM-RESULT: FAIL (no /test.sh in the initramfs)"
    finish
fi
shflags=""
grep -qw vm.trace /proc/cmdline && shflags="-x"
export VM_KVER="$kver"
cd /
# shellcheck disable=SC2086
sh $shflags /test.sh </dev/null
rc=$?
echo "VM-INIT: /test.sh exited $rc at $(uptime_s)s"
[ "$rc" -eq 0 ] || echo "VM-RESULT: FAIL (exit $rc)"
finish
INIT
chmod 0755 "$stage/init"

if [[ -n "$init_script" ]]; then
    install -m 0755 "$init_script" "$stage/test.sh"
fi
for spec in ${bins[@]+"${bins[@]}"}; do
    [[ "$spec" == *:* ]] || die "expected SRC:DEST, got '$spec'"
    dest="${spec##*:}"
    [[ "$dest" == */ ]] && dest="$dest$(basename "${spec%:*}")"
    copy_elf "${spec%:*}" "$dest"
done
for spec in ${adds[@]+"${adds[@]}"}; do
    copy_in "$spec"
done

# --- pack --------------------------------------------------------------------------------
mkdir -p "$(dirname "$out")"
tmp_out="$(mktemp "$out.XXXXXX")"
(cd "$stage" && find . -mindepth 1 -print0 | LC_ALL=C sort -z |
    cpio --null --create --format=newc --owner=0:0 --quiet) | gzip -1 >"$tmp_out"
mv -f "$tmp_out" "$out"
chmod 0644 "$out"
log "$out: $(du -h "$out" | cut -f1), kernel $VM_KVER, $nmod modules loaded at boot + $nextra on demand${init_script:+, test $init_script}"

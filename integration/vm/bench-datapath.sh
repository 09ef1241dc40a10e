#!/usr/bin/env bash
# Per-packet cost of overlay traffic with real ESP against the mesh size, in Debian's kernel
# under qemu (the VM counterpart of benches/datapath.rs, which cannot encrypt on this
# machine's kernel). Run as root:
#
#   integration/vm/bench-datapath.sh [TIMEOUT_SECS]          (default 2400)
#
# For each mode M in DP_MODES (default "policy route one"; policy = `--xfrm-mode policy`, route =
# `--xfrm-mode route --xfrm-route-devices per-peer`, one = `... --xfrm-route-devices one`) and
# case N in DP_CASES (default 1 1000 5000) the guest (bench-datapath-guest.sh) builds a
# sender host (host-00000) and its last peer (host-N) in two namespaces joined by a veth,
# both programmed by `ipsec-mesh apply --driver xfrm` in mode M for the whole N+1-host
# mesh (timed: the first apply is the first programming, printed with the kernel objects it
# left: policies, SAs, routes in table 1042, XFRM interfaces); then one process
# (udp-blast.c) sends DP_ROUNDS rounds (default 40) of DP_SENDS (default 1000) UDP
# datagrams per mode, case and kind in turn, interleaved: from the sender's container
# address to the peer's (ESP: encrypt, veth, decrypt) and from its underlay address to the
# peer's (plain). It checks that every overlay datagram went out through the real outbound
# SA and in through the peer's inbound SA. Printed: medians and min-max per case, the
# median, quartiles and min-max of the per-round ratios to the 1-peer case of the same mode,
# and the overall rate (all datagrams / all time) with its ratio; then route mode against
# policy mode at the same N (median per-round ratio: both modes in one VM, see DP_BOOT).
# Under TCG the
# absolute rates are far below hardware's; compare within the table.
#
# Cluster shape DP_SHAPE: `rancher` (default: every host 10 container /32s drawn at random
# without repeats from 10.0.0.0/8, seeded like benches/datapath.rs: 30 policies per peer) or
# `subnet` (one random /24 per host: 3 policies per peer). Env: VM_BIN (an ipsec-mesh static
# binary; default: build it), VM_MEM (default 2048M), VM_OUT (keep image + console log there),
# DP_SEED (default 7), DP_PERF=1 (the host's perf in the image: after the measurement a
# system-wide profile of each target sent alone, "PERF <mode>-<case>-<kind>:" lines;
# DP_PERF_CALLERS=sym[,sym] adds their call chains).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
top=$(cd "$here/../.." && pwd)
target=x86_64-unknown-linux-gnu
timeout_s=${1:-2400}
cases=${DP_CASES:-1 1000 5000}
modes=${DP_MODES:-policy route one}
rounds=${DP_ROUNDS:-40}
sends=${DP_SENDS:-1000}
shape=${DP_SHAPE:-rancher}
seed=${DP_SEED:-7}
say() { printf 'bench-datapath: [%ss] %s\n' "$SECONDS" "$*" >&2; }
die() { printf 'bench-datapath: error: %s\n' "$*" >&2; exit 2; }
[[ "$(id -u)" -eq 0 ]] || die "must run as root (qemu, setup.sh)"
[[ "$cases" =~ ^[0-9]+( [0-9]+)*$ ]] || die "DP_CASES must be numbers separated by spaces"
[[ " $cases " == *" 1 "* ]] || die "DP_CASES must include 1 (the ratios are to the 1-peer case)"
[[ "$modes" =~ ^(policy|route|one)( (policy|route|one))*$ ]] || die "DP_MODES: policy, route and/or one, separated by spaces"
[[ "$rounds" =~ ^[1-9][0-9]*$ && "$sends" =~ ^[1-9][0-9]*$ ]] || die "DP_ROUNDS, DP_SENDS: positive numbers"
[[ "$shape" == rancher || "$shape" == subnet ]] || die "DP_SHAPE: rancher or subnet"
command -v python3 >/dev/null || die "needs python3 (metadata and the summary)"
command -v gcc >/dev/null || die "needs gcc (udp-blast)"

if [[ -n "${VM_BIN:-}" ]]; then
    bin=$VM_BIN
else
    say "cargo build --release --target $target (static glibc)"
    (cd "$top" && RUSTFLAGS="-C target-feature=+crt-static" \
        cargo build --release --locked --target "$target" --bin ipsec-mesh)
    bin="${CARGO_TARGET_DIR:-$top/target}/$target/release/ipsec-mesh"
fi
[[ -x "$bin" ]] || die "no binary at $bin"
if ldd "$bin" 2>&1 | grep -q '=>'; then die "$bin is dynamically linked (expected +crt-static)"; fi
"$here/setup.sh" >/dev/null
command -v xtables-legacy-multi >/dev/null || die "iptables missing on the host (integration/setup.sh)"

out=${VM_OUT:-$(mktemp -d "${TMPDIR:-/tmp}/bench-datapath.XXXXXX")}
mkdir -p "$out/dp"
strip --strip-debug -o "$out/ipsec-mesh" "$bin"
gcc -static -O2 -Wall -o "$out/udp-blast" "$here/udp-blast.c" || die "cannot build udp-blast"
head -c 48 /dev/urandom | base64 | tr -d '\n' >"$out/dp/psk"
chmod 600 "$out/dp/psk"

# Metadata: one host list (host-00000 first) for the largest case; case N uses its first N+1
# hosts, so the sender's addresses are the same in every case and its peer is host-N.
# shellcheck disable=SC2086 # one argument per case
python3 - "$out/dp" "$shape" "$seed" $cases <<'PY'
import ipaddress, json, random, sys
d, shape, seed, cases = sys.argv[1], sys.argv[2], int(sys.argv[3]), [int(c) for c in sys.argv[4:]]
rng = random.Random(seed)
total = max(cases) + 1
used, hosts = set(), []
for i in range(total):
    if shape == "rancher":
        mine = []
        while len(mine) < 10:
            a = rng.randrange(1 << 24)
            if a & 0xFF in (0, 0xFF) or a in used:
                continue
            used.add(a)
            mine.append(f"{ipaddress.IPv4Address((10 << 24) | a)}/32")
    else:
        while True:
            b = rng.randrange(1 << 16)
            if b not in used:
                break
        used.add(b)
        mine = [f"{ipaddress.IPv4Address((10 << 24) | (b << 8))}/24"]
    hosts.append({"id": f"host-{i:05d}", "agent_ip": f"172.16.{i // 250}.{i % 250 + 1}",
                  "subnets": mine})
def addr(h, i=0):  # container address i of host h: its i-th /32, or .2+i of the /24
    n = ipaddress.IPv4Network(h["subnets"][i if len(h["subnets"]) > 1 else 0])
    return str(n.network_address if n.prefixlen == 32 else n.network_address + 2 + i)
with open(f"{d}/cases", "w") as f:
    for n in cases:
        json.dump({"network": {"cidr": "10.0.0.0/8"}, "hosts": hosts[: n + 1]},
                  open(f"{d}/meta-{n}.json", "w"))
        b = hosts[n]
        f.write(f"{n} {b['id']} {b['agent_ip']} {addr(hosts[0])} {addr(b)} {addr(hosts[0], 1)}\n")
PY
# DP_BOOT=one (default): all modes in one VM, their cases interleaved in every round (both
# modes' 1, 1,000 and 5,000-peer pairs fit in 2 GiB: 580 MB were left at 5,000); DP_BOOT=mode:
# one VM per mode, one after another (then the route/policy ratios are from different boots).
boot=${DP_BOOT:-one}
case "$boot" in
mode) groups=$modes ;;
one) groups=${modes// /,} ;;
*) die "DP_BOOT: mode or one" ;;
esac
rc=0
: >"$out/console.txt"
for g in $groups; do
    printf 'ROUNDS=%s\nSENDS=%s\nCASES="%s"\nMODES="%s"\n' "$rounds" "$sends" "$cases" "${g//,/ }" >"$out/dp/config"
    perf=()
    if [[ -n "${DP_PERF:-}" ]]; then
        command -v perf >/dev/null || die "DP_PERF: no perf on the host (apt-get install linux-perf)"
        printf 'PERF=1\nPERF_CALLERS="%s"\n' "${DP_PERF_CALLERS:-}" >>"$out/dp/config"
        perf=(--bin "$(command -v perf):/usr/bin/perf")
    fi
    adds=()
    for f in "$out"/dp/*; do adds+=(--add "$f:/etc/dp/$(basename "$f")"); done
    "$here/build-initramfs.sh" "$out/dp-$g.cpio.gz" --init "$here/bench-datapath-guest.sh" --iptables --nftables \
        --bin "$out/ipsec-mesh:/usr/bin/ipsec-mesh" --bin "$out/udp-blast:/usr/bin/udp-blast" "${perf[@]}" "${adds[@]}"
    say "VM: modes ${g//,/ }, cases $cases, shape $shape, $rounds rounds of $sends sends (timeout ${timeout_s}s); load: $(uptime)"
    VM_MEM=${VM_MEM:-2048M} "$here/run.sh" "$out/dp-$g.cpio.gz" "$timeout_s" >/dev/null || rc=$?
    log="$out/dp-$g.cpio.gz.console.log"
    tr -d '\r' <"$log" | grep -a -E "^(dp:|CHECK |FINDING |DP-SA |DP-APPLY |PERF|VM-RESULT)" || true
    tr -d '\r' <"$log" >>"$out/console.txt"
    say "VM $g done; load: $(uptime)"
done
python3 - "$out/console.txt" <<'PY' || rc=1
import re, statistics, sys
rates, applies = {}, []
for line in open(sys.argv[1], errors="replace"):
    m = re.match(r"DP mode=(\w+) case=(\d+) kind=(\w+) round=(\d+) sent=(\d+) failed=(\d+) seconds=(\S+) rate=(\d+)", line)
    if m:
        mode, n, k, r, sent, failed, secs, rate = m.groups()
        rates.setdefault((mode, k, int(n)), {})[int(r)] = (int(rate), int(failed), int(sent), float(secs))
    m = re.match(r"DP-APPLY (.*)", line)
    if m:
        applies.append(dict(kv.split("=", 1) for kv in m.group(1).split()))
if not rates:
    sys.exit("no DP lines in the console log")
def q(v, f):  # quantile f of v (linear)
    v = sorted(v); x = (len(v) - 1) * f; i = int(x)
    return v[i] + (v[min(i + 1, len(v) - 1)] - v[i]) * (x - i)
print("%-6s %6s %4s %3s %8s %9s %7s %7s %6s" % ("mode", "peers", "side", "try", "seconds", "policies", "SAs", "routes", "xfrmi"))
for a in applies:
    print("%-6s %6s %4s %3s %8s %9s %7s %7s %6s" % (a["mode"], a["case"], a["side"], a["try"], a["seconds"], a["policies"], a["states"], a["routes"], a["links"]))
print("%-6s %-9s %6s %9s %15s %6s %11s %13s %9s %6s %7s" % ("mode", "traffic", "peers", "median/s", "min-max/s", "ratio", "ratio IQR", "ratio min-max", "overall/s", "ratio", "failed"))
def overall(by_round):
    return sum(x[2] for x in by_round.values()) / sum(x[3] for x in by_round.values())
for mode in ("policy", "route", "one"):
    for k in ("overlay", "underlay"):
        for (mm, kk, n), by_round in sorted(rates.items()):
            if (mm, kk) != (mode, k):
                continue
            base = rates[(mode, k, 1)]
            v = [x[0] for x in by_round.values()]
            ratios = [by_round[r][0] / base[r][0] for r in by_round if r in base and base[r][0]]
            print("%-6s %-9s %6d %9.0f %7d-%-7d %5.2fx %5.2f-%-5.2f %6.2f-%-6.2f %9.0f %5.2fx %7d" % (
                mode, k, n, statistics.median(v), min(v), max(v), statistics.median(ratios),
                q(ratios, 0.25), q(ratios, 0.75), min(ratios), max(ratios), overall(by_round),
                overall(by_round) / overall(base), sum(x[1] for x in by_round.values())))
for other, base_mode in (("route", "policy"), ("one", "route"), ("one", "policy")):
  both = [(k, n) for (m, k, n) in sorted(rates) if m == other and (base_mode, k, n) in rates]
  if both:
    # Per-round ratios only mean something when both modes ran interleaved in one VM
    # (DP_BOOT=one); with one VM per mode the rounds are minutes apart.
    print("%s / %s, same peers: median per-round ratio (IQR; only with DP_BOOT=one), overall ratio" % (other, base_mode))
    for k, n in both:
        r, p = rates[(other, k, n)], rates[(base_mode, k, n)]
        ratios = [r[i][0] / p[i][0] for i in r if i in p and p[i][0]]
        print("  %-9s %6d %5.2fx (%4.2f-%-4.2f) %5.2fx" % (k, n, statistics.median(ratios), q(ratios, 0.25), q(ratios, 0.75), overall(r) / overall(p)))
PY
if [[ -z "${VM_OUT:-}" && "$rc" -eq 0 ]]; then rm -rf "$out"; else say "image and console log kept in $out"; fi
exit "$rc"

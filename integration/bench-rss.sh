#!/usr/bin/env bash
# Sidecar memory at fleet scale (issue 12 item 4): `ipsec-mesh run --driver xfrm` for one host
# of a mesh of HOSTS hosts (default 20,001: 20,000 peers) in a fresh network namespace, as
# root. Prints VmRSS/VmHWM of the sidecar after its first reconcile and after the following
# reconciles, the first reconcile's time and writes, and the writes and time of each
# following reconcile (which must write nothing: exit 1 otherwise).
#
#   cargo build --release && integration/bench-rss.sh [HOSTS]
#
# Addressing as an allocator leaves it: every host one /PREFIX (default /24) drawn at random,
# without repeats, from 10.0.0.0/8 (seeded: RSS_SEED, default 12), not one tidy block per
# host index; agent IPs 172.16.0.0/16 (host-00000 = 172.16.0.1, ours).
#
# On a kernel without ESP (this machine's) the driver installs the policies and reports every
# peer's SAs as impossible; the per-peer backoff then brings reconciles after 1, 2, 4, ... s,
# each a full look at the kernel that must write 0. On an ESP kernel the next reconcile is
# the periodic resync (--resync RSS_RESYNC, default 20 s) or a kernel notification.
# Env: BIN (default target/release/ipsec-mesh), RSS_SEED, RSS_PREFIX, RSS_RESYNC,
# RSS_FOLLOW (reconciles to watch after the first, default 3), RSS_TIMEOUT (s, default 300),
# RSS_LOG (the sidecar's --log, default info; the reconcile lines need info), RSS_KEEP=1 (keep the
# temporary directory with the metadata and the sidecar's log).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
top=$(cd "$here/.." && pwd)
hosts=${1:-20001}
bin=${BIN:-${CARGO_TARGET_DIR:-$top/target}/release/ipsec-mesh}
seed=${RSS_SEED:-12}
prefix=${RSS_PREFIX:-24}
resync=${RSS_RESYNC:-20}
follow=${RSS_FOLLOW:-3}
timeout=${RSS_TIMEOUT:-300}
[[ "$(id -u)" -eq 0 ]] || { echo "bench-rss: must run as root (network namespace)" >&2; exit 2; }
[[ -x "$bin" ]] || { echo "bench-rss: no binary at $bin: run cargo build --release first" >&2; exit 2; }
command -v python3 >/dev/null || { echo "bench-rss: needs python3" >&2; exit 2; }
(( hosts >= 2 && hosts <= 60000 )) || { echo "bench-rss: HOSTS must be 2..60000" >&2; exit 2; }
(( prefix >= 17 && prefix <= 30 )) || { echo "bench-rss: RSS_PREFIX must be 17..30" >&2; exit 2; }

dir=$(mktemp -d)
ns=rss$$
pid=
finish() {
    if [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null; then
        kill -TERM "$pid"; wait "$pid" 2>/dev/null || true
    fi
    ip netns del "$ns" 2>/dev/null || true
    if [[ -n "${RSS_KEEP:-}" ]]; then echo "kept $dir"; else rm -rf "$dir"; fi
}
trap finish EXIT

python3 - "$hosts" "$seed" "$prefix" "$dir/meta.json" <<'PY'
import ipaddress, json, os, random, sys
hosts, seed, plen, out = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
blocks = 1 << (plen - 8)  # /plen blocks in 10.0.0.0/8
if hosts > blocks:
    sys.exit(f"{hosts} hosts do not fit as /{plen}s in 10.0.0.0/8")
base = int(ipaddress.IPv4Address("10.0.0.0"))
picks = random.Random(seed).sample(range(blocks), hosts)
doc = {"network": {"cidr": "10.0.0.0/8"}, "hosts": [
    {"id": f"host-{i:05d}", "agent_ip": f"172.16.{i // 250}.{i % 250 + 1}",
     "subnets": [f"{ipaddress.IPv4Address(base + (b << (32 - plen)))}/{plen}"]}
    for i, b in enumerate(picks)]}
json.dump(doc, open(out, "w"))
# How many of the hosts' subnets touch a neighbour's (would aggregate if they were one host's).
s = sorted(picks)
adj = sum(1 for a, b in zip(s, s[1:]) if b == a + 1)
print(f"metadata: {hosts} hosts, one random /{plen} each over 10.0.0.0/8 (seed {seed}; "
      f"{adj} adjacent pairs), {os.path.getsize(out) / 1e6:.1f} MB")
PY
head -c 48 /dev/urandom | base64 | tr -d '\n' >"$dir/psk"
chmod 600 "$dir/psk"

ip netns add "$ns"
ip -n "$ns" link set lo up
ip -n "$ns" link add ul0 type veth peer name ul1
ip -n "$ns" addr add 172.16.0.1/16 dev ul0
ip -n "$ns" link set ul0 up
ip -n "$ns" link set ul1 up

sock="$dir/status.sock"
t0=$(date +%s.%N)
ip netns exec "$ns" "$bin" run --metadata "$dir/meta.json" --host host-00000 --driver xfrm \
    --psk-file "$dir/psk" --listen "unix:$sock" --resync "$resync" --log "${RSS_LOG:-info}" \
    >"$dir/run.log" 2>&1 &
pid=$!

# The sidecar logs one `reconciled writes=N errors=M ms="T"` line per reconcile, after a
# `the driver saw a change` line when a kernel notification asked for it (else: the timer).
nrec() { grep -ac ' reconciled writes=' "$dir/run.log" || true; }
# VmRSS, VmHWM (peak) and the CPU time the sidecar used so far (user + system).
mem() {
    awk '/^VmRSS|^VmHWM/ {printf "%s %d MiB  ", $1, $2/1024}' "/proc/$pid/status"
    awk -v hz="$(getconf CLK_TCK)" '{sub(/.*\) /, ""); printf "CPU %.2f s", ($12 + $13) / hz}' "/proc/$pid/stat"
}
dead() { echo "bench-rss: the sidecar exited; its log:" >&2; tail -20 "$dir/run.log" >&2; exit 1; }
# Every reconcile so far: "n cause writes errors ms" (cause: start, notification, timer).
reconciles() {
    awk '/the driver saw a change to its objects/ {cause = "notification"}
         / reconciled writes=/ {
             n++; w = $0; sub(/.*writes=/, "", w); sub(/ .*/, "", w)
             e = $0; sub(/.*errors=/, "", e); sub(/ .*/, "", e)
             t = $0; sub(/.*ms="/, "", t); sub(/".*/, "", t)
             print n, (n == 1 ? "start" : (cause == "" ? "timer" : cause)), w, e, t; cause = ""
         }' "$dir/run.log"
}
deadline=$(( $(date +%s) + timeout ))
until (( $(nrec) >= 1 )); do
    kill -0 "$pid" 2>/dev/null || dead
    (( $(date +%s) < deadline )) || { echo "bench-rss: no reconcile within ${timeout}s" >&2; exit 1; }
    sleep 0.1
done
wall=$(python3 -c "import sys; print(round(float(sys.argv[2]) - float(sys.argv[1]), 2))" "$t0" "$(date +%s.%N)")
echo "memory after the first reconcile (start to done ${wall} s: load, plan, reconcile): $(mem)"
pols=$(ip -n "$ns" xfrm policy count | tr -s ' \t' ' ')
npol=$(awk '{for (i = 1; i < NF; i++) if ($i == "IN" || $i == "OUT" || $i == "FWD") n += $(i + 1)} END {print n + 0}' <<<"$pols")
want=$(( 3 * (hosts - 1) + 1 ))
echo "kernel: $npol policies (want $want: 3 per peer + the block policy;$pols)"
bad=0
(( npol == want )) || bad=1
# Wait for `follow` more reconciles, at least one of them the timer's (a resync, or on a
# kernel without ESP the per-peer retry), reading the memory as each one is done.
seen=1
while :; do
    kill -0 "$pid" 2>/dev/null || dead
    n=$(nrec)
    if (( n > seen )); then
        echo "after reconcile $n: $(mem)"
        seen=$n
    fi
    if (( seen >= 1 + follow )) && reconciles | awk '$1 > 1 && $2 == "timer" {f = 1} END {exit !f}'; then
        break
    fi
    (( $(date +%s) < deadline )) || { echo "bench-rss: only $seen reconciles within ${timeout}s" >&2; exit 1; }
    sleep 0.1
done
echo "reconciles (n, cause, writes, errors, ms):"
reconciles | sed 's/^/  /'
reconciles | awk '$1 > 1 && $3 != 0 {exit 1}' || bad=1
echo "memory at the end: $(mem)"
if (( bad )); then
    echo "bench-rss: FAIL (a reconcile after the first wrote something, or the policy count is off)" >&2
    exit 1
fi
echo "bench-rss: ok"

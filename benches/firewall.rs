//! Firewall per-packet cost benchmark (root; a fresh network namespace per case). Prints
//! numbers. Run: `cargo bench --bench firewall` (as root).
//!
//! For 1, 1,000 and 5,000 peers (one /24 per host, drawn at random over 10.0.0.0/8, so the
//! remote prefixes do not aggregate), side by side in one run:
//! - `overlay`: the rules `firewall::apply` writes (mark chain: RETURN per local subnet + one
//!   MARK for the overlay cidr; guard: one rule);
//! - `per-prefix`: the previous renderer's mark chain (one MARK rule per aggregated remote
//!   prefix, the form before issue 12), written over ours with `iptables-restore --noflush`.
//!
//! Each case times `ping -q -f -c 20000 127.0.0.1` (loopback: OUTPUT + PREROUTING walk the
//! mark chain) and the same over a veth to a second namespace (non-overlay traffic, host
//! OUTPUT out, PREROUTING in), best of 3, and prints the wall time, ping's average RTT and
//! the rate as a ratio to the 1-peer case of the same form. Traffic stays inside the namespaces made here.

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Instant;

use ipnet::IpNet;
use ipsec_mesh::dataplane::firewall::{self, FirewallSpec, MARK_CHAIN};
use ipsec_mesh::dataplane::netns::{in_new_netns, is_root};
use ipsec_mesh::model::{Cluster, RawCluster, RawHost, RawNetwork};
use ipsec_mesh::plan::{self, Plan, PlanOptions};

const PINGS: u32 = 20_000;
const REPEATS: usize = 3;

/// `hosts` hosts: `host-00000` owns 10.42.1.0/24, the others one random /24 each (fixed
/// seed, no duplicates) in 10.0.0.0/8; agent IPs in 172.16.0.0/16.
fn spread_plan(hosts: usize) -> Plan {
    let mut x: u32 = 0x2545_f491;
    let mut used = std::collections::BTreeSet::from(["10.42.1.0/24".to_string()]);
    let mut subnets = vec!["10.42.1.0/24".to_string()];
    while subnets.len() < hosts {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        let n = format!("10.{}.{}.0/24", (x >> 8) & 0xff, x & 0xff);
        if used.insert(n.clone()) {
            subnets.push(n);
        }
    }
    let raw = RawCluster {
        network: RawNetwork {
            cidr: "10.0.0.0/8".into(),
            backend: None,
            mtu: None,
        },
        hosts: subnets
            .into_iter()
            .enumerate()
            .map(|(i, sn)| RawHost {
                id: format!("host-{i:05}"),
                agent_ip: format!("172.16.{}.{}", i / 250, i % 250 + 1),
                subnets: vec![sn],
                ..Default::default()
            })
            .collect(),
    };
    let c = Cluster::validate(&raw).unwrap();
    plan::plan(&c, "host-00000", &PlanOptions::default(), None).unwrap()
}

fn sh(cmd: &str) -> String {
    let o = Command::new("sh").args(["-c", cmd]).output().unwrap();
    assert!(
        o.status.success(),
        "`{cmd}`: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// The pre-issue-12 mark chain for `plan`: one MARK rule per aggregated remote prefix.
fn per_prefix_restore(plan: &Plan) -> String {
    let nets: Vec<IpNet> = plan
        .peers
        .iter()
        .flat_map(|p| p.subnets.iter().map(IpNet::trunc))
        .collect();
    let m = plan.marks;
    let mut s = format!("*mangle\n:{MARK_CHAIN} - [0:0]\n-F {MARK_CHAIN}\n");
    for n in IpNet::aggregate(&nets) {
        s += &format!(
            "-A {MARK_CHAIN} -d {n} -j MARK --set-xmark {:#x}/{:#x}\n",
            m.encrypt, m.mask
        );
    }
    s + "COMMIT\n"
}

/// (wall seconds, avg RTT ms) of a flood ping to `dst`.
fn flood(dst: &str) -> (f64, f64) {
    let t = Instant::now();
    let out = sh(&format!("ping -q -f -c {PINGS} {dst}"));
    let wall = t.elapsed().as_secs_f64();
    assert!(
        out.contains(&format!("{PINGS} received")),
        "ping {dst} lost packets: {out}"
    );
    let avg = out
        .lines()
        .find(|l| l.contains("min/avg/max"))
        .and_then(|l| l.split('=').nth(1))
        .and_then(|v| v.trim().split('/').nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(f64::NAN);
    (wall, avg)
}

struct Row {
    form: &'static str,
    peers: usize,
    mangle_rules: usize,
    lo: (f64, f64),
    veth: (f64, f64),
}

fn case(peers: usize, per_prefix: bool) -> Row {
    let plan = spread_plan(peers + 1);
    in_new_netns(move || {
        let other = format!("h5fw{}", std::process::id());
        sh(&format!(
            "ip netns add {other} && ip link add fw0 type veth peer name fw0p \
             && ip link set fw0p netns {other} && ip addr add 192.168.231.1/24 dev fw0 \
             && ip link set fw0 up \
             && ip -n {other} addr add 192.168.231.2/24 dev fw0p \
             && ip -n {other} link set fw0p up && ip -n {other} link set lo up"
        ));
        let r = firewall::apply(&FirewallSpec::from_plan(&plan)).expect("firewall apply");
        assert!(r.writes > 0);
        if per_prefix {
            let mut c = Command::new("iptables-restore")
                .args(["-w", "--noflush"])
                .stdin(Stdio::piped())
                .spawn()
                .unwrap();
            c.stdin
                .take()
                .unwrap()
                .write_all(per_prefix_restore(&plan).as_bytes())
                .unwrap();
            assert!(c.wait().unwrap().success());
        }
        let mangle_rules = sh("iptables-save -t mangle")
            .lines()
            .filter(|l| l.starts_with("-A "))
            .count();
        // Warm up (ARP, caches), then measure.
        sh("ping -q -c 3 -i 0.01 192.168.231.2");
        // Best of REPEATS: the machine is shared, the minimum is the least disturbed run.
        let best = |dst: &str| {
            (0..REPEATS)
                .map(|_| flood(dst))
                .min_by(|a, b| a.0.total_cmp(&b.0))
                .unwrap()
        };
        let lo = best("127.0.0.1");
        let veth = best("192.168.231.2");
        sh(&format!("ip netns del {other}"));
        Row {
            form: if per_prefix { "per-prefix" } else { "overlay" },
            peers,
            mangle_rules,
            lo,
            veth,
        }
    })
    .unwrap()
}

fn main() {
    if !is_root() {
        eprintln!("firewall bench needs root (network namespaces, iptables): skipped");
        return;
    }
    let sizes = [1usize, 1000, 5000];
    let mut rows = Vec::new();
    for per_prefix in [true, false] {
        for &n in &sizes {
            rows.push(case(n, per_prefix));
        }
    }
    println!(
        "{PINGS} flood pings per case, best of {REPEATS}; rate ratio = 1-peer wall time / this wall time"
    );
    for r in &rows {
        let base = rows
            .iter()
            .find(|b| b.form == r.form && b.peers == 1)
            .unwrap();
        println!(
            "{:<10} peers={:>5} mangle rules={:>5} | loopback {:6.3} s avg rtt {:.3} ms ratio {:.2}x | veth {:6.3} s avg rtt {:.3} ms ratio {:.2}x",
            r.form,
            r.peers,
            r.mangle_rules,
            r.lo.0,
            r.lo.1,
            base.lo.0 / r.lo.0,
            r.veth.0,
            r.veth.1,
            base.veth.0 / r.veth.0,
        );
    }
}

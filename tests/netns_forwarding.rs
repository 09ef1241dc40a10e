//! fwmark forwarding (firewall backend + ip rule/routes) against the real kernel, each test in
//! a fresh network namespace. Root only (CI runs it as root). Traffic goes only to addresses
//! inside namespaces these tests create.
//!
//! The forwarding suite runs once per firewall backend ([`BACKENDS`]: iptables, nftables)
//! through the [`Firewall`] trait, with the same behavioural assertions (marks by counters,
//! the guard, foreign rules untouched, 0 writes when unchanged, drift repaired, cleanup
//! exact, IPv6); the small `our_*` / `mark_packets` / `guard_drops` helpers read each
//! backend's own objects. Text checks of one backend's rules stay in that backend's branch.

mod common;

use std::collections::BTreeSet;
use std::process::{Child, Command};

use common::{cluster, in_new_netns, sh};
use ipsec_mesh::dataplane::firewall::{
    nft, save::rule_packets, Firewall, FirewallKind, FirewallSpec, GUARD_CHAIN, MARK_CHAIN,
};
use ipsec_mesh::dataplane::routes::{self, RouteConfig, RouteSpec};
use ipsec_mesh::model::{Cluster, RawCluster};
use ipsec_mesh::plan::{self, Plan, PlanOptions};

type HostDef<'a> = (&'a str, &'a str, &'a [&'a str]);

fn plan_for(cidr: &str, hosts: &[HostDef], me: &str) -> Plan {
    let c = cluster::valid(&cluster::raw(
        cidr,
        hosts
            .iter()
            .map(|(id, ip, subnets)| cluster::host(id, ip, subnets))
            .collect(),
    ));
    plan::plan(&c, me, &PlanOptions::default(), None).unwrap()
}

const A: HostDef = ("host-a", "192.168.77.1", &["10.42.1.0/24"]);
const B: HostDef = ("host-b", "192.168.77.2", &["10.42.2.0/24"]);
const C: HostDef = ("host-c", "192.168.77.3", &["10.42.4.0/24"]);
const D: HostDef = ("host-d", "192.168.77.4", &["10.42.6.0/24", "10.42.7.0/24"]);

/// The backends the forwarding suite runs against.
const BACKENDS: [FirewallKind; 2] = [FirewallKind::Iptables, FirewallKind::Nftables];

/// Run `body` once per backend, each in a fresh network namespace; a failure names the
/// backend.
fn for_each_backend(body: fn(FirewallKind, &dyn Firewall)) {
    common::require_program("/usr/sbin/iptables", "iptables");
    common::require_program("/usr/sbin/nft", "nftables");
    for kind in BACKENDS {
        let r = std::panic::catch_unwind(|| {
            in_new_netns(move || {
                let fw = kind.backend();
                assert_eq!(fw.name(), kind.as_str());
                body(kind, fw.as_ref())
            })
        });
        match r {
            Ok(r) => r.unwrap(),
            Err(p) => {
                let msg = p
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                panic!("backend {kind}: {msg}");
            }
        }
    }
}

/// The value for `kind`: `iptables` or `nftables`.
fn by_backend<T>(kind: FirewallKind, iptables: T, nftables: T) -> T {
    match kind {
        FirewallKind::Iptables => iptables,
        FirewallKind::Nftables => nftables,
        k => unsupported(k),
    }
}

fn unsupported(kind: FirewallKind) -> ! {
    panic!("no forwarding suite for backend {kind}")
}

fn ipt(v6: bool) -> &'static str {
    if v6 {
        "ip6tables"
    } else {
        "iptables"
    }
}

/// Whether `cmd` succeeds (in the current namespace), output discarded.
fn sh_ok(cmd: &str) -> bool {
    Command::new("sh")
        .args(["-c", cmd])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn our_table_exists() -> bool {
    sh_ok("nft list table inet ipsec-mesh")
}

/// Rules of our nftables table as (chain, packets counted), empty when there is no table.
fn nft_rules() -> Vec<(String, u64)> {
    if !our_table_exists() {
        return vec![];
    }
    let out = sh("nft -j list table inet ipsec-mesh");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v["nftables"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|o| o.get("rule"))
        .map(|r| {
            let packets = r["expr"]
                .as_array()
                .unwrap()
                .iter()
                .filter_map(|e| e.get("counter"))
                .map(|c| c["packets"].as_u64().unwrap())
                .sum();
            (r["chain"].as_str().unwrap().to_string(), packets)
        })
        .collect()
}

fn nft_packets_in(prefix: &str) -> u64 {
    nft_rules()
        .iter()
        .filter(|(c, _)| c.starts_with(prefix))
        .map(|(_, p)| p)
        .sum()
}

/// Rules of ours the backend holds (iptables: rules in our chains and jumps to them; nft:
/// rules in our table, which serves both families).
fn our_rule_count(kind: FirewallKind, v6: bool) -> usize {
    match kind {
        FirewallKind::Iptables => sh(&format!("{}-save", ipt(v6)))
            .lines()
            .filter(|l| l.starts_with("-A ") && l.contains("IPSEC-MESH-"))
            .count(),
        FirewallKind::Nftables => nft_rules().len(),
        k => unsupported(k),
    }
}

/// Our objects as text, counters aside (to compare before / after).
fn our_objects(kind: FirewallKind, v6: bool) -> String {
    match kind {
        FirewallKind::Iptables => sh(&format!("{}-save", ipt(v6)))
            .lines()
            .filter(|l| l.contains("IPSEC-MESH-"))
            .collect::<Vec<_>>()
            .join("\n"),
        FirewallKind::Nftables if our_table_exists() => {
            nft::normalize(&sh("nft list table inet ipsec-mesh"))
        }
        FirewallKind::Nftables => String::new(),
        k => unsupported(k),
    }
}

/// Packets that got the encrypt mark from our rules (prerouting and output).
fn mark_packets(kind: FirewallKind, v6: bool) -> u64 {
    match kind {
        FirewallKind::Iptables => rule_packets(
            &sh(&format!("{}-save -c -t mangle", ipt(v6))),
            MARK_CHAIN,
            "-j MARK",
        )
        .unwrap(),
        FirewallKind::Nftables => nft_packets_in("mark-"),
        k => unsupported(k),
    }
}

/// Packets our guard dropped (forward and output).
fn guard_drops(kind: FirewallKind, v6: bool) -> u64 {
    match kind {
        FirewallKind::Iptables => rule_packets(
            &sh(&format!("{}-save -c -t filter", ipt(v6))),
            GUARD_CHAIN,
            "-j DROP",
        )
        .unwrap(),
        FirewallKind::Nftables => nft_packets_in("guard-"),
        k => unsupported(k),
    }
}

/// Drift: empty the guard by hand (forward and output).
fn break_guard(kind: FirewallKind, v6: bool) {
    match kind {
        FirewallKind::Iptables => sh(&format!("{} -w -F {GUARD_CHAIN}", ipt(v6))),
        FirewallKind::Nftables => sh("nft flush chain inet ipsec-mesh guard-fwd \
            && nft flush chain inet ipsec-mesh guard-out"),
        k => unsupported(k),
    };
}

/// Foreign rules present before any of ours: a docker-like iptables-nft ruleset (filter
/// and nat, v4 and v6), rules close to ours (mark 0x4000 in mangle), and nft tables of
/// someone else's (hooked where ours are, a set, counters).
fn add_foreign() {
    sh("iptables -w -N DOCKER && iptables -w -N DOCKER-ISOLATION-STAGE-1 \
        && iptables -w -N DOCKER-ISOLATION-STAGE-2 && iptables -w -N DOCKER-USER \
        && iptables -w -A FORWARD -j DOCKER-USER && iptables -w -A FORWARD -j DOCKER-ISOLATION-STAGE-1 \
        && iptables -w -A FORWARD -o docker0 -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT \
        && iptables -w -A FORWARD -o docker0 -j DOCKER \
        && iptables -w -A FORWARD -i docker0 ! -o docker0 -j ACCEPT \
        && iptables -w -A DOCKER-ISOLATION-STAGE-1 -i docker0 ! -o docker0 -j DOCKER-ISOLATION-STAGE-2 \
        && iptables -w -A DOCKER-ISOLATION-STAGE-1 -j RETURN \
        && iptables -w -A DOCKER-ISOLATION-STAGE-2 -o docker0 -j DROP \
        && iptables -w -A DOCKER-ISOLATION-STAGE-2 -j RETURN && iptables -w -A DOCKER-USER -j RETURN \
        && iptables -w -t nat -N DOCKER \
        && iptables -w -t nat -A PREROUTING -m addrtype --dst-type LOCAL -j DOCKER \
        && iptables -w -t nat -A OUTPUT ! -d 127.0.0.0/8 -m addrtype --dst-type LOCAL -j DOCKER \
        && iptables -w -t nat -A POSTROUTING -s 172.17.0.0/16 ! -o docker0 -j MASQUERADE \
        && iptables -w -t nat -A DOCKER -i docker0 -j RETURN");
    sh(
        "iptables -w -t mangle -N FOREIGN && iptables -w -t mangle -A FOREIGN -j RETURN \
        && iptables -w -t mangle -A PREROUTING -j FOREIGN \
        && iptables -w -t mangle -A OUTPUT -m mark --mark 0x4000/0x4000 -j ACCEPT \
        && iptables -w -t filter -N KEEP-ME && iptables -w -t filter -A OUTPUT -j KEEP-ME \
        && iptables -w -t filter -A FORWARD -s 10.9.9.0/24 -j ACCEPT",
    );
    sh(
        "ip6tables -w -N DOCKER-USER && ip6tables -w -A DOCKER-USER -j RETURN \
        && ip6tables -w -A FORWARD -j DOCKER-USER \
        && ip6tables -w -N KEEP-ME && ip6tables -w -A FORWARD -j KEEP-ME",
    );
    sh("nft -f - <<'EOF'
table inet foreign {
    set blocked { type ipv4_addr; elements = { 10.9.9.9 } }
    chain out { type filter hook output priority 10; policy accept; ip daddr @blocked counter drop; counter; }
    chain pre { type filter hook prerouting priority -150; policy accept; meta mark 0x4000 counter; }
}
table ip6 foreign6 {
    chain watch { type filter hook forward priority 0; policy accept; counter; }
}
EOF");
}

/// Everything that is not ours: iptables dump without our chains/jumps, comments and empty
/// tables (iptables-nft creates a table on first use and keeps it, empty, after our chains
/// go), every nft table but ours and iptables-nft's (counters aside), ip rules except ours,
/// routes of every table except ours (and link-local ones).
fn foreign_snapshot(v6: bool) -> String {
    let ip = if v6 { "ip -6" } else { "ip -4" };
    let mut dump: Vec<String> = Vec::new();
    let mut table: Vec<String> = Vec::new();
    for l in sh(&format!("{}-save", ipt(v6))).lines() {
        if l.starts_with('#') || l.contains("IPSEC-MESH-") {
            continue;
        }
        table.push(l.to_string());
        if l == "COMMIT" {
            // Keep a table only if it holds a rule or a user chain.
            let builtin =
                |c: &str| c.starts_with(':') && c.ends_with(" [0:0]") && !c.contains(" - ");
            if table
                .iter()
                .any(|c| c.starts_with("-A ") || (c.starts_with(':') && !builtin(c)))
            {
                dump.append(&mut table);
            }
            table.clear();
        }
    }
    let iptables_nft = |fam: &str, name: &str| {
        matches!(fam, "ip" | "ip6")
            && matches!(name, "filter" | "mangle" | "nat" | "raw" | "security")
    };
    let mut nft_tables = Vec::new();
    for l in sh("nft list tables").lines() {
        let w: Vec<&str> = l.split_whitespace().collect();
        let [_, fam, name] = w[..] else {
            panic!("nft list tables: {l:?}")
        };
        if (fam, name) == ("inet", nft::TABLE) || iptables_nft(fam, name) {
            continue;
        }
        nft_tables.push(nft::normalize(&sh(&format!("nft list table {fam} {name}"))));
    }
    let rules: Vec<String> = sh(&format!("{ip} rule"))
        .lines()
        .filter(|l| !(l.starts_with("1042:") && l.contains("lookup 1042")))
        .map(String::from)
        .collect();
    let routes: Vec<String> = sh(&format!("{ip} route show table all"))
        .lines()
        // IPv6 link-local routes come and go by themselves (addresses being autoconfigured).
        .filter(|l| !l.contains("table 1042") && !l.contains("fe80::"))
        .map(String::from)
        .collect();
    format!(
        "{}\n--\n{}\n--\n{}\n--\n{}",
        dump.join("\n"),
        nft_tables.join("\n"),
        rules.join("\n"),
        routes.join("\n")
    )
}

fn json(cmd: &str) -> Vec<serde_json::Value> {
    let out = sh(cmd);
    if out.trim().is_empty() {
        return vec![];
    }
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("`{cmd}`: {e}: {out}"))
}

/// Rules at our priority as (priority, fwmark, fwmask, table) from `ip -j rule` (ours
/// look up table 1042).
fn our_rules(v6: bool) -> Vec<(u64, String, String, String)> {
    let fam = if v6 { "-6" } else { "-4" };
    json(&format!("ip {fam} -j rule"))
        .iter()
        .filter(|r| r["priority"] == 1042)
        .map(|r| {
            (
                r["priority"].as_u64().unwrap(),
                r["fwmark"].as_str().unwrap_or("").to_string(),
                r["fwmask"].as_str().unwrap_or("").to_string(),
                r["table"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect()
}

/// `dst dev` of every route in table 1042.
fn our_routes(v6: bool) -> BTreeSet<String> {
    let fam = if v6 { "-6" } else { "-4" };
    json(&format!("ip {fam} -j route show table 1042"))
        .iter()
        .map(|r| {
            format!(
                "{} dev {}",
                r["dst"].as_str().unwrap(),
                r["dev"].as_str().unwrap()
            )
        })
        .collect()
}

fn set(items: &[&str]) -> BTreeSet<String> {
    items.iter().map(|s| s.to_string()).collect()
}

fn count(haystack: &str, line: &str) -> usize {
    haystack.lines().filter(|l| l.trim() == line).count()
}

fn apply_all(fw: &dyn Firewall, plan: &Plan, spec: FirewallSpec) -> (usize, usize) {
    let f = fw.apply(&spec).expect("firewall apply");
    let r = routes::reconcile(&RouteSpec::from_plan(plan, RouteConfig::default()))
        .expect("routes reconcile");
    (f.writes, r.writes)
}

fn cleanup_all(fw: &dyn Firewall) -> (usize, usize) {
    let f = fw.cleanup().expect("firewall cleanup");
    let r = routes::cleanup(&RouteConfig::default()).expect("routes cleanup");
    (f.writes, r.writes)
}

/// Nothing of either backend (no chain of ours in iptables or ip6tables, no table of ours
/// in nftables) and none of our ip rules or routes of family `v6`.
fn assert_nothing_of_ours(v6: bool) {
    for ipt in ["iptables-save", "ip6tables-save"] {
        let dump = sh(ipt);
        assert!(!dump.contains("IPSEC-MESH"), "{ipt}: {dump}");
    }
    assert!(!our_table_exists(), "{}", sh("nft list ruleset"));
    let left: Vec<_> = our_rules(v6)
        .into_iter()
        .filter(|r| r.3 == "1042")
        .collect();
    assert!(left.is_empty(), "{left:?}");
    assert!(our_routes(v6).is_empty(), "{:?}", our_routes(v6));
}

#[test]
#[ignore = "needs root: integration/run.sh runs it as root (--include-ignored)"]
fn apply_reconcile_and_cleanup_touch_only_our_objects() {
    require_root!();
    for_each_backend(|kind, fw| {
        sh("ip link add ul0 type veth peer name ul0p \
            && ip addr add 192.168.77.1/24 dev ul0 && ip link set ul0 up && ip link set ul0p up \
            && ip link add cbr0 type bridge && ip addr add 10.42.1.1/24 dev cbr0 \
            && ip link set cbr0 up");
        // Foreign objects, some deliberately close to ours.
        add_foreign();
        sh("ip rule add pref 1000 fwmark 0x4000/0x4000 lookup 100 \
            && ip rule add pref 1042 fwmark 0x1068 lookup 200 \
            && ip route add 10.99.0.0/16 dev ul0 table 100 \
            && ip route add 10.98.0.0/16 dev ul0 table 200 \
            && ip route add 10.97.0.0/16 dev ul0");
        let foreign = foreign_snapshot(false);
        let foreign6 = foreign_snapshot(true);

        let plan = plan_for("10.42.0.0/16", &[A, B, C, D], "host-a");
        let (w, rt) = apply_all(fw, &plan, FirewallSpec::from_plan(&plan));
        // iptables: filter guard chain + 2 jumps, mangle mark chain + 2 jumps; nftables: one
        // transaction. Routes: rule + 3 routes.
        assert_eq!((w, rt), (by_backend(kind, 6, 1), 4));
        // Mark, guard (forward + output) rules; iptables also counts the jumps and the local
        // RETURN.
        assert_eq!(our_rule_count(kind, false), by_backend(kind, 7, 4));

        match kind {
            FirewallKind::Iptables => {
                let mangle = sh("iptables-save -t mangle");
                assert_eq!(
                    count(&mangle, "-A PREROUTING -j IPSEC-MESH-MARK"),
                    1,
                    "{mangle}"
                );
                assert_eq!(
                    count(&mangle, "-A OUTPUT -j IPSEC-MESH-MARK"),
                    1,
                    "{mangle}"
                );
                let mark_rules: Vec<&str> = mangle
                    .lines()
                    .filter(|l| l.starts_with(&format!("-A {MARK_CHAIN} ")))
                    .collect();
                assert_eq!(
                    mark_rules,
                    vec![
                        "-A IPSEC-MESH-MARK -d 10.42.1.0/24 -j RETURN",
                        "-A IPSEC-MESH-MARK -d 10.42.0.0/16 -j MARK --set-xmark 0x100000/0x300000",
                    ]
                );
                let filter = sh("iptables-save -t filter");
                assert_eq!(
                    count(&filter, "-A FORWARD -j IPSEC-MESH-GUARD"),
                    1,
                    "{filter}"
                );
                assert_eq!(
                    count(&filter, "-A OUTPUT -j IPSEC-MESH-GUARD"),
                    1,
                    "{filter}"
                );
                assert_eq!(
                    count(
                        &filter,
                        "-A IPSEC-MESH-GUARD -d 10.42.0.0/16 -m mark --mark 0x100000/0x300000 \
                         -m policy --dir out --pol none -j DROP"
                    ),
                    1,
                    "{filter}"
                );
                // Our jumps come first in their built-in chains.
                let first_fwd = filter
                    .lines()
                    .find(|l| l.starts_with("-A FORWARD "))
                    .unwrap();
                assert_eq!(first_fwd, "-A FORWARD -j IPSEC-MESH-GUARD");
                assert!(!our_table_exists());
            }
            FirewallKind::Nftables => {
                let table = sh("nft list table inet ipsec-mesh");
                assert!(table.contains("elements = { 10.42.1.0/24 }"), "{table}");
                assert_eq!(table.matches("rt ipsec missing").count(), 2, "{table}");
                assert_eq!(table.matches("meta mark set").count(), 2, "{table}");
                assert!(table.contains("hook prerouting priority mangle"), "{table}");
                assert!(
                    table.contains("type route hook output priority mangle"),
                    "{table}"
                );
                assert!(!sh("iptables-save").contains("IPSEC-MESH"));
            }
            k => unsupported(k),
        }

        let rules = our_rules(false);
        assert!(
            rules.contains(&(1042, "0x100000".into(), "0x300000".into(), "1042".into())),
            "{rules:?}"
        );
        assert_eq!(
            rules.len(),
            2,
            "ours and the foreign one at pref 1042: {rules:?}"
        );
        assert_eq!(
            our_routes(false),
            set(&[
                "10.42.2.0/24 dev ul0",
                "10.42.4.0/24 dev ul0",
                "10.42.6.0/23 dev ul0"
            ])
        );
        assert_eq!(
            foreign_snapshot(false),
            foreign,
            "apply touched a foreign object"
        );
        assert_eq!(
            foreign_snapshot(true),
            foreign6,
            "apply touched a foreign v6 object"
        );

        // A second apply writes nothing.
        assert_eq!(apply_all(fw, &plan, FirewallSpec::from_plan(&plan)), (0, 0));

        // host-c leaves: the firewall does not change (it names no peer), only its route goes.
        let ours = our_objects(kind, false);
        let plan2 = plan_for("10.42.0.0/16", &[A, B, D], "host-a");
        assert_eq!(
            apply_all(fw, &plan2, FirewallSpec::from_plan(&plan2)),
            (0, 1)
        );
        assert_eq!(our_objects(kind, false), ours);
        assert_eq!(
            our_routes(false),
            set(&["10.42.2.0/24 dev ul0", "10.42.6.0/23 dev ul0"])
        );
        assert_eq!(
            apply_all(fw, &plan2, FirewallSpec::from_plan(&plan2)),
            (0, 0)
        );

        // Restricting prerouting marking to the bridge and the NIC (iptables: one jump
        // swapped for a chain; nftables: the table replaced); the rule count stays small.
        let with_devs =
            FirewallSpec::from_plan(&plan2).with_devices(Some("cbr0".into()), Some("ul0".into()));
        let r = fw.apply(&with_devs).unwrap();
        assert_eq!(r.writes, by_backend(kind, 3, 1), "{:?}", r.changes);
        match kind {
            FirewallKind::Iptables => {
                let mangle = sh("iptables-save -t mangle");
                assert_eq!(
                    count(&mangle, "-A PREROUTING -j IPSEC-MESH-PRE"),
                    1,
                    "{mangle}"
                );
                assert_eq!(
                    count(&mangle, "-A PREROUTING -j IPSEC-MESH-MARK"),
                    0,
                    "{mangle}"
                );
                assert_eq!(
                    count(&mangle, "-A IPSEC-MESH-PRE -i cbr0 -j IPSEC-MESH-MARK"),
                    1
                );
            }
            FirewallKind::Nftables => {
                let pre = sh("nft list chain inet ipsec-mesh mark-pre");
                // nft lists the set's elements in its own order.
                let iif = pre.lines().find(|l| l.contains("iifname {")).unwrap_or("");
                assert!(iif.contains("\"cbr0\"") && iif.contains("\"ul0\""), "{pre}");
            }
            k => unsupported(k),
        }
        assert_eq!(our_rule_count(kind, false), by_backend(kind, 9, 4));
        assert_eq!(fw.apply(&with_devs).unwrap().writes, 0);
        assert_eq!(
            foreign_snapshot(false),
            foreign,
            "apply touched a foreign object"
        );

        // Drift: the guard emptied by hand is repaired with one write, exactly as it was.
        let ours = our_objects(kind, false);
        break_guard(kind, false);
        assert_ne!(our_objects(kind, false), ours);
        let r = fw.apply(&with_devs).unwrap();
        assert_eq!(r.writes, 1, "{:?}", r.changes);
        assert_eq!(our_objects(kind, false), ours);
        assert_eq!(fw.apply(&with_devs).unwrap().writes, 0);

        // Cleanup removes everything of ours and nothing else; a second one writes nothing.
        // iptables: filter 2 jumps + guard chain, mangle 2 jumps + PRE and MARK chains;
        // nftables: the table. Routes: rule + 2 routes.
        assert_eq!(cleanup_all(fw), (by_backend(kind, 7, 1), 3));
        assert_nothing_of_ours(false);
        assert_eq!(
            foreign_snapshot(false),
            foreign,
            "cleanup touched a foreign object"
        );
        assert_eq!(
            foreign_snapshot(true),
            foreign6,
            "cleanup touched a foreign v6 object"
        );
        assert_eq!(cleanup_all(fw), (0, 0));
        assert!(sh("ip -4 rule").contains("1042:\tfrom all fwmark 0x1068 lookup 200"));
    });
}

#[test]
#[ignore = "needs root: integration/run.sh runs it as root (--include-ignored)"]
fn ipv6_overlay_marks_guards_and_cleans_up_v6_only() {
    require_root!();
    for_each_backend(|kind, fw| {
        sh("ip link add ul0 type veth peer name ul0p \
            && ip addr add fd00:77::1/64 dev ul0 nodad && ip link set ul0 up \
            && ip link set ul0p up \
            && ip link add lc0 type veth peer name lc0p \
            && ip addr add fd42:0:1::1/64 dev lc0 nodad && ip link set lc0 up \
            && ip link set lc0p up");
        // The host's own traffic to the overlay first routes via the local device (main
        // table); the mark then reroutes it through table 1042.
        sh("ip -6 route add fd42::/32 dev lc0");
        add_foreign();
        let foreign = foreign_snapshot(true);
        let foreign4 = foreign_snapshot(false);
        let hosts: [HostDef; 3] = [
            ("a", "fd00:77::1", &["fd42:0:1::/64"]),
            ("b", "fd00:77::2", &["fd42:0:2::/64"]),
            ("c", "fd00:77::3", &["fd42:0:3::/64"]),
        ];
        let plan = plan_for("fd42::/32", &hosts, "a");
        let (w, rt) = apply_all(fw, &plan, FirewallSpec::from_plan(&plan));
        assert_eq!((w, rt), (by_backend(kind, 6, 1), 3));
        assert_eq!(our_rule_count(kind, true), by_backend(kind, 7, 4));
        match kind {
            FirewallKind::Iptables => {
                let mangle = sh("ip6tables-save -t mangle");
                let mark_rules: Vec<&str> = mangle
                    .lines()
                    .filter(|l| l.starts_with(&format!("-A {MARK_CHAIN} ")))
                    .collect();
                assert_eq!(
                    mark_rules,
                    vec![
                        "-A IPSEC-MESH-MARK -d fd42:0:1::/64 -j RETURN",
                        "-A IPSEC-MESH-MARK -d fd42::/32 -j MARK --set-xmark 0x100000/0x300000",
                    ]
                );
                assert!(
                    sh("ip6tables-save -t filter").contains("-A IPSEC-MESH-GUARD -d fd42::/32 ")
                );
                assert!(!sh("iptables-save").contains("IPSEC-MESH"), "v4 untouched");
            }
            FirewallKind::Nftables => {
                let table = sh("nft list table inet ipsec-mesh");
                assert!(table.contains("type ipv6_addr"), "{table}");
                assert!(table.contains("elements = { fd42:0:1::/64 }"), "{table}");
                assert_eq!(table.matches("ip6 daddr fd42::/32").count(), 4, "{table}");
                assert!(!table.contains(" ip daddr"), "no v4 rule: {table}");
            }
            k => unsupported(k),
        }
        assert_eq!(our_rules(true).len(), 1);
        assert!(our_rules(false).is_empty(), "no v4 rule");
        assert_eq!(
            our_routes(true),
            set(&["fd42:0:2::/64 dev ul0", "fd42:0:3::/64 dev ul0"])
        );
        assert_eq!(apply_all(fw, &plan, FirewallSpec::from_plan(&plan)), (0, 0));
        assert_eq!(foreign_snapshot(true), foreign);
        assert_eq!(foreign_snapshot(false), foreign4);

        // Marks and the guard for IPv6: to a remote subnet (no XFRM policy here) marked,
        // rerouted and dropped (the send fails); local and underlay traffic is not marked.
        let s = std::net::UdpSocket::bind("[::]:0").unwrap();
        let (m0, g0) = (mark_packets(kind, true), guard_drops(kind, true));
        for dst in ["[fd42:0:2::5]:9", "[fd42:0:3::5]:9", "[fd42:0:9::5]:9"] {
            let e = s.send_to(b"x", dst).unwrap_err();
            assert_eq!(e.kind(), std::io::ErrorKind::PermissionDenied, "{dst}: {e}");
        }
        assert_eq!(mark_packets(kind, true), m0 + 3);
        assert_eq!(guard_drops(kind, true), g0 + 3);
        s.send_to(b"x", "[fd42:0:1::7]:9").unwrap();
        s.send_to(b"x", "[fd00:77::9]:9").unwrap();
        assert_eq!(
            mark_packets(kind, true),
            m0 + 3,
            "local / underlay traffic is not marked"
        );
        assert_eq!(guard_drops(kind, true), g0 + 3);

        // Drift repaired in one write.
        let ours = our_objects(kind, true);
        break_guard(kind, true);
        assert_eq!(fw.apply(&FirewallSpec::from_plan(&plan)).unwrap().writes, 1);
        assert_eq!(our_objects(kind, true), ours);

        let (w, rt) = cleanup_all(fw);
        assert_eq!((w, rt), (by_backend(kind, 6, 1), 3));
        assert_nothing_of_ours(true);
        assert_eq!(foreign_snapshot(true), foreign);
        assert_eq!(foreign_snapshot(false), foreign4);
        assert_eq!(cleanup_all(fw), (0, 0));
    });
}

#[test]
#[ignore = "needs root: integration/run.sh runs it as root (--include-ignored)"]
fn missing_underlay_address_is_a_clear_error() {
    require_root!();
    in_new_netns(|| {
        let plan = plan_for("10.42.0.0/16", &[A, B], "host-a");
        let e = routes::reconcile(&RouteSpec::from_plan(&plan, RouteConfig::default()))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("no interface holds the underlay address 192.168.77.1"),
            "{e}"
        );
    })
    .unwrap();
}

/// A sleeping process in a fresh netns: a "container". Killed (by its pid) on drop.
struct Container(Child);

impl Container {
    fn new() -> Container {
        Container(
            Command::new("unshare")
                .args(["-n", "sleep", "60"])
                .spawn()
                .expect("spawn unshare"),
        )
    }
    fn pid(&self) -> u32 {
        self.0.id()
    }
    fn sh(&self, cmd: &str) -> String {
        sh(&format!(
            "nsenter --net=/proc/{}/ns/net bash -c '{cmd}'",
            self.pid()
        ))
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn tx_packets(dev: &str) -> u64 {
    let v = json(&format!("ip -s -j link show {dev}"));
    v[0]["stats64"]["tx"]["packets"].as_u64().unwrap()
}

#[test]
#[ignore = "needs root: integration/run.sh runs it as root (--include-ignored)"]
fn marked_traffic_without_ipsec_policy_is_dropped() {
    require_root!();
    for_each_backend(|kind, fw| {
        sh(
            "sysctl -qw net.ipv6.conf.default.disable_ipv6=1 net.ipv6.conf.all.disable_ipv6=1 \
            net.ipv4.ip_forward=1",
        );
        sh("ip link add ul0 type veth peer name ul0p \
            && ip addr add 192.168.77.1/24 dev ul0 && ip link set ul0 up && ip link set ul0p up");
        let ctr = Container::new();
        // Wait until unshare has switched namespaces (its netns differs from ours).
        let ours = std::fs::read_link("/proc/thread-self/ns/net").unwrap();
        for _ in 0..200 {
            let theirs = std::fs::read_link(format!("/proc/{}/ns/net", ctr.pid()));
            if theirs.is_ok_and(|t| t != ours) {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        sh(&format!(
            "ip link add hveth type veth peer name cveth && ip link set cveth netns {} \
             && ip addr add 10.42.1.1/24 dev hveth && ip link set hveth up",
            ctr.pid()
        ));
        ctr.sh(
            "ip link set lo up && ip link set cveth up && ip addr add 10.42.1.2/24 dev cveth \
                && ip route add default via 10.42.1.1",
        );
        // The host's own traffic to the overlay first routes via the bridge (main table).
        sh("ip route add 10.42.0.0/16 dev hveth");

        let plan = plan_for("10.42.0.0/16", &[A, B], "host-a");
        let spec =
            FirewallSpec::from_plan(&plan).with_devices(Some("hveth".into()), Some("ul0".into()));
        apply_all(fw, &plan, spec.clone());
        assert_eq!(
            (mark_packets(kind, false), guard_drops(kind, false)),
            (0, 0)
        );
        let tx_before = tx_packets("ul0");

        // Forwarded: container -> host (prerouting mark) -> table 1042 -> ul0 -> forward guard.
        for _ in 0..3 {
            ctr.sh("echo x > /dev/udp/10.42.2.5/9");
        }
        assert_eq!(guard_drops(kind, false), 3);
        assert_eq!(mark_packets(kind, false), 3);

        // An overlay address of no peer is marked too: no route in table 1042, the main table
        // sends it back to the bridge, and the guard drops it (never plaintext).
        ctr.sh("echo x > /dev/udp/10.42.200.5/9");
        assert_eq!(mark_packets(kind, false), 4);
        assert_eq!(guard_drops(kind, false), 4);

        // Traffic between the container and this host's own subnet is not marked.
        ctr.sh("echo x > /dev/udp/10.42.1.1/9");
        assert_eq!(mark_packets(kind, false), 4);

        // Host-originated: output mark -> reroute -> output guard: the send itself fails.
        let s = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
        let e = s.send_to(b"x", "10.42.2.5:9").unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::PermissionDenied, "{e}");
        assert_eq!(
            (mark_packets(kind, false), guard_drops(kind, false)),
            (5, 5)
        );

        // Not one packet left through the underlay.
        assert_eq!(tx_packets("ul0"), tx_before, "plaintext left through ul0");

        // Control: with the guard emptied by hand, the same packet does go out ul0 (so the
        // mark really routes via table 1042, and the check above would see a leak).
        break_guard(kind, false);
        ctr.sh("echo x > /dev/udp/10.42.2.5/9");
        assert!(
            tx_packets("ul0") > tx_before,
            "marked packet was not routed to ul0"
        );
        // The next apply repairs the guard, and it drops again.
        let r = fw.apply(&spec).unwrap();
        assert_eq!(r.writes, 1, "{:?}", r.changes);
        let (g, tx) = (guard_drops(kind, false), tx_packets("ul0"));
        ctr.sh("echo x > /dev/udp/10.42.2.5/9");
        assert_eq!(guard_drops(kind, false), g + 1);
        assert_eq!(
            tx_packets("ul0"),
            tx,
            "plaintext left through ul0 after the repair"
        );

        cleanup_all(fw);
        assert_nothing_of_ours(false);
    });
}

/// `hosts` hosts as an allocator leaves them: `host-00000` (the self host) owns
/// 10.42.1.0/24, every other host one /24 drawn at random (fixed seed, no duplicates) from
/// 10.0.0.0/8, so the remote prefixes do not aggregate into a few blocks. Agent IPs in
/// 172.16.0.0/16.
fn spread_mesh(hosts: usize) -> RawCluster {
    cluster::spread_24s(hosts, 0x2545_f491)
}

fn spread_plan(hosts: usize) -> Plan {
    let c = Cluster::validate(&spread_mesh(hosts)).unwrap();
    plan::plan(&c, "host-00000", &PlanOptions::default(), None).unwrap()
}

/// Packets through the iptables backend's local RETURN rule (its own object: nftables
/// excludes the local subnets with a set inside the mark rule).
fn iptables_local_returns() -> u64 {
    rule_packets(
        &sh("iptables-save -c -t mangle"),
        MARK_CHAIN,
        "-d 10.42.1.0/24 -j RETURN",
    )
    .unwrap()
}

#[test]
#[ignore = "needs root: integration/run.sh runs it as root (--include-ignored)"]
fn rule_count_is_independent_of_peers_and_marks_only_remote_overlay_traffic() {
    require_root!();
    for_each_backend(|kind, fw| {
        sh("sysctl -qw net.ipv6.conf.default.disable_ipv6=1 net.ipv6.conf.all.disable_ipv6=1");
        sh(
            "ip link set lo up && ip link add ul0 type veth peer name ul0p \
            && ip addr add 172.16.0.1/16 dev ul0 && ip link set ul0 up && ip link set ul0p up \
            && ip link add cbr0 type bridge && ip addr add 10.42.1.1/24 dev cbr0 \
            && ip link set cbr0 up",
        );
        // The host's own traffic to the overlay first routes via the bridge (main table); the
        // mark then reroutes it through table 1042.
        sh("ip route add 10.0.0.0/8 dev cbr0");
        let one = spread_plan(2);
        let many = spread_plan(5001);
        assert_eq!(many.peers.len(), 5000);
        let remote: Vec<ipnet::IpNet> = many
            .peers
            .iter()
            .flat_map(|p| p.subnets.iter().copied())
            .collect();
        let blocks = ipnet::IpNet::aggregate(&remote).len();
        assert!(blocks > 1000, "spread over the cidr: {blocks} blocks");

        assert_eq!(
            apply_all(fw, &one, FirewallSpec::from_plan(&one)),
            (by_backend(kind, 6, 1), 2)
        );
        let (rules1, ours1) = (our_rule_count(kind, false), our_objects(kind, false));
        // iptables: PREROUTING + OUTPUT jumps, RETURN for the local /24, one MARK; FORWARD +
        // OUTPUT jumps, one guard rule. nftables: mark-pre, mark-out, guard-fwd, guard-out.
        assert_eq!(rules1, by_backend(kind, 7, 4));
        // 5,000 peers: the firewall writes nothing (it names no peer), the routes grow.
        let (w, rt) = apply_all(fw, &many, FirewallSpec::from_plan(&many));
        assert_eq!(w, 0);
        assert!(rt > 1000, "{rt} route writes (routes are aggregated)");
        assert_eq!(
            our_rule_count(kind, false),
            rules1,
            "rules grew with the peers"
        );
        assert_eq!(our_objects(kind, false), ours1);

        let s = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
        let (m0, g0) = (mark_packets(kind, false), guard_drops(kind, false));
        let r0 = match kind {
            FirewallKind::Iptables => iptables_local_returns(),
            _ => 0,
        };
        // Every 250th peer's subnet (20 peers across the cidr): marked, routed to table 1042
        // and dropped by the guard (no XFRM policy here): the send fails.
        let sample: Vec<&ipnet::IpNet> = remote.iter().step_by(250).collect();
        for n in &sample {
            let ipnet::IpNet::V4(v4) = n else {
                unreachable!()
            };
            let dst = std::net::Ipv4Addr::from(u32::from(v4.network()) + 5);
            let e = s.send_to(b"x", (dst, 9)).unwrap_err();
            assert_eq!(e.kind(), std::io::ErrorKind::PermissionDenied, "{dst}: {e}");
        }
        let n = sample.len() as u64;
        assert_eq!(mark_packets(kind, false), m0 + n);
        assert_eq!(guard_drops(kind, false), g0 + n);

        // The local subnet: not marked, not dropped (iptables: its RETURN rule counts them).
        for _ in 0..3 {
            s.send_to(b"x", "10.42.1.7:9").unwrap();
        }
        assert_eq!(mark_packets(kind, false), m0 + n);
        if kind == FirewallKind::Iptables {
            assert_eq!(iptables_local_returns(), r0 + 3);
        }
        // The underlay (outside the overlay): not marked, not dropped.
        for _ in 0..3 {
            s.send_to(b"x", "172.16.9.9:9").unwrap();
        }
        assert_eq!(mark_packets(kind, false), m0 + n);
        assert_eq!(guard_drops(kind, false), g0 + n);
        if kind == FirewallKind::Iptables {
            assert_eq!(iptables_local_returns(), r0 + 3);
        }

        // Back to one peer: still no firewall write; cleanup removes everything.
        assert_eq!(apply_all(fw, &one, FirewallSpec::from_plan(&one)).0, 0);
        cleanup_all(fw);
        assert_nothing_of_ours(false);
    });
}

/// The xfrm driver with `--firewall none`: the XFRM policies (block policy included) and the
/// policy routes are in place, no rule of ours is in any table, and cleanup removes only
/// what the driver made. With `iptables` the same driver adds its chains.
#[test]
#[ignore = "needs root: integration/run.sh runs it as root (--include-ignored)"]
fn the_none_firewall_backend_leaves_the_firewall_to_the_operator() {
    use ipsec_mesh::dataplane::assemble::{DataplaneConfig, DriverKind};
    use ipsec_mesh::dataplane::driver::Forwarding;
    require_root!();
    in_new_netns(|| {
        sh("ip link add ul0 type veth peer name ul0p \
            && ip addr add 192.168.77.1/24 dev ul0 && ip link set ul0 up && ip link set ul0p up");
        let before = sh("iptables-save -t mangle; iptables-save -t filter");
        let plan = plan_for("10.42.0.0/16", &[A, B, C, D], "host-a");
        let config = |firewall| DataplaneConfig {
            driver: DriverKind::Xfrm,
            marks: plan.marks,
            forwarding: Forwarding {
                firewall,
                ..Forwarding::default()
            },
            vxlan: Default::default(),
            charon: Default::default(),
        };
        let mut none = config(FirewallKind::None).build(None).unwrap();
        let r = none.reconcile(&plan);
        let parts: std::collections::BTreeMap<_, _> = r.parts.iter().cloned().collect();
        assert_eq!(parts["firewall"], 0, "{r:?}");
        assert!(parts["routes"] > 0, "{r:?}");
        assert!(
            sh("ip xfrm policy").contains("action block"),
            "the block policy is ours to keep"
        );
        let dump = sh("iptables-save");
        assert!(!dump.contains("IPSEC-MESH"), "{dump}");
        assert!(!our_routes(false).is_empty());

        // The same driver with iptables adds the chains; back to none, they stay (an
        // operator who opts out later must not lose the guard by surprise) until cleanup.
        let mut ipt = config(FirewallKind::Iptables).build(None).unwrap();
        let r = ipt.reconcile(&plan);
        assert!(
            r.parts.iter().any(|(p, w)| *p == "firewall" && *w > 0),
            "{r:?}"
        );
        assert!(sh("iptables-save -t mangle").contains(MARK_CHAIN));
        assert_eq!(none.reconcile(&plan).writes, 0, "nothing changed");
        assert!(sh("iptables-save -t filter").contains(GUARD_CHAIN));
        let r = none.cleanup();
        assert!(r.ok(), "{r:?}");
        assert!(
            sh("iptables-save").contains("IPSEC-MESH"),
            "none removes no rule"
        );
        assert!(
            sh("ip xfrm policy").trim().is_empty(),
            "policies go with the driver"
        );
        assert!(our_routes(false).is_empty());
        assert!(ipt.cleanup().ok());
        assert_nothing_of_ours(false);
        assert_eq!(
            sh("iptables-save -t mangle; iptables-save -t filter")
                .lines()
                .filter(|l| !l.starts_with('#'))
                .count(),
            before.lines().filter(|l| !l.starts_with('#')).count()
        );
    })
    .unwrap();
}

/// Packets counted by the rule of `chain` in our nftables table.
fn nft_packets(chain: &str) -> u64 {
    let l = sh(&format!("nft list chain inet ipsec-mesh {chain}"));
    l.split_whitespace()
        .skip_while(|w| *w != "packets")
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no counter in {chain}:\n{l}"))
}

/// The nftables backend: one table of its own, replaced in one transaction; marks traffic
/// to the remote overlay only, the guard drops marked traffic no policy takes, 0 writes
/// when unchanged, drift repaired, foreign tables (nft and iptables-nft) untouched, a switch
/// from and to iptables leaves nothing of the old backend, cleanup exact.
#[test]
#[ignore = "needs root: integration/run.sh runs it as root (--include-ignored)"]
fn nftables_backend_marks_guards_and_owns_only_its_table() {
    require_root!();
    common::require_program("/usr/sbin/nft", "nftables");
    in_new_netns(|| {
        sh("ip link set lo up && ip link add ul0 type veth peer name ul0p \
            && ip addr add 192.168.77.1/24 dev ul0 && ip link set ul0 up && ip link set ul0p up \
            && ip link add cbr0 type bridge && ip addr add 10.42.1.1/24 dev cbr0 \
            && ip link set cbr0 up");
        // Foreign rules: an nft table of someone else's, and a docker-like iptables-nft chain.
        sh("nft add table inet foreign \
            && nft add chain inet foreign out '{ type filter hook output priority 10; }' \
            && nft add rule inet foreign out counter \
            && iptables -w -t filter -N DOCKER-USER && iptables -w -t filter -A DOCKER-USER -j RETURN \
            && iptables -w -t filter -A FORWARD -j DOCKER-USER");
        let foreign = || {
            (
                sh("nft list table inet foreign | grep -v packets"),
                sh("iptables-save -t filter | grep -i docker"),
            )
        };
        let foreign_before = foreign();
        let plan = plan_for("10.42.0.0/16", &[A, B, C, D], "host-a");
        sh(&format!(
            "ip rule add pref 1042 fwmark {:#x}/{:#x} lookup 1042 && ip route add 10.42.0.0/16 dev ul0 table 1042 \
             && ip route add 10.42.0.0/16 dev ul0",
            plan.marks.encrypt, plan.marks.mask
        ));
        let spec = FirewallSpec::from_plan(&plan);
        let nft = FirewallKind::Nftables.backend();
        let ipt = FirewallKind::Iptables.backend();

        // From iptables to nftables: the old chains go once the table guards.
        assert!(ipt.apply(&spec).unwrap().writes > 0);
        assert!(sh("iptables-save").contains("IPSEC-MESH"));
        let r = nft.apply(&spec).unwrap();
        assert!(r.writes > 1, "table + old chains removed: {r:?}");
        assert!(!sh("iptables-save").contains("IPSEC-MESH"), "iptables leftovers");
        let table = sh("nft list table inet ipsec-mesh");
        assert_eq!(table.matches("rt ipsec missing").count(), 2, "{table}");
        assert!(table.contains("elements = { 10.42.1.0/24 }"), "{table}");
        assert_eq!(nft.apply(&spec).unwrap().writes, 0, "unchanged: 0 writes");

        // Marking and the guard, by counters: to a remote subnet (no XFRM policy here): marked
        // and dropped by the guard; to a local subnet and the underlay: not marked.
        let (m0, g0) = (nft_packets("mark-out"), nft_packets("guard-out"));
        assert!(!sh_ok("ping -c 2 -W 1 10.42.2.7"), "marked, no policy: dropped");
        assert_eq!(nft_packets("mark-out") - m0, 2);
        assert_eq!(nft_packets("guard-out") - g0, 2);
        sh_ok("ping -c 1 -W 1 10.42.1.9");
        sh_ok("ping -c 1 -W 1 192.168.77.2");
        assert_eq!(nft_packets("mark-out") - m0, 2, "local / underlay traffic is not marked");

        // Drift: a rule removed by hand is put back with one transaction.
        sh("nft flush chain inet ipsec-mesh guard-fwd");
        assert_eq!(nft.apply(&spec).unwrap().writes, 1);
        assert!(sh("nft list chain inet ipsec-mesh guard-fwd").contains("rt ipsec missing"));
        assert_eq!(nft.apply(&spec).unwrap().writes, 0);

        // A changed spec (devices) replaces the table; the rule count stays constant.
        let with_devs = spec.clone().with_devices(Some("cbr0".into()), Some("ul0".into()));
        assert_eq!(nft.apply(&with_devs).unwrap().writes, 1);
        assert!(sh("nft list chain inet ipsec-mesh mark-pre").contains("iifname {"));

        // Back to iptables: the table goes.
        assert!(ipt.apply(&spec).unwrap().writes > 1);
        assert!(!sh_ok("nft list table inet ipsec-mesh"));
        assert!(ipt.cleanup().is_ok());

        nft.apply(&spec).unwrap();
        assert_eq!(nft.cleanup().unwrap().writes, 1);
        assert!(!sh_ok("nft list table inet ipsec-mesh"));
        assert_eq!(nft.cleanup().unwrap().writes, 0);
        assert_eq!(foreign(), foreign_before, "foreign rules untouched");
    })
    .unwrap();
}

/// `auto` picks what the system uses, derived here from `iptables --version` itself: the
/// nf_tables variant (its rules live in nftables anyway, checked below) -> nftables, the
/// legacy one -> iptables.
#[test]
#[ignore = "needs root: integration/run.sh runs it as root (--include-ignored)"]
fn auto_picks_the_backend_the_system_uses() {
    require_root!();
    common::require_program("/usr/sbin/iptables", "iptables");
    common::require_program("/usr/sbin/nft", "nftables");
    let version = sh("iptables --version");
    let nf_tables = version.contains("(nf_tables)");
    assert!(
        nf_tables || version.contains("(legacy)"),
        "unknown iptables variant: {version}"
    );
    let expected = if nf_tables {
        FirewallKind::Nftables
    } else {
        FirewallKind::Iptables
    };
    let (kind, why) = FirewallKind::Auto.resolve();
    assert_eq!(kind, expected, "{version}: {why}");
    assert_eq!(FirewallKind::Auto.backend().name(), expected.as_str());
    // What the version says is what the kernel holds: an iptables chain shows up as an nft
    // table exactly when iptables is the nf_tables variant.
    in_new_netns(move || {
        sh("iptables -w -N AUTO-PROBE");
        let tables = sh("nft list tables");
        assert_eq!(
            tables.contains("table ip filter"),
            nf_tables,
            "{version}: {tables}"
        );
    })
    .unwrap();
}

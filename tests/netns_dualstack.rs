//! Dual-stack overlays (issue 18 item 2) with the xfrm driver's policy mode against the running
//! kernel, in a fresh network namespace per test (root only): a network with an IPv4 and an
//! IPv6 cidr, hosts with subnets of both families (and one with IPv4 only), on an IPv4 and
//! on an IPv6 underlay. Policies of both families with the templates of the underlay's
//! family, both block policies, idempotence and cleanup hold on any kernel. The SAs depend on
//! the kernel (`common::kernel_has_esp`): this machine's kernel has no ESP, so each peer's SAs
//! are reported ("this kernel cannot hold ESP SAs"); with ESP (the VM kernel) each peer has
//! one SA pair for both families, flagged `af-unspec`.

mod common;

use common::{in_new_netns, kernel_has_esp, sh};
use ipsec_mesh::dataplane::xfrm;
use ipsec_mesh::model::Cluster;
use ipsec_mesh::plan::{self, Plan, PlanOptions, Psk};

use common::cluster as tc;

const PSK: &[u8] = b"a-test-only-psk-that-is-long-enough-0123456789";

fn dual_plan(agent_v6: bool) -> Plan {
    let r = tc::dual_stack(["host-1", "host-2", "host-3"], agent_v6);
    let c = Cluster::validate(&r).expect("dual-stack metadata is valid");
    plan::plan(
        &c,
        "host-1",
        &PlanOptions::default(),
        Some(&Psk::from_bytes(PSK)),
    )
    .unwrap()
}

/// The entries of `ip xfrm policy` output, one string each (an entry starts with a line
/// `src ...` at the margin).
fn entries(all: &str) -> Vec<String> {
    let mut v: Vec<String> = Vec::new();
    for l in all.lines() {
        if l.starts_with("src ") || v.is_empty() {
            v.push(String::new());
        }
        let last = v.last_mut().unwrap();
        last.push_str(l.trim());
        last.push(' ');
    }
    v
}

/// Entries whose template names `reqid`.
fn policies_with_reqid(all: &str, reqid: u32) -> Vec<String> {
    entries(all)
        .into_iter()
        .filter(|p| p.contains(&format!("reqid {reqid} ")))
        .collect()
}

fn check(agent_v6: bool) {
    if agent_v6 {
        sh("ip link add ul0 type veth peer name ul1 && ip addr add fd77::1/64 dev ul0 nodad && ip link set ul0 up && ip link set ul1 up");
    } else {
        sh("ip link add ul0 type veth peer name ul1 && ip addr add 192.168.77.1/24 dev ul0 && ip link set ul0 up && ip link set ul1 up");
    }
    let p = dual_plan(agent_v6);
    assert_eq!(p.cidrs.len(), 2);
    let r = xfrm::reconcile(&p).expect("xfrm socket");
    let (me, them) = if agent_v6 {
        ("fd77::1", "fd77::2")
    } else {
        ("192.168.77.1", "192.168.77.2")
    };
    let all = sh("ip xfrm policy");
    // host-2: v4 and v6 prefixes, out/in/fwd each, every template of the underlay family.
    let b = &p.peers[0];
    let pols = policies_with_reqid(&all, b.reqid);
    assert_eq!(pols.len(), 2 * 3, "{pols:#?}");
    for (sel, dir) in [
        ("src 0.0.0.0/0 dst 10.42.2.0/24", "dir out"),
        ("src 10.42.2.0/24 dst 0.0.0.0/0", "dir in"),
        ("src 10.42.2.0/24 dst 0.0.0.0/0", "dir fwd"),
        ("src ::/0 dst fd42:0:0:2::/64", "dir out"),
        ("src fd42:0:0:2::/64 dst ::/0", "dir in"),
        ("src fd42:0:0:2::/64 dst ::/0", "dir fwd"),
    ] {
        let found: Vec<&String> = pols
            .iter()
            .filter(|x| x.starts_with(sel) && x.contains(dir))
            .collect();
        assert!(!found.is_empty(), "{sel} {dir}: {pols:#?}");
        let (s, d) = if dir == "dir out" {
            (me, them)
        } else {
            (them, me)
        };
        assert!(
            found
                .iter()
                .all(|x| x.contains(&format!("tmpl src {s} dst {d}"))),
            "{sel} {dir}: template of the underlay family: {found:#?}"
        );
    }
    // host-3 has IPv4 only: no IPv6 policy for it.
    let c = &p.peers[1];
    let pols3 = policies_with_reqid(&all, c.reqid);
    assert!(!pols3.is_empty());
    assert!(pols3.iter().all(|x| !x.contains("fd42")), "{pols3:#?}");
    // A block policy per family.
    let v4 = sh("ip xfrm policy");
    let v6 = sh("ip -6 xfrm policy");
    assert!(
        v4.contains("src 0.0.0.0/0 dst 0.0.0.0/0") && v4.contains("action block"),
        "{v4}"
    );
    assert!(
        entries(&v6)
            .iter()
            .any(|x| x.starts_with("src ::/0 dst ::/0")
                && x.contains("action block")
                && x.contains("mark 0x100000/0x300000")),
        "{v6}"
    );
    if kernel_has_esp() {
        assert!(r.errors.is_empty(), "{:?}", r.errors);
        let st = sh("ip xfrm state");
        // One SA pair (+ the extra receive generations) per peer, both families each.
        assert_eq!(st.matches("mode tunnel").count(), 2 * 4, "{st}");
        assert_eq!(st.matches("af-unspec").count(), 2 * 4, "{st}");
    } else {
        for peer in &p.peers {
            assert!(
                r.errors.iter().any(|f| f.owner == peer.host.as_str()
                    && f.error.contains("this kernel cannot hold ESP SAs")),
                "{}: {:?}",
                peer.host,
                r.errors
            );
        }
        assert!(sh("ip xfrm state").trim().is_empty());
    }
    // Idempotent: nothing written the second time (policies of both families dumped).
    let again = xfrm::reconcile_scoped(&p, xfrm::Scope::PoliciesOnly).unwrap();
    assert_eq!(again.writes, 0, "{:?}", again.changes);
    // Back to single-family: exactly the IPv6 objects go.
    let single = {
        let mut r = tc::raw(
            "10.42.0.0/16",
            vec![
                tc::host(
                    "host-1",
                    if agent_v6 { "fd77::1" } else { "192.168.77.1" },
                    &["10.42.1.0/24"],
                ),
                tc::host(
                    "host-2",
                    if agent_v6 { "fd77::2" } else { "192.168.77.2" },
                    &["10.42.2.0/24"],
                ),
                tc::host(
                    "host-3",
                    if agent_v6 { "fd77::3" } else { "192.168.77.3" },
                    &["10.42.3.0/24"],
                ),
            ],
        );
        r.network.mtu = None;
        plan::plan(
            &Cluster::validate(&r).unwrap(),
            "host-1",
            &PlanOptions::default(),
            Some(&Psk::from_bytes(PSK)),
        )
        .unwrap()
    };
    assert_eq!(
        (single.peers[0].reqid, single.peers[0].spi_out),
        (b.reqid, b.spi_out),
        "ids do not depend on the families"
    );
    xfrm::reconcile_scoped(&single, xfrm::Scope::PoliciesOnly).unwrap();
    assert!(
        !sh("ip -6 xfrm policy").contains("fd42"),
        "{}",
        sh("ip -6 xfrm policy")
    );
    assert!(sh("ip xfrm policy").contains("dst 10.42.2.0/24"));
    let r = xfrm::cleanup(&p.marks).unwrap();
    assert!(r.errors.is_empty(), "{:?}", r.errors);
    assert!(
        sh("ip xfrm policy").trim().is_empty(),
        "{}",
        sh("ip xfrm policy")
    );
    assert!(sh("ip -6 xfrm policy").trim().is_empty());
}

#[test]
#[ignore = "needs root: integration/run.sh runs it as root (--include-ignored)"]
fn dual_stack_overlay_over_an_ipv4_underlay_policies_per_family() {
    require_root!();
    in_new_netns(|| check(false)).unwrap();
}

#[test]
#[ignore = "needs root: integration/run.sh runs it as root (--include-ignored)"]
fn dual_stack_overlay_over_an_ipv6_underlay_policies_per_family() {
    require_root!();
    in_new_netns(|| check(true)).unwrap();
}

/// `ipsec-mesh apply` (policy mode) with a dual-stack network: the mark rule and the table's
/// routes exist for both families (routes of each family's remote prefixes), alongside the
/// xfrm policies of both families; a second apply writes no route; cleanup removes both.
#[test]
#[ignore = "needs root: integration/run.sh runs it as root (--include-ignored)"]
fn apply_routes_marked_traffic_of_both_families() {
    require_root!();
    in_new_netns(|| {
        sh("ip link add ul0 type veth peer name ul1 && ip addr add 192.168.77.1/24 dev ul0 && ip link set ul0 up && ip link set ul1 up");
        let dir = tempfile::tempdir().unwrap();
        let meta = dir.path().join("meta.json");
        std::fs::write(
            &meta,
            r#"{"network":{"cidr":["10.42.0.0/16","fd42::/48"]},"hosts":[
                {"id":"host-1","agent_ip":"192.168.77.1","subnets":["10.42.1.0/24","fd42:0:0:1::/64"]},
                {"id":"host-2","agent_ip":"192.168.77.2","subnets":["10.42.2.0/24","fd42:0:0:2::/64"]},
                {"id":"host-3","agent_ip":"192.168.77.3","subnets":["10.42.9.0/24"]}]}"#,
        )
        .unwrap();
        let psk = dir.path().join("psk");
        std::fs::write(&psk, PSK).unwrap();
        std::fs::set_permissions(&psk, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .unwrap();
        let apply = || {
            std::process::Command::new(env!("CARGO_BIN_EXE_ipsec-mesh"))
                .args(["apply", "--metadata", meta.to_str().unwrap(), "--host", "host-1"])
                .args(["--driver", "xfrm", "--xfrm-mode", "policy", "--firewall", "none"])
                .arg("--psk-file")
                .arg(&psk)
                .env("IPSEC_MESH_LOG", "warn")
                .output()
                .unwrap()
        };
        let o = apply();
        let out = String::from_utf8_lossy(&o.stdout).to_string();
        let err = String::from_utf8_lossy(&o.stderr).to_string();
        assert!(sh("ip -4 rule").contains("lookup 1042"), "{}\n{out}\n{err}", sh("ip -4 rule"));
        assert!(sh("ip -6 rule").contains("lookup 1042"), "{}", sh("ip -6 rule"));
        let t4 = sh("ip -4 route show table 1042");
        let t6 = sh("ip -6 route show table 1042");
        assert!(t4.contains("10.42.2.0/24") && t4.contains("10.42.9.0/24"), "{t4}");
        assert!(!t4.contains("10.42.1.0/24"), "no route for our own subnet: {t4}");
        assert!(t6.contains("fd42:0:0:2::/64") && !t6.contains("fd42:0:0:1::/64"), "{t6}");
        let pol = sh("ip xfrm policy");
        assert!(pol.contains("dst fd42:0:0:2::/64") && pol.contains("dst 10.42.2.0/24"), "{pol}");
        // The routing layer writes nothing the second time.
        let again = String::from_utf8_lossy(&apply().stdout).to_string();
        assert!(again.contains("  routes: 0 writes"), "first:\n{out}\nsecond:\n{again}");
        let c = std::process::Command::new(env!("CARGO_BIN_EXE_ipsec-mesh"))
            .args(["cleanup", "--driver", "xfrm", "--firewall", "none"])
            .output()
            .unwrap();
        assert!(c.status.success(), "{}", String::from_utf8_lossy(&c.stderr));
        assert!(!sh("ip -6 rule").contains("lookup 1042"));
        assert!(sh("ip -6 route show table 1042").trim().is_empty());
        assert!(sh("ip -4 route show table 1042").trim().is_empty());
    })
    .unwrap();
}

/// `ipsec-mesh apply` with a dual-stack network and each firewall backend: the marking and
/// the guard of both families (iptables and ip6tables chains; one nftables table with a rule
/// of each family), a host-originated IPv6 packet to a peer's container is marked (the v6
/// mark rule counts it) and never leaves (no SA on this kernel: the block policy drops it;
/// with ESP it would be encrypted). Then the overlay goes back to IPv4 only: every IPv6
/// object of ours goes (chains, rule, table routes, policies); then IPv6 only: every IPv4 one
/// goes; cleanup leaves nothing.
#[test]
#[ignore = "needs root: integration/run.sh runs it as root (--include-ignored)"]
fn dual_stack_firewall_of_both_families_and_a_family_change_leaves_nothing_of_the_old() {
    require_root!();
    for fw in ["iptables", "nftables"] {
        in_new_netns(|| family_switch(fw)).unwrap();
    }
}

fn family_switch(fw: &str) {
    sh(
        "ip link add ul0 type veth peer name ul1 && ip addr add 192.168.77.1/24 dev ul0 && \
        ip link set ul0 up && ip link set ul1 up && ip -6 route add default dev ul0",
    );
    let dir = tempfile::tempdir().unwrap();
    let meta = dir.path().join("meta.json");
    let psk = dir.path().join("psk");
    std::fs::write(&psk, PSK).unwrap();
    std::fs::set_permissions(&psk, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let write = |cidr: &str, s1: &str, s2: &str| {
        std::fs::write(
            &meta,
            format!(
                r#"{{"network":{{"cidr":{cidr}}},"hosts":[
                {{"id":"host-1","agent_ip":"192.168.77.1","subnets":{s1}}},
                {{"id":"host-2","agent_ip":"192.168.77.2","subnets":{s2}}}]}}"#
            ),
        )
        .unwrap()
    };
    let run = |cmd: &str| {
        let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_ipsec-mesh"));
        c.arg(cmd);
        if cmd == "apply" {
            c.args(["--metadata", meta.to_str().unwrap(), "--host", "host-1"])
                .args(["--xfrm-mode", "policy", "--psk-file"])
                .arg(&psk);
        }
        let o = c
            .args(["--driver", "xfrm", "--firewall", fw])
            .env("IPSEC_MESH_LOG", "warn")
            .output()
            .unwrap();
        format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        )
    };
    // What of ours each family has: (firewall mentions the overlay, rule, table routes).
    let v4 = || {
        let f = if fw == "iptables" {
            sh("iptables-save -t mangle; iptables-save -t filter")
        } else {
            sh("nft list ruleset")
        };
        (
            f.contains("10.42.0.0/16"),
            sh("ip -4 rule").contains("lookup 1042"),
            !sh("ip -4 route show table 1042").trim().is_empty(),
        )
    };
    let v6 = || {
        let f = if fw == "iptables" {
            sh("ip6tables-save -t mangle; ip6tables-save -t filter")
        } else {
            sh("nft list ruleset")
        };
        (
            f.contains("fd42::/48"),
            sh("ip -6 rule").contains("lookup 1042"),
            !sh("ip -6 route show table 1042").trim().is_empty(),
        )
    };
    let all = (true, true, true);
    let none = (false, false, false);

    write(
        r#"["10.42.0.0/16","fd42::/48"]"#,
        r#"["10.42.1.0/24","fd42:0:0:1::/64"]"#,
        r#"["10.42.2.0/24","fd42:0:0:2::/64"]"#,
    );
    let out = run("apply");
    assert_eq!((v4(), v6()), (all, all), "{fw}: dual-stack apply:\n{out}");
    if fw == "iptables" {
        let guard = sh("ip6tables-save -t filter");
        assert!(
            guard.contains("IPSEC-MESH-GUARD") && guard.contains("-d fd42::/48"),
            "{guard}"
        );
    } else {
        let t = sh("nft list table inet ipsec-mesh");
        assert_eq!(t.matches("rt ipsec missing").count(), 4, "{t}");
    }
    // A host-originated IPv6 packet to host-2's container: marked, dropped (no SA here).
    let marked = || -> u64 {
        if fw == "iptables" {
            let s = sh("ip6tables -t mangle -L IPSEC-MESH-MARK -v -x -n");
            s.lines()
                .filter(|l| l.contains("MARK"))
                .filter_map(|l| l.split_whitespace().next()?.parse::<u64>().ok())
                .sum()
        } else {
            let t = sh("nft list chain inet ipsec-mesh mark-out");
            t.lines()
                .filter(|l| l.contains("ip6 daddr"))
                .filter_map(|l| {
                    let w: Vec<&str> = l.split_whitespace().collect();
                    let i = w.iter().position(|x| *x == "packets")?;
                    w.get(i + 1)?.parse::<u64>().ok()
                })
                .sum()
        }
    };
    let before = marked();
    let sent = std::process::Command::new("ping")
        .args(["-6", "-c", "2", "-W", "1", "fd42:0:0:2::5"])
        .output()
        .unwrap();
    assert!(
        !sent.status.success(),
        "no SA on this kernel's side: nothing answers"
    );
    assert!(
        marked() > before,
        "{fw}: the host's IPv6 packet was not marked"
    );
    let again = run("apply");
    assert!(
        again.contains(" peers, 0 writes,") && again.contains("  firewall: 0 writes"),
        "{fw}: a second apply writes nothing:\n{again}"
    );

    write(
        r#""10.42.0.0/16""#,
        r#"["10.42.1.0/24"]"#,
        r#"["10.42.2.0/24"]"#,
    );
    let out = run("apply");
    assert_eq!((v4(), v6()), (all, none), "{fw}: back to IPv4 only:\n{out}");
    assert!(
        !sh("ip xfrm policy").contains("fd42:"),
        "{}",
        sh("ip xfrm policy")
    );

    write(
        r#""fd42::/48""#,
        r#"["fd42:0:0:1::/64"]"#,
        r#"["fd42:0:0:2::/64"]"#,
    );
    let out = run("apply");
    assert_eq!((v4(), v6()), (none, all), "{fw}: IPv6 only:\n{out}");

    let out = run("cleanup");
    assert_eq!((v4(), v6()), (none, none), "{fw}: cleanup:\n{out}");
}

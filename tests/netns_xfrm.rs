//! The xfrm driver against the running kernel, in a fresh network namespace per test (root
//! only). Policies, ownership, idempotence and cleanup hold on any kernel; what happens to
//! the SAs depends on the kernel (`common::kernel_has_esp`): this machine's kernel has no
//! ESP, so SAs are reported per peer ("this kernel cannot hold ESP SAs") and apply exits 1;
//! in a kernel with ESP (the VM kernel, integration/vm/test-root-suites.sh) the plan's SAs
//! are installed and apply exits 0.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::{Command, Output};

use common::{firewall, in_new_netns, kernel_has_esp, sh};
use ipsec_mesh::model::{Cluster, RawCluster};
use ipsec_mesh::plan::{self, Plan, PlanOptions, Psk};

const BIN: &str = env!("CARGO_BIN_EXE_ipsec-mesh");
const PSK: &str = "a-test-only-psk-that-is-long-enough-0123456789";

struct Files {
    _dir: tempfile::TempDir,
    meta: PathBuf,
    psk: PathBuf,
}

fn meta_doc(hosts: usize) -> String {
    let hs: Vec<String> = (1..=hosts)
        .map(|i| {
            format!(
                r#"{{"id":"host-{i}","agent_ip":"192.168.77.{i}","subnets":["10.42.{i}.0/24","10.42.{}.0/24"]}}"#,
                100 + i
            )
        })
        .collect();
    format!(
        r#"{{"network":{{"cidr":"10.42.0.0/16"}},"hosts":[{}]}}"#,
        hs.join(",")
    )
}

fn files(hosts: usize) -> Files {
    let dir = tempfile::tempdir().unwrap();
    let meta = dir.path().join("meta.json");
    std::fs::write(&meta, meta_doc(hosts)).unwrap();
    let psk = dir.path().join("psk");
    std::fs::write(&psk, PSK).unwrap();
    std::fs::set_permissions(&psk, std::fs::Permissions::from_mode(0o600)).unwrap();
    Files {
        _dir: dir,
        meta,
        psk,
    }
}

fn rewrite(f: &Files, hosts: usize) {
    std::fs::write(&f.meta, meta_doc(hosts)).unwrap();
}

fn ipsec_mesh(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .env("IPSEC_MESH_LOG", "warn")
        .output()
        .unwrap()
}

fn apply(f: &Files) -> Output {
    ipsec_mesh(&[
        "apply",
        "--metadata",
        f.meta.to_str().unwrap(),
        "--host",
        "host-1",
        "--driver",
        "xfrm",
        // Policy mode's objects are what this suite checks; the default (auto) would pick
        // route mode on a kernel with XFRM interfaces (the VM's).
        "--xfrm-mode",
        "policy",
        "--psk-file",
        f.psk.to_str().unwrap(),
    ])
}

/// Writes of one component (`xfrm objects`, `firewall`, `routes`) or, with "total", all.
fn writes_of(o: &Output, part: &str) -> usize {
    let out = String::from_utf8_lossy(&o.stdout);
    let w = if part == "total" {
        let l = out
            .lines()
            .find(|l| l.starts_with("xfrm: host"))
            .unwrap_or_else(|| panic!("no summary: {out}"));
        l.split(", ")
            .find(|p| p.ends_with(" writes"))
            .unwrap()
            .to_string()
    } else {
        let prefix = format!("  {part}: ");
        out.lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .unwrap_or_else(|| panic!("no {part}: {out}"))
            .to_string()
    };
    w.trim_end_matches(" writes").parse().unwrap()
}

fn writes(o: &Output) -> usize {
    writes_of(o, "xfrm objects")
}

/// The plan `apply --host host-1` computes from the metadata file (default options).
fn plan_of(f: &Files, me: &str) -> Plan {
    let raw: RawCluster = serde_json::from_slice(&std::fs::read(&f.meta).unwrap()).unwrap();
    let c = Cluster::validate(&raw).expect("test metadata is valid");
    plan::plan(
        &c,
        me,
        &PlanOptions::default(),
        Some(&Psk::from_bytes(PSK.as_bytes())),
    )
    .expect("plan")
}

/// One SA as `ip xfrm state` prints it: (src, dst, spi, reqid).
type SaRow = (String, String, u32, u32);

/// Our SAs (reqid in 0x50000000..0x58000000), sorted.
fn our_sas() -> Vec<SaRow> {
    common::parse_our_sas(&sh("ip xfrm state"))
}

/// The SAs the plan asks for: per peer self -> peer (`spi_out`) and one peer -> self SA per
/// receive generation with a key (`rx`: `spi_in` among them), all with the pair's reqid.
fn planned_sas(p: &Plan) -> Vec<SaRow> {
    let me = p.endpoint.to_string();
    let mut v: Vec<SaRow> = Vec::new();
    for peer in &p.peers {
        let them = peer.endpoint.to_string();
        v.push((me.clone(), them.clone(), peer.spi_out, peer.reqid));
        let rx: Vec<u32> = peer
            .rx
            .iter()
            .filter(|r| r.key.is_some())
            .map(|r| r.spi)
            .collect();
        assert!(
            rx.contains(&peer.spi_in),
            "{}: spi_in among {rx:x?}",
            peer.host
        );
        v.extend(
            rx.into_iter()
                .map(|spi| (them.clone(), me.clone(), spi, peer.reqid)),
        );
    }
    v.sort();
    v
}

/// What one apply must say about the SAs on this kernel: without ESP, exit 1 and one error
/// per peer naming the missing kernel support (policies are installed all the same, fail
/// closed), and no SA; with ESP, exit 0, no such error and exactly the plan's SAs.
fn assert_sas_as_the_kernel_allows(o: &Output, p: &Plan) {
    let err = String::from_utf8_lossy(&o.stderr);
    if kernel_has_esp() {
        assert_eq!(o.status.code(), Some(0), "{err}");
        assert!(!err.contains("cannot hold ESP"), "{err}");
        assert_eq!(our_sas(), planned_sas(p), "SAs of the plan");
    } else {
        assert_eq!(o.status.code(), Some(1), "{err}");
        for peer in &p.peers {
            assert!(
                err.contains(&format!(
                    "ipsec-mesh: {}: this kernel cannot hold ESP SAs: CONFIG_INET_ESP is missing",
                    peer.host
                )),
                "{err}"
            );
        }
        assert!(our_sas().is_empty(), "{:?}", our_sas());
    }
}

/// Our policies: those with a template reqid in 0x50000000..0x58000000 or our block policy.
fn our_policies() -> Vec<String> {
    let out = sh("ip xfrm policy");
    out.split("src ")
        .filter(|p| !p.trim().is_empty())
        .filter(|p| {
            p.split_whitespace()
                .skip_while(|w| *w != "reqid")
                .nth(1)
                .and_then(|r| r.parse::<u32>().ok())
                .is_some_and(|r| (0x5000_0000..0x5800_0000).contains(&r))
                || (p.contains("action block") && p.contains("mark 0x100000/0x300000"))
        })
        .map(|p| format!("src {}", p.trim()))
        .collect()
}

fn setup_underlay() {
    sh("ip link add ul0 type veth peer name ul1 && ip addr add 192.168.77.1/24 dev ul0 && ip link set ul0 up && ip link set ul1 up");
}

fn add_foreign() {
    sh("ip xfrm policy add src 172.16.1.0/24 dst 172.16.2.0/24 dir out tmpl src 192.168.77.1 dst 192.168.77.9 proto esp reqid 7 mode tunnel");
    sh("ip xfrm policy add src 0.0.0.0/0 dst 0.0.0.0/0 dir out action block mark 0x4000 mask 0x4000 priority 999999");
}

fn foreign_intact() {
    let all = sh("ip xfrm policy");
    assert!(
        all.contains("dst 172.16.2.0/24") && all.contains("reqid 7"),
        "foreign policy gone: {all}"
    );
    assert!(
        all.contains("mark 0x4000/0x4000"),
        "foreign block policy gone: {all}"
    );
}

#[test]
#[ignore = "needs root: integration/run.sh runs it as root (--include-ignored)"]
fn apply_is_idempotent_installs_or_reports_the_sas_and_cleanup_leaves_only_foreign() {
    require_root!();
    in_new_netns(|| {
        setup_underlay();
        add_foreign();
        let f = files(3);

        let o = apply(&f);
        // Policies are installed on any kernel (fail closed); the SAs as the kernel allows:
        // without ESP reported per peer in words, with an exit code saying not everything
        // is in place.
        let p = plan_of(&f, "host-1");
        assert_eq!(p.peers.len(), 2);
        assert_sas_as_the_kernel_allows(&o, &p);
        // 1 block + 2 peers x 2 remote prefixes x 3 directions: the local side of every pair
        // policy is the wildcard, so this host's 2 subnets do not multiply them.
        assert_eq!(our_policies().len(), 1 + 2 * 2 * 3, "{:#?}", our_policies());
        assert!(writes(&o) >= 13);
        let pol = sh("ip xfrm policy");
        assert!(
            pol.contains("src 0.0.0.0/0 dst 10.42.2.0/24 \n\tdir out priority 10752"),
            "{pol}"
        );
        assert!(
            pol.contains("src 10.42.2.0/24 dst 0.0.0.0/0 \n\tdir fwd priority 10752"),
            "{pol}"
        );
        // Every pair policy is in the SPD hash table: thresholds local 0, remote 24 bits.
        let count = sh("ip -s -s xfrm policy count");
        assert!(
            count.contains("SPD IPv4 thresholds: local 0 remote 24"),
            "{count}"
        );
        assert!(pol.contains("mark 0x100000/0x300000"));
        foreign_intact();

        // Forwarding is in place: marks and guard of the backend `auto` picks here, rule
        // and table.
        firewall::ours(None).assert_installed(firewall::auto_backend(), "10.42.0.0/16");
        assert!(sh("ip rule").contains("fwmark 0x100000/0x300000 lookup 1042"));
        assert!(!sh("ip route show table 1042").trim().is_empty());

        // Nothing changed: nothing written, anywhere.
        let o = apply(&f);
        assert_eq!(
            writes_of(&o, "total"),
            0,
            "{}",
            String::from_utf8_lossy(&o.stdout)
        );

        // host-3 leaves: only its 6 policies (and, with ESP, its SAs) go.
        let plan3 = plan_of(&f, "host-1");
        rewrite(&f, 2);
        let o = apply(&f);
        let host3 = planned_sas(&plan3)
            .iter()
            .filter(|s| s.0 == "192.168.77.3" || s.1 == "192.168.77.3")
            .count();
        assert!(host3 >= 2, "{host3}");
        let sa_writes = if kernel_has_esp() { host3 } else { 0 };
        assert_eq!(
            writes(&o),
            6 + sa_writes,
            "{}",
            String::from_utf8_lossy(&o.stdout)
        );
        let ours = our_policies();
        assert_eq!(ours.len(), 1 + 2 * 3);
        assert!(ours.iter().all(|p| !p.contains("192.168.77.3")));
        assert_sas_as_the_kernel_allows(&o, &plan_of(&f, "host-1"));
        assert!(our_sas()
            .iter()
            .all(|s| s.0 != "192.168.77.3" && s.1 != "192.168.77.3"));
        foreign_intact();

        // Cleanup removes all of ours and nothing else; twice is fine.
        let o = ipsec_mesh(&["cleanup", "--driver", "xfrm"]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        assert!(our_policies().is_empty(), "{:#?}", our_policies());
        assert!(our_sas().is_empty(), "{:?}", our_sas());
        firewall::ours(None).assert_empty();
        assert!(!sh("ip rule").contains("lookup 1042"));
        foreign_intact();
        let o = ipsec_mesh(&["cleanup", "--driver", "xfrm"]);
        assert!(o.status.success());
        assert!(String::from_utf8_lossy(&o.stdout).contains("0 removed"));
    })
    .unwrap();
}

/// `--firewall` through the CLI: the default is `auto`, which picks the backend the system
/// uses and says so in the log; a host applied with `--firewall iptables` switches to it with
/// nothing of iptables left, and back; the default `cleanup` removes what either backend left.
#[test]
#[ignore = "needs root: integration/run.sh runs it as root (--include-ignored)"]
fn firewall_auto_is_the_default_switches_and_cleanup_removes_either_backend() {
    require_root!();
    in_new_netns(|| {
        setup_underlay();
        let f = files(2);
        let auto = firewall::auto_backend();
        let with = |fw: Option<&str>| {
            let mut args = vec![
                "apply",
                "--metadata",
                f.meta.to_str().unwrap(),
                "--host",
                "host-1",
                "--driver",
                "xfrm",
                "--xfrm-mode",
                "policy",
                "--psk-file",
                f.psk.to_str().unwrap(),
            ];
            if let Some(fw) = fw {
                args.extend(["--firewall", fw]);
            }
            Command::new(BIN)
                .args(&args)
                .env("IPSEC_MESH_LOG", "info")
                .output()
                .unwrap()
        };
        // The default: auto, resolved and logged.
        let o = with(None);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            err.contains(&format!("firewall backend firewall={auto} why=\"auto: ")),
            "{err}"
        );
        firewall::ours(None).assert_installed(auto, "10.42.0.0/16");
        assert_eq!(writes_of(&with(None), "firewall"), 0);

        // Explicitly the other backend: its objects replace ours, nothing of auto's left.
        let other = if auto == "nftables" {
            "iptables"
        } else {
            "nftables"
        };
        let o = with(Some(other));
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            err.contains(&format!(
                "firewall backend firewall={other} why=\"as asked\""
            )),
            "{err}"
        );
        firewall::ours(None).assert_installed(other, "10.42.0.0/16");
        assert_eq!(writes_of(&with(Some(other)), "firewall"), 0);

        // Cleanup with the default (auto) removes the other backend's objects too.
        let o = ipsec_mesh(&["cleanup", "--driver", "xfrm"]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        firewall::ours(None).assert_empty();
        assert!(our_policies().is_empty(), "{:#?}", our_policies());

        // And the switch back, then the default cleanup again.
        with(Some(other));
        with(None);
        firewall::ours(None).assert_installed(auto, "10.42.0.0/16");
        let o = ipsec_mesh(&["cleanup", "--driver", "xfrm"]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        firewall::ours(None).assert_empty();
    })
    .unwrap();
}

#[test]
#[ignore = "needs root: integration/run.sh runs it as root (--include-ignored)"]
fn drifted_policy_is_repaired_with_one_write() {
    require_root!();
    in_new_netns(|| {
        setup_underlay();
        let f = files(2);
        apply(&f);
        let before = our_policies();
        sh("ip xfrm policy del src 0.0.0.0/0 dst 10.42.2.0/24 dir out mark 0x100000 mask 0x300000");
        assert_eq!(our_policies().len(), before.len() - 1);
        let o = apply(&f);
        assert_eq!(writes(&o), 1);
        assert_eq!(our_policies().len(), before.len());
        // One of ours changed by hand (priority) is updated in place.
        let reqid = sh("ip xfrm policy list src 0.0.0.0/0 dst 10.42.2.0/24 dir out");
        let reqid = reqid.split_whitespace().skip_while(|w| *w != "reqid").nth(1).unwrap().to_string();
        sh(&format!("ip xfrm policy update src 0.0.0.0/0 dst 10.42.2.0/24 dir out priority 5 mark 0x100000 mask 0x300000 tmpl src 192.168.77.1 dst 192.168.77.2 proto esp reqid {reqid} mode tunnel"));
        let o = apply(&f);
        assert_eq!(writes(&o), 1, "{}", String::from_utf8_lossy(&o.stdout));
        assert!(!sh("ip xfrm policy").contains("priority 5 "));

        // A foreign policy squatting on one of our selectors is left alone and reported
        // against that peer; the other objects stay in place.
        sh("ip xfrm policy update src 0.0.0.0/0 dst 10.42.2.0/24 dir out priority 5 mark 0x100000 mask 0x300000 tmpl src 192.168.77.1 dst 192.168.77.2 proto esp reqid 1 mode tunnel");
        let o = apply(&f);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1));
        assert!(err.contains("ipsec-mesh: host-2: + xfrm policy out 0.0.0.0/0 -> 10.42.2.0/24"), "{err}");
        assert!(err.contains("is not ipsec-mesh's (left untouched)"), "{err}");
        assert!(sh("ip xfrm policy").contains("reqid 1 mode tunnel"));
    })
    .unwrap();
}

#[test]
#[ignore = "needs root: integration/run.sh runs it as root (--include-ignored)"]
fn missing_psk_is_a_clear_error_and_writes_nothing() {
    require_root!();
    in_new_netns(|| {
        let f = files(2);
        let o = ipsec_mesh(&[
            "apply",
            "--metadata",
            f.meta.to_str().unwrap(),
            "--host",
            "host-1",
            "--driver",
            "xfrm",
        ]);
        assert_eq!(o.status.code(), Some(1));
        assert!(String::from_utf8_lossy(&o.stderr).contains("--psk-file"));
        assert!(sh("ip xfrm policy").trim().is_empty());
        // Bad metadata: nothing written either.
        std::fs::write(&f.meta, "{").unwrap();
        let o = apply(&f);
        assert_eq!(o.status.code(), Some(1));
        assert!(sh("ip xfrm policy").trim().is_empty());
    })
    .unwrap();
}

#[test]
#[ignore = "needs root: integration/run.sh runs it as root (--include-ignored)"]
fn ipv6_underlay_and_overlay() {
    require_root!();
    in_new_netns(|| {
        sh("ip link add ul0 type veth peer name ul1 && ip addr add 2001:db8:77::1/64 dev ul0 nodad && ip link set ul0 up && ip link set ul1 up");
        let f = files(2);
        std::fs::write(
            &f.meta,
            r#"{"network":{"cidr":"fd42::/48"},"hosts":[
                {"id":"host-1","agent_ip":"2001:db8:77::1","subnets":["fd42:0:0:1::/64"]},
                {"id":"host-2","agent_ip":"2001:db8:77::2","subnets":["fd42:0:0:2::/64"]}]}"#,
        )
        .unwrap();
        let o = apply(&f);
        let p = plan_of(&f, "host-1");
        assert_eq!(p.peers.len(), 1);
        assert_sas_as_the_kernel_allows(&o, &p);
        if kernel_has_esp() {
            assert_eq!(
                our_sas()[0].0.parse::<std::net::IpAddr>().map(|a| a.is_ipv6()),
                Ok(true),
                "{:?}",
                our_sas()
            );
        }
        let pol = sh("ip -6 xfrm policy");
        assert!(
            pol.contains("src ::/0 dst fd42:0:0:2::/64"),
            "{pol}"
        );
        assert!(pol.contains("tmpl src 2001:db8:77::1 dst 2001:db8:77::2"), "{pol}");
        firewall::ours(None).assert_installed(firewall::auto_backend(), "fd42::/48");
        assert!(sh("ip -6 rule").contains("lookup 1042"));
        let o = apply(&f);
        assert_eq!(writes_of(&o, "total"), 0, "{}", String::from_utf8_lossy(&o.stdout));
        let o = ipsec_mesh(&["cleanup", "--driver", "xfrm"]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        assert!(!sh("ip -6 xfrm policy").contains("fd42"));
        assert!(our_sas().is_empty(), "{:?}", our_sas());
        firewall::ours(None).assert_empty();
    })
    .unwrap();
}

/// Rancher's shape: `hosts` hosts with `containers` /32s each, drawn at random (fixed seed,
/// no duplicates) from the overlay 10.42.0.0/16, so a host's addresses do not aggregate.
fn rancher_doc(hosts: usize, containers: usize) -> String {
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    let mut used = std::collections::HashSet::new();
    let hs: Vec<String> = (1..=hosts)
        .map(|i| {
            let mut mine = Vec::new();
            while mine.len() < containers {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let a = (x >> 16) as u16;
                if a & 0xff == 0 || a & 0xff == 0xff || !used.insert(a) {
                    continue;
                }
                mine.push(format!("\"10.42.{}.{}/32\"", a >> 8, a & 0xff));
            }
            format!(
                r#"{{"id":"host-{i}","agent_ip":"192.168.{}.{}","subnets":[{}]}}"#,
                76 + i / 250,
                i % 250 + 1,
                mine.join(",")
            )
        })
        .collect();
    format!(
        r#"{{"network":{{"cidr":"10.42.0.0/16"}},"hosts":[{}]}}"#,
        hs.join(",")
    )
}

#[test]
#[ignore = "needs root: integration/run.sh runs it as root (--include-ignored)"]
fn rancher_shaped_cluster_policies_grow_with_remote_prefixes_not_local_times_remote() {
    require_root!();
    in_new_netns(|| {
        sh(
            "ip link add ul0 type veth peer name ul1 && ip addr add 192.168.76.2/22 dev ul0 \
            && ip link set ul0 up && ip link set ul1 up \
            && ip route add default via 192.168.79.254 dev ul0 \
            && ip neigh add 192.168.79.254 lladdr 02:00:00:00:00:fe dev ul0",
        );
        let f = files(1);
        std::fs::write(&f.meta, rancher_doc(500, 10)).unwrap();
        let o = apply(&f);
        let p = plan_of(&f, "host-1");
        assert_eq!(p.peers.len(), 499);
        let remote: usize = p
            .peers
            .iter()
            .map(|q| ipnet::IpNet::aggregate(&q.subnets).len())
            .sum();
        let local = p.subnets.len();
        assert_eq!(local, 10);
        // 3 per remote prefix + the block policy; the old form had local x remote x 3.
        let ours = our_policies();
        assert_eq!(
            ours.len(),
            3 * remote + 1,
            "{}",
            String::from_utf8_lossy(&o.stderr)
        );
        assert!(remote >= 4_900, "random /32s barely aggregate: {remote}");
        let (l, r) = ipsec_mesh::dataplane::xfrm::desired::prefix_thresholds(&p).unwrap();
        assert_eq!(l, 0);
        assert!(r >= 31, "{r}");
        let count = sh("ip -s -s xfrm policy count");
        assert!(
            count.contains(&format!("SPD IPv4 thresholds: local 0 remote {r}")),
            "{count}"
        );
        // A packet the host sends to a container of a peer resolves that peer's policy (no SA
        // on a kernel without ESP: counted as XfrmOutNoStates, dropped, not sent in clear);
        // one to an address outside the overlay matches none.
        let stat = |k: &str| -> u64 {
            sh("cat /proc/net/xfrm_stat")
                .lines()
                .find_map(|l| {
                    let mut w = l.split_whitespace();
                    (w.next() == Some(k)).then(|| w.next().unwrap().parse().unwrap())
                })
                .unwrap()
        };
        let target = p.peers[250].subnets[3].addr();
        if !kernel_has_esp() {
            let before = stat("XfrmOutNoStates");
            let s = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
            let _ = s.send_to(b"x", (target, 9));
            let _ = s.send_to(b"x", ("192.0.2.9", 9));
            assert_eq!(stat("XfrmOutNoStates"), before + 1, "to {target}");
        }
        assert_eq!(
            stat("XfrmOutPolBlock"),
            0,
            "no packet fell to the block policy"
        );
    })
    .unwrap();
}

//! Root only: the charon driver's reconcile against real `charon-systemd`s (Debian's
//! strongSwan 5.9), one per host network namespace, mostly with
//! charon-conf/strongswan-libipsec.conf (userspace ESP: works on any kernel, this machine's
//! has no ESP). The kernel-netlink tests expect what the kernel at hand allows
//! (`common::kernel_has_esp`): CHILD_SA failures in words without ESP, installed SAs with it
//! (the VM kernel, integration/vm/test-root-suites.sh). Needs the packages
//! integration/setup.sh installs.
//!
//! Lab: a switch netns (bridge `br0`, br_netfilter + iptables counters), hosts
//! `host-a`/`host-b`/`host-c` (underlay 192.168.77.N/24 on `eth0`, container bridge `cbr0`
//! 10.42.N.1/24: with kernel-libipsec each host needs an address inside its own subnet), and
//! one container netns per host (10.42.N.2, default route via the bridge). Namespace names
//! start with `ch`. Every charon and namespace is removed when the lab drops, whatever
//! happened in the test.

#[allow(unused_imports)] // common re-exports helpers this suite does not use
mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ipsec_mesh::dataplane::charon::desired::conn_name;
use ipsec_mesh::dataplane::charon::revive::{self, Check};
use ipsec_mesh::dataplane::charon::{
    cleanup, reconcile, reconcile_config, AuthConfig, CharonConfig, CharonReport, ChildConfig,
    Client, ConnConfig, ConnectOptions, GetConns, GetShared, ListConns, ListSas, LoadConn,
    LoadShared, PeerState, SharedKeyType, Terminate,
};
use ipsec_mesh::model::Cluster;
use ipsec_mesh::plan::{plan, Plan, PlanOptions, Psk};

const PSK: &[u8] = b"netns-charon-test-psk-0123456789abcdef";

fn run(cmd: &str, args: &[&str]) -> std::process::Output {
    Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{cmd}: {e}"))
}

fn must(cmd: &str, args: &[&str]) -> String {
    let out = run(cmd, args);
    assert!(
        out.status.success(),
        "{cmd} {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn ip(args: &[&str]) -> String {
    must("ip", args)
}

fn nsx(ns: &str, args: &[&str]) -> String {
    let mut a = vec!["netns", "exec", ns];
    a.extend_from_slice(args);
    must("ip", &a)
}

/// One host: its netns, its container netns, its charon.
struct Host {
    id: String,
    n: u8,
    ns: String,
    cns: String,
    dir: PathBuf,
    conf: String,
    charon: Option<Child>,
}

impl Host {
    fn socket(&self) -> PathBuf {
        self.dir.join("charon.vici")
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("charon.log")).unwrap_or_default()
    }

    fn container_ip(&self) -> String {
        format!("10.42.{}.2", self.n)
    }

    fn start(&mut self) {
        assert!(self.charon.is_none());
        let conf = common::write_charon_conf(&self.dir, &self.conf);
        self.charon = Some(common::charon_start(&self.ns, &conf));
    }

    fn kill9(&mut self) {
        common::charon_kill9(&mut self.charon);
    }

    fn stop(&mut self) {
        common::charon_stop(&mut self.charon);
    }
}

/// The lab: a switch and hosts. Dropping it stops every charon, then its
/// [`common::Namespaces`] deletes every netns (also when the test panics).
struct Lab {
    sw: String,
    hosts: Vec<Host>,
    ns: common::Namespaces,
}

impl Drop for Lab {
    fn drop(&mut self) {
        for h in &mut self.hosts {
            h.stop();
        }
    }
}

impl Lab {
    /// `n` hosts (`host-a`, ...), every charon started with `conf`.
    fn new(tag: &str, n: usize, conf: &str) -> Lab {
        Lab::with_confs(tag, &vec![conf; n])
    }

    /// One host per entry of `confs` (`host-a`, ...), its charon started with that file.
    fn with_confs(tag: &str, confs: &[&str]) -> Lab {
        assert!(
            Path::new(common::CHARON).exists(),
            "{} is missing: run integration/setup.sh (charon-systemd, libcharon-extra-plugins)",
            common::CHARON
        );
        let mut ns = common::Namespaces::new("ch", tag);
        let sw = ns.add("sw");
        let mut lab = Lab {
            sw,
            hosts: Vec::new(),
            ns,
        };
        ip(&["-n", &lab.sw, "link", "add", "br0", "type", "bridge"]);
        ip(&["-n", &lab.sw, "link", "set", "br0", "up"]);
        for (i, conf) in confs.iter().enumerate() {
            let letter = (b'a' + i as u8) as char;
            let hdir = lab.ns.dir.path().join(letter.to_string());
            std::fs::create_dir_all(&hdir).unwrap();
            let h = Host {
                id: format!("host-{letter}"),
                n: i as u8 + 1,
                ns: lab.ns.add(&letter.to_string()),
                cns: lab.ns.add(&format!("{letter}c")),
                dir: hdir,
                conf: conf.to_string(),
                charon: None,
            };
            let port = format!("p{letter}");
            // underlay: eth0 <-> switch port
            ip(&[
                "-n", &h.ns, "link", "add", "eth0", "type", "veth", "peer", "name", &port, "netns",
                &lab.sw,
            ]);
            ip(&["-n", &lab.sw, "link", "set", &port, "master", "br0", "up"]);
            let under = format!("192.168.77.{}/24", h.n);
            ip(&["-n", &h.ns, "addr", "add", &under, "dev", "eth0"]);
            ip(&["-n", &h.ns, "link", "set", "eth0", "up"]);
            // container bridge with the gateway address (inside the host's own subnet)
            let gw = format!("10.42.{}.1/24", h.n);
            ip(&["-n", &h.ns, "link", "add", "cbr0", "type", "bridge"]);
            ip(&["-n", &h.ns, "addr", "add", &gw, "dev", "cbr0"]);
            ip(&["-n", &h.ns, "link", "set", "cbr0", "up"]);
            ip(&[
                "-n", &h.ns, "link", "add", "veth0", "type", "veth", "peer", "name", "eth0",
                "netns", &h.cns,
            ]);
            ip(&["-n", &h.ns, "link", "set", "veth0", "master", "cbr0", "up"]);
            let cip = format!("{}/24", h.container_ip());
            ip(&["-n", &h.cns, "addr", "add", &cip, "dev", "eth0"]);
            ip(&["-n", &h.cns, "link", "set", "eth0", "up"]);
            ip(&[
                "-n",
                &h.cns,
                "route",
                "add",
                "default",
                "via",
                &format!("10.42.{}.1", h.n),
            ]);
            nsx(&h.ns, &["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
            lab.hosts.push(h);
        }
        // underlay accounting on the switch: bridged packets through iptables
        nsx(
            &lab.sw,
            &["sysctl", "-qw", "net.bridge.bridge-nf-call-iptables=1"],
        );
        for rule in [
            "-A FORWARD -p udp --dport 4500 -m comment --comment esp-in-udp",
            "-A FORWARD -p udp --dport 500 -m comment --comment ike",
            "-A FORWARD -s 10.42.0.0/16 -m comment --comment plaintext-src",
            "-A FORWARD -d 10.42.0.0/16 -m comment --comment plaintext-dst",
            "-A FORWARD -p esp -m comment --comment raw-esp",
        ] {
            let mut a = vec!["iptables", "-w"];
            a.extend(rule.split(' '));
            nsx(&lab.sw, &a);
        }
        for h in &mut lab.hosts {
            h.start();
        }
        lab
    }

    fn host(&self, id: &str) -> &Host {
        self.hosts.iter().find(|h| h.id == id).unwrap()
    }

    fn host_mut(&mut self, id: &str) -> &mut Host {
        self.hosts.iter_mut().find(|h| h.id == id).unwrap()
    }

    /// Packet counters of the switch's accounting rules, by comment.
    fn switch_counters(&self) -> BTreeMap<String, u64> {
        let out = nsx(&self.sw, &["iptables", "-w", "-L", "FORWARD", "-nvx"]);
        let mut m = BTreeMap::new();
        for line in out.lines() {
            if let Some(c) = line.split("/* ").nth(1) {
                let name = c.trim_end_matches(" */").trim().to_string();
                let pkts: u64 = line
                    .split_whitespace()
                    .next()
                    .and_then(|p| p.parse().ok())
                    .unwrap_or(0);
                m.insert(name, pkts);
            }
        }
        m
    }

    /// ping from host `from`'s container to host `to`'s container.
    fn ping(&self, from: &str, to: &str) -> bool {
        let dst = self.host(to).container_ip();
        run(
            "ip",
            &[
                "netns",
                "exec",
                &self.host(from).cns,
                "ping",
                "-c1",
                "-W2",
                &dst,
            ],
        )
        .status
        .success()
    }

    fn logs(&self) -> String {
        self.hosts
            .iter()
            .map(|h| {
                let log = h.log();
                let tail: Vec<&str> = log.lines().rev().take(40).collect();
                let tail: Vec<&str> = tail.into_iter().rev().collect();
                format!("--- charon log of {} (tail)\n{}\n", h.id, tail.join("\n"))
            })
            .collect()
    }
}

fn cluster(ids: &[&str]) -> Cluster {
    common::cluster::valid(&common::cluster::lettered(ids))
}

fn plan_for(ids: &[&str], me: &str) -> Plan {
    plan(&cluster(ids), me, &PlanOptions::default(), None).unwrap()
}

fn cfg(h: &Host) -> CharonConfig {
    CharonConfig {
        vici_socket: h.socket(),
        initiate_timeout: Duration::from_secs(5),
        responder_grace: Duration::from_millis(1500),
        ..Default::default()
    }
}

fn opts() -> ConnectOptions {
    ConnectOptions {
        initial_backoff: Duration::from_millis(10),
        max_backoff: Duration::from_millis(50),
        max_wait: Some(Duration::from_secs(15)),
        request_timeout: Duration::from_secs(20),
    }
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

async fn connect(h: &Host) -> Client {
    Client::connect(h.socket(), &opts())
        .await
        .unwrap_or_else(|e| panic!("{}: {e}\n{}", h.id, h.log()))
}

fn show(id: &str, r: &CharonReport) -> String {
    format!(
        "{id}: writes={} loaded={} sent={:?} peers={:?} errors={:?}",
        r.report.writes, r.loaded, r.sent, r.peers, r.report.errors
    )
}

/// One reconcile per host, concurrently (as sidecars on several hosts would run).
async fn reconcile_all(
    lab: &Lab,
    clients: &[Client],
    ids: &[&str],
    psks: &[&Psk],
) -> Vec<CharonReport> {
    reconcile_all_with(lab, clients, ids, psks, &|_| {}).await
}

/// [`reconcile_all`] with driver settings changed by `tweak`.
async fn reconcile_all_with(
    lab: &Lab,
    clients: &[Client],
    ids: &[&str],
    psks: &[&Psk],
    tweak: &dyn Fn(&mut CharonConfig),
) -> Vec<CharonReport> {
    let futs = lab
        .hosts
        .iter()
        .zip(clients)
        .zip(psks)
        .filter(|((h, _), _)| ids.contains(&h.id.as_str()))
        .map(|((h, c), psk)| {
            let p = plan_for(ids, &h.id);
            let mut cfg = cfg(h);
            tweak(&mut cfg);
            async move {
                reconcile(c, &p, psk, &cfg)
                    .await
                    .unwrap_or_else(|e| panic!("{}: reconcile: {e}", h.id))
            }
        });
    let reports = futures::future::join_all(futs).await;
    for (h, r) in lab.hosts.iter().zip(&reports) {
        eprintln!("{}", show(&h.id, r));
    }
    reports
}

/// Installed children of our conns on one host, by conn name, and the count of IKE_SAs.
async fn installed(c: &Client) -> (BTreeMap<String, usize>, usize) {
    let sas = c
        .list(&ListSas {
            noblock: true,
            ..Default::default()
        })
        .await
        .unwrap();
    let mut m = BTreeMap::new();
    for ike in &sas {
        for ch in &ike.child_sas {
            if ch.state == "INSTALLED" {
                *m.entry(ch.name.clone()).or_default() += 1;
            }
        }
    }
    (m, sas.len())
}

async fn all_up(clients: &[Client], pairs: usize) -> bool {
    let mut n = 0;
    for c in clients {
        let (m, _) = installed(c).await;
        n += m.len();
    }
    n == 2 * pairs
}

#[test]
#[ignore = "needs root: integration/run.sh runs it as root (--include-ignored)"]
fn mesh_of_three_pings_through_esp_in_udp_and_a_second_reconcile_writes_nothing() {
    require_root!();
    let mut lab = Lab::new("m", 3, "strongswan-libipsec.conf");
    let ids = ["host-a", "host-b", "host-c"];
    let psk = Psk::from_bytes(PSK);
    let psks = [&psk, &psk, &psk];
    rt().block_on(async {
        let clients: Vec<Client> = futures::future::join_all(lab.hosts.iter().map(connect)).await;
        // a foreign conn and shared key on host-a: must survive everything
        let mut foreign =
            ConnConfig::ikev2("office-vpn", AuthConfig::psk("a"), AuthConfig::psk("o"));
        foreign.remote_addrs = vec!["192.0.2.1".into()];
        foreign.children = vec![ChildConfig::tunnel(
            "office-vpn",
            vec!["10.99.0.0/24".into()],
            vec!["10.98.0.0/24".into()],
        )];
        clients[0].call(&LoadConn(foreign)).await.unwrap();
        clients[0]
            .call(&LoadShared {
                id: "office-key".into(),
                kind: SharedKeyType::Ike,
                data: b"office-secret-office-secret".to_vec().into(),
                owners: vec!["o".into()],
            })
            .await
            .unwrap();

        // first reconcile, all hosts at once: a host may initiate before its peer has
        // loaded anything (reported per peer); the responder's grace covers that
        let t = Instant::now();
        let mut rounds = 0;
        loop {
            rounds += 1;
            let reports = reconcile_all(&lab, &clients, &ids, &psks).await;
            if rounds == 1 {
                for (h, r) in lab.hosts.iter().zip(&reports) {
                    // both conns in one packed load-conn
                    assert!(
                        r.loaded == 2 && r.sent("load-conn") == 1 && r.sent("load-shared") == 1,
                        "{}",
                        show(&h.id, r)
                    );
                }
            }
            if reports.iter().all(|r| r.ok()) && all_up(&clients, 3).await {
                break;
            }
            assert!(
                rounds < 4,
                "mesh not up after {rounds} reconciles\n{}",
                lab.logs()
            );
        }
        eprintln!(
            "mesh of 3 up after {rounds} reconcile round(s), {:?}",
            t.elapsed()
        );

        // exactly one IKE_SA and one child per pair on each host: no duplicates
        for (h, c) in lab.hosts.iter().zip(&clients) {
            let (m, ikes) = installed(c).await;
            assert_eq!(ikes, 2, "{}: {m:?}", h.id);
            assert!(m.values().all(|n| *n == 1), "{}: {m:?}", h.id);
        }
        // only the pair's initiator (lower id) rekeys
        let sas = clients[0].list(&ListSas::default()).await.unwrap();
        assert!(sas.iter().all(|s| s.rekey_time.is_some()), "host-a rekeys");
        let sas = clients[2].list(&ListSas::default()).await.unwrap();
        assert!(
            sas.iter().all(|s| s.rekey_time.is_none()),
            "host-c never rekeys"
        );

        // every container pair pings through the tunnels
        let before = lab.switch_counters();
        for a in ids {
            for b in ids {
                if a != b {
                    assert!(lab.ping(a, b), "ping {a} -> {b}\n{}", lab.logs());
                }
            }
        }
        let after = lab.switch_counters();
        eprintln!("switch counters before pings {before:?}, after {after:?}");
        assert!(
            after["esp-in-udp"] >= before["esp-in-udp"] + 12,
            "6 pings = 12 ESP-in-UDP packets at least: {after:?}"
        );
        assert_eq!(after["plaintext-src"], 0, "no container packet in clear");
        assert_eq!(after["plaintext-dst"], 0, "no container packet in clear");
        assert_eq!(after["raw-esp"], 0, "libipsec encapsulates in UDP");

        // nothing changed: no write at all
        let reports = reconcile_all(&lab, &clients, &ids, &psks).await;
        for (h, r) in lab.hosts.iter().zip(&reports) {
            assert_eq!(r.report.writes, 0, "{}", show(&h.id, r));
            assert_eq!(
                r.sent("load-conn") + r.sent("initiate") + r.sent("load-shared"),
                0
            );
            assert!(
                r.ok() && r.peers.values().all(|s| *s == PeerState::Up),
                "{}",
                show(&h.id, r)
            );
        }

        // the watcher brings a lost child back: host-a drops its SA with host-b itself
        // (nobody else restarts it: a is the initiator, b's close_action is none)
        let watcher = connect(lab.host("host-a")).await;
        let (tx, rx) = tokio::sync::watch::channel(plan_for(&ids, "host-a"));
        let wcfg = CharonConfig {
            backoff: ipsec_mesh::dataplane::charon::Backoff {
                initial: Duration::from_millis(300),
                max: Duration::from_secs(5),
            },
            ..cfg(lab.host("host-a"))
        };
        let (seen_tx, mut seen_rx) = tokio::sync::mpsc::unbounded_channel();
        let watch = async {
            let e = revive::run(&watcher, rx, &wcfg, |r| {
                let _ = seen_tx.send(r.clone());
            })
            .await;
            panic!("watcher stopped: {e}");
        };
        let drop_and_wait = async {
            tokio::time::sleep(Duration::from_millis(100)).await; // subscribed
            let t = Instant::now();
            let done = clients[0]
                .call(&Terminate {
                    ike: Some(conn_name("host-b")),
                    timeout_ms: Some(2000),
                    ..Default::default()
                })
                .await
                .unwrap();
            assert_eq!(done.terminated, 1);
            let r = tokio::time::timeout(Duration::from_secs(10), seen_rx.recv())
                .await
                .expect("watcher acted within 10 s")
                .unwrap();
            eprintln!("watcher: {r:?} after {:?}", t.elapsed());
            assert_eq!((r.peer.as_str(), &r.result), ("host-b", &Check::Initiated));
            assert!(lab.ping("host-a", "host-b"));
        };
        tokio::select! {
            _ = watch => unreachable!(),
            _ = drop_and_wait => {}
        }
        drop(tx);

        // new ESP proposals on every host: a setting list-conns does not show (the digest
        // does). Every conn is replaced (unload + load); each pair's initiator replaces its
        // SA; the SAs then use the new proposal and the mesh pings again
        let aes128 = |c: &mut CharonConfig| c.esp_proposals = vec!["aes128gcm16".into()];
        let mut rounds = 0;
        loop {
            rounds += 1;
            let reports = reconcile_all_with(&lab, &clients, &ids, &psks, &aes128).await;
            if rounds == 1 {
                for (h, r) in lab.hosts.iter().zip(&reports) {
                    assert_eq!(r.loaded, 2, "{}", show(&h.id, r));
                    assert_eq!(r.sent("unload-conn"), 2, "{}", show(&h.id, r));
                    assert!(
                        r.report.lines().iter().any(|c| c.contains("does not show")),
                        "{:?}",
                        r.report.lines()
                    );
                }
            }
            if reports.iter().all(|r| r.ok()) && all_up(&clients, 3).await {
                break;
            }
            assert!(rounds < 3, "mesh not back after the change\n{}", lab.logs());
        }
        for (h, c) in lab.hosts.iter().zip(&clients) {
            let (m, ikes) = installed(c).await;
            assert_eq!(ikes, 2, "{}: no duplicate after the change: {m:?}", h.id);
            let mut s = c
                .stream_raw("list-sas", "list-sa", Default::default())
                .await
                .unwrap();
            while let Some(m) = s.next().await {
                let m = m.unwrap();
                for (_, ike) in m.sections() {
                    for (_, ch) in ike.section("child-sas").unwrap().sections() {
                        assert_eq!(ch.str("encr-keysize"), Some("128"), "{ch:?}");
                    }
                }
            }
        }
        for a in ids {
            for b in ids {
                if a != b {
                    assert!(
                        lab.ping(a, b),
                        "ping {a} -> {b} after the change\n{}",
                        lab.logs()
                    );
                }
            }
        }
        let reports = reconcile_all_with(&lab, &clients, &ids, &psks, &aes128).await;
        assert!(reports.iter().all(|r| r.report.writes == 0 && r.ok()));

        // host-c leaves the metadata: a and b unload its conn and close its SAs
        let ab = ["host-a", "host-b"];
        let reports = reconcile_all_with(&lab, &clients[..2], &ab, &psks[..2], &aes128).await;
        for (h, r) in lab.hosts.iter().zip(&reports) {
            assert!(r.ok(), "{}", show(&h.id, r));
            assert_eq!(
                (r.sent("unload-conn"), r.unloaded),
                (1, 1),
                "{}",
                show(&h.id, r)
            );
            assert!(
                r.report
                    .lines()
                    .iter()
                    .any(|c| c == "- charon conn ipsec-mesh-host-c (peer left)"),
                "{:?}",
                r.report.lines()
            );
            assert_eq!(r.sent("load-shared"), 1, "owner set changed: new key id");
            assert_eq!(r.sent("unload-shared"), 1, "old key id unloaded");
            assert_eq!(r.sent("load-conn") + r.sent("initiate"), 0);
            assert!(!r.peers.contains_key("host-c"));
        }
        for c in &clients[..2] {
            let conns = c.call(&GetConns).await.unwrap();
            assert!(!conns.contains(&conn_name("host-c")), "{conns:?}");
            let (m, _) = installed(c).await;
            assert!(!m.contains_key(&conn_name("host-c")), "{m:?}");
        }
        assert!(lab.ping("host-a", "host-b") && lab.ping("host-b", "host-a"));
        let reports = reconcile_all_with(&lab, &clients[..2], &ab, &psks[..2], &aes128).await;
        assert!(reports.iter().all(|r| r.report.writes == 0));

        // cleanup on host-a: ours gone, the foreign conn and key stay
        let r = cleanup(&clients[0]).await.unwrap();
        eprintln!("{}", show("cleanup host-a", &r));
        assert!(r.ok());
        assert_eq!(
            clients[0].call(&GetConns).await.unwrap(),
            vec!["office-vpn"]
        );
        assert_eq!(
            clients[0].call(&GetShared).await.unwrap(),
            vec!["office-key"]
        );
        assert!(installed(&clients[0]).await.0.is_empty());
        let listed = clients[0].list(&ListConns::default()).await.unwrap();
        assert_eq!(listed.len(), 1);
        lab.host_mut("host-a").stop();
    });
}

#[test]
#[ignore = "needs root: integration/run.sh runs it as root (--include-ignored)"]
fn wrong_psk_on_one_host_is_a_clear_per_peer_error_and_other_pairs_are_unaffected() {
    require_root!();
    let lab = Lab::new("p", 3, "strongswan-libipsec.conf");
    let ids = ["host-a", "host-b", "host-c"];
    let good = Psk::from_bytes(PSK);
    let bad = Psk::from_bytes(b"a-different-psk-on-host-c-only-0123456789");
    let psks = [&good, &good, &bad];
    rt().block_on(async {
        let clients: Vec<Client> = futures::future::join_all(lab.hosts.iter().map(connect)).await;
        let mut last = Vec::new();
        for _ in 0..2 {
            last = reconcile_all(&lab, &clients, &ids, &psks).await;
        }
        let (a, b, c) = (&last[0], &last[1], &last[2]);
        for (r, who, peer) in [
            (a, "host-a", "host-c"),
            (b, "host-b", "host-c"),
            (c, "host-c", "host-a"),
            (c, "host-c", "host-b"),
        ] {
            let e = r
                .error_for(peer)
                .unwrap_or_else(|| panic!("{who} reports no error for {peer}: {}", show(who, r)));
            assert!(e.contains("PSK"), "{who} -> {peer}: {e}");
            assert_eq!(r.peers[peer], PeerState::Failed);
        }
        eprintln!("host-a about host-c: {}", a.error_for("host-c").unwrap());
        eprintln!("host-c about host-a: {}", c.error_for("host-a").unwrap());
        assert_eq!(a.peers["host-b"], PeerState::Up, "{}", show("host-a", a));
        assert_eq!(b.peers["host-a"], PeerState::Up, "{}", show("host-b", b));
        assert!(a.error_for("host-b").is_none() && b.error_for("host-a").is_none());
        assert!(lab.ping("host-a", "host-b") && lab.ping("host-b", "host-a"));
        assert!(!lab.ping("host-a", "host-c"));
    });
}

#[test]
#[ignore = "needs root: integration/run.sh runs it as root (--include-ignored)"]
fn conns_charon_refuses_are_reported_per_peer_and_nothing_else_is_loaded() {
    require_root!();
    let lab = Lab::new("r", 1, "strongswan-libipsec.conf");
    let ids = ["host-a", "host-b", "host-c"];
    let psk = Psk::from_bytes(PSK);
    rt().block_on(async {
        let c = connect(&lab.hosts[0]).await;
        let p = plan_for(&ids, "host-a");
        let bad = CharonConfig {
            esp_proposals: vec!["bogus-cipher".into()],
            ..cfg(&lab.hosts[0])
        };
        let r = reconcile_config(&c, &p, &psk, &bad).await.unwrap();
        eprintln!("{}", show("host-a", &r));
        // the pack is refused, then each conn alone: one error per peer, in charon's words
        assert_eq!(r.sent("load-conn"), 3, "1 pack + 2 single");
        assert_eq!(r.loaded, 0);
        for peer in ["host-b", "host-c"] {
            let e = r.error_for(peer).unwrap();
            assert!(
                e.starts_with(&format!("load-conn ipsec-mesh-{peer}: charon refused `load-conn` (conn=ipsec-mesh-{peer}): ")),
                "{e}"
            );
            assert!(e.contains("esp_proposals"), "{e}");
            assert_eq!(r.peers[peer], PeerState::Failed);
        }
        assert!(c.call(&GetConns).await.unwrap().is_empty());
        // fixed settings load both; without the SA step nothing is initiated
        let r = reconcile_config(&c, &p, &psk, &cfg(&lab.hosts[0])).await.unwrap();
        assert!(r.ok() && r.loaded == 2 && r.sent("initiate") == 0, "{}", show("host-a", &r));
        assert_eq!(r.peers["host-b"], PeerState::Down);
        let r = reconcile_config(&c, &p, &psk, &cfg(&lab.hosts[0])).await.unwrap();
        assert_eq!(r.report.writes, 0, "{}", show("host-a", &r));
    });
}

#[test]
#[ignore = "needs root: integration/run.sh runs it as root (--include-ignored)"]
fn kernel_netlink_reports_the_child_sa_failure_in_words_without_esp_and_installs_with_it() {
    require_root!();
    // a and b with kernel-netlink, c with kernel-libipsec
    let lab = Lab::with_confs(
        "n",
        &[
            "strongswan-netlink.conf",
            "strongswan-netlink.conf",
            "strongswan-libipsec.conf",
        ],
    );
    let ids = ["host-a", "host-b", "host-c"];
    let psk = Psk::from_bytes(PSK);
    let esp = common::kernel_has_esp();
    rt().block_on(async {
        let clients: Vec<Client> = futures::future::join_all(lab.hosts.iter().map(connect)).await;
        if esp {
            // The kernel holds charon's SAs: every pair comes up, with no error.
            for round in 1.. {
                let r = reconcile_all(&lab, &clients, &ids, &[&psk, &psk, &psk]).await;
                if r.iter().all(|r| r.ok()) && all_up(&clients, 3).await {
                    for (who, r) in ids.iter().zip(&r) {
                        assert_eq!(r.peers.len(), 2, "{}", show(who, r));
                        assert!(
                            r.peers.values().all(|s| *s == PeerState::Up),
                            "{}",
                            show(who, r)
                        );
                    }
                    break;
                }
                for (who, r) in ids.iter().zip(&r) {
                    assert!(
                        r.report
                            .errors
                            .iter()
                            .all(|f| !f.error.contains("cannot hold ESP")),
                        "{}",
                        show(who, r)
                    );
                }
                assert!(round < 4, "{}", lab.logs());
            }
            // kernel-netlink put them into the kernel: both directions towards each peer
            // (kernel-libipsec on c keeps its SAs in userspace).
            for (me, peers) in [(1, [2, 3]), (2, [1, 3])] {
                let h = &lab.hosts[me - 1];
                let st = nsx(&h.ns, &["ip", "xfrm", "state"]);
                for p in peers {
                    for (src, dst) in [(me, p), (p, me)] {
                        let sa = format!("src 192.168.77.{src} dst 192.168.77.{dst}\n\tproto esp ");
                        assert!(st.contains(&sa), "{}: no SA {sa:?}:\n{st}", h.id);
                    }
                }
            }
        } else {
            let mut reports = Vec::new();
            for _ in 0..2 {
                reports = reconcile_all(&lab, &clients, &ids, &[&psk, &psk, &psk]).await;
            }
            let err = |r: &CharonReport, who: &str, peer: &str| {
                let e = r
                    .error_for(peer)
                    .unwrap_or_else(|| panic!("{}\n{}", show(who, r), lab.logs()))
                    .to_string();
                eprintln!("{who} about {peer}: {e}");
                assert_eq!(r.peers[peer], PeerState::Failed);
                e
            };
            let no_esp = "charon could not install the CHILD_SA: the kernel cannot hold ESP SAs";
            // a -> c: a's own kernel refuses (its control-log says so)
            let e = err(&reports[0], "host-a", "host-c");
            assert!(
                e.starts_with(&format!("initiate ipsec-mesh-host-c: {no_esp} (")),
                "{e}"
            );
            assert!(!e.contains("the peer refused"), "{e}");
            // a -> b: b's kernel fails first and answers NO_PROPOSAL_CHOSEN; a's probe of its
            // own kernel still names the cause
            let e = err(&reports[0], "host-a", "host-b");
            assert!(
                e.starts_with(&format!("initiate ipsec-mesh-host-b: {no_esp}")),
                "{e}"
            );
            assert!(e.contains("kernel-libipsec"), "{e}");
            // c (libipsec, fine itself) -> a: the peer could not install it
            let e = err(&reports[2], "host-c", "host-a");
            assert!(e.contains("could not install the CHILD_SA itself"), "{e}");
        }
    });
}

#[test]
#[ignore = "needs root: integration/run.sh runs it as root (--include-ignored)"]
fn charon_killed_and_restarted_every_sa_is_back_within_10s() {
    require_root!();
    let mut lab = Lab::new("k", 3, "strongswan-libipsec.conf");
    let ids = ["host-a", "host-b", "host-c"];
    let psk = Psk::from_bytes(PSK);
    let psks = [&psk, &psk, &psk];
    let rt = rt();
    let mut clients: Vec<Client> =
        rt.block_on(futures::future::join_all(lab.hosts.iter().map(connect)));
    rt.block_on(async {
        for round in 1.. {
            let r = reconcile_all(&lab, &clients, &ids, &psks).await;
            if r.iter().all(|r| r.ok()) && all_up(&clients, 3).await {
                break;
            }
            assert!(round < 4, "{}", lab.logs());
        }
    });
    // host-b is initiator towards c and responder towards a: both cases at once
    lab.host_mut("host-b").kill9();
    let sock = lab.host("host-b").socket();
    assert!(sock.exists(), "SIGKILL leaves the socket file behind");
    let e = rt
        .block_on(clients[1].call(&GetConns))
        .expect_err("connection to the dead charon");
    assert!(e.is_connection_lost(), "{e}");
    std::fs::remove_file(&sock).unwrap();
    let t = Instant::now();
    lab.host_mut("host-b").start();
    rt.block_on(async {
        clients[1] = connect(lab.host("host-b")).await;
        eprintln!("reconnected after {:?}", t.elapsed());
        let p = plan_for(&ids, "host-b");
        let r = reconcile(&clients[1], &p, &psk, &cfg(lab.host("host-b")))
            .await
            .unwrap();
        eprintln!("{} after {:?}", show("host-b", &r), t.elapsed());
        assert_eq!(r.loaded, 2, "a restarted charon forgot every conn");
        assert_eq!(r.sent("load-shared"), 1);
        loop {
            if all_up(&clients, 3).await
                && ids
                    .iter()
                    .all(|a| ids.iter().all(|b| a == b || lab.ping(a, b)))
            {
                break;
            }
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "SAs not back within 10 s\n{}",
                lab.logs()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        eprintln!(
            "every SA back and every pair pinging {:?} after the restart",
            t.elapsed()
        );
        // the peers dropped the stale SAs (INITIAL_CONTACT): one IKE_SA per pair
        for (h, c) in lab.hosts.iter().zip(&clients) {
            let (m, ikes) = installed(c).await;
            assert_eq!(ikes, 2, "{}: {m:?}", h.id);
        }
        let reports = reconcile_all(&lab, &clients, &ids, &psks).await;
        assert!(reports.iter().all(|r| r.report.writes == 0 && r.ok()));
    });
}

/// Sidecars (`ipsec-mesh run`) of one lab; killed when dropped.
struct Sidecars(Vec<Child>);

impl Drop for Sidecars {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn sidecar_logs(lab: &Lab) -> String {
    lab.hosts
        .iter()
        .map(|h| {
            format!(
                "--- sidecar {}\n{}",
                h.id,
                std::fs::read_to_string(h.dir.join("sidecar.log")).unwrap_or_default()
            )
        })
        .collect()
}

fn every_pair_pings(lab: &Lab, ids: &[&str]) -> bool {
    ids.iter()
        .all(|a| ids.iter().all(|b| a == b || lab.ping(a, b)))
}

fn wait_for(what: &str, limit: Duration, lab: &Lab, mut ok: impl FnMut() -> bool) -> Duration {
    let t = Instant::now();
    while !ok() {
        assert!(
            t.elapsed() < limit,
            "{what}: not within {limit:?}\n{}",
            lab.logs()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    t.elapsed()
}

/// The product as operators run it: `ipsec-mesh run --driver charon` next to each charon.
#[test]
#[ignore = "needs root: integration/run.sh runs it as root (--include-ignored)"]
fn sidecars_with_driver_charon_mesh_and_bring_every_sa_back_after_charon_restarts() {
    require_root!();
    use std::os::unix::fs::PermissionsExt;
    let mut lab = Lab::new("sc", 3, "strongswan-libipsec.conf");
    let ids = ["host-a", "host-b", "host-c"];
    let dir = tempfile::tempdir().unwrap();
    let meta = dir.path().join("mesh.json");
    let write_meta = |hosts: &[&str]| {
        let hs: Vec<String> = hosts
            .iter()
            .map(|h| {
                let n = (h.as_bytes()[5] - b'a' + 1) as u32;
                format!(
                    r#"{{"id":"{h}","agent_ip":"192.168.77.{n}","subnets":["10.42.{n}.0/24"]}}"#
                )
            })
            .collect();
        std::fs::write(
            &meta,
            format!(
                r#"{{"network":{{"cidr":"10.42.0.0/16"}},"hosts":[{}]}}"#,
                hs.join(",")
            ),
        )
        .unwrap();
    };
    write_meta(&ids);
    let psk = dir.path().join("psk");
    std::fs::write(&psk, PSK).unwrap();
    std::fs::set_permissions(&psk, std::fs::Permissions::from_mode(0o600)).unwrap();
    let bin = env!("CARGO_BIN_EXE_ipsec-mesh");
    let status_sock = |h: &Host| h.dir.join("status.sock");
    let mut sidecars = Sidecars(Vec::new());
    for h in &lab.hosts {
        let log = std::fs::File::create(h.dir.join("sidecar.log")).unwrap();
        sidecars.0.push(
            Command::new("ip")
                .args(["netns", "exec", &h.ns, bin, "run", "--driver", "charon"])
                .arg("--metadata")
                .arg(&meta)
                .args(["--host", &h.id, "--resync", "30"])
                .arg("--vici-socket")
                .arg(h.socket())
                .arg("--psk-file")
                .arg(&psk)
                .arg("--listen")
                .arg(format!("unix:{}", status_sock(h).display()))
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .expect("start ipsec-mesh run"),
        );
    }
    let t = wait_for("mesh up", Duration::from_secs(30), &lab, || {
        every_pair_pings(&lab, &ids)
    });
    eprintln!("every pair pings {t:?} after the sidecars started");
    let c = lab.switch_counters();
    assert!(c["esp-in-udp"] > 0, "{c:?}");
    assert_eq!(c["plaintext-src"] + c["plaintext-dst"], 0, "{c:?}");

    let status = |h: &Host| -> serde_json::Value {
        let o = Command::new(bin)
            .args(["status", "--format", "json", "--listen"])
            .arg(format!("unix:{}", status_sock(h).display()))
            .output()
            .unwrap();
        serde_json::from_slice(&o.stdout).unwrap_or_default()
    };
    wait_for(
        "status shows both peers up",
        Duration::from_secs(10),
        &lab,
        || {
            status(lab.host("host-a"))["peers"]
                .as_array()
                .is_some_and(|p| p.len() == 2 && p.iter().all(|x| x["state"] == "up"))
        },
    );

    // charon on host-b killed -9 and restarted (stale socket removed): the sidecar's event
    // watcher reconnects and asks for a reconcile; every SA comes back within 10 s.
    lab.host_mut("host-b").kill9();
    std::fs::remove_file(lab.host("host-b").socket()).unwrap();
    let t = Instant::now();
    lab.host_mut("host-b").start();
    let back = loop {
        if every_pair_pings(&lab, &ids) {
            break t.elapsed();
        }
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "SAs not back within 10 s of charon's restart\n{}{}",
            sidecar_logs(&lab),
            lab.logs()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    eprintln!(
        "every pair pings again {:?} after charon's restart",
        t.elapsed()
    );
    assert!(back < Duration::from_secs(10));

    // host-c leaves: its conn is unloaded on the others; a reload with nothing else changed
    // loads nothing.
    write_meta(&ids[..2]);
    let conns = |h: &Host| {
        must(
            "swanctl",
            &[
                "--list-conns",
                "--uri",
                &format!("unix://{}", h.socket().display()),
            ],
        )
    };
    wait_for(
        "host-c's conn unloaded",
        Duration::from_secs(10),
        &lab,
        || {
            ["host-a", "host-b"]
                .iter()
                .all(|h| !conns(lab.host(h)).contains(&conn_name("host-c")))
        },
    );
    assert!(conns(lab.host("host-a")).contains(&conn_name("host-b")));
    for c in &sidecars.0 {
        // SAFETY: kill(2) on our own child (the `ip netns exec` that exec'd the sidecar).
        unsafe { libc::kill(c.id() as libc::pid_t, libc::SIGHUP) };
    }
    wait_for(
        "a no-op reconcile after SIGHUP",
        Duration::from_secs(10),
        &lab,
        || {
            let s = status(lab.host("host-a"));
            s["reconciles"]["count"].as_u64().unwrap_or(0) >= 3
                && s["reconciles"]["last_writes"].as_u64() == Some(0)
        },
    );
    assert!(lab.ping("host-a", "host-b") && lab.ping("host-b", "host-a"));
}

/// `--no-charon-policies`: charon gets `policies = no` and children with the plan's reqids;
/// ipsec-mesh installs the XFRM policies (with those reqids), the block policy, marks and
/// routes itself, and `cleanup` removes both sides. Without ESP in the kernel charon's
/// CHILD_SA fails (kernel-netlink), which `apply` reports per peer while our policies keep the
/// traffic fail closed; with ESP charon's SAs carry the plan's reqids.
#[test]
#[ignore = "needs root: integration/run.sh runs it as root (--include-ignored)"]
fn no_charon_policies_ipsec_mesh_owns_the_policies_with_the_plans_reqids() {
    require_root!();
    use std::os::unix::fs::PermissionsExt;
    let lab = Lab::new("np", 2, "strongswan-netlink.conf");
    let ids = ["host-a", "host-b"];
    let esp = common::kernel_has_esp();
    let dir = tempfile::tempdir().unwrap();
    let meta = dir.path().join("mesh.json");
    std::fs::write(
        &meta,
        r#"{"network":{"cidr":"10.42.0.0/16"},"hosts":[
            {"id":"host-a","agent_ip":"192.168.77.1","subnets":["10.42.1.0/24"]},
            {"id":"host-b","agent_ip":"192.168.77.2","subnets":["10.42.2.0/24"]}]}"#,
    )
    .unwrap();
    let psk = dir.path().join("psk");
    std::fs::write(&psk, PSK).unwrap();
    std::fs::set_permissions(&psk, std::fs::Permissions::from_mode(0o600)).unwrap();
    let bin = env!("CARGO_BIN_EXE_ipsec-mesh");
    let mesh = |h: &Host, args: &[&str]| {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &h.ns, bin]).args(args);
        c.args([
            "--driver",
            "charon",
            "--no-charon-policies",
            "--vici-socket",
        ])
        .arg(h.socket());
        c.output().unwrap()
    };
    for h in &lab.hosts {
        let o = mesh(
            h,
            &[
                "apply",
                "--metadata",
                meta.to_str().unwrap(),
                "--host",
                &h.id,
                "--psk-file",
                psk.to_str().unwrap(),
            ],
        );
        let err = String::from_utf8_lossy(&o.stderr);
        eprintln!("{} apply: {err}", h.id);
        let peer = if h.id == "host-a" { "host-b" } else { "host-a" };
        // host-a (the pair's initiator) applies first, while host-b's charon has no conn
        // yet: its initiate fails on any kernel. Without ESP host-b's fails too (the
        // CHILD_SA); with ESP host-b, initiating after its grace, brings the pair up.
        if h.id == "host-a" {
            assert_eq!(o.status.code(), Some(1), "{err}");
            assert!(err.contains(&format!("ipsec-mesh: {peer}: ")), "{err}");
        }
        if esp {
            assert!(!err.contains("cannot hold ESP"), "{err}");
            if h.id == "host-b" {
                assert_eq!(o.status.code(), Some(0), "{err}");
            }
        } else if h.id == "host-b" {
            assert_eq!(o.status.code(), Some(1), "{err}");
            assert!(
                err.contains(&format!(
                    "ipsec-mesh: {peer}: initiate ipsec-mesh-{peer}: charon could not install \
                     the CHILD_SA: the kernel cannot hold ESP SAs"
                )),
                "{err}"
            );
        }
        // Our policies carry the plan's reqid for the peer, as charon's SAs will.
        let p = plan_for(&ids, &h.id);
        let reqid = p.peers[0].reqid;
        let pol = nsx(&h.ns, &["ip", "xfrm", "policy"]);
        for dir in ["out", "in", "fwd"] {
            assert!(pol.contains(&format!("dir {dir} priority 10752")), "{pol}");
        }
        assert_eq!(pol.matches(&format!("reqid {reqid} ")).count(), 3, "{pol}");
        assert!(pol.contains("action block"), "{pol}");
        // Marks and guard of the backend the default `--firewall auto` picks here.
        common::firewall::ours(Some(&h.ns)).assert_installed(
            common::firewall::auto_backend(),
            &p.cidr.trunc().to_string(),
        );
        let conns = must(
            "swanctl",
            &[
                "--list-conns",
                "--uri",
                &format!("unix://{}", h.socket().display()),
            ],
        );
        assert!(conns.contains(&conn_name(peer)), "{conns}");
    }
    // charon's SAs (or none, without ESP) carry the plan's reqid, as our policies do.
    for h in &lab.hosts {
        let reqid = plan_for(&ids, &h.id).peers[0].reqid;
        let st = nsx(&h.ns, &["ip", "xfrm", "state"]);
        let (ours, all) = (
            st.matches(&format!(" reqid {reqid} ")).count(),
            st.matches("proto esp ").count(),
        );
        let want = if esp { 2 } else { 0 };
        assert_eq!((ours, all), (want, want), "{}: {st}", h.id);
    }
    for h in &lab.hosts {
        let o = mesh(h, &["cleanup"]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let pol = nsx(&h.ns, &["ip", "xfrm", "policy"]);
        let reqid = plan_for(&ids, &h.id).peers[0].reqid;
        assert!(
            !pol.contains(&format!("reqid {reqid} ")) && !pol.contains("action block"),
            "{pol}"
        );
        let st = nsx(&h.ns, &["ip", "xfrm", "state"]);
        assert!(!st.contains(&format!(" reqid {reqid} ")), "{st}");
        common::firewall::ours(Some(&h.ns)).assert_empty();
        let conns = must(
            "swanctl",
            &[
                "--list-conns",
                "--uri",
                &format!("unix://{}", h.socket().display()),
            ],
        );
        assert!(!conns.contains("ipsec-mesh-"), "{conns}");
    }
}

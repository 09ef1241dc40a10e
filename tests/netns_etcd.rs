//! Fleet metadata from a REAL 3-member etcd cluster (Debian's etcd-server 3.4, never a mock),
//! in network namespaces made by each test (root only; `integration/run.sh` runs it as root).
//! The cluster and its namespaces: tests/common/etcd.rs (shared with benches/etcd.rs).
//!
//! No traffic leaves the namespaces; every process and namespace goes away when the test
//! ends, pass or fail.

#[allow(unused_imports)] // common re-exports helpers this suite does not use
mod common;

use std::fs::File;
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use common::etcd::{host_json, in_netns, member_ip, Etcd, NET};
use ipsec_mesh::metadata::etcd::EtcdSource;
use ipsec_mesh::metadata::MetadataSource;
use serde_json::Value;

fn ids(src: &mut EtcdSource) -> Vec<String> {
    src.load()
        .unwrap()
        .cluster
        .hosts
        .iter()
        .map(|h| h.id.to_string())
        .collect()
}

/// Call `wait_for_change` until it reports a change (errors while members come and go
/// are retried, as the sidecar's watcher does), at most `within`.
fn next_change(src: &mut EtcdSource, version: &str, within: Duration) -> String {
    let t = Instant::now();
    let mut errors = Vec::new();
    while t.elapsed() < within {
        match src.wait_for_change(version, Duration::from_secs(2)) {
            Ok(Some(v)) => return v,
            Ok(None) => {}
            Err(e) => {
                errors.push(e.to_string());
                thread::sleep(Duration::from_millis(200));
            }
        }
    }
    panic!("no change seen within {within:?} (from version {version}); errors: {errors:#?}");
}

/// Load until `ok` holds for the host ids (a load may land on a member that is catching up
/// only through failover; linearizable reads make it exact once it answers).
fn load_until(
    src: &mut EtcdSource,
    within: Duration,
    ok: impl Fn(&[String]) -> bool,
) -> Vec<String> {
    let t = Instant::now();
    let mut last: Result<Vec<String>, String> = Err("not tried".to_string());
    while t.elapsed() < within {
        last = src
            .load()
            .map(|s| s.cluster.hosts.iter().map(|h| h.id.to_string()).collect())
            .map_err(|e| e.to_string());
        if let Ok(ids) = &last {
            if ok(ids) {
                return ids.clone();
            }
        }
        thread::sleep(Duration::from_millis(200));
    }
    panic!("load never matched within {within:?}: last {last:?}");
}

/// Follow changes from `version` until a whole second passes without one; the last version.
fn quiet_after(src: &mut EtcdSource, version: &str) -> String {
    let t = Instant::now();
    let mut v = version.to_string();
    while let Some(n) = src.wait_for_change(&v, Duration::from_secs(1)).unwrap() {
        v = n;
        assert!(t.elapsed() < Duration::from_secs(30), "changes never stop");
    }
    v
}

#[test]
#[ignore = "needs root: integration/run.sh runs it as root (--include-ignored)"]
fn loads_follows_changes_and_survives_killing_the_leader_then_a_follower() {
    require_root!();
    let mut e = Etcd::new("lf");
    e.seed("/mesh", &[1, 2]);
    // A malformed record: reported by key, left out, the others still used.
    e.put(
        "/mesh/hosts/h3",
        r#"{"id":"h3","agent_ip":"192.168.77.3","subnets":["10.43.3.0/24"]}"#,
    );
    let leader = e.leader().unwrap();
    // The leader first in the list: the watch connects to it, so killing it breaks the watch.
    let mut order = vec![leader];
    order.extend((1..=3).filter(|n| *n != leader));
    let url = format!("etcd://{}/mesh", e.endpoints(&order));
    let ns = e.t.ns("cl");
    let (tx, rx) = std::sync::mpsc::channel::<&'static str>();
    let (back_tx, back_rx) = std::sync::mpsc::channel::<String>();
    let client = thread::spawn(move || {
        in_netns(&ns, move || {
            let mut load = EtcdSource::new(&url).unwrap();
            let mut watch = EtcdSource::new(&url).unwrap();
            let snap = load.load().unwrap();
            let got: Vec<String> = snap
                .cluster
                .hosts
                .iter()
                .map(|h| h.id.to_string())
                .collect();
            assert_eq!(got, ["h1", "h2"]);
            assert_eq!(load.skipped().len(), 1);
            assert_eq!(load.skipped()[0].key, "/mesh/hosts/h3");
            assert!(
                load.skipped()[0]
                    .error
                    .starts_with("subnets[0]: 10.43.3.0/24 is not inside"),
                "{:?}",
                load.skipped()
            );
            let v = snap.version.clone();
            assert_eq!(
                watch
                    .wait_for_change(&v, Duration::from_millis(500))
                    .unwrap(),
                None
            );
            back_tx.send("ready".into()).unwrap();

            // A change under the prefix wakes the watch; one outside it, or an allocation key,
            // does not.
            assert_eq!(rx.recv().unwrap(), "put h4");
            let v2 = next_change(&mut watch, &v, Duration::from_secs(10));
            assert!(v2.parse::<i64>().unwrap() > v.parse::<i64>().unwrap());
            assert_eq!(ids(&mut load), ["h1", "h2", "h4"]);
            back_tx.send("seen h4".into()).unwrap();
            assert_eq!(rx.recv().unwrap(), "put unrelated");
            assert_eq!(
                watch.wait_for_change(&v2, Duration::from_secs(2)).unwrap(),
                None
            );
            back_tx.send("ignored unrelated".into()).unwrap();

            // The leader killed (the member the watch is on): a change still arrives, via
            // another member, and loads still answer.
            let watches = watch
                .stats()
                .watches
                .load(std::sync::atomic::Ordering::Relaxed);
            assert_eq!(rx.recv().unwrap(), "leader killed, put h5");
            let v3 = next_change(&mut watch, &v2, Duration::from_secs(20));
            assert!(
                watch
                    .stats()
                    .watches
                    .load(std::sync::atomic::Ordering::Relaxed)
                    > watches,
                "the watch did not move to another member"
            );
            load_until(&mut load, Duration::from_secs(20), |ids| {
                ids.contains(&"h5".to_string())
            });
            back_tx.send("seen h5".into()).unwrap();

            assert_eq!(rx.recv().unwrap(), "follower killed, put h6");
            let v4 = next_change(&mut watch, &v3, Duration::from_secs(20));
            let got = load_until(&mut load, Duration::from_secs(20), |ids| {
                ids.contains(&"h6".to_string())
            });
            assert_eq!(got, ["h1", "h2", "h4", "h5", "h6"]);
            // The watch resumed without losing or repeating: nothing more is pending.
            let _ = v4;
            assert_eq!(
                watch
                    .stats()
                    .relists
                    .load(std::sync::atomic::Ordering::Relaxed),
                0
            );
            back_tx.send("seen h6".into()).unwrap();
        })
    });
    let step = |say: &'static str, expect: &str| {
        tx.send(say).unwrap();
        let got = back_rx
            .recv_timeout(Duration::from_secs(60))
            .unwrap_or_else(|_| panic!("client did not finish step {say:?}"));
        assert_eq!(got, expect);
    };
    assert_eq!(
        back_rx.recv_timeout(Duration::from_secs(30)).unwrap(),
        "ready"
    );
    e.put("/mesh/hosts/h4", &host_json("h4", 4));
    step("put h4", "seen h4");
    e.put("/other/x", "1");
    e.put("/mesh/subnets/10.42.9.0-24", "h9");
    step("put unrelated", "ignored unrelated");

    e.kill9(leader);
    e.wait_healthy(2);
    e.put("/mesh/hosts/h5", &host_json("h5", 5));
    step("leader killed, put h5", "seen h5");
    e.start(leader);
    e.wait_healthy(3);

    let new_leader = e.leader().unwrap();
    let follower = (1..=3).find(|n| *n != new_leader).unwrap();
    e.kill9(follower);
    e.wait_healthy(2);
    e.put("/mesh/hosts/h6", &host_json("h6", 6));
    step("follower killed, put h6", "seen h6");
    e.start(follower);
    e.wait_healthy(3);
    client.join().unwrap();
}

#[test]
#[ignore = "needs root: integration/run.sh runs it as root (--include-ignored)"]
fn whole_cluster_down_keeps_the_last_good_state_then_resumes() {
    require_root!();
    let mut e = Etcd::new("dn");
    e.seed("/mesh", &[1, 2]);
    let url = format!("etcd://{}/mesh", e.endpoints(&[1, 2, 3]));
    let ns = e.t.ns("cl");
    let (tx, rx) = std::sync::mpsc::channel::<&'static str>();
    let (back_tx, back_rx) = std::sync::mpsc::channel::<String>();
    let client = thread::spawn(move || {
        in_netns(&ns, move || {
            let mut load = EtcdSource::new(&url).unwrap();
            let mut watch = EtcdSource::new(&url).unwrap();
            let snap = load.load().unwrap();
            let v = snap.version.clone();
            assert_eq!(
                watch
                    .wait_for_change(&v, Duration::from_millis(300))
                    .unwrap(),
                None
            );
            back_tx.send("ready".into()).unwrap();
            assert_eq!(rx.recv().unwrap(), "all down");
            // Loads fail naming every endpoint; the watch reports the outage (the sidecar
            // keeps its last good state on both).
            let err = load.load().unwrap_err().to_string();
            for n in 1..=3 {
                assert!(
                    err.contains(&format!("{}:2379: cannot connect", member_ip(n))),
                    "{err}"
                );
            }
            let t = Instant::now();
            let werr = loop {
                match watch.wait_for_change(&v, Duration::from_secs(2)) {
                    Err(e) => break e.to_string(),
                    Ok(None) if t.elapsed() < Duration::from_secs(15) => continue,
                    other => panic!("the watch did not report the outage: {other:?}"),
                }
            };
            assert!(werr.contains("no etcd endpoint answered"), "{werr}");
            back_tx.send("saw outage".into()).unwrap();
            // Up again, with a change made meanwhile through the restarted cluster.
            assert_eq!(rx.recv().unwrap(), "up, h3 put");
            let v2 = next_change(&mut watch, &v, Duration::from_secs(30));
            assert!(v2.parse::<i64>().unwrap() > v.parse::<i64>().unwrap());
            assert_eq!(ids(&mut load), ["h1", "h2", "h3"]);
            back_tx.send("seen h3".into()).unwrap();
        })
    });
    assert_eq!(
        back_rx.recv_timeout(Duration::from_secs(30)).unwrap(),
        "ready"
    );
    for n in 1..=3 {
        e.kill9(n);
    }
    tx.send("all down").unwrap();
    assert_eq!(
        back_rx.recv_timeout(Duration::from_secs(60)).unwrap(),
        "saw outage"
    );
    for n in 1..=3 {
        e.start(n);
    }
    e.wait_healthy(3);
    e.put("/mesh/hosts/h3", &host_json("h3", 3));
    tx.send("up, h3 put").unwrap();
    assert_eq!(
        back_rx.recv_timeout(Duration::from_secs(60)).unwrap(),
        "seen h3"
    );
    client.join().unwrap();
}

#[test]
#[ignore = "needs root: integration/run.sh runs it as root (--include-ignored)"]
fn compaction_while_a_watcher_is_paused_relists_once_and_converges() {
    require_root!();
    use std::sync::atomic::Ordering::Relaxed;
    let mut e = Etcd::new("cp");
    e.seed("/mesh", &[1, 2]);
    let url = format!("etcd://{}/mesh", e.endpoints(&[1, 2, 3]));
    let ns = e.t.ns("cl");
    let (tx, rx) = std::sync::mpsc::channel::<&'static str>();
    let (back_tx, back_rx) = std::sync::mpsc::channel::<String>();
    let client = thread::spawn(move || {
        in_netns(&ns, move || {
            // Paused: loaded at R, not watching yet.
            let mut paused = EtcdSource::new(&url).unwrap();
            let v = paused.load().unwrap().version;
            // Watching (connected to e1, the first endpoint) before the changes.
            let mut live = EtcdSource::new(&url).unwrap();
            assert_eq!(live.load().unwrap().version, v);
            assert_eq!(
                live.wait_for_change(&v, Duration::from_millis(300))
                    .unwrap(),
                None
            );
            back_tx.send("ready".into()).unwrap();

            // 50 changes and a compaction at the newest revision happened meanwhile.
            assert_eq!(rx.recv().unwrap(), "changed and compacted");
            let v2 = next_change(&mut paused, &v, Duration::from_secs(10));
            assert_eq!(paused.stats().relists.load(Relaxed), 1);
            let exact = paused.load().unwrap();
            let fresh = EtcdSource::new(&url).unwrap().load().unwrap();
            assert_eq!(exact.cluster, fresh.cluster);
            assert_eq!(exact.cluster.hosts.len(), 2 + 25);
            // No retry loop: after the re-list the watch stays quiet (one watch that was
            // compacted, one from the fresh revision).
            assert_eq!(
                paused.wait_for_change(&v2, Duration::from_secs(3)).unwrap(),
                None
            );
            assert_eq!(paused.stats().watches.load(Relaxed), 2);
            assert_eq!(paused.stats().relists.load(Relaxed), 1);

            // The live watcher followed the changes without a re-list.
            let lv = quiet_after(&mut live, &v);
            assert_ne!(lv, v);
            assert_eq!(live.load().unwrap().cluster, fresh.cluster);
            assert_eq!(live.stats().relists.load(Relaxed), 0);
            // Progress notifications (every 1 s here) moved its resume revision past the
            // writes outside the prefix.
            assert!(live.stats().progress.load(Relaxed) > 0);
            back_tx.send("relisted".into()).unwrap();

            // Its member stopped (its stream stalls), 50 more changes and a compaction, then
            // the member killed: the watch resumes elsewhere from a compacted revision and
            // lists again, once.
            assert_eq!(
                rx.recv().unwrap(),
                "e1 stopped, changed, compacted, e1 killed"
            );
            let lv2 = next_change(&mut live, &lv, Duration::from_secs(20));
            let last = quiet_after(&mut live, &lv2);
            assert_eq!(live.stats().relists.load(Relaxed), 1);
            let got = live.load().unwrap();
            let fresh = EtcdSource::new(&url).unwrap().load().unwrap();
            assert_eq!(got.cluster, fresh.cluster);
            assert_eq!(got.cluster.hosts.len(), 2 + 50);

            // Quiet prefix, busy cluster: progress notifications keep the resume revision
            // fresh, so a compaction of everything before now does not force a re-list.
            let before = live.stats().resume.load(Relaxed);
            back_tx.send("quiet".into()).unwrap();
            assert_eq!(
                rx.recv().unwrap(),
                "outside writes, compacted, member of the watch killed"
            );
            let t = Instant::now();
            while t.elapsed() < Duration::from_secs(4) {
                assert_eq!(
                    live.wait_for_change(&last, Duration::from_millis(500))
                        .unwrap(),
                    None
                );
            }
            assert!(live.stats().resume.load(Relaxed) > before + 20);
            assert_eq!(live.stats().relists.load(Relaxed), 1);
            back_tx.send("fresh".into()).unwrap();
        })
    });
    assert_eq!(
        back_rx.recv_timeout(Duration::from_secs(30)).unwrap(),
        "ready"
    );
    for i in 0..50 {
        let n = 10 + i / 2;
        // 25 new hosts, each written twice, and writes outside the prefix.
        e.put(
            &format!("/mesh/hosts/h{n}"),
            &host_json(&format!("h{n}"), n),
        );
        e.put("/other/noise", &i.to_string());
    }
    let rev = e.revision();
    e.ctl(&["compact", &rev.to_string()]);
    tx.send("changed and compacted").unwrap();
    assert_eq!(
        back_rx.recv_timeout(Duration::from_secs(60)).unwrap(),
        "relisted"
    );

    e.sigstop(1, libc::SIGSTOP);
    // etcdctl against e2, e3 only while e1 is stopped.
    let stopped = e.members[0].take();
    e.wait_healthy(2);
    for i in 0..50 {
        let n = 40 + i / 2;
        e.put(
            &format!("/mesh/hosts/h{n}"),
            &host_json(&format!("h{n}"), n),
        );
    }
    let rev = e.revision();
    e.ctl(&["compact", &rev.to_string()]);
    e.members[0] = stopped;
    e.kill9(1);
    tx.send("e1 stopped, changed, compacted, e1 killed")
        .unwrap();
    assert_eq!(
        back_rx.recv_timeout(Duration::from_secs(60)).unwrap(),
        "quiet"
    );
    e.start(1);
    e.wait_healthy(3);
    for i in 0..40 {
        e.put("/other/noise", &i.to_string());
    }
    // Let a progress notification carry the new revision, then compact it all away.
    thread::sleep(Duration::from_millis(2500));
    let rev = e.revision();
    e.ctl(&["compact", &rev.to_string()]);
    // The watch is on e2 or e3 now (e1 was killed): kill both in turn, one at a time.
    e.kill9(2);
    e.wait_healthy(2);
    e.start(2);
    e.wait_healthy(3);
    e.kill9(3);
    e.wait_healthy(2);
    tx.send("outside writes, compacted, member of the watch killed")
        .unwrap();
    assert_eq!(
        back_rx.recv_timeout(Duration::from_secs(60)).unwrap(),
        "fresh"
    );
    e.start(3);
    client.join().unwrap();
}

const BIN: &str = env!("CARGO_BIN_EXE_ipsec-mesh");

impl Etcd {
    /// `ipsec-mesh ARGS` in the client namespace: (success, stdout, stderr).
    fn mesh(&self, args: &[&str]) -> (bool, String, String) {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.t.ns("cl"), BIN])
            .args(args)
            .env("IPSEC_MESH_LOG", "warn")
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }
}

#[test]
#[ignore = "needs root: integration/run.sh runs it as root (--include-ignored)"]
fn metadata_push_and_show_seed_and_inspect_the_cluster() {
    require_root!();
    let e = Etcd::new("ps");
    let url = format!("etcd://{}/fleet", e.endpoints(&[1, 2, 3]));
    let file = e.t.dir.path().join("meta.json");
    let hosts: Vec<String> = (1..=3).map(|n| host_json(&format!("h{n}"), n)).collect();
    std::fs::write(
        &file,
        format!(r#"{{"network":{NET},"hosts":[{}]}}"#, hosts.join(",")),
    )
    .unwrap();
    let f = file.to_str().unwrap();

    let (ok, out, err) = e.mesh(&["metadata", "push", "--metadata", f, "--to", &url]);
    assert!(ok, "{err}");
    assert!(
        out.starts_with(&format!(
            "pushed the network and 3 hosts to {url} (revision "
        )),
        "{out}"
    );
    // Plain JSON values, one key per host, as etcdctl sees them.
    let got = e.ctl(&["get", "/fleet/hosts/h2", "--print-value-only"]);
    let v: Value = serde_json::from_str(got.trim()).unwrap();
    assert_eq!(v, serde_json::from_str::<Value>(&hosts[1]).unwrap());
    let keys = e.ctl(&["get", "--prefix", "/fleet/", "--keys-only"]);
    let keys: Vec<&str> = keys.split_whitespace().collect();
    assert_eq!(
        keys,
        [
            "/fleet/hosts/h1",
            "/fleet/hosts/h2",
            "/fleet/hosts/h3",
            "/fleet/network"
        ]
    );

    // A record written by hand with a typo: shown as left out, by key.
    e.put(
        "/fleet/hosts/h9",
        r#"{"id":"h9","agent_ip":"192.168.77.9","subnet":["10.42.9.0/24"]}"#,
    );
    let (ok, out, err) = e.mesh(&["metadata", "show", "--metadata", &url]);
    assert!(ok, "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert!(
        lines[0].contains("network 10.42.0.0/16 backend vxlan mtu 1500  3 hosts"),
        "{out}"
    );
    assert_eq!(
        lines[1].split_whitespace().collect::<Vec<_>>(),
        ["ID", "AGENT_IP", "SUBNETS", "VTEP", "NAME"]
    );
    assert_eq!(
        lines[3].split_whitespace().collect::<Vec<_>>(),
        ["h2", "192.168.77.2", "10.42.2.0/24", "10.42.2.0", "-"]
    );
    assert!(
        lines[5].starts_with(&format!(
            "left out: etcd://{}/fleet/hosts/h9: unknown field `subnet`",
            e.endpoints(&[1, 2, 3])
        )),
        "{out}"
    );
    let (ok, out, err) = e.mesh(&["metadata", "show", "--metadata", &url, "--format", "json"]);
    assert!(ok, "{err}");
    let doc: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(doc["hosts"].as_array().unwrap().len(), 3);
    assert_eq!(doc["hosts"][0]["id"], "h1");
    assert_eq!(doc["skipped"][0]["key"], "/fleet/hosts/h9");
    // The same hosts as the file shows.
    let (_, file_json, _) = e.mesh(&["metadata", "show", "--metadata", f, "--format", "json"]);
    let file_doc: Value = serde_json::from_str(&file_json).unwrap();
    assert_eq!(file_doc["hosts"], doc["hosts"]);
    assert_eq!(file_doc["network"], doc["network"]);

    // --prune deletes what the file does not list; an invalid file writes nothing.
    let (ok, out, err) = e.mesh(&["metadata", "push", "--metadata", f, "--to", &url, "--prune"]);
    assert!(ok, "{err}");
    assert!(
        out.contains("deleted 1 host records not in the file"),
        "{out}"
    );
    assert_eq!(e.ctl(&["get", "/fleet/hosts/h9"]).trim(), "");
    let before = e.revision();
    std::fs::write(
        &file,
        format!(r#"{{"network":{NET},"hosts":[{}]}}"#, host_json("h1", 300)),
    )
    .unwrap();
    let (ok, _, err) = e.mesh(&["metadata", "push", "--metadata", f, "--to", &url]);
    assert!(!ok);
    assert!(
        err.contains(&format!(
            "{f}: hosts[0] (id \"h1\").agent_ip: \"192.168.77.300\" is not an IP address"
        )),
        "{err}"
    );
    assert_eq!(e.revision(), before);
    // No endpoint: the error names each one.
    let (ok, _, err) = e.mesh(&[
        "metadata",
        "show",
        "--metadata",
        "etcd://192.168.78.99:2379,192.168.78.100:1/fleet",
    ]);
    assert!(!ok);
    assert!(
        err.contains("no etcd endpoint answered: 192.168.78.99:2379: "),
        "{err}"
    );
    assert!(
        err.contains("192.168.78.100:1: cannot connect: connection refused"),
        "{err}"
    );
}

#[test]
#[ignore = "needs root: integration/run.sh runs it as root (--include-ignored)"]
fn ten_hosts_racing_for_auto_subnets_get_distinct_ones_and_keep_them() {
    require_root!();
    use ipsec_mesh::metadata::etcd::{Client, EtcdUrl, Registrar, Registration, SubnetSpec};
    let e = Etcd::new("ra");
    e.put("/mesh/network", NET);
    // A host registered by hand holds 10.42.0.0/24: the allocator leaves it alone.
    e.put("/mesh/hosts/static", &host_json("static", 0));
    let url = EtcdUrl::parse(&format!("etcd://{}/mesh", e.endpoints(&[1, 2, 3]))).unwrap();
    let ns = e.t.ns("cl");
    let u = url.clone();
    let got: Vec<(String, Vec<String>)> = in_netns(&ns, move || {
        let start = std::sync::Arc::new(std::sync::Barrier::new(10));
        let racers: Vec<_> = (1..=10)
            .map(|n| {
                let (u, start) = (u.clone(), start.clone());
                thread::spawn(move || {
                    let mut r = Registrar::new(
                        Client::new(u).unwrap(),
                        Registration {
                            host: format!("r{n}"),
                            agent_ip: format!("192.168.77.{}", 100 + n).parse().unwrap(),
                            subnets: vec![SubnetSpec::Auto(Some(24))],
                            ttl: 30,
                            guard_ttl: 3600,
                        },
                    );
                    start.wait();
                    r.register().unwrap();
                    let s: Vec<String> =
                        r.subnets().unwrap().iter().map(|s| s.to_string()).collect();
                    (format!("r{n}"), s)
                })
            })
            .collect();
        racers.into_iter().map(|t| t.join().unwrap()).collect()
    });
    let mut all: Vec<String> = got.iter().flat_map(|(_, s)| s.clone()).collect();
    all.sort();
    let before = all.len();
    all.dedup();
    assert_eq!(
        all.len(),
        before,
        "two racing hosts got the same subnet: {got:?}"
    );
    assert_eq!(all.len(), 10);
    assert!(!all.contains(&"10.42.0.0/24".to_string()), "{all:?}");
    // Every allocation is guarded by its key and recorded in the host's record.
    for (host, s) in &got {
        let key = format!("/mesh/subnets/{}", s[0].replace('/', "-"));
        assert_eq!(e.ctl(&["get", &key, "--print-value-only"]).trim(), host);
        let rec: Value = serde_json::from_str(
            e.ctl(&["get", &format!("/mesh/hosts/{host}"), "--print-value-only"])
                .trim(),
        )
        .unwrap();
        assert_eq!(rec["subnets"][0], s[0].as_str());
    }
    // The records hang on leases; revoking r3's (the sidecar gone) removes the record, and
    // the same id registering again gets the same subnet back.
    let r3 = got.iter().find(|(h, _)| h == "r3").unwrap().1[0].clone();
    let lease = e.ctl(&["get", "/mesh/hosts/r3", "-w", "json"]);
    let lease = serde_json::from_str::<Value>(&lease).unwrap()["kvs"][0]["lease"]
        .as_i64()
        .unwrap();
    e.ctl(&["lease", "revoke", &format!("{lease:x}")]);
    assert_eq!(e.ctl(&["get", "/mesh/hosts/r3"]).trim(), "");
    let again = in_netns(&ns, move || {
        let mut r = Registrar::new(
            Client::new(url).unwrap(),
            Registration {
                host: "r3".into(),
                agent_ip: "192.168.77.103".parse().unwrap(),
                subnets: vec![SubnetSpec::Auto(Some(24))],
                ttl: 30,
                guard_ttl: 3600,
            },
        );
        r.register().unwrap();
        r.subnets().unwrap()[0].to_string()
    });
    assert_eq!(again, r3);
}

#[test]
#[ignore = "needs root: integration/run.sh runs it as root (--include-ignored)"]
fn an_auto_subnet_is_kept_by_its_host_and_freed_after_the_grace() {
    require_root!();
    use ipsec_mesh::metadata::etcd::{Client, EtcdUrl, Registrar, Registration, SubnetSpec};
    let e = Etcd::new("gr");
    e.put("/mesh/network", NET);
    let url = EtcdUrl::parse(&format!("etcd://{}/mesh", e.endpoints(&[1, 2, 3]))).unwrap();
    let ns = e.t.ns("cl");
    // Record TTL 2 s, guard grace 8 s. A registrar that is dropped is a sidecar gone (no
    // keep-alive any more).
    let register = move |host: &str| {
        let (u, host) = (url.clone(), host.to_string());
        in_netns(&ns, move || {
            let mut r = Registrar::new(
                Client::new(u).unwrap(),
                Registration {
                    host,
                    agent_ip: "192.168.77.50".parse().unwrap(),
                    subnets: vec![SubnetSpec::Auto(Some(24))],
                    ttl: 2,
                    guard_ttl: 8,
                },
            );
            r.register().unwrap();
            (
                r.subnets().unwrap()[0].to_string(),
                r.lease(),
                r.guard_lease(),
            )
        })
    };
    let guard = |s: &str| format!("/mesh/subnets/{}", s.replace('/', "-"));
    let kv = |key: &str| -> Option<Value> {
        let v: Value = serde_json::from_str(&e.ctl(&["get", key, "-w", "json"])).unwrap();
        v["kvs"].as_array().and_then(|a| a.first().cloned())
    };
    let wait_gone = |key: &str, within: Duration| {
        let t = Instant::now();
        while kv(key).is_some() {
            assert!(t.elapsed() < within, "{key} still there after {within:?}");
            thread::sleep(Duration::from_millis(200));
        }
        t.elapsed()
    };

    let (s, lease, guard_lease) = register("g1");
    // The guard hangs on a lease of its own with the grace as TTL, not on the record's.
    let g = kv(&guard(&s)).expect("guard key");
    assert_eq!(g["lease"].as_i64(), Some(guard_lease));
    assert_ne!(guard_lease, lease);
    let ttl: Value = serde_json::from_str(&e.ctl(&[
        "lease",
        "timetolive",
        &format!("{guard_lease:x}"),
        "-w",
        "json",
    ]))
    .unwrap();
    assert_eq!(ttl["granted-ttl"].as_i64(), Some(8), "{ttl}");
    assert_eq!(kv("/mesh/hosts/g1").unwrap()["lease"].as_i64(), Some(lease));

    // Restarted within the record's TTL: the same subnet, the guard moved to the new lease.
    let (again, _, guard2) = register("g1");
    assert_eq!(again, s);
    assert_eq!(kv(&guard(&s)).unwrap()["lease"].as_i64(), Some(guard2));
    // Gone longer than the record's TTL, back within the grace: still the same subnet.
    wait_gone("/mesh/hosts/g1", Duration::from_secs(10));
    assert!(kv(&guard(&s)).is_some(), "the guard went with the record");
    let (again, _, _) = register("g1");
    assert_eq!(again, s);
    // Retired (gone longer than the grace): record and guard expire, and the subnet goes to
    // the next newcomer.
    wait_gone("/mesh/hosts/g1", Duration::from_secs(10));
    let took = wait_gone(&guard(&s), Duration::from_secs(15));
    assert!(took > Duration::from_secs(2), "guard freed after {took:?}");
    assert_eq!(
        e.ctl(&["get", "/mesh/subnets/", "--prefix", "--keys-only"])
            .trim(),
        ""
    );
    let (next, _, _) = register("g2");
    assert_eq!(next, s, "the freed subnet is the first free one again");
    assert_eq!(
        e.ctl(&["get", &guard(&s), "--print-value-only"]).trim(),
        "g2"
    );
}

#[test]
#[ignore = "needs root: integration/run.sh runs it as root (--include-ignored)"]
fn a_silent_member_under_the_watch_is_left_at_the_next_probe() {
    require_root!();
    use ipsec_mesh::metadata::etcd::{Client, EtcdUrl};
    use std::sync::atomic::Ordering::Relaxed;
    let e = Etcd::new("si");
    e.seed("/mesh", &[1, 2]);
    // Member 1 first: the load and so the watch go to it.
    let url = EtcdUrl::parse(&format!("etcd://{}/mesh", e.endpoints(&[1, 2, 3]))).unwrap();
    let member1 = e.members[0].as_ref().unwrap().id() as libc::pid_t;
    let ns = e.t.ns("cl");
    let (took, watches, hosts, err) = in_netns(&ns, move || {
        let c = Client::new(url.clone())
            .unwrap()
            .with_watch_probe(Duration::from_secs(2), Duration::from_secs(1));
        // A watch connection lives 120 s here: without the probe, the stopped member would
        // be left only then.
        let mut src = EtcdSource::with_client(c).with_watch_cycle(Duration::from_secs(120));
        let v = src.load().unwrap().version;
        // The watch is created on member 1 and quiet.
        assert_eq!(
            src.wait_for_change(&v, Duration::from_secs(2)).unwrap(),
            None
        );
        assert_eq!(src.stats().watches.load(Relaxed), 1);
        // SAFETY: kill(2) on the pid of the test's own etcd member.
        unsafe { libc::kill(member1, libc::SIGSTOP) };
        // A host added through the two others (they keep a quorum).
        let others = Client::new(EtcdUrl {
            endpoints: url.endpoints[1..].to_vec(),
            prefix: url.prefix.clone(),
        })
        .unwrap();
        let t = Instant::now();
        let mut put = others.put("/mesh/hosts/h3", host_json("h3", 3).as_bytes(), 0);
        while put.is_err() && t.elapsed() < Duration::from_secs(20) {
            thread::sleep(Duration::from_millis(200)); // a new leader is being elected
            put = others.put("/mesh/hosts/h3", host_json("h3", 3).as_bytes(), 0);
        }
        put.unwrap();
        let mut errors = Vec::new();
        let got = loop {
            match src.wait_for_change(&v, Duration::from_secs(1)) {
                Ok(Some(n)) => break n,
                Ok(None) => {}
                Err(e) => errors.push(e.to_string()),
            }
            assert!(
                t.elapsed() < Duration::from_secs(60),
                "no change: {errors:?}"
            );
        };
        let took = t.elapsed();
        let watches = src.stats().watches.load(Relaxed);
        let hosts = ids(&mut src);
        assert_ne!(got, v);
        // SAFETY: as above.
        unsafe { libc::kill(member1, libc::SIGCONT) };
        (took, watches, hosts, errors)
    });
    // Left at the first probe (2 s quiet + 1 s probe), a watch made on another member.
    assert!(
        took < Duration::from_secs(15),
        "took {took:?}; errors {err:?}"
    );
    assert_eq!(watches, 2, "one new watch, on another member");
    assert!(err.is_empty(), "{err:?}");
    assert_eq!(hosts, ["h1", "h2", "h3"]);
}

/// The sidecars of the mesh test, killed when the test ends.
struct Sidecars(Vec<Option<Child>>);

/// The `i`-th address of `net` (1: the bridge's, 2: the container's).
fn nth_addr(net: &ipnet::IpNet, i: u8) -> std::net::IpAddr {
    match net {
        ipnet::IpNet::V4(n) => std::net::IpAddr::V4((u32::from(n.network()) + u32::from(i)).into()),
        ipnet::IpNet::V6(n) => {
            std::net::IpAddr::V6((u128::from(n.network()) + u128::from(i)).into())
        }
    }
}

impl Drop for Sidecars {
    fn drop(&mut self) {
        for c in self.0.iter_mut().flatten() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Etcd {
    /// Give container `n` the second address of `subnet` (IPv4 or IPv6) behind host `n`'s
    /// bridge, which holds the first.
    fn add_container(&self, n: usize, subnet: &str) {
        let (h, c) = (self.t.ns(&format!("h{n}")), self.t.ns(&format!("c{n}")));
        let net: ipnet::IpNet = subnet.parse().unwrap();
        let (gw, addr, len) = (nth_addr(&net, 1), nth_addr(&net, 2), net.prefix_len());
        let nodad = if net.addr().is_ipv6() { "nodad" } else { "" };
        common::sh(&format!(
            "ip -n {h} link add cbr0 type bridge && ip -n {h} link set cbr0 up && \
             ip -n {h} addr add {gw}/{len} dev cbr0 {nodad} && \
             ip link add vc{n} netns {h} type veth peer name eth0 netns {c} && \
             ip -n {h} link set vc{n} master cbr0 && ip -n {h} link set vc{n} up && \
             ip -n {c} link set eth0 up && ip -n {c} addr add {addr}/{len} dev eth0 {nodad} && \
             ip -n {c} route add default via {gw}"
        ));
    }

    /// `ipsec-mesh run --register --subnet auto` in host `n`'s namespace.
    fn sidecar(&self, n: usize, url: &str) -> Child {
        self.sidecar_with(n, url, &["--register-ttl", "3", "--resync", "60"])
    }

    /// [`Etcd::sidecar`] with `extra` flags (they must include --register-ttl and --resync).
    fn sidecar_with(&self, n: usize, url: &str, extra: &[&str]) -> Child {
        let log = File::create(self.t.dir.path().join(format!("h{n}.log"))).unwrap();
        Command::new("ip")
            .args(["netns", "exec", &self.t.ns(&format!("h{n}")), BIN, "run"])
            .args(["--metadata", url, "--host", &format!("h{n}")])
            .args(["--driver", "vxlan"])
            .args(["--register", "--agent-ip", &self.host_addr(n)])
            .args(["--subnet", "auto"])
            .args(extra)
            .env("IPSEC_MESH_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap()
    }

    /// Host `n`'s record's first subnet, once it is there.
    fn registered_subnet(&self, n: usize, within: Duration) -> String {
        let t = Instant::now();
        loop {
            if let Ok(v) =
                self.ctl_try(&["get", &format!("/mesh/hosts/h{n}"), "--print-value-only"])
            {
                if let Ok(rec) = serde_json::from_str::<Value>(v.trim()) {
                    return rec["subnets"][0].as_str().unwrap().to_string();
                }
            }
            assert!(
                t.elapsed() < within,
                "h{n} did not register within {within:?}"
            );
            thread::sleep(Duration::from_millis(100));
        }
    }

    /// The peers host `n`'s sidecar reports (`ipsec-mesh status --format json`).
    fn peers(&self, n: usize) -> Vec<String> {
        let out = Command::new("ip")
            .args([
                "netns",
                "exec",
                &self.t.ns(&format!("h{n}")),
                BIN,
                "status",
                "--format",
                "json",
            ])
            .output()
            .unwrap();
        let v: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
        let mut p: Vec<String> = v["peers"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|p| p["host"].as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default();
        p.sort();
        p
    }

    fn wait_peers(&self, hosts: &[usize], want: &[usize], within: Duration) {
        let t = Instant::now();
        for &n in hosts {
            let expect: Vec<String> = want
                .iter()
                .filter(|m| **m != n)
                .map(|m| format!("h{m}"))
                .collect();
            loop {
                let got = self.peers(n);
                if got == expect {
                    break;
                }
                assert!(
                    t.elapsed() < within,
                    "h{n}: peers {got:?}, expected {expect:?} (logs in {})",
                    self.t.dir.path().display()
                );
                thread::sleep(Duration::from_millis(200));
            }
        }
    }

    fn ping(&self, from: usize, to_subnet: &str) -> bool {
        let dst = nth_addr(&to_subnet.parse().unwrap(), 2);
        self.t
            .try_sh(&format!("c{from}"), &format!("ping -c 1 -W 2 -w 6 {dst}"))
    }
}

#[test]
#[ignore = "needs root: integration/run.sh runs it as root (--include-ignored)"]
fn five_registered_hosts_mesh_over_vxlan_and_a_dead_host_expires() {
    require_root!();
    let mut e = Etcd::new("mh");
    e.put(
        "/mesh/network",
        r#"{"cidr":"10.42.0.0/16","backend":"vxlan"}"#,
    );
    let url = format!("etcd://{}/mesh", e.endpoints(&[1, 2, 3]));
    for n in 1..=6 {
        e.add_host(n);
    }
    let mut cars = Sidecars(Vec::new());
    for n in 1..=5 {
        cars.0.push(Some(e.sidecar(n, &url)));
    }
    let mut subnets = Vec::new();
    for n in 1..=5 {
        let s = e.registered_subnet(n, Duration::from_secs(20));
        e.add_container(n, &s);
        subnets.push(s);
    }
    let mut distinct = subnets.clone();
    distinct.sort();
    distinct.dedup();
    assert_eq!(distinct.len(), 5, "{subnets:?}");
    let all: Vec<usize> = (1..=5).collect();
    e.wait_peers(&all, &all, Duration::from_secs(30));
    for a in 1..=5 {
        for b in (1..=5).filter(|b| *b != a) {
            assert!(
                e.ping(a, &subnets[b - 1]),
                "c{a} -> c{b} ({})",
                subnets[b - 1]
            );
        }
    }

    // The leader killed: a 6th host joins and everybody programs it.
    let leader = e.leader().unwrap();
    e.kill9(leader);
    e.wait_healthy(2);
    cars.0.push(Some(e.sidecar(6, &url)));
    let s6 = e.registered_subnet(6, Duration::from_secs(20));
    e.add_container(6, &s6);
    subnets.push(s6.clone());
    let six: Vec<usize> = (1..=6).collect();
    e.wait_peers(&six, &six, Duration::from_secs(30));
    for a in 1..=5 {
        assert!(e.ping(a, &s6), "c{a} -> c6 ({s6})");
        assert!(e.ping(6, &subnets[a - 1]), "c6 -> c{a}");
    }
    e.start(leader);
    e.wait_healthy(3);

    // h5's sidecar killed: after its TTL (3 s) the record expires and every peer drops it.
    let mut dead = cars.0[4].take().unwrap();
    dead.kill().unwrap();
    dead.wait().unwrap();
    let rest: Vec<usize> = vec![1, 2, 3, 4, 6];
    e.wait_peers(&rest, &rest, Duration::from_secs(20));
    assert_eq!(e.ctl(&["get", "/mesh/hosts/h5"]).trim(), "");
    let h1 = e.t.ns("h1");
    let fdb = common::sh(&format!("bridge -n {h1} fdb show dev vtep1042"));
    assert!(
        !fdb.contains(&Etcd::host_ip(5)),
        "h5 still in h1's fdb: {fdb}"
    );
    // Restarted, it gets the same subnet back and rejoins.
    cars.0[4] = Some(e.sidecar(5, &url));
    assert_eq!(e.registered_subnet(5, Duration::from_secs(20)), subnets[4]);
    e.wait_peers(&six, &six, Duration::from_secs(30));
    assert!(e.ping(1, &subnets[4]), "c1 -> c5 after the restart");
    assert!(e.ping(5, &subnets[0]), "c5 -> c1 after the restart");
}

#[test]
#[ignore = "needs root: integration/run.sh runs it as root (--include-ignored)"]
fn ipv6_only_etcd_registers_ipv6_hosts_with_64s_and_they_mesh_over_vxlan() {
    // Everything IPv6: the etcd members listen and peer on fd78::/64 only, the sidecars reach
    // them by bracketed endpoints, register IPv6 agent_ips, and `--subnet auto` (no
    // --auto-subnet-len) takes a /64 of the IPv6 network cidr; the mesh is VXLAN over the
    // IPv6 underlay carrying the IPv6 overlay.
    require_root!();
    let e = Etcd::ipv6("v6");
    e.put("/mesh/network", r#"{"cidr":"fd42::/48","backend":"vxlan"}"#);
    let url = format!("etcd://{}/mesh", e.endpoints(&[1, 2, 3]));
    assert!(url.contains("[fd78::11]:2379"), "{url}");
    let mut e = e;
    for n in 1..=3 {
        e.add_host(n);
    }
    let cars = Sidecars((1..=3).map(|n| Some(e.sidecar(n, &url))).collect());
    let mut subnets = Vec::new();
    for n in 1..=3 {
        let s = e.registered_subnet(n, Duration::from_secs(20));
        let net: ipnet::IpNet = s.parse().unwrap();
        assert_eq!(
            net.prefix_len(),
            64,
            "h{n}: {s} (the IPv6 default is a /64)"
        );
        assert!(
            "fd42::/48".parse::<ipnet::IpNet>().unwrap().contains(&net),
            "h{n}: {s} outside the network cidr"
        );
        let rec: Value = serde_json::from_str(
            e.ctl(&["get", &format!("/mesh/hosts/h{n}"), "--print-value-only"])
                .trim(),
        )
        .unwrap();
        assert_eq!(
            rec["agent_ip"],
            e.host_addr(n).as_str(),
            "h{n}'s record: {rec}"
        );
        e.add_container(n, &s);
        subnets.push(s);
    }
    let mut distinct = subnets.clone();
    distinct.sort();
    distinct.dedup();
    assert_eq!(distinct.len(), 3, "{subnets:?}");
    let all: Vec<usize> = (1..=3).collect();
    e.wait_peers(&all, &all, Duration::from_secs(30));
    let h1 = e.t.ns("h1");
    let fdb = common::sh(&format!("bridge -n {h1} fdb show dev vtep1042"));
    for n in 2..=3 {
        assert!(
            fdb.contains(&format!("dst {} ", e.host_addr(n))),
            "h1's fdb has no IPv6 remote for h{n}: {fdb}"
        );
    }
    for a in 1..=3 {
        for b in (1..=3).filter(|b| *b != a) {
            assert!(
                e.ping(a, &subnets[b - 1]),
                "c{a} -> c{b} ({}) over IPv6 (logs in {})",
                subnets[b - 1],
                e.t.dir.path().display()
            );
        }
    }
    drop(cars);
}

#[test]
#[ignore = "needs root: integration/run.sh runs it as root (--include-ignored)"]
fn dual_stack_auto_gives_each_host_a_24_and_a_64_and_a_restart_keeps_both() {
    // `--subnet auto` on a dual-stack network: one subnet per family (a /24 of the IPv4
    // cidr, a /64 of the IPv6 one), distinct across hosts, guarded, kept by a restart of the
    // same id; an explicit length applies to the IPv4 allocation only.
    require_root!();
    use ipsec_mesh::metadata::etcd::{Client, EtcdUrl, Registrar, Registration, SubnetSpec};
    let e = Etcd::ipv6("ds");
    e.put(
        "/mesh/network",
        r#"{"cidr":["10.42.0.0/16","fd42::/48"],"backend":"ipsec"}"#,
    );
    let url = EtcdUrl::parse(&format!("etcd://{}/mesh", e.endpoints(&[1, 2, 3]))).unwrap();
    let ns = e.t.ns("cl");
    let register = move |url: EtcdUrl, host: String, len: Option<u8>| -> Vec<String> {
        let mut r = Registrar::new(
            Client::new(url).unwrap(),
            Registration {
                host: host.clone(),
                agent_ip: format!("fd78::2{}", &host[1..]).parse().unwrap(),
                subnets: vec![SubnetSpec::Auto(len)],
                ttl: 30,
                guard_ttl: 3600,
            },
        );
        r.register().unwrap();
        r.subnets().unwrap().iter().map(|s| s.to_string()).collect()
    };
    let u = url.clone();
    let got: Vec<Vec<String>> = in_netns(&ns, move || {
        (1..=3)
            .map(|n| register(u.clone(), format!("d{n}"), None))
            .collect()
    });
    let mut all = Vec::new();
    for (i, s) in got.iter().enumerate() {
        assert_eq!(s.len(), 2, "d{}: {s:?} (one per family)", i + 1);
        let (a, b): (ipnet::IpNet, ipnet::IpNet) = (s[0].parse().unwrap(), s[1].parse().unwrap());
        assert!(a.addr().is_ipv4() && a.prefix_len() == 24, "{s:?}");
        assert!(b.addr().is_ipv6() && b.prefix_len() == 64, "{s:?}");
        let rec: Value = serde_json::from_str(
            e.ctl(&[
                "get",
                &format!("/mesh/hosts/d{}", i + 1),
                "--print-value-only",
            ])
            .trim(),
        )
        .unwrap();
        assert_eq!(rec["subnets"], serde_json::json!(s), "d{}'s record", i + 1);
        for net in s {
            let key = format!("/mesh/subnets/{}", net.replace('/', "-"));
            assert_eq!(
                e.ctl(&["get", &key, "--print-value-only"]).trim(),
                format!("d{}", i + 1)
            );
        }
        all.extend(s.clone());
    }
    let n = all.len();
    all.sort();
    all.dedup();
    assert_eq!(all.len(), n, "two hosts share a subnet: {got:?}");
    // A restart of d2 (same id) keeps both; a new host with --auto-subnet-len 26 gets a /26
    // and a /64.
    let (u, u2) = (url.clone(), url);
    let again = in_netns(&ns, move || register(u, "d2".into(), None));
    assert_eq!(again, got[1]);
    let d4 = in_netns(&ns, move || register(u2, "d4".into(), Some(26)));
    assert!(
        d4[0].ends_with("/26") && d4[1].ends_with("/64"),
        "d4 with --auto-subnet-len 26: {d4:?}"
    );
}

#[test]
#[ignore = "needs root: integration/run.sh runs it as root (--include-ignored)"]
fn mutual_tls_the_mesh_works_and_a_client_without_a_valid_certificate_is_told_why() {
    require_root!();
    use ipsec_mesh::metadata::etcd::{Client, EtcdUrl, TlsFiles};
    let mut e = Etcd::with_tls("tl", true);
    e.put(
        "/mesh/network",
        r#"{"cidr":"10.42.0.0/16","backend":"vxlan"}"#,
    );
    let eps = e.endpoints(&[1, 2, 3]);
    let url = format!("etcd://{eps}/mesh");
    let files = |cert: Option<&str>, ca: &str| TlsFiles {
        cacert: Some(e.cert(&format!("{ca}.pem")).into()),
        cert: cert.map(|c| e.cert(&format!("{c}.pem")).into()),
        key: cert.map(|c| e.cert(&format!("{c}.key")).into()),
    };
    let cases = vec![
        ("good", Some(files(Some("client"), "ca"))),
        ("no client certificate", Some(files(None, "ca"))),
        (
            "a certificate of another CA",
            Some(files(Some("stranger"), "ca")),
        ),
        (
            "members not trusted",
            Some(files(Some("client"), "other-ca")),
        ),
        ("plain http", None),
    ];
    let ns = e.t.ns("cl");
    let u = EtcdUrl::parse(&url).unwrap();
    let results: Vec<(&str, Result<usize, String>)> = in_netns(&ns, move || {
        cases
            .into_iter()
            .map(|(name, tls)| {
                let r = Client::with_tls(u.clone(), tls)
                    .map_err(|e| e.to_string())
                    .and_then(|c| {
                        c.list("/mesh/", 1 << 20)
                            .map(|(entries, _)| entries.len())
                            .map_err(|e| e.to_string())
                    });
                (name, r)
            })
            .collect()
    });
    assert_eq!(results[0].1, Ok(1), "{results:#?}");
    for (name, r) in &results[1..] {
        let err = r.clone().expect_err(name);
        // Every endpoint is named with what went wrong.
        for n in 1..=3 {
            assert!(
                err.contains(&format!("{}:2379: ", member_ip(n))),
                "{name}: {err}"
            );
        }
        let why: &[&str] = match *name {
            // The member refuses the client (an alert, or the connection closed under the
            // request: TLS 1.3 finishes the client's handshake before the member checks).
            "no client certificate" | "a certificate of another CA" => &[
                "TLS: received fatal alert",
                "TLS: the member closed the connection right after the handshake",
            ],
            "members not trusted" => &["TLS: invalid peer certificate: UnknownIssuer"],
            _ => &["the member closed the connection without answering ("],
        };
        for n in 1..=3 {
            let part = err
                .split("; ")
                .find(|p| p.contains(&format!("{}:2379: ", member_ip(n))))
                .unwrap_or_else(|| panic!("{name}: endpoint {n} not named: {err}"));
            assert!(why.iter().any(|w| part.contains(w)), "{name}: {part}");
            if *name == "plain http" {
                assert!(
                    part.contains("if it serves https, pass --etcd-cacert"),
                    "{part}"
                );
            }
        }
    }

    // The CLI with the flags, and with the environment (plan, apply, cni-config).
    let (ca, cert, key) = (e.cert("ca.pem"), e.cert("client.pem"), e.cert("client.key"));
    let tls_flags = [
        "--register-ttl",
        "3",
        "--resync",
        "60",
        "--etcd-cacert",
        &ca,
        "--etcd-cert",
        &cert,
        "--etcd-key",
        &key,
    ];
    let mut show = vec!["metadata", "show", "--metadata", &url];
    show.extend(&tls_flags[4..]);
    let (ok, _, err) = e.mesh(&show);
    assert!(!ok, "no host yet");
    assert!(err.contains("the host list is empty"), "{err}");
    let (ok, _, err) = e.mesh(&["metadata", "show", "--metadata", &url, "--etcd-cacert", &ca]);
    assert!(!ok);
    assert!(
        err.contains(&format!("{}:2379: TLS: ", member_ip(1))),
        "{err}"
    );

    // Two sidecars register over mutual TLS and mesh.
    for n in 1..=2 {
        e.add_host(n);
    }
    let mut cars = Sidecars(Vec::new());
    for n in 1..=2 {
        cars.0.push(Some(e.sidecar_with(n, &url, &tls_flags)));
    }
    let s: Vec<String> = (1..=2)
        .map(|n| e.registered_subnet(n, Duration::from_secs(20)))
        .collect();
    for n in 1..=2 {
        e.add_container(n, &s[n - 1]);
    }
    e.wait_peers(&[1, 2], &[1, 2], Duration::from_secs(30));
    assert!(e.ping(1, &s[1]), "c1 -> c2 with metadata over mutual TLS");
    assert!(e.ping(2, &s[0]), "c2 -> c1");

    // A malformed record is left out, and the sidecars say so: /status (JSON and text) by
    // key and why, and a gauge in /metrics; gone again once the record is deleted.
    e.put(
        "/mesh/hosts/bad",
        r#"{"id":"bad","agent_ip":"192.168.78.99","subnet":["10.42.200.0/24"]}"#,
    );
    let status_of = |n: usize, format: &str| {
        let out = Command::new("ip")
            .args(["netns", "exec", &e.t.ns(&format!("h{n}")), BIN, "status"])
            .args(["--format", format])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let metrics_of = |n: usize| {
        in_netns(&e.t.ns(&format!("h{n}")), || {
            use ipsec_mesh::daemon::server::{get, Listen, DEFAULT_LISTEN};
            get(&Listen::parse(DEFAULT_LISTEN), "/metrics").unwrap_or_default()
        })
    };
    let t = Instant::now();
    loop {
        let v: Value = serde_json::from_str(&status_of(1, "json")).unwrap_or(Value::Null);
        let skipped = &v["metadata"]["skipped"];
        if skipped.as_array().is_some_and(|a| !a.is_empty()) {
            assert_eq!(skipped.as_array().unwrap().len(), 1, "{skipped}");
            assert_eq!(skipped[0]["key"], "/mesh/hosts/bad");
            let why = skipped[0]["error"].as_str().unwrap();
            assert!(why.contains("unknown field `subnet`"), "{why}");
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "h1 never showed the record left out: {v}"
        );
        thread::sleep(Duration::from_millis(200));
    }
    let text = status_of(1, "table");
    assert!(
        text.lines()
            .any(|l| l
                .starts_with("metadata record left out: /mesh/hosts/bad: unknown field `subnet`")),
        "{text}"
    );
    let m = metrics_of(1);
    assert!(m.contains("ipsec_mesh_metadata_skipped_records 1\n"), "{m}");
    assert_eq!(e.peers(1), ["h2"], "the good hosts stay");
    e.ctl(&["del", "/mesh/hosts/bad"]);
    let t = Instant::now();
    while !metrics_of(1).contains("ipsec_mesh_metadata_skipped_records 0\n") {
        assert!(t.elapsed() < Duration::from_secs(20), "the gauge stays up");
        thread::sleep(Duration::from_millis(200));
    }
    assert!(!status_of(1, "table").contains("left out"));
    let out = Command::new("ip")
        .args([
            "netns",
            "exec",
            &e.t.ns("cl"),
            BIN,
            "plan",
            "--metadata",
            &url,
            "--host",
            "h1",
        ])
        .env("IPSEC_MESH_ETCD_CACERT", &ca)
        .env("IPSEC_MESH_ETCD_CERT", &cert)
        .env("IPSEC_MESH_ETCD_KEY", &key)
        .env("IPSEC_MESH_LOG", "warn")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.lines().any(|l| l.starts_with("h2 ")), "{text}");
    // The same with the flags instead of the environment (plan, apply and cni-config share
    // them with run), and without either: a TLS error naming the endpoint.
    let (ok, out, err) = e.mesh(&[
        "plan",
        "--metadata",
        &url,
        "--host",
        "h1",
        "--etcd-cacert",
        &ca,
        "--etcd-cert",
        &cert,
        "--etcd-key",
        &key,
    ]);
    assert!(ok, "{err}");
    assert!(out.lines().any(|l| l.starts_with("h2 ")), "{out}");
    let (ok, out, err) = e.mesh(&[
        "cni-config",
        "--metadata",
        &url,
        "--host",
        "h1",
        "--etcd-cacert",
        &ca,
        "--etcd-cert",
        &cert,
        "--etcd-key",
        &key,
    ]);
    assert!(ok, "{err}");
    assert!(out.contains(&s[0]), "h1's subnet {} in {out}", s[0]);
    let (ok, _, err) = e.mesh(&["plan", "--metadata", &url, "--host", "h1"]);
    assert!(!ok);
    assert!(
        err.contains(&format!(
            "{}:2379: the member closed the connection",
            member_ip(1)
        )),
        "{err}"
    );
}

impl Etcd {
    /// Host `n`'s vxlan objects: fdb entries and routes of its VTEP device.
    fn dataplane(&self, n: usize) -> String {
        let h = self.t.ns(&format!("h{n}"));
        let mut s = common::sh(&format!("bridge -n {h} fdb show dev vtep1042"));
        s += &common::sh(&format!("ip -n {h} route show dev vtep1042"));
        s += &common::sh(&format!("ip -n {h} neigh show dev vtep1042"));
        s
    }

    fn log(&self, n: usize) -> String {
        std::fs::read_to_string(self.t.dir.path().join(format!("h{n}.log"))).unwrap_or_default()
    }

    /// Wait until every one of `hosts` reports exactly the peers `want(n)`.
    fn wait_peer_sets(
        &self,
        hosts: &[usize],
        want: impl Fn(usize) -> Vec<String>,
        within: Duration,
    ) {
        let t = Instant::now();
        for &n in hosts {
            let mut expect = want(n);
            expect.sort();
            loop {
                let got = self.peers(n);
                if got == expect {
                    break;
                }
                assert!(
                    t.elapsed() < within,
                    "h{n}: peers {got:?}, expected {expect:?}; log:\n{}",
                    self.log(n)
                );
                thread::sleep(Duration::from_millis(200));
            }
        }
    }
}

/// A host record that no sidecar runs (an address nobody answers on the test underlay).
fn static_host(i: u32) -> String {
    format!(
        r#"{{"id":"x{i}","agent_ip":"192.168.79.{i}","subnets":["10.42.{}.0/24"]}}"#,
        100 + i
    )
}

#[test]
#[ignore = "needs root: integration/run.sh runs it as root (--include-ignored)"]
fn sidecars_ride_out_a_cluster_outage_and_relist_once_after_a_compaction_while_paused() {
    require_root!();
    let mut e = Etcd::new("ot");
    e.put(
        "/mesh/network",
        r#"{"cidr":"10.42.0.0/16","backend":"vxlan"}"#,
    );
    let url = format!("etcd://{}/mesh", e.endpoints(&[1, 2, 3]));
    for n in 1..=3 {
        e.add_host(n);
    }
    let mut cars = Sidecars(Vec::new());
    for n in 1..=3 {
        cars.0.push(Some(e.sidecar_with(
            n,
            &url,
            &["--register-ttl", "300", "--resync", "10"],
        )));
    }
    let s: Vec<String> = (1..=3)
        .map(|n| e.registered_subnet(n, Duration::from_secs(20)))
        .collect();
    for n in 1..=3 {
        e.add_container(n, &s[n - 1]);
    }
    let hosts = |extra: &[String]| {
        let extra = extra.to_vec();
        move |n: usize| {
            let mut v: Vec<String> = (1..=3)
                .filter(|m| *m != n)
                .map(|m| format!("h{m}"))
                .collect();
            v.extend(extra.iter().cloned());
            v
        }
    };
    e.wait_peer_sets(&[1, 2, 3], hosts(&[]), Duration::from_secs(30));

    // The whole cluster down for 60 s: the dataplane stays as it was and keeps working.
    let before: Vec<String> = (1..=3).map(|n| e.dataplane(n)).collect();
    for n in 1..=3 {
        e.kill9(n);
    }
    let down = Instant::now();
    while down.elapsed() < Duration::from_secs(60) {
        thread::sleep(Duration::from_secs(10));
        for n in 1..=3 {
            assert_eq!(
                e.dataplane(n),
                before[n - 1],
                "h{n}'s dataplane changed during the outage"
            );
        }
        assert!(e.ping(1, &s[1]), "c1 -> c2 during the outage");
    }
    for n in 1..=3 {
        assert!(
            e.log(n).contains("keeping the last good state"),
            "h{n}: {}",
            e.log(n)
        );
    }
    // Up again: a change made through the restarted cluster is applied everywhere.
    for n in 1..=3 {
        e.start(n);
    }
    e.wait_healthy(3);
    e.put("/mesh/hosts/x1", &static_host(1));
    e.wait_peer_sets(
        &[1, 2, 3],
        hosts(&["x1".to_string()]),
        Duration::from_secs(40),
    );

    // h3's sidecar paused; every member restarted meanwhile (its watch connection is gone),
    // 50 changes and a compaction; resumed, it lists again once and converges exactly.
    let pid = cars.0[2].as_ref().unwrap().id() as libc::pid_t;
    // SAFETY: kill(2) on the pid of our own child process.
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    for n in 1..=3 {
        e.kill9(n);
        e.start(n);
        e.wait_healthy(3);
    }
    for i in 10..40 {
        e.put(&format!("/mesh/hosts/x{i}"), &static_host(i));
    }
    for i in 10..30 {
        e.ctl(&["del", &format!("/mesh/hosts/x{i}")]);
    }
    let rev = e.revision();
    e.ctl(&["compact", &rev.to_string()]);
    let mut extra: Vec<String> = vec!["x1".to_string()];
    extra.extend((30..40).map(|i| format!("x{i}")));
    e.wait_peer_sets(&[1, 2], hosts(&extra), Duration::from_secs(30));
    // SAFETY: as above.
    unsafe { libc::kill(pid, libc::SIGCONT) };
    e.wait_peer_sets(&[3], hosts(&extra), Duration::from_secs(30));
    let fdb = common::sh(&format!("bridge -n {} fdb show dev vtep1042", e.t.ns("h3")));
    for i in 30..40 {
        assert!(
            fdb.contains(&format!("192.168.79.{i} ")),
            "x{i} not in h3's fdb: {fdb}"
        );
    }
    assert!(
        !fdb.contains("192.168.79.10 "),
        "x10 (deleted) still in h3's fdb: {fdb}"
    );
    // No retry loop: one re-list, and nothing more a while later.
    thread::sleep(Duration::from_secs(5));
    let log = e.log(3);
    let relists = log
        .matches("the resume revision was compacted; listing again")
        .count();
    assert_eq!(relists, 1, "h3 log:\n{log}");
}

#[test]
#[ignore = "needs root: integration/run.sh runs it as root (--include-ignored)"]
fn three_registered_hosts_mesh_with_the_charon_driver() {
    require_root!();
    use std::os::unix::fs::PermissionsExt;
    common::require_program(common::CHARON, "charon-systemd");
    let mut e = Etcd::new("cd");
    // The ipsec backend: charon negotiates IKEv2 with the PSK, libipsec carries ESP.
    e.put("/cmesh/network", r#"{"cidr":"10.42.0.0/16"}"#);
    let url = format!("etcd://{}/cmesh", e.endpoints(&[1, 2, 3]));
    let psk = e.t.dir.path().join("psk");
    std::fs::write(&psk, "a-test-only-psk-that-is-long-enough-0123456789").unwrap();
    std::fs::set_permissions(&psk, std::fs::Permissions::from_mode(0o600)).unwrap();
    // Count on the underlay switch what crosses it: ESP in UDP, and any plaintext overlay.
    let sw = e.t.ns("sw");
    common::sh(&format!(
        "ip netns exec {sw} sysctl -qw net.bridge.bridge-nf-call-iptables=1 && \
         ip netns exec {sw} iptables -w -A FORWARD -p udp --dport 4500 && \
         ip netns exec {sw} iptables -w -A FORWARD -s 10.42.0.0/16 && \
         ip netns exec {sw} iptables -w -A FORWARD -d 10.42.0.0/16"
    ));
    let counters = || -> Vec<u64> {
        common::sh(&format!("ip netns exec {sw} iptables -w -nvxL FORWARD"))
            .lines()
            .skip(2)
            .map(|l| l.split_whitespace().next().unwrap().parse().unwrap())
            .collect()
    };
    let mut charons = Sidecars(Vec::new());
    let mut cars = Sidecars(Vec::new());
    for n in 1..=3 {
        e.add_host(n);
        e.add_container(n, &format!("10.42.{n}.0/24"));
        let dir = e.t.dir.path().join(format!("h{n}"));
        std::fs::create_dir_all(&dir).unwrap();
        let conf = common::write_charon_conf(&dir, "strongswan-libipsec.conf");
        charons
            .0
            .push(Some(common::charon_start(&e.t.ns(&format!("h{n}")), &conf)));
    }
    for n in 1..=3 {
        let dir = e.t.dir.path().join(format!("h{n}"));
        let log = File::create(e.t.dir.path().join(format!("h{n}.log"))).unwrap();
        cars.0.push(Some(
            Command::new("ip")
                .args(["netns", "exec", &e.t.ns(&format!("h{n}")), BIN, "run"])
                .args(["--metadata", &url, "--host", &format!("h{n}")])
                .args(["--driver", "charon", "--resync", "30"])
                .arg("--vici-socket")
                .arg(dir.join("charon.vici"))
                .arg("--psk-file")
                .arg(&psk)
                .args(["--register", "--agent-ip", &Etcd::host_ip(n)])
                .args([
                    "--subnet",
                    &format!("10.42.{n}.0/24"),
                    "--register-ttl",
                    "30",
                ])
                .env("IPSEC_MESH_LOG", "info")
                .stdin(Stdio::null())
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .spawn()
                .unwrap(),
        ));
    }
    let t = Instant::now();
    for a in 1..=3 {
        for b in (1..=3).filter(|b| *b != a) {
            let dst = format!("10.42.{b}.0/24");
            while !e.ping(a, &dst) {
                assert!(
                    t.elapsed() < Duration::from_secs(60),
                    "c{a} -> c{b} over charon never pinged; h{a} log:\n{}",
                    e.log(a)
                );
            }
        }
    }
    e.wait_peers(&[1, 2, 3], &[1, 2, 3], Duration::from_secs(10));
    let c = counters();
    assert!(c[0] > 0, "no ESP-in-UDP crossed the switch: {c:?}");
    assert_eq!(
        c[1] + c[2],
        0,
        "plaintext overlay packets crossed the switch: {c:?}"
    );
}

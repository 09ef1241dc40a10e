//! The rancher-metadata source against the shared fake server (tests/common/rancher.rs: it
//! behaves like the real rancher-metadata, and its module doc lists which real behaviours it
//! copies), serving the recorded environment (tests/fixtures/rancher) or generated
//! Rancher-shaped ones. Expected subnets come from `Env::expected_subnets` (Rancher's rules
//! stated on the environment), not from the adapter.

#[allow(unused_imports)] // common re-exports helpers this suite does not use
mod common;

use std::collections::HashSet;
use std::net::{IpAddr, TcpListener};
use std::thread;
use std::time::{Duration, Instant};

use common::rancher::{fixture_json, Env, FakeRancher, Gen, RawClient, Reply, Rng, PREFIX, TICK};
use ipnet::IpNet;
use ipsec_mesh::metadata::rancher::{RancherSource, WAIT_GRACE};
use ipsec_mesh::metadata::{self, json, MetadataError, MetadataSource, Snapshot};
use ipsec_mesh::model::{Backend, Invalid};
use serde_json::Value;

const JSON: Option<&str> = Some("application/json");

fn source(server: &FakeRancher) -> RancherSource {
    RancherSource::new(&server.base()).unwrap()
}

fn subnets_of(snap: &Snapshot, id: &str) -> Vec<IpNet> {
    let mut v = snap
        .cluster
        .host(id)
        .unwrap_or_else(|| panic!("no host {id}"))
        .subnets
        .clone();
    v.sort();
    v
}

/// Every host of `env` is in the snapshot with its agent_ip and the subnets Rancher's rules
/// give it, and there are no others.
fn assert_maps_as_rancher_would(env: &Env, snap: &Snapshot) {
    assert_eq!(snap.cluster.hosts.len(), env.hosts.len());
    for uuid in env.host_uuids() {
        let h = snap
            .cluster
            .host(&uuid)
            .unwrap_or_else(|| panic!("host {uuid} missing"));
        assert_eq!(
            h.agent_ip.to_string(),
            env.host(&uuid)["agent_ip"],
            "{uuid}"
        );
        assert_eq!(
            subnets_of(snap, &uuid),
            env.expected_subnets(&uuid),
            "{uuid}"
        );
    }
}

/// A rancher-metadata version: a random UUID.
fn assert_uuid(v: &str) {
    let parts: Vec<&str> = v.split('-').collect();
    assert_eq!(
        parts.iter().map(|p| p.len()).collect::<Vec<_>>(),
        [8, 4, 4, 4, 12],
        "{v:?}"
    );
    assert!(
        v.chars().all(|c| c == '-' || c.is_ascii_hexdigit()),
        "{v:?}"
    );
}

fn sleep_until(t: Instant) {
    if let Some(d) = t.checked_duration_since(Instant::now()) {
        thread::sleep(d);
    }
}

/// The address of the container named `name`.
fn address(env: &Env, name: &str) -> IpAddr {
    env.container(name)["primary_ip"]
        .as_str()
        .unwrap_or_else(|| panic!("{name} has no address"))
        .parse()
        .unwrap()
}

/// Whether the snapshot routes `name`'s address to its host.
fn counted(env: &Env, snap: &Snapshot, name: &str) -> bool {
    let host = env.container(name)["host_uuid"].as_str().unwrap();
    let a = address(env, name);
    subnets_of(snap, host).iter().any(|n| n.contains(&a))
}

fn uuids(body: &str) -> Vec<String> {
    let v: Vec<Value> = serde_json::from_str(body).unwrap();
    v.iter()
        .map(|x| x["uuid"].as_str().unwrap().to_string())
        .collect()
}

// ------------------------------------------------------------------------------------------
// Mapping.
// ------------------------------------------------------------------------------------------

#[test]
fn load_maps_the_fixture_as_rancher_would() {
    let env = Env::fixture();
    let server = FakeRancher::start(env.clone());
    let mut src = source(&server);
    assert_eq!(src.origin(), server.base());
    let snap = src.load().unwrap();

    assert_eq!(snap.version, server.version());
    assert_uuid(&snap.version);
    assert_eq!(snap.self_id.as_ref().unwrap().as_str(), env.self_uuid());
    let managed = env
        .networks
        .iter()
        .find(|n| n["uuid"] == env.managed_network().as_str())
        .unwrap();
    let cni = &managed["metadata"]["cniConfig"]["10-rancher.conf"];
    let net = &snap.cluster.network;
    assert_eq!(net.cidr().to_string(), cni["bridgeSubnet"]);
    assert_eq!(net.backend, Backend::Ipsec);
    assert_eq!(
        u64::from(net.mtu),
        cni["mtu"].as_u64().unwrap(),
        "mtu comes from the network's cniConfig"
    );
    assert_maps_as_rancher_would(&env, &snap);
    let node1 = env.host_uuid("rancher-node-1");
    let h1 = snap.cluster.host(&node1).unwrap();
    assert_eq!(h1.name.as_deref(), Some("rancher-node-1"));
    assert_eq!(h1.labels.get("zone").map(String::as_str), Some("a"));

    // What each recorded container is there for.
    for (name, live) in [
        ("ipsec-ipsec-1", true),             // the network agent
        ("healthcheck-healthcheck-1", true), // a system container on the managed network
        ("shop-web-1", true),                // running
        ("shop-web-4", true),                // starting, with an address
        ("shop-worker-1", true),             // stopping: still has traffic
        ("nightly-batch-1", false),          // stopped
        ("nightly-report-1", false),         // stopped
        ("legacy-app-1", false),             // on the bridge network
        ("ipsec-cni-driver-1", false),       // on the host network (the host's address)
    ] {
        assert_eq!(counted(&env, &snap, name), live, "{name}");
    }
    // Sidekicks sharing the agent's network namespace have no address of their own, and a
    // starting container may have none yet.
    assert!(env.container("ipsec-router-1")["primary_ip"].is_null());
    assert_eq!(env.container("shop-web-3")["primary_ip"], "");
    // Random /32s: the fixture's addresses of one host are not one block.
    let a1 = env.live_addresses(&node1);
    assert!(a1.len() >= 5, "{a1:?}");
    assert!(subnets_of(&snap, &node1).len() >= a1.len() - 1, "{a1:?}");

    // The recorded /self/host is what the server answers: the caller's host without hostId.
    assert_eq!(env.self_host_answer(), Some(fixture_json("self_host.json")));
    assert!(env.host(&node1).get("hostId").is_some());

    // The version was read first, and every request asked for JSON.
    let seen = server.seen();
    assert_eq!(seen[0].target, format!("{PREFIX}/version"));
    for path in ["/self/host", "/hosts", "/containers", "/networks"] {
        assert!(
            seen.iter().any(|s| s.target == format!("{PREFIX}{path}")),
            "{path} not requested: {seen:?}"
        );
    }
    assert!(
        seen.iter()
            .all(|s| s.accept.as_deref() == Some("application/json")),
        "{seen:?}"
    );
}

#[test]
fn open_picks_the_rancher_source_for_http_urls() {
    let env = Env::fixture();
    let server = FakeRancher::start(env.clone());
    let mut src = metadata::open(&server.base()).unwrap();
    let snap = src.load().unwrap();
    assert_eq!(snap.self_id.unwrap().as_str(), env.self_uuid());
}

#[test]
fn the_fake_answers_on_the_wire_as_the_real_server_does() {
    let env = Env::fixture();
    let server = FakeRancher::start(env.clone());
    // One keep-alive connection for everything.
    let mut c = RawClient::connect(server.addr());
    let v = c.get(&format!("{PREFIX}/version"), JSON);
    assert_eq!(v.status, 200);
    assert_eq!(v.header("content-type"), Some("text/plain; charset=utf-8"));
    assert_eq!(v.body, format!("\"{}\"", server.version()));
    let t = c.get(&format!("{PREFIX}/version"), None);
    assert_eq!(t.body, server.version(), "text answers are bare");

    // Up to 2 KiB with a length, larger chunked, as Go's net/http sends them.
    let hosts = c.get(&format!("{PREFIX}/hosts"), JSON);
    assert!(hosts.body.len() <= 2048);
    let len = hosts.body.len().to_string();
    assert_eq!(hosts.header("content-length"), Some(len.as_str()));
    let containers = c.get(&format!("{PREFIX}/containers"), JSON);
    assert!(containers.body.len() > 2048);
    assert_eq!(containers.header("transfer-encoding"), Some("chunked"));
    assert_eq!(containers.body, server.served("/containers"));
    assert_eq!(
        hosts.header("content-type"),
        Some("text/plain; charset=utf-8")
    );
    assert!(!hosts.body.contains('\n'), "compact JSON");
    let served: Vec<Value> = serde_json::from_str(&hosts.body).unwrap();
    assert_eq!(served.len(), env.hosts.len());
    assert!(served.iter().all(|h| h["hostId"].is_u64()), "{served:?}");
    let listing = c.get(&format!("{PREFIX}/hosts"), None);
    let want: String = served
        .iter()
        .enumerate()
        .map(|(i, h)| format!("{i}={}\n", h["name"].as_str().unwrap()))
        .collect();
    assert_eq!(listing.body, want, "the text listing names the elements");
    let v3: Vec<Value> = serde_json::from_str(&c.get("/2016-07-29/hosts", JSON).body).unwrap();
    assert!(v3.iter().all(|h| h.get("hostId").is_none()), "{v3:?}");

    let me = c.get(&format!("{PREFIX}/self/host"), JSON);
    assert_eq!(
        me.header("content-length"),
        Some(me.body.len().to_string().as_str())
    );
    let me: Value = serde_json::from_str(&me.body).unwrap();
    assert!(me.get("hostId").is_none());
    assert_eq!(me["uuid"], env.self_uuid().as_str());
    let ip = c.get(&format!("{PREFIX}/self/host/agent_ip"), None);
    assert_eq!(ip.body, me["agent_ip"].as_str().unwrap());

    let nf = c.get(&format!("{PREFIX}/no-such-key"), JSON);
    assert_eq!(nf.status, 404);
    assert_eq!(
        nf.body,
        "{\"code\":404,\"message\":\"Not found\",\"type\":\"error\"}\n"
    );
    let iv = c.get("/1999-01-01/hosts", None);
    assert_eq!((iv.status, iv.body.as_str()), (404, "Invalid version\n"));

    // A reload: a new version, every answer in a new order, the same content.
    let v0 = server.version();
    let before = c.get(&format!("{PREFIX}/containers"), JSON).body;
    let v1 = server.reload(|_| {});
    assert_ne!(v1, v0);
    assert_uuid(&v1);
    let after = c.get(&format!("{PREFIX}/containers"), JSON).body;
    let (b, a) = (uuids(&before), uuids(&after));
    assert_ne!(b, a, "the order changed");
    let (mut bs, mut as_) = (b.clone(), a.clone());
    bs.sort();
    as_.sort();
    assert_eq!(bs, as_, "the same containers");
    // An outage is not a reload: the version stays.
    server.down();
    assert!(std::net::TcpStream::connect(server.addr()).is_err());
    server.up();
    assert_eq!(server.version(), v1);
}

#[test]
fn a_reload_reorders_the_answers_and_the_snapshot_stays_the_same() {
    let server = FakeRancher::start(Env::generate(&Gen::new(21, 30, 12)));
    let mut src = source(&server);
    let first = src.load().unwrap();
    let mut orders = HashSet::new();
    orders.insert(uuids(&server.served("/containers")));
    let mut versions = HashSet::from([first.version.clone()]);
    for _ in 0..4 {
        let v = server.reload(|_| {});
        assert!(
            versions.insert(v.clone()),
            "every reload makes a new version"
        );
        orders.insert(uuids(&server.served("/containers")));
        let snap = src.load().unwrap();
        assert_eq!(snap.version, v);
        assert!(
            snap.cluster == first.cluster,
            "the order of the answers changed the cluster"
        );
    }
    assert_eq!(orders.len(), 5, "every reload served a new order");
}

#[test]
fn sidekicks_sharing_a_network_namespace_count_once_in_either_shape() {
    let env = Env::fixture();
    let sidekicks = env
        .containers
        .iter()
        .filter(|c| {
            c["network_from_container_uuid"]
                .as_str()
                .is_some_and(|s| !s.is_empty())
        })
        .count();
    assert_eq!(sidekicks, env.hosts.len(), "one router sidekick per host");
    let server = FakeRancher::start(env);
    // Rancher 1.6's shape: primary_ip null on the "container" network.
    let real = source(&server).load().unwrap();
    // The shape of older recordings: the parent's address on the managed network.
    server.reload(|e| {
        let managed = e.managed_network();
        let parents = e.containers.clone();
        for c in e.containers.iter_mut() {
            let from = c["network_from_container_uuid"]
                .as_str()
                .unwrap_or("")
                .to_string();
            if from.is_empty() {
                continue;
            }
            let p = parents.iter().find(|p| p["uuid"] == from.as_str()).unwrap();
            c["primary_ip"] = p["primary_ip"].clone();
            c["ips"] = p["ips"].clone();
            c["network_uuid"] = managed.clone().into();
        }
    });
    let old = source(&server).load().unwrap();
    assert!(
        old.cluster == real.cluster,
        "{:?}\n{:?}",
        old.cluster,
        real.cluster
    );
}

#[test]
fn a_generated_environment_maps_every_host_as_rancher_would() {
    for g in [Gen::new(7, 40, 12), Gen::new(8, 40, 12).legacy_agents()] {
        let env = Env::generate(&g);
        assert!(
            env == Env::generate(&g),
            "the same seed, the same environment"
        );
        let count = |f: &dyn Fn(&Value) -> bool| env.containers.iter().filter(|c| f(c)).count();
        let s = |c: &Value, k: &str| c[k].as_str().unwrap_or("").to_string();
        let state = |st: &'static str| move |c: &Value| c["state"] == st;
        // It has what Rancher environments have.
        assert_eq!(env.hosts.len(), g.hosts);
        assert_eq!(env.containers.len(), g.hosts * g.per_host, "{g:?}");
        let agents = count(&|c| {
            c["system"] == true
                && (c["labels"]["io.rancher.network.macsync"] == "true"
                    || c["labels"]["io.rancher.container.system"] == "NetworkAgent")
        });
        assert_eq!(agents, g.hosts, "one network agent per host ({g:?})");
        let sidekicks = count(&|c| {
            !s(c, "network_from_container_uuid").is_empty() && c["primary_ip"].is_null()
        });
        let bridge = env.network_uuid("bridge");
        let on_bridge = count(&|c| s(c, "network_uuid") == bridge);
        let no_ip = count(&|c| c["state"] == "starting" && s(c, "primary_ip").is_empty());
        for (what, n) in [
            ("sidekicks", sidekicks),
            ("stopped", count(&state("stopped"))),
            ("stopping", count(&state("stopping"))),
            ("starting", count(&state("starting"))),
            ("starting without an address", no_ip),
            ("on the bridge network", on_bridge),
        ] {
            assert!(n > 0, "no {what} in {g:?}");
        }
        assert!(env.containers.iter().all(|c| c["links"].is_null()));
        // Managed-network addresses: /32s drawn across the /16, never twice.
        let managed = env.managed_network();
        let addrs: Vec<String> = env
            .containers
            .iter()
            .filter(|c| s(c, "network_uuid") == managed && !s(c, "primary_ip").is_empty())
            .map(|c| s(c, "primary_ip"))
            .collect();
        let unique: HashSet<&String> = addrs.iter().collect();
        assert_eq!(unique.len(), addrs.len(), "an address given twice");
        let blocks: HashSet<&str> = addrs
            .iter()
            .map(|a| a.rsplit_once('.').unwrap().0)
            .collect();
        // As uniform draws fill the /16's 256 /24s (not one block per host).
        let uniform = 256.0 * (1.0 - (255.0f64 / 256.0).powi(addrs.len() as i32));
        assert!(
            blocks.len() as f64 > 0.9 * uniform,
            "{} addresses in {} /24s (uniform: {uniform:.0})",
            addrs.len(),
            blocks.len()
        );

        let server = FakeRancher::start(env.clone());
        let snap = source(&server).load().unwrap();
        assert_eq!(snap.self_id.as_ref().unwrap().as_str(), env.self_uuid());
        assert_maps_as_rancher_would(&server.env(), &snap);
        let p = ipsec_mesh::plan::plan(
            &snap.cluster,
            &env.self_uuid(),
            &ipsec_mesh::plan::PlanOptions::default(),
            None,
        )
        .unwrap();
        assert_eq!(p.peers.len(), g.hosts - 1);

        // Every host's VTEP is its network agent's address, never a workload's (issue 13:
        // the first address of a host's first subnet is a container's under Rancher's
        // addressing, and once became the VTEP).
        let is_agent = |c: &Value| {
            c["system"] == true
                && (c["labels"]["io.rancher.network.macsync"] == "true"
                    || c["labels"]["io.rancher.container.system"] == "NetworkAgent")
        };
        let workloads: HashSet<String> = env
            .containers
            .iter()
            .filter(|c| env.is_live_address(c) && !is_agent(c))
            .map(|c| s(c, "primary_ip"))
            .collect();
        for h in &snap.cluster.hosts {
            let agent = env
                .containers
                .iter()
                .find(|c| is_agent(c) && s(c, "host_uuid") == h.id.as_str())
                .unwrap();
            let vtep = h.vtep.map(|v| v.to_string());
            assert_eq!(vtep, Some(s(agent, "primary_ip")), "host {}", h.id);
            assert!(!workloads.contains(&vtep.unwrap()), "host {}", h.id);
            let first = h.subnets[0].network().to_string();
            if workloads.contains(&first) {
                assert_ne!(h.vtep.map(|v| v.to_string()), Some(first));
            }
        }
        assert!(
            snap.cluster
                .hosts
                .iter()
                .any(|h| workloads.contains(&h.subnets[0].network().to_string())),
            "the environment has the case that once broke: a host whose first subnet \
             starts with a workload's address"
        );
    }
}

#[test]
fn stopping_containers_still_count_as_rancher_does() {
    let env = Env::fixture();
    let server = FakeRancher::start(env.clone());
    // plugin-manager's IsContainerConsideredRunning: running, starting, stopping.
    for (state, live) in [("stopping", true), ("stopped", false), ("running", true)] {
        server.reload(|e| e.container_mut("nightly-batch-1")["state"] = state.into());
        let snap = source(&server).load().unwrap();
        assert_eq!(counted(&env, &snap, "nightly-batch-1"), live, "{state}");
        assert_maps_as_rancher_would(&server.env(), &snap);
    }
}

#[test]
fn a_4500_host_environment_is_decoded_as_it_arrives_and_the_limit_is_a_setting() {
    let t = Instant::now();
    let server = FakeRancher::start(Env::generate(&Gen::new(4500, 4_500, 10)));
    let generated = t.elapsed();
    let (hosts_len, containers_len) = (
        server.served("/hosts").len(),
        server.served("/containers").len(),
    );
    assert!(
        containers_len > 64 << 20,
        "the answer ({containers_len} bytes) is above the old fixed 64 MiB limit"
    );
    let t = Instant::now();
    let snap = source(&server).load().unwrap();
    eprintln!(
        "4,500 hosts x 10 containers (generated in {:.1} s): /hosts {:.1} MB, \
         /containers {:.1} MB, loaded in {:.2} s",
        generated.as_secs_f64(),
        hosts_len as f64 / 1e6,
        containers_len as f64 / 1e6,
        t.elapsed().as_secs_f64()
    );
    let me = server.with_env(|env| {
        assert_eq!(snap.cluster.hosts.len(), env.hosts.len());
        for uuid in env.host_uuids().iter().step_by(500) {
            assert_eq!(
                subnets_of(&snap, uuid),
                env.expected_subnets(uuid),
                "{uuid}"
            );
        }
        // Random /32s barely aggregate.
        let live = env
            .containers
            .iter()
            .filter(|c| env.is_live_address(c))
            .count();
        let subnets: usize = snap.cluster.hosts.iter().map(|h| h.subnets.len()).sum();
        assert!(
            subnets * 100 > live * 95,
            "{subnets} subnets for {live} addresses"
        );
        env.self_uuid()
    });
    // Planning the whole mesh for the self host works.
    let p = ipsec_mesh::plan::plan(
        &snap.cluster,
        &me,
        &ipsec_mesh::plan::PlanOptions::default(),
        None,
    )
    .unwrap();
    assert_eq!(p.peers.len(), 4_499);

    // Below the answer's size: a clear error naming the setting, no partial state.
    let mut src = source(&server);
    src.set_body_limit(16 << 20);
    let e = src.load().unwrap_err().to_string();
    assert!(
        e.contains("/containers") && e.contains("larger than 16 MiB (--metadata-max-mb)"),
        "{e}"
    );
}

// ------------------------------------------------------------------------------------------
// The long-poll.
// ------------------------------------------------------------------------------------------

/// Wait until the server holds a long-poll (its `n`-th).
fn wait_for_poll(server: &FakeRancher, n: usize) {
    let t0 = Instant::now();
    while server
        .seen()
        .iter()
        .filter(|s| s.target.contains("wait=true"))
        .count()
        < n
    {
        assert!(t0.elapsed() < Duration::from_secs(10), "no long-poll seen");
        thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn long_poll_returns_promptly_on_a_reload() {
    let env = Env::fixture();
    let node1 = env.host_uuid("rancher-node-1");
    let node3 = env.host_uuid("rancher-node-3");
    let server = FakeRancher::start(env);
    let mut src = source(&server);
    let snap = src.load().unwrap();

    let v0 = snap.version.clone();
    let v = v0.clone();
    let waiter = thread::spawn(move || {
        let r = src.wait_for_change(&v, Duration::from_secs(20));
        (r, src)
    });
    wait_for_poll(&server, 1);
    thread::sleep(Duration::from_millis(200));
    assert!(
        !waiter.is_finished(),
        "the long-poll returned before any change"
    );

    // node-3's containers are gone, a stopped container starts on node-1.
    let t = Instant::now();
    let v1 = server.reload(|e| {
        e.containers.retain(|c| c["host_uuid"] != node3.as_str());
        e.container_mut("nightly-batch-1")["state"] = "running".into();
    });
    let (r, mut src) = waiter.join().unwrap();
    assert_eq!(r.unwrap(), Some(v1.clone()));
    assert!(
        t.elapsed() < Duration::from_secs(1),
        "answered {:?} after the reload, not on it",
        t.elapsed()
    );
    let wait = server
        .seen()
        .into_iter()
        .find(|s| s.target.contains("wait=true"))
        .unwrap();
    assert_eq!(
        wait.target,
        format!("{PREFIX}/version?wait=true&value={v0}&maxWait=20")
    );

    let snap = src.load().unwrap();
    assert_eq!(snap.version, v1);
    let env = server.env();
    assert_maps_as_rancher_would(&env, &snap);
    assert!(counted(&env, &snap, "nightly-batch-1"));
    assert!(
        subnets_of(&snap, &node3).is_empty(),
        "a host without containers has no subnets"
    );
    assert!(!subnets_of(&snap, &node1).is_empty());
}

#[test]
fn long_poll_without_a_change_is_held_until_the_servers_tick() {
    let server = FakeRancher::start(Env::fixture());
    let mut src = source(&server);
    let v = server.version();
    // Just after a tick the next is TICK away: a poll for 1 s is held until then.
    sleep_until(server.next_tick() + Duration::from_millis(50));
    let t = Instant::now();
    let r = src.wait_for_change(&v, Duration::from_secs(1)).unwrap();
    let took = t.elapsed();
    assert_eq!(r, None);
    assert!(
        took > TICK - Duration::from_millis(300) && took < TICK + Duration::from_millis(500),
        "maxWait=1 held {took:?}"
    );
    let poll = server.seen().pop().unwrap();
    assert_eq!(poll.max_wait, Some(Duration::from_secs(1)));
    assert!(poll.held.unwrap() <= took, "{poll:?}");
}

/// The real server answers a quiet poll on the first tick after `maxWait` has passed, so
/// one that arrives just under `maxWait` before a tick is held `maxWait` + 5 s, and a busy
/// server answers later still. The client gives a long-poll `maxWait` + `WAIT_GRACE`; with
/// `WAIT_GRACE` = 5 s (the tick itself, no room beyond it) any delay turns a quiet poll into
/// a failed watch (a warning, a backoff and a full reload in the sidecar). Here the server
/// answers 1 s late: the client must still take the answer.
#[test]
fn a_poll_held_as_long_as_the_real_server_holds_one_is_not_a_timeout() {
    const LATE: Duration = Duration::from_secs(1);
    let server = FakeRancher::start(Env::fixture());
    server.set_answer_delay(LATE);
    let mut src = source(&server);
    let v = server.version();
    let max_wait = Duration::from_secs(1);
    // Arrive 0.98 s before a tick: at that tick 0.98 s have passed (not over 1 s), so the
    // poll is answered at the next one.
    let mut tick = server.next_tick();
    while tick
        .checked_duration_since(Instant::now())
        .unwrap_or_default()
        < max_wait
    {
        tick += TICK;
    }
    sleep_until(tick - max_wait + Duration::from_millis(20));
    let t = Instant::now();
    let r = src.wait_for_change(&v, max_wait);
    let took = t.elapsed();
    sleep_until(t + max_wait + TICK + LATE + Duration::from_millis(300));
    let poll = server.seen().pop().unwrap();
    let held = poll.held.expect("the server answered the poll");
    assert!(
        held > max_wait + TICK - Duration::from_millis(100)
            && held < max_wait + TICK + Duration::from_millis(500),
        "the server held it {held:?}"
    );
    assert!(
        matches!(r, Ok(None)),
        "a quiet poll the server held {held:?} and answered {LATE:?} later failed after \
         {took:?}: {r:?} (the client waits maxWait + WAIT_GRACE = {:?}; it must leave room \
         for the server's {TICK:?} tick and a late answer)",
        max_wait + WAIT_GRACE
    );
}

#[test]
fn long_poll_max_wait_is_applied_as_the_real_server_does() {
    let server = FakeRancher::start(Env::fixture());
    let v = server.version();
    let mut c = RawClient::connect(server.addr());
    let secs = |s: u64| Some(Duration::from_secs(s));
    for (asked, applied) in [
        ("0", secs(60)),
        ("abc", secs(60)),
        ("7", secs(7)),
        ("120", secs(120)),
        ("121", secs(120)),
        ("3600", secs(120)),
        ("-1", None),
    ] {
        // A stale value is answered at once, whatever the maxWait.
        let r = c.get(
            &format!("{PREFIX}/version?wait=true&value=stale&maxWait={asked}"),
            JSON,
        );
        assert_eq!(r.body, format!("\"{v}\""));
        assert_eq!(
            server.seen().pop().unwrap().max_wait,
            applied,
            "maxWait={asked}"
        );
    }
    // A negative maxWait is over at once, also for the current version; without a value it
    // is not a long-poll at all.
    for q in [format!("value={v}&maxWait=-1"), "maxWait=30".to_string()] {
        let t = Instant::now();
        let r = c.get(&format!("{PREFIX}/version?wait=true&{q}"), JSON);
        assert_eq!(r.body, format!("\"{v}\""));
        assert!(t.elapsed() < Duration::from_secs(1), "{q}");
    }
    // The client asks whole seconds, at least 1 and at most what the server honours.
    let mut src = source(&server);
    for (wait, asked) in [
        (Duration::from_millis(200), "1"),
        (Duration::from_millis(1500), "2"),
        (Duration::from_secs(200), "120"),
    ] {
        assert_eq!(src.wait_for_change("stale", wait).unwrap(), Some(v.clone()));
        let poll = server.seen().pop().unwrap();
        assert!(
            poll.target.ends_with(&format!("&maxWait={asked}")),
            "{poll:?}"
        );
    }
}

#[test]
fn long_poll_with_a_stale_version_returns_at_once_and_encodes_the_value() {
    let server = FakeRancher::start(Env::fixture());
    let mut src = source(&server);
    let t = Instant::now();
    let r = src
        .wait_for_change("30 old&x", Duration::from_secs(30))
        .unwrap();
    assert!(t.elapsed() < Duration::from_secs(2));
    assert_eq!(r, Some(server.version()));
    let seen = server.seen();
    assert_eq!(
        seen[0].target,
        format!("{PREFIX}/version?wait=true&value=30%20old%26x&maxWait=30")
    );
}

/// One random change of a Rancher environment (containers stop, start, move through their
/// states, appear with a fresh address; a host leaves). Returns what changed.
fn random_change(e: &mut Env, rng: &mut Rng) -> String {
    (0..20)
        .find_map(|_| try_change(e, rng))
        .expect("no change possible")
}

/// A random user container's name among those `f` accepts.
fn pick(e: &Env, rng: &mut Rng, f: &dyn Fn(&Value) -> bool) -> Option<String> {
    let names: Vec<String> = e
        .containers
        .iter()
        .filter(|c| c["system"] == false && f(c))
        .map(|c| c["name"].as_str().unwrap().to_string())
        .collect();
    (!names.is_empty()).then(|| names[rng.below(names.len())].clone())
}

fn try_change(e: &mut Env, rng: &mut Rng) -> Option<String> {
    fn set_state(e: &mut Env, rng: &mut Rng, from: &str, to: &str) -> Option<String> {
        let name = pick(e, rng, &|c| c["state"] == from)?;
        e.container_mut(&name)["state"] = to.into();
        Some(format!("{name}: {from} -> {to}"))
    }
    match rng.below(6) {
        0 => set_state(e, rng, "running", "stopping"),
        1 => set_state(e, rng, "stopping", "stopped"),
        2 => set_state(e, rng, "stopped", "starting"),
        3 => set_state(e, rng, "starting", "running"),
        4 => {
            // A new container with an address no one has.
            let used: HashSet<String> = e
                .containers
                .iter()
                .filter_map(|c| c["primary_ip"].as_str().map(str::to_string))
                .collect();
            let ip = loop {
                let a = format!("10.42.{}.{}", rng.below(256), rng.below(256));
                if !used.contains(&a) && a != "10.42.0.0" && a != "10.42.0.1" {
                    break a;
                }
            };
            let managed = e.managed_network();
            let name = pick(e, rng, &|c| c["network_uuid"] == managed.as_str())?;
            let mut c = e.container(&name).clone();
            let hosts = e.host_uuids();
            let host = hosts[rng.below(hosts.len())].clone();
            let new = format!("{name}-new{}", rng.below(1_000_000));
            c["name"] = new.clone().into();
            c["uuid"] = rng.uuid().into();
            c["host_uuid"] = host.clone().into();
            c["primary_ip"] = ip.clone().into();
            c["ips"] = serde_json::json!([ip]);
            c["state"] = "running".into();
            e.containers.push(c);
            Some(format!("{new} ({ip}) runs on {host}"))
        }
        _ if e.hosts.len() > 4 => {
            let me = e.self_uuid();
            let others: Vec<String> = e.host_uuids().into_iter().filter(|h| *h != me).collect();
            let gone = others[rng.below(others.len())].clone();
            e.remove_host(&gone);
            Some(format!("host {gone} left"))
        }
        _ => None,
    }
}

#[test]
fn random_changes_reach_the_client_through_the_long_poll() {
    let server = FakeRancher::start(Env::generate(&Gen::new(99, 12, 10)));
    let mut src = source(&server);
    let mut snap = src.load().unwrap();
    assert_maps_as_rancher_would(&server.env(), &snap);
    let mut rng = Rng::new(14);
    for round in 1..=12 {
        let version = snap.version.clone();
        let waiter = thread::spawn(move || {
            let r = src.wait_for_change(&version, Duration::from_secs(30));
            (r, src)
        });
        wait_for_poll(&server, round);
        let mut what = String::new();
        let t = Instant::now();
        let v = server.reload(|e| what = random_change(e, &mut rng));
        let (r, s) = waiter.join().unwrap();
        src = s;
        assert_eq!(r.unwrap(), Some(v.clone()), "round {round}: {what}");
        assert!(
            t.elapsed() < Duration::from_secs(1),
            "round {round}: {:?}",
            t.elapsed()
        );
        snap = src.load().unwrap();
        assert_eq!(snap.version, v);
        assert_maps_as_rancher_would(&server.env(), &snap);
    }
}

// ------------------------------------------------------------------------------------------
// Failures.
// ------------------------------------------------------------------------------------------

#[test]
fn server_down_is_a_clear_http_error() {
    let addr = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let base = format!("http://{addr}{PREFIX}");
    let mut src = RancherSource::new(&base).unwrap();
    let e = src.load().unwrap_err();
    match &e {
        MetadataError::Http { url, message } => {
            assert_eq!(url, &format!("{base}/version"));
            assert!(message.contains("cannot connect"), "{e}");
        }
        other => panic!("expected Http, got {other:?}"),
    }
    let e = src
        .wait_for_change("v", Duration::from_secs(1))
        .unwrap_err();
    assert!(matches!(e, MetadataError::Http { .. }), "{e}");
    assert!(e.to_string().contains("/version?wait=true"), "{e}");
}

#[test]
fn http_500_names_url_and_status() {
    let server = FakeRancher::start(Env::fixture());
    server.set_raw(
        "/networks",
        Reply::Answer {
            status: 500,
            body: "{\"message\": \"metadata store not ready\"}".into(),
        },
    );
    let e = source(&server).load().unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, MetadataError::Http { .. }), "{msg}");
    assert!(
        msg.starts_with(&format!("{}/networks: ", server.base())),
        "{msg}"
    );
    assert!(msg.contains("500"), "{msg}");
    assert!(msg.contains("metadata store not ready"), "{msg}");
}

/// The parse error of a load, with its origin checked to be `{base}{path}`.
fn parse_error(server: &FakeRancher, path: &str) -> (String, json::JsonError) {
    let e = source(server).load().unwrap_err();
    let msg = e.to_string();
    match e {
        MetadataError::Parse { origin, error } => {
            assert_eq!(origin, format!("{}{path}", server.base()), "{msg}");
            (msg, error)
        }
        other => panic!("expected Parse, got {other:?}"),
    }
}

/// Position of the uuid `uuid` in the served answer `path`.
fn served_index(server: &FakeRancher, path: &str, uuid: &str) -> usize {
    uuids(&server.served(path))
        .iter()
        .position(|u| u == uuid)
        .unwrap_or_else(|| panic!("{uuid} not in {path}"))
}

#[test]
fn garbled_json_is_a_parse_error_with_path_and_position() {
    let server = FakeRancher::start(Env::fixture());
    let body = server
        .served("/hosts")
        .replacen("\"agent_ip\":", "\"agent_ip\" ", 1);
    let at = body.find("\"agent_ip\" ").unwrap() + "\"agent_ip\" ".len();
    server.set_raw("/hosts", Reply::Answer { status: 200, body });
    let (msg, error) = parse_error(&server, "/hosts");
    // The colon after the first host's first key is missing: the error is in hosts[0], at
    // the character where the colon belongs (the answer is one line, as Go writes it).
    assert_eq!(error.path, "[0]", "{msg}");
    assert_eq!((error.line, error.column), (1, at + 1), "{msg}");
    assert_eq!(
        msg,
        format!(
            "{}/hosts: [0]: expected `:` (line 1, column {})",
            server.base(),
            at + 1
        )
    );
}

#[test]
fn missing_required_field_names_the_host() {
    let env = Env::fixture();
    let node2 = env.host_uuid("rancher-node-2");
    let server = FakeRancher::start(env);
    server.reload(|e| {
        e.host_mut(&node2)
            .as_object_mut()
            .unwrap()
            .remove("agent_ip");
    });
    let index = served_index(&server, "/hosts", &node2);
    let (msg, error) = parse_error(&server, "/hosts");
    assert_eq!(error.path, format!("[{index}]"), "{msg}");
    assert_eq!(error.message, "missing field `agent_ip`", "{msg}");
    assert!(
        msg.contains(&format!(
            "/hosts: [{index}]: missing field `agent_ip` (line 1, "
        )),
        "{msg}"
    );
}

#[test]
fn a_bad_field_in_an_answer_names_url_json_path_and_position() {
    let env = Env::fixture();
    let node3 = env.host_uuid("rancher-node-3");

    // /hosts: a number where the agent_ip string belongs.
    let server = FakeRancher::start(env.clone());
    server.reload(|e| e.host_mut(&node3)["agent_ip"] = 1921687713.into());
    let index = served_index(&server, "/hosts", &node3);
    let body = server.served("/hosts");
    // Answers are decoded as they arrive: the reader has taken the character after the
    // number when it sees the number is of the wrong type.
    let column = body.find(":1921687713").unwrap() + ":1921687713".len() + 1;
    let (msg, error) = parse_error(&server, "/hosts");
    assert_eq!(
        msg,
        format!(
            "{}/hosts: [{index}].agent_ip: invalid type: integer `1921687713`, expected a \
             string (line 1, column {column})",
            server.base()
        )
    );
    assert_eq!((error.line, error.column), (1, column));

    // /containers: a label value that is not a string (its key is quoted in the path).
    let server = FakeRancher::start(env.clone());
    server
        .reload(|e| e.container_mut("shop-db-1")["labels"]["io.rancher.stack.name"] = true.into());
    let index = server.env().container_index("shop-db-1");
    let (msg, error) = parse_error(&server, "/containers");
    assert_eq!(
        error.path,
        format!("[{index}].labels[\"io.rancher.stack.name\"]"),
        "{msg}"
    );
    assert!(
        error.message.starts_with("invalid type: boolean `true`"),
        "{msg}"
    );

    // /self/host: the document itself is an object, so the path is the field.
    let server = FakeRancher::start(env.clone());
    let mut me = env.self_host_answer().unwrap();
    me["uuid"] = serde_json::json!([env.self_uuid()]);
    server.set_raw_json("/self/host", &me);
    let (msg, error) = parse_error(&server, "/self/host");
    assert_eq!(error.path, "uuid", "{msg}");

    // /networks: a wrong type; and an answer that is not a list at all.
    let server = FakeRancher::start(env.clone());
    let host_net = env.network_uuid("host");
    server.reload(|e| {
        let n = e
            .networks
            .iter_mut()
            .find(|n| n["uuid"] == host_net.as_str())
            .unwrap();
        n["is_default"] = "yes".into();
    });
    let index = served_index(&server, "/networks", &host_net);
    let (msg, error) = parse_error(&server, "/networks");
    assert_eq!(error.path, format!("[{index}].is_default"), "{msg}");
    server.set_raw_json("/networks", &serde_json::json!({ "uuid": "x" }));
    let (msg, error) = parse_error(&server, "/networks");
    assert_eq!(error.path, "", "{msg}");
    assert!(
        msg.contains("/networks: invalid type: map, expected a sequence (line 1, "),
        "{msg}"
    );
}

#[test]
fn a_bad_mtu_in_the_managed_networks_cni_config_names_its_path() {
    let env = Env::fixture();
    let uuid = env.managed_network();
    let server = FakeRancher::start(env);
    let mut file = String::new();
    server.reload(|e| {
        let n = e
            .networks
            .iter_mut()
            .find(|n| n["uuid"] == uuid.as_str())
            .unwrap();
        let files = n["metadata"]["cniConfig"].as_object_mut().unwrap();
        file = files.keys().next().unwrap().clone();
        files[&file]["mtu"] = "big".into();
    });
    let index = served_index(&server, "/networks", &uuid);
    let e = source(&server).load().unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, MetadataError::Rancher { .. }), "{msg}");
    assert_eq!(
        msg,
        format!(
            "{}/networks: [{index}] (uuid {uuid:?}).metadata.cniConfig[{file:?}].mtu: \"big\" \
             is not an MTU (a whole number of bytes)",
            server.base()
        )
    );
}

#[test]
fn duplicate_agent_ip_is_a_validation_error() {
    let env = Env::fixture();
    let (node1, node3) = (
        env.host_uuid("rancher-node-1"),
        env.host_uuid("rancher-node-3"),
    );
    let server = FakeRancher::start(env.clone());
    let ip = env.host(&node1)["agent_ip"].clone();
    server.reload(|e| e.host_mut(&node3)["agent_ip"] = ip);
    // The error is at the one of the two listed second.
    let order = server.env().host_uuids();
    let later = order
        .iter()
        .rfind(|u| **u == node1 || **u == node3)
        .unwrap();
    let earlier = if *later == node1 { &node3 } else { &node1 };
    let e = source(&server).load().unwrap_err();
    match &e {
        MetadataError::Invalid { origin, error } => {
            assert_eq!(origin, &server.base());
            match &error.what {
                Invalid::DuplicateAgentIp { other_host, .. } => {
                    assert_eq!(other_host, earlier, "{e}")
                }
                _ => panic!("expected DuplicateAgentIp: {e}"),
            }
            assert!(error.location.to_string().contains(later.as_str()), "{e}");
        }
        other => panic!("expected Invalid, got {other:?}"),
    }
}

#[test]
fn unparsable_primary_ip_names_the_container() {
    let server = FakeRancher::start(Env::fixture());
    server.reload(|e| e.container_mut("shop-db-1")["primary_ip"] = "10.42.1.777".into());
    let env = server.env();
    let index = env.container_index("shop-db-1");
    let uuid = env.container("shop-db-1")["uuid"]
        .as_str()
        .unwrap()
        .to_string();
    let e = source(&server).load().unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, MetadataError::Rancher { .. }), "{msg}");
    assert_eq!(
        msg,
        format!(
            "{}/containers: [{index}] (uuid {uuid:?}, name \"shop-db-1\").primary_ip: \
             \"10.42.1.777\" is not an IP address",
            server.base()
        )
    );
}

#[test]
fn managed_network_missing_from_the_network_list_is_a_clear_error() {
    let server = FakeRancher::start(Env::fixture());
    server.reload(|e| e.networks.retain(|n| n["name"] != "ipsec"));
    let e = source(&server).load().unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, MetadataError::Rancher { .. }), "{msg}");
    assert!(msg.contains("/networks: "), "{msg}");
    assert!(msg.contains("not in the network list"), "{msg}");
}

#[test]
fn a_hung_request_times_out() {
    let server = FakeRancher::start(Env::fixture());
    server.set_raw("/containers", Reply::Hang);
    let mut src = source(&server).with_request_timeout(Duration::from_millis(300));
    let e = src.load().unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, MetadataError::Http { .. }), "{msg}");
    assert!(msg.contains("/containers: "), "{msg}");
    assert!(msg.contains("no complete answer within 0.3s"), "{msg}");
}

#[test]
fn a_null_or_404_self_host_is_a_clear_error_and_host_makes_it_unneeded() {
    let env = Env::fixture();
    let (node1, node2) = (
        env.host_uuid("rancher-node-1"),
        env.host_uuid("rancher-node-2"),
    );
    let server = FakeRancher::start(env.clone());
    let gone = Rng::new(3).uuid();
    for (caller, needle) in [
        // The caller's container points at a host no longer listed: 200 null.
        (
            Some(gone),
            "null: rancher-metadata knows this container but not its host",
        ),
        // The server does not know the caller: 404.
        (
            None,
            "HTTP status 404 Not Found: rancher-metadata does not know",
        ),
    ] {
        server.reload(|e| e.self_host = caller.clone());
        let e = source(&server).load().unwrap_err().to_string();
        assert!(e.contains(needle), "{e}");
        assert!(e.contains("pass --host") && e.contains("/self/host"), "{e}");
        // With --host the answer is never asked for, and the snapshot is complete.
        let before = server.requests();
        let mut src = source(&server);
        src.set_self_host(&node2);
        let snap = src.load().unwrap();
        assert_eq!(snap.self_id.as_ref().unwrap().as_str(), node2);
        assert_maps_as_rancher_would(&server.env(), &snap);
        assert!(
            server.seen()[before..]
                .iter()
                .all(|s| s.target != format!("{PREFIX}/self/host")),
            "/self/host asked for despite --host"
        );
    }
    let mut src = source(&server);
    src.set_self_host("no-such-uuid");
    let e = src.load().unwrap_err().to_string();
    assert!(
        e.contains("--host \"no-such-uuid\" is not the uuid of a listed host"),
        "{e}"
    );
    // The same through the CLI: `plan --host` works while /self/host answers 404.
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_ipsec-mesh"))
        .args(["plan", "--metadata", &server.base(), "--host", &node1])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

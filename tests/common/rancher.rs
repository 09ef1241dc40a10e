//! One fake rancher-metadata server for every test ([`FakeRancher`]), the environments it
//! serves ([`Env`]: the recorded fixture in tests/fixtures/rancher, or one generated with
//! Rancher's addressing by [`Env::generate`]), and an independent statement of what the
//! adapter must make of them ([`Env::expected_subnets`]).
//!
//! Real behaviours it copies (measured against the real server, github.com/rancher/
//! rancher-metadata built from source and fed a Rancher 1.6 environment, and read in its
//! source):
//!
//! - `/version` is a UUID, and every reload ([`FakeRancher::reload`]) makes a new one, also
//!   when nothing else changed. Taking the service down and up again ([`FakeRancher::down`],
//!   [`FakeRancher::up`]: an outage, not a reload) keeps it.
//! - The long-poll `GET /version?wait=true&value=V&maxWait=N` is answered at once when `V`
//!   is not the current version. Otherwise the server re-checks the held poll only on a
//!   reload or on its 5 s tick ([`TICK`]: a ticker started with the server, Go's
//!   `time.Sleep(5s); cond.Broadcast()`), and answers when the version changed or more than
//!   `N` seconds have passed. So `maxWait=1` is held until the first tick after 1 s (1-6 s;
//!   3.7-5.0 s measured) and `maxWait=30` 30-35 s (30.0-30.8 s measured); `maxWait=0` (or
//!   not a number) means 60 s, above 120 means 120 s, a negative one answers at once. A
//!   reload answers held polls at once.
//! - The arrays (`/hosts`, `/containers`, `/networks`) come in a new order after every
//!   reload (the server builds them from Go maps). Between reloads the order is stable.
//! - JSON only when the request's `Accept` names it (compact, object keys sorted, as Go's
//!   `json.Marshal` of maps writes it); otherwise the text listing (`0=name` per array
//!   element, the bare value of a string). `Content-Type: text/plain; charset=utf-8` either
//!   way (Go sniffs the JSON body). Bodies up to 2 KiB with `Content-Length`, larger ones
//!   chunked (Go's response buffer); HTTP/1.1 keep-alive.
//! - Unknown keys are `404` with `{"code":404,"message":"Not found","type":"error"}`, an
//!   unknown version prefix `404` `Invalid version`.
//! - `/self/host` is the caller's host without `hostId`; `200 null` when the caller's host
//!   ([`Env::self_host`]) is no longer listed; `404` when the caller is unknown (`None`).
//! - `/hosts` entries carry `hostId` (2015-07-25 and 2015-12-19; 2016-07-29 and `latest`
//!   drop it); containers have `"links": null` when they have no links, real-looking
//!   `service_uuid`/`stack_uuid`s; sidekicks sharing a network namespace
//!   (`network_from_container_uuid` set) have `primary_ip: null` on the "container" network.
//!
//! Not copied: answers chosen per client by source address (the caller is
//! [`Env::self_host`]); the keys other than version, hosts, containers, networks and
//! self/host (stacks, services, self/container); YAML; Go's HTML escaping of `<>&` in
//! strings; the root listing and the whole tree at `/<version>`; the reload port. Faults
//! that the real server does not make itself (a 500, a garbled body, a request that hangs,
//! a late answer) are injected with [`FakeRancher::set_raw`] and
//! [`FakeRancher::set_answer_delay`].

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU16, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use ipnet::IpNet;
use ipsec_mesh::metadata::rancher::{map_answers, Answers};
use ipsec_mesh::model::RawCluster;
use serde_json::{json, Value};

/// The metadata version the tests ask for (the one rancher-net and the docs use).
pub const PREFIX: &str = "/2015-12-19";
/// The real server's re-check period of held long-polls.
pub const TICK: Duration = Duration::from_secs(5);
/// Versions the real server serves (and `latest`).
const VERSIONS: [&str; 4] = ["2015-07-25", "2015-12-19", "2016-07-29", "latest"];
/// Container states Rancher's plugin-manager counts as running (`IsContainerConsideredRunning`).
pub const LIVE_STATES: [&str; 3] = ["running", "starting", "stopping"];
/// Go's net/http sends a body up to this size with Content-Length, a larger one chunked.
const GO_BUFFER: usize = 2048;

// ------------------------------------------------------------------------------------------
// A small seeded generator (splitmix64): runs are reproducible.
// ------------------------------------------------------------------------------------------

pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed ^ 0x6a09_e667_f3bc_c908)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    /// True with probability `percent` / 100.
    pub fn percent(&mut self, percent: u64) -> bool {
        self.next_u64() % 100 < percent
    }

    pub fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            v.swap(i, self.below(i + 1));
        }
    }

    /// A random (version 4) UUID, as Rancher's are.
    pub fn uuid(&mut self) -> String {
        let (a, b) = (self.next_u64(), self.next_u64());
        format!(
            "{:08x}-{:04x}-4{:03x}-{:x}{:03x}-{:012x}",
            a >> 32,
            (a >> 16) & 0xffff,
            a & 0xfff,
            8 + (b >> 62),
            (b >> 48) & 0xfff,
            b & 0xffff_ffff_ffff
        )
    }

    /// `bytes` random bytes in hex.
    pub fn hex(&mut self, bytes: usize) -> String {
        (0..bytes)
            .map(|_| format!("{:02x}", self.next_u64() as u8))
            .collect()
    }
}

// ------------------------------------------------------------------------------------------
// Environments.
// ------------------------------------------------------------------------------------------

/// What the server serves: the environment as cattle sends it, and who is asking.
#[derive(Debug, Clone, PartialEq)]
pub struct Env {
    /// The uuid of the caller's host (what `/self/host` answers): `None` is a caller the
    /// server does not know (404); a uuid not in `hosts` is answered `200 null`.
    pub self_host: Option<String>,
    /// Hosts with `hostId` (dropped for 2016-07-29 and `latest`, and from `/self/host`).
    pub hosts: Vec<Value>,
    pub containers: Vec<Value>,
    pub networks: Vec<Value>,
}

fn fixture_path(name: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/rancher")
        .join(name)
}

/// The text of tests/fixtures/rancher/`name`.
pub fn fixture(name: &str) -> String {
    let path = fixture_path(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// tests/fixtures/rancher/`name` as JSON.
pub fn fixture_json(name: &str) -> Value {
    serde_json::from_str(&fixture(name))
        .unwrap_or_else(|e| panic!("{}: {e}", fixture_path(name).display()))
}

fn array(v: Value, what: &str) -> Vec<Value> {
    match v {
        Value::Array(a) => a,
        other => panic!("{what} is not a list: {other}"),
    }
}

/// Settings of a generated environment ([`Env::generate`]).
#[derive(Debug, Clone)]
pub struct Gen {
    pub seed: u64,
    pub hosts: usize,
    /// Containers per host, all counted: the host's system containers (network agent, its
    /// router sidekick, the CNI driver on the host network, healthcheck) first, then users.
    pub per_host: usize,
    /// Rancher <= 1.1's network agent (one `Network Agent` system container labelled
    /// `io.rancher.container.system=NetworkAgent`) instead of the >= 1.2 ipsec stack.
    pub legacy_agents: bool,
}

impl Gen {
    pub fn new(seed: u64, hosts: usize, per_host: usize) -> Gen {
        Gen {
            seed,
            hosts,
            per_host,
            legacy_agents: false,
        }
    }

    pub fn legacy_agents(mut self) -> Gen {
        self.legacy_agents = true;
        self
    }
}

/// The user services generated containers belong to (stack, service).
const ZONES: [&str; 3] = ["a", "b", "c"];

const SERVICES: [(&str, &str); 6] = [
    ("shop", "web"),
    ("shop", "api"),
    ("shop", "db"),
    ("nightly", "batch"),
    ("search", "elastic"),
    ("metrics", "collector"),
];

/// Draws container addresses as Rancher's IPAM hands them out: each a /32 drawn at random
/// across the managed network's 10.42.0.0/16, never twice.
struct AddressPool {
    used: HashSet<u32>,
}

impl AddressPool {
    const BASE: u32 = 0x0a2a_0000; // 10.42.0.0

    fn new() -> AddressPool {
        // The network address, the bridge's gateway and the broadcast address are never a
        // container's.
        let used = [Self::BASE, Self::BASE + 1, Self::BASE + 0xffff]
            .into_iter()
            .collect();
        AddressPool { used }
    }

    fn draw(&mut self, rng: &mut Rng) -> Ipv4Addr {
        assert!(self.used.len() < 0x1_0000, "10.42.0.0/16 is full");
        loop {
            let a = Self::BASE | (rng.next_u64() as u32 & 0xffff);
            if self.used.insert(a) {
                return Ipv4Addr::from(a);
            }
        }
    }
}

/// The fields of one generated container (the rest is filled in by [`Builder::container`]).
struct Spec<'a> {
    host: &'a str,
    name: String,
    stack: &'a str,
    service: &'a str,
    network: &'a str,
    primary_ip: Value,
    state: &'a str,
    system: bool,
    network_from: &'a str,
    labels: Vec<(&'a str, String)>,
}

struct Builder {
    rng: Rng,
    env_uuid: String,
    /// The managed network's uuid.
    managed: String,
    stacks: HashMap<String, String>,
    services: HashMap<(String, String), String>,
    create_index: u64,
}

impl Builder {
    fn container(&mut self, s: Spec) -> Value {
        let uuid = self.rng.uuid();
        let stack_uuid = self
            .stacks
            .entry(s.stack.to_string())
            .or_insert_with(|| self.rng.uuid())
            .clone();
        let service_uuid = self
            .services
            .entry((s.stack.to_string(), s.service.to_string()))
            .or_insert_with(|| self.rng.uuid())
            .clone();
        self.create_index += 1;
        let ip = s.primary_ip.as_str().unwrap_or("").to_string();
        let mac = if ip.starts_with("10.42.") {
            format!("02:{}", {
                let h = self.rng.hex(5);
                (0..5)
                    .map(|i| &h[2 * i..2 * i + 2])
                    .collect::<Vec<_>>()
                    .join(":")
            })
        } else {
            String::new()
        };
        let mut labels = serde_json::Map::new();
        let ss = format!("{}/{}", s.stack, s.service);
        for (k, v) in [
            ("io.rancher.container.name", s.name.clone()),
            ("io.rancher.container.uuid", uuid.clone()),
            ("io.rancher.environment.uuid", self.env_uuid.clone()),
            ("io.rancher.project.name", s.stack.to_string()),
            ("io.rancher.project_service.name", ss.clone()),
            ("io.rancher.stack.name", s.stack.to_string()),
            ("io.rancher.stack_service.name", ss),
            ("io.rancher.service.deployment.unit", self.rng.uuid()),
            (
                "io.rancher.service.launch.config",
                "io.rancher.service.primary.launch.config".into(),
            ),
        ] {
            labels.insert(k.into(), v.into());
        }
        if s.network == self.managed {
            labels.insert("io.rancher.cni.network".into(), "ipsec".into());
            labels.insert("io.rancher.cni.wait".into(), "true".into());
        }
        if ip.starts_with("10.42.") {
            labels.insert("io.rancher.container.ip".into(), format!("{ip}/16").into());
            labels.insert(
                "io.rancher.container.mac_address".into(),
                mac.clone().into(),
            );
        }
        for (k, v) in s.labels {
            labels.insert(k.into(), v.into());
        }
        let ips = if ip.is_empty() {
            json!([])
        } else {
            json!([ip])
        };
        let stopped = s.state == "stopped";
        json!({
            "create_index": self.create_index,
            "dns": ["169.254.169.250"],
            "dns_search": [format!("{}.rancher.internal", s.stack), "rancher.internal"],
            "environment_uuid": self.env_uuid,
            "external_id": self.rng.hex(32),
            "health_check_hosts": [],
            "health_state": if stopped { Value::Null } else { "healthy".into() },
            "host_uuid": s.host,
            "hostname": Value::Null,
            "ips": ips,
            "labels": labels,
            "links": Value::Null,
            "memory_reservation": 0,
            "metadata_kind": "container",
            "milli_cpu_reservation": 0,
            "name": s.name,
            "network_from_container_uuid": s.network_from,
            "network_uuid": s.network,
            "ports": [],
            "primary_ip": s.primary_ip,
            "primary_mac_address": mac,
            "service_index": "1",
            "service_name": s.service,
            "service_uuid": service_uuid,
            "stack_name": s.stack,
            "stack_uuid": stack_uuid,
            "start_count": if stopped { 1 } else { 1 + self.rng.below(3) },
            "state": s.state,
            "system": s.system,
            "uuid": uuid,
        })
    }
}

impl Env {
    /// The recorded environment (tests/fixtures/rancher): 3 hosts, the caller on the host of
    /// `self_host.json`.
    pub fn fixture() -> Env {
        let me = fixture_json("self_host.json");
        Env {
            self_host: Some(me["uuid"].as_str().expect("self_host.json: uuid").into()),
            hosts: array(fixture_json("hosts.json"), "hosts.json"),
            containers: array(fixture_json("containers.json"), "containers.json"),
            networks: array(fixture_json("networks.json"), "networks.json"),
        }
    }

    /// A Rancher-shaped environment: `g.hosts` hosts (agent_ip 172.20.0.0/16), each with a
    /// network agent on the managed network 10.42.0.0/16 (`io.rancher.network.macsync` and
    /// `system: true`, or Rancher 1.1's `io.rancher.container.system=NetworkAgent`), its
    /// router sidekick (`primary_ip: null` on the "container" network), the CNI driver on
    /// the host network (the host's address), a healthcheck system container and user
    /// containers: mostly running, some starting (half without an address yet), stopping
    /// and stopped, about 1 in 8 with a sidekick sharing its network namespace, about 1 in
    /// 20 on the bridge network. Every managed-network address is a /32 drawn at random across
    /// the /16 without repeats (stopped containers keep theirs). The caller is the first host.
    pub fn generate(g: &Gen) -> Env {
        let mut b = Builder {
            rng: Rng::new(g.seed),
            env_uuid: String::new(),
            managed: String::new(),
            stacks: HashMap::new(),
            services: HashMap::new(),
            create_index: 0,
        };
        b.env_uuid = b.rng.uuid();
        let mut pool = AddressPool::new();
        let net = |b: &mut Builder, name: &str, default: bool, metadata: Value| {
            json!({
                "default_policy_action": if default { "allow" } else { "" },
                "environment_uuid": b.env_uuid,
                "host_ports": default,
                "is_default": default,
                "metadata": metadata,
                "metadata_kind": "network",
                "name": name,
                "policy": [],
                "uuid": b.rng.uuid(),
            })
        };
        let cni = json!({ "cniConfig": { "10-rancher.conf": {
            "bridge": "docker0", "bridgeSubnet": "10.42.0.0/16", "hairpinMode": false,
            "hostNat": true, "isDebugLevel": "false", "isDefaultGateway": true,
            "linkMTUOverhead": 98, "logToFile": "/var/log/rancher-cni.log", "mtu": 1500,
            "name": "rancher-cni-network", "promiscMode": false, "type": "rancher-bridge",
            "ipam": { "isDebugLevel": "false", "logToFile": "/var/log/rancher-cni.log",
                      "routes": [{ "dst": "169.254.169.250/32" }], "subnetPrefixSize": "/16",
                      "type": "rancher-cni-ipam" } } } });
        let networks = vec![
            net(&mut b, "bridge", false, json!({})),
            net(&mut b, "container", false, json!({})),
            net(&mut b, "host", false, json!({})),
            net(&mut b, "ipsec", true, cni),
            net(&mut b, "none", false, json!({})),
        ];
        let uuid_of = |n: &str| {
            networks.iter().find(|x| x["name"] == n).unwrap()["uuid"]
                .as_str()
                .unwrap()
                .to_string()
        };
        let (bridge, shared, hostnet, managed) = (
            uuid_of("bridge"),
            uuid_of("container"),
            uuid_of("host"),
            uuid_of("ipsec"),
        );
        b.managed = managed.clone();
        assert!(g.hosts < 62_500, "agent addresses run out");
        let mut hosts = Vec::with_capacity(g.hosts);
        let mut containers = Vec::with_capacity(g.hosts * g.per_host);
        for i in 0..g.hosts {
            let n = i + 1;
            let uuid = b.rng.uuid();
            let agent_ip = format!("172.20.{}.{}", i / 250, i % 250 + 1);
            hosts.push(json!({
                "agent_ip": agent_ip,
                "environment_uuid": b.env_uuid,
                "hostId": n,
                "hostname": format!("node-{n}.example.internal"),
                "labels": {
                    "io.rancher.host.docker_version": "17.06",
                    "io.rancher.host.linux_kernel_version": "4.9",
                    "io.rancher.host.os": "linux",
                    "zone": ZONES[i % 3],
                },
                "local_storage_mb": 50394,
                "memory": 8371879936u64,
                "metadata_kind": "host",
                "milli_cpu": 4000,
                "name": format!("rancher-node-{n}"),
                "uuid": uuid,
            }));
            let mut on_host = Vec::with_capacity(g.per_host);
            let agent_addr = Value::from(pool.draw(&mut b.rng).to_string());
            let agent = if g.legacy_agents {
                b.container(Spec {
                    host: &uuid,
                    name: format!("Network Agent {n}"),
                    stack: "network",
                    service: "agent",
                    network: &managed,
                    primary_ip: agent_addr,
                    state: "running",
                    system: true,
                    network_from: "",
                    labels: vec![("io.rancher.container.system", "NetworkAgent".into())],
                })
            } else {
                b.container(Spec {
                    host: &uuid,
                    name: format!("ipsec-ipsec-{n}"),
                    stack: "ipsec",
                    service: "ipsec",
                    network: &managed,
                    primary_ip: agent_addr,
                    state: "running",
                    system: true,
                    network_from: "",
                    labels: vec![
                        ("io.rancher.cni.link_mtu_overhead", "0".into()),
                        ("io.rancher.network.arpsync", "true".into()),
                        ("io.rancher.network.macsync", "true".into()),
                        ("io.rancher.scheduler.global", "true".into()),
                        ("io.rancher.sidekicks", "router,cni-driver".into()),
                    ],
                })
            };
            let agent_uuid = agent["uuid"].as_str().unwrap().to_string();
            on_host.push(agent);
            if !g.legacy_agents {
                on_host.push(b.container(Spec {
                    host: &uuid,
                    name: format!("ipsec-router-{n}"),
                    stack: "ipsec",
                    service: "router",
                    network: &shared,
                    primary_ip: Value::Null,
                    state: "running",
                    system: true,
                    network_from: &agent_uuid,
                    labels: vec![("io.rancher.container.agent_service.ipsec", "true".into())],
                }));
                on_host.push(b.container(Spec {
                    host: &uuid,
                    name: format!("ipsec-cni-driver-{n}"),
                    stack: "ipsec",
                    service: "cni-driver",
                    network: &hostnet,
                    primary_ip: agent_ip.clone().into(),
                    state: "running",
                    system: true,
                    network_from: "",
                    labels: vec![("io.rancher.network.cni.binary", "rancher-bridge".into())],
                }));
            }
            let hc_addr = Value::from(pool.draw(&mut b.rng).to_string());
            on_host.push(b.container(Spec {
                host: &uuid,
                name: format!("healthcheck-healthcheck-{n}"),
                stack: "healthcheck",
                service: "healthcheck",
                network: &managed,
                primary_ip: hc_addr,
                state: "running",
                system: true,
                network_from: "",
                labels: vec![("io.rancher.scheduler.global", "true".into())],
            }));
            let mut k = 0;
            while on_host.len() < g.per_host {
                k += 1;
                let (stack, service) = SERVICES[b.rng.below(SERVICES.len())];
                let state = match b.rng.below(100) {
                    0..70 => "running",
                    70..78 => "starting",
                    78..85 => "stopping",
                    _ => "stopped",
                };
                let name = format!("{stack}-{service}-{n}-{k}");
                let on_bridge = b.rng.percent(5);
                let (network, primary_ip) = if on_bridge {
                    let a = format!("172.17.0.{}", 2 + b.rng.below(250));
                    (bridge.as_str(), Value::from(a))
                } else if state == "starting" && b.rng.percent(50) {
                    (managed.as_str(), Value::from(""))
                } else {
                    (
                        managed.as_str(),
                        Value::from(pool.draw(&mut b.rng).to_string()),
                    )
                };
                let c = b.container(Spec {
                    host: &uuid,
                    name: name.clone(),
                    stack,
                    service,
                    network,
                    primary_ip,
                    state,
                    system: false,
                    network_from: "",
                    labels: vec![],
                });
                let parent = c["uuid"].as_str().unwrap().to_string();
                on_host.push(c);
                if on_host.len() < g.per_host && b.rng.percent(12) {
                    on_host.push(b.container(Spec {
                        host: &uuid,
                        name: format!("{name}-log"),
                        stack,
                        service: "log",
                        network: &shared,
                        primary_ip: Value::Null,
                        state,
                        system: false,
                        network_from: &parent,
                        labels: vec![],
                    }));
                }
            }
            on_host.truncate(g.per_host.max(1));
            containers.extend(on_host);
        }
        let mut env = Env {
            self_host: hosts
                .first()
                .map(|h| h["uuid"].as_str().unwrap().to_string()),
            hosts,
            containers,
            networks,
        };
        // As cattle sends them (from maps): in no particular order.
        b.rng.shuffle(&mut env.hosts);
        b.rng.shuffle(&mut env.containers);
        env
    }

    /// The host with `uuid`.
    pub fn host(&self, uuid: &str) -> &Value {
        self.hosts
            .iter()
            .find(|h| h["uuid"] == uuid)
            .unwrap_or_else(|| panic!("no host {uuid}"))
    }

    pub fn host_mut(&mut self, uuid: &str) -> &mut Value {
        self.hosts
            .iter_mut()
            .find(|h| h["uuid"] == uuid)
            .unwrap_or_else(|| panic!("no host {uuid}"))
    }

    /// The uuid of the host named `name`.
    pub fn host_uuid(&self, name: &str) -> String {
        self.hosts
            .iter()
            .find(|h| h["name"] == name)
            .unwrap_or_else(|| panic!("no host named {name}"))["uuid"]
            .as_str()
            .unwrap()
            .to_string()
    }

    /// Host uuids in the order of `hosts`.
    pub fn host_uuids(&self) -> Vec<String> {
        self.hosts
            .iter()
            .map(|h| h["uuid"].as_str().unwrap().to_string())
            .collect()
    }

    /// The caller's host uuid.
    pub fn self_uuid(&self) -> String {
        self.self_host
            .clone()
            .expect("the environment has a caller")
    }

    pub fn container(&self, name: &str) -> &Value {
        self.containers
            .iter()
            .find(|c| c["name"] == name)
            .unwrap_or_else(|| panic!("no container {name}"))
    }

    pub fn container_mut(&mut self, name: &str) -> &mut Value {
        self.containers
            .iter_mut()
            .find(|c| c["name"] == name)
            .unwrap_or_else(|| panic!("no container {name}"))
    }

    /// Position of the container named `name` in `containers`.
    pub fn container_index(&self, name: &str) -> usize {
        self.containers
            .iter()
            .position(|c| c["name"] == name)
            .unwrap_or_else(|| panic!("no container {name}"))
    }

    /// The host leaves: it and its containers are gone from the answers.
    pub fn remove_host(&mut self, uuid: &str) {
        let before = self.hosts.len();
        self.hosts.retain(|h| h["uuid"] != uuid);
        assert_eq!(self.hosts.len() + 1, before, "no host {uuid}");
        self.containers.retain(|c| c["host_uuid"] != uuid);
    }

    /// The uuid of the managed network (named "ipsec" in the fixture and generated
    /// environments).
    pub fn managed_network(&self) -> String {
        self.networks
            .iter()
            .find(|n| n["name"] == "ipsec")
            .expect("a network named ipsec")["uuid"]
            .as_str()
            .unwrap()
            .to_string()
    }

    /// The network named `name`'s uuid.
    pub fn network_uuid(&self, name: &str) -> String {
        self.networks
            .iter()
            .find(|n| n["name"] == name)
            .unwrap_or_else(|| panic!("no network {name}"))["uuid"]
            .as_str()
            .unwrap()
            .to_string()
    }

    /// Whether container `c` holds a live address of its host on the managed network, by
    /// Rancher's rules: on the managed network, not sharing another container's network
    /// namespace (a sidekick), in a state plugin-manager counts as running, with an address.
    pub fn is_live_address(&self, c: &Value) -> bool {
        let s = |k: &str| c[k].as_str().unwrap_or("");
        s("network_uuid") == self.managed_network()
            && s("network_from_container_uuid").is_empty()
            && LIVE_STATES.contains(&s("state"))
            && !s("primary_ip").is_empty()
    }

    /// The live managed-network addresses of the host `uuid`.
    pub fn live_addresses(&self, uuid: &str) -> Vec<IpAddr> {
        self.containers
            .iter()
            .filter(|c| c["host_uuid"] == uuid && self.is_live_address(c))
            .map(|c| {
                c["primary_ip"]
                    .as_str()
                    .unwrap()
                    .parse()
                    .unwrap_or_else(|e| panic!("{}: primary_ip: {e}", c["name"]))
            })
            .collect()
    }

    /// The subnets the adapter must give host `uuid`: its live addresses aggregated, sorted.
    pub fn expected_subnets(&self, uuid: &str) -> Vec<IpNet> {
        let nets: Vec<IpNet> = self
            .live_addresses(uuid)
            .into_iter()
            .map(IpNet::from)
            .collect();
        let mut v = IpNet::aggregate(&nets);
        v.sort();
        v
    }

    /// What `/self/host` answers: the caller's host without `hostId`, `null` when that host
    /// is not listed; `None` (404) for an unknown caller.
    pub fn self_host_answer(&self) -> Option<Value> {
        let uuid = self.self_host.as_ref()?;
        Some(
            match self.hosts.iter().find(|h| h["uuid"] == uuid.as_str()) {
                Some(h) => without_host_id(h),
                None => Value::Null,
            },
        )
    }

    /// The answers as the adapter types them (the caller's host must be listed).
    pub fn answers(&self) -> Answers {
        fn typed<T: serde::de::DeserializeOwned>(v: Value, what: &str) -> T {
            serde_json::from_value(v).unwrap_or_else(|e| panic!("{what}: {e}"))
        }
        Answers {
            self_host: typed(self.self_host_answer().expect("a caller"), "/self/host"),
            hosts: typed(Value::Array(self.hosts.clone()), "/hosts"),
            containers: typed(Value::Array(self.containers.clone()), "/containers"),
            networks: typed(Value::Array(self.networks.clone()), "/networks"),
        }
    }

    /// The adapter's mapping of these answers (for tests that need the plan the sidecar
    /// must reach, not a test of the mapping).
    pub fn raw_cluster(&self) -> RawCluster {
        map_answers(&self.answers()).unwrap_or_else(|e| panic!("the environment maps: {e}"))
    }
}

fn without_host_id(h: &Value) -> Value {
    let mut h = h.clone();
    if let Some(o) = h.as_object_mut() {
        o.remove("hostId");
    }
    h
}

// ------------------------------------------------------------------------------------------
// The server.
// ------------------------------------------------------------------------------------------

/// An injected answer for one key, served instead of the environment's (until cleared).
#[derive(Clone, Debug)]
pub enum Reply {
    /// This status and body (as text, exactly).
    Answer { status: u16, body: String },
    /// Read the request, never answer.
    Hang,
}

/// One request the server saw.
#[derive(Debug, Clone)]
pub struct Seen {
    pub target: String,
    pub accept: Option<String>,
    /// A long-poll's `maxWait` as the server applies it.
    pub max_wait: Option<Duration>,
    /// How long a long-poll was held before its answer (None while held, or not a poll).
    pub held: Option<Duration>,
}

/// The JSON bodies of the array answers, each built on its first request after a reload.
#[derive(Default)]
struct Bodies {
    hosts: Option<Arc<String>>,
    /// `/hosts` of 2016-07-29 and `latest` (no `hostId`).
    hosts_v3: Option<Arc<String>>,
    containers: Option<Arc<String>>,
    networks: Option<Arc<String>>,
}

impl State {
    /// The JSON body of an array answer (`/hosts`, `/containers`, `/networks`).
    fn body(&mut self, path: &str, v3: bool) -> Option<Arc<String>> {
        let s = |v: &Vec<Value>| Arc::new(serde_json::to_string(v).unwrap());
        let (env, b) = (&self.env, &mut self.bodies);
        Some(match path {
            "/hosts" if v3 => b
                .hosts_v3
                .get_or_insert_with(|| s(&env.hosts.iter().map(without_host_id).collect()))
                .clone(),
            "/hosts" => b.hosts.get_or_insert_with(|| s(&env.hosts)).clone(),
            "/containers" => b
                .containers
                .get_or_insert_with(|| s(&env.containers))
                .clone(),
            "/networks" => b.networks.get_or_insert_with(|| s(&env.networks)).clone(),
            _ => return None,
        })
    }
}

struct State {
    env: Env,
    version: String,
    bodies: Bodies,
    raw: HashMap<String, Reply>,
    seen: Vec<Seen>,
    rng: Rng,
    /// Bumped on every tick, reload and outage: what held polls wait for.
    wakes: u64,
    up: bool,
    conns: Vec<TcpStream>,
    answer_delay: Duration,
}

struct Shared {
    state: Mutex<State>,
    wake: Condvar,
    stop: AtomicBool,
    started: Instant,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

type Bind = Box<dyn Fn() -> TcpListener + Send + Sync>;

/// The fake rancher-metadata service (see the module doc for what it copies).
pub struct FakeRancher {
    shared: Arc<Shared>,
    bind: Bind,
    addr: Mutex<Option<SocketAddr>>,
    acceptor: Mutex<Option<JoinHandle<()>>>,
}

impl FakeRancher {
    /// Serve `env` on 127.0.0.1 (a free port, kept across [`down`](Self::down)/[`up`](Self::up)).
    pub fn start(env: Env) -> FakeRancher {
        let port = Arc::new(AtomicU16::new(0));
        FakeRancher::serve(env, move || {
            let l = TcpListener::bind(("127.0.0.1", port.load(Ordering::SeqCst)))
                .expect("bind the fake rancher-metadata");
            port.store(l.local_addr().unwrap().port(), Ordering::SeqCst);
            l
        })
    }

    /// Serve `env` on the listener `bind` makes (called again by every [`up`](Self::up):
    /// e.g. a fixed port inside a network namespace).
    pub fn serve(env: Env, bind: impl Fn() -> TcpListener + Send + Sync + 'static) -> FakeRancher {
        let mut rng = Rng::new(0x5eed_0000_0000_0013);
        let mut env = env;
        rng.shuffle(&mut env.hosts);
        rng.shuffle(&mut env.containers);
        rng.shuffle(&mut env.networks);
        let version = rng.uuid();
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                bodies: Bodies::default(),
                env,
                version,
                raw: HashMap::new(),
                seen: Vec::new(),
                rng,
                wakes: 0,
                up: false,
                conns: Vec::new(),
                answer_delay: Duration::ZERO,
            }),
            wake: Condvar::new(),
            stop: AtomicBool::new(false),
            started: Instant::now(),
        });
        // The 5 s tick, from the server's start (anchored: a poll's phase is predictable).
        let s = shared.clone();
        thread::spawn(move || {
            let mut k = 1u32;
            while !s.stop.load(Ordering::SeqCst) {
                let at = s.started + TICK * k;
                let now = Instant::now();
                if now < at {
                    thread::sleep((at - now).min(Duration::from_millis(100)));
                    continue;
                }
                k += 1;
                let mut st = s.lock();
                st.wakes += 1;
                s.wake.notify_all();
            }
        });
        let r = FakeRancher {
            shared,
            bind: Box::new(bind),
            addr: Mutex::new(None),
            acceptor: Mutex::new(None),
        };
        r.up();
        r
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr.lock().unwrap().expect("the server was up once")
    }

    /// `http://<addr>/2015-12-19`.
    pub fn base(&self) -> String {
        format!("http://{}{PREFIX}", self.addr())
    }

    /// The current version.
    pub fn version(&self) -> String {
        self.shared.lock().version.clone()
    }

    /// The environment as currently served (arrays in the served order).
    pub fn env(&self) -> Env {
        self.shared.lock().env.clone()
    }

    /// Look at the environment as currently served without copying it.
    pub fn with_env<R>(&self, f: impl FnOnce(&Env) -> R) -> R {
        f(&self.shared.lock().env)
    }

    /// Reload: change the environment with `f`; a new version, a new order of every answer,
    /// held long-polls answered. Returns the new version.
    pub fn reload(&self, f: impl FnOnce(&mut Env)) -> String {
        let mut st = self.shared.lock();
        f(&mut st.env);
        let st = &mut *st;
        st.rng.shuffle(&mut st.env.hosts);
        st.rng.shuffle(&mut st.env.containers);
        st.rng.shuffle(&mut st.env.networks);
        st.bodies = Bodies::default();
        st.version = st.rng.uuid();
        st.wakes += 1;
        self.shared.wake.notify_all();
        st.version.clone()
    }

    /// Answer `path` (under the version prefix, e.g. `/hosts`) with `reply` instead of the
    /// environment, for every version, until [`clear_raw`](Self::clear_raw).
    pub fn set_raw(&self, path: &str, reply: Reply) {
        self.shared.lock().raw.insert(path.to_string(), reply);
    }

    /// [`set_raw`](Self::set_raw) with a 200 and `v` as compact JSON.
    pub fn set_raw_json(&self, path: &str, v: &Value) {
        self.set_raw(
            path,
            Reply::Answer {
                status: 200,
                body: serde_json::to_string(v).unwrap(),
            },
        );
    }

    pub fn clear_raw(&self, path: &str) {
        self.shared.lock().raw.remove(path);
    }

    /// Delay every answer by `d` once it is ready (a busy or throttled server).
    pub fn set_answer_delay(&self, d: Duration) {
        self.shared.lock().answer_delay = d;
    }

    /// The JSON body `path` is answered with now (`/hosts`, `/containers`, `/networks`).
    pub fn served(&self, path: &str) -> String {
        let body = self.shared.lock().body(path, false);
        body.unwrap_or_else(|| panic!("served: {path} is not an array answer"))
            .to_string()
    }

    /// Every request so far.
    pub fn seen(&self) -> Vec<Seen> {
        self.shared.lock().seen.clone()
    }

    /// How many requests it has read.
    pub fn requests(&self) -> usize {
        self.shared.lock().seen.len()
    }

    /// When the server's tick next re-checks held polls.
    pub fn next_tick(&self) -> Instant {
        let since = self.shared.started.elapsed();
        let k = since.as_nanos() / TICK.as_nanos() + 1;
        self.shared.started + TICK * k as u32
    }

    /// Listen again (after [`down`](Self::down)); the version and answers are kept.
    pub fn up(&self) {
        let l = (self.bind)();
        *self.addr.lock().unwrap() = Some(l.local_addr().unwrap());
        l.set_nonblocking(true).unwrap();
        self.shared.lock().up = true;
        let s = self.shared.clone();
        let h = thread::spawn(move || loop {
            if !s.lock().up {
                return; // drops the listener: connections are refused from now on
            }
            match l.accept() {
                Ok((c, _)) => {
                    c.set_nonblocking(false).unwrap();
                    s.lock().conns.push(c.try_clone().unwrap());
                    let s = s.clone();
                    thread::spawn(move || serve_connection(c, &s));
                }
                Err(_) => thread::sleep(Duration::from_millis(5)),
            }
        });
        *self.acceptor.lock().unwrap() = Some(h);
    }

    /// An outage: close the listener and every connection (held polls get no answer,
    /// clients then "connection refused").
    pub fn down(&self) {
        {
            let mut st = self.shared.lock();
            st.up = false;
            for c in st.conns.drain(..) {
                let _ = c.shutdown(Shutdown::Both);
            }
            st.wakes += 1;
            self.shared.wake.notify_all();
        }
        if let Some(h) = self.acceptor.lock().unwrap().take() {
            h.join().unwrap();
        }
    }
}

impl Drop for FakeRancher {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        self.down();
    }
}

/// One parsed request.
struct Request {
    target: String,
    accept: Option<String>,
    close: bool,
}

fn read_request(reader: &mut BufReader<TcpStream>) -> Option<Request> {
    let mut line = String::new();
    if reader.read_line(&mut line).ok()? == 0 {
        return None;
    }
    let mut words = line.split_whitespace();
    let _method = words.next()?;
    let target = words.next()?.to_string();
    let mut close = words.next() == Some("HTTP/1.0");
    let mut accept = None;
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h).ok()? == 0 {
            return None;
        }
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            let v = v.trim();
            if k.eq_ignore_ascii_case("accept") {
                accept = Some(v.to_string());
            } else if k.eq_ignore_ascii_case("connection") {
                close = v.eq_ignore_ascii_case("close");
            }
        }
    }
    Some(Request {
        target,
        accept,
        close,
    })
}

fn serve_connection(conn: TcpStream, s: &Shared) {
    let mut reader = BufReader::new(match conn.try_clone() {
        Ok(c) => c,
        Err(_) => return,
    });
    let mut conn = conn;
    while let Some(req) = read_request(&mut reader) {
        let Some((status, body)) = answer(s, &req) else {
            return; // hung or went down: no answer
        };
        let delay = s.lock().answer_delay;
        thread::sleep(delay);
        if write_response(&mut conn, status, body.as_bytes()).is_err() || req.close {
            return;
        }
    }
}

fn percent_decode(s: &str, plus_is_space: bool) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 3], 16) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(if plus_is_space && b[i] == b'+' {
            b' '
        } else {
            b[i]
        });
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Go's `url.QueryEscape`.
fn query_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                out.push(b as char)
            }
            b' ' => out.push('+'),
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

/// A body as the server's text listing writes it (`respondText`).
fn text(v: &Value) -> Option<String> {
    Some(match v {
        Value::Null => String::new(),
        Value::String(s) => s.clone(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        Value::Object(m) => {
            let mut out: Vec<String> = m
                .iter()
                .map(|(k, v)| {
                    let slash = if v.is_object() || v.is_array() {
                        "/"
                    } else {
                        ""
                    };
                    format!("{}{slash}\n", query_escape(k))
                })
                .collect();
            out.sort();
            out.concat()
        }
        Value::Array(a) => a
            .iter()
            .enumerate()
            .map(|(i, v)| {
                if let Some(o) = v.as_object() {
                    for key in ["name", "uuid"] {
                        if let Some(name) = o.get(key) {
                            return Some(format!("{i}={}\n", query_escape(name.as_str()?)));
                        }
                    }
                }
                Some(if v.is_object() || v.is_array() {
                    format!("{i}/\n")
                } else {
                    format!("{i}\n")
                })
            })
            .collect::<Option<Vec<_>>>()?
            .concat(),
    })
}

/// Walk `segs` into `v`: object keys, array indexes or an element's `name`/`uuid`.
fn walk<'a>(mut v: &'a Value, segs: &[String]) -> Option<&'a Value> {
    for seg in segs {
        v = match v {
            Value::Object(m) => m.get(seg)?,
            Value::Array(a) => match seg.parse::<usize>() {
                Ok(i) => a.get(i)?,
                Err(_) => a.iter().find(|e| {
                    ["name", "uuid"]
                        .iter()
                        .any(|k| e.get(k).and_then(Value::as_str) == Some(seg.as_str()))
                })?,
            },
            _ => return None,
        };
    }
    Some(v)
}

fn not_found(json: bool, msg: &str) -> (u16, String) {
    let body = if json {
        serde_json::to_string(&json!({ "code": 404, "message": msg, "type": "error" })).unwrap()
    } else {
        msg.to_string()
    };
    (404, format!("{body}\n")) // http.Error adds the newline
}

/// The answer to one request; `None` for no answer at all (held when the service went down,
/// or an injected hang).
fn answer(s: &Shared, req: &Request) -> Option<(u16, Arc<String>)> {
    let arc = |(status, body): (u16, String)| Some((status, Arc::new(body)));
    let json = req.accept.as_deref().is_some_and(|a| a.contains("json"));
    let (path, query) = req.target.split_once('?').unwrap_or((&req.target, ""));
    let params: HashMap<&str, String> = query
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k, percent_decode(v, true)))
        .collect();
    let segs: Vec<String> = path
        .trim_start_matches('/')
        .trim_end_matches('/')
        .split('/')
        .map(|p| percent_decode(p, false))
        .collect();
    let index = {
        let mut st = s.lock();
        st.seen.push(Seen {
            target: req.target.clone(),
            accept: req.accept.clone(),
            max_wait: None,
            held: None,
        });
        st.seen.len() - 1
    };
    let Some(version) = segs.first().filter(|v| VERSIONS.contains(&v.as_str())) else {
        return arc(not_found(json, "Invalid version"));
    };
    let v3 = matches!(version.as_str(), "2016-07-29" | "latest");
    let key = &segs[1..];
    let key_path = format!("/{}", key.join("/"));

    let mut st = s.lock();
    match st.raw.get(&key_path).cloned() {
        Some(Reply::Hang) => {
            drop(st);
            while !s.stop.load(Ordering::SeqCst) && s.lock().up {
                thread::sleep(Duration::from_millis(20));
            }
            return None;
        }
        Some(Reply::Answer { status, body }) => return arc((status, body)),
        None => {}
    }

    // The long-poll ("Wait" route: wait=true and a value).
    if key == ["version"] && params.get("wait").map(String::as_str) == Some("true") {
        if let Some(old) = params.get("value") {
            let n: i64 = params
                .get("maxWait")
                .and_then(|m| m.parse().ok())
                .unwrap_or(0);
            let max = match n {
                0 => Some(Duration::from_secs(60)),
                n if n > 120 => Some(Duration::from_secs(120)),
                n if n < 0 => None, // already over: answered at once
                n => Some(Duration::from_secs(n as u64)),
            };
            st.seen[index].max_wait = max;
            let start = Instant::now();
            loop {
                if !st.up || s.stop.load(Ordering::SeqCst) {
                    return None;
                }
                if max.is_none_or(|m| start.elapsed() > m) || st.version != *old {
                    break;
                }
                let wakes = st.wakes;
                while st.wakes == wakes {
                    st = s.wake.wait(st).unwrap_or_else(|p| p.into_inner());
                }
            }
            st.seen[index].held = Some(start.elapsed());
        }
    }

    // Fast paths: the big arrays, built once per reload.
    if json {
        if let Some(body) = st.body(&key_path, v3) {
            return Some((200, body));
        }
    }
    let env = &st.env;
    let top: Option<Value> = match key.first().map(String::as_str) {
        Some("version") => Some(Value::String(st.version.clone())),
        Some("self") => env.self_host_answer().map(|h| json!({ "host": h })),
        Some("hosts") if v3 => Some(Value::Array(
            env.hosts.iter().map(without_host_id).collect(),
        )),
        Some("hosts") => Some(Value::Array(env.hosts.clone())),
        Some("containers") => Some(Value::Array(env.containers.clone())),
        Some("networks") => Some(Value::Array(env.networks.clone())),
        _ => None,
    };
    let Some(found) = top.as_ref().and_then(|t| walk(t, &key[1..])) else {
        return arc(not_found(json, "Not found"));
    };
    if json {
        arc((200, serde_json::to_string(found).unwrap()))
    } else {
        match text(found) {
            Some(t) => arc((200, t)),
            None => arc((
                500,
                "Value is of a type I don't know how to handle\n".into(),
            )),
        }
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        _ => "Unknown",
    }
}

fn write_response(conn: &mut TcpStream, status: u16, body: &[u8]) -> std::io::Result<()> {
    let mut head = format!(
        "HTTP/1.1 {status} {}\r\nAccess-Control-Allow-Origin: *\r\n\
         Content-Type: text/plain; charset=utf-8\r\n",
        reason(status)
    );
    if status != 200 {
        head.push_str("X-Content-Type-Options: nosniff\r\n");
    }
    if body.len() <= GO_BUFFER {
        head.push_str(&format!("Content-Length: {}\r\n\r\n", body.len()));
        conn.write_all(head.as_bytes())?;
        conn.write_all(body)?;
    } else {
        head.push_str("Transfer-Encoding: chunked\r\n\r\n");
        conn.write_all(head.as_bytes())?;
        write!(conn, "{:x}\r\n", body.len())?;
        conn.write_all(body)?;
        conn.write_all(b"\r\n0\r\n\r\n")?;
    }
    conn.flush()
}

// ------------------------------------------------------------------------------------------
// A plain HTTP/1.1 client, to look at the wire.
// ------------------------------------------------------------------------------------------

/// One answer as it came over the wire.
#[derive(Debug, Clone)]
pub struct RawResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl RawResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// A keep-alive connection to the server.
pub struct RawClient {
    reader: BufReader<TcpStream>,
}

impl RawClient {
    pub fn connect(addr: SocketAddr) -> RawClient {
        let s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(150))).unwrap();
        RawClient {
            reader: BufReader::new(s),
        }
    }

    /// GET `target` with this `Accept` header (none when `None`).
    pub fn get(&mut self, target: &str, accept: Option<&str>) -> RawResponse {
        let mut req = format!("GET {target} HTTP/1.1\r\nHost: rancher-metadata\r\n");
        if let Some(a) = accept {
            req.push_str(&format!("Accept: {a}\r\n"));
        }
        req.push_str("\r\n");
        self.reader.get_mut().write_all(req.as_bytes()).unwrap();
        let mut line = String::new();
        self.reader.read_line(&mut line).unwrap();
        let status: u16 = line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("status line {line:?}"));
        let mut headers = Vec::new();
        loop {
            let mut h = String::new();
            self.reader.read_line(&mut h).unwrap();
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            let (k, v) = h.split_once(':').unwrap();
            headers.push((k.to_string(), v.trim().to_string()));
        }
        let mut r = RawResponse {
            status,
            headers,
            body: String::new(),
        };
        let mut body = Vec::new();
        if let Some(n) = r.header("content-length") {
            body.resize(n.parse().unwrap(), 0);
            self.reader.read_exact(&mut body).unwrap();
        } else {
            assert_eq!(r.header("transfer-encoding"), Some("chunked"), "{r:?}");
            loop {
                let mut size = String::new();
                self.reader.read_line(&mut size).unwrap();
                let n = usize::from_str_radix(size.trim(), 16).unwrap();
                let mut chunk = vec![0; n + 2];
                self.reader.read_exact(&mut chunk).unwrap();
                if n == 0 {
                    break;
                }
                body.extend_from_slice(&chunk[..n]);
            }
        }
        r.body = String::from_utf8(body).unwrap();
        r
    }
}

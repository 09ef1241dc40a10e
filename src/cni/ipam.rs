//! `ipsec-mesh-ipam`: addresses from this host's subnets in the mesh metadata.
//!
//! ADD loads the metadata (one request, no polling), finds this host and allocates one
//! address from the first of its subnets with room, under the store's lock
//! ([`super::store`]), never the host's VTEP address (which the metadata may place inside a
//! subnet: `hosts[].vtep`); the same (network, container, ifname) gets the same address again,
//! also after a DEL within `keepReleasedSeconds` (a restart or `network reload`).
//!
//! Static requests, as host-local takes them (`CNI_ARGS` `IP=a[,b]`, `args.cni.ips`,
//! `runtimeConfig.ips` of the `ips` capability): each address must be an allocatable address
//! of this host's subnets (not the network, gateway or broadcast address, not the VTEP) and
//! free, else ADD fails with code 109 (not this host's to give) or 110 (in use), naming it.
//! The result carries the subnet's gateway (its first address) and the configured `routes`.
//! DEL, CHECK and GC only touch the store, so they work while the metadata is unreachable.

use std::net::IpAddr;

use ipnet::IpNet;
use serde_json::Value;

use super::config::{static_requests, IpamConf, Requested};
use super::mesh;
use super::plugin::{Plugin, Request};
use super::spec::{code, CniError, CniResult, IpConfig};
use super::store::{self, ClaimError, Owner, Store, StoreError};

/// The IPAM plugin.
#[derive(Debug, Default)]
pub struct Ipam;

fn store_error(e: StoreError) -> CniError {
    let c = match e {
        StoreError::LockTimeout { .. } => code::TRY_AGAIN,
        _ => code::STORE,
    };
    CniError::new(c, format!("allocation store: {e}"))
}

fn owner(conf: &IpamConf, r: &Request) -> Owner {
    Owner {
        network: conf.network.clone(),
        container: r.env.container_id.clone(),
        ifname: r.env.ifname.clone(),
    }
}

/// `subnets` split by family, IPv4 first (each keeps its order); families without subnets
/// are left out.
pub fn by_family(subnets: &[IpNet]) -> Vec<Vec<IpNet>> {
    [false, true]
        .into_iter()
        .map(|v6| {
            subnets
                .iter()
                .copied()
                .filter(|s| s.addr().is_ipv6() == v6)
                .collect::<Vec<_>>()
        })
        .filter(|f| !f.is_empty())
        .collect()
}

/// The result for addresses, each in its subnet.
pub fn result_for(got: &[(IpAddr, IpNet)], conf: &IpamConf) -> CniResult {
    CniResult {
        ips: got
            .iter()
            .map(|(ip, subnet)| IpConfig {
                address: IpNet::new(*ip, subnet.prefix_len()).unwrap_or(*subnet),
                gateway: store::gateway(subnet),
                interface: None,
                version: None,
            })
            .collect(),
        routes: conf.routes.clone(),
        ..Default::default()
    }
}

/// Seconds since the Unix epoch.
fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The CNI error for a static request that cannot be given.
fn claim_error(r: &Requested, host: &str, e: &ClaimError) -> CniError {
    let c = match e {
        ClaimError::InUse { .. } => code::ADDRESS_IN_USE,
        _ => code::ADDRESS_UNAVAILABLE,
    };
    CniError::new(
        c,
        format!("requested address ({}) on host {host:?}: {e}", r.source),
    )
}

/// Give `who` exactly the requested addresses (releasing others it held in this network).
fn claim_all(
    st: &mut store::State,
    req: &[Requested],
    subnets: &[IpNet],
    vtep: Option<IpAddr>,
    who: &Owner,
    host: &str,
) -> Result<Vec<(IpAddr, IpNet)>, CniError> {
    let mut got = Vec::new();
    let mut trial = st.clone();
    for ip in trial.held_by(who) {
        if !req.iter().any(|r| r.ip == ip) {
            trial.allocations.remove(&ip);
        }
    }
    for r in req {
        let subnet = trial
            .claim(subnets, vtep.as_slice(), r.ip, who)
            .map_err(|e| claim_error(r, host, &e))?;
        if let Some(p) = r.prefix {
            if p != subnet.prefix_len() {
                return Err(CniError::new(
                    code::ADDRESS_UNAVAILABLE,
                    format!(
                        "requested address ({}) {}/{p} on host {host:?}: the subnet is {subnet}",
                        r.source, r.ip
                    ),
                ));
            }
        }
        got.push((r.ip, subnet));
    }
    // Addresses kept for this owner after an earlier release are not needed any more.
    trial.released.retain(|_, k| k.owner != *who);
    *st = trial;
    Ok(got)
}

/// `ipam.ranges` is what `cni-config` wrote; the metadata wins when they differ.
fn warn_stale_ranges(conf: &IpamConf, host: &str, subnets: &[IpNet]) {
    if conf.ranges.is_empty() {
        return;
    }
    let (mut a, mut b) = (conf.ranges.clone(), subnets.to_vec());
    a.sort();
    b.sort();
    if a != b {
        tracing::warn!(
            "ipam.ranges ({}) differs from host {host:?}'s subnets in the metadata ({}): the metadata is used; run `ipsec-mesh cni-config` again to refresh the configuration",
            a.iter().map(ToString::to_string).collect::<Vec<_>>().join(", "),
            b.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ")
        );
    }
}

/// This host's id, subnets and VTEP address in the metadata.
fn host_subnets(conf: &IpamConf) -> Result<(String, Vec<IpNet>, Option<IpAddr>), CniError> {
    let m = mesh::load(&conf.metadata, conf.host.as_deref())?;
    let host = m.snapshot.cluster.host(&m.self_id).ok_or_else(|| {
        CniError::new(
            code::UNKNOWN_HOST,
            format!("host {:?} is not in {}", m.self_id, conf.metadata),
        )
    })?;
    if host.subnets.is_empty() {
        return Err(CniError::new(
            code::UNKNOWN_HOST,
            format!(
                "host {:?} has no container subnet in {}",
                m.self_id, conf.metadata
            ),
        ));
    }
    Ok((m.self_id, host.subnets.clone(), host.vtep))
}

/// `cni.dev/valid-attachments` of a GC request: (container id, ifname) pairs.
pub fn valid_attachments(
    doc: &serde_json::Map<String, Value>,
) -> Result<Vec<(String, String)>, CniError> {
    let key = "cni.dev/valid-attachments";
    let list = match doc.get(key) {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::Array(a)) => a,
        Some(_) => return Err(CniError::config(format!("{key} must be an array"))),
    };
    list.iter()
        .enumerate()
        .map(|(i, a)| {
            let get = |k: &str| a.get(k).and_then(Value::as_str).map(str::to_string);
            match (get("containerID"), get("ifname")) {
                (Some(c), Some(i)) => Ok((c, i)),
                _ => Err(CniError::config(format!(
                    "{key}[{i}] needs string containerID and ifname"
                ))),
            }
        })
        .collect()
}

impl Plugin for Ipam {
    fn add(&self, r: &Request) -> Result<CniResult, CniError> {
        let conf = IpamConf::parse(r.conf)?;
        let requested = static_requests(r.conf, r.env)?;
        let (host, subnets, vtep) = host_subnets(&conf)?;
        warn_stale_ranges(&conf, &host, &subnets);
        let store = Store::new(&conf.data_dir);
        let lock = store.lock().map_err(store_error)?;
        let mut st = lock.load().map_err(store_error)?;
        let before = st.clone();
        let who = owner(&conf, r);
        let got = if requested.is_empty() {
            // One address per family of the host's subnets (a dual-stack host: IPv4 first).
            let mut got = Vec::new();
            for family in by_family(&subnets) {
                got.push(
                    st.allocate_sticky(
                        &family,
                        vtep.as_slice(),
                        &who,
                        now_secs(),
                        conf.keep_released.as_secs(),
                    )
                    .map_err(|e| CniError::new(code::EXHAUSTED, format!("host {host:?}: {e}")))?,
                );
            }
            // A family the host no longer has: its old address goes.
            for ip in st.held_by(&who) {
                if !got.iter().any(|(g, _)| *g == ip) {
                    st.allocations.remove(&ip);
                }
            }
            got
        } else {
            claim_all(&mut st, &requested, &subnets, vtep, &who, &host)?
        };
        if st != before {
            lock.save(&st).map_err(store_error)?;
            tracing::info!(?got, container = %who.container, ifname = %who.ifname, "allocated");
        }
        drop(lock);
        Ok(result_for(&got, &conf))
    }

    fn del(&self, r: &Request) -> Result<(), CniError> {
        let conf = IpamConf::parse(r.conf)?;
        let store = Store::new(&conf.data_dir);
        if !store.state_path().exists() {
            return Ok(());
        }
        let lock = store.lock().map_err(store_error)?;
        let mut st = lock.load().map_err(store_error)?;
        let before = st.clone();
        let now = now_secs();
        st.prune_released(now, conf.keep_released.as_secs());
        let gone = if conf.keep_released.is_zero() {
            st.release(&owner(&conf, r))
        } else {
            st.release_keeping(&owner(&conf, r), now)
        };
        if st != before {
            lock.save(&st).map_err(store_error)?;
            tracing::info!(?gone, container = %r.env.container_id, "released");
        }
        Ok(())
    }

    fn check(&self, r: &Request) -> Result<(), CniError> {
        let conf = IpamConf::parse(r.conf)?;
        let store = Store::new(&conf.data_dir);
        let held = {
            let lock = store.lock().map_err(store_error)?;
            lock.load().map_err(store_error)?.held_by(&owner(&conf, r))
        };
        if held.is_empty() {
            return Err(CniError::new(
                code::CHECK_FAILED,
                format!(
                    "no address is allocated to container {} ifname {} in network {}",
                    r.env.container_id, r.env.ifname, conf.network
                ),
            ));
        }
        if let Some(prev) = &r.conf.prev_result {
            let prev = CniResult::from_json(prev)
                .map_err(|e| CniError::config(e.under("prevResult").to_string()))?;
            for ip in &prev.ips {
                // Only addresses of the family we hand out are ours to vouch for.
                if held
                    .iter()
                    .any(|h| h.is_ipv4() == ip.address.addr().is_ipv4())
                    && !held.contains(&ip.address.addr())
                {
                    return Err(CniError::new(
                        code::CHECK_FAILED,
                        format!(
                            "prevResult has {} but the allocation store gives {} to this container",
                            ip.address,
                            held.iter()
                                .map(ToString::to_string)
                                .collect::<Vec<_>>()
                                .join(", ")
                        ),
                    ));
                }
            }
        }
        Ok(())
    }

    fn gc(&self, r: &Request) -> Result<(), CniError> {
        let conf = IpamConf::parse(r.conf)?;
        let valid = valid_attachments(&r.conf.doc)?;
        let store = Store::new(&conf.data_dir);
        if !store.state_path().exists() {
            return Ok(());
        }
        let lock = store.lock().map_err(store_error)?;
        let mut st = lock.load().map_err(store_error)?;
        let gone = st.gc(&conf.network, &valid);
        if !gone.is_empty() {
            lock.save(&st).map_err(store_error)?;
            tracing::info!(?gone, "gc released");
        }
        Ok(())
    }

    fn status(&self, r: &Request) -> Result<(), CniError> {
        let not_available =
            |e: CniError| CniError::new(code::NOT_AVAILABLE, e.msg).with_details(e.details);
        let conf = IpamConf::parse(r.conf)?;
        let (host, subnets, _) = host_subnets(&conf).map_err(not_available)?;
        let store = Store::new(&conf.data_dir);
        let free = {
            let lock = store.lock().map_err(|e| not_available(store_error(e)))?;
            lock.load()
                .map_err(|e| not_available(store_error(e)))?
                .free(&subnets)
        };
        if free == 0 {
            return Err(CniError::new(
                code::NOT_AVAILABLE,
                format!("host {host:?}: every address of its subnets is allocated"),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cni::config::NetConf;
    use crate::cni::plugin::dispatch;
    use serde_json::json;
    use std::collections::HashMap;

    struct Fixture {
        dir: tempfile::TempDir,
    }

    impl Fixture {
        fn new() -> Fixture {
            let dir = tempfile::tempdir().unwrap();
            std::fs::write(
                dir.path().join("mesh.json"),
                json!({
                    "network": {"cidr": "10.42.0.0/16"},
                    "hosts": [
                        {"id": "host-a", "agent_ip": "192.0.2.1", "subnets": ["10.42.1.0/29"]},
                        {"id": "host-b", "agent_ip": "192.0.2.2", "subnets": ["10.42.2.0/24"]},
                        {"id": "host-c", "agent_ip": "192.0.2.3", "subnets": []}
                    ]
                })
                .to_string(),
            )
            .unwrap();
            Fixture { dir }
        }

        fn conf(&self, host: &str) -> String {
            json!({
                "cniVersion": "1.0.0", "name": "mesh", "type": "bridge",
                "ipam": {"type": "ipsec-mesh-ipam",
                         "metadata": self.dir.path().join("mesh.json"),
                         "host": host,
                         "dataDir": self.dir.path().join("data"),
                         "routes": [{"dst": "0.0.0.0/0"}]}
            })
            .to_string()
        }

        fn run(&self, cmd: &str, container: &str, stdin: &str) -> (Value, bool) {
            self.run_args(cmd, container, stdin, "")
        }

        fn run_args(&self, cmd: &str, container: &str, stdin: &str, args: &str) -> (Value, bool) {
            let m: HashMap<&str, &str> = [
                ("CNI_COMMAND", cmd),
                ("CNI_CONTAINERID", container),
                ("CNI_NETNS", "/proc/self/ns/net"),
                ("CNI_IFNAME", "eth0"),
                ("CNI_ARGS", args),
            ]
            .into_iter()
            .collect();
            let o = dispatch(&Ipam, |k| m.get(k).map(|s| s.to_string()), stdin.as_bytes());
            let v = if o.stdout.is_empty() {
                Value::Null
            } else {
                serde_json::from_str(&o.stdout).unwrap()
            };
            (v, o.success)
        }
    }

    #[test]
    fn add_del_cycle() {
        let f = Fixture::new();
        let conf = f.conf("host-a");
        let (v, ok) = f.run("ADD", "c1", &conf);
        assert!(ok, "{v}");
        assert_eq!(
            v,
            json!({"cniVersion": "1.0.0",
                   "ips": [{"address": "10.42.1.2/29", "gateway": "10.42.1.1"}],
                   "routes": [{"dst": "0.0.0.0/0"}], "dns": {}})
        );
        // Same container, same answer.
        assert_eq!(f.run("ADD", "c1", &conf).0, v);
        let (v2, _) = f.run("ADD", "c2", &conf);
        assert_eq!(v2["ips"][0]["address"], "10.42.1.3/29");
        // CHECK with and without prevResult.
        let mut with_prev: Value = serde_json::from_str(&conf).unwrap();
        with_prev["prevResult"] = v.clone();
        assert!(f.run("CHECK", "c1", &with_prev.to_string()).1);
        let (e, ok) = f.run("CHECK", "c2", &with_prev.to_string());
        assert!(!ok && e["code"] == 105, "{e}");
        assert!(f.run("DEL", "c1", &conf).1);
        assert!(f.run("DEL", "c1", &conf).1, "DEL twice is fine");
        let (e, ok) = f.run("CHECK", "c1", &conf);
        assert!(!ok && e["code"] == 105, "{e}");
    }

    #[test]
    fn static_requests_are_honoured_or_refused_with_a_code() {
        let f = Fixture::new();
        let conf = f.conf("host-b"); // 10.42.2.0/24
        let (v, ok) = f.run_args("ADD", "c1", &conf, "IgnoreUnknown=1;IP=10.42.2.200");
        assert!(ok, "{v}");
        assert_eq!(
            v["ips"],
            json!([{"address": "10.42.2.200/24", "gateway": "10.42.2.1"}])
        );
        // The same request again: same answer; another container asking for it: 110.
        assert_eq!(f.run_args("ADD", "c1", &conf, "IP=10.42.2.200").0, v);
        let (e, ok) = f.run_args("ADD", "c2", &conf, "IP=10.42.2.200");
        assert!(!ok);
        assert_eq!(e["code"], 110, "{e}");
        assert_eq!(
            e["msg"],
            "requested address (CNI_ARGS IP) on host \"host-b\": 10.42.2.200 is in use by container c1 ifname eth0"
        );
        for (args, code, needle) in [
            (
                "IP=10.42.1.5",
                109,
                "10.42.1.5 is not in this host's subnets (10.42.2.0/24)",
            ),
            (
                "IP=10.42.2.1",
                109,
                "10.42.2.1 is the gateway of 10.42.2.0/24",
            ),
            ("IP=10.42.2.255", 109, "broadcast"),
            ("IP=nope", 7, "CNI_ARGS IP: \"nope\""),
        ] {
            let (e, ok) = f.run_args("ADD", "c2", &conf, args);
            assert!(!ok, "{args}");
            assert_eq!(e["code"], code, "{args}: {e}");
            assert!(e["msg"].as_str().unwrap().contains(needle), "{needle}: {e}");
        }
        // The ips capability (runtimeConfig), with a prefix that must match the subnet.
        let mut rc: Value = serde_json::from_str(&conf).unwrap();
        rc["runtimeConfig"] = json!({"ips": ["10.42.2.77/24"]});
        let (v, ok) = f.run("ADD", "c3", &rc.to_string());
        assert!(ok, "{v}");
        assert_eq!(v["ips"][0]["address"], "10.42.2.77/24");
        rc["runtimeConfig"] = json!({"ips": ["10.42.2.78/16"]});
        let (e, _) = f.run("ADD", "c4", &rc.to_string());
        assert_eq!(e["code"], 109, "{e}");
        assert!(
            e["msg"]
                .as_str()
                .unwrap()
                .contains("the subnet is 10.42.2.0/24"),
            "{e}"
        );
        // A container restarted with a static request gives up what was kept for it.
        assert!(f.run("DEL", "c3", &conf).1);
        let (v, ok) = f.run_args("ADD", "c3", &conf, "IP=10.42.2.77");
        assert!(ok, "{v}");
        let st: Value = serde_json::from_slice(
            &std::fs::read(f.dir.path().join("data/allocations.json")).unwrap(),
        )
        .unwrap();
        assert!(st.get("released").is_none(), "{st}");
        // Failed requests allocated nothing; dynamic allocation avoids claimed addresses.
        let (v, _) = f.run("ADD", "c5", &conf);
        assert_eq!(v["ips"][0]["address"], "10.42.2.2/24");
        let st: Value = serde_json::from_slice(
            &std::fs::read(f.dir.path().join("data/allocations.json")).unwrap(),
        )
        .unwrap();
        let held: Vec<&String> = st["allocations"].as_object().unwrap().keys().collect();
        assert_eq!(held, ["10.42.2.2", "10.42.2.200", "10.42.2.77"]);
    }

    /// Issue 18 item 2: a dual-stack host gives each container one address per family, each
    /// with its gateway; CHECK vouches for both; DEL releases both and keeps both for the
    /// container (keepReleasedSeconds), which gets both back.
    #[test]
    fn dual_stack_host_one_address_per_family() {
        let f = Fixture::new();
        std::fs::write(
            f.dir.path().join("mesh.json"),
            json!({
                "network": {"cidr": ["10.42.0.0/16", "fd42::/48"]},
                "hosts": [
                    {"id": "host-a", "agent_ip": "192.0.2.1",
                     "subnets": ["fd42:0:0:1::/64", "10.42.1.0/29"]},
                    {"id": "host-b", "agent_ip": "192.0.2.2", "subnets": ["10.42.2.0/24"]}
                ]
            })
            .to_string(),
        )
        .unwrap();
        let mut conf: Value = serde_json::from_str(&f.conf("host-a")).unwrap();
        conf["ipam"]["routes"] = json!([{"dst": "0.0.0.0/0"}, {"dst": "::/0"}]);
        let conf = conf.to_string();
        let (v, ok) = f.run("ADD", "c1", &conf);
        assert!(ok, "{v}");
        assert_eq!(
            v,
            json!({"cniVersion": "1.0.0",
                   "ips": [{"address": "10.42.1.2/29", "gateway": "10.42.1.1"},
                           {"address": "fd42:0:0:1::2/64", "gateway": "fd42:0:0:1::1"}],
                   "routes": [{"dst": "0.0.0.0/0"}, {"dst": "::/0"}], "dns": {}})
        );
        assert_eq!(
            f.run("ADD", "c1", &conf).0,
            v,
            "same container, same answer"
        );
        let (v2, _) = f.run("ADD", "c2", &conf);
        assert_eq!(v2["ips"][0]["address"], "10.42.1.3/29");
        assert_eq!(v2["ips"][1]["address"], "fd42:0:0:1::3/64");
        let mut with_prev: Value = serde_json::from_str(&conf).unwrap();
        with_prev["prevResult"] = v.clone();
        assert!(f.run("CHECK", "c1", &with_prev.to_string()).1);
        // A prevResult whose IPv6 address is not c1's fails CHECK.
        let mut wrong = with_prev.clone();
        wrong["prevResult"]["ips"][1]["address"] = "fd42:0:0:1::3/64".into();
        let (e, ok) = f.run("CHECK", "c1", &wrong.to_string());
        assert!(!ok && e["code"] == 105, "{e}");
        // DEL keeps both for c1; a newcomer gets neither; c1 gets both back.
        assert!(f.run("DEL", "c1", &conf).1);
        let (v3, _) = f.run("ADD", "c3", &conf);
        assert_eq!(v3["ips"][0]["address"], "10.42.1.4/29");
        assert_eq!(v3["ips"][1]["address"], "fd42:0:0:1::4/64");
        assert_eq!(f.run("ADD", "c1", &conf).0, v);
        // Both released for good with keepReleasedSeconds 0.
        let mut no_keep: Value = serde_json::from_str(&conf).unwrap();
        no_keep["ipam"]["keepReleasedSeconds"] = json!(0);
        assert!(f.run("DEL", "c1", &no_keep.to_string()).1);
        let store = Store::new(f.dir.path().join("data"));
        let st = store.lock().unwrap().load().unwrap();
        let c1: Vec<_> = st
            .allocations
            .values()
            .filter(|o| o.container == "c1")
            .collect();
        assert!(
            c1.is_empty()
                && st
                    .released
                    .keys()
                    .all(|ip| !["10.42.1.2", "fd42:0:0:1::2"].contains(&ip.to_string().as_str()))
        );
        // The host drops its IPv6 subnet: c2's IPv6 address goes at its next ADD.
        std::fs::write(
            f.dir.path().join("mesh.json"),
            json!({"network": {"cidr": ["10.42.0.0/16", "fd42::/48"]},
                   "hosts": [{"id": "host-a", "agent_ip": "192.0.2.1", "subnets": ["10.42.1.0/29"]}]})
            .to_string(),
        )
        .unwrap();
        let (v2b, ok) = f.run("ADD", "c2", &conf);
        assert!(ok, "{v2b}");
        assert_eq!(
            v2b["ips"],
            json!([{"address": "10.42.1.3/29", "gateway": "10.42.1.1"}])
        );
        let store = Store::new(f.dir.path().join("data"));
        let st = store.lock().unwrap().load().unwrap();
        assert!(!st
            .allocations
            .keys()
            .any(|ip| ip.to_string() == "fd42:0:0:1::3"));
    }

    #[test]
    fn del_then_add_keeps_the_address() {
        let f = Fixture::new();
        let conf = f.conf("host-b");
        let a = f.run("ADD", "c1", &conf).0["ips"][0]["address"].clone();
        let b = f.run("ADD", "c2", &conf).0["ips"][0]["address"].clone();
        assert!(f.run("DEL", "c1", &conf).1);
        // A newcomer does not get c1's address while it is kept.
        let c = f.run("ADD", "c3", &conf).0["ips"][0]["address"].clone();
        assert!(c != a && c != b, "{c}");
        // c1 restarts (DEL, then ADD of the same id): same address.
        assert_eq!(f.run("ADD", "c1", &conf).0["ips"][0]["address"], a);
        // With keepReleasedSeconds 0 a DEL forgets at once (round-robin moves on).
        let mut no_keep: Value = serde_json::from_str(&conf).unwrap();
        no_keep["ipam"]["keepReleasedSeconds"] = json!(0);
        let no_keep = no_keep.to_string();
        assert!(f.run("DEL", "c2", &no_keep).1);
        assert_ne!(f.run("ADD", "c2", &no_keep).0["ips"][0]["address"], b);
    }

    #[test]
    fn exhaustion_status_and_gc() {
        let f = Fixture::new();
        let conf = f.conf("host-a");
        // 10.42.1.0/29: .2 ..= .6.
        for i in 0..5 {
            assert!(f.run("ADD", &format!("c{i}"), &conf).1);
        }
        let (e, ok) = f.run("ADD", "c5", &conf);
        assert!(!ok);
        assert_eq!(e["code"], 103);
        assert!(e["msg"].as_str().unwrap().contains("10.42.1.0/29"), "{e}");
        let (e, ok) = f.run("STATUS", "", &conf);
        assert!(!ok && e["code"] == 50, "{e}");
        let mut gc: Value = serde_json::from_str(&conf).unwrap();
        gc["cniVersion"] = "1.1.0".into();
        gc["cni.dev/valid-attachments"] = json!([{"containerID": "c3", "ifname": "eth0"}]);
        assert!(f.run("GC", "", &gc.to_string()).1);
        assert!(f.run("STATUS", "", &conf).1);
        // c3 kept its address.
        assert_eq!(
            f.run("ADD", "c3", &conf).0["ips"][0]["address"],
            "10.42.1.5/29"
        );
    }

    #[test]
    fn host_errors() {
        let f = Fixture::new();
        let (e, _) = f.run("ADD", "c1", &f.conf("host-x"));
        assert_eq!(e["code"], 102);
        assert!(
            e["msg"]
                .as_str()
                .unwrap()
                .contains("host-a, host-b, host-c"),
            "{e}"
        );
        let (e, _) = f.run("ADD", "c1", &f.conf("host-c"));
        assert_eq!(e["code"], 102);
        assert!(
            e["msg"].as_str().unwrap().contains("no container subnet"),
            "{e}"
        );
        let mut c: Value = serde_json::from_str(&f.conf("host-a")).unwrap();
        c["ipam"]["metadata"] = "/nonexistent/mesh.json".into();
        let (e, _) = f.run("ADD", "c1", &c.to_string());
        assert_eq!(e["code"], 101);
        // DEL does not need the metadata.
        assert!(f.run("DEL", "c1", &c.to_string()).1);
    }

    #[test]
    fn valid_attachments_parse() {
        let conf = NetConf::parse(
            json!({"cniVersion": "1.1.0", "name": "n", "type": "t",
                   "cni.dev/valid-attachments": [{"containerID": "a", "ifname": "eth0"}, {"containerID": "b"}]})
            .to_string()
            .as_bytes(),
        )
        .unwrap();
        let e = valid_attachments(&conf.doc).unwrap_err();
        assert!(e.msg.contains("[1]"), "{e}");
    }
}

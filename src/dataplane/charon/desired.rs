//! Pure parts of the charon driver: the conns and the shared key a plan asks for, and the
//! diff against what charon has loaded (as [`listed`](super::listed) normalises it). No
//! I/O: everything here is unit-tested. SA state per conn is in [`sas`](super::sas),
//! charon's failures in words in [`failure`](super::failure).
//!
//! ## Names, identities, ownership
//! - Conn **and** child of peer `P`: `ipsec-mesh-P` (child names must be unique across all
//!   conns: `initiate child=` takes the first conn that has one of that name).
//! - IKE identities are the host ids as FQDN identities: `fqdn:<host-id>` (charon lists them
//!   as `<host-id>`). Host ids are stable while agent addresses may change, and they name
//!   the hosts in charon's log lines. Both ends of a pair compute the same ids.
//! - The PSK is loaded as one shared key whose `id` is `ipsec-mesh-psk-<fingerprint>`, the
//!   fingerprint covering the secret and the owners (self + every peer identity): a new
//!   secret or a membership change loads a key under a new id, then unloads the old one
//!   (no moment without a key). The fingerprint is a truncated SHA-256 of a
//!   domain-separated encoding; it does not reveal the secret.
//! - Ours = conns named `ipsec-mesh-*`, shared keys with id `ipsec-mesh-psk-*`. Nothing
//!   else is ever modified or unloaded.
//!
//! ## One side of each pair is in charge
//! The host with the lower id (byte order) is the pair's **initiator**: it initiates, rekeys
//! (IKE `rekey_time`, child `rekey_time`), and restarts lost SAs (`dpd_action = restart`,
//! `close_action = restart`). The other side is the **responder**: `rekey_time = 0` for IKE
//! and child (so no rekey collisions and no duplicate SAs), `dpd_action = clear`,
//! `close_action = none`; it only initiates a missing child after a grace period in which
//! the initiator did not bring it up (the case of a restarted responder, whose peer still
//! holds the old SA: the responder's `INITIAL_CONTACT` makes the peer drop it). Both sides
//! `reauth_time = 0`, `unique = replace`, `start_action = none` (the driver initiates itself
//! so that failures come back as answers it can put into words).
//!
//! ## What list-conns does not show
//! `list-conns` shows neither proposals nor `encap`, `mobike`, `start_action`, `policies`,
//! `reqid`, ESP proposals. The driver therefore loads each conn with a digest of its whole
//! `load-conn` body in `dpd_timeout`, an IKEv1-only option that charon lists but never uses
//! for IKEv2 conns. A conn is unchanged iff every listed field matches (after
//! normalisation) **and** the digest matches. Because charon keeps the old conn object when
//! only children change (`updated vici connection`, without the new `dpd_timeout`), a
//! changed conn is replaced by `unload-conn` + `load-conn`; with `start_action = none`
//! neither touches established SAs.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use ring::digest;

use super::listed::{sorted_ts, ListedConn};
use super::types::{AuthConfig, ChildConfig, ConnConfig, SaAction, StartAction, Unique};
use super::wire::{encode_message, Message};
use crate::plan::{Plan, Psk};

/// Prefix of every conn (and child) name the driver owns.
pub const CONN_PREFIX: &str = "ipsec-mesh-";
/// Prefix of every shared-key id the driver owns.
pub const SHARED_PREFIX: &str = "ipsec-mesh-psk-";
/// Lowest `dpd_timeout` carrying a digest (2^30 s: no real timeout is that long).
const DIGEST_BASE: u32 = 1 << 30;

/// Name of the conn (and of its only child) for peer `peer`.
pub fn conn_name(peer: &str) -> String {
    format!("{CONN_PREFIX}{peer}")
}

/// The peer's host id of one of our conn names.
pub fn peer_of(conn: &str) -> Option<&str> {
    conn.strip_prefix(CONN_PREFIX).filter(|p| !p.is_empty())
}

/// IKE identity of a host, as loaded.
pub fn identity(host: &str) -> String {
    format!("fqdn:{host}")
}

/// Which side of a pair is in charge (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// Lower host id: initiates, rekeys, restarts.
    Initiator,
    /// Higher host id: answers; initiates only after a grace period.
    Responder,
}

impl Role {
    pub fn of(me: &str, peer: &str) -> Role {
        if me.as_bytes() < peer.as_bytes() {
            Role::Initiator
        } else {
            Role::Responder
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Initiator => "initiator",
            Role::Responder => "responder",
        }
    }
}

/// Exponential backoff for re-initiating a lost child.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backoff {
    /// First wait after a loss (the responder adds [`CharonConfig::responder_grace`]).
    pub initial: Duration,
    /// Waits double up to this.
    pub max: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            initial: Duration::from_secs(1),
            max: Duration::from_secs(60),
        }
    }
}

/// Settings of the charon driver.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CharonConfig {
    /// charon's VICI socket (`charon.plugins.vici.socket` without `unix://`).
    pub vici_socket: std::path::PathBuf,
    /// IKE proposals (default AEAD: `aes256gcm16-prfsha256-ecp256`).
    pub ike_proposals: Vec<String>,
    /// ESP proposals (default AEAD: `aes256gcm16`; add a DH group for PFS).
    pub esp_proposals: Vec<String>,
    /// Force UDP encapsulation of ESP (also forced when the plan asks for it). kernel-libipsec
    /// encapsulates anyway.
    pub encap: bool,
    /// charon installs the IPsec policies (default; required with kernel-libipsec). `false`:
    /// `policies = no` and the child's `reqid` is the plan's, so ipsec-mesh's own XFRM
    /// policy layer can reference the SAs.
    pub policies: bool,
    /// IKE_SA rekey interval on the initiator side (the responder never rekeys).
    pub ike_rekey_time: Duration,
    /// CHILD_SA rekey interval on the initiator side.
    pub child_rekey_time: Duration,
    /// Liveness check interval (`dpd_delay`); zero disables DPD.
    pub dpd_delay: Duration,
    /// How long one `initiate` may take before it is reported as failed (charon keeps
    /// trying in the background).
    pub initiate_timeout: Duration,
    /// How long a responder waits for the initiator to bring a missing child up before it
    /// initiates itself.
    pub responder_grace: Duration,
    /// Parallel VICI connections used for initiates (each initiate occupies one until
    /// charon answers).
    pub initiate_parallelism: usize,
    /// Re-initiation of lost children by the watcher.
    pub backoff: Backoff,
}

impl Default for CharonConfig {
    fn default() -> Self {
        Self {
            vici_socket: "/run/ipsec-mesh/charon.vici".into(),
            ike_proposals: vec!["aes256gcm16-prfsha256-ecp256".into()],
            esp_proposals: vec!["aes256gcm16".into()],
            encap: false,
            policies: true,
            ike_rekey_time: Duration::from_secs(4 * 3600),
            child_rekey_time: Duration::from_secs(3600),
            dpd_delay: Duration::from_secs(10),
            initiate_timeout: Duration::from_secs(10),
            responder_grace: Duration::from_secs(2),
            initiate_parallelism: 4,
            backoff: Backoff::default(),
        }
    }
}

/// One conn the plan asks for.
#[derive(Debug, Clone)]
pub struct DesiredConn {
    pub peer: String,
    pub role: Role,
    pub config: ConnConfig,
    /// Digest of the `load-conn` body, carried in `dpd_timeout`.
    pub digest: u32,
    /// The conn's section as loaded (the config plus `dpd_timeout`).
    pub body: Message,
    /// Encoded size of `body`, in bytes (to keep packed `load-conn`s under charon's limit).
    pub wire_len: usize,
}

impl DesiredConn {
    /// A desired conn from its config: computes the digest and the section to load.
    pub fn new(peer: &str, role: Role, config: ConnConfig) -> DesiredConn {
        let mut body = config.to_section();
        let mut bytes = Vec::new();
        // a conn body always encodes (names and values are short)
        let _ = encode_message(&body, &mut bytes);
        let d = digest::digest(&digest::SHA256, &bytes);
        let v = u32::from_be_bytes([d.as_ref()[0], d.as_ref()[1], d.as_ref()[2], d.as_ref()[3]]);
        let digest = DIGEST_BASE | (v & (DIGEST_BASE - 1));
        body.push_str("dpd_timeout", digest.to_string());
        DesiredConn {
            peer: peer.to_string(),
            role,
            wire_len: bytes.len() + config.name.len() + 32,
            config,
            digest,
            body,
        }
    }

    pub fn name(&self) -> &str {
        &self.config.name
    }

    /// The `load-conn` request body: `{ <name> { ...; dpd_timeout = <digest> } }`.
    pub fn load_message(&self) -> Message {
        Message::new().with_section(&self.config.name, self.body.clone())
    }

    /// What `list-conns` should show for this conn.
    pub fn expected(&self) -> ListedConn {
        ListedConn::of(&self.config, self.digest)
    }
}

/// The shared key the plan asks for (the secret itself stays in the caller's [`Psk`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DesiredShared {
    pub id: String,
    pub owners: Vec<String>,
}

/// Everything the plan asks charon for.
#[derive(Debug, Clone)]
pub struct Desired {
    /// By conn name.
    pub conns: BTreeMap<String, DesiredConn>,
    pub shared: DesiredShared,
    /// Peers without a conn, with the reason (no subnets on one side).
    pub skipped: Vec<(String, String)>,
}

fn secs(d: Duration) -> u32 {
    u32::try_from(d.as_secs()).unwrap_or(u32::MAX)
}

/// Fingerprint of the PSK and its owners: the shared key's id.
pub fn shared_id(psk: &Psk, owners: &[String]) -> String {
    let mut ctx = digest::Context::new(&digest::SHA256);
    ctx.update(b"ipsec-mesh/v1 charon shared key");
    ctx.update(&(psk.expose().len() as u64).to_be_bytes());
    ctx.update(psk.expose());
    for o in owners {
        ctx.update(&(o.len() as u64).to_be_bytes());
        ctx.update(o.as_bytes());
    }
    let d = ctx.finish();
    let hex: String = d.as_ref()[..8].iter().map(|b| format!("{b:02x}")).collect();
    format!("{SHARED_PREFIX}{hex}")
}

/// The conns and the shared key `plan` asks for.
pub fn desired(plan: &Plan, psk: &Psk, cfg: &CharonConfig) -> Desired {
    let me = plan.host.as_str();
    let mut conns = BTreeMap::new();
    let mut skipped = Vec::new();
    let encap = cfg.encap || plan.udp_encap;
    for p in &plan.peers {
        let peer = p.host.as_str();
        if plan.subnets.is_empty() || p.subnets.is_empty() {
            let whose = if plan.subnets.is_empty() {
                format!("this host ({me})")
            } else {
                format!("peer {peer}")
            };
            skipped.push((
                peer.to_string(),
                format!("no conn: {whose} has no container subnet"),
            ));
            continue;
        }
        let role = Role::of(me, peer);
        let init = role == Role::Initiator;
        let name = conn_name(peer);
        let mut c = ConnConfig::ikev2(
            &name,
            AuthConfig::psk(identity(me)),
            AuthConfig::psk(identity(peer)),
        );
        c.local_addrs = vec![plan.endpoint.to_string()];
        c.remote_addrs = vec![p.endpoint.to_string()];
        c.proposals = cfg.ike_proposals.clone();
        c.encap = encap;
        c.mobike = false;
        c.unique = Some(Unique::Replace);
        let dpd = secs(cfg.dpd_delay);
        c.dpd_delay = (dpd > 0).then_some(dpd);
        c.rekey_time = Some(if init { secs(cfg.ike_rekey_time) } else { 0 });
        c.reauth_time = Some(0);
        let mut ch = ChildConfig::tunnel(
            &name,
            sorted_ts(
                &plan
                    .subnets
                    .iter()
                    .map(|n| n.to_string())
                    .collect::<Vec<_>>(),
            ),
            sorted_ts(&p.subnets.iter().map(|n| n.to_string()).collect::<Vec<_>>()),
        );
        ch.esp_proposals = cfg.esp_proposals.clone();
        ch.rekey_time = Some(if init { secs(cfg.child_rekey_time) } else { 0 });
        ch.start_action = StartAction::None;
        ch.dpd_action = if init {
            SaAction::Restart
        } else {
            SaAction::Clear
        };
        ch.close_action = if init {
            SaAction::Restart
        } else {
            SaAction::None
        };
        ch.policies = cfg.policies;
        if !cfg.policies {
            ch.reqid = Some(p.reqid);
        }
        c.children = vec![ch];
        conns.insert(name, DesiredConn::new(peer, role, c));
    }
    // sorted: every host of the cluster computes the same id
    let mut owners = vec![identity(me)];
    owners.extend(plan.peers.iter().map(|p| identity(p.host.as_str())));
    owners.sort();
    let shared = DesiredShared {
        id: shared_id(psk, &owners),
        owners,
    };
    Desired {
        conns,
        shared,
        skipped,
    }
}

/// What to do with the conns.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConnDiff {
    /// Not loaded yet.
    pub add: Vec<String>,
    /// Loaded but different: `(name, differences)`; replaced by unload + load.
    pub change: Vec<(String, Vec<String>)>,
    /// Ours but not desired.
    pub remove: Vec<String>,
    pub unchanged: Vec<String>,
}

/// Compares desired conns with the listed ones; listed conns that are not ours are ignored.
pub fn diff_conns(desired: &Desired, listed: &[ListedConn]) -> ConnDiff {
    let mut d = ConnDiff::default();
    let mut seen = BTreeSet::new();
    let ours: BTreeMap<&str, &ListedConn> = listed
        .iter()
        .filter(|l| peer_of(&l.name).is_some())
        .map(|l| (l.name.as_str(), l))
        .collect();
    for (name, want) in &desired.conns {
        seen.insert(name.as_str());
        match ours.get(name.as_str()) {
            None => d.add.push(name.clone()),
            Some(have) => {
                let diffs = have.differences(&want.expected());
                if diffs.is_empty() {
                    d.unchanged.push(name.clone());
                } else {
                    d.change.push((name.clone(), diffs));
                }
            }
        }
    }
    d.remove = ours
        .keys()
        .filter(|n| !seen.contains(*n))
        .map(|n| n.to_string())
        .collect();
    d
}

/// What the shared keys need.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SharedDiff {
    pub load: bool,
    /// Our ids other than the desired one (unloaded once the desired one is in).
    pub remove: Vec<String>,
}

pub fn diff_shared(desired: &DesiredShared, loaded_ids: &[String]) -> SharedDiff {
    SharedDiff {
        load: !loaded_ids.contains(&desired.id),
        remove: loaded_ids
            .iter()
            .filter(|i| i.starts_with(SHARED_PREFIX) && **i != desired.id)
            .cloned()
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Cluster, RawCluster, RawHost, RawNetwork};
    use crate::plan::{plan, PlanOptions};

    pub(crate) fn cluster(n: usize) -> Cluster {
        let ids: Vec<String> = (0..n)
            .map(|i| format!("host-{}", (b'a' + i as u8) as char))
            .collect();
        let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
        crate::test_cluster::valid(&crate::test_cluster::lettered(&ids))
    }

    fn psk() -> Psk {
        Psk::from_bytes(&[5u8; 32])
    }

    fn want(me: &str) -> Desired {
        let p = plan(&cluster(3), me, &PlanOptions::default(), None).unwrap();
        desired(&p, &psk(), &CharonConfig::default())
    }

    #[test]
    fn roles_are_complementary_and_one_side_rekeys() {
        let a = want("host-a");
        let b = want("host-b");
        let ab = &a.conns["ipsec-mesh-host-b"];
        let ba = &b.conns["ipsec-mesh-host-a"];
        assert_eq!((ab.role, ba.role), (Role::Initiator, Role::Responder));
        assert_eq!(ab.config.rekey_time, Some(14400));
        assert_eq!(ba.config.rekey_time, Some(0));
        assert_eq!(ab.config.children[0].rekey_time, Some(3600));
        assert_eq!(ba.config.children[0].rekey_time, Some(0));
        assert_eq!(ab.config.children[0].dpd_action, SaAction::Restart);
        assert_eq!(ba.config.children[0].dpd_action, SaAction::Clear);
        assert_eq!(ab.config.children[0].close_action, SaAction::Restart);
        assert_eq!(ba.config.children[0].close_action, SaAction::None);
        // child name = conn name; ts mirror each other; ids mirror each other
        assert_eq!(ab.config.children[0].name, "ipsec-mesh-host-b");
        assert_eq!(
            ab.config.children[0].local_ts,
            ba.config.children[0].remote_ts
        );
        assert_eq!(ab.config.local, ba.config.remote);
        assert_eq!(ab.config.local.id.as_deref(), Some("fqdn:host-a"));
        // every host loads the same key id (same PSK, same sorted owners)
        assert_eq!(a.shared.owners.len(), 3);
        assert_eq!(a.shared.id, b.shared.id);
    }

    #[test]
    fn shared_id_changes_with_secret_and_owners_and_hides_the_secret() {
        let o = vec!["fqdn:a".to_string(), "fqdn:b".to_string()];
        let id = shared_id(&psk(), &o);
        assert!(id.starts_with(SHARED_PREFIX) && id.len() == SHARED_PREFIX.len() + 16);
        assert_eq!(id, shared_id(&psk(), &o));
        assert_ne!(id, shared_id(&Psk::from_bytes(&[6u8; 32]), &o));
        assert_ne!(id, shared_id(&psk(), &o[..1]));
        assert!(!id.contains("0505"));
    }

    #[test]
    fn digest_rides_in_dpd_timeout_and_covers_unlisted_settings() {
        let a = want("host-a");
        let c = &a.conns["ipsec-mesh-host-b"];
        let m = c.load_message();
        let body = m.section("ipsec-mesh-host-b").unwrap();
        assert_eq!(body.str("dpd_timeout"), Some(c.digest.to_string().as_str()));
        assert!(c.digest >= DIGEST_BASE);
        let p = plan(&cluster(3), "host-a", &PlanOptions::default(), None).unwrap();
        let cfg = CharonConfig {
            esp_proposals: vec!["aes128gcm16".into()],
            ..Default::default()
        };
        let other = desired(&p, &psk(), &cfg);
        assert_ne!(other.conns["ipsec-mesh-host-b"].digest, c.digest);
        let diffs = c
            .expected()
            .differences(&other.conns["ipsec-mesh-host-b"].expected());
        assert_eq!(diffs.len(), 1, "{diffs:?}");
        assert!(diffs[0].contains("does not show"));
    }

    #[test]
    fn peers_without_subnets_get_no_conn() {
        let mut raw = RawCluster {
            network: RawNetwork {
                cidr: "10.42.0.0/16".into(),
                backend: None,
                mtu: None,
            },
            hosts: vec![],
        };
        for (i, s) in [vec!["10.42.1.0/24".to_string()], vec![]]
            .into_iter()
            .enumerate()
        {
            raw.hosts.push(RawHost {
                id: format!("h{i}"),
                agent_ip: format!("192.168.77.{}", i + 1),
                subnets: s,
                ..Default::default()
            });
        }
        let c = Cluster::validate(&raw).unwrap();
        let p = plan(&c, "h0", &PlanOptions::default(), None).unwrap();
        let d = desired(&p, &psk(), &CharonConfig::default());
        assert!(d.conns.is_empty());
        assert_eq!(d.skipped.len(), 1);
        assert!(d.skipped[0].1.contains("peer h1"), "{:?}", d.skipped);
    }

    #[test]
    fn conn_names() {
        assert_eq!(peer_of("ipsec-mesh-host-b"), Some("host-b"));
        assert_eq!(peer_of("ipsec-mesh-"), None);
        // conn names and shared-key ids are separate namespaces: a host may be called psk-1
        assert_eq!(peer_of("ipsec-mesh-psk-1"), Some("psk-1"));
        assert_eq!(peer_of("other"), None);
    }

    fn listed_from(c: &DesiredConn) -> ListedConn {
        c.expected()
    }

    #[test]
    fn diff_adds_changes_removes_and_ignores_foreign() {
        let a = want("host-a");
        let ab = listed_from(&a.conns["ipsec-mesh-host-b"]);
        let mut ac = listed_from(&a.conns["ipsec-mesh-host-c"]);
        ac.children[0].remote_ts = vec!["10.42.9.0/24".into()];
        let gone = ListedConn {
            name: "ipsec-mesh-host-z".into(),
            ..Default::default()
        };
        let foreign = ListedConn {
            name: "office-vpn".into(),
            ..Default::default()
        };
        let d = diff_conns(&a, &[ab, ac, gone, foreign]);
        assert_eq!(d.unchanged, vec!["ipsec-mesh-host-b"]);
        assert_eq!(d.change.len(), 1);
        assert!(d.change[0].1[0].contains("remote_ts"), "{:?}", d.change);
        assert_eq!(d.remove, vec!["ipsec-mesh-host-z"]);
        assert!(d.add.is_empty());
        let d = diff_conns(&a, &[]);
        assert_eq!(d.add.len(), 2);
    }

    #[test]
    fn shared_diff_keeps_foreign_keys() {
        let s = DesiredShared {
            id: "ipsec-mesh-psk-aa".into(),
            owners: vec![],
        };
        let d = diff_shared(
            &s,
            &[
                "ipsec-mesh-psk-aa".into(),
                "ipsec-mesh-psk-old".into(),
                "office".into(),
            ],
        );
        assert_eq!(
            d,
            SharedDiff {
                load: false,
                remove: vec!["ipsec-mesh-psk-old".into()]
            }
        );
        assert!(diff_shared(&s, &[]).load);
    }
}

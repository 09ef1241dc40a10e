//! Route mode with one collect_md XFRM interface ([`crate::dataplane::xfrmi::RouteDevices::One`]):
//! the source check, as one nftables table of its own (`inet ipsec-mesh-src`), whatever the
//! firewall backend.
//!
//! With an interface per peer, a decrypted packet's incoming interface names its peer and the
//! reverse-path rule of the firewall backend checks its source against the routes. With one
//! interface for all peers every remote source routes back out of it, so that rule can no
//! longer tell peers apart: a peer holding its own keys could send with another peer's
//! container addresses. What still names the peer is the SA the packet was decrypted by (its
//! reqid, the peer's: [`crate::plan::Peer::reqid`]), which nftables reads as `ipsec in reqid`
//! (the secpath stays on the packet through the XFRM interface). So:
//!
//! ```text
//! table inet ipsec-mesh-src {
//!     map src4 { type ipv4_addr : verdict; flags interval;
//!                elements = { 10.42.7.8/31 : goto p50000001, ... } }   # each peer's prefixes
//!     chain p50000001 { ipsec in reqid != 1342177281 counter drop }   # one per peer
//!     chain prerouting { type filter hook prerouting priority raw; policy accept;
//!         iifname "imxmesh" meta secpath missing counter drop
//!         iifname "imxmesh" meta nfproto ipv4 ip saddr vmap @src4
//!         iifname "imxmesh" counter drop }
//! }
//! ```
//!
//! A packet decrypted by peer B's SA and arriving on the interface: a source in B's prefixes
//! -> B's chain, reqid equal -> the chain ends, the base chain's policy accepts it; in peer C's
//! prefixes -> C's chain, reqid differs -> dropped; in no peer's prefixes (this host's own
//! subnets, an underlay address, nobody's) -> no element -> the last rule drops it; a packet
//! on the interface without a secpath (nothing but decryption puts one there; the per-peer
//! chains would let it through, `ipsec in` matching nothing) -> the first rule. The map
//! is an interval set of one field (the kernel's rbtree set: a look-up is logarithmic in the
//! prefixes) and the rest is one comparison: per packet O(log prefixes), not O(peers); kernel
//! objects: one chain per peer and the prefixes as elements (no XFRM object per container).
//! Hooked at priority raw, before conntrack: a spoofed packet leaves no connection entry.
//! (The firewall backend's own reverse-path rule stays: it drops the same and more.)
//!
//! "0 writes when unchanged", as the nft backend ([`super::nft`]): the desired table is listed
//! in nft's canonical form once per change (loaded into a private network namespace), and the
//! live table is rewritten, in one transaction, only when its listing differs. Listing is not
//! cheap here: any `nft list` fetches every set element (measured on this machine's kernel:
//! ~0.5 s at 5,000 peers, ~10 s and ~380 MB for nft at 20,000), so a table once found or made
//! as wanted is not listed again while the namespace's nftables generation
//! (`NFT_MSG_GETGEN`, one netlink round trip; every nftables transaction of anyone moves it)
//! is the one seen right after: nothing in nftables changed, so neither did the table, and a
//! new table is written without listing the old. It is listed (and the wanted one in nft's
//! form) only when the generation moved otherwise: the first apply of a process, and after
//! anyone else's nftables transaction (another program's rules, a change by hand). Measured
//! on this machine's kernel at 20,000 peers (200,000 prefixes): a write (first, or a peer
//! gone) ~2.9 s, unchanged ~0.1 s; listing the table alone took ~10 s.

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::sync::Mutex;

use ipnet::IpNet;

use super::nft::Nft;
use super::{Family, FirewallError, FirewallReport};
use crate::dataplane::report::Change;
use crate::plan::Plan;

/// Our table (family `inet`).
pub const TABLE: &str = "ipsec-mesh-src";

/// What the check is built from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceSpec {
    /// The one XFRM interface.
    pub device: String,
    /// The overlay's families (a map and a rule each).
    pub families: Vec<Family>,
    /// Each peer's reqid and its prefixes (host bits cleared, aggregated per peer).
    pub peers: BTreeMap<u32, Vec<IpNet>>,
}

impl SourceSpec {
    pub fn from_plan(plan: &Plan, device: &str) -> SourceSpec {
        let families = crate::dataplane::xfrm::desired::overlay_families(plan)
            .into_iter()
            .map(|v6| if v6 { Family::V6 } else { Family::V4 })
            .collect();
        let peers = plan
            .peers
            .iter()
            .map(|p| {
                let nets: Vec<IpNet> = p.subnets.iter().map(IpNet::trunc).collect();
                (p.reqid, IpNet::aggregate(&nets))
            })
            .collect();
        SourceSpec {
            device: device.to_string(),
            families,
            peers,
        }
    }
}

fn chain(reqid: u32) -> String {
    format!("p{reqid:08x}")
}

/// The table as `nft -f` input (pure).
pub fn render(spec: &SourceSpec) -> String {
    let mut out = format!("table inet {TABLE} {{\n");
    for f in &spec.families {
        let (name, ty) = match f {
            Family::V4 => ("src4", "ipv4_addr"),
            Family::V6 => ("src6", "ipv6_addr"),
        };
        out += &format!("\tmap {name} {{\n\t\ttype {ty} : verdict\n\t\tflags interval\n");
        let elements: Vec<String> = spec
            .peers
            .iter()
            .flat_map(|(reqid, nets)| {
                nets.iter()
                    .filter(|n| Family::of(n) == *f)
                    .map(move |n| format!("{n} : goto {}", chain(*reqid)))
            })
            .collect();
        if !elements.is_empty() {
            out += &format!("\t\telements = {{ {} }}\n", elements.join(", "));
        }
        out += "\t}\n";
    }
    for reqid in spec.peers.keys() {
        out += &format!(
            "\tchain {} {{\n\t\tipsec in reqid != {reqid} counter drop\n\t}}\n",
            chain(*reqid)
        );
    }
    out += "\tchain prerouting {\n\t\ttype filter hook prerouting priority raw; policy accept;\n";
    // Only what an SA decrypted arrives on the interface; anything else would pass the
    // per-peer chains (`ipsec in` matches nothing without a secpath): dropped first.
    out += &format!(
        "\t\tiifname \"{}\" meta secpath missing counter drop\n",
        spec.device
    );
    for f in &spec.families {
        let (nfproto, field, map) = match f {
            Family::V4 => ("ipv4", "ip", "src4"),
            Family::V6 => ("ipv6", "ip6", "src6"),
        };
        out += &format!(
            "\t\tiifname \"{}\" meta nfproto {nfproto} {field} saddr vmap @{map}\n",
            spec.device
        );
    }
    out += &format!("\t\tiifname \"{}\" counter drop\n\t}}\n}}\n", spec.device);
    out
}

/// Desired body -> its canonical listing (one entry: the sidecar's current plan).
static CANONICAL: Mutex<Option<(String, String)>> = Mutex::new(None);

/// Can this host run the check? `nft` present and the kernel's nftables with the `ipsec`
/// expression (`nft_xfrm`) and interval verdict maps: the table is loaded into a private
/// network namespace (nothing of the host's is touched). `Err` says what is missing.
pub fn probe() -> Result<(), String> {
    let spec = SourceSpec {
        device: "imxprobe".into(),
        families: vec![Family::V4, Family::V6],
        peers: BTreeMap::from([(
            0x5000_0001,
            vec![
                "10.42.1.0/24".parse().expect("a prefix"),
                "fd42::/64".parse().expect("a prefix"),
            ],
        )]),
    };
    Nft::default()
        .canonical_named(TABLE, &render(&spec), &Mutex::new(None))
        .map(|_| ())
        .map_err(|e| format!("the source check needs nft with the kernel's nft_xfrm: {e}"))
}

/// The table known to be as wanted: its body, the network namespace (inode) and the nftables
/// generation right after it was found or made so.
struct Verified {
    body: String,
    netns: u64,
    generation: u32,
}

static VERIFIED: Mutex<Option<Verified>> = Mutex::new(None);

const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFT_MSG_NEWGEN: u16 = 15;
const NFT_MSG_GETGEN: u16 = 16;
const NFTA_GEN_ID: u16 = 1;

/// The calling thread's network namespace (its inode).
fn netns_id() -> Option<u64> {
    std::fs::metadata("/proc/thread-self/ns/net")
        .ok()
        .map(|m| m.ino())
}

/// The nftables generation of the calling thread's network namespace (`NFT_MSG_GETGEN`);
/// None when it cannot be asked.
pub fn ruleset_generation() -> Option<u32> {
    use netlink_sys::{protocols::NETLINK_NETFILTER, Socket};
    let mut sock = Socket::new(NETLINK_NETFILTER).ok()?;
    sock.bind_auto().ok()?;
    let mut req = Vec::with_capacity(20);
    req.extend(20u32.to_ne_bytes());
    req.extend(((NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETGEN).to_ne_bytes());
    req.extend((libc::NLM_F_REQUEST as u16).to_ne_bytes());
    req.extend(1u32.to_ne_bytes()); // sequence
    req.extend(0u32.to_ne_bytes()); // port id: the kernel's
    req.extend([0u8, 0, 0, 0]); // nfgenmsg: AF_UNSPEC, NFNETLINK_V0, res_id 0
    sock.send(&req, 0).ok()?;
    let mut buf = vec![0u8; 4096];
    let n = sock.recv(&mut &mut buf[..], 0).ok()?;
    parse_generation(&buf[..n])
}

/// `NFTA_GEN_ID` of a `NFT_MSG_NEWGEN` answer (pure).
fn parse_generation(b: &[u8]) -> Option<u32> {
    let u16_at = |i: usize| b.get(i..i + 2).map(|x| u16::from_ne_bytes([x[0], x[1]]));
    let len = b
        .get(0..4)
        .map(|x| u32::from_ne_bytes([x[0], x[1], x[2], x[3]]) as usize)?;
    if u16_at(4)? != (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWGEN || len > b.len() {
        return None;
    }
    let mut at = 20; // nlmsghdr, nfgenmsg
    while at + 4 <= len {
        let alen = u16_at(at)? as usize;
        if alen < 4 || at + alen > len {
            return None;
        }
        if u16_at(at + 2)? & 0x3fff == NFTA_GEN_ID && alen >= 8 {
            let v = &b[at + 4..at + 8];
            return Some(u32::from_be_bytes([v[0], v[1], v[2], v[3]]));
        }
        at += (alen + 3) & !3;
    }
    None
}

/// Remember `body` as the table's, if nothing but our own write (`wrote`) moved the
/// generation since `before` was read (else the next apply lists the table again). One
/// transaction moves it by 1, or by 2 where the kernel also counts its set garbage
/// collection (the "GC sequence" of later 6.1 stable kernels and newer).
fn remember(body: &str, netns: Option<u64>, before: Option<u32>, wrote: bool) {
    let after = ruleset_generation();
    let moved = |b: u32, a: u32| a.wrapping_sub(b);
    let ok = |b: u32, a: u32| {
        if wrote {
            (1..=2).contains(&moved(b, a))
        } else {
            a == b
        }
    };
    let v = match (netns, before, after) {
        (Some(netns), Some(b), Some(a)) if ok(b, a) => Some(Verified {
            body: body.to_string(),
            netns,
            generation: a,
        }),
        _ => None,
    };
    if let Ok(mut m) = VERIFIED.lock() {
        *m = v;
    }
}

/// Make the table match `spec`: 0 writes when it already does, else one transaction.
pub fn apply(spec: &SourceSpec) -> Result<FirewallReport, FirewallError> {
    let nft = Nft::default();
    let body = render(spec);
    let netns = netns_id();
    let before = ruleset_generation();
    // Nothing in nftables changed since the table was as remembered: unchanged, no listing;
    // changed, no listing either (what is there is known).
    let known = match (VERIFIED.lock(), before, netns) {
        (Ok(m), Some(g), Some(ns)) => m
            .as_ref()
            .filter(|v| v.netns == ns && v.generation == g)
            .map(|v| v.body == body),
        _ => None,
    };
    let live = match known {
        Some(true) => return Ok(FirewallReport::default()),
        Some(false) => Some(String::new()),
        None => {
            let live = nft.list_named(TABLE)?;
            // A table there and not known: compare in nft's own form (none: just write).
            if let Some(l) = &live {
                let want = nft.canonical_named(TABLE, &body, &CANONICAL)?;
                if super::nft::normalize(l) == want {
                    remember(&body, netns, before, false);
                    return Ok(FirewallReport::default());
                }
            }
            live
        }
    };
    nft.load(&format!(
        "table inet {TABLE}\ndelete table inet {TABLE}\n{body}"
    ))?;
    remember(&body, netns, before, true);
    let prefixes: usize = spec.peers.values().map(Vec::len).sum();
    let what = format!(
        "source check of {}: {} peers, {prefixes} prefixes",
        spec.device,
        spec.peers.len()
    );
    let object = format!("nftables table inet {TABLE}");
    Ok(FirewallReport {
        writes: 1,
        changes: vec![match live {
            Some(_) => Change::update(super::LAYER, object, Some("other".into()), Some(what)),
            None => Change::add(super::LAYER, format!("{object} ({what})")),
        }],
        ..FirewallReport::default()
    })
}

/// Delete the table if it exists (nothing, not even an error, without nft).
pub fn cleanup() -> Result<FirewallReport, FirewallError> {
    match Nft::default().drop_table(TABLE) {
        Err(FirewallError::MissingNft) => Ok(FirewallReport::default()),
        r => r,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn render_maps_each_peers_prefixes_to_its_chain() {
        let spec = SourceSpec {
            device: "imxmesh".into(),
            families: vec![Family::V4],
            peers: BTreeMap::from([
                (0x5000_0001, vec!["10.42.7.8/31".parse().unwrap()]),
                (
                    0x5000_0002,
                    vec![
                        "10.42.7.10/32".parse().unwrap(),
                        "fd42::/64".parse().unwrap(),
                    ],
                ),
            ]),
        };
        let r = render(&spec);
        assert!(r.contains(
            "elements = { 10.42.7.8/31 : goto p50000001, 10.42.7.10/32 : goto p50000002 }"
        ));
        assert!(!r.contains("fd42"), "no IPv6 map for an IPv4 overlay: {r}");
        assert!(r.contains("chain p50000002 {\n\t\tipsec in reqid != 1342177282 counter drop"));
        assert!(r.contains("iifname \"imxmesh\" meta nfproto ipv4 ip saddr vmap @src4\n"));
        assert!(r.ends_with("\t\tiifname \"imxmesh\" counter drop\n\t}\n}\n"));
        // No peers: no elements line (nft refuses an empty one), every packet dropped.
        let empty = render(&SourceSpec {
            peers: BTreeMap::new(),
            ..spec
        });
        assert!(!empty.contains("elements") && empty.contains("counter drop"));
    }

    #[test]
    fn generation_answers_parse() {
        // nlmsghdr (NEWGEN), nfgenmsg, NFTA_GEN_ID = 7 (big endian), NFTA_GEN_PROC_PID.
        let mut m = Vec::new();
        m.extend(36u32.to_ne_bytes());
        m.extend(((NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWGEN).to_ne_bytes());
        m.extend([0u8; 10]);
        m.extend([0u8, 0, 0, 7]);
        m.extend(8u16.to_ne_bytes());
        m.extend(NFTA_GEN_ID.to_ne_bytes());
        m.extend(7u32.to_be_bytes());
        m.extend(8u16.to_ne_bytes());
        m.extend(2u16.to_ne_bytes());
        m.extend(99u32.to_be_bytes());
        assert_eq!(parse_generation(&m), Some(7));
        assert_eq!(parse_generation(&m[..30]), None, "truncated");
        let mut err = m.clone();
        err[4..6].copy_from_slice(&2u16.to_ne_bytes()); // NLMSG_ERROR
        assert_eq!(parse_generation(&err), None);
    }

    #[test]
    fn from_plan_aggregates_per_peer_by_reqid() {
        let c = crate::test_cluster::valid(&crate::test_cluster::on_77(&["h1", "h2", "h3"]));
        let p = crate::plan::plan(&c, "h1", &Default::default(), None).unwrap();
        let s = SourceSpec::from_plan(&p, "imxmesh");
        assert_eq!(s.families, vec![Family::V4]);
        assert_eq!(s.peers.len(), 2);
        for peer in &p.peers {
            assert!(!s.peers[&peer.reqid].is_empty());
        }
    }
}

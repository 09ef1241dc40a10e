//! The route mode's XFRM interfaces as comparable values: which ones a plan wants, what a
//! dump is parsed into, which are ours, and the diff between the two (pure).

use std::collections::BTreeMap;
use std::fmt;

use crate::plan::ids::REQID_OWNER_MASK;
use crate::plan::{Peer, Plan};

/// Every interface of ours is named this followed by the peer's slot in hex (`imx3a2f1c`).
pub const NAME_PREFIX: &str = "imx";
/// The name of the one XFRM interface of the collect_md variant of route mode
/// ([`RouteDevices::One`](super::RouteDevices)): [`NAME_PREFIX`] and a word no slot makes
/// (slots are hex).
pub const ONE_NAME: &str = "imxmesh";
/// The link group (`ip link ... group 1042`) every interface of ours is in, so that a firewall
/// can match all of them with one comparison (`oifgroup 1042`, `-m devgroup`).
pub const LINK_GROUP: u32 = 1042;

/// The XFRM interface id of a peer: its reqid (unique per peer, stable while the peer
/// exists, in ipsec-mesh's range, never 0).
pub fn if_id(p: &Peer) -> u32 {
    p.reqid
}

/// The interface name for an interface id: [`NAME_PREFIX`] and the slot (at most 7 hex
/// digits, so at most 10 characters: under the kernel's 15).
pub fn name(if_id: u32) -> String {
    format!("{NAME_PREFIX}{:x}", if_id & !REQID_OWNER_MASK)
}

/// One interface the plan wants.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkSpec {
    pub name: String,
    pub if_id: u32,
    /// `IFLA_XFRM_LINK`: the underlay device's index (the encrypted packets leave there).
    pub underlay: u32,
    /// The overlay MTU of the plan (room for the ESP overhead left on the underlay).
    pub mtu: u32,
    /// The peer's host id, for errors.
    pub owner: String,
    /// The one interface in collect_md mode (`ip link add ... type xfrm external`, Linux
    /// 6.0 or later): no id and no link of its own (the kernel refuses both); each packet's id comes
    /// from its route (`encap xfrm if_id`) on the way out and from its SA on the way in.
    /// `if_id` is then 0 and `underlay` only keeps the interface out of the underlay
    /// device's index chain (it is not sent).
    pub collect_md: bool,
}

impl fmt::Display for LinkSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.collect_md {
            return write!(
                f,
                "xfrm interface {} external mtu {} group {LINK_GROUP}",
                self.name, self.mtu
            );
        }
        write!(
            f,
            "xfrm interface {} if_id {:#x} dev #{} mtu {} group {LINK_GROUP}",
            self.name, self.if_id, self.underlay, self.mtu
        )
    }
}

/// A link as dumped (only what ownership and the diff look at).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FoundLink {
    pub index: u32,
    pub name: String,
    pub kind: Option<String>,
    pub group: u32,
    pub up: bool,
    pub mtu: Option<u32>,
    pub if_id: Option<u32>,
    pub underlay: Option<u32>,
    /// `IFLA_XFRM_COLLECT_METADATA`: an `external` interface.
    pub collect_md: bool,
}

/// Whether a dumped link is ours: an XFRM interface in our group with our name prefix.
pub fn is_owned(l: &FoundLink) -> bool {
    l.kind.as_deref() == Some("xfrm") && l.group == LINK_GROUP && l.name.starts_with(NAME_PREFIX)
}

/// One interface per peer, bound to `underlay`.
pub fn desired(plan: &Plan, underlay: u32) -> Vec<LinkSpec> {
    plan.peers
        .iter()
        .map(|p| {
            let id = if_id(p);
            LinkSpec {
                name: name(id),
                if_id: id,
                underlay,
                mtu: u32::from(plan.mtu),
                owner: p.host.to_string(),
                collect_md: false,
            }
        })
        .collect()
}

/// The collect_md variant: one interface ([`ONE_NAME`]) for every peer (none for a plan
/// without peers), kept out of `underlay`'s index chain.
pub fn desired_one(plan: &Plan, underlay: u32) -> Vec<LinkSpec> {
    if plan.peers.is_empty() {
        return Vec::new();
    }
    vec![LinkSpec {
        name: ONE_NAME.into(),
        if_id: 0,
        underlay,
        mtu: u32::from(plan.mtu),
        owner: crate::dataplane::report::MESH.into(),
        collect_md: true,
    }]
}

/// One write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkOp {
    /// Create it (up, in our group) with interface index `index` (0: the kernel's choice;
    /// see [`assign_indexes`]).
    Create { spec: LinkSpec, index: u32 },
    /// Set MTU and up on an existing interface of ours.
    Set { index: u32, spec: LinkSpec },
    /// Delete an interface of ours (no longer wanted, or bound to another id or underlay).
    Delete { index: u32, name: String },
}

impl LinkOp {
    pub fn describe(&self) -> String {
        match self {
            LinkOp::Create { spec, index: 0 } => format!("create {spec}"),
            LinkOp::Create { spec, index } => format!("create {spec} index {index}"),
            LinkOp::Set { spec, .. } => format!("set {} mtu {} up", spec.name, spec.mtu),
            LinkOp::Delete { name, .. } => format!("delete xfrm interface {name}"),
        }
    }

    /// The peer the write is for (None: a departed peer's interface).
    pub fn owner(&self) -> Option<&str> {
        match self {
            LinkOp::Create { spec: s, .. } | LinkOp::Set { spec: s, .. } => Some(&s.owner),
            LinkOp::Delete { .. } => None,
        }
    }
}

/// The diff's result: the writes (deletions first), and the wanted interfaces whose name a
/// link that is not ours already has (left untouched, reported for their peer).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct LinkDiff {
    pub ops: Vec<LinkOp>,
    pub blocked: Vec<(LinkSpec, String)>,
}

/// The kernel keeps a network namespace's devices in [`INDEX_CHAINS`] hash chains by
/// interface index (`dev_index_head`, `NETDEV_HASHBITS` 8 in every kernel since 2.6), and
/// looks a device up by walking its chain (`dev_get_by_index_rcu`, newest device first). The
/// data path does that per packet: with any `ip rule` of our own (`fib_has_custom_rules`),
/// every input route lookup resolves the incoming device by index (`__fib_lookup` ->
/// `l3mdev_update_flow`), and an XFRM interface's outer route lookup resolves its underlay
/// device (`IFLA_XFRM_LINK`, the flow's output interface) for every packet it encrypts. Left
/// to the kernel, the interfaces take consecutive indexes and land in every chain: at 5,000
/// peers ~20 per chain, and the underlay device, older than all of them, is at the end of its
/// chain. Measured in the VM (integration/vm/bench-datapath.sh, `DP_PERF`): this was route
/// mode's per-packet cost growing with the peers (`dev_get_by_index_rcu` from none to ~3 % of
/// the busy time at 5,000 peers). So each interface of ours gets an explicit index outside
/// the chains of the devices that are not ours ([`reserved_chains`]), and one that shares the
/// underlay device's chain is recreated. What is left per packet is the decrypted packet's
/// own interface, found in a chain of about peers / 256 interfaces of ours.
pub const INDEX_CHAINS: u32 = 256;

/// The hash chain of an interface index.
pub fn index_chain(index: u32) -> u32 {
    index % INDEX_CHAINS
}

/// The chains the interfaces of ours stay out of: the underlay device's always; those of every
/// other device that is not ours when at least half the chains are still left for ours (a host
/// with more devices keeps only the underlay's chain free: a device created later, a new
/// container's veth, is at the head of its chain anyway, found first).
pub fn reserved_chains(found: &[FoundLink], underlay: u32) -> std::collections::BTreeSet<u32> {
    let mut all: std::collections::BTreeSet<u32> = found
        .iter()
        .filter(|l| !is_owned(l))
        .map(|l| index_chain(l.index))
        .collect();
    all.insert(index_chain(underlay));
    if all.len() as u32 <= INDEX_CHAINS / 2 {
        all
    } else {
        [index_chain(underlay)].into()
    }
}

/// Give each create an index: above every index found (so none is in use), ascending, outside
/// the `reserved` chains. Past the kernel's largest index (`i32::MAX`) the kernel chooses (0).
pub fn assign_indexes(
    ops: &mut [LinkOp],
    found: &[FoundLink],
    reserved: &std::collections::BTreeSet<u32>,
) {
    let mut next = found
        .iter()
        .map(|l| l.index)
        .max()
        .unwrap_or(0)
        .saturating_add(1);
    for op in ops.iter_mut() {
        if let LinkOp::Create { index, .. } = op {
            while reserved.contains(&index_chain(next)) && reserved.len() < INDEX_CHAINS as usize {
                next = next.saturating_add(1);
            }
            *index = if next <= i32::MAX as u32 { next } else { 0 };
            next = next.saturating_add(1);
        }
    }
}

/// What turns the links found (all of them) into `want`. Empty when they match.
pub fn diff(found: &[FoundLink], want: &[LinkSpec]) -> LinkDiff {
    let by_name: BTreeMap<&str, &FoundLink> = found.iter().map(|l| (l.name.as_str(), l)).collect();
    let wanted: BTreeMap<&str, &LinkSpec> = want.iter().map(|s| (s.name.as_str(), s)).collect();
    let mut d = LinkDiff::default();
    let mut creates = Vec::new();
    let create = |s: &LinkSpec| LinkOp::Create {
        spec: s.clone(),
        index: 0,
    };
    for l in found.iter().filter(|l| is_owned(l)) {
        match wanted.get(l.name.as_str()) {
            None => d.ops.push(LinkOp::Delete {
                index: l.index,
                name: l.name.clone(),
            }),
            // The id, the underlay and collect_md cannot be changed in place (the kernel
            // refuses a new link), nor the index (in the underlay device's hash chain: see
            // INDEX_CHAINS): recreate.
            Some(s)
                if l.collect_md != s.collect_md
                    || index_chain(l.index) == index_chain(s.underlay)
                    || (!s.collect_md
                        && (l.if_id != Some(s.if_id) || l.underlay != Some(s.underlay))) =>
            {
                d.ops.push(LinkOp::Delete {
                    index: l.index,
                    name: l.name.clone(),
                });
                creates.push(create(s));
            }
            Some(s) if !l.up || l.mtu != Some(s.mtu) => creates.push(LinkOp::Set {
                index: l.index,
                spec: (*s).clone(),
            }),
            Some(_) => {}
        }
    }
    for s in want {
        match by_name.get(s.name.as_str()) {
            None => creates.push(create(s)),
            Some(l) if !is_owned(l) => d.blocked.push((
                s.clone(),
                format!(
                    "interface {} exists and is not ipsec-mesh's (kind {}, group {}): left untouched",
                    l.name,
                    l.kind.as_deref().unwrap_or("none"),
                    l.group
                ),
            )),
            Some(_) => {}
        }
    }
    if let Some(s) = want.first() {
        assign_indexes(&mut creates, found, &reserved_chains(found, s.underlay));
    }
    d.ops.extend(creates);
    d
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(id: u32) -> LinkSpec {
        LinkSpec {
            name: name(id),
            if_id: id,
            underlay: 2,
            mtu: 1400,
            owner: format!("h{id:x}"),
            collect_md: false,
        }
    }

    fn found(s: &LinkSpec, index: u32) -> FoundLink {
        FoundLink {
            index,
            name: s.name.clone(),
            kind: Some("xfrm".into()),
            group: LINK_GROUP,
            up: true,
            mtu: Some(s.mtu),
            // An external interface dumps as id 0, link 0.
            if_id: Some(s.if_id),
            underlay: Some(if s.collect_md { 0 } else { s.underlay }),
            collect_md: s.collect_md,
        }
    }

    #[test]
    fn one_collect_md_interface_replaces_the_per_peer_ones() {
        let c = crate::test_cluster::valid(&crate::test_cluster::on_77(&["h1", "h2", "h3"]));
        let plan = crate::plan::plan(&c, "h1", &Default::default(), None).unwrap();
        let one = desired_one(&plan, 2);
        assert_eq!(one.len(), 1);
        assert!(one[0].collect_md && one[0].if_id == 0 && one[0].name == ONE_NAME);
        assert_eq!(
            one[0].to_string(),
            format!(
                "xfrm interface imxmesh external mtu {} group 1042",
                plan.mtu
            )
        );
        let per_peer = desired(&plan, 2);
        let cur: Vec<FoundLink> = per_peer
            .iter()
            .enumerate()
            .map(|(i, s)| found(s, 3 + i as u32))
            .collect();
        let d = diff(&cur, &one);
        assert_eq!(d.ops.len(), per_peer.len() + 1, "{d:?}");
        assert!(
            matches!(d.ops.last(), Some(LinkOp::Create { spec, index }) if spec.collect_md && *index == 5)
        );
        // Matching: nothing to do; the same name without collect_md: recreated.
        assert_eq!(diff(&[found(&one[0], 7)], &one), LinkDiff::default());
        let mut plain = found(&one[0], 7);
        plain.collect_md = false;
        assert_eq!(diff(&[plain], &one).ops.len(), 2);
        // And back: the external one goes, the per-peer ones come.
        let back = diff(&[found(&one[0], 7)], &per_peer);
        assert_eq!(back.ops.len(), per_peer.len() + 1);
        assert!(desired_one(
            &crate::plan::plan(
                &crate::test_cluster::valid(&crate::test_cluster::on_77(&["h1"])),
                "h1",
                &Default::default(),
                None
            )
            .unwrap(),
            2
        )
        .is_empty());
    }

    #[test]
    fn names_are_short_and_follow_the_slot() {
        assert_eq!(name(0x5000_0001), "imx1");
        assert_eq!(name(0x57ff_ffff), "imx7ffffff");
        assert!(name(0x57ff_ffff).len() <= 15);
    }

    #[test]
    fn diff_creates_fixes_and_deletes_only_ours() {
        let (a, b, c) = (spec(0x5000_000a), spec(0x5000_000b), spec(0x5000_000c));
        let mut down_b = found(&b, 11);
        down_b.up = false;
        let stale = found(&spec(0x5000_00ff), 12);
        let foreign = FoundLink {
            index: 13,
            name: c.name.clone(),
            kind: Some("dummy".into()),
            ..Default::default()
        };
        let mut moved = found(&a, 10);
        moved.underlay = Some(3);
        let other_group = FoundLink {
            group: 0,
            ..found(&spec(0x5000_00ee), 14)
        };
        let cur = vec![moved, down_b, stale, foreign, other_group];
        let d = diff(&cur, &[a.clone(), b.clone(), c.clone()]);
        assert_eq!(
            d.ops,
            vec![
                LinkOp::Delete {
                    index: 10,
                    name: a.name.clone()
                },
                LinkOp::Delete {
                    index: 12,
                    name: "imxff".into()
                },
                // Above every index found (14), outside the chains of the foreign links
                // (13, 14 is ours but in another group: not ours) and the underlay's (2).
                LinkOp::Create {
                    spec: a.clone(),
                    index: 15
                },
                LinkOp::Set {
                    index: 11,
                    spec: b.clone()
                },
            ]
        );
        assert_eq!(d.blocked.len(), 1);
        assert!(
            d.blocked[0].1.contains("not ipsec-mesh's"),
            "{:?}",
            d.blocked
        );
        // Nothing to do once the kernel matches.
        let now = vec![found(&a, 1), found(&b, 3)];
        assert_eq!(diff(&now, &[a, b]), LinkDiff::default());
        // Cleanup: every interface of ours goes, nothing else.
        let all = diff(&cur, &[]);
        assert_eq!(all.ops.len(), 3, "{all:?}");
        assert!(all.blocked.is_empty());
    }

    /// Issue 12: the interfaces of ours stay out of the hash chains of the underlay and the
    /// host's other devices (those are looked up by index for every packet), spread evenly
    /// over the rest, and one in the underlay's chain is recreated; once placed, a no-op.
    #[test]
    fn indexes_avoid_the_chains_of_the_underlay_and_other_devices() {
        let underlay = 2;
        let foreign = |index, name: &str| FoundLink {
            index,
            name: name.into(),
            kind: Some("veth".into()),
            ..Default::default()
        };
        let mut found_links = vec![foreign(1, "lo"), foreign(2, "ul0"), foreign(3, "cbr0")];
        found_links.extend((0..40).map(|i| foreign(300 + i * 7, &format!("veth{i}"))));
        let want: Vec<LinkSpec> = (0..5000u32)
            .map(|i| LinkSpec {
                underlay,
                ..spec(0x5000_0000 + i)
            })
            .collect();
        let d = diff(&found_links, &want);
        let reserved = reserved_chains(&found_links, underlay);
        assert_eq!(reserved.len(), 43, "{reserved:?}");
        let mut per_chain = BTreeMap::new();
        let mut seen = std::collections::BTreeSet::new();
        for op in &d.ops {
            let LinkOp::Create { index, .. } = op else {
                panic!("{op:?}")
            };
            assert!(*index > 300 + 39 * 7, "{index} is above every index found");
            assert!(seen.insert(*index), "{index} given twice");
            assert!(!reserved.contains(&index_chain(*index)), "{index}");
            *per_chain.entry(index_chain(*index)).or_insert(0u32) += 1;
        }
        assert_eq!(d.ops.len(), 5000);
        // Spread: 5,000 over the 213 chains left, 23 or 24 each.
        assert_eq!(per_chain.len(), 213);
        assert!(
            per_chain.values().all(|&n| (23..=24).contains(&n)),
            "{per_chain:?}"
        );
        // Placed: nothing to do.
        let mut now = found_links.clone();
        for op in &d.ops {
            if let LinkOp::Create { spec, index } = op {
                now.push(found(spec, *index));
            }
        }
        assert_eq!(diff(&now, &want), LinkDiff::default());
        // An interface of ours in the underlay's chain (made by an older version, or by the
        // kernel's choice after a retry) is recreated elsewhere; one in a foreign device's
        // chain is left alone (a veth created after it is at the head of the chain).
        let mut old = found_links.clone();
        old.push(found(&want[0], 2 + 256 * 3));
        old.push(found(&want[1], 3 + 256 * 3));
        let d = diff(&old, &want[..2]);
        assert_eq!(
            d.ops[0],
            LinkOp::Delete {
                index: 2 + 256 * 3,
                name: want[0].name.clone()
            }
        );
        assert!(matches!(&d.ops[1], LinkOp::Create { spec, index }
            if spec == &want[0] && index_chain(*index) != index_chain(underlay) && *index > 3 + 256 * 3));
        assert_eq!(d.ops.len(), 2, "{:?}", d.ops);
    }

    #[test]
    fn many_foreign_devices_leave_only_the_underlay_chain_reserved() {
        let found_links: Vec<FoundLink> = (1..=200)
            .map(|i| FoundLink {
                index: i,
                name: format!("veth{i}"),
                kind: Some("veth".into()),
                ..Default::default()
            })
            .collect();
        assert_eq!(reserved_chains(&found_links, 7), [7].into());
        let mut ops = vec![
            LinkOp::Create {
                spec: spec(0x5000_0001),
                index: 0
            };
            300
        ];
        assign_indexes(&mut ops, &found_links, &[7].into());
        let idx: Vec<u32> = ops
            .iter()
            .map(|o| match o {
                LinkOp::Create { index, .. } => *index,
                _ => 0,
            })
            .collect();
        assert_eq!(idx[0], 201);
        assert!(
            !idx.contains(&263) && idx.contains(&264),
            "263 is in chain 7"
        );
        // At the end of the kernel's range: the kernel's choice.
        let top = vec![FoundLink {
            index: i32::MAX as u32,
            ..found_links[0].clone()
        }];
        assign_indexes(&mut ops[..1], &top, &[7].into());
        assert!(matches!(ops[0], LinkOp::Create { index: 0, .. }));
    }
}

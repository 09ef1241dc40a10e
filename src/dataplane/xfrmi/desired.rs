//! The route mode's XFRM interfaces as comparable values: which ones a plan wants, what a
//! dump is parsed into, which are ours, and the diff between the two (pure).

use std::collections::BTreeMap;
use std::fmt;

use crate::plan::ids::REQID_OWNER_MASK;
use crate::plan::{Peer, Plan};

/// Every interface of ours is named this followed by the peer's slot in hex (`imx3a2f1c`).
pub const NAME_PREFIX: &str = "imx";
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
}

impl fmt::Display for LinkSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
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
            }
        })
        .collect()
}

/// One write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkOp {
    /// Create it (up, in our group).
    Create(LinkSpec),
    /// Set MTU and up on an existing interface of ours.
    Set { index: u32, spec: LinkSpec },
    /// Delete an interface of ours (no longer wanted, or bound to another id or underlay).
    Delete { index: u32, name: String },
}

impl LinkOp {
    pub fn describe(&self) -> String {
        match self {
            LinkOp::Create(s) => format!("create {s}"),
            LinkOp::Set { spec, .. } => format!("set {} mtu {} up", spec.name, spec.mtu),
            LinkOp::Delete { name, .. } => format!("delete xfrm interface {name}"),
        }
    }

    /// The peer the write is for (None: a departed peer's interface).
    pub fn owner(&self) -> Option<&str> {
        match self {
            LinkOp::Create(s) | LinkOp::Set { spec: s, .. } => Some(&s.owner),
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

/// What turns the links found (all of them) into `want`. Empty when they match.
pub fn diff(found: &[FoundLink], want: &[LinkSpec]) -> LinkDiff {
    let by_name: BTreeMap<&str, &FoundLink> = found.iter().map(|l| (l.name.as_str(), l)).collect();
    let wanted: BTreeMap<&str, &LinkSpec> = want.iter().map(|s| (s.name.as_str(), s)).collect();
    let mut d = LinkDiff::default();
    let mut creates = Vec::new();
    for l in found.iter().filter(|l| is_owned(l)) {
        match wanted.get(l.name.as_str()) {
            None => d.ops.push(LinkOp::Delete {
                index: l.index,
                name: l.name.clone(),
            }),
            // The id and the underlay cannot be changed in place (the kernel refuses a new
            // link): recreate.
            Some(s) if l.if_id != Some(s.if_id) || l.underlay != Some(s.underlay) => {
                d.ops.push(LinkOp::Delete {
                    index: l.index,
                    name: l.name.clone(),
                });
                creates.push(LinkOp::Create((*s).clone()));
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
            None => creates.push(LinkOp::Create(s.clone())),
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
            if_id: Some(s.if_id),
            underlay: Some(s.underlay),
        }
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
                LinkOp::Create(a.clone()),
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
        let now = vec![found(&a, 1), found(&b, 2)];
        assert_eq!(diff(&now, &[a, b]), LinkDiff::default());
        // Cleanup: every interface of ours goes, nothing else.
        let all = diff(&cur, &[]);
        assert_eq!(all.ops.len(), 3, "{all:?}");
        assert!(all.blocked.is_empty());
    }
}

//! The pure diff between what the kernel holds on our device and what is desired, as an
//! ordered list of steps, each with its owner so failures are reported per peer.
//!
//! Two stages, because the second needs the device's index: [`diff_device`] decides what
//! happens to the device itself (keep, create, recreate, update in place, or refuse a
//! device that is not a VXLAN device); [`diff_objects`] then turns the address, FDB,
//! neighbours and routes found on the device into the desired ones. Deletions come first
//! (routes, neighbours, FDB, address), then additions in dependency order (address, FDB,
//! neighbours, routes).

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use ipnet::IpNet;

use super::desired::Desired;
use super::objects::*;
use crate::dataplane::report::Change;

/// What the device needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeviceAction {
    /// As wanted.
    Keep,
    /// Absent: create it.
    Create,
    /// A VXLAN device whose identity settings (VNI, port, local, underlay, learning, group)
    /// differ: delete and create (these cannot be changed in place).
    Recreate { why: String },
    /// In place: MTU, MAC, up; `was`: the old values of what changes, in words.
    Update {
        mtu: Option<u32>,
        mac: Option<Mac>,
        up: bool,
        was: String,
    },
    /// A device of another kind holds the name: not ours, left untouched.
    Foreign { kind: String },
}

/// Decide what the device needs.
pub fn diff_device(found: Option<&FoundDevice>, want: &DeviceSpec) -> DeviceAction {
    let Some(f) = found else {
        return DeviceAction::Create;
    };
    if f.kind.as_deref() != Some("vxlan") {
        return DeviceAction::Foreign {
            kind: f.kind.clone().unwrap_or_else(|| "plain".into()),
        };
    }
    let mut why = Vec::new();
    if f.vni != Some(want.vni) {
        why.push(format!("id {} -> {}", opt(f.vni), want.vni));
    }
    if f.port != Some(want.port) {
        why.push(format!("dstport {} -> {}", opt(f.port), want.port));
    }
    if f.local != Some(want.local) {
        why.push(format!("local {} -> {}", opt(f.local), want.local));
    }
    if f.underlay != Some(want.underlay) {
        why.push(format!("dev #{} -> #{}", opt(f.underlay), want.underlay));
    }
    if f.learning != Some(false) {
        why.push("learning -> nolearning".into());
    }
    if let Some(g) = f.group {
        why.push(format!("remote/group {g} -> none"));
    }
    if f.external {
        why.push("external -> not external".into());
    }
    if !why.is_empty() {
        return DeviceAction::Recreate {
            why: why.join(", "),
        };
    }
    let mtu = (f.mtu != Some(want.mtu)).then_some(want.mtu);
    let mac = (f.mac != Some(want.mac)).then_some(want.mac);
    if mtu.is_none() && mac.is_none() && f.up {
        DeviceAction::Keep
    } else {
        let mut was = Vec::new();
        if mtu.is_some() {
            was.push(format!("mtu {}", opt(f.mtu)));
        }
        if mac.is_some() {
            was.push(format!("address {}", opt(f.mac)));
        }
        if !f.up {
            was.push("down".into());
        }
        DeviceAction::Update {
            mtu,
            mac,
            up: true,
            was: was.join(" "),
        }
    }
}

fn opt<T: std::fmt::Display>(v: Option<T>) -> String {
    v.map(|v| v.to_string()).unwrap_or_else(|| "none".into())
}

/// What was found on our device.
#[derive(Debug, Clone, Default)]
pub struct Current {
    /// Addresses of either family (IPv6 link-local excluded).
    pub addresses: Vec<IpNet>,
    pub fdb: Vec<FoundFdb>,
    /// IPv4 and IPv6 neighbours.
    pub neighbours: Vec<FoundNeighbour>,
    /// Our routes (main table, on our device, `proto static`).
    pub routes: Vec<FoundRoute>,
}

/// One write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    CreateDevice(DeviceSpec),
    /// Delete the device (and, with it, everything on it).
    DelDevice {
        index: u32,
        why: String,
    },
    /// Turn IPv6 link-local address generation off (before the device first goes up).
    NoIpv6LinkLocal,
    SetDevice {
        mtu: Option<u32>,
        mac: Option<Mac>,
        up: bool,
        /// The old values of what changes, in words (for the report; empty: new device).
        was: String,
    },
    AddAddress(IpNet),
    DelAddress(IpNet),
    /// All-zero MAC: append this remote; unicast: create or replace the entry's remote.
    AddFdb(FdbEntry),
    DelFdb(FoundFdb),
    /// Create or replace.
    SetNeighbour(Neighbour),
    DelNeighbour(IpAddr),
    AddRoute(Route),
    DelRoute(FoundRoute),
}

impl Op {
    pub fn is_delete(&self) -> bool {
        matches!(
            self,
            Op::DelDevice { .. }
                | Op::DelAddress(_)
                | Op::DelFdb(_)
                | Op::DelNeighbour(_)
                | Op::DelRoute(_)
        )
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    pub owner: Owner,
    pub op: Op,
}

impl Step {
    /// The change for logs, `--diff` and `/status`.
    pub fn change(&self, dev: &str) -> Change {
        let c = match &self.op {
            Op::CreateDevice(d) => Change::add(LAYER, d.to_string()),
            Op::DelDevice { why, .. } => Change::delete(LAYER, format!("device {dev} ({why})")),
            Op::NoIpv6LinkLocal => Change::update(
                LAYER,
                format!("device {dev}"),
                None,
                Some("addrgenmode none".into()),
            ),
            Op::SetDevice { mtu, mac, up, was } => {
                let mut new = Vec::new();
                if let Some(m) = mtu {
                    new.push(format!("mtu {m}"));
                }
                if let Some(m) = mac {
                    new.push(format!("address {m}"));
                }
                if *up {
                    new.push("up".into());
                }
                Change::update(
                    LAYER,
                    format!("device {dev}"),
                    (!was.is_empty()).then(|| was.clone()),
                    Some(new.join(" ")),
                )
            }
            Op::AddAddress(a) => Change::add(LAYER, format!("address {a} dev {dev}")),
            Op::DelAddress(a) => Change::delete(LAYER, format!("address {a} dev {dev}")),
            Op::AddFdb(e) => Change::add(LAYER, format!("{e} dev {dev}")),
            Op::DelFdb(e) => Change::delete(LAYER, format!("{e} dev {dev}")),
            Op::SetNeighbour(n) => Change::add(LAYER, format!("{n} dev {dev}")),
            Op::DelNeighbour(ip) => Change::delete(LAYER, format!("neigh {ip} dev {dev}")),
            Op::AddRoute(r) => Change::add(LAYER, format!("{r} dev {dev}")),
            Op::DelRoute(r) => Change::delete(
                LAYER,
                match r.via {
                    Some(v) => format!("route {} via {v} dev {dev}", r.dst),
                    None => format!("route {} dev {dev}", r.dst),
                },
            ),
        };
        match &self.owner {
            Owner::Mesh => c,
            o => c.for_peer(o.to_string()),
        }
    }
}

/// The layer name in [`Change`]s.
pub const LAYER: &str = "vxlan";

/// The device steps for `action` (`index`: the found device's).
pub fn device_steps(action: &DeviceAction, want: &DeviceSpec, index: u32) -> Vec<Step> {
    let step = |op| Step {
        owner: Owner::Mesh,
        op,
    };
    let create = || {
        let mut v = vec![step(Op::CreateDevice(want.clone()))];
        if want.no_ipv6_ll {
            v.push(step(Op::NoIpv6LinkLocal));
        }
        v.push(step(Op::SetDevice {
            mtu: None,
            mac: None,
            up: true,
            was: "down".into(),
        }));
        v
    };
    match action {
        DeviceAction::Keep | DeviceAction::Foreign { .. } => vec![],
        DeviceAction::Create => create(),
        DeviceAction::Recreate { why } => {
            let mut v = vec![step(Op::DelDevice {
                index,
                why: why.clone(),
            })];
            v.extend(create());
            v
        }
        DeviceAction::Update { mtu, mac, up, was } => vec![step(Op::SetDevice {
            mtu: *mtu,
            mac: *mac,
            up: *up,
            was: was.clone(),
        })],
    }
}

/// The steps that turn what is on the device into `want` (the device itself aside).
/// Empty when they already match.
pub fn diff_objects(cur: &Current, want: &Desired) -> Vec<Step> {
    let mut dels = Vec::new();
    let mut adds = Vec::new();
    let stale = |op| Step {
        owner: Owner::Stale,
        op,
    };

    // Routes: keyed by destination.
    let want_routes: BTreeMap<IpNet, (&Owner, &Route)> =
        want.routes.iter().map(|(o, r)| (r.dst, (o, r))).collect();
    let mut kept_routes = BTreeSet::new();
    let mut route_dels = Vec::new();
    for r in &cur.routes {
        match want_routes.get(&r.dst) {
            Some((o, w)) if r.exact && r.via == Some(w.via) && kept_routes.insert(r.dst) => {
                let _ = o;
            }
            Some((o, _)) => route_dels.push(Step {
                owner: (*o).clone(),
                op: Op::DelRoute(*r),
            }),
            None => route_dels.push(stale(Op::DelRoute(*r))),
        }
    }

    // Neighbours: keyed by address; only permanent ones not wanted are removed (others are
    // the kernel's cache).
    let want_neigh: BTreeMap<IpAddr, (&Owner, &Neighbour)> = want
        .neighbours
        .iter()
        .map(|(o, n)| (n.ip, (o, n)))
        .collect();
    let mut good_neigh = BTreeSet::new();
    let mut neigh_dels = Vec::new();
    for n in &cur.neighbours {
        match want_neigh.get(&n.ip) {
            Some((_, w)) if n.permanent && n.mac == Some(w.mac) => {
                good_neigh.insert(n.ip);
            }
            Some(_) => {}
            None if n.permanent => neigh_dels.push(stale(Op::DelNeighbour(n.ip))),
            None => {}
        }
    }

    // FDB: the all-zero MAC holds one remote per peer; a unicast MAC holds one remote.
    let want_fdb: BTreeMap<FdbEntry, &Owner> = want.fdb.iter().map(|(o, e)| (*e, o)).collect();
    let want_ucast: BTreeMap<Mac, &Owner> = want
        .fdb
        .iter()
        .filter(|(_, e)| !e.mac.is_zero())
        .map(|(o, e)| (e.mac, o))
        .collect();
    let mut good_fdb = BTreeSet::new();
    let mut fdb_dels = Vec::new();
    for f in &cur.fdb {
        let entry = f.dst.map(|dst| FdbEntry { mac: f.mac, dst });
        let wanted = entry.and_then(|e| want_fdb.get(&e).map(|o| (e, *o)));
        match wanted {
            Some((e, _)) if f.exact && good_fdb.insert(e) => {}
            // A unicast MAC we want, with another remote or shape: replaced in place by the
            // add (one write), not deleted.
            _ if !f.mac.is_zero() && want_ucast.contains_key(&f.mac) && f.exact => {}
            Some((_, o)) => fdb_dels.push(Step {
                owner: o.clone(),
                op: Op::DelFdb(f.clone()),
            }),
            None => match want_ucast.get(&f.mac) {
                Some(o) => fdb_dels.push(Step {
                    owner: (*o).clone(),
                    op: Op::DelFdb(f.clone()),
                }),
                None => fdb_dels.push(stale(Op::DelFdb(f.clone()))),
            },
        }
    }

    // Address: only ours is wanted on the device.
    let mut have_addr = false;
    let mut addr_dels = Vec::new();
    for a in &cur.addresses {
        if Some(*a) == want.address && !have_addr {
            have_addr = true;
        } else {
            // The device's own address (an old VTEP address), not a departed peer's.
            addr_dels.push(Step {
                owner: Owner::Mesh,
                op: Op::DelAddress(*a),
            });
        }
    }

    dels.extend(route_dels);
    dels.extend(neigh_dels);
    dels.extend(fdb_dels);
    dels.extend(addr_dels);

    if let (Some(a), false) = (want.address, have_addr) {
        adds.push(Step {
            owner: Owner::Mesh,
            op: Op::AddAddress(a),
        });
    }
    for (o, e) in &want.fdb {
        if !good_fdb.contains(e) {
            adds.push(Step {
                owner: o.clone(),
                op: Op::AddFdb(*e),
            });
        }
    }
    for (o, n) in &want.neighbours {
        if !good_neigh.contains(&n.ip) {
            adds.push(Step {
                owner: o.clone(),
                op: Op::SetNeighbour(*n),
            });
        }
    }
    for (o, r) in &want.routes {
        if !kept_routes.contains(&r.dst) {
            adds.push(Step {
                owner: o.clone(),
                op: Op::AddRoute(*r),
            });
        }
    }
    dels.extend(adds);
    dels
}

#[cfg(test)]
mod tests {
    use super::super::desired::tests::{mk_plan, HOSTS};
    use super::super::desired::{desired, vtep_mac};
    use super::super::messages;
    use super::*;

    fn want(hosts: &[(&str, &str, &[&str])]) -> Desired {
        desired(&mk_plan(hosts, "h1", "vxlan"), &VxlanConfig::default(), 2)
    }

    /// What the kernel would hold after `d` was applied (device index 7).
    fn as_current(d: &Desired) -> Current {
        Current {
            addresses: d.address.into_iter().collect(),
            fdb: d
                .fdb
                .iter()
                .map(|(_, e)| messages::parse_fdb(&messages::fdb_message(7, e)).unwrap().1)
                .collect(),
            neighbours: d
                .neighbours
                .iter()
                .map(|(_, n)| FoundNeighbour {
                    ip: n.ip,
                    mac: Some(n.mac),
                    permanent: true,
                })
                .collect(),
            routes: d
                .routes
                .iter()
                .map(|(_, r)| messages::parse_route(&messages::route_add_message(7, r), 7).unwrap())
                .collect(),
        }
    }

    fn found_device(d: &DeviceSpec) -> FoundDevice {
        FoundDevice {
            index: 7,
            name: d.name.clone(),
            kind: Some("vxlan".into()),
            vni: Some(d.vni),
            port: Some(d.port),
            local: Some(d.local),
            underlay: Some(d.underlay),
            learning: Some(false),
            group: None,
            external: false,
            mtu: Some(d.mtu),
            mac: Some(d.mac),
            up: true,
        }
    }

    fn lines(steps: &[Step]) -> Vec<String> {
        steps
            .iter()
            .map(|s| s.change("vtep1042").to_string())
            .collect()
    }

    #[test]
    fn from_nothing_everything_in_dependency_order() {
        let d = want(&HOSTS);
        let steps = diff_objects(&Current::default(), &d);
        assert_eq!(steps.len(), 1 + 4 + 2 + 3, "{:#?}", lines(&steps));
        assert!(matches!(steps[0].op, Op::AddAddress(_)));
        assert!(steps[1..5].iter().all(|s| matches!(s.op, Op::AddFdb(_))));
        assert!(steps[5..7]
            .iter()
            .all(|s| matches!(s.op, Op::SetNeighbour(_))));
        assert!(steps[7..].iter().all(|s| matches!(s.op, Op::AddRoute(_))));
        assert_eq!(
            steps[7].change("vtep1042").to_string(),
            "+ vxlan route 10.42.2.0/24 via 10.42.2.0 onlink dev vtep1042 [h2]"
        );
        assert_eq!(steps[0].owner, Owner::Mesh);
    }

    #[test]
    fn nothing_changed_nothing_to_do() {
        let d = want(&HOSTS);
        assert!(diff_objects(&as_current(&d), &d).is_empty());
        assert_eq!(
            diff_device(Some(&found_device(&d.device)), &d.device),
            DeviceAction::Keep
        );
    }

    #[test]
    fn departed_peer_only_its_entries_go() {
        let before = want(&HOSTS);
        let after = want(&HOSTS[..2]);
        let steps = diff_objects(&as_current(&before), &after);
        let l = lines(&steps);
        assert_eq!(
            l,
            vec![
                "- vxlan route 10.42.3.0/24 via 10.42.3.0 dev vtep1042 [departed peer]".to_string(),
                "- vxlan neigh 10.42.3.0 dev vtep1042 [departed peer]".to_string(),
                "- vxlan fdb 00:00:00:00:00:00 dst 192.168.77.3 dev vtep1042 [departed peer]"
                    .to_string(),
                format!(
                    "- vxlan fdb {} dst 192.168.77.3 dev vtep1042 [departed peer]",
                    vtep_mac("h3")
                ),
            ]
        );
    }

    #[test]
    fn added_peer_adds_four_objects() {
        let before = want(&HOSTS[..2]);
        let after = want(&HOSTS);
        let steps = diff_objects(&as_current(&before), &after);
        assert_eq!(steps.len(), 2 + 1 + 1, "{:#?}", lines(&steps));
        assert!(steps.iter().all(|s| s.owner == Owner::Peer("h3".into())));
    }

    #[test]
    fn moved_endpoint_replaces_unicast_in_place_and_swaps_the_flood_entry() {
        let before = want(&HOSTS);
        let mut moved = HOSTS;
        moved[2].1 = "192.168.77.33";
        let after = want(&moved);
        let l = lines(&diff_objects(&as_current(&before), &after));
        assert_eq!(
            l,
            vec![
                "- vxlan fdb 00:00:00:00:00:00 dst 192.168.77.3 dev vtep1042 [departed peer]"
                    .to_string(),
                "+ vxlan fdb 00:00:00:00:00:00 dst 192.168.77.33 dev vtep1042 [h3]".to_string(),
                format!(
                    "+ vxlan fdb {} dst 192.168.77.33 dev vtep1042 [h3]",
                    vtep_mac("h3")
                ),
            ]
        );
    }

    #[test]
    fn changed_subnets_wrong_neighbour_and_strays() {
        let d = want(&HOSTS);
        let mut cur = as_current(&d);
        // A neighbour with the wrong MAC, a kernel-learned one, a stale permanent one.
        cur.neighbours[0].mac = Some(Mac([2, 0, 0, 0, 0, 1]));
        cur.neighbours.push(FoundNeighbour {
            ip: "10.42.9.9".parse().unwrap(),
            mac: None,
            permanent: false,
        });
        cur.neighbours.push(FoundNeighbour {
            ip: "10.42.9.0".parse().unwrap(),
            mac: Some(Mac([2, 0, 0, 0, 0, 2])),
            permanent: true,
        });
        // A route of ours via the wrong gateway, and an extra address.
        cur.routes[2].via = Some("10.42.3.1".parse().unwrap());
        cur.addresses.push("10.42.1.1/32".parse().unwrap());
        let l = lines(&diff_objects(&cur, &d));
        assert_eq!(
            l,
            vec![
                "- vxlan route 10.42.3.0/24 via 10.42.3.1 dev vtep1042 [h3]".to_string(),
                "- vxlan neigh 10.42.9.0 dev vtep1042 [departed peer]".to_string(),
                "- vxlan address 10.42.1.1/32 dev vtep1042".to_string(),
                format!(
                    "+ vxlan neigh 10.42.2.0 lladdr {} permanent dev vtep1042 [h2]",
                    vtep_mac("h2")
                ),
                "+ vxlan route 10.42.3.0/24 via 10.42.3.0 onlink dev vtep1042 [h3]".to_string(),
            ]
        );
    }

    #[test]
    fn odd_fdb_entries_are_replaced_and_strays_removed() {
        let d = want(&HOSTS);
        let mut cur = as_current(&d);
        // The flood entry to h2 with a port override: delete it (by its message), re-add.
        cur.fdb[0].exact = false;
        // A stray unicast entry.
        let stray = FdbEntry {
            mac: Mac([2, 9, 9, 9, 9, 9]),
            dst: "192.168.77.9".parse().unwrap(),
        };
        cur.fdb.push(
            messages::parse_fdb(&messages::fdb_message(7, &stray))
                .unwrap()
                .1,
        );
        // A duplicate of an entry we want (same MAC and remote) is removed.
        cur.fdb.push(cur.fdb[2].clone());
        let steps = diff_objects(&cur, &d);
        let l = lines(&steps);
        assert_eq!(
            l,
            vec![
                "- vxlan fdb 00:00:00:00:00:00 dst 192.168.77.2 dev vtep1042 [h2]".to_string(),
                "- vxlan fdb 02:09:09:09:09:09 dst 192.168.77.9 dev vtep1042 [departed peer]"
                    .to_string(),
                "- vxlan fdb 00:00:00:00:00:00 dst 192.168.77.3 dev vtep1042 [h3]".to_string(),
                "+ vxlan fdb 00:00:00:00:00:00 dst 192.168.77.2 dev vtep1042 [h2]".to_string(),
            ]
        );
    }

    #[test]
    fn device_decisions() {
        let d = want(&HOSTS).device;
        let f = found_device(&d);
        assert_eq!(diff_device(None, &d), DeviceAction::Create);
        let steps = device_steps(&DeviceAction::Create, &d, 0);
        assert_eq!(steps.len(), 3);
        assert!(matches!(steps[0].op, Op::CreateDevice(_)));
        assert_eq!(steps[1].op, Op::NoIpv6LinkLocal);
        assert!(matches!(steps[2].op, Op::SetDevice { up: true, .. }));

        let mut g = f.clone();
        g.vni = Some(1041);
        g.port = Some(8472);
        let a = diff_device(Some(&g), &d);
        assert_eq!(
            a,
            DeviceAction::Recreate {
                why: "id 1041 -> 1042, dstport 8472 -> 4789".into()
            }
        );
        let steps = device_steps(&a, &d, 7);
        assert_eq!(
            steps[0].change("vtep1042").to_string(),
            "- vxlan device vtep1042 (id 1041 -> 1042, dstport 8472 -> 4789)"
        );
        assert_eq!(steps.len(), 4);

        for change in [
            FoundDevice {
                local: Some("192.168.77.9".parse().unwrap()),
                ..f.clone()
            },
            FoundDevice {
                underlay: Some(3),
                ..f.clone()
            },
            FoundDevice {
                learning: Some(true),
                ..f.clone()
            },
            FoundDevice {
                group: Some("239.1.1.1".parse().unwrap()),
                ..f.clone()
            },
        ] {
            assert!(matches!(
                diff_device(Some(&change), &d),
                DeviceAction::Recreate { .. }
            ));
        }

        let mut g = f.clone();
        g.mtu = Some(1500);
        g.up = false;
        let a = diff_device(Some(&g), &d);
        assert_eq!(
            a,
            DeviceAction::Update {
                mtu: Some(1450),
                mac: None,
                up: true,
                was: "mtu 1500 down".into()
            }
        );
        assert_eq!(
            device_steps(&a, &d, 7)[0].change("vtep1042").to_string(),
            "~ vxlan device vtep1042: mtu 1500 down -> mtu 1450 up"
        );

        let mut g = f.clone();
        g.kind = Some("bridge".into());
        assert_eq!(
            diff_device(Some(&g), &d),
            DeviceAction::Foreign {
                kind: "bridge".into()
            }
        );
        assert!(device_steps(&diff_device(Some(&g), &d), &d, 7).is_empty());
    }
}

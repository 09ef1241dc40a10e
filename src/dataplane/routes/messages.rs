//! Building the rtnetlink requests for rules and routes and parsing dumps back into
//! [`objects`](super::objects). No I/O: everything here is unit-testable without a kernel.

use std::net::IpAddr;

use ipnet::IpNet;
use netlink_packet_core::NetlinkMessage;
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteLwEnCapType, RouteLwTunnelEncap, RouteMessage,
    RouteProtocol, RouteScope, RouteType, RouteXfrmTunnel,
};
use netlink_packet_route::rule::{RuleAction, RuleAttribute, RuleMessage};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use rtnetlink::IpVersion;

use super::objects::{FoundRoute, FoundRule, RouteKey, RuleKey, THROW};
use super::reconcile::RouteChange;
use crate::dataplane::firewall::Family;
use crate::dataplane::rtnl;

pub fn family_of_af(af: AddressFamily) -> Option<Family> {
    match af {
        AddressFamily::Inet => Some(Family::V4),
        AddressFamily::Inet6 => Some(Family::V6),
        _ => None,
    }
}

pub fn af(family: Family) -> AddressFamily {
    match family {
        Family::V4 => AddressFamily::Inet,
        Family::V6 => AddressFamily::Inet6,
    }
}

pub fn ip_version(family: Family) -> IpVersion {
    match family {
        Family::V4 => IpVersion::V4,
        Family::V6 => IpVersion::V6,
    }
}

/// Header table byte for `table` (`RT_TABLE_UNSPEC` plus an attribute above 255).
fn header_table(table: u32) -> u8 {
    u8::try_from(table).unwrap_or(RouteHeader::RT_TABLE_UNSPEC)
}

/// Read a dumped rule (None for a non-IP family).
pub fn parse_rule(msg: RuleMessage) -> Option<FoundRule> {
    let family = family_of_af(msg.header.family)?;
    let h = &msg.header;
    let mut table = u32::from(h.table);
    let (mut priority, mut fwmark, mut fwmask) = (0, 0, None);
    let mut to_addr: Option<IpAddr> = None;
    let mut exact = h.action == RuleAction::ToTable && h.src_len == 0 && h.tos == 0;
    for a in &msg.attributes {
        match a {
            RuleAttribute::Table(t) => table = *t,
            RuleAttribute::Priority(p) => priority = *p,
            RuleAttribute::FwMark(m) => fwmark = *m,
            RuleAttribute::FwMask(m) => fwmask = Some(*m),
            RuleAttribute::Destination(a) => to_addr = Some(*a),
            RuleAttribute::Protocol(_) | RuleAttribute::Other(_) => {}
            // The kernel dumps these as -1 when unset.
            RuleAttribute::SuppressPrefixLen(u32::MAX)
            | RuleAttribute::SuppressIfGroup(u32::MAX) => {}
            _ => exact = false,
        }
    }
    let fwmask = fwmask.unwrap_or(if fwmark != 0 { u32::MAX } else { 0 });
    let to = match (to_addr, h.dst_len) {
        (_, 0) => None,
        (Some(a), len) => IpNet::new(a, len).ok(),
        (None, _) => {
            exact = false;
            None
        }
    };
    Some(FoundRule {
        key: RuleKey {
            family,
            priority,
            table,
            fwmark,
            fwmask,
            to,
        },
        exact,
        msg,
    })
}

/// Read a dumped route (None for a non-IP family).
pub fn parse_route(msg: &RouteMessage) -> Option<FoundRoute> {
    let (mut r, gateway) = parse_route_via(msg)?;
    r.exact &= gateway.is_none();
    Some(r)
}

/// Read a dumped route and its gateway (None for a non-IP family); `exact` here means a
/// plain unicast route, with or without a gateway.
pub fn parse_route_via(msg: &RouteMessage) -> Option<(FoundRoute, Option<IpAddr>)> {
    let family = family_of_af(msg.header.address_family)?;
    let h = &msg.header;
    let mut table = u32::from(h.table);
    let (mut dst, mut gateway): (Option<IpAddr>, Option<IpAddr>) = (None, None);
    let (mut oif, mut priority) = (0, None);
    let (mut encap_type, mut encap) = (None, None);
    let mut exact = matches!(
        h.kind,
        RouteType::Unicast | RouteType::Unreachable | RouteType::Throw
    ) && h.source_prefix_length == 0;
    for a in &msg.attributes {
        match a {
            RouteAttribute::Table(t) => table = *t,
            RouteAttribute::Destination(RouteAddress::Inet(a)) => dst = Some((*a).into()),
            RouteAttribute::Destination(RouteAddress::Inet6(a)) => dst = Some((*a).into()),
            RouteAttribute::Gateway(RouteAddress::Inet(g)) => gateway = Some((*g).into()),
            RouteAttribute::Gateway(RouteAddress::Inet6(g)) => gateway = Some((*g).into()),
            RouteAttribute::Oif(i) => oif = *i,
            RouteAttribute::Priority(p) => priority = Some(*p),
            RouteAttribute::EncapType(t) => encap_type = Some(*t),
            RouteAttribute::Encap(e) => encap = Some(e),
            RouteAttribute::Gateway(_)
            | RouteAttribute::Via(_)
            | RouteAttribute::MultiPath(_)
            | RouteAttribute::PrefSource(_)
            | RouteAttribute::Source(_)
            | RouteAttribute::NhId(_) => exact = false,
            _ => {}
        }
    }
    let dst = dst.unwrap_or(match family {
        Family::V4 => IpAddr::from([0u8; 4]),
        Family::V6 => IpAddr::from([0u16; 8]),
    });
    let dst = IpNet::new(dst, h.destination_prefix_length).ok()?;
    // Ours are unicast routes through a device, or unreachable and throw routes through
    // none (the route mode's fail-closed route, oif 0 in the key, and its exits for this
    // host's own subnets, oif THROW).
    // IPv6 dumps those with the loopback device as their oif: a device-less kind stands
    // for itself, whatever oif it is dumped with.
    match h.kind {
        RouteType::Unreachable => oif = 0,
        RouteType::Throw => oif = THROW,
        _ => exact &= oif != 0,
    }
    // The one lightweight-tunnel encapsulation of ours: `encap xfrm if_id ID` (no link).
    let mut if_id = 0;
    match (encap_type, encap) {
        (None, None) => {}
        (Some(RouteLwEnCapType::Xfrm), Some(e)) => match e.as_slice() {
            [RouteLwTunnelEncap::Xfrm(RouteXfrmTunnel::IfId(id))] if *id != 0 => if_id = *id,
            _ => exact = false,
        },
        _ => exact = false,
    }
    let found = FoundRoute {
        key: RouteKey {
            dst,
            table,
            oif,
            if_id,
        },
        exact,
        priority,
        tos: h.tos,
    };
    Some((found, gateway))
}

/// The netlink request for one change (pure).
pub fn request(change: &RouteChange) -> NetlinkMessage<RouteNetlinkMessage> {
    use RouteNetlinkMessage as R;
    match change {
        RouteChange::AddRule(k) => rtnl::message(R::NewRule(rule_message(k)), rtnl::CREATE),
        // Deleting by the dumped message removes exactly that rule.
        RouteChange::DelRule(r) => rtnl::message(R::DelRule(r.msg.clone()), rtnl::ACK),
        RouteChange::AddRoute(k) => rtnl::message(R::NewRoute(route_add_message(k)), rtnl::CREATE),
        RouteChange::DelRoute(r) => rtnl::message(R::DelRoute(route_del_message(r)), rtnl::ACK),
    }
}

/// `ip rule add pref P [to D] [fwmark M/K] lookup T` (no mark match when M and K are 0).
pub fn rule_message(k: &RuleKey) -> RuleMessage {
    let mut m = RuleMessage::default();
    m.header.family = af(k.family);
    m.header.table = header_table(k.table);
    m.header.action = RuleAction::ToTable;
    m.attributes = vec![RuleAttribute::Priority(k.priority)];
    if let Some(to) = k.to {
        m.header.dst_len = to.prefix_len();
        m.attributes.push(RuleAttribute::Destination(to.network()));
    }
    if k.fwmark != 0 || k.fwmask != 0 {
        m.attributes.push(RuleAttribute::FwMark(k.fwmark));
        m.attributes.push(RuleAttribute::FwMask(k.fwmask));
    }
    m.attributes.push(RuleAttribute::Table(k.table));
    m
}

fn dst_attr(dst: &IpNet) -> RouteAttribute {
    RouteAttribute::Destination(match dst {
        IpNet::V4(n) => RouteAddress::Inet(n.network()),
        IpNet::V6(n) => RouteAddress::Inet6(n.network()),
    })
}

/// `ip route add DST dev OIF table T proto static scope link [encap xfrm if_id ID]`, or for
/// `oif` 0
/// `ip route add unreachable DST table T proto static` (for [`THROW`]: `throw DST`).
pub fn route_add_message(k: &RouteKey) -> RouteMessage {
    let mut m = RouteMessage::default();
    m.header.address_family = af(Family::of(&k.dst));
    m.header.destination_prefix_length = k.dst.prefix_len();
    m.header.table = header_table(k.table);
    m.header.protocol = RouteProtocol::Static;
    if k.oif == 0 || k.oif == THROW {
        m.header.scope = RouteScope::Universe;
        m.header.kind = if k.oif == 0 {
            RouteType::Unreachable
        } else {
            RouteType::Throw
        };
        m.attributes = vec![dst_attr(&k.dst), RouteAttribute::Table(k.table)];
    } else {
        m.header.scope = RouteScope::Link;
        m.header.kind = RouteType::Unicast;
        m.attributes = vec![
            dst_attr(&k.dst),
            RouteAttribute::Oif(k.oif),
            RouteAttribute::Table(k.table),
        ];
        if k.if_id != 0 {
            m.attributes
                .push(RouteAttribute::EncapType(RouteLwEnCapType::Xfrm));
            m.attributes
                .push(RouteAttribute::Encap(vec![RouteLwTunnelEncap::Xfrm(
                    RouteXfrmTunnel::IfId(k.if_id),
                )]));
        }
    }
    m
}

/// `ip route del DST table T [dev OIF] [metric M]` (scope nowhere: any scope).
pub fn route_del_message(r: &FoundRoute) -> RouteMessage {
    let k = &r.key;
    let mut m = RouteMessage::default();
    m.header.address_family = af(Family::of(&k.dst));
    m.header.destination_prefix_length = k.dst.prefix_len();
    m.header.table = header_table(k.table);
    m.header.tos = r.tos;
    m.header.scope = RouteScope::NoWhere;
    m.attributes = vec![dst_attr(&k.dst), RouteAttribute::Table(k.table)];
    if k.oif != 0 && k.oif != THROW {
        m.attributes.push(RouteAttribute::Oif(k.oif));
    }
    if let Some(p) = r.priority {
        m.attributes.push(RouteAttribute::Priority(p));
    }
    m
}

#[cfg(test)]
mod tests {
    use super::super::desired::tests::net;
    use super::super::reconcile::tests::found_rule;
    use super::*;
    use netlink_packet_core::{NetlinkPayload, NLM_F_ACK, NLM_F_CREATE, NLM_F_EXCL, NLM_F_REQUEST};

    #[test]
    fn messages() {
        let k = RuleKey {
            family: Family::V4,
            priority: 1042,
            table: 1042,
            fwmark: 0x100000,
            fwmask: 0x300000,
            to: None,
        };
        let m = rule_message(&k);
        assert_eq!(m.header.table, 0, "table > 255 goes in the attribute");
        assert_eq!(m.header.action, RuleAction::ToTable);
        let back = parse_rule(m.clone()).unwrap();
        assert!(back.exact);
        // As the kernel dumps it: header table RT_TABLE_COMPAT, "unset" suppressors.
        let mut dumped = m.clone();
        dumped.header.table = 252;
        dumped
            .attributes
            .push(RuleAttribute::SuppressPrefixLen(u32::MAX));
        assert_eq!(parse_rule(dumped.clone()).unwrap().key, k);
        assert!(parse_rule(dumped.clone()).unwrap().exact);
        dumped.attributes.push(RuleAttribute::SuppressPrefixLen(0));
        assert!(!parse_rule(dumped).unwrap().exact);
        assert_eq!(back.key, k);
        let small = rule_message(&RuleKey { table: 100, ..k });
        assert_eq!(small.header.table, 100);

        let mut with_iif = m.clone();
        with_iif
            .attributes
            .push(RuleAttribute::Iifname("eth0".into()));
        assert!(!parse_rule(with_iif).unwrap().exact);

        let rk = RouteKey {
            dst: net("fd42:0:2::/64"),
            table: 1042,
            oif: 7,
            if_id: 0,
        };
        let r = route_add_message(&rk);
        assert_eq!(r.header.address_family, AddressFamily::Inet6);
        assert_eq!(r.header.destination_prefix_length, 64);
        assert_eq!(r.header.protocol, RouteProtocol::Static);
        let back = parse_route(&r).unwrap();
        assert_eq!(back.key, rk);
        assert!(back.exact);

        let del = route_del_message(&FoundRoute {
            key: rk,
            exact: true,
            priority: Some(1024),
            tos: 0,
        });
        assert_eq!(del.header.scope, RouteScope::NoWhere);
        assert!(del.attributes.contains(&RouteAttribute::Priority(1024)));
        assert!(del.attributes.contains(&RouteAttribute::Oif(7)));

        let req = request(&RouteChange::AddRoute(rk));
        assert_eq!(
            req.header.flags,
            NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL
        );
        assert!(matches!(
            req.payload,
            NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewRoute(_))
        ));
        let req = request(&RouteChange::DelRule(found_rule(k)));
        assert_eq!(req.header.flags, NLM_F_REQUEST | NLM_F_ACK);

        let mut gw = route_add_message(&rk);
        gw.attributes
            .push(RouteAttribute::Gateway(RouteAddress::Inet6(
                "fe80::1".parse().unwrap(),
            )));
        assert!(!parse_route(&gw).unwrap().exact);
        let (plain, via) = parse_route_via(&gw).unwrap();
        assert!(plain.exact, "a gateway alone keeps the route plain");
        assert_eq!(via, Some("fe80::1".parse().unwrap()));
        assert_eq!(parse_route_via(&r).unwrap().1, None);
    }

    #[test]
    fn route_mode_rule_and_throw_routes_round_trip() {
        // `ip rule add pref 1042 to 10.42.0.0/16 lookup 1042`: no mark attributes at all.
        let k = RuleKey {
            family: Family::V4,
            priority: 1042,
            table: 1042,
            fwmark: 0,
            fwmask: 0,
            to: Some(net("10.42.0.0/16")),
        };
        let m = rule_message(&k);
        assert_eq!(m.header.dst_len, 16);
        assert!(!m
            .attributes
            .iter()
            .any(|a| matches!(a, RuleAttribute::FwMark(_) | RuleAttribute::FwMask(_))));
        // As the kernel dumps it: the mask it keeps (0) comes back as an attribute.
        let mut dumped = m.clone();
        dumped.attributes.push(RuleAttribute::FwMask(0));
        let back = parse_rule(dumped).unwrap();
        assert!(back.exact);
        assert_eq!(back.key, k);
        // A prefix length without an address is not our shape.
        let mut odd = m.clone();
        odd.attributes
            .retain(|a| !matches!(a, RuleAttribute::Destination(_)));
        assert!(!parse_rule(odd).unwrap().exact);
        // The policy-mode rule is another key (the diff replaces one by the other).
        let fw = RuleKey {
            fwmark: 0x100000,
            fwmask: 0x300000,
            to: None,
            ..k
        };
        assert_ne!(parse_rule(rule_message(&fw)).unwrap().key, k);

        // throw routes: device-less, also as IPv6 dumps them (oif = loopback).
        for dst in ["10.42.1.2/32", "fd42:0:0:1::/64"] {
            let t = RouteKey {
                dst: net(dst),
                table: 1042,
                oif: THROW,
                if_id: 0,
            };
            let add = route_add_message(&t);
            assert_eq!(add.header.kind, RouteType::Throw);
            assert!(!add
                .attributes
                .iter()
                .any(|a| matches!(a, RouteAttribute::Oif(_))));
            let mut dumped = add.clone();
            dumped.attributes.push(RouteAttribute::Oif(1));
            let back = parse_route(&dumped).unwrap();
            assert!(back.exact, "{dst}");
            assert_eq!(back.key, t);
            let del = route_del_message(&back);
            assert!(!del
                .attributes
                .iter()
                .any(|a| matches!(a, RouteAttribute::Oif(_))));
            // unreachable likewise
            let u = RouteKey { oif: 0, ..t };
            let mut dumped = route_add_message(&u);
            dumped.attributes.push(RouteAttribute::Oif(1));
            let back = parse_route(&dumped).unwrap();
            assert!(back.exact && back.key == u, "{back:?}");
        }
        // A unicast route without a device is not ours.
        let mut nodev = route_add_message(&RouteKey {
            dst: net("10.42.1.0/24"),
            table: 1042,
            oif: 3,
            if_id: 0,
        });
        nodev
            .attributes
            .retain(|a| !matches!(a, RouteAttribute::Oif(_)));
        assert!(!parse_route(&nodev).unwrap().exact);
    }

    #[test]
    fn xfrm_encap_routes_round_trip() {
        let k = RouteKey {
            dst: net("10.42.7.9/32"),
            table: 1042,
            oif: 40,
            if_id: 0x5000_0001,
        };
        let m = route_add_message(&k);
        assert!(m
            .attributes
            .contains(&RouteAttribute::EncapType(RouteLwEnCapType::Xfrm)));
        let back = parse_route(&m).unwrap();
        assert_eq!(back.key, k);
        assert!(back.exact);
        // The same route without the metadata is another route (the diff replaces it).
        let plain = RouteKey { if_id: 0, ..k };
        assert_ne!(parse_route(&route_add_message(&plain)).unwrap().key, k);
        // An encap of another kind, or with a link, is not ours.
        let mut other = m.clone();
        other
            .attributes
            .retain(|a| !matches!(a, RouteAttribute::Encap(_)));
        other
            .attributes
            .push(RouteAttribute::Encap(vec![RouteLwTunnelEncap::Xfrm(
                RouteXfrmTunnel::Link(3),
            )]));
        assert!(!parse_route(&other).unwrap().exact);
        let mut mpls = m;
        mpls.attributes
            .retain(|a| !matches!(a, RouteAttribute::EncapType(_)));
        mpls.attributes
            .push(RouteAttribute::EncapType(RouteLwEnCapType::Mpls));
        assert!(!parse_route(&mpls).unwrap().exact);
    }
}

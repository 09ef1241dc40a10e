//! Building and parsing the rtnetlink messages of the VXLAN driver (pure: no I/O).

use std::net::IpAddr;

use ipnet::IpNet;
use netlink_packet_core::{
    NetlinkMessage, NLM_F_ACK, NLM_F_APPEND, NLM_F_CREATE, NLM_F_EXCL, NLM_F_REPLACE, NLM_F_REQUEST,
};
use netlink_packet_route::address::{
    AddressAttribute, AddressHeaderFlags, AddressMessage, AddressScope,
};
use netlink_packet_route::link::{
    AfSpecInet6, AfSpecUnspec, In6AddrGenMode, InfoData, InfoKind, InfoVxlan, LinkAttribute,
    LinkFlags, LinkInfo, LinkMessage,
};
use netlink_packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage, NeighbourState,
};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteFlags, RouteHeader, RouteMessage, RouteProtocol, RouteScope,
    RouteType,
};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};

use super::objects::*;
use super::reconcile::Op;
use crate::dataplane::routes;

/// The main routing table.
pub const MAIN_TABLE: u32 = RouteHeader::RT_TABLE_MAIN as u32;

fn af(ip: IpAddr) -> AddressFamily {
    match ip {
        IpAddr::V4(_) => AddressFamily::Inet,
        IpAddr::V6(_) => AddressFamily::Inet6,
    }
}

fn af_net(n: &IpNet) -> AddressFamily {
    af(n.network())
}

/// `ip link add NAME address MAC mtu MTU type vxlan id VNI dstport PORT local LOCAL dev
/// UNDERLAY nolearning` (created down: IPv6 address generation is set before it goes up).
pub fn create_device(d: &DeviceSpec) -> LinkMessage {
    let mut data = vec![
        InfoVxlan::Id(d.vni),
        InfoVxlan::Port(d.port),
        InfoVxlan::Link(d.underlay),
        InfoVxlan::Learning(false),
    ];
    data.push(match d.local {
        IpAddr::V4(a) => InfoVxlan::Local(a),
        IpAddr::V6(a) => InfoVxlan::Local6(a),
    });
    let mut m = LinkMessage::default();
    m.attributes = vec![
        LinkAttribute::IfName(d.name.clone()),
        LinkAttribute::Address(d.mac.0.to_vec()),
        LinkAttribute::Mtu(d.mtu),
        LinkAttribute::LinkInfo(vec![
            LinkInfo::Kind(InfoKind::Vxlan),
            LinkInfo::Data(InfoData::Vxlan(data)),
        ]),
    ];
    m
}

/// `ip link set dev #INDEX [mtu M] [address A] [up]`.
pub fn set_device(index: u32, mtu: Option<u32>, mac: Option<Mac>, up: bool) -> LinkMessage {
    let mut m = LinkMessage::default();
    m.header.index = index;
    if up {
        m.header.flags |= LinkFlags::Up;
        m.header.change_mask |= LinkFlags::Up;
    }
    if let Some(mtu) = mtu {
        m.attributes.push(LinkAttribute::Mtu(mtu));
    }
    if let Some(mac) = mac {
        m.attributes.push(LinkAttribute::Address(mac.0.to_vec()));
    }
    m
}

/// `ip link set dev #INDEX addrgenmode none`.
pub fn no_ipv6_link_local(index: u32) -> LinkMessage {
    let mut m = LinkMessage::default();
    m.header.index = index;
    m.attributes = vec![LinkAttribute::AfSpecUnspec(vec![AfSpecUnspec::Inet6(
        vec![AfSpecInet6::AddrGenMode(In6AddrGenMode::None)],
    )])];
    m
}

/// `ip link del dev #INDEX`.
pub fn del_device(index: u32) -> LinkMessage {
    let mut m = LinkMessage::default();
    m.header.index = index;
    m
}

/// Read a link message (as dumped for our device's name).
pub fn parse_device(m: &LinkMessage) -> FoundDevice {
    let mut d = FoundDevice {
        index: m.header.index,
        up: m.header.flags.contains(LinkFlags::Up),
        ..Default::default()
    };
    for a in &m.attributes {
        match a {
            LinkAttribute::IfName(n) => d.name = n.clone(),
            LinkAttribute::Mtu(v) => d.mtu = Some(*v),
            LinkAttribute::Address(b) => d.mac = Mac::from_slice(b),
            LinkAttribute::LinkInfo(infos) => {
                for i in infos {
                    match i {
                        LinkInfo::Kind(k) => d.kind = Some(k.to_string()),
                        LinkInfo::Data(InfoData::Vxlan(v)) => parse_vxlan(v, &mut d),
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    d
}

fn parse_vxlan(attrs: &[InfoVxlan], d: &mut FoundDevice) {
    for a in attrs {
        match a {
            InfoVxlan::Id(v) => d.vni = Some(*v),
            InfoVxlan::Port(p) => d.port = Some(*p),
            InfoVxlan::Local(a) => d.local = Some(IpAddr::V4(*a)),
            InfoVxlan::Local6(a) => d.local = Some(IpAddr::V6(*a)),
            InfoVxlan::Link(i) => d.underlay = Some(*i),
            InfoVxlan::Learning(l) => d.learning = Some(*l),
            InfoVxlan::Group(g) if !g.is_unspecified() => d.group = Some(IpAddr::V4(*g)),
            InfoVxlan::Group6(g) if !g.is_unspecified() => d.group = Some(IpAddr::V6(*g)),
            InfoVxlan::CollectMetadata(true) | InfoVxlan::Vnifilter(true) => d.external = true,
            _ => {}
        }
    }
}

/// `ip addr add A dev #INDEX` (host prefix; no DAD for IPv6: the address is unique by
/// construction and DAD probes would be flooded to every peer).
pub fn address_message(index: u32, a: &IpNet) -> AddressMessage {
    let mut m = AddressMessage::default();
    m.header.family = af_net(a);
    m.header.prefix_len = a.prefix_len();
    m.header.scope = AddressScope::Universe;
    m.header.index = index;
    let ip = a.addr();
    if ip.is_ipv4() {
        m.attributes.push(AddressAttribute::Local(ip));
    } else {
        m.header.flags |= AddressHeaderFlags::Nodad;
    }
    m.attributes.push(AddressAttribute::Address(ip));
    m
}

/// A dumped address on `index` (IPv6 link-local ones excluded: the kernel's).
pub fn parse_address(m: &AddressMessage, index: u32) -> Option<IpNet> {
    if m.header.index != index {
        return None;
    }
    let mut addr = None;
    let mut local = None;
    for a in &m.attributes {
        match a {
            AddressAttribute::Address(x) => addr = Some(*x),
            AddressAttribute::Local(x) => local = Some(*x),
            _ => {}
        }
    }
    let ip = local.or(addr)?;
    if let IpAddr::V6(v6) = ip {
        if v6.segments()[0] & 0xffc0 == 0xfe80 {
            return None;
        }
    }
    IpNet::new(ip, m.header.prefix_len).ok()
}

/// `NUD_PERMANENT` set (`bridge fdb add` also sets `NUD_NOARP`: still a static entry).
fn is_permanent(s: NeighbourState) -> bool {
    u16::from(s) & u16::from(NeighbourState::Permanent) != 0
}

fn neigh_addr(ip: IpAddr) -> NeighbourAddress {
    match ip {
        IpAddr::V4(a) => NeighbourAddress::Inet(a),
        IpAddr::V6(a) => NeighbourAddress::Inet6(a),
    }
}

/// `bridge fdb {append|replace} MAC dev #INDEX dst DST self permanent`.
pub fn fdb_message(index: u32, e: &FdbEntry) -> NeighbourMessage {
    let mut m = NeighbourMessage::default();
    m.header.family = AddressFamily::Bridge;
    m.header.ifindex = index;
    m.header.state = NeighbourState::Permanent;
    m.header.flags = NeighbourFlags::Own;
    m.attributes = vec![
        NeighbourAttribute::LinkLayerAddress(e.mac.0.to_vec()),
        NeighbourAttribute::Destination(neigh_addr(e.dst)),
    ];
    m
}

/// A dumped FDB entry: (device index, entry). None for entries without a MAC.
pub fn parse_fdb(m: &NeighbourMessage) -> Option<(u32, FoundFdb)> {
    if m.header.family != AddressFamily::Bridge {
        return None;
    }
    let mut mac = None;
    let mut dst = None;
    let mut exact = is_permanent(m.header.state);
    for a in &m.attributes {
        match a {
            NeighbourAttribute::LinkLayerAddress(b) => mac = Mac::from_slice(b),
            NeighbourAttribute::Destination(d) => {
                dst = match d {
                    NeighbourAddress::Inet(a) => Some(IpAddr::V4(*a)),
                    NeighbourAddress::Inet6(a) => Some(IpAddr::V6(*a)),
                    NeighbourAddress::Other(b) => match b.len() {
                        4 => <[u8; 4]>::try_from(&b[..]).ok().map(IpAddr::from),
                        16 => <[u8; 16]>::try_from(&b[..]).ok().map(IpAddr::from),
                        _ => None,
                    },
                    _ => None,
                }
            }
            NeighbourAttribute::Port(_)
            | NeighbourAttribute::Vni(_)
            | NeighbourAttribute::IfIndex(_)
            | NeighbourAttribute::SourceVni(_)
            | NeighbourAttribute::Other(_) => exact = false,
            _ => {}
        }
    }
    if dst.is_none() {
        exact = false;
    }
    // Keep what identifies this remote, to delete exactly it.
    let mut msg = m.clone();
    msg.attributes.retain(|a| {
        matches!(
            a,
            NeighbourAttribute::LinkLayerAddress(_)
                | NeighbourAttribute::Destination(_)
                | NeighbourAttribute::Port(_)
                | NeighbourAttribute::Vni(_)
                | NeighbourAttribute::IfIndex(_)
                | NeighbourAttribute::SourceVni(_)
        )
    });
    Some((
        m.header.ifindex,
        FoundFdb {
            mac: mac?,
            dst,
            exact,
            msg,
        },
    ))
}

/// `ip neigh replace IP lladdr MAC dev #INDEX nud permanent`.
pub fn neighbour_message(index: u32, n: &Neighbour) -> NeighbourMessage {
    let mut m = NeighbourMessage::default();
    m.header.family = af(n.ip);
    m.header.ifindex = index;
    m.header.state = NeighbourState::Permanent;
    m.attributes = vec![
        NeighbourAttribute::Destination(neigh_addr(n.ip)),
        NeighbourAttribute::LinkLayerAddress(n.mac.0.to_vec()),
    ];
    m
}

/// `ip neigh del IP dev #INDEX`.
pub fn neighbour_del_message(index: u32, ip: IpAddr) -> NeighbourMessage {
    let mut m = NeighbourMessage::default();
    m.header.family = af(ip);
    m.header.ifindex = index;
    m.attributes = vec![NeighbourAttribute::Destination(neigh_addr(ip))];
    m
}

/// A dumped IP neighbour: (device index, neighbour).
pub fn parse_neighbour(m: &NeighbourMessage) -> Option<(u32, FoundNeighbour)> {
    let mut ip = None;
    let mut mac = None;
    for a in &m.attributes {
        match a {
            NeighbourAttribute::Destination(NeighbourAddress::Inet(a)) => ip = Some(IpAddr::V4(*a)),
            NeighbourAttribute::Destination(NeighbourAddress::Inet6(a)) => {
                ip = Some(IpAddr::V6(*a))
            }
            NeighbourAttribute::LinkLayerAddress(b) => mac = Mac::from_slice(b),
            _ => {}
        }
    }
    Some((
        m.header.ifindex,
        FoundNeighbour {
            ip: ip?,
            mac,
            permanent: is_permanent(m.header.state),
        },
    ))
}

fn route_addr(ip: IpAddr) -> RouteAddress {
    match ip {
        IpAddr::V4(a) => RouteAddress::Inet(a),
        IpAddr::V6(a) => RouteAddress::Inet6(a),
    }
}

/// `ip route add DST via VIA dev #INDEX onlink proto static` (main table).
pub fn route_add_message(index: u32, r: &Route) -> RouteMessage {
    let mut m = RouteMessage::default();
    m.header.address_family = af_net(&r.dst);
    m.header.destination_prefix_length = r.dst.prefix_len();
    m.header.table = RouteHeader::RT_TABLE_MAIN;
    m.header.protocol = RouteProtocol::Static;
    m.header.scope = RouteScope::Universe;
    m.header.kind = RouteType::Unicast;
    m.header.flags = RouteFlags::Onlink;
    m.attributes = vec![
        RouteAttribute::Destination(route_addr(r.dst.network())),
        RouteAttribute::Gateway(route_addr(r.via)),
        RouteAttribute::Oif(index),
    ];
    m
}

/// `ip route del` of exactly a found route.
pub fn route_del_message(r: &FoundRoute) -> RouteMessage {
    routes::route_del_message(&routes::FoundRoute {
        key: routes::RouteKey {
            dst: r.dst,
            table: r.table,
            oif: r.oif,
            if_id: 0,
        },
        exact: r.exact,
        priority: r.priority,
        tos: r.tos,
    })
}

/// A dumped route, if it is ours: main table, output device `index`, `proto static`.
pub fn parse_route(m: &RouteMessage, index: u32) -> Option<FoundRoute> {
    if m.header.protocol != RouteProtocol::Static {
        return None;
    }
    let (base, via) = routes::parse_route_via(m)?;
    if base.key.table != MAIN_TABLE || base.key.oif != index {
        return None;
    }
    let h = &m.header;
    let exact = base.exact && h.tos == 0 && h.flags.contains(RouteFlags::Onlink);
    Some(FoundRoute {
        dst: base.key.dst,
        via,
        exact: exact && via.is_some(),
        table: base.key.table,
        oif: index,
        priority: base.priority,
        tos: base.tos,
    })
}

/// The netlink request for one step on device `index` (pure).
pub fn request(op: &Op, index: u32) -> NetlinkMessage<RouteNetlinkMessage> {
    use RouteNetlinkMessage as R;
    let ack = NLM_F_REQUEST | NLM_F_ACK;
    let (payload, flags) = match op {
        Op::CreateDevice(d) => (
            R::NewLink(create_device(d)),
            ack | NLM_F_CREATE | NLM_F_EXCL,
        ),
        Op::DelDevice { index, .. } => (R::DelLink(del_device(*index)), ack),
        Op::NoIpv6LinkLocal => (R::SetLink(no_ipv6_link_local(index)), ack),
        Op::SetDevice { mtu, mac, up, .. } => (R::SetLink(set_device(index, *mtu, *mac, *up)), ack),
        Op::AddAddress(a) => (
            R::NewAddress(address_message(index, a)),
            ack | NLM_F_CREATE | NLM_F_EXCL,
        ),
        Op::DelAddress(a) => (R::DelAddress(address_message(index, a)), ack),
        // Appending to the all-zero entry adds a flood remote; for a unicast MAC, "append"
        // would silently keep an old remote, so it is replaced.
        Op::AddFdb(e) if e.mac.is_zero() => (
            R::NewNeighbour(fdb_message(index, e)),
            ack | NLM_F_CREATE | NLM_F_APPEND,
        ),
        Op::AddFdb(e) => (
            R::NewNeighbour(fdb_message(index, e)),
            ack | NLM_F_CREATE | NLM_F_REPLACE,
        ),
        Op::DelFdb(f) => (R::DelNeighbour(f.msg.clone()), ack),
        Op::SetNeighbour(n) => (
            R::NewNeighbour(neighbour_message(index, n)),
            ack | NLM_F_CREATE | NLM_F_REPLACE,
        ),
        Op::DelNeighbour(ip) => (R::DelNeighbour(neighbour_del_message(index, *ip)), ack),
        Op::AddRoute(r) => (
            R::NewRoute(route_add_message(index, r)),
            ack | NLM_F_CREATE | NLM_F_EXCL,
        ),
        Op::DelRoute(r) => (R::DelRoute(route_del_message(r)), ack),
    };
    crate::dataplane::rtnl::message(payload, flags)
}

#[cfg(test)]
mod tests {
    use super::*;
    use netlink_packet_core::NetlinkPayload;

    fn spec() -> DeviceSpec {
        DeviceSpec {
            name: "vtep1042".into(),
            vni: 1042,
            port: 4789,
            local: "192.168.77.1".parse().unwrap(),
            underlay: 2,
            mtu: 1450,
            mac: Mac([2, 1, 2, 3, 4, 5]),
            no_ipv6_ll: true,
        }
    }

    #[test]
    fn device_round_trip() {
        let d = spec();
        let mut m = create_device(&d);
        // As the kernel dumps it: index, flags.
        m.header.index = 9;
        m.header.flags |= LinkFlags::Up;
        let f = parse_device(&m);
        assert_eq!(f.index, 9);
        assert_eq!(f.kind.as_deref(), Some("vxlan"));
        assert_eq!(f.vni, Some(1042));
        assert_eq!(f.port, Some(4789));
        assert_eq!(f.local, Some(d.local));
        assert_eq!(f.underlay, Some(2));
        assert_eq!(f.learning, Some(false));
        assert_eq!(f.mtu, Some(1450));
        assert_eq!(f.mac, Some(d.mac));
        assert!(f.up && !f.external && f.group.is_none());
        assert_eq!(
            super::super::reconcile::diff_device(Some(&f), &d),
            super::super::reconcile::DeviceAction::Keep
        );

        let s = set_device(9, Some(1400), None, true);
        assert_eq!(s.header.index, 9);
        assert!(s.header.change_mask.contains(LinkFlags::Up));
        assert_eq!(s.attributes, vec![LinkAttribute::Mtu(1400)]);
        assert!(set_device(9, None, None, false)
            .header
            .change_mask
            .is_empty());

        let r = request(&Op::CreateDevice(d), 0);
        assert_eq!(
            r.header.flags,
            NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL
        );
    }

    #[test]
    fn fdb_messages() {
        let e = FdbEntry {
            mac: Mac::ZERO,
            dst: "192.168.77.2".parse().unwrap(),
        };
        let m = fdb_message(7, &e);
        let (idx, f) = parse_fdb(&m).unwrap();
        assert_eq!(idx, 7);
        assert_eq!((f.mac, f.dst, f.exact), (Mac::ZERO, Some(e.dst), true));
        // As dumped for AF_BRIDGE, the address is raw bytes.
        let mut dumped = m.clone();
        dumped.attributes[1] =
            NeighbourAttribute::Destination(NeighbourAddress::Other(vec![192, 168, 77, 2]));
        assert_eq!(parse_fdb(&dumped).unwrap().1.dst, Some(e.dst));
        dumped.attributes.push(NeighbourAttribute::Port(8472));
        let odd = parse_fdb(&dumped).unwrap().1;
        assert!(!odd.exact);
        assert!(odd.msg.attributes.contains(&NeighbourAttribute::Port(8472)));
        // As `bridge fdb append` makes them: permanent + noarp.
        let mut iproute = m.clone();
        iproute.header.state = NeighbourState::Other(0xc0);
        assert!(parse_fdb(&iproute).unwrap().1.exact);
        iproute.header.state = NeighbourState::Reachable;
        assert!(!parse_fdb(&iproute).unwrap().1.exact);

        let zero = request(&Op::AddFdb(e), 7);
        assert_eq!(
            zero.header.flags,
            NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_APPEND
        );
        let uni = request(
            &Op::AddFdb(FdbEntry {
                mac: Mac([2, 0, 0, 0, 0, 1]),
                ..e
            }),
            7,
        );
        assert_eq!(
            uni.header.flags,
            NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE
        );
        assert!(matches!(
            uni.payload,
            NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewNeighbour(ref n))
                if n.header.flags == NeighbourFlags::Own
                    && n.header.state == NeighbourState::Permanent
                    && n.header.family == AddressFamily::Bridge
        ));
        // Not a bridge entry.
        let n = neighbour_message(
            7,
            &Neighbour {
                ip: "10.42.2.0".parse().unwrap(),
                mac: Mac([2, 0, 0, 0, 0, 1]),
            },
        );
        assert!(parse_fdb(&n).is_none());
    }

    #[test]
    fn neighbour_and_address_messages() {
        let n = Neighbour {
            ip: "10.42.2.0".parse().unwrap(),
            mac: Mac([2, 0, 0, 0, 0, 1]),
        };
        let (idx, f) = parse_neighbour(&neighbour_message(7, &n)).unwrap();
        assert_eq!(
            (idx, f.ip, f.mac, f.permanent),
            (7, n.ip, Some(n.mac), true)
        );
        let d = neighbour_del_message(7, n.ip);
        assert_eq!(d.header.family, AddressFamily::Inet);
        assert_eq!(d.attributes.len(), 1);

        let a: IpNet = "10.42.1.0/32".parse().unwrap();
        let m = address_message(7, &a);
        assert_eq!(parse_address(&m, 7), Some(a));
        assert_eq!(parse_address(&m, 8), None);
        let ll: IpNet = "fe80::1/64".parse().unwrap();
        assert_eq!(parse_address(&address_message(7, &ll), 7), None);
        let v6: IpNet = "fd42:0:1::/128".parse().unwrap();
        let m6 = address_message(7, &v6);
        assert!(m6.header.flags.contains(AddressHeaderFlags::Nodad));
        assert_eq!(parse_address(&m6, 7), Some(v6));
    }

    #[test]
    fn route_messages() {
        let r = Route {
            dst: "10.42.2.0/24".parse().unwrap(),
            via: "10.42.2.0".parse().unwrap(),
        };
        let m = route_add_message(7, &r);
        let f = parse_route(&m, 7).unwrap();
        assert!(f.exact);
        assert_eq!((f.dst, f.via, f.table, f.oif), (r.dst, Some(r.via), 254, 7));
        assert!(parse_route(&m, 8).is_none(), "another device's route");
        let mut boot = m.clone();
        boot.header.protocol = RouteProtocol::Boot;
        assert!(parse_route(&boot, 7).is_none(), "not ours: proto boot");
        let mut other_table = m.clone();
        other_table.header.table = 100;
        assert!(parse_route(&other_table, 7).is_none());
        let mut no_onlink = m.clone();
        no_onlink.header.flags = RouteFlags::empty();
        assert!(!parse_route(&no_onlink, 7).unwrap().exact);
        let del = route_del_message(&f);
        assert!(del.attributes.contains(&RouteAttribute::Oif(7)));
        assert_eq!(del.header.scope, RouteScope::NoWhere);
        let req = request(&Op::AddRoute(r), 7);
        assert_eq!(
            req.header.flags,
            NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL
        );
    }
}

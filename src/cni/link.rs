//! Netlink for the bridge plugin: pure message and request builders (unit-tested without a
//! kernel) and the few async operations that send them over an rtnetlink handle, through
//! [`rtnl`](crate::dataplane::rtnl) (errors name the operation and the kernel's reason).

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::RawFd;

use ipnet::IpNet;
use netlink_packet_core::NetlinkMessage;
use netlink_packet_route::address::AddressAttribute;
use netlink_packet_route::link::{
    InfoData, InfoKind, InfoVeth, LinkAttribute, LinkFlags, LinkInfo, LinkMessage,
};
use netlink_packet_route::route::{RouteHeader, RouteMessage, RouteScope};
use netlink_packet_route::RouteNetlinkMessage;
use rtnetlink::{
    AddressMessageBuilder, Handle, LinkBridge, LinkBridgePort, LinkUnspec, LinkVeth,
    RouteMessageBuilder,
};

use crate::dataplane::{routes, rtnl};

/// What the plugin needs to know about a link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    pub index: u32,
    pub name: String,
    pub kind: Option<InfoKind>,
    pub mac: Vec<u8>,
    pub mtu: u32,
    /// Index of the bridge (or other controller) it is a port of.
    pub controller: Option<u32>,
    /// IFLA_LINK: for a veth, the peer's index (in the peer's namespace).
    pub peer_index: Option<u32>,
    pub up: bool,
}

impl Link {
    pub fn parse(m: &LinkMessage) -> Link {
        let mut l = Link {
            index: m.header.index,
            name: String::new(),
            kind: None,
            mac: Vec::new(),
            mtu: 0,
            controller: None,
            peer_index: None,
            up: m.header.flags.contains(LinkFlags::Up),
        };
        for a in &m.attributes {
            match a {
                LinkAttribute::IfName(n) => l.name = n.clone(),
                LinkAttribute::Address(a) => l.mac = a.clone(),
                LinkAttribute::Mtu(v) => l.mtu = *v,
                LinkAttribute::Controller(c) => l.controller = Some(*c),
                LinkAttribute::Link(p) => l.peer_index = Some(*p),
                LinkAttribute::LinkInfo(infos) => {
                    for i in infos {
                        if let LinkInfo::Kind(k) = i {
                            l.kind = Some(k.clone());
                        }
                    }
                }
                _ => {}
            }
        }
        l
    }

    pub fn is_bridge(&self) -> bool {
        self.kind == Some(InfoKind::Bridge)
    }

    pub fn is_veth(&self) -> bool {
        self.kind == Some(InfoKind::Veth)
    }
}

/// `ip link add NAME type bridge mtu MTU up`.
pub fn bridge_message(name: &str, mtu: u32) -> LinkMessage {
    LinkBridge::new(name).mtu(mtu).up().build()
}

/// The container's interface: a veth pair created from the host, `host_name` in the host
/// namespace and `peer_name` directly inside the namespace `peer_ns_fd` (so the container
/// name never exists, even briefly, in the host), both with `mtu`, the peer with `peer_mac`
/// when given.
pub fn veth_message(
    host_name: &str,
    peer_name: &str,
    peer_ns_fd: RawFd,
    mtu: u32,
    peer_mac: Option<[u8; 6]>,
) -> LinkMessage {
    let mut peer = LinkUnspec::new_with_name(peer_name)
        .mtu(mtu)
        .setns_by_fd(peer_ns_fd);
    if let Some(mac) = peer_mac {
        peer = peer.address(mac.to_vec());
    }
    LinkVeth::new(host_name, peer_name)
        .mtu(mtu)
        .set_info_data(InfoData::Veth(InfoVeth::Peer(peer.build())))
        .build()
}

/// `ip link set INDEX master BRIDGE mtu MTU up`.
pub fn port_message(index: u32, bridge: u32, mtu: u32) -> LinkMessage {
    LinkUnspec::new_with_index(index)
        .controller(bridge)
        .mtu(mtu)
        .up()
        .build()
}

/// `ip link set INDEX type bridge_slave hairpin on|off`.
pub fn hairpin_message(index: u32, on: bool) -> LinkMessage {
    LinkBridgePort::new(index).hairpin(on).build()
}

/// `ip link set INDEX mtu MTU up`.
pub fn up_message(index: u32, mtu: Option<u32>) -> LinkMessage {
    let b = LinkUnspec::new_with_index(index);
    match mtu {
        Some(m) => b.mtu(m).up().build(),
        None => b.up().build(),
    }
}

/// `ip route add DST [via GW] dev INDEX` (a link-scope route without a gateway).
pub fn route_message(dst: &IpNet, gw: Option<IpAddr>, index: u32) -> io::Result<RouteMessage> {
    fn bad(e: impl std::fmt::Display) -> io::Error {
        io::Error::other(e.to_string())
    }
    let mut b = RouteMessageBuilder::<IpAddr>::new()
        .destination_prefix(dst.network(), dst.prefix_len())
        .map_err(bad)?
        .output_interface(index);
    match gw {
        Some(g) => b = b.gateway(g).map_err(bad)?,
        None => b = b.scope(RouteScope::Link),
    }
    Ok(b.build())
}

/// `ip link add` of `m` (fails when the link exists).
pub fn add_request(m: LinkMessage) -> NetlinkMessage<RouteNetlinkMessage> {
    rtnl::message(RouteNetlinkMessage::NewLink(m), rtnl::CREATE)
}

/// `ip link set` of `m`, bridge-port attributes included (`RTM_NEWLINK` without create).
pub fn change_request(m: LinkMessage) -> NetlinkMessage<RouteNetlinkMessage> {
    rtnl::message(RouteNetlinkMessage::NewLink(m), rtnl::ACK)
}

/// `ip link del INDEX`.
pub fn delete_request(index: u32) -> NetlinkMessage<RouteNetlinkMessage> {
    let mut m = LinkMessage::default();
    m.header.index = index;
    rtnl::message(RouteNetlinkMessage::DelLink(m), rtnl::ACK)
}

/// `ip address add A dev INDEX`.
pub fn address_request(index: u32, a: &IpNet) -> NetlinkMessage<RouteNetlinkMessage> {
    let m = match a {
        IpNet::V4(n) => AddressMessageBuilder::<Ipv4Addr>::new()
            .index(index)
            .address(n.addr(), n.prefix_len())
            .build(),
        IpNet::V6(n) => AddressMessageBuilder::<Ipv6Addr>::new()
            .index(index)
            .address(n.addr(), n.prefix_len())
            .build(),
    };
    rtnl::message(RouteNetlinkMessage::NewAddress(m), rtnl::CREATE)
}

/// `ip route add` of `m`.
pub fn route_add_request(m: RouteMessage) -> NetlinkMessage<RouteNetlinkMessage> {
    rtnl::message(RouteNetlinkMessage::NewRoute(m), rtnl::CREATE)
}

/// A link message's name, else its index, for errors.
fn link_of(m: &LinkMessage) -> String {
    m.attributes
        .iter()
        .find_map(|a| match a {
            LinkAttribute::IfName(n) => Some(n.clone()),
            _ => None,
        })
        .unwrap_or_else(|| format!("#{}", m.header.index))
}

/// `r`, with a refusal for `errno` counted as success.
fn unless(errno: i32, r: Result<(), rtnl::Error>) -> Result<(), rtnl::Error> {
    match r {
        Err(e) if e.errno() == Some(errno) => Ok(()),
        r => r,
    }
}

/// A link by name, or None.
pub async fn get(h: &Handle, name: &str) -> Result<Option<Link>, rtnl::Error> {
    let found = rtnl::get(
        &format!("link {name}"),
        h.link().get().match_name(name).execute(),
    )
    .await?;
    Ok(found.as_ref().map(Link::parse))
}

/// A link by index, or None.
pub async fn get_index(h: &Handle, index: u32) -> Result<Option<Link>, rtnl::Error> {
    let found = rtnl::get(
        &format!("link #{index}"),
        h.link().get().match_index(index).execute(),
    )
    .await?;
    Ok(found.as_ref().map(Link::parse))
}

/// How many links are ports of the bridge (or other controller) `index`.
pub async fn ports_of(h: &Handle, index: u32) -> Result<usize, rtnl::Error> {
    let all = rtnl::dump("links", h.link().get().execute()).await?;
    Ok(all
        .iter()
        .map(Link::parse)
        .filter(|l| l.controller == Some(index))
        .count())
}

/// Create a link (EEXIST is an error: the caller decides).
pub async fn add(h: &Handle, m: LinkMessage) -> Result<(), rtnl::Error> {
    let op = format!("creating link {}", link_of(&m));
    rtnl::change(h, || op, add_request(m)).await
}

/// Change a link's attributes (`ip link set`).
pub async fn change(h: &Handle, m: LinkMessage) -> Result<(), rtnl::Error> {
    let op = format!("changing link {}", link_of(&m));
    rtnl::change(h, || op, change_request(m)).await
}

/// Change bridge-port attributes.
pub async fn set_port(h: &Handle, m: LinkMessage) -> Result<(), rtnl::Error> {
    let op = format!("changing the bridge port {}", link_of(&m));
    rtnl::change(h, || op, change_request(m)).await
}

/// Delete a link; a link already gone is fine.
pub async fn delete(h: &Handle, index: u32) -> Result<(), rtnl::Error> {
    let op = || format!("deleting link #{index}");
    unless(
        libc::ENODEV,
        rtnl::change(h, op, delete_request(index)).await,
    )
}

/// Add an address (present already: fine).
pub async fn add_address(h: &Handle, index: u32, a: &IpNet) -> Result<(), rtnl::Error> {
    let op = || format!("adding address {a} to link #{index}");
    unless(
        libc::EEXIST,
        rtnl::change(h, op, address_request(index, a)).await,
    )
}

/// The addresses of a link (with their prefix lengths).
pub async fn addresses(h: &Handle, index: u32) -> Result<Vec<IpNet>, rtnl::Error> {
    let msgs = rtnl::dump(
        &format!("addresses of link #{index}"),
        h.address().get().set_link_index_filter(index).execute(),
    )
    .await?;
    Ok(msgs
        .iter()
        .filter_map(|m| {
            let ip = m.attributes.iter().find_map(|a| match a {
                AddressAttribute::Local(ip) => Some(*ip),
                _ => None,
            });
            let ip = ip.or_else(|| {
                m.attributes.iter().find_map(|a| match a {
                    AddressAttribute::Address(ip) => Some(*ip),
                    _ => None,
                })
            })?;
            IpNet::new(ip, m.header.prefix_len).ok()
        })
        .collect())
}

/// Add a route (present already: fine).
pub async fn add_route(h: &Handle, m: RouteMessage) -> Result<(), rtnl::Error> {
    let dst = routes::parse_route(&m).map(|r| r.key.dst);
    let op = || match dst {
        Some(d) => format!("adding route {d}"),
        None => "adding a route".to_string(),
    };
    unless(
        libc::EEXIST,
        rtnl::change(h, op, route_add_request(m)).await,
    )
}

/// Destinations (and output devices) of the main-table routes of one family.
pub async fn route_dsts(h: &Handle, v4: bool) -> Result<Vec<(IpNet, Option<u32>)>, rtnl::Error> {
    let q = if v4 {
        RouteMessageBuilder::<Ipv4Addr>::new().build()
    } else {
        RouteMessageBuilder::<Ipv6Addr>::new().build()
    };
    let msgs = rtnl::dump("routes", h.route().get(q).execute()).await?;
    Ok(msgs
        .iter()
        .filter_map(routes::parse_route)
        .filter(|r| r.key.table == u32::from(RouteHeader::RT_TABLE_MAIN))
        .map(|r| (r.key.dst, (r.key.oif != 0).then_some(r.key.oif)))
        .collect())
}

/// MTU of the device the IPv4 default route leaves by (the underlay, when no metadata
/// says otherwise).
pub async fn default_route_mtu(h: &Handle) -> Result<Option<u32>, rtnl::Error> {
    let routes = route_dsts(h, true).await?;
    let Some(oif) = routes
        .iter()
        .find(|(n, _)| n.prefix_len() == 0)
        .and_then(|(_, oif)| *oif)
    else {
        return Ok(None);
    };
    Ok(get_index(h, oif).await?.map(|l| l.mtu))
}

#[cfg(test)]
mod tests {
    use super::*;
    use netlink_packet_core::{NetlinkPayload, NLM_F_ACK, NLM_F_CREATE, NLM_F_EXCL, NLM_F_REQUEST};
    use netlink_packet_route::link::{InfoBridgePort, InfoPortData, InfoPortKind};
    use netlink_packet_route::route::RouteAttribute;

    fn attrs_of(m: &LinkMessage) -> &[LinkAttribute] {
        &m.attributes
    }

    fn infos_of(m: &LinkMessage) -> &[LinkInfo] {
        attrs_of(m)
            .iter()
            .find_map(|x| match x {
                LinkAttribute::LinkInfo(i) => Some(i.as_slice()),
                _ => None,
            })
            .expect("IFLA_LINKINFO")
    }

    #[test]
    fn veth_peer_goes_straight_into_the_container() {
        let m = veth_message("veth0123456789a", "eth0", 7, 1446, Some([2, 0, 0, 0, 0, 9]));
        let a = attrs_of(&m);
        assert!(a.contains(&LinkAttribute::IfName("veth0123456789a".into())));
        assert!(a.contains(&LinkAttribute::Mtu(1446)));
        let infos = infos_of(&m);
        assert!(infos.contains(&LinkInfo::Kind(InfoKind::Veth)));
        let peer = infos
            .iter()
            .find_map(|i| match i {
                LinkInfo::Data(InfoData::Veth(InfoVeth::Peer(p))) => Some(p),
                _ => None,
            })
            .expect("peer");
        assert!(peer
            .attributes
            .contains(&LinkAttribute::IfName("eth0".into())));
        assert!(peer.attributes.contains(&LinkAttribute::NetNsFd(7)));
        assert!(peer.attributes.contains(&LinkAttribute::Mtu(1446)));
        assert!(peer
            .attributes
            .contains(&LinkAttribute::Address(vec![2, 0, 0, 0, 0, 9])));
        let no_mac = veth_message("v", "eth0", 7, 1500, None);
        assert!(!format!("{no_mac:?}").contains("Address"));
    }

    #[test]
    fn port_and_hairpin() {
        let m = port_message(12, 3, 1400);
        assert_eq!(m.header.index, 12);
        assert!(m.header.flags.contains(LinkFlags::Up));
        assert!(m.attributes.contains(&LinkAttribute::Controller(3)));
        assert!(m.attributes.contains(&LinkAttribute::Mtu(1400)));
        let h = hairpin_message(12, true);
        let infos = infos_of(&h);
        assert!(infos.contains(&LinkInfo::PortKind(InfoPortKind::Bridge)));
        assert!(
            infos.contains(&LinkInfo::PortData(InfoPortData::BridgePort(vec![
                InfoBridgePort::HairpinMode(true)
            ])))
        );
    }

    #[test]
    fn bridge_and_parse() {
        let m = bridge_message("cni0", 1446);
        let l = Link::parse(&m);
        assert_eq!(l.name, "cni0");
        assert!(l.is_bridge() && l.up);
        assert_eq!(l.mtu, 1446);
    }

    #[test]
    fn routes() {
        let r = route_message(
            &"0.0.0.0/0".parse().unwrap(),
            Some("10.42.1.1".parse().unwrap()),
            4,
        )
        .unwrap();
        assert_eq!(r.header.destination_prefix_length, 0);
        assert!(r.attributes.contains(&RouteAttribute::Oif(4)));
        assert!(r
            .attributes
            .iter()
            .any(|a| matches!(a, RouteAttribute::Gateway(_))));
        let r = route_message(&"10.42.0.0/16".parse().unwrap(), None, 4).unwrap();
        assert_eq!(r.header.scope, RouteScope::Link);
        assert!(route_message(
            &"10.42.0.0/16".parse().unwrap(),
            Some("fd00::1".parse().unwrap()),
            4
        )
        .is_ok());
    }

    #[test]
    fn requests_carry_the_flags_ip_uses() {
        use RouteNetlinkMessage as R;
        let create = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL;
        let add = add_request(bridge_message("cni0", 1500));
        assert_eq!(add.header.flags, create);
        assert!(matches!(
            add.payload,
            NetlinkPayload::InnerMessage(R::NewLink(_))
        ));
        let set = change_request(up_message(4, None));
        assert_eq!(set.header.flags, NLM_F_REQUEST | NLM_F_ACK);
        assert!(matches!(
            set.payload,
            NetlinkPayload::InnerMessage(R::NewLink(_))
        ));
        let del = delete_request(9);
        assert_eq!(del.header.flags, NLM_F_REQUEST | NLM_F_ACK);
        let NetlinkPayload::InnerMessage(R::DelLink(l)) = &del.payload else {
            panic!("{del:?}")
        };
        assert_eq!(l.header.index, 9);

        let a = address_request(5, &"10.42.1.2/24".parse().unwrap());
        assert_eq!(a.header.flags, create);
        let NetlinkPayload::InnerMessage(R::NewAddress(m)) = &a.payload else {
            panic!("{a:?}")
        };
        assert_eq!((m.header.index, m.header.prefix_len), (5, 24));
        let ip: IpAddr = "10.42.1.2".parse().unwrap();
        assert!(m.attributes.contains(&AddressAttribute::Local(ip)));
        assert!(m.attributes.contains(&AddressAttribute::Address(ip)));
        let a6 = address_request(5, &"fd42::2/64".parse().unwrap());
        let NetlinkPayload::InnerMessage(R::NewAddress(m)) = &a6.payload else {
            panic!("{a6:?}")
        };
        assert_eq!(m.header.prefix_len, 64);

        let r = route_message(&"10.42.0.0/16".parse().unwrap(), None, 4).unwrap();
        let r = route_add_request(r);
        assert_eq!(r.header.flags, create);
        assert!(matches!(
            r.payload,
            NetlinkPayload::InnerMessage(R::NewRoute(_))
        ));
    }

    #[test]
    fn links_are_named_in_errors_by_name_else_index() {
        assert_eq!(link_of(&bridge_message("cni0", 1500)), "cni0");
        assert_eq!(link_of(&up_message(12, None)), "#12");
    }
}

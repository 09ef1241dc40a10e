//! Netlink for the bridge plugin: pure message builders (unit-tested without a kernel) and
//! the few async operations that send them over an rtnetlink handle.

use std::io;
use std::net::IpAddr;
use std::os::fd::RawFd;

use futures::stream::TryStreamExt;
use ipnet::IpNet;
use netlink_packet_route::address::AddressAttribute;
use netlink_packet_route::link::{
    InfoData, InfoKind, InfoVeth, LinkAttribute, LinkFlags, LinkInfo, LinkMessage,
};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteScope,
};
use rtnetlink::{Handle, LinkBridge, LinkBridgePort, LinkUnspec, LinkVeth, RouteMessageBuilder};

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

/// The netlink error as an `io::Error` (errno kept, so callers can match EEXIST/ENODEV).
pub fn nl_io(e: rtnetlink::Error) -> io::Error {
    match e {
        rtnetlink::Error::NetlinkError(m) => m.to_io(),
        e => io::Error::other(e.to_string()),
    }
}

fn errno_is(e: &io::Error, errno: i32) -> bool {
    e.raw_os_error() == Some(errno)
}

/// Ignore "already exists".
fn exists_ok(r: Result<(), rtnetlink::Error>) -> io::Result<()> {
    match r.map_err(nl_io) {
        Err(e) if errno_is(&e, libc::EEXIST) => Ok(()),
        r => r,
    }
}

/// A link by name, or None.
pub async fn get(h: &Handle, name: &str) -> io::Result<Option<Link>> {
    let r = h.link().get().match_name(name).execute().try_next().await;
    match r.map_err(nl_io) {
        Ok(m) => Ok(m.as_ref().map(Link::parse)),
        Err(e) if errno_is(&e, libc::ENODEV) => Ok(None),
        Err(e) => Err(e),
    }
}

/// A link by index, or None.
pub async fn get_index(h: &Handle, index: u32) -> io::Result<Option<Link>> {
    let r = h.link().get().match_index(index).execute().try_next().await;
    match r.map_err(nl_io) {
        Ok(m) => Ok(m.as_ref().map(Link::parse)),
        Err(e) if errno_is(&e, libc::ENODEV) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Create a link (EEXIST is an error: the caller decides).
pub async fn add(h: &Handle, m: LinkMessage) -> io::Result<()> {
    h.link().add(m).execute().await.map_err(nl_io)
}

/// Change a link's attributes (`ip link set`).
pub async fn change(h: &Handle, m: LinkMessage) -> io::Result<()> {
    h.link().change(m).execute().await.map_err(nl_io)
}

/// Change bridge-port attributes.
pub async fn set_port(h: &Handle, m: LinkMessage) -> io::Result<()> {
    h.link().set_port(m).execute().await.map_err(nl_io)
}

/// Delete a link; a link already gone is fine.
pub async fn delete(h: &Handle, index: u32) -> io::Result<()> {
    match h.link().del(index).execute().await.map_err(nl_io) {
        Err(e) if errno_is(&e, libc::ENODEV) => Ok(()),
        r => r,
    }
}

/// Add an address (present already: fine).
pub async fn add_address(h: &Handle, index: u32, a: &IpNet) -> io::Result<()> {
    exists_ok(
        h.address()
            .add(index, a.addr(), a.prefix_len())
            .execute()
            .await,
    )
}

/// The addresses of a link (with their prefix lengths).
pub async fn addresses(h: &Handle, index: u32) -> io::Result<Vec<IpNet>> {
    let msgs: Vec<_> = h
        .address()
        .get()
        .set_link_index_filter(index)
        .execute()
        .try_collect()
        .await
        .map_err(nl_io)?;
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
pub async fn add_route(h: &Handle, m: RouteMessage) -> io::Result<()> {
    exists_ok(h.route().add(m).execute().await)
}

/// Destinations of the main-table routes of one family.
pub async fn route_dsts(h: &Handle, v4: bool) -> io::Result<Vec<(IpNet, Option<u32>)>> {
    let q = if v4 {
        RouteMessageBuilder::<std::net::Ipv4Addr>::new().build()
    } else {
        RouteMessageBuilder::<std::net::Ipv6Addr>::new().build()
    };
    let msgs: Vec<RouteMessage> = h
        .route()
        .get(q)
        .execute()
        .try_collect()
        .await
        .map_err(nl_io)?;
    Ok(msgs
        .iter()
        .filter(|m| m.header.table == RouteHeader::RT_TABLE_MAIN)
        .filter_map(|m| {
            let mut dst: Option<IpAddr> = None;
            let mut oif = None;
            for a in &m.attributes {
                match a {
                    RouteAttribute::Destination(RouteAddress::Inet(a)) => dst = Some((*a).into()),
                    RouteAttribute::Destination(RouteAddress::Inet6(a)) => dst = Some((*a).into()),
                    RouteAttribute::Oif(i) => oif = Some(*i),
                    _ => {}
                }
            }
            let dst = dst.unwrap_or(if v4 {
                IpAddr::from([0u8; 4])
            } else {
                IpAddr::from([0u16; 8])
            });
            IpNet::new(dst, m.header.destination_prefix_length)
                .ok()
                .map(|n| (n, oif))
        })
        .collect())
}

/// MTU of the device the IPv4 default route leaves by (the underlay, when no metadata
/// says otherwise).
pub async fn default_route_mtu(h: &Handle) -> io::Result<Option<u32>> {
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
    use netlink_packet_route::link::{InfoBridgePort, InfoPortData, InfoPortKind};

    fn attrs_of(m: &LinkMessage) -> &[LinkAttribute] {
        &m.attributes
    }

    #[test]
    fn veth_peer_goes_straight_into_the_container() {
        let m = veth_message("veth0123456789a", "eth0", 7, 1446, Some([2, 0, 0, 0, 0, 9]));
        let a = attrs_of(&m);
        assert!(a.contains(&LinkAttribute::IfName("veth0123456789a".into())));
        assert!(a.contains(&LinkAttribute::Mtu(1446)));
        let infos = a
            .iter()
            .find_map(|x| match x {
                LinkAttribute::LinkInfo(i) => Some(i),
                _ => None,
            })
            .unwrap();
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
        let infos = h
            .attributes
            .iter()
            .find_map(|x| match x {
                LinkAttribute::LinkInfo(i) => Some(i),
                _ => None,
            })
            .unwrap();
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
}

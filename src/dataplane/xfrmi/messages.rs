//! rtnetlink messages for the route mode's XFRM interfaces, and parsing a link dump back
//! (pure: no I/O).

use netlink_packet_core::NetlinkMessage;
use netlink_packet_core::{DefaultNla, Nla};
use netlink_packet_route::link::{
    InfoData, InfoKind, InfoXfrm, LinkAttribute, LinkFlags, LinkInfo, LinkMessage,
};
use netlink_packet_route::RouteNetlinkMessage;

use super::desired::{FoundLink, LinkOp, LinkSpec, LINK_GROUP};
use crate::dataplane::rtnl;

/// `IFLA_XFRM_COLLECT_METADATA` (a flag; netlink-packet-route has no name for it).
pub const IFLA_XFRM_COLLECT_METADATA: u16 = 3;

/// `ip link add NAME index INDEX mtu MTU group 1042 up type xfrm dev #UNDERLAY if_id ID`
/// (`index` 0: the kernel's choice), or for a collect_md spec `... type xfrm external`.
pub fn create(s: &LinkSpec, index: u32) -> LinkMessage {
    let mut m = LinkMessage::default();
    m.header.index = index;
    m.header.flags |= LinkFlags::Up;
    m.header.change_mask |= LinkFlags::Up;
    m.attributes = vec![
        LinkAttribute::IfName(s.name.clone()),
        LinkAttribute::Mtu(s.mtu),
        LinkAttribute::Group(LINK_GROUP),
        LinkAttribute::LinkInfo(vec![
            LinkInfo::Kind(InfoKind::Xfrm),
            LinkInfo::Data(InfoData::Xfrm(if s.collect_md {
                vec![InfoXfrm::Other(DefaultNla::new(
                    IFLA_XFRM_COLLECT_METADATA,
                    Vec::new(),
                ))]
            } else {
                vec![InfoXfrm::Link(s.underlay), InfoXfrm::IfId(s.if_id)]
            })),
        ]),
    ];
    m
}

/// `ip link set dev #INDEX mtu MTU up`.
pub fn set(index: u32, mtu: u32) -> LinkMessage {
    let mut m = LinkMessage::default();
    m.header.index = index;
    m.header.flags |= LinkFlags::Up;
    m.header.change_mask |= LinkFlags::Up;
    m.attributes.push(LinkAttribute::Mtu(mtu));
    m
}

/// `ip link del dev #INDEX`.
pub fn delete(index: u32) -> LinkMessage {
    let mut m = LinkMessage::default();
    m.header.index = index;
    m
}

/// The request for one write.
pub fn request(op: &LinkOp) -> NetlinkMessage<RouteNetlinkMessage> {
    use RouteNetlinkMessage as R;
    match op {
        LinkOp::Create { spec, index } => {
            rtnl::message(R::NewLink(create(spec, *index)), rtnl::CREATE)
        }
        LinkOp::Set { index, spec } => rtnl::message(R::SetLink(set(*index, spec.mtu)), rtnl::ACK),
        LinkOp::Delete { index, .. } => rtnl::message(R::DelLink(delete(*index)), rtnl::ACK),
    }
}

/// A dumped link, as far as ownership and the diff need it.
pub fn parse(m: &LinkMessage) -> FoundLink {
    let mut l = FoundLink {
        index: m.header.index,
        up: m.header.flags.contains(LinkFlags::Up),
        ..Default::default()
    };
    for a in &m.attributes {
        match a {
            LinkAttribute::IfName(n) => l.name = n.clone(),
            LinkAttribute::Group(g) => l.group = *g,
            LinkAttribute::Mtu(v) => l.mtu = Some(*v),
            LinkAttribute::LinkInfo(infos) => {
                for i in infos {
                    match i {
                        LinkInfo::Kind(k) => l.kind = Some(k.to_string()),
                        LinkInfo::Data(InfoData::Xfrm(x)) => {
                            for a in x {
                                match a {
                                    InfoXfrm::Link(v) => l.underlay = Some(*v),
                                    InfoXfrm::IfId(v) => l.if_id = Some(*v),
                                    InfoXfrm::Other(n)
                                        if n.kind() == IFLA_XFRM_COLLECT_METADATA =>
                                    {
                                        l.collect_md = true
                                    }
                                    _ => {}
                                }
                            }
                        }
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    l
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataplane::xfrmi::desired::is_owned;

    /// The wire bytes of a link message parse back to the same attributes (as a dump answer
    /// `NEWLINK` would).
    fn wire(m: &LinkMessage) -> LinkMessage {
        let mut msg = NetlinkMessage::from(RouteNetlinkMessage::NewLink(m.clone()));
        msg.finalize();
        let mut buf = vec![0u8; msg.buffer_len()];
        msg.serialize(&mut buf);
        match NetlinkMessage::<RouteNetlinkMessage>::deserialize(&buf)
            .unwrap()
            .payload
        {
            netlink_packet_core::NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewLink(l)) => l,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn create_parses_back_as_ours() {
        let s = LinkSpec {
            name: "imx1f".into(),
            if_id: 0x5000_001f,
            underlay: 2,
            mtu: 1438,
            owner: "h2".into(),
            collect_md: false,
        };
        let m = wire(&create(&s, 9));
        assert!(m.header.flags.contains(LinkFlags::Up), "created up");
        assert_eq!(m.header.index, 9, "the index asked for");
        assert_eq!(wire(&create(&s, 0)).header.index, 0, "the kernel's choice");
        let l = parse(&m);
        assert_eq!(
            l,
            FoundLink {
                index: 9,
                name: "imx1f".into(),
                kind: Some("xfrm".into()),
                group: LINK_GROUP,
                up: true,
                mtu: Some(1438),
                if_id: Some(0x5000_001f),
                underlay: Some(2),
                collect_md: false,
            }
        );
        let ext = parse(&wire(&create(
            &LinkSpec {
                name: "imxmesh".into(),
                if_id: 0,
                collect_md: true,
                ..s.clone()
            },
            0,
        )));
        assert!(ext.collect_md && ext.if_id.is_none() && ext.underlay.is_none());
        assert!(is_owned(&ext));
        assert!(is_owned(&l));
        let r = request(&LinkOp::Create {
            spec: s.clone(),
            index: 9,
        });
        assert_eq!(r.header.flags, rtnl::CREATE);
        let d = request(&LinkOp::Delete {
            index: 9,
            name: s.name.clone(),
        });
        assert!(
            matches!(d.payload, netlink_packet_core::NetlinkPayload::InnerMessage(RouteNetlinkMessage::DelLink(ref x)) if x.header.index == 9)
        );
    }
}

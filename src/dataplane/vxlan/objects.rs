//! The VXLAN objects ipsec-mesh manages, as comparable values: what the desired state is
//! made of, what a dump is parsed into, and what the diff compares.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use ipnet::IpNet;

/// Default device name.
pub const DEFAULT_DEV: &str = "vtep1042";
/// Default VXLAN network identifier.
pub const DEFAULT_VNI: u32 = 1042;
/// Default UDP destination port (IANA's VXLAN port).
pub const DEFAULT_PORT: u16 = 4789;

/// Which VXLAN device ipsec-mesh owns and how it is set up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VxlanConfig {
    /// Device name; everything on this device is ipsec-mesh's.
    pub dev: String,
    pub vni: u32,
    pub port: u16,
    /// VXLAN between hosts is ESP-encrypted (transport mode): the device MTU leaves room.
    pub esp: bool,
}

impl Default for VxlanConfig {
    fn default() -> VxlanConfig {
        VxlanConfig {
            dev: DEFAULT_DEV.to_string(),
            vni: DEFAULT_VNI,
            port: DEFAULT_PORT,
            esp: false,
        }
    }
}

/// An Ethernet address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Mac(pub [u8; 6]);

impl Mac {
    /// The all-zero address: FDB entries for it take broadcast, unknown-unicast and
    /// multicast frames ("BUM") to every listed remote.
    pub const ZERO: Mac = Mac([0; 6]);

    pub fn is_zero(&self) -> bool {
        *self == Mac::ZERO
    }

    /// From a netlink `lladdr` (None unless 6 bytes).
    pub fn from_slice(b: &[u8]) -> Option<Mac> {
        <[u8; 6]>::try_from(b).ok().map(Mac)
    }
}

impl fmt::Display for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            b[0], b[1], b[2], b[3], b[4], b[5]
        )
    }
}

impl FromStr for Mac {
    type Err = String;
    fn from_str(s: &str) -> Result<Mac, String> {
        let parts: Vec<&str> = s.split(':').collect();
        if parts.len() != 6 {
            return Err(format!("{s:?} is not a MAC address"));
        }
        let mut m = [0u8; 6];
        for (o, p) in m.iter_mut().zip(parts) {
            *o = u8::from_str_radix(p, 16).map_err(|_| format!("{s:?} is not a MAC address"))?;
        }
        Ok(Mac(m))
    }
}

/// Who a desired or found object belongs to, for per-peer error reports.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Owner {
    /// Shared by the whole mesh (the device, the local VTEP address).
    Mesh,
    /// One peer, by host id.
    Peer(String),
    /// On our device but no longer wanted: a departed peer, or a stray entry.
    Stale,
}

impl fmt::Display for Owner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Owner::Mesh => f.write_str("mesh"),
            Owner::Peer(h) => f.write_str(h),
            Owner::Stale => f.write_str("departed peer"),
        }
    }
}

/// The VXLAN device as wanted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceSpec {
    pub name: String,
    pub vni: u32,
    pub port: u16,
    /// Source address of the tunnel: the self host's endpoint.
    pub local: IpAddr,
    /// Index of the underlay device holding `local`.
    pub underlay: u32,
    pub mtu: u32,
    pub mac: Mac,
    /// Turn IPv6 link-local address generation off (IPv4 overlays: no IPv6 chatter flooded
    /// to every peer). Set once, right after creation.
    pub no_ipv6_ll: bool,
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "device {} vxlan id {} dstport {} local {} dev #{} nolearning mtu {} address {}",
            self.name, self.vni, self.port, self.local, self.underlay, self.mtu, self.mac
        )
    }
}

/// The device as found in the kernel (by name).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct FoundDevice {
    pub index: u32,
    pub name: String,
    /// `IFLA_INFO_KIND` (`vxlan`, `bridge`, ...); None for a device without one.
    pub kind: Option<String>,
    pub vni: Option<u32>,
    pub port: Option<u16>,
    pub local: Option<IpAddr>,
    pub underlay: Option<u32>,
    pub learning: Option<bool>,
    /// A default remote or multicast group (we never set one).
    pub group: Option<IpAddr>,
    /// Metadata-collecting ("external") or VNI-filtering device (we never make one).
    pub external: bool,
    pub mtu: Option<u32>,
    pub mac: Option<Mac>,
    pub up: bool,
}

/// A static FDB entry on our device: frames for `mac` go in UDP to `dst`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FdbEntry {
    pub mac: Mac,
    pub dst: IpAddr,
}

impl fmt::Display for FdbEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "fdb {} dst {}", self.mac, self.dst)
    }
}

/// An FDB entry found on our device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FoundFdb {
    pub mac: Mac,
    /// None: the entry has no remote address (e.g. a nexthop group).
    pub dst: Option<IpAddr>,
    /// Exactly the shape we make: permanent, no port/VNI/ifindex/source-VNI override.
    pub exact: bool,
    /// The dumped message, to delete exactly this remote.
    pub msg: netlink_packet_route::neighbour::NeighbourMessage,
}

impl fmt::Display for FoundFdb {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.dst {
            Some(d) => write!(f, "fdb {} dst {d}", self.mac),
            None => write!(f, "fdb {}", self.mac),
        }
    }
}

/// A permanent neighbour: the peer's VTEP address resolves to the peer's VTEP MAC.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Neighbour {
    pub ip: IpAddr,
    pub mac: Mac,
}

impl fmt::Display for Neighbour {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "neigh {} lladdr {} permanent", self.ip, self.mac)
    }
}

/// An IP neighbour found on our device (either family).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FoundNeighbour {
    pub ip: IpAddr,
    pub mac: Option<Mac>,
    pub permanent: bool,
}

/// A route to a peer's subnet through its VTEP address, `onlink` on our device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Route {
    pub dst: IpNet,
    pub via: IpAddr,
}

impl fmt::Display for Route {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "route {} via {} onlink", self.dst, self.via)
    }
}

/// One of our routes found in the main table (on our device, `proto static`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FoundRoute {
    pub dst: IpNet,
    pub via: Option<IpAddr>,
    /// A plain unicast onlink route via `via` (no multipath, source, tos, ...).
    pub exact: bool,
    pub table: u32,
    pub oif: u32,
    /// Metric and tos, kept to delete exactly this route.
    pub priority: Option<u32>,
    pub tos: u8,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mac_round_trip() {
        let m: Mac = "02:1a:ff:00:09:10".parse().unwrap();
        assert_eq!(m.0, [0x02, 0x1a, 0xff, 0x00, 0x09, 0x10]);
        assert_eq!(m.to_string(), "02:1a:ff:00:09:10");
        assert!(Mac::ZERO.is_zero());
        assert!(!m.is_zero());
        assert!("02:1a".parse::<Mac>().is_err());
        assert!("02:1a:ff:00:09:zz".parse::<Mac>().is_err());
        assert_eq!(
            Mac::from_slice(&[1, 2, 3, 4, 5, 6]),
            Some(Mac([1, 2, 3, 4, 5, 6]))
        );
        assert_eq!(Mac::from_slice(&[1, 2, 3]), None);
    }
}

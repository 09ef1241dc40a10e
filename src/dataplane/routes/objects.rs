//! The routing objects ipsec-mesh manages, as comparable values: which rule priority and
//! table are ours, what a dump is parsed into, and what the diff compares.

use std::fmt;
use std::net::IpAddr;

use ipnet::IpNet;
use netlink_packet_route::rule::RuleMessage;

use crate::dataplane::firewall::Family;

/// Default route table for marked traffic.
pub const DEFAULT_TABLE: u32 = 1042;
/// Default priority (`pref`) of our ip rule.
pub const DEFAULT_PRIORITY: u32 = 1042;

/// Which table and rule priority we own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RouteConfig {
    pub table: u32,
    pub priority: u32,
}

impl Default for RouteConfig {
    fn default() -> RouteConfig {
        RouteConfig {
            table: DEFAULT_TABLE,
            priority: DEFAULT_PRIORITY,
        }
    }
}

/// How to find the underlay device the routes point at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Underlay {
    /// The interface holding this address (the plan's endpoint).
    Address(IpAddr),
    /// An interface by name.
    Name(String),
}

/// The identity of a rule of ours.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RuleKey {
    pub family: Family,
    pub priority: u32,
    pub table: u32,
    /// 0/0 (with `to`): no mark match.
    pub fwmark: u32,
    pub fwmask: u32,
    /// `to <prefix>`: select by destination (route mode: the overlay, so that mark-less
    /// look-ups, the reverse-path check's among them, reach our table). `None`: any.
    pub to: Option<IpNet>,
}

impl fmt::Display for RuleKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} rule pref {}", self.family, self.priority)?;
        if let Some(to) = self.to {
            write!(f, " to {to}")?;
        }
        if self.fwmark != 0 || self.fwmask != 0 {
            write!(f, " fwmark {:#x}/{:#x}", self.fwmark, self.fwmask)?;
        }
        write!(f, " lookup {}", self.table)
    }
}

/// [`RouteKey::oif`] of a `throw` route (no device): a look-up that hits it leaves our table
/// and goes on with the next rule (route mode: this host's own subnets, inside the overlay
/// the destination rule sends to our table). No real interface has this index (the kernel's
/// are positive `int`s).
pub const THROW: u32 = u32::MAX;

/// The identity of a route of ours.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RouteKey {
    pub dst: IpNet,
    pub table: u32,
    /// Output interface index; 0: an `unreachable` route (no device: the route mode's
    /// fail-closed route for the overlay); [`THROW`]: a `throw` route.
    pub oif: u32,
    /// Route mode with one XFRM interface in collect_md mode: the peer's interface id as the
    /// route's lightweight-tunnel metadata (`encap xfrm if_id ID`, kernel >= 6.0), which the
    /// interface uses for the policy and SA look-up. 0: none (a plain route).
    pub if_id: u32,
}

impl fmt::Display for RouteKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.oif == 0 {
            return write!(f, "route unreachable {} table {}", self.dst, self.table);
        }
        if self.oif == THROW {
            return write!(f, "route throw {} table {}", self.dst, self.table);
        }
        write!(f, "route {} dev #{}", self.dst, self.oif)?;
        if self.if_id != 0 {
            write!(f, " encap xfrm if_id {:#x}", self.if_id)?;
        }
        write!(f, " table {}", self.table)
    }
}

/// A rule dumped from the kernel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FoundRule {
    pub key: RuleKey,
    /// Only the attributes in `key` select packets (no iif, src, tos, ...) and it looks up a
    /// table: exactly the shape we create.
    pub exact: bool,
    pub msg: RuleMessage,
}

/// A route dumped from the kernel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FoundRoute {
    pub key: RouteKey,
    /// A plain unicast `dst dev X` route (no gateway, multipath, source, ...).
    pub exact: bool,
    /// Metric, kept to delete exactly this route.
    pub priority: Option<u32>,
    pub tos: u8,
}

/// Whether a dumped rule is ours: our priority, our table.
pub fn is_owned_rule(r: &FoundRule, config: &RouteConfig) -> bool {
    r.key.priority == config.priority && r.key.table == config.table
}

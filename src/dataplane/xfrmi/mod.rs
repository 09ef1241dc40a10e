//! Route mode of the xfrm driver (`--xfrm-mode route`): XFRM interfaces, one per peer or one
//! for all peers ([`RouteDevices`]).
//!
//! Policy mode selects a peer by XFRM policy selectors, one set per remote prefix: under
//! Rancher addressing (every container a random /32) that is 3 policies per remote container.
//! Route mode lets the routing table, an LPM trie built for many entries, pick the peer: each
//! remote prefix is routed into the peer's XFRM interface (`imx<slot>`, kernel
//! `xfrm_interface`, `IFLA_XFRM_IF_ID` = the peer's reqid, `IFLA_XFRM_LINK` = the underlay
//! device), and the kernel looks the policy up with that interface's id. Kernel objects per
//! host: one interface and three `0/0` policies (`out`, `in`, `fwd`, bound to the id, see
//! [`crate::dataplane::xfrm::desired::route_mode`]) per peer plus two inbound block policies,
//! and the SAs as in policy mode (bound to the id); the per-container prefixes are routes.
//! Per packet: one route look-up and one policy bin per interface id (the kernel keys its
//! inexact policy bins by `(if_id, family, direction)`), independent of peers and containers.
//!
//! # One interface for all peers (`--xfrm-route-devices one`, `auto`'s choice where it works)
//!
//! An interface per peer has a per-packet cost that grows with the peers: the kernel finds a
//! device in fixed tables of 256 hash chains, by interface index (every routed packet's
//! incoming device once any `ip rule` exists: `l3mdev_update_flow`) and, for a decrypted
//! packet, by interface id (`xfrmi_lookup`): ~peers / 256 interfaces per chain (measured in
//! the VM: 0.93-0.94x of the 1-peer rate at 5,000 peers, BENCHMARKS.md). Since Linux 6.0 one
//! interface in collect_md mode ([`ONE_NAME`], `type xfrm external`: no id, no link) serves
//! every peer: each route into it carries the peer's interface id as lightweight-tunnel
//! metadata (`encap xfrm if_id ID`, [`crate::dataplane::routes::RouteKey::if_id`]), which the
//! interface uses for the policy and SA look-up on the way out; on the way in the kernel finds
//! no interface for the SA's id in its (empty) table, hands the packet to the collect_md one,
//! and checks the policies of the SA's id. Policies and SAs are the same as with an interface
//! per peer. Per packet nothing depends on the peers any more; kernel memory is one device
//! instead of one per peer (~48 KB each).
//!
//! The reverse-path rule below can no longer tell peers apart (every remote source routes
//! back out of the one interface), so the source check is an nft table keyed by the SA the
//! packet came through ([`crate::dataplane::firewall::srccheck`]); that is why `one` needs
//! `nft` (and the kernel's `nft_xfrm`), whatever the firewall backend.
//!
//! # Who may send what: the reverse-path check
//!
//! The `in` and `fwd` policies are `0/0`: they say which SA a decrypted packet came through,
//! not which inner sources that peer may use. Policy mode's selectors (`<peer prefix> ->
//! 0/0`) refuse a peer that, holding its own keys, sends with another peer's (or this host's)
//! container addresses; route mode refuses it with a reverse-path check instead: a packet
//! arriving on `imx<slot>` must have a source whose route goes back out of `imx<slot>`. The
//! routes already say which peer owns which prefix, so the check costs one rule per family
//! and one FIB look-up per decrypted packet, whatever the number of peers or containers:
//!
//! - the rule: iptables `-i imx+ -m rpfilter --invert -j DROP` (mangle `PREROUTING`, chain
//!   `IPSEC-MESH-RPF`; ip6tables the same) or nft `iifname "imx*" fib saddr . iif oif missing
//!   drop` (prerouting, priority raw; `inet`: both families), written by the firewall backend
//!   ([`crate::dataplane::firewall::FirewallSpec::tunnel_devices`]);
//! - the look-up it makes carries no mark (neither `--validmark` nor `. mark`), so the
//!   route mode's ip rule selects table 1042 by destination, `to <overlay>`, not by the
//!   encrypt mark ([`crate::dataplane::routes::desired::tunnel_rule`]), and table 1042 holds
//!   a `throw` route for each of this host's own subnets (the look-up goes on to the main
//!   table, where they are routed to the bridge or veths) beside the peers' prefixes and
//!   `unreachable <overlay>`.
//!
//! What the look-up answers, for a packet arriving on peer B's `imxB`: a source in B's
//! subnets -> `imxB`: accepted; in peer C's -> `imxC`: dropped; in this host's own subnets
//! -> thrown to main -> the bridge or a veth: dropped; an overlay address of nobody ->
//! `unreachable`: dropped (xt_rpfilter and nft fib accept unicast answers only); outside the
//! overlay (B's underlay address, say) -> main -> the underlay device: dropped.
//!
//! Why not the kernel's own `rp_filter` sysctl (IPv4 only in any case): `fib_validate_source`
//! skips it for every packet with a secpath ("Ignore rp_filter for packets protected by
//! IPsec", net/ipv4/fib_frontend.c), and what an XFRM interface hands up keeps its secpath
//! (`xfrmi_scrub_packet` resets it only across network namespaces). So `rp_filter` neither
//! protects route mode nor breaks it, strict or not; the interfaces' own value stays 0.
//!
//! Host-originated traffic: when peer B itself (not a container) sends to a container here,
//! B's kernel picks the source for a route into an address-less `imx` device from the first
//! device with a global address, typically B's underlay address. That source is outside the
//! overlay and is dropped here, as policy mode's selectors drop it, and its answer would have
//! left in clear (it is not to the overlay). A host reaches remote containers through the
//! mesh only with a source inside its own subnets (`ping -I <address in a subnet of its
//! own>`), in either mode.
//!
//! This module owns the interfaces: of kind `xfrm`, in link group [`LINK_GROUP`], named
//! [`NAME_PREFIX`]... Nothing else is read as ours or written. `desired` (pure: values,
//! ownership, diff) and `messages` (pure: rtnetlink build/parse) -> [`reconcile`] /
//! [`cleanup`] here, the only I/O, over the one rtnetlink layer ([`rtnl`]). [`probe`] tells
//! whether the kernel has XFRM interfaces at all, in a private network namespace.

pub mod desired;
pub mod messages;

use std::collections::BTreeMap;

use rtnetlink::Handle;
use tracing::{debug, info, warn};

use crate::dataplane::routes::{self, Underlay};
use crate::dataplane::{rtnl, sysctl};
use crate::plan::Plan;
pub use desired::{
    desired_one, diff, if_id, is_owned, name, FoundLink, LinkDiff, LinkOp, LinkSpec, LINK_GROUP,
    NAME_PREFIX, ONE_NAME,
};

/// What the route mode needs from the kernel and this module could not get.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// A dump, the socket, or the whole exchange.
    #[error(transparent)]
    Rtnl(#[from] rtnl::Error),
    /// The underlay device (the plan's endpoint) was not found.
    #[error(transparent)]
    Underlay(#[from] routes::RouteError),
    /// The kernel cannot make XFRM interfaces.
    #[error("{0}")]
    Unsupported(String),
}

/// What a reconcile or cleanup of the interfaces did: the common report; `writes` counts
/// links created, set or deleted and per-device sysctls written (0 = no-op).
pub use crate::dataplane::report::Report as LinkReport;
use crate::dataplane::report::{Change, MESH};

/// The layer name in [`Change`]s.
pub const LAYER: &str = "xfrmi";

/// The words for a kernel without XFRM interfaces.
pub fn unsupported(kernel_said: &str) -> String {
    format!(
        "this kernel has no XFRM interfaces (CONFIG_XFRM_INTERFACE, module xfrm_interface, is \
         missing; kernel said: {kernel_said})"
    )
}

/// Can this kernel make XFRM interfaces? Creates one (`imxprobe`, if_id 1, no underlay) in a
/// private network namespace of a thread of its own, so nothing of the caller's namespace is
/// touched; the interface dies with the namespace. `Err` says what is missing in words.
pub fn probe() -> Result<(), String> {
    probe_with(false)
}

/// Can this kernel make the one collect_md interface and route into it with an interface id
/// (`type xfrm external` and `encap xfrm if_id`, both Linux 6.0)? As [`probe`]: an interface
/// and a route in a private network namespace. `Err` says what is missing in words.
pub fn probe_one() -> Result<(), String> {
    probe_with(true)
}

fn probe_with(collect_md: bool) -> Result<(), String> {
    let r = crate::dataplane::netns::in_new_netns(move || {
        rtnl::block_on(async move {
            let h = rtnl::connect()?;
            let spec = LinkSpec {
                name: "imxprobe".into(),
                if_id: if collect_md { 0 } else { 1 },
                underlay: 0,
                mtu: 1400,
                owner: "probe".into(),
                collect_md,
            };
            let r = rtnl::send(&h, messages::request(&LinkOp::Create { spec, index: 0 })).await;
            if r.is_err() || !collect_md {
                return Ok::<_, rtnl::Error>(r.map_err(|e| (false, e)));
            }
            let index = indexes(&h).await?.get("imxprobe").copied().unwrap_or(0);
            let route = routes::RouteKey {
                dst: "192.0.2.0/24".parse().expect("a prefix"),
                table: 254,
                oif: index,
                if_id: 1,
            };
            let r = rtnl::send(
                &h,
                rtnl::message(
                    netlink_packet_route::RouteNetlinkMessage::NewRoute(
                        routes::messages::route_add_message(&route),
                    ),
                    rtnl::CREATE,
                ),
            )
            .await;
            Ok(r.map_err(|e| (true, e)))
        })
    });
    let what = if collect_md {
        "a collect_md XFRM interface (Linux >= 6.0)"
    } else {
        "XFRM interfaces"
    };
    match r {
        Ok(Ok(Ok(()))) => Ok(()),
        // "Unknown device type" (EOPNOTSUPP) is what a kernel without the link kind says.
        Ok(Ok(Err((false, reason)))) if !collect_md && reason.errno() == Some(libc::EOPNOTSUPP) => {
            Err(unsupported(&reason.to_string()))
        }
        Ok(Ok(Err((false, reason)))) => Err(format!(
            "this kernel cannot make {what} (kernel said: {reason})"
        )),
        Ok(Ok(Err((true, reason)))) => Err(format!(
            "this kernel cannot route into {what} with an interface id (`encap xfrm if_id`, \
             Linux >= 6.0; kernel said: {reason})"
        )),
        Ok(Err(e)) => Err(format!("probing {what} failed: {e}")),
        Err(e) => Err(format!(
            "probing {what} needs a private network namespace: {e}"
        )),
    }
}

/// Every link, parsed.
async fn dump_links(h: &Handle) -> Result<Vec<FoundLink>, rtnl::Error> {
    Ok(rtnl::dump("links", h.link().get().execute())
        .await?
        .iter()
        .map(messages::parse)
        .collect())
}

/// Send `ops`, record writes, changes and failures (by owner). A create whose index was
/// taken meanwhile (EEXIST/EBUSY: another program made a link between the dump and the
/// write) is sent again once with the kernel's choice of index (a link in the underlay's
/// chain is moved at a later reconcile: [`desired::diff`]).
async fn apply(h: &Handle, ops: &[LinkOp], report: &mut LinkReport) {
    let mut results = rtnl::send_all(h, ops.iter().map(messages::request)).await;
    report.writes += ops.len();
    let index_taken = |op: &LinkOp, r: &Result<(), rtnl::Reason>| {
        matches!(op, LinkOp::Create { index, .. } if *index != 0)
            && matches!(r, Err(e) if matches!(e.errno(), Some(libc::EEXIST | libc::EBUSY)))
    };
    let again: Vec<usize> = (0..ops.len())
        .filter(|&i| index_taken(&ops[i], &results[i]))
        .collect();
    if !again.is_empty() {
        let retry: Vec<LinkOp> = again
            .iter()
            .map(|&i| match &ops[i] {
                LinkOp::Create { spec, .. } => LinkOp::Create {
                    spec: spec.clone(),
                    index: 0,
                },
                op => op.clone(),
            })
            .collect();
        debug!(
            links = retry.len(),
            "route mode: index taken, the kernel chooses"
        );
        let second = rtnl::send_all(h, retry.iter().map(messages::request)).await;
        report.writes += retry.len();
        for (i, r) in again.into_iter().zip(second) {
            results[i] = r;
        }
    }
    for (op, r) in ops.iter().zip(results) {
        let line = op.describe();
        let change = || {
            let c = match op {
                LinkOp::Create { spec, .. } => Change::add(LAYER, spec.to_string()),
                LinkOp::Set { spec, .. } => Change::update(
                    LAYER,
                    format!("xfrm interface {}", spec.name),
                    None,
                    Some(format!("mtu {} up", spec.mtu)),
                ),
                LinkOp::Delete { name, .. } => {
                    Change::delete(LAYER, format!("xfrm interface {name}"))
                }
            };
            match op.owner() {
                Some(o) => c.for_peer(o),
                None => c,
            }
        };
        match r {
            Ok(()) => {
                info!("route mode: {line}");
                report.changes.push(change());
            }
            Err(e) if e.errno() == Some(libc::ENODEV) && matches!(op, LinkOp::Delete { .. }) => {
                report.changes.push(change());
            }
            Err(e) => {
                let owner = op.owner().unwrap_or(MESH).to_string();
                let why = if e.errno() == Some(libc::EEXIST) {
                    format!(
                        "{line}: an XFRM interface with this id or name exists and is not \
                         ipsec-mesh's (left untouched) ({e})"
                    )
                } else if e.errno() == Some(libc::EOPNOTSUPP) {
                    unsupported(&e.to_string())
                } else {
                    format!("{line}: {e}")
                };
                warn!(peer = %owner, error = %why, "route mode: interface change failed");
                report.error(owner, why);
            }
        }
    }
}

/// Make the interfaces match `plan` (one per peer on the plan endpoint's device, or with
/// `devices` [`RouteDevices::One`] the one collect_md interface), then their per-device
/// sysctls ([`sysctl::tune_tunnel_device`]). A sync wrapper: its own runtime. Also returns
/// the underlay device's index.
pub fn reconcile(plan: &Plan, devices: RouteDevices) -> Result<(LinkReport, u32), LinkError> {
    rtnl::block_on(async { reconcile_with(&rtnl::connect()?, plan, devices).await })
}

/// [`reconcile`] over an existing handle.
pub async fn reconcile_with(
    h: &Handle,
    plan: &Plan,
    devices: RouteDevices,
) -> Result<(LinkReport, u32), LinkError> {
    let (underlay, dev) = routes::resolve_underlay(h, &Underlay::Address(plan.endpoint)).await?;
    let want = match devices {
        RouteDevices::One => desired::desired_one(plan, underlay),
        _ => desired::desired(plan, underlay),
    };
    let found = dump_links(h).await?;
    let d = diff(&found, &want);
    let mut report = LinkReport::default();
    for (s, why) in &d.blocked {
        report.error(s.owner.clone(), why.clone());
    }
    if !d.ops.is_empty() {
        apply(h, &d.ops, &mut report).await;
    } else {
        debug!(underlay = %dev, links = want.len(), "route mode: interfaces up to date");
    }
    let failed: std::collections::BTreeSet<String> =
        report.errors.iter().map(|f| f.owner.clone()).collect();
    // Dual-stack: forwarding of both families on each interface.
    let families = crate::dataplane::xfrm::desired::overlay_families(plan);
    let mut sysctl_errors = Vec::new();
    for s in want.iter().filter(|s| !failed.contains(&s.owner)) {
        match sysctl::tune_tunnel_device(&s.name, &families) {
            Ok(n) => {
                report.writes += n;
                if n > 0 {
                    report.changes.push(
                        Change::update(
                            LAYER,
                            format!("sysctl of {}", s.name),
                            None,
                            Some("forwarding 1, rp_filter 0".into()),
                        )
                        .for_peer(s.owner.clone()),
                    );
                }
            }
            Err(e) => sysctl_errors.push((s.owner.clone(), e.to_string())),
        }
    }
    for (o, e) in sysctl_errors {
        report.error(o, e);
    }
    // No check of `all/rp_filter`: the kernel skips it for decrypted packets (module docs).
    Ok((report, underlay))
}

/// Delete every interface of ours (sync wrapper).
pub fn cleanup() -> Result<LinkReport, LinkError> {
    rtnl::block_on(async { cleanup_with(&rtnl::connect()?).await })
}

/// [`cleanup`] over an existing handle.
pub async fn cleanup_with(h: &Handle) -> Result<LinkReport, LinkError> {
    let found = dump_links(h).await?;
    let d = diff(&found, &[]);
    let mut report = LinkReport::default();
    if !d.ops.is_empty() {
        apply(h, &d.ops, &mut report).await;
    }
    Ok(report)
}

/// The index of each interface of ours, by name (for the routes into them).
pub async fn indexes(h: &Handle) -> Result<BTreeMap<String, u32>, rtnl::Error> {
    Ok(dump_links(h)
        .await?
        .into_iter()
        .filter(is_owned)
        .map(|l| (l.name, l.index))
        .collect())
}

/// How the xfrm driver selects a peer (`--xfrm-mode`, whose default is `auto`: the CLI
/// resolves it with [`XfrmMode::resolve`] before building the driver). The type's own
/// default, for code that builds a driver directly, is `Policy`: a driver given an unresolved
/// `Auto` runs policy mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum XfrmMode {
    /// XFRM policy selectors per remote prefix (every kernel with XFRM).
    #[default]
    Policy,
    /// One XFRM interface per peer, prefixes routed into it (this module; needs the kernel's
    /// `xfrm_interface`).
    Route,
    /// `route` when [`probe`] finds XFRM interfaces, else `policy`.
    Auto,
}

impl XfrmMode {
    pub fn as_str(self) -> &'static str {
        match self {
            XfrmMode::Policy => "policy",
            XfrmMode::Route => "route",
            XfrmMode::Auto => "auto",
        }
    }

    /// `auto` made concrete with [`probe`] (the others as they are), and why.
    pub fn resolve(self) -> (XfrmMode, String) {
        match self {
            XfrmMode::Auto => match probe() {
                Ok(()) => (
                    XfrmMode::Route,
                    "auto: the kernel has XFRM interfaces".into(),
                ),
                Err(why) => (XfrmMode::Policy, format!("auto: {why}")),
            },
            m => (m, "asked for".into()),
        }
    }
}

/// Route mode's interfaces (`--xfrm-route-devices`, default `auto`): one per peer, or one
/// collect_md interface for all (kernel >= 6.0, and nft for the source check:
/// [`crate::dataplane::firewall::srccheck`]). Per packet, the kernel finds an interface per
/// peer in fixed 256-entry hash tables (by interface index for the route look-ups, by id for
/// a decrypted packet: `xfrmi_lookup`), ~peers/256 steps each; the one interface is found
/// in one, and its routes carry the peer's id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RouteDevices {
    /// An interface `imx<slot>` per peer (every kernel with XFRM interfaces, >= 4.19).
    PerPeer,
    /// One interface [`ONE_NAME`] in collect_md mode; the source check is an nft set.
    One,
    /// `one` where [`probe_one`] and the source check's probe succeed, else `per-peer`.
    #[default]
    Auto,
}

impl RouteDevices {
    pub fn as_str(self) -> &'static str {
        match self {
            RouteDevices::PerPeer => "per-peer",
            RouteDevices::One => "one",
            RouteDevices::Auto => "auto",
        }
    }

    /// What the kernel and the host allow for `self` (`Auto` made concrete), and why; `Err`
    /// for `One` where it cannot work.
    pub fn resolve(self) -> Result<(RouteDevices, String), String> {
        let can = || {
            probe_one()?;
            crate::dataplane::firewall::srccheck::probe()
        };
        match self {
            RouteDevices::PerPeer => Ok((self, "asked for".into())),
            RouteDevices::One => can()
                .map(|()| (self, "asked for".into()))
                .map_err(|why| format!("--xfrm-route-devices one: {why}")),
            RouteDevices::Auto => Ok(match can() {
                Ok(()) => (
                    RouteDevices::One,
                    "auto: collect_md XFRM interfaces and nft present".into(),
                ),
                Err(why) => (RouteDevices::PerPeer, format!("auto: {why}")),
            }),
        }
    }
}

impl std::str::FromStr for RouteDevices {
    type Err = String;
    fn from_str(s: &str) -> Result<RouteDevices, String> {
        match s {
            "per-peer" => Ok(RouteDevices::PerPeer),
            "one" => Ok(RouteDevices::One),
            "auto" => Ok(RouteDevices::Auto),
            _ => Err(format!(
                "unknown xfrm route devices {s:?}: expected one, per-peer or auto"
            )),
        }
    }
}

impl std::fmt::Display for RouteDevices {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::fmt::Display for XfrmMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for XfrmMode {
    type Err = String;
    fn from_str(s: &str) -> Result<XfrmMode, String> {
        match s {
            "policy" => Ok(XfrmMode::Policy),
            "route" => Ok(XfrmMode::Route),
            "auto" => Ok(XfrmMode::Auto),
            _ => Err(format!(
                "unknown xfrm mode {s:?}: expected policy, route or auto"
            )),
        }
    }
}

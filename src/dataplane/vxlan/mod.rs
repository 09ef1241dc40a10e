//! VXLAN driver: one VXLAN device (`vtep1042`, VNI 1042, UDP 4789 by default) with static
//! FDB entries, neighbours and routes per peer; no learning, no multicast.
//!
//! `objects` (comparable values) <- `desired` (pure, from the plan; the addressing scheme is
//! documented there) and `messages` (pure, build/parse rtnetlink messages) ->
//! `reconcile::{diff_device, diff_objects}` (pure) -> [`reconcile_with`] here, the only
//! code that talks to the kernel (one socket, requests pipelined, through
//! [`rtnl`](crate::dataplane::rtnl)).
//!
//! What ipsec-mesh owns, and nothing else: the device with the configured name (only if it
//! is a VXLAN device: a device of another kind with that name is reported, never touched),
//! and on it: its addresses (IPv6 link-local aside), FDB entries, permanent neighbours, and
//! the main-table routes through it with `proto static`. Other devices, routes and
//! neighbours are never modified. A reconcile dumps those, diffs and applies only the
//! difference: 0 writes when nothing changed. VNI, port, local address, underlay device or
//! learning changed -> the device is deleted and created again (they cannot be changed in
//! place); MTU, MAC or a downed device are fixed in place. `cleanup` deletes the device,
//! which takes everything on it along.

pub mod desired;
pub mod messages;
pub mod objects;
pub mod reconcile;

use std::collections::BTreeMap;
use std::net::IpAddr;

use netlink_packet_route::route::RouteMessage;
use netlink_packet_route::AddressFamily;
use rtnetlink::Handle;
use tracing::{debug, info, warn};

use crate::dataplane::driver::{Driver, DriverReport, PeerCounters, PeerState};
use crate::dataplane::report::MESH;
use crate::dataplane::routes::{self, RouteError, Underlay};
use crate::dataplane::rtnl::{self, Reason};
use crate::model::Backend;
use crate::plan::Plan;
pub use objects::{Owner, VxlanConfig};
use reconcile::{Current, DeviceAction, Op, Step};

/// What one reconcile or cleanup did: the [common report](crate::dataplane::report).
pub use crate::dataplane::report::Report;

#[derive(Debug, thiserror::Error)]
pub enum VxlanError {
    #[error("invalid VXLAN settings: {0}")]
    Config(String),
    /// The socket, a dump or the whole exchange.
    #[error(transparent)]
    Rtnl(#[from] rtnl::Error),
    #[error("finding the underlay device")]
    Underlay(#[source] RouteError),
}

impl VxlanConfig {
    /// Names the kernel accepts, a 24-bit VNI, a non-zero port.
    pub fn validate(&self) -> Result<(), VxlanError> {
        let n = &self.dev;
        if n.is_empty()
            || n.len() > 15
            || n == "."
            || n == ".."
            || n.chars().any(|c| c == '/' || c == ':' || c.is_whitespace())
        {
            return Err(VxlanError::Config(format!(
                "device name {n:?}: 1 to 15 characters, no '/', ':' or whitespace"
            )));
        }
        if self.vni > 0x00ff_ffff {
            return Err(VxlanError::Config(format!(
                "VNI {} does not fit in 24 bits (0..=16777215)",
                self.vni
            )));
        }
        if self.port == 0 {
            return Err(VxlanError::Config("UDP port 0".into()));
        }
        Ok(())
    }
}

/// Open a route socket with extended ACKs (so refusals carry the kernel's words) on the
/// current tokio runtime, in the calling thread's network namespace.
pub fn connect() -> Result<Handle, VxlanError> {
    Ok(rtnl::connect()?)
}

fn block_on<T>(
    f: impl std::future::Future<Output = Result<T, VxlanError>>,
) -> Result<T, VxlanError> {
    rtnl::block_on(f)
}

/// Reconcile (sync: own current-thread runtime and socket; not from inside a runtime).
pub fn reconcile(plan: &Plan, cfg: &VxlanConfig) -> Result<Report, VxlanError> {
    block_on(async { reconcile_with(&connect()?, plan, cfg).await })
}

/// Delete our device (sync).
pub fn cleanup(cfg: &VxlanConfig) -> Result<Report, VxlanError> {
    block_on(async { cleanup_with(&connect()?, cfg).await })
}

/// The device called `name`, if any.
pub async fn find_device(
    h: &Handle,
    name: &str,
) -> Result<Option<objects::FoundDevice>, VxlanError> {
    let found = rtnl::get(
        &format!("link {name}"),
        h.link().get().match_name(name.to_string()).execute(),
    )
    .await?;
    Ok(found.as_ref().map(messages::parse_device))
}

/// Everything on device `index` that the diff looks at, of both IP families: the overlay's
/// and the other one, so that what an earlier overlay family left on our device (its
/// address, neighbours, routes) is seen and removed when the metadata changes family.
pub async fn read_current(h: &Handle, index: u32) -> Result<Current, VxlanError> {
    let mut cur = Current::default();
    let addrs = rtnl::dump(
        "addresses",
        h.address().get().set_link_index_filter(index).execute(),
    )
    .await?;
    cur.addresses = addrs
        .iter()
        .filter(|m| is_ip(m.header.family))
        .filter_map(|m| messages::parse_address(m, index))
        .collect();
    let fdb = rtnl::dump(
        "bridge fdb",
        h.neighbours()
            .get()
            .set_address_family(AddressFamily::Bridge)
            .execute(),
    )
    .await?;
    cur.fdb = fdb
        .iter()
        .filter_map(messages::parse_fdb)
        .filter(|(i, _)| *i == index)
        .map(|(_, f)| f)
        .collect();
    for family in [AddressFamily::Inet, AddressFamily::Inet6] {
        let neigh = rtnl::dump(
            "neighbours",
            h.neighbours().get().set_address_family(family).execute(),
        )
        .await?;
        cur.neighbours.extend(
            neigh
                .iter()
                .filter(|m| m.header.family == family)
                .filter_map(messages::parse_neighbour)
                .filter(|(i, _)| *i == index)
                .map(|(_, n)| n),
        );
        let mut q = RouteMessage::default();
        q.header.address_family = family;
        let rts = rtnl::dump("routes", h.route().get(q).execute()).await?;
        cur.routes.extend(
            rts.iter()
                .filter(|m| m.header.address_family == family)
                .filter_map(|m| messages::parse_route(m, index)),
        );
    }
    Ok(cur)
}

fn is_ip(f: AddressFamily) -> bool {
    matches!(f, AddressFamily::Inet | AddressFamily::Inet6)
}

/// Why a step failed, in words an operator can act on.
fn explain(op: &Op, e: &Reason, dev: &str) -> String {
    let exists = e.errno() == Some(libc::EEXIST);
    match op {
        Op::AddRoute(r) if exists => format!(
            "a route to {} exists in the main table and is not ipsec-mesh's (left untouched) ({e})",
            r.dst
        ),
        Op::AddAddress(a) if exists => {
            format!("address {a} is already on {dev} ({e})")
        }
        _ => e.to_string(),
    }
}

/// Deleting what is already gone is success.
fn already_gone(op: &Op, errno: Option<i32>) -> bool {
    op.is_delete()
        && matches!(
            errno,
            Some(libc::ENOENT | libc::ESRCH | libc::EADDRNOTAVAIL | libc::ENODEV)
        )
}

/// Send `steps` pipelined on one socket (the kernel handles them in order); record writes,
/// changes and per-owner errors. Returns whether every step succeeded.
async fn execute(h: &Handle, steps: &[Step], index: u32, dev: &str, report: &mut Report) -> bool {
    if steps.is_empty() {
        return true;
    }
    let results = rtnl::send_all(h, steps.iter().map(|s| messages::request(&s.op, index))).await;
    report.writes += steps.len();
    let mut all_ok = true;
    for (step, r) in steps.iter().zip(results) {
        let change = step.change(dev);
        match r {
            Ok(()) => {
                debug!(%change, "vxlan");
                report.changes.push(change);
            }
            Err(e) if already_gone(&step.op, e.errno()) => report.changes.push(change),
            // No IPv6 in this kernel: there is no link-local address to avoid either.
            Err(e) if step.op == Op::NoIpv6LinkLocal => {
                debug!(error = %e, "addrgenmode none refused; ignored");
                report.changes.push(change);
            }
            Err(e) => {
                all_ok = false;
                let why = explain(&step.op, &e, dev);
                warn!(peer = %step.owner, %change, error = %why, "vxlan change failed");
                report.error(step.owner.to_string(), format!("{change}: {why}"));
            }
        }
    }
    all_ok
}

/// Why `host` has no VTEP address, and what gives it one.
fn no_vtep_reason(host: &str) -> String {
    format!(
        "host {host:?} has no VTEP address: no `vtep` in its metadata (rancher-metadata: no \
         running network agent container on the managed network) and no subnet of /30 (IPv6 \
         /126) or wider whose network address could serve; its subnets are not routed"
    )
}

/// Make the kernel's VXLAN state match `plan`: dump, diff, apply only the difference.
/// Peers fail independently; the error return is for the socket, a dump or the underlay
/// lookup failing.
pub async fn reconcile_with(
    h: &Handle,
    plan: &Plan,
    cfg: &VxlanConfig,
) -> Result<Report, VxlanError> {
    cfg.validate()?;
    if plan.backend != Backend::Vxlan {
        warn!(
            backend = %plan.backend,
            mtu = desired::mtu(plan),
            "the metadata's network backend is not vxlan; the VXLAN device gets the VXLAN MTU"
        );
    }
    let (underlay, _) = routes::resolve_underlay(h, &Underlay::Address(plan.endpoint))
        .await
        .map_err(VxlanError::Underlay)?;
    let want = desired::desired(plan, cfg, underlay);
    let dev = cfg.dev.as_str();
    let mut report = Report::default();
    if want.address.is_none() && !plan.subnets.is_empty() {
        report.error(MESH, no_vtep_reason(plan.host.as_str()));
    }
    for owner in &want.no_vtep {
        report.error(owner.to_string(), no_vtep_reason(&owner.to_string()));
    }

    let found = find_device(h, dev).await?;
    let action = reconcile::diff_device(found.as_ref(), &want.device);
    if let DeviceAction::Foreign { kind } = &action {
        report.error(
            MESH,
            format!("device {dev} exists and is a {kind} device, not VXLAN: not ipsec-mesh's (left untouched); pick another --vxlan-dev"),
        );
        return Ok(report);
    }
    let found_index = found.as_ref().map_or(0, |f| f.index);
    let dev_steps = reconcile::device_steps(&action, &want.device, found_index);
    let fresh = matches!(action, DeviceAction::Create | DeviceAction::Recreate { .. });
    let mut index = found_index;
    // One at a time: a created device's index is needed by the next step.
    for step in &dev_steps {
        let ok = execute(h, std::slice::from_ref(step), index, dev, &mut report).await;
        match step.op {
            // Nothing else can be put in place without the device.
            Op::CreateDevice(_) | Op::DelDevice { .. } if !ok => return Ok(report),
            Op::CreateDevice(_) => match find_device(h, dev).await? {
                Some(f) => index = f.index,
                None => {
                    report.error(
                        MESH,
                        format!("device {dev} vanished right after it was created"),
                    );
                    return Ok(report);
                }
            },
            _ => {}
        }
    }

    let current = if fresh {
        Current::default()
    } else {
        read_current(h, index).await?
    };
    let steps = reconcile::diff_objects(&current, &want);
    let (dels, adds): (Vec<Step>, Vec<Step>) = steps.into_iter().partition(|s| s.op.is_delete());
    // An old address goes only after the new one is on: deleting the device's last IPv4
    // address makes the kernel flush every route and neighbour on it (a changed VTEP
    // address would otherwise leave the device without them until the next reconcile).
    let (addr_dels, dels): (Vec<Step>, Vec<Step>) = dels
        .into_iter()
        .partition(|s| matches!(s.op, Op::DelAddress(_)));
    execute(h, &dels, index, dev, &mut report).await;
    execute(h, &adds, index, dev, &mut report).await;
    execute(h, &addr_dels, index, dev, &mut report).await;
    info!(
        writes = report.writes,
        errors = report.errors.len(),
        peers = plan.peers.len(),
        objects = want.len(),
        "vxlan reconcile done"
    );
    Ok(report)
}

/// Delete our device (and with it every FDB entry, neighbour, address and route on it).
/// Idempotent; a device of another kind with our name is reported, not touched.
pub async fn cleanup_with(h: &Handle, cfg: &VxlanConfig) -> Result<Report, VxlanError> {
    let dev = cfg.dev.as_str();
    let mut report = Report::default();
    let Some(found) = find_device(h, dev).await? else {
        return Ok(report);
    };
    if found.kind.as_deref() != Some("vxlan") {
        report.error(
            MESH,
            format!(
                "device {dev} is a {} device, not VXLAN: not ipsec-mesh's (left untouched)",
                found.kind.as_deref().unwrap_or("plain")
            ),
        );
        return Ok(report);
    }
    let step = Step {
        owner: Owner::Mesh,
        op: Op::DelDevice {
            index: found.index,
            why: "cleanup".into(),
        },
    };
    execute(h, &[step], found.index, dev, &mut report).await;
    Ok(report)
}

/// Per peer: `up` when its FDB entry (VTEP MAC -> endpoint) is on our device. VXLAN keeps
/// no per-remote counters, so the counters stay 0.
pub fn peer_states(
    plan: &Plan,
    cfg: &VxlanConfig,
) -> Result<BTreeMap<String, PeerCounters>, VxlanError> {
    block_on(async {
        let h = connect()?;
        let fdb = match find_device(&h, &cfg.dev).await? {
            Some(d) => read_current(&h, d.index).await?.fdb,
            None => Vec::new(),
        };
        let have: std::collections::BTreeSet<(objects::Mac, Option<IpAddr>)> =
            fdb.iter().map(|f| (f.mac, f.dst)).collect();
        Ok(plan
            .peers
            .iter()
            .map(|p| {
                let up = have.contains(&(desired::vtep_mac(p.host.as_str()), Some(p.endpoint)));
                (
                    p.host.to_string(),
                    PeerCounters {
                        state: if up { PeerState::Up } else { PeerState::Down },
                        ..Default::default()
                    },
                )
            })
            .collect())
    })
}

/// The VXLAN backend as a [`Driver`].
#[derive(Debug, Clone, Default)]
pub struct VxlanMesh {
    pub config: VxlanConfig,
}

fn to_driver_report(r: Result<Report, VxlanError>, what: &str) -> DriverReport {
    let mut d = DriverReport::default();
    match r {
        Ok(x) => d.part("vxlan objects", x),
        Err(e) => d.fail(MESH, what, &e),
    }
    d
}

impl Driver for VxlanMesh {
    fn name(&self) -> &'static str {
        "vxlan"
    }

    fn watch(&mut self, _plan: &Plan, wake: crate::dataplane::driver::Wake) {
        crate::dataplane::driver::start_notify(
            crate::dataplane::notify::Filter {
                mark_mask: None,
                table: None,
                rule_priority: None,
                device: Some(self.config.dev.clone()),
            },
            wake,
        );
    }

    fn reconcile(&mut self, plan: &Plan) -> DriverReport {
        to_driver_report(reconcile(plan, &self.config), "vxlan")
    }

    fn cleanup(&mut self) -> DriverReport {
        to_driver_report(cleanup(&self.config), "vxlan cleanup")
    }

    fn counters(&mut self, plan: &Plan) -> BTreeMap<String, PeerCounters> {
        peer_states(plan, &self.config).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_validation() {
        assert!(VxlanConfig::default().validate().is_ok());
        let bad = |f: fn(&mut VxlanConfig)| {
            let mut c = VxlanConfig::default();
            f(&mut c);
            c.validate().unwrap_err().to_string()
        };
        assert!(bad(|c| c.dev = "a-very-long-name-x".into()).contains("1 to 15 characters"));
        assert!(bad(|c| c.dev = "".into()).contains("device name"));
        assert!(bad(|c| c.dev = "a/b".into()).contains("device name"));
        assert!(bad(|c| c.vni = 1 << 24).contains("24 bits"));
        assert!(bad(|c| c.port = 0).contains("port 0"));
    }

    #[test]
    fn already_gone_only_for_deletions() {
        let del = Op::DelNeighbour("10.42.2.0".parse().unwrap());
        assert!(already_gone(&del, Some(libc::ENOENT)));
        assert!(!already_gone(&del, Some(libc::EPERM)));
        assert!(!already_gone(&del, None), "a timeout is not a deletion");
        let add = Op::AddAddress("10.42.1.0/32".parse().unwrap());
        assert!(!already_gone(&add, Some(libc::ENOENT)));
        let e = Reason::Kernel(rtnl::KernelError {
            errno: libc::EEXIST,
            message: None,
        });
        let r = Op::AddRoute(objects::Route {
            dst: "10.42.2.0/24".parse().unwrap(),
            via: "10.42.2.0".parse().unwrap(),
        });
        assert!(explain(&r, &e, "vtep1042").contains("is not ipsec-mesh's (left untouched)"));
    }
}

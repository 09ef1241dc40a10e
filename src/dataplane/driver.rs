//! One interface over the dataplane drivers, so `apply`, `cleanup` and the sidecar drive
//! them alike: reconcile to a plan, report per peer, clean up what is owned, read counters.

use std::collections::BTreeMap;

use serde::Serialize;

use super::report::MESH;
use super::{firewall, notify, routes, xfrm, xfrmi};
use crate::plan::{Marks, Plan};

pub use super::report::error_chain;

/// The outcome of one reconcile or cleanup of a driver: the one
/// [report type](super::report::Report) of every layer.
pub type DriverReport = super::report::Report;

/// Fold an XFRM reconcile or cleanup in: its writes and changes as the `xfrm objects` part,
/// its per-owner errors, or the failure of the whole step.
fn add_xfrm(r: &mut DriverReport, x: Result<xfrm::Report, xfrm::socket::SocketError>) {
    match x {
        Ok(x) => r.part("xfrm objects", x),
        Err(e) => r.fail(MESH, "xfrm", &e),
    }
}

/// Where a peer stands, for every driver (shown in `/status` in lowercase).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PeerState {
    /// Traffic can flow: the SAs are installed (xfrm, charon), the FDB entry and neighbour
    /// are in place (vxlan).
    Up,
    /// charon is setting the SA up (its own restart, or the peer initiating).
    Connecting,
    /// Not (yet) in place; see the peer's last error, if any.
    #[default]
    Down,
    /// Putting it in place failed: see the errors.
    Failed,
    /// Nothing to set up for this peer (no subnet on one side).
    Skipped,
}

impl PeerState {
    pub fn as_str(self) -> &'static str {
        match self {
            PeerState::Up => "up",
            PeerState::Connecting => "connecting",
            PeerState::Down => "down",
            PeerState::Failed => "failed",
            PeerState::Skipped => "skipped",
        }
    }
}

impl std::fmt::Display for PeerState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Live state of one peer as the dataplane shows it.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct PeerCounters {
    pub state: PeerState,
    pub bytes_out: u64,
    pub packets_out: u64,
    pub bytes_in: u64,
    pub packets_in: u64,
    /// For drivers that install the SAs themselves (xfrm, encrypted VXLAN).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sa: Option<SaDetail>,
}

/// Per-direction detail of a peer's two SAs.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct SaDetail {
    /// Key generation this host sends with to the peer.
    pub generation: u32,
    /// The outbound SA in the kernel is one generation ahead of the plan's
    /// (usage-limit rekey; [`crate::plan::rekey`]).
    pub ahead: bool,
    /// Newest generation the peer's traffic arrived with (the sending one until then).
    pub in_generation: u32,
    /// When each SA was added (seconds since the epoch; 0: missing).
    pub out_added: u64,
    pub in_added: u64,
    /// Last sequence number sent and highest accepted (64-bit ESN counters).
    pub seq_out: u64,
    pub seq_in: u64,
    /// Inbound packets dropped as replays (or outside the window), and failing integrity.
    pub replay_drops_in: u32,
    pub integrity_failed_in: u32,
}

/// A dataplane driver.
pub trait Driver: Send {
    fn name(&self) -> &'static str;
    /// Make the dataplane match `plan`; failures are reported per peer, never all-or-nothing.
    fn reconcile(&mut self, plan: &Plan) -> DriverReport;
    /// Remove everything the driver owns, nothing else.
    fn cleanup(&mut self) -> DriverReport;
    /// Per-peer state and counters, by host id.
    fn counters(&mut self, plan: &Plan) -> BTreeMap<String, PeerCounters>;
    /// The layers in reconcile order (a [`Stack`]'s, else this one).
    fn layers(&self) -> Vec<&'static str> {
        vec![self.name()]
    }
    /// For drivers with a long-lived side (an event watcher): the sidecar calls this with
    /// every new plan; `wake` asks the sidecar for a reconcile now (e.g. after the daemon the
    /// driver talks to restarted). One-shot commands never call it.
    fn watch(&mut self, _plan: &Plan, _wake: Wake) {}
    /// Periodic upkeep between reconciles (the sidecar calls it with every counter refresh):
    /// the xfrm drivers keep their SAs' sequence counters near the clock
    /// ([`xfrm::tend_sequences`]). Returns the number of kernel writes.
    fn tend(&mut self, _plan: &Plan) -> usize {
        0
    }
    /// Whether the dataplane has kernel IPsec SAs (then the kernel's XFRM error counters and
    /// the per-peer SA metrics mean something).
    fn has_sas(&self) -> bool {
        false
    }
    /// The firewall backend the driver writes its marks and guard with, if it has one.
    fn firewall(&self) -> Option<firewall::FirewallKind> {
        None
    }
}

/// Kernel change notifications for the sidecar ([`notify`]); without them (a failure is
/// logged) drift waits for the next resync.
pub fn start_notify(filter: notify::Filter, wake: Wake) {
    if let Err(e) = notify::ensure(filter, wake) {
        tracing::warn!(error = %e, "cannot subscribe to kernel change notifications; drift is repaired at each resync only");
    }
}

/// [`xfrm::tend_sequences`] for a driver's tend, with failures logged (they are retried at
/// the next refresh and by every reconcile).
fn tend_xfrm(plan: &Plan) -> usize {
    match xfrm::tend_sequences(plan.endpoint) {
        Ok(t) => {
            for (id, d) in &t.ahead {
                tracing::warn!(
                    spi = id.spi,
                    dst = %id.dst,
                    ahead_ticks = d,
                    "an outbound SA's sequence counter is ahead of the clock (> 4 Mpps sustained)"
                );
            }
            t.writes
        }
        Err(e) => {
            tracing::warn!(error = %e, "could not tend the SAs' sequence counters");
            0
        }
    }
}

/// Which part of encrypted VXLAN a [`VxlanEsp`] layer owns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EspPart {
    /// The transport-mode policies: stacked before the vxlan driver (reconciled first,
    /// cleaned up last), so the device never sends in clear and plaintext VXLAN is refused.
    Policies,
    /// The SAs: stacked after the vxlan driver (reconciled last, cleaned up first). A host
    /// that decrypts VXLAN while it has no VXLAN socket answers each packet with an ICMP
    /// port-unreachable error that quotes the decrypted packet (inner headers and data) and,
    /// matching none of the UDP policies, leaves in clear; with the SAs only there while the
    /// device is, that never happens (before them a peer's ESP is dropped for want of an SA).
    Sas,
}

/// ESP transport mode for VXLAN between hosts (encrypted VXLAN): two layers around the vxlan
/// driver, policies before it and SAs after it ([`EspPart`]).
pub struct VxlanEsp {
    pub port: u16,
    pub marks: Marks,
    pub part: EspPart,
}

impl Driver for VxlanEsp {
    fn name(&self) -> &'static str {
        match self.part {
            EspPart::Policies => "vxlan-esp-policies",
            EspPart::Sas => "vxlan-esp",
        }
    }

    fn reconcile(&mut self, plan: &Plan) -> DriverReport {
        let mut r = DriverReport::default();
        add_xfrm(
            &mut r,
            match self.part {
                EspPart::Policies => xfrm::reconcile_vxlan_esp_policies(plan, self.port),
                EspPart::Sas => xfrm::reconcile_vxlan_esp(plan, self.port),
            },
        );
        r
    }

    fn cleanup(&mut self) -> DriverReport {
        let mut r = DriverReport::default();
        let scope = match self.part {
            // Last: whatever of ours is left, the policies.
            EspPart::Policies => xfrm::Scope::All,
            EspPart::Sas => xfrm::Scope::SasOnly,
        };
        add_xfrm(&mut r, xfrm::cleanup_scoped(&self.marks, scope));
        r
    }

    fn counters(&mut self, plan: &Plan) -> BTreeMap<String, PeerCounters> {
        if self.part == EspPart::Policies {
            return BTreeMap::new();
        }
        sa_counters_by_peer(plan)
    }

    fn watch(&mut self, _plan: &Plan, wake: Wake) {
        if self.part == EspPart::Policies {
            return; // the SA layer watches
        }
        start_notify(
            notify::Filter {
                mark_mask: None,
                table: None,
                rule_priority: None,
                device: None,
            },
            wake,
        );
    }

    fn tend(&mut self, plan: &Plan) -> usize {
        match self.part {
            EspPart::Policies => 0,
            EspPart::Sas => tend_xfrm(plan),
        }
    }

    fn has_sas(&self) -> bool {
        self.part == EspPart::Sas
    }
}

/// Several drivers as one: reconciled in order, cleaned up in reverse; name from
/// `drivers[name_from]`, per-peer state and counters from `drivers[counters_from]` (the one
/// that sees the SAs).
pub struct Stack {
    pub drivers: Vec<Box<dyn Driver>>,
    pub counters_from: usize,
    pub name_from: usize,
}

impl Driver for Stack {
    fn name(&self) -> &'static str {
        self.drivers
            .get(self.name_from)
            .map_or("none", |d| d.name())
    }

    fn layers(&self) -> Vec<&'static str> {
        self.drivers.iter().flat_map(|d| d.layers()).collect()
    }

    fn reconcile(&mut self, plan: &Plan) -> DriverReport {
        let mut r = DriverReport::default();
        for d in &mut self.drivers {
            let x = d.reconcile(plan);
            r.absorb(x);
        }
        r
    }

    fn cleanup(&mut self) -> DriverReport {
        let mut r = DriverReport::default();
        for d in self.drivers.iter_mut().rev() {
            let x = d.cleanup();
            r.absorb(x);
        }
        r
    }

    fn counters(&mut self, plan: &Plan) -> BTreeMap<String, PeerCounters> {
        let i = self.counters_from;
        self.drivers
            .get_mut(i)
            .map(|d| d.counters(plan))
            .unwrap_or_default()
    }

    fn watch(&mut self, plan: &Plan, wake: Wake) {
        for d in &mut self.drivers {
            d.watch(plan, wake.clone());
        }
    }

    fn tend(&mut self, plan: &Plan) -> usize {
        self.drivers.iter_mut().map(|d| d.tend(plan)).sum()
    }

    fn has_sas(&self) -> bool {
        self.drivers.iter().any(|d| d.has_sas())
    }

    fn firewall(&self) -> Option<firewall::FirewallKind> {
        self.drivers.iter().find_map(|d| d.firewall())
    }
}

/// Asks the sidecar for a reconcile as soon as possible.
pub type Wake = std::sync::Arc<dyn Fn() + Send + Sync>;

/// Settings of the xfrm driver's forwarding part.
#[derive(Debug, Clone, Default)]
pub struct Forwarding {
    /// Firewall backend that sets the marks and the guard.
    pub firewall: firewall::FirewallKind,
    pub bridge: Option<String>,
    pub underlay_dev: Option<String>,
    pub routes: routes::RouteConfig,
    /// Policy or route mode ([`xfrmi`]); `auto` is resolved when the driver is built.
    pub xfrm_mode: xfrmi::XfrmMode,
    /// Route mode: an interface per peer or one collect_md interface; `auto` is resolved when
    /// the driver is built (a driver given `auto` makes one per peer).
    pub route_devices: xfrmi::RouteDevices,
}

/// The IKE-less driver: kernel XFRM policies and SAs, fwmark steering, policy routing.
pub struct XfrmMesh {
    pub forwarding: Forwarding,
    pub marks: Marks,
    /// Policies and SAs, or policies only (beside charon with `policies = no`).
    pub scope: xfrm::Scope,
    /// With UDP encapsulation the kernel decapsulates ESP-in-UDP only on a UDP socket marked
    /// `UDP_ENCAP_ESPINUDP`; the driver holds it for as long as it lives.
    pub encap_socket: Option<std::net::UdpSocket>,
    /// Route mode: whether [`xfrmi::probe`] found XFRM interfaces (asked once, before the
    /// first write).
    pub route_probe: Option<Result<(), String>>,
    /// Policy mode: whether leftover route-mode interfaces were looked for already.
    pub links_checked: bool,
    /// Route mode with one interface: whether it can work here (asked once, before the first
    /// write).
    pub one_probe: Option<Result<(), String>>,
    /// Route mode with an interface per peer: whether a source-check table left by the
    /// one-interface variant was looked for already.
    pub srccheck_checked: bool,
}

impl XfrmMesh {
    pub fn new(forwarding: Forwarding, marks: Marks) -> XfrmMesh {
        XfrmMesh {
            forwarding,
            marks,
            scope: xfrm::Scope::All,
            encap_socket: None,
            route_probe: None,
            links_checked: false,
            one_probe: None,
            srccheck_checked: false,
        }
    }

    /// Policies, forwarding and routing only: for charon with `policies = no`, whose SAs
    /// carry the plan's reqids.
    pub fn policies_only(forwarding: Forwarding, marks: Marks) -> XfrmMesh {
        XfrmMesh {
            scope: xfrm::Scope::PoliciesOnly,
            ..XfrmMesh::new(forwarding, marks)
        }
    }
}

impl Driver for XfrmMesh {
    fn name(&self) -> &'static str {
        "xfrm"
    }

    fn has_sas(&self) -> bool {
        self.scope == xfrm::Scope::All
    }

    fn firewall(&self) -> Option<firewall::FirewallKind> {
        Some(self.forwarding.firewall)
    }

    fn reconcile(&mut self, plan: &Plan) -> DriverReport {
        let mut r = DriverReport::default();
        self.marks = plan.marks;
        if plan.udp_encap && self.scope == xfrm::Scope::All && self.encap_socket.is_none() {
            match xfrm::encap::open_socket(plan.endpoint.is_ipv6(), xfrm::desired::NAT_T_PORT) {
                Ok(s) => self.encap_socket = Some(s),
                Err(e) => r.fail(MESH, "UDP encapsulation socket (port 4500)", &e),
            }
        } else if !plan.udp_encap {
            self.encap_socket = None;
        }
        if self.forwarding.xfrm_mode == xfrmi::XfrmMode::Route && self.scope == xfrm::Scope::All {
            return self.reconcile_route(plan, r);
        }
        // XFRM first: the block policy makes marked traffic fail closed before any marking
        // rule exists.
        add_xfrm(&mut r, xfrm::reconcile_scoped(plan, self.scope));
        let spec = firewall::FirewallSpec::from_plan(plan).with_devices(
            self.forwarding.bridge.clone(),
            self.forwarding.underlay_dev.clone(),
        );
        match self.forwarding.firewall.backend().apply(&spec) {
            Ok(f) => r.part("firewall", f),
            Err(e) => r.fail(MESH, "firewall", &e),
        }
        // The mark rule and table per overlay family (a dual-stack overlay: both; a family
        // the overlay does not have keeps nothing of ours).
        match routes::reconcile_plan(plan, self.forwarding.routes, None) {
            Ok(x) => r.part("routes", x),
            Err(e) => r.fail(MESH, "routes", &e),
        }
        // Back from route mode: its interfaces go once nothing routes into them. Looked for
        // by the first reconcile of this driver only (a link dump is not free on a host with
        // thousands of container veths); reported only when there were some.
        if self.scope == xfrm::Scope::All && !self.links_checked {
            self.links_checked = true;
            match xfrmi::cleanup() {
                Ok(x) if x.writes > 0 || !x.errors.is_empty() => r.part("xfrm interfaces", x),
                Ok(_) => {}
                Err(e) => r.fail(MESH, "xfrm interfaces", &e),
            }
            // And the one-interface variant's source check.
            match firewall::srccheck::cleanup() {
                Ok(x) if x.writes > 0 => r.part("source check", x),
                Ok(_) => {}
                Err(e) => r.fail(MESH, "source check", &e),
            }
        }
        r
    }

    fn cleanup(&mut self) -> DriverReport {
        let mut r = DriverReport::default();
        // Reverse of reconcile: stop steering first, then remove policies and SAs.
        match routes::cleanup(&self.forwarding.routes) {
            Ok(x) => r.part("routes", x),
            Err(e) => r.fail(MESH, "routes", &e),
        }
        match self.forwarding.firewall.backend().cleanup() {
            Ok(x) => r.part("firewall", x),
            Err(e) => r.fail(MESH, "firewall", &e),
        }
        add_xfrm(&mut r, xfrm::cleanup_scoped(&self.marks, self.scope));
        // The one-interface route mode's source check (none elsewhere: then nothing).
        match firewall::srccheck::cleanup() {
            Ok(x) => r.part("source check", x),
            Err(e) => r.fail(MESH, "source check", &e),
        }
        // Route mode's interfaces last (whatever the mode now: a host switched back to policy
        // mode keeps none). A kernel without XFRM interfaces has none to list.
        match xfrmi::cleanup() {
            Ok(x) => r.part("xfrm interfaces", x),
            Err(e) => r.fail(MESH, "xfrm interfaces", &e),
        }
        r
    }

    fn counters(&mut self, plan: &Plan) -> BTreeMap<String, PeerCounters> {
        sa_counters_by_peer(plan)
    }

    fn watch(&mut self, _plan: &Plan, wake: Wake) {
        let route = self.forwarding.xfrm_mode == xfrmi::XfrmMode::Route;
        start_notify(
            notify::Filter {
                mark_mask: Some(self.marks.mask),
                table: Some(self.forwarding.routes.table),
                rule_priority: Some(self.forwarding.routes.priority),
                // Route mode: our XFRM interfaces (the routes into them are in our table).
                device: route.then(|| format!("{}*", xfrmi::NAME_PREFIX)),
            },
            wake,
        );
    }

    fn tend(&mut self, plan: &Plan) -> usize {
        // Beside charon (policies only) the SAs are charon's: never touch their counters.
        if self.scope == xfrm::Scope::All {
            tend_xfrm(plan)
        } else {
            0
        }
    }
}

impl XfrmMesh {
    /// Route mode ([`xfrmi`]): the interfaces, then the policies and SAs bound to them (and the
    /// inbound block policies on the underlay), the firewall with the guard letting traffic
    /// into the interfaces through, and last the routes into them plus the unreachable
    /// overlay route. Nothing is written when the kernel has no XFRM interfaces.
    ///
    /// With one collect_md interface ([`xfrmi::RouteDevices::One`]): the interface, then the
    /// source check (an nft table: [`firewall::srccheck`]) before any SA can decrypt into it,
    /// and the routes carry each peer's interface id.
    fn reconcile_route(&mut self, plan: &Plan, mut r: DriverReport) -> DriverReport {
        let probe = self.route_probe.get_or_insert_with(xfrmi::probe).clone();
        if let Err(why) = probe {
            r.error(
                MESH,
                format!("--xfrm-mode route: {why}; use --xfrm-mode policy (or auto)"),
            );
            return r;
        }
        let devices = self.forwarding.route_devices;
        let one = devices == xfrmi::RouteDevices::One;
        if one {
            let can = self
                .one_probe
                .get_or_insert_with(|| xfrmi::RouteDevices::One.resolve().map(|_| ()))
                .clone();
            if let Err(why) = can {
                r.error(
                    MESH,
                    format!("{why}; use --xfrm-route-devices per-peer (or auto)"),
                );
                return r;
            }
        }
        let underlay = match xfrmi::reconcile(plan, devices) {
            Ok((x, underlay)) => {
                r.part("xfrm interfaces", x);
                underlay
            }
            Err(e) => {
                r.fail(MESH, "xfrm interfaces", &e);
                return r;
            }
        };
        if one {
            let spec = firewall::srccheck::SourceSpec::from_plan(plan, xfrmi::ONE_NAME);
            match firewall::srccheck::apply(&spec) {
                Ok(x) => r.part("source check", x),
                Err(e) => {
                    // Without the check a peer could send with others' sources: no SAs.
                    r.fail(MESH, "source check", &e);
                    return r;
                }
            }
        } else if !self.srccheck_checked {
            self.srccheck_checked = true;
            match firewall::srccheck::cleanup() {
                Ok(x) if x.writes > 0 => r.part("source check", x),
                Ok(_) => {}
                Err(e) => r.fail(MESH, "source check", &e),
            }
        }
        add_xfrm(&mut r, xfrm::reconcile_route(plan, underlay));
        let spec = firewall::FirewallSpec::from_plan(plan)
            .with_devices(
                self.forwarding.bridge.clone(),
                self.forwarding.underlay_dev.clone(),
            )
            .with_tunnel_devices(Some(xfrmi::NAME_PREFIX.to_string()));
        match self.forwarding.firewall.backend().apply(&spec) {
            Ok(f) => r.part("firewall", f),
            Err(e) => r.fail(MESH, "firewall", &e),
        }
        // Per overlay family (a dual-stack overlay: both), an absent family's rule and routes
        // removed.
        let tunnels = if one {
            routes::TunnelRoutes::from_plan_one(plan)
        } else {
            routes::TunnelRoutes::from_plan(plan)
        };
        match routes::reconcile_plan(plan, self.forwarding.routes, Some(&tunnels)) {
            Ok(x) => r.part("routes", x),
            Err(e) => r.fail(MESH, "routes", &e),
        }
        r
    }
}

/// Per-peer state and counters from the kernel's SAs (both SAs present: up).
fn sa_counters_by_peer(plan: &Plan) -> BTreeMap<String, PeerCounters> {
    let sas = xfrm::sa_counters().unwrap_or_default();
    plan.peers
        .iter()
        .map(|p| {
            // The plan's outbound SA, else the one a generation ahead (left by an earlier run
            // that moved this direction ahead on its usage limit).
            let next = plan.key_generation.checked_add(1);
            let candidates = [
                Some((p.spi_out, p.out_generation)),
                next.map(|g| (crate::plan::ids::with_generation(p.spi_out, g), g)),
            ];
            let (out, out_generation) = candidates
                .into_iter()
                .flatten()
                .find_map(|(spi, g)| {
                    sas.get(&xfrm::objects::SaId {
                        dst: p.endpoint,
                        spi,
                    })
                    .map(|c| (Some(c), g))
                })
                .unwrap_or((None, p.out_generation));
            let inn = sas.get(&xfrm::objects::SaId {
                dst: plan.endpoint,
                spi: p.spi_in,
            });
            let state = if out.is_some() && inn.is_some() {
                PeerState::Up
            } else {
                PeerState::Down
            };
            let o = out.copied().unwrap_or_default();
            // Inbound: every accepted generation's SA; the generation in use is the newest
            // one that carried traffic.
            let mut i = inn.copied().unwrap_or_default();
            let mut in_generation = plan.key_generation;
            let mut newest = None;
            for rx in &p.rx {
                let Some(c) = sas.get(&xfrm::objects::SaId {
                    dst: plan.endpoint,
                    spi: rx.spi,
                }) else {
                    continue;
                };
                if rx.spi != p.spi_in {
                    i.bytes += c.bytes;
                    i.packets += c.packets;
                    i.replay_drops += c.replay_drops;
                    i.integrity_failed += c.integrity_failed;
                }
                if c.packets > 0 && newest.is_none_or(|g| rx.generation > g) {
                    newest = Some(rx.generation);
                }
            }
            if let Some(g) = newest {
                in_generation = g;
            }
            (
                p.host.to_string(),
                PeerCounters {
                    state,
                    bytes_out: o.bytes,
                    packets_out: o.packets,
                    bytes_in: i.bytes,
                    packets_in: i.packets,
                    sa: Some(SaDetail {
                        generation: out_generation,
                        ahead: out.is_some() && out_generation > plan.key_generation,
                        in_generation,
                        out_added: o.added,
                        in_added: i.added,
                        seq_out: o.oseq,
                        seq_in: i.seq,
                        replay_drops_in: i.replay_drops,
                        integrity_failed_in: i.integrity_failed,
                    }),
                },
            )
        })
        .collect()
}

//! One interface over the dataplane drivers, so `apply`, `cleanup` and the sidecar drive
//! them alike: reconcile to a plan, report per peer, clean up what is owned, read counters.

use std::collections::BTreeMap;

use serde::Serialize;

use super::{firewall, routes, xfrm};
use crate::plan::{Marks, Plan};

/// The outcome of one reconcile or cleanup of a driver.
#[derive(Debug, Default, Clone)]
pub struct DriverReport {
    /// Modifying requests sent. 0 means nothing changed.
    pub writes: usize,
    /// One line per change, never secrets.
    pub changes: Vec<String>,
    /// Failures by owner: a peer's host id, or `mesh` for shared objects.
    pub errors: Vec<(String, String)>,
    /// Writes per component (`xfrm objects`, `firewall`, `routes`, ...).
    pub parts: Vec<(&'static str, usize)>,
}

impl DriverReport {
    pub fn ok(&self) -> bool {
        self.errors.is_empty()
    }

    fn part(&mut self, name: &'static str, writes: usize, changes: Vec<String>) {
        self.writes += writes;
        self.changes.extend(changes);
        self.parts.push((name, writes));
    }

    fn fail(&mut self, owner: &str, what: &str, e: &dyn std::error::Error) {
        let mut msg = format!("{what}: {e}");
        let mut src = e.source();
        while let Some(s) = src {
            let t = s.to_string();
            if !msg.contains(&t) {
                msg.push_str(": ");
                msg.push_str(&t);
            }
            src = s.source();
        }
        self.errors.push((owner.to_string(), msg));
    }

    /// Host ids with at least one error.
    pub fn failed_peers(&self) -> Vec<&str> {
        let mut v: Vec<&str> = self.errors.iter().map(|(o, _)| o.as_str()).collect();
        v.sort();
        v.dedup();
        v
    }
}

/// Live state of one peer as the dataplane shows it.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct PeerCounters {
    /// `up`, `down` or `connecting`.
    pub state: String,
    pub bytes_out: u64,
    pub packets_out: u64,
    pub bytes_in: u64,
    pub packets_in: u64,
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
}

/// Settings of the xfrm driver's forwarding part.
#[derive(Debug, Clone, Default)]
pub struct Forwarding {
    pub bridge: Option<String>,
    pub underlay_dev: Option<String>,
    pub routes: routes::RouteConfig,
}

/// The IKE-less driver: kernel XFRM policies and SAs, fwmark steering, policy routing.
pub struct XfrmMesh {
    pub forwarding: Forwarding,
    pub marks: Marks,
}

impl Driver for XfrmMesh {
    fn name(&self) -> &'static str {
        "xfrm"
    }

    fn reconcile(&mut self, plan: &Plan) -> DriverReport {
        let mut r = DriverReport::default();
        self.marks = plan.marks;
        // XFRM first: the block policy makes marked traffic fail closed before any marking
        // rule exists.
        match xfrm::reconcile(plan) {
            Ok(x) => {
                r.part("xfrm objects", x.writes, x.changes);
                r.errors
                    .extend(x.errors.into_iter().map(|(o, e)| (owner_name(&o), e)));
            }
            Err(e) => r.fail("mesh", "xfrm", &e),
        }
        let spec = firewall::FirewallSpec::from_plan(plan).with_devices(
            self.forwarding.bridge.clone(),
            self.forwarding.underlay_dev.clone(),
        );
        match firewall::apply(&spec) {
            Ok(f) => r.part("firewall", f.writes, f.changes),
            Err(e) => r.fail("mesh", "firewall", &e),
        }
        match routes::reconcile(&routes::RouteSpec::from_plan(plan, self.forwarding.routes)) {
            Ok(x) => r.part("routes", x.writes, x.changes),
            Err(e) => r.fail("mesh", "routes", &e),
        }
        r
    }

    fn cleanup(&mut self) -> DriverReport {
        let mut r = DriverReport::default();
        // Reverse of reconcile: stop steering first, then remove policies and SAs.
        match routes::cleanup(&self.forwarding.routes) {
            Ok(x) => r.part("routes", x.writes, x.changes),
            Err(e) => r.fail("mesh", "routes", &e),
        }
        match firewall::cleanup() {
            Ok(x) => r.part("firewall", x.writes, x.changes),
            Err(e) => r.fail("mesh", "firewall", &e),
        }
        match xfrm::cleanup(&self.marks) {
            Ok(x) => {
                r.part("xfrm objects", x.writes, x.changes);
                r.errors
                    .extend(x.errors.into_iter().map(|(o, e)| (owner_name(&o), e)));
            }
            Err(e) => r.fail("mesh", "xfrm", &e),
        }
        r
    }

    fn counters(&mut self, plan: &Plan) -> BTreeMap<String, PeerCounters> {
        let sas = xfrm::sa_counters().unwrap_or_default();
        plan.peers
            .iter()
            .map(|p| {
                let out = sas.get(&xfrm::objects::SaId {
                    dst: p.endpoint,
                    spi: p.spi_out,
                });
                let inn = sas.get(&xfrm::objects::SaId {
                    dst: plan.endpoint,
                    spi: p.spi_in,
                });
                let state = if out.is_some() && inn.is_some() {
                    "up"
                } else {
                    "down"
                };
                let (bo, po) = out.copied().unwrap_or_default();
                let (bi, pi) = inn.copied().unwrap_or_default();
                (
                    p.host.to_string(),
                    PeerCounters {
                        state: state.into(),
                        bytes_out: bo,
                        packets_out: po,
                        bytes_in: bi,
                        packets_in: pi,
                    },
                )
            })
            .collect()
    }
}

fn owner_name(o: &xfrm::objects::Owner) -> String {
    match o {
        xfrm::objects::Owner::Peer(h) => h.to_string(),
        other => other.to_string(),
    }
}

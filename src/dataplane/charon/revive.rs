//! Brings lost children back: watches `ike-updown` / `child-updown` and re-initiates our
//! conns with per-peer exponential backoff.
//!
//! [`Reviver`] is the pure state machine (events and check results in, "check this conn
//! now" out), [`run`] drives it on a dedicated [`Client`] for as long as the connection
//! lives: the daemon runs it in a task, and when it returns (charon gone) reconnects and
//! runs it again, after a reconcile.
//!
//! When a child of one of our conns goes down, the conn is checked after a delay: the
//! initiator side waits [`Backoff::initial`] (charon's own `dpd_action`/`close_action =
//! restart` usually has it back by then), the responder side additionally
//! [`CharonConfig::responder_grace`] (the initiator is in charge). A check lists the conn's
//! SAs: up or being set up -> done; missing -> `initiate`. A failed initiate doubles the
//! wait (up to [`Backoff::max`]); an `up` event resets it.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use super::client::{Client, ViciError};
use super::desired::{conn_name, Backoff, CharonConfig, Role};
use super::failure::explain;
use super::sas::conn_sas;
use super::types::{Initiate, ListSas, SaEvent};
use crate::plan::Plan;

/// The events [`run`] subscribes to.
pub const EVENTS: [&str; 2] = ["ike-updown", "child-updown"];

#[derive(Debug, Clone, PartialEq, Eq)]
struct Target {
    peer: String,
    role: Role,
    /// Failed initiates since the last time the child was up.
    attempts: u32,
    due: Option<Instant>,
}

/// Result of checking one conn.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Check {
    /// The child is installed.
    Up,
    /// charon is setting it up: look again later.
    Connecting,
    /// `initiate` brought it up.
    Initiated,
    /// `initiate` failed (in words).
    Failed(String),
}

/// Per-conn backoff bookkeeping, without I/O or clock (times are passed in).
#[derive(Debug, Clone)]
pub struct Reviver {
    backoff: Backoff,
    grace: Duration,
    targets: BTreeMap<String, Target>,
}

impl Reviver {
    pub fn new(cfg: &CharonConfig) -> Reviver {
        Reviver {
            backoff: cfg.backoff.clone(),
            grace: cfg.responder_grace,
            targets: BTreeMap::new(),
        }
    }

    /// Our conns for `plan`, with this host's role in each pair. Conns no longer in the
    /// plan are forgotten (their down events are ignored); known ones keep their backoff.
    pub fn set_plan(&mut self, plan: &Plan) {
        let me = plan.host.as_str();
        let mut next = BTreeMap::new();
        for p in plan
            .peers
            .iter()
            .filter(|p| !p.subnets.is_empty() && !plan.subnets.is_empty())
        {
            let name = conn_name(p.host.as_str());
            let t = self.targets.remove(&name).unwrap_or(Target {
                peer: p.host.to_string(),
                role: Role::of(me, p.host.as_str()),
                attempts: 0,
                due: None,
            });
            next.insert(name, t);
        }
        self.targets = next;
    }

    /// Conns watched.
    pub fn conns(&self) -> impl Iterator<Item = &str> {
        self.targets.keys().map(String::as_str)
    }

    /// The wait before check number `attempts + 1` of a conn where this side has `role`.
    pub fn delay(&self, role: Role, attempts: u32) -> Duration {
        let base = match role {
            Role::Initiator => self.backoff.initial,
            Role::Responder => self.backoff.initial + self.grace,
        };
        let factor = 1u32.checked_shl(attempts.min(20)).unwrap_or(u32::MAX);
        base.saturating_mul(factor).min(self.backoff.max.max(base))
    }

    /// Takes an SA event into account; returns the conn it concerns if it is one of ours.
    pub fn on_event(&mut self, ev: &SaEvent, now: Instant) -> Option<String> {
        let (up, sa) = match ev {
            SaEvent::IkeUpdown { up, sa } => (*up, sa),
            SaEvent::ChildUpdown { up, sa } => (*up, sa),
            _ => return None,
        };
        let name = sa.name.clone();
        let delay = {
            let t = self.targets.get(&name)?;
            self.delay(t.role, t.attempts)
        };
        let t = self.targets.get_mut(&name)?;
        if up {
            // an IKE_SA alone is not enough: wait for its child
            if matches!(ev, SaEvent::ChildUpdown { .. }) {
                t.attempts = 0;
                t.due = None;
            }
        } else if t.due.is_none() {
            t.due = Some(now + delay);
        }
        Some(name)
    }

    /// When the next check is due.
    pub fn next_due(&self) -> Option<Instant> {
        self.targets.values().filter_map(|t| t.due).min()
    }

    /// Conns whose check is due at `now` (their due time is cleared).
    pub fn take_due(&mut self, now: Instant) -> Vec<String> {
        let mut out = Vec::new();
        for (name, t) in self.targets.iter_mut() {
            if t.due.is_some_and(|d| d <= now) {
                t.due = None;
                out.push(name.clone());
            }
        }
        out
    }

    /// The peer and this side's role of one of our conns.
    pub fn target(&self, conn: &str) -> Option<(&str, Role)> {
        self.targets.get(conn).map(|t| (t.peer.as_str(), t.role))
    }

    /// Records the result of checking `conn`.
    pub fn on_check(&mut self, conn: &str, result: &Check, now: Instant) {
        let Some((role, attempts)) = self.targets.get(conn).map(|t| (t.role, t.attempts)) else {
            return;
        };
        let (attempts, due) = match result {
            Check::Up | Check::Initiated => (0, None),
            Check::Connecting => (attempts, Some(now + self.delay(role, 0))),
            Check::Failed(_) => (
                attempts.saturating_add(1),
                Some(now + self.delay(role, attempts.saturating_add(1))),
            ),
        };
        if let Some(t) = self.targets.get_mut(conn) {
            t.attempts = attempts;
            t.due = due;
        }
    }
}

/// Checks one conn: up, being set up, or initiate it.
pub async fn check(client: &Client, conn: &str, cfg: &CharonConfig) -> Result<Check, ViciError> {
    let sas = client
        .list(&ListSas {
            ike: Some(conn.to_string()),
            noblock: true,
            ..Default::default()
        })
        .await?;
    let s = conn_sas(conn, &sas);
    if s.up {
        return Ok(Check::Up);
    }
    if s.connecting {
        return Ok(Check::Connecting);
    }
    let i = Initiate {
        child: Some(conn.to_string()),
        ike: Some(conn.to_string()),
        timeout_ms: Some(cfg.initiate_timeout.as_millis().min(i64::MAX as u128) as i64),
        ..Default::default()
    };
    match client.call(&i).await {
        Ok(()) => Ok(Check::Initiated),
        Err(e) if e.is_connection_lost() => Err(e),
        Err(ViciError::CommandFailed { errmsg, .. }) => Ok(Check::Failed(explain(&errmsg, &[]))),
        Err(e) => Ok(Check::Failed(e.to_string())),
    }
}

/// What [`run`] did, for logs and tests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Revived {
    pub peer: String,
    pub conn: String,
    pub result: Check,
}

/// Watches SA events on `client` (a connection of its own: it subscribes to [`EVENTS`])
/// and revives lost children of the conns of the current plan, as [`Reviver`] says.
/// `plans` carries plan updates; `report` is called after every check. Returns only when
/// the connection is lost (reconnect, reconcile, and run it again).
pub async fn run(
    client: &Client,
    mut plans: tokio::sync::watch::Receiver<Plan>,
    cfg: &CharonConfig,
    mut report: impl FnMut(&Revived),
) -> ViciError {
    let mut events = match client.subscribe(&EVENTS).await {
        Ok(e) => e,
        Err(e) => return e,
    };
    let mut rv = Reviver::new(cfg);
    rv.set_plan(&plans.borrow_and_update());
    let mut plans_open = true;
    loop {
        let due = rv.next_due();
        let sleep = async {
            match due {
                Some(d) => tokio::time::sleep_until(d.into()).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            ev = events.next() => {
                let Some(ev) = ev else {
                    return ViciError::Disconnected {
                        label: cfg.vici_socket.display().to_string(),
                        reason: client.closed().unwrap_or_else(|| "event stream ended".into()),
                    };
                };
                match SaEvent::parse(&ev) {
                    Ok(Some(sa)) => {
                        if let Some(conn) = rv.on_event(&sa, Instant::now()) {
                            tracing::debug!(%conn, event = %ev.name, "SA event");
                        }
                    }
                    Ok(None) => {}
                    Err(e) => tracing::warn!(error = %e, "undecodable SA event ignored"),
                }
            }
            changed = plans.changed(), if plans_open => {
                match changed {
                    Ok(()) => rv.set_plan(&plans.borrow_and_update()),
                    Err(_) => plans_open = false,
                }
            }
            () = sleep => {
                for conn in rv.take_due(Instant::now()) {
                    let result = match check(client, &conn, cfg).await {
                        Ok(r) => r,
                        Err(e) => return e,
                    };
                    rv.on_check(&conn, &result, Instant::now());
                    if let Some((peer, _)) = rv.target(&conn) {
                        match &result {
                            Check::Failed(why) => tracing::warn!(%peer, %conn, error = %why, "re-initiating lost child failed; backing off"),
                            Check::Initiated => tracing::info!(%peer, %conn, "lost child re-initiated"),
                            _ => tracing::debug!(%peer, %conn, ?result, "lost child checked"),
                        }
                        report(&Revived { peer: peer.to_string(), conn: conn.clone(), result });
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataplane::charon::types::IkeSa;
    use crate::plan::{plan, PlanOptions};

    fn the_plan(me: &str) -> Plan {
        let c = crate::test_cluster::valid(&crate::test_cluster::on_77(&[
            "host-a", "host-b", "host-c",
        ]));
        plan(&c, me, &PlanOptions::default(), None).unwrap()
    }

    fn sa(name: &str) -> IkeSa {
        IkeSa {
            name: name.into(),
            uniqueid: 1,
            state: "DELETING".into(),
            initiator: true,
            ..Default::default()
        }
    }

    #[test]
    fn down_events_schedule_checks_with_role_dependent_delays() {
        let cfg = CharonConfig::default();
        let mut rv = Reviver::new(&cfg);
        rv.set_plan(&the_plan("host-b"));
        assert_eq!(
            rv.conns().collect::<Vec<_>>(),
            ["ipsec-mesh-host-a", "ipsec-mesh-host-c"]
        );
        let t0 = Instant::now();
        let down = |n: &str| SaEvent::ChildUpdown {
            up: false,
            sa: sa(n),
        };
        assert_eq!(rv.on_event(&down("office-vpn"), t0), None, "not ours");
        assert!(rv.on_event(&down("ipsec-mesh-host-c"), t0).is_some());
        assert!(rv.on_event(&down("ipsec-mesh-host-a"), t0).is_some());
        // b initiates towards c (1 s), answers a (1 s + 2 s grace)
        assert_eq!(rv.next_due(), Some(t0 + Duration::from_secs(1)));
        assert!(rv.take_due(t0).is_empty());
        assert_eq!(
            rv.take_due(t0 + Duration::from_secs(1)),
            ["ipsec-mesh-host-c"]
        );
        assert_eq!(
            rv.take_due(t0 + Duration::from_secs(3)),
            ["ipsec-mesh-host-a"]
        );
        assert_eq!(rv.next_due(), None);
    }

    #[test]
    fn failures_back_off_exponentially_and_up_resets() {
        let cfg = CharonConfig::default();
        let mut rv = Reviver::new(&cfg);
        rv.set_plan(&the_plan("host-a"));
        let c = "ipsec-mesh-host-b";
        let t0 = Instant::now();
        let fail = Check::Failed("x".into());
        let mut waits = Vec::new();
        for _ in 0..8 {
            rv.on_check(c, &fail, t0);
            waits.push(rv.next_due().unwrap() - t0);
            rv.take_due(rv.next_due().unwrap());
        }
        let secs: Vec<u64> = waits.iter().map(|d| d.as_secs()).collect();
        assert_eq!(secs, [2, 4, 8, 16, 32, 60, 60, 60]);
        rv.on_event(
            &SaEvent::ChildUpdown {
                up: true,
                sa: sa(c),
            },
            t0,
        );
        rv.on_check(c, &fail, t0);
        assert_eq!(rv.next_due().unwrap() - t0, Duration::from_secs(2));
        rv.on_check(c, &Check::Initiated, t0);
        assert_eq!(rv.next_due(), None);
        // a peer that left is forgotten
        let mut p = the_plan("host-a");
        p.peers.retain(|x| x.host.as_str() != "host-b");
        rv.set_plan(&p);
        assert_eq!(rv.target(c), None);
    }
}

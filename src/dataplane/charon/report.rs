//! What a reconcile or cleanup of the charon driver did: commands sent (writes apart), changes,
//! per-peer errors and states, and the generic [`DriverReport`] made from it.

use std::collections::BTreeMap;

use crate::dataplane::driver::DriverReport;
use crate::dataplane::report::{Change, Report};

/// The layer name in [`Change`]s.
pub const LAYER: &str = "charon";
pub use crate::dataplane::driver::PeerState;

/// Commands that modify charon's state.
pub const WRITE_COMMANDS: [&str; 6] = [
    "load-shared",
    "unload-shared",
    "load-conn",
    "unload-conn",
    "initiate",
    "terminate",
];

const READ_COMMANDS: [&str; 5] = ["list-conns", "list-sas", "get-shared", "get-conns", "stats"];

/// What a reconcile or cleanup did: the common [`Report`] (its `writes` count the modifying
/// commands sent, [`WRITE_COMMANDS`]; failures by owner: a peer's host id, or `mesh` for the
/// shared key / the whole run) and what only charon has.
#[derive(Debug, Clone, Default)]
pub struct CharonReport {
    pub report: Report,
    /// Every command sent, by name (reads too).
    pub sent: BTreeMap<&'static str, usize>,
    /// State of every peer of the plan.
    pub peers: BTreeMap<String, PeerState>,
    /// Conns loaded (new or changed); several may share one `load-conn` (see [`LOAD_PACK`](super::driver::LOAD_PACK)).
    pub loaded: usize,
    /// Conns of departed peers unloaded.
    pub unloaded: usize,
}

impl CharonReport {
    pub fn ok(&self) -> bool {
        self.report.ok()
    }

    /// How many `command`s were sent.
    pub fn sent(&self, command: &str) -> usize {
        self.sent.get(command).copied().unwrap_or(0)
    }

    /// The first error reported for `owner`.
    pub fn error_for(&self, owner: &str) -> Option<&str> {
        self.report.error_for(owner)
    }

    pub(super) fn note(&mut self, command: &'static str, n: usize) {
        if n == 0 {
            return;
        }
        *self.sent.entry(command).or_default() += n;
        if WRITE_COMMANDS.contains(&command) {
            self.report.writes += n;
        }
    }

    pub(super) fn error(&mut self, owner: &str, msg: impl Into<String>) {
        let msg = msg.into();
        tracing::warn!(peer = owner, error = %msg, "charon driver");
        self.report.error(owner, msg);
    }

    pub(super) fn change(&mut self, change: Change) {
        tracing::info!(%change, "charon driver");
        self.report.changes.push(change);
    }

    pub(super) fn set(&mut self, peer: &str, st: PeerState) {
        self.peers.insert(peer.to_string(), st);
    }

    /// The generic driver report: peers still connecting count as not in place.
    pub fn into_driver_report(self) -> DriverReport {
        let mut r = self.report;
        for (p, st) in &self.peers {
            if *st == PeerState::Connecting && r.error_for(p).is_none() {
                r.error(
                    p.as_str(),
                    "charon is still setting up the SA (retried by the next reconcile)",
                );
            }
        }
        let mut d = DriverReport::default();
        d.part("charon", r);
        d
    }
}

/// The name of a command as counted in [`CharonReport::sent`] (`other` for the rest).
pub(super) fn cmd_name(c: &str) -> &'static str {
    WRITE_COMMANDS
        .iter()
        .chain(READ_COMMANDS.iter())
        .find(|k| **k == c)
        .copied()
        .unwrap_or("other")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_counts_writes_only_for_modifying_commands() {
        let mut r = CharonReport::default();
        r.note("list-conns", 1);
        r.note("list-sas", 2);
        assert_eq!(r.report.writes, 0);
        r.note("load-conn", 3);
        r.note("initiate", 1);
        assert_eq!(
            (r.report.writes, r.sent("load-conn"), r.sent("list-sas")),
            (4, 3, 2)
        );
        r.set("host-b", PeerState::Connecting);
        r.set("host-c", PeerState::Up);
        let d = r.into_driver_report();
        assert_eq!(d.writes, 4);
        assert_eq!(d.errors.len(), 1);
        assert_eq!(d.errors[0].owner, "host-b");
        assert_eq!(d.parts, vec![("charon", 4)]);
    }
}

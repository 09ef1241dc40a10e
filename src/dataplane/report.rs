//! One report type for every driver and layer: what a reconcile or cleanup wrote, each change
//! typed (what object, added / changed from what to what / deleted, for which peer), and the
//! failures by owner. The same values reach the logs, `apply --diff`, `cleanup --diff` and the
//! sidecar's `/status`, so all three say the same thing.
//!
//! Changes never carry key material: layers describe SAs by SPI, reqid and algorithm only.

use std::fmt;

use serde::Serialize;

/// What happened to an object.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    Add,
    /// Replaced in place (the old and new values are in the [`Change`]).
    Change,
    Delete,
}

impl Action {
    fn sign(self) -> char {
        match self {
            Action::Add => '+',
            Action::Change => '~',
            Action::Delete => '-',
        }
    }
}

/// One write of a layer, typed.
///
/// Printed as `+ xfrm policy out 10.42.0.0/16 -> 10.42.3.0/24 ... [h2]` for an add or a delete
/// (`-`), and `~ vxlan device vtep1042: mtu 1500 -> mtu 1450` for a change: old -> new.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Change {
    /// The layer that owns the object: `xfrm`, `routes`, `firewall`, `vxlan`, `charon`.
    pub layer: &'static str,
    pub action: Action,
    /// The object, identified: `policy out A -> B mark M`, `route 10.42.3.0/24 dev eth0 table 1042`.
    pub object: String,
    /// For a change: the object's old value (what differed), when known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub old: Option<String>,
    /// For a change: its new value.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub new: Option<String>,
    /// The peer (host id) the object serves; `None` for objects of the whole mesh.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peer: Option<String>,
}

impl Change {
    pub fn add(layer: &'static str, object: impl Into<String>) -> Change {
        Change::new(layer, Action::Add, object)
    }

    pub fn delete(layer: &'static str, object: impl Into<String>) -> Change {
        Change::new(layer, Action::Delete, object)
    }

    /// `object` changed from `old` to `new` (either may be unknown to the layer).
    pub fn update(
        layer: &'static str,
        object: impl Into<String>,
        old: Option<String>,
        new: Option<String>,
    ) -> Change {
        Change {
            old,
            new,
            ..Change::new(layer, Action::Change, object)
        }
    }

    fn new(layer: &'static str, action: Action, object: impl Into<String>) -> Change {
        Change {
            layer,
            action,
            object: object.into(),
            old: None,
            new: None,
            peer: None,
        }
    }

    /// The peer the object belongs to.
    pub fn for_peer(mut self, peer: impl Into<String>) -> Change {
        self.peer = Some(peer.into());
        self
    }
}

impl fmt::Display for Change {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {} {}", self.action.sign(), self.layer, self.object)?;
        match (&self.old, &self.new) {
            (Some(o), Some(n)) => write!(f, ": {o} -> {n}")?,
            (None, Some(n)) => write!(f, ": -> {n}")?,
            (Some(o), None) => write!(f, ": {o} ->")?,
            (None, None) => {}
        }
        if let Some(p) = &self.peer {
            write!(f, " [{p}]")?;
        }
        Ok(())
    }
}

/// The owner of a failure: a peer's host id, or `mesh` for shared objects.
pub const MESH: &str = "mesh";

/// One failure, by owner.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Failure {
    /// A peer's host id, or [`MESH`].
    pub owner: String,
    /// What failed and why, in words (never secrets).
    pub error: String,
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.owner, self.error)
    }
}

/// An error and its causes on one line (`a: b: c`), without repeating a cause the text
/// before already contains.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut msg = e.to_string();
    let mut src = e.source();
    while let Some(s) = src {
        let t = s.to_string();
        if !msg.contains(&t) {
            msg.push_str(": ");
            msg.push_str(&t);
        }
        src = s.source();
    }
    msg
}

/// The outcome of one reconcile or cleanup, of one layer or of a whole driver stack.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Report {
    /// Modifying requests sent. 0 means nothing changed.
    pub writes: usize,
    /// Every change applied (a failed one is in `errors` instead, with its reason).
    pub changes: Vec<Change>,
    /// Failures by owner.
    pub errors: Vec<Failure>,
    /// Writes per layer (`xfrm objects`, `firewall`, `routes`, ...), for logs.
    pub parts: Vec<(&'static str, usize)>,
    /// Conditions worth a warning that are not failures (e.g. a kernel without ESP: SAs
    /// skipped, policies installed).
    pub warnings: Vec<String>,
}

impl Report {
    pub fn ok(&self) -> bool {
        self.errors.is_empty()
    }

    /// Record a failure of `owner`.
    pub fn error(&mut self, owner: impl Into<String>, error: impl Into<String>) {
        self.errors.push(Failure {
            owner: owner.into(),
            error: error.into(),
        });
    }

    /// Record the failure of a whole step (`what`) for `owner`, with the error's causes.
    pub fn fail(&mut self, owner: &str, what: &str, e: &dyn std::error::Error) {
        self.error(owner, format!("{what}: {}", error_chain(e)));
    }

    /// Fold a layer's report in as the part `name`.
    pub fn part(&mut self, name: &'static str, layer: Report) {
        self.parts.push((name, layer.writes));
        self.absorb(layer);
    }

    /// Fold another report in (its parts kept).
    pub fn absorb(&mut self, other: Report) {
        self.writes += other.writes;
        self.changes.extend(other.changes);
        self.errors.extend(other.errors);
        self.parts.extend(other.parts);
        self.warnings.extend(other.warnings);
    }

    /// Host ids (and `mesh`) with at least one error, sorted, once each.
    pub fn failed_peers(&self) -> Vec<&str> {
        let mut v: Vec<&str> = self.errors.iter().map(|f| f.owner.as_str()).collect();
        v.sort();
        v.dedup();
        v
    }

    /// The first error reported for `owner`.
    pub fn error_for(&self, owner: &str) -> Option<&str> {
        self.errors
            .iter()
            .find(|f| f.owner == owner)
            .map(|f| f.error.as_str())
    }

    /// The changes as the lines `--diff` prints.
    pub fn lines(&self) -> Vec<String> {
        self.changes.iter().map(|c| c.to_string()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn changes_print_old_to_new_and_their_peer() {
        let c = Change::update(
            "vxlan",
            "device vtep1042",
            Some("mtu 1500".into()),
            Some("mtu 1450".into()),
        );
        assert_eq!(
            c.to_string(),
            "~ vxlan device vtep1042: mtu 1500 -> mtu 1450"
        );
        let c = Change::add("xfrm", "sa 10.0.0.1 -> 10.0.0.2 spi 0x00000001").for_peer("h2");
        assert_eq!(
            c.to_string(),
            "+ xfrm sa 10.0.0.1 -> 10.0.0.2 spi 0x00000001 [h2]"
        );
        assert_eq!(
            Change::delete("routes", "rule fwmark 0x1").to_string(),
            "- routes rule fwmark 0x1"
        );
        let c = Change::update("firewall", "chain X", None, Some("3 rules".into()));
        assert_eq!(c.to_string(), "~ firewall chain X: -> 3 rules");
    }

    #[test]
    fn changes_serialise_typed_for_status() {
        let c =
            Change::update("xfrm", "policy out", Some("a".into()), Some("b".into())).for_peer("h2");
        let v = serde_json::to_value(&c).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"layer": "xfrm", "action": "change", "object": "policy out",
                "old": "a", "new": "b", "peer": "h2"})
        );
        let v = serde_json::to_value(Change::add("routes", "route r")).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"layer": "routes", "action": "add", "object": "route r"})
        );
    }

    #[test]
    fn parts_absorb_writes_changes_and_errors() {
        let mut layer = Report {
            writes: 2,
            changes: vec![Change::add("routes", "a"), Change::delete("routes", "b")],
            ..Report::default()
        };
        layer.error("h3", "route failed");
        let mut r = Report::default();
        r.error("mesh", "x");
        r.part("routes", layer);
        assert_eq!(r.writes, 2);
        assert_eq!(r.parts, vec![("routes", 2)]);
        assert_eq!(r.lines(), vec!["+ routes a", "- routes b"]);
        assert_eq!(r.failed_peers(), vec!["h3", "mesh"]);
        assert_eq!(r.error_for("h3"), Some("route failed"));
        assert!(!r.ok());
    }
}

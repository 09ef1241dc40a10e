//! fwmark forwarding, netfilter part: mark traffic to the overlay (except this host's own
//! subnets) with the encrypt mark (table `mangle`) and drop marked traffic that matched no
//! IPsec policy (table `filter`, fail closed).
//!
//! What ipsec-mesh owns here, and nothing else:
//! - chains whose name starts with [`CHAIN_PREFIX`] (`IPSEC-MESH-MARK`, `IPSEC-MESH-PRE`,
//!   `IPSEC-MESH-GUARD`, and in route mode `IPSEC-MESH-RPF`) in the `mangle` and `filter`
//!   tables;
//! - one jump to them from each built-in chain that needs one (`PREROUTING`, `OUTPUT`,
//!   `FORWARD`), inserted at the top.
//!
//! Layers, each usable alone:
//! - [`backend`]: the [`Firewall`] trait the forwarding layer calls, and its backends chosen
//!   by name (`iptables`, `none`).
//! - [`render`] (pure): a [`FirewallSpec`] -> the desired [`TableState`] per table; the diff of
//!   two states -> [`Change`]s -> `iptables-restore --noflush` input.
//! - [`save`] (pure): `iptables-save` output -> the [`TableState`] of our chains and jumps.
//! - [`runner`]: runs `iptables-save` / `iptables-restore -w`, one atomic restore per table,
//!   and writes nothing when the kernel already matches.
//!
//! Fail-closed order: [`apply`] writes `filter` (guard) before `mangle` (marking);
//! [`cleanup`] removes marking before the guard.
//!
//! # Per-packet cost: constant in the number of peers
//!
//! Every packet the host sends (`OUTPUT`) or receives (`PREROUTING`, through
//! `IPSEC-MESH-PRE` when devices are given) walks `IPSEC-MESH-MARK`, so its length is the
//! per-packet cost. It holds `-d <local subnet> -j RETURN` for each of this host's own subnets
//! that lies in the overlay (aggregated), then **one** rule `-d <overlay cidr> -j MARK`: its
//! length depends on this host's subnets, never on the peers (5,000 peers: still
//! `local + 1` rules; it used to be one `MARK` rule per aggregated remote prefix). The guard
//! `IPSEC-MESH-GUARD` is one rule for the overlay cidr. Per-peer selection is left to the
//! structures built for it: the XFRM policy lookup and the LPM route table.
//!
//! Which packets get the mark, and why that is correct:
//! - **To a remote peer's subnet**: marked (inside the overlay, not local). The mark selects
//!   policy-routing table 1042 ([`crate::dataplane::routes`]) and that peer's XFRM out policy
//!   (mark-matched): the packet is encrypted. Same as before.
//! - **To an overlay address of no peer** (not local, no peer subnet): marked. No pair policy
//!   matches it, so the catch-all block policy (xfrm driver: `desired::block_policy`, marked
//!   traffic, lowest priority) drops it; and should no policy exist at all, the guard drops
//!   it (marked, to the overlay, `--pol none`). Dropped, never plaintext. (The per-prefix form
//!   left it unmarked: it went wherever the main table routed it, in clear.)
//! - **To this host's own subnets** (containers on the bridge, decrypted inbound traffic that
//!   re-enters `PREROUTING`): `RETURN` before the mark rule, never marked.
//! - **Outside the overlay** (underlay, internet, loopback, and the encrypted outer packets,
//!   whose destination is a peer's agent IP, outside the overlay by model validation): no
//!   rule matches, never marked.
//! - **Arriving on another device** than the bridge / underlay (when the spec names them):
//!   `IPSEC-MESH-PRE` never jumps to the mark chain for them, as before.
//!
//! A peer joining or leaving therefore changes neither table: the firewall writes 0 objects
//! and only the routes and the XFRM policies change.

pub mod backend;
pub mod nft;
pub mod render;
pub mod runner;
pub mod save;
pub mod srccheck;

use std::fmt;
use std::io;

use ipnet::IpNet;

use crate::plan::{Marks, Plan};

pub use backend::{Firewall, FirewallKind};
pub use render::{desired, diff_table, render_restore, Change, Jump, TableState};
pub use runner::{apply, apply_with, cleanup, cleanup_with, Iptables};
pub use save::parse_save;

/// Every chain we own starts with this.
pub const CHAIN_PREFIX: &str = "IPSEC-MESH-";
/// mangle: sets the encrypt mark on packets to the overlay, except to this host's subnets.
pub const MARK_CHAIN: &str = "IPSEC-MESH-MARK";
/// mangle: restricts PREROUTING marking to the bridge / underlay devices (only when a device
/// is given in the spec).
pub const PRE_CHAIN: &str = "IPSEC-MESH-PRE";
/// filter: drops marked packets that matched no IPsec policy.
pub const GUARD_CHAIN: &str = "IPSEC-MESH-GUARD";
/// mangle, route mode only: drops what arrives on one of the mesh's XFRM interfaces with a
/// source that does not route back out of that interface (a peer sending with another
/// peer's, or this host's, container addresses; see [`crate::dataplane::xfrmi`]).
pub const RPF_CHAIN: &str = "IPSEC-MESH-RPF";

/// Built-in chains of the tables we touch (jumps from anywhere else are not ours to manage).
pub const BUILTIN_CHAINS: [&str; 5] = ["PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"];

/// Whether a chain name is one of ours.
pub fn is_owned_chain(name: &str) -> bool {
    name.starts_with(CHAIN_PREFIX)
}

/// Address family: picks `iptables*` or `ip6tables*`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    pub fn of(net: &IpNet) -> Family {
        match net {
            IpNet::V4(_) => Family::V4,
            IpNet::V6(_) => Family::V6,
        }
    }
    pub fn save_binary(self) -> &'static str {
        match self {
            Family::V4 => "iptables-save",
            Family::V6 => "ip6tables-save",
        }
    }
    pub fn restore_binary(self) -> &'static str {
        match self {
            Family::V4 => "iptables-restore",
            Family::V6 => "ip6tables-restore",
        }
    }
}

impl fmt::Display for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Family::V4 => "IPv4",
            Family::V6 => "IPv6",
        })
    }
}

/// The netfilter tables we write, in apply order (guard before marking).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Table {
    Filter,
    Mangle,
}

impl Table {
    /// Apply order: the guard exists before anything gets marked.
    pub const APPLY_ORDER: [Table; 2] = [Table::Filter, Table::Mangle];
    /// Cleanup order: stop marking before the guard goes.
    pub const CLEANUP_ORDER: [Table; 2] = [Table::Mangle, Table::Filter];

    pub fn as_str(self) -> &'static str {
        match self {
            Table::Filter => "filter",
            Table::Mangle => "mangle",
        }
    }
}

impl fmt::Display for Table {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What the firewall must express; derived from a [`Plan`] by [`FirewallSpec::from_plan`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FirewallSpec {
    pub marks: Marks,
    /// The overlay cidr: the guard drops marked, policy-less packets to it.
    pub overlay: IpNet,
    /// A dual-stack overlay's cidr of the other family (`None`: one family). The backends
    /// render such a spec as its [`FirewallSpec::parts`], one single-family spec each: the
    /// same rules per family (iptables and ip6tables; in the nftables table, a rule of each
    /// family per chain), and a family the overlay does not have holds nothing of ours.
    pub other_overlay: Option<IpNet>,
    /// Every peer's subnets: validated (inside the overlay, not overlapping a local subnet),
    /// not rendered (the mark rule covers the whole overlay).
    pub remote_subnets: Vec<IpNet>,
    /// The self host's subnets (never marked; checked not to overlap the remote ones).
    pub local_subnets: Vec<IpNet>,
    /// Container bridge. With a bridge and/or underlay device, PREROUTING marks only traffic
    /// arriving on them; with neither, traffic from any device.
    pub bridge_dev: Option<String>,
    /// Physical NIC (underlay).
    pub underlay_dev: Option<String>,
    /// Route mode ([`crate::dataplane::xfrmi`]): the name prefix of the mesh's XFRM
    /// interfaces (`imx`). The guard lets marked traffic routed into them through: it has no
    /// IPsec policy yet when the guard sees it (the interface encrypts it on transmit, with
    /// its own interface id, and drops it when it cannot: it never sends in clear). And
    /// what arrives on them must pass a reverse-path check (one rule, before routing:
    /// iptables `-i imx+ -m rpfilter --invert -j DROP` in [`RPF_CHAIN`], nft
    /// `iifname "imx*" fib saddr . iif oif missing drop`; see [`crate::dataplane::xfrmi`]
    /// for why). `None` (policy mode): neither.
    pub tunnel_devices: Option<String>,
}

impl FirewallSpec {
    /// Marks, overlay, remote and local subnets from the plan; no device restriction.
    pub fn from_plan(plan: &Plan) -> FirewallSpec {
        FirewallSpec {
            marks: plan.marks,
            overlay: plan.cidr,
            other_overlay: plan.cidrs.iter().copied().find(|c| *c != plan.cidr),
            remote_subnets: plan
                .peers
                .iter()
                .flat_map(|p| p.subnets.iter().copied())
                .collect(),
            local_subnets: plan.subnets.clone(),
            bridge_dev: None,
            underlay_dev: None,
            tunnel_devices: None,
        }
    }

    /// Restrict PREROUTING marking to these devices (`None` leaves that side unrestricted).
    pub fn with_devices(mut self, bridge: Option<String>, underlay: Option<String>) -> Self {
        self.bridge_dev = bridge;
        self.underlay_dev = underlay;
        self
    }

    /// Route mode: exempt marked traffic leaving through the interfaces named `prefix`*
    /// from the guard (see [`FirewallSpec::tunnel_devices`]).
    pub fn with_tunnel_devices(mut self, prefix: Option<String>) -> Self {
        self.tunnel_devices = prefix;
        self
    }

    /// The devices PREROUTING marking is restricted to (bridge, underlay; empty: any).
    pub fn devices(&self) -> Vec<&str> {
        let mut devs: Vec<&str> = [&self.bridge_dev, &self.underlay_dev]
            .into_iter()
            .flatten()
            .map(String::as_str)
            .collect();
        devs.dedup();
        devs
    }

    /// The family of the overlay (and so of the rules); of the first cidr of a dual-stack
    /// overlay.
    pub fn family(&self) -> Family {
        Family::of(&self.overlay)
    }

    /// One single-family spec per overlay family (one, or two for a dual-stack overlay), each
    /// with the subnets of its family: what the backends render.
    pub fn parts(&self) -> Vec<FirewallSpec> {
        std::iter::once(self.overlay)
            .chain(self.other_overlay)
            .map(|overlay| {
                let fam = Family::of(&overlay);
                let of_fam = |v: &[IpNet]| -> Vec<IpNet> {
                    v.iter().copied().filter(|n| Family::of(n) == fam).collect()
                };
                FirewallSpec {
                    overlay,
                    other_overlay: None,
                    remote_subnets: of_fam(&self.remote_subnets),
                    local_subnets: of_fam(&self.local_subnets),
                    ..self.clone()
                }
            })
            .collect()
    }

    /// Check that the spec can be rendered safely (each of its [`FirewallSpec::parts`]).
    pub fn validate(&self) -> Result<(), FirewallError> {
        let bad = |m: String| Err(FirewallError::InvalidSpec(m));
        if let Some(other) = self.other_overlay {
            if Family::of(&other) == self.family() {
                return bad(format!(
                    "the overlay cidrs {} and {other} are of one family (one per family)",
                    self.overlay
                ));
            }
        }
        let fams: Vec<Family> = std::iter::once(self.overlay)
            .chain(self.other_overlay)
            .map(|o| Family::of(&o))
            .collect();
        for n in self.remote_subnets.iter().chain(&self.local_subnets) {
            if !fams.contains(&Family::of(n)) {
                return bad(format!(
                    "subnet {n} is not {} like the overlay {}",
                    self.family(),
                    self.overlay
                ));
            }
        }
        for part in self.parts() {
            part.validate_one()?;
        }
        Ok(())
    }

    /// [`FirewallSpec::validate`] of a single-family spec.
    fn validate_one(&self) -> Result<(), FirewallError> {
        let bad = |m: String| Err(FirewallError::InvalidSpec(m));
        if let Err(e) = self.marks.validate() {
            return bad(e);
        }
        for r in &self.remote_subnets {
            if !self.overlay.contains(r) {
                // The guard covers the overlay only: marked traffic outside it would be
                // unguarded.
                return bad(format!(
                    "remote subnet {r} is outside the overlay {}",
                    self.overlay
                ));
            }
            if let Some(l) = self
                .local_subnets
                .iter()
                .find(|l| l.contains(r) || r.contains(*l))
            {
                return bad(format!("remote subnet {r} overlaps local subnet {l}"));
            }
        }
        for (what, dev) in [
            ("bridge", &self.bridge_dev),
            ("underlay", &self.underlay_dev),
            ("tunnel", &self.tunnel_devices),
        ] {
            if let Some(d) = dev {
                if d.is_empty()
                    || d.len() > 15
                    || d.chars()
                        .any(|c| c.is_whitespace() || c == '"' || c == '\'' || c == '/')
                {
                    return bad(format!(
                        "{what} device name {d:?} is not a valid interface name"
                    ));
                }
            }
        }
        Ok(())
    }
}

/// The outcome of an apply or a cleanup: the [common report](crate::dataplane::report);
/// `writes` counts objects written (chains filled or deleted, jumps inserted or deleted, an
/// nftables table replaced), 0 = no-op.
pub use crate::dataplane::report::Report as FirewallReport;

/// The layer name in [`Change`](crate::dataplane::report::Change)s.
pub const LAYER: &str = "firewall";

/// Add one iptables table's applied changes to `report`.
fn absorb_table(report: &mut FirewallReport, family: Family, table: Table, changes: &[Change]) {
    use crate::dataplane::report::Change as C;
    report.writes += changes.len();
    report.changes.extend(changes.iter().map(|c| {
        let at = format!("{family} {table}");
        match c {
            Change::Fill {
                chain,
                rules,
                created: true,
            } => C::add(LAYER, format!("{at} chain {chain} ({} rules)", rules.len())),
            Change::Fill { chain, rules, .. } => C::update(
                LAYER,
                format!("{at} chain {chain}"),
                None,
                Some(format!("{} rules", rules.len())),
            ),
            Change::InsertJump(j) => {
                C::add(LAYER, format!("{at} jump `-I {} 1 {}`", j.from, j.rule))
            }
            Change::DeleteJump(j) => {
                C::delete(LAYER, format!("{at} jump `-A {} {}`", j.from, j.rule))
            }
            Change::DeleteChain(chain) => C::delete(LAYER, format!("{at} chain {chain}")),
        }
    }));
}

#[derive(Debug, thiserror::Error)]
pub enum FirewallError {
    #[error("invalid firewall spec: {0}")]
    InvalidSpec(String),
    #[error(
        "`{command}` not found: install the iptables package (Debian: `apt-get install iptables`)"
    )]
    MissingBinary { command: String },
    #[error("`nft` not found: install the nftables package (Debian: `apt-get install nftables`)")]
    MissingNft,
    /// `nft` (or `unshare`, which it runs under to canonicalise the ruleset) failed.
    #[error("`{command}` failed: {stderr}")]
    Nft { command: String, stderr: String },
    #[error("could not run `{command}`")]
    Spawn {
        command: String,
        #[source]
        source: io::Error,
    },
    #[error("`{command}` failed ({status}): {stderr}")]
    Save {
        command: String,
        status: String,
        stderr: String,
    },
    /// The restore was rejected as a whole (nothing of it applied: one transaction).
    #[error("`{command}` rejected the {table} table update: {reason}")]
    Restore {
        command: String,
        table: Table,
        /// The tool's message, with the offending input line quoted when it names one.
        reason: String,
    },
    /// Cleanup keeps going past a failure; these are all the failures.
    #[error("cleanup failed: {}", .0.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("; "))]
    Cleanup(Vec<FirewallError>),
}

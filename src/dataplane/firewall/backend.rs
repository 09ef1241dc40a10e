//! Firewall backends behind one small trait, chosen by name when the driver is built
//! (`--firewall`), as netavark picks its firewall driver: the forwarding layer asks a backend
//! to make the kernel match a [`FirewallSpec`] and to remove what it owns, and knows nothing
//! of the tool behind it.
//!
//! - [`Iptables`] (`iptables`): the `iptables-save` / `iptables-restore` backend
//!   ([`super::runner`]): render, parse the saved state, diff, one atomic restore per table,
//!   0 writes when unchanged.
//! - [`Nftables`] (`nftables`): one table of our own, `table inet ipsec-mesh`, replaced whole
//!   in one `nft -f` transaction ([`super::nft`]).
//! - [`NoFirewall`] (`none`): writes nothing, for operators who manage the firewall
//!   themselves. They then own the encrypt mark on traffic to remote overlay subnets and the
//!   fail-closed guard (the XFRM block policy still drops marked traffic that no pair policy
//!   takes; see [`super`] for what the rules must do).
//!
//! Every backend owns only its own objects, writes nothing when the kernel already matches,
//! and removes in `cleanup` exactly what it owns. The iptables and nftables backends' cleanup
//! also removes what the other one left (a host applied with `--firewall iptables` and cleaned
//! up with the default `auto`, which picks nftables on an nf_tables system, keeps nothing):
//! both are ipsec-mesh's.

use std::fmt;
use std::str::FromStr;

use super::{runner, FirewallError, FirewallReport, FirewallSpec};

/// A firewall backend.
pub trait Firewall: Send + Sync {
    /// The name it is chosen by (`--firewall NAME`).
    fn name(&self) -> &'static str;
    /// Make the kernel's rules of ours match `spec`; writes nothing when they already do.
    fn apply(&self, spec: &FirewallSpec) -> Result<FirewallReport, FirewallError>;
    /// Remove every rule, chain or table of ours, nothing else; idempotent.
    fn cleanup(&self) -> Result<FirewallReport, FirewallError>;
}

/// Which backend (`--firewall`); the default is `auto`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum FirewallKind {
    Iptables,
    Nftables,
    None,
    /// What the system uses ([`FirewallKind::resolve`]).
    #[default]
    Auto,
}

impl FirewallKind {
    pub const ALL: [FirewallKind; 4] = [
        FirewallKind::Iptables,
        FirewallKind::Nftables,
        FirewallKind::None,
        FirewallKind::Auto,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            FirewallKind::Iptables => "iptables",
            FirewallKind::Nftables => "nftables",
            FirewallKind::None => "none",
            FirewallKind::Auto => "auto",
        }
    }

    /// `auto` made concrete (others as they are): nftables when the system's `iptables` is
    /// the nf_tables variant (`iptables --version` says `(nf_tables)`: its rules live in
    /// nftables anyway), or when there is no `iptables` but an `nft`; otherwise iptables.
    pub fn resolve(self) -> (FirewallKind, &'static str) {
        if self != FirewallKind::Auto {
            return (self, "as asked");
        }
        let version = std::process::Command::new("iptables")
            .arg("--version")
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned());
        let nft = std::process::Command::new("nft")
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success());
        Self::choose(version.as_deref(), nft)
    }

    /// The choice of [`FirewallKind::resolve`] from what was found (pure).
    pub fn choose(iptables_version: Option<&str>, nft: bool) -> (FirewallKind, &'static str) {
        match iptables_version {
            Some(v) if v.contains("nf_tables") && nft => (
                FirewallKind::Nftables,
                "auto: iptables is the nf_tables variant",
            ),
            None if nft => (FirewallKind::Nftables, "auto: no iptables, nft present"),
            Some(_) => (FirewallKind::Iptables, "auto: iptables (legacy) present"),
            None => (
                FirewallKind::Iptables,
                "auto: neither iptables nor nft found",
            ),
        }
    }

    /// The backend of this kind.
    pub fn backend(self) -> Box<dyn Firewall> {
        match self {
            FirewallKind::Iptables => Box::new(Iptables),
            FirewallKind::Nftables => Box::new(Nftables(super::nft::Nft::default())),
            FirewallKind::None => Box::new(NoFirewall),
            FirewallKind::Auto => self.resolve().0.backend(),
        }
    }
}

impl fmt::Display for FirewallKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for FirewallKind {
    type Err = String;
    fn from_str(s: &str) -> Result<FirewallKind, String> {
        FirewallKind::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| {
                let names: Vec<&str> = FirewallKind::ALL.iter().map(|k| k.as_str()).collect();
                format!(
                    "unknown firewall backend {s:?} (one of: {})",
                    names.join(", ")
                )
            })
    }
}

/// Remove what the other backend of ours left (a switch of `--firewall`), after the new
/// backend's rules are in place, so marked traffic is never unguarded. A tool that is not
/// installed cannot hold anything of ours.
fn leftovers_of(kind: FirewallKind) -> Result<FirewallReport, FirewallError> {
    let r = match kind {
        FirewallKind::Iptables => runner::cleanup(),
        FirewallKind::Nftables => super::nft::Nft::default().cleanup(),
        FirewallKind::None | FirewallKind::Auto => Ok(FirewallReport::default()),
    };
    match r {
        Err(FirewallError::MissingBinary { .. } | FirewallError::MissingNft) => {
            Ok(FirewallReport::default())
        }
        r => r,
    }
}

fn absorb(into: &mut FirewallReport, r: Result<FirewallReport, FirewallError>) {
    match r {
        Ok(x) => into.absorb(x),
        // The new rules are in place and guard; the old ones are only redundant.
        Err(e) => tracing::warn!(error = %e, "removing the other firewall backend's rules failed"),
    }
}

/// `iptables-restore` / `ip6tables-restore` ([`super::runner`]).
#[derive(Debug, Clone, Copy, Default)]
pub struct Iptables;

impl Firewall for Iptables {
    fn name(&self) -> &'static str {
        FirewallKind::Iptables.as_str()
    }
    fn apply(&self, spec: &FirewallSpec) -> Result<FirewallReport, FirewallError> {
        let mut r = runner::apply(spec)?;
        // Switching from nftables: our chains guard now, so the old table can go.
        absorb(&mut r, leftovers_of(FirewallKind::Nftables));
        Ok(r)
    }
    fn cleanup(&self) -> Result<FirewallReport, FirewallError> {
        let mut r = runner::cleanup()?;
        absorb(&mut r, leftovers_of(FirewallKind::Nftables));
        Ok(r)
    }
}

/// `nft` ([`super::nft`]).
#[derive(Debug, Clone, Default)]
pub struct Nftables(pub super::nft::Nft);

impl Firewall for Nftables {
    fn name(&self) -> &'static str {
        FirewallKind::Nftables.as_str()
    }
    fn apply(&self, spec: &FirewallSpec) -> Result<FirewallReport, FirewallError> {
        let mut r = self.0.apply(spec)?;
        // Switching from iptables: our table guards now, so the old chains can go.
        absorb(&mut r, leftovers_of(FirewallKind::Iptables));
        Ok(r)
    }
    fn cleanup(&self) -> Result<FirewallReport, FirewallError> {
        let mut r = self.0.cleanup()?;
        absorb(&mut r, leftovers_of(FirewallKind::Iptables));
        Ok(r)
    }
}

/// Writes nothing: the operator manages the firewall.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoFirewall;

impl Firewall for NoFirewall {
    fn name(&self) -> &'static str {
        FirewallKind::None.as_str()
    }
    fn apply(&self, spec: &FirewallSpec) -> Result<FirewallReport, FirewallError> {
        // A spec that could not be rendered is still an error: the operator's rules would
        // have to implement it.
        spec.validate()?;
        Ok(FirewallReport::default())
    }
    fn cleanup(&self) -> Result<FirewallReport, FirewallError> {
        Ok(FirewallReport::default())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_unknown_names_list_the_choices() {
        for k in FirewallKind::ALL {
            assert_eq!(k.as_str().parse::<FirewallKind>(), Ok(k));
            if k != FirewallKind::Auto {
                assert_eq!(k.backend().name(), k.as_str());
                assert_eq!(k.resolve().0, k);
            }
        }
        assert_eq!(
            "nft".parse::<FirewallKind>().unwrap_err(),
            "unknown firewall backend \"nft\" (one of: iptables, nftables, none, auto)"
        );
        assert_eq!(FirewallKind::default(), FirewallKind::Auto);
        let nft_variant = Some("iptables v1.8.9 (nf_tables)");
        let legacy = Some("iptables v1.8.9 (legacy)");
        assert_eq!(
            FirewallKind::choose(nft_variant, true).0,
            FirewallKind::Nftables
        );
        assert_eq!(
            FirewallKind::choose(nft_variant, false).0,
            FirewallKind::Iptables
        );
        assert_eq!(FirewallKind::choose(legacy, true).0, FirewallKind::Iptables);
        assert_eq!(FirewallKind::choose(None, true).0, FirewallKind::Nftables);
        assert_eq!(FirewallKind::choose(None, false).0, FirewallKind::Iptables);
    }

    #[test]
    fn the_none_backend_writes_nothing_but_still_checks_the_spec() {
        let mut spec = FirewallSpec {
            other_overlay: None,
            marks: crate::plan::Marks::default(),
            overlay: "10.42.0.0/16".parse().unwrap(),
            remote_subnets: vec!["10.42.2.0/24".parse().unwrap()],
            local_subnets: vec!["10.42.1.0/24".parse().unwrap()],
            bridge_dev: None,
            underlay_dev: None,
            tunnel_devices: None,
        };
        let r = NoFirewall.apply(&spec).unwrap();
        assert_eq!(r.writes, 0);
        assert!(r.changes.is_empty());
        assert_eq!(NoFirewall.cleanup().unwrap().writes, 0);
        spec.remote_subnets = vec!["10.43.0.0/24".parse().unwrap()];
        assert!(matches!(
            NoFirewall.apply(&spec),
            Err(FirewallError::InvalidSpec(_))
        ));
    }
}

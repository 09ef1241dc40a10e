//! Our firewall objects, whichever backend made them, for the suites that run the binary with
//! the default `--firewall auto` (the CLI, the sidecar, the demo). `auto_backend` says which
//! backend that must be on this system, derived here without the product's code; `ours` reads
//! both backends' objects, so a check sees a wrong backend, a mix, or leftovers of either.

use std::process::{Command, Stdio};

/// stdout of `args` (in network namespace `ns`, else the caller's), or None when the tool is
/// missing or fails.
pub fn tool(ns: Option<&str>, args: &[&str]) -> Option<String> {
    let mut c = match ns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns]);
            c.args(args);
            c
        }
        None => {
            let mut c = Command::new(args[0]);
            c.args(&args[1..]);
            c
        }
    };
    let out = c.stderr(Stdio::null()).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

fn present(name: &str) -> bool {
    ["/usr/sbin", "/sbin", "/usr/bin", "/bin"]
        .iter()
        .any(|d| std::path::Path::new(d).join(name).exists())
}

/// The backend `--firewall auto` must pick here (the rule, applied to what this
/// system has): nftables when `iptables --version` names the nf_tables variant and `nft`
/// exists, or when there is no iptables but an `nft`; otherwise iptables.
pub fn auto_backend() -> &'static str {
    let version = tool(None, &["iptables", "--version"]);
    let nft = present("nft");
    match version {
        Some(v) if v.contains("(nf_tables)") && nft => "nftables",
        None if nft => "nftables",
        _ => "iptables",
    }
}

/// Our objects of both backends in one namespace.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Ours {
    /// `iptables|ip6tables <table> <line>` for every save line naming an `IPSEC-MESH-` chain.
    pub iptables: Vec<String>,
    /// The lines of `table inet ipsec-mesh` (trimmed, counters and blank lines dropped), or
    /// None when there is no such table (or no nft).
    pub nft: Option<Vec<String>>,
}

/// Our objects in `ns` (None: the caller's namespace).
pub fn ours(ns: Option<&str>) -> Ours {
    let mut iptables = Vec::new();
    for save in ["iptables-save", "ip6tables-save"] {
        let Some(text) = tool(ns, &[save]) else {
            continue;
        };
        let fam = save.trim_end_matches("-save");
        let mut table = "";
        for l in text.lines() {
            if let Some(t) = l.strip_prefix('*') {
                table = t;
            } else if l.contains("IPSEC-MESH-") {
                // Chain declarations carry counters: keep the name only.
                let line = match l.strip_prefix(':') {
                    Some(c) => format!(":{}", c.split_whitespace().next().unwrap_or("")),
                    None => l.to_string(),
                };
                iptables.push(format!("{fam} {table} {line}"));
            }
        }
    }
    iptables.sort();
    Ours {
        iptables,
        nft: nft_table(ns),
    }
}

/// The lines of `table inet ipsec-mesh` in `ns` (see [`Ours::nft`]); no process at all
/// without nft.
pub fn nft_table(ns: Option<&str>) -> Option<Vec<String>> {
    if !present("nft") {
        return None;
    }
    tool(ns, &["nft", "list", "table", "inet", "ipsec-mesh"]).map(|t| normalize(&t))
}

/// nft listing lines, trimmed, without counter values and blank lines.
pub fn normalize(listing: &str) -> Vec<String> {
    listing
        .lines()
        .map(|l| {
            let l = l.trim();
            match l.find(" counter packets ") {
                Some(i) => {
                    let rest = &l[i + " counter packets ".len()..];
                    // "<n> bytes <m>" then the rest of the rule.
                    let tail: Vec<&str> = rest.splitn(4, ' ').collect();
                    let after = tail.get(3).copied().unwrap_or("");
                    format!(
                        "{} counter{}{after}",
                        &l[..i],
                        if after.is_empty() { "" } else { " " }
                    )
                }
                None => l.to_string(),
            }
        })
        .filter(|l| !l.is_empty())
        .collect()
}

impl Ours {
    pub fn is_empty(&self) -> bool {
        self.iptables.is_empty() && self.nft.is_none()
    }

    /// Which backend's objects are there: "iptables", "nftables", "none" or "both".
    pub fn backend(&self) -> &'static str {
        match (self.iptables.is_empty(), self.nft.is_some()) {
            (true, false) => "none",
            (false, false) => "iptables",
            (true, true) => "nftables",
            (false, true) => "both",
        }
    }

    /// The marks and the fail-closed guard of `backend` are installed (IPv4 or IPv6 overlay
    /// `cidr`), and nothing of the other backend.
    #[track_caller]
    pub fn assert_installed(&self, backend: &str, cidr: &str) {
        let v6 = cidr.contains(':');
        assert_eq!(self.backend(), backend, "backend of our objects: {self:#?}");
        match backend {
            "iptables" => {
                let fam = if v6 { "ip6tables" } else { "iptables" };
                for want in [
                    format!("{fam} mangle :IPSEC-MESH-MARK"),
                    format!("{fam} mangle -A PREROUTING -j IPSEC-MESH-MARK"),
                    format!("{fam} mangle -A OUTPUT -j IPSEC-MESH-MARK"),
                    format!("{fam} filter :IPSEC-MESH-GUARD"),
                    format!("{fam} filter -A FORWARD -j IPSEC-MESH-GUARD"),
                    format!("{fam} filter -A OUTPUT -j IPSEC-MESH-GUARD"),
                ] {
                    assert!(self.iptables.contains(&want), "no `{want}`: {self:#?}");
                }
                assert!(
                    self.iptables.iter().any(|l| l
                        .starts_with(&format!("{fam} filter -A IPSEC-MESH-GUARD -d {cidr} "))
                        && l.ends_with("-m policy --dir out --pol none -j DROP")),
                    "no guard rule for {cidr}: {self:#?}"
                );
                assert!(
                    self.iptables.iter().any(|l| l.starts_with(&format!(
                        "{fam} mangle -A IPSEC-MESH-MARK -d {cidr} -j MARK --set-xmark"
                    ))),
                    "no mark rule for {cidr}: {self:#?}"
                );
            }
            "nftables" => {
                let t = self.nft.as_ref().unwrap();
                let ip = if v6 { "ip6" } else { "ip" };
                for want in [
                    "chain mark-pre {",
                    "type filter hook prerouting priority mangle; policy accept;",
                    "chain mark-out {",
                    "type route hook output priority mangle; policy accept;",
                    "chain guard-fwd {",
                    "type filter hook forward priority filter; policy accept;",
                    "chain guard-out {",
                    "type filter hook output priority filter; policy accept;",
                ] {
                    assert!(t.iter().any(|l| l == want), "no `{want}`: {t:#?}");
                }
                let guard = t
                    .iter()
                    .filter(|l| {
                        l.contains(&format!(" {ip} daddr {cidr} rt ipsec missing counter drop"))
                    })
                    .count();
                assert_eq!(guard, 2, "guard rules (forward, output) for {cidr}: {t:#?}");
                let mark = t
                    .iter()
                    .filter(|l| {
                        l.contains(&format!(
                            "{ip} daddr != @local {ip} daddr {cidr} meta mark set"
                        ))
                    })
                    .count();
                assert_eq!(
                    mark, 2,
                    "mark rules (prerouting, output) for {cidr}: {t:#?}"
                );
            }
            b => panic!("no objects to check for backend {b}"),
        }
    }

    /// Nothing of either backend is left.
    #[track_caller]
    pub fn assert_empty(&self) {
        assert!(self.is_empty(), "firewall objects of ours left: {self:#?}");
    }
}

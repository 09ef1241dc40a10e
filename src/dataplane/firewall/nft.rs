//! The nftables backend (`--firewall nftables`): the same marks and guard as the iptables
//! backend, in one table of our own, `table inet ipsec-mesh`, which is replaced whole in one
//! `nft -f` transaction (atomic: a packet sees the old rules or the new, never a mix). No
//! other table is ever read or written.
//!
//! The table, for an IPv4 overlay (`ip6` and `ipv6_addr` for IPv6):
//!
//! ```text
//! table inet ipsec-mesh {
//!     set local { type ipv4_addr; flags interval; elements = { <this host's subnets> } }
//!     chain mark-pre {    # before routing, so the mark selects table 1042 and the policy
//!         type filter hook prerouting priority mangle; policy accept;
//!         [iifname { <bridge>, <underlay> }] ip daddr != @local ip daddr <overlay>
//!             meta mark set meta mark & ~<mask> | <encrypt>
//!     }
//!     chain mark-out {    # `route` type: a mark set here re-routes the packet
//!         type route hook output priority mangle; policy accept;
//!         ip daddr != @local ip daddr <overlay> meta mark set ...
//!     }
//!     chain guard-fwd / guard-out {    # fail closed
//!         type filter hook forward|output priority filter; policy accept;
//!         meta mark & <mask> == <encrypt> ip daddr <overlay> rt ipsec missing drop
//!     }
//! }
//! ```
//!
//! The rule count is constant in the number of peers (the local subnets are one set), as for
//! iptables ([`super`] explains which packets get the mark and why that is correct). The guard
//! is the iptables backend's `-m policy --dir out --pol none`: on the output and forward
//! hooks the route lookup has already been through XFRM, so `rt ipsec missing` is true
//! exactly for a packet that no IPsec policy will encapsulate.
//!
//! "0 writes when unchanged": nft prints a ruleset in its own canonical form (it folds mark
//! arithmetic, reorders set elements), so the desired table is compared in that form: it is
//! loaded once into a private, empty network namespace (`unshare -n`) and listed there, and the
//! live table is rewritten only when its listing (counters aside) differs.

use std::io::Write;
use std::process::{Command, Stdio};
use std::sync::Mutex;

use super::{Family, FirewallError, FirewallReport, FirewallSpec};
use crate::dataplane::report::Change;

/// Our table (family `inet`).
pub const TABLE: &str = "ipsec-mesh";

fn hex(v: u32) -> String {
    format!("0x{v:08x}")
}

/// The table's body as `nft -f` input (pure). The spec must be valid. A dual-stack spec
/// renders each of its [`FirewallSpec::parts`] into the same chains (a rule per family), with
/// a set of local subnets per family (`local`, and `local6` / `local4` for the second).
pub fn render(spec: &FirewallSpec) -> String {
    let m = spec.marks;
    let devs = spec.devices();
    let iif = match devs.as_slice() {
        [] => String::new(),
        [d] => format!("iifname \"{d}\" "),
        ds => {
            let q: Vec<String> = ds.iter().map(|d| format!("\"{d}\"")).collect();
            format!("iifname {{ {} }} ", q.join(", "))
        }
    };
    let set_mark = format!(
        "meta mark set meta mark & {} | {}",
        hex(!m.mask),
        hex(m.encrypt)
    );
    // Route mode: traffic routed into the mesh's XFRM interfaces is encrypted by them on
    // transmit (or dropped), never sent in clear; see the iptables guard in `render`.
    let oif = match &spec.tunnel_devices {
        Some(prefix) => format!("oifname != \"{prefix}*\" "),
        None => String::new(),
    };
    let (mut sets, mut marks, mut pre, mut guards) = (String::new(), vec![], vec![], vec![]);
    for (i, part) in spec.parts().iter().enumerate() {
        let (ip, addr_type, second) = match part.family() {
            Family::V4 => ("ip", "ipv4_addr", "local4"),
            Family::V6 => ("ip6", "ipv6_addr", "local6"),
        };
        let set = if i == 0 { "local" } else { second };
        let overlay = part.overlay.trunc();
        let local = super::render::local_exclusions(part);
        let elements = if local.is_empty() {
            String::new()
        } else {
            let list: Vec<String> = local.iter().map(ToString::to_string).collect();
            format!("\n\t\telements = {{ {} }}", list.join(", "))
        };
        sets.push_str(&format!(
            "\tset {set} {{\n\t\ttype {addr_type}\n\t\tflags interval{elements}\n\t}}\n"
        ));
        let mark = format!("{ip} daddr != @{set} {ip} daddr {overlay} {set_mark} counter");
        pre.push(format!("{iif}{mark}"));
        marks.push(mark);
        guards.push(format!(
            "meta mark & {} == {} {ip} daddr {overlay} {oif}rt ipsec missing counter drop",
            hex(m.mask),
            hex(m.encrypt)
        ));
    }
    // Route mode: the reverse-path check on the mesh's XFRM interfaces (see
    // `crate::dataplane::xfrmi`): `fib saddr . iif oif` looks the source up as a destination
    // (no mark: the route mode's rule selects its table by destination) and is "missing"
    // unless the answer goes out of the interface the packet came in on. Before conntrack
    // (priority raw): a spoofed packet leaves no state. One rule, both families.
    let rpf = match &spec.tunnel_devices {
        Some(prefix) => format!(
            "\tchain rpf {{\n\t\ttype filter hook prerouting priority raw; policy accept;\n\t\t\
             iifname \"{prefix}*\" fib saddr . iif oif missing counter drop\n\t}}\n"
        ),
        None => String::new(),
    };
    let rules = |v: &[String]| v.join("\n\t\t");
    format!(
        "table inet {TABLE} {{\n\
         \tcomment \"owned by ipsec-mesh: replaced whole on every change\"\n\
         {rpf}\
         {sets}\
         \tchain mark-pre {{\n\t\ttype filter hook prerouting priority mangle; policy accept;\n\t\t{}\n\t}}\n\
         \tchain mark-out {{\n\t\ttype route hook output priority mangle; policy accept;\n\t\t{}\n\t}}\n\
         \tchain guard-fwd {{\n\t\ttype filter hook forward priority filter; policy accept;\n\t\t{}\n\t}}\n\
         \tchain guard-out {{\n\t\ttype filter hook output priority filter; policy accept;\n\t\t{}\n\t}}\n\
         }}\n",
        rules(&pre),
        rules(&marks),
        rules(&guards),
        rules(&guards)
    )
}

/// One transaction that replaces our table by `body` (creating it first, so the delete
/// never fails), touching nothing else.
pub fn transaction(body: &str) -> String {
    format!("table inet {TABLE}\ndelete table inet {TABLE}\n{body}")
}

/// A listing without what changes by itself (packet and byte counters) and blank lines.
pub fn normalize(listing: &str) -> String {
    let mut out = String::new();
    for line in listing.lines() {
        let t = line.trim();
        if t.is_empty() {
            continue;
        }
        let mut words: Vec<&str> = Vec::new();
        let mut it = t.split_whitespace().peekable();
        while let Some(w) = it.next() {
            words.push(w);
            if w == "counter" && it.peek() == Some(&"packets") {
                it.nth(3); // packets N bytes M
            }
        }
        out.push_str(&words.join(" "));
        out.push('\n');
    }
    out
}

/// Runs `nft`.
#[derive(Debug, Clone)]
pub struct Nft {
    pub binary: String,
}

impl Default for Nft {
    fn default() -> Nft {
        Nft {
            binary: "nft".into(),
        }
    }
}

/// Desired body -> its canonical listing (one entry: the sidecar's current plan).
static CANONICAL: Mutex<Option<(String, String)>> = Mutex::new(None);

impl Nft {
    fn spawn_error(&self, program: &str, e: &std::io::Error) -> FirewallError {
        if e.kind() == std::io::ErrorKind::NotFound && program == self.binary {
            FirewallError::MissingNft
        } else {
            FirewallError::Nft {
                command: program.to_string(),
                stderr: e.to_string(),
            }
        }
    }

    /// Run `program args` with `input` on stdin; stdout, or the error with nft's words.
    fn run(&self, program: &str, args: &[&str], input: &str) -> Result<String, FirewallError> {
        let mut child = Command::new(program)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| self.spawn_error(program, &e))?;
        if let Some(mut stdin) = child.stdin.take() {
            stdin
                .write_all(input.as_bytes())
                .map_err(|e| self.spawn_error(program, &e))?;
        }
        let out = child
            .wait_with_output()
            .map_err(|e| self.spawn_error(program, &e))?;
        if !out.status.success() {
            return Err(FirewallError::Nft {
                command: format!("{program} {}", args.join(" ")),
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            });
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Our table's listing, or None when it does not exist.
    pub fn list(&self) -> Result<Option<String>, FirewallError> {
        self.list_named(TABLE)
    }

    /// The listing of table `inet <table>`, or None when it does not exist.
    pub fn list_named(&self, table: &str) -> Result<Option<String>, FirewallError> {
        match self.run(&self.binary, &["list", "table", "inet", table], "") {
            Ok(s) => Ok(Some(s)),
            Err(FirewallError::Nft { stderr, .. })
                if stderr.contains("No such file or directory") =>
            {
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    /// Load `input` (`nft -f -`: one transaction).
    pub fn load(&self, input: &str) -> Result<(), FirewallError> {
        self.run(&self.binary, &["-f", "-"], input).map(|_| ())
    }

    /// Delete table `inet <table>`.
    pub fn delete_named(&self, table: &str) -> Result<(), FirewallError> {
        self.run(&self.binary, &["delete", "table", "inet", table], "")
            .map(|_| ())
    }

    /// How nft lists `body` once loaded: loaded and listed in a private, empty network
    /// namespace, so nothing of the host's ruleset is touched.
    pub fn canonical(&self, body: &str) -> Result<String, FirewallError> {
        self.canonical_named(TABLE, body, &CANONICAL)
    }

    /// [`Nft::canonical`] of a body defining table `inet <table>`, remembered in `cache`.
    pub fn canonical_named(
        &self,
        table: &str,
        body: &str,
        cache: &Mutex<Option<(String, String)>>,
    ) -> Result<String, FirewallError> {
        if let Ok(c) = cache.lock() {
            if let Some((b, l)) = c.as_ref() {
                if b == body {
                    return Ok(l.clone());
                }
            }
        }
        let script = format!(
            "{nft} -f - && {nft} list table inet {table}",
            nft = self.binary
        );
        let listing = self.run("unshare", &["--net", "--", "sh", "-c", &script], body)?;
        let n = normalize(&listing);
        if let Ok(mut c) = cache.lock() {
            *c = Some((body.to_string(), n.clone()));
        }
        Ok(n)
    }

    /// Make our table match `spec`: 0 writes when it already does, else one transaction.
    pub fn apply(&self, spec: &FirewallSpec) -> Result<FirewallReport, FirewallError> {
        spec.validate()?;
        let body = render(spec);
        let want = self.canonical(&body)?;
        let live = self.list()?;
        if live.as_deref().map(normalize).as_deref() == Some(want.as_str()) {
            return Ok(FirewallReport::default());
        }
        self.run(&self.binary, &["-f", "-"], &transaction(&body))?;
        let object = format!("nftables table inet {TABLE}");
        let what = Some("4 chains: mark and guard".to_string());
        Ok(FirewallReport {
            writes: 1,
            changes: vec![match live {
                Some(_) => Change::update(super::LAYER, object, Some("other rules".into()), what),
                None => Change::add(super::LAYER, format!("{object} (4 chains: mark and guard)")),
            }],
            ..FirewallReport::default()
        })
    }

    /// Delete our table if it exists.
    pub fn cleanup(&self) -> Result<FirewallReport, FirewallError> {
        self.drop_table(TABLE)
    }

    /// Delete table `inet <table>` if it exists (1 write, or 0).
    pub fn drop_table(&self, table: &str) -> Result<FirewallReport, FirewallError> {
        if self.list_named(table)?.is_none() {
            return Ok(FirewallReport::default());
        }
        self.delete_named(table)?;
        Ok(FirewallReport {
            writes: 1,
            changes: vec![Change::delete(
                super::LAYER,
                format!("nftables table inet {table}"),
            )],
            ..FirewallReport::default()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::Marks;

    fn spec(overlay: &str, local: &[&str], devs: (Option<&str>, Option<&str>)) -> FirewallSpec {
        FirewallSpec {
            other_overlay: None,
            marks: Marks::default(),
            overlay: overlay.parse().unwrap(),
            remote_subnets: vec![],
            local_subnets: local.iter().map(|s| s.parse().unwrap()).collect(),
            bridge_dev: devs.0.map(String::from),
            underlay_dev: devs.1.map(String::from),
            tunnel_devices: None,
        }
    }

    #[test]
    fn a_dual_stack_spec_renders_a_rule_of_each_family_per_chain() {
        let mut s = spec(
            "10.42.0.0/16",
            &["10.42.1.0/24", "fd42:0:0:1::/64"],
            (Some("cbr0"), None),
        );
        s.other_overlay = Some("fd42::/48".parse().unwrap());
        s.validate().unwrap();
        let r = render(&s);
        assert!(r.contains("set local {\n\t\ttype ipv4_addr\n\t\tflags interval\n\t\telements = { 10.42.1.0/24 }"), "{r}");
        assert!(r.contains("set local6 {\n\t\ttype ipv6_addr\n\t\tflags interval\n\t\telements = { fd42:0:0:1::/64 }"), "{r}");
        assert!(
            r.contains("iifname \"cbr0\" ip daddr != @local ip daddr 10.42.0.0/16 meta mark set"),
            "{r}"
        );
        assert!(
            r.contains("iifname \"cbr0\" ip6 daddr != @local6 ip6 daddr fd42::/48 meta mark set"),
            "{r}"
        );
        assert_eq!(
            r.matches("meta mark set").count(),
            4,
            "mark-pre and mark-out, each family: {r}"
        );
        assert_eq!(
            r.matches("rt ipsec missing").count(),
            4,
            "both guards, each family: {r}"
        );
        assert!(
            r.contains("ip6 daddr fd42::/48 rt ipsec missing counter drop"),
            "{r}"
        );
        // A single-family spec renders exactly as before (no rewrite of a live table).
        let one = spec("10.42.0.0/16", &["10.42.1.0/24"], (Some("cbr0"), None));
        assert!(!render(&one).contains("local6"));
        assert_eq!(render(&one).matches("meta mark set").count(), 2);
        // Two cidrs of one family, or a subnet of neither family, are refused.
        let mut bad = s.clone();
        bad.other_overlay = Some("10.43.0.0/16".parse().unwrap());
        assert!(bad
            .validate()
            .unwrap_err()
            .to_string()
            .contains("of one family"));
        let mut bad = one.clone();
        bad.local_subnets.push("fd42:0:0:1::/64".parse().unwrap());
        assert!(bad
            .validate()
            .unwrap_err()
            .to_string()
            .contains("is not IPv4 like the overlay"));
    }

    #[test]
    fn render_has_constant_rules_and_the_guard() {
        let r = render(&spec(
            "10.42.0.0/16",
            &["10.42.1.0/24"],
            (Some("cbr0"), Some("eth0")),
        ));
        assert!(r.contains("elements = { 10.42.1.0/24 }"), "{r}");
        assert!(r.contains("iifname { \"cbr0\", \"eth0\" } ip daddr != @local ip daddr 10.42.0.0/16 meta mark set meta mark & 0xffcfffff | 0x00100000 counter"), "{r}");
        assert!(r.contains("meta mark & 0x00300000 == 0x00100000 ip daddr 10.42.0.0/16 rt ipsec missing counter drop"), "{r}");
        assert_eq!(r.matches("rt ipsec missing").count(), 2);
        assert_eq!(r.matches("meta mark set").count(), 2);
        assert!(r.contains("type route hook output priority mangle"));

        let v6 = render(&spec("fd42::/48", &[], (None, None)));
        assert!(v6.contains("type ipv6_addr"), "{v6}");
        assert!(!v6.contains("elements"), "{v6}");
        assert!(
            v6.contains("\t\tip6 daddr != @local ip6 daddr fd42::/48 meta mark set"),
            "{v6}"
        );
        let routed = render(
            &spec("10.42.0.0/16", &[], (None, None)).with_tunnel_devices(Some("imx".into())),
        );
        assert_eq!(
            routed
                .matches("ip daddr 10.42.0.0/16 oifname != \"imx*\" rt ipsec missing counter drop")
                .count(),
            2,
            "{routed}"
        );
        assert!(
            routed.contains(
                "\tchain rpf {\n\t\ttype filter hook prerouting priority raw; policy accept;\n\t\t\
                 iifname \"imx*\" fib saddr . iif oif missing counter drop\n\t}\n"
            ),
            "{routed}"
        );
        assert_eq!(routed.matches("fib saddr").count(), 1, "{routed}");
        assert!(
            !v6.contains("fib "),
            "no reverse-path rule in policy mode: {v6}"
        );
        assert!(transaction(&v6).starts_with(
            "table inet ipsec-mesh\ndelete table inet ipsec-mesh\ntable inet ipsec-mesh {"
        ));
    }

    #[test]
    fn normalize_drops_counters_and_blank_lines() {
        let l = "table inet x {\n\n\tchain c {\n\t\tip daddr 1.2.3.4 counter packets 12 bytes 3400 drop\n\t}\n}\n";
        assert_eq!(
            normalize(l),
            "table inet x {\nchain c {\nip daddr 1.2.3.4 counter drop\n}\n}\n"
        );
    }
}

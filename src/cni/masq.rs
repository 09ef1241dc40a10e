//! Masquerade for container traffic that leaves the mesh (the bridge's `ipMasq`).
//!
//! One nftables table per network, `inet ipsec_mesh_masq_<hash>`, owned by the plugin and by
//! nothing else: a `srcnat` chain with a single rule
//!
//! ```text
//! ip saddr @src4 ip daddr != @mesh4 masquerade      (and the same for ip6)
//! ```
//!
//! `src4` holds this host's container subnets; `mesh4` the mesh: the overlay CIDR, every
//! host's subnets, every host's underlay (`agent_ip`) and VTEP address. Mesh traffic thus
//! keeps its source address (the XFRM policies match on it), anything else leaves with the
//! host's. The cost per packet is one rule and two set look-ups whatever the number of
//! containers or hosts; nothing is added per container.
//!
//! Why nftables and a table of its own: the reference bridge's `ipMasq` adds an iptables
//! chain and rule per container (O(containers) rules in POSTROUTING); on this kind of host
//! iptables is the nf_tables variant anyway, and a table the plugin owns can be replaced in
//! one atomic transaction (`nft -f`) and removed without touching anyone else's rules,
//! whichever firewall backend the sidecar uses.
//!
//! Life cycle: every ADD rewrites the table from the metadata in one transaction (so a host
//! that joined the mesh is exempt from the next container start on); the DEL that leaves the
//! bridge without ports deletes it. Both happen under an exclusive lock ([`lock`]: an abstract
//! unix socket of the host's network namespace), and ADD attaches its veth before it takes
//! the lock, so a DEL never deletes the table under a container that needs it.

use std::io::Write;
use std::net::IpAddr;
use std::process::{Command, Stdio};

use ipnet::IpNet;

use super::spec::{code, CniError};

/// What the table holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MasqSpec {
    pub table: String,
    /// Sources to masquerade: this host's container subnets.
    pub sources: Vec<IpNet>,
    /// Destinations never masqueraded: the mesh.
    pub exempt: Vec<IpNet>,
}

/// The table of network `network`: `ipsec_mesh_masq_` + 12 hex digits of its SHA-256 (CNI
/// network names may hold characters nft identifiers do not).
pub fn table_name(network: &str) -> String {
    let d = ring::digest::digest(&ring::digest::SHA256, network.as_bytes());
    let hex: String = d.as_ref().iter().map(|b| format!("{b:02x}")).collect();
    format!("ipsec_mesh_masq_{}", &hex[..12])
}

/// A host address as a prefix.
pub fn host_prefix(ip: IpAddr) -> IpNet {
    IpNet::from(ip)
}

/// Sorted, without prefixes inside another one (nft refuses overlapping interval elements).
pub fn aggregate(v: &[IpNet]) -> Vec<IpNet> {
    let mut v: Vec<IpNet> = v.iter().map(IpNet::trunc).collect();
    v.sort_by_key(|n| (n.addr().is_ipv6(), n.prefix_len(), n.network()));
    v.dedup();
    let mut out: Vec<IpNet> = Vec::new();
    for n in v {
        if !out.iter().any(|o| o.contains(&n)) {
            out.push(n);
        }
    }
    out.sort();
    out
}

fn elements(v: &[IpNet], v4: bool) -> Vec<String> {
    v.iter()
        .filter(|n| n.addr().is_ipv4() == v4)
        .map(ToString::to_string)
        .collect()
}

/// The nft script that replaces the table atomically (pure).
pub fn render(spec: &MasqSpec) -> String {
    let sources = aggregate(&spec.sources);
    let exempt = aggregate(&spec.exempt);
    let t = &spec.table;
    let mut body = String::new();
    let mut rules = String::new();
    for (v4, fam, ty) in [(true, "ip", "ipv4_addr"), (false, "ip6", "ipv6_addr")] {
        let src = elements(&sources, v4);
        if src.is_empty() {
            continue;
        }
        let n = if v4 { "4" } else { "6" };
        body.push_str(&format!(
            "  set src{n} {{ type {ty}; flags interval; elements = {{ {} }} }}\n",
            src.join(", ")
        ));
        let mesh = elements(&exempt, v4);
        if mesh.is_empty() {
            rules.push_str(&format!("    {fam} saddr @src{n} masquerade\n"));
        } else {
            body.push_str(&format!(
                "  set mesh{n} {{ type {ty}; flags interval; elements = {{ {} }} }}\n",
                mesh.join(", ")
            ));
            rules.push_str(&format!(
                "    {fam} saddr @src{n} {fam} daddr != @mesh{n} masquerade\n"
            ));
        }
    }
    format!(
        "table inet {t} {{}}\ndelete table inet {t}\ntable inet {t} {{\n{body}  chain postrouting {{\n    type nat hook postrouting priority srcnat; policy accept;\n{rules}  }}\n}}\n"
    )
}

/// The nft script that removes the table (idempotent; pure).
pub fn render_delete(table: &str) -> String {
    format!("table inet {table} {{}}\ndelete table inet {table}\n")
}

fn nft_program() -> &'static str {
    ["/usr/sbin/nft", "/sbin/nft", "/usr/bin/nft"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
        .unwrap_or("nft")
}

/// Run an nft script (one transaction).
pub fn run(script: &str) -> Result<(), CniError> {
    let prog = nft_program();
    let fail = |m: String| CniError::new(code::NETLINK, format!("masquerade (ipMasq): {m}"));
    let mut child = Command::new(prog)
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| {
            fail(format!(
                "cannot run {prog}: {e} (install nftables or set ipMasq false)"
            ))
        })?;
    if let Some(mut i) = child.stdin.take() {
        let _ = i.write_all(script.as_bytes());
    }
    let out = child
        .wait_with_output()
        .map_err(|e| fail(format!("waiting for {prog}: {e}")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(fail(format!(
            "{prog} -f refused the table ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
        .with_details(script.to_string()))
    }
}

/// How long ADD or DEL waits for another plugin process's masquerade update.
pub const LOCK_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// A lock on `table`, held while the returned socket lives: an abstract unix socket
/// `@ipsec-mesh/<table>` bound in the host's network namespace. Abstract names belong to the
/// network namespace, as the table does, so the lock has exactly the table's scope, leaves no
/// file behind and is released by the kernel when the process ends, however it ends.
pub fn lock(table: &str) -> Result<std::os::unix::net::UnixListener, CniError> {
    use std::os::linux::net::SocketAddrExt;
    use std::os::unix::net::{SocketAddr, UnixListener};
    let name = format!("ipsec-mesh/{table}");
    let addr = SocketAddr::from_abstract_name(name.as_bytes())
        .map_err(|e| CniError::new(code::IO, format!("masquerade lock @{name}: {e}")))?;
    let start = std::time::Instant::now();
    let mut pause = std::time::Duration::from_millis(1);
    loop {
        match UnixListener::bind_addr(&addr) {
            Ok(l) => return Ok(l),
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
                if start.elapsed() >= LOCK_TIMEOUT {
                    return Err(CniError::new(
                        code::TRY_AGAIN,
                        format!(
                            "masquerade lock @{name}: still held by another plugin process after {}s",
                            LOCK_TIMEOUT.as_secs()
                        ),
                    ));
                }
                std::thread::sleep(pause);
                pause = (pause * 2).min(std::time::Duration::from_millis(20));
            }
            Err(e) => {
                return Err(CniError::new(
                    code::IO,
                    format!("masquerade lock @{name}: {e}"),
                ))
            }
        }
    }
}

/// The mesh's exempt destinations and this host's sources, from the metadata.
pub fn from_cluster(cluster: &crate::model::Cluster, self_id: &str) -> (Vec<IpNet>, Vec<IpNet>) {
    let mut exempt = cluster.network.cidrs.clone();
    let mut sources = Vec::new();
    for h in &cluster.hosts {
        exempt.extend(h.subnets.iter().copied());
        exempt.push(host_prefix(h.agent_ip));
        if let Some(v) = h.vtep {
            exempt.push(host_prefix(v));
        }
        if h.id.as_str() == self_id {
            sources.extend(h.subnets.iter().copied());
        }
    }
    (sources, exempt)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nets(v: &[&str]) -> Vec<IpNet> {
        v.iter().map(|s| s.parse().unwrap()).collect()
    }

    #[test]
    fn the_lock_excludes_a_second_holder_until_dropped() {
        let t = format!("test_{}", std::process::id());
        let held = lock(&t).unwrap();
        let t2 = t.clone();
        let waiter = std::thread::spawn(move || {
            let start = std::time::Instant::now();
            let _l = lock(&t2).unwrap();
            start.elapsed()
        });
        std::thread::sleep(std::time::Duration::from_millis(100));
        drop(held);
        let waited = waiter.join().unwrap();
        assert!(waited >= std::time::Duration::from_millis(90), "{waited:?}");
    }

    #[test]
    fn names_fit_and_differ() {
        let a = table_name("ipsec-mesh");
        assert_eq!(a, table_name("ipsec-mesh"));
        assert_ne!(a, table_name("ipsec_mesh"));
        assert!(a.starts_with("ipsec_mesh_masq_") && a.len() == 28, "{a}");
    }

    #[test]
    fn nested_prefixes_are_dropped() {
        assert_eq!(
            aggregate(&nets(&[
                "10.42.1.0/24",
                "10.42.0.0/16",
                "192.168.77.1/32",
                "10.42.2.7/24",
                "fd42::/48",
                "fd42:0:0:1::/64",
                "192.168.77.1/32"
            ])),
            nets(&["10.42.0.0/16", "192.168.77.1/32", "fd42::/48"])
        );
    }

    #[test]
    fn one_rule_per_family_whatever_the_mesh_size() {
        let mut exempt = nets(&["10.42.0.0/16"]);
        for i in 1..=200u32 {
            exempt.push(
                format!("192.168.{}.{}/32", i / 250, i % 250)
                    .parse()
                    .unwrap(),
            );
        }
        let s = render(&MasqSpec {
            table: "t".into(),
            sources: nets(&["10.42.1.0/24"]),
            exempt,
        });
        assert!(
            s.starts_with("table inet t {}\ndelete table inet t\ntable inet t {\n"),
            "{s}"
        );
        assert!(
            s.contains("set src4 { type ipv4_addr; flags interval; elements = { 10.42.1.0/24 } }"),
            "{s}"
        );
        assert!(s.contains("type nat hook postrouting priority srcnat; policy accept;"));
        assert_eq!(s.matches("masquerade").count(), 1, "{s}");
        assert!(
            s.contains("ip saddr @src4 ip daddr != @mesh4 masquerade"),
            "{s}"
        );
        assert!(!s.contains("ip6"), "no IPv6 sources, no IPv6 rule: {s}");
        // IPv6 sources get their own rule; a family without exempt prefixes masquerades all.
        let s = render(&MasqSpec {
            table: "t".into(),
            sources: nets(&["10.42.1.0/24", "fd42:0:0:1::/64"]),
            exempt: nets(&["10.42.0.0/16"]),
        });
        assert!(s.contains("ip6 saddr @src6 masquerade"), "{s}");
        assert_eq!(render_delete("t"), "table inet t {}\ndelete table inet t\n");
    }

    #[test]
    fn the_cluster_gives_sources_and_the_whole_mesh() {
        let raw = serde_json::json!({
            "network": {"cidr": "10.42.0.0/16"},
            "hosts": [
                {"id": "a", "agent_ip": "192.0.2.1", "subnets": ["10.42.1.0/24"]},
                {"id": "b", "agent_ip": "192.0.2.2", "subnets": ["10.42.2.0/24"], "vtep": "10.42.200.2"}
            ]
        });
        let raw: crate::model::RawCluster = serde_json::from_value(raw).unwrap();
        let c = crate::model::Cluster::validate(&raw).unwrap();
        let (src, exempt) = from_cluster(&c, "a");
        assert_eq!(src, nets(&["10.42.1.0/24"]));
        // Subnets and VTEPs lie inside the overlay CIDR (validated), the underlay does not.
        assert!(exempt.contains(&"10.42.200.2/32".parse().unwrap()));
        assert_eq!(
            aggregate(&exempt),
            nets(&["10.42.0.0/16", "192.0.2.1/32", "192.0.2.2/32"])
        );
    }
}

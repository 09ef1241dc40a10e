//! Pure: spec -> desired state per table; (current, desired) -> changes -> `iptables-restore`
//! input. Rules are kept in the exact text `iptables-save` prints, so comparing a parsed dump
//! with the desired state is string equality.

use std::collections::BTreeMap;
use std::fmt;

use ipnet::IpNet;

use super::{
    is_owned_chain, FirewallSpec, Table, BUILTIN_CHAINS, GUARD_CHAIN, MARK_CHAIN, PRE_CHAIN,
    RPF_CHAIN,
};

/// A rule in a chain we do not own whose target is one of our chains.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Jump {
    /// The chain holding the rule (`PREROUTING`).
    pub from: String,
    /// The rule as `iptables-save` prints it after `-A <from> ` (`-j IPSEC-MESH-MARK`).
    pub rule: String,
}

impl Jump {
    fn to(from: &str, chain: &str) -> Jump {
        Jump {
            from: from.to_string(),
            rule: format!("-j {chain}"),
        }
    }
    fn is_from_builtin(&self) -> bool {
        BUILTIN_CHAINS.contains(&self.from.as_str())
    }
}

/// Our part of one table: our chains with their rules, and the jumps into them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TableState {
    /// Owned chain -> its rules, in order, each as printed after `-A <chain> `.
    pub chains: BTreeMap<String, Vec<String>>,
    /// Jumps into owned chains, in dump order.
    pub jumps: Vec<Jump>,
}

impl TableState {
    pub fn is_empty(&self) -> bool {
        self.chains.is_empty() && self.jumps.is_empty()
    }
}

/// One write of a reconcile.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// Declare the chain (creating or flushing it) and append these rules.
    Fill {
        chain: String,
        rules: Vec<String>,
        created: bool,
    },
    /// `-D <from> <rule>` (one occurrence).
    DeleteJump(Jump),
    /// `-I <from> 1 <rule>`.
    InsertJump(Jump),
    /// Flush and delete an owned chain.
    DeleteChain(String),
}

impl fmt::Display for Change {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Change::Fill {
                chain,
                rules,
                created,
            } => write!(
                f,
                "{} chain {chain} ({} rule{})",
                if *created { "create" } else { "refill" },
                rules.len(),
                if rules.len() == 1 { "" } else { "s" }
            ),
            Change::DeleteJump(j) => write!(f, "delete jump `-A {} {}`", j.from, j.rule),
            Change::InsertJump(j) => write!(f, "insert jump `-I {} 1 {}`", j.from, j.rule),
            Change::DeleteChain(c) => write!(f, "delete chain {c}"),
        }
    }
}

/// Hex as iptables prints marks.
fn hex(v: u32) -> String {
    format!("{v:#x}")
}

/// `--mark value[/mask]` as iptables-save prints it (no mask when it is all ones).
fn mark_match(value: u32, mask: u32) -> String {
    if mask == u32::MAX {
        hex(value)
    } else {
        format!("{}/{}", hex(value), hex(mask))
    }
}

/// Remote subnets, host bits cleared, deduplicated and aggregated into the fewest prefixes.
pub fn aggregate(nets: &[IpNet]) -> Vec<IpNet> {
    let v: Vec<IpNet> = nets.iter().map(IpNet::trunc).collect();
    IpNet::aggregate(&v)
}

/// The local subnets that lie in (or cover part of) the overlay, host bits cleared and
/// aggregated: the only destinations inside the overlay that are never marked.
pub fn local_exclusions(spec: &FirewallSpec) -> Vec<IpNet> {
    let overlay = spec.overlay.trunc();
    aggregate(&spec.local_subnets)
        .into_iter()
        .filter(|l| overlay.contains(l) || l.contains(&overlay))
        .collect()
}

/// The mark chain: `RETURN` for each local exclusion, then one `MARK` rule for the whole
/// overlay. Its length depends on this host's subnets only, never on the peers (see the
/// module docs of [`super`] for why marking the whole overlay is correct).
fn mark_rules(spec: &FirewallSpec, set: &str) -> Vec<String> {
    let mut rules: Vec<String> = local_exclusions(spec)
        .iter()
        .map(|l| format!("-d {l} -j RETURN"))
        .collect();
    rules.push(format!("-d {} {set}", spec.overlay.trunc()));
    rules
}

/// The desired state of each table for `spec` (validate the spec first).
pub fn desired(spec: &FirewallSpec) -> BTreeMap<Table, TableState> {
    let m = spec.marks;
    let set = format!("-j MARK --set-xmark {}/{}", hex(m.encrypt), hex(m.mask));

    let mut mangle = TableState::default();
    mangle
        .chains
        .insert(MARK_CHAIN.to_string(), mark_rules(spec, &set));

    let devs = spec.devices();
    if devs.is_empty() {
        mangle.jumps.push(Jump::to("PREROUTING", MARK_CHAIN));
    } else {
        let pre = devs
            .iter()
            .map(|d| format!("-i {d} -j {MARK_CHAIN}"))
            .collect();
        mangle.chains.insert(PRE_CHAIN.to_string(), pre);
        mangle.jumps.push(Jump::to("PREROUTING", PRE_CHAIN));
    }
    mangle.jumps.push(Jump::to("OUTPUT", MARK_CHAIN));
    // Route mode: the reverse-path check on the mesh's XFRM interfaces (xt_rpfilter, which
    // only PREROUTING of raw or mangle may hold): a decrypted packet whose source does not
    // route back out of the interface it came in on is dropped. One rule per family.
    if let Some(prefix) = &spec.tunnel_devices {
        mangle.chains.insert(
            RPF_CHAIN.to_string(),
            vec![format!("-i {prefix}+ -m rpfilter --invert -j DROP")],
        );
        mangle.jumps.push(Jump::to("PREROUTING", RPF_CHAIN));
    }

    // Marked packets only ever go to the overlay (the mark chain marks nothing else); the
    // guard is one rule whatever the number of peers. The encrypted
    // (outer) packet still carries the mark when it passes OUTPUT again, but goes to a peer's
    // underlay address, outside the overlay, so `-d <overlay>` lets it through.
    //
    // Route mode: marked packets routed into the mesh's XFRM interfaces (`! -o imx+`: one
    // interface-name comparison, built into iptables, no extension) have no policy when the
    // guard sees them: the interface encrypts them with its own id on transmit, and drops
    // what it cannot encrypt (no policy or SA for its id), so they never leave in clear. Any
    // other marked packet to the overlay without a policy is still dropped.
    let oif = match &spec.tunnel_devices {
        Some(prefix) => format!(" ! -o {prefix}+"),
        None => String::new(),
    };
    let mut filter = TableState::default();
    filter.chains.insert(
        GUARD_CHAIN.to_string(),
        vec![format!(
            "-d {}{oif} -m mark --mark {} -m policy --dir out --pol none -j DROP",
            spec.overlay.trunc(),
            mark_match(m.encrypt, m.mask)
        )],
    );
    filter.jumps.push(Jump::to("FORWARD", GUARD_CHAIN));
    filter.jumps.push(Jump::to("OUTPUT", GUARD_CHAIN));

    BTreeMap::from([(Table::Mangle, mangle), (Table::Filter, filter)])
}

/// The writes that turn `current` into `desired`; empty when they are equal.
///
/// Order: fills (so jump targets exist), jump deletions, jump insertions, chain deletions.
/// Jumps from built-in chains that are not desired (duplicates, extra matches, stale
/// targets) are deleted; a jump from a foreign user chain is deleted only when its target
/// chain goes (the chain could not be deleted otherwise).
pub fn diff_table(current: &TableState, desired: &TableState) -> Vec<Change> {
    let mut out = Vec::new();
    for (chain, rules) in &desired.chains {
        match current.chains.get(chain) {
            Some(have) if have == rules => {}
            have => out.push(Change::Fill {
                chain: chain.clone(),
                rules: rules.clone(),
                created: have.is_none(),
            }),
        }
    }
    let doomed: Vec<&String> = current
        .chains
        .keys()
        .filter(|c| !desired.chains.contains_key(*c))
        .collect();

    let mut pool: Vec<&Jump> = current.jumps.iter().collect();
    let mut inserts = Vec::new();
    for want in &desired.jumps {
        match pool.iter().position(|j| *j == want) {
            Some(i) => {
                pool.remove(i);
            }
            None => inserts.push(Change::InsertJump(want.clone())),
        }
    }
    for j in pool {
        let target = jump_target(&j.rule);
        let target_doomed = doomed.iter().any(|c| target.as_deref() == Some(c.as_str()));
        if j.is_from_builtin() || target_doomed {
            out.push(Change::DeleteJump(j.clone()));
        }
    }
    out.extend(inserts);
    out.extend(doomed.into_iter().map(|c| Change::DeleteChain(c.clone())));
    out
}

/// The chain a rule jumps or goes to (`-j X` / `-g X`), if any.
/// Quoted words (`--comment "a -j b"`) are single tokens and never mistaken for a target.
pub fn jump_target(rule: &str) -> Option<String> {
    let toks = super::save::tokens(rule);
    let mut it = toks.into_iter();
    while let Some(t) = it.next() {
        if matches!(t.as_str(), "-j" | "-g" | "--jump" | "--goto") {
            return it.next();
        }
    }
    None
}

/// `iptables-restore --noflush` input applying `changes` to `table` in one transaction.
/// Built-in chains are never declared (declaring would reset their policy and counters).
pub fn render_restore(table: Table, changes: &[Change]) -> String {
    let mut s = format!("*{}\n", table.as_str());
    for c in changes {
        if let Change::Fill { chain, rules, .. } = c {
            debug_assert!(is_owned_chain(chain));
            s += &format!(":{chain} - [0:0]\n-F {chain}\n");
            for r in rules {
                s += &format!("-A {chain} {r}\n");
            }
        }
    }
    for c in changes {
        match c {
            Change::DeleteJump(j) => s += &format!("-D {} {}\n", j.from, j.rule),
            Change::InsertJump(j) => s += &format!("-I {} 1 {}\n", j.from, j.rule),
            _ => {}
        }
    }
    // Flush every doomed chain before deleting any: one may jump to another.
    for c in changes {
        if let Change::DeleteChain(chain) = c {
            s += &format!("-F {chain}\n");
        }
    }
    for c in changes {
        if let Change::DeleteChain(chain) = c {
            s += &format!("-X {chain}\n");
        }
    }
    s + "COMMIT\n"
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::Marks;

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    fn spec(remote: &[&str]) -> FirewallSpec {
        FirewallSpec {
            other_overlay: None,
            marks: Marks::default(),
            overlay: net("10.42.0.0/16"),
            remote_subnets: remote.iter().map(|s| net(s)).collect(),
            local_subnets: vec![net("10.42.1.0/24")],
            bridge_dev: None,
            underlay_dev: None,
            tunnel_devices: None,
        }
    }

    #[test]
    fn mark_chain_excludes_local_subnets_and_marks_the_overlay_once() {
        let d = desired(&spec(&[
            "10.42.3.0/24",
            "10.42.2.0/24",
            "10.42.2.0/24",
            "10.42.9.7/32",
            "10.42.8.0/24",
        ]));
        assert_eq!(
            d[&Table::Mangle].chains[MARK_CHAIN],
            vec![
                "-d 10.42.1.0/24 -j RETURN",
                "-d 10.42.0.0/16 -j MARK --set-xmark 0x100000/0x300000",
            ]
        );
        assert_eq!(
            d[&Table::Mangle].jumps,
            vec![
                Jump::to("PREROUTING", MARK_CHAIN),
                Jump::to("OUTPUT", MARK_CHAIN)
            ]
        );
        assert!(!d[&Table::Mangle].chains.contains_key(PRE_CHAIN));
    }

    #[test]
    fn rule_counts_do_not_depend_on_the_peers() {
        // 5,000 remote /24s spread over the overlay (not one block) vs one peer vs none.
        let mut s = spec(&[]);
        s.overlay = net("10.0.0.0/8");
        s.local_subnets = vec![net("10.42.1.0/24")];
        let one = desired(&s);
        let mut x: u32 = 0x9e37_79b9;
        let mut remote = std::collections::BTreeSet::new();
        while remote.len() < 5000 {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            let n: IpNet = format!("10.{}.{}.0/24", (x >> 8) & 0xff, x & 0xff)
                .parse()
                .unwrap();
            if n != net("10.42.1.0/24") {
                remote.insert(n);
            }
        }
        s.remote_subnets = remote.into_iter().collect();
        s.validate().unwrap();
        assert!(
            aggregate(&s.remote_subnets).len() > 1000,
            "spread, not a block"
        );
        let many = desired(&s);
        assert_eq!(many, one, "the rules are the same with 0 and 5,000 peers");
        assert_eq!(many[&Table::Mangle].chains[MARK_CHAIN].len(), 2);
        assert_eq!(many[&Table::Filter].chains[GUARD_CHAIN].len(), 1);
    }

    #[test]
    fn local_exclusions_are_aggregated_and_inside_the_overlay() {
        let mut s = spec(&[]);
        s.local_subnets = vec![
            net("10.42.5.7/32"),
            net("10.42.5.6/32"),
            net("10.42.1.9/24"),
            net("192.168.3.0/24"),
        ];
        assert_eq!(
            local_exclusions(&s),
            vec![net("10.42.1.0/24"), net("10.42.5.6/31")]
        );
        let m = &desired(&s)[&Table::Mangle].chains[MARK_CHAIN];
        assert_eq!(
            m,
            &vec![
                "-d 10.42.1.0/24 -j RETURN".to_string(),
                "-d 10.42.5.6/31 -j RETURN".to_string(),
                "-d 10.42.0.0/16 -j MARK --set-xmark 0x100000/0x300000".to_string(),
            ]
        );
    }

    #[test]
    fn renders_guard() {
        let d = desired(&spec(&["10.42.2.0/24"]));
        let f = &d[&Table::Filter];
        assert_eq!(
            f.chains[GUARD_CHAIN],
            vec!["-d 10.42.0.0/16 -m mark --mark 0x100000/0x300000 -m policy --dir out --pol none -j DROP"]
        );
        assert_eq!(
            f.jumps,
            vec![
                Jump::to("FORWARD", GUARD_CHAIN),
                Jump::to("OUTPUT", GUARD_CHAIN)
            ]
        );
        let mut s = spec(&[]);
        s.marks = Marks {
            encrypt: 0x10,
            decrypt: 0x20,
            mask: u32::MAX,
        };
        let g = &desired(&s)[&Table::Filter].chains[GUARD_CHAIN][0];
        assert!(g.contains("--mark 0x10 -m policy"), "{g}");
    }

    #[test]
    fn route_mode_guard_exempts_only_the_mesh_interfaces() {
        let s = spec(&["10.42.2.0/24"]).with_tunnel_devices(Some("imx".into()));
        s.validate().unwrap();
        let d = desired(&s);
        assert_eq!(
            d[&Table::Filter].chains[GUARD_CHAIN],
            vec!["-d 10.42.0.0/16 ! -o imx+ -m mark --mark 0x100000/0x300000 -m policy --dir out --pol none -j DROP"],
            "still one rule"
        );
        let policy_mode = desired(&spec(&["10.42.2.0/24"]));
        assert_eq!(
            d[&Table::Mangle].chains[MARK_CHAIN],
            policy_mode[&Table::Mangle].chains[MARK_CHAIN],
            "marking is the same in both modes"
        );
        // One reverse-path rule for the mesh's interfaces, jumped from PREROUTING only.
        assert_eq!(
            d[&Table::Mangle].chains[RPF_CHAIN],
            vec!["-i imx+ -m rpfilter --invert -j DROP"]
        );
        assert_eq!(
            d[&Table::Mangle].jumps,
            vec![
                Jump::to("PREROUTING", MARK_CHAIN),
                Jump::to("OUTPUT", MARK_CHAIN),
                Jump::to("PREROUTING", RPF_CHAIN)
            ]
        );
        assert!(!policy_mode[&Table::Mangle].chains.contains_key(RPF_CHAIN));
        // Switching back to policy mode removes it (jump first, then the chain).
        let back = diff_table(&d[&Table::Mangle], &policy_mode[&Table::Mangle]);
        assert_eq!(
            back,
            vec![
                Change::DeleteJump(Jump::to("PREROUTING", RPF_CHAIN)),
                Change::DeleteChain(RPF_CHAIN.into())
            ]
        );
        // ... and to route mode adds exactly it.
        let to = diff_table(&policy_mode[&Table::Mangle], &d[&Table::Mangle]);
        assert_eq!(to.len(), 2, "{to:?}");
        // The same number of rules whatever the number of peers.
        let many: Vec<String> = (2..202).map(|i| format!("10.42.{i}.0/24")).collect();
        let many: Vec<&str> = many.iter().map(String::as_str).collect();
        let big = spec(&many).with_tunnel_devices(Some("imx".into()));
        assert_eq!(desired(&big)[&Table::Mangle], d[&Table::Mangle]);
        let bad = spec(&[]).with_tunnel_devices(Some("im x".into()));
        assert!(bad.validate().is_err());
    }

    #[test]
    fn devices_go_through_pre_chain() {
        let s = spec(&["10.42.2.0/24"]).with_devices(Some("cbr0".into()), Some("eth0".into()));
        let m = &desired(&s)[&Table::Mangle];
        assert_eq!(
            m.chains[PRE_CHAIN],
            vec!["-i cbr0 -j IPSEC-MESH-MARK", "-i eth0 -j IPSEC-MESH-MARK"]
        );
        assert_eq!(
            m.jumps,
            vec![
                Jump::to("PREROUTING", PRE_CHAIN),
                Jump::to("OUTPUT", MARK_CHAIN)
            ]
        );
    }

    #[test]
    fn ipv6() {
        let s = FirewallSpec {
            other_overlay: None,
            marks: Marks::default(),
            overlay: net("fd42::/32"),
            remote_subnets: vec![net("fd42:0:2::/64"), net("fd42:0:3::/64")],
            local_subnets: vec![net("fd42:0:1::/64")],
            bridge_dev: None,
            underlay_dev: None,
            tunnel_devices: None,
        };
        s.validate().unwrap();
        assert_eq!(s.family(), super::super::Family::V6);
        let d = desired(&s);
        assert_eq!(
            d[&Table::Mangle].chains[MARK_CHAIN],
            vec![
                "-d fd42:0:1::/64 -j RETURN",
                "-d fd42::/32 -j MARK --set-xmark 0x100000/0x300000"
            ]
        );
        assert!(d[&Table::Filter].chains[GUARD_CHAIN][0].starts_with("-d fd42::/32 "));
    }

    #[test]
    fn validation() {
        assert!(spec(&["10.42.2.0/24"]).validate().is_ok());
        let e = spec(&["10.43.2.0/24"]).validate().unwrap_err().to_string();
        assert!(e.contains("outside the overlay"), "{e}");
        let e = spec(&["10.42.0.0/23"]).validate().unwrap_err().to_string();
        assert!(e.contains("overlaps local subnet 10.42.1.0/24"), "{e}");
        let e = spec(&["fd00::/64"]).validate().unwrap_err().to_string();
        assert!(e.contains("not IPv4"), "{e}");
        let e = spec(&[])
            .with_devices(Some("a b".into()), None)
            .validate()
            .unwrap_err()
            .to_string();
        assert!(e.contains("bridge device name"), "{e}");
        let mut s = spec(&[]);
        s.marks.encrypt = 0;
        assert!(s.validate().is_err());
    }

    #[test]
    fn diff_of_equal_states_is_empty() {
        let d = desired(&spec(&["10.42.2.0/24"]));
        for st in d.values() {
            assert!(diff_table(st, st).is_empty());
        }
    }

    #[test]
    fn diff_from_nothing_creates_everything() {
        let d = desired(&spec(&["10.42.2.0/24"]));
        let ch = diff_table(&TableState::default(), &d[&Table::Mangle]);
        assert_eq!(ch.len(), 3, "{ch:?}");
        let r = render_restore(Table::Mangle, &ch);
        assert_eq!(
            r,
            "*mangle\n\
             :IPSEC-MESH-MARK - [0:0]\n\
             -F IPSEC-MESH-MARK\n\
             -A IPSEC-MESH-MARK -d 10.42.1.0/24 -j RETURN\n\
             -A IPSEC-MESH-MARK -d 10.42.0.0/16 -j MARK --set-xmark 0x100000/0x300000\n\
             -I PREROUTING 1 -j IPSEC-MESH-MARK\n\
             -I OUTPUT 1 -j IPSEC-MESH-MARK\n\
             COMMIT\n"
        );
        assert!(!r.contains(":PREROUTING"));
    }

    #[test]
    fn diff_refills_changed_chain_only() {
        // A peer leaving changes nothing; a local subnet added refills the mark chain only.
        let old = desired(&spec(&["10.42.2.0/24", "10.42.4.0/24"]));
        let same = desired(&spec(&["10.42.2.0/24"]));
        for t in [Table::Mangle, Table::Filter] {
            assert!(diff_table(&old[&t], &same[&t]).is_empty());
        }
        let mut s = spec(&["10.42.2.0/24"]);
        s.local_subnets.push(net("10.42.3.0/24"));
        let new = desired(&s);
        let ch = diff_table(&old[&Table::Mangle], &new[&Table::Mangle]);
        assert_eq!(
            ch,
            vec![Change::Fill {
                chain: MARK_CHAIN.into(),
                rules: new[&Table::Mangle].chains[MARK_CHAIN].clone(),
                created: false
            }]
        );
        assert!(diff_table(&old[&Table::Filter], &new[&Table::Filter]).is_empty());
    }

    #[test]
    fn diff_fixes_duplicate_and_stale_jumps_and_drops_unwanted_chains() {
        let with_pre = desired(&spec(&["10.42.2.0/24"]).with_devices(Some("cbr0".into()), None))
            [&Table::Mangle]
            .clone();
        let plain = desired(&spec(&["10.42.2.0/24"]))[&Table::Mangle].clone();
        let mut cur = with_pre.clone();
        cur.jumps.push(Jump::to("OUTPUT", MARK_CHAIN)); // duplicate
        cur.jumps.push(Jump {
            from: "FOREIGN".into(),
            rule: "-j IPSEC-MESH-MARK".into(),
        }); // foreign user chain into a kept chain: left alone
        let ch = diff_table(&cur, &plain);
        assert_eq!(
            ch,
            vec![
                Change::DeleteJump(Jump::to("PREROUTING", PRE_CHAIN)),
                Change::DeleteJump(Jump::to("OUTPUT", MARK_CHAIN)),
                Change::InsertJump(Jump::to("PREROUTING", MARK_CHAIN)),
                Change::DeleteChain(PRE_CHAIN.into()),
            ]
        );
        let r = render_restore(Table::Mangle, &ch);
        let lines: Vec<&str> = r.lines().collect();
        assert_eq!(
            lines,
            vec![
                "*mangle",
                "-D PREROUTING -j IPSEC-MESH-PRE",
                "-D OUTPUT -j IPSEC-MESH-MARK",
                "-I PREROUTING 1 -j IPSEC-MESH-MARK",
                "-F IPSEC-MESH-PRE",
                "-X IPSEC-MESH-PRE",
                "COMMIT"
            ]
        );
    }

    #[test]
    fn cleanup_diff_removes_all_references() {
        let mut cur = desired(&spec(&["10.42.2.0/24"]))[&Table::Mangle].clone();
        cur.jumps.push(Jump {
            from: "FOREIGN".into(),
            rule: "-m comment --comment \"x y\" -j IPSEC-MESH-MARK".into(),
        });
        let ch = diff_table(&cur, &TableState::default());
        let r = render_restore(Table::Mangle, &ch);
        assert_eq!(
            r,
            "*mangle\n\
             -D PREROUTING -j IPSEC-MESH-MARK\n\
             -D OUTPUT -j IPSEC-MESH-MARK\n\
             -D FOREIGN -m comment --comment \"x y\" -j IPSEC-MESH-MARK\n\
             -F IPSEC-MESH-MARK\n\
             -X IPSEC-MESH-MARK\n\
             COMMIT\n"
        );
        assert!(diff_table(&TableState::default(), &TableState::default()).is_empty());
    }

    #[test]
    fn jump_targets() {
        assert_eq!(
            jump_target("-i x -j IPSEC-MESH-MARK").as_deref(),
            Some("IPSEC-MESH-MARK")
        );
        assert_eq!(
            jump_target("-g IPSEC-MESH-PRE").as_deref(),
            Some("IPSEC-MESH-PRE")
        );
        assert_eq!(jump_target("-d 1.2.3.4/32"), None);
        assert_eq!(
            jump_target("-m comment --comment \"-j IPSEC-MESH-X\" -j ACCEPT").as_deref(),
            Some("ACCEPT")
        );
    }
}

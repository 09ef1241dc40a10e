//! The pure diff between what the kernel holds (ours only) and what is desired, as an
//! ordered list of steps, each with its owner so failures are reported per peer.
//!
//! Order (fail closed at every point): the block policy first; SAs before the policies that
//! use them (inbound before outbound); policy deletions before the SAs they used.

use std::collections::{HashMap, HashSet};

use super::desired::Desired;
use super::objects::*;
use crate::dataplane::report::Change;

/// Our objects found in the kernel.
#[derive(Debug, Default)]
pub struct Current {
    pub policies: Vec<Policy>,
    pub sas: Vec<Sa>,
    /// Our SAs (by reqid) whose shape we do not make: always deleted.
    pub odd_sas: Vec<(SaId, u32)>,
    /// Sequence state of our ESN SAs, from the same dump (for [`super::plan_raises`]).
    pub seq: Vec<super::messages::SeqState>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    AddPolicy(Policy),
    /// Replace in place: same identity, other settings.
    UpdatePolicy {
        old: Policy,
        new: Policy,
    },
    DelPolicy(PolicyId),
    AddSa(Sa),
    DelSa(SaId),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    pub owner: Owner,
    pub op: Op,
}

impl Step {
    /// The change for logs, `--diff` and `/status` (never key material).
    pub fn change(&self) -> Change {
        let c = match &self.op {
            Op::AddPolicy(p) => Change::add(LAYER, p.to_string()),
            Op::UpdatePolicy { old, new } => Change::update(
                LAYER,
                new.ident(),
                Some(old.settings()),
                Some(new.settings()),
            ),
            Op::DelPolicy(id) => Change::delete(
                LAYER,
                format!(
                    "policy {} {} -> {} mark {}{}",
                    id.dir,
                    id.src,
                    id.dst,
                    id.mark,
                    id.scope_suffix()
                ),
            ),
            Op::AddSa(s) => Change::add(LAYER, s.to_string()),
            Op::DelSa(id) => {
                Change::delete(LAYER, format!("sa -> {} spi {:#010x}", id.dst, id.spi))
            }
        };
        match &self.owner {
            Owner::Mesh => c,
            o => c.for_peer(o.to_string()),
        }
    }
}

/// The layer name in [`Change`]s.
pub const LAYER: &str = "xfrm";

fn dir_rank(d: Dir) -> u8 {
    match d {
        Dir::In => 0,
        Dir::Fwd => 1,
        Dir::Out => 2,
    }
}

/// The steps that turn `current` into `desired`. Empty when they already match.
pub fn diff(current: &Current, desired: &Desired) -> Vec<Step> {
    // Owners of stale objects: by reqid, built only when something is stale.
    let by_reqid = std::cell::OnceCell::<HashMap<u32, Owner>>::new();
    let stale_owner = |reqid: Option<u32>| match reqid {
        Some(r) => by_reqid
            .get_or_init(|| {
                desired
                    .sas
                    .iter()
                    .map(|(o, s)| (s.reqid, o.clone()))
                    .chain(
                        desired
                            .policies
                            .iter()
                            .filter_map(|(o, p)| p.tmpl.map(|t| (t.reqid, o.clone()))),
                    )
                    .collect()
            })
            .get(&r)
            .cloned()
            .unwrap_or(Owner::Stale(r)),
        None => Owner::Mesh,
    };

    let cur_pol: HashMap<PolicyId, &Policy> = current.policies.iter().map(|p| (p.id, p)).collect();
    let cur_sa: HashMap<SaId, &Sa> = current.sas.iter().map(|s| (s.id, s)).collect();
    let want_pol: HashSet<PolicyId> = desired.policies.iter().map(|(_, p)| p.id).collect();
    let want_sa: HashSet<SaId> = desired.sas.iter().map(|(_, s)| s.id).collect();

    let mut block = Vec::new();
    let mut sa_del_changed = Vec::new();
    let mut sa_add = Vec::new();
    let mut pol_set = Vec::new();
    let mut pol_del = Vec::new();
    let mut sa_del = Vec::new();

    for (owner, s) in &desired.sas {
        match cur_sa.get(&s.id) {
            Some(c) if *c == s => {}
            Some(_) => {
                // Algorithms and keys cannot be updated in place.
                sa_del_changed.push(Step {
                    owner: owner.clone(),
                    op: Op::DelSa(s.id),
                });
                sa_add.push((
                    s.output_mark.is_none(),
                    Step {
                        owner: owner.clone(),
                        op: Op::AddSa(s.clone()),
                    },
                ));
            }
            None => sa_add.push((
                s.output_mark.is_none(),
                Step {
                    owner: owner.clone(),
                    op: Op::AddSa(s.clone()),
                },
            )),
        }
    }
    for (owner, p) in &desired.policies {
        let op = match cur_pol.get(&p.id) {
            Some(c) if c.same_settings(p) => continue,
            Some(c) => Op::UpdatePolicy {
                old: Policy::clone(c),
                new: p.clone(),
            },
            None => Op::AddPolicy(p.clone()),
        };
        let step = Step {
            owner: owner.clone(),
            op,
        };
        if p.tmpl.is_none() {
            block.push(step);
        } else {
            pol_set.push((dir_rank(p.id.dir), step));
        }
    }
    for p in &current.policies {
        if !want_pol.contains(&p.id) {
            pol_del.push((
                2 - dir_rank(p.id.dir),
                Step {
                    owner: stale_owner(p.tmpl.map(|t| t.reqid)),
                    op: Op::DelPolicy(p.id),
                },
            ));
        }
    }
    for s in &current.sas {
        if !want_sa.contains(&s.id) {
            sa_del.push(Step {
                owner: stale_owner(Some(s.reqid)),
                op: Op::DelSa(s.id),
            });
        }
    }
    for (id, reqid) in &current.odd_sas {
        sa_del.push(Step {
            owner: stale_owner(Some(*reqid)),
            op: Op::DelSa(*id),
        });
    }

    // Stable sorts keep the desired order within each rank.
    sa_add.sort_by_key(|(outbound, _)| *outbound);
    pol_set.sort_by_key(|(r, _)| *r);
    pol_del.sort_by_key(|(r, _)| *r);
    block
        .into_iter()
        .chain(sa_del_changed)
        .chain(sa_add.into_iter().map(|(_, s)| s))
        .chain(pol_set.into_iter().map(|(_, s)| s))
        .chain(pol_del.into_iter().map(|(_, s)| s))
        .chain(sa_del)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::super::desired::desired;
    use super::*;
    use crate::plan::{plan, Plan, PlanOptions, Psk};

    fn mk_plan(hosts: &[(&str, &str, &str)], me: &str) -> Plan {
        use crate::test_cluster as tc;
        let c = tc::valid(&tc::raw(
            "10.42.0.0/16",
            hosts
                .iter()
                .map(|(id, ip, net)| tc::host(id, ip, &[net]))
                .collect(),
        ));
        plan(
            &c,
            me,
            &PlanOptions::default(),
            Some(&Psk::from_bytes(&[4; 32])),
        )
        .unwrap()
    }

    const HOSTS: [(&str, &str, &str); 3] = [
        ("a", "192.168.77.1", "10.42.1.0/24"),
        ("b", "192.168.77.2", "10.42.2.0/24"),
        ("c", "192.168.77.3", "10.42.3.0/24"),
    ];

    fn as_current(d: &Desired) -> Current {
        Current {
            policies: d.policies.iter().map(|(_, p)| p.clone()).collect(),
            sas: d.sas.iter().map(|(_, s)| s.clone()).collect(),
            odd_sas: vec![],
            seq: vec![],
        }
    }

    #[test]
    fn from_empty_adds_everything_in_order() {
        let d = desired(&mk_plan(&HOSTS, "a"));
        let steps = diff(&Current::default(), &d);
        assert_eq!(steps.len(), d.policies.len() + d.sas.len());
        // Block policy first, SAs before policies, inbound SAs before outbound.
        assert!(matches!(&steps[0].op, Op::AddPolicy(p) if p.action == Action::Block));
        let first_pol = steps
            .iter()
            .skip(1)
            .position(|s| matches!(s.op, Op::AddPolicy(_)))
            .unwrap()
            + 1;
        assert!(steps[1..first_pol]
            .iter()
            .all(|s| matches!(s.op, Op::AddSa(_))));
        assert!(matches!(&steps[1].op, Op::AddSa(s) if s.output_mark.is_some()));
        let last_pol = steps.last().unwrap();
        assert!(matches!(&last_pol.op, Op::AddPolicy(p) if p.id.dir == Dir::Out));
    }

    #[test]
    fn no_change_no_steps() {
        let d = desired(&mk_plan(&HOSTS, "a"));
        assert!(diff(&as_current(&d), &d).is_empty());
    }

    #[test]
    fn departed_host_only_its_objects_go() {
        let before = desired(&mk_plan(&HOSTS, "a"));
        let after = desired(&mk_plan(&HOSTS[..2], "a"));
        let steps = diff(&as_current(&before), &after);
        assert_eq!(steps.len(), 3 + 4, "{steps:#?}");
        assert!(steps.iter().all(|s| matches!(s.owner, Owner::Stale(_))));
        assert!(steps
            .iter()
            .all(|s| matches!(s.op, Op::DelPolicy(_) | Op::DelSa(_))));
        // Out policy removed before in/fwd, policies before SAs.
        assert!(matches!(&steps[0].op, Op::DelPolicy(id) if id.dir == Dir::Out));
        assert!(matches!(steps[3].op, Op::DelSa(_)));
    }

    #[test]
    fn added_host_adds_few_objects() {
        let before = desired(&mk_plan(&HOSTS[..2], "a"));
        let after = desired(&mk_plan(&HOSTS, "a"));
        let steps = diff(&as_current(&before), &after);
        assert_eq!(steps.len(), 7, "3 policies + 4 SAs: {steps:#?}");
        assert!(steps.iter().all(|s| s.owner == Owner::Peer("c".into())));
    }

    #[test]
    fn changed_key_replaces_the_sa_and_changed_priority_updates() {
        let d = desired(&mk_plan(&HOSTS, "a"));
        let mut cur = as_current(&d);
        if let Crypto::Aead { key, .. } = &mut cur.sas[0].crypto {
            key[0] ^= 1;
        }
        cur.policies[1].priority += 1;
        let steps = diff(&cur, &d);
        assert_eq!(steps.len(), 3, "{steps:#?}");
        assert!(matches!(steps[0].op, Op::DelSa(_)));
        assert!(matches!(steps[1].op, Op::AddSa(_)));
        assert!(matches!(steps[2].op, Op::UpdatePolicy { .. }));
        assert!(
            !steps[1]
                .change()
                .to_string()
                .contains(&format!("{:02x}", 7)),
            "no key in descriptions"
        );
    }
}

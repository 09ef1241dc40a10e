//! Properties of the pure planner (proptest): pair symmetry, uniqueness, order independence,
//! stability under adding/removing hosts, and collision-freedom at 10,000 hosts.

use std::collections::{BTreeSet, HashMap, HashSet};

use proptest::prelude::*;

#[path = "common/cluster.rs"]
mod cluster;

use ipsec_mesh::model::{Cluster, RawCluster, RawHost};
use ipsec_mesh::plan::{self, ids, KeyDeriver, Peer, Plan, PlanOptions, Psk, Transform};

fn raw_host(i: usize, id: &str) -> RawHost {
    cluster::numbered_host(i, id)
}

fn raw(ids: &[String]) -> RawCluster {
    cluster::raw(
        "10.0.0.0/8",
        ids.iter()
            .enumerate()
            .map(|(i, id)| raw_host(i, id))
            .collect(),
    )
}

fn all_plans(c: &Cluster, opts: &PlanOptions, psk: Option<&Psk>) -> HashMap<String, Plan> {
    let mids = plan::mesh_ids(c);
    let keys = psk.map(KeyDeriver::new);
    c.hosts
        .iter()
        .map(|h| {
            let p = plan::plan_with(c, &mids, h.id.as_str(), opts, keys.as_ref()).unwrap();
            (h.id.to_string(), p)
        })
        .collect()
}

fn peer<'a>(p: &'a Plan, id: &str) -> &'a Peer {
    p.peers.iter().find(|x| x.host.as_str() == id).unwrap()
}

/// The values of a pair that must never change when other hosts come and go.
fn pair_values(x: &Peer) -> (u32, u32, u32, u32, u32, Option<String>, Option<String>) {
    (
        x.reqid,
        x.spi_out,
        x.spi_in,
        x.mark_out,
        x.mark_in,
        x.key_out_id.clone(),
        x.key_in_id.clone(),
    )
}

fn id_set(max: usize) -> impl Strategy<Value = Vec<String>> {
    prop::collection::btree_set("[a-z0-9][a-z0-9._-]{0,15}", 2..max)
        .prop_map(|s: BTreeSet<String>| s.into_iter().collect())
}

fn options() -> impl Strategy<Value = PlanOptions> {
    (
        prop::sample::select(plan::transform::ALL_TRANSFORMS.to_vec()),
        any::<bool>(),
        0u32..40,
    )
        .prop_map(
            |(transform, udp_encap, generation): (Transform, bool, u32)| PlanOptions {
                transform,
                udp_encap,
                generation,
                ..Default::default()
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn pairs_are_symmetric_and_ids_unique(ids in id_set(14), opts in options(), secret in prop::collection::vec(any::<u8>(), 32..48)) {
        let c = Cluster::validate(&raw(&ids)).unwrap();
        let psk = Psk::from_bytes(&secret);
        let plans = all_plans(&c, &opts, Some(&psk));
        for (a, pa) in &plans {
            prop_assert_eq!(pa.peers.len(), ids.len() - 1);
            let reqids: HashSet<u32> = pa.peers.iter().map(|x| x.reqid).collect();
            prop_assert_eq!(reqids.len(), pa.peers.len(), "reqids unique on {}", a);
            let spis_in: HashSet<u32> = pa.peers.iter().map(|x| x.spi_in).collect();
            prop_assert_eq!(spis_in.len(), pa.peers.len(), "inbound SPIs unique on {}", a);
            for x in &pa.peers {
                prop_assert!(ids::is_owned_reqid(x.reqid));
                prop_assert!(x.spi_in >= 256 && x.spi_out >= 256);
                prop_assert_eq!(x.spi_in & 0xf, opts.generation & 0xf);
                let back = peer(&plans[x.host.as_str()], a);
                prop_assert_eq!(x.spi_out, back.spi_in);
                prop_assert_eq!(x.spi_in, back.spi_out);
                prop_assert_eq!(&x.key_out_id, &back.key_in_id);
                prop_assert_eq!(&x.key_in_id, &back.key_out_id);
                prop_assert_ne!(&x.key_out_id, &x.key_in_id);
                let (ko, bi) = (x.key_out.as_ref().unwrap(), back.key_in.as_ref().unwrap());
                prop_assert_eq!(ko.enc(), bi.enc());
                prop_assert_eq!(ko.auth(), bi.auth());
            }
        }
        // Every key in the mesh is distinct.
        let all_keys: Vec<String> = plans.values().flat_map(|p| p.peers.iter().map(|x| x.key_out_id.clone().unwrap())).collect();
        let distinct: HashSet<&String> = all_keys.iter().collect();
        prop_assert_eq!(distinct.len(), all_keys.len());
    }

    #[test]
    fn host_order_changes_nothing(ids in id_set(12), seed in any::<u64>()) {
        let r = raw(&ids);
        let mut shuffled = r.clone();
        // Deterministic Fisher-Yates driven by the seed.
        let mut s = seed;
        for i in (1..shuffled.hosts.len()).rev() {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let j = (s >> 33) as usize % (i + 1);
            shuffled.hosts.swap(i, j);
        }
        let psk = Psk::from_bytes(&[3u8; 32]);
        let o = PlanOptions::default();
        let a = all_plans(&Cluster::validate(&r).unwrap(), &o, Some(&psk));
        let b = all_plans(&Cluster::validate(&shuffled).unwrap(), &o, Some(&psk));
        prop_assert_eq!(a, b);
    }

    #[test]
    fn adding_or_removing_a_host_changes_no_other_pair(ids in id_set(12), extra in "[a-z0-9]{1,16}", victim in any::<prop::sample::Index>()) {
        prop_assume!(!ids.contains(&extra));
        let psk = Psk::from_bytes(&[5u8; 40]);
        let o = PlanOptions::default();
        let base = all_plans(&Cluster::validate(&raw(&ids)).unwrap(), &o, Some(&psk));

        let mut grown = ids.clone();
        grown.push(extra.clone());
        let more = all_plans(&Cluster::validate(&raw(&grown)).unwrap(), &o, Some(&psk));
        for (a, pa) in &base {
            for x in &pa.peers {
                prop_assert_eq!(pair_values(x), pair_values(peer(&more[a], x.host.as_str())));
            }
            prop_assert_eq!(more[a].peers.len(), pa.peers.len() + 1);
        }

        let gone = victim.get(&ids).clone();
        let shrunk: Vec<String> = ids.iter().filter(|i| **i != gone).cloned().collect();
        let less = all_plans(&Cluster::validate(&raw(&shrunk)).unwrap(), &o, Some(&psk));
        for (a, pa) in &less {
            prop_assert!(pa.peers.iter().all(|x| x.host.as_str() != gone));
            for x in &pa.peers {
                prop_assert_eq!(pair_values(x), pair_values(peer(&base[a], x.host.as_str())));
            }
        }
    }
}

fn big_cluster(n: usize, prefix: &str) -> Cluster {
    let ids: Vec<String> = (0..n).map(|i| format!("{prefix}{i:05}")).collect();
    Cluster::validate(&raw(&ids)).unwrap()
}

#[test]
fn ten_thousand_hosts_have_no_collision() {
    for prefix in ["host-", "rancher-host-uuid-"] {
        let c = big_cluster(10_000, prefix);
        let mids = plan::mesh_ids(&c);
        let slots: HashSet<u32> = mids.iter().map(|m| m.slot).collect();
        assert_eq!(slots.len(), 10_000, "slots must be unique");
        // One host's plan: reqids unique among its 9,999 peers.
        let p = plan::plan_with(
            &c,
            &mids,
            c.hosts[1234].id.as_str(),
            &PlanOptions::default(),
            None,
        )
        .unwrap();
        let reqids: HashSet<u32> = p.peers.iter().map(|x| x.reqid).collect();
        assert_eq!(reqids.len(), 9_999);
        // SPIs arriving at several receivers are unique (full check: slots are unique and the
        // SPI is a bijection of the sender's slot per receiver).
        for dst in [0usize, 4321, 9999] {
            let spis: HashSet<u32> = mids
                .iter()
                .enumerate()
                .filter(|(i, _)| *i != dst)
                .map(|(_, src)| ids::spi(*src, mids[dst], 1))
                .collect();
            assert_eq!(spis.len(), 9_999);
        }
    }
}

#[test]
fn collisions_in_a_small_space_resolve_stably() {
    // 3,000 ids in a 2^12 space collide often; the result must still be unique and
    // independent of input order, and a host added later must not move anyone but hosts
    // involved in its own collision.
    let owned: Vec<String> = (0..3000).map(|i| format!("h{i}")).collect();
    let names: Vec<&str> = owned.iter().map(String::as_str).collect();
    let a = ids::assign(&names, 12);
    assert_eq!(a.iter().map(|h| h.slot).collect::<HashSet<_>>().len(), 3000);
    let mut rev = names.clone();
    rev.reverse();
    let b = ids::assign(&rev, 12);
    for (i, n) in rev.iter().enumerate() {
        assert_eq!(b[i], a[names.len() - 1 - i], "{n}");
    }
    let mut grown = names.clone();
    grown.push("newcomer");
    let g = ids::assign(&grown, 12);
    let moved = (0..names.len()).filter(|&i| g[i] != a[i]).count();
    assert!(moved <= 3, "{moved} hosts moved because one host joined");
}

/// The shared generator's spread clusters are valid and spread over 10.0.0.0/8 (not one
/// tidy block), its numbered and lettered ones valid.
#[test]
fn generated_clusters_are_valid_and_spread_ones_do_not_aggregate() {
    assert_eq!(
        cluster::valid(&cluster::lettered(&["host-a", "host-c"]))
            .hosts
            .len(),
        2
    );
    assert_eq!(cluster::valid(&cluster::numbered(600)).hosts.len(), 600);
    let s = cluster::spread_24s(500, 0x2545_f491);
    assert_eq!(cluster::valid(&s).hosts.len(), 500);
    let second_octets: BTreeSet<&str> = s
        .hosts
        .iter()
        .map(|h| h.subnets[0].split('.').nth(1).unwrap())
        .collect();
    assert!(second_octets.len() > 100, "{}", second_octets.len());
}

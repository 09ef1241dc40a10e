//! Identifiers: per-host slots, reqids, SPIs.
//!
//! Every host gets a *slot*, a 27-bit number derived from a hash of its id alone (never from
//! its position in the metadata), so adding or removing a host changes no other host's slot.
//! Hash collisions are detected over the whole cluster and resolved deterministically: the
//! colliding hosts are ordered by id and, after the first, each probes further hashes of its
//! id until a free slot is found. Only hosts in a collision are affected by that.
//!
//! From slots:
//! - `reqid(peer)` on any host = [`REQID_BASE`] | slot(peer): unique among one host's peers,
//!   and inside a range that marks it as ipsec-mesh's ([`is_owned_reqid`]).
//! - `spi(src -> dst)` = `0x8000_0000 | (slot(src) ^ spread(dst)) << 4 | generation & 0xf`.
//!   For a fixed receiver, XOR with its `spread` is a bijection on slots, so SPIs arriving at
//!   one host are unique whenever slots are; the sender computes exactly the value the
//!   receiver expects. The high bit keeps every SPI far above the reserved range (< 256), and
//!   the low nibble lets two key generations coexist during a rotation.

use std::collections::HashMap;

use ring::digest;

/// Bits in a slot.
pub const SLOT_BITS: u32 = 27;
const SLOT_MASK: u32 = (1 << SLOT_BITS) - 1;
/// All ipsec-mesh reqids are `REQID_BASE | slot`.
pub const REQID_BASE: u32 = 0x5000_0000;
/// The bits that identify an ipsec-mesh reqid.
pub const REQID_OWNER_MASK: u32 = !SLOT_MASK;
/// Set in every ipsec-mesh SPI.
pub const SPI_FLAG: u32 = 0x8000_0000;

/// Whether a reqid lies in ipsec-mesh's range.
pub fn is_owned_reqid(reqid: u32) -> bool {
    reqid & REQID_OWNER_MASK == REQID_BASE
}

/// Hash of a host id for `attempt` (0 is the home slot), plus its SPI spread.
fn hash(id: &str, attempt: u32) -> (u32, u32) {
    let mut ctx = digest::Context::new(&digest::SHA256);
    ctx.update(b"ipsec-mesh/v1 slot\0");
    ctx.update(id.as_bytes());
    ctx.update(&attempt.to_be_bytes());
    let d = ctx.finish();
    let b = d.as_ref();
    (
        u32::from_be_bytes([b[0], b[1], b[2], b[3]]),
        u32::from_be_bytes([b[4], b[5], b[6], b[7]]),
    )
}

/// Slot and SPI spread of each host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostIds {
    pub slot: u32,
    pub spread: u32,
}

impl HostIds {
    pub fn reqid(&self) -> u32 {
        REQID_BASE | self.slot
    }
}

/// SPI of the SA from `src` to `dst` in key generation `generation`.
pub fn spi(src: HostIds, dst: HostIds, generation: u32) -> u32 {
    SPI_FLAG | ((src.slot ^ dst.spread) << 4) | (generation & 0xf)
}

/// The SPI of the same pair and direction as `spi`, in generation `generation`.
pub fn with_generation(spi: u32, generation: u32) -> u32 {
    (spi & !0xf) | (generation & 0xf)
}

/// Assign slots to `ids` (distinct host ids, any order) in a space of `bits` bits.
/// The result is in the order of `ids`. Panics only if there are more ids than slots.
pub fn assign(ids: &[&str], bits: u32) -> Vec<HostIds> {
    assert!(bits <= SLOT_BITS && (ids.len() as u64) <= 1u64 << bits);
    let mask = if bits == 32 {
        u32::MAX
    } else {
        (1u32 << bits) - 1
    };
    let mut out: Vec<HostIds> = ids
        .iter()
        .map(|id| {
            let (h, s) = hash(id, 0);
            HostIds {
                slot: h & mask,
                spread: s & mask,
            }
        })
        .collect();

    let mut by_slot: HashMap<u32, Vec<usize>> = HashMap::with_capacity(ids.len());
    for (i, h) in out.iter().enumerate() {
        by_slot.entry(h.slot).or_default().push(i);
    }
    let mut losers: Vec<usize> = by_slot
        .values_mut()
        .filter(|v| v.len() > 1)
        .flat_map(|v| {
            v.sort_by(|&a, &b| ids[a].cmp(ids[b]));
            v[1..].to_vec()
        })
        .collect();
    if losers.is_empty() {
        return out;
    }
    // Losers probe in id order; a probe never takes any host's home slot, so the winners and
    // every host outside the collision keep theirs.
    losers.sort_by(|&a, &b| ids[a].cmp(ids[b]));
    for i in losers {
        let mut attempt = 1;
        loop {
            let slot = hash(ids[i], attempt).0 & mask;
            if let std::collections::hash_map::Entry::Vacant(e) = by_slot.entry(slot) {
                e.insert(vec![i]);
                out[i].slot = slot;
                break;
            }
            attempt += 1;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    fn names(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("host-{i}")).collect()
    }

    #[test]
    fn collisions_are_resolved_deterministically() {
        // 200 hosts in 256 slots: many collisions.
        let owned = names(200);
        let ids: Vec<&str> = owned.iter().map(String::as_str).collect();
        let a = assign(&ids, 8);
        let slots: HashSet<u32> = a.iter().map(|h| h.slot).collect();
        assert_eq!(slots.len(), 200, "slots must be unique");
        assert!(a.iter().all(|h| h.slot < 256));
        // Same input in another order: same assignment per id.
        let mut rev = ids.clone();
        rev.reverse();
        let b = assign(&rev, 8);
        for (i, id) in rev.iter().enumerate() {
            let j = ids.iter().position(|x| x == id).unwrap();
            assert_eq!(b[i], a[j], "{id}");
        }
        // There really were collisions to resolve.
        let homes: HashSet<u32> = ids.iter().map(|id| hash(id, 0).0 & 0xff).collect();
        assert!(homes.len() < 200);
    }

    #[test]
    fn full_space_is_fillable() {
        let owned = names(16);
        let ids: Vec<&str> = owned.iter().map(String::as_str).collect();
        let a = assign(&ids, 4);
        let slots: HashSet<u32> = a.iter().map(|h| h.slot).collect();
        assert_eq!(slots.len(), 16);
    }

    #[test]
    fn reqid_range() {
        let a = assign(&["x", "y"], SLOT_BITS);
        for h in a {
            assert!(is_owned_reqid(h.reqid()));
            assert!(h.reqid() >= REQID_BASE && h.reqid() < REQID_BASE + (1 << SLOT_BITS));
        }
        assert!(!is_owned_reqid(1));
        assert!(!is_owned_reqid(REQID_BASE + (1 << SLOT_BITS)));
    }

    #[test]
    fn spi_is_a_bijection_per_receiver() {
        let owned = names(300);
        let ids: Vec<&str> = owned.iter().map(String::as_str).collect();
        let a = assign(&ids, SLOT_BITS);
        for dst in a.iter().take(5) {
            let spis: HashSet<u32> = a.iter().map(|src| spi(*src, *dst, 1)).collect();
            assert_eq!(spis.len(), 300);
            assert!(spis.iter().all(|&s| s >= 256 && s & SPI_FLAG != 0));
        }
        assert_ne!(spi(a[0], a[1], 1), spi(a[0], a[1], 2));
    }
}

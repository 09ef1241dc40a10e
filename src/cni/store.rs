//! The IPAM allocation store: which address belongs to which (network, container, ifname).
//!
//! [`State`] is the pure part (find, allocate, release, gc); [`Store`] keeps it in one JSON
//! file (`allocations.json`) in the data directory, read and rewritten under an exclusive
//! `flock` on `lock` in the same directory, so concurrent plugin processes never hand out the
//! same address. The file is replaced atomically (write a temporary file, fsync, rename), so a
//! crash leaves the old or the new state, never half of one.
//!
//! Reserved in every subnet: the network address, the gateway (the first address after it)
//! and, for IPv4, the broadcast address. Allocation goes round-robin after the last address
//! handed out in that subnet, so a released address is not reused at once.
//!
//! A release can keep the address for its owner a while ([`State::release_keeping`]): the
//! same (network, container, ifname) asking again within that time ([`State::allocate_sticky`])
//! gets it back, and nobody else is given it then unless the subnets are otherwise full.
//! That is what a runtime's DEL then ADD of one container (`podman restart`, `podman network
//! reload`) needs to keep the container's address.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::net::IpAddr;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::metadata::json;

/// Who holds an address.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Owner {
    pub network: String,
    pub container: String,
    pub ifname: String,
}

/// Every allocation, and where the next search starts in each subnet.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct State {
    pub version: u32,
    pub allocations: BTreeMap<IpAddr, Owner>,
    /// Last address handed out, per subnet.
    #[serde(default)]
    pub last: BTreeMap<IpNet, IpAddr>,
    /// Addresses released recently, kept for their last owner (written only when there are
    /// any, so the file stays readable by plugins that predate it).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub released: BTreeMap<IpAddr, Released>,
}

/// A released address kept for its last owner.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Released {
    pub owner: Owner,
    /// When it was released (seconds since the Unix epoch).
    pub at: u64,
}

/// Why a statically requested address cannot be given.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClaimError {
    #[error("{ip} is not in this host's subnets ({})", subnets_list(.subnets))]
    Outside { ip: IpAddr, subnets: Vec<IpNet> },
    #[error("{ip} is the {what} of {subnet}")]
    Reserved {
        ip: IpAddr,
        subnet: IpNet,
        what: &'static str,
    },
    #[error("{ip} is this host's VTEP address")]
    Vtep { ip: IpAddr },
    #[error("{ip} is in use by container {} ifname {}", .owner.container, .owner.ifname)]
    InUse { ip: IpAddr, owner: Owner },
}

/// State file format version.
pub const STATE_VERSION: u32 = 1;

fn to_u128(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(a) => u32::from(a) as u128,
        IpAddr::V6(a) => u128::from(a),
    }
}

fn from_u128(v: u128, like: IpAddr) -> IpAddr {
    match like {
        IpAddr::V4(_) => IpAddr::V4((v as u32).into()),
        IpAddr::V6(_) => IpAddr::V6(v.into()),
    }
}

/// Whether `ip` is of the one family of `subnets` (true when they are empty or mixed).
fn same_family(subnets: &[IpNet], ip: &IpAddr) -> bool {
    match subnets.first().map(|s| s.addr().is_ipv6()) {
        Some(v6) if subnets.iter().all(|s| s.addr().is_ipv6() == v6) => ip.is_ipv6() == v6,
        _ => true,
    }
}

/// The gateway of a subnet: the first address after the network address (None when the
/// subnet is too small to have one besides the network and broadcast addresses).
pub fn gateway(subnet: &IpNet) -> Option<IpAddr> {
    let (first, _) = host_range(subnet)?;
    Some(from_u128(first, subnet.network()))
}

/// First and last address that may be a host's (gateway included), as numbers.
fn host_range(subnet: &IpNet) -> Option<(u128, u128)> {
    let net = to_u128(subnet.network());
    let last = to_u128(subnet.broadcast());
    let first = net.checked_add(1)?;
    let last = if subnet.addr().is_ipv4() {
        last.checked_sub(1)?
    } else {
        last
    };
    (first <= last && last > net).then_some((first, last))
}

/// Addresses that can be allocated in `subnet`: (first, last) as numbers, gateway excluded.
fn alloc_range(subnet: &IpNet) -> Option<(u128, u128)> {
    let (gw, last) = host_range(subnet)?;
    let first = gw.checked_add(1)?;
    (first <= last).then_some((first, last))
}

/// Whether `ip` is a network, gateway or broadcast address of `subnet` (or outside it).
pub fn is_reserved(subnet: &IpNet, ip: IpAddr) -> bool {
    match alloc_range(subnet) {
        Some((first, last)) => {
            let v = to_u128(ip);
            !subnet.contains(&ip) || v < first || v > last
        }
        None => true,
    }
}

/// How many addresses `subnet` offers (saturating).
pub fn capacity(subnet: &IpNet) -> u128 {
    alloc_range(subnet).map_or(0, |(f, l)| l - f + 1)
}

/// Every address of every subnet is taken.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("no free address in {}: all {used} allocatable addresses are in use", subnets_list(.subnets))]
pub struct Exhausted {
    pub subnets: Vec<IpNet>,
    pub used: u128,
}

fn subnets_list(s: &[IpNet]) -> String {
    s.iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

impl State {
    /// The address `owner` holds inside one of `subnets`, with its subnet.
    pub fn find(&self, owner: &Owner, subnets: &[IpNet]) -> Option<(IpAddr, IpNet)> {
        self.allocations
            .iter()
            .filter(|(_, o)| *o == owner)
            .find_map(|(ip, _)| subnets.iter().find(|s| s.contains(ip)).map(|s| (*ip, *s)))
    }

    /// Every address `owner` holds (in any subnet).
    pub fn held_by(&self, owner: &Owner) -> Vec<IpAddr> {
        self.allocations
            .iter()
            .filter(|(_, o)| *o == owner)
            .map(|(ip, _)| *ip)
            .collect()
    }

    /// Release every address of `owner` of the family of `subnets` (all of them when
    /// `subnets` is empty or mixes families); returns them. A dual-stack container holds one
    /// address per family: allocating one family leaves the other alone.
    pub fn release_family(&mut self, owner: &Owner, subnets: &[IpNet]) -> Vec<IpAddr> {
        let gone: Vec<IpAddr> = self
            .held_by(owner)
            .into_iter()
            .filter(|ip| same_family(subnets, ip))
            .collect();
        for ip in &gone {
            self.allocations.remove(ip);
        }
        gone
    }

    /// The address of `owner`: the one it holds in `subnets` if any (same container and
    /// interface -> same address), else a new one from the first subnet with room. Addresses
    /// of that family it holds outside `subnets` (the host's subnets changed) are released;
    /// those of the other family are not (one address per family, [`State::release_family`]).
    pub fn allocate(
        &mut self,
        subnets: &[IpNet],
        owner: &Owner,
    ) -> Result<(IpAddr, IpNet), Exhausted> {
        self.allocate_avoiding(subnets, &[], owner)
    }

    /// [`State::allocate`], never handing out one of `reserved` (the host's VTEP address when
    /// the metadata puts it inside a subnet); an owner holding one gets a new address.
    pub fn allocate_avoiding(
        &mut self,
        subnets: &[IpNet],
        reserved: &[IpAddr],
        owner: &Owner,
    ) -> Result<(IpAddr, IpNet), Exhausted> {
        if let Some(found) = self.find(owner, subnets) {
            if !reserved.contains(&found.0) {
                return Ok(found);
            }
        }
        self.release_family(owner, subnets);
        let mut used_total = 0u128;
        for subnet in subnets {
            let Some((first, last)) = alloc_range(subnet) else {
                continue;
            };
            let size = last - first + 1;
            let held = |ip: &IpAddr| {
                let v = to_u128(*ip);
                subnet.contains(ip) && (first..=last).contains(&v)
            };
            let used = (self.allocations.keys().filter(|ip| held(ip)).count()
                + reserved
                    .iter()
                    .filter(|ip| held(ip) && !self.allocations.contains_key(ip))
                    .count()) as u128;
            used_total += used.min(size);
            if used >= size {
                continue;
            }
            let start = match self.last.get(subnet).map(|ip| to_u128(*ip)) {
                Some(l) if (first..last).contains(&l) => l + 1,
                _ => first,
            };
            // At most `used` addresses are taken, so `used + 1` candidates hold a free one.
            let tries = size.min(used + 1);
            let mut v = start;
            for _ in 0..tries {
                let ip = from_u128(v, subnet.network());
                if reserved.contains(&ip) {
                    v = if v >= last { first } else { v + 1 };
                    continue;
                }
                if let std::collections::btree_map::Entry::Vacant(e) = self.allocations.entry(ip) {
                    e.insert(owner.clone());
                    self.last.insert(*subnet, ip);
                    return Ok((ip, *subnet));
                }
                v = if v >= last { first } else { v + 1 };
            }
        }
        Err(Exhausted {
            subnets: subnets.to_vec(),
            used: used_total,
        })
    }

    /// [`State::allocate_avoiding`] for an owner that may have released an address within
    /// `keep` before `now` (seconds): it gets that address back when it is still free and
    /// allowed; new addresses avoid every address kept for someone else, unless nothing else
    /// is free.
    pub fn allocate_sticky(
        &mut self,
        subnets: &[IpNet],
        reserved: &[IpAddr],
        owner: &Owner,
        now: u64,
        keep: u64,
    ) -> Result<(IpAddr, IpNet), Exhausted> {
        self.prune_released(now, keep);
        // Keeps of `owner` in this family (a dual-stack container has one per family).
        let mine = |ip: &IpAddr, r: &Released| r.owner == *owner && same_family(subnets, ip);
        if let Some(found) = self.find(owner, subnets) {
            if !reserved.contains(&found.0) {
                self.released.retain(|ip, r| !mine(ip, r));
                return Ok(found);
            }
        }
        let back = self
            .released
            .iter()
            .filter(|(ip, r)| {
                r.owner == *owner && !self.allocations.contains_key(ip) && !reserved.contains(ip)
            })
            .find_map(|(ip, _)| {
                subnets
                    .iter()
                    .find(|s| !is_reserved(s, *ip))
                    .map(|s| (*ip, *s))
            });
        if let Some((ip, subnet)) = back {
            self.release_family(owner, subnets);
            self.released.retain(|ip, r| !mine(ip, r));
            self.allocations.insert(ip, owner.clone());
            return Ok((ip, subnet));
        }
        self.released.retain(|ip, r| !mine(ip, r));
        let mut avoid: Vec<IpAddr> = reserved.to_vec();
        avoid.extend(self.released.keys().copied());
        match self.allocate_avoiding(subnets, &avoid, owner) {
            Ok(got) => Ok(got),
            Err(_) if avoid.len() > reserved.len() => {
                // Full but for addresses kept for others: the oldest keeps are given up.
                let got = self.allocate_avoiding(subnets, reserved, owner)?;
                self.released.remove(&got.0);
                Ok(got)
            }
            Err(e) => Err(e),
        }
    }

    /// Give `owner` exactly the requested address `ip` (a static request): it must be an
    /// allocatable address of one of `subnets`, not one of `reserved` (the VTEP), and not held
    /// by anyone else (an address kept for another owner after its release is taken over).
    pub fn claim(
        &mut self,
        subnets: &[IpNet],
        reserved: &[IpAddr],
        ip: IpAddr,
        owner: &Owner,
    ) -> Result<IpNet, ClaimError> {
        let subnet =
            *subnets
                .iter()
                .find(|s| s.contains(&ip))
                .ok_or_else(|| ClaimError::Outside {
                    ip,
                    subnets: subnets.to_vec(),
                })?;
        if is_reserved(&subnet, ip) {
            let what = if ip == subnet.network() {
                "network address"
            } else if Some(ip) == gateway(&subnet) {
                "gateway"
            } else {
                "broadcast address"
            };
            return Err(ClaimError::Reserved { ip, subnet, what });
        }
        if reserved.contains(&ip) {
            return Err(ClaimError::Vtep { ip });
        }
        match self.allocations.get(&ip) {
            Some(o) if o != owner => {
                return Err(ClaimError::InUse {
                    ip,
                    owner: o.clone(),
                })
            }
            Some(_) => {}
            None => {
                self.allocations.insert(ip, owner.clone());
            }
        }
        self.released.remove(&ip);
        Ok(subnet)
    }

    /// Release every address of `owner`, keeping them for it (stamped `now`); returns them.
    pub fn release_keeping(&mut self, owner: &Owner, now: u64) -> Vec<IpAddr> {
        let gone = self.release(owner);
        for ip in &gone {
            self.released.insert(
                *ip,
                Released {
                    owner: owner.clone(),
                    at: now,
                },
            );
        }
        gone
    }

    /// Forget keeps older than `keep` seconds at `now`.
    pub fn prune_released(&mut self, now: u64, keep: u64) {
        self.released
            .retain(|_, r| keep > 0 && now.saturating_sub(r.at) < keep);
    }

    /// Release every address of `owner`; returns them.
    pub fn release(&mut self, owner: &Owner) -> Vec<IpAddr> {
        let gone = self.held_by(owner);
        for ip in &gone {
            self.allocations.remove(ip);
        }
        gone
    }

    /// Release every allocation of `network` whose (container, ifname) is not in `valid`.
    pub fn gc(&mut self, network: &str, valid: &[(String, String)]) -> Vec<IpAddr> {
        let stale: Vec<IpAddr> = self
            .allocations
            .iter()
            .filter(|(_, o)| {
                o.network == network
                    && !valid
                        .iter()
                        .any(|(c, i)| *c == o.container && *i == o.ifname)
            })
            .map(|(ip, _)| *ip)
            .collect();
        for ip in &stale {
            self.allocations.remove(ip);
        }
        self.released.retain(|_, r| {
            r.owner.network != network
                || valid
                    .iter()
                    .any(|(c, i)| *c == r.owner.container && *i == r.owner.ifname)
        });
        stale
    }

    /// Free addresses left in `subnets`.
    pub fn free(&self, subnets: &[IpNet]) -> u128 {
        subnets
            .iter()
            .map(|s| {
                let used = self.allocations.keys().filter(|ip| s.contains(*ip)).count() as u128;
                capacity(s).saturating_sub(used)
            })
            .sum()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path}: not a valid allocation store ({reason}); move it away to start afresh")]
    Corrupt { path: PathBuf, reason: String },
    #[error("{path}: still locked by another plugin process after {}s", .waited.as_secs())]
    LockTimeout { path: PathBuf, waited: Duration },
}

/// The allocation store in a data directory.
#[derive(Debug, Clone)]
pub struct Store {
    dir: PathBuf,
    lock_timeout: Duration,
}

/// An exclusive hold on the store; released on drop (closing the file drops the flock).
#[derive(Debug)]
pub struct Locked<'a> {
    store: &'a Store,
    _lock: File,
}

/// How long to wait for the lock before giving up (a plugin holds it for milliseconds).
pub const LOCK_TIMEOUT: Duration = Duration::from_secs(30);

impl Store {
    pub fn new(dir: impl Into<PathBuf>) -> Store {
        Store {
            dir: dir.into(),
            lock_timeout: LOCK_TIMEOUT,
        }
    }

    pub fn with_lock_timeout(mut self, t: Duration) -> Store {
        self.lock_timeout = t;
        self
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn state_path(&self) -> PathBuf {
        self.dir.join("allocations.json")
    }

    fn io(&self, path: &Path) -> impl FnOnce(io::Error) -> StoreError {
        let path = path.to_path_buf();
        move |source| StoreError::Io { path, source }
    }

    /// Take the exclusive lock (creating the directory as needed).
    pub fn lock(&self) -> Result<Locked<'_>, StoreError> {
        fs::create_dir_all(&self.dir).map_err(self.io(&self.dir))?;
        let path = self.dir.join("lock");
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(self.io(&path))?;
        let start = Instant::now();
        let mut pause = Duration::from_millis(1);
        loop {
            // SAFETY: flock on a descriptor we own.
            if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
                break;
            }
            let e = io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EWOULDBLOCK) && e.kind() != io::ErrorKind::Interrupted
            {
                return Err(StoreError::Io { path, source: e });
            }
            if start.elapsed() >= self.lock_timeout {
                return Err(StoreError::LockTimeout {
                    path,
                    waited: self.lock_timeout,
                });
            }
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(20));
        }
        Ok(Locked {
            store: self,
            _lock: file,
        })
    }
}

impl Locked<'_> {
    /// Read the state (empty when there is no file yet).
    pub fn load(&self) -> Result<State, StoreError> {
        let path = self.store.state_path();
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Ok(State {
                    version: STATE_VERSION,
                    ..Default::default()
                })
            }
            Err(e) => return Err(StoreError::Io { path, source: e }),
        };
        let state: State = json::from_slice(&bytes).map_err(|e| StoreError::Corrupt {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        if state.version != STATE_VERSION {
            return Err(StoreError::Corrupt {
                path,
                reason: format!(
                    "format version {} (this plugin writes {STATE_VERSION})",
                    state.version
                ),
            });
        }
        Ok(state)
    }

    /// Replace the state atomically.
    pub fn save(&self, state: &State) -> Result<(), StoreError> {
        let path = self.store.state_path();
        let tmp = self.store.dir.join(".allocations.json.tmp");
        let mut body = serde_json::to_vec_pretty(state).map_err(|e| StoreError::Corrupt {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        body.push(b'\n');
        let write = || -> io::Result<()> {
            let mut f = File::create(&tmp)?;
            f.write_all(&body)?;
            f.sync_all()?;
            fs::rename(&tmp, &path)?;
            File::open(&self.store.dir)?.sync_all()
        };
        write().map_err(self.store.io(&path))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn owner(c: &str) -> Owner {
        Owner {
            network: "mesh".into(),
            container: c.into(),
            ifname: "eth0".into(),
        }
    }

    #[test]
    fn a_reserved_vtep_address_is_never_handed_out() {
        let subnets = [net("10.42.1.0/29")]; // .2 ..= .6 allocatable
        let vtep = [ip("10.42.1.3")];
        let mut st = State::default();
        let got: Vec<IpAddr> = (0..4)
            .map(|i| {
                st.allocate_avoiding(&subnets, &vtep, &owner(&format!("c{i}")))
                    .unwrap()
                    .0
            })
            .collect();
        assert_eq!(
            got,
            ["10.42.1.2", "10.42.1.4", "10.42.1.5", "10.42.1.6"].map(ip)
        );
        let e = st
            .allocate_avoiding(&subnets, &vtep, &owner("c4"))
            .unwrap_err();
        assert_eq!(e.used, 5, "4 containers + the VTEP fill the /29");
        // An owner that held the address before it became the VTEP moves off it.
        let mut st = State::default();
        assert_eq!(
            st.allocate(&subnets, &owner("a")).unwrap().0,
            ip("10.42.1.2")
        );
        let moved = st
            .allocate_avoiding(&subnets, &[ip("10.42.1.2")], &owner("a"))
            .unwrap()
            .0;
        assert_eq!(moved, ip("10.42.1.3"));
        assert_eq!(st.held_by(&owner("a")), [moved]);
    }

    #[test]
    fn a_released_address_is_kept_for_its_owner_a_while() {
        let subnets = [net("10.42.1.0/29")]; // .2 ..= .6
        let mut st = State::default();
        let a = st
            .allocate_sticky(&subnets, &[], &owner("a"), 100, 60)
            .unwrap()
            .0;
        assert_eq!(a, ip("10.42.1.2"));
        assert_eq!(st.release_keeping(&owner("a"), 110), [a]);
        assert!(st.allocations.is_empty());
        // Someone else does not get it while it is kept...
        let b = st
            .allocate_sticky(&subnets, &[], &owner("b"), 115, 60)
            .unwrap()
            .0;
        assert_ne!(b, a);
        // ...and the owner gets it back within the window (a restart, a network reload).
        assert_eq!(
            st.allocate_sticky(&subnets, &[], &owner("a"), 160, 60)
                .unwrap()
                .0,
            a
        );
        assert!(st.released.is_empty(), "claimed back: no longer kept");
        // After the window the keep is forgotten: round-robin moves on.
        st.release_keeping(&owner("a"), 200);
        let again = st
            .allocate_sticky(&subnets, &[], &owner("a"), 260, 60)
            .unwrap()
            .0;
        assert_ne!(again, a);
        assert!(st.released.is_empty());
        // keep 0: nothing is kept.
        st.release_keeping(&owner("a"), 300);
        st.prune_released(300, 0);
        assert!(st.released.is_empty());
        // A kept address never goes to the VTEP's owner... and a full subnet takes kept
        // addresses rather than failing.
        let mut st = State::default();
        for i in 0..5 {
            st.allocate_sticky(&subnets, &[], &owner(&format!("c{i}")), 0, 60)
                .unwrap();
        }
        st.release_keeping(&owner("c0"), 1);
        let x = st
            .allocate_sticky(&subnets, &[], &owner("x"), 2, 60)
            .unwrap()
            .0;
        assert_eq!(
            x,
            ip("10.42.1.2"),
            "the only free address, kept for c0, is given up"
        );
        assert!(st.released.is_empty());
        // GC forgets keeps of attachments that are not valid.
        st.release_keeping(&owner("c1"), 3);
        st.gc("mesh", &[("c2".into(), "eth0".into())]);
        assert!(st.released.is_empty());
    }

    #[test]
    fn static_claims() {
        let subnets = [net("10.42.1.0/24")];
        let vtep = [ip("10.42.1.250")];
        let mut st = State::default();
        assert_eq!(
            st.claim(&subnets, &vtep, ip("10.42.1.200"), &owner("a")),
            Ok(subnets[0])
        );
        // Again for the same owner: fine.
        assert_eq!(
            st.claim(&subnets, &vtep, ip("10.42.1.200"), &owner("a")),
            Ok(subnets[0])
        );
        let e = st
            .claim(&subnets, &vtep, ip("10.42.1.200"), &owner("b"))
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "10.42.1.200 is in use by container a ifname eth0"
        );
        for (addr, msg) in [
            (
                "10.42.2.5",
                "10.42.2.5 is not in this host's subnets (10.42.1.0/24)",
            ),
            (
                "10.42.1.0",
                "10.42.1.0 is the network address of 10.42.1.0/24",
            ),
            ("10.42.1.1", "10.42.1.1 is the gateway of 10.42.1.0/24"),
            (
                "10.42.1.255",
                "10.42.1.255 is the broadcast address of 10.42.1.0/24",
            ),
            ("10.42.1.250", "10.42.1.250 is this host's VTEP address"),
        ] {
            let e = st
                .claim(&subnets, &vtep, ip(addr), &owner("b"))
                .unwrap_err();
            assert_eq!(e.to_string(), msg);
        }
        // An address kept for someone else after its release is taken over by a request.
        st.release_keeping(&owner("a"), 5);
        assert!(st
            .claim(&subnets, &vtep, ip("10.42.1.200"), &owner("b"))
            .is_ok());
        assert!(st.released.is_empty());
        // Dynamic allocation never hands out a claimed address.
        let got = st.allocate(&subnets, &owner("c")).unwrap().0;
        assert_ne!(got, ip("10.42.1.200"));
    }

    #[test]
    fn a_store_without_keeps_is_written_as_before() {
        let mut st = State {
            version: STATE_VERSION,
            ..Default::default()
        };
        st.allocate(&[net("10.42.1.0/24")], &owner("a")).unwrap();
        let v = serde_json::to_value(&st).unwrap();
        assert!(v.get("released").is_none(), "{v}");
        st.release_keeping(&owner("a"), 7);
        let v = serde_json::to_value(&st).unwrap();
        assert_eq!(v["released"]["10.42.1.2"]["at"], 7);
        let back: State = serde_json::from_value(v).unwrap();
        assert_eq!(back, st);
    }

    #[test]
    fn reserved_addresses() {
        let s = net("10.42.1.0/24");
        assert_eq!(gateway(&s), Some(ip("10.42.1.1")));
        assert!(is_reserved(&s, ip("10.42.1.0")));
        assert!(is_reserved(&s, ip("10.42.1.1")));
        assert!(is_reserved(&s, ip("10.42.1.255")));
        assert!(is_reserved(&s, ip("10.42.2.5")));
        assert!(!is_reserved(&s, ip("10.42.1.2")));
        assert!(!is_reserved(&s, ip("10.42.1.254")));
        assert_eq!(capacity(&s), 253);
        assert_eq!(capacity(&net("10.42.1.0/30")), 1);
        assert_eq!(capacity(&net("10.42.1.0/31")), 0);
        assert_eq!(capacity(&net("10.42.1.0/32")), 0);
        assert_eq!(gateway(&net("10.42.1.0/31")), None);
        let v6 = net("fd42:0:0:1::/64");
        assert_eq!(gateway(&v6), Some(ip("fd42:0:0:1::1")));
        assert!(!is_reserved(&v6, ip("fd42:0:0:1:ffff:ffff:ffff:ffff")));
        assert_eq!(capacity(&net("fd42::/126")), 2);
    }

    #[test]
    fn allocates_in_order_and_is_idempotent() {
        let subnets = [net("10.42.1.0/24")];
        let mut st = State::default();
        let a = st.allocate(&subnets, &owner("a")).unwrap();
        let b = st.allocate(&subnets, &owner("b")).unwrap();
        assert_eq!(a, (ip("10.42.1.2"), subnets[0]));
        assert_eq!(b.0, ip("10.42.1.3"));
        assert_eq!(st.allocate(&subnets, &owner("a")).unwrap(), a);
        let other_if = Owner {
            ifname: "eth1".into(),
            ..owner("a")
        };
        assert_eq!(st.allocate(&subnets, &other_if).unwrap().0, ip("10.42.1.4"));
    }

    #[test]
    fn round_robin_does_not_reuse_at_once() {
        let subnets = [net("10.42.1.0/24")];
        let mut st = State::default();
        st.allocate(&subnets, &owner("a")).unwrap();
        assert_eq!(st.release(&owner("a")), vec![ip("10.42.1.2")]);
        assert!(st.release(&owner("a")).is_empty());
        assert_eq!(
            st.allocate(&subnets, &owner("b")).unwrap().0,
            ip("10.42.1.3")
        );
    }

    #[test]
    fn wraps_and_exhausts_and_spills_to_the_next_subnet() {
        let subnets = [net("10.42.1.0/29"), net("10.42.9.0/30")];
        let mut st = State::default();
        // /29: .2 ..= .6 (5 addresses), /30: .2 only.
        let got: Vec<IpAddr> = (0..6)
            .map(|i| st.allocate(&subnets, &owner(&format!("c{i}"))).unwrap().0)
            .collect();
        assert_eq!(
            got,
            [
                "10.42.1.2",
                "10.42.1.3",
                "10.42.1.4",
                "10.42.1.5",
                "10.42.1.6",
                "10.42.9.2"
            ]
            .map(ip)
        );
        let e = st.allocate(&subnets, &owner("x")).unwrap_err();
        assert_eq!(e.used, 6);
        assert!(e.to_string().contains("10.42.1.0/29, 10.42.9.0/30"), "{e}");
        assert_eq!(st.free(&subnets), 0);
        // Freeing one in the middle: the search wraps around to it.
        st.release(&owner("c1"));
        assert_eq!(
            st.allocate(&subnets, &owner("x")).unwrap().0,
            ip("10.42.1.3")
        );
    }

    #[test]
    fn moves_when_the_subnet_changes() {
        let mut st = State::default();
        st.allocate(&[net("10.42.1.0/24")], &owner("a")).unwrap();
        let (got, _) = st.allocate(&[net("10.42.7.0/24")], &owner("a")).unwrap();
        assert_eq!(got, ip("10.42.7.2"));
        assert_eq!(st.held_by(&owner("a")), vec![got]);
    }

    #[test]
    fn gc_keeps_valid_and_other_networks() {
        let subnets = [net("10.42.1.0/24")];
        let mut st = State::default();
        for c in ["a", "b", "c"] {
            st.allocate(&subnets, &owner(c)).unwrap();
        }
        let other = Owner {
            network: "other".into(),
            ..owner("z")
        };
        st.allocate(&subnets, &other).unwrap();
        let gone = st.gc("mesh", &[("b".into(), "eth0".into())]);
        assert_eq!(gone, vec![ip("10.42.1.2"), ip("10.42.1.4")]);
        assert_eq!(st.allocations.len(), 2);
    }

    #[test]
    fn ipv6_allocation_is_cheap() {
        let subnets = [net("fd42:0:0:1::/64")];
        let mut st = State::default();
        let (a, _) = st.allocate(&subnets, &owner("a")).unwrap();
        assert_eq!(a, ip("fd42:0:0:1::2"));
        assert!(st.free(&subnets) > 1 << 60);
    }

    #[test]
    fn store_round_trip_and_corruption() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(dir.path().join("d"));
        {
            let l = store.lock().unwrap();
            let mut st = l.load().unwrap();
            assert!(st.allocations.is_empty());
            st.allocate(&[net("10.42.1.0/24")], &owner("a")).unwrap();
            l.save(&st).unwrap();
            assert_eq!(l.load().unwrap(), st);
        }
        fs::write(store.state_path(), b"{\"version\": 1, \"allocations\": 5}").unwrap();
        let e = store.lock().unwrap().load().unwrap_err();
        assert!(matches!(e, StoreError::Corrupt { .. }), "{e}");
        assert!(e.to_string().contains("allocations.json"), "{e}");
        assert!(
            e.to_string().contains(
                "(allocations: invalid type: integer `5`, expected a map (line 1, column 31))"
            ),
            "{e}"
        );
    }

    #[test]
    fn corrupt_store_errors_name_the_json_path() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(dir.path());
        let reason = |body: &str| {
            fs::write(store.state_path(), body).unwrap();
            match store.lock().unwrap().load().unwrap_err() {
                StoreError::Corrupt { path, reason } => {
                    assert_eq!(path, store.state_path());
                    reason
                }
                e => panic!("expected Corrupt, got {e}"),
            }
        };
        let owner = r#"{"network": "mesh", "container": "c1", "ifname": "eth0"}"#;
        // A wrong type inside a map entry: the address key is quoted.
        let r = reason(&format!(
            r#"{{"version": 1, "allocations": {{"10.42.1.2": {owner}, "10.42.1.3": {{"network": "mesh", "container": 7, "ifname": "eth0"}}}}}}"#
        ));
        assert!(
            r.starts_with(r#"allocations["10.42.1.3"].container: invalid type: integer `7`"#),
            "{r}"
        );
        // A missing field, an unknown field, a bad key, a truncated file.
        let r = reason(r#"{"version": 1, "allocations": {"10.42.1.2": {"network": "mesh"}}}"#);
        assert!(
            r.starts_with(r#"allocations["10.42.1.2"]: missing field `container`"#),
            "{r}"
        );
        let r = reason(r#"{"version": 1, "allocations": {}, "lsat": {}}"#);
        assert!(r.starts_with("unknown field `lsat`"), "{r}");
        let r = reason(r#"{"version": 1, "allocations": {}, "last": {"10.42.1.0": "10.42.1.2"}}"#);
        assert!(r.starts_with(r#"last["10.42.1.0"]: "#), "{r}");
        let r = reason("{\"version\": 1,\n \"allocations\": {\"10.42.1.2\": ");
        assert!(
            r.starts_with(r#"allocations["10.42.1.2"]: EOF while parsing a value (line 2, "#),
            "{r}"
        );
    }

    #[test]
    fn lock_times_out_while_held() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(dir.path()).with_lock_timeout(Duration::from_millis(50));
        let held = store.lock().unwrap();
        // A second open file description conflicts with the first, even in one process.
        let e = store.lock().unwrap_err();
        assert!(matches!(e, StoreError::LockTimeout { .. }), "{e}");
        drop(held);
        store.lock().unwrap();
    }
}

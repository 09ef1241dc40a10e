//! Kernel change notifications: repair drift within milliseconds instead of at the next
//! resync.
//!
//! One thread listens on the XFRM multicast groups (SAs, policies, expires) and the rtnetlink
//! groups (routes, rules, links, neighbours, IPv4 and IPv6), decides for every message whether
//! it concerns an object of ours ([`classify`], pure) and asks the sidecar for a reconcile
//! ([`Wake`]) when one does. The periodic resync stays as the safety net (and is the only
//! repair for iptables, which sends no notifications).
//!
//! - **Ours** (a policy or SA with one of our reqids or our mark mask, a route in our table,
//!   a rule with our priority or table, our VXLAN device or a neighbour on it): a reconcile
//!   after [`SETTLE`] of quiet (a burst of changes, like our own reconcile's writes, gives
//!   one), at most every [`MIN_GAP`].
//! - **Foreign** (attributable to someone else): ignored. A storm of foreign changes costs the
//!   parsing of its messages, no reconcile.
//! - **Unknown** (a flush, a deletion whose message carries no owner, a receive-buffer
//!   overrun that lost messages): a reconcile, at most every [`UNKNOWN_GAP`].
//!
//! Our own writes notify too: a reconcile that wrote something is followed by one more that
//! finds nothing to do (it writes nothing, so it notifies nothing).
//!
//! Message layouts are the kernel's UAPI (`linux/xfrm.h`, `linux/rtnetlink.h`,
//! `linux/fib_rules.h`, `linux/neighbour.h`); offsets are noted where they are used.

use std::io;
use std::time::{Duration, Instant};

use super::driver::Wake;
use crate::plan::ids::is_owned_reqid;

/// Quiet time after the last message of ours before the reconcile is asked for.
pub const SETTLE: Duration = Duration::from_millis(20);
/// Shortest time between two reconciles asked for by changes of ours.
pub const MIN_GAP: Duration = Duration::from_millis(200);
/// Shortest time between two reconciles asked for by changes nobody can be told apart.
pub const UNKNOWN_GAP: Duration = Duration::from_secs(2);

/// What the watcher considers ours.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Filter {
    /// XFRM: our mark mask (policies carrying it are ours; others by reqid).
    pub mark_mask: Option<u32>,
    /// Policy routing: our table and rule priority.
    pub table: Option<u32>,
    pub rule_priority: Option<u32>,
    /// VXLAN: our device's name (its link, and routes and neighbours on it). A name ending
    /// in `*` names the links of that prefix (the xfrm route mode's `imx*` interfaces; the
    /// routes into them are in our table).
    pub device: Option<String>,
}

/// A message's verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Ours,
    Foreign,
    Unknown,
}

// Netlink family, groups, message types and attributes (linux/xfrm.h, via the crate).
const NETLINK_XFRM: i32 = 6;
#[cfg(test)]
use netlink_packet_xfrm::constants::XFRMA_POLICY;
use netlink_packet_xfrm::constants::{
    XFRMA_MARK, XFRMA_SA, XFRMA_TMPL, XFRMNLGRP_EXPIRE, XFRMNLGRP_POLICY, XFRMNLGRP_SA,
    XFRM_MSG_DELPOLICY, XFRM_MSG_DELSA, XFRM_MSG_EXPIRE, XFRM_MSG_NEWPOLICY, XFRM_MSG_NEWSA,
    XFRM_MSG_POLEXPIRE, XFRM_MSG_UPDPOLICY, XFRM_MSG_UPDSA,
};
// Layouts: the policy ones are owned by the xfrm message module.
use super::xfrm::messages::{
    POL_INFO_LEN as USERPOLICY_INFO_LEN, TMPL_LEN as USER_TMPL_LEN, TMPL_REQID as USER_TMPL_REQID,
};
/// `struct xfrm_userpolicy_id` (selector 56 + index + dir, aligned).
const USERPOLICY_ID_LEN: usize = 64;
/// `struct xfrm_usersa_info`; `reqid` at 208 (selector 56, id 24, saddr 16, lifetimes 96,
/// stats 12, seq 4).
const USERSA_INFO_LEN: usize = 224;
const USERSA_REQID: usize = 208;
/// `struct xfrm_usersa_id`.
const USERSA_ID_LEN: usize = 24;
const RTNLGRP_LINK: u32 = 1;
const RTNLGRP_NEIGH: u32 = 3;
const RTNLGRP_IPV4_ROUTE: u32 = 7;
const RTNLGRP_IPV4_RULE: u32 = 8;
const RTNLGRP_IPV6_ROUTE: u32 = 11;
const RTNLGRP_IPV6_RULE: u32 = 19;

// rtnetlink message types and attributes.
const RTM_NEWLINK: u16 = 16;
const RTM_DELLINK: u16 = 17;
const RTM_NEWROUTE: u16 = 24;
const RTM_DELROUTE: u16 = 25;
const RTM_NEWNEIGH: u16 = 28;
const RTM_DELNEIGH: u16 = 29;
const RTM_NEWRULE: u16 = 32;
const RTM_DELRULE: u16 = 33;
const IFLA_IFNAME: u16 = 3;
const RTA_OIF: u16 = 4;
const RTA_TABLE: u16 = 15;
const FRA_PRIORITY: u16 = 6;
const FRA_TABLE: u16 = 15;

fn u32_at(b: &[u8], off: usize) -> Option<u32> {
    b.get(off..off + 4)
        .map(|s| u32::from_ne_bytes([s[0], s[1], s[2], s[3]]))
}

/// Netlink attributes (type without flag bits, payload) from `b`.
fn attrs(mut b: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    std::iter::from_fn(move || {
        if b.len() < 4 {
            return None;
        }
        let len = usize::from(u16::from_ne_bytes([b[0], b[1]]));
        let kind = u16::from_ne_bytes([b[2], b[3]]) & 0x3fff;
        if len < 4 || len > b.len() {
            return None;
        }
        let data = &b[4..len];
        let next = ((len + 3) & !3).min(b.len());
        b = &b[next..];
        Some((kind, data))
    })
}

/// The verdict on one XFRM notification (type, payload after the netlink header).
pub fn classify_xfrm(kind: u16, payload: &[u8], f: &Filter) -> Verdict {
    let policy = |body: &[u8], attrs_from: usize| -> Verdict {
        let mut seen = false;
        for (t, d) in attrs(body.get(attrs_from..).unwrap_or(&[])) {
            match t {
                XFRMA_TMPL => {
                    for tmpl in d.chunks_exact(USER_TMPL_LEN) {
                        seen = true;
                        if u32_at(tmpl, USER_TMPL_REQID).is_some_and(is_owned_reqid) {
                            return Verdict::Ours;
                        }
                    }
                }
                XFRMA_MARK => {
                    seen = true;
                    if f.mark_mask.is_some() && u32_at(d, 4) == f.mark_mask {
                        return Verdict::Ours;
                    }
                }
                _ => {}
            }
        }
        if seen {
            Verdict::Foreign
        } else {
            Verdict::Unknown
        }
    };
    let sa = |info: &[u8]| match u32_at(info, USERSA_REQID) {
        Some(r) if is_owned_reqid(r) => Verdict::Ours,
        Some(_) => Verdict::Foreign,
        None => Verdict::Unknown,
    };
    match kind {
        XFRM_MSG_NEWPOLICY | XFRM_MSG_UPDPOLICY | XFRM_MSG_POLEXPIRE => {
            policy(payload, USERPOLICY_INFO_LEN)
        }
        XFRM_MSG_DELPOLICY => {
            // The id, then the deleted policy (XFRMA_POLICY) and its templates.
            policy(payload, USERPOLICY_ID_LEN)
        }
        XFRM_MSG_NEWSA | XFRM_MSG_UPDSA | XFRM_MSG_EXPIRE => sa(payload),
        XFRM_MSG_DELSA => attrs(payload.get(USERSA_ID_LEN..).unwrap_or(&[]))
            .find(|(t, d)| *t == XFRMA_SA && d.len() >= USERSA_INFO_LEN)
            .map_or(Verdict::Unknown, |(_, d)| sa(d)),
        // Flushes and anything else: cannot tell.
        _ => Verdict::Unknown,
    }
}

/// The verdict on one rtnetlink notification; `ifindex` is our device's, if it exists.
pub fn classify_route(kind: u16, payload: &[u8], f: &Filter, ifindex: Option<u32>) -> Verdict {
    let ours = |b: bool| if b { Verdict::Ours } else { Verdict::Foreign };
    match kind {
        RTM_NEWROUTE | RTM_DELROUTE => {
            // struct rtmsg (12 bytes): table (u8) at 4; RTA_TABLE holds the full number.
            let mut table = payload.get(4).map(|&t| u32::from(t));
            let mut oif = None;
            for (t, d) in attrs(payload.get(12..).unwrap_or(&[])) {
                match t {
                    RTA_TABLE => table = u32_at(d, 0),
                    RTA_OIF => oif = u32_at(d, 0),
                    _ => {}
                }
            }
            ours((f.table.is_some() && table == f.table) || (ifindex.is_some() && oif == ifindex))
        }
        RTM_NEWRULE | RTM_DELRULE => {
            // struct fib_rule_hdr (12 bytes): table (u8) at 4.
            let mut table = payload.get(4).map(|&t| u32::from(t));
            let mut prio = None;
            for (t, d) in attrs(payload.get(12..).unwrap_or(&[])) {
                match t {
                    FRA_TABLE => table = u32_at(d, 0),
                    FRA_PRIORITY => prio = u32_at(d, 0),
                    _ => {}
                }
            }
            ours(
                (f.table.is_some() && table == f.table)
                    || (f.rule_priority.is_some() && prio == f.rule_priority),
            )
        }
        RTM_NEWLINK | RTM_DELLINK => {
            // struct ifinfomsg (16 bytes), then IFLA_IFNAME (NUL-terminated).
            let name = attrs(payload.get(16..).unwrap_or(&[]))
                .find(|(t, _)| *t == IFLA_IFNAME)
                .map(|(_, d)| d.split(|&c| c == 0).next().unwrap_or(&[]));
            ours(match (&f.device, name) {
                (Some(dev), Some(n)) => match dev.strip_suffix('*') {
                    Some(prefix) => n.starts_with(prefix.as_bytes()),
                    None => dev.as_bytes() == n,
                },
                _ => false,
            })
        }
        RTM_NEWNEIGH | RTM_DELNEIGH => {
            // struct ndmsg (12 bytes): ifindex (i32) at 4.
            ours(ifindex.is_some() && u32_at(payload, 4) == ifindex)
        }
        _ => Verdict::Foreign,
    }
}

/// Netlink messages (type, payload) in a receive buffer.
fn messages(mut b: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    std::iter::from_fn(move || {
        if b.len() < 16 {
            return None;
        }
        let len = u32_at(b, 0)? as usize;
        let kind = u16::from_ne_bytes([b[4], b[5]]);
        if len < 16 || len > b.len() {
            return None;
        }
        let payload = &b[16..len];
        let next = ((len + 3) & !3).min(b.len());
        b = &b[next..];
        Some((kind, payload))
    })
}

struct Socket(i32);

impl Drop for Socket {
    fn drop(&mut self) {
        // SAFETY: closing a descriptor this struct owns.
        unsafe { libc::close(self.0) };
    }
}

fn open(protocol: i32, groups: &[u32]) -> io::Result<Socket> {
    // SAFETY: plain socket calls with valid arguments; the fd is owned by `Socket`.
    unsafe {
        let fd = libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
            protocol,
        );
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let s = Socket(fd);
        let mut addr: libc::sockaddr_nl = std::mem::zeroed();
        addr.nl_family = libc::AF_NETLINK as u16;
        if libc::bind(
            fd,
            (&addr as *const libc::sockaddr_nl).cast(),
            std::mem::size_of::<libc::sockaddr_nl>() as u32,
        ) != 0
        {
            return Err(io::Error::last_os_error());
        }
        let size: libc::c_int = 4 << 20;
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVBUF,
            (&size as *const libc::c_int).cast(),
            4,
        );
        for g in groups {
            if libc::setsockopt(
                fd,
                libc::SOL_NETLINK,
                libc::NETLINK_ADD_MEMBERSHIP,
                (g as *const u32).cast(),
                4,
            ) != 0
            {
                return Err(io::Error::last_os_error());
            }
        }
        Ok(s)
    }
}

fn ifindex(name: &str) -> Option<u32> {
    let c = std::ffi::CString::new(name).ok()?;
    // SAFETY: a NUL-terminated name.
    let i = unsafe { libc::if_nametoindex(c.as_ptr()) };
    (i != 0).then_some(i)
}

/// The process's watcher: its filter grows with every driver that asks ([`ensure`]).
static WATCHER: std::sync::Mutex<Option<std::sync::Arc<std::sync::Mutex<Filter>>>> =
    std::sync::Mutex::new(None);

/// Watch this network namespace (the caller's) for changes to what `filter` names: starts
/// the process's watcher thread on the first call, widens its filter on later ones (the
/// drivers of a stack each add theirs). Returns once subscribed: a change made after it
/// returns is seen.
pub fn ensure(filter: Filter, wake: Wake) -> io::Result<()> {
    let mut w = WATCHER.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(shared) = w.as_ref() {
        let mut f = shared.lock().unwrap_or_else(|e| e.into_inner());
        f.mark_mask = f.mark_mask.or(filter.mark_mask);
        f.table = f.table.or(filter.table);
        f.rule_priority = f.rule_priority.or(filter.rule_priority);
        f.device = f.device.take().or(filter.device);
        return Ok(());
    }
    let shared = std::sync::Arc::new(std::sync::Mutex::new(filter));
    spawn(shared.clone(), wake)?;
    *w = Some(shared);
    Ok(())
}

fn spawn(filter: std::sync::Arc<std::sync::Mutex<Filter>>, wake: Wake) -> io::Result<()> {
    let xfrm = open(
        NETLINK_XFRM,
        &[XFRMNLGRP_EXPIRE, XFRMNLGRP_SA, XFRMNLGRP_POLICY],
    )?;
    let route = open(
        libc::NETLINK_ROUTE,
        &[
            RTNLGRP_LINK,
            RTNLGRP_NEIGH,
            RTNLGRP_IPV4_ROUTE,
            RTNLGRP_IPV4_RULE,
            RTNLGRP_IPV6_ROUTE,
            RTNLGRP_IPV6_RULE,
        ],
    )?;
    std::thread::Builder::new()
        .name("kernel-notify".into())
        .spawn(move || run(xfrm, route, filter, wake))?;
    Ok(())
}

fn run(xfrm: Socket, route: Socket, shared: std::sync::Arc<std::sync::Mutex<Filter>>, wake: Wake) {
    let mut buf = vec![0u8; 1 << 16];
    let mut filter = shared
        .lock()
        .map(|f| f.clone())
        .unwrap_or_else(|e| e.into_inner().clone());
    let mut pending: Option<(Verdict, Instant)> = None;
    let mut last_wake: Option<Instant> = None;
    let mut last_unknown_wake: Option<Instant> = None;
    let mut dev_index = filter.device.as_deref().and_then(ifindex);
    loop {
        let timeout = match pending {
            Some(_) => SETTLE.as_millis() as i32,
            None => 1000,
        };
        let mut fds = [
            libc::pollfd {
                fd: xfrm.0,
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: route.0,
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: two valid pollfds.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, timeout) };
        if n < 0 && io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
            tracing::warn!(error = %io::Error::last_os_error(), "kernel notifications: poll failed; resync only");
            return;
        }
        let mut got = false;
        if let Ok(f) = shared.lock() {
            if *f != filter {
                filter = f.clone();
                dev_index = filter.device.as_deref().and_then(ifindex);
            }
        }
        for (i, s) in [&xfrm, &route].into_iter().enumerate() {
            if fds[i].revents == 0 {
                continue;
            }
            loop {
                // SAFETY: reading into a buffer we own, non-blocking.
                let r = unsafe { libc::recv(s.0, buf.as_mut_ptr().cast(), buf.len(), 0) };
                if r < 0 {
                    let e = io::Error::last_os_error();
                    if e.raw_os_error() == Some(libc::ENOBUFS) {
                        // Messages were lost: cannot tell whose.
                        note(&mut pending, Verdict::Unknown);
                        got = true;
                        continue;
                    }
                    break;
                }
                if r == 0 {
                    break;
                }
                for (kind, payload) in messages(&buf[..r as usize]) {
                    let v = if i == 0 {
                        classify_xfrm(kind, payload, &filter)
                    } else {
                        if matches!(kind, RTM_NEWLINK | RTM_DELLINK) {
                            dev_index = filter.device.as_deref().and_then(ifindex);
                        }
                        classify_route(kind, payload, &filter, dev_index)
                    };
                    if v != Verdict::Foreign {
                        note(&mut pending, v);
                        got = true;
                    }
                }
            }
        }
        if got {
            continue; // wait for quiet
        }
        let Some((v, _)) = pending else {
            continue;
        };
        let now = Instant::now();
        let (gap, last) = match v {
            Verdict::Ours => (MIN_GAP, &mut last_wake),
            _ => (UNKNOWN_GAP, &mut last_unknown_wake),
        };
        if last.is_some_and(|t| now.duration_since(t) < gap) {
            continue; // keep it pending until the gap has passed
        }
        *last = Some(now);
        pending = None;
        tracing::debug!(verdict = ?v, "kernel change: reconcile");
        wake();
    }
}

/// Remember a change; `Ours` outranks `Unknown`.
fn note(pending: &mut Option<(Verdict, Instant)>, v: Verdict) {
    let now = Instant::now();
    *pending = match *pending {
        Some((Verdict::Ours, t)) => Some((Verdict::Ours, t)),
        _ => Some((v, now)),
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attr(kind: u16, data: &[u8]) -> Vec<u8> {
        let len = 4 + data.len();
        let mut v = Vec::new();
        v.extend_from_slice(&(len as u16).to_ne_bytes());
        v.extend_from_slice(&kind.to_ne_bytes());
        v.extend_from_slice(data);
        while v.len() % 4 != 0 {
            v.push(0);
        }
        v
    }

    fn tmpl(reqid: u32) -> Vec<u8> {
        let mut t = vec![0u8; USER_TMPL_LEN];
        t[USER_TMPL_REQID..USER_TMPL_REQID + 4].copy_from_slice(&reqid.to_ne_bytes());
        t
    }

    fn filter() -> Filter {
        Filter {
            mark_mask: Some(0x300000),
            table: Some(1042),
            rule_priority: Some(1042),
            device: Some("vtep1042".into()),
        }
    }

    #[test]
    fn policies_are_told_apart_by_reqid_and_mark() {
        let f = filter();
        let mut ours = vec![0u8; USERPOLICY_INFO_LEN];
        ours.extend(attr(XFRMA_TMPL, &tmpl(0x5000_0007)));
        assert_eq!(classify_xfrm(XFRM_MSG_NEWPOLICY, &ours, &f), Verdict::Ours);
        let mut foreign = vec![0u8; USERPOLICY_INFO_LEN];
        foreign.extend(attr(XFRMA_TMPL, &tmpl(7)));
        assert_eq!(
            classify_xfrm(XFRM_MSG_NEWPOLICY, &foreign, &f),
            Verdict::Foreign
        );
        // Our block policy: no template, our mark mask.
        let mut block = vec![0u8; USERPOLICY_INFO_LEN];
        let mut m = 0x100000u32.to_ne_bytes().to_vec();
        m.extend(0x300000u32.to_ne_bytes());
        block.extend(attr(XFRMA_MARK, &m));
        assert_eq!(classify_xfrm(XFRM_MSG_UPDPOLICY, &block, &f), Verdict::Ours);
        // A deletion with its templates after the id.
        let mut del = vec![0u8; USERPOLICY_ID_LEN];
        del.extend(attr(XFRMA_POLICY, &[0u8; USERPOLICY_INFO_LEN]));
        del.extend(attr(XFRMA_TMPL, &tmpl(0x5000_0007)));
        assert_eq!(classify_xfrm(XFRM_MSG_DELPOLICY, &del, &f), Verdict::Ours);
        // Nothing to go by: unknown.
        assert_eq!(
            classify_xfrm(XFRM_MSG_DELPOLICY, &[0u8; USERPOLICY_ID_LEN], &f),
            Verdict::Unknown
        );
        assert_eq!(classify_xfrm(29, &[], &f), Verdict::Unknown, "flush");
    }

    #[test]
    fn sas_by_reqid_also_when_deleted() {
        let f = filter();
        let mut info = vec![0u8; USERSA_INFO_LEN];
        info[USERSA_REQID..USERSA_REQID + 4].copy_from_slice(&0x5123_4567u32.to_ne_bytes());
        assert_eq!(classify_xfrm(XFRM_MSG_NEWSA, &info, &f), Verdict::Ours);
        assert_eq!(classify_xfrm(XFRM_MSG_EXPIRE, &info, &f), Verdict::Ours);
        let mut del = vec![0u8; USERSA_ID_LEN];
        del.extend(attr(XFRMA_SA, &info));
        assert_eq!(classify_xfrm(XFRM_MSG_DELSA, &del, &f), Verdict::Ours);
        info[USERSA_REQID..USERSA_REQID + 4].copy_from_slice(&42u32.to_ne_bytes());
        assert_eq!(classify_xfrm(XFRM_MSG_NEWSA, &info, &f), Verdict::Foreign);
    }

    #[test]
    fn routes_rules_links_and_neighbours() {
        let f = filter();
        let mut r = vec![0u8; 12];
        r[4] = 252; // RT_TABLE_COMPAT: the real table is in RTA_TABLE
        r.extend(attr(RTA_TABLE, &1042u32.to_ne_bytes()));
        assert_eq!(classify_route(RTM_DELROUTE, &r, &f, None), Verdict::Ours);
        let mut main = vec![0u8; 12];
        main[4] = 254;
        main.extend(attr(RTA_TABLE, &254u32.to_ne_bytes()));
        assert_eq!(
            classify_route(RTM_NEWROUTE, &main, &f, None),
            Verdict::Foreign
        );
        let mut via_dev = main.clone();
        via_dev.extend(attr(RTA_OIF, &9u32.to_ne_bytes()));
        assert_eq!(
            classify_route(RTM_NEWROUTE, &via_dev, &f, Some(9)),
            Verdict::Ours
        );
        let mut rule = vec![0u8; 12];
        rule.extend(attr(FRA_PRIORITY, &1042u32.to_ne_bytes()));
        assert_eq!(classify_route(RTM_DELRULE, &rule, &f, None), Verdict::Ours);
        let mut link = vec![0u8; 16];
        link.extend(attr(IFLA_IFNAME, b"vtep1042\0"));
        assert_eq!(classify_route(RTM_DELLINK, &link, &f, None), Verdict::Ours);
        let mut other = vec![0u8; 16];
        other.extend(attr(IFLA_IFNAME, b"eth0\0"));
        assert_eq!(
            classify_route(RTM_NEWLINK, &other, &f, None),
            Verdict::Foreign
        );
        let mut neigh = vec![0u8; 12];
        neigh[4..8].copy_from_slice(&9u32.to_ne_bytes());
        assert_eq!(
            classify_route(RTM_NEWNEIGH, &neigh, &f, Some(9)),
            Verdict::Ours
        );
        assert_eq!(
            classify_route(RTM_NEWNEIGH, &neigh, &f, Some(3)),
            Verdict::Foreign
        );
        // The xfrm route mode's interfaces: a name prefix.
        let routed = Filter {
            device: Some("imx*".into()),
            ..filter()
        };
        let mut imx = vec![0u8; 16];
        imx.extend(attr(IFLA_IFNAME, b"imx3a\0"));
        assert_eq!(
            classify_route(RTM_DELLINK, &imx, &routed, None),
            Verdict::Ours
        );
        assert_eq!(
            classify_route(RTM_DELLINK, &imx, &f, None),
            Verdict::Foreign
        );
        assert_eq!(
            classify_route(RTM_NEWLINK, &other, &routed, None),
            Verdict::Foreign
        );
        // The route mode's policies: 0/0 with our reqid (template) or the inbound block
        // policies' mark mask.
        let mut under = vec![0u8; USERPOLICY_INFO_LEN];
        under.extend(attr(
            XFRMA_MARK,
            &[0u32.to_ne_bytes(), 0x30_0000u32.to_ne_bytes()].concat(),
        ));
        assert_eq!(classify_xfrm(XFRM_MSG_NEWPOLICY, &under, &f), Verdict::Ours);
    }

    #[test]
    fn truncated_messages_do_not_panic() {
        let f = filter();
        for n in 0..300 {
            let b = vec![0xffu8; n];
            for k in [16u16, 17, 19, 20, 24, 25, 26, 27, 28, 29] {
                let _ = classify_xfrm(k, &b, &f);
                let _ = classify_route(k, &b, &f, Some(1));
            }
            let _ = messages(&b).count();
            let _ = attrs(&b).count();
        }
    }
}

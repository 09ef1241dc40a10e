//! Kernel XFRM driver (IKE-less): policies and ESP SAs from the plan, over netlink.
//!
//! `objects` (comparable values) <- `desired` (pure, from the plan) and `messages` (pure,
//! build/parse) -> `reconcile::diff` (pure) -> [`reconcile`] here, the only function that
//! talks to the kernel, through `socket`.

pub mod desired;
pub mod messages;
pub mod objects;
pub mod reconcile;
pub mod socket;

use netlink_packet_core::{NLM_F_CREATE, NLM_F_EXCL};
use tracing::{debug, info, warn};

use crate::plan::{Marks, Plan, Transform};
use objects::{Owner, Sa, SaId};
use reconcile::{Current, Op, Step};
use socket::{KernelError, SocketError, XfrmSocket};

/// What one reconcile or cleanup did.
#[derive(Debug, Default)]
pub struct Report {
    /// Modifying requests sent to the kernel.
    pub writes: usize,
    /// One line per change applied (or attempted), never key material.
    pub changes: Vec<String>,
    /// Per-owner failures, in words.
    pub errors: Vec<(Owner, String)>,
    /// Set when the kernel cannot hold ESP SAs: SAs were skipped, policies installed.
    pub esp_unsupported: Option<String>,
}

impl Report {
    pub fn ok(&self) -> bool {
        self.errors.is_empty()
    }
}

/// Read our policies and SAs (recognised by reqid range and mark) from the kernel.
/// Which objects a reconcile or cleanup manages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// Policies and SAs (the IKE-less driver).
    All,
    /// Policies only: the SAs (with our reqids) are installed by charon with `policies = no`
    /// and are never read, changed or deleted here.
    PoliciesOnly,
}

pub fn read_current(sock: &mut XfrmSocket, marks: &Marks) -> Result<Current, SocketError> {
    read_current_scoped(sock, marks, Scope::All)
}

/// Our policies and, with [`Scope::All`], our SAs.
pub fn read_current_scoped(
    sock: &mut XfrmSocket,
    marks: &Marks,
    scope: Scope,
) -> Result<Current, SocketError> {
    let mut cur = Current::default();
    sock.dump_raw(messages::policy_dump(), |bytes| {
        if let Some(p) = messages::parse_policy_raw(bytes) {
            if p.is_owned(marks) {
                cur.policies.push(p);
            }
        }
    })?;
    if scope == Scope::PoliciesOnly {
        return Ok(cur);
    }
    for m in sock.dump(messages::sa_dump())? {
        let Some((id, reqid)) = messages::parse_sa_id(&m) else {
            continue;
        };
        if !crate::plan::ids::is_owned_reqid(reqid) {
            continue;
        }
        match messages::parse_sa(&m) {
            Some(sa) => cur.sas.push(sa),
            None => cur.odd_sas.push((id, reqid)),
        }
    }
    Ok(cur)
}

/// Byte and packet counters of every ipsec-mesh SA, by identity.
pub fn sa_counters() -> Result<std::collections::HashMap<SaId, (u64, u64)>, SocketError> {
    let mut sock = XfrmSocket::open()?;
    Ok(sock
        .dump(messages::sa_dump())?
        .iter()
        .filter_map(messages::parse_sa_counters)
        .filter(|(_, reqid, _, _)| crate::plan::ids::is_owned_reqid(*reqid))
        .map(|(id, _, b, p)| (id, (b, p)))
        .collect())
}

/// Explain a refused request in words an operator can act on.
pub fn explain(e: &KernelError, transform: Transform) -> String {
    let no_esp = e.errno == libc::EPROTONOSUPPORT
        || (e.errno == libc::ENOENT
            && e.message
                .as_deref()
                .is_some_and(|m| m.contains("type not found")));
    if no_esp {
        format!("this kernel cannot hold ESP SAs: CONFIG_INET_ESP is missing (kernel said: {e})")
    } else if e.errno == libc::ENOSYS {
        format!("this kernel lacks the crypto for {transform} (kernel said: {e})")
    } else {
        e.to_string()
    }
}

/// Try one throwaway ESP SA (documentation addresses, an SPI outside ipsec-mesh's range,
/// reqid 0) with the plan's transform, then remove it. `Err` names what the kernel lacks.
fn probe_esp(sock: &mut XfrmSocket, plan: &Plan) -> Result<(), String> {
    let explain_any = |e: SocketError, t| match e {
        SocketError::Kernel(k) => explain(&k, t),
        other => other.to_string(),
    };
    match probe_transform(sock, plan, plan.transform) {
        Ok(()) => Ok(()),
        Err(first) => {
            // Tell "no ESP at all" from "no crypto for this transform": CBC + HMAC-SHA-256
            // is in every ESP-capable kernel.
            let base = Transform::Aes128Sha256;
            match probe_transform(sock, plan, base) {
                Ok(()) => Err(explain_any(first, plan.transform)),
                Err(e) => Err(explain_any(e, base)),
            }
        }
    }
}

fn probe_transform(
    sock: &mut XfrmSocket,
    plan: &Plan,
    transform: Transform,
) -> Result<(), SocketError> {
    let v6 = plan.endpoint.is_ipv6();
    let (src, dst) = if v6 {
        (
            "2001:db8::1".parse().unwrap(),
            "2001:db8::2".parse().unwrap(),
        )
    } else {
        ("192.0.2.1".parse().unwrap(), "192.0.2.2".parse().unwrap())
    };
    let key = crate::plan::KeyDeriver::new(&crate::plan::Psk::from_bytes(&[0; 32]))
        .derive("probe", "probe", 0, transform);
    let sa = Sa {
        id: SaId {
            dst,
            spi: 0x0000_0101,
        },
        src,
        reqid: 0,
        inner_v6: plan.cidr.network().is_ipv6(),
        crypto: desired::crypto(transform, &key),
        encap: None,
        output_mark: None,
        replay_window: 0,
        oseq_may_wrap: false,
        transport: false,
    };
    let r = sock.batch(vec![
        (messages::sa_add(&sa), NLM_F_CREATE | NLM_F_EXCL),
        (messages::sa_del(&sa.id), 0),
    ])?;
    match r.into_iter().next() {
        Some(Err(e)) => Err(e.into()),
        _ => Ok(()),
    }
}

fn message(op: &Op) -> (netlink_packet_xfrm::XfrmMessage, u16) {
    match op {
        Op::AddPolicy(p) => (messages::policy_add(p, false), NLM_F_CREATE | NLM_F_EXCL),
        Op::UpdatePolicy(p) => (messages::policy_add(p, true), 0),
        Op::DelPolicy(id) => (messages::policy_del(id), 0),
        Op::AddSa(s) => (messages::sa_add(s), NLM_F_CREATE | NLM_F_EXCL),
        Op::DelSa(id) => (messages::sa_del(id), 0),
    }
}

/// Send `steps` in one batch; record changes, writes and per-owner errors.
fn apply_steps(
    sock: &mut XfrmSocket,
    steps: Vec<Step>,
    transform: Transform,
    report: &mut Report,
) -> Result<(), SocketError> {
    if steps.is_empty() {
        return Ok(());
    }
    let msgs = steps.iter().map(|s| message(&s.op)).collect();
    let results = sock.batch(msgs)?;
    report.writes += steps.len();
    for (step, r) in steps.into_iter().zip(results) {
        let line = step.describe();
        match r {
            Ok(()) => {
                debug!(change = %line, "xfrm");
                report.changes.push(line);
            }
            // Deleting what is already gone is success.
            Err(e)
                if e.errno == libc::ENOENT
                    && matches!(step.op, Op::DelPolicy(_) | Op::DelSa(_)) =>
            {
                report.changes.push(line);
            }
            Err(e) => {
                let why = match step.op {
                    Op::AddPolicy(_) | Op::AddSa(_) if e.errno == libc::EEXIST => format!(
                        "an object with this identity exists and is not ipsec-mesh's (left untouched) ({e})"
                    ),
                    _ => explain(&e, transform),
                };
                warn!(peer = %step.owner, change = %line, error = %why, "xfrm change failed");
                report.errors.push((step.owner, format!("{line}: {why}")));
            }
        }
    }
    Ok(())
}

/// Set the SPD hash thresholds for the prefix lengths in use, if they differ.
fn tune_spd(sock: &mut XfrmSocket, plan: &Plan, report: &mut Report) {
    let Some((l, r)) = desired::prefix_thresholds(plan) else {
        return;
    };
    let v6 = plan.cidr.network().is_ipv6();
    let current = sock
        .query(messages::spdinfo_get())
        .ok()
        .and_then(|m| messages::spdinfo_thresholds(&m, v6));
    if current == Some((l, r)) {
        return;
    }
    report.writes += 1;
    match sock.batch(vec![(messages::spdinfo_set(v6, l, r), 0)]) {
        Ok(v) if v.iter().all(Result::is_ok) => report
            .changes
            .push(format!("~ spd hash thresholds {l}/{r} [mesh]")),
        // Only a lookup-speed tuning: log, do not fail the reconcile.
        other => warn!(?other, "could not set SPD hash thresholds"),
    }
}

/// Make the kernel's XFRM state match `plan`: dump, diff, apply only the difference.
/// Peers fail independently; the error return is for the socket or a dump failing.
pub fn reconcile(plan: &Plan) -> Result<Report, SocketError> {
    reconcile_scoped(plan, Scope::All)
}

/// [`reconcile`] of the objects in `scope`.
pub fn reconcile_scoped(plan: &Plan, scope: Scope) -> Result<Report, SocketError> {
    let mut want = desired::desired(plan);
    if scope == Scope::PoliciesOnly {
        want.sas.clear();
    }
    reconcile_desired(plan, want, scope, true)
}

/// Encrypted VXLAN: make the kernel hold exactly [`desired::vxlan_esp`] (ESP transport mode
/// for UDP `port` between this host and its peers).
pub fn reconcile_vxlan_esp(plan: &Plan, port: u16) -> Result<Report, SocketError> {
    reconcile_desired(plan, desired::vxlan_esp(plan, port), Scope::All, false)
}

fn reconcile_desired(
    plan: &Plan,
    want: desired::Desired,
    scope: Scope,
    tune_hash: bool,
) -> Result<Report, SocketError> {
    let mut sock = XfrmSocket::open()?;
    let current = read_current_scoped(&mut sock, &plan.marks, scope)?;
    let mut steps = reconcile::diff(&current, &want);
    let mut report = Report::default();

    if steps.iter().any(|s| matches!(s.op, Op::AddSa(_))) {
        if let Err(why) = probe_esp(&mut sock, plan) {
            warn!(error = %why, "ESP SAs cannot be installed; installing policies only (fail closed)");
            let mut failed = std::collections::BTreeSet::new();
            steps.retain(|s| {
                if matches!(s.op, Op::AddSa(_)) {
                    failed.insert(s.owner.clone());
                    false
                } else {
                    true
                }
            });
            for owner in failed {
                report.errors.push((owner, why.clone()));
            }
            report.esp_unsupported = Some(why);
        }
    }
    // Hash thresholds first, so the policies below land in hash buckets instead of the
    // kernel's linear inexact lists.
    if tune_hash {
        tune_spd(&mut sock, plan, &mut report);
    }
    apply_steps(&mut sock, steps, plan.transform, &mut report)?;
    info!(
        writes = report.writes,
        errors = report.errors.len(),
        policies = want.policies.len(),
        sas = want.sas.len(),
        "xfrm reconcile done"
    );
    Ok(report)
}

/// Remove every XFRM object ipsec-mesh owns (and nothing else). Idempotent.
pub fn cleanup(marks: &Marks) -> Result<Report, SocketError> {
    cleanup_scoped(marks, Scope::All)
}

/// [`cleanup`] of the objects in `scope`.
pub fn cleanup_scoped(marks: &Marks, scope: Scope) -> Result<Report, SocketError> {
    let mut sock = XfrmSocket::open()?;
    let current = read_current_scoped(&mut sock, marks, scope)?;
    let steps = reconcile::diff(&current, &desired::Desired::default());
    let mut report = Report::default();
    apply_steps(&mut sock, steps, Transform::default(), &mut report)?;
    Ok(report)
}

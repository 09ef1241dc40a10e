//! Kernel XFRM driver (IKE-less): policies and ESP SAs from the plan, over netlink.
//!
//! `objects` (comparable values) <- `desired` (pure, from the plan) and `messages` (pure,
//! build/parse) -> `reconcile::diff` (pure) -> [`reconcile`] here, the only function that
//! talks to the kernel, through `socket`. Beside it: `encap` (the UDP socket ESP-in-UDP
//! needs) and `stat` (the kernel's XFRM error counters).

pub mod desired;
pub mod encap;
pub mod messages;
pub mod objects;
pub mod reconcile;
pub mod seq;
pub mod socket;
pub mod stat;

use netlink_packet_core::{NLM_F_CREATE, NLM_F_EXCL};
use tracing::{debug, info, warn};

use crate::dataplane::report::Change;
use crate::plan::{Marks, Plan, Transform};
use objects::{Inner, Sa, SaId};
use reconcile::{Current, Op, Step};
use socket::{KernelError, SocketError, XfrmSocket};

/// What one reconcile or cleanup did: the [common report](crate::dataplane::report). A
/// kernel that cannot hold ESP SAs is a warning (SAs skipped, policies installed); the
/// sequence states raised to the clock ([`tend_sequences`]) are the part `sequence raises`,
/// not counted in `writes`, which counts objects.
pub use crate::dataplane::report::Report;

/// The part name of [`Report::parts`] for the sequence states a reconcile raised.
pub const SEQ_RAISES: &str = "sequence raises";

/// Read our policies and SAs (recognised by reqid range and mark) from the kernel.
/// Which objects a reconcile or cleanup manages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// Policies and SAs (the IKE-less driver).
    All,
    /// Policies only: the SAs (with our reqids) are installed by charon with `policies = no`
    /// and are never read, changed or deleted here.
    PoliciesOnly,
    /// SAs only: the policies are not read, changed or deleted (encrypted VXLAN's cleanup
    /// removes the SAs before the VXLAN device, the policies after it).
    SasOnly,
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
    if scope != Scope::SasOnly {
        sock.dump_raw(messages::policy_dump(), |bytes| {
            if let Some(p) = messages::parse_policy_raw(bytes) {
                if p.is_owned(marks) {
                    cur.policies.push(p);
                }
            }
        })?;
    }
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
            Some(sa) => {
                if let Some(s) = messages::parse_sa_seq(&m) {
                    cur.seq.push(s);
                }
                cur.sas.push(sa)
            }
            None => cur.odd_sas.push((id, reqid)),
        }
    }
    Ok(cur)
}

/// Counters of every ipsec-mesh SA, by identity.
pub fn sa_counters() -> Result<std::collections::HashMap<SaId, messages::SaCounters>, SocketError> {
    let mut sock = XfrmSocket::open()?;
    Ok(sock
        .dump(messages::sa_dump())?
        .iter()
        .filter_map(messages::parse_sa_counters)
        .filter(|(_, reqid, _)| crate::plan::ids::is_owned_reqid(*reqid))
        .map(|(id, _, c)| (id, c))
        .collect())
}

/// Explain a refused request in words an operator can act on.
pub fn explain(e: &KernelError, transform: Transform) -> String {
    if lacks_esp(e) {
        format!("this kernel cannot hold ESP SAs: CONFIG_INET_ESP is missing (kernel said: {e})")
    } else if e.errno == libc::ENOSYS {
        format!("this kernel lacks the crypto for {transform} (kernel said: {e})")
    } else {
        e.to_string()
    }
}

/// What the ESP probe needs from the plan.
#[derive(Debug, Clone, Copy)]
struct ProbeSpec {
    /// Underlay (SA addresses) is IPv6.
    v6: bool,
    /// Overlay (selector family) is IPv6.
    inner_v6: bool,
    transform: Transform,
}

impl ProbeSpec {
    fn of(plan: &Plan) -> ProbeSpec {
        ProbeSpec {
            v6: plan.endpoint.is_ipv6(),
            inner_v6: plan.cidr.network().is_ipv6(),
            transform: plan.transform,
        }
    }
}

/// The one call the probe makes: [`XfrmSocket::batch`] (a trait so tests can answer it).
trait Requests {
    fn batch(
        &mut self,
        reqs: Vec<(netlink_packet_xfrm::XfrmMessage, u16)>,
    ) -> Result<Vec<Result<(), KernelError>>, SocketError>;
}

impl Requests for XfrmSocket {
    fn batch(
        &mut self,
        reqs: Vec<(netlink_packet_xfrm::XfrmMessage, u16)>,
    ) -> Result<Vec<Result<(), KernelError>>, SocketError> {
        XfrmSocket::batch(self, reqs)
    }
}

/// Whether a probe SA that was added must be deleted again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AfterProbe {
    /// In a private network namespace: it goes away with the namespace.
    Keep,
    /// In the host's namespace: delete it (only ever an SA this probe added).
    Delete,
}

/// Run `f` on a new thread in a new, private network namespace (no interfaces needed: XFRM
/// states are kernel objects of the namespace). The namespace dies with the thread, and
/// nothing done there can touch the caller's namespace.
fn in_private_netns<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> std::io::Result<T> {
    std::thread::Builder::new()
        .name("esp-probe".into())
        .spawn(move || {
            // SAFETY: unshare only changes the calling thread's namespace membership; this
            // thread is ours and ends right after `f`.
            if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(f())
        })?
        .join()
        .map_err(|_| std::io::Error::other("the ESP probe thread panicked"))?
}

/// Can this kernel hold the plan's ESP SAs? `Err` names what it lacks.
///
/// The probe adds a throwaway SA (documentation addresses, an SPI outside ipsec-mesh's
/// range, reqid 0) in a private network namespace of its own, so it never touches the host's
/// SAs (ESP and crypto support are per kernel, not per namespace). Where no namespace can be
/// made (no CAP_SYS_ADMIN), it probes in place and deletes the SA only if its own add
/// succeeded: an SA that already has this identity is never removed.
fn probe_esp(sock: &mut XfrmSocket, plan: &Plan) -> Result<(), String> {
    probe_spec(sock, ProbeSpec::of(plan))
}

/// Whether this kernel can hold ESP SAs at all (`cbc(aes)` + `hmac(sha256)`), with the same
/// private-namespace probe: `Some(true)` / `Some(false)`, `None` when it cannot tell (no
/// CAP_NET_ADMIN, no XFRM netlink, another error). For the charon driver's diagnosis.
pub fn kernel_has_esp() -> Option<bool> {
    let spec = ProbeSpec {
        v6: false,
        inner_v6: false,
        transform: Transform::Aes128Sha256,
    };
    let run = |r: &mut XfrmSocket, after| probe_transform(r, spec, spec.transform, after);
    let private = in_private_netns(move || {
        XfrmSocket::open()
            .map(|mut s| probe_transform(&mut s, spec, spec.transform, AfterProbe::Keep))
    });
    let answer = match private {
        Ok(Ok(r)) => r,
        _ => {
            let mut sock = XfrmSocket::open().ok()?;
            run(&mut sock, AfterProbe::Delete)
        }
    };
    match answer {
        Ok(()) => Some(true),
        Err(SocketError::Kernel(k)) if lacks_esp(&k) => Some(false),
        Err(e) => {
            debug!(error = %e, "ESP probe inconclusive");
            None
        }
    }
}

/// The kernel's answer to an ESP SA when it has no ESP (`EPROTONOSUPPORT`, or `ENOENT`
/// "type not found" depending on the attribute).
fn lacks_esp(e: &KernelError) -> bool {
    e.errno == libc::EPROTONOSUPPORT
        || (e.errno == libc::ENOENT
            && e.message
                .as_deref()
                .is_some_and(|m| m.contains("type not found")))
}

fn probe_spec(sock: &mut XfrmSocket, spec: ProbeSpec) -> Result<(), String> {
    let private = in_private_netns(move || {
        let mut s = XfrmSocket::open().map_err(|e| e.to_string())?;
        Ok::<_, String>(probe_with(&mut s, spec, AfterProbe::Keep))
    });
    match private {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => {
            debug!(error = %e, "no XFRM socket in a private namespace; probing ESP in place");
            probe_with(sock, spec, AfterProbe::Delete)
        }
        Err(e) => {
            debug!(error = %e, "cannot make a private namespace; probing ESP in place");
            probe_with(sock, spec, AfterProbe::Delete)
        }
    }
}

fn probe_with(r: &mut impl Requests, spec: ProbeSpec, after: AfterProbe) -> Result<(), String> {
    let explain_any = |e: SocketError, t| match e {
        SocketError::Kernel(k) => explain(&k, t),
        other => other.to_string(),
    };
    match probe_transform(r, spec, spec.transform, after) {
        Ok(()) => Ok(()),
        Err(first) => {
            // Tell "no ESP at all" from "no crypto for this transform": CBC + HMAC-SHA-256
            // is in every ESP-capable kernel.
            let base = Transform::Aes128Sha256;
            match probe_transform(r, spec, base, after) {
                Ok(()) => Err(explain_any(first, spec.transform)),
                Err(e) => Err(explain_any(e, base)),
            }
        }
    }
}

/// The probe's SA: 192.0.2.1 -> 192.0.2.2 (2001:db8::1 -> ::2), SPI 0x101, reqid 0.
fn probe_sa(spec: ProbeSpec, transform: Transform) -> Sa {
    let (src, dst) = if spec.v6 {
        (
            "2001:db8::1".parse().unwrap(),
            "2001:db8::2".parse().unwrap(),
        )
    } else {
        ("192.0.2.1".parse().unwrap(), "192.0.2.2".parse().unwrap())
    };
    let key = crate::plan::KeyDeriver::new(&crate::plan::Psk::from_bytes(&[0; 32]))
        .derive("probe", "probe", 0, transform);
    Sa {
        id: SaId {
            dst,
            spi: 0x0000_0101,
        },
        src,
        reqid: 0,
        inner: Inner::of(spec.inner_v6),
        crypto: desired::crypto(transform, &key),
        encap: None,
        output_mark: None,
        replay_window: 0,
        esn: false,
        transport: false,
        if_id: 0,
    }
}

fn probe_transform(
    r: &mut impl Requests,
    spec: ProbeSpec,
    transform: Transform,
    after: AfterProbe,
) -> Result<(), SocketError> {
    let sa = probe_sa(spec, transform);
    // The add alone first: what to do next depends on its answer.
    let added = r
        .batch(vec![(messages::sa_add(&sa, 0), NLM_F_CREATE | NLM_F_EXCL)])?
        .into_iter()
        .next()
        .unwrap_or_else(|| {
            Err(KernelError {
                errno: libc::EPROTO,
                message: Some("no answer to the ESP probe".into()),
            })
        });
    match added {
        Ok(()) => {
            if after == AfterProbe::Delete {
                let gone = r.batch(vec![(messages::sa_del(&sa.id), 0)]);
                if !matches!(gone.as_deref(), Ok([Ok(())])) {
                    warn!(result = ?gone, spi = sa.id.spi, "could not delete the ESP probe SA");
                }
            }
            Ok(())
        }
        // The kernel builds the whole SA (ESP type, algorithms, keys) before it looks for a
        // duplicate, so EEXIST means the SA could have been held. The SA that exists is not
        // ours: leave it.
        Err(e) if e.errno == libc::EEXIST => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Where the counters of the SAs a batch creates start: outbound SAs (from this host's
/// `local` address) at the clock, inbound ones a skew below it ([`seq`]).
#[derive(Debug, Clone, Copy)]
struct SeqStarts {
    now: std::time::SystemTime,
    local: Option<std::net::IpAddr>,
}

impl SeqStarts {
    fn now(local: std::net::IpAddr) -> SeqStarts {
        SeqStarts {
            now: std::time::SystemTime::now(),
            local: Some(local),
        }
    }

    fn start(&self, sa: &Sa) -> u64 {
        if Some(sa.src) == self.local {
            seq::out_start(self.now, 0)
        } else {
            seq::in_start(self.now)
        }
    }
}

fn message(op: &Op, starts: &SeqStarts) -> (netlink_packet_xfrm::XfrmMessage, u16) {
    match op {
        Op::AddPolicy(p) => (messages::policy_add(p, false), NLM_F_CREATE | NLM_F_EXCL),
        Op::UpdatePolicy { new, .. } => (messages::policy_add(new, true), 0),
        Op::DelPolicy(id) => (messages::policy_del(id), 0),
        Op::AddSa(s) => (
            messages::sa_add(s, starts.start(s)),
            NLM_F_CREATE | NLM_F_EXCL,
        ),
        Op::DelSa(id) => (messages::sa_del(id), 0),
    }
}

/// Send `steps` in one batch; record changes, writes and per-owner errors.
fn apply_steps(
    sock: &mut XfrmSocket,
    steps: Vec<Step>,
    transform: Transform,
    starts: SeqStarts,
    report: &mut Report,
) -> Result<(), SocketError> {
    if steps.is_empty() {
        return Ok(());
    }
    let msgs = steps.iter().map(|s| message(&s.op, &starts)).collect();
    let results = sock.batch(msgs)?;
    report.writes += steps.len();
    for (step, r) in steps.into_iter().zip(results) {
        let change = step.change();
        match r {
            Ok(()) => {
                debug!(%change, "xfrm");
                report.changes.push(change);
            }
            // Deleting what is already gone is success.
            Err(e)
                if e.errno == libc::ENOENT
                    && matches!(step.op, Op::DelPolicy(_) | Op::DelSa(_)) =>
            {
                report.changes.push(change);
            }
            Err(e) => {
                let why = match step.op {
                    Op::AddPolicy(_) | Op::AddSa(_) if e.errno == libc::EEXIST => format!(
                        "an object with this identity exists and is not ipsec-mesh's (left untouched) ({e})"
                    ),
                    _ => explain(&e, transform),
                };
                warn!(peer = %step.owner, %change, error = %why, "xfrm change failed");
                report.error(step.owner.to_string(), format!("{change}: {why}"));
            }
        }
    }
    Ok(())
}

/// Set the SPD hash thresholds for the prefix lengths in use, if they differ: per overlay
/// family (the kernel keeps one pair of thresholds per family).
fn tune_spd(sock: &mut XfrmSocket, plan: &Plan, report: &mut Report) {
    for v6 in plan.cidrs.iter().map(|c| c.network().is_ipv6()) {
        tune_spd_family(sock, plan, v6, report);
    }
}

fn tune_spd_family(sock: &mut XfrmSocket, plan: &Plan, v6: bool, report: &mut Report) {
    let Some((l, r)) = desired::prefix_thresholds_of(plan, v6) else {
        return;
    };
    let current = sock
        .query(messages::spdinfo_get())
        .ok()
        .and_then(|m| messages::spdinfo_thresholds(&m, v6));
    if current == Some((l, r)) {
        return;
    }
    report.writes += 1;
    match sock.batch(vec![(messages::spdinfo_set(v6, l, r), 0)]) {
        Ok(v) if v.iter().all(Result::is_ok) => report.changes.push(Change::update(
            reconcile::LAYER,
            if plan.cidrs.len() > 1 && v6 {
                "spd hash thresholds (IPv6)"
            } else {
                "spd hash thresholds"
            },
            current.map(|(l, r)| format!("{l}/{r}")),
            Some(format!("{l}/{r}")),
        )),
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

/// Route mode: make the kernel hold exactly [`desired::route_mode`] (per peer three `0/0`
/// policies and the SAs, bound to the peer's XFRM interface id; the inbound block policies on
/// `underlay_dev`). No SPD hash tuning: `0/0` policies live in the per-interface-id bins.
pub fn reconcile_route(plan: &Plan, underlay_dev: u32) -> Result<Report, SocketError> {
    reconcile_desired(
        plan,
        desired::route_mode(plan, underlay_dev),
        Scope::All,
        false,
    )
}

/// Encrypted VXLAN: make the kernel hold exactly [`desired::vxlan_esp`] (ESP transport mode
/// for UDP `port` between this host and its peers).
pub fn reconcile_vxlan_esp(plan: &Plan, port: u16) -> Result<Report, SocketError> {
    reconcile_desired(plan, desired::vxlan_esp(plan, port), Scope::All, false)
}

/// Encrypted VXLAN, first step: [`desired::vxlan_esp`]'s policies only (its SAs are neither
/// added nor touched), so that the VXLAN device, made next, never sends in clear and
/// plaintext VXLAN is refused before any SA exists.
pub fn reconcile_vxlan_esp_policies(plan: &Plan, port: u16) -> Result<Report, SocketError> {
    let mut want = desired::vxlan_esp(plan, port);
    want.sas.clear();
    reconcile_desired(plan, want, Scope::PoliciesOnly, false)
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
                report.error(owner.to_string(), why.clone());
            }
            report.warnings.push(why);
        }
    }
    // Hash thresholds first, so the policies below land in hash buckets instead of the
    // kernel's linear inexact lists.
    if tune_hash {
        tune_spd(&mut sock, plan, &mut report);
    }
    let touched: std::collections::HashSet<SaId> = steps
        .iter()
        .filter_map(|s| match &s.op {
            Op::AddSa(sa) => Some(sa.id),
            Op::DelSa(id) => Some(*id),
            _ => None,
        })
        .collect();
    apply_steps(
        &mut sock,
        steps,
        plan.transform,
        SeqStarts::now(plan.endpoint),
        &mut report,
    )?;
    if scope == Scope::All && !want.sas.is_empty() {
        // From the dump this reconcile started with (no second dump): SAs it replaced or
        // removed are gone, and the ones it added start at the clock.
        let states: Vec<messages::SeqState> = current
            .seq
            .iter()
            .filter(|s| !touched.contains(&s.id))
            .cloned()
            .collect();
        let t = apply_raises(
            &mut sock,
            &states,
            plan.endpoint,
            std::time::SystemTime::now(),
        )?;
        report.parts.push((SEQ_RAISES, t.writes));
        for (id, why) in t.errors {
            report.error(
                crate::dataplane::report::MESH,
                format!(
                    "sa -> {} spi {:#010x}: raising its sequence state: {why}",
                    id.dst, id.spi
                ),
            );
        }
    }
    info!(
        writes = report.writes,
        errors = report.errors.len(),
        policies = want.policies.len(),
        sas = want.sas.len(),
        "xfrm reconcile done"
    );
    Ok(report)
}

/// What one pass of [`tend_sequences`] did.
#[derive(Debug, Default)]
pub struct TendReport {
    /// Replay states replaced (`XFRM_MSG_NEWAE`).
    pub writes: usize,
    /// Outbound counters raised to the clock, inbound windows raised.
    pub raised_out: usize,
    pub raised_in: usize,
    /// Outbound SAs whose counter is ahead of the clock (sent > 4 Mpps on average), by SPI.
    pub ahead: Vec<(SaId, u64)>,
    /// Per-SA failures, in words.
    pub errors: Vec<(SaId, String)>,
}

/// Keep every ESN SA of ours near the clock ([`seq`]): raise lagging outbound counters and
/// the windows of inbound SAs idle for minutes, in one batch. Writes nothing when every
/// counter is recent. `local`: this host's underlay address (outbound SAs start there).
pub fn tend_sequences(local: std::net::IpAddr) -> Result<TendReport, SocketError> {
    let mut sock = XfrmSocket::open()?;
    tend_with(&mut sock, local, std::time::SystemTime::now())
}

fn tend_with(
    sock: &mut XfrmSocket,
    local: std::net::IpAddr,
    now: std::time::SystemTime,
) -> Result<TendReport, SocketError> {
    let states: Vec<messages::SeqState> = sock
        .dump(messages::sa_dump())?
        .iter()
        .filter_map(messages::parse_sa_seq)
        .filter(|s| crate::plan::ids::is_owned_reqid(s.reqid))
        .collect();
    apply_raises(sock, &states, local, now)
}

/// The replay-state replacements that keep `states` near the clock (pure), with the report
/// they would give.
pub fn plan_raises(
    states: &[messages::SeqState],
    local: std::net::IpAddr,
    now: std::time::SystemTime,
) -> (Vec<(SaId, netlink_packet_xfrm::XfrmMessage)>, TendReport) {
    let mut report = TendReport::default();
    let mut raises = Vec::new();
    for s in states {
        let mut replay = s.replay.clone();
        if s.src == local {
            if let Some(d) = seq::ahead_of_clock(now, s.oseq) {
                report.ahead.push((s.id, d));
            }
            let Some(to) = seq::raise_out(now, s.oseq) else {
                continue;
            };
            (replay.oseq_hi, replay.oseq) = seq::split(to);
            report.raised_out += 1;
        } else {
            let Some(to) = seq::raise_in(now, s.seq) else {
                continue;
            };
            (replay.seq_hi, replay.seq) = seq::split(to);
            replay.bmp.iter_mut().for_each(|w| *w = u32::MAX);
            report.raised_in += 1;
        }
        raises.push((s.id, messages::sa_set_replay(s, replay)));
    }
    (raises, report)
}

fn apply_raises(
    sock: &mut XfrmSocket,
    states: &[messages::SeqState],
    local: std::net::IpAddr,
    now: std::time::SystemTime,
) -> Result<TendReport, SocketError> {
    let (raises, mut report) = plan_raises(states, local, now);
    if raises.is_empty() {
        return Ok(report);
    }
    let msgs = raises
        .iter()
        .map(|(_, m)| (m.clone(), netlink_packet_core::NLM_F_REPLACE))
        .collect();
    let results = sock.batch(msgs)?;
    report.writes = raises.len();
    for ((id, _), r) in raises.into_iter().zip(results) {
        if let Err(e) = r {
            warn!(spi = id.spi, dst = %id.dst, error = %e, "could not raise the SA's sequence state");
            report.errors.push((id, e.to_string()));
        }
    }
    debug!(
        raised_out = report.raised_out,
        raised_in = report.raised_in,
        "xfrm sequence states tended"
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
    let starts = SeqStarts {
        now: std::time::SystemTime::now(),
        local: None,
    };
    apply_steps(&mut sock, steps, Transform::default(), starts, &mut report)?;
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use netlink_packet_xfrm::XfrmMessage;

    #[test]
    fn raises_only_lagging_counters_and_idle_windows() {
        use std::time::{Duration, UNIX_EPOCH};
        let now = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let c = seq::clock(now);
        let local: std::net::IpAddr = "192.0.2.1".parse().unwrap();
        let peer: std::net::IpAddr = "192.0.2.2".parse().unwrap();
        let st = |spi, src, counter: u64| {
            let mut replay = messages::replay_esn(1024, counter);
            replay.bmp[0] = 0x5; // a partly used window
            messages::SeqState {
                id: SaId {
                    dst: if src == local { peer } else { local },
                    spi,
                },
                src,
                reqid: 0x5000_0001,
                oseq: counter,
                seq: counter,
                replay,
                replay_drops: 0,
                integrity_failed: 0,
                packets: 0,
                bytes: 0,
                add_time: 0,
            }
        };
        let t = |s: Duration| seq::ticks(s);
        let states = vec![
            st(1, local, c - t(Duration::from_secs(61))), // outbound, lagging: raised
            st(2, local, c - t(Duration::from_secs(55))), // outbound, recent
            st(3, local, c + 40),                         // outbound, ahead of the clock
            st(4, peer, c - t(Duration::from_secs(361))), // inbound, idle: raised
            st(5, peer, c - t(Duration::from_secs(350))), // inbound, idle but recent enough
        ];
        let (raises, r) = plan_raises(&states, local, now);
        let spis: Vec<u32> = raises.iter().map(|(id, _)| id.spi).collect();
        assert_eq!(spis, vec![1, 4]);
        assert_eq!((r.raised_out, r.raised_in), (1, 1));
        assert_eq!(r.ahead, vec![(states[2].id, 40)]);
        let replay = |m: &XfrmMessage| match m {
            XfrmMessage::NewAsyncEvent(e) => e
                .nlas
                .iter()
                .find_map(|a| match a {
                    netlink_packet_xfrm::XfrmAttrs::ReplayStateEsn(r) => Some(r.clone()),
                    _ => None,
                })
                .unwrap(),
            other => panic!("not NEWAE: {other:?}"),
        };
        let out = replay(&raises[0].1);
        assert_eq!(seq::join(out.oseq_hi, out.oseq), c);
        assert_eq!(out.bmp[0], 0x5, "an outbound raise leaves the rest alone");
        let inn = replay(&raises[1].1);
        assert_eq!(seq::join(inn.seq_hi, inn.seq), seq::in_start(now));
        assert!(
            inn.bmp.iter().all(|w| *w == u32::MAX),
            "nothing below the new top is accepted"
        );
        assert_eq!(
            (inn.replay_window, inn.bmp_len),
            (1024, 32),
            "same window size"
        );
    }

    /// Answers the probe's requests: `answer(n)` for the n-th add (0-based); deletes succeed.
    /// Records what was sent, in order.
    struct FakeKernel<F: Fn(usize) -> Result<(), KernelError>> {
        answer: F,
        adds: usize,
        sent: Vec<String>,
    }

    impl<F: Fn(usize) -> Result<(), KernelError>> Requests for FakeKernel<F> {
        fn batch(
            &mut self,
            reqs: Vec<(XfrmMessage, u16)>,
        ) -> Result<Vec<Result<(), KernelError>>, SocketError> {
            Ok(reqs
                .into_iter()
                .map(|(m, _)| match m {
                    XfrmMessage::AddSa(a) => {
                        self.sent
                            .push(format!("add spi {:#x}", a.user_sa_info.id.spi));
                        self.adds += 1;
                        (self.answer)(self.adds - 1)
                    }
                    XfrmMessage::DeleteSa(d) => {
                        self.sent.push(format!("del spi {:#x}", d.user_sa_id.spi));
                        Ok(())
                    }
                    other => panic!("unexpected request {other:?}"),
                })
                .collect())
        }
    }

    fn fake<F: Fn(usize) -> Result<(), KernelError>>(answer: F) -> FakeKernel<F> {
        FakeKernel {
            answer,
            adds: 0,
            sent: Vec::new(),
        }
    }

    fn errno(errno: i32) -> KernelError {
        KernelError {
            errno,
            message: None,
        }
    }

    const V4: ProbeSpec = ProbeSpec {
        v6: false,
        inner_v6: false,
        transform: Transform::Aes128Gcm16,
    };

    #[test]
    fn probe_never_deletes_an_sa_it_did_not_add() {
        // Somebody else's SA holds the probe's identity (192.0.2.2, SPI 0x101, ESP): the add
        // fails with EEXIST. That SA must not be deleted, and EEXIST proves the kernel could
        // build an ESP SA (it constructs the state before it looks for a duplicate).
        let mut k = fake(|_| Err(errno(libc::EEXIST)));
        assert_eq!(probe_with(&mut k, V4, AfterProbe::Delete), Ok(()));
        assert_eq!(
            k.sent,
            vec!["add spi 0x101"],
            "no delete after a failed add"
        );
    }

    #[test]
    fn probe_in_place_deletes_only_the_sa_it_added() {
        let mut k = fake(|_| Ok(()));
        assert_eq!(probe_with(&mut k, V4, AfterProbe::Delete), Ok(()));
        assert_eq!(k.sent, vec!["add spi 0x101", "del spi 0x101"]);
        // In a private namespace the SA goes away with it: nothing to delete.
        let mut k = fake(|_| Ok(()));
        assert_eq!(probe_with(&mut k, V4, AfterProbe::Keep), Ok(()));
        assert_eq!(k.sent, vec!["add spi 0x101"]);
    }

    #[test]
    fn probe_failures_delete_nothing_and_say_what_is_missing() {
        let mut k = fake(|_| Err(errno(libc::EPROTONOSUPPORT)));
        let e = probe_with(&mut k, V4, AfterProbe::Delete).unwrap_err();
        assert!(e.contains("CONFIG_INET_ESP is missing"), "{e}");
        assert_eq!(k.sent, vec!["add spi 0x101", "add spi 0x101"]);
        // The plan's transform lacks crypto, CBC + HMAC works: only that SA is deleted.
        let mut k = fake(|n| {
            if n == 0 {
                Err(errno(libc::ENOSYS))
            } else {
                Ok(())
            }
        });
        let e = probe_with(&mut k, V4, AfterProbe::Delete).unwrap_err();
        assert!(e.contains("lacks the crypto for"), "{e}");
        assert_eq!(
            k.sent,
            vec!["add spi 0x101", "add spi 0x101", "del spi 0x101"]
        );
    }

    fn netns_inode() -> u64 {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata("/proc/thread-self/ns/net").unwrap().ino()
    }

    #[test]
    #[ignore = "needs root: integration/run.sh runs it as root (--include-ignored)"]
    fn probe_runs_in_its_own_netns_and_agrees_with_an_in_place_probe() {
        assert!(
            crate::dataplane::netns::is_root(),
            "needs root (unshare CLONE_NEWNET)"
        );
        // Everything below runs in a namespace this test made, so even the in-place probe
        // touches nothing of the machine's.
        let (outer, inner, private, in_place, left, ms) =
            crate::dataplane::netns::in_new_netns(|| {
                let outer = netns_inode();
                let inner = in_private_netns(netns_inode).unwrap();
                let mut sock = XfrmSocket::open().unwrap();
                let spec = ProbeSpec {
                    transform: Transform::Aes128Sha256,
                    ..V4
                };
                let t = std::time::Instant::now();
                let private = probe_spec(&mut sock, spec);
                let ms = t.elapsed().as_secs_f64() * 1e3;
                let in_place = probe_with(&mut sock, spec, AfterProbe::Delete);
                let left: Vec<_> = sock
                    .dump(messages::sa_dump())
                    .unwrap()
                    .iter()
                    .filter_map(messages::parse_sa_id)
                    .filter(|(id, _)| id.spi == 0x101)
                    .collect();
                (outer, inner, private, in_place, left, ms)
            })
            .unwrap();
        assert_ne!(
            outer, inner,
            "the probe thread has a network namespace of its own"
        );
        assert_eq!(private, in_place, "both probes ask the same kernel");
        assert!(left.is_empty(), "no probe SA is left behind: {left:?}");
        eprintln!("private-namespace ESP probe: {ms:.1} ms, result {private:?}");
        assert!(ms < 1000.0, "the private-namespace probe took {ms:.1} ms");
    }
}

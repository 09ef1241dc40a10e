//! The charon driver: makes charon (over VICI) match a [`Plan`].
//!
//! [`reconcile`] reads (`list-conns`, `get-shared`, `list-sas`), diffs against
//! [`desired`] and writes only the difference:
//!
//! 1. `load-shared` the PSK under a new id when the secret or the owner set changed
//!    (through the [`Client`]); old ids of ours are unloaded once the conns are in;
//! 2. conns, pipelined on a dedicated connection ([`super::batch`]): `terminate` +
//!    `unload-conn` for peers that left, `unload-conn` for changed conns, then `load-conn`
//!    for new and changed ones, up to [`LOAD_PACK`] conns per request;
//! 3. SAs: the pair's initiator `terminate`s duplicate IKE_SAs and, for a changed conn, the
//!    old SA; it `initiate`s every missing child at once. A responder waits
//!    [`CharonConfig::responder_grace`], looks again, and initiates what is still missing.
//!    Initiates run in parallel over [`CharonConfig::initiate_parallelism`] connections and
//!    collect charon's `control-log` lines, so failures come back in words
//!    ([`explain`](super::failure::explain)).
//!
//! With nothing changed and every SA up, a reconcile sends three reads and no write.
//! The watcher ([`super::revive`]) runs on its own connection; if it and a reconcile
//! initiate the same child at once, the duplicate IKE_SA is closed by the pair's initiator
//! at its next reconcile.
//! Errors are per peer (`CharonReport::errors`); only a lost connection or a failed read
//! aborts a reconcile (`Err`): reconnect ([`Client::connect`] waits for charon) and run
//! it again. [`cleanup`] terminates and unloads our conns and unloads our shared keys,
//! nothing else. [`CharonMesh`] ([`mesh`](super::mesh)) wraps it all for the synchronous
//! [`Driver`](crate::dataplane::driver::Driver) interface. What a run did is a
//! [`CharonReport`].

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use zeroize::Zeroizing;

use super::batch::{self, BatchOptions, Outcome, Request};
use super::client::{Client, ViciError};
use super::desired::{
    desired, diff_conns, diff_shared, peer_of, CharonConfig, ConnDiff, Desired, DesiredConn, Role,
    SharedDiff, SHARED_PREFIX,
};
use super::failure::explain_with;
use super::listed::ListedConn;
use super::report::{cmd_name, CharonReport, PeerState, LAYER};
use super::sas::conn_sas;
use super::types::{
    Command, GetConns, GetShared, IkeSa, Initiate, ListSas, LoadShared, SharedKeyType, Stats,
    Terminate, UnloadConn, UnloadShared,
};
use super::wire::Message;
use crate::dataplane::driver::PeerCounters;
use crate::dataplane::report::Change;
use crate::plan::{Plan, Psk};

/// The change a successful `terminate` (of the request's `context`, a conn or SA name) made.
fn terminated(context: &str) -> Change {
    let c = Change::delete(LAYER, format!("sa {context}"));
    match peer_of(context) {
        Some(p) => c.for_peer(p),
        None => c,
    }
}

/// Conns per `load-conn` request. charon's `load-conn` handler loads every conn section of
/// the message (vici_config.c `load_conn` parses all top-level sections, from 5.x to today;
/// its README speaks of one): packing saves a request per conn, and charon's per-request
/// cost is mostly thread hand-offs. If charon refuses a pack, its conns are sent again one
/// per request, to tell which one it refused.
pub const LOAD_PACK: usize = 64;
/// Largest packed `load-conn` body (charon refuses messages over 512 KiB).
const LOAD_PACK_BYTES: usize = 256 * 1024;

/// Splits conns into packs of at most [`LOAD_PACK`] conns and [`LOAD_PACK_BYTES`].
fn packs<'a>(conns: &[&'a DesiredConn]) -> Vec<Vec<&'a DesiredConn>> {
    let mut out: Vec<Vec<&DesiredConn>> = Vec::new();
    let mut bytes = 0;
    for c in conns {
        match out.last_mut() {
            Some(p) if p.len() < LOAD_PACK && bytes + c.wire_len <= LOAD_PACK_BYTES => {
                bytes += c.wire_len;
                p.push(c);
            }
            _ => {
                bytes = c.wire_len;
                out.push(vec![c]);
            }
        }
    }
    out
}

/// All conns charon lists (ours and others), normalised.
pub async fn list_conns(client: &Client) -> Result<Vec<ListedConn>, ViciError> {
    let mut s = client
        .stream_raw("list-conns", "list-conn", Message::new())
        .await?;
    let mut out = Vec::new();
    while let Some(m) = s.next().await {
        out.extend(ListedConn::parse_event(&m?));
    }
    Ok(out)
}

async fn list_sas(client: &Client) -> Result<Vec<IkeSa>, ViciError> {
    client
        .list(&ListSas {
            noblock: true,
            ..Default::default()
        })
        .await
}

/// Sends a batch (pipelined), counting what is sent.
async fn send(
    cfg: &CharonConfig,
    r: &mut CharonReport,
    reqs: &[Request],
    opts: BatchOptions,
) -> Result<Vec<Outcome>, ViciError> {
    for q in reqs {
        r.note(cmd_name(&q.command), 1);
    }
    batch::run(&cfg.vici_socket, reqs, &opts).await
}

/// Closes IKE_SA `id` at once (without waiting for the peer's answer).
fn terminate_ike_cmd(id: u64) -> Terminate {
    Terminate {
        ike_id: Some(id),
        force: true,
        timeout_ms: Some(1000),
        ..Default::default()
    }
}

fn terminate_ike(id: u64, conn: &str) -> Request {
    Request::new(
        "terminate",
        format!("conn={conn} ike-id={id}"),
        terminate_ike_cmd(id).to_message(),
    )
}

fn unload_conn(name: &str) -> Request {
    Request::new(
        "unload-conn",
        format!("conn={name}"),
        UnloadConn {
            name: name.to_string(),
        }
        .to_message(),
    )
}

fn initiate_req(cfg: &CharonConfig, conn: &str) -> Request {
    let i = Initiate {
        child: Some(conn.to_string()),
        ike: Some(conn.to_string()),
        timeout_ms: Some(cfg.initiate_timeout.as_millis().min(i64::MAX as u128) as i64),
        loglevel: Some(1),
        ..Default::default()
    };
    Request::new("initiate", format!("child={conn}"), i.to_message())
}

/// Whether this host's charon installs SAs in a kernel without ESP: charon has no
/// `kernel-libipsec` and the [`esp`](super::esp) probe says no. Asked at most once per
/// reconcile, and only after a CHILD_SA failure.
async fn no_kernel_esp(client: &Client, r: &mut CharonReport) -> bool {
    r.note("stats", 1);
    match client.call(&Stats).await {
        Ok(s) if s.plugins.iter().any(|p| p == "kernel-libipsec") => false,
        Ok(_) => {
            tokio::task::spawn_blocking(super::esp::kernel_has_esp)
                .await
                .ok()
                .flatten()
                == Some(false)
        }
        Err(_) => false,
    }
}

/// Initiates `conns` (in parallel lanes) and records each outcome.
async fn initiate_all(
    client: &Client,
    cfg: &CharonConfig,
    r: &mut CharonReport,
    conns: &[&DesiredConn],
    no_esp: &mut Option<bool>,
) -> Result<(), ViciError> {
    if conns.is_empty() {
        return Ok(());
    }
    let reqs: Vec<Request> = conns.iter().map(|c| initiate_req(cfg, c.name())).collect();
    let opts = BatchOptions {
        window: 64,
        answer_timeout: cfg.initiate_timeout + Duration::from_secs(5),
        control_log: true,
        parallelism: cfg.initiate_parallelism.max(1),
    };
    let outs = send(cfg, r, &reqs, opts).await?;
    for (c, o) in conns.iter().zip(outs) {
        match o.result {
            Ok(_) => {
                r.set(&c.peer, PeerState::Up);
                r.change(
                    Change::update(
                        LAYER,
                        format!("sa {} ({})", c.name(), c.role.as_str()),
                        None,
                        Some("up (initiated)".into()),
                    )
                    .for_peer(c.peer.as_str()),
                );
            }
            Err(e) if e.is_connection_lost() && !matches!(e, ViciError::Timeout { .. }) => {
                r.set(&c.peer, PeerState::Failed);
                r.error(&c.peer, format!("initiate {}: {e}", c.name()));
            }
            Err(ViciError::CommandFailed { errmsg, .. }) => {
                if no_esp.is_none() && errmsg.contains("CHILD_SA") {
                    *no_esp = Some(no_kernel_esp(client, r).await);
                }
                r.set(&c.peer, PeerState::Failed);
                let why = explain_with(&errmsg, &o.log, no_esp.unwrap_or(false));
                r.error(&c.peer, format!("initiate {}: {why}", c.name()));
            }
            Err(e) => {
                r.set(&c.peer, PeerState::Failed);
                r.error(&c.peer, format!("initiate {}: {e}", c.name()));
            }
        }
    }
    Ok(())
}

/// Makes charon match `plan` (see the module docs). `client` is used for reads and the
/// shared key; bulk writes use dedicated connections to `cfg.vici_socket`. Do not share
/// `client` with another `control-log` subscriber.
pub async fn reconcile(
    client: &Client,
    plan: &Plan,
    psk: &Psk,
    cfg: &CharonConfig,
) -> Result<CharonReport, ViciError> {
    run(client, plan, psk, cfg, true).await
}

/// [`reconcile`] without the SA step: shared key and conns only (SAs of departed peers are
/// still closed). Peers are reported up, connecting or down as charon lists them.
pub async fn reconcile_config(
    client: &Client,
    plan: &Plan,
    psk: &Psk,
    cfg: &CharonConfig,
) -> Result<CharonReport, ViciError> {
    run(client, plan, psk, cfg, false).await
}

/// One reconcile, as a sequence of phases: read, shared key, conns, old keys, SAs.
async fn run(
    client: &Client,
    plan: &Plan,
    psk: &Psk,
    cfg: &CharonConfig,
    sas_too: bool,
) -> Result<CharonReport, ViciError> {
    let want = desired(plan, psk, cfg);
    let mut r = CharonReport::default();
    for (peer, why) in &want.skipped {
        r.set(peer, PeerState::Skipped);
        tracing::debug!(peer = %peer, reason = %why, "charon driver: peer skipped");
    }
    let seen = read_state(client, &mut r).await?;
    let cd = diff_conns(&want, &seen.conns);
    let sd = diff_shared(&want.shared, &seen.shared_ids);
    let key_in = load_shared_key(client, &mut r, &want, psk, &sd).await?;
    let changed: BTreeMap<&str, &Vec<String>> =
        cd.change.iter().map(|(n, d)| (n.as_str(), d)).collect();
    let load_failed = sync_conns(cfg, &mut r, &want, &cd, &changed, &seen.sas).await?;
    if key_in {
        unload_keys(client, &mut r, &sd.remove).await?;
    }
    let work = sa_work(&mut r, &want, &changed, &seen.sas, &load_failed, sas_too);
    do_sa_work(client, cfg, &mut r, work).await?;
    for c in want.conns.values() {
        r.peers.entry(c.peer.clone()).or_insert(PeerState::Down);
    }
    Ok(r)
}

/// What charon has: every conn it lists, the ids of its shared keys, its SAs.
struct Seen {
    conns: Vec<ListedConn>,
    shared_ids: Vec<String>,
    sas: Vec<IkeSa>,
}

/// The three reads of a reconcile.
async fn read_state(client: &Client, r: &mut CharonReport) -> Result<Seen, ViciError> {
    let conns = list_conns(client).await?;
    r.note("list-conns", 1);
    let shared_ids = client.call(&GetShared).await?;
    r.note("get-shared", 1);
    let sas = list_sas(client).await?;
    r.note("list-sas", 1);
    Ok(Seen {
        conns,
        shared_ids,
        sas,
    })
}

/// Loads the PSK under the desired id when charon lacks it (never pipelined, never logged).
/// Returns whether the desired key is in.
async fn load_shared_key(
    client: &Client,
    r: &mut CharonReport,
    want: &Desired,
    psk: &Psk,
    sd: &SharedDiff,
) -> Result<bool, ViciError> {
    if !sd.load {
        return Ok(true);
    }
    let ls = LoadShared {
        id: want.shared.id.clone(),
        kind: SharedKeyType::Ike,
        data: Zeroizing::new(psk.expose().to_vec()),
        owners: want.shared.owners.clone(),
    };
    r.note("load-shared", 1);
    match client.call(&ls).await {
        Ok(()) => {
            r.change(Change::add(
                LAYER,
                format!("shared key {} ({} owners)", ls.id, ls.owners.len()),
            ));
            Ok(true)
        }
        Err(e) if e.is_connection_lost() => Err(e),
        Err(e) => {
            r.error("mesh", format!("load-shared {}: {e}", ls.id));
            Ok(false)
        }
    }
}

/// Unloads shared keys `ids`, one by one.
async fn unload_keys(
    client: &Client,
    r: &mut CharonReport,
    ids: &[String],
) -> Result<(), ViciError> {
    for id in ids {
        r.note("unload-shared", 1);
        match client.call(&UnloadShared { id: id.clone() }).await {
            Ok(()) => r.change(Change::delete(LAYER, format!("shared key {id}"))),
            Err(e) if e.is_connection_lost() => return Err(e),
            Err(e) => r.error("mesh", format!("unload-shared {id}: {e}")),
        }
    }
    Ok(())
}

/// The conn requests, in the order they must run on one connection, each with the conns
/// it is about: close and unload departed peers, unload changed conns (see desired.rs: a
/// reload alone may keep the old object), then load new and changed ones, packed.
fn conn_requests<'a>(
    want: &'a Desired,
    cd: &'a ConnDiff,
    sas: &[IkeSa],
) -> Vec<(Vec<&'a str>, Request)> {
    let mut reqs: Vec<(Vec<&str>, Request)> = Vec::new();
    for name in &cd.remove {
        for ike in conn_sas(name, sas).ike_ids {
            reqs.push((vec![name.as_str()], terminate_ike(ike, name)));
        }
        reqs.push((vec![name.as_str()], unload_conn(name)));
    }
    for (name, _) in &cd.change {
        reqs.push((vec![name.as_str()], unload_conn(name)));
    }
    let to_load: Vec<&DesiredConn> = cd
        .change
        .iter()
        .map(|(n, _)| n)
        .chain(&cd.add)
        .map(|n| &want.conns[n])
        .collect();
    for pack in packs(&to_load) {
        let mut m = Message::new();
        for c in &pack {
            m.push_section(c.name(), c.body.clone());
        }
        let names: Vec<&str> = pack.iter().map(|c| c.name()).collect();
        let context = match names.as_slice() {
            [one] => format!("conn={one}"),
            many => format!("{} conns", many.len()),
        };
        reqs.push((names, Request::new("load-conn", context, m)));
    }
    reqs
}

/// What became of the conns a reconcile loads.
#[derive(Default)]
struct Loads<'a> {
    loaded: Vec<&'a str>,
    failed: BTreeSet<String>,
}

impl Loads<'_> {
    fn fail(&mut self, r: &mut CharonReport, peer: &str, name: &str, e: &ViciError) {
        self.failed.insert(name.to_string());
        r.set(peer, PeerState::Failed);
        r.error(peer, format!("load-conn {name}: {e}"));
    }
}

/// Closes and unloads the conns of departed peers, replaces changed conns and loads new
/// ones (see [`conn_requests`]), all pipelined on one connection. A pack charon refuses is
/// sent again one conn per request, to tell which conn it refused. Returns the conns that
/// failed to load.
async fn sync_conns<'a>(
    cfg: &CharonConfig,
    r: &mut CharonReport,
    want: &'a Desired,
    cd: &'a ConnDiff,
    changed: &BTreeMap<&str, &Vec<String>>,
    sas: &[IkeSa],
) -> Result<BTreeSet<String>, ViciError> {
    let reqs = conn_requests(want, cd, sas);
    let mut loads = Loads::default();
    if !reqs.is_empty() {
        let only: Vec<Request> = reqs.iter().map(|(_, q)| q.clone()).collect();
        let outs = send(cfg, r, &only, BatchOptions::default()).await?;
        let mut retry: Vec<&DesiredConn> = Vec::new();
        for ((names, q), o) in reqs.iter().zip(outs) {
            let owner = names
                .first()
                .and_then(|n| peer_of(n))
                .unwrap_or("mesh")
                .to_string();
            match (q.command.as_str(), o.result) {
                ("load-conn", Ok(_)) => loads.loaded.extend(names),
                // which conn of the pack did charon refuse? ask one by one
                ("load-conn", Err(ViciError::CommandFailed { .. })) if names.len() > 1 => {
                    retry.extend(names.iter().map(|n| &want.conns[*n]));
                }
                ("load-conn", Err(e)) => {
                    for n in names {
                        loads.fail(r, peer_of(n).unwrap_or("mesh"), n, &e);
                    }
                }
                ("unload-conn", Ok(_)) if !changed.contains_key(names[0]) => {
                    r.unloaded += 1;
                    r.change(Change::delete(
                        LAYER,
                        format!("conn {} (peer left)", names[0]),
                    ));
                }
                ("terminate", Ok(_)) => r.change(terminated(&q.context)),
                (_, Ok(_)) => {}
                (cmd, Err(e)) => r.error(&owner, format!("{cmd} {}: {e}", names[0])),
            }
        }
        if !retry.is_empty() {
            load_one_by_one(cfg, r, &retry, &mut loads).await?;
        }
    }
    r.loaded = loads.loaded.len();
    for name in loads.loaded {
        let c = match changed.get(name) {
            Some(d) => Change::update(LAYER, format!("conn {name} ({})", d.join("; ")), None, None),
            None => Change::add(LAYER, format!("conn {name}")),
        };
        r.change(match peer_of(name) {
            Some(p) => c.for_peer(p),
            None => c,
        });
    }
    Ok(loads.failed)
}

/// Loads `conns` one per request.
async fn load_one_by_one<'a>(
    cfg: &CharonConfig,
    r: &mut CharonReport,
    conns: &[&'a DesiredConn],
    loads: &mut Loads<'a>,
) -> Result<(), ViciError> {
    let one: Vec<Request> = conns
        .iter()
        .map(|c| Request::new("load-conn", format!("conn={}", c.name()), c.load_message()))
        .collect();
    let outs = send(cfg, r, &one, BatchOptions::default()).await?;
    for (c, o) in conns.iter().zip(outs) {
        match o.result {
            Ok(_) => loads.loaded.push(c.name()),
            Err(e) => loads.fail(r, &c.peer, c.name(), &e),
        }
    }
    Ok(())
}

/// The SA work of a reconcile: IKE_SAs to close, children to initiate at once, and
/// children a responder initiates after the grace period if still missing.
#[derive(Default)]
struct SaWork<'a> {
    terminate: Vec<Request>,
    now: Vec<&'a DesiredConn>,
    later: Vec<&'a DesiredConn>,
}

/// Sorts every loaded conn by its SAs: up (the initiator closes duplicates; a changed conn's
/// old SA is replaced, break before make), connecting, or missing (the initiator initiates
/// now, the responder later). Without `sas_too`, a missing SA is reported down.
fn sa_work<'a>(
    r: &mut CharonReport,
    want: &'a Desired,
    changed: &BTreeMap<&str, &Vec<String>>,
    sas: &[IkeSa],
    load_failed: &BTreeSet<String>,
    sas_too: bool,
) -> SaWork<'a> {
    let mut w = SaWork::default();
    for (name, c) in &want.conns {
        if load_failed.contains(name) {
            continue;
        }
        let s = conn_sas(name, sas);
        let replace = changed.contains_key(name.as_str()) && c.role == Role::Initiator;
        if s.up && replace && sas_too {
            // the old SA carries the old settings: replace it (break before make)
            for id in &s.ike_ids {
                w.terminate.push(terminate_ike(*id, name));
            }
            w.now.push(c);
        } else if s.up {
            r.set(&c.peer, PeerState::Up);
            if c.role == Role::Initiator && sas_too {
                for id in &s.duplicates {
                    w.terminate.push(terminate_ike(*id, name));
                }
            }
        } else if s.connecting {
            r.set(&c.peer, PeerState::Connecting);
        } else if !sas_too {
            r.set(&c.peer, PeerState::Down);
        } else if c.role == Role::Initiator {
            w.now.push(c);
        } else {
            w.later.push(c);
        }
    }
    w
}

/// Closes, initiates, then (after the responder's grace period, counted from the start of
/// this step) looks again and initiates what is still missing.
async fn do_sa_work(
    client: &Client,
    cfg: &CharonConfig,
    r: &mut CharonReport,
    w: SaWork<'_>,
) -> Result<(), ViciError> {
    let t0 = Instant::now();
    let mut no_esp = None;
    if !w.terminate.is_empty() {
        let outs = send(cfg, r, &w.terminate, BatchOptions::default()).await?;
        for (q, o) in w.terminate.iter().zip(outs) {
            match o.result {
                Ok(_) => r.change(terminated(&q.context)),
                Err(e) => r.error("mesh", format!("terminate {}: {e}", q.context)),
            }
        }
    }
    initiate_all(client, cfg, r, &w.now, &mut no_esp).await?;
    if w.later.is_empty() {
        return Ok(());
    }
    tokio::time::sleep(cfg.responder_grace.saturating_sub(t0.elapsed())).await;
    let sas = list_sas(client).await?;
    r.note("list-sas", 1);
    let mut todo = Vec::new();
    for c in w.later {
        let s = conn_sas(c.name(), &sas);
        if s.up {
            r.set(&c.peer, PeerState::Up);
        } else if s.connecting {
            r.set(&c.peer, PeerState::Connecting);
        } else {
            todo.push(c);
        }
    }
    initiate_all(client, cfg, r, &todo, &mut no_esp).await
}

/// Terminates the SAs of our conns, unloads our conns and our shared keys; nothing else.
pub async fn cleanup(client: &Client) -> Result<CharonReport, ViciError> {
    let mut r = CharonReport::default();
    let conns: Vec<String> = client
        .call(&GetConns)
        .await?
        .into_iter()
        .filter(|n| peer_of(n).is_some())
        .collect();
    r.note("get-conns", 1);
    let sas = list_sas(client).await?;
    r.note("list-sas", 1);
    for ike in sas.iter().filter(|i| peer_of(&i.name).is_some()) {
        r.note("terminate", 1);
        let owner = peer_of(&ike.name).unwrap_or("mesh");
        match client.call(&terminate_ike_cmd(ike.uniqueid)).await {
            Ok(_) => r.change(
                Change::delete(LAYER, format!("sa {} ike-id={}", ike.name, ike.uniqueid))
                    .for_peer(owner),
            ),
            Err(e) if e.is_connection_lost() => return Err(e),
            Err(e) => r.error(owner, format!("terminate {}: {e}", ike.name)),
        }
    }
    for name in conns {
        r.note("unload-conn", 1);
        let owner = peer_of(&name).unwrap_or("mesh").to_string();
        match client.call(&UnloadConn { name: name.clone() }).await {
            Ok(()) => {
                r.unloaded += 1;
                r.change(Change::delete(LAYER, format!("conn {name}")));
            }
            Err(e) if e.is_connection_lost() => return Err(e),
            Err(e) => r.error(&owner, format!("unload-conn {name}: {e}")),
        }
    }
    let keys = client.call(&GetShared).await?;
    r.note("get-shared", 1);
    let ours: Vec<String> = keys
        .into_iter()
        .filter(|k| k.starts_with(SHARED_PREFIX))
        .collect();
    unload_keys(client, &mut r, &ours).await?;
    Ok(r)
}

/// State and counters of every peer of `plan` (sums over its installed children).
pub async fn counters(
    client: &Client,
    plan: &Plan,
) -> Result<BTreeMap<String, PeerCounters>, ViciError> {
    let sas = list_sas(client).await?;
    Ok(plan
        .peers
        .iter()
        .map(|p| {
            let s = conn_sas(&super::desired::conn_name(p.host.as_str()), &sas);
            let state = if s.up {
                PeerState::Up
            } else if s.connecting {
                PeerState::Connecting
            } else {
                PeerState::Down
            };
            (
                p.host.to_string(),
                PeerCounters {
                    state,
                    bytes_out: s.bytes_out,
                    packets_out: s.packets_out,
                    bytes_in: s.bytes_in,
                    packets_in: s.packets_in,
                    sa: None,
                },
            )
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataplane::charon::types::{AuthConfig, ConnConfig};

    fn conn(i: usize, ts: usize) -> DesiredConn {
        let mut c = ConnConfig::ikev2(
            format!("ipsec-mesh-h{i}"),
            AuthConfig::psk("a"),
            AuthConfig::psk("b"),
        );
        c.children = vec![crate::dataplane::charon::types::ChildConfig::tunnel(
            c.name.clone(),
            vec!["10.0.0.0/24".into()],
            (0..ts)
                .map(|k| format!("10.{}.{}.0/24", k / 256 + 1, k % 256))
                .collect(),
        )];
        DesiredConn::new(&format!("h{i}"), Role::Initiator, c)
    }

    #[test]
    fn loads_are_packed_by_count_and_size() {
        let small: Vec<DesiredConn> = (0..130).map(|i| conn(i, 1)).collect();
        let refs: Vec<&DesiredConn> = small.iter().collect();
        let p = packs(&refs);
        assert_eq!(p.iter().map(Vec::len).collect::<Vec<_>>(), [64, 64, 2]);
        assert_eq!(p[2][1].name(), "ipsec-mesh-h129", "order kept");
        // conns with many subnets: the byte budget splits first
        let big: Vec<DesiredConn> = (0..40).map(|i| conn(i, 1000)).collect();
        assert!(big[0].wire_len > 15_000, "{}", big[0].wire_len);
        let refs: Vec<&DesiredConn> = big.iter().collect();
        let p = packs(&refs);
        assert!(p.len() > 1);
        for pack in &p {
            assert!(pack.iter().map(|c| c.wire_len).sum::<usize>() <= LOAD_PACK_BYTES);
        }
        assert_eq!(p.iter().map(Vec::len).sum::<usize>(), 40);
        assert!(packs(&[]).is_empty());
    }
}

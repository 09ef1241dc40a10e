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
//!    ([`explain`](super::desired::explain)).
//!
//! With nothing changed and every SA up, a reconcile sends three reads and no write.
//! The watcher ([`super::revive`]) runs on its own connection; if it and a reconcile
//! initiate the same child at once, the duplicate IKE_SA is closed by the pair's initiator
//! at its next reconcile.
//! Errors are per peer (`CharonReport::errors`); only a lost connection or a failed read
//! aborts a reconcile (`Err`): reconnect ([`Client::connect`] waits for charon) and run
//! it again. [`cleanup`] terminates and unloads our conns and unloads our shared keys,
//! nothing else. [`CharonMesh`] wraps it all for the synchronous
//! [`Driver`] interface.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use serde::Serialize;
use zeroize::Zeroizing;

use super::batch::{self, BatchOptions, Outcome, Request};
use super::client::{Client, ConnectOptions, ViciError};
use super::desired::{
    conn_sas, desired, diff_conns, diff_shared, explain_with, peer_of, CharonConfig, DesiredConn,
    ListedConn, Role, SHARED_PREFIX,
};
use super::types::{
    Command, GetConns, GetShared, IkeSa, Initiate, ListSas, LoadShared, SharedKeyType, Stats,
    Terminate, UnloadConn, UnloadShared,
};
use super::wire::Message;
use crate::dataplane::driver::{Driver, DriverReport, PeerCounters, Wake};
use crate::plan::{Plan, Psk};

/// Commands that modify charon's state.
pub const WRITE_COMMANDS: [&str; 6] = [
    "load-shared",
    "unload-shared",
    "load-conn",
    "unload-conn",
    "initiate",
    "terminate",
];

const READ_COMMANDS: [&str; 5] = ["list-conns", "list-sas", "get-shared", "get-conns", "stats"];

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

/// Where a peer stands after a reconcile.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PeerState {
    /// The child SA is installed.
    Up,
    /// charon is setting the SA up (its own restart, or the peer initiating).
    Connecting,
    /// Loaded, no SA, not initiated by this side (see the error, if any).
    Down,
    /// Loading or initiating failed: see `errors`.
    Failed,
    /// No conn for this peer (no subnet on one side).
    Skipped,
}

impl PeerState {
    pub fn as_str(self) -> &'static str {
        match self {
            PeerState::Up => "up",
            PeerState::Connecting => "connecting",
            PeerState::Down => "down",
            PeerState::Failed => "failed",
            PeerState::Skipped => "skipped",
        }
    }
}

/// What a reconcile or cleanup did.
#[derive(Debug, Clone, Default)]
pub struct CharonReport {
    /// Modifying commands sent ([`WRITE_COMMANDS`]). 0 means nothing changed.
    pub writes: usize,
    /// Every command sent, by name (reads too).
    pub sent: BTreeMap<&'static str, usize>,
    /// One line per change, never secrets.
    pub changes: Vec<String>,
    /// Failures by owner: a peer's host id, or `mesh` for the shared key / the whole run.
    pub errors: Vec<(String, String)>,
    /// State of every peer of the plan.
    pub peers: BTreeMap<String, PeerState>,
    /// Conns loaded (new or changed); several may share one `load-conn` (see [`LOAD_PACK`]).
    pub loaded: usize,
    /// Conns of departed peers unloaded.
    pub unloaded: usize,
}

impl CharonReport {
    pub fn ok(&self) -> bool {
        self.errors.is_empty()
    }

    /// How many `command`s were sent.
    pub fn sent(&self, command: &str) -> usize {
        self.sent.get(command).copied().unwrap_or(0)
    }

    /// The first error reported for `owner`.
    pub fn error_for(&self, owner: &str) -> Option<&str> {
        self.errors
            .iter()
            .find(|(o, _)| o == owner)
            .map(|(_, e)| e.as_str())
    }

    fn note(&mut self, command: &'static str, n: usize) {
        if n == 0 {
            return;
        }
        *self.sent.entry(command).or_default() += n;
        if WRITE_COMMANDS.contains(&command) {
            self.writes += n;
        }
    }

    fn error(&mut self, owner: &str, msg: impl Into<String>) {
        let msg = msg.into();
        tracing::warn!(peer = owner, error = %msg, "charon driver");
        self.errors.push((owner.to_string(), msg));
    }

    fn change(&mut self, line: impl Into<String>) {
        let line = line.into();
        tracing::info!(change = %line, "charon driver");
        self.changes.push(line);
    }

    fn set(&mut self, peer: &str, st: PeerState) {
        self.peers.insert(peer.to_string(), st);
    }

    /// The generic driver report: peers still connecting count as not in place.
    pub fn into_driver_report(self) -> DriverReport {
        let mut errors = self.errors;
        for (p, st) in &self.peers {
            if *st == PeerState::Connecting && !errors.iter().any(|(o, _)| o == p) {
                errors.push((
                    p.clone(),
                    "charon is still setting up the SA (retried by the next reconcile)".into(),
                ));
            }
        }
        DriverReport {
            writes: self.writes,
            changes: self.changes,
            errors,
            parts: vec![("charon", self.writes)],
        }
    }
}

fn cmd_name(c: &str) -> &'static str {
    WRITE_COMMANDS
        .iter()
        .chain(READ_COMMANDS.iter())
        .find(|k| **k == c)
        .copied()
        .unwrap_or("other")
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

fn terminate_ike(id: u64, conn: &str) -> Request {
    let t = Terminate {
        ike_id: Some(id),
        force: true,
        timeout_ms: Some(1000),
        ..Default::default()
    };
    Request::new(
        "terminate",
        format!("conn={conn} ike-id={id}"),
        t.to_message(),
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
                r.change(format!("initiated {} ({}): up", c.name(), c.role.as_str()));
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

    // --- read
    let listed = list_conns(client).await?;
    r.note("list-conns", 1);
    let shared_ids = client.call(&GetShared).await?;
    r.note("get-shared", 1);
    let sas = list_sas(client).await?;
    r.note("list-sas", 1);
    let cd = diff_conns(&want, &listed);
    let sd = diff_shared(&want.shared, &shared_ids);

    // --- shared key (never pipelined, never logged)
    let mut key_in = !sd.load;
    if sd.load {
        let ls = LoadShared {
            id: want.shared.id.clone(),
            kind: SharedKeyType::Ike,
            data: Zeroizing::new(psk.expose().to_vec()),
            owners: want.shared.owners.clone(),
        };
        r.note("load-shared", 1);
        match client.call(&ls).await {
            Ok(()) => {
                key_in = true;
                r.change(format!(
                    "load-shared {} ({} owners)",
                    ls.id,
                    ls.owners.len()
                ));
            }
            Err(e) if e.is_connection_lost() => return Err(e),
            Err(e) => r.error("mesh", format!("load-shared {}: {e}", ls.id)),
        }
    }

    // --- conns, in the order they must run on one connection: close and unload departed
    // peers, unload changed conns (see desired.rs: a reload alone may keep the old object),
    // then load new and changed ones, packed
    let changed: BTreeMap<&str, &Vec<String>> =
        cd.change.iter().map(|(n, d)| (n.as_str(), d)).collect();
    let unload = |name: &str| {
        Request::new(
            "unload-conn",
            format!("conn={name}"),
            UnloadConn {
                name: name.to_string(),
            }
            .to_message(),
        )
    };
    let mut reqs: Vec<(Vec<&str>, Request)> = Vec::new();
    for name in &cd.remove {
        for ike in conn_sas(name, &sas).ike_ids {
            reqs.push((vec![name.as_str()], terminate_ike(ike, name)));
        }
        reqs.push((vec![name.as_str()], unload(name)));
    }
    for (name, _) in &cd.change {
        reqs.push((vec![name.as_str()], unload(name)));
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
    let mut load_failed: BTreeSet<String> = BTreeSet::new();
    let mut loaded: Vec<&str> = Vec::new();
    if !reqs.is_empty() {
        let only: Vec<Request> = reqs.iter().map(|(_, q)| q.clone()).collect();
        let outs = send(cfg, &mut r, &only, BatchOptions::default()).await?;
        let mut retry: Vec<&DesiredConn> = Vec::new();
        for ((names, q), o) in reqs.iter().zip(outs) {
            let owner = names
                .first()
                .and_then(|n| peer_of(n))
                .unwrap_or("mesh")
                .to_string();
            match (q.command.as_str(), o.result) {
                ("load-conn", Ok(_)) => loaded.extend(names),
                // which conn of the pack did charon refuse? ask one by one
                ("load-conn", Err(ViciError::CommandFailed { .. })) if names.len() > 1 => {
                    retry.extend(names.iter().map(|n| &want.conns[*n]));
                }
                ("load-conn", Err(e)) => {
                    for n in names {
                        let p = peer_of(n).unwrap_or("mesh");
                        load_failed.insert(n.to_string());
                        r.set(p, PeerState::Failed);
                        r.error(p, format!("load-conn {n}: {e}"));
                    }
                }
                ("unload-conn", Ok(_)) if !changed.contains_key(names[0]) => {
                    r.unloaded += 1;
                    r.change(format!("unload-conn {} (peer left)", names[0]));
                }
                ("terminate", Ok(_)) => r.change(format!("terminate {}", q.context)),
                (_, Ok(_)) => {}
                (cmd, Err(e)) => r.error(&owner, format!("{cmd} {}: {e}", names[0])),
            }
        }
        if !retry.is_empty() {
            let one: Vec<Request> = retry
                .iter()
                .map(|c| Request::new("load-conn", format!("conn={}", c.name()), c.load_message()))
                .collect();
            let outs = send(cfg, &mut r, &one, BatchOptions::default()).await?;
            for (c, o) in retry.iter().zip(outs) {
                match o.result {
                    Ok(_) => loaded.push(c.name()),
                    Err(e) => {
                        load_failed.insert(c.name().to_string());
                        r.set(&c.peer, PeerState::Failed);
                        r.error(&c.peer, format!("load-conn {}: {e}", c.name()));
                    }
                }
            }
        }
    }
    r.loaded = loaded.len();
    for name in loaded {
        let what = match changed.get(name) {
            Some(d) => format!("changed: {}", d.join("; ")),
            None => "new".into(),
        };
        r.change(format!("load-conn {name} ({what})"));
    }

    // --- old shared keys, once the current one is in
    if key_in && !sd.remove.is_empty() {
        for id in &sd.remove {
            r.note("unload-shared", 1);
            match client.call(&UnloadShared { id: id.clone() }).await {
                Ok(()) => r.change(format!("unload-shared {id}")),
                Err(e) if e.is_connection_lost() => return Err(e),
                Err(e) => r.error("mesh", format!("unload-shared {id}: {e}")),
            }
        }
    }

    // --- SAs
    let mut terminate: Vec<Request> = Vec::new();
    let mut now: Vec<&DesiredConn> = Vec::new();
    let mut later: Vec<&DesiredConn> = Vec::new();
    for (name, c) in &want.conns {
        if load_failed.contains(name) {
            continue;
        }
        let s = conn_sas(name, &sas);
        let replace = changed.contains_key(name.as_str()) && c.role == Role::Initiator;
        if s.up && replace && sas_too {
            // the old SA carries the old settings: replace it (break before make)
            for id in &s.ike_ids {
                terminate.push(terminate_ike(*id, name));
            }
            now.push(c);
        } else if s.up {
            r.set(&c.peer, PeerState::Up);
            if c.role == Role::Initiator && sas_too {
                for id in &s.duplicates {
                    terminate.push(terminate_ike(*id, name));
                }
            }
        } else if s.connecting {
            r.set(&c.peer, PeerState::Connecting);
        } else if !sas_too {
            r.set(&c.peer, PeerState::Down);
        } else if c.role == Role::Initiator {
            now.push(c);
        } else {
            later.push(c);
        }
    }
    let t0 = Instant::now();
    let mut no_esp = None;
    if !terminate.is_empty() {
        let outs = send(cfg, &mut r, &terminate, BatchOptions::default()).await?;
        for (q, o) in terminate.iter().zip(outs) {
            match o.result {
                Ok(_) => r.change(format!("terminate {}", q.context)),
                Err(e) => r.error("mesh", format!("terminate {}: {e}", q.context)),
            }
        }
    }
    initiate_all(client, cfg, &mut r, &now, &mut no_esp).await?;
    if !later.is_empty() {
        tokio::time::sleep(cfg.responder_grace.saturating_sub(t0.elapsed())).await;
        let sas = list_sas(client).await?;
        r.note("list-sas", 1);
        let mut todo = Vec::new();
        for c in later {
            let s = conn_sas(c.name(), &sas);
            if s.up {
                r.set(&c.peer, PeerState::Up);
            } else if s.connecting {
                r.set(&c.peer, PeerState::Connecting);
            } else {
                todo.push(c);
            }
        }
        initiate_all(client, cfg, &mut r, &todo, &mut no_esp).await?;
    }
    for c in want.conns.values() {
        r.peers.entry(c.peer.clone()).or_insert(PeerState::Down);
    }
    Ok(r)
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
        let t = Terminate {
            ike_id: Some(ike.uniqueid),
            force: true,
            timeout_ms: Some(1000),
            ..Default::default()
        };
        let owner = peer_of(&ike.name).unwrap_or("mesh");
        match client.call(&t).await {
            Ok(_) => r.change(format!("terminate {} ike-id={}", ike.name, ike.uniqueid)),
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
                r.change(format!("unload-conn {name}"));
            }
            Err(e) if e.is_connection_lost() => return Err(e),
            Err(e) => r.error(&owner, format!("unload-conn {name}: {e}")),
        }
    }
    let keys = client.call(&GetShared).await?;
    r.note("get-shared", 1);
    for id in keys.into_iter().filter(|k| k.starts_with(SHARED_PREFIX)) {
        r.note("unload-shared", 1);
        match client.call(&UnloadShared { id: id.clone() }).await {
            Ok(()) => r.change(format!("unload-shared {id}")),
            Err(e) if e.is_connection_lost() => return Err(e),
            Err(e) => r.error("mesh", format!("unload-shared {id}: {e}")),
        }
    }
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
                "up"
            } else if s.connecting {
                "connecting"
            } else {
                "down"
            };
            (
                p.host.to_string(),
                PeerCounters {
                    state: state.into(),
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

/// The charon driver behind the synchronous [`Driver`] interface (`apply`, `cleanup`,
/// `status`): owns a current-thread runtime and one client, connects on first use (waiting
/// for charon as [`ConnectOptions`] says) and reconnects once when the connection was lost.
pub struct CharonMesh {
    pub cfg: CharonConfig,
    pub connect: ConnectOptions,
    psk: Option<Psk>,
    rt: tokio::runtime::Runtime,
    client: Option<Client>,
    /// Plans for the event watcher thread, once the sidecar started it ([`Driver::watch`]).
    watcher: Option<tokio::sync::watch::Sender<Plan>>,
}

impl CharonMesh {
    /// `psk` is required for `reconcile`, not for `cleanup` / `counters`.
    pub fn new(cfg: CharonConfig, psk: Option<&Psk>) -> std::io::Result<CharonMesh> {
        Ok(CharonMesh {
            cfg,
            connect: ConnectOptions::default(),
            psk: psk.map(|p| Psk::from_bytes(p.expose())),
            rt: tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?,
            client: None,
            watcher: None,
        })
    }

    /// The sidecar's event watcher: on its own thread, runtime and VICI connection, it runs
    /// [`revive::run`](super::revive::run) (lost children re-initiated with per-peer
    /// backoff); when charon goes away it reconnects (waiting for charon as `connect` says)
    /// and asks the sidecar to reconcile at once, since a restarted charon has lost every
    /// conn and key.
    fn start_watcher(&mut self, plan: &Plan, wake: Wake) -> std::io::Result<()> {
        let (tx, rx) = tokio::sync::watch::channel(plan.clone());
        let cfg = self.cfg.clone();
        let connect = self.connect.clone();
        std::thread::Builder::new()
            .name("charon-events".into())
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        tracing::error!(error = %e, "charon event watcher: no runtime");
                        return;
                    }
                };
                let mut first = true;
                loop {
                    if rx.has_changed().is_err() {
                        return; // the driver is gone
                    }
                    match rt.block_on(Client::connect(&cfg.vici_socket, &connect)) {
                        Ok(client) => {
                            if !first {
                                tracing::info!("charon is back: asking for a reconcile");
                                wake();
                            }
                            first = false;
                            let e = rt.block_on(super::revive::run(
                                &client,
                                rx.clone(),
                                &cfg,
                                |r| tracing::info!(peer = %r.peer, conn = %r.conn, result = ?r.result, "revive"),
                            ));
                            tracing::warn!(error = %e, "charon event watcher disconnected");
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "charon event watcher cannot connect");
                            std::thread::sleep(Duration::from_millis(500));
                        }
                    }
                }
            })?;
        self.watcher = Some(tx);
        Ok(())
    }

    fn ensure_client(&mut self) -> Result<(), ViciError> {
        if self.client.as_ref().is_some_and(|c| c.closed().is_some()) {
            self.client = None;
        }
        if self.client.is_none() {
            let c = self
                .rt
                .block_on(Client::connect(&self.cfg.vici_socket, &self.connect))?;
            self.client = Some(c);
        }
        Ok(())
    }

    /// Runs `op` with a connected client; reconnects and retries once on a lost connection.
    fn with_client<T>(
        &mut self,
        op: impl Fn(&tokio::runtime::Runtime, &Client, &CharonConfig) -> Result<T, ViciError>,
    ) -> Result<T, ViciError> {
        let mut last = None;
        for _ in 0..2 {
            self.ensure_client()?;
            let client = self.client.as_ref().expect("connected above");
            match op(&self.rt, client, &self.cfg) {
                Err(e) if e.is_connection_lost() => {
                    tracing::warn!(error = %e, "charon connection lost; reconnecting");
                    self.client = None;
                    last = Some(e);
                }
                other => return other,
            }
        }
        Err(last.expect("two attempts failed"))
    }

    /// One reconcile ([`reconcile`]).
    pub fn reconcile_report(&mut self, plan: &Plan) -> Result<CharonReport, ViciError> {
        let psk = match &self.psk {
            Some(p) => Psk::from_bytes(p.expose()),
            None => {
                let mut r = CharonReport::default();
                r.error(
                    "mesh",
                    "the charon driver needs the PSK (--psk-file) to load the shared key",
                );
                return Ok(r);
            }
        };
        self.with_client(|rt, c, cfg| rt.block_on(reconcile(c, plan, &psk, cfg)))
    }

    /// [`cleanup`].
    pub fn cleanup_report(&mut self) -> Result<CharonReport, ViciError> {
        self.with_client(|rt, c, _| rt.block_on(cleanup(c)))
    }
}

fn failed_run(e: ViciError) -> DriverReport {
    DriverReport {
        errors: vec![("mesh".into(), e.to_string())],
        ..Default::default()
    }
}

impl Driver for CharonMesh {
    fn name(&self) -> &'static str {
        "charon"
    }

    fn reconcile(&mut self, plan: &Plan) -> DriverReport {
        match self.reconcile_report(plan) {
            Ok(r) => r.into_driver_report(),
            Err(e) => failed_run(e),
        }
    }

    fn cleanup(&mut self) -> DriverReport {
        match self.cleanup_report() {
            Ok(r) => r.into_driver_report(),
            Err(e) => failed_run(e),
        }
    }

    fn counters(&mut self, plan: &Plan) -> BTreeMap<String, PeerCounters> {
        self.with_client(|rt, c, _| rt.block_on(counters(c, plan)))
            .unwrap_or_default()
    }

    fn watch(&mut self, plan: &Plan, wake: Wake) {
        match &self.watcher {
            Some(tx) => {
                let _ = tx.send(plan.clone());
            }
            None => {
                if let Err(e) = self.start_watcher(plan, wake) {
                    tracing::error!(error = %e, "cannot start the charon event watcher");
                }
            }
        }
    }
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

    #[test]
    fn report_counts_writes_only_for_modifying_commands() {
        let mut r = CharonReport::default();
        r.note("list-conns", 1);
        r.note("list-sas", 2);
        assert_eq!(r.writes, 0);
        r.note("load-conn", 3);
        r.note("initiate", 1);
        assert_eq!(
            (r.writes, r.sent("load-conn"), r.sent("list-sas")),
            (4, 3, 2)
        );
        r.set("host-b", PeerState::Connecting);
        r.set("host-c", PeerState::Up);
        let d = r.into_driver_report();
        assert_eq!(d.writes, 4);
        assert_eq!(d.errors.len(), 1);
        assert_eq!(d.errors[0].0, "host-b");
    }
}

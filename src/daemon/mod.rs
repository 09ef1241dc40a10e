//! The sidecar: watch the metadata, plan, reconcile; resync on a timer; back off per peer on
//! errors; serve status and metrics; stop on SIGTERM/SIGINT leaving the dataplane in place
//! (unless asked to clean up); reload on SIGHUP.
//!
//! Threads: the main loop (owns the driver; every kernel/charon write happens here), a
//! metadata watcher (blocking long-poll or file watch), a signal thread (signal-hook) and
//! the status server (a thread per connection). They talk to the loop through one channel.

pub mod server;
pub mod status;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::mpsc::{self, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use tracing::{error, info, warn};

use crate::dataplane::driver::{Driver, PeerCounters};
use crate::metadata::{self, MetadataSource, Snapshot};
use crate::plan::rekey::{Reason, Rekey};
use crate::plan::{self, Plan, PlanOptions, Psk};
use status::{unix_now, Status};

/// Longest pause between two retries of a failing peer.
pub const BACKOFF_MAX: Duration = Duration::from_secs(60);
/// First retry delay of a failing peer.
pub const BACKOFF_BASE: Duration = Duration::from_secs(1);
/// How often per-peer counters in the status are refreshed between reconciles.
const STATS_EVERY: Duration = Duration::from_secs(5);
/// How long one long-poll / file watch waits before asking again.
const WATCH_WAIT: Duration = Duration::from_secs(30);

pub struct DaemonConfig {
    pub source: String,
    pub host: Option<String>,
    /// Largest metadata answer accepted, bytes.
    pub metadata_max_bytes: u64,
    pub resync: Duration,
    pub listen: Option<server::Listen>,
    pub cleanup_on_exit: bool,
    /// Plan options; `generation` is recomputed from `base_generation` and `rekey`.
    pub plan: PlanOptions,
    /// `--key-generation`: the generation sent with, or the base of the rekey periods.
    pub base_generation: u32,
    pub rekey: Rekey,
    pub psk: Option<Psk>,
}

#[derive(Debug)]
enum Event {
    /// The metadata may have changed (watcher) or a reload was asked for (SIGHUP).
    Reload(&'static str),
    Stop(&'static str),
    /// The driver saw a change to its objects (kernel notification, charon restarted):
    /// reconcile now, from the metadata already loaded.
    Repair,
}

/// Retry delay after `failures` consecutive failures.
pub fn backoff(failures: u32) -> Duration {
    let exp = failures.saturating_sub(1).min(16);
    (BACKOFF_BASE * 2u32.pow(exp)).min(BACKOFF_MAX)
}

/// Deliver SIGTERM, SIGINT and SIGHUP to the loop from a signal thread. The handlers
/// (signal-hook's self-pipe) are process-wide, so this works whatever threads exist already,
/// and child processes start with every signal unblocked.
fn spawn_signal_thread(tx: Sender<Event>) -> std::io::Result<signal_hook::iterator::Handle> {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    spawn_signal_thread_for(&[SIGTERM, SIGINT, SIGHUP], tx)
}

fn spawn_signal_thread_for(
    signals: &[libc::c_int],
    tx: Sender<Event>,
) -> std::io::Result<signal_hook::iterator::Handle> {
    use signal_hook::consts::{SIGHUP, SIGINT};
    let mut signals = signal_hook::iterator::Signals::new(signals)?;
    let handle = signals.handle();
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            for sig in signals.forever() {
                let ev = match sig {
                    SIGHUP => Event::Reload("SIGHUP"),
                    SIGINT => Event::Stop("SIGINT"),
                    _ => Event::Stop("SIGTERM"),
                };
                if tx.send(ev).is_err() {
                    return;
                }
            }
        })?;
    Ok(handle)
}

/// Watch the source; after a failed watch, retry with backoff capped at `max_retry` (the
/// resync period), so a metadata service that comes back is noticed within one resync.
fn spawn_watcher(
    mut src: Box<dyn MetadataSource>,
    mut version: String,
    max_retry: Duration,
    tx: Sender<Event>,
) {
    let _ = std::thread::Builder::new()
        .name("metadata-watch".into())
        .spawn(move || {
            let mut failures = 0;
            loop {
                match src.wait_for_change(&version, WATCH_WAIT) {
                    Ok(Some(v)) => {
                        failures = 0;
                        version = v;
                        if tx.send(Event::Reload("metadata changed")).is_err() {
                            return;
                        }
                    }
                    Ok(None) => {
                        // The source answers again but nothing changed: reload once anyway,
                        // or the error of a reload that failed during the outage would stay
                        // in the status until the next change.
                        if failures > 0 && tx.send(Event::Reload("metadata source back")).is_err() {
                            return;
                        }
                        failures = 0;
                    }
                    Err(e) => {
                        failures += 1;
                        warn!(error = %e, "metadata watch failed; keeping the last good state");
                        std::thread::sleep(backoff(failures).min(max_retry));
                        // The loop reloads and reports the error in status.
                        if tx.send(Event::Reload("metadata watch error")).is_err() {
                            return;
                        }
                    }
                }
            }
        });
}

struct Loop {
    cfg: DaemonConfig,
    driver: Box<dyn Driver>,
    source: Box<dyn MetadataSource>,
    status: Arc<Mutex<Status>>,
    /// Last plan that was reconciled (from the last good metadata).
    plan: Option<Plan>,
    /// Version of the last good metadata.
    version: Option<String>,
    peer_failures: HashMap<String, u32>,
    /// Errors of the last reconcile, by owner (kept for counter refreshes).
    last_errors: BTreeMap<String, String>,
    /// Lets the driver's own watcher ask for a reconcile now.
    wake: crate::dataplane::driver::Wake,
    /// The last good metadata and the self host's id in it.
    snapshot: Option<(Snapshot, String)>,
    /// Key generation of the current plan.
    generation: Option<u32>,
    /// Peers whose outbound direction is one generation ahead (usage-limit rekey).
    ahead: BTreeSet<String>,
    /// Whether `ahead` was taken over from the kernel (SAs left by an earlier run).
    ahead_seeded: bool,
}

impl Loop {
    fn set_status(&self, f: impl FnOnce(&mut Status)) {
        if let Ok(mut s) = self.status.lock() {
            f(&mut s);
        }
    }

    fn self_id(&self, snap: &Snapshot) -> Result<String, String> {
        metadata::self_host(
            snap,
            &self.cfg.source,
            self.cfg.host.as_deref(),
            "pass --host",
        )
        .map_err(|e| e.to_string())
    }

    /// Load and validate the metadata, then plan. On failure the last good plan stays and
    /// the error is shown. Returns whether the plan changed.
    fn load(&mut self) -> bool {
        let snap = self.source.load().map_err(|e| e.to_string());
        let loaded = snap.and_then(|snap| {
            let me = self.self_id(&snap)?;
            Ok((snap, me))
        });
        match loaded {
            Ok((snap, me)) => {
                let version = snap.version.clone();
                let previous = self.snapshot.replace((snap, me));
                let skipped = self.source.skipped();
                self.set_status(|s| {
                    s.metadata.last_error = None;
                    s.metadata.skipped = skipped;
                });
                let Some(changed) = self.replan() else {
                    // Not plannable (e.g. the self host left): keep the last good state.
                    self.snapshot = previous;
                    return false;
                };
                if let Some(p) = &self.plan {
                    info!(version = %version, peers = p.peers.len(), changed, "metadata loaded");
                    let host = p.host.to_string();
                    self.set_status(|s| {
                        s.host = Some(host);
                        s.metadata.version = Some(version.clone());
                        s.metadata.loaded_at = Some(unix_now());
                    });
                    self.version = Some(version);
                }
                changed
            }
            Err(e) => {
                error!(error = %e, "metadata rejected; keeping the last good state");
                self.set_status(|s| s.metadata.last_error = Some(e));
                false
            }
        }
    }

    /// Plan from the last good metadata, with the key generation of this moment and the
    /// directions that are ahead. Returns whether the plan changed, `None` if planning failed
    /// (the error is in the status; the last good plan stays).
    fn replan(&mut self) -> Option<bool> {
        let (snap, me) = self.snapshot.as_ref()?;
        let now = SystemTime::now();
        let gen = self.cfg.rekey.generation(self.cfg.base_generation, now);
        if self.generation.is_some_and(|g| g != gen) {
            info!(
                from = self.generation,
                to = gen,
                "key generation advanced (--rekey-every)"
            );
            self.ahead.clear();
            self.set_status(|s| s.keying.count(Reason::Age));
        }
        let mut opts = self.cfg.plan.clone();
        opts.generation = gen;
        opts.ahead = self.ahead.clone();
        match plan::plan(&snap.cluster, me, &opts, self.cfg.psk.as_ref()) {
            Ok(p) => {
                self.generation = Some(gen);
                // Peers that left are no longer ahead.
                self.ahead
                    .retain(|h| p.peers.iter().any(|q| q.host.as_str() == h));
                let changed = self.plan.as_ref() != Some(&p);
                let rekey = self.cfg.rekey;
                let ahead: Vec<String> = self.ahead.iter().cloned().collect();
                self.set_status(|s| s.keying.update(&rekey, gen, ahead, now));
                self.driver.watch(&p, self.wake.clone());
                self.plan = Some(p);
                Some(changed)
            }
            Err(e) => {
                let e = e.to_string();
                error!(error = %e, "metadata rejected; keeping the last good state");
                self.set_status(|s| s.metadata.last_error = Some(e));
                None
            }
        }
    }

    /// Before the first reconcile: directions an earlier run moved ahead (their outbound SA
    /// in the kernel has the next generation) stay ahead, so a restart never goes back to a
    /// key that reached its usage limit.
    fn seed_ahead(&mut self) {
        if self.ahead_seeded || !self.cfg.rekey.enabled() {
            return;
        }
        let Some(plan) = self.plan.clone() else {
            return;
        };
        self.ahead_seeded = true;
        let found: Vec<String> = self
            .driver
            .counters(&plan)
            .into_iter()
            .filter(|(_, c)| c.sa.as_ref().is_some_and(|d| d.ahead))
            .map(|(h, _)| h)
            .collect();
        if !found.is_empty() {
            info!(
                peers = found.len(),
                "outbound directions found one generation ahead stay ahead"
            );
            self.ahead.extend(found);
            let _ = self.replan();
        }
    }

    /// Usage-limit rekey: directions whose outbound SA reached the limit move one generation
    /// ahead. Returns whether the plan changed (the caller reconciles).
    fn check_usage(&mut self, counters: &BTreeMap<String, PeerCounters>) -> bool {
        let rekey = self.cfg.rekey;
        if !rekey.may_move_ahead(SystemTime::now()) {
            return false;
        }
        let mut moved = 0;
        for (host, c) in counters {
            let on_plan_generation = c.sa.as_ref().is_some_and(|d| !d.ahead);
            if on_plan_generation
                && !self.ahead.contains(host)
                && rekey.exhausted(c.bytes_out, c.packets_out)
            {
                info!(
                    peer = %host,
                    bytes = c.bytes_out,
                    packets = c.packets_out,
                    "usage limit reached: the outbound direction moves one key generation ahead"
                );
                self.ahead.insert(host.clone());
                moved += 1;
            }
        }
        if moved == 0 {
            return false;
        }
        self.set_status(|s| {
            for _ in 0..moved {
                s.keying.count(Reason::Usage);
            }
        });
        self.replan() == Some(true)
    }

    /// Reconcile; then, if a usage limit moved directions ahead, reconcile again for them.
    fn reconcile(&mut self) {
        while let Some(counters) = self.reconcile_once() {
            if !self.check_usage(&counters) {
                break;
            }
        }
    }

    /// One reconcile of the current plan; the counters read after it.
    fn reconcile_once(&mut self) -> Option<BTreeMap<String, PeerCounters>> {
        let plan = self.plan.clone()?;
        let t = Instant::now();
        let report = self.driver.reconcile(&plan);
        let ms = t.elapsed().as_secs_f64() * 1e3;
        let errors: BTreeMap<String, String> = report
            .errors
            .iter()
            .map(|f| (f.owner.clone(), f.error.clone()))
            .collect();
        self.last_errors = errors.clone();
        for f in &report.errors {
            warn!(peer = %f.owner, error = %f.error, "not in place");
        }
        log_changes(&report);
        // Per-peer backoff: a failing peer's counter grows, a healthy one's resets.
        let failed = report.failed_peers();
        // Sorted (failed_peers sorts and dedups): a binary search, not a scan per peer.
        self.peer_failures
            .retain(|p, _| failed.binary_search(&p.as_str()).is_ok());
        for p in failed {
            *self.peer_failures.entry(p.to_string()).or_default() += 1;
        }
        info!(
            writes = report.writes,
            errors = report.errors.len(),
            ms = format!("{ms:.1}"),
            "reconciled"
        );
        let counters = self.driver.counters(&plan);
        let now = unix_now();
        let version = self.version.clone();
        self.set_status(|s| {
            s.reconciles.count += 1;
            if !report.ok() {
                s.reconciles.errors += 1;
            }
            s.reconciles.last_at = Some(now);
            s.reconciles.last_duration_ms = ms;
            s.reconciles.total_duration_ms += ms;
            s.reconciles.last_writes = report.writes;
            if !report.changes.is_empty() {
                s.reconciles.last_changes = report
                    .changes
                    .iter()
                    .take(status::CHANGES_SHOWN)
                    .cloned()
                    .collect();
                s.reconciles.last_changes_total = report.changes.len();
                s.reconciles.last_changed_at = Some(now);
            }
            s.reconciles.last_version = version;
            s.update_peers(&plan, &counters, &errors, now);
        });
        Some(counters)
    }

    /// Refresh per-peer state and counters in the status without reconciling; first the
    /// driver's upkeep (the xfrm drivers keep their SAs' sequence counters near the clock).
    fn refresh_counters(&mut self) {
        let Some(plan) = self.plan.clone() else {
            return;
        };
        let tended = self.driver.tend(&plan);
        if tended > 0 {
            tracing::debug!(writes = tended, "sequence counters tended");
        }
        let counters = self.driver.counters(&plan);
        let errors = self.last_errors.clone();
        let now = unix_now();
        self.set_status(|s| s.update_peers(&plan, &counters, &errors, now));
        if self.check_usage(&counters) {
            self.reconcile();
        }
    }

    /// When the next reconcile is due: the resync period, sooner for a failing peer, and
    /// at the next key generation (just after its boundary).
    fn next_delay(&self) -> Duration {
        let d = self
            .peer_failures
            .values()
            .map(|&n| backoff(n))
            .min()
            .map_or(self.cfg.resync, |b| b.min(self.cfg.resync));
        match self.cfg.rekey.until_next(SystemTime::now()) {
            Some(t) => d.min(t + Duration::from_millis(20)),
            None => d,
        }
    }
}

/// Run the sidecar until SIGTERM/SIGINT.
pub fn run(cfg: DaemonConfig, driver: Box<dyn Driver>) -> anyhow::Result<()> {
    let (tx, rx) = mpsc::channel();
    let _signals = spawn_signal_thread(tx.clone())?;
    let open = || metadata::open_for(&cfg.source, cfg.host.as_deref(), cfg.metadata_max_bytes);
    let (source, watch_source) = (open()?, open()?);
    let status = Arc::new(Mutex::new(Status {
        driver: driver.name().to_string(),
        firewall: driver.firewall().map(|f| f.to_string()),
        has_sas: driver.has_sas(),
        metadata: status::MetadataStatus {
            source: cfg.source.clone(),
            ..Default::default()
        },
        ..Default::default()
    }));
    if let Some(l) = &cfg.listen {
        server::spawn(l, status.clone())
            .map_err(|e| anyhow::anyhow!("--listen {l:?}: cannot listen: {e}"))?;
    }
    run_loop(
        cfg,
        driver,
        Sources {
            source,
            watch_source,
        },
        status,
        (tx, rx),
    );
    Ok(())
}

/// The metadata source the loop loads from and the one its watcher blocks on.
struct Sources {
    source: Box<dyn MetadataSource>,
    watch_source: Box<dyn MetadataSource>,
}

/// The loop itself (no signals, no status server): load, reconcile, then react to events
/// on `events` until a stop event arrives or every sender is gone.
fn run_loop(
    cfg: DaemonConfig,
    driver: Box<dyn Driver>,
    sources: Sources,
    status: Arc<Mutex<Status>>,
    events: (Sender<Event>, mpsc::Receiver<Event>),
) {
    let (tx, rx) = events;
    let mut lp = Loop {
        cfg,
        driver,
        source: sources.source,
        status,
        plan: None,
        version: None,
        peer_failures: HashMap::new(),
        last_errors: BTreeMap::new(),
        snapshot: None,
        generation: None,
        ahead: BTreeSet::new(),
        ahead_seeded: false,
        wake: {
            let tx = Mutex::new(tx.clone());
            Arc::new(move || {
                if let Ok(tx) = tx.lock() {
                    let _ = tx.send(Event::Repair);
                }
            })
        },
    };
    lp.load();
    lp.seed_ahead();
    lp.reconcile();
    spawn_watcher(
        sources.watch_source,
        lp.version.clone().unwrap_or_default(),
        lp.cfg.resync,
        tx,
    );
    info!(resync_s = lp.cfg.resync.as_secs(), "running");
    let mut next_reconcile = Instant::now() + lp.next_delay();
    let mut next_stats = Instant::now() + STATS_EVERY;
    loop {
        if lp.plan.is_none() {
            // No good metadata yet: retry loading soon.
            next_reconcile = next_reconcile.min(Instant::now() + backoff(1).min(lp.cfg.resync));
        }
        let wait = next_reconcile
            .min(next_stats)
            .saturating_duration_since(Instant::now());
        match rx.recv_timeout(wait) {
            Ok(Event::Reload(why)) => {
                info!(why, "reloading");
                let changed = lp.load();
                lp.seed_ahead();
                // A change elsewhere in the fleet (another host's container on another
                // network, a stopped container of a peer that still has others...) that
                // leaves this host's plan as it was: nothing to write, and the kernel watch
                // and the resync look after drift. A reload asked for (SIGHUP), a source
                // that came back or a last reconcile with errors reconciles anyway.
                if !changed && why == "metadata changed" && lp.last_errors.is_empty() {
                    info!("this host's plan is unchanged: nothing to reconcile");
                    // The dataplane already matches this version.
                    let version = lp.version.clone();
                    lp.set_status(|s| s.reconciles.last_version = version);
                } else {
                    lp.reconcile();
                }
                next_reconcile = Instant::now() + lp.next_delay();
                next_stats = Instant::now() + STATS_EVERY;
            }
            Ok(Event::Repair) => {
                info!("the driver saw a change to its objects: reconciling");
                lp.set_status(|s| s.reconciles.driver_wakes += 1);
                if lp.plan.is_none() {
                    lp.load();
                } else {
                    let _ = lp.replan();
                }
                lp.reconcile();
                next_reconcile = Instant::now() + lp.next_delay();
                next_stats = Instant::now() + STATS_EVERY;
            }
            Ok(Event::Stop(why)) => {
                if lp.cfg.cleanup_on_exit {
                    info!(
                        why,
                        "stopping; --cleanup-on-exit: removing everything owned"
                    );
                    let r = lp.driver.cleanup();
                    log_changes(&r);
                    for f in &r.errors {
                        warn!(owner = %f.owner, error = %f.error, "cleanup failed");
                    }
                } else {
                    info!(why, "stopping; the dataplane stays in place");
                }
                return;
            }
            Err(RecvTimeoutError::Timeout) if Instant::now() >= next_reconcile => {
                if lp.plan.is_none() {
                    lp.load();
                } else {
                    // The key generation may have advanced (--rekey-every).
                    let _ = lp.replan();
                }
                lp.seed_ahead();
                lp.reconcile();
                next_reconcile = Instant::now() + lp.next_delay();
                next_stats = Instant::now() + STATS_EVERY;
            }
            Err(RecvTimeoutError::Timeout) => {
                // Between reconciles, keep /status and /metrics counters fresh.
                lp.refresh_counters();
                next_stats = Instant::now() + STATS_EVERY;
            }
            Err(RecvTimeoutError::Disconnected) => return,
        }
    }
}

/// How many changes of one reconcile are logged one by one (the rest as a count).
const CHANGES_LOGGED: usize = 50;

/// Log a reconcile's or cleanup's changes, each as `apply --diff` prints it.
fn log_changes(report: &crate::dataplane::driver::DriverReport) {
    for c in report.changes.iter().take(CHANGES_LOGGED) {
        info!(change = %c, "changed");
    }
    if report.changes.len() > CHANGES_LOGGED {
        info!(
            more = report.changes.len() - CHANGES_LOGGED,
            "more changes (see /status or --diff)"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataplane::driver::DriverReport;
    use crate::model::{Cluster, RawCluster};
    use std::sync::Condvar;

    /// A metadata source the test changes: each change bumps the version and wakes the
    /// watcher's long-poll, as a file watch or rancher-metadata's long-poll does.
    /// (version, what a load returns), and the condition a long-poll waits on.
    type FakeState = (Mutex<(u64, Result<RawCluster, String>)>, Condvar);

    #[derive(Clone)]
    struct FakeSource(Arc<FakeState>);

    impl FakeSource {
        fn new(raw: RawCluster) -> FakeSource {
            FakeSource(Arc::new((Mutex::new((1, Ok(raw))), Condvar::new())))
        }
        fn set(&self, next: Result<RawCluster, String>) {
            let mut g = self.0 .0.lock().unwrap();
            g.0 += 1;
            g.1 = next;
            self.0 .1.notify_all();
        }
        fn edit(&self, f: impl FnOnce(&mut RawCluster)) {
            let mut raw = self.0 .0.lock().unwrap().1.clone().unwrap();
            f(&mut raw);
            self.set(Ok(raw));
        }
    }

    impl MetadataSource for FakeSource {
        fn origin(&self) -> String {
            "fake".into()
        }
        fn load(&mut self) -> Result<Snapshot, metadata::MetadataError> {
            let g = self.0 .0.lock().unwrap();
            let raw =
                g.1.clone()
                    .map_err(|message| metadata::MetadataError::Rancher {
                        url: "fake".into(),
                        message,
                    })?;
            let cluster =
                Cluster::validate(&raw).map_err(|error| metadata::MetadataError::Invalid {
                    origin: "fake".into(),
                    error,
                })?;
            Ok(Snapshot {
                cluster,
                version: g.0.to_string(),
                self_id: None,
            })
        }
        fn wait_for_change(
            &mut self,
            version: &str,
            max_wait: Duration,
        ) -> Result<Option<String>, metadata::MetadataError> {
            let (m, cv) = &*self.0;
            let g = m.lock().unwrap();
            let (g, _) = cv
                .wait_timeout_while(g, max_wait, |g| g.0.to_string() == version)
                .unwrap();
            Ok((g.0.to_string() != version).then(|| g.0.to_string()))
        }
    }

    /// A driver that records every plan it is asked to reconcile and fails a peer as often
    /// as told.
    #[derive(Clone, Default)]
    struct FakeDriver {
        reconciled: Arc<Mutex<Vec<(Instant, Plan)>>>,
        fail: Arc<Mutex<BTreeMap<String, u32>>>,
    }

    impl Driver for FakeDriver {
        fn name(&self) -> &'static str {
            "fake"
        }
        fn reconcile(&mut self, plan: &Plan) -> DriverReport {
            self.reconciled
                .lock()
                .unwrap()
                .push((Instant::now(), plan.clone()));
            let mut r = DriverReport::default();
            for (peer, left) in self.fail.lock().unwrap().iter_mut() {
                if *left > 0 {
                    *left -= 1;
                    r.error(peer.as_str(), "told to fail");
                }
            }
            r
        }
        fn cleanup(&mut self) -> DriverReport {
            DriverReport::default()
        }
        fn counters(&mut self, _plan: &Plan) -> BTreeMap<String, PeerCounters> {
            BTreeMap::new()
        }
    }

    fn cluster() -> RawCluster {
        crate::test_cluster::on_77(&["a", "b", "c"])
    }

    /// A running loop for host "a" over `src` and `driver`.
    struct Running {
        tx: Sender<Event>,
        status: Arc<Mutex<Status>>,
        driver: FakeDriver,
        thread: Option<std::thread::JoinHandle<()>>,
    }

    impl Running {
        fn start(src: &FakeSource, driver: &FakeDriver, resync: Duration) -> Running {
            let cfg = DaemonConfig {
                source: "fake".into(),
                host: Some("a".into()),
                metadata_max_bytes: 1 << 20,
                resync,
                listen: None,
                cleanup_on_exit: false,
                plan: PlanOptions::default(),
                base_generation: 1,
                rekey: Rekey::default(),
                psk: None,
            };
            let status = Arc::new(Mutex::new(Status::default()));
            let (tx, rx) = mpsc::channel();
            let sources = Sources {
                source: Box::new(src.clone()),
                watch_source: Box::new(src.clone()),
            };
            let (d, st, t) = (driver.clone(), status.clone(), tx.clone());
            let thread = std::thread::spawn(move || {
                run_loop(cfg, Box::new(d), sources, st, (t, rx));
            });
            Running {
                tx,
                status,
                driver: driver.clone(),
                thread: Some(thread),
            }
        }

        fn reconciles(&self) -> usize {
            self.driver.reconciled.lock().unwrap().len()
        }

        fn last_plan(&self) -> Plan {
            self.driver
                .reconciled
                .lock()
                .unwrap()
                .last()
                .unwrap()
                .1
                .clone()
        }

        /// Wait (up to 10 s) until `f` holds for the status; panics with `what` otherwise.
        fn wait(&self, what: &str, f: impl Fn(&Status, usize) -> bool) {
            let end = Instant::now() + Duration::from_secs(10);
            while Instant::now() < end {
                if f(&self.status.lock().unwrap(), self.reconciles()) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            panic!(
                "timed out waiting for {what}: {:?}",
                self.status.lock().unwrap().reconciles
            );
        }
    }

    impl Drop for Running {
        fn drop(&mut self) {
            let _ = self.tx.send(Event::Stop("test over"));
            if let Some(t) = self.thread.take() {
                let _ = t.join();
            }
        }
    }

    fn version_done(s: &Status, v: &str) -> bool {
        s.metadata.version.as_deref() == Some(v) && s.reconciles.last_version.as_deref() == Some(v)
    }

    #[test]
    fn a_reload_reconciles_only_when_this_hosts_plan_changes() {
        let src = FakeSource::new(cluster());
        let r = Running::start(&src, &FakeDriver::default(), Duration::from_secs(3600));
        r.wait("the first reconcile", |s, n| n == 1 && version_done(s, "1"));

        // Another host's name is not part of this host's plan: nothing to write.
        src.edit(|c| c.hosts[1].name = Some("bee".into()));
        r.wait("version 2 taken", |s, _| version_done(s, "2"));
        assert_eq!(r.reconciles(), 1, "an unchanged plan is not reconciled");

        // A peer's subnets are: one reconcile, with them.
        src.edit(|c| c.hosts[1].subnets = vec!["10.42.20.0/24".into()]);
        r.wait("version 3 reconciled", |s, n| {
            n == 2 && version_done(s, "3")
        });
        let b = r
            .last_plan()
            .peers
            .into_iter()
            .find(|p| p.host.as_str() == "b");
        assert_eq!(b.unwrap().subnets, ["10.42.20.0/24".parse().unwrap()]);

        // A reload asked for (SIGHUP) reconciles even so.
        r.tx.send(Event::Reload("SIGHUP")).unwrap();
        r.wait("the forced reconcile", |_, n| n == 3);
    }

    #[test]
    fn bad_metadata_keeps_the_last_good_plan_until_fixed() {
        let src = FakeSource::new(cluster());
        let r = Running::start(&src, &FakeDriver::default(), Duration::from_secs(3600));
        r.wait("the first reconcile", |_, n| n == 1);
        let good = r.last_plan();

        src.set(Err("the service answered garbage".into()));
        r.wait("the error shown", |s, _| {
            s.metadata
                .last_error
                .as_deref()
                .is_some_and(|e| e.contains("garbage"))
        });
        let mut bad = cluster();
        bad.hosts[2].agent_ip = bad.hosts[1].agent_ip.clone();
        src.set(Ok(bad));
        r.wait("the validation error shown", |s, _| {
            s.metadata
                .last_error
                .as_deref()
                .is_some_and(|e| e.contains("hosts[2]") && e.contains("agent_ip"))
        });
        assert_eq!(r.reconciles(), 1, "nothing applied from bad metadata");
        assert_eq!(
            r.status.lock().unwrap().metadata.version.as_deref(),
            Some("1")
        );

        let mut fixed = cluster();
        fixed.hosts[2].subnets = vec!["10.42.30.0/24".into()];
        src.set(Ok(fixed));
        r.wait("the fix applied", |s, n| {
            n == 2 && s.metadata.last_error.is_none()
        });
        assert_ne!(r.last_plan(), good);
    }

    #[test]
    fn a_failing_peer_is_retried_with_backoff_long_before_the_resync() {
        let src = FakeSource::new(cluster());
        let driver = FakeDriver::default();
        driver.fail.lock().unwrap().insert("b".into(), 2);
        let r = Running::start(&src, &driver, Duration::from_secs(3600));
        r.wait("the third reconcile", |_, n| n == 3);
        let at: Vec<Instant> = driver
            .reconciled
            .lock()
            .unwrap()
            .iter()
            .map(|(t, _)| *t)
            .collect();
        // backoff(1) = 1 s after the first failure, backoff(2) = 2 s after the second.
        assert!(
            at[1] - at[0] >= Duration::from_millis(950),
            "{:?}",
            at[1] - at[0]
        );
        assert!(
            at[2] - at[1] >= Duration::from_millis(1950),
            "{:?}",
            at[2] - at[1]
        );
        // Healthy again: the next reconcile waits for the resync.
        std::thread::sleep(Duration::from_millis(1500));
        assert_eq!(r.reconciles(), 3);
        assert_eq!(r.status.lock().unwrap().reconciles.errors, 2);
    }

    #[test]
    fn the_resync_reconciles_on_its_timer() {
        let src = FakeSource::new(cluster());
        let r = Running::start(&src, &FakeDriver::default(), Duration::from_millis(100));
        r.wait("five reconciles", |_, n| n >= 5);
        let at: Vec<Instant> = r
            .driver
            .reconciled
            .lock()
            .unwrap()
            .iter()
            .map(|(t, _)| *t)
            .collect();
        for w in at.windows(2) {
            assert!(
                w[1] - w[0] >= Duration::from_millis(95),
                "{:?}",
                w[1] - w[0]
            );
        }
    }

    #[test]
    fn backoff_grows_and_caps() {
        assert_eq!(backoff(1), Duration::from_secs(1));
        assert_eq!(backoff(2), Duration::from_secs(2));
        assert_eq!(backoff(5), Duration::from_secs(16));
        assert_eq!(backoff(7), BACKOFF_MAX);
        assert_eq!(backoff(1000), BACKOFF_MAX);
    }

    #[test]
    fn signals_reach_the_loop_whatever_threads_started_first() {
        // A thread that exists before the handlers are set up and blocks nothing: with
        // sigmask + sigwait the kernel could hand it (or the test harness's threads) the
        // signal, whose default action ends the process.
        let (stop_tx, stop_rx) = mpsc::channel::<()>();
        let early = std::thread::spawn(move || {
            let _ = stop_rx.recv();
        });
        let (tx, rx) = mpsc::channel();
        let handle = spawn_signal_thread_for(&[libc::SIGHUP], tx).unwrap();
        for _ in 0..3 {
            // SAFETY: kill with our own pid and a signal we handle.
            assert_eq!(unsafe { libc::kill(libc::getpid(), libc::SIGHUP) }, 0);
            match rx.recv_timeout(Duration::from_secs(5)) {
                Ok(Event::Reload(why)) => assert_eq!(why, "SIGHUP"),
                other => panic!("expected a reload, got {other:?}"),
            }
        }
        handle.close();
        let _ = stop_tx.send(());
        early.join().unwrap();
    }
}

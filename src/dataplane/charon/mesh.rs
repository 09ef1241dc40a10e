//! The charon driver behind the synchronous [`Driver`] interface ([`CharonMesh`]), and the
//! sidecar's event watcher: a thread of its own that re-initiates lost children
//! ([`revive`](super::revive)) and asks for a reconcile when charon comes back.

use std::collections::BTreeMap;
use std::time::Duration;

use super::client::{Client, ConnectOptions, ViciError};
use super::desired::CharonConfig;
use super::driver::{cleanup, counters, reconcile};
use super::report::CharonReport;
use crate::dataplane::driver::{Driver, DriverReport, PeerCounters, Wake};
use crate::plan::{Plan, Psk};

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
            .spawn(move || watch_events(&cfg, &connect, rx, wake))?;
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

/// The watcher thread ([`CharonMesh::start_watcher`]): connects, runs the reviver until the
/// connection drops, reconnects and then asks for a reconcile; returns once the driver (the
/// sender of `plans`) is gone.
fn watch_events(
    cfg: &CharonConfig,
    connect: &ConnectOptions,
    plans: tokio::sync::watch::Receiver<Plan>,
    wake: Wake,
) {
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
        if plans.has_changed().is_err() {
            return; // the driver is gone
        }
        match rt.block_on(Client::connect(&cfg.vici_socket, connect)) {
            Ok(client) => {
                if !first {
                    tracing::info!("charon is back: asking for a reconcile");
                    wake();
                }
                first = false;
                let e = rt.block_on(super::revive::run(&client, plans.clone(), cfg, |r| {
                    tracing::info!(peer = %r.peer, conn = %r.conn, result = ?r.result, "revive")
                }));
                tracing::warn!(error = %e, "charon event watcher disconnected");
            }
            Err(e) => {
                tracing::warn!(error = %e, "charon event watcher cannot connect");
                std::thread::sleep(Duration::from_millis(500));
            }
        }
    }
}

fn failed_run(e: ViciError) -> DriverReport {
    let mut r = DriverReport::default();
    r.error(crate::dataplane::report::MESH, e.to_string());
    r
}

impl Driver for CharonMesh {
    fn name(&self) -> &'static str {
        "charon"
    }

    /// charon's SAs are kernel XFRM states.
    fn has_sas(&self) -> bool {
        true
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

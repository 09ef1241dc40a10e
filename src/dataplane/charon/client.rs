//! VICI client on a tokio `UnixStream`, built on the pure codec in [`super::wire`].
//!
//! - [`Client::connect`] retries with exponential backoff while the socket is missing or
//!   refuses (charon starting or restarting), then checks the daemon with `version`.
//! - Every `CMD_RESPONSE` is checked: `success = no` becomes [`ViciError::CommandFailed`]
//!   with charon's `errmsg`; `CMD_UNKNOWN` / `EVENT_UNKNOWN` become their own errors.
//! - One request is outstanding at a time (VICI answers carry no id). A background task
//!   writes requests in order; another reads, hands each answer to its request, sends
//!   `list-*` events to the list in flight and other events to their subscribers. A caller
//!   that gives up (drops its future) does not desynchronise the stream.
//! - No answer within the timeout, EOF or an I/O error closes the client for good
//!   ([`ViciError::is_connection_lost`]): connect again. Subscribers then see the end of
//!   their [`EventStream`].
//!
//! Why not `rsvici` 0.1.5 (checked against a real charon): it returns `success = no`
//! responses as `Ok`; after charon dies its listener task keeps re-polling the closed
//! socket (measured: ~1 s of CPU per 2 s) for as long as the `Client` lives, its only
//! signal being an error stream flooded with the same EOF; and its reader is a
//! `read_u32` + `read_exact` future inside `select!`, dropped with any bytes already read
//! whenever a request is sent, which can desynchronise the stream. The codec here is also
//! what decodes the fixtures.

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use thiserror::Error;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::OwnedWriteHalf;
use tokio::net::UnixStream;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use zeroize::Zeroizing;

use super::types::{Command, Event, ParseError, StreamCommand, Version, VersionInfo};
use super::wire::{encode_packet, FrameBuffer, Message, Packet, WireError};

/// Everything that can go wrong talking to charon.
#[derive(Debug, Error)]
pub enum ViciError {
    #[error("charon VICI socket {path}: not reachable after {attempts} attempt(s) in {waited:.1?}: {source} (is charon running with this socket path?)")]
    Connect {
        path: PathBuf,
        attempts: u32,
        waited: Duration,
        #[source]
        source: io::Error,
    },
    #[error("charon VICI connection {label}: write failed: {source}")]
    Io {
        label: String,
        #[source]
        source: io::Error,
    },
    #[error("charon VICI connection {label} is closed: {reason}")]
    Disconnected { label: String, reason: String },
    #[error("charon did not answer `{command}` within {after:.1?}; connection closed (answers carry no id, a late one could not be matched)")]
    Timeout { command: String, after: Duration },
    #[error("charon refused `{command}`{}: {errmsg}", fmt_context(.context))]
    CommandFailed {
        command: String,
        context: String,
        errmsg: String,
    },
    #[error("charon does not know the command `{command}` (CMD_UNKNOWN): plugin missing or charon too old?")]
    UnknownCommand { command: String },
    #[error("charon does not know the event `{event}` (EVENT_UNKNOWN)")]
    UnknownEvent { event: String },
    #[error("VICI protocol violation on {label}: {detail}")]
    Protocol { label: String, detail: String },
    #[error("cannot encode `{command}`: {source}")]
    Encode {
        command: String,
        #[source]
        source: WireError,
    },
    #[error("unexpected answer to `{command}`: {source}")]
    Parse {
        command: String,
        #[source]
        source: ParseError,
    },
}

fn fmt_context(c: &str) -> String {
    if c.is_empty() {
        String::new()
    } else {
        format!(" ({c})")
    }
}

impl ViciError {
    /// The connection is unusable: reconnect (charon died, restarted, or stopped answering).
    pub fn is_connection_lost(&self) -> bool {
        matches!(
            self,
            ViciError::Connect { .. }
                | ViciError::Io { .. }
                | ViciError::Disconnected { .. }
                | ViciError::Timeout { .. }
                | ViciError::Protocol { .. }
        )
    }

    /// charon's own error message for a refused command.
    pub fn errmsg(&self) -> Option<&str> {
        match self {
            ViciError::CommandFailed { errmsg, .. } => Some(errmsg),
            _ => None,
        }
    }
}

/// How [`Client::connect`] waits for charon and how long answers may take.
#[derive(Debug, Clone)]
pub struct ConnectOptions {
    /// First pause after a failed attempt; doubles up to `max_backoff`.
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
    /// Give up after this long; `None` = keep trying.
    pub max_wait: Option<Duration>,
    /// Longest wait for one answer (commands with their own `timeout` get that plus 5 s).
    pub request_timeout: Duration,
}

impl Default for ConnectOptions {
    fn default() -> Self {
        Self {
            initial_backoff: Duration::from_millis(20),
            max_backoff: Duration::from_secs(1),
            max_wait: Some(Duration::from_secs(30)),
            request_timeout: Duration::from_secs(30),
        }
    }
}

/// Events of the subscribed names, in arrival order. `None` from [`EventStream::next`]
/// means the connection is gone (reconnect and subscribe again).
pub struct EventStream {
    rx: mpsc::UnboundedReceiver<Event>,
}

impl EventStream {
    pub async fn next(&mut self) -> Option<Event> {
        self.rx.recv().await
    }

    /// An event already received, without waiting.
    pub fn try_next(&mut self) -> Option<Event> {
        self.rx.try_recv().ok()
    }
}

/// The events of one `list-*` command as they arrive, then its outcome.
pub struct ListStream {
    events: mpsc::UnboundedReceiver<Message>,
    done: Option<oneshot::Receiver<Result<(), ViciError>>>,
    label: String,
}

impl ListStream {
    /// The next event's message; `None` when the command completed successfully.
    pub async fn next(&mut self) -> Option<Result<Message, ViciError>> {
        if let Some(m) = self.events.recv().await {
            return Some(Ok(m));
        }
        let done = self.done.take()?;
        match done.await {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(Err(e)),
            Err(_) => Some(Err(ViciError::Disconnected {
                label: self.label.clone(),
                reason: "client closed".into(),
            })),
        }
    }
}

// ---------------------------------------------------------------------------------------
// internals

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Expect {
    Command,
    Registration,
}

enum OnConfirm {
    Subscribe(String, mpsc::UnboundedSender<Event>),
    Unsubscribe(String),
}

struct Pending {
    expect: Expect,
    reply: oneshot::Sender<Result<Packet, ViciError>>,
    collect: Option<(String, mpsc::UnboundedSender<Message>)>,
    on_confirm: Option<OnConfirm>,
}

#[derive(Default)]
struct Dispatch {
    pending: Option<Pending>,
    subscriptions: HashMap<String, mpsc::UnboundedSender<Event>>,
    closed: Option<String>,
}

struct Shared {
    label: String,
    state: Mutex<Dispatch>,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, Dispatch> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn disconnected(&self, reason: &str) -> ViciError {
        ViciError::Disconnected {
            label: self.label.clone(),
            reason: reason.to_string(),
        }
    }

    /// Marks the connection dead: fails the request in flight, ends all event streams.
    fn close(&self, reason: String) {
        let mut st = self.lock();
        if st.closed.is_some() {
            return;
        }
        tracing::debug!(socket = %self.label, %reason, "VICI connection closed");
        if let Some(p) = st.pending.take() {
            let _ = p.reply.send(Err(self.disconnected(&reason)));
        }
        st.subscriptions.clear();
        st.closed = Some(reason);
    }

    fn dispatch(&self, packet: Packet) -> Result<(), String> {
        let mut st = self.lock();
        match packet {
            Packet::Event { name, message } => {
                if let Some(p) = st.pending.as_ref() {
                    if let Some((ev, tx)) = p.collect.as_ref().filter(|(ev, _)| *ev == name) {
                        if tx.send(message).is_err() {
                            tracing::trace!(event = %ev, "list consumer gone, event dropped");
                        }
                        return Ok(());
                    }
                }
                match st.subscriptions.get(&name) {
                    Some(tx) => {
                        if tx
                            .send(Event {
                                name: name.clone(),
                                message,
                            })
                            .is_err()
                        {
                            tracing::debug!(event = %name, "subscriber gone, dropping its subscription");
                            st.subscriptions.remove(&name);
                        }
                    }
                    None => tracing::trace!(event = %name, "unsolicited VICI event dropped"),
                }
                Ok(())
            }
            Packet::CmdResponse(_) | Packet::CmdUnknown => {
                self.answer(&mut st, Expect::Command, packet)
            }
            Packet::EventConfirm | Packet::EventUnknown => {
                self.answer(&mut st, Expect::Registration, packet)
            }
            other => Err(format!("charon sent a {} packet", other.packet_type())),
        }
    }

    fn answer(&self, st: &mut Dispatch, kind: Expect, packet: Packet) -> Result<(), String> {
        let p = match st.pending.take() {
            Some(p) if p.expect == kind => p,
            Some(p) => {
                let _ = p
                    .reply
                    .send(Err(self.disconnected("answer of the wrong kind")));
                return Err(format!(
                    "{} while waiting for a {:?} answer",
                    packet.packet_type(),
                    p.expect
                ));
            }
            None => return Err(format!("{} without a request", packet.packet_type())),
        };
        if matches!(packet, Packet::EventConfirm) {
            match p.on_confirm {
                Some(OnConfirm::Subscribe(name, tx)) => {
                    st.subscriptions.insert(name, tx);
                }
                Some(OnConfirm::Unsubscribe(name)) => {
                    st.subscriptions.remove(&name);
                }
                None => {}
            }
        }
        let _ = p.reply.send(Ok(packet));
        Ok(())
    }
}

/// One request/answer exchange.
struct Exchange {
    packet: Packet,
    expect: Expect,
    collect: Option<(String, mpsc::UnboundedSender<Message>)>,
    on_confirm: Option<OnConfirm>,
}

enum Op {
    One {
        ex: Exchange,
        timeout: Duration,
        reply: oneshot::Sender<Result<Packet, ViciError>>,
    },
    /// register `event`, run the command collecting `event`s, unregister: as one unit
    Stream {
        event: String,
        cmd: Packet,
        events: mpsc::UnboundedSender<Message>,
        timeout: Duration,
        reply: oneshot::Sender<Result<(), ViciError>>,
    },
}

struct Writer {
    shared: Arc<Shared>,
    wr: OwnedWriteHalf,
    dead: bool,
}

impl Writer {
    async fn exchange(&mut self, ex: Exchange, timeout: Duration) -> Result<Packet, ViciError> {
        let what = ex.packet.name().unwrap_or("?").to_string();
        let frame =
            Zeroizing::new(
                encode_packet(&ex.packet).map_err(|source| ViciError::Encode {
                    command: what.clone(),
                    source,
                })?,
            );
        let (tx, rx) = oneshot::channel();
        {
            let mut st = self.shared.lock();
            if let Some(reason) = &st.closed {
                return Err(self.shared.disconnected(reason));
            }
            if st.pending.is_some() {
                return Err(ViciError::Protocol {
                    label: self.shared.label.clone(),
                    detail: "request while another is in flight".into(),
                });
            }
            st.pending = Some(Pending {
                expect: ex.expect,
                reply: tx,
                collect: ex.collect,
                on_confirm: ex.on_confirm,
            });
        }
        if let Err(source) = self.wr.write_all(&frame).await {
            self.shared.close(format!("write failed: {source}"));
            self.dead = true;
            return Err(ViciError::Io {
                label: self.shared.label.clone(),
                source,
            });
        }
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err(self.shared.disconnected("reader stopped")),
            Err(_) => {
                self.shared
                    .close(format!("no answer to `{what}` within {timeout:?}"));
                self.dead = true;
                let _ = self.wr.shutdown().await;
                Err(ViciError::Timeout {
                    command: what,
                    after: timeout,
                })
            }
        }
    }

    async fn run(mut self, mut ops: mpsc::Receiver<Op>) {
        while let Some(op) = ops.recv().await {
            match op {
                Op::One { ex, timeout, reply } => {
                    let r = self.exchange(ex, timeout).await;
                    let _ = reply.send(r);
                }
                Op::Stream {
                    event,
                    cmd,
                    events,
                    timeout,
                    reply,
                } => {
                    let r = self.stream(event, cmd, events, timeout).await;
                    let _ = reply.send(r);
                }
            }
            if self.dead {
                // fail whatever is queued, then stop
                ops.close();
                while let Some(op) = ops.recv().await {
                    let e = || self.shared.disconnected("connection closed");
                    match op {
                        Op::One { reply, .. } => drop(reply.send(Err(e()))),
                        Op::Stream { reply, .. } => drop(reply.send(Err(e()))),
                    }
                }
                return;
            }
        }
    }

    async fn stream(
        &mut self,
        event: String,
        cmd: Packet,
        events: mpsc::UnboundedSender<Message>,
        timeout: Duration,
    ) -> Result<(), ViciError> {
        let command = cmd.name().unwrap_or("?").to_string();
        let reg = Exchange {
            packet: Packet::EventRegister(event.clone()),
            expect: Expect::Registration,
            collect: None,
            on_confirm: None,
        };
        if let Packet::EventUnknown = self.exchange(reg, timeout).await? {
            return Err(ViciError::UnknownEvent { event });
        }
        let ex = Exchange {
            packet: cmd,
            expect: Expect::Command,
            collect: Some((event.clone(), events)),
            on_confirm: None,
        };
        let answer = self.exchange(ex, timeout).await;
        let unreg = Exchange {
            packet: Packet::EventUnregister(event.clone()),
            expect: Expect::Registration,
            collect: None,
            on_confirm: None,
        };
        let unreg = self.exchange(unreg, timeout).await;
        check(&command, "", answer?)?;
        unreg?;
        Ok(())
    }
}

/// Turns an answer into the response message, checking `success`.
fn check(command: &str, context: &str, answer: Packet) -> Result<Message, ViciError> {
    match answer {
        Packet::CmdUnknown => Err(ViciError::UnknownCommand {
            command: command.to_string(),
        }),
        Packet::CmdResponse(m) => match m.str("success") {
            Some("no") => Err(ViciError::CommandFailed {
                command: command.to_string(),
                context: context.to_string(),
                errmsg: m
                    .str("errmsg")
                    .unwrap_or("(charon gave no errmsg)")
                    .to_string(),
            }),
            _ => Ok(m),
        },
        other => Err(ViciError::Protocol {
            label: String::new(),
            detail: format!("{} as the answer to `{command}`", other.packet_type()),
        }),
    }
}

/// A connection to charon's VICI socket. Methods take `&self`; requests from several
/// tasks are queued and run one at a time. Dropping the client closes the connection.
pub struct Client {
    shared: Arc<Shared>,
    ops: mpsc::Sender<Op>,
    request_timeout: Duration,
    daemon: Option<VersionInfo>,
    tasks: [JoinHandle<()>; 2],
}

impl Drop for Client {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

fn retryable(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::NotFound
            | io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::WouldBlock
            | io::ErrorKind::Interrupted
    )
}

impl Client {
    /// Connects to charon at `path`, retrying with exponential backoff while the socket
    /// does not exist or refuses connections, and asks charon's `version` to be sure it
    /// answers.
    pub async fn connect(
        path: impl AsRef<Path>,
        opts: &ConnectOptions,
    ) -> Result<Client, ViciError> {
        let path = path.as_ref();
        let start = Instant::now();
        let mut backoff = opts.initial_backoff;
        let mut attempts = 0u32;
        loop {
            attempts += 1;
            let err = match UnixStream::connect(path).await {
                Ok(stream) => {
                    let mut client = Client::from_stream(
                        stream,
                        path.display().to_string(),
                        opts.request_timeout,
                    );
                    match client.call(&Version).await {
                        Ok(v) => {
                            tracing::info!(
                                socket = %path.display(), attempts, waited = ?start.elapsed(),
                                daemon = %v.daemon, version = %v.version, "connected to charon"
                            );
                            client.daemon = Some(v);
                            return Ok(client);
                        }
                        // charon accepted but went away (shutting down / restarting): retry
                        Err(e) if e.is_connection_lost() => {
                            io::Error::new(io::ErrorKind::ConnectionReset, e.to_string())
                        }
                        Err(e) => return Err(e),
                    }
                }
                Err(e) => e,
            };
            let waited = start.elapsed();
            let give_up =
                !retryable(&err) || opts.max_wait.is_some_and(|max| waited + backoff > max);
            if give_up {
                return Err(ViciError::Connect {
                    path: path.to_path_buf(),
                    attempts,
                    waited,
                    source: err,
                });
            }
            if attempts == 1 {
                tracing::info!(socket = %path.display(), error = %err, "waiting for charon's VICI socket");
            } else {
                tracing::debug!(socket = %path.display(), attempts, error = %err, ?backoff, "charon not reachable yet");
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(opts.max_backoff);
        }
    }

    /// A client on an already connected stream (tests, socketpairs). `label` names the
    /// connection in errors and logs. Must be called inside a tokio runtime.
    pub fn from_stream(
        stream: UnixStream,
        label: impl Into<String>,
        request_timeout: Duration,
    ) -> Client {
        let shared = Arc::new(Shared {
            label: label.into(),
            state: Mutex::new(Dispatch::default()),
        });
        let (mut rd, wr) = stream.into_split();
        let reader_shared = shared.clone();
        let reader = tokio::spawn(async move {
            let s = reader_shared;
            let mut frames = FrameBuffer::new();
            let mut buf = vec![0u8; 64 * 1024];
            let reason = 'read: loop {
                match rd.read(&mut buf).await {
                    Ok(0) => break 'read "charon closed the connection (EOF)".to_string(),
                    Ok(n) => frames.extend(&buf[..n]),
                    Err(e) => break 'read format!("read failed: {e}"),
                }
                loop {
                    match frames.next_packet() {
                        Ok(Some(p)) => {
                            if let Err(detail) = s.dispatch(p) {
                                tracing::warn!(socket = %s.label, %detail, "VICI protocol violation");
                                break 'read detail;
                            }
                        }
                        Ok(None) => break,
                        Err(e) => break 'read format!("undecodable data from charon: {e}"),
                    }
                }
            };
            s.close(reason);
        });
        let (ops_tx, ops_rx) = mpsc::channel(64);
        let writer = tokio::spawn(
            Writer {
                shared: shared.clone(),
                wr,
                dead: false,
            }
            .run(ops_rx),
        );
        Client {
            shared,
            ops: ops_tx,
            request_timeout,
            daemon: None,
            tasks: [reader, writer],
        }
    }

    /// What `version` answered at connect time.
    pub fn daemon(&self) -> Option<&VersionInfo> {
        self.daemon.as_ref()
    }

    /// Why the connection is closed, if it is.
    pub fn closed(&self) -> Option<String> {
        self.shared.lock().closed.clone()
    }

    async fn op<T>(
        &self,
        op: Op,
        rx: oneshot::Receiver<Result<T, ViciError>>,
    ) -> Result<T, ViciError> {
        if self.ops.send(op).await.is_err() {
            return Err(self
                .shared
                .disconnected(&self.closed().unwrap_or_else(|| "client stopped".into())));
        }
        rx.await
            .unwrap_or_else(|_| Err(self.shared.disconnected("client stopped")))
    }

    async fn exchange(&self, ex: Exchange, timeout: Duration) -> Result<Packet, ViciError> {
        let (tx, rx) = oneshot::channel();
        self.op(
            Op::One {
                ex,
                timeout,
                reply: tx,
            },
            rx,
        )
        .await
    }

    /// Sends a command and returns the raw answer packet (`CMD_RESPONSE` or
    /// `CMD_UNKNOWN`) WITHOUT checking `success`.
    pub async fn request_unchecked(
        &self,
        command: &str,
        message: Message,
    ) -> Result<Packet, ViciError> {
        let ex = Exchange {
            packet: Packet::CmdRequest {
                command: command.to_string(),
                message,
            },
            expect: Expect::Command,
            collect: None,
            on_confirm: None,
        };
        self.exchange(ex, self.request_timeout).await
    }

    /// Sends a command; `success = no` and `CMD_UNKNOWN` are errors.
    pub async fn request(&self, command: &str, message: Message) -> Result<Message, ViciError> {
        let answer = self.request_unchecked(command, message).await?;
        check(command, "", answer)
    }

    /// Runs a typed command.
    pub async fn call<C: Command>(&self, cmd: &C) -> Result<C::Output, ViciError> {
        let t = match cmd.answer_within() {
            Some(t) => self.request_timeout.max(t + Duration::from_secs(5)),
            None => self.request_timeout,
        };
        self.call_timeout(cmd, t).await
    }

    /// Runs a typed command, waiting at most `timeout` for the answer.
    pub async fn call_timeout<C: Command>(
        &self,
        cmd: &C,
        timeout: Duration,
    ) -> Result<C::Output, ViciError> {
        let context = cmd.context();
        tracing::debug!(command = C::NAME, %context, "VICI request");
        let ex = Exchange {
            packet: Packet::CmdRequest {
                command: C::NAME.to_string(),
                message: cmd.to_message(),
            },
            expect: Expect::Command,
            collect: None,
            on_confirm: None,
        };
        let answer = self.exchange(ex, timeout).await?;
        let m = check(C::NAME, &context, answer).inspect_err(|e| {
            tracing::debug!(command = C::NAME, %context, error = %e, "VICI request failed");
        })?;
        C::parse(&m).map_err(|source| ViciError::Parse {
            command: C::NAME.to_string(),
            source,
        })
    }

    /// Runs a streaming command and yields its events as they arrive.
    pub async fn stream_raw(
        &self,
        command: &str,
        event: &str,
        message: Message,
    ) -> Result<ListStream, ViciError> {
        let (ev_tx, ev_rx) = mpsc::unbounded_channel();
        let (tx, rx) = oneshot::channel();
        let op = Op::Stream {
            event: event.to_string(),
            cmd: Packet::CmdRequest {
                command: command.to_string(),
                message,
            },
            events: ev_tx,
            timeout: self.request_timeout,
            reply: tx,
        };
        if self.ops.send(op).await.is_err() {
            return Err(self.shared.disconnected("client stopped"));
        }
        Ok(ListStream {
            events: ev_rx,
            done: Some(rx),
            label: self.shared.label.clone(),
        })
    }

    /// Runs a typed streaming command (`list-conns`, `list-sas`) and collects its items.
    pub async fn list<C: StreamCommand>(&self, cmd: &C) -> Result<Vec<C::Item>, ViciError> {
        let mut s = self.stream_raw(C::NAME, C::EVENT, cmd.to_message()).await?;
        let mut items = Vec::new();
        while let Some(m) = s.next().await {
            let m = m.map_err(|e| match e {
                ViciError::CommandFailed {
                    command, errmsg, ..
                } => ViciError::CommandFailed {
                    command,
                    context: cmd.context(),
                    errmsg,
                },
                e => e,
            })?;
            items.extend(C::parse_event(&m).map_err(|source| ViciError::Parse {
                command: C::NAME.to_string(),
                source,
            })?);
        }
        Ok(items)
    }

    /// Registers for `events` (e.g. [`super::types::SaEvent::NAMES`]); all of them arrive
    /// on the returned stream. On error nothing stays registered.
    pub async fn subscribe(&self, events: &[&str]) -> Result<EventStream, ViciError> {
        let (tx, rx) = mpsc::unbounded_channel();
        for (i, ev) in events.iter().enumerate() {
            let ex = Exchange {
                packet: Packet::EventRegister(ev.to_string()),
                expect: Expect::Registration,
                collect: None,
                on_confirm: Some(OnConfirm::Subscribe(ev.to_string(), tx.clone())),
            };
            let failed = match self.exchange(ex, self.request_timeout).await {
                Ok(Packet::EventConfirm) => None,
                Ok(_) => Some(ViciError::UnknownEvent {
                    event: ev.to_string(),
                }),
                Err(e) => Some(e),
            };
            if let Some(e) = failed {
                if !e.is_connection_lost() {
                    let _ = self.unsubscribe(&events[..i]).await;
                }
                return Err(e);
            }
        }
        Ok(EventStream { rx })
    }

    /// Unregisters `events`; their stream ends when no registered event feeds it.
    pub async fn unsubscribe(&self, events: &[&str]) -> Result<(), ViciError> {
        for ev in events {
            let ex = Exchange {
                packet: Packet::EventUnregister(ev.to_string()),
                expect: Expect::Registration,
                collect: None,
                on_confirm: Some(OnConfirm::Unsubscribe(ev.to_string())),
            };
            if let Packet::EventUnknown = self.exchange(ex, self.request_timeout).await? {
                return Err(ViciError::UnknownEvent {
                    event: ev.to_string(),
                });
            }
        }
        Ok(())
    }
}

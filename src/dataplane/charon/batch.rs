//! Pipelined VICI requests on dedicated connections, for the driver's bulk writes.
//!
//! charon queues the requests of one connection and answers them in order, one at a time
//! (`vici_socket.c`: one processor per connection). Writing many requests without waiting
//! for each answer removes a round trip per request; answers are matched by position. Several
//! connections run in parallel (charon serves each from its own thread), which matters for
//! `initiate`, where charon holds the request until the SA is up or failed.
//!
//! With `control_log`, the connection registers for `control-log` first: the log lines charon
//! sends while it works on request *k* arrive after answer *k-1* and before answer *k*, so each
//! [`Outcome`] carries the lines of its own request (used to put failures into words).
//!
//! Never used for secrets: `load-shared` goes through the [`super::Client`].

use std::path::Path;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::OwnedReadHalf;
use tokio::net::UnixStream;
use tokio::sync::Semaphore;

use super::client::ViciError;
use super::failure::control_log_line;
use super::wire::{encode_packet, FrameBuffer, Message, Packet};

/// One request of a batch.
#[derive(Debug, Clone)]
pub struct Request {
    pub command: String,
    /// What it is about (names only), for errors.
    pub context: String,
    pub message: Message,
}

impl Request {
    pub fn new(command: &str, context: impl Into<String>, message: Message) -> Self {
        Self {
            command: command.to_string(),
            context: context.into(),
            message,
        }
    }
}

/// The answer to one request.
#[derive(Debug)]
pub struct Outcome {
    /// The response (`success` checked) or why there is none.
    pub result: Result<Message, ViciError>,
    /// `control-log` lines sent while charon worked on this request.
    pub log: Vec<String>,
}

/// How a batch runs.
#[derive(Debug, Clone)]
pub struct BatchOptions {
    /// Requests in flight per connection.
    pub window: usize,
    /// Longest wait for the next answer on a connection.
    pub answer_timeout: Duration,
    /// Collect `control-log` lines per request.
    pub control_log: bool,
    /// Connections used in parallel (at most one per request).
    pub parallelism: usize,
}

impl Default for BatchOptions {
    fn default() -> Self {
        Self {
            window: 256,
            answer_timeout: Duration::from_secs(30),
            control_log: false,
            parallelism: 1,
        }
    }
}

struct Conn {
    label: String,
    rd: OwnedReadHalf,
    frames: FrameBuffer,
    buf: Vec<u8>,
    timeout: Duration,
}

impl Conn {
    fn lost(&self, reason: impl Into<String>) -> ViciError {
        ViciError::Disconnected {
            label: self.label.clone(),
            reason: reason.into(),
        }
    }

    async fn next_packet(&mut self, waiting_for: &str) -> Result<Packet, ViciError> {
        loop {
            match self.frames.next_packet() {
                Ok(Some(p)) => return Ok(p),
                Ok(None) => {}
                Err(e) => return Err(self.lost(format!("undecodable data from charon: {e}"))),
            }
            let n = match tokio::time::timeout(self.timeout, self.rd.read(&mut self.buf)).await {
                Err(_) => {
                    return Err(ViciError::Timeout {
                        command: waiting_for.to_string(),
                        after: self.timeout,
                    })
                }
                Ok(Err(e)) => return Err(self.lost(format!("read failed: {e}"))),
                Ok(Ok(0)) => return Err(self.lost("charon closed the connection (EOF)")),
                Ok(Ok(n)) => n,
            };
            self.frames.extend(&self.buf[..n]);
        }
    }
}

fn check(
    req: &Request,
    answer: Packet,
    label: &str,
) -> Result<Result<Message, ViciError>, ViciError> {
    match answer {
        Packet::CmdResponse(m) => Ok(match m.str("success") {
            Some("no") => Err(ViciError::CommandFailed {
                command: req.command.clone(),
                context: req.context.clone(),
                errmsg: m
                    .str("errmsg")
                    .unwrap_or("(charon gave no errmsg)")
                    .to_string(),
            }),
            _ => Ok(m),
        }),
        Packet::CmdUnknown => Ok(Err(ViciError::UnknownCommand {
            command: req.command.clone(),
        })),
        other => Err(ViciError::Protocol {
            label: label.to_string(),
            detail: format!("{} as the answer to `{}`", other.packet_type(), req.command),
        }),
    }
}

/// Runs `requests` in order on one new connection to `path`, pipelined. `Err` only when the
/// connection could not be set up or broke (then no outcome is known for the rest).
pub async fn run_one(
    path: &Path,
    requests: &[Request],
    opts: &BatchOptions,
) -> Result<Vec<Outcome>, ViciError> {
    let label = path.display().to_string();
    let stream = UnixStream::connect(path)
        .await
        .map_err(|source| ViciError::Connect {
            path: path.to_path_buf(),
            attempts: 1,
            waited: Duration::ZERO,
            source,
        })?;
    let (rd, mut wr) = stream.into_split();
    let mut conn = Conn {
        label: label.clone(),
        rd,
        frames: FrameBuffer::new(),
        buf: vec![0u8; 64 * 1024],
        timeout: opts.answer_timeout,
    };
    let write_err = |e: std::io::Error| ViciError::Io {
        label: label.clone(),
        source: e,
    };
    if opts.control_log {
        let reg =
            encode_packet(&Packet::EventRegister("control-log".into())).map_err(|source| {
                ViciError::Encode {
                    command: "control-log".into(),
                    source,
                }
            })?;
        wr.write_all(&reg).await.map_err(write_err)?;
        match conn.next_packet("event-register control-log").await? {
            Packet::EventConfirm => {}
            Packet::EventUnknown => {
                return Err(ViciError::UnknownEvent {
                    event: "control-log".into(),
                })
            }
            other => {
                return Err(ViciError::Protocol {
                    label: label.clone(),
                    detail: format!("{} as the answer to EVENT_REGISTER", other.packet_type()),
                })
            }
        }
    }
    let mut frames = Vec::with_capacity(requests.len());
    for r in requests {
        let p = Packet::CmdRequest {
            command: r.command.clone(),
            message: r.message.clone(),
        };
        frames.push(encode_packet(&p).map_err(|source| ViciError::Encode {
            command: r.command.clone(),
            source,
        })?);
    }
    let window = Semaphore::new(opts.window.max(1));
    let writer = async {
        for f in &frames {
            window
                .acquire()
                .await
                .expect("the semaphore is never closed")
                .forget();
            wr.write_all(f).await.map_err(write_err)?;
        }
        Ok::<(), ViciError>(())
    };
    let reader = async {
        let mut outcomes = Vec::with_capacity(requests.len());
        let mut log = Vec::new();
        while outcomes.len() < requests.len() {
            let req = &requests[outcomes.len()];
            match conn.next_packet(&req.command).await? {
                Packet::Event { name, message } => {
                    if name == "control-log" {
                        if let Some(l) = control_log_line(&message) {
                            log.push(l);
                        }
                    }
                }
                answer => {
                    let result = check(req, answer, &conn.label)?;
                    outcomes.push(Outcome {
                        result,
                        log: std::mem::take(&mut log),
                    });
                    window.add_permits(1);
                }
            }
        }
        Ok::<Vec<Outcome>, ViciError>(outcomes)
    };
    let ((), outcomes) = tokio::try_join!(writer, reader)?;
    let _ = wr.shutdown().await;
    Ok(outcomes)
}

/// Runs `requests` over up to `opts.parallelism` connections (request *i* on connection
/// *i mod n*, in order within a connection) and returns one outcome per request, in
/// request order. A connection that breaks fails its remaining requests with
/// [`ViciError::Disconnected`]; `Err` only if no connection could be opened at all.
pub async fn run(
    path: &Path,
    requests: &[Request],
    opts: &BatchOptions,
) -> Result<Vec<Outcome>, ViciError> {
    if requests.is_empty() {
        return Ok(Vec::new());
    }
    let n = opts.parallelism.clamp(1, requests.len());
    if n == 1 {
        return run_one(path, requests, opts).await;
    }
    let lanes: Vec<Vec<Request>> = (0..n)
        .map(|lane| {
            requests
                .iter()
                .skip(lane)
                .step_by(n)
                .cloned()
                .collect::<Vec<_>>()
        })
        .collect();
    let results =
        futures::future::join_all(lanes.iter().map(|reqs| run_one(path, reqs, opts))).await;
    if results.iter().all(|r| r.is_err()) {
        return Err(results.into_iter().find_map(|r| r.err()).expect("n >= 1"));
    }
    let mut per_lane: Vec<std::collections::VecDeque<Outcome>> = results
        .into_iter()
        .zip(&lanes)
        .map(|(r, reqs)| match r {
            Ok(v) => v.into(),
            Err(e) => reqs
                .iter()
                .map(|_| Outcome {
                    result: Err(ViciError::Disconnected {
                        label: path.display().to_string(),
                        reason: e.to_string(),
                    }),
                    log: Vec::new(),
                })
                .collect(),
        })
        .collect();
    Ok((0..requests.len())
        .map(|i| {
            per_lane[i % n]
                .pop_front()
                .expect("one outcome per request")
        })
        .collect())
}

//! The one rtnetlink layer: the routing and VXLAN drivers and the CNI bridge plugin open
//! their sockets, read their dumps and send their changes through here, and fail with one
//! [`Error`] that says what was being done and why, in the kernel's words.
//!
//! - [`connect`] / [`connect_on`]: a route socket with extended ACKs, so a refusal carries
//!   the kernel's own message ("Nexthop device is not up"), not only an errno.
//! - [`dump`] / [`get`]: collect a dump, or look one object up ("no such device" is `None`),
//!   each within [`REQUEST_TIMEOUT`].
//! - [`message`] frames a request (pure: builders stay unit-testable without a kernel);
//!   [`send`] sends one and waits for its ACK, [`send_all`] pipelines many on one socket,
//!   [`change`] is [`send`] with the operation named in the error.
//! - [`runtime`] / [`block_on`]: a current-thread runtime for sync callers, with a backstop
//!   ([`CALL_TIMEOUT`]) for a whole exchange.

use std::future::Future;
use std::io;
use std::time::Duration;

use futures::stream::{Stream, StreamExt, TryStreamExt};
use netlink_packet_core::{
    ErrorMessage, NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_CREATE, NLM_F_EXCL,
    NLM_F_REQUEST,
};
use netlink_packet_route::RouteNetlinkMessage;
use rtnetlink::Handle;

/// A request the kernel refused: errno and its extended-ACK message (shared with the XFRM
/// socket, which reads the same netlink error format).
pub use crate::dataplane::xfrm::socket::KernelError;

/// How long one rtnetlink request (a dump, or one change and its ACK) may wait for the
/// kernel's answer before it fails.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Backstop for a whole [`block_on`] (a reconcile of many requests). Every request and dump
/// already fails after [`REQUEST_TIMEOUT`] without progress, so this only bounds a batch that
/// keeps progressing: it must leave room for tens of thousands of changes on a slow machine
/// (20,000 peers' routes under qemu TCG take minutes).
pub const CALL_TIMEOUT: Duration = Duration::from_secs(600);

/// Flags of a change the kernel must acknowledge (`ip ... del`, `ip link set`).
pub const ACK: u16 = NLM_F_REQUEST | NLM_F_ACK;
/// Flags of a creation that fails when the object exists (`ip ... add`).
pub const CREATE: u16 = ACK | NLM_F_CREATE | NLM_F_EXCL;

/// Why one rtnetlink operation failed, in words.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Reason {
    /// The kernel refused: its errno and, with extended ACKs, its own message.
    #[error(transparent)]
    Kernel(#[from] KernelError),
    /// The kernel did not answer within this long.
    #[error("no answer from the kernel within {} s (rtnetlink)", .0.as_secs_f64())]
    Timeout(Duration),
    /// Not a refusal: the request was not sent, or the answer was not understood.
    #[error("{0}")]
    Netlink(String),
}

impl Reason {
    /// The kernel's errno, for a refusal.
    pub fn errno(&self) -> Option<i32> {
        match self {
            Reason::Kernel(k) => Some(k.errno),
            _ => None,
        }
    }
}

impl From<rtnetlink::Error> for Reason {
    fn from(e: rtnetlink::Error) -> Reason {
        match e {
            rtnetlink::Error::NetlinkError(m) => Reason::Kernel(kernel_error(&m)),
            e => Reason::Netlink(e.to_string()),
        }
    }
}

/// A failed rtnetlink operation: what was being done and why, in words.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot start the netlink runtime: {0}")]
    Runtime(io::Error),
    #[error("cannot open a netlink route socket: {0}")]
    Socket(io::Error),
    /// A dump, a look-up or a change (`op`: "dumping links", "creating link cni0").
    #[error("{op} failed: {reason}")]
    Failed { op: String, reason: Reason },
}

impl Error {
    pub fn failed(op: impl Into<String>, reason: impl Into<Reason>) -> Error {
        Error::Failed {
            op: op.into(),
            reason: reason.into(),
        }
    }

    /// The errno: the kernel's for a refused operation, the OS's for a socket or runtime.
    pub fn errno(&self) -> Option<i32> {
        match self {
            Error::Runtime(e) | Error::Socket(e) => e.raw_os_error(),
            Error::Failed { reason, .. } => reason.errno(),
        }
    }

    /// Why an operation failed (None for the socket and the runtime).
    pub fn reason(&self) -> Option<&Reason> {
        match self {
            Error::Failed { reason, .. } => Some(reason),
            _ => None,
        }
    }
}

const NLMSGERR_ATTR_MSG: u16 = 1;

/// The kernel's refusal in words: errno and, when the socket asked for extended ACKs, the
/// kernel's message (e.g. "A VXLAN device with the specified VNI already exists").
pub fn kernel_error(e: &ErrorMessage) -> KernelError {
    let errno = e.raw_code().abs();
    // The payload after the error code: the echoed request (its length is the first u32),
    // then the extended-ACK attributes.
    let b = &e.header;
    let mut message = None;
    if b.len() >= 4 {
        let len = u32::from_ne_bytes([b[0], b[1], b[2], b[3]]) as usize;
        let mut off = (len + 3) & !3;
        while off + 4 <= b.len() {
            let alen = u16::from_ne_bytes([b[off], b[off + 1]]) as usize;
            let kind = u16::from_ne_bytes([b[off + 2], b[off + 3]]) & 0x3fff;
            if alen < 4 || off + alen > b.len() {
                break;
            }
            if kind == NLMSGERR_ATTR_MSG {
                let s = &b[off + 4..off + alen];
                let end = s.iter().position(|&c| c == 0).unwrap_or(s.len());
                let text = String::from_utf8_lossy(&s[..end]).trim().to_string();
                if !text.is_empty() {
                    message = Some(text);
                }
            }
            off += (alen + 3) & !3;
        }
    }
    KernelError { errno, message }
}

/// A current-thread tokio runtime with I/O and timers enabled.
pub fn runtime() -> io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .enable_time()
        .build()
}

/// Await `f` for at most `limit` (inside a runtime with timers).
pub async fn within<F: Future>(limit: Duration, f: F) -> Result<F::Output, Reason> {
    tokio::time::timeout(limit, f)
        .await
        .map_err(|_| Reason::Timeout(limit))
}

/// Run `f` to completion on a fresh current-thread runtime (not from inside a runtime),
/// failing after [`CALL_TIMEOUT`].
pub fn block_on<T, E: From<Error>>(f: impl Future<Output = Result<T, E>>) -> Result<T, E> {
    block_on_within(CALL_TIMEOUT, f)
}

/// [`block_on`] with its own time limit.
pub fn block_on_within<T, E: From<Error>>(
    limit: Duration,
    f: impl Future<Output = Result<T, E>>,
) -> Result<T, E> {
    let rt = runtime().map_err(Error::Runtime)?;
    rt.block_on(within(limit, f))
        .map_err(|r| Error::failed("the netlink exchange", r))?
}

/// Open a route socket with extended ACKs in the calling thread's network namespace; it
/// registers with `rt`, which runs its connection task.
pub fn connect_on(rt: &tokio::runtime::Handle) -> io::Result<Handle> {
    let _guard = rt.enter();
    let (mut conn, handle, _) = rtnetlink::new_connection()?;
    {
        use netlink_sys::AsyncSocket;
        // Without extended ACKs errors are still reported, just without the kernel's text.
        let _ = conn.socket_mut().socket_mut().set_ext_ack(true);
    }
    rt.spawn(conn);
    Ok(handle)
}

/// [`connect_on`] the current runtime.
pub fn connect() -> Result<Handle, Error> {
    let rt = tokio::runtime::Handle::try_current()
        .map_err(|e| Error::Socket(io::Error::other(e.to_string())))?;
    connect_on(&rt).map_err(Error::Socket)
}

/// Collect a dump (`what`: "links", "routes", ...), failing when the kernel refuses it or
/// does not finish it within [`REQUEST_TIMEOUT`].
pub async fn dump<T>(
    what: &str,
    s: impl Stream<Item = Result<T, rtnetlink::Error>>,
) -> Result<Vec<T>, Error> {
    dump_within(REQUEST_TIMEOUT, what, s).await
}

/// [`dump`] with its own time limit.
pub async fn dump_within<T>(
    limit: Duration,
    what: &str,
    s: impl Stream<Item = Result<T, rtnetlink::Error>>,
) -> Result<Vec<T>, Error> {
    let fail = |r: Reason| Error::failed(format!("dumping {what}"), r);
    within(limit, s.try_collect::<Vec<T>>())
        .await
        .map_err(fail)?
        .map_err(|e| fail(e.into()))
}

/// The one object a look-up (`what`: "link cni0") answers with; `None` when the kernel has
/// no such device.
pub async fn get<T>(
    what: &str,
    s: impl Stream<Item = Result<T, rtnetlink::Error>>,
) -> Result<Option<T>, Error> {
    let mut s = std::pin::pin!(s);
    let fail = |r: Reason| Error::failed(format!("looking up {what}"), r);
    match within(REQUEST_TIMEOUT, s.try_next()).await.map_err(fail)? {
        Ok(found) => Ok(found),
        Err(e) => match Reason::from(e) {
            r if r.errno() == Some(libc::ENODEV) => Ok(None),
            r => Err(fail(r)),
        },
    }
}

/// A request with `flags` ([`ACK`], [`CREATE`], ...), ready to send (pure).
pub fn message(payload: RouteNetlinkMessage, flags: u16) -> NetlinkMessage<RouteNetlinkMessage> {
    let mut m = NetlinkMessage::from(payload);
    m.header.flags = flags;
    m.finalize();
    m
}

/// Send one request and wait for its ACK: the kernel's refusal comes back with its
/// extended-ACK message; no answer within [`REQUEST_TIMEOUT`] is a [`Reason::Timeout`].
pub async fn send(h: &Handle, msg: NetlinkMessage<RouteNetlinkMessage>) -> Result<(), Reason> {
    let resp = queue(h, msg)?;
    within(REQUEST_TIMEOUT, answer(resp)).await?
}

/// Hand one request to the connection (it is sent in order with the others queued).
fn queue(
    h: &Handle,
    msg: NetlinkMessage<RouteNetlinkMessage>,
) -> Result<impl futures::Stream<Item = NetlinkMessage<RouteNetlinkMessage>>, Reason> {
    h.clone()
        .request(msg)
        .map_err(|e| Reason::Netlink(format!("netlink request not sent: {e}")))
}

/// The kernel's answer to one request: its ACK, or its refusal with the extended-ACK text.
async fn answer(
    mut resp: impl futures::Stream<Item = NetlinkMessage<RouteNetlinkMessage>> + Unpin,
) -> Result<(), Reason> {
    while let Some(m) = resp.next().await {
        if let NetlinkPayload::Error(e) = m.payload {
            if e.code.is_some() {
                return Err(Reason::Kernel(kernel_error(&e)));
            }
        }
    }
    Ok(())
}

/// Send every request pipelined on one socket (the kernel handles them in order): one
/// result per request, in order; a refused request does not stop the others. All are queued
/// at once; the answers are awaited in order, each for [`REQUEST_TIMEOUT`] from the one
/// before: a timeout means the kernel made no progress for that long, however long the
/// batch (one timer per request from a common start failed every request answered after the
/// first 10 s of a big batch: 5,000 routes in the VM under TCG).
pub async fn send_all(
    h: &Handle,
    msgs: impl IntoIterator<Item = NetlinkMessage<RouteNetlinkMessage>>,
) -> Vec<Result<(), Reason>> {
    let queued: Vec<_> = msgs.into_iter().map(|m| queue(h, m)).collect();
    let mut out = Vec::with_capacity(queued.len());
    for q in queued {
        out.push(match q {
            Ok(resp) => within(REQUEST_TIMEOUT, answer(resp)).await.and_then(|r| r),
            Err(e) => Err(e),
        });
    }
    out
}

/// [`send`], the operation named in the error (`op`: "creating link cni0").
pub async fn change(
    h: &Handle,
    op: impl FnOnce() -> String,
    msg: NetlinkMessage<RouteNetlinkMessage>,
) -> Result<(), Error> {
    send(h, msg).await.map_err(|r| Error::failed(op(), r))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::num::NonZeroI32;

    #[test]
    fn a_call_that_never_finishes_times_out() {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(block_on_within::<(), Error>(
                Duration::from_millis(50),
                std::future::pending(),
            ));
        });
        let r = rx
            .recv_timeout(Duration::from_secs(5))
            .expect("block_on_within did not return within 5 s");
        let e = r.unwrap_err();
        assert_eq!(
            e.reason(),
            Some(&Reason::Timeout(Duration::from_millis(50)))
        );
        assert_eq!(
            e.to_string(),
            "the netlink exchange failed: no answer from the kernel within 0.05 s (rtnetlink)"
        );
        assert_eq!(
            block_on_within::<_, Error>(Duration::from_secs(5), async { Ok(7) }).unwrap(),
            7
        );
    }

    #[test]
    fn a_dump_that_never_ends_fails_with_a_timeout() {
        let rt = runtime().unwrap();
        let e = rt
            .block_on(dump_within::<()>(
                Duration::from_millis(50),
                "routes",
                futures::stream::pending(),
            ))
            .unwrap_err();
        assert_eq!(
            e.reason(),
            Some(&Reason::Timeout(Duration::from_millis(50)))
        );
        assert_eq!(
            e.to_string(),
            "dumping routes failed: no answer from the kernel within 0.05 s (rtnetlink)"
        );
    }

    fn refusal(errno: i32) -> rtnetlink::Error {
        let mut e = ErrorMessage::default();
        e.code = NonZeroI32::new(-errno);
        e.header = 16u32.to_ne_bytes().into_iter().chain([0u8; 12]).collect();
        rtnetlink::Error::NetlinkError(e)
    }

    #[test]
    fn a_lookup_of_a_missing_device_is_none_and_other_refusals_name_it() {
        let rt = runtime().unwrap();
        let missing = futures::stream::iter([Err::<(), _>(refusal(libc::ENODEV))]);
        assert_eq!(rt.block_on(get("link x", missing)).unwrap(), None);
        let found = futures::stream::iter([Ok::<_, rtnetlink::Error>(7)]);
        assert_eq!(rt.block_on(get("link x", found)).unwrap(), Some(7));
        let denied = futures::stream::iter([Err::<(), _>(refusal(libc::EPERM))]);
        let e = rt.block_on(get("link x", denied)).unwrap_err();
        assert_eq!(e.errno(), Some(libc::EPERM));
        assert_eq!(
            e.to_string(),
            "looking up link x failed: Operation not permitted (os error 1)"
        );
        let other = futures::stream::iter([Err::<(), _>(rtnetlink::Error::RequestFailed)]);
        let e = rt.block_on(dump("links", other)).unwrap_err();
        assert_eq!(e.errno(), None);
        assert_eq!(
            e.to_string(),
            "dumping links failed: A netlink request failed"
        );
    }

    #[test]
    fn extended_ack_message_is_read() {
        // Echoed request: a 20-byte message, then NLMSGERR_ATTR_MSG.
        let mut payload = Vec::new();
        payload.extend_from_slice(&20u32.to_ne_bytes());
        payload.extend_from_slice(&[0u8; 16]);
        let text = b"A VXLAN device with the specified VNI already exists\0";
        payload.extend_from_slice(&((4 + text.len()) as u16).to_ne_bytes());
        payload.extend_from_slice(&1u16.to_ne_bytes());
        payload.extend_from_slice(text);
        let mut e = ErrorMessage::default();
        e.code = NonZeroI32::new(-17);
        e.header = payload;
        let k = kernel_error(&e);
        assert_eq!(k.errno, 17);
        assert_eq!(
            k.to_string(),
            "A VXLAN device with the specified VNI already exists (File exists (os error 17))"
        );
        let r = Reason::from(rtnetlink::Error::NetlinkError(e));
        assert_eq!(r.errno(), Some(17));
        assert_eq!(
            Error::failed("creating link vtep1042", r).to_string(),
            "creating link vtep1042 failed: A VXLAN device with the specified VNI already \
             exists (File exists (os error 17))"
        );
        let rtnetlink::Error::NetlinkError(bare) = refusal(libc::ENODEV) else {
            unreachable!()
        };
        assert_eq!(kernel_error(&bare).message, None);
    }

    #[test]
    fn message_frames_the_request_with_its_flags() {
        let m = message(RouteNetlinkMessage::DelLink(Default::default()), ACK);
        assert_eq!(m.header.flags, NLM_F_REQUEST | NLM_F_ACK);
        assert_eq!(m.header.length as usize, m.buffer_len());
        assert_eq!(
            CREATE,
            NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL
        );
    }
}

//! Shared rtnetlink plumbing for the sync drivers (routes, vxlan) and the CNI plugins: a
//! current-thread runtime to run one reconcile on, and a route socket with extended ACKs.

use std::future::Future;
use std::io;
use std::time::Duration;

use rtnetlink::Handle;

/// How long one rtnetlink request (a dump, or one change and its ACK) may wait for the
/// kernel's answer before it fails.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Backstop for a whole [`block_on`] (a reconcile of many requests): the kernel normally
/// answers each request within microseconds, so this only fires when an answer is lost.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(60);

/// A current-thread tokio runtime with I/O and timers enabled.
pub fn runtime() -> io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .enable_time()
        .build()
}

/// The error of a wait for the kernel that ran out of time.
pub fn timeout_error(waited: Duration, what: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::TimedOut,
        format!(
            "no answer from the kernel within {} s for {what} (rtnetlink)",
            waited.as_secs_f64()
        ),
    )
}

/// Await `f` for at most `limit` (inside a runtime with timers).
pub async fn within<F: Future>(limit: Duration, what: &str, f: F) -> io::Result<F::Output> {
    tokio::time::timeout(limit, f)
        .await
        .map_err(|_| timeout_error(limit, what))
}

/// Run `f` to completion on a fresh current-thread runtime (not from inside a runtime),
/// failing with `TimedOut` after [`CALL_TIMEOUT`].
pub fn block_on<F: Future>(f: F) -> io::Result<F::Output> {
    block_on_within(CALL_TIMEOUT, f)
}

/// [`block_on`] with its own time limit.
pub fn block_on_within<F: Future>(limit: Duration, f: F) -> io::Result<F::Output> {
    runtime()?.block_on(within(limit, "the netlink exchange", f))
}

/// Open a route socket on the current runtime, in the calling thread's network namespace,
/// with extended ACKs so errors carry the kernel's message.
pub fn connect() -> io::Result<Handle> {
    let (mut conn, handle, _) = rtnetlink::new_connection()?;
    {
        use netlink_sys::AsyncSocket;
        // Without extended ACKs errors are still reported, just without the kernel's text.
        let _ = conn.socket_mut().socket_mut().set_ext_ack(true);
    }
    tokio::spawn(conn);
    Ok(handle)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_call_that_never_finishes_times_out() {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(block_on_within(
                Duration::from_millis(50),
                std::future::pending::<()>(),
            ));
        });
        let r = rx
            .recv_timeout(Duration::from_secs(5))
            .expect("block_on_within did not return within 5 s");
        let e = r.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
        assert_eq!(
            e.to_string(),
            "no answer from the kernel within 0.05 s for the netlink exchange (rtnetlink)"
        );
        assert_eq!(
            block_on_within(Duration::from_secs(5), async { 7 }).unwrap(),
            7
        );
    }
}

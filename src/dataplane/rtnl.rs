//! Shared rtnetlink plumbing for the sync drivers (routes, vxlan) and the CNI plugins: a
//! current-thread runtime to run one reconcile on, and a route socket with extended ACKs.

use std::future::Future;
use std::io;

use rtnetlink::Handle;

/// A current-thread tokio runtime with I/O enabled.
pub fn runtime() -> io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
}

/// Run `f` to completion on a fresh current-thread runtime (not from inside a runtime).
pub fn block_on<F: Future>(f: F) -> io::Result<F::Output> {
    Ok(runtime()?.block_on(f))
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

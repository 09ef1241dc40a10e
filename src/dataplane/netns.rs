//! Network-namespace helpers for tests and tools: run a closure in a fresh, private network
//! namespace on its own thread (the namespace dies with the thread's last reference).

use std::io;

/// Whether this process runs as root (root-only suites skip otherwise).
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Run `f` on a new thread inside a new network namespace (with `lo` up). Child processes
/// spawned from that thread (iptables-restore, ip) inherit the namespace.
pub fn in_new_netns<T, F>(f: F) -> io::Result<T>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    let h = std::thread::spawn(move || -> io::Result<T> {
        // SAFETY: unshare only affects the calling thread's namespace membership.
        if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
            return Err(io::Error::last_os_error());
        }
        let st = std::process::Command::new("ip")
            .args(["link", "set", "lo", "up"])
            .status()?;
        if !st.success() {
            return Err(io::Error::other("ip link set lo up failed"));
        }
        Ok(f())
    });
    match h.join() {
        Ok(r) => r,
        Err(p) => std::panic::resume_unwind(p),
    }
}

//! Netlink inside a container's network namespace.
//!
//! A netlink socket belongs to the namespace of the thread that created it, for its whole
//! life. So [`connect_in`] enters the namespace (`setns` on the `CNI_NETNS` path) on a
//! dedicated short-lived thread, creates the socket there ([`rtnl::connect_on`]) and hands it
//! back: the plugin's own threads never change namespace, and every later request on that
//! socket acts inside the container.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

use crate::dataplane::rtnl;

/// Open a network namespace path (`/var/run/netns/NAME`, `/proc/PID/ns/net`).
pub fn open(path: &str) -> io::Result<File> {
    File::open(path)
}

/// An rtnetlink handle whose socket lives in the namespace `ns`; its connection task runs
/// on `rt`.
pub fn connect_in(ns: &File, rt: &tokio::runtime::Handle) -> io::Result<rtnetlink::Handle> {
    let fd = ns.try_clone()?;
    let rt2 = rt.clone();
    std::thread::Builder::new()
        .name("cni-netns".into())
        .spawn(move || {
            // SAFETY: setns on a descriptor we own; it only moves this (short-lived) thread.
            if unsafe { libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(io::Error::last_os_error());
            }
            rtnl::connect_on(&rt2)
        })?
        .join()
        .map_err(|_| io::Error::other("the netns thread panicked"))?
}

/// An rtnetlink handle in the caller's namespace (the host's, for a plugin).
pub fn connect_here(rt: &tokio::runtime::Handle) -> Result<rtnetlink::Handle, rtnl::Error> {
    rtnl::connect_on(rt).map_err(rtnl::Error::Socket)
}

/// The namespace of the calling thread, as a file (to compare or to pass by fd).
pub fn current() -> io::Result<File> {
    File::open("/proc/thread-self/ns/net")
}

/// Whether two namespace files are the same namespace.
pub fn same(a: &File, b: &File) -> io::Result<bool> {
    use std::os::unix::fs::MetadataExt;
    let (ma, mb) = (a.metadata()?, b.metadata()?);
    Ok(ma.dev() == mb.dev() && ma.ino() == mb.ino())
}

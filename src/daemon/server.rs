//! A tiny local HTTP/1.0 server for `/healthz`, `/status` and `/metrics`, on TCP (default
//! loopback) or a unix socket (`unix:/path`), and the matching client for
//! `ipsec-mesh status`.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tracing::warn;

use super::status::{metrics, unix_now, Status};
use crate::dataplane::xfrm;

/// Default listen address.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:9542";

/// Where to listen or connect.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Listen {
    Tcp(String),
    Unix(PathBuf),
}

impl Listen {
    pub fn parse(s: &str) -> Listen {
        match s.strip_prefix("unix:") {
            Some(p) => Listen::Unix(PathBuf::from(p)),
            None if s.starts_with('/') => Listen::Unix(PathBuf::from(s)),
            None => Listen::Tcp(s.to_string()),
        }
    }
}

/// The answer to one request path: (status line, content type, body).
pub fn route(path: &str, status: &Status) -> (&'static str, &'static str, String) {
    match path {
        "/healthz" => ("200 OK", "text/plain", "ok\n".into()),
        "/status" => (
            "200 OK",
            "application/json",
            serde_json::to_string_pretty(status).unwrap_or_default() + "\n",
        ),
        "/metrics" => (
            "200 OK",
            "text/plain; version=0.0.4",
            metrics(
                status,
                &if status.has_sas {
                    xfrm::stat::read()
                } else {
                    Vec::new()
                },
                unix_now(),
            ),
        ),
        _ => ("404 Not Found", "text/plain", "not found\n".into()),
    }
}

/// How the server treats connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Time a client has to send its request, and again to take the answer; then the
    /// connection is closed.
    pub timeout: Duration,
    /// Connections served at once (one thread each); more get `503` and are closed.
    pub max_connections: usize,
}

/// 5 s to send a request and 5 s to read the answer; 16 connections at once.
pub const DEFAULT_LIMITS: Limits = Limits {
    timeout: Duration::from_secs(5),
    max_connections: 16,
};

/// Longest request head read (request line and headers).
const MAX_REQUEST: u64 = 8 * 1024;

/// A TCP or unix stream the server can put deadlines on.
trait Conn: Read + Write + Send + 'static {
    fn read_timeout(&self, t: Duration) -> std::io::Result<()>;
    fn write_timeout(&self, t: Duration) -> std::io::Result<()>;
}

impl Conn for TcpStream {
    fn read_timeout(&self, t: Duration) -> std::io::Result<()> {
        self.set_read_timeout(Some(t))
    }
    fn write_timeout(&self, t: Duration) -> std::io::Result<()> {
        self.set_write_timeout(Some(t))
    }
}

impl Conn for UnixStream {
    fn read_timeout(&self, t: Duration) -> std::io::Result<()> {
        self.set_read_timeout(Some(t))
    }
    fn write_timeout(&self, t: Duration) -> std::io::Result<()> {
        self.set_write_timeout(Some(t))
    }
}

/// Reads and writes that all end by `until` (each call waits only for the time left), so a
/// client trickling bytes cannot hold a connection past its deadline either.
struct Deadline<'a, C: Conn> {
    conn: &'a mut C,
    until: Instant,
}

impl<C: Conn> Deadline<'_, C> {
    fn left(&self) -> std::io::Result<Duration> {
        let left = self.until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "status client too slow",
            ));
        }
        Ok(left)
    }
}

impl<C: Conn> Read for Deadline<'_, C> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let left = self.left()?;
        self.conn.read_timeout(left)?;
        self.conn.read(buf)
    }
}

impl<C: Conn> Write for Deadline<'_, C> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let left = self.left()?;
        self.conn.write_timeout(left)?;
        self.conn.write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.conn.flush()
    }
}

fn serve_one<C: Conn>(mut conn: C, status: &Mutex<Status>, timeout: Duration) {
    let mut line = String::new();
    {
        let input = Deadline {
            conn: &mut conn,
            until: Instant::now() + timeout,
        };
        let mut r = BufReader::new(input.take(MAX_REQUEST));
        if r.read_line(&mut line).is_err() {
            return;
        }
        // Drain the headers.
        let mut h = String::new();
        while r.read_line(&mut h).map(|n| n > 2).unwrap_or(false) {
            h.clear();
        }
    }
    let mut parts = line.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let (code, ctype, body) = if method == "GET" {
        let snapshot = status.lock().map(|s| s.clone()).unwrap_or_default();
        route(path, &snapshot)
    } else {
        ("405 Method Not Allowed", "text/plain", "GET only\n".into())
    };
    let mut out = Deadline {
        conn: &mut conn,
        until: Instant::now() + timeout,
    };
    let _ = write!(
        out,
        "HTTP/1.0 {code}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .and_then(|()| out.write_all(body.as_bytes()));
}

/// Answer `503` (best effort: the write may not get through). The request is read only if
/// it is there already (unread data would make TCP close with a reset).
fn refuse<C: Conn>(mut conn: C) {
    let _ = conn.read_timeout(Duration::from_millis(10));
    let _ = conn.read(&mut [0u8; 1024]);
    let _ = conn.write_timeout(Duration::from_millis(100));
    let body = "too many status connections\n";
    let _ = write!(
        conn,
        "HTTP/1.0 503 Service Unavailable\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
}

/// Releases a connection slot when the connection's thread ends (or fails to start).
struct Slot(Arc<AtomicUsize>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Accept forever; serve each connection on a thread of its own, at most
/// `limits.max_connections` at once.
fn accept_loop<C: Conn>(
    mut accept: impl FnMut() -> std::io::Result<C>,
    status: Arc<Mutex<Status>>,
    limits: Limits,
) {
    let active = Arc::new(AtomicUsize::new(0));
    loop {
        let conn = match accept() {
            Ok(c) => c,
            Err(e) => {
                // Out of descriptors and the like: do not spin.
                warn!(error = %e, "status server: accept failed");
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        if active.fetch_add(1, Ordering::SeqCst) >= limits.max_connections {
            active.fetch_sub(1, Ordering::SeqCst);
            refuse(conn);
            continue;
        }
        let slot = Slot(active.clone());
        let status = status.clone();
        // On a spawn failure the closure (connection and slot) is dropped: closed, released.
        if let Err(e) = std::thread::Builder::new()
            .name("status-conn".into())
            .spawn(move || {
                let _slot = slot;
                serve_one(conn, &status, limits.timeout);
            })
        {
            warn!(error = %e, "status server: cannot start a connection thread");
        }
    }
}

/// Make way for binding `path`: remove a socket left by a previous run, but refuse when a
/// process still answers on it (another sidecar of this host) or when the path is not a
/// socket (a typo must not delete a file).
fn remove_stale_socket(path: &std::path::Path) -> std::io::Result<()> {
    use std::os::unix::fs::FileTypeExt;
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return Ok(());
    };
    if !meta.file_type().is_socket() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::AlreadyExists,
            format!("{} exists and is not a socket", path.display()),
        ));
    }
    if UnixStream::connect(path).is_ok() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::AddrInUse,
            format!(
                "another process (a sidecar already running?) listens on {}",
                path.display()
            ),
        ));
    }
    std::fs::remove_file(path)
}

/// Bind and serve on a background thread, with [`DEFAULT_LIMITS`]. Returns once listening.
pub fn spawn(listen: &Listen, status: Arc<Mutex<Status>>) -> std::io::Result<()> {
    spawn_with(listen, status, DEFAULT_LIMITS).map(drop)
}

/// [`spawn`] with other limits. Returns the address bound (a TCP port 0 resolved).
pub fn spawn_with(
    listen: &Listen,
    status: Arc<Mutex<Status>>,
    limits: Limits,
) -> std::io::Result<Listen> {
    let thread = std::thread::Builder::new().name("status-http".into());
    match listen {
        Listen::Tcp(addr) => {
            let l = TcpListener::bind(addr)?;
            let bound = Listen::Tcp(l.local_addr()?.to_string());
            thread.spawn(move || accept_loop(|| l.accept().map(|(s, _)| s), status, limits))?;
            Ok(bound)
        }
        Listen::Unix(path) => {
            remove_stale_socket(path)?;
            let l = UnixListener::bind(path)?;
            thread.spawn(move || accept_loop(|| l.accept().map(|(s, _)| s), status, limits))?;
            Ok(listen.clone())
        }
    }
}

/// GET `path` from a running sidecar; the body on 200, else an error naming the address.
pub fn get(listen: &Listen, path: &str) -> Result<String, String> {
    let req = format!("GET {path} HTTP/1.0\r\n\r\n");
    let timeout = Some(Duration::from_secs(5));
    let mut raw = Vec::new();
    let res = match listen {
        Listen::Tcp(a) => TcpStream::connect(a).and_then(|mut s| {
            s.set_read_timeout(timeout)?;
            s.set_write_timeout(timeout)?;
            s.write_all(req.as_bytes())?;
            s.read_to_end(&mut raw)
        }),
        Listen::Unix(p) => UnixStream::connect(p).and_then(|mut s| {
            s.set_read_timeout(timeout)?;
            s.set_write_timeout(timeout)?;
            s.write_all(req.as_bytes())?;
            s.read_to_end(&mut raw)
        }),
    };
    let name = match listen {
        Listen::Tcp(a) => a.clone(),
        Listen::Unix(p) => format!("unix:{}", p.display()),
    };
    res.map_err(|e| format!("cannot reach the sidecar at {name}: {e} (is `ipsec-mesh run` running with --listen {name}?)"))?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    if !head.starts_with("HTTP/1.0 200") && !head.starts_with("HTTP/1.1 200") {
        return Err(format!(
            "{name}{path}: {}",
            head.lines().next().unwrap_or("no answer")
        ));
    }
    Ok(body.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serves_over_tcp_and_unix() {
        let status = Arc::new(Mutex::new(Status {
            driver: "xfrm".into(),
            ..Default::default()
        }));
        let tcp = spawn_with(
            &Listen::parse("127.0.0.1:0"),
            status.clone(),
            DEFAULT_LIMITS,
        )
        .unwrap();
        assert_eq!(get(&tcp, "/healthz").unwrap(), "ok\n");
        let v: serde_json::Value = serde_json::from_str(&get(&tcp, "/status").unwrap()).unwrap();
        assert_eq!(v["driver"], "xfrm");
        assert!(get(&tcp, "/metrics")
            .unwrap()
            .contains("ipsec_mesh_reconciles_total 0"));
        assert!(get(&tcp, "/nope").unwrap_err().contains("404"));

        let dir = tempfile::tempdir().unwrap();
        let unix = Listen::parse(&format!("unix:{}", dir.path().join("s").display()));
        spawn(&unix, status).unwrap();
        assert_eq!(get(&unix, "/healthz").unwrap(), "ok\n");
        // A second server on a live socket is refused; a stale socket is replaced; a file
        // that is not a socket is left alone.
        let e = spawn(&unix, Arc::new(Mutex::new(Status::default()))).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::AddrInUse, "{e}");
        let stale = dir.path().join("stale");
        drop(UnixListener::bind(&stale).unwrap());
        spawn(
            &Listen::Unix(stale.clone()),
            Arc::new(Mutex::new(Status::default())),
        )
        .unwrap();
        assert_eq!(get(&Listen::Unix(stale), "/healthz").unwrap(), "ok\n");
        let file = dir.path().join("file");
        std::fs::write(&file, "keep").unwrap();
        assert!(spawn(
            &Listen::Unix(file.clone()),
            Arc::new(Mutex::new(Status::default()))
        )
        .is_err());
        assert_eq!(std::fs::read_to_string(&file).unwrap(), "keep");
        let e = get(&Listen::parse("unix:/nonexistent/x"), "/status").unwrap_err();
        assert!(
            e.contains("cannot reach the sidecar at unix:/nonexistent/x"),
            "{e}"
        );
    }

    /// Both kinds of listener, with `limits`: (TCP on a free loopback port, unix socket).
    fn servers(status: Status, limits: Limits) -> (tempfile::TempDir, Vec<Listen>) {
        let status = Arc::new(Mutex::new(status));
        let dir = tempfile::tempdir().unwrap();
        let tcp = spawn_with(&Listen::parse("127.0.0.1:0"), status.clone(), limits).unwrap();
        let unix = Listen::Unix(dir.path().join("status.sock"));
        spawn_with(&unix, status, limits).unwrap();
        (dir, vec![tcp, unix])
    }

    /// A raw client connection (the test drives it by hand).
    trait Client: Read + Write + std::os::fd::AsRawFd {
        fn read_timeout(&self, t: Duration);
    }
    impl Client for TcpStream {
        fn read_timeout(&self, t: Duration) {
            self.set_read_timeout(Some(t)).unwrap();
        }
    }
    impl Client for UnixStream {
        fn read_timeout(&self, t: Duration) {
            self.set_read_timeout(Some(t)).unwrap();
        }
    }

    fn connect(l: &Listen) -> Box<dyn Client> {
        match l {
            Listen::Tcp(a) => Box::new(TcpStream::connect(a).unwrap()),
            Listen::Unix(p) => Box::new(UnixStream::connect(p).unwrap()),
        }
    }

    /// Wait (at most 10 s) until `c` has something to read, without reading it.
    fn wait_readable(c: &dyn std::os::fd::AsRawFd) {
        let mut p = libc::pollfd {
            fd: c.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: poll on one valid pollfd.
        let n = unsafe { libc::poll(&mut p, 1, 10_000) };
        assert_eq!(n, 1, "no answer within 10 s");
    }

    /// Cap the client's receive buffer (loopback TCP would otherwise queue tens of MiB
    /// for a client that does not read).
    fn small_rcvbuf(c: &dyn std::os::fd::AsRawFd) {
        let size: libc::c_int = 64 * 1024;
        // SAFETY: setsockopt on a socket we own, with a pointer to a c_int of the right size.
        let r = unsafe {
            libc::setsockopt(
                c.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVBUF,
                &size as *const libc::c_int as *const libc::c_void,
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        assert_eq!(r, 0, "{}", std::io::Error::last_os_error());
    }

    /// Read until EOF (or a reset, which also ends the connection); fail after 10 s.
    fn read_until_closed(c: &mut dyn Client) -> Vec<u8> {
        c.read_timeout(Duration::from_secs(10));
        let mut out = Vec::new();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match c.read(&mut buf) {
                Ok(0) => return out,
                Ok(n) => out.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return out,
                Err(e) => panic!("the server did not close the connection: {e}"),
            }
        }
    }

    #[test]
    fn an_idle_client_does_not_stop_healthz_and_is_closed_by_the_timeout() {
        let limits = Limits {
            timeout: Duration::from_secs(2),
            max_connections: 16,
        };
        let (_dir, listens) = servers(Status::default(), limits);
        for l in &listens {
            let opened = Instant::now();
            let mut idle = connect(l);
            std::thread::sleep(Duration::from_millis(50));
            let t = Instant::now();
            assert_eq!(get(l, "/healthz").unwrap(), "ok\n", "{l:?}");
            assert!(
                t.elapsed() < Duration::from_secs(1),
                "{l:?}: /healthz took {:?} while a client sat idle",
                t.elapsed()
            );
            // The idle connection is closed once its 2 s to send a request are over.
            assert!(read_until_closed(&mut *idle).is_empty());
            let open = opened.elapsed();
            assert!(
                open >= Duration::from_millis(1900) && open < Duration::from_secs(5),
                "{l:?}: idle connection closed after {open:?}"
            );
        }
    }

    #[test]
    fn a_client_that_never_reads_does_not_block_others_and_is_dropped() {
        // A /status answer bigger than every socket buffer between server and client, so
        // the server's write blocks until the client reads.
        let status = Status {
            mesh_errors: vec!["x".repeat(8 << 20)],
            ..Default::default()
        };
        let full = serde_json::to_string_pretty(&status).unwrap().len() + 1;
        let limits = Limits {
            timeout: Duration::from_secs(1),
            max_connections: 16,
        };
        let (_dir, listens) = servers(status, limits);
        for l in &listens {
            let mut stuck = connect(l);
            small_rcvbuf(&*stuck);
            stuck.write_all(b"GET /status HTTP/1.0\r\n\r\n").unwrap();
            // Rendering 8 MiB takes a while in a debug build: wait for the first bytes, and
            // count the server's deadline from there.
            wait_readable(&*stuck);
            let writing = Instant::now();
            std::thread::sleep(Duration::from_millis(200));
            let t = Instant::now();
            assert_eq!(get(l, "/healthz").unwrap(), "ok\n", "{l:?}");
            assert!(
                t.elapsed() < Duration::from_millis(700),
                "{l:?}: /healthz took {:?} while a client did not read",
                t.elapsed()
            );
            // Past the write deadline the server gives up on the stuck client: reading now
            // gets what was buffered, then the end, never the whole answer.
            std::thread::sleep((writing + Duration::from_millis(1500)) - Instant::now());
            let got = read_until_closed(&mut *stuck);
            assert!(
                got.starts_with(b"HTTP/1.0 200 OK\r\n"),
                "{l:?}: {:?}",
                String::from_utf8_lossy(&got[..got.len().min(80)])
            );
            assert!(
                got.len() < full,
                "{l:?}: got all {} bytes: the server kept writing past its deadline",
                got.len()
            );
        }
    }

    #[test]
    fn connections_over_the_cap_get_503_and_slots_come_back() {
        let limits = Limits {
            timeout: Duration::from_secs(5),
            max_connections: 2,
        };
        let (_dir, listens) = servers(Status::default(), limits);
        for l in &listens {
            let idle: Vec<_> = (0..2).map(|_| connect(l)).collect();
            std::thread::sleep(Duration::from_millis(50));
            let e = get(l, "/healthz").unwrap_err();
            assert!(e.contains("503 Service Unavailable"), "{l:?}: {e}");
            // Closed clients free their slots.
            drop(idle);
            let t = Instant::now();
            loop {
                match get(l, "/healthz") {
                    Ok(body) => {
                        assert_eq!(body, "ok\n");
                        break;
                    }
                    Err(e) if t.elapsed() < Duration::from_secs(2) => {
                        assert!(e.contains("503"), "{e}");
                        std::thread::sleep(Duration::from_millis(10));
                    }
                    Err(e) => panic!("{l:?}: slots not released: {e}"),
                }
            }
        }
    }
}

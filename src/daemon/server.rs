//! A tiny local HTTP/1.0 server for `/healthz`, `/status` and `/metrics`, on TCP (default
//! loopback) or a unix socket (`unix:/path`), and the matching client for
//! `ipsec-mesh status`.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::status::{metrics, unix_now, xfrm_stat, Status};

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
            metrics(status, &xfrm_stat(), unix_now()),
        ),
        _ => ("404 Not Found", "text/plain", "not found\n".into()),
    }
}

fn serve_one<S: Read + Write>(mut s: S, status: &Arc<Mutex<Status>>) {
    let mut line = String::new();
    {
        let mut r = BufReader::new(&mut s);
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
    let _ = write!(
        s,
        "HTTP/1.0 {code}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
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

/// Bind and serve on a background thread. Returns once listening.
pub fn spawn(listen: &Listen, status: Arc<Mutex<Status>>) -> std::io::Result<()> {
    let timeout = Some(Duration::from_secs(5));
    match listen {
        Listen::Tcp(addr) => {
            let l = TcpListener::bind(addr)?;
            std::thread::Builder::new()
                .name("status-http".into())
                .spawn(move || {
                    for s in l.incoming().flatten() {
                        let _ = s.set_read_timeout(timeout);
                        serve_one(s, &status);
                    }
                })?;
        }
        Listen::Unix(path) => {
            remove_stale_socket(path)?;
            let l = UnixListener::bind(path)?;
            std::thread::Builder::new()
                .name("status-http".into())
                .spawn(move || {
                    for s in l.incoming().flatten() {
                        let _ = s.set_read_timeout(timeout);
                        serve_one(s, &status);
                    }
                })?;
        }
    }
    Ok(())
}

/// GET `path` from a running sidecar; the body on 200, else an error naming the address.
pub fn get(listen: &Listen, path: &str) -> Result<String, String> {
    let req = format!("GET {path} HTTP/1.0\r\n\r\n");
    let timeout = Some(Duration::from_secs(5));
    let mut raw = Vec::new();
    let res = match listen {
        Listen::Tcp(a) => TcpStream::connect(a).and_then(|mut s| {
            s.set_read_timeout(timeout)?;
            s.write_all(req.as_bytes())?;
            s.read_to_end(&mut raw)
        }),
        Listen::Unix(p) => UnixStream::connect(p).and_then(|mut s| {
            s.set_read_timeout(timeout)?;
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
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap().to_string();
        drop(l);
        let tcp = Listen::parse(&addr);
        spawn(&tcp, status.clone()).unwrap();
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
}

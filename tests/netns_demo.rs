//! `integration/demo.sh`, the one-command mesh on one machine (root only): it runs with the
//! default driver (charon with kernel-libipsec on this kernel, xfrm on a kernel with ESP),
//! with `--driver vxlan`, and is interrupted (SIGTERM with `--keep`, SIGINT while it waits
//! for the mesh); every time nothing may be left behind: no namespace with its prefix, no
//! process it started (by the pids it reports, by the network namespaces it made, by its
//! temp dir in any process's command line or environment), no temp dir.
//!
//! Each run gets its own `TMPDIR`, and the script the test binary's `ipsec-mesh`
//! (`IPSEC_MESH_BIN`), so no cargo build runs inside the tests.

#[allow(unused_imports)] // common re-exports helpers this suite does not use
mod common;

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::time::{Duration, Instant};

const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/integration/demo.sh");
const BIN: &str = env!("CARGO_BIN_EXE_ipsec-mesh");
/// Bound for one whole run (build topology, mesh up, pings, status, teardown).
const RUN_LIMIT: Duration = Duration::from_secs(150);

/// A running demo: its output line by line, its stdin, its private TMPDIR.
struct Demo {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: Receiver<String>,
    out: Vec<String>,
    tmp: tempfile::TempDir,
    started: Instant,
    /// `(path, inode)` of each of the demo's network namespaces, seen while it ran.
    netns: BTreeSet<(String, u64)>,
    /// Set: the reader closes the script's stdout after the next line (as `| head` would).
    hangup: Arc<AtomicBool>,
}

impl Demo {
    /// Start `demo.sh ARGS` (stderr merged into stdout, stdin a pipe we hold).
    fn start(args: &[&str]) -> Demo {
        let tmp = tempfile::tempdir().unwrap();
        // `exec`: the pid we signal is the script's bash.
        let mut child = Command::new("bash")
            .arg("-c")
            .arg(r#"exec bash "$0" "$@" 2>&1"#)
            .arg(SCRIPT)
            .args(args)
            .env("IPSEC_MESH_BIN", BIN)
            .env("TMPDIR", tmp.path())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("start integration/demo.sh");
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        let hangup = Arc::new(AtomicBool::new(false));
        let hup = hangup.clone();
        std::thread::spawn(move || {
            for l in BufReader::new(stdout).lines() {
                let Ok(l) = l else { break };
                if tx.send(l).is_err() || hup.load(Ordering::SeqCst) {
                    break;
                }
            }
        });
        Demo {
            stdin: child.stdin.take(),
            child,
            lines,
            out: Vec::new(),
            tmp,
            started: Instant::now(),
            netns: BTreeSet::new(),
            hangup,
        }
    }

    fn text(&self) -> String {
        self.out.join("\n")
    }

    /// Read output until a line satisfies `pred` (true), or the output ends (false). Panics
    /// after RUN_LIMIT.
    fn until(&mut self, pred: impl Fn(&str) -> bool) -> bool {
        loop {
            let left = RUN_LIMIT.saturating_sub(self.started.elapsed());
            match self.lines.recv_timeout(left) {
                Ok(l) => {
                    let hit = pred(&l);
                    self.out.push(l);
                    self.note_netns();
                    if hit {
                        return true;
                    }
                }
                Err(RecvTimeoutError::Disconnected) => return false,
                Err(RecvTimeoutError::Timeout) => {
                    let _ = self.child.kill();
                    panic!(
                        "demo.sh still running after {RUN_LIMIT:?}:\n{}",
                        self.text()
                    );
                }
            }
        }
    }

    /// Read the rest of the output and wait for the exit code.
    fn finish(&mut self) -> Option<i32> {
        self.until(|_| false);
        let st = self.child.wait().unwrap();
        st.code()
    }

    /// Remember the demo's namespaces (path and nsfs inode) while they exist, so that
    /// processes still inside them can be found after the names are gone.
    fn note_netns(&mut self) {
        let Some(prefix) = self.prefix() else { return };
        for e in std::fs::read_dir("/run/netns")
            .into_iter()
            .flatten()
            .flatten()
        {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with(&prefix) {
                if let Ok(m) = std::fs::metadata(e.path()) {
                    self.netns.insert((name, m.ino()));
                }
            }
        }
    }

    fn signal(&self, sig: libc::c_int) {
        // SAFETY: kill(2) on our own child (the script's bash, see `start`).
        assert_eq!(
            unsafe { libc::kill(self.child.id() as libc::pid_t, sig) },
            0
        );
    }

    /// `imdemo<pid>-`, from the script's `demo: namespaces imdemo<pid>-*  temp dir ...` line.
    fn prefix(&self) -> Option<String> {
        self.out.iter().find_map(|l| {
            l.strip_prefix("demo: namespaces ")
                .and_then(|r| r.split('*').next())
                .map(str::to_string)
        })
    }

    /// The temp dir the script reported.
    fn temp_dir(&self) -> Option<PathBuf> {
        self.out.iter().find_map(|l| {
            l.split_once("  temp dir ")
                .map(|(_, d)| PathBuf::from(d.trim()))
        })
    }

    /// `(what, pid)` of each `demo: started WHAT: pid N` line.
    fn started_pids(&self) -> Vec<(String, i32)> {
        self.out
            .iter()
            .filter_map(|l| {
                let r = l.strip_prefix("demo: started ")?;
                let (what, pid) = r.rsplit_once(": pid ")?;
                Some((what.to_string(), pid.trim().parse().ok()?))
            })
            .collect()
    }

    /// Running processes inside one of the demo's namespaces (by nsfs inode, so also after
    /// the names are gone) or mentioning its temp dir: `(pid, why, command line)`.
    fn leftover_processes(&self) -> Vec<(i32, String, String)> {
        let inodes: BTreeSet<u64> = self.netns.iter().map(|(_, i)| *i).collect();
        let tmp = self.temp_dir().map(|t| t.to_string_lossy().into_owned());
        let mut v = Vec::new();
        for pid in pids() {
            if !running(pid) {
                continue;
            }
            let ns = std::fs::read_link(format!("/proc/{pid}/ns/net"))
                .map(|l| l.to_string_lossy().into_owned())
                .unwrap_or_default();
            let ino: Option<u64> = ns
                .strip_prefix("net:[")
                .and_then(|r| r.strip_suffix(']'))
                .and_then(|i| i.parse().ok());
            if ino.is_some_and(|i| inodes.contains(&i)) {
                v.push((pid, format!("in demo namespace {ns}"), cmdline(pid)));
            } else if let Some(t) = tmp.as_deref().filter(|t| mentions(pid, t)) {
                v.push((pid, format!("refers to {t}"), cmdline(pid)));
            }
        }
        v
    }

    /// Nothing of this run is left: namespaces, processes, temp dir.
    fn assert_nothing_left(&self) {
        let text = self.text();
        let prefix = self
            .prefix()
            .unwrap_or_else(|| panic!("no prefix line:\n{text}"));
        assert!(
            prefix.starts_with("imdemo") && prefix.ends_with('-'),
            "{prefix}"
        );
        // no namespace with the prefix
        let names = common::sh("ip netns list");
        let left: Vec<&str> = names.lines().filter(|l| l.starts_with(&prefix)).collect();
        assert!(left.is_empty(), "namespaces left: {left:?}\n{text}");
        // no process it started, by pid (a reused pid would not mention the temp dir)
        let tmp = self
            .temp_dir()
            .unwrap_or_else(|| panic!("no temp dir line:\n{text}"));
        let tmp_s = tmp.to_string_lossy().into_owned();
        for (what, pid) in self.started_pids() {
            assert!(
                !running(pid) || !mentions(pid, &tmp_s),
                "{what} (pid {pid}) still runs\n{text}"
            );
        }
        // no process anywhere inside its namespaces or mentioning its temp dir
        let left = self.leftover_processes();
        assert!(left.is_empty(), "processes left: {left:#?}\n{text}");
        // no temp dir, nothing at all in its TMPDIR
        assert!(!tmp.exists(), "{} left\n{text}", tmp.display());
        let rest: Vec<_> = std::fs::read_dir(self.tmp.path())
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .collect();
        assert!(rest.is_empty(), "left in TMPDIR: {rest:?}\n{text}");
    }
}

impl Drop for Demo {
    /// After a failed assertion: stop the script and remove what it left (the assertions
    /// have looked already).
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        for (pid, _, _) in self.leftover_processes() {
            // SAFETY: kill(2) on a process of this test's demo (in its namespaces or
            // referring to its temp dir).
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        for (name, _) in &self.netns {
            if Path::new("/run/netns").join(name).exists() {
                let pids = Command::new("ip")
                    .args(["netns", "pids", name])
                    .output()
                    .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                    .unwrap_or_default();
                for p in pids.split_whitespace().filter_map(|p| p.parse().ok()) {
                    // SAFETY: kill(2) on a process inside a namespace this test's demo made.
                    unsafe { libc::kill(p, libc::SIGKILL) };
                }
                let _ = Command::new("ip").args(["netns", "del", name]).status();
            }
        }
    }
}

fn pids() -> Vec<i32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect()
}

/// Whether `pid` exists and is not a zombie.
fn running(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => s
            .rsplit_once(") ")
            .is_some_and(|(_, r)| !r.starts_with('Z')),
        Err(_) => false,
    }
}

fn cmdline(pid: i32) -> String {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| String::from_utf8_lossy(&b).replace('\0', " "))
        .unwrap_or_default()
}

/// Whether `pid`'s command line or environment contains `s` (charon's environment holds
/// STRONGSWAN_CONF in the temp dir, the sidecars' command lines the metadata file).
fn mentions(pid: i32, s: &str) -> bool {
    let env = std::fs::read(format!("/proc/{pid}/environ"))
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default();
    cmdline(pid).contains(s) || env.contains(s)
}

/// The default driver the script must pick on this kernel.
/// The demo tests run one at a time: `demo.sh --clean` removes every demo's namespaces and
/// processes (all `imdemo*`), and a freed namespace inode can be reused by another demo at
/// once, so a concurrent demo would be torn down or counted as a leftover.
fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    static DEMOS: std::sync::Mutex<()> = std::sync::Mutex::new(());
    DEMOS.lock().unwrap_or_else(|e| e.into_inner())
}

fn default_driver() -> &'static str {
    if common::kernel_has_esp() {
        "xfrm"
    } else {
        common::require_program(common::CHARON, "charon-systemd");
        "charon"
    }
}

/// The output shows the status table of host-a with both peers up, and `pairs` rounds of 3
/// ping replies with no loss.
fn assert_status_and_pings(d: &Demo, driver: &str, pairs: usize) {
    let text = d.text();
    assert!(
        text.contains(&format!("host host-a  driver {driver}  ")),
        "{text}"
    );
    let header = d
        .out
        .iter()
        .position(|l| l.starts_with("PEER") && l.contains("ENDPOINT") && l.contains("STATE"))
        .unwrap_or_else(|| panic!("no status table:\n{text}"));
    for (peer, ip) in [("host-b", "192.0.2.2"), ("host-c", "192.0.2.3")] {
        let row = d.out[header..]
            .iter()
            .find(|l| l.starts_with(peer))
            .unwrap_or_else(|| panic!("no row for {peer}:\n{text}"));
        let w: Vec<&str> = row.split_whitespace().collect();
        assert_eq!((w[1], w[2]), (ip, "up"), "{row}\n{text}");
    }
    let replies = d
        .out
        .iter()
        .filter(|l| l.starts_with("64 bytes from 10.42.") && l.contains("seq="))
        .count();
    assert!(replies >= 3 * pairs, "{replies} ping replies:\n{text}");
    let clean = d
        .out
        .iter()
        // iputils ("3 received") or busybox ("3 packets received") ping
        .filter(|l| {
            l.starts_with("3 packets transmitted, 3 ") && l.contains(" received, 0% packet loss")
        })
        .count();
    assert_eq!(clean, pairs, "{text}");
}

#[test]
#[ignore = "needs root: integration/run.sh runs it as root (--include-ignored)"]
fn default_driver_meshes_pings_shows_status_and_leaves_nothing() {
    require_root!();
    let _serial = one_at_a_time();
    let driver = default_driver();
    let mut d = Demo::start(&[]);
    let code = d.finish();
    let text = d.text();
    assert_eq!(code, Some(0), "{text}");
    assert!(
        text.contains(&format!("demo: driver {driver} (auto: ")),
        "{text}"
    );
    assert_status_and_pings(&d, driver, 3);
    let started = d.started_pids();
    let want = if driver == "charon" { 6 } else { 3 };
    assert_eq!(started.len(), want, "{started:?}");
    // Encrypted on the wire: the switch saw ESP and no packet with a container address.
    assert!(
        text.contains("=> container traffic crossed between the hosts only inside ESP: encrypted"),
        "{text}"
    );
    let plain = d
        .out
        .iter()
        .find(|l| l.contains("with a container address (10.42.*):"))
        .unwrap_or_else(|| panic!("{text}"));
    assert!(plain.trim_end().ends_with(" 0 packets"), "{plain}");
    assert!(text.contains("demo: OK: 3 hosts"), "{text}");
    d.assert_nothing_left();
}

#[test]
#[ignore = "needs root: integration/run.sh runs it as root (--include-ignored)"]
fn vxlan_driver_meshes_pings_shows_status_and_leaves_nothing() {
    require_root!();
    let _serial = one_at_a_time();
    let mut d = Demo::start(&["--driver", "vxlan"]);
    let code = d.finish();
    let text = d.text();
    assert_eq!(code, Some(0), "{text}");
    assert!(
        text.contains("demo: driver vxlan (chosen with --driver)"),
        "{text}"
    );
    assert_status_and_pings(&d, "vxlan", 3);
    assert_eq!(d.started_pids().len(), 3, "{text}");
    let vx = d
        .out
        .iter()
        .find(|l| l.contains("VXLAN (UDP 4789):"))
        .unwrap_or_else(|| panic!("{text}"));
    let n: u64 = vx
        .split_whitespace()
        .rev()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap();
    assert!(n > 0, "{vx}");
    d.assert_nothing_left();
}

/// `--keep`: the mesh stays until Enter; SIGTERM then tears everything down.
#[test]
#[ignore = "needs root: integration/run.sh runs it as root (--include-ignored)"]
fn sigterm_while_kept_tears_everything_down() {
    require_root!();
    let _serial = one_at_a_time();
    let driver = default_driver();
    let mut d = Demo::start(&["--keep"]);
    assert!(
        d.until(|l| l.starts_with("press Enter")),
        "no prompt:\n{}",
        d.text()
    );
    assert_status_and_pings(&d, driver, 3);
    // Still up while kept: a container ping across hosts works.
    let prefix = d.prefix().unwrap();
    assert!(
        Command::new("ip")
            .args(["netns", "exec", &format!("{prefix}ac")])
            .args(["ping", "-c", "1", "-W", "2", "10.42.3.2"])
            .stdout(Stdio::null())
            .status()
            .unwrap()
            .success(),
        "kept mesh does not ping\n{}",
        d.text()
    );
    assert!(!d.netns.is_empty());
    d.signal(libc::SIGTERM);
    let code = d.finish();
    let text = d.text();
    assert_eq!(code, Some(143), "{text}");
    assert!(text.contains("==> tearing down"), "{text}");
    d.assert_nothing_left();
}

/// `--keep` and Enter: torn down, exit 0 (the pings worked).
#[test]
#[ignore = "needs root: integration/run.sh runs it as root (--include-ignored)"]
fn enter_while_kept_tears_down_and_exits_0() {
    require_root!();
    let _serial = one_at_a_time();
    let mut d = Demo::start(&["--keep", "--driver", "vxlan"]);
    assert!(
        d.until(|l| l.starts_with("press Enter")),
        "no prompt:\n{}",
        d.text()
    );
    std::thread::sleep(Duration::from_millis(300));
    assert!(d.child.try_wait().unwrap().is_none(), "{}", d.text());
    d.stdin.as_mut().unwrap().write_all(b"\n").unwrap();
    let code = d.finish();
    assert_eq!(code, Some(0), "{}", d.text());
    d.assert_nothing_left();
}

/// SIGINT (Ctrl-C) midway, while the sidecars are coming up: everything goes.
#[test]
#[ignore = "needs root: integration/run.sh runs it as root (--include-ignored)"]
fn sigint_while_the_mesh_comes_up_tears_everything_down() {
    require_root!();
    let _serial = one_at_a_time();
    default_driver();
    let mut d = Demo::start(&[]);
    assert!(
        d.until(|l| l.starts_with("demo: started ipsec-mesh run on host-c")),
        "{}",
        d.text()
    );
    assert!(!d.netns.is_empty());
    d.signal(libc::SIGINT);
    let code = d.finish();
    let text = d.text();
    assert_eq!(code, Some(130), "{text}");
    assert!(!text.contains("demo: OK"), "{text}");
    d.assert_nothing_left();
}

/// `--driver xfrm` needs ESP in the kernel: without it, one clear error and nothing left;
/// with it, the mesh.
#[test]
#[ignore = "needs root: integration/run.sh runs it as root (--include-ignored)"]
fn xfrm_driver_as_the_kernel_allows() {
    require_root!();
    let _serial = one_at_a_time();
    let mut d = Demo::start(&["--driver", "xfrm"]);
    let code = d.finish();
    let text = d.text();
    if common::kernel_has_esp() {
        assert_eq!(code, Some(0), "{text}");
        assert_status_and_pings(&d, "xfrm", 3);
    } else {
        assert_eq!(code, Some(1), "{text}");
        assert!(
            text.contains("demo: error: --driver xfrm: this kernel cannot hold ESP SAs: CONFIG_INET_ESP is missing; use --driver charon"),
            "{text}"
        );
        assert!(d.started_pids().is_empty(), "{text}");
    }
    d.assert_nothing_left();
}

/// Without root: one clear message, exit 1, nothing created. (As root the script is run as
/// `nobody` through setpriv.)
#[test]
fn refuses_without_root_and_rejects_bad_arguments() {
    use std::os::unix::fs::PermissionsExt;
    let tmp = tempfile::tempdir().unwrap();
    // `nobody` may not be able to read the checkout (e.g. under /root): it runs a copy.
    let copy = tempfile::tempdir().unwrap();
    let script = copy.path().join("demo.sh");
    std::fs::copy(SCRIPT, &script).unwrap();
    std::fs::set_permissions(copy.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    let run = |args: &[&str]| {
        let mut c = if common::is_root() {
            let mut c = Command::new("setpriv");
            c.args(["--reuid=65534", "--regid=65534", "--clear-groups", "bash"])
                .arg(&script);
            c
        } else {
            let mut c = Command::new("bash");
            c.arg(&script);
            c
        };
        let o = c
            .args(args)
            .env("TMPDIR", tmp.path())
            .env("IPSEC_MESH_BIN", BIN)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        (
            o.status.code(),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        )
    };
    let (code, err) = run(&[]);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("demo: error: needs root (it creates network namespaces): run it as root"),
        "{err}"
    );
    let (code, err) = run(&["--driver", "wireguard"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("--driver: \"wireguard\" is not one of auto, charon, xfrm, vxlan"),
        "{err}"
    );
    assert!(err.contains("--keep"), "usage follows: {err}");
    let (code, err) = run(&["--timeout", "soon"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("--timeout: \"soon\""), "{err}");
    assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 0);
}

/// A run killed with SIGKILL cannot clean up; `demo.sh --clean` removes what it left
/// (namespaces with the processes inside them, its temp dir) and nothing of a live run.
#[test]
#[ignore = "needs root: integration/run.sh runs it as root (--include-ignored)"]
fn clean_removes_what_a_sigkilled_run_left() {
    require_root!();
    let _serial = one_at_a_time();
    let mut d = Demo::start(&["--keep", "--driver", "vxlan"]);
    assert!(
        d.until(|l| l.starts_with("press Enter")),
        "no prompt:\n{}",
        d.text()
    );
    d.signal(libc::SIGKILL);
    assert_eq!(d.finish(), None, "{}", d.text());
    // Left behind: its namespaces, its sidecars, its temp dir.
    let prefix = d.prefix().unwrap();
    assert!(common::sh("ip netns list")
        .lines()
        .any(|l| l.starts_with(&prefix)));
    assert!(!d.leftover_processes().is_empty());
    assert!(d.temp_dir().unwrap().exists());
    let o = Command::new("bash")
        .arg(SCRIPT)
        .arg("--clean")
        .env("TMPDIR", d.tmp.path())
        .env("IPSEC_MESH_BIN", BIN)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "{out}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(
        out.contains(&format!("demo: removed namespace {prefix}sw")),
        "{out}"
    );
    assert!(
        out.contains(&format!(
            "demo: removed {}",
            d.temp_dir().unwrap().display()
        )),
        "{out}"
    );
    d.assert_nothing_left();
}

/// The output goes into a pipe whose reader goes away (`demo.sh | head`): SIGPIPE stops the
/// script, and it still tears everything down.
#[test]
#[ignore = "needs root: integration/run.sh runs it as root (--include-ignored)"]
fn closed_output_pipe_still_tears_everything_down() {
    require_root!();
    let _serial = one_at_a_time();
    let mut d = Demo::start(&["--driver", "vxlan"]);
    assert!(d.until(|l| l.starts_with("demo: mesh up ")), "{}", d.text());
    d.hangup.store(true, Ordering::SeqCst);
    let code = d.finish();
    let text = d.text();
    assert_eq!(code, Some(141), "{text}");
    assert!(!text.contains("demo: OK"), "{text}");
    d.assert_nothing_left();
}
